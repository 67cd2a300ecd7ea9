"""The TFF aggregator and server optimizer against plain numpy."""
from __future__ import annotations

import numpy as np
import pytest

from edgefl.models import model_spec


@pytest.fixture(scope="module")
def server():
    from coordinator.aggregation import FedAvgServer

    return FedAvgServer(model_spec("cnn"))


def _random_like(spec, rng, scale=1.0):
    return [rng.normal(scale=scale, size=s.shape).astype(np.float32) for s in spec]


def test_tff_mean_equals_numpy_weighted_mean(server, tff_runtime):
    rng = np.random.default_rng(0)
    deltas = [_random_like(server.spec, rng, 0.01) for _ in range(5)]
    counts = [144, 37, 200, 10, 99]
    weights = _random_like(server.spec, rng)

    output = server.next(server.initialize(), weights, deltas, counts)

    total = sum(counts)
    for i, s in enumerate(server.spec):
        expected = sum(d[i].astype(np.float64) * n for d, n in zip(deltas, counts)) / total
        np.testing.assert_allclose(output.mean_delta[i], expected, rtol=1e-5, atol=1e-7, err_msg=s.name)
        # FedAvg: server SGD at learning rate 1.0 adds the mean delta to the weights.
        np.testing.assert_allclose(output.weights[i], weights[i] + expected, rtol=1e-5, atol=1e-6)


def test_server_learning_rate_scales_the_step(tff_runtime):
    from coordinator.aggregation import FedAvgServer

    spec = model_spec("cnn_small")
    half = FedAvgServer(spec, server_lr=0.5)
    rng = np.random.default_rng(1)
    weights = _random_like(spec, rng)
    deltas = [_random_like(spec, rng) for _ in range(2)]
    output = half.next(half.initialize(), weights, deltas, [1, 3])
    for w, m, new in zip(weights, output.mean_delta, output.weights):
        np.testing.assert_allclose(new, w + 0.5 * m, rtol=1e-5, atol=1e-6)


def test_state_round_trips_through_bytes(server, tff_runtime):
    state = server.initialize()
    restored = server.state_from_bytes(server.state_to_bytes(state))
    assert server.state_to_bytes(restored) == server.state_to_bytes(state)
