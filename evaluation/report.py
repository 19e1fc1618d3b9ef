"""Summaries of per-case results and the evaluation report files (CSV + Markdown).

Summaries are split three ways because the two kinds of case fail differently: cases with
lesions measure segmentation quality, healthy cases (no lesion in the ground truth) score
1 or 0 and so count false-positive predictions.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evaluation.evaluate import CaseResult

#: Column order of ``evaluation.csv`` (read back by ``python -m evaluation select``).
CSV_COLUMNS = (
    "case",
    "dsc",
    "nsd",
    "gt_voxels",
    "pred_voxels",
    "gt_volume_ml",
    "pred_volume_ml",
    "gt_empty",
    "pred_empty",
)
#: Summary groups: name -> description.
GROUPS = {
    "all": "all cases",
    "lesion": "lesion in the ground truth",
    "healthy": "no lesion in the ground truth",
}


@dataclass(frozen=True)
class Stats:
    """Mean, standard deviation (population, ddof=0) and median of some values.

    All three are NaN when there are no values.
    """

    n: int
    mean: float
    std: float
    median: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Stats:
        """Statistics of ``values``."""
        if len(values) == 0:
            return cls(0, float("nan"), float("nan"), float("nan"))
        arr = np.asarray(values, dtype=float)
        return cls(len(arr), float(arr.mean()), float(arr.std()), float(np.median(arr)))

    def mean_std(self, digits: int = 4) -> str:
        """``mean ± std`` as text, ``-`` without values."""
        if self.n == 0:
            return "-"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"

    def median_text(self, digits: int = 4) -> str:
        """The median as text, ``-`` without values."""
        return "-" if self.n == 0 else f"{self.median:.{digits}f}"


@dataclass(frozen=True)
class GroupSummary:
    """DSC and NSD statistics of one group of cases."""

    group: str
    dsc: Stats
    nsd: Stats

    @property
    def n(self) -> int:
        """Number of cases in the group."""
        return self.dsc.n


@dataclass(frozen=True)
class Summary:
    """Everything the report says about a set of results besides the per-case rows.

    Attributes:
        groups: statistics for ``all``, ``lesion`` and ``healthy`` cases.
        false_positive_cases: healthy cases with a non-empty prediction.
        missed_cases: lesion cases with an empty prediction.
        missing_predictions: cases whose prediction file was missing (scored as empty).
    """

    groups: dict[str, GroupSummary]
    false_positive_cases: list[str]
    missed_cases: list[str]
    missing_predictions: list[str]


def summarize(results: Sequence[CaseResult]) -> Summary:
    """Group statistics and case counts of a list of results."""
    members = {
        "all": list(results),
        "lesion": [r for r in results if not r.gt_empty],
        "healthy": [r for r in results if r.gt_empty],
    }
    groups = {
        name: GroupSummary(name, Stats.of([r.dsc for r in rows]), Stats.of([r.nsd for r in rows]))
        for name, rows in members.items()
    }
    return Summary(
        groups=groups,
        false_positive_cases=[r.case for r in results if r.false_positive],
        missed_cases=[r.case for r in results if r.missed],
        missing_predictions=[r.case for r in results if r.pred_missing],
    )


def write_csv(results: Sequence[CaseResult], path: str | os.PathLike) -> Path:
    """Write ``evaluation.csv``: one row per case in :data:`CSV_COLUMNS` order."""
    path = Path(path)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for r in results:
            writer.writerow(
                [
                    r.case,
                    f"{r.dsc:.6f}",
                    f"{r.nsd:.6f}",
                    r.gt_voxels,
                    r.pred_voxels,
                    f"{r.gt_volume_ml:.4f}",
                    f"{r.pred_volume_ml:.4f}",
                    r.gt_empty,
                    r.pred_empty,
                ]
            )
    return path


def summary_table(summary: Summary) -> list[str]:
    """The group statistics as Markdown table lines."""
    lines = [
        "| Cases | n | DSC mean ± std | DSC median | NSD mean ± std | NSD median |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, description in GROUPS.items():
        g = summary.groups[name]
        lines.append(
            f"| {name} ({description}) | {g.n} | {g.dsc.mean_std()} | {g.dsc.median_text()} "
            f"| {g.nsd.mean_std()} | {g.nsd.median_text()} |"
        )
    return lines


def count_lines(summary: Summary) -> list[str]:
    """One line per case count (false positives, missed lesions, missing predictions)."""
    n_healthy = summary.groups["healthy"].n
    n_lesion = summary.groups["lesion"].n
    return [
        f"False-positive cases (no lesion in GT, lesion predicted): "
        f"{len(summary.false_positive_cases)} of {n_healthy}"
        + _names(summary.false_positive_cases),
        f"Missed cases (lesion in GT, nothing predicted): "
        f"{len(summary.missed_cases)} of {n_lesion}" + _names(summary.missed_cases),
        f"Missing predictions (scored as empty): {len(summary.missing_predictions)}"
        + _names(summary.missing_predictions),
    ]


def format_summary(summary: Summary, tolerance_mm: float) -> str:
    """The summary as plain text for the terminal."""
    header = f"{'cases':<8} {'n':>4}  {'DSC mean ± std':>17} {'median':>7}  "
    header += f"{'NSD mean ± std':>17} {'median':>7}"
    lines = [f"FLARE lesion DSC / NSD (tolerance {tolerance_mm:g} mm)", header]
    for name in GROUPS:
        g = summary.groups[name]
        lines.append(
            f"{name:<8} {g.n:>4}  {g.dsc.mean_std():>17} {g.dsc.median_text():>7}  "
            f"{g.nsd.mean_std():>17} {g.nsd.median_text():>7}"
        )
    return "\n".join(lines + count_lines(summary))


def write_markdown(
    results: Sequence[CaseResult],
    summary: Summary,
    path: str | os.PathLike,
    pred_dir: str | os.PathLike,
    gt_dir: str | os.PathLike,
    tolerance_mm: float,
) -> Path:
    """Write ``evaluation.md``: settings, summary tables, counts and the per-case table."""
    lines = [
        "# Lesion segmentation accuracy (FLARE24 Task 1 conventions)",
        "",
        f"- Predictions: `{pred_dir}`",
        f"- Ground truth: `{gt_dir}` ({len(results)} cases)",
        f"- NSD tolerance: {tolerance_mm:g} mm; spacing from the ground-truth files",
        "- Lesion = any voxel > 0. Both empty: DSC = NSD = 1; exactly one empty: 0; "
        "NSD = 0 when DSC < 0.2.",
        "- std is the population standard deviation (ddof = 0).",
        "",
        "## Summary",
        "",
        *summary_table(summary),
        "",
        *(f"- {line}" for line in count_lines(summary)),
        "",
        "## Cases",
        "",
        "| Case | DSC | NSD | GT (ml) | Pred (ml) | GT voxels | Pred voxels | Note |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        note = [
            "false positive" if r.false_positive else "",
            "missed" if r.missed else "",
            *r.notes,
        ]
        lines.append(
            f"| {r.case} | {r.dsc:.4f} | {r.nsd:.4f} | {r.gt_volume_ml:.2f} | "
            f"{r.pred_volume_ml:.2f} | {r.gt_voxels} | {r.pred_voxels} | "
            f"{'; '.join(n for n in note if n)} |"
        )
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path


def _names(cases: Sequence[str], limit: int = 10) -> str:
    if not cases:
        return ""
    shown = ", ".join(cases[:limit])
    return f" ({shown}{', …' if len(cases) > limit else ''})"
