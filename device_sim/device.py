"""One simulated device: its own shard, its own credentials, the check-in loop.

The shard is built on the device from (dataset, partition, seed, number of devices,
index): the coordinator never holds or sends device data, and only deltas and counts
leave the device. Checkpoints are cached by hash, so a device re-selected for the same
model version does not download it twice.

A device trains with one of two runtimes: ``keras`` (TensorFlow in the device process)
or ``litert``, what a phone runs: it downloads the coordinator's on-device training
.tflite once (kept by its sha256, fetched again only if the run's batch size changes),
sets each round's checkpoint into it and trains through the standalone LiteRT
interpreter. A ``litert`` device never imports TensorFlow; its summary says so.

Personalisation, evaluated the federated way: a device keeps ``holdout`` of its
examples out of training, and with each update reports the accuracy on them of the
global model it was sent and of its locally trained model (the global model fine-tuned
on its own data, by the same runtime). The coordinator aggregates the reports per round.

A task may ask for the update quantized (a ``compressed`` run): the device then sends
it as ``bits``-bit codes with their bounds (``edgefl.compression``), not float32.
"""

from __future__ import annotations

import json
import logging
import resource
import sys
import time
from dataclasses import dataclass

import numpy as np

from edgefl import codecs, wire
from edgefl.client import CoordinatorClient, ProtocolError, TrainingModel
from edgefl.datasets import Split, load_dataset
from edgefl.models import model_spec
from edgefl.partition import partition
from edgefl.protocol import Task

log = logging.getLogger("edgefl.device")

RUNTIMES = ("keras", "litert")


@dataclass(frozen=True, kw_only=True)
class DeviceSpec:
    coordinator: str
    index: int
    num_devices: int
    dataset: str = "digits"
    partition: str = "dirichlet:0.5"
    seed: int = 0
    threads: int = 1  # TF threads: with 2, ten devices on two cores spent ~8% longer per round
    runtime: str = "keras"  # or "litert"
    holdout: float = 0.2  # of the shard, kept out of training for personalisation reports


@dataclass
class DeviceSummary:
    index: int
    device_id: str | None = None
    num_examples: int = 0
    rounds_trained: int = 0
    late_uploads: int = 0
    refused_uploads: int = 0
    bytes_down: int = 0
    bytes_up: int = 0
    runtime: str = "keras"
    startup_s: float | None = None  # process start to imports done, plus building the first learner
    peak_rss_mb: float = 0.0
    tensorflow_imported: bool = False
    stopped_because: str = ""  # the coordinator's reason: run_finished or run_stopped


def device_shard(spec: DeviceSpec) -> Split:
    train = load_dataset(spec.dataset).train
    shards = partition(train.y, spec.partition, spec.num_devices, spec.seed)
    return train.subset(shards[spec.index])


def holdout_split(shard: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """(examples to train on, examples only to evaluate on), fixed for the device."""
    held = int(round(len(shard) * fraction)) if len(shard) >= 5 else 0
    order = np.random.default_rng(seed).permutation(len(shard))
    return shard.subset(np.sort(order[held:])), shard.subset(np.sort(order[:held]))


def personalization_report(learner, global_weights: list, delta: list, held: Split) -> dict[str, float]:
    if not len(held):
        return {}
    personalized = [w + d for w, d in zip(global_weights, delta)]
    return {
        "holdout_examples": len(held),
        "holdout_accuracy_global": learner.evaluate(global_weights, held.x, held.y)["accuracy"],
        "holdout_accuracy_personalized": learner.evaluate(personalized, held.x, held.y)["accuracy"],
    }


def _process_age_s() -> float:
    import psutil

    return time.time() - psutil.Process().create_time()


class _LiteRTRuntime:
    """The training file this device holds, swapped only for another batch size."""

    def __init__(self, client: CoordinatorClient, threads: int):
        self.client, self.threads = client, threads
        self.model: TrainingModel | None = None
        self.learner = None
        self.build_s = 0.0  # loading LiteRT and the file, not downloading it

    def learner_for(self, task: Task):
        """A learner for the task's batch size, or None if the coordinator is still
        building that file (the device then skips the task)."""
        from edgefl.litert import LiteRTLearner

        if self.learner is None or self.learner.batch_size != task.batch_size:
            self.model = self.client.download_training_model(self.model)
            if self.model.batch_size != task.batch_size:
                return None
            started = time.monotonic()
            self.learner = LiteRTLearner(self.model.data, threads=self.threads)
            self.build_s = time.monotonic() - started
        return self.learner


def run_device(
    spec: DeviceSpec, *, client: CoordinatorClient | None = None, enrolment_secret: str | None = None
) -> DeviceSummary:
    """Serve the coordinator's tasks until it says the run is over."""
    if spec.runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {spec.runtime!r}; choose one of {', '.join(RUNTIMES)}")
    shard, held = holdout_split(device_shard(spec), spec.holdout, hash((spec.seed, spec.index)) & 0xFFFFFFFF)
    client = client or CoordinatorClient(spec.coordinator)
    summary = DeviceSummary(spec.index, num_examples=len(shard), runtime=spec.runtime)
    summary.device_id = client.register(enrolment_secret)
    log.info("device %d (%s) registered as %s with %d examples", spec.index, spec.runtime, summary.device_id, len(shard))
    litert = _LiteRTRuntime(client, spec.threads) if spec.runtime == "litert" else None
    imported_s = _process_age_s()
    learner = None
    cached: tuple[str, list] | None = None
    while True:
        answer = client.checkin()
        if answer.status == "finished":
            summary.stopped_because = answer.reason or "run_finished"
            log.info("device %d: the coordinator says the run is over (%s)", spec.index, summary.stopped_because)
            break
        if answer.status == "wait" or answer.task is None:
            time.sleep(answer.retry_after or 1.0)
            continue
        task = answer.task
        t_task = time.monotonic()
        if litert is not None:
            learner = litert.learner_for(task)
            if learner is None:
                log.info(
                    "device %d: no training file for batch %d yet; skipping round %d",
                    spec.index,
                    task.batch_size,
                    task.round_number,
                )
                time.sleep(1.0)
                continue
            weight_spec = learner.spec
            build_s = litert.build_s
        elif learner is None:
            from edgefl.training import KerasLearner

            learner = KerasLearner(task.model)
            weight_spec = model_spec(task.model)
            build_s = time.monotonic() - t_task
        if summary.startup_s is None:
            summary.startup_s = imported_s + build_s
        sha = task.checkpoint_sha256
        if cached is None or cached[0] != sha:
            weights, _ = wire.decode(client.download_checkpoint(sha), weight_spec)
            cached = (sha, weights)
        t_downloaded = time.monotonic()
        result = learner.client_update(
            cached[1],
            shard.x,
            shard.y,
            epochs=task.epochs,
            batch_size=task.batch_size,
            learning_rate=task.learning_rate,
            seed=hash((spec.seed, spec.index, task.round_id)) & 0xFFFFFFFF,
        )
        t_trained = time.monotonic()
        metrics = {**result.metrics, **personalization_report(learner, cached[1], result.delta, held)}
        body = codecs.named(task.codec).encode(
            learner.names,
            result.delta,
            {"num_examples": str(result.num_examples), "metrics": json.dumps(metrics)},
            np.random.default_rng([spec.seed, spec.index, task.round_id]),  # stochastic rounding's draws
        )
        try:
            client.upload_update(task.round_id, body)
            summary.rounds_trained += 1
            log.info(
                "device %d: round %d done: checkpoint %.3fs, training %.3fs, upload %.3fs",
                spec.index,
                task.round_number,
                t_downloaded - t_task,
                t_trained - t_downloaded,
                time.monotonic() - t_trained,
            )
        except ProtocolError as exc:
            if exc.code == "duplicate_update":  # our earlier attempt was stored; its 202 was lost
                summary.rounds_trained += 1
                continue
            if exc.status == 409:
                summary.late_uploads += 1
                log.info("device %d: round %d closed before its upload (%s)", spec.index, task.round_id, exc.code)
            elif exc.status in (401, 403):  # the coordinator no longer knows this device, or did not select it: it stops
                raise
            else:  # the coordinator refused this update (say, a model gone wrong): the next round may go better
                summary.refused_uploads += 1
                log.warning("device %d: round %d refused its update: %s", spec.index, task.round_id, exc)
    summary.bytes_down = client.traffic.bytes_down
    summary.bytes_up = client.traffic.bytes_up
    summary.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    summary.tensorflow_imported = "tensorflow" in sys.modules
    return summary
