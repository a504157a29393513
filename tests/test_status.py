"""status.py: `etcdgw status` against a live gateway (per engine), against nothing, and the
table and unit formatting on their own."""

from __future__ import annotations

import io
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from _gateway import GatewayProc, TagServer, engine_env, free_tcp_port
from etcdgw.status import format_bytes, format_uptime, render, status_url

Start = Callable[..., GatewayProc]


def run_status(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "etcdgw", "status", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=engine_env("python"),
        stdin=subprocess.DEVNULL,
        check=False,
    )


def table(stdout: str) -> tuple[str, list[str], dict[str, list[str]]]:
    """(header line, column names, rows by endpoint split on runs of 2+ spaces)."""
    import re

    lines = stdout.splitlines()
    cols = re.split(r"\s{2,}", lines[1].strip())
    rows = {}
    for line in lines[2:]:
        cells = re.split(r"\s{2,}", line.strip(), maxsplit=len(cols) - 1)
        rows[cells[0]] = cells
    return lines[0], cols, rows


@pytest.fixture
def backends() -> Iterator[list[TagServer]]:
    servers = [TagServer("a"), TagServer("b")]
    yield servers
    for s in servers:
        s.close()


def test_status_of_a_live_gateway(
    gateway: Start, backends: list[TagServer], relay_impl: str
) -> None:
    a, b = backends
    dead = f"127.0.0.1:{free_tcp_port()}"
    port, mport = free_tcp_port(), free_tcp_port()
    gateway(
        f"--endpoints={a.addr},{dead},{b.addr}",
        f"--listen-addr=127.0.0.1:{port}",
        f"--metrics-addr=127.0.0.1:{mport}",
        "--retry-delay=10m",
    )
    held = []
    for _ in range(3):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        held.append(s)
        assert s.recv(2) in (b"a\n", b"b\n")
    try:
        r = run_status(f"--metrics-addr=127.0.0.1:{mport}")
    finally:
        for s in held:
            s.close()
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    header, cols, rows = table(r.stdout)
    assert cols == [
        "ENDPOINT",
        "STATE",
        "HEALTH",
        "ACTIVE",
        "TOTAL",
        "SENT",
        "RECEIVED",
        "FAILURES",
        "LAST ERROR",
    ]
    assert header.startswith(f"etcdgw 0.1.0 (relay engine: {relay_impl}), up ")
    assert "ready" in header and "3 active, 3 accepted, 0 refused" in header
    assert list(rows) == [a.addr, dead, b.addr]
    assert rows[a.addr][1:] == ["up", "-", "2", "2", "0 B", "4 B", "0", "-"]
    assert rows[b.addr][1:] == ["up", "-", "1", "1", "0 B", "2 B", "0", "-"]
    assert rows[dead][1:4] == ["down", "-", "0"] and rows[dead][7] == "1"
    assert rows[dead][8] == f"dial tcp {dead}: connect: connection refused"


def test_status_with_health_checks(gateway: Start, backends: list[TagServer]) -> None:
    """TagServers are not etcd: their /health answer is garbage, so both turn unhealthy."""
    a, b = backends
    port, mport = free_tcp_port(), free_tcp_port()
    g = gateway(
        f"--endpoints={a.addr},{b.addr}",
        f"--listen-addr=127.0.0.1:{port}",
        f"--metrics-addr=127.0.0.1:{mport}",
        "--health-check=etcd",
        "--health-interval=100ms",
        "--health-fall=1",
    )
    g.wait_log("endpoint unhealthy", timeout=20, address=a.addr)
    g.wait_log("endpoint unhealthy", timeout=20, address=b.addr)
    r = run_status(f"--metrics-addr=127.0.0.1:{mport}")
    assert r.returncode == 0, r.stderr
    _, _, rows = table(r.stdout)
    assert rows[a.addr][1:3] == ["up", "unhealthy"]
    assert rows[a.addr][8].startswith(f"GET http://{a.addr}/health: malformed response")


def test_status_of_nothing_is_one_line() -> None:
    port = free_tcp_port()
    r = run_status(f"--metrics-addr=127.0.0.1:{port}", "--timeout=2s")
    assert r.returncode == 1
    assert r.stdout == ""
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert r.stderr == (
        f"etcdgw status: cannot reach the gateway at http://127.0.0.1:{port}/status: "
        "connection refused (is it running with this --metrics-addr?)\n"
    )


def test_status_of_a_silent_server_times_out() -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts (backlog), never answers
        port = silent.getsockname()[1]
        r = run_status(f"--metrics-addr=127.0.0.1:{port}", "--timeout=500ms")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "timed out" in r.stderr


class _Other(BaseHTTPRequestHandler):
    """Some other HTTP service on that port."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        body = b"not found" if self.path != "/status" else b'{"status": "fine"}'
        self.send_response(404 if self.path != "/status" else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.mark.parametrize("path_ok", [False, True])
def test_status_of_something_else(monkeypatch: pytest.MonkeyPatch, path_ok: bool) -> None:
    if not path_ok:
        monkeypatch.setattr(_Other, "do_GET", _not_found)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Other)
    t = threading.Thread(target=httpd.serve_forever, args=(0.05,))
    t.start()
    try:
        r = run_status(f"--metrics-addr=127.0.0.1:{httpd.server_address[1]}")
    finally:
        httpd.shutdown()
        httpd.server_close()
        t.join(5)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    want = "not an etcdgw status document" if path_ok else "404 Not Found"
    assert want in r.stderr


def _not_found(self: BaseHTTPRequestHandler) -> None:
    self.send_error(404)


def test_status_bad_address() -> None:
    r = run_status("--metrics-addr=nonsense")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("etcdgw status: invalid --metrics-addr nonsense")


# --- pure -------------------------------------------------------------------------------------


def test_status_url() -> None:
    assert status_url("127.0.0.1:23791") == "http://127.0.0.1:23791/status"
    assert status_url(":9000") == "http://127.0.0.1:9000/status"
    assert status_url("0.0.0.0:9000") == "http://127.0.0.1:9000/status"
    assert status_url("[::]:9000") == "http://[::1]:9000/status"
    assert status_url("[::1]:9000") == "http://[::1]:9000/status"
    assert status_url("gw.example:9000") == "http://gw.example:9000/status"


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (150 * 1024, "150 KiB"),
        (5 * 1024**3 + 1, "5.0 GiB"),
        (3 * 1024**5, "3072 TiB"),
    ],
)
def test_format_bytes(n: int, text: str) -> None:
    assert format_bytes(n) == text


def test_format_uptime() -> None:
    assert [format_uptime(s) for s in (0, 59.9, 65, 7203, 3 * 86400 + 4 * 3600 + 300)] == [
        "0s",
        "59s",
        "1m5s",
        "2h0m3s",
        "3d4h5m",
    ]


def test_render_prefers_the_error_that_explains_the_state() -> None:
    doc = {
        "version": "9.9",
        "engine": "python",
        "uptime_seconds": 61,
        "ready": False,
        "health_check": "etcd",
        "connections": {"active": 0, "accepted": 2, "refused": 1},
        "bytes": {"to_endpoints": 2048, "from_endpoints": 0},
        "endpoints": [
            {
                "address": "[::1]:2379",
                "state": "up",
                "healthy": False,
                "removed": False,
                "last_error": "old dial error",
                "last_health_error": "503",
            },
            {
                "address": "h:1",
                "state": "down",
                "healthy": True,
                "removed": True,
                "last_error": "refused",
                "dial_failures": 3,
            },
        ],
    }
    out = io.StringIO()
    render(doc, out)
    header, cols, rows = table(out.getvalue())
    assert header == (
        "etcdgw 9.9 (relay engine: python), up 1m1s, NOT READY; connections: 0 active, "
        "2 accepted, 1 refused; sent 2.0 KiB, received 0 B"
    )
    assert rows["[::1]:2379"] == [
        "[::1]:2379",
        "up",
        "unhealthy",
        "0",
        "0",
        "0 B",
        "0 B",
        "0",
        "503",
    ]
    assert rows["h:1"][1:3] == ["removed", "healthy"] and rows["h:1"][7:] == ["3", "refused"]
