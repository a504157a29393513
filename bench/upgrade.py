"""Live upgrade figures (issue 20): how long SIGUSR2 takes to hand N pairs to a successor,
the longest pause a ping-pong client sees meanwhile, and both processes' memory.

    python3 bench/upgrade.py --pairs 1 1000 9000 [--engine cython|python] [--repeat 3]

Each run: a real echo backend and the clients in processes of their own (fds: 20,000 a
process here), a gateway (`python -m etcdgw start`, the engine asked for), N idle pairs plus
4 ping-pong clients (1-byte round trips back to back), then SIGUSR2. Reported, per run:
handover_s (the successor's READY to DONE: the listeners are already both processes' then),
total_s (SIGUSR2 to the old process's exit, with the successor's start-up), ping_max_ms (the
longest round trip of any ping-pong client in the 2 s around the hand-over: added latency
at the 100th percentile), lost (connections of the N that failed a round trip afterwards),
and the peak RSS of the old and the new process during it. One JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

SRC = str(Path(__file__).resolve().parent.parent / "src")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- the two helper processes -------------------------------------------------------------------


def backend(port: int) -> None:
    """Echo every byte back (epoll, one thread)."""
    lsock = socket.create_server(("127.0.0.1", port), backlog=4096)
    lsock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(lsock, selectors.EVENT_READ)
    print("ready", flush=True)
    while True:
        for key, _ in sel.select():
            s = key.fileobj
            assert isinstance(s, socket.socket)
            if s is lsock:
                while True:
                    try:
                        c, _ = lsock.accept()
                    except BlockingIOError:
                        break
                    c.setblocking(False)
                    sel.register(c, selectors.EVENT_READ)
                continue
            try:
                data = s.recv(65536)
            except OSError:
                data = b""
            if not data:
                sel.unregister(s)
                s.close()
                continue
            try:
                s.send(data)
            except OSError:
                pass


def clients(port: int, n: int, pingers: int, seconds: float) -> None:
    """Open n idle pairs and `pingers` ping-pong ones; on `go` (stdin), ping for `seconds`,
    then check every idle pair with one round trip; print the result as JSON."""
    idle = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        idle.append(s)
    for s in idle[:: max(1, n // 100)]:  # the pairs are relayed (not just accepted)
        s.sendall(b"x")
        assert s.recv(1) == b"x"
    print("ready", flush=True)
    sys.stdin.readline()
    worst = [0.0] * pingers
    rounds = [0] * pingers
    errors: list[str] = []

    def ping(i: int) -> None:
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t = time.monotonic()
            try:
                s.sendall(b"p")
                if s.recv(1) != b"p":
                    errors.append("ping: closed")
                    return
            except OSError as e:
                errors.append(f"ping: {e}")
                return
            worst[i] = max(worst[i], time.monotonic() - t)
            rounds[i] += 1
        s.close()

    ts = [threading.Thread(target=ping, args=(i,)) for i in range(pingers)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    lost = 0
    for s in idle:
        try:
            s.sendall(b"y")
            if s.recv(1) != b"y":
                lost += 1
        except OSError:
            lost += 1
        s.close()
    out: dict[str, Any] = {
        "ping_max_ms": round(max(worst) * 1e3, 2),
        "rounds": sum(rounds),
        "lost": lost,
    }
    out["errors"] = errors[:3]
    print(json.dumps(out), flush=True)


# --- one run --------------------------------------------------------------------------------------


def rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run(n: int, engine: str) -> dict[str, object]:
    bport, gport = free_port(), free_port()
    me = [sys.executable, __file__]
    be = subprocess.Popen([*me, "backend", str(bport)], stdout=subprocess.PIPE, text=True)
    assert be.stdout is not None and be.stdout.readline() == "ready\n"
    env = dict(os.environ, PYTHONPATH=SRC)
    env.pop("ETCDGW_NO_EXTENSIONS", None)
    if engine == "python":
        env["ETCDGW_NO_EXTENSIONS"] = "1"
    gw = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "etcdgw",
            "start",
            f"--endpoints=127.0.0.1:{bport}",
            f"--listen-addr=127.0.0.1:{gport}",
        ],
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    records: list[dict[str, object]] = []

    def read() -> None:
        assert gw.stderr is not None
        for line in gw.stderr:
            try:
                records.append(json.loads(line))
            except ValueError:
                pass

    threading.Thread(target=read, daemon=True).start()

    def find(msg: str, timeout: float = 60) -> dict[str, object]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for r in list(records):
                if r.get("msg") == msg:
                    return r
            time.sleep(0.01)
        raise RuntimeError(f"no {msg!r} in the gateway's log")

    successor = 0
    cl = None
    try:
        find("ready to proxy client requests")
        cl = subprocess.Popen(
            [*me, "clients", str(gport), str(n), "4", "2.0"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert cl.stdin is not None and cl.stdout is not None
        assert cl.stdout.readline() == "ready\n"
        cl.stdin.write("go\n")
        cl.stdin.flush()
        time.sleep(0.5)
        peak_old = peak_new = 0
        t0 = time.monotonic()
        gw.send_signal(signal.SIGUSR2)
        while gw.poll() is None and time.monotonic() - t0 < 60:
            peak_old = max(peak_old, rss_kb(gw.pid))
            for r in list(records):
                if r.get("msg") == "SIGUSR2: starting a successor for a live upgrade":
                    break
            kids = Path(f"/proc/{gw.pid}/task/{gw.pid}/children")
            try:
                for kid in kids.read_text().split():
                    successor = int(kid)
            except OSError:
                pass
            if successor:
                peak_new = max(peak_new, rss_kb(successor))
            time.sleep(0.005)
        total = time.monotonic() - t0
        rc = gw.wait(5)
        took = find("live upgrade: took over")
        successor = int(str(took["pid"]))
        result = json.loads(cl.stdout.readline())
        return {
            "engine": engine,
            "pairs": n,
            "handed": took["pairs"],
            "handover_s": took["seconds"],
            "total_s": round(total, 3),
            "old_exit": rc,
            "old_rss_peak_mb": round(peak_old / 1024, 1),
            "new_rss_peak_mb": round(peak_new / 1024, 1),
            "new_rss_after_mb": round(rss_kb(successor) / 1024, 1),
            **result,
        }
    finally:
        if cl is not None:
            cl.kill()
            cl.wait()
        for pid in (successor,):
            if pid:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        if gw.poll() is None:
            gw.kill()
        gw.wait()
        be.kill()
        be.wait()
        # The successor is not our child: wait until it is gone (bounded).
        end = time.monotonic() + 20
        while successor and Path(f"/proc/{successor}").exists() and time.monotonic() < end:
            time.sleep(0.05)


def main() -> None:
    if sys.argv[1:2] == ["backend"]:
        backend(int(sys.argv[2]))
        return
    if sys.argv[1:2] == ["clients"]:
        clients(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, nargs="+", default=[1, 1000, 9000])
    ap.add_argument("--engine", choices=["cython", "python"], default="cython")
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    for n in args.pairs:
        for _ in range(args.repeat):
            print(json.dumps(run(n, args.engine)), flush=True)


if __name__ == "__main__":
    main()
