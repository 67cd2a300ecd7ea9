"""A user's own model: by file, module or saved .keras file, sized by the data, named
the same in every process; refused in one line when it does not fit, and for LiteRT
devices when a layer has no on-device rewrite. The run's history as CSV and TensorBoard
events."""

from __future__ import annotations

import csv
import io
import json
import sys
import textwrap
from contextlib import closing

import numpy as np
import pytest

from edgefl.config import ConfigError, RunConfig
from edgefl.models import ModelError, build_model, model_spec, weight_names

BUILDER = """
import tensorflow as tf

def build(input_shape, num_classes):
    return tf.keras.Sequential([
        tf.keras.Input(shape=input_shape),
        tf.keras.layers.Conv2D(4, 3, activation="relu"),
        tf.keras.layers.Flatten(),
        tf.keras.layers.Dense(num_classes),
    ])

def with_batch_norm():
    return tf.keras.Sequential([
        tf.keras.Input(shape=(28, 28, 1)),
        tf.keras.layers.Conv2D(4, 3),
        tf.keras.layers.BatchNormalization(name="bn1"),
        tf.keras.layers.Flatten(),
        tf.keras.layers.Dense(10),
    ])

def probabilities():
    return tf.keras.Sequential([tf.keras.Input(shape=(28, 28, 1)), tf.keras.layers.Flatten(),
                                tf.keras.layers.Dense(10, activation="softmax")])

def five_classes():
    return tf.keras.Sequential([tf.keras.Input(shape=(28, 28, 1)), tf.keras.layers.Flatten(), tf.keras.layers.Dense(5)])

def flat_input():
    return tf.keras.Sequential([tf.keras.Input(shape=(784,)), tf.keras.layers.Dense(10)])

def not_a_model():
    return 42

no_signature = max

def softmax_layer():
    return tf.keras.Sequential([tf.keras.Input(shape=(28, 28, 1)), tf.keras.layers.Flatten(),
                                tf.keras.layers.Dense(10), tf.keras.layers.Softmax()])

class Subclassed(tf.keras.Model):
    def __init__(self):
        super().__init__()
        self.dense = tf.keras.layers.Dense(10)

    def call(self, x):
        return self.dense(tf.reshape(x, [-1, 784]))

def subclassed():
    return Subclassed()

def with_sub_model(input_shape, num_classes):
    inner_in = tf.keras.Input(shape=(16,))
    inner = tf.keras.Model(inner_in, tf.keras.layers.Dense(16, activation="relu")(inner_in))
    x = tf.keras.Input(shape=input_shape)
    y = tf.keras.layers.Dense(num_classes)(inner(tf.keras.layers.Dense(16)(tf.keras.layers.Flatten()(x))))
    return tf.keras.Model(x, y)

def raises():
    raise RuntimeError("my bug")
"""


@pytest.fixture(scope="module")
def builders(tmp_path_factory):
    path = tmp_path_factory.mktemp("user") / "my_models.py"
    path.write_text(textwrap.dedent(BUILDER))
    return path


def test_a_builder_file_is_sized_by_the_data_and_named_the_same_on_every_build(builders):
    reference = f"{builders}:build"
    first, second = build_model(reference, "digits", seed=1), build_model(reference, "digits", seed=1)
    assert first.input_shape == (None, 28, 28, 1) and first.output_shape == (None, 10)
    # Keras numbered the second build's layers on (conv2d_1...): the wire names are a fresh process's.
    assert weight_names(first) == weight_names(second) == ["conv2d/kernel", "conv2d/bias", "dense/kernel", "dense/bias"]
    assert all(np.array_equal(a, b) for a, b in zip(first.get_weights(), second.get_weights()))
    assert [s.name for s in model_spec(reference, "digits")] == weight_names(first)


def test_a_nested_functional_model_is_named_the_same_on_every_build(builders):
    reference = f"{builders}:with_sub_model"
    first, second = weight_names(build_model(reference, "digits")), weight_names(build_model(reference, "digits"))
    assert first == second and "model/dense/kernel" in first  # Keras called the second one model_2


def test_a_module_reference_and_a_keras_file_are_models_too(builders, tmp_path, monkeypatch):
    monkeypatch.chdir(builders.parent)  # a module in the working directory, in every process (not on sys.path)
    assert weight_names(build_model("my_models:build", "digits"))[0] == "conv2d/kernel"
    saved = tmp_path / "pretrained.keras"
    original = build_model("cnn_small", "digits", seed=3)
    original.save(saved)
    loaded = build_model(str(saved), "digits", seed=99)  # a file brings its own weights: the seed changes nothing
    assert weight_names(loaded) == weight_names(original)
    assert all(np.array_equal(a, b) for a, b in zip(loaded.get_weights(), original.get_weights()))
    sys.modules.pop("my_models", None)


def test_a_keras_file_trains_exactly_as_the_built_in_it_was_saved_from(tmp_path):
    from edgefl.datasets import load_dataset
    from edgefl.training import KerasLearner

    saved = tmp_path / "same.keras"
    build_model("cnn_small", "digits", seed=0).save(saved)
    train = load_dataset("digits").train
    x, y = train.x[:64], train.y[:64]
    weights = build_model("cnn_small", "digits", seed=0).get_weights()
    step = dict(epochs=1, batch_size=16, learning_rate=0.1, seed=0)
    built_in = KerasLearner("cnn_small", "digits").client_update(weights, x, y, **step)
    user = KerasLearner(str(saved), "digits").client_update(weights, x, y, **step)
    assert all(np.allclose(a, b, atol=1e-6) for a, b in zip(built_in.delta, user.delta))


@pytest.mark.parametrize(
    "function, says",
    [
        ("five_classes", "gives outputs of shape (5,), but the data has 10 classes"),
        ("flat_input", "takes inputs of shape (784,), but the data's examples are (28, 28, 1)"),
        ("probabilities", "its last layer applies softmax"),
        ("softmax_layer", "its last layer applies softmax"),
        ("subclassed", "the model has no input shape yet"),
        ("not_a_model", "gave a int, not a Keras model"),
        ("no_signature", "is not a function that builds a model"),
        ("raises", "building the model failed: RuntimeError: my bug"),
        ("missing", "has no function missing"),
    ],
)
def test_a_model_that_does_not_fit_is_refused_in_one_line(builders, function, says):
    with pytest.raises(ModelError) as error:
        build_model(f"{builders}:{function}", "digits")
    assert says in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    "reference, says",
    [
        ("resnet", "must be cnn, cnn_small, lenet5, path/to/file.py:build_fn"),
        ("nowhere.py:build", "names no file: nowhere.py does not exist"),
        ("nowhere.keras", "names no file"),
        ("pkg.module:", "must be"),
        ("a b:c", "must be"),
    ],
)
def test_a_bad_model_reference_is_refused_when_the_run_is_configured(reference, says):
    with pytest.raises(ConfigError) as error:
        RunConfig(model=reference)
    assert says in str(error.value) and str(error.value).startswith("model ")


def test_a_stored_configuration_is_checked_once_so_a_run_survives_its_files_going_away(tmp_path):
    """The store's copy is read at every check-in: its data is checked when the run is
    configured, not at every read (where a moved folder would fail every request)."""
    from tests.test_e2e import write_writers_images

    write_writers_images(tmp_path / "writers", writers=2, per_writer=10)
    text = RunConfig(dataset=str(tmp_path / "writers")).to_json()
    assert RunConfig.from_json(text).dataset == str(tmp_path / "writers")
    for png in (tmp_path / "writers").rglob("*.png"):
        png.unlink()
    assert RunConfig.from_json(text).dataset == str(tmp_path / "writers")
    with pytest.raises(ConfigError, match="dataset"):
        RunConfig(dataset=str(tmp_path / "writers"))  # a new configuration is checked


def test_layer_names_a_training_file_cannot_carry_are_refused_for_litert():
    import tensorflow as tf

    from export.ondevice import unsupported_layer

    for name in ("block_", "a__b", "dense-1"):
        model = tf.keras.Sequential([tf.keras.Input((4,)), tf.keras.layers.Dense(3, name=name)])
        assert f"layer {name!r} has a name the training file's signature keys cannot carry" in unsupported_layer(model)


def test_a_module_that_fails_to_import_is_one_line(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("import not_a_package_anywhere\n")
    with pytest.raises(ModelError, match=r"cannot import .*broken.py: ModuleNotFoundError"):
        build_model(f"{broken}:build", "digits")


def test_a_model_outside_the_on_device_set_is_refused_for_litert_before_anything_starts(builders):
    from tests.test_newcomer import edgefl, one_line_error

    result = edgefl("demo", "--runtime", "keras,litert", "--model", f"{builders}:with_batch_norm", "--count", "2")
    line = one_line_error(result)
    assert "cannot train on LiteRT devices" in line and "'bn1' (BatchNormalization)" in line


@pytest.mark.parametrize("db_url", [None])  # SQLite only: the answer depends on no database
def test_the_training_file_of_a_model_outside_the_set_is_a_409_naming_the_layer(client, store):
    """What an older fleet's LiteRT device is told when it asks anyway: not a 503 to
    retry for ever."""
    from coordinator.artefacts import published, record, wanted
    from tests.api_helpers import assert_error

    card = {"training": {"refused": "layer 'bn1' (BatchNormalization) has no on-device rewrite", "batch_size": 10}}
    with closing(store.connect()) as db, store.transaction(db):
        data = json.dumps(card).encode()
        record(db, wanted(db), {"card": (store.blobs.put(data), len(data))}, 0.0)
    with closing(store.connect()) as db:
        assert published(db) is not None  # the card says the build is done: no rebuild loop
    response = client.get("/v1/models/latest-train.tflite")
    assert_error(response, 409, "not_trainable_on_device")
    assert "'bn1' (BatchNormalization)" in response.json["detail"]


def test_the_round_history_is_a_csv_and_tensorboard_events_appended_round_by_round(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from coordinator import results

    def record(number, status="committed", **metrics):
        return {
            "number": number,
            "status": status,
            "selected": 4,
            "reported": 3,
            "dropped": 1,
            "late": 0,
            "bytes_up": 100 * number,
            "phase_seconds": {"collecting": 1.5, "aggregating": 0.5, "evaluating": 0.25},
            "evaluated_at": 1000.0 + number if status == "committed" else None,
            "metrics": {**metrics, "secagg": {"masked": 3}} if metrics else None,
        }

    history = [record(1, accuracy=0.5, loss=1.2), record(2, "abandoned")]
    folder = results.write_results(tmp_path, 990.0, history)
    first_events = (folder / results.EVENTS_FILE).read_bytes()
    history.append(record(3, accuracy=0.75, loss=0.6))
    assert results.write_results(tmp_path, 990.0, history) == folder
    events = (folder / results.EVENTS_FILE).read_bytes()
    assert events.startswith(first_events) and len(events) > len(first_events)  # appended, not rewritten

    rows = list(csv.DictReader(io.StringIO((folder / results.CSV_FILE).read_text())))
    assert [r["number"] for r in rows] == ["1", "2", "3"] and rows[1]["status"] == "abandoned"
    assert rows[2]["metrics/accuracy"] == "0.75" and rows[0]["metrics/secagg/masked"] == "3.0"

    board = EventAccumulator(str(folder))
    board.Reload()
    accuracy = board.Scalars("test/accuracy")
    assert [(e.step, round(e.value, 4)) for e in accuracy] == [(1, 0.5), (3, 0.75)]
    assert [e.value for e in board.Scalars("round/reported")] == [3.0, 3.0]
    assert [e.value for e in board.Scalars("metrics/secagg/masked")] == [3.0, 3.0]
