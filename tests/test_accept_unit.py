"""accept.py in process: `LoopAccept` and `NativeAccept` built from their collaborators.

No Gateway, no subprocess: the real parts (tests/_parts.py) on a real loopback listener, the
relay engine under test, TagServer backends. `LoopAccept` runs on both engines; `NativeAccept`
exists only in the Cython engine's threaded mode. Each scenario is written once and run by
a test per way of accepting.

Covered: --max-connections (clients wait in the backlog, and get in when one leaves), what
counts against it while a dial fails over, the pause on EMFILE with a real full fd table
(clients already waiting are shed at once, the pause doubles while the shortage lasts), and
no accepting while draining.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from _gateway import TagServer, free_tcp_port, silent_listener
from _parts import Make, Parts, ep
from etcdgw.config import Endpoint


@pytest.fixture
def make_native(no_fd_leak: None) -> Iterator[Make]:
    """Factory: Parts with NativeAccept (the Cython engine's relay thread accepts)."""
    import etcdgw._relay as _relay  # the Cython engine: untyped to mypy (no stub)

    made: list[Parts] = []

    def build(endpoints: list[Endpoint], **kw: Any) -> Parts:
        p = Parts(endpoints, _relay.Engine, native=True, **kw)
        made.append(p)
        return p

    yield build
    for p in made:
        p.close()


class Clients:
    """The test's clients (closed at the end)."""

    def __init__(self) -> None:
        self.held: list[socket.socket] = []

    def connect(self, parts: Parts) -> socket.socket:
        assert parts.listener_set is not None
        s = socket.create_connection(parts.listener_set.socks[0].getsockname(), timeout=5)
        self.held.append(s)
        return s

    def close(self) -> None:
        for s in self.held:
            s.close()


@pytest.fixture
def clients() -> Iterator[Clients]:
    c = Clients()
    yield c
    c.close()


def nothing_comes(parts: Parts, s: socket.socket, seconds: float = 0.3) -> bool:
    """Whether s gets no byte (and no EOF) for this long, the loop running meanwhile."""
    try:
        parts.read_line(s, seconds)
    except TimeoutError:
        return True
    return False


# --- --max-connections -----------------------------------------------------------------------


def limit_keeps_clients_in_the_backlog(parts: Parts, clients: Clients, a: TagServer) -> None:
    parts.start_accepting()
    held = [clients.connect(parts) for _ in range(3)]
    assert [parts.read_line(s) for s in held[:2]] == [b"a\n", b"a\n"]
    assert nothing_comes(parts, held[2])  # waits in the kernel's backlog, not accepted
    assert parts.table.counters.accepted == 2 and a.accepted == 2
    held[0].close()  # one leaves: room for the next
    assert parts.read_line(held[2]) == b"a\n"
    parts.until(lambda: parts.table.counters.accepted == 3)  # (the relay thread reports late)
    parts.until(lambda: parts.table.counters.finished == 1)


def test_loop_accept_limit(make: Make, clients: Clients) -> None:
    with TagServer("a") as a:
        parts = make([ep(a.port)], max_connections=2)
        limit_keeps_clients_in_the_backlog(parts, clients, a)


@pytest.mark.c_extension
def test_native_accept_limit(make_native: Make, clients: Clients) -> None:
    with TagServer("a") as a:
        parts = make_native([ep(a.port)], max_connections=2)
        limit_keeps_clients_in_the_backlog(parts, clients, a)


def limit_holds_while_a_dial_fails_over(parts: Parts, clients: Clients) -> None:
    """--max-connections=1; the first endpoint refuses, the second is silent: the first
    client's dial fails over (to the silent one, for --dial-timeout). Meanwhile a second
    client must wait in the backlog: the limit counts clients being dialled."""
    parts.start_accepting()
    first, second = clients.connect(parts), clients.connect(parts)
    parts.until(lambda: parts.remotes[0].dial_failures == 1)  # the failover runs
    parts.idle(0.3)
    assert (parts.table.counters.accepted, parts.table.active_connections()) == (1, 1)
    assert nothing_comes(parts, first, 0.05) and nothing_comes(parts, second, 0.05)


def failover_setup(make: Make) -> tuple[Parts, Callable[[], None]]:
    lst, fillers = silent_listener()
    parts = make(
        [ep(free_tcp_port()), ep(lst.getsockname()[1])],
        max_connections=1,
        health_check="none",
        dial_timeout=2.0,
    )

    def close() -> None:
        for f in fillers:
            f.close()
        lst.close()

    return parts, close


def test_loop_accept_limit_counts_a_dial_that_fails_over(make: Make, clients: Clients) -> None:
    parts, close = failover_setup(make)
    try:
        limit_holds_while_a_dial_fails_over(parts, clients)
    finally:
        close()


@pytest.mark.c_extension
def test_native_accept_limit_counts_a_dial_that_fails_over(
    make_native: Make, clients: Clients
) -> None:
    parts, close = failover_setup(make_native)
    try:
        limit_holds_while_a_dial_fails_over(parts, clients)
    finally:
        close()


# --- out of file descriptors ----------------------------------------------------------------


@contextlib.contextmanager
def full_fd_table(spare: int = 0) -> Iterator[list[int]]:
    """The process's fd table full of real fds (the soft RLIMIT_NOFILE lowered to just
    above the highest fd in use, then filled); `spare` fds left free. Yields the fillers;
    restores everything on exit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    top = max(int(x) for x in os.listdir("/proc/self/fd"))
    fill: list[int] = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (top + 16, hard))
    try:
        while True:
            try:
                fill.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
            except OSError as e:
                assert e.errno == errno.EMFILE
                break
        for _ in range(spare):
            os.close(fill.pop())
        yield fill
    finally:
        for fd in fill:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def pauses_and_sheds_when_fds_run_out(parts: Parts, a: TagServer) -> None:
    """Out of fds, accepting pauses (0.1 s, doubling while the shortage lasts) and the
    clients waiting are closed at once (with the spare fd), then it resumes by itself."""
    parts.start_accepting()
    assert parts.listener_set is not None
    addr = parts.listener_set.socks[0].getsockname()
    waiting = [socket.socket() for _ in range(4)]  # their fds exist before the table fills
    emfile = str(OSError(errno.EMFILE, os.strerror(errno.EMFILE)))
    try:
        with full_fd_table():
            for s in waiting[:3]:
                s.connect(addr)  # no fd for accept(): EMFILE
            for s in waiting[:3]:
                assert parts.closed(s)  # shed at once, not left hanging
            assert parts.table.counters.refused == 3
            # Still short when the pause ends: the next pause is twice as long. (The relay
            # thread meets EMFILE at each resume, client or not: Linux's accept4 takes an
            # fd before it looks at the backlog; the loop's accept waits for a client.)
            parts.idle(0.15)
            waiting[3].connect(addr)
            assert parts.closed(waiting[3])
            assert parts.table.counters.refused == 4 and a.accepted == 0
        pauses = parts.messages("accept failed; pausing accept")
        assert sum(p.get("closed-clients", 0) for p in pauses) == 4
        assert {p["error"] for p in pauses} == {emfile}
        doubling = ["100ms", "200ms", "400ms", "800ms"] + ["1s"] * len(pauses)
        assert len(pauses) >= 2 and [p["pause"] for p in pauses] == doubling[: len(pauses)]
        assert parts.table.counters.accept_errors >= len(pauses)
        # fds again: accepting resumes by itself after the pause.
        with socket.create_connection(addr, timeout=5) as s:
            assert parts.read_line(s) == b"a\n"
    finally:
        for s in waiting:
            s.close()


def test_loop_accept_pauses_and_sheds_when_fds_run_out(make: Make) -> None:
    with TagServer("a") as a:
        pauses_and_sheds_when_fds_run_out(make([ep(a.port)]), a)


@pytest.mark.c_extension
def test_native_accept_pauses_and_sheds_when_fds_run_out(make_native: Make) -> None:
    with TagServer("a") as a:
        pauses_and_sheds_when_fds_run_out(make_native([ep(a.port)]), a)


# --- draining -----------------------------------------------------------------------------


def test_no_accepting_while_draining(make: Make, clients: Clients) -> None:
    with TagServer("a") as a:
        parts = make([ep(a.port)])
        acceptor = parts.start_accepting()
        acceptor.stop()
        parts.table.draining = True  # the gateway's first stop signal
        acceptor.start()
        acceptor.resume_below_limit()
        s = clients.connect(parts)
        assert not acceptor.accepting and nothing_comes(parts, s)
        assert parts.table.counters.accepted == 0 and a.accepted == 0


def stop_reaches_a_listener_closed_first(parts: Parts, clients: Clients) -> None:
    """The listener set is closed before the acceptor stops (any caller's order), while a
    client waits at --max-connections (the listener stays ready): stop() still unregisters
    the fd it started on, so when a pair ends and there is room again, a new listening
    socket that got the same number keeps its clients (the relay thread took them)."""
    parts.start_accepting()
    assert parts.listener_set is not None and parts.acceptor is not None
    first = clients.connect(parts)
    assert parts.read_line(first) == b"a\n"  # relayed: the limit is reached
    clients.connect(parts)  # waits in the backlog: the listener is ready, the limit is hit
    parts.idle(0.2)
    fd = parts.listener_set.socks[0].fileno()
    parts.call(parts.listener_set.close)
    parts.call(parts.acceptor.stop)
    other = socket.socket()
    try:
        other.bind(("127.0.0.1", 0))
        other.listen(8)
        if other.fileno() != fd:
            os.dup2(other.fileno(), fd)  # the same number, as a busy process would reuse it
            other.close()
            other = socket.socket(fileno=fd)
        client = socket.create_connection(other.getsockname(), timeout=5)
        try:
            first.close()  # room again: an engine still listening on fd accepts now
            parts.idle(0.5)
            other.settimeout(2)
            got, _ = other.accept()  # still in our backlog: nobody else took it
            got.close()
        finally:
            client.close()
    finally:
        other.close()


def test_loop_accept_stop_reaches_a_listener_closed_first(make: Make, clients: Clients) -> None:
    with TagServer("a") as a:
        parts = make([ep(a.port)], max_connections=1)
        stop_reaches_a_listener_closed_first(parts, clients)


@pytest.mark.c_extension
def test_native_accept_stop_reaches_a_listener_closed_first(
    make_native: Make, clients: Clients
) -> None:
    with TagServer("a") as a:
        parts = make_native([ep(a.port)], max_connections=1)
        stop_reaches_a_listener_closed_first(parts, clients)
