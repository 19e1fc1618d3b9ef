"""Command line of the profiler.

``python -m profiling -i CASES_DIR -o REPORT_DIR [options] [-- COMMAND ...]`` runs the command
once per case, as the organizers do, and writes results.csv, results.json, summary.md and
plots into REPORT_DIR. ``python -m profiling compare REPORT_A REPORT_B`` compares two reports.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import os
import shlex
import shutil
import sys
from pathlib import Path

from tqdm import tqdm

from inference.atomic import check_writable
from inference.cases import find_cases
from inference.messages import printable
from inference.nifti import NiftiError
from inference.pipeline import Interrupted, stop_signals
from profiling.compare import ReportError, compare, format_table, load_report
from profiling.docker import container_name_for, docker_argv
from profiling.metrics import GPU_LIMIT_MB, TIME_LIMIT_S
from profiling.plots import write_plots
from profiling.report import write_csv, write_json, write_summary
from profiling.runner import (
    DEFAULT_COMMAND,
    REPO_ROOT,
    CaseResult,
    ProfileOptions,
    RunSpec,
    run_case,
)
from profiling.sources import GpuSource, machine_info, open_gpu_source

EXIT_OK, EXIT_CASE_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
#: Default per-case time limit: far above the challenge's 45 s, so that only a hung
#: command is stopped (a large case predicted on a CPU still fits).
DEFAULT_TIMEOUT_S = 600.0


def build_parser() -> argparse.ArgumentParser:
    """The parser of the profiling run (also used for --help)."""
    p = argparse.ArgumentParser(
        prog="python -m profiling",
        usage="python -m profiling -i CASES_DIR -o REPORT_DIR [options] [-- COMMAND ...]\n"
        "       python -m profiling compare REPORT_A REPORT_B [--markdown]",
        description=(
            "Per-case running time and memory, measured as the FLARE24 organizers do: one case "
            "at a time in a fresh input folder, wall time of the whole command, device-level "
            "GPU memory (total - free) sampled with NVML, area under the memory-time curve by "
            f"the trapezoid rule. Flags cases over {TIME_LIMIT_S:g} s or {GPU_LIMIT_MB:g} MB. "
            "The command (default: `sh predict.sh` from the repository root) gets INPUT_DIR "
            "and OUTPUT_DIR in its environment and must write OUTPUT_DIR/<case>.nii.gz."
        ),
        epilog=(
            "Examples:\n"
            "  python -m profiling -i cases/ -o report/\n"
            "  python -m profiling -i cases/ -o report/ -- sh -c "
            '\'python -m inference -i "$INPUT_DIR" -o "$OUTPUT_DIR" -m models/demo\'\n'
            "  python -m profiling -i cases/ -o report/ --docker team:latest\n"
            "  python -m profiling -i cases/ -o report/ --docker team:latest "
            "--docker-options='--network none'\n"
            "  python -m profiling compare report_a/ report_b/ --markdown\n"
            "Outputs: results.csv, results.json (raw samples), summary.md, plots/*.png, "
            "logs/<case>.log, predictions/<case>.nii.gz."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-i", "--input", required=True, type=Path, help="folder of <case>_0000.nii.gz")
    p.add_argument("-o", "--output", required=True, type=Path, help="report folder")
    p.add_argument(
        "--interval-s", type=float, default=0.1, help="sampling interval (default 0.1 s)"
    )
    p.add_argument("--gpu-index", type=int, default=0, help="NVML index of the GPU (default 0)")
    p.add_argument(
        "--docker",
        metavar="IMAGE",
        help="run the organizers' `docker container run ... IMAGE /bin/bash -c \"sh "
        'predict.sh"` line instead of a local command',
    )
    p.add_argument(
        "--docker-options",
        metavar="OPTIONS",
        default="",
        help="extra `docker container run` options, placed before the image, e.g. "
        "--docker-options='--network none' for a daemon without a bridge network",
    )
    p.add_argument(
        "--container-name",
        help="--name of the container (default: the image name without registry and tag)",
    )
    p.add_argument(
        "--subtract-idle",
        action="store_true",
        help="measure idle device memory before each case and subtract it (for shared GPUs; "
        "the organizers do not subtract)",
    )
    p.add_argument("--idle-s", type=float, default=1.0, help="idle measurement time (default 1 s)")
    p.add_argument(
        "--timeout-s",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help="kill a case (and everything it started) after this many seconds and report "
        f"it as failed (default {DEFAULT_TIMEOUT_S:g}; 0 = no limit)",
    )
    p.add_argument(
        "--work-dir",
        type=Path,
        help="where per-case input/output folders are staged (default REPORT_DIR/.staging): "
        "each case gets a new folder <case>.XXXXXXXX, removed after it; nothing else there is "
        "touched. The image is copied there read-only (a clone on btrfs/XFS), so that the "
        "command cannot change the original",
    )
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or per-case lines")
    return p


def build_compare_parser() -> argparse.ArgumentParser:
    """The parser of ``compare``."""
    p = argparse.ArgumentParser(
        prog="python -m profiling compare",
        description="Per-case ratios B/A of running time, peak memory and memory-time area of "
        "two reports (GPU figures when both have them, else host RSS), with the geometric "
        "mean of each ratio. Below 1 means B is faster / leaner.",
    )
    p.add_argument("report_a", type=Path, help="report folder A (the reference)")
    p.add_argument("report_b", type=Path, help="report folder B")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    return p


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _writable_folder(folder: Path, what: str) -> str | None:
    """Create ``folder`` if missing and make sure files can be created in it.

    Checked before any case runs, so that a read-only mount or a path through a file
    fails at once with one line, not with a traceback in the middle of the first case.

    Returns:
        None, or why the folder cannot be used.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        check_writable(folder)
    except OSError as err:
        return f"{what} {folder} is not writable ({err.strerror or err})"
    return None


def _check_command(command: list[str], cwd: Path) -> str | None:
    """None if the command's program can be found, else why not."""
    program = command[0]
    if os.sep in program:
        path = Path(program) if Path(program).is_absolute() else cwd / program
        if not (path.is_file() and os.access(path, os.X_OK)):
            return f"command not found or not executable: {program}"
        return None
    if shutil.which(program) is None:
        return f"unknown command: {program} (not on PATH)"
    if tuple(command) == DEFAULT_COMMAND and not (cwd / "predict.sh").is_file():
        return f"predict.sh not found in {cwd}"
    return None


def _case_line(result: CaseResult) -> str:
    m = result.metrics
    name = printable(result.case)
    if m is None:
        return f"{name}: not run"
    gpu = (
        f"max GPU {m.max_gpu_mb:.0f} MB, {m.total_gpu_mb_s:.0f} MB·s"
        if m.max_gpu_mb is not None
        else "GPU n/a"
    )
    flags = [f"> {TIME_LIMIT_S:g} s"] * m.over_time + [f"> {GPU_LIMIT_MB:g} MB"] * bool(
        m.over_memory
    )
    status = "FAILED" if result.failed else "ok"
    host = (
        f"container peak {m.max_container_mb:.0f} MB"
        if m.max_container_mb is not None
        else f"max RSS {m.max_rss_mb:.0f} MB"
    )
    overhead = f", overhead {m.overhead_s:.1f} s" if m.overhead_s is not None else ""
    return f"{name}: {m.time_s:.1f} s, {gpu}, {host}{overhead}, {status}" + (
        f" [{', '.join(flags)}]" if flags else ""
    )


def _context(args: argparse.Namespace, spec: RunSpec, gpu: GpuSource) -> dict[str, object]:
    if spec.docker_image:
        argv = docker_argv(
            spec.docker_image,
            Path("$IN"),
            Path("$OUT"),
            spec.container_name,
            spec.gpu_index if spec.gpus else None,
            spec.docker_options,
        )
        # Leave $IN / $OUT unquoted so the line reads like the organizers' shell line.
        command_line = " ".join(t if t.startswith("$") else shlex.quote(t) for t in argv)
    else:
        argv = list(spec.command)
        command_line = shlex.join(argv)
    return {
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "gpu": gpu.describe(),
        "settings": {
            "cases_dir": str(args.input.resolve()),
            "command": argv,
            "command_line": command_line,
            "cwd": None if spec.docker else str(spec.cwd),
            "docker_image": spec.docker_image,
            "container_name": spec.container_name if spec.docker else None,
            "docker_options": list(spec.docker_options) if spec.docker else None,
            "interval_s": args.interval_s,
            "gpu_index": args.gpu_index,
            "subtract_idle": args.subtract_idle,
            "idle_s": args.idle_s if args.subtract_idle else None,
            "timeout_s": spec.timeout_s,
        },
    }


def _write_reports(
    results: list[CaseResult], report_dir: Path, context: dict[str, object], plots: bool
) -> None:
    write_csv(results, report_dir / "results.csv")
    write_json(results, report_dir / "results.json", context)
    overview = write_plots(results, report_dir / "plots") if plots else []
    write_summary(results, report_dir / "summary.md", context, overview)


def run(args: argparse.Namespace, command: list[str] | None, gpu: GpuSource | None = None) -> int:
    """Profile every case; returns the exit status.

    Args:
        args: parsed options.
        command: the local command, or None for the default.
        gpu: GPU source to use; None opens NVML (or a null source without a GPU).
    """
    if args.interval_s <= 0:
        return _fail(f"--interval-s must be > 0, got {args.interval_s}")
    if not args.timeout_s >= 0:
        return _fail(f"--timeout-s must be >= 0 (0 = no limit), got {args.timeout_s:g}")
    timeout_s = args.timeout_s if 0 < args.timeout_s < float("inf") else None
    if args.docker and command:
        return _fail("give either --docker IMAGE or a command after --, not both")
    if args.docker_options and not args.docker:
        return _fail("--docker-options needs --docker IMAGE")
    try:
        cases, ignored = find_cases(args.input)
    except NiftiError as err:
        return _fail(str(err))
    if not cases:
        return _fail(f"no <case>_0000.nii.gz files in {args.input}")
    if args.docker:
        try:
            docker_options = tuple(shlex.split(args.docker_options))
        except ValueError as err:
            return _fail(f"--docker-options: {err}")
        if shutil.which("docker") is None:
            return _fail("docker not found on PATH (--docker needs a Docker engine)")
        spec = RunSpec(
            docker_image=args.docker,
            container_name=args.container_name or container_name_for(args.docker),
            gpu_index=args.gpu_index,
            timeout_s=timeout_s,
            docker_options=docker_options,
        )
    else:
        cwd = Path.cwd() if command else REPO_ROOT
        spec = RunSpec(
            command=tuple(command or DEFAULT_COMMAND),
            cwd=cwd,
            gpu_index=args.gpu_index,
            timeout_s=timeout_s,
        )
        problem = _check_command(list(spec.command), cwd)
        if problem:
            return _fail(problem)
    report_dir: Path = args.output
    work_dir = args.work_dir or report_dir / ".staging"
    # Removed at the end only if this run made it (and it is empty by then).
    made_work_dir = not os.path.lexists(work_dir)
    for folder, what in ((report_dir, "report folder"), (work_dir, "work folder")):
        problem = _writable_folder(folder, what)
        if problem:
            return _fail(problem)
    for path in ignored:
        print(
            f"warning: skipping {printable(path.name)}: not named <case>_0000.nii.gz",
            file=sys.stderr,
        )

    own_gpu = gpu is None
    gpu = open_gpu_source(args.gpu_index) if gpu is None else gpu
    # --gpus only where there is a GPU to give: a daemon without one refuses the option.
    spec = dataclasses.replace(spec, gpus=bool(gpu.describe().get("available")))
    context = _context(args, spec, gpu)
    if not context["gpu"].get("available") and not args.quiet:
        print(f"note: GPU figures will be n/a: {context['gpu'].get('reason')}", file=sys.stderr)
    options = ProfileOptions(args.interval_s, args.subtract_idle, args.idle_s)
    results: list[CaseResult] = []
    status = EXIT_OK
    write_error: OSError | None = None
    try:
        # SIGTERM (a scheduler, `docker stop`) ends the run like Ctrl-C: the running case's
        # process group is killed, the finished cases are reported, the staging is removed.
        with stop_signals():
            bar = tqdm(cases, unit="case", file=sys.stderr, disable=args.quiet, dynamic_ncols=True)
            for case in bar:
                bar.set_postfix_str(printable(case.name))
                result = run_case(case, spec, gpu, report_dir, work_dir, options)
                results.append(result)
                if not args.quiet:
                    tqdm.write(_case_line(result), file=sys.stderr)
                if result.failed:
                    tqdm.write(
                        f"error: case {printable(result.case)}: {printable(result.error)}",
                        file=sys.stderr,
                    )
                # Rewritten after every case, so an aborted run still leaves its results.
                write_csv(results, report_dir / "results.csv")
                write_json(results, report_dir / "results.json", context)
    except (KeyboardInterrupt, Interrupted) as stop:
        name = stop.name if isinstance(stop, Interrupted) else "SIGINT"
        done = {r.case for r in results}
        not_done = [printable(c.name) for c in cases if c.name not in done]
        print(
            f"error: interrupted by {name}; the reports cover the {len(results)} finished "
            f"case(s); not done: {', '.join(not_done)}",
            file=sys.stderr,
        )
        status = 128 + stop.signum if isinstance(stop, Interrupted) else EXIT_INTERRUPTED
    except OSError as err:
        # The report folder was checked before the first case: it filled up or changed since.
        write_error = err
    finally:
        if own_gpu:
            gpu.close()
        if made_work_dir:
            # rmdir, not rmtree: a folder someone put there meanwhile is not ours to delete
            with contextlib.suppress(OSError):
                work_dir.rmdir()
    if write_error is None:
        try:
            _write_reports(results, report_dir, context, plots=not args.no_plots)
        except OSError as err:
            write_error = err
    if write_error is not None:
        where = f": {write_error.filename}" if write_error.filename else ""
        return _fail(
            f"cannot write the report to {report_dir} ({write_error.strerror or write_error}"
            f"{where})"
        )
    n_failed = sum(r.failed for r in results)
    print(
        f"report: {report_dir / 'summary.md'} ({len(results)} case(s), {n_failed} failed)",
        file=sys.stderr,
    )
    if status == EXIT_OK and n_failed:
        status = EXIT_CASE_FAILED
    return status


def run_compare(argv: list[str]) -> int:
    """``compare REPORT_A REPORT_B [--markdown]``; returns the exit status."""
    args = build_compare_parser().parse_args(argv)
    try:
        a, b = load_report(args.report_a), load_report(args.report_b)
    except ReportError as err:
        return _fail(str(err))
    comparison = compare(a, b)
    if not comparison.rows:
        return _fail("the two reports have no measured case in common")
    print(format_table(comparison, markdown=args.markdown))
    return EXIT_OK


def main(argv: list[str] | None = None, gpu: GpuSource | None = None) -> int:
    """Entry point; returns the exit status.

    Args:
        argv: arguments without the program name (default: ``sys.argv[1:]``).
        gpu: GPU source to use instead of NVML (tests pass a fake here).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["compare"]:
        return run_compare(argv[1:])
    # Everything after the first "--" is the command, untouched by argparse.
    command = None
    if "--" in argv:
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1 :]
        if not command:
            return _fail("nothing after --: give the command to profile")
    args = build_parser().parse_args(argv)
    return run(args, command, gpu)
