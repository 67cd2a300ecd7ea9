"""A folder of images per writer: ``root/<writer>/<label>/*.png``, the simplest way to
bring one's own handwriting.

If ``root`` has ``train/`` and ``test/`` in that layout they are the split; otherwise a
fixed 20% of each writer's images is held out as the test split. Images may be
grayscale or colour (converted to grayscale with Pillow) and must all be the same size.
Label names are the label folder names, sorted (numerically when they are all numbers).
Neither PNG nor a phone camera fixes which way round ink is, so each image's median
pixel is taken to be its background: an image whose median is light is inverted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgefl.datasets.base import Dataset, DatasetError, LazySplit, Split, checked_labels, concatenate, holdout_by_writer

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".pgm", ".tif", ".tiff")


def _subdirs(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_in(directory: Path) -> list[Path]:
    return sorted(
        p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )


def has_split_folders(root: Path) -> bool:
    return (root / "train").is_dir() and (root / "test").is_dir()


def recognises(root: Path) -> bool:
    """Whether some ``<writer>/<label>/`` below root (or below its train/) holds an image."""
    base = root / "train" if has_split_folders(root) else root
    return any(_images_in(label) for writer in _subdirs(base) for label in _subdirs(writer))


def _listing(base: Path) -> dict[str, dict[str, list[Path]]]:
    """{writer: {label: image files}}, refusing empty writers and empty label folders."""
    writers = _subdirs(base)
    if not writers:
        raise DatasetError(base, "has no writer folders (expected <writer>/<label>/*.png)")
    listing: dict[str, dict[str, list[Path]]] = {}
    for writer in writers:
        labels = _subdirs(writer)
        if not labels:
            raise DatasetError(writer, "writer folder has no label folders (expected <label>/*.png)")
        listing[writer.name] = {}
        for label in labels:
            images = _images_in(label)
            if not images:
                raise DatasetError(label, f"label folder has no images ({', '.join(IMAGE_SUFFIXES)})")
            listing[writer.name][label.name] = images
    return listing


def _sorted_labels(names: set[str]) -> tuple[str, ...]:
    if all(n.isdigit() for n in names):
        return tuple(sorted(names, key=lambda n: (int(n), n)))
    return tuple(sorted(names))


class _Reader:
    """Reads images one by one, holding every image to the first one's size."""

    def __init__(self):
        self.first: Path | None = None
        self.size: tuple[int, int] | None = None

    def __call__(self, path: Path) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as image:
                gray = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise DatasetError(path, f"not a readable image ({exc})") from None
        if self.size is None:
            self.first, self.size = path, gray.shape
        elif gray.shape != self.size:
            raise DatasetError(
                path,
                f"is {gray.shape[1]}x{gray.shape[0]} pixels, but the images are {self.size[1]}x{self.size[0]} (as {self.first})",
            )
        return 1.0 - gray if np.median(gray) > 0.5 else gray


def _read(
    listing: dict[str, dict[str, list[Path]]], label_names: tuple[str, ...], writer_ids: tuple[str, ...], reader: _Reader
) -> Split:
    label_of = {name: i for i, name in enumerate(label_names)}
    position = {w: i for i, w in enumerate(writer_ids)}
    parts = []
    for writer in sorted(listing):
        images, labels = [], []
        for label, files in sorted(listing[writer].items(), key=lambda item: label_of[item[0]]):
            images.extend(reader(f) for f in files)
            labels.extend([label_of[label]] * len(files))
        y = checked_labels(np.array(labels, np.int64), len(label_names), writer)
        parts.append(Split(np.stack(images)[..., None].astype(np.float32), y, np.full(len(y), position[writer], np.int64)))
    return concatenate(parts)


def probe(root: Path) -> None:
    """Cheap: the folder layout (listing only, no image is opened)."""
    for base in (root / "train", root / "test") if has_split_folders(root) else (root,):
        _listing(base)


def load(root: Path, name: str) -> Dataset:
    reader = _Reader()
    if has_split_folders(root):
        train_listing, test_listing = _listing(root / "train"), _listing(root / "test")
        labels = {label for listing in (train_listing, test_listing) for per_writer in listing.values() for label in per_writer}
        label_names = _sorted_labels(labels)
        writer_ids = tuple(sorted(set(train_listing) | set(test_listing)))
        test = _read(test_listing, label_names, writer_ids, reader)
        train = LazySplit(lambda: _read(train_listing, label_names, writer_ids, reader))
    else:
        listing = _listing(root)
        label_names = _sorted_labels({label for per_writer in listing.values() for label in per_writer})
        writer_ids = tuple(sorted(listing))
        train, test = holdout_by_writer(_read(listing, label_names, writer_ids, reader))
    return Dataset(name, train, test, len(label_names), label_names, writer_ids)
