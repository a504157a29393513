"""Hypothesis properties: both relay engines are byte-exact; the command line never crashes."""

# Engines: random payloads, write and read sizes, interleavings of app writes/reads with
# engine.run(), half-close orders (either side first, a reply only after EOF, both at once)
# and resets at random points, on loopback TCP pairs and AF_UNIX socketpairs, with random
# engine buffer sizes. Each example checks what every side received against what the other
# sent, and that no fd is left open. Command line: random argv from the real `start` flag
# set, realistic and garbage values, run in-process through cli.main() with the real start-up
# (parse, resolve, bind) and only the serving loop stubbed out.

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import os
import random
import select
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from _dns import Dnsmasq
from _gateway import error_lines
from etcdgw.engine import Finished
from etcdgw.reload import Reparse
from etcdgw.running import Running
from etcdgw.systemd import StartupSignals

# hypothesis reads mypy_extensions.TypedDict while it reports a falsifying example; under
# the suite's warnings-as-errors that deprecation would turn the report into an INTERNALERROR.
pytestmark = pytest.mark.filterwarnings(
    "ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning"
)

ENGINE_EXAMPLES = int(os.environ.get("ETCDGW_FUZZ_EXAMPLES", "100"))  # per property, engine
CLI_EXAMPLES = int(os.environ.get("ETCDGW_CLI_EXAMPLES", "300"))
EXAMPLE_TIMEOUT = 10.0  # seconds one example may take to finish its pair
# Once one example hung, hypothesis shrinks it by running many more that hang too: those
# get a short timeout, so a failure is reported in a minute, not after an hour.
SHRINK_TIMEOUT = 1.5
_hung = False
LINGER_RESET = struct.pack("ii", 1, 0)
BUFSIZES = [1, 7, 1024, 4096, 65536]
RESET_ERRNOS = {errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN}

ENGINE_SETTINGS = settings(
    max_examples=ENGINE_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def open_fds() -> set[int]:
    return {int(x) for x in os.listdir("/proc/self/fd")}


def pair(kind: str, small: bool) -> tuple[socket.socket, socket.socket]:
    """Two connected non-blocking stream sockets: loopback TCP or an AF_UNIX socketpair.

    small: tiny kernel buffers, so a destination fills up after a few KB and the engine's
    partial-send and backpressure paths run in most examples.
    """
    if kind == "unix":
        a, b = socket.socketpair()
    else:
        with socket.create_server(("127.0.0.1", 0)) as lst:
            if small:
                lst.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            a = socket.socket()
            if small:
                a.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            a.connect(lst.getsockname())
            b, _ = lst.accept()
        for s in (a, b):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for s in (a, b):
        if small:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.setblocking(False)
    return a, b


class App:
    """One application end (the client, or the etcd member) driven non-blocking."""

    def __init__(self, sock: socket.socket, data: bytes, writes: list[int], reads: list[int]):
        self.sock: socket.socket | None = sock
        self.data = memoryview(data)
        self.sent = 0
        self.writes = writes or [65536]
        self.reads = reads or [65536]
        self.nw = self.nr = 0
        self.received = bytearray()
        self.eof = False
        self.error = 0  # errno that ended reading or writing (a reset)
        self.shut = False
        self.write_after_eof = False  # a reply: write only once the peer's EOF arrived
        self.shut_after_eof = False  # close writing only once the peer's EOF arrived
        self.stopped = False  # neither writes nor closes any more: only reads

    @property
    def may_write(self) -> bool:
        if self.sock is None or self.error or self.stopped:
            return False
        return self.eof or not self.write_after_eof

    def write(self) -> bool:
        """Send the next chunk (as much of it as the socket takes); False if nothing went."""
        if not self.may_write or self.sent >= len(self.data):
            return False
        n = self.writes[self.nw % len(self.writes)]
        self.nw += 1
        assert self.sock is not None
        try:
            m = self.sock.send(self.data[self.sent : self.sent + n])
        except BlockingIOError:
            return False
        except OSError as e:
            self.error = e.errno or errno.EIO
            return False
        self.sent += m
        return m > 0

    def read(self) -> bool:
        """Receive the next chunk; False if nothing came (EOF and errors count as progress)."""
        if self.sock is None or self.eof or self.error:
            return False
        n = self.reads[self.nr % len(self.reads)]
        self.nr += 1
        try:
            data = self.sock.recv(n)
        except BlockingIOError:
            return False
        except OSError as e:
            self.error = e.errno or errno.EIO
            return True
        if not data:
            self.eof = True
        self.received += data
        return True

    def maybe_shut(self) -> None:
        if self.shut or not self.may_write or self.sent < len(self.data):
            return
        if self.shut_after_eof and not self.eof:
            return
        assert self.sock is not None
        self.shut = True
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as e:
            self.error = e.errno or errno.EIO

    def reset(self) -> None:
        """Close with SO_LINGER 0: the peer gets a RST."""
        assert self.sock is not None
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        self.sock.close()
        self.sock = None

    def done(self) -> bool:
        return self.sock is None or self.error != 0 or (self.eof and (self.shut or self.stopped))

    def events(self) -> int:
        if self.sock is None or self.error:
            return 0
        ev = 0 if self.eof else select.POLLIN
        if self.may_write and self.sent < len(self.data):
            ev |= select.POLLOUT
        return ev


class Harness:
    """client app <-> [client fd | engine | upstream fd] <-> upstream app."""

    def __init__(self, engine_module: ModuleType, sc: dict[str, Any]) -> None:
        self.fds_before = open_fds()
        # threaded: the Cython engine's own relay thread (the default) or run() in this one.
        self.engine = engine_module.Engine(sc["bufsize"], threaded=sc["threaded"])
        self.c_app, self.c_gw = pair(sc["kind"], sc["small"])
        self.u_gw, self.u_app = pair(sc["kind"], sc["small"])
        self.pid = self.engine.add(self.c_gw.fileno(), self.u_gw.fileno())
        self.finished: list[Finished] = []
        self.closed_gw = False

    def run(self) -> None:
        for f in self.engine.run():
            assert f[0] == self.pid, f
            assert not self.finished, "a pair finished twice"
            self.finished.append(f)
            # What server.py does: a reset is passed on as a reset, then both are closed.
            if f[3]:
                for s in (self.c_gw, self.u_gw):
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            self.c_gw.close()
            self.u_gw.close()
            self.closed_gw = True

    def wait(self, apps: list[App]) -> None:
        if self.engine.pending:
            return
        poller = select.poll()
        if not self.closed_gw:
            poller.register(self.engine.fileno(), select.POLLIN)
        for a in apps:
            if a.sock is not None and a.events():
                poller.register(a.sock, a.events())
        poller.poll(20)

    def close(self) -> None:
        for s in (self.c_app, self.c_gw, self.u_gw, self.u_app):
            s.close()
        self.engine.close()
        leaked = open_fds() - self.fds_before
        assert not leaked, f"fds left open: {sorted(leaked)}"


def drive(
    h: Harness,
    c: App,
    u: App,
    schedule: list[str],
    resets: dict[int, App],
    stop_after_schedule: App | None = None,
) -> None:
    """Play the drawn schedule, then run everything to the end within EXAMPLE_TIMEOUT."""
    acts = {"cw": c.write, "uw": u.write, "cr": c.read, "ur": u.read, "run": h.run}
    for i, act in enumerate(schedule):
        if i in resets and resets[i].sock is not None:
            resets.pop(i).reset()
        acts[act]()
        c.maybe_shut()
        u.maybe_shut()
    for app in resets.values():  # resets drawn past the end of the schedule
        if app.sock is not None:
            app.reset()
    if stop_after_schedule is not None:
        stop_after_schedule.stopped = True
    global _hung
    deadline = time.monotonic() + (SHRINK_TIMEOUT if _hung else EXAMPLE_TIMEOUT)
    while not (h.finished and c.done() and u.done()):
        _hung = time.monotonic() >= deadline
        assert not _hung, (
            f"no progress: finished={h.finished} client sent={c.sent}/{len(c.data)} "
            f"got={len(c.received)} eof={c.eof} err={c.error}; upstream sent={u.sent}/"
            f"{len(u.data)} got={len(u.received)} eof={u.eof} err={u.error}"
        )
        for app in (c, u):
            # In the drawn chunk sizes, until the socket pushes back (bounded per round):
            # 1-byte chunks must not turn a 300 KB payload into a timeout.
            for _ in range(4096):
                if not app.write():
                    break
            app.maybe_shut()
            for _ in range(4096):
                if not app.read():
                    break
        if not h.finished:
            h.run()
        h.wait([c, u])


class Payload(bytes):
    """Random bytes that print as their size and seed, not as 300 KB of escapes."""

    seed: int

    def __new__(cls, size: int, seed: int) -> Payload:
        obj = super().__new__(cls, random.Random(seed).randbytes(size))
        obj.seed = seed
        return obj

    def __repr__(self) -> str:
        return f"Payload({len(self)}, seed={self.seed})"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self))


payload_sizes = st.one_of(
    st.integers(0, 64), st.integers(0, 70_000), st.sampled_from([65535, 65536, 65537, 300_000])
)
chunk_sizes = st.lists(
    st.one_of(st.integers(1, 16), st.integers(1, 70_000)), min_size=1, max_size=8
)
schedules = st.lists(st.sampled_from(["cw", "uw", "cr", "ur", "run"]), max_size=120)


@st.composite
def scenario(draw: st.DrawFn) -> dict[str, Any]:
    size_c, size_u = draw(payload_sizes), draw(payload_sizes)
    bufsize = draw(st.sampled_from(BUFSIZES))
    # A 1-byte buffer over 300 KB means 300,000 reads: keep tiny buffers for small payloads.
    assume(bufsize >= 1024 or max(size_c, size_u) <= 20_000)
    chunks = {k: draw(chunk_sizes) for k in ("c_writes", "u_writes", "c_reads", "u_reads")}
    # At most ~50,000 system calls per direction and side, however small the chunks.
    assume(max(size_c, size_u) <= 50_000 * min(min(v) for v in chunks.values()))
    seed = draw(st.integers(0, 2**32 - 1))
    return {
        "kind": draw(st.sampled_from(["tcp", "unix"])),
        "small": draw(st.booleans()),
        "threaded": draw(st.booleans()),
        "bufsize": bufsize,
        "c_data": Payload(size_c, seed),
        "u_data": Payload(size_u, seed + 1),
        **chunks,
        "schedule": draw(schedules),
    }


@ENGINE_SETTINGS
@given(
    sc=scenario(),
    order=st.sampled_from(
        ["independent", "client-first", "upstream-first", "reply-to-client", "reply-to-upstream"]
    ),
)
def test_engine_byte_exact_any_chunking_and_half_close_order(
    engine_module: ModuleType, sc: dict[str, Any], order: str
) -> None:
    """Each side receives exactly what the other sent, in order, then EOF; the pair finishes
    cleanly with the right byte counts; no fd is left open."""
    h = Harness(engine_module, sc)
    try:
        c = App(h.c_app, sc["c_data"], sc["c_writes"], sc["c_reads"])
        u = App(h.u_app, sc["u_data"], sc["u_writes"], sc["u_reads"])
        if order == "client-first":
            u.shut_after_eof = True  # the upstream half-closes only after the client did
        elif order == "upstream-first":
            c.shut_after_eof = True
        elif order == "reply-to-client":
            u.write_after_eof = u.shut_after_eof = True  # answers only after the client's EOF
        elif order == "reply-to-upstream":
            c.write_after_eof = c.shut_after_eof = True
        drive(h, c, u, sc["schedule"], {})
        assert bytes(u.received) == sc["c_data"]
        assert bytes(c.received) == sc["u_data"]
        assert c.eof and u.eof and not c.error and not u.error
        assert [f[:4] for f in h.finished] == [(h.pid, len(sc["c_data"]), len(sc["u_data"]), 0)]
        assert len(h.engine) == 0
    finally:
        h.close()


@ENGINE_SETTINGS
@given(
    sc=scenario(),
    who=st.sampled_from(["client", "upstream"]),
    at=st.integers(0, 130),
    survivor_stops=st.booleans(),
)
def test_engine_reset_at_any_point_ends_the_pair_with_prefixes(
    engine_module: ModuleType, sc: dict[str, Any], who: str, at: int, survivor_stops: bool
) -> None:
    """One side resets at a random point: the pair finishes (no hang), what each side got is
    a prefix of what the other sent, the survivor sees the reset (or an EOF), and no fd is
    left open."""
    h = Harness(engine_module, sc)
    try:
        c = App(h.c_app, sc["c_data"], sc["c_writes"], sc["c_reads"])
        u = App(h.u_app, sc["u_data"], sc["u_writes"], sc["u_reads"])
        resetter, survivor = (c, u) if who == "client" else (u, c)
        # survivor_stops: after the schedule the survivor only reads; nothing it sends can
        # reveal the reset, so the engine must find it on its own (SO_ERROR after an EOF).
        # Only over TCP: closing an AF_UNIX socket sends no reset, just an EOF, and a
        # half-closed pair rightly stays open while the other side may still answer.
        stops = survivor if survivor_stops and sc["kind"] == "tcp" else None
        drive(h, c, u, sc["schedule"], {at: resetter}, stops)
        assert bytes(u.received) == sc["c_data"][: len(u.received)]
        assert bytes(c.received) == sc["u_data"][: len(c.received)]
        assert h.finished and h.finished[0][0] == h.pid
        _, c2u, u2c, err, _ = h.finished[0]
        # Counted = handed to the kernel: at most what was sent, at least what was read.
        assert len(u.received) <= c2u <= c.sent
        assert len(c.received) <= u2c <= u.sent
        if err == 0:
            # A clean finish (the pair ended before the reset, or an AF_UNIX "reset", which
            # is a plain close): nothing that was sent was dropped.
            assert (c2u, u2c) == (c.sent, u.sent)
        else:
            assert err in RESET_ERRNOS, os.strerror(err)
        assert survivor.eof or survivor.error in RESET_ERRNOS, survivor.error
        assert len(h.engine) == 0
    finally:
        h.close()


def test_engine_reset_after_eof_with_unread_bytes_ends_the_pair(engine_module: ModuleType) -> None:
    """Found by the reset property: the client sends, half-closes, then resets while the
    engine still holds unread bytes from it (its upstream is slow to take them). The reset
    must end the pair once those bytes are through, even though the upstream stays silent;
    it used to be forgotten (EPOLLERR seen before the EOF was read), leaving the pair open
    until the upstream spoke."""
    before = open_fds()
    engine = engine_module.Engine(65536)
    c_app, c_gw = pair("tcp", small=False)
    u_gw, u_app = pair("tcp", small=True)  # the upstream takes a few KB at a time
    try:
        pid = engine.add(c_gw.fileno(), u_gw.fileno())
        c_app.setblocking(True)
        c_app.sendall(b"x" * 50_000)
        c_app.shutdown(socket.SHUT_WR)
        time.sleep(0.05)
        assert engine.run() == []  # the upstream is full: bytes and EOF wait in c_gw
        c_app.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        c_app.close()  # RST after FIN: c_gw's error is EPIPE, reported once by EPOLLERR
        finished: list[Finished] = []
        got = 0
        deadline = time.monotonic() + 5
        while not finished and time.monotonic() < deadline:
            with contextlib.suppress(BlockingIOError):
                while data := u_app.recv(65536):
                    got += len(data)
            finished = engine.run()
            select.select([engine.fileno(), u_app], [], [], 0.05)
        assert [f[:4] for f in finished] == [(pid, 50_000, 0, errno.EPIPE)], finished
        u_app.setblocking(True)
        u_app.settimeout(5)
        while data := u_app.recv(65536):  # the tail the engine handed over, then EOF
            got += len(data)
        assert got == 50_000
    finally:
        for s in (c_app, c_gw, u_gw, u_app):
            s.close()
        engine.close()
    assert open_fds() == before


# ============================================================================================
# The command line


@pytest.fixture(scope="module")
def dns_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dnsmasq]:
    """A local dnsmasq: every name the fuzzer makes up is looked up here, never elsewhere."""
    d = Dnsmasq(tmp_path_factory.mktemp("fuzz-dns"))
    d.start()
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture(scope="module")
def ports() -> Iterator[dict[str, Any]]:
    """A listening port (binding it fails: start-up always ends) and a free one."""
    taken = socket.create_server(("127.0.0.1", 0))
    with socket.socket() as probe, socket.socket() as probe2:
        probe.bind(("127.0.0.1", 0))
        probe2.bind(("127.0.0.1", 0))
        free, free2 = probe.getsockname()[1], probe2.getsockname()[1]
    try:
        yield {"taken": taken.getsockname()[1], "free": free, "free2": free2}
    finally:
        taken.close()


def start_flags() -> dict[str, argparse.Action]:
    from etcdgw import cli

    return {
        opt: a
        for a in cli._start_parser()._actions
        for opt in a.option_strings
        if opt.startswith("--")
    }


# No control or line-separator characters: error messages quote a value as given (as the Go
# gateway does), so a value holding a line break would make any message two lines.
GARBAGE = st.text(st.characters(blacklist_categories=["Cs", "Cc", "Zl", "Zp"]), max_size=30)
# Garbage that cannot be a host:port, so it never becomes a DNS query of its own.
NO_COLON = st.text(
    st.characters(blacklist_categories=["Cs", "Cc", "Zl", "Zp"], blacklist_characters=":"),
    max_size=20,
)
DURATIONS = st.sampled_from(["1s", "1m0s", "300ms", "1.5h", "0", "0s", "-1s", "5", "1x", "", "s"])


def valid_values(flag: str, p: dict[str, Any], tmp: str) -> st.SearchStrategy[str]:
    """Values with which `start` gets as far as binding (a conflict between two is possible)."""
    free, free2 = p["free"], p["free2"]
    per_flag = {
        "--endpoints": ["127.0.0.1:2379", "localhost:2379,http://127.0.0.1:2380", "[::1]:1"],
        "--listen-addr": [f"127.0.0.1:{free}", f"[::1]:{free}", f"unix://{tmp}/ok.sock"],
        "--metrics-addr": ["", f"127.0.0.1:{free2}"],
        "--retry-delay": ["0", "1s", "1m0s"],
        "--discovery-srv": [""],
        "--discovery-srv-name": ["", "x"],
        "--discovery-dns": [""],
        "--config-file": [""],
        "--trusted-ca-file": [""],
        "--health-cert-file": [""],
        "--health-key-file": [""],
        "--health-check": ["tcp", "etcd", "none"],
        "--log-format": ["json", "text"],
        "--log-level": ["debug", "info", "warn", "error"],
        "--insecure-discovery": ["true", "false"],
        "--health-rise": ["1", "2"],
        "--health-fall": ["1", "3"],
        "--max-connections": ["0", "100"],
        "--listen-unix-mode": ["0600", "0660"],
    }
    return st.sampled_from(per_flag.get(flag, ["1s", "300ms", "1m0s", "2h"]))


def values(flag: str, p: dict[str, Any], dns: str, tmp: str) -> st.SearchStrategy[str]:
    """Realistic and broken values for one flag (and garbage for every flag)."""
    taken, free = p["taken"], p["free"]
    hosts = st.sampled_from(
        [
            "127.0.0.1",
            "[::1]",
            "localhost",
            "0.0.0.0",
            "[::]",
            "m1.etcd.test",
            "x.invalid",
            # IPv6 zones (RFC 6874's URL form and the plain one), odd hosts, userinfo
            "[fe80::1%25eth0]",
            "[fe80::1%25lo]",
            "[fe80::1%nosuchif0]",
            "[fe80::1%]",
            "[::1%25lo]",
            "a..b",
            "user:pw@127.0.0.1",
            "ex\u00e4mple.test",
        ]
    )
    port = st.sampled_from(["2379", "1", "0", "70000", "-1", "abc", "", str(taken), str(free)])
    scheme = st.sampled_from(["", "http://", "https://", "unix://", "ftp://"])
    endpoint = st.one_of(st.builds(lambda s, h, q: f"{s}{h}:{q}", scheme, hosts, port), NO_COLON)
    per_flag: dict[str, st.SearchStrategy[str]] = {
        "--endpoints": st.lists(endpoint, max_size=4).map(",".join),
        "--listen-addr": st.sampled_from(
            [
                f"127.0.0.1:{taken}",
                f"127.0.0.1:{free}",
                f"[::1]:{free}",
                f"localhost:{taken}",
                f"unix://{tmp}/gw.sock",
                "unix:///proc/nope/gw.sock",
                "127.0.0.1",
                "127.0.0.1:0",
                ":",
                "[::1",
            ]
        ),
        "--metrics-addr": st.sampled_from(
            ["", f"127.0.0.1:{taken}", f"127.0.0.1:{free}", "x", "127.0.0.1:99999"]
        ),
        "--discovery-srv": st.sampled_from(["etcd.test", "example.invalid", "", ".", "a..b"]),
        "--discovery-dns": st.sampled_from([dns, "x", "1.2.3.4:99999", "[::1", ""]),
        "--config-file": st.sampled_from(["/nonexistent.yaml", f"{tmp}/nope.yaml", ""]),
        "--trusted-ca-file": st.sampled_from(["", "/nonexistent/ca.pem", "/dev/null"]),
        "--health-cert-file": st.sampled_from(["", "/nonexistent.pem", "/dev/null"]),
        "--health-key-file": st.sampled_from(["", "/nonexistent.pem", "/dev/null"]),
        "--health-check": st.sampled_from(["tcp", "etcd", "none", "http"]),
        "--log-format": st.sampled_from(["json", "text", "xml"]),
        "--log-level": st.sampled_from(["debug", "info", "warn", "error", "trace"]),
        "--insecure-discovery": st.sampled_from(["true", "false", "1", "t", "maybe"]),
        "--health-rise": st.sampled_from(["1", "2", "0", "-3", "x"]),
        "--health-fall": st.sampled_from(["1", "3", "0", "x"]),
        "--max-connections": st.sampled_from(["0", "10", "-1", "1e3"]),
        "--listen-unix-mode": st.sampled_from(["0660", "0600", "999", "rw"]),
    }
    realistic = per_flag.get(flag, DURATIONS)
    if flag in ("--discovery-dns", "--discovery-srv", "--endpoints", "--listen-addr"):
        # Free text here could name a DNS server or host outside this machine.
        return realistic
    return st.one_of(realistic, GARBAGE)


@st.composite
def argvs(draw: st.DrawFn, p: dict[str, Any], dns: str, tmp: str) -> list[str]:
    flags = start_flags()
    names = sorted(flags)
    valid = draw(st.integers(0, 3)) == 0  # a quarter of the examples: only valid values
    tokens: list[list[str]] = []
    for _ in range(draw(st.integers(0, 6))):
        kind = "flag" if valid else draw(st.sampled_from(["flag"] * 3 + ["unknown", "positional"]))
        if kind == "unknown":
            tokens.append([draw(st.sampled_from(["--foo", "-x", "--endpoint", "--", "-"]))])
            continue
        if kind == "positional":
            tokens.append([draw(NO_COLON)])
            continue
        name = draw(st.sampled_from(names))
        if name in ("--help", "-h"):
            continue  # prints the whole help: not an error line; checked separately
        v = draw(valid_values(name, p, tmp) if valid else values(name, p, dns, tmp))
        form = draw(st.sampled_from(["=", " "] if valid else ["=", " ", "bare"]))
        tokens.append([f"{name}={v}"] if form == "=" else [name, v] if form == " " else [name])
    at = draw(st.integers(0, len(tokens)))  # `start` before, between or after the flags
    argv = [t for group in tokens[:at] for t in group] + ["start"]
    argv += [t for group in tokens[at:] for t in group]
    if not valid and not any(a.startswith("--discovery-dns") for a in argv):
        argv.append(f"--discovery-dns={dns}")  # names resolve here, not on the internet
    if not any(a.startswith("--listen-addr") for a in argv):
        # The default 127.0.0.1:23790 may be another test's: a port of ours instead (a
        # taken one ends start-up at bind).
        argv.append(f"--listen-addr=127.0.0.1:{p['free' if valid else 'taken']}")
    return argv


def run_main(argv: list[str]) -> tuple[int, str, str]:
    """cli.main(argv) in-process; the real start-up, but serving returns at once."""
    from etcdgw import app, cli

    async def no_serve(
        run: Running, reparse: Reparse | None = None, signals: StartupSignals | None = None
    ) -> None:
        # Start-up succeeded (listeners bound): that is as far as a fuzz example goes.
        run.gw.close_listeners()
        if run.metrics is not None:
            run.metrics.close()

    out, err = io.StringIO(), io.StringIO()
    real_serve = app.serve
    app.serve = no_serve
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(argv)
            except SystemExit as e:  # argparse's own exits (none expected: -h is not drawn)
                code = e.code if isinstance(e.code, int) else 1
    finally:
        app.serve = real_serve
    return code, out.getvalue(), err.getvalue()


def test_cli_fuzz(dns_server: Dnsmasq, ports: dict[str, Any], tmp_path: Path) -> None:
    """Random `etcdgw start` command lines: never a traceback, exit 0 or 1, and a failure
    says so in exactly one line; nothing stays open or bound."""
    seen = {0: 0, 1: 0}

    @settings(
        max_examples=CLI_EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(argv=argvs(ports, dns_server.addr, str(tmp_path)))
    def check(argv: list[str]) -> None:
        before = open_fds()
        t0 = time.monotonic()
        code, out, err = run_main(argv)
        took = time.monotonic() - t0
        text = out + err
        assert "Traceback" not in text, text
        assert code in (0, 1), (code, text)
        lines = error_lines(text)
        if code == 1:
            assert len(lines) == 1, f"{argv}: expected one error line, got {lines}"
            assert 0 < len(lines[0]) < 1000
        else:
            assert not lines, f"{argv}: exit 0 with non-log output {lines}"
        seen[code] += 1
        assert took < 15, f"{argv} took {took:.1f}s"
        leaked = open_fds() - before
        assert not leaked, f"{argv} left fds open: {sorted(leaked)}"

    check()
    # Both outcomes were exercised (a start-up that got as far as binding, and failures).
    assert seen[1] > 0 and seen[0] > 0, seen
    print(f"RELIABILITY cli-fuzz: examples={sum(seen.values())} exit0={seen[0]} exit1={seen[1]}")


def test_help_is_not_an_error() -> None:
    code, out, err = run_main(["start", "--help"])
    assert code == 0 and "usage:" in out and "Traceback" not in out + err


def test_engine_module_loaded(engine_module: ModuleType) -> None:
    """The compiled engine really is the compiled one (the properties above ran on it)."""
    if engine_module.__name__ == "etcdgw._relay":
        assert engine_module.__file__ is not None and engine_module.__file__.endswith(".so")


# ============================================================================================
# The config file

CONFIG_EXAMPLES = int(os.environ.get("ETCDGW_CONFIG_EXAMPLES", "80"))
CONFIG_MEMORY = 1 << 30  # RLIMIT_AS of each gateway: a file must not need more


def _config_keys() -> list[str]:
    from etcdgw.config import KEYS

    return [k.name for k in KEYS]


_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.sampled_from(
        ["0660", "0777", "0o660", "1:30", "yes", "~", "", "5s", "127.0.0.1:1", "a..b:1"]
    ),
    st.text(max_size=20),
)


def _nest(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=3)


# A def, not a multi-line lambda: hypothesis reads extend's source to check that it uses its
# argument, and cannot find a lambda's that spans lines (a HypothesisDeprecationWarning,
# an error under filterwarnings = error).
_VALUES = st.recursive(_SCALARS, _nest, max_leaves=6)


@st.composite
def config_files(draw: st.DrawFn) -> bytes:
    """A YAML mapping of (mostly real) keys to random values, a mutated one, or random bytes."""
    import yaml

    kind = draw(st.sampled_from(["yaml", "yaml", "mutated", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=400))
    keys = st.sampled_from(_config_keys()) | st.text(max_size=10)
    doc = draw(st.dictionaries(keys, _VALUES, max_size=5))
    text = yaml.safe_dump(doc, default_flow_style=draw(st.booleans()), allow_unicode=True)
    if kind == "mutated":
        at = draw(st.integers(0, len(text)))
        extra = draw(
            st.sampled_from(["&a ", "*a", "[", "{", ": ", "\n- ", "!!python/object ", "\t", "0660"])
            | st.text(max_size=5)
        )
        text = text[:at] + extra + text[at:]
    return text.encode()


def _limit_memory() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (CONFIG_MEMORY, CONFIG_MEMORY))


def test_config_file_fuzz(dns_server: Dnsmasq, ports: dict[str, Any], tmp_path: Path) -> None:
    """Random config files (YAML documents and bytes): never a traceback, always one line and
    exit 1 (the listen port is taken, so an accepted file ends at bind), within 10 s and
    1 GiB of address space."""
    import subprocess
    import sys

    from _gateway import engine_env

    env = engine_env("python" if os.environ.get("ETCDGW_NO_EXTENSIONS") else "cython")
    path = tmp_path / "fuzz.yaml"
    seen = {"accepted": 0, "refused": 0}

    @settings(
        max_examples=CONFIG_EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(data=config_files())
    def check(data: bytes) -> None:
        path.write_bytes(data)
        t0 = time.monotonic()
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "etcdgw",
                "start",
                f"--config-file={path}",
                f"--listen-addr=127.0.0.1:{ports['taken']}",
                f"--discovery-dns={dns_server.addr}",
            ],
            capture_output=True,
            text=True,
            errors="replace",
            timeout=30,
            env=env,
            stdin=subprocess.DEVNULL,
            preexec_fn=_limit_memory,
            check=False,
        )
        took = time.monotonic() - t0
        text = r.stdout + r.stderr
        assert "Traceback" not in text and "MemoryError" not in text, (data, text)
        assert r.returncode == 1, (data, r.returncode, text)
        lines = error_lines(text)
        assert len(lines) == 1 and 0 < len(lines[0]) < 1000, (data, lines)
        assert took < 10, f"{data!r} took {took:.1f}s"
        seen["accepted" if lines[0].startswith("listen tcp") else "refused"] += 1

    check()
    assert seen["refused"] > 0, seen
    print(f"RELIABILITY config-fuzz: examples={sum(seen.values())} {seen}")
