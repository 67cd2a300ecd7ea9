"""Content-addressed blob files: checkpoints, uploaded deltas, server state.

A blob is named by the sha256 of its bytes and written to a temporary file, fsynced,
renamed into place and its directory fsynced, so after ``put`` returns the bytes
survive a crash or power loss, and a reader never sees half a file.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path

_TRASH = ".trash-"
_TMP = ".tmp-"
_STALE_TMP_S = 600  # older than any write in progress: left by a process that died mid-write


class BlobStore:
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
