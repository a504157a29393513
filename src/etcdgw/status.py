"""`etcdgw status`: fetch a running gateway's /status (its --metrics-addr) and print a table."""

from __future__ import annotations

import http.client
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any, TextIO

from .config import format_addr, split_host_port

__all__ = ["format_bytes", "format_uptime", "render", "run_status", "status_url"]

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
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            doc = json.loads(resp.read(16 * 1024 * 1024))
    except urllib.error.HTTPError as e:
        return _fail(f"cannot read {url}: {e.code} {e.reason} (is an etcdgw listening there?)")
    except urllib.error.URLError as e:
        reason = e.reason
        text = getattr(reason, "strerror", None) or str(reason)
        return _fail(
            f"cannot reach the gateway at {url}: {str(text).lower()} "
            "(is it running with this --metrics-addr?)"
        )
    except TimeoutError:
        return _fail(f"cannot reach the gateway at {url}: timed out after {timeout:g}s")
    except (OSError, http.client.HTTPException) as e:
        return _fail(f"cannot read {url}: {e.strerror if isinstance(e, OSError) else e}")
    except ValueError:
        return _fail(f"cannot read {url}: not a JSON status document")
    if not isinstance(doc, dict) or not isinstance(doc.get("endpoints"), list):
        return _fail(f"cannot read {url}: not an etcdgw status document")
    render(doc, sys.stdout)
    return 0


def _fail(message: str) -> int:
    print(f"etcdgw status: {message}", file=sys.stderr)
    return 1


def render(doc: dict[str, Any], out: TextIO) -> None:
    """A header line, then one table row per endpoint."""
    conns = doc.get("connections", {})
    total = doc.get("bytes", {})
    out.write(
        f"etcdgw {doc.get('version', '?')} (relay engine: {doc.get('engine', '?')}), "
        f"up {format_uptime(float(doc.get('uptime_seconds', 0)))}, "
        f"{'ready' if doc.get('ready') else 'NOT READY'}; connections: "
        f"{conns.get('active', 0)} active, {conns.get('accepted', 0)} accepted, "
        f"{conns.get('refused', 0)} refused; "
        f"sent {format_bytes(int(total.get('to_endpoints', 0)))}, "
        f"received {format_bytes(int(total.get('from_endpoints', 0)))}\n"
    )
    sync = doc.get("member_sync")
    if isinstance(sync, dict):
        ago = sync.get("last_success_seconds_ago")
        out.write(
            f"member list of cluster {sync.get('cluster_id') or '?'}: "
            + (f"synced {format_uptime(float(ago))} ago" if ago is not None else "never synced")
            + f"; syncs: {sync.get('ok', 0)} ok, {sync.get('failed', 0)} failed, "
            f"{sync.get('refused', 0)} refused\n"
        )
    checking = doc.get("health_check") == "etcd"
    # The SOURCE column appears once an endpoint came from somewhere other than --endpoints.
    sourced = any(ep.get("source", "flag") != "flag" for ep in doc["endpoints"])
    columns: Sequence[str] = (COLUMNS[0], "SOURCE", *COLUMNS[1:]) if sourced else COLUMNS
    rows: list[Sequence[str]] = [columns]
    for ep in doc["endpoints"]:
        state = "removed" if ep.get("removed") else str(ep.get("state", "?"))
        if not checking:
            health = "-"
        else:
            health = "healthy" if ep.get("healthy") else "unhealthy"
        # The error that explains the current state first; else the last one seen.
        if checking and not ep.get("healthy"):
            error = ep.get("last_health_error") or ep.get("last_error") or ""
        else:
            error = ep.get("last_error") or ep.get("last_health_error") or ""
        rows.append(
            (
                str(ep.get("address", "?")),
                *((str(ep.get("source", "flag")),) if sourced else ()),
                state,
                health,
                str(ep.get("active_connections", 0)),
                str(ep.get("total_connections", 0)),
                format_bytes(int(ep.get("bytes_to_endpoint", 0))),
                format_bytes(int(ep.get("bytes_from_endpoint", 0))),
                str(ep.get("dial_failures", 0)),
                error or "-",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(columns) - 1)]
    for r in rows:
        cells = [c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)]
        out.write("  ".join([*cells, r[-1]]).rstrip() + "\n")


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
