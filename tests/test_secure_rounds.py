"""Secure rounds through the coordinator's API and round driver: SecAgg+'s four phases as
a plan of the lifecycle, devices dropping after each, the threshold, and every message a
dishonest device could send refused without a change of state.

Devices here are ``device_sim.agent.SecureSession``s (what a real device runs) talking
through Flask's test client; the driver steps on a clock the test moves."""

from __future__ import annotations

from contextlib import closing, contextmanager

import numpy as np
import pytest

from device_sim.agent import SecureSession
from edgefl.config import RunConfig
from edgefl.protocol import SecAggView
from edgefl.secagg import packing
from edgefl.secagg.quantize import flatten, secure_mean_inputs
from tests.api_helpers import SPEC, assert_error, build_coordinator, random_delta, take_task

BOUNDS = (1000.0, 100_000.0)


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
        registration = client.post("/v1/devices").json
        self.device_id, self.headers = registration["device_id"], {"Authorization": f"Bearer {registration['token']}"}
        self.delta, self.examples = random_delta(seed), examples
        self.begin(round_id)

    def begin(self, round_id: int) -> None:
        """Take a task in the round and start a session for it."""
        self.task = take_task(self.client, self.headers)
        assert self.task["round_id"] == round_id and self.task["secure"] == {"value_bound": 1000.0, "weight_bound": 100000.0}
        self.leaves = secure_mean_inputs([s.name for s in SPEC], self.delta, self.examples, *BOUNDS)
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
            response = self.post(
                {"SecAggShares": "shares", "SecAggReveal": "reveal"}[type(message).__name__], json=message.model_dump()
            )
        assert response.status_code == 202, response.json
        return response


def _secure_coordinator(tmp_path, small_parts, secure_server, db_url=None, **changes):
    from tests.conftest import Clock

    return build_coordinator(
        tmp_path / "instance", small_parts, _config(**changes), db_url=db_url, server=secure_server, clock=Clock()
    )


def _open(driver, client, n, examples=(50, 120, 7, 300, 33, 81, 64, 10)):
    assert driver.step()  # round 1 opens
    return [Device(client, 1, seed, examples[seed % len(examples)]) for seed in range(n)]


def _share_keys(driver, store, devices) -> None:
    """Every device advertises and shares its keys: the round is then in its masked-input phase."""
    for device in devices:
        assert device.send_keys().status_code == 202
    _step_until(driver, store, "share_keys")
    for device in devices:
        device.answer()
    _step_until(driver, store, "masked_input")


def _phase(store, round_id=1) -> tuple[str, str]:
    with closing(store.connect()) as db:
        row = db.execute("SELECT status, phase FROM rounds WHERE id = ?", (round_id,)).fetchone()
        return row["status"], row["phase"]


def _state(store) -> tuple:
    """Everything a refused message must leave as it was: messages, rounds, blobs."""
    with closing(store.connect()) as db:
        messages = [
            tuple(r) for r in db.execute("SELECT round_id, phase, device_id, kind, blob_sha256 FROM messages ORDER BY id")
        ]
        rounds_ = [tuple(r) for r in db.execute("SELECT id, status, phase, deadline_at FROM rounds ORDER BY id")]
    return messages, rounds_, sorted(store.blobs.names())


def _step_until(driver, store, phase, status="open", round_id=1):
    for _ in range(5):
        if _phase(store, round_id) == (status, phase):
            return
        driver.step()
    assert _phase(store, round_id) == (status, phase)


def _expected(secure_server, devices, weights):
    """The round's model from the plain integer sum of the survivors' quantized inputs."""
    total = sum(d.session.value for d in devices)
    fold = secure_server.begin(secure_server.initialize(), weights)
    return secure_server.finish_secure(fold, total, len(devices)), total


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


@contextmanager
def _secure_round_of(store, driver):
    from coordinator.secure import SecureRound

    with closing(store.connect()) as db:
        yield SecureRound.load(db, store.blobs.get, driver.config, 1, driver.server.secure_layout.size)


@pytest.mark.parametrize("phase", ["share_keys", "masked_input", "unmask"])
def test_devices_dropping_after_any_phase_leave_the_survivors_sum(tmp_path, small_parts, secure_server, phase):
    """Two of seven devices vanish once ``phase`` opens (they advertised; they send
    nothing more): the phase closes at its deadline, and the round commits the mean of
    the devices whose masked input arrived."""
    app, driver = _secure_coordinator(tmp_path, small_parts, secure_server, target_reports=7, secagg_degree=6)
    client, store = app.test_client(), app.extensions["edgefl.store"]
    devices = _open(driver, client, 7)
    for device in devices:
        assert device.send_keys().status_code == 202
    dropped = {1, 4}
    order = ["share_keys", "masked_input", "unmask"]
    for current in order:
        _step_until(driver, store, current)
        for i, device in enumerate(devices):
            if not (i in dropped and order.index(current) >= order.index(phase)):
                device.answer()
        driver.clock.now += 61  # past each phase's deadline (the masked inputs': the round's): the missing devices are given up
    survivors = [d for i, d in enumerate(devices) if i not in dropped or phase == "unmask"]
    with _secure_round_of(store, driver) as secure:
        assert len(secure.masked) == len(survivors)
    driver.step()
    assert _phase(store)[0] == "committed", _phase(store)
    base, _ = _checkpoint(store, 0)
    expected, _ = _expected(secure_server, survivors, base)
    committed, _ = _checkpoint(store, 1)
    for ours, theirs in zip(committed, expected.weights, strict=True):
        np.testing.assert_array_equal(ours, theirs)


def test_a_round_with_too_few_surviving_neighbours_is_abandoned_with_nothing_revealed(tmp_path, small_parts, secure_server):
    """A complete graph of five devices, threshold 3: with four masked inputs each
    device's neighbourhood holds exactly the threshold, and the round commits; with
    three, the round is abandoned at the masked-input deadline and no device is asked
    to reveal anything. (A device asked anyway refuses: ``test_secagg``.)"""
    for masked_inputs, outcome in ((4, "committed"), (3, "abandoned")):
        app, driver = _secure_coordinator(
            tmp_path / str(masked_inputs),
            small_parts,
            secure_server,
            target_reports=5,
            min_reports=4,
            secagg_degree=4,
            secagg_threshold=3,
        )
        client, store = app.test_client(), app.extensions["edgefl.store"]
        devices = _open(driver, client, 5)
        _share_keys(driver, store, devices)
        for device in devices[:masked_inputs]:
            device.answer()
        driver.clock.now += 61  # the masked inputs' deadline: the round's
        driver.step()
        if outcome == "committed":
            assert _phase(store) == ("open", "unmask")
            for device in devices[:masked_inputs]:
                assert len(device.view().masked) == 3  # exactly the threshold
                device.answer()
            driver.clock.now += 11
            driver.step()
        assert _phase(store)[0] == outcome
        if outcome == "abandoned":
            record = client.get("/v1/rounds").json["rounds"][0]
            assert record["abandon_reason"] == "too_few_reports" and "masked_input messages" in record["abandon_detail"]
            assert devices[0].view().status == "abandoned" and devices[0].view().masked == []
            with closing(store.connect()) as db:
                assert db.execute("SELECT COUNT(*) FROM messages WHERE kind = 'reveal'").fetchone()[0] == 0


def test_stored_masked_inputs_look_like_uniform_noise(tmp_path, small_parts, secure_server):
    """What the coordinator stores of a device's input is uniform below 2^bits (each
    of its bytes' values equally often, by a chi-square test) and uncorrelated with the
    input it hides."""
    from scipy import stats

    app, driver = _secure_coordinator(tmp_path, small_parts, secure_server)
    client, store = app.test_client(), app.extensions["edgefl.store"]
    devices = _open(driver, client, 6)
    _share_keys(driver, store, devices)
    for device in devices:
        device.answer()
    with _secure_round_of(store, driver) as secure:
        params = secure.params
    with closing(store.connect()) as db:
        rows = db.execute("SELECT device_id, blob_sha256 FROM messages WHERE kind = 'masked' ORDER BY id").fetchall()
    assert len(rows) == 6
    for device_id, sha in rows:
        data = store.blobs.get(sha)
        masked = packing.unpack(data, params.size, params.bits)
        low_bytes = (masked & np.uint64(0xFFFF_FFFF)).astype("<u4").view(np.uint8)
        high_bits = (masked >> np.uint64(32)).astype(np.int64)  # the top bits-32 bits
        assert stats.chisquare(np.bincount(low_bytes, minlength=256)).pvalue > 1e-4
        assert stats.chisquare(np.bincount(high_bits, minlength=2 ** (params.bits - 32))).pvalue > 1e-4
        fraction = masked.astype(np.float64) / 2.0**params.bits
        assert abs(fraction.mean() - 0.5) < 0.01
        plain = next(d for d in devices if d.device_id == device_id).session.value
        assert abs(np.corrcoef(fraction, plain.astype(np.float64))[0, 1]) < 0.05


def test_tampered_replayed_and_misrouted_messages_are_refused_and_change_nothing(tmp_path, small_parts, secure_server):
    """At each phase, what a dishonest or confused device could send instead: a 4xx
    in the API's error format, and the store (messages, rounds, blobs) as it was."""
    app, driver = _secure_coordinator(tmp_path, small_parts, secure_server)
    client, store = app.test_client(), app.extensions["edgefl.store"]
    devices = _open(driver, client, 6)
    a, b = devices[0], devices[1]
    outsider = client.post("/v1/devices").json
    outsider_headers = {"Authorization": f"Bearer {outsider['token']}"}

    def attempt(make, status, code):
        before = _state(store)
        assert_error(make(), status, code)
        assert _state(store) == before

    keys = a.session.keys().model_dump()
    attempt(lambda: a.post("shares", json={"shares": {}}), 409, "wrong_phase")
    attempt(lambda: a.post("keys", json={**keys, "masking": keys["encryption"]}), 422, "bad_keys")
    attempt(lambda: a.post("keys", json={**keys, "extra": 1}), 422, "invalid_request")
    attempt(lambda: a.post("keys", json={**keys, "masking": keys["masking"].upper()}), 422, "invalid_request")
    attempt(lambda: a.post("keys", data="{not json", content_type="application/json"), 400, "bad_json")
    attempt(lambda: client.post("/v1/rounds/1/secagg/keys", json=keys), 401, "missing_token")
    attempt(lambda: client.post("/v1/rounds/1/secagg/keys", json=keys, headers=outsider_headers), 403, "not_selected")
    attempt(lambda: client.post("/v1/rounds/99/secagg/keys", json=keys, headers=a.headers), 404, "unknown_round")
    attempt(
        lambda: client.post("/v1/rounds/1/updates", data=b"x", headers=a.headers, content_type="application/octet-stream"),
        409,
        "wrong_phase",
    )
    attempt(lambda: client.get("/v1/rounds/1/secagg", headers=outsider_headers), 403, "not_selected")
    assert a.send_keys().status_code == 202
    attempt(a.send_keys, 409, "duplicate_keys")
    attempt(lambda: b.post("keys", json=keys), 409, "keys_in_use")  # another device's keys, replayed
    attempt(lambda: b.post("keys", json={**b.session.keys().model_dump(), "masking": keys["masking"]}), 409, "keys_in_use")
    for device in devices[1:]:
        assert device.send_keys().status_code == 202

    _step_until(driver, store, "share_keys")
    view = a.view()
    me, neighbours = view.params.index, sorted(view.keys)
    sealed = a.session.answer(view).shares
    a.session.answered.discard("share_keys")
    others = [v for v in range(6) if v not in neighbours and v != me]
    dropper = next(d for d in devices if d.view().params.index == neighbours[0])  # a's neighbour; drops before masking
    attempt(lambda: b.post("keys", json=keys), 409, "wrong_phase")  # a replay, and late
    attempt(
        lambda: a.post("shares", json={"shares": {v: c for v, c in sealed.items() if v != neighbours[0]}}),
        422,
        "misrouted_shares",
    )
    attempt(lambda: a.post("shares", json={"shares": {**sealed, others[0]: sealed[neighbours[0]]}}), 422, "misrouted_shares")
    attempt(lambda: a.post("shares", json={"shares": {**sealed, me: sealed[neighbours[0]]}}), 422, "misrouted_shares")
    attempt(lambda: a.post("shares", json={"shares": {**sealed, neighbours[0]: sealed[neighbours[0]][:-2]}}), 422, "bad_shares")
    attempt(lambda: a.post("shares", json={"shares": {**sealed, neighbours[0]: "zz" * 160}}), 422, "bad_shares")
    attempt(lambda: a.post("shares", json={"shares": sealed, "more": {}}), 422, "invalid_request")
    assert a.post("shares", json={"shares": sealed}).status_code == 202
    a.session.answered.add("share_keys")
    attempt(lambda: a.post("shares", json={"shares": sealed}), 409, "duplicate_shares")
    for device in devices[1:]:
        device.answer()

    _step_until(driver, store, "masked_input")
    body = a.session.answer(a.view())
    a.session.answered.discard("masked_input")
    width = packing.entry_bytes(view.params.bits)
    too_big = bytearray(body)
    too_big[width - 1] = 0xFF  # an entry at or above 2^bits
    for bad, code in (
        (body[:-1], "bad_masked_input"),
        (body + b"\0" * width, "bad_masked_input"),
        (bytes(too_big), "bad_masked_input"),
    ):
        attempt(lambda bad=bad: a.post("masked", data=bad, content_type="application/octet-stream"), 422, code)
    attempt(lambda: a.post("reveal", json={"seeds": {}, "keys": {}}), 409, "wrong_phase")
    assert a.post("masked", data=body, content_type="application/octet-stream").status_code == 202
    a.session.answered.add("masked_input")
    attempt(lambda: a.post("masked", data=body, content_type="application/octet-stream"), 409, "duplicate_masked")
    for device in devices[1:]:
        if device is not dropper:  # its neighbours reveal its key share
            device.answer()

    driver.clock.now += 61  # the masked inputs' deadline: the round's
    _step_until(driver, store, "unmask")
    view = a.view()
    reveal = a.session.answer(view)
    a.session.answered.discard("unmask")
    assert reveal.keys  # the dropper's
    attempt(lambda: dropper.post("reveal", json=reveal.model_dump()), 409, "not_a_survivor")
    seeds, keys_ = reveal.seeds, reveal.keys
    some = next(iter(seeds))
    attempt(lambda: a.post("reveal", json={"seeds": seeds, "keys": {**keys_, some: seeds[some]}}), 422, "wrong_reveal")
    attempt(lambda: a.post("reveal", json={"seeds": {**seeds, **keys_}, "keys": {}}), 422, "wrong_reveal")
    attempt(
        lambda: a.post("reveal", json={"seeds": {k: v for k, v in seeds.items() if k != some}, "keys": keys_}),
        422,
        "wrong_reveal",
    )
    attempt(lambda: a.post("reveal", json={"seeds": {**seeds, some: seeds[some][:-2]}, "keys": keys_}), 422, "bad_reveal")
    assert a.post("reveal", json=reveal.model_dump()).status_code == 202
    attempt(lambda: a.post("reveal", json=reveal.model_dump()), 409, "duplicate_reveal")
    for device in devices[1:]:
        if device is not dropper:
            device.answer()
    driver.step()
    assert _phase(store)[0] == "committed"


def test_a_device_masking_a_code_beyond_its_range_gets_the_round_abandoned(tmp_path, small_parts, secure_server):
    """The masks hide what a device sums, so the coordinator cannot check one input; it
    checks the sum against what the devices in it can give, and refuses it: the round
    is abandoned (a new one retries the model), not committed with a poisoned mean. So
    is a round whose summands do not count its devices (a device sending 2)."""
    app, driver = _secure_coordinator(tmp_path, small_parts, secure_server)
    client, store = app.test_client(), app.extensions["edgefl.store"]
    devices = _open(driver, client, 6)
    devices[2].session.value[2] = 2**34  # a code of the first tensor, far above 2^32 - 1
    for device in devices:
        device.send_keys()
    for phase in ("share_keys", "masked_input", "unmask"):
        _step_until(driver, store, phase)
        for device in devices:
            device.answer()
    driver.step()
    record = client.get("/v1/rounds").json["rounds"][0]
    assert (record["status"], record["abandon_reason"]) == ("abandoned", "sum_out_of_range"), record
    assert "beyond what 6 devices' 32-bit values can give" in record["abandon_detail"]
    assert _phase(store, 2) == ("open", "advertise_keys")  # the next round retries the same model
    for device in devices:
        device.begin(2)
    devices[4].session.value[0] = 2  # its value summand
    for device in devices:
        device.send_keys()
    for phase in ("share_keys", "masked_input", "unmask"):
        _step_until(driver, store, phase, round_id=2)
        for device in devices:
            device.answer()
    driver.step()
    record = client.get("/v1/rounds").json["rounds"][1]
    assert (record["status"], record["abandon_reason"]) == ("abandoned", "sum_out_of_range"), record
    assert "summands count 7 devices, not the 6" in record["abandon_detail"]
