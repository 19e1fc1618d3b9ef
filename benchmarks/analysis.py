"""From the runs to the figures: medians, ratios nnU-Net / ours, agreement, target checks.

Ratios are nnU-Net / ours, so above 1 means ours is faster or leaner. Times and memory of
a (model, case, peer) are medians over the repeats that succeeded.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.cases import WIDE
from benchmarks.peers import LABELS, NNUNET_NOTTA, NNUNET_PEERS, NNUNET_TTA, OURS, OURS_NOSKIP
from benchmarks.stages import Breakdown, StageTimes, breakdown, nnunet_loop_s, read_log
from benchmarks.suite import Run, SuiteResult
from profiling.compare import geometric_mean, ratio
from profiling.metrics import GPU_LIMIT_MB, TIME_LIMIT_S

#: Share of wall time outside the networks' forward passes we aim to stay under.
OUTSIDE_FORWARD_TARGET = 0.30
GPU_STRETCH_MB = 3000.0


@dataclass(frozen=True)
class Cell:
    """One peer on one (model, case): medians over its successful repeats.

    Attributes:
        time_s: wall time of the whole process.
        max_rss_mb: peak RSS of the process tree.
        total_rss_mb_s: RSS area under the curve.
        max_gpu_mb: device-level GPU peak (None: no GPU read).
        total_gpu_mb_s: GPU area under the curve.
        n_ok: successful repeats.
        n_runs: repeats run.
        errors: one line per failed repeat.
    """

    time_s: float | None
    max_rss_mb: float | None
    total_rss_mb_s: float | None
    max_gpu_mb: float | None
    total_gpu_mb_s: float | None
    n_ok: int
    n_runs: int
    errors: tuple[str, ...] = ()


def _median(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def aggregate(runs: Sequence[Run]) -> dict[tuple[str, str, str], Cell]:
    """Cells keyed by ``(model, case, peer)``."""
    groups: dict[tuple[str, str, str], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.model, run.case, run.peer), []).append(run)
    cells = {}
    for key, group in groups.items():
        ok = [r.result.metrics for r in group if r.ok]
        cells[key] = Cell(
            time_s=_median([m.time_s for m in ok]),
            max_rss_mb=_median([m.max_rss_mb for m in ok]),
            total_rss_mb_s=_median([m.total_rss_mb_s for m in ok]),
            max_gpu_mb=_median([m.max_gpu_mb for m in ok]),
            total_gpu_mb_s=_median([m.total_gpu_mb_s for m in ok]),
            n_ok=len(ok),
            n_runs=len(group),
            errors=tuple(f"run {r.repeat}: {r.result.error}" for r in group if not r.ok),
        )
    return cells


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two masks; 1.0 when both are empty (FLARE's convention)."""
    a, b = a.astype(bool), b.astype(bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def agreement(
    runs: Sequence[Run], model: str, case: str, other: str = NNUNET_NOTTA
) -> float | None:
    """Dice of our prediction and ``other``'s on the first repeat both finished (same work?)."""
    from inference.nifti import NiftiError, read_image

    by_repeat: dict[int, dict[str, Path]] = {}
    for r in runs:
        if r.model == model and r.case == case and r.ok and r.result.prediction_path:
            by_repeat.setdefault(r.repeat, {})[r.peer] = r.result.prediction_path
    for k in sorted(by_repeat):
        paths = by_repeat[k]
        if OURS in paths and other in paths:
            try:
                return dice(read_image(paths[OURS])[0], read_image(paths[other])[0])
            except (NiftiError, OSError, ValueError):
                return None
    return None


@dataclass(frozen=True)
class Check:
    """One target for one model.

    Attributes:
        target: what is aimed for.
        model: the model (``all`` for a run-wide line).
        measured: the figure, in words.
        met: True / False; None when not measured.
    """

    target: str
    model: str
    measured: str
    met: bool | None


def _ratio_check(
    target: str,
    model: str,
    ratios: dict[str, float | None],
    threshold: float,
) -> Check:
    known = {c: r for c, r in ratios.items() if r is not None}
    if not known:
        return Check(target, model, "not measured (peer or ours missing or failed)", None)
    ok = sum(r >= threshold for r in known.values())
    values = list(known.values())
    measured = (
        f"geo. mean {geometric_mean(values):.2f}× (min {min(values):.2f}×, "
        f"max {max(values):.2f}×); {ok} of {len(values)} case(s) ≥ {threshold:g}×"
    )
    return Check(target, model, measured, ok == len(values))


@dataclass(frozen=True)
class AirSkip:
    """What skipping air tiles did on one (model, case).

    Attributes:
        n_tiles: tiles of nnU-Net's grid (from our log).
        n_skipped: tiles skipped as air (from our log).
        logged_saved_s: forward time the predictor estimates the skipped tiles would cost.
        ours_s: wall time of ``ours`` (median), if measured.
        noskip_s: wall time of ``ours --no-skip-air`` (median), if measured.
        dice_vs_noskip: Dice of the two masks (first repeat both finished), if both ran.
    """

    n_tiles: int
    n_skipped: int
    logged_saved_s: float
    ours_s: float | None
    noskip_s: float | None
    dice_vs_noskip: float | None

    @property
    def measured_saved_s(self) -> float | None:
        """Wall time saved: no-skip minus ours (None unless both ran)."""
        if self.ours_s is None or self.noskip_s is None:
            return None
        return self.noskip_s - self.ours_s


@dataclass
class Analysis:
    """Everything RESULTS.md shows, computed once.

    Attributes:
        cells: per ``(model, case, peer)``.
        memory: ``gpu`` when GPU figures exist for every cell, else ``rss``.
        agreements: Dice(ours, nnU-Net --disable_tta) per ``(model, case)``.
        breakdowns: our predictor's stage breakdown on the model's largest case, per model.
        largest_case: that case, per model.
        checks: the targets.
        nnunet_loops: (wall s, tile-loop s) of each nnU-Net peer on that case, per
            ``(model, peer)``, the loop read from nnU-Net's progress bars.
        air: air tiles skipped and time saved per ``(model, case)`` (from our log, and
            against ``ours_noskip`` where it ran).
    """

    cells: dict[tuple[str, str, str], Cell]
    memory: str
    agreements: dict[tuple[str, str], float | None]
    breakdowns: dict[str, Breakdown | None]
    largest_case: dict[str, str]
    checks: list[Check]
    nnunet_loops: dict[tuple[str, str], tuple[float, float]] = field(default_factory=dict)
    air: dict[tuple[str, str], AirSkip] = field(default_factory=dict)


def time_ratios(
    cells: dict[tuple[str, str, str], Cell], model: str, cases: Sequence[str], peer: str
) -> dict[str, float | None]:
    """nnU-Net / ours wall time per case."""
    return {c: cell_ratio(cells, model, c, peer, lambda x: x.time_s) for c in cases}


def memory_ratios(
    cells: dict[tuple[str, str, str], Cell],
    model: str,
    cases: Sequence[str],
    peer: str,
    memory: str,
) -> dict[str, float | None]:
    """nnU-Net / ours peak memory per case (GPU peak or RSS peak)."""
    get = (lambda x: x.max_gpu_mb) if memory == "gpu" else (lambda x: x.max_rss_mb)
    return {c: cell_ratio(cells, model, c, peer, get) for c in cases}


def cell_ratio(
    cells: dict[tuple[str, str, str], Cell],
    model: str,
    case: str,
    peer: str,
    get: Callable[[Cell], float | None],
) -> float | None:
    """``get(peer's cell) / get(our cell)`` on one (model, case); None when either is missing."""
    ours, other = cells.get((model, case, OURS)), cells.get((model, case, peer))
    if ours is None or other is None:
        return None
    return ratio(get(ours), get(other))


def _our_log(suite: SuiteResult, model: str, case: str) -> StageTimes | None:
    """Our first successful run's parsed log line on (model, case)."""
    for run in suite.runs:
        if (run.model, run.case, run.peer) == (model, case, OURS) and run.ok and run.log_path:
            times = read_log(run.log_path, case)
            if times is not None:
                return times
    return None


def air_skips(
    suite: SuiteResult, cells: dict[tuple[str, str, str], Cell]
) -> dict[tuple[str, str], AirSkip]:
    """Tiles skipped and time saved for every (model, case) our predictor finished."""
    found = {}
    for model in (m.name for m in suite.models):
        for case in suite.cases_of(model):
            times = _our_log(suite, model, case.name)
            if times is None:
                continue
            ours = cells.get((model, case.name, OURS))
            noskip = cells.get((model, case.name, OURS_NOSKIP))
            found[(model, case.name)] = AirSkip(
                times.n_tiles,
                times.n_skipped,
                times.air_saved_s,
                ours.time_s if ours else None,
                noskip.time_s if noskip else None,
                agreement(suite.runs, model, case.name, OURS_NOSKIP),
            )
    return found


def _largest_breakdown(suite: SuiteResult, model: str, case: str) -> Breakdown | None:
    """The stage breakdown of our first successful run of ``model`` on ``case``."""
    for run in suite.runs:
        if (run.model, run.case, run.peer) == (model, case, OURS) and run.ok and run.log_path:
            times = read_log(run.log_path, case)
            if times is not None:
                return breakdown(times, run.result.metrics.time_s)
    return None


def _nnunet_loop(
    suite: SuiteResult, model: str, case: str, peer: str
) -> tuple[float, float] | None:
    """(wall s, tile-loop s) of the first successful run of an nnU-Net peer on ``case``."""
    for run in suite.runs:
        if (run.model, run.case, run.peer) == (model, case, peer) and run.ok and run.log_path:
            try:
                text = run.log_path.read_text(encoding="utf-8", errors="replace")
            except OSError:
                return None
            loop_s = nnunet_loop_s(text)
            return None if loop_s is None else (run.result.metrics.time_s, loop_s)
    return None


def analyse(suite: SuiteResult, gpu_note: str | None = None) -> Analysis:
    """Aggregate the runs, compute ratios, agreements, the breakdown and the target checks."""
    cells = aggregate(suite.runs)
    measured = [c for c in cells.values() if c.n_ok]
    memory = "gpu" if measured and all(c.max_gpu_mb is not None for c in measured) else "rss"
    models = [m.name for m in suite.models]
    peers = [p.name for p in suite.peers]
    agreements = {
        (m, c.name): agreement(suite.runs, m, c.name)
        for m in models
        for c in suite.cases_of(m)
        if OURS in peers and NNUNET_NOTTA in peers
    }
    largest = {
        m: max(suite.cases_of(m), key=lambda c: c.n_voxels).name
        for m in models
        if suite.cases_of(m)
    }
    breakdowns = {m: _largest_breakdown(suite, m, c) for m, c in largest.items()}
    air = air_skips(suite, cells)
    checks = _checks(suite, cells, breakdowns, largest, gpu_note)
    checks += _air_checks(suite, air)
    loops = {
        (m, p): found
        for m, c in largest.items()
        for p in NNUNET_PEERS
        if p in peers and (found := _nnunet_loop(suite, m, c, p)) is not None
    }
    return Analysis(cells, memory, agreements, breakdowns, largest, checks, loops, air)


def _air_checks(suite: SuiteResult, air: dict[tuple[str, str], AirSkip]) -> list[Check]:
    """Skipping air saves time on the wide field of view, with the no-skip mask kept."""
    checks = []
    device = "GPU" if suite.settings.device == "cuda" else "CPU"
    target = f"{device}: time saved by skipping air tiles on a wide field of view"
    for (model, case), a in air.items():
        if not case.endswith(f"_{WIDE}") or a.measured_saved_s is None:
            continue
        dice_text = "n/a" if a.dice_vs_noskip is None else f"{a.dice_vs_noskip:.4f}"
        measured = (
            f"{case}: {a.n_skipped} of {a.n_tiles} tiles skipped; wall {a.noskip_s:.1f} s "
            f"→ {a.ours_s:.1f} s ({a.measured_saved_s:.1f} s saved, "
            f"{a.noskip_s / a.ours_s:.2f}×); Dice vs no-skip {dice_text}"
        )
        checks.append(Check(target, model, measured, a.measured_saved_s > 0))
    return checks


def _checks(
    suite: SuiteResult,
    cells: dict[tuple[str, str, str], Cell],
    breakdowns: dict[str, Breakdown | None],
    largest: dict[str, str],
    gpu_note: str | None,
) -> list[Check]:
    peers = {p.name for p in suite.peers}
    gpu_run = suite.settings.device == "cuda"
    checks: list[Check] = []
    for model in (m.name for m in suite.models):
        cases = [c.name for c in suite.cases_of(model)]
        if gpu_run:
            checks += _gpu_checks(model, cells, cases, peers, gpu_note)
        else:
            checks += _cpu_checks(model, cells, cases, peers)
        b = breakdowns.get(model)
        target = f"share of wall time outside forward passes < {OUTSIDE_FORWARD_TARGET:.0%}"
        if b is None:
            checks.append(Check(target, model, "not measured (no successful run of ours)", None))
        else:
            share = b.outside_forward_share
            checks.append(
                Check(
                    target,
                    model,
                    f"{share:.0%} on {largest[model]} ({b.wall_s:.1f} s wall, "
                    f"{b.times.forward_s:.1f} s forward)",
                    share < OUTSIDE_FORWARD_TARGET,
                )
            )
    if not gpu_run:
        for target in _GPU_TARGETS:
            checks.append(Check(f"GPU: {target}", "all", "not measured: CPU run", None))
    return checks


_GPU_TARGETS = (
    f"device-level peak ≤ {GPU_LIMIT_MB:g} MB incl. CUDA context (stretch ≤ {GPU_STRETCH_MB:g})",
    f"≤ {TIME_LIMIT_S:g} s per case incl. process start (single model and ensemble)",
    "≥ 5× faster than nnUNetv2_predict default",
)


def _cpu_checks(
    model: str, cells: dict[tuple[str, str, str], Cell], cases: Sequence[str], peers: set[str]
) -> list[Check]:
    checks = []
    for peer, factor, what in (
        (NNUNET_TTA, 10.0, "nnUNetv2_predict default (TTA)"),
        (NNUNET_NOTTA, 2.0, "nnUNetv2_predict --disable_tta"),
    ):
        target = f"CPU: ≥ {factor:g}× faster than {what}, whole process"
        if OURS not in peers or peer not in peers:
            checks.append(Check(target, model, "not measured (peer not in this run)", None))
        else:
            checks.append(
                _ratio_check(target, model, time_ratios(cells, model, cases, peer), factor)
            )
    for peer in NNUNET_PEERS:
        target = f"CPU: peak RSS ≤ ½ of {LABELS[peer]} (process tree)"
        if OURS not in peers or peer not in peers:
            checks.append(Check(target, model, "not measured (peer not in this run)", None))
        else:
            ratios = memory_ratios(cells, model, cases, peer, "rss")
            checks.append(_ratio_check(target, model, ratios, 2.0))
    return checks


def _gpu_checks(
    model: str,
    cells: dict[tuple[str, str, str], Cell],
    cases: Sequence[str],
    peers: set[str],
    gpu_note: str | None,
) -> list[Check]:
    checks = []
    ours = [cells.get((model, c, OURS)) for c in cases]
    ours = [c for c in ours if c is not None and c.n_ok]
    peaks = [c.max_gpu_mb for c in ours if c.max_gpu_mb is not None]
    for limit, label in ((GPU_LIMIT_MB, ""), (GPU_STRETCH_MB, " (stretch)")):
        target = f"GPU: device-level peak ≤ {limit:g} MB incl. CUDA context{label}"
        if not peaks:
            why = gpu_note or "NVML could not read the GPU"
            checks.append(Check(target, model, f"not measured: {why}", None))
        else:
            n = sum(p <= limit for p in peaks)
            measured = f"max {max(peaks):.0f} MB; {n} of {len(peaks)} case(s) within"
            checks.append(Check(target, model, measured, n == len(peaks)))
    times = [c.time_s for c in ours if c.time_s is not None]
    target = f"GPU: ≤ {TIME_LIMIT_S:g} s per case incl. process start"
    if not times:
        checks.append(Check(target, model, "not measured (no successful run of ours)", None))
    else:
        n = sum(t <= TIME_LIMIT_S for t in times)
        measured = f"max {max(times):.1f} s; {n} of {len(times)} case(s) within"
        checks.append(Check(target, model, measured, n == len(times)))
    target = "GPU: ≥ 5× faster than nnUNetv2_predict default (TTA)"
    if OURS not in peers or NNUNET_TTA not in peers:
        checks.append(Check(target, model, "not measured (peer not in this run)", None))
    else:
        checks.append(
            _ratio_check(target, model, time_ratios(cells, model, cases, NNUNET_TTA), 5.0)
        )
    return checks
