"""The relay engine contract: what both twins (`_relay.pyx`, `_relay_py.py`) implement.

Declared once here, as aio-libs' multidict declares its surface in `_abc.py`; `relay.py`
chooses the twin and drives it. Three capabilities:

* `RelayEngine`, every twin: relay borrowed pairs of connected non-blocking sockets, both
  ways, and report the pairs that finished.
* `LoopEpoll`, the pure twin: register its fds in the asyncio loop's own epoll set and take
  their events from the loop's `epoll_wait` (`relay.RelaySelector`), instead of an epoll fd
  of its own (one system call and no loop callback per wake-up).
* `NativeAcceptEngine`, the Cython twin in threaded mode: its relay thread accepts clients,
  picks a target and connects them itself, without Python (docs/architecture.md; the
  acceptor that drives it is accept.NativeAccept).

The records the engines exchange with Python are named tuples, so a reader sees field names
and the compiled twin builds them as cheaply as plain tuples.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import NamedTuple, Protocol, runtime_checkable

__all__ = [
    "BUFSIZE",
    "Failed",
    "Finished",
    "Handed",
    "LoopEpoll",
    "NativeAcceptEngine",
    "Paused",
    "RelayEngine",
    "RelaySettings",
    "Report",
    "ShortSum",
    "Started",
    "Target",
]


BUFSIZE = 32768
"""The engines' read (and splice) size, the gateway's default (Config.buffer_size) and every
engine signature's. 32 KiB, not 64: over loopback (the client side of a local gateway) TCP
builds segments of up to 65,482 bytes (2 x its 32,741-byte MSS), so each 64 KiB write also
sent a 54-byte one: 1.2x the segments per GB (nstat) and 1.25-1.6x the CPU per GB relayed,
both engines (bench/RESULTS.md, "buffer size")."""


class Finished(NamedTuple):
    """A pair the engine stopped relaying (its fds are unregistered)."""

    pair_id: int
    c2u: int  # bytes client -> upstream
    u2c: int  # bytes upstream -> client
    err: int  # errno that ended it, 0 for a clean end (both EOFs passed on)
    ended: int = 0  # the side that ended first: 1 client, 2 upstream, 0 unknown (removed)


class Handed(NamedTuple):
    """A live pair taken out of an engine (detach); its fds are the caller's now, open.

    What another engine (of either twin, in this process or the next) needs to continue the
    pair exactly where this one stopped (adopt): no byte lost or sent twice, and the
    half-closes kept.
    """

    pair_id: int  # its id in the engine it left
    client_fd: int
    upstream_fd: int  # -1: native accept had not finished the dial (the half-made upstream
    # socket is closed); the client is to be dialled again (it sent nothing we consumed)
    tag: int  # the target the upstream is connected to (Target.tag), or -1
    c2u: int  # bytes relayed so far client -> upstream
    u2c: int  # bytes relayed so far upstream -> client
    client_eof: bool  # the client's EOF was read: SHUT_WR passes on to the upstream once
    # to_upstream is written (it may already have been; shutting again is harmless)
    upstream_eof: bool  # the same, upstream -> client
    to_upstream: bytes  # read from the client, not written to the upstream yet
    to_client: bytes  # read from the upstream, not written to the client yet (with splice,
    # what sat in the pipe: drained into this)


class Target(NamedTuple):
    """Where native accept may connect a client, in the balancer's order (set_targets)."""

    tag: int  # the caller's name for it (balancer.Remote.tag)
    family: int  # AF_INET or AF_INET6
    ip: str | None  # None: a host name with no address yet; the caller dials it
    port: int
    priority: int  # SRV priority (0 for --endpoints)
    weight: int  # SRV weight (0 for --endpoints)
    usable: bool  # active, healthy and not removed (balancer.Remote.usable)


SockOpt = tuple[int, int, int]  # (level, option, value) for setsockopt


class RelaySettings(NamedTuple):
    """How native accept connects clients (set_targets), in one record.

    Built in one place, accept.NativeAccept.sync(), from the configuration; a new setting is
    a field here, a line there and its use in _relay.pyx.
    """

    sockopts: tuple[SockOpt, ...] = ()  # on every upstream socket (and on clients that do
    # not inherit them from their listener)
    dial_timeout: float = 5.0  # seconds a connect may take before it fails with ETIMEDOUT
    limit: int = 0  # --max-connections: live plus connecting pairs (0: none)
    late_sockopts: tuple[SockOpt, ...] = ()  # on the upstream socket of a pair still live
    # late_after seconds after its connect (keep-alive: cannot matter sooner)
    late_after: float = 1.0
    least: bool = False  # --balance=least-connections


class Started(NamedTuple):
    """A client the engine accepted and connected itself; relayed now."""

    pair_id: int
    tag: int


class Failed(NamedTuple):
    """An accepted client the engine could not connect; the caller owns client_fd now.

    tag -1: no usable target (err 0) or no socket for the dial (err set). err 0 with a tag:
    the target has no address, dial it yourself. Else that target's connect failed
    (ETIMEDOUT: --dial-timeout).
    """

    client_fd: int
    tag: int
    err: int


class Paused(NamedTuple):
    """A listener whose accept failed for lack of a resource; listen() again to resume."""

    listen_fd: int
    err: int


class ShortSum(NamedTuple):
    """Pairs of one target that started and finished between two collect() calls."""

    tag: int
    pairs: int
    c2u: int
    u2c: int
    resets: int  # pairs that ended with an errno
    silent: int  # pairs whose client sent bytes and the upstream none (least-connections)


class Report(NamedTuple):
    """Everything the relay thread has to tell the loop since the last collect()."""

    started: list[Started]
    finished: list[Finished]
    failed: list[Failed]
    paused: list[Paused]
    accepted: int
    accept_errors: int
    short: list[ShortSum]


@runtime_checkable
class RelayEngine(Protocol):
    """Relay bytes between borrowed pairs of sockets; the caller owns (and closes) the fds."""

    def __init__(self, bufsize: int = BUFSIZE, threaded: bool | None = None) -> None: ...

    def fileno(self) -> int:
        """For loop.add_reader: readable when run() has something to do or report."""
        ...

    def add(self, client_fd: int, upstream_fd: int, tag: int = -1) -> int:
        """Start relaying two connected non-blocking sockets; return the pair id.

        tag: the Target the upstream is connected to, for a NativeAcceptEngine's live
        counts (least-connections); others ignore it.
        """
        ...

    def run(self) -> list[Finished]:
        """Handle what is ready without blocking; return the pairs that finished."""
        ...

    @property
    def pending(self) -> bool:
        """run() stopped early for fairness: call it again soon (edge-triggered epoll)."""
        ...

    def remove(self, pair_id: int) -> Finished:
        """Stop relaying a pair now; its fds are unregistered when this returns."""
        ...

    def stats(self, pair_id: int) -> tuple[int, int]:
        """(c2u, u2c) bytes so far for one pair (also one finished but not reported yet)."""
        ...

    def totals(self) -> tuple[int, int]:
        """The same counts summed over every pair this engine ever relayed."""
        ...

    def __len__(self) -> int: ...

    def detach(self, limit: int) -> list[Handed]:
        """Take up to `limit` live pairs out of the engine, open, with their state.

        Their fds leave the engine's epoll set and are neither closed nor shut down: they
        are the caller's from now on (also those of pairs native accept made). No later
        run()/collect() mentions a handed pair. Pairs that finished already are not handed,
        they are reported as usual.
        """
        ...

    def adopt(self, h: Handed) -> int:
        """Relay a pair another engine handed out, as add() would (the caller owns the fds);
        return its new pair id.

        The carried bytes are written first, then the EOFs h says were read are passed on
        (SHUT_WR), then the pair is relayed as usual; its byte counts continue from h's.
        ValueError for an upstream_fd of -1 (dial first, then adopt with the new fd).
        """
        ...

    def close(self) -> None:
        """Stop and close the engine's own fds (idempotent); relayed fds stay open."""
        ...


@runtime_checkable
class LoopEpoll(Protocol):
    """An engine that can live in the asyncio loop's own epoll set (relay.RelaySelector)."""

    def attach(self, epoll: object) -> None:
        """Register pairs in this `select.epoll` from now on (before the first add())."""
        ...

    def dispatch(self, events: Sequence[tuple[int, int]]) -> list[Finished]:
        """Handle (fd, events) that the loop's epoll_wait returned for the engine's fds."""
        ...


@runtime_checkable
class NativeAcceptEngine(Protocol):
    """An engine whose relay thread accepts and connects clients itself (Cython, threaded)."""

    @property
    def native(self) -> bool:
        """Whether this instance can (the threaded mode of the Cython twin)."""
        ...

    def listen(self, listen_fd: int, tcp: bool = True) -> None: ...

    def unlisten(self, listen_fd: int) -> None: ...

    def set_targets(self, targets: Sequence[Target], settings: RelaySettings) -> None:
        """Where clients go (targets, in the balancer's order) and how (settings)."""
        ...

    def pick(self, exclude: Collection[int] = ()) -> int:
        """The tag of the target for the next client by the engine's own counter, or -1;
        the tags in exclude count as unusable for this pick."""
        ...

    def collect(self, aggregate: bool = False) -> Report: ...

    def release(self) -> None:
        """A client handed back in collect()'s failed list was relayed (after add()) or
        closed: it stops counting against --max-connections."""
        ...

    def native_pending(self) -> int:
        """Clients accepted that collect() has not reported, connecting or not."""
        ...
