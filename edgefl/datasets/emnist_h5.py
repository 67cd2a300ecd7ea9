"""TFF <= 0.18's federated EMNIST: ``fed_emnist[_digitsonly]_{train,test}.h5``.

The layout is TFF's ``HDF5ClientData``: a top-level group ``examples`` with one subgroup
per writer (TFF's client ids are the sorted subgroup names), each holding the datasets
``pixels`` (float32, (n, 28, 28), 1.0 = background, inverted here) and ``label`` (int32,
(n,)). The reference is either file; its partner is found by name (``_train`` <->
``_test``). ``digitsonly`` in the name means 10 classes, otherwise 62 (0-9, A-Z, a-z).

One writer is one device: groups are read one by one, so the natural partition reads
only the selected writers and the coordinator never reads the training file at all.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from edgefl.datasets.base import (
    DIGIT_NAMES,
    EMNIST_NAMES,
    Dataset,
    DatasetError,
    LazySplit,
    Split,
    checked_labels,
    concatenate,
    unit_images,
)

_PAIR = re.compile(r"^(?P<stem>.+)_(?P<split>train|test)\.(?P<ext>h5|hdf5)$")
_EXAMPLES = "examples"


def pair(path: Path) -> tuple[Path, Path]:
    """(train file, test file) for a reference naming either of them."""
    match = _PAIR.match(path.name)
    if not match:
        raise DatasetError(
            path, "an HDF5 reference must name a *_train.h5 or *_test.h5 file (e.g. fed_emnist_digitsonly_train.h5)"
        )
    stem, ext = match["stem"], match["ext"]
    return path.with_name(f"{stem}_train.{ext}"), path.with_name(f"{stem}_test.{ext}")


def label_names(path: Path) -> tuple[str, ...]:
    return DIGIT_NAMES if "digitsonly" in path.name.lower() else EMNIST_NAMES


def _open(path: Path):
    import h5py

    if not path.is_file():
        raise DatasetError(path, "missing (the train and test files of federated EMNIST are read as a pair)")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise DatasetError(path, f"not a readable HDF5 file ({exc})") from None


def _examples(path: Path, file):
    import h5py

    group = file.get(_EXAMPLES)
    if not isinstance(group, h5py.Group):
        raise DatasetError(path, f"no {_EXAMPLES!r} group (TFF's layout is examples/<writer>/pixels and label)")
    if len(group) == 0:
        raise DatasetError(path, f"the {_EXAMPLES!r} group holds no writers")
    return group


def writers_of(path: Path) -> list[str]:
    """The file's writer ids, sorted as TFF sorts its client ids (names only, no data)."""
    with _open(path) as file:
        return sorted(_examples(path, file).keys())


def probe(path: Path) -> None:
    """Cheap: both files open and have an ``examples`` group with writers."""
    for part in pair(path):
        writers_of(part)


def read_writers(path: Path, writers: list[str], writer_ids: tuple[str, ...], num_classes: int) -> Split:
    """The examples of ``writers``, in that order; no other writer's group is touched."""
    import h5py

    position = {w: i for i, w in enumerate(writer_ids)}
    parts = []
    with _open(path) as file:
        examples = _examples(path, file)
        for writer in writers:
            where = f"{path}: examples/{writer}"
            group = examples.get(writer)
            if not isinstance(group, h5py.Group):
                raise DatasetError(where, "is not a group of pixels and label")
            for key in ("pixels", "label"):
                if not isinstance(group.get(key), h5py.Dataset):
                    raise DatasetError(where, f"has no {key!r} dataset")
            pixels, labels = group["pixels"][()], group["label"][()]
            if pixels.ndim >= 1 and len(pixels) == 0:
                raise DatasetError(where, "has no examples")
            x = unit_images(pixels, where, background_is_one=True)
            y = checked_labels(labels, num_classes, where, count=len(x))
            if parts and x.shape[1:] != parts[0].x.shape[1:]:
                raise DatasetError(
                    where, f"pixels are {x.shape[1]}x{x.shape[2]}, other writers' {parts[0].x.shape[1]}x{parts[0].x.shape[2]}"
                )
            parts.append(Split(x, y, np.full(len(y), position[writer], np.int64)))
    return concatenate(parts)


class Source:
    """A federated EMNIST HDF5 pair: writer lists cheaply, examples on demand."""

    def __init__(self, path: Path):
        self.train_path, self.test_path = pair(path)
        self.label_names = label_names(path)
        self.train_writers = tuple(writers_of(self.train_path))
        self.test_writers = tuple(writers_of(self.test_path))
        self.writer_ids = tuple(sorted(set(self.train_writers) | set(self.test_writers)))

    def read_train(self, writers: list[str]) -> Split:
        return read_writers(self.train_path, writers, self.writer_ids, len(self.label_names))

    def dataset(self, name: str) -> Dataset:
        test = read_writers(self.test_path, list(self.test_writers), self.writer_ids, len(self.label_names))
        train = LazySplit(lambda: self.read_train(list(self.train_writers)))
        return Dataset(name, train, test, len(self.label_names), self.label_names, self.writer_ids)
