"""Medians, ratios and the Markdown tables of bench/RESULTS.md; the raw JSON dump."""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxies import ETCDGW, PEERS
from workloads import IDLE_LOW

BEGIN = "<!-- BEGIN GENERATED: bench/run.py overwrites from here to END -->"
END = "<!-- END GENERATED -->"

Result = dict[str, Any]  # {"workload", "proxy", "rep", "metrics": {...}} or with "error"


@dataclass(frozen=True)
class Column:
    header: str
    key: str
    digits: int = 1
    spread: bool = False  # show min-max of the repetitions under the median


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
_CPU_REQ = Column("proxy CPU µs/req", "cpu_us_per_req", 1, spread=True)

TABLES: dict[str, Table] = {
    "rr-etcd": Table(
        "Request/response, saturated (wrk, 32 kept-alive connections, etcd /v3/kv/range)",
        (_RATE, _P50, _P99, _CPU_REQ),
        "cpu_us_per_req",
        "issue µs/req",
    ),
    "rr-etcd-paced": Table(
        "Request/response, paced (each connection waits 25 ms after a response; ~1,100 req/s "
        "offered to every proxy) - the fair CPU comparison",
        (_RATE, _P50, _P99, _CPU_REQ),
        "cpu_us_per_req",
        "issue µs/req",
    ),
    "rr-cheap": Table(
        "Request/response, saturated, cheap backend (bench/httpd.c: the proxy is the bottleneck)",
        (_RATE, _P50, _P99, _CPU_REQ),
        "cpu_us_per_req",
    ),
    "churn": Table(
        "Connection churn (wrk, `Connection: close`: one new TCP connection per request)",
        (
            Column("conn/s", "rate", 0),
            _P50,
            _P99,
            Column("proxy CPU µs/conn", "cpu_us_per_conn", 1, spread=True),
        ),
        "cpu_us_per_conn",
        "issue µs/conn",
    ),
    "bulk-up": Table(
        "Bulk, client to server (iperf3 -c, one stream)",
        (
            Column("Gbit/s", "gbit_s", 2, spread=True),
            Column("GB/CPU-s", "gb_per_cpu_s", 2),
            Column("proxy CPU ms/GB", "cpu_ms_per_gb", 0),
            Column("proxy CPU s", "proxy_cpu_s", 2),
        ),
        "cpu_us_per_gb",
        "issue Gbit/s",
    ),
    "bulk-down": Table(
        "Bulk, server to client (iperf3 -c -R, one stream)",
        (
            Column("Gbit/s", "gbit_s", 2, spread=True),
            Column("GB/CPU-s", "gb_per_cpu_s", 2),
            Column("proxy CPU ms/GB", "cpu_ms_per_gb", 0),
            Column("proxy CPU s", "proxy_cpu_s", 2),
        ),
        "cpu_us_per_gb",
        "issue Gbit/s",
    ),
    "idle": Table(
        "Idle connections held open through the proxy (memory of its process tree)",
        (
            Column("conns held", "conns", 0),
            Column("KB/conn at {low} (anon PSS)", "kb_per_conn_low", 2, spread=True),
            Column("KB/conn at {n} (anon PSS)", "kb_per_conn", 2, spread=True),
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


def summarize(results: list[Result]) -> dict[str, dict[str, dict[str, Any]]]:
    """{workload: {proxy: {metric: median, metric+"_all": [values], "errors": [...]}}}."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for r in results:
        cell = out.setdefault(r["workload"], {}).setdefault(r["proxy"], {"errors": []})
        if "error" in r:
            cell["errors"].append(r["error"])
        for key, value in r.get("metrics", {}).items():
            cell.setdefault(key + "_all", []).append(value)
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


def _fmt(value: Any, digits: int) -> str:
    if value is None:
        return "—"
    if isinstance(value, float | int):
        return f"{value:,.{digits}f}"
    return str(value)


def _cell_text(cell: dict[str, Any], col: Column) -> str:
    if col.key == "pss_before_kb":
        value = cell.get(col.key)
        return _fmt(None if value is None else value / 1024, col.digits)
    text = _fmt(cell.get(col.key), col.digits)
    values = [v for v in cell.get(col.key + "_all", []) if isinstance(v, int | float)]
    if col.spread and len(values) > 1:
        text += f" ({min(values):,.{col.digits}f}–{max(values):,.{col.digits}f})"
    return text


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


def markdown(
    summary: dict[str, dict[str, dict[str, Any]]],
    order: list[str],
    env: dict[str, Any],
    skipped: dict[str, str],
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
        "Each cell is the median of the repetitions (min–max in brackets); proxy CPU "
        "is user+system time of the proxy's whole process tree during the measured "
        "window. Proxy order alternates between repetitions."
    )
    lines.append("")
    idle_conns = env["settings"]["idle_conns"]
    for wl, per_proxy in summary.items():
        table = TABLES[wl]
        lines += [f"### {wl}: {table.title}", ""]
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
        lines.append("| " + " | ".join(headers) + " |")
        lines.append("|" + "---|" * len(headers))
        for proxy in order:
            if proxy not in per_proxy:
                continue
            cell = per_proxy[proxy]
            row = [proxy, *(_cell_text(cell, c) for c in columns)]
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
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    lines += _ratio_table(summary)
    return "\n".join(lines)


def _short(text: str, n: int = 120) -> str:
    text = re.sub(r"\s+", " ", text).replace("|", "/")
    return text if len(text) <= n else text[: n - 1] + "…"


def _ratio_table(summary: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """etcdgw's cost (CPU per unit, or KB per idle connection) over each reference's."""
    lines = [
        "### etcdgw relative to the others",
        "",
        "Cost ratio = etcdgw's median cost / the other's (CPU µs per request, connection or "
        "GB; KB per idle connection). Below 1.00 means etcdgw is cheaper. For bulk the "
        "throughput ratio (Gbit/s, above 1.00 is faster) follows the `/`. Idle compares KB "
        "per connection at the first level; pen is left out of its best peer (it allocates "
        "its connection table up front, so its growth per connection is ~0).",
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
            mine = per_proxy.get(engine, {}).get(key)
            if mine is None:
                continue
            cols = []
            for other in ("go-gateway", "haproxy", best[0] if best else None):
                if other is None or other not in per_proxy:
                    cols.append("—")
                    continue
                text = _fmt(ratio(mine, per_proxy[other].get(key)), 2)
                if wl.startswith("bulk"):
                    thr = ratio(per_proxy[engine].get("gbit_s"), per_proxy[other].get("gbit_s"))
                    text += f" / {_fmt(thr, 2)}"
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
