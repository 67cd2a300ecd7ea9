"""Aggregating cohorts of CNN deltas: per-update time and peak memory for each
aggregator, beside a numpy lower bound and a naive single TFF call.

Each measurement runs in a fresh process (so its peak RSS is its own). The compiled
aggregators fold updates one at a time, as the round driver does, then close the round
(TFF's report and update); per-update time is the whole round's seconds over the
cohort. The deltas are ten distinct random CNN deltas (1,663,370 parameters) cycled,
made before the clock starts: arithmetic does not care which delta comes next
(``compressed`` cycles their 8-bit uploads, ``compressed:2`` their 2-bit ones, and
their time includes decoding each). The
numpy bound is a running example-weighted sum. The naive call is TFF's executor on the
whole cohort at once (``worker_binary``), run where it can run: its client values
travel as one protobuf, which passes 2 GB near 450 CNN deltas, so 1,000 is not tried.

    .venv/bin/python benchmarks/aggregation.py [--cohorts 10 100 1000] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

AGGREGATORS = ("mean", "robust", "dp_adaptive", "dp_fixed", "compressed", "compressed:2")  # 8-bit and 2-bit uploads
_NAIVE_LIMIT = 100  # cohorts above this are not sent to TFF's executor in one call
_POOL = 10


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(kind: str, cohort: int) -> dict:
    """One measurement, in this process: ``kind`` is an aggregator, ``numpy`` or ``naive``."""
    import numpy as np

    from edgefl.models import model_spec

    spec = model_spec("cnn", "digits")
    rng = np.random.default_rng(0)
    pool = [[rng.normal(scale=0.01, size=s.shape).astype(np.float32) for s in spec] for _ in range(_POOL)]
    weights = [rng.normal(size=s.shape).astype(np.float32) for s in spec]
    counts = [int(n) for n in rng.integers(20, 200, size=cohort)]
    baseline = _peak_rss_mb()
    if kind == "numpy":
        started = time.perf_counter()
        total = [np.zeros(s.shape, np.float64) for s in spec]
        for i, n in enumerate(counts):
            for t, d in zip(total, pool[i % _POOL]):
                t += n * d
        mean = [t / sum(counts) for t in total]
        seconds = time.perf_counter() - started
        assert np.isfinite(mean[0]).all()
    elif kind == "naive":
        import collections

        from coordinator.aggregation import ServerSettings, build_round
        from edgefl.app.tff_runtime import TffRuntime

        runtime = TffRuntime()
        runtime.start()
        try:
            initialize, next_round = build_round(spec, ServerSettings())
            state = collections.OrderedDict(model=weights, **initialize())
            clients = [collections.OrderedDict(delta=pool[i % _POOL], weight=np.float32(n)) for i, n in enumerate(counts)]
            started = time.perf_counter()
            next_round(state, clients)
            seconds = time.perf_counter() - started
        finally:
            runtime.stop()
    else:
        from coordinator.aggregation import FedAvgServer, ServerSettings

        aggregator, _, bits = kind.partition(":")
        # Noise 0.3: dp_adaptive's clip estimate needs noise under 0.1 x the cohort.
        server = FedAvgServer(spec, ServerSettings(aggregator=aggregator, clients_per_round=cohort, dp_noise_multiplier=0.3))
        state = server.initialize()
        server.next(state, weights, [(pool[0], 1)])  # first calls build TF's kernels: not the cohort's cost
        deltas = lambda: (pool[i % _POOL] for i in range(cohort))  # noqa: E731
        if aggregator == "compressed":  # quantized uploads, each decoded as it is folded
            from edgefl.codecs import Codec

            codec = Codec(int(bits or 8))
            bodies = [codec.encode([s.name for s in spec], d, {}, rng) for d in pool]
            deltas = lambda: (codec.decode(bodies[i % _POOL], spec)[0] for i in range(cohort))  # noqa: E731
        started = time.perf_counter()
        server.next(state, weights, zip(deltas(), counts))
        seconds = time.perf_counter() - started
    return {
        "kind": kind,
        "cohort": cohort,
        "seconds": seconds,
        "ms_per_update": seconds / cohort * 1e3,
        "peak_rss_mb": _peak_rss_mb(),
        "rss_before_cohort_mb": baseline,
    }


def run_isolated(kind: str, cohort: int) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--measure", kind, str(cohort)], capture_output=True, text=True, timeout=3600
    )
    if done.returncode != 0:
        return {"kind": kind, "cohort": cohort, "error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (time_ax, memory_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for kind in (*AGGREGATORS, "numpy", "naive"):
        rows = [r for r in results if r["kind"] == kind and "error" not in r]
        if rows:
            cohorts = [r["cohort"] for r in rows]
            time_ax.plot(cohorts, [r["ms_per_update"] for r in rows], marker="o", label=kind)
            memory_ax.plot(cohorts, [r["peak_rss_mb"] for r in rows], marker="o", label=kind)
    time_ax.axhline(10, color="grey", linestyle="--", linewidth=1, label="target 10 ms")
    memory_ax.axhline(2048, color="grey", linestyle="--", linewidth=1, label="target 2 GB")
    for ax, label in ((time_ax, "ms per update (whole round / cohort)"), (memory_ax, "peak RSS of the process, MB")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("cohort (CNN deltas, 1,663,370 parameters)")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cohorts", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--measure", nargs=2, metavar=("KIND", "COHORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure[0], int(args.measure[1]))))
        return

    results = []
    for cohort in args.cohorts:
        kinds = [*AGGREGATORS, "numpy"] + (["naive"] if cohort <= _NAIVE_LIMIT else [])
        for kind in kinds:
            result = run_isolated(kind, cohort)
            results.append(result)
            if "error" in result:
                print(f"cohort {cohort:5}  {kind:12} failed: {result['error']}", flush=True)
            else:
                print(
                    f"cohort {cohort:5}  {kind:12} {result['ms_per_update']:8.2f} ms/update"
                    f"  {result['seconds']:7.2f} s  peak RSS {result['peak_rss_mb']:7.0f} MB",
                    flush=True,
                )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "aggregation.json"
    path.write_text(
        json.dumps(
            {
                "model": "cnn",
                "parameters": 1663370,
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                "targets": {"ms_per_update_at_most": 10, "peak_rss_mb_at_most": 2048},
                "results": results,
            },
            indent=2,
        )
    )
    plot(results, args.out / "aggregation.png")
    print(f"saved {path} and {args.out / 'aggregation.png'}")


if __name__ == "__main__":
    main()
