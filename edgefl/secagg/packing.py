"""A masked input on the wire: each entry in as few whole bytes as its modulus needs.

Masked entries are uniform below 2^bits, so they do not compress; sending the
ceil(bits / 8) low bytes of each (little-endian) instead of a uint64 saves a quarter
of the upload at the usual 42 bits (32-bit codes, up to 1,023 devices).
"""

from __future__ import annotations

import numpy as np


def sum_bits(bitwidth: int, devices: int) -> int:
    """The modulus (as a power of two) that holds the sum of ``devices`` values of
    ``bitwidth`` bits without wrapping: n (2^b - 1) < 2^(b + ceil(log2 n))."""
    return bitwidth + max(devices - 1, 0).bit_length()


def entry_bytes(bits: int) -> int:
    return (bits + 7) // 8


def pack(vector: np.ndarray, bits: int) -> bytes:
    width = entry_bytes(bits)
    as_bytes = np.asarray(vector, "<u8").view(np.uint8).reshape(-1, 8)
    return as_bytes[:, :width].tobytes()


def problem(data: bytes, size: int, bits: int) -> str | None:
    """Why ``data`` is not ``size`` packed entries below 2^bits, or None (only the top
    byte of each entry is looked at, so checking an upload costs little)."""
    width = entry_bytes(bits)
    if len(data) != size * width:
        return f"a masked input is {size} entries of {width} bytes ({size * width} bytes), not {len(data)}"
    spare = 8 * width - bits  # high bits of the top byte that must be zero
    if spare and size and int(np.frombuffer(data, np.uint8).reshape(size, width)[:, -1].max()) >> (8 - spare):
        return f"a masked input's entries must be below 2^{bits}"
    return None


def unpack(data: bytes, size: int, bits: int) -> np.ndarray:
    """The uint64 entries ``pack`` wrote; ValueError if ``data`` is not ``size`` of them below 2^bits."""
    refused = problem(data, size, bits)
    if refused:
        raise ValueError(refused)
    width = entry_bytes(bits)
    wide = np.zeros((size, 8), np.uint8)
    wide[:, :width] = np.frombuffer(data, np.uint8).reshape(size, width)
    return wide.view("<u8").ravel()
