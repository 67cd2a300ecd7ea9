"""Model zoo: Keras builders by name, shared by the coordinator, the devices and export.

Every layer is named so that weight names (``conv1/kernel``...) are stable across
processes and TF sessions; those names are the wire format's tensor names.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

from edgefl.wire import TensorSpec, spec_of

INPUT_SHAPE = (28, 28, 1)
NUM_CLASSES = 10


def _cnn(tf):
    """The CNN of McMahan et al. 2017 (FedAvg): 1,663,370 parameters."""
    layers = tf.keras.layers
    return tf.keras.Sequential(
        [
            tf.keras.Input(shape=INPUT_SHAPE, name="image"),
            layers.Conv2D(32, 5, padding="same", activation="relu", name="conv1"),
            layers.MaxPool2D(2, name="pool1"),
            layers.Conv2D(64, 5, padding="same", activation="relu", name="conv2"),
            layers.MaxPool2D(2, name="pool2"),
            layers.Flatten(name="flatten"),
            layers.Dense(512, activation="relu", name="dense1"),
            layers.Dense(NUM_CLASSES, name="logits"),
        ],
        name="cnn",
    )


def _cnn_small(tf):
    """A small CNN (~55k parameters) for quick runs and tests."""
    layers = tf.keras.layers
    return tf.keras.Sequential(
        [
            tf.keras.Input(shape=INPUT_SHAPE, name="image"),
            layers.Conv2D(16, 3, padding="same", activation="relu", name="conv1"),
            layers.MaxPool2D(2, name="pool1"),
            layers.Conv2D(32, 3, padding="same", activation="relu", name="conv2"),
            layers.MaxPool2D(2, name="pool2"),
            layers.Flatten(name="flatten"),
            layers.Dense(32, activation="relu", name="dense1"),
            layers.Dense(NUM_CLASSES, name="logits"),
        ],
        name="cnn_small",
    )


_BUILDERS: dict[str, Callable] = {"cnn": _cnn, "cnn_small": _cnn_small}
MODEL_NAMES = tuple(_BUILDERS)


def build_model(name: str, *, seed: int | None = None):
    """Build a fresh Keras model; ``seed`` makes its initial weights reproducible."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    import tensorflow as tf

    if seed is not None:
        tf.keras.utils.set_random_seed(seed)
    return _BUILDERS[name](tf)


def weight_names(model) -> list[str]:
    """Wire names of a model's weights, in ``model.get_weights()`` order."""
    return [v.name.split(":")[0] for v in model.weights]


@cache
def model_spec(name: str) -> tuple[TensorSpec, ...]:
    """Names and shapes of a model's weights: what every checkpoint and delta must match."""
    model = build_model(name)
    return spec_of(weight_names(model), model.get_weights())
