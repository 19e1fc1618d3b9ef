"""Command line: ``python -m inference -i IN_DIR -o OUT_DIR -m MODEL [-m MODEL2] [-f FOLD ...]``.

Predicts every ``<case>_0000.nii.gz`` in IN_DIR into ``OUT_DIR/<case>.nii.gz`` (uint8, the
input's exact geometry). Start-up is arranged for the challenge's timing, which counts the
whole process per case: the first images are read on a background thread while torch is
imported and the models are loaded, and results are written on another thread while the
next case is predicted.

Failures are reported one line each on stderr: ``error: <reason>`` when the run cannot
start (exit status 2), ``ERROR <case>: <reason>`` for a case that is skipped (the others
are still predicted; exit status 1), and ``WARNING <case>: <note>`` for a case that is
predicted despite an oddity. Outputs are written atomically, so an output folder never
holds a partial file, and an output never replaces an input.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from inference.nifti import (
    Case,
    Geometry,
    NiftiError,
    atomic_path,
    find_cases,
    read_header,
    read_image,
    remove_stale_temporaries,
)
from inference.validate import InputError

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
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument(
        "--step-size",
        type=float,
        default=0.5,
        help="sliding-window step as a fraction of the patch (nnU-Net default 0.5)",
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
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--progress", action="store_true", help="progress bar over tiles")
    p.add_argument("-q", "--quiet", action="store_true", help="only errors and the summary")
    return p


def _one_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return lines[0] if lines else ""


def _fail(message: str) -> int:
    print(f"error: {_one_line(message)}", file=sys.stderr)
    return EXIT_USAGE


def _case_error(name: str, reason: str) -> None:
    print(f"ERROR {name}: {_one_line(reason)}", file=sys.stderr)


def _reason(err: BaseException, known: tuple[type[BaseException], ...]) -> str:
    """One line for a failed case; unexpected exceptions keep their type for debugging."""
    text = _one_line(str(err))
    if isinstance(err, known):
        return text or type(err).__name__
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _check_output_dir(output: Path) -> str | None:
    """Create the output folder, make sure it is writable, and clear stale temporaries."""
    try:
        output.mkdir(parents=True, exist_ok=True)
        with atomic_path(output / ".write-test.nii.gz") as probe:
            probe.write_bytes(b"")
        (output / ".write-test.nii.gz").unlink()
    except OSError as err:
        return f"output folder {output} is not writable ({err.strerror or err})"
    for path in remove_stale_temporaries(output):
        log.warning(f"removed {path.name}: a partial file left by an interrupted run")
    return None


def _overwrites(cases: list[Case], output: Path) -> dict[str, str]:
    """Cases whose output would replace an input file (``x_0000`` next to ``x``, -o == -i)."""
    inputs = {c.image_path.resolve(): c for c in cases}
    blocked = {}
    for case in cases:
        victim = inputs.get(case.output_path(output).resolve())
        if victim is not None:
            blocked[case.name] = (
                f"its output {case.output_path(output).name} would overwrite the input "
                f"of case {victim.name}; skipped (write the outputs to another folder)"
            )
    return blocked


def _read(case: Case):
    """Read and validate one case on a worker thread (returns data or the exception)."""
    from inference.validate import check_header, check_image

    t = time.perf_counter()
    notes = check_header(read_header(case.image_path))
    array, geometry = read_image(case.image_path)
    array, more = check_image(array, geometry)
    return array, geometry, notes + more, time.perf_counter() - t


def _rss_mb() -> float | None:
    """Resident memory of this process in MB (Linux), for the per-case log line."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _setup_logging(quiet: bool) -> None:
    """Log lines go to the current stderr, message only (one line per event)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False


def _write(path: Path, labels, geometry: Geometry, level: int) -> float:
    from inference.nifti import write_image

    t = time.perf_counter()
    write_image(path, labels, geometry, compression_level=level)
    return time.perf_counter() - t


def _choose_device(name: str):
    import torch

    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but no CUDA device is available")
    if name == "cuda" or torch.cuda.is_available():
        return torch.device("cuda", 0)
    return torch.device("cpu")


def main(argv: list[str] | None = None) -> int:
    """Run the predictor; returns the process exit status."""
    args = build_parser().parse_args(argv)
    _setup_logging(args.quiet)
    # ITK prints its warnings (e.g. "unexpected scales in sform") as multi-line blocks on
    # stderr; the checks in inference.validate report what matters in one line instead.
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    t_start = time.perf_counter()
    try:
        cases, ignored = find_cases(args.input)
    except NiftiError as err:
        return _fail(str(err))
    for path in ignored:
        log.warning(f"WARNING {path.name}: not named <case>_0000.nii.gz; skipped")
    if not cases:
        return _fail(f"no <case>_0000.nii.gz files in {args.input}")
    problem = _check_output_dir(args.output)
    if problem:
        return _fail(problem)
    failed: list[str] = []
    blocked = _overwrites(cases, args.output)
    for name, reason in blocked.items():
        failed.append(name)
        _case_error(name, reason)
    n_cases, cases = len(cases), [c for c in cases if c.name not in blocked]
    if not cases:
        return EXIT_CASE_FAILED

    # Reading starts before torch is imported: decompression overlaps with start-up.
    readers = ThreadPoolExecutor(max_workers=1, thread_name_prefix="read")
    pending: dict[str, Future] = {}
    prefetch = 2

    def schedule(i: int) -> None:
        if i < len(cases) and cases[i].name not in pending:
            pending[cases[i].name] = readers.submit(_read, cases[i])

    for i in range(prefetch):
        schedule(i)

    from inference.runtime import tune_allocator

    tune_allocator()
    import torch

    from inference.model import ModelError, load_model
    from inference.predictor import PredictOptions, Predictor
    from inference.validate import check_for_model

    known_errors = (NiftiError, InputError, ModelError)

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = _choose_device(args.device)
        t = time.perf_counter()
        models = [load_model(m, args.folds, args.checkpoint) for m in args.model]
        options = PredictOptions(
            step_size=args.step_size,
            vram_budget_mb=args.vram_budget_mb,
            max_tile_batch=max(1, args.tile_batch),
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
        load_s = time.perf_counter() - t
    except (ModelError, RuntimeError, ValueError) as err:
        readers.shutdown(wait=False, cancel_futures=True)
        return _fail(str(err))
    n_nets = sum(len(m.networks) for m in models)
    log.info(
        f"{len(cases)} case(s); {len(models)} model(s), {n_nets} network(s) "
        f"[{', '.join(f'{m.folder.name}:{m.configuration}' for m in models)}] on {device}; "
        f"start-up {time.perf_counter() - t_start:.1f} s (models {load_s:.1f} s)"
    )

    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="write")
    writes: list[tuple[Case, Future, str]] = []
    for i, case in enumerate(cases):
        schedule(i + prefetch - 1)
        t_case = time.perf_counter()
        try:
            array, geometry, notes, read_s = pending.pop(case.name).result()
            for model in models:
                prep = model.preprocessing
                for note in check_for_model(
                    array.shape,
                    geometry.spacing_zyx_mm,
                    prep.spacing_mm,
                    prep.transpose_forward,
                    model.patch_size,
                ):
                    if note not in notes:
                        notes.append(note)
            for note in notes:
                log.warning(f"WARNING {case.name}: {note}")
            result = predictor.predict(array, geometry.spacing_zyx_mm, name=case.name)
            del array
            for note in result.notes:
                log.warning(f"WARNING {case.name}: {note}")
            future = writer.submit(
                _write,
                case.output_path(args.output),
                result.labels,
                geometry,
                args.compression_level,
            )
            voxel_ml = math.prod(geometry.spacing_xyz_mm) / 1000.0
            lesion_ml = float(result.labels.astype(bool).sum()) * voxel_ml
            size = "x".join(str(s) for s in geometry.size_xyz)
            stages = " ".join(f"{k} {v:.2f}s" for k, v in result.timings_s.items())
            summary = (
                f"[{i + 1}/{len(cases)}] {case.name} {size}: read {read_s:.2f}s {stages} "
                f"({result.n_tiles} tiles, {result.device}) | {result.tiles_summary()} | "
                f"foreground {lesion_ml:.1f} ml"
            )
            if result.device_peak is not None:
                summary += f" | {result.device_peak.describe()}"
            writes.append((case, future, summary))
        except Exception as err:  # one bad case must not stop the others
            failed.append(case.name)
            _case_error(case.name, _reason(err, known_errors))
            continue
        finally:
            log.debug(f"{case.name}: {time.perf_counter() - t_case:.2f}s")
        _drain(writes, failed, block=False)
    _drain(writes, failed, block=True)
    readers.shutdown(wait=True)
    writer.shutdown(wait=True)

    n_ok = n_cases - len(failed)
    log.warning(
        f"done: {n_ok}/{n_cases} case(s) written to {args.output} in "
        f"{time.perf_counter() - t_start:.1f} s"
        + (f"; failed: {', '.join(failed)}" if failed else "")
    )
    return EXIT_CASE_FAILED if failed else EXIT_OK


def _drain(writes: list, failed: list[str], block: bool) -> None:
    """Log finished writes; with ``block`` wait for all of them."""
    while writes and (block or writes[0][1].done()):
        case, future, summary = writes.pop(0)
        try:
            write_s = future.result()
            rss = _rss_mb()
            log.info(f"{summary} | write {write_s:.2f}s" + (f" | rss {rss:.0f} MB" if rss else ""))
        except Exception as err:
            failed.append(case.name)
            _case_error(case.name, f"cannot write output ({_one_line(str(err))})")


if __name__ == "__main__":
    sys.exit(main())
