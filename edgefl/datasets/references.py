"""What a ``--dataset`` value means: a name, or a path whose format is recognised by its
name and layout. Resolving looks only at names and directory listings, so a bad
reference is refused at configuration time, in one line, before anything is read.

The names ``digits`` and ``fashion-mnist`` win over a same-named directory in the
working directory (write ``./digits`` for that). A ``#`` selects an EMNIST SQLite subset
unless the whole text is an existing path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from edgefl.datasets import digits, emnist_h5, emnist_sqlite, idx, image_folders, leaf
from edgefl.datasets.base import Dataset, DatasetError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
NAMED = ("digits", "fashion-mnist")
ACCEPTED = (
    "digits, fashion-mnist (Debian's dataset-fashion-mnist), a directory of MNIST-format IDX files, "
    "fed_emnist[_digitsonly]_{train,test}.h5, emnist_all.sqlite[#digits_only|#all], "
    "a LEAF FEMNIST .json file or directory with train/ and test/, or a folder root/<writer>/<label>/*.png"
)


@dataclass(frozen=True)
class Reference:
    text: str
    kind: str  # digits, idx, h5, sqlite, leaf, images
    path: Path | None = None
    subset: str | None = None  # sqlite only: digits_only or all


def resolve(text: str) -> Reference:
    """The reference's kind and path; DatasetError (one line) if it names nothing usable."""
    if isinstance(text, os.PathLike):
        text = os.fspath(text)
    if not isinstance(text, str) or not text.strip():
        raise DatasetError(repr(text), f"empty dataset reference; use {ACCEPTED}")
    if text == "digits":
        return Reference(text, "digits")
    if text == "fashion-mnist":
        if not FASHION_MNIST_DIR.is_dir():
            raise DatasetError(
                text,
                f"{FASHION_MNIST_DIR}/ is missing: install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist)",
            )
        return Reference(text, "idx", FASHION_MNIST_DIR)
    base, subset = text, None
    if "#" in text and not Path(text).expanduser().exists():
        base, _, subset = text.rpartition("#")
        if not base.lower().endswith(".sqlite"):
            raise DatasetError(text, "only an emnist_all.sqlite reference takes a #subset (#digits_only or #all)")
        if subset not in emnist_sqlite.SUBSETS:
            raise DatasetError(text, f"unknown subset #{subset}: use #digits_only or #all")
    path = Path(base).expanduser()
    if not path.exists():
        raise DatasetError(text, f"no such dataset or path; use {ACCEPTED}")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".h5", ".hdf5"):
            return Reference(text, "h5", path)
        if suffix == ".sqlite":
            return Reference(text, "sqlite", path, subset or emnist_sqlite.DEFAULT_SUBSET)
        if suffix == ".json":
            return Reference(text, "leaf", path)
        raise DatasetError(text, f"unrecognised file type; use {ACCEPTED}")
    if not path.is_dir():
        raise DatasetError(text, "neither a file nor a directory")
    try:
        if idx.recognises(path):
            return Reference(text, "idx", path)
        if leaf.recognises(path):
            return Reference(text, "leaf", path)
        if image_folders.recognises(path):
            return Reference(text, "images", path)
    except OSError as exc:
        raise DatasetError(text, f"cannot list the directory: {exc.strerror or exc}") from None
    raise DatasetError(text, f"directory with no recognised layout; use {ACCEPTED}")


def probe(ref: Reference) -> None:
    """The cheap checks of a resolved reference: headers, tables, groups, listings."""
    if ref.kind == "idx":
        idx.probe(ref.path)
    elif ref.kind == "h5":
        emnist_h5.probe(ref.path)
    elif ref.kind == "sqlite":
        emnist_sqlite.probe(ref.path, ref.subset)
    elif ref.kind == "images":
        image_folders.probe(ref.path)


def load(ref: Reference) -> Dataset:
    if ref.kind == "digits":
        return digits.load(ref.text)
    if ref.kind == "idx":
        return idx.load(ref.path, ref.text)
    if ref.kind == "h5":
        return emnist_h5.Source(ref.path).dataset(ref.text)
    if ref.kind == "sqlite":
        return emnist_sqlite.Source(ref.path, ref.subset).dataset(ref.text)
    if ref.kind == "leaf":
        return leaf.load(ref.path, ref.text)
    return image_folders.load(ref.path, ref.text)


def writer_source(ref: Reference) -> emnist_h5.Source | emnist_sqlite.Source | None:
    """For the formats that can read one writer without the rest: a source that lists
    writers and reads chosen ones; None for the others."""
    if ref.kind == "h5":
        return emnist_h5.Source(ref.path)
    if ref.kind == "sqlite":
        return emnist_sqlite.Source(ref.path, ref.subset)
    return None
