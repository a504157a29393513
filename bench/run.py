"""Benchmark etcdgw against the Go gateway, HAProxy, nginx, pen, a naive proxy and no proxy."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import FrameType
from typing import Any

# bench/ is sys.path[0] when run as `python3 bench/run.py`: its modules import as top-level.
from backends import Backend, EtcdBackend, HttpBackend, IperfBackend
from procs import Proc, free_port, raise_nofile, run
from proxies import OPTIONAL, PROXIES
from report import Past, markdown, medians, summarize, write_json, write_results_md
from stats import add_run, load_history, past_medians, save_history
from workloads import WORKLOADS, Cell, Metrics, PartialResult, Settings

BENCH = Path(__file__).resolve().parent
GROUPS = ("etcd", "http", "iperf")  # backend start order; workloads run grouped by backend


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 2 s cells, 1 repetition, 2,000 idle connections, no "
        "grpc-perf, RESULTS.md untouched",
    )
    p.add_argument("--only", default="", help="comma-separated proxies: " + ",".join(PROXIES))
    p.add_argument("--workloads", default="", help="comma-separated: " + ",".join(WORKLOADS))
    p.add_argument("--reps", type=int, help="repetitions per cell (default 3; --quick 1)")
    p.add_argument("--duration", type=float, help="measured seconds per cell (default 10)")
    p.add_argument("--idle-conns", type=int, help="idle workload connections (default 9000)")
    p.add_argument("--wrk-threads", type=int, default=1, help="wrk threads (default 1)")
    p.add_argument(
        "--results-md",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="write bench/RESULTS.md (default: yes, except with --quick)",
    )
    p.add_argument("--out", type=Path, default=BENCH / "out", help="raw JSON directory")
    p.add_argument(
        "--history",
        type=Path,
        default=BENCH / "out" / "history.json",
        help="medians of past runs, for the drift flag (default bench/out/history.json)",
    )
    p.add_argument(
        "--no-history",
        action="store_true",
        help="do not add this run to the history file (it is still compared against it)",
    )
    p.add_argument("--keep-tmp", action="store_true", help="keep configs and logs of the run")
    p.add_argument(
        "--report-only",
        type=Path,
        metavar="JSON",
        help="run nothing: re-render the tables from a raw JSON of an earlier run",
    )
    return p.parse_args(argv)


def _pick(text: str, known: dict[str, Any], what: str) -> list[str]:
    if not text:
        return [k for k in known if k not in OPTIONAL]
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(unknown)} (known: {', '.join(known)})")
    return names


def environment(args: argparse.Namespace, settings: Settings, proxies: list[str]) -> dict[str, Any]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    versions = {name: PROXIES[name].version() for name in proxies if name != "direct"}
    for tool, argv in (
        ("wrk", ["wrk", "-v"]),
        ("iperf3", ["iperf3", "--version"]),
        ("etcd (cluster)", ["etcd", "--version"]),
    ):
        try:
            versions[tool] = run(argv, 10).strip().splitlines()[0]
        except Exception:  # informative only: a broken tool must not stop the run
            versions[tool] = "not installed"
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "mode": ("QUICK SMOKE RUN (not representative)" if settings.quick else "full run")
        + (" (filtered by --only/--workloads)" if args.only or args.workloads else ""),
        "command": "python3 bench/run.py " + shlex.join(sys.argv[1:])
        if sys.argv[1:]
        else "python3 bench/run.py",
        "nproc": len(os.sched_getaffinity(0)),  # what `nproc` prints
        "cpu_model": cpu,
        "kernel": platform.release(),
        "mem_gib": round(mem_kb / 1024 / 1024, 1),
        "python": platform.python_version(),
        "versions": versions,
        "stamp": time.strftime("%Y%m%d-%H%M%S"),
        "profile": profile(settings),
        "settings": {
            "reps": args.reps,
            "duration_s": settings.duration,
            "warmup_s": settings.warmup,
            "wrk": f"{settings.wrk_threads} thread(s), 32 connections",
            "idle_conns": settings.idle_conns,
        },
    }


def profile(settings: Settings) -> str:
    """Which past runs a run's medians are comparable with (for the drift flag)."""
    kind = "quick" if settings.quick else "full"
    return (
        f"{kind} {settings.duration:g}s warm-up {settings.warmup:g}s wrk -t{settings.wrk_threads}"
    )


def rotated(proxies: list[str], rep: int) -> list[str]:
    """Repetition rep's order: the list rotated by rep, so each proxy takes each position."""
    k = rep % len(proxies) if proxies else 0
    return proxies[k:] + proxies[:k]


def history_lookup(history: dict[str, Any], env: dict[str, Any]) -> Past:
    """(workload, proxy, metric) -> medians in recent runs comparable with this one."""
    prof, stamp = env.get("profile"), env.get("stamp")
    if not prof or not stamp:  # a raw JSON from before the history existed
        return lambda wl, proxy, key: []
    return lambda wl, proxy, key: past_medians(history, prof, wl, proxy, key, stamp)


def _start_backend(group: str, tmp: Path) -> Backend:
    if group == "etcd":
        return EtcdBackend(tmp / "etcd")
    if group == "http":
        return HttpBackend(tmp)
    return IperfBackend(tmp)


def _describe(m: Metrics) -> str:
    parts = []
    for key, fmt in (
        ("rate", "{:,.0f}/s"),
        ("p50_ms", "p50 {:.2f} ms"),
        ("p99_ms", "p99 {:.2f} ms"),
        ("cpu_us_per_req", "{:.1f} µs/req"),
        ("cpu_us_per_conn", "{:.1f} µs/conn"),
        ("machine_us_per_req", "machine {:.1f} µs/req"),
        ("machine_us_per_conn", "machine {:.1f} µs/conn"),
        ("machine_ms_per_gb", "machine {:.0f} ms/GB"),
        ("gbit_s", "{:.2f} Gbit/s"),
        ("gb_per_cpu_s", "{:.2f} GB/CPU-s"),
        ("conns", "{:,} conns"),
        ("kb_per_conn_low", "{:.2f} KB/conn at first level (anon PSS)"),
        ("kb_per_conn", "{:.2f} KB/conn (anon PSS)"),
        ("fds_per_conn_low", "{:.1f} fds/conn"),
        ("pss_kb_per_conn", "PSS {:.2f}"),
        ("rss_kb_per_conn", "RSS {:.2f}"),
        ("proxy_cpu_s", "CPU {:.2f} s"),
    ):
        if m.get(key) is not None:
            parts.append(fmt.format(m[key]))
    if "pass" in m:
        parts.append("PASS" if m["pass"] else f"FAIL {m.get('detail', '')}")
    return ", ".join(parts)


def run_cell(
    workload: str, proxy: str, rep: int, backend: Backend, settings: Settings, tmp: Path
) -> dict[str, Any]:
    result: dict[str, Any] = {"workload": workload, "proxy": proxy, "rep": rep}
    celldir = tmp / f"{workload}-{proxy}-{rep}"
    celldir.mkdir()
    proc: Proc | None = None
    try:
        if proxy == "direct":
            port = int(backend.endpoints[0].rsplit(":", 1)[1])
        else:
            port = free_port()
            proc = PROXIES[proxy].start(port, backend.endpoints, celldir)
        cell = Cell(proxy, port, proc, backend, settings, celldir, tag=f"{proxy}-{rep}")
        result["metrics"] = WORKLOADS[workload].run(cell)
        print(f"    {proxy:14s} {_describe(result['metrics'])}", flush=True)
    except Exception as exc:  # one failed cell must not stop the run
        result["error"] = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, PartialResult):
            result["error"] = str(exc)
            result["metrics"] = exc.metrics
            print(f"    {proxy:14s} partial: {_describe(exc.metrics)}", flush=True)
        print(f"    {proxy:14s} FAILED: {result['error']}", flush=True)
        if not isinstance(exc, RuntimeError):
            traceback.print_exc()
    finally:
        if proc is not None:
            proc.stop()
    return result


def report_only(path: Path, write_md: bool, history: Path) -> int:
    data = json.loads(path.read_text())
    order = [p for p in PROXIES if p in {r["proxy"] for r in data["results"]}]
    past = history_lookup(load_history(history), data["env"])
    body = markdown(summarize(data["results"]), order, data["env"], data["skipped"], past)
    print(body)
    if write_md:
        write_results_md(BENCH / "RESULTS.md", body)
        print("wrote bench/RESULTS.md")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report_only:
        return report_only(args.report_only, bool(args.results_md), args.history)
    settings = Settings(wrk_threads=args.wrk_threads, quick=args.quick)
    if args.quick:
        settings.duration, settings.warmup, settings.idle_conns = 2.0, 0.5, 2000
    if args.duration:
        settings.duration = args.duration
    if args.idle_conns:
        settings.idle_conns = args.idle_conns
    args.reps = args.reps or (1 if args.quick else 3)
    write_md = args.results_md if args.results_md is not None else not args.quick

    proxies = _pick(args.only, PROXIES, "proxies")
    if "direct" not in proxies:
        # Added machine CPU is a proxy's whole-machine CPU minus direct's in the same rep.
        print("adding direct: the added machine CPU of every proxy is measured against it")
        proxies.append("direct")
    workloads = _pick(args.workloads, WORKLOADS, "workloads")
    if args.quick and not args.workloads:
        workloads = [w for w in workloads if not WORKLOADS[w].full_only]

    # The idle workload holds thousands of client sockets in this process.
    nofile = raise_nofile()
    print(f"fd limit {nofile}; workloads: {', '.join(workloads)}")

    skipped: dict[str, str] = {}
    for name in list(proxies):
        reason = PROXIES[name].check()
        if reason:
            skipped[name] = reason
            proxies.remove(name)
            print(f"skip {name}: {reason}")
    for tool in ("wrk", "iperf3", "etcd", "etcdctl"):
        if shutil.which(tool) is None:
            print(f"warning: {tool} not installed: its workloads will fail (bench/setup.sh)")
    if not proxies:
        print("nothing to run")
        return 1

    env = environment(args, settings, proxies)
    stamp = env["stamp"]
    history = load_history(args.history)
    tmp = Path(tempfile.mkdtemp(prefix="etcdgw-bench-"))
    results: list[dict[str, Any]] = []
    t_start = time.monotonic()

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt  # unwinds through every finally: proxies, backends, tmp

    signal.signal(signal.SIGTERM, on_term)
    try:
        for group in GROUPS:
            names = [w for w in workloads if WORKLOADS[w].group == group]
            if not names:
                continue
            print(f"== starting {group} backend", flush=True)
            try:
                backend = _start_backend(group, tmp)
            except Exception as exc:  # the other groups can still run
                print(f"   {group} backend failed: {exc}")
                for w in names:
                    results += [
                        {"workload": w, "proxy": p, "rep": 0, "error": f"{group} backend: {exc}"}
                        for p in proxies
                    ]
                continue
            try:
                for w in names:
                    reps = WORKLOADS[w].reps or args.reps
                    for rep in range(reps):
                        # Interleaved and rotated: slow drift (heat, other load) shows as
                        # spread, not as an advantage for whoever runs first.
                        order = rotated(proxies, rep)
                        print(f"== {w} rep {rep + 1}/{reps}", flush=True)
                        for proxy in order:
                            results.append(run_cell(w, proxy, rep, backend, settings, tmp))
            finally:
                backend.stop()
    except KeyboardInterrupt:
        print("interrupted: reporting what finished")
    finally:
        if args.keep_tmp:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    env["elapsed_s"] = round(time.monotonic() - t_start)
    summary = summarize(results)
    body = markdown(summary, proxies, env, skipped, history_lookup(history, env))
    print()
    print(body)
    path = write_json(
        args.out, stamp, {"env": env, "skipped": skipped, "results": results, "summary": summary}
    )
    print(f"\nraw results: {path}")
    if not args.no_history and results:
        save_history(args.history, add_run(history, stamp, env["profile"], medians(summary)))
        print(f"history: {args.history}")
    if write_md:
        write_results_md(BENCH / "RESULTS.md", body)
        print("wrote bench/RESULTS.md")
    print(f"elapsed {env['elapsed_s']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
