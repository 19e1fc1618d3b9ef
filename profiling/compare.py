"""``python -m profiling compare A B``: per-case ratios B / A of two reports.

Ratios below 1 mean B is faster or leaner than A. Memory is compared on the GPU when both
reports have GPU figures for every shared case, otherwise on host RSS (never a mix).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


class ReportError(ValueError):
    """A report folder that cannot be read; the message is one line for the user."""


@dataclass(frozen=True)
class CaseFigures:
    """The figures of one case in one report."""

    time_s: float
    max_gpu_mb: float | None
    total_gpu_mb_s: float | None
    max_rss_mb: float
    total_rss_mb_s: float
    failed: bool = False


def load_report(folder: str | Path) -> dict[str, CaseFigures]:
    """The measured cases of a report folder (its ``results.json``), by case name.

    Raises:
        ReportError: no readable results.json in ``folder``.
    """
    path = Path(folder) / "results.json"
    if not path.is_file():
        raise ReportError(f"no results.json in {folder}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        cases = {}
        for record in data["cases"]:
            m = record.get("metrics")
            if m is None:
                continue
            cases[record["case"]] = CaseFigures(
                time_s=m["time_s"],
                max_gpu_mb=m["max_gpu_mb"],
                total_gpu_mb_s=m["total_gpu_mb_s"],
                max_rss_mb=m["max_rss_mb"],
                total_rss_mb_s=m["total_rss_mb_s"],
                failed=record.get("error") is not None,
            )
    except (ValueError, KeyError, TypeError) as err:
        raise ReportError(f"{path} is not a profiling report ({err})") from None
    return cases


def ratio(a: float | None, b: float | None) -> float | None:
    """``b / a``, or None when either is unknown or ``a`` is not positive."""
    if a is None or b is None or a <= 0:
        return None
    return b / a


def geometric_mean(values: Sequence[float | None]) -> float | None:
    """Geometric mean of the positive values; None if there are none."""
    known = [v for v in values if v is not None and v > 0]
    if not known:
        return None
    return math.exp(sum(math.log(v) for v in known) / len(known))


@dataclass(frozen=True)
class Row:
    """One case of a comparison: A's and B's values and B / A for each figure.

    ``failed`` marks a case that failed in A or B; it is left out of the geometric means.
    """

    case: str
    a: tuple[float | None, float | None, float | None]
    b: tuple[float | None, float | None, float | None]
    ratios: tuple[float | None, float | None, float | None]
    failed: bool = False


@dataclass(frozen=True)
class Comparison:
    """Two reports side by side.

    Attributes:
        memory: ``"gpu"`` or ``"rss"``: what the memory and area columns compare.
        rows: the cases measured in both, in name order.
        geomean: geometric mean of each ratio column over the cases that failed in neither.
        only_a: cases measured only in A; ``only_b`` likewise.
    """

    memory: str
    rows: list[Row]
    geomean: tuple[float | None, float | None, float | None]
    only_a: list[str]
    only_b: list[str]


def compare(a: dict[str, CaseFigures], b: dict[str, CaseFigures]) -> Comparison:
    """Per-case ratios B / A of time, peak memory and memory-time area."""
    shared = sorted(set(a) & set(b))
    both = [a[c] for c in shared] + [b[c] for c in shared]
    gpu = bool(shared) and all(f.max_gpu_mb is not None for f in both)

    def figures(f: CaseFigures) -> tuple[float | None, float | None, float | None]:
        if gpu:
            return f.time_s, f.max_gpu_mb, f.total_gpu_mb_s
        return f.time_s, f.max_rss_mb, f.total_rss_mb_s

    rows = []
    for case in shared:
        fa, fb = figures(a[case]), figures(b[case])
        ratios = tuple(ratio(x, y) for x, y in zip(fa, fb, strict=True))
        rows.append(Row(case, fa, fb, ratios, a[case].failed or b[case].failed))
    ok = [r for r in rows if not r.failed]
    geomean = tuple(geometric_mean([r.ratios[i] for r in ok]) for i in range(3))
    return Comparison(
        memory="gpu" if gpu else "rss",
        rows=rows,
        geomean=geomean,
        only_a=sorted(set(a) - set(b)),
        only_b=sorted(set(b) - set(a)),
    )


def _f(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def format_table(comparison: Comparison, markdown: bool = False) -> str:
    """The comparison as a plain-text or Markdown table, geometric means in the last row."""
    mem = "GPU" if comparison.memory == "gpu" else "RSS"
    header = [
        "case",
        "time A (s)",
        "time B (s)",
        "time B/A",
        f"max {mem} A (MB)",
        f"max {mem} B (MB)",
        f"max {mem} B/A",
        f"{mem} area A (MB·s)",
        f"{mem} area B (MB·s)",
        f"{mem} area B/A",
    ]
    body = []
    for r in comparison.rows:
        body.append(
            [
                f"{r.case} ✗" if r.failed else r.case,
                _f(r.a[0], 2),
                _f(r.b[0], 2),
                _f(r.ratios[0], 3),
                _f(r.a[1], 0),
                _f(r.b[1], 0),
                _f(r.ratios[1], 3),
                _f(r.a[2], 0),
                _f(r.b[2], 0),
                _f(r.ratios[2], 3),
            ]
        )
    g = comparison.geomean
    body.append(["geo. mean", "", "", _f(g[0], 3), "", "", _f(g[1], 3), "", "", _f(g[2], 3)])
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
    else:
        widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

        def fmt(row: list[str]) -> str:
            cells = [row[0].ljust(widths[0])] + [
                c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
            ]
            return "  ".join(cells).rstrip()

        lines = [fmt(header), fmt(["-" * w for w in widths]), *map(fmt, body)]
    notes = []
    if any(r.failed for r in comparison.rows):
        notes.append("✗ failed in A or B: left out of the geometric means")
    if comparison.only_a:
        notes.append(f"only in A: {', '.join(comparison.only_a)}")
    if comparison.only_b:
        notes.append(f"only in B: {', '.join(comparison.only_b)}")
    return "\n".join([*lines, *([""] if notes else []), *notes])
