"""DNS SRV discovery of etcd client endpoints: lookup, TLS validation and TTL-driven refresh.

Mirrors etcd's `discoverEndpoints` (etcdmain/gateway.go) and `srv.GetClient`
(client/pkg/srv), with three deliberate fixes (README lists them as divergences):

- validation really authenticates the target: a TLS handshake whose certificate must chain to
  --trusted-ca-file (or the system store) and match the SRV target name. Go only opens a TCP
  connection (CVE-2020-15136), so a plain server or a stranger's certificate passed;
- an unreadable CA file is a start-up error, not a silent fall-back to --endpoints;
- the records are re-resolved on their TTL (Go resolves once, etcd issue #11690), keeping
  the last good set when DNS fails.

The pure parts (names, record mapping, ordering, TTL clamping, diffing) take no sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import dns.asyncresolver
import dns.exception
import dns.name
import dns.resolver

from .config import Config, ConfigError, Endpoint, parse_listen
from .golang import format_duration
from .log import Logger
from .resolver import (
    LOOKUP_TIMEOUT,
    dns_error_text,
    dns_resolver,
    host_resolver,
    server_text,
)
from .selfloop import check_self_loop
from .tls import HANDSHAKE_TIMEOUT, client_context, endpoint_url, validate

__all__ = [
    "HANDSHAKE_TIMEOUT",
    "Discovered",
    "DiscoveryError",
    "Lookup",
    "Refresher",
    "SrvRecord",
    "clamp_ttl",
    "diff",
    "discover",
    "endpoint_url",
    "get_srv_service",
    "lookup_srv",
    "order_endpoints",
    "retry_delay",
    "self_check_for",
    "srv_names",
    "to_endpoint",
]


SERVICE = "etcd-client"


class DiscoveryError(Exception):
    """Both SRV lookups failed at start-up; the message is the Go gateway's (stderr, exit 1)."""


class SrvRecord(NamedTuple):
    """One SRV answer, target without its trailing dot."""

    target: str
    port: int
    priority: int = 0
    weight: int = 0


@dataclass(frozen=True)
class Lookup:
    """The outcome of one SRV query.

    `error` is None on success. `transient` tells a timeout/SERVFAIL (the answer is unknown)
    from NXDOMAIN/NODATA (DNS said: no such records), which matters during refresh.
    """

    qname: str
    records: tuple[SrvRecord, ...] = ()
    ttl: float | None = None
    error: str | None = None
    transient: bool = False


@dataclass(frozen=True)
class Discovered:
    """What discovery found: validated endpoints in Go order (https first) and the SRV TTL.

    `rejected` lists the records dropped by validation with the reason (for logs and so the
    refresher does not warn about the same record twice).
    """

    endpoints: tuple[Endpoint, ...]
    ttl: float
    rejected: tuple[tuple[Endpoint, str], ...] = ()


# --- pure parts -------------------------------------------------------------------------------


def get_srv_service(service: str, scheme: str, service_name: str = "") -> str:
    """etcd srv.GetSRVService: "etcd-client" + "-ssl" for https + "-<name>" when set."""
    if scheme == "https":
        service += "-ssl"
    if service_name:
        service += "-" + service_name
    return service


def srv_names(domain: str, service_name: str = "") -> tuple[str, str]:
    """The (https, http) names queried for --discovery-srv=domain (net.LookupSRV's form).

    >>> srv_names("example.com", "foo")
    ('_etcd-client-ssl-foo._tcp.example.com', '_etcd-client-foo._tcp.example.com')
    """
    domain = domain.rstrip(".")
    https = get_srv_service(SERVICE, "https", service_name)
    http = get_srv_service(SERVICE, "http", service_name)
    return f"_{https}._tcp.{domain}", f"_{http}._tcp.{domain}"


def to_endpoint(rec: SrvRecord, secure: bool) -> Endpoint:
    """An SRV record as an Endpoint.

    Go keeps the target's trailing dot (`m1.example.com.:2379`); we strip it so the host is
    the same string the self-loop guard, the logs and the TLS name check see.
    """
    return Endpoint(rec.target.rstrip("."), rec.port, rec.priority, rec.weight, secure)


def order_endpoints(https: Iterable[SrvRecord], http: Iterable[SrvRecord]) -> tuple[Endpoint, ...]:
    """https records first, then http (srv.GetClient's order), each group by priority.

    Go's net.LookupSRV sorts by priority and shuffles by weight; we sort by (priority, weight
    descending, name, port) instead, so the order is stable between refreshes and a refresh
    that returns the same records is not a change. Weighted choice is the balancer's job.
    """

    def group(recs: Iterable[SrvRecord], secure: bool) -> list[Endpoint]:
        eps = dict.fromkeys(to_endpoint(r, secure) for r in recs)
        return sorted(eps, key=lambda e: (e.priority, -e.weight, e.host, e.port))

    return tuple(group(https, True) + group(http, False))


def clamp_ttl(ttl: float, lo: float, hi: float) -> float:
    """The refresh delay for a TTL: within [--discovery-refresh-min, --discovery-refresh-max].

    A TTL of 0 (dnsmasq's default for local records) would mean "ask again at once"; the lower
    bound keeps that from hammering the server.
    """
    hi = max(hi, lo)
    return min(max(ttl, lo), hi)


def retry_delay(failures: int, lo: float, hi: float) -> float:
    """Delay before retrying after `failures` failed refreshes in a row: lo, 2lo, 4lo ... hi."""
    hi = max(hi, lo)
    return float(min(lo * (2 ** max(failures - 1, 0)), hi))


def diff(
    old: Sequence[Endpoint], new: Sequence[Endpoint]
) -> tuple[tuple[Endpoint, ...], tuple[Endpoint, ...]]:
    """(added, removed) between two endpoint lists, each in its list's order."""
    old_set, new_set = set(old), set(new)
    return (
        tuple(e for e in new if e not in old_set),
        tuple(e for e in old if e not in new_set),
    )


def _key(ep: Endpoint) -> tuple[str, int, bool]:
    """Identity of a target for "already validated": a new priority needs no new handshake."""
    return (ep.host, ep.port, ep.secure)


# --- DNS --------------------------------------------------------------------------------------


def lookup_srv(resolver: dns.resolver.Resolver, qname: str, server: str) -> Lookup:
    """Query one SRV name. Never raises for DNS failures: they end up in Lookup.error."""
    try:
        answer = resolver.resolve(dns.name.from_text(qname), "SRV")
    except (dns.exception.DNSException, OSError) as e:
        text, transient = dns_error_text(e)
        return Lookup(qname, error=f"lookup {qname} on {server}: {text}", transient=transient)
    recs = tuple(
        SrvRecord(
            rd.target.to_text(omit_final_dot=True),
            int(rd.port),
            int(rd.priority),
            int(rd.weight),
        )
        for rd in answer
        # RFC 2782: target "." means "decidedly not available here"; port 0 cannot be dialled.
        if rd.target != dns.name.root and rd.port != 0
    )
    ttl = float(answer.rrset.ttl) if answer.rrset is not None else None
    return Lookup(qname, recs, ttl)


def _lookup_both(cfg: Config, lifetime: float) -> tuple[Lookup, Lookup]:
    https_name, http_name = srv_names(cfg.discovery_srv, cfg.discovery_srv_name)
    try:
        r = dns_resolver(cfg, lifetime)
    except dns.exception.DNSException as e:
        text, transient = dns_error_text(e)
        server = server_text(None)

        def failed(n: str) -> Lookup:
            return Lookup(n, error=f"lookup {n} on {server}: {text}", transient=transient)

        return failed(https_name), failed(http_name)
    server = server_text(r)
    # Both queries at once: a dead server then costs one timeout, not two. A daemon thread,
    # not an executor: a SIGTERM during start-up (systemd.Interrupted) must not wait for it.
    box: list[Lookup] = []
    other = threading.Thread(
        target=lambda: box.append(lookup_srv(r, https_name, server)),
        name="etcdgw-srv-lookup",
        daemon=True,
    )
    other.start()
    http = lookup_srv(r, http_name, server)
    other.join()
    if not box:  # lookup_srv raised in the thread (a bug): report it as a failed lookup
        box.append(Lookup(https_name, error=f"lookup {https_name} on {server}: failed"))
    return box[0], http


def _min_ttl(*lookups: Lookup) -> float:
    ttls = [lk.ttl for lk in lookups if lk.ttl is not None]
    return min(ttls) if ttls else 0.0


def _record_fields(ep: Endpoint) -> dict[str, object]:
    return {"endpoint": endpoint_url(ep), "priority": ep.priority, "weight": ep.weight}


# --- start-up ---------------------------------------------------------------------------------


def discover(
    cfg: Config,
    log: Logger,
    *,
    lookup_timeout: float = LOOKUP_TIMEOUT,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
) -> Discovered:
    """Start-up discovery for --discovery-srv (blocking), with Go's log lines.

    An empty result means: fall back to --endpoints (Go's behaviour; we log why).

    Raises:
        DiscoveryError: both SRV lookups failed (`dns lookup errors: <https> and <http>`).
        ConfigError: --trusted-ca-file cannot be loaded, or --discovery-dns is malformed.
    """
    domain = cfg.discovery_srv
    if not domain:
        return Discovered((), 0.0)
    ctx = None if cfg.insecure_discovery else client_context(cfg.trusted_ca_file)
    https, http = _lookup_both(cfg, lookup_timeout)
    if https.error is not None and http.error is not None:
        raise DiscoveryError(f"dns lookup errors: {https.error} and {http.error}")
    candidates = order_endpoints(https.records, http.records)
    ttl = _min_ttl(https, http)
    log.info(
        "discovered cluster from SRV",
        **{
            "srv-server": domain,
            "endpoints": [endpoint_url(e) for e in candidates],
            "records": [_record_fields(e) for e in candidates],
            "ttl": format_duration(ttl),
        },
    )
    for lk in (https, http):
        if lk.error is not None:
            log.debug("SRV lookup failed", **{"srv-name": lk.qname, "error": lk.error})
    if not candidates:
        # Only RFC 2782 "not available" records (target "."). Go would dial ".:1" and fail.
        log.warn(
            "no discovered SRV endpoint survived validation; falling back to --endpoints",
            **{
                "srv-server": domain,
                "reasons": ['no usable SRV record (target "." means: service not available)'],
                "endpoints": [e.addr for e in cfg.endpoints],
            },
        )
        return Discovered((), ttl)
    if ctx is None:
        # --insecure-discovery: Go returns every record unchecked, https and http alike.
        return Discovered(candidates, ttl)
    log.info(
        "validating discovered SRV endpoints",
        **{"srv-server": domain, "endpoints": [endpoint_url(e) for e in candidates]},
    )
    kept, rejected = validate(candidates, ctx, host_resolver(cfg), handshake_timeout)
    for ep, reason in rejected:
        log.warn("dropped discovered SRV endpoint", **_record_fields(ep), reason=reason)
    urls = [endpoint_url(e) for e in kept]
    if rejected:
        log.warn(
            "failed to validate discovered endpoints",
            **{
                "srv-server": domain,
                "endpoints": urls,
                # transport.ValidateSecureEndpoints joins its errors with ",".
                "error": ",".join(r for _, r in rejected),
            },
        )
    else:
        log.info(
            "using validated discovered SRV endpoints", **{"srv-server": domain, "endpoints": urls}
        )
    if not kept:
        # Go falls back silently (gateway.go: "no endpoints discovered, fall back to provided
        # endpoints"); the fall-back stays, but the operator is told why.
        log.warn(
            "no discovered SRV endpoint survived validation; falling back to --endpoints",
            **{
                "srv-server": domain,
                "reasons": [r for _, r in rejected],
                "endpoints": [e.addr for e in cfg.endpoints],
            },
        )
    return Discovered(kept, ttl, rejected)


def self_check_for(
    cfg: Config,
    resolve: Callable[[str], Sequence[str]] | None = None,
    is_local: Callable[[str], bool] | None = None,
) -> Callable[[Endpoint], str | None]:
    """A Refresher (and member list) self_check: the self-loop guard (CVE-2020-15114) for
    one endpoint.

    Returns the guard's message when ep points back at a --listen-addr or the
    --metrics-addr (clients sent there would get our metrics server's 404s), or does not
    resolve; else None. `is_local` is passed on to selfloop.check_self_loop.
    """
    res = resolve if resolve is not None else host_resolver(cfg)
    extra: dict[str, Callable[[str], bool]] = {} if is_local is None else {"is_local": is_local}
    own = list(cfg.listen)
    if cfg.metrics_addr:
        with contextlib.suppress(ConfigError):  # validated at start-up already
            own.append(parse_listen(cfg.metrics_addr))

    def check(ep: Endpoint) -> str | None:
        try:
            check_self_loop(own, [ep], res, **extra)
        except ConfigError as e:
            return e.message
        return None

    return check


# --- refresh ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Outcome:
    endpoints: tuple[Endpoint, ...] | None  # None: keep the last good set
    ttl: float
    rejected: tuple[tuple[Endpoint, str], ...]
    error: str = ""
    dns_failed: bool = False  # no answer at all: nothing is known about the records


class Refresher:
    """Re-resolves the SRV records on their TTL and reports endpoint-set changes.

    on_change receives the new full, validated list (never an empty one) from the event loop
    thread; the server stops giving removed endpoints new clients and lets live ones finish.
    A failed, empty or wholly-invalid answer keeps the last good set (HAProxy's `hold`,
    gobetween's `failpolicy=keeplast`): a DNS outage must not empty the gateway.
    """

    def __init__(
        self,
        cfg: Config,
        log: Logger,
        initial: Discovered,
        on_change: Callable[[tuple[Endpoint, ...]], None],
        *,
        self_check: Callable[[Endpoint], str | None] = lambda ep: None,
        clock: Callable[[], float] = time.monotonic,
        lookup_timeout: float = LOOKUP_TIMEOUT,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
    ) -> None:
        self.cfg = cfg
        self.log = log
        self.on_change = on_change
        self.self_check = self_check
        self.clock = clock
        self.lookup_timeout = lookup_timeout
        self.handshake_timeout = handshake_timeout
        self._current = initial.endpoints
        self._ttl = initial.ttl
        self._rejected = {_key(ep): reason for ep, reason in initial.rejected}
        self._wake = asyncio.Event()
        self._failures = 0
        self.refreshes = 0  # completed refresh attempts, for tests and metrics

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        """The current good set (empty while still on the --endpoints fall-back), stamped
        `srv` for /status whoever passes it on (a reload that keeps the refresher too)."""
        return tuple(dataclasses.replace(ep, source="srv") for ep in self._current)

    def refresh_now(self) -> None:
        """Wake run() to refresh at once (SIGHUP). Call from the event loop's thread."""
        self._wake.set()

    def next_delay(self) -> float:
        lo, hi = self.cfg.discovery_refresh_min, self.cfg.discovery_refresh_max
        if self._failures:
            return retry_delay(self._failures, lo, hi)
        return clamp_ttl(self._ttl, lo, hi)

    async def run(self) -> None:
        """Refresh forever (until cancelled). Every wait is bounded by the refresh maximum."""
        while True:
            await self._sleep(self.next_delay())
            # DNS and handshakes are blocking and bounded (lookup and handshake timeouts);
            # a thread keeps the loop serving meanwhile.
            try:
                outcome = await asyncio.to_thread(self._refresh)
            except Exception as e:  # a bug here must not stop refreshing for good
                outcome = _Outcome(None, 0.0, (), f"internal error: {e!r}")
            self._apply(outcome)

    async def _sleep(self, delay: float) -> None:
        deadline = self.clock() + delay
        cap = max(self.cfg.discovery_refresh_max, self.cfg.discovery_refresh_min, 0.001)
        while not self._wake.is_set():
            remaining = deadline - self.clock()
            if remaining <= 0:
                break
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=min(remaining, cap))
            except TimeoutError:
                pass
        self._wake.clear()

    def _refresh(self) -> _Outcome:
        """One lookup + validation round (runs in a worker thread; touches no shared state)."""
        cfg = self.cfg
        https, http = _lookup_both(cfg, self.lookup_timeout)
        failed = [lk.error for lk in (https, http) if lk.error is not None and lk.transient]
        if failed or (https.error is not None and http.error is not None):
            # A SERVFAIL/timeout on one name would make its records look deleted; only an
            # authoritative "no such records" (NXDOMAIN/NODATA) removes a group.
            errors = failed or [lk.error for lk in (https, http) if lk.error is not None]
            return _Outcome(None, 0.0, (), " and ".join(e for e in errors if e), dns_failed=True)
        candidates = order_endpoints(https.records, http.records)
        ttl = _min_ttl(https, http)
        known = {_key(ep) for ep in self._current}
        fresh = [ep for ep in candidates if _key(ep) not in known]
        rejected: list[tuple[Endpoint, str]] = []
        ok: set[Endpoint] = set(candidates) - set(fresh)
        if fresh and cfg.insecure_discovery:
            ok.update(fresh)
        elif fresh:
            try:
                ctx = client_context(cfg.trusted_ca_file)
            except ConfigError as e:
                return _Outcome(None, 0.0, (), e.message)
            kept, dropped = validate(fresh, ctx, host_resolver(cfg), self.handshake_timeout)
            ok.update(kept)
            rejected.extend(dropped)
        for ep in candidates:
            if ep in ok and (reason := self.self_check(ep)) is not None:
                ok.discard(ep)
                rejected.append((ep, reason))
        result = tuple(ep for ep in candidates if ep in ok)
        if not result:
            reasons = [r for _, r in rejected] or ["no SRV records"]
            return _Outcome(
                None,
                ttl,
                tuple(rejected),
                "no discovered SRV endpoint survived validation: " + ",".join(reasons),
            )
        return _Outcome(result, ttl, tuple(rejected))

    def _apply(self, out: _Outcome) -> None:
        self.refreshes += 1
        if not out.dns_failed:
            for ep, reason in out.rejected:
                if self._rejected.get(_key(ep)) != reason:  # warn once per record and reason
                    self.log.warn(
                        "dropped discovered SRV endpoint", **_record_fields(ep), reason=reason
                    )
            self._rejected = {_key(ep): reason for ep, reason in out.rejected}
        domain = self.cfg.discovery_srv
        if out.endpoints is None:
            self._failures += 1
            self.log.warn(
                "SRV refresh failed; keeping the last good endpoints",
                **{
                    "srv-server": domain,
                    "error": out.error,
                    "endpoints": [endpoint_url(e) for e in self._current],
                    "retry-in": format_duration(self.next_delay()),
                },
            )
            return
        self._failures = 0
        self._ttl = out.ttl
        new = out.endpoints
        if new == self._current:
            self.log.debug(
                "SRV endpoints unchanged",
                **{"srv-server": domain, "next-refresh": format_duration(self.next_delay())},
            )
            return
        added, removed = diff(self._current, new)
        self._current = new
        self.log.info(
            "SRV endpoints changed",
            **{
                "srv-server": domain,
                "added": [endpoint_url(e) for e in added],
                "removed": [endpoint_url(e) for e in removed],
                "endpoints": [endpoint_url(e) for e in new],
                "records": [_record_fields(e) for e in new],
            },
        )
        try:
            self.on_change(new)
        except Exception as e:  # the server's bug must not stop discovery
            self.log.error("SRV endpoint change handler failed", error=repr(e))
