"""The algorithm's device half: a ``Learner`` interface with the one client update.

After TFF's simple_fedavg: the client update takes the global weights and returns a
delta, an example count and metrics, and does no I/O, so the devices, the coordinator's
evaluation, the benchmarks and the tests share it. It is written once, here, over four
runtime operations (set and get the weights, one SGD step on a batch, evaluate); a
runtime implements only those: ``edgefl.training.KerasLearner`` (TensorFlow) and
``edgefl.litert.LiteRTLearner`` (the phone's interpreter). Both draw their batches
through ``local_sgd``, so the two runtimes make the same steps.

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
    def set_weights(self, weights: list[np.ndarray]) -> None: ...

    @abstractmethod
    def get_weights(self) -> list[np.ndarray]: ...

    @abstractmethod
    def train_step(self, x: np.ndarray, y: np.ndarray, learning_rate: float) -> tuple[float, float]:
        """One SGD step on one batch: its mean loss and number of correct predictions,
        before the step."""

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
    ) -> ClientResult:
        """Local SGD from ``global_weights``; examples are reshuffled every epoch."""
        if self.batch_size is not None and batch_size != self.batch_size:
            raise ValueError(f"this model trains batches of {self.batch_size}, not {batch_size}")
        self.set_weights(global_weights)
        metrics = local_sgd(
            lambda xb, yb: self.train_step(xb, yb, learning_rate), x, y, epochs=epochs, batch_size=batch_size, seed=seed
        )
        return client_result(global_weights, self.get_weights(), len(y), metrics)
