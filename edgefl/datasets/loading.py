"""``load_dataset`` and ``dataset_problem``: the two ways in, one cached and one cheap."""

from __future__ import annotations

from functools import cache

from edgefl.datasets.base import Dataset, DatasetError
from edgefl.datasets.references import load, probe, resolve


@cache
def load_dataset(reference: str) -> Dataset:
    """The dataset a reference names, checked as it is read. Cached, so a process reads
    it once; every process computes the same split. Raises DatasetError (one line)."""
    ref = resolve(reference)
    try:
        return load(ref)
    except OSError as exc:
        raise DatasetError(ref.path or reference, f"cannot read: {exc.strerror or exc}") from None


def dataset_problem(reference: str) -> str | None:
    """What is wrong with a reference, in one line, or None: its syntax, that its path
    exists with a recognised layout, and the cheap header checks (no full read)."""
    try:
        probe(resolve(reference))
    except DatasetError as exc:
        return str(exc)
    except OSError as exc:
        return f"{reference}: cannot read: {exc.strerror or exc}"
    return None
