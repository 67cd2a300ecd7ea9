"""t-of-n sharing of 256-bit secrets over the prime field of p = 2^521 - 1.

A secret is the constant term of a random polynomial of degree t - 1 over GF(p); the
party at position x (1, 2, ...: in the protocol, a device's neighbours in their sorted
order) holds its value at x, and any t values give the secret back by Lagrange
interpolation at 0, while t - 1 say nothing of it. p is a Mersenne prime above 2^256,
so a seed or an X25519 key is one field element, and Python's integers do the field
arithmetic.

Why not a library: PyCryptodome's Shamir (the well-kept one) shares 16-byte secrets
over GF(2^128) in pure-Python field arithmetic, so a 256-bit seed takes two sharings,
and recovering one took 27 ms here at t = 21: 13 s for the unmasking of a 500-device
round, against a whole budget of 7 s. Here it takes well under a millisecond.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping

from edgefl.secagg.crypto import SEED_BYTES, SecAggError

PRIME = 2**521 - 1
SHARE_BYTES = 66  # an element of GF(PRIME), big-endian


def split(secret: bytes, threshold: int, holders: int) -> list[bytes]:
    """One share per holder (x = 1 .. holders); any ``threshold`` of them recover it."""
    if len(secret) != SEED_BYTES:
        raise ValueError(f"only {SEED_BYTES}-byte secrets are shared")
    if not 1 <= threshold <= holders:
        raise ValueError(f"a threshold of {threshold} does not fit {holders} holders")
    coefficients = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = []
    for x in range(1, holders + 1):
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % PRIME
        shares.append(y.to_bytes(SHARE_BYTES, "big"))
    return shares


def combine(shares: Mapping[int, bytes], threshold: int) -> bytes:
    """The secret from at least ``threshold`` shares, by holder position."""
    if len(shares) < threshold:
        raise SecAggError(f"{len(shares)} shares cannot recover a secret shared {threshold}-of-n")
    points = []
    for x, share in sorted(shares.items())[:threshold]:
        y = int.from_bytes(share, "big") if len(share) == SHARE_BYTES else PRIME
        if not (0 < x < PRIME and y < PRIME):
            raise SecAggError("a share is not a point of the field")
        points.append((x, y))
    secret = 0
    for i, (xi, yi) in enumerate(points):
        numerator = denominator = 1
        for j, (xj, _) in enumerate(points):
            if j != i:
                numerator = numerator * xj % PRIME
                denominator = denominator * (xj - xi) % PRIME
        secret = (secret + yi * numerator * pow(denominator, -1, PRIME)) % PRIME
    if secret >= 1 << (8 * SEED_BYTES):
        raise SecAggError("the shares do not recover a 256-bit secret (forged, or from different secrets)")
    return secret.to_bytes(SEED_BYTES, "big")
