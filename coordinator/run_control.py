"""What operators do to a run through the store: pause (no new tasks; the driver stands
still), resume, stop for good, and change the settings declared mutable. Statements
over the store like ``coordinator.rounds``, called by ``coordinator.operators``.
"""

from __future__ import annotations

import json
from dataclasses import replace

from coordinator.database import Connection
from coordinator.rounds import Rejection, active_round, finish_run, latest_round, run_config, run_status
from edgefl.config import RunConfig
from edgefl.protocol import RunStatusName

# What an operator may do to a run, from which states.
RUNNING, PAUSED, STOPPED = RunStatusName.RUNNING, RunStatusName.PAUSED, RunStatusName.STOPPED
CONTROLS = {"pause": ({RUNNING}, PAUSED), "resume": ({PAUSED}, RUNNING), "stop": ({RUNNING, PAUSED}, STOPPED)}


def control_run(db: Connection, action: str, now: float) -> Rejection | None:
    """Pause (no new tasks; the driver stands still), resume, or stop the run for good."""
    allowed, target = CONTROLS[action]
    current = run_status(db)
    if current not in allowed:
        return Rejection(409, "bad_transition", f"A {current} run cannot {action}.")
    if target == STOPPED:
        finish_run(db, now, STOPPED)
    else:
        db.execute("UPDATE run SET status = ? WHERE id = 1", (target,))
    return None


def change_config(db: Connection, changes: dict, now: float) -> RunConfig | Rejection:
    """Apply an operator's changes (already of the right types: see the API's
    ``ConfigChange``) to the run's configuration, recorded with the time.

    They take effect at once: the open round closes by the new target and minimum and
    takes a bigger or smaller cohort; a new deadline, epochs, batch size or learning rate
    apply from the next round (its devices' tasks). A DP run keeps its target: the
    server's noise was calibrated for it when the server was built."""
    status = run_status(db)
    if status not in (RUNNING, PAUSED):
        return Rejection(409, "bad_transition", f"A {status} run's configuration cannot change.")
    config = run_config(db)
    try:
        changed = replace(config, **changes)
    except (TypeError, ValueError) as error:
        return Rejection(409, "config_conflict", f"{str(error).rstrip('.')}.")
    if config.aggregator.startswith("dp") and changed.target_reports != config.target_reports:
        return Rejection(
            409,
            "config_conflict",
            f"A DP run's noise is calibrated for its target_reports ({config.target_reports}), which cannot change mid-run.",
        )
    current = active_round(db) or latest_round(db)
    if current is not None and changed.rounds < current["number"]:
        return Rejection(409, "config_conflict", f"rounds must be at least {current['number']}, the round the run has reached.")
    db.execute("UPDATE run SET config = ? WHERE id = 1", (changed.to_json(),))
    db.execute("INSERT INTO config_changes (changes, changed_at) VALUES (?, ?)", (json.dumps(changes, sort_keys=True), now))
    return changed
