"""A registered device sending well-formed but hostile uploads cannot stop the run, make
the model non-finite, or make any answer unreadable; the driver cannot loop for ever on
a round it cannot close; devices that take tasks and never report lose their seats."""

from __future__ import annotations

import json
import math
from contextlib import closing

import numpy as np
import pytest

from edgefl import limits, wire
from tests.api_helpers import SPEC, assert_error, random_delta, register, rejections, take_task, update_body, upload


def strict_json(text: str):
    """Parse as a strict parser would: NaN and Infinity are not JSON."""

    def refuse(constant):
        raise ValueError(f"bare {constant} in a response")

    return json.loads(text, parse_constant=refuse)


def filled(value: float) -> list[np.ndarray]:
    return [np.full(s.shape, value, np.float32) for s in SPEC]


def second_device(client, task):
    headers = register(client)
    assert take_task(client, headers)["round_id"] == task["round_id"]
    return headers


@pytest.mark.parametrize("value", [3e38, -1e7, np.nextafter(np.float32(limits.MAX_ABS_UPDATE), np.float32(np.inf))])
def test_finite_values_beyond_the_bound_are_refused(client, store, open_round, value):
    headers, task = open_round
    before = store.snapshot()
    response = upload(client, headers, task["round_id"], update_body(arrays=filled(value)))
    assert_error(response, 422, "out_of_range")
    assert store.snapshot() == before
    assert rejections(store) == [(task["round_id"], "out_of_range", 0)]


def test_the_largest_updates_allowed_aggregate_to_a_finite_model(client, driver, open_round):
    """Both devices at the bounds (every value +-1e6, a billion examples each): the
    weighted sum, the mean and the next model stay finite, and the round commits."""
    headers, task = open_round
    other = second_device(client, task)
    for device, sign in ((headers, 1), (other, -1)):
        body = update_body(arrays=filled(sign * limits.MAX_ABS_UPDATE), num_examples=str(limits.MAX_EXAMPLES))
        assert upload(client, device, task["round_id"], body).status_code == 202
    assert driver.step()
    status = strict_json(client.get("/v1/status").get_data(as_text=True))
    weights, _ = wire.decode(client.get(status["model"]["url"]).data, SPEC)
    assert status["model"]["version"] == 1 and all(np.isfinite(w).all() for w in weights)


@pytest.mark.parametrize(
    "metrics, says",
    [
        ({"holdout_examples": 10**308, "holdout_accuracy_global": 0.5, "holdout_accuracy_personalized": 0.5}, "holdout_examples"),
        ({"holdout_examples": 1.5}, "whole number"),
        ({"train_loss": 1e300}, "train_loss"),
        ({"train_accuracy": 2.0}, "train_accuracy"),
        ({"custom": -1e13}, "custom"),
        ({"custom": True}, "must be a number"),
        ({f"m{i}": 1 for i in range(limits.MAX_METRICS + 1)}, "at most"),
        ({"x" * 65: 1}, "names"),
    ],
)
def test_metrics_outside_their_bounds_are_refused(client, store, open_round, metrics, says):
    headers, task = open_round
    before = store.snapshot()
    response = upload(client, headers, task["round_id"], update_body(metrics=json.dumps(metrics)))
    assert_error(response, 400, "bad_metrics")
    assert says in response.json["detail"]
    assert store.snapshot() == before
    assert rejections(store) == [(task["round_id"], "bad_metrics", 0)]


@pytest.mark.parametrize(
    "metrics",
    [
        "[" * 50_000 + "]" * 50_000,
        "[" * 600 + "]" * 600,
        '{"n": ' + "9" * 5000 + "}",
        '{"a": {"b": 1}}',
        '{"loss": Infinity}',
    ],
)
def test_hostile_metrics_json_is_a_logged_400(client, store, open_round, metrics):
    headers, task = open_round
    before = store.snapshot()
    assert_error(upload(client, headers, task["round_id"], update_body(metrics=metrics)), 400, "bad_metrics")
    assert store.snapshot() == before
    assert rejections(store) == [(task["round_id"], "bad_metrics", 0)]


@pytest.mark.parametrize(
    "header",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b"[" * 700 + b"]" * 700,
        b'{"w": {"shape": [' + b"9" * 5000 + b"]}}",
        b'{"w": NaN}',
    ],
)
def test_hostile_safetensors_headers_are_a_logged_400(client, store, open_round, header):
    headers, task = open_round
    body = len(header).to_bytes(8, "little") + header
    before = store.snapshot()
    assert_error(upload(client, headers, task["round_id"], body), 400, "malformed")
    assert store.snapshot() == before
    assert rejections(store) == [(task["round_id"], "malformed", 0)]


def test_metrics_at_their_bounds_give_finite_round_figures(client, driver, open_round):
    """Two devices whose reports, within bounds, are as large as allowed: the round
    commits (it used to stay 'aggregating' for ever) and every figure is finite."""
    headers, task = open_round
    other = second_device(client, task)
    huge = {
        "train_loss": limits.MAX_ABS_METRIC,
        "train_accuracy": 1.0,
        "holdout_examples": limits.MAX_EXAMPLES,
        "holdout_accuracy_global": 1.0,
        "holdout_accuracy_personalized": 0.0,
    }
    for seed, device in enumerate((headers, other)):
        body = update_body(metrics=json.dumps(huge), num_examples=str(limits.MAX_EXAMPLES), seed=seed)
        assert upload(client, device, task["round_id"], body).status_code == 202
    assert driver.step()
    (entry,) = strict_json(client.get("/v1/status").get_data(as_text=True))["history"]
    assert entry["personalization"]["examples"] == 2 * limits.MAX_EXAMPLES
    assert entry["personalization"]["global_accuracy"] == 1.0
    (record, _) = strict_json(client.get("/v1/rounds").get_data(as_text=True))["rounds"]
    assert record["metrics"]["train_loss"] == limits.MAX_ABS_METRIC


def test_a_non_finite_aggregate_abandons_the_round_and_the_run_goes_on(client, driver, open_round, monkeypatch):
    """The bounds keep sums finite; should a model still come out non-finite (a fault
    no bound foresaw, simulated here), the round is abandoned with its reason and the
    next round retries the last good model."""
    from coordinator.aggregation import ServerOutput

    headers, task = open_round
    other = second_device(client, task)
    finish = driver.server.finish

    def broken(fold):
        output = finish(fold)
        return ServerOutput(
            output.state, [w * np.float32(np.inf) for w in output.weights], output.mean_delta, output.measurements
        )

    monkeypatch.setattr(driver.server, "finish", broken)
    for seed, device in enumerate((headers, other)):
        assert upload(client, device, task["round_id"], update_body(seed=seed)).status_code == 202
    assert driver.step()
    status = strict_json(client.get("/v1/status").get_data(as_text=True))
    assert status["model"]["version"] == 0 and status["history"] == []
    (abandoned,) = status["abandoned"]
    assert abandoned["round"] == 1 and abandoned["reason"] == "non_finite_model" and "model version 0" in abandoned["detail"]
    first, second = strict_json(client.get("/v1/rounds").get_data(as_text=True))["rounds"]
    assert (first["status"], first["abandon_reason"], second["status"], second["number"]) == (
        "abandoned",
        "non_finite_model",
        "open",
        1,
    )

    monkeypatch.setattr(driver.server, "finish", finish)  # the fault is gone: the retried round commits
    for seed, device in enumerate((headers, other)):
        assert upload(client, device, take_task(client, device)["round_id"], update_body(seed=seed)).status_code == 202
    assert driver.step()
    assert client.get("/v1/status").json["model"]["version"] == 1


def test_a_round_that_keeps_failing_is_abandoned_across_restarts(client, store, driver, open_round, monkeypatch):
    """A deterministic failure while closing a round: after MAX_FAILURES attempts,
    counted in the store (a restart does not reset them), the round is abandoned with
    the error as its reason and a new round retries the same model."""
    from coordinator import driver as driver_module
    from coordinator.driver import RoundDriver

    headers, task = open_round
    other = second_device(client, task)
    for seed, device in enumerate((headers, other)):
        assert upload(client, device, task["round_id"], update_body(seed=seed)).status_code == 202

    def fails(*args, **kwargs):
        raise ArithmeticError("a bug no retry fixes")

    monkeypatch.setattr(driver.server, "finish", fails)
    drivers = [driver, RoundDriver(store, driver.config, clock=driver.clock, learner=driver.learner, server=driver.server)]
    for attempt in range(driver_module.MAX_FAILURES):
        current = drivers[attempt % 2]  # a new coordinator takes over between attempts
        drivers[(attempt + 1) % 2].release_lease()
        with pytest.raises(ArithmeticError):
            current.step()
        current.give_up_on_failures(ArithmeticError("a bug no retry fixes"))
    rounds = client.get("/v1/rounds").json["rounds"]
    assert [r["status"] for r in rounds] == ["abandoned", "open"]
    assert rounds[0]["abandon_reason"] == "aggregation_failed" and "a bug no retry fixes" in rounds[0]["abandon_detail"]
    assert rounds[0]["failures"] == driver_module.MAX_FAILURES and rounds[1]["number"] == 1
    assert client.get("/v1/status").json["abandoned"][0]["reason"] == "aggregation_failed"


def test_an_evaluation_that_keeps_failing_is_recorded_and_the_run_finishes(client, driver, monkeypatch):
    from coordinator import driver as driver_module

    devices = [register(client) for _ in range(2)]

    def fails(*args, **kwargs):
        raise MemoryError("no room to evaluate")

    monkeypatch.setattr(driver.learner, "evaluate", fails)
    for _ in range(driver.config.rounds):
        driver.step()
        for seed, headers in enumerate(devices):
            assert upload(client, headers, take_task(client, headers)["round_id"], update_body(seed=seed)).status_code == 202
        for _ in range(driver_module.MAX_FAILURES):
            with pytest.raises(MemoryError):
                driver.step()
            driver.give_up_on_failures(MemoryError("no room to evaluate"))
    status = strict_json(client.get("/v1/status").get_data(as_text=True))
    assert status["run"]["status"] == "finished" and len(status["history"]) == driver.config.rounds
    assert all(h["accuracy"] is None for h in status["history"])
    assert "no room to evaluate" in client.get("/v1/rounds").json["rounds"][0]["metrics"]["evaluation_error"]


def test_non_finite_figures_are_null_in_every_answer(client, driver, open_round, monkeypatch):
    """A diverged model's loss is NaN and its accuracy anything: the status and the
    round records still parse with a strict JSON parser."""
    from coordinator import guard

    real = driver.learner.evaluate  # the guard's probe sees a sound model; the evaluation of all 360 examples diverges
    monkeypatch.setattr(
        driver.learner,
        "evaluate",
        lambda w, x, y: real(w, x, y) if len(y) <= guard.PROBE_EXAMPLES else {"loss": math.nan, "accuracy": math.inf},
    )
    headers, task = open_round
    assert upload(client, headers, task["round_id"], update_body()).status_code == 202
    driver.clock.now += driver.config.round_timeout_s
    assert driver.step()
    for path in ("/v1/status", "/v1/rounds"):
        text = client.get(path).get_data(as_text=True)
        assert "NaN" not in text and "Infinity" not in text
        strict_json(text)
    (entry,) = client.get("/v1/status").json["history"]
    assert entry["loss"] is None and entry["accuracy"] is None


@pytest.mark.parametrize(
    "path",
    [
        "/v1/rounds/\u0661/updates",
        "/v1/rounds/%D9%A1/updates",
        "/v1/rounds/+1/updates",
        "/v1/rounds/99999999999/updates",
        "/v1/rounds/2147483648/updates",
    ],
)
def test_round_ids_are_ascii_digits_within_range(client, store, open_round, path):
    headers, _ = open_round
    before = store.snapshot()
    response = client.post(path, data=update_body(), headers={**headers, "Content-Type": "application/octet-stream"})
    assert_error(response, 404, "not_found")
    assert store.snapshot() == before and rejections(store) == []


def assignments(store, round_id: int) -> set[str]:
    with closing(store.connect()) as db:
        return {r[0] for r in db.execute("SELECT device_id FROM assignments WHERE round_id = ?", (round_id,))}


def test_a_device_that_took_a_task_and_never_reported_sits_out_longer_each_time(client, store, driver):
    """Cohort of 3 (target 2). A device that misses a round is told to wait
    ("deferred") through the next round (then 2, 4 ... after further misses)."""
    from coordinator import selection

    assert selection.exclusion_rounds(1) == 1 and selection.exclusion_rounds(3) == 4
    assert selection.exclusion_rounds(100) == selection.MAX_EXCLUSION_ROUNDS
    honest = [register(client) for _ in range(2)]
    idle = register(client)
    assert driver.step()
    task = take_task(client, idle)
    driver.clock.now += driver.config.round_timeout_s  # nobody reports: abandoned, retried
    assert driver.step()
    answer = client.post("/v1/checkin", headers=idle).json
    assert answer["status"] == "wait" and answer["reason"] == "deferred"
    for seed, headers in enumerate(honest):
        retry = take_task(client, headers)
        assert retry["round_id"] == task["round_id"] + 1
        assert upload(client, headers, retry["round_id"], update_body(seed=seed)).status_code == 202
    assert driver.step()  # round 1 commits, round 2 (id 3) opens: the idle device may come back
    take_task(client, idle)


def test_a_new_round_seats_devices_that_have_reported_first_and_newcomers_in_the_slack(client, store, driver):
    """Once at least target_reports devices have reported, devices that never have get
    only the over-selection slack (cohort - target = 1 here) while a round is young."""
    from coordinator import rounds

    veterans = [client.post("/v1/devices").json["device_id"] for _ in range(2)]
    newcomers = [client.post("/v1/devices").json["device_id"] for _ in range(3)]
    with closing(store.connect()) as db, store.transaction(db):
        db.execute(f"UPDATE devices SET reports = 1 WHERE id IN ({', '.join('?' * len(veterans))})", veterans)
        round_id = rounds.begin_round(db, driver.config, driver.clock(), candidates=[*newcomers, *veterans])
    assert assignments(store, round_id) == {*veterans, newcomers[0]}


def test_newcomers_checking_in_get_only_the_slack_while_the_round_is_young(client, store, driver):
    import time

    from coordinator import selection

    veterans = [client.post("/v1/devices").json for _ in range(2)]
    with closing(store.connect()) as db, store.transaction(db):
        db.execute("UPDATE devices SET reports = 1 WHERE id IN (?, ?)", [v["device_id"] for v in veterans])
    driver.clock.now = time.time()  # the API's clock: the round is young for YOUNG_ROUND_S
    assert driver.step()
    newcomers = [register(client) for _ in range(2)]
    take_task(client, newcomers[0])  # the one seat of slack
    answer = client.post("/v1/checkin", headers=newcomers[1]).json
    assert answer["status"] == "wait" and answer["reason"] == "deferred" and answer["retry_after"] <= selection.DEFERRED_RETRY_S
    for veteran in veterans:
        take_task(client, {"Authorization": f"Bearer {veteran['token']}"})


def test_an_update_that_ruins_the_model_alone_is_left_out_and_its_device_sits_out(client, store, driver, open_round):
    """Within every bound, one device claims a billion examples and sends the largest
    values allowed: a weighted mean would be ruined (and honest devices could train on
    it no more). The round is screened: that update is left out, the honest one is
    committed, and the attacker is kept out of the next rounds."""
    headers, task = open_round
    attacker = second_device(client, task)
    poison = update_body(
        arrays=[np.full(s.shape, limits.MAX_ABS_UPDATE * (-1) ** i, np.float32) for i, s in enumerate(SPEC)],
        num_examples=str(limits.MAX_EXAMPLES),
    )
    assert upload(client, attacker, task["round_id"], poison).status_code == 202
    assert upload(client, headers, task["round_id"], update_body(seed=3, num_examples="40")).status_code == 202
    base, _ = wire.decode(client.get(f"/v1/checkpoints/{task['checkpoint_sha256']}").data, SPEC)
    assert driver.step()
    status = strict_json(client.get("/v1/status").get_data(as_text=True))
    (entry,) = status["history"]
    assert status["model"]["version"] == 1 and entry["loss"] < 10
    (record, _) = client.get("/v1/rounds").json["rounds"]
    assert record["metrics"]["excluded_updates"]["count"] == 1 and record["metrics"]["num_examples"] == 40
    new, _ = wire.decode(client.get(status["model"]["url"]).data, SPEC)
    honest = random_delta(3)
    for b, n, d in zip(base, new, honest):
        np.testing.assert_allclose(n, b + d, rtol=1e-5, atol=1e-6)  # the honest update alone
    answer = client.post("/v1/checkin", headers=attacker).json
    assert answer["status"] == "wait" and answer["reason"] == "deferred"


def test_a_round_whose_every_update_ruins_the_model_is_abandoned(client, driver, open_round):
    headers, task = open_round
    for device in (headers, second_device(client, task)):
        poison = update_body(arrays=filled(limits.MAX_ABS_UPDATE), num_examples="10")
        assert upload(client, device, task["round_id"], poison).status_code == 202
    assert driver.step()
    status = client.get("/v1/status").json
    assert status["model"]["version"] == 0 and status["abandoned"][0]["reason"] == "diverged"
    assert "from which the run goes on" in status["abandoned"][0]["detail"]


def test_a_device_repeating_a_refused_upload_is_logged_once(client, store, open_round):
    _, task = open_round
    stranger = register(client)
    for _ in range(20):
        assert_error(upload(client, stranger, task["round_id"], update_body()), 403, "not_selected")
    assert rejections(store) == [(task["round_id"], "not_selected", 0)]


def test_devices_still_training_when_a_round_closes_on_target_are_not_counted_as_misses(client, store, driver, open_round):
    """Over-selection seats more devices than the target: those not done when the target
    is reached were not late, and take part in the next round."""
    headers, task = open_round
    second, slow = second_device(client, task), second_device(client, task)
    for seed, device in enumerate((headers, second)):
        assert upload(client, device, task["round_id"], update_body(seed=seed)).status_code == 202
    assert driver.step()  # closes on its target of 2; the third device was still training
    assert take_task(client, slow)["round_id"] != task["round_id"]


def test_one_device_holds_at_most_one_check_in_in_the_lobby():
    from coordinator.lobby import Lobby

    lobby = Lobby()
    assert lobby.enter("device") == 0 and lobby.enter("device") is None and lobby.waiting() == ["device"]
    lobby.leave("device")
    assert lobby.enter("device") == 0
