"""The round state machine, as statements over the store.

A run holds numbered rounds; round N trains model version N-1 into version N. A round
is ``open`` (selecting, then collecting its plan's phases), then ``aggregating`` and
``committed``, or ``abandoned``, with a recorded reason: a phase's deadline passed with
too few messages, its aggregate was not finite, or closing it failed again and again (a
new round then retries the same model). What follows what is ``coordinator.lifecycle``'s
table; the functions here write it. Every function takes a connection (and, where time
matters, the current time), so the state machine is driven the same way by the API, the
round driver and the tests.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass

from coordinator import lifecycle, records, selection
from coordinator.database import Connection, Row
from edgefl.config import RunConfig
from edgefl.protocol import CheckinAnswer, RoundStatus, RunStatusName, SecureTask, Task

# Pace steering: a device the next round will need soon polls again quickly; one that
# already reported in the open round sleeps half of what is probably left of it (so it
# polls a few times and never oversleeps the next round by much when this one closes
# early); one that found the cohort full backs off longer. Jitter spreads all three so
# devices never arrive in step.
SOON_RETRY_S = 0.1
LATER_RETRY_S = 2.0


@dataclass(frozen=True)
class Rejection:
    status: int
    code: str
    detail: str


def run_config(db: Connection) -> RunConfig | None:
    row = db.execute("SELECT config FROM run WHERE id = 1").fetchone()
    return RunConfig.from_json(row["config"]) if row else None


def run_status(db: Connection) -> str | None:
    row = db.execute("SELECT status FROM run WHERE id = 1").fetchone()
    return row["status"] if row else None


def latest_checkpoint(db: Connection) -> Row | None:
    return db.execute("SELECT * FROM checkpoints ORDER BY version DESC LIMIT 1").fetchone()


def active_round(db: Connection) -> Row | None:
    return db.execute("SELECT * FROM rounds WHERE status IN (?, ?) ORDER BY id DESC LIMIT 1", tuple(lifecycle.LIVE)).fetchone()


def start_run(db: Connection, config: RunConfig, checkpoint_sha256: str, size: int, state_sha256: str, now: float) -> None:
    db.execute(
        "INSERT INTO run (id, config, status, created_at) VALUES (1, ?, ?, ?)",
        (config.to_json(), RunStatusName.RUNNING, now),
    )
    add_checkpoint(db, 0, checkpoint_sha256, size, state_sha256, None, now)


def add_checkpoint(
    db: Connection, version: int, sha256: str, size: int, state_sha256: str, round_id: int | None, now: float
) -> None:
    db.execute(
        "INSERT INTO checkpoints (version, sha256, size, server_state_sha256, round_id, created_at) VALUES (?, ?, ?, ?, ?, ?)",
        (version, sha256, size, state_sha256, round_id, now),
    )


def begin_round(db: Connection, config: RunConfig, now: float, candidates: Sequence[str] = ()) -> int:
    """Open the next round, its cohort taken first from ``candidates`` (devices waiting
    now, in arrival order), as ``selectable`` orders and limits them."""
    base = latest_checkpoint(db)
    first = lifecycle.plan_for(config).first
    (round_id,) = db.execute(
        "INSERT INTO rounds (number, status, phase, base_version, opened_at, deadline_at) VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
        (base["version"] + 1, RoundStatus.OPEN, first.phase, base["version"], now, now + first.deadline_s(config)),
    ).fetchone()
    db.executemany(
        "INSERT INTO assignments (round_id, device_id, assigned_at) VALUES (?, ?, ?)",
        [(round_id, device_id, now) for device_id in selection.selectable(db, config, round_id, candidates)],
    )
    return round_id


def checkin(db: Connection, device_id: str, now: float, rng: random.Random, *, may_assign: bool = True) -> CheckinAnswer | None:
    """Select the device into the open round's cohort, or tell it when to come back.

    With ``may_assign`` False (inside a read, not a write transaction) it returns None
    where it would select the device: most check-ins change nothing, and they need
    not queue for the write lock to learn that."""
    status = run_status(db)
    if status in (RunStatusName.FINISHED, RunStatusName.STOPPED):
        return CheckinAnswer(status="finished", reason=f"run_{status}")
    if status == RunStatusName.PAUSED:
        return _retry(rng, LATER_RETRY_S, "paused")
    config = run_config(db)
    current = active_round(db)
    if current is None or current["status"] != RoundStatus.OPEN:
        return _retry(rng, SOON_RETRY_S, "between_rounds")
    round_id = current["id"]
    if db.execute("SELECT 1 FROM messages WHERE round_id = ? AND device_id = ?", (round_id, device_id)).fetchone():
        first_task = db.execute("SELECT MIN(assigned_at) FROM assignments WHERE round_id = ?", (round_id,)).fetchone()[0]
        elapsed = now - first_task
        # Recent rounds say what is left; the time this device itself needed bounds it
        # (the others began with it), which keeps one slow round from oversleeping many.
        expected_left = min(_recent_round_seconds(db) - elapsed, elapsed)
        return _retry(rng, min(max(expected_left / 2, SOON_RETRY_S), LATER_RETRY_S), "reported")
    assigned = db.execute("SELECT 1 FROM assignments WHERE round_id = ? AND device_id = ?", (round_id, device_id)).fetchone()
    if not assigned:
        (selected,) = db.execute("SELECT COUNT(*) FROM assignments WHERE round_id = ?", (round_id,)).fetchone()
        if selected >= config.cohort_size:
            return _retry(rng, LATER_RETRY_S, "cohort_full")
        deferred_s = selection.refusal(db, config, device_id, current, now)
        if deferred_s is not None:
            return _retry(rng, deferred_s, "deferred")
        if not may_assign:
            return None
        db.execute(
            "INSERT INTO assignments (round_id, device_id, assigned_at) VALUES (?, ?, ?)",
            (round_id, device_id, now),
        )
    checkpoint = db.execute("SELECT sha256 FROM checkpoints WHERE version = ?", (current["base_version"],)).fetchone()
    task = Task(
        round_id=round_id,
        round_number=current["number"],
        model=config.model,
        checkpoint_sha256=checkpoint["sha256"],
        epochs=config.epochs,
        batch_size=config.batch_size,
        learning_rate=config.client_lr,
        momentum=config.client_momentum,
        prox_mu=config.client_prox_mu,
        seconds_left=max(0.0, current["deadline_at"] - now),
        codec=config.upload_codec.name,
        quantization_bits=config.upload_codec.bits,
        secure=SecureTask(value_bound=config.secure_value_bound, weight_bound=config.secure_weight_bound)
        if config.aggregator == "secure"
        else None,
    )
    return CheckinAnswer(status="task", task=task)


def _recent_round_seconds(db: Connection) -> float:
    """How long the last three committed rounds took from their first task to their
    commit (the shortest; 0 before the first). Counting from the first task leaves out
    a round that stood open before any device came (the first, at start-up)."""
    row = db.execute(
        "SELECT MIN(seconds) FROM (SELECT r.committed_at - MIN(a.assigned_at) AS seconds"
        f" FROM rounds r JOIN assignments a ON a.round_id = r.id WHERE r.status = '{RoundStatus.COMMITTED}'"
        " GROUP BY r.id ORDER BY r.id DESC LIMIT 3) AS recent"
    ).fetchone()
    return row[0] or 0.0


def _retry(rng: random.Random, base_s: float, reason: str) -> CheckinAnswer:
    return CheckinAnswer(status="wait", retry_after=round(base_s * (0.5 + rng.random() / 2), 3), reason=reason)


def message_rejection(
    db: Connection, round_id: int, device_id: str, kind: lifecycle.MessageKind = lifecycle.MessageKind.UPDATE
) -> Rejection | None:
    """Why this device may not send a message of ``kind`` to this round now, or None if
    it may: the round must be open, in a phase that accepts the kind, and the device one
    of the phase's participants that has not sent it yet."""
    row = db.execute("SELECT * FROM rounds WHERE id = ?", (round_id,)).fetchone()
    if row is None:
        return Rejection(404, "unknown_round", f"There is no round {round_id}.")
    if row["status"] != RoundStatus.OPEN:
        return Rejection(409, "round_closed", f"Round {round_id} is {row['status']} and takes no more {kind}s.")
    if not db.execute("SELECT 1 FROM assignments WHERE round_id = ? AND device_id = ?", (round_id, device_id)).fetchone():
        return Rejection(403, "not_selected", f"This device was not selected for round {round_id}.")
    plan = lifecycle.plan_for(run_config(db))
    phase = plan.phase(row["phase"])
    if kind not in phase.accepts:
        return Rejection(409, "wrong_phase", f"Round {round_id} is in its {phase.phase} phase, which takes no {kind}s.")
    previous = plan.before(phase)
    if phase.participants == lifecycle.Participants.SURVIVORS and previous and not _sent(db, round_id, previous.phase, device_id):
        return Rejection(409, "not_a_survivor", f"This device sent nothing in round {round_id}'s {previous.phase} phase.")
    if _sent(db, round_id, phase.phase, device_id, kind):
        return Rejection(409, f"duplicate_{kind}", f"This device already sent its {kind} for round {round_id}.")
    return None


def _sent(db: Connection, round_id: int, phase: str, device_id: str, kind: str | None = None) -> bool:
    query = "SELECT 1 FROM messages WHERE round_id = ? AND phase = ? AND device_id = ?"
    return (
        db.execute(query + " AND kind = ?" if kind else query, (round_id, phase, device_id, *([kind] if kind else []))).fetchone()
        is not None
    )


def record_message(
    db: Connection,
    round_id: int,
    device_id: str,
    blob_sha256: str,
    num_examples: int,
    size: int,
    metrics: dict,
    now: float,
    kind: lifecycle.MessageKind = lifecycle.MessageKind.UPDATE,
) -> int:
    """Keep a device's message in the round's current phase; how many the phase holds now."""
    (phase,) = db.execute("SELECT phase FROM rounds WHERE id = ?", (round_id,)).fetchone()
    db.execute(
        "INSERT INTO messages (round_id, phase, device_id, kind, blob_sha256, num_examples, size, metrics, received_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (round_id, phase, device_id, kind, blob_sha256, num_examples, size, json.dumps(metrics), now),
    )
    return message_count(db, round_id, phase)


def record_rejection(db: Connection, round_id: int, device_id: str, code: str, size: int, now: float) -> None:
    """Log a refused upload to a known round: once per device, round and reason, so a
    device repeating itself cannot grow the log. A selected device that had not
    reported, uploading after the round closed, is late (a straggler: it is alive, so
    its record of misses is cleared); anything else is rejected."""
    if not rejection_is_new(db, round_id, device_id, code):
        return
    late = (
        code == "round_closed"
        and db.execute("SELECT 1 FROM assignments WHERE round_id = ? AND device_id = ?", (round_id, device_id)).fetchone()
        is not None
        and db.execute("SELECT 1 FROM messages WHERE round_id = ? AND device_id = ?", (round_id, device_id)).fetchone() is None
    )
    db.execute(
        "INSERT INTO rejections (round_id, device_id, code, late, size, rejected_at) VALUES (?, ?, ?, ?, ?, ?)",
        (round_id, device_id, code, int(late), size, now),
    )
    if late:
        selection.record_late_report(db, device_id)


def rejection_is_new(db: Connection, round_id: int, device_id: str, code: str) -> bool:
    return (
        db.execute(
            "SELECT 1 FROM rejections WHERE round_id = ? AND device_id = ? AND code = ?", (round_id, device_id, code)
        ).fetchone()
        is None
    )


def message_count(db: Connection, round_id: int, phase: str) -> int:
    """The messages a round's phase holds."""
    return db.execute("SELECT COUNT(*) FROM messages WHERE round_id = ? AND phase = ?", (round_id, phase)).fetchone()[0]


def verdict(db: Connection, config: RunConfig, round_row: Row, now: float) -> tuple[lifecycle.PhasePlan, lifecycle.Verdict]:
    """The round's phase, and what its close rule says of it now."""
    plan = lifecycle.plan_for(config)
    phase = plan.phase(round_row["phase"])
    return phase, phase.close(config, tally(db, plan, phase, round_row["id"]), now >= round_row["deadline_at"])


def tally(db: Connection, plan: lifecycle.RoundPlan, phase: lifecycle.PhasePlan, round_id: int) -> lifecycle.Tally:
    """A phase's messages, who may send one (the cohort, or the previous phase's
    senders), and the messages of the plan's first phase."""
    previous = plan.before(phase)
    if phase.participants == lifecycle.Participants.SURVIVORS and previous is not None:
        participants = message_count(db, round_id, previous.phase)
    else:
        (participants,) = db.execute("SELECT COUNT(*) FROM assignments WHERE round_id = ?", (round_id,)).fetchone()
    return lifecycle.Tally(message_count(db, round_id, phase.phase), participants, message_count(db, round_id, plan.first.phase))


def _apply(db: Connection, round_id: int, event: lifecycle.Event, now: float) -> None:
    """Move a round by ``event`` as ``lifecycle.TRANSITIONS`` says (IllegalTransition otherwise)."""
    status = lifecycle.next_status(round_by_id(db, round_id)["status"], event)
    column = "committed_at" if status == RoundStatus.COMMITTED else "closed_at"
    db.execute(f"UPDATE rounds SET status = ?, {column} = ? WHERE id = ?", (status, now, round_id))


def next_phase(db: Connection, config: RunConfig, round_id: int, phase: lifecycle.PhasePlan, now: float) -> None:
    """An open round moves on to the phase after ``phase``, with that phase's deadline."""
    lifecycle.next_status(round_by_id(db, round_id)["status"], lifecycle.Event.NEXT_PHASE)
    following = lifecycle.plan_for(config).after(phase)
    db.execute(
        "UPDATE rounds SET phase = ?, deadline_at = ? WHERE id = ?",
        (following.phase, now + following.deadline_s(config), round_id),
    )


def close_collection(db: Connection, round_id: int, now: float, *, on_target: bool) -> None:
    """An open round's last phase closed with enough: it is aggregated next. Its devices'
    records are updated (``on_target``: it closed as soon as enough devices reported, so
    the others were not too late)."""
    _apply(db, round_id, lifecycle.Event.COLLECTED, now)
    selection.record_outcomes(db, round_id, count_misses=not on_target)


def abandon(db: Connection, round_id: int, reason: str, detail: str, now: float) -> None:
    """Give a round up for good, saying why (a new round then retries its model)."""
    row = round_by_id(db, round_id)
    if row["status"] == RoundStatus.OPEN:
        selection.record_outcomes(db, round_id)
    event = lifecycle.Event.TOO_FEW if reason == "too_few_reports" else lifecycle.Event.FAILED
    db.execute(
        "UPDATE rounds SET status = ?, closed_at = COALESCE(closed_at, ?), abandon_reason = ?, abandon_detail = ? WHERE id = ?",
        (lifecycle.next_status(row["status"], event), now, reason, detail[:500], round_id),
    )


def note_failure(db: Connection, round_id: int) -> int:
    """Count one more failed attempt at a round's next step; how many there have been."""
    db.execute("UPDATE rounds SET failures = failures + 1 WHERE id = ?", (round_id,))
    return round_by_id(db, round_id)["failures"]


def round_by_id(db: Connection, round_id: int) -> Row:
    return db.execute("SELECT * FROM rounds WHERE id = ?", (round_id,)).fetchone()


def unevaluated_round(db: Connection) -> Row | None:
    return db.execute(
        "SELECT * FROM rounds WHERE status = ? AND evaluated_at IS NULL ORDER BY id LIMIT 1", (RoundStatus.COMMITTED,)
    ).fetchone()


def record_evaluation(db: Connection, round_id: int, evaluation: dict, now: float) -> None:
    """Add central-evaluation metrics to a committed round's metrics."""
    metrics = json.loads(round_by_id(db, round_id)["metrics"] or "{}")
    db.execute(
        "UPDATE rounds SET metrics = ?, evaluated_at = ? WHERE id = ?",
        (json.dumps({**metrics, **evaluation}), now, round_id),
    )


def round_updates(db: Connection, round_id: int, after_id: int = 0) -> list[Row]:
    """The round's updates in arrival order (the order they are folded in), after ``after_id``."""
    return db.execute("SELECT * FROM updates WHERE round_id = ? AND id > ? ORDER BY id", (round_id, after_id)).fetchall()


def commit_round(
    db: Connection,
    round_row: Row,
    checkpoint_sha256: str,
    size: int,
    state_sha256: str,
    metrics: dict,
    now: float,
) -> None:
    """Record the round's new checkpoint and metrics; a DP run's metrics also get the
    privacy spent up to and including this round (counted once, here, not per read)."""
    add_checkpoint(db, round_row["number"], checkpoint_sha256, size, state_sha256, round_row["id"], now)
    _apply(db, round_row["id"], lifecycle.Event.COMMITTED, now)
    privacy = records.privacy_spent(db, run_config(db)).get(round_row["id"])
    metrics = {**metrics, "privacy": privacy} if privacy else metrics
    db.execute("UPDATE rounds SET metrics = ? WHERE id = ?", (json.dumps(metrics), round_row["id"]))


def finish_run(db: Connection, now: float, status: RunStatusName = RunStatusName.FINISHED) -> None:
    db.execute("UPDATE run SET status = ?, finished_at = ? WHERE id = 1", (status, now))


def latest_round(db: Connection) -> Row | None:
    return db.execute("SELECT * FROM rounds ORDER BY id DESC LIMIT 1").fetchone()


def count_bytes_down(db: Connection, device_id: str, sha256: str, size: int) -> None:
    """Charge a device's checkpoint download to the open round it was selected into,
    if that round trains from this checkpoint."""
    db.execute(
        f"UPDATE rounds SET bytes_down = bytes_down + ? WHERE status = '{RoundStatus.OPEN}' AND base_version IN"
        " (SELECT version FROM checkpoints WHERE sha256 = ?)"
        " AND id IN (SELECT round_id FROM assignments WHERE device_id = ?)",
        (size, sha256, device_id),
    )
