"""The phone artefacts, measured: every .tflite variant, training through LiteRT against
Keras, and what a device process costs with each runtime.

1. Trains the model centrally on the digits train split (``--epochs``), then runs
   ``edgefl export``'s own code on it: size, test accuracy, top-1 agreement and max
   |logit difference| against Keras, and median latency per image at batch 1 on LiteRT
   (one thread), for float32, float16, dynamic-range and int8, plus the training file.
2. Times one SGD step (the training file's fixed batch) through LiteRT and through
   Keras, alternately ``--repeats`` times in this process, both on one thread.
3. Runs a short federation (``edgefl serve`` + ``edgefl devices --runtime keras,litert``)
   and reads each device process's peak RSS and start-up time (process start to imports
   done, plus building its learner: TensorFlow and a Keras model, or LiteRT and the
   training file) from the devices' own summaries.

    .venv/bin/python benchmarks/export.py [--model cnn] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Run as a script, this file's directory leads sys.path, and this file's name would
# shadow the export package it measures.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from edgefl.app.launcher import federation  # noqa: E402
from edgefl.config import RunConfig  # noqa: E402
from edgefl.datasets import load_dataset  # noqa: E402


def trained_weights(model: str, epochs: int, batch_size: int) -> list:
    from edgefl.training import KerasLearner

    learner = KerasLearner(model, "digits")
    train = load_dataset("digits").train
    weights = learner.model.get_weights()
    for epoch in range(epochs):
        result = learner.client_update(weights, train.x, train.y, epochs=1, batch_size=batch_size, learning_rate=0.05, seed=epoch)
        weights = [w + d for w, d in zip(weights, result.delta)]
        print(f"  central training epoch {epoch + 1}/{epochs}: loss {result.metrics['train_loss']:.4f}", flush=True)
    return weights


def step_times(model: str, weights: list, train_tflite: bytes, batch_size: int, repeats: int, steps: int) -> dict:
    """Milliseconds per SGD step, each runtime timed over ``steps`` steps per repeat."""
    from edgefl.litert import LiteRTLearner
    from edgefl.training import KerasLearner

    keras, litert = KerasLearner(model, "digits"), LiteRTLearner(train_tflite, threads=1)
    train = load_dataset("digits").train
    x, y = train.x[: steps * batch_size], train.y[: steps * batch_size]
    litert_weights = [weights[keras.names.index(n)] for n in litert.names]
    runs = {
        "keras": lambda: keras.client_update(weights, x, y, epochs=1, batch_size=batch_size, learning_rate=0.05, seed=0),
        "litert": lambda: litert.client_update(litert_weights, x, y, epochs=1, batch_size=batch_size, learning_rate=0.05, seed=0),
    }
    for run in runs.values():
        run()  # tracing and first-invoke costs are not a step's
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - started) / steps * 1e3)
    return {name: {"median_ms_per_step": statistics.median(t), "runs_ms_per_step": t} for name, t in times.items()}


def device_costs(model: str, rounds: int) -> list[dict]:
    config = RunConfig(model=model, rounds=rounds, target_reports=4, min_reports=4, round_timeout_s=600)
    with tempfile.TemporaryDirectory(prefix="edgefl-bench-") as work:
        with federation(
            Path(work), config, count=4, partition="iid", data_seed=0, device_flags=["--runtime", "keras,litert"]
        ) as fed:
            fed.follow(lambda e: print(f"  round {e.round}: accuracy {e.accuracy:.4f}", flush=True), timeout_s=900)
            fed.fleet.wait(timeout=120)
        return [json.loads(p.read_text()) for p in sorted((Path(work) / "logs" / "devices").glob("device-*.json"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()

    from edgefl.app.report import export_table
    from edgefl.training import limit_threads
    from export import export_checkpoint

    limit_threads(1)
    print(f"1/3 training {args.model} centrally, then exporting it", flush=True)
    weights = trained_weights(args.model, args.epochs, 32)
    with tempfile.TemporaryDirectory() as tmp:
        card = export_checkpoint(
            weights=weights,
            model_name=args.model,
            dataset="digits",
            out_dir=Path(tmp),
            checkpoint_sha256="",
            round_number=None,
            train_batch=args.batch_size,
        )
        train_tflite = (Path(tmp) / card["training"]["file"]).read_bytes()
    print(f"2/3 one SGD step of batch {args.batch_size}, LiteRT vs Keras, {args.repeats} alternating repeats", flush=True)
    steps = step_times(args.model, weights, train_tflite, args.batch_size, args.repeats, args.steps)
    print(f"3/3 a {args.rounds}-round federation of 2 keras and 2 litert device processes", flush=True)
    devices = device_costs(args.model, args.rounds)
    per_runtime = {
        runtime: {
            "peak_rss_mb": statistics.mean(d["peak_rss_mb"] for d in devices if d["runtime"] == runtime),
            "startup_s": statistics.mean(d["startup_s"] for d in devices if d["runtime"] == runtime),
            "tensorflow_imported": any(d["tensorflow_imported"] for d in devices if d["runtime"] == runtime),
        }
        for runtime in ("keras", "litert")
    }

    result = {
        "model": args.model,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "keras_accuracy": card["evaluation"]["keras_accuracy"],
        "test_examples": card["evaluation"]["examples"],
        "variants": card["files"],
        "training_file": card["training"],
        "sgd_step": steps,
        "devices": {"per_runtime": per_runtime, "each": devices},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "export.json"
    path.write_text(json.dumps(result, indent=2))

    print()
    print(export_table(card, Path("(a temporary directory)")))
    keras_ms, litert_ms = steps["keras"]["median_ms_per_step"], steps["litert"]["median_ms_per_step"]
    print(
        f"SGD step (batch {args.batch_size}, 1 thread): Keras {keras_ms:.2f} ms, LiteRT {litert_ms:.2f} ms ({litert_ms / keras_ms:.2f}x)"
    )
    for runtime, c in per_runtime.items():
        print(
            f"{runtime} device process: peak RSS {c['peak_rss_mb']:.0f} MB, start-up {c['startup_s']:.2f} s, TensorFlow imported: {c['tensorflow_imported']}"
        )
    print(f"saved {path}")


if __name__ == "__main__":
    main()
