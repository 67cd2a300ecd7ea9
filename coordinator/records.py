"""What the store says of a run, read back: every round's record, the configuration's
changes, the privacy a DP run has spent, and which blobs are still needed. Reads only
(``coordinator.rounds`` writes), so the API's status, the archive of a finished run and
the round driver's blob sweep share one account of the run.
"""

from __future__ import annotations

import json

from coordinator.database import Connection
from edgefl.config import RunConfig
from edgefl.protocol import RoundStatus


def config_changes(db: Connection) -> list[dict]:
    return [
        {"changes": json.loads(r["changes"]), "changed_at": r["changed_at"]}
        for r in db.execute("SELECT * FROM config_changes ORDER BY id")
    ]


def history(db: Connection) -> list[dict]:
    """Every round, oldest first: participation (selected, reported (sent a message of
    any kind: an update, or a secure round's keys), dropped: selected
    and never heard from by the close; late: reported after it; rejected uploads by
    reason), bytes, how long each phase took, and metrics (the devices' combined
    personalisation reports and a DP run's privacy spent among them)."""
    rows = db.execute(
        "SELECT r.*,"
        " (SELECT COUNT(*) FROM assignments a WHERE a.round_id = r.id) AS selected,"
        " (SELECT COUNT(DISTINCT u.device_id) FROM messages u WHERE u.round_id = r.id) AS reported,"
        " (SELECT COUNT(DISTINCT x.device_id) FROM rejections x WHERE x.round_id = r.id AND x.late = 1) AS late,"
        " (SELECT CAST(COALESCE(SUM(size), 0) AS BIGINT) FROM messages u WHERE u.round_id = r.id) AS bytes_up"
        " FROM rounds r ORDER BY r.id"
    ).fetchall()
    rejected: dict[int, dict[str, int]] = {}
    for round_id, code, count in db.execute(
        "SELECT round_id, code, COUNT(*) FROM rejections WHERE late = 0 GROUP BY round_id, code ORDER BY code"
    ):
        rejected.setdefault(round_id, {})[code] = count
    return [
        {
            "id": r["id"],
            "number": r["number"],
            "status": r["status"],
            "phase": r["phase"],
            "selected": r["selected"],
            "reported": r["reported"],
            "dropped": r["selected"] - r["reported"] - r["late"] if r["status"] != RoundStatus.OPEN else None,
            "late": r["late"],
            "rejected": rejected.get(r["id"], {}),
            "bytes_down": r["bytes_down"],
            "bytes_up": r["bytes_up"],
            "phase_seconds": {
                "collecting": _between(r["opened_at"], r["closed_at"]),
                "aggregating": _between(r["closed_at"], r["committed_at"]),
                "evaluating": _between(r["committed_at"], r["evaluated_at"]),
            },
            "opened_at": r["opened_at"],
            "deadline_at": r["deadline_at"],
            "closed_at": r["closed_at"],
            "committed_at": r["committed_at"],
            "evaluated_at": r["evaluated_at"],
            "abandon_reason": r["abandon_reason"],
            "abandon_detail": r["abandon_detail"],
            "failures": r["failures"],
            "metrics": json.loads(r["metrics"]) if r["metrics"] else None,
        }
        for r in rows
    ]


def privacy_spent(db: Connection, config: RunConfig) -> dict[int, dict]:
    """For a DP run, (epsilon, delta) after each committed round, by round id.

    The population a round's cohort is drawn from is the devices whose updates have
    been aggregated by then, not the registered ones: registering costs nothing, so
    bogus registrations would make the sampling rate, and so epsilon, look smaller."""
    from coordinator import privacy

    if not config.aggregator.startswith("dp"):
        return {}
    committed = db.execute(
        "SELECT r.id, (SELECT COUNT(*) FROM updates u WHERE u.round_id = r.id),"
        " (SELECT COUNT(DISTINCT u.device_id) FROM updates u JOIN rounds p ON p.id = u.round_id"
        f"  WHERE p.status = '{RoundStatus.COMMITTED}' AND p.id <= r.id)"
        f" FROM rounds r WHERE r.status = '{RoundStatus.COMMITTED}' ORDER BY r.id"
    ).fetchall()
    spent = privacy.epsilons(config.dp_noise_multiplier, [(row[1], row[2]) for row in committed])
    return {row[0]: {"epsilon": epsilon, "delta": privacy.DELTA} for row, epsilon in zip(committed, spent)}


def _between(start: float | None, end: float | None) -> float | None:
    return end - start if start is not None and end is not None else None


def discardable_update_blobs(db: Connection, round_id: int) -> list[str]:
    """The message blobs (updates, and any other kind) of a finished round (committed or
    abandoned) that no live round's message also names: the coordinator keeps no device's update longer than its round
    needs it."""
    rows = db.execute(
        "SELECT DISTINCT u.blob_sha256 FROM messages u JOIN rounds r ON r.id = u.round_id"
        f" WHERE r.id = ? AND r.status IN ('{RoundStatus.COMMITTED}', '{RoundStatus.ABANDONED}') AND u.blob_sha256 NOT IN"
        " (SELECT v.blob_sha256 FROM messages v JOIN rounds o ON o.id = v.round_id"
        f"  WHERE o.status IN ('{RoundStatus.OPEN}', '{RoundStatus.AGGREGATING}'))",
        (round_id,),
    ).fetchall()
    return [r[0] for r in rows]


def live_blobs(db: Connection) -> set[str]:
    """Every blob the store still needs: checkpoints, server states, the served phone
    artefacts, and the messages (updates among them) of the round in progress. Anything else is left over
    from a crash, a finished round or a replaced artefact."""
    rows = db.execute(
        "SELECT sha256 FROM checkpoints UNION SELECT server_state_sha256 FROM checkpoints"
        " UNION SELECT sha256 FROM artefacts"
        " UNION SELECT u.blob_sha256 FROM messages u JOIN rounds r ON r.id = u.round_id"
        f" WHERE r.status IN ('{RoundStatus.OPEN}', '{RoundStatus.AGGREGATING}')"
    ).fetchall()
    return {r[0] for r in rows}
