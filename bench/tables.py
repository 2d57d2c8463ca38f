"""Numbers into text: medians, ratios, the overhead histogram's p99 bound, fixed-width tables."""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Sequence

FLAT_WITHIN = 0.10  # round-to-round: last/first within ±10% reads as flat
_BUCKET_RE = re.compile(r'^(\w+)_bucket\{(?:[^}]*,)?le="([^"]+)"[^}]*\}\s+(\S+)', re.MULTILINE)


class Report:
    """Prints each line as it comes and keeps them for the results file."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def line(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)

    def table(self, header: Sequence[str], rows: Sequence[Sequence[object]], *, left: int = 1) -> None:
        """A fixed-width table: the first `left` columns (names) left-aligned, the rest right-aligned."""
        cells = [list(header)] + [[_cell(v) for v in row] for row in rows]
        widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
        for n, row in enumerate(cells):
            text = "  ".join(
                c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
            self.line("  " + text.rstrip())
            if n == 0:
                self.line("  " + "  ".join("-" * w for w in widths))

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _cell(value: object) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.2f}"
    return str(value)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def trend(first: float, last: float) -> str:
    r = ratio(last, first)
    if math.isnan(r):
        return "n/a"
    word = "flat" if abs(r - 1) <= FLAT_WITHIN else ("rising" if r > 1 else "FALLING")
    return f"{word} (last/first {r:.2f})"


def histogram(text: str, name: str) -> dict[float, float]:
    """Cumulative bucket counts `{le: count}` of one Prometheus histogram in exposition text."""
    buckets: dict[float, float] = {}
    for metric, le, value in _BUCKET_RE.findall(text):
        if metric == name:
            buckets[math.inf if le == "+Inf" else float(le)] = float(value)
    return buckets


def quantile_bound(before: dict[float, float], after: dict[float, float], q: float) -> tuple[float, int]:
    """The smallest bucket bound at or under which fraction `q` of the new observations fell.

    Returns (bound in seconds, observations between the two scrapes); the bound is inf when the
    quantile lies in the overflow bucket.
    """
    delta = {le: after[le] - before.get(le, 0.0) for le in after}
    total = delta.get(math.inf, 0.0)
    if total <= 0:
        return float("nan"), 0
    for le in sorted(delta):
        if delta[le] >= q * total:
            return le, int(total)
    return math.inf, int(total)
