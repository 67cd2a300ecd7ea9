"""A fleet of 1,000 devices on this machine: edgefl's real coordinator and device hosts
against Flower's simulation engine, on one workload, in one invocation.

The workload (Flower's own "1,000 virtual clients" scale): 1,000 devices with 60
Fashion-MNIST images each (IID), a cohort of 100 a round, the small CNN, 1 epoch of
batch 10, client SGD 0.05, FedAvg, 10 rounds, the global model evaluated on the 10,000
test images after every round. Both start from the same initial weights and train on
the same shards.

- edgefl: ``edgefl serve`` and ``edgefl devices --count 1000 --per-process 1000
  --threads 2`` (one device host process with two training threads), through the real
  protocol on 127.0.0.1. Every device has its own registration, token, shard, caches
  and check-ins.
- Flower 1.42: ``flwr.simulation.run_simulation`` on Ray, in a virtual environment of
  its own (``benchmarks/flower_env.py``: Flower does not fit TFF's pins), running
  ``benchmarks/flower_fleet.py``, whose client helpers live in that importable module.

For both: seconds per round (the first apart; "steady" is the median of rounds 2..R),
accuracy per round, peak RSS summed over every process started (sampled every 0.2 s)
and their CPU seconds. For edgefl also: check-ins per second, p99 check-in latency
(less the time the lobby held a check-in on purpose), protocol errors, and the phone
part: rounds completed in a fixed time with 30% dropout at over-selection 1.0 and 1.3,
and under the shipped ``phone`` profile.

    .venv/bin/python benchmarks/fleet.py [--quick] [--skip-flower] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import requests  # noqa: E402

from edgefl.app.launcher import federation  # noqa: E402
from edgefl.config import RunConfig  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"


class TreeSampler:
    """Peak RSS summed over a process's descendants, and their CPU seconds, sampled
    every ``interval_s`` from another thread. A process's CPU is its last sample, so
    one that exits between samples loses at most ``interval_s`` of it."""

    def __init__(self, root_pid: int | None = None, interval_s: float = 0.2):
        self.root = psutil.Process(root_pid or os.getpid())
        self.interval_s = interval_s
        self.peak_rss_mb = 0.0
        self._cpu: dict[tuple[int, float], float] = {}  # (pid, create time): user + system seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        total = 0
        for process in self.root.children(recursive=True):
            try:
                with process.oneshot():
                    total += process.memory_info().rss
                    times = process.cpu_times()
                    self._cpu[process.pid, process.create_time()] = times.user + times.system
            except psutil.Error:  # gone meanwhile
                continue
        self.peak_rss_mb = max(self.peak_rss_mb, total / 2**20)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def cpu_s(self) -> float:
        return sum(self._cpu.values())


def workload(args) -> RunConfig:
    return RunConfig(
        model="cnn_small",
        dataset="fashion-mnist",
        rounds=args.rounds,
        target_reports=args.cohort,
        min_reports=args.cohort,
        over_selection=args.over_selection,
        round_timeout_s=120,
        epochs=1,
        batch_size=10,
        client_lr=0.05,
        server_lr=1.0,
        seed=0,
    )


def device_summaries(logs: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((logs / "devices").glob("device-*.json"))]


def checkin_figures(summaries: list[dict], seconds: float) -> dict:
    latencies = np.array([ms for s in summaries for ms in s.get("checkin_ms", [])])
    return {
        "checkins": int(latencies.size),
        "checkins_per_second": latencies.size / seconds if seconds else None,
        "p50_checkin_ms": float(np.percentile(latencies, 50)) if latencies.size else None,
        "p99_checkin_ms": float(np.percentile(latencies, 99)) if latencies.size else None,
    }


def protocol_errors(logs: Path) -> list[str]:
    """Lines where a device stopped or failed, or the coordinator logged an error."""
    lines = []
    for path in [logs / "coordinator.log", *sorted((logs / "devices").glob("*.log"))]:
        if path.exists():
            lines += [line for line in path.read_text(errors="replace").splitlines() if " ERROR " in line or "Traceback" in line]
    return lines


def run_edgefl(config: RunConfig, args, *, profile: str = "", time_budget_s: float | None = None, label: str = "edgefl") -> dict:
    """One run through ``edgefl serve`` + ``edgefl devices``; with ``time_budget_s``, stopped
    after that long (counting the rounds it completed) instead of at its last round."""
    work = Path(tempfile.mkdtemp(prefix="edgefl-fleet-"))
    device_flags = ["--holdout", "0", "--per-process", str(args.per_process), "--threads", str(args.threads)]
    if profile:
        device_flags += ["--profile", profile]
    admin_token = secrets.token_urlsafe(24)  # to stop a timed run as an operator would
    (work / "admin-token").write_text(admin_token)
    history: list = []
    try:
        started = time.monotonic()
        with TreeSampler() as sampler:
            with federation(
                work,
                config,
                count=args.devices,
                partition="iid",
                data_seed=0,
                serve_flags=["--no-publish", "--admin-token-file", str(work / "admin-token")],
                device_flags=device_flags,
            ) as fed:
                deadline = None if time_budget_s is None else time.monotonic() + time_budget_s

                def on_round(entry):
                    history.append(entry)
                    print(f"  {label} round {entry.round}: accuracy {entry.accuracy:.4f}, {entry.seconds:.2f}s", flush=True)

                if deadline is None:
                    fed.follow(on_round, timeout_s=3600)
                else:
                    follow_until(fed, on_round, deadline)
                    stop = requests.post(
                        f"{fed.url}/v1/admin/stop", headers={"Authorization": f"Bearer {admin_token}"}, timeout=30
                    )
                    stop.raise_for_status()
                wall = time.monotonic() - started
                fleet_done = fed.fleet.wait(timeout=120)  # every device told the run is over, summaries written
                abandoned = len(fed.client.status().abandoned)
        summaries = device_summaries(work / "logs")
        errors = protocol_errors(work / "logs")
        result = {
            "round_seconds": [e.seconds for e in history],
            "accuracy": [e.accuracy for e in history],
            "loss": [e.loss for e in history],
            "reported": [e.reported for e in history],
            "rounds_completed": len(history),
            "rounds_abandoned": abandoned,
            "wall_s": wall,
            "peak_rss_mb": sampler.peak_rss_mb,
            "cpu_s": sampler.cpu_s,
            "fleet_exit_code": fleet_done,
            "protocol_errors": len(errors),
            "protocol_error_lines": errors[:20],
            "dropouts": sum(s.get("dropouts", 0) for s in summaries),
            "network_faults": sum(s.get("network_faults", 0) for s in summaries),
            **checkin_figures(summaries, wall),
        }
        result.update(round_summary(result["round_seconds"]))
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def follow_until(fed, on_round, deadline: float) -> None:
    """Report rounds as they commit until ``deadline`` or the run's end."""
    client, shown = fed.client, 0
    while time.monotonic() < deadline:
        status = client.status()
        for entry in status.history[shown:]:
            on_round(entry)
        shown = len(status.history)
        if status.run is not None and status.run.over:
            return
        time.sleep(0.25)


def timed(config: RunConfig, over_selection: float) -> RunConfig:
    """A run the phone part stops after its time budget: rounds close at the target, or at
    a 15 s deadline with 80% of it (RunConfig's default ratio), or are abandoned."""
    return RunConfig(
        **{
            **json.loads(config.to_json()),
            "rounds": 1000,
            "over_selection": over_selection,
            "min_reports": int(0.8 * config.target_reports),
            "round_timeout_s": 15.0,
        }
    )


def round_summary(seconds: list[float]) -> dict:
    return {
        "first_round_s": seconds[0] if seconds else None,
        "steady_round_s": statistics.median(seconds[1:]) if len(seconds) > 1 else None,
    }


def write_flower_data(path: Path, args, config: RunConfig) -> None:
    """The same shards and initial weights for Flower's clients (uint8 pixels: exact)."""
    from edgefl.datasets import device_shards, load_dataset
    from edgefl.models import build_model

    shards = device_shards(config.dataset, "iid", args.devices, 0, range(args.devices))
    test = load_dataset(config.dataset).test
    xs = [np.rint(shards[i].x[..., 0] * 255).astype(np.uint8) for i in range(args.devices)]
    offsets = np.cumsum([0] + [len(x) for x in xs])
    weights = build_model(config.model, config.dataset, seed=config.seed).get_weights()
    np.savez(
        path,
        x=np.concatenate(xs),
        y=np.concatenate([shards[i].y for i in range(args.devices)]).astype(np.int64),
        client_offsets=offsets.astype(np.int64),
        test_x=np.rint(test.x[..., 0] * 255).astype(np.uint8),
        test_y=test.y.astype(np.int64),
        num_clients=np.int64(args.devices),
        **{f"init_{i}": w.astype(np.float32) for i, w in enumerate(weights)},
    )


def run_flower(config: RunConfig, args) -> dict:
    from flower_env import flower_python  # beside this file, which is run as a script

    python = flower_python(args.flower_venv)
    work = Path(tempfile.mkdtemp(prefix="flower-fleet-"))
    try:
        data, out = work / "data.npz", work / "result.json"
        write_flower_data(data, args, config)
        command = [
            str(python),
            "-m",
            "benchmarks.flower_fleet",
            "--data",
            str(data),
            "--out",
            str(out),
            "--rounds",
            str(config.rounds),
            "--cohort",
            str(args.cohort),
            "--epochs",
            str(config.epochs),
            "--batch-size",
            str(config.batch_size),
            "--lr",
            str(config.client_lr),
        ]
        started = time.monotonic()
        process = subprocess.Popen(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        with TreeSampler() as sampler:
            code = process.wait(timeout=3600)
        if code != 0:
            raise RuntimeError(f"the Flower simulation exited with code {code}")
        result = json.loads(out.read_text())
        result["wall_s_including_startup"] = time.monotonic() - started
        result["peak_rss_mb_inside"] = result.get("peak_rss_mb")
        result["peak_rss_mb"] = sampler.peak_rss_mb  # measured as edgefl's is
        result["cpu_s_inside"] = result.get("cpu_s")
        result["cpu_s"] = sampler.cpu_s
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def plot(result: dict, path: Path) -> None:
    """Accuracy and seconds per round, edgefl against Flower; and what the phone runs
    completed in their time budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phone = result.get("phone", {})
    fig, axes = plt.subplots(1, 3 if phone else 2, figsize=(16 if phone else 11, 4))
    acc, sec = axes[0], axes[1]
    for name, run in (("edgefl", result["edgefl"]), ("Flower simulation", result.get("flower"))):
        if not run:
            continue
        rounds = range(1, len(run["accuracy"]) + 1)
        acc.plot(rounds, run["accuracy"], marker="o", label=name)
        sec.plot(rounds, run["round_seconds"], marker="o", label=name)
    devices = result["workload"]["devices"]
    acc.set(
        title=f"Test accuracy ({devices:,} devices, cohort {result['workload']['target_reports']})",
        xlabel="round",
        ylabel="accuracy",
    )
    sec.set(title="Seconds per round", xlabel="round", ylabel="seconds", ylim=(0, None))
    acc.legend()
    sec.legend()
    if phone:
        bars = axes[2]
        names = list(phone)
        labels = [n.replace("30% dropout, ", "30% dropout\n") for n in names]
        committed = [phone[n]["rounds_completed"] for n in names]
        abandoned = [phone[n]["rounds_abandoned"] for n in names]
        bars.bar(labels, committed, label="committed")
        bars.bar(labels, abandoned, bottom=committed, label="abandoned")
        budget = result["workload"].get("phone_seconds")
        bars.set(title=f"Rounds in {budget:.0f} s with phones" if budget else "Rounds with phones", ylabel="rounds")
        bars.tick_params(axis="x", labelsize=8)
        bars.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--cohort", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument(
        "--over-selection", type=float, default=1.0, help="of the head-to-head run (Flower trains exactly the cohort)"
    )
    parser.add_argument("--per-process", type=int, default=1000, help="devices per device host process (default: one host)")
    parser.add_argument("--threads", type=int, default=2, help="training threads per device host")
    parser.add_argument("--phone-seconds", type=float, default=120, help="time budget of each phone-behaviour run")
    parser.add_argument("--skip-flower", action="store_true")
    parser.add_argument("--skip-phone", action="store_true")
    parser.add_argument("--quick", action="store_true", help="200 devices, cohort 20, 3 rounds, 40 s phone runs")
    parser.add_argument("--flower-venv", type=Path, default=REPO / ".flower-venv")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.quick:
        args.devices, args.cohort, args.rounds, args.per_process, args.phone_seconds = 200, 20, 3, 200, 40
    config = workload(args)
    print(
        f"workload: {args.devices} devices x 60 Fashion-MNIST images, cohort {args.cohort}, cnn_small, E=1 B=10, {args.rounds} rounds",
        flush=True,
    )

    result: dict = {
        "workload": {
            **json.loads(config.to_json()),
            "devices": args.devices,
            "per_process": args.per_process,
            "threads": args.threads,
            "phone_seconds": args.phone_seconds,
        },
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }
    print("edgefl (coordinator + device hosts):", flush=True)
    result["edgefl"] = run_edgefl(config, args)
    if not args.skip_flower:
        print("Flower simulation (Ray):", flush=True)
        result["flower"] = run_flower(config, args)
    if not args.skip_phone:
        phone: dict = {}
        dropout = REPO / "benchmarks" / "dropout30.toml"
        for over in (1.0, 1.3, 1.5):
            name = f"30% dropout, over-selection {over}"
            print(f"edgefl, {name}, {args.phone_seconds:.0f} s:", flush=True)
            phone[name] = run_edgefl(
                timed(config, over), args, profile=str(dropout), time_budget_s=args.phone_seconds, label=name
            )
        print(f"edgefl, phone profile, over-selection 1.5, {args.phone_seconds:.0f} s:", flush=True)
        phone["phone profile"] = run_edgefl(
            timed(config, 1.5), args, profile="phone", time_budget_s=args.phone_seconds, label="phone"
        )
        result["phone"] = phone

    e, f = result["edgefl"], result.get("flower")
    if f:
        result["comparison"] = {
            "steady_ratio_edgefl_over_flower": e["steady_round_s"] / f["steady_round_s"],
            "peak_rss_ratio_edgefl_over_flower": e["peak_rss_mb"] / f["peak_rss_mb"],
            "cpu_ratio_edgefl_over_flower": e["cpu_s"] / f["cpu_s"],
            "targets": {"steady_ratio_at_most": 0.7, "peak_rss_ratio_at_most": 1.0, "protocol_errors": 0},
        }
    name = "fleet_quick" if args.quick else "fleet"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2))
    plot(result, args.out / f"{name}.png")

    print()
    print(f"{'':30}{'edgefl':>12}{'Flower':>12}")
    for key, label in (
        ("first_round_s", "first round s"),
        ("steady_round_s", "steady s/round"),
        ("peak_rss_mb", "peak RSS MB"),
        ("cpu_s", "CPU s"),
    ):
        print(f"{label:30}{e[key]:>12.2f}{f[key] if f else float('nan'):>12.2f}")
    print(f"{'final accuracy':30}{e['accuracy'][-1]:>12.4f}{f['accuracy'][-1] if f else float('nan'):>12.4f}")
    print(
        f"edgefl: {e['checkins_per_second']:.0f} check-ins/s, p99 {e['p99_checkin_ms']:.1f} ms, {e['protocol_errors']} protocol errors"
    )
    for label, run in result.get("phone", {}).items():
        print(
            f"edgefl, {label}: {run['rounds_completed']} rounds committed, {run['rounds_abandoned']} abandoned in"
            f" {args.phone_seconds:.0f} s; steady {run['steady_round_s'] or float('nan'):.2f} s/round; {run['dropouts']} dropouts"
        )
    print(f"saved {args.out / name}.json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
