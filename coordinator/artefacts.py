"""The phone artefacts of the newest model, built off the request path.

A thread of the serving process watches the store; when the newest checkpoint (or the
run's batch size, which the training file is built for) differs from what was last
published, it runs the export command in a child process at low priority: ``edgefl
export`` on the checkpoint's blob, given by the CLI, so the coordinator imports
nothing of the export room and a converter crash cannot take the server down. The
int8 inference file, the training file and the model card become blobs, and one row
per kind in ``artefacts`` points at the newest; any worker serves them from there.
Builds coalesce: while one runs, rounds may commit; the next build starts from the
newest model, never from each one in turn.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from contextlib import closing
from pathlib import Path
from typing import NamedTuple

from coordinator import records, rounds
from coordinator.database import Connection
from coordinator.store import Store
from edgefl.artefacts import MODEL_CARD, PHONE_VARIANT, inference_file, training_file
from edgefl.processes import start_logged, stop_process

log = logging.getLogger("edgefl.artefacts")

# kind -> the export's file name for it (edgefl.artefacts), and its media type
KINDS = {
    "inference": (lambda model: inference_file(model, PHONE_VARIANT), "application/octet-stream"),
    "training": (training_file, "application/octet-stream"),
    "card": (lambda model: MODEL_CARD, "application/json"),
}
_RETRY_FAILED_S = 60.0
_TEMP_PREFIX = "publish-"


class Wanted(NamedTuple):
    version: int
    checkpoint_sha256: str
    model: str
    dataset: str
    batch_size: int


def wanted(db: Connection) -> Wanted | None:
    """What the artefacts should be built from now: the newest checkpoint, at the run's
    batch size."""
    checkpoint = rounds.latest_checkpoint(db)
    if checkpoint is None:
        return None
    config = rounds.run_config(db)
    return Wanted(checkpoint["version"], checkpoint["sha256"], config.model, config.dataset, config.batch_size)


def published(db: Connection) -> tuple[int, int] | None:
    """The (model version, training batch size) of the artefacts served now (the card's:
    every build has one, and says why there is no training file if there is none)."""
    row = db.execute("SELECT version, batch_size FROM artefacts WHERE kind = 'card'").fetchone()
    return (row["version"], row["batch_size"]) if row else None


def latest(db: Connection, kind: str):
    return db.execute("SELECT * FROM artefacts WHERE kind = ?", (kind,)).fetchone()


def record(db: Connection, target: Wanted, blobs: dict[str, tuple[str, int]], now: float) -> set[str]:
    """Point every kind at its new blob; the blobs no longer pointed at."""
    replaced = set()
    for kind, (sha256, size) in blobs.items():
        old = latest(db, kind)
        if old is not None and old["sha256"] != sha256:
            replaced.add(old["sha256"])
        db.execute("DELETE FROM artefacts WHERE kind = ?", (kind,))
        db.execute(
            "INSERT INTO artefacts (kind, version, batch_size, sha256, size, built_at) VALUES (?, ?, ?, ?, ?, ?)",
            (kind, target.version, target.batch_size, sha256, size, now),
        )
    return replaced - {sha for sha, _ in blobs.values()}


class Publisher:
    """Runs ``command`` (``edgefl export`` and its leading words) whenever the served
    artefacts are behind the store."""

    def __init__(self, store: Store, command: list[str], log_path: Path, *, poll_s: float = 0.5, clock=time.time):
        self.store = store
        self.command = command
        self.log_path = log_path
        self.poll_s = poll_s
        self.clock = clock
        self._failed: tuple[Wanted, float] | None = None
        for stale in store.instance_dir.glob(f"{_TEMP_PREFIX}*"):  # a build a crash interrupted
            shutil.rmtree(stale, ignore_errors=True)

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(self.poll_s):
            with closing(self.store.connect()) as db, self.store.reading(db):
                target, served = wanted(db), published(db)
            if target is None or served == (target.version, target.batch_size):
                continue
            if self._failed and self._failed[0] == target and self.clock() - self._failed[1] < _RETRY_FAILED_S:
                continue
            self.build(target, stop)

    def build(self, target: Wanted, stop: threading.Event | None = None) -> bool:
        started = time.monotonic()
        checkpoint = self.store.blobs.as_file(target.checkpoint_sha256)
        with tempfile.TemporaryDirectory(prefix=_TEMP_PREFIX, dir=self.store.instance_dir) as tmp, checkpoint as checkpoint_path:
            out = Path(tmp) / "export"
            command = [
                "nice",
                "-n",
                "10",
                *self.command,
                "--checkpoint",
                str(checkpoint_path),
                "--model",
                target.model,
                "--dataset",
                target.dataset,
                "--round",
                str(target.version),
                "--variants",
                "int8",
                "--train-batch",
                str(target.batch_size),
                "--out",
                str(out),
            ]
            process = start_logged(command, self.log_path)
            try:
                while process.poll() is None:
                    if stop is not None and stop.is_set():
                        return False
                    time.sleep(0.2)
            finally:
                stop_process(process, timeout_s=10)
            if process.returncode != 0:
                log.error(
                    "building the artefacts of model version %d failed (exit %d); see %s",
                    target.version,
                    process.returncode,
                    self.log_path,
                )
                self._failed = (target, self.clock())
                return False
            blobs = {}
            for kind, (file_of, _) in KINDS.items():
                path = out / file_of(target.model)
                if kind == "training" and not path.exists():  # outside the on-device layer set: the card says why
                    continue
                data = path.read_bytes()
                blobs[kind] = (self.store.blobs.put(data), len(data))
        with closing(self.store.connect()) as db:
            with self.store.transaction(db):
                replaced = record(db, target, blobs, self.clock())
            live = records.live_blobs(db)
        for sha256 in replaced - live:
            self.store.blobs.delete(sha256)
        log.info(
            "published the artefacts of model version %d (batch %d) in %.1fs",
            target.version,
            target.batch_size,
            time.monotonic() - started,
        )
        return True
