"""Command line: ``python -m inference -i IN_DIR -o OUT_DIR -m MODEL [-m MODEL2] [-f FOLD ...]``.

Predicts every ``<case>_0000.nii.gz`` in IN_DIR into ``OUT_DIR/<case>.nii.gz`` (uint8, the
input's exact geometry). Start-up is arranged for the challenge's timing, which counts the
whole process per case: the first images are read on a background thread while torch is
imported and the models are loaded, and results are written on another thread while the
next case is predicted.

Failures are reported one line each on stderr: ``error: <reason>`` when the run cannot
start (exit status 2), ``ERROR <case>: <reason>`` for a case that is skipped (the others
are still predicted; exit status 1), and ``WARNING <case>: <note>`` for a case that is
predicted despite an oddity. Names are written with control characters escaped, so a
file name cannot start a line of its own. Outputs are written atomically and verified,
so an output folder never holds a partial file, and an output never replaces an input
(files are compared by device and inode, which sees through links and bind mounts).

SIGTERM and SIGINT stop the run between two steps: the predictions already made are
written, the rest is named in one line ``error: interrupted by SIG...``, and the exit
status is 128 + the signal number (143, 130). A second signal ends the process at once.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

from inference.cases import (
    Case,
    blocked_outputs,
    find_cases,
    non_utf8_argument,
    prepare_output_dir,
)
from inference.messages import one_line, printable
from inference.nifti import NiftiError
from inference.pipeline import CasePipeline, Interrupted, case_error, stop_signals

log = logging.getLogger("inference")

EXIT_OK, EXIT_CASE_FAILED, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used for --help)."""
    p = argparse.ArgumentParser(
        prog="python -m inference",
        description=(
            "Lean nnU-Net v2 predictor for FLARE24: predicts every <case>_0000.nii.gz in "
            "IN_DIR into OUT_DIR/<case>.nii.gz (uint8, same geometry as the input). No "
            "test-time augmentation, argmax on raw logits, torch resampling, fp16 on CUDA."
        ),
    )
    p.add_argument("-i", "--input", required=True, type=Path, help="folder of *_0000.nii.gz")
    p.add_argument("-o", "--output", required=True, type=Path, help="folder for <case>.nii.gz")
    p.add_argument(
        "-m",
        "--model",
        required=True,
        action="append",
        type=Path,
        help="nnU-Net v2 results folder (plans.json, dataset.json, fold_X/); repeat for an "
        "ensemble (logits are averaged)",
    )
    p.add_argument(
        "-f",
        "--folds",
        nargs="+",
        default=None,
        help="folds to use (0..4, all); default: every fold found (numbered folds before all)",
    )
    p.add_argument(
        "--checkpoint",
        default="checkpoint_final.pth",
        help="checkpoint file in each fold folder (e.g. checkpoint_best.pth)",
    )
    p.add_argument(
        "--allow-network-class",
        action="append",
        default=[],
        metavar="DOTTED.NAME",
        help="a class plans.json may name besides the architectures of "
        "dynamic_network_architectures and torch.nn's conv/norm/dropout/nonlinearity layers "
        "(repeatable; it must be a torch.nn.Module class)",
    )
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument(
        "--step-size",
        type=float,
        default=0.5,
        help="sliding-window step as a fraction of the patch, in (0, 1] (nnU-Net default 0.5)",
    )
    p.add_argument(
        "--vram-budget-mb",
        type=float,
        default=4096,
        help="device-level GPU memory budget incl. the CUDA context, as the organizers "
        "measure it (default 4096; 0 = no limit)",
    )
    p.add_argument(
        "--tile-batch",
        type=int,
        default=1,
        help="largest number of tiles per forward pass on CUDA (used only if the budget allows)",
    )
    p.add_argument(
        "--compression-level",
        type=int,
        default=1,
        choices=range(0, 10),
        metavar="0-9",
        help="gzip level of the written masks (default 1: fast, label maps compress well)",
    )
    p.add_argument(
        "--no-skip-air",
        dest="skip_air",
        action="store_false",
        help="run the network on every tile of nnU-Net's grid, also those holding only air "
        "(by default CT tiles without a voxel above -500 HU are skipped: body voxels get "
        "exactly the same prediction, see inference/air.py)",
    )
    p.add_argument(
        "--crop-body",
        action="store_true",
        help="crop CT to the body's bounding box before the sliding window (fewer tiles "
        "over air; tile positions then differ slightly from nnU-Net's)",
    )
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (>= 1)")
    p.add_argument("--progress", action="store_true", help="progress bar over tiles")
    p.add_argument("-q", "--quiet", action="store_true", help="only errors and the summary")
    return p


def _fail(message: str) -> int:
    print(f"error: {printable(one_line(message))}", file=sys.stderr)
    return EXIT_USAGE


def _check_arguments(args: argparse.Namespace) -> str | None:
    """Why the arguments cannot work, or None (argparse checks types, not ranges)."""
    if not (math.isfinite(args.step_size) and 0 < args.step_size <= 1):
        return f"--step-size must be in (0, 1], got {args.step_size:g}"
    if not (math.isfinite(args.vram_budget_mb) and args.vram_budget_mb >= 0):
        return f"--vram-budget-mb must be >= 0 (0 = no limit), got {args.vram_budget_mb:g}"
    if args.tile_batch < 1:
        return f"--tile-batch must be >= 1, got {args.tile_batch}"
    if args.threads is not None and args.threads < 1:
        return f"--threads must be >= 1, got {args.threads}"
    return non_utf8_argument(
        [("-i", args.input), ("-o", args.output)] + [("-m", m) for m in args.model]
    )


def _setup_logging(quiet: bool) -> None:
    """Log lines go to the current stderr, message only (one line per event)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False


def _choose_device(name: str):
    import torch

    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but no CUDA device is available")
    if name == "cuda" or torch.cuda.is_available():
        return torch.device("cuda", 0)
    return torch.device("cpu")


def _select_cases(args: argparse.Namespace) -> tuple[list[Case], list[str], int] | int:
    """The cases to predict, the ones refused up front, and their total number.

    Returns:
        ``(cases, refused, n_cases)``, or an exit status when the run cannot start.
    """
    try:
        cases, ignored = find_cases(args.input)
    except NiftiError as err:
        return _fail(str(err))
    for path in ignored:
        log.warning(f"WARNING {printable(path.name)}: not named <case>_0000.nii.gz; skipped")
    if not cases:
        return _fail(f"no <case>_0000.nii.gz files in {args.input}")
    problem = prepare_output_dir(args.output)
    if problem:
        return _fail(problem)
    blocked = blocked_outputs(cases, args.input, args.output)
    for name, reason in blocked.items():
        case_error(name, reason)
    return [c for c in cases if c.name not in blocked], list(blocked), len(cases)


def _load_predictor(args: argparse.Namespace):
    """Load the models and build the predictor (torch is imported here).

    Returns:
        ``(predictor, models, seconds)``.

    Raises:
        ModelError, RuntimeError, ValueError: the run cannot start.
    """
    from inference.runtime import tune_allocator

    tune_allocator()
    import torch

    from inference.model import load_model
    from inference.predictor import PredictOptions, Predictor

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = _choose_device(args.device)
    t = time.perf_counter()
    models = [
        load_model(m, args.folds, args.checkpoint, args.allow_network_class) for m in args.model
    ]
    options = PredictOptions(
        step_size=args.step_size,
        vram_budget_mb=args.vram_budget_mb,
        max_tile_batch=args.tile_batch,
        progress=args.progress,
        crop_body=args.crop_body,
        skip_air=args.skip_air,
    )
    try:
        predictor = Predictor(models, device, options)
    except torch.cuda.OutOfMemoryError:
        # Not even the weights fit next to whatever else holds the GPU: a slow output
        # still beats none.
        device = torch.device("cpu")
        log.warning("out of GPU memory while loading the models; predicting on the CPU")
        predictor = Predictor([m.to(device) for m in models], device, options)
    return predictor, models, time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    """Run the predictor; returns the process exit status."""
    args = build_parser().parse_args(argv)
    _setup_logging(args.quiet)
    problem = _check_arguments(args)
    if problem:
        return _fail(problem)
    t_start = time.perf_counter()
    with stop_signals():
        try:
            return _run(args, t_start)
        except Interrupted as stop:
            # before any case was predicted (while loading the models, say)
            print(f"error: interrupted by {stop.name}; no case was predicted", file=sys.stderr)
            return 128 + stop.signum


def _run(args: argparse.Namespace, t_start: float) -> int:
    # ITK prints its warnings (e.g. "unexpected scales in sform") as multi-line blocks on
    # stderr; the checks in inference.validate report what matters in one line instead.
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    selected = _select_cases(args)
    if isinstance(selected, int):
        return selected
    cases, refused, n_cases = selected
    if not cases:
        return EXIT_CASE_FAILED

    with CasePipeline(cases, args.output, args.compression_level) as pipeline:
        # Reading starts before torch is imported: decompression overlaps with start-up.
        pipeline.start_reading()
        from inference.model import ModelError

        try:
            predictor, models, load_s = _load_predictor(args)
        except (ModelError, RuntimeError, ValueError) as err:
            return _fail(str(err))
        n_nets = sum(len(m.networks) for m in models)
        log.info(
            f"{len(cases)} case(s); {len(models)} model(s), {n_nets} network(s) "
            f"[{', '.join(f'{m.folder.name}:{m.configuration}' for m in models)}] on "
            f"{predictor.device}; start-up {time.perf_counter() - t_start:.1f} s "
            f"(models {load_s:.1f} s)"
        )
        pipeline.run(predictor, models)

    failed = refused + pipeline.failed
    elapsed = f"{time.perf_counter() - t_start:.1f} s"
    failures = f"; failed: {', '.join(map(printable, failed))}" if failed else ""
    n_written = len(pipeline.written)
    if pipeline.interrupted is not None:
        stop = pipeline.interrupted
        not_done = [c.name for c in cases if c.name not in pipeline.finished]
        print(
            f"error: interrupted by {stop.name} after {elapsed}: {n_written}/{n_cases} "
            f"case(s) written to {printable(args.output)}; not done: "
            f"{', '.join(map(printable, not_done))}{failures}",
            file=sys.stderr,
        )
        return 128 + stop.signum
    log.warning(
        f"done: {n_written}/{n_cases} case(s) written to {printable(args.output)} in "
        f"{elapsed}{failures}"
    )
    return EXIT_CASE_FAILED if failed else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
