"""Issue 18: the operations surface against a hostile host, one test per defect.

Unix socket files in a directory another user can write (item 5), a connect flood on the
metrics port (item 11), a --config-file that is not a regular file (item 12), malformed
/status documents (item 14) and the signals that still ended the process (SIGUSR1, SIGUSR2,
SIGALRM). Real parts throughout: gateway processes, real sockets, files and signals; the
flood runs in a network namespace of its own. Figures marked `RELIABILITY` are copied into
RELIABILITY.md ("Hostile operator").
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import json
import os
import re
import resource
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _dns import Dnsmasq
from _gateway import GatewayProc, TagServer, engine_env, free_tcp_port, wait_for
from etcdgw import listeners, metrics
from etcdgw.config import Config, ConfigError, parse_listen
from etcdgw.log import Logger
from etcdgw.metrics import MetricsServer
from etcdgw.status import BadDocument, parse_document, render
from test_hostile import assert_one_line, relay_once, run_start
from test_metrics import standalone
from test_status import run_status

# hypothesis reads mypy_extensions.TypedDict while it reports a falsifying example; under
# the suite's warnings-as-errors that deprecation would turn the report into an INTERNALERROR.
pytestmark = pytest.mark.filterwarnings(
    "ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning"
)

# --- item 5: the unix socket's mode is set on our socket file, never through a link ----------


def _unix_listeners(path: Path, mode: int = 0o660) -> listeners.ListenerSet:
    cfg = Config(listen=(parse_listen(f"unix://{path}"),), listen_unix_mode=mode)
    return listeners.ListenerSet(cfg)


def _swap_after_bind(monkeypatch: pytest.MonkeyPatch, path: Path, swap: Callable[[], None]) -> None:
    """Make every bind() of `path` run `swap` right after the kernel created the file: the
    moment another user with write access to the directory can replace it."""
    real_bind = socket.socket.bind

    def bind(self: socket.socket, address: Any) -> None:  # socket.bind's _Address
        real_bind(self, address)
        if self.family == socket.AF_UNIX and address == str(path):
            swap()

    monkeypatch.setattr(socket.socket, "bind", bind)


def test_unix_socket_swapped_for_a_symlink_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Item 5 (security): bind(); chmod(path) followed a symbolic link swapped in between, so
    a root-run gateway set --listen-unix-mode on a file outside the socket's directory. Now
    the swap is detected, nothing outside is touched, start-up fails with one line."""
    sockdir, outside = tmp_path / "run", tmp_path / "etc"
    sockdir.mkdir()
    outside.mkdir()
    secret = outside / "shadow"
    secret.write_text("root:*:0:0\n")
    secret.chmod(0o600)
    path = sockdir / "etcd.sock"

    def swap() -> None:
        os.unlink(path)
        os.symlink(secret, path)

    _swap_after_bind(monkeypatch, path, swap)
    ls = _unix_listeners(path, mode=0o666)
    with pytest.raises(ConfigError) as e:
        ls.bind()
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600, "the gateway chmodded the link target"
    assert e.value.message == (
        f"listen unix {path}: socket file replaced by a symbolic link before its mode was set"
    )
    assert e.value.stream == "stderr"
    assert path.is_symlink(), "the swapped-in file is not ours to remove"
    assert ls.socks == []


@pytest.mark.parametrize("other", ["their-socket", "hardlink", "hardlinked-socket", "removed"])
def test_unix_socket_swapped_for_another_file_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, other: str
) -> None:
    """The same race with something else in its place: another user's socket (its mode must
    stay), a hard link to a file or a socket outside (the kernel lets a user hard-link what
    it may read and write), or nothing at all."""
    path = tmp_path / "etcd.sock"
    theirs = socket.socket(socket.AF_UNIX)
    outside = tmp_path / "outside"
    if other == "hardlinked-socket":
        theirs.bind(str(outside))
    else:
        outside.write_text("x")
    outside.chmod(0o600)

    def swap() -> None:
        os.unlink(path)
        if other == "their-socket":
            theirs.bind(str(tmp_path / "theirs.sock"))
            os.chown(tmp_path / "theirs.sock", 65534, 65534)
            os.chmod(tmp_path / "theirs.sock", 0o600)
            os.rename(tmp_path / "theirs.sock", path)
        elif other != "removed":
            os.link(outside, path)

    _swap_after_bind(monkeypatch, path, swap)
    with theirs, pytest.raises(ConfigError) as e:
        _unix_listeners(path, mode=0o666).bind()
    want = {
        "their-socket": "another user's socket file",
        "hardlink": "a hard link to another file",
        "hardlinked-socket": "a hard link to another file",
        "removed": None,
    }[other]
    assert e.value.message == f"listen unix {path}: socket file " + (
        f"replaced by {want} before its mode was set" if want else "removed before its mode was set"
    )
    assert stat.S_IMODE(outside.lstat().st_mode) == 0o600
    if other == "their-socket":
        assert stat.S_IMODE(path.lstat().st_mode) == 0o600  # theirs: neither chmodded nor removed
    elif other != "removed":
        assert path.lstat().st_ino == outside.lstat().st_ino  # left where it was put


def test_unix_socket_race_never_touches_a_file_outside(tmp_path: Path) -> None:
    """Item 5 as the review ran it: another thread swaps the path for a symbolic link to a
    file outside, as fast as it can, while the listeners are bound and closed again and
    again. Every start either serves on a socket file of the asked mode or refuses in one
    line; the file outside keeps its mode throughout."""
    secret = tmp_path / "secret"
    secret.write_text("x")
    secret.chmod(0o600)
    sockdir = tmp_path / "run"
    sockdir.mkdir()
    path = sockdir / "etcd.sock"
    stop = threading.Event()

    def swapper() -> None:
        link = sockdir / "link"
        while not stop.is_set():
            try:
                os.symlink(secret, link)
                os.rename(link, path)  # atomic: replaces whatever bind() created
            except OSError:
                pass
            time.sleep(0)

    outcomes = {"served": 0, "refused": 0}
    t = threading.Thread(target=swapper, daemon=True)
    t.start()
    deadline = time.monotonic() + 3.0
    try:
        while time.monotonic() < deadline:
            ls = _unix_listeners(path, mode=0o640)
            try:
                ls.bind()
            except ConfigError as e:
                assert e.message.startswith(f"listen unix {path}: "), e.message
                outcomes["refused"] += 1
            else:
                outcomes["served"] += 1
                ls.close()
            assert stat.S_IMODE(secret.stat().st_mode) == 0o600, outcomes
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
    finally:
        stop.set()
        t.join(5)
    print(f"RELIABILITY unix-socket swap race: {outcomes}")
    assert sum(outcomes.values()) > 50


def test_unix_socket_mode_without_proc_is_refused_not_set_by_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The mode is set through /proc/self/fd; where /proc is missing (a bare chroot) the start
    fails in one line, and the socket file is removed, rather than falling back to the path."""
    path = tmp_path / "etcd.sock"
    real_chmod = os.chmod

    def chmod(target: Any, mode: int, **kw: Any) -> None:
        if str(target).startswith("/proc/self/fd/"):
            raise FileNotFoundError(2, "No such file or directory")
        real_chmod(target, mode, **kw)

    monkeypatch.setattr(os, "chmod", chmod)
    with pytest.raises(ConfigError) as e:
        _unix_listeners(path).bind()
    assert e.value.message == (
        f"listen unix {path}: cannot set its mode: /proc/self/fd is not available"
    )
    assert not path.exists()


def test_unix_socket_mode_is_exact_whatever_the_umask(tmp_path: Path) -> None:
    """The mode asked for, not the umask's: a chmod after bind() is still needed (and done on
    the socket file only)."""
    path = tmp_path / "etcd.sock"
    old = os.umask(0o077)
    try:
        ls = _unix_listeners(path, mode=0o660)
        ls.bind()
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE(path.lstat().st_mode) == 0o660
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(str(path))
    finally:
        ls.close()
    assert not path.exists()


# --- item 12: --config-file must be a regular file, at start-up and on reload -----------------


@pytest.fixture
def odd_file(tmp_path: Path) -> Iterator[Callable[[str], tuple[Path, str]]]:
    """make(kind) -> (a path that is not a regular file, what the refusal calls it)."""
    held: list[socket.socket] = []

    def make(kind: str) -> tuple[Path, str]:
        path = tmp_path / f"{kind}.yaml"
        if kind == "fifo":
            os.mkfifo(path)
            return path, "a FIFO"
        if kind == "dev-zero":
            path.symlink_to("/dev/zero")  # a symbolic link is followed: the device is refused
            return path, "a character device"
        if kind == "directory":
            path.mkdir()
            return path, "a directory"
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(path))
        held.append(s)
        return path, "a socket"

    yield make
    for s in held:
        s.close()


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "directory", "socket"])
def test_config_file_that_is_not_a_regular_file_fails_the_start(
    odd_file: Callable[[str], tuple[Path, str]], kind: str
) -> None:
    """Item 12: a FIFO blocked start-up for good with no message (a directory and a socket
    gave errno texts, /dev/zero was read up to the size cap). Now one line and exit 1, at
    once."""
    path, what = odd_file(kind)
    try:
        code, text, took = run_start(f"--config-file={path}", "--endpoints=127.0.0.1:1", timeout=10)
    except subprocess.TimeoutExpired:
        pytest.fail(f"start-up with --config-file={kind} still running after 10 s")
    assert_one_line(code, text, f"--config-file {path}: not a regular file ({what})")
    print(f"RELIABILITY config-file {kind} at start-up: exit {code} after {took:.2f}s")
    assert took < 5


def _reload_failures(g: GatewayProc, n: int) -> list[dict[str, Any]] | None:
    """The `reload failed` records once there are n of them (a failing reload logs one)."""
    failed = [
        r for r in g.records() if r["msg"] == "reload failed; keeping the running configuration"
    ]
    assert len(failed) <= n, g.lines
    return failed if len(failed) == n else None


def test_config_file_that_is_not_a_regular_file_fails_the_reload(
    relay_impl: str, tmp_path: Path
) -> None:
    """Item 12 on SIGHUP: each reload from a FIFO failed only at the 10 s deadline and left a
    thread blocked in open() for good. Now each is refused at once in one line, no thread is
    left, the running configuration stays; a regular file again reloads as before."""
    conf = tmp_path / "gw.yaml"
    port = free_tcp_port()
    with TagServer("one") as one, TagServer("two") as two:
        conf.write_text(f"endpoints: [{one.addr}]\n")
        g = GatewayProc(
            ["start", f"--config-file={conf}", f"--listen-addr=127.0.0.1:{port}"], relay_impl
        )
        try:
            g.wait_ready()
            threads = len(os.listdir(f"/proc/{g.pid}/task"))
            for i, kind in enumerate(["fifo", "fifo", "dev-zero", "fifo"]):
                conf.unlink()
                if kind == "fifo":
                    os.mkfifo(conf)
                else:
                    conf.symlink_to("/dev/zero")
                t0 = time.monotonic()
                g.proc.send_signal(signal.SIGHUP)
                failed = wait_for(functools.partial(_reload_failures, g, i + 1), timeout=5)
                took = time.monotonic() - t0
                what = "a FIFO" if kind == "fifo" else "a character device"
                assert failed[-1]["error"] == f"--config-file {conf}: not a regular file ({what})"
                assert relay_once(port)[0] == b"one\n"
            # Reload threads end with their reload: none is left blocked.
            wait_threads = time.monotonic() + 5
            while len(os.listdir(f"/proc/{g.pid}/task")) > threads:
                assert time.monotonic() < wait_threads, os.listdir(f"/proc/{g.pid}/task")
                time.sleep(0.05)
            conf.unlink()
            conf.write_text(f"endpoints: [{two.addr}]\n")
            g.proc.send_signal(signal.SIGHUP)
            g.wait_log("reloaded configuration", timeout=10)
            assert relay_once(port)[0] == b"two\n"
            print(
                f"RELIABILITY config-file FIFO on SIGHUP {relay_impl}: reload failed in {took:.3f}s"
            )
        finally:
            assert g.stop() == 0
    assert not any("Traceback" in line for line in g.lines), g.lines


# --- item 14: `etcdgw status` and a malformed /status document --------------------------------


VALID: dict[str, Any] = {  # a JSON document
    "version": "0.1.0",
    "engine": "cython",
    "uptime_seconds": 61.5,
    "ready": True,
    "health_check": "etcd",
    "connections": {"active": 1, "accepted": 2, "refused": 0},
    "bytes": {"to_endpoints": 2048, "from_endpoints": 10},
    "member_sync": {
        "cluster_id": "cdf818194e3a8c32",
        "last_success_seconds_ago": 1.5,
        "ok": 3,
        "failed": 0,
        "refused": 0,
    },
    "endpoints": [
        {
            "address": "127.0.0.1:2379",
            "state": "up",
            "healthy": True,
            "removed": False,
            "active_connections": 1,
            "total_connections": 2,
            "bytes_to_endpoint": 2048,
            "bytes_from_endpoint": 10,
            "dial_failures": 0,
            "last_error": None,
            "last_health_error": None,
            "source": "member-list",
        }
    ],
}

# The seven shapes of the review, each as a body and the reason `etcdgw status` gives.
DEEP = b'{"endpoints": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
MALFORMED = {
    "recursion": (DEEP, "nested too deeply"),
    "wrong-type": (
        json.dumps({**VALID, "connections": 5}).encode(),
        "connections: expected an object, got 5",
    ),
    "overflow": (
        json.dumps(VALID).replace("61.5", "1e999").encode(),
        "uptime_seconds: expected seconds from 0 to 1e+12, got Infinity",
    ),
    "huge-number": (
        json.dumps({**VALID, "bytes": {"to_endpoints": 10**400}}).encode(),
        "bytes.to_endpoints: expected a whole number from 0 to 2**64-1, got "
        + "1"
        + "0" * 36
        + "...",
    ),
    "missing-endpoint": (
        json.dumps({**VALID, "endpoints": [None]}).encode(),
        "endpoints[0]: expected an object, got null",
    ),
    "list-for-object": (
        json.dumps({**VALID, "bytes": []}).encode(),
        "bytes: expected an object, got a list",
    ),
    "string-for-number": (
        json.dumps({**VALID, "endpoints": [{"bytes_to_endpoint": "lots"}]}).encode(),
        'endpoints[0].bytes_to_endpoint: expected a whole number, got "lots"',
    ),
    "non-utf8": (
        b'{"endpoints": [], "version": "\xff"}',
        "not UTF-8: byte 0xff at offset 30",
    ),
    "top-level-list": (b"[]", "the document: expected an object, got a list"),
}


class _BodyServer(ThreadingHTTPServer):
    body = b""  # what every GET is answered with


class _Serve(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        assert isinstance(self.server, _BodyServer)
        body = self.server.body
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def status_server() -> Iterator[Callable[[bytes], int]]:
    """serve(body) -> the port of an HTTP server answering every GET with body."""
    httpd = _BodyServer(("127.0.0.1", 0), _Serve)
    t = threading.Thread(target=httpd.serve_forever, args=(0.05,))
    t.start()

    def serve(body: bytes) -> int:
        httpd.body = body
        return int(httpd.server_address[1])

    yield serve
    httpd.shutdown()
    httpd.server_close()
    t.join(5)


@pytest.mark.parametrize("shape", list(MALFORMED))
def test_status_of_a_malformed_document_is_one_line(
    status_server: Callable[[bytes], int], shape: str
) -> None:
    """Item 14: `etcdgw status` printed a traceback for 7 of 7 malformed shapes. Now one line
    naming the first bad value, exit 1, nothing on stdout."""
    body, reason = MALFORMED[shape]
    port = status_server(body)
    r = run_status(f"--metrics-addr=127.0.0.1:{port}")
    assert "Traceback" not in r.stderr, r.stderr
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr == (
        f"etcdgw status: cannot read http://127.0.0.1:{port}/status: "
        f"not a valid status document ({reason})\n"
    )


class _Trickle(BaseHTTPRequestHandler):
    """A /status that announces 1,000 bytes and sends one every 0.3 s."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        try:
            for _ in range(1000):
                self.wfile.write(b" ")
                self.wfile.flush()
                time.sleep(0.3)
        except OSError:
            pass

    def log_message(self, *args: Any) -> None:
        pass


def test_status_of_a_trickling_server_times_out() -> None:
    """--timeout bounds the whole read, not each byte: a server trickling its document kept
    `etcdgw status` waiting 5 minutes."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Trickle)
    httpd.daemon_threads = True
    t = threading.Thread(target=httpd.serve_forever, args=(0.05,))
    t.start()
    try:
        t0 = time.monotonic()
        r = run_status(f"--metrics-addr=127.0.0.1:{httpd.server_address[1]}", "--timeout=1s")
        took = time.monotonic() - t0
    finally:
        httpd.shutdown()
        httpd.server_close()
        t.join(5)
    assert (r.returncode, r.stdout) == (1, "") and "Traceback" not in r.stderr
    assert r.stderr.endswith(": timed out after 1s\n"), r.stderr
    assert took < 5, took


def test_status_of_a_valid_document_is_the_table(status_server: Callable[[bytes], int]) -> None:
    port = status_server(json.dumps(VALID).encode())
    r = run_status(f"--metrics-addr=127.0.0.1:{port}")
    assert (r.returncode, r.stderr) == (0, ""), r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("etcdgw 0.1.0 (relay engine: cython), up 1m1s, ready;")
    assert lines[1].startswith("member list of cluster cdf818194e3a8c32: synced 1s ago")
    assert lines[2].split()[:2] == ["ENDPOINT", "SOURCE"]
    assert lines[3].split()[:4] == ["127.0.0.1:2379", "member-list", "up", "healthy"]


def test_status_text_cannot_drive_the_terminal() -> None:
    """Text from the document is shown, never obeyed: escape sequences and line breaks in an
    endpoint's error come out escaped, on the endpoint's one row."""
    doc = json.loads(json.dumps(VALID))
    doc["endpoints"][0]["last_error"] = "\x1b]0;owned\x07\x1b[2Jgone\nfake row"
    doc["endpoints"][0]["healthy"] = False
    out = io.StringIO()
    render(doc, out)
    text = out.getvalue()
    assert "\x1b" not in text and "\x07" not in text
    assert text.count("\n") == 4  # header, member list, column names, one endpoint
    assert text.splitlines()[3].endswith(r"\x1b]0;owned\x07\x1b[2Jgone\nfake row")


# Hostile JSON: every type in every place, numbers at and past every bound.
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from([2**64 - 1, 2**64, -1, 10**30])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)
_JSON = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=12,
)
_KEYS = sorted(
    {k for k in VALID}
    | {f"connections.{k}" for k in VALID["connections"]}
    | {f"bytes.{k}" for k in VALID["bytes"]}
    | {f"member_sync.{k}" for k in VALID["member_sync"]}
    | {f"endpoints.0.{k}" for k in VALID["endpoints"][0]}
    | {"endpoints.0", "endpoints.1"}
)


def _mutated(changes: list[tuple[str, Any]]) -> Any:
    """VALID with each (dotted key, value) put in place, where the path still leads."""
    doc: Any = json.loads(json.dumps(VALID))
    for key, value in changes:
        *parents, last = key.split(".")
        node = doc
        for p in parents:
            if isinstance(node, list) and p.isdigit():
                node = node[int(p)] if int(p) < len(node) else None
            else:
                node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node[last] = value
        elif isinstance(node, list) and last.isdigit():
            node[int(last) : int(last) + 1] = [value]  # replace, or append past the end
    return doc


def _check_render(doc: Any) -> None:
    """render() either writes the whole table of printable lines or raises BadDocument and
    writes nothing; nothing else may come out of it."""
    out = io.StringIO()
    try:
        render(doc, out)
    except BadDocument as e:
        assert out.getvalue() == ""
        assert str(e) and "\n" not in str(e) and str(e).isprintable(), repr(str(e))
        return
    lines = out.getvalue().split("\n")
    assert lines[-1] == "" and all(line.isprintable() for line in lines), lines
    sync = doc.get("member_sync") is not None
    assert len(lines) - 1 == 2 + sync + len(doc.get("endpoints") or []), lines


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(_KEYS), _JSON), min_size=1, max_size=4))
def test_status_render_fuzz_hostile_values(changes: list[tuple[str, Any]]) -> None:
    """Item 14: a valid document with hostile values put anywhere (the shape the renderer
    trusts most), through the JSON text the command reads."""
    doc = _mutated(changes)
    try:
        text = json.dumps(doc)
    except ValueError:
        return
    _check_render(parse_document(text.encode()))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_JSON)
def test_status_render_fuzz_any_json(doc: Any) -> None:
    """Any JSON value at all as the document."""
    try:
        parsed = parse_document(json.dumps(doc).encode())
    except BadDocument:
        return
    _check_render(parsed)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200) | st.builds(lambda n: b"[" * n + b"]" * n, st.integers(0, 50_000)))
def test_status_parse_fuzz_bytes(body: bytes) -> None:
    """Any bytes as the body: a value or BadDocument, nothing else."""
    try:
        doc = parse_document(body)
    except BadDocument as e:
        assert str(e).isprintable()
        return
    _check_render(doc)


# --- signals: SIGUSR1, SIGUSR2 and SIGALRM are ignored with one line, in every phase ---------


IGNORED_SIGNALS = {
    signal.SIGUSR1: "SIGUSR1 (reopen logs) is not needed: etcdgw logs to stderr; ignored",
    signal.SIGUSR2: "SIGUSR2 (live upgrade) before the gateway is ready; ignored",
    signal.SIGALRM: "SIGALRM is not used by etcdgw; ignored",
}


def _ignored_lines(g: GatewayProc, sig: signal.Signals) -> list[dict[str, Any]]:
    return [r for r in g.records() if r.get("signal") == sig.name and r["level"] == "warn"]


def _handled(pid: int, sig: signal.Signals) -> bool:
    """Whether the `sig` last sent to pid was delivered and its handler has run.

    A standard signal sent while the previous one is still pending merges with it: the kernel
    keeps one pending bit per signal, and CPython one "tripped" flag until the main thread
    runs the handler. A storm paced by the clock alone therefore lost signals whenever the
    gateway waited for a CPU (CI flake: 99 counted of 100). Delivered: the kernel no longer
    holds it pending (ShdPnd). Handled: the main thread sleeps in epoll_wait again, which
    CPython re-enters only after running the handler of the signal that interrupted it (the
    handler wakes the loop, which sleeps again only once it has run; ep_poll: older kernels)."""
    status = Path(f"/proc/{pid}/status").read_text()
    pending = re.search(r"^ShdPnd:\s*([0-9a-f]+)$", status, re.MULTILINE)
    assert pending is not None, status
    if int(pending[1], 16) & (1 << (sig - 1)):
        return False
    return Path(f"/proc/{pid}/wchan").read_text() in ("do_epoll_wait", "ep_poll")


def test_stray_signals_are_ignored_in_every_phase(
    relay_impl: str, dnsmasq: Dnsmasq, tmp_path: Path
) -> None:
    """SIGUSR1, SIGUSR2 and SIGALRM ended the process (their default action) before and
    after ready. Now each is ignored with one warning line: during start-up (a host-name
    lookup held up by a frozen DNS server), once ready, in a storm (at most a line a second,
    with a count), and during the drain; the gateway keeps relaying and exits 0."""
    port = free_tcp_port()
    with TagServer("one") as one:
        dnsmasq.restart(hosts={"member.etcd.test": ["127.0.0.1"]})
        assert dnsmasq.proc is not None
        os.kill(dnsmasq.proc.pid, signal.SIGSTOP)
        try:
            g = GatewayProc(
                [
                    "start",
                    f"--endpoints=member.etcd.test:{one.port}",
                    f"--listen-addr=127.0.0.1:{port}",
                    f"--discovery-dns={dnsmasq.addr}",
                    "--drain-timeout=10s",
                ],
                relay_impl,
            )
            g.wait_log("starting etcdgw")
            time.sleep(0.3)  # inside the start-up lookup of member.etcd.test now
            for sig in IGNORED_SIGNALS:
                g.proc.send_signal(sig)
                time.sleep(0.05)
            time.sleep(0.2)
            assert g.proc.poll() is None, g.lines
            assert "ready to proxy client requests" not in g.messages()
        finally:
            os.kill(dnsmasq.proc.pid, signal.SIGCONT)
        try:
            g.wait_ready()
            for sig, msg in IGNORED_SIGNALS.items():
                (rec,) = _ignored_lines(g, sig)
                assert rec["msg"] == msg and "count" not in rec
            assert relay_once(port)[0] == b"one\n"
            # Once ready, each on its own: one more line each (SIGUSR2 is the live upgrade
            # once ready: tests/test_upgrade.py).
            for sig in (signal.SIGUSR1, signal.SIGALRM):
                g.proc.send_signal(sig)

                def two_lines(sig: signal.Signals = sig) -> bool:
                    return len(_ignored_lines(g, sig)) == 2

                wait_for(two_lines, timeout=5)
                assert relay_once(port)[0] == b"one\n"
            # A storm: 100 SIGUSR1 in about a second are a line or three, with their count.
            # Each is sent once the one before was handled (see _handled: else they merge and
            # fewer than 100 arrive); the exact count still fails if one is lost or miscounted.
            wait_for(lambda: _handled(g.pid, signal.SIGUSR1), timeout=10, step=0.001)
            time.sleep(1.1)
            t0 = time.monotonic()
            for _ in range(100):
                g.proc.send_signal(signal.SIGUSR1)
                time.sleep(0.01)
                wait_for(lambda: _handled(g.pid, signal.SIGUSR1), timeout=10, step=0.001)
            took = time.monotonic() - t0  # with the waits: lines a second are still bounded
            assert relay_once(port)[0] == b"one\n"

            def storm() -> list[dict[str, Any]]:
                return _ignored_lines(g, signal.SIGUSR1)[2:]

            wait_for(lambda: sum(r.get("count", 1) for r in storm()) == 100, timeout=5)
            assert len(storm()) <= took + 2, (took, storm())
            # During the drain: a client still connected, SIGTERM, then the stray signals.
            with socket.create_connection(("127.0.0.1", port), timeout=10) as held:
                assert held.recv(4) == b"one\n"
                # Not at once: with native accept a SIGTERM within ~50 ms of this connect,
                # just after another connection ended, ends the drain at once and drops this
                # client (server.py/accept.py, reported separately); not what is tested here.
                time.sleep(0.2)
                g.proc.send_signal(signal.SIGTERM)
                g.wait_log("stopping; draining connections")
                for sig in IGNORED_SIGNALS:
                    g.proc.send_signal(sig)

                    def enough_lines(sig: signal.Signals = sig) -> bool:
                        n = 2 if sig == signal.SIGUSR2 else 3  # `SIGUSR2 while stopping; ignored`
                        return len(_ignored_lines(g, sig)) >= n

                    wait_for(enough_lines, timeout=5)
                assert g.proc.poll() is None
                held.sendall(b"still relayed\n")
                assert held.recv(64) == b"still relayed\n"
            assert g.proc.wait(10) == 0
        finally:
            code = g.stop()
    assert code == 0, g.lines
    assert not any("Traceback" in line for line in g.lines), g.lines
    print(
        f"RELIABILITY stray signals {relay_impl}: "
        + ", ".join(f"{s.name} {len(_ignored_lines(g, s))} lines" for s in IGNORED_SIGNALS)
    )


# --- item 11: the metrics port under a connect flood ------------------------------------------


@pytest.fixture
def metrics_server(no_fd_leak: None) -> Iterator[MetricsServer]:
    """A MetricsServer on a free loopback port over a gateway stand-in (one usable endpoint)."""
    ms = MetricsServer(standalone(1).view, f"127.0.0.1:{free_tcp_port()}", Logger(level="error"))
    ms.bind()
    yield ms
    ms.close()


@contextlib.contextmanager
def _fds(n: int) -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = soft if hard != resource.RLIM_INFINITY and hard < n else max(soft, n)
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _total_retrans(s: socket.socket) -> int:
    """tcpi_total_retrans of a TCP socket: the segments it sent again, a SYN included."""
    info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return int.from_bytes(info[100:104], sys.byteorder)


def _burst(port: int, n: int, fired: threading.Event, out: list[float], retrans: list[int]) -> None:
    """n clients connect at once and each asks /health as soon as it is connected; out gets
    each one's seconds from connect() to the whole 200 answer (inf: none within 5 s), and
    retrans what each one sent again (_total_retrans)."""
    import selectors

    sel = selectors.DefaultSelector()
    t0: dict[socket.socket, float] = {}
    got: dict[socket.socket, bytes] = {}
    for _ in range(n):
        s = socket.socket()
        s.setblocking(False)
        t0[s] = time.monotonic()
        s.connect_ex(("127.0.0.1", port))
        sel.register(s, selectors.EVENT_WRITE)
    fired.set()
    deadline = time.monotonic() + 5
    while sel.get_map() and time.monotonic() < deadline:
        for key, ev in sel.select(0.1):
            fileobj = key.fileobj
            assert isinstance(fileobj, socket.socket)
            s = fileobj
            if ev & selectors.EVENT_WRITE:
                s.send(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                sel.modify(s, selectors.EVENT_READ)
                got[s] = b""
                continue
            try:
                chunk = s.recv(4096)
            except OSError:
                chunk = b""
            got[s] += chunk
            if not chunk:
                sel.unregister(s)
                ok = got[s].startswith(b"HTTP/1.1 200 ")
                out.append(time.monotonic() - t0[s] if ok else float("inf"))
    for s in t0:
        if s.fileno() >= 0 and s in sel.get_map():
            out.append(float("inf"))
        retrans.append(_total_retrans(s))
        s.close()
    sel.close()


def test_metrics_burst_while_the_loop_is_busy_is_queued_not_dropped(
    metrics_server: MetricsServer,
) -> None:
    """Item 11: the metrics listener had a backlog of 100, so a burst of connects while the
    loop was busy overflowed it: the kernel dropped the SYNs and each of those clients came
    back after a 1 s retransmit (p99 1.0-1.3 s under a connect flood). Now the backlog is the
    kernel's maximum: 1,000 clients arriving while the loop is blocked for 0.3 s are all
    answered, none after a retransmit.

    "None after a retransmit" is what the kernel counts on each client socket (a dropped SYN,
    or a dropped handshake ACK and then the request, is sent again): not a time bound, which
    also counted a loaded machine serving 1,000 clients through asyncio (CI flake)."""
    n = 1000
    out: list[float] = []
    retrans: list[int] = []
    fired = threading.Event()

    async def main() -> None:
        await metrics_server.start()
        burst = threading.Thread(
            target=_burst,
            args=(int(metrics_server.addr.split(":")[1]), n, fired, out, retrans),
        )
        burst.start()
        fired.wait(10)
        time.sleep(0.3)  # the loop is busy: nobody accepts while the burst arrives
        await asyncio.get_running_loop().run_in_executor(None, burst.join, 15)

    with _fds(n + 200):
        asyncio.run(main())
    out.sort()
    print(
        f"RELIABILITY metrics burst of {n} while the loop is blocked 0.3 s: answered "
        f"{sum(t < 5 for t in out)}, p50 {out[n // 2]:.3f}s, max {out[-1]:.3f}s, "
        f"{sum(map(bool, retrans))} clients sent a segment again"
    )
    assert len(out) == n and out[-1] < 5, f"slowest {out[-10:]}"  # all answered
    assert len(retrans) == n and sum(retrans) == 0, f"{sum(map(bool, retrans))} retransmitted"


def test_metrics_scrape_flood_does_not_hold_up_the_loop(
    metrics_server: MetricsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Item 11: the loop also relays (pure engine). 40 /metrics requests that arrive together
    were answered in one wake-up, each body costing what it costs (10 ms here): the loop
    stood still for their sum. Now bodies are served a budget a wake-up: the longest turn of
    the loop stays near one body.

    A turn is measured in the loop thread's CPU time (time.thread_time), the work it did: wall
    time also counted the test process waiting for a CPU or for the GIL (the scrapers' thread
    holds it too), so a loaded machine made a one-body turn look long (CI flake). One body is
    ~10 ms of CPU; the regression (every queued body in one turn) is several bodies, up to
    400 ms."""

    class Slow:
        def collect(self) -> list[Any]:
            t = time.thread_time()  # a large scrape: 10 ms of work
            while time.thread_time() - t < 0.01:
                pass
            return []

    # Every body is built: a costly body reused for a while (REUSE_OVER) would make all but
    # the first cheap and hide a turn that serves them all.
    monkeypatch.setattr(metrics, "REUSE_OVER", float("inf"))
    metrics_server.registry.register(Slow())
    port = int(metrics_server.addr.split(":")[1])
    answers: list[bytes] = []

    def scrapers() -> None:
        socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(40)]
        for s in socks:
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        for s in socks:
            with s:
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
                answers.append(data)

    async def main() -> float:
        await metrics_server.start()
        t = threading.Thread(target=scrapers)
        t.start()
        worst, last = 0.0, time.thread_time()
        while t.is_alive():
            await asyncio.sleep(0)  # one turn of the loop
            now = time.thread_time()
            worst, last = max(worst, now - last), now
        t.join()
        return worst

    worst = asyncio.run(main())
    assert len(answers) == 40 and all(a.startswith(b"HTTP/1.1 200 ") for a in answers)
    print(
        f"RELIABILITY metrics 40 scrapes of 10 ms at once: longest loop turn {worst * 1000:.1f} ms"
        " of CPU"
    )
    assert worst < 0.05, f"one turn of the loop did {worst:.3f}s of work"


def test_metrics_connect_flood_in_a_namespace(relay_impl: str) -> None:
    """Item 11 end to end: 9,500 connects a second for 4 s on --metrics-addr, from a
    separate process, in a network namespace of our own; /health and a relayed connection
    probed every 20 ms meanwhile. Before: the 100-deep backlog overflowed (thousands of
    dropped SYNs), /health p99 1.0-4.1 s. Now: no SYN dropped, every probe answered without
    a retransmit. The figures go to RELIABILITY.md; the assertions are on what the kernel
    counts and on the 1 s retransmit, not on milliseconds of a shared machine."""
    if os.geteuid() != 0:
        pytest.fail("the flood runs in a network namespace of its own: needs root", pytrace=False)
    cmd = [
        "unshare",
        "-n",
        sys.executable,
        str(Path(__file__).parent / "_flood.py"),
        "measure",
        f"--engine={relay_impl}",
        "--seconds=4",
        "--rate=9500",
    ]
    r = subprocess.run(
        cmd, capture_output=True, text=True, timeout=120, env=engine_env(relay_impl), check=False
    )
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    h, rel = d["flooded"]["health"], d["flooded"]["relayed"]
    print(
        f"RELIABILITY metrics connect flood {relay_impl}: {d['flood']['connected']} connects in "
        f"{d['flood']['seconds']}s; /health p50 {h.get('p50_ms')} p99 {h.get('p99_ms')} max "
        f"{h.get('max_ms')} ms ({h['failed']} failed); relayed p50 {rel.get('p50_ms')} p99 "
        f"{rel.get('p99_ms')} max {rel.get('max_ms')} ms; {d['tcpext']}; gateway cpu "
        f"{d['gateway_cpu']:.0%}"
    )
    # At --log-level=warn a gateway under a flood logs nothing (before: asyncio tracebacks).
    assert d["gateway_alive"] and d["exit"] == 0 and d["log_lines"] == 0, d
    assert d["tcpext"]["ListenOverflows"] == 0 and d["tcpext"]["ListenDrops"] == 0, d
    for probe in (h, rel):
        assert probe["failed"] == 0 and probe["over_1s"] == 0, d


def test_a_signal_storm_through_the_stop_still_exits_zero(
    gateway: Callable[..., GatewayProc],
) -> None:
    """The second review: SIGUSR1 100 times a second, SIGTERM in the middle. Was: a clean
    stop, then the default action of a SIGUSR1 during interpreter teardown (exit 138)."""
    port = free_tcp_port()
    with TagServer("t") as t:
        g = gateway(f"--endpoints={t.addr}", f"--listen-addr=127.0.0.1:{port}")
        stop = threading.Event()

        def storm() -> None:
            while not stop.is_set() and g.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(g.pid, signal.SIGUSR1)
                time.sleep(0.01)

        th = threading.Thread(target=storm, daemon=True)
        th.start()
        try:
            time.sleep(0.3)
            g.proc.send_signal(signal.SIGTERM)
            rc = g.proc.wait(15)
        finally:
            stop.set()
            th.join(5)
        assert rc == 0, (rc, g.lines[-5:])


def test_status_escapes_what_the_server_says(tmp_path: Path) -> None:
    """The second review: an HTTP reason phrase with terminal escapes was printed raw."""
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def serve() -> None:
        c, _ = srv.accept()
        with c:
            c.recv(65536)
            c.sendall(b"HTTP/1.0 500 \x1b[31mBAD\x1b]0;pwned\x07\r\nContent-Length: 0\r\n\r\n")

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    try:
        r = subprocess.run(
            [sys.executable, "-m", "etcdgw", "status", f"--metrics-addr=127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            timeout=30,
            env=engine_env("python"),
            stdin=subprocess.DEVNULL,
            check=False,
        )
    finally:
        th.join(5)
        srv.close()
    assert r.returncode == 1, r
    assert "\x1b" not in r.stderr and "\x07" not in r.stderr, repr(r.stderr)
    assert "\\x1b[31mBAD" in r.stderr, repr(r.stderr)
