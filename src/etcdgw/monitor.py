"""What a dial's outcome means for an endpoint, and the --retry-delay re-probe.

etcd's tcpproxy marks an endpoint inactive when a dial to it fails (`deactivated endpoint`)
and re-probes the inactive ones every --retry-delay (`activated` / `failed to activate
endpoint (stay inactive for another interval)`); that is --health-check=tcp (the default)
and --health-check=etcd, whose active checks (health.py) come on top.

--health-check=none probes nothing: no re-probe, no active check, and a failed dial does
not take an endpoint out of rotation (it would never come back without a probe). Each
client whose dial fails is connected to the next endpoint instead, as HAProxy does for a
server without `check`: a dead member costs its share of clients one failed dial each
(fast when it refuses, --dial-timeout when it is silent). Turning it on by a reload brings
every endpoint back into rotation.

--balance=least-connections sends each new client to the endpoint with the fewest live
connections, and an endpoint whose connections fail at once holds none: a dead member
(under `none`, where a failed dial does not deactivate it) or one that accepts and closes
at once (a stuck process behind a port forwarder; its TCP re-probe passes) would get nearly
every new client. So, for least-connections, a fresh connection that fails is a strike (a
failed dial; a relayed connection the endpoint ended within IMMEDIATE seconds without
sending a byte, after the client had sent some: HAProxy's `observe layer4` idea): the
endpoint is set aside (no new clients while another is usable) for ASIDE_MIN seconds,
doubling with each strike in a row up to ASIDE_MAX, then gets clients again. A connection
that received bytes from it ends the streak. Clients that send nothing do not count, so a
port scanner or a TCP liveness probe of the gateway cannot set a member aside.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from .balancer import Balancer, Remote
from .config import ZERO_RETRY_DELAY
from .dial import OwnAddresses, probe_connect
from .golang import format_duration
from .log import Logger
from .resolver import AddressBook
from .settings import Settings

__all__ = ["Monitor"]
# --health-check=none: at most one "dial failed" line per endpoint per this many seconds.
NONE_LOG_EVERY = 10.0
# least-connections: a connection the endpoint ended this soon, silent, is a strike.
IMMEDIATE = 1.0
# least-connections: the pause of an endpoint set aside, per strike in a row (seconds).
ASIDE_MIN = 0.5
ASIDE_MAX = 30.0


class Monitor:
    """Endpoint activation: dial outcomes, the re-probe loop, and their log lines.

    Args:
        balancer: where an endpoint is marked down, up, or set aside.
        settings: the configuration in force (--health-check, --retry-delay,
            --dial-timeout), read at each use.
        log: its lines (`deactivated endpoint`, `activated`, ...).
        addresses, own: for the TCP re-probe (host names; never the gateway's own address).
        clock: monotonic seconds (when an endpoint went down; log rate limits). The
            set-aside timers run on the running asyncio loop.
    """

    def __init__(
        self,
        balancer: Balancer,
        settings: Settings,
        log: Logger,
        addresses: AddressBook,
        own: OwnAddresses,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.balancer = balancer
        self.settings = settings
        self.log = log
        self.addresses = addresses
        self.own = own
        self.clock = clock
        self._logged: dict[Remote, float] = {}
        self._aside: dict[Remote, asyncio.TimerHandle] = {}

    @property
    def probing(self) -> bool:
        return self.settings.cfg.health_check != "none"

    @property
    def interval(self) -> float:
        d = self.settings.cfg.retry_delay
        return d if d > 0 else ZERO_RETRY_DELAY

    def dial_failed(self, remote: Remote, error: str) -> None:
        now = self.clock()
        if not self.probing:
            self.balancer.dial_failed(remote, error)
            self.strike(remote, error)
            if self._may_log(remote):
                self.log.warn(
                    "failed to connect to endpoint; trying the next (--health-check=none)",
                    address=remote.addr,
                    error=error,
                )
            return
        if self.balancer.mark_down(remote, error, now):
            self.log.warn(
                "deactivated endpoint",
                address=remote.addr,
                interval=format_duration(self.interval),
                error=error,
            )

    def closed(self, remote: Remote, pairs: int, silent: int, answered: bool) -> None:
        """pairs of remote's connections ended: silent of them at once with no byte from it
        (the client had sent some); answered: at least one received bytes from it."""
        if answered:
            self.balancer.clear_strikes(remote)
        elif silent:
            self.strike(remote, "closed the connection at once without answering")

    def strike(self, remote: Remote, error: str) -> None:
        """A fresh connection to remote failed: least-connections sets it aside a while."""
        if not self.balancer.selector.least or remote.removed:
            return
        strikes = self.balancer.strike(remote)
        if remote.aside:
            return  # a client picked before it was set aside: the pause runs already
        pause = min(ASIDE_MIN * 2 ** min(strikes - 1, 16), ASIDE_MAX)
        self.balancer.set_aside(remote, True)
        old = self._aside.pop(remote, None)
        if old is not None:
            old.cancel()
        loop = asyncio.get_running_loop()  # strikes come from the loop's callbacks
        self._aside[remote] = loop.call_later(pause, self._back, remote)
        # The first strike of a streak and each doubling after it (the pause it got), so a
        # long streak shows without a line per strike.
        if remote.strikes & (remote.strikes - 1) == 0 and self._may_log(remote, force=True):
            self.log.warn(
                "endpoint set aside (least-connections)",
                address=remote.addr,
                pause=format_duration(pause),
                strikes=remote.strikes,
                error=error,
            )

    def _may_log(self, remote: Remote, *, force: bool = False) -> bool:
        """At most one line per endpoint per NONE_LOG_EVERY unless forced (the record of
        when each was logged stays bounded)."""
        now = self.clock()
        if not force and now - self._logged.get(remote, -NONE_LOG_EVERY) < NONE_LOG_EVERY:
            return False
        if len(self._logged) >= 256:
            self._logged = {r: t for r, t in self._logged.items() if now - t < NONE_LOG_EVERY}
        self._logged[remote] = now
        return True

    def _back(self, remote: Remote) -> None:
        self._aside.pop(remote, None)
        self.balancer.set_aside(remote, False)

    def close(self) -> None:
        for h in self._aside.values():
            h.cancel()
        self._aside.clear()

    def dial_succeeded(self, remote: Remote) -> None:
        if not remote.removed and not remote.active:
            self.activate(remote)

    def activate(self, remote: Remote, **fields: str) -> None:
        if self.balancer.mark_up(remote):
            self.log.info("activated", address=remote.addr, **fields)

    async def run(self) -> None:
        """Re-probe the inactive endpoints every --retry-delay (read at each round)."""
        while True:
            await asyncio.sleep(self.interval)
            remotes = self.balancer.inactive()
            if not remotes:
                continue
            if not self.probing:
                # A reload switched probing off: nothing would bring these back.
                for r in remotes:
                    self.activate(r, reason="checks off")
                continue
            await asyncio.gather(*(self._probe(r) for r in remotes))

    async def _probe(self, remote: Remote) -> None:
        try:
            await probe_connect(
                remote.endpoint, self.addresses, self.settings.cfg.dial_timeout, self.own
            )
        except OSError as e:
            # probe_connect's OSError(errno, text) carries Go's text; str() would put
            # Python's "[Errno 111] " before it.
            error = e.strerror if e.strerror else str(e)
            self.balancer.note_error(remote, error)
            self.log.warn(
                "failed to activate endpoint (stay inactive for another interval)",
                address=remote.addr,
                interval=format_duration(self.interval),
                error=error,
            )
            return
        if not remote.removed:
            self.activate(remote)
