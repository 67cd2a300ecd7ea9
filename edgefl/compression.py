"""Quantized uploads: a device sends each tensor of its delta as ``bits``-bit codes
with the tensor's (min, max) beside them; the coordinator decodes before averaging.

The arithmetic is that of tensor_encoding's ``UniformQuantizationEncodingStage``, the
stage TFF's ``EncodedFactory`` and ``compression_aggregator`` quantize with: a tensor
is mapped from [min, max] onto [0, 2^bits - 1] and rounded stochastically (up with
probability equal to the remainder), so the decoded value is unbiased and off by less
than one step. It is numpy here because the encoder runs on the device, and a LiteRT
device has no TensorFlow. Codes are packed ``bits`` to a byte stream, most significant
bit first, so a 4-bit upload weighs half an 8-bit one. Widths are 1, 2, 4, 8 or 16 bits.

A quantized update is an ordinary safetensors payload whose spec is derived from the
model's (``quantized_spec``), so the wire's header checks apply to it unchanged; its
encoding and decoding are ``edgefl.codecs``'.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edgefl.wire import TensorSpec, WireError

BITS = (1, 2, 4, 8, 16)  # whole codes to a byte (or two): packing costs a few shifts
BOUNDS_SUFFIX = ":min_max"


def packed_bytes(size: int, bits: int) -> int:
    return -(-size * bits // 8)


def quantized_spec(spec: Sequence[TensorSpec], bits: int) -> tuple[TensorSpec, ...]:
    """Each float tensor as its packed codes (U8) and its bounds (two F32)."""
    return tuple(
        entry
        for s in spec
        for entry in (
            TensorSpec(s.name, (packed_bytes(int(np.prod(s.shape, dtype=np.int64)), bits),), "U8"),
            TensorSpec(s.name + BOUNDS_SUFFIX, (2,), "F32"),
        )
    )


def quantize(array: np.ndarray, bits: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(packed codes, [min, max]) of one tensor, stochastically rounded."""
    x = np.asarray(array, np.float32).ravel()
    bounds = np.array([x.min(), x.max()], np.float32) if x.size else np.zeros(2, np.float32)
    top = (1 << bits) - 1
    span = bounds[1] - bounds[0]
    if span > 0:
        scaled = (x - bounds[0]) * np.float32(top / span)
        scaled += rng.random(x.size, dtype=np.float32)
        codes = np.clip(np.floor(scaled, out=scaled), 0, top)
    else:  # a constant tensor decodes exactly from its bounds
        codes = np.zeros(x.size, np.float32)
    return _pack(codes.astype(np.uint16 if bits > 8 else np.uint8), bits), bounds


def dequantize(packed: np.ndarray, bounds: np.ndarray, spec: TensorSpec, bits: int) -> np.ndarray:
    if not bounds[0] <= bounds[1]:
        raise WireError("bad_bounds", f"{spec.name}{BOUNDS_SUFFIX} must be [min, max] with min <= max.")
    size = int(np.prod(spec.shape, dtype=np.int64))
    values = _unpack(packed, size, bits).astype(np.float32)
    with np.errstate(over="ignore"):  # in float32 and in tensor_encoding's order, for its very numbers
        values /= np.float32((1 << bits) - 1)
        values *= bounds[1] - bounds[0]
        values += bounds[0]
    if not np.isfinite(values).all():  # finite bounds whose span overflows float32
        raise WireError("bad_bounds", f"{spec.name}{BOUNDS_SUFFIX} spans more than float32 holds.")
    return values.reshape(spec.shape)


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes as one stream, most significant bit first: below 8 bits, 8 // bits codes
    to a byte, shifted into place one position at a time."""
    if bits == 8:
        return codes
    if bits == 16:
        return codes.astype(">u2").view(np.uint8)
    per_byte = 8 // bits
    columns = np.pad(codes, (0, -codes.size % per_byte)).reshape(-1, per_byte)
    packed = np.zeros(len(columns), np.uint8)
    for j in range(per_byte):
        packed |= columns[:, j] << np.uint8(8 - bits * (j + 1))
    return packed


def _unpack(packed: np.ndarray, size: int, bits: int) -> np.ndarray:
    if bits == 8:
        return packed
    if bits == 16:
        return packed.view(">u2")
    mask = np.uint8((1 << bits) - 1)
    columns = [(packed >> np.uint8(8 - bits * (j + 1))) & mask for j in range(8 // bits)]
    return np.stack(columns, axis=1).ravel()[:size]
