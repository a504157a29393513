"""The gateway's Prometheus metrics: one custom prometheus_client Collector that turns the
plain integers the hot path bumps (table.Counters, balancer.Remote) into metric families at
scrape time, so serving a million connections costs no metric-library calls. Names are
prefixed `etcdgw_`; metrics.py serves them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from ._version import __version__
from .view import PYTHON_VERSION, View, endpoint_rows, is_ready

if TYPE_CHECKING:
    from .membership import Membership

__all__ = ["GatewayCollector"]


_SUMMED = (
    "active_connections",
    "total_connections",
    "dial_failures",
    "bytes_to_endpoint",
    "bytes_from_endpoint",
    "health_checks_ok",
    "health_checks_failed",
)


class GatewayCollector(Collector):
    """Reads the gateway's plain integers at scrape time; names are prefixed `etcdgw_`."""

    def __init__(self, view: View, started_wall: float) -> None:
        self.view = view
        self.started_wall = started_wall

    def collect(self) -> Iterator[Metric]:
        view = self.view
        c = view.table.counters
        yield InfoMetricFamily(
            "etcdgw_build",
            "etcdgw version and Python",
            {"version": __version__, "python": PYTHON_VERSION},
        )
        yield InfoMetricFamily(
            "etcdgw_relay_engine", "relay engine in use", {"engine": view.engine}
        )
        yield GaugeMetricFamily(
            "etcdgw_start_time_seconds", "start time since the Unix epoch", self.started_wall
        )
        yield GaugeMetricFamily(
            "etcdgw_ready", "1 when listening and not draining", 1 if is_ready(view) else 0
        )
        # For alerting (contrib/prometheus): a drain in progress, and the limit that
        # etcdgw_connections_active approaches.
        yield GaugeMetricFamily(
            "etcdgw_draining",
            "1 after SIGTERM/SIGINT while live connections finish",
            1 if view.table.draining else 0,
        )
        yield GaugeMetricFamily(
            "etcdgw_max_connections",
            "--max-connections: beyond it clients wait in the backlog (0: unlimited)",
            view.settings.cfg.max_connections,
        )
        yield CounterMetricFamily(
            "etcdgw_connections_accepted", "client connections accepted", c.accepted
        )
        yield GaugeMetricFamily(
            "etcdgw_connections_active",
            "client connections open (relayed or dialling)",
            view.table.active_connections(),
        )
        yield CounterMetricFamily(
            "etcdgw_connections_refused",
            "client connections closed because no endpoint could be reached",
            c.refused,
        )
        yield CounterMetricFamily(
            "etcdgw_accept_errors",
            "failed accept() calls (EMFILE, ECONNABORTED, ...)",
            c.accept_errors,
        )
        yield CounterMetricFamily(
            "etcdgw_connections_finished", "relayed connections that ended", c.finished
        )
        yield CounterMetricFamily(
            "etcdgw_connections_reset",
            "relayed connections that ended with an error (reset)",
            c.reset,
        )
        sent, received = view.totals()
        total_bytes = CounterMetricFamily(
            "etcdgw_bytes", "bytes relayed, live connections included", labels=["direction"]
        )
        total_bytes.add_metric(["to_endpoint"], sent)
        total_bytes.add_metric(["from_endpoint"], received)
        yield total_bytes
        membership = view.membership()
        if membership is not None:
            yield from _member_sync_families(membership)
        yield from self._endpoint_families()

    def _endpoint_families(self) -> Iterable[Metric]:
        ep = ["endpoint"]
        up = GaugeMetricFamily("etcdgw_endpoint_up", "1 when the endpoint accepts dials", labels=ep)
        healthy = GaugeMetricFamily(
            "etcdgw_endpoint_healthy", "1 unless health checks took it out", labels=ep
        )
        active = GaugeMetricFamily(
            "etcdgw_endpoint_connections_active", "relayed connections open", labels=ep
        )
        total = CounterMetricFamily(
            "etcdgw_endpoint_connections", "connections relayed to the endpoint", labels=ep
        )
        dials = CounterMetricFamily(
            "etcdgw_endpoint_dial_failures", "failed dials to the endpoint", labels=ep
        )
        nbytes = CounterMetricFamily(
            "etcdgw_endpoint_bytes",
            "bytes relayed to and from the endpoint, live connections included",
            labels=["endpoint", "direction"],
        )
        checks = CounterMetricFamily(
            "etcdgw_health_checks", "etcd /health checks by result", labels=["endpoint", "result"]
        )
        # A duplicated endpoint (--endpoints=a,a) is one series: sum its counters, and call
        # it up/healthy only when every copy is. Removed endpoints that still carry live
        # connections keep their counters but report no state.
        sums: dict[str, dict[str, int]] = {}
        state: dict[str, list[bool]] = {}
        for row in endpoint_rows(self.view):
            addr = row["address"]
            acc = sums.setdefault(addr, dict.fromkeys(_SUMMED, 0))
            for key in _SUMMED:
                acc[key] += row[key]
            if not row["removed"]:
                st = state.setdefault(addr, [True, True])
                st[0] = st[0] and row["state"] == "up"
                st[1] = st[1] and row["healthy"]
        for addr, acc in sums.items():
            if addr in state:
                up.add_metric([addr], 1 if state[addr][0] else 0)
                healthy.add_metric([addr], 1 if state[addr][1] else 0)
            active.add_metric([addr], acc["active_connections"])
            total.add_metric([addr], acc["total_connections"])
            dials.add_metric([addr], acc["dial_failures"])
            nbytes.add_metric([addr, "to_endpoint"], acc["bytes_to_endpoint"])
            nbytes.add_metric([addr, "from_endpoint"], acc["bytes_from_endpoint"])
            checks.add_metric([addr, "ok"], acc["health_checks_ok"])
            checks.add_metric([addr, "failed"], acc["health_checks_failed"])
        return (up, healthy, active, total, dials, nbytes, checks)


def _member_sync_families(ms: Membership) -> Iterable[Metric]:
    syncs = CounterMetricFamily(
        "etcdgw_member_sync",
        "member list syncs (--auto-sync-interval) by result: ok, failed (no answer), "
        "refused (another cluster)",
        labels=["result"],
    )
    syncs.add_metric(["ok"], ms.ok)
    syncs.add_metric(["failed"], ms.failed)
    syncs.add_metric(["refused"], ms.refused)
    last = GaugeMetricFamily(
        "etcdgw_member_sync_last_success_timestamp_seconds",
        "time of the last successful member list sync since the Unix epoch (0: none yet)",
        ms.last_success or 0,
    )
    return (syncs, last)
