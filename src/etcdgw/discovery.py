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
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import dns.asyncresolver
import dns.exception
import dns.name
import dns.resolver

from .config import (
    Config,
    ConfigError,
    Endpoint,
    check_self_loop,
    format_addr,
    format_duration,
    go_quote,
    parse_listen,
)
from .log import Logger
from .resolver import (
    LOOKUP_TIMEOUT,
    dns_error_text,
    dns_resolver,
    host_resolver,
    server_text,
)

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
    "tls_context",
    "to_endpoint",
    "validate",
]

# transport.ValidateSecureEndpoints dials with a 5 s timeout; we use it for connect + handshake.
HANDSHAKE_TIMEOUT = 5.0
# At most this many targets are validated in parallel (Go validates one after the other, so a
# few dead targets delayed start-up by 5 s each).
MAX_PARALLEL_VALIDATIONS = 16

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


def endpoint_url(ep: Endpoint) -> str:
    """The URL form Go logs for a discovered endpoint: https://host:port or http://host:port."""
    return ("https://" if ep.secure else "http://") + ep.addr


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


# --- TLS validation ---------------------------------------------------------------------------


def tls_context(cfg: Config) -> ssl.SSLContext:
    """The client context used to authenticate discovered targets.

    Only --trusted-ca-file is trusted when given (Go's TLSInfo.TrustedCAFile); else the system
    store. Go silently fell back to --endpoints on an unreadable CA file; we refuse to start.

    Raises:
        ConfigError: `failed to load trusted CA file <path>: <reason>` (stderr).
    """
    path = cfg.trusted_ca_file
    try:
        if path:
            ctx = ssl.create_default_context(cafile=path)
        else:
            ctx = ssl.create_default_context()
    except ssl.SSLError as e:
        raise ConfigError(
            f"failed to load trusted CA file {path}: {_ssl_text(e)}", stream="stderr"
        ) from None
    except OSError as e:
        reason = (e.strerror or str(e)).lower()
        raise ConfigError(
            f"failed to load trusted CA file {path}: {reason}", stream="stderr"
        ) from None
    return ctx


def _ssl_text(e: ssl.SSLError) -> str:
    """An OpenSSL error without its "[LIB: CODE]" prefix and "(_ssl.c:NNN)" suffix."""
    text = str(e.args[1]) if len(e.args) > 1 else str(e)
    return re.sub(r"^\[[^\]]*\]\s*|\s*\(_ssl\.c:\d+\)$", "", text) or str(e.reason)


# Alerts a server may send when it wants a client certificate and we have none (Go sends
# bad_certificate / certificate_required, OpenSSL handshake_failure). The gateway has no
# client certificate and needs none: it relays the client's own TLS. So a member running with
# --client-cert-auth must pass, but only once its own certificate was verified (see
# _handshake): an alert alone, right after our ClientHello, proves nothing.
_CLIENT_CERT_ALERTS = frozenset(
    {
        "SSLV3_ALERT_BAD_CERTIFICATE",
        "TLSV13_ALERT_CERTIFICATE_REQUIRED",
        "SSLV3_ALERT_HANDSHAKE_FAILURE",
    }
)
_TLS_HANDSHAKE_RECORD = 22
# TLS 1.2 client messages sent only after the server's Certificate (and its signed key
# exchange) were verified: Certificate (11) when one was requested, else ClientKeyExchange (16).
_AFTER_SERVER_AUTH = (11, 16)


def _answers_server_auth(data: bytes) -> bool:
    """Whether client output holds a plaintext Certificate or ClientKeyExchange message."""
    i = 0
    while i + 5 < len(data):
        ctype, length = data[i], int.from_bytes(data[i + 3 : i + 5], "big")
        if ctype == _TLS_HANDSHAKE_RECORD and data[i + 5] in _AFTER_SERVER_AUTH:
            return True
        i += 5 + length
    return False


def _handshake(sock: socket.socket, ctx: ssl.SSLContext, host: str, deadline: float) -> None:
    """A client TLS handshake over memory BIOs; returns when the server is authenticated.

    Driving the handshake by hand shows how far it got: in TLS 1.2 the client sends its
    Certificate/ClientKeyExchange only after verifying the server's chain, name and (ECDHE/DHE
    only in Python's default context) the key exchange signature. An alert about our missing
    client certificate after that point still means "authenticated".

    Raises:
        ssl.SSLError, OSError, TimeoutError: the handshake failed.
    """
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=host)
    authenticated = False

    def flush() -> None:
        nonlocal authenticated
        data = outgoing.read()
        if data:
            authenticated = authenticated or _answers_server_auth(data)
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            sock.sendall(data)

    for _ in range(64):  # a handshake takes a few round trips; never loop unbounded
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            flush()
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            chunk = sock.recv(65536)
            if chunk:
                incoming.write(chunk)
            else:
                incoming.write_eof()
            continue
        except ssl.SSLCertVerificationError:
            raise
        except ssl.SSLError as e:
            if authenticated and e.reason in _CLIENT_CERT_ALERTS:
                return
            raise
        with contextlib.suppress(OSError):
            flush()  # our Finished, so the server does not log a broken handshake
        return
    raise ssl.SSLError("tls handshake did not finish")


def check_tls(
    ep: Endpoint,
    ctx: ssl.SSLContext,
    resolve: Callable[[str], Sequence[str]],
    timeout: float = HANDSHAKE_TIMEOUT,
) -> str | None:
    """Handshake with ep, checking its certificate against ctx and the name ep.host.

    Returns None when the target is authenticated, else the reason (Go's `"<url>" ...` form).
    The connection is closed right after the handshake: the gateway never terminates TLS.
    """
    url = go_quote(endpoint_url(ep))
    try:
        addrs = resolve(ep.host)
    except OSError as e:
        return f"{url} failed to dial ({e})"
    deadline = time.monotonic() + timeout
    last = "no address"
    for ip in addrs:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            last = "i/o timeout"
            break
        dial = format_addr(ip, ep.port)
        try:
            sock = socket.create_connection((ip, ep.port), timeout=remaining)
        except TimeoutError:
            last = f"dial tcp {dial}: i/o timeout"
            continue
        except OSError as e:
            last = f"dial tcp {dial}: {(e.strerror or str(e)).lower()}"
            continue
        with sock:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            try:
                _handshake(sock, ctx, ep.host, deadline)
                return None
            except ssl.SSLCertVerificationError as e:
                return (
                    f"{url} failed TLS validation (certificate verify failed: {e.verify_message})"
                )
            except ssl.SSLError as e:
                return f"{url} failed TLS validation (tls handshake with {dial}: {_ssl_text(e)})"
            except TimeoutError:
                return f"{url} failed TLS validation (tls handshake with {dial}: i/o timeout)"
            except OSError as e:
                reason = (e.strerror or str(e) or type(e).__name__).lower()
                return f"{url} failed TLS validation (tls handshake with {dial}: {reason})"
    return f"{url} failed to dial ({last})"


def validate(
    endpoints: Sequence[Endpoint],
    ctx: ssl.SSLContext,
    resolve: Callable[[str], Sequence[str]],
    timeout: float = HANDSHAKE_TIMEOUT,
) -> tuple[tuple[Endpoint, ...], tuple[tuple[Endpoint, str], ...]]:
    """Secure validation (no --insecure-discovery): (kept in order, [(dropped, reason)]).

    http records are refused outright, as transport.ValidateSecureEndpoints does
    (`"<url>" is insecure`); https ones must pass check_tls. Handshakes run in parallel.
    """
    results: dict[Endpoint, str | None] = {}
    secure = [ep for ep in endpoints if ep.secure]
    if secure:
        workers = min(len(secure), MAX_PARALLEL_VALIDATIONS)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futs = {ep: pool.submit(check_tls, ep, ctx, resolve, timeout) for ep in secure}
            results = {ep: f.result() for ep, f in futs.items()}
    kept: list[Endpoint] = []
    rejected: list[tuple[Endpoint, str]] = []
    for ep in endpoints:
        if not ep.secure:
            reason: str | None = f"{go_quote(endpoint_url(ep))} is insecure"
        else:
            reason = results[ep]
        if reason is None:
            kept.append(ep)
        else:
            rejected.append((ep, reason))
    return tuple(kept), tuple(rejected)


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
    ctx = None if cfg.insecure_discovery else tls_context(cfg)
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
    resolve; else None. `is_local` is passed on to config.check_self_loop.
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
        """The current good set (empty while still on the --endpoints fall-back)."""
        return self._current

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
                ctx = tls_context(cfg)
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
