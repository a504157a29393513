"""dial.py in process: `Dialer`/`Dial` built from their collaborators, without a Gateway.

Real loopback sockets (TagServer backends, closed ports, a silent listener whose SYNs are
dropped), a real Balancer, AddressBook (its resolver a scripted async function where a test
needs host names), Monitor and ConnTable, and the relay engine under test: every connected
client is relayed, and its bytes checked, on both engines. End to end through a gateway
process: tests/test_dial.py and tests/test_server.py.
"""

from __future__ import annotations

import dataclasses
import socket
import time
from collections.abc import Callable, Iterator

import pytest

from _gateway import TagServer, free_tcp_port, free_tcp_ports, silent_listener
from _parts import Make, Parts, Script, client_pair, ep
from etcdgw.dial import SELF_DIAL
from etcdgw.resolver import Addr


@pytest.fixture
def front(no_fd_leak: None) -> Iterator[socket.socket]:
    """Where the test's clients come from (the gateway's listener, as far as a Dial knows)."""
    s = socket.create_server(("127.0.0.1", 0), backlog=64)
    s.settimeout(5)
    yield s
    s.close()


class Clients:
    """The test's ends of the clients it dialled; closed at the end."""

    def __init__(self) -> None:
        self.held: list[socket.socket] = []

    def dial(self, parts: Parts, front: socket.socket) -> socket.socket:
        """A client accepted from front and handed to parts.dialer (inside the loop)."""
        peer, client = client_pair(front)
        self.held.append(peer)
        parts.call(lambda: parts.the_dialer.dial(client))
        return peer

    def close(self) -> None:
        for s in self.held:
            s.close()


@pytest.fixture
def clients() -> Iterator[Clients]:
    c = Clients()
    yield c
    c.close()


def echo(parts: Parts, peer: socket.socket) -> bytes:
    """Which backend got peer (its tag), after one round trip through the relayed pair."""
    tag = parts.read_line(peer)
    peer.sendall(b"ping\n")
    assert parts.read_line(peer) == b"ping\n"
    return tag.strip()


def test_failover_in_list_order_then_round_robin(
    make: Make, front: socket.socket, clients: Clients
) -> None:
    dead = free_tcp_port()
    with TagServer("a") as a, TagServer("b") as b:
        parts = make([ep(dead), ep(a.port), ep(b.port)])
        got = [echo(parts, clients.dial(parts, front)) for _ in range(3)]
        # The dead one first (list order), the next one gets that client; the dead one is
        # deactivated and skipped from then on, the counter going on where it was.
        assert got == [b"a", b"b", b"a"]
        down = parts.remotes[0]
        assert (down.active, down.dial_failures) == (False, 1)
        (line,) = parts.messages("deactivated endpoint")
        assert line["address"] == f"127.0.0.1:{dead}"
        assert line["error"] == f"dial tcp 127.0.0.1:{dead}: connect: connection refused"
        assert len(parts.table.conns) == 3 and not parts.table.dials
        assert [r.connections_active for r in parts.remotes] == [0, 2, 1]


def test_dial_timeout_is_read_at_each_dial(
    make: Make, front: socket.socket, clients: Clients
) -> None:
    """A silent endpoint costs --dial-timeout, then the next one gets the client; a reload's
    new --dial-timeout (Settings.cfg replaced) holds for the next dial."""
    lst, fillers = silent_listener()
    silent = lst.getsockname()[1]
    try:
        with TagServer("a") as a:
            parts = make([ep(silent), ep(a.port)], dial_timeout=0.3, health_check="none")
            t0 = time.monotonic()
            peer = clients.dial(parts, front)
            assert echo(parts, peer) == b"a"
            first = time.monotonic() - t0
            # The lower bounds are the real checks. The upper ones catch a dial that did not
            # use the setting: the default --dial-timeout (5 s) or the kernel's SYN retries.
            assert 0.25 <= first < 3.0, first
            parts.settings.cfg = dataclasses.replace(parts.settings.cfg, dial_timeout=0.9)
            t0 = time.monotonic()
            assert echo(parts, clients.dial(parts, front)) == b"a"
            second = time.monotonic() - t0
            assert 0.85 <= second < 3.5, second
            r = parts.remotes[0]
            assert r.active and r.dial_failures == 2  # `none`: never taken out
            assert r.last_error == f"dial tcp 127.0.0.1:{silent}: i/o timeout"
    finally:
        for f in fillers:
            f.close()
        lst.close()


def test_all_down_fallback_gives_each_endpoint_one_more_try(
    make: Make, front: socket.socket, clients: Clients
) -> None:
    p1, p2 = free_tcp_port(), free_tcp_port()
    parts = make([ep(p1), ep(p2)])
    peer = clients.dial(parts, front)
    assert parts.closed(peer)  # both down: the client is closed
    assert parts.table.counters.refused == 1 and parts.gone == 1
    assert parts.messages("no endpoint available; closed client connection")
    assert [r.active for r in parts.remotes] == [False, False]
    with TagServer("b", port=p2):
        # Both still inactive (no re-probe ran): the fallback gives each one more dial
        # for this client, instead of refusing it until the next --retry-delay.
        assert echo(parts, clients.dial(parts, front)) == b"b"
        assert parts.remotes[1].active
        assert parts.messages("activated")[0]["address"] == f"127.0.0.1:{p2}"
    # One dial per endpoint per client: the first client 2, the second 1 to the dead one.
    assert [r.dial_failures for r in parts.remotes] == [2, 1]


@pytest.mark.parametrize("health", ["none", "tcp"])
@pytest.mark.parametrize("balance", ["round-robin", "least-connections"])
def test_a_dial_tries_each_endpoint_at_most_once(
    make: Make, front: socket.socket, clients: Clients, health: str, balance: str
) -> None:
    """Whatever --health-check and --balance say (under `none` a failed dial leaves the
    endpoint usable, so an unbounded dial would go round forever), one client costs one
    connect per endpoint, then it is closed."""
    dead = free_tcp_ports(3)
    parts = make([ep(p) for p in dead], health_check=health, balance=balance)
    peer = clients.dial(parts, front)
    assert parts.closed(peer)
    assert [r.dial_failures for r in parts.remotes] == [1, 1, 1]
    assert parts.table.counters.refused == 1
    assert not parts.table.dials and all(r.dialing == 0 for r in parts.remotes)


def test_a_client_that_left_stops_the_dial(
    make: Make, front: socket.socket, clients: Clients
) -> None:
    lst, fillers = silent_listener()
    silent = lst.getsockname()[1]
    other = free_tcp_port()
    try:
        with TagServer("a") as a:
            parts = make([ep(silent), ep(other), ep(a.port)], dial_timeout=0.3, health_check="none")
            peer = clients.dial(parts, front)
            peer.close()  # gone while the silent endpoint is dialled
            parts.until(lambda: parts.table.counters.abandoned == 1)
            # Nothing more was dialled for it: not the next endpoint, not the live one.
            assert [r.dial_failures for r in parts.remotes] == [1, 0, 0]
            assert a.accepted == 0
            assert not parts.table.dials and not parts.table.conns and parts.gone == 1
            assert parts.remotes[0].dialing == 0
    finally:
        for f in fillers:
            f.close()
        lst.close()


@pytest.mark.parametrize("own_ip", ["127.0.0.1", "0.0.0.0"])
def test_the_gateways_own_address_is_never_dialled(
    make: Make, front: socket.socket, clients: Clients, own_ip: str
) -> None:
    """A name that now resolves to the gateway's own listen address (a wildcard one stands
    for every local IP) is a dial error, never a connect to itself."""
    with TagServer("self") as me, TagServer("b") as b:
        script = Script({"member.test": ["127.0.0.1"]})
        parts = make([ep(me.port, "member.test"), ep(b.port)], resolve=script)
        parts.own.add((own_ip, me.port))  # as Gateway.bind() records its listener
        assert echo(parts, clients.dial(parts, front)) == b"b"
        assert me.accepted == 0
        assert script.calls == ["member.test"]
        (line,) = parts.messages("deactivated endpoint")
        assert line["error"] == f"dial tcp 127.0.0.1:{me.port}: {SELF_DIAL}"


def test_a_name_that_fails_or_does_not_resolve_in_time_is_a_dial_error(
    make: Make, front: socket.socket, clients: Clients
) -> None:
    with TagServer("b") as b:
        script = Script({"slow.test": ["127.0.0.1"]}, delays={"slow.test": 3.0})
        parts = make(
            [ep(1, "slow.test"), ep(2, "nx.test"), ep(b.port)], resolve=script, dial_timeout=0.3
        )
        t0 = time.monotonic()
        assert echo(parts, clients.dial(parts, front)) == b"b"
        assert time.monotonic() - t0 < 2.0
        errors = {r["address"]: r["error"] for r in parts.messages("deactivated endpoint")}
        assert errors["slow.test:1"] == "dial tcp slow.test:1: lookup slow.test: i/o timeout"
        # Go's words once: the resolver's "lookup nx.test: ..." is not prefixed again.
        assert errors["nx.test:2"] == "dial tcp nx.test:2: lookup nx.test: no such host"
        assert sorted(script.calls) == ["nx.test", "slow.test"]


def test_resume_and_dial_to_go_on_with_the_engines_dial(
    make: Make, front: socket.socket, clients: Clients
) -> None:
    """What native accept hands back: resume() takes the failed endpoint's error and its
    addresses left (one --dial-timeout for all); dial_to() dials the engine's pick first."""
    with TagServer("a") as a, TagServer("b") as b, TagServer("c") as c:
        script = Script({"late.test": ["127.0.0.1"]})
        parts = make([ep(a.port), ep(b.port), ep(c.port, "late.test")], resolve=script)
        first, _, third = parts.remotes

        def handed(start: Callable[[socket.socket], object]) -> bytes:
            peer, client = client_pair(front)
            clients.held.append(peer)
            parts.call(lambda: start(client))
            return echo(parts, peer)

        # The engine's first address of `a` failed and none is left: `a` is marked down
        # with the engine's error, and the client goes on to the next endpoint.
        assert (
            handed(lambda cl: parts.the_dialer.resume(cl, first, [], "dial tcp x: timeout")) == b"b"
        )
        assert (first.active, first.last_error) == (False, "dial tcp x: timeout")
        # An address left: the same endpoint gets the client, no failure is recorded.
        parts.monitor.activate(first)
        addrs: list[Addr] = [(socket.AF_INET, ("127.0.0.1", 0))]
        assert handed(lambda cl: parts.the_dialer.resume(cl, first, addrs, "dial tcp y")) == b"a"
        assert first.active and first.dial_failures == 1
        # The engine's pick has no address yet: resolved, then dialled first.
        assert handed(lambda cl: parts.the_dialer.dial_to(cl, third)) == b"c"
        assert script.calls == ["late.test"]
