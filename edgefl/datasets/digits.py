"""The embedded default: scikit-learn's bundled digits, so a run needs no download.

1,797 real 8x8 scans; each is upsampled to 20x20 and centred in a 28x28 frame, the way
MNIST centres its 20x20 digits. The split is fixed (stratified, seed 0) so every process
sees the same one. The data has no writers, so it has no natural partition.
"""

from __future__ import annotations

import numpy as np

from edgefl.datasets.base import DIGIT_NAMES, Dataset, Split

_SPLIT_SEED = 0
_TEST_FRACTION = 0.2


def _to_28x28(images: np.ndarray) -> np.ndarray:
    from scipy.ndimage import zoom

    scaled = zoom(images.astype(np.float32) / 16.0, (1, 2.5, 2.5), order=1)
    framed = np.pad(scaled, ((0, 0), (4, 4), (4, 4)))
    return np.clip(framed, 0.0, 1.0)[..., None].astype(np.float32)


def load(name: str = "digits") -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = _to_28x28(digits.images)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=_TEST_FRACTION, stratify=y, random_state=_SPLIT_SEED)
    return Dataset(name, Split(x_train, y_train), Split(x_test, y_test), 10, DIGIT_NAMES)
