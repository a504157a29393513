"""The Go gateway (`etcd gateway start`) and etcdgw side by side in the same fault scenarios."""

# Measured, not quoted: each scenario starts the proxy under test on loopback in front of
# small backends of our own, provokes the fault and records what a client sees. The numbers
# go into RELIABILITY.md. Scenarios:
#   half-close   client sends, SHUT_WRs, the backend answers only after EOF: is the answer lost?
#   emfile       RLIMIT_NOFILE 64 (soft and hard: Go raises its soft limit to the hard one at
#                start-up), 60 clients: does the process survive, what happens to clients?
#   silent       first endpoint a full-backlog listener (SYNs dropped): how long does the
#                first client wait for an answer from the second endpoint?
#   refusal      the only endpoint down, then back (--retry-delay=5s): how long are clients
#                still refused after it is back?
#   frozen       the backend is SIGSTOPped while a client pushes data: is the client cut off?
#   idle-memory  9,000 idle connections (3,000 for Go, see below): RSS/PSS/fds per connection
#   fd-ceiling   9,000 connections under a 20,000 fd limit: how many are served, and then?
#   slow-reader  a client stops reading while the backend streams 1 GiB: RSS growth
# Usage: python3 bench/go_gateway_faults.py [--only emfile,silent] [--proxies go,etcdgw-cython]
#        [--silent-cap 150] [--out bench/out]
# Helpers (backends, clients, process figures) come from tests/test_reliability.py.

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tests"), str(REPO / "src")]

import test_reliability as rel  # noqa: E402
from _etcd import spawn, stop_process  # noqa: E402
from _gateway import GatewayProc, TagServer, connect, free_tcp_port, read_line, wait_for  # noqa: E402

PROXIES = ["go", "etcdgw-cython", "etcdgw-python"]
SCENARIOS = [
    "half-close",
    "emfile",
    "silent",
    "refusal",
    "frozen",
    "idle-memory",
    "fd-ceiling",
    "slow-reader",
]


class GoGateway:
    """`etcd gateway start` in its own session, stderr read by a thread, stopped by PID."""

    def __init__(self, args: list[str], nofile: int | None = None) -> None:
        prefix = ["prlimit", f"--nofile={nofile}:{nofile}"] if nofile else []
        self.proc = spawn(
            [*prefix, "etcd", "gateway", "start", *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 15) -> None:
        wait_for(lambda: any("ready to proxy client requests" in ln for ln in self.lines), timeout)

    def stop(self) -> int | None:
        stop_process(self.proc, timeout=5)
        self._reader.join(5)
        return self.proc.returncode


class Etcdgw:
    """etcdgw with one engine, through tests/_gateway.py's GatewayProc."""

    def __init__(self, impl: str, args: list[str], nofile: int | None = None) -> None:
        self.g = GatewayProc(["start", *args], impl=impl)
        self.nofile = nofile

    @property
    def pid(self) -> int:
        return self.g.pid

    @property
    def proc(self) -> subprocess.Popen[str]:
        return self.g.proc

    def wait_ready(self, timeout: float = 15) -> None:
        self.g.wait_ready(timeout)
        if self.nofile:
            resource.prlimit(self.pid, resource.RLIMIT_NOFILE, (self.nofile, self.nofile))

    def stop(self) -> int | None:
        return self.g.stop(timeout=10)


Proxy = GoGateway | Etcdgw


@contextlib.contextmanager
def proxy(kind: str, args: list[str], nofile: int | None = None) -> Iterator[Proxy]:
    p: Proxy = GoGateway(args, nofile) if kind == "go" else Etcdgw(kind.split("-")[1], args, nofile)
    try:
        p.wait_ready()
        yield p
    finally:
        p.stop()


def listen_args(port: int, endpoints: list[str], *extra: str) -> list[str]:
    return [f"--listen-addr=127.0.0.1:{port}", "--endpoints=" + ",".join(endpoints), *extra]


# --- scenarios -------------------------------------------------------------------------------


def half_close(kind: str) -> dict[str, Any]:
    backend = socket.create_server(("127.0.0.1", 0))
    port = free_tcp_port()

    def serve() -> None:
        with contextlib.suppress(OSError):
            c, _ = backend.accept()
            with c:
                n = 0
                while chunk := c.recv(65536):
                    n += len(chunk)
                time.sleep(0.2)
                c.sendall(b"got %d" % n)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        with proxy(kind, listen_args(port, [f"127.0.0.1:{backend.getsockname()[1]}"])):
            with connect(port) as s:
                s.sendall(b"x" * 1000)
                s.shutdown(socket.SHUT_WR)
                reply, err = rel.read_all(s, timeout=5)
    finally:
        backend.close()
        t.join(5)
    return {"reply": reply.decode(errors="replace"), "error": repr(err) if err else ""}


def emfile(kind: str) -> dict[str, Any]:
    port = free_tcp_port()
    with TagServer("t") as backend, proxy(kind, listen_args(port, [backend.addr]), 64) as p:
        clients = []
        for _ in range(60):
            try:
                clients.append(connect(port, timeout=2))
            except OSError:
                break  # refused: the process is gone (the Go gateway exits on EMFILE)
        outcome = rel.knock(port, clients, within=5)
        time.sleep(1)
        alive = p.proc.poll() is None
        rc = p.proc.returncode
        for s in clients:
            s.close()
        served_after = None
        t0 = time.monotonic()
        while alive and not served_after and time.monotonic() - t0 < 10:
            with contextlib.suppress(OSError), connect(port, timeout=2) as s:
                served_after = read_line(s) == b"t\n"
            time.sleep(0.2)
    return {
        "clients": len(clients),
        **outcome,
        "process_alive": alive,
        "exit_code": rc,
        "serves_after_fds_free": served_after,
    }


def silent(kind: str, cap: float) -> dict[str, Any]:
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(0)
    fillers = []
    for _ in range(4):  # fill the accept queue: further SYNs are dropped
        c = socket.socket()
        c.setblocking(False)
        c.connect_ex(lst.getsockname())
        fillers.append(c)
    time.sleep(0.2)
    port = free_tcp_port()
    try:
        with TagServer("alive") as alive:
            eps = [f"127.0.0.1:{lst.getsockname()[1]}", alive.addr]
            with proxy(kind, listen_args(port, eps)):
                t0 = time.monotonic()
                try:
                    with connect(port, timeout=cap) as s:
                        got = read_line(s).decode().strip()
                except TimeoutError:
                    got = f"(nothing within the {cap:.0f}s cap)"
                waited = time.monotonic() - t0
    finally:
        for c in fillers:
            c.close()
        lst.close()
    return {"first_client_answer": got, "first_client_wait_s": round(waited, 2)}


def refusal(kind: str, trials: int = 3) -> dict[str, Any]:
    windows = []
    for _ in range(trials):
        port, up = free_tcp_port(), free_tcp_port()
        with proxy(kind, listen_args(port, [f"127.0.0.1:{up}"], "--retry-delay=5s")):
            with connect(port) as s:
                assert s.recv(10) == b"", "expected the client to be closed"
            time.sleep(0.3)  # the endpoint is marked inactive
            with TagServer("back", port=up):
                t0 = time.monotonic()
                while time.monotonic() - t0 < 30:
                    try:
                        with connect(port, timeout=2) as s:
                            if read_line(s) == b"back\n":
                                break
                    except OSError:
                        pass
                    time.sleep(0.1)
                windows.append(round(time.monotonic() - t0, 2))
    return {"retry_delay": "5s", "refused_for_s": windows}


def frozen(kind: str, cap: float = 60.0) -> dict[str, Any]:
    """The backend is SIGSTOPped while a client pushes data to it: is the client cut off?

    The frozen process's kernel still ACKs keepalive probes; only TCP_USER_TIMEOUT (etcdgw
    sets it to 4 x --tcp-keepalive, here 2s) ends a connection whose window stays shut.
    """
    port = free_tcp_port()
    extra = [] if kind == "go" else ["--tcp-keepalive=2s"]
    with rel.Backend(tag="f") as backend, proxy(kind, listen_args(port, [backend.addr], *extra)):
        s = connect(port)
        try:
            assert read_line(s) == b"f\n"
            os.kill(backend.pid, signal.SIGSTOP)
            try:
                took, how = rel.sent_then_ended(s, limit=cap)
            finally:
                os.kill(backend.pid, signal.SIGCONT)
        finally:
            s.close()
    return {"flags": " ".join(extra), "pushing_client_ended_s": round(took, 1), "how": how}


def idle_memory(kind: str) -> dict[str, Any]:
    # The Go gateway holds 6 fds per idle connection (2 sockets + a splice pipe per
    # direction, blocked in splice), so 9,000 do not fit under a 20,000 fd limit: beyond
    # ~3,300 its dials fail with EMFILE and it deactivates the endpoint for --retry-delay.
    n = 3000 if kind == "go" else 9000
    hard = rel.raise_nofile()
    port = free_tcp_port()
    with rel.Backend() as backend, proxy(kind, listen_args(port, [backend.addr])) as p:
        resource.prlimit(p.pid, resource.RLIMIT_NOFILE, (hard, hard))
        for s in rel.open_clients(port, 200, tag="warm"):
            s.close()
        time.sleep(1)
        base = rel.proc_mem(p.pid)
        base_fds = len(os.listdir(f"/proc/{p.pid}/fd"))
        socks = rel.open_clients(port, n)
        try:
            time.sleep(1)
            mem = rel.proc_mem(p.pid)
            fds = len(os.listdir(f"/proc/{p.pid}/fd"))
        finally:
            for s in socks:
                s.close()
    return {
        "connections": n,
        "pss_per_conn_b": round((mem["Pss"] - base["Pss"]) / n),
        "rss_per_conn_b": round((mem["Rss"] - base["Rss"]) / n),
        "fds_per_conn": round((fds - base_fds) / n, 2),
    }


def fd_ceiling(kind: str) -> dict[str, Any]:
    """Under a 20,000 fd limit, open 9,000 connections: how many are served?"""
    hard = rel.raise_nofile()
    port = free_tcp_port()
    with rel.Backend() as backend, proxy(kind, listen_args(port, [backend.addr])) as p:
        resource.prlimit(p.pid, resource.RLIMIT_NOFILE, (hard, hard))
        socks: list[socket.socket] = []
        failed_at = None
        try:
            for start in range(0, 9000, 500):
                try:
                    socks += rel.open_clients(port, 500, tag=f"f{start}")
                except AssertionError:
                    failed_at = start
                    break
            logs = getattr(p, "lines", None) or getattr(getattr(p, "g", None), "lines", [])
            deactivated = [ln for ln in logs if "deactivated endpoint" in ln]
            refused_after = False
            with contextlib.suppress(OSError), connect(port, timeout=5) as s:
                s.sendall(b"x\n")
                refused_after = s.recv(10) == b""
            alive = p.proc.poll() is None
            rc = p.proc.returncode
        finally:
            for s in socks:
                s.close()
    return {
        "nofile": hard,
        "served_connections": len(socks),
        "first_failing_batch_at": failed_at,
        "endpoint_deactivated": bool(deactivated),
        "deactivation": deactivated[0][:200] if deactivated else "",
        "new_client_refused_after": refused_after,
        "process_alive": alive,
        "exit_code": rc,
    }


def slow_reader(kind: str) -> dict[str, Any]:
    chunks = (1 << 30) // rel.CHUNK
    port = free_tcp_port()
    with rel.Backend(stream_chunks=chunks, seed=1) as backend:
        with proxy(kind, listen_args(port, [backend.addr])) as p:
            return rel.slow_reader(p, port, chunks, 1, stalls=1)  # type: ignore[arg-type]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated scenarios")
    ap.add_argument("--proxies", default=",".join(PROXIES), help="comma-separated proxies")
    ap.add_argument("--silent-cap", type=float, default=150.0, help="seconds (silent)")
    ap.add_argument("--out", default=str(REPO / "bench" / "out"))
    a = ap.parse_args()
    if shutil.which("etcd") is None and "go" in a.proxies:
        print("etcd (the Go gateway) is not installed: run `make setup`", file=sys.stderr)
        return 1
    runs: dict[str, Callable[[str], dict[str, Any]]] = {
        "half-close": half_close,
        "emfile": emfile,
        "silent": lambda k: silent(k, a.silent_cap),
        "refusal": refusal,
        "frozen": frozen,
        "idle-memory": idle_memory,
        "fd-ceiling": fd_ceiling,
        "slow-reader": slow_reader,
    }
    results: dict[str, dict[str, Any]] = {}
    for name in a.only.split(","):
        for kind in a.proxies.split(","):
            t0 = time.monotonic()
            try:
                res = runs[name](kind)
            except Exception as e:  # one broken cell must not lose the others
                res = {"failed": repr(e)}
            res["seconds"] = round(time.monotonic() - t0, 1)
            results.setdefault(name, {})[kind] = res
            print(f"{name:12} {kind:14} {json.dumps(res)}", flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"go-faults-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"etcd": _etcd_version(), "results": results}, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


def _etcd_version() -> str:
    with contextlib.suppress(OSError):
        r = subprocess.run(["etcd", "--version"], capture_output=True, text=True, timeout=10)
        return r.stdout.splitlines()[0] if r.stdout else ""
    return ""


if __name__ == "__main__":
    os.environ.pop("ETCDGW_NO_EXTENSIONS", None)
    sys.exit(main())
