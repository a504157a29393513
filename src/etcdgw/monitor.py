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
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from .balancer import Remote
from .config import ZERO_RETRY_DELAY, format_duration
from .dial import probe_connect

if TYPE_CHECKING:
    from .server import Gateway

__all__ = ["Monitor"]
# --health-check=none: at most one "dial failed" line per endpoint per this many seconds.
NONE_LOG_EVERY = 10.0


class Monitor:
    """Endpoint activation: dial outcomes, the re-probe loop, and their log lines."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self._logged: dict[Remote, float] = {}

    @property
    def probing(self) -> bool:
        return self.gw.cfg.health_check != "none"

    @property
    def interval(self) -> float:
        d = self.gw.cfg.retry_delay
        return d if d > 0 else ZERO_RETRY_DELAY

    def dial_failed(self, remote: Remote, error: str) -> None:
        gw = self.gw
        now = time.monotonic()
        if not self.probing:
            remote.dial_failures += 1
            remote.last_error = error
            if now - self._logged.get(remote, -NONE_LOG_EVERY) >= NONE_LOG_EVERY:
                self._logged[remote] = now
                gw.log.warn(
                    "failed to connect to endpoint; trying the next (--health-check=none)",
                    address=remote.addr,
                    error=error,
                )
            return
        if gw.balancer.mark_down(remote, error, now):
            gw.log.warn(
                "deactivated endpoint",
                address=remote.addr,
                interval=format_duration(self.interval),
                error=error,
            )

    def dial_succeeded(self, remote: Remote) -> None:
        if not remote.removed and not remote.active:
            self.activate(remote)

    def activate(self, remote: Remote, **fields: str) -> None:
        if self.gw.balancer.mark_up(remote):
            self.gw.log.info("activated", address=remote.addr, **fields)

    async def run(self) -> None:
        """Re-probe the inactive endpoints every --retry-delay (read at each round)."""
        while True:
            await asyncio.sleep(self.interval)
            remotes = self.gw.balancer.inactive()
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
            await probe_connect(remote.endpoint, self.gw.addresses, self.gw.cfg.dial_timeout)
        except OSError as e:
            remote.last_error = str(e)
            self.gw.log.warn(
                "failed to activate endpoint (stay inactive for another interval)",
                address=remote.addr,
                interval=format_duration(self.interval),
                error=str(e),
            )
            return
        if not remote.removed:
            self.activate(remote)
