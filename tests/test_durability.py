"""SIGKILL the real coordinator process at several points of a run, restart it each time,
and compare its final model with an uninterrupted run's.

The devices here are scripted by the test (no retries, one request at a time, in a
fixed order), so both runs receive the same updates in the same order. An update is a
deterministic function of the device, the round and the model it was given, so any
update lost, doubled or folded from the wrong base changes every later model: equal
final checkpoints mean every acknowledged update was kept exactly once.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
from contextlib import closing
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import psutil
import pytest
import requests

from coordinator.store import Store
from edgefl import wire
from edgefl.app.launcher import edgefl_command, start_logged, stop_process, wait_for_server
from edgefl.config import RunConfig, command_line
from edgefl.models import model_spec

pytestmark = pytest.mark.e2e

CONFIG = RunConfig(model="cnn_small", rounds=3, target_reports=3, min_reports=3, over_selection=1.0, round_timeout_s=600)
SPEC = model_spec(CONFIG.model, CONFIG.dataset)
DEVICES = 3


class Coordinator:
    """``edgefl serve`` on one instance directory, started and killed by the test."""

    def __init__(self, root: Path, db_url: str | None = None, config: RunConfig = CONFIG):
        root.mkdir()
        self.config = config
        self.db_flags = ["--db", db_url] if db_url else []
        self.instance = root / "instance"
        self.log = root / "serve.log"
        self.process = None
        self.url = None
        self.pids: set[int] = set()

    def start(self, hold_at: str = "") -> None:
        self.log.write_text("")  # a fresh log per start: holds are found in it
        env = {**os.environ, "EDGEFL_HOLD_AT": hold_at}
        command = edgefl_command(
            "serve", "--instance", str(self.instance), "--port", "0", *self.db_flags, *command_line(self.config)
        )
        self.process = start_logged(command, self.log, env=env)
        self.pids.add(self.process.pid)
        self.url = wait_for_server(self.instance, self.process, self.log)

    def wait_until_held(self, name: str, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while f"edgefl: holding at {name}" not in self.log.read_text():
            assert self.process.poll() is None and time.monotonic() < deadline, self.log.read_text()[-2000:]
            time.sleep(0.05)

    def wait_for_connections(self, count: int, timeout_s: float = 10) -> None:
        """Until the server holds ``count`` established connections on its port."""
        port = urlparse(self.url).port
        deadline = time.monotonic() + timeout_s

        def established() -> int:
            connections = psutil.Process(self.process.pid).net_connections(kind="tcp")
            return sum(1 for c in connections if c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED)

        while established() < count:
            assert time.monotonic() < deadline, f"the server never held {count} connections"
            time.sleep(0.02)

    def kill(self) -> None:
        self.process.kill()  # SIGKILL: no handler, no cleanup
        self.process.wait(timeout=30)

    def stop(self) -> None:
        stop_process(self.process)


class ScriptedDevice:
    def __init__(self, index: int, token: str):
        self.index = index
        self.token = token
        self.acknowledged: list[tuple[int, str]] = []  # (round id, sha256 of the update sent)

    @property
    def auth(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"}

    def checkin(self, url: str) -> dict:
        answer = requests.post(f"{url}/v1/checkin", headers=self.auth, timeout=60)
        answer.raise_for_status()
        return answer.json()

    @property
    def num_examples(self) -> int:
        return 10 * (self.index + 1)

    def delta_for(self, url: str, task: dict) -> list[np.ndarray]:
        """A deterministic function of the device, the round and the model it was sent."""
        checkpoint = requests.get(f"{url}/v1/checkpoints/{task['checkpoint_sha256']}", timeout=60)
        checkpoint.raise_for_status()
        weights, _ = wire.decode(checkpoint.content, SPEC)
        rng = np.random.default_rng([self.index, task["round_number"]])
        return [(-0.05 * w + 0.01 * rng.standard_normal(w.shape)).astype(w.dtype) for w in weights]

    def update_for(self, url: str, task: dict) -> bytes:
        metadata = {"num_examples": str(self.num_examples), "metrics": '{"train_loss": 1.0}'}
        return wire.encode([s.name for s in SPEC], self.delta_for(url, task), metadata)

    def upload(self, url: str, round_id: int, body: bytes) -> None:
        answer = requests.post(f"{url}/v1/rounds/{round_id}/updates", data=body, headers=self.auth, timeout=60)
        assert answer.status_code == 202, answer.text
        self.acknowledged.append((round_id, hashlib.sha256(body).hexdigest()))

    def train(self, url: str) -> tuple[int, bytes]:
        """Check in for a task and build its update: (round id, body)."""
        answer = self.checkin(url)
        assert answer["status"] == "task", answer
        return answer["task"]["round_id"], self.update_for(url, answer["task"])


def register(url: str) -> list[ScriptedDevice]:
    devices = []
    for index in range(DEVICES):
        answer = requests.post(f"{url}/v1/devices", timeout=30)
        assert answer.status_code == 201
        devices.append(ScriptedDevice(index, answer.json()["token"]))
    return devices


def play_round(url: str, devices: list[ScriptedDevice]) -> None:
    for device in devices:
        device.upload(url, *device.train(url))


def wait_finished(url: str, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = requests.get(f"{url}/v1/status", timeout=30).json()
        if status["run"]["status"] == "finished":
            return status
        time.sleep(0.1)
    raise AssertionError("the run did not finish")


def wait_round_open(url: str, number: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while (requests.get(f"{url}/v1/status", timeout=30).json()["round"] or {}).get("number") != number:
        assert time.monotonic() < deadline, f"round {number} did not open"
        time.sleep(0.05)


class Unanswered(threading.Thread):
    """A request made in the background that the test expects to be cut off by a kill."""

    def __init__(self, call, *args):
        super().__init__()
        self.call, self.args, self.error = call, args, None

    def run(self) -> None:
        try:
            self.call(*self.args)
        except requests.ConnectionError as error:
            self.error = error

    def assert_cut_off(self) -> None:
        self.join(timeout=30)
        assert isinstance(self.error, requests.ConnectionError), "the request was answered"


def send_half(url: str, round_id: int, device: ScriptedDevice, body: bytes) -> socket.socket:
    """An upload whose connection is cut mid-body: headers and half the bytes, no more."""
    address = urlparse(url)
    conn = socket.create_connection((address.hostname, address.port), timeout=10)
    head = (
        f"POST /v1/rounds/{round_id}/updates HTTP/1.1\r\nHost: {address.netloc}\r\n"
        f"Authorization: Bearer {device.token}\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    conn.sendall(head + body[: len(body) // 2])
    return conn


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The final model of the run with the same devices, updates and order, no kills."""
    reference = Coordinator(tmp_path_factory.mktemp("durability") / "reference")
    try:
        reference.start()
        devices = register(reference.url)
        for number in range(1, CONFIG.rounds + 1):
            wait_round_open(reference.url, number)
            play_round(reference.url, devices)
        expected = wait_finished(reference.url)["model"]["sha256"]
    finally:
        reference.stop()
    yield expected
    assert not [p for p in reference.pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


def test_sigkill_at_any_point_loses_no_acknowledged_update(tmp_path, uninterrupted, db_url):
    """On SQLite and on a PostgreSQL server; the reference run is on SQLite."""
    coordinator = Coordinator(tmp_path / "killed", db_url)
    try:
        coordinator.start()
        url = coordinator.url
        devices = register(url)
        d0, d1, d2 = devices
        wait_round_open(url, 1)
        d0.upload(url, *d0.train(url))
        d1.upload(url, *d1.train(url))
        round_id, body = d2.train(url)

        # 1. Killed during a check-in (d0, already reported, is held for the next round)
        #    and mid-upload (half of d2's body sent).
        held = Unanswered(d0.checkin, url)
        held.start()
        cut = send_half(url, round_id, d2, body)
        coordinator.wait_for_connections(2)  # both are in the server's hands
        coordinator.kill()
        held.assert_cut_off()
        cut.close()

        # 2. Killed with d2's update written but not committed: it never got an answer.
        coordinator.start(hold_at="update_stored")
        url = coordinator.url
        assert d0.checkin(url)["status"] == "wait"  # same run, same round: d0 already reported
        attempt = Unanswered(d2.upload, url, round_id, body)
        attempt.start()
        coordinator.wait_until_held("update_stored")
        coordinator.kill()
        attempt.assert_cut_off()

        # 3. Killed while aggregating round 1: d2 uploads again and is acknowledged.
        coordinator.start(hold_at="aggregating")
        url = coordinator.url
        d2.upload(url, round_id, body)
        coordinator.wait_until_held("aggregating")
        coordinator.kill()

        # 4. Killed after committing round 2, before its update blobs are discarded and
        #    its model evaluated.
        coordinator.start(hold_at="committed@2")
        url = coordinator.url
        wait_round_open(url, 2)
        for device in devices:
            device.upload(url, *device.train(url))
        coordinator.wait_until_held("committed@2")
        coordinator.kill()

        # 5. Killed right after an acknowledged upload, before the driver folded it.
        coordinator.start()
        url = coordinator.url
        wait_round_open(url, 3)
        d0.upload(url, *d0.train(url))
        coordinator.kill()

        # 6. The rest of the run, uninterrupted.
        coordinator.start()
        url = coordinator.url
        d1.upload(url, *d1.train(url))
        d2.upload(url, *d2.train(url))
        status = wait_finished(url)
        history = requests.get(f"{url}/v1/rounds", timeout=30).json()["rounds"]
    finally:
        coordinator.stop()

    assert status["model"]["sha256"] == uninterrupted, "the killed run's final model differs from the uninterrupted run's"
    assert [(r["number"], r["status"], r["reported"]) for r in history] == [(n, "committed", 3) for n in (1, 2, 3)]
    assert all(r["evaluated_at"] is not None for r in history)

    with closing(Store(coordinator.instance, db_url).connect()) as db:
        kept = {tuple(row) for row in db.execute("SELECT round_id, blob_sha256 FROM updates")}
        needed = {sha for row in db.execute("SELECT sha256, server_state_sha256 FROM checkpoints") for sha in row}
        needed |= {row[0] for row in db.execute("SELECT sha256 FROM artefacts")}  # the phone files served now
    acknowledged = {ack for device in devices for ack in device.acknowledged}
    assert len(acknowledged) == DEVICES * CONFIG.rounds and acknowledged == kept
    blobs = Store(coordinator.instance, db_url).blobs.names()  # files, or rows of PostgreSQL's blobs table
    assert blobs == needed, "update blobs, or blobs a crash left behind, outlived their rounds"
    assert not [p for p in coordinator.pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


def test_two_coordinators_on_separate_instances_share_only_the_database(tmp_path, uninterrupted, postgres):
    """Two ``serve`` processes, each on an instance directory of its own, with one
    PostgreSQL URL between them. Devices register and upload through either. The one
    that holds the round-driver lease aggregates, reading updates the other one took.
    It is SIGKILLed right after acknowledging an update; the other takes the lease over
    and finishes the run. A third, started afterwards on an empty directory, serves a
    device too. The final model is the uninterrupted run's, every round was committed
    once, and no blob was written to an instance directory."""
    db_url = postgres.new_database()
    a, b, c = (Coordinator(tmp_path / name, db_url) for name in "abc")
    try:
        a.start()
        deadline = time.monotonic() + 60
        while "driving the rounds" not in a.log.read_text():  # a holds the lease before b exists
            assert time.monotonic() < deadline, a.log.read_text()[-2000:]
            time.sleep(0.05)
        b.start()
        devices = register(a.url)
        d0, d1, d2 = devices
        wait_round_open(b.url, 1)
        d0.upload(a.url, *d0.train(a.url))
        d1.upload(b.url, *d1.train(b.url))  # a aggregates an update that b acknowledged
        d2.upload(a.url, *d2.train(b.url))  # a task from b, its checkpoint from b, the upload to a

        wait_round_open(b.url, 2)
        d0.upload(a.url, *d0.train(a.url))
        a.kill()  # the lease holder, right after acknowledging d0's update
        for device in (d1, d2):
            device.upload(b.url, *device.train(b.url))
        wait_round_open(b.url, 3)  # b took the lease over and aggregated d0's update from a
        c.start()
        d0.upload(c.url, *d0.train(c.url))
        for device in (d1, d2):
            device.upload(b.url, *device.train(b.url))
        status = wait_finished(b.url)
    finally:
        for coordinator in (c, b, a):  # c first: b, stopping, hands the lease on
            if coordinator.process is not None:
                coordinator.stop()

    assert status["model"]["sha256"] == uninterrupted, "an update was lost, doubled or folded twice"
    assert "driving the rounds" in b.log.read_text() and "driving the rounds" not in c.log.read_text()
    with closing(Store(tmp_path / "b" / "instance", db_url).connect()) as db:
        rounds = [tuple(row) for row in db.execute("SELECT number, status FROM rounds ORDER BY id")]
        versions = [row[0] for row in db.execute("SELECT version FROM checkpoints ORDER BY version")]
    assert rounds == [(1, "committed"), (2, "committed"), (3, "committed")] and versions == [0, 1, 2, 3]
    for coordinator in (a, b, c):
        assert not [p for p in (coordinator.instance / "blobs").rglob("*") if p.is_file()]
        assert not [p for p in coordinator.pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


SECURE = RunConfig(**{**json.loads(CONFIG.to_json()), "aggregator": "secure", "rounds": 2, "secagg_phase_timeout_s": 600})


class SecureDevice(ScriptedDevice):
    """A scripted device of a secure run: its SecAgg+ session, one message at a time."""

    def begin(self, url: str) -> None:
        from device_sim.agent import SecureSession
        from edgefl.secagg.quantize import flatten, secure_mean_inputs

        answer = self.checkin(url)
        assert answer["status"] == "task", answer
        task = answer["task"]
        bounds = task["secure"]
        delta = self.delta_for(url, task)
        value = secure_mean_inputs(
            [s.name for s in SPEC], delta, self.num_examples, bounds["value_bound"], bounds["weight_bound"]
        )
        self.session = SecureSession(task["round_id"], flatten(value))

    def post(self, url: str, message) -> requests.Response:
        from edgefl.protocol import SecAggKeys, SecAggReveal, SecAggShares

        path = f"{url}/v1/rounds/{self.session.round_id}/secagg/"
        if isinstance(message, bytes):
            return requests.post(
                path + "masked", data=message, headers={**self.auth, "Content-Type": "application/octet-stream"}, timeout=60
            )
        kind = {SecAggKeys: "keys", SecAggShares: "shares", SecAggReveal: "reveal"}[type(message)]
        return requests.post(path + kind, json=message.model_dump(mode="json"), headers=self.auth, timeout=60)

    def message(self, url: str, phase: str, timeout_s: float = 60):
        """What the round asks of this device once it is in ``phase``."""
        from edgefl.protocol import SecAggView

        if phase == "advertise_keys":
            return self.session.keys()
        deadline = time.monotonic() + timeout_s
        while True:
            view = SecAggView.model_validate(
                requests.get(f"{url}/v1/rounds/{self.session.round_id}/secagg", headers=self.auth, timeout=60).json()
            )
            if view.phase == phase:
                return self.session.answer(view)
            assert time.monotonic() < deadline, f"the round never reached {phase} (it is {view.phase})"
            time.sleep(0.05)

    def send(self, url: str, phase: str) -> None:
        answer = self.post(url, self.message(url, phase))
        assert answer.status_code == 202, answer.text


PHASES = ("advertise_keys", "share_keys", "masked_input", "unmask")


def play_secure_round(url: str, devices: list[SecureDevice]) -> None:
    for device in devices:
        device.begin(url)
    for phase in PHASES:
        for device in devices:
            device.send(url, phase)


def test_sigkill_in_every_phase_of_a_secure_round_loses_nothing(tmp_path):
    """A secure run's coordinator is SIGKILLed once in each SecAgg+ phase (mid-message
    in one, between the blob and its row in another, while aggregating in the last),
    and restarted: every acknowledged message is kept, an unanswered one is sent again,
    and the run ends with the model of an uninterrupted secure run (the sums are exact,
    so the fresh masks of each run change nothing)."""
    reference = Coordinator(tmp_path / "reference", config=SECURE)
    try:
        reference.start()
        devices = [SecureDevice(d.index, d.token) for d in register(reference.url)]
        for number in (1, 2):
            wait_round_open(reference.url, number)
            play_secure_round(reference.url, devices)
        expected = wait_finished(reference.url)["model"]["sha256"]
    finally:
        reference.stop()

    coordinator = Coordinator(tmp_path / "killed", config=SECURE)
    try:
        coordinator.start()
        url = coordinator.url
        d0, d1, d2 = devices = [SecureDevice(d.index, d.token) for d in register(url)]
        wait_round_open(url, 1)
        for device in devices:
            device.begin(url)
        # Advertise keys: killed once two devices' keys are acknowledged.
        d0.send(url, "advertise_keys")
        d1.send(url, "advertise_keys")
        coordinator.kill()
        coordinator.start()
        url = coordinator.url
        assert d0.post(url, d0.session.keys()).status_code == 409  # kept: a duplicate now
        d2.send(url, "advertise_keys")
        # Share keys: killed mid-request (the blob of d1's shares written, no row yet).
        d0.send(url, "share_keys")
        shares = d1.message(url, "share_keys")
        coordinator.kill()
        coordinator.start(hold_at="update_stored")
        url = coordinator.url
        attempt = Unanswered(d1.post, url, shares)
        attempt.start()
        coordinator.wait_until_held("update_stored")
        coordinator.kill()
        attempt.assert_cut_off()
        coordinator.start()
        url = coordinator.url
        assert d1.post(url, shares).status_code == 202  # it was never acknowledged: sent again
        d2.send(url, "share_keys")
        # Masked input: killed between two devices' inputs.
        d0.send(url, "masked_input")
        coordinator.kill()
        coordinator.start()
        url = coordinator.url
        d1.send(url, "masked_input")
        d2.send(url, "masked_input")
        # Unmask: killed while aggregating, after every reveal.
        coordinator.kill()
        coordinator.start(hold_at="aggregating")
        url = coordinator.url
        for device in devices:
            device.send(url, "unmask")
        coordinator.wait_until_held("aggregating")
        coordinator.kill()
        coordinator.start()
        url = coordinator.url
        wait_round_open(url, 2)
        play_secure_round(url, devices)
        status = wait_finished(url)
        history = requests.get(f"{url}/v1/rounds", timeout=30).json()["rounds"]
    finally:
        coordinator.stop()
    assert [(r["number"], r["status"], r["metrics"]["secagg"]["masked"]) for r in history] == [
        (1, "committed", 3),
        (2, "committed", 3),
    ]
    assert status["model"]["sha256"] == expected, "the killed secure run's final model differs from the uninterrupted one's"
    gone = reference.pids | coordinator.pids
    assert not [p for p in gone if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
