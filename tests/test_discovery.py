"""Tests for etcdgw.discovery: pure parts, then a real dnsmasq and real TLS servers on loopback."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from _dns import Dnsmasq, SrvHost
from etcdgw.config import Config, ConfigError, Endpoint, Listen
from etcdgw.discovery import (
    Discovered,
    DiscoveryError,
    Refresher,
    SrvRecord,
    clamp_ttl,
    diff,
    discover,
    endpoint_url,
    get_srv_service,
    order_endpoints,
    retry_delay,
    self_check_for,
    srv_names,
    to_endpoint,
)
from etcdgw.log import Logger
from etcdgw.resolver import async_host_resolver, host_resolver, parse_dns_server
from etcdgw.tls import client_context

DOMAIN = "etcd.test"
SSL = f"_etcd-client-ssl._tcp.{DOMAIN}"
PLAIN = f"_etcd-client._tcp.{DOMAIN}"
WAIT = 15.0  # upper bound for anything the refresher should do within a few TTLs


# --- helpers ----------------------------------------------------------------------------------


class LogCapture:
    """A Logger writing JSON lines to memory, and the parsed lines."""

    def __init__(self) -> None:
        self.buf = io.StringIO()
        self.logger = Logger(level="debug", stream=self.buf)

    @property
    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.buf.getvalue().splitlines()]

    def msgs(self, msg: str) -> list[dict[str, Any]]:
        return [rec for rec in self.lines if rec["msg"] == msg]


def cfg_for(dnsmasq: Dnsmasq, **kw: Any) -> Config:
    kw.setdefault("discovery_srv", DOMAIN)
    kw.setdefault("discovery_dns", dnsmasq.addr)
    return Config(**kw)


class TLSServer:
    """A loopback server that completes TLS handshakes (or refuses to), then closes.

    kind: "tls" (certificate for `names` from `ca`), "plain" (answers like an HTTP server),
    "alert" (answers the ClientHello with a bad_certificate alert, showing no certificate),
    "silent" (accepts TCP, never speaks: the handshake must time out).
    """

    def __init__(
        self,
        kind: str = "tls",
        *,
        ca: trustme.CA | None = None,
        names: tuple[str, ...] = ("m1.etcd.test",),
        client_ca: trustme.CA | None = None,
        max_tls12: bool = False,
    ) -> None:
        self.kind = kind
        # TLS connections taken, counted at accept, before the server's first byte: a
        # client's handshake cannot finish before its count is in, so the count is final
        # when the client returns. (Counted after the server's own handshake, it raced the
        # client: TLS 1.3 lets the client finish one flight before the server does.)
        self.handshakes = 0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = int(self.sock.getsockname()[1])
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        if kind == "tls":
            assert ca is not None
            ca.issue_cert(*names).configure_cert(self.ctx)
            if client_ca is not None:
                self.ctx.verify_mode = ssl.CERT_REQUIRED
                client_ca.configure_trust(self.ctx)
            if max_tls12:
                self.ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if kind != "silent":
            self._thread = threading.Thread(target=self._serve, daemon=True)
            self._thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    if self.kind == "plain":
                        conn.recv(4096)  # the ClientHello: read it so close() sends no RST
                        conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                        continue
                    if self.kind == "alert":
                        # An impostor answering the ClientHello with a fatal bad_certificate
                        # alert, as a server missing our client certificate would.
                        conn.recv(4096)
                        conn.sendall(bytes([21, 3, 3, 0, 2, 2, 42]))
                        continue
                    self.handshakes += 1
                    with self.ctx.wrap_socket(conn, server_side=True):
                        pass
                except (ssl.SSLError, OSError):
                    pass

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.sock.close()


@pytest.fixture
def servers() -> Iterator[Callable[..., TLSServer]]:
    made: list[TLSServer] = []

    def make(*args: Any, **kw: Any) -> TLSServer:
        s = TLSServer(*args, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


@pytest.fixture
def ca(tmp_path: Path) -> tuple[trustme.CA, Path]:
    ca = trustme.CA()
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return ca, path


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_refresher(
    refresher: Refresher, scenario: Callable[[], Any], *, timeout: float = 60
) -> None:
    """Run refresher.run() in a fresh loop while `scenario` (an async function) runs."""

    async def main() -> None:
        task = asyncio.create_task(refresher.run())
        try:
            await asyncio.wait_for(scenario(), timeout)
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(main())


async def until(cond: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


# --- pure parts (etcd srv_test.go / gateway behaviour) ------------------------------------------


@pytest.mark.parametrize(
    ("scheme", "name", "want"),
    [
        ("https", "", "etcd-client-ssl"),
        ("http", "", "etcd-client"),
        ("https", "foo", "etcd-client-ssl-foo"),
        ("http", "bar", "etcd-client-bar"),
    ],
)
def test_get_srv_service(scheme: str, name: str, want: str) -> None:
    # etcd client/pkg/srv TestGetSRVService
    assert get_srv_service("etcd-client", scheme, name) == want


def test_srv_names() -> None:
    assert srv_names("example.com") == (
        "_etcd-client-ssl._tcp.example.com",
        "_etcd-client._tcp.example.com",
    )
    assert srv_names("example.com.", "c1") == (
        "_etcd-client-ssl-c1._tcp.example.com",
        "_etcd-client-c1._tcp.example.com",
    )


def test_to_endpoint_strips_trailing_dot_and_keeps_priority_weight() -> None:
    ep = to_endpoint(SrvRecord("c.example.com.", 2480, 3, 7), secure=True)
    assert ep == Endpoint("c.example.com", 2480, 3, 7, True)
    assert endpoint_url(ep) == "https://c.example.com:2480"
    assert endpoint_url(Endpoint("::1", 2379)) == "http://[::1]:2379"


def test_order_https_first_then_http_each_by_priority() -> None:
    # etcd TestSRVDiscover "both": the https list, then the http one.
    https = [SrvRecord("10.0.0.2", 2480, 2, 0), SrvRecord("10.0.0.1", 2480, 1, 0)]
    http = [SrvRecord("10.0.0.1", 7001)]
    got = order_endpoints(https, http)
    assert [endpoint_url(e) for e in got] == [
        "https://10.0.0.1:2480",
        "https://10.0.0.2:2480",
        "http://10.0.0.1:7001",
    ]
    assert [e.priority for e in got] == [1, 2, 0]


def test_order_within_a_priority_is_stable_heavier_first() -> None:
    recs = [SrvRecord("b", 1, 0, 10), SrvRecord("a", 1, 0, 10), SrvRecord("c", 1, 0, 50)]
    assert [e.host for e in order_endpoints(recs, [])] == ["c", "a", "b"]
    assert order_endpoints(recs, []) == order_endpoints(list(reversed(recs)), [])


def test_clamp_ttl() -> None:
    assert clamp_ttl(0, 5, 300) == 5
    assert clamp_ttl(60, 5, 300) == 60
    assert clamp_ttl(86400, 5, 300) == 300
    assert clamp_ttl(10, 20, 5) == 20  # a max below the min cannot undercut the min


def test_retry_delay_backs_off_to_max() -> None:
    assert [retry_delay(n, 1, 5) for n in (1, 2, 3, 4, 5)] == [1, 2, 4, 5, 5]


def test_diff() -> None:
    a, b, c = Endpoint("a", 1), Endpoint("b", 1), Endpoint("c", 1)
    assert diff([a, b], [b, c]) == ((c,), (a,))
    assert diff([a], [a]) == ((), ())
    # a new priority is a different record: removed and added
    a2 = Endpoint("a", 1, priority=5)
    assert diff([a], [a2]) == ((a2,), (a,))


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("127.0.0.1:5353", ("127.0.0.1", 5353)),
        ("[::1]:53", ("::1", 53)),
        ("::1", ("::1", 53)),
        ("10.0.0.2", ("10.0.0.2", 53)),
    ],
)
def test_parse_dns_server(text: str, want: tuple[str, int]) -> None:
    assert parse_dns_server(text) == want


@pytest.mark.parametrize("text", ["dns.example:53", "127.0.0.1:0", "127.0.0.1:x", "[::1", ""])
def test_parse_dns_server_rejects(text: str) -> None:
    with pytest.raises(ConfigError, match="invalid --discovery-dns"):
        parse_dns_server(text)


def test_unreadable_ca_file_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(ConfigError) as e:
        client_context(str(missing))
    assert e.value.message == (
        f"failed to load trusted CA file {missing}: no such file or directory"
    )
    assert e.value.stream == "stderr"
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"^failed to load trusted CA file .*garbage\.pem: "):
        client_context(str(garbage))


def test_self_check_for_refuses_the_gateways_own_address() -> None:
    cfg = Config(listen=(Listen("127.0.0.1", 23790),))
    check = self_check_for(cfg, lambda host: ["127.0.0.1"])
    assert check(Endpoint("m1.etcd.test", 2379)) is None
    msg = check(Endpoint("m1.etcd.test", 23790))
    assert msg is not None and "should not resolve to the gateway listen addr" in msg


# --- real DNS: lookup and mapping -------------------------------------------------------------


def test_discover_https_and_http_records_insecure(dnsmasq: Dnsmasq) -> None:
    dnsmasq.restart(
        srv=[
            SrvHost(SSL, "m2.etcd.test", 22379, 20, 5),
            SrvHost(SSL, "m1.etcd.test", 2379, 10, 5),
            SrvHost(PLAIN, "m3.etcd.test", 32379, 0, 0),
        ],
        hosts={"m1.etcd.test": ["127.0.0.1"]},
    )
    cap = LogCapture()
    got = discover(cfg_for(dnsmasq, insecure_discovery=True), cap.logger)
    assert got.endpoints == (
        Endpoint("m1.etcd.test", 2379, 10, 5, True),
        Endpoint("m2.etcd.test", 22379, 20, 5, True),
        Endpoint("m3.etcd.test", 32379, 0, 0, False),
    )
    assert got.ttl == dnsmasq.ttl
    (line,) = cap.msgs("discovered cluster from SRV")
    assert line["srv-server"] == DOMAIN
    assert line["endpoints"] == [
        "https://m1.etcd.test:2379",
        "https://m2.etcd.test:22379",
        "http://m3.etcd.test:32379",
    ]
    assert line["records"][0] == {
        "endpoint": "https://m1.etcd.test:2379",
        "priority": 10,
        "weight": 5,
    }
    # --insecure-discovery: Go returns before validating, and so do we.
    assert not cap.msgs("validating discovered SRV endpoints")


def test_discovery_srv_name_suffix(dnsmasq: Dnsmasq) -> None:
    dnsmasq.restart(
        srv=[
            SrvHost(SSL, "m1.etcd.test", 2379),
            SrvHost(f"_etcd-client-ssl-c1._tcp.{DOMAIN}", "c1.etcd.test", 12379),
            SrvHost(f"_etcd-client-c1._tcp.{DOMAIN}", "c2.etcd.test", 12380),
        ]
    )
    cfg = cfg_for(dnsmasq, discovery_srv_name="c1", insecure_discovery=True)
    got = discover(cfg, LogCapture().logger)
    assert [endpoint_url(e) for e in got.endpoints] == [
        "https://c1.etcd.test:12379",
        "http://c2.etcd.test:12380",
    ]


def test_one_lookup_failing_is_fine(dnsmasq: Dnsmasq) -> None:
    dnsmasq.restart(srv=[SrvHost(PLAIN, "m1.etcd.test", 2379)])
    got = discover(cfg_for(dnsmasq, insecure_discovery=True), LogCapture().logger)
    assert got.endpoints == (Endpoint("m1.etcd.test", 2379),)


def test_service_not_available_records_are_skipped(dnsmasq: Dnsmasq) -> None:
    dnsmasq.restart(srv=[SrvHost(SSL, ""), SrvHost(PLAIN, "m1.etcd.test", 2379)])
    got = discover(cfg_for(dnsmasq, insecure_discovery=True), LogCapture().logger)
    assert got.endpoints == (Endpoint("m1.etcd.test", 2379),)
    dnsmasq.restart(srv=[SrvHost(SSL, "")])
    cap = LogCapture()
    got = discover(cfg_for(dnsmasq, insecure_discovery=True), cap.logger)
    assert got.endpoints == ()
    (warn,) = cap.msgs(
        "no discovered SRV endpoint survived validation; falling back to --endpoints"
    )
    assert "service not available" in warn["reasons"][0]


def test_both_lookups_failing_is_a_discovery_error(dnsmasq: Dnsmasq) -> None:
    with pytest.raises(DiscoveryError) as e:
        discover(cfg_for(dnsmasq), LogCapture().logger)
    server = dnsmasq.addr
    assert str(e.value) == (
        f"dns lookup errors: lookup {SSL} on {server}: no such host and "
        f"lookup {PLAIN} on {server}: no such host"
    )


def test_dead_dns_server_is_a_discovery_error(dnsmasq: Dnsmasq) -> None:
    dnsmasq.stop()
    t0 = time.monotonic()
    with pytest.raises(DiscoveryError, match=r"^dns lookup errors: lookup .* i/o timeout and"):
        discover(cfg_for(dnsmasq), LogCapture().logger, lookup_timeout=0.5)
    assert time.monotonic() - t0 < 3, "both names are queried in parallel, each bounded"


def test_host_resolver_through_discovery_dns(dnsmasq: Dnsmasq) -> None:
    dnsmasq.restart(hosts={"m1.etcd.test": ["127.0.0.1", "::1"]})
    cfg = cfg_for(dnsmasq)
    resolve = host_resolver(cfg)
    assert resolve("m1.etcd.test") == ["127.0.0.1", "::1"]
    assert resolve("10.1.2.3") == ["10.1.2.3"]
    assert "127.0.0.1" in resolve("localhost")  # RFC 6761: never sent to the DNS server
    with pytest.raises(OSError, match=rf"lookup nope\.etcd\.test on {dnsmasq.addr}: no such host"):
        resolve("nope.etcd.test")

    async def check() -> None:
        aresolve = async_host_resolver(cfg)
        assert await aresolve("m1.etcd.test") == ["127.0.0.1", "::1"]
        assert await aresolve("::1") == ["::1"]
        with pytest.raises(OSError, match="no such host"):
            await aresolve("nope.etcd.test")

    asyncio.run(check())


def test_system_host_resolver_without_discovery_dns() -> None:
    resolve = host_resolver(Config())
    assert "127.0.0.1" in resolve("localhost")
    with pytest.raises(OSError):
        resolve("nonexistent.invalid")

    async def lookup() -> list[str]:
        return await async_host_resolver(Config())("127.0.0.1")

    assert asyncio.run(lookup()) == ["127.0.0.1"]


# --- real DNS + real TLS: validation ------------------------------------------------------------


def test_http_records_dropped_without_insecure_discovery(dnsmasq: Dnsmasq) -> None:
    dnsmasq.restart(srv=[SrvHost(PLAIN, "m1.etcd.test", 2379)])
    cap = LogCapture()
    got = discover(cfg_for(dnsmasq), cap.logger)
    assert got.endpoints == ()
    assert got.rejected == (
        (Endpoint("m1.etcd.test", 2379), '"http://m1.etcd.test:2379" is insecure'),
    )
    (warn,) = cap.msgs("failed to validate discovered endpoints")
    assert warn["level"] == "warn" and warn["endpoints"] == []
    assert warn["error"] == '"http://m1.etcd.test:2379" is insecure'
    (fallback,) = cap.msgs(
        "no discovered SRV endpoint survived validation; falling back to --endpoints"
    )
    assert fallback["level"] == "warn"
    assert fallback["reasons"] == ['"http://m1.etcd.test:2379" is insecure']
    assert fallback["endpoints"] == ["127.0.0.1:2379"]


def test_http_records_kept_with_insecure_discovery(dnsmasq: Dnsmasq) -> None:
    dnsmasq.restart(srv=[SrvHost(PLAIN, "m1.etcd.test", 2379)])
    got = discover(cfg_for(dnsmasq, insecure_discovery=True), LogCapture().logger)
    assert got.endpoints == (Endpoint("m1.etcd.test", 2379),)


def test_https_kept_only_when_certificate_chains_and_matches(
    dnsmasq: Dnsmasq, ca: tuple[trustme.CA, Path], servers: Callable[..., TLSServer]
) -> None:
    the_ca, ca_file = ca
    good = servers("tls", ca=the_ca, names=("m1.etcd.test",))
    stranger = servers("tls", ca=trustme.CA(), names=("m2.etcd.test",))
    plain = servers("plain")
    wrong_name = servers("tls", ca=the_ca, names=("other.etcd.test",))
    dead = closed_port()
    dnsmasq.restart(
        srv=[
            SrvHost(SSL, "m1.etcd.test", good.port, 1),
            SrvHost(SSL, "m2.etcd.test", stranger.port, 2),
            SrvHost(SSL, "m3.etcd.test", plain.port, 3),
            SrvHost(SSL, "m4.etcd.test", wrong_name.port, 4),
            SrvHost(SSL, "m5.etcd.test", dead, 5),
            SrvHost(SSL, "m6.etcd.test", good.port, 6),  # no A record
        ],
        hosts={f"m{i}.etcd.test": ["127.0.0.1"] for i in range(1, 6)},
    )
    cap = LogCapture()
    got = discover(cfg_for(dnsmasq, trusted_ca_file=str(ca_file)), cap.logger)
    assert got.endpoints == (Endpoint("m1.etcd.test", good.port, 1, 0, True),)
    assert good.handshakes == 1
    reasons = {ep.host: reason for ep, reason in got.rejected}
    assert (
        "certificate verify failed: unable to get local issuer certificate"
        in reasons["m2.etcd.test"]
    )
    assert "failed TLS validation (tls handshake with 127.0.0.1:" in reasons["m3.etcd.test"]
    assert "certificate verify failed: Hostname mismatch" in reasons["m4.etcd.test"]
    assert reasons["m5.etcd.test"] == (
        f'"https://m5.etcd.test:{dead}" failed to dial '
        f"(dial tcp 127.0.0.1:{dead}: connect: connection refused)"
    )
    assert reasons["m6.etcd.test"].startswith(
        f'"https://m6.etcd.test:{good.port}" failed to dial (lookup m6.etcd.test on '
    )
    assert [line["msg"] for line in cap.lines if line["level"] == "info"] == [
        "discovered cluster from SRV",
        "validating discovered SRV endpoints",
    ]
    dropped = cap.msgs("dropped discovered SRV endpoint")
    assert [(d["endpoint"], d["priority"]) for d in dropped] == [
        (f"https://m{i}.etcd.test:{p}", i)
        for i, p in [
            (2, stranger.port),
            (3, plain.port),
            (4, wrong_name.port),
            (5, dead),
            (6, good.port),
        ]
    ]
    (summary,) = cap.msgs("failed to validate discovered endpoints")
    assert summary["endpoints"] == [f"https://m1.etcd.test:{good.port}"]
    assert summary["error"] == ",".join(reason for _, reason in got.rejected)
    assert not cap.msgs(
        "no discovered SRV endpoint survived validation; falling back to --endpoints"
    )


def test_all_https_valid_logs_using_validated(
    dnsmasq: Dnsmasq, ca: tuple[trustme.CA, Path], servers: Callable[..., TLSServer]
) -> None:
    the_ca, ca_file = ca
    a = servers("tls", ca=the_ca, names=("m1.etcd.test",))
    b = servers("tls", ca=the_ca, names=("m2.etcd.test",))
    dnsmasq.restart(
        srv=[SrvHost(SSL, "m1.etcd.test", a.port), SrvHost(SSL, "m2.etcd.test", b.port)],
        hosts={"m1.etcd.test": ["127.0.0.1"], "m2.etcd.test": ["127.0.0.1"]},
    )
    cap = LogCapture()
    got = discover(cfg_for(dnsmasq, trusted_ca_file=str(ca_file)), cap.logger)
    assert len(got.endpoints) == 2 and got.rejected == ()
    (line,) = cap.msgs("using validated discovered SRV endpoints")
    assert line["endpoints"] == [
        f"https://m1.etcd.test:{a.port}",
        f"https://m2.etcd.test:{b.port}",
    ]
    assert not cap.msgs("failed to validate discovered endpoints")


def test_server_requiring_a_client_certificate_passes(
    dnsmasq: Dnsmasq, ca: tuple[trustme.CA, Path], servers: Callable[..., TLSServer]
) -> None:
    # etcd with --client-cert-auth: the gateway has no client certificate (it relays the
    # client's own TLS), yet the server was authenticated before it asked for one.
    the_ca, ca_file = ca
    tls13 = servers("tls", ca=the_ca, names=("m1.etcd.test",), client_ca=the_ca)
    tls12 = servers("tls", ca=the_ca, names=("m2.etcd.test",), client_ca=the_ca, max_tls12=True)
    dnsmasq.restart(
        srv=[SrvHost(SSL, "m1.etcd.test", tls13.port), SrvHost(SSL, "m2.etcd.test", tls12.port)],
        hosts={"m1.etcd.test": ["127.0.0.1"], "m2.etcd.test": ["127.0.0.1"]},
    )
    got = discover(cfg_for(dnsmasq, trusted_ca_file=str(ca_file)), LogCapture().logger)
    assert [e.host for e in got.endpoints] == ["m1.etcd.test", "m2.etcd.test"], got.rejected


def test_client_certificate_alert_without_server_certificate_is_dropped(
    dnsmasq: Dnsmasq, ca: tuple[trustme.CA, Path], servers: Callable[..., TLSServer]
) -> None:
    _, ca_file = ca
    impostor = servers("alert")
    dnsmasq.restart(
        srv=[SrvHost(SSL, "m1.etcd.test", impostor.port)], hosts={"m1.etcd.test": ["127.0.0.1"]}
    )
    got = discover(cfg_for(dnsmasq, trusted_ca_file=str(ca_file)), LogCapture().logger)
    assert got.endpoints == ()
    assert "bad certificate" in got.rejected[0][1]


def test_system_trust_store_when_no_ca_file(
    dnsmasq: Dnsmasq, ca: tuple[trustme.CA, Path], servers: Callable[..., TLSServer]
) -> None:
    the_ca, _ = ca
    srv = servers("tls", ca=the_ca, names=("m1.etcd.test",))
    dnsmasq.restart(
        srv=[SrvHost(SSL, "m1.etcd.test", srv.port)], hosts={"m1.etcd.test": ["127.0.0.1"]}
    )
    got = discover(cfg_for(dnsmasq), LogCapture().logger)
    assert got.endpoints == ()
    assert "certificate verify failed" in got.rejected[0][1]


def test_handshakes_time_out_in_parallel(
    dnsmasq: Dnsmasq, ca: tuple[trustme.CA, Path], servers: Callable[..., TLSServer]
) -> None:
    _, ca_file = ca
    silent = [servers("silent") for _ in range(6)]
    dnsmasq.restart(
        srv=[SrvHost(SSL, "m1.etcd.test", s.port) for s in silent],
        hosts={"m1.etcd.test": ["127.0.0.1"]},
    )
    t0 = time.monotonic()
    got = discover(
        cfg_for(dnsmasq, trusted_ca_file=str(ca_file)), LogCapture().logger, handshake_timeout=1.0
    )
    # In parallel: about 1 s (plus DNS); one after the other: 6 s. Half-way-ish, with 3 s
    # of room for a loaded machine.
    assert time.monotonic() - t0 < 4.0, "one timeout for all, not one per target"
    assert len(got.rejected) == 6, got.rejected
    assert got.endpoints == ()
    assert all(r.endswith(": i/o timeout)") for _, r in got.rejected), got.rejected


def test_unreadable_ca_stops_discovery(dnsmasq: Dnsmasq, tmp_path: Path) -> None:
    dnsmasq.restart(srv=[SrvHost(SSL, "m1.etcd.test", 2379)])
    with pytest.raises(ConfigError, match="failed to load trusted CA file"):
        discover(cfg_for(dnsmasq, trusted_ca_file=str(tmp_path / "x.pem")), LogCapture().logger)


def test_validates_a_real_tls_etcd_cluster(dnsmasq: Dnsmasq, etcd_tls_cluster: Any) -> None:
    cluster = etcd_tls_cluster
    dnsmasq.restart(
        srv=[
            SrvHost(SSL, name, m.client_port)
            for name, m in zip(cluster.server_names, cluster.members, strict=True)
        ],
        hosts={name: ["127.0.0.1"] for name in cluster.server_names},
    )
    cap = LogCapture()
    got = discover(cfg_for(dnsmasq, trusted_ca_file=str(cluster.ca_file)), cap.logger)
    assert [(e.host, e.port) for e in got.endpoints] == [
        (name, m.client_port) for name, m in zip(cluster.server_names, cluster.members, strict=True)
    ], got.rejected
    assert cap.msgs("using validated discovered SRV endpoints")


# --- refresh ----------------------------------------------------------------------------------


def refresh_cfg(dnsmasq: Dnsmasq, **kw: Any) -> Config:
    kw.setdefault("insecure_discovery", True)
    kw.setdefault("discovery_refresh_min", 0.2)
    kw.setdefault("discovery_refresh_max", 1.0)
    return cfg_for(dnsmasq, **kw)


def test_refresh_follows_record_changes(dnsmasq: Dnsmasq) -> None:
    dnsmasq.restart(srv=[SrvHost(SSL, "m1.etcd.test", 2379), SrvHost(SSL, "m2.etcd.test", 2379)])
    cfg = refresh_cfg(dnsmasq)
    cap = LogCapture()
    initial = discover(cfg, cap.logger)
    changes: list[tuple[Endpoint, ...]] = []
    r = Refresher(cfg, cap.logger, initial, changes.append, lookup_timeout=0.5)

    async def scenario() -> None:
        await until(lambda: r.refreshes >= 1, "a first refresh")
        assert changes == []  # same records: no change reported
        await asyncio.to_thread(
            dnsmasq.restart,
            srv=[SrvHost(SSL, "m2.etcd.test", 2379), SrvHost(SSL, "m3.etcd.test", 2379, 0, 9)],
        )
        await until(lambda: bool(changes), "on_change")

    run_refresher(r, scenario)
    want = (
        Endpoint("m3.etcd.test", 2379, 0, 9, True),
        Endpoint("m2.etcd.test", 2379, 0, 0, True),
    )
    assert changes == [want]
    assert r.endpoints == want
    (line,) = cap.msgs("SRV endpoints changed")
    assert line["added"] == ["https://m3.etcd.test:2379"]
    assert line["removed"] == ["https://m1.etcd.test:2379"]


def test_refresh_keeps_last_good_set_when_dns_fails(dnsmasq: Dnsmasq) -> None:
    dnsmasq.restart(srv=[SrvHost(SSL, "m1.etcd.test", 2379)])
    cfg = refresh_cfg(dnsmasq)
    cap = LogCapture()
    initial = discover(cfg, cap.logger)
    changes: list[tuple[Endpoint, ...]] = []
    r = Refresher(cfg, cap.logger, initial, changes.append, lookup_timeout=0.3)

    async def scenario() -> None:
        await asyncio.to_thread(dnsmasq.stop)
        await until(
            lambda: bool(cap.msgs("SRV refresh failed; keeping the last good endpoints")),
            "a refresh failure warning",
        )
        # An authoritative "no such records" is kept over as well: DNS must not empty us.
        await asyncio.to_thread(dnsmasq.restart, srv=[])
        n = len(cap.msgs("SRV refresh failed; keeping the last good endpoints"))
        await until(
            lambda: (
                len(cap.msgs("SRV refresh failed; keeping the last good endpoints")) > n
                and "no such host" in cap.lines[-1].get("error", "")
            ),
            "an empty-answer warning",
        )
        await asyncio.to_thread(dnsmasq.restart, srv=[SrvHost(SSL, "m9.etcd.test", 2379)])
        await until(lambda: bool(changes), "recovery after DNS is back")

    run_refresher(r, scenario)
    warn = cap.msgs("SRV refresh failed; keeping the last good endpoints")[0]
    assert warn["level"] == "warn"
    assert warn["endpoints"] == ["https://m1.etcd.test:2379"]
    assert "i/o timeout" in warn["error"] or "server misbehaving" in warn["error"]
    assert changes == [(Endpoint("m9.etcd.test", 2379, secure=True),)]


def test_refresh_now_refreshes_immediately(dnsmasq: Dnsmasq) -> None:
    dnsmasq.restart(srv=[SrvHost(SSL, "m1.etcd.test", 2379)])
    # A long TTL window: only refresh_now() can make the change visible within the test.
    cfg = refresh_cfg(dnsmasq, discovery_refresh_min=300.0, discovery_refresh_max=300.0)
    cap = LogCapture()
    r = Refresher(cfg, cap.logger, discover(cfg, cap.logger), lambda eps: None, lookup_timeout=1)

    async def scenario() -> None:
        await asyncio.to_thread(dnsmasq.restart, srv=[SrvHost(SSL, "m2.etcd.test", 2379)])
        await asyncio.sleep(0.3)
        assert r.refreshes == 0
        # Without refresh_now() the next refresh is 300 s away: 10 s (one 1 s lookup plus
        # a loaded machine's delays) tells the two apart. (It was 5 s here and 2.5 s below.)
        r.refresh_now()
        await until(lambda: r.refreshes == 1, "the forced refresh", timeout=10)

    run_refresher(r, scenario)
    assert r.endpoints == (Endpoint("m2.etcd.test", 2379, secure=True),)


def test_refresh_drops_self_pointing_endpoints(dnsmasq: Dnsmasq) -> None:
    dnsmasq.restart(srv=[SrvHost(SSL, "m1.etcd.test", 2379)])
    cfg = refresh_cfg(dnsmasq)
    cap = LogCapture()
    changes: list[tuple[Endpoint, ...]] = []

    def self_check(ep: Endpoint) -> str | None:
        return "points back at the gateway" if ep.port == 23790 else None

    r = Refresher(cfg, cap.logger, discover(cfg, cap.logger), changes.append, self_check=self_check)

    async def scenario() -> None:
        await asyncio.to_thread(
            dnsmasq.restart,
            srv=[SrvHost(SSL, "m1.etcd.test", 2379), SrvHost(SSL, "gw.etcd.test", 23790)],
        )
        await until(lambda: bool(cap.msgs("dropped discovered SRV endpoint")), "the drop")
        await until(lambda: r.refreshes >= 3, "more refreshes")

    run_refresher(r, scenario)
    assert changes == []  # m1 alone, as before
    (drop,) = cap.msgs("dropped discovered SRV endpoint")  # once, not at every refresh
    assert drop["endpoint"] == "https://gw.etcd.test:23790"
    assert drop["reason"] == "points back at the gateway"


def test_refresh_validates_new_https_records(
    dnsmasq: Dnsmasq, ca: tuple[trustme.CA, Path], servers: Callable[..., TLSServer]
) -> None:
    the_ca, ca_file = ca
    m1 = servers("tls", ca=the_ca, names=("m1.etcd.test",))
    m2 = servers("tls", ca=the_ca, names=("m2.etcd.test",))
    bad = servers("tls", ca=trustme.CA(), names=("m3.etcd.test",))
    hosts = {f"m{i}.etcd.test": ["127.0.0.1"] for i in (1, 2, 3)}
    dnsmasq.restart(srv=[SrvHost(SSL, "m1.etcd.test", m1.port)], hosts=hosts)
    cfg = refresh_cfg(dnsmasq, insecure_discovery=False, trusted_ca_file=str(ca_file))
    cap = LogCapture()
    changes: list[tuple[Endpoint, ...]] = []
    r = Refresher(cfg, cap.logger, discover(cfg, cap.logger), changes.append)

    async def scenario() -> None:
        await asyncio.to_thread(
            dnsmasq.restart,
            srv=[
                SrvHost(SSL, "m1.etcd.test", m1.port),
                SrvHost(SSL, "m2.etcd.test", m2.port),
                SrvHost(SSL, "m3.etcd.test", bad.port),
                SrvHost(PLAIN, "m4.etcd.test", 2379),
            ],
        )
        await until(lambda: bool(changes), "on_change")

    run_refresher(r, scenario)
    assert [e.host for e in changes[0]] == ["m1.etcd.test", "m2.etcd.test"]
    assert m1.handshakes == 1, "a known endpoint is not handshaken again at each refresh"
    assert m2.handshakes == 1
    dropped = {d["endpoint"]: d["reason"] for d in cap.msgs("dropped discovered SRV endpoint")}
    assert "certificate verify failed" in dropped[f"https://m3.etcd.test:{bad.port}"]
    assert dropped["http://m4.etcd.test:2379"] == '"http://m4.etcd.test:2379" is insecure'


def test_refresher_from_the_endpoints_fallback_adopts_discovered_set(dnsmasq: Dnsmasq) -> None:
    # Start-up found nothing usable (Go's fall-back to --endpoints); once DNS has records,
    # the refresher hands them over.
    cfg = refresh_cfg(dnsmasq)
    changes: list[tuple[Endpoint, ...]] = []
    r = Refresher(cfg, LogCapture().logger, Discovered((), 0.0), changes.append)

    async def scenario() -> None:
        await asyncio.to_thread(dnsmasq.restart, srv=[SrvHost(PLAIN, "m1.etcd.test", 2379)])
        await until(lambda: bool(changes), "on_change")

    run_refresher(r, scenario)
    assert changes == [(Endpoint("m1.etcd.test", 2379),)]
