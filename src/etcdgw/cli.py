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
import dataclasses
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from ._version import __version__
from .config import (
    DEFAULT_ENDPOINTS,
    DEFAULT_LISTEN_ADDR,
    KEY_BY_NAME,
    KEYS,
    Config,
    ConfigError,
    Key,
    convert,
    parse_listen,
)
from .configfile import FileValue, read_config_file
from .golang import go_quote, parse_duration
from .systemd import Interrupted, StartupSignals

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
BOOL_FLAGS = {k.flag for k in KEYS if k.kind == "bool"}


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
        description=(
            "Start the gateway (the same flags as `etcd gateway start`). SIGUSR2 upgrades it "
            "live: a new process started with the same command line takes over the "
            "listeners and every open connection, and this one exits."
        ),
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
    """The `start` flags, one per config.KEYS entry (so the man page and the file agree)."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for key in KEYS:
        g = groups.get(key.group)
        if g is None:
            g = groups[key.group] = p.add_argument_group(key.group)
        kw: dict[str, Any] = {"help": key.help}
        if key.metavar is not None:
            kw["metavar"] = key.metavar
        if key.choices:
            kw["choices"] = key.choices
        if key.kind in ("listen", "endpoints"):
            kw["action"] = "append"
        elif key.kind == "bool":
            kw.update(nargs="?", const="true", default=key.default)
        else:
            kw["default"] = key.default
        g.add_argument(key.flag, **kw)


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


def split_endpoints(values: Sequence[str] | None, flag: str = "--endpoints") -> list[str]:
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
                f"invalid argument {go_quote(v)} for {go_quote(flag)} flag: {e}"
            ) from None
    return out


class _Values:
    """Each key's text from the command line, or from the config file when not given there."""

    def __init__(self, ns: argparse.Namespace, file_values: dict[str, FileValue], path: str):
        self.ns = ns
        self.file = file_values
        self.path = path

    def text(self, key: Key) -> Any:
        if key.name in self.file:
            v = self.file[key.name]
            return key.default if v is None else v
        return getattr(self.ns, key.dest)

    def get(self, name: str) -> Any:
        key = KEY_BY_NAME[name]
        text = self.text(key)
        try:
            return convert(key, text)
        except ValueError as e:
            reason = str(e)
            short = reason if len(reason) <= 300 else reason[:300] + "..."
            raise self.error(key, text, short) from None

    def error(self, key: Key, text: str, reason: str) -> Exception:
        shown = go_quote(text if len(text) <= 100 else text[:100] + "...")  # one short line
        if key.name in self.file:
            return ConfigError(
                f"invalid config file {self.path}: {key.name}: {shown}: {reason}",
                stream="stderr",
            )
        return UsageError(f"invalid argument {shown} for {go_quote(key.flag)} flag: {reason}")

    def texts(self, name: str) -> list[str] | None:
        """A list key's occurrences (None: not given anywhere)."""
        key = KEY_BY_NAME[name]
        v = self.text(key)
        if v is None or isinstance(v, list):
            values = v
        else:
            values = [v]  # a single scalar in the file
        for t in values or ():
            if "\0" in t:
                raise self.error(key, t, "must not contain a NUL character")
        return values


def build_config(
    ns: argparse.Namespace, file_values: dict[str, FileValue] | None = None, path: str = ""
) -> tuple[Config, list[str]]:
    """Flags (and config-file values) -> (Config without endpoints parsed, raw endpoints).

    Every value goes through its key's converter (config.convert), whichever way it came.
    Endpoints are parsed later (after SRV discovery), in the Go gateway's order.
    """
    v = _Values(ns, file_values or {}, path)
    rmin, rmax = v.get("discovery-refresh-min"), v.get("discovery-refresh-max")
    if rmin > rmax:
        raise UsageError("--discovery-refresh-min must not be greater than --discovery-refresh-max")
    cert, key = v.get("health-cert-file"), v.get("health-key-file")
    if bool(cert) != bool(key):
        raise UsageError("--health-cert-file and --health-key-file go together")
    dns = v.get("discovery-dns")
    if dns:
        from .resolver import parse_dns_server

        parse_dns_server(dns)  # ConfigError on a malformed value
    listens = v.texts("listen-addr") or [DEFAULT_LISTEN_ADDR]
    given: dict[str, Any] = {
        "listen": tuple(parse_listen(a) for a in listens),
        "endpoints": (),
        "discovery_dns": dns,
        "discovery_refresh_min": rmin,
        "discovery_refresh_max": rmax,
        "health_cert_file": cert,
        "health_key_file": key,
    }
    # Every other field named after a key (retry_delay <- retry-delay) takes that key's value.
    for f in dataclasses.fields(Config):
        name = f.name.replace("_", "-")
        if f.name not in given and name in KEY_BY_NAME:
            given[f.name] = v.get(name)
    cfg = Config(**given)
    return cfg, split_endpoints(v.texts("endpoints"))


def version_text() -> str:
    from .relay import IMPLEMENTATION

    return f"etcdgw {__version__} (relay engine: {IMPLEMENTATION}; Python {sys.version.split()[0]})"


def parse_start(args: Sequence[str]) -> tuple[Config, list[str]]:
    """`start` flags (+ --config-file) -> (Config, raw endpoints). Also used by SIGHUP reload.

    Raises:
        UsageError: a bad flag value.
        ConfigError: an unreadable or invalid config file (or a value in it).
    """
    parser = get_parser()
    argv = normalise_argv(args, parser)
    return config_from(parser.parse_args(argv), argv)


def config_from(ns: argparse.Namespace, argv: Sequence[str]) -> tuple[Config, list[str]]:
    """A parsed `start` command line (+ its --config-file) -> (Config, raw endpoints)."""
    file_values: dict[str, FileValue] = {}
    if ns.config_file:
        given = given_flags(argv)
        file_values = {
            k: v for k, v in read_config_file(ns.config_file).items() if "--" + k not in given
        }
    return build_config(ns, file_values, ns.config_file)


def given_flags(argv: Sequence[str]) -> set[str]:
    """Long flag names that appear on the command line (they win over the config file)."""
    return {a.split("=", 1)[0] for a in argv if a.startswith("--")}


def _start_parser() -> argparse.ArgumentParser:
    return _sub(get_parser())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `etcdgw` console script. Returns the exit code (see README).

    0: stopped by SIGTERM/SIGINT (also before ready), --version, --help; 1: any start-up
    error, as one line. Signals are handled from here on: see systemd.StartupSignals.
    """
    signals = StartupSignals().install()
    try:
        return _main(list(sys.argv[1:] if argv is None else argv), signals)
    except Interrupted:
        return 0  # stopped during parsing, before anything was bound: nothing to undo
    finally:
        signals.restore()


def reparse(args: Sequence[str]) -> tuple[Config, list[str]]:
    """parse_start for a SIGHUP reload: every failure is a ConfigError (one log line)."""
    try:
        return parse_start(args)
    except UsageError as e:
        raise ConfigError(str(e), stream="stderr") from None


def _main(args: list[str], signals: StartupSignals) -> int:
    parser = get_parser()
    try:
        normalised = normalise_argv(args, parser)
        ns = parser.parse_args(normalised)
        if ns.version or ns.command == "version":
            print(version_text())
            return 0
        if ns.command == "status":
            from .status import run_status

            return run_status(ns.metrics_addr, _duration("--timeout", ns.timeout))
        if ns.command != "start":
            parser.print_help(sys.stderr)
            return 1
        cfg, raw_endpoints = config_from(ns, normalised)
    except UsageError as e:
        # cobra prints "Error: <msg>" and the usage, then etcd's Main prints the error again.
        print(f"Error: {e}", file=sys.stderr)
        print(f"Run '{PROG} start --help' for usage.", file=sys.stderr)
        return 1
    except ConfigError as e:
        e.show()
        return 1

    from .app import start

    return start(
        cfg,
        raw_endpoints,
        argv=[PROG, *args],
        reparse=lambda: reparse(args),
        signals=signals,
    )
