"""``edgefl demo``: one whole federated run from real processes, then a report.

The coordinator and the devices are the same ``edgefl serve`` and ``edgefl devices``
commands a user types; the final model goes through ``edgefl export``; the demo prints
a line per round while it runs and a table, a plot and the .tflite paths at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

from edgefl.app.launcher import edgefl_command, federation
from edgefl.app.report import export_table, figure, plot_history, progress_line, rounds_table
from edgefl.artefacts import MODEL_CARD
from edgefl.config import RunConfig
from edgefl.processes import raise_on_sigterm

_MARKER = ".edgefl-demo"


def per_core(count: int) -> int:
    """Devices per device host so that there is one host per core (one training thread
    each): in one process, two training threads contend for Python and ran slower."""
    cores = os.cpu_count() or 1
    return max(1, -(-count // cores))


def run_demo(args, config: RunConfig) -> int:
    from edgefl.app.cli import CliError

    out = args.out
    if out.exists():
        if not (out / _MARKER).is_file() and (not out.is_dir() or any(out.iterdir())):
            raise CliError(f"{out} exists and is not an earlier demo's output; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / _MARKER).write_text("written by edgefl demo; the next demo with this --out replaces it\n")
    raise_on_sigterm()
    started = time.monotonic()
    print(
        f"edgefl demo: {args.count} devices, {config.rounds} rounds of {config.model} on {config.dataset}"
        f" ({args.partition}), everything under {out}/",
        flush=True,
    )
    print("starting the coordinator (TensorFlow and TFF) and the device processes...", flush=True)
    export_dir = out / "tflite"
    try:
        with federation(
            out,
            config,
            count=args.count,
            partition=args.partition,
            data_seed=args.data_seed,
            # A device host per core: the devices share two runtime imports instead of paying for ten.
            device_flags=["--runtime", args.runtime, "--per-process", str(per_core(args.count))],
        ) as fed:
            print(
                f"coordinator at {fed.url} (dashboard: {fed.url}/); {args.count} devices started with it",
                flush=True,
            )
            status = fed.follow(lambda entry: print(progress_line(entry, config.rounds), flush=True))
            print("exporting the final model to TensorFlow Lite...", flush=True)
            exported = subprocess.run(
                edgefl_command(
                    "export",
                    "--coordinator",
                    fed.url,
                    "--out",
                    str(export_dir),
                    "--model",
                    config.model,
                    "--dataset",
                    config.dataset,
                ),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
            )
            if exported.returncode != 0:
                raise CliError(f"export failed: {(exported.stderr.strip().splitlines() or ['?'])[-1]}")
    except RuntimeError as exc:
        raise CliError(f"{exc} (logs in {out / 'logs'})") from None

    history = status.history
    (out / "status.json").write_text(status.model_dump_json(indent=2))
    plot = plot_history(history, out / "rounds.png", title=f"edgefl demo: {config.model}, {args.count} devices, {args.partition}")
    card = json.loads((export_dir / MODEL_CARD).read_text())
    print()
    print(rounds_table(history))
    print()
    print(
        f"final test accuracy {figure(history[-1].accuracy)} after {len(history)} rounds"
        f" ({time.monotonic() - started:.0f}s in all; every process started has been stopped)"
    )
    print(f"plot: {plot}")
    print("TensorFlow Lite files, run on the held-out test split by LiteRT:")
    print(export_table(card, export_dir))
    return 0
