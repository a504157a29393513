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
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field

from .config import Endpoint

_TAGS = itertools.count(1)
_MASK = (1 << 64) - 1
# xorshift64* (Vigna): the generator of SRV weighted draws, here and in _relay.pyx `_rand`;
# DEFAULT_SEED is its seed there too (the one owner).
_XS_MUL = 2685821657736338717
DEFAULT_SEED = 0x9E3779B97F4A7C15


@dataclass(eq=False)
class Remote:
    """One endpoint and everything known about it; identity is the object (duplicates differ)."""

    endpoint: Endpoint
    active: bool = True
    # Health-check verdict (operations: --health-check=etcd); a remote must be both active
    # (reachable) and healthy to get new clients.
    healthy: bool = True
    removed: bool = False
    # --balance=least-connections: set aside for a pause after its fresh connections failed
    # (monitor.py decides when and for how long); `strikes` counts them in a row.
    aside: bool = False
    strikes: int = 0
    last_error: str = ""
    down_since: float | None = None
    # Counters, read by metrics and `etcdgw status`.
    connections_active: int = 0
    dialing: int = 0  # clients being connected to it by the loop (least-connections)
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
    def live(self) -> int:
        """Connections that count for least-connections: relayed and being dialled."""
        return self.connections_active + self.dialing

    @property
    def usable(self) -> bool:
        return self.active and self.healthy and not self.removed and not self.aside


class Selector:
    """The selection rule, written once in Python (the specification) and mirrored in C.

    `_relay.pyx` (`_pick`, `_round_robin`, `_rand`) repeats it for the relay thread, which
    must choose without the GIL; tests/test_selection.py feeds both the same targets,
    priorities, weights, usable flags and seeds and demands the same sequence of choices.
    Change one, change the other.

    State: the round-robin counter (etcd's pickCount, shared by every pick) and the
    xorshift64* state of the weighted draws.

    Two rules (--balance):
    * round-robin (etcd's): see the module docstring.
    * least-connections: within the lowest priority class that has a usable target, the
      target with the fewest live connections; when the class has SRV weights, the lowest
      (live + 1) / weight among its weighted targets (HAProxy's leastconn, which prefers the
      heavier of two idle servers); ties go round-robin over the shared counter.
    """

    __slots__ = ("rr", "rng", "least")

    def __init__(self, seed: int = DEFAULT_SEED, rr: int = 0, *, least: bool = False) -> None:
        self.rr = rr & _MASK
        self.rng = (seed & _MASK) or DEFAULT_SEED  # xorshift must not start at 0
        self.least = least

    def rand(self) -> int:
        x = self.rng
        x ^= x >> 12
        x ^= (x << 25) & _MASK
        x ^= x >> 27
        self.rng = x
        return (x * _XS_MUL) & _MASK

    def pick(self, targets: Sequence[tuple[int, int, bool, int]]) -> int:
        """The index of the target for the next client, or -1 when none is usable.

        targets: (priority, weight, usable, live connections) in list order.
        """
        if not targets:
            return -1
        if self.least:
            return self._least(targets)
        if all(t[0] == 0 and t[1] == 0 for t in targets):
            return self._round_robin(targets, range(len(targets)))
        usable = [i for i, t in enumerate(targets) if t[2]]
        if not usable:
            return -1
        best = min(targets[i][0] for i in usable)
        klass = [i for i in usable if targets[i][0] == best]
        total = sum(targets[i][1] for i in klass)
        if total == 0:
            return self._round_robin(targets, klass)
        zero = [i for i in klass if targets[i][1] == 0]
        lo = 0 if zero else 1
        draw = lo + self.rand() % (total - lo + 1)
        if draw == 0:
            # The RFC orders weight-0 records first "at random"; rotating through them gives
            # each the same tiny share, 1/(total+1) between them.
            return self._round_robin(targets, zero)
        running, last = 0, -1
        for i in klass:
            w = targets[i][1]
            if w > 0:
                running += w
                last = i
                if running >= draw:
                    return i
        return last

    def _least(self, targets: Sequence[tuple[int, int, bool, int]]) -> int:
        usable = [i for i, t in enumerate(targets) if t[2]]
        if not usable:
            return -1
        best = min(targets[i][0] for i in usable)
        klass = [i for i in usable if targets[i][0] == best]
        if any(targets[i][1] > 0 for i in klass):
            # (live + 1) / weight, compared as fractions: a * wb < b * wa.
            members = [i for i in klass if targets[i][1] > 0]
            lo = members[0]
            for i in members[1:]:
                if (targets[i][3] + 1) * targets[lo][1] < (targets[lo][3] + 1) * targets[i][1]:
                    lo = i
            tied = [
                i
                for i in members
                if (targets[i][3] + 1) * targets[lo][1] == (targets[lo][3] + 1) * targets[i][1]
            ]
        else:
            fewest = min(targets[i][3] for i in klass)
            tied = [i for i in klass if targets[i][3] == fewest]
        i = tied[self.rr % len(tied)]
        self.rr = (self.rr + 1) & _MASK
        return i

    def _round_robin(
        self, targets: Sequence[tuple[int, int, bool, int]], members: Sequence[int]
    ) -> int:
        n = len(members)
        for _ in range(n):
            i = members[self.rr % n]
            self.rr = (self.rr + 1) & _MASK
            if targets[i][2]:
                return i
        return -1


class Balancer:
    """The one owner of endpoint state: remotes in list order, what is known of each, and
    the choice of the next one.

    Every change to what decides selection (active, healthy, removed, the list itself) goes
    through a method here and raises the one change signal, `on_change`; whoever mirrors
    the state elsewhere (the relay thread's targets) listens there and nowhere else.
    Connection counts are kept here too, but do not signal: they change per connection.
    """

    def __init__(
        self, endpoints: Iterable[Endpoint], *, seed: int = DEFAULT_SEED, least: bool = False
    ) -> None:
        self.selector = Selector(seed, least=least)
        self.remotes: list[Remote] = [Remote(ep) for ep in endpoints]
        self.on_change: Callable[[], None] | None = None
        # Native accept: the relay thread picks with its own copy of the rule and its own
        # counter; while it runs, pick() asks it (`Engine.pick`), so there is one counter.
        self.delegate: Callable[[Sequence[int]], int] | None = None
        # The remotes the relay engine may report on, by tag: the current ones, and removed
        # ones until prune() (their connections go on; a report may still name them).
        self._by_tag: dict[int, Remote] = {r.tag: r for r in self.remotes}
        # The removed ones among them, oldest first: revived if listed again, else pruned.
        self._removed: dict[int, Remote] = {}
        # The selector's input, kept until a change (round-robin reads no live counts).
        self._view: list[tuple[int, int, bool, int]] | None = None

    # --- selection ---------------------------------------------------------------------

    def pick(self, exclude: Collection[Remote] = ()) -> Remote | None:
        """The remote for the next client, or None when no remote is usable.

        exclude: remotes this client was already sent to (a dial tries each once); they
        count as unusable for this pick.
        """
        if self.delegate is not None:
            tag = self.delegate([r.tag for r in exclude])
            return self.by_tag(tag) if tag >= 0 else None
        view = self._view
        if self.selector.least or exclude:
            view = [
                (r.endpoint.priority, r.endpoint.weight, r.usable and r not in exclude, r.live)
                for r in self.remotes
            ]
        elif view is None:
            view = [(r.endpoint.priority, r.endpoint.weight, r.usable, 0) for r in self.remotes]
            self._view = view
        i = self.selector.pick(view)
        return self.remotes[i] if i >= 0 else None

    def by_tag(self, tag: int) -> Remote | None:
        """The remote the relay engine calls `tag` (current, or removed and not pruned)."""
        return self._by_tag.get(tag)

    def fallback(self) -> list[Remote]:
        """Remotes to try once more when pick() found none (not removed ones).

        The Go gateway closes clients at once here and keeps refusing them until the next
        --retry-delay tick, even when a member is back (up to a minute after an outage).
        We give each unusable remote one more dial for this client instead.
        """
        return [r for r in self.remotes if not r.removed and not r.usable]

    # --- state -------------------------------------------------------------------------

    def changed(self) -> None:
        """Raise the change signal (also for state outside: a host's new addresses)."""
        self._view = None
        if self.on_change is not None:
            self.on_change()

    def dial_failed(self, remote: Remote, error: str) -> None:
        """Record a failed dial that changes no state (--health-check=none)."""
        remote.dial_failures += 1
        remote.last_error = error

    def note_error(self, remote: Remote, error: str) -> None:
        """The last error seen for remote (a failed re-probe), shown by /status."""
        remote.last_error = error

    def strike(self, remote: Remote) -> int:
        """One more failed fresh connection (least-connections); the strikes so far."""
        remote.strikes += 1
        return remote.strikes

    def clear_strikes(self, remote: Remote) -> None:
        remote.strikes = 0

    def dialing(self, remote: Remote, n: int) -> None:
        """n more (or, negative, fewer) clients being connected to remote (Remote.live)."""
        remote.dialing += n

    def mark_down(self, remote: Remote, error: str, now: float) -> bool:
        """Record a failed dial. Returns True if the remote was active until now."""
        self.dial_failed(remote, error)
        if not remote.active:
            return False
        remote.active = False
        remote.down_since = now
        self.changed()
        return True

    def mark_up(self, remote: Remote) -> bool:
        """Record a successful dial or probe. Returns True if the remote was inactive."""
        if remote.active:
            return False
        remote.active = True
        remote.down_since = None
        self.changed()
        return True

    def set_aside(self, remote: Remote, aside: bool) -> bool:
        """Set a remote aside from least-connections' picks, or back. True if it changed."""
        if remote.aside == aside:
            return False
        remote.aside = aside
        self.changed()
        return True

    def set_least(self, least: bool) -> None:
        """--balance: least-connections (True) or round-robin (etcd's, False)."""
        if self.selector.least != least:
            self.selector.least = least
            if not least:  # set aside only for least-connections' sake
                for r in self.remotes:
                    r.aside = False
                    r.strikes = 0
            self.changed()

    def set_healthy(self, remote: Remote, healthy: bool) -> bool:
        """Record a health verdict (health.py decides it). Returns True if it changed."""
        if remote.healthy == healthy:
            return False
        remote.healthy = healthy
        self.changed()
        return True

    def opened(self, remote: Remote, n: int = 1) -> None:
        """n connections to remote started relaying."""
        remote.connections_active += n
        remote.connections_total += n

    def closed(self, remote: Remote, c2u: int, u2c: int) -> None:
        """A relayed connection to remote finished after moving these bytes."""
        remote.connections_active -= 1
        remote.bytes_to_endpoint += c2u
        remote.bytes_from_endpoint += u2c

    def handed_out(self, remote: Remote) -> None:
        """A live connection to remote left this process (a live upgrade's hand-over)."""
        remote.connections_active -= 1

    def opened_and_closed(self, remote: Remote, n: int, c2u: int, u2c: int) -> None:
        """n connections to remote opened and closed between two looks (native accept)."""
        remote.connections_total += n
        remote.bytes_to_endpoint += c2u
        remote.bytes_from_endpoint += u2c

    def inactive(self) -> list[Remote]:
        return [r for r in self.remotes if not r.active and not r.removed]

    def any_usable(self) -> bool:
        return any(r.usable for r in self.remotes)

    def set_endpoints(self, endpoints: Sequence[Endpoint]) -> tuple[list[Remote], list[Remote]]:
        """Replace the endpoint set (SRV refresh, reload, member list), keeping the state of
        those that stay.

        A remote that leaves is flagged `removed` and dropped from the list: it gets no new
        clients, while connections already relayed to it continue untouched. Listed again
        before prune() forgot it (a member-list flap), it comes back as it was: the same
        tag and counts, so least-connections still sees its live connections, here and in
        the relay thread (which keeps a removed tag's count while it has live pairs).

        Returns:
            (added, removed) remotes; added includes revived ones.
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
            else:
                r = self._revive(ep) or Remote(ep)
                self._by_tag[r.tag] = r
                added.append(r)
            r.endpoint = ep  # priority/weight may have changed
            new.append(r)
        removed = [r for rs in old.values() for r in rs]
        for r in removed:
            r.removed = True
            self._removed[r.tag] = r
        self.remotes = new
        self.changed()
        return added, removed

    def stranger(self, ep: Endpoint) -> Remote:
        """A remote for live connections to an endpoint not in the list (a live upgrade's
        pair whose endpoint the new configuration dropped): removed, as after a reload, so
        it gets no clients and is pruned once its connections end."""
        for r in self._removed.values():
            if (r.endpoint.host, r.endpoint.port) == (ep.host, ep.port):
                return r
        r = Remote(ep, removed=True)
        self._by_tag[r.tag] = r
        self._removed[r.tag] = r
        return r

    def _revive(self, ep: Endpoint) -> Remote | None:
        for tag, r in self._removed.items():
            if (r.endpoint.host, r.endpoint.port) == (ep.host, ep.port):
                del self._removed[tag]
                r.removed = False
                return r
        return None

    def prune(self) -> list[Remote]:
        """Forget the removed remotes that hold no live connection; returns them.

        Call it only after a report cycle of the relay engine that began after the last
        set_endpoints() (server.Gateway.collect_now()). Then the engine says nothing more
        of a pruned remote's tag: it was told the new targets at once (set_endpoints()
        raises the change signal, accept.NativeAccept.sync sets them), so it picks that tag
        no more and hands back the clients it was still connecting to it; what it connected
        or finished before is in that report (`started`, `short`, `failed`); and a pair that
        is still live holds its remote (live > 0) until it finishes, which is reported by
        pair id, not by tag. A pruned remote listed again is a new one (new tag, no counts).
        """
        gone = [r for r in self._removed.values() if r.live == 0]
        for r in gone:
            del self._removed[r.tag]
            del self._by_tag[r.tag]
        return gone
