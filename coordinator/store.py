"""The coordinator's durable state: SQL rows (SQLite, WAL) beside content-addressed blobs.

Rows say what happened (devices, rounds, who was selected, which updates arrived, the
checkpoint of each model version, metrics); blobs hold the bytes. The schema and the
queries are plain SQL; what is SQLite's own is the connection setup here, the ``?``
placeholders and ``BEGIN IMMEDIATE`` (write paths take it so concurrent writers queue
instead of failing on upgrade).
"""
from __future__ import annotations

import sqlite3
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Iterator

from coordinator.blobs import BlobStore

SCHEMA = """
CREATE TABLE IF NOT EXISTS run (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    config TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    finished_at REAL
);
CREATE TABLE IF NOT EXISTS config_changes (
    id INTEGER PRIMARY KEY,
    changes TEXT NOT NULL,
    changed_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoints (
    version INTEGER PRIMARY KEY,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    server_state_sha256 TEXT NOT NULL,
    round_id INTEGER,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS rounds (
    id INTEGER PRIMARY KEY,
    number INTEGER NOT NULL,
    status TEXT NOT NULL,
    base_version INTEGER NOT NULL,
    opened_at REAL NOT NULL,
    deadline_at REAL NOT NULL,
    closed_at REAL,
    committed_at REAL,
    evaluated_at REAL,
    bytes_down INTEGER NOT NULL DEFAULT 0,
    metrics TEXT
);
CREATE TABLE IF NOT EXISTS assignments (
    round_id INTEGER NOT NULL,
    device_id TEXT NOT NULL,
    assigned_at REAL NOT NULL,
    PRIMARY KEY (round_id, device_id)
);
CREATE TABLE IF NOT EXISTS updates (
    id INTEGER PRIMARY KEY,
    round_id INTEGER NOT NULL,
    device_id TEXT NOT NULL,
    blob_sha256 TEXT NOT NULL,
    num_examples INTEGER NOT NULL,
    size INTEGER NOT NULL,
    metrics TEXT NOT NULL,
    received_at REAL NOT NULL,
    UNIQUE (round_id, device_id)
);
CREATE TABLE IF NOT EXISTS rejections (
    id INTEGER PRIMARY KEY,
    round_id INTEGER NOT NULL,
    device_id TEXT NOT NULL,
    code TEXT NOT NULL,
    late INTEGER NOT NULL,
    size INTEGER NOT NULL,
    rejected_at REAL NOT NULL
);
"""

# The run's state; ``rejections`` is the log of refused uploads beside it, which a
# refused upload adds to and nothing else reads back.
TABLES = ("run", "config_changes", "devices", "checkpoints", "rounds", "assignments", "updates")


class Store:
    """Opens connections to the database and owns the blob directory of one instance."""

    def __init__(self, instance_dir: Path | str):
        # Absolute: Flask resolves relative file paths against the app's package directory.
        self.instance_dir = Path(instance_dir).resolve()
        self.instance_dir.mkdir(parents=True, exist_ok=True)
        self.db_path = self.instance_dir / "edgefl.sqlite3"
        self.blobs = BlobStore(self.instance_dir / "blobs")
        with closing(self.connect()) as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)

    def connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.db_path, timeout=30, isolation_level=None, check_same_thread=False)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA synchronous=FULL")
        return db

    @contextmanager
    def transaction(self, db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
        """A write transaction: committed on success, rolled back on any exception."""
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def snapshot(self) -> dict:
        """Every row and blob name: what tests compare to prove a request changed nothing."""
        with closing(self.connect()) as db:
            rows = {t: [tuple(r) for r in db.execute(f"SELECT * FROM {t} ORDER BY 1, 2")] for t in TABLES if t != "run"}
            rows["run"] = [tuple(r) for r in db.execute("SELECT * FROM run")]
        return {"rows": rows, "blobs": self.blobs.names()}
