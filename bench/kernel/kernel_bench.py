"""Side-by-side on loopback: the Cython engine, the kernel relay (sockmap.py here), direct.

    sudo python3 bench/kernel/kernel_bench.py [--reps 5] [--duration 4] [--conns 32]

Workloads (each rep runs every variant, in a rotated order, so drift hits all alike):
  paced      each of --conns kept-alive connections sends a 64-byte request, reads a
             256-byte reply, pauses 25 ms, again (~1,200 req/s for 32 connections)
  saturated  the same with no pause
  bulk       one connection, the client sends --bulk-mib MiB that the upstream discards

Per variant and workload: requests per second, proxy-process CPU per request (utime+stime
of the proxy process, every thread), whole-machine CPU per request (busy jiffies of
/proc/stat over the run: the kernel relays in softirq and kworker context, charged to
whoever runs then, so only the whole machine sees it), the same minus direct's (what
the proxy adds), p50/p99 latency, and for bulk GB per machine-CPU-second. Medians over
reps with the min-max spread. The client, the upstream and every proxy are separate
processes; the proxy engines are driven as the gateway drives them (the Cython engine in
its default threaded mode; the kernel relay from an epoll loop on its fileno()).
The machine's other load lands in the whole-machine figures: read the spread.
"""

from __future__ import annotations

import argparse
import heapq
import json
import multiprocessing as mp
import os
import select
import socket
import statistics
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "src"))
sys.path.insert(0, HERE)

REQ, REPLY = 64, 256
PACE = 0.025
CLK_TCK = os.sysconf("SC_CLK_TCK")


def busy_jiffies() -> int:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal


def proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / CLK_TCK  # utime + stime, all threads


def kthreads_cpu() -> float:
    """CPU seconds of every kworker and ksoftirqd thread: where the kernel relay's deferred
    work (the psock backlog) and softirqs that found no process to ride on run."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                raw = f.read()
        except OSError:
            continue
        name = raw[raw.index("(") + 1 : raw.rindex(")")]
        if name.startswith(("kworker", "ksoftirqd")):
            rest = raw.rsplit(")", 1)[1].split()
            total += int(rest[11]) + int(rest[12])
    return total / CLK_TCK


def listener() -> socket.socket:
    s = socket.create_server(("127.0.0.1", 0), backlog=256)
    s.setblocking(False)
    return s


# -- upstream: answers every REQ bytes with REPLY bytes; in bulk mode discards --------------


def upstream(lsock: socket.socket, ready: Any) -> None:
    ep = select.epoll()
    ep.register(lsock.fileno(), select.EPOLLIN)
    conns: dict[int, tuple[socket.socket, list[int]]] = {}  # fd -> (sock, [pending, bulk])
    reply = b"r" * REPLY
    ready.set()
    while True:
        for fd, _ in ep.poll():
            if fd == lsock.fileno():
                while True:
                    try:
                        c, _ = lsock.accept()
                    except BlockingIOError:
                        break
                    c.setblocking(False)
                    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    conns[c.fileno()] = (c, [0, -1])
                    ep.register(c.fileno(), select.EPOLLIN)
                continue
            c, pend = conns[fd]
            try:
                data = c.recv(1 << 20)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                ep.unregister(fd)
                c.close()
                del conns[fd]
                continue
            if pend[1] < 0:
                pend[1] = data[:1] == b"b"  # a bulk sender: discard, never reply
            if pend[1]:
                continue
            pend[0] += len(data)
            n, pend[0] = divmod(pend[0], REQ)
            if n:
                c.sendall(reply * n)


# -- proxies -------------------------------------------------------------------------------


def proxy(kind: str, lsock: socket.socket, target: int, ready: Any) -> None:
    if kind == "cython":
        from etcdgw._relay import Engine

        engine: Any = Engine()
    else:
        from sockmap import KernelRelay

        engine = KernelRelay()
    keep: dict[int, tuple[socket.socket, socket.socket]] = {}
    ep = select.epoll()
    ep.register(lsock.fileno(), select.EPOLLIN)
    ep.register(engine.fileno(), select.EPOLLIN)
    ready.set()
    while True:
        for fd, _ in ep.poll(-1 if not engine.pending else 0):
            if fd == lsock.fileno():
                while True:
                    try:
                        c, _ = lsock.accept()
                    except BlockingIOError:
                        break
                    u = socket.create_connection(("127.0.0.1", target))
                    for s in (c, u):
                        s.setblocking(False)
                        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    pid = engine.add(c.fileno(), u.fileno())
                    keep[pid] = (c, u)
        for pid, *_ in engine.run():
            for s in keep.pop(pid, ()):
                s.close()


# -- client --------------------------------------------------------------------------------


def client(port: int, conns: int, duration: float, paced: bool, out: Any) -> None:
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(conns)]
    ep = select.epoll()
    state: dict[int, list[Any]] = {}
    req = b"q" * REQ
    for s in socks:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        ep.register(s.fileno(), select.EPOLLIN)
        state[s.fileno()] = [s, 0, 0.0]  # sock, reply bytes pending, sent at
    # warm-up: one exchange per connection
    lat: list[float] = []
    timers: list[tuple[float, int]] = []
    start = time.monotonic()
    for i, s in enumerate(socks):
        timers.append((start + (PACE * i / conns if paced else 0), s.fileno()))
    heapq.heapify(timers)
    end = start + duration
    done = 0
    while True:
        now = time.monotonic()
        if now >= end:
            break
        while timers and timers[0][0] <= now:
            _, fd = heapq.heappop(timers)
            st = state[fd]
            st[0].send(req)
            st[1], st[2] = REPLY, time.monotonic()
        wait = min(end, timers[0][0]) - now if timers else end - now
        for fd, _ in ep.poll(max(wait, 0)):
            st = state[fd]
            data = st[0].recv(65536)
            if not data:
                raise SystemExit("connection closed")
            st[1] -= len(data)
            if st[1] == 0:
                t = time.monotonic()
                lat.append(t - st[2])
                done += 1
                if paced:
                    heapq.heappush(timers, (t + PACE, fd))
                else:
                    st[0].send(req)
                    st[1], st[2] = REPLY, t
    for s in socks:
        s.close()
    lat.sort()
    t = os.times()
    out.send(
        {
            "client_cpu": t.user + t.system,
            "requests": done,
            "p50": lat[len(lat) // 2] if lat else 0.0,
            "p99": lat[int(len(lat) * 0.99)] if lat else 0.0,
        }
    )


def bulk_client(port: int, mib: int, out: Any) -> None:
    s = socket.create_connection(("127.0.0.1", port))
    block = b"b" * (1 << 20)
    t = time.monotonic()
    for _ in range(mib):
        s.sendall(block)
    s.shutdown(socket.SHUT_WR)
    s.settimeout(60)
    while s.recv(65536):
        pass
    ct = os.times()
    out.send(
        {"seconds": time.monotonic() - t, "bytes": mib << 20, "client_cpu": ct.user + ct.system}
    )
    s.close()


# -- one measured run ------------------------------------------------------------------------


def measure(
    variant: str,
    workload: str,
    up: tuple[int, int],
    proxies: dict[str, tuple[int, int]],
    args: Any,
) -> dict[str, float]:
    port, ppid = proxies[variant] if variant != "direct" else (up[0], 0)
    recv, send = mp.Pipe(duplex=False)
    if workload == "bulk":
        proc = mp.Process(target=bulk_client, args=(port, args.bulk_mib, send))
    else:
        proc = mp.Process(
            target=client, args=(port, args.conns, args.duration, workload == "paced", send)
        )
    k0, u0 = kthreads_cpu(), proc_cpu(up[1])
    j0, c0, t0 = busy_jiffies(), proc_cpu(ppid) if ppid else 0.0, time.monotonic()
    proc.start()
    res = recv.recv()
    proc.join()
    j1, c1, t1 = busy_jiffies(), proc_cpu(ppid) if ppid else 0.0, time.monotonic()
    k1, u1 = kthreads_cpu(), proc_cpu(up[1])
    machine = (j1 - j0) / CLK_TCK
    r: dict[str, float] = {"wall": t1 - t0, "machine_cpu": machine, "proxy_cpu": c1 - c0}
    r.update(res)
    # ours: every process of this benchmark plus the kernel threads (less of the other
    # tenants' noise than the whole machine; softirq work is charged to whoever it
    # interrupts, mostly these same processes on loopback).
    r["ours_cpu"] = r["client_cpu"] + (u1 - u0) + (c1 - c0) + (k1 - k0)
    r["kthreads_cpu"] = k1 - k0
    return r


def fmt(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    if not values:
        return "-"
    v = sorted(x * scale for x in values)
    return f"{statistics.median(v):.{digits}f} ({v[0]:.{digits}f}-{v[-1]:.{digits}f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--duration", type=float, default=4.0)
    ap.add_argument("--conns", type=int, default=32)
    ap.add_argument("--bulk-mib", type=int, default=1024)
    ap.add_argument("--workloads", default="paced,saturated,bulk")
    ap.add_argument("--json", help="write the raw runs here")
    args = ap.parse_args()
    import sockmap

    reason = sockmap.probe()
    if reason:
        sys.exit(f"kernel_bench: the kernel relay is unavailable here: {reason}")
    mp.set_start_method("fork")
    ready = [mp.Event() for _ in range(3)]
    ul = listener()
    up = mp.Process(target=upstream, args=(ul, ready[0]), daemon=True)
    up.start()
    procs = [up]
    proxies: dict[str, tuple[int, int]] = {}
    for i, kind in enumerate(("cython", "kernel"), 1):
        pl = listener()
        p = mp.Process(target=proxy, args=(kind, pl, ul.getsockname()[1], ready[i]), daemon=True)
        p.start()
        procs.append(p)
        assert p.pid is not None
        proxies[kind] = (pl.getsockname()[1], p.pid)
        pl.close()
    for e in ready:
        if not e.wait(10):
            sys.exit("kernel_bench: a process did not start")
    variants = ["cython", "kernel", "direct"]
    runs: dict[tuple[str, str], list[dict[str, float]]] = {}
    try:
        for workload in args.workloads.split(","):
            for rep in range(args.reps):
                order = variants[rep % 3 :] + variants[: rep % 3]
                for v in order:
                    assert up.pid is not None
                    r = measure(v, workload, (ul.getsockname()[1], up.pid), proxies, args)
                    runs.setdefault((workload, v), []).append(r)
                    print(f"{workload:9} rep {rep} {v:7} {json.dumps(r)}", file=sys.stderr)
    finally:
        for p in procs:
            if p.pid is not None and p.is_alive():
                os.kill(p.pid, 15)
                p.join(5)
    report(runs, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({f"{w}/{v}": rs for (w, v), rs in runs.items()}, f, indent=1)


def report(runs: dict[tuple[str, str], list[dict[str, float]]], args: Any) -> None:
    print(
        f"kernel {os.uname().release}, {os.cpu_count()} CPUs, reps {args.reps}, "
        f"{args.duration:g} s per run, {args.conns} connections; median (min-max)\n"
    )
    for workload in ("paced", "saturated"):
        if (workload, "direct") not in runs:
            continue
        print(f"### {workload}\n")
        print(
            "| variant | req/s | proxy CPU us/req | machine CPU us/req | added machine "
            "us/req (vs direct, same rep) | ours CPU us/req | added ours us/req | "
            "kthreads us/req | p50 us | p99 us |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        direct = runs[(workload, "direct")]
        per = lambda r, k: r[k] / max(r["requests"], 1) * 1e6  # noqa: E731
        for v in ("direct", "cython", "kernel"):
            rs = runs[(workload, v)]
            added = [
                per(r, "machine_cpu") - per(d, "machine_cpu")
                for r, d in zip(rs, direct, strict=True)
            ]
            added_ours = [
                per(r, "ours_cpu") - per(d, "ours_cpu") for r, d in zip(rs, direct, strict=True)
            ]
            print(
                f"| {v} | {fmt([r['requests'] / r['wall'] for r in rs], digits=0)} | "
                f"{fmt([per(r, 'proxy_cpu') for r in rs]) if v != 'direct' else '-'} | "
                f"{fmt([per(r, 'machine_cpu') for r in rs])} | "
                f"{fmt(added) if v != 'direct' else '-'} | "
                f"{fmt([per(r, 'ours_cpu') for r in rs])} | "
                f"{fmt(added_ours) if v != 'direct' else '-'} | "
                f"{fmt([per(r, 'kthreads_cpu') for r in rs])} | "
                f"{fmt([r['p50'] for r in rs], 1e6, 0)} | {fmt([r['p99'] for r in rs], 1e6, 0)} |"
            )
        c = runs[(workload, "cython")]
        k = runs[(workload, "kernel")]
        for key, label in (("machine_cpu", "whole-machine"), ("ours_cpu", "own-process")):
            added_k = [per(r, key) - per(d, key) for r, d in zip(k, direct, strict=True)]
            added_c = [per(r, key) - per(d, key) for r, d in zip(c, direct, strict=True)]
            mk, mc = statistics.median(added_k), statistics.median(added_c)
            ratio = f"{mk / mc:.2f}" if mc > 0 else "n/a (cython's median is <= 0: noise)"
            print(
                f"\nadded {label} CPU per request, median of reps: kernel {mk:.1f} us, "
                f"cython {mc:.1f} us: kernel/cython = {ratio}"
            )
        print()
    if ("bulk", "direct") in runs:
        print("### bulk (one connection, client -> upstream)\n")
        print(
            "| variant | GB/s wall | GB per machine CPU-second | GB per ours CPU-second |"
            " proxy CPU s |"
        )
        print("|---|---:|---:|---:|---:|")
        for v in ("direct", "cython", "kernel"):
            rs = runs[("bulk", v)]
            print(
                f"| {v} | {fmt([r['bytes'] / r['seconds'] / 1e9 for r in rs], digits=2)} | "
                f"{fmt([r['bytes'] / max(r['machine_cpu'], 1e-9) / 1e9 for r in rs], digits=2)}"
                f" | {fmt([r['bytes'] / max(r['ours_cpu'], 1e-9) / 1e9 for r in rs], digits=2)}"
                f" | {fmt([r['proxy_cpu'] for r in rs], digits=2)} |"
            )
        print()


if __name__ == "__main__":
    main()
