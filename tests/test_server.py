"""server.py end to end, on real sockets: selection, failover, recovery, relay, lifecycle.

Every test runs the real `etcdgw start` process once per way of running: the Cython engine
with native accept (the default), the Cython engine accepting in the loop
(`server.NATIVE_ACCEPT = False`, set through bench/launch.py as the benchmark sets it), and
the pure-Python engine; in front of real TCP backends on loopback.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable

import pytest

from _gateway import (
    GatewayProc,
    TagServer,
    connect,
    free_tcp_port,
    read_line,
    silent_listener,
    tag_via,
    wait_for,
)

Start = Callable[..., GatewayProc]

# variant -> (engine, bench/launch.py switches)
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "cython": ("cython", ()),
    "cython-loop-accept": ("cython", ("etcdgw.server:NATIVE_ACCEPT=0",)),
    "python": ("python", ()),
}


@pytest.fixture(
    params=[
        pytest.param("cython", marks=pytest.mark.c_extension),
        pytest.param("cython-loop-accept", marks=pytest.mark.c_extension),
        "python",
    ]
)
def variant(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def relay_impl(variant: str) -> str:
    """The engine under test (overrides conftest's: this module runs three variants)."""
    return VARIANTS[variant][0]


@pytest.fixture
def gateway_sets(variant: str) -> tuple[str, ...]:
    return VARIANTS[variant][1]


def accept_of(variant: str) -> str:
    """Who accepts and connects clients (the `accept` field of the ready line)."""
    return "relay-thread" if variant == "cython" else "loop"


def dead_port() -> int:
    """A loopback port nobody listens on (connect is refused at once)."""
    return free_tcp_port()


@pytest.fixture
def backends() -> list[TagServer]:
    servers = [TagServer(t) for t in ("a", "b", "c")]
    yield servers  # type: ignore[misc]
    for s in servers:
        s.close()


def test_round_robin_in_list_order(gateway: Start, backends: list[TagServer], variant: str) -> None:
    port = free_tcp_port()
    eps = ",".join(f"http://{b.addr}" for b in backends)
    g = gateway(f"--endpoints={eps}", f"--listen-addr=127.0.0.1:{port}")
    ready = g.wait_ready()
    assert ready["endpoints"] == [b.addr for b in backends]
    # The Cython engine accepts and connects in its relay thread (native accept) unless
    # NATIVE_ACCEPT is off, so every test here runs both paths for it.
    assert ready["accept"] == accept_of(variant)
    assert [tag_via(port) for _ in range(7)] == ["a", "b", "c", "a", "b", "c", "a"]
    assert g.stop() == 0


def test_flags_before_start_and_repeated_endpoints(
    relay_impl: str, gateway_sets: tuple[str, ...], backends: list[TagServer]
) -> None:
    port = free_tcp_port()
    a, b, _ = backends
    g = GatewayProc(
        [f"--endpoints={a.addr}", "start", "--endpoints", b.addr, "--listen-addr",
         f"127.0.0.1:{port}"],
        impl=relay_impl,
        sets=gateway_sets,
    )  # fmt: skip
    try:
        assert g.wait_ready()["endpoints"] == [a.addr, b.addr]
        assert [tag_via(port) for _ in range(3)] == ["a", "b", "a"]
    finally:
        assert g.stop() == 0


def test_failover_marks_endpoint_down(gateway: Start, backends: list[TagServer]) -> None:
    port, dead = free_tcp_port(), dead_port()
    a, b, _ = backends
    g = gateway(
        f"--endpoints=127.0.0.1:{dead},{a.addr},{b.addr}", f"--listen-addr=127.0.0.1:{port}"
    )
    # The first client is picked onto the dead endpoint and transparently moved on.
    assert tag_via(port) == "a"
    rec = g.wait_log("deactivated endpoint", address=f"127.0.0.1:{dead}")
    assert rec["interval"] == "1m0s" and rec["level"] == "warn"
    assert "connection refused" in rec["error"]
    # Later clients skip it.
    assert sorted(tag_via(port) for _ in range(4)) == ["a", "a", "b", "b"]


def test_all_down_closes_clients_then_recovers_without_waiting(gateway: Start) -> None:
    port, up = free_tcp_port(), free_tcp_port()
    g = gateway(f"--endpoints=127.0.0.1:{up}", f"--listen-addr=127.0.0.1:{port}")
    t0 = time.monotonic()
    with connect(port) as s:
        assert s.recv(10) == b""  # closed, nothing written
    assert time.monotonic() - t0 < 3
    g.wait_log("deactivated endpoint")
    # The member comes back: the Go gateway would refuse clients for up to --retry-delay
    # (1m); etcdgw retries an inactive endpoint once before refusing a client.
    with TagServer("back", port=up):
        assert tag_via(port) == "back"
        g.wait_log("activated", address=f"127.0.0.1:{up}")


def test_retry_delay_reactivates_in_background(gateway: Start) -> None:
    port, up = free_tcp_port(), free_tcp_port()
    with TagServer("x") as x:
        g = gateway(
            f"--endpoints=127.0.0.1:{up},{x.addr}",
            f"--listen-addr=127.0.0.1:{port}",
            "--retry-delay=300ms",
        )
        assert tag_via(port) == "x"
        g.wait_log("deactivated endpoint", address=f"127.0.0.1:{up}")
        g.wait_log(
            "failed to activate endpoint (stay inactive for another interval)",
            address=f"127.0.0.1:{up}",
        )
        with TagServer("up", port=up):
            g.wait_log("activated", address=f"127.0.0.1:{up}", timeout=5)
            assert sorted(tag_via(port) for _ in range(2)) == ["up", "x"]


def test_silent_endpoint_fails_over_after_dial_timeout(gateway: Start) -> None:
    lst, fillers = silent_listener()
    try:
        probe = socket.socket()
        probe.settimeout(0.5)
        with pytest.raises(TimeoutError):  # really silent
            probe.connect(lst.getsockname())
        probe.close()
        port = free_tcp_port()
        with TagServer("alive") as alive:
            g = gateway(
                f"--endpoints=127.0.0.1:{lst.getsockname()[1]},{alive.addr}",
                f"--listen-addr=127.0.0.1:{port}",
                "--dial-timeout=400ms",
            )
            t0 = time.monotonic()
            assert tag_via(port) == "alive"
            assert time.monotonic() - t0 < 3
            rec = g.wait_log("deactivated endpoint")
            assert "i/o timeout" in rec["error"]
    finally:
        for c in fillers:
            c.close()
        lst.close()


def echo_through(port: int, payload: bytes, host: str = "127.0.0.1") -> bytes:
    """Send payload, half-close, read everything back until EOF (concurrently)."""
    s = connect(port, host, timeout=60)
    err: list[BaseException] = []

    def writer() -> None:
        try:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
        except BaseException as e:  # noqa: BLE001 - reported below
            err.append(e)

    t = threading.Thread(target=writer)
    t.start()
    chunks = []
    while True:
        d = s.recv(1 << 20)
        if not d:
            break
        chunks.append(d)
    t.join(60)
    s.close()
    assert not err, err
    return b"".join(chunks)


@pytest.mark.parametrize("size", [0, 1, 65537, 50 * 1024 * 1024])
def test_byte_exact_both_ways_with_half_close(gateway: Start, size: int) -> None:
    port = free_tcp_port()
    payload = os.urandom(size)
    with TagServer("echo") as echo:
        g = gateway(f"--endpoints={echo.addr}", f"--listen-addr=127.0.0.1:{port}")
        baseline = g.fds()
        got = echo_through(port, payload)
        assert got[:5] == b"echo\n"
        assert len(got) == size + 5
        assert hashlib.sha256(got[5:]).digest() == hashlib.sha256(payload).digest()
        # Both sockets of the finished pair are closed: no fd left behind in the gateway.
        wait_for(lambda: g.fds() == baseline, timeout=5)


def test_half_close_response_not_dropped(gateway: Start) -> None:
    """Client sends, SHUT_WRs, and the server answers only after EOF (Go drops this)."""
    backend = socket.create_server(("127.0.0.1", 0))
    port = free_tcp_port()

    def serve() -> None:
        c, _ = backend.accept()
        with c:
            data = b""
            while chunk := c.recv(65536):
                data += chunk
            time.sleep(0.2)
            c.sendall(b"got " + str(len(data)).encode())

    t = threading.Thread(target=serve)
    t.start()
    try:
        gateway(
            f"--endpoints=127.0.0.1:{backend.getsockname()[1]}", f"--listen-addr=127.0.0.1:{port}"
        )
        with connect(port) as s:
            s.sendall(b"x" * 1000)
            s.shutdown(socket.SHUT_WR)
            reply = b""
            while chunk := s.recv(100):
                reply += chunk
        assert reply == b"got 1000"
    finally:
        t.join(10)
        backend.close()


def test_reset_is_passed_on(gateway: Start) -> None:
    backend = socket.create_server(("127.0.0.1", 0))
    port = free_tcp_port()

    def serve() -> None:
        c, _ = backend.accept()
        c.recv(10)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        c.close()  # RST

    t = threading.Thread(target=serve)
    t.start()
    try:
        gateway(
            f"--endpoints=127.0.0.1:{backend.getsockname()[1]}", f"--listen-addr=127.0.0.1:{port}"
        )
        with connect(port) as s:
            s.sendall(b"hello")
            with pytest.raises(ConnectionResetError):
                for _ in range(50):
                    if not s.recv(10):
                        break
                    time.sleep(0.05)
    finally:
        t.join(10)
        backend.close()


def test_ipv6_listen_and_endpoint(gateway: Start) -> None:
    port = free_tcp_port("::1")
    with TagServer("six", host="::1") as six:
        assert six.addr.startswith("[::1]:")
        g = gateway(f"--endpoints={six.addr}", f"--listen-addr=[::1]:{port}")
        assert g.wait_ready()["endpoints"] == [six.addr]
        assert tag_via(port, "::1") == "six"


def test_unix_socket_listener(gateway: Start, tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "gw.sock")
    with TagServer("u") as u:
        g = gateway(f"--endpoints={u.addr}", f"--listen-addr=unix://{path}")
        assert oct(os.stat(path).st_mode & 0o777) == "0o660"
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(path)
            assert read_line(s) == b"u\n"
        assert g.stop() == 0
        assert not os.path.exists(path)  # removed on exit


def test_sigterm_exits_zero_and_closes(gateway: Start) -> None:
    port = free_tcp_port()
    with TagServer("t") as t:
        g = gateway(f"--endpoints={t.addr}", f"--listen-addr=127.0.0.1:{port}")
        s = connect(port)
        assert read_line(s) == b"t\n"
        g.proc.send_signal(signal.SIGTERM)
        g.wait_log("stopping; draining connections", connections=1)
        # Draining: the live connection still works, new ones are refused.
        s.sendall(b"ping")
        assert s.recv(4) == b"ping"
        with pytest.raises(ConnectionRefusedError):
            connect(port).close()
        s.close()
        assert g.proc.wait(10) == 0
        assert g.stop() == 0


def test_a_client_just_before_sigterm_is_drained_not_dropped(gateway: Start) -> None:
    """A connection ends, a new one starts, SIGTERM within the relay thread's 50 ms report
    batch. Was (Cython engine): the report of the end made the count 0 before the start in
    the same report was counted, the drain finished at once and the new client read EOF."""
    port = free_tcp_port()
    with TagServer("t") as t:
        g = gateway(f"--endpoints={t.addr}", f"--listen-addr=127.0.0.1:{port}")
        a = connect(port)
        assert read_line(a) == b"t\n"
        a.close()
        time.sleep(0.1)  # its end is reported on its own
        for _ in range(3):
            b = connect(port)
            assert read_line(b) == b"t\n"
            b.sendall(b"x")
            assert b.recv(1) == b"x"
            b.close()  # ends now; its report waits for the batch
        with connect(port) as c:
            assert read_line(c) == b"t\n"
            g.proc.send_signal(signal.SIGTERM)
            g.wait_log("stopping; draining connections")
            time.sleep(0.3)
            # Draining: the live connection still works.
            c.sendall(b"ping")
            assert c.recv(4) == b"ping"
        assert g.proc.wait(10) == 0
        assert g.stop() == 0


def test_many_concurrent_clients(gateway: Start, backends: list[TagServer]) -> None:
    port = free_tcp_port()
    g = gateway(
        "--endpoints=" + ",".join(b.addr for b in backends), f"--listen-addr=127.0.0.1:{port}"
    )
    baseline = g.fds()
    socks = [connect(port) for _ in range(300)]
    tags = [read_line(s) for s in socks]
    for i, s in enumerate(socks):
        s.sendall(b"%d" % i)
    for i, s in enumerate(socks):
        assert s.recv(16) == b"%d" % i
        s.close()
    assert sorted(set(tags)) == [b"a\n", b"b\n", b"c\n"]
    wait_for(lambda: g.fds() == baseline, timeout=10)


def test_keepalive_and_nodelay_on_both_sockets(gateway: Start) -> None:
    """Both relayed sockets carry TCP keep-alive (seen by the kernel's ss as a timer)."""
    port = free_tcp_port()
    with TagServer("k") as backend:
        gateway(f"--endpoints={backend.addr}", f"--listen-addr=127.0.0.1:{port}",
                "--tcp-keepalive=7s")  # fmt: skip
        with connect(port) as s:
            assert read_line(s) == b"k\n"

            def timers(flt: str) -> str:
                return subprocess.run(
                    ["ss", "-tnoH", "state", "established", flt],
                    capture_output=True, text=True, check=True,
                ).stdout  # fmt: skip

            accepted = timers(f"( sport = :{port} )")
            assert "keepalive" in accepted, accepted

            # Native accept sets keep-alive on the upstream socket once the connection has
            # lived 1 s (it cannot matter sooner; short connections save the syscalls).
            def with_keepalive() -> str | None:
                out = timers(f"( dport = :{backend.port} )")
                return out if "keepalive" in out else None

            upstream = wait_for(with_keepalive, 5)
            assert "keepalive" in upstream, upstream
