"""Load on a live coordinator: check-ins per second and update uploads per second (MB/s)
at the CNN's delta size, with 1 and 4 WSGI worker processes.

The coordinator is ``edgefl serve`` in its own process (plus its workers) on 127.0.0.1;
this process is the fleet: many simulated devices on keep-alive connections from a pool
of threads, using http.client (a fraction of requests' CPU per call, which matters
when the load generator shares the machine's two cores with the server).

For each worker count, on a fresh instance:
1. ``--devices`` devices register; ``--uploads`` of them check in and are selected (the
   cohort is exactly that many, so the round stays open until all have uploaded).
2. Check-ins: every device checks in again and again for ``--seconds`` seconds from
   ``--connections`` connections; selected devices get their task again, the others
   are told the cohort is full. No check-in is held (none is for the next round).
3. Uploads: each selected device uploads one delta of the CNN's size, distinct bytes
   each (so each is a new fsynced blob and row), from ``--upload-connections``
   connections, while the round driver folds them as they arrive.

Every answer other than the expected status counts as an error. Goal (issue 3): at
least 1,000 check-ins/s and 100 MB/s of uploads with no errors, on 2 cores. The JSON
(``--out``) holds what was measured.

    .venv/bin/python benchmarks/coordinator_load.py [--workers 1 4] [--seconds 10]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from edgefl import wire
from edgefl.app.launcher import federation
from edgefl.config import RunConfig
from edgefl.models import model_spec


class Connections:
    """One keep-alive HTTP connection per thread."""

    def __init__(self, url: str):
        self.address = urlparse(url)
        self.local = threading.local()

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, bytes]:
        for attempt in (1, 2):
            conn = getattr(self.local, "conn", None)
            if conn is None:
                conn = self.local.conn = http.client.HTTPConnection(self.address.hostname, self.address.port, timeout=120)
            try:
                conn.request(method, path, body=body, headers=headers or {})
                response = conn.getresponse()
                return response.status, response.read()
            except (http.client.HTTPException, ConnectionError):
                conn.close()
                self.local.conn = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")


def percentiles(seconds: list[float]) -> dict:
    if not seconds:
        return {}
    ms = sorted(s * 1000 for s in seconds)
    pick = lambda q: ms[min(len(ms) - 1, int(q * len(ms)))]  # noqa: E731
    return {"p50_ms": pick(0.50), "p90_ms": pick(0.90), "p99_ms": pick(0.99), "max_ms": ms[-1], "mean_ms": statistics.fmean(ms)}


def register(http: Connections, count: int, connections: int) -> list[str]:
    def one(_):
        status, body = http.request("POST", "/v1/devices")
        assert status == 201, body
        return json.loads(body)["token"]

    with ThreadPoolExecutor(connections) as pool:
        return list(pool.map(one, range(count)))


def checkin_load(http: Connections, tokens: list[str], seconds: float, connections: int) -> dict:
    latencies: list[list[float]] = [[] for _ in range(connections)]
    errors: list[int] = [0] * connections
    answers: dict[str, int] = {}
    stop_at = time.monotonic() + seconds

    def hammer(slot: int) -> None:
        i = slot
        while time.monotonic() < stop_at:
            started = time.perf_counter()
            status, body = http.request("POST", "/v1/checkin", headers={"Authorization": f"Bearer {tokens[i % len(tokens)]}"})
            latencies[slot].append(time.perf_counter() - started)
            if status != 200:
                errors[slot] += 1
            else:
                answer = json.loads(body)
                key = answer.get("reason", answer["status"])
                answers[key] = answers.get(key, 0) + 1
            i += connections

    started = time.monotonic()
    with ThreadPoolExecutor(connections) as pool:
        list(pool.map(hammer, range(connections)))
    elapsed = time.monotonic() - started
    flat = [s for per in latencies for s in per]
    return {
        "requests": len(flat),
        "seconds": elapsed,
        "per_second": len(flat) / elapsed,
        "errors": sum(errors),
        "answers": answers,
        "latency": percentiles(flat),
        "connections": connections,
    }


def upload_load(http: Connections, tasks: list[tuple[str, int]], connections: int) -> dict:
    """Each (token, round id) uploads one distinct delta of the CNN's size."""
    spec = model_spec("cnn", "digits")
    rng = np.random.default_rng(0)
    arrays = [rng.normal(scale=0.01, size=s.shape).astype(np.float32) for s in spec]
    names = [s.name for s in spec]
    latencies: list[float] = []
    errors: list[str] = []
    sizes: list[int] = []

    def upload(item: tuple[int, tuple[str, int]]) -> None:
        index, (token, round_id) = item
        body = wire.encode(names, arrays, {"num_examples": str(index + 1), "metrics": "{}"})  # distinct bytes
        started = time.perf_counter()
        status, answer = http.request(
            "POST",
            f"/v1/rounds/{round_id}/updates",
            body=body,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream"},
        )
        latencies.append(time.perf_counter() - started)
        sizes.append(len(body))
        if status != 202:
            errors.append(f"{status} {answer[:120]!r}")

    started = time.monotonic()
    with ThreadPoolExecutor(connections) as pool:
        list(pool.map(upload, enumerate(tasks)))
    elapsed = time.monotonic() - started
    return {
        "uploads": len(latencies),
        "bytes_each": sizes[0],
        "seconds": elapsed,
        "per_second": len(latencies) / elapsed,
        "mb_per_second": sum(sizes) / elapsed / 1e6,
        "errors": len(errors),
        "error_samples": errors[:5],
        "latency": percentiles(latencies),
        "connections": connections,
    }


def measure(workers: int, args, out_dir: Path) -> dict:
    config = RunConfig(
        model="cnn",
        rounds=1,
        target_reports=args.uploads,
        min_reports=args.uploads,
        over_selection=1.0,
        round_timeout_s=3600,
    )
    with federation(
        out_dir,
        config,
        count=0,
        partition="iid",
        data_seed=0,
        start_devices=False,
        serve_flags=["--workers", str(workers), "--threads", str(args.threads)],
    ) as fed:
        http = Connections(fed.url)
        deadline = time.monotonic() + 60
        while getattr(fed.client.status().round, "number", None) != 1:
            assert time.monotonic() < deadline, "round 1 did not open"
            time.sleep(0.1)
        tokens = register(http, args.devices, args.connections)
        tasks = []
        for token in tokens[: args.uploads]:
            status, body = http.request("POST", "/v1/checkin", headers={"Authorization": f"Bearer {token}"})
            answer = json.loads(body)
            assert status == 200 and answer["status"] == "task", answer
            tasks.append((token, answer["task"]["round_id"]))
        checkins = checkin_load(http, tokens, args.seconds, args.connections)
        print(
            f"  workers={workers}: {checkins['per_second']:.0f} check-ins/s, p50 {checkins['latency']['p50_ms']:.1f} ms,"
            f" p99 {checkins['latency']['p99_ms']:.1f} ms, errors {checkins['errors']}",
            flush=True,
        )
        uploads = upload_load(http, tasks, args.upload_connections)
        print(
            f"  workers={workers}: {uploads['mb_per_second']:.0f} MB/s of uploads ({uploads['per_second']:.1f} updates/s"
            f" of {uploads['bytes_each'] / 1e6:.1f} MB), p50 {uploads['latency']['p50_ms']:.0f} ms,"
            f" p99 {uploads['latency']['p99_ms']:.0f} ms, errors {uploads['errors']}",
            flush=True,
        )
        return {"workers": workers, "threads_per_worker": args.threads, "checkins": checkins, "uploads": uploads}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--devices", type=int, default=1000, help="registered devices (default 1000)")
    parser.add_argument("--uploads", type=int, default=100, help="selected devices, one upload each (default 100)")
    parser.add_argument("--seconds", type=float, default=10, help="length of the check-in phase (default 10)")
    parser.add_argument("--connections", type=int, default=32, help="concurrent check-in connections (default 32)")
    parser.add_argument("--upload-connections", type=int, default=8, help="concurrent upload connections (default 8)")
    parser.add_argument("--threads", type=int, default=16, help="threads per WSGI worker (default 16)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

    results = []
    with tempfile.TemporaryDirectory(prefix="edgefl-load-") as scratch:
        for workers in args.workers:
            print(f"coordinator with {workers} worker process{'es' if workers > 1 else ''}:", flush=True)
            results.append(measure(workers, args, Path(scratch) / f"workers-{workers}"))
    report = {
        "benchmark": "coordinator_load",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "goal": {"checkins_per_second": 1000, "upload_mb_per_second": 100, "errors": 0},
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "coordinator_load.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
