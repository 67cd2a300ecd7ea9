"""Partitioners: split a training set into per-device shards, deterministically.

A device builds its own shard from (dataset, partition spec, seed, number of devices,
its index); the coordinator never sees device data. Every partitioner returns a list of
index arrays that together use every example exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_MIN_SHARD = 10
_MAX_DIRICHLET_DRAWS = 1000


@dataclass(frozen=True)
class PartitionSpec:
    """A parsed partition spec: ``iid``, ``dirichlet:ALPHA`` or ``classes:K``."""

    kind: str
    param: float | None = None

    @classmethod
    def parse(cls, text: str) -> PartitionSpec:
        kind, _, arg = text.partition(":")
        try:
            if kind == "iid" and not arg:
                return cls("iid")
            if kind == "dirichlet" and float(arg) > 0:
                return cls("dirichlet", float(arg))
            if kind == "classes" and int(arg) >= 1:
                return cls("classes", int(arg))
        except ValueError:
            pass
        raise ValueError(f"bad partition {text!r}: use iid, dirichlet:ALPHA (ALPHA > 0) or classes:K (K >= 1)")

    def __str__(self) -> str:
        if self.param is None:
            return self.kind
        return f"{self.kind}:{self.param:g}"


def iid(labels: np.ndarray, num_devices: int, rng: np.random.Generator) -> list[np.ndarray]:
    return [np.sort(s) for s in np.array_split(rng.permutation(len(labels)), num_devices)]


def dirichlet(labels: np.ndarray, num_devices: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Label skew: each class is spread over devices in Dirichlet(alpha) proportions.

    Draws are repeated until every device holds at least ``_MIN_SHARD`` examples (the
    usual practice, e.g. in FedLab and NIID-Bench), so no device is left with nothing
    to train on.
    """
    min_size = min(_MIN_SHARD, len(labels) // num_devices)
    for _ in range(_MAX_DIRICHLET_DRAWS):
        shards: list[list[int]] = [[] for _ in range(num_devices)]
        for cls in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == cls))
            proportions = rng.dirichlet(np.full(num_devices, alpha))
            cuts = (np.cumsum(proportions)[:-1] * len(members)).astype(int)
            for shard, part in zip(shards, np.split(members, cuts)):
                shard.extend(part.tolist())
        if min(len(s) for s in shards) >= min_size:
            return [np.sort(np.array(s, dtype=np.int64)) for s in shards]
    raise ValueError(
        f"dirichlet:{alpha:g} left a device with fewer than {min_size} examples in "
        f"{_MAX_DIRICHLET_DRAWS} draws; use a larger alpha or fewer devices"
    )


def classes(labels: np.ndarray, num_devices: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Pathological skew: device i holds exactly k classes, (i*k + j) mod C for j < k.

    Each class's examples are split evenly among the devices that hold it, so every
    example is used once as long as every class has a holder (num_devices * k >= C).
    """
    class_ids = np.unique(labels)
    num_classes = len(class_ids)
    if k > num_classes or num_devices * k < num_classes:
        raise ValueError(f"classes:{k} needs k <= {num_classes} and devices * k >= {num_classes}")
    holders: dict[int, list[int]] = {int(c): [] for c in class_ids}
    for device in range(num_devices):
        for j in range(k):
            holders[int(class_ids[(device * k + j) % num_classes])].append(device)
    shards: list[list[int]] = [[] for _ in range(num_devices)]
    for cls, devices in holders.items():
        members = rng.permutation(np.flatnonzero(labels == cls))
        for device, part in zip(devices, np.array_split(members, len(devices))):
            shards[device].extend(part.tolist())
    return [np.sort(np.array(s, dtype=np.int64)) for s in shards]


def partition(labels: np.ndarray, spec: PartitionSpec | str, num_devices: int, seed: int) -> list[np.ndarray]:
    """Index arrays, one per device, for ``labels`` split as ``spec`` says."""
    if isinstance(spec, str):
        spec = PartitionSpec.parse(spec)
    if num_devices < 1 or num_devices > len(labels):
        raise ValueError(f"cannot split {len(labels)} examples over {num_devices} devices")
    rng = np.random.default_rng(seed)
    if spec.kind == "iid":
        return iid(labels, num_devices, rng)
    if spec.kind == "dirichlet":
        return dirichlet(labels, num_devices, spec.param, rng)
    return classes(labels, num_devices, int(spec.param), rng)
