"""Devices as agents: the state machine driven by scripted answers and by the in-process
coordinator, the host's scheduler, and a host of 50 devices in one process against a
live coordinator. (A little over 400 lines: the scripted client and tiny learners the
agent tests share live here, beside the one story they tell.)"""

from __future__ import annotations

import argparse
import hashlib
import json
import threading
import time

import numpy as np
import psutil
import pytest

from device_sim.agent import DeviceAgent, State
from device_sim.host import DeviceHost
from device_sim.settings import DeviceSettings, add_arguments, command_line, flag_of, from_arguments
from edgefl import wire
from edgefl.client import ProtocolError, Traffic
from edgefl.protocol import CheckinAnswer, DeviceRegistration, UpdateAccepted
from tests.device_helpers import CHECKPOINT, FINISHED, SHA, TINY, WAIT, ScriptedClient, TinyLearner, TinyLearners, shard, task
from tests.processes import assert_all_gone, descendant_pids


def agent_with(client, runtime="keras") -> DeviceAgent:
    return DeviceAgent(3, runtime, shard(16), shard(4), client, seed=0)


def drive(agent: DeviceAgent, learners, limit: int = 100) -> list[tuple[State, float]]:
    """Step the agent to its end on a clock that jumps to each wake-up; (state, wait) per step."""
    now, steps = 1000.0, []
    while not agent.done and len(steps) < limit:
        state = agent.state
        wake = agent.step(now, learners)
        steps.append((state, (wake - now) if wake is not None else None))
        now = wake if wake is not None else now
    assert agent.done
    return steps


def test_a_held_check_in_waits_its_retry_after_from_the_answer_and_an_unreadable_answer_backs_off(monkeypatch):
    """The coordinator's lobby may hold a check-in for seconds; the device then waits
    the whole ``retry_after`` from the answer, not what is left of it from the question.
    An answer it cannot read (a newer coordinator's, say) is asked again later."""
    import device_sim.agent as agent_module

    clock = [500.0]
    monkeypatch.setattr(agent_module.time, "monotonic", lambda: clock[0])

    class HeldClient(ScriptedClient):
        def checkin(self):
            clock[0] += 8.0  # held in the lobby
            answer = super().checkin()
            if isinstance(answer, Exception):
                raise answer
            return answer

    client = HeldClient(
        [CheckinAnswer(status="wait", retry_after=2.0, reason="reported"), ProtocolError(200, "bad_answer", "unreadable")]
    )
    agent = agent_with(client)
    agent.state = State.CHECK_IN
    assert agent.step(1000.0, TinyLearners()) == pytest.approx(1000.0 + 8.0 + 2.0)
    assert agent.step(1010.0, TinyLearners()) == pytest.approx(1010.0 + 8.0 + 5.0) and not agent.done


def test_a_device_registers_trains_uploads_and_stops_when_told():
    client = ScriptedClient([WAIT, task(1), task(2), FINISHED])
    agent = agent_with(client)
    steps = drive(agent, TinyLearners())
    assert [p for p, _ in steps] == [
        State.REGISTER,
        State.CHECK_IN,  # wait: called again after retry_after
        State.CHECK_IN,
        State.FETCH_CHECKPOINT,
        State.TRAIN,
        State.UPLOAD,
        State.CHECK_IN,  # the same checkpoint: cached by sha256, straight to training
        State.TRAIN,
        State.UPLOAD,
        State.CHECK_IN,
    ]
    # A wait counts from the answer (the step's own few microseconds included).
    assert steps[1][1] == pytest.approx(2.5, abs=0.05) and all(wait == pytest.approx(0, abs=0.05) for _, wait in steps[2:-1])
    assert client.downloads == ["checkpoint"]
    s = agent.summary
    assert (s.device_id, s.rounds_trained, s.stopped_because) == ("device-1", 2, "run_finished")
    assert s.bytes_down == len(CHECKPOINT) and s.bytes_up == sum(len(b) for b in client.bodies)
    delta, metadata = wire.decode(client.bodies[0], TINY)
    assert np.allclose(delta[0], 0.2)  # two batches of 10 from 16 examples, each step +0.1
    metrics = json.loads(metadata["metrics"])
    assert metadata["num_examples"] == "16" and metrics["holdout_examples"] == 4
    assert metrics["holdout_accuracy_global"] == metrics["holdout_accuracy_personalized"] == 0.5


@pytest.mark.parametrize(
    "refusal, counter",
    [
        (ProtocolError(409, "duplicate_update", "stored already"), "rounds_trained"),  # our lost 202
        (ProtocolError(409, "round_closed", "too late"), "late_uploads"),
        (ProtocolError(422, "non_finite", "no"), "refused_uploads"),
        (ProtocolError(413, "too_large", "no"), "refused_uploads"),
    ],
)
def test_refused_uploads_are_counted_and_the_device_goes_on(refusal, counter):
    agent = agent_with(ScriptedClient([task(1), FINISHED], uploads=[refusal]))
    drive(agent, TinyLearners())
    counts = {k: getattr(agent.summary, k) for k in ("rounds_trained", "late_uploads", "refused_uploads")}
    assert counts == {k: int(k == counter) for k in counts} and agent.summary.stopped_because == "run_finished"


@pytest.mark.parametrize("status", [401, 403])
def test_a_device_the_coordinator_does_not_know_or_did_not_select_stops(status):
    agent = agent_with(ScriptedClient([task(1), FINISHED], uploads=[ProtocolError(status, "unauthorized", "who?")]))
    with pytest.raises(ProtocolError):
        drive(agent, TinyLearners())
    assert agent.done and agent.summary.rounds_trained == 0


def test_the_task_names_the_codec_and_a_new_checkpoint_is_fetched():
    other = wire.encode(["w"], [np.zeros(3, np.float32)])
    client = ScriptedClient([task(1, codec="quantized:8"), task(2, sha=hashlib.sha256(other).hexdigest()), FINISHED])
    drive(agent_with(client), TinyLearners())
    assert client.downloads == ["checkpoint", "checkpoint"]
    assert wire.read_header(client.bodies[0])[1]["quantization_bits"] == "8"
    assert "quantization_bits" not in (wire.read_header(client.bodies[1])[1] or {})


def test_a_litert_device_keeps_its_training_file_until_the_batch_size_changes():
    client = ScriptedClient([task(1, 10), task(2, 10), task(3, 20), task(4, 20), FINISHED], training_batches=[10, 10, 20])
    learners = TinyLearners()
    steps = drive(agent_with(client, "litert"), learners)
    assert client.downloads == ["training file", "checkpoint", "training file", "training file"]
    # The coordinator still offered the batch-10 file for round 3: the device skipped that round.
    skipped = [wait for state, wait in steps if state is State.FETCH_TRAINING_FILE]
    assert skipped == [0, 1.0, 0]
    assert learners.built == [10, 10, 20]  # per step from the host's cache; the agent keeps the file


def test_the_host_runs_many_waiting_agents_on_a_few_threads():
    """200 agents each told to wait five times: the scheduler's heap holds them, not 200 threads."""
    waits = [CheckinAnswer(status="wait", retry_after=0.01)] * 5
    agents = [DeviceAgent(i, "keras", shard(16), shard(4), ScriptedClient([*waits, FINISHED])) for i in range(200)]
    threads_before = threading.active_count()
    peak = [0]
    done = []

    def on_done(agent, outcome):
        peak[0] = max(peak[0], threading.active_count() - threads_before)
        done.append((agent.index, outcome))

    host = DeviceHost(agents, dataset="digits", threads=2, learners=TinyLearners(), on_done=on_done)
    outcomes = host.run()
    assert outcomes == {i: None for i in range(200)} and len(done) == 200
    assert host.training_threads == 2 and peak[0] <= host.training_threads + host.poll_threads + host.transfer_threads < len(
        agents
    )
    deadline = time.monotonic() + 10
    while threading.active_count() > threads_before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() == threads_before  # the host's threads end with it


def test_a_failing_agent_fails_alone():
    bad = agent_with(ScriptedClient([task(1)], uploads=[ProtocolError(401, "unauthorized", "who?")]))
    good = DeviceAgent(4, "keras", shard(16), shard(4), ScriptedClient([task(1), FINISHED]))
    outcomes = DeviceHost([bad, good], dataset="digits", threads=1, learners=TinyLearners()).run()
    assert isinstance(outcomes[3], ProtocolError) and outcomes[4] is None and good.summary.rounds_trained == 1


def test_device_settings_are_declared_once_and_checked():
    settings = DeviceSettings(coordinator="http://h:1", num_devices=7, partition="iid", seed=3, runtime="keras,litert")
    line = command_line(settings)
    assert line[line.index("--data-seed") + 1] == "3" and flag_of("num_devices") == "--num-devices"
    assert [settings.runtime_of(i) for i in range(3)] == ["keras", "litert", "keras"]
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert from_arguments(parser.parse_args(line)) == settings
    for bad, says in [
        ({"holdout": 1.0}, "--holdout must be"),
        ({"runtime": "tpu"}, "bad --runtime"),
        ({"partition": "x"}, "bad partition"),
    ]:
        with pytest.raises(ValueError, match=says):
            DeviceSettings(**bad)


# --- against the in-process coordinator ----------------------------------------------


class FlaskDeviceClient:
    """A device's calls through Flask's test client, with CoordinatorClient's interface.
    ``lose_first_202``: the first upload's answer is lost and the upload sent again, as
    the real client's retry does."""

    def __init__(self, app, *, lose_first_202=False):
        self.http, self.lose_first_202 = app.test_client(), lose_first_202
        self.token: str | None = None
        self.traffic = Traffic()
        self.network_faults = 0

    def _call(self, method, path, answer=None, headers=None, **kwargs):
        headers = {**(headers or {}), **({"Authorization": f"Bearer {self.token}"} if self.token else {})}
        response = self.http.open(path, method=method, headers=headers, **kwargs)
        if response.status_code >= 400:
            raise ProtocolError(response.status_code, response.json["error"], response.json["detail"])
        return answer.model_validate(response.json) if answer else response.data

    def register(self, secret=None):
        registration = self._call("POST", "/v1/devices", DeviceRegistration)
        self.token = registration.token
        return registration.device_id

    def checkin(self):
        return self._call("POST", "/v1/checkin", CheckinAnswer)

    def download_checkpoint(self, sha256):
        data = self._call("GET", f"/v1/checkpoints/{sha256}")
        self.traffic.bytes_down += len(data)
        return data

    def upload_update(self, round_id, body):
        send = lambda: self._call(  # noqa: E731
            "POST",
            f"/v1/rounds/{round_id}/updates",
            UpdateAccepted,
            data=body,
            headers={"Content-Type": "application/octet-stream"},
        )
        if self.lose_first_202:
            self.lose_first_202 = False
            send()
        answer = send()
        self.traffic.bytes_up += len(body)
        return answer


def step_until(agent, state, learners):
    while agent.state is not state:
        agent.step(time.monotonic(), learners)


def test_agents_against_the_coordinator_count_their_rounds_late_uploads_and_lost_answers(tmp_path, small_parts):
    """Round 1 (two reports close it, three devices selected): one device's 202 is lost and
    its retry answered duplicate_update (it trained), one reports normally, the third
    uploads after the round closed (late); a device whose token the coordinator does not
    know stops."""
    from edgefl.config import RunConfig
    from tests.api_helpers import build_coordinator

    config = RunConfig(model="cnn_small", rounds=2, target_reports=2, min_reports=1, over_selection=1.5, round_timeout_s=60)
    app, driver = build_coordinator(tmp_path / "instance", small_parts, config)
    learners = TinyLearners(keras=small_parts[0])
    data = shard(20)
    lost, normal, late = (
        DeviceAgent(i, "keras", data, shard(5), FlaskDeviceClient(app, lose_first_202=i == 0)) for i in range(3)
    )
    assert driver.step()  # opens round 1
    for agent in (lost, normal, late):
        step_until(agent, State.FETCH_CHECKPOINT, learners)  # registered and selected
    for agent in (lost, normal, late):
        step_until(agent, State.UPLOAD, learners)
    for agent in (lost, normal):
        agent.step(time.monotonic(), learners)
    assert (lost.summary.rounds_trained, normal.summary.rounds_trained) == (1, 1)
    while driver.step():  # closes, aggregates, commits and evaluates round 1, opens round 2
        pass
    late.step(time.monotonic(), learners)
    assert (late.summary.rounds_trained, late.summary.late_uploads) == (0, 1) and late.state is State.CHECK_IN
    assert all(a.summary.bytes_down > 0 for a in (lost, normal, late))

    late.client.token = "not-a-token-the-coordinator-issued"
    with pytest.raises(ProtocolError) as refused:
        late.step(time.monotonic(), learners)
    assert refused.value.status == 401 and late.done


# --- a host of 50 devices against a live coordinator ------------------------------------


def device_processes(fleet_pid: int) -> set[int]:
    try:
        children = psutil.Process(fleet_pid).children()
        return {p.pid for p in children if "device_sim" in " ".join(p.cmdline())}
    except psutil.NoSuchProcess:
        return set()


@pytest.mark.e2e
def test_a_device_host_runs_50_devices_in_one_process_against_a_live_coordinator(tmp_path):
    from edgefl.app.launcher import federation
    from edgefl.config import RunConfig

    config = RunConfig(model="cnn_small", rounds=2, target_reports=20, min_reports=20, round_timeout_s=300, client_lr=0.1)
    before = descendant_pids()
    seen: dict[int, str] = {}
    hosts: set[int] = set()

    def watch(_entry=None):
        seen.update({p: n for p, n in descendant_pids().items() if p not in before})
        hosts.update(device_processes(fed.fleet.pid))

    with federation(tmp_path, config, count=50, partition="iid", data_seed=0, device_flags=["--per-process", "50"]) as fed:
        deadline = time.monotonic() + 120
        while not hosts and time.monotonic() < deadline:
            watch()
            time.sleep(0.1)
        status = fed.follow(watch, timeout_s=600)
        watch()
        assert fed.fleet.wait(timeout=120) == 0, (tmp_path / "logs" / "devices.log").read_text()
    assert_all_gone(seen)
    assert len(hosts) == 1  # one device process for the 50 devices
    # A round closes at its target; an upload that lands before the driver closes it still counts.
    assert status.devices == 50 and all(20 <= h.reported <= config.cohort_size for h in status.history)
    assert len(status.history) == 2
    summaries = [json.loads(p.read_text()) for p in sorted((tmp_path / "logs" / "devices").glob("device-*.json"))]
    assert [s["index"] for s in summaries] == list(range(50))
    assert all(s["devices_in_process"] == 50 and s["stopped_because"] == "run_finished" for s in summaries)
    assert sum(s["rounds_trained"] for s in summaries) >= 40 and len({s["device_id"] for s in summaries}) == 50
    printed = (tmp_path / "logs" / "devices.log").read_text()
    assert "started 50 devices in 1 process" in printed
    assert printed.count("(stopped: the run is finished)") == 50
    assert [p.name for p in (tmp_path / "logs" / "devices").glob("*.log")] == ["devices-0000-0049.log"]


def test_a_keras_device_builds_no_model_code_its_operator_did_not_give_it():
    """A task names the model; building a ``file.py:fn`` or ``module:fn`` runs its code,
    so a Keras device takes that name from its own --model, never from the coordinator
    alone (which could name any module on the device's machine). LiteRT devices build
    nothing: they train the coordinator's .tflite."""
    foreign = task(1)
    foreign.task.model = "os:getcwd"
    refusing = agent_with(ScriptedClient([foreign]))
    with pytest.raises(ProtocolError, match="model_not_given.*--model os:getcwd"):
        drive(refusing, TinyLearners())
    trusting = DeviceAgent(3, "keras", shard(16), shard(4), ScriptedClient([foreign, FINISHED]), own_model="os:getcwd")
    drive(trusting, TinyLearners())
    litert = agent_with(ScriptedClient([foreign, FINISHED]), runtime="litert")
    drive(litert, TinyLearners())
    assert trusting.summary.rounds_trained == litert.summary.rounds_trained == 1


def test_a_host_decodes_a_checkpoint_once_for_all_its_agents():
    """A thousand agents trained on one checkpoint hold one copy of its weights."""
    import gc

    from device_sim.host import ThreadLearners

    learners, learner = ThreadLearners("digits"), TinyLearner()
    first = learners.decoded(SHA, CHECKPOINT, learner)
    assert learners.decoded(SHA, CHECKPOINT, learner) is first and np.allclose(first[0], 1.0)
    other = wire.encode(["w"], [np.full(3, 2.0, np.float32)])
    assert learners.decoded(hashlib.sha256(other).hexdigest(), other, learner)[0][0] == 2.0
    del first
    gc.collect()
    assert not learners._decoded  # kept only while an agent holds it
