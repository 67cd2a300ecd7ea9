"""The on-device training file in the export: converted, then proven to train as Keras
does by one SGD step through LiteRT against the same step in Keras.

Dropout draws its masks from a different generator in each runtime, so for a model with
Dropout the step is compared with dropout off on both sides: a twin of the file
converted with ``train_dropout=False`` (everything else the same rewrite) against Keras
with the Dropout rates set to 0. The card says so (``check_dropout``); the shipped file
keeps its dropout, whose masks ``tests/test_ondevice.py`` checks statistically."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from edgefl.litert import LiteRTLearner
from edgefl.training import KerasLearner
from export.ondevice import SIGNATURES, convert_training_model

_CHECK_LEARNING_RATE = 0.1


def custom_ops(tflite_model: bytes) -> list[str]:
    """Ops outside TFLite's builtin set (Flex ops among them) in every subgraph."""
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(tflite_model))
    return [code.customCode.decode() for code in model.operatorCodes if code.customCode]


def export_training_model(
    model_name: str,
    dataset: str,
    weights: Sequence[np.ndarray],
    batch_size: int,
    check_x: np.ndarray,
    check_y: np.ndarray,
) -> tuple[bytes, dict]:
    """The trainable .tflite starting from ``weights``, and its model-card entry."""
    tflite_model = convert_training_model(model_name, dataset, batch_size, weights)
    keras = KerasLearner(model_name, dataset)
    dropouts = [layer for layer in keras.model.layers if type(layer).__name__ == "Dropout" and layer.rate]
    for layer in dropouts:  # before the learner's step is first traced
        layer.rate = 0.0
    checked = convert_training_model(model_name, dataset, batch_size, weights, train_dropout=False) if dropouts else tflite_model
    litert = LiteRTLearner(checked)
    x, y = check_x[:batch_size], check_y[:batch_size]
    step = dict(epochs=1, batch_size=batch_size, learning_rate=_CHECK_LEARNING_RATE, seed=0)
    by_keras = keras.client_update(list(weights), x, y, **step)
    by_litert = litert.client_update([weights[keras.names.index(n)] for n in litert.names], x, y, **step)
    diff = max(float(np.abs(d - by_keras.delta[keras.names.index(n)]).max()) for n, d in zip(litert.names, by_litert.delta))
    card = {
        "bytes": len(tflite_model),
        "sha256": hashlib.sha256(tflite_model).hexdigest(),
        "batch_size": batch_size,
        "signatures": list(SIGNATURES),
        "custom_ops": custom_ops(tflite_model),
        "one_sgd_step_max_abs_diff_vs_keras": diff,
        "weights": litert.names,
    }
    if dropouts:
        card["check_dropout"] = "off on both sides (a twin file without dropout against Keras with rate 0)"
    return tflite_model, card
