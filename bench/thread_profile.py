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
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from backends import HttpBackend
from procs import free_port
from scale_measure import build_loadgen

if TYPE_CHECKING:  # imported in main(), after ETCDGW_BENCH_BASE is set
    from proxies import Proxy

HZ = 4000


def one(proxy_: Proxy, args: argparse.Namespace, backend: HttpBackend, loadgen: Path) -> str:
    """One proxy (bench/proxies.py's launcher) under the churn; its line of figures."""
    port = free_port()
    tmp = Path(args.tmp)
    name = proxy_.name
    proxy = proxy_.start(port, backend.endpoints, tmp)
    assert proxy is not None
    data = tmp / f"perf-{name}-{port}.data"
    perf: subprocess.Popen[bytes] | None = None
    done = 0
    try:
        time.sleep(0.5)
        lg = subprocess.Popen(
            [str(loadgen), "churn", f"127.0.0.1:{port}", "--rate", str(args.rate)]
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
        proxy.stop()
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
        return f"{name}: no connection answered"
    per = {tid: n / HZ / done * 1e6 for tid, n in user.items()}
    threads = ", ".join(f"thread {t} {v:.2f}" for t, v in sorted(per.items(), key=lambda x: -x[1]))
    return f"{name}: {sum(per.values()):.2f} µs user per connection ({threads}; {done:,} conns)"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rate", type=int, default=5000)
    p.add_argument("--seconds", type=int, default=8)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--base", default="", help="src/ of a checkout to compare with")
    p.add_argument("--no-pen", action="store_true")
    args = p.parse_args()
    if args.base:  # read when bench/proxies.py is imported: its etcdgw-cython-base
        os.environ["ETCDGW_BENCH_BASE"] = args.base
    from proxies import PROXIES

    runs = ["etcdgw-cython"] + (["etcdgw-cython-base"] if args.base else [])
    runs += [] if args.no_pen else ["pen"]
    for name in runs:
        why = PROXIES[name].check()
        if why:
            raise SystemExit(f"{name}: {why}")
    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = tmp
        loadgen = build_loadgen(Path(tmp))
        backend = HttpBackend(Path(tmp))
        try:
            for rep in range(args.reps):
                for name in runs:
                    print(
                        f"rep {rep + 1}: {one(PROXIES[name], args, backend, loadgen)}", flush=True
                    )
        finally:
            backend.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
