"""Content-addressed blobs: checkpoints, uploaded deltas, server state, phone files.

A blob is named by the sha256 of its bytes, so it never changes once written. Two homes,
one interface:

- ``FileBlobs``, files in the instance directory (beside SQLite): each written to a
  temporary file, fsynced, renamed into place and its directory fsynced, so after
  ``put`` returns the bytes survive a crash or power loss, and a reader never sees half
  a file.
- ``DatabaseBlobs``, rows of the store's own PostgreSQL database: every coordinator
  process, on any host, reaches them through the one URL it already has, so ``serve``
  processes on separate machines (or separate instance directories) share nothing
  else. ``put`` returns once the row is committed (PostgreSQL fsyncs its commit).
"""

from __future__ import annotations

import hashlib
import io
import os
import queue
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

_TRASH = ".trash-"
_TMP = ".tmp-"
_STALE_TMP_S = 600  # older than any write in progress: left by a process that died mid-write


class FileBlobs:
    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    def put(self, data: bytes) -> str:
        sha256 = hashlib.sha256(data).hexdigest()
        target = self.path(sha256)
        if target.is_file():
            return sha256
        target.parent.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=_TMP)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return sha256

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def get(self, sha256: str) -> bytes:
        return self.path(sha256).read_bytes()

    def sendable(self, sha256: str) -> Path | BinaryIO:
        """What Flask's ``send_file`` serves the blob from: its file (sized, sent by the kernel)."""
        return self.path(sha256)

    @contextmanager
    def as_file(self, sha256: str) -> Iterator[Path]:
        """A path holding the blob's bytes, while the context lasts (another process reads it)."""
        yield self.path(sha256)

    def delete(self, sha256: str) -> None:
        self.path(sha256).unlink(missing_ok=True)

    def trash(self, sha256: str) -> None:
        """Take a blob out of the store at once (a rename); ``empty_trash`` frees it.

        Unlinking megabytes costs milliseconds of kernel time each; a caller holding
        the database's write lock renames instead and empties the trash after."""
        target = self.path(sha256)
        try:
            target.rename(target.with_name(_TRASH + sha256))
        except FileNotFoundError:
            pass

    def empty_trash(self) -> None:
        for path in self.root.glob(f"??/{_TRASH}*"):
            path.unlink(missing_ok=True)

    def remove_stale_temporaries(self) -> None:
        cutoff = time.time() - _STALE_TMP_S
        for path in self.root.glob(f"??/{_TMP}*"):
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
            except FileNotFoundError:
                pass

    def names(self) -> set[str]:
        return {p.name for p in self.root.glob("??/*") if not p.name.startswith((_TMP, _TRASH))}


_CACHE_BYTES = 256 * 1024 * 1024


class DatabaseBlobs:
    """Blobs as rows of a ``blobs`` table in the store's database, on a few pooled
    connections, read through a cache of recent ones (a blob never changes, so a cached
    copy is never stale: a cohort downloading one checkpoint mostly reads the cache). ``legacy`` is
    an instance's blob directory from before blobs moved into the database: still read,
    never written."""

    def __init__(self, database, legacy: Path | None = None, cache_bytes: int = _CACHE_BYTES, connections: int = 4):
        self.database = database
        self.legacy = FileBlobs(legacy) if legacy is not None and legacy.is_dir() else None
        self._idle: queue.LifoQueue = queue.LifoQueue()  # open connections not in use
        self._slots = threading.BoundedSemaphore(connections)  # at most this many, whatever the thread count
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self._cache_bytes, self._cached = cache_bytes, 0
        self._lock = threading.Lock()
        self._reading: dict[str, threading.Lock] = {}  # the blobs being read, one reader each

    def _rows(self, sql: str, params=()) -> list:
        """The statement's rows (autocommit), on one of a few pooled connections; a
        connection that broke is dropped and the statement tried once more on a new one."""
        with self._slots:
            for attempt in (0, 1):
                try:
                    db = self._idle.get_nowait()
                except queue.Empty:
                    db = self.database.connect()
                try:
                    cursor = db.execute(sql, params)
                    rows = cursor.fetchall() if cursor.description else []
                except self.database.errors:
                    db.close()
                    if attempt:
                        raise
                    continue
                self._idle.put(db)
                return rows
        raise AssertionError("unreachable")

    def _remember(self, sha256: str, data: bytes) -> None:
        if len(data) > self._cache_bytes // 8:
            return
        with self._lock:
            if sha256 not in self._cache:
                self._cache[sha256] = data
                self._cached += len(data)
            self._cache.move_to_end(sha256)
            while self._cached > self._cache_bytes:
                self._cached -= len(self._cache.popitem(last=False)[1])

    def _forget(self, sha256: str) -> None:
        with self._lock:
            data = self._cache.pop(sha256, None)
            self._cached -= len(data) if data is not None else 0

    def put(self, data: bytes) -> str:
        sha256 = hashlib.sha256(data).hexdigest()
        self._rows("INSERT INTO blobs (sha256, data) VALUES (?, ?) ON CONFLICT (sha256) DO NOTHING", (sha256, data))
        return sha256

    def exists(self, sha256: str) -> bool:
        found = bool(self._rows("SELECT 1 FROM blobs WHERE sha256 = ?", (sha256,)))
        return found or (self.legacy is not None and self.legacy.exists(sha256))

    def get(self, sha256: str) -> bytes:
        with self._lock:
            cached = self._cache.get(sha256)
            reading = self._reading.setdefault(sha256, threading.Lock()) if cached is None else None
        if cached is not None:
            return cached
        with reading:  # one read per blob at a time: a cohort missing the cache together waits for it
            with self._lock:
                cached = self._cache.get(sha256)
            if cached is not None:
                return cached
            try:
                return self._read(sha256)
            finally:
                with self._lock:
                    self._reading.pop(sha256, None)

    def _read(self, sha256: str) -> bytes:
        rows = self._rows("SELECT data FROM blobs WHERE sha256 = ?", (sha256,))
        if not rows:
            if self.legacy is not None and self.legacy.exists(sha256):
                return self.legacy.get(sha256)
            raise FileNotFoundError(f"no blob {sha256}")
        data = bytes(rows[0][0])
        self._remember(sha256, data)
        return data

    def sendable(self, sha256: str) -> Path | BinaryIO:
        return io.BytesIO(self.get(sha256))

    @contextmanager
    def as_file(self, sha256: str) -> Iterator[Path]:
        with tempfile.TemporaryDirectory(prefix="edgefl-blob-") as tmp:
            path = Path(tmp) / sha256
            path.write_bytes(self.get(sha256))
            yield path

    def delete(self, sha256: str) -> None:
        self._forget(sha256)
        self._rows("DELETE FROM blobs WHERE sha256 = ?", (sha256,))
        if self.legacy is not None:
            self.legacy.delete(sha256)

    def trash(self, sha256: str) -> None:
        """A row is deleted at once: no file system work to put off."""
        self.delete(sha256)

    def empty_trash(self) -> None:
        if self.legacy is not None:
            self.legacy.empty_trash()

    def remove_stale_temporaries(self) -> None:
        if self.legacy is not None:
            self.legacy.remove_stale_temporaries()

    def names(self) -> set[str]:
        names = {row[0] for row in self._rows("SELECT sha256 FROM blobs")}
        return names | (self.legacy.names() if self.legacy is not None else set())
