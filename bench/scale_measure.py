"""What one point of the scaling run measures (bench/scale.py): the load generator
(bench/loadgen.c) run for a bounded time, the proxy's CPU and memory around it, the kernel's
socket memory, and a group of processes holding connections."""

from __future__ import annotations

import contextlib
import json
import math
import os
import select
import shutil
import socket
import struct
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from procs import CLK_TCK, machine_busy_seconds, tree_memory_kb, tree_pids
from scale_stats import Hist, latency_us, per_unit, saturated

BENCH = Path(__file__).resolve().parent
HOLD_PER_PROC = 16_000  # connections one holding process takes: under a 20,000 fd cap
# Slab caches only sockets use (the TCP socket, its inode, its epoll entries). Left out: a
# socket's file and dentry (filp, dentry: ~0.4 KB per socket, but every file of every process
# moves them) and tw_sock_TCP (TIME_WAIT an earlier cell left drains during the next one).
SOCKET_SLABS = ("TCP", "TCPv6", "sock_inode_cache", "eventpoll_epi", "eventpoll_pwq")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024

Metrics = dict[str, Any]


def build_loadgen(outdir: Path) -> Path:
    """Compile bench/loadgen.c (a fraction of a second) into outdir."""
    exe = outdir / "bench-loadgen"
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise RuntimeError("no C compiler (apt-get install gcc)")
    res = subprocess.run(
        [cc, "-O2", "-Wall", "-o", str(exe), str(BENCH / "loadgen.c"), "-lm"],
        timeout=60,
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        raise RuntimeError(f"building bench/loadgen.c failed:\n{res.stderr[-2000:]}")
    return exe


# -- CPU of a process tree, precisely --------------------------------------------------------

# The user/system split. /proc/PID/stat's utime and stime are the tick samples scaled by the
# task's *cumulative* ratio (the kernel's cputime_adjust), so over a short window a process
# with a user-heavy history (CPython's imports at start) has most of the window's time called
# user, whatever it did. taskstats (netlink) returns the raw samples (task_cputime: whole
# ticks, 4 ms at HZ=250) and the exact runtime (cpu_run_virtual_total) of each thread, so a
# window's split is the share of its own samples. /proc is the fall-back.
_TS_GET, _TS_ATTR_PID, _TS_AGGR_PID, _TS_STATS = 1, 1, 4, 3
# Offsets in struct taskstats (linux/taskstats.h): cpu_run_virtual_total is the thread's
# exact runtime (se.sum_exec_runtime, ns; cpu_run_real_total is only utime + stime), and
# ac_utime, ac_stime the raw tick samples (µs).
_TS_RUNTIME, _TS_UTIME = 72, 152


class Taskstats:
    """A generic-netlink socket asking the kernel for one thread's taskstats."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 16)  # NETLINK_GENERIC
        self.sock.bind((0, 0))
        self.sock.settimeout(2.0)
        self.seq = 0
        self.family = self._family()

    def _request(self, msg_type: int, payload: bytes) -> bytes:
        self.seq += 1
        self.sock.send(struct.pack("IHHII", 16 + len(payload), msg_type, 1, self.seq, 0) + payload)
        data = self.sock.recv(65536)
        if struct.unpack_from("H", data, 4)[0] == 2:  # NLMSG_ERROR
            err = -struct.unpack_from("i", data, 16)[0]
            raise OSError(err, f"taskstats: {os.strerror(err)}")
        return data

    def _family(self) -> int:
        name = b"TASKSTATS\0"
        attr = struct.pack("HH", 4 + len(name), 2) + name  # CTRL_ATTR_FAMILY_NAME
        attr += b"\0" * (-len(attr) % 4)
        data = self._request(0x10, struct.pack("BBH", 3, 1, 0) + attr)  # CTRL_CMD_GETFAMILY
        for atype, value in _attrs(data, 20, len(data)):
            if atype == 1:  # CTRL_ATTR_FAMILY_ID
                return int(struct.unpack_from("H", value)[0])
        raise OSError("taskstats: no family id")

    def thread(self, tid: int) -> tuple[int, int, int]:
        """(runtime ns, user µs, system µs) of one thread; the last two are tick samples."""
        attr = struct.pack("HHI", 8, _TS_ATTR_PID, tid)
        data = self._request(self.family, struct.pack("BBH", _TS_GET, 1, 0) + attr)
        for atype, value in _attrs(data, 20, len(data)):
            if atype == _TS_AGGR_PID:
                for itype, st in _attrs(value, 0, len(value)):
                    if itype == _TS_STATS:
                        run = struct.unpack_from("Q", st, _TS_RUNTIME)[0]
                        ut, stime = struct.unpack_from("QQ", st, _TS_UTIME)
                        return int(run), int(ut), int(stime)
        raise OSError(f"taskstats: no statistics for thread {tid}")

    def close(self) -> None:
        self.sock.close()


def _attrs(data: bytes, off: int, end: int) -> list[tuple[int, bytes]]:
    out = []
    while off + 4 <= end:
        alen, atype = struct.unpack_from("HH", data, off)
        if alen < 4:
            break
        out.append((atype & 0x3FFF, data[off + 4 : off + alen]))
        off += (alen + 3) & ~3
    return out


_taskstats: Taskstats | None = None
_taskstats_failed = False


def taskstats() -> Taskstats | None:
    """The shared taskstats socket; None (and /proc from then on) when the kernel has none."""
    global _taskstats, _taskstats_failed
    if _taskstats is None and not _taskstats_failed:
        try:
            _taskstats = Taskstats()
        except OSError:
            _taskstats_failed = True
    return _taskstats


@dataclass(frozen=True)
class Snap:
    """CPU of the proxy's tree at one moment: the exact runtime of every live thread (ns),
    the user and system tick samples (µs; see Taskstats), the process totals of
    /proc/PID/stat (ticks, including threads that exited), the machine's busy time, and the
    wall clock."""

    t: float
    run_ns: int
    user_us: int
    sys_us: int
    proc_ticks: int
    machine_s: float
    method: str  # "taskstats" or "proc" (schedstat and the scaled /proc/PID/stat split)


def _threads(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


def _schedstat_ns(pid: int, tid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def _ticks(path: str) -> tuple[int, int]:
    """(user, system) ticks of a /proc stat file: utime+cutime, stime+cstime."""
    try:
        raw = Path(path).read_text()
    except OSError:
        return 0, 0
    f = raw[raw.rindex(")") + 2 :].split()
    return int(f[11]) + int(f[13]), int(f[12]) + int(f[14])


def snap(pids: list[int]) -> Snap:
    ts = taskstats()
    run_ns = user = sys_ = proc_ticks = 0
    method = "taskstats" if ts is not None else "proc"
    for pid in pids:
        u, s_ = _ticks(f"/proc/{pid}/stat")
        proc_ticks += u + s_
        for tid in _threads(pid):
            if method == "taskstats" and ts is not None:
                try:
                    r, ut, st = ts.thread(tid)
                except OSError:
                    continue  # the thread exited meanwhile
                run_ns, user, sys_ = run_ns + r, user + ut, sys_ + st
            else:
                run_ns += _schedstat_ns(pid, tid)
                tu, tsys = _ticks(f"/proc/{pid}/task/{tid}/stat")
                user, sys_ = user + tu * 10**6 // CLK_TCK, sys_ + tsys * 10**6 // CLK_TCK
    return Snap(time.monotonic(), run_ns, user, sys_, proc_ticks, machine_busy_seconds(), method)


def cpu_between(a: Snap, b: Snap) -> Metrics:
    """The proxy tree's CPU seconds between two snapshots: exact total, and its user part
    (the window's share of user tick samples: ~4 ms ticks, so coarse over a short window)."""
    total = (b.run_ns - a.run_ns) / 1e9
    # Threads that exited during the window are only in the process totals: take the larger.
    proc_total = (b.proc_ticks - a.proc_ticks) / CLK_TCK
    if proc_total > total + 2 / CLK_TCK:
        total = proc_total
    du, ds = b.user_us - a.user_us, b.sys_us - a.sys_us
    user = total * du / (du + ds) if du + ds > 0 else 0.0
    return {
        "cpu_s": round(total, 6),
        "user_s": round(user, 6),
        "cpu_sampled_s": round((du + ds) / 1e6, 3),  # the tick samples behind the split
        "wall_s": round(b.t - a.t, 4),
        "machine_cpu_s": round(b.machine_s - a.machine_s, 3),
        "cpu_method": b.method,
    }


# -- the kernel's share ---------------------------------------------------------------------


def kernel_memory_kb() -> dict[str, float]:
    """Socket slab objects (SOCKET_SLABS, active objects x object size) and TCP buffer memory
    (/proc/net/sockstat "TCP ... mem", pages), in KiB, and live TCP sockets of this network
    namespace. The slab and mem figures are machine-wide: read them on an idle machine."""
    out = {"slab_kb": 0.0, "tcp_mem_kb": 0.0, "tcp_inuse": 0.0}
    with contextlib.suppress(OSError):
        for line in Path("/proc/slabinfo").read_text().splitlines()[2:]:
            f = line.split()
            if f and f[0] in SOCKET_SLABS:
                out["slab_kb"] += int(f[1]) * int(f[3]) / 1024
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/sockstat").read_text().splitlines():
            if line.startswith("TCP:"):
                f = line.split()
                vals = dict(zip(f[1::2], f[2::2], strict=False))
                out["tcp_mem_kb"] = int(vals.get("mem", 0)) * PAGE_KB
                out["tcp_inuse"] = int(vals.get("inuse", 0))
    return out


def tcp_inuse() -> int:
    return int(kernel_memory_kb()["tcp_inuse"])


def nofile_soft(pid: int) -> int | None:
    """The soft RLIMIT_NOFILE of a process (from /proc/PID/limits)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                return int(line.split()[3])
    return None


def fd_count(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += len(os.listdir(f"/proc/{pid}/fd"))
    return total


# -- reading a child's lines with a deadline ------------------------------------------------


class Lines:
    """Line reader over a child's stdout that never blocks past a deadline."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.fd = stream.fileno()
        self.buf = b""
        self.eof = False

    def next(self, deadline: float) -> str | None:
        """The next line (without the newline); None at EOF or when the deadline passed."""
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if self.eof or left <= 0:
                return None
            ready, _, _ = select.select([self.fd], [], [], min(left, 0.5))
            if ready:
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    self.eof = True
                self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode(errors="replace")


def _stop(p: subprocess.Popen[bytes]) -> None:
    if p.poll() is None:
        p.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        p.wait(5)


# -- one paced load-generator run -----------------------------------------------------------


@dataclass
class Load:
    mode: str  # "rr" (kept-alive requests) or "churn" (a new connection per request)
    port: int
    rate: float
    duration: float
    warmup: float = 0.5
    conns: int = 32
    srcs: tuple[str, ...] = ()
    drain: float = 1.0

    def argv(self, exe: Path) -> list[str]:
        argv = [str(exe), self.mode, f"127.0.0.1:{self.port}", "--rate", f"{self.rate:g}"]
        argv += ["--duration", f"{self.duration:g}", "--warmup", f"{self.warmup:g}"]
        argv += ["--conns", str(self.conns), "--drain", f"{self.drain:g}"]
        if self.mode == "churn":
            argv += ["--inflight", "4096"]
        if self.srcs:
            argv += ["--src", ",".join(self.srcs)]
        return argv

    @property
    def timeout(self) -> float:
        return self.warmup + self.duration + self.drain + 15


def run_load(exe: Path, load: Load, pids: list[int] | None) -> Metrics:
    """Run the load generator once; the proxy tree's CPU (pids; None for direct) is sampled
    at the start and the end of its measured window. Raises RuntimeError on failure."""
    p = subprocess.Popen(
        load.argv(exe), stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
    )
    assert p.stdout is not None and p.stderr is not None
    lines = Lines(p.stdout)
    deadline = time.monotonic() + load.timeout
    s0 = s1 = None
    data: dict[str, Any] | None = None
    try:
        while data is None:
            line = lines.next(deadline)
            if line is None:
                break
            if line == "MEASURE_START":
                s0 = snap(pids or [])
            elif line == "MEASURE_END":
                s1 = snap(pids or [])
            elif line.startswith("LOADGEN_JSON "):
                data = json.loads(line[len("LOADGEN_JSON ") :])
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(max(0.1, deadline - time.monotonic()))
    finally:
        _stop(p)
        err = p.stderr.read().decode(errors="replace")[-500:]
        p.stdout.close()
        p.stderr.close()
    if data is None or s0 is None or s1 is None:
        why = "timed out" if time.monotonic() >= deadline else f"exit {p.returncode}"
        raise RuntimeError(f"loadgen {load.mode} at {load.rate:g}/s: {why}: {err.strip()}")
    return _load_metrics(load, data, cpu_between(s0, s1) if pids else None, s0, s1)


def _load_metrics(load: Load, data: Metrics, cpu: Metrics | None, s0: Snap, s1: Snap) -> Metrics:
    lat, svc, lag = (Hist.from_json(data[k]) for k in ("lat", "svc", "lag"))
    done = int(data["done_in_window"])
    window = float(data["window_s"])
    unit = "conn" if load.mode == "churn" else "req"
    out: Metrics = {
        "offered": load.rate,
        "achieved": round(float(data["achieved_rate"]), 1),
        "scheduled": data["scheduled"],
        "completed": data["completed"],
        "incomplete": data["incomplete"],
        "done_in_window": done,
        "window_s": window,
        "errors": {k: v for k, v in data["errors"].items() if v},
        "lat_us": latency_us(lat),
        "svc_us": latency_us(svc),
        "lag_us": latency_us(lag),
        "samples": lat.n,
        "lg_cpu_s": data["lg_cpu_s"],
        "lg_core": round(data["lg_cpu_s"] / window, 3) if window else None,
        f"lg_us_per_{unit}": _r(per_unit(data["lg_cpu_s"], done)),
        "machine_cpu_s": round(s1.machine_s - s0.machine_s, 3),
        f"machine_us_per_{unit}": _r(per_unit(s1.machine_s - s0.machine_s, done)),
        "hist": lat.to_json(),
    }
    out["saturated"] = saturated(load.rate, out["achieved"])
    if cpu is not None:
        out["proxy_cpu_s"] = cpu["cpu_s"]
        out["proxy_user_s"] = cpu["user_s"]
        out[f"cpu_us_per_{unit}"] = _r(per_unit(cpu["cpu_s"], done))
        out[f"user_us_per_{unit}"] = _r(per_unit(cpu["user_s"], done), 2)
        out["proxy_core"] = round(cpu["cpu_s"] / window, 3) if window else None
        out["cpu_method"] = cpu["cpu_method"]
    return out


def _r(v: float | None, digits: int = 1) -> float | None:
    return None if v is None else round(v, digits)


# -- held connections -----------------------------------------------------------------------


@dataclass
class HoldGroup:
    """Processes of bench/loadgen.c in hold mode, together holding connections to one port,
    each from its own loopback source address (HOLD_PER_PROC connections each at most)."""

    exe: Path
    port: int
    most: int  # the most connections the group will be asked to hold
    trickle_s: float
    per_proc: int = HOLD_PER_PROC
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    readers: list[Lines] = field(default_factory=list)
    held: list[int] = field(default_factory=list)

    def start(self) -> None:
        for i in range(max(1, math.ceil(self.most / self.per_proc))):
            argv = [str(self.exe), "hold", f"127.0.0.1:{self.port}"]
            argv += ["--trickle", f"{self.trickle_s:g}", "--window", "256"]
            argv += ["--src", f"127.0.0.{10 + i}"]
            p = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
            )
            assert p.stdout is not None
            self.procs.append(p)
            self.readers.append(Lines(p.stdout))
            self.held.append(0)

    def _send(self, i: int, text: str) -> None:
        stdin = self.procs[i].stdin
        assert stdin is not None
        stdin.write(text.encode() + b"\n")
        stdin.flush()

    def open(self, total: int, timeout: float) -> Metrics:
        """Hold `total` connections in all (each proven by one answered request); returns
        how long the increment took (the processes open theirs in parallel)."""
        share = [
            total // len(self.procs) + (i < total % len(self.procs)) for i in range(len(self.procs))
        ]
        deadline = time.monotonic() + timeout
        for i, n in enumerate(share):
            self._send(i, f"open {n}")
        up = failed = 0
        ms = 0.0
        for i, reader in enumerate(self.readers):
            line = reader.next(deadline)
            if line is None or not line.startswith("opened "):
                raise RuntimeError(f"holding process {i}: no answer to open {share[i]}")
            f = line.split()  # opened N up U failed F ms T
            up += int(f[3])
            failed += int(f[5])
            ms = max(ms, float(f[7]))
            self.held[i] = share[i]
        return {"up": up, "failed": failed, "open_s": round(ms / 1000, 3)}

    def stats(self, timeout: float = 5.0) -> Metrics:
        deadline = time.monotonic() + timeout
        for i in range(len(self.procs)):
            self._send(i, "stats")
        total: Metrics = {}
        for i, reader in enumerate(self.readers):
            line = reader.next(deadline)
            if line is None or not line.startswith("stats "):
                raise RuntimeError(f"holding process {i}: no answer to stats")
            for k, v in json.loads(line[len("stats ") :]).items():
                total[k] = total.get(k, 0) + v
        return total

    def stop(self) -> None:
        for i, p in enumerate(self.procs):
            with contextlib.suppress(OSError, ValueError):
                if p.poll() is None:
                    self._send(i, "quit")
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5)
            _stop(p)
            for stream in (p.stdin, p.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()


def memory(root: int | None) -> dict[str, int]:
    """PSS, anonymous PSS and RSS (KiB) of the tree under root, as bench/procs.py reads them."""
    return tree_memory_kb(root) if root is not None else {}


def tree(root: int) -> list[int]:
    """root and its live descendants (an nginx master and its worker)."""
    return tree_pids(root)
