"""The blobs' database home (PostgreSQL's stores keep them as rows): what the rows hold,
the few connections they use, and a cohort that misses the cache reading a blob once.
Run here on SQLite's table of the same name; the API, durability and migration tests
run it on a PostgreSQL server."""

from __future__ import annotations

import hashlib
import threading

import pytest

from coordinator.blobs import DatabaseBlobs
from coordinator.store import Store


@pytest.fixture
def blobs(tmp_path):
    return DatabaseBlobs(Store(tmp_path / "instance").database, connections=2)


def test_blobs_are_rows_named_by_their_hash(blobs):
    sha = blobs.put(b"checkpoint bytes")
    assert sha == hashlib.sha256(b"checkpoint bytes").hexdigest()
    assert blobs.put(b"checkpoint bytes") == sha and blobs.names() == {sha}  # idempotent
    assert blobs.exists(sha) and blobs.get(sha) == b"checkpoint bytes"
    assert blobs.sendable(sha).read() == b"checkpoint bytes"
    with blobs.as_file(sha) as path:
        assert path.read_bytes() == b"checkpoint bytes"
    assert not path.exists()
    blobs.delete(sha)
    assert not blobs.exists(sha) and blobs.names() == set()
    with pytest.raises(FileNotFoundError):
        blobs.get(sha)


def test_a_cohort_missing_the_cache_together_reads_a_blob_once_on_few_connections(blobs):
    sha = blobs.put(b"x" * 100_000)
    blobs._cache.clear()
    reads, opened = [], []
    rows, connect = blobs._rows, blobs.database.connect

    def counting_rows(sql, params=()):
        if sql.startswith("SELECT data"):
            reads.append(sha)
        return rows(sql, params)

    def counting_connect():
        opened.append(1)
        return connect()

    blobs._rows, blobs.database.connect = counting_rows, counting_connect
    start = threading.Barrier(16)
    got = []

    def download():
        start.wait()
        got.append(blobs.get(sha))

    threads = [threading.Thread(target=download) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert got == [b"x" * 100_000] * 16 and len(reads) == 1 and len(opened) <= 2
