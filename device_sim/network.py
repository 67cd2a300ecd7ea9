"""A phone's flaky network, as a transport under a device's real HTTP client.

The faults are made below ``edgefl.client``, so what handles them is the client's own
retries and the protocol's idempotence, as on a phone: a request lost on its way never
reaches the coordinator and is sent again; a request whose answer is lost on the way
back did reach it (a check-in selected the device, an upload was stored), and its retry
must be answered as if it were the first (the task again; ``duplicate_update``, which the
agent counts as reported). A slow request holds its thread for ``slow_s`` longer.
"""

from __future__ import annotations

import random
import threading
import time

import requests
from requests.adapters import HTTPAdapter

from device_sim.profile import Network


class FlakyNetwork(HTTPAdapter):
    """An HTTP adapter that loses and slows requests at a profile's rates, drawn from ``rng``."""

    def __init__(self, network: Network, rng: random.Random):
        super().__init__()
        self.network = network
        self.rng = rng
        self.faults = {"lost_requests": 0, "lost_answers": 0, "slow_requests": 0}
        self._lock = threading.Lock()  # a device's requests come from its host's threads, one at a time, but count safely

    def _draw(self) -> tuple[bool, bool, bool]:
        n = self.network
        with self._lock:
            slow = self.rng.random() < n.slow_rate
            lost = self.rng.random() < n.failure_rate
            answer_lost = lost and self.rng.random() < 0.5
            if slow:
                self.faults["slow_requests"] += 1
            if lost:
                self.faults["lost_answers" if answer_lost else "lost_requests"] += 1
        return slow, lost and not answer_lost, answer_lost

    def send(self, request, **kwargs):
        slow, request_lost, answer_lost = self._draw()
        if slow:
            time.sleep(self.network.slow_s)
        if request_lost:
            raise requests.ConnectionError("simulated network: the request was lost", request=request)
        response = super().send(request, **kwargs)
        if answer_lost:  # the coordinator has done its part; the device never hears of it
            response.close()
            raise requests.ConnectionError("simulated network: the answer was lost", request=request)
        return response


def flaky_or_none(network: Network, seed: int, index: int) -> FlakyNetwork | None:
    """Device ``index``'s network, or None when the profile makes no faults."""
    if not (network.failure_rate or (network.slow_rate and network.slow_s)):
        return None
    return FlakyNetwork(network, random.Random(f"{seed}:{index}:network"))
