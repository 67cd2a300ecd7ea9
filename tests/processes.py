"""Processes the tests start, followed: every descendant of the test process, and a
wait until those a test started are gone (no test may leave one running). Also
headless Chromium, whose helper processes come and go. Shared by the end-to-end,
dashboard and device-host tests (a helper module: no test module imports another).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil


def descendant_pids(exclude: dict[int, str] | None = None) -> dict[int, str]:
    """This test process's descendants, less ``exclude`` (what other fixtures started)
    and the test PostgreSQL server's processes (it forks one per connection; its fixture
    checks that they end with it)."""
    found = {}
    for process in psutil.Process().children(recursive=True):
        if exclude and process.pid in exclude:
            continue
        try:
            if (name := process.name()) != "postgres":
                found[process.pid] = name
        except psutil.NoSuchProcess:
            pass
    return found


def assert_all_gone(pids: dict[int, str], timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = {p: n for p, n in alive.items() if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE}
        time.sleep(0.2)
    assert not alive, f"still running: {alive}"


def chromium(url: str, out: Path, *flags: str, timeout_s: float = 180) -> tuple[str, dict[int, str]]:
    """Headless Chromium (Debian's, installed by ``make test``) on ``url``: its stdout
    and every process it started (recorded while it runs, since its helpers come and go;
    on a timeout the whole process group is killed, so nothing is left behind)."""
    binary = shutil.which("chromium")
    assert binary, "Debian's chromium is missing; `make test` installs it"
    before = descendant_pids()
    browser = subprocess.Popen(
        [
            binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={out / 'chromium-profile'}",
            "--virtual-time-budget=15000",
            *flags,
            url,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    started = {browser.pid: "chromium"}
    deadline = time.monotonic() + timeout_s
    while True:
        started.update(descendant_pids(before))
        try:
            stdout, _ = browser.communicate(timeout=0.2)
            return stdout, started
        except subprocess.TimeoutExpired:
            if time.monotonic() > deadline:
                os.killpg(browser.pid, signal.SIGKILL)
                browser.communicate()
                raise
