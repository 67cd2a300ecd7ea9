"""Learning quality: FedAvg through edgefl's real pipeline on Fashion-MNIST, per partition.

Each partition is one whole run of real processes (``edgefl serve`` and ``edgefl
devices`` on 127.0.0.1) on Debian's Fashion-MNIST (``/usr/share/datasets/fashion-mnist``,
60,000 training images over the devices, the coordinator testing on the 10,000 others).
The defaults follow the NIID-Bench study (Li et al., "Federated Learning on Non-IID
Data Silos: An Experimental Study", ICDE 2022): 10 devices, all of them in every round,
its simple CNN (``lenet5``: 5x5 convolutions of 6 and 16 channels, dense 120 and 84),
50 rounds of 10 local epochs with batch 64, client SGD lr 0.01 with momentum 0.9, and
the partitions IID, Dirichlet 0.5, and 1, 2 or 3 classes per device.

A second part (``--parts style``) checks that a user's own model file trains exactly as
the built-in it copies: on the digits with the ``style`` partition (each device its own
handwriting), ``--model cnn`` against a ``.keras`` file saved from the same
architecture and initial weights, same seeds.

Saves ``benchmarks/results/learning.json`` (accuracy per round per partition, seconds)
and ``learning.png`` after each partition, and goes on from the partitions a previous
invocation saved with the same settings (``--fresh`` does not); ``learning_style.json``
and ``styles.png`` for the style part. ``--quick`` is a few-minute version for
development.

    .venv/bin/python benchmarks/learning.py [--quick] [--parts niid,style] [--rounds 50] ...
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from edgefl.app.launcher import federation  # noqa: E402
from edgefl.config import RunConfig  # noqa: E402

NIID_BENCH_PARTITIONS = ("iid", "dirichlet:0.5", "classes:1", "classes:2", "classes:3")
QUICK = {"rounds": 3, "epochs": 1, "partitions": "iid,classes:2"}


def run(config: RunConfig, devices: int, partition: str, *, per_process: int, data_seed: int = 0) -> dict:
    """One federated run to its end; its accuracy, loss and seconds per round."""
    work = Path(tempfile.mkdtemp(prefix="edgefl-learning-"))
    started = time.monotonic()
    try:
        with federation(
            work,
            config,
            count=devices,
            partition=partition,
            data_seed=data_seed,
            serve_flags=["--no-publish"],
            device_flags=["--holdout", "0", "--per-process", str(per_process), "--threads", "2"],
        ) as fed:
            status = fed.follow(
                lambda e: print(
                    f"  {partition} round {e.round}/{config.rounds}: accuracy {e.accuracy:.4f}, {e.seconds:.1f}s", flush=True
                ),
                timeout_s=config.rounds * config.round_timeout_s,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    history = status.history
    return {
        "partition": partition,
        "accuracy": [e.accuracy for e in history],
        "loss": [e.loss for e in history],
        "seconds": [e.seconds for e in history],
        "final_accuracy": history[-1].accuracy,
        "best_accuracy": max(e.accuracy for e in history),
        "wall_seconds": time.monotonic() - started,
    }


def _earlier_runs(path: Path, niid: dict) -> dict[str, dict]:
    """The partitions a previous invocation measured with the same settings, by name:
    a long benchmark interrupted (or run a few partitions at a time) goes on from them."""
    try:
        earlier = json.loads(path.read_text())["niid_bench"]
    except (OSError, ValueError, KeyError):
        return {}
    if (earlier["config"], earlier["devices"]) != (niid["config"], niid["devices"]):
        return {}
    return {r["partition"]: r for r in earlier["runs"]}


def _save(path: Path, niid: dict) -> None:
    machine = {"cpus": os.cpu_count(), "python": platform.python_version()}
    path.write_text(json.dumps({"machine": machine, "niid_bench": niid}, indent=2))
    plot(niid, path.with_suffix(".png"))


def niid_bench(args, path: Path) -> dict:
    """Each partition's run, saved as it finishes; those ``path`` already holds with the
    same settings are kept (unless ``--fresh``)."""
    config = RunConfig(
        model=args.model,
        dataset=args.dataset,
        rounds=args.rounds,
        target_reports=args.devices,
        min_reports=args.devices,
        over_selection=1.0,
        round_timeout_s=args.round_timeout,
        epochs=args.epochs,
        batch_size=args.batch_size,
        client_lr=args.lr,
        client_momentum=args.momentum,
        seed=0,
    )
    niid = {"config": json.loads(config.to_json()), "devices": args.devices, "runs": []}
    earlier = {} if args.fresh else _earlier_runs(path, niid)
    for partition in args.partitions.split(","):
        if partition in earlier:
            print(f"{partition}: kept from {path} (final {earlier[partition]['final_accuracy']:.4f})", flush=True)
            niid["runs"].append(earlier[partition])
            continue
        print(f"{partition}: {args.devices} devices, {args.rounds} rounds of {args.epochs} epochs", flush=True)
        niid["runs"].append(run(config, args.devices, partition, per_process=args.per_process))
        print(
            f"  {partition}: final {niid['runs'][-1]['final_accuracy']:.4f} in {niid['runs'][-1]['wall_seconds']:.0f}s",
            flush=True,
        )
        _save(path, niid)
    _save(path, niid)
    return niid


def _largest_differences(a: dict, b: dict) -> dict:
    return {
        "max_abs_accuracy_difference": max(abs(x - y) for x, y in zip(a["accuracy"], b["accuracy"])),
        "max_abs_loss_difference": max(abs(x - y) for x, y in zip(a["loss"], b["loss"])),
    }


def style_check(args) -> dict:
    """``cnn`` against the same architecture and initial weights brought as a .keras file.

    With ``secure`` aggregation the round's sum is an exact integer sum, so a run does
    not depend on the order the devices' updates arrive in, and the two runs must agree
    exactly. With ``mean`` the float sum follows the arrival order, so two runs of the
    same model differ a little too: the .keras run is compared with that spread (a
    second ``cnn`` run)."""
    from edgefl.models import build_model

    rounds = 2 if args.quick else 5
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        user_model = Path(tmp) / "my_cnn.keras"
        build_model("cnn", "digits", seed=0).save(user_model)
        plan = [("secure", "cnn"), ("secure", "user_keras"), ("mean", "cnn"), ("mean", "cnn_again"), ("mean", "user_keras")]
        for aggregator, name in plan:
            model = str(user_model) if name == "user_keras" else "cnn"
            config = RunConfig(
                model=model,
                aggregator=aggregator,
                rounds=rounds,
                target_reports=10,
                min_reports=10,
                over_selection=1.0,
                epochs=1,
                seed=0,
            )
            print(f"digits, style partition, {aggregator}, --model {model}", flush=True)
            runs[f"{aggregator}/{name}"] = run(config, 10, "dirichlet:0.5+style", per_process=10)
    return {
        "partition": "dirichlet:0.5+style",
        "rounds": rounds,
        "runs": runs,
        "secure_cnn_vs_user_keras": _largest_differences(runs["secure/cnn"], runs["secure/user_keras"]),
        "mean_cnn_vs_user_keras": _largest_differences(runs["mean/cnn"], runs["mean/user_keras"]),
        "mean_cnn_vs_cnn_again": _largest_differences(runs["mean/cnn"], runs["mean/cnn_again"]),
    }


def style_figure(path: Path, devices: int = 8) -> None:
    """The same digits in the handwriting of ``devices`` devices (``+style``, seed 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edgefl.datasets import load_dataset
    from edgefl.datasets.style import apply_style, draw_style

    test = load_dataset("digits").test
    samples = test.x[[int(next(i for i, y in enumerate(test.y) if y == digit)) for digit in range(10)]]
    fig, axes = plt.subplots(devices + 1, 10, figsize=(6, 0.62 * (devices + 1)))
    for row in range(devices + 1):
        images = samples if row == 0 else apply_style(samples, draw_style(0, row - 1))
        for col in range(10):
            axes[row, col].imshow(images[col, ..., 0], cmap="gray_r", vmin=0, vmax=1)
            axes[row, col].set_axis_off()
        axes[row, 0].text(-4, 14, "original" if row == 0 else f"device {row - 1}", ha="right", va="center", fontsize=7)
    fig.suptitle("the digits' +style partition: each device's own handwriting (seed 0)", fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot(niid: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.6, 4.2))
    for result in niid["runs"]:
        rounds = range(1, len(result["accuracy"]) + 1)
        ax.plot(rounds, result["accuracy"], label=f"{result['partition']} ({result['final_accuracy']:.3f})")
    config = niid["config"]
    ax.set(
        title=f"FedAvg on Fashion-MNIST, {niid['devices']} devices, {config['model']}, {config['epochs']} local epochs",
        xlabel="round",
        ylabel="test accuracy",
        ylim=(0, 1),
    )
    ax.grid(alpha=0.3)
    ax.legend(title="partition (final)", loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="niid,style", help="niid (the partitions), style (cnn vs a .keras file)")
    parser.add_argument("--quick", action="store_true", help=f"a few minutes: {QUICK}")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--model", default="lenet5")
    parser.add_argument("--devices", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--partitions", default=",".join(NIID_BENCH_PARTITIONS))
    parser.add_argument("--per-process", type=int, default=10, help="devices per OS process")
    parser.add_argument("--round-timeout", type=float, default=3600.0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--fresh", action="store_true", help="measure every partition again, keeping none saved")
    args = parser.parse_args()
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    parts = args.parts.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    if "style" in parts:
        style_figure(args.out / "styles.png")
        check = style_check(args)
        machine = {"cpus": os.cpu_count(), "python": platform.python_version()}
        (args.out / f"learning_style{suffix}.json").write_text(json.dumps({"machine": machine, "style_check": check}, indent=2))
        print(
            "style partition, cnn vs the same model as a .keras file, largest accuracy difference:"
            f" secure {check['secure_cnn_vs_user_keras']['max_abs_accuracy_difference']:.4f},"
            f" mean {check['mean_cnn_vs_user_keras']['max_abs_accuracy_difference']:.4f}"
            f" (mean, cnn against itself: {check['mean_cnn_vs_cnn_again']['max_abs_accuracy_difference']:.4f})",
            flush=True,
        )
    if "niid" in parts:
        path = args.out / f"learning{suffix}.json"
        niid_bench(args, path)
        print(f"saved {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
