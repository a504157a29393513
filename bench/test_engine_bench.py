"""Micro-benchmarks of the two relay engines on loopback TCP and socketpairs.

Run explicitly (not part of the test suite):
    PYTHONPATH=src pytest bench/test_engine_bench.py --benchmark-group-by=func

The application ends run in forked child processes (bulk, ping-pong), so the parent's CPU
time is the engine's own; `extra_info` carries the derived MB/s, MB per engine CPU-second
and microseconds per message. `cython-nosplice` is the Cython engine without its splice(2)
path, kept to show what splice buys (docs/engine.md has the numbers).
"""

from __future__ import annotations

import functools
import importlib
import os
import select
import socket
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

BULK = 256 << 20
PINGS = 2000
BATCH = 256


@pytest.fixture(params=["cython", "cython-nosplice", "python"])
def engine_cls(request: pytest.FixtureRequest) -> Iterator[Any]:
    """Return the Engine class of one implementation (the Cython one also without splice)."""
    if request.param == "python":
        yield importlib.import_module("etcdgw._relay_py").Engine
        return
    module = pytest.importorskip("etcdgw._relay")
    module._set_splice(request.param == "cython")  # read when an Engine is created
    try:
        # Loop mode: these measure the engine's own work per run(); the threaded mode (the
        # default, a relay thread of its own) is measured end to end by bench/run.py.
        yield functools.partial(module.Engine, threaded=False)
    finally:
        module._set_splice(True)


def connected(kind: str) -> tuple[socket.socket, socket.socket]:
    if kind == "unix":
        return socket.socketpair()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        a = socket.create_connection(listener.getsockname())
        b, _ = listener.accept()
    for s in (a, b):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return a, b


def spawn(work: Callable[[], None]) -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            work()
            code = 0
        finally:
            os._exit(code)
    return pid


def drive(engine: Any) -> list[tuple[int, int, int, int]]:
    """Run the engine until its one pair finishes."""
    poller = select.poll()
    poller.register(engine.fileno(), select.POLLIN)
    finished: list[tuple[int, int, int, int]] = []
    while not finished:
        if not engine.pending:
            poller.poll(5000)
        finished += engine.run()
    return finished


class Rig:
    """One relayed pair whose two application ends are forked children."""

    def __init__(self, engine_cls: Any, kind: str, client: Any, upstream: Any) -> None:
        self.client, self.down = connected(kind)
        self.up, self.upstream = connected(kind)
        for s in (self.down, self.up):
            s.setblocking(False)
        self.engine = engine_cls()
        self.engine.add(self.down.fileno(), self.up.fileno())
        self.pids = [spawn(lambda: client(self.client)), spawn(lambda: upstream(self.upstream))]

    def close(self) -> None:
        pids, self.pids = self.pids, []
        for pid in pids:
            assert os.waitpid(pid, 0)[1] == 0, "a benchmark peer failed"
        self.engine.close()
        for s in (self.client, self.down, self.up, self.upstream):
            s.close()


def _send_bulk(sock: socket.socket) -> None:
    chunk = memoryview(os.urandom(1 << 20))
    for _ in range(BULK >> 20):
        sock.sendall(chunk)
    sock.shutdown(socket.SHUT_WR)


def _sink(sock: socket.socket) -> None:
    buf = bytearray(1 << 20)
    total = 0
    while n := sock.recv_into(buf):
        total += n
    assert total == BULK
    sock.shutdown(socket.SHUT_WR)


def _ping(sock: socket.socket) -> None:
    msg = b"p" * 100
    for _ in range(PINGS):
        sock.sendall(msg)
        got = 0
        while got < len(msg):
            got += len(sock.recv(4096))
    sock.shutdown(socket.SHUT_WR)
    sock.recv(1)


def _echo(sock: socket.socket) -> None:
    while data := sock.recv(4096):
        sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)


def _pedantic(benchmark: Any, make: Callable[[], Rig], rounds: int) -> float:
    """Benchmark driving one pair per round; return the engine's median CPU seconds."""
    rigs: list[Rig] = []
    cpu: list[float] = []

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        rigs.append(make())
        return (rigs[-1],), {}

    def target(rig: Rig) -> None:
        start = time.process_time()
        ((*_, err),) = drive(rig.engine)
        cpu.append(time.process_time() - start)
        assert err == 0, os.strerror(err)

    try:
        benchmark.pedantic(target, setup=setup, teardown=Rig.close, rounds=rounds)
    finally:
        for rig in rigs:  # after a failure: reap the children, close what is left
            rig.close()
    return statistics.median(cpu)


def _median(benchmark: Any) -> float:
    """The median seconds per round (NaN under --benchmark-disable, which keeps no stats)."""
    return benchmark.stats.stats.median if benchmark.stats else float("nan")


@pytest.mark.parametrize("kind", ["unix", "tcp"])
def test_bulk_throughput(benchmark: Any, engine_cls: Any, kind: str) -> None:
    """One pair, BULK bytes one way: MB/s through the engine."""
    cpu = _pedantic(benchmark, lambda: Rig(engine_cls, kind, _send_bulk, _sink), rounds=7)
    benchmark.extra_info["MB/s"] = round(BULK / _median(benchmark) / 1e6, 1)
    # The engine's own CPU per byte: on a small machine the peers compete for the cores.
    benchmark.extra_info["MB/cpu-s"] = round(BULK / cpu / 1e6)


@pytest.mark.parametrize("kind", ["unix", "tcp"])
def test_ping_pong(benchmark: Any, engine_cls: Any, kind: str) -> None:
    """One pair, 100-byte request and echo, one at a time: the relayed round trip."""
    cpu = _pedantic(benchmark, lambda: Rig(engine_cls, kind, _ping, _echo), rounds=7)
    benchmark.extra_info["us/round-trip"] = round(_median(benchmark) / PINGS * 1e6, 2)
    benchmark.extra_info["cpu-us/round-trip"] = round(cpu / PINGS * 1e6, 2)


@pytest.fixture
def batch(engine_cls: Any) -> Iterator[tuple[Any, list[socket.socket], list[socket.socket]]]:
    """An engine relaying BATCH socketpair pairs, with their client and upstream app ends."""
    engine = engine_cls()
    socks: list[socket.socket] = []
    clients, upstreams = [], []
    for _ in range(BATCH):
        client, down = socket.socketpair()
        up, upstream = socket.socketpair()
        for s in (client, down, up, upstream):
            s.setblocking(False)
        engine.add(down.fileno(), up.fileno())
        socks += (client, down, up, upstream)
        clients.append(client)
        upstreams.append(upstream)
    yield engine, clients, upstreams
    engine.close()
    for s in socks:
        s.close()


def test_small_message_batch(benchmark: Any, batch: Any) -> None:
    """BATCH pairs each get one 128-byte message: the engine's CPU cost per message."""
    engine, clients, upstreams = batch
    msg = b"m" * 128

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        for s in upstreams:
            try:
                s.recv(1 << 16)
            except BlockingIOError:
                pass
        for s in clients:
            s.send(msg)
        select.select([engine.fileno()], [], [], 1)
        return (engine.totals()[0] + BATCH * len(msg),), {}

    def target(want: int) -> None:
        while engine.totals()[0] < want:
            engine.run()

    benchmark.pedantic(target, setup=setup, rounds=300, warmup_rounds=5)
    benchmark.extra_info["us/message"] = round(_median(benchmark) / BATCH * 1e6, 3)


def test_idle_run(benchmark: Any, batch: Any) -> None:
    """run() with BATCH idle pairs and nothing ready: the fixed cost of one wake-up."""
    engine = batch[0]
    engine.run()
    benchmark(engine.run)
