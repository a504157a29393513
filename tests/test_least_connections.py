"""--balance=least-connections end to end, both engines (the relay thread's native accept
counts in C, the loop's in Python; tests/test_selection.py holds the two rules together).

A long-lived client (a gRPC watch) stays where it was placed: round-robin then gives a member
back from a restart only its 1/N share of new clients, least-connections gives it what it lacks.
"""

from __future__ import annotations

import signal
import socket
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from _dns import Dnsmasq, SrvHost
from _gateway import GatewayProc, TagServer, connect, free_tcp_port, read_line, wait_for

Start = Callable[..., GatewayProc]
Held = list[tuple[socket.socket, str]]


def hold(port: int, n: int, into: Held) -> Counter[str]:
    """Open n connections through the gateway and keep them; count where they went."""
    got = Counter[str]()
    for _ in range(n):
        s = connect(port)
        tag = read_line(s).decode().strip()
        got[tag] += 1
        into.append((s, tag))
    return got


def release(held: Held) -> None:
    """Close every held client (the gateway then stops without a drain)."""
    for s, _ in held:
        s.close()
    held.clear()


def drop(held: Held, tag: str) -> None:
    for s, t in [h for h in held if h[1] == tag]:
        s.close()
        held.remove((s, t))


@pytest.fixture
def held() -> Iterator[Held]:
    socks: Held = []
    yield socks
    for s, _ in socks:
        s.close()


@pytest.mark.parametrize("balance", ["least-connections", "round-robin"])
def test_a_restarted_member_gets_the_new_clients(gateway: Start, held: Held, balance: str) -> None:
    port = free_tcp_port()
    a, b, c = TagServer("a"), TagServer("b"), TagServer("c")
    servers = [a, b, c]
    try:
        g = gateway(
            f"--endpoints={a.addr},{b.addr},{c.addr}",
            f"--listen-addr=127.0.0.1:{port}",
            f"--balance={balance}",
            "--retry-delay=1s",
        )
        assert hold(port, 30, held) == {"a": 10, "b": 10, "c": 10}
        # c dies: its clients see their connection end and come back through the gateway.
        c_port = c.port
        c.close()
        servers.remove(c)
        for s, _ in [h for h in held if h[1] == "c"]:
            s.settimeout(10)
            assert s.recv(1) == b""
        drop(held, "c")
        assert hold(port, 10, held) == {"a": 5, "b": 5}
        c = TagServer("c", port=c_port)  # back, with no clients
        servers.append(c)
        g.wait_log("activated", timeout=15)
        got = hold(port, 9, held)
        if balance == "least-connections":
            assert got["c"] >= 8, got
        else:
            assert got["c"] <= 4, got  # its 1/3 share: the imbalance stays
        release(held)
        assert g.stop() == 0
    finally:
        for server in servers:
            server.close()


def test_least_connections_follows_srv_weights(
    gateway: Start, held: Held, dnsmasq: Dnsmasq
) -> None:
    port = free_tcp_port()
    tags = ("w1", "w2", "w3")
    servers = [TagServer(t) for t in tags]
    try:
        dnsmasq.restart(
            srv=[
                SrvHost("_etcd-client._tcp.etcd.test", f"{t}.etcd.test", s.port, 0, w)
                for t, s, w in zip(tags, servers, (1, 2, 3), strict=True)
            ],
            hosts={f"{t}.etcd.test": ["127.0.0.1"] for t in tags},
        )
        g = gateway(
            "--discovery-srv=etcd.test",
            f"--discovery-dns={dnsmasq.addr}",
            "--insecure-discovery",
            f"--listen-addr=127.0.0.1:{port}",
            "--balance=least-connections",
        )
        got = hold(port, 60, held)
        for tag, want in (("w1", 10), ("w2", 20), ("w3", 30)):
            assert abs(got[tag] - want) <= 1, got
        release(held)
        assert g.stop() == 0
    finally:
        for s in servers:
            s.close()


def test_finished_connections_no_longer_count(gateway: Start, held: Held) -> None:
    """Counts go down when connections end, in the engine as in Python."""
    port = free_tcp_port()
    with TagServer("a") as a, TagServer("b") as b:
        g = gateway(
            f"--endpoints={a.addr},{b.addr}",
            f"--listen-addr=127.0.0.1:{port}",
            "--balance=least-connections",
        )
        assert hold(port, 6, held) == {"a": 3, "b": 3}
        drop(held, "a")
        wait_for(lambda: a.open_connections == 0 and b.open_connections == 3, 10)
        # The gateway hears of the ends in the same wake-up or within a 5 ms report batch.
        wait_for(lambda: hold(port, 1, held) == {"a": 1}, 10, step=0.05)
        assert hold(port, 2, held) == {"a": 2}
        release(held)
        assert g.stop() == 0


def test_a_reload_switches_the_rule(gateway: Start, held: Held, tmp_path: Path) -> None:
    """`balance:` in the config file takes effect on SIGHUP, in the relay thread too."""
    port = free_tcp_port()
    with TagServer("a") as a, TagServer("b") as b:
        conf = tmp_path / "etcdgw.yaml"
        conf.write_text(f"endpoints: [{a.addr}, {b.addr}]\nbalance: round-robin\n")
        g = gateway(f"--config-file={conf}", f"--listen-addr=127.0.0.1:{port}")
        assert hold(port, 4, held) == {"a": 2, "b": 2}
        drop(held, "b")  # a holds 2, b none
        wait_for(lambda: b.open_connections == 0, 10)
        conf.write_text(f"endpoints: [{a.addr}, {b.addr}]\nbalance: least-connections\n")
        g.proc.send_signal(signal.SIGHUP)
        g.wait_log("reloaded configuration")
        assert hold(port, 2, held) == {"b": 2}  # round-robin would give one each
        release(held)
        assert g.stop() == 0
