"""--auto-sync-interval: follow the cluster's member list (clientv3's AutoSyncInterval, once
for every client behind the gateway).

# Strategy:
Every interval (and on SIGHUP) ask one endpoint for etcd's `MemberList` over the HTTP/JSON
gateway (`POST /v3/cluster/member/list`, etcd 3.4+), with the health checks' TLS settings
(`health.tls_context`, `health.request`) for https endpoints, and make the members' client
URLs the endpoints through `Gateway.set_endpoints` (source `member-list`): new members get
clients, removed ones get no new clients while their live connections continue.

* Who is asked: the current endpoints (usable ones first), then the seeds (--endpoints or
  the SRV answer), each within --dial-timeout, until one answers. The first sync asks every
  seed at once (bounded), so a seed list that mixes two clusters is found at start.
* What is kept: the first answer's cluster ID. An answer with another cluster ID is
  refused (a list that mixes clusters is a misconfiguration, not a membership change); a
  failed or refused sync keeps the last good member list (logged once per failure streak).
* What is left out: learners (they serve no client requests), members without client URLs
  (added, not started yet), unix:// and unixs:// URLs, and URLs that point back at the
  gateway (the self-loop guard, `discovery.self_check_for`).

The decisions (`parse_member_list`, `first_cluster`) are pure and tested with fixed JSON.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .config import Endpoint, format_duration
from .health import HttpError, request, tls_context

if TYPE_CHECKING:
    import ssl

    from .log import Logger
    from .server import Gateway

__all__ = [
    "MEMBER_LIST_PATH",
    "SOURCE",
    "MemberList",
    "Membership",
    "first_cluster",
    "parse_member_list",
]

# etcd's grpc-gateway route for Cluster.MemberList (3.4 also serves /v3beta and /v3alpha).
MEMBER_LIST_PATH = "/v3/cluster/member/list"
SOURCE = "member-list"
# Seeds asked at once by the first sync.
FIRST_SYNC_CONCURRENCY = 8


# --- decisions (pure) --------------------------------------------------------------------------


@dataclass(frozen=True)
class MemberList:
    """One MemberList answer, reduced to what the gateway uses.

    Attributes:
        cluster_id: header.cluster_id (a decimal uint64, as etcd's JSON writes it).
        endpoints: the client URLs that can take clients, in member order, no duplicates.
        skipped: (member or URL, why) for what was left out.
    """

    cluster_id: str
    endpoints: tuple[Endpoint, ...]
    skipped: tuple[tuple[str, str], ...] = ()


def parse_member_list(body: bytes) -> MemberList:
    """etcd's MemberList JSON -> MemberList.

    `{"header": {"cluster_id": "..."}, "members": [{"ID": "...", "name": "m1",
    "clientURLs": ["http://..."], "isLearner": true}, ...]}`; protobuf JSON leaves out
    false and empty fields (a learner's `isLearner`, a new member's `name` and `clientURLs`).

    Raises:
        ValueError: not a member list (the reason).
    """
    try:
        doc: Any = json.loads(body)
    except ValueError:
        raise ValueError(f"not JSON: {_shown(body)}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"not a member list: {_shown(body)}")
    header = doc.get("header")
    cluster_id = header.get("cluster_id") if isinstance(header, dict) else None
    if not isinstance(cluster_id, str | int) or not str(cluster_id):
        raise ValueError(f"no header.cluster_id: {_shown(body)}")
    members = doc.get("members", [])
    if not isinstance(members, list):
        raise ValueError(f"members is not a list: {_shown(body)}")
    endpoints: list[Endpoint] = []
    seen: set[tuple[str, int]] = set()
    skipped: list[tuple[str, str]] = []
    for m in members:
        if not isinstance(m, dict):
            raise ValueError(f"a member is not an object: {_shown(body)}")
        who = str(m.get("name") or m.get("ID") or "?")
        if m.get("isLearner"):
            skipped.append((who, "learner"))
            continue
        urls = m.get("clientURLs") or []
        if not isinstance(urls, list) or not urls:
            skipped.append((who, "no client URLs (not started)"))
            continue
        for url in urls:
            ep, why = _client_url(str(url))
            if ep is None:
                skipped.append((str(url), why))
            elif (ep.host, ep.port) not in seen:
                seen.add((ep.host, ep.port))
                endpoints.append(ep)
    return MemberList(str(cluster_id), tuple(endpoints), tuple(skipped))


def _client_url(url: str) -> tuple[Endpoint | None, str]:
    """A member's client URL -> (Endpoint, "") or (None, why it is skipped)."""
    try:
        u = urllib.parse.urlsplit(url)
        port = u.port
    except ValueError as e:
        return None, f"invalid URL: {e}"
    if u.scheme in ("unix", "unixs"):
        return None, "unix socket"
    if u.scheme not in ("http", "https"):
        return None, f"unsupported scheme {u.scheme!r}"
    if not u.hostname or port is None:
        return None, "no host:port"
    return Endpoint(u.hostname, port, secure=u.scheme == "https", source=SOURCE), ""


def first_cluster(
    answers: Sequence[MemberList | str],
) -> tuple[int | None, list[int]]:
    """The first sync's rule: the first answer in seed order names the cluster.

    Args:
        answers: per seed, in seed order, its MemberList or why it did not answer.

    Returns:
        (index of the answer to use or None when none answered, indexes of the answers
        from another cluster).
    """
    chosen: int | None = None
    cluster = ""
    others: list[int] = []
    for i, a in enumerate(answers):
        if not isinstance(a, MemberList):
            continue
        if chosen is None:
            chosen, cluster = i, a.cluster_id
        elif a.cluster_id != cluster:
            others.append(i)
    return chosen, others


def _shown(body: bytes) -> str:
    text = body.decode("utf-8", "replace").strip()
    return repr(text if len(text) <= 200 else text[:200] + "...")


# --- the syncer (I/O) ----------------------------------------------------------------------------


class Membership:
    """Follows the member list every `interval` while the gateway runs (run()).

    Raises (from __init__):
        ConfigError: the TLS files of the health checks cannot be loaded.
    """

    def __init__(
        self,
        gw: Gateway,
        log: Logger,
        seeds: Sequence[Endpoint],
        *,
        self_check: Callable[[Endpoint], str | None] = lambda ep: None,
    ) -> None:
        self.gw = gw
        self.log = log
        self.interval = gw.cfg.auto_sync_interval
        self.seeds: tuple[Endpoint, ...] = tuple(seeds)
        self.self_check = self_check
        self.cluster_id: str | None = None
        self.current: tuple[Endpoint, ...] | None = None  # the last good member list
        # Sync results, read by metrics.
        self.ok = 0
        self.failed = 0
        self.refused = 0
        self.last_success: float | None = None  # wall clock
        self._streak = 0  # failed or refused syncs in a row
        self._warned: set[tuple[str, str]] = set()  # (address, reason) logged once
        self._wake = asyncio.Event()
        self._ssl: ssl.SSLContext = tls_context(gw.cfg)

    def set_seeds(self, seeds: Sequence[Endpoint]) -> None:
        """New seeds (an SRV refresh, a reload); asked when the current set does not answer."""
        self.seeds = tuple(seeds)

    def sync_now(self) -> None:
        """Wake run() to sync at once (SIGHUP). Call from the event loop's thread."""
        self._wake.set()

    async def run(self) -> None:
        """Sync now, then every interval, until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.interval
            try:
                await self.sync()
            except Exception as e:  # a bug here must not stop syncing for good
                self._record("failed", f"internal error: {e!r}")
            try:
                await asyncio.wait_for(self._wake.wait(), max(0.0, due - loop.time()))
            except TimeoutError:
                pass
            self._wake.clear()

    async def sync(self) -> str:
        """One sync. Returns its result: ok, failed or refused."""
        if self.cluster_id is None:
            result, error = await self._first_sync()
        else:
            result, error = await self._follow()
        self._record(result, error)
        return result

    async def _first_sync(self) -> tuple[str, str]:
        sem = asyncio.Semaphore(FIRST_SYNC_CONCURRENCY)

        async def one(ep: Endpoint) -> MemberList | str:
            async with sem:
                try:
                    return await self._ask(ep)
                except HttpError as e:
                    return str(e)

        seeds = self.seeds
        answers = await asyncio.gather(*(one(ep) for ep in seeds))
        chosen, others = first_cluster(answers)
        if chosen is None:
            errors = [a for a in answers if isinstance(a, str)]
            return "failed", "; ".join(errors) or "no seeds"
        ml = answers[chosen]
        assert isinstance(ml, MemberList)
        if others:
            self.log.error(
                "seed endpoints belong to another etcd cluster; ignored",
                **{
                    "cluster-id": ml.cluster_id,
                    "cluster-seed": seeds[chosen].addr,
                    "other-seeds": [seeds[i].addr for i in others],
                    "other-cluster-ids": [
                        a.cluster_id for i in others if isinstance(a := answers[i], MemberList)
                    ],
                },
            )
        self.cluster_id = ml.cluster_id
        self.log.info(
            "following the cluster's member list",
            **{
                "cluster-id": ml.cluster_id,
                "seed": seeds[chosen].addr,
                "interval": format_duration(self.interval),
            },
        )
        return await self._apply(ml, seeds[chosen])

    async def _follow(self) -> tuple[str, str]:
        errors: list[str] = []
        refused = False
        for ep in self._candidates():
            try:
                ml = await self._ask(ep)
            except HttpError as e:
                errors.append(str(e))
                continue
            if ml.cluster_id != self.cluster_id:
                refused = True
                msg = f"{ep.addr}: cluster ID {ml.cluster_id}, not {self.cluster_id}"
                errors.append(msg)
                if (ep.addr, ml.cluster_id) not in self._warned:
                    self._warned.add((ep.addr, ml.cluster_id))
                    self.log.error(
                        "refused a member list from another etcd cluster",
                        address=ep.addr,
                        **{"cluster-id": ml.cluster_id, "expected-cluster-id": self.cluster_id},
                    )
                continue
            return await self._apply(ml, ep)
        return ("refused" if refused else "failed"), "; ".join(errors) or "no endpoints"

    def _candidates(self) -> list[Endpoint]:
        """Who to ask, in order: usable current endpoints, the other current ones, seeds."""
        remotes = self.gw.balancer.remotes
        order = [r.endpoint for r in remotes if r.usable]
        order += [r.endpoint for r in remotes if not r.usable and not r.removed]
        order += self.seeds
        out: list[Endpoint] = []
        seen: set[tuple[str, int]] = set()
        for ep in order:
            if (ep.host, ep.port) not in seen:
                seen.add((ep.host, ep.port))
                out.append(ep)
        return out

    async def _ask(self, ep: Endpoint) -> MemberList:
        """The member list as ep sees it, within --dial-timeout (lookup, then request).

        Raises:
            HttpError: no usable answer, with the reason.
        """
        timeout = self.gw.cfg.dial_timeout
        scheme = "https" if ep.secure else "http"
        where = f"POST {scheme}://{ep.addr}{MEMBER_LIST_PATH}"
        try:
            addrs = await asyncio.wait_for(self.gw.addresses.resolve(ep.host), timeout)
        except (TimeoutError, OSError) as e:
            why = "i/o timeout" if isinstance(e, TimeoutError) else str(e)
            raise HttpError(f"{where}: lookup {ep.host}: {why}") from None
        status, reason, body = await request(
            ep,
            addrs,
            timeout=timeout,
            ssl_context=self._ssl,
            method="POST",
            path=MEMBER_LIST_PATH,
            body=b"{}",
        )
        if status != 200:
            raise HttpError(f"{where}: {status} {reason}: {_shown(body)}")
        try:
            return parse_member_list(body)
        except ValueError as e:
            raise HttpError(f"{where}: {e}") from None

    async def _apply(self, ml: MemberList, source: Endpoint) -> tuple[str, str]:
        """Make ml's endpoints the gateway's (minus self-pointing ones)."""
        for what, why in ml.skipped:
            if (what, why) not in self._warned:
                self._warned.add((what, why))
                self.log.info("member left out", member=what, reason=why)
        # The self-loop guard resolves names (blocking): off the loop.
        verdicts = await asyncio.to_thread(lambda: [self.self_check(ep) for ep in ml.endpoints])
        kept: list[Endpoint] = []
        for ep, verdict in zip(ml.endpoints, verdicts, strict=True):
            if verdict is None:
                kept.append(ep)
            elif (ep.addr, verdict) not in self._warned:
                self._warned.add((ep.addr, verdict))
                self.log.warn("dropped member client URL", address=ep.addr, reason=verdict)
        if not kept:
            return "failed", f"the member list from {source.addr} has no usable client URL"
        self.current = tuple(kept)
        self.gw.set_endpoints(kept, source=SOURCE)
        return "ok", ""

    def _record(self, result: str, error: str) -> None:
        if result == "ok":
            self.ok += 1
            self.last_success = time.time()
            if self._streak:
                self.log.info("member sync recovered", failures=self._streak)
            self._streak = 0
            return
        if result == "refused":
            self.refused += 1
        else:
            self.failed += 1
        self._streak += 1
        if self._streak == 1:
            kept = self.current if self.current is not None else self.seeds
            self.log.warn(
                "member sync failed; keeping the last good endpoints",
                error=error,
                endpoints=[ep.addr for ep in kept],
            )
        else:
            self.log.debug("member sync failed", error=error, failures=self._streak)

    def status(self) -> dict[str, Any]:
        """What /status shows of the syncs."""
        return {
            "interval_seconds": self.interval,
            "cluster_id": self.cluster_id or "",
            "ok": self.ok,
            "failed": self.failed,
            "refused": self.refused,
            "last_success_seconds_ago": (
                round(time.time() - self.last_success, 3) if self.last_success else None
            ),
            "seeds": [ep.addr for ep in self.seeds],
        }
