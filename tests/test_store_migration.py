"""An instance written by an earlier release (the first, before the store had a schema
version, or the previous one) resumes after an upgrade:
its tables gain the new columns, its abandoned rounds their reason, its updates become
messages of the round's collect phase, and the run goes on."""

from __future__ import annotations

from contextlib import closing

import pytest

from coordinator.blobs import FileBlobs
from coordinator.store import MIGRATIONS, SCHEMA, SCHEMA_VERSION, Store
from tests.api_helpers import build_coordinator, register, take_task, update_body, upload


def as_release_made_it(store: Store, version: int) -> None:
    """Undo the migrations after ``version``, leaving the tables (and rows) the release
    of that schema version had (0: the first release, before schema versions)."""
    assert len(MIGRATIONS) == 3, "undo the new migration here too"
    files = FileBlobs(store.instance_dir / "blobs")  # 3: where every earlier release kept the blobs
    for sha256 in store.blobs.names():
        files.put(store.blobs.get(sha256))
    with closing(store.connect()) as db, store.transaction(db):
        db.execute("DROP TABLE blobs")
        if version == 2:
            db.execute("UPDATE schema_version SET version = 2")
            return
        # 2: the devices' messages back into the updates table of the releases before
        db.execute("DROP VIEW updates")
        db.execute(
            next(s for s in SCHEMA.split(";") if "TABLE IF NOT EXISTS updates" in s).format(identity=store.database.identity)
        )
        db.execute(
            "INSERT INTO updates (round_id, device_id, blob_sha256, num_examples, size, metrics, received_at)"
            " SELECT round_id, device_id, blob_sha256, num_examples, size, metrics, received_at FROM messages ORDER BY id"
        )
        db.execute("DROP TABLE messages")
        db.execute("ALTER TABLE rounds DROP COLUMN phase")
        if version == 1:
            db.execute("UPDATE schema_version SET version = 1")
            return
        for statement in reversed(MIGRATIONS[0]):  # 1: columns and an index
            words = statement.split()
            if words[:2] == ["ALTER", "TABLE"]:
                db.execute(f"ALTER TABLE {words[2]} DROP COLUMN {words[5]}")
            elif words[:2] == ["CREATE", "INDEX"]:
                db.execute(f"DROP INDEX {words[5]}")
        db.execute("DROP TABLE schema_version")


@pytest.mark.parametrize("release", [0, 1, 2], ids=["first-release", "schema-1", "previous-release"])
def test_an_instance_of_an_earlier_release_is_migrated_and_resumed(tmp_path, small_parts, db_url, release):
    from coordinator import create_app
    from coordinator.driver import RoundDriver
    from edgefl.config import RunConfig

    config = RunConfig(model="cnn_small", rounds=2, target_reports=1, min_reports=1, round_timeout_s=60)
    now = [0.0]
    app, driver = build_coordinator(tmp_path / "instance", small_parts, config, db_url=db_url, clock=lambda: now[0])
    store, client = app.extensions["edgefl.store"], app.test_client()
    headers = register(client)
    assert driver.step()  # round 1 opens; its deadline passes with no report: abandoned, retried
    now[0] = 61.0
    assert driver.step()
    assert upload(client, headers, take_task(client, headers)["round_id"], update_body()).status_code == 202
    driver.release_lease()
    as_release_made_it(store, release)
    with closing(store.connect()) as db:
        columns = [row[1] for row in db.execute("PRAGMA table_info(rounds)")] if db_url is None else None
    assert columns is None or ("abandon_reason" in columns) == (release >= 1) and ("phase" in columns) == (release == 2)

    upgraded = create_app({"INSTANCE": str(tmp_path / "instance"), "DB_URL": db_url, "TESTING": True})
    store = upgraded.extensions["edgefl.store"]
    with closing(store.connect()) as db:
        assert db.execute("SELECT version FROM schema_version").fetchone()[0] == SCHEMA_VERSION
    restarted = RoundDriver(store, config, learner=small_parts[0], server=small_parts[1])
    restarted.ensure_run()
    client = upgraded.test_client()
    while restarted.step():
        pass
    rounds = client.get("/v1/rounds").json["rounds"]
    assert [(r["status"], r["abandon_reason"]) for r in rounds[:3]] == [
        ("abandoned", "too_few_reports"),
        ("committed", None),
        ("open", None),
    ]
    assert rounds[1]["reported"] == 1 and rounds[1]["phase"] == "collect"  # its update, now a message of its phase
    assert upload(client, headers, take_task(client, headers)["round_id"], update_body(seed=2)).status_code == 202
    while restarted.step():
        pass
    assert client.get("/v1/status").json["run"]["status"] == "finished"
    Store(tmp_path / "instance", db_url)  # opening a current store again changes nothing
