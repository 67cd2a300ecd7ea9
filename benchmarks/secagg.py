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
modulo 2^(32 + ceil(log2(n + 1))), so the sum is exact.

    .venv/bin/python benchmarks/secagg.py [--cohorts 100 500 1000] [--sizes 100000 1663370]
        [--dropouts 0 0.1 0.3] [--sample 5] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np

from edgefl.secagg import graph, shamir
from edgefl.secagg import protocol as P

_KEY_BYTES = 32
_SEALED_PAIR_BYTES = 12 + 2 * shamir.SHARE_BYTES + 16  # nonce, two shares, tag


def measure(devices: int, size: int, dropout: float, sample: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    bits = 32 + math.ceil(math.log2(devices + 1))
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
    inputs = {i: rng.integers(0, 2**32, size, dtype=np.uint64) for i in survivors}
    uploads = {i: timed(i, lambda i=i: P.masked_input(params, secrets[i], keys, shared, inputs[i])) for i in survivors}
    masked = set(uploads)
    revealed = {}
    for i in survivors:
        inbox = {u: c[i] for u, c in sealed.items() if i in c}
        revealed[i] = timed(i, lambda i=i, inbox=inbox: P.unmask(params, secrets[i], keys, inbox, shared, masked))
    started = time.perf_counter()
    total = P.aggregate(params, keys, shared, uploads, revealed)
    coordinator_s = time.perf_counter() - started
    expected = np.zeros(size, np.uint64)
    for i in survivors:
        expected += inputs[i]
    assert np.array_equal(total, expected & params.modulus_mask), "the secure sum differs from the plain sum"
    survivors_sampled = [i for i in sampled if i not in dropped] or list(sampled)
    return {
        "devices": devices,
        "size": size,
        "dropout": dropout,
        "degree": degree,
        "threshold": params.threshold,
        "bits": bits,
        "device_seconds": float(np.mean([device_s[i] for i in survivors_sampled])),
        "device_bytes_sent": 2 * _KEY_BYTES + degree * _SEALED_PAIR_BYTES + size * 8 + degree * (_KEY_BYTES + 1),
        "device_bytes_received": degree * (2 * _KEY_BYTES + _SEALED_PAIR_BYTES),
        "coordinator_seconds": coordinator_s,
        "sum_exact": True,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cohorts", type=int, nargs="+", default=[100, 500, 1000])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_663_370])
    parser.add_argument("--dropouts", type=float, nargs="+", default=[0.0, 0.1, 0.3])
    parser.add_argument("--sample", type=int, default=5, help="devices whose compute is timed per setting")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
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
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "secagg.json"
    path.write_text(json.dumps({"machine": {"cpus": 2, "python": platform.python_version()}, "runs": runs}, indent=2))
    print(f"saved {path}")


if __name__ == "__main__":
    main()
