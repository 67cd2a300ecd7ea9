"""The device's half of TFF's ``SecureSumFactory`` for float values: clip to the
round's bounds and map onto the integers 0 .. 2^32 - 1, as TFF's
``_client_tensor_shift_for_secure_sum`` does, in numpy, bit for bit (a LiteRT device
has no TensorFlow). The coordinator's compiled TFF round undoes it after the sum.

The arithmetic and its order are TFF's: clip in float32; a float64 scale of
(2^32 - 1) over the float32 span; round half to even; shift by the rounded, scaled
lower bound in integers; clip to the range.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

CODE_BITS = 32
SECAGG_MAX = 2**CODE_BITS - 1
_INT64 = np.iinfo(np.int64)


def _saturate_int64(x: np.ndarray) -> np.ndarray:
    return np.clip(x, float(_INT64.min), float(_INT64.max)).astype(np.int64)


def secure_quantize(value: np.ndarray, lower: float, upper: float) -> np.ndarray:
    """``value`` (float32) as int64 codes in [0, 2^32 - 1] for the bounds [lower, upper]."""
    lower, upper = np.float32(lower), np.float32(upper)
    if not lower <= upper:
        raise ValueError("the lower bound must not exceed the upper")
    clipped = np.clip(np.asarray(value, np.float32), lower, upper)
    span = np.float64(np.float32(upper - lower))
    scale = np.float64(SECAGG_MAX) / span if span else np.float64(0.0)  # TF's divide_no_nan
    rounded = _saturate_int64(np.round(clipped.astype(np.float64) * scale))
    shift = _saturate_int64(np.round(np.float64(lower) * scale))
    return np.clip(rounded - shift, 0, SECAGG_MAX)


def clip_counts(value_max: float, value_min: float, lower: float, upper: float) -> tuple[np.int32, np.int32]:
    """Whether the value went above the upper bound and below the lower (1 or 0 each):
    TFF's ``secure_upper_clipped_count`` and ``secure_lower_clipped_count`` summands."""
    return np.int32(np.float32(upper) < np.float32(value_max)), np.int32(np.float32(lower) > np.float32(value_min))


@dataclass(frozen=True)
class SecureMeanLayout:
    """What a device hands to the secure sums of TFF's weighted mean
    (``MeanFactory`` with ``SecureSumFactory`` value and weight sums), as one vector:
    a summand of 1 for the value and one for the weight (their sums count the devices,
    which the coordinator needs to undo the shift), the weighted value's codes per
    tensor and its clip counts (above, below), then the weight's code and clip counts.
    That is the order TFF's compiled ``work`` emits them in, except that the tensors
    come in the order checkpoints list them (by name), which every device knows, where
    TFF's follow the model (``leaves_in`` puts them back). The coordinator checks this
    against its compiled TFF round when it starts, so a TFF that changed the order is
    refused rather than misread."""

    tensors: tuple[tuple[str, int], ...]  # (name, entries), by name

    @classmethod
    def of(cls, spec: Sequence) -> SecureMeanLayout:
        """The layout for a model's tensors (``edgefl.wire.TensorSpec``s)."""
        return cls(tuple(sorted((s.name, s.size) for s in spec)))

    @property
    def sizes(self) -> tuple[int, ...]:
        return (1, 1, *(size for _, size in self.tensors), 1, 1, 1, 1, 1)

    @property
    def bitwidths(self) -> tuple[int, ...]:
        """Each leaf's ``secure_sum_bitwidth`` (codes 32 bits, counts and summands 1)."""
        return (1, 1, *(CODE_BITS,) * len(self.tensors), 1, 1, CODE_BITS, 1, 1)

    @property
    def size(self) -> int:
        return sum(self.sizes)

    def split(self, vector: np.ndarray) -> list[np.ndarray]:
        """A flat vector back into its leaves (flat), in this layout's order."""
        return np.split(np.asarray(vector), np.cumsum(self.sizes)[:-1])

    def leaves_in(self, leaves: Sequence[np.ndarray], names: Sequence[str]) -> list[np.ndarray]:
        """``leaves`` (in this layout's order) with the tensors' codes in ``names``'
        order: TFF's, which is the model's."""
        k = len(self.tensors)
        codes = dict(zip((name for name, _ in self.tensors), leaves[2 : 2 + k]))
        return [*leaves[:2], *(codes[name] for name in names), *leaves[2 + k :]]


def secure_mean_inputs(
    names: Sequence[str], delta: Sequence[np.ndarray], weight: float, value_bound: float, weight_bound: float
) -> list[np.ndarray]:
    """The device's half of TFF's secure weighted mean, leaf by leaf in
    ``SecureMeanLayout``'s order (``delta``'s tensors are named by ``names``): the
    update weighted by its example count, clipped to [-value_bound, value_bound] and
    quantized; the weight within [0, weight_bound]."""
    weighted = {name: np.asarray(d, np.float32) * np.float32(weight) for name, d in zip(names, delta, strict=True)}
    flat = np.concatenate([w.ravel() for w in weighted.values()])
    above, below = clip_counts(flat.max(initial=-np.inf), flat.min(initial=np.inf), -value_bound, value_bound)
    w = np.float32(weight)
    w_above, w_below = clip_counts(w, w, 0.0, weight_bound)
    one = np.int32(1)
    return [
        one,
        one,
        *(secure_quantize(weighted[name], -value_bound, value_bound) for name in sorted(weighted)),
        above,
        below,
        secure_quantize(w, 0.0, weight_bound),
        w_above,
        w_below,
    ]


def flatten(leaves: Sequence[np.ndarray]) -> np.ndarray:
    """Leaves of non-negative integers as one uint64 vector, SecAgg's input."""
    return np.concatenate([np.asarray(x).astype(np.uint64).ravel() for x in leaves])
