"""The server round (TFF's MeanFactory and SGD, compiled to MapReduce form) against
numpy and against TFF's own executor."""
from __future__ import annotations

import collections

import numpy as np
import pytest

from edgefl.models import model_spec


@pytest.fixture(scope="module")
def server():
    from coordinator.aggregation import FedAvgServer

    return FedAvgServer(model_spec("cnn"))


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


def test_compiled_round_equals_tffs_executor(tff_runtime):
    """The same federated computation, run by TFF's worker and compiled: same numbers."""
    from coordinator.aggregation import FedAvgServer, build_round

    spec = model_spec("cnn_small")
    server = FedAvgServer(spec, server_lr=0.7)
    _initialize, next_round = build_round(spec, "sgd", 0.7)
    rng = np.random.default_rng(2)
    weights = _random_like(spec, rng)
    deltas = [_random_like(spec, rng, 0.1) for _ in range(4)]
    counts = [5, 50, 500, 1]
    state = server.initialize()

    compiled = server.next(state, weights, zip(deltas, counts))
    tff_state = collections.OrderedDict(
        model=weights, aggregator=collections.OrderedDict(value_sum_process=(), weight_sum_process=()),
        optimizer=collections.OrderedDict(learning_rate=state[0]),
    )
    clients = [collections.OrderedDict(delta=d, weight=np.float32(n)) for d, n in zip(deltas, counts)]
    tff_new_state, tff_mean = next_round(tff_state, clients)

    for ours, theirs in zip(compiled.mean_delta, tff_mean):
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-7)
    for ours, theirs in zip(compiled.weights, tff_new_state["model"]):
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-7)
    assert compiled.state[0] == pytest.approx(tff_new_state["optimizer"]["learning_rate"])


def test_server_learning_rate_scales_the_step():
    from coordinator.aggregation import FedAvgServer

    spec = model_spec("cnn_small")
    half = FedAvgServer(spec, server_lr=0.5)
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
