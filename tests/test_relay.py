"""The relay engines (Cython and pure Python) and the asyncio driver, on real sockets."""

from __future__ import annotations

import asyncio
import errno
import gc
import hashlib
import importlib
import inspect
import os
import random
import select
import signal
import socket
import struct
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import pytest

from _gateway import wait_for
from etcdgw import _relay_py
from etcdgw import engine as engine_contract
from etcdgw.engine import BUFSIZE, Finished
from etcdgw.relay import Relay, new_event_loop

Core = tuple[int, int, int, int]  # a Finished record without `ended` (see core())
RESET = {errno.ECONNRESET, errno.EPIPE}  # EPIPE: a RST that follows the peer's FIN


class Peer:
    """One application end of a relayed pair, driven non-blocking from the test's loop."""

    def __init__(
        self,
        sock: socket.socket,
        payload: bytes = b"",
        *,
        shut: bool = True,
        reading: bool = True,
        reply: bytes | None = None,
    ) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.out = memoryview(payload)
        self.sent = 0
        self.shut = shut and reply is None  # shutdown(SHUT_WR) once everything is sent
        self.reading = reading
        self.reply = reply  # sent (then SHUT_WR) only after reading EOF
        self.hash = hashlib.sha256()
        self.received = 0
        self.eof = False

    def step(self) -> None:
        while self.out:
            try:
                n = self.sock.send(self.out[: 1 << 20])
            except BlockingIOError:
                break
            self.out = self.out[n:]
            self.sent += n
        if not self.out and self.shut:
            self.shut = False
            self.sock.shutdown(socket.SHUT_WR)
        while self.reading and not self.eof:
            try:
                data = self.sock.recv(1 << 20)
            except BlockingIOError:
                break
            self.hash.update(data)
            self.received += len(data)
            if not data:
                self.eof = True
                if self.reply is not None:
                    self.out, self.reply, self.shut = memoryview(self.reply), None, True
                    self.step()

    def events(self) -> int:
        return (select.POLLIN if self.reading and not self.eof else 0) | (
            select.POLLOUT if self.out else 0
        )

    def got(self, expected: bytes) -> bool:
        return self.eof and self.hash.digest() == hashlib.sha256(expected).digest()


def core(finished: list[Finished]) -> list[Core]:
    """Finished records without `ended` (which side ended first): id, bytes both ways, errno."""
    return [(f[0], f[1], f[2], f[3]) for f in finished]


def drive(
    engine: Any,
    peers: list[Peer],
    until: Callable[[list[Finished]], bool],
    *,
    timeout: float = 30.0,
) -> list[Finished]:
    """Step peers and engine in one thread until `until(finished)`; fail after `timeout`."""
    finished: list[Finished] = []
    deadline = time.monotonic() + timeout
    while True:
        for peer in peers:
            peer.step()
        finished += engine.run()
        if until(finished):
            return finished
        assert time.monotonic() < deadline, "relay made no progress in time"
        if not engine.pending:
            poller = select.poll()
            poller.register(engine.fileno(), select.POLLIN)
            for peer in peers:
                if peer.events():
                    poller.register(peer.sock, peer.events())
            poller.poll(20)


def all_done(peers: list[Peer]) -> Callable[[list[Finished]], bool]:
    """Until the pair finished and every reading peer saw EOF."""
    return lambda f: bool(f) and all(p.eof for p in peers if p.reading)


def drive_for(engine: Any, peers: list[Peer], seconds: float) -> list[Finished]:
    end = time.monotonic() + seconds
    return drive(engine, peers, lambda _: time.monotonic() > end)


def registered(engine: Any) -> set[int]:
    """The relayed fds in the engine's epoll set, as the kernel reports them."""
    epfd = engine._epoll_fileno() if hasattr(engine, "_epoll_fileno") else engine.fileno()
    with open(f"/proc/self/fdinfo/{epfd}") as f:
        fds = {int(line.split()[1]) for line in f if line.startswith("tfd:")}
    # The relay thread's wake-up eventfd is the engine's own, not a relayed fd.
    return {fd for fd in fds if "eventfd" not in os.readlink(f"/proc/self/fd/{fd}")}


def payload(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.fixture
def new_engine(engine_cls: Any, no_fd_leak: None) -> Iterator[Callable[..., Any]]:
    """Return a factory of engines of the implementation under test, closed afterwards."""
    made: list[Any] = []

    def make(**kw: Any) -> Any:
        made.append(engine_cls(**kw))
        return made[-1]

    yield make
    for engine in made:
        engine.close()


@pytest.fixture
def engine(new_engine: Callable[..., Any]) -> Any:
    """Return an engine with the default buffer size."""
    return new_engine()


def reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the peer gets a RST, not a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


# -- moving bytes --


@pytest.mark.parametrize("kind", ["unix", "tcp"])
@pytest.mark.parametrize("size", [0, 1, 65537, 50 << 20], ids=["empty", "1", "64KiB+1", "50MiB"])
def test_both_directions_byte_exact(engine: Any, sockets: Any, kind: str, size: int) -> None:
    client, down, up, upstream = sockets(kind)
    request, response = payload(size, 1), payload(size, 2)
    base = pipes()
    pid = engine.add(down.fileno(), up.fileno())
    assert registered(engine) == {down.fileno(), up.fileno()}
    peers = [Peer(client, request), Peer(upstream, response)]
    finished = drive(engine, peers, all_done(peers))
    assert core(finished) == [(pid, size, size, 0)]
    assert peers[0].got(response) and peers[1].got(request)
    assert registered(engine) == set() and len(engine) == 0
    assert engine.totals() == (size, size)
    assert pipes() == base  # the engine keeps no fds of its own beyond the epoll fd


def test_half_close_passes_the_reply_back(engine: Any, sockets: Any) -> None:
    # etcd's gateway closes both sockets at the first EOF, losing the reply; we pass it on.
    client, down, up, upstream = sockets("tcp")
    request, reply = b"request" * 1000, payload(300_000)
    pid = engine.add(down.fileno(), up.fileno())
    peers = [Peer(client, request), Peer(upstream, reply=reply)]
    finished = drive(engine, peers, all_done(peers))
    assert peers[1].got(request) and peers[0].got(reply)
    assert core(finished) == [(pid, len(request), len(reply), 0)]


def test_eof_is_passed_on_while_the_other_direction_keeps_going(engine: Any, sockets: Any) -> None:
    client, down, up, upstream = sockets("unix")
    pid = engine.add(down.fileno(), up.fileno())
    peers = [Peer(client, b"req"), Peer(upstream, shut=False)]
    drive(engine, peers, lambda _: peers[1].eof)
    assert len(engine) == 1 and engine.stats(pid) == (3, 0)
    for want in (4, 8, 12):  # the upstream->client direction still works after the half-close
        upstream.send(b"more")
        drive(engine, peers, lambda _: peers[0].received == want)  # noqa: B023
    upstream.shutdown(socket.SHUT_WR)
    assert core(drive(engine, peers, lambda f: bool(f))) == [(pid, 3, 12, 0)]


def test_data_and_eof_sent_before_add_are_relayed(engine: Any, sockets: Any) -> None:
    client, down, up, upstream = sockets("tcp")
    client.sendall(b"early")
    client.shutdown(socket.SHUT_WR)
    upstream.sendall(b"also early")
    time.sleep(0.05)
    pid = engine.add(down.fileno(), up.fileno())
    peers = [Peer(client), Peer(upstream, shut=False)]
    drive(engine, peers, lambda _: peers[1].eof)
    upstream.shutdown(socket.SHUT_WR)
    assert core(drive(engine, peers, all_done(peers))) == [(pid, 5, 10, 0)]
    assert peers[0].got(b"also early") and peers[1].got(b"early")


@pytest.mark.parametrize("side", ["client", "upstream"])
@pytest.mark.parametrize("after_eof", [False, True], ids=["open", "after-eof"])
def test_reset_finishes_the_pair_with_its_errno(
    engine: Any, sockets: Any, side: str, after_eof: bool
) -> None:
    client, down, up, upstream = sockets("tcp")
    pid = engine.add(down.fileno(), up.fileno())
    gone, other = (client, upstream) if side == "client" else (upstream, client)
    peers = [Peer(gone, b"hello", shut=after_eof), Peer(other, b"world", shut=False)]
    drive(engine, peers, lambda _: peers[0].received == 5 and peers[1].received == 5)
    if after_eof:  # the engine no longer reads `gone`: only SO_ERROR can tell it the news
        drive(engine, peers, lambda _: peers[1].eof)
        time.sleep(0.05)  # let the relayed FIN be acked before the reset
    assert len(engine) == 1
    reset(gone)
    (finished,) = drive(engine, peers[1:], lambda f: bool(f))
    assert finished[:3] == (pid, 5, 5) and finished[3] in RESET
    assert registered(engine) == set() and len(engine) == 0


def test_bytes_sent_before_a_reset_are_relayed_first(engine: Any, sockets: Any) -> None:
    client, down, up, upstream = sockets("tcp")
    pid = engine.add(down.fileno(), up.fileno())
    upstream.sendall(b"last words")
    reset(upstream)
    peer = Peer(client, shut=False)
    (finished,) = drive(engine, [peer], lambda f: bool(f) and peer.received == 10)
    assert finished == (pid, 0, 10, errno.ECONNRESET, 2)  # the upstream side ended it


def test_send_to_a_closed_peer_finishes_with_epipe(engine: Any, sockets: Any) -> None:
    # A peer's full close first looks like a half-close (EOF is passed on); the next byte
    # sent to it fails, and that finishes the pair.
    client, down, up, upstream = sockets("unix")
    pid = engine.add(down.fileno(), up.fileno())
    upstream.close()
    peer = Peer(client, shut=False)
    drive(engine, [peer], lambda _: peer.eof)
    assert len(engine) == 1
    client.sendall(b"x" * 1000)
    assert core(drive(engine, [peer], lambda f: bool(f))) == [(pid, 0, 0, errno.EPIPE)]


def test_fds_are_borrowed_never_closed(engine: Any, sockets: Any) -> None:
    sock = sockets("unix")
    client, down, up, upstream = sock
    pid = engine.add(down.fileno(), up.fileno())
    engine.remove(pid)
    pid = engine.add(down.fileno(), up.fileno())
    drive(engine, [Peer(client), Peer(upstream)], lambda f: bool(f))
    engine.add(down.fileno(), up.fileno())
    engine.close()
    for s in sock:
        os.fstat(s.fileno())  # still open: only the owner closes them


# -- backpressure, memory, fairness --


@pytest.mark.parametrize("kind", ["unix", "tcp"])
def test_backpressure_bounds_buffering(engine: Any, sockets: Any, kind: str) -> None:
    client, down, up, upstream = sockets(kind)
    # Fixed kernel buffers (the kernel doubles 256 KiB): TCP autotuning could otherwise grow
    # each receive buffer to tcp_rmem's maximum (32 MiB here) and the kernel, not the engine,
    # would hold what the writer got rid of (once 22 MB of 64).
    for s in (client, down, up, upstream):
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            s.setsockopt(socket.SOL_SOCKET, opt, 256 << 10)
    total = 64 << 20
    data = payload(total)
    pid = engine.add(down.fileno(), up.fileno())
    writer, reader = Peer(client, data), Peer(upstream, reading=False)
    # The window already advertised may still let a little more through: wait (bounded)
    # until a whole 0.3 s window moves nothing.
    drive_for(engine, [writer, reader], 0.3)
    for _ in range(10):
        before = writer.sent
        drive_for(engine, [writer, reader], 0.3)
        if writer.sent == before:
            break
    assert writer.sent == before < total // 4, "the writer should be blocked"
    kernel = sum(
        s.getsockopt(socket.SOL_SOCKET, opt)
        for s in (client, down, up, upstream)
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF)
    )
    assert writer.sent - engine.stats(pid)[0] <= 65536 + kernel  # at most one read held
    reader.reading = True
    finished = drive(engine, [writer, reader], all_done([reader]))
    assert reader.got(data) and core(finished) == [(pid, total, 0, 0)]


def _traced_growth(make: Callable[[], Any]) -> tuple[int, Any]:
    gc.collect()
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        kept = make()
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - start, kept
    finally:
        tracemalloc.stop()


def test_idle_pairs_hold_no_buffers(engine: Any, sockets: Any) -> None:
    n = 256
    rigs = [sockets("unix") for _ in range(n)]

    def exercise() -> list[int]:
        pids = [engine.add(r[1].fileno(), r[2].fileno()) for r in rigs]
        for r in rigs:  # one exchange each, so buffers had every chance to appear
            r[0].sendall(b"ping")
            r[3].sendall(b"pong")
        drive(engine, [], lambda _: sum(map(sum, map(engine.stats, pids))) == 8 * n)
        return pids

    growth, _ = _traced_growth(exercise)
    assert growth / n < 1024, f"{growth / n:.0f} bytes per idle pair"


def test_a_stalled_destination_holds_one_read_until_it_drains(engine: Any, sockets: Any) -> None:
    client, down, up, upstream = sockets("unix")
    pid = engine.add(down.fileno(), up.fileno())
    writer, reader = Peer(client, payload(8 << 20), shut=False), Peer(upstream, reading=False)
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        drive_for(engine, [writer, reader], 0.2)
        held = tracemalloc.get_traced_memory()[0] - base
        reader.reading = True
        drive(engine, [writer, reader], lambda _: reader.received == 8 << 20)
        gc.collect()
        left = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert held <= 65536 + 4096 and left < 2048  # (the Cython twin may hold it in a pipe)
    assert engine.stats(pid) == (8 << 20, 0)


def pipes() -> int:
    """How many pipe fds this process has open (the Cython twin splices through pipes)."""
    return sum(
        os.readlink(f"/proc/self/fd/{fd}").startswith("pipe:")
        for fd in os.listdir("/proc/self/fd")
        if os.path.exists(f"/proc/self/fd/{fd}")
    )


def test_splice_pipes_are_capped_and_not_held_by_idle_pairs(
    new_engine: Any, sockets: Any, engine_kind: str
) -> None:
    # Small reads fill the buffer (bulk: the Cython twin splices), small destinations fill
    # first: each stalled direction then holds its pending bytes in a pipe, up to the cap.
    engine = new_engine(bufsize=4096)
    base = pipes()
    rigs = [sockets("unix") for _ in range(80)]
    data = payload(150_000)
    for client, down, up, _ in rigs:
        up.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32768)
        client.sendall(data)
        engine.add(down.fileno(), up.fileno())
    readers = [Peer(r[3], reading=False) for r in rigs]
    drive_for(engine, readers, 0.3)
    held = pipes() - base
    assert held <= 2 * 64  # MAX_PIPES in _relay.pyx: far from the fd limit
    if engine_kind.startswith("cython"):
        assert held == 2 * 64, "the scenario should reach the cap"
    for reader in readers:
        reader.reading = True
    drive(engine, readers, lambda _: all(p.received == len(data) for p in readers))
    assert all(p.hash.digest() == hashlib.sha256(data).digest() for p in readers)
    assert pipes() == base  # idle pairs hold none
    assert len(engine) == 80


def test_no_splice_while_sigpipe_could_kill(new_engine: Any, sockets: Any) -> None:
    # splice(2) cannot pass MSG_NOSIGNAL; with SIGPIPE at its default the engine must not use it.
    previous = signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        engine = new_engine()
    finally:
        signal.signal(signal.SIGPIPE, previous)
    base = pipes()
    client, down, up, upstream = sockets("unix")
    pid = engine.add(down.fileno(), up.fileno())
    writer, reader = Peer(client, payload(4 << 20)), Peer(upstream, reading=False)
    drive_for(engine, [writer, reader], 0.2)
    assert pipes() == base
    reader.reading = True
    assert core(drive(engine, [writer, reader], all_done([reader]))) == [(pid, 4 << 20, 0, 0)]


def test_run_stops_early_for_fairness_and_resumes(
    engine_module: ModuleType, no_fd_leak: None, sockets: Any
) -> None:
    """Loop mode only (the relay thread keeps its ready list to itself): under the
    cython-thread id this runs the Cython engine's loop mode once more."""
    bufsize = 1024
    engine = engine_module.Engine(bufsize=bufsize, threaded=False)
    try:
        rigs = [sockets("unix") for _ in range(8)]
        pids = [engine.add(r[1].fileno(), r[2].fileno()) for r in rigs]
        size = 100_000  # fits in a socketpair's buffer: all of it is ready at once
        for r in rigs:
            r[0].sendall(payload(size))
        select.select([engine.fileno()], [], [], 1)
        assert engine.run() == [] and engine.pending
        moved = [engine.stats(pid)[0] for pid in pids]
        assert max(moved) <= _relay_py.VISIT_BUFS * bufsize
        assert sum(moved) < _relay_py.RUN_BUFS * bufsize + _relay_py.VISIT_BUFS * bufsize
        peers = [Peer(r[3], shut=False) for r in rigs]
        drive(engine, peers, lambda _: all(p.received == size for p in peers))
        assert not engine.pending
    finally:
        engine.close()


def test_many_concurrent_pairs(engine: Any, sockets: Any) -> None:
    rng = random.Random(7)
    rigs: list[tuple[Peer, Peer, bytes, bytes]] = []
    peers: list[Peer] = []
    expect: dict[int, Core] = {}
    for i in range(200):
        client, down, up, upstream = sockets(rng.choice(["unix", "tcp"]))
        req, resp = payload(rng.randrange(0, 300_000), 2 * i), payload(rng.randrange(0, 300_000))
        pid = engine.add(down.fileno(), up.fileno())
        expect[pid] = (pid, len(req), len(resp), 0)
        rigs.append((Peer(client, req), Peer(upstream, resp), req, resp))
        peers += rigs[-1][:2]
    finished = drive(engine, peers, lambda f: len(f) == len(expect) and all(p.eof for p in peers))
    assert sorted(core(finished)) == sorted(expect.values())
    assert all(c.got(resp) and u.got(req) for c, u, req, resp in rigs)
    assert engine.totals() == tuple(sum(f[i] for f in finished) for i in (1, 2))
    assert registered(engine) == set() and len(engine) == 0


# -- bookkeeping --


def test_remove_mid_stream(engine: Any, sockets: Any) -> None:
    client, down, up, upstream = sockets("unix")
    pid = engine.add(down.fileno(), up.fileno())
    writer, reader = Peer(client, payload(10 << 20)), Peer(upstream, b"x" * 10, shut=False)
    drive(engine, [writer, reader], lambda _: reader.received > 1 << 20)
    c2u, u2c = engine.stats(pid)
    assert engine.remove(pid) == (pid, c2u, u2c, 0, 0) and u2c == 10
    assert registered(engine) == set() and len(engine) == 0
    with pytest.raises(KeyError):
        engine.stats(pid)
    with pytest.raises(KeyError):
        engine.remove(pid)
    assert drive_for(engine, [writer, reader], 0.1) == []  # nothing moves, nothing reported
    assert engine.totals() == (c2u, u2c)


def test_stats_and_totals_cover_live_and_finished_pairs(engine: Any, sockets: Any) -> None:
    done, live = sockets("unix"), sockets("unix")
    pid_done = engine.add(done[1].fileno(), done[2].fileno())
    pid_live = engine.add(live[1].fileno(), live[2].fileno())
    assert pid_done != pid_live and len(engine) == 2
    peers = [Peer(done[0], b"a" * 10), Peer(done[3], b"b" * 20)]
    peers += [Peer(live[0], b"c" * 30, shut=False), Peer(live[3], b"d" * 40, shut=False)]
    finished = drive(engine, peers, lambda f: bool(f) and peers[2].received == 40)
    assert core(finished) == [(pid_done, 10, 20, 0)]
    assert engine.stats(pid_live) == (30, 40)
    assert engine.totals() == (40, 60) and len(engine) == 1


@pytest.mark.parametrize("bad", [0, -1, 12345678, 1 << 70, "x", None])
def test_unknown_pair_ids_raise_key_error(engine: Any, bad: Any) -> None:
    with pytest.raises(KeyError):
        engine.stats(bad)
    with pytest.raises(KeyError):
        engine.remove(bad)


def test_add_failure_leaves_nothing_behind(engine: Any, sockets: Any) -> None:
    client, down, up, upstream = sockets("unix")
    with pytest.raises(FileExistsError):
        engine.add(down.fileno(), down.fileno())
    spare = os.dup(up.fileno())
    os.close(spare)
    with pytest.raises(OSError) as info:
        engine.add(down.fileno(), spare)
    assert info.value.errno == errno.EBADF
    assert len(engine) == 0 and registered(engine) == set()
    pid = engine.add(down.fileno(), up.fileno())
    assert core(drive(engine, [Peer(client, b"ok"), Peer(upstream)], lambda f: bool(f))) == [
        (pid, 2, 0, 0)
    ]


def test_close_is_idempotent(new_engine: Any, sockets: Any) -> None:
    engine = new_engine()
    client, down, up, upstream = sockets("unix")
    engine.add(down.fileno(), up.fileno())
    client.sendall(b"abc")
    drive(engine, [Peer(upstream, shut=False)], lambda _: engine.totals()[0] == 3)
    engine.close()
    engine.close()
    for call in (engine.fileno, engine.run, lambda: engine.add(down.fileno(), up.fileno())):
        with pytest.raises(ValueError):
            call()
    assert engine.totals() == (3, 0) and len(engine) == 0 and not engine.pending


def test_bufsize_is_validated(engine_module: ModuleType) -> None:
    for bad in (0, -5, 1 << 31):
        with pytest.raises(ValueError):
            engine_module.Engine(bufsize=bad)


@pytest.mark.c_extension
def test_both_engines_have_the_same_interface() -> None:
    """Each twin implements what engine.py declares for it, with the declared signatures:
    both the core Engine, the pure twin LoopEpoll, the Cython twin NativeAccept."""
    _relay = importlib.import_module("etcdgw._relay")

    def members(proto: type) -> set[str]:
        return {
            n
            for n in vars(proto)
            if (not n.startswith("_") or n in {"__init__", "__len__"})
            and n not in {"__weakref__", "__dict__"}
        }

    def shape(cls: type, name: str) -> Any:
        attr = inspect.getattr_static(cls, name)
        if isinstance(attr, property) or inspect.isgetsetdescriptor(attr):
            return "property"
        if name == "__len__":  # a C slot in Cython: no Python signature to compare
            return "slot"
        if name == "__init__":  # a slot too; Cython embeds its signature in the doc
            doc = (cls.__doc__ or "").splitlines()[0]
            sig = doc if doc.startswith("Engine(") else f"Engine{inspect.signature(cls)}"
            # Cython embeds the default as written, the name of the constant
            return sig.replace("'", "").replace("= BUFSIZE", f"= {BUFSIZE}").split(" -> ")[0]
        params = inspect.signature(getattr(cls, name)).parameters.values()
        return [(p.name, p.kind, p.default) for p in params]

    for cls, protos in (
        (_relay.Engine, [engine_contract.RelayEngine, engine_contract.NativeAcceptEngine]),
        (_relay_py.Engine, [engine_contract.RelayEngine, engine_contract.LoopEpoll]),
    ):
        for proto in protos:
            for name in members(proto):
                assert hasattr(cls, name), f"{cls.__module__}.Engine lacks {proto.__name__}.{name}"
                want = shape(proto, name)
                if name == "__init__":
                    want = f"Engine(bufsize: int = {BUFSIZE}, threaded: bool | None = None)"
                assert shape(cls, name) == want, (cls.__module__, name)
    core = members(engine_contract.RelayEngine)
    assert {n: shape(_relay.Engine, n) for n in core} == {
        n: shape(_relay_py.Engine, n) for n in core
    }
    assert not isinstance(_relay_py.Engine(), engine_contract.NativeAcceptEngine)
    assert {"add", "run", "remove", "stats", "totals", "close", "fileno", "pending"} <= core


# -- the relay thread (Cython, threaded mode) --


def threads() -> set[int]:
    return {int(t) for t in os.listdir("/proc/self/task")}


def threads_back_to(before: set[int]) -> bool:
    """Wait a little for exiting threads (a joined Python thread may still be unwinding)."""
    deadline = time.monotonic() + 5
    while threads() != before and time.monotonic() < deadline:
        time.sleep(0.01)
    return threads() == before


def sig_blocked(tid: int) -> int:
    with open(f"/proc/self/task/{tid}/status") as f:
        return next(int(line.split()[1], 16) for line in f if line.startswith("SigBlk:"))


def pump(sock: socket.socket, stop: threading.Event, chunk: bytes = b"x" * 4096) -> None:
    """Keep writing into sock (blocking, with a timeout) until stop is set or it breaks."""
    sock.settimeout(0.05)
    while not stop.is_set():
        try:
            sock.send(chunk)
        except TimeoutError:
            continue
        except OSError:
            return


def collect(sock: socket.socket, stop: threading.Event, got: list[int]) -> None:
    """Read sock until stop is set (then until it is empty), counting bytes into got[0]."""
    sock.settimeout(0.05)
    while True:
        try:
            data = sock.recv(1 << 16)
        except TimeoutError:
            if stop.is_set():
                return
            continue
        except OSError:
            return
        if not data:
            return
        got[0] += len(data)


def pending(sock: socket.socket) -> bool:
    """Whether bytes wait to be read on sock (without reading them or blocking)."""
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except BlockingIOError:
        return False


@pytest.mark.c_extension
def test_relay_thread_blocks_signals_and_stops_at_close(no_fd_leak: None) -> None:
    import etcdgw._relay as _relay  # the Cython engine: untyped to mypy (no stub)

    before = threads()
    engine = _relay.Engine(threaded=True)
    (tid,) = threads() - before
    blocked = sig_blocked(tid)  # signals stay with the main thread (Python's handlers)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD, signal.SIGUSR1):
        assert blocked & (1 << (sig - 1)), sig
    assert engine.fileno() != engine._epoll_fileno() and not engine.pending
    assert engine.run() == []
    engine.close()
    assert threads() == before
    engine.close()
    with pytest.raises(ValueError):
        engine.fileno()
    # An engine dropped without close() stops its thread too.
    engine = _relay.Engine(threaded=True)
    assert len(threads()) == len(before) + 1
    del engine
    gc.collect()
    assert threads() == before


@pytest.mark.c_extension
def test_relay_thread_announces_finished_pairs_on_fileno(sockets: Any) -> None:
    import etcdgw._relay as _relay  # the Cython engine: untyped to mypy (no stub)

    engine = _relay.Engine(threaded=True)
    try:
        client, down, up, upstream = sockets("unix")
        pid = engine.add(down.fileno(), up.fileno())
        client.sendall(b"hello")
        client.shutdown(socket.SHUT_WR)
        upstream.settimeout(10)
        assert upstream.recv(10) == b"hello" and upstream.recv(10) == b""
        assert engine.run() == []  # relayed by the thread, nothing finished yet
        upstream.sendall(b"bye")
        upstream.shutdown(socket.SHUT_WR)
        assert select.select([engine.fileno()], [], [], 10)[0]
        assert core(engine.run()) == [(pid, 5, 3, 0)]
        assert not select.select([engine.fileno()], [], [], 0)[0]  # drained
        assert engine.run() == [] and len(engine) == 0 and registered(engine) == set()
    finally:
        engine.close()


@pytest.mark.c_extension
def test_remove_racing_with_traffic_leaves_the_fds_alone(sockets: Any) -> None:
    # Both directions busy while remove() runs: once it returns the thread must not read,
    # write or count anything more on those fds, so what it reports is exactly what arrived.
    import etcdgw._relay as _relay  # the Cython engine: untyped to mypy (no stub)

    engine = _relay.Engine(threaded=True, bufsize=4096)
    stop = threading.Event()
    workers: list[threading.Thread] = []
    rigs = []
    try:
        for _ in range(20):
            client, down, up, upstream = sockets("tcp")
            got = [[0], [0]]  # bytes at upstream, bytes at client
            rigs.append((engine.add(down.fileno(), up.fileno()), down, up, got))
            for target, args in (
                (pump, (client, stop)),
                (pump, (upstream, stop)),
                (collect, (upstream, stop, got[0])),
                (collect, (client, stop, got[1])),
            ):
                workers.append(threading.Thread(target=target, args=args, daemon=True))
                workers[-1].start()
        # Every pair busy both ways before the removes start (80 Python threads may take a
        # while on a loaded machine: a fixed sleep was not always enough).
        wait_for(lambda: all(min(engine.stats(r[0])) > 0 for r in rigs), timeout=10)
        removed = []
        for pid, down, _, _ in rigs:
            assert min(engine.stats(pid)) > 0, "traffic should be flowing both ways"
            removed.append(engine.remove(pid))
            assert down.fileno() not in registered(engine)
            time.sleep(0.005)
        assert len(engine) == 0 and registered(engine) == set()
        time.sleep(0.1)
        totals = engine.totals()
        # Every pump wrote again after its pair was removed (on a loaded machine one may not
        # have run since): bytes wait in each removed fd, checked below to stay there.
        wait_for(lambda: all(pending(s) for r in rigs for s in r[1:3]), timeout=10)
        stop.set()
        for w in workers:
            w.join(10)
        for (pid, down, up, got), (rpid, c2u, u2c, err, _) in zip(rigs, removed, strict=True):
            assert (rpid, err) == (pid, 0)
            assert (got[0][0], got[1][0]) == (c2u, u2c)  # counted == delivered, not more
            # Unread bytes stay in the kernel: nobody reads the removed fds any more.
            assert down.recv(1, socket.MSG_PEEK) and up.recv(1, socket.MSG_PEEK)
        assert totals == (sum(r[1] for r in removed), sum(r[2] for r in removed))
        assert engine.totals() == totals
    finally:
        stop.set()
        for w in workers:
            w.join(10)
        engine.close()


@pytest.mark.c_extension
def test_many_pairs_added_while_the_thread_relays(sockets: Any) -> None:
    # The pair table grows (64 -> 1024 slots, reallocated) under the thread's feet.
    import etcdgw._relay as _relay  # the Cython engine: untyped to mypy (no stub)

    engine = _relay.Engine(threaded=True, bufsize=8192)
    stop, stop_pump = threading.Event(), threading.Event()
    workers: list[threading.Thread] = []
    try:
        first, down, up, upstream = sockets("unix")
        busy = engine.add(down.fileno(), up.fileno())
        got = [0]
        workers += [
            threading.Thread(target=pump, args=(first, stop_pump), daemon=True),
            threading.Thread(target=collect, args=(upstream, stop, got), daemon=True),
        ]
        for w in workers:
            w.start()
        rigs = []
        for i in range(600):
            client, down, up, upstream = sockets("unix")
            msg = payload(100 + i, i)
            client.sendall(msg)  # already waiting when the pair is added
            client.shutdown(socket.SHUT_WR)
            rigs.append((engine.add(down.fileno(), up.fileno()), upstream, msg))
        for _, upstream, msg in rigs:
            upstream.settimeout(10)
            data = b""
            while chunk := upstream.recv(1 << 16):
                data += chunk
            assert data == msg
            upstream.shutdown(socket.SHUT_WR)
        finished: list[Finished] = []
        deadline = time.monotonic() + 30
        while len(finished) < len(rigs):
            assert time.monotonic() < deadline, "finished pairs were not all announced"
            select.select([engine.fileno()], [], [], 1)
            finished += engine.run()
        assert sorted(core(finished)) == sorted((pid, len(msg), 0, 0) for pid, _, msg in rigs)
        assert len(engine) == 1
        wait_for(lambda: engine.stats(busy)[0] > 0, timeout=10)  # the busy pair still moves
        stop_pump.set()
        workers[0].join(10)
        # Removed first, then collected: once remove() returns nothing more is written, and
        # the collector gets all of it. (Stopping the collector first could lose bytes that
        # the relay thread, starved for 50 ms on a loaded machine, wrote after it gave up.)
        c2u = engine.remove(busy)[1]
        wait_for(lambda: got[0] >= c2u, timeout=10)  # counted bytes were all delivered
        stop.set()
        workers[1].join(10)
        assert got[0] == c2u  # and not more
    finally:
        stop_pump.set()
        stop.set()
        for w in workers:
            w.join(10)
        engine.close()


@pytest.mark.c_extension
def test_close_with_live_busy_pairs(sockets: Any) -> None:
    import etcdgw._relay as _relay  # the Cython engine: untyped to mypy (no stub)

    before = threads()
    engine = _relay.Engine(threaded=True)
    stop = threading.Event()
    workers: list[threading.Thread] = []
    rigs = [sockets(kind) for kind in ("unix", "tcp") * 4]
    try:
        for client, down, up, upstream in rigs:
            engine.add(down.fileno(), up.fileno())
            got = [0]
            workers += [
                threading.Thread(target=pump, args=(client, stop), daemon=True),
                threading.Thread(target=collect, args=(upstream, stop, got), daemon=True),
            ]
        for w in workers:
            w.start()
        wait_for(lambda: engine.totals()[0] > 0, timeout=10)  # traffic is flowing
        engine.close()  # joins the thread mid-traffic
        assert threads() - before <= {w.native_id for w in workers}  # relay thread gone
        assert len(engine) == 0
        totals = engine.totals()
        time.sleep(0.05)
        assert engine.totals() == totals  # nothing moves any more
        for _, down, up, _ in rigs:  # still open: they belong to the caller
            os.fstat(down.fileno())
            os.fstat(up.fileno())
    finally:
        stop.set()
        for w in workers:
            w.join(10)
        engine.close()
    assert threads_back_to(before)


# -- the asyncio driver --


@pytest.mark.parametrize("selector", ["default", "relay"])
def test_relay_drives_the_engine_from_asyncio(
    engine_cls: Any,
    threaded: bool,
    sockets: Any,
    monkeypatch: pytest.MonkeyPatch,
    selector: str,
) -> None:
    """Both ways of driving: the engine's fd as a loop reader, or (pure engine on a loop
    with relay.RelaySelector, as etcdgw serves) its fds in the loop's own epoll."""
    rigs = [sockets("tcp") for _ in range(5)]
    finished: list[Core] = []
    errors: list[dict[str, Any]] = []
    again: list[Relay] = []
    on_again = Relay._on_again

    def counting(self: Relay) -> None:
        again.append(self)
        on_again(self)

    monkeypatch.setattr(Relay, "_on_again", counting)

    def on_finished(pid: int, c2u: int, u2c: int, err: int, ended: int) -> None:
        finished.append((pid, c2u, u2c, err))
        if len(finished) == 1:
            raise RuntimeError("boom")  # reported, and the other pairs still come through

    async def exchange(client: socket.socket, upstream: socket.socket, n: int) -> bytes:
        loop = asyncio.get_running_loop()
        for s in (client, upstream):
            s.setblocking(False)
        await loop.sock_sendall(client, b"q" * n)
        client.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := await loop.sock_recv(upstream, 1 << 16):
            got += chunk
        await loop.sock_sendall(upstream, got[::-1] + b"!")
        upstream.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := await loop.sock_recv(client, 1 << 16):
            got += chunk
        return got

    async def main() -> list[bytes]:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _, ctx: errors.append(ctx))
        # A tiny bufsize makes the fairness budget bite, exercising the call_soon path.
        relay = Relay(loop, on_finished, engine_cls=engine_cls, bufsize=512)
        attached = relay._selector is not None
        assert attached == (selector == "relay" and isinstance(relay._engine, _relay_py.Engine))
        try:
            pids = [relay.add(r[1].fileno(), r[2].fileno()) for r in rigs]
            replies = await asyncio.wait_for(
                asyncio.gather(*(exchange(r[0], r[3], 200_000 + i) for i, r in enumerate(rigs))),
                30,
            )
            while len(finished) < len(rigs):
                await asyncio.sleep(0.01)
            assert sorted(finished) == sorted(
                (pid, 200_000 + i, 200_001 + i, 0) for i, pid in enumerate(pids)
            )
            assert relay.totals() == (sum(f[1] for f in finished), sum(f[2] for f in finished))
            assert len(relay) == 0
            return replies
        finally:
            relay.close()
            relay.close()

    with asyncio.Runner(loop_factory=new_event_loop if selector == "relay" else None) as r:
        replies = r.run(main())
    assert replies == [b"q" * (200_000 + i) + b"!" for i in range(len(rigs))]
    assert [str(e["exception"]) for e in errors] == ["boom"]
    # (The relay thread applies the budget by itself: run() is never pending then.)
    assert bool(again) != threaded, "the fairness budget should send the driver round"


def unexpected(*finished: int) -> None:
    raise AssertionError(f"on_finished called for a removed pair: {finished}")


def test_relay_remove_and_stats(engine_cls: Any, sockets: Any) -> None:
    client, down, up, upstream = sockets("unix")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        relay = Relay(loop, unexpected, engine_cls=engine_cls)
        pid = relay.add(down.fileno(), up.fileno())
        client.sendall(b"abc")
        await asyncio.wait_for(loop.sock_recv(upstream, 10), 10)
        assert relay.stats(pid) == (3, 0) and len(relay) == 1
        assert relay.remove(pid) == (pid, 3, 0, 0, 0)
        relay.close()

    upstream.setblocking(False)
    asyncio.run(main())
