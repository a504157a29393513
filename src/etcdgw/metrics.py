"""--metrics-addr: Prometheus /metrics, /health, /ready and /status on a tiny HTTP responder.

# Strategy:
The hot path only bumps plain integers (table.Counters, balancer.Remote). A scrape turns
them into metric families through one custom prometheus_client Collector (collector.py) in
a private registry, so serving a million connections costs no metric-library calls. The
HTTP side is a minimal HTTP/1.0-1.1 GET responder on the gateway's own asyncio loop (no
thread): bounded request size and read time, a bounded number of clients, one response
per connection.

The loop also relays (the pure engine) and accepts clients, so the responder bounds what one
wake-up costs: at most ACCEPT_BATCH accepts, each tried at once without the loop (a probe's
request is usually there already; a client that connected and left is closed at once), and
at most EXPENSIVE_BUDGET seconds of /metrics and /status bodies, the rest on the next
wake-ups. The listen backlog is the kernel's maximum (net.core.somaxconn, as the relay
listeners): a connect flood fills it instead of overflowing a short one, which drops the
SYNs of real probes for a 1 s retransmit.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import json
import socket
import time
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.process_collector import ProcessCollector

from .collector import GatewayCollector
from .config import KEY_BY_NAME, ConfigError, convert, split_host_port
from .golang import format_duration
from .listeners import bind_tcp, sock_name
from .view import View, is_ready, status_document

if TYPE_CHECKING:
    from .log import Logger

__all__ = ["MetricsServer"]

READ_TIMEOUT = 5.0  # seconds for the whole request head (not per byte: trickling is bounded)
WRITE_TIMEOUT = 5.0  # seconds for the response to reach the kernel
MAX_LINE = 8192  # bytes per request or header line
MAX_HEADERS = 100
MAX_HEAD = 32768  # bytes of a whole request head (a probe sends a few hundred)
# Concurrent metrics clients. At the cap a new client sheds the oldest one still sending its
# request (slow or idle) instead of being refused, so a prober that sends its request at once
# is answered however many slow clients hold connections open: mostly in the wake-up that
# accepts it; else its request is read in the next one, and shedding it would take
# MAX_CLIENTS newcomers, MAX_CLIENTS / ACCEPT_BATCH = 8 wake-ups' worth.
MAX_CLIENTS = 256
ACCEPT_BATCH = 32  # clients accepted per wake-up, 5-10 us each when answered at once
# Seconds of /metrics and /status bodies one wake-up may spend (at least one body): a flood
# of scrapes waits its turn instead of holding up relaying in the same loop.
EXPENSIVE_BUDGET = 0.002
# A /metrics or /status body that took at least REUSE_OVER seconds to build (/status walks
# every live pair: ~1 us each) is served again for REUSE_FACTOR times what it cost, at most
# REUSE_MAX seconds: back-to-back scrapes then cost the loop (which the pure engine relays
# on) at most 1/REUSE_FACTOR of its time. Cheap bodies are always fresh.
REUSE_OVER = 0.002
REUSE_FACTOR = 50
REUSE_MAX = 1.0
ACCEPT_PAUSE = 0.5  # seconds without accepting after EMFILE, ENFILE, ENOBUFS, ENOMEM
READING, QUEUED, WRITING = 1, 2, 3  # a client's state
# What generate_latest() writes: the classic text format every Prometheus version reads.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


# --- the HTTP side ---------------------------------------------------------------------------


_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class _Client:
    """One metrics client: its socket, the request head so far, the response still to send."""

    __slots__ = ("sock", "fd", "buf", "out", "state", "watch", "timer")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.buf = b""
        self.out = memoryview(b"")
        self.state = READING  # READING, QUEUED (for an expensive body) or WRITING
        self.watch = 0  # what the loop watches it for: 0, READING or WRITING
        self.timer: asyncio.TimerHandle | None = None


class MetricsServer:
    """Serves /metrics, /health, /ready and /status on --metrics-addr.

    bind() runs at start-up, before READY, so a taken port fails the start like the client
    listener does; start() then serves on the running loop; close() is idempotent.
    """

    def __init__(self, view: View, addr: str, log: Logger) -> None:
        self.view = view
        self.addr = addr
        self.log = log
        self.started = time.monotonic()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(GatewayCollector(view, time.time()))
        # process_* (CPU, memory, open fds): a relay's fd count is worth watching.
        ProcessCollector(registry=self.registry)
        self.sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Clients the loop watches, in arrival order (the oldest reading one is shed first).
        self._clients: dict[int, _Client] = {}
        # Requests for an expensive body, served EXPENSIVE_BUDGET a wake-up.
        self._queue: collections.deque[tuple[_Client, str, str]] = collections.deque()
        # path -> (reuse until, answer): see REUSE_OVER.
        self._reuse: dict[str, tuple[float, tuple[int, str, bytes]]] = {}
        self._queue_handle: asyncio.Handle | None = None
        self._pause_handle: asyncio.TimerHandle | None = None
        self.shed = 0  # clients dropped to make room (for tests and the log)
        self._closed = False

    def bind(self) -> None:
        """Create and bind the listening socket now.

        Raises:
            ConfigError: `listen tcp <addr>: bind: <reason>` (stderr), as for --listen-addr;
                `failed to validate metrics address: <addr>` for a malformed address.
        """
        # The schema's check of --metrics-addr (config.py owns it); the value is then trusted.
        convert(KEY_BY_NAME["metrics-addr"], self.addr)
        host, port_text = split_host_port(self.addr)
        try:
            self.sock = bind_tcp(host, int(port_text), self.addr)
        except socket.gaierror:
            raise ConfigError(f"failed to resolve metrics host: {host}", stream="stderr") from None

    async def start(self) -> None:
        """Serve on the running loop (bind() first)."""
        if self.sock is None:
            self.bind()
        assert self.sock is not None
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.sock.fileno(), self._on_accept)
        self.log.info(
            "serving metrics",
            address=sock_name(self.sock),
            paths=["/metrics", "/health", "/ready", "/status"],
        )

    def close(self) -> None:
        """Stop listening and drop open metrics clients; idempotent."""
        if self._closed:
            return
        self._closed = True
        for handle in (self._pause_handle, self._queue_handle):
            if handle is not None:
                handle.cancel()
        if self.sock is not None:
            if self._loop is not None:
                self._loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None
        self._queue.clear()
        for c in list(self._clients.values()):
            self._finish(c)

    # --- accepting ----------------------------------------------------------------------------

    def _on_accept(self) -> None:
        assert self.sock is not None
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._pause(e)
                    return
                continue  # ECONNABORTED, EPERM (firewall), ...: that one client is gone
            if not self._make_room():
                conn.close()
                continue
            self._arrived(_Client(conn))

    def _pause(self, e: OSError) -> None:
        """Out of fds or buffers: stop accepting for ACCEPT_PAUSE (never spin on it)."""
        assert self._loop is not None and self.sock is not None
        self._loop.remove_reader(self.sock.fileno())
        self.log.warn(
            "metrics: accept failed; pausing accept",
            error=str(e),
            pause=format_duration(ACCEPT_PAUSE),
        )

        def resume() -> None:
            self._pause_handle = None
            if self.sock is not None and self._loop is not None:
                self._loop.add_reader(self.sock.fileno(), self._on_accept)

        self._pause_handle = self._loop.call_later(ACCEPT_PAUSE, resume)

    def _make_room(self) -> bool:
        """At the cap, drop the oldest client still sending its request, else the oldest
        waiting for an expensive body (a flood of scrapes); False if all are being answered."""
        if len(self._clients) < MAX_CLIENTS:
            return True
        for state in (READING, QUEUED):
            for c in self._clients.values():
                if c.state == state:
                    self._finish(c)
                    self.shed += 1
                    return True
        return False

    def _arrived(self, c: _Client) -> None:
        """A new client: its request is usually there already and is answered now, without
        registering with the loop; one that connected and left is closed now."""
        try:
            data = c.sock.recv(MAX_HEAD, socket.MSG_DONTWAIT)
        except BlockingIOError:
            data = None
        except OSError:
            data = b""
        if data == b"":
            c.sock.close()
            return
        if data is not None:
            c.buf = data
            if self._request(c):
                return
        assert self._loop is not None
        self._track(c, READING)
        c.timer = self._loop.call_later(READ_TIMEOUT, self._timed_out, c)

    # --- reading the request ------------------------------------------------------------------

    def _on_readable(self, c: _Client) -> None:
        try:
            data = c.sock.recv(MAX_HEAD)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._finish(c)  # it went away
            return
        c.buf += data
        self._request(c)

    def _request(self, c: _Client) -> bool:
        """Answer (or queue) the request once its head is complete or broken; False while
        more of it is to come."""
        try:
            parsed = _parse_head(c.buf)
        except _HTTPError as e:
            self._send(c, e.status, "text/plain; charset=utf-8", e.text.encode(), True)
            return True
        if parsed is None:
            return False
        method, path = parsed
        if method in ("GET", "HEAD") and path in ("/metrics", "/status"):
            self._track(c, 0)
            c.state = QUEUED
            if c.timer is not None:
                c.timer.cancel()  # served within a few wake-ups, whatever the flood
                c.timer = None
            self._queue.append((c, method, path))
            if self._queue_handle is None:
                assert self._loop is not None
                self._queue_handle = self._loop.call_soon(self._serve_queue)
            return True
        self._send(c, *self._respond(method, path), method != "HEAD")
        return True

    def _serve_queue(self) -> None:
        """Expensive bodies, EXPENSIVE_BUDGET seconds a wake-up (at least one)."""
        self._queue_handle = None
        end = time.monotonic() + EXPENSIVE_BUDGET
        while self._queue:
            c, method, path = self._queue.popleft()
            if self._clients.get(c.fd) is not c:
                continue  # shed meanwhile (its fd may be another client's by now)
            self._send(c, *self._expensive(method, path), method != "HEAD")
            if time.monotonic() > end:
                break
        if self._queue and not self._closed:
            assert self._loop is not None
            self._queue_handle = self._loop.call_soon(self._serve_queue)

    def _timed_out(self, c: _Client) -> None:
        c.timer = None
        if c.state == READING:
            self._send(c, 408, "text/plain; charset=utf-8", b"request timeout\n", True)
        else:
            self._finish(c)  # the response did not reach the kernel in WRITE_TIMEOUT

    # --- answering ----------------------------------------------------------------------------

    def _send(self, c: _Client, status: int, ctype: str, body: bytes, with_body: bool) -> None:
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"
            f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            "Cache-Control: no-store\r\nConnection: close\r\n"
            + ("Allow: GET, HEAD\r\n" if status == 405 else "")
            + "\r\n"
        )
        data = head.encode("latin-1") + (body if with_body else b"")
        try:
            n = c.sock.send(data, socket.MSG_DONTWAIT)
        except BlockingIOError:
            n = 0
        except OSError:
            n = len(data)  # it went away: nothing more to send
        if n == len(data):
            self._finish(c)
            return
        # The rest when the client reads: the loop watches it, for at most WRITE_TIMEOUT.
        assert self._loop is not None
        c.out = memoryview(data)[n:]
        self._track(c, WRITING)
        c.state = WRITING
        if c.timer is not None:
            c.timer.cancel()
        c.timer = self._loop.call_later(WRITE_TIMEOUT, self._timed_out, c)

    def _on_writable(self, c: _Client) -> None:
        try:
            n = c.sock.send(c.out)
        except BlockingIOError:
            return
        except OSError:
            n = len(c.out)
        c.out = c.out[n:]
        if not c.out:
            self._finish(c)

    # --- the loop's part ----------------------------------------------------------------------

    def _track(self, c: _Client, watch: int) -> None:
        """Keep c among the clients (MAX_CLIENTS), the loop watching it for watch (READING,
        WRITING or 0: nothing)."""
        assert self._loop is not None
        if self._clients.get(c.fd) is not c:
            c.sock.setblocking(False)
            self._clients[c.fd] = c
        if c.watch != watch:
            self._unwatch(c)
            if watch == READING:
                self._loop.add_reader(c.fd, self._on_readable, c)
            elif watch == WRITING:
                self._loop.add_writer(c.fd, self._on_writable, c)
            c.watch = watch

    def _unwatch(self, c: _Client) -> None:
        assert self._loop is not None
        if c.watch == READING:
            self._loop.remove_reader(c.fd)
        elif c.watch == WRITING:
            self._loop.remove_writer(c.fd)
        c.watch = 0

    def _finish(self, c: _Client) -> None:
        """Close a client once, whatever the loop was watching it for."""
        if self._clients.get(c.fd) is c:
            del self._clients[c.fd]
            self._unwatch(c)
        if c.timer is not None:
            c.timer.cancel()
            c.timer = None
        c.sock.close()

    def _expensive(self, method: str, path: str) -> tuple[int, str, bytes]:
        """/metrics or /status: built, or reused while a costly build is recent."""
        now = time.monotonic()
        hit = self._reuse.get(path)
        if hit is not None and hit[0] > now:
            return hit[1]
        answer = self._respond(method, path)
        cost = time.monotonic() - now
        if cost >= REUSE_OVER and answer[0] == 200:
            self._reuse[path] = (now + min(cost * REUSE_FACTOR, REUSE_MAX), answer)
        else:
            self._reuse.pop(path, None)
        return answer

    def _respond(self, method: str, path: str) -> tuple[int, str, bytes]:
        try:
            return self.respond(method, path)
        except Exception as e:  # a bug must not leave the client (or the queue) hanging
            self.log.error("metrics: internal error", path=path, error=repr(e))
            return 500, "text/plain; charset=utf-8", b"internal error\n"

    def respond(self, method: str, path: str) -> tuple[int, str, bytes]:
        """(status, content type, body) for one request; pure over the gateway's state."""
        if path not in ("/metrics", "/health", "/ready", "/status"):
            return 404, "text/plain; charset=utf-8", b"404 page not found\n"
        if method not in ("GET", "HEAD"):
            return 405, "text/plain; charset=utf-8", b"method not allowed\n"
        view = self.view
        if path in ("/metrics", "/status"):
            view.collect_now()  # what the relay thread has not reported yet (native accept)
        if path == "/metrics":
            return 200, CONTENT_TYPE, generate_latest(self.registry)
        if path == "/health":
            # etcd's own /health shape, so the same probes work against the gateway.
            if view.balancer.any_usable():
                return 200, "application/json", b'{"health":"true"}\n'
            return 503, "application/json", b'{"health":"false","reason":"no usable endpoint"}\n'
        if path == "/ready":
            if is_ready(view):
                return 200, "application/json", b'{"ready":"true"}\n'
            return 503, "application/json", b'{"ready":"false"}\n'
        doc = status_document(view, self.started)
        return 200, "application/json", (json.dumps(doc, indent=1) + "\n").encode()


class _HTTPError(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text + "\n"


def _parse_head(buf: bytes) -> tuple[str, str] | None:
    """(method, path without query) once buf holds a whole request head; None while more is
    to come. Bodies are not read.

    Raises:
        _HTTPError: 400 for a malformed request line, 431 for a line, a head or a header
            count over the limits.
    """
    lines = buf.split(b"\n")
    done = lines[:-1]  # complete lines; the last element is what follows the last newline
    if any(len(line) > MAX_LINE for line in done) or len(lines[-1]) > MAX_LINE:
        raise _HTTPError(431, "request line or header too long")
    if not done:
        return None
    parts = done[0].decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _HTTPError(400, "bad request line")
    blank = next((i for i, line in enumerate(done) if i and line in (b"", b"\r")), None)
    if (blank or len(done)) > MAX_HEADERS:
        raise _HTTPError(431, "too many header lines")
    if blank is None:
        if len(buf) > MAX_HEAD:
            raise _HTTPError(431, "request head too large")
        return None
    method, target = parts[0], parts[1]
    if target.startswith(("http://", "https://")):
        # absolute-form (a proxy-style request): keep only the path
        target = "/" + target.split("://", 1)[1].partition("/")[2]
    path = target.split("?", 1)[0].split("#", 1)[0]
    if len(path) > 1:
        path = path.rstrip("/")
    return method, path
