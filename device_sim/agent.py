"""One simulated device as an agent: a state machine driven by the coordinator's answers.

A device registers, then checks in; a task sends it to fetch what it lacks (the
checkpoint, cached by sha256 so a device re-selected for the same model version does
not download it twice; a LiteRT device's on-device training file, kept until the run's
batch size changes), train, upload, and check in again; a ``wait`` answer sends it back
to checking in after ``retry_after``; ``finished`` ends it. Each call of ``step`` does
one state's work and returns when it wants to be called again: the agent never sleeps,
starts no thread and knows nothing of processes, so a host (``device_sim.host``) can run
one agent per process or a thousand in one, and a test can drive one by hand.

The agent owns what is the device's own: its shard (built by its host from (dataset,
partition, seed, number of devices, index): the coordinator never holds or sends device
data, and only deltas and counts leave the device), its credentials, its caches and its
counters. Learners are the host's (one per training thread), lent per step.

Personalisation, evaluated the federated way: a device keeps ``holdout`` of its
examples out of training, and with each update reports the accuracy on them of the
global model it was sent and of its locally trained model (the global model fine-tuned
on its own data, by the same runtime). The coordinator aggregates the reports per round.
The task names the codec the update is encoded with (``edgefl.codecs``). In a secure
round the device quantizes its update as TFF's ``SecureSumFactory`` would and takes part
in SecAgg+ instead of uploading (``SecureSession``): the coordinator sees only masks.

With a fleet profile (``device_sim.profile``) the agent behaves as its phone would: it
checks in only while eligible (``IDLE`` otherwise), may drop out of a round it was
selected for, computes more slowly and uploads at its uplink's pace; its host's
network under the client may lose or slow its requests (``device_sim.network``).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Protocol

import numpy as np

from device_sim.profile import DeviceBehaviour
from edgefl import codecs, failpoints
from edgefl.client import CoordinatorClient, ProtocolError, TrainingModel
from edgefl.datasets import Split
from edgefl.learner import Learner
from edgefl.models import BUILT_IN_MODELS
from edgefl.protocol import SecAggKeys, SecAggRequest, SecAggReveal, SecAggShares, SecAggView, Task
from edgefl.secagg import packing
from edgefl.secagg import protocol as secagg
from edgefl.secagg.crypto import SecAggError
from edgefl.secagg.quantize import flatten, secure_mean_inputs

log = logging.getLogger("edgefl.device")

_NO_TRAINING_FILE_RETRY_S = 1.0  # the coordinator is still building the file for the run's batch size
_BAD_ANSWER_RETRY_S = 5.0  # an answer this device cannot read
_IDLE_CHECK_S = 30.0  # how often an ineligible device's app asks whether the run is over
_LEFT_ROUND_RETRY_S = 5.0  # a device that dropped out looks again this often until its round is over


class State(StrEnum):
    REGISTER = "register"
    CHECK_IN = "check_in"
    FETCH_TRAINING_FILE = "fetch_training_file"  # LiteRT only
    FETCH_CHECKPOINT = "fetch_checkpoint"
    TRAIN = "train"
    UPLOAD = "upload"
    SECURE = "secure"  # a secure round: SecAgg+'s phases instead of an upload
    IDLE = "idle"  # not eligible (its fleet profile's phone is busy, on battery or metered)
    DONE = "done"

    @property
    def pool(self) -> str:
        """Which of its host's thread pools runs this state: ``train`` keeps a CPU busy
        and needs a learner; ``poll`` (a check-in) may be held by the coordinator's
        lobby for seconds; ``transfer`` (register, downloads, the upload) must never
        queue behind held check-ins, or a round would wait for its own uploads."""
        if self is State.TRAIN:
            return "train"
        return "poll" if self in (State.CHECK_IN, State.IDLE) else "transfer"


class Learners(Protocol):
    """Where an agent borrows a learner for one training step (its host's, per thread)."""

    def keras(self, model: str) -> Learner: ...

    def litert(self, training_file: TrainingModel) -> Learner: ...

    def decoded(self, sha256: str, data: bytes, learner: Learner) -> list: ...


@dataclass
class DeviceSummary:
    """What a device did, as the coordinator's answers made it (its host adds the process's facts)."""

    index: int
    device_id: str | None = None
    num_examples: int = 0
    rounds_trained: int = 0
    late_uploads: int = 0
    refused_uploads: int = 0
    bytes_down: int = 0
    bytes_up: int = 0
    runtime: str = "keras"
    stopped_because: str = ""  # the coordinator's reason: run_finished or run_stopped
    dropouts: int = 0  # rounds it left before reporting (its profile's dropout, or it stopped being eligible)
    network_faults: int = 0  # requests its profile's network lost (the client's retries recovered them) or slowed
    checkin_ms: list[float] = field(default_factory=list)  # each check-in's latency, less what the lobby held it


def holdout_split(shard: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """(examples to train on, examples only to evaluate on), fixed for the device."""
    held = int(round(len(shard) * fraction)) if len(shard) >= 5 else 0
    order = np.random.default_rng(seed).permutation(len(shard))
    return shard.subset(np.sort(order[held:])), shard.subset(np.sort(order[:held]))


def personalization_report(learner: Learner, global_weights: list, delta: list, held: Split) -> dict[str, float]:
    if not len(held):
        return {}
    personalized = [w + d for w, d in zip(global_weights, delta)]
    return {
        "holdout_examples": len(held),
        "holdout_accuracy_global": learner.evaluate(global_weights, held.x, held.y)["accuracy"],
        "holdout_accuracy_personalized": learner.evaluate(personalized, held.x, held.y)["accuracy"],
    }


class DeviceAgent:
    """One device's state machine. ``step`` raises ``ProtocolError`` or
    ``CoordinatorUnreachable`` when the device cannot go on (say, 401/403 on an upload:
    the coordinator no longer knows it, or did not select it); it is then done, and failed."""

    def __init__(
        self,
        index: int,
        runtime: str,
        train: Split,
        held: Split,
        client: CoordinatorClient,
        *,
        seed: int = 0,
        enrolment_secret: str | None = None,
        own_model: str = "",
        behaviour: DeviceBehaviour | None = None,
        fleet_started: float = 0.0,
    ):
        """``behaviour`` is the device's draw from its fleet profile (None: always
        eligible, never dropping out); its diurnal clock counts from ``fleet_started``
        on the host's clock."""
        self.index, self.runtime, self.seed = index, runtime, seed
        self.behaviour, self.fleet_started = behaviour, fleet_started
        self.train, self.held = train, held
        self.client = client
        self.enrolment_secret = enrolment_secret
        self.own_model = own_model  # besides the built-ins, the only model code a Keras device runs
        self.state = State.REGISTER
        self.summary = DeviceSummary(index, num_examples=len(train), runtime=runtime)
        self.learner_s: float | None = None  # getting the learner for its first task: part of its start-up
        self._task: Task | None = None
        self._training_file: TrainingModel | None = None
        self._checkpoint: tuple[str, bytes | None, list | None] | None = None  # sha256, bytes until decoded, weights
        self._upload_body: bytes | None = None
        self._session: SecureSession | None = None
        self._times: dict[str, float] = {}
        self._left_round: int | None = None  # the round it last dropped out of

    @property
    def done(self) -> bool:
        return self.state is State.DONE

    def step(self, now: float, learners: Learners) -> float | None:
        """Do the current state's work; the time (on ``now``'s clock) to be called at
        next, or None once the device is done."""
        try:
            wake = getattr(self, f"_{self.state.value}")(now, learners)
        except BaseException:
            self.state = State.DONE
            raise
        finally:
            self.summary.bytes_down = self.client.traffic.bytes_down
            self.summary.bytes_up = self.client.traffic.bytes_up
            self.summary.network_faults = self.client.network_faults
        return None if self.done else wake

    def _register(self, now: float, _learners: Learners) -> float:
        self.summary.device_id = self.client.register(self.enrolment_secret)
        log.info(
            "device %d (%s) registered as %s with %d examples", self.index, self.runtime, self.summary.device_id, len(self.train)
        )
        self.state = State.CHECK_IN
        return now

    def _eligible(self, now: float) -> bool:
        return self.behaviour is None or self.behaviour.eligible(now - self.fleet_started)

    def _idle(self, now: float, _learners: Learners) -> float | None:
        """Wait until eligible again, asking the coordinator now and then whether the run is over."""
        if self._eligible(now):
            self.state = State.CHECK_IN
            return now
        run = self.client.status().run
        if run is not None and run.over:
            self.summary.stopped_because = f"run_{run.status}"
            self.state = State.DONE
            return None
        return self._sleep_until_eligible(now)

    def _sleep_until_eligible(self, now: float) -> float:
        self.state = State.IDLE
        return min(self.fleet_started + self.behaviour.next_eligible(now - self.fleet_started), now + _IDLE_CHECK_S)

    def _drop_out(self, now: float, why: str) -> float:
        """Leave the current round without reporting, as a phone taken off its charger
        does. Its seat stays taken, so until that round is over a check-in would hand it
        the same task: it declines it (``_left_round``)."""
        task = self._task
        log.info("device %d: drops out of round %d (%s)", self.index, task.round_number, why)
        self.summary.dropouts += 1
        self._left_round = task.round_id
        if self._checkpoint is not None and self._checkpoint[2] is None:  # never decoded: not worth its bytes
            self._checkpoint = None
        self._session, self._upload_body, self.state = None, None, State.CHECK_IN
        return now + min(_LEFT_ROUND_RETRY_S, self._round_left_s())

    def _round_left_s(self) -> float:
        """Seconds until the current task's round deadline, on this device's clock."""
        return max(0.0, self._task.seconds_left - (time.monotonic() - self._times["task"]))

    def _check_in(self, now: float, _learners: Learners) -> float | None:
        if not self._eligible(now):
            return self._sleep_until_eligible(now)
        asked = time.monotonic()
        try:
            answer = self.client.checkin()
        except ProtocolError as exc:
            if exc.code != "bad_answer":
                raise
            log.warning("device %d: %s; asking again later", self.index, exc)  # a newer coordinator, say
            return now + (time.monotonic() - asked) + _BAD_ANSWER_RETRY_S
        answered = time.monotonic() - asked
        self.summary.checkin_ms.append(round(1000 * max(0.0, answered - (answer.held_s or 0.0)), 2))
        now += answered  # the coordinator may have held the check-in: retry_after counts from its answer
        if answer.status == "finished":
            self.summary.stopped_because = answer.reason or "run_finished"
            log.info("device %d: the coordinator says the run is over (%s)", self.index, self.summary.stopped_because)
            self.state = State.DONE
            return None
        if answer.status == "wait" or answer.task is None:
            return now + (answer.retry_after or 1.0)
        if self.runtime == "keras" and answer.task.model not in (*BUILT_IN_MODELS, self.own_model):
            raise ProtocolError(
                200,
                "model_not_given",
                f"the coordinator asks for model {answer.task.model}; a Keras device builds the built-in models and"
                f" only the model its operator gives it (--model {answer.task.model}), as building one runs its code",
            )
        if answer.task.round_id == self._left_round:  # back before the round it left is over: not its round any more
            return now + min(_LEFT_ROUND_RETRY_S, max(1.0, answer.task.seconds_left))
        self._task = answer.task
        self._times = {"task": time.monotonic()}
        training_file = self._training_file
        if self.runtime == "litert" and (training_file is None or training_file.batch_size != self._task.batch_size):
            self.state = State.FETCH_TRAINING_FILE
        else:
            self.state = self._after_training_file()
        return now

    def _fetch_training_file(self, now: float, _learners: Learners) -> float:
        task = self._task
        self._training_file = self.client.download_training_model(self._training_file)  # 304 if it is the one held
        if self._training_file.batch_size != task.batch_size:
            log.info(
                "device %d: no training file for batch %d yet; skipping round %d", self.index, task.batch_size, task.round_number
            )
            self.state = State.CHECK_IN
            return now + _NO_TRAINING_FILE_RETRY_S
        self.state = self._after_training_file()
        return now

    def _after_training_file(self) -> State:
        held = self._checkpoint
        return self._ready() if held is not None and held[0] == self._task.checkpoint_sha256 else State.FETCH_CHECKPOINT

    def _ready(self) -> State:
        """With everything to train on: train, or first agree the keys of a secure round."""
        if self._task.secure is None:
            return State.TRAIN
        self._session = SecureSession(self._task.round_id)
        return State.SECURE

    def _fetch_checkpoint(self, now: float, _learners: Learners) -> float:
        sha = self._task.checkpoint_sha256
        self._checkpoint = (sha, self.client.download_checkpoint(sha), None)
        self.state = self._ready()
        return now

    def _train(self, now: float, learners: Learners) -> float:
        task = self._task
        if self.behaviour is not None and self.behaviour.drops_out(self.seed, self.index, task.round_id):
            return self._drop_out(now, "its profile's dropout")  # whenever it would have: it never reports
        started = time.monotonic()
        learner = learners.litert(self._training_file) if self.runtime == "litert" else learners.keras(task.model)
        if self.learner_s is None:
            self.learner_s = time.monotonic() - started
        sha, data, weights = self._checkpoint
        if weights is None:  # decoded in the learner's order, once per checkpoint and host
            weights = learners.decoded(sha, data, learner)
            self._checkpoint = (sha, None, weights)
        self._times["downloaded"] = time.monotonic()
        result = learner.client_update(
            weights,
            self.train.x,
            self.train.y,
            epochs=task.epochs,
            batch_size=task.batch_size,
            learning_rate=task.learning_rate,
            momentum=task.momentum,
            prox_mu=task.prox_mu,
            seed=hash((self.seed, self.index, task.round_id)) & 0xFFFFFFFF,
        )
        self._times["trained"] = time.monotonic()
        if self.behaviour is not None:  # a slower phone would still be computing (past the deadline, it is late anyway)
            now += min(self.behaviour.extra_compute_s(self._times["trained"] - self._times["downloaded"]), self._round_left_s())
        if task.secure is not None:  # TFF's client step on the device; the rest is SecAgg+'s
            bounds = task.secure
            leaves = secure_mean_inputs(learner.names, result.delta, result.num_examples, bounds.value_bound, bounds.weight_bound)
            self._session.value = flatten(leaves)
            self.state = State.SECURE
            return now
        metrics = {**result.metrics, **personalization_report(learner, weights, result.delta, self.held)}
        self._upload_body = codecs.named(task.codec).encode(
            learner.names,
            result.delta,
            {"num_examples": str(result.num_examples), "metrics": json.dumps(metrics)},
            np.random.default_rng([self.seed, self.index, task.round_id]),  # stochastic rounding's draws
        )
        self.state = State.UPLOAD
        uplink_s = self.behaviour.upload_s(len(self._upload_body)) if self.behaviour else 0.0
        return now + min(uplink_s, self._round_left_s())  # its uplink's pace, the deadline at most

    def _secure(self, now: float, _learners: Learners) -> float:
        """One move in a secure round: send the keys, else look at the round's phase and
        send what it asks; train once its shares are sent; back to checking in once the
        reveal is sent or the round is over for this device (closed, or a message
        refused or not adding up)."""
        session = self._session
        if session.value is None and "share_keys" in session.answered:
            self.state = State.TRAIN  # the masked input waits for the update
            return now
        asked = time.monotonic()
        try:
            if "keys" not in session.answered:
                session.answered.add("keys")
                session.last_answered = "advertise_keys"
                self.client.secagg_send(session.round_id, session.keys())
                return now
            view = self.client.secagg_view(session.round_id, seen=session.last_answered)
            if view.status != "open":
                return self._leave_secure(now, f"the round is {view.status}")
            message = session.answer(view)
            if message is None:
                return now + (time.monotonic() - asked) + view.retry_after
            failpoints.hold(f"secagg_{view.phase}", at=f"{self._task.round_number}:{self.index}")  # tests kill it here
            self.client.secagg_send(session.round_id, message)
        except ProtocolError as exc:
            if exc.status in (401, 403):
                raise
            if not exc.code.startswith("duplicate_"):  # a duplicate was stored: its answer was lost
                return self._leave_secure(now, f"{exc.code}: {exc.detail}")
        except SecAggError as exc:
            return self._leave_secure(now, str(exc))
        if "unmask" in session.answered:
            self.summary.rounds_trained += 1
            self._session, self.state = None, State.CHECK_IN
            log.info("device %d: secure round %d done", self.index, self._task.round_number)
        return now

    def _leave_secure(self, now: float, why: str) -> float:
        log.info("device %d: leaves secure round %d (%s)", self.index, self._task.round_number, why)
        self.summary.late_uploads += 1
        self._session, self.state = None, State.CHECK_IN
        return now

    def _upload(self, now: float, _learners: Learners) -> float:
        if not self._eligible(now):
            return self._drop_out(now, "no longer eligible")
        task, body = self._task, self._upload_body
        self._upload_body = None
        failpoints.hold("upload", at=f"{task.round_number}:{self.index}")  # tests kill it here
        self.state = State.CHECK_IN
        try:
            self.client.upload_update(task.round_id, body)
        except ProtocolError as exc:
            if exc.code == "duplicate_update" or 200 <= exc.status < 300:  # stored: its 202 was lost, or unreadable
                self.summary.rounds_trained += 1
            elif exc.status == 409:
                self.summary.late_uploads += 1
                log.info("device %d: round %d closed before its upload (%s)", self.index, task.round_id, exc.code)
            elif exc.status in (401, 403):  # the coordinator no longer knows this device, or did not select it: it stops
                raise
            else:  # the coordinator refused this update (say, a model gone wrong): the next round may go better
                self.summary.refused_uploads += 1
                log.warning("device %d: round %d refused its update: %s", self.index, task.round_id, exc)
            return now
        self.summary.rounds_trained += 1
        times = self._times
        log.info(
            "device %d: round %d done: checkpoint %.3fs, training %.3fs, upload %.3fs",
            self.index,
            task.round_number,
            times["downloaded"] - times["task"],
            times["trained"] - times["downloaded"],
            time.monotonic() - times["trained"],
        )
        return now


class SecureSession:
    """A device's part in one secure round: its secrets (never sent), its input (once
    it has trained), and the phases it has answered. It sends its keys first, then
    follows the round through its phases (``GET /v1/rounds/{id}/secagg``), sending what
    each phase asks once: its shares before it trains, its masked input after."""

    def __init__(self, round_id: int, value: np.ndarray | None = None):
        self.round_id = round_id
        self.value = value  # the device's secure-sum input, once it has trained
        self.secrets = secagg.advertise(index=-1)  # its index is known once the keys phase closes
        self.answered: set[str] = set()
        self.last_answered: str | None = None  # a phase name, once keys are sent

    def keys(self) -> SecAggKeys:
        public = self.secrets.public
        return SecAggKeys(encryption=public.encryption.hex(), masking=public.masking.hex())

    def answer(self, view: SecAggView) -> SecAggRequest | bytes | None:
        """What this device sends for the view's phase (None: nothing, or already sent).
        SecAggError if what the coordinator sent does not add up."""
        if view.params is None or view.phase in self.answered or (view.phase != "share_keys" and self.value is None):
            return None
        before = {"masked_input": "share_keys", "unmask": "masked_input"}.get(view.phase)
        if before and before not in self.answered:
            raise SecAggError(f"the round moved on to {view.phase} without this device's {before}")
        p = view.params
        params = secagg.RoundParams(self.round_id, p.devices, p.size, p.bits, p.degree, p.threshold, p.graph_seed)
        wrong_size = self.value is not None and p.size != self.value.size
        if wrong_size or not 0 <= p.index < p.devices or sorted(view.keys) != list(params.neighbours[p.index]):
            raise SecAggError("the round's parameters do not fit this device's input and neighbours")
        me = replace(self.secrets, index=p.index)
        self.last_answered = view.phase
        keys = {v: secagg.PublicKeys(bytes.fromhex(k.encryption), bytes.fromhex(k.masking)) for v, k in view.keys.items()}
        received = {v: bytes.fromhex(c) for v, c in view.shares.items()}
        shared = {*received, p.index}
        self.answered.add(view.phase)
        if view.phase == "share_keys":
            return SecAggShares(shares={v: c.hex() for v, c in secagg.share_keys(params, me, keys).items()})
        if view.phase == "masked_input":
            return packing.pack(secagg.masked_input(params, me, keys, shared, self.value), p.bits)
        if view.phase == "unmask":
            revealed = secagg.unmask(params, me, keys, received, shared, set(view.masked))
            return SecAggReveal(
                seeds={v: share.hex() for v, (kind, share) in revealed.items() if kind == secagg.SEED},
                keys={v: share.hex() for v, (kind, share) in revealed.items() if kind == secagg.KEY},
            )
        return None
