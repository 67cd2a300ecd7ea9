"""Handwriting datasets as 28x28x1 float32 images in [0, 1] with a fixed train/test split.

The embedded default is scikit-learn's bundled digits (1,797 real 8x8 scans), so that a
run needs no download. Each 8x8 scan is upsampled to 20x20 and centred in a 28x28 frame,
the way MNIST centres its 20x20 digits. NumPy, SciPy and scikit-learn only, no
TensorFlow, so a device can load its shard without importing TensorFlow.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np

DATASET_NAMES = ("digits",)
_DIGITS_SPLIT_SEED = 0
_DIGITS_TEST_FRACTION = 0.2


@dataclass(frozen=True)
class Split:
    x: np.ndarray  # (n, 28, 28, 1) float32 in [0, 1]
    y: np.ndarray  # (n,) int64 labels 0..9

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, indices: np.ndarray) -> Split:
        return Split(self.x[indices], self.y[indices])


@dataclass(frozen=True)
class Dataset:
    name: str
    train: Split
    test: Split


def _digits_to_28x28(images: np.ndarray) -> np.ndarray:
    from scipy.ndimage import zoom

    scaled = zoom(images.astype(np.float32) / 16.0, (1, 2.5, 2.5), order=1)
    framed = np.pad(scaled, ((0, 0), (4, 4), (4, 4)))
    return np.clip(framed, 0.0, 1.0)[..., None].astype(np.float32)


@cache
def load_dataset(name: str) -> Dataset:
    """The named dataset; the split is fixed so every process sees the same one."""
    if name != "digits":
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = _digits_to_28x28(digits.images)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=_DIGITS_TEST_FRACTION, stratify=y, random_state=_DIGITS_SPLIT_SEED
    )
    return Dataset(name, Split(x_train, y_train), Split(x_test, y_test))
