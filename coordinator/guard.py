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

import logging
import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np

log = logging.getLogger("edgefl.coordinator")

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


class Guard:
    """The check for one round driver: its learner evaluates the probe, and the loss of
    the round's base model is remembered while rounds retry it."""

    def __init__(self, learner, probe_x: np.ndarray, probe_y: np.ndarray):
        self.learner = learner
        self.probe = (probe_x, probe_y)
        self._base_losses: dict[int, float] = {}

    def loss(self, weights: Sequence[np.ndarray]) -> float:
        return self.learner.evaluate(list(weights), *self.probe)["loss"]

    def base_loss(self, base: Sequence[np.ndarray], base_version: int) -> float:
        if base_version not in self._base_losses:
            self._base_losses = {base_version: self.loss(base)}
        return self._base_losses[base_version]

    def problem(self, weights, base, base_version: int, aggregator: str) -> tuple[str, str] | None:
        """Why a round's new model may not be committed, as (reason, detail), or None."""
        if not finite(weights):
            return "non_finite_model", f"its aggregate is not finite; the run goes on from model version {base_version}"
        if aggregator not in UNBOUNDED_AGGREGATORS:
            return None
        try:
            loss, base_loss = self.loss(weights), self.base_loss(base, base_version)
        except Exception:  # the check itself failed (its evaluation is reported on its own): commit unchecked
            log.exception("could not check the new model against model version %d", base_version)
            return None
        if diverged(loss, base_loss):
            return "diverged", (
                f"its model's loss on {len(self.probe[1])} held-out examples is {loss:.3g}, against {base_loss:.3g} for model"
                f" version {base_version}, from which the run goes on"
            )
        return None

    def screen(self, server, fold, updates: Sequence, base, base_version: int, aggregator: str, delta_of: Callable):
        """The round aggregated again by ``server`` without the updates (rows with ``id``
        and ``num_examples``) that ruin the model: those that do alone, or else the ones
        claiming the most examples, up to ``MOST_LEFT_OUT`` of them. (output, the updates
        left out), or (None, []) if that gives no sound model. ``delta_of`` reads one
        update's delta: one is in memory at a time, as in the fold."""
        alone = culprits(base, ((u["id"], delta_of(u)) for u in updates), self.loss, self.base_loss(base, base_version))
        heaviest = [u["id"] for u in sorted(updates, key=lambda u: u["num_examples"], reverse=True)]
        for leave_out in [alone] + [set(heaviest[:k]) for k in range(1, MOST_LEFT_OUT + 1)]:
            if not leave_out or len(leave_out) >= len(updates):
                continue
            refold = server.begin(fold.round_state[len(base) :], base)
            for update in updates:
                if update["id"] not in leave_out:
                    refold = server.fold(refold, delta_of(update), update["num_examples"])
            output = server.finish(refold)
            if self.problem(output.weights, base, base_version, aggregator) is None:
                return output, [u for u in updates if u["id"] in leave_out]
        return None, []
