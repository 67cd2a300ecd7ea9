"""Quantized uploads: accuracy and upload bytes per round against float32 uploads.

The end-to-end workload of ``e2e_vs_tff.py`` (real coordinator and device processes,
10 devices with Dirichlet-0.5 shards of digits, the CNN, FedAvg), run once with
float32 uploads (``mean``) and once per bit width with ``compressed``: the devices
quantize each delta stochastically to that many bits and the coordinator decodes
before averaging. Same seeds throughout, so the runs differ only by the quantization.
Prints and saves accuracy per round, bytes uploaded per round beside what the same
updates weigh as float32, and a plot.

    .venv/bin/python benchmarks/compression.py [--bits 8 4 2 1] [--rounds 10] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from e2e_vs_tff import run_edgefl, workload  # noqa: E402  (this directory is on sys.path when run as a script)


def plot(runs: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (accuracy_ax, bytes_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for label, run in runs.items():
        rounds = range(1, len(run["accuracy"]) + 1)
        accuracy_ax.plot(rounds, run["accuracy"], marker="o", label=label)
    accuracy_ax.set(xlabel="round", ylabel="test accuracy", title="accuracy per round")
    labels = list(runs)
    bytes_ax.bar(labels, [sum(r["bytes_up"]) / len(r["bytes_up"]) / 1e6 for r in runs.values()], color="tab:purple")
    bytes_ax.set(ylabel="MB uploaded per round (10 updates)", title="upload per round")
    for ax in (accuracy_ax, bytes_ax):
        ax.grid(alpha=0.3)
    accuracy_ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 4, 2, 1])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--devices", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()

    base = workload("cnn", args.rounds, args.devices)
    configs = {"float32": base, **{f"{b}-bit": replace(base, aggregator="compressed", compression_bits=b) for b in args.bits}}
    runs = {}
    for label, config in configs.items():
        print(f"{label} uploads:", flush=True)
        runs[label] = run_edgefl(config, args.devices, "dirichlet:0.5", 0)

    rows = {}
    for label, run in runs.items():
        up, as_float32 = sum(run["bytes_up"]), sum(run["bytes_up_float32"])
        rows[label] = {
            "final_accuracy": run["accuracy"][-1],
            "final_loss": run["loss"][-1],
            "accuracy_gap_points_vs_float32": 100 * (run["accuracy"][-1] - runs["float32"]["accuracy"][-1]),
            "mb_up_per_round": up / len(run["bytes_up"]) / 1e6,
            "mb_up_per_round_as_float32": as_float32 / len(run["bytes_up"]) / 1e6,
            "upload_fraction_of_float32": up / as_float32,
        }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "compression.json"
    path.write_text(
        json.dumps(
            {
                "workload": {**json.loads(base.to_json()), "devices": args.devices, "partition": "dirichlet:0.5", "data_seed": 0},
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                "summary": rows,
                "runs": runs,
            },
            indent=2,
        )
    )
    plot(runs, args.out / "compression.png")

    print()
    print(f"{'uploads':10}{'accuracy':>10}{'vs float32':>12}{'loss':>8}{'MB up/round':>13}{'as float32':>12}{'fraction':>10}")
    for label, row in rows.items():
        print(
            f"{label:10}{row['final_accuracy']:>10.4f}{row['accuracy_gap_points_vs_float32']:>+11.2f}p{row['final_loss']:>8.3f}"
            f"{row['mb_up_per_round']:>13.2f}{row['mb_up_per_round_as_float32']:>12.2f}{row['upload_fraction_of_float32']:>10.3f}"
        )
    print(f"saved {path} and {args.out / 'compression.png'}")


if __name__ == "__main__":
    main()
