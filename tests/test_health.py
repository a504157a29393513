"""health.py: rise/fall damping (pure), one /health check on real sockets, the whole loop.

The end-to-end tests run the real `etcdgw start --health-check=etcd` once per relay engine:
first against loopback HTTP servers whose /health answer the test flips, then against a
real etcd member that loses its quorum (the two other members frozen with SIGSTOP).
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from _etcd import EtcdCluster, free_port
from _gateway import GatewayProc, free_tcp_port, wait_for
from etcdgw.balancer import Balancer, Remote
from etcdgw.config import Config, ConfigError, Endpoint
from etcdgw.health import check_endpoint, judge_response, record_check, tls_context
from test_metrics import http_get, scrape, value

Start = Callable[..., GatewayProc]
LOOPBACK = [(socket.AF_INET, ("127.0.0.1", 0))]


class One:
    """One remote in a real Balancer; `check` is HealthChecker.apply's decision part:
    record_check, and a changed verdict through the Balancer (its owner)."""

    def __init__(self) -> None:
        self.balancer = Balancer([Endpoint("127.0.0.1", 2379)])
        self.r: Remote = self.balancer.remotes[0]
        self.signals = 0
        self.balancer.on_change = self._changed

    def _changed(self) -> None:
        self.signals += 1

    def check(self, error: str, *, rise: int, fall: int) -> bool | None:
        verdict = record_check(self.r, error, rise=rise, fall=fall)
        assert verdict is None or verdict != self.r.healthy  # a verdict is a change
        if verdict is not None:
            assert self.balancer.set_healthy(self.r, verdict)
        return verdict


# --- damping (pure) ---------------------------------------------------------------------------


def test_fall_needs_consecutive_failures() -> None:
    one = One()
    r = one.r
    assert one.check("boom 1", rise=2, fall=3) is None
    assert one.check("boom 2", rise=2, fall=3) is None
    assert r.healthy
    assert one.check("", rise=2, fall=3) is None  # a pass resets the failure run
    assert one.check("boom 3", rise=2, fall=3) is None
    assert one.check("boom 4", rise=2, fall=3) is None
    assert one.check("boom 5", rise=2, fall=3) is False
    assert not r.healthy and not r.usable
    assert one.check("boom 6", rise=2, fall=3) is None  # already down: no new change
    assert (r.health_ok_total, r.health_failed_total) == (1, 6)
    assert r.last_health_error == "boom 6"
    assert one.signals == 1  # the verdict changed once, through the Balancer


def test_record_check_leaves_the_verdict_to_the_balancer() -> None:
    one = One()
    assert record_check(one.r, "x", rise=1, fall=1) is False
    assert one.r.healthy and one.signals == 0  # decided, not written


def test_rise_needs_consecutive_passes() -> None:
    one = One()
    r = one.r
    assert one.check("x", rise=2, fall=1) is False
    assert one.check("", rise=2, fall=1) is None
    assert one.check("y", rise=2, fall=1) is None  # a failure resets the pass run
    assert one.check("", rise=2, fall=1) is None
    assert one.check("", rise=2, fall=1) is True
    assert r.healthy and r.usable
    assert r.last_health_error == "y"  # kept: it is the *last* error, for `etcdgw status`


def test_health_and_dial_state_are_separate() -> None:
    one = One()
    r = one.r
    one.balancer.mark_down(r, "dial tcp 127.0.0.1:2379: connect: connection refused", 1.0)
    assert one.check("", rise=1, fall=1) is None  # healthy already; activation is I/O's
    assert not r.active and not r.usable


# No per-example deadline: a busy 2-core CI machine must not turn slowness into a failure.
@settings(deadline=None, max_examples=200)
@given(st.lists(st.booleans(), max_size=60), st.integers(1, 5), st.integers(1, 5))
def test_damping_matches_model(results: list[bool], rise: int, fall: int) -> None:
    """The verdict flips exactly when the last `fall` (or `rise`) results all disagree."""
    one = One()
    r = one.r
    healthy, run_ok, run_bad = True, 0, 0
    for ok in results:
        run_ok, run_bad = (run_ok + 1, 0) if ok else (0, run_bad + 1)
        expect = None
        if healthy and run_bad >= fall:
            healthy, expect = False, False
        elif not healthy and run_ok >= rise:
            healthy, expect = True, True
        assert one.check("" if ok else "bad", rise=rise, fall=fall) is expect
        assert r.healthy is healthy
    assert r.health_ok_total == sum(results)
    assert r.health_failed_total == len(results) - sum(results)


@pytest.mark.parametrize(
    ("status", "body", "healthy"),
    [
        (200, b'{"health":"true"}', True),
        (200, b'{"health":"true","reason":""}\n', True),  # 3.4.x later / 3.5
        (200, b'{"health":true}', True),
        (503, b'{"health":"false"}', False),
        (503, b'{"health":"false","reason":"RAFT NO LEADER"}', False),
        (200, b'{"health":"false"}', False),
        (200, b"OK", False),
        (200, b"", False),
        (404, b"404 page not found", False),
        (500, b'{"health":"true"}', False),
    ],
)
def test_judge_response(status: int, body: bytes, healthy: bool) -> None:
    error = judge_response(status, "Reason", body)
    assert (error == "") is healthy
    if status != 200:
        assert error.startswith(f"{status} Reason")


# --- one check, real sockets ------------------------------------------------------------------


async def _serve_once(
    answer: bytes, *, ssl_ctx: ssl.SSLContext | None = None, hang: bool = False
) -> tuple[asyncio.Server, int, list[bytes]]:
    seen: list[bytes] = []

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            seen.append(await r.readuntil(b"\r\n\r\n"))
            if hang:
                await asyncio.sleep(30)
            w.write(answer)
            await w.drain()
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            w.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ssl_ctx)
    return srv, srv.sockets[0].getsockname()[1], seen


def run_check(answer: bytes, timeout: float = 3.0, **kw: Any) -> tuple[str, list[bytes]]:
    async def main() -> tuple[str, list[bytes]]:
        srv, port, seen = await _serve_once(answer, **kw)
        async with srv:
            err = await check_endpoint(
                Endpoint("127.0.0.1", port), LOOPBACK, timeout=timeout, ssl_context=None
            )
        return err, seen

    return asyncio.run(main())


def test_check_healthy_member(no_fd_leak: None) -> None:
    body = b'{"health":"true"}'
    err, seen = run_check(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )
    assert err == ""
    req = seen[0].decode()
    assert req.startswith("GET /health HTTP/1.1\r\n")
    assert "\r\nHost: 127.0.0.1:" in req and "Connection: close" in req


def test_check_chunked_and_close_delimited() -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'7\r\n{"healt\r\na\r\nh":"true"}\r\n0\r\n\r\n'
    )
    assert run_check(chunked)[0] == ""
    assert run_check(b'HTTP/1.0 200 OK\r\n\r\n{"health":"true"}')[0] == ""


def test_check_unhealthy_answer() -> None:
    body = b'{"health":"false","reason":"RAFT NO LEADER"}'
    err, _ = run_check(
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    assert err.startswith("GET http://127.0.0.1:")
    assert "503 Service Unavailable" in err and "RAFT NO LEADER" in err


def test_check_garbage_answer() -> None:
    err, _ = run_check(b"SSH-2.0-OpenSSH_9.2\r\n")
    assert "malformed response" in err


def test_check_timeout_is_bounded(no_fd_leak: None) -> None:
    t0 = time.monotonic()
    err, _ = run_check(b"", timeout=0.3, hang=True)
    assert time.monotonic() - t0 < 3
    assert err.endswith("i/o timeout (300ms)"), err


def test_check_refused(no_fd_leak: None) -> None:
    port = free_tcp_port()
    err = asyncio.run(
        check_endpoint(Endpoint("127.0.0.1", port), LOOPBACK, timeout=2, ssl_context=None)
    )
    assert err == (
        f"GET http://127.0.0.1:{port}/health: dial tcp 127.0.0.1:{port}: connect: "
        "connection refused"
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    import trustme

    d = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    client = ca.issue_cert("client.test")
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    client.cert_chain_pems[0].write_to_path(str(d / "client.pem"))
    client.private_key_pem.write_to_path(str(d / "client-key.pem"))
    return {"ca": ca, "server": server, "dir": d}


def _server_ctx(pki: dict[str, Any], require_client: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    pki["server"].configure_cert(ctx)
    if require_client:
        pki["ca"].configure_trust(ctx)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _tls_check(pki: dict[str, Any], host: str, cfg: Config, require_client: bool) -> str:
    body = b'{"health":"true"}'
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)

    async def main() -> str:
        srv, port, _ = await _serve_once(answer, ssl_ctx=_server_ctx(pki, require_client))
        async with srv:
            return await check_endpoint(
                Endpoint(host, port, secure=True),
                LOOPBACK,
                timeout=3,
                ssl_context=tls_context(cfg),
            )

    return asyncio.run(main())


def test_check_tls_verifies_and_presents_client_cert(pki: dict[str, Any]) -> None:
    d: Path = pki["dir"]
    with_cert = Config(
        trusted_ca_file=str(d / "ca.pem"),
        health_cert_file=str(d / "client.pem"),
        health_key_file=str(d / "client-key.pem"),
    )
    assert _tls_check(pki, "localhost", with_cert, require_client=True) == ""
    assert _tls_check(pki, "127.0.0.1", with_cert, require_client=True) == ""
    # The name checked is the endpoint's host (SNI), not the address dialled.
    err = _tls_check(pki, "etcd.example.com", with_cert, require_client=False)
    assert err.startswith("GET https://etcd.example.com:") and "tls: certificate verify" in err
    # A member with --client-cert-auth refuses a check that has no certificate.
    anonymous = Config(trusted_ca_file=str(d / "ca.pem"))
    err = _tls_check(pki, "localhost", anonymous, require_client=True)
    assert err.startswith("GET https://localhost:") and err != ""
    # Not trusted: the system store does not know the test CA.
    err = _tls_check(pki, "localhost", Config(), require_client=False)
    assert "certificate verify failed" in err


def test_tls_context_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        tls_context(Config(trusted_ca_file=str(tmp_path / "missing.pem")))
    assert e.value.message.startswith(f"failed to load trusted CA file {tmp_path}/missing.pem")
    with pytest.raises(ConfigError) as e:
        tls_context(Config(health_cert_file=str(tmp_path / "c.pem"), health_key_file="k"))
    assert "--health-cert-file" in e.value.message


# --- the whole loop against loopback HTTP "members" ------------------------------------------


class FakeMember:
    """An HTTP server on loopback that answers every request with its /health verdict and
    its name, so a request sent through the gateway tells which member got it."""

    def __init__(self, name: str, port: int = 0) -> None:
        self.name = name
        self.healthy = True
        member = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                ok = member.healthy
                body = json.dumps(
                    {"health": "true" if ok else "false", "member": member.name}
                ).encode()
                self.send_response(200 if ok else 503)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.port = int(self.httpd.server_address[1])
        self.addr = f"127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,))
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(5)


@pytest.fixture
def members() -> Iterator[list[FakeMember]]:
    ms = [FakeMember("a"), FakeMember("b")]
    yield ms
    for m in ms:
        m.close()


def member_via(port: int) -> str:
    """Which member answers a request sent through the gateway."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as resp:
        return str(json.loads(resp.read())["member"])


def member_via_any(port: int) -> str:
    try:
        return member_via(port)
    except urllib.error.HTTPError as e:  # an unhealthy member answers 503
        return str(json.loads(e.read())["member"])


def test_unhealthy_member_gets_no_new_clients(gateway: Start, members: list[FakeMember]) -> None:
    a, b = members
    port, mport = free_tcp_port(), free_tcp_port()
    g = gateway(
        f"--endpoints={a.addr},{b.addr}",
        f"--listen-addr=127.0.0.1:{port}",
        f"--metrics-addr=127.0.0.1:{mport}",
        "--health-check=etcd",
        "--health-interval=100ms",
        "--health-rise=2",
        "--health-fall=2",
    )
    assert sorted(member_via(port) for _ in range(4)) == ["a", "a", "b", "b"]

    a.healthy = False
    rec = g.wait_log("endpoint unhealthy", timeout=20, address=a.addr)
    assert "503" in rec["error"] and "false" in rec["error"]
    assert [member_via(port) for _ in range(6)] == ["b"] * 6
    status = json.loads(http_get(mport, "/status")[2])
    row = {e["address"]: e for e in status["endpoints"]}
    assert row[a.addr]["healthy"] is False and row[a.addr]["state"] == "up"
    assert row[a.addr]["health_checks_failed"] >= 2
    assert "503 Service Unavailable" in row[a.addr]["last_health_error"]
    assert row[b.addr]["healthy"] is True
    metrics = http_get(mport, "/metrics")[2].decode()
    assert f'etcdgw_endpoint_healthy{{endpoint="{a.addr}"}} 0.0' in metrics
    assert f'etcdgw_endpoint_healthy{{endpoint="{b.addr}"}} 1.0' in metrics

    a.healthy = True
    g.wait_log("endpoint healthy", timeout=20, address=a.addr)
    assert sorted(member_via(port) for _ in range(4)) == ["a", "a", "b", "b"]
    assert g.stop() == 0


def test_all_unhealthy_still_serves_and_recovers_dial_failed(
    gateway: Start, members: list[FakeMember]
) -> None:
    """Every member unhealthy: a client still gets one (the fallback dial) rather than a
    reset. An endpoint down after a failed dial is back at its first good check, long
    before --retry-delay."""
    a = members[0]
    port = free_tcp_port()
    # Below the ephemeral range: no outgoing connection can hold it when we bind it later.
    dead = free_port()
    dead_addr = f"127.0.0.1:{dead}"
    g = gateway(
        f"--endpoints={dead_addr},{a.addr}",
        f"--listen-addr=127.0.0.1:{port}",
        "--health-check=etcd",
        "--health-interval=100ms",
        "--health-fall=1",
        "--health-rise=1",
        "--retry-delay=10m",
    )
    g.wait_log("endpoint unhealthy", timeout=20, address=dead_addr)
    a.healthy = False
    g.wait_log("endpoint unhealthy", timeout=20, address=a.addr)
    # The fallback dials the dead one (now deactivated), then a.
    assert member_via_any(port) == "a"
    g.wait_log("deactivated endpoint", timeout=5, address=dead_addr)
    a.healthy = True
    g.wait_log("endpoint healthy", timeout=20, address=a.addr)
    assert member_via(port) == "a"

    revived = FakeMember("c", port=dead)
    try:
        g.wait_log("activated", timeout=20, address=dead_addr)
        g.wait_log("endpoint healthy", timeout=20, address=dead_addr)
        assert sorted(member_via(port) for _ in range(4)) == ["a", "a", "c", "c"]
    finally:
        revived.close()
    assert g.stop() == 0


# --- a real etcd member that loses its quorum -------------------------------------------------


def etcd_health(port: int) -> str:
    """A member's own /health verdict ("true"/"false"), or the error text."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=3) as resp:
            return str(json.loads(resp.read())["health"])
    except urllib.error.HTTPError as e:
        return str(json.loads(e.read()).get("health"))
    except (OSError, ValueError) as e:
        return f"error: {e}"


def test_member_without_quorum_gets_no_new_clients(
    gateway: Start, etcd_cluster_fn: EtcdCluster
) -> None:
    """Member 0 accepts TCP but, with the two others frozen, has no leader: etcd's /health
    says false. The gateway (member 0 + one healthy control) sends new clients to the
    control only, and to member 0 again once the cluster is whole."""
    cluster = etcd_cluster_fn
    m0 = cluster.members[0]
    control = FakeMember("control")
    port, mport = free_tcp_port(), free_tcp_port()
    try:
        g = gateway(
            f"--endpoints={m0.endpoint},{control.addr}",
            f"--listen-addr=127.0.0.1:{port}",
            f"--metrics-addr=127.0.0.1:{mport}",
            "--health-check=etcd",
            "--health-interval=200ms",
            "--health-rise=2",
            "--health-fall=2",
            # etcd 3.4 answers /health only after a 1 s quorum read when it has a leader.
            "--dial-timeout=4s",
        )

        def served() -> dict[str, int]:
            doc = json.loads(http_get(mport, "/status")[2])
            return {e["address"]: e["total_connections"] for e in doc["endpoints"]}

        assert served()[m0.endpoint] == 0
        for _ in range(4):
            assert member_via_any_etcd(port) in ("etcd", "control")
        assert served()[m0.endpoint] == 2

        cluster.sigstop(1)
        cluster.sigstop(2)
        try:
            wait_for(lambda: etcd_health(m0.client_port) == "false", timeout=30, step=0.2)
            rec = g.wait_log("endpoint unhealthy", timeout=30, address=m0.endpoint)
            assert "/health" in rec["error"]
            before = served()[m0.endpoint]
            assert [member_via_any_etcd(port) for _ in range(6)] == ["control"] * 6
            assert served()[m0.endpoint] == before
        finally:
            cluster.sigcont(1)
            cluster.sigcont(2)
        cluster.wait_healthy(timeout=30)
        g.wait_log("endpoint healthy", timeout=30, address=m0.endpoint)
        got = [member_via_any_etcd(port) for _ in range(4)]
        assert sorted(got) == ["control", "control", "etcd", "etcd"]
        assert served()[m0.endpoint] == before + 2
        assert g.stop() == 0
    finally:
        control.close()


def member_via_any_etcd(port: int) -> str:
    """GET /health through the gateway: "control" for the fake member, "etcd" otherwise."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as resp:
            doc = json.loads(resp.read())
    except urllib.error.HTTPError as e:
        doc = json.loads(e.read())
    return str(doc.get("member", "etcd"))


def test_tls_members_checked_with_client_certificate(
    gateway: Start, etcd_tls_cluster: EtcdCluster
) -> None:
    """https:// endpoints are checked over TLS, verified with --trusted-ca-file, presenting
    --health-cert-file: a member run with --client-cert-auth refuses a check without it."""
    c = etcd_tls_cluster
    eps = ",".join(m.client_url for m in c.members)
    common = [
        f"--endpoints={eps}",
        "--health-check=etcd",
        "--health-interval=100ms",
        "--health-fall=1",
        f"--trusted-ca-file={c.ca_file}",
    ]
    mport = free_tcp_port()
    g = gateway(
        *common,
        f"--listen-addr=127.0.0.1:{free_tcp_port()}",
        f"--metrics-addr=127.0.0.1:{mport}",
        f"--health-cert-file={c.client_cert}",
        f"--health-key-file={c.client_key}",
    )

    def checked_ok() -> bool:
        m = scrape(mport)
        return all(
            value(m, "etcdgw_health_checks_total", endpoint=ep.endpoint, result="ok") >= 3
            for ep in c.members
        )

    wait_for(checked_ok, timeout=30, step=0.1)
    m = scrape(mport)
    for ep in c.members:
        assert value(m, "etcdgw_health_checks_total", endpoint=ep.endpoint, result="failed") == 0
        assert value(m, "etcdgw_endpoint_healthy", endpoint=ep.endpoint) == 1
    assert "endpoint unhealthy" not in g.messages()

    anonymous = gateway(*common, f"--listen-addr=127.0.0.1:{free_tcp_port()}")
    for ep in c.members:
        rec = anonymous.wait_log("endpoint unhealthy", timeout=30, address=ep.endpoint)
        assert rec["error"].startswith(f"GET https://{ep.endpoint}/health: tls: "), rec


def test_unreadable_tls_files_fail_the_start(relay_impl: str, tmp_path: Path) -> None:
    """A bad --trusted-ca-file for health checks is a start-up error, not a traceback."""
    missing = tmp_path / "missing-ca.pem"
    g = GatewayProc(
        [
            "start",
            "--endpoints=127.0.0.1:2",
            f"--listen-addr=127.0.0.1:{free_tcp_port()}",
            "--health-check=etcd",
            f"--trusted-ca-file={missing}",
        ],
        impl=relay_impl,
    )
    try:
        assert g.proc.wait(15) == 1
    finally:
        g.stop()
    text = "\n".join(g.lines)
    assert f"failed to load trusted CA file {missing}: no such file or directory" in g.lines, text
    assert "Traceback" not in text
    assert "ready to proxy client requests" not in g.messages()
