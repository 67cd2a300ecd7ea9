"""The on-device training model: builtin ops only, run by the standalone LiteRT runtime,
and training exactly as Keras does."""

from __future__ import annotations

import numpy as np
import pytest

from edgefl.datasets import load_dataset

BATCH = 10


@pytest.fixture(scope="module")
def train_tflite():
    from export.ondevice import convert_training_model

    return convert_training_model("cnn_small", BATCH)


@pytest.fixture(scope="module")
def keras(small_parts):
    return small_parts[0]


@pytest.fixture
def litert(train_tflite):
    from edgefl.litert import LiteRTLearner

    return LiteRTLearner(train_tflite)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits").train


def fresh_weights() -> list:
    """A newly initialised model's weights (Keras order): the shared learner's model holds
    whatever an earlier test left in it."""
    from edgefl.models import build_model

    return build_model("cnn_small", seed=0).get_weights()


def keras_weights_in(litert, keras, weights):
    """Keras-ordered weights in the LiteRT learner's order."""
    return [weights[keras.names.index(n)] for n in litert.names]


def test_only_builtin_ops_and_every_signature(train_tflite):
    from ai_edge_litert.interpreter import Interpreter
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(train_tflite))
    assert not [code.customCode for code in model.operatorCodes if code.customCode], "custom (Flex) ops"
    ops = {flatbuffer_utils.opcode_to_name(model, i) for i in range(len(model.operatorCodes))}
    assert {"VAR_HANDLE", "ASSIGN_VARIABLE", "CONCATENATION", "MAXIMUM", "LOG_SOFTMAX"} <= ops  # variables, im2col, pooling
    assert not {"CONV_2D", "MAX_POOL_2D"} & ops  # rewritten
    interpreter = Interpreter(model_content=train_tflite)  # LiteRT has no Flex delegate to fall back on
    signatures = interpreter.get_signature_list()
    assert set(signatures) == {"train", "infer", "get_weights", "set_weights"}
    assert sorted(signatures["train"]["inputs"]) == ["learning_rate", "mask", "x", "y"]


def test_weights_round_trip_and_inference_equals_keras(litert, keras, digits):
    weights = keras_weights_in(litert, keras, fresh_weights())
    shifted = [w + 0.01 for w in weights]
    litert.set_weights(shifted)
    assert all(np.array_equal(a, b) for a, b in zip(litert.get_weights(), shifted))
    keras.model.set_weights([shifted[litert.names.index(n)] for n in keras.names])
    x = digits.x[:25]  # two full batches and a partial one
    np.testing.assert_allclose(litert.logits(x), keras.model(x).numpy(), atol=1e-5)


@pytest.mark.parametrize("rows", [BATCH, 7])  # a full batch, and a partial one under the mask
def test_one_sgd_step_matches_keras(litert, keras, digits, rows):
    start = fresh_weights()
    x, y = digits.x[:rows], digits.y[:rows]
    by_keras = keras.client_update(start, x, y, epochs=1, batch_size=BATCH, learning_rate=0.1, seed=0)
    by_litert = litert.client_update(
        keras_weights_in(litert, keras, start), x, y, epochs=1, batch_size=BATCH, learning_rate=0.1, seed=0
    )
    for name, delta in zip(litert.names, by_litert.delta):
        assert np.abs(delta).max() > 0, f"{name} did not move"
        np.testing.assert_allclose(delta, by_keras.delta[keras.names.index(name)], atol=1e-5, rtol=0)
    assert by_litert.metrics["train_loss"] == pytest.approx(by_keras.metrics["train_loss"], abs=1e-5)


def test_weights_after_local_training_equal_kerass(litert, keras, digits):
    start = fresh_weights()
    x, y = digits.x[:95], digits.y[:95]
    settings = dict(epochs=3, batch_size=BATCH, learning_rate=0.1, seed=7)  # 30 steps, the last of each epoch partial
    by_keras = keras.client_update(start, x, y, **settings)
    by_litert = litert.client_update(keras_weights_in(litert, keras, start), x, y, **settings)
    trained = litert.get_weights()
    for name, weights in zip(litert.names, trained):
        expected = start[keras.names.index(name)] + by_keras.delta[keras.names.index(name)]
        np.testing.assert_allclose(weights, expected, atol=1e-5, rtol=0)
    assert by_litert.metrics["train_accuracy"] == pytest.approx(by_keras.metrics["train_accuracy"])


def test_the_loss_falls_step_by_step(litert, keras, digits):
    litert.set_weights(keras_weights_in(litert, keras, fresh_weights()))
    x, y = digits.x[:BATCH], digits.y[:BATCH]
    losses = [litert.train_step(x, y, learning_rate=0.1)[0] for _ in range(6)]
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses
    assert losses[0] - losses[-1] > 0.03, losses


def test_a_batch_larger_than_the_models_is_refused(litert, digits):
    with pytest.raises(ValueError, match="batches of 10"):
        litert.client_update(
            litert.get_weights(), digits.x[:20], digits.y[:20], epochs=1, batch_size=20, learning_rate=0.1, seed=0
        )
