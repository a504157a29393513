"""The benchmark's yardstick: spreads, flags, paired ratios, target verdicts, the added machine
CPU and the history, on fixed numbers (pure logic); and bench/launch.py end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
# bench/ is a directory of scripts, not a package: import its modules as `run.py` does, and
# take it off sys.path again so its module names (run, report, stats) shadow nothing later.
sys.path.insert(0, str(BENCH))
try:
    import launch
    import report
    import stats
    from run import history_lookup, rotated
finally:
    sys.path.remove(str(BENCH))

PROC_STAT = """\
cpu  100 20 30 5000 400 6 7 8 50 0
cpu0 50 10 15 2500 200 3 3 4 25 0
intr 12345
"""


def test_busy_jiffies_counts_user_nice_system_irq_softirq_steal_only() -> None:
    # idle (5000), iowait (400) and guest (50, already inside user) are left out.
    assert stats.busy_jiffies(PROC_STAT) == 100 + 20 + 30 + 6 + 7 + 8


def test_busy_jiffies_without_cpu_line_fails_loudly() -> None:
    with pytest.raises(ValueError):
        stats.busy_jiffies("intr 1\n")


def test_spread_ignores_missing_values_and_bools() -> None:
    s = stats.spread([10.0, None, 12, 11.0, True])
    assert s == stats.Spread(median=11.0, low=10.0, high=12.0, n=3)
    assert s.relative == pytest.approx(2 / 11)
    assert stats.spread([None]) is None


@pytest.mark.parametrize(
    ("values", "past", "expected"),
    [
        ([100, 105, 110], [], ""),  # 10% spread: trusted
        ([100, 120, 110], [], "~"),  # 18% spread
        ([100], [], ""),  # one repetition has no spread to judge
        ([100, 101], [70, 72, 75], "!"),  # 39% above the recent median of 72
        ([100, 101], [90, 95, 120], ""),  # 5% from the recent median of 95
        ([80, 120], [50], "~!"),
    ],
)
def test_flags(values: list[float], past: list[float], expected: str) -> None:
    assert stats.flags(stats.spread(values), past) == expected


def test_ratio_of_medians_with_range_of_paired_repetitions() -> None:
    mine = {0: 40.0, 1: 50.0, 2: 45.0}
    other = {0: 100.0, 1: 80.0, 3: 90.0}  # rep 2 of other and rep 3 of mine missing
    r = stats.ratio(mine, other)
    assert r is not None
    assert r.of_medians == pytest.approx(45 / 90)
    assert (r.low, r.high) == pytest.approx((0.4, 0.625)) and r.pairs == 2


@pytest.mark.parametrize(
    ("mine", "other", "bound", "expected"),
    [
        ({0: 40, 1: 45, 2: 42}, {0: 100, 1: 95, 2: 98}, 0.5, stats.MET),
        ({0: 60, 1: 65, 2: 70}, {0: 100, 1: 95, 2: 110}, 0.5, stats.MISSED),
        ({0: 40, 1: 45}, {0: 100, 1: 95}, 0.5, stats.UNDECIDED),  # two pairs are too few
        # Medians 0.47x, but one repetition is above the bound: not decidable.
        ({0: 40, 1: 55, 2: 47}, {0: 100, 1: 100, 2: 100}, 0.5, stats.UNDECIDED),
        ({0: 40}, {0: 100}, 0.5, stats.UNDECIDED),  # one pair proves nothing
        ({0: 40}, {1: 100}, 0.5, stats.UNDECIDED),  # nothing paired
    ],
)
def test_verdict(
    mine: dict[int, float], other: dict[int, float], bound: float, expected: str
) -> None:
    assert stats.verdict(stats.ratio(mine, other), bound)[0] == expected


def test_verdict_with_a_drifted_proxy_decides_nothing() -> None:
    r = stats.ratio({0: 40, 1: 45, 2: 44}, {0: 100, 1: 95, 2: 99})
    assert stats.verdict(r, 0.5, ["go-gateway"]) == (
        stats.UNDECIDED,
        "every repetition <= 0.5, but drifted from recent runs: go-gateway",
    )
    straddling = stats.ratio({0: 40, 1: 55, 2: 45}, {0: 100, 1: 100, 2: 100})
    assert stats.verdict(straddling, 0.5, ["pen"])[1].startswith("spreads overlap")


def test_no_ratio_of_costs_at_or_below_zero() -> None:
    # Added machine CPU below the noise: -50 over direct has no meaningful ratio.
    assert stats.ratio({0: 10.0, 1: 20.0}, {0: -50.0, 1: -10.0}) is None
    assert stats.ratio({0: -10.0, 1: -20.0}, {0: 50.0, 1: 10.0}) is None
    r = stats.ratio({0: 10.0, 1: 20.0, 2: 30.0}, {0: 50.0, 1: -10.0, 2: 60.0})
    assert r is not None
    assert (r.low, r.high) == pytest.approx((0.2, 0.5)) and r.pairs == 2


def test_verdict_not_measured() -> None:
    assert stats.verdict(None, 1.0) == (stats.UNDECIDED, "not measured")


def test_rotated_puts_each_proxy_in_each_position() -> None:
    names = ["a", "b", "c"]
    orders = [rotated(names, rep) for rep in range(3)]
    assert orders == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    for pos in range(3):
        assert sorted(o[pos] for o in orders) == names


def _res(wl: str, proxy: str, rep: int, **metrics: float) -> dict[str, object]:
    return {"workload": wl, "proxy": proxy, "rep": rep, "metrics": metrics}


def test_added_machine_cpu_is_over_direct_in_the_same_repetition() -> None:
    results = [
        _res("churn", "direct", 0, machine_us_per_conn=100.0),
        _res("churn", "pen", 0, machine_us_per_conn=250.0, cpu_us_per_conn=120.0),
        _res("churn", "direct", 1, machine_us_per_conn=110.0),
        _res("churn", "pen", 1, machine_us_per_conn=270.0, cpu_us_per_conn=130.0),
        _res("churn", "pen", 2, machine_us_per_conn=999.0),  # no direct in rep 2
        {"workload": "churn", "proxy": "pen", "rep": 3, "error": "boom"},
    ]
    s = report.summarize(results)
    pen = s["churn"]["pen"]
    assert pen["added_machine_us_per_conn_by_rep"] == {0: 150.0, 1: 160.0}
    assert pen["added_machine_us_per_conn"] == 155.0
    assert pen["errors"] == ["boom"]
    assert "added_machine_us_per_conn" not in s["churn"]["direct"]


def test_target_table_from_repetitions() -> None:
    results = []
    go, pen, cy, py = (200, 210, 190), (120, 125, 118), (95, 99, 92), (230, 180, 190)
    for rep in range(3):
        results += [
            _res("churn", "go-gateway", rep, cpu_us_per_conn=go[rep]),
            _res("churn", "pen", rep, cpu_us_per_conn=pen[rep]),
            _res("churn", "etcdgw-cython", rep, cpu_us_per_conn=cy[rep]),
            _res("churn", "etcdgw-python", rep, cpu_us_per_conn=py[rep]),
        ]
    summary = report.summarize(results)

    def table(flagged: dict[tuple[str, str], str]) -> dict[str, str]:
        lines = report._target_table(summary, flagged)
        assert not any("| rr-etcd" in line for line in lines)  # workloads not run: no rows
        return {line.split(" | ")[0].lstrip("| "): line for line in lines if "| churn |" in line}

    rows = table({("churn", "go-gateway"): "~"})
    assert "**met**" in rows["cython <= 0.5x go-gateway"]  # 0.475, 0.471, 0.484
    assert "flagged: go-gateway ~" in rows["cython <= 0.5x go-gateway"]
    assert "**met**" in rows["cython <= 1x pen"]
    # python: medians 190/200 = 0.95, but 230/200 = 1.15 and 180/210 = 0.86: the
    # repetitions straddle 1.0, so one good median does not make the target met.
    assert "**not decidable**" in rows["python <= 1x go-gateway"]
    assert "0.95 (0.86–1.15)" in rows["python <= 1x go-gateway"]
    # The same repetitions, but the Go gateway ran unlike its recent runs: nothing decided.
    rows = table({("churn", "go-gateway"): "!"})
    assert "**not decidable**" in rows["cython <= 0.5x go-gateway"]
    assert "drifted from recent runs: go-gateway" in rows["cython <= 0.5x go-gateway"]
    assert "**met**" in rows["cython <= 1x pen"]
    # A proxy missing from a workload that ran makes its rows "not measured"; no workload
    # of a target at all: no section.
    del summary["churn"]["pen"]
    assert "| **not decidable** | not measured |" in table({})["cython <= 1x pen"]
    assert report._target_table({"grpc": {}}, {}) == []


def test_cell_text_shows_range_relative_spread_and_flag() -> None:
    cell = {"cpu_us_per_req_all": [40.0, 50.0, 44.0], "cpu_us_per_req": 44.0}
    text, flag = report._cell_text(cell, report.Column("x", "cpu_us_per_req", 1))
    assert (text, flag) == ("44.0 (40.0–50.0, 23%) ~", "~")


def test_history_drift_uses_same_profile_and_earlier_runs_only() -> None:
    h: dict[str, object] = {"runs": []}
    for stamp, prof, v in [
        ("20261201-010000", "full 10s", 70.0),
        ("20261201-020000", "quick 2s", 500.0),  # other settings: not comparable
        ("20261201-030000", "full 10s", 74.0),
        ("20261203-000000", "full 10s", 999.0),  # later than the run judged
    ]:
        h = stats.add_run(h, stamp, prof, {"rr": {"go-gateway": {"cpu": v}}})
    env = {"profile": "full 10s", "stamp": "20261202-000000"}
    past = history_lookup(h, env)
    assert past("rr", "go-gateway", "cpu") == [70.0, 74.0]
    assert past("rr", "pen", "cpu") == []
    assert history_lookup(h, {})("rr", "go-gateway", "cpu") == []


def test_history_records_the_medians_of_the_table_columns() -> None:
    results = [
        _res("churn", "pen", rep, cpu_us_per_conn=v, cpu_us_per_gb=1.0, requests=10)
        for rep, v in enumerate((90.0, 80.0, 100.0))
    ]
    results.append({"workload": "grpc", "proxy": "pen", "rep": 0, "metrics": {"pass": True}})
    assert report.medians(report.summarize(results)) == {
        "churn": {"pen": {"cpu_us_per_conn": 90.0}}
    }


def test_history_keeps_the_last_runs_and_replaces_a_rerun(tmp_path: Path) -> None:
    h: dict[str, object] = {"runs": []}
    for i in range(8):
        h = stats.add_run(h, f"2026120{i}-000000", "p", {}, keep=5)
    h = stats.add_run(h, "20261207-000000", "p", {"w": {}}, keep=5)
    runs = h["runs"]
    assert isinstance(runs, list)
    assert [r["stamp"][:8] for r in runs] == [f"2026120{i}" for i in range(3, 8)]
    assert runs[-1]["medians"] == {"w": {}}
    path = tmp_path / "out" / "history.json"
    stats.save_history(path, h)
    assert stats.load_history(path) == h
    assert stats.load_history(tmp_path / "missing.json") == {"runs": []}
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SystemExit, match="cannot read history"):
        stats.load_history(tmp_path / "bad.json")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("etcdgw.server:NATIVE_ACCEPT=0", ("etcdgw.server", "NATIVE_ACCEPT", 0)),
        ("m:FLAG=True", ("m", "FLAG", True)),
        ("m:NAME=epoll", ("m", "NAME", "epoll")),
        ("m:N=-3", ("m", "N", -3)),
    ],
)
def test_launch_parse_assignment(text: str, expected: tuple[str, str, object]) -> None:
    assert launch.parse_assignment(text) == expected


@pytest.mark.parametrize("text", ["NATIVE_ACCEPT=0", "m:=1", "m:A", ":A=1", "m:1A=1"])
def test_launch_rejects_malformed_assignment(text: str) -> None:
    with pytest.raises(ValueError, match="MODULE:ATTRIBUTE=VALUE"):
        launch.parse_assignment(text)


def _launch(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(BENCH.parent / "src")}
    return subprocess.run(
        [sys.executable, str(BENCH / "launch.py"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_launch_sets_the_attribute_then_runs_etcdgw() -> None:
    res = _launch("--set", "etcdgw.server:NATIVE_ACCEPT=0", "--", "version")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("etcdgw ")


def test_launch_refuses_an_unknown_attribute_in_one_line() -> None:
    res = _launch("--set", "etcdgw.server:NO_SUCH_SWITCH=0", "--", "version")
    assert res.returncode == 2
    assert res.stdout == ""
    assert res.stderr.strip().splitlines() == [
        "bench/launch.py: --set: module etcdgw.server has no attribute NO_SUCH_SWITCH"
    ]
