"""Reports: results.csv (a row per case), results.json (all, raw samples) and summary.md.

Each is written atomically (:mod:`inference.atomic`): the report is rewritten after every
case, and a crash in the middle of a write leaves the previous complete file.

summary.md holds a table shaped like the method paper's Table 4.

Without a GPU every GPU figure is the string ``n/a``, never 0: a zero would read as "used no
GPU memory" and make a CPU-only run look perfect.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from inference.atomic import atomic_path, write_json_atomically, write_text_atomically
from profiling.metrics import GPU_LIMIT_MB, TIME_LIMIT_S, mean_and_median
from profiling.runner import CaseResult

#: Column names of results.csv; other tools join on them, so they are fixed.
CSV_COLUMNS = (
    "case",
    "image_size",
    "time_s",
    "max_gpu_mb",
    "total_gpu_mb_s",
    "max_rss_mb",
    "exit_code",
    "output_ok",
    "over_time",
    "over_memory",
    "error",
    # Appended later; the columns above keep their places.
    "max_container_mb",
    "total_container_mb_s",
    "overhead_s",
)
NA = "n/a"
FLAG = "⚠"
FAILED = "✗"


def image_size(size_xyz: Sequence[int] | None, sep: str = "x") -> str:
    """``512x512x55`` (x, y, z from the header), or ``""`` when unknown."""
    return sep.join(str(s) for s in size_xyz) if size_xyz else ""


def _num(value: float | None, digits: int, missing: str = NA) -> str:
    return missing if value is None else f"{value:.{digits}f}"


def _flag(value: bool | None) -> str:
    return NA if value is None else str(value).lower()


def csv_row(result: CaseResult) -> dict[str, str]:
    """One results.csv row. A case whose command never ran has empty time and RSS fields."""
    m = result.metrics
    return {
        "case": result.case,
        "image_size": image_size(result.image_size_xyz),
        "time_s": _num(m.time_s, 3) if m else "",
        "max_gpu_mb": _num(m.max_gpu_mb if m else None, 1),
        "total_gpu_mb_s": _num(m.total_gpu_mb_s if m else None, 1),
        "max_rss_mb": _num(m.max_rss_mb, 1) if m else "",
        "exit_code": "" if result.exit_code is None else str(result.exit_code),
        "output_ok": _flag(result.output_ok),
        "over_time": _flag(m.over_time) if m else "",
        "over_memory": _flag(m.over_memory if m else None),
        "error": result.error or "",
        "max_container_mb": _num(m.max_container_mb if m else None, 1),
        "total_container_mb_s": _num(m.total_container_mb_s if m else None, 1),
        "overhead_s": _num(m.overhead_s if m else None, 3),
    }


def write_csv(results: Sequence[CaseResult], path: Path) -> Path:
    """Write ``results.csv``."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for result in results:
            writer.writerow(csv_row(result))
    return path


def _rounded(values: list, digits: int) -> list:
    return [None if v is None else round(v, digits) for v in values]


def case_record(result: CaseResult, report_dir: Path) -> dict[str, object]:
    """Everything about one case as JSON-ready data (paths relative to the report)."""

    def rel(path: Path | None) -> str | None:
        return os.path.relpath(path, report_dir) if path is not None else None

    record: dict[str, object] = {
        "case": result.case,
        "image_size_xyz": list(result.image_size_xyz) if result.image_size_xyz else None,
        "argv": result.argv,
        "exit_code": result.exit_code,
        "output_ok": result.output_ok,
        "error": result.error,
        "staging": result.staging,
        "log": rel(result.log_path),
        "prediction": rel(result.prediction_path),
        "extra_outputs": result.extra_outputs,
        "metrics": asdict(result.metrics) if result.metrics else None,
    }
    s = result.samples
    if s is not None:
        record["samples"] = {
            "interval_s": s.interval_s,
            "t_s": _rounded(s.t_s, 4),
            "gpu_used_mb": _rounded(s.gpu_used_mb, 1),
            "gpu_process_mb": _rounded(s.gpu_process_mb, 1),
            "gpu_util_percent": _rounded(s.gpu_util_percent, 1),
            "rss_mb": _rounded(s.rss_mb, 1),
            "cpu_percent": _rounded(s.cpu_percent, 1),
            "container_mb": _rounded(s.container_mb, 1),
            "container_peak_mb": s.container_peak_mb,
            "errors": s.errors,
        }
    return record


def write_json(results: Sequence[CaseResult], path: Path, context: dict[str, object]) -> Path:
    """Write ``results.json``: ``context`` (machine, GPU, settings) plus every case."""
    data = dict(context)
    data["limits"] = {"time_s": TIME_LIMIT_S, "gpu_mb": GPU_LIMIT_MB}
    data["cases"] = [case_record(r, path.parent) for r in results]
    return write_json_atomically(path, data, indent=1, allow_nan=False)


def _cell(value: float | None, digits: int, over: bool | None) -> str:
    text = _num(value, digits)
    return f"**{text}** {FLAG}" if over else text


def _summary_rows(results: Sequence[CaseResult]) -> list[str]:
    rows = []
    for r in results:
        m = r.metrics
        name = f"{r.case} {FAILED}" if r.failed else r.case
        if m is None:
            rows.append(f"| {name} | {image_size(r.image_size_xyz, '×')} | – | – | – |")
            continue
        rows.append(
            f"| {name} | {image_size(r.image_size_xyz, '×')} "
            f"| {_cell(m.time_s, 1, m.over_time)} "
            f"| {_cell(m.max_gpu_mb, 0, m.over_memory)} "
            f"| {_num(m.total_gpu_mb_s, 0)} |"
        )
    # A crashed case's few seconds would flatter the mean: statistics cover successful cases.
    measured = [r.metrics for r in results if r.metrics is not None and not r.failed]
    columns = [
        [m.time_s for m in measured],
        [m.max_gpu_mb for m in measured],
        [m.total_gpu_mb_s for m in measured],
    ]
    stats = [mean_and_median(c) for c in columns]
    for label, i in (("Mean", 0), ("Median", 1)):
        cells = [_num(stats[0][i], 1), _num(stats[1][i], 0), _num(stats[2][i], 0)]
        rows.append(f"| **{label}** | {len(measured)} ok case(s) | {' | '.join(cells)} |")
    return rows


def _host_rows(results: Sequence[CaseResult]) -> list[str]:
    rows = []
    for r in results:
        m = r.metrics
        if m is None:
            continue
        rows.append(
            f"| {r.case} | {_num(m.max_rss_mb, 0)} | {_num(m.total_rss_mb_s, 0)} "
            f"| {_num(m.max_cpu_percent, 0)} | {_num(m.max_gpu_process_mb, 0)} "
            f"| {_num(m.mean_gpu_util_percent, 0)} | {m.n_samples} "
            f"| {'' if r.exit_code is None else r.exit_code} | {'yes' if r.output_ok else 'no'} |"
        )
    return rows


def _container_section(results: Sequence[CaseResult], docker: bool) -> list[str]:
    """Docker mode: the container's memory and overhead per case (empty otherwise)."""
    if not docker:
        return []
    lines = [
        "## Container",
        "",
        "| Case | Running Time (s) | Predictor's own time (s) | Overhead (s) "
        "| Max container memory (MB) | Container memory area (MB·s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        m = r.metrics
        if m is None:
            continue
        lines.append(
            f"| {r.case} | {_num(m.time_s, 1)} | {_num(m.predictor_s, 1)} "
            f"| {_num(m.overhead_s, 1)} | {_num(m.max_container_mb, 0)} "
            f"| {_num(m.total_container_mb_s, 0)} |"
        )
    return [*lines, ""]


def write_summary(
    results: Sequence[CaseResult],
    path: Path,
    context: dict[str, object],
    plots: Sequence[Path] = (),
) -> Path:
    """Write ``summary.md``.

    Args:
        results: the cases, in run order.
        path: where to write.
        context: the same context as results.json (machine, gpu, settings).
        plots: PNG files to link, relative to the report folder or absolute.
    """
    gpu = context.get("gpu", {})
    settings = context.get("settings", {})
    machine = context.get("machine", {})
    measured = [r.metrics for r in results if r.metrics is not None]
    n_over_time = sum(m.over_time for m in measured)
    n_over_mem = sum(bool(m.over_memory) for m in measured)
    failed = [r for r in results if r.failed]
    interval = settings.get("interval_s")

    lines = [f"# Per-case profile: {len(results)} case(s)", ""]
    lines.append(f"- Command: `{settings.get('command_line', '')}`")
    if settings.get("docker_image"):
        lines.append(
            "- Docker mode: the organizers' `docker container run` line (`--gpus` only where "
            "there is a GPU). Container memory is read from the container's cgroup (what the "
            "`-m 28G` limit counts: its processes' memory plus the page cache of the files it "
            "read and wrote); RSS and CPU below are those of the docker client, and "
            "per-process GPU memory is not attributed. Overhead = running time − the time the "
            "predictor reports for itself (container start and stop, shell, interpreter start)."
        )
    lines.append(
        f"- Machine: {machine.get('cpu', '?')} ({machine.get('cpu_cores_logical', '?')} "
        f"logical cores, {machine.get('ram_mb', '?')} MB RAM)"
    )
    if gpu.get("available"):
        total = gpu.get("total_mb")
        lines.append(
            f"- GPU {gpu.get('index')}: {gpu.get('name')}, driver {gpu.get('driver')}, "
            f"{_num(total, 0, '?')} MB"
        )
        lines.append(
            f"- GPU memory as the organizers measure it: device-level used memory "
            f"(total − free, CUDA context and anything else resident included), sampled every "
            f"{interval} s; Total GPU = trapezoid area `numpy.trapezoid(samples, dx={interval})` "
            f"(the organizers' `numpy.trapz`) in MB·s. 1 MB = 2^20 bytes."
        )
        if settings.get("subtract_idle"):
            lines.append(
                "- Idle device memory measured before each case was **subtracted** "
                "(`--subtract-idle`); the organizers do not subtract."
            )
    else:
        lines.append(
            f"- **No GPU figures**: {gpu.get('reason', 'no GPU')}. GPU columns are n/a; "
            "running time and host memory (RSS) are still measured."
        )
    lines += [
        "",
        "| Case | Image Size | Running Time (s) | Max GPU (MB) | Total GPU (MB·s) |",
        "|---|---|---|---|---|",
        *_summary_rows(results),
        "",
        f"{FLAG} over a tolerance ({TIME_LIMIT_S:g} s running time, {GPU_LIMIT_MB:g} MB GPU "
        f"memory); {FAILED} failed (see below). Image size is x×y×z from the header.",
        "",
        f"Over {TIME_LIMIT_S:g} s: {n_over_time} of {len(measured)} case(s). "
        + (
            f"Over {GPU_LIMIT_MB:g} MB: {n_over_mem} of {len(measured)} case(s)."
            if gpu.get("available")
            else f"Over {GPU_LIMIT_MB:g} MB: n/a (no GPU)."
        ),
        "",
        *_container_section(results, bool(settings.get("docker_image"))),
        "## Host side and process",
        "",
        "| Case | Max RSS (MB) | RSS area (MB·s) | Max CPU (%) | Max GPU of process tree (MB) "
        "| Mean GPU util (%) | Samples | Exit code | Output ok |",
        "|---|---|---|---|---|---|---|---|---|",
        *_host_rows(results),
        "",
    ]
    if failed:
        lines += ["## Failures", ""]
        for r in failed:
            log = f" (log: `{os.path.relpath(r.log_path, path.parent)}`)" if r.log_path else ""
            lines.append(f"- {r.case}: {r.error}{log}")
        lines.append("")
    if plots:
        lines += ["## Plots", ""]
        for plot in plots:
            rel = os.path.relpath(plot, path.parent)
            lines.append(f"![{Path(rel).stem}]({rel})")
        lines.append("")
    return write_text_atomically(path, "\n".join(lines))
