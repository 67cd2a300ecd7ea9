"""A round's life through the API and the round driver: aggregation and commit, the
round record, deadlines, restarts of the driver, held check-ins, the run's end."""

from __future__ import annotations

import hashlib
import json
import time

import numpy as np
import pytest

from edgefl import wire
from tests.api_helpers import (
    SPEC,
    assert_error,
    build_coordinator,
    register,
    rejections,
    take_task,
    update_body,
    upload,
)


def test_a_round_aggregates_commits_and_late_uploads_conflict(client, store, driver, open_round):
    headers_a, task = open_round
    headers_b = register(client)
    assert take_task(client, headers_b)["round_id"] == task["round_id"]
    rng = np.random.default_rng(5)
    deltas = [[rng.normal(scale=0.01, size=s.shape).astype(np.float32) for s in SPEC] for _ in range(2)]
    names = [s.name for s in SPEC]
    for headers, delta, n in ((headers_a, deltas[0], "30"), (headers_b, deltas[1], "10")):
        assert upload(client, headers, task["round_id"], wire.encode(names, delta, {"num_examples": n})).status_code == 202
    base, _ = wire.decode(client.get(f"/v1/checkpoints/{task['checkpoint_sha256']}").data, SPEC)

    assert driver.step()  # target of 2 reached: aggregate and commit
    status = client.get("/v1/status").json
    assert status["model"]["version"] == 1
    assert len(status["history"]) == 1 and status["history"][0]["reported"] == 2
    new, metadata = wire.decode(client.get(status["model"]["url"]).data, SPEC)
    assert metadata["version"] == "1"
    for b, n, d0, d1 in zip(base, new, *deltas):
        np.testing.assert_allclose(n, b + (30 * d0 + 10 * d1) / 40, rtol=1e-5, atol=1e-6)
    assert 0.0 <= status["history"][0]["accuracy"] <= 1.0
    assert 0 < status["history"][0]["bytes_up"] - status["history"][0]["bytes_up_float32"] < 2 * 1024  # headers only

    third = register(client)  # selected into nothing: round 1 is over
    before = store.snapshot()
    assert_error(upload(client, headers_a, task["round_id"], update_body(seed=9)), 409, "round_closed")
    assert_error(upload(client, third, task["round_id"], update_body(seed=9)), 409, "round_closed")
    assert store.snapshot() == before
    assert rejections(store) == [(task["round_id"], "round_closed", 0)] * 2  # neither is a straggler


def test_personalisation_reports_are_averaged_per_round_by_held_out_examples(client, driver, open_round):
    headers_a, task = open_round
    headers_b = register(client)
    take_task(client, headers_b)
    reports = (
        (
            headers_a,
            {"train_loss": 1.0, "holdout_examples": 30, "holdout_accuracy_global": 0.5, "holdout_accuracy_personalized": 0.9},
        ),
        (
            headers_b,
            {"train_loss": 1.0, "holdout_examples": 10, "holdout_accuracy_global": 0.9, "holdout_accuracy_personalized": 0.5},
        ),
    )
    for seed, (headers, metrics) in enumerate(reports):
        assert upload(client, headers, task["round_id"], update_body(metrics=json.dumps(metrics), seed=seed)).status_code == 202
    assert driver.step()
    (entry,) = client.get("/v1/status").json["history"]
    assert entry["personalization"] == {
        "devices": 2,
        "examples": 40,
        "global_accuracy": pytest.approx(0.6),
        "personalized_accuracy": pytest.approx(0.8),
    }
    first, second = client.get("/v1/rounds").json["rounds"]  # round 2 has opened
    assert first["metrics"]["personalization"] == entry["personalization"] and second["metrics"] is None


def test_the_round_record_counts_stragglers_drops_rejections_and_phases(client, driver, open_round):
    headers_a, task = open_round
    headers_b, headers_c = register(client), register(client)
    take_task(client, headers_b)
    take_task(client, headers_c)  # selected, never heard from again: dropped
    assert upload(client, headers_a, task["round_id"], update_body(seed=1)).status_code == 202
    assert_error(upload(client, headers_a, task["round_id"], update_body(seed=2)), 409, "duplicate_update")
    assert_error(upload(client, headers_b, task["round_id"], b"junk"), 400, "malformed")
    driver.clock.now += 61  # the deadline passes with 1 report (min_reports 1): aggregate what arrived
    assert driver.step()
    assert_error(upload(client, headers_b, task["round_id"], update_body(seed=3)), 409, "round_closed")  # late

    record = client.get("/v1/rounds").json["rounds"][0]
    assert (record["selected"], record["reported"], record["late"], record["dropped"]) == (3, 1, 1, 1)
    assert record["rejected"] == {"duplicate_update": 1, "malformed": 1}
    phases = record["phase_seconds"]
    assert phases["collecting"] == pytest.approx(61, abs=1) and phases["aggregating"] >= 0 and phases["evaluating"] >= 0
    assert record["bytes_up"] == len(update_body(seed=1)) and record["bytes_down"] == 0
    assert client.get("/v1/rounds").json["rounds"][1]["dropped"] is None  # round 2 is still open


def test_updates_are_deleted_once_their_round_is_committed(client, store, driver, open_round):
    """The coordinator keeps no device's update past its round; rows stay as the record.
    The same bytes uploaded again in the next round are stored again."""
    from contextlib import closing

    headers_a, task = open_round
    headers_b = register(client)
    take_task(client, headers_b)
    bodies = [update_body(seed=1), update_body(seed=2)]
    for headers, body in zip((headers_a, headers_b), bodies):
        assert upload(client, headers, task["round_id"], body).status_code == 202
    shas = {hashlib.sha256(b).hexdigest() for b in bodies}
    assert shas <= store.blobs.names()
    assert driver.step()
    assert not shas & store.blobs.names()
    with closing(store.connect()) as db:
        assert {r[0] for r in db.execute("SELECT blob_sha256 FROM updates")} == shas

    second = take_task(client, headers_a)
    assert upload(client, headers_a, second["round_id"], bodies[0]).status_code == 202
    assert hashlib.sha256(bodies[0]).hexdigest() in store.blobs.names()


def test_a_driver_restarted_mid_round_refolds_and_commits_the_same_model(client, store, driver, open_round):
    """Updates folded before a restart live only in memory; the new driver refolds them
    from the store in arrival order and commits exactly the uninterrupted result."""
    from coordinator.driver import RoundDriver

    headers_a, task = open_round
    headers_b = register(client)
    take_task(client, headers_b)
    names = [s.name for s in SPEC]
    rng = np.random.default_rng(6)
    deltas = [[rng.normal(scale=0.01, size=s.shape).astype(np.float32) for s in SPEC] for _ in range(2)]
    assert upload(client, headers_a, task["round_id"], wire.encode(names, deltas[0], {"num_examples": "7"})).status_code == 202
    assert not driver.step()  # folds the first update, keeps collecting
    assert upload(client, headers_b, task["round_id"], wire.encode(names, deltas[1], {"num_examples": "21"})).status_code == 202
    base, _ = wire.decode(client.get(f"/v1/checkpoints/{task['checkpoint_sha256']}").data, SPEC)
    state = driver.server.initialize()
    expected = driver.server.next(state, base, [(deltas[0], 7), (deltas[1], 21)]).weights

    driver.release_lease()  # as a stopping coordinator does; a killed one's ends with its process
    restarted = RoundDriver(store, driver.config, clock=driver.clock, learner=driver.learner, server=driver.server)
    restarted.ensure_run()
    assert restarted.step()
    status = client.get("/v1/status").json
    new, _ = wire.decode(client.get(status["model"]["url"]).data, SPEC)
    for got, want in zip(new, expected):
        np.testing.assert_array_equal(got, want)
    assert status["history"][0]["reported"] == 2


def test_a_round_committed_but_not_evaluated_is_evaluated_after_a_restart(client, store, driver, open_round):
    from contextlib import closing

    from coordinator.driver import RoundDriver

    headers_a, task = open_round
    headers_b = register(client)
    take_task(client, headers_b)
    for headers, seed in ((headers_a, 1), (headers_b, 2)):
        assert upload(client, headers, task["round_id"], update_body(seed=seed)).status_code == 202
    assert driver.step()
    evaluated = client.get("/v1/status").json["history"][0]
    with closing(store.connect()) as db:  # as if killed between the commit and the evaluation
        db.execute("UPDATE rounds SET evaluated_at = NULL, metrics = '{}' WHERE number = 1")
    assert client.get("/v1/status").json["history"] == []

    driver.release_lease()  # as a stopping coordinator does; a killed one's ends with its process
    restarted = RoundDriver(store, driver.config, clock=driver.clock, learner=driver.learner, server=driver.server)
    assert restarted.step()
    again = client.get("/v1/status").json["history"]
    assert len(again) == 1 and again[0]["accuracy"] == evaluated["accuracy"] and again[0]["loss"] == evaluated["loss"]


def test_a_device_that_reported_is_told_to_return_when_the_round_should_close(client, store, driver, open_round):
    import random
    from contextlib import closing

    from coordinator import rounds

    headers_a, task = open_round
    headers_b = register(client)
    take_task(client, headers_b)
    with closing(store.connect()) as db:  # round 1 takes 2.5 s from its first task (stamped with real time)
        (opened,) = db.execute("SELECT MIN(assigned_at) FROM assignments WHERE round_id = ?", (task["round_id"],)).fetchone()
    driver.clock.now = opened + 2.5
    for headers, seed in ((headers_a, 1), (headers_b, 2)):
        assert upload(client, headers, task["round_id"], update_body(seed=seed)).status_code == 202
    assert driver.step()  # commits round 1 and opens round 2
    second = take_task(client, headers_a)
    assert upload(client, headers_a, second["round_id"], update_body(seed=3)).status_code == 202
    with closing(store.connect()) as db:
        (device_id,) = db.execute("SELECT device_id FROM updates WHERE round_id = ?", (second["round_id"],)).fetchone()
        (first_task,) = db.execute(
            "SELECT MIN(assigned_at) FROM assignments WHERE round_id = ?", (second["round_id"],)
        ).fetchone()
        (took,) = db.execute(  # 2.5 s
            "SELECT MAX(r.committed_at) - MIN(a.assigned_at) FROM rounds r JOIN assignments a ON a.round_id = r.id"
            " WHERE r.number = 1"
        ).fetchone()

        def waits(elapsed):
            return [rounds.checkin(db, device_id, first_task + elapsed, random.Random(i)).retry_after for i in range(50)]

        early, later = waits(0.5), waits(took - 1.0)
        overdue = max(waits(5.0))
    # 1 s is left by round 1's length: sleep half of it, jittered by 0.5-1.
    assert took > 2.0 and all(0.24 <= w <= 0.5 for w in later) and max(later) - min(later) > 0.1
    # After 0.5 s, the device's own 0.5 s bounds what is left (rounds can get shorter).
    assert all(0.12 <= w <= 0.25 for w in early)
    assert overdue <= rounds.SOON_RETRY_S  # overdue: poll soon


def test_deadline_with_too_few_reports_abandons_and_retries_the_same_model(client, driver, open_round):
    _, task = open_round
    driver.clock.now += 61
    assert driver.step()
    rounds = client.get("/v1/rounds").json["rounds"]
    assert [r["status"] for r in rounds] == ["abandoned", "open"]
    assert rounds[1]["number"] == 1
    retry = take_task(client, register(client))
    assert retry["checkpoint_sha256"] == task["checkpoint_sha256"] and retry["round_id"] != task["round_id"]


def test_deadline_with_min_reports_aggregates_what_arrived(client, driver, open_round):
    headers, task = open_round
    assert upload(client, headers, task["round_id"], update_body()).status_code == 202
    assert not driver.step()  # 1 of 2 reports, deadline not reached: keep collecting
    driver.clock.now += 61
    assert driver.step()
    history = client.get("/v1/status").json["history"]
    assert len(history) == 1 and history[0]["reported"] == 1


def test_run_finishes_after_its_rounds(client, driver):
    devices = [register(client) for _ in range(2)]
    for _ in range(2):
        driver.step()
        for headers in devices:
            task = take_task(client, headers)
            assert upload(client, headers, task["round_id"], update_body(seed=task["round_id"])).status_code == 202
        driver.step()
    status = client.get("/v1/status").json
    assert status["run"]["status"] == "finished" and status["model"]["version"] == 2
    assert client.post("/v1/checkin", headers=devices[0]).json == {"status": "finished", "reason": "run_finished"}


def test_a_relative_instance_directory_serves_checkpoints(tmp_path, monkeypatch, small_parts):
    from edgefl.config import RunConfig

    monkeypatch.chdir(tmp_path)
    app, _ = build_coordinator("relative/instance", small_parts, RunConfig(model="cnn_small"))
    monkeypatch.chdir("/")
    client = app.test_client()
    sha = client.get("/v1/status").json["model"]["sha256"]
    response = client.get(f"/v1/checkpoints/{sha}")
    assert response.status_code == 200 and hashlib.sha256(response.data).hexdigest() == sha


def test_held_checkins_get_the_next_round_and_slots_bound_them(tmp_path, small_parts, db_url):
    """With long-poll slots, a device that reported is held until the next round opens
    (instead of sleeping into it); once the slots are taken, others are answered at once."""
    import threading

    from edgefl.config import RunConfig

    config = RunConfig(model="cnn_small", rounds=3, target_reports=2, min_reports=2, round_timeout_s=60)
    app, driver = build_coordinator(tmp_path / "instance", small_parts, config, db_url=db_url, lobby=True, LONG_POLL_SLOTS=1)
    assert driver.step()
    client = app.test_client()
    devices = [register(client) for _ in range(2)]
    tasks = [take_task(client, headers) for headers in devices]
    for headers, task, seed in zip(devices, tasks, (1, 2)):
        assert upload(client, headers, task["round_id"], update_body(seed=seed)).status_code == 202

    held = {}
    waiting = threading.Thread(target=lambda: held.update(answer=app.test_client().post("/v1/checkin", headers=devices[0]).json))
    waiting.start()
    lobby, deadline = app.extensions["edgefl.lobby"], time.monotonic() + 10
    while not lobby.waiting() and time.monotonic() < deadline:  # until the check-in is held in the lobby
        waiting.join(timeout=0.01)
    assert waiting.is_alive() and len(lobby.waiting()) == 1  # held, not told to come back
    other = client.post("/v1/checkin", headers=devices[1]).json  # the one slot is taken
    assert other["status"] == "wait" and other["reason"] == "reported"
    assert driver.step()  # commits round 1, opens round 2
    waiting.join(timeout=5)
    assert not waiting.is_alive()
    assert held["answer"]["status"] == "task" and held["answer"]["task"]["round_number"] == 2
