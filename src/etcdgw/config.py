"""Configuration values, Go-duration parsing, endpoint normalisation and start-up checks.

Everything here is pure: no sockets. Name resolution for the start-up checks is passed in as
a function, so tests run without DNS.
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

DEFAULT_LISTEN_ADDR = "127.0.0.1:23790"
DEFAULT_ENDPOINTS = ("127.0.0.1:2379",)
DEFAULT_RETRY_DELAY = 60.0
DEFAULT_DIAL_TIMEOUT = 5.0
# etcd's tcpproxy.Run: "if tp.MonitorInterval == 0 { tp.MonitorInterval = 5 * time.Minute }".
ZERO_RETRY_DELAY = 300.0


class ConfigError(Exception):
    """A user mistake found at start-up.

    Attributes:
        stream: "stdout" or "stderr": where the Go gateway prints this message.
    """

    def __init__(self, message: str, *, stream: str = "stdout") -> None:
        super().__init__(message)
        self.message = message
        self.stream = stream


@dataclass(frozen=True, order=True)
class Endpoint:
    """One etcd client endpoint: a host (name or IP, IPv6 without brackets) and a port.

    priority/weight come from SRV records (RFC 2782); --endpoints gives (0, 0). `secure` is
    True for records found under _etcd-client-ssl (informational: bytes pass through as-is).
    `source` says where the endpoint came from (`flag`, `srv`, `member-list`), for /status;
    it takes no part in equality, ordering or hashing.
    """

    host: str
    port: int
    priority: int = 0
    weight: int = 0
    secure: bool = False
    source: str = field(default="flag", compare=False)

    @property
    def addr(self) -> str:
        """host:port with IPv6 bracketed, as logged and dialled."""
        return format_addr(self.host, self.port)


@dataclass(frozen=True)
class Listen:
    """A listen address: TCP host:port, or a unix socket path (``unix:///path``)."""

    host: str = ""
    port: int = 0
    path: str | None = None

    @property
    def addr(self) -> str:
        if self.path is not None:
            return f"unix://{self.path}"
        return format_addr(self.host, self.port)


@dataclass(frozen=True)
class Config:
    """The gateway's whole configuration, built by cli.py from flags (and a config file)."""

    listen: tuple[Listen, ...] = (Listen("127.0.0.1", 23790),)
    endpoints: tuple[Endpoint, ...] = (Endpoint("127.0.0.1", 2379),)
    retry_delay: float = DEFAULT_RETRY_DELAY
    dial_timeout: float = DEFAULT_DIAL_TIMEOUT
    discovery_srv: str = ""
    discovery_srv_name: str = ""
    discovery_dns: str = ""
    discovery_refresh_min: float = 5.0
    discovery_refresh_max: float = 300.0
    insecure_discovery: bool = False
    trusted_ca_file: str = ""
    drain_timeout: float = 30.0
    tcp_keepalive: float = 15.0
    max_connections: int = 0  # 0: unlimited
    listen_unix_mode: int = 0o660
    buffer_size: int = 65536
    health_check: str = "tcp"  # none | tcp | etcd
    balance: str = "round-robin"  # round-robin | least-connections
    health_interval: float = 5.0
    health_rise: int = 2
    health_fall: int = 3
    health_cert_file: str = ""
    health_key_file: str = ""
    auto_sync_interval: float = 0.0  # --auto-sync-interval; 0: off (membership.py)
    metrics_addr: str = ""
    config_file: str = ""
    log_format: str = "json"
    log_level: str = "info"


def format_addr(host: str, port: int) -> str:
    """Join host and port, bracketing IPv6 literals (Go's net.JoinHostPort).

    >>> format_addr("::1", 2379)
    '[::1]:2379'
    """
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def split_host_port(addr: str) -> tuple[str, str]:
    """Go's net.SplitHostPort: "h:p" or "[v6]:p" -> (host, port string).

    Raises:
        ValueError: with Go's wording (missing port, too many colons, ...).
    """
    if addr.startswith("["):
        end = addr.find("]")
        if end < 0:
            raise ValueError(f"address {addr}: missing ']' in address")
        host, rest = addr[1:end], addr[end + 1 :]
        if not rest:
            raise ValueError(f"address {addr}: missing port in address")
        if not rest.startswith(":") or ":" in rest[1:]:
            raise ValueError(f"address {addr}: too many colons in address")
        return host, rest[1:]
    i = addr.rfind(":")
    if i < 0:
        raise ValueError(f"address {addr}: missing port in address")
    host, port = addr[:i], addr[i + 1 :]
    if ":" in host:
        raise ValueError(f"address {addr}: too many colons in address")
    return host, port


def parse_port(text: str) -> int:
    """A decimal port 1-65535 (Go's gateway silently turns garbage into port 0; we refuse)."""
    if not text.isascii() or not text.isdigit():
        raise ValueError(f"invalid port {text!r}")
    port = int(text)
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} out of range 1-65535")
    return port


def strip_schema(ep: str) -> str:
    """etcd gateway.go stripSchema: "scheme://host:port/..." -> "host:port"; others unchanged."""
    if "://" not in ep:
        return ep
    try:
        u = urllib.parse.urlsplit(ep)
    except ValueError:
        return ep
    return u.netloc or ep


def parse_endpoint(ep: str, **srv: int | bool) -> Endpoint:
    """Normalise one --endpoints entry into an Endpoint.

    Raises:
        ConfigError: `error parsing endpoint "<ep>"`, the Go gateway's message (stdout, exit 1),
            with the reason appended for ports outside 1-65535.
    """
    raw = strip_schema(ep)
    if ep.startswith("https://") and "secure" not in srv:
        srv = {**srv, "secure": True}
    try:
        host, port_text = split_host_port(raw)
    except ValueError:
        raise ConfigError(f"error parsing endpoint {go_quote(ep)}") from None
    try:
        port = parse_port(port_text)
    except ValueError as e:
        raise ConfigError(f"error parsing endpoint {go_quote(ep)}: {e}") from None
    if not host:
        raise ConfigError(f"error parsing endpoint {go_quote(ep)}: missing host")
    return Endpoint(host, port, **srv)  # type: ignore[arg-type]


def parse_endpoints(values: Iterable[str]) -> tuple[Endpoint, ...]:
    """Parse a list of raw endpoint strings (already split on commas), keeping duplicates."""
    return tuple(parse_endpoint(v) for v in values)


def parse_listen(addr: str) -> Listen:
    """Parse one --listen-addr: host:port, [v6]:port, :port (all interfaces) or unix:///path.

    Raises:
        ConfigError: `failed to validate listen address: <addr>` (Go's message, stdout).
    """
    if addr.startswith("unix://"):
        path = addr[len("unix://") :]
        if not path.startswith("/"):
            raise ConfigError(
                f"failed to validate listen address: {addr} (unix socket path must be absolute)"
            )
        return Listen(path=path)
    try:
        host, port_text = split_host_port(addr)
        port = parse_port(port_text)
    except ValueError:
        raise ConfigError(f"failed to validate listen address: {addr}") from None
    return Listen(host, port)


# --- Go durations ----------------------------------------------------------------------------

_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,  # noqa: RUF001 - Go accepts both micro signs
    "μs": 1e-6,  # noqa: RUF001
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_NUMBER = re.compile(r"\d+\.?\d*|\.\d+")
_UNIT = re.compile(r"[^\d.]*")


def parse_duration(text: str) -> float:
    """Go's time.ParseDuration, in seconds: "1m0s", "1.5s", "300ms", "1h2m", "0".

    Raises:
        ValueError: with Go's message, e.g. `time: missing unit in duration "123"`.
    """
    quoted = go_quote(text)
    sign = 1.0
    if text[:1] in ("+", "-"):
        sign = -1.0 if text[0] == "-" else 1.0
        text = text[1:]
    if text == "0":
        return 0.0
    if text == "":
        raise ValueError(f"time: invalid duration {quoted}")
    total = 0.0
    pos = 0
    while pos < len(text):
        num = _NUMBER.match(text, pos)
        if num is None:
            raise ValueError(f"time: invalid duration {quoted}")
        unit = _UNIT.match(text, num.end())
        assert unit is not None
        name = unit.group()
        if not name:
            raise ValueError(f"time: missing unit in duration {quoted}")
        if name not in _UNITS:
            raise ValueError(f"time: unknown unit {go_quote(name)} in duration {quoted}")
        total += float(num.group()) * _UNITS[name]
        pos = unit.end()
    return sign * total


def format_duration(seconds: float) -> str:
    """Go's Duration.String() for the values we log: 60 -> "1m0s", 1.5 -> "1.5s"."""
    if seconds == 0:
        return "0s"
    neg = seconds < 0
    s = abs(seconds)
    if s < 1:
        ms = s * 1000
        out = f"{ms:g}ms" if ms >= 1 else f"{s * 1e6:g}µs"
    else:
        h, rem = divmod(s, 3600)
        m, sec = divmod(rem, 60)
        sec_text = f"{round(sec, 9):g}s"
        if h:
            out = f"{int(h)}h{int(m)}m{sec_text}"
        elif m:
            out = f"{int(m)}m{sec_text}"
        else:
            out = sec_text
    return "-" + out if neg else out


def go_quote(s: str) -> str:
    """Go's %q for the plain strings we print: double quotes, backslash escapes."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


# --- Start-up checks (gateway.go startGateway, step 7) ---------------------------------------

Resolver = Callable[[str], Sequence[str]]


def is_wildcard(host: str) -> bool:
    return host in ("", "0.0.0.0", "::")


def check_self_loop(
    listens: Sequence[Listen],
    endpoints: Sequence[Endpoint],
    resolve: Resolver,
    is_local: Callable[[str], bool] = lambda ip: ip in ("127.0.0.1", "::1"),
) -> None:
    """Refuse endpoints that point back at the gateway (CVE-2020-15114 guard).

    Mirrors etcd's "best effort detection of self pointing in tcp proxy", but compares
    resolved addresses (so `localhost` vs `127.0.0.1` and IPv6 are caught) and treats a
    wildcard listen address as every local address (Go compares strings, so 0.0.0.0 slips).

    Args:
        resolve: host -> list of IP strings; raises OSError when the name does not resolve.
        is_local: whether an IP is one of this machine's addresses (for wildcard listeners).

    Raises:
        ConfigError: with the Go gateway's messages (stdout).
    """
    listen_ips: dict[int, set[str]] = {}
    for ls in listens:
        if ls.path is not None:
            continue
        if is_wildcard(ls.host):
            ips = {"*"}
        else:
            try:
                ips = {_norm_ip(a) for a in resolve(ls.host)}
            except OSError:
                raise ConfigError(f"failed to resolve listen host: {ls.host}") from None
        listen_ips.setdefault(ls.port, set()).update(ips)
    for ep in endpoints:
        try:
            ep_ips = [_norm_ip(a) for a in resolve(ep.host)]
        except OSError:
            raise ConfigError(f"failed to resolve endpoint host: {ep.host}") from None
        own = listen_ips.get(ep.port)
        if not own:
            continue
        for ip in ep_ips:
            if ip in own or _is_any(ip) or ("*" in own and is_local(ip)):
                listen = ",".join(ls.addr for ls in listens if ls.port == ep.port)
                raise ConfigError(
                    f"SRV or endpoint ({ep.addr}->{format_addr(ip, ep.port)}) should not "
                    f"resolve to the gateway listen addr ({listen})"
                )


def _norm_ip(a: str) -> str:
    try:
        ip = ipaddress.ip_address(a.split("%", 1)[0])
    except ValueError:
        return a
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def _is_any(ip: str) -> bool:
    return ip in ("0.0.0.0", "::")


def is_loopback_host(host: str, resolve: Resolver) -> bool:
    """True when every address of host is a loopback address (for the non-loopback warning)."""
    try:
        addrs = resolve(host) if host else ["0.0.0.0"]
    except OSError:
        return False
    try:
        return all(ipaddress.ip_address(a.split("%", 1)[0]).is_loopback for a in addrs)
    except ValueError:
        return False
