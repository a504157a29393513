"""Name resolution, in one place: host -> addresses for start-up checks, dialing, health checks.

* `host_resolver(cfg)`: blocking, for start-up checks and SRV validation (which run before
  the loop, or in threads). `async_host_resolver(cfg)`: the same answers without blocking.
  Both go through --discovery-dns when it is set (A then AAAA; `localhost` names are still
  answered locally, RFC 6761), else the system's resolver (/etc/hosts + DNS, as Go's
  net.LookupHost). IP literals come back as they are.
* `AddressBook`: the connect path's cache, with its rules:
  - an answer is fresh for `ttl` seconds (the Go gateway resolves at every dial; a short
    cache keeps that spirit without a resolver round trip per client);
  - a stale answer is served at once while one refresh per host runs in the background
    (stale-while-revalidate): a slow or dead DNS server never holds up a client whose
    member's address is known;
  - when a refresh fails, the last good answer stays (HAProxy's `hold`, gobetween's
    `keeplast`): a DNS outage does not take down members that are still reachable;
  - only a host never resolved makes its first client wait for the lookup.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import socket
import time
from collections.abc import Awaitable, Callable, Iterable

import dns.asyncresolver
import dns.exception
import dns.name
import dns.resolver

from .config import Config, ConfigError, format_addr, parse_port, split_host_port
from .golang import go_quote

__all__ = [
    "LOOKUP_TIMEOUT",
    "RESOLVE_TTL",
    "Addr",
    "AddressBook",
    "async_host_resolver",
    "dns_error_text",
    "dns_resolver",
    "host_resolver",
    "parse_dns_server",
    "server_text",
]

# Total time for one DNS query (all retries, UDP then TCP on truncation). Go's resolver uses
# resolv.conf's `timeout:5`, so a dead server costs about the same.
LOOKUP_TIMEOUT = 5.0
# How long a host name's addresses are fresh on the connect path (AddressBook).
RESOLVE_TTL = 5.0

Addr = tuple[int, tuple[str, int]]
"""(family, (ip, 0)): one address of a host, as getaddrinfo gives it (port left to the caller)."""

AsyncResolver = Callable[[str], Awaitable[list[str]]]


def parse_dns_server(text: str) -> tuple[str, int]:
    """--discovery-dns: "IP:PORT", "[v6]:PORT", or a bare IP (port 53).

    Raises:
        ConfigError: the value is not an IP address with an optional port.
    """
    bare = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        return str(ipaddress.ip_address(bare)), 53
    except ValueError:
        pass
    try:
        host, port_text = split_host_port(text)
        return str(ipaddress.ip_address(host)), parse_port(port_text)
    except ValueError as e:
        raise ConfigError(
            f"invalid --discovery-dns {go_quote(text)}: want IP:PORT or [IPv6]:PORT ({e})",
            stream="stderr",
        ) from None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


def _is_localhost(host: str) -> bool:
    # RFC 6761 6.3: "localhost." names are answered locally and never sent to a DNS server,
    # so `--listen-addr=localhost:...` still works with --discovery-dns.
    h = host.rstrip(".").lower()
    return h == "localhost" or h.endswith(".localhost")


def dns_resolver(cfg: Config, lifetime: float = LOOKUP_TIMEOUT) -> dns.resolver.Resolver:
    if cfg.discovery_dns:
        ip, port = parse_dns_server(cfg.discovery_dns)
        r = dns.resolver.Resolver(configure=False)
        r.nameservers = [ip]
        r.port = port
    else:
        # /etc/resolv.conf, like Go's resolver; raises NoResolverConfiguration when absent.
        r = dns.resolver.Resolver()
    r.lifetime = lifetime
    r.timeout = min(r.timeout, lifetime)
    return r


def server_text(r: dns.resolver.Resolver | None) -> str:
    """The DNS server named in error texts, like Go's `lookup X on 10.0.0.2:53: ...`."""
    if r is None or not r.nameservers:
        return "the system resolver"
    return format_addr(str(r.nameservers[0]), r.port)


def dns_error_text(e: BaseException) -> tuple[str, bool]:
    """Go's wording for a DNS failure, and whether it is transient (the answer is unknown)."""
    if isinstance(e, dns.resolver.NXDOMAIN | dns.resolver.NoAnswer):
        return "no such host", False
    if isinstance(e, dns.exception.Timeout):
        return "i/o timeout", True
    if isinstance(e, dns.resolver.NoNameservers):
        return "server misbehaving", True
    if isinstance(e, dns.resolver.NoResolverConfiguration):
        return "no DNS server configured (/etc/resolv.conf)", True
    return str(e) or type(e).__name__, True


def host_resolver(cfg: Config, *, lifetime: float = LOOKUP_TIMEOUT) -> Callable[[str], list[str]]:
    """A blocking host -> [IP] function for start-up checks and validation.

    Through --discovery-dns when set (A then AAAA), else socket.getaddrinfo (the system's
    /etc/hosts + DNS, as Go's net.LookupHost). IP literals come back as they are.

    The function raises OSError when the name does not resolve.
    """
    if not cfg.discovery_dns:
        return _system_resolve
    r = dns_resolver(cfg, lifetime)
    server = server_text(r)

    def resolve(host: str) -> list[str]:
        if _is_ip(host):
            return [host]
        if _is_localhost(host):
            return _system_resolve(host)
        addrs: list[str] = []
        errors: list[str] = []
        for rdtype in ("A", "AAAA"):
            try:
                answer = r.resolve(dns.name.from_text(host), rdtype)
            except (dns.exception.DNSException, OSError) as e:
                errors.append(dns_error_text(e)[0])
                continue
            addrs.extend(rd.address for rd in answer)
        if not addrs:
            raise OSError(f"lookup {host} on {server}: {errors[0] if errors else 'no such host'}")
        return addrs

    return resolve


def _system_resolve(host: str) -> list[str]:
    if _is_ip(host):
        return [host]
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise OSError(f"lookup {host}: {e.strerror or e}") from None
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def async_host_resolver(
    cfg: Config, *, lifetime: float = LOOKUP_TIMEOUT
) -> Callable[[str], Awaitable[list[str]]]:
    """The connect-time twin of host_resolver: non-blocking, raises OSError when unresolved.

    Go re-resolves the target at every dial (net.Dial); so do we. With --discovery-dns the
    answers are cached for their TTL, so a busy gateway does not query per connection.
    """
    if not cfg.discovery_dns:
        return _async_system_resolve

    ip, port = parse_dns_server(cfg.discovery_dns)
    r = dns.asyncresolver.Resolver(configure=False)
    r.nameservers = [ip]
    r.port = port
    r.lifetime = lifetime
    r.timeout = min(r.timeout, lifetime)
    r.cache = dns.resolver.Cache()
    server = format_addr(ip, port)

    async def one(host: str, rdtype: str) -> list[str] | str:
        try:
            answer = await r.resolve(dns.name.from_text(host), rdtype)
        except (dns.exception.DNSException, OSError) as e:
            return dns_error_text(e)[0]
        return [rd.address for rd in answer]

    async def resolve(host: str) -> list[str]:
        if _is_ip(host):
            return [host]
        if _is_localhost(host):
            return await _async_system_resolve(host)
        results = await asyncio.gather(one(host, "A"), one(host, "AAAA"))
        addrs = [a for res in results if isinstance(res, list) for a in res]
        if not addrs:
            errors = [res for res in results if isinstance(res, str)]
            raise OSError(f"lookup {host} on {server}: {errors[0] if errors else 'no such host'}")
        return addrs

    return resolve


async def _async_system_resolve(host: str) -> list[str]:
    if _is_ip(host):
        return [host]
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise OSError(f"lookup {host}: {e.strerror or e}") from None
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _as_addrs(ips: list[str]) -> list[Addr]:
    out: list[Addr] = []
    for ip in ips:
        a: Addr = (socket.AF_INET6 if ":" in ip else socket.AF_INET, (ip, 0))
        if a not in out:
            out.append(a)
    return out


class AddressBook:
    """Addresses of the endpoints' host names for the connect path (see the module doc).

    Args:
        resolve: host -> [IP], raising OSError when the name does not resolve
            (async_host_resolver(cfg)).
        on_change: called when a host's answer changed (the relay thread dials by address).
        ttl: seconds an answer is fresh.
        clock: monotonic seconds.
    """

    def __init__(
        self,
        resolve: AsyncResolver,
        *,
        on_change: Callable[[], None] | None = None,
        ttl: float = RESOLVE_TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._resolve = resolve
        self.on_change = on_change
        self.ttl = ttl
        self._clock = clock
        # host -> (fresh until, addresses); fresh until 0.0: an IP literal, forever
        self._cache: dict[str, tuple[float, list[Addr]]] = {}
        self._inflight: dict[str, asyncio.Future[list[Addr]]] = {}

    def known(self, host: str) -> list[Addr] | None:
        """Addresses of host if any answer is known, fresh or stale; never waits.

        A stale answer starts a background refresh (when a loop runs in this thread).
        """
        hit = self._cache.get(host)
        if hit is None:
            literal = _literal(host)
            if literal is None:
                return None
            self._cache[host] = (0.0, literal)
            return literal
        until, addrs = hit
        if until and until <= self._clock():
            self._refresh_in_background(host)
        return addrs

    def fresh(self, host: str) -> bool:
        """Whether host has an answer that does not need refreshing."""
        hit = self._cache.get(host)
        return hit is not None and (hit[0] == 0.0 or hit[0] > self._clock())

    async def resolve(self, host: str) -> list[Addr]:
        """Addresses of host: a known answer at once (see known()), else the lookup's.

        Raises:
            OSError: host never resolved and the lookup failed now.
        """
        addrs = self.known(host)
        if addrs is not None:
            return addrs
        return await asyncio.shield(self._lookup(host))

    def refresh_stale(self, hosts: list[str]) -> None:
        """Start background lookups for the hosts whose answer is stale or missing."""
        for host in hosts:
            if not self.fresh(host) and _literal(host) is None:
                self._refresh_in_background(host)

    def forget(self, hosts: Iterable[str]) -> None:
        """Drop the answers of hosts no endpoint uses any more (a member list that changes
        at every answer must not grow the book); asked again, they are looked up again."""
        for host in hosts:
            self._cache.pop(host, None)

    def close(self) -> None:
        """Cancel lookups in flight (at shutdown)."""
        for fut in list(self._inflight.values()):
            fut.cancel()
        self._inflight.clear()

    def _refresh_in_background(self, host: str) -> None:
        if host in self._inflight:
            return
        try:
            fut = self._lookup(host)
        except RuntimeError:  # no running loop (a synchronous caller): refreshed later
            return
        # A failed refresh keeps the stale answer; the exception is consumed here.
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())

    def _lookup(self, host: str) -> asyncio.Future[list[Addr]]:
        """The lookup in flight for host, started if none is (one per host at a time)."""
        fut = self._inflight.get(host)
        if fut is None:
            loop = asyncio.get_running_loop()  # RuntimeError without one: nothing started
            fut = loop.create_task(self._do_lookup(host))
            self._inflight[host] = fut
            fut.add_done_callback(functools.partial(self._forget, host))
        return fut

    def _forget(self, host: str, fut: asyncio.Future[list[Addr]]) -> None:
        if self._inflight.get(host) is fut:
            del self._inflight[host]

    async def _do_lookup(self, host: str) -> list[Addr]:
        old = self._cache.get(host)
        try:
            addrs = _as_addrs(await self._resolve(host))
            if not addrs:
                raise OSError(f"lookup {host}: no such host")
        except (TimeoutError, OSError):
            if old is None:
                raise
            # Keep the last good answer; try again after another ttl, not at every client.
            self._cache[host] = (self._clock() + self.ttl, old[1])
            return old[1]
        self._cache[host] = (self._clock() + self.ttl, addrs)
        if (old is None or old[1] != addrs) and self.on_change is not None:
            self.on_change()
        return addrs


def _literal(host: str) -> list[Addr] | None:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    return [(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, (host, 0))]
