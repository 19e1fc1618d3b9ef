"""Command line of ``python -m evaluation``.

- ``python -m evaluation [evaluate] -p PRED_DIR -g GT_DIR [-o REPORT_DIR] [--tolerance-mm 2]``:
  DSC / NSD per case with the FLARE24 conventions -> ``evaluation.csv`` + ``evaluation.md``.
- ``python -m evaluation select --eval REPORT[:LABEL] ... --profile PROFILE ... -o OUT_DIR``:
  accuracy next to efficiency per model -> ``selection.md/.csv/.png``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from evaluation.metrics import DEFAULT_TOLERANCE_MM

EXIT_OK, EXIT_FAILED = 0, 1
COMMANDS = ("evaluate", "select")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with both subcommands (also used for --help)."""
    p = argparse.ArgumentParser(
        prog="python -m evaluation",
        description=(
            "Lesion DSC / NSD of a prediction folder against ground truth (FLARE24 Task 1 "
            "conventions), and a model-selection report joining accuracy with profiling "
            "results. Without a subcommand, 'evaluate' is assumed: "
            "python -m evaluation -p PRED_DIR -g GT_DIR."
        ),
    )
    sub = p.add_subparsers(dest="command", metavar="{evaluate,select}")

    e = sub.add_parser(
        "evaluate",
        help="score PRED_DIR/<case>.nii.gz against GT_DIR/<case>.nii.gz (the default)",
        description=(
            "Per case DSC and NSD of the lesion label (any voxel > 0) with the FLARE "
            "conventions: both empty -> 1, exactly one empty -> 0, NSD = 0 when DSC < 0.2. "
            "A prediction must be a label map: non-integer values (a probability map) are an "
            "error. "
            "Writes REPORT_DIR/evaluation.csv and evaluation.md and prints the summary."
        ),
    )
    e.add_argument("-p", "--pred", required=True, type=Path, help="folder of <case>.nii.gz")
    e.add_argument(
        "-g", "--gt", required=True, type=Path, help="ground-truth folder; defines the cases"
    )
    e.add_argument(
        "-o",
        "--output",
        type=Path,
        default=None,
        help="report folder (default: PRED_DIR/evaluation)",
    )
    e.add_argument(
        "--tolerance-mm",
        type=float,
        default=DEFAULT_TOLERANCE_MM,
        help=f"NSD tolerance in mm (default {DEFAULT_TOLERANCE_MM:g}, FLARE's lesion choice)",
    )
    e.add_argument(
        "--allow-missing",
        action="store_true",
        help="score a missing prediction as empty instead of failing",
    )
    e.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    s = sub.add_parser(
        "select",
        help="join evaluation and profiling reports per model",
        description=(
            "Pairs each --eval report with the --profile report at the same position and "
            "writes OUT_DIR/selection.md, selection.csv (per model), selection_cases.csv "
            "(per model and case) and selection.png (mean DSC vs. mean time)."
        ),
    )
    s.add_argument(
        "--eval",
        dest="evals",
        nargs="+",
        action="extend",
        required=True,
        metavar="REPORT[:LABEL]",
        help="evaluation report folder (or its evaluation.csv), optionally :LABEL "
        "(e.g. bs4, bs8, ensemble; default: the folder name)",
    )
    s.add_argument(
        "--profile",
        dest="profiles",
        nargs="+",
        action="extend",
        required=True,
        metavar="PROFILE_REPORT",
        help="profiling report folder (or its results.csv), one per --eval, same order",
    )
    s.add_argument("-o", "--output", required=True, type=Path, help="output folder")
    s.add_argument(
        "--time-limit-s", type=float, default=45.0, help="running-time limit (default 45)"
    )
    s.add_argument(
        "--gpu-limit-mb", type=float, default=4096.0, help="GPU memory limit (default 4096)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the process exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # `evaluate` is the default subcommand: `python -m evaluation -p P -g G` works as is.
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv.insert(0, "evaluate")
    args = build_parser().parse_args(argv)
    if args.command == "select":
        return _select(args)
    return _evaluate(args)


def _evaluate(args: argparse.Namespace) -> int:
    from evaluation.evaluate import (
        EvaluationError,
        evaluate_folder,
        list_label_cases,
        unmatched_predictions,
    )
    from evaluation.report import format_summary, summarize, write_csv, write_markdown
    from inference.messages import printable

    if not (math.isfinite(args.tolerance_mm) and args.tolerance_mm >= 0):
        return _fail(f"--tolerance-mm must be a finite number >= 0, got {args.tolerance_mm:g}")
    try:
        extra = unmatched_predictions(list_label_cases(args.gt), args.pred)
        if extra:
            print(
                f"warning: {len(extra)} prediction(s) without ground truth ignored "
                f"({printable(', '.join(extra[:5]))}{', …' if len(extra) > 5 else ''})",
                file=sys.stderr,
            )
        results = evaluate_folder(
            args.pred,
            args.gt,
            tolerance_mm=args.tolerance_mm,
            allow_missing=args.allow_missing,
            progress=not args.quiet,
        )
    except EvaluationError as err:
        return _fail(str(err))
    out = args.output or args.pred / "evaluation"
    try:
        out.mkdir(parents=True, exist_ok=True)
        summary = summarize(results)
        csv_path = write_csv(results, out / "evaluation.csv")
        md_path = write_markdown(
            results, summary, out / "evaluation.md", args.pred, args.gt, args.tolerance_mm
        )
    except OSError as err:
        return _fail(f"cannot write the report to {out} ({err.strerror or err})")
    for r in results:
        for note in r.notes:
            print(f"warning: case {printable(r.case)}: {note}", file=sys.stderr)
    print(format_summary(summary, args.tolerance_mm))
    print(f"report: {csv_path} {md_path}")
    return EXIT_OK


def _select(args: argparse.Namespace) -> int:
    from evaluation.selection import SelectionError, load_models, write_selection

    try:
        models = load_models(args.evals, args.profiles)
        paths = write_selection(models, args.output, args.time_limit_s, args.gpu_limit_mb)
    except SelectionError as err:
        return _fail(str(err))
    except OSError as err:
        return _fail(f"cannot write the selection report to {args.output} ({err})")
    for m in models:
        only_eval = {r.case for r in m.results} - set(m.profile)
        only_profile = set(m.profile) - {r.case for r in m.results}
        if only_eval or only_profile:
            print(
                f"warning: {m.label}: {len(only_eval)} case(s) evaluated but not profiled, "
                f"{len(only_profile)} profiled but not evaluated",
                file=sys.stderr,
            )
    print(f"selection report: {' '.join(str(p) for p in paths)}")
    return EXIT_OK


def _fail(message: str) -> int:
    from inference.messages import printable

    # file names may hold newlines or bytes that are not UTF-8: one line, escaped
    print(f"error: {printable(message)}", file=sys.stderr)
    return EXIT_FAILED
