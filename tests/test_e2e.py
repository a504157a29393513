"""End to end against a real 3-member etcd cluster, with real clients (etcdctl, HTTP/JSON).

Mirrors etcd's tests/e2e/gateway_test.go (TestGateway) and goes on where it stops: watch,
txn, the HTTP/JSON gateway, members killed and restarted, every member down, TLS through.
Each test runs once per relay engine.
"""

from __future__ import annotations

import base64
import json
import socket
import time
import urllib.request
from collections.abc import Callable

import pytest

from _etcd import EtcdCluster, EtcdctlWatch, etcdctl
from _gateway import GatewayProc, free_tcp_port, wait_for

Start = Callable[..., GatewayProc]


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def http_json(port: int, path: str, body: dict[str, object]) -> dict[str, object]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        doc: dict[str, object] = json.loads(resp.read())
        return doc


def test_gateway_like_upstream_e2e(relay_impl: str, etcd_cluster: EtcdCluster) -> None:
    """etcd's TestGateway: scheme-prefixed localhost endpoints, flags before `start`,
    the default listen address, and `etcdctl put foo bar` -> OK."""
    eps = ",".join(f"http://localhost:{m.client_port}" for m in etcd_cluster.members)
    g = GatewayProc([f"--endpoints={eps}", "start"], impl=relay_impl)
    try:
        rec = g.wait_ready()
        assert rec["endpoints"] == [f"localhost:{m.client_port}" for m in etcd_cluster.members]
        r = etcdctl("127.0.0.1:23790", "put", "foo", "bar")
        assert (r.returncode, r.stdout) == (0, "OK\n"), r.stderr
        r = etcdctl("127.0.0.1:23790", "get", "foo", "--print-value-only")
        assert r.stdout == "bar\n"
    finally:
        assert g.stop() == 0


def test_put_get_txn_watch(gateway: Start, etcd_cluster: EtcdCluster, relay_impl: str) -> None:
    port = free_tcp_port()
    gw = f"127.0.0.1:{port}"
    gateway("--endpoints=" + ",".join(etcd_cluster.endpoints), f"--listen-addr={gw}")
    key = f"e2e-{relay_impl}"
    with EtcdctlWatch(gw, key) as w:
        assert etcdctl(gw, "put", key, "v1").stdout == "OK\n"
        txn = etcdctl(
            gw,
            "txn",
            input=f'value("{key}") = "v1"\n\nput {key} v2\n\nput {key} nope\n\n',
        )
        assert txn.returncode == 0 and txn.stdout.startswith("SUCCESS"), txn
        events = w.wait_events(2)
        assert [(e.type, e.value) for e in events[:2]] == [("PUT", "v1"), ("PUT", "v2")]
    assert etcdctl(gw, "get", key, "--print-value-only").stdout == "v2\n"
    # A large value goes through intact.
    big = "x" * 120_000  # near the 128 KiB limit of one exec argument
    assert etcdctl(gw, "put", key + "-big", "--", big, timeout=30).returncode == 0
    got = etcdctl(gw, "get", key + "-big", "--print-value-only", timeout=30).stdout
    assert got == big + "\n"


def test_http_json_api(gateway: Start, etcd_cluster: EtcdCluster, relay_impl: str) -> None:
    port = free_tcp_port()
    gateway("--endpoints=" + ",".join(etcd_cluster.endpoints), f"--listen-addr=127.0.0.1:{port}")
    key = f"http-{relay_impl}"
    http_json(port, "/v3/kv/put", {"key": b64(key), "value": b64("hello")})
    got = http_json(port, "/v3/kv/range", {"key": b64(key)})
    kvs = got["kvs"]
    assert isinstance(kvs, list)
    assert base64.b64decode(kvs[0]["value"]) == b"hello"


def test_member_killed_clients_keep_working(gateway: Start, etcd_cluster_fn: EtcdCluster) -> None:
    cluster = etcd_cluster_fn
    port = free_tcp_port()
    gw = f"127.0.0.1:{port}"
    g = gateway(
        "--endpoints=" + ",".join(cluster.endpoints),
        f"--listen-addr={gw}",
        "--retry-delay=500ms",
    )
    with EtcdctlWatch(gw, "k") as w:
        assert etcdctl(gw, "put", "k", "0").returncode == 0
        w.wait_events(1)
        # A follower: killing the leader makes etcd itself fail writes until the next
        # election ("request timed out, possibly due to previous leader failure").
        victim = (cluster.leader() + 1) % 3
        cluster.kill(victim)
        # Every later client works: the dead member is skipped after one failed dial.
        for i in range(1, 7):
            r = etcdctl(gw, "put", "k", str(i), timeout=20)
            assert r.returncode == 0, r.stderr
        dead = cluster.members[victim].endpoint
        g.wait_log("deactivated endpoint", address=dead)
        # The watch reconnects through the gateway and sees every write.
        events = w.wait_events(7, timeout=30)
        assert [e.value for e in events][-6:] == [str(i) for i in range(1, 7)]
        cluster.restart(victim)
        g.wait_log("activated", address=dead, timeout=15)
        assert etcdctl(gw, "put", "k", "after").returncode == 0


def test_all_members_down_then_back(gateway: Start, etcd_cluster_fn: EtcdCluster) -> None:
    cluster = etcd_cluster_fn
    port = free_tcp_port()
    gw = f"127.0.0.1:{port}"
    gateway("--endpoints=" + ",".join(cluster.endpoints), f"--listen-addr={gw}")
    assert etcdctl(gw, "put", "x", "1").returncode == 0
    for i in range(3):
        cluster.kill(i)
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        assert s.recv(1) == b""  # closed promptly, no data
    assert time.monotonic() - t0 < 3
    for i in range(3):
        cluster.restart(i, wait=False)
    cluster.wait_healthy(timeout=60)
    # No retry-delay wait: the gateway retries inactive members before refusing a client.
    wait_for(lambda: etcdctl(gw, "get", "x", "--print-value-only").stdout == "1\n", timeout=30)


def test_tls_passes_through(gateway: Start, etcd_tls_cluster: EtcdCluster) -> None:
    cluster = etcd_tls_cluster
    port = free_tcp_port()
    gw = f"127.0.0.1:{port}"
    g = gateway("--endpoints=" + ",".join(cluster.client_urls), f"--listen-addr={gw}")
    assert g.wait_ready()["endpoints"] == cluster.endpoints
    r = etcdctl(gw, "put", "tls", "yes", cluster=cluster)
    assert (r.returncode, r.stdout) == (0, "OK\n"), r.stderr
    assert etcdctl(gw, "get", "tls", "--print-value-only", cluster=cluster).stdout == "yes\n"
    # The gateway does not terminate TLS: a plain client gets nothing useful.
    plain = etcdctl(gw, "get", "tls", timeout=8)
    assert plain.returncode != 0


@pytest.mark.parametrize("n", [3])
def test_round_robin_over_members(gateway: Start, etcd_cluster: EtcdCluster, n: int) -> None:
    """Successive HTTP clients land on successive members (member_id in each response)."""
    port = free_tcp_port()
    gateway("--endpoints=" + ",".join(etcd_cluster.endpoints), f"--listen-addr=127.0.0.1:{port}")
    ids = []
    for _ in range(2 * n):
        got = http_json(port, "/v3/kv/range", {"key": b64("nothing")})
        header = got["header"]
        assert isinstance(header, dict)
        ids.append(header["member_id"])
    assert len(set(ids[:n])) == n and ids[:n] == ids[n:]
