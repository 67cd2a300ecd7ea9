"""Who drives the rounds, decided in the database.

However many coordinator processes share a store, one at a time may open, close,
aggregate and commit rounds: the one holding the ``round_driver`` lease. Its holder
renews it inside every write transaction of a transition, so a holder that lost it
(it hung past the expiry and another took over) finds out before its transition
commits, and rolls back instead of committing a round twice. A holder that dies
stops renewing; another takes over when the lease expires, or at once when the dead
holder ran on the same host (its process id is gone), as after a restart.
"""

from __future__ import annotations

import os
import socket

from coordinator.database import Connection

ROUND_DRIVER = "round_driver"
LEASE_S = 10.0


def take(db: Connection, name: str, holder: str, now: float, seconds: float = LEASE_S) -> bool:
    """Take or renew the lease until ``now + seconds``; False (changing nothing) while
    another holder's lease runs. Call inside a write transaction."""
    row = db.execute("SELECT holder, expires_at FROM leases WHERE name = ?", (name,)).fetchone()
    if row is None:
        db.execute("INSERT INTO leases (name, holder, expires_at) VALUES (?, ?, ?)", (name, holder, now + seconds))
        return True
    if row["holder"] != holder and row["expires_at"] > now and not died_here(row["holder"]):
        return False
    db.execute("UPDATE leases SET holder = ?, expires_at = ? WHERE name = ?", (holder, now + seconds, name))
    return True


def release(db: Connection, name: str, holder: str) -> None:
    """Give the lease up at once (on a clean stop), so a successor need not wait it out."""
    db.execute("DELETE FROM leases WHERE name = ? AND holder = ?", (name, holder))


def holder_name(nonce: str) -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{nonce}"


def died_here(holder: str) -> bool:
    """Whether ``holder`` ran on this host in a process that no longer exists."""
    host, _, rest = holder.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    return False
