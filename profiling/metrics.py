"""From samples to the challenge's per-case figures: peak, area under the curve, flags.

The organizers' figures for one case (see /work/shared/FLARE24.md):
- Running time: wall time of the whole command.
- Max GPU (MB): the largest device-level sample.
- Total GPU (MB·s): ``numpy.trapz(samples, dx=0.1)``.
- Tolerances: 45 s and 4 GB (4096 MB) per case.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from profiling.sampler import Samples

#: Running-time tolerance per case (s); a case strictly above it is flagged.
TIME_LIMIT_S = 45.0
#: GPU memory tolerance per case (MB = MiB); a peak strictly above it is flagged.
GPU_LIMIT_MB = 4096.0


def area_mb_s(values: Sequence[float], interval_s: float) -> float:
    """Area under a memory-time curve sampled every ``interval_s``, in MB·s.

    The organizers call ``numpy.trapz(samples, dx=interval)``. ``np.trapz`` was deprecated in
    numpy 2.0 and is gone in the numpy 2.4 used here; ``np.trapezoid`` is the same function
    under its new name (same trapezoid formula: ``dx * (sum(y) - (y[0] + y[-1]) / 2)``).

    Returns:
        The area; 0.0 for fewer than two samples, as numpy gives.
    """
    if len(values) == 0:
        return 0.0
    return float(np.trapezoid(np.asarray(values, dtype=np.float64), dx=interval_s))


def subtract_baseline(values: Sequence[float], baseline_mb: float) -> list[float]:
    """``values - baseline_mb``, clipped at 0 (memory freed by others is not ours to credit)."""
    return [max(0.0, v - baseline_mb) for v in values]


@dataclass(frozen=True)
class CaseMetrics:
    """The figures of one case.

    GPU fields are None when no GPU was read (reported as "n/a", never 0).

    Attributes:
        time_s: wall time of the whole command.
        max_gpu_mb: peak device-level used memory (after idle subtraction if asked for).
        total_gpu_mb_s: trapezoid area of the device memory curve.
        max_gpu_process_mb: peak memory NVML attributes to the command's process tree.
        mean_gpu_util_percent: mean GPU utilisation over the samples.
        idle_gpu_mb: the idle baseline that was subtracted, None when not subtracted.
        max_rss_mb: peak resident memory of the process tree.
        total_rss_mb_s: trapezoid area of the RSS curve.
        max_cpu_percent: peak CPU use of the process tree (100 = one core).
        mean_cpu_percent: mean CPU use of the process tree.
        n_samples: number of samples taken.
        over_time: ``time_s`` above the time limit.
        over_memory: ``max_gpu_mb`` above the memory limit; None without a GPU.
        max_container_mb: peak memory charged to the container's cgroup (Docker mode: the
            kernel's high-water mark, or the largest sample if that is higher); None
            outside Docker mode.
        total_container_mb_s: trapezoid area of the container's memory curve (0 before the
            container exists and after it is removed).
        predictor_s: the time the predictor reports for itself (its ``done: ... in X s``
            line); None if the log has no such line.
        overhead_s: ``time_s - predictor_s``: container start and stop, shell, interpreter
            start and imports (in Docker mode, the container's overhead).
    """

    time_s: float
    max_gpu_mb: float | None
    total_gpu_mb_s: float | None
    max_gpu_process_mb: float | None
    mean_gpu_util_percent: float | None
    idle_gpu_mb: float | None
    max_rss_mb: float
    total_rss_mb_s: float
    max_cpu_percent: float
    mean_cpu_percent: float
    n_samples: int
    over_time: bool
    over_memory: bool | None
    max_container_mb: float | None = None
    total_container_mb_s: float | None = None
    predictor_s: float | None = None
    overhead_s: float | None = None


def gpu_curve_mb(samples: Samples, idle_gpu_mb: float | None = None) -> list[float] | None:
    """The device memory curve the figures are computed from, or None without a GPU.

    Args:
        samples: the case's samples.
        idle_gpu_mb: subtract this baseline (``--subtract-idle``); None keeps the raw
            device figures, as the organizers do.
    """
    if not samples.has_gpu:
        return None
    # A failed read leaves a gap; the area assumes one value per tick, so dropping it would
    # shift the curve. Hold the last known value instead (the first known one at the start).
    known = [v for v in samples.gpu_used_mb if v is not None]
    values, last = [], float(known[0])
    for v in samples.gpu_used_mb:
        last = float(v) if v is not None else last
        values.append(last)
    return subtract_baseline(values, idle_gpu_mb) if idle_gpu_mb is not None else values


def container_curve_mb(samples: Samples) -> list[float] | None:
    """The container's memory curve, or None if the container was never read.

    Before the container exists and after ``--rm`` removed it, it holds nothing: 0. A failed
    read between two good ones holds the last value (as for the GPU curve).
    """
    values = samples.container_mb
    known = [i for i, v in enumerate(values) if v is not None]
    if not known:
        return None
    curve, last = [], 0.0
    for i, v in enumerate(values):
        if known[0] <= i <= known[-1]:
            last = float(v) if v is not None else last
            curve.append(last)
        else:
            curve.append(0.0)
    return curve


def with_predictor_time(metrics: CaseMetrics, predictor_s: float | None) -> CaseMetrics:
    """``metrics`` with the predictor's own time and the overhead around it filled in."""
    if predictor_s is None:
        return metrics
    return dataclasses.replace(
        metrics, predictor_s=predictor_s, overhead_s=metrics.time_s - predictor_s
    )


def case_metrics(
    time_s: float,
    samples: Samples,
    idle_gpu_mb: float | None = None,
    time_limit_s: float = TIME_LIMIT_S,
    gpu_limit_mb: float = GPU_LIMIT_MB,
) -> CaseMetrics:
    """Compute a case's figures from its wall time and samples.

    Args:
        time_s: wall time of the command.
        samples: what the sampler collected.
        idle_gpu_mb: idle baseline to subtract from the device curve, or None.
        time_limit_s: running-time tolerance for the ``over_time`` flag.
        gpu_limit_mb: GPU memory tolerance for the ``over_memory`` flag.
    """
    dx = samples.interval_s
    gpu = gpu_curve_mb(samples, idle_gpu_mb)
    process = [v for v in samples.gpu_process_mb if v is not None]
    util = [v for v in samples.gpu_util_percent if v is not None]
    max_gpu = max(gpu) if gpu else None
    box = container_curve_mb(samples)
    box_peak = [v for v in (samples.container_peak_mb, max(box) if box else None) if v]
    return CaseMetrics(
        time_s=time_s,
        max_gpu_mb=max_gpu,
        total_gpu_mb_s=area_mb_s(gpu, dx) if gpu else None,
        max_gpu_process_mb=max(process) if process else None,
        mean_gpu_util_percent=statistics.fmean(util) if util else None,
        idle_gpu_mb=idle_gpu_mb if gpu is not None else None,
        max_rss_mb=max(samples.rss_mb, default=0.0),
        total_rss_mb_s=area_mb_s(samples.rss_mb, dx),
        max_cpu_percent=max(samples.cpu_percent, default=0.0),
        mean_cpu_percent=statistics.fmean(samples.cpu_percent) if samples.cpu_percent else 0.0,
        n_samples=len(samples),
        over_time=time_s > time_limit_s,
        over_memory=max_gpu > gpu_limit_mb if max_gpu is not None else None,
        max_container_mb=max(box_peak) if box_peak else None,
        total_container_mb_s=area_mb_s(box, dx) if box else None,
    )


def mean_and_median(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and median of the values that are not None; (None, None) if there are none."""
    known = [v for v in values if v is not None]
    if not known:
        return None, None
    return statistics.fmean(known), statistics.median(known)
