"""A federation of real processes: ``edgefl serve`` plus ``edgefl devices``, as a user
would start them, followed through ``GET /v1/status`` and stopped together.

Used by the demo, the benchmark and the end-to-end tests, so all three exercise the
same commands and none of them can leave a process behind: children die with their
parent (PR_SET_PDEATHSIG) and are stopped on leaving the context, whatever happened.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from edgefl.client import CoordinatorClient
from edgefl.config import RunConfig, command_line
from edgefl.processes import free_port, start_logged, stop_process
from edgefl.protocol import RoundSummary, RunStatus

_SERVER_START_TIMEOUT_S = 180


def edgefl_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "edgefl", *args]


@dataclass
class Federation:
    url: str
    server: subprocess.Popen
    fleet: subprocess.Popen | None

    @property
    def client(self) -> CoordinatorClient:
        return CoordinatorClient(self.url, give_up_after_s=30)

    def follow(self, on_round: Callable[[RoundSummary], None] | None = None, *, timeout_s: float = 3600) -> RunStatus:
        """Wait for the run to finish, calling ``on_round`` once per committed round."""
        client = self.client
        shown = 0
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.server.poll() is not None:
                raise RuntimeError(f"the coordinator exited with code {self.server.returncode} mid-run")
            status = client.status()
            for entry in status.history[shown:]:
                if on_round:
                    on_round(entry)
            shown = len(status.history)
            if status.run is not None and status.run.over:
                return status
            if self.fleet is not None and self.fleet.poll() not in (None, 0):
                raise RuntimeError(f"the device fleet exited with code {self.fleet.returncode} mid-run")
            time.sleep(0.25)
        raise RuntimeError(f"the run did not finish within {timeout_s:.0f}s")


def wait_for_server(instance: Path, server: subprocess.Popen, log_path: Path) -> str:
    info = instance / "server.json"
    deadline = time.monotonic() + _SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
            raise RuntimeError(f"the coordinator exited with code {server.returncode}: {tail[0]}")
        if info.exists():  # and written by this server, not left by one that was killed
            try:
                written = json.loads(info.read_text())
                if written["pid"] == server.pid:
                    return written["url"]
            except (json.JSONDecodeError, KeyError):
                pass
        time.sleep(0.1)
    raise RuntimeError(f"the coordinator did not start within {_SERVER_START_TIMEOUT_S}s; see {log_path}")


@contextmanager
def federation(
    out: Path,
    config: RunConfig,
    *,
    count: int,
    partition: str,
    data_seed: int,
    start_devices: bool = True,
    serve_flags: Sequence[str] = (),
    device_flags: Sequence[str] = (),
) -> Iterator[Federation]:
    """Start a coordinator on a free port and ``count`` devices, stop them on exit. The
    devices start with the coordinator, not after it: their hosts import and load
    their data while it starts, and are let go once it answers (``edgefl devices
    --wait-for-coordinator``), so a cold fleet's start-up is not added to round 1."""
    instance, logs = out / "coordinator", out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    server = fleet = None
    try:
        server_log = logs / "coordinator.log"
        url = f"http://127.0.0.1:{free_port()}"
        server = start_logged(
            edgefl_command(
                "serve", "--instance", str(instance), "--port", url.rsplit(":", 1)[1], *command_line(config), *serve_flags
            ),
            server_log,
        )
        if start_devices:
            from device_sim.settings import DeviceSettings
            from device_sim.settings import command_line as device_command_line

            devices = DeviceSettings(
                coordinator=url,
                num_devices=count,
                dataset=config.dataset,
                model=config.model,
                partition=partition,
                seed=data_seed,
            )
            fleet = start_logged(
                edgefl_command(
                    "devices",
                    "--count",
                    str(count),
                    *device_command_line(devices),
                    "--log-dir",
                    str(logs / "devices"),
                    "--wait-for-coordinator",
                    str(_SERVER_START_TIMEOUT_S),
                    *device_flags,  # after the settings: a flag given twice takes its last value
                ),
                logs / "devices.log",
            )
        if wait_for_server(instance, server, server_log) != url:
            raise RuntimeError(f"the coordinator is not at {url}; see {server_log}")
        yield Federation(url, server, fleet)
    finally:
        stop_process(fleet)
        stop_process(server)
