"""What operators do through the API (pause, resume, stop, configuration changes) and
what runs with other aggregators report (DP's privacy, quantized uploads, server state
that survives a restart)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgefl import wire
from edgefl.codecs import Codec
from tests.api_helpers import (
    ADMIN,
    SPEC,
    administered,
    assert_error,
    build_coordinator,
    random_delta,
    register,
    take_task,
    update_body,
    upload,
)


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
    app, driver = build_coordinator(tmp_path / "instance", small_parts, config, db_url=db_url, admin=True)
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
    app, driver = build_coordinator(tmp_path / "instance", small_parts, config, db_url=db_url)  # a plain mean of decoded updates
    store, client = app.extensions["edgefl.store"], app.test_client()
    devices = [register(client) for _ in range(2)]
    assert driver.step()
    tasks = [take_task(client, headers) for headers in devices]
    assert [t["codec"] for t in tasks] == ["quantized:4", "quantized:4"]

    before = store.snapshot()
    float32 = upload(client, devices[0], tasks[0]["round_id"], update_body())
    assert_error(float32, 422, "wrong_tensors")
    assert "4-bit quantized" in float32.json["detail"]
    names, quantized = [s.name for s in SPEC], compression.quantized_spec(SPEC, 4)
    codes_and_bounds, _ = wire.decode(Codec(4).encode(names, random_delta(), {}, np.random.default_rng(0)), quantized)
    min_above_max = [np.array([1, -1], np.float32) if s.dtype == "F32" else a for s, a in zip(quantized, codes_and_bounds)]
    body = wire.encode([s.name for s in quantized], min_above_max, {"num_examples": "3", "quantization_bits": "4"})
    assert_error(upload(client, devices[0], tasks[0]["round_id"], body), 422, "bad_bounds")
    assert store.snapshot() == before

    deltas = [random_delta(seed) for seed in (1, 2)]
    bodies = [
        Codec(4).encode(names, d, {"num_examples": n}, np.random.default_rng(seed))
        for seed, (d, n) in enumerate(zip(deltas, ("30", "10")))
    ]
    for headers, task, body in zip(devices, tasks, bodies):
        assert upload(client, headers, task["round_id"], body).status_code == 202
    base, _ = wire.decode(client.get(f"/v1/checkpoints/{tasks[0]['checkpoint_sha256']}").data, SPEC)
    while driver.step():
        pass

    status = client.get("/v1/status").json
    new, _ = wire.decode(client.get(status["model"]["url"]).data, SPEC)
    decoded = [Codec(4).decode(body, SPEC)[0] for body in bodies]
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
    app, driver = build_coordinator(tmp_path / "instance", small_parts, config)
    store, client, server = app.extensions["edgefl.store"], app.test_client(), driver.server
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
