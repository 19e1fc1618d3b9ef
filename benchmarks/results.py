"""From the figures to ``benchmarks/RESULTS.md``: the tables, targets and stage breakdown.

A CPU run rewrites the CPU section of RESULTS.md and a GPU run the GPU section; the rest of
the file is kept. The same section, the structured figures (``benchmark.json``) and the
profiler's raw reports stay in the output folder.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import shlex
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from benchmarks.analysis import (
    Analysis,
    Cell,
    analyse,
    cell_ratio,
    memory_ratios,
    time_ratios,
)
from benchmarks.models import BenchModel
from benchmarks.peers import LABELS, NNUNET_NOTTA, NNUNET_PEERS, OURS, RATIO_LABELS
from benchmarks.suite import SuiteResult
from inference.atomic import write_text_atomically
from profiling.compare import geometric_mean

REPO = Path(__file__).resolve().parents[1]
RESULTS_MD = REPO / "benchmarks" / "RESULTS.md"
NO_GPU_REASON = (
    "this run used the CPU (`--device cpu`); the session that produced it had no GPU. "
    "Run the GPU command in benchmarks/README.md on a CUDA machine to fill the GPU section."
)


def _fmt(value: float | None, digits: int = 1, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:.{digits}f}{unit}"


def _met(value: bool | None) -> str:
    return {True: "✓ met", False: "✗ missed", None: "– not measured"}[value]


def _cell_text(cell: Cell | None, get: Callable[[Cell], float | None], digits: int) -> str:
    if cell is None:
        return "–"
    if cell.n_ok == 0:
        return "✗ failed"
    return _fmt(get(cell), digits)


def _ratio_text(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


def _table(
    suite: SuiteResult,
    analysis: Analysis,
    model: str,
    get: Callable[[Cell], float | None],
    digits: int,
    with_agreement: bool = False,
) -> list[str]:
    """One figure (time, peak or area) of every peer per case, a ratio after each other peer."""
    peers = [p.name for p in suite.peers]
    ours_in = OURS in peers
    header = ["Case", "Size (x×y×z)", "z (mm)"]
    for p in peers:
        header.append(LABELS[p])
        if ours_in and p != OURS:
            header.append(RATIO_LABELS[p])
    if with_agreement:
        header.append("Dice ours vs −TTA")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    ratios: dict[str, list[float | None]] = {p: [] for p in peers if p != OURS}
    for case in suite.cases_of(model):
        row = [case.name, case.size_xyz.replace("x", "×"), f"{case.spacing_zyx_mm[0]:g}"]
        for p in peers:
            row.append(_cell_text(analysis.cells.get((model, case.name, p)), get, digits))
            if ours_in and p != OURS:
                r = cell_ratio(analysis.cells, model, case.name, p, get)
                ratios[p].append(r)
                row.append(_ratio_text(r))
        if with_agreement:
            a = analysis.agreements.get((model, case.name))
            row.append("–" if a is None else f"{a:.3f}")
        lines.append("| " + " | ".join(row) + " |")
    if ours_in and ratios:
        row = ["**geo. mean**", "", ""]
        for p in peers:
            row.append("")
            if p != OURS:
                row.append(f"**{_ratio_text(geometric_mean(ratios[p]))}**")
        if with_agreement:
            row.append("")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _air_lines(suite: SuiteResult, analysis: Analysis) -> list[str]:
    """Tiles skipped as air and time saved, per model and case (our log; ours_noskip)."""
    if not analysis.air:
        return []
    lines = [
        "### Air tiles skipped",
        "",
        "Tiles of nnU-Net's grid without a voxel above −500 HU (within 2 voxels) are not run "
        "(`inference/air.py`); body voxels keep exactly the no-skip result. *Logged*: the "
        "predictor's own estimate (forward time per run tile × tiles skipped); *measured*: "
        "wall time of `ours --no-skip-air` − `ours`, where both ran.",
        "",
        "| Model | Case | Tiles | Skipped | Saved, logged (s) | ours (s) | no-skip (s) | "
        "Saved, measured (s) | Dice vs no-skip |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (model, case), a in analysis.air.items():
        dice = "–" if a.dice_vs_noskip is None else f"{a.dice_vs_noskip:.4f}"
        cells = [
            model,
            case,
            str(a.n_tiles),
            f"{a.n_skipped} ({a.n_skipped / a.n_tiles:.0%})" if a.n_tiles else "0",
            f"{a.logged_saved_s:.1f}",
            _fmt(a.ours_s),
            _fmt(a.noskip_s),
            _fmt(a.measured_saved_s),
            dice,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def _breakdown_lines(analysis: Analysis) -> list[str]:
    shown = {m: b for m, b in analysis.breakdowns.items() if b is not None}
    if not shown:
        return ["No successful run of our predictor to break down.", ""]
    models = list(shown)
    parts = list(dict.fromkeys(k for b in shown.values() for k in b.parts_s))
    header = [
        "Stage",
        *(f"{m} on {analysis.largest_case[m]} (s)" for m in models),
        *(f"{m} (share)" for m in models),
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for part in parts:
        secs = [shown[m].parts_s.get(part) for m in models]
        shares = [
            None if s is None or not shown[m].wall_s else s / shown[m].wall_s
            for m, s in zip(models, secs, strict=True)
        ]
        lines.append(
            "| "
            + " | ".join(
                [
                    part,
                    *(_fmt(s, 2) for s in secs),
                    *(_fmt(None if x is None else x * 100, 1, " %") for x in shares),
                ]
            )
            + " |"
        )
    walls = [shown[m].wall_s for m in models]
    outside = [shown[m].outside_forward_share * 100 for m in models]
    lines.append(
        "| **wall (profiler)** | "
        + " | ".join([*(f"**{w:.2f}**" for w in walls), *("100 %" for _ in models)])
        + " |"
    )
    lines.append(
        "| **outside forward** | "
        + " | ".join(
            [
                *(f"{shown[m].wall_s - shown[m].times.forward_s:.2f}" for m in models),
                *(f"**{o:.0f} %**" for o in outside),
            ]
        )
        + " |"
    )
    lines.append("")
    notes = []
    for m in models:
        t = shown[m].times
        extra = (
            f"; logged start-up {t.startup_s:.2f} s (models {t.models_s:.2f} s)"
            if t.startup_s is not None
            else ""
        )
        notes.append(f"{m}: {t.n_tiles} tiles on {t.device}{extra}")
    lines += [
        "Process start = profiler wall time − the logged stages (interpreter start, imports, "
        "model loading, exit). Reading runs on a thread while torch is imported, so part of "
        "the start-up hides behind `read`. " + "; ".join(notes) + ".",
        "",
    ]
    if analysis.nnunet_loops:
        lines += [
            "nnU-Net on the same case, its tile loop read from its progress bars (1 s "
            "resolution; networks, mirroring and its per-tile work, so an upper bound on its "
            "forward passes):",
            "",
            "| Model | Peer | wall (s) | tile loop (s) | outside the loop (s) | share |",
            "|---|---|---|---|---|---|",
        ]
        for (m, p), (wall_s, loop_s) in analysis.nnunet_loops.items():
            outside = max(0.0, wall_s - loop_s)
            share = outside / wall_s * 100 if wall_s else 0.0
            cells = [m, LABELS[p], f"{wall_s:.1f}", f"{loop_s:.0f}", f"{outside:.1f}"]
            lines.append("| " + " | ".join(cells) + f" | {share:.0f} % |")
        lines.append("")
    return lines


def _machine_lines(suite: SuiteResult) -> list[str]:
    ctx = suite.context
    machine = ctx.get("machine", {})
    gpu = ctx.get("gpu", {})
    v = ctx.get("versions", {})
    gpu_text = (
        f"{gpu.get('name')}, driver {gpu.get('driver')}, {_fmt(gpu.get('total_mb'), 0)} MB"
        if gpu.get("available")
        else f"none ({gpu.get('reason', 'no GPU')})"
    )
    return [
        f"- Command: `{ctx.get('command_line', '')}`",
        f"- Date: {ctx.get('started', '?')} to {ctx.get('finished', '?')} (UTC)",
        f"- Machine: {machine.get('cpu', '?')}, {machine.get('cpu_cores_logical', '?')} logical "
        f"cores, {machine.get('ram_mb', '?')} MB RAM; {machine.get('os', '')}",
        f"- GPU: {gpu_text}",
        "- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- Device given to every peer: `{suite.settings.device}`; repeats: "
        f"{suite.settings.repeat} (figures are medians over successful repeats); runs "
        "interleaved per case, peer order rotated between repeats",
    ]


def _model_line(suite: SuiteResult, m: BenchModel) -> str:
    params = f", {m.n_parameters / 1e6:.1f} M parameters per network" if m.n_parameters else ""
    only = ""
    if m.name in suite.plan:
        only = f"; run on {', '.join(c.name for c in suite.cases_of(m.name)) or 'no case'} only"
    return f"- `{m.name}`: {m.description}; {m.n_networks} network(s){params}{only}"


def _display(path: Path) -> str:
    """A path relative to the repository when it is inside it (RESULTS.md is committed)."""
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def section_markdown(suite: SuiteResult, analysis: Analysis, out_dir: Path) -> str:
    """The section of RESULTS.md for this run (CPU or GPU)."""
    out_dir = _display(out_dir)
    device = "GPU" if suite.settings.device == "cuda" else "CPU"
    mem_label = (
        "device-level GPU peak (MB)"
        if analysis.memory == "gpu"
        else "peak RSS of the process tree (MB)"
    )
    area_label = "GPU memory–time area (MB·s)" if analysis.memory == "gpu" else "RSS area (MB·s)"
    peak = (lambda c: c.max_gpu_mb) if analysis.memory == "gpu" else (lambda c: c.max_rss_mb)
    area = (
        (lambda c: c.total_gpu_mb_s) if analysis.memory == "gpu" else (lambda c: c.total_rss_mb_s)
    )
    lines = [f"## {device} run", "", *_machine_lines(suite)]
    lines.append(
        "- Cases (synthetic FLARE-like CT, Table 4 sizes; in-plane 0.8 mm, z 5.0 mm for ≤ 100 "
        "slices, 2.5 mm for 150–215, 1.25 mm for ≥ 334): "
        + ", ".join(
            f"{c.name} {c.size_xyz} @ {'×'.join(f'{s:g}' for s in c.spacing_zyx_mm)} mm (z×y×x)"
            for c in suite.cases
        )
    )
    lines.append("- Models:")
    lines += ["  " + _model_line(suite, m) for m in suite.models]
    lines.append("- Peers (whole process, one case per process, as the organizers run it):")
    for p in suite.peers:
        example = suite.models[0] if suite.models else None
        cmd = shlex.join(p.command(example, suite.settings.device)) if example else ""
        lines.append(
            f"  - {LABELS[p.name]}: `{cmd}`" + (f" (model `{example.name}`)" if example else "")
        )
    lines.append(
        f"- Raw profiler reports: `{out_dir}/reports/<model>/<peer>/run<k>/` "
        "(results.csv, results.json with samples, summary.md, logs/, plots/); "
        f"this section and benchmark.json also in `{out_dir}/`"
    )
    for note in suite.skipped:
        lines.append(f"- Skipped: {note}")
    if suite.interrupted:
        lines.append("- **Interrupted**: the tables cover only the runs finished before the stop")
    lines += ["", "### Targets", "", "| Target | Model | Measured | Status |", "|---|---|---|---|"]
    lines += [f"| {c.target} | {c.model} | {c.measured} | {_met(c.met)} |" for c in analysis.checks]
    lines.append("")
    if suite.settings.device != "cuda":
        lines += [f"GPU targets: {NO_GPU_REASON}", ""]
    for m in suite.models:
        lines += [f"### Model `{m.name}`", "", "Wall time of the whole process (s):", ""]
        both = OURS in {p.name for p in suite.peers} and NNUNET_NOTTA in {
            p.name for p in suite.peers
        }
        lines += _table(suite, analysis, m.name, lambda c: c.time_s, 1, with_agreement=both)
        lines += ["", f"Memory: {mem_label}:", ""]
        lines += _table(suite, analysis, m.name, peak, 0)
        lines += ["", f"Memory: {area_label}:", ""]
        lines += _table(suite, analysis, m.name, area, 0)
        lines.append("")
        failures = [
            f"- {case.name} {LABELS[p.name]}: " + "; ".join(cell.errors)
            for case in suite.cases_of(m.name)
            for p in suite.peers
            if (cell := analysis.cells.get((m.name, case.name, p.name))) and cell.errors
        ]
        if failures:
            lines += ["Failed runs:", "", *failures, ""]
    lines += _air_lines(suite, analysis)
    lines += [
        "### Where our time goes (each model's largest case in this run)",
        "",
        *_breakdown_lines(analysis),
    ]
    if analysis.memory == "rss":
        lines += [
            "RSS is summed over the process tree, so nnU-Net's worker processes (preprocessing "
            "and export, spawned by `nnUNetv2_predict_from_modelfolder`) are counted; pages "
            "shared between processes (e.g. the torch libraries each worker maps) count once "
            "per process, as `ps` counts them.",
            "",
        ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# RESULTS.md

_HEADER = """# Benchmark results

Written by `python -m benchmarks` (`make bench`); see benchmarks/README.md for what is
measured and how. A CPU run rewrites the CPU section, a GPU run (`--device cuda`) the GPU
section; everything between the markers is generated, do not edit it by hand.

Every figure is one whole process per case, as the FLARE24 organizers time a submission:
interpreter start, imports, model loading, reading, inference, writing. Ratios are
nnU-Net / ours: above 1 means ours is faster or leaner. Models with random weights give
the same time and memory as trained ones (nothing depends on the weight values), but their
masks are meaningless; the Dice column only says whether the two predictors did the same
work.
"""


def _markers(device: str) -> tuple[str, str]:
    return f"<!-- BEGIN {device} section -->", f"<!-- END {device} section -->"


def _placeholder(device: str) -> str:
    name = "GPU" if device == "gpu" else "CPU"
    reason = (
        "No GPU run yet: the sessions that produced this file had no GPU. Run `make "
        'gpu-check` (benchmarks/README.md, "GPU check") on a CUDA machine; `python -m '
        "benchmarks --device cuda ...` for the full matrix."
        if device == "gpu"
        else "No CPU run yet: run `python -m benchmarks`."
    )
    return f"## {name} run\n\n{reason}\n"


def update_results_file(path: Path, device: str, section: str) -> Path:
    """Replace the ``device`` (``cpu`` / ``gpu``) section of RESULTS.md, keeping the rest.

    A missing file, or one without the markers, is started from the template.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        text = ""
    if not all(m in text for d in ("cpu", "gpu") for m in _markers(d)):
        text = _HEADER + "".join(
            f"\n{_markers(d)[0]}\n{_placeholder(d)}{_markers(d)[1]}\n" for d in ("cpu", "gpu")
        )
    begin, end = _markers(device)
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    text = pattern.sub(lambda _: f"{begin}\n{section.rstrip()}\n{end}", text, count=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, text)
    return path


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def write_json_summary(suite: SuiteResult, analysis: Analysis, path: Path) -> Path:
    """``benchmark.json``: context, cells, ratios, agreements, breakdowns and checks."""
    models = [m.name for m in suite.models]
    peers = {p.name for p in suite.peers}

    def cases(model: str) -> list[str]:
        return [c.name for c in suite.cases_of(model)]

    data = {
        "context": suite.context,
        "settings": asdict(suite.settings),
        "memory": analysis.memory,
        "cases": [
            {"name": c.name, "size_xyz": c.size_xyz, "spacing_zyx_mm": list(c.spacing_zyx_mm)}
            for c in suite.cases
        ],
        "models": [{k: _jsonable(v) for k, v in asdict(m).items()} for m in suite.models],
        "plan": {m: cases(m) for m in models},
        "cells": [
            {"model": k[0], "case": k[1], "peer": k[2], **asdict(v)}
            for k, v in analysis.cells.items()
        ],
        "ratios": {
            m: {
                p: {
                    "time": time_ratios(analysis.cells, m, cases(m), p),
                    "memory": memory_ratios(analysis.cells, m, cases(m), p, analysis.memory),
                }
                for p in NNUNET_PEERS
                if p in peers and OURS in peers
            }
            for m in models
        },
        "agreement_dice_vs_notta": [
            {"model": k[0], "case": k[1], "dice": v} for k, v in analysis.agreements.items()
        ],
        "breakdown": {
            m: None
            if b is None
            else {
                "case": analysis.largest_case[m],
                "wall_s": b.wall_s,
                "parts_s": b.parts_s,
                "outside_forward_share": b.outside_forward_share,
            }
            for m, b in analysis.breakdowns.items()
        },
        "nnunet_tile_loop": [
            {"model": m, "peer": p, "case": analysis.largest_case[m], "wall_s": w, "loop_s": lp}
            for (m, p), (w, lp) in analysis.nnunet_loops.items()
        ],
        "air": [
            {
                "model": k[0],
                "case": k[1],
                **asdict(a),
                "measured_saved_s": a.measured_saved_s,
            }
            for k, a in analysis.air.items()
        ],
        "checks": [asdict(c) for c in analysis.checks],
        "skipped": suite.skipped,
        "interrupted": suite.interrupted,
        "written": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    path.write_text(json.dumps(data, indent=1, default=_jsonable) + "\n", encoding="utf-8")
    return path


def write_results(
    suite: SuiteResult, results_md: Path | None = RESULTS_MD, gpu_note: str | None = None
) -> tuple[Analysis, str]:
    """Analyse the suite, write ``OUT/RESULTS.md`` + ``OUT/benchmark.json`` and update RESULTS.md.

    Args:
        suite: the finished suite.
        results_md: the committed results file to update; None to leave it alone.
        gpu_note: why GPU figures are missing, when they are.

    Returns:
        The analysis and the section's Markdown.
    """
    analysis = analyse(suite, gpu_note)
    section = section_markdown(suite, analysis, suite.out_dir)
    device = "gpu" if suite.settings.device == "cuda" else "cpu"
    (suite.out_dir / "RESULTS.md").write_text(section + "\n", encoding="utf-8")
    write_json_summary(suite, analysis, suite.out_dir / "benchmark.json")
    if results_md is not None:
        update_results_file(results_md, device, section)
    return analysis, section
