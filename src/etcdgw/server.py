"""The running gateway: its parts, the relayed connections, and its lifecycle.

`Gateway` puts the parts together and keeps what is everybody's business: the relayed
connections and their counters, and the lifecycle (serve, drain on the first stop signal,
stop at once on the second, tear down exactly once). The parts, one concern each:

    listeners.py   ListenerSet (bind, socket files), TcpOptions (the socket-option rule)
    accept.py      LoopAccept | NativeAccept: who accepts, --max-connections, pauses
    dial.py        Dial: connect with --dial-timeout, failover, the all-down fallback
    monitor.py     Monitor: what a dial's outcome means for an endpoint; --retry-delay
    balancer.py    Balancer: endpoint state and selection, with one change signal
    resolver.py    AddressBook: host names on the connect path (stale-while-revalidate)
    relay.py       Relay: the engine (Cython or pure twin) driven from the loop

Ownership of file descriptors: the ListenerSet owns the listeners; this module owns every
socket of a pair it relays (it creates or accepts them, hands the integers to the engine,
and closes both once the engine has unregistered them), except the pairs the relay thread
accepted and dialled itself (native accept), whose sockets the engine owns and closes; a
Dial owns its client until it hands it to the relay or closes it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import systemd
from .accept import Acceptor, LoopAccept, NativeAccept
from .balancer import Balancer, Remote
from .config import Config, Endpoint, format_duration
from .dial import Dial, OwnAddresses, is_local_ip
from .engine import Report
from .listeners import LateOptions, ListenerSet, TcpOptions
from .log import Logger
from .monitor import IMMEDIATE, Monitor
from .relay import IMPLEMENTATION, Engine, Relay
from .resolver import AddressBook, AsyncResolver, async_host_resolver

if TYPE_CHECKING:
    from .membership import Membership

__all__ = ["NATIVE_ACCEPT", "Conn", "Counters", "Gateway"]

LINGER_RESET = struct.pack("ii", 1, 0)
# Accept and connect in the Cython engine's relay thread when it can (accept.NativeAccept).
# False keeps them in the loop; bench/ compares the two (bench/launch.py sets it). Not a flag.
NATIVE_ACCEPT = True


@dataclass
class Counters:
    """Gateway-wide counters, plain integers read by metrics at scrape time."""

    accepted: int = 0
    refused: int = 0  # closed because no endpoint could be reached
    abandoned: int = 0  # clients that left while they were being dialled
    accept_errors: int = 0
    finished: int = 0
    reset: int = 0
    bytes_finished: list[int] = field(default_factory=lambda: [0, 0])


class Conn:
    """A relayed pair: the owner's view (sockets, remote, start time).

    client and upstream are None for the engine's own pairs (native accept): it closes them.
    """

    __slots__ = ("client", "upstream", "remote", "started")

    def __init__(
        self, client: socket.socket | None, upstream: socket.socket | None, remote: Remote
    ) -> None:
        self.client = client
        self.upstream = upstream
        self.remote = remote
        self.started = time.monotonic()


class Gateway:
    """The running gateway: listeners, balancer, relay, monitor and lifecycle."""

    def __init__(
        self,
        cfg: Config,
        log: Logger,
        *,
        resolve: AsyncResolver | None = None,
        engine_cls: type[Engine] | None = None,
        inherited: Sequence[socket.socket] = (),
    ) -> None:
        self.cfg = cfg
        self.log = log
        self.balancer = Balancer(cfg.endpoints, least=cfg.balance == "least-connections")
        self.addresses = AddressBook(
            resolve if resolve is not None else async_host_resolver(cfg),
            on_change=self.balancer.changed,
        )
        self.tcp = TcpOptions()
        self.listening = ListenerSet(cfg, list(inherited))
        # Where the gateway itself listens (and serves metrics): never dialled (dial.py).
        self.own = OwnAddresses(is_local_ip)
        self.monitor = Monitor(self)
        self.counters = Counters()
        self.conns: dict[int, Conn] = {}
        self.dials: set[Dial] = set()
        self.engine_cls: type[Engine] = engine_cls if engine_cls is not None else Engine
        self.implementation = IMPLEMENTATION if engine_cls is None else _engine_name(engine_cls)
        self.ready = False
        self.draining = False  # a stop signal was received: no new clients
        # Set by run(): the loop it serves on and the parts that need it.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._relay: Relay | None = None
        self._acceptor: Acceptor | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._done: asyncio.Future[None] | None = None
        self._drain_handle: asyncio.TimerHandle | None = None
        self._late_options: LateOptions | None = None  # the loop's dials: keep-alive once lived
        self._refuse_log_at = 0.0
        self._refuse_suppressed = 0
        # SIGHUP: set by app.py (reload, SRV refresh).
        self.on_sighup: Callable[[], None] | None = None
        # --auto-sync-interval: the membership.Membership that follows the member list (set
        # by app.py; read by metrics for its counters).
        self.membership: Membership | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "the gateway is not running"
        return self._loop

    @property
    def relay(self) -> Relay:
        assert self._relay is not None, "the gateway is not running"
        return self._relay

    @property
    def listeners(self) -> list[socket.socket]:
        return self.listening.socks

    # --- start-up and serving ------------------------------------------------------------

    def bind(self) -> None:
        """Create and bind every listener (ListenerSet.bind), before anything is served."""
        self.listening.bind()
        for s in self.listeners:
            if s.family in (socket.AF_INET, socket.AF_INET6):
                self.own.add(s.getsockname())

    async def run(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Serve on loop (the running one) until stopped; returns when every socket is closed."""
        self._loop = loop if loop is not None else asyncio.get_running_loop()
        self._done = self._loop.create_future()
        try:
            self._relay = Relay(
                self._loop,
                self._on_finished,
                engine_cls=self.engine_cls,
                bufsize=self.cfg.buffer_size,
                on_native=self._on_report if NATIVE_ACCEPT else None,
            )
            self._relay.aggregate = not self.log.enabled("debug")
            if self._relay.native:
                native = NativeAccept(self)
                self._acceptor = native
                self.balancer.on_change = native.sync
                self.balancer.delegate = self._relay.pick  # one round-robin counter
                native.sync()
                self.spawn(native.upkeep())
            else:
                self._acceptor = LoopAccept(self)
            self._late_options = LateOptions(self.tcp, self._loop)
            self._acceptor.start()
            self.spawn(self.monitor.run())
            self._install_signals()
            self.ready = True
            self.log.info(
                "ready to proxy client requests",
                endpoints=[r.addr for r in self.balancer.remotes],
                **{
                    "listen-addrs": self.listening.names(),
                    # who accepts and connects clients: the engine's relay thread (native
                    # accept, Cython) or the asyncio loop
                    "accept": "relay-thread" if self._relay.native else "loop",
                },
            )
            await self._done
        finally:
            self._teardown()

    def spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        """Run a background coroutine for the gateway's lifetime (cancelled at teardown)."""
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                self.log.error("background task failed", error=repr(t.exception()))

        task.add_done_callback(done)
        return task

    def configure(self, cfg: Config) -> None:
        """Take a reloaded configuration: what comes next (dials, timeouts, limits, health,
        the balancing rule) follows it; the relay thread is told at once. Listeners, the
        metrics address and the endpoint set are not changed here."""
        self.cfg = cfg
        self.balancer.set_least(cfg.balance == "least-connections")
        self.balancer.changed()  # dial timeout, limit, socket options: the engine's copy

    def set_endpoints(self, endpoints: Sequence[Endpoint], source: str | None = None) -> None:
        """Replace the endpoint set: new ones get clients, removed ones keep their live ones.

        source (`flag`, `srv`, `member-list`), when given, is stamped on every endpoint (shown
        by /status) and logged.
        """
        if source is not None:
            endpoints = [dataclasses.replace(ep, source=source) for ep in endpoints]
        added, removed = self.balancer.set_endpoints(endpoints)
        if added or removed:
            extra = {} if source is None else {"source": source}
            self.log.info(
                "endpoints updated",
                added=[r.addr for r in added],
                removed=[r.addr for r in removed],
                endpoints=[r.addr for r in self.balancer.remotes],
                **extra,
            )

    # --- connections ---------------------------------------------------------------------

    def active_connections(self) -> int:
        pending = self._acceptor.pending() if self._acceptor is not None else 0
        return len(self.conns) + len(self.dials) + pending

    def start_relay(self, client: socket.socket, upstream: socket.socket, remote: Remote) -> None:
        """A Dial connected client to remote: relay them (this module owns both sockets)."""
        try:
            pid = self.relay.add(client.fileno(), upstream.fileno(), remote.tag)
        except OSError as e:
            self.log.warn("failed to start relaying", address=remote.addr, error=str(e))
            client.close()
            upstream.close()
            return
        self.conns[pid] = Conn(client, upstream, remote)
        self.balancer.opened(remote)
        if self._late_options is not None:
            self._late_options.add(upstream, self.cfg.tcp_keepalive)

    def started_native(self, pid: int, remote: Remote) -> None:
        """The relay thread accepted and connected a pair (it owns the sockets)."""
        self.conns[pid] = Conn(None, None, remote)
        self.balancer.opened(remote)

    def finished_short(
        self, remote: Remote, pairs: int, c2u: int, u2c: int, resets: int, silent: int = 0
    ) -> None:
        """Pairs of remote that the relay thread started and finished between two reports
        (silent: the client sent bytes and the endpoint none)."""
        self.balancer.passed(remote, pairs, c2u, u2c)
        if self.balancer.selector.least:
            self.monitor.closed(remote, pairs, silent, u2c > 0)
            if silent and isinstance(self._acceptor, NativeAccept):
                # The relay thread set the target aside on its own (_relay.pyx _finish):
                # tell it the balancer's verdict even if that did not change.
                self._acceptor.resync()
        c = self.counters
        c.finished += pairs
        c.reset += resets
        c.bytes_finished[0] += c2u
        c.bytes_finished[1] += u2c

    def abandoned(self, client: socket.socket) -> None:
        """The client left while it was being dialled: close it, nothing to tell anyone."""
        self.counters.abandoned += 1
        client.close()
        self.room()

    def refuse(self, client: socket.socket) -> None:
        """No endpoint could be reached: close the client (the Go gateway does too, silently)."""
        self.counters.refused += 1
        client.close()
        now = time.monotonic()
        if now - self._refuse_log_at >= 1.0:
            self.log.warn(
                "no endpoint available; closed client connection",
                suppressed=self._refuse_suppressed,
            )
            self._refuse_log_at = now
            self._refuse_suppressed = 0
        else:
            self._refuse_suppressed += 1
        self.room()

    def room(self) -> None:
        """A connection or a client is gone: finish a drain, or accept again below the limit."""
        if self.draining:
            if self.active_connections() == 0:
                self._finish()
        elif self._acceptor is not None:
            self._acceptor.resume_if_room()

    def _on_report(self, report: Report) -> None:
        assert isinstance(self._acceptor, NativeAccept)
        self._acceptor.on_report(report)

    def _on_finished(self, pid: int, c2u: int, u2c: int, err: int, ended: int = 0) -> None:
        conn = self.conns.pop(pid, None)
        if conn is None:
            return
        self._close_conn(conn, c2u, u2c, err, ended)
        self.room()

    def _close_conn(self, conn: Conn, c2u: int, u2c: int, err: int, ended: int = 0) -> None:
        remote = conn.remote
        self.balancer.closed(remote, c2u, u2c)
        if self.balancer.selector.least and not self.draining:
            # A strike: the endpoint (not the client) ended it at once, silent (monitor.py).
            silent = (
                ended == 2 and c2u > 0 and u2c == 0 and time.monotonic() - conn.started < IMMEDIATE
            )
            self.monitor.closed(remote, 1, int(silent), u2c > 0)
        c = self.counters
        c.finished += 1
        c.bytes_finished[0] += c2u
        c.bytes_finished[1] += u2c
        if err:
            c.reset += 1
        if conn.client is not None and conn.upstream is not None:
            if err:
                # Pass a reset on as a reset: close with SO_LINGER 0 sends RST, not FIN.
                for s in (conn.client, conn.upstream):
                    try:
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
                    except OSError:
                        pass
            conn.client.close()
            conn.upstream.close()
        # else the engine's own pair: it closed both sockets already (or in remove())
        if self.log.enabled("debug"):
            self.log.debug(
                "connection closed",
                address=remote.addr,
                sent=c2u,
                received=u2c,
                error=os.strerror(err) if err else "",
                duration=format_duration(round(time.monotonic() - conn.started, 6)),
            )

    # --- what metrics and status read ----------------------------------------------------

    def totals(self) -> tuple[int, int]:
        """Bytes (client->endpoint, endpoint->client) over all connections, live included."""
        if self._relay is None:
            b = self.counters.bytes_finished
            return b[0], b[1]
        return self._relay.totals()

    def collect_now(self) -> None:
        """Take in what the engine has to report now (started and finished pairs), so
        counters read right after are current (the relay thread batches its reports)."""
        if self._relay is not None:
            self._relay.poll()

    def live_bytes(self) -> dict[int, tuple[int, int]]:
        """Per relayed pair, the bytes moved so far (for per-endpoint status)."""
        if self._relay is None:
            return {}
        # (The engine answers stats() for a pair that finished but was not collected yet.)
        return {pid: self._relay.stats(pid) for pid in self.conns}

    # --- signals, drain, shutdown ----------------------------------------------------------

    def _install_signals(self) -> None:
        loop = self.loop
        try:
            loop.add_signal_handler(signal.SIGTERM, self.stop)
            loop.add_signal_handler(signal.SIGINT, self.stop)
            loop.add_signal_handler(signal.SIGHUP, self._sighup)
        except (RuntimeError, ValueError):
            pass  # not the main thread (tests run gateways in threads): no signals there

    def _sighup(self) -> None:
        if self.on_sighup is not None:
            self.on_sighup()

    def stop(self) -> None:
        """First call: drain (stop accepting, wait up to --drain-timeout). Second: stop now."""
        if self._done is None or self._done.done():
            return
        if self.draining:
            self.log.warn("second stop signal; closing all connections now")
            self._finish()
            return
        self.draining = True
        self.close_listeners()
        if self._relay is not None:
            self._relay.poll()  # clients the engine accepted before it stopped accepting
        try:
            systemd.notify("STOPPING=1")
        except OSError:
            pass
        timeout = self.cfg.drain_timeout
        n = self.active_connections()
        self.log.info(
            "stopping; draining connections",
            connections=n,
            timeout=format_duration(timeout),
        )
        if n == 0:
            self._finish()
            return
        self._drain_handle = self.loop.call_later(timeout, self._drain_deadline)

    def _drain_deadline(self) -> None:
        self.log.warn("drain timeout; closing remaining connections", connections=len(self.conns))
        self._finish()

    def _finish(self) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

    def close_listeners(self) -> None:
        """Stop accepting and close the listeners (and the socket files still ours)."""
        if self._acceptor is not None:
            self._acceptor.stop()
        self.listening.close()

    def _teardown(self) -> None:
        """Close everything this gateway owns, exactly once."""
        self.close_listeners()
        if self._acceptor is not None:
            self._acceptor.close()
        if self._drain_handle is not None:
            self._drain_handle.cancel()
        if self._late_options is not None:
            self._late_options.close()
        self.monitor.close()
        for t in list(self._tasks):
            t.cancel()
        self.addresses.close()
        for d in list(self.dials):
            d.abort()
        self.balancer.on_change = None
        self.balancer.delegate = None
        if self._relay is not None:
            self._relay.poll()  # pairs the engine started or finished since the last wake-up
            for pid in list(self.conns):
                try:
                    _, c2u, u2c, _, _ = self._relay.remove(pid)
                except KeyError:  # finished by the relay thread just now: unregistered
                    c2u = u2c = 0
                self._close_conn(self.conns.pop(pid), c2u, u2c, 0)
            for d in list(self.dials):
                d.abort()  # clients of failed native dials collected by the poll above
            self._relay.close()
            self._relay = None
        if self._loop is not None:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                try:
                    self._loop.remove_signal_handler(sig)
                except (RuntimeError, ValueError):
                    pass


def _engine_name(cls: type[Any]) -> str:
    return "cython" if cls.__module__ == "etcdgw._relay" else "python"
