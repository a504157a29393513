"""metrics.py: /metrics, /health, /ready, /status of a real gateway, and the HTTP responder.

The end-to-end tests run the real `etcdgw start --metrics-addr=...` once per relay engine,
in front of real loopback backends and a dead endpoint, generate known traffic and compare
what a Prometheus parser reads from /metrics with it.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import platform
import signal
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

import etcdgw
from _gateway import GatewayProc, TagServer, connect, free_tcp_port, read_line, wait_for
from _parts import Script
from etcdgw import metrics
from etcdgw.balancer import Balancer, Remote
from etcdgw.config import Config, ConfigError, Endpoint
from etcdgw.dial import OwnAddresses, is_local_ip
from etcdgw.log import Logger
from etcdgw.metrics import MetricsServer
from etcdgw.monitor import Monitor
from etcdgw.resolver import AddressBook
from etcdgw.settings import Settings
from etcdgw.table import Conn, ConnTable
from etcdgw.view import View, endpoint_rows

Start = Callable[..., GatewayProc]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


# --- helpers (also used by test_health and test_status) ---------------------------------------


def http_get(
    port: int, path: str, method: str = "GET", host: str = "127.0.0.1", timeout: float = 10
) -> tuple[int, dict[str, str], bytes]:
    """(status, lower-cased headers, body) of one request to the metrics listener."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def scrape(port: int) -> Samples:
    """Every sample of /metrics, parsed by prometheus_client's own parser."""
    status, headers, body = http_get(port, "/metrics")
    assert status == 200, body
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    out: Samples = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, f"no sample {name}{labels}; have {sorted(k[0] for k in samples)}"
    return samples[key]


def recv_exactly(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


@pytest.fixture
def backends() -> Iterator[list[TagServer]]:
    servers = [TagServer("alpha"), TagServer("b")]
    yield servers
    for s in servers:
        s.close()


# --- end to end ---------------------------------------------------------------------------------


def test_metrics_count_the_traffic(
    gateway: Start, backends: list[TagServer], relay_impl: str
) -> None:
    a, b = backends
    dead = f"127.0.0.1:{free_tcp_port()}"
    port, mport = free_tcp_port(), free_tcp_port()
    gateway(
        f"--endpoints={a.addr},{dead},{b.addr}",
        f"--listen-addr=127.0.0.1:{port}",
        f"--metrics-addr=127.0.0.1:{mport}",
        "--retry-delay=10m",
    )
    n = 7
    sent: dict[str, int] = {"alpha": 0, "b": 0}
    received: dict[str, int] = {"alpha": 0, "b": 0}
    conns: dict[str, int] = {"alpha": 0, "b": 0}
    for i in range(n):
        payload = bytes([i]) * (20_000 + 997 * i)
        with connect(port) as s:
            line = read_line(s)
            tag = line.decode().strip()
            s.sendall(payload)
            assert recv_exactly(s, len(payload)) == payload
        sent[tag] += len(payload)
        received[tag] += len(line) + len(payload)
        conns[tag] += 1

    def settled() -> Samples | None:
        got = scrape(mport)
        done = value(got, "etcdgw_connections_finished_total") == n
        return got if done and value(got, "etcdgw_connections_active") == 0 else None

    m = wait_for(settled, timeout=15)
    assert value(m, "etcdgw_connections_accepted_total") == n
    assert value(m, "etcdgw_connections_refused_total") == 0
    assert value(m, "etcdgw_accept_errors_total") == 0
    assert value(m, "etcdgw_bytes_total", direction="to_endpoint") == sum(sent.values())
    assert value(m, "etcdgw_bytes_total", direction="from_endpoint") == sum(received.values())
    for srv in (a, b):
        tag = srv.tag.decode()
        ep = srv.addr
        assert value(m, "etcdgw_endpoint_up", endpoint=ep) == 1
        assert value(m, "etcdgw_endpoint_healthy", endpoint=ep) == 1
        assert value(m, "etcdgw_endpoint_connections_total", endpoint=ep) == conns[tag]
        assert value(m, "etcdgw_endpoint_connections_active", endpoint=ep) == 0
        assert value(m, "etcdgw_endpoint_dial_failures_total", endpoint=ep) == 0
        assert (
            value(m, "etcdgw_endpoint_bytes_total", endpoint=ep, direction="to_endpoint")
            == sent[tag]
        )
        assert (
            value(m, "etcdgw_endpoint_bytes_total", endpoint=ep, direction="from_endpoint")
            == received[tag]
        )
        assert srv.accepted == conns[tag]
    assert value(m, "etcdgw_endpoint_up", endpoint=dead) == 0
    assert value(m, "etcdgw_endpoint_dial_failures_total", endpoint=dead) >= 1
    assert value(m, "etcdgw_endpoint_connections_total", endpoint=dead) == 0
    assert value(m, "etcdgw_health_checks_total", endpoint=dead, result="ok") == 0
    assert value(m, "etcdgw_relay_engine_info", engine=relay_impl) == 1
    assert (
        value(
            m,
            "etcdgw_build_info",
            version=etcdgw.__version__,
            python=platform.python_version(),
        )
        == 1
    )
    assert value(m, "etcdgw_ready") == 1
    assert value(m, "etcdgw_start_time_seconds") <= time.time()
    assert value(m, "process_open_fds") > 0


def test_live_connection_bytes_are_counted(
    gateway: Start, backends: list[TagServer], relay_impl: str
) -> None:
    a = backends[0]
    port, mport = free_tcp_port(), free_tcp_port()
    gateway(
        f"--endpoints={a.addr}",
        f"--listen-addr=127.0.0.1:{port}",
        f"--metrics-addr=127.0.0.1:{mport}",
    )
    with connect(port) as s:
        line = read_line(s)
        payload = b"x" * 123_457
        s.sendall(payload)
        assert recv_exactly(s, len(payload)) == payload
        m = scrape(mport)
        assert value(m, "etcdgw_connections_active") == 1
        assert value(m, "etcdgw_endpoint_connections_active", endpoint=a.addr) == 1
        assert value(m, "etcdgw_bytes_total", direction="to_endpoint") == len(payload)
        assert value(m, "etcdgw_bytes_total", direction="from_endpoint") == len(payload) + len(line)
        assert value(
            m, "etcdgw_endpoint_bytes_total", endpoint=a.addr, direction="to_endpoint"
        ) == len(payload)
        doc = json.loads(http_get(mport, "/status")[2])
        row = doc["endpoints"][0]
        assert (row["active_connections"], row["bytes_to_endpoint"]) == (1, len(payload))
        assert doc["connections"]["active"] == 1


def test_health_ready_status_endpoints(gateway: Start, relay_impl: str) -> None:
    a, b = TagServer("a"), TagServer("b")
    try:
        _health_ready_status(gateway, relay_impl, a, b)
    finally:
        for srv in (a, b):
            if srv.sock.fileno() >= 0:  # TagServer.close() is not idempotent
                srv.close()


def _health_ready_status(gateway: Start, relay_impl: str, a: TagServer, b: TagServer) -> None:
    port, mport = free_tcp_port(), free_tcp_port()
    g = gateway(
        f"--endpoints={a.addr},{b.addr}",
        f"--listen-addr=127.0.0.1:{port}",
        f"--metrics-addr=127.0.0.1:{mport}",
        "--retry-delay=10m",
    )
    status, headers, body = http_get(mport, "/health")
    assert (status, json.loads(body)) == (200, {"health": "true"})
    assert headers["content-type"] == "application/json"
    assert http_get(mport, "/ready")[:1] == (200,)

    doc = json.loads(http_get(mport, "/status")[2])
    assert doc["version"] == etcdgw.__version__
    assert doc["engine"] == relay_impl
    assert doc["ready"] is True
    assert doc["listen"] == [f"127.0.0.1:{port}"]
    assert doc["health_check"] == "tcp"
    assert doc["pid"] == g.pid
    assert 0 <= doc["uptime_seconds"] < 120
    assert doc["connections"] == {
        "active": 0,
        "accepted": 0,
        "refused": 0,
        "accept_errors": 0,
        "finished": 0,
        "reset": 0,
    }
    assert [e["address"] for e in doc["endpoints"]] == [a.addr, b.addr]
    for e in doc["endpoints"]:
        assert e["state"] == "up" and e["healthy"] is True and e["removed"] is False
        assert e["last_error"] == "" and e["down_seconds"] is None

    # Every endpoint dead: the next client is refused and /health turns 503.
    a.close()
    b.close()
    with connect(port) as s:
        assert s.recv(1) == b""
    status, _, body = http_get(mport, "/health")
    assert status == 503 and json.loads(body)["health"] == "false"
    assert http_get(mport, "/ready")[0] == 200  # still listening: ready, just not healthy
    m = scrape(mport)
    assert value(m, "etcdgw_connections_refused_total") == 1
    assert value(m, "etcdgw_endpoint_up", endpoint=a.addr) == 0
    assert value(m, "etcdgw_endpoint_up", endpoint=b.addr) == 0
    doc = json.loads(http_get(mport, "/status")[2])
    for e in doc["endpoints"]:
        assert e["state"] == "down" and e["dial_failures"] >= 1
        assert "connection refused" in e["last_error"] and e["down_seconds"] >= 0
    assert g.stop() == 0


def test_http_details(gateway: Start, backends: list[TagServer]) -> None:
    port, mport = free_tcp_port(), free_tcp_port()
    gateway(
        f"--endpoints={backends[0].addr}",
        f"--listen-addr=127.0.0.1:{port}",
        f"--metrics-addr=127.0.0.1:{mport}",
    )
    assert http_get(mport, "/nope")[0] == 404
    assert http_get(mport, "/")[0] == 404
    assert http_get(mport, "/metrics?name[]=x")[0] == 200
    assert http_get(mport, "/metrics/")[0] == 200
    status, headers, _ = http_get(mport, "/metrics", method="POST")
    assert status == 405 and headers["allow"] == "GET, HEAD"
    status, headers, body = http_get(mport, "/status", method="HEAD")
    assert status == 200 and body == b"" and int(headers["content-length"]) > 0
    assert raw_request(mport, b"GET /health HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.1 200 OK\r\n")
    assert raw_request(mport, b"GET /health HTTP/1.1\nHost: x\n\n").startswith(b"HTTP/1.1 200")
    assert raw_request(mport, b"BLAH\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    long_line = b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\n\r\n"
    assert raw_request(mport, long_line).startswith(b"HTTP/1.1 431 ")
    many = b"GET /health HTTP/1.1\r\n" + b"X-A: b\r\n" * 200 + b"\r\n"
    assert raw_request(mport, many).startswith(b"HTTP/1.1 431 ")
    # A client that connects and goes away costs nothing.
    socket.create_connection(("127.0.0.1", mport), timeout=5).close()
    assert http_get(mport, "/ready")[0] == 200


def test_ready_turns_503_while_draining(gateway: Start, backends: list[TagServer]) -> None:
    """SIGTERM: /ready answers 503 at once (a load balancer stops sending clients) while
    metrics stay up for the drain, which a live connection keeps going."""
    port, mport = free_tcp_port(), free_tcp_port()
    g = gateway(
        f"--endpoints={backends[0].addr}",
        f"--listen-addr=127.0.0.1:{port}",
        f"--metrics-addr=127.0.0.1:{mport}",
        "--drain-timeout=30s",
    )
    with connect(port) as s:
        assert read_line(s) == b"alpha\n"
        g.proc.send_signal(signal.SIGTERM)
        g.wait_log("stopping; draining connections")
        status, _, body = http_get(mport, "/ready")
        assert (status, json.loads(body)) == (503, {"ready": "false"})
        m = scrape(mport)
        assert value(m, "etcdgw_ready") == 0
        assert value(m, "etcdgw_connections_active") == 1
        assert json.loads(http_get(mport, "/status")[2])["ready"] is False
    assert g.proc.wait(15) == 0
    with pytest.raises(OSError):
        http_get(mport, "/ready", timeout=2)


def raw_request(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        try:
            s.sendall(data)
        except OSError:
            pass  # the server may answer (and close) before reading everything
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def test_metrics_addr_in_use_fails_start(relay_impl: str) -> None:
    port = free_tcp_port()
    with socket.create_server(("127.0.0.1", 0)) as taken:
        mport = taken.getsockname()[1]
        g = GatewayProc(
            [
                "start",
                "--endpoints=127.0.0.1:2",
                f"--listen-addr=127.0.0.1:{port}",
                f"--metrics-addr=127.0.0.1:{mport}",
            ],
            impl=relay_impl,
        )
        try:
            assert g.proc.wait(15) == 1
        finally:
            g.stop()
    assert f"listen tcp 127.0.0.1:{mport}: bind: address already in use" in g.lines
    assert "ready to proxy client requests" not in g.messages()
    assert "Traceback" not in "\n".join(g.lines)
    # The client listener bound before it was released again.
    with socket.create_server(("127.0.0.1", port)):
        pass


# --- in process -------------------------------------------------------------------------------


class Standalone:
    """The parts metrics.py reads, real and built without a Gateway or an engine: a Balancer
    over `endpoints`, a ConnTable (pairs put in as the relay thread's own, no sockets), the
    Settings; the relay's byte counts are the test's (`totals`, `live`)."""

    def __init__(self, endpoints: list[Endpoint]) -> None:
        self.log = Logger(level="error")
        self.settings = Settings(Config(endpoints=tuple(endpoints)))
        self.balancer = Balancer(endpoints)
        addresses = AddressBook(Script(), on_change=self.balancer.changed)
        own = OwnAddresses(is_local_ip)
        monitor = Monitor(self.balancer, self.settings, self.log, addresses, own)
        self.table = ConnTable(self.balancer, monitor, self.settings, self.log, lambda: None)
        self.live: dict[int, tuple[int, int]] = {}
        self.sent = (1000, 2000)
        self.ready = True
        self.view = View(
            balancer=self.balancer,
            table=self.table,
            settings=self.settings,
            engine="python",
            listeners=list,
            totals=lambda: self.sent,
            live_bytes=lambda: dict(self.live),
            collect_now=lambda: None,
            ready=lambda: self.ready,
            membership=lambda: None,  # --auto-sync-interval off
        )

    def relaying(self, pid: int, remote: Remote, c2u: int, u2c: int) -> None:
        """A live pair to remote that moved these bytes so far."""
        self.table.conns[pid] = Conn(None, None, remote)
        self.live[pid] = (c2u, u2c)


def standalone(*ports: int) -> Standalone:
    return Standalone([Endpoint("127.0.0.1", p) for p in ports])


def _set(r: Remote, **kw: Any) -> Remote:
    """Counters a test gives a remote (what its traffic would have left there)."""
    for k, v in kw.items():
        setattr(r, k, v)
    return r


def test_collector_aggregates_duplicates_and_removed() -> None:
    st = standalone(1, 1, 2, 3)
    a1, a2, b, gone = st.balancer.remotes
    _set(a1, connections_total=3, bytes_to_endpoint=10, dial_failures=1)
    _set(a2, connections_total=4, bytes_to_endpoint=20)
    st.balancer.mark_down(a2, "dial tcp 127.0.0.1:1: connect: connection refused", 1.0)
    st.balancer.set_healthy(b, False)
    _set(b, health_ok_total=2, health_failed_total=3)
    st.balancer.set_endpoints([a1.endpoint, a2.endpoint, b.endpoint])
    assert gone.removed
    _set(gone, connections_active=1, bytes_from_endpoint=7)
    st.relaying(11, a1, 5, 6)
    st.relaying(12, gone, 1, 2)
    ms = MetricsServer(st.view, "127.0.0.1:0", Logger())
    text = generate_latest(ms.registry).decode()
    m: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            m[(s.name, frozenset(s.labels.items()))] = s.value
    a, bb, g = "127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"
    assert value(m, "etcdgw_endpoint_connections_total", endpoint=a) == 7
    assert value(m, "etcdgw_endpoint_up", endpoint=a) == 0  # one copy down
    assert value(m, "etcdgw_endpoint_dial_failures_total", endpoint=a) == 2
    assert value(m, "etcdgw_endpoint_bytes_total", endpoint=a, direction="to_endpoint") == 35
    assert value(m, "etcdgw_endpoint_healthy", endpoint=bb) == 0
    assert value(m, "etcdgw_health_checks_total", endpoint=bb, result="ok") == 2
    assert value(m, "etcdgw_health_checks_total", endpoint=bb, result="failed") == 3
    # Removed but still carrying a connection: counters yes, state no.
    assert value(m, "etcdgw_endpoint_bytes_total", endpoint=g, direction="from_endpoint") == 9
    assert ("etcdgw_endpoint_up", frozenset({("endpoint", g)})) not in m
    assert value(m, "etcdgw_bytes_total", direction="from_endpoint") == 2000
    assert value(m, "etcdgw_connections_active") == 2
    rows = endpoint_rows(st.view)
    assert [(r["address"], r["removed"]) for r in rows] == [
        (a, False),
        (a, False),
        (bb, False),
        (g, True),
    ]
    ms.close()


def test_bind_errors(no_fd_leak: None) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        ms = MetricsServer(standalone().view, f"127.0.0.1:{port}", Logger())
        with pytest.raises(ConfigError) as e:
            ms.bind()
        assert e.value.message == f"listen tcp 127.0.0.1:{port}: bind: address already in use"
        assert e.value.stream == "stderr"
        ms.close()
    for bad in ("127.0.0.1", "127.0.0.1:http", "127.0.0.1:70000", "[::1"):
        ms = MetricsServer(standalone().view, bad, Logger())
        with pytest.raises(ConfigError) as e:
            ms.bind()
        assert e.value.message == f"failed to validate metrics address: {bad}"
    ms.close()
    ms.close()  # idempotent


def test_server_bounds_slow_and_many_clients(
    monkeypatch: pytest.MonkeyPatch, no_fd_leak: None
) -> None:
    monkeypatch.setattr(metrics, "READ_TIMEOUT", 0.3)
    monkeypatch.setattr(metrics, "MAX_CLIENTS", 2)
    st = standalone(1)
    port = free_tcp_port()
    ms = MetricsServer(st.view, f"127.0.0.1:{port}", Logger(level="error"))
    ms.bind()

    async def main() -> None:
        await ms.start()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        r1, w1 = await asyncio.open_connection("127.0.0.1", port)
        r2, w2 = await asyncio.open_connection("127.0.0.1", port)
        w1.write(b"GET /health HTTP/1.1\r\n")  # and never the blank line
        await asyncio.sleep(0.05)
        # A third client while two are stuck sheds the oldest stuck one (w1), not itself.
        r3, w3 = await asyncio.open_connection("127.0.0.1", port)
        w3.write(b"GET /health HTTP/1.1\r\n\r\n")
        assert (await asyncio.wait_for(r3.read(), 5)).startswith(b"HTTP/1.1 200 ")
        try:
            shed = await asyncio.wait_for(r1.read(), 5)
        except ConnectionResetError:
            shed = b""
        assert shed == b"" and ms.shed == 1
        assert (await asyncio.wait_for(r2.read(), 5)).startswith(b"HTTP/1.1 408 ")
        assert loop.time() - t0 < 3
        for w in (w1, w2, w3):
            w.close()
        r4, w4 = await asyncio.open_connection("127.0.0.1", port)
        w4.write(b"GET /ready HTTP/1.1\r\n\r\n")
        assert (await asyncio.wait_for(r4.read(), 5)).startswith(b"HTTP/1.1 200 ")
        w4.close()
        st.table.draining = True
        r5, w5 = await asyncio.open_connection("127.0.0.1", port)
        w5.write(b"GET /ready HTTP/1.1\r\n\r\n")
        assert (await asyncio.wait_for(r5.read(), 5)).startswith(b"HTTP/1.1 503 ")
        w5.close()
        ms.close()
        ms.close()
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)
        await asyncio.sleep(0.05)

    asyncio.run(main())


class _Monotonic(Protocol):
    """What etcdgw.metrics' reuse window (_expensive) reads of the `time` module."""

    def monotonic(self) -> float: ...


class _Clock:
    """Stands in for the `time` module in etcdgw.metrics: the test moves it by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


_TIME: _Monotonic = time  # mypy: and the module offers it as the protocol says


def test_a_costly_body_is_reused_for_a_bounded_while(monkeypatch: pytest.MonkeyPatch) -> None:
    """/status walks every live pair (the review: 6,000 pairs cost 4-7 ms a body, and a
    scraper back to back slowed the pure engine's relaying to p99 93 ms). A body that cost
    at least REUSE_OVER is served again for REUSE_FACTOR times its cost (at most REUSE_MAX);
    a cheap one never.

    The module's clock is driven by hand and a build "costs" by moving it: with real sleeps a
    late wake-up on a loaded machine made a build dearer (a longer window: the body was still
    reused when the test expected a new one), or a cheap build costly (CI flake)."""
    clock = _Clock()
    fake: _Monotonic = clock  # mypy: the fake offers what is read of the module it replaces
    monkeypatch.setattr(metrics, "time", fake)
    built: list[int] = []
    cost = [0.004]

    def respond(self: MetricsServer, method: str, path: str) -> tuple[int, str, bytes]:
        clock.now += cost[0]
        built.append(1)
        return 200, "application/json", str(len(built)).encode()

    monkeypatch.setattr(MetricsServer, "_respond", respond)
    server = MetricsServer.__new__(MetricsServer)
    server._reuse = {}
    t0 = clock.now
    first = server._expensive("GET", "/status")
    assert server._expensive("GET", "/status") == first  # reused: no second build
    assert server._expensive("GET", "/metrics") != first  # per path
    assert len(built) == 2
    window = cost[0] * metrics.REUSE_FACTOR  # 0.2 s from the start of the build
    clock.now = t0 + window - 0.001
    assert server._expensive("GET", "/status") == first  # still within the window
    clock.now = t0 + window + 0.001
    assert server._expensive("GET", "/status")[2] == b"3"  # the window passed: built again
    cost[0] = 1.0  # a very costly body: reused REUSE_MAX at most, not 50 s
    server._reuse = {}
    t1 = clock.now
    dear = server._expensive("GET", "/status")
    clock.now = t1 + metrics.REUSE_MAX - 0.001
    assert server._expensive("GET", "/status") == dear
    clock.now = t1 + metrics.REUSE_MAX + 0.001
    assert server._expensive("GET", "/status")[2] == b"5"
    cost[0] = 0.001  # cheap bodies are always fresh
    assert cost[0] < metrics.REUSE_OVER
    server._reuse = {}
    assert [server._expensive("GET", "/status")[2] for _ in range(3)] == [b"6", b"7", b"8"]
