"""Two round drivers over one store (as with two coordinator processes): only the lease
holder drives, and one that froze past its lease's expiry commits nothing when it wakes."""

from __future__ import annotations

import math

from coordinator import leases
from coordinator.driver import RoundDriver
from tests.api_helpers import register, take_task, update_body, upload


def test_one_driver_at_a_time_and_a_frozen_one_commits_nothing(coordinator):
    app, first = coordinator
    store, client = app.extensions["edgefl.store"], app.test_client()
    second = RoundDriver(store, first.config, clock=first.clock, learner=first.learner, server=first.server)

    assert first.step()  # takes the lease, opens round 1
    before = store.snapshot()
    assert not second.step()
    assert store.snapshot() == before

    devices = [register(client) for _ in range(2)]
    for seed, headers in enumerate(devices):
        assert upload(client, headers, take_task(client, headers)["round_id"], update_body(seed=seed)).status_code == 202

    # The first driver freezes (as a stopped process would) believing it holds the lease;
    # the lease runs out and the second takes over and commits round 1.
    first._lease_checked_until = math.inf
    first.clock.now += leases.LEASE_S + 1
    assert second.step()
    after_takeover = store.snapshot()
    assert [r[2] for r in after_takeover["rows"]["rounds"]] == ["committed", "open"]

    # Woken, the first driver's transition (evaluating round 1) is refused and rolled back.
    assert not first.step()
    assert store.snapshot() == after_takeover
    assert not first.step()  # and it knows it is no longer the holder

    while second.step():
        pass
    versions = [row[0] for row in store.snapshot()["rows"]["checkpoints"]]
    assert versions == [0, 1]  # each round committed once
