"""A connect flood on a gateway's --metrics-addr, measured from the side (issue 18, item 11).

Run inside a network namespace of its own, so the flood (and the kernel counters read
before and after it) touch nothing else on the machine:

    unshare -n python3 tests/_flood.py measure --engine cython --seconds 5 --rate 9500

`measure` brings the namespace's loopback up, starts a backend and a gateway (the engine
asked for, with --metrics-addr), then for --seconds runs a flooder process (non-blocking
connects at --rate a second, each closed once connected) while this process probes, every
20 ms each: a `GET /health` on the metrics port and a relayed connection through the
gateway (its backend's tag line). It prints one JSON object: latencies (p50, p99, max) and
failures of both probes, with and without the flood, what the flooder achieved, the
namespace's TcpExt counters (ListenOverflows, ListenDrops, SyncookiesSent), the gateway's
CPU, how long its threads waited for a CPU (a busy machine shows there) and what it logged.
`--src OTHER/src` runs another checkout's etcdgw (the "before" of a comparison). `flood` and
`backend` are the helper processes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import os
import select
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PROBE_EVERY = 0.02
PROBE_TIMEOUT = 5.0


# --- the flooder ------------------------------------------------------------------------------


def flood(port: int, rate: float, seconds: float, inflight_cap: int = 4000) -> dict[str, Any]:
    """Connect to 127.0.0.1:port at `rate` a second for `seconds`; close each once connected.

    Connects are non-blocking, so a SYN the server drops (a full accept queue) holds one
    socket for up to 3 s, not the flood itself. Returns what happened."""
    ep = select.epoll()
    pending: dict[int, tuple[socket.socket, float]] = {}
    out: dict[str, int] = {
        "started": 0,
        "connected": 0,
        "refused": 0,
        "timed_out": 0,
        "not_started": 0,
    }
    t0 = time.monotonic()
    end = t0 + seconds
    addr = ("127.0.0.1", port)
    while True:
        now = time.monotonic()
        if now >= end and not pending:
            break
        if now < end:
            due = int((now - t0) * rate) - out["started"] - out["not_started"]
            for _ in range(max(0, due)):
                if len(pending) >= inflight_cap:
                    out["not_started"] += 1
                    continue
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setblocking(False)
                err = s.connect_ex(addr)
                out["started"] += 1
                if err not in (0, errno.EINPROGRESS):
                    out["refused"] += 1
                    s.close()
                    continue
                pending[s.fileno()] = (s, now)
                ep.register(s.fileno(), select.EPOLLOUT)
        for fd, _ in ep.poll(0.001):
            s, _ = pending.pop(fd)
            ep.unregister(fd)
            if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                out["connected"] += 1
            else:
                out["refused"] += 1
            s.close()
        if now >= end or len(pending) > 1000:
            for fd, (s, started) in list(pending.items()):
                if now - started > 3.0 or now > end + 3.0:
                    del pending[fd]
                    ep.unregister(fd)
                    s.close()
                    out["timed_out"] += 1
    ep.close()
    return {**out, "seconds": round(time.monotonic() - t0, 2)}


# --- the probes -----------------------------------------------------------------------------


async def _health(port: int) -> float | None:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            data = await r.read()
            w.close()
    except (OSError, TimeoutError):
        return None
    return loop.time() - t0 if data.startswith(b"HTTP/1.1 200 ") else None


async def _relayed(port: int) -> float | None:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            r, w = await asyncio.open_connection("127.0.0.1", port)
            line = await r.readline()
            w.close()
    except (OSError, TimeoutError):
        return None
    return loop.time() - t0 if line == b"tag\n" else None


async def _probe_for(seconds: float, mport: int, port: int) -> dict[str, list[float | None]]:
    """Both probes every PROBE_EVERY for `seconds`, each probe independent of the others'
    latency (a slow one does not delay the next)."""
    loop = asyncio.get_running_loop()
    results: dict[str, list[float | None]] = {"health": [], "relayed": []}
    tasks = []

    async def one(kind: str) -> None:
        results[kind].append(await (_health(mport) if kind == "health" else _relayed(port)))

    end = loop.time() + seconds
    while loop.time() < end:
        tasks += [asyncio.ensure_future(one("health")), asyncio.ensure_future(one("relayed"))]
        await asyncio.sleep(PROBE_EVERY)
    await asyncio.gather(*tasks)
    return results


def _summary(samples: list[float | None]) -> dict[str, Any]:
    ok = sorted(s for s in samples if s is not None)
    if not ok:
        return {"n": len(samples), "failed": len(samples)}

    def pct(p: float) -> float:
        return round(ok[min(len(ok) - 1, int(p * len(ok)))] * 1000, 1)

    return {
        "n": len(samples),
        "failed": len(samples) - len(ok),
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "max_ms": round(ok[-1] * 1000, 1),
        "over_1s": sum(s >= 1.0 for s in ok),
    }


def _tcpext() -> dict[str, int]:
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            return dict(zip(names.split()[1:], map(int, values.split()[1:]), strict=True))
    return {}


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _waited(pid: int) -> float:
    """Seconds the process's threads have spent runnable but not running (a busy machine)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[1])
    return total / 1e9


def measure(engine: str, seconds: float, rate: float, src: str | None = None) -> dict[str, Any]:
    sys.path.insert(0, str(HERE))
    import _gateway
    from _gateway import GatewayProc, free_tcp_port

    if src:
        _gateway.SRC = src  # another checkout's etcdgw (the "before" of a comparison)

    if os.readlink("/proc/self/ns/net") == os.readlink(f"/proc/{os.getppid()}/ns/net"):
        raise SystemExit("_flood.py measure: run me in a network namespace of my own (unshare -n)")
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    # This namespace's own: room for the flood's client ports and their TIME_WAITs.
    Path("/proc/sys/net/ipv4/ip_local_port_range").write_text("1024 65535\n")
    Path("/proc/sys/net/ipv4/tcp_tw_reuse").write_text("1\n")
    backend = subprocess.Popen(
        [sys.executable, __file__, "backend"], stdout=subprocess.PIPE, text=True
    )
    assert backend.stdout is not None
    bport = int(backend.stdout.readline())
    port, mport = free_tcp_port(), free_tcp_port()
    g = GatewayProc(
        [
            "start",
            f"--endpoints=127.0.0.1:{bport}",
            f"--listen-addr=127.0.0.1:{port}",
            f"--metrics-addr=127.0.0.1:{mport}",
            "--log-level=warn",
        ],
        impl=engine,
    )
    try:
        _wait_port(mport)
        _wait_port(port)
        quiet = asyncio.run(_probe_for(1.0, mport, port))
        before, cpu0, t0 = _tcpext(), _cpu(g.pid), time.monotonic()
        waited0 = _waited(g.pid)
        flooder = subprocess.Popen(
            [sys.executable, __file__, "flood", str(mport), str(rate), str(seconds)],
            stdout=subprocess.PIPE,
            text=True,
        )
        time.sleep(0.2)  # the flood is on
        loud = asyncio.run(_probe_for(seconds - 0.4, mport, port))
        out, _ = flooder.communicate(timeout=seconds + 30)
        cpu = (_cpu(g.pid) - cpu0) / (time.monotonic() - t0)
        waited = _waited(g.pid) - waited0
        after = _tcpext()
        alive = g.proc.poll() is None
    finally:
        code = g.stop()
        backend.kill()
        backend.wait(5)
    keys = ("ListenOverflows", "ListenDrops", "SyncookiesSent", "TCPReqQFullDoCookies")
    return {
        "engine": engine,
        "rate": rate,
        "seconds": seconds,
        "flood": json.loads(out),
        "quiet": {k: _summary(v) for k, v in quiet.items()},
        "flooded": {k: _summary(v) for k, v in loud.items()},
        "tcpext": {k: after.get(k, 0) - before.get(k, 0) for k in keys},
        "gateway_cpu": round(cpu, 2),
        # Time its threads were runnable but had no CPU: how busy the machine was.
        "gateway_run_queue_wait_s": round(waited, 2),
        "machine_load": os.getloadavg()[0],
        "gateway_alive": alive,
        "exit": code,
        "log_lines": len(g.lines),
        "first_log_lines": g.lines[:3],
    }


def _wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"_flood.py: nothing listens on port {port}")
        time.sleep(0.05)


def backend() -> None:
    """Answers every connection with `tag\\n` and closes it; prints its port first."""

    async def main() -> None:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.write(b"tag\n")
            with contextlib.suppress(OSError):
                await w.drain()
            w.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=4096)
        print(server.sockets[0].getsockname()[1], flush=True)
        await server.serve_forever()

    asyncio.run(main())


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure")
    m.add_argument("--engine", default="cython")
    m.add_argument("--seconds", type=float, default=5.0)
    m.add_argument("--rate", type=float, default=9500.0)
    m.add_argument("--src", help="run the etcdgw of this src/ directory instead of this one's")
    f = sub.add_parser("flood")
    f.add_argument("port", type=int)
    f.add_argument("rate", type=float)
    f.add_argument("seconds", type=float)
    sub.add_parser("backend")
    a = p.parse_args()
    if a.cmd == "measure":
        print(json.dumps(measure(a.engine, a.seconds, a.rate, a.src)))
    elif a.cmd == "flood":
        print(json.dumps(flood(a.port, a.rate, a.seconds)))
    else:
        backend()
