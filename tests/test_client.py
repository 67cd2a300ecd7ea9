"""The protocol client's retries, against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import time

import pytest

from edgefl.client import CoordinatorClient, CoordinatorUnreachable, ProtocolError
from tests.api_helpers import FlakyCoordinator


def test_5xx_is_retried_until_it_succeeds(flaky_server):
    started = time.monotonic()
    assert CoordinatorClient(flaky_server, give_up_after_s=10).status().run is None
    assert FlakyCoordinator.calls == 4
    assert time.monotonic() - started >= 0.3  # three Retry-After waits of 0.1 s


def test_4xx_is_final_and_carries_the_servers_code(flaky_server):
    FlakyCoordinator.failures = 0
    with pytest.raises(ProtocolError) as info:
        CoordinatorClient(flaky_server).download_checkpoint("0" * 64)
    assert info.value.status == 404 and info.value.code == "unknown_checkpoint"
    assert FlakyCoordinator.calls == 1


def test_connection_errors_are_retried_then_given_up(flaky_server):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    started = time.monotonic()
    with pytest.raises(CoordinatorUnreachable, match="ConnectionError"):
        CoordinatorClient(closed, give_up_after_s=1.0).status()
    assert 1.0 <= time.monotonic() - started < 5
