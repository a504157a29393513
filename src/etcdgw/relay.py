"""Relay facade: picks the Cython or pure-Python engine once, and drives it from asyncio."""

from __future__ import annotations

import asyncio
import math
import os
import select
import selectors
import sys
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING

from . import engine as contract
from .engine import BUFSIZE, Finished, Handed, RelaySettings, Report, Target

__all__ = [
    "IMPLEMENTATION",
    "NO_EXTENSIONS",
    "Engine",
    "Finished",
    "Handed",
    "Relay",
    "RelayEventLoop",
    "RelaySelector",
    "Report",
    "Target",
    "new_event_loop",
]

# Any non-empty value disables the compiled engine (the aio-libs *_NO_EXTENSIONS rule);
# other interpreters than CPython always use the pure twin.
NO_EXTENSIONS = bool(os.environ.get("ETCDGW_NO_EXTENSIONS")) or sys.implementation.name != "cpython"

# isort: off
if TYPE_CHECKING or NO_EXTENSIONS:
    from ._relay_py import Engine

    IMPLEMENTATION = "python"
else:
    try:
        from ._relay import Engine

        IMPLEMENTATION = "cython"
    except ModuleNotFoundError:  # not built: fall back; a broken build still fails loudly
        from ._relay_py import Engine

        IMPLEMENTATION = "python"
# isort: on

NativeCallback = Callable[[Report], None]
"""on_native(report): what the relay thread did since the last wake-up (NativeAccept.collect)."""


class RelaySelector(selectors.EpollSelector):
    """The asyncio loop's selector, whose epoll set may also hold a pure-Python engine's fds.

    A pure engine normally has an epoll fd of its own, registered with the loop: each
    wake-up then costs the loop's epoll_wait, a loop callback and the engine's own
    epoll_wait. Attached to this selector (Relay does it when the loop has one), the engine
    registers its fds in the loop's epoll set directly, and every event of an fd the
    selector does not know goes to `hook` during select(): one epoll_wait per wake-up.
    (The Cython engine relays in its own thread and does not use this.)
    """

    hook: Callable[[list[tuple[int, int]]], None] | None = None
    EXTRA_EVENTS = 256  # room in each poll for the hook's events

    # select() below is EpollSelector.select() plus the hook; like it, it reads the two
    # fields EpollSelector keeps (CPython 3.11-3.14: `_selector`, `_fd_to_key`). Only this
    # class touches them.

    @property
    def epoll(self) -> select.epoll:
        """The select.epoll object behind this selector (where an engine may attach)."""
        ep: select.epoll = self._selector  # type: ignore[attr-defined]
        return ep

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        hook = self.hook
        if hook is None:
            return super().select(timeout)
        # As EpollSelector.select, plus the events of fds registered behind our back.
        if timeout is None:
            t = -1.0
        elif timeout <= 0:
            t = 0.0
        else:
            t = math.ceil(timeout * 1e3) * 1e-3
        fd_to_key: dict[int, selectors.SelectorKey] = self._fd_to_key  # type: ignore[attr-defined]
        max_ev = len(fd_to_key) + self.EXTRA_EVENTS
        ready: list[tuple[selectors.SelectorKey, int]] = []
        try:
            fd_event_list = self._selector.poll(t, max_ev)  # type: ignore[attr-defined]
        except InterruptedError:
            return ready
        extra: list[tuple[int, int]] = []
        for fd, event in fd_event_list:
            key = fd_to_key.get(fd)
            if key is None:
                extra.append((fd, event))
                continue
            events = 0
            if event & ~select.EPOLLIN:
                events |= selectors.EVENT_WRITE
            if event & ~select.EPOLLOUT:
                events |= selectors.EVENT_READ
            ready.append((key, events & key.events))
        if extra:
            hook(extra)
        return ready


class RelayEventLoop(asyncio.SelectorEventLoop):
    """The asyncio loop etcdgw serves on: a selector loop whose selector is a RelaySelector,
    kept as a public attribute so `Relay` need not reach into asyncio's private fields."""

    def __init__(self) -> None:
        self.relay_selector = RelaySelector()
        super().__init__(self.relay_selector)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """An asyncio loop with a RelaySelector (what etcdgw serves on)."""
    return RelayEventLoop()


class Relay:
    """Ties one Engine to an asyncio loop: one loop callback per batch of ready events.

    Args:
        loop: the running loop; its thread is the only one that may touch the engine.
        on_finished: called as on_finished(pair_id, c2u, u2c, errno) for each pair the
            engine finished by itself; the caller then closes both sockets. Not called for
            pairs taken back with remove(), which returns the same tuple instead.
        engine_cls: the engine to drive (either twin); the facade's choice by default.
        bufsize: the engine's read size and the unit of its fairness budgets.
        on_native: to use native accept (listen(), set_targets()) when the engine can
            (engine.NativeAcceptEngine, threaded): called with each engine.Report, before the
            finished pairs of the same wake-up are reported; `aggregate` (default True)
            asks collect() to sum short-lived pairs.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        on_finished: Callable[[int, int, int, int, int], None],
        *,
        engine_cls: type[Engine] = Engine,
        bufsize: int = BUFSIZE,
        on_native: NativeCallback | None = None,
    ) -> None:
        self._loop = loop
        self._on_finished = on_finished
        eng = engine_cls(bufsize)
        self._engine = eng
        # The capabilities are declared (engine.py), and decided here once.
        self._native_engine: contract.NativeAcceptEngine | None = (
            eng
            if on_native is not None and isinstance(eng, contract.NativeAcceptEngine) and eng.native
            else None
        )
        self._on_native = on_native if self._native_engine is not None else None
        self._again: asyncio.Handle | None = None
        self.aggregate = True
        self._selector: RelaySelector | None = None
        self._loop_epoll: contract.LoopEpoll | None = None
        self._fd = eng.fileno()
        sel = loop.relay_selector if isinstance(loop, RelayEventLoop) else None
        if sel is not None and sel.hook is None and isinstance(eng, contract.LoopEpoll):
            eng.attach(sel.epoll)
            sel.hook = self._on_events
            self._selector = sel
            self._loop_epoll = eng
        else:
            loop.add_reader(self._fd, self._on_ready)

    @property
    def native(self) -> bool:
        """Whether native accept is on: the engine accepts and connects clients itself."""
        return self._on_native is not None

    def listen(self, listen_fd: int, tcp: bool = True) -> None:
        """Native accept: let the engine accept on this listener (again, after a pause)."""
        self._native_accept().listen(listen_fd, tcp)

    def unlisten(self, listen_fd: int) -> None:
        """Native accept: stop accepting on it; the engine no longer uses the fd."""
        self._native_accept().unlisten(listen_fd)

    def set_targets(self, targets: Sequence[Target], settings: RelaySettings) -> None:
        """Native accept: where clients go and how (Engine.set_targets)."""
        self._native_accept().set_targets(targets, settings)

    def pick(self, exclude: Collection[int] = ()) -> int:
        """Native accept: the relay thread's choice for the next client (a tag, or -1),
        leaving out the tags in exclude."""
        return self._native_accept().pick(exclude)

    def release(self) -> None:
        """Native accept: a handed-back client was relayed or closed (Engine.release)."""
        if self._native_engine is not None:
            self._native_engine.release()

    def native_pending(self) -> int:
        """Native accept: clients accepted that the callbacks have not reported yet."""
        return self._native_engine.native_pending() if self._native_engine is not None else 0

    def _native_accept(self) -> contract.NativeAcceptEngine:
        if self._native_engine is None:
            raise RuntimeError("native accept is off (it needs the threaded Cython engine)")
        return self._native_engine

    def poll(self) -> None:
        """Collect and report now what the engine has (as a wake-up would)."""
        self._on_ready()

    def add(self, client_fd: int, upstream_fd: int, tag: int = -1) -> int:
        """Start relaying two connected non-blocking sockets; return the pair id."""
        return self._engine.add(client_fd, upstream_fd, tag)

    def remove(self, pair_id: int) -> Finished:
        """Stop relaying a pair now; both fds are unregistered, the caller may close them."""
        return self._engine.remove(pair_id)

    def stats(self, pair_id: int) -> tuple[int, int]:
        """(bytes client->upstream, bytes upstream->client) so far for one pair."""
        return self._engine.stats(pair_id)

    def detach(self, limit: int) -> list[Handed]:
        """Take up to `limit` live pairs out of the engine, open (a live upgrade hands them to
        the next process); no on_finished/on_native record mentions them afterwards."""
        return self._engine.detach(limit)

    def adopt(self, handed: Handed) -> int:
        """Relay a pair another engine handed out, from where it stopped; its new pair id.
        The engine writes the carried bytes at its next wake-up, scheduled here."""
        pair_id = self._engine.adopt(handed)
        if self._again is None and self._fd >= 0:
            self._again = self._loop.call_soon(self._on_again)
        return pair_id

    def totals(self) -> tuple[int, int]:
        """The same counts summed over every pair ever relayed (for metrics)."""
        return self._engine.totals()

    def __len__(self) -> int:
        return len(self._engine)

    def close(self) -> None:
        """Stop watching the engine and close it (idempotent); the caller still owns every fd."""
        if self._fd < 0:
            return
        if self._selector is not None:
            self._selector.hook = None
            self._selector = None
        else:
            self._loop.remove_reader(self._fd)
        self._fd = -1
        if self._again is not None:
            self._again.cancel()
            self._again = None
        self._engine.close()

    def _on_again(self) -> None:
        self._again = None
        self._on_ready()

    def _on_events(self, events: list[tuple[int, int]]) -> None:
        """RelaySelector's hook: the engine's events, straight from the loop's epoll_wait."""
        if self._fd < 0:
            return
        assert self._loop_epoll is not None
        try:
            done = self._loop_epoll.dispatch(events)
        except Exception as exc:  # never out of select(): that would stop the loop
            self._loop.call_exception_handler({"message": "relay failed", "exception": exc})
            return
        self._report(done)

    def _on_ready(self) -> None:
        if self._fd < 0:
            return
        if self._on_native is not None:
            assert self._native_engine is not None
            report = self._native_engine.collect(self.aggregate)
            done = report.finished
            try:
                self._on_native(report)
            except Exception as exc:
                self._loop.call_exception_handler(
                    {"message": "relay on_native callback failed", "exception": exc}
                )
        else:
            done = self._engine.run()
        self._report(done)

    def _report(self, done: list[Finished]) -> None:
        for finished in done:
            try:
                self._on_finished(*finished)
            except Exception as exc:  # one failing callback must not strand the other pairs
                self._loop.call_exception_handler(
                    {"message": "relay on_finished callback failed", "exception": exc}
                )
        # Edge-triggered: a pair cut short by the fairness budget gets no new event, so the
        # engine keeps it in a ready list and we come back after other callbacks have run.
        if self._engine.pending and self._again is None:
            self._again = self._loop.call_soon(self._on_again)
