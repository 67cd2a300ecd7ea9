"""Partitioners: split a training set into per-device shards, deterministically.

A device builds its own shard from (dataset, partition spec, seed, number of devices,
its index); the coordinator never sees device data. Every partitioner returns a list of
index arrays, one per device; iid, dirichlet and classes together use every example
exactly once, natural uses the examples of the writers it gives a device.

``+style`` (feature skew) does not change which examples a device gets, only how they
are drawn: it is applied where shards are built (edgefl.datasets.device_shards).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_MIN_SHARD = 10
_MAX_DIRICHLET_DRAWS = 1000


@dataclass(frozen=True)
class PartitionSpec:
    """A parsed partition spec: ``iid``, ``dirichlet:ALPHA``, ``classes:K`` or ``natural``
    (one writer per device), each optionally ``+style`` (a handwriting style per device);
    ``style`` alone means ``iid+style``."""

    kind: str
    param: float | None = None
    style: bool = False

    @classmethod
    def parse(cls, text: str) -> PartitionSpec:
        base, plus, suffix = text.partition("+")
        style = bool(plus)
        if text == "style":
            base, style = "iid", True
        elif plus and suffix != "style":
            base = ""  # refused below
        kind, _, arg = base.partition(":")
        try:
            if kind in ("iid", "natural") and not arg and ":" not in base:
                return cls(kind, None, style)
            if kind == "dirichlet" and float(arg) > 0:
                return cls("dirichlet", float(arg), style)
            if kind == "classes" and int(arg) >= 1:
                return cls("classes", int(arg), style)
        except ValueError:
            pass
        raise ValueError(
            f"bad partition {text!r}: use iid, dirichlet:ALPHA (ALPHA > 0), classes:K (K >= 1) or natural, "
            "optionally with +style (e.g. dirichlet:0.5+style), or style alone (iid+style)"
        )

    def __str__(self) -> str:
        text = self.kind if self.param is None else f"{self.kind}:{self.param:g}"
        return f"{text}+style" if self.style else text


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


def natural_writers(num_writers: int, num_devices: int, rng: np.random.Generator) -> np.ndarray:
    """Which of ``num_writers`` writers (by rank) each device gets: all, in order, when
    there are as many devices as writers, else a sample without replacement.

    Shared by ``natural`` and by shard builders that read only the chosen writers, so
    both pick the same writer for the same device.
    """
    if num_writers == 0:
        raise ValueError(
            "partition natural needs data with writers (one per device); this data has none: use iid, dirichlet:ALPHA or classes:K"
        )
    if num_devices > num_writers:
        raise ValueError(
            f"partition natural gives each device one writer: {num_devices} devices, but the data has only {num_writers} writers"
        )
    if num_devices == num_writers:
        return np.arange(num_writers)
    return rng.choice(num_writers, size=num_devices, replace=False)


def natural(writers: np.ndarray, num_devices: int, rng: np.random.Generator) -> list[np.ndarray]:
    """One writer per device: device i holds all examples of the i-th chosen writer."""
    present = np.unique(writers)
    chosen = present[natural_writers(len(present), num_devices, rng)]
    order = np.argsort(writers, kind="stable")
    starts = np.searchsorted(writers[order], chosen, side="left")
    ends = np.searchsorted(writers[order], chosen, side="right")
    return [np.sort(order[a:b]) for a, b in zip(starts, ends)]


def partition(
    labels: np.ndarray, spec: PartitionSpec | str, num_devices: int, seed: int, *, writers: np.ndarray | None = None
) -> list[np.ndarray]:
    """Index arrays, one per device, for ``labels`` split as ``spec`` says.

    ``writers`` (each example's writer) is needed by ``natural`` only.
    """
    if isinstance(spec, str):
        spec = PartitionSpec.parse(spec)
    rng = np.random.default_rng(seed)
    if spec.kind == "natural":
        if num_devices < 1:
            raise ValueError(f"cannot split data over {num_devices} devices")
        return natural(np.zeros(0, np.int64) if writers is None else np.asarray(writers), num_devices, rng)
    if num_devices < 1 or num_devices > len(labels):
        raise ValueError(f"cannot split {len(labels)} examples over {num_devices} devices")
    if spec.kind == "iid":
        return iid(labels, num_devices, rng)
    if spec.kind == "dirichlet":
        return dirichlet(labels, num_devices, spec.param, rng)
    return classes(labels, num_devices, int(spec.param), rng)
