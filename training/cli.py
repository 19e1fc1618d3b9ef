"""Command line: ``python -m training convert|plan|train|export`` (and ``evaluate|select``).

Each subcommand works in a work folder (``--work``, default ``./work``) that holds
``nnUNet_raw``, ``nnUNet_preprocessed`` and ``nnUNet_results``. nnU-Net's environment
variables are set from it before nnunetv2 is imported, which happens only inside the
subcommands that need it (``--help`` and ``convert`` stay quick).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

from training.workspace import (
    DEFAULT_PLANS,
    DEFAULT_WORK,
    Workspace,
    WorkspaceError,
    plans_identifier,
)

EXIT_OK, EXIT_FAILED = 0, 1


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--work",
        type=Path,
        default=DEFAULT_WORK,
        help="work folder for nnUNet_raw, nnUNet_preprocessed, nnUNet_results (default ./work)",
    )
    return common


def _add_convert(sub, common) -> None:
    p = sub.add_parser(
        "convert",
        parents=[common],
        help="FLARE24-style folder -> nnU-Net raw dataset (labeled cases only)",
        description=(
            "Convert a FLARE24-style folder into an nnU-Net v2 raw dataset DatasetXXX_NAME with "
            "the labeled cases only (partial labels are used as complete labels). Every "
            "image/label pair is checked (readable, 3D, same size/spacing/origin/direction, "
            "label values in {0, 1}); bad pairs are skipped with a one-line reason on stderr. "
            "The source folder is never modified: files are hard-linked, or copied when "
            "linking is impossible."
        ),
    )
    p.add_argument(
        "-i", "--input", type=Path, help="folder with imagesTr/, labelsTr/ [unlabeledTr/]"
    )
    p.add_argument("--images", type=Path, help="folder of <case>_0000.nii.gz (instead of -i)")
    p.add_argument("--labels", type=Path, help="folder of <case>.nii.gz (instead of -i)")
    p.add_argument("--unlabeled", type=Path, help="folder of unlabeled images (counted, not used)")
    p.add_argument("--dataset-id", type=int, default=501, help="nnU-Net dataset id (default 501)")
    p.add_argument("--name", default="FLARE24", help="dataset name (default FLARE24)")
    p.add_argument(
        "--tolerance",
        type=float,
        default=1e-3,
        help="image/label geometry tolerance, mm for spacing/origin (default 1e-3)",
    )
    p.add_argument(
        "--header-only",
        action="store_true",
        help="read only the image headers (faster; a truncated image is then not detected)",
    )
    p.add_argument("--workers", type=int, default=2, help="processes for checking (default 2)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    p.add_argument(
        "--strict",
        action="store_true",
        help="write nothing and exit 1 when any pair fails the checks",
    )
    p.set_defaults(handler=_run_convert)


def _add_plan(sub, common) -> None:
    p = sub.add_parser(
        "plan",
        parents=[common],
        help="nnU-Net fingerprint + plans + 3d_fullres preprocessing; batch-size/compact configs",
        description=(
            "Run nnU-Net's fingerprint extraction, experiment planning and preprocessing for "
            "3d_fullres, then add batch-size configurations 3d_fullres_bsN (inherits_from "
            "3d_fullres, same preprocessed data) and, with --compact, a compact configuration "
            "(own spacing, patch, network and preprocessed data). Sizes are in (z, y, x) order."
        ),
    )
    p.add_argument("-d", "--dataset", required=True, help="dataset id or DatasetXXX_NAME")
    p.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[], metavar="N", help="add 3d_fullres_bsN"
    )
    p.add_argument(
        "--compact", action="store_true", help="add the compact configuration 3d_compact"
    )
    p.add_argument(
        "--compact-features",
        type=int,
        nargs="+",
        default=[32, 64, 128, 256],
        metavar="F",
        help="features per stage; the count is the number of stages (default 32 64 128 256)",
    )
    p.add_argument(
        "--compact-patch",
        type=int,
        nargs=3,
        metavar=("Z", "Y", "X"),
        help="patch size in voxels (default 96 128 128, clipped to the median image shape)",
    )
    p.add_argument(
        "--compact-spacing",
        type=float,
        nargs=3,
        metavar=("Z", "Y", "X"),
        help="target spacing in mm (default 3.0 2.0 2.0, no axis finer than 3d_fullres)",
    )
    p.add_argument("--compact-batch-size", type=int, default=2, help="batch size (default 2)")
    p.add_argument(
        "--compact-batch-dice",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Dice loss over the whole batch (default on)",
    )
    p.add_argument(
        "--preprocess",
        choices=["all", "compact", "none"],
        default="all",
        help="what to preprocess: all (3d_fullres + compact), compact only, or none",
    )
    p.add_argument(
        "--num-processes",
        type=int,
        default=2,
        help="fingerprint/preprocessing processes (default 2)",
    )
    p.add_argument("--gpu-memory-gb", type=float, help="nnU-Net planner's GPU memory target (8)")
    p.add_argument(
        "--ct-normalization",
        choices=["dataset", "flare24"],
        default="dataset",
        help="CT clip/z-score values: this dataset's foreground percentiles (nnU-Net's "
        "default) or the full FLARE24 training set's (-900..619 HU; for subsets/synthetic data)",
    )
    p.add_argument(
        "--resenc",
        nargs="+",
        choices=["M", "L"],
        default=[],
        metavar="SIZE",
        help="also plan nnU-Net's residual-encoder presets M and/or L (nnUNetPlannerResEncM/L, "
        "nnU-Net's recommendation since 2024; train/export with -p resenc-m / resenc-l). "
        "Their 3d_fullres shares the default plans' preprocessed data and gets the same "
        "--batch-sizes variants",
    )
    p.add_argument("--verify", action="store_true", help="run nnU-Net's dataset integrity check")
    p.add_argument(
        "--clean",
        action="store_true",
        help="recompute the dataset fingerprint even when it is newer than the converted "
        "dataset (default: reuse it)",
    )
    p.add_argument("--plans", default=DEFAULT_PLANS, help=argparse.SUPPRESS)
    p.set_defaults(handler=_run_plan)


def _whole_number_at_least(minimum: int) -> Callable[[str], int]:
    """Argparse type: an integer of at least ``minimum`` (below it is a usage error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


#: Argparse types: 0 and negatives, or negatives only, are usage errors.
positive_int = _whole_number_at_least(1)
non_negative_int = _whole_number_at_least(0)


def _plans_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-p",
        "--plans",
        default=DEFAULT_PLANS,
        metavar="PLANS",
        help="plans: default (nnUNetPlans), resenc-m or resenc-l (nnU-Net's residual-encoder "
        "presets, see `plan --resenc`), or a plans identifier (default: nnUNetPlans)",
    )


def _add_train(sub, common) -> None:
    p = sub.add_parser(
        "train",
        parents=[common],
        help="train folds with nnU-Net's nnUNetTrainer (resumable; DDP with --num-gpus)",
        description=(
            "Train with nnU-Net's own nnUNetTrainer. --batch-size N trains <config>_bsN, a "
            "configuration inheriting from -c that changes only the batch size (added to the "
            "plans when the request is accepted; preprocessed data shared). A resumable "
            "checkpoint_latest.pth is written atomically every --checkpoint-every epochs; "
            "SIGTERM or SIGINT stops at the next iteration with a checkpoint and exits "
            "non-zero with the command that continues. -f cv trains nnU-Net's folds 0-4 one "
            "after another (one per GPU with several GPUs), validates each (lesion DSC/NSD) "
            "and writes the cross-validation summary; rerun with --continue after an "
            "interruption. A fold that already holds a training is never restarted silently: "
            "--continue or --restart."
        ),
    )
    p.add_argument("-d", "--dataset", required=True, help="dataset id or DatasetXXX_NAME")
    p.add_argument("-c", "--configuration", default="3d_fullres", help="configuration (3d_fullres)")
    p.add_argument(
        "-f",
        "--folds",
        "--fold",
        nargs="+",
        default=["all"],
        metavar="FOLD",
        help="all (every case), 0-4, or cv (= 0 1 2 3 4); several run one after another "
        "(default all)",
    )
    _plans_option(p)
    p.add_argument(
        "--batch-size", type=positive_int, help="train <config>_bsN with this batch size"
    )
    p.add_argument("--epochs", type=positive_int, help="epochs (nnU-Net default 1000)")
    p.add_argument(
        "--iterations-per-epoch", type=positive_int, help="train iterations per epoch (250)"
    )
    p.add_argument(
        "--val-iterations", type=positive_int, help="validation iterations per epoch (50)"
    )
    p.add_argument(
        "--num-gpus", type=positive_int, default=1, help="GPUs per fold; more than 1 uses DDP"
    )
    start = p.add_mutually_exclusive_group()
    start.add_argument(
        "--continue",
        dest="resume",
        action="store_true",
        help="continue from the newest readable checkpoint (final, latest or best: the one "
        "with most epochs); with several folds, skip the finished ones",
    )
    start.add_argument(
        "--restart",
        action="store_true",
        help="start over; an existing fold folder is kept, renamed fold_X.replaced-DATE",
    )
    p.add_argument(
        "--checkpoint-every",
        type=positive_int,
        default=1,
        metavar="EPOCHS",
        help="write the resumable checkpoint_latest.pth every this many epochs (atomically: "
        "a crash mid-save keeps the previous one; default 1, nnU-Net's own is 50)",
    )
    p.add_argument(
        "--device",
        choices=["auto", "cuda", "cpu"],
        default="auto",
        help="training device (auto: cuda when available)",
    )
    p.add_argument(
        "--validate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="after training, nnU-Net's validation of the fold's validation cases plus the "
        "challenge's lesion DSC/NSD (default: on with several folds, off with one)",
    )
    p.add_argument(
        "--parallel-folds",
        type=positive_int,
        metavar="N",
        help="folds trained at the same time, one process each (default: one per visible GPU "
        "with --device cuda, else 1)",
    )
    p.add_argument(
        "--export",
        type=Path,
        metavar="MODEL",
        help="after the folds: export them as a model folder (the 5-fold ensemble with -f cv)",
    )
    p.add_argument("--export-slim", action="store_true", help="export without optimizer state")
    p.add_argument(
        "--oversample-foreground",
        type=float,
        help="share of each batch centred on foreground (nnU-Net default 0.33)",
    )
    p.add_argument(
        "--seed", type=int, help="seed python/numpy/torch (reproducible with --da-workers 0)"
    )
    p.add_argument(
        "--threads",
        type=positive_int,
        help="torch CPU threads for CPU training (default: all cores; 1 on a busy shared machine)",
    )
    p.add_argument(
        "--da-workers",
        type=non_negative_int,
        help="data-augmentation processes per GPU (nnUNet_n_proc_DA); 0: in the training process",
    )
    p.add_argument(
        "--num-processes",
        type=positive_int,
        default=2,
        help="processes for the final validation (2)",
    )
    p.add_argument("--no-progress", action="store_true", help="no per-epoch progress bar")
    p.set_defaults(handler=_run_train)


def _add_export(sub, common) -> None:
    p = sub.add_parser(
        "export",
        parents=[common],
        help="trained output -> model folder (plans.json, dataset.json, fold_X/, manifest.json)",
        description=(
            "Write a standard nnU-Net v2 model folder MODEL/plans.json, MODEL/dataset.json, "
            "MODEL/fold_X/checkpoint_final.pth and MODEL/manifest.json (what it was trained "
            "with, the folds' validation and the cross-validation summary when there is one). "
            "--slim drops the optimizer state (still loadable by nnUNetPredictor). "
            "--overwrite replaces only a folder this command wrote itself (recognised by its "
            "manifest and holding nothing else); any other folder is refused."
        ),
    )
    p.add_argument("-d", "--dataset", required=True, help="dataset id or DatasetXXX_NAME")
    p.add_argument("-c", "--configuration", default="3d_fullres", help="configuration (3d_fullres)")
    p.add_argument(
        "-f", "--folds", nargs="+", default=["all"], help="folds to export: all, 0-4, cv (all)"
    )
    _plans_option(p)
    p.add_argument("--batch-size", type=positive_int, help="the --batch-size given to train")
    p.add_argument("-o", "--output", type=Path, required=True, help="model folder to write")
    p.add_argument("--include-best", action="store_true", help="also copy checkpoint_best.pth")
    p.add_argument("--slim", action="store_true", help="drop optimizer/grad-scaler state")
    p.add_argument(
        "--overwrite", action="store_true", help="replace a model folder written by export"
    )
    p.set_defaults(handler=_run_export)


EVALUATION_COMMANDS = {
    "evaluate": "lesion DSC/NSD of predictions vs ground truth (= python -m evaluation evaluate)",
    "select": "accuracy + time/memory per model (= python -m evaluation select)",
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with its subcommands."""
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description=(
            "nnU-Net v2 training for FLARE24 Task 1 with enlarged batch sizes: convert a "
            "FLARE24-style folder, plan and preprocess, train, export a model folder."
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _common()
    _add_convert(sub, common)
    _add_plan(sub, common)
    _add_train(sub, common)
    _add_export(sub, common)
    # the evaluation package's commands, reachable from here too (see main)
    for name, text in EVALUATION_COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)
    return parser


def _run_convert(args: argparse.Namespace, workspace: Workspace) -> int:
    from training.convert import convert_dataset, print_report, source_folders

    images, labels, unlabeled = source_folders(args.input, args.images, args.labels, args.unlabeled)
    report = convert_dataset(
        workspace,
        images,
        labels,
        args.dataset_id,
        args.name,
        unlabeled_dir=unlabeled,
        tolerance=args.tolerance,
        decode_images=not args.header_only,
        workers=args.workers,
        overwrite=args.overwrite,
        strict=args.strict,
    )
    print_report(report, sys.stdout, sys.stderr)
    if not report.written:
        print(
            f"error: {len(report.skipped)} pairs failed the checks; --strict: nothing written",
            file=sys.stderr,
        )
        return EXIT_FAILED
    return EXIT_OK


def _run_plan(args: argparse.Namespace, workspace: Workspace) -> int:
    import json

    from training.interrupt import TrainingInterrupted, stop_request
    from training.plan import CompactSpec, describe_configurations, plan_dataset

    compact = None
    if args.compact:
        compact = CompactSpec(
            features=tuple(args.compact_features),
            patch_zyx=tuple(args.compact_patch) if args.compact_patch else None,
            spacing_zyx_mm=tuple(args.compact_spacing) if args.compact_spacing else None,
            batch_size=args.compact_batch_size,
            batch_dice=args.compact_batch_dice,
        )
    # SIGTERM raises here, like Ctrl-C: nnU-Net's `with Pool(...)` terminates its workers on
    # the way out, which the default action would leave running (with the resource tracker).
    with stop_request():
        try:
            result = plan_dataset(
                workspace,
                args.dataset,
                batch_sizes=args.batch_sizes,
                compact=compact,
                num_processes=args.num_processes,
                preprocess=args.preprocess,
                gpu_memory_gb=args.gpu_memory_gb,
                plans_name=args.plans,
                verify=args.verify,
                ct_normalization=args.ct_normalization,
                resenc=args.resenc,
                clean=args.clean,
            )
        except TrainingInterrupted as err:
            raise TrainingInterrupted(err.signum, kept="planning did not finish") from None
    dataset_json = json.loads((result.plans_file.parent / "dataset.json").read_text())
    if result.fingerprint_reused:
        print("dataset fingerprint up to date: reused (--clean recomputes it)")
    for line in result.stale:
        print(f"warning: {line}", file=sys.stderr)
    for plans_file, names in [(result.plans_file, result.configurations), *result.resenc.items()]:
        plans = json.loads(plans_file.read_text())
        print(f"plans: {plans_file}")
        for line in describe_configurations(plans, dataset_json, names):
            print(line)
    return EXIT_OK


def _resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _train_header(runs) -> str:
    first = runs[0]
    folds = ", ".join(r.fold for r in runs)
    cases = "/".join(str(r.num_training_cases) for r in runs)
    return (
        f"training {first.dataset} {first.configuration} fold{'s' if len(runs) > 1 else ''} "
        f"{folds}: batch size {first.batch_size}, {first.epochs} epochs x "
        f"{first.iterations_per_epoch} iterations, {cases} training cases, {first.device}"
        + (f" x {first.num_gpus} (DDP)" if first.num_gpus > 1 else "")
        + f", checkpoint every {first.checkpoint_every} epoch(s)"
    )


def _run_train(args: argparse.Namespace, workspace: Workspace) -> int:
    from training.crossval import folds_kept
    from training.interrupt import TrainingInterrupted
    from training.train import parse_folds, prepare

    device = _resolve_device(args.device)
    several = len(parse_folds(args.folds)) > 1
    runs = prepare(
        workspace,
        args.dataset,
        args.configuration,
        folds=args.folds,
        batch_size=args.batch_size,
        epochs=args.epochs,
        iterations_per_epoch=args.iterations_per_epoch,
        val_iterations=args.val_iterations,
        device=device,
        num_gpus=args.num_gpus,
        resume=args.resume,
        restart=args.restart,
        validate=several if args.validate is None else args.validate,
        checkpoint_every=args.checkpoint_every,
        oversample_foreground=args.oversample_foreground,
        seed=args.seed,
        threads=args.threads,
        plans_name=plans_identifier(args.plans),
        progress=not args.no_progress,
        num_processes=args.num_processes,
    )
    print(_train_header(runs), flush=True)
    try:
        _train_runs(args, workspace, runs, several, device)
    except TrainingInterrupted as err:
        if err.checkpoint is not None or err.kept is not None:
            raise
        raise TrainingInterrupted(err.signum, kept=folds_kept(runs)) from None
    return EXIT_OK


def _train_runs(
    args: argparse.Namespace, workspace: Workspace, runs, several: bool, device: str
) -> None:
    """Train the prepared folds, print their summary, export when asked."""
    from training.crossval import crossval_summary, default_parallel, run_folds, summary_lines
    from training.train import train

    if not several:
        summary = train(runs[0])
        if summary is not None:
            print(
                f"done: {summary['epochs_done']} epochs, last train loss "
                f"{summary['last_train_loss']}, best EMA pseudo Dice "
                f"{summary['best_ema_pseudo_dice']}; {summary['checkpoint']}"
            )
    else:
        parallel = args.parallel_folds or default_parallel(device, args.num_gpus, len(runs))
        run_folds(runs, parallel)
        trainer_folder = workspace.trainer_folder(
            runs[0].dataset, runs[0].configuration, runs[0].plans
        )
        summary = crossval_summary(trainer_folder, [r.fold for r in runs])
        for line in summary_lines(summary) if summary else []:
            print(line)
    if args.export is not None:
        _export_trained(workspace, runs, args.export, args.export_slim)


def _export_trained(workspace: Workspace, runs, output: Path, slim: bool) -> None:
    from training.export import export_model

    model = export_model(
        workspace,
        runs[0].dataset,
        runs[0].configuration,
        output,
        folds=[r.fold for r in runs],
        slim=slim,
        plans_name=runs[0].plans,
        overwrite=True,  # only ever replaces an earlier export (see export.output_kind)
    )
    print(f"model written to {model} (folds {', '.join(r.fold for r in runs)})")


def _run_export(args: argparse.Namespace, workspace: Workspace) -> int:
    from training.export import export_model

    model = export_model(
        workspace,
        args.dataset,
        args.configuration,
        args.output,
        folds=args.folds,
        batch_size=args.batch_size,
        include_best=args.include_best,
        slim=args.slim,
        plans_name=plans_identifier(args.plans),
        overwrite=args.overwrite,
    )
    size_mb = sum(p.stat().st_size for p in model.rglob("*") if p.is_file()) / 2**20
    print(f"model written to {model} ({size_mb:.1f} MB)")
    return EXIT_OK


def continue_command(argv: list[str]) -> str:
    """The command that continues an interrupted ``train`` (``--restart`` -> ``--continue``)."""
    kept = [a for a in argv if a != "--restart"]
    if "--continue" not in kept:
        kept.append("--continue")
    return shlex.join(["python", "-m", "training", *kept])


def _interrupted_line(err, argv: list[str]) -> str:
    if err.checkpoint is not None:
        saved = f"checkpoint {err.checkpoint} holds {err.epochs_done} finished epochs"
    else:
        saved = err.kept or "stopped before the end"
    if argv and argv[0] == "train":
        return f"interrupted by {err.signal_name}: {saved}; continue with: {continue_command(argv)}"
    if err.finished:
        return f"interrupted by {err.signal_name}: {saved}"
    again = shlex.join(["python", "-m", "training", *argv])
    return f"interrupted by {err.signal_name}: {saved}; run it again: {again}"


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the subcommand; returns the exit status."""
    from inference.nifti import NiftiError
    from training.interrupt import TrainingInterrupted
    from training.workspace import TrainingError, set_process_counts

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in EVALUATION_COMMANDS:
        from evaluation.cli import main as evaluation_main

        return evaluation_main(argv)
    args = build_parser().parse_args(argv)
    workspace = Workspace(args.work).activate()
    set_process_counts(getattr(args, "num_processes", 2), getattr(args, "da_workers", None))
    try:
        return args.handler(args, workspace)
    except (WorkspaceError, TrainingError, NiftiError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILED
    except TrainingInterrupted as err:
        print(_interrupted_line(err, argv), file=sys.stderr)
        return err.exit_status
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
