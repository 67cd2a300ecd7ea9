"""A live coordinator under attack: what its honest devices and clients see.

Each scenario is a fresh ``edgefl serve`` (cnn_small, target 4 reports of a cohort of 6,
min 3, 15 s deadline, no phone artefacts) with ``--devices`` honest ``edgefl devices``
processes training for real. Once the first round has committed, this process attacks
the coordinator for ``--seconds`` from 127.0.0.1 while a prober reads ``/v1/status`` on
a new connection every 0.1 s. Scenarios:

- ``clean``: no attack (the baseline).
- ``connection_flood``: 2,000 idle connections held open, and 40 connections a
  second each pipelining 50 checkpoint downloads that they never read.
- ``stalled_bodies``: 200 uploads with no or a bogus token announcing 60 MB and
  sending nothing more, and 50 connections trickling their headers a byte at a time.
- ``never_reporting``: twice as many self-registered devices as honest ones, that check
  in, take tasks and never upload (two thirds of the devices checking in), and ignore
  ``retry_after`` to be first in line when a round opens.
- ``registration_flood``: eight clients registering devices as fast as they are let.
- ``overflowing_updates``: a registered device that, whenever selected, uploads
  values near float32's limit, metrics whose sums overflow, and hostile JSON.

``clean_2_workers`` and ``never_reporting_2_workers`` run the same with ``serve
--workers 2``: there the round driver has no lobby to seat waiting devices from, so
whoever checks in first gets a seat, which is where devices that never report used to
starve the run. Reported per scenario: rounds committed per minute in the window (and
as a fraction of the clean run's with the same workers), rounds abandoned, the prober's p50/p99 latency and failures, the
server's peak open descriptors and RSS, what the attacker's requests were answered,
and whether the model at the end is finite and the status strict JSON. Each scenario
is bounded in time; everything started is stopped.

    .venv/bin/python benchmarks/hostile.py [--seconds 60] [--devices 6] [--scenarios clean,never_reporting]
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import psutil
import requests

from edgefl import logs

logs.quiet_native_logs()  # before TensorFlow (model_spec) is imported

from edgefl import wire  # noqa: E402
from edgefl.app.launcher import federation  # noqa: E402
from edgefl.config import RunConfig  # noqa: E402
from edgefl.models import model_spec  # noqa: E402

CONFIG = RunConfig(model="cnn_small", rounds=100_000, target_reports=4, min_reports=3, over_selection=1.5, round_timeout_s=15)
SCENARIOS = (
    "clean",
    "connection_flood",
    "stalled_bodies",
    "never_reporting",
    "registration_flood",
    "overflowing_updates",
    "clean_2_workers",
    "never_reporting_2_workers",
)
TWO_WORKERS = "_2_workers"  # a scenario named so runs serve --workers 2 (no lobby candidates: first come, first seated)


class Attack:
    """Threads that attack until ``stop`` is set, counting how they were answered."""

    def __init__(self, url: str, stop: threading.Event):
        self.url = url
        self.host, self.port = urlparse(url).hostname, urlparse(url).port
        self.stop = stop
        self.answers: collections.Counter = collections.Counter()
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []
        self.sockets: list[socket.socket] = []

    def count(self, what) -> None:
        with self.lock:
            self.answers[str(what)] += 1

    def spawn(self, target, *args) -> None:
        thread = threading.Thread(target=self._guarded, args=(target, *args), daemon=True)
        thread.start()
        self.threads.append(thread)

    def _guarded(self, target, *args) -> None:
        try:
            target(*args)
        except Exception as error:  # an attacker's failure is data, not a crash of the benchmark
            self.count(type(error).__name__)

    def connect(self, receive_buffer: int | None = None) -> socket.socket:
        sock = socket.socket()
        if receive_buffer:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.settimeout(10)
        sock.connect((self.host, self.port))
        self.sockets.append(sock)
        return sock

    def finish(self) -> dict:
        for sock in self.sockets:
            sock.close()
        for thread in self.threads:
            thread.join(timeout=15)
        return dict(self.answers)


def connection_flood(attack: Attack) -> None:
    sha = requests.get(attack.url + "/v1/status", timeout=10).json()["model"]["sha256"]
    pipelined = f"GET /v1/checkpoints/{sha} HTTP/1.1\r\nHost: x\r\n\r\n".encode() * 50

    def hold_idle(count: int) -> None:
        while count > 0 and not attack.stop.is_set():
            try:
                attack.connect()
                attack.count("idle connection opened")
            except OSError as error:
                attack.count(f"connect failed: {error.errno}")
            count -= 1
        attack.stop.wait()

    def pipeline() -> None:
        while not attack.stop.is_set():
            try:
                attack.connect(receive_buffer=4096).sendall(pipelined)
                attack.count("50 pipelined GETs, never read")
            except OSError as error:
                attack.count(f"pipelining failed: {error.errno}")
            attack.stop.wait(1.0)

    for _ in range(4):
        attack.spawn(hold_idle, 500)
    for _ in range(40):
        attack.spawn(pipeline)


def stalled_bodies(attack: Attack) -> None:
    def stall(authorization: str) -> None:
        while not attack.stop.is_set():
            sock = attack.connect()
            sock.sendall(
                f"POST /v1/rounds/1/updates HTTP/1.1\r\nHost: x\r\n{authorization}Content-Type: application/octet-stream\r\n"
                "Content-Length: 60000000\r\n\r\n".encode()
            )
            try:
                status = sock.recv(64).split(b" ")[1].decode()
                attack.count(f"60 MB announced, answered {status} before any body byte")
            except (OSError, IndexError):
                attack.count("60 MB announced, no answer")
            attack.stop.wait(0.5)

    def trickle() -> None:
        while not attack.stop.is_set():
            sock = attack.connect()
            for byte in b"GET /v1/status HTTP/1.1\r\nX-Slowly: " + b"a" * 10_000:
                try:
                    sock.sendall(bytes([byte]))
                except OSError:
                    attack.count("trickling headers: closed by the server")
                    break
                if attack.stop.wait(0.5):
                    return

    for i in range(200):
        attack.spawn(stall, "" if i % 2 else "Authorization: Bearer not-a-device\r\n")
    for _ in range(50):
        attack.spawn(trickle)


def never_reporting(attack: Attack, honest: int) -> None:
    def take_and_vanish() -> None:
        session = requests.Session()
        token = session.post(attack.url + "/v1/devices", timeout=10).json()["token"]
        session.headers["Authorization"] = f"Bearer {token}"
        while not attack.stop.is_set():
            answer = session.post(attack.url + "/v1/checkin", timeout=30).json()
            attack.count(f"checkin: {answer['status']} {answer.get('reason') or ''}".strip())
            attack.stop.wait(min(answer.get("retry_after") or 0.05, 0.2))

    for _ in range(2 * honest):
        attack.spawn(take_and_vanish)


def registration_flood(attack: Attack) -> None:
    def register() -> None:
        session = requests.Session()
        while not attack.stop.is_set():
            attack.count(f"register: {session.post(attack.url + '/v1/devices', timeout=10).status_code}")

    for _ in range(8):
        attack.spawn(register)


def overflowing_updates(attack: Attack) -> None:
    spec = model_spec(CONFIG.model, CONFIG.dataset)
    names = [s.name for s in spec]
    huge = [np.full(s.shape, 3e38, np.float32) for s in spec]
    at_bound = [np.full(s.shape, 1e6 * (-1) ** i, np.float32) for i, s in enumerate(spec)]
    bodies = [
        wire.encode(names, huge, {"num_examples": "1000000000", "metrics": "{}"}),
        wire.encode(names, at_bound, {"num_examples": "1000000000", "metrics": json.dumps({"holdout_examples": 10**308})}),
        wire.encode(names, at_bound, {"num_examples": "1000000000", "metrics": "[" * 50_000}),
        wire.encode(
            names, at_bound, {"num_examples": "1000000000", "metrics": json.dumps({"train_loss": 1e12, "train_accuracy": 1.0})}
        ),
    ]

    def poison() -> None:
        session = requests.Session()
        token = session.post(attack.url + "/v1/devices", timeout=10).json()["token"]
        session.headers["Authorization"] = f"Bearer {token}"
        sent = 0
        while not attack.stop.is_set():
            answer = session.post(attack.url + "/v1/checkin", timeout=30).json()
            if answer["status"] == "task":
                for body in bodies[sent % 2 * 2 : sent % 2 * 2 + 2]:  # refused, then (last) one within the bounds
                    response = session.post(
                        f"{attack.url}/v1/rounds/{answer['task']['round_id']}/updates",
                        data=body,
                        headers={"Content-Type": "application/octet-stream"},
                        timeout=30,
                    )
                    attack.count(f"upload: {response.status_code} {response.json().get('error', 'accepted')}")
                sent += 1
            attack.stop.wait(answer.get("retry_after") or 0.5)

    for _ in range(2):
        attack.spawn(poison)


def strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"bare {constant}")

    return json.loads(text, parse_constant=refuse)


def probe(url: str, stop: threading.Event, latencies: list, failures: collections.Counter) -> None:
    while not stop.is_set():
        started = time.monotonic()
        try:
            with requests.Session() as session:  # a new client each time
                response = session.get(url + "/v1/status", timeout=5)
            strict_json(response.text)
            latencies.append(time.monotonic() - started) if response.status_code == 200 else failures.update(
                [response.status_code]
            )
        except Exception as error:
            failures.update([type(error).__name__])
        stop.wait(0.1)


def sample_server(pid: int, stop: threading.Event, peaks: dict) -> None:
    process = psutil.Process(pid)
    while not stop.is_set():
        try:
            peaks["open_files"] = max(peaks.get("open_files", 0), process.num_fds())
            peaks["rss_mb"] = max(peaks.get("rss_mb", 0.0), process.memory_info().rss / 2**20)
        except psutil.Error:
            return
        stop.wait(0.25)


def percentile(values: list[float], q: float) -> float | None:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else None


def run_scenario(name: str, seconds: float, devices: int, out: Path, serve_flags: list[str]) -> dict:
    attack_name = name.removesuffix(TWO_WORKERS)
    serve_flags = [*serve_flags, *(["--workers", "2"] if name.endswith(TWO_WORKERS) else [])]
    print(f"{name}: starting a coordinator ({' '.join(serve_flags)}) and {devices} device processes", flush=True)
    with federation(
        out / name, CONFIG, count=devices, partition="iid", data_seed=0, serve_flags=["--no-publish", *serve_flags]
    ) as fed:
        deadline = time.monotonic() + 300
        while not requests.get(fed.url + "/v1/status", timeout=10).json()["history"]:
            if time.monotonic() > deadline:
                raise RuntimeError("no round committed within 300 s")
            time.sleep(0.5)
        stop = threading.Event()
        attack = Attack(fed.url, stop)
        latencies: list[float] = []
        failures: collections.Counter = collections.Counter()
        peaks: dict = {}
        watchers = [
            threading.Thread(target=probe, args=(fed.url, stop, latencies, failures), daemon=True),
            threading.Thread(target=sample_server, args=(fed.server.pid, stop, peaks), daemon=True),
        ]
        for watcher in watchers:
            watcher.start()
        started = time.time()
        if attack_name == "never_reporting":
            never_reporting(attack, devices)
        elif attack_name != "clean":
            globals()[attack_name](attack)
        print(f"{name}: attacking for {seconds:.0f} s", flush=True)
        stop.wait(seconds)
        ended = time.time()
        stop.set()
        answers = attack.finish()
        for watcher in watchers:
            watcher.join(timeout=15)
        server_alive = fed.server.poll() is None
        try:
            rounds = strict_json(requests.get(fed.url + "/v1/rounds", timeout=30).text)["rounds"]
            status = strict_json(requests.get(fed.url + "/v1/status", timeout=30).text)
            weights, _ = wire.decode(
                requests.get(fed.url + status["model"]["url"], timeout=30).content, model_spec(CONFIG.model, CONFIG.dataset)
            )
        except (requests.RequestException, ValueError, KeyError) as error:  # a coordinator that died or answers nonsense
            print(f"{name}: the coordinator cannot be read after the attack: {error}", flush=True)
            rounds, status, weights = [], {"model": {"version": None}, "devices": None, "history": []}, None
    committed = [r for r in rounds if r["status"] == "committed" and r["committed_at"] and started <= r["committed_at"] <= ended]
    abandoned = [r for r in rounds if r["status"] == "abandoned" and r["closed_at"] and started <= r["closed_at"] <= ended]
    result = {
        "scenario": name,
        "window_s": round(ended - started, 1),
        "rounds_committed": len(committed),
        "rounds_per_minute": round(len(committed) * 60 / (ended - started), 2),
        "rounds_abandoned": len(abandoned),
        "abandon_reasons": dict(collections.Counter(r.get("abandon_reason") for r in abandoned)),
        "status_probes": len(latencies) + sum(failures.values()),
        "status_p50_ms": percentile(latencies, 0.5),
        "status_p99_ms": percentile(latencies, 0.99),
        "status_failures": dict(failures),
        "server_peak_open_files": peaks.get("open_files"),
        "server_peak_rss_mb": round(peaks.get("rss_mb", 0.0), 1),
        "server_alive": server_alive,
        "model_version": status["model"]["version"],
        "model_finite": None if weights is None else bool(all(np.isfinite(w).all() for w in weights)),
        "final_accuracy": status["history"][-1]["accuracy"] if status["history"] else None,
        "updates_left_out": sum(((r["metrics"] or {}).get("excluded_updates") or {}).get("count", 0) for r in committed),
        "devices_registered": status["devices"],
        "attacker_answers": answers,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "attacker_answers"}), flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="attack window per scenario (default 60)")
    parser.add_argument("--devices", type=int, default=6, help="honest device processes (default 6)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated, of " + ", ".join(SCENARIOS))
    parser.add_argument("--serve-flags", default="", help="more flags for edgefl serve, e.g. '--workers 2'")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "hostile.json")
    args = parser.parse_args()
    chosen = args.scenarios.split(",")
    if set(chosen) - set(SCENARIOS):
        parser.error(f"unknown scenarios: {', '.join(sorted(set(chosen) - set(SCENARIOS)))}")
    results = []
    with tempfile.TemporaryDirectory(prefix="edgefl-hostile-") as tmp:
        for name in chosen:
            results.append(run_scenario(name, args.seconds, args.devices, Path(tmp), args.serve_flags.split()))
    clean = {r["scenario"]: r["rounds_per_minute"] for r in results if r["scenario"].startswith("clean")}
    for r in results:
        baseline = clean.get("clean" + (TWO_WORKERS if r["scenario"].endswith(TWO_WORKERS) else ""))
        r["of_clean"] = round(r["rounds_per_minute"] / baseline, 2) if baseline else None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "machine": {"cpus": psutil.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
                "config": json.loads(CONFIG.to_json()),
                "serve_flags": args.serve_flags,
                "honest_devices": args.devices,
                "seconds": args.seconds,
                "results": results,
            },
            indent=2,
        )
    )
    print(
        f"\n{'scenario':<20} {'rounds/min':>10} {'of clean':>8} {'abandoned':>9} {'status p99':>10} {'fails':>5} {'fds':>5}"
        f" {'RSS MB':>7} {'alive':>5} {'finite':>6} accuracy"
    )
    for r in results:
        p99 = f"{r['status_p99_ms']:.0f} ms" if r["status_p99_ms"] is not None else "-"
        print(
            f"{r['scenario']:<20} {r['rounds_per_minute']:>10} {r['of_clean'] or '-':>8} {r['rounds_abandoned']:>9} {p99:>10}"
            f" {sum(r['status_failures'].values()):>5} {r['server_peak_open_files'] or '-':>5} {r['server_peak_rss_mb']:>7}"
            f" {r['server_alive']!s:>5} {r['model_finite']!s:>6} {r['final_accuracy']}"
        )
    print(f"saved {args.out}")
    return 0 if all(r["server_alive"] and r["model_finite"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
