"""Every dataset format on small files written in its published layout, every wrong file
as a one-line DatasetError, the natural and style partitions, and no TensorFlow."""

from __future__ import annotations

import gzip
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from edgefl.datasets import Dataset, DatasetError, Split, dataset_problem, device_shards, load_dataset
from edgefl.datasets.base import EMNIST_NAMES, LazySplit
from edgefl.datasets.style import Style, apply_style, draw_style
from edgefl.datasets.tf_example import example_class
from edgefl.partition import PartitionSpec, natural_writers, partition

SIDE = 28


@pytest.fixture(autouse=True)
def _fresh_cache():
    """Tests rewrite files under the same paths; the loader's cache must not hide that."""
    load_dataset.cache_clear()
    yield
    load_dataset.cache_clear()


def glyphs(labels, seed: int = 0) -> np.ndarray:
    """(n, 28, 28) images, 0 = background, with a label-dependent bar of ink plus noise."""
    rng = np.random.default_rng(seed)
    out = np.zeros((len(labels), SIDE, SIDE), np.float32)
    for i, label in enumerate(labels):
        row = 4 + int(label) % 20
        out[i, row : row + 3, 6:22] = rng.uniform(0.7, 1.0)
        out[i, 8:20, 4 + int(label) % 18] = 1.0
    return out


def assert_one_line(exc: pytest.ExceptionInfo, *contains: str) -> None:
    message = str(exc.value)
    assert "\n" not in message and message.strip() == message
    for part in contains:
        assert part in message, message


# --- writers of each published layout -------------------------------------------------


def write_idx(path: Path, array: np.ndarray, *, magic: int | None = None, cut: int = 0) -> Path:
    array = np.asarray(array, np.uint8)
    magic = (0x0800 | array.ndim) if magic is None else magic
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.tobytes()
    data = data[: len(data) - cut] if cut else data
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def write_idx_set(
    directory: Path, *, prefix: str = "", gz: bool = False, test_name: str = "t10k", n_train=30, n_test=10, images=None
) -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    y_train, y_test = np.arange(n_train) % 10, (np.arange(n_test) * 3) % 10
    x_train = (glyphs(y_train) * 255).astype(np.uint8) if images is None else images
    x_test = (glyphs(y_test, 1) * 255).astype(np.uint8)
    files = {
        "train_images": write_idx(directory / f"{prefix}train-images-idx3-ubyte{ext}", x_train),
        "train_labels": write_idx(directory / f"{prefix}train-labels-idx1-ubyte{ext}", y_train),
        "test_images": write_idx(directory / f"{prefix}{test_name}-images-idx3-ubyte{ext}", x_test),
        "test_labels": write_idx(directory / f"{prefix}{test_name}-labels-idx1-ubyte{ext}", y_test),
    }
    return {"files": files, "y_train": y_train, "y_test": y_test, "x_train": x_train, "x_test": x_test}


def emnist_writers(
    num_writers: int, per_writer: int, num_classes: int = 10, seed: int = 0
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{writer id: (pixels with 1.0 = background as TFF stores them, labels)}."""
    out = {}
    for w in range(num_writers):
        labels = (np.arange(per_writer + w) * (w + 1)) % num_classes
        out[f"f{w:04d}_{w % 7:02d}"] = (1.0 - glyphs(labels, seed + w), labels.astype(np.int32))
    return out


def write_h5(path: Path, writers: dict, *, skip: dict | None = None) -> Path:
    """TFF's HDF5ClientData layout: examples/<writer>/{label, pixels}."""
    skip = skip or {}
    with h5py.File(path, "w") as f:
        examples = f.create_group("examples")
        for writer, (pixels, labels) in writers.items():
            group = examples.create_group(writer)
            if "pixels" not in skip.get(writer, ()):
                group.create_dataset("pixels", data=np.asarray(pixels, np.float32))
            if "label" not in skip.get(writer, ()):
                group.create_dataset("label", data=np.asarray(labels, np.int32))
    return path


def example_bytes(pixels: np.ndarray, label: int, *, drop: str | None = None) -> bytes:
    example = example_class()()
    if drop != "pixels":
        example.features.feature["pixels"].float_list.value.extend(np.asarray(pixels, np.float32).ravel().tolist())
    if drop != "label":
        example.features.feature["label"].int64_list.value.append(int(label))
    return example.SerializeToString()


def write_sqlite(path: Path, splits: dict[str, dict], *, blob=example_bytes, metadata_extra: int = 0) -> Path:
    """TFF's SqlClientData layout (sql_client_data_utils' CREATE TABLEs), tf.Example rows."""
    with sqlite3.connect(path) as con:
        con.execute(
            "CREATE TABLE examples (split_name TEXT NOT NULL, client_id TEXT NOT NULL, serialized_example_proto BLOB NOT NULL);"
        )
        con.execute(
            "CREATE TABLE client_metadata (client_id TEXT NOT NULL, split_name TEXT NOT NULL, num_examples INTEGER NOT NULL);"
        )
        for split, writers in splits.items():
            for client, (pixels, labels) in writers.items():
                for p, label in zip(pixels, labels):
                    con.execute(
                        "INSERT INTO examples (split_name, client_id, serialized_example_proto) VALUES (?, ?, ?);",
                        (split, client, blob(p, label)),
                    )
                con.execute(
                    "INSERT INTO client_metadata (client_id, split_name, num_examples) VALUES (?, ?, ?);",
                    (client, split, len(labels) + metadata_extra),
                )
    con.close()
    return path


def leaf_json(writers: dict, **override) -> dict:
    """LEAF's FEMNIST JSON: users, num_samples, user_data {u: {x: [[784]], y: []}}."""
    data = {
        "users": list(writers),
        "num_samples": [len(labels) for _, labels in writers.values()],
        "user_data": {
            u: {"x": pixels.reshape(len(pixels), -1).tolist(), "y": labels.tolist()} for u, (pixels, labels) in writers.items()
        },
    }
    data.update(override)
    return data


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def write_png(path: Path, image01: np.ndarray, *, rgb: bool = False, invert: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    values = 1.0 - image01 if invert else image01
    pixels = np.round(values * 255).astype(np.uint8)
    picture = Image.fromarray(pixels, "L")
    (picture.convert("RGB") if rgb else picture).save(path)
    return path


def write_image_folders(
    root: Path, *, per_label: int = 5, writers=("alice", "bob", "carol"), labels=("0", "1", "2", "10")
) -> Path:
    for w, writer in enumerate(writers):
        for label in labels:
            for k in range(per_label):
                image = glyphs([int(label)], seed=w * 100 + k)[0]
                # alice scans black on white in colour, the others write light on dark
                write_png(root / writer / label / f"{k}.png", image, rgb=(w == 0), invert=(w == 0))
    return root


# --- IDX ---------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("test_name", ["t10k", "test"])
def test_idx_directory_loads_with_its_labels(tmp_path, gz, test_name):
    written = write_idx_set(tmp_path / "mnist", gz=gz, test_name=test_name)
    data = load_dataset(str(tmp_path / "mnist"))
    assert data.train.x.shape == (30, 28, 28, 1) and data.test.x.shape == (10, 28, 28, 1)
    assert data.train.x.dtype == np.float32 and data.train.y.dtype == np.int64
    np.testing.assert_array_equal(data.train.y, written["y_train"])
    np.testing.assert_array_equal(data.test.y, written["y_test"])
    np.testing.assert_allclose(data.test.x[..., 0], written["x_test"] / 255.0, atol=1e-6)
    assert data.num_classes == 10 and data.label_names == tuple("0123456789")
    assert data.writer_ids == () and data.train.writers is None
    assert data.input_shape == (28, 28, 1)


def test_idx_train_images_are_read_only_when_used(tmp_path):
    written = write_idx_set(tmp_path / "mnist")
    data = load_dataset(str(tmp_path / "mnist"))
    assert isinstance(data.train, LazySplit) and not data.train.is_loaded
    assert len(data.test) == 10
    assert not data.train.is_loaded
    assert len(data.train) == 30 and data.train.is_loaded
    np.testing.assert_array_equal(data.train.subset([0, 1]).y, written["y_train"][:2])


def test_emnist_idx_images_are_transposed_back(tmp_path):
    images = (glyphs(np.arange(30) % 10) * 255).astype(np.uint8)
    write_idx_set(tmp_path / "emnist", prefix="emnist-digits-", gz=True, images=images.transpose(0, 2, 1))
    data = load_dataset(str(tmp_path / "emnist"))
    np.testing.assert_allclose(data.train.x[..., 0], images / 255.0, atol=1e-6)


def _truncated(d: Path):
    write_idx_set(d)
    path = d / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    return "train-images-idx3-ubyte", "truncated"


def _bad_magic(d: Path):
    written = write_idx_set(d)
    write_idx(d / "t10k-images-idx3-ubyte", written["x_test"], magic=0x00000903)
    return "t10k-images-idx3-ubyte", "bad magic number 0x00000903"


def _label_count(d: Path):
    written = write_idx_set(d)
    write_idx(d / "train-labels-idx1-ubyte", written["y_train"][:-1])
    return "train-labels-idx1-ubyte", "29 labels for 30 images"


def _truncated_gz(d: Path):
    write_idx_set(d, gz=True)
    path = d / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-12])
    return "t10k-labels-idx1-ubyte.gz", "gzip"


def _trailing(d: Path):
    written = write_idx_set(d)
    path = d / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes() + b"\0" * 7)
    assert written
    return "t10k-images-idx3-ubyte", "trailing bytes"


def _missing_labels(d: Path):
    write_idx_set(d)
    (d / "t10k-labels-idx1-ubyte").unlink()
    return str(d), "no test labels"


@pytest.mark.parametrize("corrupt", [_truncated, _bad_magic, _label_count, _truncated_gz, _trailing, _missing_labels])
def test_wrong_idx_files_are_one_line_errors(tmp_path, corrupt):
    name, problem = corrupt(tmp_path / "idx")
    with pytest.raises(DatasetError) as exc:
        load_dataset(str(tmp_path / "idx"))
    assert_one_line(exc, name, problem)
    assert dataset_problem(str(tmp_path / "idx")) == str(exc.value)


# --- federated EMNIST, HDF5 ------------------------------------------------------------


def test_federated_emnist_h5_loads_writers_and_inverts_the_background(tmp_path):
    train, test = emnist_writers(5, 6), emnist_writers(5, 2, seed=50)
    write_h5(tmp_path / "fed_emnist_digitsonly_train.h5", train)
    write_h5(tmp_path / "fed_emnist_digitsonly_test.h5", test)
    data = load_dataset(str(tmp_path / "fed_emnist_digitsonly_test.h5"))  # either file names the pair
    assert data.writer_ids == tuple(sorted(train))
    assert data.num_classes == 10 and data.label_names == tuple("0123456789")
    assert isinstance(data.train, LazySplit) and not data.train.is_loaded
    assert data.test.x.shape == (sum(len(y) for _, y in test.values()), 28, 28, 1)
    assert data.train.x.shape == (sum(len(y) for _, y in train.values()), 28, 28, 1)
    first = data.writer_ids[0]
    mine = data.train.writers == 0
    np.testing.assert_allclose(data.train.x[mine][..., 0], 1.0 - train[first][0], atol=1e-6)  # ink is now 1, background 0
    np.testing.assert_array_equal(data.train.y[mine], train[first][1])
    assert np.median(data.train.x) == 0.0 and data.train.x.max() > 0.5
    assert data.test.writers is not None and set(data.test.writers) == set(range(5))


def test_full_federated_emnist_has_62_classes(tmp_path):
    writers = emnist_writers(3, 4, num_classes=62)
    writers["f0000_00"] = (writers["f0000_00"][0][:1], np.array([61], np.int32))
    write_h5(tmp_path / "fed_emnist_train.h5", writers)
    write_h5(tmp_path / "fed_emnist_test.h5", emnist_writers(3, 1, num_classes=62))
    data = load_dataset(str(tmp_path / "fed_emnist_train.h5"))
    assert data.num_classes == 62 and data.label_names == EMNIST_NAMES
    assert data.label_names[10] == "A" and data.label_names[36] == "a" and 61 in data.train.y


def test_natural_partition_reads_only_the_selected_writers_h5(tmp_path):
    train = emnist_writers(6, 5)
    ids = sorted(train)
    chosen = natural_writers(6, 2, np.random.default_rng(4))
    untouched = [w for i, w in enumerate(ids) if i not in chosen]
    # Every writer the two devices do not get is broken: reading one would fail.
    write_h5(tmp_path / "fed_emnist_digitsonly_train.h5", train, skip={w: ("pixels",) for w in untouched})
    write_h5(tmp_path / "fed_emnist_digitsonly_test.h5", emnist_writers(6, 1))
    reference = str(tmp_path / "fed_emnist_digitsonly_train.h5")
    shards = device_shards(reference, "natural", 2, 4, [0, 1])
    for device, shard in shards.items():
        writer = ids[chosen[device]]
        assert set(shard.writers) == {ids.index(writer)}
        np.testing.assert_array_equal(shard.y, train[writer][1])
        np.testing.assert_allclose(shard.x[..., 0], 1.0 - train[writer][0], atol=1e-6)
    with pytest.raises(DatasetError) as exc:
        len(load_dataset(reference).train)
    assert_one_line(exc, "fed_emnist_digitsonly_train.h5", f"examples/{untouched[0]}", "no 'pixels' dataset")


def test_natural_partition_reading_selected_writers_matches_the_full_load(tmp_path):
    write_h5(tmp_path / "fed_emnist_digitsonly_train.h5", emnist_writers(7, 4))
    write_h5(tmp_path / "fed_emnist_digitsonly_test.h5", emnist_writers(7, 1))
    reference = str(tmp_path / "fed_emnist_digitsonly_train.h5")
    train = load_dataset(reference).train
    full = partition(train.y, "natural", 3, 9, writers=train.writers)
    partial = device_shards(reference, "natural", 3, 9, range(3))
    for device in range(3):
        np.testing.assert_array_equal(partial[device].x, train.x[full[device]])
        np.testing.assert_array_equal(partial[device].writers, train.writers[full[device]])
    everyone = device_shards(reference, "natural", 7, 9, range(7))
    assert [int(everyone[d].writers[0]) for d in range(7)] == list(range(7))  # all writers, in order


def _h5_missing_pixels(d: Path):
    writers = emnist_writers(3, 3)
    write_h5(d / "fed_emnist_digitsonly_train.h5", writers)
    write_h5(d / "fed_emnist_digitsonly_test.h5", writers, skip={"f0001_01": ("pixels",)})
    return "fed_emnist_digitsonly_test.h5", "examples/f0001_01", "no 'pixels' dataset"


def _h5_label_range(d: Path):
    writers = emnist_writers(3, 3)
    labels = writers["f0002_02"][1].copy()
    labels[1] = 10
    bad = dict(writers, f0002_02=(writers["f0002_02"][0], labels))
    write_h5(d / "fed_emnist_digitsonly_train.h5", writers)
    write_h5(d / "fed_emnist_digitsonly_test.h5", bad)
    return "fed_emnist_digitsonly_test.h5", "examples/f0002_02", "label 10 is out of range 0..9"


def _h5_no_examples_group(d: Path):
    write_h5(d / "fed_emnist_digitsonly_train.h5", emnist_writers(2, 2))
    with h5py.File(d / "fed_emnist_digitsonly_test.h5", "w") as f:
        f.create_group("clients")
    return "fed_emnist_digitsonly_test.h5", "no 'examples' group"


def _h5_missing_partner(d: Path):
    write_h5(d / "fed_emnist_digitsonly_train.h5", emnist_writers(2, 2))
    return "fed_emnist_digitsonly_test.h5", "missing"


def _h5_empty_writer(d: Path):
    writers = emnist_writers(2, 2)
    writers["f0009_09"] = (np.zeros((0, 28, 28), np.float32), np.zeros(0, np.int32))
    write_h5(d / "fed_emnist_digitsonly_train.h5", writers)
    write_h5(d / "fed_emnist_digitsonly_test.h5", writers)
    return "fed_emnist_digitsonly_test.h5", "examples/f0009_09", "has no examples"


def _h5_nan(d: Path):
    writers = emnist_writers(2, 2)
    pixels = writers["f0000_00"][0].copy()
    pixels[0, 3, 3] = np.nan
    write_h5(d / "fed_emnist_digitsonly_train.h5", writers)
    write_h5(d / "fed_emnist_digitsonly_test.h5", dict(writers, f0000_00=(pixels, writers["f0000_00"][1])))
    return "fed_emnist_digitsonly_test.h5", "examples/f0000_00", "NaN"


def _h5_count_mismatch(d: Path):
    writers = emnist_writers(2, 3)
    write_h5(d / "fed_emnist_digitsonly_train.h5", writers)
    write_h5(d / "fed_emnist_digitsonly_test.h5", dict(writers, f0001_01=(writers["f0001_01"][0], np.array([1, 2], np.int32))))
    return "fed_emnist_digitsonly_test.h5", "examples/f0001_01", "2 labels for 4 images"


def _h5_not_hdf5(d: Path):
    write_h5(d / "fed_emnist_digitsonly_train.h5", emnist_writers(2, 2))
    (d / "fed_emnist_digitsonly_test.h5").write_text("not hdf5")
    return "fed_emnist_digitsonly_test.h5", "not a readable HDF5 file"


@pytest.mark.parametrize(
    "corrupt",
    [
        _h5_missing_pixels,
        _h5_label_range,
        _h5_no_examples_group,
        _h5_missing_partner,
        _h5_empty_writer,
        _h5_nan,
        _h5_count_mismatch,
        _h5_not_hdf5,
    ],
)
def test_wrong_h5_files_are_one_line_errors(tmp_path, corrupt):
    tmp_path.joinpath("h5").mkdir()
    expected = corrupt(tmp_path / "h5")
    with pytest.raises(DatasetError) as exc:
        load_dataset(str(tmp_path / "h5" / "fed_emnist_digitsonly_train.h5"))
    assert_one_line(exc, *expected)


def test_h5_reference_must_name_a_train_or_test_file(tmp_path):
    write_h5(tmp_path / "writers.h5", emnist_writers(2, 2))
    with pytest.raises(DatasetError) as exc:
        load_dataset(str(tmp_path / "writers.h5"))
    assert_one_line(exc, "writers.h5", "_train.h5")


# --- federated EMNIST, SQLite ----------------------------------------------------------


def emnist_sqlite(path: Path, **kwargs) -> tuple[Path, dict]:
    digits_train, digits_test = emnist_writers(4, 5), emnist_writers(4, 1, seed=40)
    all_train, all_test = emnist_writers(3, 3, num_classes=62, seed=70), emnist_writers(3, 1, num_classes=62, seed=80)
    splits = {"digits_only_train": digits_train, "digits_only_test": digits_test, "all_train": all_train, "all_test": all_test}
    return write_sqlite(path, splits, **kwargs), splits


def test_emnist_sqlite_loads_both_subsets(tmp_path):
    path, splits = emnist_sqlite(tmp_path / "emnist_all.sqlite")
    for reference, subset, classes in (
        (str(path), "digits_only", 10),
        (f"{path}#digits_only", "digits_only", 10),
        (f"{path}#all", "all", 62),
    ):
        load_dataset.cache_clear()
        data = load_dataset(reference)
        train = splits[f"{subset}_train"]
        assert data.num_classes == classes and len(data.label_names) == classes
        assert data.writer_ids == tuple(sorted(train))
        assert not data.train.is_loaded
        assert len(data.test) == sum(len(y) for _, y in splits[f"{subset}_test"].values())
        for position, writer in enumerate(data.writer_ids):
            mine = data.train.writers == position
            np.testing.assert_array_equal(data.train.y[mine], train[writer][1])
            np.testing.assert_allclose(data.train.x[mine][..., 0], 1.0 - train[writer][0], atol=1e-6)


def test_natural_partition_reads_only_the_selected_writers_sqlite(tmp_path):
    train = emnist_writers(6, 4)
    ids = sorted(train)
    chosen = natural_writers(6, 2, np.random.default_rng(1))
    untouched = {w for i, w in enumerate(ids) if i not in chosen}

    def blob(pixels, label):
        return b"\xff garbage" if any(np.array_equal(pixels, train[w][0][0]) for w in untouched) else example_bytes(pixels, label)

    path = write_sqlite(
        tmp_path / "emnist_all.sqlite", {"digits_only_train": train, "digits_only_test": emnist_writers(6, 1, seed=9)}, blob=blob
    )
    shards = device_shards(str(path), "natural", 2, 1, [1, 0])
    for device in (0, 1):
        writer = ids[chosen[device]]
        np.testing.assert_array_equal(shards[device].y, train[writer][1])
        np.testing.assert_allclose(shards[device].x[..., 0], 1.0 - train[writer][0], atol=1e-6)
    with pytest.raises(DatasetError) as exc:
        len(load_dataset(str(path)).train)
    assert_one_line(exc, "emnist_all.sqlite", "not a serialized tf.Example")


def test_our_tf_example_schema_matches_tensorflows_on_the_wire():
    pytest.importorskip("tensorflow")
    from tensorflow.core.example import example_pb2

    pixels = np.linspace(0, 1, 784, dtype=np.float32)
    ours = example_bytes(pixels, 7)
    theirs = example_pb2.Example.FromString(ours)
    assert list(theirs.features.feature["label"].int64_list.value) == [7]
    np.testing.assert_array_equal(np.array(theirs.features.feature["pixels"].float_list.value, np.float32), pixels)
    assert example_class().FromString(theirs.SerializeToString()).SerializeToString() == ours


def _sqlite_missing_table(path: Path):
    with sqlite3.connect(path) as con:
        con.execute("CREATE TABLE examples (split_name TEXT, client_id TEXT, serialized_example_proto BLOB);")
    con.close()
    return "no table 'client_metadata'"


def _sqlite_missing_pixels(path: Path):
    emnist_sqlite(path, blob=lambda p, label: example_bytes(p, label, drop="pixels" if label == 3 else None))
    return "no 'pixels' feature"


def _sqlite_metadata_count(path: Path):
    emnist_sqlite(path, metadata_extra=1)
    return "client_metadata says"


def _sqlite_label_range(path: Path):
    emnist_sqlite(path, blob=lambda p, label: example_bytes(p, 12 if label == 3 else label))
    return "label 12 is out of range 0..9"


def _sqlite_wrong_pixel_count(path: Path):
    emnist_sqlite(path, blob=lambda p, label: example_bytes(p.ravel()[:700], label))
    return "holds 700 floats"


def _sqlite_not_a_database(path: Path):
    path.write_bytes(b"this is not sqlite at all" * 100)
    return "not a readable SQLite database"


@pytest.mark.parametrize(
    "corrupt",
    [
        _sqlite_missing_table,
        _sqlite_missing_pixels,
        _sqlite_metadata_count,
        _sqlite_label_range,
        _sqlite_wrong_pixel_count,
        _sqlite_not_a_database,
    ],
)
def test_wrong_sqlite_files_are_one_line_errors(tmp_path, corrupt):
    path = tmp_path / "emnist_all.sqlite"
    problem = corrupt(path)
    with pytest.raises(DatasetError) as exc:
        len(load_dataset(str(path)).train)
    assert_one_line(exc, str(path), problem)


# --- LEAF ------------------------------------------------------------------------------


def test_leaf_directory_loads_users_as_writers(tmp_path):
    train, test = emnist_writers(4, 5, num_classes=62), emnist_writers(4, 2, num_classes=62, seed=30)
    names = sorted(train)
    write_json(tmp_path / "leaf" / "train" / "all_data_0_niid_0_keep_0_train_9.json", leaf_json({u: train[u] for u in names[:2]}))
    write_json(tmp_path / "leaf" / "train" / "all_data_1_niid_0_keep_0_train_9.json", leaf_json({u: train[u] for u in names[2:]}))
    write_json(tmp_path / "leaf" / "test" / "all_data_0_niid_0_keep_0_test_9.json", leaf_json(test))
    data = load_dataset(str(tmp_path / "leaf"))
    assert data.num_classes == 62 and data.writer_ids == tuple(names)
    assert len(data.train) == 4 * 5 + 6 and len(data.test) == 4 * 2 + 6
    for position, user in enumerate(names):
        mine = data.train.writers == position
        np.testing.assert_array_equal(data.train.y[mine], train[user][1])
        np.testing.assert_allclose(data.train.x[mine][..., 0], 1.0 - train[user][0], atol=1e-6)
    shards = device_shards(str(tmp_path / "leaf"), "natural", 4, 0, range(4))
    assert sorted(int(np.unique(s.writers)[0]) for s in shards.values()) == [0, 1, 2, 3]
    assert all(len(np.unique(s.writers)) == 1 for s in shards.values())


def test_one_leaf_file_holds_out_a_fixed_fifth_of_each_user(tmp_path):
    users = emnist_writers(3, 10, num_classes=62)
    path = write_json(tmp_path / "femnist.json", leaf_json(users))
    data = load_dataset(str(path))
    for position in range(3):
        n = int(np.sum(data.train.writers == position)) + int(np.sum(data.test.writers == position))
        assert n == 10 + position and int(np.sum(data.test.writers == position)) == round(0.2 * n)
    load_dataset.cache_clear()
    again = load_dataset(str(path))
    np.testing.assert_array_equal(again.test.x, data.test.x)
    assert data.test.x.max() > 0.5 and np.median(data.test.x) == 0.0


def _leaf_num_samples(d: Path):
    users = emnist_writers(2, 3, num_classes=62)
    write_json(d / "femnist.json", leaf_json(users, num_samples=[3, 5]))
    return "femnist.json", "user f0001_01", "num_samples says 5"


def _leaf_label_range(d: Path):
    users = emnist_writers(2, 3, num_classes=62)
    data = leaf_json(users)
    data["user_data"]["f0000_00"]["y"][1] = 62
    write_json(d / "femnist.json", data)
    return "femnist.json", "user f0000_00", "label 62 is out of range 0..61"


def _leaf_missing_user_data(d: Path):
    data = leaf_json(emnist_writers(2, 3, num_classes=62))
    del data["user_data"]["f0001_01"]
    write_json(d / "femnist.json", data)
    return "femnist.json", "user f0001_01", "no user_data entry"


def _leaf_short_rows(d: Path):
    data = leaf_json(emnist_writers(2, 3, num_classes=62))
    data["user_data"]["f0000_00"]["x"] = [row[:783] for row in data["user_data"]["f0000_00"]["x"]]
    write_json(d / "femnist.json", data)
    return "femnist.json", "user f0000_00", "expected rows of 784"


def _leaf_not_json(d: Path):
    (d / "femnist.json").write_text('{"users": [')
    return "femnist.json", "not valid JSON"


def _leaf_missing_key(d: Path):
    data = leaf_json(emnist_writers(2, 3, num_classes=62))
    del data["num_samples"]
    write_json(d / "femnist.json", data)
    return "femnist.json", "no 'num_samples' key"


@pytest.mark.parametrize(
    "corrupt",
    [_leaf_num_samples, _leaf_label_range, _leaf_missing_user_data, _leaf_short_rows, _leaf_not_json, _leaf_missing_key],
)
def test_wrong_leaf_files_are_one_line_errors(tmp_path, corrupt):
    expected = corrupt(tmp_path)
    with pytest.raises(DatasetError) as exc:
        load_dataset(str(tmp_path / "femnist.json"))
    assert_one_line(exc, *expected)


# --- folders of images -----------------------------------------------------------------


def test_image_folders_per_writer_with_a_held_out_fifth(tmp_path):
    root = write_image_folders(tmp_path / "mine")
    data = load_dataset(str(root))
    assert data.writer_ids == ("alice", "bob", "carol")
    assert data.label_names == ("0", "1", "2", "10") and data.num_classes == 4  # numeric order
    assert len(data.train) + len(data.test) == 3 * 4 * 5 and len(data.test) == 3 * 4
    assert data.train.x.shape[1:] == (28, 28, 1) and data.train.x.dtype == np.float32
    # alice's black-on-white colour scans come out like everyone's: background 0, ink high.
    alice = data.train.x[data.train.writers == 0]
    bob = data.train.x[data.train.writers == 1]
    assert np.median(alice) == 0.0 and alice.max() > 0.6
    assert abs(float(alice.mean()) - float(bob.mean())) < 0.05
    label_10 = data.label_names.index("10")
    expected = glyphs([10], seed=100 + 0)[0]
    bob_10 = data.train.x[(data.train.writers == 1) & (data.train.y == label_10)]
    bob_10 = np.concatenate([bob_10, data.test.x[(data.test.writers == 1) & (data.test.y == label_10)]])
    assert any(np.abs(img[..., 0] - expected).max() < 1 / 255 + 1e-6 for img in bob_10)


def test_image_folders_with_train_and_test(tmp_path):
    write_image_folders(tmp_path / "mine" / "train", per_label=3)
    write_image_folders(tmp_path / "mine" / "test", per_label=1, writers=("alice", "bob", "dave"))
    data = load_dataset(str(tmp_path / "mine"))
    assert data.writer_ids == ("alice", "bob", "carol", "dave")
    assert len(data.test) == 12 and not data.train.is_loaded
    assert len(data.train) == 36 and set(data.train.writers) == {0, 1, 2}


def _odd_size(root: Path):
    write_image_folders(root)
    write_png(root / "bob" / "2" / "9.png", np.zeros((32, 30), np.float32))
    return "bob/2/9.png", "30x32 pixels", "28x28"


def _empty_label_folder(root: Path):
    write_image_folders(root)
    (root / "carol" / "7").mkdir()
    return "carol/7", "no images"


def _empty_writer_folder(root: Path):
    write_image_folders(root)
    (root / "dave").mkdir()
    return "dave", "no label folders"


def _not_an_image(root: Path):
    write_image_folders(root)
    (root / "alice" / "1" / "broken.png").write_bytes(b"not a png")
    return "alice/1/broken.png", "not a readable image"


@pytest.mark.parametrize("corrupt", [_odd_size, _empty_label_folder, _empty_writer_folder, _not_an_image])
def test_wrong_image_folders_are_one_line_errors(tmp_path, corrupt):
    expected = corrupt(tmp_path / "mine")
    with pytest.raises(DatasetError) as exc:
        load_dataset(str(tmp_path / "mine"))
    assert_one_line(exc, *expected)


# --- references ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reference, contains",
    [
        ("mnist", "no such dataset or path"),
        ("/no/such/dir", "no such dataset or path"),
        ("", "empty dataset reference"),
        ("{tmp}/emnist_all.sqlite#letters", "unknown subset #letters"),
        ("{tmp}/data.h5#all", "only an emnist_all.sqlite reference takes a #subset"),
        ("{tmp}/notes.txt", "unrecognised file type"),
        ("{tmp}/empty", "directory with no recognised layout"),
    ],
)
def test_bad_references_are_one_line_listing_what_is_accepted(tmp_path, reference, contains):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "empty").mkdir()
    (tmp_path / "emnist_all.sqlite").write_bytes(b"")
    reference = reference.format(tmp=tmp_path)
    with pytest.raises(DatasetError) as exc:
        load_dataset(reference)
    assert_one_line(exc, contains)
    if "no such" in contains or "unrecognised" in contains or "no recognised" in contains:
        assert "fashion-mnist" in str(exc.value) and "sqlite" in str(exc.value)
    assert dataset_problem(reference) == str(exc.value)


def test_dataset_problem_accepts_good_references_without_reading_them(tmp_path):
    writers = emnist_writers(2, 2)
    write_h5(tmp_path / "fed_emnist_train.h5", writers)
    write_h5(tmp_path / "fed_emnist_test.h5", writers, skip={"f0000_00": ("label",)})  # found only by a full read
    write_idx_set(tmp_path / "idx", gz=True)
    emnist_sqlite(tmp_path / "emnist_all.sqlite")
    write_image_folders(tmp_path / "mine", per_label=1)
    write_json(tmp_path / "femnist.json", leaf_json(emnist_writers(2, 2, num_classes=62)))
    for reference in ("digits", "fashion-mnist", "fed_emnist_train.h5", "idx", "emnist_all.sqlite#all", "mine", "femnist.json"):
        full = reference if reference in ("digits", "fashion-mnist") else str(tmp_path / reference)
        assert dataset_problem(full) is None, full
    with pytest.raises(DatasetError, match="no 'label' dataset"):
        load_dataset(str(tmp_path / "fed_emnist_train.h5"))


def test_the_real_debian_fashion_mnist():
    if not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists():
        pytest.skip("Debian's dataset-fashion-mnist is not installed (make debian-packages installs it)")
    data = load_dataset("fashion-mnist")
    assert data.test.x.shape == (10000, 28, 28, 1) and data.input_shape == (28, 28, 1)
    assert data.train.x.shape == (60000, 28, 28, 1) and data.train.x.dtype == np.float32
    assert data.num_classes == 10 and data.label_names == tuple("0123456789")
    assert np.bincount(data.test.y).tolist() == [1000] * 10 and np.bincount(data.train.y).tolist() == [6000] * 10
    assert 0.0 == data.test.x.min() and data.test.x.max() == 1.0
    assert float(np.median(data.test.x)) < 0.1 < float(data.test.x.mean())  # ink is bright, background dark


# --- partitions: natural and style -----------------------------------------------------


def test_natural_partition_gives_each_device_one_writer():
    writers = np.repeat(np.arange(8), np.arange(3, 11))
    labels = np.arange(len(writers)) % 10
    everyone = partition(labels, "natural", 8, seed=0, writers=writers)
    assert [np.unique(writers[s]).tolist() for s in everyone] == [[w] for w in range(8)]
    assert [len(s) for s in everyone] == list(range(3, 11))
    some = partition(labels, "natural", 3, seed=5, writers=writers)
    picked = [int(np.unique(writers[s])[0]) for s in some]
    assert len(set(picked)) == 3 and all(len(s) == np.sum(writers == w) for s, w in zip(some, picked))
    assert picked == [int(np.unique(writers[s])[0]) for s in partition(labels, "natural", 3, seed=5, writers=writers)]


@pytest.mark.parametrize(
    "writers, devices, contains",
    [(None, 2, "this data has none"), (np.repeat(np.arange(5), 4), 6, "6 devices, but the data has only 5 writers")],
)
def test_natural_partition_refusals_are_one_line(writers, devices, contains):
    with pytest.raises(ValueError) as exc:
        partition(np.zeros(20, np.int64), "natural", devices, seed=0, writers=writers)
    assert_one_line(exc, contains)


def test_natural_partition_on_digits_says_it_has_no_writers():
    with pytest.raises(ValueError, match="natural needs data with writers"):
        device_shards("digits", "natural", 4, 0, [0])


@pytest.mark.parametrize(
    "text, kind, style, canonical",
    [
        ("iid", "iid", False, "iid"),
        ("style", "iid", True, "iid+style"),
        ("iid+style", "iid", True, "iid+style"),
        ("dirichlet:0.5+style", "dirichlet", True, "dirichlet:0.5+style"),
        ("classes:2+style", "classes", True, "classes:2+style"),
        ("natural", "natural", False, "natural"),
    ],
)
def test_partition_specs_with_style_round_trip(text, kind, style, canonical):
    spec = PartitionSpec.parse(text)
    assert (spec.kind, spec.style, str(spec)) == (kind, style, canonical)
    assert PartitionSpec.parse(str(spec)) == spec


@pytest.mark.parametrize("bad", ["iid+slant", "+style", "style+style", "natural:3", "dirichlet:0+style", "iid+style+style"])
def test_bad_style_specs_are_refused(bad):
    with pytest.raises(ValueError, match="bad partition"):
        PartitionSpec.parse(bad)


def test_a_style_is_a_fixed_mild_draw_per_seed_and_device():
    assert draw_style(3, 7) == draw_style(3, 7)
    styles = [draw_style(3, i) for i in range(50)]
    assert len(set(styles)) == 50 and draw_style(4, 7) != draw_style(3, 7)
    assert all(
        abs(s.rotation_degrees) <= 25 and abs(s.shear) <= 0.625 and 0.85 <= s.scale <= 1.15 and -1 <= s.stroke <= 2
        for s in styles
    )
    assert {s.stroke for s in styles} == {-1, 0, 1, 2}


def test_apply_style_changes_the_writing_but_keeps_images_in_range():
    x = load_dataset("digits").test.x[:20]
    before = x.copy()
    for style in (draw_style(0, 0), draw_style(0, 1), Style(15.0, 0.3, 1.1, 2), Style(-10.0, -0.2, 0.9, -1)):
        styled = apply_style(x, style)
        assert styled.shape == x.shape and styled.dtype == np.float32
        assert 0.0 <= styled.min() and styled.max() <= 1.0
        assert np.abs(styled - x).mean() > 0.01
        assert styled.sum() > 0.3 * x.sum()  # the digits are still there
    np.testing.assert_array_equal(x, before)
    np.testing.assert_allclose(apply_style(x, Style(0.0, 0.0, 1.0, 0)), x, atol=1e-5)
    thick, thin = apply_style(x, Style(0.0, 0.0, 1.0, 2)), apply_style(x, Style(0.0, 0.0, 1.0, -1))
    assert thick.sum() > x.sum() > thin.sum()


def test_style_shards_are_personal_and_the_same_every_round():
    coordinator_view = load_dataset("digits").test.x.copy()
    plain = device_shards("digits", "dirichlet:0.5", 6, 2, range(6))
    styled = device_shards("digits", "dirichlet:0.5+style", 6, 2, range(6))
    again = device_shards("digits", "dirichlet:0.5+style", 6, 2, [4, 1])
    for i in range(6):
        np.testing.assert_array_equal(styled[i].y, plain[i].y)  # same examples, written differently
        assert not np.allclose(styled[i].x, plain[i].x)
        np.testing.assert_allclose(styled[i].x, apply_style(plain[i].x, draw_style(2, i)))
    for i in (4, 1):
        np.testing.assert_array_equal(again[i].x, styled[i].x)
    # The coordinator's test split stays unstyled.
    np.testing.assert_array_equal(load_dataset("digits").test.x, coordinator_view)


def test_device_shards_match_the_partition_of_the_loaded_data():
    data = load_dataset("digits")
    parts = partition(data.train.y, "classes:2", 5, 11)
    shards = device_shards("digits", "classes:2", 5, 11, [3, 0])
    assert set(shards) == {0, 3}
    for i in (0, 3):
        np.testing.assert_array_equal(shards[i].x, data.train.x[parts[i]])
    with pytest.raises(ValueError, match="outside 0..4"):
        device_shards("digits", "iid", 5, 0, [5])


def test_split_and_dataset_keep_their_shape():
    split = Split(np.zeros((4, 28, 28, 1), np.float32), np.arange(4), np.array([0, 0, 1, 1]))
    sub = split.subset([1, 3])
    assert len(sub) == 2 and sub.writers.tolist() == [0, 1]
    data = Dataset("x", split, split, 4, ("a", "b", "c", "d"))
    assert data.writer_ids == () and data.input_shape == (28, 28, 1)
    with pytest.raises(ValueError):
        Dataset("x", split, split, 3, ("a", "b"))


# --- no TensorFlow ---------------------------------------------------------------------


def test_loading_every_format_never_imports_tensorflow(tmp_path):
    write_idx_set(tmp_path / "idx", gz=True)
    writers = emnist_writers(3, 3)
    write_h5(tmp_path / "fed_emnist_digitsonly_train.h5", writers)
    write_h5(tmp_path / "fed_emnist_digitsonly_test.h5", writers)
    emnist_sqlite(tmp_path / "emnist_all.sqlite")
    write_json(tmp_path / "femnist.json", leaf_json(emnist_writers(2, 3, num_classes=62)))
    write_image_folders(tmp_path / "mine", per_label=1)
    references = [
        "digits",
        "fashion-mnist",
        str(tmp_path / "idx"),
        str(tmp_path / "fed_emnist_digitsonly_train.h5"),
        f"{tmp_path / 'emnist_all.sqlite'}#all",
        str(tmp_path / "femnist.json"),
        str(tmp_path / "mine"),
    ]
    script = (
        "import sys, json\n"
        "from edgefl.datasets import load_dataset, dataset_problem, device_shards\n"
        "for ref in json.loads(sys.argv[1]):\n"
        "    if ref == 'fashion-mnist' and dataset_problem(ref):\n"
        "        continue\n"
        "    assert dataset_problem(ref) is None, ref\n"
        "    data = load_dataset(ref)\n"
        "    len(data.train), len(data.test)\n"
        "    spec = 'natural+style' if data.writer_ids else 'iid+style'\n"
        "    device_shards(ref, spec, 2, 0, [0, 1])\n"
        "print('tensorflow' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, json.dumps(references)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
