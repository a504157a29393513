"""Command line: `etcdgw start` with `etcd gateway start`'s flags, `etcdgw status`, --version.

Flag names, defaults and value syntax follow etcd's server/etcdmain/gateway.go (cobra/pflag):
flags may stand before or after `start`, `--flag=value` and `--flag value` both work,
`--endpoints` is comma-separated and appends when repeated, durations use Go syntax. User
mistakes print one clear line (the Go gateway's text where it has one) and exit 1, never a
traceback. This module imports nothing heavy at import time: argparse-manpage loads
get_parser() at build time.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Sequence
from typing import NoReturn

from ._version import __version__
from .config import (
    DEFAULT_ENDPOINTS,
    DEFAULT_LISTEN_ADDR,
    Config,
    ConfigError,
    go_quote,
    parse_duration,
    parse_listen,
)

PROG = "etcdgw"


class UsageError(Exception):
    """A flag the parser did not accept (cobra's `Error: ...`, exit 1)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(_cobra_message(message))


def _cobra_message(message: str) -> str:
    # argparse: "unrecognized arguments: --foo bar"; cobra/pflag: "unknown flag: --foo".
    if message.startswith("unrecognized arguments: "):
        extra = message.split(": ", 1)[1]
        first = extra.split()[0] if extra.split() else extra  # `start ''`: nothing to split
        if not first.startswith("-"):
            return f"unexpected argument {go_quote(first)}"
        # pflag names the flag alone: `--foo=1` is reported as `unknown flag: --foo`.
        return "unknown flag: " + first.split("=", 1)[0]
    if message.startswith("argument ") and ": expected one argument" in message:
        flag = message.split()[1].split("/")[-1].rstrip(":")
        return f"flag needs an argument: {flag}"
    return message


# pflag bools take no separate value: `--insecure-discovery start` must not eat `start`.
BOOL_FLAGS = {"--insecure-discovery"}


def get_parser() -> argparse.ArgumentParser:
    """The whole command line (also read by argparse-manpage to write man/etcdgw.1)."""
    # No abbreviations: pflag rejects `--end=h:1`, so must we (argparse would take --endpoints).
    parser = _Parser(
        prog=PROG,
        allow_abbrev=False,
        description=(
            "etcdgw is a stateless local TCP gateway for etcd: applications connect to it and "
            "it forwards raw bytes round-robin to the etcd cluster's client endpoints, "
            "skipping endpoints that fail. It is a drop-in replacement for `etcd gateway "
            "start` with the same flags, plus dial timeouts, half-close, SRV refresh and a "
            "faster relay."
        ),
    )
    parser.add_argument(
        "--version", action="store_true", help="print the version and the relay engine in use"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    start = sub.add_parser(
        "start",
        allow_abbrev=False,
        help="start the gateway",
        description="Start the gateway (the same flags as `etcd gateway start`).",
    )
    add_start_flags(start)
    status = sub.add_parser(
        "status",
        allow_abbrev=False,
        help="print the endpoint table of a running gateway (needs its --metrics-addr)",
        description="Read a running gateway's metrics endpoint and print its endpoints.",
    )
    status.add_argument(
        "--metrics-addr",
        default="127.0.0.1:23791",
        help="the running gateway's --metrics-addr (default: %(default)s)",
    )
    status.add_argument(
        "--timeout", default="3s", help="how long to wait for the gateway (default: %(default)s)"
    )
    sub.add_parser("version", help="print the version and the relay engine in use")
    return parser


def add_start_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("etcd gateway flags")
    g.add_argument(
        "--listen-addr", action="append", metavar="ADDR",
        help=f"listen address (default: {DEFAULT_LISTEN_ADDR}). etcdgw: may be repeated; "
        "host:port, [ipv6]:port or unix:///path",
    )  # fmt: skip
    g.add_argument(
        "--endpoints", action="append", metavar="LIST",
        help="comma separated etcd cluster endpoints (default: 127.0.0.1:2379); repeating "
        "the flag appends; http:// and https:// prefixes are stripped",
    )  # fmt: skip
    g.add_argument(
        "--retry-delay", default="1m0s", metavar="DURATION",
        help="duration of delay before retrying failed endpoints (default: %(default)s; "
        "0 means 5m, as in etcd)",
    )  # fmt: skip
    g.add_argument(
        "--discovery-srv", default="", metavar="DOMAIN",
        help="DNS domain used to bootstrap initial cluster",
    )  # fmt: skip
    g.add_argument(
        "--discovery-srv-name", default="", metavar="NAME",
        help="service name to query when using DNS discovery",
    )  # fmt: skip
    g.add_argument(
        "--insecure-discovery", nargs="?", const="true", default="false", metavar="BOOL",
        help="accept insecure SRV records",
    )  # fmt: skip
    g.add_argument(
        "--trusted-ca-file", default="", metavar="PATH",
        help="path to the client server TLS CA file for verifying the discovered endpoints "
        "when discovery-srv is provided. etcdgw: discovered https SRV targets must complete "
        "a TLS handshake whose certificate chains to it and names the target (system trust "
        "store when empty)",
    )  # fmt: skip
    x = p.add_argument_group("etcdgw flags")
    x.add_argument(
        "--dial-timeout", default="5s", metavar="DURATION",
        help="timeout for connecting to an endpoint before trying the next (default: "
        "%(default)s; the Go gateway has none)",
    )  # fmt: skip
    x.add_argument(
        "--drain-timeout", default="30s", metavar="DURATION",
        help="on SIGTERM/SIGINT, how long live connections may finish before they are "
        "closed (default: %(default)s); a second signal stops at once",
    )  # fmt: skip
    x.add_argument(
        "--tcp-keepalive", default="15s", metavar="DURATION",
        help="TCP keep-alive idle time and probe interval on both sockets; a dead peer is "
        "detected within about 4x this (default: %(default)s; 0 disables)",
    )  # fmt: skip
    x.add_argument(
        "--discovery-dns", default="", metavar="HOST:PORT",
        help="DNS server (IP:PORT or [IPv6]:PORT; port 53 if omitted) to ask for the SRV "
        "records of --discovery-srv and for their targets' addresses, at start-up, at refresh "
        "and at each connect (default: the system resolver)",
    )  # fmt: skip
    x.add_argument(
        "--discovery-refresh-min", default="5s", metavar="DURATION",
        help="shortest interval between SRV re-resolutions: the records' TTL is clamped to "
        "[min, max]; failed lookups are retried after min, doubling up to max "
        "(default: %(default)s)",
    )  # fmt: skip
    x.add_argument(
        "--discovery-refresh-max", default="5m", metavar="DURATION",
        help="longest interval between SRV re-resolutions, however long the TTL "
        "(default: %(default)s)",
    )  # fmt: skip
    o = p.add_argument_group("operations flags")
    o.add_argument(
        "--config-file", default="", metavar="PATH",
        help="YAML file whose keys are the long flag names (as etcd's --config-file); flags "
        "on the command line win; SIGHUP re-reads it",
    )  # fmt: skip
    o.add_argument(
        "--health-check", default="tcp", choices=("none", "tcp", "etcd"),
        help="tcp: re-probe inactive endpoints every --retry-delay (etcd's behaviour); etcd: "
        "also GET /health on every endpoint every --health-interval; none: no probing, and a "
        "failed dial never takes an endpoint out of rotation (the client goes to the next) "
        "(default: %(default)s)",
    )  # fmt: skip
    o.add_argument(
        "--balance", default="round-robin", choices=("round-robin", "least-connections"),
        help="round-robin: the next endpoint in list order (etcd's behaviour); "
        "least-connections: the endpoint with the fewest live connections (divided by the "
        "SRV weight when weights are set), ties round-robin; within the best usable SRV "
        "priority class either way (default: %(default)s)",
    )  # fmt: skip
    o.add_argument(
        "--health-interval", default="5s", metavar="DURATION",
        help="interval of --health-check=etcd checks (default: %(default)s)",
    )  # fmt: skip
    o.add_argument(
        "--health-rise", default="2", metavar="N",
        help="consecutive good checks before an unhealthy endpoint gets clients again "
        "(default: %(default)s)",
    )  # fmt: skip
    o.add_argument(
        "--health-fall", default="3", metavar="N",
        help="consecutive failed checks before a healthy endpoint gets no new clients "
        "(default: %(default)s)",
    )  # fmt: skip
    o.add_argument(
        "--health-cert-file", default="", metavar="PATH",
        help="client certificate for health checks of TLS endpoints (with --trusted-ca-file)",
    )  # fmt: skip
    o.add_argument(
        "--health-key-file", default="", metavar="PATH",
        help="key of --health-cert-file",
    )  # fmt: skip
    o.add_argument(
        "--auto-sync-interval", default="0s", metavar="DURATION",
        help="ask the cluster for its member list this often (and on SIGHUP) and make the "
        "members' client URLs the endpoints; --endpoints or SRV records are the seeds "
        "(clientv3's AutoSyncInterval; default: %(default)s, off)",
    )  # fmt: skip
    o.add_argument(
        "--metrics-addr", default="", metavar="HOST:PORT",
        help="serve /metrics (Prometheus), /health, /ready and /status there (default: off)",
    )  # fmt: skip
    o.add_argument(
        "--max-connections", default="0", metavar="N",
        help="most client connections at once; more wait in the kernel's backlog "
        "(default: 0, unlimited)",
    )  # fmt: skip
    o.add_argument(
        "--listen-unix-mode", default="0660", metavar="MODE",
        help="permissions of unix:// listen sockets (default: %(default)s)",
    )  # fmt: skip
    x.add_argument(
        "--log-format", default="json", choices=("json", "text"),
        help="log line format on stderr (default: %(default)s, zap-style like etcd)",
    )  # fmt: skip
    x.add_argument(
        "--log-level", default="info", choices=("debug", "info", "warn", "error"),
        help="lowest level logged (default: %(default)s; debug adds a line per connection)",
    )  # fmt: skip


def _sub(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    start: argparse.ArgumentParser = sub.choices["start"]
    return start


def _value_flags(parser: argparse.ArgumentParser) -> tuple[set[str], set[str]]:
    """(flags of `start` that take a value, all flags of `start`)."""
    start = _sub(parser)
    takes, every = set(), set()
    for a in start._actions:
        for opt in a.option_strings:
            every.add(opt)
            if a.nargs != 0 and opt not in BOOL_FLAGS:
                takes.add(opt)
    return takes, every


def normalise_argv(argv: Sequence[str], parser: argparse.ArgumentParser) -> list[str]:
    """Move `start` flags given before the subcommand after it (cobra accepts both)."""
    takes, every = _value_flags(parser)
    before: list[str] = []
    i = 0
    argv = list(argv)
    while i < len(argv):
        tok = argv[i]
        if tok == "--":
            break
        if not tok.startswith("-"):
            if tok in ("start", "status", "version"):
                return [tok, *before, *argv[i + 1 :]] if before else argv
            break
        name = tok.split("=", 1)[0]
        if name in every and name not in ("-h", "--help"):
            n = 2 if ("=" not in tok and name in takes and i + 1 < len(argv)) else 1
            before.extend(argv[i : i + n])
            del argv[i : i + n]
            continue
        i += 1
    return [*before, *argv] if before else argv


def _duration(flag: str, value: str) -> float:
    try:
        return parse_duration(value)
    except ValueError as e:
        raise UsageError(
            f"invalid argument {go_quote(value)} for {go_quote(flag)} flag: {e}"
        ) from None


def _bool(flag: str, value: str) -> bool:
    # pflag's strconv.ParseBool
    v = value.lower()
    if v in ("1", "t", "true"):
        return True
    if v in ("0", "f", "false"):
        return False
    raise UsageError(
        f"invalid argument {go_quote(value)} for {go_quote(flag)} flag: "
        f"strconv.ParseBool: parsing {go_quote(value)}: invalid syntax"
    )


def _int(flag: str, value: str, minimum: int) -> int:
    try:
        n = int(value)
    except ValueError:
        raise UsageError(
            f"invalid argument {go_quote(value)} for {go_quote(flag)} flag: "
            f"strconv.ParseInt: parsing {go_quote(value)}: invalid syntax"
        ) from None
    if n < minimum:
        raise UsageError(
            f"invalid argument {go_quote(value)} for {go_quote(flag)} flag: must be >= {minimum}"
        )
    return n


def split_endpoints(values: Sequence[str] | None) -> list[str]:
    """pflag StringSlice: CSV per occurrence, appended; no flag -> the default."""
    if values is None:
        return list(DEFAULT_ENDPOINTS)
    out: list[str] = []
    for v in values:
        if v == "":
            continue
        try:
            out.extend(next(csv.reader([v])))
        except (csv.Error, StopIteration) as e:
            raise UsageError(
                f'invalid argument {go_quote(v)} for "--endpoints" flag: {e}'
            ) from None
    return out


def build_config(ns: argparse.Namespace) -> tuple[Config, list[str]]:
    """Flags -> (Config without endpoints parsed, raw endpoint strings).

    Endpoints are parsed later (after SRV discovery), in the Go gateway's order.
    """
    retry = _duration("--retry-delay", ns.retry_delay)
    if retry < 0:
        # Go accepts it and then spins re-probing with no pause; refuse instead.
        raise UsageError(
            f'invalid argument {go_quote(ns.retry_delay)} for "--retry-delay" flag: '
            "must not be negative"
        )
    dial = _duration("--dial-timeout", ns.dial_timeout)
    drain = _duration("--drain-timeout", ns.drain_timeout)
    keepalive = _duration("--tcp-keepalive", ns.tcp_keepalive)
    rmin = _duration("--discovery-refresh-min", ns.discovery_refresh_min)
    rmax = _duration("--discovery-refresh-max", ns.discovery_refresh_max)
    for flag, val in (
        ("--dial-timeout", dial),
        ("--discovery-refresh-min", rmin),
        ("--discovery-refresh-max", rmax),
    ):
        if val <= 0:
            raise UsageError(f"invalid argument for {go_quote(flag)} flag: must be positive")
    for flag, val in (("--drain-timeout", drain), ("--tcp-keepalive", keepalive)):
        if val < 0:
            raise UsageError(f"invalid argument for {go_quote(flag)} flag: must not be negative")
    if rmin > rmax:
        raise UsageError("--discovery-refresh-min must not be greater than --discovery-refresh-max")
    health_interval = _duration("--health-interval", ns.health_interval)
    if health_interval <= 0:
        raise UsageError('invalid argument for "--health-interval" flag: must be positive')
    auto_sync = _duration("--auto-sync-interval", ns.auto_sync_interval)
    if auto_sync < 0:
        raise UsageError('invalid argument for "--auto-sync-interval" flag: must not be negative')
    rise = _int("--health-rise", ns.health_rise, 1)
    fall = _int("--health-fall", ns.health_fall, 1)
    max_conns = _int("--max-connections", ns.max_connections, 0)
    try:
        unix_mode = int(ns.listen_unix_mode, 8)
        if not 0 <= unix_mode <= 0o777:
            raise ValueError
    except ValueError:
        raise UsageError(
            f"invalid argument {go_quote(ns.listen_unix_mode)} for "
            '"--listen-unix-mode" flag: expected an octal mode such as 0660'
        ) from None
    if bool(ns.health_cert_file) != bool(ns.health_key_file):
        raise UsageError("--health-cert-file and --health-key-file go together")
    if ns.discovery_dns:
        from .resolver import parse_dns_server

        parse_dns_server(ns.discovery_dns)  # ConfigError on a malformed value
    listens = ns.listen_addr or [DEFAULT_LISTEN_ADDR]
    cfg = Config(
        listen=tuple(parse_listen(a) for a in listens),
        endpoints=(),
        retry_delay=retry,
        dial_timeout=dial,
        discovery_srv=ns.discovery_srv,
        discovery_srv_name=ns.discovery_srv_name,
        discovery_dns=ns.discovery_dns,
        discovery_refresh_min=rmin,
        discovery_refresh_max=rmax,
        insecure_discovery=_bool("--insecure-discovery", ns.insecure_discovery),
        trusted_ca_file=ns.trusted_ca_file,
        log_format=ns.log_format,
        log_level=ns.log_level,
        drain_timeout=drain,
        tcp_keepalive=keepalive,
        max_connections=max_conns,
        listen_unix_mode=unix_mode,
        health_check=ns.health_check,
        balance=ns.balance,
        health_interval=health_interval,
        health_rise=rise,
        health_fall=fall,
        health_cert_file=ns.health_cert_file,
        health_key_file=ns.health_key_file,
        auto_sync_interval=auto_sync,
        metrics_addr=ns.metrics_addr,
        config_file=ns.config_file,
    )
    return cfg, split_endpoints(ns.endpoints)


def version_text() -> str:
    from .relay import IMPLEMENTATION

    return f"etcdgw {__version__} (relay engine: {IMPLEMENTATION}; Python {sys.version.split()[0]})"


def parse_start(args: Sequence[str]) -> tuple[Config, list[str]]:
    """`start` flags (+ --config-file) -> (Config, raw endpoints). Also used by SIGHUP reload.

    Raises:
        UsageError: a bad flag or config-file value.
        ConfigError: an unreadable or invalid config file.
    """
    parser = get_parser()
    argv = normalise_argv(args, parser)
    ns = parser.parse_args(argv)
    if ns.config_file:
        apply_config_file(ns, ns.config_file, given_flags(argv))
    return build_config(ns)


def given_flags(argv: Sequence[str]) -> set[str]:
    """Long flag names that appear on the command line (they win over the config file)."""
    return {a.split("=", 1)[0] for a in argv if a.startswith("--")}


def apply_config_file(ns: argparse.Namespace, path: str, given: set[str]) -> None:
    """Fill ns from a YAML file whose keys are long flag names, like etcd's --config-file.

    Raises:
        ConfigError: unreadable file, invalid YAML, unknown key (stderr, exit 1).
    """
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}", stream="stderr") from e
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise ConfigError(f"invalid config file {path}: YAML error{at}", stream="stderr") from e
    if data is None:
        return
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config file {path}: expected a mapping", stream="stderr")
    known = {a.dest: a for a in _start_parser()._actions if a.option_strings}
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        action = known.get(dest)
        if action is None or dest in ("help", "config_file"):
            raise ConfigError(f"invalid config file {path}: unknown key {key!r}", stream="stderr")
        if action.option_strings[0] in given:
            continue
        if isinstance(value, bool):
            value = "true" if value else "false"
        if isinstance(action, argparse._AppendAction):
            items = value if isinstance(value, list) else [value]
            value = [str(v) for v in items]
        elif isinstance(value, list | dict):
            raise ConfigError(
                f"invalid config file {path}: {key} must be a single value", stream="stderr"
            )
        else:
            value = str(value)
        if action.choices is not None and value not in action.choices:
            raise ConfigError(
                f"invalid config file {path}: {key}: {value!r} is not one of "
                + ", ".join(map(str, action.choices)),
                stream="stderr",
            )
        setattr(ns, dest, value)


def _start_parser() -> argparse.ArgumentParser:
    return _sub(get_parser())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `etcdgw` console script. Returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    parser = get_parser()
    try:
        ns = parser.parse_args(normalise_argv(args, parser))
        if ns.version or ns.command == "version":
            print(version_text())
            return 0
        if ns.command == "status":
            from .status import run_status

            return run_status(ns.metrics_addr, _duration("--timeout", ns.timeout))
        if ns.command != "start":
            parser.print_help(sys.stderr)
            return 1
        cfg, raw_endpoints = parse_start(args)
    except UsageError as e:
        # cobra prints "Error: <msg>" and the usage, then etcd's Main prints the error again.
        print(f"Error: {e}", file=sys.stderr)
        print(f"Run '{PROG} start --help' for usage.", file=sys.stderr)
        return 1
    except ConfigError as e:
        _print_config_error(e)
        return 1

    from .app import start

    return start(cfg, raw_endpoints, argv=[PROG, *args])


def _print_config_error(e: ConfigError) -> None:
    stream = sys.stdout if e.stream == "stdout" else sys.stderr
    print(e.message, file=stream)
    stream.flush()


def fail(e: ConfigError) -> int:
    _print_config_error(e)
    return 1
