"""Issue 18: --auto-sync-interval against hostile and odd member-list answers.

Each gateway test runs a real gateway process against fake members on loopback: tiny HTTP
servers that answer `POST /v3/cluster/member/list` with whatever the test wants (a real etcd
cannot be made to answer deeply nested JSON, a port-0 URL or a new list every time). Where
relaying matters, the members' client URLs are real TCP backends (`TagServer`). The pure
parts (parse_member_list, Balancer) are tested directly. Figures marked `RELIABILITY` are
copied into RELIABILITY.md ("Hostile member lists").
"""

from __future__ import annotations

import http.server
import json
import re
import socket
import threading
import time
import urllib.request
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from _gateway import (
    GatewayProc,
    TagServer,
    connect,
    free_tcp_port,
    read_line,
    silent_listener,
)
from etcdgw.balancer import Balancer
from etcdgw.config import Endpoint

Start = Callable[..., GatewayProc]
CLUSTER = "14841639068965178418"
LIST_BOUND = 1 << 20  # the member list's own bound (README)

# --- fake members --------------------------------------------------------------------------


def member_list(*members: dict[str, Any], cluster: str = CLUSTER) -> bytes:
    """An etcd-shaped MemberList answer."""
    return json.dumps(
        {"header": {"cluster_id": cluster, "member_id": "1", "raft_term": "2"}, "members": members}
    ).encode()


def member(name: str, *client_urls: str, **extra: Any) -> dict[str, Any]:
    return {
        "ID": str(zlib.crc32(name.encode()) * 4294967311),  # a uint64, as etcd writes it
        "name": name,
        "peerURLs": [f"http://{name}.peer:2380"],
        "clientURLs": list(client_urls),
        **extra,
    }


class FakeMember:
    """An HTTP server on loopback answering every member-list request with answer(n).

    answer(n) gets the number of the request (0, 1, ...) and returns the body (status 200).
    """

    def __init__(self, answer: Callable[[int], bytes]) -> None:
        self.answer = answer
        self.asked = 0
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                n = fake.asked
                fake.asked += 1
                body = fake.answer(n)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                try:
                    self.wfile.write(body)
                except OSError:
                    pass  # the gateway stopped reading (a list past its bound)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.addr = f"127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)

    def __enter__(self) -> FakeMember:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def deep_json(depth: int = 100_000) -> bytes:
    return b'{"header":{"cluster_id":"1"},"members":' + b"[" * depth + b"]" * depth + b"}"


def syncs(mport: int, result: str) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10) as r:
        text = r.read().decode()
    m = re.search(rf'^etcdgw_member_sync_total{{result="{result}"}} (\S+)$', text, re.M)
    assert m, text
    return int(float(m.group(1)))


def status(mport: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{mport}/status", timeout=10) as r:
        doc: dict[str, Any] = json.loads(r.read())
    return doc


def current(mport: int) -> list[str]:
    return [r["address"] for r in status(mport)["endpoints"] if not r["removed"]]


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _log_bytes(g: GatewayProc) -> int:
    return sum(len(line) + 1 for line in list(g.lines))


@pytest.fixture
def ports() -> tuple[int, int]:
    return free_tcp_port(), free_tcp_port()


def start_synced(
    gateway: Start, seeds: list[str], ports: tuple[int, int], *extra: str, ready: bool = True
) -> GatewayProc:
    port, mport = ports
    return gateway(
        f"--endpoints={','.join(seeds)}",
        f"--listen-addr=127.0.0.1:{port}",
        f"--metrics-addr=127.0.0.1:{mport}",
        *extra,
        ready=ready,
    )


# --- item 8: removed endpoints leave the tag map ----------------------------------------------


def test_balancer_forgets_removed_remotes_once_pruned() -> None:
    """The tag map keeps what the relay thread may still report on, and nothing else."""
    b = Balancer([Endpoint("a", 1)])
    (a,) = b.remotes
    b.opened(a)  # a live connection
    for n in range(1000):
        b.set_endpoints([Endpoint("h", 1000 + n)])
        b.prune()
    assert b.by_tag(a.tag) is a  # removed, but its connection goes on
    assert len(b._by_tag) == 2  # a, and the current one
    b.closed(a, 0, 0)
    b.prune()
    assert b.by_tag(a.tag) is None and len(b._by_tag) == 1


# --- item 10: a member that leaves and comes back keeps its live connections ----------------------


def test_balancer_revives_a_removed_remote_with_its_counts() -> None:
    b = Balancer([Endpoint("a", 1), Endpoint("b", 1), Endpoint("c", 1)], least=True)
    for r in b.remotes:
        for _ in range(10):
            b.opened(r)
    c = b.remotes[2]
    b.set_endpoints([Endpoint("a", 1), Endpoint("b", 1)])
    added, removed = b.set_endpoints([Endpoint("a", 1), Endpoint("b", 1), Endpoint("c", 1)])
    assert added == [c] and b.remotes[2] is c and not c.removed
    assert c.connections_active == 10 and b.by_tag(c.tag) is c
    got = []
    for _ in range(9):
        r = b.pick()
        assert r is not None
        b.opened(r)
        got.append(r.addr)
    assert sorted(got) == ["a:1"] * 3 + ["b:1"] * 3 + ["c:1"] * 3


def test_least_connections_survives_a_member_list_flap(
    gateway: Start, ports: tuple[int, int], relay_impl: str
) -> None:
    """Item 10: a member removed and re-added (a member-list flap) came back as a new
    endpoint with no live connections: it got every next client (19 live against 10 and
    10). On both engines: the Cython relay thread counts live connections per tag too."""
    servers = [TagServer(t) for t in ("a", "b", "c")]
    listed = {"n": 3}

    def answer(n: int) -> bytes:
        return member_list(
            *(member(s.tag.decode(), f"http://{s.addr}") for s in servers[: listed["n"]])
        )

    held: list[socket.socket] = []
    try:
        with FakeMember(answer) as fake:
            port, mport = ports
            g = start_synced(
                gateway,
                [fake.addr],
                ports,
                "--auto-sync-interval=100ms",
                "--balance=least-connections",
            )
            g.wait_log("endpoints updated", source="member-list")

            def open_clients(n: int) -> dict[str, int]:
                got = {"a": 0, "b": 0, "c": 0}
                for _ in range(n):
                    s = connect(port)
                    s.settimeout(5)
                    held.append(s)
                    got[read_line(s).decode().strip()] += 1
                return got

            assert open_clients(30) == {"a": 10, "b": 10, "c": 10}
            listed["n"] = 2
            c = servers[2].addr
            g.wait_log("endpoints updated", source="member-list", removed=[c])
            listed["n"] = 3
            g.wait_log("endpoints updated", source="member-list", added=[c])
            got = open_clients(9)
            print(f"RELIABILITY least-connections after a flap ({relay_impl}): {got}")
            assert got == {"a": 3, "b": 3, "c": 3}, got
            row = next(r for r in status(mport)["endpoints"] if r["address"] == c)
            assert row["active_connections"] == 13 and not row["removed"], row
    finally:
        for s in held:
            s.close()
        for s in servers:
            s.close()


# --- the relay thread's side of items 8 and 10 (Cython engine, native accept) ------------------


class EngineUnderTest:
    """The Cython engine with native accept on one loopback listener."""

    def __init__(self) -> None:
        from etcdgw import _relay

        self.engine = _relay.Engine()
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.lsock.setblocking(False)
        self.started: list[tuple[int, int]] = []
        self.failed: list[tuple[int, int, int]] = []
        self.clients: list[socket.socket] = []

    def targets(self, *rows: tuple[int, int], dial_timeout: float = 5.0) -> None:
        """rows: (tag, port) on 127.0.0.1, least-connections."""
        from etcdgw.engine import Target

        self.engine.set_targets(
            [Target(t, socket.AF_INET, "127.0.0.1", p, 0, 0, True) for t, p in rows],
            (),
            dial_timeout,
            0,
            (),
            1.0,
            True,
        )

    def client(self) -> socket.socket:
        c = socket.create_connection(self.lsock.getsockname(), timeout=5)
        self.clients.append(c)
        return c

    def wait(self, what: str, n: int, timeout: float = 5.0) -> float:
        t0 = time.monotonic()
        while len(getattr(self, what)) < n:
            assert time.monotonic() - t0 < timeout, f"{what}: {getattr(self, what)}"
            time.sleep(0.005)
            report = self.engine.collect()
            self.started += report.started
            self.failed += report.failed
        return time.monotonic() - t0

    def close(self) -> None:
        for c in self.clients:
            c.close()
        for cfd, _, _ in self.failed:
            socket.socket(fileno=cfd).close()
        self.engine.close()
        self.lsock.close()


@pytest.mark.c_extension
def test_engine_hands_back_dials_to_a_target_that_leaves(no_fd_leak: None) -> None:
    """What makes Balancer.prune() safe: once a target leaves, the clients the relay
    thread was still connecting to it come back at once (errno 0: dial them yourself), so
    the next report is the last that can name its tag. They waited for --dial-timeout."""
    silent, fillers = silent_listener()
    e = EngineUnderTest()
    try:
        e.targets((7, silent.getsockname()[1]))
        e.engine.listen(e.lsock.fileno(), True)
        e.client()
        time.sleep(0.3)
        e.wait("failed", 0)
        assert not e.failed and e.engine.native_pending() == 1  # connecting
        with TagServer("other") as other:
            e.targets((8, other.port))
            took = e.wait("failed", 1)
        assert [(tag, err) for _, tag, err in e.failed] == [(7, 0)]
        assert took < 1.0, took
    finally:
        e.close()
        silent.close()
        for f in fillers:
            f.close()


@pytest.mark.c_extension
def test_engine_keeps_the_live_count_of_a_target_that_leaves_and_returns(
    no_fd_leak: None,
) -> None:
    """Item 10 in the relay thread: a target that left took its live count with it; listed
    again (the same tag), it had none and took every next client."""
    with TagServer("a") as a, TagServer("b") as b:
        e = EngineUnderTest()
        try:
            e.targets((1, a.port), (2, b.port))
            e.engine.listen(e.lsock.fileno(), True)
            for _ in range(4):
                read_line(e.client())
            e.wait("started", 4)
            assert sorted(tag for _, tag in e.started) == [1, 1, 2, 2]
            e.targets((2, b.port))  # 1 leaves with two live pairs
            e.targets((1, a.port), (2, b.port))  # and comes back
            for _ in range(2):
                read_line(e.client())
            e.wait("started", 6)
            assert sorted(tag for _, tag in e.started[4:]) == [1, 2]
        finally:
            e.close()
