"""Endpoint health state and selection: round-robin, SRV priority and weight. No I/O, no clock.

Mirrors etcd's tcpproxy `pick()` (server/proxy/tcpproxy/userspace.go) where it is right and
fixes it where it is not:

* `--endpoints` (every remote priority 0, weight 0): plain round-robin in list order over one
  shared counter, skipping inactive remotes (a skipped probe still advances the counter, as
  in Go). Duplicates stay in the list and so get a double share.
* SRV records: RFC 2782. The lowest priority class that has an active remote is used; Go
  ignores priority when the class has only weight-0 records and its weighted pick is off by
  one (weights [1, 1] always give the first). Here the weighted pick is the RFC's running-sum
  selection over [0, total], weight-0 records first, so a weight-0 record gets the "very
  small chance" the RFC asks for; a class whose weights are all 0 is round-robin.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from .config import Endpoint

_TAGS = itertools.count(1)


@dataclass(eq=False)
class Remote:
    """One endpoint and everything known about it; identity is the object (duplicates differ)."""

    endpoint: Endpoint
    active: bool = True
    # Health-check verdict (operations: --health-check=etcd); a remote must be both active
    # (reachable) and healthy to get new clients.
    healthy: bool = True
    removed: bool = False
    last_error: str = ""
    down_since: float | None = None
    # Counters, read by metrics and `etcdgw status`.
    connections_active: int = 0
    connections_total: int = 0
    dial_failures: int = 0
    bytes_to_endpoint: int = 0
    bytes_from_endpoint: int = 0
    # Health-check damping state (consecutive results) and totals.
    checks_ok: int = 0
    checks_failed: int = 0
    health_ok_total: int = 0
    health_failed_total: int = 0
    last_health_error: str = ""
    # Unique for the process: how the relay engine names this remote (native accept).
    tag: int = field(default_factory=lambda: next(_TAGS), repr=False)

    @property
    def addr(self) -> str:
        return self.endpoint.addr

    @property
    def usable(self) -> bool:
        return self.active and self.healthy and not self.removed


class Balancer:
    """Remotes in list order, their state, and the choice of the next one."""

    def __init__(self, endpoints: Iterable[Endpoint], *, rng: random.Random | None = None) -> None:
        self.rng = rng if rng is not None else random.Random()
        self.remotes: list[Remote] = [Remote(ep) for ep in endpoints]
        self._count = 0  # etcd's pickCount: one round-robin counter shared by all picks

    # --- selection ---------------------------------------------------------------------

    def pick(self) -> Remote | None:
        """The remote for the next client, or None when no remote is usable."""
        remotes = self.remotes
        if not remotes:
            return None
        if all(r.endpoint.priority == 0 and r.endpoint.weight == 0 for r in remotes):
            return self._round_robin(remotes)
        best: int | None = None
        for r in remotes:
            if r.usable and (best is None or r.endpoint.priority < best):
                best = r.endpoint.priority
        if best is None:
            return None
        klass = [r for r in remotes if r.usable and r.endpoint.priority == best]
        total = sum(r.endpoint.weight for r in klass)
        if total == 0:
            return self._round_robin(klass)
        zero = [r for r in klass if r.endpoint.weight == 0]
        draw = self.rng.randint(0 if zero else 1, total)
        if draw == 0:
            # The RFC orders weight-0 records first "at random"; rotating through them gives
            # each the same tiny share, 1/(total+1) between them.
            return self._round_robin(zero)
        return weighted_choice(klass, draw)

    def _round_robin(self, remotes: Sequence[Remote]) -> Remote | None:
        n = len(remotes)
        for _ in range(n):
            r = remotes[self._count % n]
            self._count += 1
            if r.usable:
                return r
        return None

    def fallback(self) -> list[Remote]:
        """Remotes to try once more when pick() found none (not removed ones).

        The Go gateway closes clients at once here and keeps refusing them until the next
        --retry-delay tick, even when a member is back (up to a minute after an outage).
        We give each unusable remote one more dial for this client instead.
        """
        return [r for r in self.remotes if not r.removed and not r.usable]

    # --- state -------------------------------------------------------------------------

    def mark_down(self, remote: Remote, error: str, now: float) -> bool:
        """Record a failed dial. Returns True if the remote was active until now."""
        remote.dial_failures += 1
        remote.last_error = error
        if not remote.active:
            return False
        remote.active = False
        remote.down_since = now
        return True

    def mark_up(self, remote: Remote) -> bool:
        """Record a successful dial or probe. Returns True if the remote was inactive."""
        if remote.active:
            return False
        remote.active = True
        remote.down_since = None
        return True

    def inactive(self) -> list[Remote]:
        return [r for r in self.remotes if not r.active and not r.removed]

    def any_usable(self) -> bool:
        return any(r.usable for r in self.remotes)

    def set_endpoints(self, endpoints: Sequence[Endpoint]) -> tuple[list[Remote], list[Remote]]:
        """Replace the endpoint set (SRV refresh, reload), keeping the state of those that stay.

        A remote that leaves is flagged `removed` and dropped from the list: it gets no new
        clients, while connections already relayed to it continue untouched.

        Returns:
            (added, removed) remotes.
        """
        old: dict[tuple[str, int], list[Remote]] = {}
        for r in self.remotes:
            old.setdefault((r.endpoint.host, r.endpoint.port), []).append(r)
        new: list[Remote] = []
        added: list[Remote] = []
        for ep in endpoints:
            same = old.get((ep.host, ep.port))
            if same:
                r = same.pop(0)
                r.endpoint = ep  # priority/weight may have changed
            else:
                r = Remote(ep)
                added.append(r)
            new.append(r)
        removed = [r for rs in old.values() for r in rs]
        for r in removed:
            r.removed = True
        self.remotes = new
        return added, removed


def weighted_choice(klass: Sequence[Remote], draw: int) -> Remote:
    """RFC 2782 selection among the weighted entries: the first whose running sum >= draw.

    Args:
        klass: remotes of one priority class with a positive total weight.
        draw: uniform in [1, total weight] (a draw of 0 goes to the weight-0 records).
    """
    ordered = [r for r in klass if r.endpoint.weight > 0]
    running = 0
    for r in ordered:
        running += r.endpoint.weight
        if running >= draw:
            return r
    return ordered[-1]
