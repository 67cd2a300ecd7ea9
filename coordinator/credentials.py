"""Bearer credentials: device tokens (kept only hashed) and the admin token.

Both the API's views and the server's body policy (``coordinator.access``) ask who a
request is from, the policy before a body is read, on the server's I/O thread, where a
query per upload is affordable but not per byte. ``DeviceTokens`` remembers the tokens
it has seen valid, so the hot path (every check-in) mostly costs a hash.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
from collections import OrderedDict

from coordinator.database import Connection


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def bearer(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    scheme, _, token = (authorization or "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def new_token() -> tuple[str, str]:
    """A fresh token and the hash the store keeps of it."""
    token = secrets.token_urlsafe(32)
    return token, token_hash(token)


def matches(token: str | None, expected_sha256: str | None) -> bool:
    """Whether ``token`` hashes to ``expected_sha256``, in constant time."""
    return bool(token and expected_sha256) and secrets.compare_digest(token_hash(token), expected_sha256)


class DeviceTokens:
    """Which device a token belongs to: from memory, else from the store (and then
    remembered; at most ``size`` tokens, least recently used first out). Unknown tokens
    are not remembered: a device may have registered through another process."""

    def __init__(self, size: int = 100_000):
        self._known: OrderedDict[str, str] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def device_of(self, db: Connection, token: str | None) -> str | None:
        if not token:
            return None
        digest = token_hash(token)
        with self._lock:
            device_id = self._known.get(digest)
            if device_id is not None:
                self._known.move_to_end(digest)
                return device_id
        row = db.execute("SELECT id FROM devices WHERE token_hash = ?", (digest,)).fetchone()
        if row is None:
            return None
        with self._lock:
            self._known[digest] = row["id"]
            if len(self._known) > self._size:
                self._known.popitem(last=False)
        return row["id"]

    def forget_all(self) -> None:
        with self._lock:
            self._known.clear()
