"""Configuration values (Endpoint, Listen), endpoint normalisation, the schema and Config.

Everything here is pure: no sockets. Go's duration and quoting texts live in golang.py, the
YAML reader in configfile.py, the start-up self-loop checks in selfloop.py.
"""

from __future__ import annotations

import ipaddress
import re
import sys
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TypeVar

from .engine import BUFSIZE
from .golang import go_quote, parse_duration

_T = TypeVar("_T")

DEFAULT_LISTEN_ADDR = "127.0.0.1:23790"
DEFAULT_ENDPOINTS = ("127.0.0.1:2379",)
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

    def show(self) -> None:
        """Print the message as the Go gateway does: one line on its stream, flushed."""
        out = sys.stdout if self.stream == "stdout" else sys.stderr
        print(self.message, file=out)
        out.flush()


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
    if ":" in host and "%25" in host:
        # RFC 6874: in a URL an IPv6 zone's "%" is written "%25" (etcd member URLs carry
        # `http://[fe80::1%25eth0]:2379`); the address itself is fe80::1%eth0.
        host = host.replace("%25", "%", 1)
    if (why := host_error(host)) is not None:
        raise ConfigError(f"error parsing endpoint {go_quote(ep)}: {why}")
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
    if host and (why := host_error(host)) is not None:
        raise ConfigError(f"failed to validate listen address: {addr}: {why}")
    return Listen(host, port)


# --- Host names --------------------------------------------------------------------------------


def host_error(host: str) -> str | None:
    """Why host cannot be a host name or IP literal, or None when it can.

    Python's resolver encodes names with the IDNA codec, which raises UnicodeError (not
    OSError) for an empty label (`a..b`) or one over 63 characters; refusing those here keeps
    every later lookup free of that surprise.
    """
    if any(c.isspace() or not c.isprintable() for c in host):
        return "invalid character in host name"
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        pass
    else:
        return None
    try:
        encoded = host.encode("idna")
    except UnicodeError:
        return "invalid host name (empty label or a label over 63 characters)"
    if len(encoded.rstrip(b".")) > 253:
        return "invalid host name (over 253 characters)"
    return None


# --- The configuration schema: one definition per key -----------------------------------------
#
# Every key of `etcdgw start` is defined once below: its name (the long flag and the config-file
# key), its type, its default written as an operator would write it, and its help. cli.py builds
# the argparse parser (and so the man page) from this table, and configfile.read_config_file()
# reads the YAML file into the same text form, so a value is validated by the same converter
# whichever way it arrives.

_INT = re.compile(r"[+-]?[0-9]{1,19}")
_MODE = re.compile(r"[0-7]{3,4}")


@dataclass(frozen=True)
class Key:
    """One configuration key.

    kind: duration | int | bool | mode | enum | string | listen | endpoints | dns | address.
    default: the default as text (parsed by the same converter as a given value); None for
        the list kinds, whose default is written in `help` and applied by convert_list().
    lo/hi: inclusive bounds (int, duration); positive: a duration must be > 0.
    """

    name: str
    kind: str
    default: str | None
    help: str
    group: str = "etcdgw flags"
    metavar: str | None = None
    choices: tuple[str, ...] = ()
    lo: float | None = None
    hi: float | None = None
    positive: bool = False
    in_file: bool = True

    @property
    def flag(self) -> str:
        return "--" + self.name

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")


_G = "etcd gateway flags"
_X = "etcdgw flags"
_O = "operations flags"

KEYS: tuple[Key, ...] = (
    Key("listen-addr", "listen", None, group=_G, metavar="ADDR",
        help=f"listen address (default: {DEFAULT_LISTEN_ADDR}). etcdgw: may be repeated; "
        "host:port, [ipv6]:port or unix:///path"),
    Key("endpoints", "endpoints", None, group=_G, metavar="LIST",
        help="comma separated etcd cluster endpoints (default: 127.0.0.1:2379); repeating "
        "the flag appends; http:// and https:// prefixes are stripped"),
    Key("retry-delay", "duration", "1m0s", group=_G, metavar="DURATION", lo=0,
        help="duration of delay before retrying failed endpoints (default: %(default)s; "
        "0 means 5m, as in etcd)"),
    Key("discovery-srv", "string", "", group=_G, metavar="DOMAIN",
        help="DNS domain used to bootstrap initial cluster"),
    Key("discovery-srv-name", "string", "", group=_G, metavar="NAME",
        help="service name to query when using DNS discovery"),
    Key("insecure-discovery", "bool", "false", group=_G, metavar="BOOL",
        help="accept insecure SRV records"),
    Key("trusted-ca-file", "string", "", group=_G, metavar="PATH",
        help="path to the client server TLS CA file for verifying the discovered endpoints "
        "when discovery-srv is provided. etcdgw: discovered https SRV targets must complete "
        "a TLS handshake whose certificate chains to it and names the target (system trust "
        "store when empty)"),
    Key("dial-timeout", "duration", "5s", group=_X, metavar="DURATION", positive=True,
        help="timeout for connecting to an endpoint before trying the next (default: "
        "%(default)s; the Go gateway has none)"),
    Key("drain-timeout", "duration", "30s", group=_X, metavar="DURATION", lo=0,
        help="on SIGTERM/SIGINT, how long live connections may finish before they are "
        "closed (default: %(default)s); a second signal stops at once"),
    Key("tcp-keepalive", "duration", "15s", group=_X, metavar="DURATION", lo=0,
        help="TCP keep-alive idle time and probe interval on both sockets; a dead peer is "
        "detected within about 4x this (default: %(default)s; 0 disables)"),
    Key("discovery-dns", "dns", "", group=_X, metavar="HOST:PORT",
        help="DNS server (IP:PORT or [IPv6]:PORT; port 53 if omitted) to ask for the SRV "
        "records of --discovery-srv and for their targets' addresses, at start-up, at refresh "
        "and at each connect (default: the system resolver)"),
    Key("discovery-refresh-min", "duration", "5s", group=_X, metavar="DURATION", positive=True,
        help="shortest interval between SRV re-resolutions: the records' TTL is clamped to "
        "[min, max]; failed lookups are retried after min, doubling up to max "
        "(default: %(default)s)"),
    Key("discovery-refresh-max", "duration", "5m", group=_X, metavar="DURATION", positive=True,
        help="longest interval between SRV re-resolutions, however long the TTL "
        "(default: %(default)s)"),
    Key("config-file", "string", "", group=_O, metavar="PATH", in_file=False,
        help="YAML file whose keys are the long flag names (as etcd's --config-file); flags "
        "on the command line win; SIGHUP re-reads it"),
    Key("health-check", "enum", "tcp", group=_O, choices=("none", "tcp", "etcd"),
        help="tcp: re-probe inactive endpoints every --retry-delay (etcd's behaviour); etcd: "
        "also GET /health on every endpoint every --health-interval; none: no probing, and a "
        "failed dial never takes an endpoint out of rotation (the client goes to the next) "
        "(default: %(default)s)"),
    Key("balance", "enum", "round-robin", group=_O, choices=("round-robin", "least-connections"),
        help="round-robin: the next endpoint in list order (etcd's behaviour); "
        "least-connections: the endpoint with the fewest live connections (divided by the "
        "SRV weight when weights are set), ties round-robin; within the best usable SRV "
        "priority class either way (default: %(default)s)"),
    Key("health-interval", "duration", "5s", group=_O, metavar="DURATION", positive=True,
        help="interval of --health-check=etcd checks (default: %(default)s)"),
    Key("health-rise", "int", "2", group=_O, metavar="N", lo=1, hi=1_000_000,
        help="consecutive good checks before an unhealthy endpoint gets clients again "
        "(default: %(default)s)"),
    Key("health-fall", "int", "3", group=_O, metavar="N", lo=1, hi=1_000_000,
        help="consecutive failed checks before a healthy endpoint gets no new clients "
        "(default: %(default)s)"),
    Key("health-cert-file", "string", "", group=_O, metavar="PATH",
        help="client certificate for health checks of TLS endpoints (with --trusted-ca-file)"),
    Key("health-key-file", "string", "", group=_O, metavar="PATH",
        help="key of --health-cert-file"),
    Key("auto-sync-interval", "duration", "0s", group=_O, metavar="DURATION", lo=0,
        help="ask the cluster for its member list this often (and on SIGHUP) and make the "
        "members' client URLs the endpoints; --endpoints or SRV records are the seeds "
        "(clientv3's AutoSyncInterval; default: %(default)s, off)"),
    Key("metrics-addr", "address", "", group=_O, metavar="HOST:PORT",
        help="serve /metrics (Prometheus), /health, /ready and /status there (default: off)"),
    Key("max-connections", "int", "0", group=_O, metavar="N", lo=0, hi=2**31 - 1,
        help="most client connections at once; more wait in the kernel's backlog "
        "(default: 0, unlimited)"),
    Key("listen-unix-mode", "mode", "0660", group=_O, metavar="MODE",
        help="permissions of unix:// listen sockets (default: %(default)s)"),
    Key("log-format", "enum", "json", group=_X, choices=("json", "text"),
        help="log line format on stderr (default: %(default)s, zap-style like etcd)"),
    Key("log-level", "enum", "info", group=_X, choices=("debug", "info", "warn", "error"),
        help="lowest level logged (default: %(default)s; debug adds a line per connection)"),
)  # fmt: skip
KEY_BY_NAME = {k.name: k for k in KEYS}


def convert(key: Key, text: str) -> object:
    """One key's text (a flag value or a config-file scalar) -> its typed value.

    Raises:
        ValueError: the reason, worded to follow `invalid argument "<text>" for "<flag>"
            flag: ` (pflag's form).
        ConfigError: for kinds whose message is the Go gateway's own (metrics address).
    """
    if "\0" in text:
        raise ValueError("must not contain a NUL character")
    kind = key.kind
    if kind == "duration":
        seconds = parse_duration(text)
        if key.positive and seconds <= 0:
            raise ValueError("must be positive")
        if key.lo is not None and seconds < key.lo:
            raise ValueError("must not be negative")
        return seconds
    if kind == "int":
        if not text.isascii() or not _INT.fullmatch(text):
            raise ValueError(f"strconv.ParseInt: parsing {go_quote(text)}: invalid syntax")
        n = int(text)
        if key.lo is not None and n < key.lo:
            raise ValueError(f"must be >= {int(key.lo)}")
        if key.hi is not None and n > key.hi:
            raise ValueError(f"must be <= {int(key.hi)}")
        return n
    if kind == "bool":
        # pflag's strconv.ParseBool
        if text in ("1", "t", "T", "true", "TRUE", "True"):
            return True
        if text in ("0", "f", "F", "false", "FALSE", "False"):
            return False
        raise ValueError(f"strconv.ParseBool: parsing {go_quote(text)}: invalid syntax")
    if kind == "mode":
        return parse_mode(text)
    if kind == "enum":
        if text not in key.choices:
            raise ValueError(f"must be one of {', '.join(key.choices)}")
        return text
    if kind == "address" and text:
        try:
            host, port_text = split_host_port(text)
            parse_port(port_text)
        except ValueError:
            raise ConfigError(
                f"failed to validate metrics address: {text}", stream="stderr"
            ) from None
        if host and (why := host_error(host)) is not None:
            raise ConfigError(f"failed to validate metrics address: {text}: {why}", stream="stderr")
        return text
    return text  # string, dns (checked by discovery.parse_dns_server), address ""


def parse_mode(text: str) -> int:
    """A unix permission mode: exactly 3 or 4 octal digits, at most 0777 (`0660`, `660`).

    `0o660`, `0_660`, ` 0660` and setuid/sticky bits are refused: the mode is a security
    setting, so only the one obvious spelling is accepted.
    """
    if not text.isascii() or not _MODE.fullmatch(text):
        raise ValueError("expected an octal mode such as 0660 (3 or 4 octal digits)")
    mode = int(text, 8)
    if mode > 0o777:
        raise ValueError("expected an octal mode such as 0660 (at most 0777)")
    return mode


def default_of(name: str) -> object:
    """A key's default, typed (its text default through its own converter)."""
    key = KEY_BY_NAME[name]
    assert key.default is not None
    return convert(key, key.default)


def _typed(name: str, typ: type[_T]) -> _T:
    v = default_of(name)
    assert isinstance(v, typ)
    return v


def _d(name: str) -> float:
    return _typed(name, float)


def _i(name: str) -> int:
    return _typed(name, int)


def _b(name: str) -> bool:
    return _typed(name, bool)


def _s(name: str) -> str:
    return _typed(name, str)


@dataclass(frozen=True)
class Config:
    """The gateway's whole configuration, built by cli.py from flags (and a config file).

    Defaults come from KEYS (one definition per key); fields without a key are internal.
    """

    listen: tuple[Listen, ...] = (parse_listen(DEFAULT_LISTEN_ADDR),)
    endpoints: tuple[Endpoint, ...] = tuple(parse_endpoint(e) for e in DEFAULT_ENDPOINTS)
    retry_delay: float = _d("retry-delay")
    dial_timeout: float = _d("dial-timeout")
    discovery_srv: str = _s("discovery-srv")
    discovery_srv_name: str = _s("discovery-srv-name")
    discovery_dns: str = _s("discovery-dns")
    discovery_refresh_min: float = _d("discovery-refresh-min")
    discovery_refresh_max: float = _d("discovery-refresh-max")
    insecure_discovery: bool = _b("insecure-discovery")
    trusted_ca_file: str = _s("trusted-ca-file")
    drain_timeout: float = _d("drain-timeout")
    tcp_keepalive: float = _d("tcp-keepalive")
    max_connections: int = _i("max-connections")  # 0: no cap
    listen_unix_mode: int = _i("listen-unix-mode")
    buffer_size: int = BUFSIZE  # the engines' read size (engine.BUFSIZE says why 32 KiB)
    health_check: str = _s("health-check")  # none|tcp|etcd
    balance: str = _s("balance")  # round-robin | least-connections
    health_interval: float = _d("health-interval")
    health_rise: int = _i("health-rise")
    health_fall: int = _i("health-fall")
    health_cert_file: str = _s("health-cert-file")
    health_key_file: str = _s("health-key-file")
    auto_sync_interval: float = _d("auto-sync-interval")  # 0: off (membership.py)
    metrics_addr: str = _s("metrics-addr")
    config_file: str = _s("config-file")
    log_format: str = _s("log-format")
    log_level: str = _s("log-level")
