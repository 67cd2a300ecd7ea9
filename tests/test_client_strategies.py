"""The client optimizer (``edgefl.learner``): SGD with momentum on the loss plus FedProx's
proximal term, in Keras and in the LiteRT file, against TFF's
``build_weighted_fed_prox`` with ``build_sgdm`` as the client optimizer, on the batches
``local_sgd`` draws, and against a hand-written loop of the formulas:

    g = dL/dw + prox_mu * (w - w_global);  a = momentum * a + g  (a = 0 at the start);  w -= lr * a

TFF 0.87 adds ``mu * (w_global - w)`` instead (``proximal_client_work``: the opposite
sign of Li et al.'s gradient), so its run with ``mu`` is compared with edgefl's with
``-mu``; the same loop with the sign flipped reproduces TFF, which shows what TFF runs.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgefl.datasets import load_dataset
from edgefl.learner import local_sgd

BATCH = 8
LR = 0.1
SETTINGS = dict(epochs=2, batch_size=BATCH, learning_rate=LR, seed=5)  # 23 examples: 6 steps, partial batches
# LiteRT's im2col sums in another order than Keras's Conv2D (differences of ~1e-8), so a
# ReLU or max-pooling choice that close to a tie can go the other way and move a few
# weights by ~1e-5; seed 4 has one such step for momentum and prox_mu together, seed 5
# none (every runtime then agrees to ~3e-6 relative).
STRATEGIES = {"momentum 0.9": (0.9, 0.0), "prox_mu 0.1": (0.0, 0.1), "momentum 0.9 and prox_mu 0.1": (0.9, 0.1)}


@pytest.fixture(scope="module")
def data():
    train = load_dataset("digits").train
    return train.x[:23], train.y[:23]


@pytest.fixture(scope="module")
def start():
    from edgefl.models import build_model

    return build_model("cnn_small", "digits", seed=1).get_weights()


@pytest.fixture(scope="module")
def keras(small_parts):
    return small_parts[0]


@pytest.fixture(scope="module")
def litert():
    from edgefl.litert import LiteRTLearner
    from export.ondevice import convert_training_model

    return LiteRTLearner(convert_training_model("cnn_small", "digits", BATCH))


def drawn_batches(x, y) -> list:
    """The batches ``local_sgd`` draws for SETTINGS, in order, every epoch's."""
    batches = []
    settings = {k: v for k, v in SETTINGS.items() if k != "learning_rate"}
    local_sgd(lambda xb, yb: batches.append((xb, yb)) or (0.0, 0.0), x, y, **settings)
    return batches


def keras_delta(keras, start, data, momentum, prox_mu) -> list:
    return keras.client_update(list(start), *data, **SETTINGS, momentum=momentum, prox_mu=prox_mu).delta


def litert_delta(litert, keras, start, data, momentum, prox_mu) -> list:
    """The LiteRT learner's delta in Keras's order."""
    ordered = [start[keras.names.index(n)] for n in litert.names]
    delta = litert.client_update(ordered, *data, **SETTINGS, momentum=momentum, prox_mu=prox_mu).delta
    return [delta[litert.names.index(n)] for n in keras.names]


def tff_delta(start, batches, momentum, proximal_strength) -> list:
    """One TFF round, one client whose dataset is ``batches``: FedProx with sgdm on the
    client, SGD at 1.0 on the server; the new model minus ``start``. Run in the
    process of ``_tff_main``: TFF builds the Keras model in a v1 graph, which leaves
    every Keras model made outside it unusable (the session's shared learner too)."""
    import tensorflow as tf
    import tensorflow_federated as tff

    from edgefl.models import build_model

    def model_fn():
        return tff.learning.models.from_keras_model(
            build_model("cnn_small", "digits"),
            loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            input_spec=(tf.TensorSpec([None, 28, 28, 1], tf.float32), tf.TensorSpec([None], tf.int64)),
        )

    process = tff.learning.algorithms.build_weighted_fed_prox(
        model_fn,
        proximal_strength=float(proximal_strength),
        client_optimizer_fn=tff.learning.optimizers.build_sgdm(LR, momentum or None),
        server_optimizer_fn=tff.learning.optimizers.build_sgdm(1.0),
    )
    state = process.set_model_weights(process.initialize(), tff.learning.models.ModelWeights(list(start), []))
    dataset = None
    for xb, yb in batches:
        one = tf.data.Dataset.from_tensors((xb.astype(np.float32), yb.astype(np.int64)))
        dataset = one if dataset is None else dataset.concatenate(one)
    output = process.next(state, [dataset])
    trained = process.get_model_weights(output.state).trainable
    return [np.asarray(w) - s for w, s in zip(trained, start)]


TFF_RUNS = {**STRATEGIES, "plain": (0.0, 0.0)}


def _tff_main(directory: str) -> None:
    """In a child process: every TFF_RUNS run on the start weights and batches saved in
    ``directory``, on a worker_binary started and stopped here (``TffRuntime``)."""
    from edgefl.app.tff_runtime import TffRuntime

    inputs = np.load(f"{directory}/inputs.npz")
    start = [inputs[f"w{i}"] for i in range(int(inputs["weights"]))]
    batches = [(inputs[f"x{i}"], inputs[f"y{i}"]) for i in range(int(inputs["batches"]))]
    runtime = TffRuntime(log_path=f"{directory}/worker_binary.log")
    runtime.start()
    try:
        out = {}
        for run, (momentum, mu) in TFF_RUNS.items():
            for i, d in enumerate(tff_delta(start, batches, momentum, mu)):
                out[f"{run}/{i}"] = d
        np.savez(f"{directory}/deltas.npz", **out)
    finally:
        runtime.stop()


@pytest.fixture(scope="module")
def by_tff(tmp_path_factory, start, data) -> dict:
    """run name -> TFF's delta, computed in a child process (see ``tff_delta``)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    directory = tmp_path_factory.mktemp("tff")
    batches = drawn_batches(*data)
    arrays = {f"w{i}": w for i, w in enumerate(start)} | {"weights": len(start), "batches": len(batches)}
    for i, (xb, yb) in enumerate(batches):
        arrays |= {f"x{i}": xb, f"y{i}": yb}
    np.savez(directory / "inputs.npz", **arrays)
    root = Path(__file__).resolve().parent.parent
    subprocess.run(
        [sys.executable, "-c", f"from tests.test_client_strategies import _tff_main; _tff_main({str(directory)!r})"],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        check=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deltas = np.load(directory / "deltas.npz")
    return {run: [deltas[f"{run}/{i}"] for i in range(len(start))] for run in TFF_RUNS}


def reference_delta(start, batches, momentum, prox_mu) -> list:
    """The formulas, step by step in numpy, with gradients of the loss from plain TF."""
    import tensorflow as tf

    from edgefl.models import build_model

    model = build_model("cnn_small", "digits")
    loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    w = [s.copy() for s in start]
    accumulator = [np.zeros_like(s) for s in start]
    for xb, yb in batches:
        model.set_weights(w)
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
        gradients = [g.numpy() for g in tape.gradient(loss, model.trainable_variables)]
        for i, g in enumerate(gradients):
            g = g + np.float32(prox_mu) * (w[i] - start[i])
            accumulator[i] = np.float32(momentum) * accumulator[i] + g
            w[i] = w[i] - np.float32(LR) * accumulator[i]
    return [wi - s for wi, s in zip(w, start)]


def assert_close(ours, theirs, what: str) -> None:
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        scale = float(np.abs(b).max())
        assert scale > 0, f"{what}: weight {i} did not move"
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * scale + 1e-7, err_msg=f"{what}: weight {i}")


def max_relative_diff(ours, theirs) -> float:
    return max(float(np.abs(a - b).max() / np.abs(b).max()) for a, b in zip(ours, theirs))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_keras_and_litert_equal_tffs_fedprox_with_sgdm(by_tff, keras, litert, start, data, strategy):
    momentum, mu = STRATEGIES[strategy]
    # TFF's proximal term has the opposite sign (see the module's docstring).
    assert_close(keras_delta(keras, start, data, momentum, -mu), by_tff[strategy], f"Keras vs TFF, {strategy}")
    assert_close(litert_delta(litert, keras, start, data, momentum, -mu), by_tff[strategy], f"LiteRT vs TFF, {strategy}")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_keras_and_litert_equal_the_formulas_step_by_step(keras, litert, start, data, strategy):
    momentum, mu = STRATEGIES[strategy]
    batches = drawn_batches(*data)
    expected = reference_delta(start, batches, momentum, mu)
    by_keras = keras_delta(keras, start, data, momentum, mu)
    assert_close(by_keras, expected, f"Keras vs the formulas, {strategy}")
    assert_close(litert_delta(litert, keras, start, data, momentum, mu), expected, f"LiteRT vs the formulas, {strategy}")
    plain = reference_delta(start, batches, 0.0, 0.0)
    assert max_relative_diff(by_keras, plain) > 1e-3  # the strategy changed the steps
    if mu:  # and the proximal term's sign is visible: the paper's is not TFF's
        assert max_relative_diff(by_keras, reference_delta(start, batches, momentum, -mu)) > 1e-4


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_the_flipped_sign_loop_is_what_tff_runs(by_tff, start, data, strategy):
    momentum, mu = STRATEGIES[strategy]
    assert_close(reference_delta(start, drawn_batches(*data), momentum, -mu), by_tff[strategy], f"formulas vs TFF, {strategy}")
    if mu:  # and TFF's run is not the paper's proximal step
        assert max_relative_diff(reference_delta(start, drawn_batches(*data), momentum, mu), by_tff[strategy]) > 1e-4


def test_momentum_0_and_mu_0_are_todays_plain_sgd_steps(by_tff, keras, litert, start, data):
    """Keras: the same bits as the plain step (``w -= lr * dL/dw``) compiled as before
    the client optimizer existed; LiteRT: TFF's plain sgdm (no momentum) and Keras's."""
    import tensorflow as tf

    from edgefl.models import build_model

    model = build_model("cnn_small", "digits")
    model.set_weights(list(start))
    loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    variables = model.trainable_variables

    @tf.function(reduce_retracing=True)
    def plain_step(x, y, lr):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        for var, grad in zip(variables, tape.gradient(loss, variables)):
            var.assign_sub(lr * grad)

    for xb, yb in drawn_batches(*data):
        plain_step(xb, yb, tf.constant(LR))
    plain = [w - s for w, s in zip(model.get_weights(), start)]
    for zero in (0, 0.0):
        by_keras = keras_delta(keras, start, data, zero, zero)
        for a, b in zip(by_keras, plain):
            np.testing.assert_array_equal(a, b)
    # through the new code path with the hyper-parameters given as zeros
    keras.set_weights(list(start))
    for xb, yb in drawn_batches(*data):
        keras.train_step(xb, yb, LR, momentum=0.0, prox_mu=0.0)
    for a, b, s in zip(keras.get_weights(), plain, start):
        np.testing.assert_array_equal(a - s, b)
    litert.set_weights([start[keras.names.index(n)] for n in litert.names])
    for xb, yb in drawn_batches(*data):
        litert.train_step(xb, yb, LR, momentum=0.0, prox_mu=0.0)
    by_litert = [litert.get_weights()[litert.names.index(n)] - start[i] for i, n in enumerate(keras.names)]
    assert_close(by_litert, plain, "LiteRT plain vs Keras plain")
    assert_close(by_litert, by_tff["plain"], "LiteRT plain vs TFF plain")
    assert_close(plain, by_tff["plain"], "Keras plain vs TFF plain")


def test_set_weights_restarts_the_update_and_get_weights_returns_the_model_only(keras, litert, start, data):
    """A second client update from the same weights repeats the first exactly (anchor
    and momentum restarted), in both runtimes; the file's extra state stays inside."""
    for learner, weights in ((keras, list(start)), (litert, [start[keras.names.index(n)] for n in litert.names])):
        first = learner.client_update(weights, *data, **SETTINGS, momentum=0.9, prox_mu=0.1).delta
        learner.client_update([w + 0.05 for w in weights], *data, **SETTINGS, momentum=0.9, prox_mu=0.1)
        again = learner.client_update(weights, *data, **SETTINGS, momentum=0.9, prox_mu=0.1).delta
        for a, b in zip(first, again):
            np.testing.assert_array_equal(a, b)
        assert [tuple(w.shape) for w in learner.get_weights()] == [tuple(w.shape) for w in weights]
    signatures = litert._interpreter.get_signature_list()
    assert sorted(signatures["train"]["inputs"]) == ["learning_rate", "mask", "momentum", "prox_mu", "x", "y"]
    assert sorted(signatures["get_weights"]["outputs"]) == sorted(n.replace("/", "__") for n in litert.names)


def test_a_training_file_without_the_client_optimizer_trains_plain_sgd_only():
    """A file exported before momentum existed: plain steps still run, the rest is refused."""
    import tensorflow as tf

    from edgefl.litert import LiteRTLearner
    from export.ondevice import convert_module

    class OldFile(tf.Module):
        def __init__(self):
            super().__init__()
            self.w = tf.Variable(np.ones((4, 3), np.float32), name="dense__kernel")

        @tf.function(
            input_signature=[
                tf.TensorSpec([2, 4], tf.float32, name="x"),
                tf.TensorSpec([2], tf.int32, name="y"),
                tf.TensorSpec([2], tf.float32, name="mask"),
                tf.TensorSpec([], tf.float32, name="learning_rate"),
            ]
        )
        def train(self, x, y, mask, learning_rate):
            self.w.assign_sub(learning_rate * tf.ones_like(self.w))
            return {"loss": tf.reduce_sum(x * 0.0), "correct": tf.reduce_sum(mask)}

        @tf.function(input_signature=[tf.TensorSpec([2, 4], tf.float32, name="x")])
        def infer(self, x):
            return {"logits": tf.matmul(x, self.w)}

        @tf.function(input_signature=[])
        def get_weights(self):
            return {"dense__kernel": tf.identity(self.w)}

        @tf.function(input_signature=[tf.TensorSpec([4, 3], tf.float32, name="dense__kernel")])
        def set_weights(self, value):
            self.w.assign(value)
            return {"parameters": tf.constant(12)}

    learner = LiteRTLearner(convert_module(OldFile()))
    x, y = np.ones((2, 4), np.float32), np.array([0, 1])
    assert learner.client_update([np.ones((4, 3), np.float32)], x, y, epochs=1, batch_size=2, learning_rate=0.5, seed=0)
    with pytest.raises(ValueError, match="predates momentum"):
        learner.client_update(
            [np.ones((4, 3), np.float32)], x, y, epochs=1, batch_size=2, learning_rate=0.5, seed=0, momentum=0.9
        )
