"""The types every loader returns, the one error they raise, and the checks they share.

Kept apart from the loaders so that each format's module depends only on this one, and
so that the pixel convention (float32 in [0, 1], 0.0 = background) is enforced in one
place rather than re-implemented per format.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HOLDOUT_FRACTION = 0.2
_HOLDOUT_SEED = 20240611
_PIXEL_SLACK = 1e-4

DIGIT_NAMES = tuple(str(d) for d in range(10))
EMNIST_NAMES = (
    DIGIT_NAMES + tuple(chr(c) for c in range(ord("A"), ord("Z") + 1)) + tuple(chr(c) for c in range(ord("a"), ord("z") + 1))
)


class DatasetError(ValueError):
    """A bad reference or a wrong file: one line naming the file (or reference) and the fault.

    One line, because it ends up as a CLI error or a configuration problem, where a
    traceback or a multi-line dump would bury the one fact the user needs.
    """

    def __init__(self, where: str | Path, what: str):
        super().__init__(" ".join(f"{where}: {what}".split()))


@dataclass(frozen=True)
class Split:
    x: np.ndarray  # (n, H, W, 1) float32 in [0, 1], 0.0 = background, ink towards 1.0
    y: np.ndarray  # (n,) int64 labels in 0..num_classes-1
    writers: np.ndarray | None = None  # (n,) int64 index into Dataset.writer_ids, or None

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, indices) -> Split:
        return Split(self.x[indices], self.y[indices], None if self.writers is None else self.writers[indices])


class LazySplit(Split):
    """A Split whose arrays are read on first use.

    The coordinator needs only a dataset's test split; for federated EMNIST the training
    file is 2 GB as float32. ``load_dataset`` therefore hands out a LazySplit for
    ``train``: it is a Split in every respect, but the file is read only when ``x``, ``y``
    or ``writers`` is first touched (once, under a lock, since device hosts run threads).
    """

    def __init__(self, load: Callable[[], Split]):
        object.__setattr__(self, "_load", load)
        object.__setattr__(self, "_lock", threading.Lock())
        object.__setattr__(self, "_split", None)

    def _loaded(self) -> Split:
        if self._split is None:
            with self._lock:
                if self._split is None:
                    object.__setattr__(self, "_split", self._load())
        return self._split

    @property
    def is_loaded(self) -> bool:
        return self._split is not None

    x = property(lambda self: self._loaded().x)
    y = property(lambda self: self._loaded().y)
    writers = property(lambda self: self._loaded().writers)

    def __repr__(self) -> str:
        return repr(self._split) if self.is_loaded else "LazySplit(<not read yet>)"


@dataclass(frozen=True)
class Dataset:
    name: str  # the reference it was loaded from
    train: Split
    test: Split
    num_classes: int
    label_names: tuple[str, ...]  # len == num_classes
    writer_ids: tuple[str, ...] = ()  # empty: the data has no writers (no natural partition)

    def __post_init__(self):
        if len(self.label_names) != self.num_classes:
            raise ValueError(f"{self.name}: {len(self.label_names)} label names for {self.num_classes} classes")

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One example's shape (train's and test's agree; read from test, which never
        forces a lazily loaded train split to be read)."""
        return tuple(int(d) for d in self.test.x.shape[1:])


def unit_images(pixels: np.ndarray, where: str | Path, *, background_is_one: bool) -> np.ndarray:
    """(n, H, W) floats in [0, 1] as checked (n, H, W, 1) float32 with 0.0 = background."""
    if pixels.ndim != 3 or pixels.shape[0] == 0 or pixels.shape[1] == 0 or pixels.shape[2] == 0:
        raise DatasetError(where, f"pixels have shape {pixels.shape}, expected (examples, height, width)")
    if pixels.dtype.kind not in "fiu":
        raise DatasetError(where, f"pixels have dtype {pixels.dtype}, expected floats")
    x = np.asarray(pixels, dtype=np.float32)
    if not np.isfinite(x).all():
        raise DatasetError(where, "pixels include NaN or infinite values")
    low, high = float(x.min()), float(x.max())
    if low < -_PIXEL_SLACK or high > 1.0 + _PIXEL_SLACK:
        raise DatasetError(where, f"pixels range over [{low:g}, {high:g}], expected [0, 1]")
    x = np.clip(x, 0.0, 1.0)
    if background_is_one:
        x = 1.0 - x
    return x[..., None]


def checked_labels(labels: np.ndarray, num_classes: int, where: str | Path, *, count: int | None = None) -> np.ndarray:
    """Labels as int64, refused unless 1-D integers in 0..num_classes-1 (and ``count`` long)."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise DatasetError(where, f"labels have shape {labels.shape}, expected (examples,)")
    if labels.size and labels.dtype.kind not in "iu":
        if labels.dtype.kind != "f" or not np.array_equal(labels, np.round(labels)):
            raise DatasetError(where, f"labels have dtype {labels.dtype}, expected integers")
    if count is not None and len(labels) != count:
        raise DatasetError(where, f"{len(labels)} labels for {count} images")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)][0]
        raise DatasetError(where, f"label {bad:g} is out of range 0..{num_classes - 1}")
    return labels.astype(np.int64)


def concatenate(parts: list[Split], height_width: tuple[int, int] | None = None) -> Split:
    """Splits joined in order; an empty list gives an empty split of ``height_width``."""
    if not parts:
        h, w = height_width or (28, 28)
        return Split(np.zeros((0, h, w, 1), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64))
    writers = None if parts[0].writers is None else np.concatenate([p.writers for p in parts])
    return Split(np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]), writers)


def holdout_by_writer(data: Split, fraction: float = HOLDOUT_FRACTION) -> tuple[Split, Split]:
    """(train, test) holding out a fixed ``fraction`` of each writer's examples.

    For formats that ship one pool per writer rather than a train/test pair. The draw
    for a writer depends only on a constant and that writer's index, so every process
    computes the same split. As in TFF's federated EMNIST, a writer with two or more
    examples keeps at least one on each side.
    """
    train_idx, test_idx = [], []
    for writer in np.unique(data.writers):
        members = np.flatnonzero(data.writers == writer)
        n = len(members)
        n_test = 0 if n < 2 else min(max(round(n * fraction), 1), n - 1)
        order = np.random.default_rng([_HOLDOUT_SEED, int(writer)]).permutation(members)
        test_idx.append(np.sort(order[:n_test]))
        train_idx.append(np.sort(order[n_test:]))
    return data.subset(_joined(train_idx)), data.subset(_joined(test_idx))


def _joined(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)
