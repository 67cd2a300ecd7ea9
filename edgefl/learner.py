"""The algorithm's device half: a ``Learner`` interface with the one client update.

After TFF's simple_fedavg: the client update takes the global weights and returns a
delta, an example count and metrics, and does no I/O, so the devices, the coordinator's
evaluation, the benchmarks and the tests share it. It is written once, here, over four
runtime operations (set and get the weights, one SGD step on a batch, evaluate); a
runtime implements only those: ``edgefl.training.KerasLearner`` (TensorFlow) and
``edgefl.litert.LiteRTLearner`` (the phone's interpreter). Both draw their batches
through ``local_sgd``, so the two runtimes make the same steps.

The client optimizer is SGD with momentum, on the loss plus FedProx's proximal term, as
TFF's ``build_weighted_fed_prox`` with ``build_sgdm(learning_rate, momentum)`` as the
client optimizer runs it (Li et al. 2020; TFF's ``proximal_client_work`` and
``optimizers/sgdm``). Per trainable weight ``w``, with ``w_global`` the weights the
client update started from and an accumulator ``a`` that starts at zero at every
client update::

    g = dL/dw + prox_mu * (w - w_global)    # the gradient of L + prox_mu/2 ||w - w_global||^2
    a = momentum * a + g
    w = w - learning_rate * a

With ``momentum = prox_mu = 0`` that is plain SGD, ``w - learning_rate * dL/dw``, to the
bit (TFF's sgdm without momentum takes the same plain steps). One difference from TFF
0.87: its proximal term is ``prox_mu * (w_global - w)``, the wrong sign (it pushes a
client away from the global model: ``proximal_client_work`` maps ``lambda x, y: mu *
(y - x)`` over (weights, initial weights)); edgefl uses the paper's. TFF's result for
``mu`` is edgefl's for ``-mu``, which ``tests/test_client_strategies.py`` checks.

This module imports neither TensorFlow nor LiteRT: a LiteRT device must never load
TensorFlow through it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from edgefl.wire import TensorSpec


@dataclass(frozen=True)
class ClientResult:
    delta: list[np.ndarray]  # local weights minus global weights, in ``Learner.names`` order
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


class Learner(ABC):
    """One model in one runtime, reused for every client update; every call starts from
    the weights it is given. Weights are lists in ``names`` order (the wire's names)."""

    names: list[str]
    spec: tuple[TensorSpec, ...]  # the weights' names and shapes: what a checkpoint must match
    batch_size: int | None = None  # a runtime with a fixed batch (a .tflite file) trains only that

    @abstractmethod
    def get_weights(self) -> list[np.ndarray]: ...

    @abstractmethod
    def set_weights(self, weights: list[np.ndarray]) -> None:
        """Set the weights, and start a client update from them: they become the
        proximal term's anchor (``w_global``) and the momentum accumulators are zeroed."""

    @abstractmethod
    def train_step(
        self, x: np.ndarray, y: np.ndarray, learning_rate: float, *, momentum: float = 0.0, prox_mu: float = 0.0
    ) -> tuple[float, float]:
        """One step of the client optimizer (this module's formulas) on one batch: its
        mean loss and number of correct predictions, before the step. ``client_update``
        passes ``momentum`` and ``prox_mu`` only when they are not zero, so a runtime
        that takes plain SGD steps only need not accept them."""

    @abstractmethod
    def evaluate(self, weights: list[np.ndarray], x: np.ndarray, y: np.ndarray) -> dict[str, float]:
        """``{"loss", "accuracy"}`` of ``weights`` on (x, y)."""

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
        momentum: float = 0.0,
        prox_mu: float = 0.0,
    ) -> ClientResult:
        """Local training from ``global_weights`` (SGD with ``momentum`` on the loss
        plus ``prox_mu``'s proximal term: the module's formulas); examples are
        reshuffled every epoch."""
        if self.batch_size is not None and batch_size != self.batch_size:
            raise ValueError(f"this model trains batches of {self.batch_size}, not {batch_size}")
        extra = {k: float(v) for k, v in (("momentum", momentum), ("prox_mu", prox_mu)) if v}
        self.set_weights(global_weights)
        metrics = local_sgd(
            lambda xb, yb: self.train_step(xb, yb, learning_rate, **extra), x, y, epochs=epochs, batch_size=batch_size, seed=seed
        )
        return client_result(global_weights, self.get_weights(), len(y), metrics)
