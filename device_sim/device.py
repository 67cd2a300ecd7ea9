"""One simulated device: its own shard, its own credentials, the check-in loop.

The shard is built on the device from (dataset, partition, seed, number of devices,
index): the coordinator never holds or sends device data, and only deltas and counts
leave the device. Checkpoints are cached by hash, so a device re-selected for the same
model version does not download it twice.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

from edgefl.client import CoordinatorClient, ProtocolError
from edgefl import wire
from edgefl.datasets import Split, load_dataset
from edgefl.models import model_spec
from edgefl.partition import partition

log = logging.getLogger("edgefl.device")


@dataclass(frozen=True, kw_only=True)
class DeviceSpec:
    coordinator: str
    index: int
    num_devices: int
    dataset: str = "digits"
    partition: str = "dirichlet:0.5"
    seed: int = 0
    threads: int = 1  # TF threads: with 2, ten devices on two cores spent ~8% longer per round


@dataclass
class DeviceSummary:
    index: int
    device_id: str | None = None
    num_examples: int = 0
    rounds_trained: int = 0
    late_uploads: int = 0
    bytes_down: int = 0
    bytes_up: int = 0


def device_shard(spec: DeviceSpec) -> Split:
    train = load_dataset(spec.dataset).train
    shards = partition(train.y, spec.partition, spec.num_devices, spec.seed)
    return train.subset(shards[spec.index])


def run_device(spec: DeviceSpec, *, client: CoordinatorClient | None = None) -> DeviceSummary:
    """Serve the coordinator's tasks until it says the run is over."""
    from edgefl.training import KerasLearner

    shard = device_shard(spec)
    client = client or CoordinatorClient(spec.coordinator)
    summary = DeviceSummary(spec.index, num_examples=len(shard))
    summary.device_id = client.register()
    log.info("device %d registered as %s with %d examples", spec.index, summary.device_id, len(shard))
    learner: KerasLearner | None = None
    cached: tuple[str, list] | None = None
    while True:
        answer = client.checkin()
        if answer["status"] == "finished":
            break
        if answer["status"] == "wait":
            time.sleep(answer["retry_after"])
            continue
        task = answer["task"]
        t_task = time.monotonic()
        if learner is None:
            learner = KerasLearner(task["model"])
            weight_spec = model_spec(task["model"])
        sha = task["checkpoint_sha256"]
        if cached is None or cached[0] != sha:
            weights, _ = wire.decode(client.download_checkpoint(sha), weight_spec)
            cached = (sha, weights)
        t_downloaded = time.monotonic()
        result = learner.client_update(
            cached[1],
            shard.x,
            shard.y,
            epochs=task["epochs"],
            batch_size=task["batch_size"],
            learning_rate=task["learning_rate"],
            seed=hash((spec.seed, spec.index, task["round_id"])) & 0xFFFFFFFF,
        )
        t_trained = time.monotonic()
        body = wire.encode(
            learner.names,
            result.delta,
            {"num_examples": str(result.num_examples), "metrics": json.dumps(result.metrics)},
        )
        try:
            client.upload_update(task["round_id"], body)
            summary.rounds_trained += 1
            log.info(
                "device %d: round %d done: checkpoint %.3fs, training %.3fs, upload %.3fs",
                spec.index, task["round_number"], t_downloaded - t_task, t_trained - t_downloaded,
                time.monotonic() - t_trained,
            )
        except ProtocolError as exc:
            if exc.code == "duplicate_update":  # our earlier attempt was stored; its 202 was lost
                summary.rounds_trained += 1
                continue
            if exc.status != 409:
                raise
            summary.late_uploads += 1
            log.info("device %d: round %d closed before its upload (%s)", spec.index, task["round_id"], exc.code)
    summary.bytes_down = client.traffic.bytes_down
    summary.bytes_up = client.traffic.bytes_up
    return summary
