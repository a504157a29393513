"""Pure-Python relay engine: the same edge-triggered epoll logic as _relay.pyx, with os calls.

Implements engine.RelayEngine and engine.LoopEpoll. Native accept (engine.NativeAcceptEngine)
needs a
thread that relays without the GIL, so only the Cython twin has it.
"""

# Strategy: see _relay.pyx and docs/engine.md; the splice(2) path is left to the Cython twin.
# Differences forced by Python: epoll reports fds (not a 64-bit key), so a dict maps
# fd -> (pair, side); EAGAIN arrives as BlockingIOError; os.write cannot pass MSG_NOSIGNAL,
# which is safe because CPython ignores SIGPIPE at start-up: a dead peer is an EPIPE.

from __future__ import annotations

import errno
import os
import select
import socket
from collections.abc import Callable, Sequence

from .engine import BUFSIZE, Finished, Handed

MAX_EVENTS = 256
VISIT_BUFS = 16  # per direction per visit: fairness between busy pairs
RUN_BUFS = 64  # per run() call: the asyncio loop gets its thread back quickly
WAIT, MORE = 0, 1

_IN = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_HANGUP = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_OUT = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR
_FLAGS = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET


class _Dir:
    """One direction of a pair: src -> dst, and the bytes dst has refused so far."""

    __slots__ = ("src", "dst", "buf", "moved", "ready", "drain", "eof", "done")

    def __init__(self, src: int, dst: int) -> None:
        self.src = src
        self.dst = dst
        self.buf = b""  # bytes dst refused; empty in the idle case
        self.moved = 0  # bytes handed to dst
        self.ready = False  # progress this direction on the next visit
        self.drain = False  # src reported RDHUP/HUP/ERR: a short read no longer proves it empty
        self.eof = False  # src said EOF; pass it on once buf is flushed
        self.done = False  # EOF passed on: dst shut down for writing


class _Pair:
    __slots__ = ("id", "dirs", "errcheck", "first", "tag")

    def __init__(self, pair_id: int, client_fd: int, upstream_fd: int, tag: int) -> None:
        self.id = pair_id
        self.tag = tag  # the caller's, handed back by detach()
        # [0] client -> upstream, [1] upstream -> client; index = side of the src fd.
        self.dirs = (_Dir(client_fd, upstream_fd), _Dir(upstream_fd, client_fd))
        self.errcheck = [False, False]  # per side: EPOLLERR seen on that side's fd
        self.first = 0  # the side that said EOF first: 1 client, 2 upstream (0: none yet)

    def ended(self) -> int:
        """Which side ended the pair first: an EOF, else the side that reported an error."""
        if self.first:
            return self.first
        return 1 if self.errcheck[0] else (2 if self.errcheck[1] else 0)


class Engine:
    """Relay bytes between borrowed pairs of non-blocking sockets, both ways, on one epoll fd."""

    def __init__(self, bufsize: int = BUFSIZE, threaded: bool | None = None) -> None:
        # `threaded` is accepted for parity with the Cython twin and ignored: a Python relay
        # thread would need the GIL for every event, so this engine is always loop-driven.
        if not 1 <= bufsize <= 1 << 30:
            raise ValueError(f"bufsize out of range: {bufsize}")
        self._bufsize = bufsize
        self._scratch = bytearray(bufsize)
        self._view = memoryview(self._scratch)
        self._epoll: select.epoll | None = select.epoll()
        self._pairs: dict[int, _Pair] = {}
        self._fds: dict[int, tuple[_Pair, int]] = {}
        self._ready: dict[int, _Pair] = {}  # insertion-ordered: a FIFO with O(1) removal
        self._finished: list[Finished] = []
        self._next_id = 1
        self._total = [0, 0]
        self._budget = 0
        self._attached = False  # registered in the asyncio loop's own epoll (attach)

    def fileno(self) -> int:
        """The engine's epoll fd: register it with loop.add_reader."""
        return self._open().fileno()

    def add(self, client_fd: int, upstream_fd: int, tag: int = -1) -> int:
        """Start relaying between two connected non-blocking sockets; return the pair id.

        tag is for the Cython twin's live counts (native accept); only kept here, for detach().
        """
        ep = self._open()
        pair = _Pair(self._next_id, client_fd, upstream_fd, tag)
        # Registered once: ET means no epoll_ctl per event; an fd that is already readable
        # reports at the next poll, so bytes sent before add() are not lost.
        ep.register(client_fd, _FLAGS)
        try:
            ep.register(upstream_fd, _FLAGS)
        except BaseException:
            ep.unregister(client_fd)
            raise
        self._next_id += 1
        self._pairs[pair.id] = pair
        self._fds[client_fd] = (pair, 0)
        self._fds[upstream_fd] = (pair, 1)
        return pair.id

    def run(self) -> list[Finished]:
        """Handle ready events without blocking; return the pairs that finished."""
        ep = self._open()
        return self.dispatch([] if self._attached else ep.poll(0, MAX_EVENTS))

    # -- engine.LoopEpoll: this twin can live in the asyncio loop's own epoll set --

    def attach(self, epoll: object) -> None:
        """Register relayed fds in `epoll` (the asyncio loop's, see relay.RelaySelector)
        instead of an epoll of our own; its owner passes our events to dispatch(). Saves an
        epoll_wait and a loop callback per wake-up. Before any add()."""
        if not isinstance(epoll, select.epoll):
            raise TypeError(f"attach() needs a select.epoll, not {type(epoll).__name__}")
        own = self._open()
        if self._pairs:
            raise RuntimeError("attach() after add()")
        own.close()
        self._epoll = epoll
        self._attached = True

    def dispatch(self, events: Sequence[tuple[int, int]]) -> list[Finished]:
        """Continue left-over pairs (within the budget), then handle these epoll events."""
        self._budget = RUN_BUFS * self._bufsize
        for _ in range(len(self._ready)):
            if self._budget <= 0:
                break
            self._visit(self._ready.pop(next(iter(self._ready))))
        for fd, events_ in events:
            entry = self._fds.get(fd)
            if entry is None:
                continue  # finished earlier in this batch
            pair, side = entry
            self._mark(pair, side, events_)
            if pair.id in self._ready:
                pass  # already has work waiting its turn: one budget per pair per run
            elif self._budget > 0:
                self._visit(pair)
            else:
                self._ready[pair.id] = pair
        finished, self._finished = self._finished, []
        return finished

    @property
    def pending(self) -> bool:
        """True if run() stopped early for fairness: call run() again soon."""
        return bool(self._ready)

    def remove(self, pair_id: int) -> Finished:
        """Stop relaying a pair now; its fds are unregistered when this returns."""
        pair = self._pairs[pair_id]
        self._detach(pair)
        return Finished(pair.id, pair.dirs[0].moved, pair.dirs[1].moved, 0)

    def detach(self, limit: int) -> list[Handed]:
        """Take up to `limit` live pairs out, open, with their state (engine.RelayEngine.detach)."""
        if limit < 0:
            raise ValueError(f"limit out of range: {limit}")
        self._open()
        handed: list[Handed] = []
        for pair in list(self._pairs.values())[:limit]:
            up, down = pair.dirs
            handed.append(
                Handed(
                    pair_id=pair.id,
                    client_fd=up.src,
                    upstream_fd=up.dst,
                    tag=pair.tag,
                    c2u=up.moved,
                    u2c=down.moved,
                    client_eof=up.eof,
                    upstream_eof=down.eof,
                    to_upstream=up.buf,
                    to_client=down.buf,
                )
            )
            self._detach(pair)
        return handed

    def adopt(self, h: Handed) -> int:
        """Relay a handed pair from where it stopped (engine.RelayEngine.adopt); its new id."""
        if h.client_fd < 0 or h.upstream_fd < 0:
            raise ValueError("adopt() needs both fds (dial the client first)")
        if h.c2u < 0 or h.u2c < 0:
            raise ValueError("adopt(): negative byte counts")
        pair_id = self.add(h.client_fd, h.upstream_fd, h.tag)
        pair = self._pairs[pair_id]
        up, down = pair.dirs
        up.moved, up.eof, up.buf = h.c2u, bool(h.client_eof), bytes(h.to_upstream)
        down.moved, down.eof, down.buf = h.u2c, bool(h.upstream_eof), bytes(h.to_client)
        for d in pair.dirs:
            # Carried bytes and an EOF to pass on may get no event: run() does them first.
            d.ready = bool(d.buf) or d.eof
        if pair.dirs[0].ready or pair.dirs[1].ready:
            self._ready[pair_id] = pair
        return pair_id

    def stats(self, pair_id: int) -> tuple[int, int]:
        """(bytes client->upstream, bytes upstream->client) relayed so far for one pair."""
        pair = self._pairs[pair_id]
        return (pair.dirs[0].moved, pair.dirs[1].moved)

    def totals(self) -> tuple[int, int]:
        """The same two counts summed over every pair this engine ever relayed."""
        return (self._total[0], self._total[1])

    def __len__(self) -> int:
        return len(self._pairs)

    def close(self) -> None:
        """Close the epoll fd (idempotent); relayed fds stay open, they belong to the caller."""
        if self._epoll is None:
            return
        if self._attached:  # the epoll is the loop's: only take our fds out of it
            for fd in self._fds:
                try:
                    self._epoll.unregister(fd)
                except OSError:
                    pass
        else:
            self._epoll.close()
        self._epoll = None
        self._pairs.clear()
        self._fds.clear()
        self._ready.clear()
        self._finished.clear()

    # -- helpers --

    def _open(self) -> select.epoll:
        if self._epoll is None:
            raise ValueError("I/O operation on closed engine")
        return self._epoll

    def _mark(self, pair: _Pair, side: int, events: int) -> None:
        """Turn one event into work: what this fd's readiness lets each direction do."""
        din, dout = pair.dirs[side], pair.dirs[1 - side]
        if events & _IN:
            din.ready = True
            if events & _HANGUP:
                din.drain = True
        if events & _OUT and dout.buf:
            dout.ready = True
        if events & select.EPOLLERR:
            pair.errcheck[side] = True

    def _visit(self, pair: _Pair) -> None:
        for i, d in enumerate(pair.dirs):
            if d.ready:
                try:
                    d.ready = self._pump(d, i) == MORE
                except OSError as e:
                    self._finish(pair, e.errno or errno.EIO)
                    return
        for side in (0, 1):
            # A reset on a socket we no longer read from (it already sent EOF) would only
            # show at our next send, which may never come; SO_ERROR shows it now. An error
            # seen before that EOF was read stays pending until it is: a reset after FIN
            # leaves the bytes and the EOF readable, and EPOLLERR does not come again.
            if pair.errcheck[side] and pair.dirs[side].eof:
                pair.errcheck[side] = False
                so_error = _sockcall(pair.dirs[side].src, _so_error)
                if so_error:
                    self._finish(pair, so_error)
                    return
        if not pair.first:
            pair.first = 1 if pair.dirs[0].eof else (2 if pair.dirs[1].eof else 0)
        if pair.dirs[0].done and pair.dirs[1].done:
            self._finish(pair, 0)
        elif pair.dirs[0].ready or pair.dirs[1].ready:
            self._ready[pair.id] = pair

    def _pump(self, d: _Dir, i: int) -> int:
        """Move bytes one way until dst is full or src is empty: WAIT or MORE; OSError else."""
        bufsize, view, moved = self._bufsize, self._view, 0
        while not d.done:
            if d.buf:  # dst refused these before: flush them first
                try:
                    m = os.write(d.dst, d.buf)
                except BlockingIOError:
                    return WAIT  # dst is full; its EPOLLOUT edge brings us back
                d.moved += m
                self._total[i] += m
                d.buf = d.buf[m:]
                # A partial send loops once more: the EAGAIN it meets arms the edge for sure.
            elif d.eof:
                # Pass the half-close on (etcd's gateway closes both sockets at the first
                # EOF and drops the reply). ENOTCONN: dst is already gone, nothing to tell.
                try:
                    _sockcall(d.dst, _shut_wr)
                except OSError as e:
                    if e.errno != errno.ENOTCONN:
                        raise
                d.done = True
            elif moved >= VISIT_BUFS * bufsize:
                return MORE
            else:
                try:
                    n = os.readv(d.src, (view,))
                except BlockingIOError:
                    return WAIT
                if n == 0:
                    d.eof = True
                    continue
                moved += n
                self._budget -= n
                try:
                    m = os.write(d.dst, view[:n])
                except BlockingIOError:
                    m = 0
                d.moved += m
                self._total[i] += m
                if m < n:
                    d.buf = bytes(view[m:n])
                    if m == 0:
                        return WAIT  # EAGAIN: the EPOLLOUT edge is armed
                elif n < bufsize and not d.drain:
                    # A short read emptied src: new data raises a new edge. Only a FIN that
                    # came before this read would not, and its event carried RDHUP (drain).
                    return WAIT
        return WAIT

    def _finish(self, pair: _Pair, err: int) -> None:
        self._detach(pair)
        self._finished.append(
            Finished(pair.id, pair.dirs[0].moved, pair.dirs[1].moved, err, pair.ended())
        )

    def _detach(self, pair: _Pair) -> None:
        """Unregister both fds and drop the buffers, so the owner may close the fds."""
        del self._pairs[pair.id]
        self._ready.pop(pair.id, None)
        for d in pair.dirs:
            del self._fds[d.src]
            d.buf = b""
            if self._epoll is not None:
                try:
                    self._epoll.unregister(d.src)
                except OSError:
                    pass  # the owner closed it early; the kernel already dropped it


def _shut_wr(s: socket.socket) -> int:
    s.shutdown(socket.SHUT_WR)
    return 0


def _so_error(s: socket.socket) -> int:
    return s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)


def _sockcall(fd: int, call: Callable[[socket.socket], int]) -> int:
    """Run a socket method on a borrowed fd: the temporary socket object never owns it.

    Family, type and protocol are given, not detected: detection costs two getsockopt()
    calls, and shutdown() and SO_ERROR mean the same for every stream socket (TCP, unix).
    """
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fileno=fd)
    try:
        return call(s)
    finally:
        s.detach()
