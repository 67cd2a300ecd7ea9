"""LEAF's FEMNIST JSON: ``{"users", "num_samples", "user_data": {user: {"x", "y"}}}``.

Either LEAF's output directory (``train/`` and ``test/`` of ``*.json`` files, as LEAF's
``preprocess.sh`` writes them) or a single ``.json`` file, from which a fixed 20% of each
user's examples is held out as the test split. Each ``x`` row is 784 floats, a 28x28
image with 1.0 = background (LEAF scales the NIST scans, black ink on white, by 1/255),
inverted here. 62 classes: 0-9, A-Z, a-z. A user is a writer.

JSON gives no way to read one user without parsing the file, so everything is read when
the dataset is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edgefl.datasets.base import (
    EMNIST_NAMES,
    Dataset,
    DatasetError,
    Split,
    checked_labels,
    concatenate,
    holdout_by_writer,
    unit_images,
)

_SIDE = 28


def recognises(directory: Path) -> bool:
    return all((directory / s).is_dir() and any((directory / s).glob("*.json")) for s in ("train", "test"))


def _read_file(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{user: (x as (n, 28, 28) floats, y)} with every count and key checked."""
    try:
        with open(path, encoding="utf-8") as stream:
            data = json.load(stream)
    except json.JSONDecodeError as exc:
        raise DatasetError(path, f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(path, f"cannot read: {exc}") from None
    if not isinstance(data, dict):
        raise DatasetError(path, "expected a JSON object with users, num_samples and user_data")
    for key, kind in (("users", list), ("num_samples", list), ("user_data", dict)):
        if key not in data:
            raise DatasetError(path, f"no {key!r} key (LEAF's layout is users, num_samples, user_data)")
        if not isinstance(data[key], kind):
            raise DatasetError(path, f"{key!r} is not a JSON {'array' if kind is list else 'object'}")
    users, counts, user_data = data["users"], data["num_samples"], data["user_data"]
    if len(users) != len(counts):
        raise DatasetError(path, f"{len(users)} users but {len(counts)} num_samples entries")
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for user, count in zip(users, counts):
        where = f"{path}: user {user}"
        if not isinstance(user, str) or not isinstance(count, int):
            raise DatasetError(where, "users must be strings and num_samples integers")
        if user in out:
            raise DatasetError(where, "is listed twice")
        record = user_data.get(user)
        if not isinstance(record, dict) or "x" not in record or "y" not in record:
            raise DatasetError(where, "has no user_data entry with x and y")
        xs, ys = record["x"], record["y"]
        if not isinstance(xs, list) or not isinstance(ys, list):
            raise DatasetError(where, "x and y must be JSON arrays")
        if len(ys) != count or len(xs) != count:
            raise DatasetError(where, f"num_samples says {count}, but x has {len(xs)} rows and y {len(ys)} labels")
        if count == 0:
            raise DatasetError(where, "has no examples")
        try:
            x = np.array(xs, dtype=np.float32)
            y = np.array(ys)
        except (TypeError, ValueError):
            raise DatasetError(where, f"x must be rows of {_SIDE * _SIDE} numbers and y numbers") from None
        if x.ndim != 2 or x.shape[1] != _SIDE * _SIDE:
            raise DatasetError(where, f"x has shape {x.shape}, expected rows of {_SIDE * _SIDE} = {_SIDE}x{_SIDE} pixels")
        out[user] = (x.reshape(-1, _SIDE, _SIDE), y)
    return out


def _read_files(paths: list[Path]) -> dict[str, tuple[np.ndarray, np.ndarray, Path]]:
    users: dict[str, tuple[np.ndarray, np.ndarray, Path]] = {}
    for path in paths:
        for user, (x, y) in _read_file(path).items():
            if user in users:
                raise DatasetError(path, f"user {user} also appears in {users[user][2]}")
            users[user] = (x, y, path)
    return users


def _split(users: dict[str, tuple[np.ndarray, np.ndarray, Path]], writer_ids: tuple[str, ...]) -> Split:
    position = {w: i for i, w in enumerate(writer_ids)}
    parts = []
    for user in sorted(users):
        x, y, path = users[user]
        where = f"{path}: user {user}"
        images = unit_images(x, where, background_is_one=True)
        labels = checked_labels(y, len(EMNIST_NAMES), where, count=len(images))
        parts.append(Split(images, labels, np.full(len(labels), position[user], np.int64)))
    return concatenate(parts)


def load(path: Path, name: str) -> Dataset:
    names = EMNIST_NAMES
    if path.is_dir():
        train_users = _read_files(sorted((path / "train").glob("*.json")))
        test_users = _read_files(sorted((path / "test").glob("*.json")))
        writer_ids = tuple(sorted(set(train_users) | set(test_users)))
        train, test = _split(train_users, writer_ids), _split(test_users, writer_ids)
    else:
        users = _read_files([path])
        writer_ids = tuple(sorted(users))
        train, test = holdout_by_writer(_split(users, writer_ids))
    return Dataset(name, train, test, len(names), names, writer_ids)
