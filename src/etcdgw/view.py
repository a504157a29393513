"""What the metrics port reads of the running gateway (/metrics, /status, /health, /ready).

`View` names each source at its owner (the Balancer, the ConnTable, the Settings, the
relay's totals), so metrics.py and status documents are built and tested without a Gateway;
server.py's `Gateway` is one way to fill it (app.py builds it).
"""

from __future__ import annotations

import os
import platform
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .listeners import sock_name

if TYPE_CHECKING:
    from .balancer import Balancer, Remote
    from .membership import Membership
    from .settings import Settings
    from .table import ConnTable

__all__ = ["PYTHON_VERSION", "View", "endpoint_rows", "is_ready", "status_document"]

PYTHON_VERSION = platform.python_version()


@dataclass(frozen=True)
class View:
    """The running gateway's state, each part from its owner.

    Args:
        balancer: the endpoints and what is known of each.
        table: relayed pairs, dials in flight, counters, whether a drain runs.
        settings: the configuration in force.
        engine: the relay engine's name (`cython`, `python`).
        listeners: the gateway's listening sockets now.
        totals: bytes (client->endpoint, endpoint->client), live connections included.
        live_bytes: per relayed pair, the bytes moved so far.
        collect_now: takes in what the engine has not reported yet (native accept).
        ready: serving (the gateway said `ready to proxy client requests`).
        membership: the member-list sync (--auto-sync-interval), None when off.
    """

    balancer: Balancer
    table: ConnTable
    settings: Settings
    engine: str
    listeners: Callable[[], Sequence[socket.socket]]
    totals: Callable[[], tuple[int, int]]
    live_bytes: Callable[[], dict[int, tuple[int, int]]]
    collect_now: Callable[[], None]
    ready: Callable[[], bool]
    membership: Callable[[], Membership | None]


# --- what the gateway knows, per endpoint -----------------------------------------------------


def _remotes(view: View) -> list[Remote]:
    """Every remote in the list, plus removed ones that still carry live connections."""
    seen: dict[int, Remote] = {id(r): r for r in view.balancer.remotes}
    for conn in view.table.conns.values():
        seen.setdefault(id(conn.remote), conn.remote)
    return list(seen.values())


def endpoint_rows(view: View) -> list[dict[str, Any]]:
    """One row per remote (list order, then removed ones), bytes of live connections added."""
    live: dict[int, list[int]] = {}
    for pid, (c2u, u2c) in view.live_bytes().items():
        conn = view.table.conns.get(pid)
        if conn is None:
            continue
        acc = live.setdefault(id(conn.remote), [0, 0])
        acc[0] += c2u
        acc[1] += u2c
    now = time.monotonic()
    rows = []
    for r in _remotes(view):
        extra = live.get(id(r), (0, 0))
        rows.append(
            {
                "address": r.addr,
                "state": "up" if r.active else "down",
                "healthy": r.healthy,
                "removed": r.removed,
                "active_connections": r.connections_active,
                "total_connections": r.connections_total,
                "bytes_to_endpoint": r.bytes_to_endpoint + extra[0],
                "bytes_from_endpoint": r.bytes_from_endpoint + extra[1],
                "dial_failures": r.dial_failures,
                "down_seconds": (
                    round(now - r.down_since, 3) if r.down_since is not None else None
                ),
                "last_error": r.last_error,
                "health_checks_ok": r.health_ok_total,
                "health_checks_failed": r.health_failed_total,
                "last_health_error": r.last_health_error,
                "priority": r.endpoint.priority,
                "weight": r.endpoint.weight,
                "secure": r.endpoint.secure,
                # where it came from: flag (--endpoints, config file), srv, member-list
                "source": r.endpoint.source,
            }
        )
    return rows


def is_ready(view: View) -> bool:
    """Listening and not draining: what a load balancer in front of us should know."""
    return view.ready() and not view.table.draining


def status_document(view: View, started: float) -> dict[str, Any]:
    """The /status JSON: gateway totals and the endpoint table (see `etcdgw status`)."""
    c = view.table.counters
    sent, received = view.totals()
    listen = []
    for s in view.listeners():
        try:
            listen.append(sock_name(s))
        except OSError:
            continue  # closed meanwhile (a drain)
    return {
        "version": __version__,
        "engine": view.engine,
        "python": PYTHON_VERSION,
        "pid": os.getpid(),
        "uptime_seconds": round(time.monotonic() - started, 3),
        "ready": is_ready(view),
        "listen": listen,
        "health_check": view.settings.cfg.health_check,
        "connections": {
            "active": view.table.active_connections(),
            "accepted": c.accepted,
            "refused": c.refused,
            "accept_errors": c.accept_errors,
            "finished": c.finished,
            "reset": c.reset,
        },
        "bytes": {"to_endpoints": sent, "from_endpoints": received},
        "endpoints": endpoint_rows(view),
        # --auto-sync-interval: the member-list syncs (None when off)
        "member_sync": _member_status(view.membership()),
    }


def _member_status(membership: Membership | None) -> dict[str, Any] | None:
    return membership.status() if membership is not None else None
