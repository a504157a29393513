"""The running gateway: the composition root of its parts, and its lifecycle.

`Gateway` builds the parts (wiring.Parts: the same wiring the in-process tests use), and
runs the lifecycle (serve, drain on the first stop signal, stop at once on the second, tear
down exactly once). The parts, one concern each:

    wiring.py      Parts: which part gets which collaborators; the teardown order
    settings.py    Settings: the configuration in force (configure() replaces it)
    table.py       ConnTable: relayed pairs, dials in flight, counters; its on_gone hook
    listeners.py   ListenerSet (bind, socket files), TcpOptions (the socket-option rule)
    accept.py      LoopAccept | NativeAccept: who accepts, --max-connections, pauses
    dial.py        Dialer/Dial: connect with --dial-timeout, failover, the all-down fallback
    monitor.py     Monitor: what a dial's outcome means for an endpoint; --retry-delay
    balancer.py    Balancer: endpoint state and selection, with one change signal
    resolver.py    AddressBook: host names on the connect path (stale-while-revalidate)
    relay.py       Relay: the engine (Cython or pure twin) driven from the loop

None of them knows the Gateway, nor do health.py, membership.py and metrics.py (they get
their collaborators from app.py; metrics a view.View) or upgrade.py (upgrade.Parts). Only
app.py imports this module (tests/test_import_graph.py); running.py sees the gateway
through its `Lifecycle` protocol.

Ownership of file descriptors: the ListenerSet owns the listeners; the ConnTable owns every
socket of a pair the loop relays (it hands the integers to the engine, and closes both once
the engine has unregistered them), except the pairs the relay thread accepted and dialled
itself (native accept), whose sockets the engine owns and closes; a Dial owns its client
until it hands it to the table or closes it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from . import systemd, upgrade
from .accept import NativeAccept
from .config import Config, Endpoint
from .golang import format_duration
from .listeners import ListenerSet
from .log import Logger
from .relay import IMPLEMENTATION, Engine, Relay
from .resolver import AsyncResolver, async_host_resolver
from .wiring import Parts

if TYPE_CHECKING:
    from .membership import Membership

__all__ = ["NATIVE_ACCEPT", "Gateway"]

# Accept and connect in the Cython engine's relay thread when it can (accept.NativeAccept).
# False keeps them in the loop; bench/ compares the two (bench/launch.py sets it), and
# tests/test_server.py runs every test both ways. Not a flag.
NATIVE_ACCEPT = True


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
        handed: dict[str, socket.socket] | None = None,
        handed_files: dict[str, tuple[int, int]] | None = None,
    ) -> None:
        self.log = log
        # The parts (wiring.py, as the in-process tests wire them); relay and acceptor
        # from run() on.
        parts = self.parts = Parts(
            cfg,
            log,
            resolve if resolve is not None else async_host_resolver(cfg),
            on_gone=self._on_gone,
        )
        # The configuration in force: configure() replaces it, the parts read it at use.
        self.settings = parts.settings
        self.balancer = parts.balancer
        self.addresses = parts.addresses
        self.tcp = parts.tcp
        self.own = parts.own
        self.monitor = parts.monitor
        self.table = parts.table
        # handed: a live upgrade's listeners by --listen-addr (upgrade.py); handed_files: the
        # unix socket files the old process owned, path -> (st_dev, st_ino)
        self.listener_set = ListenerSet(cfg, list(inherited), handed, handed_files)
        self.engine_cls: type[Engine] = engine_cls if engine_cls is not None else Engine
        self.implementation = IMPLEMENTATION if engine_cls is None else _engine_name(engine_cls)
        self.ready = False
        # Set by run(): the loop it serves on.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._done: asyncio.Future[None] | None = None
        self._drain_handle: asyncio.TimerHandle | None = None
        # SIGHUP: set by app.py (reload, SRV refresh).
        self.on_sighup: Callable[[], None] | None = None
        # Live upgrade (upgrade.py, set by app.py): SIGUSR2; a stop signal it may defer
        # (True: deferred); run once the gateway is ready (a successor's hand-over).
        self.on_sigusr2: Callable[[], None] | None = None
        self.defer_stop: Callable[[Callable[[], None]], bool] | None = None
        self.on_ready: Callable[[], None] | None = None
        # A live upgrade's successor: accept nothing until it proved alive (its first ACK;
        # upgrade.Successor.serve resumes accepting).
        self.hold_accept = False
        # --auto-sync-interval: the membership.Membership that follows the member list (set
        # by app.py; read by metrics for its counters).
        self.membership: Membership | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "the gateway is not running"
        return self._loop

    @property
    def relay(self) -> Relay:
        assert self.parts.relay is not None, "the gateway is not running"
        return self.parts.relay

    @property
    def listen_socks(self) -> list[socket.socket]:
        """The listening sockets in force (those of listener_set)."""
        return self.listener_set.socks

    @property
    def cfg(self) -> Config:
        """The configuration in force (Settings.cfg; configure() replaces it)."""
        return self.settings.cfg

    # --- start-up and serving ------------------------------------------------------------

    def bind(self) -> None:
        """Create and bind every listener (ListenerSet.bind), before anything is served."""
        self.listener_set.bind()
        for s in self.listen_socks:
            if s.family in (socket.AF_INET, socket.AF_INET6):
                self.own.add(s.getsockname())

    async def run(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Serve on loop (the running one) until stopped; returns when every socket is closed."""
        self._loop = loop if loop is not None else asyncio.get_running_loop()
        self._done = self._loop.create_future()
        try:
            loop = self._loop
            relay = self.parts.attach(loop, self.engine_cls, native_accept=NATIVE_ACCEPT)
            acceptor = self.parts.accept(loop, self.listener_set, held=self.hold_accept)
            if isinstance(acceptor, NativeAccept):
                self.spawn(acceptor.upkeep())
            self.spawn(self.monitor.run())
            self._install_signals()
            self.ready = True
            if self.on_ready is not None:
                self.on_ready()
            self.log.info(
                "ready to proxy client requests",
                endpoints=[r.addr for r in self.balancer.remotes],
                **{
                    "listen-addrs": self.listener_set.names(),
                    # who accepts and connects clients: the engine's relay thread (native
                    # accept, Cython) or the asyncio loop
                    "accept": "relay-thread" if relay.native else "loop",
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
        self.settings.cfg = cfg
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

    def _on_gone(self) -> None:
        """The table's hook: a connection or a client is gone: finish a drain, or accept
        again below the limit."""
        if self.table.draining:
            if self.table.active_connections() == 0:
                self._finish()
        else:
            self.parts.resume_accepting()

    # --- what metrics and status read ----------------------------------------------------

    def totals(self) -> tuple[int, int]:
        """Bytes (client->endpoint, endpoint->client) over all connections, live included."""
        if self.parts.relay is None:
            b = self.table.counters.bytes_finished
            return b[0], b[1]
        return self.parts.relay.totals()

    def collect_now(self) -> None:
        """Take in what the engine has to report now (started and finished pairs), so
        counters read right after are current (the relay thread batches its reports)."""
        if self.parts.relay is not None:
            self.parts.relay.poll()

    def live_bytes(self) -> dict[int, tuple[int, int]]:
        """Per relayed pair, the bytes moved so far (for per-endpoint status)."""
        relay = self.parts.relay
        if relay is None:
            return {}
        # (The engine answers stats() for a pair that finished but was not collected yet.)
        return {pid: relay.stats(pid) for pid in self.table.conns}

    # --- signals, drain, shutdown ----------------------------------------------------------

    def _install_signals(self) -> None:
        loop = self.loop
        try:
            loop.add_signal_handler(signal.SIGTERM, self.stop)
            loop.add_signal_handler(signal.SIGINT, self.stop)
            loop.add_signal_handler(signal.SIGHUP, self._sighup)
            if self.on_sigusr2 is not None:
                loop.add_signal_handler(signal.SIGUSR2, self.on_sigusr2)
        except (RuntimeError, ValueError):
            pass  # not the main thread (tests run gateways in threads): no signals there

    def _sighup(self) -> None:
        if self.on_sighup is not None:
            self.on_sighup()

    def stop(self) -> None:
        """First call: drain (stop accepting, wait up to --drain-timeout). Second: stop now."""
        if self._done is None or self._done.done():
            return
        if self.defer_stop is not None and self.defer_stop(self.stop):
            return
        if self.table.draining:
            self.log.warn("second stop signal; closing all connections now")
            self._finish()
            return
        self.table.draining = True
        self.close_listeners()
        if self.parts.relay is not None:
            self.parts.relay.poll()  # clients the engine accepted before it stopped accepting
        try:
            systemd.notify("STOPPING=1")
        except OSError:
            pass
        timeout = self.cfg.drain_timeout
        n = self.table.active_connections()
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
        self.log.warn(
            "drain timeout; closing remaining connections", connections=len(self.table.conns)
        )
        self._finish()

    def _finish(self) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

    # --- live upgrade (upgrade.py) --------------------------------------------------------

    def upgrade_parts(self, extra: dict[str, socket.socket] | None = None) -> upgrade.Parts:
        """What a live upgrade uses of this gateway (either side); once running."""
        acceptor, dialer, relay = self.parts.acceptor, self.parts.dialer, self.parts.relay
        assert acceptor is not None and dialer is not None and relay is not None, "not running"

        def pause() -> None:
            acceptor.held = True
            acceptor.stop()

        def resume() -> None:
            acceptor.held = False
            acceptor.start()

        def redial(client: socket.socket) -> None:
            dialer.dial(client)

        def take_dials(n: int) -> list[socket.socket]:
            return [d.hand_over() for d in list(self.table.dials)[:n]]

        return upgrade.Parts(
            loop=self.loop,
            log=self.log,
            relay=relay,
            table=self.table,
            balancer=self.balancer,
            pause=pause,
            resume=resume,
            listeners=lambda: list(
                zip(self.listener_set.keys, self.listener_set.socks, strict=True)
            ),
            redial=redial,
            take_dials=take_dials,
            dials=lambda: len(self.table.dials) + relay.native_pending(),
            extra=dict(extra or {}),
            drain_timeout=lambda: self.cfg.drain_timeout,
            files=self.listener_set.files,
        )

    def handed_over(self) -> None:
        """A live upgrade handed everything to the successor: close the listener copies
        without unlinking a socket file, and stop (no pair is left to close)."""
        if self.parts.acceptor is not None:
            self.parts.acceptor.stop()
        self.listener_set.release()
        self._finish()

    def close_listeners(self) -> None:
        """Stop accepting and close the listeners (and the socket files still ours)."""
        if self.parts.acceptor is not None:
            self.parts.acceptor.stop()
        self.listener_set.close()

    def _teardown(self) -> None:
        """Close everything this gateway owns, exactly once."""
        self.close_listeners()
        if self._drain_handle is not None:
            self._drain_handle.cancel()
        for t in list(self._tasks):
            t.cancel()
        self.parts.close()  # the acceptor, dials and pairs, the engine
        if self._loop is not None:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                try:
                    self._loop.remove_signal_handler(sig)
                except (RuntimeError, ValueError):
                    pass
            if self.on_sigusr2 is not None:
                try:
                    if self._loop.remove_signal_handler(signal.SIGUSR2):
                        # Its default action ends the process: from here on it means nothing.
                        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
                except (RuntimeError, ValueError):
                    pass


def _engine_name(cls: type[Any]) -> str:
    return "cython" if cls.__module__ == "etcdgw._relay" else "python"
