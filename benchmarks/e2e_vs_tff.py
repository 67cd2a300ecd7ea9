"""edgefl's real processes against TFF's in-process simulation, on one workload.

Same data, partition, model, initial weights, epochs, batch size, learning rates and
number of devices, run twice side by side in one invocation: through edgefl
(``edgefl serve`` + ``edgefl devices``, real processes on 127.0.0.1) and through
``tff.learning.algorithms.build_weighted_fed_avg``. Prints and saves accuracy and
seconds per round for both, and their ratios.

Round 1 is reported apart: for edgefl it includes the device processes' start-up
(TensorFlow import), for TFF the tracing of its computations. "Steady" means rounds
2..R. An edgefl round runs from its opening to its commit (the next round opens in the
same transaction, so these add up to the run); TFF's is one ``process.next`` call.
Central evaluation is left out of TFF's seconds and not of edgefl's (it overlaps the
next round there). The machine's speed drifts, so the two are run alternately
``--repeats`` times and every steady round of every repeat is pooled.

    .venv/bin/python benchmarks/e2e_vs_tff.py [--rounds 10] [--devices 10] [--repeats 2] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from edgefl.app.demo import per_core  # noqa: E402
from edgefl.app.launcher import federation  # noqa: E402
from edgefl.config import RunConfig  # noqa: E402
from edgefl.datasets import load_dataset  # noqa: E402
from edgefl.partition import partition  # noqa: E402


def run_edgefl(config: RunConfig, devices: int, partition_spec: str, data_seed: int) -> dict:
    work = Path(tempfile.mkdtemp(prefix="edgefl-bench-"))
    try:
        started = time.monotonic()
        # TFF's side trains on every example and builds no phone files: so does edgefl's here.
        with federation(
            work,
            config,
            count=devices,
            partition=partition_spec,
            data_seed=data_seed,
            serve_flags=["--no-publish"],
            device_flags=["--holdout", "0", "--per-process", str(per_core(devices))],  # as the demo runs them
        ) as fed:
            status = fed.follow(
                lambda e: print(f"  edgefl round {e.round}: accuracy {e.accuracy:.4f}, {e.seconds:.2f}s", flush=True)
            )
        wall = time.monotonic() - started
    finally:
        shutil.rmtree(work, ignore_errors=True)
    history = status.model_dump(mode="json")["history"]
    return {
        "accuracy": [e["accuracy"] for e in history],
        "loss": [e["loss"] for e in history],
        "seconds": [e["seconds"] for e in history],
        "aggregation_seconds": [e["aggregation_seconds"] for e in history],
        "bytes_up": [e["bytes_up"] for e in history],
        "bytes_up_float32": [e["bytes_up_float32"] for e in history],
        "wall_seconds_including_startup": wall,
    }


def run_tff(config: RunConfig, devices: int, partition_spec: str, data_seed: int) -> dict:
    import numpy as np
    import tensorflow as tf
    import tensorflow_federated as tff

    from edgefl.app.tff_runtime import TffRuntime
    from edgefl.models import build_model
    from edgefl.training import KerasLearner

    data = load_dataset(config.dataset)
    shards = partition(data.train.y, partition_spec, devices, data_seed)
    client_data = [
        tf.data.Dataset.from_tensor_slices((data.train.x[idx], data.train.y[idx]))
        .shuffle(len(idx), seed=data_seed + i)
        .batch(config.batch_size)
        .repeat(config.epochs)
        for i, idx in enumerate(shards)
    ]
    initial = build_model(config.model, config.dataset, seed=config.seed).get_weights()
    input_spec = client_data[0].element_spec

    def model_fn():
        return tff.learning.models.from_keras_model(
            build_model(config.model, config.dataset),
            input_spec=input_spec,
            loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=[tf.keras.metrics.SparseCategoricalAccuracy()],
        )

    with TffRuntime() as runtime:
        runtime.install()
        started = time.monotonic()
        process = tff.learning.algorithms.build_weighted_fed_avg(
            model_fn,
            client_optimizer_fn=tff.learning.optimizers.build_sgdm(learning_rate=config.client_lr),
            server_optimizer_fn=tff.learning.optimizers.build_sgdm(learning_rate=config.server_lr),
        )
        state = process.initialize()
        state = process.set_model_weights(state, tff.learning.models.ModelWeights(trainable=initial, non_trainable=[]))
        build_seconds = time.monotonic() - started
        # Built after TFF traced model_fn (see DESIGN.md's pitfall on Keras models built before).
        learner = KerasLearner(config.model, config.dataset)
        accuracy, loss, seconds = [], [], []
        for r in range(config.rounds):
            t0 = time.monotonic()
            state = process.next(state, client_data).state
            seconds.append(time.monotonic() - t0)
            weights = [np.asarray(w) for w in process.get_model_weights(state).trainable]
            metrics = learner.evaluate(weights, data.test.x, data.test.y)
            accuracy.append(metrics["accuracy"])
            loss.append(metrics["loss"])
            print(f"  tff round {r + 1}: accuracy {accuracy[-1]:.4f}, {seconds[-1]:.2f}s", flush=True)
    return {
        "accuracy": accuracy,
        "loss": loss,
        "seconds": seconds,
        "build_seconds": build_seconds,
        "wall_seconds_including_startup": time.monotonic() - started,
    }


def summarize(repeats: list[dict]) -> dict:
    steady = [s for result in repeats for s in result["seconds"][1:]]
    extra = {}
    if "aggregation_seconds" in repeats[0]:
        extra["steady_mean_aggregation_seconds"] = statistics.mean(
            a for result in repeats for a in result["aggregation_seconds"][1:]
        )
    return {
        **extra,
        "final_accuracy": statistics.mean(r["accuracy"][-1] for r in repeats),
        "final_accuracy_each_repeat": [r["accuracy"][-1] for r in repeats],
        "first_round_seconds": statistics.mean(r["seconds"][0] for r in repeats),
        "steady_mean_seconds_per_round": statistics.mean(steady),
        "steady_median_seconds_per_round": statistics.median(steady),
        "steady_mean_seconds_each_repeat": [statistics.mean(r["seconds"][1:]) for r in repeats],
    }


def workload(model: str, rounds: int, devices: int) -> RunConfig:
    """The end-to-end workload's run (also ``compression.py``'s): every device reports,
    1 epoch of batch 10, client SGD 0.05, server SGD 1.0 (FedAvg), seed 0."""
    return RunConfig(
        model=model,
        rounds=rounds,
        target_reports=devices,
        min_reports=devices,
        epochs=1,
        batch_size=10,
        client_lr=0.05,
        server_lr=1.0,
        seed=0,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--devices", type=int, default=10)
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--partition", default="dirichlet:0.5")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()

    config = workload(args.model, args.rounds, args.devices)
    print(
        f"workload: {args.devices} devices, {args.rounds} rounds, {args.model}, {args.partition}, "
        f"1 epoch of batch 10, client SGD 0.05, server SGD 1.0",
        flush=True,
    )
    edgefl, tff_result = [], []
    for repeat in range(1, args.repeats + 1):
        print(f"edgefl (coordinator + device processes), repeat {repeat}/{args.repeats}:", flush=True)
        edgefl.append(run_edgefl(config, args.devices, args.partition, args.data_seed))
        print(f"TFF in-process simulation (build_weighted_fed_avg), repeat {repeat}/{args.repeats}:", flush=True)
        tff_result.append(run_tff(config, args.devices, args.partition, args.data_seed))

    e, t = summarize(edgefl), summarize(tff_result)
    comparison = {
        "accuracy_gap_points": 100 * (e["final_accuracy"] - t["final_accuracy"]),
        "steady_seconds_ratio_edgefl_over_tff": e["steady_mean_seconds_per_round"] / t["steady_mean_seconds_per_round"],
        # Cold start: edgefl's round 1 (its devices start with the coordinator) against TFF's (tracing).
        "first_round_ratio_edgefl_over_tff": e["first_round_seconds"] / t["first_round_seconds"],
        "targets": {"accuracy_within_points": 2.0, "seconds_ratio_at_most": 1.0, "first_round_ratio_at_most": 2.0},
    }
    comparison["accuracy_target_met"] = abs(comparison["accuracy_gap_points"]) <= 2.0
    comparison["speed_target_met"] = comparison["steady_seconds_ratio_edgefl_over_tff"] <= 1.0
    comparison["cold_start_target_met"] = comparison["first_round_ratio_edgefl_over_tff"] <= 2.0
    result = {
        "workload": {
            **json.loads(config.to_json()),
            "devices": args.devices,
            "partition": args.partition,
            "data_seed": args.data_seed,
            "repeats": args.repeats,
        },
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "edgefl": {"repeats": edgefl, "summary": e},
        "tff": {"repeats": tff_result, "summary": t},
        "comparison": comparison,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "e2e_vs_tff.json"
    path.write_text(json.dumps(result, indent=2))

    print()
    print(f"{'':24}{'edgefl':>10}{'TFF':>10}")
    print(f"{'final accuracy':24}{e['final_accuracy']:>10.4f}{t['final_accuracy']:>10.4f}")
    print(f"{'round 1 seconds (mean)':24}{e['first_round_seconds']:>10.2f}{t['first_round_seconds']:>10.2f}")
    print(f"{'steady s/round (mean)':24}{e['steady_mean_seconds_per_round']:>10.2f}{t['steady_mean_seconds_per_round']:>10.2f}")
    print(
        f"{'steady s/round (median)':24}{e['steady_median_seconds_per_round']:>10.2f}{t['steady_median_seconds_per_round']:>10.2f}"
    )
    print(
        f"accuracy gap {comparison['accuracy_gap_points']:+.2f} points (target within 2: {'met' if comparison['accuracy_target_met'] else 'NOT met'})"
    )
    print(
        f"seconds ratio edgefl/TFF {comparison['steady_seconds_ratio_edgefl_over_tff']:.2f} (target <= 1: {'met' if comparison['speed_target_met'] else 'NOT met'})"
    )
    print(
        f"round 1 ratio edgefl/TFF {comparison['first_round_ratio_edgefl_over_tff']:.2f} (target <= 2: {'met' if comparison['cold_start_target_met'] else 'NOT met'})"
    )
    print(f"saved {path}")


if __name__ == "__main__":
    main()
