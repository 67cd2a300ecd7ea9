"""Child processes that cannot outlive their parent.

A device, a coordinator or TFF's worker left running after its parent died keeps
ports, memory and inherited pipes (which hang test runners and CI). ``orphan_proof``
prefixes a command with a tiny exec wrapper that asks the kernel (PR_SET_PDEATHSIG) to
signal the child when its parent dies, even by SIGKILL, and then execs the command, so
the child keeps the PID ``Popen`` reports. Unlike ``preexec_fn`` this is safe in a
multi-threaded parent (TensorFlow and gRPC always are): nothing runs between fork and
exec but CPython's own exec path.

The kernel sends the signal when the *thread* that spawned the child exits, so spawn
long-lived children from a thread that lives as long as they should (the main thread).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

_EXEC_WITH_PDEATHSIG = """
import ctypes, os, sys
parent, sig = int(sys.argv[1]), int(sys.argv[2])
ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, sig)  # PR_SET_PDEATHSIG
if os.getppid() != parent:  # the parent died before prctl: nobody would signal us
    sys.exit(1)
os.execvp(sys.argv[3], sys.argv[3:])
"""


def orphan_proof(command: list[str], sig: int = signal.SIGTERM) -> list[str]:
    """``command``, wrapped so that it receives ``sig`` when this process dies."""
    return [sys.executable, "-S", "-c", _EXEC_WITH_PDEATHSIG, str(os.getpid()), str(int(sig)), *command]


def raise_on_sigterm() -> None:
    """Turn SIGTERM into KeyboardInterrupt so ``finally`` blocks stop children."""

    def _handler(_signum, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _handler)


def start_logged(
    command: list[str],
    log_path: Path,
    sig: int = signal.SIGTERM,
    env: dict[str, str] | None = None,
    stdin: int = subprocess.DEVNULL,
) -> subprocess.Popen:
    """Start ``command`` orphan-proof, stdin closed (or a pipe), stdout and stderr appended to ``log_path``."""
    with open(log_path, "ab") as log_file:
        return subprocess.Popen(orphan_proof(command, sig), stdin=stdin, stdout=log_file, stderr=subprocess.STDOUT, env=env)


def stop_process(process: subprocess.Popen | None, timeout_s: float = 30) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout_s``."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def free_port() -> int:
    """A port free on 127.0.0.1 now, for a process that binds it a moment later (another
    may take it meanwhile: the process then fails to start, and says so)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
