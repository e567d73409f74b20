"""Percentiles, result rows and the text table.

Kept free of third-party imports: this module is imported by the benchmark's
entry point, which multiprocess's "spawn" start method re-executes in every
child it starts, so anything heavy here would inflate the spawn floor.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

MS = 1_000_000  # nanoseconds


def percentile(samples: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), q in [0, 100]."""
    if not samples:
        return math.nan
    data = sorted(samples)
    pos = (len(data) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


@dataclasses.dataclass
class Dist:
    """A latency distribution in nanoseconds (or a batch-duration distribution for rates)."""

    samples: list[int]

    @property
    def n(self) -> int:
        return len(self.samples)

    def p(self, q: float) -> float:
        return percentile(self.samples, q)

    def summary(self) -> dict[str, float]:
        if not self.samples:
            return {"n": 0}
        return {"n": self.n, "p50": self.p(50), "p99": self.p(99), "min": min(self.samples),
                "max": max(self.samples), "mean": sum(self.samples) / self.n}


@dataclasses.dataclass
class Row:
    """One line of the report.

    For a latency row `value_p50`/`value_p99` are nanoseconds. For a rate row
    (unit "calls/s") they are operations per second computed from the p50 and
    p99 batch durations, so "p99" is the slow tail in both cases.
    `limit` is the bound the p50 is held to, already in the row's unit, and
    `higher_is_better` says which side of it passes.
    """

    section: str
    name: str
    unit: str  # "ms" or "calls/s"
    value_p50: float
    value_p99: float
    n: int
    floor_name: str = ""
    floor_p50: float | None = None
    target: str = ""
    limit: float | None = None
    higher_is_better: bool = False
    note: str = ""
    samples: list[int] = dataclasses.field(default_factory=list)

    @property
    def ratio(self) -> float | None:
        if self.floor_p50 in (None, 0) or math.isnan(self.value_p50):
            return None
        return self.value_p50 / self.floor_p50

    @property
    def verdict(self) -> str:
        if self.limit is None or math.isnan(self.value_p50):
            return ""
        ok = self.value_p50 >= self.limit if self.higher_is_better else self.value_p50 <= self.limit
        return "PASS" if ok else "MISS"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ratio"] = self.ratio
        d["verdict"] = self.verdict
        return d


def latency_row(section: str, name: str, dist: Dist, floor: Dist | None = None, floor_name: str = "",
                target: str = "", limit_ns: float | None = None, note: str = "") -> Row:
    """A latency row; `limit_ns` is the absolute bound on p50 in nanoseconds."""
    return Row(section, name, "ms", dist.p(50), dist.p(99), dist.n, floor_name,
               floor.p(50) if floor is not None else None, target, limit_ns, False, note, dist.samples)


def rate_row(section: str, name: str, batch_ns: Dist, batch: int, floor_batch_ns: Dist | None,
             floor_name: str, target: str, min_fraction: float, note: str = "") -> Row:
    """A throughput row from per-batch durations; must reach `min_fraction` of the floor's rate."""
    p50 = batch * 1e9 / batch_ns.p(50)
    p99 = batch * 1e9 / batch_ns.p(99)
    floor_p50 = batch * 1e9 / floor_batch_ns.p(50) if floor_batch_ns is not None else None
    limit = floor_p50 * min_fraction if floor_p50 is not None else None
    return Row(section, name, "calls/s", p50, p99, batch_ns.n, floor_name, floor_p50, target, limit, True,
               note, batch_ns.samples)


def _fmt(value: float | None, unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if unit == "ms":
        ms = value / 1e6
        return f"{ms:.3f} ms" if ms < 10 else f"{ms:.1f} ms"
    if unit == "MiB":
        return f"{value / (1 << 20):.2f} MiB"
    if unit == "MiB/s":
        return f"{value:,.0f} MiB/s"
    if unit == "%":
        return f"{value:.1f} %"
    return f"{value:,.0f}/s"


def format_value(value: float | None, unit: str) -> str:
    """A figure as the tables print it (ns as ms, bytes as MiB, rates with their unit)."""
    return _fmt(value, unit)


def _cells(row: Row) -> tuple[str, ...]:
    floor = _fmt(row.floor_p50, row.unit)
    if row.floor_name and row.floor_p50 is not None:
        floor = f"{floor} ({row.floor_name})"
    ratio = f"{row.ratio:.2f}x" if row.ratio is not None else "-"
    return (row.name, _fmt(row.value_p50, row.unit), _fmt(row.value_p99, row.unit), floor, ratio,
            row.target or "-", row.verdict or "-", row.note)


def format_table(rows: list[Row]) -> str:
    """Aligned text table with a heading line per section; numbers right-aligned, the note left ragged."""
    header = ("name", "p50", "p99", "floor p50", "ratio", "target", "result", "note")
    right = {1, 2, 4}
    cells = [_cells(r) for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(header)]
    widths[-1] = 0

    def render(line: tuple[str, ...]) -> str:
        parts = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))]
        return " | ".join(parts).rstrip()

    out = [render(header), "-+-".join("-" * max(w, 4) for w in widths)]
    section = None
    for row, line in zip(rows, cells):
        if row.section != section:
            section = row.section
            out.append(f"[{section}]")
        out.append(render(line))
    return "\n".join(out)
