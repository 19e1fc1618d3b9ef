"""PNG plots: memory over time against the 4 GB line, running time against the 45 s line.

Matplotlib's Agg backend: no display needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after use(): the backend is fixed first

from profiling.metrics import GPU_LIMIT_MB, TIME_LIMIT_S, container_curve_mb, gpu_curve_mb
from profiling.runner import CaseResult


def memory_curve(result: CaseResult) -> tuple[list[float], list[float], str] | None:
    """The curve to plot: GPU memory, else the container's memory (Docker mode), else RSS.

    Returns:
        ``(t_s, values_mb, axis_label)``, or None if the case was not run.
    """
    s = result.samples
    if s is None or len(s) == 0:
        return None
    idle = result.metrics.idle_gpu_mb if result.metrics else None
    gpu = gpu_curve_mb(s, idle)
    if gpu is not None:
        return s.t_s, gpu, "GPU device memory (MB)"
    container = container_curve_mb(s)
    if container is not None:  # Docker mode: the client's RSS says nothing about the case
        return s.t_s, container, "container memory, cgroup (MB)"
    return s.t_s, s.rss_mb, "host RSS of the process tree (MB)"


def _limit_line(ax, gpu: bool) -> None:
    # The 4 GB tolerance is about GPU memory; drawn on an RSS plot it would mislead.
    if gpu:
        ax.axhline(GPU_LIMIT_MB, color="tab:red", linestyle="--", label=f"{GPU_LIMIT_MB:g} MB")


def plot_case_memory(result: CaseResult, path: Path) -> Path | None:
    """One case's memory over time; returns the path, or None if there is nothing to plot."""
    curve = memory_curve(result)
    if curve is None:
        return None
    t_s, values, label = curve
    gpu = label.startswith("GPU")
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(t_s, values, color="tab:blue", label=label.split(" (")[0])
    _limit_line(ax, gpu)
    ax.set_xlabel("time (s)")
    ax.set_ylabel(label)
    ax.set_ylim(bottom=0)
    ax.set_title(f"{result.case}" + ("" if gpu else " (no GPU: host memory)"))
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_all_memory(results: Sequence[CaseResult], path: Path) -> Path | None:
    """Every case's memory curve in one figure."""
    curves = [(r.case, memory_curve(r)) for r in results]
    curves = [(name, c) for name, c in curves if c is not None]
    if not curves:
        return None
    gpu = all(c[2].startswith("GPU") for _, c in curves)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, (t_s, values, _) in curves:
        ax.plot(t_s, values, label=name, linewidth=1)
    _limit_line(ax, gpu)
    ax.set_xlabel("time (s)")
    ax.set_ylabel(curves[0][1][2] if gpu else "host RSS of the process tree (MB)")
    ax.set_ylim(bottom=0)
    ax.set_title("memory over time, all cases" + ("" if gpu else " (no GPU: host memory)"))
    if len(curves) <= 20:
        ax.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_times(results: Sequence[CaseResult], path: Path) -> Path | None:
    """Running time per case as bars, over-limit bars in red, with the 45 s line."""
    measured = [r for r in results if r.metrics is not None]
    if not measured:
        return None
    names = [r.case for r in measured]
    times = [r.metrics.time_s for r in measured]
    colors = ["tab:red" if t > TIME_LIMIT_S else "tab:blue" for t in times]
    fig, ax = plt.subplots(figsize=(min(30, max(5, 0.4 * len(names) + 2)), 4))
    ax.bar(range(len(names)), times, color=colors)
    ax.axhline(TIME_LIMIT_S, color="tab:red", linestyle="--", label=f"{TIME_LIMIT_S:g} s")
    if len(names) <= 60:
        # case names are long (FLARE24_0001): slant them as soon as they would touch
        rotation = 0 if len(names) <= 2 else (45 if len(names) <= 8 else 90)
        ax.set_xticks(
            range(len(names)), names, rotation=rotation, ha="right" if rotation else "center"
        )
    else:
        ax.set_xlabel("case (in run order)")
    ax.set_ylabel("running time (s)")
    ax.set_title("running time per case")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_plots(results: Sequence[CaseResult], folder: Path) -> list[Path]:
    """Write ``memory_all.png``, ``time_per_case.png`` and ``memory_<case>.png`` per case.

    Returns:
        The overview plots that were written (the ones summary.md shows).
    """
    folder.mkdir(parents=True, exist_ok=True)
    overview = [
        plot_all_memory(results, folder / "memory_all.png"),
        plot_times(results, folder / "time_per_case.png"),
    ]
    for r in results:
        plot_case_memory(r, folder / f"memory_{r.case}.png")
    return [p for p in overview if p is not None]
