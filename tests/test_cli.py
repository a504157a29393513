"""cli.py: flags and defaults as `etcd gateway start`, start-up errors, config file, man page."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from _gateway import GatewayProc, TagServer, engine_env, free_tcp_port
from etcdgw import cli
from etcdgw.config import Endpoint, Listen

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "etcdgw", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=engine_env("cython" if not os.environ.get("ETCDGW_NO_EXTENSIONS") else "python"),
        stdin=subprocess.DEVNULL,
        check=False,
    )


def test_defaults_match_etcd_gateway() -> None:
    cfg, raw = cli.parse_start(["start"])
    assert cfg.listen == (Listen("127.0.0.1", 23790),)
    assert raw == ["127.0.0.1:2379"]
    assert cfg.retry_delay == 60.0
    assert cfg.dial_timeout == 5.0
    assert (cfg.discovery_srv, cfg.discovery_srv_name, cfg.trusted_ca_file) == ("", "", "")
    assert cfg.insecure_discovery is False


def test_flags_before_and_after_start_and_append() -> None:
    cfg, raw = cli.parse_start(
        ["--endpoints=a:1,b:2", "--retry-delay", "1.5s", "start", "--endpoints", "c:3"]
    )
    assert raw == ["a:1", "b:2", "c:3"]
    assert cfg.retry_delay == 1.5
    cfg, _ = cli.parse_start(["--insecure-discovery", "start"])
    assert cfg.insecure_discovery is True
    cfg, _ = cli.parse_start(["start", "--insecure-discovery=false"])
    assert cfg.insecure_discovery is False
    cfg, _ = cli.parse_start(["start", "--listen-addr=[::1]:1", "--listen-addr=unix:///x"])
    assert cfg.listen == (Listen("::1", 1), Listen(path="/x"))


def test_endpoints_csv_quoting_and_empty() -> None:
    assert cli.split_endpoints(['"a:1",b:2']) == ["a:1", "b:2"]
    assert cli.split_endpoints([""]) == []
    assert cli.split_endpoints(None) == ["127.0.0.1:2379"]


@pytest.mark.parametrize(
    ("args", "stream", "text"),
    [
        (["start", "--foo"], "stderr", "Error: unknown flag: --foo"),
        (["start", "--insecure-skip-tls-verify"], "stderr", "unknown flag"),
        (["start", "--end=h:1"], "stderr", "Error: unknown flag: --end"),
        (
            ["start", "--retry-delay=123"],
            "stderr",
            'Error: invalid argument "123" for "--retry-delay" flag: '
            'time: missing unit in duration "123"',
        ),
        (["start", "--retry-delay=-1s"], "stderr", "must not be negative"),
        (["start", "--dial-timeout=0"], "stderr", '"--dial-timeout" flag: must be positive'),
        (["start", "--endpoints=infra0.example.com"], "stdout", 'error parsing endpoint "infra0'),
        (["start", "--endpoints=h:0"], "stdout", "port 0 out of range 1-65535"),
        (["start", "--endpoints=127.0.0.1:70000"], "stdout", "port 70000 out of range"),
        (["start", "--endpoints=https://127.0.0.1"], "stdout", 'error parsing endpoint "https'),
        (["start", "--endpoints="], "stdout", "no endpoints found"),
        (
            ["start", "--endpoints=no-such-host.invalid:2379"],
            "stdout",
            "failed to resolve endpoint host: no-such-host.invalid",
        ),
        (
            ["start", "--endpoints=localhost:23790"],
            "stdout",
            "should not resolve to the gateway listen addr (127.0.0.1:23790)",
        ),
        (
            ["start", "--listen-addr=0.0.0.0:23795", "--endpoints=127.0.0.1:23795"],
            "stdout",
            "should not resolve to the gateway listen addr (0.0.0.0:23795)",
        ),
        (["start", "--listen-addr=127.0.0.1"], "stdout", "failed to validate listen address"),
        (["start", "--config-file=/nonexistent.yaml"], "stderr", "cannot read config file"),
        (["start", "--health-rise=0"], "stderr", "must be >= 1"),
        (["start", "--listen-unix-mode=999"], "stderr", "octal mode"),
    ],
)
def test_startup_errors(args: list[str], stream: str, text: str) -> None:
    r = run(*args)
    out = r.stdout if stream == "stdout" else r.stderr
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert text in out, (r.stdout, r.stderr)
    assert "Traceback" not in r.stdout + r.stderr


def test_bind_conflict_message() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        r = run("start", "--endpoints=127.0.0.1:1", f"--listen-addr=127.0.0.1:{port}")
    assert r.returncode == 1
    assert f"listen tcp 127.0.0.1:{port}: bind: address already in use" in r.stderr
    assert "Traceback" not in r.stderr


def test_unix_listen_path_not_writable(tmp_path: Path) -> None:
    r = run("start", "--endpoints=127.0.0.1:1", "--listen-addr=unix:///proc/nope/gw.sock")
    assert r.returncode == 1 and "listen unix /proc/nope/gw.sock: bind:" in r.stderr
    assert "Traceback" not in r.stderr


def test_version_names_engine() -> None:
    r = run("--version")
    assert r.returncode == 0
    engine = "python" if os.environ.get("ETCDGW_NO_EXTENSIONS") else "cython"
    assert r.stdout.startswith("etcdgw ") and f"relay engine: {engine}" in r.stdout
    assert run("version").stdout == r.stdout


def test_config_file_values_and_cli_wins(tmp_path: Path) -> None:
    conf = tmp_path / "gw.yaml"
    conf.write_text(
        "endpoints: [a:1, b:2]\nretry-delay: 2s\ndial-timeout: 1s\ninsecure-discovery: true\n"
    )
    cfg, raw = cli.parse_start(["start", f"--config-file={conf}", "--retry-delay=3s"])
    assert raw == ["a:1", "b:2"]
    assert (cfg.retry_delay, cfg.dial_timeout, cfg.insecure_discovery) == (3.0, 1.0, True)
    conf.write_text("no-such-flag: 1\n")
    r = run("start", f"--config-file={conf}")
    assert r.returncode == 1 and "unknown key 'no-such-flag'" in r.stderr
    conf.write_text("endpoints: [a:1\n")
    r = run("start", f"--config-file={conf}")
    assert r.returncode == 1 and "invalid config file" in r.stderr


def test_sighup_reload_adds_and_removes_endpoints(relay_impl: str, tmp_path: Path) -> None:
    conf = tmp_path / "gw.yaml"
    port = free_tcp_port()
    with TagServer("one") as one, TagServer("two") as two:
        conf.write_text(f"endpoints: [{one.addr}]\n")
        g = GatewayProc(
            ["start", f"--config-file={conf}", f"--listen-addr=127.0.0.1:{port}"], impl=relay_impl
        )
        try:
            g.wait_ready()
            live = socket.create_connection(("127.0.0.1", port), timeout=5)
            assert live.recv(4) == b"one\n"
            conf.write_text(f"endpoints: [{two.addr}]\n")
            g.proc.send_signal(1)  # SIGHUP
            g.wait_log("reloaded configuration", endpoints=[two.addr])
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                assert s.recv(4) == b"two\n"
            # The connection to the removed endpoint is untouched.
            live.sendall(b"still")
            assert live.recv(5) == b"still"
            live.close()
            conf.write_text("endpoints: [broken\n")
            g.proc.send_signal(1)
            g.wait_log("reload failed; keeping the running configuration")
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                assert s.recv(4) == b"two\n"
        finally:
            assert g.stop() == 0


def test_man_page_is_up_to_date() -> None:
    """man/etcdgw.1 is generated from get_parser() (`make man`); every flag appears in it."""
    page = (ROOT / "man" / "etcdgw.1").read_text()
    for action in [*cli.get_parser()._actions, *cli._start_parser()._actions]:
        for opt in action.option_strings:
            if opt.startswith("--") and opt != "--help":
                assert opt.replace("-", "\\-") in page, opt
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "man.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr


def test_endpoint_secure_flag_from_scheme() -> None:
    from etcdgw.config import parse_endpoint

    assert parse_endpoint("https://h:1") == Endpoint("h", 1, secure=True)
