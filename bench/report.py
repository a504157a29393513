"""Medians, ratios and the Markdown tables of bench/RESULTS.md; the raw JSON dump."""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import stats
from proxies import ETCDGW, OPTIONAL, PEERS
from workloads import IDLE_LOW

BEGIN = "<!-- BEGIN GENERATED: bench/run.py overwrites from here to END -->"
END = "<!-- END GENERATED -->"

Result = dict[str, Any]  # {"workload", "proxy", "rep", "metrics": {...}} or with "error"
Summary = dict[str, dict[str, dict[str, Any]]]
# (workload, proxy, metric) -> that metric's medians in recent comparable runs (for drift).
Past = Callable[[str, str, str], list[float]]


def _no_past(workload: str, proxy: str, metric: str) -> list[float]:
    return []


@dataclass(frozen=True)
class Column:
    header: str
    key: str
    digits: int = 1


@dataclass(frozen=True)
class Table:
    title: str
    columns: tuple[Column, ...]
    cost: str | None  # metric where lower is better, used for the etcdgw ratios
    ref_title: str = ""
    # Peers left out of "best peer": pen allocates its whole connection table at start, so
    # its memory growth per idle connection is ~0 and says nothing about its real cost.
    not_best: tuple[str, ...] = ()


_RATE = Column("req/s", "rate", 0)
_P50 = Column("p50 ms", "p50_ms", 2)
_P99 = Column("p99 ms", "p99_ms", 2)
_CPU_REQ = Column("proxy CPU µs/req", "cpu_us_per_req", 1)
_USER_REQ = Column("of which user µs/req", "user_us_per_req", 1)
_MACHINE_REQ = Column("machine CPU µs/req", "machine_us_per_req", 1)
_ADDED_REQ = Column("added machine CPU µs/req", "added_machine_us_per_req", 1)
_REQ_COLUMNS = (_RATE, _P50, _P99, _CPU_REQ, _USER_REQ, _MACHINE_REQ, _ADDED_REQ)
_BULK_COLUMNS = (
    Column("Gbit/s", "gbit_s", 2),
    Column("GB/CPU-s", "gb_per_cpu_s", 2),
    Column("proxy CPU ms/GB", "cpu_ms_per_gb", 0),
    Column("proxy CPU s", "proxy_cpu_s", 2),
    Column("machine CPU ms/GB", "machine_ms_per_gb", 0),
    Column("added machine CPU ms/GB", "added_machine_ms_per_gb", 0),
)
# Whole-machine CPU per unit: the workload measures it for every proxy and for direct; the
# "added" figure is the proxy's minus direct's in the same repetition (derive()).
MACHINE_KEYS = ("machine_us_per_req", "machine_us_per_conn", "machine_ms_per_gb")

TABLES: dict[str, Table] = {
    "rr-etcd": Table(
        "Request/response, saturated (wrk, 32 kept-alive connections, etcd /v3/kv/range)",
        _REQ_COLUMNS,
        "cpu_us_per_req",
        "issue µs/req",
    ),
    "rr-etcd-paced": Table(
        "Request/response, paced (each connection waits 25 ms after a response; ~1,100 req/s "
        "offered to every proxy) - the fair CPU comparison",
        _REQ_COLUMNS,
        "cpu_us_per_req",
        "issue µs/req",
    ),
    "rr-cheap": Table(
        "Request/response, saturated, cheap backend (bench/httpd.c: the proxy is the bottleneck)",
        _REQ_COLUMNS,
        "cpu_us_per_req",
    ),
    "churn": Table(
        "Connection churn (wrk, `Connection: close`: one new TCP connection per request)",
        (
            Column("conn/s", "rate", 0),
            _P50,
            _P99,
            Column("proxy CPU µs/conn", "cpu_us_per_conn", 1),
            Column("of which user µs/conn", "user_us_per_conn", 1),
            Column("machine CPU µs/conn", "machine_us_per_conn", 1),
            Column("added machine CPU µs/conn", "added_machine_us_per_conn", 1),
        ),
        "cpu_us_per_conn",
        "issue µs/conn",
    ),
    "bulk-up": Table(
        "Bulk, client to server (iperf3 -c, one stream)",
        _BULK_COLUMNS,
        "cpu_us_per_gb",
        "issue Gbit/s",
    ),
    "bulk-down": Table(
        "Bulk, server to client (iperf3 -c -R, one stream)",
        _BULK_COLUMNS,
        "cpu_us_per_gb",
        "issue Gbit/s",
    ),
    "idle": Table(
        "Idle connections held open through the proxy (memory of its process tree)",
        (
            Column("conns held", "conns", 0),
            Column("KB/conn at {low} (anon PSS)", "kb_per_conn_low", 2),
            Column("KB/conn at {n} (anon PSS)", "kb_per_conn", 2),
            Column("KB/conn at {n} (PSS)", "pss_kb_per_conn", 2),
            Column("KB/conn at {n} (RSS)", "rss_kb_per_conn", 2),
            Column("fds/conn", "fds_per_conn_low", 1),
            Column("PSS before MB", "pss_before_kb", 1),
        ),
        "kb_per_conn_low",
        "issue KB/conn",
        not_best=("pen",),
    ),
    "grpc": Table("Real gRPC client: etcdctl put / get / watch through the proxy", (), None),
    "grpc-perf": Table(
        "gRPC load: `etcdctl check perf --load=s` (60 s, 50 clients, 150 writes/s)",
        (
            Column("writes/s", "rate", 0),
            Column("slowest ms", "slowest_ms", 1),
            Column("stddev ms", "stddev_ms", 1),
            Column("proxy CPU µs/write", "cpu_us_per_req", 1),
        ),
        "cpu_us_per_req",
    ),
}

# The issue's figures for this kind of 2-core machine, for comparison (not measured here).
ISSUE_REF: dict[str, dict[str, float]] = {
    "rr-etcd": {"go-gateway": 65, "haproxy": 40, "nginx": 37, "pen": 33, "naive": 79},
    "rr-etcd-paced": {"go-gateway": 112, "haproxy": 64, "nginx": 63, "pen": 53, "naive": 134},
    "churn": {"go-gateway": 244, "haproxy": 132, "nginx": 124, "pen": 112, "naive": 514},
    "bulk-up": {
        "direct": 18.1,
        "go-gateway": 10.9,
        "pen": 9.7,
        "haproxy": 7.1,
        "nginx": 7.3,
        "naive": 3.5,
    },
    "idle": {"go-gateway": 10.9, "nginx": 10.0, "haproxy": 3.2, "naive": 11.4},
}
ISSUE_REF["bulk-down"] = ISSUE_REF["bulk-up"]


def derive(results: list[Result]) -> list[Result]:
    """The results with the added machine CPU of each cell: its whole-machine CPU per unit
    minus direct's (no proxy) in the same workload and repetition. Raw results stay as
    measured; direct's own row gets no added figure."""
    base: dict[tuple[str, int], dict[str, Any]] = {
        (r["workload"], r["rep"]): r.get("metrics", {}) for r in results if r["proxy"] == "direct"
    }
    out = []
    for r in results:
        metrics = r.get("metrics")
        if metrics is None or r["proxy"] == "direct":
            out.append(r)
            continue
        extra = {}
        direct = base.get((r["workload"], r["rep"]), {})
        for key in MACHINE_KEYS:
            mine, theirs = metrics.get(key), direct.get(key)
            if isinstance(mine, int | float) and isinstance(theirs, int | float):
                extra["added_" + key] = round(mine - theirs, 1)
        out.append({**r, "metrics": {**metrics, **extra}} if extra else r)
    return out


def summarize(results: list[Result]) -> Summary:
    """{workload: {proxy: {metric: median, metric+"_all": [values], metric+"_by_rep":
    {rep: value}, "errors": [...]}}}, after derive() (added machine CPU)."""
    out: Summary = {}
    for r in derive(results):
        cell = out.setdefault(r["workload"], {}).setdefault(r["proxy"], {"errors": []})
        if "error" in r:
            cell["errors"].append(r["error"])
        for key, value in r.get("metrics", {}).items():
            cell.setdefault(key + "_all", []).append(value)
            cell.setdefault(key + "_by_rep", {})[r["rep"]] = value
    for per_proxy in out.values():
        for cell in per_proxy.values():
            for key in [k for k in cell if k.endswith("_all")]:
                values = cell[key]
                base = key[: -len("_all")]
                if all(isinstance(v, bool) for v in values):
                    cell[base] = all(values)
                elif all(isinstance(v, int | float) for v in values if v is not None):
                    nums = [v for v in values if v is not None]
                    cell[base] = statistics.median(nums) if nums else None
                else:
                    cell[base] = values[-1]
    return out


def medians(summary: Summary) -> dict[str, dict[str, dict[str, float]]]:
    """A run's medians of the columns its tables show (and their cost metric), for the
    history file."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for wl, per_proxy in summary.items():
        table = TABLES[wl]
        keys = {c.key for c in table.columns} | ({table.cost} if table.cost else set())
        for proxy, cell in per_proxy.items():
            values = {
                k: cell[k]
                for k in sorted(keys)
                if isinstance(cell.get(k), int | float) and not isinstance(cell.get(k), bool)
            }
            if values:
                out.setdefault(wl, {})[proxy] = values
    return out


def _fmt(value: Any, digits: int) -> str:
    if value is None:
        return "—"
    if isinstance(value, float | int):
        return f"{value:,.{digits}f}"
    return str(value)


def _drift_checked(proxy: str, key: str, cost: str | None) -> bool:
    """Drift is flagged on the cost and machine columns of the reference proxies: etcdgw is
    what changes between runs on purpose, so its moves are results, not drift."""
    return proxy not in ETCDGW + OPTIONAL and (key == cost or key in MACHINE_KEYS)


def _cell_text(
    cell: dict[str, Any], col: Column, past: list[float] | None = None
) -> tuple[str, str]:
    """(text, flags): the median, then (min–max, relative spread) when repeated."""
    if col.key == "pss_before_kb":
        value = cell.get(col.key)
        return _fmt(None if value is None else value / 1024, col.digits), ""
    sp = stats.spread(cell.get(col.key + "_all", []))
    if sp is None:
        return _fmt(cell.get(col.key), col.digits), ""
    text = _fmt(sp.median, col.digits)
    if sp.n > 1:
        rel = sp.relative
        text += f" ({sp.low:,.{col.digits}f}–{sp.high:,.{col.digits}f}"
        text += f", {rel:.0%})" if rel is not None else ")"
    flag = stats.flags(sp, past or [])
    return (f"{text} {flag}" if flag else text), flag


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def best_peer(
    per_proxy: dict[str, dict[str, Any]], key: str, exclude: tuple[str, ...] = ()
) -> tuple[str, float] | None:
    costs = [
        (per_proxy[p][key], p)
        for p in PEERS
        if p in per_proxy and per_proxy[p].get(key) is not None and p not in exclude
    ]
    if not costs:
        return None
    value, name = min(costs)
    return name, value


LEGEND = (
    "Each cell is the median of the repetitions, then (min–max, relative spread = "
    "(max − min) / median). Flags: `~` relative spread above {spread:.0%}; `!` the median is "
    "more than {drift:.0%} away from the median of this proxy's medians in the last "
    "{keep} runs with the same settings (bench/out/history.json; checked on the cost and "
    "machine CPU columns of every proxy but etcdgw's, whose changes are the point). Proxy CPU "
    'is user+system time of the proxy\'s process tree ("of which user": the part spent in '
    "the proxy's own code rather than in the kernel's system calls); machine CPU is the "
    "whole machine's busy time (/proc/stat: user+nice+system+irq+softirq+steal) over the "
    "same window, and added machine CPU is that minus direct's (no proxy) in the same "
    "repetition. Repetitions are interleaved: repetition k runs every proxy once, in an "
    "order rotated by k."
)


def markdown(
    summary: Summary,
    order: list[str],
    env: dict[str, Any],
    skipped: dict[str, str],
    past: Past = _no_past,
) -> str:
    lines = [
        f"Run: {env['date']} — {env['mode']}",
        "",
        f"Command: `{env['command']}`",
        "",
        f"Machine: {env['nproc']} CPUs, {env['cpu_model']}, Linux {env['kernel']}, "
        f"{env['mem_gib']} GiB; Python {env['python']}",
        "",
        "Versions:",
        "",
        *[f"- {name}: {text}" for name, text in env["versions"].items()],
        "",
        f"Settings: {env['settings']}",
        "",
    ]
    if skipped:
        lines += ["Skipped:", "", *[f"- {p}: {why}" for p, why in skipped.items()], ""]
    lines.append(
        LEGEND.format(spread=stats.SPREAD_FLAG, drift=stats.DRIFT_FLAG, keep=stats.HISTORY_KEEP)
    )
    lines.append("")
    flagged: dict[tuple[str, str], str] = {}  # (workload, proxy) -> flags of its cost cell
    tables: list[str] = []
    idle_conns = env["settings"]["idle_conns"]
    for wl, per_proxy in summary.items():
        table = TABLES[wl]
        tables += [f"### {wl}: {table.title}", ""]
        refs = ISSUE_REF.get(wl, {})
        n, low = (f"{x / 1000:g}k" for x in (idle_conns, min(IDLE_LOW, idle_conns)))
        # With --idle-conns at or below the first level both idle columns hold one number.
        columns = [c for c in table.columns if not (n == low and c.key == "kb_per_conn")]
        headers = ["proxy", *(c.header.format(n=n, low=low) for c in columns)]
        if wl in ("grpc", "grpc-perf"):
            headers.append("pass")
        if table.ref_title:
            headers.append(table.ref_title)
        headers.append("notes")
        tables.append("| " + " | ".join(headers) + " |")
        tables.append("|" + "---|" * len(headers))
        for proxy in order:
            if proxy not in per_proxy:
                continue
            cell = per_proxy[proxy]
            row = [proxy]
            for c in columns:
                hist = past(wl, proxy, c.key) if _drift_checked(proxy, c.key, table.cost) else []
                text, flag = _cell_text(cell, c, hist)
                row.append(text)
                if c.key == table.cost and flag:
                    flagged[(wl, proxy)] = flag
            if wl in ("grpc", "grpc-perf"):
                row.append("—" if "pass" not in cell else ("PASS" if cell["pass"] else "FAIL"))
            if table.ref_title:
                row.append(_fmt(refs.get(proxy), 1))
            notes = []
            if cell["errors"]:
                notes.append(f"{len(cell['errors'])} failed: " + _short(cell["errors"][-1]))
            if cell.get("pass") is False and cell.get("detail"):
                notes.append(_short(str(cell["detail"])))
            row.append("; ".join(notes))
            tables.append("| " + " | ".join(row) + " |")
        tables.append("")
    lines += _target_table(summary, flagged)
    lines += tables
    lines += _ratio_table(summary)
    return "\n".join(lines)


def _short(text: str, n: int = 120) -> str:
    text = re.sub(r"\s+", " ", text).replace("|", "/")
    return text if len(text) <= n else text[: n - 1] + "…"


def _by_rep(summary: Summary, wl: str, proxy: str, key: str) -> dict[int, float | None]:
    by_rep: dict[Any, float | None] = summary.get(wl, {}).get(proxy, {}).get(key + "_by_rep", {})
    return {int(rep): v for rep, v in by_rep.items()}  # JSON turns the int keys into str


def _ratio_text(r: stats.Ratio | None) -> str:
    if r is None:
        return "—"
    text = f"{r.of_medians:.2f}"
    if r.low is not None and r.high is not None and r.pairs > 1:
        text += f" ({r.low:.2f}–{r.high:.2f})"
    return text


# Issue 14's targets: (engine, workload, reference, bound) for "engine / reference <= bound"
# on proxy CPU per request (saturated, paced) and per new connection.
TARGETS: tuple[tuple[str, str, str, float], ...] = (
    *(
        (engine, wl, ref, bound)
        for wl in ("rr-etcd", "rr-etcd-paced", "churn")
        for engine, ref, bound in (
            ("etcdgw-cython", "go-gateway", 0.5),
            ("etcdgw-cython", "pen", 1.0),
            ("etcdgw-python", "go-gateway", 1.0),
        )
    ),
)


def _target_table(summary: Summary, flagged: dict[tuple[str, str], str]) -> list[str]:
    """The targets whose workload ran (none: no section); a proxy that did not run in it
    makes its rows "not measured"."""
    targets = [t for t in TARGETS if t[1] in summary]
    if not targets:
        return []
    lines = [
        "### Targets (issue 14), judged on this run's repetitions",
        "",
        "Proxy CPU of etcdgw over the reference's: the ratio of the medians, then the range "
        "of the per-repetition ratios (each repetition's etcdgw figure over the reference's "
        "in the same repetition). **met**: every repetition at or under the bound; "
        "**missed**: every one over it; **not decidable**: they straddle it, fewer than "
        f"{stats.MIN_PAIRS} repetitions paired up, or one of the two drifted (`!`) from its "
        "recent runs. Added machine CPU (over direct) is shown "
        "beside it for information; the targets are set on proxy CPU.",
        "",
        "| target | workload | proxy CPU ratio | added machine CPU ratio | verdict | why |",
        "|---|---|---|---|---|---|",
    ]
    for engine, wl, ref, bound in targets:
        cost = TABLES[wl].cost
        assert cost is not None
        unit = cost.removeprefix("cpu_")
        r = stats.ratio(_by_rep(summary, wl, engine, cost), _by_rep(summary, wl, ref, cost))
        machine = stats.ratio(
            _by_rep(summary, wl, engine, "added_machine_" + unit),
            _by_rep(summary, wl, ref, "added_machine_" + unit),
        )
        drifted = [p for p in (engine, ref) if "!" in flagged.get((wl, p), "")]
        verdict, why = stats.verdict(r, bound, drifted)
        noisy = [f"{p} {flagged[(wl, p)]}" for p in (engine, ref) if (wl, p) in flagged]
        if noisy:
            why += "; flagged: " + ", ".join(noisy)
        name = engine.removeprefix("etcdgw-")
        lines.append(
            f"| {name} <= {bound:g}x {ref} | {wl} | {_ratio_text(r)} | {_ratio_text(machine)} "
            f"| **{verdict}** | {why} |"
        )
    lines.append("")
    return lines


def _ratio_table(summary: Summary) -> list[str]:
    """etcdgw's cost (CPU per unit, or KB per idle connection) over each reference's."""
    lines = [
        "### etcdgw relative to the others",
        "",
        "Cost ratio = etcdgw's median cost / the other's (CPU µs per request, connection or "
        "GB; KB per idle connection), then in brackets the range of the per-repetition "
        "ratios (same repetition, so the two ran under the same conditions). Below 1.00 "
        "means etcdgw is cheaper. For bulk the throughput ratio (Gbit/s, above 1.00 is "
        "faster) follows the `/`. Idle compares KB per connection at the first level; pen is "
        "left out of its best peer (it allocates its connection table up front, so its "
        "growth per connection is ~0).",
        "",
        "| workload | engine | vs go-gateway | vs haproxy | vs best peer |",
        "|---|---|---|---|---|",
    ]
    for wl, per_proxy in summary.items():
        key = TABLES[wl].cost
        if key is None:
            continue
        best = best_peer(per_proxy, key, TABLES[wl].not_best)
        for engine in ETCDGW:
            if per_proxy.get(engine, {}).get(key) is None:
                continue
            cols = []
            for other in ("go-gateway", "haproxy", best[0] if best else None):
                if other is None or other not in per_proxy:
                    cols.append("—")
                    continue
                r = stats.ratio(_by_rep(summary, wl, engine, key), _by_rep(summary, wl, other, key))
                text = _ratio_text(r)
                if wl.startswith("bulk"):
                    thr = stats.ratio(
                        _by_rep(summary, wl, engine, "gbit_s"),
                        _by_rep(summary, wl, other, "gbit_s"),
                    )
                    text += f" / {_ratio_text(thr)}"
                cols.append(text)
            if best:
                cols[2] += f" ({best[0]})"
            lines.append(f"| {wl} | {engine.removeprefix('etcdgw-')} | " + " | ".join(cols) + " |")
    lines.append("")
    return lines


def write_results_md(path: Path, body: str) -> None:
    """Replace the generated section of RESULTS.md, keeping the hand-written header."""
    text = path.read_text() if path.exists() else "# etcdgw benchmark results\n\n"
    head = text.split(BEGIN, 1)[0].rstrip("\n")
    tail = text.split(END, 1)[1] if END in text else "\n"
    path.write_text(f"{head}\n\n{BEGIN}\n\n{body}\n\n{END}{tail}")


def write_json(outdir: Path, stamp: str, payload: dict[str, Any]) -> Path:
    outdir.mkdir(parents=True, exist_ok=True)
    path = outdir / f"results-{stamp}.json"
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    (outdir / "latest.json").write_text(path.read_text())
    return path
