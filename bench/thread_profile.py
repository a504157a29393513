"""User-space CPU per new connection, per thread, against pen (issue 21), from perf samples.

bench/scale.py's user/system split is the share of tick samples, coarse at low rates. This
asks the kernel's sampler instead: `perf record -e cpu-clock` on the proxy while
bench/loadgen.c opens --rate new connections a second (one request each) through it to
bench/httpd.c, then counts each thread's user-space samples over the connections answered.
In a VM a sample that falls due in the kernel lands on the first user instruction after the
system call returns, so every proxy's figure includes that skid: compare them side by side.

    python3 bench/thread_profile.py [--rate 5000] [--seconds 8] [--reps 2]
        [--base CHECKOUT/src] [--no-pen]

Runs etcdgw (the Cython engine of this tree; with --base also that checkout's) and pen,
interleaved, --reps times, and prints µs of user time per connection per thread and in
total. Needs perf, pen and gcc; loopback only; stops what it started by PID.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from backends import build_httpd
from procs import free_port
from scale_measure import build_loadgen

REPO = Path(__file__).resolve().parent.parent
HZ = 4000


def start_proxy(kind: str, src: str, port: int, backends: list[int]) -> subprocess.Popen[bytes]:
    ends = [f"127.0.0.1:{p}" for p in backends]
    if kind == "pen":
        argv = ["pen", "-f", "-r", "-x", "9600", f"127.0.0.1:{port}", *ends]
        env = dict(os.environ)
    else:
        argv = [sys.executable, "-m", "etcdgw", "start", f"--listen-addr=127.0.0.1:{port}"]
        argv += ["--endpoints=" + ",".join(ends), "--log-level=warn"]
        env = {k: v for k, v in os.environ.items() if k != "ETCDGW_NO_EXTENSIONS"}
        env["PYTHONPATH"] = src
    proc = subprocess.Popen(argv, env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError(f"{kind} did not start") from None
            time.sleep(0.05)


def one(kind: str, src: str, args: argparse.Namespace, tools: dict[str, Path]) -> str:
    port = free_port()
    proxy = start_proxy(kind, src, port, args.backends)
    data = Path(args.tmp) / f"perf-{kind}-{port}.data"
    perf: subprocess.Popen[bytes] | None = None
    done = 0
    try:
        time.sleep(0.5)
        lg = subprocess.Popen(
            [str(tools["loadgen"]), "churn", f"127.0.0.1:{port}", "--rate", str(args.rate)]
            + ["--duration", str(args.seconds), "--warmup", "1"],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert lg.stdout is not None
        for line in lg.stdout:
            if line.startswith("MEASURE_START"):
                perf = subprocess.Popen(
                    ["perf", "record", "-q", "-e", "cpu-clock", "-F", str(HZ), "-p"]
                    + [str(proxy.pid), "-o", str(data)],
                    stderr=subprocess.DEVNULL,
                )
            elif line.startswith("MEASURE_END") and perf is not None:
                perf.send_signal(signal.SIGINT)
                perf.wait(30)
            elif line.startswith("LOADGEN_JSON"):
                done = int(json.loads(line.split(" ", 1)[1]).get("completed", 0))
        lg.wait(args.seconds + 60)
    finally:
        proxy.send_signal(signal.SIGTERM)
        try:
            proxy.wait(15)
        except subprocess.TimeoutExpired:
            proxy.kill()
            proxy.wait()
    out = subprocess.run(
        ["perf", "script", "-i", str(data), "-F", "tid,ip,dso", "-G"],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    data.unlink(missing_ok=True)
    user: Counter[str] = Counter()
    for line in out.splitlines():
        f = line.split()
        if f and "kernel" not in line:
            user[f[0]] += 1
    if not done:
        return f"{kind}: no connection answered"
    per = {tid: n / HZ / done * 1e6 for tid, n in user.items()}
    threads = ", ".join(f"thread {t} {v:.2f}" for t, v in sorted(per.items(), key=lambda x: -x[1]))
    return f"{kind}: {sum(per.values()):.2f} µs user per connection ({threads}; {done:,} conns)"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rate", type=int, default=5000)
    p.add_argument("--seconds", type=int, default=8)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--base", default="", help="src/ of a checkout to compare with")
    p.add_argument("--no-pen", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = tmp
        tools = {"loadgen": build_loadgen(Path(tmp))}
        args.backends = [free_port() for _ in range(3)]
        httpd = subprocess.Popen(
            [str(build_httpd(Path(tmp))), *map(str, args.backends)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        try:
            assert httpd.stdout is not None
            httpd.stdout.readline()  # "ready"
            runs = [("etcdgw", str(REPO / "src"))]
            if args.base:
                runs.append(("etcdgw-base", args.base))
            if not args.no_pen:
                runs.append(("pen", ""))
            for rep in range(args.reps):
                for kind, src in runs:
                    line = one("pen" if kind == "pen" else "etcdgw", src, args, tools)
                    print(f"rep {rep + 1}: {kind}{line[line.index(':') :]}", flush=True)
        finally:
            httpd.terminate()
            httpd.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
