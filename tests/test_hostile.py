"""Issue 11: etcdgw against a hostile operator and hostile peers, one test per symptom.

Real parts throughout: gateway processes, real sockets, a real dnsmasq for SRV records, a
NOTIFY_SOCKET the test owns, and hostile HTTP members (the peers under test) on loopback.
Each test names the symptom of issue 11 it proves gone. Figures marked `RELIABILITY` are
copied into RELIABILITY.md ("Hostile operator").
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from _dns import Dnsmasq, SrvHost
from _gateway import GatewayProc, TagServer, engine_env, error_lines, free_tcp_port, wait_for

IMPL = "python" if os.environ.get("ETCDGW_NO_EXTENSIONS") else "cython"
DOMAIN = "etcd.test"

# An alias bomb under endpoints: 8 levels, each a list of 9 aliases of the level above
# (~700 bytes; 9**8 = 43 million strings once expanded).
ALIAS_BOMB_CONFIG = (
    'endpoints:\n  - &a ["127.0.0.1:1","127.0.0.1:1","127.0.0.1:1","127.0.0.1:1","127.0.0.1:1",'
    '"127.0.0.1:1","127.0.0.1:1","127.0.0.1:1","127.0.0.1:1"]\n'
    + "".join(f"  - &{chr(98 + i)} [{','.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8))
)


def run_start(
    *args: str, timeout: float = 30, env: dict[str, str] | None = None
) -> tuple[int, str, float]:
    """`etcdgw start ARGS` to completion: (exit code, stdout+stderr, seconds)."""
    full = engine_env(IMPL)
    full.update(env or {})
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "etcdgw", "start", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    return r.returncode, r.stdout + r.stderr, time.monotonic() - t0


def assert_one_line(code: int, text: str, want: str) -> None:
    assert "Traceback" not in text, text
    assert code == 1, text
    lines = error_lines(text)
    assert len(lines) == 1 and want in lines[0], lines


def taken_port() -> tuple[socket.socket, int]:
    s = socket.create_server(("127.0.0.1", 0))
    return s, int(s.getsockname()[1])


def http_get(port: int, path: str = "/health", timeout: float = 5.0) -> tuple[int, float]:
    """(status, seconds) of one GET on the metrics port; status 0 when it failed."""
    t0 = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(4096):
                data += chunk
    except OSError:
        return 0, time.monotonic() - t0
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0
    return status, time.monotonic() - t0


def relay_once(port: int, timeout: float = 5.0) -> tuple[bytes, float]:
    """(tag line, seconds) of one connection through the gateway."""
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        tag = s.recv(64)
    return tag, time.monotonic() - t0


class NotifySocket:
    """A NOTIFY_SOCKET the test owns: read (collect messages) or never read (stalled)."""

    def __init__(self, path: Path, *, read: bool = True) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if read:
            self.sock.settimeout(0.1)
            self._thread = threading.Thread(target=self._read, daemon=True)
            self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue
            except OSError:
                return

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[Callable[..., NotifySocket]]:
    made: list[NotifySocket] = []

    def make(read: bool = True) -> NotifySocket:
        n = NotifySocket(tmp_path / f"notify{len(made)}.sock", read=read)
        made.append(n)
        return n

    yield make
    for n in made:
        n.close()


# --- symptom 1: the config file is read as the operator wrote it ----------------------------


@pytest.mark.parametrize(("written", "want"), [("0660", 0o660), ("0600", 0o600), ("660", 0o660)])
def test_yaml_unix_mode_is_what_was_written(tmp_path: Path, written: str, want: int) -> None:
    """Symptom 1 (security): `listen-unix-mode: 0660` unquoted gave the socket mode 0432."""
    sock = tmp_path / "gw.sock"
    conf = tmp_path / "gw.yaml"
    conf.write_text(f"listen-unix-mode: {written}\nlisten-addr: unix://{sock}\nmetrics-addr:\n")
    with TagServer("one") as one:
        g = GatewayProc(["start", f"--config-file={conf}", f"--endpoints={one.addr}"], IMPL)
        try:
            g.wait_ready()
            assert stat.S_IMODE(os.stat(sock).st_mode) == want
            # `metrics-addr:` with no value is "unset": no metrics server, no "None".
            assert "serving metrics" not in g.messages()
            assert not any("None" in line for line in g.lines), g.lines
        finally:
            assert g.stop() == 0


def test_yaml_world_writable_mode_warns(tmp_path: Path) -> None:
    sock = tmp_path / "gw.sock"
    conf = tmp_path / "gw.yaml"
    conf.write_text(f"listen-unix-mode: 0777\nlisten-addr: [unix://{sock}]\n")
    with TagServer("one") as one:
        g = GatewayProc(["start", f"--config-file={conf}", f"--endpoints={one.addr}"], IMPL)
        try:
            g.wait_ready()
            assert stat.S_IMODE(os.stat(sock).st_mode) == 0o777
            warning = "listen-unix-mode lets every local user connect to the unix socket"
            assert g.wait_log(warning + ", and so to etcd")["mode"] == "0777"
        finally:
            assert g.stop() == 0


@pytest.mark.parametrize(
    ("conf", "want"),
    [
        ("listen-unix-mode: 0o777\n", 'listen-unix-mode: "0o777": expected an octal mode'),
        ("listen-unix-mode: 1777\n", "at most 0777"),
        ("retry-delay: 1:30\n", 'retry-delay: "1:30": time: '),
        ("insecure-discovery: yes\n", 'insecure-discovery: "yes": strconv.ParseBool'),
        ("endpoints: [[a:1]]\n", "endpoints: expected a list of values, not nested"),
        ("dial-timeout: {a: 1}\n", "dial-timeout: expected a single value, not a mapping"),
        ("health-rise: [1]\n", "health-rise: expected a single value, not a list"),
        ("dial-timeout: 1s\ndial-timeout: 2s\n", "duplicate key 'dial-timeout'"),
        ("config-file: x\n", "unknown key 'config-file'"),
        ("- a\n", "expected a mapping"),
        (ALIAS_BOMB_CONFIG, "YAML aliases (*name) are not supported"),
    ],
    ids=lambda v: v.split("\n")[0][:30] if isinstance(v, str) else None,
)
def test_config_file_refusals_are_one_line(tmp_path: Path, conf: str, want: str) -> None:
    """Symptoms 1, 2: every bad value or shape is one line naming the file and key, exit 1."""
    path = tmp_path / "gw.yaml"
    path.write_text(conf)
    code, text, took = run_start(f"--config-file={path}", "--endpoints=127.0.0.1:1")
    assert_one_line(code, text, f"invalid config file {path}: ")
    assert want in text, text
    assert took < 5, took


def test_empty_discovery_srv_is_unset(tmp_path: Path) -> None:
    """Symptom 1: `discovery-srv:` looked up `_etcd-client._tcp.None`; now it is unset."""
    path = tmp_path / "gw.yaml"
    path.write_text("discovery-srv:\nendpoints: [127.0.0.1:1]\n")
    s, port = taken_port()
    with s:
        code, text, _ = run_start(f"--config-file={path}", f"--listen-addr=127.0.0.1:{port}")
    assert_one_line(code, text, f"listen tcp 127.0.0.1:{port}: bind:")
    assert "None" not in text and "_etcd-client" not in text


# --- symptom 2: an alias bomb and a huge file cost milliseconds, not gigabytes ----------------


def test_alias_bomb_and_huge_file_refused_fast(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(ALIAS_BOMB_CONFIG)
    assert len(ALIAS_BOMB_CONFIG) < 800
    code, text, took = run_start(f"--config-file={bomb}")
    assert_one_line(code, text, "YAML aliases (*name) are not supported")
    huge = tmp_path / "huge.yaml"
    huge.write_text("endpoints:\n" + "  - 127.0.0.1:2379\n" * 300_000)  # 5.4 MB
    code2, text2, took2 = run_start(f"--config-file={huge}")
    assert_one_line(code2, text2, "larger than 1048576 bytes")
    print(f"RELIABILITY alias-bomb start: exit={code} {took:.2f}s; 5 MB file: {took2:.2f}s")
    assert took < 5 and took2 < 5


def test_alias_bomb_reload_keeps_serving(relay_impl: str, tmp_path: Path) -> None:
    """Symptom 2 on reload: the pure engine stalled >25 s and grew to GBs; now one line."""
    conf = tmp_path / "gw.yaml"
    port = free_tcp_port()
    with TagServer("one") as one:
        conf.write_text(f"endpoints: [{one.addr}]\n")
        g = GatewayProc(
            ["start", f"--config-file={conf}", f"--listen-addr=127.0.0.1:{port}"], relay_impl
        )
        try:
            g.wait_ready()
            conf.write_text(ALIAS_BOMB_CONFIG)
            t0 = time.monotonic()
            g.proc.send_signal(signal.SIGHUP)
            rec = g.wait_log("reload failed; keeping the running configuration", timeout=5)
            took = time.monotonic() - t0
            assert "YAML aliases (*name) are not supported" in rec["error"]
            assert relay_once(port)[0] == b"one\n"
            rss = _rss_kib(g.pid)
            print(f"RELIABILITY alias-bomb reload {relay_impl}: {took:.2f}s rss={rss} KiB")
            assert rss < 200_000
        finally:
            assert g.stop() == 0


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


# --- symptom 3: a reload owns the SRV refresher ----------------------------------------------


def config_gateway(conf: Path, dnsmasq: Dnsmasq, port: int) -> GatewayProc:
    """The engine under test with a config file, asking the test's DNS server."""
    return GatewayProc(
        [
            "start",
            f"--config-file={conf}",
            f"--discovery-dns={dnsmasq.addr}",
            f"--listen-addr=127.0.0.1:{port}",
        ],
        IMPL,
    )


def _srv(*servers: TagServer) -> list[SrvHost]:
    return [SrvHost(f"_etcd-client._tcp.{DOMAIN}", "m.etcd.test", s.port) for s in servers]


HOSTS = {"m.etcd.test": ["127.0.0.1"]}


def test_reload_srv_to_static_stops_the_refresher(dnsmasq: Dnsmasq, tmp_path: Path) -> None:
    """Symptom 3: the old refresher kept running and overwrote the static endpoints."""
    conf = tmp_path / "gw.yaml"
    port = free_tcp_port()
    with TagServer("one") as one, TagServer("two") as two, TagServer("three") as three:
        dnsmasq.restart(srv=_srv(one), hosts=HOSTS)
        conf.write_text(
            f"discovery-srv: {DOMAIN}\ninsecure-discovery: true\ndiscovery-refresh-min: 200ms\n"
        )
        g = config_gateway(conf, dnsmasq, port)
        try:
            g.wait_ready()
            assert relay_once(port)[0] == b"one\n"
            conf.write_text(f"endpoints: [{two.addr}]\n")
            g.proc.send_signal(signal.SIGHUP)
            g.wait_log("reloaded configuration", endpoints=[two.addr])
            assert "reload: SRV refresh stopped" in g.messages()
            n = len(g.lines)
            dnsmasq.restart(srv=_srv(three), hosts=HOSTS)  # the old domain changes
            time.sleep(2.0)  # ten refresh-min periods
            later = [r.get("msg") for r in g.records()[n:]]
            assert "SRV endpoints changed" not in later, g.lines[n:]
            assert all(relay_once(port)[0] == b"two\n" for _ in range(3))
        finally:
            assert g.stop() == 0


def test_reload_static_to_srv_keeps_refreshing(dnsmasq: Dnsmasq, tmp_path: Path) -> None:
    """Symptom 3: a reload that adds discovery-srv discovered once and never refreshed."""
    conf = tmp_path / "gw.yaml"
    port = free_tcp_port()
    with TagServer("one") as one, TagServer("two") as two, TagServer("three") as three:
        dnsmasq.restart(srv=_srv(two), hosts=HOSTS)
        conf.write_text(f"endpoints: [{one.addr}]\n")
        g = config_gateway(conf, dnsmasq, port)
        try:
            g.wait_ready()
            conf.write_text(
                f"discovery-srv: {DOMAIN}\ninsecure-discovery: true\ndiscovery-refresh-min: 200ms\n"
            )
            g.proc.send_signal(signal.SIGHUP)
            g.wait_log("reloaded configuration", endpoints=[f"m.etcd.test:{two.port}"])
            assert relay_once(port)[0] == b"two\n"
            dnsmasq.restart(srv=_srv(three), hosts=HOSTS)
            g.wait_log("SRV endpoints changed", timeout=10)
            assert wait_for(lambda: relay_once(port)[0] == b"three\n", timeout=5)
        finally:
            assert g.stop() == 0


# --- symptom 4: nothing that can wait runs on the event loop ---------------------------------


def test_reload_with_dead_dns_keeps_relaying(
    tmp_path: Path, notify_socket: Callable[..., NotifySocket]
) -> None:
    """Symptom 4: a reload resolving names through a DNS server that never answers blocked
    the loop ~11 s (pure engine: no relaying, no /health). Now it runs in a thread with a
    deadline; the failure is one line, the running configuration stays, RELOADING=1 is
    followed by READY=1, and SIGHUPs meanwhile coalesce into one more reload after it."""
    dead = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # bound, never answers
    dead.bind(("127.0.0.1", 0))
    conf = tmp_path / "gw.yaml"
    port, mport = free_tcp_port(), free_tcp_port()
    notify = notify_socket()
    with dead, TagServer("one") as one, TagServer("two") as two:
        conf.write_text(f"endpoints: [{one.addr}]\n")
        g = GatewayProc(
            [
                "start",
                f"--config-file={conf}",
                f"--listen-addr=127.0.0.1:{port}",
                f"--metrics-addr=127.0.0.1:{mport}",
            ],
            "python",
            env={"NOTIFY_SOCKET": notify.path},
        )
        try:
            g.wait_ready()
            conf.write_text(
                f"endpoints: [m.etcd.test:{one.port}]\n"
                f"discovery-dns: 127.0.0.1:{dead.getsockname()[1]}\n"
            )
            t0 = time.monotonic()
            g.proc.send_signal(signal.SIGHUP)
            time.sleep(0.5)  # the reload is now waiting for the dead DNS server
            worst = 0.0
            for _ in range(5):
                status, took = http_get(mport)
                assert status == 200
                tag, took2 = relay_once(port)
                assert tag == b"one\n"
                worst = max(worst, took, took2)
                g.proc.send_signal(signal.SIGHUP)  # five more: one reload after this one
                time.sleep(0.2)
            print(f"RELIABILITY dead-DNS reload (python): worst /health or relay {worst:.3f}s")
            # The regression held the loop for the whole reload (~11 s): the first probe,
            # 0.5 s in, waited out its 5 s timeout. Answered at once is ~0.01 s; the worst of
            # ten samples on a loaded machine can take a scheduling hiccup of a second.
            assert worst < 2.5
            g.wait_log("SIGHUP during a reload: one more reload after it")
            conf.write_text(f"endpoints: [{two.addr}]\n")  # what the queued reload reads
            rec = g.wait_log("reload failed; keeping the running configuration", timeout=15)
            failed_after = time.monotonic() - t0
            assert "m.etcd.test" in rec["error"] or "not done within" in rec["error"]
            g.wait_log("reloaded configuration", endpoints=[two.addr])
            assert relay_once(port)[0] == b"two\n"
            msgs = g.messages()
            assert msgs.count("SIGHUP during a reload: one more reload after it") == 1
            assert msgs.count("reload failed; keeping the running configuration") == 1
            assert msgs.count("reloaded configuration") == 1
            wait_for(lambda: len(notify.messages) == 5)
            assert [m.split("\n")[0] for m in notify.messages] == ["READY=1"] + [
                "RELOADING=1",
                "READY=1",
            ] * 2
            print(f"RELIABILITY dead-DNS reload (python): reload failed after {failed_after:.1f}s")
        finally:
            assert g.stop() == 0


def _fill(path: str) -> None:
    """Fill a datagram socket nobody reads until one more datagram would block. Each is sent
    from a fresh socket, as systemd.notify() sends: a sender's own buffer never fills first."""
    for _ in range(100_000):
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.setblocking(False)
            try:
                s.sendto(b"X_FILLER=1", path)
            except BlockingIOError:
                return
    raise AssertionError(f"{path} took 100,000 datagrams and was still not full")


def test_stalled_notify_socket_does_not_block(
    relay_impl: str, tmp_path: Path, notify_socket: Callable[..., NotifySocket]
) -> None:
    """Symptom 4: a NOTIFY_SOCKET whose reader stalls filled after ~10 datagrams and then
    the blocking send stopped the pure engine. Now messages are dropped with a warning.

    The test fills the stalled socket itself once the gateway is ready: filling it through
    reloads took more of them than a loaded machine ran in a second (SIGHUPs during a reload
    coalesce), and more datagrams still where net.unix.max_dgram_qlen is 512 (CI flake)."""
    stalled = notify_socket(read=False)
    conf = tmp_path / "gw.yaml"
    port, mport = free_tcp_port(), free_tcp_port()
    with TagServer("one") as one:
        conf.write_text(f"endpoints: [{one.addr}]\n")
        g = GatewayProc(
            [
                "start",
                f"--config-file={conf}",
                f"--listen-addr=127.0.0.1:{port}",
                f"--metrics-addr=127.0.0.1:{mport}",
            ],
            relay_impl,
            env={"NOTIFY_SOCKET": stalled.path},
        )
        try:
            g.wait_ready()
            _fill(stalled.path)
            for _ in range(20):
                g.proc.send_signal(signal.SIGHUP)
                time.sleep(0.05)
            g.wait_log("failed to notify systemd; message dropped", timeout=10)
            tag, took = relay_once(port, timeout=5)
            status, took2 = http_get(mport, timeout=5)
            assert (tag, status) == (b"one\n", 200)
            print(
                f"RELIABILITY stalled NOTIFY_SOCKET + 20 SIGHUPs ({relay_impl}): "
                f"relay {took:.3f}s, /health {took2:.3f}s, rss {_rss_kib(g.pid)} KiB"
            )
            # With the regression the loop never comes back: the 5 s timeouts above fail it.
            # Answered at once is ~0.01 s; the bound leaves a loaded machine room.
            assert max(took, took2) < 2.5
            wait_for(lambda: g.messages().count("reloaded configuration") >= 1)
        finally:
            assert g.stop() == 0


# --- symptom 6: one line, never a traceback --------------------------------------------------


LONG_LABEL = "a" * 64 + ".com"


@pytest.mark.parametrize(
    ("args", "want"),
    [
        (["--endpoints=a..b:2379"], 'error parsing endpoint "a..b:2379": invalid host name'),
        ([f"--endpoints={LONG_LABEL}:2379"], "error parsing endpoint"),
        (["--listen-addr=a..b:2379"], "failed to validate listen address: a..b:2379"),
        ([f"--listen-addr={LONG_LABEL}:1"], "failed to validate listen address"),
        (["--metrics-addr=a..b:1"], "failed to validate metrics address: a..b:1"),
    ],
)
def test_idna_errors_are_one_line(args: list[str], want: str) -> None:
    code, text, _ = run_start(*args, "--endpoints=127.0.0.1:1")
    assert_one_line(code, text, want)


def test_non_utf8_config_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_bytes(b"endpoints: [\xff\xfe:1]\n")
    code, text, _ = run_start(f"--config-file={path}")
    assert_one_line(code, text, "not UTF-8 text (byte 0xff at offset 12)")


def test_reload_of_bad_host_is_one_line_and_ready_follows(
    relay_impl: str, tmp_path: Path, notify_socket: Callable[..., NotifySocket]
) -> None:
    """Symptom 6 on reload: an asyncio traceback, and RELOADING=1 never followed by READY=1."""
    notify = notify_socket()
    conf = tmp_path / "gw.yaml"
    port = free_tcp_port()
    with TagServer("one") as one:
        conf.write_text(f"endpoints: [{one.addr}]\n")
        g = GatewayProc(
            ["start", f"--config-file={conf}", f"--listen-addr=127.0.0.1:{port}"],
            relay_impl,
            env={"NOTIFY_SOCKET": notify.path},
        )
        try:
            g.wait_ready()
            wait_for(lambda: notify.messages == ["READY=1"])
            failed = "reload failed; keeping the running configuration"
            bads = [b"endpoints: [a..b:2379]\n", f"endpoints: [{LONG_LABEL}:1]\n".encode()]
            for n, bad in enumerate([*bads, b"endpoints: [\xff]\n"], start=1):
                conf.write_bytes(bad)
                g.proc.send_signal(signal.SIGHUP)

                def reported(n: int = n) -> bool:
                    return g.messages().count(failed) == n

                def notified(n: int = n) -> bool:
                    return len(notify.messages) == 1 + 2 * n

                wait_for(reported)
                wait_for(notified)
                assert notify.messages[-2].startswith("RELOADING=1\nMONOTONIC_USEC=")
                assert notify.messages[-1] == "READY=1"
            errors = [r["error"] for r in g.records() if r.get("msg") == failed]
            assert "error parsing endpoint" in errors[0] and "error parsing endpoint" in errors[1]
            assert "not UTF-8 text" in errors[2]
            assert relay_once(port)[0] == b"one\n"
        finally:
            assert g.stop() == 0
        assert not any("Traceback" in line for line in g.lines), g.lines


# --- symptom 7: the metrics server survives slow clients ---------------------------------------


def test_health_answers_while_300_clients_trickle() -> None:
    """Symptom 7: 40 clients sending a byte every 2 s made /health fail 2 times in 3."""
    mport = free_tcp_port()
    with TagServer("one") as one:
        g = GatewayProc(
            [
                "start",
                f"--endpoints={one.addr}",
                f"--listen-addr=127.0.0.1:{free_tcp_port()}",
                f"--metrics-addr=127.0.0.1:{mport}",
            ],
            IMPL,
        )
        try:
            g.wait_ready()
            c0, t0 = _cpu_seconds(g.pid), time.monotonic()
            results = asyncio.run(_trickle_and_probe(mport, slow=300, seconds=6.0))
            cpu = (_cpu_seconds(g.pid) - c0) / (time.monotonic() - t0)
            rss = _rss_kib(g.pid)
        finally:
            assert g.stop() == 0
    ok = [t for status, t in results if status == 200]
    worst = max(t for _, t in results)
    print(
        f"RELIABILITY metrics 300 slow clients: /health ok {len(ok)}/{len(results)}, "
        f"worst {worst:.3f}s, gateway cpu {cpu:.1%} of a core, rss {rss} KiB"
    )
    # The regression: /health failed 2 probes in 3 (no answer within 3 s: status 0).
    assert len(ok) == len(results) and worst < 1.0, results


async def _trickle_and_probe(port: int, slow: int, seconds: float) -> list[tuple[int, float]]:
    stop = asyncio.Event()

    async def pause(seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)

    async def trickler(i: int) -> None:
        # A byte a second of a request head that never ends; when dropped, reconnect 1 s later.
        # Their starts are spread over a second: all in lockstep, the probe's answer queued
        # behind the test's own burst of 300 writes a second (a loaded machine: CI flake).
        await pause(i / slow)
        while not stop.is_set():
            try:
                r, w = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await pause(1.0)
                continue
            try:
                w.write(b"GET /metrics HTTP/1.1\r\n")
                while not stop.is_set() and not r.at_eof():
                    w.write(b"y")
                    await w.drain()
                    await pause(1.0)
            except OSError:
                pass
            finally:
                w.transport.abort()
            await pause(1.0)

    tasks = [asyncio.ensure_future(trickler(i)) for i in range(slow)]
    await asyncio.sleep(1.5)  # all slow clients connected and trickling
    results = []
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while loop.time() < end:
        # A probe of its own in a thread (blocking socket, 3 s timeout: status 0), timed
        # there: not a turn of this loop, which also runs the tricklers.
        results.append(
            await loop.run_in_executor(None, functools.partial(http_get, port, timeout=3))
        )
        await asyncio.sleep(0.2)
    stop.set()
    await asyncio.gather(*tasks)
    return results


# --- symptom 9: signals before "ready" ---------------------------------------------------------


@pytest.mark.parametrize(
    ("phase", "sig"),
    [
        ("srv-lookup", signal.SIGINT),
        ("srv-lookup", signal.SIGTERM),
        ("srv-lookup", signal.SIGHUP),
        ("endpoint-lookup", signal.SIGINT),
        ("endpoint-lookup", signal.SIGTERM),
    ],
)
def test_signals_before_ready(phase: str, sig: signal.Signals) -> None:
    """Symptom 9: SIGINT gave a KeyboardInterrupt traceback and SIGHUP killed the process
    while start-up waited on DNS. Now SIGINT/SIGTERM exit 0 at once, SIGHUP is deferred."""
    dead = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dead.bind(("127.0.0.1", 0))
    dns = f"--discovery-dns=127.0.0.1:{dead.getsockname()[1]}"
    port = free_tcp_port()
    args = ["start", dns, f"--listen-addr=127.0.0.1:{port}"]
    if phase == "srv-lookup":
        args += [f"--discovery-srv={DOMAIN}", "--endpoints=127.0.0.1:1"]
    else:
        args += ["--endpoints=m.etcd.test:2379"]
    with dead:
        g = GatewayProc(args, IMPL)
        try:
            g.wait_log("starting etcdgw")
            time.sleep(0.5)  # inside the lookup now
            g.proc.send_signal(sig)
            t0 = time.monotonic()
            if sig == signal.SIGHUP:
                time.sleep(0.5)
                assert g.proc.poll() is None, g.lines  # not killed
                code = g.proc.wait(20)  # start-up goes on and fails on the dead DNS
                assert code == 1
            else:
                code = g.proc.wait(5)
                took = time.monotonic() - t0
                print(f"RELIABILITY {sig.name} during {phase}: exit {code} after {took:.2f}s")
                # "At once", not when the lookup gives up: the lookup began about 0.5 s before
                # the signal and waits 5 s for the dead server (resolver.LOOKUP_TIMEOUT), so an
                # exit deferred to its end comes ~4.5 s after the signal. An exit at once is
                # interpreter teardown, ~0.1 s, longer on a loaded machine.
                assert code == 0 and took < 4
                assert g.wait_log("stopped before ready")["signal"] == sig.name
        finally:
            g.stop()
    text = "\n".join(g.lines) + g.stdout
    assert "Traceback" not in text, text
    assert len(error_lines(text)) == (1 if sig == signal.SIGHUP else 0), text


def test_sighup_during_startup_reloads_once_ready(dnsmasq: Dnsmasq, tmp_path: Path) -> None:
    """Symptom 9: SIGHUP (systemd's ExecReload) during a start-up that then succeeds is kept
    and runs as one reload once the gateway is ready. The start-up waits ~5 s for the TLS
    handshake of an https SRV target that accepts and never answers, then falls back to the
    --endpoints list."""
    silent = socket.create_server(("127.0.0.1", 0))  # the kernel accepts; nobody answers
    conf = tmp_path / "gw.yaml"
    port = free_tcp_port()
    with silent, TagServer("one") as one:
        srv = [SrvHost(f"_etcd-client-ssl._tcp.{DOMAIN}", "m.etcd.test", silent.getsockname()[1])]
        dnsmasq.restart(srv=srv, hosts=HOSTS)
        conf.write_text(f"discovery-srv: {DOMAIN}\nendpoints: [{one.addr}]\n")
        g = config_gateway(conf, dnsmasq, port)
        try:
            g.wait_log("validating discovered SRV endpoints")
            time.sleep(0.3)  # inside the handshake wait
            g.proc.send_signal(signal.SIGHUP)
            g.wait_ready(timeout=20)
            g.wait_log("SIGHUP during start-up: reloading once ready")
            g.wait_log("reloaded configuration")
            msgs = g.messages()
            ready = msgs.index("ready to proxy client requests")
            assert msgs.index("reloaded configuration") > ready
            assert relay_once(port)[0] == b"one\n"
        finally:
            assert g.stop() == 0


# --- symptom 10: hostile /health answers are cheap --------------------------------------------


async def _hostile_members(kinds: list[str], ports: list[int], done: threading.Event) -> None:
    async def handle(kind: str, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            await r.readuntil(b"\r\n\r\n")
            if kind == "chunked":  # endless 1-byte chunks, as fast as they are read
                w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                while True:
                    w.write(b"1\r\nx\r\n" * 512)
                    await w.drain()
            elif kind == "plain":  # an endless body without a length
                w.write(b"HTTP/1.1 200 OK\r\n\r\n")
                while True:
                    w.write(b"x" * 4096)
                    await w.drain()
            else:  # slow: a byte every 50 ms of a body announced as 1 MB
                w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n")
                while True:
                    w.write(b"x")
                    await w.drain()
                    await asyncio.sleep(0.05)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            w.transport.abort()

    servers = []
    for kind in kinds:
        server = await asyncio.start_server(functools.partial(handle, kind), "127.0.0.1", 0)
        servers.append(server)
        ports.append(int(server.sockets[0].getsockname()[1]))
    await asyncio.get_running_loop().run_in_executor(None, done.wait)
    for server in servers:
        server.close()


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_hostile_health_answers_are_cheap() -> None:
    """Symptom 10: six members answering /health slowly or endlessly cost ~36-41% of a core
    at --health-interval=1s (a quadratic body read). Now a bounded, linear read."""
    ports: list[int] = []
    done = threading.Event()
    kinds = ["chunked", "chunked", "plain", "plain", "slow", "slow"]
    thread = threading.Thread(
        target=lambda: asyncio.run(_hostile_members(kinds, ports, done)), daemon=True
    )
    thread.start()
    try:
        wait_for(lambda: len(ports) == 6)
        g = GatewayProc(
            [
                "start",
                "--endpoints=" + ",".join(f"127.0.0.1:{p}" for p in ports),
                f"--listen-addr=127.0.0.1:{free_tcp_port()}",
                "--health-check=etcd",
                "--health-interval=1s",
            ],
            IMPL,
        )
        try:
            g.wait_ready()
            time.sleep(2.0)
            c0, t0 = _cpu_seconds(g.pid), time.monotonic()
            time.sleep(6.0)
            share = (_cpu_seconds(g.pid) - c0) / (time.monotonic() - t0)
            rss = _rss_kib(g.pid)
            g.wait_log("endpoint unhealthy")
        finally:
            code = g.stop()
    finally:
        done.set()
        thread.join(10)
    print(f"RELIABILITY hostile /health x6 ({IMPL}): cpu {share:.1%} of a core, rss {rss} KiB")
    assert code == 0
    assert share < 0.15, share


def test_reload_refuses_health_tls_files_start_up_refuses(relay_impl: str, tmp_path: Path) -> None:
    """A reload to a --health-cert-file that start-up refuses fails as start-up does, in one
    line, and keeps the running configuration (it said `reloaded configuration` before:
    hostile review of issue 19, D2, pre-existing)."""
    conf = tmp_path / "gw.yaml"
    port = free_tcp_port()
    garbage = tmp_path / "not-a-cert.pem"
    garbage.write_text("not a certificate\n")
    with TagServer("one") as one:
        conf.write_text(f"endpoints: [{one.addr}]\nhealth-check: etcd\n")
        g = GatewayProc(
            ["start", f"--config-file={conf}", f"--listen-addr=127.0.0.1:{port}"], relay_impl
        )
        try:
            g.wait_ready()
            conf.write_text(
                f"endpoints: [{one.addr}]\nhealth-check: etcd\n"
                f"health-cert-file: {garbage}\nhealth-key-file: {garbage}\n"
            )
            g.proc.send_signal(signal.SIGHUP)
            rec = g.wait_log("reload failed; keeping the running configuration", timeout=10)
            assert rec["error"].startswith(f"failed to load --health-cert-file {garbage}: ")
            assert "reloaded configuration" not in g.messages()
            assert relay_once(port)[0] == b"one\n"
        finally:
            assert g.stop() == 0
