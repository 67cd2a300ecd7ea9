"""The bounds an update and its metrics must respect; the API refuses anything outside.

They are wide for honest devices and narrow enough that no sum the coordinator forms
can overflow. A weighted sum of a cohort of a million updates, each value at most
``MAX_ABS_UPDATE`` and weighted by at most ``MAX_EXAMPLES``, stays below 1e21, and a
squared L2 norm of a hundred million such values below 1e20: both far inside float32
(3.4e38), so aggregation, clipping and the server optimizers stay finite. Metrics are
bounded the same way for their weighted means. The round driver still checks the
aggregate it gets (``coordinator.driver``): these bounds are the first line, not the
only one.
"""

from __future__ import annotations

import math

MAX_ABS_UPDATE = 1e6  # per value of a delta (and per quantization bound)
MAX_EXAMPLES = 10**9  # an update's num_examples: 1 to this
MAX_METRICS = 32  # names in an update's metrics
MAX_METRIC_NAME = 64  # characters
MAX_ABS_METRIC = 1e12
# Metrics with a meaning the coordinator combines, and their ranges.
RANGES = {
    "train_accuracy": (0.0, 1.0),
    "holdout_accuracy_global": (0.0, 1.0),
    "holdout_accuracy_personalized": (0.0, 1.0),
    "holdout_examples": (0, MAX_EXAMPLES),
    "train_loss": (0.0, MAX_ABS_METRIC),
}


def metrics_problem(metrics: object) -> str | None:
    """Why ``metrics`` (decoded JSON) is not an acceptable metrics object, or None."""
    if not isinstance(metrics, dict):
        return "they must be a JSON object"
    if len(metrics) > MAX_METRICS:
        return f"there may be at most {MAX_METRICS} of them"
    for name, value in metrics.items():
        if not isinstance(name, str) or not 0 < len(name) <= MAX_METRIC_NAME:
            return f"names must be 1 to {MAX_METRIC_NAME} characters"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{name[:MAX_METRIC_NAME]} must be a number"
        low, high = RANGES.get(name, (-MAX_ABS_METRIC, MAX_ABS_METRIC))
        if name == "holdout_examples" and not isinstance(value, int):
            return "holdout_examples must be a whole number"
        try:
            inside = math.isfinite(value) and low <= value <= high
        except OverflowError:  # an integer too large for a float
            inside = False
        if not inside:
            return f"{name} must be a finite number from {low:g} to {high:g}"
    return None
