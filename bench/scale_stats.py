"""The pure statistics of the scaling run (bench/scale.py): latency histograms and their
percentiles, the knee of a rate sweep, the line through memory against held connections,
and per-point summaries over repetitions. No I/O: tests/test_bench_scale.py tests it.

Histograms are bench/loadgen.c's: a value v (ns) below 2**sub_bits is its own bucket; above
that each power of two is split into 2**sub_bits buckets, so a bucket is at most 1/2**sub_bits
(0.8% at 7 bits) of its value wide. A percentile is the nearest-rank one (the value of the
ceil(q * n)-th smallest sample), reported as the middle of its bucket, clipped to the
histogram's exact min and max; the 100th percentile is the exact max.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

KNEE_FACTOR = 2.0  # the knee: where p99 passes this many times its figure at the lowest rate
SATURATED = 0.9  # a point is past saturation when it completed under 90% of what was offered


def bucket_bounds(idx: int, sub_bits: int) -> tuple[int, int]:
    """[lower, upper) of bucket idx (ns), as bench/loadgen.c's bucket_of() fills it."""
    if idx < 0:
        raise ValueError(f"negative bucket {idx}")
    if idx < 1 << sub_bits:
        return idx, idx + 1
    shift = (idx >> sub_bits) - 1
    lower = ((idx & ((1 << sub_bits) - 1)) + (1 << sub_bits)) << shift
    return lower, lower + (1 << shift)


def bucket_of(value: int, sub_bits: int) -> int:
    """The bucket of a value (ns): the Python twin of loadgen.c's bucket_of()."""
    if value < 1 << sub_bits:
        return value
    shift = value.bit_length() - 1 - sub_bits
    return ((shift + 1) << sub_bits) + ((value >> shift) - (1 << sub_bits))


@dataclass
class Hist:
    """A latency histogram: bucket index -> count, with the exact count, min and max."""

    sub_bits: int = 7
    counts: dict[int, int] = field(default_factory=dict)
    n: int = 0
    min_ns: int = 0
    max_ns: int = 0
    sum_ns: float = 0.0

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Hist:
        counts: dict[int, int] = {}
        for idx, count in data.get("buckets", []):
            counts[int(idx)] = counts.get(int(idx), 0) + int(count)
        h = cls(
            int(data.get("sub_bits", 7)),
            counts,
            int(data.get("n", sum(counts.values()))),
            int(data.get("min_ns", 0)),
            int(data.get("max_ns", 0)),
            float(data.get("sum_ns", 0.0)),
        )
        if h.n != sum(counts.values()):
            raise ValueError(f"histogram count {h.n} != sum of its buckets {sum(counts.values())}")
        return h

    def to_json(self) -> dict[str, Any]:
        return {
            "sub_bits": self.sub_bits,
            "n": self.n,
            "min_ns": self.min_ns,
            "max_ns": self.max_ns,
            "sum_ns": self.sum_ns,
            "buckets": [[i, c] for i, c in sorted(self.counts.items())],
        }

    def merge(self, other: Hist) -> Hist:
        """Both histograms' samples in one (same bucket layout)."""
        if other.sub_bits != self.sub_bits:
            raise ValueError("histograms of different precision")
        if not other.n:
            return Hist(
                self.sub_bits, dict(self.counts), self.n, self.min_ns, self.max_ns, self.sum_ns
            )
        if not self.n:
            return other.merge(self)
        counts = dict(self.counts)
        for i, c in other.counts.items():
            counts[i] = counts.get(i, 0) + c
        return Hist(
            self.sub_bits,
            counts,
            self.n + other.n,
            min(self.min_ns, other.min_ns),
            max(self.max_ns, other.max_ns),
            self.sum_ns + other.sum_ns,
        )

    def percentile(self, q: float) -> float | None:
        """The nearest-rank q-th percentile (0 < q <= 100) in ns; None when empty."""
        if not 0 < q <= 100:
            raise ValueError(f"percentile {q} outside (0, 100]")
        if self.n == 0:
            return None
        if q == 100:
            return float(self.max_ns)
        # round() first: 99.9 / 100 * 1000 is 999.0000000000001 in floating point, and
        # its ceiling would skip to the next sample.
        rank = max(1, math.ceil(round(q * self.n / 100, 6)))
        seen = 0
        for idx in sorted(self.counts):
            seen += self.counts[idx]
            if seen >= rank:
                lower, upper = bucket_bounds(idx, self.sub_bits)
                mid = (lower + upper - 1) / 2
                return float(min(max(mid, self.min_ns), self.max_ns))
        return float(self.max_ns)  # unreachable when n matches the buckets

    def mean(self) -> float | None:
        return self.sum_ns / self.n if self.n else None


def merged(hists: Iterable[Hist]) -> Hist:
    out = Hist()
    for h in hists:
        out = out.merge(h)
    return out


PERCENTILES = (("p50", 50.0), ("p99", 99.0), ("p999", 99.9), ("max", 100.0))


def latency_us(h: Hist) -> dict[str, float | None]:
    """p50, p99, p99.9 and max of a histogram, in µs."""
    out: dict[str, float | None] = {}
    for name, q in PERCENTILES:
        v = h.percentile(q)
        out[name] = None if v is None else round(v / 1000, 1)
    return out


def min_samples_for(q: float, tail_samples: int = 10) -> int:
    """Samples a q-th percentile needs for `tail_samples` samples above it."""
    return math.ceil(round(tail_samples / (1 - q / 100), 6)) if q < 100 else 0


# -- knees and saturation -------------------------------------------------------------------


@dataclass(frozen=True)
class Knee:
    rate: float | None  # offered rate where p99 crossed factor x its first figure; None: never
    idle_p99: float
    beyond: float | None = None  # the highest rate measured, when p99 never crossed


def knee(
    rates: Sequence[float], p99s: Sequence[float | None], factor: float = KNEE_FACTOR
) -> Knee | None:
    """Where p99 first passes factor x its value at the lowest rate, interpolated linearly
    between the last point under and the first point over; None without a first point.

    Points are sorted by rate; a point without a p99 (it failed) counts as over the line, so
    a proxy that broke down at a rate does not look as if it had no knee."""
    pts = sorted(zip(rates, p99s, strict=True), key=lambda p: p[0])
    if not pts or pts[0][1] is None or pts[0][1] <= 0:
        return None
    idle = float(pts[0][1])
    line = factor * idle
    prev_rate, prev_p99 = pts[0][0], idle
    for rate, p99 in pts[1:]:
        if p99 is None:
            return Knee(float(rate), idle)
        if p99 > line:
            frac = (line - prev_p99) / (p99 - prev_p99) if p99 != prev_p99 else 1.0
            return Knee(prev_rate + frac * (rate - prev_rate), idle)
        prev_rate, prev_p99 = rate, p99
    return Knee(None, idle, beyond=float(pts[-1][0]))


def saturated(offered: float, achieved: float | None) -> bool:
    """A point is past saturation when it completed under SATURATED of the offered rate."""
    return achieved is None or achieved < SATURATED * offered


# -- memory against held connections --------------------------------------------------------


@dataclass(frozen=True)
class Line:
    slope: float
    intercept: float

    def at(self, x: float) -> float:
        return self.intercept + self.slope * x


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> Line | None:
    """Least-squares line through the points; None with fewer than two distinct xs."""
    if len(xs) != len(ys):
        raise ValueError("xs and ys differ in length")
    if len(set(xs)) < 2:
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    slope = sxy / sxx
    return Line(slope, my - slope * mx)


# -- points over repetitions ----------------------------------------------------------------


@dataclass(frozen=True)
class PointSpread:
    median: float
    low: float
    high: float
    n: int


def point_spread(values: Iterable[float | None]) -> PointSpread | None:
    nums = [float(v) for v in values if v is not None]
    if not nums:
        return None
    return PointSpread(statistics.median(nums), min(nums), max(nums), len(nums))


def per_unit(total: float | None, count: float | None, scale: float = 1e6) -> float | None:
    """total / count x scale (e.g. CPU seconds per request in µs); None without a count."""
    if total is None or not count:
        return None
    return total * scale / count


def within(value: float | None, reference: float | None, bound: float) -> bool | None:
    """value / reference <= bound; None when either is missing or the reference is 0."""
    if value is None or reference is None or reference <= 0:
        return None
    return value / reference <= bound
