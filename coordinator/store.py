"""The coordinator's durable state: SQL rows beside content-addressed blobs.

Rows say what happened (devices, rounds, who was selected, which updates arrived, the
checkpoint of each model version, metrics); blobs hold the bytes (``coordinator.blobs``:
in the instance directory beside SQLite, in the database itself with PostgreSQL). The
rows are in the database the URL names (``coordinator.database``: SQLite in the instance
directory by default, or PostgreSQL), in SQL both speak.
Timestamps are seconds since the epoch as DOUBLE PRECISION, byte counts BIGINT.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

from coordinator.blobs import DatabaseBlobs, FileBlobs
from coordinator.database import Connection, PostgreSQL, open_database, write_transaction

SCHEMA = """
CREATE TABLE IF NOT EXISTS run (
    id INTEGER NOT NULL PRIMARY KEY CHECK (id = 1),
    config TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    finished_at DOUBLE PRECISION
);
CREATE TABLE IF NOT EXISTS config_changes (
    id {identity},
    changes TEXT NOT NULL,
    changed_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL UNIQUE,
    created_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoints (
    version INTEGER NOT NULL PRIMARY KEY,
    sha256 TEXT NOT NULL,
    size BIGINT NOT NULL,
    server_state_sha256 TEXT NOT NULL,
    round_id INTEGER,
    created_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS rounds (
    id {identity},
    number INTEGER NOT NULL,
    status TEXT NOT NULL,
    base_version INTEGER NOT NULL,
    opened_at DOUBLE PRECISION NOT NULL,
    deadline_at DOUBLE PRECISION NOT NULL,
    closed_at DOUBLE PRECISION,
    committed_at DOUBLE PRECISION,
    evaluated_at DOUBLE PRECISION,
    bytes_down BIGINT NOT NULL DEFAULT 0,
    metrics TEXT
);
CREATE TABLE IF NOT EXISTS assignments (
    round_id INTEGER NOT NULL,
    device_id TEXT NOT NULL,
    assigned_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (round_id, device_id)
);
CREATE TABLE IF NOT EXISTS updates (
    id {identity},
    round_id INTEGER NOT NULL,
    device_id TEXT NOT NULL,
    blob_sha256 TEXT NOT NULL,
    num_examples INTEGER NOT NULL,
    size BIGINT NOT NULL,
    metrics TEXT NOT NULL,
    received_at DOUBLE PRECISION NOT NULL,
    UNIQUE (round_id, device_id)
);
CREATE TABLE IF NOT EXISTS leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS artefacts (
    kind TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    batch_size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    size BIGINT NOT NULL,
    built_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS rejections (
    id {identity},
    round_id INTEGER NOT NULL,
    device_id TEXT NOT NULL,
    code TEXT NOT NULL,
    late INTEGER NOT NULL,
    size BIGINT NOT NULL,
    rejected_at DOUBLE PRECISION NOT NULL
);
"""

# Changes to SCHEMA (the tables as the first release made them), in order: the store's
# schema version is how many of them it has applied. A new store applies them all, so a
# new instance and one migrated from an earlier release have the same tables.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (  # 1: why a round was abandoned and how often closing it failed; each device's record
        "ALTER TABLE rounds ADD COLUMN abandon_reason TEXT",
        "ALTER TABLE rounds ADD COLUMN abandon_detail TEXT",
        "ALTER TABLE rounds ADD COLUMN failures INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE devices ADD COLUMN tasks INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE devices ADD COLUMN reports INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE devices ADD COLUMN consecutive_drops INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE devices ADD COLUMN excluded_until INTEGER NOT NULL DEFAULT 0",
        "CREATE INDEX IF NOT EXISTS devices_by_reports ON devices (reports)",
        "UPDATE rounds SET abandon_reason = 'too_few_reports' WHERE status = 'abandoned'",  # the one reason there was
    ),
    (  # 2: devices' messages kept generally, per (round, phase, device, kind); a round's phase (coordinator.lifecycle)
        "CREATE TABLE messages (id {identity}, round_id INTEGER NOT NULL, phase TEXT NOT NULL, device_id TEXT NOT NULL,"
        " kind TEXT NOT NULL, blob_sha256 TEXT NOT NULL, num_examples INTEGER NOT NULL, size BIGINT NOT NULL,"
        " metrics TEXT NOT NULL, received_at DOUBLE PRECISION NOT NULL, UNIQUE (round_id, phase, device_id, kind))",
        "INSERT INTO messages (round_id, phase, device_id, kind, blob_sha256, num_examples, size, metrics, received_at)"
        " SELECT round_id, 'collect', device_id, 'update', blob_sha256, num_examples, size, metrics, received_at"
        " FROM updates ORDER BY id",
        "DROP TABLE updates",
        # FedAvg's updates, as the rest of the code reads them
        "CREATE VIEW updates AS SELECT id, round_id, device_id, blob_sha256, num_examples, size, metrics, received_at"
        " FROM messages WHERE phase = 'collect' AND kind = 'update'",
        "CREATE INDEX IF NOT EXISTS messages_by_blob ON messages (blob_sha256)",
        "ALTER TABLE rounds ADD COLUMN phase TEXT",
        "UPDATE rounds SET phase = 'collect'",
    ),
    (  # 3: blobs in the database itself (PostgreSQL's stores keep them there: coordinator.blobs)
        "CREATE TABLE IF NOT EXISTS blobs (sha256 TEXT PRIMARY KEY, data {binary} NOT NULL)",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)

# The run's state. Beside it: ``rejections``, the log of refused uploads (a refused
# upload adds to it, nothing else reads it back), and ``leases`` (who drives the rounds).
TABLES = ("run", "config_changes", "devices", "checkpoints", "rounds", "assignments", "messages", "artefacts")


class Store:
    """Connections to the database, and the blobs: in the instance directory beside
    SQLite; in the database itself with PostgreSQL, so that coordinators on several
    hosts share only its URL."""

    def __init__(self, instance_dir: Path | str, db_url: str | None = None):
        # Absolute: Flask resolves relative file paths against the app's package directory.
        self.instance_dir = Path(instance_dir).resolve()
        self.instance_dir.mkdir(parents=True, exist_ok=True)
        self.database = open_database(db_url or f"sqlite:///{self.instance_dir / 'edgefl.sqlite3'}")
        self.database.create(SCHEMA.format(identity=self.database.identity))
        self._migrate()
        self.blobs: FileBlobs | DatabaseBlobs = (
            DatabaseBlobs(self.database, legacy=self.instance_dir / "blobs")
            if isinstance(self.database, PostgreSQL)
            else FileBlobs(self.instance_dir / "blobs")
        )

    def _migrate(self) -> None:
        """Bring the tables up to ``SCHEMA_VERSION``, under the write lock, so processes
        starting together migrate once; a store newer than this code is refused."""
        with closing(self.connect()) as db, self.transaction(db):
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = db.execute("SELECT version FROM schema_version").fetchone()
            version = row[0] if row else 0
            if version > SCHEMA_VERSION:
                raise ValueError(
                    f"{self.instance_dir} was written by a newer edgefl (schema {version}; this one knows {SCHEMA_VERSION})"
                )
            for statements in MIGRATIONS[version:]:
                for statement in statements:
                    db.execute(statement.replace("{identity}", self.database.identity).replace("{binary}", self.database.binary))
            if row is None:
                db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            elif version < SCHEMA_VERSION:
                db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))

    def connect(self) -> Connection:
        return self.database.connect()

    def transaction(self, db: Connection):
        """A write transaction (the database's one writer at a time): committed on
        success, rolled back on any exception."""
        return write_transaction(self.database, db)

    @contextmanager
    def reading(self, db: Connection) -> Iterator[Connection]:
        """Several reads as of one moment (a writer may commit between them otherwise)."""
        self.database.begin_read(db)
        try:
            yield db
        finally:
            db.execute("COMMIT")

    def snapshot(self) -> dict:
        """Every row and blob name: what tests compare to prove a request changed nothing."""
        with closing(self.connect()) as db:
            rows = {t: [tuple(r) for r in db.execute(f"SELECT * FROM {t} ORDER BY 1, 2")] for t in TABLES if t != "run"}
            rows["run"] = [tuple(r) for r in db.execute("SELECT * FROM run")]
        return {"rows": rows, "blobs": self.blobs.names()}
