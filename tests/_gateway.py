"""Run etcdgw as a real process (either engine) and small real backends for server tests."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest

from _etcd import free_port

__all__ = [
    "Sockets",
    "sockets",
    "GatewayProc",
    "TagServer",
    "connect",
    "read_line",
    "gateway",
    "gateway_sets",
    "free_tcp_port",
    "free_tcp_ports",
    "wait_for",
    "log_time",
    "SRC",
    "tool",
]

SRC = str(Path(__file__).resolve().parent.parent / "src")


def tool(name: str) -> str:
    """The path of a tool scripts/setup.sh installs; a missing one fails loudly."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    assert path, f"{name} not found: run scripts/setup.sh (make setup)"
    return path


def log_time(rec: dict[str, Any]) -> float:
    """A gateway log record's `ts` (UTC, as etcdgw.log writes it) as a Unix time."""
    from datetime import datetime

    return datetime.fromisoformat(str(rec["ts"]).replace("Z", "+00:00")).timestamp()


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A port free now on host and never handed out before in this process (_etcd.free_port:
    below the ephemeral range, so no outgoing connection takes it before it is bound)."""
    return free_port(host)


def free_tcp_ports(n: int, host: str = "127.0.0.1", avoid: Collection[int] = ()) -> list[int]:
    """n distinct free ports, none in avoid (see free_tcp_port)."""
    ports: list[int] = []
    for _ in range(n + 1000):  # bounded: avoid holds a few ports, not 1,000
        if len(ports) == n:
            break
        port = free_port(host)
        if port not in avoid:
            ports.append(port)
    assert len(ports) == n, f"no {n} free ports on {host}"
    return ports


def connect(port: int, host: str = "127.0.0.1", timeout: float = 15.0) -> socket.socket:
    """A client connection to the gateway (closed again if connecting fails)."""
    return socket.create_connection((host, port), timeout=timeout)


def read_line(s: socket.socket) -> bytes:
    """Bytes up to and including the first newline (or EOF)."""
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = s.recv(1)
        if not chunk:
            break
        buf += chunk
    return buf


def tag_via(port: int, host: str = "127.0.0.1") -> str:
    """Connect through the gateway and read the TagServer's tag: which backend got the client."""
    with connect(port, host) as s:
        return read_line(s).decode().strip()


T = TypeVar("T")


def wait_for(pred: Callable[[], T | None], timeout: float = 10.0, step: float = 0.02) -> T:
    """Poll pred until truthy or timeout (then AssertionError); return the truthy value."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(step)


def engine_env(impl: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("ETCDGW_NO_EXTENSIONS", None)
    if impl == "python":
        env["ETCDGW_NO_EXTENSIONS"] = "1"
    env.pop("NOTIFY_SOCKET", None)
    return env


class GatewayProc:
    """`python -m etcdgw ARGS` with its stderr log lines collected by a reader thread."""

    def __init__(
        self,
        args: list[str],
        impl: str = "cython",
        env: dict[str, str] | None = None,
        sets: Sequence[str] = (),
    ):
        """sets: bench/launch.py's `--set MODULE:NAME=VALUE` switches (e.g.
        etcdgw.server:NATIVE_ACCEPT=0); the gateway then runs through bench/launch.py."""
        self.args = args
        self.impl = impl
        full_env = engine_env(impl)
        if env:
            full_env.update(env)
        command = [sys.executable, "-m", "etcdgw"]
        if sets:
            launch = os.path.join(os.path.dirname(SRC), "bench", "launch.py")
            command = [sys.executable, launch, *(a for s in sets for a in ("--set", s)), "--"]
        self.proc = subprocess.Popen(
            [*command, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=full_env,
            text=True,
        )
        self.lines: list[str] = []
        self.stdout = ""
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._lock:
                self.lines.append(line.rstrip("\n"))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def records(self) -> list[dict[str, Any]]:
        out = []
        with self._lock:
            lines = list(self.lines)
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def messages(self) -> list[str]:
        return [str(r.get("msg")) for r in self.records()]

    def wait_log(self, msg: str, timeout: float = 15.0, **fields: Any) -> dict[str, Any]:
        def scan() -> dict[str, Any] | None:
            for r in self.records():
                if r.get("msg") == msg and all(r.get(k) == v for k, v in fields.items()):
                    return r
            return None

        def find() -> dict[str, Any] | None:
            if (r := scan()) is not None:
                return r
            if self.proc.poll() is not None:
                # Exited: its last lines may still be in the pipe or in the reader thread's
                # hands. EOF ends the reader, so after the join every line is stored.
                self._reader.join(5)
                if (r := scan()) is not None:
                    return r
                raise AssertionError(
                    f"gateway exited {self.proc.returncode} before {msg!r}:\n"
                    + "\n".join(self.lines)
                )
            return None

        try:
            return wait_for(find, timeout)
        except AssertionError as e:
            raise AssertionError(
                f"{e}: no log {msg!r} {fields}; log:\n" + "\n".join(self.lines)
            ) from None

    def wait_ready(self, timeout: float = 15.0) -> dict[str, Any]:
        return self.wait_log("ready to proxy client requests", timeout)

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._reader.join(5)
        assert self.proc.stdout is not None
        if not self.proc.stdout.closed:
            self.stdout = self.proc.stdout.read()
            self.proc.stdout.close()
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        return int(self.proc.returncode)


@pytest.fixture
def gateway_sets() -> tuple[str, ...]:
    """bench/launch.py switches for the gateways `gateway` starts: none (a module overrides
    this fixture to run its gateways in a variant, e.g. tests/test_server.py)."""
    return ()


@pytest.fixture
def gateway(relay_impl: str, gateway_sets: tuple[str, ...]) -> Iterator[Callable[..., GatewayProc]]:
    """Factory: gateway("--endpoints=...", ...) -> a ready GatewayProc on the engine under test."""
    procs: list[GatewayProc] = []

    def start(*args: str, ready: bool = True, env: dict[str, str] | None = None) -> GatewayProc:
        g = GatewayProc(["start", *args], impl=relay_impl, env=env, sets=gateway_sets)
        procs.append(g)
        if ready:
            g.wait_ready()
            engine = [r for r in g.records() if r.get("msg") == "starting etcdgw"]
            assert engine and engine[0]["relay-engine"] == relay_impl, g.lines
        return g

    yield start
    for g in procs:
        g.stop()


class TagServer:
    """A real TCP backend on loopback: answers every connection with its tag, then echoes.

    Counts accepted connections; `close()` stops it. Runs in one thread with selectors.
    """

    def __init__(self, tag: str, host: str = "127.0.0.1", port: int = 0) -> None:
        import selectors

        self.tag = tag.encode()
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.create_server((host, port), family=fam, backlog=512)
        self.sock.setblocking(False)
        self.port = int(self.sock.getsockname()[1])
        self.host = host
        self.accepted = 0
        self._sel = selectors.DefaultSelector()
        self._sel.register(self.sock, selectors.EVENT_READ)
        self._r, self._w = os.pipe()
        self._sel.register(self._r, selectors.EVENT_READ)
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    @property
    def addr(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def _run(self) -> None:
        import selectors

        while True:
            for key, _ in self._sel.select(1.0):
                if key.fileobj == self._r:
                    return
                if key.fileobj is self.sock:
                    try:
                        c, _ = self.sock.accept()
                    except BlockingIOError:
                        continue
                    self.accepted += 1
                    c.setblocking(True)
                    try:
                        c.sendall(self.tag + b"\n")
                    except OSError:
                        c.close()
                        continue
                    c.setblocking(False)
                    self._conns.append(c)
                    self._sel.register(c, selectors.EVENT_READ)
                else:
                    fileobj = key.fileobj
                    assert isinstance(fileobj, socket.socket)
                    c = fileobj
                    try:
                        data = c.recv(65536)
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    if not data:
                        self._sel.unregister(c)
                        self._conns.remove(c)
                        c.close()
                        continue
                    try:
                        c.setblocking(True)
                        c.sendall(data)
                        c.setblocking(False)
                    except OSError:
                        pass

    def close(self) -> None:
        if self._thread.is_alive():
            os.write(self._w, b"x")
            self._thread.join(5)
        for c in self._conns:
            c.close()
        self._sel.close()
        self.sock.close()
        os.close(self._r)
        os.close(self._w)

    def __enter__(self) -> TagServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def silent_listener() -> tuple[socket.socket, list[socket.socket]]:
    """A listener whose accept queue is full: new SYNs are dropped, connect() hangs."""
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(0)
    fillers = []
    for _ in range(4):
        c = socket.socket()
        c.setblocking(False)
        c.connect_ex(lst.getsockname())
        fillers.append(c)
    time.sleep(0.2)
    return lst, fillers


TEXT_LOG = re.compile(r"^\d{4}-\d\d-\d\dT[\d:.]+Z (DEBUG|INFO |WARN |ERROR) ")


def error_lines(text: str) -> list[str]:
    """Lines that are neither log records (JSON or --log-format=text) nor the usage hint."""
    keep = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("Run 'etcdgw start --help'"):
            continue
        if TEXT_LOG.match(line):
            continue
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                json.loads(line)
                continue
        keep.append(line)
    return keep


# (client app, engine's client end, engine's upstream end, upstream app)
Sockets = tuple[socket.socket, socket.socket, socket.socket, socket.socket]


@pytest.fixture
def sockets(no_fd_leak: None) -> Iterator[Callable[[str], Sockets]]:
    """A factory of connected quads for engine tests: `unix` (socketpairs) or `tcp`
    (loopback); the engine's two ends non-blocking; all closed at the end."""
    made: list[socket.socket] = []

    def connected(kind: str) -> tuple[socket.socket, socket.socket]:
        if kind == "unix":
            return socket.socketpair()
        with socket.create_server(("127.0.0.1", 0)) as listener:
            a = socket.create_connection(listener.getsockname())
            b, _ = listener.accept()
        return a, b

    def make(kind: str = "unix") -> Sockets:
        client, down = connected(kind)
        up, upstream = connected(kind)
        for s in (down, up):
            s.setblocking(False)
        made.extend((client, down, up, upstream))
        return client, down, up, upstream

    yield make
    for s in made:
        s.close()
