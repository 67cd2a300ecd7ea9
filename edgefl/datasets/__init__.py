"""Handwriting datasets, from the embedded digits to the user's own files.

Every loader returns the same thing: ``(n, H, W, 1)`` float32 images in [0, 1] with 0.0 as
background (each format's own convention is normalised on the way in), int64 labels,
and, where the data has them, the writer of each example (the natural federated
partition). A reference (``--dataset``) is ``digits``, ``fashion-mnist``, or a path to
MNIST-format IDX files, TFF's federated EMNIST (HDF5 or SQLite), LEAF's FEMNIST JSON, or
a folder of images per writer; see ``references.ACCEPTED``.

Nothing here imports TensorFlow (a LiteRT device process must never load it): NumPy,
SciPy, h5py, Pillow, sqlite3 and protobuf only. Every wrong file is a DatasetError whose
message is one line naming the file and the fault.
"""

from __future__ import annotations

from edgefl.datasets.base import Dataset, DatasetError, Split
from edgefl.datasets.loading import dataset_problem, load_dataset
from edgefl.datasets.references import NAMED as DATASET_NAMES
from edgefl.datasets.shards import device_shards

__all__ = ["DATASET_NAMES", "Dataset", "DatasetError", "Split", "dataset_problem", "device_shards", "load_dataset"]
