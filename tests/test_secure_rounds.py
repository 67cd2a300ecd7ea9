"""Secure rounds through the coordinator's API and round driver: SecAgg+'s four phases as
a plan of the lifecycle, devices dropping after each, the threshold, and every message a
dishonest device could send refused without a change of state.

Devices here are ``device_sim.agent.SecureSession``s (what a real device runs) talking
through Flask's test client; the driver steps on a clock the test moves."""

from __future__ import annotations

from contextlib import closing

import numpy as np
import pytest

from device_sim.agent import SecureSession
from edgefl.config import RunConfig
from edgefl.protocol import SecAggView
from edgefl.secagg import packing
from edgefl.secagg.quantize import SecureMeanLayout, flatten, secure_mean_inputs
from tests.api_helpers import SPEC, assert_error, build_coordinator, random_delta, register, take_task

BOUNDS = (100.0, 100_000.0)


@pytest.fixture(scope="module")
def secure_server():
    from coordinator.aggregation import FedAvgServer, ServerSettings

    return FedAvgServer(SPEC, ServerSettings.of(_config()))


def _config(**changes) -> RunConfig:
    settings = dict(
        model="cnn_small",
        aggregator="secure",
        rounds=2,
        target_reports=6,
        min_reports=3,
        over_selection=1.0,
        round_timeout_s=60,
        secagg_phase_timeout_s=10,
        secagg_degree=4,
    )
    return RunConfig(**{**settings, **changes})


class Device:
    """One device of the round: its token, its input and its SecAgg+ session."""

    def __init__(self, client, round_id: int, seed: int, examples: int):
        self.client = client
        self.headers = register(client)
        self.task = take_task(client, self.headers)
        assert self.task["round_id"] == round_id and self.task["secure"] == {"value_bound": 100.0, "weight_bound": 100000.0}
        self.delta, self.examples = random_delta(seed), examples
        self.leaves = secure_mean_inputs(self.delta, examples, *BOUNDS)
        self.session = SecureSession(round_id, flatten(self.leaves))

    def post(self, kind: str, **kwargs):
        return self.client.post(f"/v1/rounds/{self.session.round_id}/secagg/{kind}", headers=self.headers, **kwargs)

    def send_keys(self):
        return self.post("keys", json=self.session.keys().model_dump())

    def view(self) -> SecAggView:
        response = self.client.get(f"/v1/rounds/{self.session.round_id}/secagg", headers=self.headers)
        assert response.status_code == 200, response.json
        return SecAggView.model_validate(response.json)

    def answer(self):
        """Send what the round's phase asks of this device (once)."""
        message = self.session.answer(self.view())
        assert message is not None
        if isinstance(message, bytes):
            response = self.post("masked", data=message, content_type="application/octet-stream")
        else:
            response = self.post({"SecAggShares": "shares", "SecAggReveal": "reveal"}[type(message).__name__], json=message.model_dump())
        assert response.status_code == 202, response.json
        return response


def _secure_coordinator(tmp_path, small_parts, secure_server, db_url=None, **changes):
    from tests.conftest import Clock

    return build_coordinator(tmp_path / "instance", small_parts, _config(**changes), db_url=db_url, server=secure_server, clock=Clock())


def _open(driver, client, n, examples=(50, 120, 7, 300, 33, 81, 64, 10)):
    assert driver.step()  # round 1 opens
    return [Device(client, 1, seed, examples[seed % len(examples)]) for seed in range(n)]


def _phase(store, round_id=1) -> tuple[str, str]:
    with closing(store.connect()) as db:
        row = db.execute("SELECT status, phase FROM rounds WHERE id = ?", (round_id,)).fetchone()
        return row["status"], row["phase"]


def _state(store) -> tuple:
    """Everything a refused message must leave as it was: messages, rounds, blobs."""
    with closing(store.connect()) as db:
        messages = [tuple(r) for r in db.execute("SELECT round_id, phase, device_id, kind, blob_sha256 FROM messages ORDER BY id")]
        rounds_ = [tuple(r) for r in db.execute("SELECT id, status, phase, deadline_at FROM rounds ORDER BY id")]
    return messages, rounds_, sorted(store.blobs.names())


def _step_until(driver, store, phase, status="open"):
    for _ in range(5):
        if _phase(store) == (status, phase):
            return
        driver.step()
    assert _phase(store) == (status, phase)


def _expected(secure_server, devices, weights):
    """The round's model from the plain integer sum of the survivors' quantized inputs."""
    layout = secure_server.secure_layout
    total = sum(d.session.value for d in devices)
    fold = secure_server.begin(secure_server.initialize(), weights)
    return secure_server.finish(fold, layout.split(total)), total


def _run_round(driver, store, devices, *, drop_after: dict[str, list[int]] | None = None):
    """Every phase, the devices in ``drop_after[phase]`` vanishing once it closes."""
    drop_after = drop_after or {}
    alive = list(devices)
    for device in alive:
        assert device.send_keys().status_code == 202
    for phase in ("share_keys", "masked_input", "unmask"):
        driver.clock.now += 0 if len(alive) == len(devices) else 61  # a phase with dropouts closes at its deadline
        _step_until(driver, store, phase)
        alive = [d for i, d in enumerate(alive) if i not in drop_after.get(phase, [])]
        for device in alive:
            device.answer()
    driver.clock.now += 61
    return alive


def test_a_secure_round_commits_the_model_of_the_plain_integer_sum(tmp_path, small_parts, secure_server, db_url):
    app, driver = _secure_coordinator(tmp_path, small_parts, secure_server, db_url)
    client, store = app.test_client(), app.extensions["edgefl.store"]
    devices = _open(driver, client, 6)
    for device in devices:
        assert device.send_keys().status_code == 202
    assert driver.step() and _phase(store) == ("open", "share_keys")  # all 6 advertised: the target
    for phase in ("share_keys", "masked_input", "unmask"):
        assert _phase(store) == ("open", phase)
        for device in devices:
            device.answer()
        driver.step()
    for _ in range(3):
        driver.step()
    from edgefl.protocol import RoundStatus

    assert _phase(store)[0] == RoundStatus.COMMITTED
    rounds = client.get("/v1/rounds").json["rounds"]
    secagg = rounds[0]["metrics"]["secagg"]
    assert secagg | {"unmask_s": 0} == {
        "advertised": 6,
        "shared": 6,
        "masked": 6,
        "revealed": 6,
        "degree": 4,
        "threshold": 3,
        "bits": 35,
        "unmask_s": 0,
    }
    base, _ = _checkpoint(store, 0)
    expected, _ = _expected(secure_server, devices, base)
    committed, _ = _checkpoint(store, 1)
    for ours, theirs in zip(committed, expected.weights, strict=True):
        np.testing.assert_array_equal(ours, theirs)
    # ... and that is the weighted mean of the deltas, to the quantization's precision
    total = sum(d.examples for d in devices)
    for i in range(len(SPEC)):
        mean = sum(d.delta[i].astype(np.float64) * d.examples for d in devices) / total
        np.testing.assert_allclose(committed[i] - base[i], mean, atol=1e-5)


def _checkpoint(store, version):
    from edgefl import wire

    with closing(store.connect()) as db:
        (sha,) = db.execute("SELECT sha256 FROM checkpoints WHERE version = ?", (version,)).fetchone()
    return wire.decode(store.blobs.get(sha), SPEC)
