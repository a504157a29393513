"""`etcdgw status`: fetch a running gateway's /status (its --metrics-addr) and print a table."""

from __future__ import annotations

import http.client
import io
import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any, TextIO

from .config import format_addr, split_host_port
from .goerrors import strerror

__all__ = [
    "BadDocument",
    "format_bytes",
    "format_uptime",
    "parse_document",
    "render",
    "run_status",
    "status_url",
]

MAX_DOCUMENT = 16 * 1024 * 1024  # bytes of /status read; the gateway's own is a few KiB
MAX_TEXT = 300  # characters of one text cell shown (an endpoint's last error)
MAX_SECONDS = 1e12  # an uptime or a time since: 31,000 years is not from a real gateway

COLUMNS = (
    "ENDPOINT",
    "STATE",
    "HEALTH",
    "ACTIVE",
    "TOTAL",
    "SENT",
    "RECEIVED",
    "FAILURES",
    "LAST ERROR",
)


def status_url(metrics_addr: str) -> str:
    """http://host:port/status for a --metrics-addr; a wildcard host means this machine."""
    host, port = split_host_port(metrics_addr)
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://{format_addr(host, int(port))}/status"


def run_status(metrics_addr: str, timeout: float) -> int:
    """Print the gateway's endpoint table. Returns 0, or 1 with one line on stderr."""
    try:
        url = status_url(metrics_addr)
    except ValueError as e:
        return _fail(f"invalid --metrics-addr {metrics_addr}: {e}")
    try:
        data = _fetch(url, timeout)
    except urllib.error.HTTPError as e:
        return _fail(f"cannot read {url}: {e.code} {e.reason} (is an etcdgw listening there?)")
    except urllib.error.URLError as e:
        reason = e.reason
        text = strerror(reason) if isinstance(reason, OSError) else str(reason)
        return _fail(
            f"cannot reach the gateway at {url}: {text.lower()} "
            "(is it running with this --metrics-addr?)"
        )
    except TimeoutError:
        return _fail(f"cannot reach the gateway at {url}: timed out after {timeout:g}s")
    except (OSError, http.client.HTTPException) as e:
        return _fail(f"cannot read {url}: {e.strerror if isinstance(e, OSError) else e}")
    try:
        doc = parse_document(data)
        if isinstance(doc, dict) and "endpoints" not in doc:
            return _fail(f"cannot read {url}: not an etcdgw status document")
        table = io.StringIO()
        render(doc, table)
    except BadDocument as e:
        return _fail(f"cannot read {url}: not a valid status document ({e})")
    sys.stdout.write(table.getvalue())
    return 0


def _fetch(url: str, timeout: float) -> bytes:
    """At most MAX_DOCUMENT + 1 bytes of url's body, within timeout in all: a server that
    trickles a byte now and then must not keep `etcdgw status` waiting for ever.

    Raises:
        TimeoutError: timeout passed.
        OSError, http.client.HTTPException, urllib.error.URLError: as urlopen.
    """
    deadline = time.monotonic() + timeout
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_DOCUMENT:
            if time.monotonic() > deadline:
                raise TimeoutError
            chunk = resp.read1(min(65536, MAX_DOCUMENT + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)


def _fail(message: str) -> int:
    # Escaped: the message may quote what the server sent (an HTTP reason phrase, a
    # redirect's URL), and a terminal must not run its escape sequences.
    print(f"etcdgw status: {_printable(message)}", file=sys.stderr)
    return 1


class BadDocument(ValueError):
    """The /status document is not what etcdgw writes; the message says where and why."""


def parse_document(data: bytes) -> Any:
    """The JSON value of a /status body (its shape is render()'s to check).

    Raises:
        BadDocument: too large, not UTF-8, not JSON, or nested too deeply to parse.
    """
    if len(data) > MAX_DOCUMENT:
        raise BadDocument(f"larger than {MAX_DOCUMENT} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadDocument(f"not UTF-8: byte 0x{data[e.start]:02x} at offset {e.start}") from None
    try:
        return json.loads(text)
    except RecursionError:
        raise BadDocument("nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, and ints past sys.get_int_max_str_digits()
        raise BadDocument(f"not JSON: {_cut(str(e))}") from None


def render(doc: Any, out: TextIO) -> None:
    """A header line, then one table row per endpoint.

    Every value shown is checked to be of the type etcdgw writes, so a hostile or broken
    document (wrong types, strings for numbers, 1e999, a list for an object) is one
    BadDocument, raised before anything is written. A missing key shows its default: an
    older gateway may not write it. Text is shown with control characters escaped (a
    document cannot move the terminal's cursor) and cut at MAX_TEXT characters.

    Raises:
        BadDocument: naming the first value that is not what etcdgw writes.
    """
    top = _Object(doc, "")
    conns, total = top.object("connections"), top.object("bytes")
    lines = [
        f"etcdgw {top.text('version', '?')} (relay engine: {top.text('engine', '?')}), "
        f"up {format_uptime(top.seconds('uptime_seconds') or 0)}, "
        f"{'ready' if top.flag('ready') else 'NOT READY'}; connections: "
        f"{conns.count('active')} active, {conns.count('accepted')} accepted, "
        f"{conns.count('refused')} refused; "
        f"sent {format_bytes(total.count('to_endpoints'))}, "
        f"received {format_bytes(total.count('from_endpoints'))}"
    ]
    if top.has("member_sync"):
        sync = top.object("member_sync")
        ago = sync.seconds("last_success_seconds_ago")
        lines.append(
            f"member list of cluster {sync.text('cluster_id', '') or '?'}: "
            + (f"synced {format_uptime(ago)} ago" if ago is not None else "never synced")
            + f"; syncs: {sync.count('ok')} ok, {sync.count('failed')} failed, "
            f"{sync.count('refused')} refused"
        )
    checking = top.text("health_check", "") == "etcd"
    endpoints = [_Object(ep, f"endpoints[{i}].") for i, ep in enumerate(top.list("endpoints"))]
    # The SOURCE column appears once an endpoint came from somewhere other than --endpoints.
    sourced = any(ep.text("source", "flag") != "flag" for ep in endpoints)
    columns: Sequence[str] = (COLUMNS[0], "SOURCE", *COLUMNS[1:]) if sourced else COLUMNS
    rows: list[Sequence[str]] = [columns]
    for ep in endpoints:
        state = "removed" if ep.flag("removed") else ep.text("state", "?")
        healthy = ep.flag("healthy")
        health = "-" if not checking else "healthy" if healthy else "unhealthy"
        # The error that explains the current state first; else the last one seen.
        health_error, last_error = ep.text("last_health_error", ""), ep.text("last_error", "")
        if checking and not healthy:
            error = health_error or last_error
        else:
            error = last_error or health_error
        rows.append(
            (
                ep.text("address", "?"),
                *((ep.text("source", "flag"),) if sourced else ()),
                state,
                health,
                str(ep.count("active_connections")),
                str(ep.count("total_connections")),
                format_bytes(ep.count("bytes_to_endpoint")),
                format_bytes(ep.count("bytes_from_endpoint")),
                str(ep.count("dial_failures")),
                error or "-",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(columns) - 1)]
    for r in rows:
        cells = [c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)]
        lines.append("  ".join([*cells, r[-1]]).rstrip())
    out.write("\n".join(lines) + "\n")


class _Object:
    """One JSON object of a /status document, read key by key as the type etcdgw writes."""

    def __init__(self, value: Any, where: str) -> None:
        if not isinstance(value, dict):
            raise BadDocument(
                f"{where.rstrip('.') or 'the document'}: {_expected('an object', value)}"
            )
        self.value: dict[str, Any] = value
        self.where = where

    def has(self, key: str) -> bool:
        """Whether key is there and not null."""
        return self.value.get(key) is not None

    def _get(self, key: str, types: tuple[type, ...], what: str) -> Any:
        v = self.value.get(key)
        # bool is an int to Python, never a count or a time to etcdgw.
        if v is not None and (not isinstance(v, types) or isinstance(v, bool) != (bool in types)):
            raise BadDocument(f"{self.where}{key}: {_expected(what, v)}")
        return v

    def object(self, key: str) -> _Object:
        """A nested object; missing or null reads as an empty one."""
        v = self._get(key, (dict,), "an object")
        return _Object({} if v is None else v, f"{self.where}{key}.")

    def list(self, key: str) -> list[Any]:
        v = self._get(key, (list,), "a list")
        return [] if v is None else v

    def count(self, key: str) -> int:
        """A counter or gauge: a whole number from 0 to 2**64 - 1; missing or null is 0."""
        v = self._get(key, (int,), "a whole number")
        if v is not None and not 0 <= v < 2**64:
            raise BadDocument(
                f"{self.where}{key}: {_expected('a whole number from 0 to 2**64-1', v)}"
            )
        return v or 0

    def seconds(self, key: str) -> float | None:
        """A duration: a finite number from 0 to MAX_SECONDS; missing or null is None."""
        v = self._get(key, (int, float), "a number of seconds")
        if v is not None and not 0 <= v <= MAX_SECONDS:  # also NaN; 1e999 parses as inf
            raise BadDocument(
                f"{self.where}{key}: {_expected(f'seconds from 0 to {MAX_SECONDS:g}', v)}"
            )
        return None if v is None else float(v)

    def flag(self, key: str) -> bool:
        return bool(self._get(key, (bool,), "true or false"))

    def text(self, key: str, default: str) -> str:
        """Text to show: control characters escaped, cut at MAX_TEXT; missing or null is
        the default."""
        v = self._get(key, (str,), "a string")
        return default if v is None else _cut(_printable(v))


def _expected(what: str, value: Any) -> str:
    if isinstance(value, dict | list):
        got = "an object" if isinstance(value, dict) else "a list"
    else:
        got = _cut(_printable(json.dumps(value)), 40)  # inf and NaN show as Infinity, NaN
    return f"expected {what}, got {got}"


def _printable(text: str) -> str:
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def _cut(text: str, limit: int = MAX_TEXT) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def format_bytes(n: int) -> str:
    """Binary units, 3 significant digits: 0 B, 999 B, 1.5 KiB, 12.3 MiB, 118 GiB."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            if unit == "B":
                return f"{int(value)} B"
            return f"{value:.1f} {unit}" if value < 100 else f"{value:.0f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_uptime(seconds: float) -> str:
    """Whole seconds, Go style: 59s, 1m5s, 2h0m3s, 3d4h5m."""
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if d:
        return f"{d}d{h}h{m}m"
    if h:
        return f"{h}h{m}m{s}s"
    if m:
        return f"{m}m{s}s"
    return f"{s}s"
