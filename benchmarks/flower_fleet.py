"""The Flower side of the edgefl-versus-Flower benchmark: one FedAvg run in Flower's
simulation engine (Ray backend) on a workload that edgefl's side writes to a ``.npz``.

Runs in Flower's own venv (``benchmarks/flower_env.py`` makes it; Keras 3, numpy 2,
``flwr[simulation]``), never in edgefl's, so it imports nothing of edgefl or TFF:

    FLOWER_PY -m benchmarks.flower_fleet --data DATA.npz --out RESULT.json \\
        [--rounds 10] [--cohort 100] [--actors 2] [--epochs 1] [--batch-size 10] [--lr 0.05] [--seed 0]

from the repository root: ``benchmarks`` has no ``__init__.py`` and is imported as a
namespace package from the working directory (``python -m`` puts it first on
``sys.path``); Flower's Ray backend hands the driver's ``sys.path`` to its workers in
``PYTHONPATH``, so the actors import this module by the same name.

The data file holds ``x`` (uint8 pixels 0..255, or floats already in [0, 1]) with shape
(examples, 28, 28), ``y``, ``client_offsets`` (num_clients + 1 boundaries into x and y),
``test_x``, ``test_y``, ``num_clients`` and ``init_0``, ``init_1``, ... (the initial
weights in Keras ``get_weights()`` order for edgefl's ``cnn_small``).
``make_test_data`` writes such a file from Debian's Fashion-MNIST for smoke tests.

What is measured: seconds per round as seen by the ServerApp (from the end of one
centralized evaluation to the end of the next, so a round is training, aggregation and
evaluation; round 1 also holds the actors' TensorFlow import and whatever is left of
Ray's start-up), the test-set accuracy and loss after each round, the simulation's wall
seconds, and the peak RSS and CPU seconds of this process and every process it starts
(``ProcessTree``). Everything started is checked to be gone at the end; anything left is
listed under ``survivors`` and killed.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import resource
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
import warnings
from pathlib import Path

import numpy as np

# Before TensorFlow, flwr or ray are imported, here and in every Ray worker (which
# import this module, and inherit the driver's environment through the raylet).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # flwr would post events to telemetry.flower.ai
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
RUN_MARKER = "EDGEFL_FLOWER_FLEET_RUN"  # environment variable tagging every process of one run
IMAGE_SHAPE = (28, 28, 1)
NUM_CLASSES = 10


# --- Model and data, shared by the driver and the Ray actors ---------------------------------
#
# These live at module level in an importable module on purpose: Ray pickles functions
# of ``__main__`` by value, so a ClientApp defined there would arrive in the actor with
# fresh globals on every call and rebuild its model and reload its data each time
# (rounds took minutes). Defined here, they are pickled by reference and the caches
# below live as long as the actor process.

_TF_CONFIGURED = False
_MODELS: dict[float, object] = {}  # learning rate -> compiled model, one per process
_DATA: dict[str, object] = {}  # the client data this process has opened


def _keras(threads: int = 0):
    """Keras, after TensorFlow's thread pools are set (``threads`` 0 leaves TF's default).
    Thread counts can only be set before TensorFlow's runtime starts, hence once per process."""
    global _TF_CONFIGURED
    import tensorflow as tf

    if not _TF_CONFIGURED:
        tf.get_logger().setLevel("ERROR")
        if threads:
            try:
                tf.config.threading.set_intra_op_parallelism_threads(threads)
                tf.config.threading.set_inter_op_parallelism_threads(threads)
            except RuntimeError:  # the runtime had already started in this process
                pass
        _TF_CONFIGURED = True
    import keras

    return keras


def build_model(lr: float, threads: int = 0):
    """edgefl's ``cnn_small``, compiled for plain SGD on logits."""
    keras = _keras(threads)
    layers = keras.layers
    model = keras.Sequential(
        [
            keras.Input(shape=IMAGE_SHAPE),
            layers.Conv2D(16, 3, padding="same", activation="relu"),
            layers.MaxPool2D(2),
            layers.Conv2D(32, 3, padding="same", activation="relu"),
            layers.MaxPool2D(2),
            layers.Flatten(),
            layers.Dense(32, activation="relu"),
            layers.Dense(NUM_CLASSES),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=lr),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def _actor_model(lr: float):
    """The one compiled model of this actor: plain SGD keeps no state between clients,
    so set_weights + fit on a reused model equals a fresh one, without re-tracing."""
    if lr not in _MODELS:
        _MODELS[lr] = build_model(lr, threads=1)
    return _MODELS[lr]


def _images(x: np.ndarray) -> np.ndarray:
    """(n, 28, 28) pixels to float32 (n, 28, 28, 1) in [0, 1]."""
    x = np.asarray(x)
    x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    return x.reshape((-1, *IMAGE_SHAPE))


def _client_data(data_dir: str, partition: int) -> tuple[np.ndarray, np.ndarray]:
    """One client's examples, from .npy files memory-mapped once per process (the page
    cache is shared between actors; each reads only the clients it trains)."""
    if _DATA.get("dir") != data_dir:
        _DATA.clear()
        _DATA.update(
            dir=data_dir,
            x=np.load(Path(data_dir) / "x.npy", mmap_mode="r"),
            y=np.load(Path(data_dir) / "y.npy", mmap_mode="r"),
            offsets=np.load(Path(data_dir) / "client_offsets.npy"),
        )
    start, end = int(_DATA["offsets"][partition]), int(_DATA["offsets"][partition + 1])
    return _images(_DATA["x"][start:end]), np.asarray(_DATA["y"][start:end], dtype=np.int64)


def _train(msg, context):
    """The ClientApp's train function: local SGD from the global weights, shuffled with
    a seed of its own per (run seed, round, client)."""
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    started = time.monotonic()
    config = msg.content["config"]
    partition = int(context.node_config["partition-id"])
    x, y = _client_data(str(config["data"]), partition)
    model = _actor_model(float(config["lr"]))
    model.set_weights(msg.content["arrays"].to_numpy_ndarrays())
    rng = np.random.default_rng([int(config["seed"]), int(config["server-round"]), partition])
    loss = float("nan")
    for _ in range(int(config["epochs"])):
        order = rng.permutation(len(y))
        history = model.fit(x[order], y[order], batch_size=int(config["batch-size"]), epochs=1, shuffle=False, verbose=0)
        loss = float(history.history["loss"][-1])
    reply = RecordDict(
        {
            "arrays": ArrayRecord([np.asarray(w) for w in model.get_weights()]),
            # FedAvg averages these over the cohort (weighted by num-examples).
            "metrics": MetricRecord({"num-examples": len(y), "train-loss": loss, "train-seconds": time.monotonic() - started}),
        }
    )
    return Message(content=reply, reply_to=msg)


# --- Test data for smoke runs ----------------------------------------------------------------


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped) as a uint8 array of its dimensions."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def make_test_data(path: Path | str, num_clients: int, per_client: int = 60, seed: int = 0) -> Path:
    """Write a benchmark data file from Debian's Fashion-MNIST: IID, ``per_client``
    random training images for each client, the full test set, Keras-initialised
    weights. For smoke tests; the benchmark proper gets its file from edgefl's side."""
    train_x = _read_idx(FASHION_MNIST / "train-images-idx3-ubyte.gz")
    train_y = _read_idx(FASHION_MNIST / "train-labels-idx1-ubyte.gz")
    if num_clients * per_client > len(train_y):
        raise ValueError(f"{num_clients} clients x {per_client} examples exceed the {len(train_y)} training images")
    order = np.random.default_rng(seed).permutation(len(train_y))[: num_clients * per_client]
    keras = _keras()
    keras.utils.set_random_seed(seed)
    weights = build_model(0.05).get_weights()
    path = Path(path)
    np.savez(
        path,
        x=train_x[order],
        y=train_y[order].astype(np.int64),
        client_offsets=np.arange(0, num_clients * per_client + 1, per_client, dtype=np.int64),
        test_x=_read_idx(FASHION_MNIST / "t10k-images-idx3-ubyte.gz"),
        test_y=_read_idx(FASHION_MNIST / "t10k-labels-idx1-ubyte.gz").astype(np.int64),
        num_clients=np.int64(num_clients),
        **{f"init_{i}": np.asarray(w, dtype=np.float32) for i, w in enumerate(weights)},
    )
    return path


# --- Resource figures of the whole process tree ---------------------------------------------


class ProcessTree:
    """Peak RSS and CPU seconds of this process and every process it starts, from /proc
    (psutil is not a dependency of Flower's venv; Ray only vendors a copy).

    A process counts as ours if it descends from this one or carries ``RUN_MARKER`` with
    this run's value in its environment: Ray 2.55 starts gcs_server, raylet and its
    agents as children of the driver and the workers as children of the raylet, so the
    tree alone suffices today, and the marker (inherited by anything Ray might
    daemonize, which would be re-parented away from us) keeps that true if it changes.

    RSS: every ``interval`` seconds the RSS of all our processes is summed; the peak of
    the sums is reported. Pages shared between processes (the actors' TensorFlow
    libraries, the memory-mapped data, Ray's object store) count once per process that
    maps them, as in any sum of RSS.

    CPU: the kernel's own accounting is exact only for processes that exited and were
    waited for along a chain of parents up to us (``RUSAGE_CHILDREN``); a process reaped
    by someone else, or whose parent ignores SIGCHLD, leaves no trace there. So both are
    kept: ``cpu_s`` is this process's exact ``RUSAGE_SELF`` plus, for every other process
    seen, its user+system time at its last sample (missing at most the last ``interval``
    of each process's life, and processes that lived less than that); ``cpu_s_rusage`` is
    ``RUSAGE_SELF`` + ``RUSAGE_CHILDREN`` + the last sample of any process still alive or
    outside our tree, as a cross-check (it comes out lower when, at ``ray.shutdown()``,
    the raylet goes before its workers: they are re-parented and reaped by init, and the
    last samples of the processes seen outside the tree cover them only partly). The
    sampling thread's own CPU time (``monitor_cpu_s``) is left out of both.

    Names are the kernel's (``comm``, 15 characters: ``ray::ClientAppA`` are the actors,
    ``python`` Ray's autoscaler monitor, dashboard head (started even without the dashboard)
    and log monitor) and ``driver`` for this process.
    """

    def __init__(self, marker: str, interval: float = 0.2) -> None:
        self.root = os.getpid()
        self.interval = interval
        self._marker = f"{RUN_MARKER}={marker}".encode()
        self._tick = os.sysconf("SC_CLK_TCK")
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._marked: dict[tuple[int, int], bool] = {}  # (pid, start time) -> carries the marker
        self.ticks: dict[tuple[int, int], int] = {}  # last user+system ticks of each process of ours
        self.names: dict[tuple[int, int], str] = {}
        self.outside: set[tuple[int, int]] = set()  # ours by the marker, not by descent
        self.rss = 0  # at the latest sample
        self.monitor_cpu_s = 0.0  # CPU time of the sampling thread
        self.peak_rss = 0
        self.peak_breakdown: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="process-tree", daemon=True)

    def start(self) -> ProcessTree:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()
            self.monitor_cpu_s = time.thread_time()

    def _carries_marker(self, key: tuple[int, int]) -> bool:
        if key not in self._marked:
            try:
                with open(f"/proc/{key[0]}/environ", "rb") as f:
                    self._marked[key] = self._marker in f.read().split(b"\0")
            except OSError:
                self._marked[key] = False
        return self._marked[key]

    def sample(self) -> list[dict]:
        """Take one sample; return our live processes other than this one."""
        table = {}  # pid -> (ppid, start, state, ticks, rss bytes, name)
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    raw = f.read()
            except OSError:  # gone meanwhile
                continue
            head, _, tail = raw.rpartition(b") ")
            fields = tail.split()
            # Fields after the name: state, ppid, ... utime (14th of the line), stime, ...,
            # starttime (22nd), vsize, rss in pages (24th).
            table[int(entry)] = (
                int(fields[1]),
                int(fields[19]),
                fields[0].decode(),
                int(fields[11]) + int(fields[12]),
                int(fields[21]) * self._page,
                head.partition(b" (")[2].decode(errors="replace"),
            )
        children: dict[int, list[int]] = {}
        for pid, row in table.items():
            children.setdefault(row[0], []).append(pid)
        ours, todo = set(), [self.root]
        while todo:
            pid = todo.pop()
            if pid in table and pid not in ours:
                ours.add(pid)
                todo.extend(children.get(pid, ()))
        with self._lock:
            for pid, row in table.items():
                if pid not in ours and self._carries_marker((pid, row[1])):
                    ours.add(pid)
                    self.outside.add((pid, row[1]))
            total, by_name, alive = 0, {}, []
            for pid in ours:
                _, start, state, ticks, rss, name = table[pid]
                name = "driver" if pid == self.root else name
                key = (pid, start)
                self.ticks[key] = ticks
                self.names[key] = name
                total += rss
                by_name[name] = by_name.get(name, 0) + rss
                if pid != self.root and state != "Z":
                    alive.append({"pid": pid, "ppid": table[pid][0], "name": name, "start": start})
            self.rss = total
            if total > self.peak_rss:
                self.peak_rss = total
                self.peak_breakdown = {k: round(v / 2**20, 1) for k, v in sorted(by_name.items(), key=lambda kv: -kv[1])}
        return alive

    def cpu_seconds(self, alive: list[dict]) -> tuple[float, float]:
        """(cpu_s, cpu_s_rusage) as the class docstring describes them."""
        me = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        own = me.ru_utime + me.ru_stime - self.monitor_cpu_s
        with self._lock:
            others = {k: t for k, t in self.ticks.items() if k[0] != self.root}
            not_reaped_by_us = self.outside | {(p["pid"], p["start"]) for p in alive}
            sampled = own + sum(others.values()) / self._tick
            rusage = own + kids.ru_utime + kids.ru_stime + sum(t for k, t in others.items() if k in not_reaped_by_us) / self._tick
        return sampled, rusage

    def cpu_breakdown(self) -> dict[str, float]:
        """Sampled CPU seconds by process name (this process's exact, as ``driver``, without the monitor's)."""
        me = resource.getrusage(resource.RUSAGE_SELF)
        out = {"driver": me.ru_utime + me.ru_stime - self.monitor_cpu_s}
        with self._lock:
            for key, ticks in self.ticks.items():
                if key[0] != self.root:
                    out[self.names[key]] = out.get(self.names[key], 0.0) + ticks / self._tick
        return {k: round(v, 2) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _reap_survivors(tree: ProcessTree, wait_s: float = 10.0) -> list[dict]:
    """Wait for our processes to go after ``ray.shutdown()``; list and kill any that stay."""
    deadline = time.monotonic() + wait_s
    while (alive := tree.sample()) and time.monotonic() < deadline:
        time.sleep(0.2)
    survivors = [{"pid": p["pid"], "ppid": p["ppid"], "name": p["name"], "cmdline": _cmdline(p["pid"])} for p in alive]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in alive:
            try:
                os.kill(p["pid"], sig)
            except ProcessLookupError:
                pass
        time.sleep(2.0)
        if not (alive := tree.sample()):
            break
    for p in survivors:  # ours to reap if they were our children
        try:
            os.waitpid(p["pid"], os.WNOHANG)
        except ChildProcessError:
            pass
    return survivors


# --- The run ---------------------------------------------------------------------------------


def _extract(data: Path, work: Path) -> dict:
    """Split the .npz into what the driver keeps (test set, initial weights) and .npy
    files the actors memory-map (a .npz member cannot be memory-mapped)."""
    with np.load(data) as npz:
        for name in ("x", "y", "client_offsets"):
            np.save(work / f"{name}.npy", npz[name])
        init_keys = sorted((k for k in npz.files if k.startswith("init_")), key=lambda k: int(k.removeprefix("init_")))
        offsets = npz["client_offsets"]
        num_clients = int(npz["num_clients"]) if "num_clients" in npz.files else len(offsets) - 1
        if len(offsets) != num_clients + 1:
            raise ValueError(f"{data}: {len(offsets)} client offsets for {num_clients} clients")
        return {
            "num_clients": num_clients,
            "examples": int(offsets[-1]),
            "test_x": _images(npz["test_x"]),
            "test_y": np.asarray(npz["test_y"], dtype=np.int64),
            "init": [np.asarray(npz[k], dtype=np.float32) for k in init_keys],
        }


def run(args: argparse.Namespace) -> dict:
    """One simulation; the result dict written to ``--out``."""
    script_started = time.monotonic()
    marker = uuid.uuid4().hex
    os.environ[RUN_MARKER] = marker
    tree = ProcessTree(marker).start()
    work = Path(tempfile.mkdtemp(prefix="flower-fleet-"))
    try:
        data = _extract(Path(args.data), work)
        num_clients = data["num_clients"]
        if not 0 < args.cohort <= num_clients:
            raise SystemExit(f"--cohort must be in 1..{num_clients}")

        warnings.filterwarnings("ignore", category=FutureWarning, module=r"ray\..*")
        import logging

        import flwr
        import ray
        import tensorflow as tf
        from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
        from flwr.clientapp import ClientApp
        from flwr.serverapp import ServerApp
        from flwr.serverapp.strategy import FedAvg
        from flwr.simulation import run_simulation

        logging.getLogger("flwr").setLevel(logging.WARNING)  # flwr logs a dozen INFO lines a round

        # Server-side evaluation model, in the driver; TF's default thread pools here:
        # it runs between rounds, while the actors are idle.
        server_model = build_model(args.lr, threads=args.server_threads)
        shapes = [w.shape for w in server_model.get_weights()]
        if [w.shape for w in data["init"]] != shapes:
            raise SystemExit(f"{args.data}: init_* shapes {[w.shape for w in data['init']]} are not cnn_small's {shapes}")

        marks: list[float] = []  # monotonic time at the end of each centralized evaluation, round 0 first
        eval_seconds: list[float] = []
        rss_mb: list[float] = []  # whole tree, at the end of each round
        train_metrics: list[dict] = []  # the cohort's mean train-loss and train-seconds, per round
        accuracy: list[float] = []
        loss: list[float] = []

        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            """Centralized evaluation on the whole test set; called by FedAvg.start before
            round 1 and after each round's aggregation, so it is also the round clock."""
            started = time.monotonic()
            server_model.set_weights(arrays.to_numpy_ndarrays())
            res = server_model.evaluate(data["test_x"], data["test_y"], batch_size=1000, verbose=0, return_dict=True)
            now = time.monotonic()
            eval_seconds.append(now - started)
            accuracy.append(float(res["accuracy"]))
            loss.append(float(res["loss"]))
            if marks:
                print(
                    f"flower round {server_round}/{args.rounds}: accuracy {res['accuracy']:.4f}, "
                    f"loss {res['loss']:.4f}, {now - marks[-1]:.2f}s",
                    flush=True,
                )
            else:
                print(f"flower initial model: accuracy {res['accuracy']:.4f}, loss {res['loss']:.4f}", flush=True)
            marks.append(now)
            rss_mb.append(round(tree.rss / 2**20, 1))
            return MetricRecord({"accuracy": float(res["accuracy"]), "loss": float(res["loss"])})

        failures: list[list[str]] = []  # per round, the reasons of the replies that carried an error

        class CountingFedAvg(FedAvg):
            """FedAvg that keeps the failed replies: FedAvg itself only logs them (at INFO,
            silenced above) and averages whatever succeeded, so a broken client would
            otherwise pass for a slow or fast round."""

            def aggregate_train(self, server_round, replies):
                replies = list(replies)
                failures.append([m.error.reason for m in replies if m.has_error()])
                if failures[-1]:
                    print(f"flower round {server_round}: {len(failures[-1])} failed clients: {failures[-1][0]}", flush=True)
                return super().aggregate_train(server_round, replies)

        server_app = ServerApp()

        @server_app.main()
        def _server_main(grid, context) -> None:
            strategy = CountingFedAvg(
                # configure_train samples max(int(num_nodes * fraction_train), min_train_nodes):
                # int() truncates, so this is exactly the cohort.
                fraction_train=args.cohort / num_clients,
                min_train_nodes=args.cohort,
                fraction_evaluate=0.0,  # no client-side evaluation
                min_available_nodes=num_clients,
            )
            result = strategy.start(
                grid=grid,
                initial_arrays=ArrayRecord(data["init"]),
                num_rounds=args.rounds,
                train_config=ConfigRecord(
                    {"data": str(work), "lr": args.lr, "epochs": args.epochs, "batch-size": args.batch_size, "seed": args.seed}
                ),
                evaluate_fn=evaluate,
            )
            train_metrics.extend(dict(result.train_metrics_clientapp[r]) for r in sorted(result.train_metrics_clientapp))

        client_app = ClientApp()
        client_app.train()(_train)  # _train is this module's, so Ray pickles it by reference

        random.seed(args.seed)  # FedAvg samples the cohort with random.sample (node ids are random per run)
        backend_config = {
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            # One CPU a client and `actors` CPUs for Ray: exactly `actors` actors.
            "init_args": {"num_cpus": args.actors, "num_gpus": 0, "include_dashboard": False},
        }
        sim_started = time.monotonic()
        try:
            run_simulation(
                server_app=server_app, client_app=client_app, num_supernodes=num_clients, backend_config=backend_config
            )
        finally:
            sim_wall = time.monotonic() - sim_started
            ray.shutdown()  # Flower's Ray backend already did; harmless if so
            survivors = _reap_survivors(tree)
            shutdown_s = time.monotonic() - sim_started - sim_wall
        if len(marks) != args.rounds + 1:
            raise RuntimeError(f"the simulation ended after {len(marks) - 1} of {args.rounds} rounds")
    finally:
        tree.stop()
        shutil.rmtree(work, ignore_errors=True)

    alive = tree.sample()
    cpu_s, cpu_s_rusage = tree.cpu_seconds(alive)
    round_seconds = [b - a for a, b in zip(marks, marks[1:])]
    return {
        "framework": "flower",
        "flower_version": flwr.__version__,
        "ray_version": ray.__version__,
        "tensorflow_version": tf.__version__,
        "keras_version": _keras().__version__,
        "python": sys.version.split()[0],
        "settings": {
            "data": str(args.data),
            "num_clients": num_clients,
            "examples": data["examples"],
            "rounds": args.rounds,
            "cohort": args.cohort,
            "actors": args.actors,
            "client_num_cpus": 1,
            "tf_threads_per_actor": 1,
            "server_tf_threads": args.server_threads or "default",
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "seed": args.seed,
            "model": "cnn_small",
            "optimizer": "sgd",
            "api": "flwr.simulation.run_simulation + ServerApp(main: flwr.serverapp.strategy.FedAvg.start) + ClientApp(train)",
            "backend": "ray",
        },
        "round_seconds": round_seconds,
        "first_round_s": round_seconds[0],
        "steady_round_s": statistics.median(round_seconds[1:]) if len(round_seconds) > 1 else None,
        "evaluation_seconds": eval_seconds[1:],
        "startup_s": marks[0] - sim_started,  # run_simulation called -> initial evaluation done
        "initial_accuracy": accuracy[0],
        "initial_loss": loss[0],
        "accuracy": accuracy[1:],
        "loss": loss[1:],
        "peak_rss_mb": round(tree.peak_rss / 2**20, 1),
        "peak_rss_breakdown_mb": tree.peak_breakdown,
        "client_failures": [len(f) for f in failures],
        "client_train_loss": [m["train-loss"] for m in train_metrics],
        # Mean seconds of one client's train function in an actor (fit plus set/get weights and data)
        "client_train_s": [m["train-seconds"] for m in train_metrics],
        "rss_mb_after_round": rss_mb[1:],
        "processes_seen": len(tree.ticks),
        "processes_outside_tree": sorted({tree.names[k] for k in tree.outside}),
        "cpu_s": round(cpu_s, 2),
        "cpu_s_rusage": round(cpu_s_rusage, 2),
        "cpu_s_by_process": tree.cpu_breakdown(),
        "monitor_cpu_s": round(tree.monitor_cpu_s, 2),
        "wall_s": sim_wall,
        "shutdown_s": shutdown_s,  # run_simulation returned -> every process started gone (or killed)
        "script_wall_s": time.monotonic() - script_started,
        "survivors": survivors,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help=".npz written by the caller (see the module docstring)")
    parser.add_argument("--out", required=True, help="result JSON")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--cohort", type=int, default=100, help="clients trained per round")
    parser.add_argument("--actors", type=int, default=2, help="Ray actors (CPUs given to Ray, one per client)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--server-threads", type=int, default=0, help="TF threads of the driver's evaluation (0: TF's default)")
    args = parser.parse_args(argv)
    result = run(args)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"flower: {args.rounds} rounds, first {result['first_round_s']:.2f}s, steady {result['steady_round_s'] or float('nan'):.2f}s, "
        f"accuracy {result['accuracy'][-1]:.4f}, peak RSS {result['peak_rss_mb']:.0f} MB, CPU {result['cpu_s']:.1f}s, "
        f"wall {result['wall_s']:.1f}s -> {args.out}",
        flush=True,
    )
    if result["survivors"]:
        print(f"flower: killed processes that outlived the simulation: {result['survivors']}", file=sys.stderr, flush=True)
    if any(result["client_failures"]):
        print(f"flower: client failures per round: {result['client_failures']}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    # Run as `python -m benchmarks.flower_fleet`, this file is __main__; hand over to the
    # same code imported under its real name so everything Ray pickles refers to
    # `benchmarks.flower_fleet`, which the actors can import (see the module docstring).
    from benchmarks.flower_fleet import main as _main

    sys.exit(_main())
