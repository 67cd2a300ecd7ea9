"""Pace steering: a fleet's devices not held in the lobby are spread over time, so that
a thousand of them check in at the coordinator's chosen rate, not all at once."""

from __future__ import annotations

import random

import numpy as np
import pytest

from coordinator.pace import Population, steered_retry_s
from tests.api_helpers import build_coordinator, register


def test_a_small_fleet_keeps_the_rounds_own_short_waits():
    rng = random.Random(0)
    assert all(steered_retry_s(0.1, outside=6, checkins_per_s=100, rng=rng) == 0.1 for _ in range(100))
    assert all(0.1 <= steered_retry_s(0.1, outside=10, checkins_per_s=100, rng=rng) <= 0.15 for _ in range(100))


def test_a_large_fleet_is_spread_to_the_chosen_rate():
    """Each of 10,000 devices comes back after its own draw; counted over the window they
    fill, the check-ins arrive at about the chosen rate, with no second that takes a herd."""
    rng = random.Random(0)
    outside, rate = 10_000, 200.0
    retries = np.array([steered_retry_s(0.1, outside=outside, checkins_per_s=rate, rng=rng) for _ in range(outside)])
    assert retries.mean() == pytest.approx(outside / rate, rel=0.02)
    per_second, _ = np.histogram(retries, bins=np.arange(np.ceil(retries.min()), np.floor(retries.max())))
    assert per_second.mean() == pytest.approx(rate, rel=0.1) and per_second.max() < 1.5 * rate
    # A longer wait the round asks for (a full cohort's) is kept.
    assert steered_retry_s(500.0, outside=outside, checkins_per_s=rate, rng=rng) == 500.0


def test_the_population_is_counted_at_most_every_few_seconds():
    class Db:
        calls = 0

        def __init__(self, count):
            self.count = count

        def execute(self, sql):
            Db.calls += 1
            return type("Rows", (), {"fetchone": lambda _: (self.count,)})()

    clock = [0.0]
    population = Population(ttl_s=5, clock=lambda: clock[0])
    assert population.count(Db(10)) == 10
    clock[0] = 4.9
    assert population.count(Db(20)) == 10 and Db.calls == 1
    clock[0] = 5.0
    assert population.count(Db(20)) == 20 and Db.calls == 2


def test_a_coordinator_steers_a_large_registered_fleet(tmp_path, small_parts):
    """Between rounds a device not held is told to come back after about
    (devices outside the lobby) / (check-ins per second)."""
    from edgefl.config import RunConfig

    config = RunConfig(model="cnn_small", rounds=1, target_reports=2, min_reports=1, round_timeout_s=60)
    app, _driver = build_coordinator(tmp_path / "instance", small_parts, config, CHECKIN_RATE=10.0)
    client = app.test_client()
    devices = [register(client) for _ in range(40)]  # no round open yet: every check-in waits
    waits = [client.post("/v1/checkin", headers=headers).json for headers in devices]
    assert {w["reason"] for w in waits} == {"between_rounds"}
    retries = np.array([w["retry_after"] for w in waits])
    assert retries.min() >= 0.5 * 40 / 10 and retries.max() <= 1.5 * 40 / 10
    assert retries.mean() == pytest.approx(40 / 10, rel=0.25)
