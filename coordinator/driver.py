"""The round driver: opens rounds, closes them, aggregates, evaluates and commits.

It runs beside the WSGI server (off the request path) and keeps all of its progress in
the store, so a coordinator restarted at any point picks up where the store says: a
round left ``aggregating`` is aggregated again from its durable updates, and only the
final commit (checkpoint row, round status and the next round, one transaction) makes a
new model visible. The committed model is evaluated on the held-out split after that,
while devices already train the next round (a round's metrics appear in the status
once evaluated; a restart evaluates what was left unevaluated). While a round is open, each durable update is folded into the
round's accumulator as it arrives, in arrival order; the fold lives in memory and is
rebuilt from the store in the same order after a restart, so closing a round costs
only TFF's report and update. Only the holder of the round-driver lease (in the
database) steps the run, so coordinators sharing a store never both drive it.

(A little over 400 lines: every transition the lifecycle names is taken here, each in
one lease-guarded transaction beside the I/O it needs; what decides is elsewhere, in
``coordinator.lifecycle``, ``rounds``, ``guard`` and ``aggregation``.)
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Collection, Mapping
from contextlib import closing, contextmanager
from dataclasses import dataclass

import numpy as np

from coordinator import guard, leases, lifecycle, records, results, rounds, selection
from coordinator.aggregation import FedAvgServer, RoundFold, ServerOutput, ServerSettings
from coordinator.database import Connection, Row
from coordinator.errors import ApiError
from coordinator.lifecycle import Event, Phase, Verdict
from coordinator.lobby import Lobby
from coordinator.secure import SecureRound
from coordinator.store import Store
from edgefl import codecs, failpoints, metrics, wire
from edgefl.config import RunConfig
from edgefl.datasets import load_dataset
from edgefl.models import weight_names
from edgefl.protocol import RoundStatus, RunStatusName
from edgefl.secagg.crypto import SecAggError
from edgefl.training import KerasLearner

log = logging.getLogger("edgefl.coordinator")


def resumed_config(store: Store, requested: RunConfig, given: Collection[str]) -> RunConfig:
    """What to run with: ``requested`` for a new run; an existing run keeps its stored
    configuration (operators may have changed it since it started), and the settings a
    user gave explicitly (``given``: field names, or a mapping of each to where it was
    given, which the refusal then names) must agree with it."""
    where = given if isinstance(given, Mapping) else {}
    with closing(store.connect()) as db:
        stored = rounds.run_config(db)
    if stored is None:
        return requested
    differing = [
        f"{name}={getattr(stored, name)!r} (asked {getattr(requested, name)!r}"
        + (f" by {where[name]})" if name in where else ")")
        for name in sorted(given)
        if getattr(stored, name) != getattr(requested, name)
    ]
    if differing:
        raise ValueError(
            f"{store.instance_dir} holds a run with {', '.join(differing)}; leave those settings out to resume it,"
            " change them with POST /v1/admin/config, or use a new instance directory"
        )
    return stored


class RoundDriver:
    def __init__(
        self,
        store: Store,
        config: RunConfig,
        *,
        clock: Callable[[], float] = time.time,
        learner: KerasLearner | None = None,
        server: FedAvgServer | None = None,
        lobby: Lobby | None = None,
    ):
        """``learner`` and ``server`` may be passed in to share their traced TF/TFF
        functions (tests do); by default they are built for ``config``.
        A new round's cohort is selected from ``lobby`` first, and the lobby is woken
        when a round opens or the run finishes."""
        self.store = store
        self.config = config
        self.clock = clock
        self.learner = learner or KerasLearner(config.model, config.dataset)
        self.names = weight_names(self.learner.model)
        self.spec = wire.spec_of(self.names, self.learner.model.get_weights())
        self.server = server or FedAvgServer(self.spec, ServerSettings.of(config))
        self.test = load_dataset(config.dataset).test
        self.guard = guard.Guard(self.learner, self.test.x[: guard.PROBE_EXAMPLES], self.test.y[: guard.PROBE_EXAMPLES])
        self._fold: _Fold | None = None
        self.lobby = lobby or Lobby()
        self.holder = leases.holder_name(uuid.uuid4().hex[:8])
        self._lease_checked_until = 0.0

    def ensure_run(self, initial_checkpoint: bytes | None = None) -> None:
        """Create the run with its initial checkpoint (fresh weights from the seed, or
        those of ``initial_checkpoint``, say the last run's final model), or check an
        existing run's config (a restart resumes it: see ``step``)."""
        with closing(self.store.connect()) as db:
            existing = rounds.run_config(db)
            if existing is not None:
                if existing != self.config:
                    raise ValueError(
                        f"{self.store.instance_dir} already holds a run with another configuration "
                        f"({existing.to_json()}); use a new instance directory or the same settings"
                    )
                return
            initial = self._initial_weights() if initial_checkpoint is None else self._weights_of(initial_checkpoint)
            checkpoint = wire.encode(self.names, initial, {"version": "0", "model": self.config.model})
            sha = self.store.blobs.put(checkpoint)
            state_sha = self.store.blobs.put(self.server.state_to_bytes(self.server.initialize()))
            with self.store.transaction(db):
                if rounds.run_config(db) is None:  # another coordinator may have just created it
                    rounds.start_run(db, self.config, sha, len(checkpoint), state_sha, self.clock())

    def _weights_of(self, checkpoint: bytes) -> list[np.ndarray]:
        try:
            weights, _ = wire.decode(checkpoint, self.spec)
        except wire.WireError as error:
            raise ValueError(f"the previous run's model does not fit model {self.config.model}: {error.detail}") from None
        return weights

    def _initial_weights(self) -> list[np.ndarray]:
        from edgefl.models import build_model

        return build_model(self.config.model, self.config.dataset, seed=self.config.seed).get_weights()

    def step(self) -> bool:
        """Advance the run by at most one transition; True if something changed. Only
        the holder of the round-driver lease does (see ``coordinator.leases``); the
        lease is held while the run is paused or over too, so that no other process
        takes the instance over meanwhile (``serve --new-run`` checks it)."""
        with closing(self.store.connect()) as db:
            if not self._hold_lease(db) or rounds.run_status(db) != RunStatusName.RUNNING:
                return False
            try:
                return self._step(db)
            except LeaseLost:
                log.warning("lost the round-driver lease to another process mid-step; rolled back")
                self._fold, self._lease_checked_until = None, 0.0
                return False

    def _hold_lease(self, db: Connection) -> bool:
        """Take or renew the lease when half of it is gone (each transition renews it too)."""
        now = self.clock()
        if now < self._lease_checked_until:
            return True
        with self.store.transaction(db):
            held = leases.take(db, leases.ROUND_DRIVER, self.holder, now)
        if held and not self._lease_checked_until:
            log.info("driving the rounds (lease holder %s)", self.holder)
            self._sweep_blobs(db)
        self._lease_checked_until = now + leases.LEASE_S / 2 if held else 0.0
        return held

    @contextmanager
    def _transition(self, db: Connection):
        """A write transaction that commits only while this driver still holds the lease."""
        with self.store.transaction(db):
            if not leases.take(db, leases.ROUND_DRIVER, self.holder, self.clock()):
                raise LeaseLost(self.holder)
            yield db

    def release_lease(self) -> None:
        with closing(self.store.connect()) as db, self.store.transaction(db):
            leases.release(db, leases.ROUND_DRIVER, self.holder)

    def _step(self, db: Connection) -> bool:
        """One move of the run: evaluate a committed round, open the next, or look up the
        open round's phase, ask its close rule and apply the transition the verdict names
        (``coordinator.lifecycle``). False when there is nothing to do yet."""
        self.config = rounds.run_config(db)  # an operator may have changed it
        self.plan = lifecycle.plan_for(self.config)
        now = self.clock()
        pending = rounds.unevaluated_round(db)
        if pending is not None:
            self._evaluate(db, pending)
            return True
        current = rounds.active_round(db)
        if current is None:
            with self._transition(db):
                self._begin_round(db, now)
            self.lobby.notify()
            return True
        if current["status"] == RoundStatus.OPEN:
            self._fold_arrivals(db, current)  # not a transition: the fold is rebuilt after a restart
            if rounds.verdict(db, self.config, current, now)[1] == Verdict.WAIT:
                return False  # the common case, decided without taking the write lock
            with self._transition(db):  # look again: no message can commit in between now
                current = rounds.round_by_id(db, current["id"])
                phase, verdict = rounds.verdict(db, self.config, current, now)
                event = self.plan.outcome(phase, verdict)
                if event is None:
                    return False
                messages = rounds.message_count(db, current["id"], phase.phase)
                if event == Event.TOO_FEW:
                    what = "reports" if phase is self.plan.first else f"{phase.phase} messages"
                    self._abandon(db, current, "too_few_reports", f"{messages} {what} arrived by its deadline: too few to go on")
                elif event == Event.NEXT_PHASE:
                    rounds.next_phase(db, self.config, current["id"], phase, now)
                    log.info("round %d: %s closed with %d messages", current["number"], phase.phase, messages)
                else:
                    rounds.close_collection(db, current["id"], now, on_target=messages >= self.config.target_reports)
            if event == Event.TOO_FEW:
                self._after_abandoning(db, current)
            if event != Event.COLLECTED:
                return True
        self._aggregate(db, rounds.active_round(db))
        return True

    def _abandon(self, db: Connection, current: Row, reason: str, detail: str) -> None:
        """Inside a transition: give the round up and open the next one on the same model."""
        log.warning("round %d abandoned (%s): %s", current["number"], reason, detail)
        rounds.abandon(db, current["id"], reason, detail, self.clock())
        if rounds.run_status(db) == RunStatusName.RUNNING:
            self._begin_round(db, self.clock())

    def _after_abandoning(self, db: Connection, current: Row) -> None:
        self._fold = None
        self.lobby.notify()
        self._discard_updates(db, current["id"])
        self._write_results(db)

    def _write_results(self, db: Connection) -> None:
        """The run's round history as a CSV and TensorBoard events (``coordinator.results``);
        they are rebuilt from the store each time, so a failure here costs no round."""
        try:
            run = db.execute("SELECT created_at FROM run WHERE id = 1").fetchone()
            results.write_results(self.store.instance_dir, run["created_at"], records.history(db))
        except OSError as error:
            log.warning("could not write the run's results under %s: %s", self.store.instance_dir, error)

    def _begin_round(self, db: Connection, now: float) -> None:
        rounds.begin_round(db, self.config, now, candidates=self.lobby.waiting())

    def _fold_arrivals(self, db: Connection, current: Row) -> None:
        """Fold the round's durable updates not folded yet (a secure round's masked
        inputs: add them up, so unmasking needs only to remove the masks)."""
        if self._fold is None or self._fold.round_id != current["id"]:
            base = db.execute("SELECT * FROM checkpoints WHERE version = ?", (current["base_version"],)).fetchone()
            weights, _ = wire.decode(self.store.blobs.get(base["sha256"]), self.spec)
            state = self.server.state_from_bytes(self.store.blobs.get(base["server_state_sha256"]))
            self._fold = _Fold(current["id"], self.server.begin(state, weights))
        if self.server.secure:
            if self.plan.reached(current["phase"], Phase.MASKED_INPUT):
                secure = self._secure_round(db, current)
                fold = self._fold
                if fold.masked_total is None:
                    fold.masked_total = np.zeros(secure.params.size, np.uint64)
                fold.last_update_id = secure.add_masked_inputs(fold.masked_total, fold.last_update_id)
            return
        arrivals = rounds.round_updates(db, current["id"], after_id=self._fold.last_update_id)
        started = time.perf_counter()
        for update in arrivals:
            delta = self._delta_of(update)
            self._fold.fold = self.server.fold(self._fold.fold, delta, update["num_examples"])
            self._fold.last_update_id = update["id"]
        self._fold.seconds += time.perf_counter() - started

    def _aggregate(self, db: Connection, current: Row) -> None:
        failpoints.hold("aggregating", at=current["number"])  # the round is closed, its new model not yet durable
        started = self.clock()
        self._fold_arrivals(db, current)
        fold = self._fold
        updates = rounds.round_updates(db, current["id"])
        if fold.fold.updates != len(updates):
            raise RuntimeError(f"round {current['number']} folded {fold.fold.updates} of {len(updates)} updates")
        base = list(fold.fold.round_state[: len(self.spec)])
        excluded: list[Row] = []
        protocol: dict = {}
        if self.server.secure:
            output, problem, protocol = self._unmask(db, current, fold)
            if output is not None and (
                problem := self.guard.problem(output.weights, base, current["base_version"], self.config.aggregator)
            ):
                output = None  # no update can be screened alone: the coordinator never sees one
        else:
            output = self.server.finish(fold.fold)
            problem = self.guard.problem(output.weights, base, current["base_version"], self.config.aggregator)
            if problem is not None:
                output, excluded = self.guard.screen(
                    self.server, fold.fold, updates, base, current["base_version"], self.config.aggregator, self._delta_of
                )
        aggregated = self.clock()
        if output is None:  # deterministic: the same updates give the same result, so retrying cannot help
            with self._transition(db):
                self._abandon(db, current, *problem)
            self._after_abandoning(db, current)
            return
        if excluded:
            log.warning("round %d: left out %d update(s) that ruin the model alone", current["number"], len(excluded))
            left_out = {u["id"] for u in excluded}
            updates = [u for u in updates if u["id"] not in left_out]

        number = current["number"]
        checkpoint = wire.encode(self.names, output.weights, {"version": str(number), "model": self.config.model})
        sha = self.store.blobs.put(checkpoint)
        state_sha = self.store.blobs.put(self.server.state_to_bytes(output.state))
        reports = [json.loads(u["metrics"]) for u in updates]
        examples = [u["num_examples"] for u in updates]
        figures = {
            "num_examples": sum(examples),
            "train_loss": metrics.weighted(reports, "train_loss", examples),
            "train_accuracy": metrics.weighted(reports, "train_accuracy", examples),
            "fold_s": fold.seconds,
            "aggregation_s": aggregated - started,
            "personalization": metrics.personalization(reports),
            "measurements": output.measurements,  # TFF's: clip and zeroing norms, zeroed counts, DP's clip
            # what the same updates' tensors weigh as float32, beside the bytes that came
            "bytes_up_float32": len(updates) * codecs.FLOAT32.payload_bytes(self.spec),
            "upload_bits": self.config.upload_codec.bits,
        }
        if protocol:
            figures["secagg"] = protocol
        if excluded:
            figures["excluded_updates"] = {"count": len(excluded), "reason": "applied alone, each made the model diverge"}
        with self._transition(db):
            rounds.commit_round(db, current, sha, len(checkpoint), state_sha, figures, self.clock())
            selection.exclude_devices(db, [u["device_id"] for u in excluded], current["id"])
            if number < self.config.rounds:
                self._begin_round(db, self.clock())
        self.lobby.notify()
        log.info("round %d committed", number)
        failpoints.hold("committed", at=number)  # its update blobs not yet discarded, its model not evaluated
        self._discard_updates(db, current["id"])
        self._evaluate(db, rounds.round_by_id(db, current["id"]), output.weights)

    def _secure_round(self, db: Connection, current: Row) -> SecureRound:
        return SecureRound.load(db, self.store.blobs.get, self.config, current["id"], self.server.secure_layout.size)

    def _unmask(self, db: Connection, current: Row, fold: _Fold) -> tuple[ServerOutput | None, tuple | None, dict]:
        """A secure round's output from the sum SecAgg+ unmasks (or why there is none:
        the revealed shares did not recover every secret, so the sum stays masked)."""
        started = self.clock()
        secure = self._secure_round(db, current)
        try:
            total = secure.unmasked_sum(fold.masked_total, fold.last_update_id)
        except (SecAggError, ApiError) as error:
            return None, ("unmask_failed", str(error)), {}
        try:
            output = self.server.finish_secure(fold.fold, total, len(secure.masked))
        except SecAggError as error:
            return None, ("sum_out_of_range", str(error)), {}
        return output, None, {**secure.figures(), "unmask_s": self.clock() - started}

    def _delta_of(self, update: Row) -> list[np.ndarray]:
        delta, _ = self.config.upload_codec.decode(self.store.blobs.get(update["blob_sha256"]), self.spec)
        return delta

    def _sweep_blobs(self, db: Connection) -> None:
        """On taking the lease, delete what a crashed predecessor left behind: the update
        blobs of a round committed just before it died, an upload's blob written but never
        recorded, half-written temporary files. Only the lease holder writes checkpoints,
        so none of them is in flight. Under the write lock, like ``_discard_updates``."""
        with self._transition(db):
            for sha256 in self.store.blobs.names() - records.live_blobs(db):
                self.store.blobs.trash(sha256)
        self.store.blobs.empty_trash()
        self.store.blobs.remove_stale_temporaries()

    def _discard_updates(self, db: Connection, round_id: int) -> None:
        """Delete the update blobs a finished round no longer needs (after its commit, so
        a crash before it leaves them for the next start's sweep). They leave the store
        under the write lock, so an upload of the same bytes either finds its blob gone
        and rewrites it, or has its row counted here; the slow unlinks come after."""
        with self._transition(db):
            for sha256 in records.discardable_update_blobs(db, round_id):
                self.store.blobs.trash(sha256)
        self.store.blobs.empty_trash()

    def _evaluate(self, db: Connection, committed: Row, weights: list[np.ndarray] | None = None) -> None:
        """Central evaluation of a committed round's model; the last one finishes the run."""
        started = self.clock()
        if weights is None:
            checkpoint = db.execute("SELECT sha256 FROM checkpoints WHERE round_id = ?", (committed["id"],)).fetchone()
            weights, _ = wire.decode(self.store.blobs.get(checkpoint["sha256"]), self.spec)
        evaluation = self.learner.evaluate(weights, self.test.x, self.test.y)
        with self._transition(db):
            rounds.record_evaluation(db, committed["id"], {**evaluation, "evaluation_s": self.clock() - started}, self.clock())
            if committed["number"] >= self.config.rounds:
                rounds.finish_run(db, self.clock())
        log.info("round %d evaluated: accuracy %.4f loss %.4f", committed["number"], evaluation["accuracy"], evaluation["loss"])
        self._write_results(db)
        if committed["number"] >= self.config.rounds:
            self.lobby.notify()
            log.info(
                "the run finished after %d rounds (final test accuracy %.4f); still serving its model and record."
                " To start another on this instance: edgefl serve --new-run [--from-final]",
                committed["number"],
                evaluation["accuracy"],
            )

    def run(self, stop: threading.Event, *, wake: threading.Event | None = None, poll_s: float = 0.1) -> None:
        """Step until ``stop`` is set, at least every ``poll_s`` (deadlines, other
        processes' uploads) and at once when ``wake`` is set. A failed step is logged
        and retried with backoff, never fatal; a round whose step fails
        ``MAX_FAILURES`` times (counted in the store, so across restarts too) is given
        up (see ``give_up_on_failures``)."""
        wake = wake or threading.Event()
        failures = 0
        while not stop.is_set():
            try:
                if self.step():
                    failures = 0
                    continue
            except Exception as error:
                failures += 1
                log.exception("round driver step failed; retrying")
                self.give_up_on_failures(error)
                stop.wait(min(2.0 ** (failures - 1), 30.0))
            wake.wait(poll_s)
            wake.clear()
        self.release_lease()  # a successor need not wait for it to expire

    def give_up_on_failures(self, error: Exception) -> None:
        """Count a failed step against the round it was working on. Once a round has
        failed ``MAX_FAILURES`` times it is abandoned (or, if only its evaluation
        fails, recorded without one) with the error as the reason, and the run goes
        on from the last good model: a deterministic failure cannot stall the run."""
        detail = f"{type(error).__name__}: {error}"
        try:
            with closing(self.store.connect()) as db:
                pending = rounds.unevaluated_round(db)
                target = pending or rounds.active_round(db)
                if target is None:
                    return
                with self._transition(db):
                    if rounds.note_failure(db, target["id"]) < MAX_FAILURES:
                        return
                    if pending is not None:
                        log.error("round %d could not be evaluated: %s", pending["number"], detail)
                        rounds.record_evaluation(db, pending["id"], {"evaluation_error": detail[:500]}, self.clock())
                        if pending["number"] >= self.config.rounds:
                            rounds.finish_run(db, self.clock())
                    else:
                        self._abandon(db, target, "aggregation_failed", detail)
                if pending is None:
                    self._after_abandoning(db, target)
                else:
                    self.lobby.notify()
        except Exception:  # the store itself is failing: nothing to record; the step is retried
            log.exception("could not record the failed step")


MAX_FAILURES = 3  # failed attempts at a round's next step before it is given up


class LeaseLost(Exception):
    """Another process took the round-driver lease while this one was mid-step."""


@dataclass
class _Fold:
    """The open round's fold and how far into its updates (by id) it has got."""

    round_id: int
    fold: RoundFold
    last_update_id: int = 0  # of the updates folded, or of a secure round's masked inputs added up
    seconds: float = 0.0
    masked_total: np.ndarray | None = None  # a secure round's masked inputs, added up as they arrive
