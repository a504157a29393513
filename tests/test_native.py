"""Native accept: the Cython engine's relay thread accepts, picks a target and connects.

Engine-level tests on real loopback sockets. The gateway-level behaviour (failover,
--max-connections, drain, metrics) is covered once per engine by test_server.py,
test_ops.py and test_metrics.py, which run the Cython engine with native accept on.
"""

from __future__ import annotations

import collections
import errno
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from _gateway import silent_listener, wait_for
from etcdgw import _relay_py
from etcdgw.engine import NativeAcceptEngine, RelayEngine, RelaySettings, Target

pytestmark = pytest.mark.c_extension

NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]


class Backend:
    """A loopback server that answers every connection with its tag, then echoes until EOF."""

    def __init__(self, tag: bytes) -> None:
        self.tag = tag
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(128)
        self.lsock.settimeout(5)
        self.port = self.lsock.getsockname()[1]

    def accept(self) -> socket.socket:
        conn, _ = self.lsock.accept()
        conn.settimeout(5)
        return conn

    def close(self) -> None:
        self.lsock.close()


class Native:
    """An engine with native accept on one loopback listener, and what collect() said."""

    def __init__(self) -> None:
        import etcdgw._relay as _relay  # the Cython engine: untyped to mypy (no stub)

        self.engine = _relay.Engine()
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(128)
        self.lsock.setblocking(False)
        self.addr = self.lsock.getsockname()
        self.started: list[tuple[int, int]] = []
        self.finished: list[tuple[int, int, int, int]] = []
        self.failed: list[tuple[int, int, int]] = []
        self.paused: list[tuple[int, int]] = []
        self.accepted = 0

    def targets(self, *rows: tuple[int, str | None, int, int, int, bool], **kw: Any) -> None:
        """rows: (tag, ip, port, priority, weight, usable)."""
        self.engine.set_targets(
            [Target(t, socket.AF_INET, ip, port, pr, w, u) for t, ip, port, pr, w, u in rows],
            RelaySettings(
                sockopts=kw.get("sockopts", NODELAY),
                dial_timeout=kw.get("dial_timeout", 5.0),
                limit=kw.get("limit", 0),
            ),
        )

    def listen(self) -> None:
        self.engine.listen(self.lsock.fileno(), True)

    def poll(self) -> None:
        started, finished, failed, paused, accepted, _, short = self.engine.collect()
        assert not short  # not asked for
        self.started += started
        self.finished += finished
        self.failed += failed
        self.paused += paused
        self.accepted += accepted

    def wait(self, what: str, n: int, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while len(getattr(self, what)) < n:
            assert time.monotonic() < deadline, f"{what}: {getattr(self, what)} (want {n})"
            time.sleep(0.005)
            self.poll()

    def close(self) -> None:
        for cfd, _, _ in self.failed:
            socket.socket(fileno=cfd).close()
        self.engine.close()
        self.lsock.close()


@pytest.fixture
def native(no_fd_leak: None) -> Iterator[Native]:
    n = Native()
    yield n
    n.close()


@pytest.fixture
def backends(no_fd_leak: None) -> Iterator[list[Backend]]:
    bs = [Backend(b"a"), Backend(b"b"), Backend(b"c")]
    yield bs
    for b in bs:
        b.close()


def client_to(native: Native) -> socket.socket:
    return socket.create_connection(native.addr, timeout=5)


def roundtrip(native: Native, backends: list[Backend], tag_of: dict[int, Backend]) -> bytes:
    """One client through the engine: which backend got it (its tag byte)."""
    c = client_to(native)
    native.wait("started", len(native.started) + 1)
    tag = native.started[-1][1]
    server = tag_of[tag].accept()
    c.sendall(b"ping")
    assert server.recv(4) == b"ping"
    server.sendall(tag_of[tag].tag)
    got = c.recv(1)
    c.close()
    assert server.recv(1) == b""  # the client's EOF is passed on
    server.close()
    return got


def test_round_robin_in_order_skipping_unusable(native: Native, backends: list[Backend]) -> None:
    a, b, c = backends
    tag_of = {1: a, 2: b, 3: c}
    native.targets(
        (1, "127.0.0.1", a.port, 0, 0, True),
        (2, "127.0.0.1", b.port, 0, 0, True),
        (3, "127.0.0.1", c.port, 0, 0, True),
    )
    native.listen()
    assert b"".join(roundtrip(native, backends, tag_of) for _ in range(6)) == b"abcabc"
    native.targets(  # b down: the shared counter goes on, as balancer.pick() does
        (1, "127.0.0.1", a.port, 0, 0, True),
        (2, "127.0.0.1", b.port, 0, 0, False),
        (3, "127.0.0.1", c.port, 0, 0, True),
    )
    assert b"".join(roundtrip(native, backends, tag_of) for _ in range(4)) == b"acac"
    native.wait("finished", 10)
    assert all(f[1] == 4 and f[2] == 1 and f[3] == 0 for f in native.finished)
    assert native.accepted == 10 and not native.failed
    assert len(native.engine) == 0 and native.engine.native_pending() == 0


def test_priority_then_weights(native: Native, backends: list[Backend]) -> None:
    a, b, c = backends
    # c has the lowest priority number but is down: class 10 (a weight 1, b weight 3).
    native.targets(
        (1, "127.0.0.1", a.port, 10, 1, True),
        (2, "127.0.0.1", b.port, 10, 3, True),
        (3, "127.0.0.1", c.port, 5, 1, False),
    )
    native.listen()
    n = 100  # within the backends' accept backlog (128)
    clients = []
    for _ in range(n):
        clients.append(client_to(native))
    native.wait("started", n)
    counts = collections.Counter(tag for _, tag in native.started)
    assert set(counts) <= {1, 2}
    # Binomial(100, 3/4): mean 75, sd 4.3; 5 sd of slack either way.
    assert 53 <= counts[2] <= 97, counts
    for s in clients:
        s.close()
    for be in (a, b):
        be.lsock.setblocking(False)
        while True:
            try:
                be.lsock.accept()[0].close()
            except BlockingIOError:
                break
    native.wait("finished", n)


def test_pick_leaves_out_the_excluded_tags(native: Native) -> None:
    native.targets(*[(t, "127.0.0.1", 1, 0, 0, True) for t in (1, 2, 3)])
    e = native.engine
    assert [e.pick({1, 2}) for _ in range(3)] == [3, 3, 3]
    assert e.pick([1, 2, 3]) == -1
    assert e.pick((2, 3, "not a tag", 1 << 70)) == 1  # what cannot be a tag matches none
    assert sorted(e.pick() for _ in range(3)) == [1, 2, 3]  # and none stays left out


def test_failed_dial_hands_the_client_back(native: Native, backends: list[Backend]) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there: ECONNREFUSED
    native.targets((7, "127.0.0.1", port, 0, 0, True))
    native.listen()
    c = client_to(native)
    native.wait("failed", 1)
    cfd, tag, err = native.failed[0]
    assert (tag, err) == (7, errno.ECONNREFUSED)
    # The caller owns the client now: it is the other end of our connection.
    s = socket.socket(fileno=cfd)
    native.failed.clear()
    assert s.getpeername() == c.getsockname()
    s.sendall(b"from the caller")
    assert c.recv(100) == b"from the caller"
    s.close()
    c.close()
    assert not native.started


def test_nothing_usable_or_no_address(native: Native, backends: list[Backend]) -> None:
    a = backends[0]
    native.targets((1, "127.0.0.1", a.port, 0, 0, False), (2, None, 2379, 0, 0, False))
    native.listen()
    c1 = client_to(native)
    native.wait("failed", 1)
    assert native.failed[0][1:] == (-1, 0)  # no usable target: the caller's fallback
    native.targets((2, None, 2379, 0, 0, True))
    c2 = client_to(native)
    native.wait("failed", 2)
    assert native.failed[1][1:] == (2, 0)  # a host name without an address: caller dials
    c1.close()
    c2.close()


def test_dial_timeout(native: Native) -> None:
    lst, fillers = silent_listener()
    try:
        native.targets((3, "127.0.0.1", lst.getsockname()[1], 0, 0, True), dial_timeout=0.3)
        native.listen()
        t0 = time.monotonic()
        c = client_to(native)
        native.wait("failed", 1, timeout=5)
        took = time.monotonic() - t0
        assert native.failed[0][1:] == (3, errno.ETIMEDOUT)
        # The lower bound is the real check (0.3 s, not less). The upper one catches a dial
        # that ignored the setting: the helper's default 5 s, or the kernel's SYN retries
        # (over a minute); 3 s leaves room for a loaded machine.
        assert 0.25 <= took < 3.0, took
        assert native.engine.native_pending() == 0
        c.close()
    finally:
        for f in fillers:
            f.close()
        lst.close()


def test_dial_timeout_never_fires_early_on_a_busy_thread(native: Native) -> None:
    """A busy relay thread checks the dial deadlines at every batch, not only when its
    epoll_wait times out: the deadline must not pass before --dial-timeout has (read from
    the coarse clock, which lags by up to a tick, 1-10 ms, it passed that much early: 3 ms
    fired after 0.46 ms)."""
    timeout = 0.003
    lst, fillers = silent_listener()
    a1, a2 = socket.socketpair()
    b1, b2 = socket.socketpair()
    b2.settimeout(5)
    stop = threading.Event()

    def chatter() -> None:  # a pair that keeps the relay thread waking every ~0.3 ms
        end = time.monotonic() + 30
        while not stop.is_set() and time.monotonic() < end:
            a1.send(b"x")
            b2.recv(4096)
            time.sleep(0.0002)

    a2.setblocking(False)
    b1.setblocking(False)
    pid = native.engine.add(a2.fileno(), b1.fileno())
    thread = threading.Thread(target=chatter)
    thread.start()
    took: list[float] = []
    try:
        native.targets((3, "127.0.0.1", lst.getsockname()[1], 0, 0, True), dial_timeout=timeout)
        native.listen()
        for i in range(20):
            time.sleep(i % 7 * 0.0011)  # start at every phase of the clock's tick
            t0 = time.monotonic()
            c = client_to(native)
            while len(native.failed) <= i:
                # The failure wakes the loop at once: no polling delay in the measure.
                assert select.select([native.engine.fileno()], [], [], 5)[0], native.failed
                native.poll()
            took.append(time.monotonic() - t0)
            c.close()
        assert all(f[1:] == (3, errno.ETIMEDOUT) for f in native.failed), native.failed
        assert min(took) >= timeout, [round(t * 1000, 2) for t in sorted(took)]
    finally:
        stop.set()
        thread.join()
        native.engine.remove(pid)
        for s in (a1, a2, b1, b2, lst, *fillers):
            s.close()


def test_limit_keeps_clients_in_the_backlog(native: Native, backends: list[Backend]) -> None:
    a = backends[0]
    native.targets((1, "127.0.0.1", a.port, 0, 0, True), limit=2)
    native.listen()
    clients = [client_to(native) for _ in range(4)]
    native.wait("started", 2)
    time.sleep(0.2)
    native.poll()
    assert len(native.started) == 2 and native.accepted == 2
    servers = [a.accept() for _ in range(2)]
    clients[0].close()  # the first pair ends: one more client gets in
    servers[0].close()
    native.wait("started", 3)
    time.sleep(0.1)
    native.poll()
    assert len(native.started) == 3
    native.targets((1, "127.0.0.1", a.port, 0, 0, True), limit=0)  # no limit: the rest
    native.wait("started", 4)
    servers += [a.accept() for _ in range(2)]
    for s in clients + servers:
        s.close()
    native.wait("finished", 4)


def test_unlisten_stops_accepting(native: Native, backends: list[Backend]) -> None:
    a = backends[0]
    native.targets((1, "127.0.0.1", a.port, 0, 0, True))
    native.listen()
    c1 = client_to(native)
    native.wait("started", 1)
    native.engine.unlisten(native.lsock.fileno())
    c2 = client_to(native)  # completes in the kernel's backlog, nobody accepts it
    time.sleep(0.2)
    native.poll()
    assert native.accepted == 1 and len(native.started) == 1
    native.engine.listen(native.lsock.fileno())  # and again
    native.wait("started", 2)
    for s in (c1, c2, a.accept(), a.accept()):
        s.close()
    native.wait("finished", 2)


# A listener closed (or shut down) while the engine still accepts on it, the relay thread
# left at --max-connections with the listener ready: when a pair ends, the thread tries
# accept4() on it. It retried for ever, the engine lock held, and the loop's next call
# (collect(), remove()...) waited for the lock for ever, the GIL released: nothing, not even
# pytest-timeout, could end it (tests/test_accept_unit.py's teardown hung so). Run in a
# child process, so that the hang is a failure and not the end of the test run.
DEAD_LISTENER = """
import json, socket, sys, time
import etcdgw._relay as _relay
from etcdgw.engine import RelaySettings, Target

backend = socket.create_server(("127.0.0.1", 0))
backend.settimeout(5)
lsock = socket.create_server(("127.0.0.1", 0))
lsock.setblocking(False)
fd = lsock.fileno()
engine = _relay.Engine()
engine.set_targets(
    [Target(1, socket.AF_INET, "127.0.0.1", backend.getsockname()[1], 0, 0, True)],
    RelaySettings(sockopts=[], dial_timeout=5.0, limit=1),
)
engine.listen(fd, True)
c1 = socket.create_connection(lsock.getsockname(), timeout=5)
s1, _ = backend.accept()
c2 = socket.create_connection(lsock.getsockname(), timeout=5)  # at the limit: the backlog
started, deadline = 0, time.monotonic() + 5
while not started and time.monotonic() < deadline:  # c1's dial done: the relay thread's news
    started += len(engine.collect().started)
    time.sleep(0.01)
time.sleep(0.2)  # the thread saw c2's edge and left the listener ready
started += len(engine.collect().started)
if sys.argv[1] == "closed":
    lsock.close()
else:
    lsock.shutdown(socket.SHUT_RD)
c1.close()  # the pair ends: room under the limit, the thread tries the dead listener
s1.close()
finished, errors, deadline = [], 0, time.monotonic() + 5
while not finished and time.monotonic() < deadline:
    time.sleep(0.01)
    r = engine.collect()  # before the fix: waits for the lock for ever
    finished += r.finished
    errors += r.accept_errors
time.sleep(0.3)
later = engine.collect()  # no more tries on the dead listener meanwhile
engine.unlisten(fd)
engine.close()
lsock.close()
for s in (c2, backend):
    s.close()
print(json.dumps([started, len(finished), errors, later.accepted, later.accept_errors]))
"""


@pytest.mark.parametrize("how", ["closed", "shut"])
def test_a_dead_listener_does_not_hold_the_lock(how: str) -> None:
    import etcdgw

    src = os.path.dirname(os.path.dirname(etcdgw.__file__))
    try:
        out = subprocess.run(
            [sys.executable, "-c", DEAD_LISTENER, how],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "PYTHONPATH": src},
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("collect() waited 30 s for the engine lock: the thread spins on accept4()")
    assert out.returncode == 0, out.stderr
    started, finished, errors, accepted, later_errors = json.loads(out.stdout)
    assert (started, finished) == (1, 1)
    assert errors >= 1  # the failed accept4() was counted, and given up
    assert (accepted, later_errors) == (0, 0)


def test_reset_is_passed_on_and_remove_closes(native: Native, backends: list[Backend]) -> None:
    a = backends[0]
    native.targets((1, "127.0.0.1", a.port, 0, 0, True))
    native.listen()
    c1 = client_to(native)
    s1 = a.accept()
    c2 = client_to(native)
    s2 = a.accept()
    native.wait("started", 2)
    s1.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    s1.close()  # RST to the engine: passed on to the client as a RST
    with pytest.raises(ConnectionResetError):
        c1.recv(1)
    native.wait("finished", 1)
    assert native.finished[0][3] == errno.ECONNRESET
    pid2 = next(pid for pid, _ in native.started if pid != native.finished[0][0])
    assert native.engine.remove(pid2)[0] == pid2  # the engine closes its own pair: FIN
    assert c2.recv(1) == b""
    assert s2.recv(1) == b""
    for s in (c1, c2, s2):
        s.close()


def test_close_with_live_and_connecting_pairs(no_fd_leak: None, backends: list[Backend]) -> None:
    lst, fillers = silent_listener()
    n = Native()
    try:
        a = backends[0]
        n.targets((1, "127.0.0.1", a.port, 0, 0, True))
        n.listen()
        live = client_to(n)
        n.wait("started", 1)
        n.targets((2, "127.0.0.1", lst.getsockname()[1], 0, 0, True), dial_timeout=60)
        connecting = client_to(n)
        deadline = time.monotonic() + 5
        while n.engine.native_pending() == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        n.close()  # closes every socket of its own: the fd check of the fixture says so
        for f in fillers:
            f.close()
        lst.close()
    assert live.recv(1) == b""
    assert connecting.recv(1) == b""
    a.accept().close()
    live.close()
    connecting.close()


def test_loop_mode_and_the_python_twin_refuse_native_accept() -> None:
    import etcdgw._relay as _relay  # the Cython engine: untyped to mypy (no stub)

    engine: RelayEngine = _relay.Engine(threaded=False)
    assert isinstance(engine, NativeAcceptEngine) and engine.native is False
    with pytest.raises(RuntimeError, match="native accept"):
        engine.listen(0)
    engine.close()
    pure = _relay_py.Engine()
    assert not isinstance(pure, NativeAcceptEngine)  # declared, not stubbed (engine.py)
    pure.close()


def test_short_pairs_are_summed_per_target(native: Native, backends: list[Backend]) -> None:
    a, b = backends[0], backends[1]
    native.targets((1, "127.0.0.1", a.port, 0, 0, True), (2, "127.0.0.1", b.port, 0, 0, True))
    native.listen()
    n = 20
    for i in range(n):
        c = client_to(native)
        server = (a if i % 2 == 0 else b).accept()
        c.sendall(b"12345")
        c.shutdown(socket.SHUT_WR)
        assert server.recv(10) == b"12345"
        server.sendall(b"abc")
        server.close()
        assert c.recv(10) == b"abc"
        c.close()
    sums: dict[int, list[int]] = {}
    silent_total = 0
    deadline = time.monotonic() + 5
    while sum(v[0] for v in sums.values()) < n:
        assert time.monotonic() < deadline, sums
        time.sleep(0.01)
        started, finished, failed, _, _, _, short = native.engine.collect(True)
        # A pair still open at a collect is reported one by one (started, then finished).
        for _, tag in started:
            sums.setdefault(tag, [0, 0, 0, 0])
        for pid, c2u, u2c, _, _ in finished:
            tag = next(t for p, t in native.started + started if p == pid)
            row = sums.setdefault(tag, [0, 0, 0, 0])
            row[0] += 1
            row[1] += c2u
            row[2] += u2c
        native.started += started
        assert not failed
        for tag, pairs, c2u, u2c, errs, silent in short:
            row = sums.setdefault(tag, [0, 0, 0, 0])
            row[0] += pairs
            row[1] += c2u
            row[2] += u2c
            row[3] += errs
            silent_total += silent  # every upstream answered: none is silent
    assert sums == {1: [10, 50, 30, 0], 2: [10, 50, 30, 0]}
    assert silent_total == 0
    assert len(native.engine) == 0


def test_short_pairs_of_more_targets_than_collect_sums_in_c(
    native: Native, backends: list[Backend]
) -> None:
    """collect() sums short pairs in C for its first SHORT_SLOTS (32) targets and in a dict
    beyond: 40 targets (one backend behind all), two pairs each, every pair counted once."""
    a = backends[0]
    tags = range(1, 41)
    native.targets(*((t, "127.0.0.1", a.port, 0, 0, True) for t in tags))
    native.listen()
    for i in range(2 * len(tags)):
        c = client_to(native)
        server = a.accept()
        c.sendall(b"x" * (i + 1))
        assert server.recv(200) == b"x" * (i + 1)
        server.close()  # the upstream ends first, having said nothing: a silent pair
        assert c.recv(10) == b""
        c.close()
    pairs: dict[int, int] = {}
    c2u_total = 0
    deadline = time.monotonic() + 5
    while sum(pairs.values()) < 2 * len(tags):
        assert time.monotonic() < deadline, pairs
        time.sleep(0.01)
        started, finished, failed, _, _, _, short = native.engine.collect(True)
        native.started += started
        assert not failed
        for pid, c2u, _, _, _ in finished:
            tag = next(t for p, t in native.started if p == pid)
            pairs[tag] = pairs.get(tag, 0) + 1
            c2u_total += c2u
        assert len({tag for tag, *_ in short}) == len(short)  # one row per target
        for tag, n, c2u, u2c, errs, silent in short:
            pairs[tag] = pairs.get(tag, 0) + n
            c2u_total += c2u
            assert u2c == 0 and errs == 0 and silent == n
    assert pairs == dict.fromkeys(tags, 2)
    assert c2u_total == sum(range(1, 2 * len(tags) + 1))
    assert len(native.engine) == 0


def test_late_options_reach_long_lived_upstreams(native: Native, backends: list[Backend]) -> None:
    a = backends[0]
    native.engine.set_targets(
        [Target(1, socket.AF_INET, "127.0.0.1", a.port, 0, 0, True)],
        RelaySettings(
            sockopts=tuple(NODELAY),
            late_sockopts=(
                (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
                (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 7),
            ),
            late_after=1.5,
        ),
    )
    native.listen()
    c = client_to(native)
    server = a.accept()
    native.wait("started", 1)

    def upstream_timer() -> str:
        out = subprocess.run(
            ["ss", "-tnoH", "state", "established", f"( dport = :{a.port} )"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert out.strip(), "the upstream connection should be listed"
        return out

    assert "keepalive" not in upstream_timer()  # not yet: it may be short-lived

    def with_keepalive() -> str | None:
        out = upstream_timer()
        return out if "keepalive" in out else None

    assert "keepalive" in wait_for(with_keepalive, 10)
    for s in (c, server):
        s.close()
    native.wait("finished", 1)
