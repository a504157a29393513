"""--auto-sync-interval (membership.py): the pure parts with fixed JSON, then real clusters.

The gateway tests run on both engines (`gateway` fixture) against real 3-member etcd 3.4
clusters (tests/_etcd.py), with a 500 ms interval so a membership change shows within a
second or two.
"""

from __future__ import annotations

import io
import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from _dns import Dnsmasq, SrvHost
from _etcd import EtcdCluster, EtcdctlWatch, etcdctl, require_etcd_binaries
from _gateway import GatewayProc, engine_env, free_tcp_port, log_time, wait_for
from etcdgw.cli import UsageError, parse_start
from etcdgw.config import Endpoint
from etcdgw.membership import MemberList, first_cluster, parse_member_list
from etcdgw.status import render

Start = Callable[..., GatewayProc]

# What etcd 3.4.23 answers to POST /v3/cluster/member/list (one member with a unix URL
# and a learner just added: protobuf JSON leaves out false and empty fields).
ETCD_34_ANSWER = (
    b'{"header":{"cluster_id":"15756992811865692610","member_id":"6134072051217116742",'
    b'"raft_term":"2"},"members":[{"ID":"6134072051217116742","name":"x","peerURLs":'
    b'["http://127.0.0.1:15380"],"clientURLs":["http://127.0.0.1:15379","unix://localhost:1"]},'
    b'{"ID":"17899434011649607080","peerURLs":["http://127.0.0.1:15390"],"isLearner":true}]}'
)


# --- pure parts ------------------------------------------------------------------------------


def test_parse_a_real_etcd_answer() -> None:
    ml = parse_member_list(ETCD_34_ANSWER)
    assert ml.cluster_id == "15756992811865692610"
    assert ml.endpoints == (Endpoint("127.0.0.1", 15379),)
    assert ml.endpoints[0].source == "member-list"
    assert ml.skipped == (
        ("unix://localhost:1", "unix socket"),
        ("17899434011649607080", "learner"),
    )


def test_parse_learners_unstarted_unix_https_and_duplicates() -> None:
    doc = {
        "header": {"cluster_id": "7"},
        "members": [
            {"ID": "1", "name": "a", "clientURLs": ["https://a.example:2379", "unixs://s:0"]},
            {"ID": "2", "name": "b", "clientURLs": ["http://[::1]:2379", "http://[::1]:2379"]},
            {"ID": "3", "name": "c", "clientURLs": ["http://10.0.0.3:2379"], "isLearner": True},
            {"ID": "4", "peerURLs": ["http://10.0.0.4:2380"]},
            {"ID": "5", "name": "e", "clientURLs": ["grpc://x:1", "http://noport"]},
        ],
    }
    ml = parse_member_list(json.dumps(doc).encode())
    assert ml.endpoints == (Endpoint("a.example", 2379, secure=True), Endpoint("::1", 2379))
    assert ml.endpoints[0].secure and not ml.endpoints[1].secure
    assert ml.skipped == (
        ("unixs://s:0", "unix socket"),
        ("c", "learner"),
        ("4", "no client URLs (not started)"),
        ("grpc://x:1", "unsupported scheme 'grpc'"),
        ("http://noport", "no host:port"),
    )


def test_source_takes_no_part_in_endpoint_equality() -> None:
    a = Endpoint("h", 1)
    b = Endpoint("h", 1, source="member-list")
    assert a == b and hash(a) == hash(b) and {a, b} == {a}


@pytest.mark.parametrize(
    "body, reason",
    [
        (b"<html>", "not JSON"),
        (b"[]", "not a member list"),
        (b'{"members":[]}', "no header.cluster_id"),
        (b'{"header":{"cluster_id":"1"},"members":{}}', "members is not a list"),
        (b'{"header":{"cluster_id":"1"},"members":[1]}', "a member is not an object"),
    ],
)
def test_parse_refuses_what_is_not_a_member_list(body: bytes, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_member_list(body)


def test_first_cluster_is_the_first_answer_in_seed_order() -> None:
    a1 = MemberList("A", (Endpoint("a", 1),))
    a2 = MemberList("A", (Endpoint("a", 2),))
    b = MemberList("B", (Endpoint("b", 1),))
    assert first_cluster(["refused", b, a1, a2]) == (1, [2, 3])
    assert first_cluster([a1, b, "timeout", a2, b]) == (0, [1, 4])
    assert first_cluster(["x", "y"]) == (None, [])
    assert first_cluster([]) == (None, [])


def test_flag_parsing() -> None:
    cfg, _ = parse_start(["start", "--endpoints=127.0.0.1:2379"])
    assert cfg.auto_sync_interval == 0.0
    cfg, _ = parse_start(["start", "--auto-sync-interval=1m30s"])
    assert cfg.auto_sync_interval == 90.0
    with pytest.raises(UsageError, match='"--auto-sync-interval" flag: must not be negative'):
        parse_start(["start", "--auto-sync-interval=-1s"])
    with pytest.raises(UsageError, match='invalid argument "5" for "--auto-sync-interval"'):
        parse_start(["start", "--auto-sync-interval=5"])


def test_status_table_shows_sources_only_when_not_all_flags() -> None:
    row = {"address": "a:1", "state": "up", "healthy": True, "source": "flag"}
    doc: dict[str, Any] = {"endpoints": [row], "member_sync": None}
    out = io.StringIO()
    render(doc, out)
    assert "SOURCE" not in out.getvalue() and "member list" not in out.getvalue()
    doc["endpoints"] = [row, {**row, "address": "b:2", "source": "member-list"}]
    doc["member_sync"] = {
        "cluster_id": "42",
        "ok": 3,
        "failed": 1,
        "refused": 0,
        "last_success_seconds_ago": 2.5,
    }
    out = io.StringIO()
    render(doc, out)
    lines = out.getvalue().splitlines()
    assert lines[1] == "member list of cluster 42: synced 2s ago; syncs: 3 ok, 1 failed, 0 refused"
    assert lines[2].split()[:3] == ["ENDPOINT", "SOURCE", "STATE"]
    assert [ln.split()[:2] for ln in lines[3:]] == [["a:1", "flag"], ["b:2", "member-list"]]


# --- real clusters -----------------------------------------------------------------------------


@pytest.fixture
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    require_etcd_binaries()
    with EtcdCluster(tmp_path_factory.mktemp("etcd-ms")) as c:
        yield c


class Gw:
    """A gateway with --auto-sync-interval and its /status, /metrics."""

    def __init__(self, gateway: Start, seeds: list[str], *extra: str) -> None:
        self.port, self.mport = free_tcp_port(), free_tcp_port()
        self.addr = f"127.0.0.1:{self.port}"
        self.proc = gateway(
            f"--endpoints={','.join(seeds)}",
            f"--listen-addr={self.addr}",
            f"--metrics-addr=127.0.0.1:{self.mport}",
            "--auto-sync-interval=500ms",
            *extra,
        )

    def status(self) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.mport}/status"
        with urllib.request.urlopen(url, timeout=10) as r:
            doc: dict[str, Any] = json.loads(r.read())
        return doc

    def rows(self) -> dict[str, dict[str, Any]]:
        """Endpoint rows by address (a removed row only if no current one has the address)."""
        out: dict[str, dict[str, Any]] = {}
        for row in self.status()["endpoints"]:
            if row["address"] not in out or not row["removed"]:
                out[row["address"]] = row
        return out

    def current(self) -> set[str]:
        return {a for a, r in self.rows().items() if not r["removed"]}

    def syncs(self, result: str) -> int:
        url = f"http://127.0.0.1:{self.mport}/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            text = r.read().decode()
        m = re.search(rf'^etcdgw_member_sync_total{{result="{result}"}} (\S+)$', text, re.M)
        assert m, text
        return int(float(m.group(1)))

    def etcdctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return etcdctl([self.addr], *args, timeout=10)


def test_one_seed_finds_the_others(gateway: Start, cluster: EtcdCluster, relay_impl: str) -> None:
    """Seeded with one member, the gateway serves through the others once it is gone."""
    gw = Gw(gateway, [cluster.members[0].endpoint])
    rec = gw.proc.wait_log("endpoints updated", source="member-list")
    assert sorted(rec["added"]) == sorted(cluster.endpoints[1:]) and rec["removed"] == []
    rows = gw.rows()
    assert {a: r["source"] for a, r in rows.items()} == dict.fromkeys(
        cluster.endpoints, "member-list"
    )
    # `etcdgw status` shows where each endpoint came from, and the syncs.
    out = subprocess.run(
        [sys.executable, "-m", "etcdgw", "status", f"--metrics-addr=127.0.0.1:{gw.mport}"],
        capture_output=True,
        text=True,
        timeout=20,
        env=engine_env(relay_impl),
        check=False,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[1].startswith("member list of cluster ") and "0 refused" in lines[1]
    assert lines[2].split()[:3] == ["ENDPOINT", "SOURCE", "STATE"]
    assert all(ln.split()[1] == "member-list" for ln in lines[3:])

    cluster.kill(0)
    cluster.wait_healthy([1, 2])
    for i in range(4):  # round-robin visits the dead seed too: each dial fails over
        r = gw.etcdctl("put", f"one-seed-{i}", "v")
        assert r.returncode == 0, r.stderr
    r = cluster.etcdctl("get", "one-seed-3", "--print-value-only", i=1)
    assert r.stdout.strip() == "v"


def test_members_added_promoted_and_removed(gateway: Start, cluster: EtcdCluster) -> None:
    gw = Gw(gateway, cluster.endpoints, "--dial-timeout=1s")
    gw.proc.wait_log("following the cluster's member list")
    wait_for(lambda: gw.syncs("ok") >= 1)

    # A learner gets no clients until it is promoted.
    i = cluster.add_member(learner=True)
    m4 = cluster.members[i]
    gw.proc.wait_log("member left out", member=m4.name, reason="learner")
    seen = gw.syncs("ok")
    wait_for(lambda: gw.syncs("ok") >= seen + 2)
    assert gw.current() == set(cluster.endpoints[:3])
    cluster.promote_member(i)
    promoted = time.time()
    rec = gw.proc.wait_log("endpoints updated", source="member-list", added=[m4.endpoint])
    # When the gateway applied it, by its own clock (the line's ts), not when this process
    # got to read the line. Expected: one 500 ms interval plus a sync or two (a member may
    # answer before it applied the promotion): about 1 s. 5 s (ten intervals) leaves room
    # for a slow MemberList on two busy cores; a gateway that missed the interval (the
    # default is 0: never) or re-checked a left-out learner only later fails this or the
    # wait above.
    applied = log_time(rec) - promoted
    assert applied < 5.0, applied
    for k in range(8):  # round-robin over 4 endpoints: two of these go to the new member
        r = gw.etcdctl("get", f"k{k}")
        assert r.returncode == 0, r.stderr
    assert gw.rows()[m4.endpoint]["total_connections"] >= 1
    assert gw.rows()[m4.endpoint]["source"] == "member-list"

    # Four watches over four endpoints: one is relayed to the member about to be removed.
    watches = [EtcdctlWatch([gw.addr], "ms-watch", from_now=False) for _ in range(4)]
    try:
        for n, w in enumerate(watches):
            w.start()

            def more_than(n: int = n) -> bool:
                return sum(int(r["active_connections"]) for r in gw.rows().values()) > n

            wait_for(more_than)
        wait_for(lambda: gw.rows()[m4.endpoint]["active_connections"] == 1)
        # etcd stops a removed member by itself within a second; frozen, it cannot, so what
        # the gateway does with its live connection can be seen.
        cluster.sigstop(i)
        cluster.remove_member(i)
        gw.proc.wait_log("endpoints updated", source="member-list", removed=[m4.endpoint])
        row = [r for r in gw.status()["endpoints"] if r["address"] == m4.endpoint]
        assert len(row) == 1 and row[0]["removed"] and row[0]["active_connections"] == 1
        total = row[0]["total_connections"]
        for k in range(6):  # no new clients for the removed member
            r = gw.etcdctl("put", f"after-remove-{k}", "v")
            assert r.returncode == 0, r.stderr
        row = [r for r in gw.status()["endpoints"] if r["address"] == m4.endpoint]
        assert row[0]["total_connections"] == total and row[0]["active_connections"] == 1
        # The member stops; its watch resumes through the gateway on another member.
        cluster.kill(i)
        r = cluster.etcdctl("put", "ms-watch", "after", i=0)
        assert r.returncode == 0, r.stderr
        for w in watches:
            assert w.wait_events(1, timeout=15)[-1].value == "after"
        assert m4.endpoint not in gw.current()
    finally:
        for w in watches:
            w.stop()


def test_two_clusters_in_one_seed_list(
    gateway: Start, cluster: EtcdCluster, etcd_cluster: EtcdCluster
) -> None:
    a, b = cluster, etcd_cluster
    seeds = [a.members[0].endpoint, b.members[0].endpoint, a.members[1].endpoint]
    gw = Gw(gateway, seeds, "--dial-timeout=500ms")
    err = gw.proc.wait_log("seed endpoints belong to another etcd cluster; ignored")
    assert err["level"] == "error"
    assert err["cluster-seed"] == a.members[0].endpoint
    assert err["other-seeds"] == [b.members[0].endpoint]
    assert err["other-cluster-ids"] != [err["cluster-id"]]
    rec = gw.proc.wait_log("endpoints updated", source="member-list")
    assert rec["removed"] == [b.members[0].endpoint] and rec["added"] == [a.members[2].endpoint]
    assert gw.current() == set(a.endpoints)
    key = f"two-clusters-{time.monotonic_ns()}"
    for _ in range(3):
        assert gw.etcdctl("put", key, "a").returncode == 0
    assert a.etcdctl("get", key, "--print-value-only").stdout.strip() == "a"
    assert b.etcdctl("get", key, "--print-value-only").stdout.strip() == ""

    # When the first cluster does not answer, the other cluster's seed is asked and refused.
    for j in range(3):
        a.sigstop(j)
    try:
        ref = gw.proc.wait_log("refused a member list from another etcd cluster")
        assert ref["address"] == b.members[0].endpoint
        assert ref["expected-cluster-id"] == err["cluster-id"]
        wait_for(lambda: gw.syncs("refused") >= 1)
        assert gw.current() == set(a.endpoints)
    finally:
        for j in range(3):
            a.sigcont(j)
    gw.proc.wait_log("member sync recovered")
    assert gw.current() == set(a.endpoints)


def test_sync_failing_everywhere_keeps_the_last_good_set(
    gateway: Start, cluster: EtcdCluster
) -> None:
    gw = Gw(gateway, [cluster.members[0].endpoint], "--dial-timeout=300ms")
    gw.proc.wait_log("endpoints updated", source="member-list")
    for j in range(3):
        cluster.sigstop(j)
    try:
        warn = gw.proc.wait_log("member sync failed; keeping the last good endpoints")
        assert sorted(warn["endpoints"]) == sorted(cluster.endpoints)
        assert "i/o timeout" in warn["error"]
        wait_for(lambda: gw.syncs("failed") >= 3, timeout=15)
        # Logged once per failure streak, not per sync.
        assert gw.proc.messages().count("member sync failed; keeping the last good endpoints") == 1
        assert gw.current() == set(cluster.endpoints)
        stamp = gw.status()["member_sync"]["last_success_seconds_ago"]
        assert stamp >= 0.3
    finally:
        for j in range(3):
            cluster.sigcont(j)
    rec = gw.proc.wait_log("member sync recovered")
    assert rec["failures"] >= 3
    cluster.wait_healthy()
    # Syncing again: a membership change shows up.
    cluster.remove_member(2)
    gw.proc.wait_log(
        "endpoints updated", source="member-list", removed=[cluster.members[2].endpoint]
    )
    assert gw.current() == set(cluster.endpoints[:2])


def test_sighup_syncs_at_once(gateway: Start, etcd_cluster: EtcdCluster) -> None:
    port, mport = free_tcp_port(), free_tcp_port()
    g = gateway(
        f"--endpoints={etcd_cluster.members[0].endpoint}",
        f"--listen-addr=127.0.0.1:{port}",
        f"--metrics-addr=127.0.0.1:{mport}",
        "--auto-sync-interval=1h",
    )
    g.wait_log("endpoints updated", source="member-list")
    url = f"http://127.0.0.1:{mport}/status"

    def ok() -> int:
        with urllib.request.urlopen(url, timeout=10) as r:
            return int(json.loads(r.read())["member_sync"]["ok"])

    wait_for(lambda: ok() == 1)
    g.proc.send_signal(signal.SIGHUP)
    g.wait_log("SIGHUP: syncing the member list")
    wait_for(lambda: ok() == 2, timeout=5)
    assert "SIGHUP ignored: no --config-file and no --discovery-srv" not in g.messages()


def test_tls_members_with_client_certificates(
    gateway: Start, etcd_tls_cluster: EtcdCluster
) -> None:
    """https client URLs: asked over TLS with the CA and the health checks' certificate."""
    c = etcd_tls_cluster
    gw = Gw(
        gateway,
        [c.members[1].client_url],
        f"--trusted-ca-file={c.ca_file}",
        f"--health-cert-file={c.client_cert}",
        f"--health-key-file={c.client_key}",
    )
    rec = gw.proc.wait_log("endpoints updated", source="member-list")
    assert sorted(rec["added"]) == sorted([c.members[0].endpoint, c.members[2].endpoint])
    rows = gw.rows()
    assert set(rows) == set(c.endpoints)
    assert all(r["secure"] and r["source"] == "member-list" for r in rows.values())
    # The relayed bytes are TLS end to end: etcdctl talks to the members through the gateway.
    key = f"tls-ms-{time.monotonic_ns()}"
    for _ in range(3):
        r = etcdctl([gw.addr], "put", key, "v", cluster=c, timeout=10)
        assert r.returncode == 0, r.stderr


def test_without_the_client_certificate_the_sync_fails(
    gateway: Start, etcd_tls_cluster: EtcdCluster
) -> None:
    """Members with --client-cert-auth refuse the sync; the seeds keep being served."""
    c = etcd_tls_cluster
    gw = Gw(gateway, [c.members[0].client_url], f"--trusted-ca-file={c.ca_file}")
    warn = gw.proc.wait_log("member sync failed; keeping the last good endpoints")
    assert warn["endpoints"] == [c.members[0].endpoint]
    assert f"POST https://{c.members[0].endpoint}/v3/cluster/member/list" in warn["error"]
    assert gw.current() == {c.members[0].endpoint}
    assert gw.rows()[c.members[0].endpoint]["source"] == "flag"


def test_srv_answers_are_the_seeds(
    gateway: Start, dnsmasq: Dnsmasq, etcd_tls_cluster: EtcdCluster
) -> None:
    """--discovery-srv with --auto-sync-interval: the member list wins; SRV refreshes only
    replace the seeds."""
    c = etcd_tls_cluster
    hosts = {name: ["127.0.0.1"] for name in c.server_names}

    def records(i: int) -> list[SrvHost]:
        return [
            SrvHost("_etcd-client-ssl._tcp.etcd.test", c.server_names[i], c.members[i].client_port)
        ]

    dnsmasq.restart(srv=records(0), hosts=hosts)
    port, mport = free_tcp_port(), free_tcp_port()
    g = gateway(
        "--discovery-srv=etcd.test",
        f"--discovery-dns={dnsmasq.addr}",
        "--discovery-refresh-min=200ms",
        f"--trusted-ca-file={c.ca_file}",
        f"--health-cert-file={c.client_cert}",
        f"--health-key-file={c.client_key}",
        f"--listen-addr=127.0.0.1:{port}",
        f"--metrics-addr=127.0.0.1:{mport}",
        "--auto-sync-interval=500ms",
    )
    seed = f"{c.server_names[0]}:{c.members[0].client_port}"
    rec = g.wait_log("endpoints updated", source="member-list")
    # The members advertise https://127.0.0.1:PORT, not the SRV target's name.
    assert rec["removed"] == [seed] and sorted(rec["added"]) == sorted(c.endpoints)

    def status() -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/status", timeout=10) as r:
            doc: dict[str, Any] = json.loads(r.read())
        return doc

    assert status()["member_sync"]["seeds"] == [seed]
    dnsmasq.restart(srv=records(1), hosts=hosts)
    g.wait_log("SRV endpoints changed", timeout=20)
    new_seed = f"{c.server_names[1]}:{c.members[1].client_port}"
    wait_for(lambda: status()["member_sync"]["seeds"] == [new_seed])
    doc = status()
    current = {r["address"]: r["source"] for r in doc["endpoints"] if not r["removed"]}
    assert current == dict.fromkeys(c.endpoints, "member-list")
    assert [r for r in g.records() if r.get("msg") == "endpoints updated"] == [rec]


def test_reload_replaces_the_seeds_not_the_member_list(
    gateway: Start, etcd_cluster: EtcdCluster, tmp_path: Path
) -> None:
    c = etcd_cluster
    conf = tmp_path / "etcdgw.yaml"
    conf.write_text(f"endpoints: [{c.members[0].endpoint}]\nauto-sync-interval: 1h\n")
    mport = free_tcp_port()
    g = gateway(
        f"--config-file={conf}",
        f"--listen-addr=127.0.0.1:{free_tcp_port()}",
        f"--metrics-addr=127.0.0.1:{mport}",
    )
    g.wait_log("endpoints updated", source="member-list")

    def sync() -> dict[str, Any]:
        url = f"http://127.0.0.1:{mport}/status"
        with urllib.request.urlopen(url, timeout=10) as r:
            doc: dict[str, Any] = json.loads(r.read())
        return doc

    wait_for(lambda: sync()["member_sync"]["ok"] == 1)
    conf.write_text(f"endpoints: [{c.members[1].endpoint}]\nauto-sync-interval: 2h\n")
    g.proc.send_signal(signal.SIGHUP)
    g.wait_log("reloaded configuration", endpoints=[c.members[1].endpoint])
    g.wait_log("reload: --auto-sync-interval changes only on restart")
    wait_for(lambda: sync()["member_sync"]["ok"] == 2, timeout=5)
    doc = sync()
    assert doc["member_sync"]["seeds"] == [c.members[1].endpoint]
    assert doc["member_sync"]["interval_seconds"] == 3600
    current = {r["address"]: r["source"] for r in doc["endpoints"] if not r["removed"]}
    assert current == dict.fromkeys(c.endpoints, "member-list")
    assert len([r for r in g.records() if r.get("msg") == "endpoints updated"]) == 1
