"""The kernel relay (bench/kernel/sockmap.py, a measured prototype) on real loopback TCP sockets.

Not part of `make test`: run `python3 -m pytest bench/kernel` as root (see README.md here).

Runs where probe() says the kernel and privileges allow it (root, or CAP_BPF +
CAP_NET_ADMIN, on a kernel with sockhash stream verdicts); elsewhere the whole module is
skipped with probe()'s reason, which `-ra` prints.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sockmap
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from etcdgw import _relay_py
from test_relay import RESET, Peer, all_done, drive, drive_for, payload, reset

REASON = sockmap.probe()
pytestmark = [
    pytest.mark.skipif(REASON is not None, reason=f"kernel relay unavailable: {REASON}"),
    # hypothesis reads mypy_extensions.TypedDict when it reports a falsifying example
    # (see tests/test_fuzz.py): keep that report readable under warnings-as-errors.
    pytest.mark.filterwarnings("ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning"),
]

SIOCOUTQ = 0x5411
Sockets = tuple[socket.socket, socket.socket, socket.socket, socket.socket]


@pytest.fixture
def sockets(no_fd_leak: None) -> Iterator[Callable[[], Sockets]]:
    """A factory of (client app, relay's client end, relay's upstream end, upstream app)."""
    made: list[socket.socket] = []

    def pair() -> tuple[socket.socket, socket.socket]:
        with socket.create_server(("127.0.0.1", 0)) as listener:
            a = socket.create_connection(listener.getsockname())
            b, _ = listener.accept()
        return a, b

    def make() -> Sockets:
        client, down = pair()
        up, upstream = pair()
        for s in (down, up):
            s.setblocking(False)
        made.extend((client, down, up, upstream))
        return client, down, up, upstream

    yield make
    for s in made:
        s.close()


@pytest.fixture
def new_relay(no_fd_leak: None) -> Iterator[Callable[..., sockmap.KernelRelay]]:
    made: list[sockmap.KernelRelay] = []

    def make(**kw: Any) -> sockmap.KernelRelay:
        made.append(sockmap.KernelRelay(**kw))
        return made[-1]

    yield make
    for relay in made:
        relay.close()


@pytest.fixture
def relay(new_relay: Callable[..., sockmap.KernelRelay]) -> sockmap.KernelRelay:
    return new_relay()


def registered(relay: sockmap.KernelRelay) -> set[int]:
    """Relayed fds in the relay's epoll set (its own ring buffer and timerfd left out)."""
    with open(f"/proc/self/fdinfo/{relay.fileno()}") as f:
        fds = {int(line.split()[1]) for line in f if line.startswith("tfd:")}
    return {fd for fd in fds if not os.readlink(f"/proc/self/fd/{fd}").startswith("anon_inode")}


# -- bytes, both ways, byte-exact --


@pytest.mark.parametrize(
    "size", [0, 1, 65537, 3 << 20, 24 << 20], ids=["empty", "1", "64KiB+1", "3MiB", "24MiB"]
)
@pytest.mark.parametrize("bound", [64 << 10, 64 << 20], ids=["bound64K", "bound64M"])
def test_both_directions_byte_exact(new_relay: Any, sockets: Any, size: int, bound: int) -> None:
    relay = new_relay(bound=bound)
    client, down, up, upstream = sockets()
    request, response = payload(size, 1), payload(size, 2)
    pid = relay.add(down.fileno(), up.fileno())
    assert registered(relay) == {down.fileno(), up.fileno()}
    peers = [Peer(client, request), Peer(upstream, response)]
    finished = drive(relay, peers, all_done(peers))
    assert finished == [(pid, size, size, 0)]
    assert peers[0].got(response) and peers[1].got(request)
    assert registered(relay) == set() and len(relay) == 0
    assert relay.totals() == (size, size)
    if size <= bound // 2:
        assert relay.demoted == 0  # it all went through the kernel


class ChunkedPeer(Peer):
    """A Peer that sends in the given chunk sizes (cycled), one chunk per step."""

    def __init__(self, sock: socket.socket, data: bytes, chunks: list[int], **kw: Any) -> None:
        super().__init__(sock, b"", **kw)
        self.rest = memoryview(data)
        self.chunks = chunks
        self.i = 0
        self.final_shut, self.shut = self.shut, False  # only after the last chunk

    def step(self) -> None:
        if self.rest and not self.out:
            n = self.chunks[self.i % len(self.chunks)]
            self.i += 1
            self.out, self.rest = self.rest[:n], self.rest[n:]
        if not self.rest and self.final_shut:
            self.shut, self.final_shut = True, False
        super().step()

    def events(self) -> int:
        return super().events() | (select.POLLOUT if self.rest else 0)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    up_size=st.integers(0, 300_000),
    down_size=st.integers(0, 300_000),
    up_chunks=st.lists(st.integers(1, 70_000), min_size=1, max_size=5),
    down_chunks=st.lists(st.integers(1, 70_000), min_size=1, max_size=5),
    order=st.sampled_from(["both", "reply-after-eof", "client-keeps-open"]),
    bound=st.sampled_from([4096, 100_000, 4 << 20]),
    seed=st.integers(0, 2**32),
)
def test_property_byte_exact_any_chunking_and_half_close_order(
    new_relay: Any,
    sockets: Any,
    up_size: int,
    down_size: int,
    up_chunks: list[int],
    down_chunks: list[int],
    order: str,
    bound: int,
    seed: int,
) -> None:
    # The test_relay.py properties (random payloads, chunkings, half-close orders) through
    # the kernel; the small bounds demote directions mid-stream.
    relay = new_relay(bound=bound)
    client, down, up, upstream = sockets()
    request, response = payload(up_size, seed), payload(down_size, seed + 1)
    pid = relay.add(down.fileno(), up.fileno())
    if order == "reply-after-eof":
        c = ChunkedPeer(client, request, up_chunks)
        u = ChunkedPeer(upstream, b"", down_chunks, reply=response)
    elif order == "client-keeps-open":
        c = ChunkedPeer(client, request, up_chunks, shut=False)
        u = ChunkedPeer(upstream, response, down_chunks)
    else:
        c = ChunkedPeer(client, request, up_chunks)
        u = ChunkedPeer(upstream, response, down_chunks)
    peers = [c, u]
    if order == "client-keeps-open":
        drive(relay, peers, lambda _: c.eof and u.received == up_size)
        assert len(relay) == 1 and relay.stats(pid) == (up_size, down_size)
        client.shutdown(socket.SHUT_WR)
    finished = drive(relay, peers, all_done(peers))
    assert finished == [(pid, up_size, down_size, 0)]
    assert c.got(response) and u.got(request)
    assert registered(relay) == set()


def test_the_fin_does_not_overtake_bytes_queued_in_the_kernel(new_relay: Any, sockets: Any) -> None:
    # The sender shuts down right after 16 MiB: EOF shows while most bytes still sit in
    # the kernel's queue for the slow reader. The EOF must come after the last of them.
    relay = new_relay(bound=64 << 20)
    client, down, up, upstream = sockets()
    data = payload(16 << 20, 7)
    pid = relay.add(down.fileno(), up.fileno())
    writer, reader = Peer(client, data, reading=False), Peer(upstream, shut=False, reading=False)
    drive(relay, [writer, reader], lambda _: not writer.out)  # all sent, FIN sent
    assert not reader.eof
    reader.reading = True
    drive(relay, [writer, reader], lambda _: reader.eof)
    assert reader.got(data) and relay.demoted == 0
    upstream.shutdown(socket.SHUT_WR)
    writer.reading = True
    assert drive(relay, [writer, reader], all_done([writer])) == [(pid, len(data), 0, 0)]


def test_eof_is_passed_on_while_the_other_direction_keeps_going(relay: Any, sockets: Any) -> None:
    client, down, up, upstream = sockets()
    pid = relay.add(down.fileno(), up.fileno())
    peers = [Peer(client, b"req"), Peer(upstream, shut=False)]
    drive(relay, peers, lambda _: peers[1].eof)
    assert len(relay) == 1 and relay.stats(pid) == (3, 0)
    for want in (4, 8, 12):
        upstream.send(b"more")
        drive(relay, peers, lambda _: peers[0].received == want)  # noqa: B023
    upstream.shutdown(socket.SHUT_WR)
    assert drive(relay, peers, lambda f: bool(f)) == [(pid, 3, 12, 0)]


def test_data_and_eof_sent_before_add_are_relayed(relay: Any, sockets: Any) -> None:
    client, down, up, upstream = sockets()
    client.sendall(b"early")
    client.shutdown(socket.SHUT_WR)
    upstream.sendall(b"also early")
    time.sleep(0.05)
    pid = relay.add(down.fileno(), up.fileno())
    peers = [Peer(client), Peer(upstream, shut=False)]
    drive(relay, peers, lambda _: peers[1].eof)
    upstream.shutdown(socket.SHUT_WR)
    assert drive(relay, peers, all_done(peers)) == [(pid, 5, 10, 0)]
    assert peers[0].got(b"also early") and peers[1].got(b"early")


# -- resets --


@pytest.mark.parametrize("side", ["client", "upstream"])
@pytest.mark.parametrize("after_eof", [False, True], ids=["open", "after-eof"])
def test_reset_finishes_the_pair_with_its_errno(
    relay: Any, sockets: Any, side: str, after_eof: bool
) -> None:
    client, down, up, upstream = sockets()
    pid = relay.add(down.fileno(), up.fileno())
    gone, other = (client, upstream) if side == "client" else (upstream, client)
    peers = [Peer(gone, b"hello", shut=after_eof), Peer(other, b"world", shut=False)]
    drive(relay, peers, lambda _: peers[0].received == 5 and peers[1].received == 5)
    if after_eof:
        drive(relay, peers, lambda _: peers[1].eof)
        time.sleep(0.05)
    assert len(relay) == 1
    reset(gone)
    (finished,) = drive(relay, peers[1:], lambda f: bool(f))
    assert finished[:3] == (pid, 5, 5) and finished[3] in RESET
    assert registered(relay) == set() and len(relay) == 0


@pytest.mark.parametrize("size", [10, 1 << 20], ids=["10B", "1MiB"])
def test_bytes_sent_before_a_reset_are_relayed_first(relay: Any, sockets: Any, size: int) -> None:
    client, down, up, upstream = sockets()
    pid = relay.add(down.fileno(), up.fileno())
    words = payload(size, 3)
    upstream.sendall(words)
    reset(upstream)
    peer = Peer(client, shut=False)
    (finished,) = drive(relay, [peer], lambda f: bool(f) and peer.received == size)
    assert finished == (pid, 0, size, errno.ECONNRESET)
    assert peer.hash.digest() == hashlib.sha256(words).digest()


# -- bounded memory with a stalled reader --


class CyclicWriter(Peer):
    """Offers `total` bytes (a 1 MiB block repeated) without holding them in memory."""

    BLOCK = payload(1 << 20, 11)

    def __init__(self, sock: socket.socket, total: int) -> None:
        super().__init__(sock, b"", shut=False, reading=False)
        self.total = total
        self.sent_hash = hashlib.sha256()

    def step(self) -> None:
        while self.sent < self.total:
            at = self.sent % len(self.BLOCK)
            chunk = memoryview(self.BLOCK)[at:]
            try:
                n = self.sock.send(chunk)
            except BlockingIOError:
                return
            self.sent_hash.update(chunk[:n])
            self.sent += n

    def events(self) -> int:
        return select.POLLOUT if self.sent < self.total else 0


def test_a_stalled_reader_with_1gib_offered_keeps_kernel_memory_bounded(
    new_relay: Any, sockets: Any
) -> None:
    bound = 4 << 20
    relay = new_relay(bound=bound)
    client, down, up, upstream = sockets()
    pid = relay.add(down.fileno(), up.fileno())
    writer, reader = CyclicWriter(client, 1 << 30), Peer(upstream, shut=False, reading=False)
    # TCP autotuning may still grow buffers for a moment: wait (bounded) until a whole
    # 0.3 s window moves nothing.
    drive_for(relay, [writer, reader], 0.3)
    for _ in range(10):
        before = writer.sent
        drive_for(relay, [writer, reader], 0.3)
        if writer.sent == before:
            break
    assert writer.sent == before, "the writer should be blocked"
    buffers = sum(
        s.getsockopt(socket.SOL_SOCKET, opt)
        for s in (client, down, up, upstream)
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF)
    )
    # Without the bound the kernel takes everything offered (the probe saw 200 MiB in
    # 0.1 s). With it: one bound in the psock queue, plus socket buffers, plus one read.
    assert writer.sent <= bound + buffers + 65536, (writer.sent, bound, buffers)
    assert relay.demoted == 1 and relay.stats(pid)[0] <= writer.sent
    reader.reading = True
    drive(relay, [writer, reader], lambda _: reader.received == writer.sent, timeout=60)
    assert reader.hash.digest() == writer.sent_hash.digest()
    assert relay.stats(pid) == (writer.sent, 0)


# -- the engine stays asleep in kernel mode --


def test_request_response_in_the_kernel_does_not_wake_the_engine(relay: Any, sockets: Any) -> None:
    client, down, up, upstream = sockets()
    pid = relay.add(down.fileno(), up.fileno())
    assert relay.run() == []
    for i in range(200):
        msg = b"request %d" % i
        client.sendall(msg)
        assert upstream.recv(100) == msg
        upstream.sendall(msg.upper())
        assert client.recv(100) == msg.upper()
    assert select.select([relay.fileno()], [], [], 0)[0] == []  # no wake-up at all
    n = sum(len(b"request %d" % i) for i in range(200))
    assert relay.stats(pid) == (n, n) and relay.demoted == 0


# -- remove(), fds, ids --


def outq(sock: socket.socket) -> int:
    return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), SIOCOUTQ, b"\0" * 4))[0])


@pytest.mark.parametrize("bound", [64 << 10, 64 << 20], ids=["demoted", "kernel"])
def test_remove_mid_stream_loses_and_duplicates_nothing(
    new_relay: Any, sockets: Any, bound: int
) -> None:
    relay = new_relay(bound=bound)
    client, down, up, upstream = sockets()
    data, back = payload(12 << 20, 5), payload(100_000, 6)
    pid = relay.add(down.fileno(), up.fileno())
    writer, reader = Peer(client, data), Peer(upstream, back, shut=False)
    drive(relay, [writer, reader], lambda _: reader.received > 1 << 20)
    if bound < len(data):
        # A demoted direction hands back race-free only once its sender has paused (see
        # remove(): bytes arriving during the hand-over make it ENOTRECOVERABLE on 6.18).
        held, writer.out, writer.shut = writer.out, memoryview(b""), False
        drive(relay, [writer, reader], lambda _: outq(client) == 0)
        writer.out, writer.shut = held, True
    # remove() waits for the bytes queued in the kernel to reach the reader's socket: the
    # reader (another process, in real life) keeps reading meanwhile.
    stop = threading.Event()

    def read_on() -> None:
        while not stop.is_set():
            reader.step()
            select.select([upstream], [], [], 0.01)

    thread = threading.Thread(target=read_on)
    thread.start()
    try:
        finished = relay.remove(pid)
    finally:
        stop.set()
        thread.join()
    assert finished[0] == pid and finished[3] == 0
    assert registered(relay) == set() and len(relay) == 0
    with pytest.raises(KeyError):
        relay.stats(pid)
    with pytest.raises(KeyError):
        relay.remove(pid)
    # The owner takes over (here: the pure user-space engine) from exactly where it left.
    engine = _relay_py.Engine()
    try:
        pid2 = engine.add(down.fileno(), up.fileno())
        drive(engine, [writer, reader], lambda _: reader.eof and writer.received == len(back))
        upstream.shutdown(socket.SHUT_WR)
        (done,) = drive(engine, [writer, reader], lambda f: bool(f))
    finally:
        engine.close()
    assert reader.got(data) and writer.hash.digest() == hashlib.sha256(back).digest()
    assert finished[1] + done[1] == len(data) and finished[2] + done[2] == len(back)
    assert done[0] == pid2 and relay.totals() == finished[1:3]


def test_fds_are_borrowed_and_close_releases_everything(sockets: Any, no_fd_leak: None) -> None:
    sock = sockets()
    client, down, up, upstream = sock
    relay = sockmap.KernelRelay()
    pid = relay.add(down.fileno(), up.fileno())
    relay.remove(pid)
    pid = relay.add(down.fileno(), up.fileno())
    drive(relay, [Peer(client), Peer(upstream)], lambda f: bool(f))
    relay.add(down.fileno(), up.fileno())
    relay.close()
    relay.close()  # idempotent
    for s in sock:
        os.fstat(s.fileno())  # still open: only the owner closes them
    with pytest.raises(ValueError):
        relay.fileno()


def test_bad_adds_leave_nothing_behind(relay: Any, sockets: Any) -> None:
    client, down, up, upstream = sockets()
    pid = relay.add(down.fileno(), up.fileno())
    with pytest.raises(FileExistsError):
        relay.add(down.fileno(), up.fileno())
    a, b = socket.socketpair()  # not TCP: the relay takes TCP sockets only
    with a, b:
        with pytest.raises(OSError):
            relay.add(a.fileno(), b.fileno())
    assert registered(relay) == {down.fileno(), up.fileno()} and len(relay) == 1
    peers = [Peer(client, b"still fine"), Peer(upstream, b"yes")]
    assert drive(relay, peers, all_done(peers)) == [(pid, 10, 3, 0)]


@pytest.mark.parametrize("bad", [0, -1, 12345678, "x", None])
def test_unknown_pair_ids_raise_key_error(relay: Any, bad: Any) -> None:
    with pytest.raises(KeyError):
        relay.stats(bad)
    with pytest.raises(KeyError):
        relay.remove(bad)
