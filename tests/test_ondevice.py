"""The on-device training model: builtin ops only, run by the standalone LiteRT runtime,
and training exactly as Keras does, for every layer kind of the documented set."""

from __future__ import annotations

import numpy as np
import pytest

from edgefl.datasets import load_dataset

BATCH = 10


@pytest.fixture(scope="module")
def train_tflite():
    from export.ondevice import convert_training_model

    return convert_training_model("cnn_small", "digits", BATCH)


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

    return build_model("cnn_small", "digits", seed=0).get_weights()


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
    assert sorted(signatures["train"]["inputs"]) == ["learning_rate", "mask", "momentum", "prox_mu", "x", "y"]
    assert len(train_tflite) < 400_000  # the weights (~55k floats, three times: weights, anchors, momentum) and ops


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


# One tiny model per layer kind of the documented set: (layers between an input of
# INPUT_SHAPE and Flatten + Dense(3)), converted once per module.
SMALL_BATCH = 4
INPUT_SHAPE = (9, 8, 2)


def _cases():
    import functools

    import tensorflow as tf

    layers = tf.keras.layers
    conv = functools.partial(layers.Conv2D, 3)
    cases = {
        "conv odd same": [conv(3, padding="same", activation="relu")],
        "conv even same stride 2": [conv((4, 2), strides=2, padding="same")],
        "conv odd valid stride (2, 1), no bias": [conv(3, strides=(2, 1), use_bias=False)],
        "conv even valid stride 3": [conv(2, strides=3)],
        "max pool valid": [conv(3, padding="same"), layers.MaxPooling2D(2)],
        "max pool same 3 stride 2": [conv(2, padding="same"), layers.MaxPooling2D(3, strides=2, padding="same")],
        "avg pool valid (3, 2)": [layers.AveragePooling2D((3, 2))],
        "avg pool same 3 stride 2": [conv(3, padding="same"), layers.AveragePooling2D(3, strides=2, padding="same")],
        "avg pool same 2 stride 1": [layers.AveragePooling2D(2, strides=1, padding="same")],
        "reshape and dense on rank 3": [layers.Reshape((18, 8)), layers.Dense(4, activation="relu")],
        "dropout": [conv(3, activation="relu"), layers.Dropout(0.4)],
    }
    # Activations in chains of "same" convolutions (a conversion costs about a second each):
    # a wrong rewrite of any one of them shows in the chain's step.
    for group in (("relu", "relu6", "sigmoid", "tanh"), ("elu", "selu", "swish", "gelu"), ("hard_sigmoid", "linear", "softmax")):
        cases[f"activations {', '.join(group)}"] = [conv(3, padding="same", activation=name) for name in group]
    cases["ReLU (6, slope, threshold), LeakyReLU, ELU, silu, Softmax layers and approximate gelu"] = [
        conv(3, padding="same"),
        layers.ReLU(max_value=6.0, negative_slope=0.1, threshold=0.2),
        conv(3, padding="same"),
        layers.LeakyReLU(0.3),
        conv(3, padding="same"),
        layers.ELU(0.7),
        conv(3, padding="same"),
        layers.Activation("silu"),
        conv(3, padding="same", activation=functools.partial(tf.keras.activations.gelu, approximate=True)),
        layers.Softmax(),
    ]
    return cases


CASES = [
    "conv odd same",
    "conv even same stride 2",
    "conv odd valid stride (2, 1), no bias",
    "conv even valid stride 3",
    "max pool valid",
    "max pool same 3 stride 2",
    "avg pool valid (3, 2)",
    "avg pool same 3 stride 2",
    "avg pool same 2 stride 1",
    "reshape and dense on rank 3",
    "dropout",
    "activations relu, relu6, sigmoid, tanh",
    "activations elu, selu, swish, gelu",
    "activations hard_sigmoid, linear, softmax",
    "ReLU (6, slope, threshold), LeakyReLU, ELU, silu, Softmax layers and approximate gelu",
]


def _small_model(name: str, functional: bool = False):
    import tensorflow as tf

    tf.keras.utils.set_random_seed(3)
    chain = [*_cases()[name], tf.keras.layers.Flatten(), tf.keras.layers.Dense(3)]
    if not functional:
        return tf.keras.Sequential([tf.keras.Input(INPUT_SHAPE), *chain])
    inputs = x = tf.keras.Input(INPUT_SHAPE)
    for layer in chain:
        x = layer(x)
    return tf.keras.Model(inputs, x)


@pytest.fixture(scope="module")
def converted():
    """name -> (Keras model, its training file with dropout off in train, its ops); converted on first use."""
    from tensorflow.lite.tools import flatbuffer_utils

    from export.ondevice import convert_keras_training_model

    cache = {}

    def get(name):
        if name not in cache:
            model = _small_model(name)
            tflite_model = convert_keras_training_model(model, SMALL_BATCH, train_dropout=False)
            flat = flatbuffer_utils.convert_bytearray_to_object(bytearray(tflite_model))
            ops = {flatbuffer_utils.opcode_to_name(flat, i) for i in range(len(flat.operatorCodes))}
            cache[name] = model, tflite_model, ops
        return cache[name]

    return get


def _keras_step(model, x, y, learning_rate):
    """One plain SGD step in Keras (dropout off): each weight's change."""
    import tensorflow as tf

    with tf.GradientTape() as tape:
        loss = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, model(x, training=False))
    return [-learning_rate * g.numpy() for g in tape.gradient(loss, model.trainable_variables)]


@pytest.mark.parametrize("name", CASES)
def test_each_layer_kind_is_builtin_only_and_steps_like_keras(converted, name):
    from edgefl.litert import LiteRTLearner
    from edgefl.models import weight_names
    from export.ondevice import unsupported_layer
    from export.trainable import custom_ops

    model, tflite_model, ops = converted(name)
    assert unsupported_layer(model) is None
    assert custom_ops(tflite_model) == []
    assert not {"CONV_2D", "MAX_POOL_2D", "AVERAGE_POOL_2D", "TANH", "LOGISTIC", "ELU", "GELU"} & ops, ops
    assert len(tflite_model) < 25_000 * len(model.layers)  # no activation-sized constants
    rng = np.random.default_rng(5)
    x = rng.normal(size=(SMALL_BATCH, *INPUT_SHAPE)).astype(np.float32)
    y = rng.integers(0, 3, SMALL_BATCH)
    names, start = weight_names(model), model.get_weights()
    litert = LiteRTLearner(tflite_model)
    litert.set_weights([start[names.index(n)] for n in litert.names])
    np.testing.assert_allclose(litert.logits(x), model(x, training=False).numpy(), atol=2e-5, rtol=1e-5)
    litert.train_step(x, y, learning_rate=0.5)
    by_keras = _keras_step(model, x, y, 0.5)
    for n, after in zip(litert.names, litert.get_weights()):
        i = names.index(n)
        delta = after - start[i]
        assert np.abs(by_keras[i]).max() > 0, f"{n} has no gradient in Keras"
        np.testing.assert_allclose(delta, by_keras[i], atol=1e-5, rtol=1e-4, err_msg=f"{name}: {n}")


def test_a_functional_chain_is_rewritten_like_a_sequential_one():
    from export.ondevice import convert_keras_training_model, unsupported_layer

    model = _small_model("max pool same 3 stride 2", functional=True)
    assert unsupported_layer(model) is None
    assert convert_keras_training_model(model, SMALL_BATCH)


def test_dropout_trains_with_fresh_masks_of_its_rate_and_infers_as_the_identity():
    """Input -> Dropout(0.5) -> Dense with a zero kernel: the logits are 0 whatever the
    mask, so a kept input's kernel row moves by exactly lr/(1-rate) * (onehot - 1/2) and
    a dropped one's not at all; about half are dropped, each step anew."""
    import tensorflow as tf

    from edgefl.litert import LiteRTLearner
    from export.ondevice import convert_keras_training_model

    units, rate, lr = 4000, 0.5, 0.1
    model = tf.keras.Sequential(
        [
            tf.keras.Input((units,)),
            tf.keras.layers.Dropout(rate),
            tf.keras.layers.Dense(2, use_bias=False, kernel_initializer="zeros"),
        ]
    )
    litert = LiteRTLearner(convert_keras_training_model(model, 1))
    x, y = np.ones((1, units), np.float32), np.array([1])
    np.testing.assert_array_equal(litert.logits(x), model(x, training=False).numpy())
    kept_rows = []
    for _ in range(2):
        litert.set_weights([np.zeros((units, 2), np.float32)])
        litert.train_step(x, y, learning_rate=lr)
        (kernel,) = litert.get_weights()
        kept = np.abs(kernel).max(axis=1) > 0
        np.testing.assert_allclose(kernel[kept], np.tile([[-0.5, 0.5]], (kept.sum(), 1)) * lr / (1 - rate), rtol=1e-6)
        assert abs(kept.mean() - (1 - rate)) < 0.04, kept.mean()
        kept_rows.append(kept)
    assert (kept_rows[0] != kept_rows[1]).mean() > 0.3  # a new mask per step


def _refused(model) -> str:
    from export.ondevice import convert_keras_training_model, unsupported_layer

    line = unsupported_layer(model)
    assert line and "\n" not in line
    assert line.endswith(
        "LiteRT devices train "
        + "Conv2D (any kernel, stride, padding), Dense, max/average pooling, Flatten, Reshape, the usual activations and Dropout"
    )
    with pytest.raises(ValueError) as refused:
        convert_keras_training_model(model, SMALL_BATCH)
    assert str(refused.value) == line
    return line


def test_unsupported_layers_are_named_with_the_reason():
    import tensorflow as tf

    layers = tf.keras.layers
    batch_norm = tf.keras.Sequential(
        [
            tf.keras.Input(INPUT_SHAPE),
            layers.Conv2D(3, 3),
            layers.BatchNormalization(name="bn1"),
            layers.Flatten(),
            layers.Dense(3),
        ]
    )
    assert _refused(batch_norm).startswith("layer 'bn1' (BatchNormalization) has no on-device rewrite; ")
    dilated = tf.keras.Sequential(
        [tf.keras.Input(INPUT_SHAPE), layers.Conv2D(3, 3, dilation_rate=2, name="wide"), layers.Flatten(), layers.Dense(3)]
    )
    assert _refused(dilated).startswith("layer 'wide' (Conv2D) is dilated (dilation_rate (2, 2))")
    grouped = tf.keras.Sequential(
        [tf.keras.Input(INPUT_SHAPE), layers.Conv2D(4, 3, groups=2, name="g"), layers.Flatten(), layers.Dense(3)]
    )
    assert _refused(grouped).startswith("layer 'g' (Conv2D) is a grouped convolution (groups=2)")
    odd_activation = tf.keras.Sequential(
        [tf.keras.Input(INPUT_SHAPE), layers.Flatten(), layers.Dense(3, activation="softplus", name="d")]
    )
    assert _refused(odd_activation).startswith("layer 'd' (Dense) has activation 'softplus'")
    inputs = tf.keras.Input(INPUT_SHAPE)
    first = layers.Conv2D(2, 3, padding="same", name="c1")(inputs)
    second = layers.Conv2D(2, 3, padding="same", name="c2")(first)
    residual = tf.keras.Model(inputs, layers.Dense(3)(layers.Flatten()(layers.Add(name="skip")([first, second]))), name="res")
    assert _refused(residual).startswith("model 'res' is not a chain of layers: layer 'skip' (Add) takes 2 inputs")


@pytest.mark.parametrize("reference", ["cnn", "cnn_small", "lenet5"])
def test_the_built_in_models_are_in_the_set(reference):
    from edgefl.models import build_model
    from export.ondevice import unsupported_layer

    assert unsupported_layer(build_model(reference, "digits")) is None


def test_exports_check_of_a_model_with_dropout_compares_with_dropout_off(tmp_path, digits):
    """The shipped file keeps its dropout; the check steps a twin without it against
    Keras with rate 0, and says so on the card."""
    from export.trainable import export_training_model

    (tmp_path / "user_model.py").write_text(
        "import tensorflow as tf\n\n\n"
        "def build(input_shape, num_classes):\n"
        "    layers = tf.keras.layers\n"
        "    return tf.keras.Sequential([tf.keras.Input(input_shape), layers.Conv2D(4, 3, strides=2, activation='relu'),"
        " layers.Dropout(0.5), layers.Flatten(), layers.Dense(num_classes)])\n"
    )
    reference = f"{tmp_path / 'user_model.py'}:build"
    from edgefl.models import build_model

    weights = build_model(reference, "digits", seed=0).get_weights()
    tflite_model, card = export_training_model(reference, "digits", weights, BATCH, digits.x[:BATCH], digits.y[:BATCH])
    assert card["custom_ops"] == [] and "RANDOM_UNIFORM" in _op_names(tflite_model)
    assert card["one_sgd_step_max_abs_diff_vs_keras"] < 1e-5
    assert "off on both sides" in card["check_dropout"]


def _op_names(tflite_model: bytes) -> set[str]:
    from tensorflow.lite.tools import flatbuffer_utils

    flat = flatbuffer_utils.convert_bytearray_to_object(bytearray(tflite_model))
    return {flatbuffer_utils.opcode_to_name(flat, i) for i in range(len(flat.operatorCodes))}
