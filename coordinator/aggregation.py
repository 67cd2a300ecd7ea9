"""The server side of FedAvg, from TFF's building blocks.

The clients' deltas are combined by a ``tff.aggregators`` process chosen by the run's
configuration, composed as TFF composes it (``aggregator_factory``), and the model
moves by a ``tff.learning.optimizers`` step on the negated aggregate (SGD at learning
rate 1.0 is plain FedAvg; momentum gives FedAvgM, Adam FedAdam). Both are written
as one TFF round computation, the shape TFF's ``simple_fedavg`` gives its server, and
compiled to MapReduce form (``coordinator.mapreduce``): each update is folded into an
accumulator on its own, so a cohort costs one accumulator of memory, and the round's
arithmetic is exactly the TFF factory's. ``next`` is a pure function of (state,
weights, updates): the round driver owns I/O and persistence, and the state
round-trips through bytes so it can be stored beside each checkpoint.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields, replace

import numpy as np

from coordinator.mapreduce import MapReduceRound
from edgefl import wire
from edgefl.secagg.crypto import SecAggError
from edgefl.secagg.quantize import SecureMeanLayout, secure_mean_inputs
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
    measurements: dict[str, float]  # the aggregator's own, by path (e.g. robust's clipping/clipping_norm)


@dataclass(frozen=True, kw_only=True)
class ServerSettings:
    """What shapes the server's round: the run configuration's server fields."""

    aggregator: str = "mean"
    server_optimizer: str = "sgd"
    server_lr: float = 1.0
    server_momentum: float = 0.9
    dp_noise_multiplier: float = 1.0
    dp_clip: float = 0.1
    secure_value_bound: float = 1000.0
    secure_weight_bound: float = 100_000.0
    clients_per_round: int = 10  # what DP's noise is calibrated for: the target reports

    @classmethod
    def of(cls, config) -> ServerSettings:
        """The run configuration's fields of the same names (declared once, in
        ``edgefl.config``), and the clients per round DP calibrates for: the target."""
        shared = {f.name for f in fields(cls)} & {f.name for f in fields(config)}
        return cls(**{name: getattr(config, name) for name in shared}, clients_per_round=config.target_reports)


def aggregator_factory(settings: ServerSettings):
    """The ``tff.aggregators`` factory, and whether it is weighted by example counts.

    ``robust`` composes ``tff.aggregators`` as TFF's ``robust_aggregator`` does: adaptive
    zeroing of outliers around adaptive L2 clipping (at the 0.8 quantile of norms)
    around a weighted mean. TFF's zeroing tracks the 0.98 quantile of norms, which
    assumes outliers are rarer than 2%: with one device in ten sending 100x updates,
    the estimate climbed to the attackers' norm and let them through (only clipped), so
    here zeroing tracks the 0.8 quantile too.

    The DP aggregators average unweighted, as central DP must bound every client's
    influence alike: ``dp_adaptive`` is TFF's ``dp_aggregator`` (zeroing, then Gaussian
    noise with the clip adapted to a quantile of norms), ``dp_fixed`` a fixed clip.

    ``compressed`` is the weighted mean of updates the devices quantized: TFF's
    ``EncodedFactory`` would quantize inside the computation, at TFF's clients, but
    here the clients are devices without TFF, so they encode (``edgefl.compression``,
    the same arithmetic) and the coordinator decodes each update before folding it.

    ``secure`` is the weighted mean with both sums by ``SecureSumFactory`` over fixed
    ranges (each entry of an update times its example count within
    +-``secure_value_bound``, the example count within [0, ``secure_weight_bound``]):
    TFF's client step (clip, quantize to 32 bits) runs on the devices
    (``edgefl.secagg.quantize``), and the sums by SecAgg+ (``edgefl.secagg``).
    """
    import tensorflow_federated as tff

    s = settings
    if s.aggregator in ("mean", "compressed"):  # compressed updates arrive quantized, and are decoded before this
        return tff.aggregators.MeanFactory(), True
    if s.aggregator == "secure":
        secure_sum = tff.aggregators.SecureSumFactory
        return tff.aggregators.MeanFactory(
            value_sum_factory=secure_sum(upper_bound_threshold=s.secure_value_bound, lower_bound_threshold=-s.secure_value_bound),
            weight_sum_factory=secure_sum(upper_bound_threshold=s.secure_weight_bound, lower_bound_threshold=0.0),
        ), True
    if s.aggregator == "robust":
        return _robust(tff), True
    if s.aggregator == "dp_adaptive":
        return tff.learning.dp_aggregator(s.dp_noise_multiplier, s.clients_per_round, zeroing=True), False
    if s.aggregator == "dp_fixed":
        return tff.aggregators.DifferentiallyPrivateFactory.gaussian_fixed(
            s.dp_noise_multiplier, s.clients_per_round, s.dp_clip
        ), False
    raise ValueError(f"unknown aggregator {s.aggregator!r}")


def _robust(tff):
    def norm(initial: float, quantile: float, learning_rate: float, **scaling):
        return tff.aggregators.PrivateQuantileEstimationProcess.no_noise(
            initial_estimate=initial, target_quantile=quantile, learning_rate=learning_rate, **scaling
        )

    clipped = tff.aggregators.clipping_factory(norm(1.0, 0.8, 0.2), tff.aggregators.MeanFactory())
    return tff.aggregators.zeroing_factory(norm(10.0, 0.8, math.log(10.0), multiplier=2.0, increment=1.0), clipped)


def server_optimizer(settings: ServerSettings):
    import tensorflow_federated as tff

    s = settings
    if s.server_optimizer == "sgd":
        return tff.learning.optimizers.build_sgdm(learning_rate=s.server_lr)
    if s.server_optimizer == "sgdm":
        return tff.learning.optimizers.build_sgdm(learning_rate=s.server_lr, momentum=s.server_momentum)
    if s.server_optimizer == "adam":
        return tff.learning.optimizers.build_adam(learning_rate=s.server_lr)
    raise ValueError(f"unknown server optimizer {s.server_optimizer!r}")


def build_round(spec: Sequence[TensorSpec], settings: ServerSettings = ServerSettings()):
    """The federated ``initialize`` and round computations, before compilation.

    The round takes ``<model, aggregator, optimizer>@SERVER`` and each client's
    ``<delta, weight>`` and returns the next state, the aggregate delta (an
    unweighted aggregator ignores the weights) and the aggregator's measurements
    (clip and zeroing norms, zeroed counts, DP's clip), which become round metrics.
    """
    import tensorflow as tf
    import tensorflow_federated as tff

    model_type = tff.types.to_type([tff.TensorType(np.float32, s.shape) for s in spec])  # a Python list
    factory, weighted = aggregator_factory(settings)
    aggregator = factory.create(model_type, tff.TensorType(np.float32)) if weighted else factory.create(model_type)
    optimizer = server_optimizer(settings)

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
    client_type = tff.FederatedType(tff.StructType([("delta", model_type), ("weight", tff.TensorType(np.float32))]), tff.CLIENTS)

    @tff.federated_computation(state_type, client_type)
    def next_round(state, clients):
        if weighted:
            aggregate = aggregator.next(state.aggregator, clients.delta, clients.weight)
        else:
            aggregate = aggregator.next(state.aggregator, clients.delta)
        optimizer_state, model = tff.federated_map(optimizer_next, (state.optimizer, state.model, aggregate.result))
        new_state = tff.federated_zip(collections.OrderedDict(model=model, aggregator=aggregate.state, optimizer=optimizer_state))
        return new_state, tff.federated_zip((aggregate.result, aggregate.measurements))  # MapReduce form: (state, output)

    return initialize, next_round


class FedAvgServer:
    """FedAvg's server for one model's weights, compiled once (about a second)."""

    def __init__(self, spec: Sequence[TensorSpec], settings: ServerSettings = ServerSettings()):
        self.spec = tuple(spec)
        self.settings = settings
        self.round = MapReduceRound(*build_round(self.spec, settings))
        self.secure_layout = _checked_secure_layout(self, settings) if self.secure else None
        # DP's state names its accounting event in string tensors and flags its first
        # round in a bool: strings travel in the blob's metadata, bools as integers.
        self._leaves = self.round.initialize.results
        self._strings = {leaf.path for leaf in self._leaves if leaf.dtype.kind in "SUO"}
        self.state_spec = wire.spec_of(
            [leaf.path for leaf in self._leaves if leaf.path not in self._strings],
            [
                np.zeros(leaf.shape, np.int32 if leaf.dtype == bool else leaf.dtype)
                for leaf in self._leaves
                if leaf.path not in self._strings
            ],
        )

    @property
    def secure(self) -> bool:
        """Whether the round's sums are taken by SecAgg+ between the devices."""
        return bool(self.round.secure_bitwidths)

    def initialize(self) -> ServerState:
        return tuple(np.asarray(x) for x in self.round.initialize())

    def begin(self, state: ServerState, weights: Sequence[np.ndarray]) -> RoundFold:
        """A round's fold over no updates yet, from the model and the server state."""
        round_state = (*weights, *state)
        return RoundFold(round_state, tuple(self.round.prepare(*round_state)), tuple(self.round.zero()), 0)

    def fold(self, fold: RoundFold, delta: Sequence[np.ndarray], num_examples: int) -> RoundFold:
        """``fold`` with one more client's update in it (TFF's work, then accumulate)."""
        if self.secure:
            raise TypeError("a secure round's updates are summed by SecAgg+, not folded one by one")
        work = self.round.client_work(fold.broadcast, [*delta, np.float32(num_examples)])
        return replace(fold, accumulator=tuple(self.round.accumulate(*fold.accumulator, *work)), updates=fold.updates + 1)

    def finish_secure(self, fold: RoundFold, total: np.ndarray, devices: int) -> ServerOutput:
        """``finish`` given a secure round's sum (one vector in ``secure_layout``'s order)
        of ``devices`` inputs. The masks hide each input, but not what their sum can be:
        SecAggError if its summands do not count ``devices``, or any entry is beyond
        ``devices`` times its leaf's largest value (say, a device masked a code above
        2^32 - 1)."""
        import tensorflow as tf

        layout = self.secure_layout
        leaves = layout.split(total)
        if [int(leaves[0][0]), int(leaves[1][0])] != [devices, devices]:
            raise SecAggError(f"the secure sum's summands count {int(leaves[0][0])} devices, not the {devices} it holds")
        for leaf, bits in zip(leaves, layout.bitwidths):
            if leaf.size and int(leaf.max()) > devices * (2**bits - 1):
                raise SecAggError(f"the secure sum is beyond what {devices} devices' {bits}-bit values can give")
        try:
            return self.finish(fold, layout.leaves_in(leaves, [s.name for s in self.spec]))
        except tf.errors.InvalidArgumentError:
            raise SecAggError("TFF's update refused the secure sum") from None

    def finish(self, fold: RoundFold, secure_sums: Sequence[np.ndarray] = ()) -> ServerOutput:
        """TFF's report and update (given a secure round's sums, leaf by leaf): the next
        weights, server state and mean delta."""
        new_state, output = self.round.finish(fold.round_state, fold.accumulator, secure_sums)
        n = len(self.spec)
        measurements = {
            leaf.path.split("/", 2)[-1]: float(value)
            for leaf, value in zip(self.round.outputs[n:], output[n:])
            if value.size == 1
        }
        return ServerOutput(tuple(new_state[n:]), new_state[:n], output[:n], measurements)

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
        named = dict(zip((leaf.path for leaf in self._leaves), state))
        strings = {path: bytes(np.asarray(named.pop(path)).item()).decode() for path in self._strings}
        arrays = [np.asarray(value, np.int32) if value.dtype == bool else value for value in named.values()]
        return wire.encode(list(named), arrays, strings)

    def state_from_bytes(self, data: bytes) -> ServerState:
        arrays, metadata = wire.decode(data, self.state_spec)
        numeric = iter(arrays)
        return tuple(
            np.asarray(metadata[leaf.path].encode(), dtype=object)
            if leaf.path in self._strings
            else np.asarray(next(numeric), dtype=leaf.dtype)
            for leaf in self._leaves
        )


def _checked_secure_layout(server: FedAvgServer, settings: ServerSettings) -> SecureMeanLayout:
    """The layout of what devices hand to the secure sums, checked against TFF's
    compiled ``work`` on probe updates (each clip count set alone, so no two leaves can
    be mistaken for each other), leaf by leaf and bit for bit: a TFF whose client step differs from
    the devices' (``edgefl.secagg.quantize``) stops the coordinator here."""
    layout = SecureMeanLayout.of(server.spec)
    if server.round.secure_bitwidths != layout.bitwidths:
        raise TypeError(f"TFF's secure sums have bitwidths {server.round.secure_bitwidths}, the devices' {layout.bitwidths}")
    fold = server.begin(server.initialize(), [np.zeros(s.shape, np.float32) for s in server.spec])
    bound = settings.secure_value_bound
    rng = np.random.default_rng(0)
    # (weight, sign and scale of the weighted entries): nothing clipped; the value and
    # the weight clipped above; the value clipped below; the weight clipped below
    probes = ((3.0, 0.1), (2 * settings.secure_weight_bound, 3.0), (3.0, -3.0), (-1.0, 0.1))
    for weight, scale in probes:
        magnitude = bound * abs(scale) / abs(weight)
        delta = [(np.sign(scale) * np.abs(rng.normal(0, magnitude, s.shape))).astype(np.float32) for s in server.spec]
        tffs = server.round.client_work(fold.broadcast, [*delta, np.float32(weight)])[server.round.folded :]
        names = [s.name for s in server.spec]
        devices = layout.leaves_in(secure_mean_inputs(names, delta, weight, bound, settings.secure_weight_bound), names)
        for i, (theirs, ours) in enumerate(zip(tffs, devices)):
            if not np.array_equal(np.asarray(theirs).ravel(), np.asarray(ours).ravel()):
                raise TypeError(f"the devices' secure-sum input {i} differs from TFF's compiled client step")
    return layout
