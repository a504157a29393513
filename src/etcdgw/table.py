"""The connection table: relayed pairs, clients being dialled, and their counters.

`ConnTable` is what every part that starts, refuses or ends a client connection shares: the
relayed pairs (`conns`, by the engine's pair id), the `Dial`s in flight (`dials`), the
gateway-wide `Counters`, and the few transitions a connection goes through (relayed by the
loop, started by the relay thread, refused, abandoned, finished). When a connection or a
client is gone it calls `on_gone`, a hook given at construction (the gateway's: finish a drain,
or let the acceptor accept again below --max-connections).

Ownership: the table owns both sockets of a pair the loop relays (`Conn.client`,
`Conn.upstream`): it hands the integers to the engine and closes both once the engine has
unregistered them. Pairs the relay thread accepted and dialled itself are the engine's.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .balancer import Balancer, Remote
from .dial import Dial
from .golang import format_duration
from .listeners import LateOptions
from .log import Logger
from .monitor import IMMEDIATE, Monitor
from .relay import Relay
from .settings import Settings

__all__ = ["Conn", "ConnTable", "Counters"]

LINGER_RESET = struct.pack("ii", 1, 0)


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


class ConnTable:
    """Relayed pairs and dials in flight, and what starts, refuses and closes them.

    Args:
        balancer: told of each pair that opens and closes (per-remote counts, bytes).
        monitor: told how a pair ended (least-connections' strikes).
        settings: the configuration in force (--tcp-keepalive of the loop's upstreams).
        log: refusals (at most one line a second) and, at debug, each closed connection.
        on_gone: called when a connection or a client is gone (finish a drain, or accept
            again below the limit).

    The engine is attached once it runs (`attach`); `finished` is its on_finished callback.
    """

    def __init__(
        self,
        balancer: Balancer,
        monitor: Monitor,
        settings: Settings,
        log: Logger,
        on_gone: Callable[[], None],
    ) -> None:
        self.balancer = balancer
        self.monitor = monitor
        self.settings = settings
        self.log = log
        self.on_gone = on_gone
        self.conns: dict[int, Conn] = {}
        self.dials: set[Dial] = set()
        self.counters = Counters()
        # Set by the gateway's first stop signal: no new clients come, closings no longer
        # strike (least-connections), and on_gone() may finish the drain.
        self.draining = False
        self._relay: Relay | None = None
        self._late: LateOptions | None = None  # the loop's dials: keep-alive once lived
        self._refuse_log_at = 0.0
        self._refuse_suppressed = 0

    def attach(self, relay: Relay, late: LateOptions | None = None) -> None:
        """The running engine (pairs go to it) and the late keep-alive of the loop's dials."""
        self._relay = relay
        self._late = late

    def active_connections(self) -> int:
        """Relayed pairs, dials in flight and clients the relay thread has not reported."""
        relay = self._relay
        pending = relay.native_pending() if relay is not None else 0
        return len(self.conns) + len(self.dials) + pending

    # --- a connection starts -------------------------------------------------------------

    def start_relay(
        self, client: socket.socket, upstream: socket.socket, remote: Remote, held: bool = False
    ) -> None:
        """A Dial connected client to remote: relay them (the table owns both sockets).

        held: a client the relay thread handed back; it counted against --max-connections
        there until now (released after add(), so the count never dips in between).
        """
        relay = self._relay
        assert relay is not None, "the gateway is not running"
        try:
            pid = relay.add(client.fileno(), upstream.fileno(), remote.tag)
        except OSError as e:
            self.log.warn("failed to start relaying", address=remote.addr, error=str(e))
            client.close()
            upstream.close()
            return
        finally:
            if held:
                relay.release()
        self.conns[pid] = Conn(client, upstream, remote)
        self.balancer.opened(remote)
        if self._late is not None:
            self._late.add(upstream, self.settings.cfg.tcp_keepalive)

    def adopted(
        self, pid: int, client: socket.socket, upstream: socket.socket, remote: Remote
    ) -> None:
        """A pair the engine adopted (live upgrade, upgrade.py): the table owns both sockets,
        as for start_relay."""
        self.conns[pid] = Conn(client, upstream, remote)
        self.balancer.opened(remote)

    def forget(self, pid: int) -> Conn | None:
        """A pair the engine handed out (detach, live upgrade): no longer ours to count or
        close; its sockets (None for the relay thread's own) are the caller's."""
        conn = self.conns.pop(pid, None)
        if conn is not None:
            self.balancer.handed_out(conn.remote)
        return conn

    def started_native(self, pid: int, remote: Remote) -> None:
        """The relay thread accepted and connected a pair (it owns the sockets)."""
        self.conns[pid] = Conn(None, None, remote)
        self.balancer.opened(remote)

    # --- a client is not served ----------------------------------------------------------

    def abandoned(self, client: socket.socket, held: bool = False) -> None:
        """The client left while it was being dialled: close it, nothing to tell anyone."""
        self.counters.abandoned += 1
        client.close()
        self._let_go(held)
        self.on_gone()

    def handed_dial(self, held: bool = False) -> None:
        """A dial's client was handed to a live upgrade's successor (Dial.hand_over): not
        ours to count any more (its socket is the caller's)."""
        self._let_go(held)
        self.on_gone()

    def _let_go(self, held: bool) -> None:
        """A client the relay thread handed back (held) is closed: it counts there no more."""
        if held and self._relay is not None:
            self._relay.release()

    def refuse(self, client: socket.socket, held: bool = False) -> None:
        """No endpoint could be reached: close the client (the Go gateway does too, silently)."""
        self.counters.refused += 1
        client.close()
        self._let_go(held)
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
        self.on_gone()

    # --- a connection ends ---------------------------------------------------------------

    def finished(self, pid: int, c2u: int, u2c: int, err: int, ended: int = 0) -> None:
        """The engine finished a pair by itself (Relay's on_finished)."""
        conn = self.conns.pop(pid, None)
        if conn is None:
            return
        self._close_conn(conn, c2u, u2c, err, ended)
        self.on_gone()

    def finished_short(
        self, remote: Remote, pairs: int, c2u: int, u2c: int, resets: int, silent: int = 0
    ) -> None:
        """Pairs of remote that the relay thread started and finished between two reports
        (silent: the client sent bytes and the endpoint none). The caller calls on_gone()."""
        self.balancer.opened_and_closed(remote, pairs, c2u, u2c)
        if self.balancer.selector.least:
            self.monitor.closed(remote, pairs, silent, u2c > 0)
        c = self.counters
        c.finished += pairs
        c.reset += resets
        c.bytes_finished[0] += c2u
        c.bytes_finished[1] += u2c

    def close(self) -> None:
        """Teardown: give up every dial, take every pair back from the engine and close it."""
        for d in list(self.dials):
            d.abort()
        relay = self._relay
        if relay is None:
            return
        relay.poll()  # pairs the engine started or finished since the last wake-up
        for pid in list(self.conns):
            try:
                _, c2u, u2c, _, _ = relay.remove(pid)
            except KeyError:  # finished by the relay thread just now: unregistered
                c2u = u2c = 0
            self._close_conn(self.conns.pop(pid), c2u, u2c, 0)
        for d in list(self.dials):
            d.abort()  # clients of failed native dials collected by the poll above
        self._relay = None
        self._late = None

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
