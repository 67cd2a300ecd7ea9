"""The server side of FedAvg, from TFF's building blocks.

The clients' deltas are combined by a ``tff.aggregators`` process (``MeanFactory``,
weighted by example counts) and the model moves by a ``tff.learning.optimizers`` step
on the negated mean delta (SGD at learning rate 1.0 is plain FedAvg). Both are written
as one TFF round computation, the shape TFF's ``simple_fedavg`` gives its server, and
compiled to MapReduce form (``coordinator.mapreduce``): each update is folded into an
accumulator on its own, so a cohort costs one accumulator of memory, and the round's
arithmetic is exactly the TFF factory's. ``next`` is a pure function of (state,
weights, updates): the round driver owns I/O and persistence, and the state
round-trips through bytes so it can be stored beside each checkpoint.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, replace
from typing import Iterable, Sequence

import numpy as np

from coordinator.mapreduce import MapReduceRound
from edgefl import wire
from edgefl.wire import TensorSpec

ServerState = tuple  # the aggregator's and the optimizer's state tensors, in TFF's order


@dataclass(frozen=True)
class RoundFold:
    """A round in progress: what it started from and the sum of what has arrived.

    The accumulator is one model's worth of tensors however many updates it holds, so
    the driver can fold each update as it arrives and close a round in milliseconds.
    """

    round_state: tuple
    broadcast: tuple
    accumulator: tuple
    updates: int


@dataclass(frozen=True)
class ServerOutput:
    state: ServerState
    weights: list[np.ndarray]
    mean_delta: list[np.ndarray]


def build_round(spec: Sequence[TensorSpec], server_optimizer: str, server_lr: float):
    """The federated ``initialize`` and round computations, before compilation.

    The round takes ``<model, aggregator, optimizer>@SERVER`` and each client's
    ``<delta, weight>`` and returns the next state and the mean delta.
    """
    import tensorflow as tf
    import tensorflow_federated as tff

    if server_optimizer != "sgd":
        raise ValueError(f"unknown server optimizer {server_optimizer!r}")
    model_type = tff.types.to_type([tff.TensorType(np.float32, s.shape) for s in spec])  # a Python list
    aggregator = tff.aggregators.MeanFactory().create(model_type, tff.TensorType(np.float32))
    optimizer = tff.learning.optimizers.build_sgdm(learning_rate=server_lr)

    @tff.tensorflow.computation
    def optimizer_initialize():
        return optimizer.initialize([tf.TensorSpec(s.shape, tf.float32) for s in spec])

    @tff.tensorflow.computation(optimizer_initialize.type_signature.result, model_type, model_type)
    def optimizer_next(state, weights, mean_delta):
        return optimizer.next(state, weights, [tf.negative(m) for m in mean_delta])

    @tff.federated_computation
    def initialize():
        return tff.federated_zip(
            collections.OrderedDict(
                aggregator=aggregator.initialize(),
                optimizer=tff.federated_eval(optimizer_initialize, tff.SERVER),
            )
        )

    state_type = tff.FederatedType(
        tff.StructType(
            [
                ("model", model_type),
                ("aggregator", aggregator.initialize.type_signature.result.member),
                ("optimizer", optimizer_initialize.type_signature.result),
            ]
        ),
        tff.SERVER,
    )
    client_type = tff.FederatedType(
        tff.StructType([("delta", model_type), ("weight", tff.TensorType(np.float32))]), tff.CLIENTS
    )

    @tff.federated_computation(state_type, client_type)
    def next_round(state, clients):
        aggregate = aggregator.next(state.aggregator, clients.delta, clients.weight)
        optimizer_state, model = tff.federated_map(optimizer_next, (state.optimizer, state.model, aggregate.result))
        new_state = tff.federated_zip(
            collections.OrderedDict(model=model, aggregator=aggregate.state, optimizer=optimizer_state)
        )
        return new_state, aggregate.result

    return initialize, next_round


class FedAvgServer:
    """FedAvg's server for one model's weights, compiled once (about a second)."""

    def __init__(self, spec: Sequence[TensorSpec], *, server_optimizer: str = "sgd", server_lr: float = 1.0):
        self.spec = tuple(spec)
        self.round = MapReduceRound(*build_round(self.spec, server_optimizer, server_lr))
        self.state_spec = wire.spec_of(
            [leaf.path for leaf in self.round.initialize.results],
            [np.zeros(leaf.shape, leaf.dtype) for leaf in self.round.initialize.results],
        )

    def initialize(self) -> ServerState:
        return tuple(np.asarray(x) for x in self.round.initialize())

    def begin(self, state: ServerState, weights: Sequence[np.ndarray]) -> "RoundFold":
        """A round's fold over no updates yet, from the model and the server state."""
        round_state = (*weights, *state)
        return RoundFold(round_state, tuple(self.round.prepare(*round_state)), tuple(self.round.zero()), 0)

    def fold(self, fold: "RoundFold", delta: Sequence[np.ndarray], num_examples: int) -> "RoundFold":
        """``fold`` with one more client's update in it (TFF's work, then accumulate)."""
        work = self.round.client_work(fold.broadcast, [*delta, np.float32(num_examples)])
        return replace(fold, accumulator=tuple(self.round.accumulate(*fold.accumulator, *work)), updates=fold.updates + 1)

    def finish(self, fold: "RoundFold") -> ServerOutput:
        """TFF's report and update: the next weights, server state and mean delta."""
        new_state, mean_delta = self.round.finish(fold.round_state, fold.accumulator)
        n = len(self.spec)
        return ServerOutput(tuple(new_state[n:]), new_state[:n], mean_delta)

    def next(
        self,
        state: ServerState,
        weights: Sequence[np.ndarray],
        updates: Iterable[tuple[Sequence[np.ndarray], int]],
    ) -> ServerOutput:
        """One whole server round over ``(delta, num_examples)`` pairs, taken one at a time."""
        fold = self.begin(state, weights)
        for delta, num_examples in updates:
            fold = self.fold(fold, delta, num_examples)
        return self.finish(fold)

    def state_to_bytes(self, state: ServerState) -> bytes:
        return wire.encode([s.name for s in self.state_spec], state)

    def state_from_bytes(self, data: bytes) -> ServerState:
        arrays, _ = wire.decode(data, self.state_spec)
        return tuple(arrays)
