"""The server round (TFF's aggregators and optimizers, compiled to MapReduce form)
against numpy and against TFF's own executor."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from edgefl import wire
from edgefl.models import model_spec


@pytest.fixture(scope="module")
def server():
    from coordinator.aggregation import FedAvgServer

    return FedAvgServer(model_spec("cnn", "digits"))


def _random_like(spec, rng, scale=1.0):
    return [rng.normal(scale=scale, size=s.shape).astype(np.float32) for s in spec]


def test_compiled_mean_equals_numpy_weighted_mean(server):
    rng = np.random.default_rng(0)
    deltas = [_random_like(server.spec, rng, 0.01) for _ in range(5)]
    counts = [144, 37, 200, 10, 99]
    weights = _random_like(server.spec, rng)

    output = server.next(server.initialize(), weights, zip(deltas, counts))

    total = sum(counts)
    for i, s in enumerate(server.spec):
        expected = sum(d[i].astype(np.float64) * n for d, n in zip(deltas, counts)) / total
        np.testing.assert_allclose(output.mean_delta[i], expected, rtol=1e-5, atol=1e-7, err_msg=s.name)
        # FedAvg: server SGD at learning rate 1.0 adds the mean delta to the weights.
        np.testing.assert_allclose(output.weights[i], weights[i] + expected, rtol=1e-5, atol=1e-6)


def _flat(value) -> list:
    """A TFF result's tensors in TFF's order (dict fields as declared, not sorted)."""
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _flat(v)]
    if isinstance(value, (list, tuple)):
        return [leaf for v in value for leaf in _flat(v)]
    if hasattr(value, "__attrs_attrs__"):
        return [leaf for a in value.__attrs_attrs__ for leaf in _flat(getattr(value, a.name))]
    return [np.asarray(value)]


def _assert_same(ours, theirs) -> None:
    for a, b in zip(ours, theirs, strict=True):
        if np.asarray(b).dtype.kind in "fc":
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        else:  # counters, flags, DP's event names
            assert np.asarray(a).tolist() == np.asarray(b).tolist()


# Noise-free DP here: the noise is a fresh random draw in each runtime; its presence and
# scale are tested apart.
SETTINGS = {
    "mean+sgd": dict(aggregator="mean", server_optimizer="sgd", server_lr=0.7),
    "robust+sgdm": dict(aggregator="robust", server_optimizer="sgdm", server_lr=0.5, server_momentum=0.9),
    "dp_fixed+adam": dict(aggregator="dp_fixed", server_optimizer="adam", server_lr=0.01, dp_noise_multiplier=0.0, dp_clip=2.0),
    "dp_adaptive+sgd": dict(aggregator="dp_adaptive", server_optimizer="sgd", dp_noise_multiplier=0.0, clients_per_round=4),
    "compressed+sgd": dict(aggregator="compressed", server_optimizer="sgd"),
}


def _tensor_encoding_decode(body: bytes, spec) -> list[np.ndarray]:
    """An 8-bit upload decoded by tensor_encoding's uniform quantization stage, the
    decoder of TFF's EncodedFactory (8-bit codes are the packed bytes themselves)."""
    from tensorflow_model_optimization.python.core.internal.tensor_encoding.stages.stages_impl import (
        UniformQuantizationEncodingStage,
    )

    from edgefl.compression import quantized_spec

    stage = UniformQuantizationEncodingStage(bits=8)
    arrays, _ = wire.decode(body, quantized_spec(spec, 8))
    decoded = []
    for i, s in enumerate(spec):
        encoded = {stage.ENCODED_VALUES_KEY: arrays[2 * i].astype(np.float32), stage.MIN_MAX_VALUES_KEY: arrays[2 * i + 1]}
        decoded.append(np.asarray(stage.decode(encoded, {stage.MAX_INT_VALUE_PARAMS_KEY: 255.0})).reshape(s.shape))
    return decoded


@pytest.mark.parametrize("name", SETTINGS)
def test_compiled_rounds_equal_tffs_executor(tff_runtime, name):
    """The same factory and optimizer, run by TFF's worker and compiled, over two rounds
    (so adaptive clip norms and optimizer state carry over): the same numbers."""
    from coordinator.aggregation import FedAvgServer, ServerSettings, build_round
    from edgefl.codecs import Codec

    spec = model_spec("cnn_small", "digits")
    settings = ServerSettings(**SETTINGS[name])
    server = FedAvgServer(spec, settings)
    initialize, next_round = build_round(spec, settings)
    rng = np.random.default_rng(2)
    weights = _random_like(spec, rng)
    tff_state = collections.OrderedDict(model=weights, **initialize())
    state = server.initialize()
    _assert_same(state, _flat(tff_state)[len(spec) :])

    for _ in range(2):
        deltas = [_random_like(spec, rng, scale) for scale in (0.1, 0.1, 3.0, 0.01)]  # one outlier
        counts = [5, 50, 500, 1]
        tff_deltas = deltas
        if settings.aggregator == "compressed":  # the same uploads, decoded by each side
            bodies = [Codec(8).encode([s.name for s in spec], d, {}, rng) for d in deltas]
            deltas = [Codec(8).decode(body, spec)[0] for body in bodies]
            tff_deltas = [_tensor_encoding_decode(body, spec) for body in bodies]
        compiled = server.next(state, weights, zip(deltas, counts))
        clients = [collections.OrderedDict(delta=d, weight=np.float32(n)) for d, n in zip(tff_deltas, counts)]
        tff_state, (tff_mean, tff_measurements) = next_round(tff_state, clients)
        _assert_same(compiled.mean_delta, tff_mean)
        # TFF's measurements (robust's norms and counts, DP's clip) are the round's, as TFF reports them.
        _assert_same(list(compiled.measurements.values()), [m for m in _flat(tff_measurements) if m.size == 1])
        assert bool(compiled.measurements) == (settings.aggregator in ("robust", "dp_adaptive"))  # dp_fixed: none
        _assert_same(compiled.weights, tff_state["model"])
        _assert_same(compiled.state, _flat(tff_state)[len(spec) :])
        state = server.state_from_bytes(server.state_to_bytes(compiled.state))  # as the store keeps it
        _assert_same(state, compiled.state)
        weights = compiled.weights


def test_server_learning_rate_scales_the_step():
    from coordinator.aggregation import FedAvgServer, ServerSettings

    spec = model_spec("cnn_small", "digits")
    half = FedAvgServer(spec, ServerSettings(server_lr=0.5))
    rng = np.random.default_rng(1)
    weights = _random_like(spec, rng)
    deltas = [_random_like(spec, rng) for _ in range(2)]
    output = half.next(half.initialize(), weights, zip(deltas, [1, 3]))
    for w, m, new in zip(weights, output.mean_delta, output.weights):
        np.testing.assert_allclose(new, w + 0.5 * m, rtol=1e-5, atol=1e-6)


def test_updates_are_consumed_one_at_a_time(server):
    """A cohort is folded as it is read: the round never holds two deltas at once."""
    rng = np.random.default_rng(3)
    weights = _random_like(server.spec, rng)
    live = []

    def updates():
        for n in range(6):
            live.append(n)
            yield _random_like(server.spec, rng, 0.01), 10 + n
            live.remove(n)

    server.next(server.initialize(), weights, updates())
    assert live == []


def test_state_round_trips_through_bytes(server):
    state = server.initialize()
    assert [s.name for s in server.state_spec] == ["optimizer/learning_rate"]
    restored = server.state_from_bytes(server.state_to_bytes(state))
    assert server.state_to_bytes(restored) == server.state_to_bytes(state)


def test_dp_noise_has_the_calibrated_scale():
    """Gaussian noise of stddev noise_multiplier x clip, over the clients per round the
    mean divides by; with the same inputs, every round draws afresh."""
    from coordinator.aggregation import FedAvgServer, ServerSettings

    spec = model_spec("cnn_small", "digits")
    server = FedAvgServer(spec, ServerSettings(aggregator="dp_fixed", dp_noise_multiplier=1.0, dp_clip=1.0, clients_per_round=4))
    rng = np.random.default_rng(3)
    weights = _random_like(spec, rng)
    deltas = [[np.full(s.shape, 1e-4, np.float32) for s in spec] for _ in range(4)]  # far inside the clip
    first, second = (server.next(server.initialize(), weights, zip(deltas, [1] * 4)) for _ in range(2))
    noise = np.concatenate([(m - 1e-4).ravel() for m in first.mean_delta])
    assert noise.std() == pytest.approx(1.0 * 1.0 / 4, rel=0.05) and abs(noise.mean()) < 0.01
    assert not np.allclose(first.mean_delta[0], second.mean_delta[0])


def test_tffs_secure_mean_compiles_and_its_secure_inputs_are_the_devices_quantization():
    """TFF's weighted mean with SecureSumFactory value and weight sums, compiled to
    MapReduce form: its ``work`` runs in-process, and the values it hands to the secure
    sums are, leaf for leaf, those the device's numpy client step computes
    (edgefl.secagg.quantize), with each clip count set alone so no two leaves can be
    mistaken for each other."""
    import tensorflow_federated as tff

    from coordinator.mapreduce import TensorFlowFunction
    from edgefl.secagg.quantize import SecureMeanLayout, secure_mean_inputs

    shapes = [(3, 2), (2,)]
    model_type = tff.types.to_type([tff.TensorType(np.float32, s) for s in shapes])
    factory = tff.aggregators.MeanFactory(
        value_sum_factory=tff.aggregators.SecureSumFactory(upper_bound_threshold=1.0, lower_bound_threshold=-1.0),
        weight_sum_factory=tff.aggregators.SecureSumFactory(upper_bound_threshold=1000.0, lower_bound_threshold=0.0),
    )
    process = factory.create(model_type, tff.TensorType(np.float32))
    state_type = tff.FederatedType(process.initialize.type_signature.result.member, tff.SERVER)
    client_type = tff.FederatedType(tff.StructType([("delta", model_type), ("weight", tff.TensorType(np.float32))]), tff.CLIENTS)

    @tff.federated_computation(state_type, client_type)
    def next_round(state, clients):
        out = process.next(state, clients.delta, clients.weight)
        return out.state, tff.federated_zip((out.result, out.measurements))

    form = tff.backends.mapreduce.get_map_reduce_form_for_computation(next_round)
    layout = SecureMeanLayout((("a", 2), ("b", 6)))  # as checkpoints order tensors: by name
    assert form.secure_sum_bitwidth() == (1, 1, (32, 32), 1, 1, 32, 1, 1)
    assert tuple(b for x in form.secure_sum_bitwidth() for b in (x if isinstance(x, tuple) else (x,))) == layout.bitwidths
    initialize = tff.backends.mapreduce.get_state_initialization_computation(
        tff.federated_computation(lambda: process.initialize())
    )
    broadcast = TensorFlowFunction(form.prepare)(*TensorFlowFunction(initialize)())
    work = TensorFlowFunction(form.work)
    rng = np.random.default_rng(3)
    seen = set()
    # nothing clipped; value above (and weight above); value below; weight below
    for weight, scale in ((2.0, 0.1), (5000.0, 0.01), (2.0, -3.0), (-1.0, 0.1)):
        delta = [(np.sign(scale) * np.abs(rng.normal(0, abs(scale), s))).astype(np.float32) for s in shapes]
        out = [np.asarray(o) for o in work(*delta, np.float32(weight), *broadcast)]
        ours = layout.leaves_in(secure_mean_inputs(["b", "a"], delta, weight, 1.0, 1000.0), ["b", "a"])
        assert len(out) == len(ours) == len(layout.sizes)
        for got, expected in zip(out, ours):
            np.testing.assert_array_equal(got.ravel(), np.asarray(expected).ravel())
        seen.add(tuple(int(x) for x in (*out[4:6], *out[7:9])))
    assert seen == {(0, 0, 0, 0), (1, 0, 1, 0), (0, 1, 0, 0), (0, 0, 0, 1)}  # each count was set alone


def test_a_secure_round_equals_tffs_executor_on_the_same_inputs(tff_runtime):
    """TFF's executor runs the secure weighted mean (simulating its secure sums) on four
    clients' deltas; the coordinator gets the same sums from SecAgg+ between four
    devices, over the devices' own quantization, and its compiled update gives the same
    weights, state and clip counts, over two rounds."""
    from coordinator.aggregation import FedAvgServer, ServerSettings, build_round
    from edgefl.secagg import packing
    from edgefl.secagg import protocol as secagg
    from edgefl.secagg.quantize import flatten, secure_mean_inputs

    spec = model_spec("cnn_small", "digits")
    names = [s.name for s in spec]
    settings = ServerSettings(aggregator="secure", secure_value_bound=2.0, secure_weight_bound=1000.0)
    server = FedAvgServer(spec, settings)
    initialize, next_round = build_round(spec, settings)
    rng = np.random.default_rng(4)
    weights = _random_like(spec, rng)
    tff_state = collections.OrderedDict(model=weights, **initialize())
    state = server.initialize()
    for round_id in (1, 2):
        deltas = [_random_like(spec, rng, scale) for scale in (0.001, 0.002, 0.02, 0.0005)]  # the third is clipped
        counts = [5, 50, 500, 1]
        inputs = {i: flatten(secure_mean_inputs(names, d, n, 2.0, 1000.0)) for i, (d, n) in enumerate(zip(deltas, counts))}
        size = next(iter(inputs.values())).size
        params = secagg.RoundParams(round_id, 4, size, packing.sum_bits(32, 4), degree=3, threshold=2, graph_seed=round_id)
        secrets = {i: secagg.advertise(i) for i in inputs}
        keys = {i: s.public for i, s in secrets.items()}
        sealed = {i: secagg.share_keys(params, secrets[i], keys) for i in inputs}
        shared = set(inputs)
        masked = {i: secagg.masked_input(params, secrets[i], keys, shared, x) for i, x in inputs.items()}
        revealed = {
            i: secagg.unmask(params, secrets[i], keys, {u: c[i] for u, c in sealed.items() if i in c}, shared, set(masked))
            for i in inputs
        }
        total = secagg.aggregate(params, keys, shared, masked, revealed)
        assert np.array_equal(total, sum(inputs.values()))  # exactly the plain integer sum
        compiled = server.finish_secure(server.begin(state, weights), total, devices=4)
        clients = [collections.OrderedDict(delta=d, weight=np.float32(n)) for d, n in zip(deltas, counts)]
        tff_state, (tff_mean, tff_measurements) = next_round(tff_state, clients)
        _assert_same(compiled.mean_delta, tff_mean)
        _assert_same(compiled.weights, tff_state["model"])
        _assert_same(compiled.state, _flat(tff_state)[len(spec) :])
        _assert_same(list(compiled.measurements.values()), [m for m in _flat(tff_measurements) if m.size == 1])
        assert compiled.measurements["mean_value/secure_upper_clipped_count"] == 1
        state, weights = compiled.state, compiled.weights
