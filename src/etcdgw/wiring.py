"""How one gateway's parts are wired together: once, for `Gateway` and for the in-process tests.

Three stages, because a test drives the parts before a listener exists:

    Parts(cfg, log, resolve, on_gone)  the parts that live from construction (no loop)
    parts.attach(loop, engine_cls)     the relay engine on the loop, the late socket
                                       options, the Dialer
    parts.accept(loop, listeners)      who accepts: the relay thread (native accept) or
                                       the loop

and one teardown (close), in the order the fds are owned. `Gateway` (server.py) adds the
lifecycle (serve, drain, stop, signals) on top; tests/_parts.py adds a test listener and
the loop driving.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from .accept import Listeners, LoopAccept, NativeAccept
from .balancer import Balancer
from .config import Config
from .dial import Dialer, OwnAddresses, is_local_ip
from .engine import Report
from .listeners import LateOptions, TcpOptions
from .log import Logger
from .monitor import Monitor
from .relay import Engine, Relay
from .resolver import AddressBook, AsyncResolver
from .settings import Settings
from .table import ConnTable

__all__ = ["Parts"]


class Parts:
    """The parts of one gateway, each given what it uses.

    Args:
        cfg: the configuration at start (Settings; configure() replaces it later).
        resolve: the address book's resolver.
        on_gone: the table's hook when a connection or a client is gone (the owner finishes a
            drain there, or accepts again below the limit: see `resume_accepting`).
    """

    def __init__(
        self, cfg: Config, log: Logger, resolve: AsyncResolver, on_gone: Callable[[], None]
    ) -> None:
        self.log = log
        self.settings = Settings(cfg)
        self.balancer = Balancer(cfg.endpoints, least=cfg.balance == "least-connections")
        self.addresses = AddressBook(resolve, on_change=self.balancer.changed)
        self.tcp = TcpOptions()
        # Where the gateway itself listens (and serves metrics): never dialled (dial.py).
        self.own = OwnAddresses(is_local_ip)
        self.monitor = Monitor(self.balancer, self.settings, log, self.addresses, self.own)
        self.table = ConnTable(self.balancer, self.monitor, self.settings, log, on_gone=on_gone)
        # Set by attach() and accept().
        self.relay: Relay | None = None
        self.late: LateOptions | None = None
        self.dialer: Dialer | None = None
        self.acceptor: LoopAccept | NativeAccept | None = None

    def attach(
        self,
        loop: asyncio.AbstractEventLoop,
        engine_cls: type[Engine] = Engine,
        *,
        native_accept: bool = True,
    ) -> Relay:
        """The relay engine on loop (native accept when the engine has it and native_accept
        is set), the loop's late socket options, and the Dialer."""
        relay = self.relay = Relay(
            loop,
            self.table.finished,
            engine_cls=engine_cls,
            bufsize=self.settings.cfg.buffer_size,
            on_native=self._on_report if native_accept else None,
        )
        relay.aggregate = not self.log.enabled("debug")
        self.late = LateOptions(self.tcp, loop)
        self.table.attach(relay, self.late)
        self.dialer = Dialer(
            loop,
            self.balancer,
            self.addresses,
            self.own,
            self.settings,
            self.tcp,
            self.monitor,
            self.table,
        )
        return relay

    def accept(
        self, loop: asyncio.AbstractEventLoop, listeners: Listeners, held: bool = False
    ) -> LoopAccept | NativeAccept:
        """Start accepting on listeners: in the relay thread when the engine took native
        accept at attach(), else in the loop. The caller runs NativeAccept.upkeep().
        held: build the acceptor without starting it (a live upgrade's successor, until
        its first ACK: upgrade.Successor.serve)."""
        assert self.relay is not None and self.dialer is not None, "attach() first"
        relay = self.relay
        parts = (loop, listeners, self.table, self.settings, self.tcp, self.log)
        acceptor: LoopAccept | NativeAccept
        if relay.native:
            native = NativeAccept(
                *parts,
                relay=relay,
                dialer=self.dialer,
                balancer=self.balancer,
                addresses=self.addresses,
                own=self.own,
            )
            self.balancer.on_change = native.sync
            self.balancer.delegate = relay.pick  # one round-robin counter
            native.sync()
            acceptor = native
        else:
            acceptor = LoopAccept(*parts, dialer=self.dialer)
        self.acceptor = acceptor
        acceptor.held = held
        acceptor.start()
        return acceptor

    def resume_accepting(self) -> None:
        """Accept again if below the limit (on_gone's second half)."""
        if self.acceptor is not None:
            self.acceptor.resume_below_limit()

    def _on_report(self, report: Report) -> None:
        assert isinstance(self.acceptor, NativeAccept)
        self.acceptor.on_report(report)

    def close(self) -> None:
        """Close every part once: the acceptor, then the dials and pairs (the table), then
        the engine. The listeners are their owner's (ListenerSet): close them first."""
        if self.acceptor is not None:
            self.acceptor.close()
        if self.late is not None:
            self.late.close()
        self.monitor.close()
        self.addresses.close()
        self.balancer.on_change = None
        self.balancer.delegate = None
        self.table.close()  # dials, then every pair the engine still relays
        if self.relay is not None:
            self.relay.close()
            self.relay = None
