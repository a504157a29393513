"""--auto-sync-interval: follow the cluster's member list (clientv3's AutoSyncInterval, once
for every client behind the gateway).

# Strategy:
Every interval (and on SIGHUP) ask one endpoint for etcd's `MemberList` over the HTTP/JSON
gateway (`POST /v3/cluster/member/list`, etcd 3.4+), with the health checks' TLS settings
(`health.tls_context`, `httpclient.request`) for https endpoints, and make the members' client
URLs the endpoints through the gateway's `set_endpoints` (source `member-list`): new members get
clients, removed ones get no new clients while their live connections continue.

* Who is asked: the current endpoints (usable ones first), then the seeds (--endpoints or
  the SRV answer), each within --dial-timeout, until one gives a usable list. Whatever goes
  wrong with one member (no answer, an answer that is not a member list, one without a
  usable client URL) is that member's failure, logged once per failure streak of that
  member, and the next one is asked. The first sync asks every seed at once (bounded), so
  a seed list that mixes two clusters is found at start.
* What is kept: the first usable answer's cluster ID. An answer with another cluster ID is
  refused (a list that mixes clusters is a misconfiguration, not a membership change); a
  failed or refused sync keeps the last good member list (logged once per failure streak).
* What is left out: learners (they serve no client requests), members without client URLs
  (added, not started yet), unix:// and unixs:// URLs, URLs that fail the checks of
  --endpoints (port 1-65535, a valid host name), and URLs that point back at the gateway
  (the self-loop guard, `discovery.self_check_for`: --listen-addr and --metrics-addr).
* Bounds: an answer is read up to MAX_MEMBER_LIST bytes and may list MAX_MEMBERS members
  and MAX_CLIENT_URLS client URLs; the self-loop guard resolves names in daemon threads
  (shutdown waits for none), all at once, within SELF_CHECK_DEADLINE; a whole sync has
  SYNC_DEADLINE. What is logged per sync is bounded: left-out and dropped URLs are logged
  when they are new since the last applied list, one line each up to LOG_ONE_BY_ONE, else
  one summary line.

The decisions (`parse_member_list`, `first_cluster`) are pure and tested with fixed JSON.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from .config import Endpoint, host_error, parse_port, split_host_port
from .golang import format_duration
from .health import tls_context
from .httpclient import HttpError, request
from .resolver import LOOKUP_TIMEOUT

if TYPE_CHECKING:
    import ssl

    from .balancer import Balancer
    from .log import Logger
    from .resolver import AddressBook
    from .settings import Settings

__all__ = [
    "MAX_CLIENT_URLS",
    "MAX_MEMBERS",
    "MAX_MEMBER_LIST",
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
# New failing members logged one by one per sync; more are summed in one line.
FAIL_LINES_PER_SYNC = 3
# Seeds asked at once by the first sync.
FIRST_SYNC_CONCURRENCY = 8
# The member list's own bounds (not /health's 4 KiB): a member takes ~150-250 bytes of JSON,
# so 1 MiB is thousands of members; etcd clusters have 3-9 (and raft stops scaling long
# before 256). Past them the answer is that member's failure.
MAX_MEMBER_LIST = 1 << 20
MAX_MEMBERS = 256
MAX_CLIENT_URLS = 1024  # in all members together
# The self-loop guard resolves each member host name (host_resolver: A, then AAAA, each
# within LOOKUP_TIMEOUT): past this a name's check has failed, and its URL is dropped.
SELF_CHECK_DEADLINE = 2 * LOOKUP_TIMEOUT + 1.0
SELF_CHECK_THREADS = 16  # lookups in flight at once, abandoned ones included
# A whole sync: asking members one after another, then the self-loop guard.
SYNC_DEADLINE = 30.0
LOG_ONE_BY_ONE = 3  # new left-out or dropped URLs logged one per line; more: one summary
_SHOWN = 200  # characters of a member's text shown in a log line


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
    A client URL must pass the checks of --endpoints (`config.parse_endpoint`: a host name
    or IP, a port 1-65535); userinfo is ignored (clientv3 dials the URL's host), an IPv6
    zone is written `[fe80::1%25eth0]` (RFC 6874).

    Raises:
        ValueError: not a usable member list (the reason); the only exception it raises,
            whatever the body (tests/test_fuzz_members.py).
    """
    if len(body) > MAX_MEMBER_LIST:
        raise ValueError(f"member list larger than {MAX_MEMBER_LIST} bytes")
    try:
        doc: Any = json.loads(body)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        deep = " (nested too deeply)" if isinstance(e, RecursionError) else ""
        raise ValueError(f"not JSON{deep}: {_shown(body)}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"not a member list: {_shown(body)}")
    header = doc.get("header")
    cluster_id = header.get("cluster_id") if isinstance(header, dict) else None
    if isinstance(cluster_id, int) and not isinstance(cluster_id, bool) and cluster_id >= 0:
        cluster_id = str(cluster_id)
    if not isinstance(cluster_id, str) or not cluster_id or len(cluster_id) > _SHOWN:
        raise ValueError(f"no header.cluster_id: {_shown(body)}")
    members = doc.get("members", [])
    if not isinstance(members, list):
        raise ValueError(f"members is not a list: {_shown(body)}")
    if len(members) > MAX_MEMBERS:
        raise ValueError(f"more than {MAX_MEMBERS} members ({len(members)})")
    if not all(isinstance(m, dict) for m in members):
        raise ValueError(f"a member is not an object: {_shown(body)}")
    nurls = sum(len(u) for m in members if isinstance(u := m.get("clientURLs"), list))
    if nurls > MAX_CLIENT_URLS:
        raise ValueError(f"more than {MAX_CLIENT_URLS} client URLs ({nurls})")
    endpoints: list[Endpoint] = []
    seen: set[tuple[str, int]] = set()
    skipped: list[tuple[str, str]] = []
    for m in members:
        who = _text(m.get("name")) or _text(m.get("ID")) or "?"
        learner = m.get("isLearner", False)
        if learner is not False and learner is not True:
            skipped.append((who, "isLearner is not a boolean"))
            continue
        if learner:
            skipped.append((who, "learner"))
            continue
        urls = m.get("clientURLs") or []
        if not isinstance(urls, list) or not urls:
            skipped.append((who, "no client URLs (not started)"))
            continue
        for url in urls:
            if not isinstance(url, str):
                skipped.append((who, f"a client URL is not a string ({type(url).__name__})"))
                continue
            ep, why = _client_url(url)
            if ep is None:
                skipped.append((_text(url), why))
            elif (ep.host, ep.port) not in seen:
                seen.add((ep.host, ep.port))
                endpoints.append(ep)
    return MemberList(cluster_id, tuple(endpoints), tuple(skipped))


def _client_url(url: str) -> tuple[Endpoint | None, str]:
    """A member's client URL -> (Endpoint, "") or (None, why it is skipped)."""
    try:
        u = urllib.parse.urlsplit(url)
    except ValueError as e:
        return None, f"invalid URL: {e}"
    if u.scheme in ("unix", "unixs"):
        return None, "unix socket"
    if u.scheme not in ("http", "https"):
        return None, f"unsupported scheme {_text(u.scheme)!r}"
    # The checks of --endpoints (config.parse_endpoint), on the URL's host:port.
    hostport = u.netloc.rpartition("@")[2]  # userinfo is not part of the address
    try:
        host, port_text = split_host_port(hostport)
    except ValueError:
        return None, "no host:port"
    try:
        port = parse_port(port_text)
    except ValueError as e:
        return None, str(e)
    if "%" in host:
        # An IPv6 zone: `%25` in a URL (RFC 6874), `%` in an address.
        ip, _, zone = host.replace("%25", "%", 1).partition("%")
        if ":" not in ip or not zone or "%" in zone:
            return None, "invalid host name (a zone is only for an IPv6 address)"
        host = f"{ip}%{zone}"
    if not host:
        return None, "missing host"
    if (why := host_error(host)) is not None:
        return None, why
    return Endpoint(host, port, secure=u.scheme == "https", source=SOURCE), ""


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
    text = body[: _SHOWN * 4].decode("utf-8", "replace").strip()
    return repr(text if len(text) <= _SHOWN else text[:_SHOWN] + "...")


def _text(v: object) -> str:
    """A member's name, ID or URL as shown in logs: only a string or a number, cut short."""
    if isinstance(v, bool) or not isinstance(v, str | int):
        return ""
    t = v if isinstance(v, str) else str(v) if v.bit_length() < 1000 else "<a huge number>"
    return t if len(t) <= _SHOWN else t[:_SHOWN] + "..."


# --- the syncer (I/O) ----------------------------------------------------------------------------

_Key = tuple[str, int]  # (host, port): what the self-loop guard's verdict depends on


class SetEndpoints(Protocol):
    """Replaces the gateway's endpoint set (`Gateway.set_endpoints`)."""

    def __call__(self, endpoints: Sequence[Endpoint], source: str | None = None) -> None: ...


class Membership:
    """Follows the member list every `interval` while the gateway runs (run()).

    Args:
        settings: the configuration in force (--auto-sync-interval at construction,
            --dial-timeout at each request, the health checks' TLS files).
        balancer: the current endpoints (who is asked first); prunes the ones gone.
        addresses: the members' host names, resolved as on the connect path.
        set_endpoints: makes a member list the gateway's endpoints
            (`Gateway.set_endpoints`, called with source=`member-list`).
        collect_now: takes in what the engine has to report before pruning
            (`Gateway.collect_now`).
        log: sync failures and what is left out.
        seeds: asked when the current endpoints do not answer.
        self_check: the self-loop guard (`discovery.self_check_for`).

    Raises (from __init__):
        ConfigError: the TLS files of the health checks cannot be loaded.
    """

    def __init__(
        self,
        settings: Settings,
        balancer: Balancer,
        addresses: AddressBook,
        set_endpoints: SetEndpoints,
        collect_now: Callable[[], None],
        log: Logger,
        seeds: Sequence[Endpoint],
        *,
        self_check: Callable[[Endpoint], str | None] = lambda ep: None,
    ) -> None:
        self.settings = settings
        self.balancer = balancer
        self.addresses = addresses
        self.set_endpoints = set_endpoints
        self.collect_now = collect_now
        self.log = log
        self.interval = settings.cfg.auto_sync_interval
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
        # What was logged, each bounded by one answer or the endpoints asked: members that
        # failed in a row (address -> error); left-out and dropped URLs of the last applied
        # list; foreign cluster IDs by address (the last one).
        self._failing: dict[str, str] = {}
        # New failure streaks logged in this sync; the rest are counted in one line.
        self._fail_lines = self._fail_quiet = 0
        self._left_out: set[tuple[str, str]] = set()
        self._dropped: set[tuple[str, str]] = set()
        self._foreign: dict[str, str] = {}
        # Self-loop checks running in daemon threads (abandoned ones too), by (host, port).
        self._checking: dict[_Key, asyncio.Future[str | None]] = {}
        self._wake = asyncio.Event()
        self._ssl: ssl.SSLContext = tls_context(settings.cfg)

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
        """One sync, within SYNC_DEADLINE. Returns its result: ok, failed or refused."""
        self._fail_lines = self._fail_quiet = 0
        try:
            async with asyncio.timeout(SYNC_DEADLINE):
                if self.cluster_id is None:
                    result, error = await self._first_sync()
                else:
                    result, error = await self._follow()
        except TimeoutError:
            # Its lookups go on in their daemon threads, which end on their own timeouts.
            result = "failed"
            error = f"sync abandoned: not done within {format_duration(SYNC_DEADLINE)}"
        if self._fail_quiet:
            # A list of new, failing addresses at every answer: a few lines and a count,
            # not a line per address per sync.
            self.log.warn("no usable member list from more endpoints", count=self._fail_quiet)
        self._record(result, error)
        return result

    async def _first_sync(self) -> tuple[str, str]:
        sem = asyncio.Semaphore(FIRST_SYNC_CONCURRENCY)

        async def one(ep: Endpoint) -> MemberList | str:
            async with sem:
                try:
                    return await self._ask(ep)
                except Exception as e:
                    return self._member_failed(ep, e)

        seeds = self.seeds
        answers: list[MemberList | str] = list(await asyncio.gather(*(one(ep) for ep in seeds)))
        verdicts: dict[_Key, str | None] = {}
        deadline = asyncio.get_running_loop().time() + SELF_CHECK_DEADLINE
        # In seed order, the first answer with a usable client URL names the cluster.
        usable: tuple[list[Endpoint], list[tuple[Endpoint, str]]] | None = None
        for i, a in enumerate(answers):
            if isinstance(a, MemberList):
                kept, dropped = await self._checked(a, verdicts, deadline)
                if kept:
                    usable = kept, dropped
                    self._failing.pop(seeds[i].addr, None)
                    break
                answers[i] = self._member_failed(seeds[i], _no_usable_url(a, dropped))
        chosen, others = first_cluster(answers)
        if chosen is None or usable is None:
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
        return self._apply(ml, *usable)

    async def _follow(self) -> tuple[str, str]:
        errors: list[str] = []
        refused = False
        verdicts: dict[_Key, str | None] = {}
        deadline = asyncio.get_running_loop().time() + SELF_CHECK_DEADLINE
        candidates = self._candidates()
        for ep in candidates:
            try:
                ml = await self._ask(ep)
            except Exception as e:
                errors.append(self._member_failed(ep, e))
                continue
            if ml.cluster_id != self.cluster_id:
                refused = True
                msg = f"{ep.addr}: cluster ID {ml.cluster_id}, not {self.cluster_id}"
                errors.append(msg)
                if self._foreign.get(ep.addr) != ml.cluster_id:
                    self._foreign[ep.addr] = ml.cluster_id
                    self.log.error(
                        "refused a member list from another etcd cluster",
                        address=ep.addr,
                        **{"cluster-id": ml.cluster_id, "expected-cluster-id": self.cluster_id},
                    )
                continue
            kept, dropped = await self._checked(ml, verdicts, deadline)
            if not kept:
                errors.append(self._member_failed(ep, _no_usable_url(ml, dropped)))
                continue
            self._failing.pop(ep.addr, None)
            self._forget_others(candidates)
            return self._apply(ml, kept, dropped)
        self._forget_others(candidates)
        return ("refused" if refused else "failed"), "; ".join(errors) or "no endpoints"

    def _candidates(self) -> list[Endpoint]:
        """Who to ask, in order: usable current endpoints, the other current ones, seeds."""
        remotes = self.balancer.remotes
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
        timeout = self.settings.cfg.dial_timeout
        scheme = "https" if ep.secure else "http"
        where = f"POST {scheme}://{ep.addr}{MEMBER_LIST_PATH}"
        try:
            addrs = await asyncio.wait_for(self.addresses.resolve(ep.host), timeout)
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
            max_body=MAX_MEMBER_LIST + 1,  # one more: a longer answer is refused, not cut
        )
        if status != 200:
            raise HttpError(f"{where}: {status} {reason}: {_shown(body)}")
        try:
            return parse_member_list(body)
        except ValueError as e:
            raise HttpError(f"{where}: {e}") from None

    def _member_failed(self, ep: Endpoint, e: BaseException | str) -> str:
        """One member gave no usable list: logged once per failure streak of that member."""
        error = e if isinstance(e, str) else str(e) if isinstance(e, HttpError) else repr(e)
        if ep.addr not in self._failing:
            if self._fail_lines < FAIL_LINES_PER_SYNC:
                self._fail_lines += 1
                self.log.warn("no usable member list from endpoint", address=ep.addr, error=error)
            else:
                self._fail_quiet += 1
        self._failing[ep.addr] = error
        return error

    def _forget_others(self, asked: Iterable[Endpoint]) -> None:
        """Failure streaks and refusals of endpoints no longer asked are forgotten (bounded)."""
        keep = {ep.addr for ep in asked} | {ep.addr for ep in self.seeds}
        for d in (self._failing, self._foreign):
            for addr in [a for a in d if a not in keep]:
                del d[addr]

    async def _checked(
        self, ml: MemberList, verdicts: dict[_Key, str | None], deadline: float
    ) -> tuple[list[Endpoint], list[tuple[Endpoint, str]]]:
        """ml's endpoints that pass the self-loop guard, and those it drops (with why).

        verdicts: this sync's verdicts so far (another member's answer lists the same URLs).
        """
        todo = [ep for ep in ml.endpoints if (ep.host, ep.port) not in verdicts]
        if todo:
            verdicts.update(await self._self_checks(todo, deadline))
        kept: list[Endpoint] = []
        dropped: list[tuple[Endpoint, str]] = []
        for ep in ml.endpoints:
            verdict = verdicts[(ep.host, ep.port)]
            if verdict is None:
                kept.append(ep)
            else:
                dropped.append((ep, verdict))
        return kept, dropped

    async def _self_checks(
        self, eps: Sequence[Endpoint], deadline: float
    ) -> dict[_Key, str | None]:
        """The self-loop guard's verdict on each endpoint, all at once, by the deadline.

        Each check (it resolves names, blocking) runs in a daemon thread: an abandoned one
        never delays shutdown, unlike the loop's executor, which shutdown joins without a
        deadline. At most SELF_CHECK_THREADS run at a time, abandoned ones included; a
        check still running for the same (host, port) is waited for, not started again.
        """
        loop = asyncio.get_running_loop()
        pending = list(dict.fromkeys((ep.host, ep.port) for ep in eps))
        by_key = {(ep.host, ep.port): ep for ep in eps}
        waiting: dict[asyncio.Future[str | None], list[_Key]] = {}
        out: dict[_Key, str | None] = {}
        while pending or waiting:
            for key in list(pending):
                fut = self._checking.get(key)
                if fut is None and len(self._checking) < SELF_CHECK_THREADS:
                    fut = self._start_check(loop, by_key[key])
                if fut is not None:
                    pending.remove(key)
                    waiting.setdefault(fut, []).append(key)
            left = deadline - loop.time()
            # Ours, and (while some wait for a thread) any check whose end frees one.
            watch = set(waiting) | (set(self._checking.values()) if pending else set())
            if left <= 0 or not watch:
                break
            done, _ = await asyncio.wait(watch, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            if not done:
                break
            for fut in done:
                for key in waiting.pop(fut, []):
                    out[key] = fut.result()
        late = f"self-loop check not done within {format_duration(SELF_CHECK_DEADLINE)}"
        for key in pending + [k for keys in waiting.values() for k in keys]:
            out[key] = late
        return out

    def _start_check(
        self, loop: asyncio.AbstractEventLoop, ep: Endpoint
    ) -> asyncio.Future[str | None]:
        key = (ep.host, ep.port)
        fut: asyncio.Future[str | None] = loop.create_future()
        self._checking[key] = fut

        def settle(verdict: str | None) -> None:
            if self._checking.get(key) is fut:
                del self._checking[key]
            if not fut.done():
                fut.set_result(verdict)

        def work() -> None:
            try:
                verdict = self.self_check(ep)
            except Exception as e:  # the guard raises ConfigError only; anything else:
                verdict = f"self-loop check failed: {e!r}"
            try:
                loop.call_soon_threadsafe(settle, verdict)
            except RuntimeError:
                pass  # the loop closed meanwhile (the gateway stopped): nobody waits

        threading.Thread(target=work, name="etcdgw-self-check", daemon=True).start()
        return fut

    def _apply(
        self, ml: MemberList, kept: list[Endpoint], dropped: list[tuple[Endpoint, str]]
    ) -> tuple[str, str]:
        """Make kept the gateway's endpoints; log what is new among the left out."""
        self._left_out = self._log_new(
            self._left_out, ml.skipped, ("member left out", "member"), "members left out"
        )
        self._dropped = self._log_new(
            self._dropped,
            [(ep.addr, why) for ep, why in dropped],
            ("dropped member client URL", "address"),
            "dropped member client URLs",
            warn=True,
        )
        self.current = tuple(kept)
        self.set_endpoints(kept, source=SOURCE)
        # Endpoints gone for good leave the balancer's tag map: the engine was told the new
        # targets just now (set_endpoints); this report cycle takes in the last of what it
        # may say about the old ones (Balancer.prune).
        self.collect_now()
        gone = {r.endpoint.host for r in self.balancer.prune()}
        if gone:  # and their hosts' answers, unless another endpoint (or a seed) has the host
            used = {r.endpoint.host for r in self.balancer.remotes}
            self.addresses.forget(gone - used - {ep.host for ep in self.seeds})
        return "ok", ""

    def _log_new(
        self,
        before: set[tuple[str, str]],
        now: Sequence[tuple[str, str]],
        one: tuple[str, str],
        many: str,
        *,
        warn: bool = False,
    ) -> set[tuple[str, str]]:
        """Log the (what, why) pairs of now that before did not have: a line each (message
        and field name: one) up to LOG_ONE_BY_ONE, else one summary line (many) with their
        count by reason and the first few. Returns now as the next `before`."""
        new = [x for x in dict.fromkeys(now) if x not in before]
        emit = self.log.warn if warn else self.log.info
        if len(new) <= LOG_ONE_BY_ONE:
            for what, why in new:
                emit(one[0], **{one[1]: what, "reason": why})
        elif new:
            reasons = Counter(_reason_kind(why) for _, why in new)
            emit(
                many,
                count=len(new),
                reasons=dict(reasons.most_common()),
                first=[f"{what}: {why}" for what, why in new[:LOG_ONE_BY_ONE]],
            )
        return set(now)

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


def _no_usable_url(ml: MemberList, dropped: Sequence[tuple[Endpoint, str]]) -> str:
    why = f"the member list has no usable client URL ({len(ml.skipped)} left out"
    if dropped:
        why += f", {len(dropped)} dropped: {dropped[0][1]}"
    return why + ")"


def _reason_kind(why: str) -> str:
    """A reason without what varies per URL (a scheme's name, an address), for counts."""
    return " ".join(_VARYING.sub(" ", why).split())


_VARYING = re.compile(r"'[^']*'|\([^)]*\)|: .*$")
