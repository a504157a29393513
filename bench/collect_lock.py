"""How long the relay thread waits for the engine lock while the loop collects (issue 21).

The threaded Cython engine relays in its own thread, under a mutex it shares with the loop's
calls (add, remove, collect...). Everything collect() does under that mutex is time the relay
thread cannot relay. This drives that case: a forked child keeps a few ping-pong pairs busy
through the engine (so the relay thread wakes up all the time), while the parent makes N
pairs finish at once and collects their N records in one collect(). The engine counts each
time its thread found the lock taken and how long it waited (Engine._lock_waits, not an API).

    PYTHONPATH=src python3 bench/collect_lock.py [--pairs 2000] [--rounds 20]

Prints, over the rounds: collect() wall time and the relay thread's waits during it (count,
total and longest), p50 and max. Loopback socketpairs only; the child is stopped by its PID.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import socket
import statistics
import time

from etcdgw import _relay


def pingpong(pairs: list[tuple[socket.socket, socket.socket]], seconds: float) -> None:
    """The child: 100-byte round trips on every pair, one after the other, until the end."""
    end = time.monotonic() + seconds
    msg = b"x" * 100
    while time.monotonic() < end:
        for client, upstream in pairs:
            client.sendall(msg)
            got = 0
            while got < len(msg):
                got += len(upstream.recv(4096))
            upstream.sendall(msg)
            got = 0
            while got < len(msg):
                got += len(client.recv(4096))
    os._exit(0)


def quad() -> tuple[socket.socket, socket.socket, socket.socket, socket.socket]:
    client, down = socket.socketpair()
    up, upstream = socket.socketpair()
    down.setblocking(False)
    up.setblocking(False)
    return client, down, up, upstream


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--pairs", type=int, default=2000, help="records per collect()")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--busy", type=int, default=4, help="ping-pong pairs kept busy")
    args = ap.parse_args()

    engine = _relay.Engine(32768, threaded=True)
    busy = [quad() for _ in range(args.busy)]
    for _, down, up, _ in busy:
        engine.add(down.fileno(), up.fileno())
    pid = os.fork()
    if pid == 0:
        pingpong([(c, u) for c, _, _, u in busy], 3600)
    for c, _, _, u in busy:
        c.close()
        u.close()
    walls, counts, totals, longest = [], [], [], []
    try:
        for _ in range(args.rounds):
            quads = [quad() for _ in range(args.pairs)]
            for _, down, up, _ in quads:
                engine.add(down.fileno(), up.fileno())
            for client, _, _, upstream in quads:  # both ends go: the pair finishes cleanly
                client.close()
                upstream.close()
            deadline = time.monotonic() + 30
            while len(engine) > args.busy:  # every one finished, its record waiting
                assert time.monotonic() < deadline, "pairs did not finish"
                time.sleep(0.005)
            select.select([engine.fileno()], [], [], 1.0)
            engine._lock_waits(reset=True)
            t0 = time.perf_counter_ns()
            report = engine.collect()
            walls.append(time.perf_counter_ns() - t0)
            n, total, top = engine._lock_waits()
            assert len(report.finished) == args.pairs, len(report.finished)
            counts.append(n)
            totals.append(total)
            longest.append(top)
            for _, down, up, _ in quads:
                down.close()
                up.close()
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        engine.close()
        for _, down, up, _ in busy:
            down.close()
            up.close()

    def us(values: list[int]) -> str:
        return f"p50 {statistics.median(values) / 1e3:8.1f} us  max {max(values) / 1e3:8.1f} us"

    print(f"{args.rounds} rounds of {args.pairs} finished records, {args.busy} busy pairs")
    print(f"collect() wall time:               {us(walls)}")
    waits = f"p50 {statistics.median(counts):.0f}  max {max(counts)}"
    print(f"relay thread waits per collect():  {waits}")
    print(f"relay thread wait total / collect: {us(totals)}")
    print(f"relay thread longest single wait:  {us(longest)}")


if __name__ == "__main__":
    main()
