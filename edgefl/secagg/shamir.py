"""t-of-n sharing of 256-bit secrets, by PyCryptodome's Shamir scheme.

PyCryptodome shares 16-byte secrets over GF(2^128) (AES-GCM's field); a 256-bit seed or
key is shared as its two halves, each with its own random polynomial, so any t - 1
shares say nothing of either half. A share is held by the party at position x (1, 2,
...): in the protocol, a device's neighbours in their sorted order.
"""

from __future__ import annotations

from collections.abc import Mapping

from Crypto.Protocol.SecretSharing import Shamir

from edgefl.secagg.crypto import SEED_BYTES, SecAggError

SHARE_BYTES = SEED_BYTES


def split(secret: bytes, threshold: int, holders: int) -> list[bytes]:
    """One 32-byte share per holder (x = 1 .. holders); any ``threshold`` recover it."""
    if len(secret) != SEED_BYTES:
        raise ValueError(f"only {SEED_BYTES}-byte secrets are shared")
    if not 1 <= threshold <= holders:
        raise ValueError(f"a threshold of {threshold} does not fit {holders} holders")
    if threshold == 1:  # PyCryptodome wants a polynomial of degree >= 1
        return [secret] * holders
    low, high = (Shamir.split(threshold, holders, secret[i : i + 16]) for i in (0, 16))
    return [a + b for (_, a), (_, b) in zip(low, high)]


def combine(shares: Mapping[int, bytes], threshold: int) -> bytes:
    """The secret from at least ``threshold`` shares, by holder position."""
    if len(shares) < threshold:
        raise SecAggError(f"{len(shares)} shares cannot recover a secret shared {threshold}-of-n")
    if any(len(s) != SHARE_BYTES for s in shares.values()):
        raise SecAggError(f"a share is {SHARE_BYTES} bytes")
    chosen = sorted(shares.items())[:threshold]
    if threshold == 1:
        return chosen[0][1]
    return b"".join(bytes(Shamir.combine([(x, share[i : i + 16]) for x, share in chosen])) for i in (0, 16))
