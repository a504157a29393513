"""contrib/prometheus and contrib/grafana against a real Prometheus scraping a real gateway.

One module-scoped setup: a 3-member etcd cluster, etcdgw in front of it with
--metrics-addr, and Debian's `prometheus` binary on a free loopback port (its own config
and data directory, 1 s scrape and rule evaluation) loaded with the shipped rules, only the
`for:` of EtcdgwEndpointDown shortened. The rules themselves are unit-tested by promtool.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from _etcd import EtcdCluster, require_etcd_binaries
from _gateway import GatewayProc, TagServer, connect, free_tcp_port, read_line, tool, wait_for

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "contrib" / "prometheus" / "etcdgw-rules.yml"
RULE_TESTS = ROOT / "contrib" / "prometheus" / "etcdgw-rules.test.yml"
DASHBOARD = ROOT / "contrib" / "grafana" / "etcdgw.json"
IMPL = "python" if os.environ.get("ETCDGW_NO_EXTENSIONS") else "cython"
# Names a PromQL expression may contain that are not metrics.
METRIC = re.compile(r"\b((?:etcdgw|process)_[a-z0-9_]+)\b")


def http_json(url: str, timeout: float = 5) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def scrape(mport: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5) as r:
        return str(r.read().decode())


def sample_names(text: str) -> set[str]:
    return {re.split(r"[{ ]", ln, maxsplit=1)[0] for ln in text.splitlines() if ln[:1].isalpha()}


@dataclass
class Prometheus:
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        doc = http_json(f"http://127.0.0.1:{self.port}/api/v1/{path}?{query}")
        assert doc["status"] == "success", doc
        return doc["data"]

    def query(self, expr: str) -> dict[str, float]:
        """Instant query: {endpoint or '' -> value}."""
        data = self.api("query", query=expr)
        return {r["metric"].get("endpoint", ""): float(r["value"][1]) for r in data["result"]}

    def until(self, expr: str, expected: dict[str, float] | None, timeout: float = 20) -> None:
        """Wait for the next scrapes and rule evaluations to give `expected` (None: any
        non-empty result)."""
        try:
            wait_for(
                lambda: (r := self.query(expr)) == expected or (expected is None and r),
                timeout=timeout,
                step=0.25,
            )
        except AssertionError:
            raise AssertionError(f"{expr} = {self.query(expr)}, not {expected}") from None


@dataclass
class Setup:
    cluster: EtcdCluster
    gateway: GatewayProc
    port: int
    mport: int
    prom: Prometheus


def test_rules_pass_promtool() -> None:
    """promtool's own syntax check and the shipped unit tests of every rule."""
    r = subprocess.run(
        [tool("promtool"), "check", "rules", str(RULES)], capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run(
        [tool("promtool"), "test", "rules", RULE_TESTS.name], capture_output=True, text=True,
        timeout=60, check=False, cwd=RULE_TESTS.parent,
    )  # fmt: skip
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr
    # Every alerting rule has at least one scenario that expects it to fire.
    alerts = {
        rule["alert"]
        for group in yaml.safe_load(RULES.read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }
    fired = {
        t["alertname"]
        for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for t in case.get("alert_rule_test", [])
        if t["exp_alerts"]
    }
    assert alerts and alerts == fired, alerts ^ fired


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    require_etcd_binaries()
    tmp = tmp_path_factory.mktemp("prometheus")
    with EtcdCluster(tmp / "etcd") as cluster:
        port, mport = free_tcp_port(), free_tcp_port()
        gw = GatewayProc(
            ["start", f"--endpoints={','.join(cluster.endpoints)}",
             f"--listen-addr=127.0.0.1:{port}", f"--metrics-addr=127.0.0.1:{mport}",
             "--dial-timeout=1s", "--retry-delay=5m"],
            impl=IMPL,
        )  # fmt: skip
        try:
            gw.wait_ready()
            # The shipped rules, only EtcdgwEndpointDown's `for:` shortened to 2s.
            rules = yaml.safe_load(RULES.read_text())
            for group in rules["groups"]:
                for rule in group["rules"]:
                    if rule.get("alert") == "EtcdgwEndpointDown":
                        rule["for"] = "2s"
            (tmp / "rules.yml").write_text(yaml.safe_dump(rules))
            (tmp / "prometheus.yml").write_text(
                yaml.safe_dump(
                    {
                        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                        "rule_files": [str(tmp / "rules.yml")],
                        "scrape_configs": [
                            {
                                "job_name": "etcdgw",
                                "static_configs": [{"targets": [f"127.0.0.1:{mport}"]}],
                            }
                        ],
                    }
                )
            )
            pport = free_tcp_port()
            log = tmp / "prometheus.log"
            with log.open("wb") as out:
                proc = subprocess.Popen(
                    [tool("prometheus"), f"--config.file={tmp / 'prometheus.yml'}",
                     f"--storage.tsdb.path={tmp / 'data'}",
                     f"--web.listen-address=127.0.0.1:{pport}", "--log.level=warn"],
                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    cwd=tmp,
                )  # fmt: skip
            prom = Prometheus(pport, proc, log)
            try:

                def ready() -> bool:
                    assert proc.poll() is None, log.read_text()
                    try:
                        with urllib.request.urlopen(f"http://127.0.0.1:{pport}/-/ready", timeout=2):
                            return True
                    except OSError:
                        return False

                wait_for(ready, timeout=30, step=0.1)
                yield Setup(cluster, gw, port, mport, prom)
            finally:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        finally:
            gw.stop()


def request_through(port: int) -> bytes:
    """One client connection through the gateway: etcd's GET /version, the whole answer."""
    with connect(port, timeout=10) as s:
        s.sendall(b"GET /version HTTP/1.0\r\nHost: etcd\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def test_series_move_and_endpoint_down_alert_fires(setup: Setup) -> None:
    prom = setup.prom
    victim = setup.cluster.endpoints[0]
    for _ in range(6):
        assert b"etcdserver" in request_through(setup.port)

    prom.until('etcdgw_connections_accepted_total{job="etcdgw"} >= 6', None)
    assert prom.query('etcdgw_bytes_total{direction="from_endpoint"}')[""] > 0
    assert prom.query('etcdgw_bytes_total{direction="to_endpoint"}')[""] > 0
    prom.until("etcdgw:endpoints_usable:sum", {"": 3})
    assert prom.query("etcdgw_endpoint_up") == dict.fromkeys(setup.cluster.endpoints, 1)

    # A member failure: the next dials to it fail, the gateway marks it down and fails over.
    setup.cluster.kill(0)
    for _ in range(6):
        assert b"etcdserver" in request_through(setup.port)

    prom.until("etcdgw_endpoint_up == 0", {victim: 0})
    assert prom.query("etcdgw_endpoint_dial_failures_total")[victim] >= 1
    prom.until("etcdgw:endpoints_usable:sum", {"": 2})
    assert prom.query("etcdgw_connections_refused_total") == {"": 0}

    def firing() -> list[dict[str, Any]]:
        return [
            a
            for a in prom.api("alerts")["alerts"]
            if a["labels"]["alertname"] == "EtcdgwEndpointDown" and a["state"] == "firing"
        ]

    (alert,) = wait_for(firing, timeout=30, step=0.25)
    assert alert["labels"]["endpoint"] == victim
    assert alert["labels"]["severity"] == "warning"
    assert alert["annotations"]["summary"].startswith(f"etcd endpoint {victim} down")
    # No other alert fires: two members are usable, nobody was refused. (EtcdgwDialFailures
    # may be pending: its `for:` is 15 minutes.)
    others = {
        a["labels"]["alertname"] for a in prom.api("alerts")["alerts"] if a["state"] == "firing"
    }
    assert others == {"EtcdgwEndpointDown"}, others


def test_every_metric_of_rules_and_dashboard_exists(setup: Setup) -> None:
    exposed = sample_names(scrape(setup.mport))
    rules_text = RULES.read_text()
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])] + [
        v["definition"] for v in dashboard["templating"]["list"] if "definition" in v
    ]
    used = set(METRIC.findall(rules_text)) | {m for e in exprs for m in METRIC.findall(e)}
    assert "etcdgw_endpoint_up" in used and "etcdgw_max_connections" in used
    missing = used - exposed
    assert not missing, f"not in /metrics of a running gateway: {sorted(missing)}"
    # A few scrapes, so that rate() over 1m has samples to work with.
    setup.prom.until("count_over_time(etcdgw_ready[1m]) >= 3", None, timeout=10)
    # Each dashboard query is valid PromQL for this Prometheus (variables as Grafana fills
    # them) and the gateway's own panels have data.
    for e in exprs:
        q = e.replace("$__rate_interval", "1m").replace("$job", ".+").replace("$instance", ".+")
        q = q.removeprefix("label_values(").rsplit(",", 1)[0] if e.startswith("label_") else q
        result = setup.prom.api("query", query=q)["result"]
        if "max_connections{" not in q and "health_checks" not in q:
            assert result, f"no data for {q}"


def test_draining_and_limit_gauges() -> None:
    """etcdgw_draining and etcdgw_max_connections, which EtcdgwDraining and
    EtcdgwConnectionsNearLimit read, from a real gateway: set, and 1 during a drain."""
    with TagServer("alpha") as backend:
        port, mport = free_tcp_port(), free_tcp_port()
        g = GatewayProc(
            ["start", f"--endpoints={backend.addr}", f"--listen-addr=127.0.0.1:{port}",
             f"--metrics-addr=127.0.0.1:{mport}", "--max-connections=7", "--drain-timeout=30s"],
            impl=IMPL,
        )  # fmt: skip
        try:
            g.wait_ready()
            text = scrape(mport)
            assert "etcdgw_max_connections 7.0" in text.splitlines()
            assert "etcdgw_draining 0.0" in text.splitlines()
            with connect(port) as s:
                assert read_line(s) == b"alpha\n"
                g.proc.send_signal(signal.SIGTERM)
                g.wait_log("stopping; draining connections")
                lines = scrape(mport).splitlines()
                assert "etcdgw_draining 1.0" in lines and "etcdgw_ready 0.0" in lines
            t0 = time.monotonic()
            assert g.proc.wait(15) == 0 and time.monotonic() - t0 < 15
        finally:
            g.stop()
