"""Live upgrade, the engine side (issue 20): detach() gives live pairs up, adopt() takes them.

Every twin and mode gives pairs to every other (Cython loop mode, Cython threaded, pure
Python), mid-stream, with bytes held in the engine (its destination not reading), and the
invariant is checked end to end on real sockets: no byte lost or sent twice (sha256 at both
ends, and the byte counts), half-closes kept, and the fds neither closed nor leaked.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import select
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest

from _gateway import Sockets, silent_listener
from etcdgw import _relay_py
from etcdgw.engine import Finished, Handed, RelaySettings, Started, Target
from etcdgw.relay import Engine, Relay, new_event_loop

C = pytest.mark.c_extension
KINDS = ["cython", "cython-thread", "python"]  # conftest's engine_kind, paired here


def make_engine(kind: str, bufsize: int = 32768) -> Any:
    """An engine of this kind: cython (loop mode), cython-thread, or python."""
    if kind.startswith("cython"):
        import etcdgw._relay as _relay  # the Cython engine: untyped to mypy (no stub)

        return _relay.Engine(bufsize, threaded=kind == "cython-thread")
    return _relay_py.Engine(bufsize)


def engine_factory(kind: str) -> type[Engine]:
    """make_engine(kind, n) as relay.Relay's engine_cls: Relay only calls engine_cls(bufsize),
    so a factory serves, though the parameter is typed as the class (src/etcdgw/relay.py)."""
    return cast("type[Engine]", lambda n: make_engine(kind, n))


@pytest.fixture
def engines(no_fd_leak: None) -> Iterator[Callable[..., Any]]:
    made: list[Any] = []

    def make(kind: str, bufsize: int = 32768) -> Any:
        made.append(make_engine(kind, bufsize))
        return made[-1]

    yield make
    for e in made:
        e.close()


class Peer:
    """One application end, non-blocking: sends its payload (then SHUT_WR), reads if asked."""

    def __init__(
        self, sock: socket.socket, payload: bytes = b"", *, shut: bool = True, reading: bool = True
    ) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.out = memoryview(payload)
        self.shut = shut
        self.reading = reading
        self.hash = hashlib.sha256()
        self.data = bytearray()  # kept when small, for exact comparisons
        self.received = 0
        self.eof = False
        self.reply: bytes | None = None  # sent (then SHUT_WR) once EOF is read

    def step(self) -> None:
        while self.out:
            try:
                n = self.sock.send(self.out[: 1 << 20])
            except BlockingIOError:
                break
            self.out = self.out[n:]
        if not self.out and self.shut:
            self.shut = False
            self.sock.shutdown(socket.SHUT_WR)
        while self.reading and not self.eof:
            try:
                data = self.sock.recv(1 << 20)
            except BlockingIOError:
                break
            if not data:
                self.eof = True
                if self.reply is not None:
                    self.out, self.reply, self.shut = memoryview(self.reply), None, True
                    self.step()
                break
            self.hash.update(data)
            self.received += len(data)
            if self.received <= 4096:
                self.data += data

    def events(self) -> int:
        return (select.POLLIN if self.reading and not self.eof else 0) | (
            select.POLLOUT if self.out else 0
        )

    def got(self, expected: bytes) -> bool:
        return self.eof and self.hash.digest() == hashlib.sha256(expected).digest()


def drive(
    engines: list[Any],
    peers: list[Peer],
    until: Callable[[], bool],
    finished: dict[int, list[Finished]] | None = None,
    timeout: float = 30.0,
) -> None:
    """Step peers and engines in this thread until `until()`; finished records by engine."""
    deadline = time.monotonic() + timeout
    while True:
        for peer in peers:
            peer.step()
        for e in engines:
            got = e.run()
            if finished is not None:
                finished.setdefault(id(e), []).extend(got)
            else:
                assert not got, got
        if until():
            return
        assert time.monotonic() < deadline, "no progress in time"
        if not any(e.pending for e in engines):
            poller = select.poll()
            for e in engines:
                poller.register(e.fileno(), select.POLLIN)
            for peer in peers:
                if peer.events():
                    poller.register(peer.sock, peer.events())
            poller.poll(10)


def drive_for(engines: list[Any], peers: list[Peer], seconds: float) -> None:
    end = time.monotonic() + seconds
    drive(engines, peers, lambda: time.monotonic() > end)


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def registered(engine: Any) -> set[int]:
    """The relayed fds in the engine's epoll set, as the kernel reports them."""
    epfd = engine._epoll_fileno() if hasattr(engine, "_epoll_fileno") else engine.fileno()
    with open(f"/proc/self/fdinfo/{epfd}") as f:
        fds = {int(line.split()[1]) for line in f if line.startswith("tfd:")}
    return {fd for fd in fds if "eventfd" not in os.readlink(f"/proc/self/fd/{fd}")}


def small_buffers(quad: Sockets) -> Sockets:
    """Loopback TCP would buffer megabytes in the kernel: keep the bytes in the engine."""
    client, down, up, upstream = quad
    for s in (client, upstream):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
    for s in (down, up):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 16)
    return quad


def payload(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.fixture
def set_splice() -> Iterator[Callable[[bool], None]]:
    """The Cython twin holds refused bytes in a buffer, or (bulk, splice on) in a pipe."""
    changed = []

    def set_(on: bool) -> None:
        import etcdgw._relay as _relay  # the Cython engine: untyped to mypy (no stub)

        _relay._set_splice(on)
        changed.append(_relay)

    yield set_
    for mod in changed:
        mod._set_splice(True)


CASES = [
    pytest.param(a, b, marks=C if "cython" in a + b else (), id=f"{a}-to-{b}")
    for a in KINDS
    for b in KINDS
]
# The Cython source with splice off too (splice: held bytes sit in a pipe; off: a buffer).
STREAM_CASES = [
    pytest.param(a, b, on, marks=C if "cython" in a + b else (), id=f"{a}-to-{b}{sfx}")
    for a in KINDS
    for b in KINDS
    for on, sfx in ((True, ""), (False, "-nosplice"))
    if on or a.startswith("cython")
]


@pytest.mark.parametrize("transport", ["unix", "tcp"])
@pytest.mark.parametrize(("src_kind", "dst_kind", "splice"), STREAM_CASES)
def test_mid_stream_hand_over_loses_and_repeats_no_byte(
    engines: Any,
    sockets: Any,
    set_splice: Callable[[bool], None],
    src_kind: str,
    dst_kind: str,
    splice: bool,
    transport: str,
) -> None:
    if not splice:
        set_splice(False)
    client, down, up, upstream = small_buffers(sockets(transport))
    a, b = payload(3 << 20, 1), payload(3 << 20, 2)
    # Neither application reads at first: both directions fill and the engine holds bytes.
    cp, up_ = Peer(client, a, reading=False), Peer(upstream, b, reading=False)
    src = engines(src_kind)
    src_id = src.add(down.fileno(), up.fileno(), 7)
    drive_for([src], [cp, up_], 0.3)

    before = set(os.listdir("/proc/self/fd"))
    handed = src.detach(10)
    assert len(handed) == 1
    h = handed[0]
    assert isinstance(h, Handed)
    assert (h.pair_id, h.client_fd, h.upstream_fd, h.tag) == (src_id, down.fileno(), up.fileno(), 7)
    assert h.to_upstream and h.to_client, "the engine held bytes both ways"
    assert not h.client_eof and not h.upstream_eof
    assert h.c2u + len(h.to_upstream) <= len(a) and h.u2c + len(h.to_client) <= len(b)
    assert is_open(down.fileno()) and is_open(up.fileno())
    assert registered(src) == set() and len(src) == 0
    # Nothing closed, nothing new (a pipe the Cython twin drained may close: not relayed).
    after = set(os.listdir("/proc/self/fd"))
    assert after <= before and {str(down.fileno()), str(up.fileno())} <= after
    with pytest.raises(KeyError):
        src.stats(src_id)
    # The old engine says nothing more about it, whatever the peers do meanwhile.
    cp.reading = up_.reading = True
    drive_for([src], [cp, up_], 0.05)

    dst = engines(dst_kind)
    new_id = dst.adopt(h)
    # The counts go on from the handed ones: the pair's = handed + what dst moved, and dst
    # relays nothing else (totals()). A relay thread may move bytes from adopt() on, between
    # any two of these calls, so its counts are read between two totals(); the others move
    # nothing until run(), and the three are exact.
    before, now, after = dst.totals(), dst.stats(new_id), dst.totals()
    for i, handed_count in enumerate((h.c2u, h.u2c)):
        assert before[i] <= now[i] - handed_count <= after[i]
    if dst_kind != "cython-thread":
        assert (before, now, after) == ((0, 0), (h.c2u, h.u2c), (0, 0))
    done: dict[int, list[Finished]] = {}
    drive([src, dst], [cp, up_], lambda: cp.eof and up_.eof and bool(done.get(id(dst))), done)
    assert up_.got(a) and cp.got(b)
    assert done.get(id(src), []) == []
    assert [tuple(f)[:4] for f in done[id(dst)]] == [(new_id, len(a), len(b), 0)]
    assert dst.totals() == (len(a) - h.c2u, len(b) - h.u2c)  # what this engine moved


@pytest.mark.parametrize(("src_kind", "dst_kind"), CASES)
def test_pairs_handed_while_bytes_flow(
    engines: Any, sockets: Any, src_kind: str, dst_kind: str
) -> None:
    """Twenty pairs streaming both ways, every application reading: the hand-over lands in
    the middle of the relay thread's (or run()'s) work, whatever it was doing. A pair that
    finished before is reported by the old engine, not handed; every other one is handed."""
    src, dst = engines(src_kind), engines(dst_kind)
    quads = [sockets("unix") for _ in range(20)]
    size = 4 << 20
    datas = [(payload(size, 2 * i), payload(size, 2 * i + 1)) for i in range(20)]
    peers = []
    for (client, down, up, upstream), (a, b) in zip(quads, datas, strict=True):
        src.add(down.fileno(), up.fileno())
        peers.append((Peer(client, a), Peer(upstream, b)))
    flat = [p for pair in peers for p in pair]
    done: dict[int, list[Finished]] = {}
    end = time.monotonic() + 0.02
    drive([src], flat, lambda: time.monotonic() > end, done)
    handed = src.detach(100)
    assert handed and len(src) == 0
    assert len(handed) + len(done.get(id(src), [])) == 20
    for h in handed:
        dst.adopt(h)
    drive(
        [src, dst],
        flat,
        lambda: all(p.eof for p in flat) and len(done.get(id(dst), [])) == len(handed),
        done,
    )
    for (cp, up_), (a, b) in zip(peers, datas, strict=True):
        assert up_.got(a) and cp.got(b)
    records = done.get(id(src), []) + done[id(dst)]
    assert sorted(tuple(f)[1:4] for f in records) == [(size, size, 0)] * 20


@pytest.mark.parametrize(("src_kind", "dst_kind"), CASES)
def test_a_half_close_is_kept(engines: Any, sockets: Any, src_kind: str, dst_kind: str) -> None:
    """The client's EOF went on before the hand-over; the reply comes back after it."""
    client, down, up, upstream = sockets("tcp")
    cp, up_ = Peer(client, b"request"), Peer(upstream, shut=False)
    src = engines(src_kind)
    src.add(down.fileno(), up.fileno())
    drive([src], [cp, up_], lambda: up_.eof)
    assert bytes(up_.data) == b"request"
    (h,) = src.detach(1)
    assert h.client_eof and not h.upstream_eof and h.c2u == 7 and h.u2c == 0
    assert h.to_upstream == h.to_client == b""
    dst = engines(dst_kind)
    new_id = dst.adopt(h)
    up_.out, up_.shut = memoryview(b"reply"), True
    done: dict[int, list[Finished]] = {}
    drive([src, dst], [cp, up_], lambda: cp.eof and bool(done.get(id(dst))), done)
    assert bytes(cp.data) == b"reply"
    assert [tuple(f)[:4] for f in done[id(dst)]] == [(new_id, 7, 5, 0)]
    assert done.get(id(src), []) == []


def test_carried_bytes_go_first_then_the_eof(engines: Any, sockets: Any, engine_kind: str) -> None:
    """A pair handed with bytes in both directions and a client EOF not passed on yet."""
    client, down, up, upstream = sockets("unix")
    cp, up_ = Peer(client, shut=False), Peer(upstream, shut=False)
    dst = engines(engine_kind)
    h = Handed(99, down.fileno(), up.fileno(), -1, 5, 3, True, False, b"tail", b"head")
    new_id = dst.adopt(h)
    drive([dst], [cp, up_], lambda: up_.eof and cp.received == 4)
    assert bytes(up_.data) == b"tail" and bytes(cp.data) == b"head"
    up_.out, up_.shut = memoryview(b"more"), True
    done: dict[int, list[Finished]] = {}
    drive([dst], [cp, up_], lambda: cp.eof and bool(done.get(id(dst))), done)
    assert bytes(cp.data) == b"headmore"
    assert [tuple(f)[:4] for f in done[id(dst)]] == [(new_id, 5 + 4, 3 + 8, 0)]


def test_detach_and_adopt_refuse_what_they_cannot_do(
    engines: Any, sockets: Any, engine_kind: str
) -> None:
    e = engines(engine_kind)
    client, down, up, upstream = sockets("unix")
    with pytest.raises(ValueError):
        e.detach(-1)
    assert e.detach(0) == []
    with pytest.raises(ValueError):  # a client still to be dialled: the caller dials first
        e.adopt(Handed(1, down.fileno(), -1, -1, 0, 0, False, False, b"", b""))
    with pytest.raises(ValueError):
        e.adopt(Handed(1, down.fileno(), up.fileno(), -1, -5, 0, False, False, b"", b""))
    assert len(e) == 0 and registered(e) == set()
    e.add(down.fileno(), up.fileno())
    assert e.detach(0) == [] and len(e) == 1


@pytest.mark.parametrize(
    ("src_kind", "dst_kind"),
    [pytest.param(k, k, marks=C if "cython" in k else (), id=k) for k in KINDS]
    + [
        pytest.param("cython-thread", "python", marks=C, id="cython-thread-to-python"),
        pytest.param("python", "cython-thread", marks=C, id="python-to-cython-thread"),
    ],
)
def test_a_thousand_pairs_in_batches_of_253(
    engines: Any, sockets: Any, src_kind: str, dst_kind: str
) -> None:
    """As SCM_RIGHTS would carry them (253 fds a message): each pair exactly once."""
    src, dst = engines(src_kind), engines(dst_kind)
    quads = [sockets("unix") for _ in range(1000)]
    clients, upstreams = [], []
    for i, (client, down, up, upstream) in enumerate(quads):
        src.add(down.fileno(), up.fileno(), i)
        clients.append(Peer(client, b"q%d" % i))
        upstreams.append(Peer(upstream, shut=False))  # answers after the handover
    peers = clients + upstreams
    drive([src], peers, lambda: all(p.eof for p in upstreams))
    before = set(os.listdir("/proc/self/fd"))
    handed: list[Handed] = []
    sizes = []
    while len(src):
        batch = src.detach(253)
        sizes.append(len(batch))
        handed += batch
    assert sizes == [253, 253, 253, 241]
    assert set(os.listdir("/proc/self/fd")) == before  # nothing closed, nothing opened
    assert registered(src) == set()
    by_tag = {h.tag: h for h in handed}
    assert sorted(by_tag) == list(range(1000))
    for i, (_, down, up, _) in enumerate(quads):
        h = by_tag[i]
        assert (h.client_fd, h.upstream_fd) == (down.fileno(), up.fileno())
        assert h.client_eof and not h.upstream_eof and h.c2u == len(b"q%d" % i)
    ids = {dst.adopt(h): h.tag for h in handed}
    assert len(dst) == 1000
    for i, p in enumerate(upstreams):
        p.out, p.shut = memoryview(b"r%d" % i), True
    done: dict[int, list[Finished]] = {}
    drive(
        [src, dst],
        peers,
        lambda: len(done.get(id(dst), [])) == 1000 and all(p.eof for p in clients),
        done,
    )
    assert done.get(id(src), []) == []
    for i, (c, u) in enumerate(zip(clients, upstreams, strict=True)):
        assert bytes(u.data) == b"q%d" % i and bytes(c.data) == b"r%d" % i
    for f in done[id(dst)]:
        i = ids[f.pair_id]
        assert tuple(f)[1:4] == (len(b"q%d" % i), len(b"r%d" % i), 0)


@C
def test_cross_engine_there_and_back(engines: Any, sockets: Any) -> None:
    """Cython -> pure -> Cython, mid-stream each time, on one stream each way."""
    client, down, up, upstream = small_buffers(sockets("tcp"))
    a, b = payload(4 << 20, 3), payload(4 << 20, 4)
    cp, up_ = Peer(client, a, reading=False), Peer(upstream, b, reading=False)
    e1 = engines("cython-thread")
    e1.add(down.fileno(), up.fileno())
    drive_for([e1], [cp, up_], 0.2)
    (h1,) = e1.detach(1)
    e2 = engines("python")
    e2.adopt(h1)
    cp.reading = True  # one direction drains, the other stays full
    drive_for([e1, e2], [cp, up_], 0.2)
    (h2,) = e2.detach(1)
    assert h2.to_upstream and h2.c2u >= h1.c2u and h2.u2c > h1.u2c
    e3 = engines("cython")
    new_id = e3.adopt(h2)
    up_.reading = True
    done: dict[int, list[Finished]] = {}
    drive([e1, e2, e3], [cp, up_], lambda: cp.eof and up_.eof and bool(done.get(id(e3))), done)
    assert cp.got(b) and up_.got(a)
    assert [tuple(f)[:4] for f in done[id(e3)]] == [(new_id, len(a), len(b), 0)]
    assert not done.get(id(e1)) and not done.get(id(e2))


# -- native accept (Cython, threaded): the thread's own pairs --


class Backend:
    def __init__(self) -> None:
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.lsock.settimeout(5)
        self.port = self.lsock.getsockname()[1]


@C
def test_native_pairs_are_handed_with_their_tag_and_never_reported(no_fd_leak: None) -> None:
    """The relay thread's own pairs, reported (Started) or not yet: handed, open, and the
    engine neither reports nor closes them afterwards."""
    import etcdgw._relay as _relay  # the Cython engine: untyped to mypy (no stub)

    back = Backend()
    lsock = socket.create_server(("127.0.0.1", 0))
    lsock.setblocking(False)
    e = _relay.Engine()
    py = _relay_py.Engine()
    clients: list[socket.socket] = []
    ups: list[socket.socket] = []
    handed: list[Handed] = []
    try:
        e.set_targets(
            [Target(5, socket.AF_INET, "127.0.0.1", back.port, 0, 0, True)], RelaySettings()
        )
        e.listen(lsock.fileno(), True)
        deadline = time.monotonic() + 5
        clients.append(socket.create_connection(lsock.getsockname(), timeout=5))
        ups.append(back.lsock.accept()[0])
        started: list[Started] = []
        while not started:  # the first pair is reported
            assert time.monotonic() < deadline
            time.sleep(0.01)
            started = e.collect().started
        for _ in range(2):  # the other two are not (fresh: a Started record waits)
            clients.append(socket.create_connection(lsock.getsockname(), timeout=5))
            ups.append(back.lsock.accept()[0])
        while len(e) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        handed = e.detach(100)
        assert len(handed) == 3 and {h.tag for h in handed} == {5}
        assert started[0].pair_id in {h.pair_id for h in handed}
        assert all(h.upstream_fd >= 0 and is_open(h.client_fd) for h in handed)
        time.sleep(0.1)
        r = e.collect()
        assert (r.started, r.finished, r.failed) == ([], [], [])
        assert e.native_pending() == 0 and len(e) == 0
        e.close()  # the engine's own pairs are the caller's now: close() leaves them open
        assert all(is_open(h.client_fd) and is_open(h.upstream_fd) for h in handed)
        for h in handed:
            py.adopt(h)
        for i, c in enumerate(clients):
            c.sendall(b"ping%d" % i)
        for u in ups:  # an echo, whichever client each upstream belongs to
            u.settimeout(5)
            msg = b""
            while len(msg) < 5:
                drive_for([py], [], 0.01)
                try:
                    msg += u.recv(10, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    pass
            u.sendall(b"echo " + msg)
        for i, c in enumerate(clients):
            c.setblocking(False)
            got = b""
            while len(got) < 10:
                drive_for([py], [], 0.01)
                try:
                    got += c.recv(20)
                except BlockingIOError:
                    pass
            assert got == b"echo ping%d" % i
    finally:
        py.close()
        e.close()
        for h in handed:
            os.close(h.client_fd)
            os.close(h.upstream_fd)
        for s in clients + ups:
            s.close()
        lsock.close()
        back.lsock.close()


@C
def test_a_pair_still_dialling_hands_its_client_alone(no_fd_leak: None) -> None:
    import etcdgw._relay as _relay  # the Cython engine: untyped to mypy (no stub)

    lst, fillers = silent_listener()
    lsock = socket.create_server(("127.0.0.1", 0))
    lsock.setblocking(False)
    e = _relay.Engine()
    client = None
    try:
        e.set_targets(
            [Target(2, socket.AF_INET, "127.0.0.1", lst.getsockname()[1], 0, 0, True)],
            RelaySettings(dial_timeout=60),
        )
        e.listen(lsock.fileno(), True)
        client = socket.create_connection(lsock.getsockname(), timeout=5)
        deadline = time.monotonic() + 5
        while e.native_pending() == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        fds = set(os.listdir("/proc/self/fd"))
        (h,) = e.detach(5)
        assert h.upstream_fd == -1 and h.tag == 2 and is_open(h.client_fd)
        assert h.to_upstream == b"" and (h.c2u, h.u2c) == (0, 0)
        # the half-made upstream socket is closed, nothing else
        assert len(fds - set(os.listdir("/proc/self/fd"))) == 1
        assert e.native_pending() == 0
        time.sleep(0.05)
        r = e.collect()
        assert (r.started, r.finished, r.failed) == ([], [], [])
        os.close(h.client_fd)
        assert client.recv(1) == b""
    finally:
        e.close()
        if client is not None:
            client.close()
        for f in fillers:
            f.close()
        lst.close()
        lsock.close()


@C
def test_an_adopted_pair_counts_for_least_connections(sockets: Any) -> None:
    import etcdgw._relay as _relay  # the Cython engine: untyped to mypy (no stub)

    e = _relay.Engine()
    try:
        e.set_targets(
            [
                Target(1, socket.AF_INET, "127.0.0.1", 1, 0, 0, True),
                Target(2, socket.AF_INET, "127.0.0.1", 2, 0, 0, True),
            ],
            RelaySettings(least=True),
        )
        client, down, up, upstream = sockets("unix")
        pid = e.adopt(Handed(1, down.fileno(), up.fileno(), 1, 0, 0, False, False, b"", b""))
        assert {e.pick() for _ in range(4)} == {2}
        (h,) = e.detach(1)
        assert h.tag == 1 and h.pair_id == pid
        assert {e.pick() for _ in range(4)} == {1, 2}
    finally:
        e.close()


# -- relay.Relay, from asyncio --


@pytest.mark.parametrize(("src_kind", "dst_kind"), CASES)
def test_relay_detach_and_adopt_from_asyncio(sockets: Any, src_kind: str, dst_kind: str) -> None:
    client, down, up, upstream = sockets("unix")
    finished: dict[str, list[tuple[int, ...]]] = {"src": [], "dst": []}

    async def main() -> None:
        loop = asyncio.get_running_loop()
        r1 = Relay(
            loop,
            lambda *f: finished["src"].append(f),
            engine_cls=engine_factory(src_kind),
        )
        r2 = Relay(
            loop,
            lambda *f: finished["dst"].append(f),
            engine_cls=engine_factory(dst_kind),
        )
        try:
            for s in (client, upstream):
                s.setblocking(False)
            r1.add(down.fileno(), up.fileno(), 3)
            await loop.sock_sendall(client, b"hello")
            assert await loop.sock_recv(upstream, 5) == b"hello"
            (h,) = r1.detach(1)
            new_id = r2.adopt(h)
            await loop.sock_sendall(upstream, b"world")
            upstream.shutdown(socket.SHUT_WR)
            assert await loop.sock_recv(client, 5) == b"world"
            client.shutdown(socket.SHUT_WR)
            assert await loop.sock_recv(client, 5) == b""
            assert await loop.sock_recv(upstream, 5) == b""
            for _ in range(200):
                if finished["dst"]:
                    break
                await asyncio.sleep(0.01)
            assert [f[:4] for f in finished["dst"]] == [(new_id, 5, 5, 0)]
            assert finished["src"] == []
        finally:
            r1.close()
            r2.close()

    loop = new_event_loop()
    try:
        loop.run_until_complete(asyncio.wait_for(main(), 20))
    finally:
        loop.close()
