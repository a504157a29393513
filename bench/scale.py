"""`make bench-scale`: how each proxy's cost grows as the work grows, every peer side by side.

Three sweeps on bench/httpd.c (the cheap backend) and one on the real etcd cluster, one
interleaved run (every proxy once per repetition, the order rotated), inside a network
namespace of its own:

  held     N connections held open (a keep-alive trickle), N = 1,000, 3,000, 9,000: proxy
           memory (PSS) and kernel socket memory per connection, CPU per second at idle,
           time to accept all N; then a paced prober beside them: proxy CPU per request and
           latency p50/p99/p99.9/max
  rr       kept-alive requests at offered rates up to saturation (open loop)
  churn    new connections per second up to saturation (one request each)
  rr-etcd  kept-alive requests to the etcd cluster, at the rates etcd itself can carry

bench/README.md ("Scaling") says what each figure is; bench/RESULTS.md has the curves.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

# bench/ is sys.path[0] when run as `python3 bench/scale.py`.
from backends import Backend, EtcdBackend, HttpBackend
from procs import Proc, free_port, raise_nofile
from proxies import PROXIES
from scale_measure import (
    HoldGroup,
    Load,
    build_loadgen,
    cpu_between,
    fd_count,
    kernel_memory_kb,
    memory,
    nofile_soft,
    run_load,
    snap,
    tcp_inuse,
    tree,
)

BENCH = Path(__file__).resolve().parent
SWEEPS = ("held", "rr", "churn", "rr-etcd")
DEFAULT_PROXIES = (
    "etcdgw-cython",
    "etcdgw-python",
    "go-gateway",
    "haproxy",
    "nginx",
    "pen",
    "direct",
)
IN_NETNS = "ETCDGW_SCALE_NETNS"  # set on the re-executed run inside its namespace
# The namespace's own settings: ephemeral ports above the listeners (bench/procs.py puts
# listeners below the range), deep accept queues, TIME_WAIT reuse for the churn sweep.
NETNS_SYSCTLS = {
    "net/ipv4/ip_local_port_range": "20000 64999",
    "net/core/somaxconn": "65535",
    "net/ipv4/tcp_max_syn_backlog": "65535",
    "net/ipv4/tcp_tw_reuse": "1",
}
# Source addresses of the churn sweep's clients: 8 x 45,000 ephemeral ports, so TIME_WAIT
# never runs one 4-tuple space dry (the whole 127/8 is local on lo).
CHURN_SRCS = tuple(f"127.0.0.{i}" for i in range(2, 10))

# What a point costs besides its measured seconds (for the plan and the ETA), from the
# smoke runs' per-point wall times (bench/out/scale-*.json "t_s"), rounded up: starting and
# stopping a proxy (0.3-0.8 s), a load-generator run's set-up and drain (under 0.1 s), the
# figures a held point reads (0.1-0.3 s), opening held connections (10,000-15,000/s).
START_S, STOP_S, LOAD_OVERHEAD_S, HELD_OVERHEAD_S, OPEN_PER_S = 1.0, 0.5, 0.2, 0.4, 5000


@dataclass
class Config:
    reps: int = 3
    held: list[int] = field(default_factory=lambda: [1000, 3000, 9000])
    rr_rates: list[float] = field(
        default_factory=lambda: [2000, 10000, 20000, 30000, 40000, 50000, 60000, 75000, 90000]
    )
    churn_rates: list[float] = field(
        default_factory=lambda: [1000, 2000, 4000, 6000, 8000, 10000, 12000, 15000]
    )
    etcd_rates: list[float] = field(default_factory=lambda: [500, 1500, 3000, 5000, 7500])
    probe_rate: float = 10000
    probe_conns: int = 16
    probe_s: float = 4.0
    idle_s: float = 2.0
    settle_s: float = 1.0
    trickle_s: float = 30.0
    warmup_s: float = 0.5
    point_min_s: float = 2.0
    point_max_s: float = 3.0
    samples: int = 200_000
    rr_conns: int = 32

    def point_seconds(self, rate: float) -> float:
        """Measured seconds of a rate point: enough for `samples` where time allows."""
        return min(self.point_max_s, max(self.point_min_s, self.samples / rate))


@dataclass
class Point:
    sweep: str
    proxy: str
    rep: int
    x: float  # held connections, or the offered rate
    budget_s: float
    first: bool = False  # the first point of its cell: carries the proxy's start and stop


def build_plan(cfg: Config, sweeps: list[str], proxies: list[str]) -> list[Point]:
    """Every point in run order: sweep, repetition, proxy (rotated), then x ascending."""
    plan: list[Point] = []
    for sweep in sweeps:
        for rep in range(cfg.reps):
            for proxy in rotated(proxies, rep):
                xs = _xs(cfg, sweep)
                prev = 0.0
                for i, x in enumerate(xs):
                    if sweep == "held":
                        opening = (x - prev) / OPEN_PER_S
                        budget = opening + cfg.settle_s + cfg.idle_s + HELD_OVERHEAD_S
                        budget += cfg.warmup_s + cfg.probe_s + LOAD_OVERHEAD_S
                    else:
                        budget = cfg.warmup_s + cfg.point_seconds(x) + LOAD_OVERHEAD_S
                    if i == 0:
                        budget += START_S + STOP_S + (cfg.settle_s if sweep == "held" else 0)
                    plan.append(Point(sweep, proxy, rep, x, round(budget, 2), first=i == 0))
                    prev = x
    return plan


def _xs(cfg: Config, sweep: str) -> list[float]:
    return {
        "held": [float(n) for n in cfg.held],
        "rr": cfg.rr_rates,
        "churn": cfg.churn_rates,
        "rr-etcd": cfg.etcd_rates,
    }[sweep]


def rotated(proxies: list[str], rep: int) -> list[str]:
    k = rep % len(proxies) if proxies else 0
    return proxies[k:] + proxies[:k]


def _fmt_s(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    """One line per point: what runs now, how many remain, elapsed and ETA.

    The ETA is the planned budget of what remains, scaled by how the finished points did
    against their budgets (between 0.5x and 2x, once five have run)."""

    def __init__(self, plan: list[Point], budget_s: float) -> None:
        self.total = len(plan)
        self.done = 0
        self.left_budget = sum(p.budget_s for p in plan)
        self.spent_budget = 0.0
        self.t0 = time.monotonic()
        self.budget_s = budget_s
        self.point_t0 = self.t0

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def eta(self) -> float:
        scale = 1.0
        if self.done >= 5 and self.spent_budget > 0:
            scale = min(2.0, max(0.5, self.elapsed() / self.spent_budget))
        return self.left_budget * scale

    def begin(self, p: Point, reps: int) -> None:
        self.point_t0 = time.monotonic()
        what = f"{p.x:,.0f} held" if p.sweep == "held" else f"{p.x:,.0f}/s"
        print(
            f"[{self.done + 1:3d}/{self.total}] {p.sweep:7s} {p.proxy:14s} rep {p.rep + 1}/{reps} "
            f"{what:>12s} | {_fmt_s(self.elapsed())} elapsed, ~{_fmt_s(self.eta())} left",
            flush=True,
        )

    def end(self, p: Point) -> None:
        self.done += 1
        self.left_budget -= p.budget_s
        self.spent_budget += p.budget_s

    def skip(self, p: Point) -> None:
        self.total -= 1
        self.left_budget -= p.budget_s

    def over(self) -> bool:
        return self.elapsed() > self.budget_s


# -- the namespace --------------------------------------------------------------------------


def enter_netns(argv: list[str]) -> None:
    """Re-execute this run in a new network namespace (unshare -n), once."""
    if os.environ.get(IN_NETNS) == "1":
        return
    if os.geteuid() != 0:
        raise SystemExit(
            "bench/scale.py: its network namespace needs root (run as root, or pass --no-netns)"
        )
    if shutil.which("unshare") is None:
        raise SystemExit("bench/scale.py: unshare not found (util-linux), or pass --no-netns")
    env = {**os.environ, IN_NETNS: "1"}
    script = str(Path(__file__).resolve())
    os.execvpe("unshare", ["unshare", "--net", "--", sys.executable, script, *argv], env)


def setup_netns() -> dict[str, str]:
    """Loopback up and the namespace's sysctls; returns what was set."""
    res = subprocess.run(
        ["ip", "link", "set", "lo", "up"], capture_output=True, text=True, timeout=10
    )
    if res.returncode != 0:
        raise SystemExit(f"bench/scale.py: ip link set lo up: {res.stderr.strip()}")
    out = {}
    for key, value in NETNS_SYSCTLS.items():
        path = Path("/proc/sys") / key
        try:
            path.write_text(value)
            out[key.replace("/", ".")] = path.read_text().strip().replace("\t", " ")
        except OSError as exc:
            out[key.replace("/", ".")] = f"not set: {exc}"
    return out


# -- running the cells ----------------------------------------------------------------------


@dataclass
class Ctx:
    cfg: Config
    exe: Path
    tmp: Path
    progress: Progress
    results: list[dict[str, Any]] = field(default_factory=list)


def _start(proxy: str, backend: Backend, celldir: Path) -> tuple[int, Proc | None]:
    if proxy == "direct":
        return int(backend.endpoints[0].rsplit(":", 1)[1]), None
    port = free_port()
    proc = PROXIES[proxy].start(port, backend.endpoints, celldir)
    assert proc is not None
    time.sleep(0.3)  # a master forks its worker right after it listens (nginx)
    return port, proc


def _record(ctx: Ctx, p: Point, metrics: dict[str, Any] | None, error: str = "") -> None:
    row: dict[str, Any] = {"sweep": p.sweep, "proxy": p.proxy, "rep": p.rep, "x": p.x}
    if not error.startswith("skipped"):
        row["t_s"] = round(time.monotonic() - ctx.progress.point_t0, 2)
        row["budget_s"] = p.budget_s
    if metrics is not None:
        row["metrics"] = metrics
    if error:
        row["error"] = error
    ctx.results.append(row)


def _summary_line(m: dict[str, Any], unit: str) -> str:
    parts = []
    if "kb_per_conn" in m:
        parts.append(f"PSS {m['kb_per_conn']:.2f} KB/conn (anon {m['anon_kb_per_conn']:.2f})")
    if "kernel_kb_per_conn" in m:
        parts.append(f"kernel {m['kernel_kb_per_conn']:.2f} KB/conn")
    if "idle_cpu_ms_per_s" in m:
        parts.append(f"idle {m['idle_cpu_ms_per_s']:.2f} ms CPU/s")
    if "open_total_s" in m:
        parts.append(f"{m['n']:,} opened in {m['open_total_s']:.2f} s")
    if "achieved" in m:
        parts.append(f"{m['achieved']:,.0f}/s of {m['offered']:,.0f}")
    lat = m.get("lat_us") or {}
    if lat.get("p50") is not None:
        parts.append(
            "p50/p99/p99.9/max {p50:,.0f}/{p99:,.0f}/{p999:,.0f}/{max:,.0f} µs".format(**lat)
        )
    if m.get(f"cpu_us_per_{unit}") is not None:
        parts.append(
            f"proxy {m[f'cpu_us_per_{unit}']:.1f} µs/{unit} (user {m[f'user_us_per_{unit}']:.2f})"
        )
    if m.get("lg_core") is not None:
        parts.append(f"loadgen {m['lg_core']:.2f} core, lag p99 {m['lag_us']['p99']:,.0f} µs")
    if m.get("saturated"):
        parts.append("SATURATED")
    if m.get("errors"):
        parts.append(f"errors {m['errors']}")
    return "      -> " + "; ".join(parts)


def _drain_sockets(before: int, timeout: float = 10.0) -> None:
    """Wait (bounded) until the namespace's live TCP sockets are back to what they were, so a
    cell's closing connections do not land in the next cell's figures."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and tcp_inuse() > before + 16:
        time.sleep(0.2)


def held_cell(ctx: Ctx, points: list[Point], backend: Backend) -> None:
    cfg, first = ctx.cfg, points[0]
    celldir = ctx.tmp / f"held-{first.proxy}-{first.rep}"
    celldir.mkdir()
    inuse0 = tcp_inuse()
    proc: Proc | None = None
    group: HoldGroup | None = None
    try:
        port, proc = _start(first.proxy, backend, celldir)
        root = proc.pid if proc else None
        pids = tree(root) if root else []
        time.sleep(cfg.settle_s)  # a just-started runtime (Go, CPython) settles its heap
        mem0, kern0, fds0 = memory(root), kernel_memory_kb(), fd_count(pids)
        nofile = nofile_soft(pids[-1]) if pids else None  # the worker, for nginx
        group = HoldGroup(ctx.exe, port, int(max(p.x for p in points)), cfg.trickle_s)
        group.start()
        open_total, held = 0.0, 0
        for i, p in enumerate(points):
            if ctx.progress.over():
                for rest in points[i:]:
                    _record(ctx, rest, None, "skipped: the run's time budget is spent")
                    ctx.progress.skip(rest)
                break
            ctx.progress.begin(p, cfg.reps)
            n = int(p.x)
            try:
                opened = group.open(n, timeout=30 + (n - held) / 200)
                open_total += opened["open_s"]
                if opened["up"] < n and proc is not None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.popen.wait(1.0)  # a proxy out of fds may be exiting
                if proc is not None and not proc.alive():
                    why = " (too many open files)" if "too many open files" in proc.tail(5) else ""
                    raise RuntimeError(
                        f"exited (code {proc.popen.returncode}){why} between {held:,} and "
                        f"{n:,} connections"
                    )
                if opened["up"] < n:
                    raise RuntimeError(
                        f"at {n:,}: {opened['up']:,} connections answered, "
                        f"{opened['failed']:,} failed"
                    )
                held = n
                time.sleep(cfg.settle_s)
                m: dict[str, Any] = {"n": n, "open_s": opened["open_s"]}
                m["open_total_s"] = round(open_total, 3)
                m["nofile_soft"] = nofile
                kern = kernel_memory_kb()
                m["kernel_kb_per_conn"] = round(
                    (kern["slab_kb"] + kern["tcp_mem_kb"] - kern0["slab_kb"] - kern0["tcp_mem_kb"])
                    / n,
                    3,
                )
                m["slab_kb_per_conn"] = round((kern["slab_kb"] - kern0["slab_kb"]) / n, 3)
                m["tcp_mem_kb_per_conn"] = round((kern["tcp_mem_kb"] - kern0["tcp_mem_kb"]) / n, 3)
                m["tcp_sockets"] = kern["tcp_inuse"]
                if root is not None:
                    mem = memory(root)
                    m["pss_kb"], m["pss_anon_kb"] = mem["pss_kb"], mem["pss_anon_kb"]
                    m["pss0_kb"] = mem0["pss_kb"]
                    m["kb_per_conn"] = round((mem["pss_kb"] - mem0["pss_kb"]) / n, 3)
                    m["anon_kb_per_conn"] = round((mem["pss_anon_kb"] - mem0["pss_anon_kb"]) / n, 3)
                    m["rss_kb_per_conn"] = round((mem["rss_kb"] - mem0["rss_kb"]) / n, 3)
                    m["fds_per_conn"] = round((fd_count(pids) - fds0) / n, 2)
                    # CPU at idle: only the trickle moves.
                    h0, s0 = group.stats(), snap(pids)
                    time.sleep(cfg.idle_s)
                    s1, h1 = snap(pids), group.stats()
                    idle = cpu_between(s0, s1)
                    m["idle_cpu_ms_per_s"] = round(idle["cpu_s"] * 1e3 / idle["wall_s"], 3)
                    m["idle_user_ms_per_s"] = round(idle["user_s"] * 1e3 / idle["wall_s"], 3)
                    trickled = h1["trickle_ok"] - h0["trickle_ok"]
                    m["trickle_per_s"] = round(trickled / idle["wall_s"], 1)
                    if trickled:
                        m["idle_us_per_trickle"] = round(idle["cpu_s"] * 1e6 / trickled, 1)
                # The paced prober beside the N held connections.
                h0, t0 = group.stats(), time.monotonic()
                load = Load("rr", port, cfg.probe_rate, cfg.probe_s, cfg.warmup_s, cfg.probe_conns)
                probe = run_load(ctx.exe, load, pids or None)
                h1, t1 = group.stats(), time.monotonic()
                trickle = (h1["trickle_ok"] - h0["trickle_ok"]) / (t1 - t0) * probe["window_s"]
                if "proxy_cpu_s" in probe:
                    # The held connections' trickle went through the proxy in the same window.
                    reqs = probe["done_in_window"] + trickle
                    probe["cpu_us_per_req"] = round(probe["proxy_cpu_s"] * 1e6 / reqs, 2)
                    probe["user_us_per_req"] = round(probe["proxy_user_s"] * 1e6 / reqs, 3)
                m.update(probe)
                m["held_alive"] = h1["alive"]
                if h1["alive"] < n:
                    raise RuntimeError(f"only {h1['alive']:,} of {n:,} held connections alive")
                if proc is not None and not proc.alive():
                    raise RuntimeError(f"{p.proxy} died during the point:\n{proc.tail()}")
                _record(ctx, p, m)
                print(_summary_line(m, "req"), flush=True)
                ctx.progress.end(p)
            except Exception as exc:  # the rest of the cell is skipped, the run goes on
                _fail(ctx, p, exc)
                for rest in points[i + 1 :]:
                    _record(ctx, rest, None, f"skipped: {p.x:,.0f} failed")
                    ctx.progress.skip(rest)
                break
    finally:
        if group is not None:
            group.stop()
        if proc is not None:
            proc.stop()
        _drain_sockets(inuse0)


def _fail(ctx: Ctx, p: Point, exc: BaseException) -> None:
    print(f"      -> FAILED: {exc}", flush=True)
    if not isinstance(exc, RuntimeError):
        traceback.print_exc()
    _record(ctx, p, None, f"{exc}" if isinstance(exc, RuntimeError) else repr(exc))
    ctx.progress.end(p)


def rate_cell(ctx: Ctx, points: list[Point], backend: Backend) -> None:
    """One proxy process, the rates ascending; the first point past saturation ends it."""
    cfg, first = ctx.cfg, points[0]
    celldir = ctx.tmp / f"{first.sweep}-{first.proxy}-{first.rep}"
    celldir.mkdir()
    mode = "churn" if first.sweep == "churn" else "rr"
    unit = "conn" if mode == "churn" else "req"
    inuse0 = tcp_inuse()
    proc: Proc | None = None
    try:
        port, proc = _start(first.proxy, backend, celldir)
        pids = tree(proc.pid) if proc else []
        for i, p in enumerate(points):
            if ctx.progress.over():
                for rest in points[i:]:
                    _record(ctx, rest, None, "skipped: the run's time budget is spent")
                    ctx.progress.skip(rest)
                break
            ctx.progress.begin(p, cfg.reps)
            try:
                load = Load(
                    mode,
                    port,
                    p.x,
                    cfg.point_seconds(p.x),
                    cfg.warmup_s,
                    cfg.rr_conns,
                    CHURN_SRCS if mode == "churn" else (),
                )
                m = run_load(ctx.exe, load, pids or None)
                if proc is not None and not proc.alive():
                    raise RuntimeError(f"{p.proxy} died during the point:\n{proc.tail()}")
                _record(ctx, p, m)
                print(_summary_line(m, unit), flush=True)
                ctx.progress.end(p)
                if m["saturated"]:
                    for rest in points[i + 1 :]:
                        _record(ctx, rest, None, f"skipped: saturated at {p.x:,.0f}/s")
                        ctx.progress.skip(rest)
                    break
            except Exception as exc:
                _fail(ctx, p, exc)
                for rest in points[i + 1 :]:
                    _record(ctx, rest, None, f"skipped: {p.x:,.0f}/s failed")
                    ctx.progress.skip(rest)
                break
    finally:
        if proc is not None:
            proc.stop()
        _drain_sockets(inuse0)


CELL_RUNNERS: dict[str, Callable[[Ctx, list[Point], Backend], None]] = {
    "held": held_cell,
    "rr": rate_cell,
    "churn": rate_cell,
    "rr-etcd": rate_cell,
}


# -- command line ---------------------------------------------------------------------------


def _floats(text: str) -> list[float]:
    try:
        values = [float(x.replace("_", "")) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"need positive numbers: {text}")
    return sorted(values)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 200 and 500 held, 3 rates per sweep, 2 s points, 1 repetition; "
        "RESULTS.md untouched",
    )
    p.add_argument(
        "--only",
        default="",
        help="comma-separated proxies (default: " + ",".join(DEFAULT_PROXIES) + ")",
    )
    p.add_argument("--sweeps", default="", help="comma-separated: " + ",".join(SWEEPS))
    p.add_argument("--reps", type=int, help="interleaved repetitions (default 3; --quick 1)")
    p.add_argument("--held", type=_floats, help="held connection counts (default 1000,3000,9000)")
    p.add_argument("--rr-rates", type=_floats, help="offered kept-alive requests/s")
    p.add_argument("--churn-rates", type=_floats, help="offered new connections/s")
    p.add_argument("--etcd-rates", type=_floats, help="offered requests/s to etcd")
    p.add_argument(
        "--probe-rate", type=float, help="the prober's requests/s beside the held (10000)"
    )
    p.add_argument("--probe-s", type=float, help="the prober's measured seconds (4)")
    p.add_argument("--point-s", type=float, help="most measured seconds of a rate point (3)")
    p.add_argument(
        "--trickle-s", type=float, help="seconds between one held connection's requests (30)"
    )
    p.add_argument(
        "--budget-min", type=float, default=45.0, help="refuse a plan longer than this (45)"
    )
    p.add_argument(
        "--results-md",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="write bench/RESULTS.md's scaling section and bench/scale/*.png "
        "(default: yes, except with --quick or a filtered run)",
    )
    p.add_argument("--out", type=Path, default=BENCH / "out", help="raw JSON and plots directory")
    p.add_argument(
        "--plot-only", type=Path, metavar="JSON", help="run nothing: re-draw from a run's JSON"
    )
    p.add_argument("--no-netns", action="store_true", help="run in the current network namespace")
    p.add_argument("--keep-tmp", action="store_true", help="keep configs and logs of the run")
    p.add_argument("--dry-run", action="store_true", help="print the plan and its estimate only")
    return p.parse_args(argv)


def config_from(args: argparse.Namespace) -> Config:
    cfg = Config()
    if args.quick:
        cfg.reps, cfg.held = 1, [200, 500]
        cfg.rr_rates, cfg.churn_rates, cfg.etcd_rates = (
            [2000, 20000, 60000],
            [1000, 5000],
            [500, 2000],
        )
        cfg.probe_s, cfg.idle_s, cfg.point_max_s, cfg.point_min_s = 2.0, 1.0, 2.0, 2.0
        cfg.probe_rate, cfg.trickle_s = 5000, 5.0
    for name in (
        "reps",
        "held",
        "rr_rates",
        "churn_rates",
        "etcd_rates",
        "probe_rate",
        "probe_s",
        "trickle_s",
    ):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    if args.point_s is not None:
        cfg.point_max_s = args.point_s
        cfg.point_min_s = min(cfg.point_min_s, args.point_s)
    cfg.held = [int(n) for n in cfg.held]
    if cfg.reps < 1:
        raise SystemExit("bench/scale.py: --reps must be at least 1")
    if max(cfg.held) > 9500:
        print(
            "warning: above ~9,500 held connections a proxy with 2 fds per connection runs "
            "into the 20,000 fd cap of this machine"
        )
    return cfg


def _pick(
    text: str, known: tuple[str, ...] | dict[str, Any], default: tuple[str, ...], what: str
) -> list[str]:
    if not text:
        return list(default)
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(
            f"bench/scale.py: unknown {what}: {', '.join(unknown)} (known: {', '.join(known)})"
        )
    return names


def environment(
    cfg: Config, proxies: list[str], sysctls: dict[str, str], plan_s: float
) -> dict[str, Any]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "stamp": time.strftime("%Y%m%d-%H%M%S"),
        "command": "python3 bench/scale.py " + shlex.join(sys.argv[1:]),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
        "netns_sysctls": sysctls,
        "nofile": raise_nofile(),
        "versions": {p: PROXIES[p].version() for p in proxies if p != "direct"},
        "config": asdict(cfg),
        "plan_s": round(plan_s),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    import scale_report  # matplotlib is imported inside, only when drawing

    if args.plot_only:
        data = json.loads(args.plot_only.read_text())
        return scale_report.render(data, args.out, bool(args.results_md), BENCH)
    if not args.no_netns and not args.dry_run:
        enter_netns(argv)  # does not return outside the namespace
    cfg = config_from(args)
    proxies = _pick(args.only, PROXIES, DEFAULT_PROXIES, "proxies")
    if "direct" not in proxies:
        print("adding direct: it is the floor every curve is drawn against")
        proxies.append("direct")
    sweeps = _pick(args.sweeps, SWEEPS, SWEEPS, "sweeps")
    plan = build_plan(cfg, sweeps, proxies)
    plan_s = sum(p.budget_s for p in plan) + (8 if "rr-etcd" in sweeps else 0)
    per_sweep = ", ".join(
        f"{sw} {_fmt_s(sum(p.budget_s for p in plan if p.sweep == sw))}" for sw in sweeps
    )
    print(
        f"plan: {len(plan)} points ({len(proxies)} proxies x {cfg.reps} repetitions; "
        f"{per_sweep}), estimated {_fmt_s(plan_s)} if no point is skipped "
        f"(budget {args.budget_min:g} min)"
    )
    if args.dry_run:
        return 0
    if plan_s > args.budget_min * 60:
        raise SystemExit(
            f"bench/scale.py: the plan needs ~{_fmt_s(plan_s)}, over --budget-min "
            f"{args.budget_min:g}: fewer rates, repetitions or seconds per point, or raise it"
        )
    sysctls: dict[str, str] = {}
    if not args.no_netns:
        sysctls = setup_netns()
    nofile = raise_nofile()  # inherited by every process the run starts
    print(f"network namespace: {'own, ' + str(sysctls) if sysctls else 'the current one'}")
    print(f"fd limit {nofile} for every process of the run")
    for name in list(proxies):
        reason = PROXIES[name].check()
        if reason:
            print(f"skip {name}: {reason}")
            proxies.remove(name)
            plan = [p for p in plan if p.proxy != name]
    write_md = (
        args.results_md
        if args.results_md is not None
        else not (args.quick or args.only or args.sweeps)
    )
    env = environment(cfg, proxies, sysctls, plan_s)
    tmp = Path(tempfile.mkdtemp(prefix="etcdgw-scale-"))
    ctx = Ctx(cfg, build_loadgen(tmp), tmp, Progress(plan, args.budget_min * 60 * 1.2))

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        run_plan(ctx, plan, sweeps)
    except KeyboardInterrupt:
        print("interrupted: reporting what finished")
    finally:
        if args.keep_tmp:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    env["elapsed_s"] = round(ctx.progress.elapsed())
    env["mode"] = "QUICK SMOKE RUN (not representative)" if args.quick else "full run"
    data = {"env": env, "proxies": proxies, "sweeps": sweeps, "points": ctx.results}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"scale-{env['stamp']}.json"
    path.write_text(json.dumps(data) + "\n")
    shutil.copyfile(path, args.out / "scale-latest.json")
    print(f"raw results: {path}")
    scale_report.render(data, args.out, write_md, BENCH)
    print(f"elapsed {_fmt_s(env['elapsed_s'])} (planned {_fmt_s(plan_s)})")
    return 0


def run_plan(ctx: Ctx, plan: list[Point], sweeps: list[str]) -> None:
    backends: dict[str, Backend] = {}
    try:
        for sweep in sweeps:
            group = "etcd" if sweep == "rr-etcd" else "http"
            cells: dict[tuple[int, str], list[Point]] = {}
            for p in plan:
                if p.sweep == sweep:
                    cells.setdefault((p.rep, p.proxy), []).append(p)
            if not cells:
                continue
            if group not in backends:
                print(f"== starting the {group} backend", flush=True)
                try:
                    backends[group] = (
                        EtcdBackend(ctx.tmp / "etcd") if group == "etcd" else HttpBackend(ctx.tmp)
                    )
                except Exception as exc:  # the other sweeps can still run
                    print(f"   {group} backend failed: {exc}")
                    for pts in cells.values():
                        for p in pts:
                            _record(ctx, p, None, f"{group} backend: {exc}")
                            ctx.progress.skip(p)
                    continue
            print(f"== {sweep}", flush=True)
            for pts in cells.values():  # insertion order: repetition, then rotated proxies
                CELL_RUNNERS[sweep](ctx, pts, backends[group])
    finally:
        for b in backends.values():
            b.stop()


if __name__ == "__main__":
    raise SystemExit(main())
