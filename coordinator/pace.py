"""Pace steering: when a device that is not needed now should come back.

Bonawitz et al. (2019) steer a fleet's check-ins so that a large population does not
arrive all at once (a thundering herd whenever a round opens) and a small one is there
when it is needed. Here the devices a round will need next wait in the lobby, held;
every other device is told to come back after a time drawn so that, whatever the
population, the devices outside the lobby check in at about ``checkins_per_s`` in all.
A small fleet (ten devices) keeps the short waits the round's own state asks for; a
fleet of thousands is spread over seconds instead of asking many times a second.

``steered_retry_s`` is the arithmetic; ``Population`` counts the registered devices,
read from the store at most every few seconds.
"""

from __future__ import annotations

import random
import threading
import time

_POPULATION_TTL_S = 5.0
MAX_STEERED_S = 300.0  # however many devices registered (strangers can register thousands), none waits longer


def steered_retry_s(own_s: float, *, outside: int, checkins_per_s: float, rng: random.Random) -> float:
    """The later of the wait the round's state asks for (``own_s``, already jittered)
    and a draw whose mean spreads ``outside`` devices' next check-ins over
    ``outside / checkins_per_s`` seconds (uniform in half to one and a half of it),
    at most ``MAX_STEERED_S``."""
    spread_s = min(max(0, outside) / checkins_per_s, MAX_STEERED_S)
    return round(max(own_s, min(spread_s * (0.5 + rng.random()), MAX_STEERED_S)), 3)


class Population:
    """How many devices are registered, counted again at most every few seconds (the
    check-in path must not count a table on every call)."""

    def __init__(self, ttl_s: float = _POPULATION_TTL_S, clock=time.monotonic):
        self.ttl_s, self.clock = ttl_s, clock
        self._lock = threading.Lock()
        self._count, self._counted_at = 0, -float("inf")

    def count(self, db) -> int:
        with self._lock:
            if self.clock() - self._counted_at < self.ttl_s:
                return self._count
        (count,) = db.execute("SELECT COUNT(*) FROM devices").fetchone()
        with self._lock:
            self._count, self._counted_at = count, self.clock()
        return count
