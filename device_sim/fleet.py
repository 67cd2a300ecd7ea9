"""``edgefl devices``: a fleet of device processes, and the entry point of each one.

Every device is its own OS process (``python -m device_sim ...``), so devices crash,
stall and get killed independently, the way phones do. Children are told by the kernel
to die with the fleet (PR_SET_PDEATHSIG), and SIGINT/SIGTERM to the fleet is passed on,
so stopping the fleet never leaves a device behind.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from device_sim.device import DeviceSpec, run_device
from edgefl import logs
from edgefl.client import CoordinatorUnreachable, ProtocolError
from edgefl.processes import start_logged, stop_process


def spawn_device(spec: DeviceSpec, log_dir: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "device_sim",
        "--coordinator",
        spec.coordinator,
        "--index",
        str(spec.index),
        "--num-devices",
        str(spec.num_devices),
        "--dataset",
        spec.dataset,
        "--partition",
        spec.partition,
        "--seed",
        str(spec.seed),
        "--threads",
        str(spec.threads),
        "--runtime",
        spec.runtime,
        "--holdout",
        str(spec.holdout),
        "--summary",
        str(log_dir / f"device-{spec.index:04d}.json"),
    ]
    return start_logged(command, log_dir / f"device-{spec.index:04d}.log", env=env)


_SECRET_ENV = "EDGEFL_ENROLMENT_SECRET"  # to the device processes, not on their command lines
_WHY = {"run_finished": "the run is finished", "run_stopped": "an operator stopped the run"}


def run_fleet(specs: list[DeviceSpec], log_dir: Path, *, out=sys.stdout, enrolment_secret: str | None = None) -> int:
    """Start every device, wait for all, print one line per device (and why they
    stopped); 0 if all succeeded. Ctrl-C or SIGTERM stops every device and raises
    KeyboardInterrupt once they are gone."""
    log_dir.mkdir(parents=True, exist_ok=True)
    processes: dict[int, subprocess.Popen] = {}
    env = {**os.environ, _SECRET_ENV: enrolment_secret} if enrolment_secret else None

    def _forward(signum, _frame):
        for process in processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, _forward) for s in (signal.SIGTERM, signal.SIGINT)}
    failures = 0
    reasons: set[str] = set()
    interrupted = False
    try:
        for spec in specs:
            processes[spec.index] = spawn_device(spec, log_dir, env)
        print(f"started {len(specs)} device processes (logs in {log_dir})", file=out, flush=True)
        pending = dict(processes)
        while pending:
            for index, process in list(pending.items()):
                code = process.poll()
                if code is None:
                    continue
                del pending[index]
                summary_path = log_dir / f"device-{index:04d}.json"
                if code == 0 and summary_path.exists():
                    s = json.loads(summary_path.read_text())
                    reasons.add(s["stopped_because"])
                    print(
                        f"device {index}: {s['rounds_trained']} rounds, {s['num_examples']} examples,"
                        f" {s['bytes_down'] / 1e6:.1f} MB down, {s['bytes_up'] / 1e6:.1f} MB up"
                        f" (stopped: {_WHY.get(s['stopped_because'], s['stopped_because'])})",
                        file=out,
                        flush=True,
                    )
                else:
                    failures += 1
                    print(
                        f"device {index}: exited with code {code}; see {log_dir / f'device-{index:04d}.log'}",
                        file=out,
                        flush=True,
                    )
            time.sleep(0.2)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.terminate()
        for process in processes.values():
            stop_process(process, timeout_s=10)
        for s, handler in previous.items():
            signal.signal(s, handler)
    if interrupted:
        raise KeyboardInterrupt
    if reasons and not failures:
        print(
            f"all {len(specs)} devices stopped because {' and '.join(sorted(_WHY.get(r, r) for r in reasons))};"
            " the coordinator can start another run with edgefl serve --new-run",
            file=out,
            flush=True,
        )
    return 1 if failures else 0


def device_main(argv: list[str] | None = None) -> int:
    """Entry point of one device process."""
    parser = argparse.ArgumentParser(prog="python -m device_sim")
    parser.add_argument("--coordinator", required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--num-devices", type=int, required=True)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--partition", default="dirichlet:0.5")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runtime", default="keras")
    parser.add_argument("--holdout", type=float, default=0.2)
    parser.add_argument("--summary", type=Path)
    args = parser.parse_args(argv)
    logs.configure()  # at the level the fleet was given, inherited
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.runtime == "keras":
        from edgefl.training import limit_threads

        limit_threads(args.threads)
    spec = DeviceSpec(
        coordinator=args.coordinator,
        index=args.index,
        num_devices=args.num_devices,
        dataset=args.dataset,
        partition=args.partition,
        seed=args.seed,
        threads=args.threads,
        runtime=args.runtime,
        holdout=args.holdout,
    )
    try:
        summary = run_device(spec, enrolment_secret=os.environ.get(_SECRET_ENV))
    except (CoordinatorUnreachable, ProtocolError) as exc:
        logging.getLogger("edgefl.device").error("device %d stopped: %s", args.index, exc)
        return 1
    if args.summary:
        args.summary.write_text(json.dumps(asdict(summary)))
    return 0
