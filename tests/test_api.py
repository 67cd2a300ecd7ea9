"""The /v1 API through Flask's test client, over a real store and TFF aggregator.

Every bad request must answer 4xx JSON {"error", "detail"} and leave the store (rows
and blobs) exactly as it was.
"""

from __future__ import annotations

import hashlib
import json
import time

import numpy as np
import pytest

from edgefl import wire
from tests.api_helpers import (
    ADMIN,
    SPEC,
    administered,
    assert_error,
    random_delta,
    register,
    rejections,
    take_task,
    update_body,
    upload,
)


def test_register_returns_an_id_and_a_token_stored_hashed(client, store):
    response = client.post("/v1/devices")
    assert response.status_code == 201
    token = response.json["token"]
    rows = store.snapshot()["rows"]["devices"]
    assert len(rows) == 1 and token not in json.dumps(rows)
    assert rows[0][1] == hashlib.sha256(token.encode()).hexdigest()


def test_checkin_before_a_round_opens_says_wait(client):
    response = client.post("/v1/checkin", headers=register(client))
    assert response.json["status"] == "wait" and response.json["retry_after"] > 0
    assert "Retry-After" in response.headers


def test_task_names_the_round_and_the_checkpoint(client, open_round):
    headers, task = open_round
    assert task["round_number"] == 1 and task["model"] == "cnn_small"
    assert (task["epochs"], task["batch_size"], task["learning_rate"]) == (1, 10, 0.05)
    assert take_task(client, headers) == {**task, "seconds_left": pytest.approx(task["seconds_left"], abs=2)}


def test_cohort_is_target_times_over_selection(client, open_round):
    # target 2 x 1.5 = cohort of 3: the fixture's device plus two more; the fourth waits.
    take_task(client, register(client))
    take_task(client, register(client))
    response = client.post("/v1/checkin", headers=register(client))
    assert response.json["status"] == "wait"


def test_a_new_round_selects_waiting_devices_first_in_arrival_order(client, store, driver):
    from contextlib import closing

    from coordinator import rounds

    ids = [client.post("/v1/devices").json["device_id"] for _ in range(4)]
    with closing(store.connect()) as db, store.transaction(db):
        round_id = rounds.begin_round(db, driver.config, 0.0, candidates=[ids[3], "no-such-device", ids[1], ids[2], ids[0]])
        selected = {r[0] for r in db.execute("SELECT device_id FROM assignments WHERE round_id = ?", (round_id,))}
    assert driver.config.cohort_size == 3 and selected == {ids[3], ids[1], ids[2]}  # not ids[0], registered first


def test_checkpoint_is_served_by_hash_with_an_etag(client, store, open_round):
    headers, task = open_round
    sha = task["checkpoint_sha256"]
    response = client.get(f"/v1/checkpoints/{sha}", headers=headers)
    assert response.status_code == 200
    assert hashlib.sha256(response.data).hexdigest() == sha
    assert response.headers["ETag"] == f'"{sha}"'
    weights, metadata = wire.decode(response.data, SPEC)
    assert metadata["version"] == "0"
    again = client.get(f"/v1/checkpoints/{sha}", headers={**headers, "If-None-Match": f'"{sha}"'})
    assert again.status_code == 304 and again.data == b""
    assert client.head(f"/v1/checkpoints/{sha}", headers=headers).status_code == 200
    history = client.get("/v1/rounds").json["rounds"]
    assert history[0]["bytes_down"] == len(response.data)  # the GET's bytes; the 304 and the HEAD sent none


def test_anonymous_checkpoint_downloads_change_nothing(client, store, open_round):
    """Checkpoints are public and cacheable, like files on a CDN: anyone may GET or HEAD
    one, and no such request writes anything (nor counts as a device's download)."""
    headers, task = open_round
    url = f"/v1/checkpoints/{task['checkpoint_sha256']}"
    before = store.snapshot()
    for call, extra in (
        (client.get, {}),
        (client.head, {}),
        (client.get, {"Range": "bytes=0-99"}),
        (client.get, {"Authorization": "Bearer not-a-device"}),
        (client.head, headers),
    ):
        assert call(url, headers=extra).status_code in (200, 206)
    assert store.snapshot() == before


@pytest.mark.parametrize(
    "name, code",
    [("0" * 64, "unknown_checkpoint"), ("not-a-hash", "unknown_checkpoint"), ("../../edgefl.sqlite3", "not_found")],
)
def test_unknown_checkpoints_are_404(client, open_round, name, code):
    assert_error(client.get(f"/v1/checkpoints/{name}"), 404, code)


def test_update_blobs_are_not_served_as_checkpoints(client, store, open_round):
    headers, task = open_round
    body = update_body()
    assert upload(client, headers, task["round_id"], body).status_code == 202
    assert_error(client.get(f"/v1/checkpoints/{hashlib.sha256(body).hexdigest()}"), 404, "unknown_checkpoint")


def test_accepted_update_is_durable_before_202(client, store, open_round):
    headers, task = open_round
    body = update_body(num_examples="37")
    response = upload(client, headers, task["round_id"], body)
    assert response.status_code == 202
    assert response.json == {"round_id": task["round_id"], "accepted": True, "reports": 1}
    rows = store.snapshot()["rows"]["updates"]
    sha = hashlib.sha256(body).hexdigest()
    assert len(rows) == 1 and rows[0][3] == sha and rows[0][4] == 37
    assert store.blobs.get(sha) == body


def _bad_uploads():
    spec_arrays = lambda: [np.zeros(s.shape, np.float32) for s in SPEC]  # noqa: E731
    nan = spec_arrays()
    nan[2][0, 0, 0, 0] = np.nan
    inf = spec_arrays()
    inf[-1][3] = np.inf
    wrong_shape = spec_arrays()
    wrong_shape[1] = np.zeros(17, np.float32)
    names = [s.name for s in SPEC]
    return {
        "garbage": (b"this is not safetensors", 400, "malformed"),
        "empty": (b"", 400, "malformed"),
        "wrong names": (update_body(names=["x" + n for n in names]), 422, "wrong_tensors"),
        "missing tensor": (wire.encode(names[:-1], spec_arrays()[:-1], {"num_examples": "3"}), 422, "wrong_tensors"),
        "wrong shape": (update_body(arrays=wrong_shape), 422, "wrong_shape"),
        "nan": (update_body(arrays=nan), 422, "non_finite"),
        "inf": (update_body(arrays=inf), 422, "non_finite"),
        "no num_examples": (update_body(num_examples=None), 400, "bad_num_examples"),
        "zero examples": (update_body(num_examples="0"), 400, "bad_num_examples"),
        "negative examples": (update_body(num_examples="-5"), 400, "bad_num_examples"),
        "unicode digits": (update_body(num_examples="\u00b2"), 400, "bad_num_examples"),
        "metric too large for a float": (update_body(metrics='{"n": 1' + "0" * 400 + "}"), 400, "bad_metrics"),
        "metrics not json": (update_body(metrics="{oops"), 400, "bad_metrics"),
        "metrics nan": (update_body(metrics='{"loss": NaN}'), 400, "bad_metrics"),
    }


@pytest.mark.parametrize("case", list(_bad_uploads()))
def test_bad_update_bodies_are_refused_and_change_nothing(client, store, open_round, case):
    headers, task = open_round
    body, status, code = _bad_uploads()[case]
    before = store.snapshot()
    assert_error(upload(client, headers, task["round_id"], body), status, code)
    assert store.snapshot() == before
    assert rejections(store) == [(task["round_id"], code, 0)]


def test_wrong_dtype_is_refused(client, store, open_round):
    from safetensors.numpy import save

    headers, task = open_round
    tensors = {s.name: np.zeros(s.shape, np.float64) for s in SPEC}
    before = store.snapshot()
    assert_error(upload(client, headers, task["round_id"], save(tensors, {"num_examples": "1"})), 422, "wrong_dtype")
    assert store.snapshot() == before
    assert rejections(store) == [(task["round_id"], "wrong_dtype", 0)]


@pytest.mark.parametrize(
    "auth, code", [(None, "missing_token"), ("Bearer nope", "unknown_token"), ("Basic abc", "missing_token")]
)
def test_credentials_are_required(client, store, open_round, auth, code):
    _, task = open_round
    headers = {"Authorization": auth} if auth else {}
    before = store.snapshot()
    assert_error(upload(client, headers, task["round_id"], update_body()), 401, code)
    assert_error(client.post("/v1/checkin", headers=headers), 401, code)
    assert store.snapshot() == before
    assert rejections(store) == []  # nothing is written for a caller nobody knows


def test_a_device_not_selected_cannot_upload(client, store, open_round):
    _, task = open_round
    stranger = register(client)
    before = store.snapshot()
    assert_error(upload(client, stranger, task["round_id"], update_body()), 403, "not_selected")
    assert store.snapshot() == before
    assert rejections(store) == [(task["round_id"], "not_selected", 0)]


def test_second_upload_in_a_round_is_a_conflict(client, store, open_round):
    headers, task = open_round
    assert upload(client, headers, task["round_id"], update_body(seed=1)).status_code == 202
    before = store.snapshot()
    assert_error(upload(client, headers, task["round_id"], update_body(seed=2)), 409, "duplicate_update")
    assert store.snapshot() == before
    assert rejections(store) == [(task["round_id"], "duplicate_update", 0)]


def test_unknown_round_is_404(client, store, open_round):
    headers, _ = open_round
    before = store.snapshot()
    assert_error(upload(client, headers, 999, update_body()), 404, "unknown_round")
    assert store.snapshot() == before
    assert rejections(store) == []


def test_oversized_upload_is_413_before_reading(client, store, open_round):
    headers, task = open_round
    before = store.snapshot()
    huge = b"\x00" * (sum(s.nbytes for s in SPEC) + 2 * 1024 * 1024)
    assert_error(upload(client, headers, task["round_id"], huge), 413, "update_too_large")
    assert store.snapshot() == before
    assert rejections(store) == [(task["round_id"], "update_too_large", 0)]


def test_unknown_routes_and_methods_answer_json(client):
    assert_error(client.get("/v1/nothing"), 404, "not_found")
    assert_error(client.get("/v1/checkin"), 405, "method_not_allowed")


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
            return [rounds.checkin(db, device_id, first_task + elapsed, random.Random(i))["retry_after"] for i in range(50)]

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
    from coordinator import create_app
    from coordinator.driver import RoundDriver
    from edgefl.config import RunConfig

    monkeypatch.chdir(tmp_path)
    app = create_app({"INSTANCE": "relative/instance", "TESTING": True})
    learner, server = small_parts
    RoundDriver(app.extensions["edgefl.store"], RunConfig(model="cnn_small"), learner=learner, server=server).ensure_run()
    monkeypatch.chdir("/")
    client = app.test_client()
    sha = client.get("/v1/status").json["model"]["sha256"]
    response = client.get(f"/v1/checkpoints/{sha}")
    assert response.status_code == 200 and hashlib.sha256(response.data).hexdigest() == sha


def test_held_checkins_get_the_next_round_and_slots_bound_them(tmp_path, small_parts, db_url):
    """With long-poll slots, a device that reported is held until the next round opens
    (instead of sleeping into it); once the slots are taken, others are answered at once."""
    import threading

    from coordinator import create_app
    from coordinator.driver import RoundDriver
    from edgefl.config import RunConfig

    app = create_app({"INSTANCE": str(tmp_path / "instance"), "DB_URL": db_url, "TESTING": True, "LONG_POLL_SLOTS": 1})
    learner, server = small_parts
    config = RunConfig(model="cnn_small", rounds=3, target_reports=2, min_reports=2, round_timeout_s=60)
    driver = RoundDriver(
        app.extensions["edgefl.store"],
        config,
        learner=learner,
        server=server,
        lobby=app.extensions["edgefl.lobby"],
    )
    driver.ensure_run()
    assert driver.step()
    client = app.test_client()
    devices = [register(client) for _ in range(2)]
    tasks = [take_task(client, headers) for headers in devices]
    for headers, task, seed in zip(devices, tasks, (1, 2)):
        assert upload(client, headers, task["round_id"], update_body(seed=seed)).status_code == 202

    held = {}
    waiting = threading.Thread(target=lambda: held.update(answer=app.test_client().post("/v1/checkin", headers=devices[0]).json))
    waiting.start()
    time.sleep(0.5)
    assert waiting.is_alive()  # held, not told to come back
    other = client.post("/v1/checkin", headers=devices[1]).json  # the one slot is taken
    assert other["status"] == "wait" and other["reason"] == "reported"
    assert driver.step()  # commits round 1, opens round 2
    waiting.join(timeout=5)
    assert not waiting.is_alive()
    assert held["answer"]["status"] == "task" and held["answer"]["task"]["round_number"] == 2


def test_control_endpoints_are_off_without_an_admin_token(client, store, open_round):
    before = store.snapshot()
    assert_error(client.post("/v1/admin/stop", headers=ADMIN), 403, "admin_disabled")
    assert store.snapshot() == before


def test_an_operator_pauses_resumes_and_stops_the_run(tmp_path, small_parts, db_url):
    from edgefl.config import RunConfig

    app, driver = administered(tmp_path, small_parts, RunConfig(model="cnn_small"), db_url)
    client, store = app.test_client(), app.extensions["edgefl.store"]
    device = register(client)
    before = store.snapshot()
    for headers, code in (
        ({}, "missing_token"),
        ({"Authorization": "Bearer wrong"}, "bad_admin_token"),
        (device, "bad_admin_token"),
    ):
        assert_error(client.post("/v1/admin/pause", headers=headers), 401, code)
    assert_error(client.post("/v1/admin/resume", headers=ADMIN), 409, "bad_transition")  # it is running
    assert store.snapshot() == before

    assert client.post("/v1/admin/pause", headers=ADMIN).json == {"run": "paused"}
    assert not driver.step()  # a paused run opens no round
    answer = client.post("/v1/checkin", headers=device).json
    assert answer["status"] == "wait" and answer["reason"] == "paused"
    assert client.post("/v1/admin/resume", headers=ADMIN).json == {"run": "running"}
    assert driver.step()
    assert take_task(client, device)["round_number"] == 1
    assert client.post("/v1/admin/stop", headers=ADMIN).json == {"run": "stopped"}
    assert client.post("/v1/checkin", headers=device).json == {"status": "finished", "reason": "run_stopped"}
    assert_error(client.post("/v1/admin/stop", headers=ADMIN), 409, "bad_transition")
    assert client.get("/v1/status").json["run"]["status"] == "stopped"


def test_an_operator_changes_the_configuration_mid_run(tmp_path, small_parts, db_url):
    from edgefl.config import RunConfig

    config = RunConfig(model="cnn_small", rounds=3, target_reports=2, min_reports=1, over_selection=1.0, round_timeout_s=60)
    app, driver = administered(tmp_path, small_parts, config, db_url)
    client, store = app.test_client(), app.extensions["edgefl.store"]
    devices = [register(client) for _ in range(3)]
    assert driver.step()  # opens round 1
    tasks = [take_task(client, headers) for headers in devices[:2]]
    assert client.post("/v1/checkin", headers=devices[2]).json["reason"] == "cohort_full"

    before = store.snapshot()
    assert_error(client.post("/v1/admin/config", json={"rounds": 5}), 401, "missing_token")
    assert_error(client.post("/v1/admin/config", data="rounds=5", headers=ADMIN), 415, "unsupported_media_type")
    assert_error(
        client.post("/v1/admin/config", data="{rounds", headers={**ADMIN, "Content-Type": "application/json"}), 400, "bad_json"
    )
    for changes, code in (
        ({}, "invalid_request"),
        ({"round_timeout_s": None}, "invalid_request"),
        ({"model": "cnn"}, "invalid_request"),
        ({"seed": 1}, "invalid_request"),
        ({"rounds": "5"}, "invalid_request"),
        ({"rounds": True}, "invalid_request"),
        ({"epochs": 1.5}, "invalid_request"),
        ({"client_lr": -1}, "invalid_request"),
        ({"rounds": 10**12}, "invalid_request"),
    ):
        posted = client.post("/v1/admin/config", data=json.dumps(changes), headers={**ADMIN, "Content-Type": "application/json"})
        assert_error(posted, 422, code)
    overflowing = client.post(
        "/v1/admin/config", data='{"client_lr": 1e999}', headers={**ADMIN, "Content-Type": "application/json"}
    )
    assert_error(overflowing, 422, "invalid_request")  # JSON, but a number no float holds
    for not_json in (
        '{"client_lr": Infinity}',
        '{"client_lr": NaN}',
        '{"rounds": ' + "9" * 5000 + "}",
        "[" * 100_000 + "]" * 100_000,
    ):
        assert_error(
            client.post("/v1/admin/config", data=not_json, headers={**ADMIN, "Content-Type": "application/json"}), 400, "bad_json"
        )
    assert_error(client.post("/v1/admin/config", json={"min_reports": 3}, headers=ADMIN), 409, "config_conflict")  # > target
    assert store.snapshot() == before

    # A bigger target and cohort take effect in the open round; new tasks train longer; the
    # run now ends after this round.
    changed = client.post(
        "/v1/admin/config", json={"target_reports": 3, "over_selection": 1.0, "epochs": 3, "rounds": 1}, headers=ADMIN
    )
    assert changed.status_code == 200 and changed.json["config"]["target_reports"] == 3
    late_task = take_task(client, devices[2])
    assert late_task["epochs"] == 3 and tasks[0]["epochs"] == 1
    for headers, task, seed in zip(devices, [*tasks, late_task], (1, 2, 3)):
        assert upload(client, headers, task["round_id"], update_body(seed=seed)).status_code == 202
        assert driver.step() == (headers is devices[2])  # closes at the third report, not before
    while driver.step():
        pass
    status = client.get("/v1/status").json
    assert status["run"]["status"] == "finished" and [h["reported"] for h in status["history"]] == [3]
    assert status["run"]["config"]["rounds"] == 1
    assert [c["changes"] for c in status["run"]["config_changes"]] == [
        {"epochs": 3, "over_selection": 1.0, "rounds": 1, "target_reports": 3}
    ]
    assert_error(client.post("/v1/admin/config", json={"rounds": 5}, headers=ADMIN), 409, "bad_transition")


def test_a_dp_run_reports_the_privacy_spent_after_each_round(tmp_path, small_parts, db_url):
    import dp_accounting
    from dp_accounting import rdp

    from coordinator import create_app
    from coordinator.aggregation import FedAvgServer, ServerSettings
    from coordinator.driver import RoundDriver
    from edgefl.config import RunConfig

    config = RunConfig(
        model="cnn_small",
        rounds=2,
        target_reports=2,
        min_reports=2,
        over_selection=2.0,  # room for devices new to the run
        aggregator="dp_fixed",
        dp_noise_multiplier=1.1,
        dp_clip=1.0,
    )
    app = create_app(
        {"INSTANCE": str(tmp_path / "instance"), "DB_URL": db_url, "TESTING": True, "ADMIN_TOKEN": ADMIN["Authorization"][7:]}
    )
    driver = RoundDriver(
        app.extensions["edgefl.store"], config, learner=small_parts[0], server=FedAvgServer(SPEC, ServerSettings.of(config))
    )
    driver.ensure_run()
    client = app.test_client()
    devices = [register(client) for _ in range(4)]  # cohorts of 2: devices 0 and 1, then 2 and 3
    assert driver.step()  # round 1 opens; each commit opens the next
    refused = client.post("/v1/admin/config", json={"target_reports": 3}, headers=ADMIN)
    assert_error(refused, 409, "config_conflict")
    assert "calibrated" in refused.json["detail"]
    for round_number in (1, 2):
        for _ in range(200):  # bogus registrations: they must not make the privacy look better
            client.post("/v1/devices")
        cohort = devices[2 * round_number - 2 : 2 * round_number]
        for seed, headers in enumerate(cohort):
            assert upload(client, headers, take_task(client, headers)["round_id"], update_body(seed=seed)).status_code == 202
        while driver.step():
            pass
    history = client.get("/v1/status").json["history"]
    accountant = rdp.RdpAccountant()
    # The population is the devices aggregated so far: 2 after round 1 (q = 1), 4 after round 2.
    for entry, q in zip(history, (2 / 2, 2 / 4)):  # the figure dp_accounting gives for the same events
        accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(1.1)))
        assert entry["privacy"] == {"epsilon": pytest.approx(accountant.get_epsilon(1e-5)), "delta": 1e-5}
    assert len(history) == 2 and history[1]["privacy"]["epsilon"] > history[0]["privacy"]["epsilon"]


def test_a_run_without_dp_reports_no_privacy(client, driver, open_round):
    headers, task = open_round
    assert upload(client, headers, task["round_id"], update_body()).status_code == 202
    driver.clock.now += driver.config.round_timeout_s
    while driver.step():
        pass
    assert [h["privacy"] for h in client.get("/v1/status").json["history"]] == [None]


def test_a_compressed_run_takes_quantized_updates_and_averages_them_decoded(tmp_path, small_parts, db_url):
    from coordinator import create_app
    from coordinator.driver import RoundDriver
    from edgefl import compression
    from edgefl.config import RunConfig

    config = RunConfig(
        model="cnn_small",
        rounds=1,
        target_reports=2,
        min_reports=2,
        over_selection=1.0,
        aggregator="compressed",
        compression_bits=4,
    )
    app = create_app({"INSTANCE": str(tmp_path / "instance"), "DB_URL": db_url, "TESTING": True})
    store = app.extensions["edgefl.store"]
    driver = RoundDriver(store, config, learner=small_parts[0], server=small_parts[1])  # compressed folds a plain mean
    driver.ensure_run()
    client = app.test_client()
    devices = [register(client) for _ in range(2)]
    assert driver.step()
    tasks = [take_task(client, headers) for headers in devices]
    assert [t["quantization_bits"] for t in tasks] == [4, 4]

    before = store.snapshot()
    float32 = upload(client, devices[0], tasks[0]["round_id"], update_body())
    assert_error(float32, 422, "wrong_tensors")
    assert "4-bit quantized" in float32.json["detail"]
    names, quantized = [s.name for s in SPEC], compression.quantized_spec(SPEC, 4)
    codes_and_bounds, _ = wire.decode(
        compression.encode_update(names, random_delta(), {}, 4, np.random.default_rng(0)), quantized
    )
    min_above_max = [np.array([1, -1], np.float32) if s.dtype == "F32" else a for s, a in zip(quantized, codes_and_bounds)]
    body = wire.encode([s.name for s in quantized], min_above_max, {"num_examples": "3", "quantization_bits": "4"})
    assert_error(upload(client, devices[0], tasks[0]["round_id"], body), 422, "bad_bounds")
    assert store.snapshot() == before

    deltas = [random_delta(seed) for seed in (1, 2)]
    bodies = [
        compression.encode_update(names, d, {"num_examples": n}, 4, np.random.default_rng(seed))
        for seed, (d, n) in enumerate(zip(deltas, ("30", "10")))
    ]
    for headers, task, body in zip(devices, tasks, bodies):
        assert upload(client, headers, task["round_id"], body).status_code == 202
    base, _ = wire.decode(client.get(f"/v1/checkpoints/{tasks[0]['checkpoint_sha256']}").data, SPEC)
    while driver.step():
        pass

    status = client.get("/v1/status").json
    new, _ = wire.decode(client.get(status["model"]["url"]).data, SPEC)
    decoded = [compression.decode_update(body, SPEC, 4)[0] for body in bodies]
    for i, (b, n) in enumerate(zip(base, new)):
        np.testing.assert_allclose(n, b + (30 * decoded[0][i] + 10 * decoded[1][i]) / 40, rtol=1e-5, atol=1e-6)
        step = max((d[i].max() - d[i].min()) / 15 for d in deltas)
        assert np.abs(n - (b + (30 * deltas[0][i] + 10 * deltas[1][i]) / 40)).max() <= step  # and near the float32 mean
    (entry,) = status["history"]
    assert entry["bytes_up"] == sum(len(b) for b in bodies)
    assert entry["bytes_up_float32"] == 2 * sum(s.nbytes for s in SPEC)
    assert entry["bytes_up"] < entry["bytes_up_float32"] / 7  # 4 bits of 32, with the headers


def test_the_aggregator_and_optimizer_state_survive_a_restart(tmp_path, small_parts):
    """robust + adam: the clip and zeroing norm estimates and Adam's moments are stored
    beside each checkpoint, so a new coordinator (a new driver and a freshly built
    server) continues the run exactly as the old one would have."""
    from coordinator import create_app
    from coordinator.aggregation import FedAvgServer, ServerSettings
    from coordinator.driver import RoundDriver
    from edgefl.config import RunConfig

    config = RunConfig(
        model="cnn_small",
        rounds=2,
        target_reports=2,
        min_reports=2,
        over_selection=1.0,
        aggregator="robust",
        server_optimizer="adam",
        server_lr=0.01,
    )
    app = create_app({"INSTANCE": str(tmp_path / "instance"), "TESTING": True})
    store, client = app.extensions["edgefl.store"], app.test_client()
    server = FedAvgServer(SPEC, ServerSettings.of(config))
    driver = RoundDriver(store, config, learner=small_parts[0], server=server)
    driver.ensure_run()
    devices = [register(client) for _ in range(2)]
    deltas = {(r, i): random_delta(seed=10 * r + i, scale=(0.01, 1.0)[i]) for r in (1, 2) for i in (0, 1)}  # one outlier

    def play(round_number: int, driver) -> None:
        for i, headers in enumerate(devices):
            task = take_task(client, headers)
            assert upload(client, headers, task["round_id"], update_body(arrays=deltas[round_number, i])).status_code == 202
        while driver.step():
            pass

    initial, _ = wire.decode(client.get(client.get("/v1/status").json["model"]["url"]).data, SPEC)
    assert driver.step()
    play(1, driver)
    driver.release_lease()
    restarted = RoundDriver(store, config, learner=small_parts[0], server=FedAvgServer(SPEC, ServerSettings.of(config)))
    restarted.ensure_run()
    play(2, restarted)

    status = client.get("/v1/status").json
    assert status["run"]["status"] == "finished" and status["model"]["version"] == 2
    final, _ = wire.decode(client.get(status["model"]["url"]).data, SPEC)
    first = server.next(server.initialize(), initial, [(deltas[1, 0], 10), (deltas[1, 1], 10)])
    uninterrupted = server.next(first.state, first.weights, [(deltas[2, 0], 10), (deltas[2, 1], 10)])
    forgetful = server.next(server.initialize(), first.weights, [(deltas[2, 0], 10), (deltas[2, 1], 10)])
    for got, want in zip(final, uninterrupted.weights):
        np.testing.assert_array_equal(got, want)
    assert any(not np.allclose(w, f) for w, f in zip(uninterrupted.weights, forgetful.weights))  # the state mattered
