"""A per-device handwriting style: the feature skew that FEMNIST's writers have.

Label skew (dirichlet, classes) changes *which* digits a device sees; real writers
also differ in *how* they write. With ``+style`` every device draws its own fixed style
from (seed, device index) and applies it to every image of its shard: slant (shear),
stroke width (grey dilation or erosion), scale and rotation. The draws are mild, so
digits stay readable. The functions are pure: the same (seed, index) gives the same
style in every process and every round.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

_STREAM = 0x57E1E  # keeps the style's random stream apart from the partition's
ROTATION_SD_DEGREES = 10.0
SHEAR_SD = 0.25
SCALE_RANGE = (0.85, 1.15)
STROKE_RANGE = (-1, 2)  # pixels, inclusive


@dataclass(frozen=True)
class Style:
    rotation_degrees: float  # counter-clockwise
    shear: float  # slant: horizontal shift per row from the centre, in pixels per pixel
    scale: float  # > 1 writes larger
    stroke: int  # pixels added to (or, negative, taken from) the stroke width


def draw_style(seed: int, index: int) -> Style:
    """Device ``index``'s style under ``seed``: the same in every process and round."""
    rng = np.random.default_rng([_STREAM, int(seed), int(index)])
    return Style(
        rotation_degrees=float(
            np.clip(rng.normal(0.0, ROTATION_SD_DEGREES), -2.5 * ROTATION_SD_DEGREES, 2.5 * ROTATION_SD_DEGREES)
        ),
        shear=float(np.clip(rng.normal(0.0, SHEAR_SD), -2.5 * SHEAR_SD, 2.5 * SHEAR_SD)),
        scale=float(rng.uniform(*SCALE_RANGE)),
        stroke=int(rng.integers(STROKE_RANGE[0], STROKE_RANGE[1] + 1)),
    )


def _inverse_matrix(style: Style) -> np.ndarray:
    """Output (row, col) offset from the centre -> input offset, for affine_transform."""
    angle = math.radians(style.rotation_degrees)
    # In (row, col) coordinates with rows pointing down, a counter-clockwise rotation:
    rotate = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    slant = np.array([[1.0, 0.0], [-style.shear, 1.0]])  # upper rows move right when shear > 0
    forward = rotate @ slant * style.scale
    return np.linalg.inv(forward)


def apply_style(x: np.ndarray, style: Style) -> np.ndarray:
    """Images (n, H, W[, 1]) in [0, 1] (0 = background) written in ``style``; same shape,
    float32, still in [0, 1]. The input is not modified."""
    from scipy.ndimage import affine_transform, grey_dilation, grey_erosion

    images = np.asarray(x, dtype=np.float32)
    squeeze = images.ndim == 4
    if squeeze:
        images = images[..., 0]
    if images.ndim != 3:
        raise ValueError(f"apply_style takes (n, H, W) or (n, H, W, 1) images, not shape {np.shape(x)}")
    if len(images) == 0:
        return np.asarray(x, dtype=np.float32).copy()
    centre = (np.array(images.shape[1:]) - 1) / 2.0
    inverse = _inverse_matrix(style)
    matrix = np.eye(3)
    matrix[1:, 1:] = inverse
    offset = np.concatenate([[0.0], centre - inverse @ centre])
    out = affine_transform(images, matrix, offset=offset, order=1, mode="constant", cval=0.0)
    if style.stroke > 0:
        out = grey_dilation(out, size=(1, style.stroke + 1, style.stroke + 1))
    elif style.stroke < 0:
        out = grey_erosion(out, size=(1, 1 - style.stroke, 1 - style.stroke))
    out = np.clip(out, 0.0, 1.0).astype(np.float32)
    return out[..., None] if squeeze else out
