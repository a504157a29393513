"""view.py and the metrics responder over real parts in process (tests/_parts.py): a client
relayed to a TagServer backend by the engine under test, read back through the View the
gateway builds (app.metrics_view), /status, /health and /ready."""

from __future__ import annotations

import json
import socket
import time

from _gateway import TagServer
from _parts import Make, Parts, ep
from etcdgw.log import Logger
from etcdgw.metrics import MetricsServer
from etcdgw.view import View, status_document


def view_of(p: Parts) -> View:
    """The View as app.metrics_view fills it from a Gateway, here from the parts."""
    relay, table = p.relay, p.table
    assert p.listener_set is not None
    listener_set = p.listener_set
    return View(
        balancer=p.balancer,
        table=table,
        settings=p.settings,
        engine="under test",
        listeners=lambda: listener_set.socks,
        totals=relay.totals,
        live_bytes=lambda: {pid: relay.stats(pid) for pid in table.conns},
        collect_now=relay.poll,
        ready=lambda: True,
        membership=lambda: None,
    )


def test_status_counts_a_live_then_a_finished_connection(make: Make) -> None:
    with TagServer("a") as a:
        p = make([ep(a.port)])
        p.start_accepting()
        view = view_of(p)
        started = time.monotonic()
        assert p.listener_set is not None
        with socket.create_connection(p.listener_set.socks[0].getsockname(), timeout=5) as c:
            assert p.read_line(c) == b"a\n"
            c.sendall(b"hello\n")
            assert p.read_line(c) == b"hello\n"
            doc = p.call(lambda: status_document(view, started))
            assert doc["listen"] == [f"127.0.0.1:{p.listener_set.port}"]
            assert doc["connections"]["active"] == 1
            assert doc["connections"]["accepted"] == 1
            [row] = doc["endpoints"]
            assert row["address"] == f"127.0.0.1:{a.port}" and row["active_connections"] == 1
            # Live bytes count before the pair ends: "hello\n" each way, the tag back.
            assert (row["bytes_to_endpoint"], row["bytes_from_endpoint"]) == (6, 8)
            assert doc["bytes"] == {"to_endpoints": 6, "from_endpoints": 8}
        p.until(lambda: not p.table.conns)
        doc = p.call(lambda: status_document(view, started))
        assert doc["connections"]["active"] == 0 and doc["connections"]["finished"] == 1
        [row] = doc["endpoints"]
        assert (row["bytes_to_endpoint"], row["bytes_from_endpoint"]) == (6, 8)
        assert row["total_connections"] == 1


def test_health_and_ready_follow_the_parts(make: Make) -> None:
    with TagServer("a") as a:
        p = make([ep(a.port)])
        p.start_accepting()
        ms = MetricsServer(view_of(p), "127.0.0.1:0", Logger(level="error"))
        try:
            assert ms.respond("GET", "/health")[0] == 200
            assert ms.respond("GET", "/ready")[0] == 200
            [r] = p.remotes
            p.balancer.mark_down(r, "dial tcp: connect: connection refused", 0.0)
            status, _, body = ms.respond("GET", "/health")
            assert status == 503 and json.loads(body)["reason"] == "no usable endpoint"
            p.table.draining = True
            assert ms.respond("GET", "/ready")[0] == 503
            status, _, body = ms.respond("GET", "/status")
            assert status == 200 and json.loads(body)["ready"] is False
        finally:
            ms.close()
