"""Models: a Keras model from a reference, built for the data it will train on.

``--model`` is a reference, resolved the same way by the coordinator, every Keras
device and export:

- a built-in name (``cnn``, ``cnn_small``, ``lenet5``);
- ``path/to/file.py:build_fn`` or ``package.module:build_fn``: a function returning a
  Keras model, called with ``input_shape=`` and ``num_classes=`` when it takes them;
- ``path/to/model.keras``: a saved model, whose weights are the run's initial weights
  (a pretrained start).

Nothing here is sized by a constant: the input shape and the number of classes come
from the dataset (``DataShape``), and a model that does not fit its data is refused in
one line (``ModelError``) when the run is configured, not rounds later.

Weights travel under wire names, ``layer/variable`` (``conv1/kernel``...), which must be
the same in every process and every time a process builds the model. Keras names
unnamed layers from a per-process counter (``conv2d_3`` in a process that built the
model before), so those names are rewritten to the ones a fresh process gives
(``conv2d``, ``conv2d_1``...) in model order: ``weight_names``.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from edgefl.wire import TensorSpec, spec_of


class ModelError(ValueError):
    """A model reference that cannot be resolved, or a model that does not fit its data;
    one line."""


@dataclass(frozen=True)
class DataShape:
    """What a model is built for: one example's shape and the number of classes."""

    input_shape: tuple[int, ...]
    num_classes: int

    @classmethod
    def of(cls, dataset: str) -> DataShape:
        """The shape of a dataset reference's examples (from its test split, which the
        coordinator loads anyway); remembered, so a device host that let go of its data
        does not read it again to build a model."""
        return _data_shape(dataset)


@cache
def _data_shape(dataset: str) -> DataShape:
    from edgefl.datasets import load_dataset

    data = load_dataset(dataset)
    return DataShape(tuple(int(d) for d in data.test.x.shape[1:]), int(data.num_classes))


def _cnn(tf, shape: DataShape):
    """The CNN of McMahan et al. 2017 (FedAvg): 1,663,370 parameters on 28x28x1, 10 classes."""
    layers = tf.keras.layers
    return tf.keras.Sequential(
        [
            tf.keras.Input(shape=shape.input_shape, name="image"),
            layers.Conv2D(32, 5, padding="same", activation="relu", name="conv1"),
            layers.MaxPool2D(2, name="pool1"),
            layers.Conv2D(64, 5, padding="same", activation="relu", name="conv2"),
            layers.MaxPool2D(2, name="pool2"),
            layers.Flatten(name="flatten"),
            layers.Dense(512, activation="relu", name="dense1"),
            layers.Dense(shape.num_classes, name="logits"),
        ],
        name="cnn",
    )


def _cnn_small(tf, shape: DataShape):
    """A small CNN (~55k parameters on 28x28x1) for quick runs and tests."""
    layers = tf.keras.layers
    return tf.keras.Sequential(
        [
            tf.keras.Input(shape=shape.input_shape, name="image"),
            layers.Conv2D(16, 3, padding="same", activation="relu", name="conv1"),
            layers.MaxPool2D(2, name="pool1"),
            layers.Conv2D(32, 3, padding="same", activation="relu", name="conv2"),
            layers.MaxPool2D(2, name="pool2"),
            layers.Flatten(name="flatten"),
            layers.Dense(32, activation="relu", name="dense1"),
            layers.Dense(shape.num_classes, name="logits"),
        ],
        name="cnn_small",
    )


def _lenet5(tf, shape: DataShape):
    """The NIID-Bench study's simple CNN (Li et al., ICDE 2022), LeNet-5's shape: 5x5
    convolutions of 6 and 16 channels, each max-pooled, then dense 120 and 84."""
    layers = tf.keras.layers
    return tf.keras.Sequential(
        [
            tf.keras.Input(shape=shape.input_shape, name="image"),
            layers.Conv2D(6, 5, activation="relu", name="conv1"),
            layers.MaxPool2D(2, name="pool1"),
            layers.Conv2D(16, 5, activation="relu", name="conv2"),
            layers.MaxPool2D(2, name="pool2"),
            layers.Flatten(name="flatten"),
            layers.Dense(120, activation="relu", name="dense1"),
            layers.Dense(84, activation="relu", name="dense2"),
            layers.Dense(shape.num_classes, name="logits"),
        ],
        name="lenet5",
    )


_BUILT_IN: dict[str, Callable] = {"cnn": _cnn, "cnn_small": _cnn_small, "lenet5": _lenet5}
BUILT_IN_MODELS = tuple(_BUILT_IN)
REFERENCE_HELP = f"{', '.join(BUILT_IN_MODELS)}, path/to/file.py:build_fn, package.module:build_fn or path/to/model.keras"


def model_problem(reference: str) -> str | None:
    """Why ``reference`` names no model ("must be ..."), without building it; or None."""
    if reference in _BUILT_IN:
        return None
    if reference.endswith(".keras"):
        return None if Path(reference).is_file() else f"names no file: {reference} does not exist"
    source, colon, function = reference.rpartition(":")
    if not colon or not source or not function.isidentifier():
        return f"must be {REFERENCE_HELP}"
    if source.endswith(".py"):
        return None if Path(source).is_file() else f"names no file: {source} does not exist"
    if not all(part.isidentifier() for part in source.split(".")):
        return f"must be {REFERENCE_HELP}"
    return None


def _builder(reference: str) -> Callable:
    """The function a ``file.py:fn`` or ``module:fn`` reference names."""
    source, _, function = reference.rpartition(":")
    try:
        if source.endswith(".py"):
            path = Path(source).resolve()
            name = f"edgefl_user_model_{abs(hash(str(path)))}"
            module = sys.modules.get(name)
            if module is None:
                spec = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
                sys.modules[name] = module
        else:  # from the working directory first, in every process (an entry script's own
            # directory comes first on sys.path, ``python -m``'s working directory does)
            sys.path.insert(0, os.getcwd())
            try:
                module = importlib.import_module(source)
            finally:
                sys.path.remove(os.getcwd())
    except Exception as error:  # the user's code: whatever it raises, one line
        raise ModelError(f"--model {reference}: cannot import {source}: {type(error).__name__}: {error}") from None
    builder = getattr(module, function, None)
    if not callable(builder):
        raise ModelError(f"--model {reference}: {source} has no function {function}")
    return builder


def _call_builder(reference: str, builder: Callable, shape: DataShape):
    try:
        parameters = inspect.signature(builder).parameters
    except (TypeError, ValueError):  # a builtin or an object without a signature
        raise ModelError(f"--model {reference}: is not a function that builds a model") from None
    given = {"input_shape": shape.input_shape, "num_classes": shape.num_classes}
    try:
        return builder(**{k: v for k, v in given.items() if k in parameters})
    except Exception as error:
        raise ModelError(f"--model {reference}: building the model failed: {type(error).__name__}: {error}") from None


def _check_fits(reference: str, model, shape: DataShape) -> None:
    """A model takes the data's examples and gives one logit per class, or is refused."""
    import tensorflow as tf

    if not isinstance(model, tf.keras.Model):
        raise ModelError(f"--model {reference}: gave a {type(model).__name__}, not a Keras model")
    try:
        inputs, outputs = tuple(model.input_shape[1:]), tuple(model.output_shape[1:])
    except (AttributeError, ValueError):  # a subclassed model never called: no shapes yet
        raise ModelError(
            f"--model {reference}: the model has no input shape yet; give a Sequential or functional model with an Input"
        ) from None
    if inputs != shape.input_shape:
        raise ModelError(f"--model {reference}: takes inputs of shape {inputs}, but the data's examples are {shape.input_shape}")
    if outputs != (shape.num_classes,):
        raise ModelError(f"--model {reference}: gives outputs of shape {outputs}, but the data has {shape.num_classes} classes")
    last = model.layers[-1]
    applies = getattr(getattr(last, "activation", None), "__name__", "linear")
    if type(last).__name__ == "Softmax" or "softmax" in str(getattr(last, "symbol", "")):
        applies = "softmax"
    if applies != "linear":
        raise ModelError(
            f"--model {reference}: its last layer applies {applies}; edgefl trains on logits (the loss is"
            " cross-entropy from logits), so give the last layer no activation"
        )


def build_model(reference: str, dataset: str, *, seed: int | None = None):
    """A Keras model for ``dataset``'s examples; ``seed`` makes a built model's initial
    weights reproducible (a ``.keras`` file brings its own)."""
    problem = model_problem(reference)
    if problem:
        raise ModelError(f"--model {reference} {problem}")
    shape = DataShape.of(dataset)
    import tensorflow as tf

    if seed is not None:
        tf.keras.utils.set_random_seed(seed)
    if reference in _BUILT_IN:
        model = _BUILT_IN[reference](tf, shape)
    elif reference.endswith(".keras"):
        try:
            model = tf.keras.models.load_model(reference, compile=False)
        except Exception as error:
            raise ModelError(f"--model {reference}: not a Keras model file: {type(error).__name__}: {error}") from None
    else:
        model = _call_builder(reference, _builder(reference), shape)
    _check_fits(reference, model, shape)
    return model


def _snake(name: str) -> str:
    """Keras's default layer name for a class (``MaxPooling2D``: ``max_pooling2d``; a
    functional model is ``model``)."""
    if name in ("Functional", "Model"):
        return "model"
    return re.sub("([a-z])([A-Z])", r"\1_\2", re.sub("(.)([A-Z][a-z0-9]+)", r"\1_\2", name)).lower()


def _leaf_layers(model, prefix: str = "") -> list[tuple[str, object]]:
    """(path, layer) of every layer that holds weights itself; a nested model's layers
    under its name."""
    found = []
    for layer, name in zip(model.layers, _canonical_names(model.layers)):
        if getattr(layer, "layers", None) is not None:
            found += _leaf_layers(layer, f"{prefix}{name}/")
        else:
            found.append((f"{prefix}{name}", layer))
    return found


def _canonical_names(layers) -> list[str]:
    """Each layer's name, with Keras's counter-made names (``dense_7``) renumbered in
    order (``dense``, ``dense_1``...) as a fresh process would number them."""
    seen: dict[str, int] = {}
    names = []
    for layer in layers:
        base = _snake(type(layer).__name__)
        if re.fullmatch(rf"{re.escape(base)}(_\d+)?", layer.name):
            count = seen.get(base, 0)
            seen[base] = count + 1
            names.append(base if count == 0 else f"{base}_{count}")
        else:
            names.append(layer.name)
    return names


def weight_names(model) -> list[str]:
    """Wire names of a model's weights, in ``model.get_weights()`` order: ``layer/variable``."""
    by_variable = {}
    for path, layer in _leaf_layers(model):
        for variable in layer.weights:
            by_variable.setdefault(id(variable), f"{path}/{variable.name.split('/')[-1].split(':')[0]}")
    names = [by_variable[id(v)] for v in model.weights]
    if len(set(names)) != len(names):
        raise ModelError(f"model {model.name}: two weights share a name ({', '.join(names)}); give its layers distinct names")
    return names


@cache
def model_spec(reference: str, dataset: str) -> tuple[TensorSpec, ...]:
    """Names and shapes of a model's weights: what every checkpoint and delta must match."""
    model = build_model(reference, dataset)
    return spec_of(weight_names(model), model.get_weights())
