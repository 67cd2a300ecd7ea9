"""MNIST-format IDX files: MNIST, Fashion-MNIST and EMNIST in their distributed form.

A directory holding ``[prefix]train-images-idx3-ubyte[.gz]``, ``...train-labels-idx1-ubyte``,
and ``t10k-`` (or ``test-``) images and labels. Every header is checked (magic number,
dimensions, byte count against the file's length, one label per image) before the data
is used, so a truncated download is one clear error instead of a reshape traceback.

EMNIST stores each image transposed relative to MNIST (a file whose name contains
"emnist" is transposed back). Pixels are uint8 with 0 = background in all three; they
become float32 / 255. An EMNIST ``<prefix>mapping.txt`` (label, ASCII code) beside the
files names the classes; otherwise the names are the label numbers.
"""

from __future__ import annotations

import gzip
import re
import zlib
from pathlib import Path

import numpy as np

from edgefl.datasets.base import EMNIST_NAMES, Dataset, DatasetError, LazySplit, Split, checked_labels

_NAME = re.compile(r"^(?P<prefix>.*?)(?P<split>train|t10k|test)-(?P<kind>images|labels)[-.]idx(?P<ndim>[13])-ubyte(?P<gz>\.gz)?$")
_UBYTE = 0x08
_PARTS = ("train_images", "train_labels", "test_images", "test_labels")


def recognises(directory: Path) -> bool:
    """Whether the directory holds any IDX-named file (then it is meant as an IDX set)."""
    return any(_NAME.match(p.name) for p in directory.iterdir() if p.is_file())


def find_files(directory: Path) -> dict[str, Path]:
    """The set's four files by part name; refused if incomplete or ambiguous."""
    sets: dict[str, dict[str, Path]] = {}
    for path in sorted(directory.iterdir()):
        match = _NAME.match(path.name)
        if not match or not path.is_file():
            continue
        kind, ndim = match["kind"], match["ndim"]
        if (kind, ndim) not in (("images", "3"), ("labels", "1")):
            continue
        part = f"{'train' if match['split'] == 'train' else 'test'}_{kind}"
        found = sets.setdefault(match["prefix"], {})
        if part not in found or not match["gz"]:  # the uncompressed copy wins
            found[part] = path
    complete = {prefix: parts for prefix, parts in sets.items() if len(parts) == len(_PARTS)}
    if len(complete) > 1:
        listed = ", ".join(repr(p) for p in sorted(complete))
        raise DatasetError(directory, f"holds several IDX sets (prefixes {listed}); point at a directory with one")
    if not complete:
        have = sorted({part for parts in sets.values() for part in parts})
        missing = [part.replace("_", " ") for part in _PARTS if part not in have]
        raise DatasetError(
            directory,
            f"incomplete IDX set: no {', '.join(missing)} file "
            "(expected *train-images-idx3-ubyte[.gz], *train-labels-idx1-ubyte[.gz], *t10k- or *test- images and labels)",
        )
    return next(iter(complete.values()))


def _raw(path: Path, limit: int = -1) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as stream:
                return stream.read(limit)
        with open(path, "rb") as stream:
            return stream.read(limit)
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DatasetError(path, f"not a readable gzip file ({exc})") from None
    except OSError as exc:
        raise DatasetError(path, f"cannot read: {exc.strerror or exc}") from None


def _header(path: Path, data: bytes, ndim: int) -> tuple[int, ...]:
    expected = 0x0800 | ndim
    if len(data) < 4:
        raise DatasetError(path, f"only {len(data)} bytes, too short for an IDX header")
    magic = int.from_bytes(data[:4], "big")
    if data[0] != 0 or data[1] != 0 or data[2] != _UBYTE or data[3] != ndim:
        raise DatasetError(
            path, f"bad magic number 0x{magic:08x}, expected 0x{expected:08x} (IDX unsigned bytes, {ndim} dimensions)"
        )
    if len(data) < 4 + 4 * ndim:
        raise DatasetError(path, "truncated in the IDX header")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if min(dims) == 0:
        raise DatasetError(path, f"IDX dimensions {dims} hold no data")
    return dims


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """The file's uint8 array, after checking its header against its length."""
    data = _raw(path)
    dims = _header(path, data, ndim)
    offset, size = 4 + 4 * ndim, int(np.prod(dims))
    if len(data) - offset != size:
        shape = "x".join(map(str, dims))
        state = "truncated" if len(data) - offset < size else "has trailing bytes"
        raise DatasetError(
            path, f"{state}: the header promises {shape} = {size} bytes of data, the file holds {len(data) - offset}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def probe(directory: Path) -> None:
    """Cheap: the four files exist, the (small) label files are whole, and the image
    headers agree with them and, uncompressed, with the file length."""
    files = find_files(directory)
    counts = {}
    for part, path in files.items():
        if part.endswith("labels"):  # small: read whole
            counts[part] = len(read_idx(path, 1))
            continue
        dims = _header(path, _raw(path, 16), 3)
        counts[part] = dims[0]
        if path.suffix != ".gz" and path.stat().st_size != 16 + int(np.prod(dims)):
            read_idx(path, 3)  # says exactly what is wrong
    for split in ("train", "test"):
        if counts[f"{split}_images"] != counts[f"{split}_labels"]:
            raise DatasetError(
                files[f"{split}_labels"], f"{counts[f'{split}_labels']} labels for {counts[f'{split}_images']} images"
            )


def _images(path: Path) -> np.ndarray:
    pixels = read_idx(path, 3)
    if "emnist" in path.name.lower():
        pixels = pixels.transpose(0, 2, 1)
    return (pixels.astype(np.float32) / 255.0)[..., None]


def _label_names(files: dict[str, Path], num_classes: int) -> tuple[str, ...]:
    name = _NAME.match(files["train_images"].name)
    mapping = files["train_images"].parent / f"{name['prefix']}mapping.txt"
    names = [str(i) for i in range(num_classes)]
    if num_classes == len(EMNIST_NAMES) and "emnist" in name["prefix"].lower():
        names = list(EMNIST_NAMES)
    if mapping.is_file():
        for line in mapping.read_text().splitlines():
            fields = line.split()
            if len(fields) >= 2 and fields[0].isdigit() and fields[1].isdigit() and int(fields[0]) < num_classes:
                names[int(fields[0])] = chr(int(fields[1]))
    return tuple(names)


def load(directory: Path, name: str) -> Dataset:
    """Test images read now; train images (the bulk) only when ``train`` is first used."""
    probe(directory)
    files = find_files(directory)
    raw_train_labels = read_idx(files["train_labels"], 1)
    raw_test_labels = read_idx(files["test_labels"], 1)
    num_classes = int(max(raw_train_labels.max(), raw_test_labels.max())) + 1
    test_x = _images(files["test_images"])
    test_y = checked_labels(raw_test_labels, num_classes, files["test_labels"], count=len(test_x))

    def train() -> Split:
        x = _images(files["train_images"])
        if x.shape[1:] != test_x.shape[1:]:
            raise DatasetError(
                files["train_images"],
                f"images are {x.shape[1]}x{x.shape[2]}, the test images {test_x.shape[1]}x{test_x.shape[2]}",
            )
        return Split(x, checked_labels(raw_train_labels, num_classes, files["train_labels"], count=len(x)))

    return Dataset(name, LazySplit(train), Split(test_x, test_y), num_classes, _label_names(files, num_classes))
