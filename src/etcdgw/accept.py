"""Accepting clients: in the asyncio loop (`LoopAccept`) or in the relay thread (`NativeAccept`).

Both share the rules of when to accept (`Acceptor`): not while draining; not beyond
--max-connections (clients wait in the kernel backlog); and on a shortage of fds or buffers
(EMFILE, ENFILE, ENOBUFS, ENOMEM: the Go gateway exits 0 on them) a pause of 0.1 s doubling
to 1 s, after closing at once the clients already waiting when it is fds that ran out
(libuv's "EMFILE trick", with one spare fd reserved for it), so they learn now instead of
hanging.

`NativeAccept` hands the listeners to the Cython engine's relay thread, which accepts, picks
a target with the C copy of the selection rule (`_pick.pxi`) and connects, without Python.
It is the one place that tells the engine where clients go (`sync`, run on the balancer's
and the address book's change signals), and it takes back, from each engine report, the
clients whose dial failed (failover is dial.py's) and the per-connection bookkeeping.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from collections.abc import Sequence
from typing import Any, Protocol

from .balancer import Balancer, Remote
from .dial import Dialer, OwnAddresses, dial_error
from .engine import RelaySettings, Report, Target
from .goerrors import IO_TIMEOUT, dial_failed
from .golang import format_duration
from .listeners import LATE_OPTIONS_AFTER, TcpOptions
from .log import Logger
from .relay import Relay
from .resolver import AddressBook
from .settings import Settings
from .table import ConnTable

__all__ = ["ACCEPT_BATCH", "Acceptor", "Listeners", "LoopAccept", "NativeAccept"]

ACCEPT_BATCH = 128  # clients accepted per listener per wake-up (the engine's is the same)
# Accept errors that mean "out of a resource for now" (the Go gateway exits 0 on them).
ACCEPT_PAUSE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
ACCEPT_SHED_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE})
ACCEPT_PAUSE = 0.1  # seconds; grows to ACCEPT_PAUSE_MAX while the shortage lasts
ACCEPT_PAUSE_MAX = 1.0
# How often native accept refreshes stale host-name answers (the relay thread dials by
# address and never asks the address book itself).
NATIVE_UPKEEP = 1.0


class Listeners(Protocol):
    """The listening sockets (listeners.ListenerSet): the list in force, read at each use
    (closing them replaces it)."""

    @property
    def socks(self) -> Sequence[socket.socket]: ...


class Acceptor:
    """When to accept: start/stop, --max-connections, pauses on resource shortages.

    Args:
        loop: the running loop (pause timers; LoopAccept's readers).
        listeners: where clients come from.
        table: the connection table: how many clients there are (against the limit),
            whether the gateway drains, and the accept counters.
        settings: the configuration in force (--max-connections, --tcp-keepalive).
        tcp: the socket-option rule (listeners are tuned before the first client).
        log: the pause lines.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        listeners: Listeners,
        table: ConnTable,
        settings: Settings,
        tcp: TcpOptions,
        log: Logger,
    ) -> None:
        self.loop = loop
        self.listeners = listeners
        self.table = table
        self.settings = settings
        self.tcp = tcp
        self.log = log
        self.accepting = False
        self._listening: list[int] = []  # the fds start() listens on, for stop()
        # A live upgrade handed accepting to the successor (upgrade.py): start() does
        # nothing (a pair's end or a pause's end does not resume it) until released.
        self.held = False
        self._pause = ACCEPT_PAUSE
        self._pause_handle: asyncio.TimerHandle | None = None
        self._spare_fd = -1
        self._reserve_spare_fd()

    # what differs between the two ways
    def _listen(self, lsock: socket.socket) -> None:
        raise NotImplementedError

    def _unlisten(self, fd: int) -> None:
        raise NotImplementedError

    # the rules
    def start(self) -> None:
        if self.accepting or self.table.draining or self.held:
            return
        # The fds are remembered: stop() must reach the ones it started even if the
        # listener set was closed first (the engine would go on accepting on the number).
        self._listening = [s.fileno() for s in self.listeners.socks]
        for s in self.listeners.socks:
            self._listen(s)
        self.accepting = True

    def stop(self) -> None:
        if not self.accepting:
            return
        for fd in self._listening:
            try:
                self._unlisten(fd)
            except (ValueError, OSError, KeyError):
                pass  # not registered any more
        self._listening = []
        self.accepting = False

    def full(self) -> bool:
        limit = self.settings.cfg.max_connections
        return bool(limit) and self.table.active_connections() >= limit

    def resume_below_limit(self) -> None:
        """A connection ended (or a pause passed): accept again unless still at the limit."""
        if not self.accepting and self._pause_handle is None and not self.full():
            self.start()

    def accepted(self, n: int = 1) -> None:
        self.table.counters.accepted += n
        self._pause = ACCEPT_PAUSE

    def pause(self, lsock: socket.socket, err: int) -> None:
        """Out of fds or buffers: stop accepting briefly instead of exiting or spinning."""
        shed = self._shed(lsock) if err in ACCEPT_SHED_ERRNOS else 0
        self.stop()
        self.log.warn(
            "accept failed; pausing accept",
            error=str(OSError(err, os.strerror(err))),
            pause=format_duration(self._pause),
            **({"closed-clients": shed} if shed else {}),
        )
        delay = self._pause
        self._pause = min(self._pause * 2, ACCEPT_PAUSE_MAX)
        self._pause_handle = self.loop.call_later(delay, self._resume)

    def _resume(self) -> None:
        self._pause_handle = None
        self.start()

    def close(self) -> None:
        self.stop()
        if self._pause_handle is not None:
            self._pause_handle.cancel()
            self._pause_handle = None
        if self._spare_fd >= 0:
            os.close(self._spare_fd)
            self._spare_fd = -1

    def _reserve_spare_fd(self) -> None:
        if self._spare_fd < 0:
            try:
                self._spare_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                pass  # out of fds already: try again at the next shortage

    def _shed(self, lsock: socket.socket) -> int:
        """Out of fds: close the clients waiting in the backlog; return how many.

        The spare fd is given up for a moment so accept() can take each waiting client, which
        is closed at once (as when no endpoint can be reached); then it is reserved again.
        """
        if self._spare_fd < 0:
            self._reserve_spare_fd()
            return 0
        os.close(self._spare_fd)
        self._spare_fd = -1
        n = 0
        try:
            for _ in range(ACCEPT_BATCH):
                try:
                    client, _ = lsock.accept()
                except OSError:
                    break  # EAGAIN: none left; EMFILE: another fd took the spare's place
                client.close()
                n += 1
        finally:
            self._reserve_spare_fd()
        self.table.counters.refused += n
        return n


class LoopAccept(Acceptor):
    """Accept in the asyncio loop: each listener is a reader; a Dial per client.

    dialer: connects each accepted client (dial.Dialer); the rest as for Acceptor.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        listeners: Listeners,
        table: ConnTable,
        settings: Settings,
        tcp: TcpOptions,
        log: Logger,
        *,
        dialer: Dialer,
    ) -> None:
        super().__init__(loop, listeners, table, settings, tcp, log)
        self.dialer = dialer

    def _listen(self, lsock: socket.socket) -> None:
        if lsock.family != socket.AF_UNIX:
            # Before the first client: the clients accepted from now on inherit the options
            # (tuned lazily at the first wake-up, that first client would not have, and every
            # client would be tuned by hand: six calls each).
            self.tcp.tune_listener(lsock, self.settings.cfg.tcp_keepalive)
        self.loop.add_reader(lsock.fileno(), self._on_accept, lsock)

    def _unlisten(self, fd: int) -> None:
        self.loop.remove_reader(fd)

    def _on_accept(self, lsock: socket.socket) -> None:
        tcp = self.tcp
        ka = self.settings.cfg.tcp_keepalive
        # A TCP client needs tuning unless it inherited the listener's options.
        tune = lsock.family != socket.AF_UNIX and not tcp.tune_listener(lsock, ka)
        dial = self.dialer.dial
        for _ in range(ACCEPT_BATCH):
            if self.full():
                self.stop()  # further clients wait in the kernel's backlog
                return
            try:
                client, _ = lsock.accept()
            except BlockingIOError:
                return
            except OSError as e:
                self.table.counters.accept_errors += 1
                if e.errno in ACCEPT_PAUSE_ERRNOS:
                    self.pause(lsock, e.errno)
                    return
                # ECONNABORTED, EPROTO, EPERM (firewall), ...: that one client is gone.
                continue
            self.accepted()
            client.setblocking(False)
            if tune:
                tune = tcp.tune_accepted(lsock, client, ka)
            dial(client)


class NativeAccept(Acceptor):
    """Accept, pick and connect in the relay thread; keep it told where clients go.

    Args (besides Acceptor's):
        relay: the engine, in native-accept mode (listen, set_targets, reports).
        dialer: takes over the clients whose dial the relay thread could not finish.
        balancer, addresses, own: what the relay thread is told (targets, their first
            address, never the gateway's own) and how a report's tags are read.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        listeners: Listeners,
        table: ConnTable,
        settings: Settings,
        tcp: TcpOptions,
        log: Logger,
        *,
        relay: Relay,
        dialer: Dialer,
        balancer: Balancer,
        addresses: AddressBook,
        own: OwnAddresses,
    ) -> None:
        super().__init__(loop, listeners, table, settings, tcp, log)
        self.relay = relay
        self.dialer = dialer
        self.balancer = balancer
        self.addresses = addresses
        self.own = own
        self._told: tuple[Any, ...] | None = None  # what the engine was last told

    def _listen(self, lsock: socket.socket) -> None:
        tcp = lsock.family != socket.AF_UNIX
        if tcp:
            self.tcp.tune_listener(lsock, self.settings.cfg.tcp_keepalive)
        self.relay.listen(lsock.fileno(), tcp)

    def _unlisten(self, fd: int) -> None:
        self.relay.unlisten(fd)

    # --- the one sync point -------------------------------------------------------------

    def sync(self) -> None:
        """Tell the engine the balancer's state, the addresses and the dial settings.

        Runs on every change signal (balancer.on_change, AddressBook.on_change); unchanged
        state is not sent again.
        """
        targets = []
        for r in self.balancer.remotes:
            ep = r.endpoint
            addrs = self.addresses.known(ep.host)
            fam: int = socket.AF_INET
            ip: str | None = None
            # Scoped IPv6 and the gateway's own addresses: dial.py dials (or refuses) those.
            if (
                addrs
                and "%" not in addrs[0][1][0]
                and not self.own.dials_self(addrs[0][1][0], ep.port)
            ):
                fam, ip = addrs[0][0], addrs[0][1][0]
            targets.append(Target(r.tag, int(fam), ip, ep.port, ep.priority, ep.weight, r.usable))
        cfg = self.settings.cfg
        now, late = self.tcp.split(cfg.tcp_keepalive)
        settings = RelaySettings(
            sockopts=tuple(now),
            dial_timeout=cfg.dial_timeout,
            limit=cfg.max_connections,
            late_sockopts=tuple(late),
            late_after=LATE_OPTIONS_AFTER,
            least=self.balancer.selector.least,
        )
        told = (tuple(targets), settings)
        if told == self._told:
            return
        self.relay.set_targets(targets, settings)
        self._told = told
        if self.accepting:
            for s in self.listeners.socks:
                if s.family != socket.AF_UNIX:
                    self.tcp.tune_listener(s, cfg.tcp_keepalive)  # a reload changed it?

    def resync(self) -> None:
        """sync(), even if the balancer's state looks the same as last told."""
        self._told = None
        self.sync()

    async def upkeep(self) -> None:
        """Keep host-name answers fresh for the relay thread (it dials by address)."""
        while True:
            await asyncio.sleep(NATIVE_UPKEEP)
            self.addresses.refresh_stale([r.endpoint.host for r in self.balancer.remotes])

    # --- what the relay thread reports --------------------------------------------------

    def on_report(self, report: Report) -> None:
        """What the relay thread accepted, connected and could not connect.

        report.short: pairs that started and finished between two reports, summed per
        remote: per-connection Python work for the churn case is gone. Not used at
        --log-level=debug, which logs each connection.
        """
        table = self.table
        if report.accepted:
            self.accepted(report.accepted)
        table.counters.accept_errors += report.accept_errors
        by_tag = self.balancer.by_tag
        resync = False
        # What started first: a drain counts live connections when a short pair's end
        # makes room (on_gone() below), and a pair that started in this same report must be
        # among them, or the drain ends under it.
        for st in report.started:
            remote = by_tag(st.tag)
            assert remote is not None
            table.started_native(st.pair_id, remote)
        if report.short:
            for s in report.short:
                remote = by_tag(s.tag)
                assert remote is not None
                table.finished_short(remote, s.pairs, s.c2u, s.u2c, s.resets, s.silent)
                if s.silent and self.balancer.selector.least:
                    # The relay thread set the target aside on its own (_relay.pyx
                    # _finish): tell it the balancer's verdict even if that did not change.
                    resync = True
            table.on_gone()
            if resync:
                self.resync()
        for f in report.failed:
            client = socket.socket(fileno=f.client_fd)
            try:
                client.setblocking(False)
                self._take_over(client, by_tag(f.tag) if f.tag >= 0 else None, f.err)
            except Exception as e:  # a bug must cost this client, not the rest of the report
                self.log.error("failed to take over a client", error=repr(e))
                for d in [d for d in table.dials if d.client is client]:
                    d.abort()
                table.refuse(client, held=True)
        for p in report.paused:
            lsock = next((s for s in self.listeners.socks if s.fileno() == p.listen_fd), None)
            if lsock is None or not self.accepting:
                continue  # closed or stopped meanwhile
            self.pause(lsock, p.err)

    def _take_over(self, client: socket.socket, remote: Remote | None, err: int) -> None:
        """A client the engine could not connect (engine.Failed): dial.py fails it over."""
        dialer = self.dialer
        if remote is None:
            if err:
                # no socket for the dial: not an endpoint's fault
                self.table.refuse(client, held=True)
            else:
                dialer.dial(client, held=True)  # nothing usable: the fallback round
            return
        if remote.removed:
            dialer.dial(client, held=True)
            return
        if err == 0:
            dialer.dial_to(client, remote)  # no address yet: resolve, then dial
            return
        ep = remote.endpoint
        if err == errno.ETIMEDOUT:
            # The whole dial (every address of the endpoint) shares one --dial-timeout.
            dialer.resume(client, remote, [], dial_failed(ep.addr, IO_TIMEOUT))
            return
        addrs = list(self.addresses.known(ep.host) or [])
        ip = addrs[0][1][0] if addrs else ""
        dialer.resume(client, remote, addrs[1:], dial_error(ep, ip, err))
