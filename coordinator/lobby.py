"""Devices waiting, in held check-ins, for the next round.

A check-in from a device the next round will want is held by the API (long-polling)
and its device enters the lobby. When the round driver opens a round it selects the
cohort from the lobby first, in arrival order, in the same transaction, and then wakes
the held check-ins, which only have to read their assignment. This is selection as
Google's production system does it: the devices connected when a round starts are
the candidates. In a WSGI worker process (``serve --workers N``) the driver runs
elsewhere: ``watch_rounds`` wakes the lobby from the store, candidates are left empty
and held check-ins fill the cohort as they wake. A held check-in also re-checks on its
own timer, in case a wake-up is missed.
"""

from __future__ import annotations

import threading

from edgefl.protocol import RoundStatus


class Lobby:
    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._generation = 0
        self._waiting: dict[str, None] = {}  # insertion-ordered
        self.closed = False

    def enter(self, device_id: str) -> int | None:
        """Join the lobby; the generation to wait on, or None if this device already
        waits in another held check-in (one device holds at most one thread)."""
        with self._changed:
            if device_id in self._waiting:
                return None
            self._waiting[device_id] = None
            return self._generation

    def leave(self, device_id: str) -> None:
        with self._changed:
            self._waiting.pop(device_id, None)

    def waiting(self) -> list[str]:
        with self._changed:
            return list(self._waiting)

    def notify(self) -> None:
        """Wake every held check-in (a round opened or the run finished)."""
        with self._changed:
            self._generation += 1
            self._changed.notify_all()

    def close(self) -> None:
        """Release every held check-in now and from now on (the server is stopping)."""
        self.closed = True
        self.notify()

    def wait(self, seen: int, timeout: float) -> int:
        """Wait until woken after generation ``seen``, or ``timeout``; the generation now."""
        with self._changed:
            self._changed.wait_for(lambda: self._generation != seen or self.closed, timeout)
            return self._generation


# What held check-ins wait for: the run's status or configuration, or a round opening.
_ROUND_STATE = (
    "SELECT (SELECT status FROM run WHERE id = 1), (SELECT config FROM run WHERE id = 1),"
    f" (SELECT MAX(id) FROM rounds WHERE status = '{RoundStatus.OPEN}')"
)


def watch_rounds(store, lobby: Lobby, stop: threading.Event, interval_s: float = 0.05) -> None:
    """Wake ``lobby`` whenever the store's round state changes: how a WSGI worker
    process learns that the round driver (another process) opened a round, or that an
    operator paused the run through another worker."""
    seen = None
    while not stop.is_set():
        try:
            db = store.connect()
            try:
                while not stop.is_set():
                    current = tuple(db.execute(_ROUND_STATE).fetchone())
                    if seen is not None and current != seen:
                        lobby.notify()
                    seen = current
                    stop.wait(interval_s)
            finally:
                db.close()
        except store.database.errors:  # the database was briefly unavailable: keep watching
            stop.wait(1.0)
