"""Starting another run on an instance whose run is over, keeping the old run's record.

An instance holds one run at a time. ``serve --new-run`` writes the finished (or
stopped) run's record, everything ``/v1/status`` and ``/v1/rounds`` said of it, and its
final model into ``INSTANCE/previous-runs/``, then clears the run's rows; the devices
stay registered (their tokens keep working) with their records reset. The old run's
blobs are no longer referenced, and the round driver's start-up sweep removes them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

from coordinator import leases, records, rounds
from coordinator.store import Store
from edgefl import jsonsafe
from edgefl.config import RunConfig
from edgefl.protocol import RunStatusName

ARCHIVE_DIR = "previous-runs"
RUN_TABLES = ("config_changes", "checkpoints", "rounds", "assignments", "messages", "artefacts", "rejections", "run")


def start_over(store: Store, check: Callable[[RunConfig, bytes], None] = lambda config, final: None) -> tuple[Path, bytes]:
    """Archive the instance's finished run and clear it; (the record's path, the final
    checkpoint's bytes). A ValueError says why it cannot be done: raised by ``check``
    (given the old run's configuration and final model) too, before anything changes."""
    with closing(store.connect()) as db:
        status = rounds.run_status(db)
        if status is None:
            raise ValueError(f"--new-run: {store.instance_dir} holds no run yet; serve it without --new-run")
        if status in (RunStatusName.RUNNING, RunStatusName.PAUSED):
            raise ValueError(
                f"--new-run: {store.instance_dir} holds a {status} run; let it finish, or stop it (POST /v1/admin/stop) first"
            )
        lease = db.execute("SELECT holder, expires_at FROM leases WHERE name = ?", (leases.ROUND_DRIVER,)).fetchone()
        if lease is not None and lease["expires_at"] > time.time() and not leases.died_here(lease["holder"]):
            raise ValueError(f"--new-run: another coordinator ({lease['holder']}) is serving {store.instance_dir}; stop it first")
        run = db.execute("SELECT * FROM run WHERE id = 1").fetchone()
        final = rounds.latest_checkpoint(db)
        record = {
            "status": status,
            "config": json.loads(run["config"]),
            "config_changes": records.config_changes(db),
            "created_at": run["created_at"],
            "finished_at": run["finished_at"],
            "final_model": {"version": final["version"], "sha256": final["sha256"]},
            "rounds": records.history(db),
        }
    checkpoint = store.blobs.get(final["sha256"])
    check(RunConfig.from_json(run["config"]), checkpoint)
    folder = store.instance_dir / ARCHIVE_DIR
    folder.mkdir(exist_ok=True)
    name = time.strftime("run-%Y%m%d-%H%M%S", time.gmtime(run["created_at"]))
    (folder / f"{name}-final.safetensors").write_bytes(checkpoint)
    path = folder / f"{name}.json"
    path.write_text(jsonsafe.dumps(record, indent=1))
    with closing(store.connect()) as db, store.transaction(db):
        for table in RUN_TABLES:
            db.execute(f"DELETE FROM {table}")
        db.execute("UPDATE devices SET tasks = 0, reports = 0, consecutive_drops = 0, excluded_until = 0")
    return path, checkpoint
