"""Clients with no token, over real sockets to the hardened server: floods of
connections, pipelined requests nobody reads, bodies that stall, headers that trickle.
Throughout, other clients' status reads and check-ins are answered, and bodies the
coordinator will refuse are never read."""

from __future__ import annotations

import json
import socket
import threading
import time
from contextlib import closing, contextmanager

import psutil
import pytest
import requests

from coordinator import httpserver
from coordinator.access import BodyPolicy
from tests.api_helpers import register, rejections, take_task, update_body

pytestmark = pytest.mark.usefixtures("open_round")


@contextmanager
def live(app, **overrides):
    """The app behind the hardened server on 127.0.0.1, in a thread of this process."""
    server = httpserver.create(app, threads=4, body_policy=BodyPolicy(app), host="127.0.0.1", port=0, **overrides)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.effective_port}", server
    finally:
        server.shutdown(timeout_s=5)
        thread.join(timeout=10)
        assert not thread.is_alive()


def answered(url: str, headers: dict | None = None, path: str = "/v1/status", method: str = "GET") -> float:
    """Seconds a fresh client waits for a 2xx answer (it fails the test otherwise)."""
    started = time.monotonic()
    response = requests.request(method, url + path, headers=headers, timeout=5)
    assert response.status_code < 300, response.text
    return time.monotonic() - started


def connect(url: str, receive_buffer: int | None = None) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    if receive_buffer:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.connect((host, int(port)))
    return sock


def read_answer(sock: socket.socket, timeout: float = 5.0) -> tuple[int, dict, bool]:
    """(status, JSON body, whether the server then closed the connection)."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "closed without an answer"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    length = int(next(line.split(":")[1] for line in lines if line.lower().startswith("content-length")))
    while len(body) < length:
        body += sock.recv(65536)
    try:
        closed = sock.recv(1) == b""
    except (TimeoutError, ConnectionResetError):
        closed = False
    return int(lines[0].split()[1]), json.loads(body[:length]), closed


def open_files() -> int:
    return psutil.Process().num_fds()


def test_pipelined_requests_nobody_reads_take_no_threads(app, open_round, client):
    """Twenty connections each pipelining fifty checkpoint downloads (6.7 MB answers,
    never read) with a tiny receive buffer: once took every worker thread and then
    every descriptor. Honest reads and check-ins are still answered at once."""
    headers, task = open_round
    with live(app) as (url, server):
        baseline = open_files()
        request = f"GET /v1/checkpoints/{task['checkpoint_sha256']} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        attackers = [connect(url, receive_buffer=4096) for _ in range(20)]
        for sock in attackers:
            sock.sendall(request * 50)
        latencies = [answered(url) for _ in range(10)]
        latencies += [answered(url, headers, "/v1/checkin", "POST") for _ in range(5)]
        assert max(latencies) < 2.0, latencies
        assert open_files() - baseline < 20 * (httpserver.MAX_PIPELINED + 2)  # bounded per connection
        for sock in attackers:
            sock.close()


def test_a_connection_flood_past_the_limit_closes_idle_connections_not_the_door(app):
    with live(app, connection_limit=64) as (url, server):
        idle = [connect(url) for _ in range(200)]  # idle, more than the limit
        for _ in range(5):  # accepted after all of them: the backlog is first in, first out
            assert answered(url) < 2.0
        assert len(server.active_channels) <= 64
        for sock in idle:
            sock.close()


@pytest.mark.parametrize(
    "authorization, status, code",
    [
        (None, 401, "missing_token"),
        ("Bearer not-a-device", 401, "unknown_token"),
        ("Basic abc", 401, "missing_token"),
    ],
)
def test_an_upload_without_a_valid_token_is_refused_before_its_body(app, store, open_round, authorization, status, code):
    """Headers announcing 60 MB, then nothing: the answer comes at once, the
    connection is closed, and nothing of the body was read or stored."""
    _, task = open_round
    before = store.snapshot()
    with live(app) as (url, _):
        sock = connect(url)
        auth = f"Authorization: {authorization}\r\n" if authorization else ""
        sock.sendall(
            f"POST /v1/rounds/{task['round_id']}/updates HTTP/1.1\r\nHost: x\r\n{auth}"
            "Content-Type: application/octet-stream\r\nContent-Length: 60000000\r\n\r\n".encode()
        )
        got, body, closed = read_answer(sock)
        assert (got, body["error"], closed) == (status, code, True)
        sock.close()
    assert store.snapshot() == before and rejections(store) == []


def test_a_device_upload_too_large_for_the_run_is_refused_before_its_body_and_logged(app, store, open_round):
    headers, task = open_round
    with live(app) as (url, _):
        sock = connect(url)
        sock.sendall(
            f"POST /v1/rounds/{task['round_id']}/updates HTTP/1.1\r\nHost: x\r\nAuthorization: {headers['Authorization']}\r\n"
            "Content-Type: application/octet-stream\r\nContent-Length: 60000000\r\n\r\n".encode()
        )
        got, body, closed = read_answer(sock)
        assert (got, body["error"], closed) == (413, "update_too_large", True)
        sock.close()
        assert rejections(store) == [(task["round_id"], "update_too_large", 0)]
        # A well-sized upload on a new connection is read and accepted as usual.
        response = requests.post(
            f"{url}/v1/rounds/{task['round_id']}/updates",
            data=update_body(),
            headers={**headers, "Content-Type": "application/octet-stream"},
            timeout=10,
        )
        assert response.status_code == 202


@pytest.mark.parametrize(
    "request_head, status, code",
    [
        ("POST /v1/checkin HTTP/1.1\r\nContent-Length: 10000000\r\n", 413, "takes_no_body"),
        ("POST /v1/devices HTTP/1.1\r\nContent-Length: 10000000\r\n", 413, "takes_no_body"),
        (
            "POST /v1/admin/config HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 10000000\r\n",
            403,
            "admin_disabled",
        ),
        ("POST /v1/rounds/1/updates HTTP/1.1\r\nTransfer-Encoding: chunked\r\n", 411, "length_required"),
        ("POST /v1/rounds/1/updates HTTP/1.1\r\nContent-Length: 5\r\nEdgefl-Body-Withheld: no\r\n", 401, "missing_token"),
    ],
)
def test_bodies_nobody_may_send_are_never_read(app, store, request_head, status, code):
    before = store.snapshot()
    with live(app) as (url, _):
        sock = connect(url)
        sock.sendall(f"{request_head}Host: x\r\n\r\n".encode())
        got, body, closed = read_answer(sock)
        assert (got, body["error"]) == (status, code)
        sock.close()
    assert store.snapshot() == before


def test_headers_that_trickle_and_idle_connections_are_closed(app, monkeypatch):
    monkeypatch.setattr(httpserver, "HEADER_TIMEOUT_S", 1.0)
    with live(app, cleanup_interval=0.2, channel_timeout=1.5) as (url, server):
        trickling, idle = connect(url), connect(url)
        deadline = time.monotonic() + 10
        closed = False
        for byte in b"GET /v1/status HTTP/1.1\r\nX-Slow: " + b"a" * 100:
            try:
                trickling.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            trickling.settimeout(0.3)
            try:
                if trickling.recv(1) == b"":
                    closed = True
                    break
            except TimeoutError:
                pass
            assert time.monotonic() < deadline
        assert closed  # headers never finished within HEADER_TIMEOUT_S, though bytes kept coming
        idle.settimeout(5)
        assert idle.recv(1) == b""  # closed after channel_timeout without a byte either way
        assert answered(url) < 2.0


def test_the_server_raises_its_descriptor_limit_and_sizes_connections_to_it():
    import resource

    files = httpserver.raise_file_limit()
    assert files == resource.getrlimit(resource.RLIMIT_NOFILE)[0] == resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    assert httpserver.connection_limit(10_000) == (10_000 - 256) // 4 and httpserver.connection_limit(20_000) == 4096
    assert httpserver.connection_limit(1_048_576) == 4096 and httpserver.connection_limit(100) == 64


def test_registered_devices_are_served_while_the_attacks_go_on(app, client, driver):
    """Check-ins of honest devices, each on its own connection, while the attacks of
    the tests above run together."""
    with live(app, connection_limit=128) as (url, _):
        honest = [register(client) for _ in range(3)]
        attackers = [connect(url, receive_buffer=4096) for _ in range(300)]
        with closing(connect(url)) as staller:
            staller.sendall(b"POST /v1/rounds/1/updates HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n")
            for headers in honest:
                assert answered(url, headers, "/v1/checkin", "POST") < 2.0
        for sock in attackers:
            sock.close()
    take_task(client, honest[0])


@pytest.mark.parametrize(
    "raw, status",
    [
        (b"POST /v1/checkin HTTP/1.1\r\nHost: x\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n", 400),
        (b"POST /v1/checkin HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n", 400),
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /v1/status HTTP/1.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", 431),
        (b"POST /v1/rounds/1/updates HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
    ],
)
def test_malformed_http_gets_a_json_4xx_and_the_server_goes_on(app, store, raw, status):
    before = store.snapshot()
    with live(app) as (url, _):
        sock = connect(url)
        sock.sendall(raw)
        got, body, closed = read_answer(sock)
        assert got == status and set(body) == {"error", "detail"} and closed
        sock.close()
        assert answered(url) < 2.0
    assert store.snapshot() == before


def test_a_chunked_body_is_never_read_whatever_content_length_says(app, store, open_round):
    """Transfer-Encoding: chunked with a small Content-Length (request smuggling's
    classic) from a valid device: the size is unknown up front, so the body is withheld."""
    headers, task = open_round
    with live(app) as (url, _):
        sock = connect(url)
        sock.sendall(
            f"POST /v1/rounds/{task['round_id']}/updates HTTP/1.1\r\nHost: x\r\nAuthorization: {headers['Authorization']}\r\n"
            "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
            + b"100000\r\n"
            + b"\0" * 65536
        )
        got, body, closed = read_answer(sock)
        assert (got, body["error"], closed) == (411, "length_required", True)
        sock.close()
    assert rejections(store) == []


def test_a_client_still_sending_a_refused_body_reads_its_answer(app, open_round):
    """requests sends the whole body before reading: the server answers 401 from the
    headers, then drains what keeps coming instead of resetting the connection, so the
    client gets the answer rather than a 'connection reset'."""
    _, task = open_round
    with live(app) as (url, _):
        for _ in range(3):
            response = requests.post(
                f"{url}/v1/rounds/{task['round_id']}/updates",
                data=b"\0" * (8 << 20),
                headers={"Authorization": "Bearer not-a-device", "Content-Type": "application/octet-stream"},
                timeout=10,
            )
            assert response.status_code == 401 and response.json()["error"] == "unknown_token"
