"""``edgefl devices``: a fleet of device hosts, each an OS process of one or more devices.

By default every device is its own OS process (a host of one), so devices crash, stall
and get killed independently, the way phones do, and a process's memory and start-up
are one device's. ``per_process`` packs devices into hosts (``device_sim.host``) when
the fleet is larger than the machine's process budget. Hosts are told by the kernel to
die with the fleet (PR_SET_PDEATHSIG), and SIGINT/SIGTERM to the fleet is passed on,
so stopping the fleet never leaves a device behind.

The fleet prints one line per device as it finishes (read from the summary its host
writes), and a line for each device whose host ended without its summary.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from device_sim.host import SECRET_ENV, summary_path
from device_sim.profile import describe, load_profile
from device_sim.settings import DeviceSettings, command_line
from edgefl.processes import start_logged, stop_process

_WHY = {"run_finished": "the run is finished", "run_stopped": "an operator stopped the run"}
_POLL_S = 0.2


def host_log(log_dir: Path, indices: range) -> Path:
    """A host's log: named by its device when it has one (as when every device was a process)."""
    if len(indices) == 1:
        return log_dir / f"device-{indices[0]:04d}.log"
    return log_dir / f"devices-{indices[0]:04d}-{indices[-1]:04d}.log"


def spawn_host(
    settings: DeviceSettings, indices: range, log_dir: Path, env: dict[str, str] | None = None, *, held: bool = False
) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "device_sim",
        "--first-index",
        str(indices[0]),
        "--count",
        str(len(indices)),
        "--summary-dir",
        str(log_dir),
        *command_line(settings),
        *(["--held"] if held else []),
    ]
    return start_logged(command, host_log(log_dir, indices), env=env, stdin=subprocess.PIPE if held else subprocess.DEVNULL)


def host_ranges(first_index: int, count: int, per_process: int) -> list[range]:
    """Consecutive devices, ``per_process`` to a host (the last may hold fewer)."""
    end = first_index + count
    return [range(start, min(start + per_process, end)) for start in range(first_index, end, per_process)]


def _release(host: subprocess.Popen) -> None:
    try:
        host.stdin.write(b"go\n")
        host.stdin.close()
    except OSError:  # it has died meanwhile: its devices are reported as exited
        pass


def _finished_line(index: int, s: dict) -> str:
    phone = "".join(
        f", {s[key]} {what}" for key, what in (("dropouts", "dropouts"), ("network_faults", "network faults")) if s.get(key)
    )
    return (
        f"device {index}: {s['rounds_trained']} rounds, {s['num_examples']} examples,"
        f" {s['bytes_down'] / 1e6:.1f} MB down, {s['bytes_up'] / 1e6:.1f} MB up{phone}"
        f" (stopped: {_WHY.get(s['stopped_because'], s['stopped_because'])})"
    )


def run_fleet(
    settings: DeviceSettings,
    log_dir: Path,
    *,
    first_index: int = 0,
    count: int = 1,
    per_process: int = 1,
    out=sys.stdout,
    enrolment_secret: str | None = None,
    checks: Callable[[], None] | None = None,
) -> int:
    """Start every host, wait for all, print one line per device (and why they
    stopped); 0 if every device succeeded. Ctrl-C or SIGTERM stops every host and
    raises KeyboardInterrupt once they are gone.

    With ``checks``, the hosts start held: they import, load and shard their data
    while ``checks`` runs (waiting for the coordinator, say), and no device contacts
    the coordinator until it has returned; if it raises, the hosts are stopped and the
    exception goes on. A cold fleet's start-up then overlaps the coordinator's."""
    log_dir.mkdir(parents=True, exist_ok=True)
    ranges = host_ranges(first_index, count, per_process)
    for index in range(first_index, first_index + count):  # a summary left by an earlier fleet is not this one's
        summary_path(log_dir, index).unlink(missing_ok=True)
    hosts: dict[range, subprocess.Popen] = {}
    env = {**os.environ, SECRET_ENV: enrolment_secret} if enrolment_secret else None

    def _forward(signum, _frame):
        for process in hosts.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, _forward) for s in (signal.SIGTERM, signal.SIGINT)}
    failures = 0
    reasons: set[str] = set()
    interrupted = False
    try:
        for indices in ranges:
            hosts[indices] = spawn_host(settings, indices, log_dir, env, held=checks is not None)
        if checks is not None:
            checks()
            for process in hosts.values():
                _release(process)
        hosted = f"{len(ranges)} process{'es' if len(ranges) > 1 else ''}"
        started = f"{count} devices in {hosted}" if per_process > 1 else f"{count} device processes"
        behaving = f"; behaving as the profile says: {describe(load_profile(settings.profile))}" if settings.profile else ""
        print(f"started {started} (logs in {log_dir}){behaving}", file=out, flush=True)
        pending = {index: indices for indices in ranges for index in indices}
        while pending:
            for index, indices in list(pending.items()):
                code = hosts[indices].poll()  # before reading: a summary written as the host exits is seen
                path = summary_path(log_dir, index)
                if path.exists():
                    s = json.loads(path.read_text())
                    reasons.add(s["stopped_because"])
                    print(_finished_line(index, s), file=out, flush=True)
                elif code is not None:
                    failures += 1
                    print(f"device {index}: exited with code {code}; see {host_log(log_dir, indices)}", file=out, flush=True)
                else:
                    continue
                del pending[index]
            time.sleep(_POLL_S)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        for process in hosts.values():
            if process.poll() is None:
                process.terminate()
        for process in hosts.values():
            stop_process(process, timeout_s=10)
        for s, handler in previous.items():
            signal.signal(s, handler)
    if interrupted:
        raise KeyboardInterrupt
    if reasons and not failures:
        print(
            f"all {count} devices stopped because {' and '.join(sorted(_WHY.get(r, r) for r in reasons))};"
            " the coordinator can start another run with edgefl serve --new-run",
            file=out,
            flush=True,
        )
    return 1 if failures else 0
