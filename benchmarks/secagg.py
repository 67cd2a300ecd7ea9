"""SecAgg+ (edgefl.secagg) driven directly: devices and coordinator in one process, no
HTTP, so what is measured is the protocol's own compute and bytes.

For each cohort, vector size and dropout rate, every device advertises, shares keys and
uploads its masked input; the dropping devices (a seeded random ``dropout`` fraction)
vanish after sharing keys, the worst moment for the coordinator, which must then
regenerate their pairwise masks with every surviving neighbour. The survivors unmask,
and the coordinator computes the sum, which is checked against the plain sum. Per-device
seconds are the mean over a sample of devices (each device does the same work, so the
sample's mean is the cohort's); bytes are what one device sends and receives;
coordinator seconds are its unmasking and summing. Inputs are 32-bit values summed
modulo 2^(32 + ceil(log2 n)), so the sum is exact; each masked input travels packed in
ceil(bits / 8) bytes per entry, as devices send it.

    .venv/bin/python benchmarks/secagg.py [--cohorts 100 500 1000] [--sizes 100000 1663370]
        [--dropouts 0 0.1 0.3] [--sample 5] [--parts protocol e2e] [--e2e-repeats 2]
        [--out benchmarks/results]

With ``e2e``, it also runs the end-to-end workload of ``e2e_vs_tff.py`` (10 device
processes, the CNN, 10 rounds) with ``mean`` and with ``secure``, alternately, and
compares their seconds per round. A part not run keeps its last saved figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from edgefl.secagg import graph, packing, shamir
from edgefl.secagg import protocol as P

_KEY_BYTES = 32


def measure(devices: int, size: int, dropout: float, sample: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    bits = packing.sum_bits(32, devices)
    degree = graph.default_degree(devices)
    params = P.RoundParams(1, devices, size, bits, degree, graph.default_threshold(degree), graph_seed=seed)
    _ = params.neighbours
    sampled = set(rng.choice(devices, size=min(sample, devices), replace=False).tolist())
    device_s = dict.fromkeys(sampled, 0.0)

    def timed(index, work):
        started = time.perf_counter()
        result = work()
        if index in sampled:
            device_s[index] += time.perf_counter() - started
        return result

    secrets = {i: timed(i, lambda i=i: P.advertise(i)) for i in range(devices)}
    keys = {i: s.public for i, s in secrets.items()}
    sealed = {i: timed(i, lambda i=i: P.share_keys(params, secrets[i], keys)) for i in range(devices)}
    shared = set(range(devices))
    dropped = set(rng.choice(devices, size=int(round(dropout * devices)), replace=False).tolist())
    survivors = [i for i in range(devices) if i not in dropped]
    # One device's input and masked input at a time, summed as they "arrive": a cohort of
    # CNN-sized vectors would not fit in memory otherwise (the coordinator keeps one sum too).
    expected = np.zeros(size, np.uint64)
    total = np.zeros(size, np.uint64)
    summing_s = 0.0
    for i in survivors:
        x = np.random.default_rng([seed, i]).integers(0, 2**32, size, dtype=np.uint64)
        expected += x
        upload = timed(i, lambda i=i, x=x: packing.pack(P.masked_input(params, secrets[i], keys, shared, x), bits))
        started = time.perf_counter()
        total += packing.unpack(upload, size, bits)
        summing_s += time.perf_counter() - started
    masked = set(survivors)
    revealed = {}
    for i in survivors:
        inbox = {u: c[i] for u, c in sealed.items() if i in c}
        revealed[i] = timed(i, lambda i=i, inbox=inbox: P.unmask(params, secrets[i], keys, inbox, shared, masked))
    started = time.perf_counter()
    result = P.remove_masks(params, keys, shared, masked, total & params.modulus_mask, revealed)
    coordinator_s = summing_s + time.perf_counter() - started
    assert np.array_equal(result, expected & params.modulus_mask), "the secure sum differs from the plain sum"
    survivors_sampled = [i for i in sampled if i not in dropped] or list(sampled)
    return {
        "devices": devices,
        "size": size,
        "dropout": dropout,
        "degree": degree,
        "threshold": params.threshold,
        "bits": bits,
        "device_seconds": float(np.mean([device_s[i] for i in survivors_sampled])),
        # keys; a sealed pair per neighbour; the packed masked input; a share per neighbour
        "device_bytes_sent": 2 * _KEY_BYTES
        + degree * P.SEALED_PAIR_BYTES
        + size * packing.entry_bytes(bits)
        + degree * shamir.SHARE_BYTES,
        # its neighbours' keys and sealed pairs
        "device_bytes_received": degree * (2 * _KEY_BYTES + P.SEALED_PAIR_BYTES),
        "coordinator_seconds": coordinator_s,
        "sum_exact": True,
    }


def end_to_end(repeats: int, rounds: int, devices: int) -> dict:
    """The e2e workload (``e2e_vs_tff.workload``: 10 device processes, the CNN, digits
    with Dirichlet 0.5) with ``mean`` and with ``secure``, alternately, ``repeats`` times."""
    from e2e_vs_tff import run_edgefl, summarize, workload  # this directory is on sys.path when run as a script

    base = workload("cnn", rounds, devices)
    results: dict[str, list[dict]] = {"mean": [], "secure": []}
    for repeat in range(repeats):
        for aggregator in results:
            print(f"end to end, {aggregator}, repeat {repeat + 1}:", flush=True)
            results[aggregator].append(run_edgefl(replace(base, aggregator=aggregator), devices, "dirichlet:0.5", 0))
    summary = {aggregator: summarize(runs) for aggregator, runs in results.items()}
    ratio = summary["secure"]["steady_mean_seconds_per_round"] / summary["mean"]["steady_mean_seconds_per_round"]
    return {"workload": json.loads(base.to_json()), "summary": summary, "secure_over_mean_steady": ratio, "runs": results}


def plot(saved: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if saved.get("end_to_end") else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.2), squeeze=False)
    ax = axes[0][0]
    runs = saved["runs"]
    for size in sorted({r["size"] for r in runs}):
        for dropout, style in zip(sorted({r["dropout"] for r in runs}), ("-", "--", ":")):
            points = sorted(
                (r["devices"], r["coordinator_seconds"]) for r in runs if r["size"] == size and r["dropout"] == dropout
            )
            ax.plot(*zip(*points), style, marker="o", label=f"{size:,} entries, {dropout:.0%} dropout")
    ax.set(
        xlabel="devices in the round", ylabel="coordinator seconds (sum and unmask)", yscale="log", title="SecAgg+ coordinator"
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if panels == 2:
        ax = axes[0][1]
        for aggregator, runs_ in saved["end_to_end"]["runs"].items():
            for k, run in enumerate(runs_):
                ax.plot(
                    range(1, len(run["seconds"]) + 1),
                    run["seconds"],
                    marker="o",
                    alpha=0.8,
                    color="tab:blue" if aggregator == "mean" else "tab:red",
                    label=aggregator if k == 0 else None,
                )
        ax.set(xlabel="round", ylabel="seconds", yscale="log", title="round time, 10 devices, the CNN")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cohorts", type=int, nargs="+", default=[100, 500, 1000])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_663_370])
    parser.add_argument("--dropouts", type=float, nargs="+", default=[0.0, 0.1, 0.3])
    parser.add_argument("--sample", type=int, default=5, help="devices whose compute is timed per setting")
    parser.add_argument("--parts", nargs="+", choices=["protocol", "e2e"], default=["protocol", "e2e"])
    parser.add_argument("--e2e-repeats", type=int, default=2)
    parser.add_argument("--e2e-rounds", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    path = args.out / "secagg.json"
    saved = json.loads(path.read_text()) if path.exists() else {"runs": []}  # a part not run keeps its last figures
    saved["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version()}
    if "protocol" in args.parts:
        runs = []
        for size in args.sizes:
            for devices in args.cohorts:
                for dropout in args.dropouts:
                    run = measure(devices, size, dropout, args.sample)
                    runs.append(run)
                    print(
                        f"{devices:5d} devices  {size:9,d} entries  dropout {dropout:4.0%}  degree {run['degree']:3d}:"
                        f" device {run['device_seconds']:.3f} s, {run['device_bytes_sent'] / 1e6:.2f} MB up;"
                        f" coordinator {run['coordinator_seconds']:.2f} s",
                        flush=True,
                    )
        kept = [
            r
            for r in saved["runs"]
            if (r["devices"], r["size"], r["dropout"]) not in {(r["devices"], r["size"], r["dropout"]) for r in runs}
        ]
        saved["runs"] = sorted(kept + runs, key=lambda r: (r["size"], r["devices"], r["dropout"]))
    if "e2e" in args.parts:
        saved["end_to_end"] = end_to_end(args.e2e_repeats, args.e2e_rounds, devices=10)
        s = saved["end_to_end"]["summary"]
        print(
            f"end to end: mean {s['mean']['steady_mean_seconds_per_round']:.2f} s/round, secure"
            f" {s['secure']['steady_mean_seconds_per_round']:.2f} s/round ({saved['end_to_end']['secure_over_mean_steady']:.2f}x);"
            f" final accuracy {s['mean']['final_accuracy']:.4f} against {s['secure']['final_accuracy']:.4f}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(saved, indent=2))
    plot(saved, args.out / "secagg.png")
    print(f"saved {path} and {args.out / 'secagg.png'}")


if __name__ == "__main__":
    main()
