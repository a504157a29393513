"""The workloads: each drives load through one proxy for a bounded time and returns metrics."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import select
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backends import Backend
from procs import (
    Proc,
    established_on_ports,
    machine_busy_seconds,
    run,
    tree_cpu_seconds,
    tree_memory_kb,
    tree_pids,
    tree_user_seconds,
)

BENCH = Path(__file__).resolve().parent
RANGE_BODY = '{"key":"Zm9v"}'  # etcd JSON gateway: range over key "foo" (base64)
WRK_CONNS = 32
PACE_MS = 25  # per-connection pause after each response: 32 conns -> ~1,100 req/s offered
IDLE_LOW = 3000  # first idle level: within every proxy's fd needs under a 20,000 cap

Metrics = dict[str, Any]


@dataclass
class Settings:
    duration: float = 10.0  # measured seconds per cell
    warmup: float = 2.0  # unmeasured load first: connections open, caches and heaps warm
    idle_conns: int = 9000
    wrk_threads: int = 1  # one load thread: on 2 cores the proxy and backend need the other
    quick: bool = False


@dataclass
class Cell:
    """One proxy x workload x repetition: where to connect, and what to measure."""

    proxy: str
    port: int  # where clients connect (the proxy, or the first member for "direct")
    proc: Proc | None  # the proxy process tree, None for direct
    backend: Backend
    settings: Settings
    tmpdir: Path
    tag: str = ""  # unique per cell, for etcd keys


@dataclass
class Workload:
    name: str
    group: str  # which backend: "etcd", "http" or "iperf"
    run: Callable[[Cell], Metrics]
    reps: int | None = None  # None: the run's --reps
    full_only: bool = False  # skipped in --quick unless asked for by name


def _cpu(cell: Cell) -> float:
    return tree_cpu_seconds(cell.proc.pid) if cell.proc is not None else 0.0


def _user(cell: Cell) -> float:
    return tree_user_seconds(cell.proc.pid) if cell.proc is not None else 0.0


def _measure(cell: Cell, fn: Callable[[], Metrics]) -> Metrics:
    """Run fn with the proxy tree's and the whole machine's CPU time sampled just before and
    just after."""
    user0, cpu0, busy0, t0 = _user(cell), _cpu(cell), machine_busy_seconds(), time.monotonic()
    out = fn()
    cpu1, busy1, t1, user1 = _cpu(cell), machine_busy_seconds(), time.monotonic(), _user(cell)
    out["wall_s"] = round(t1 - t0, 3)
    out["proxy_cpu_s"] = round(cpu1 - cpu0, 3) if cell.proc is not None else None
    out["proxy_user_s"] = round(user1 - user0, 3) if cell.proc is not None else None
    out["machine_cpu_s"] = round(busy1 - busy0, 3)
    if cell.proc is not None and not cell.proc.alive():
        raise RuntimeError(f"{cell.proxy} died during the run:\n{cell.proc.tail()}")
    return out


# -- wrk ------------------------------------------------------------------------------------


def wrk(
    url: str, seconds: float, threads: int, env_extra: dict[str, str], conns: int = WRK_CONNS
) -> Metrics:
    env = {**os.environ, **env_extra}
    argv = [
        "wrk",
        f"-t{threads}",
        f"-c{conns}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "5s",
        "-s",
        str(BENCH / "wrk.lua"),
        url,
    ]
    out = run(argv, timeout=seconds + 30, env=env)
    m = re.search(r"^WRK_JSON (.*)$", out, re.M)
    if not m:
        raise RuntimeError(f"wrk printed no summary:\n{out[-800:]}")
    data: Metrics = json.loads(m.group(1))
    return data


def _wrk_cell(cell: Cell, path: str, env_extra: dict[str, str], per: str) -> Metrics:
    s = cell.settings
    url = f"http://127.0.0.1:{cell.port}{path}"
    if s.warmup > 0:
        wrk(url, s.warmup, s.wrk_threads, env_extra)
    res = _measure(cell, lambda: wrk(url, s.duration, s.wrk_threads, env_extra))
    n = res["requests"]
    secs = res["duration_us"] / 1e6
    errors = sum(res["errors"].values())
    out: Metrics = {
        "requests": n,
        "rate": round(n / secs, 1) if secs else 0.0,
        "p50_ms": res["latency_us"]["p50"] / 1000,
        "p99_ms": res["latency_us"]["p99"] / 1000,
        "errors": errors,
        "wall_s": res["wall_s"],
        "proxy_cpu_s": res["proxy_cpu_s"],
        "proxy_user_s": res["proxy_user_s"],
        "machine_cpu_s": res["machine_cpu_s"],
    }
    if res["proxy_cpu_s"] is not None and n:
        out[f"cpu_us_per_{per}"] = round(res["proxy_cpu_s"] * 1e6 / n, 1)
        out[f"user_us_per_{per}"] = round(res["proxy_user_s"] * 1e6 / n, 1)
    if n:
        out[f"machine_us_per_{per}"] = round(res["machine_cpu_s"] * 1e6 / n, 1)
    if n == 0 or errors > n // 100:
        raise RuntimeError(f"wrk: {n} requests, errors {res['errors']}")
    return out


def rr_etcd(cell: Cell) -> Metrics:
    return _wrk_cell(cell, "/v3/kv/range", {"WRK_BODY": RANGE_BODY}, "req")


def rr_etcd_paced(cell: Cell) -> Metrics:
    return _wrk_cell(
        cell, "/v3/kv/range", {"WRK_BODY": RANGE_BODY, "WRK_DELAY_MS": str(PACE_MS)}, "req"
    )


def rr_cheap(cell: Cell) -> Metrics:
    return _wrk_cell(cell, "/v3/kv/range", {"WRK_BODY": RANGE_BODY}, "req")


def churn(cell: Cell) -> Metrics:
    # wrk reconnects after every "Connection: close" response: one TCP connection per request.
    return _wrk_cell(cell, "/", {"WRK_CLOSE": "1"}, "conn")


# -- bulk (iperf3) --------------------------------------------------------------------------


def _iperf(cell: Cell, reverse: bool) -> Metrics:
    secs = max(1, round(cell.settings.duration))
    argv = ["iperf3", "-c", "127.0.0.1", "-p", str(cell.port), "-t", str(secs), "-J"]
    if reverse:
        argv.append("-R")

    def go() -> Metrics:
        out = run(argv, timeout=secs + 30)
        try:
            data = json.loads(out[out.index("{") :])
        except ValueError as exc:
            raise RuntimeError(f"iperf3 output not JSON: {out[-500:]}") from exc
        if "error" in data:
            raise RuntimeError(f"iperf3: {data['error']}")
        recv = data["end"]["sum_received"]
        return {"bytes": int(recv["bytes"]), "gbit_s": round(recv["bits_per_second"] / 1e9, 2)}

    res = _measure(cell, go)
    cpu = res["proxy_cpu_s"]
    if res["bytes"]:
        res["machine_ms_per_gb"] = round(res["machine_cpu_s"] * 1e3 / (res["bytes"] / 1e9), 1)
    if cpu is not None and res["bytes"]:
        gb = res["bytes"] / 1e9
        res["gb_per_cpu_s"] = round(gb / cpu, 2) if cpu > 0 else None
        res["cpu_us_per_gb"] = round(cpu * 1e6 / gb, 0)
        res["cpu_ms_per_gb"] = round(cpu * 1e3 / gb, 1)
    return res


def bulk_up(cell: Cell) -> Metrics:
    return _iperf(cell, reverse=False)


def bulk_down(cell: Cell) -> Metrics:
    return _iperf(cell, reverse=True)


# -- idle connections -----------------------------------------------------------------------


def _open_connections(port: int, n: int, deadline: float) -> tuple[list[socket.socket], int]:
    """Open n TCP connections to port, in batches so no listen backlog overflows."""
    socks: list[socket.socket] = []
    failed = 0
    batch = 100
    while len(socks) + failed < n and time.monotonic() < deadline:
        pending: dict[int, socket.socket] = {}
        for _ in range(min(batch, n - len(socks) - failed)):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            rc = s.connect_ex(("127.0.0.1", port))
            if rc in (0, errno.EINPROGRESS):
                pending[s.fileno()] = s
            else:
                s.close()
                failed += 1
        poller = select.poll()
        for fd in pending:
            poller.register(fd, select.POLLOUT)
        while pending and time.monotonic() < deadline:
            for fd, _ in poller.poll(200):
                s = pending.pop(fd)
                poller.unregister(fd)
                if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    socks.append(s)
                else:
                    s.close()
                    failed += 1
        for s in pending.values():
            s.close()
            failed += 1
    return socks, failed


class PartialResult(RuntimeError):
    """A cell that failed part-way but measured something worth reporting."""

    def __init__(self, message: str, metrics: Metrics) -> None:
        super().__init__(message)
        self.metrics = metrics


def _fd_count(root: int) -> int:
    total = 0
    for pid in tree_pids(root):
        with contextlib.suppress(OSError):
            total += len(os.listdir(f"/proc/{pid}/fd"))
    return total


def idle(cell: Cell) -> Metrics:
    """Hold idle connections through the proxy; memory and fds per connection.

    Measured at two levels: IDLE_LOW connections (which every proxy can hold under a 20,000
    fd cap: the Go gateway needs 6 fds per connection, its two sockets plus a splice pipe
    pair per direction) and then the full count."""
    n = cell.settings.idle_conns
    ports = {int(ep.rsplit(":", 1)[1]) for ep in cell.backend.endpoints}
    held_before = established_on_ports(ports)
    time.sleep(1.0)  # a just-started runtime (Go, CPython) is still settling its heap
    pid = cell.proc.pid if cell.proc else None
    mem0 = tree_memory_kb(pid) if pid else None
    fds0 = _fd_count(pid) if pid else 0
    cpu0, t0 = _cpu(cell), time.monotonic()
    deadline = t0 + 60 + n / 500
    socks: list[socket.socket] = []
    out: Metrics = {"conns": 0}
    if mem0:
        out["pss_before_kb"] = mem0["pss_kb"]
    try:
        for step in sorted({min(IDLE_LOW, n), n}):
            new, failed = _open_connections(cell.port, step - len(socks), deadline)
            socks += new
            # Memory is read once every connection reached the backend (the proxy has both
            # fds) and lazy allocations (buffers, goroutine stacks) settled.
            held = 0
            while time.monotonic() < deadline:
                held = established_on_ports(ports) - held_before
                if held >= len(socks) or (cell.proc and not cell.proc.alive()):
                    break
                time.sleep(0.2)
            time.sleep(1.0)
            if cell.proc is not None and not cell.proc.alive():
                why = " (too many open files)" if "too many open files" in cell.proc.tail(5) else ""
                raise PartialResult(
                    f"exited (code {cell.proc.popen.returncode}){why} between {out['conns']:,} "
                    f"and {step:,} connections",
                    out,
                )
            alive = sum(1 for s in socks if _still_open(s))
            if failed or held < len(socks) or alive < len(socks) or len(socks) < step:
                raise PartialResult(
                    f"at {step:,}: {len(socks):,} connected ({failed} failed), {held:,} reached "
                    f"the backend, {alive:,} still open",
                    out,
                )
            out["conns"] = len(socks)
            out["open_s"] = round(time.monotonic() - t0, 2)
            out["proxy_cpu_s"] = round(_cpu(cell) - cpu0, 3) if pid else None
            if pid and mem0:
                mem = tree_memory_kb(pid)
                per_conn = {k: (mem[k] - mem0[k]) / len(socks) for k in mem0}
                # Keys without a suffix: the full count; "_low": the first level (both when
                # the full count is the first level).
                for suffix in ("_low", "") if step == min(IDLE_LOW, n) else ("",):
                    out["kb_per_conn" + suffix] = round(per_conn["pss_anon_kb"], 2)
                    out["pss_kb_per_conn" + suffix] = round(per_conn["pss_kb"], 2)
                    out["rss_kb_per_conn" + suffix] = round(per_conn["rss_kb"], 2)
                    out["fds_per_conn" + suffix] = round((_fd_count(pid) - fds0) / len(socks), 2)
                    out["pss_after_kb" + suffix] = mem["pss_kb"]
    finally:
        for s in socks:
            s.close()
    return out


def _still_open(s: socket.socket) -> bool:
    try:
        data = s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return True  # nothing to read and no EOF: the connection is up
    except OSError:
        return False
    return bool(data)


# -- gRPC (etcdctl) -------------------------------------------------------------------------


def _etcdctl(port: int, *args: str, timeout: float = 10) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ETCD_", "ETCDCTL_"))}
    env["ETCDCTL_API"] = "3"
    argv = [
        "etcdctl",
        f"--endpoints=127.0.0.1:{port}",
        "--dial-timeout=3s",
        f"--command-timeout={max(1, int(timeout) - 2)}s",
        *args,
    ]
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL
    )


def grpc(cell: Cell) -> Metrics:
    """etcdctl put / get / watch through the proxy: pass or fail, with the reason."""
    key = f"/etcdgw-bench/{cell.tag}"
    t0 = time.monotonic()

    def fail(step: str, r: subprocess.CompletedProcess[str] | str) -> Metrics:
        text = r if isinstance(r, str) else (r.stdout + r.stderr)
        return {
            "pass": False,
            "detail": f"{step}: {text.strip()[-300:]}",
            "wall_s": round(time.monotonic() - t0, 2),
        }

    r = _etcdctl(cell.port, "put", key, "v1", "-w", "json")
    if r.returncode != 0:
        return fail("put", r)
    rev = int(json.loads(r.stdout)["header"]["revision"])
    r = _etcdctl(cell.port, "get", key, "--print-value-only")
    if r.returncode != 0 or r.stdout.strip() != "v1":
        return fail("get", r)
    # Watch from the next revision, so the event is seen even if the put wins the race.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ETCD_", "ETCDCTL_"))}
    watch = subprocess.Popen(
        [
            "etcdctl",
            f"--endpoints=127.0.0.1:{cell.port}",
            "--dial-timeout=3s",
            "watch",
            key,
            f"--rev={rev + 1}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
    )
    try:
        r = _etcdctl(cell.port, "put", key, "v2")
        if r.returncode != 0:
            return fail("put (for watch)", r)
        got = _read_until(watch, "v2", timeout=10)
        if "v2" not in got.split():
            return fail("watch", got or "no event within 10s")
    finally:
        watch.terminate()
        try:
            watch.wait(5)
        except subprocess.TimeoutExpired:
            watch.kill()
            watch.wait(5)
        if watch.stdout is not None:
            watch.stdout.close()
    _etcdctl(cell.port, "del", key)
    return {"pass": True, "detail": "put, get, watch ok", "wall_s": round(time.monotonic() - t0, 2)}


def _read_until(proc: subprocess.Popen[bytes], token: str, timeout: float) -> str:
    assert proc.stdout is not None
    buf = b""
    deadline = time.monotonic() + timeout
    fd = proc.stdout.fileno()
    while time.monotonic() < deadline and token.encode() not in buf.split():
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            buf += chunk
    return buf.decode(errors="replace")


def grpc_perf(cell: Cell) -> Metrics:
    """`etcdctl check perf --load=s` through the proxy: 60 s of gRPC puts from 50 clients at
    150 writes/s (a fixed duration in etcd 3.4; it has no flag to shorten it)."""
    prefix = f"/etcdgw-bench-perf/{cell.tag}/"

    def go() -> Metrics:
        with contextlib.suppress(subprocess.TimeoutExpired):
            r = _etcdctl(cell.port, "check", "perf", "--load=s", f"--prefix={prefix}", timeout=120)
            text = r.stdout + r.stderr
            return {"text": text, "rc": r.returncode}
        return {"text": "timed out after 120s", "rc": 124}

    res = _measure(cell, go)
    text = res.pop("text")
    out: Metrics = {"pass": res.pop("rc") == 0 and "FAIL" not in text, **res}
    if m := re.search(r"Throughput is (\d+) writes/s", text):
        out["rate"] = int(m.group(1))
    if m := re.search(r"Slowest request took ([\d.]+)s", text):
        out["slowest_ms"] = round(float(m.group(1)) * 1000, 1)
    if m := re.search(r"Stddev is ([\d.]+)s", text):
        out["stddev_ms"] = round(float(m.group(1)) * 1000, 1)
    if out.get("rate") and res["proxy_cpu_s"] is not None:
        writes = out["rate"] * 60
        out["cpu_us_per_req"] = round(res["proxy_cpu_s"] * 1e6 / writes, 1)
    if not out["pass"]:
        out["detail"] = text.strip()[-300:]
    return out


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in [
        Workload("rr-etcd", "etcd", rr_etcd),
        Workload("rr-etcd-paced", "etcd", rr_etcd_paced),
        Workload("rr-cheap", "http", rr_cheap),
        Workload("churn", "http", churn),
        Workload("bulk-up", "iperf", bulk_up),
        Workload("bulk-down", "iperf", bulk_down),
        Workload("idle", "http", idle),
        Workload("grpc", "etcd", grpc),
        Workload("grpc-perf", "etcd", grpc_perf, reps=1, full_only=True),
    ]
}
