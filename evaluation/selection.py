"""Model selection: accuracy (evaluation reports) next to efficiency (profiling reports).

Each model is one evaluation report (``evaluation.csv`` from ``python -m evaluation``)
paired with one profiling report (``results.csv`` from ``python -m profiling``), joined per
case. The time and memory flags are recomputed from the measured values against the
challenge's limits, so every model is judged by the same rule whatever produced its CSV.
A GPU value the profiler could not measure (``n/a``) stays unknown: shown as ``n/a``,
never counted as 0 or as within the limit.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from evaluation.evaluate import CaseResult
from evaluation.report import CSV_COLUMNS, Stats, summarize
from inference.cases import IMAGE_SUFFIX, LABEL_SUFFIX

#: The challenge's running-time tolerance per case (s).
TIME_LIMIT_S = 45.0
#: The challenge's GPU memory tolerance per case (MB, device-level).
GPU_LIMIT_MB = 4096.0
#: Columns ``results.csv`` must have for the join.
PROFILE_REQUIRED = ("case", "time_s", "max_gpu_mb", "total_gpu_mb_s")
NA = "n/a"
EVAL_FILE, PROFILE_FILE = "evaluation.csv", "results.csv"


class SelectionError(ValueError):
    """A report cannot be read or the reports do not pair up; one line for the user."""


@dataclass(frozen=True)
class ProfileRow:
    """One case of a profiling report; None where the profiler wrote ``n/a`` or nothing.

    Attributes:
        case: case name (``<case>``, file suffixes removed).
        image_size: image size as the profiler wrote it (e.g. ``512x512x55``).
        time_s: wall time of the whole run for the case.
        max_gpu_mb: peak device-level GPU memory.
        total_gpu_mb_s: area under the GPU memory curve (MB·s).
        max_rss_mb: peak resident memory of the process tree.
        exit_code: exit status of the run.
        output_ok: whether the expected output file was written and valid.
        error: the profiler's error text, if any.
    """

    case: str
    image_size: str = ""
    time_s: float | None = None
    max_gpu_mb: float | None = None
    total_gpu_mb_s: float | None = None
    max_rss_mb: float | None = None
    exit_code: int | None = None
    output_ok: bool | None = None
    error: str = ""

    def over_time(self, limit_s: float = TIME_LIMIT_S) -> bool | None:
        """Whether the run took longer than ``limit_s`` (None if not measured)."""
        return None if self.time_s is None else self.time_s > limit_s

    def over_memory(self, limit_mb: float = GPU_LIMIT_MB) -> bool | None:
        """Whether peak GPU memory exceeded ``limit_mb`` (None if not measured)."""
        return None if self.max_gpu_mb is None else self.max_gpu_mb > limit_mb

    @property
    def failed(self) -> bool:
        """The run exited non-zero or did not produce a valid output."""
        return (self.exit_code not in (None, 0)) or self.output_ok is False


@dataclass(frozen=True)
class Model:
    """One candidate: a label, its per-case accuracy and its per-case profile."""

    label: str
    eval_path: Path
    profile_path: Path
    results: list[CaseResult]
    profile: dict[str, ProfileRow]


@dataclass(frozen=True)
class ModelSummary:
    """Accuracy and efficiency of one model over its cases.

    GPU fields are None when no case had a measured value; ``over_memory_cases`` counts
    only measured cases and ``unmeasured_gpu_cases`` says how many were not.
    """

    label: str
    evaluated_cases: int
    dsc: Stats
    nsd: Stats
    lesion_dsc: Stats
    lesion_nsd: Stats
    false_positive_cases: int
    healthy_cases: int
    profiled_cases: int
    time_s: Stats
    time_max_s: float | None
    max_gpu_mb: float | None
    mean_total_gpu_mb_s: float | None
    max_rss_mb: float | None
    over_time_cases: int
    over_memory_cases: int | None
    unmeasured_gpu_cases: int
    failed_cases: int


def parse_spec(spec: str) -> tuple[Path, str | None]:
    """Split ``REPORT[:LABEL]`` into the path and the label (None when not given)."""
    head, sep, label = spec.rpartition(":")
    if sep and head and label and "/" not in label and os.sep not in label:
        return Path(head), label
    return Path(spec), None


def resolve(path: Path, file_name: str) -> Path:
    """``path`` itself if it is a file, else ``path/file_name``.

    Raises:
        SelectionError: neither exists.
    """
    candidate = path / file_name if path.is_dir() else path
    if not candidate.is_file():
        raise SelectionError(f"{candidate} does not exist (expected a folder with {file_name})")
    return candidate


def read_evaluation(path: str | os.PathLike) -> list[CaseResult]:
    """Read ``evaluation.csv`` (a folder holding it or the file) back into case results.

    Raises:
        SelectionError: the file is missing, lacks a column or holds a bad value.
    """
    csv_path = resolve(Path(path), EVAL_FILE)
    rows = _read_rows(csv_path, required=CSV_COLUMNS)
    results = []
    for line, row in rows:
        try:
            results.append(
                CaseResult(
                    case=row["case"],
                    dsc=float(row["dsc"]),
                    nsd=float(row["nsd"]),
                    gt_voxels=int(row["gt_voxels"]),
                    pred_voxels=int(row["pred_voxels"]),
                    gt_volume_ml=float(row["gt_volume_ml"]),
                    pred_volume_ml=float(row["pred_volume_ml"]),
                )
            )
        except ValueError as err:
            raise SelectionError(f"{csv_path} line {line}: {err}") from None
    return results


def read_profile(path: str | os.PathLike) -> dict[str, ProfileRow]:
    """Read a profiler's ``results.csv`` (a folder holding it or the file), keyed by case.

    ``n/a`` (or an empty cell) in a numeric column becomes None. Case names are reduced
    to ``<case>`` if the profiler wrote file names.

    Raises:
        SelectionError: the file is missing, lacks a column or holds a bad value.
    """
    csv_path = resolve(Path(path), PROFILE_FILE)
    rows = _read_rows(csv_path, required=PROFILE_REQUIRED)
    profile: dict[str, ProfileRow] = {}
    for line, row in rows:
        try:
            exit_code = _number(row.get("exit_code"))
            entry = ProfileRow(
                case=_case_name(row["case"]),
                image_size=(row.get("image_size") or "").strip(),
                time_s=_number(row["time_s"]),
                max_gpu_mb=_number(row["max_gpu_mb"]),
                total_gpu_mb_s=_number(row["total_gpu_mb_s"]),
                max_rss_mb=_number(row.get("max_rss_mb")),
                exit_code=None if exit_code is None else int(exit_code),
                output_ok=_flag(row.get("output_ok")),
                error=(row.get("error") or "").strip(),
            )
        except ValueError as err:
            raise SelectionError(f"{csv_path} line {line}: {err}") from None
        profile[entry.case] = entry
    return profile


def load_models(evals: Sequence[str], profiles: Sequence[str | os.PathLike]) -> list[Model]:
    """Pair ``REPORT[:LABEL]`` specs with profiling reports (same order) and read them.

    Raises:
        SelectionError: the counts differ, labels repeat, or a report cannot be read.
    """
    if not evals:
        raise SelectionError("give at least one --eval REPORT[:LABEL]")
    if len(evals) != len(profiles):
        raise SelectionError(
            f"{len(evals)} --eval report(s) but {len(profiles)} --profile report(s); "
            "give one profile per evaluation, in the same order"
        )
    models = []
    for spec, profile_path in zip(evals, profiles, strict=True):
        eval_path, label = parse_spec(spec)
        eval_csv = resolve(eval_path, EVAL_FILE)
        profile_csv = resolve(Path(profile_path), PROFILE_FILE)
        label = label or _default_label(eval_path)
        models.append(
            Model(
                label,
                eval_csv,
                profile_csv,
                read_evaluation(eval_csv),
                read_profile(profile_csv),
            )
        )
    labels = [m.label for m in models]
    if len(set(labels)) != len(labels):
        raise SelectionError(f"labels repeat ({', '.join(labels)}); name them REPORT:LABEL")
    return models


def summarize_model(
    model: Model, time_limit_s: float = TIME_LIMIT_S, gpu_limit_mb: float = GPU_LIMIT_MB
) -> ModelSummary:
    """Accuracy and efficiency figures of one model."""
    accuracy = summarize(model.results)
    rows = list(model.profile.values())
    times = [r.time_s for r in rows if r.time_s is not None]
    gpus = [r.max_gpu_mb for r in rows if r.max_gpu_mb is not None]
    areas = [r.total_gpu_mb_s for r in rows if r.total_gpu_mb_s is not None]
    rss = [r.max_rss_mb for r in rows if r.max_rss_mb is not None]
    return ModelSummary(
        label=model.label,
        evaluated_cases=len(model.results),
        dsc=accuracy.groups["all"].dsc,
        nsd=accuracy.groups["all"].nsd,
        lesion_dsc=accuracy.groups["lesion"].dsc,
        lesion_nsd=accuracy.groups["lesion"].nsd,
        false_positive_cases=len(accuracy.false_positive_cases),
        healthy_cases=accuracy.groups["healthy"].n,
        profiled_cases=len(rows),
        time_s=Stats.of(times),
        time_max_s=max(times) if times else None,
        max_gpu_mb=max(gpus) if gpus else None,
        mean_total_gpu_mb_s=sum(areas) / len(areas) if areas else None,
        max_rss_mb=max(rss) if rss else None,
        over_time_cases=sum(bool(r.over_time(time_limit_s)) for r in rows),
        over_memory_cases=sum(bool(r.over_memory(gpu_limit_mb)) for r in rows) if gpus else None,
        unmeasured_gpu_cases=len(rows) - len(gpus),
        failed_cases=sum(r.failed for r in rows),
    )


SUMMARY_COLUMNS = (
    "model",
    "evaluated_cases",
    "dsc_mean",
    "dsc_std",
    "nsd_mean",
    "nsd_std",
    "lesion_dsc_mean",
    "lesion_nsd_mean",
    "false_positive_cases",
    "healthy_cases",
    "profiled_cases",
    "time_mean_s",
    "time_std_s",
    "time_max_s",
    "max_gpu_mb",
    "mean_total_gpu_mb_s",
    "max_rss_mb",
    "over_time_cases",
    "over_memory_cases",
    "unmeasured_gpu_cases",
    "failed_cases",
)

CASE_COLUMNS = (
    "model",
    "case",
    "dsc",
    "nsd",
    "gt_empty",
    "pred_empty",
    "image_size",
    "time_s",
    "max_gpu_mb",
    "total_gpu_mb_s",
    "over_time",
    "over_memory",
    "failed",
)


def write_selection(
    models: Sequence[Model],
    out_dir: str | os.PathLike,
    time_limit_s: float = TIME_LIMIT_S,
    gpu_limit_mb: float = GPU_LIMIT_MB,
) -> list[Path]:
    """Write the selection report files into ``out_dir``.

    ``selection.md`` (tables), ``selection.csv`` (one row per model),
    ``selection_cases.csv`` (one row per model and case) and ``selection.png`` (plot).

    Returns:
        The written paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summaries = [summarize_model(m, time_limit_s, gpu_limit_mb) for m in models]
    paths = [
        _write_summary_csv(summaries, out / "selection.csv"),
        _write_cases_csv(models, out / "selection_cases.csv", time_limit_s, gpu_limit_mb),
        plot_selection(summaries, out / "selection.png", time_limit_s),
    ]
    md = out / "selection.md"
    md.write_text(
        "\n".join(selection_markdown(models, summaries, time_limit_s, gpu_limit_mb)) + "\n"
    )
    return [md, *paths]


def selection_markdown(
    models: Sequence[Model],
    summaries: Sequence[ModelSummary],
    time_limit_s: float = TIME_LIMIT_S,
    gpu_limit_mb: float = GPU_LIMIT_MB,
) -> list[str]:
    """The lines of ``selection.md``: sources, per-model table, per-case side-by-side table."""
    lines = [
        "# Model selection: accuracy and efficiency",
        "",
        f"Limits: {time_limit_s:g} s running time and {gpu_limit_mb:g} MB GPU memory per case "
        "(flags recomputed from the measured values). `n/a`: not measured (no GPU).",
        "",
        "| Model | Evaluation | Profile |",
        "|---|---|---|",
        *(f"| {m.label} | `{m.eval_path}` | `{m.profile_path}` |" for m in models),
        "",
        "## Per model",
        "",
        "| Model | Cases | DSC mean ± std | NSD mean ± std | DSC (lesion cases) | "
        "NSD (lesion cases) | FP cases | Time mean ± std (s) | Time max (s) | Max GPU (MB) | "
        "Mean GPU area (MB·s) | > time limit | > GPU limit | Failed runs |",
        "|---" + "|---:" * 13 + "|",
    ]
    for s in summaries:
        measured = s.profiled_cases - s.unmeasured_gpu_cases
        over_memory = NA if s.over_memory_cases is None else f"{s.over_memory_cases}/{measured}"
        if s.over_memory_cases is not None and s.unmeasured_gpu_cases:
            over_memory += f" ({s.unmeasured_gpu_cases} n/a)"
        lines.append(
            f"| {s.label} | {s.evaluated_cases} | {s.dsc.mean_std()} | {s.nsd.mean_std()} | "
            f"{s.lesion_dsc.mean_std()} | {s.lesion_nsd.mean_std()} | "
            f"{s.false_positive_cases}/{s.healthy_cases} | "
            f"{s.time_s.mean_std(1)} | {_fmt(s.time_max_s, 1)} | {_fmt(s.max_gpu_mb, 0)} | "
            f"{_fmt(s.mean_total_gpu_mb_s, 0)} | {s.over_time_cases}/{s.profiled_cases} | "
            f"{over_memory} | {s.failed_cases} |"
        )
    lines += [
        "",
        "## Per case",
        "",
        "Flags: `T` over the time limit, `M` over the GPU limit, `F` run failed "
        "(exit code or output), `FP` false positive (lesion predicted, none in GT). "
        "`-`: case absent from that model's report.",
        "",
    ]
    header = ["Case"]
    for m in models:
        header += [f"{m.label} DSC", f"{m.label} NSD", f"{m.label} time (s)"]
        header += [f"{m.label} GPU (MB)", f"{m.label} flags"]
    lines += [
        "| " + " | ".join(header) + " |",
        "|---" + "|---:|---:|---:|---:|---" * len(models) + "|",
    ]
    by_case = [({r.case: r for r in m.results}, m.profile) for m in models]
    cases = sorted({c for results, profile in by_case for c in (*results, *profile)})
    for case in cases:
        cells = [case]
        for results, profile in by_case:
            r, p = results.get(case), profile.get(case)
            cells += [
                "-" if r is None else f"{r.dsc:.4f}",
                "-" if r is None else f"{r.nsd:.4f}",
                "-" if p is None else _fmt(p.time_s, 1),
                "-" if p is None else _fmt(p.max_gpu_mb, 0),
                _flags(r, p, time_limit_s, gpu_limit_mb),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot_selection(
    summaries: Sequence[ModelSummary], path: str | os.PathLike, time_limit_s: float = TIME_LIMIT_S
) -> Path:
    """Scatter plot of mean DSC against mean running time per model, with the time limit.

    Horizontal bars span one standard deviation of the running time. Models without
    timings are left out of the plot (they are still in the tables).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 4.5), dpi=120)
    xs = []
    for s in summaries:
        if s.time_s.n == 0 or s.dsc.n == 0:
            continue
        ax.errorbar(s.time_s.mean, s.dsc.mean, xerr=s.time_s.std, fmt="o", capsize=3)
        ax.annotate(s.label, (s.time_s.mean, s.dsc.mean), textcoords="offset points", xytext=(6, 6))
        xs.append(s.time_s.mean + s.time_s.std)
    ax.axvline(time_limit_s, color="tab:red", linestyle="--", label=f"{time_limit_s:g} s limit")
    ax.set_xlim(0, max([time_limit_s, *xs]) * 1.15)
    ax.set_xlabel("mean running time per case (s); bars: ± 1 std")
    ax.set_ylabel("mean DSC")
    ax.set_title("Accuracy vs. running time")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def _write_summary_csv(summaries: Sequence[ModelSummary], path: Path) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(SUMMARY_COLUMNS)
        for s in summaries:
            writer.writerow(
                [
                    s.label,
                    s.evaluated_cases,
                    _csv(s.dsc.mean),
                    _csv(s.dsc.std),
                    _csv(s.nsd.mean),
                    _csv(s.nsd.std),
                    _csv(s.lesion_dsc.mean),
                    _csv(s.lesion_nsd.mean),
                    s.false_positive_cases,
                    s.healthy_cases,
                    s.profiled_cases,
                    _csv(s.time_s.mean),
                    _csv(s.time_s.std),
                    _csv(s.time_max_s),
                    _csv(s.max_gpu_mb),
                    _csv(s.mean_total_gpu_mb_s),
                    _csv(s.max_rss_mb),
                    s.over_time_cases,
                    _csv(s.over_memory_cases),
                    s.unmeasured_gpu_cases,
                    s.failed_cases,
                ]
            )
    return path


def _write_cases_csv(
    models: Sequence[Model], path: Path, time_limit_s: float, gpu_limit_mb: float
) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CASE_COLUMNS)
        for m in models:
            results = {r.case: r for r in m.results}
            for case in sorted({*results, *m.profile}):
                r, p = results.get(case), m.profile.get(case)
                writer.writerow(
                    [
                        m.label,
                        case,
                        "" if r is None else f"{r.dsc:.6f}",
                        "" if r is None else f"{r.nsd:.6f}",
                        "" if r is None else r.gt_empty,
                        "" if r is None else r.pred_empty,
                        "" if p is None else p.image_size,
                        "" if p is None else _csv(p.time_s),
                        "" if p is None else _csv(p.max_gpu_mb),
                        "" if p is None else _csv(p.total_gpu_mb_s),
                        "" if p is None else _csv(p.over_time(time_limit_s)),
                        "" if p is None else _csv(p.over_memory(gpu_limit_mb)),
                        "" if p is None else p.failed,
                    ]
                )
    return path


def _flags(
    r: CaseResult | None, p: ProfileRow | None, time_limit_s: float, gpu_limit_mb: float
) -> str:
    flags = []
    if p is not None:
        if p.over_time(time_limit_s):
            flags.append("T")
        if p.over_memory(gpu_limit_mb):
            flags.append("M")
        if p.failed:
            flags.append("F")
    if r is not None and r.false_positive:
        flags.append("FP")
    return " ".join(flags)


def _read_rows(path: Path, required: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        missing = [c for c in required if c not in columns]
        if missing:
            raise SelectionError(f"{path} lacks column(s) {', '.join(missing)}")
        return [(i + 2, row) for i, row in enumerate(reader)]


def _number(text: str | None) -> float | None:
    """A float, or None for ``n/a``, an empty cell or NaN."""
    if text is None:
        return None
    text = text.strip()
    if text.lower() in ("", NA, "na", "nan", "none"):
        return None
    value = float(text)
    return None if math.isnan(value) else value


def _flag(text: str | None) -> bool | None:
    if text is None or text.strip().lower() in ("", NA, "na", "none"):
        return None
    value = text.strip().lower()
    if value in ("true", "1", "yes", "y", "t", "ok"):
        return True
    if value in ("false", "0", "no", "n", "f"):
        return False
    raise ValueError(f"not a yes/no value: {text!r}")


def _case_name(text: str) -> str:
    name = Path(text.strip()).name
    for suffix in (IMAGE_SUFFIX, LABEL_SUFFIX):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _default_label(path: Path) -> str:
    folder = path if path.is_dir() else path.parent
    return folder.resolve().name or str(path)


def _fmt(value: float | int | None, digits: int = 0) -> str:
    if value is None:
        return NA
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


def _csv(value: float | int | bool | None) -> str:
    if value is None:
        return NA
    if isinstance(value, bool | int):
        return str(value)
    return "" if math.isnan(value) else f"{value:.6g}"
