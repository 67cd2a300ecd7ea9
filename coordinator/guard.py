"""The last check before a model is committed: finite, and not diverging.

``edgefl.limits`` bounds every update so no sum overflows, but a weighted mean has no
defence against one device that claims a billion examples and sends the largest
values allowed: the model would stay finite yet be ruined, and honest devices training
from it would then produce updates beyond the bounds, so every later round would fail.
Before committing, the round driver therefore compares the new model's loss on a
probe of the coordinator's held-out split with the loss of the model it started from.
A round whose model diverges is screened: each update is applied alone, those that
diverge by themselves are left out (and their devices sit out), and the rest are
aggregated again; failing that, the updates claiming the most examples are left out,
one more at a time (colluders, or a server optimizer's step, can ruin a model that no
single update does); if nothing gives a sound model, the round is abandoned and the
run goes on from the last good model. Honest rounds never come near the threshold
(a loss ten times the last one, plus 50); a ruined model is orders of magnitude past it.
Only the plain weighted means need this: ``robust`` and the DP aggregators clip every
update, so no single one can ruin their result (and DP's noise, with few clients, may
legitimately move the model further than this check allows).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np

UNBOUNDED_AGGREGATORS = ("mean", "compressed")  # no per-update clipping: screened here
PROBE_EXAMPLES = 128
MOST_LEFT_OUT = 4  # of the heaviest updates, tried one more at a time  # of the held-out split: a few milliseconds per check
FACTOR = 10.0
SLACK = 50.0


def finite(weights: Sequence[np.ndarray]) -> bool:
    return all(np.isfinite(w).all() for w in weights)


def diverged(loss: float, base_loss: float) -> bool:
    """Whether a model's probe loss shows it ruined, against its base model's."""
    return not math.isfinite(loss) or loss > FACTOR * base_loss + SLACK


def culprits(
    base: Sequence[np.ndarray],
    deltas: Iterable[tuple[int, Sequence[np.ndarray]]],
    loss_of: Callable[[list[np.ndarray]], float],
    base_loss: float,
) -> set[int]:
    """The ids of the updates (``(id, delta)`` pairs) whose delta, applied alone to
    ``base``, gives a diverging model."""
    found = set()
    for update_id, delta in deltas:
        with np.errstate(over="ignore", invalid="ignore"):
            alone = [b + d for b, d in zip(base, delta)]
        if not finite(alone) or diverged(loss_of(alone), base_loss):
            found.add(update_id)
    return found
