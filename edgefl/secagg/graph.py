"""SecAgg+'s sparse neighbour graph: a random k-regular graph over the round's devices.

A Harary graph (each device joined to the k/2 nearest on either side of a ring) under a
random relabelling, as Bell et al. construct it: every device has exactly k neighbours,
so a device's work and traffic grow with k, which grows with log(n), not with n. The
coordinator draws the relabelling and sends the graph; it is public.
"""

from __future__ import annotations

import functools
import math

import numpy as np


def default_degree(devices: int) -> int:
    """Logarithmic in the cohort: 2 * ceil(3 * log2(n)) (60 at 1,000 devices); every
    other device (the complete graph of Bonawitz et al.) when that is as many."""
    if devices <= 1:
        return 0
    degree = 2 * math.ceil(3 * math.log2(devices))
    return devices - 1 if degree >= devices - 1 else degree


def default_threshold(degree: int) -> int:
    """A strict majority of a device's neighbours: shares from that many recover its secrets."""
    return degree // 2 + 1


@functools.lru_cache(maxsize=32)
def neighbours(devices: int, degree: int, seed: int) -> tuple[tuple[int, ...], ...]:
    """Each device's neighbours (indices 0 .. devices - 1), sorted; symmetric. Cached:
    a coordinator answers every device of a round from the same graph."""
    if degree >= devices:
        raise ValueError(f"a degree of {degree} needs more than {degree} devices")
    if degree % 2 and devices % 2:
        raise ValueError("an odd degree needs an even number of devices")
    label = np.random.default_rng(seed).permutation(devices)
    ring = [set() for _ in range(devices)]
    for position in range(devices):
        offsets = list(range(1, degree // 2 + 1)) + ([devices // 2] if degree % 2 else [])
        for offset in offsets:
            a, b = int(label[position]), int(label[(position + offset) % devices])
            ring[a].add(b)
            ring[b].add(a)
    return tuple(tuple(sorted(n)) for n in ring)


def round_shape(devices: int, degree: int = 0, threshold: int = 0) -> tuple[int, int]:
    """The (degree, threshold) a round of ``devices`` runs with, from the configured
    values (0: the defaults): the degree at most every other device, the threshold at
    most the degree. ValueError if the configured threshold does not fit."""
    k = min(degree or default_degree(devices), devices - 1)
    t = threshold or default_threshold(k)
    if not 1 <= t <= k:
        raise ValueError(f"a threshold of {t} needs at least {t} neighbours per device, and {devices} devices give {k}")
    return k, t
