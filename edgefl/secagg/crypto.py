"""Secure aggregation's primitives, all from pyca/cryptography: X25519 key agreement,
HKDF-SHA256 to turn an agreed secret into keys, AES-GCM for the shares that travel
through the coordinator, and an AES-256-CTR keystream as the mask generator.

The masks must be unpredictable to anyone without the 256-bit seed, so they come from
a stream cipher keyed by it, not from a statistical generator: NumPy's Mersenne Twister
(what Flower's SecAgg+ masks with, seeded by 32 bits) is recovered from 624 outputs, and
a 32-bit seed is found by trying them all.
"""

from __future__ import annotations

import os

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SEED_BYTES = 32  # self-mask seeds and derived keys: 256 bits
_NONCE_BYTES = 12
SEALED_OVERHEAD = _NONCE_BYTES + 16  # a sealed message's nonce and tag
_RAW = serialization.Encoding.Raw


class SecAggError(ValueError):
    """A protocol message that is malformed, forged, misrouted or replayed."""


def new_seed() -> bytes:
    return os.urandom(SEED_BYTES)


def new_private_key() -> bytes:
    return X25519PrivateKey.generate().private_bytes(_RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def public_key(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)


def agree(private: bytes, peer_public: bytes, purpose: bytes) -> bytes:
    """A 256-bit key both ends derive from their X25519 agreement, for one ``purpose``
    (the round and what the key is for: so no key serves twice)."""
    try:
        shared = X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as error:  # a low-order point, or the wrong length
        raise SecAggError(f"unusable public key: {error}") from None
    return HKDF(algorithm=hashes.SHA256(), length=SEED_BYTES, salt=None, info=b"edgefl secagg " + purpose).derive(shared)


def seal(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    """AES-256-GCM with a random nonce (prepended); ``associated`` (round, sender,
    receiver) is authenticated, so a ciphertext moved to another round or peer fails."""
    nonce = os.urandom(_NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated)


def open_sealed(key: bytes, sealed: bytes, associated: bytes) -> bytes:
    if len(sealed) < _NONCE_BYTES + 16:
        raise SecAggError("a sealed message is too short")
    try:
        return AESGCM(key).decrypt(sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:], associated)
    except InvalidTag:
        raise SecAggError("a sealed message fails authentication (tampered, or not for this round and peer)") from None


def add_mask(total: np.ndarray, seed: bytes, *, subtract: bool = False) -> None:
    """Add (or subtract) to ``total`` (uint64, in place, modulo 2^64) the mask under
    ``seed``: the AES-256-CTR keystream from a zero counter, read as little-endian
    uint64 words. Reduced modulo 2^bits afterwards (2^bits divides 2^64), it is uniform
    below 2^bits; so a device reduces its input once, not once per mask. The keystream
    is written straight into one buffer (AES-NI makes it about twice ChaCha20's speed
    here, and no copies are made)."""
    if len(seed) != SEED_BYTES:
        raise SecAggError(f"a mask seed is {SEED_BYTES} bytes")
    words = np.empty_like(total, dtype="<u8")
    Cipher(algorithms.AES(seed), modes.CTR(b"\0" * 16)).encryptor().update_into(_zeros(words.nbytes), words.view(np.uint8))
    if subtract:
        total -= words
    else:
        total += words


def mask(seed: bytes, size: int, bits: int) -> np.ndarray:
    """``size`` uniform integers modulo 2^bits (uint64, bits <= 64): ``add_mask``'s
    mask on its own (each seed expands once per purpose)."""
    if not 1 <= bits <= 64:
        raise ValueError("masks are 1 to 64 bits wide")
    words = np.zeros(size, np.uint64)
    add_mask(words, seed)
    if bits < 64:
        words &= np.uint64((1 << bits) - 1)
    return words


_ZEROS = bytearray()


def _zeros(size: int) -> memoryview:
    """``size`` zero bytes to encrypt (one buffer, grown as needed, never written)."""
    global _ZEROS
    if len(_ZEROS) < size:
        _ZEROS = bytearray(size)
    return memoryview(_ZEROS)[:size]
