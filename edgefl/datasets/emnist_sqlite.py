"""TFF >= 0.19's federated EMNIST: ``emnist_all.sqlite`` (reference ``PATH.sqlite[#digits_only|#all]``).

The layout is TFF's ``SqlClientData``: a table ``examples(split_name, client_id,
serialized_example_proto)`` with one serialized tf.Example per row, and a table
``client_metadata(client_id, split_name, num_examples)``. EMNIST's split names are
``digits_only_train``/``digits_only_test`` (10 classes) and ``all_train``/``all_test``
(62 classes: 0-9, A-Z, a-z). Each tf.Example has ``pixels`` (784 floats, a 28x28 image
with 1.0 = background, which is inverted here) and ``label`` (one int64).

Writers (``client_id``) come from ``client_metadata``, as in TFF, so the natural partition
can read just the selected writers' rows instead of the 2 GB whole.
"""

from __future__ import annotations

import sqlite3
from collections import defaultdict
from pathlib import Path

import numpy as np
from google.protobuf.message import DecodeError

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
from edgefl.datasets.tf_example import example_class

SUBSETS = {"digits_only": DIGIT_NAMES, "all": EMNIST_NAMES}
DEFAULT_SUBSET = "digits_only"
_TABLES = {
    "examples": ("split_name", "client_id", "serialized_example_proto"),
    "client_metadata": ("client_id", "split_name", "num_examples"),
}
_SIDE = 28
_CHUNK = 500


def _connect(path: Path) -> sqlite3.Connection:
    try:
        connection = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        connection.execute("SELECT name FROM sqlite_master").fetchall()
    except sqlite3.Error as exc:
        raise DatasetError(path, f"not a readable SQLite database ({exc})") from None
    return connection


def probe(path: Path, subset: str) -> None:
    """Cheap: the tables, their columns and the subset's two splits are there."""
    connection = _connect(path)
    try:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")}
        for table, columns in _TABLES.items():
            if table not in tables:
                raise DatasetError(
                    path, f"no table {table!r} (TFF's SqlClientData layout has tables examples and client_metadata)"
                )
            have = {row[1] for row in connection.execute(f"PRAGMA table_info({table})")}
            missing = [c for c in columns if c not in have]
            if missing:
                raise DatasetError(path, f"table {table!r} has no column {', '.join(missing)}")
        for split in (f"{subset}_train", f"{subset}_test"):
            if connection.execute("SELECT 1 FROM client_metadata WHERE split_name = ? LIMIT 1", (split,)).fetchone() is None:
                raise DatasetError(path, f"no clients in split {split!r}")
    finally:
        connection.close()


def split_clients(path: Path, subset: str) -> dict[str, dict[str, int]]:
    """{split name: {client id: num_examples}} for the subset's train and test splits."""
    connection = _connect(path)
    try:
        out: dict[str, dict[str, int]] = {}
        for split in (f"{subset}_train", f"{subset}_test"):
            rows = connection.execute(
                "SELECT client_id, num_examples FROM client_metadata WHERE split_name = ?", (split,)
            ).fetchall()
            out[split] = {str(client): int(count) for client, count in rows}
        return out
    except sqlite3.Error as exc:
        raise DatasetError(path, f"cannot read client_metadata ({exc})") from None
    finally:
        connection.close()


def _parse(path: Path, blob, client: str, rowid: int, example_cls) -> tuple[np.ndarray, int]:
    where = f"{path}: client {client} row {rowid}"
    try:
        feature = example_cls.FromString(bytes(blob)).features.feature
    except (DecodeError, TypeError, ValueError) as exc:  # TypeError: a cell that is not a blob
        raise DatasetError(where, f"not a serialized tf.Example ({type(exc).__name__})") from None
    for key, kind in (("pixels", "float_list"), ("label", "int64_list")):
        if key not in feature:
            raise DatasetError(where, f"tf.Example has no {key!r} feature")
        if feature[key].WhichOneof("kind") != kind:
            raise DatasetError(where, f"tf.Example feature {key!r} is a {feature[key].WhichOneof('kind')}, expected {kind}")
    pixels, label = feature["pixels"].float_list.value, feature["label"].int64_list.value
    if len(pixels) != _SIDE * _SIDE:
        raise DatasetError(where, f"tf.Example 'pixels' holds {len(pixels)} floats, expected {_SIDE}x{_SIDE} = {_SIDE * _SIDE}")
    if len(label) != 1:
        raise DatasetError(where, f"tf.Example 'label' holds {len(label)} values, expected 1")
    return np.asarray(pixels, dtype=np.float32), int(label[0])


def read_clients(
    path: Path, split: str, clients: list[str], writer_ids: tuple[str, ...], num_classes: int, expected: dict[str, int]
) -> Split:
    """The examples of ``clients`` (all of the split's if it names them all), grouped by
    client in ``clients`` order, rows in table order. Only their rows are read."""
    example_cls = example_class()
    position = {w: i for i, w in enumerate(writer_ids)}
    rows: dict[str, list[tuple[np.ndarray, int]]] = defaultdict(list)
    connection = _connect(path)
    try:
        if len(clients) == len(expected):
            queries = [
                ("SELECT client_id, rowid, serialized_example_proto FROM examples WHERE split_name = ? ORDER BY rowid", (split,))
            ]
        else:
            queries = []
            for start in range(0, len(clients), _CHUNK):
                chunk = clients[start : start + _CHUNK]
                marks = ",".join("?" * len(chunk))
                sql = f"SELECT client_id, rowid, serialized_example_proto FROM examples WHERE split_name = ? AND client_id IN ({marks}) ORDER BY rowid"
                queries.append((sql, (split, *chunk)))
        for sql, params in queries:
            for client, rowid, blob in connection.execute(sql, params):
                rows[str(client)].append(_parse(path, blob, client, rowid, example_cls))
    except sqlite3.Error as exc:
        raise DatasetError(path, f"cannot read table examples ({exc})") from None
    finally:
        connection.close()
    parts = []
    for client in clients:
        got = rows.get(client, [])
        where = f"{path}: split {split} client {client}"
        if not got:
            raise DatasetError(where, "has no examples")
        if len(got) != expected[client]:
            raise DatasetError(where, f"client_metadata says {expected[client]} examples, table examples holds {len(got)}")
        x = unit_images(np.stack([p for p, _ in got]).reshape(-1, _SIDE, _SIDE), where, background_is_one=True)
        y = checked_labels(np.array([label for _, label in got]), num_classes, where)
        parts.append(Split(x, y, np.full(len(y), position[client], np.int64)))
    return concatenate(parts)


class Source:
    """One subset of an ``emnist_all.sqlite``: writer lists cheaply, examples on demand."""

    def __init__(self, path: Path, subset: str):
        probe(path, subset)
        self.path, self.subset = path, subset
        self.label_names = SUBSETS[subset]
        self.train_split, self.test_split = f"{subset}_train", f"{subset}_test"
        self.clients = split_clients(path, subset)
        self.writer_ids = tuple(sorted(set(self.clients[self.train_split]) | set(self.clients[self.test_split])))
        self.train_writers = tuple(sorted(self.clients[self.train_split]))

    def read(self, split: str, clients: list[str]) -> Split:
        return read_clients(self.path, split, clients, self.writer_ids, len(self.label_names), self.clients[split])

    def read_train(self, clients: list[str]) -> Split:
        return self.read(self.train_split, clients)

    def dataset(self, name: str) -> Dataset:
        test = self.read(self.test_split, sorted(self.clients[self.test_split]))
        train = LazySplit(lambda: self.read_train(list(self.train_writers)))
        return Dataset(name, train, test, len(self.label_names), self.label_names, self.writer_ids)
