"""A throwaway PostgreSQL server for the tests: a fresh cluster in a temporary directory,
listening on 127.0.0.1 only (no Unix socket), stopped and deleted at the end.

Debian's ``postgresql`` package provides the programs (``make test`` installs it when
absent). PostgreSQL refuses to run as root, so under root the cluster belongs to the
package's ``postgres`` user.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psutil


def _program(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if not found:
        raise RuntimeError(f"PostgreSQL's {name} is not installed (Debian: apt-get install postgresql; `make test` does it)")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    user = "edgefl"

    def __init__(self):
        self.port = _free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="edgefl-postgres-"))
        self._owner = pwd.getpwnam("postgres") if os.geteuid() == 0 else None
        self._process: subprocess.Popen | None = None
        self._databases = 0

    def _as_owner(self, command: list[str]) -> list[str]:
        """The command, under root run as the ``postgres`` user by util-linux's setpriv
        (it execs, so the server stays our child). Not subprocess's ``user=``: that forks
        without vfork, and gRPC's fork handlers (TFF's runtime is loaded) crash the child."""
        if not self._owner:
            return command
        return ["setpriv", f"--reuid={self._owner.pw_uid}", f"--regid={self._owner.pw_gid}", "--clear-groups", *command]

    def start(self) -> None:
        if self._owner:
            os.chown(self.directory, self._owner.pw_uid, self._owner.pw_gid)
        data = self.directory / "data"
        initdb = subprocess.run(
            self._as_owner(
                [_program("initdb"), "-D", str(data), "-U", self.user, "--auth=trust", "-E", "UTF8", "--no-instructions"]
            ),
            capture_output=True,
            text=True,
            cwd=self.directory,
        )
        if initdb.returncode:
            self.stop()
            raise RuntimeError(f"initdb failed ({initdb.returncode}): {initdb.stderr.strip()}")
        self._log = open(self.directory / "postgres.log", "wb")
        self._process = subprocess.Popen(
            self._as_owner([_program("postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(self.port), "-k", ""]),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.directory,
        )
        deadline = time.monotonic() + 60
        while not self._accepts_connections():
            if self._process.poll() is not None or time.monotonic() > deadline:
                log = (self.directory / "postgres.log").read_text()
                self.stop()
                raise RuntimeError(f"PostgreSQL did not start:\n{log}")
            time.sleep(0.1)

    def _accepts_connections(self) -> bool:
        import psycopg

        try:
            psycopg.connect(self.url("postgres"), connect_timeout=2).close()
            return True
        except psycopg.OperationalError:
            return False

    def url(self, database: str) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """An empty database of its own: what one test's coordinator gets."""
        import psycopg

        self._databases += 1
        name = f"edgefl_{self._databases}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as admin:
            admin.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        """A fast shutdown (SIGINT); afterwards no process of the cluster may remain."""
        if self._process is not None:
            members = (
                [self._process.pid] + [c.pid for c in psutil.Process(self._process.pid).children(recursive=True)]
                if self._process.poll() is None
                else []
            )
            self._process.send_signal(signal.SIGINT)
            self._process.wait(timeout=60)
            self._log.close()
            survivors = [
                pid for pid in members if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
            ]
            assert not survivors, f"PostgreSQL processes outlived the server: {survivors}"
        shutil.rmtree(self.directory, ignore_errors=True)
