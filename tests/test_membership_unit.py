"""membership.py's Membership in process: built from the parts it uses (tests/_parts.py),
asking a real etcd cluster for its member list."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import pytest

from _etcd import EtcdCluster, free_port
from _parts import Parts, ep
from etcdgw import _relay_py
from etcdgw.config import Endpoint
from etcdgw.membership import Membership

# Membership drives no relay: one engine (the pure one) is enough.
ENGINE = _relay_py.Engine


class Following:
    """Parts plus a Membership, the gateway's set_endpoints played by the test (as
    Gateway.set_endpoints: the source stamped on every endpoint, the balancer told)."""

    def __init__(self, seeds: Sequence[Endpoint], current: Sequence[Endpoint]) -> None:
        self.parts = Parts(current, ENGINE, auto_sync_interval=30.0, dial_timeout=2.0)
        self.calls: list[tuple[list[Endpoint], str | None]] = []
        self.collected = 0
        p = self.parts
        self.membership = Membership(
            p.settings,
            p.balancer,
            p.addresses,
            self.set_endpoints,
            self.collect_now,
            p.log,
            seeds,
        )

    def set_endpoints(self, endpoints: Sequence[Endpoint], source: str | None = None) -> None:
        self.calls.append((list(endpoints), source))
        if source is not None:
            endpoints = [dataclasses.replace(e, source=source) for e in endpoints]
        self.parts.balancer.set_endpoints(endpoints)

    def collect_now(self) -> None:
        self.collected += 1

    def sync(self) -> str:
        return self.parts.run(self.membership.sync(), timeout=30)


@pytest.fixture
def following(no_fd_leak: None) -> Iterator[list[Following]]:
    made: list[Following] = []
    yield made
    for f in made:
        f.parts.close()


def members(c: EtcdCluster) -> list[Endpoint]:
    out = []
    for url in c.client_urls:
        host, _, port = url.removeprefix("http://").rpartition(":")
        out.append(ep(int(port), host))
    return out


def test_one_seed_finds_every_member(following: list[Following], etcd_cluster: EtcdCluster) -> None:
    all_members = members(etcd_cluster)
    f = Following(all_members[:1], all_members[:1])
    following.append(f)
    assert f.sync() == "ok"
    [(endpoints, source)] = f.calls
    assert source == "member-list"
    assert sorted(e.addr for e in endpoints) == sorted(e.addr for e in all_members)
    assert {r.endpoint.source for r in f.parts.remotes} == {"member-list"}
    assert f.collected == 1  # before pruning what the engine may still report on
    status = f.membership.status()
    assert (status["ok"], status["failed"]) == (1, 0) and status["cluster_id"]


def test_a_dead_seed_is_one_members_failure_the_next_is_asked(
    following: list[Following], etcd_cluster: EtcdCluster
) -> None:
    dead = ep(free_port())
    live = members(etcd_cluster)[0]
    f = Following([dead, live], [dead])
    following.append(f)
    assert f.sync() == "ok"
    assert sorted(r.addr for r in f.parts.remotes if not r.removed) == sorted(
        e.addr for e in members(etcd_cluster)
    )
    assert dead.addr not in [r.addr for r in f.parts.remotes]
    [line] = f.parts.messages("no usable member list from endpoint")
    assert line["address"] == dead.addr
    assert line["error"].endswith(f"dial tcp {dead.addr}: connect: connection refused")


def test_nobody_answers_keeps_the_endpoints(following: list[Following]) -> None:
    dead = ep(free_port())
    f = Following([dead], [dead])
    following.append(f)
    assert f.sync() == "failed"
    assert f.calls == [] and [r.addr for r in f.parts.remotes] == [dead.addr]
    assert f.membership.status()["failed"] == 1
