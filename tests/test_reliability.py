"""Reliability and security of `etcdgw start` under load, faults and bad input (both engines)."""

# Every test drives the real gateway process (the `gateway` fixture, once per relay engine)
# against real backends: small echo/stream servers in their own processes (so their fds do
# not count against this one), a real etcd cluster, and a backend inside a network namespace
# of our own. Figures (memory per connection, detection times) are printed as
# `RELIABILITY <scenario> key=value ...` lines (`pytest -s` shows them) and, when
# ETCDGW_RELIABILITY_OUT names a file, appended to it as JSON lines; RELIABILITY.md quotes
# them. Scenarios longer than CI allows are marked `slow` and run only with `-m slow` (or
# ETCDGW_SLOW=1).

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import json
import os
import random
import re
import resource
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from _dns import Dnsmasq, SrvHost
from _etcd import EtcdCluster, etcdctl, spawn
from _gateway import (
    GatewayProc,
    TagServer,
    connect,
    engine_env,
    free_tcp_port,
    log_time,
    read_line,
    wait_for,
)
from _gateway import error_lines as text_error_lines

Start = Callable[..., GatewayProc]

# --------------------------------------------------------------------------------------------
# Small tools: process figures, reporting, limits


def report(scenario: str, **figures: Any) -> None:
    """Print a measured figure (and append it to $ETCDGW_RELIABILITY_OUT when set)."""
    print(f"RELIABILITY {scenario}: " + " ".join(f"{k}={v}" for k, v in figures.items()))
    out = os.environ.get("ETCDGW_RELIABILITY_OUT")
    if out:
        with open(out, "a", encoding="utf-8") as f:
            f.write(json.dumps({"scenario": scenario, **figures}) + "\n")


def proc_mem(pid: int) -> dict[str, int]:
    """Rss and Pss of a process in bytes (/proc/PID/smaps_rollup)."""
    mem: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
        for line in f:
            parts = line.split()
            if parts and parts[0] in ("Rss:", "Pss:"):
                mem[parts[0][:-1]] = int(parts[1]) * 1024
    return mem


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds a process has used (/proc/PID/stat utime + stime)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def socket_fds(pid: int) -> int:
    """How many of a process's fds are sockets (pooled splice pipes are not counted)."""
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # closed between listdir and readlink
            n += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
    return n


def raise_nofile() -> int:
    """Raise this process's soft RLIMIT_NOFILE to the hard limit (children inherit it)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def nofile_limit(pid: int) -> tuple[int, int]:
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    return soft, hard


# --------------------------------------------------------------------------------------------
# Backends in their own process

# Run with `python -c`: echo (after an optional tag line), or a deterministic stream of
# 64 KiB chunks (chunk i = its index as 8 big-endian bytes + a seeded random block) then
# close. asyncio with flow control, so a stalled peer stops the writer instead of buffering.
BACKEND_SRC = r"""
import argparse, asyncio, random, resource, struct

CHUNK = 65536


class Echo(asyncio.Protocol):
    def __init__(self, tag):
        self.tag = tag

    def connection_made(self, t):
        self.t = t
        if self.tag:
            t.write(self.tag)

    def data_received(self, data):
        self.t.write(data)

    def pause_writing(self):
        self.t.pause_reading()

    def resume_writing(self):
        self.t.resume_reading()


class Stream(asyncio.Protocol):
    def __init__(self, base, n):
        self.base, self.n, self.i, self.paused, self.closed = base, n, 0, False, False

    def connection_made(self, t):
        self.t = t
        self.pump()

    def pump(self):
        while not self.paused and not self.closed and self.i < self.n:
            self.t.write(struct.pack(">Q", self.i) + self.base[8:])
            self.i += 1
        if self.i >= self.n and not self.closed:
            self.closed = True
            self.t.close()

    def pause_writing(self):
        self.paused = True

    def resume_writing(self):
        # Not pump() here: a close() from inside resume_writing makes 3.11's transport
        # call connection_lost twice.
        self.paused = False
        asyncio.get_running_loop().call_soon(self.pump)

    def data_received(self, data):
        pass

    def connection_lost(self, exc):
        self.closed = True


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--tag", default="")
    p.add_argument("--stream-chunks", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    loop = asyncio.get_running_loop()
    tag = (a.tag + "\n").encode() if a.tag else b""
    base = random.Random(a.seed).randbytes(CHUNK)
    if a.stream_chunks:
        factory = lambda: Stream(base, a.stream_chunks)
    else:
        factory = lambda: Echo(tag)
    srv = await loop.create_server(factory, a.host, a.port, backlog=4096)
    print("PORT", srv.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()


asyncio.run(main())
"""

CHUNK = 65536


def stream_chunk(base: bytes, i: int) -> bytes:
    return struct.pack(">Q", i) + base[8:]


def stream_base(seed: int) -> bytes:
    return random.Random(seed).randbytes(CHUNK)


class Backend:
    """An echo or stream server in a child process (optionally inside a network namespace).

    The child dies with this process (PDEATHSIG) and is stopped by its PID.
    """

    def __init__(
        self,
        *,
        tag: str = "",
        stream_chunks: int = 0,
        seed: int = 0,
        host: str = "127.0.0.1",
        prefix: Sequence[str] = (),
    ) -> None:
        argv = [*prefix, sys.executable, "-c", BACKEND_SRC, "--host", host]
        if tag:
            argv += ["--tag", tag]
        if stream_chunks:
            argv += ["--stream-chunks", str(stream_chunks), "--seed", str(seed)]
        self.host = host
        self.proc = spawn(argv, stdout=subprocess.PIPE, env=dict(os.environ))
        assert self.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        try:
            ready = sel.select(30)
        finally:
            sel.close()
        line = self.proc.stdout.readline().decode() if ready else ""
        if not line.startswith("PORT "):
            self.kill()
            raise AssertionError(f"backend did not start: {line!r} (argv {argv[:4]}...)")
        self.port = int(line.split()[1])

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    def kill(self) -> None:
        """SIGKILL by PID (a crash) and reap; idempotent."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


# --------------------------------------------------------------------------------------------
# Clients


def exchange(socks: Sequence[socket.socket], tokens: Sequence[bytes], timeout: float) -> None:
    """Each non-blocking socket sends its token and must read exactly it back (an echo).

    All at once through one epoll set; AssertionError naming how many did not finish.
    """
    sel = selectors.DefaultSelector()
    state: dict[int, list[Any]] = {}
    for s, tok in zip(socks, tokens, strict=True):
        state[s.fileno()] = [s, tok, 0, bytearray()]
        sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE)
    deadline = time.monotonic() + timeout
    bad: list[str] = []
    try:
        while state and time.monotonic() < deadline:
            for key, ev in sel.select(0.5):
                st = state.get(key.fd)
                if st is None:
                    continue
                s, tok, sent, got = st
                if ev & selectors.EVENT_WRITE and sent < len(tok):
                    with contextlib.suppress(BlockingIOError):
                        st[2] += s.send(tok[sent:])
                    if st[2] == len(tok):
                        sel.modify(s, selectors.EVENT_READ)
                if ev & selectors.EVENT_READ:
                    try:
                        data = s.recv(4096)
                    except BlockingIOError:
                        continue
                    except OSError as e:
                        data, bad = b"", [*bad, f"{tok!r}: {e}"]
                    got += data
                    if not data or len(got) >= len(tok):
                        if bytes(got) != tok:
                            bad.append(f"{tok!r}: got {bytes(got[:64])!r}")
                        sel.unregister(s)
                        del state[key.fd]
    finally:
        sel.close()
    assert not bad, f"{len(bad)} wrong answers, e.g. {bad[:3]}"
    assert not state, f"{len(state)} of {len(socks)} clients got no answer within {timeout}s"


def open_clients(port: int, n: int, *, batch: int = 500, tag: str = "c") -> list[socket.socket]:
    """n live client connections, each proven by an echoed unique token; in batches so the
    listen backlog (SOMAXCONN) never overflows into SYN retransmits."""
    socks: list[socket.socket] = []
    try:
        for start in range(0, n, batch):
            new = []
            for _ in range(start, min(n, start + batch)):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                new.append(s)
                s.setblocking(False)
                err = s.connect_ex(("127.0.0.1", port))
                assert err in (0, errno.EINPROGRESS), os.strerror(err)
            socks += new
            exchange(new, [b"%s-%08d\n" % (tag.encode(), start + i) for i in range(len(new))], 60)
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


def read_all(s: socket.socket, timeout: float) -> tuple[bytes, BaseException | None]:
    """Read until EOF or an error, within timeout; (bytes, the error if one ended it)."""
    s.settimeout(timeout)
    chunks = []
    try:
        while d := s.recv(1 << 20):
            chunks.append(d)
    except OSError as e:
        return b"".join(chunks), e
    return b"".join(chunks), None


def sent_then_ended(s: socket.socket, limit: float) -> tuple[float, str]:
    """Keep sending on s until the connection ends; (seconds it took, how it ended)."""
    s.setblocking(False)
    t0 = time.monotonic()
    block = b"x" * 65536
    while time.monotonic() - t0 < limit:
        try:
            s.send(block)
            continue
        except BlockingIOError:
            pass
        except OSError as e:
            return time.monotonic() - t0, errno.errorcode.get(e.errno or 0, str(e))
        time.sleep(0.05)
        try:
            if s.recv(65536, socket.MSG_PEEK) == b"":
                return time.monotonic() - t0, "EOF"
        except BlockingIOError:
            pass
        except OSError as e:
            return time.monotonic() - t0, errno.errorcode.get(e.errno or 0, str(e))
    return time.monotonic() - t0, "still open"


def is_open(s: socket.socket) -> bool:
    """True if nothing (no EOF, no error) arrived on an idle connection."""
    s.setblocking(False)
    try:
        return s.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------
# etcd over raw HTTP (grpc-gateway): we own the socket, so we see exactly when it ends


def http_post(s: socket.socket, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """One keep-alive HTTP/1.1 request on an open socket; the decoded JSON answer."""
    raw = json.dumps(body or {}).encode()
    s.sendall(
        f"POST {path} HTTP/1.1\r\nHost: etcd\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(raw)}\r\n\r\n".encode()
        + raw
    )
    buf = b""
    while b"\r\n\r\n" not in buf:
        d = s.recv(65536)
        assert d, f"connection closed mid-response: {buf!r}"
        buf += d
    head, _, rest = buf.partition(b"\r\n\r\n")
    m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    assert m, head
    n = int(m.group(1))
    while len(rest) < n:
        d = s.recv(65536)
        assert d, "connection closed mid-body"
        rest += d
    doc: dict[str, Any] = json.loads(rest[:n])
    return doc


def member_ids(cluster: EtcdCluster) -> dict[int, int]:
    """etcd member id -> member index."""
    out = {}
    for i, m in enumerate(cluster.members):
        r = etcdctl(m.endpoint, "endpoint", "status", "-w", "json")
        out[int(json.loads(r.stdout)[0]["Status"]["header"]["member_id"])] = i
    return out


def member_of(s: socket.socket, ids: dict[int, int]) -> int:
    """Which member answers on this (gateway) connection."""
    return ids[int(http_post(s, "/v3/maintenance/status")["header"]["member_id"])]


class HttpWatch:
    """A watch over the grpc-gateway's streaming POST /v3/watch on a socket we own."""

    def __init__(self, port: int, key: str) -> None:
        self.sock = connect(port)
        body = json.dumps({"create_request": {"key": base64.b64encode(key.encode()).decode()}})
        self.sock.sendall(
            f"POST /v3/watch HTTP/1.1\r\nHost: etcd\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
        )
        self.raw = b""
        created = self.wait(rb'"created":true')
        m = re.search(rb'"member_id":"(\d+)"', created)
        assert m, created
        self.member_id = int(m.group(1))

    def wait(self, pattern: bytes, timeout: float = 15.0) -> bytes:
        """Read until the stream holds pattern; return what was read so far."""
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.raw):
            left = deadline - time.monotonic()
            assert left > 0, f"watch stream has no {pattern!r} after {timeout}s: {self.raw!r}"
            self.sock.settimeout(left)
            d = self.sock.recv(65536)
            assert d, f"watch stream ended: {self.raw[-300:]!r}"
            self.raw += d
        return self.raw

    def close(self) -> None:
        self.sock.close()


# ============================================================================================
# Load


def test_9000_concurrent_connections_each_answered_memory_bounded(
    gateway: Start, relay_impl: str
) -> None:
    """9,000 clients at once, each echoes a unique token (twice); gateway PSS per idle
    connection within the performance budget; every socket released afterwards."""
    n = 9000
    hard = raise_nofile()
    assert hard >= 2 * n + 1000, f"RLIMIT_NOFILE hard limit {hard} too low for {n} connections"
    port = free_tcp_port()
    with Backend() as backend:
        g = gateway(f"--endpoints={backend.addr}", f"--listen-addr=127.0.0.1:{port}")
        # The gateway inherited our raised soft limit; make sure (2 fds per connection).
        resource.prlimit(g.pid, resource.RLIMIT_NOFILE, (hard, hard))
        assert nofile_limit(g.pid)[0] >= 2 * n + 100
        base_socks = socket_fds(g.pid)
        # Warm up code paths and allocator arenas, so the baseline is the steady state.
        for s in open_clients(port, 200, tag="warm"):
            s.close()
        wait_for(lambda: socket_fds(g.pid) == base_socks, 30)
        time.sleep(0.3)
        base = proc_mem(g.pid)
        t0 = time.monotonic()
        socks = open_clients(port, n, tag="a")
        try:
            t_open = time.monotonic() - t0
            assert socket_fds(g.pid) == base_socks + 2 * n
            time.sleep(0.5)
            mem = proc_mem(g.pid)
            per_pss = (mem["Pss"] - base["Pss"]) / n
            per_rss = (mem["Rss"] - base["Rss"]) / n
            # All 9,000 at once a second time: every connection is live at the same moment.
            t1 = time.monotonic()
            exchange(socks, [b"b-%08d-%s\n" % (i, relay_impl.encode()) for i in range(n)], 120)
            t_round = time.monotonic() - t1
        finally:
            for s in socks:
                s.close()
        wait_for(lambda: socket_fds(g.pid) == base_socks, 60, 0.1)
        report(
            f"load-{relay_impl}",
            connections=n,
            open_s=round(t_open, 2),
            second_round_s=round(t_round, 2),
            pss_base_kib=base["Pss"] // 1024,
            pss_loaded_kib=mem["Pss"] // 1024,
            pss_per_conn_b=round(per_pss),
            rss_per_conn_b=round(per_rss),
        )
        # Budgets (docs): <= 3 KB per idle connection (Cython), <= ~11 KB (Python).
        budget = 3 * 1024 if relay_impl == "cython" else 11 * 1024
        assert per_pss <= budget, f"{per_pss:.0f} B of PSS per idle connection > {budget}"
        assert g.proc.poll() is None


def slow_reader(g: GatewayProc, port: int, chunks: int, seed: int, stalls: int) -> dict[str, Any]:
    """Read a stream through the gateway with `stalls` pauses of 3 s; check RSS and bytes."""
    base = stream_base(seed)
    want = hashlib.sha256()
    for i in range(chunks):
        want.update(stream_chunk(base, i))
    rss0 = proc_mem(g.pid)["Rss"]
    got = hashlib.sha256()
    total, peak, stall_cpu = 0, rss0, 0.0
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    size = chunks * CHUNK
    stall_at = [size * (k + 1) // (stalls + 1) for k in range(stalls)]
    stall_at[0] = min(stall_at[0], 1 << 20)
    t0 = time.monotonic()
    with connect(port, timeout=60) as s:
        while True:
            if stall_at and total >= stall_at[0]:
                stall_at.pop(0)
                # The client stops reading while the backend keeps writing: the gateway must
                # stop reading too (bounded buffers), and not spin while it waits.
                c0 = proc_cpu(g.pid)
                for _ in range(30):
                    time.sleep(0.1)
                    peak = max(peak, proc_mem(g.pid)["Rss"])
                stall_cpu = max(stall_cpu, proc_cpu(g.pid) - c0)
            k = s.recv_into(buf)
            if not k:
                break
            got.update(view[:k])
            total += k
    elapsed = time.monotonic() - t0
    assert total == size, f"received {total} of {size} bytes"
    assert got.digest() == want.digest(), "stream corrupted"
    return {
        "bytes": total,
        "rss_growth_kib": (peak - rss0) // 1024,
        "stall_cpu_s": round(stall_cpu, 3),
        "seconds": round(elapsed, 1),
    }


@pytest.mark.parametrize(
    ("gib", "stalls"),
    [pytest.param(1, 1, id="1GiB"), pytest.param(4, 4, id="4GiB-4stalls", marks=pytest.mark.slow)],
)
def test_slow_reader_bounded_memory_bytes_intact(
    gateway: Start, relay_impl: str, gib: int, stalls: int
) -> None:
    """A client that stops reading while the backend streams: gateway RSS grows < 10 MiB,
    no CPU spin while stalled, and every byte arrives intact once it reads again."""
    chunks = gib * (1 << 30) // CHUNK
    port = free_tcp_port()
    with Backend(stream_chunks=chunks, seed=gib) as backend:
        g = gateway(f"--endpoints={backend.addr}", f"--listen-addr=127.0.0.1:{port}")
        fig = slow_reader(g, port, chunks, gib, stalls)
    report(f"slow-reader-{relay_impl}", **fig)
    assert fig["rss_growth_kib"] < 10 * 1024
    assert fig["stall_cpu_s"] < 0.5


# ============================================================================================
# Faults


def test_member_sigkilled_mid_watch(
    gateway: Start, relay_impl: str, etcd_cluster_fn: EtcdCluster
) -> None:
    """A member SIGKILLed under live watch streams: its stream ends at once, the watches on
    the other members see later writes, and new clients are served by the survivors."""
    cluster = etcd_cluster_fn
    ids = member_ids(cluster)
    port = free_tcp_port()
    g = gateway(
        "--endpoints=" + ",".join(cluster.endpoints),
        f"--listen-addr=127.0.0.1:{port}",
        "--drain-timeout=2s",
    )
    key = f"kill-{relay_impl}"
    watches = [HttpWatch(port, key) for _ in range(3)]
    try:
        on = {ids[w.member_id]: w for w in watches}
        assert sorted(on) == [0, 1, 2], "round-robin should spread 3 watches over 3 members"
        victim = (cluster.leader() + 1) % 3  # a follower: no election to wait for
        cluster.kill(victim)
        t0 = time.monotonic()
        data, err = read_all(on[victim].sock, timeout=10)
        ended = time.monotonic() - t0
        assert ended < 5, f"the watch on the killed member hung for {ended:.1f}s"
        # New clients: the dead member is skipped (one failed dial, then deactivated).
        for i in range(4):
            r = etcdctl(f"127.0.0.1:{port}", "put", key, f"v{i}", timeout=20)
            assert r.returncode == 0, r.stderr
        g.wait_log("deactivated endpoint", address=cluster.members[victim].endpoint)
        # The watches on the survivors never noticed.
        last = base64.b64encode(b"v3")
        for i, w in on.items():
            if i != victim:
                w.wait(re.escape(last))
        report(
            f"sigkill-watch-{relay_impl}",
            stream_end_s=round(ended, 3),
            ended_by=type(err).__name__ if err else "EOF",
        )
    finally:
        for w in watches:
            w.close()


def stream_prefix_ok(data: bytes, base: bytes) -> bool:
    """data is an intact prefix of the backend's chunk stream."""
    for i in range(0, len(data), CHUNK):
        piece = data[i : i + CHUNK]
        if piece != stream_chunk(base, i // CHUNK)[: len(piece)]:
            return False
    return True


def test_backend_sigkilled_mid_transfer(gateway: Start, relay_impl: str) -> None:
    """The backend of a large transfer is SIGKILLed: that client's stream ends promptly with
    an intact prefix; another live connection and new clients are not disturbed."""
    port = free_tcp_port()
    with Backend(stream_chunks=1 << 16, seed=3) as streamer, Backend(tag="echo") as echo:
        g = gateway(
            f"--endpoints={streamer.addr},{echo.addr}",
            f"--listen-addr=127.0.0.1:{port}",
            "--drain-timeout=2s",
        )
        base_socks = socket_fds(g.pid)
        victim = connect(port)
        first = b""
        while len(first) < 8 << 20:
            first += victim.recv(1 << 20)
        live = connect(port)
        assert read_line(live) == b"echo\n"
        streamer.kill()
        t0 = time.monotonic()
        rest, err = read_all(victim, timeout=10)
        ended = time.monotonic() - t0
        victim.close()
        assert ended < 5, f"client of the killed backend hung for {ended:.1f}s"
        assert stream_prefix_ok(first + rest, stream_base(3))
        assert len(first + rest) < (1 << 16) * CHUNK
        live.sendall(b"still here\n")
        assert read_line(live) == b"still here\n"
        with connect(port) as new:  # picked onto the dead backend, moved on
            assert read_line(new) == b"echo\n"
        g.wait_log("deactivated endpoint", address=streamer.addr)
        live.close()
        wait_for(lambda: socket_fds(g.pid) == base_socks, 15)
    report(
        f"sigkill-transfer-{relay_impl}",
        bytes_before_kill=len(first),
        stream_end_s=round(ended, 3),
        ended_by=type(err).__name__ if err else "EOF",
    )


def test_member_sigstopped(gateway: Start, relay_impl: str, etcd_cluster_fn: EtcdCluster) -> None:
    """A frozen (SIGSTOP) member: a connection with data in flight to it is ended by
    TCP_USER_TIMEOUT (--tcp-keepalive=1s: ~4 s); --health-check=etcd takes it out for new
    clients; connections to the other members keep working."""
    cluster = etcd_cluster_fn
    ids = member_ids(cluster)
    port = free_tcp_port()
    g = gateway(
        "--endpoints=" + ",".join(cluster.endpoints),
        f"--listen-addr=127.0.0.1:{port}",
        "--tcp-keepalive=1s",
        "--dial-timeout=2s",  # also the health check's timeout: room for a busy machine
        "--health-check=etcd",
        "--health-interval=300ms",
        "--health-fall=1",
        "--health-rise=1",
        "--drain-timeout=2s",
    )
    conns: list[socket.socket] = []
    victim = (cluster.leader() + 1) % 3  # a follower: the cluster keeps its leader
    stopped = False
    try:
        # Round-robin: two connections per member after six; a few more if a health check
        # on a busy machine briefly took a member out.
        by_member: dict[int, list[socket.socket]] = {0: [], 1: [], 2: []}
        for _ in range(15):
            conns.append(connect(port))
            by_member[member_of(conns[-1], ids)].append(conns[-1])
            if len(by_member[victim]) >= 2 and all(by_member.values()):
                break
        assert len(by_member[victim]) >= 2 and all(by_member.values()), by_member
        pusher, idle = by_member[victim][:2]
        cluster.sigstop(victim)
        stopped = True
        t0, wall0 = time.monotonic(), time.time()
        took, how = sent_then_ended(pusher, limit=30)
        assert how != "still open" and took < 12, f"pushing connection: {how} after {took:.1f}s"
        rec = g.wait_log("endpoint unhealthy", timeout=15, address=cluster.members[victim].endpoint)
        unhealthy = log_time(rec) - wall0
        for _ in range(6):
            with connect(port) as s:
                assert member_of(s, ids) != victim
        for i, socks in by_member.items():
            if i != victim:
                for s in socks:
                    assert member_of(s, ids) == i
        # An idle connection to a frozen process is not ended: its kernel still answers
        # keepalive probes. Recorded, not asserted (etcd clients' own gRPC keepalive ends it).
        report(
            f"sigstop-{relay_impl}",
            pushing_conn_ended_s=round(took, 2),
            ended_by=how,
            unhealthy_after_s=round(unhealthy, 2),
            idle_conn_open=is_open(idle),
            idle_for_s=round(time.monotonic() - t0, 1),
            health_error=rec.get("error"),
        )
    finally:
        if stopped:
            cluster.sigcont(victim)
        for s in conns:
            s.close()


@pytest.mark.slow
def test_frozen_backend_client_gone_pair_released(gateway: Start, relay_impl: str) -> None:
    """A client leaves a connection to a frozen backend: the gateway passes the half-close
    on and waits for the backend's side; the pair is still released, once the client's
    kernel drops its orphaned socket (tcp_fin_timeout) and the next keepalive probe gets a
    RST."""
    fin_timeout = int(Path("/proc/sys/net/ipv4/tcp_fin_timeout").read_text())
    port = free_tcp_port()
    with Backend(tag="frozen") as backend:
        g = gateway(
            f"--endpoints={backend.addr}",
            f"--listen-addr=127.0.0.1:{port}",
            "--tcp-keepalive=1s",
            "--drain-timeout=1s",
        )
        base = socket_fds(g.pid)
        s = connect(port)
        assert read_line(s) == b"frozen\n"
        os.kill(backend.pid, signal.SIGSTOP)
        try:
            s.close()
            t0 = time.monotonic()
            wait_for(lambda: socket_fds(g.pid) == base, fin_timeout + 60, 0.5)
            released = time.monotonic() - t0
        finally:
            os.kill(backend.pid, signal.SIGCONT)
    report(
        f"frozen-client-gone-{relay_impl}",
        tcp_fin_timeout=fin_timeout,
        released_s=round(released, 1),
    )
    assert released < fin_timeout + 15


# --- network namespace: a member behind a veth link that goes down --------------------------


class Netns:
    """A network namespace of our own, joined to this one by a veth pair on a private /30.

    The /30 is derived from our PID (10.213.X.Y), so concurrent runs do not collide; only
    addresses inside it are ever dialled. `close()` deletes link and namespace.
    """

    def __init__(self, tag: str) -> None:
        if os.geteuid() != 0:
            pytest.fail("the network-namespace scenario needs root (ip netns add)", pytrace=False)
        uid = f"{os.getpid() % 100000}{tag}"
        self.name = f"etcdgw-{uid}"
        self.host_if, self.ns_if = f"egh{uid}"[:15], f"egn{uid}"[:15]
        block = (os.getpid() * 7 + len(tag) * 131 + ord(tag[0])) % 16384
        a, b = 10, 213
        third, fourth = block // 64, (block % 64) * 4
        self.host_ip = f"{a}.{b}.{third}.{fourth + 1}"
        self.ns_ip = f"{a}.{b}.{third}.{fourth + 2}"
        self._made: list[str] = []
        try:
            self._ip("netns", "add", self.name)
            self._made.append("netns")
            self._ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
            self._made.append("link")
            self._ip("link", "set", self.ns_if, "netns", self.name)
            self._ip("addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
            self._ip("link", "set", self.host_if, "up")
            self.exec_ip("addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if)
            self.exec_ip("link", "set", self.ns_if, "up")
            self.exec_ip("link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _ip(*args: str) -> None:
        r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20, check=False)
        if r.returncode != 0:
            pytest.fail(
                f"`ip {' '.join(args)}` failed (exit {r.returncode}): {r.stderr.strip()}; the "
                "network-namespace scenario needs `ip netns` and veth links",
                pytrace=False,
            )

    def exec_ip(self, *args: str) -> None:
        self._ip("netns", "exec", self.name, "ip", *args)

    @property
    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def route_dev(self) -> str:
        r = subprocess.run(
            ["ip", "route", "get", self.ns_ip], capture_output=True, text=True, timeout=10
        )
        m = re.search(r"\bdev (\S+)", r.stdout)
        return m.group(1) if m else r.stdout + r.stderr

    def close(self) -> None:
        if "link" in self._made:
            subprocess.run(["ip", "link", "del", self.host_if], capture_output=True, timeout=20)
        if "netns" in self._made:
            subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=20)
        self._made = []


def test_member_behind_netns_link_down(gateway: Start, relay_impl: str) -> None:
    """A backend in our own namespace loses its link (silently: no RST, no ICMP): new
    clients fail over after --dial-timeout; the idle connection to it is ended by keepalive
    within a bounded time; the connection to the other backend is untouched."""
    ns = Netns(relay_impl[0])
    try:
        with (
            Backend(tag="ns", host=ns.ns_ip, prefix=ns.prefix) as inside,
            Backend(tag="local") as local,
        ):
            port = free_tcp_port()
            g = gateway(
                f"--endpoints={inside.addr},{local.addr}",
                f"--listen-addr=127.0.0.1:{port}",
                "--tcp-keepalive=1s",
                "--dial-timeout=1s",
                "--drain-timeout=2s",
            )
            a = connect(port)
            assert read_line(a) == b"ns\n"
            b = connect(port)
            assert read_line(b) == b"local\n"
            ns.exec_ip("link", "set", ns.ns_if, "down")
            # The host side keeps its route (carrier lost): packets vanish, none go elsewhere.
            assert ns.route_dev() == ns.host_if, ns.route_dev()
            t0 = time.monotonic()
            with connect(port) as c:  # picked onto the dead link: dial times out, moves on
                assert read_line(c) == b"local\n"
            failover = time.monotonic() - t0
            assert 0.8 <= failover < 4, f"failover took {failover:.2f}s with --dial-timeout=1s"
            rec = g.wait_log("deactivated endpoint", address=inside.addr)
            assert "i/o timeout" in rec["error"]
            with connect(port) as d:  # the endpoint is inactive now: no wait at all
                t1 = time.monotonic()
                assert read_line(d) == b"local\n"
                assert time.monotonic() - t1 < 1
            _, err = read_all(a, timeout=20)
            detected = time.monotonic() - t0
            a.close()
            # keepalive 1 s x 3 probes, TCP_USER_TIMEOUT 4 s: about 5 s after the link died.
            assert detected < 12, f"idle connection over the dead link lived {detected:.1f}s"
            b.sendall(b"fine\n")
            assert read_line(b) == b"fine\n"
            b.close()
            report(
                f"netns-link-down-{relay_impl}",
                failover_s=round(failover, 2),
                idle_conn_ended_s=round(detected, 2),
                ended_by=type(err).__name__ if err else "EOF",
            )
    finally:
        ns.close()


# --- file descriptors run out ---------------------------------------------------------------


def knock(port: int, clients: Sequence[socket.socket], within: float) -> dict[str, int]:
    """How each client fares through a tag backend: served, closed, or hung past `within`."""
    outcome = {"served": 0, "closed": 0, "hung": 0}
    t0 = time.monotonic()
    for s in clients:
        s.settimeout(max(0.1, t0 + within - time.monotonic()))
        try:
            outcome["served" if read_line(s) == b"t\n" else "closed"] += 1
        except TimeoutError:
            outcome["hung"] += 1
        except OSError:
            outcome["closed"] += 1
    return outcome


def test_fd_exhaustion_no_spin_clients_closed_then_recovers(
    gateway: Start, relay_impl: str
) -> None:
    """Under a soft RLIMIT_NOFILE of 64 (and 65: the other parity, so both the accept and
    the upstream socket() run out): the gateway keeps running without spinning, clients
    beyond the limit are closed within ~1 s (not left hanging), and it serves normally once
    fds are free again. (The Go gateway exits 0 on the first EMFILE from Accept.)"""
    port = free_tcp_port()
    shortage = ("accept failed; pausing accept", "no endpoint available; closed client connection")
    with TagServer("t") as backend:
        g = gateway(
            f"--endpoints={backend.addr}",
            f"--listen-addr=127.0.0.1:{port}",
            "--drain-timeout=2s",
        )
        _, hard = nofile_limit(g.pid)
        base_socks = socket_fds(g.pid)
        for limit in (64, 65):
            resource.prlimit(g.pid, resource.RLIMIT_NOFILE, (limit, hard))
            clients = [connect(port) for _ in range(60)]
            try:
                outcome = knock(port, clients, within=5)
                # Saturated, with a client knocking every 0.1 s: running, not spinning.
                c0, w0 = proc_cpu(g.pid), time.monotonic()
                late = []
                while time.monotonic() - w0 < 3:
                    late.append(connect(port))
                    time.sleep(0.1)
                late_outcome = knock(port, late, within=3)
                for s in late:
                    s.close()
                cpu = proc_cpu(g.pid) - c0
                wall = time.monotonic() - w0
                assert g.proc.poll() is None, "the gateway exited on EMFILE"
                assert any(m in shortage for m in g.messages()), g.lines[-5:]
                report(
                    f"emfile-{relay_impl}-nofile{limit}",
                    clients=len(clients),
                    **outcome,
                    late_clients=len(late),
                    late_served=late_outcome["served"],
                    late_hung=late_outcome["hung"],
                    cpu_s=round(cpu, 3),
                    wall_s=round(wall, 1),
                )
                assert cpu < 0.5, f"{cpu:.2f}s CPU in {wall:.1f}s while out of fds: spinning"
                assert outcome["served"] >= 20, outcome
                assert outcome["hung"] == 0, f"clients beyond the fd limit left hanging: {outcome}"
                assert late_outcome["hung"] == 0, late_outcome
            finally:
                for s in clients:
                    s.close()

            # Descriptors free again: back to normal, without a restart.
            def served() -> bool:
                try:
                    with connect(port, timeout=2) as s:
                        return read_line(s) == b"t\n"
                except OSError:
                    return False

            wait_for(served, 10, 0.2)
            more = [connect(port) for _ in range(20)]
            try:
                assert knock(port, more, within=10)["served"] == 20
            finally:
                for s in more:
                    s.close()
            wait_for(lambda: socket_fds(g.pid) == base_socks, 15)


def test_soak_script_smoke(relay_impl: str, tmp_path: Path) -> None:
    """bench/soak.py (`make soak`) in miniature: mixed traffic, one member killed and
    restarted, no unexpected error, no fd or socket growth, watches complete."""
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run(
        [
            sys.executable,
            str(root / "bench" / "soak.py"),
            "--seconds=10",
            "--kill-every=4",
            "--down-for=2",
            f"--engine={relay_impl}",
            f"--out={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env=engine_env(relay_impl),
        check=False,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (result,) = tmp_path.glob(f"soak-{relay_impl}-*.json")
    summary = json.loads(result.read_text())
    assert summary["result"] == "pass" and summary["faults"] >= 1, summary
    report(
        f"soak-smoke-{relay_impl}",
        requests=sum(summary["requests_ok"].values()),
        faults=summary["faults"],
        fault_errors=sum(summary["errors_in_fault_windows"].values()),
    )


# ============================================================================================
# Bad input


def run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "etcdgw", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=engine_env("cython"),
        stdin=subprocess.DEVNULL,
        check=False,
    )


def error_lines(r: subprocess.CompletedProcess[str]) -> list[str]:
    """Output lines that are not log records nor the usage hint."""
    return text_error_lines(r.stdout + r.stderr)


def assert_one_clear_line(r: subprocess.CompletedProcess[str], text: str) -> None:
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stdout + r.stderr, r.stderr
    lines = error_lines(r)
    assert len(lines) == 1 and text in lines[0], (lines, r.stdout, r.stderr)


# Cases tests/test_cli.py does not cover yet (it has --foo, --retry-delay=123, h:0, :70000,
# https://127.0.0.1, --endpoints=, localhost->default listen, 0.0.0.0 listen, address in
# use, unix path in a missing directory). {P} is a free port.
BAD_INVOCATIONS = [
    (["--no-such-flag=1"], "Error: unknown flag: --no-such-flag"),
    ([""], 'Error: unexpected argument ""'),  # was an IndexError traceback
    (["garbage"], 'Error: unexpected argument "garbage"'),
    (["--dial-timeout=5"], 'invalid argument "5" for "--dial-timeout" flag: time: missing unit'),
    (["--tcp-keepalive=1x"], 'time: unknown unit "x" in duration "1x"'),
    (["--listen-addr=127.0.0.1:0"], "failed to validate listen address: 127.0.0.1:0"),
    (["--listen-addr=127.0.0.1:70000"], "failed to validate listen address: 127.0.0.1:70000"),
    (["--endpoints=,"], 'error parsing endpoint ""'),
    (["--endpoints=https://"], 'error parsing endpoint "https://"'),
    (
        [
            "--listen-addr=127.0.0.1:{P}",
            "--health-check=etcd",
            "--trusted-ca-file=/nonexistent/ca.pem",
        ],
        "failed to load trusted CA file /nonexistent/ca.pem",
    ),
    (["--listen-addr=unix:///sys/etcdgw.sock"], "listen unix /sys/etcdgw.sock: bind:"),
    (
        ["--listen-addr=127.0.0.1:{P}", "--endpoints=127.0.0.1:{P}"],
        "should not resolve to the gateway listen addr (127.0.0.1:{P})",
    ),
    (
        ["--listen-addr=127.0.0.1:{P}", "--endpoints=localhost:{P}"],
        "(localhost:{P}->127.0.0.1:{P}) should not resolve to the gateway listen addr",
    ),
    (
        ["--listen-addr=[::1]:{P}", "--endpoints=[::1]:{P}"],
        "should not resolve to the gateway listen addr ([::1]:{P})",
    ),
    (
        ["--listen-addr=127.0.0.1:{P}", "--endpoints=0.0.0.0:{P}"],
        "(0.0.0.0:{P}->0.0.0.0:{P}) should not resolve to the gateway listen addr",
    ),
    (
        ["--listen-addr=[::1]:{P}", "--endpoints=[::]:{P}"],
        "should not resolve to the gateway listen addr ([::1]:{P})",
    ),
    (
        ["--listen-addr=:{P}", "--endpoints=[::1]:{P}"],
        "should not resolve to the gateway listen addr (:{P})",
    ),
    (
        ["--listen-addr=localhost:{P}", "--endpoints=127.0.0.1:{P}"],
        "should not resolve to the gateway listen addr (localhost:{P})",
    ),
]


@pytest.mark.parametrize(
    ("args", "text"), BAD_INVOCATIONS, ids=[" ".join(a) for a, _ in BAD_INVOCATIONS]
)
def test_bad_invocation_one_clear_line(args: list[str], text: str) -> None:
    port = str(free_tcp_port())
    r = run_cli("start", *(a.replace("{P}", port) for a in args))
    assert_one_clear_line(r, text.replace("{P}", port))


def test_unknown_flag_with_a_value_named_as_pflag_does() -> None:
    """pflag names the flag without its value: `Error: unknown flag: --no-such-flag`."""
    r = run_cli("start", "--no-such-flag=1")
    assert_one_clear_line(r, "unknown flag")
    assert error_lines(r) == ["Error: unknown flag: --no-such-flag"]


def test_discovery_with_unreadable_ca_file(dnsmasq: Dnsmasq) -> None:
    """--discovery-srv with a CA file that cannot be read: one line, exit 1 (the Go gateway
    loads it and never uses it)."""
    dnsmasq.restart(
        srv=[SrvHost("_etcd-client-ssl._tcp.etcd.test", "m1.etcd.test", 2379)],
        hosts={"m1.etcd.test": ["127.0.0.1"]},
    )
    r = run_cli(
        "start",
        "--discovery-srv=etcd.test",
        f"--discovery-dns={dnsmasq.addr}",
        "--trusted-ca-file=/nonexistent/ca.pem",
        f"--listen-addr=127.0.0.1:{free_tcp_port()}",
    )
    assert_one_clear_line(r, "/nonexistent/ca.pem")


def garbage_payloads(rng: random.Random) -> list[bytes]:
    return [
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + rng.randbytes(200),  # an HTTP/2 preface
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + rng.randbytes(500),  # a ClientHello
        b"GET /%s HTTP/1.1\r\nHost: x\r\n\r\n" % (b"A" * 5000),
        b"\x00" * 3000,
        b"\xff" * 100 + b"\r\n" * 50,
        rng.randbytes(70000),
    ]


def test_bad_clients_do_not_disturb_a_long_transfer(gateway: Start, relay_impl: str) -> None:
    """Clients that send nothing, send garbage, close at once or reset, 300 of each, while
    one long transfer runs: it stays byte-exact, garbage is relayed untouched (never
    parsed), and every socket is released."""
    port = free_tcp_port()
    rng = random.Random(11)
    payload = rng.randbytes(96 << 20)
    with Backend(tag="e") as backend:
        g = gateway(
            f"--endpoints={backend.addr}",
            f"--listen-addr=127.0.0.1:{port}",
            "--drain-timeout=2s",
        )
        base_socks = socket_fds(g.pid)
        result: dict[str, Any] = {}
        bad_done = threading.Event()

        def send(s: socket.socket) -> None:
            # The last MiB waits for the bad clients: the transfer spans their whole run.
            for i in range(0, len(payload), 1 << 20):
                if i + (1 << 20) >= len(payload):
                    bad_done.wait(120)
                s.sendall(payload[i : i + (1 << 20)])
            s.shutdown(socket.SHUT_WR)

        def transfer() -> None:
            s = connect(port, timeout=120)
            try:
                assert read_line(s) == b"e\n"
                sender = threading.Thread(target=send, args=(s,))
                sender.start()
                got, err = read_all(s, timeout=150)
                sender.join(10)
                result.update(digest=hashlib.sha256(got).digest(), len=len(got), err=err)
            finally:
                s.close()

        t = threading.Thread(target=transfer)
        t.start()
        counts = dict.fromkeys(("silent", "garbage", "echoed-garbage", "closed", "reset"), 0)
        silent: list[socket.socket] = []
        try:
            for _ in range(15):
                assert t.is_alive(), "the long transfer ended early"
                for _ in range(20):
                    silent.append(connect(port))
                    counts["silent"] += 1
                for data in garbage_payloads(rng):
                    with connect(port) as s:
                        s.sendall(data)
                        counts["garbage"] += 1
                with connect(port) as s:  # garbage read back: relayed as is, never parsed
                    data = rng.randbytes(4096) + b"\r\n\r\n\x00\xff"
                    s.sendall(data)
                    s.shutdown(socket.SHUT_WR)
                    echoed, _ = read_all(s, 15)
                    assert echoed == b"e\n" + data
                    counts["echoed-garbage"] += 1
                for _ in range(20):
                    connect(port).close()
                    counts["closed"] += 1
                for _ in range(20):
                    s = connect(port)
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    s.close()  # RST
                    counts["reset"] += 1
        finally:
            bad_done.set()
            t.join(150)
            for s in silent:
                s.close()
        assert not t.is_alive(), "the long transfer did not finish"
        assert result["err"] is None, result["err"]
        assert result["len"] == len(payload)
        assert result["digest"] == hashlib.sha256(payload).digest()
        wait_for(lambda: socket_fds(g.pid) == base_socks, 30, 0.1)
        with connect(port) as s:
            assert read_line(s) == b"e\n"
        assert not [r for r in g.records() if r.get("level") == "error"], g.lines[-20:]
    report(f"bad-clients-{relay_impl}", transfer_bytes=len(payload), **counts)


# ============================================================================================
# Security


def test_non_loopback_listen_warns(gateway: Start) -> None:
    """0.0.0.0 and the all-addresses form warn that clients are not authenticated; a
    loopback listener does not."""
    msg = "listening on a non-loopback address; etcdgw does not authenticate clients"
    dead = f"127.0.0.1:{free_tcp_port()}"
    for listen in (f"0.0.0.0:{free_tcp_port('0.0.0.0')}", f":{free_tcp_port('0.0.0.0')}"):
        g = gateway(f"--endpoints={dead}", f"--listen-addr={listen}", "--drain-timeout=1s")
        rec = g.wait_log(msg)
        assert rec["level"] == "warn" and rec["address"] == listen
        assert g.stop() == 0
    g = gateway(f"--endpoints={dead}", f"--listen-addr=127.0.0.1:{free_tcp_port()}")
    assert msg not in g.messages()


def test_no_secret_in_logs(
    gateway: Start, relay_impl: str, etcd_tls_cluster: EtcdCluster, tmp_path: Path
) -> None:
    """TLS health checks with a client key, debug logging, traffic and failing checks: the
    key's PEM body never reaches stderr or stdout."""
    cluster = etcd_tls_cluster
    cert = cluster.ca.issue_cert("etcdgw-health.test", common_name="etcdgw-health")
    cert_file, key_file = tmp_path / "health.pem", tmp_path / "health-key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    secret_lines = [
        ln
        for ln in key_file.read_text().splitlines()
        if ln and not ln.startswith("-----") and len(ln) >= 16
    ]
    assert secret_lines
    port = free_tcp_port()
    with TagServer("not-tls") as plain:
        g = gateway(
            "--endpoints=" + ",".join([*cluster.client_urls, f"https://{plain.addr}"]),
            f"--listen-addr=127.0.0.1:{port}",
            "--health-check=etcd",
            "--health-interval=200ms",
            "--health-fall=1",
            f"--trusted-ca-file={cluster.ca_file}",
            f"--health-cert-file={cert_file}",
            f"--health-key-file={key_file}",
            "--log-level=debug",
            "--drain-timeout=1s",
        )
        # The plain endpoint fails its TLS checks (error paths log the most).
        g.wait_log("endpoint unhealthy", address=plain.addr)
        for i in range(3):
            r = etcdctl(f"127.0.0.1:{port}", "put", "secret-test", str(i), cluster=cluster)
            assert r.returncode == 0, r.stderr
        g.wait_log("connection closed")  # the relay thread reports within 50 ms
        # The members' checks passed (they demand the client certificate): the key was used.
        unhealthy = {r.get("address") for r in g.records() if r["msg"] == "endpoint unhealthy"}
        assert unhealthy == {plain.addr}, unhealthy
        assert g.stop() == 0
    text = "\n".join(g.lines) + g.stdout
    for ln in secret_lines:
        assert ln not in text, "a line of the private key reached the log"
    assert "PRIVATE KEY" not in text
