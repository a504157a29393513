"""The scaling run's report (bench/scale.py): points over repetitions, knees, the targets of
issue 21, one plot per curve (PNG + SVG, matplotlib from the `bench` extra), and the
generated section of bench/RESULTS.md."""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import stats
from scale_stats import (
    Hist,
    Knee,
    PointSpread,
    fit_line,
    knee,
    latency_us,
    merged,
    point_spread,
)

BEGIN = "<!-- BEGIN SCALE: bench/scale.py overwrites from here to END SCALE -->"
END = "<!-- END SCALE -->"
ETCDGW = ("etcdgw-cython", "etcdgw-python")
PEERS = ("go-gateway", "haproxy", "nginx", "pen")
ORDER = ("etcdgw-cython", "etcdgw-python", "go-gateway", "haproxy", "nginx", "pen", "naive")
RATE_SWEEPS = ("rr", "churn", "rr-etcd")
EXTRAPOLATE_TO = 100_000

# sweep -> proxy -> x -> rep -> metrics
Summary = dict[str, dict[str, dict[float, dict[int, dict[str, Any]]]]]


def collect(points: Iterable[dict[str, Any]]) -> Summary:
    out: Summary = {}
    for row in points:
        if "metrics" not in row:
            continue
        by_x = out.setdefault(row["sweep"], {}).setdefault(row["proxy"], {})
        by_x.setdefault(float(row["x"]), {})[int(row["rep"])] = row["metrics"]
    return out


def value(metrics: dict[str, Any], key: str) -> float | None:
    """metrics[key], where key may name a nested figure ("lat_us.p99")."""
    cur: Any = metrics
    for part in key.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return float(cur) if isinstance(cur, int | float) and not isinstance(cur, bool) else None


def by_rep(summary: Summary, sweep: str, proxy: str, x: float, key: str) -> dict[int, float]:
    reps = summary.get(sweep, {}).get(proxy, {}).get(x, {})
    return {rep: v for rep, m in reps.items() if (v := value(m, key)) is not None}


def spread_of(summary: Summary, sweep: str, proxy: str, x: float, key: str) -> PointSpread | None:
    return point_spread(by_rep(summary, sweep, proxy, x, key).values())


def pooled_latency(summary: Summary, sweep: str, proxy: str, x: float) -> dict[str, float | None]:
    """Percentiles of every repetition's samples of a point together (more samples: a
    steadier p99.9 than any one repetition's)."""
    reps = summary.get(sweep, {}).get(proxy, {}).get(x, {})
    hists = [Hist.from_json(m["hist"]) for m in reps.values() if "hist" in m]
    return latency_us(merged(hists)) if hists else {}


def proxies_in(summary: Summary, sweep: str) -> list[str]:
    names = list(summary.get(sweep, {}))
    known = [p for p in ORDER if p in names] + sorted(p for p in names if p not in ORDER)
    return [p for p in known if p != "direct"] + (["direct"] if "direct" in names else [])


def xs_of(summary: Summary, sweep: str) -> list[float]:
    return sorted({x for by_x in summary.get(sweep, {}).values() for x in by_x})


# -- curves ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Curve:
    sweep: str
    key: str
    title: str
    ylabel: str
    file: str
    log_y: bool = False
    digits: int = 1
    floor: bool = True  # direct has this figure (the floor); False for proxy-only figures


def _rate_curves(sweep: str, what: str, unit: str) -> list[Curve]:
    return [
        Curve(
            sweep,
            f"cpu_us_per_{unit}",
            f"{what}: proxy CPU per {unit}",
            f"µs per {unit}",
            f"{sweep}-cpu",
            floor=False,
        ),
        Curve(
            sweep,
            f"user_us_per_{unit}",
            f"{what}: proxy user-space CPU per {unit}",
            f"µs per {unit}",
            f"{sweep}-user",
            digits=2,
            floor=False,
        ),
        Curve(
            sweep,
            "achieved",
            f"{what}: completed per second",
            f"{unit}s per second",
            f"{sweep}-achieved",
            digits=0,
        ),
        Curve(sweep, "lat_us.p50", f"{what}: latency p50", "µs (log)", f"{sweep}-p50", True, 0),
        Curve(sweep, "lat_us.p99", f"{what}: latency p99", "µs (log)", f"{sweep}-p99", True, 0),
        Curve(sweep, "lat_us.p999", f"{what}: latency p99.9", "µs (log)", f"{sweep}-p999", True, 0),
        Curve(sweep, "lat_us.max", f"{what}: latency max", "µs (log)", f"{sweep}-max", True, 0),
    ]


CURVES: list[Curve] = [
    Curve(
        "held",
        "kb_per_conn",
        "Proxy memory per held connection (PSS of its process tree)",
        "KB per connection",
        "held-memory",
        digits=2,
        floor=False,
    ),
    Curve(
        "held",
        "anon_kb_per_conn",
        "Proxy memory per held connection (anonymous PSS)",
        "KB per connection",
        "held-memory-anon",
        digits=2,
        floor=False,
    ),
    Curve(
        "held",
        "kernel_kb_per_conn",
        "Kernel memory per held connection (socket slabs + TCP buffers, whole path)",
        "KB per connection",
        "held-kernel",
        digits=2,
    ),
    Curve(
        "held",
        "idle_cpu_ms_per_s",
        "Proxy CPU at idle (the held connections' trickle only)",
        "ms of CPU per second",
        "held-idle-cpu",
        digits=2,
        floor=False,
    ),
    Curve(
        "held",
        "open_total_s",
        "Time to accept N connections (each answered once)",
        "seconds",
        "held-accept",
        digits=2,
    ),
    Curve(
        "held",
        "cpu_us_per_req",
        "Paced prober beside N held: proxy CPU per request",
        "µs per request",
        "held-probe-cpu",
        digits=2,
        floor=False,
    ),
    Curve(
        "held",
        "user_us_per_req",
        "Paced prober beside N held: proxy user-space CPU per request",
        "µs per request",
        "held-probe-user",
        digits=2,
        floor=False,
    ),
    Curve(
        "held",
        "lat_us.p50",
        "Paced prober beside N held: latency p50",
        "µs (log)",
        "held-probe-p50",
        True,
        0,
    ),
    Curve(
        "held",
        "lat_us.p99",
        "Paced prober beside N held: latency p99",
        "µs (log)",
        "held-probe-p99",
        True,
        0,
    ),
    Curve(
        "held",
        "lat_us.p999",
        "Paced prober beside N held: latency p99.9",
        "µs (log)",
        "held-probe-p999",
        True,
        0,
    ),
    Curve(
        "held",
        "lat_us.max",
        "Paced prober beside N held: latency max",
        "µs (log)",
        "held-probe-max",
        True,
        0,
    ),
    *_rate_curves("rr", "Kept-alive requests (httpd.c)", "req"),
    *_rate_curves("churn", "New connections (httpd.c, one request each)", "conn"),
    *_rate_curves("rr-etcd", "Kept-alive requests to etcd", "req"),
]
# The curves RESULTS.md shows as pictures (the rest are linked and tabled).
SHOWN = {
    "held-memory",
    "held-kernel",
    "held-idle-cpu",
    "held-accept",
    "held-probe-cpu",
    "held-probe-p99",
    "held-probe-p999",
    "rr-cpu",
    "rr-p99",
    "rr-p999",
    "churn-cpu",
    "churn-p99",
    "churn-p999",
    "rr-etcd-p99",
}


def _xlabel(sweep: str) -> str:
    return {
        "held": "held connections",
        "rr": "offered requests per second",
        "churn": "offered new connections per second",
        "rr-etcd": "offered requests per second",
    }[sweep]


def draw(summary: Summary, outdir: Path) -> tuple[list[Curve], str]:
    """One PNG (and an SVG beside it) per curve that has data; (drawn, why none were)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return [], "matplotlib not installed (pip install -e '.[bench]', or bench/setup.sh)"
    outdir.mkdir(parents=True, exist_ok=True)
    drawn = []
    for curve in CURVES:
        names = proxies_in(summary, curve.sweep)
        if not curve.floor:
            names = [n for n in names if n != "direct"]
        lines = []
        for proxy in names:
            pts = []
            for x in xs_of(summary, curve.sweep):
                s = spread_of(summary, curve.sweep, proxy, x, curve.key)
                if s is not None:
                    pts.append((x, s))
            if pts:
                lines.append((proxy, pts))
        if not lines:
            continue
        fig, ax = plt.subplots(figsize=(9.0, 4.5))
        for proxy, pts in lines:
            xs = [x for x, _ in pts]
            med = [s.median for _, s in pts]
            err = [[s.median - s.low for _, s in pts], [s.high - s.median for _, s in pts]]
            style: dict[str, Any] = {"marker": "o", "markersize": 4, "capsize": 3}
            label = proxy
            if proxy == "direct":
                style.update(color="black", linestyle="--", marker="", linewidth=1.5)
                label = "direct (no proxy: the floor)"
            elif proxy.startswith("etcdgw"):
                style.update(linewidth=2.2)
            ax.errorbar(xs, med, yerr=err, label=label, **style)
        ax.set_title(curve.title, fontsize=10)
        ax.set_xlabel(_xlabel(curve.sweep))
        ax.set_ylabel(curve.ylabel)
        if curve.log_y:
            ax.set_yscale("log")
            plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}")
            ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        else:
            ax.set_ylim(bottom=min(0.0, ax.get_ylim()[0]))
        ax.grid(True, which="both", alpha=0.3)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
        ax.text(
            0.99,
            0.01,
            "median, bars: min-max over repetitions",
            transform=ax.transAxes,
            ha="right",
            va="bottom",
            fontsize=7,
            color="gray",
        )
        fig.tight_layout()
        fig.savefig(outdir / f"{curve.file}.png", dpi=110)
        fig.savefig(outdir / f"{curve.file}.svg")
        plt.close(fig)
        drawn.append(curve)
    return drawn, ""


# -- knees, saturation, memory lines --------------------------------------------------------


def knees(summary: Summary, sweep: str, proxy: str) -> dict[int, Knee]:
    """Per repetition: where p99 passes 2x its figure at the lowest rate."""
    by_x = summary.get(sweep, {}).get(proxy, {})
    reps = {rep for per in by_x.values() for rep in per}
    out = {}
    for rep in sorted(reps):
        rates = sorted(x for x in by_x if rep in by_x[x])
        p99s = [value(by_x[x][rep], "lat_us.p99") for x in rates]
        # A point past saturation stands for where p99 went, however high it read.
        k = knee(rates, p99s)
        if k is not None:
            out[rep] = k
    return out


def knee_rate(k: Knee) -> float | None:
    """The knee, or the highest rate measured when p99 never crossed (a lower bound)."""
    return k.rate if k.rate is not None else k.beyond


def saturation(summary: Summary, sweep: str, proxy: str) -> dict[int, float]:
    """Per repetition: the most completed per second at any rate."""
    by_x = summary.get(sweep, {}).get(proxy, {})
    out: dict[int, float] = {}
    for per in by_x.values():
        for rep, m in per.items():
            a = value(m, "achieved")
            if a is not None:
                out[rep] = max(out.get(rep, 0.0), a)
    return out


def memory_lines(summary: Summary, proxy: str) -> dict[int, tuple[float, float]]:
    """Per repetition: (KB per connection slope, MB at EXTRAPOLATE_TO) of the line through
    the proxy's PSS against held connections."""
    by_x = summary.get("held", {}).get(proxy, {})
    reps = {rep for per in by_x.values() for rep in per}
    out = {}
    for rep in sorted(reps):
        pts = [(x, value(by_x[x][rep], "pss_kb")) for x in sorted(by_x) if rep in by_x[x]]
        xs = [x for x, y in pts if y is not None]
        ys = [y for _, y in pts if y is not None]
        line = fit_line(xs, ys) if len(xs) >= 2 else None
        if line is not None:
            out[rep] = (line.slope, line.at(EXTRAPOLATE_TO) / 1024)
    return out


# -- targets (issue 21) ---------------------------------------------------------------------


def _judge(values: dict[int, float], bound: float) -> tuple[str, str, str]:
    """(figure text, verdict, why) for "every repetition's value <= bound"."""
    s = stats.spread(values.values())
    if s is None:
        return "—", stats.UNDECIDED, "not measured"
    r = stats.Ratio(s.median, s.low, s.high, s.n)
    verdict, why = stats.verdict(r, bound)
    text = f"{s.median:.2f}" + (f" ({s.low:.2f}–{s.high:.2f})" if s.n > 1 else "")
    return text, verdict, why


def _ratio_by_rep(a: dict[int, float], b: dict[int, float]) -> dict[int, float]:
    return {rep: a[rep] / b[rep] for rep in a if rep in b and b[rep] > 0}


def _best_peer(
    summary: Summary, per_proxy: dict[str, dict[int, float]], lower_is_better: bool
) -> dict[int, float]:
    """Per repetition: the best of the peers' values (lowest cost, or highest knee)."""
    reps = {rep for p in PEERS for rep in per_proxy.get(p, {})}
    out = {}
    for rep in reps:
        vals = [per_proxy[p][rep] for p in PEERS if rep in per_proxy.get(p, {})]
        if vals:
            out[rep] = min(vals) if lower_is_better else max(vals)
    return out


def _near_saturation(summary: Summary, sweep: str, rep: int, proxies: list[str]) -> float | None:
    """The highest rate at which every one of `proxies` completed what was offered."""
    best = None
    for x in xs_of(summary, sweep):
        ok = True
        for p in proxies:
            m = summary.get(sweep, {}).get(p, {}).get(x, {}).get(rep)
            if m is None or m.get("saturated"):
                ok = False
                break
        if ok:
            best = x
    return best


def target_rows(summary: Summary) -> list[tuple[str, str, str, str]]:
    """(target, figure, verdict, why) for each target of issue 21 the run measured."""
    rows: list[tuple[str, str, str, str]] = []
    held_xs = xs_of(summary, "held")
    if held_xs:
        top, low = held_xs[-1], held_xs[0]
        for proxy, bound in (("etcdgw-cython", 1.0), ("etcdgw-python", 2.0)):
            vals = by_rep(summary, "held", proxy, top, "kb_per_conn")
            rows.append(
                (
                    f"{proxy}: PSS per connection at {top:,.0f} held <= {bound:g} KB",
                    *_judge(vals, bound),
                )
            )
        if top != low:
            for proxy in ETCDGW:
                for key, bound, what in (
                    ("cpu_us_per_req", 1.10, "prober CPU per request"),
                    ("lat_us.p99", 2.0, "prober p99"),
                ):
                    hi = by_rep(summary, "held", proxy, top, key)
                    lo = by_rep(summary, "held", proxy, low, key)
                    rows.append(
                        (
                            f"{proxy}: {what} at {top:,.0f} held / at {low:,.0f} <= {bound:g}",
                            *_judge(_ratio_by_rep(hi, lo), bound),
                        )
                    )
            for proxy in ETCDGW:
                for key, what in (("lat_us.p999", "p99.9"), ("lat_us.max", "max")):
                    per = {p: by_rep(summary, "held", p, top, key) for p in (*PEERS, proxy)}
                    best = _best_peer(summary, per, lower_is_better=True)
                    rows.append(
                        (
                            f"{proxy}: prober {what} at {top:,.0f} held / best peer's <= 1",
                            *_judge(_ratio_by_rep(per[proxy], best), 1.0),
                        )
                    )
        # User-space CPU per paced request: the prober's, over every held level.
        for proxy in ETCDGW:
            mine, pens = (
                _mean_over(summary, "held", proxy, "user_us_per_req", held_xs),
                _mean_over(summary, "held", "pen", "user_us_per_req", held_xs),
            )
            rows.append(
                (
                    f"{proxy}: user-space CPU per paced request / pen's <= 1",
                    *_judge(_ratio_by_rep(mine, pens), 1.0),
                )
            )
    for sweep in ("rr", "churn"):
        if sweep not in summary:
            continue
        per_knee = {
            p: {rep: kr for rep, k in knees(summary, sweep, p).items() if (kr := knee_rate(k))}
            for p in (*PEERS, *ETCDGW)
        }
        best = _best_peer(summary, per_knee, lower_is_better=False)
        for proxy in ETCDGW:
            rows.append(
                (
                    f"{proxy}: best peer's {sweep} knee / its own <= 1 (knee at or above)",
                    *_judge(_ratio_by_rep(best, per_knee[proxy]), 1.0),
                )
            )
            present = [p for p in PEERS if p in summary[sweep]]
            for key, what in (("lat_us.p999", "p99.9"), ("lat_us.max", "max")):
                ratios: dict[int, float] = {}
                for rep in {r for per in summary[sweep].get(proxy, {}).values() for r in per}:
                    x = _near_saturation(summary, sweep, rep, [proxy, *present])
                    if x is None:
                        continue
                    own = value(summary[sweep][proxy][x][rep], key)
                    peers = [value(summary[sweep][p][x][rep], key) for p in present]
                    peers_ok = [v for v in peers if v is not None]
                    if own is not None and peers_ok and min(peers_ok) > 0:
                        ratios[rep] = own / min(peers_ok)
                rows.append(
                    (
                        f"{proxy}: {sweep} {what} near saturation / best peer's <= 1",
                        *_judge(ratios, 1.0),
                    )
                )
    if "churn" in summary:
        for proxy in ETCDGW:
            mine, pens = _paced_user_per_conn(summary, proxy)
            rows.append(
                (
                    f"{proxy}: user-space CPU per new connection / pen's <= 1",
                    *_judge(_ratio_by_rep(mine, pens), 1.0),
                )
            )
    return rows


def _mean_over(
    summary: Summary, sweep: str, proxy: str, key: str, xs: list[float]
) -> dict[int, float]:
    out: dict[int, list[float]] = {}
    for x in xs:
        for rep, v in by_rep(summary, sweep, proxy, x, key).items():
            out.setdefault(rep, []).append(v)
    return {rep: statistics.fmean(v) for rep, v in out.items()}


def _paced_user_per_conn(summary: Summary, proxy: str) -> tuple[dict[int, float], dict[int, float]]:
    """Per repetition, over the churn rates neither proxy nor pen saturated: user-space CPU
    seconds over connections, for the proxy and for pen."""
    sides: tuple[dict[int, float], dict[int, float]] = ({}, {})
    by = summary.get("churn", {})
    reps = {r for per in by.get(proxy, {}).values() for r in per}
    for rep in reps:
        sums = [[0.0, 0.0], [0.0, 0.0]]
        for x in xs_of(summary, "churn"):
            ms = [by.get(p, {}).get(x, {}).get(rep) for p in (proxy, "pen")]
            if any(m is None or m.get("saturated") for m in ms):
                continue
            for i, m in enumerate(ms):
                assert m is not None
                sums[i][0] += m.get("proxy_user_s", 0.0)
                sums[i][1] += m.get("done_in_window", 0)
        for i in range(2):
            if sums[i][1]:
                sides[i][rep] = sums[i][0] * 1e6 / sums[i][1]
    return sides


# -- Markdown -------------------------------------------------------------------------------


def _cell(s: PointSpread | None, digits: int) -> str:
    if s is None:
        return "—"
    text = f"{s.median:,.{digits}f}"
    if s.n > 1:
        text += f" ({s.low:,.{digits}f}–{s.high:,.{digits}f})"
    return text


def curve_table(summary: Summary, curve: Curve) -> list[str]:
    xs = xs_of(summary, curve.sweep)
    names = proxies_in(summary, curve.sweep)
    if not curve.floor:
        names = [n for n in names if n != "direct"]
    head = "| proxy | " + " | ".join(f"{x:,.0f}" for x in xs) + " |"
    lines = [head, "|---|" + "---|" * len(xs)]
    for proxy in names:
        cells = [
            _cell(spread_of(summary, curve.sweep, proxy, x, curve.key), curve.digits) for x in xs
        ]
        if any(c != "—" for c in cells):
            lines.append(f"| {proxy} | " + " | ".join(cells) + " |")
    return lines


def _errors(points: list[dict[str, Any]]) -> list[str]:
    out = []
    for row in points:
        if "error" in row and not row["error"].startswith("skipped"):
            out.append(
                f"- {row['sweep']} {row['proxy']} rep {row['rep'] + 1} at "
                f"{row['x']:,.0f}: {row['error'].splitlines()[0][:200]}"
            )
    return out


def _loadgen_check(summary: Summary) -> list[str]:
    """How busy the load generator was: the most of one core it used at any point, and
    direct's highest completed rate (the load generator, httpd.c and the kernel alone)."""
    lines = []
    for sweep in ("held", *RATE_SWEEPS):
        cores = [
            v
            for per_proxy in summary.get(sweep, {}).values()
            for per in per_proxy.values()
            for m in per.values()
            if (v := value(m, "lg_core")) is not None
        ]
        if not cores:
            continue
        text = f"- {sweep}: the load generator used at most {max(cores):.2f} of a core"
        sat = saturation(summary, sweep, "direct")
        if sat and sweep in RATE_SWEEPS:
            text += f"; direct completed up to {max(sat.values()):,.0f}/s"
        lines.append(text)
    return lines


def markdown(data: dict[str, Any], summary: Summary, drawn: list[Curve], img_dir: str) -> str:
    env = data["env"]
    cfg = env["config"]
    out = [
        BEGIN,
        "",
        f"Generated by `{env['command']}` on {env['date']} ({env['mode']}): "
        f"{env['nproc']} cores ({env['cpu_model']}), kernel {env['kernel']}, "
        f"{env['elapsed_s']} s (planned {env['plan_s']} s); load average at the start "
        f"{' '.join(env['loadavg_at_start'])}. Network namespace sysctls: "
        + (", ".join(f"{k}={v}" for k, v in env["netns_sysctls"].items()) or "none (--no-netns)")
        + f"; fd limit {env['nofile']} for every process. Every figure is the median over "
        f"{cfg['reps']} interleaved repetitions, then (min–max).",
        "",
        "Load generator check (bench/loadgen.c, one thread; it must not be what saturates):",
        "",
        *_loadgen_check(summary),
        "",
    ]
    sections = (
        (
            "held",
            f"Held connections (N = {', '.join(f'{n:,}' for n in cfg['held'])}; a trickle "
            f"of one request per connection every {cfg['trickle_s']:g} s; prober "
            f"{cfg['probe_rate']:,.0f} req/s over {cfg['probe_conns']} connections, "
            f"{cfg['probe_s']:g} s)",
        ),
        (
            "rr",
            "Kept-alive requests to saturation (bench/httpd.c; "
            f"{cfg['rr_conns']} connections, open loop)",
        ),
        ("churn", "New connections to saturation (bench/httpd.c; one request each)"),
        (
            "rr-etcd",
            "Kept-alive requests to the etcd cluster (the `direct` row is etcd's own: "
            "where its p99 doubles, etcd, not a proxy, stops carrying the load)",
        ),
    )
    for sweep, title in sections:
        if sweep not in summary:
            continue
        out += [f"### {title}", ""]
        for curve in (c for c in CURVES if c.sweep == sweep):
            if not any(
                spread_of(summary, sweep, p, x, curve.key)
                for p in summary[sweep]
                for x in xs_of(summary, sweep)
            ):
                continue
            out.append(f"**{curve.title}** ({curve.ylabel.replace(' (log)', '')})")
            out.append("")
            if curve in drawn:
                png = f"{img_dir}/{curve.file}.png"
                if curve.file in SHOWN:
                    out += [f"![{curve.title}]({png})", ""]
                else:
                    out += [
                        f"Plot: [{curve.file}.png]({png}), [svg]({img_dir}/{curve.file}.svg)",
                        "",
                    ]
            out += [*curve_table(summary, curve), ""]
        if sweep in RATE_SWEEPS:
            out += _knee_table(summary, sweep)
    rows = target_rows(summary)
    if rows:
        out += [
            "### Targets (issue 21), judged per repetition",
            "",
            "A target is **met** when every repetition is within it, **missed** when none is, "
            "otherwise (or with fewer than 3 repetitions) **not decidable**.",
            "",
            "| target | median (range) | verdict | why |",
            "|---|---|---|---|",
        ]
        out += [f"| {t} | {f} | **{v}** | {w} |" for t, f, v, w in rows]
        out.append("")
    mem = _memory_table(summary)
    if mem:
        out += mem
    errs = _errors(data["points"])
    if errs:
        out += ["### Points that failed", "", *errs, ""]
    out.append(END)
    return "\n".join(out) + "\n"


def _knee_table(summary: Summary, sweep: str) -> list[str]:
    lines = [
        f"Knee (p99 past 2x its figure at {xs_of(summary, sweep)[0]:,.0f}/s) and saturation "
        "(the most completed per second), per repetition:",
        "",
        "| proxy | knee /s | saturation /s | proxy CPU at saturation (cores) |",
        "|---|---|---|---|",
    ]
    for proxy in proxies_in(summary, sweep):
        ks = knees(summary, sweep, proxy)
        texts = [
            f"{k.rate:,.0f}" if k.rate is not None else f"> {k.beyond:,.0f}"
            for _, k in sorted(ks.items())
            if k.rate is not None or k.beyond is not None
        ]
        sat = saturation(summary, sweep, proxy)
        cores = []
        for rep, top in sat.items():
            for per in summary[sweep][proxy].values():
                m = per.get(rep)
                if m is not None and value(m, "achieved") == top and "proxy_core" in m:
                    cores.append(float(m["proxy_core"]))
        sat_text = ", ".join(f"{v:,.0f}" for _, v in sorted(sat.items()))
        core_text = ", ".join(f"{c:.2f}" for c in cores) or "—"
        lines.append(f"| {proxy} | {', '.join(texts) or '—'} | {sat_text or '—'} | {core_text} |")
    return [*lines, ""]


def _memory_table(summary: Summary) -> list[str]:
    names = [p for p in proxies_in(summary, "held") if p != "direct"]
    rows = []
    for proxy in names:
        lines = memory_lines(summary, proxy)
        if not lines:
            continue
        slope = point_spread(s for s, _ in lines.values())
        at = point_spread(mb for _, mb in lines.values())
        rows.append(f"| {proxy} | {_cell(slope, 2)} | {_cell(at, 0)} |")
    if not rows:
        return []
    return [
        f"### Proxy memory at {EXTRAPOLATE_TO:,} held connections, extrapolated",
        "",
        "The least-squares line through each repetition's PSS at every N held (this machine "
        "caps a process at 20,000 fds, so 9,000-9,500 pairs is as far as it can measure); "
        "pen allocates its table for `-x` connections at start, so its slope is ~0 and its "
        "figure holds only for `-x` as large.",
        "",
        "| proxy | slope KB per connection | MB at 100,000 |",
        "|---|---|---|",
        *rows,
        "",
    ]


def write_section(path: Path, body: str) -> None:
    """Replace what is between the scaling markers of RESULTS.md with body."""
    text = path.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{path}: the scaling markers are missing ({BEGIN!r} ... {END!r})")
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    path.write_text(head + body.rstrip("\n") + tail)


def render(data: dict[str, Any], out: Path, write_md: bool, bench: Path) -> int:
    """Plots and Markdown of a run: into bench/scale/ and bench/RESULTS.md (write_md), else
    into out/scale-STAMP/ beside the JSON."""
    summary = collect(data["points"])
    if write_md:
        img_dir, rel = bench / "scale", "scale"
    else:
        img_dir = out / f"scale-{data['env']['stamp']}"
        rel = "."
    drawn, why = draw(summary, img_dir)
    if why:
        print(f"plots skipped: {why}")
    else:
        print(f"plots: {len(drawn)} curves in {img_dir} (PNG + SVG)")
    body = markdown(data, summary, drawn, rel)
    if write_md:
        write_section(bench / "RESULTS.md", body)
        print("wrote the scaling section of bench/RESULTS.md")
    else:
        img_dir.mkdir(parents=True, exist_ok=True)
        (img_dir / "RESULTS-scale.md").write_text(body)
        print(f"report: {img_dir / 'RESULTS-scale.md'}")
    return 0
