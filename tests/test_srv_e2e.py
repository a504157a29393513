"""`etcdgw start --discovery-srv` end to end: real dnsmasq, real TLS etcd cluster, etcdctl.

The gateway finds the members through SRV records served by dnsmasq on loopback, checks
each https target with a TLS handshake against the trusted CA, and forwards etcdctl's TLS
bytes untouched. A refresh follows the records when dnsmasq is restarted with others.
"""

from __future__ import annotations

import json
import signal
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _dns import Dnsmasq, SrvHost
from _etcd import EtcdCluster, etcdctl
from _gateway import GatewayProc, free_tcp_port, wait_for

Start = Callable[..., GatewayProc]
DOMAIN = "etcd.test"


def ssl_records(cluster: EtcdCluster, members: range | list[int]) -> list[SrvHost]:
    return [
        SrvHost(
            f"_etcd-client-ssl._tcp.{DOMAIN}",
            cluster.server_names[i],
            cluster.members[i].client_port,
        )
        for i in members
    ]


def host_records(cluster: EtcdCluster) -> dict[str, list[str]]:
    return {name: ["127.0.0.1"] for name in cluster.server_names}


def test_srv_tls_cluster_through_gateway_and_refresh(
    gateway: Start, dnsmasq: Dnsmasq, etcd_tls_cluster: EtcdCluster
) -> None:
    cluster = etcd_tls_cluster
    dnsmasq.restart(srv=ssl_records(cluster, [0, 1]), hosts=host_records(cluster))
    port = free_tcp_port()
    gw = f"127.0.0.1:{port}"
    g = gateway(
        f"--discovery-srv={DOMAIN}",
        f"--discovery-dns={dnsmasq.addr}",
        f"--trusted-ca-file={cluster.ca_file}",
        f"--listen-addr={gw}",
        "--discovery-refresh-min=200ms",
    )
    want = [f"{cluster.server_names[i]}:{cluster.members[i].client_port}" for i in (0, 1)]
    assert g.wait_ready()["endpoints"] == want
    assert "using validated discovered SRV endpoints" in g.messages()
    r = etcdctl(gw, "put", "srv", "ok", cluster=cluster)
    assert (r.returncode, r.stdout) == (0, "OK\n"), r.stderr
    # Members change in DNS: the gateway follows without a restart.
    dnsmasq.restart(srv=ssl_records(cluster, [1, 2]), hosts=host_records(cluster))
    rec = g.wait_log("SRV endpoints changed", timeout=20)
    assert rec["added"] and rec["removed"]
    want = [f"{cluster.server_names[i]}:{cluster.members[i].client_port}" for i in (1, 2)]
    g.wait_log("endpoints updated", endpoints=want)
    for _ in range(3):
        assert etcdctl(gw, "get", "srv", "--print-value-only", cluster=cluster).stdout == "ok\n"
    # DNS goes away: the last good set keeps serving.
    dnsmasq.stop()
    wait_for(lambda: "SRV refresh failed; keeping the last good endpoints" in g.messages(), 20)
    assert etcdctl(gw, "get", "srv", "--print-value-only", cluster=cluster).stdout == "ok\n"


def test_both_lookups_failing_is_fatal(relay_impl: str, dnsmasq: Dnsmasq) -> None:
    g = GatewayProc(
        ["start", f"--discovery-srv={DOMAIN}", f"--discovery-dns={dnsmasq.addr}"],
        impl=relay_impl,
    )
    assert g.proc.wait(30) == 1
    g.stop()
    err = "\n".join(g.lines)
    assert "dns lookup errors: " in err and "_etcd-client-ssl._tcp.etcd.test" in err
    assert "Traceback" not in err


def test_http_records_need_insecure_discovery(
    relay_impl: str, dnsmasq: Dnsmasq, etcd_cluster: EtcdCluster
) -> None:
    """Plain http records are dropped by default: fall back to --endpoints, saying why."""
    srv = [
        SrvHost(f"_etcd-client._tcp.{DOMAIN}", f"m{i + 1}.{DOMAIN}", m.client_port)
        for i, m in enumerate(etcd_cluster.members)
    ]
    hosts = {f"m{i + 1}.{DOMAIN}": ["127.0.0.1"] for i in range(3)}
    dnsmasq.restart(srv=srv, hosts=hosts)
    fallback = etcd_cluster.endpoints[0]
    port = free_tcp_port()
    common = [f"--discovery-srv={DOMAIN}", f"--discovery-dns={dnsmasq.addr}"]
    g = GatewayProc(
        ["start", *common, f"--endpoints={fallback}", f"--listen-addr=127.0.0.1:{port}"],
        impl=relay_impl,
    )
    try:
        assert g.wait_ready()["endpoints"] == [fallback]
        assert (
            "no discovered SRV endpoint survived validation; falling back to --endpoints"
            in g.messages()
        )
    finally:
        assert g.stop() == 0
    g = GatewayProc(
        ["start", *common, "--insecure-discovery", f"--listen-addr=127.0.0.1:{port}"],
        impl=relay_impl,
    )
    try:
        assert len(g.wait_ready()["endpoints"]) == 3
        assert etcdctl(f"127.0.0.1:{port}", "put", "insecure", "1").stdout == "OK\n"
    finally:
        assert g.stop() == 0


def test_srv_record_pointing_at_gateway_refused(relay_impl: str, dnsmasq: Dnsmasq) -> None:
    port = free_tcp_port()
    dnsmasq.restart(
        srv=[SrvHost(f"_etcd-client._tcp.{DOMAIN}", f"gw.{DOMAIN}", port)],
        hosts={f"gw.{DOMAIN}": ["127.0.0.1"]},
    )
    g = GatewayProc(
        [
            "start",
            f"--discovery-srv={DOMAIN}",
            f"--discovery-dns={dnsmasq.addr}",
            "--insecure-discovery",
            f"--listen-addr=127.0.0.1:{port}",
        ],
        impl=relay_impl,
    )
    assert g.proc.wait(30) == 1
    g.stop()
    assert "should not resolve to the gateway listen addr" in g.stdout


def test_srv_endpoints_stay_srv_in_status_across_a_reload(
    gateway: Start, dnsmasq: Dnsmasq, etcd_tls_cluster: EtcdCluster, tmp_path: Path
) -> None:
    """A SIGHUP reload that keeps the SRV settings keeps the refresher, and the endpoints it
    passes on keep their origin: /status says `srv`, not `flag` (hostile review of issue 19)."""
    cluster = etcd_tls_cluster
    dnsmasq.restart(srv=ssl_records(cluster, [0, 1]), hosts=host_records(cluster))
    mport = free_tcp_port()
    conf = tmp_path / "gw.yaml"
    conf.write_text(
        f"discovery-srv: {DOMAIN}\n"
        f"discovery-dns: {dnsmasq.addr}\n"
        f"trusted-ca-file: {cluster.ca_file}\n"
        f"listen-addr: 127.0.0.1:{free_tcp_port()}\n"
        f"metrics-addr: 127.0.0.1:{mport}\n"
    )
    g = gateway(f"--config-file={conf}")
    g.wait_ready()

    def sources() -> dict[str, str]:
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/status", timeout=5) as r:
            doc: dict[str, Any] = json.loads(r.read())
        return {e["address"]: e["source"] for e in doc["endpoints"] if not e["removed"]}

    want = {f"{cluster.server_names[i]}:{cluster.members[i].client_port}": "srv" for i in (0, 1)}
    assert sources() == want
    g.proc.send_signal(signal.SIGHUP)
    g.wait_log("reloaded configuration")
    assert sources() == want
