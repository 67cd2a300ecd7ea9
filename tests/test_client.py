"""The protocol client's retries, against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from edgefl.client import CoordinatorClient, CoordinatorUnreachable, ProtocolError


class FlakyCoordinator(BaseHTTPRequestHandler):
    """Answers 503 (with Retry-After) until ``failures`` run out, then the real answer."""

    failures = 0
    calls = 0

    def do_GET(self):
        cls = type(self)
        cls.calls += 1
        if cls.failures > 0:
            cls.failures -= 1
            self.send_response(503)
            self.send_header("Retry-After", "0.1")
            self.end_headers()
            return
        if self.path == "/v1/status":
            body, status = json.dumps({"run": None}).encode(), 200
        else:
            body, status = json.dumps({"error": "unknown_checkpoint", "detail": "No such checkpoint."}).encode(), 404
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def flaky_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FlakyCoordinator)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    FlakyCoordinator.failures, FlakyCoordinator.calls = 3, 0
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


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
