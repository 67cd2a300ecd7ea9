"""Waitress, hardened against clients that hold on to what they are given.

Waitress does the I/O of every connection on one thread (``poll``, so a descriptor
past 1,023 is no longer fatal) and runs the WSGI app on a pool of threads. Its own
settings bound a lot (see ``adjustments``); four things it leaves open are closed here
in small subclasses, so that no client can stop the API answering others:

- **Bodies before the app.** Waitress reads a request's whole body before it calls the
  app, so a 401 or a 413 came only after tens of MB were buffered. Here a
  ``body_policy`` sees the request line and headers first; a body it does not accept
  is never read. The request still reaches the app, marked ``EDGEFL_BODY_WITHHELD``,
  so every answer (401, 413 ...) comes from the app's own code, and the connection is
  closed after it (the unread body is discarded).
- **Pipelined requests that nobody reads.** A client may send many requests at once
  and never read the answers. Waitress then blocks a worker thread until the client
  reads; a few such clients took every thread. Here a connection may have at most
  ``MAX_PIPELINED`` requests waiting, responses never block a thread (files are sent
  from their descriptors, anything else is buffered, at most a few per connection),
  and a connection that reads nothing for ``channel_timeout`` is closed.
- **Requests that trickle.** Headers must arrive within ``HEADER_TIMEOUT_S`` and a whole
  request within ``REQUEST_TIMEOUT_S``, however slowly the bytes keep coming.
- **Connection floods.** At the connection limit waitress stops accepting, so held-open
  idle connections locked everyone else out. Here the least recently active
  connections that are not being served are closed to make room instead.

The descriptor limit is raised to its hard limit and the connection limit set from it
(``connection_limit``), so an open file per connection beside its socket always fits.
"""

from __future__ import annotations

import json
import logging
import resource
import socket
import time
from collections.abc import Callable, Mapping

from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser, ParsingError
from waitress.server import TcpWSGIServer

log = logging.getLogger("edgefl.coordinator")

# What a body policy sees: method, path, headers (waitress's form: upper case, "_" for
# "-") and the body's length (None if it is chunked, so unknown until it has been read);
# it returns None to read the body or a reason not to.
BodyPolicy = Callable[[str, str, Mapping[str, str], int | None], str | None]
WITHHELD = "EDGEFL_BODY_WITHHELD"  # the header (HTTP_EDGEFL_BODY_WITHHELD in the environ)

MAX_PIPELINED = 2  # requests waiting on one connection; honest clients send one at a time
HEADER_TIMEOUT_S = 10.0
REQUEST_TIMEOUT_S = 300.0  # a phone's 6.7 MB upload at 200 kB/s, with room
CHANNEL_TIMEOUT_S = 30.0  # reading and writing nothing: longer than a held check-in (10 s)
LINGER_S = 2.0
LINGER_BYTES = 16 << 20
EVICT_FRACTION = 0.05  # of the connection limit, closed at once when it is reached
_FILES_PER_CONNECTION = 4  # its socket, a response file per waiting request, a spooled body
_RESERVED_FILES = 256  # the store, blobs, TensorFlow, logs


def raise_file_limit() -> int:
    """Raise this process's open-file limit to the hard limit; the limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def connection_limit(files: int, cap: int = 4096) -> int:
    """Connections that fit in ``files`` descriptors, at most ``cap``."""
    return max(64, min(cap, (files - _RESERVED_FILES) // _FILES_PER_CONNECTION))


class _JsonError:
    """A request waitress refuses before the app sees it (malformed HTTP, headers too
    large), answered in the API's error format. Nothing a client sends is a 5xx: a
    transfer coding waitress cannot decode is a 400 here, not its 501."""

    def __init__(self, error):
        self.code = 400 if error.code >= 500 else error.code
        self.reason = "Bad Request" if error.code >= 500 else error.reason
        self.detail = f"{error.reason}: {error.body}".rstrip(". ") + "."

    def to_response(self, ident=None):
        body = json.dumps({"error": self.reason.lower().replace(" ", "_"), "detail": self.detail}).encode()
        return f"{self.code} {self.reason}", [("Content-Type", "application/json")], body


class _Parser(HTTPRequestParser):
    """Asks the body policy once the headers are in; a refused body is never read."""

    body_policy: BodyPolicy = staticmethod(lambda method, path, headers, length: None)

    def __init__(self, adj):
        super().__init__(adj)
        self.started = time.monotonic()
        self.withheld = False

    def received(self, data):
        consumed = super().received(data)
        if self.error is not None and not isinstance(self.error, _JsonError):
            self.error = _JsonError(self.error)
        return consumed

    def parse_header(self, header_plus):
        try:
            super().parse_header(header_plus)
        except ValueError as error:  # a Content-Length of thousands of digits, say
            raise ParsingError(f"a header is invalid ({str(error).split(':')[0]})") from None
        self.headers.pop(WITHHELD, None)  # only this server says so
        if not (self.content_length or self.chunked):
            return
        try:
            reason = self.body_policy(self.command, self.path, self.headers, None if self.chunked else self.content_length)
        except Exception:  # the policy failed (say, the database is away): read nothing
            log.exception("the body policy failed; withholding the body")
            reason = "unavailable"
        if reason is not None:
            self.withheld = True
            self.headers[WITHHELD] = reason
            self.headers["CONNECTION"] = "close"
            self.body_rcv = None
            self.content_length = 0
            self.chunked = False
            self.expect_continue = False


class _Channel(HTTPChannel):
    """One connection: the body policy, bounded pipelining, and nothing parsed after a
    request whose body was withheld (what follows is that body). Such a connection is
    not closed at once after its answer: that would reset a client still sending the
    body, which would lose the answer; it stops sending, and reads and drops up to
    ``LINGER_BYTES`` for up to ``LINGER_S`` first."""

    parser_class = _Parser
    lingering_until = 0.0

    def __init__(self, *args, **kwargs):
        self.discarding = False
        self.drained = 0
        super().__init__(*args, **kwargs)

    def received(self, data):
        """Waitress's loop over the requests in ``data``, stopping at a withheld body
        and at more than ``MAX_PIPELINED`` waiting requests."""
        if self.discarding:
            self.drained += len(data)
            if self.lingering_until and self.drained > LINGER_BYTES:
                self.close_now()
            return False
        with self.requests_lock:
            if self.will_close or self.close_when_flushed:
                return False
            while data:
                if self.request is None:
                    self.request = self.parser_class(self.adj)
                consumed = self.request.received(data)
                if (
                    self.request.expect_continue
                    and self.request.headers_finished
                    and not self.requests
                    and not self.sent_continue
                ):
                    self.send_continue()
                if self.request.completed:
                    request, self.request = self.request, None
                    self.sent_continue = False
                    if not request.empty:
                        self.requests.append(request)
                        if len(self.requests) == 1:
                            self.server.add_task(self)
                    if request.withheld:
                        self.discarding = True
                        return True
                    if len(self.requests) > MAX_PIPELINED:
                        log.warning(
                            "closing a connection from %s that pipelined more than %d requests", self.addr[0], MAX_PIPELINED
                        )
                        request.close()
                        self.requests.pop()  # the ones before it are answered; this and the rest are not read
                        self.discarding = self.close_when_flushed = True
                        return True
                if consumed >= len(data):
                    break
                data = data[consumed:]
        return True

    def handle_close(self):
        if self.discarding and not self.lingering_until and self.connected and not self.requests:
            try:
                self.socket.shutdown(socket.SHUT_WR)  # the answer is out; the client sees the end of it
            except OSError:
                return self.close_now()
            self.lingering_until = time.monotonic() + LINGER_S
            self.will_close = self.close_when_flushed = False
            return None
        return self.close_now()

    def close_now(self):
        HTTPChannel.handle_close(self)

    def serving(self) -> bool:
        """Whether a request of this connection is queued or running."""
        return bool(self.requests)

    def stale(self, now_monotonic: float) -> bool:
        """A request that has taken too long to arrive, however slowly it trickles, or
        a lingering close that has lasted long enough."""
        if self.lingering_until:
            return now_monotonic > self.lingering_until
        request = self.request
        if request is None:
            return False
        limit = REQUEST_TIMEOUT_S if request.headers_finished else HEADER_TIMEOUT_S
        return now_monotonic - request.started > limit


class HardenedServer(TcpWSGIServer):
    """Connections are closed here, on the I/O thread, rather than marked to close: a
    connection whose client reads nothing is never writable, so waitress's mark would
    never be acted on. Only connections with no request queued or running are closed
    (no worker thread is using them). A loop turn that closed any accepts nothing: its
    poll may still report a closed descriptor, which a new connection could reuse."""

    channel_class = _Channel
    _running = False
    _closing = False
    _warned_at = 0.0

    def run(self):
        self._running = True
        try:
            super().run()
        finally:
            self._running = False

    def readable(self):
        if self._closing:
            self._close_everything()
            return False
        now = time.time()
        closed = 0
        if now >= self.next_channel_cleanup:
            self.next_channel_cleanup = now + self.adj.cleanup_interval
            closed += self._close_stale(now)
        if self.accepting and len(self._map) >= self.adj.connection_limit:
            closed += self._evict(now)
        return False if closed else super().readable()

    def maintenance(self, now):  # replaced by _close_stale, called from readable
        pass

    def _close_stale(self, now: float) -> int:
        """Close connections idle for ``channel_timeout`` and requests that trickle."""
        idle_since, monotonic = now - self.adj.channel_timeout, time.monotonic()
        stale = [
            channel
            for channel in self.active_channels.values()
            if not channel.serving() and (channel.last_activity < idle_since or channel.stale(monotonic))
        ]
        for channel in stale:
            channel.close_now()
        return len(stale)

    def _evict(self, now: float) -> int:
        """Close the least recently active connections that are not being served."""
        idle = sorted((c for c in self.active_channels.values() if not c.serving()), key=lambda c: c.last_activity)
        evicted = idle[: max(1, int(self.adj.connection_limit * EVICT_FRACTION))]
        for channel in evicted:
            channel.close_now()
        if evicted and now - self._warned_at > 10:
            self._warned_at = now
            log.warning("at the connection limit (%d): closing the least active idle connections", self.adj.connection_limit)
        return len(evicted)

    def _close_everything(self) -> None:
        for channel in list(self.active_channels.values()):
            channel.close_now()
        self.close()

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop accepting, let running requests finish (up to ``timeout_s``), then close
        every connection, on the I/O thread if its loop still runs: no thread writes
        to a closed socket or trigger."""
        self.accepting = False
        self.task_dispatcher.shutdown(cancel_pending=True, timeout=timeout_s)
        if not self._running:
            self._close_everything()
            return
        self._closing = True
        try:
            self.pull_trigger()  # wake the loop now; it would see the flag within a second anyway
        except OSError:
            pass
        deadline = time.monotonic() + timeout_s
        while self._running and time.monotonic() < deadline:
            time.sleep(0.01)


def create(
    app,
    *,
    threads: int,
    body_policy: BodyPolicy,
    host: str = "127.0.0.1",
    port: int = 0,
    sock: socket.socket | None = None,
    **overrides,
) -> HardenedServer:
    """A hardened waitress server for ``app`` on ``host:port``, or on ``sock`` (a
    listening socket inherited from a parent process)."""
    files = raise_file_limit()
    parser = type("Parser", (_Parser,), {"body_policy": staticmethod(body_policy)})
    channel = type("Channel", (_Channel,), {"parser_class": parser})
    server_class = type("Server", (HardenedServer,), {"channel_class": channel})
    settings = dict(
        threads=threads,
        asyncore_use_poll=True,  # select() cannot watch a descriptor past 1,023
        connection_limit=connection_limit(files),
        backlog=2048,
        channel_timeout=CHANNEL_TIMEOUT_S,
        cleanup_interval=2,
        recv_bytes=1 << 18,  # megabyte bodies in a few reads, not waitress's 8 KB at a time
        inbuf_overflow=1 << 20,  # a body past 1 MB is spooled to a temporary file, not held in memory
        outbuf_overflow=1 << 18,  # an answer past 256 kB waits in a temporary file, not in memory
        outbuf_high_watermark=1 << 40,  # never block a worker thread on a client that does not read
        max_request_header_size=64 * 1024,
        max_request_body_size=1 << 28,  # a backstop: the body policy decides (at most the run's largest update)
        ident="edgefl",
    )
    settings.update(overrides)
    if sock is not None:
        adj = Adjustments(**settings, sockets=[sock])
        return server_class(
            app,
            _sock=sock,
            adj=adj,
            bind_socket=False,
            sockinfo=(sock.family, sock.type, sock.proto, sock.getsockname()),
        )
    adj = Adjustments(**settings, host=host, port=port)
    return server_class(app, adj=adj)
