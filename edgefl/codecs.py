"""The device half of an aggregator: how a device encodes its update for the wire, and
how the coordinator decodes it before folding it in.

A run's aggregator names its codec (``edgefl.config.DEVICE_CODECS``), the task carries
the codec's name to the device, and both sides build the same ``Codec`` from it, so
the codec is declared once, here, and nowhere repeats its parameters. ``float32``
sends the delta as it is; ``quantized:<bits>`` sends stochastically rounded codes
(``edgefl.compression``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from edgefl import compression, wire
from edgefl.limits import MAX_ABS_UPDATE
from edgefl.wire import TensorSpec, WireError


@dataclass(frozen=True)
class Codec:
    """``bits`` None: float32 tensors; otherwise ``bits``-bit quantized codes."""

    bits: int | None = None

    def __post_init__(self) -> None:
        if self.bits is not None and self.bits not in compression.BITS:
            raise ValueError(f"quantized codecs take {', '.join(map(str, compression.BITS))} bits, not {self.bits}")

    @property
    def name(self) -> str:
        return "float32" if self.bits is None else f"quantized:{self.bits}"

    def wire_spec(self, spec: Sequence[TensorSpec]) -> tuple[TensorSpec, ...]:
        """The tensors an encoded update of a model with ``spec`` holds."""
        return tuple(spec) if self.bits is None else compression.quantized_spec(spec, self.bits)

    def payload_bytes(self, spec: Sequence[TensorSpec]) -> int:
        """The tensor bytes of one update (headers aside)."""
        return sum(s.nbytes for s in self.wire_spec(spec))

    def encode(
        self, names: Sequence[str], arrays: Sequence[np.ndarray], metadata: Mapping[str, str], rng: np.random.Generator
    ) -> bytes:
        """An update's upload body (``rng`` draws the stochastic rounding)."""
        if self.bits is None:
            return wire.encode(names, arrays, metadata)
        out_names, out_arrays = [], []
        for name, array in zip(names, arrays):
            packed, bounds = compression.quantize(array, self.bits, rng)
            out_names += [name, name + compression.BOUNDS_SUFFIX]
            out_arrays += [packed, bounds]
        return wire.encode(out_names, out_arrays, {**metadata, "quantization_bits": str(self.bits)})

    def decode(self, data: bytes, spec: Sequence[TensorSpec]) -> tuple[list[np.ndarray], dict[str, str]]:
        """The float32 delta (in ``spec`` order) and metadata of an upload body, or a
        ``WireError`` saying what is wrong. Values (and quantization bounds) beyond
        ``limits.MAX_ABS_UPDATE`` are refused."""
        if self.bits is None:
            return wire.decode(data, spec, max_abs=MAX_ABS_UPDATE)
        try:
            arrays, metadata = wire.decode(data, self.wire_spec(spec), max_abs=MAX_ABS_UPDATE)
        except WireError as error:
            if error.code in ("malformed", "non_finite", "out_of_range"):
                raise
            raise WireError(error.code, f"This run takes {self.bits}-bit quantized updates: {error.detail}") from None
        if metadata.get("quantization_bits") != str(self.bits):
            raise WireError("wrong_quantization", f"Metadata quantization_bits must be {self.bits}, as the task said.")
        return [compression.dequantize(arrays[2 * i], arrays[2 * i + 1], s, self.bits) for i, s in enumerate(spec)], metadata


FLOAT32 = Codec()


def named(name: str) -> Codec:
    """The codec a task names (``float32`` or ``quantized:<bits>``); ValueError if unknown."""
    if name == "float32":
        return FLOAT32
    kind, _, bits = name.partition(":")
    if kind == "quantized" and bits.isascii() and bits.isdigit() and len(bits) <= 2:
        return Codec(int(bits))
    raise ValueError(f"unknown codec {name!r}: float32 or quantized:<bits>")
