"""A device host: many device agents in one OS process (``python -m device_sim``).

The host loads the dataset and partitions it once for all its agents (each gets its
shard), and runs them with a scheduler instead of a thread per device: a heap of
wake-up times on the main thread, ``threads`` training threads (each with its own
learners: a Keras model per model name, a LiteRT interpreter per training file) and a
network threads in two pools: check-ins, which the coordinator's lobby may hold for
seconds, and transfers (registration, downloads, uploads), which never queue behind
them. An agent waiting out a ``retry_after`` holds no thread at all, so a thousand
waiting devices cost a heap entry each; a held check-in holds a polling thread, never
a training or a transfer one.

What belongs to the process, not to a device, is recorded here into each device's
summary (``device-XXXX.json``): its start-up (process start to imports done, plus
getting its first learner), the process's peak RSS, whether TensorFlow was imported,
and how many devices shared the process. One device per process stays the default
(``edgefl devices --per-process``), so those figures still describe one phone.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import logging
import os
import queue
import resource
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

from device_sim import settings as device_settings
from device_sim.agent import DeviceAgent, holdout_split
from device_sim.network import flaky_or_none
from device_sim.profile import behaviour_of, load_profile
from device_sim.settings import DeviceSettings
from edgefl import logs, wire
from edgefl.client import CoordinatorClient, CoordinatorUnreachable, ProtocolError, TrainingModel
from edgefl.datasets import device_shards, load_dataset
from edgefl.learner import Learner
from edgefl.models import DataShape

log = logging.getLogger("edgefl.device")

SECRET_ENV = "EDGEFL_ENROLMENT_SECRET"  # to the hosts, not on their command lines
_MAX_POLL_THREADS = 128  # check-ins a host may have held at once: a cohort of 100 can wait in the lobby
_MAX_TRANSFER_THREADS = 8  # registrations, downloads and uploads


def summary_path(directory: Path, index: int) -> Path:
    return directory / f"device-{index:04d}.json"


class ThreadLearners:
    """The calling thread's learners, built on first use (one at a time: LiteRT
    silences the process's stderr while it loads, and Keras builds are not worth racing)."""

    def __init__(self, dataset: str, *, litert_threads: int = 1):
        self.dataset = dataset  # what a Keras model is built for (its input shape and classes)
        self.litert_threads = litert_threads
        self._local = threading.local()
        self._building = threading.Lock()
        self._decoded: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self._decoding = threading.Lock()

    def decoded(self, sha256: str, data: bytes, learner: Learner) -> list:
        """A checkpoint's weights in ``learner``'s order, decoded once per host: every agent
        trained on that checkpoint holds the same arrays (a thousand devices, one copy),
        kept for as long as one of them does."""
        key = (sha256, tuple(s.name for s in learner.spec))
        with self._decoding:
            weights = self._decoded.get(key)
            if weights is None:
                weights = self._decoded[key] = _Weights(wire.decode(data, learner.spec)[0])
        return weights

    def _held(self) -> dict:
        if not hasattr(self._local, "learners"):
            self._local.learners = {}
        return self._local.learners

    def keras(self, model: str) -> Learner:
        held = self._held()
        if ("keras", model) not in held:
            from edgefl.training import KerasLearner

            with self._building:
                held["keras", model] = KerasLearner(model, self.dataset)
        return held["keras", model]

    def litert(self, training_file: TrainingModel) -> Learner:
        held = self._held()
        key = ("litert", training_file.sha256)
        if key not in held:
            from edgefl.litert import LiteRTLearner

            for old in [k for k in held if k[0] == "litert"]:  # another batch size: the old file is done with
                del held[old]
            with self._building:
                held[key] = LiteRTLearner(training_file.data, threads=self.litert_threads)
        return held[key]


class _Weights(list):
    """A list of arrays that a weak dictionary may hold."""


Outcome = BaseException | None  # why an agent failed, or None once it finished


class DeviceHost:
    """Runs agents until every one is done; ``on_done(agent, outcome)`` is called on the
    host's thread as each one ends."""

    def __init__(
        self,
        agents: Sequence[DeviceAgent],
        *,
        dataset: str,
        threads: int = 1,
        learners: ThreadLearners | None = None,
        on_done: Callable[[DeviceAgent, Outcome], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.agents = list(agents)
        self.training_threads = max(1, min(threads, len(self.agents)))
        self.poll_threads = max(1, min(_MAX_POLL_THREADS, len(self.agents)))
        self.transfer_threads = max(1, min(_MAX_TRANSFER_THREADS, len(self.agents)))
        self.learners = learners or ThreadLearners(dataset, litert_threads=max(1, threads // self.training_threads))
        self.on_done = on_done or (lambda agent, outcome: None)
        self.clock = clock

    def run(self) -> dict[int, Outcome]:
        """Each agent's outcome, by device index."""
        finished: queue.Queue = queue.Queue()
        pools = {
            "train": (queue.Queue(), self.training_threads),
            "poll": (queue.Queue(), self.poll_threads),
            "transfer": (queue.Queue(), self.transfer_threads),
        }
        workers = [
            threading.Thread(target=self._work, args=(jobs, finished), name=f"{kind}-{i}", daemon=True)
            for kind, (jobs, count) in pools.items()
            for i in range(count)
        ]
        for worker in workers:
            worker.start()
        order = itertools.count()  # ties broken by arrival, never by comparing agents
        wakes: list[tuple[float, int, DeviceAgent]] = [(self.clock(), next(order), agent) for agent in self.agents]
        heapq.heapify(wakes)
        outcomes: dict[int, Outcome] = {}
        busy = 0
        try:
            while wakes or busy:
                now = self.clock()
                while wakes and wakes[0][0] <= now:
                    _, _, agent = heapq.heappop(wakes)
                    pools[agent.state.pool][0].put(agent)
                    busy += 1
                try:
                    agent, result = finished.get(timeout=max(0.0, wakes[0][0] - now) if wakes else None)
                except queue.Empty:
                    continue
                busy -= 1
                if isinstance(result, BaseException) or result is None:
                    outcomes[agent.index] = result
                    self.on_done(agent, result)
                else:
                    heapq.heappush(wakes, (result, next(order), agent))
        finally:
            for jobs, count in pools.values():
                for _ in range(count):
                    jobs.put(None)
        for worker in workers:
            worker.join(timeout=5)
        return outcomes

    def _work(self, jobs: queue.Queue, finished: queue.Queue) -> None:
        while (agent := jobs.get()) is not None:
            try:
                result = agent.step(self.clock(), self.learners)
            except BaseException as exc:  # the agent is done, failed; the host goes on
                result = exc
            finished.put((agent, result))


def process_age_s() -> float:
    import psutil

    return time.time() - psutil.Process().create_time()


def _peak_rss_mb() -> float:
    """This process's own peak RSS: Linux's VmHWM, which exec resets. (getrusage's
    ru_maxrss carries the parent's peak across fork and exec, so a device host started
    by a fleet process that imported TensorFlow would report TensorFlow's memory.)"""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def process_facts() -> dict:
    """This process's peak RSS and whether TensorFlow was imported, as of now."""
    return {
        "peak_rss_mb": _peak_rss_mb(),
        "tensorflow_imported": "tensorflow" in sys.modules,
    }


def build_agents(settings: DeviceSettings, indices: Sequence[int], *, enrolment_secret: str | None = None) -> list[DeviceAgent]:
    """One agent per index, with its shard of one shared load and partition."""
    shards = device_shards(settings.dataset, settings.partition, settings.num_devices, settings.seed, indices)
    DataShape.of(settings.dataset)  # what a Keras model is built for, remembered before the data goes
    load_dataset.cache_clear()  # the shards are copies: the whole training split need not stay
    profile = load_profile(settings.profile) if settings.profile else None
    started = time.monotonic()  # the profile's clock: its day starts with the host
    agents = []
    for index in indices:
        shard, held = holdout_split(shards[index], settings.holdout, hash((settings.seed, index)) & 0xFFFFFFFF)
        behaviour = behaviour_of(profile, settings.seed, index) if profile else None
        network = flaky_or_none(profile.network, settings.seed, index) if profile else None
        client = CoordinatorClient(settings.coordinator, transport=network)
        agents.append(
            DeviceAgent(
                index,
                settings.runtime_of(index),
                shard,
                held,
                client,
                seed=settings.seed,
                enrolment_secret=enrolment_secret,
                own_model=settings.model,
                behaviour=behaviour,
                fleet_started=started,
            )
        )
    return agents


def _write_json(path: Path, record: dict) -> None:
    """Whole or not at all: the fleet reads it as soon as it exists."""
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(record))
    partial.replace(path)


def _stop_quietly(signum, _frame) -> None:
    """SIGTERM (or Ctrl-C): threads may be mid-request or mid-step; nothing is left to save."""
    logging.shutdown()
    os._exit(128 + signum)


def host_main(argv: list[str] | None = None) -> int:
    """Entry point of one device host process."""
    parser = argparse.ArgumentParser(prog="python -m device_sim", description="Run devices of a fleet in this process.")
    parser.add_argument("--first-index", type=int, required=True, help="index of this host's first device")
    parser.add_argument("--count", type=int, default=1, help="devices in this host: --first-index onwards")
    parser.add_argument("--summary-dir", type=Path, help="where each device's device-XXXX.json summary is written")
    parser.add_argument(
        "--held",
        action="store_true",
        help="get ready (imports, data, shards), then wait for a line 'go' on stdin before any device contacts the"
        " coordinator (end of input: exit)",
    )
    device_settings.add_arguments(parser)
    args = parser.parse_args(argv)
    logs.configure()  # at the level the fleet was given, inherited
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop_quietly)
    try:
        settings = device_settings.from_arguments(args)
    except ValueError as exc:
        log.error("device host: %s", exc)
        return 2
    indices = range(args.first_index, args.first_index + args.count)
    if "keras" in {settings.runtime_of(i) for i in indices}:
        from edgefl.training import limit_threads

        limit_threads(settings.threads)
    try:
        agents = build_agents(settings, indices, enrolment_secret=os.environ.get(SECRET_ENV))
    except ValueError as exc:  # the data (DatasetError) or its partition, in one line
        log.error("device host: %s", exc)
        return 2
    imported_s = process_age_s()
    if args.held and sys.stdin.readline().strip() != "go":  # the fleet's checks failed, or it was stopped
        return 0

    def record(agent: DeviceAgent, outcome: Outcome) -> None:
        if isinstance(outcome, (CoordinatorUnreachable, ProtocolError)):
            log.error("device %d stopped: %s", agent.index, outcome)
        elif outcome is not None:
            log.error("device %d failed", agent.index, exc_info=outcome)
        elif args.summary_dir:
            startup_s = None if agent.learner_s is None else imported_s + agent.learner_s
            facts = {"startup_s": startup_s, **process_facts(), "devices_in_process": len(agents)}
            _write_json(summary_path(args.summary_dir, agent.index), {**asdict(agent.summary), **facts})

    outcomes = DeviceHost(agents, dataset=settings.dataset, threads=settings.threads, on_done=record).run()
    return 0 if all(outcome is None for outcome in outcomes.values()) else 1
