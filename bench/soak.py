"""`make soak`: mixed traffic through etcdgw to a real 3-member etcd cluster, members killed."""

# What runs, all through one etcdgw (either engine) on loopback:
#   churn       a new connection per request (HTTP/JSON put), as fast as it goes
#   keepalive   long-lived connections doing range + put request/response in a loop
#   watch       HTTP watch streams on a prefix; a writer puts numbered keys; after a cut a
#               watch resumes from the revision after the last one it saw, so at the end
#               every watcher must have seen every acknowledged write (nothing lost, nothing
#               corrupted on the way)
#   faults      every --kill-every seconds one member is SIGKILLed, and restarted
#               --down-for seconds later (one at a time: the cluster keeps its quorum)
#   sampler     the gateway's fd count, socket count, RSS, PSS and CPU every second
# An error is expected when it falls in a fault window (a connection cut by the killed
# member, or etcd without a leader for a moment); any other error fails the soak, as do fd
# growth and RSS growth. The summary is printed and written to bench/out/soak-*.json.
# Usage: python3 bench/soak.py [--minutes 30 | --seconds 60] [--engine cython|python]

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tests"), str(REPO / "src")]

import test_reliability as rel  # noqa: E402
from _etcd import EtcdCluster  # noqa: E402
from _gateway import GatewayProc, connect, free_tcp_port  # noqa: E402

FAULT_GRACE = 8.0  # seconds after a restarted member is healthy during which errors count as
# the fault's: clients back off and re-dial, and etcd may elect a new leader
RSS_GROWTH_LIMIT = 8 << 20  # bytes between the first and the last tenth of the run


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


@dataclass
class Stats:
    """Thread-safe counters and the error log of the whole run."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    ok: Counter[str] = field(default_factory=Counter)
    errors: list[tuple[float, str, str]] = field(default_factory=list)

    def good(self, what: str, n: int = 1) -> None:
        with self.lock:
            self.ok[what] += n

    def bad(self, what: str, err: BaseException | str) -> None:
        with self.lock:
            self.errors.append((time.time(), what, str(err)[:200]))


class Soak:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.a = args
        self.cluster = EtcdCluster(workdir / "etcd")
        self.port = free_tcp_port()
        self.stats = Stats()
        self.stop = threading.Event()
        self.faults: list[dict[str, Any]] = []
        self.samples: list[dict[str, float]] = []
        self.acked: set[int] = set()  # watch-writer sequence numbers etcd acknowledged
        self.seen: list[set[int]] = []
        self.g: GatewayProc | None = None
        self.start_rev = 0
        self.final_deadline = float("inf")

    # -- plumbing --

    def request(self, s: socket.socket, path: str, body: dict[str, Any]) -> dict[str, Any]:
        answer = rel.http_post(s, path, body)
        if "header" not in answer:  # an etcd error answer: {"error": ..., "code": ...}
            raise RuntimeError(f"etcd error: {json.dumps(answer)[:150]}")
        return answer

    def connect(self) -> socket.socket:
        return connect(self.port, timeout=5)

    # -- workers --

    def churn(self, n: int) -> None:
        i = 0
        while not self.stop.is_set():
            i += 1
            try:
                with self.connect() as s:
                    self.request(
                        s, "/v3/kv/put", {"key": b64(f"soak/churn/{n}"), "value": b64(str(i))}
                    )
                self.stats.good("churn")
            except Exception as e:  # noqa: BLE001 - every failure is recorded and judged
                self.stats.bad("churn", e)
                time.sleep(0.2)

    def keepalive(self, n: int) -> None:
        s: socket.socket | None = None
        i = 0
        while not self.stop.is_set():
            i += 1
            try:
                if s is None:
                    s = self.connect()
                key = b64(f"soak/keep/{n}")
                self.request(s, "/v3/kv/put", {"key": key, "value": b64(str(i))})
                got = self.request(s, "/v3/kv/range", {"key": key})
                value = base64.b64decode(got["kvs"][0]["value"]).decode()
                if value != str(i):  # our own last write, read back (linearizable range)
                    raise RuntimeError(f"read {value!r} after writing {i}")
                self.stats.good("keepalive", 2)
            except Exception as e:  # noqa: BLE001
                self.stats.bad("keepalive", e)
                if s is not None:
                    s.close()
                s = None
                time.sleep(0.2)
        if s is not None:
            s.close()

    def writer(self) -> None:
        seq = 0
        while not self.stop.is_set():
            seq += 1
            try:
                with self.connect() as s:
                    self.request(
                        s, "/v3/kv/put", {"key": b64(f"soak/w/{seq:09d}"), "value": b64(str(seq))}
                    )
                with self.stats.lock:
                    self.acked.add(seq)
                self.stats.good("watch-put")
            except Exception as e:  # noqa: BLE001
                self.stats.bad("watch-put", e)
            time.sleep(0.02)

    def watcher(self, n: int) -> None:
        seen = self.seen[n]
        rev = self.start_rev  # the last revision seen: resume after it
        while not self.stop.is_set() or not self.caught_up(seen):
            if self.stop.is_set() and time.monotonic() > self.final_deadline:
                return
            try:
                with self.connect() as s:
                    s.settimeout(2)
                    body: dict[str, Any] = {"key": b64("soak/w/"), "range_end": b64("soak/w0")}
                    body["start_revision"] = str(rev + 1)
                    raw = json.dumps({"create_request": body})
                    s.sendall(
                        f"POST /v3/watch HTTP/1.1\r\nHost: etcd\r\nContent-Length: {len(raw)}"
                        f"\r\n\r\n{raw}".encode()
                    )
                    for msg in watch_messages(
                        s, lambda: self.stop.is_set() and self.caught_up(seen)
                    ):
                        result = msg.get("result", {})
                        for ev in result.get("events") or []:
                            kv = ev["kv"]
                            seq = int(base64.b64decode(kv["value"]))
                            if base64.b64decode(kv["key"]).decode() != f"soak/w/{seq:09d}":
                                raise RuntimeError(f"key/value mismatch in event {kv}")
                            seen.add(seq)
                            rev = max(rev, int(kv["mod_revision"]))
                            self.stats.good("watch-event")
                    if self.stop.is_set():
                        return
                    raise ConnectionError("watch stream ended")
            except Exception as e:  # noqa: BLE001
                if not (self.stop.is_set() and self.caught_up(seen)):
                    self.stats.bad("watch", e)
                time.sleep(0.2)

    def caught_up(self, seen: set[int]) -> bool:
        with self.stats.lock:
            return self.acked <= seen

    def faulter(self) -> None:
        i = 0
        while not self.stop.wait(self.a.kill_every):
            victim = i % 3
            i += 1
            t0 = time.time()
            self.cluster.kill(victim)
            if self.stop.wait(self.a.down_for):
                self.cluster.restart(victim, wait=False)
                self.faults.append({"member": victim, "killed": t0, "back": time.time()})
                return
            try:
                self.cluster.restart(victim, wait=True, timeout=60)
            except Exception as e:  # noqa: BLE001 - recorded; the run goes on
                self.stats.bad("restart", e)
            self.faults.append({"member": victim, "killed": t0, "back": time.time()})

    def sampler(self) -> None:
        assert self.g is not None
        pid = self.g.pid
        while not self.stop.wait(1.0):
            with contextlib.suppress(OSError):
                mem = rel.proc_mem(pid)
                self.samples.append(
                    {
                        "t": time.time(),
                        "fds": len(os.listdir(f"/proc/{pid}/fd")),
                        "sockets": rel.socket_fds(pid),
                        "rss": mem["Rss"],
                        "pss": mem["Pss"],
                        "cpu": rel.proc_cpu(pid),
                    }
                )

    # -- the run --

    def run(self) -> dict[str, Any]:
        a = self.a
        self.cluster.start()
        try:
            self.g = GatewayProc(
                [
                    "start",
                    "--endpoints=" + ",".join(self.cluster.endpoints),
                    f"--listen-addr=127.0.0.1:{self.port}",
                    "--retry-delay=1s",
                    "--dial-timeout=1s",
                    "--tcp-keepalive=2s",
                    "--drain-timeout=2s",
                    *self.a.gateway_arg,
                ],
                impl=a.engine,
            )
            self.g.wait_ready()
            base_sockets = rel.socket_fds(self.g.pid)
            base_fds = len(os.listdir(f"/proc/{self.g.pid}/fd"))
            self.seen = [set() for _ in range(a.watchers)]
            # Watches start at the revision before any watched write: none can be missed.
            with self.connect() as s:
                self.start_rev = int(
                    self.request(s, "/v3/kv/range", {"key": b64("soak/")})["header"]["revision"]
                )
            self.final_deadline = float("inf")
            threads = [threading.Thread(target=self.churn, args=(n,)) for n in range(a.churn)]
            threads += [threading.Thread(target=self.keepalive, args=(n,)) for n in range(a.keep)]
            threads += [threading.Thread(target=self.watcher, args=(n,)) for n in range(a.watchers)]
            threads += [threading.Thread(target=self.writer)]
            side = [threading.Thread(target=self.faulter), threading.Thread(target=self.sampler)]
            started = time.time()
            for t in threads + side:
                t.daemon = True
                t.start()
            self.stop.wait(a.seconds)
            self.final_deadline = time.monotonic() + 20
            self.stop.set()
            for t in side:
                t.join(90)
            for t in threads:
                t.join(30)
            stuck = [t.name for t in threads + side if t.is_alive()]
            # Every client closed: the gateway must be back to its idle socket count.
            t0 = time.monotonic()
            while rel.socket_fds(self.g.pid) != base_sockets and time.monotonic() - t0 < 30:
                time.sleep(0.2)
            end_sockets = rel.socket_fds(self.g.pid)
            end_fds = len(os.listdir(f"/proc/{self.g.pid}/fd"))
            alive = self.g.proc.poll() is None
            rc = self.g.stop()
            return self.summary(
                started, base_sockets, end_sockets, base_fds, end_fds, alive, rc, stuck
            )
        finally:
            if self.g is not None:
                self.g.stop()
            self.cluster.stop()

    def summary(
        self,
        started: float,
        base_sockets: int,
        end_sockets: int,
        base_fds: int,
        end_fds: int,
        alive: bool,
        rc: int,
        stuck: list[str],
    ) -> dict[str, Any]:
        windows = [(f["killed"] - 0.5, f["back"] + FAULT_GRACE) for f in self.faults]
        expected, unexpected = Counter[str](), []
        for t, what, err in self.stats.errors:
            if any(lo <= t <= hi for lo, hi in windows):
                expected[what] += 1
            else:
                unexpected.append({"t": round(t - started, 1), "what": what, "error": err})
        missing = [len(self.acked - seen) for seen in self.seen]
        rss_growth = 0
        s = self.samples
        if len(s) >= 10:
            tenth = max(1, len(s) // 10)
            # After the first tenth: the first kills and allocator warm-up are behind us.
            first = statistics.median(x["rss"] for x in s[tenth : 2 * tenth])
            last = statistics.median(x["rss"] for x in s[-tenth:])
            rss_growth = int(last - first)
        fd_growth = end_fds - base_fds
        ok = (
            alive
            and rc == 0
            and not stuck
            and not unexpected
            and not any(missing)
            and end_sockets == base_sockets
            and fd_growth <= 0
            and rss_growth < RSS_GROWTH_LIMIT
            and self.stats.ok["churn"] > 0
        )
        return {
            "engine": self.a.engine,
            "seconds": self.a.seconds,
            "result": "pass" if ok else "FAIL",
            "requests_ok": dict(self.stats.ok),
            "faults": len(self.faults),
            "fault_windows_s": [
                [round(lo - started, 1), round(hi - started, 1)] for lo, hi in windows
            ],
            "errors_in_fault_windows": dict(expected),
            "errors_unexpected": unexpected[:50],
            "errors_unexpected_total": len(unexpected),
            "watch_events_missing_per_watcher": missing,
            "acknowledged_watched_writes": len(self.acked),
            "gateway": {
                "alive_at_end": alive,
                "exit_code": rc,
                "sockets_start_end": [base_sockets, end_sockets],
                "fds_start_end": [base_fds, end_fds],
                "fd_max": max((x["fds"] for x in s), default=0),
                "rss_kib_first_last": [s[0]["rss"] // 1024, s[-1]["rss"] // 1024] if s else [],
                "rss_growth_kib": rss_growth // 1024,
                "rss_max_kib": max((x["rss"] for x in s), default=0) // 1024,
                "cpu_s": round(s[-1]["cpu"], 1) if s else 0,
            },
            "stuck_threads": stuck,
            "samples": [
                {k: (round(v - started, 1) if k == "t" else v) for k, v in x.items()} for x in s
            ],
        }


def watch_messages(s: socket.socket, done: Any) -> Any:
    """Yield the JSON messages of a chunked grpc-gateway watch stream until it ends."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += recv_or_idle(s, done)
    head, _, buf = buf.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"watch refused: {head[:100]!r}")
    body = b""
    while True:
        while b"\r\n" not in buf:
            buf += recv_or_idle(s, done)
        size_line, _, buf = buf.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return
        while len(buf) < size + 2:
            buf += recv_or_idle(s, done)
        body += buf[:size]
        buf = buf[size + 2 :]
        while b"\n" in body:
            line, _, body = body.partition(b"\n")
            if line.strip():
                yield json.loads(line)


class _Idle(Exception):
    """The watch is idle and the run is over."""


def recv_or_idle(s: socket.socket, done: Any) -> bytes:
    while True:
        try:
            d = s.recv(65536)
        except TimeoutError:
            if done():
                raise _Idle() from None
            continue
        if not d:
            raise ConnectionError("watch stream closed")
        return d


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--minutes", type=float, default=2.0, help="run length (default 2: a smoke)")
    ap.add_argument("--seconds", type=float, help="run length in seconds (wins over --minutes)")
    ap.add_argument("--engine", choices=("cython", "python"), default="cython")
    ap.add_argument("--kill-every", type=float, default=20.0, help="seconds between kills")
    ap.add_argument("--down-for", type=float, default=5.0, help="seconds a member stays down")
    ap.add_argument("--churn", type=int, default=2, help="churn threads")
    ap.add_argument("--keep", type=int, default=2, help="keep-alive threads")
    ap.add_argument("--watchers", type=int, default=3, help="watch streams")
    ap.add_argument("--out", default=str(REPO / "bench" / "out"))
    ap.add_argument(
        "--gateway-arg",
        action="append",
        default=[],
        help="extra etcdgw flag (repeatable), e.g. --gateway-arg=--log-level=debug",
    )
    a = ap.parse_args()
    a.seconds = a.seconds if a.seconds is not None else a.minutes * 60
    with tempfile.TemporaryDirectory(prefix="etcdgw-soak-") as tmp:
        soak = Soak(a, Path(tmp))
        summary = soak.run()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"soak-{a.engine}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    if soak.g is not None:  # the gateway's own log, next to the summary
        path.with_suffix(".gateway.log").write_text("\n".join(soak.g.lines) + "\n")
    brief = {k: v for k, v in summary.items() if k not in ("samples", "errors_unexpected")}
    print(json.dumps(brief, indent=2))
    for e in summary["errors_unexpected"][:10]:
        print("unexpected:", e)
    print(f"soak {summary['result']}: {path}")
    return 0 if summary["result"] == "pass" else 1


if __name__ == "__main__":
    sys.exit(main())
