"""The server side of FedAvg, from TFF's building blocks.

The clients' deltas are combined by a ``tff.aggregators`` process (``MeanFactory``,
weighted by example counts) and the model moves by a ``tff.learning.optimizers`` step
on the negated mean delta (SGD at learning rate 1.0 is plain FedAvg). Like TFF's own
processes, ``next`` is a pure function of (state, weights, client values): the round
driver owns I/O and persistence, and the state round-trips through bytes so it can be
stored beside each checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from edgefl import wire
from edgefl.wire import TensorSpec


@dataclass(frozen=True)
class ServerState:
    aggregator: Any
    optimizer: Any


@dataclass(frozen=True)
class ServerOutput:
    state: ServerState
    weights: list[np.ndarray]
    mean_delta: list[np.ndarray]


class FedAvgServer:
    """A TFF aggregation process and server optimizer built for one model's weights.

    Building traces TFF computations (about a second), so one instance serves a run.
    Executing them needs a TFF context (see ``coordinator.tff_runtime``).
    """

    def __init__(self, spec: Sequence[TensorSpec], *, server_optimizer: str = "sgd", server_lr: float = 1.0):
        import tensorflow_federated as tff

        if server_optimizer != "sgd":
            raise ValueError(f"unknown server optimizer {server_optimizer!r}")
        self.spec = tuple(spec)
        value_type = tff.types.to_type([tff.TensorType(np.float32, s.shape) for s in self.spec])
        self.aggregator = tff.aggregators.MeanFactory().create(value_type, tff.TensorType(np.float32))
        self.optimizer = tff.learning.optimizers.build_sgdm(learning_rate=server_lr)

    def initialize(self) -> ServerState:
        import tensorflow as tf

        specs = [tf.TensorSpec(s.shape, tf.float32) for s in self.spec]
        return ServerState(self.aggregator.initialize(), self.optimizer.initialize(specs))

    def next(
        self,
        state: ServerState,
        weights: Sequence[np.ndarray],
        deltas: Sequence[Sequence[np.ndarray]],
        num_examples: Sequence[int],
    ) -> ServerOutput:
        """One server round: weighted mean of ``deltas``, then an optimizer step."""
        output = self.aggregator.next(
            state.aggregator, [list(d) for d in deltas], [float(n) for n in num_examples]
        )
        import tensorflow as tf

        mean_delta = [np.asarray(m, dtype=np.float32) for m in output.result]
        optimizer_state, new_weights = self.optimizer.next(
            state.optimizer,
            [tf.constant(w, tf.float32) for w in weights],
            [tf.constant(-m, tf.float32) for m in mean_delta],
        )
        new_weights = [np.asarray(w, dtype=np.float32) for w in new_weights]
        return ServerOutput(ServerState(output.state, optimizer_state), new_weights, mean_delta)

    def state_to_bytes(self, state: ServerState) -> bytes:
        import tensorflow as tf

        leaves = [np.asarray(x, dtype=np.float32) for x in tf.nest.flatten((state.aggregator, state.optimizer))]
        return wire.encode([f"state/{i:04d}" for i in range(len(leaves))], leaves)

    def state_from_bytes(self, data: bytes) -> ServerState:
        """Rebuild a stored state on the structure of a fresh one."""
        import tensorflow as tf

        fresh = self.initialize()
        structure = (fresh.aggregator, fresh.optimizer)
        leaves = tf.nest.flatten(structure)
        spec = [TensorSpec(f"state/{i:04d}", np.shape(x)) for i, x in enumerate(leaves)]
        arrays, _ = wire.decode(data, spec)
        restored = [np.asarray(a, dtype=np.asarray(x).dtype) for a, x in zip(arrays, leaves)]
        aggregator, optimizer = tf.nest.pack_sequence_as(structure, restored)
        return ServerState(aggregator, optimizer)

