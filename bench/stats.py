"""How far to trust a benchmark figure: spreads, flags, paired ratios, target verdicts, history.

Pure functions on plain numbers (no I/O except the two history-file helpers at the end), so
the yardstick itself is unit-tested (tests/test_bench_stats.py).

Definitions used everywhere (bench/README.md repeats them for readers of RESULTS.md):

- relative spread of a cell = (max - min) / median of its repetitions;
- a cell is flagged `~` when its relative spread exceeds SPREAD_FLAG, and `!` when its
  median is more than DRIFT_FLAG away from the median of the same proxy's medians in the
  last HISTORY_KEEP comparable runs (drift: the machine, not the proxy, probably changed);
- a ratio is the ratio of the two medians, with the range of the per-repetition ratios
  (each repetition's value over the other proxy's value in the same repetition: the
  repetitions are interleaved, so the two ran minutes apart under the same conditions);
- a target "ratio <= bound" is met when every per-repetition ratio is <= bound, missed when
  every one is > bound, and not decidable when they straddle the bound, fewer than
  MIN_PAIRS repetitions paired up, or either side drifted (`!`) from its recent runs;
- a cost at or below zero (an added machine CPU smaller than the noise) has no ratio.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SPREAD_FLAG = 0.15
DRIFT_FLAG = 0.25
HISTORY_KEEP = 5
MIN_PAIRS = 3  # "several runs": the default --reps; two agreeing repetitions are too few

# /proc/stat "cpu" columns: user nice system idle iowait irq softirq steal guest guest_nice.
# Busy = everything but idle and iowait; guest time is already counted inside user/nice.
_BUSY_COLUMNS = (0, 1, 2, 5, 6, 7)


def busy_jiffies(proc_stat: str) -> int:
    """Whole-machine busy clock ticks (all CPUs) from the text of /proc/stat."""
    for line in proc_stat.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            values = [int(x) for x in fields[1:]]
            return sum(values[i] for i in _BUSY_COLUMNS if i < len(values))
    raise ValueError("no aggregate 'cpu' line in /proc/stat")


@dataclass(frozen=True)
class Spread:
    median: float
    low: float
    high: float
    n: int

    @property
    def relative(self) -> float | None:
        """(max - min) / median; None when the median is 0."""
        if self.median == 0:
            return None
        return (self.high - self.low) / abs(self.median)


def spread(values: Iterable[float | int | None]) -> Spread | None:
    nums = [float(v) for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    if not nums:
        return None
    return Spread(statistics.median(nums), min(nums), max(nums), len(nums))


def drift(median: float | None, past: Iterable[float]) -> float | None:
    """Relative distance of this run's median from the median of past runs' medians."""
    past = [p for p in past if p]
    if median is None or not past:
        return None
    ref = statistics.median(past)
    return (median - ref) / ref


def flags(s: Spread | None, past: Iterable[float] = ()) -> str:
    """'~' for a large spread, '!' for a large drift from recent runs; '' when neither."""
    if s is None:
        return ""
    out = ""
    rel = s.relative
    if s.n > 1 and rel is not None and rel > SPREAD_FLAG:
        out += "~"
    d = drift(s.median, past)
    if d is not None and abs(d) > DRIFT_FLAG:
        out += "!"
    return out


def paired_ratios(
    mine: Mapping[int, float | None], other: Mapping[int, float | None]
) -> list[float]:
    """mine[rep] / other[rep] for every repetition both have a (non-zero) value for."""
    out = []
    for rep in sorted(set(mine) & set(other)):
        a, b = mine[rep], other[rep]
        # A cost at or below zero (an added machine CPU smaller than the noise) has no ratio.
        if a is not None and b is not None and a >= 0 and b > 0:
            out.append(a / b)
    return out


@dataclass(frozen=True)
class Ratio:
    of_medians: float
    low: float | None  # range of the per-repetition ratios (None: nothing paired)
    high: float | None
    pairs: int


def ratio(mine: Mapping[int, float | None], other: Mapping[int, float | None]) -> Ratio | None:
    a = spread(mine.values())
    b = spread(other.values())
    if a is None or b is None or a.median < 0 or b.median <= 0:
        return None
    per_rep = paired_ratios(mine, other)
    return Ratio(
        a.median / b.median,
        min(per_rep) if per_rep else None,
        max(per_rep) if per_rep else None,
        len(per_rep),
    )


MET, MISSED, UNDECIDED = "met", "missed", "not decidable"


def verdict(r: Ratio | None, bound: float, drifted: Iterable[str] = ()) -> tuple[str, str]:
    """(verdict, reason) for the target "ratio <= bound", from the per-repetition ratios.

    `drifted` names the proxies of the ratio whose median drifted from their recent runs
    (flag `!`): pairing cancels what changed for both within the run, not a reference that
    ran unlike itself all run long, so such a run decides nothing."""
    if r is None:
        return UNDECIDED, "not measured"
    if r.pairs < MIN_PAIRS or r.low is None or r.high is None:
        return UNDECIDED, f"{r.pairs} paired repetition(s); need {MIN_PAIRS}"
    if r.high <= bound:
        result, why = MET, f"every repetition <= {bound:g}"
    elif r.low > bound:
        result, why = MISSED, f"every repetition > {bound:g}"
    else:
        return (
            UNDECIDED,
            f"spreads overlap: repetitions {r.low:.2f}-{r.high:.2f} straddle {bound:g}",
        )
    drifted = list(drifted)
    if drifted:
        return UNDECIDED, f"{why}, but drifted from recent runs: {', '.join(drifted)}"
    return result, why


def subtract_by_rep(
    mine: Mapping[int, float | None], base: Mapping[int, float | None]
) -> dict[int, float]:
    """mine[rep] - base[rep] for each repetition both measured (the same-rep baseline)."""
    return {
        rep: mine[rep] - base[rep]  # type: ignore[operator]
        for rep in mine
        if rep in base and mine[rep] is not None and base[rep] is not None
    }


# -- history of past runs' medians ---------------------------------------------------------
# {"runs": [{"stamp": str, "profile": str, "medians": {workload: {proxy: {metric: x}}}}]}


def past_medians(
    history: Mapping[str, Any], profile: str, workload: str, proxy: str, metric: str, before: str
) -> list[float]:
    """The metric's medians in the last HISTORY_KEEP runs of the same profile before `before`
    (a run stamp; runs are stamped %Y%m%d-%H%M%S, so they sort by time)."""
    out = []
    for run in history.get("runs", []):
        if run.get("profile") != profile or not run.get("stamp", "") < before:
            continue
        value = run.get("medians", {}).get(workload, {}).get(proxy, {}).get(metric)
        if isinstance(value, int | float):
            out.append(float(value))
    return out[-HISTORY_KEEP:]


def add_run(
    history: Mapping[str, Any],
    stamp: str,
    profile: str,
    medians: Mapping[str, Mapping[str, Mapping[str, float]]],
    keep: int = 50,
) -> dict[str, Any]:
    """A new history with this run appended (replacing a run of the same stamp), trimmed."""
    runs = [r for r in history.get("runs", []) if r.get("stamp") != stamp]
    runs.append({"stamp": stamp, "profile": profile, "medians": medians})
    runs.sort(key=lambda r: str(r.get("stamp", "")))
    return {"runs": runs[-keep:]}


def load_history(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {"runs": []}
    except (OSError, ValueError) as exc:
        raise SystemExit(f"bench: cannot read history {path}: {exc}") from None
    return data if isinstance(data, dict) else {"runs": []}


def save_history(path: Path, history: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(history, indent=1) + "\n")
    tmp.replace(path)
