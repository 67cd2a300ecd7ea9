"""Who may register a device, and how many anyone can create.

Registration is the one call a stranger can make that writes a row. An operator who
hands devices an enrolment secret (``serve --enrolment-secret-file``) makes it
authenticated; without one (the demo's default) anyone may register, but a token
bucket bounds how fast (per server process) and ``max_devices`` how many in all, so
no client can grow the store without limit. Privacy accounting does not count
registrations at all (see ``rounds.privacy_spent``).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from coordinator import credentials
from coordinator.errors import ApiError

RATE_PER_S = 50.0  # sustained registrations per second, per server process
BURST = 2000  # a whole fleet starting at once
MAX_DEVICES = 100_000


@dataclass
class Enrolment:
    secret_sha256: str | None = None
    rate_per_s: float = RATE_PER_S
    burst: int = BURST
    max_devices: int = MAX_DEVICES
    _tokens: float = field(default=-1.0, repr=False)
    _at: float = field(default=0.0, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def admit(self, authorization: str | None, now: float | None = None) -> None:
        """Nothing if this caller may register a device now (its secret, the rate);
        else the ApiError that says why."""
        if self.secret_sha256 is not None:
            secret = credentials.bearer(authorization)
            if secret is None:
                raise ApiError(
                    401,
                    "enrolment_required",
                    "This coordinator enrols devices with a secret: send it as 'Authorization: Bearer <secret>'.",
                )
            if not credentials.matches(secret, self.secret_sha256):
                raise ApiError(401, "bad_enrolment_secret", "That is not this coordinator's enrolment secret.")
        now = time.monotonic() if now is None else now
        with self._lock:
            if self._tokens < 0:
                self._tokens, self._at = float(self.burst), now
            self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.rate_per_s)
            self._at = now
            if self._tokens < 1:
                wait = (1 - self._tokens) / self.rate_per_s
                raise ApiError(
                    429,
                    "registering_too_fast",
                    "Too many registrations just now; retry shortly.",
                    {"Retry-After": str(max(1, round(wait)))},
                )
            self._tokens -= 1

    def check_room(self, registered: int) -> None:
        """Nothing if the store may hold one more device (under the write lock)."""
        if registered >= self.max_devices:
            raise ApiError(
                429,
                "too_many_devices",
                f"The coordinator holds its limit of {self.max_devices} devices; no more may register.",
                {"Retry-After": "60"},
            )
