"""Server-side aggregation of what devices report with their updates, as pure functions.

A round's figures are weighted means of the devices' reports: their training loss and
accuracy by example counts, their personalisation reports (the accuracy on their own
held-out examples of the global model they were sent and of their locally fine-tuned
one) by held-out examples. ``edgefl.limits`` bounds every report, so no sum overflows;
``weighted_mean`` is the guard behind that bound.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Report = dict[str, float]  # one device's metrics, as its upload carried them


def weighted_mean(values: Sequence[float], weights: Sequence[float]) -> float | None:
    """Σ w·v / Σ w in floats, exactly rounded (``math.fsum``); None if that is not a
    finite number."""
    try:
        total = math.fsum(float(w) for w in weights)
        mean = math.fsum(float(w) * float(v) for v, w in zip(values, weights)) / total
    except (OverflowError, ZeroDivisionError, ValueError, TypeError):
        return None
    return mean if math.isfinite(mean) else None


def weighted(reports: Sequence[Report], key: str, examples: Sequence[int]) -> float | None:
    """The mean of one figure every report carries, by example counts (None if any lacks it)."""
    values = [r.get(key) for r in reports]
    if not reports or any(v is None for v in values):
        return None
    return weighted_mean(values, examples)


def personalization(reports: Sequence[Report]) -> dict | None:
    """The personalisation reports combined, weighted by held-out examples; None if no
    device reported one."""
    reports = [
        r
        for r in reports
        if r.get("holdout_examples", 0) > 0 and "holdout_accuracy_global" in r and "holdout_accuracy_personalized" in r
    ]
    if not reports:
        return None
    examples = [r["holdout_examples"] for r in reports]
    return {
        "devices": len(reports),
        "examples": int(sum(examples)),
        "global_accuracy": weighted_mean([r["holdout_accuracy_global"] for r in reports], examples),
        "personalized_accuracy": weighted_mean([r["holdout_accuracy_personalized"] for r in reports], examples),
    }
