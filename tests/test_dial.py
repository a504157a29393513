"""dial.py under hostile input, end to end on both engines (issue 18, items 1-4).

A dial is bounded (each endpoint at most once per client, whatever --health-check and
--balance say, and it stops when its client left); least-connections sets aside a member
whose fresh connections fail; an IPv6 zone that names no interface is a dial error, not a
traceback; and the gateway never dials its own listen or metrics address, whatever DNS says.

Dead endpoints are closed ports below the ephemeral range (tests/_gateway.free_tcp_port), and
each client costs at most one dial per endpoint, so no dial storm can connect a socket to
itself here.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _dns import Dnsmasq
from _gateway import (
    GatewayProc,
    TagServer,
    free_tcp_port,
    free_tcp_ports,
    silent_listener,
    wait_for,
)
from etcdgw.config import ConfigError, host_error, parse_endpoint
from etcdgw.resolver import AddressBook

Start = Callable[..., GatewayProc]


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def closed_within(s: socket.socket, timeout: float) -> bool:
    """Whether the gateway closed s (EOF or reset) within timeout, reading what comes."""
    s.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not s.recv(4096):
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return False


def ask(port: int, timeout: float = 5.0) -> str:
    """Connect, send a line first (as etcd's clients speak first), read one line back;
    "" when the connection is closed without an answer. The socket stays open (held)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    HELD.append(s)
    try:
        s.sendall(b"ping\n")
        buf = b""
        while b"\n" not in buf:
            chunk = s.recv(4096)
            if not chunk:
                return ""
            buf += chunk
    except (ConnectionResetError, TimeoutError):
        return ""
    return buf.split(b"\n", 1)[0].decode()


HELD: list[socket.socket] = []


def stop(g: GatewayProc) -> int:
    """Close the held clients (a drain waits for them), then SIGTERM: the exit code."""
    while HELD:
        HELD.pop().close()
    return g.stop()


@pytest.fixture(autouse=True)
def _close_held() -> object:
    yield
    while HELD:
        HELD.pop().close()


class Member:
    """A member on loopback that accepts in a thread of its own; `handle` each connection."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=512)
        self.port = int(self.sock.getsockname()[1])
        self.accepted = 0
        self.conns: list[socket.socket] = []
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop:
            try:
                c, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            self.handle(c)

    def handle(self, c: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._stop = True
        self._t.join(2)
        for c in self.conns:
            c.close()
        self.sock.close()


class Closer(Member):
    """A member that accepts and closes at once (a stuck process behind a port forwarder)."""

    def handle(self, c: socket.socket) -> None:
        c.close()


# --- 1. a dial is bounded ------------------------------------------------------------------


def test_none_with_every_endpoint_down_closes_each_client(gateway: Start) -> None:
    """Was: each client dialled again and again (~26,000 failed dials a second, a core
    busy), never answered or closed, the loop outliving the client."""
    port = free_tcp_port()
    dead = free_tcp_ports(3)
    g = gateway(
        "--endpoints=" + ",".join(f"127.0.0.1:{d}" for d in dead),
        f"--listen-addr=127.0.0.1:{port}",
        "--health-check=none",
    )
    base_fds = g.fds()
    t0 = cpu_seconds(g.pid)
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]
    try:
        for c in clients:
            assert closed_within(c, 3.0), "the client was never closed"
    finally:
        for c in clients:
            c.close()
    wait_for(lambda: g.fds() <= base_fds, timeout=5)
    time.sleep(1.0)
    busy = cpu_seconds(g.pid) - t0
    print(f"RELIABILITY none-all-down {g.impl}: 5 clients closed, gateway CPU {busy:.3f} s")
    # Five clients, at most three refused dials each: a few ms. The loop burnt ~1 s/s.
    assert busy < 0.5, f"gateway used {busy:.2f} s of CPU for 5 refused clients"
    assert g.proc.poll() is None
    assert stop(g) == 0


def test_a_dial_stops_when_its_client_left(gateway: Start) -> None:
    """Silent members (SYNs dropped) cost --dial-timeout each; a client that left while its
    first dial waited is not dialled to the others."""
    port = free_tcp_port()
    silent = [silent_listener() for _ in range(6)]  # dialled in turn: 6 s
    try:
        eps = ",".join(f"127.0.0.1:{lst.getsockname()[1]}" for lst, _ in silent)
        g = gateway(
            f"--endpoints={eps}",
            f"--listen-addr=127.0.0.1:{port}",
            "--health-check=none",
            "--dial-timeout=1s",
        )
        base_fds = g.fds()
        c = socket.create_connection(("127.0.0.1", port))
        # The client is accepted and its first dial under way (a fixed sleep could end
        # before the gateway, on a loaded machine, had even accepted it).
        wait_for(lambda: g.fds() >= base_fds + 2, timeout=10)
        c.close()
        t0 = time.monotonic()
        wait_for(lambda: g.fds() <= base_fds, timeout=10)
        gone = time.monotonic() - t0
        print(f"RELIABILITY dial-client-left {g.impl}: dial ended {gone:.2f} s after the client")
        # What is left of one dial timeout (1 s), not six in a row (6 s): the bound leaves
        # 2.5 s for a loaded machine on either side.
        assert gone < 3.5, f"the dial went on {gone:.1f} s after its client left"
        assert stop(g) == 0
    finally:
        for lst, fillers in silent:
            for f in fillers:
                f.close()
            lst.close()


# --- 2. least-connections and failing members ----------------------------------------------


def test_least_connections_serves_every_client_past_a_dead_member(gateway: Start) -> None:
    """Was: 3 of 20 and 8 of 20 held clients answered; the dead member (nothing takes it out
    under `none`) always had the fewest connections."""
    port = free_tcp_port()
    dead = free_tcp_port()
    with TagServer("a") as a, TagServer("b") as b:
        g = gateway(
            f"--endpoints={a.addr},127.0.0.1:{dead},{b.addr}",
            f"--listen-addr=127.0.0.1:{port}",
            "--health-check=none",
            "--balance=least-connections",
        )
        got = [ask(port) for _ in range(20)]
        print(f"RELIABILITY leastconn-dead {g.impl}: {20 - got.count('')} of 20 served")
        assert got.count("") == 0, got
        assert set(got) == {"a", "b"}, got
        rec = g.wait_log("endpoint set aside (least-connections)")
        assert rec["address"] == f"127.0.0.1:{dead}"
        assert stop(g) == 0


@pytest.mark.parametrize("gap", [0.05, 0.0], ids=["spaced", "back-to-back"])
def test_least_connections_sets_aside_a_member_that_closes_at_once(
    gateway: Start, gap: float
) -> None:
    """Default checks (tcp): the member's TCP re-probe passes, its dials succeed, and each
    connection ends at once without a byte. Was: 17 of 20 new clients went to it (spaced),
    18 of 20 back to back (the relay thread picked it until its next report to the loop)."""
    port = free_tcp_port()
    closer = Closer()
    try:
        with TagServer("a") as a, TagServer("b") as b:
            g = gateway(
                f"--endpoints={a.addr},127.0.0.1:{closer.port},{b.addr}",
                f"--listen-addr=127.0.0.1:{port}",
                "--balance=least-connections",
            )
            got = []
            for _ in range(20):
                got.append(ask(port))
                time.sleep(gap)
            lost = got.count("")
            print(f"RELIABILITY leastconn-closer-{gap}s {g.impl}: {lost} of 20 to it")
            assert lost <= 4, f"{lost} of 20 clients went to the member that closes: {got}"
            assert g.wait_log("endpoint set aside (least-connections)")["address"] == (
                f"127.0.0.1:{closer.port}"
            )
            assert stop(g) == 0
    finally:
        closer.close()


class Replier(Member):
    """A member that answers a request line with its tag and keeps the connection (etcd
    speaks only after its client)."""

    def __init__(self, tag: str) -> None:
        self.tag = tag.encode()
        super().__init__()

    def handle(self, c: socket.socket) -> None:
        threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c: socket.socket) -> None:
        self.conns.append(c)
        c.settimeout(10)
        buf = b""
        try:
            while b"\n" not in buf:  # a whole request line, as etcd waits for a whole request
                chunk = c.recv(4096)
                if not chunk:
                    break
                buf += chunk
            if b"\n" in buf:
                c.sendall(self.tag + b"\n")
                while c.recv(4096):  # until the client's EOF is passed on
                    pass
        except OSError:
            pass
        c.close()


def test_clients_that_reset_cannot_set_members_aside(gateway: Start) -> None:
    """The review's attack: a client sends a byte and resets, over and over. The member did
    not end those connections, so they are no strike (was: all three members set aside,
    every client steered to the first one for ~6 s)."""
    port = free_tcp_port()
    members = [Replier(t) for t in "abc"]
    try:
        g = gateway(
            "--endpoints=" + ",".join(f"127.0.0.1:{m.port}" for m in members),
            f"--listen-addr=127.0.0.1:{port}",
            "--balance=least-connections",
        )
        linger0 = struct.pack("ii", 1, 0)
        for _ in range(30):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"x")
            time.sleep(0.01)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger0)
            s.close()  # RST
        time.sleep(0.2)
        got = [ask(port) for _ in range(9)]
        assert sorted(got) == ["a"] * 3 + ["b"] * 3 + ["c"] * 3, got
        assert "endpoint set aside (least-connections)" not in g.messages()
        assert stop(g) == 0
    finally:
        for m in members:
            m.close()


def test_round_robin_is_unchanged_by_a_member_that_closes_at_once(gateway: Start) -> None:
    """Setting aside is least-connections' alone: round-robin stays etcd's (a third each)."""
    port = free_tcp_port()
    closer = Closer()
    try:
        with TagServer("a") as a, TagServer("b") as b:
            g = gateway(
                f"--endpoints={a.addr},127.0.0.1:{closer.port},{b.addr}",
                f"--listen-addr=127.0.0.1:{port}",
            )
            got = [ask(port) for _ in range(9)]
            assert got.count("") == 3, got
            assert "endpoint set aside (least-connections)" not in g.messages()
            assert stop(g) == 0
    finally:
        closer.close()


# --- 3. IPv6 zones --------------------------------------------------------------------------


def test_zone_in_url_form_is_the_address_zone() -> None:
    # RFC 6874: "%25" is how a URL writes the "%" of a zone (etcd member URLs do).
    assert parse_endpoint("http://[fe80::1%25eth0]:2379").host == "fe80::1%eth0"
    assert parse_endpoint("[fe80::1%25eth0]:2379").host == "fe80::1%eth0"
    assert parse_endpoint("[fe80::1%eth0]:2379").addr == "[fe80::1%eth0]:2379"


def test_a_zone_naming_no_interface_is_a_dial_error(gateway: Start) -> None:
    """Was: socket.gaierror escaped the dial, half the clients hung, ~100 fds leaked per
    200 clients, tracebacks (and in the Cython path the rest of the report was orphaned)."""
    port = free_tcp_port()
    with TagServer("a") as a:
        g = gateway(
            f"--endpoints=[fe80::1%25nosuchif0]:{free_tcp_port()},{a.addr}",
            f"--listen-addr=127.0.0.1:{port}",
            "--health-check=none",
        )
        base_fds = g.fds()
        got = [ask(port) for _ in range(40)]
        assert got == ["a"] * 40, got
        while HELD:
            HELD.pop().close()
        wait_for(lambda: g.fds() <= base_fds, timeout=5)
        assert stop(g) == 0
        text = "\n".join(g.lines)
        assert "Traceback" not in text
        rec = g.wait_log("failed to connect to endpoint; trying the next (--health-check=none)")
        assert "invalid address" in rec["error"], rec


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.text(max_size=40),
        st.builds(
            lambda s, h, z, p: f"{s}[{h}%{z}]:{p}",
            st.sampled_from(["", "http://", "https://", "unixs://"]),
            st.sampled_from(["fe80::1", "::1", "1.2.3.4", "fe80::", "::ffff:127.0.0.1", ""]),
            st.text(max_size=12),
            st.sampled_from(["2379", "0", "65536", "", "x"]),
        ),
    )
)
def test_any_endpoint_text_parses_or_is_one_error(text: str) -> None:
    """parse_endpoint: a ConfigError, or an endpoint whose host every later step accepts
    (the connect path's address book knows an IP literal without raising)."""
    try:
        ep = parse_endpoint(text)
    except ConfigError as e:
        assert "\n" not in str(e)
        return
    assert 1 <= ep.port <= 65535
    assert host_error(ep.host) is None
    book = AddressBook(_no_lookup)
    addrs = book.known(ep.host)
    assert addrs is None or all(fam in (socket.AF_INET, socket.AF_INET6) for fam, _ in addrs)


async def _no_lookup(host: str) -> list[str]:
    raise OSError("no lookups in this test")


# --- 4. never dial the gateway itself -------------------------------------------------------


def test_a_name_that_later_resolves_to_the_gateway_is_never_dialled(
    gateway: Start, dnsmasq: Dnsmasq
) -> None:
    """Was: the re-probe connected to the gateway itself, the endpoint came back, and each
    client was relayed to the gateway again: 2 clients became ~20,000 self-connections."""
    port = free_tcp_port()
    mport = free_tcp_port()
    dnsmasq.restart(hosts={"gw.etcd.test": ["127.0.0.2"], "mx.etcd.test": ["127.0.0.2"]})
    with TagServer("a") as a:
        g = gateway(
            f"--endpoints=gw.etcd.test:{port},mx.etcd.test:{mport},{a.addr}",
            f"--listen-addr=127.0.0.1:{port}",
            f"--metrics-addr=127.0.0.1:{mport}",
            f"--discovery-dns={dnsmasq.addr}",
            "--retry-delay=1s",
        )
        assert {ask(port) for _ in range(6)} <= {"a", ""}
        # Now both names point at this gateway: its listen and its metrics address.
        dnsmasq.restart(hosts={"gw.etcd.test": ["127.0.0.1"], "mx.etcd.test": ["127.0.0.1"]})
        time.sleep(7.5)  # the address book's 5 s freshness, then re-probes every 1 s
        base_fds = g.fds()
        got = [ask(port) for _ in range(10)]
        assert got == ["a"] * 10, got
        time.sleep(1.5)
        assert g.fds() <= base_fds + 2 * 10 + 6, (base_fds, g.fds())  # 10 held pairs
        assert "activated" not in g.messages()
        errors = [
            r.get("error", "")
            for r in g.records()
            if r.get("msg") == "failed to activate endpoint (stay inactive for another interval)"
        ]
        assert any("gateway's own" in e for e in errors), errors
        assert stop(g) == 0
