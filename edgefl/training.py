"""The Keras runtime of the ``Learner`` interface (``edgefl.learner``): TensorFlow in
the process that trains.

A ``KerasLearner`` holds one model and its compiled steps (per process, or per thread
of a device host); the client update itself is ``Learner.client_update``, shared with
the LiteRT runtime. Every call starts from the weights it is given.

The step is ``edgefl.learner``'s client optimizer (SGD with momentum on the loss plus
FedProx's proximal term), compiled once: its hyper-parameters are tensors, and each
trainable variable has two more, the anchor (the weights ``set_weights`` was last
given) and the momentum accumulator, which ``set_weights`` sets and zeroes.
"""

from __future__ import annotations

import numpy as np

from edgefl.learner import ClientResult, Learner, client_result, local_sgd
from edgefl.models import build_model, weight_names
from edgefl.wire import spec_of

__all__ = ["ClientResult", "KerasLearner", "Learner", "client_result", "limit_threads", "local_sgd"]

_EVAL_BATCH = 256


class KerasLearner(Learner):
    """One Keras model, reused for every round's client update."""

    def __init__(self, model: str, dataset: str):
        import tensorflow as tf

        self._tf = tf
        self.model = build_model(model, dataset)
        self.names = weight_names(self.model)
        self.spec = spec_of(self.names, self.model.get_weights())
        self._loss = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        self._hyper_values: tuple[float, float, float] | None = None
        self._hyper = None
        variables = self.model.trainable_variables
        anchors = [tf.Variable(v, trainable=False) for v in variables]
        accumulators = [tf.Variable(tf.zeros_like(v), trainable=False) for v in variables]

        @tf.function(reduce_retracing=True)
        def sgd_step(x, y, lr, momentum, prox_mu):
            with tf.GradientTape() as tape:
                logits = self.model(x, training=True)
                loss = self._loss(y, logits)
            grads = tape.gradient(loss, variables)
            for var, grad, anchor, accumulator in zip(variables, grads, anchors, accumulators):
                step = momentum * accumulator + (grad + prox_mu * (var - anchor))
                accumulator.assign(step)
                var.assign_sub(lr * step)
            correct = tf.reduce_sum(tf.cast(tf.argmax(logits, 1) == y, tf.float32))
            return loss, correct

        @tf.function
        def start_update():
            for var, anchor, accumulator in zip(variables, anchors, accumulators):
                anchor.assign(var)
                accumulator.assign(tf.zeros_like(var))

        @tf.function(reduce_retracing=True)
        def eval_step(x, y):
            logits = self.model(x, training=False)
            loss = tf.reduce_sum(tf.keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))
            correct = tf.reduce_sum(tf.cast(tf.argmax(logits, 1) == y, tf.float32))
            return loss, correct

        self._sgd_step = sgd_step
        self._start_update = start_update
        self._eval_step = eval_step

    def set_weights(self, weights: list[np.ndarray]) -> None:
        self.model.set_weights(weights)
        self._start_update()

    def get_weights(self) -> list[np.ndarray]:
        return self.model.get_weights()

    def train_step(
        self, x: np.ndarray, y: np.ndarray, learning_rate: float, *, momentum: float = 0.0, prox_mu: float = 0.0
    ) -> tuple[float, float]:
        values = (float(learning_rate), float(momentum), float(prox_mu))
        if values != self._hyper_values:  # tensors, made once per setting: the compiled step is not retraced
            self._hyper_values, self._hyper = values, [self._tf.constant(v, self._tf.float32) for v in values]
        return self._sgd_step(x, y, *self._hyper)

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
