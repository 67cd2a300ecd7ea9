"""The client update and evaluation, as functions of (weights, data, hyper-parameters).

After TFF's simple_fedavg: the client update takes the global weights and returns a
delta, an example count and metrics, and does no I/O, so the device, the coordinator's
evaluation, the benchmark and the tests share it. A ``KerasLearner`` only caches one
model and its compiled steps per process; every call starts from the weights it is given.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from edgefl.models import build_model, weight_names

_EVAL_BATCH = 256


@dataclass(frozen=True)
class ClientResult:
    delta: list[np.ndarray]  # local weights minus global weights, in model order
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


def local_sgd(
    step: Callable[[np.ndarray, np.ndarray], tuple[float, float]],
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
) -> dict[str, float]:
    """``step`` (one SGD step on a batch: its loss and correct count) over seeded,
    per-epoch reshuffled batches: every runtime draws the same batches."""
    rng = np.random.default_rng(seed)
    loss_sum = correct_sum = 0.0
    seen = 0
    for _ in range(epochs):
        order = rng.permutation(len(y))
        for start in range(0, len(y), batch_size):
            batch = order[start : start + batch_size]
            loss, correct = step(x[batch], y[batch])
            loss_sum += float(loss) * len(batch)
            correct_sum += float(correct)
            seen += len(batch)
    return {"train_loss": loss_sum / max(seen, 1), "train_accuracy": correct_sum / max(seen, 1)}


def client_result(
    global_weights: list[np.ndarray], local_weights: list[np.ndarray], num_examples: int, metrics: dict
) -> ClientResult:
    delta = [(w_local - w_global).astype(np.float32) for w_local, w_global in zip(local_weights, global_weights)]
    return ClientResult(delta, num_examples, metrics)


class KerasLearner:
    """One Keras model per process, reused for every round's client update."""

    def __init__(self, model_name: str):
        import tensorflow as tf

        self._tf = tf
        self.model = build_model(model_name)
        self.names = weight_names(self.model)
        self._loss = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        variables = self.model.trainable_variables

        @tf.function(reduce_retracing=True)
        def sgd_step(x, y, lr):
            with tf.GradientTape() as tape:
                logits = self.model(x, training=True)
                loss = self._loss(y, logits)
            grads = tape.gradient(loss, variables)
            for var, grad in zip(variables, grads):
                var.assign_sub(lr * grad)
            correct = tf.reduce_sum(tf.cast(tf.argmax(logits, 1) == y, tf.float32))
            return loss, correct

        @tf.function(reduce_retracing=True)
        def eval_step(x, y):
            logits = self.model(x, training=False)
            loss = tf.reduce_sum(tf.keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))
            correct = tf.reduce_sum(tf.cast(tf.argmax(logits, 1) == y, tf.float32))
            return loss, correct

        self._sgd_step = sgd_step
        self._eval_step = eval_step

    def client_update(
        self,
        global_weights: list[np.ndarray],
        x: np.ndarray,
        y: np.ndarray,
        *,
        epochs: int,
        batch_size: int,
        learning_rate: float,
        seed: int,
    ) -> ClientResult:
        """Local SGD from ``global_weights``; examples are reshuffled every epoch."""
        self.model.set_weights(global_weights)
        lr = self._tf.constant(learning_rate, self._tf.float32)
        metrics = local_sgd(lambda xb, yb: self._sgd_step(xb, yb, lr), x, y, epochs=epochs, batch_size=batch_size, seed=seed)
        return client_result(global_weights, self.model.get_weights(), len(y), metrics)

    def evaluate(self, weights: list[np.ndarray], x: np.ndarray, y: np.ndarray) -> dict[str, float]:
        self.model.set_weights(weights)
        loss_sum = correct_sum = 0.0
        for start in range(0, len(y), _EVAL_BATCH):
            loss, correct = self._eval_step(x[start : start + _EVAL_BATCH], y[start : start + _EVAL_BATCH])
            loss_sum += float(loss)
            correct_sum += float(correct)
        return {"loss": loss_sum / len(y), "accuracy": correct_sum / len(y)}


def limit_threads(threads: int = 1) -> None:
    """Pin TF to ``threads`` threads: many device processes share two cores."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
