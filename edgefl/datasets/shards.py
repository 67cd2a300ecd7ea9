"""What a device host calls: the training shards of the devices it runs.

A device builds its own shard from (dataset, partition, seed, number of devices, its
index); the coordinator never sees device data. With the natural partition on a format
that can read one writer alone (federated EMNIST's HDF5 and SQLite), only the selected
writers are read, so a host of ten devices reads ten writers, not 3,400. With ``+style``
each device's images are drawn in its own handwriting style, the same in every round.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from edgefl.datasets.base import Split
from edgefl.datasets.loading import load_dataset
from edgefl.datasets.references import resolve, writer_source
from edgefl.datasets.style import apply_style, draw_style
from edgefl.partition import PartitionSpec, natural_writers
from edgefl.partition import partition as split_indices


def device_shards(
    reference: str, partition: str | PartitionSpec, num_devices: int, seed: int, indices: Iterable[int]
) -> dict[int, Split]:
    """Each listed device's training shard (before its own holdout split), by index."""
    spec = PartitionSpec.parse(partition) if isinstance(partition, str) else partition
    wanted = [int(i) for i in indices]
    if num_devices < 1:
        raise ValueError(f"cannot split data over {num_devices} devices")
    outside = [i for i in wanted if not 0 <= i < num_devices]
    if outside:
        raise ValueError(f"device index {outside[0]} is outside 0..{num_devices - 1}")
    source = writer_source(resolve(reference)) if spec.kind == "natural" else None
    if source is not None:
        chosen = natural_writers(len(source.train_writers), num_devices, np.random.default_rng(seed))
        writer_of = {i: source.train_writers[chosen[i]] for i in wanted}
        data = source.read_train(list(dict.fromkeys(writer_of.values())))
        position = {w: p for p, w in enumerate(source.writer_ids)}
        shards = {i: data.subset(np.flatnonzero(data.writers == position[w])) for i, w in writer_of.items()}
    else:
        train = load_dataset(reference).train
        parts = split_indices(train.y, spec, num_devices, seed, writers=train.writers)
        shards = {i: train.subset(parts[i]) for i in wanted}
    if spec.style:
        shards = {i: Split(apply_style(s.x, draw_style(seed, i)), s.y, s.writers) for i, s in shards.items()}
    return shards
