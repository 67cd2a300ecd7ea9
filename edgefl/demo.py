"""``edgefl demo``: one whole federated run from real processes, then a report.

It starts ``edgefl serve`` and ``edgefl devices`` as child processes (the same commands
a user would type), follows the run through ``GET /v1/status``, runs ``edgefl export``
on the final model, and stops everything it started, whatever happens.
"""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from edgefl.client import CoordinatorClient
from edgefl.config import RunConfig
from edgefl.processes import die_with_parent, raise_on_sigterm
from edgefl.report import plot_history, progress_line, rounds_table

_SERVER_START_TIMEOUT_S = 180


def _edgefl(*args: str) -> list[str]:
    return [sys.executable, "-m", "edgefl", *args]


def _config_flags(config: RunConfig) -> list[str]:
    return [
        "--model", config.model, "--dataset", config.dataset, "--rounds", str(config.rounds),
        "--target-reports", str(config.target_reports), "--min-reports", str(config.min_reports),
        "--over-selection", str(config.over_selection), "--round-timeout", str(config.round_timeout_s),
        "--epochs", str(config.epochs), "--batch-size", str(config.batch_size),
        "--client-lr", str(config.client_lr), "--server-lr", str(config.server_lr), "--seed", str(config.seed),
    ]


def _stop(process: subprocess.Popen | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _wait_for_server(instance: Path, server: subprocess.Popen, log_path: Path) -> str:
    info = instance / "server.json"
    deadline = time.monotonic() + _SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
            raise RuntimeError(f"the coordinator exited with code {server.returncode}: {tail[0]}")
        if info.exists():
            try:
                return json.loads(info.read_text())["url"]
            except (json.JSONDecodeError, KeyError):
                pass
        time.sleep(0.1)
    raise RuntimeError(f"the coordinator did not start within {_SERVER_START_TIMEOUT_S}s; see {log_path}")


def run_demo(args, config: RunConfig) -> int:
    from edgefl.cli import CliError

    out: Path = args.out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    instance, logs = out / "coordinator", out / "logs"
    logs.mkdir()
    print(
        f"edgefl demo: {args.count} devices, {config.rounds} rounds of {config.model} on {config.dataset}"
        f" ({args.partition}), everything under {out}/",
        flush=True,
    )
    server = fleet = None
    started = time.monotonic()
    raise_on_sigterm()
    try:
        server_log = logs / "coordinator.log"
        with open(server_log, "wb") as log_file:
            server = subprocess.Popen(
                _edgefl("serve", "--instance", str(instance), "--port", "0", *_config_flags(config)),
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, preexec_fn=die_with_parent(),
            )
        print("starting the coordinator (TensorFlow, TFF and its worker)...", flush=True)
        url = _wait_for_server(instance, server, server_log)
        print(f"coordinator at {url}; starting {args.count} device processes...", flush=True)
        fleet_log = logs / "devices.log"
        with open(fleet_log, "wb") as log_file:
            fleet = subprocess.Popen(
                _edgefl(
                    "devices", "--coordinator", url, "--count", str(args.count), "--partition", args.partition,
                    "--data-seed", str(args.data_seed), "--dataset", config.dataset, "--log-dir", str(logs / "devices"),
                ),
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, preexec_fn=die_with_parent(),
            )
        status = _follow(CoordinatorClient(url, give_up_after_s=30), config, server, fleet)
        try:
            fleet.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        print("exporting the final model to TensorFlow Lite...", flush=True)
        export_dir = out / "tflite"
        exported = subprocess.run(
            _edgefl("export", "--coordinator", url, "--out", str(export_dir), "--dataset", config.dataset),
            stdin=subprocess.DEVNULL, capture_output=True, text=True,
        )
        if exported.returncode != 0:
            raise CliError(f"export failed: {exported.stderr.strip().splitlines()[-1:]}")
    except RuntimeError as exc:
        raise CliError(str(exc)) from None
    finally:
        _stop(fleet)
        _stop(server)

    history = status["history"]
    (out / "status.json").write_text(json.dumps(status, indent=2))
    plot = plot_history(history, out / "rounds.png", title=f"edgefl demo: {config.model}, {args.count} devices, {args.partition}")
    card = json.loads((export_dir / "model_card.json").read_text())
    print()
    print(rounds_table(history))
    print()
    print(f"final test accuracy {history[-1]['accuracy']:.4f} after {len(history)} rounds"
          f" ({time.monotonic() - started:.0f}s in all)")
    print(f"plot: {plot}")
    print("TensorFlow Lite files (run on the held-out test split by tf.lite.Interpreter):")
    for f in card["files"]:
        print(
            f"  {export_dir / f['file']}  {f['bytes'] / 1e6:.2f} MB  accuracy {f['accuracy']:.4f}"
            f"  agreement with Keras {f['top1_agreement']:.2%}"
        )
    print(f"  {export_dir / 'model_card.json'}")
    return 0


def _follow(client: CoordinatorClient, config: RunConfig, server, fleet) -> dict:
    """Print a line per committed round until the run finishes; return the final status."""
    shown = 0
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"the coordinator exited with code {server.returncode} mid-run")
        status = client.status()
        for entry in status["history"][shown:]:
            print(progress_line(entry, config.rounds), flush=True)
        shown = len(status["history"])
        if status["run"]["status"] == "finished":
            return status
        if fleet.poll() is not None and fleet.returncode != 0:
            raise RuntimeError(f"the device fleet exited with code {fleet.returncode} mid-run")
        time.sleep(0.5)
