"""The etcd harness itself (tests/_etcd.py): real clusters, talked to directly, no gateway."""

from __future__ import annotations

import os
import socket
import ssl
import uuid
from pathlib import Path

import pytest

from _etcd import (
    EtcdCluster,
    EtcdctlWatch,
    etcdctl,
    free_ports,
    require_etcd_binaries,
)


def unique_key(name: str) -> str:
    # The session cluster is shared by many tests: never reuse a key.
    return f"/test/{name}/{uuid.uuid4().hex[:8]}"


def test_free_ports_are_distinct_and_bindable() -> None:
    ports = free_ports(20)
    assert len(set(ports)) == 20
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_missing_binaries_fail_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(pytest.fail.Exception, match="make setup"):
        require_etcd_binaries()


def test_cluster_replicates_between_members(etcd_cluster: EtcdCluster) -> None:
    assert [m.name for m in etcd_cluster.members] == ["m1", "m2", "m3"]
    assert all(m.running and m.pid for m in etcd_cluster.members)
    assert etcd_cluster.client_urls == [f"http://{ep}" for ep in etcd_cluster.endpoints]
    key = unique_key("replicate")
    first, *_, last = etcd_cluster.endpoints
    r = etcdctl(first, "put", key, "bar")
    assert r.returncode == 0 and r.stdout.strip() == "OK", r.stderr
    r = etcdctl(last, "get", key, "--print-value-only")
    assert r.stdout.strip() == "bar", r.stderr


def test_member_list_matches(etcd_cluster: EtcdCluster) -> None:
    r = etcdctl(etcd_cluster.endpoints, "member", "list")
    assert r.returncode == 0, r.stderr
    for m in etcd_cluster.members:
        assert f", {m.name}, {m.peer_url}, {m.client_url}," in r.stdout


def test_watch_sees_put_and_delete(etcd_cluster: EtcdCluster) -> None:
    key = unique_key("watch")
    with EtcdctlWatch(etcd_cluster.endpoints[1], key) as watch:
        # No sleep needed: the watch starts at the next revision, not "now".
        assert etcdctl(etcd_cluster.endpoints, "put", key, "v1").returncode == 0
        assert etcdctl(etcd_cluster.endpoints, "del", key).returncode == 0
        events = watch.wait_events(2)
    assert [(e.type, e.key, e.value) for e in events] == [
        ("PUT", key, "v1"),
        ("DELETE", key, ""),
    ]
    assert watch.proc is None  # stopped and reaped on exit


def test_kill_and_restart_leader(etcd_cluster_fn: EtcdCluster) -> None:
    cluster = etcd_cluster_fn
    lead = cluster.leader()
    others = [i for i in range(3) if i != lead]
    pid = cluster.members[lead].pid
    cluster.kill(lead)
    assert cluster.members[lead].proc is None
    assert pid is not None and not os.path.exists(f"/proc/{pid}")  # killed and reaped
    # Two of three still make a quorum, once they have elected a new leader.
    cluster.wait_healthy(others, timeout=15)
    assert cluster.leader() in others
    key = unique_key("kill")
    r = etcdctl([cluster.endpoints[i] for i in others], "put", key, "while-down")
    assert r.returncode == 0, r.stderr
    assert etcdctl(cluster.endpoints[lead], "get", key, timeout=3).returncode != 0
    cluster.restart(lead)
    r = etcdctl(cluster.endpoints[lead], "get", key, "--print-value-only")
    assert r.stdout.strip() == "while-down", r.stderr  # caught up from the others


def test_sigstopped_member_does_not_answer(etcd_cluster_fn: EtcdCluster) -> None:
    cluster = etcd_cluster_fn
    cluster.sigstop(2)
    r = etcdctl(cluster.endpoints[2], "get", "x", timeout=3)
    assert r.returncode != 0
    cluster.sigcont(2)
    cluster.wait_healthy(2, timeout=15)


def test_stop_is_idempotent(tmp_path: Path) -> None:
    cluster = EtcdCluster(tmp_path, size=1)
    with cluster:
        pid = cluster.members[0].pid
        assert etcdctl(cluster.endpoints, "put", "k", "v").returncode == 0
        cluster.sigstop(0)  # stop() must also end a frozen member
    assert pid is not None and not os.path.exists(f"/proc/{pid}")
    cluster.stop()
    assert cluster.members[0].proc is None


def test_tls_cluster_needs_client_certificate(etcd_tls_cluster: EtcdCluster) -> None:
    cluster = etcd_tls_cluster
    assert all(url.startswith("https://127.0.0.1:") for url in cluster.client_urls)
    key = unique_key("tls")
    r = etcdctl(cluster.endpoints, "put", key, "secret", cluster=cluster)
    assert r.returncode == 0, r.stderr
    r = etcdctl(cluster.client_urls, "get", key, "--print-value-only", cluster=cluster)
    assert r.stdout.strip() == "secret", r.stderr
    # Without any TLS flags, and with the CA but no client certificate: refused.
    assert etcdctl(cluster.client_urls, "get", key, timeout=3).returncode != 0
    r = etcdctl(cluster.client_urls, "get", key, f"--cacert={cluster.ca_file}", timeout=3)
    assert r.returncode != 0


def test_tls_server_names(etcd_tls_cluster: EtcdCluster) -> None:
    """Each member's certificate is valid for its mN.etcd.test name (used by SRV tests)."""
    cluster = etcd_tls_cluster
    ctx = ssl.create_default_context(cafile=str(cluster.ca_file))
    ctx.load_cert_chain(str(cluster.client_cert), str(cluster.client_key))
    for m, name in zip(cluster.members, cluster.server_names, strict=True):
        with socket.create_connection(("127.0.0.1", m.client_port), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname=name) as tls:
                assert tls.version() is not None
    other = cluster.server_names[1]
    with socket.create_connection(("127.0.0.1", cluster.members[0].client_port), timeout=5) as raw:
        with pytest.raises(ssl.SSLCertVerificationError):
            ctx.wrap_socket(raw, server_hostname=other)
