"""health.py's HealthChecker in process: built from the parts it uses (tests/_parts.py),
against a real etcd cluster's /health and a loopback port nobody listens on."""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from _etcd import EtcdCluster, free_port
from _parts import Parts, ep
from etcdgw import _relay_py
from etcdgw.config import Endpoint
from etcdgw.dial import SELF_DIAL
from etcdgw.health import HealthChecker

# The checker drives no relay: one engine (the pure one) is enough.
ENGINE = _relay_py.Engine


@pytest.fixture
def parts_for(no_fd_leak: None) -> Iterator[list[Parts]]:
    made: list[Parts] = []
    yield made
    for p in made:
        p.close()


def build(made: list[Parts], endpoints: list[Endpoint], **cfg: Any) -> Parts:
    p = Parts(endpoints, ENGINE, health_check="etcd", health_rise=1, health_fall=1, **cfg)
    made.append(p)
    return p


def checker(p: Parts) -> HealthChecker:
    return HealthChecker(p.settings, p.balancer, p.addresses, p.own, p.monitor, p.log)


def one_round(p: Parts, hc: HealthChecker) -> None:
    """Start a check of every endpoint and run the loop until all are done."""
    p.call(hc.tick)
    p.until(lambda: not hc._inflight)


def members(c: EtcdCluster) -> list[Endpoint]:
    out = []
    for url in c.client_urls:
        host, _, port = url.removeprefix("http://").rpartition(":")
        out.append(ep(int(port), host))
    return out


def test_a_dead_endpoint_is_judged_unhealthy_live_members_stay(
    parts_for: list[Parts], etcd_cluster: EtcdCluster
) -> None:
    dead = free_port()
    p = build(parts_for, [*members(etcd_cluster), ep(dead)])
    signals: list[int] = []
    p.balancer.on_change = lambda: signals.append(1)
    hc = checker(p)
    one_round(p, hc)
    *live, gone = p.remotes
    assert all(r.healthy and r.health_ok_total == 1 for r in live)
    assert not gone.healthy and not gone.usable
    where = f"127.0.0.1:{dead}"
    want = f"GET http://{where}/health: dial tcp {where}: connect: connection refused"
    assert gone.last_health_error == want
    assert signals == [1]  # one verdict changed, through the Balancer
    [line] = p.messages("endpoint unhealthy")
    assert (line["address"], line["error"]) == (f"127.0.0.1:{dead}", want)
    # A reload turns checks off: nothing stays out on the old verdict.
    p.settings.cfg = dataclasses.replace(p.settings.cfg, health_check="tcp")
    one_round(p, hc)
    assert gone.healthy and gone.usable
    assert [m["reason"] for m in p.messages("endpoint healthy")] == ["checks off"]


def test_an_answering_member_is_reactivated_sooner_than_the_retry_delay(
    parts_for: list[Parts], etcd_cluster: EtcdCluster
) -> None:
    p = build(parts_for, members(etcd_cluster)[:1])
    [r] = p.remotes
    p.balancer.mark_down(r, "dial tcp: connect: connection refused", 0.0)
    hc = checker(p)
    one_round(p, hc)
    assert r.active and r.usable
    assert [m["address"] for m in p.messages("activated")] == [r.addr]


def test_never_checked_through_the_gateway_itself(parts_for: list[Parts]) -> None:
    with socket.create_server(("127.0.0.1", 0)) as own:
        port = own.getsockname()[1]
        p = build(parts_for, [ep(port)])
        p.own.add(own.getsockname())
        hc = checker(p)
        one_round(p, hc)
        [r] = p.remotes
        assert not r.healthy
        assert r.last_health_error == f"dial tcp 127.0.0.1:{port}: {SELF_DIAL}"
