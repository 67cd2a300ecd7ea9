"""The device's half of TFF's ``SecureSumFactory`` for float values: clip to the
round's bounds and map onto the integers 0 .. 2^32 - 1, as TFF's
``_client_tensor_shift_for_secure_sum`` does, in numpy, bit for bit (a LiteRT device
has no TensorFlow). The coordinator's compiled TFF round undoes it after the sum.

The arithmetic and its order are TFF's: clip in float32; a float64 scale of
(2^32 - 1) over the float32 span; round half to even; shift by the rounded, scaled
lower bound in integers; clip to the range.
"""

from __future__ import annotations

import numpy as np

SECAGG_MAX = 2**32 - 1
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
