"""Who takes a seat in a round, by each device's record.

A production system keeps a record of every device and lets it shape selection; so does
this one. A device that took a task and never reported sits out the next rounds (1, 2,
4 ... up to 32 after consecutive misses); a report clears its record. Once the
population holds at least ``target_reports`` devices that have reported, devices that
never have get only the cohort's over-selection slack while a round is young, so a
crowd of newcomers that take tasks and never report cannot starve the run, and honest
newcomers still get seats to prove themselves in. Functions of a connection, like
``coordinator.rounds``, which calls them.
"""

from __future__ import annotations

from collections.abc import Sequence

from coordinator.database import Connection, Row
from edgefl.config import RunConfig

MAX_EXCLUSION_ROUNDS = 32
DEFERRED_RETRY_S = 2.0
YOUNG_ROUND_S = 10.0  # at most; a quarter of the round's timeout when that is shorter


def exclusion_rounds(consecutive_drops: int) -> int:
    return min(2 ** (consecutive_drops - 1), MAX_EXCLUSION_ROUNDS) if consecutive_drops > 0 else 0


def _proven_population(db: Connection) -> int:
    return db.execute("SELECT COUNT(*) FROM devices WHERE reports > 0").fetchone()[0]


def _slack(config: RunConfig) -> int:
    return config.cohort_size - config.target_reports


def selectable(db: Connection, config: RunConfig, round_id: int, candidates: Sequence[str]) -> list[str]:
    """Of ``candidates`` (device ids in arrival order; unknown ones are skipped), the
    ones a new round takes: none sitting out, devices that have reported first, and
    devices that never have only up to the slack once enough have."""
    records = {}
    for device_id in dict.fromkeys(candidates):
        row = db.execute("SELECT reports, excluded_until FROM devices WHERE id = ?", (device_id,)).fetchone()
        if row is not None and row["excluded_until"] <= round_id:
            records[device_id] = row["reports"]
    proven = [d for d, reports in records.items() if reports > 0]
    unproven = [d for d, reports in records.items() if reports == 0]
    if _proven_population(db) >= config.target_reports:
        unproven = unproven[: _slack(config)]
    return (proven + unproven)[: config.cohort_size]


def refusal(db: Connection, config: RunConfig, device_id: str, current: Row, now: float) -> float | None:
    """None if a device may take a seat in the open round now; else how long it should
    wait before asking again (its answer is ``wait``, reason ``deferred``)."""
    row = db.execute("SELECT reports, excluded_until FROM devices WHERE id = ?", (device_id,)).fetchone()
    if row["excluded_until"] > current["id"]:
        return DEFERRED_RETRY_S
    young_until = current["opened_at"] + min(YOUNG_ROUND_S, config.round_timeout_s / 4)
    if row["reports"] == 0 and now < young_until and _proven_population(db) >= config.target_reports:
        (unproven,) = db.execute(
            "SELECT COUNT(*) FROM assignments a JOIN devices d ON d.id = a.device_id WHERE a.round_id = ? AND d.reports = 0",
            (current["id"],),
        ).fetchone()
        if unproven >= _slack(config):
            return min(max(young_until - now, 0.1), DEFERRED_RETRY_S)
    return None


def record_outcomes(db: Connection, round_id: int, *, count_misses: bool = True) -> None:
    """Update the record of every device selected into a round that has just closed:
    a report (any message: in a secure round, its keys, sent once it trained) clears its misses; a miss makes it sit out longer. A round that closed on
    its target counts no misses: the over-selected devices still training were not late."""
    db.execute(
        "UPDATE devices SET tasks = tasks + 1, reports = reports + 1, consecutive_drops = 0"
        " WHERE id IN (SELECT device_id FROM messages WHERE round_id = ?)",
        (round_id,),
    )
    if not count_misses:
        return
    missed = db.execute(
        "SELECT d.id, d.consecutive_drops FROM assignments a JOIN devices d ON d.id = a.device_id WHERE a.round_id = ?"
        " AND NOT EXISTS (SELECT 1 FROM messages u WHERE u.round_id = a.round_id AND u.device_id = a.device_id)",
        (round_id,),
    ).fetchall()
    db.executemany(
        "UPDATE devices SET tasks = tasks + 1, consecutive_drops = ?, excluded_until = ? WHERE id = ?",
        [(row[1] + 1, round_id + 1 + exclusion_rounds(row[1] + 1), row[0]) for row in missed],
    )


def exclude_devices(db: Connection, device_ids: Sequence[str], round_id: int) -> None:
    """Devices whose update ruined the model sit out the longest exclusion, and their
    report in that round no longer counts in their favour."""
    db.executemany(
        "UPDATE devices SET reports = CASE WHEN reports > 0 THEN reports - 1 ELSE 0 END,"
        " consecutive_drops = consecutive_drops + 1, excluded_until = ? WHERE id = ?",
        [(round_id + 1 + MAX_EXCLUSION_ROUNDS, device_id) for device_id in device_ids],
    )


def record_late_report(db: Connection, device_id: str) -> None:
    """A device that uploaded after its round closed is alive: its misses are cleared."""
    db.execute("UPDATE devices SET consecutive_drops = 0, excluded_until = 0 WHERE id = ?", (device_id,))
