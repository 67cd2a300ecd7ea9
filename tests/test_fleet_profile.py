"""Phone behaviour: the fleet profile, each device's draw from it, the agent living by
it (eligibility, dropout, speed, upload bandwidth) and the flaky network under the real
HTTP client."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from device_sim.agent import DeviceAgent, State
from device_sim.network import FlakyNetwork, flaky_or_none
from device_sim.profile import (
    Availability,
    Dropout,
    FleetProfile,
    Network,
    ProfileError,
    Speed,
    Upload,
    behaviour_of,
    load_profile,
    parse_profile,
    profile_problem,
)
from edgefl.client import CoordinatorClient
from edgefl.config import RunConfig
from edgefl.protocol import RunStatus
from tests.api_helpers import FlakyCoordinator
from tests.device_helpers import FINISHED, WAIT, ScriptedClient, TinyLearners, shard, task

# --- the profile --------------------------------------------------------------------


def test_a_profile_says_only_what_it_changes_and_the_shipped_phone_turns_everything_on():
    assert parse_profile("") == FleetProfile()
    profile = parse_profile("[dropout]\nrate = 0.3\n[availability]\nday_s = 60\n")
    assert profile.dropout.rate == 0.3 and profile.availability.day_s == 60.0
    assert profile.speed == Speed() and profile.network == Network()
    phone = load_profile("phone")
    assert phone.dropout.rate > 0 and phone.availability.trough < phone.availability.peak < 1
    assert phone.speed.sigma > 0 and phone.network.failure_rate > 0 and phone.upload.kbps_median > 0


@pytest.mark.parametrize(
    "text, problem",
    [
        ("[dropout]\nrate = 2\n", "dropout.rate must be at least 0 and at most 1"),
        ("[dropout]\nrate = 'high'\n", "dropout.rate must be a number"),
        ("[dropout]\nrate = true\n", "dropout.rate must be a number"),
        ("[dropout]\nrat = 0.1\n", "dropout: unknown setting 'rat'"),
        ("[drop]\nrate = 0.1\n", "unknown table [drop]"),
        ("dropout = 0.1\n", "dropout: must be a table"),
        ("[availability]\npeak = 0.2\ntrough = 0.5\n", "trough must not exceed availability.peak"),
        ("[availability]\nday_s = 0\n", "availability.day_s must be above 0"),
        ("[network]\nslow_s = nan\n", "network.slow_s must be a finite number"),
        ("[network]\nslow_s = " + "9" * 400 + "\n", "network.slow_s must be a finite number"),
        ("[dropout\nrate = 0.1\n", "is not TOML"),
    ],
)
def test_a_wrong_profile_is_one_line_naming_the_table_and_key(tmp_path, text, problem):
    path = tmp_path / "fleet.toml"
    path.write_text(text)
    with pytest.raises(ProfileError) as info:
        load_profile(str(path))
    assert problem in str(info.value) and str(path) in str(info.value) and "\n" not in str(info.value)
    assert problem in profile_problem(str(path))


def test_a_missing_profile_names_the_shipped_ones():
    assert "shipped: phone" in profile_problem("tablet")
    assert "No such file" in profile_problem("/nonexistent/fleet.toml")


def test_devices_refuse_a_bad_profile_in_one_line_before_starting_anything(tmp_path):
    bad = tmp_path / "fleet.toml"
    bad.write_text("[speed]\nmedian = 0.5\n")
    result = subprocess.run(
        [sys.executable, "-m", "edgefl", "devices", "--profile", str(bad), "--coordinator", "http://127.0.0.1:9"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "--profile" in result.stderr and "speed.median must be at least 1" in result.stderr


# --- each device's draw -------------------------------------------------------------


def test_each_device_draws_its_own_behaviour_from_seed_and_index_alone():
    phone = load_profile("phone")
    assert behaviour_of(phone, 7, 3) == behaviour_of(phone, 7, 3)
    draws = [behaviour_of(phone, 7, i) for i in range(200)]
    assert len({b.upload_kbps for b in draws}) == 200 and len({b.slowdown for b in draws}) > 100  # those below 1 are 1
    assert behaviour_of(phone, 8, 3) != behaviour_of(phone, 7, 3)
    assert min(b.slowdown for b in draws) >= 1.0  # never faster than this machine
    assert np.median([b.slowdown for b in draws]) == pytest.approx(phone.speed.median, rel=0.15)
    assert np.median([b.upload_kbps for b in draws]) == pytest.approx(phone.upload.kbps_median, rel=0.25)
    assert all(b.eligible(t) for b in (behaviour_of(FleetProfile(), 0, i) for i in range(50)) for t in (0, 1e5))


def test_the_eligible_fraction_follows_the_diurnal_curve():
    profile = FleetProfile(availability=Availability(day_s=100, peak=0.9, trough=0.1))
    fleet = [behaviour_of(profile, 0, i) for i in range(2000)]

    def eligible_at(t):
        return np.mean([b.eligible(t) for b in fleet])

    assert eligible_at(0) == pytest.approx(0.9, abs=0.03)  # the fleet starts at the peak
    assert eligible_at(50) == pytest.approx(0.1, abs=0.03)  # half a day later
    assert eligible_at(25) == pytest.approx(0.5, abs=0.04)
    assert eligible_at(100) == eligible_at(0)  # a day later
    # A device eligible for a stretch of its day, not in flickers: at most one start per day.
    device = next(b for b in fleet if b.eligible(0) and not b.eligible(50))
    ticks = [device.eligible(t) for t in np.arange(0, 100, 0.5)]
    assert sum(1 for a, b in zip(ticks, ticks[1:]) if b and not a) <= 1
    later = device.next_eligible(50)
    assert 50 < later <= 100 and device.eligible(later)


def test_dropout_is_drawn_per_device_and_round_at_the_profiles_rate():
    behaviour = behaviour_of(FleetProfile(dropout=Dropout(rate=0.3)), 0, 5)
    drops = [behaviour.drops_out(0, 5, round_id) for round_id in range(4000)]
    assert np.mean(drops) == pytest.approx(0.3, abs=0.03)
    assert drops == [behaviour.drops_out(0, 5, round_id) for round_id in range(4000)]


# --- the agent living by it ---------------------------------------------------------


def phone_agent(client, profile: FleetProfile, index: int = 3) -> DeviceAgent:
    return DeviceAgent(
        index, "keras", shard(16), shard(4), client, seed=0, behaviour=behaviour_of(profile, 0, index), fleet_started=1000.0
    )


def status(run_status: str) -> RunStatus:
    return RunStatus.model_validate(
        {
            "run": {
                "status": run_status,
                "config": json.loads(RunConfig().to_json()),
                "config_changes": [],
                "created_at": 0,
                "finished_at": None,
            }
        }
    )


def test_an_ineligible_device_does_not_check_in_until_eligible_and_learns_the_run_is_over_meanwhile():
    profile = FleetProfile(availability=Availability(day_s=1000, peak=0.9, trough=0.1))
    index = next(
        i for i in range(100) if behaviour_of(profile, 0, i).eligible(0) and not behaviour_of(profile, 0, i).eligible(500)
    )
    client = ScriptedClient([WAIT])
    client.statuses = [status("running"), status("finished")]
    agent = phone_agent(client, profile, index)
    agent.state = State.CHECK_IN
    assert agent.step(1000.0, TinyLearners()) == pytest.approx(1002.5, abs=0.05)  # eligible: it checks in
    assert client.answers == []
    wake = agent.step(1500.0, TinyLearners())  # half a day later: asks nothing of the lobby
    assert agent.state is State.IDLE and wake == 1530.0  # its next eligible time is hours away: it looks in after 30 s
    assert agent.step(wake, TinyLearners()) == 1560.0 and client.statuses == [status("finished")]
    assert agent.step(1560.0, TinyLearners()) is None
    assert agent.done and agent.summary.stopped_because == "run_finished"


def test_a_device_that_drops_out_never_reports_and_comes_back_for_the_next_round():
    profile = FleetProfile(dropout=Dropout(rate=0.5))
    behaviour = behaviour_of(profile, 0, 3)
    dropped = next(r for r in range(1, 50) if behaviour.drops_out(0, 3, r))
    kept = next(r for r in range(1, 50) if not behaviour.drops_out(0, 3, r))
    client = ScriptedClient([task(dropped), task(kept), FINISHED])
    agent = phone_agent(client, profile)
    states, waits = [], []
    now = 1000.0
    while not agent.done:
        states.append(agent.state)
        wake = agent.step(now, TinyLearners()) or now
        waits.append(wake - now)
        now = wake
    assert len(client.bodies) == 1  # only the kept round was uploaded
    assert agent.summary.dropouts == 1 and agent.summary.rounds_trained == 1
    assert states.count(State.TRAIN) == 2 and states.count(State.UPLOAD) == 1
    dropped_at = states.index(State.TRAIN)
    assert waits[dropped_at] == pytest.approx(5, abs=0.5)  # it looks again every 5 s until the round it left is over


def test_a_device_back_before_the_round_it_left_is_over_does_not_take_it_again():
    profile = FleetProfile(dropout=Dropout(rate=0.5))
    behaviour = behaviour_of(profile, 0, 3)
    dropped = next(r for r in range(1, 50) if behaviour.drops_out(0, 3, r))
    client = ScriptedClient([task(dropped), task(dropped), FINISHED])
    agent = phone_agent(client, profile)
    agent.state = State.CHECK_IN
    now = 1000.0
    for _ in range(4):  # the task, its checkpoint, training (dropped), the same task again
        now = agent.step(now, TinyLearners())
    assert agent.state is State.CHECK_IN and agent.summary.dropouts == 1 and client.answers == [FINISHED]


def test_a_slow_phone_on_a_thin_uplink_reports_later_by_its_own_factors(monkeypatch):
    import device_sim.agent as agent_module

    clock = iter(np.arange(0, 1000, 0.25))  # every monotonic() call: 0.25 s of "training"
    monkeypatch.setattr(agent_module.time, "monotonic", lambda: float(next(clock)))
    profile = FleetProfile(speed=Speed(median=3.0), upload=Upload(kbps_median=8.0))  # 1 kB/s
    client = ScriptedClient([task(1), FINISHED])
    agent = phone_agent(client, profile)
    agent.state = State.CHECK_IN
    now = 1000.0
    waits = {}
    while not agent.done:
        state = agent.state
        wake = agent.step(now, TinyLearners())
        waits[state] = (wake or now) - now
        now = wake or now
    trained_s = 0.25  # between "downloaded" and "trained"
    size = len(client.bodies[0])
    assert waits[State.TRAIN] == pytest.approx(trained_s * 2 + size / 1000, rel=1e-6)


# --- the flaky network under the real client ---------------------------------------


def test_lost_requests_and_lost_answers_are_recovered_by_the_clients_own_retries(flaky_server):
    FlakyCoordinator.failures = 0  # the server answers every request it gets
    network = flaky_or_none(Network(failure_rate=0.5), seed=0, index=1)
    client = CoordinatorClient(flaky_server, transport=network, give_up_after_s=30, backoff_cap_s=0.01)
    for _ in range(40):
        assert client.status().run is None
    faults = network.faults
    assert faults["lost_requests"] > 5 and faults["lost_answers"] > 5
    # The coordinator saw every request that was not lost on the way, answered or not.
    assert FlakyCoordinator.calls == 40 + faults["lost_answers"]
    assert client.network_faults == sum(faults.values())


def test_a_devices_network_faults_are_drawn_from_seed_and_index():
    def draws(seed, index):
        network = flaky_or_none(Network(failure_rate=0.3, slow_rate=0.3, slow_s=1), seed, index)
        return [network._draw() for _ in range(50)]

    assert draws(0, 1) == draws(0, 1) and draws(0, 1) != draws(0, 2)


def test_a_profile_without_network_faults_leaves_requests_alone():
    assert flaky_or_none(Network(), 0, 0) is None
    assert flaky_or_none(Network(slow_rate=0.5, slow_s=0), 0, 0) is None
    assert isinstance(flaky_or_none(Network(slow_rate=0.5, slow_s=1), 0, 0), FlakyNetwork)


# --- a fleet of phones against a live coordinator -----------------------------------


@pytest.mark.e2e
def test_a_fleet_of_phones_finishes_its_run_through_dropouts_lost_requests_and_idle_devices(tmp_path):
    """200 devices in one host, on a profile with a 40-second day, dropout, a lossy and
    slow network and thin uplinks. Over-selection and the deadline carry the rounds; every
    device ends knowing the run is over (the idle ones through their status checks), and
    nothing is left running."""
    from edgefl.app.launcher import federation
    from tests.processes import assert_all_gone, descendant_pids

    profile = tmp_path / "phones.toml"
    profile.write_text(
        "[availability]\nday_s = 40\npeak = 0.9\ntrough = 0.3\n[dropout]\nrate = 0.2\n"
        "[network]\nfailure_rate = 0.05\nslow_rate = 0.05\nslow_s = 0.2\n[upload]\nkbps_median = 4000\nkbps_sigma = 0.5\n"
    )
    config = RunConfig(
        model="cnn_small", rounds=3, target_reports=20, min_reports=10, over_selection=1.5, round_timeout_s=20, client_lr=0.1
    )
    before = descendant_pids()
    seen: dict[int, str] = {}
    flags = ["--per-process", "200", "--profile", str(profile)]
    with federation(tmp_path, config, count=200, partition="iid", data_seed=0, device_flags=flags) as fed:
        status = fed.follow(lambda _entry: seen.update(descendant_pids(before)), timeout_s=600)
        seen.update(descendant_pids(before))
        assert fed.fleet.wait(timeout=120) == 0, (tmp_path / "logs" / "devices.log").read_text()[-3000:]
    assert_all_gone(seen)
    assert len(status.history) == 3 and all(h.reported >= config.min_reports for h in status.history)
    summaries = [json.loads(p.read_text()) for p in (tmp_path / "logs" / "devices").glob("device-*.json")]
    assert len(summaries) == 200 and all(s["stopped_because"] == "run_finished" for s in summaries)
    assert sum(s["dropouts"] for s in summaries) > 0 and sum(s["network_faults"] for s in summaries) > 0
    assert sum(s["rounds_trained"] for s in summaries) >= sum(h.reported for h in status.history)
    printed = (tmp_path / "logs" / "devices.log").read_text()
    assert "behaving as the profile says: availability.day_s=40, availability.peak=0.9" in printed
    assert " dropouts" in printed and " network faults" in printed
