"""Train a configuration, fold by fold, with nnU-Net's own ``nnUNetTrainer`` (and its DDP).

The trainer class is nnU-Net's, unchanged: checkpoints record the trainer's class name and
``nnUNetPredictor`` looks the class up by that name when it loads an exported model, so a
subclass would make our models unloadable elsewhere. What we need beyond its defaults is
set on the instance before it is initialised: epochs and iterations (the poly learning-rate
schedule reads ``num_epochs``), the checkpoint cadence (``save_every``) and atomic
checkpoint writes (``training.checkpoints``). The epoch loop is ours
(``training.epochs``: progress bar, out-of-memory message, stop on SIGTERM/SIGINT with a
resumable checkpoint); the final validation adds the challenge's lesion DSC/NSD
(``training.validation``).

An alternate batch size is a plans configuration ``<config>_bsN`` that inherits from the
configuration and changes only the batch size, so the preprocessed data is shared. It is
written to the plans file only once every check of the request has passed.

What a ``train`` command may do with a fold folder that already holds a run is decided by
``training.fold_state``: continue it (``--continue``), set it aside and start over
(``--restart``), or refuse.
"""

from __future__ import annotations

import json
import os
import random
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from inference.atomic import remove_stale_temporaries
from training.checkpoints import (
    FINAL,
    make_saves_atomic,
    newest_checkpoint,
    readable_checkpoints,
)
from training.fold_state import (
    FoldBusyError,
    FoldState,
    acquire_lock,
    inspect_fold,
    other_plans_line,
    plans_mismatch,
    release_lock,
    set_aside,
)
from training.interrupt import TrainingInterrupted, stop_request
from training.plan import add_batch_size_configuration, resolve_configuration
from training.preprocessed import check_data
from training.workspace import (
    DEFAULT_PLANS,
    TRAINER_NAME,
    TrainingError,
    Workspace,
    WorkspaceError,
)

__all__ = ["TrainSettings", "TrainingError", "TrainingInterrupted", "prepare", "train"]

#: Written next to the checkpoints: what the run was asked to do (read by ``export``).
SETTINGS_FILE = "training_settings.json"
#: nnU-Net's defaults (nnUNetTrainer.__init__), used when a fresh run does not set them.
NNUNET_EPOCHS, NNUNET_ITERATIONS, NNUNET_VAL_ITERATIONS = 1000, 250, 50
#: nnU-Net's seed for its 5-fold split (nnUNetTrainer.do_split).
SPLIT_SEED = 12345
#: nnU-Net's cross-validation: folds 0-4 of ``generate_crossval_split``.
CV_FOLDS = ("0", "1", "2", "3", "4")
#: Default checkpoint cadence (epochs); nnU-Net's own is 50.
CHECKPOINT_EVERY = 1


@dataclass
class TrainSettings:
    """Everything one fold's training needs; picklable, so DDP workers receive it as is.

    Attributes:
        work: the work folder root.
        dataset: dataset folder name (``DatasetXXX_NAME``).
        configuration: the configuration trained (after ``--batch-size`` resolution).
        fold: ``"all"`` or a fold number.
        batch_size: the (global) batch size of ``configuration``.
        epochs: number of epochs.
        iterations_per_epoch: training iterations per epoch.
        val_iterations: validation iterations per epoch (pseudo Dice).
        device: ``cpu`` or ``cuda``.
        num_gpus: number of GPUs (more than one: nnU-Net DDP).
        resume: continue from the newest readable checkpoint of this fold.
        restart: set an existing run of this fold aside and start over.
        validate: run nnU-Net's final validation and the lesion DSC/NSD after training.
        checkpoint_every: write ``checkpoint_latest.pth`` every this many epochs.
        oversample_foreground: share of each batch centred on foreground (nnU-Net's
            ``oversample_foreground_percent``, 0.33 by default); None keeps nnU-Net's.
        seed: seeds python, numpy and torch in every process (None: not seeded).
        threads: torch CPU threads (CPU training).
        plans: plans identifier.
        progress: per-epoch progress bars.
        num_processes: worker processes of the final validation (export, metrics).
        num_training_cases: training cases of this fold.
        command: the command line, for the record.
    """

    work: str
    dataset: str
    configuration: str
    fold: str
    batch_size: int
    epochs: int
    iterations_per_epoch: int
    val_iterations: int
    device: str = "cuda"
    num_gpus: int = 1
    resume: bool = False
    restart: bool = False
    validate: bool = False
    checkpoint_every: int = CHECKPOINT_EVERY
    oversample_foreground: float | None = None
    seed: int | None = None
    threads: int | None = None
    plans: str = DEFAULT_PLANS
    progress: bool = True
    num_processes: int = 2
    num_training_cases: int = 0
    command: list[str] = field(default_factory=list)

    @property
    def fold_value(self) -> int | str:
        """The fold as nnU-Net's trainer takes it."""
        return "all" if self.fold == "all" else int(self.fold)


@dataclass(frozen=True)
class Schedule:
    """Epochs, training iterations per epoch and validation iterations per epoch."""

    epochs: int | None
    iterations_per_epoch: int | None
    val_iterations: int | None


# --------------------------------------------------------------------------- folds


def parse_fold(fold: str) -> str:
    """Validate a fold argument: ``all`` or a non-negative integer (as a string)."""
    if fold == "all":
        return fold
    try:
        value = int(fold)
    except ValueError:
        raise WorkspaceError(f"fold must be 'all', 'cv' or a number, got {fold!r}") from None
    if value < 0:
        raise WorkspaceError(f"fold must be 'all', 'cv' or a number >= 0, got {fold!r}")
    return str(value)


def parse_folds(folds: Sequence[str]) -> list[str]:
    """Expand ``cv`` to nnU-Net's folds 0-4 and validate the rest; order kept, no repeats."""
    expanded = []
    for fold in folds:
        expanded += list(CV_FOLDS) if fold == "cv" else [parse_fold(fold)]
    if not expanded:
        raise WorkspaceError("no fold given")
    return list(dict.fromkeys(expanded))


def case_identifiers(data_folder: Path) -> list[str]:
    """Case names in a preprocessed data folder (the ``.pkl`` property files nnU-Net writes)."""
    return sorted(p.name[: -len(".pkl")] for p in data_folder.glob("*.pkl"))


def training_cases(preprocessed_dataset: Path, data_folder: Path, fold: str) -> list[str]:
    """The cases nnU-Net's trainer will train on for ``fold`` (its ``do_split``, no writes).

    ``all`` trains on every case; fold k uses ``splits_final.json`` when present and
    otherwise nnU-Net's seeded 5-fold split; folds beyond the split file get nnU-Net's
    seeded random 80:20 split.

    Raises:
        TrainingError: a numbered fold without a split file and fewer than 5 cases (nnU-Net's
            5-fold split cannot be made).
    """
    cases = case_identifiers(data_folder)
    if fold == "all":
        return cases
    k = int(fold)
    splits_file = preprocessed_dataset / "splits_final.json"
    if splits_file.is_file():
        splits = json.loads(splits_file.read_text())
    else:
        if len(cases) < len(CV_FOLDS):
            raise TrainingError(
                f"fold {fold} needs nnU-Net's 5-fold split, which needs at least 5 cases; the "
                f"dataset has {len(cases)} (use -f all, or write {splits_file})"
            )
        from nnunetv2.utilities.crossval_split import generate_crossval_split

        splits = generate_crossval_split(cases, seed=SPLIT_SEED, n_splits=len(CV_FOLDS))
    if k < len(splits):
        return sorted(splits[k]["train"])
    rnd = np.random.RandomState(seed=SPLIT_SEED + k)
    return sorted(cases[i] for i in rnd.choice(len(cases), int(len(cases) * 0.8), replace=False))


# --------------------------------------------------------------------------- prepare


def _read_plans(workspace: Workspace, name: str, plans_name: str) -> tuple[Path, dict]:
    plans_file = workspace.plans_file(name, plans_name)
    if not plans_file.is_file():
        raise WorkspaceError(f"no plans {plans_file} (run `python -m training plan` first)")
    return plans_file, json.loads(plans_file.read_text())


def _batch_configuration(
    plans: dict, configuration: str, batch_size: int | None
) -> tuple[str, bool]:
    """The configuration to train and whether it is new (added to ``plans`` in memory)."""
    resolve_configuration(plans, configuration)  # raises for an unknown configuration
    if batch_size is None:
        return configuration, False
    existing = set(plans["configurations"])
    name = add_batch_size_configuration(plans, configuration, batch_size)
    return name, name not in existing


def _preprocessed_data(
    workspace: Workspace, name: str, plans: dict, plans_name: str, configuration: str
) -> Path:
    """The configuration's preprocessed data, checked complete and made with ``plans``."""
    data_folder = (
        workspace.preprocessed
        / name
        / resolve_configuration(plans, configuration)["data_identifier"]
    )
    if not data_folder.is_dir() or not case_identifiers(data_folder):
        raise WorkspaceError(
            f"configuration {configuration} has no preprocessed data in {data_folder} (run "
            f"`python -m training plan` with the matching options)"
        )
    check_data(data_folder, workspace.raw / name, plans, plans_name, configuration)
    return data_folder


def _check_device(device: str, num_gpus: int, global_batch: int) -> None:
    import torch

    if device not in ("cpu", "cuda"):
        raise TrainingError(f"device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise TrainingError("--device cuda but no CUDA GPU is available (use --device cpu)")
    if num_gpus < 1:
        raise TrainingError(f"--num-gpus must be at least 1, got {num_gpus}")
    if num_gpus == 1:
        return
    if device != "cuda":
        raise TrainingError("nnU-Net's DDP training (--num-gpus > 1) needs --device cuda")
    if num_gpus > torch.cuda.device_count():
        raise TrainingError(
            f"--num-gpus {num_gpus} but only {torch.cuda.device_count()} GPUs are visible"
        )
    if global_batch < num_gpus:
        raise TrainingError(
            f"batch size {global_batch} is smaller than --num-gpus {num_gpus}; nnU-Net splits "
            f"the batch over the GPUs"
        )


def _check_numbers(
    oversample_foreground: float | None,
    checkpoint_every: int,
    requested: dict[str, int | None],
) -> None:
    if oversample_foreground is not None and not 0.0 <= oversample_foreground <= 1.0:
        raise TrainingError(
            f"--oversample-foreground must be in [0, 1], got {oversample_foreground}"
        )
    if checkpoint_every < 1:
        raise TrainingError(f"--checkpoint-every must be at least 1, got {checkpoint_every}")
    for key, value in requested.items():
        if value is not None and value < 1:
            raise TrainingError(f"--{key.replace('_', '-')} must be at least 1, got {value}")


def _check_batch(global_batch: int, cases: list[str], fold: str) -> None:
    if global_batch > len(cases):
        raise TrainingError(
            f"batch size {global_batch} is larger than the {len(cases)} training cases of fold "
            f"{fold}; every batch would repeat cases (use --batch-size {len(cases)} or less)"
        )


def check_existing(
    state: FoldState, fold: str, configuration: str, resume: bool, restart: bool
) -> None:
    """Refuse a request that would silently restart, or touch a fold being trained now.

    Raises:
        TrainingError: the fold is being trained; or it holds a run and neither
            ``--continue`` nor ``--restart`` was given; or ``--continue`` finds only
            unreadable checkpoints.
    """
    what = f"fold {fold} of {configuration}"
    if state.running:
        raise TrainingError(
            f"{what} is being trained now by {state.running}; wait for it, or stop it (SIGTERM "
            f"writes a checkpoint) and then --continue"
        )
    if state.has_training and not (resume or restart):
        raise TrainingError(
            f"{what} already has a training ({state.describe()}) in {state.folder}; pass "
            f"--continue to continue it, or --restart to start over (the old folder is kept, "
            f"renamed)"
        )
    if resume and state.newest is None and state.broken:
        path, reason = state.broken[0]
        raise TrainingError(
            f"{what} has no readable checkpoint to continue from ({path.name}: {reason}); "
            f"--restart starts over"
        )


def check_continued_plans(runs: list[TrainSettings], plans: dict, plans_name: str) -> None:
    """Refuse to continue (or skip as finished) folds trained with other plans than today's.

    After a re-plan, continuing such a fold trains its network on differently preprocessed
    data (or fails to load it: another network), and a finished one would be exported
    beside folds trained with the new plans.

    Raises:
        TrainingError: naming the folds, in one line.
    """
    differing: dict[str, str] = {}
    for settings in runs:
        newest = newest_checkpoint(fold_folder(settings)) if settings.resume else None
        if newest is None:
            continue
        try:
            difference = plans_mismatch(newest.path, plans, settings.configuration)
        except Exception:  # unreadable since inspected: the trainer reports it when loading
            continue
        if difference is not None:
            differing[settings.fold] = difference
    if differing:
        them = "them" if len(differing) > 1 else "it"
        raise TrainingError(
            other_plans_line(differing, runs[0].configuration, f"{plans_name}.json now")
            + f"; --continue would mix the two: train {them} again with --restart, "
            "or plan as before"
        )


def _schedule(
    epochs: int | None,
    iterations_per_epoch: int | None,
    val_iterations: int | None,
    previous: dict | None,
) -> Schedule:
    """Given values, else (when continuing) the run's own, else nnU-Net's defaults."""
    previous = previous or {}

    def pick(given: int | None, key: str, default: int) -> int:
        if given is not None:
            return given
        recorded = previous.get(key)
        return int(recorded) if recorded is not None else default

    return Schedule(
        pick(epochs, "epochs", NNUNET_EPOCHS),
        pick(iterations_per_epoch, "iterations_per_epoch", NNUNET_ITERATIONS),
        pick(val_iterations, "val_iterations", NNUNET_VAL_ITERATIONS),
    )


def _fold_settings(
    template: TrainSettings, fold: str, data_folder: Path, requested: Schedule, resume: bool
) -> TrainSettings:
    """The settings of one fold: its cases checked, its folder's state checked, its schedule."""
    workspace = Workspace(Path(template.work))
    cases = training_cases(workspace.preprocessed / template.dataset, data_folder, fold)
    _check_batch(template.batch_size, cases, fold)
    folder = workspace.trainer_folder(template.dataset, template.configuration, template.plans)
    state = inspect_fold(folder / f"fold_{fold}")
    check_existing(state, fold, template.configuration, resume, template.restart)
    continuing = resume and state.has_training
    schedule = _schedule(
        requested.epochs,
        requested.iterations_per_epoch,
        requested.val_iterations,
        read_settings(state.folder) if continuing else None,
    )
    return replace(
        template,
        fold=fold,
        epochs=schedule.epochs,
        iterations_per_epoch=schedule.iterations_per_epoch,
        val_iterations=schedule.val_iterations,
        resume=continuing,
        num_training_cases=len(cases),
    )


def _check_network_names(resolved: dict, configuration: str) -> None:
    """Refuse plans whose architecture names anything but a network class or layer.

    nnU-Net's trainer imports every dotted name of the architecture and calls it with
    the plans' arguments (``"nonlin": "os.system"`` would run a command), so the names
    pass the predictor's allowlist first; nothing is imported beyond dynamic_network_
    architectures and torch.nn.

    Raises:
        TrainingError: a name is refused or cannot be imported.
    """
    from inference.model import ModelError, NameRefused, resolve_architecture

    try:
        resolve_architecture(resolved)
    except NameRefused as err:
        raise TrainingError(f"configuration {configuration}: {err.reason}") from None
    except ModelError as err:
        raise TrainingError(f"configuration {configuration}: {err}") from None


def prepare(
    workspace: Workspace,
    dataset: str,
    configuration: str,
    folds: Sequence[str] = ("all",),
    batch_size: int | None = None,
    epochs: int | None = None,
    iterations_per_epoch: int | None = None,
    val_iterations: int | None = None,
    device: str = "cuda",
    num_gpus: int = 1,
    resume: bool = False,
    restart: bool = False,
    validate: bool = False,
    checkpoint_every: int = CHECKPOINT_EVERY,
    oversample_foreground: float | None = None,
    seed: int | None = None,
    threads: int | None = None,
    plans_name: str = DEFAULT_PLANS,
    progress: bool = True,
    num_processes: int = 2,
) -> list[TrainSettings]:
    """Check a training request and turn it into one settings object per fold.

    Nothing is written unless every check passes; then a new ``<config>_bsN`` is added to
    the plans file.

    Raises:
        WorkspaceError: missing dataset, plans, configuration or preprocessed data.
        TrainingError: a value or batch size that cannot work, a device that is not there,
            a fold being trained now, or a fold with a run and neither continue nor restart.
    """
    if resume and restart:
        raise TrainingError("--continue and --restart exclude each other")
    _check_numbers(
        oversample_foreground,
        checkpoint_every,
        {
            "epochs": epochs,
            "iterations_per_epoch": iterations_per_epoch,
            "val_iterations": val_iterations,
        },
    )
    name = workspace.resolve_dataset(dataset)
    folds = parse_folds(folds)
    plans_file, plans = _read_plans(workspace, name, plans_name)
    configuration, is_new = _batch_configuration(plans, configuration, batch_size)
    resolved = resolve_configuration(plans, configuration)
    _check_network_names(resolved, configuration)
    data_folder = _preprocessed_data(workspace, name, plans, plans_name, configuration)
    global_batch = int(resolved["batch_size"])
    _check_device(device, num_gpus, global_batch)

    template = TrainSettings(
        work=str(workspace.root),
        dataset=name,
        configuration=configuration,
        fold="all",
        batch_size=global_batch,
        epochs=0,
        iterations_per_epoch=0,
        val_iterations=0,
        device=device,
        num_gpus=num_gpus,
        restart=restart,
        validate=validate,
        checkpoint_every=checkpoint_every,
        oversample_foreground=oversample_foreground,
        seed=seed,
        threads=threads,
        plans=plans_name,
        progress=progress,
        num_processes=num_processes,
        command=list(sys.argv),
    )
    requested = Schedule(epochs, iterations_per_epoch, val_iterations)
    runs = [_fold_settings(template, fold, data_folder, requested, resume) for fold in folds]
    check_continued_plans(runs, plans, plans_name)
    if is_new:
        plans_file.write_text(json.dumps(plans, indent=4) + "\n")
    return runs


# --------------------------------------------------------------------------- records


def fold_folder(settings: TrainSettings) -> Path:
    """The trainer's output folder for this run (checkpoints, logs)."""
    return (
        Workspace(Path(settings.work)).trainer_folder(
            settings.dataset, settings.configuration, settings.plans
        )
        / f"fold_{settings.fold}"
    )


def read_settings(folder: Path) -> dict | None:
    """The ``training_settings.json`` of a fold folder, or None."""
    path = folder / SETTINGS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def write_settings(settings: TrainSettings, **extra) -> Path:
    """Record the settings (and ``extra`` fields) in the fold folder (atomically)."""
    import nnunetv2
    import torch

    from inference.atomic import write_json_atomically

    folder = fold_folder(settings)
    folder.mkdir(parents=True, exist_ok=True)
    record = asdict(settings)
    record.update(
        {
            "trainer": TRAINER_NAME,
            "nnunetv2_version": getattr(nnunetv2, "__version__", None) or _version("nnunetv2"),
            "torch_version": torch.__version__,
            "written": datetime.now(UTC).isoformat(timespec="seconds"),
        }
    )
    record.update(extra)
    path = folder / SETTINGS_FILE
    write_json_atomically(path, record)
    return path


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


# --------------------------------------------------------------------------- one process


def build_trainer(settings: TrainSettings):
    """Instantiate nnU-Net's ``nnUNetTrainer`` for the settings (not yet initialised).

    Returns:
        The trainer, with epochs, iterations, checkpoint cadence and atomic saves set on
        the instance.
    """
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    workspace = Workspace(Path(settings.work))
    plans = json.loads(workspace.plans_file(settings.dataset, settings.plans).read_text())
    plans["continue_training"] = settings.resume  # popped by the trainer (logger resume flag)
    dataset_json = json.loads(
        (workspace.preprocessed / settings.dataset / "dataset.json").read_text()
    )
    trainer = nnUNetTrainer(
        plans=plans,
        configuration=settings.configuration,
        fold=settings.fold_value,
        dataset_json=dataset_json,
        device=torch.device(settings.device),
    )
    trainer.num_epochs = settings.epochs
    trainer.num_iterations_per_epoch = settings.iterations_per_epoch
    trainer.num_val_iterations_per_epoch = settings.val_iterations
    trainer.save_every = settings.checkpoint_every
    make_saves_atomic(trainer)
    if settings.oversample_foreground is not None:
        trainer.oversample_foreground_percent = settings.oversample_foreground
    return trainer


def _seed_everything(seed: int | None, rank: int) -> None:
    if seed is None:
        return
    import torch

    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)


def configure_torch(settings: TrainSettings, rank: int) -> None:
    """Seed, and set torch's threads and cuDNN flags as nnU-Net does for the device."""
    import torch

    _seed_everything(settings.seed, rank)
    if settings.device == "cpu":
        torch.set_num_threads(settings.threads or os.cpu_count() or 1)
    else:
        # nnU-Net's own choice for GPU training: CPU threads do not help the GPU.
        torch.set_num_threads(1)
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True


def _resume(trainer, folder: Path, rank: int) -> str | None:
    """Load the newest readable checkpoint; returns its file name (None: nothing to load)."""
    _, broken = readable_checkpoints(folder)
    for path, reason in broken:
        if rank == 0:
            print(f"skipping unreadable {path.name}: {reason}", file=sys.stderr)
    newest = newest_checkpoint(folder)
    if newest is None:
        return None
    try:
        trainer.load_checkpoint(str(newest.path))
    except RuntimeError as err:
        if "size mismatch" not in str(err) and "state_dict" not in str(err):
            raise
        # nnU-Net's network was built from today's plans; the checkpoint's is another one.
        raise TrainingError(
            f"{newest.path} holds another network than the plans build now (re-planned "
            f"since?): {_first_mismatch(err)}; train again with --restart"
        ) from None
    if rank == 0:
        print(f"continuing from {newest.path.name} at epoch {trainer.current_epoch}")
    return newest.path.name


def _first_mismatch(err: RuntimeError) -> str:
    # torch lists every differing tensor on its own line; the first one tells the story.
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return next((ln for ln in lines if ln.startswith("size mismatch")), lines[0] if lines else "")


def _summary(trainer, validation: dict | None) -> dict:
    losses = trainer.logger.get_value("train_losses", step=None)
    return {
        "epochs_done": int(trainer.current_epoch),
        "last_train_loss": float(losses[-1]) if losses else None,
        "best_ema_pseudo_dice": None if trainer._best_ema is None else float(trainer._best_ema),
        "checkpoint": str(Path(trainer.output_folder) / FINAL),
        "validation": validation,
    }


def run_worker(settings: TrainSettings, rank: int = 0) -> dict:
    """Build the trainer, optionally resume, train, optionally validate (one process).

    SIGTERM/SIGINT are caught from the moment the trainer exists: during loading and the
    epoch loop they stop it at the next iteration with a checkpoint (see
    ``training.epochs``); one that comes while the final checkpoint is written ends it
    once that is written; during the final validation they end it at once (it is rerun by
    the next ``--continue``).

    Returns:
        A summary: epochs done, last train loss, best EMA pseudo Dice, final checkpoint
        path, and the validation record (None without ``validate``).

    Raises:
        TrainingInterrupted: a signal arrived.
        TrainingError: out of memory (with the batch size and patch in the message).
    """
    from training.epochs import run_epochs
    from training.validation import describe, validate_fold

    configure_torch(settings, rank)
    with stop_request() as stop:
        trainer = build_trainer(settings)
        folder = Path(trainer.output_folder)
        if rank == 0:
            remove_stale_temporaries(folder)
        with stop.deferred():
            loaded = _resume(trainer, folder, rank) if settings.resume else None
            if trainer.current_epoch < trainer.num_epochs:
                run_epochs(trainer, stop, settings.progress)
            else:
                if loaded is not None and loaded != FINAL:
                    # Stopped after its last epoch, before the final checkpoint was written.
                    trainer.on_train_end()
                if rank == 0:
                    print(
                        f"already trained {trainer.current_epoch} epochs "
                        f"(--epochs {trainer.num_epochs})"
                    )
        validation = validate_fold(trainer, settings.num_processes) if settings.validate else None
        if validation is not None:
            print(describe(validation))
    return _summary(trainer, validation)


def train(settings: TrainSettings) -> dict | None:
    """Run one prepared fold, in this process or in ``num_gpus`` DDP workers.

    Holds the fold's lock for the whole run; with ``restart`` an existing run is first
    renamed (kept) out of the way.

    Returns:
        The summary of ``run_worker`` (None for DDP, whose rank 0 prints it).

    Raises:
        TrainingError: the fold is being trained by another process, out of memory, or a
            DDP worker failed.
        TrainingInterrupted: a signal arrived; a resumable checkpoint was written.
    """
    folder = fold_folder(settings)
    state = inspect_fold(folder)
    check_existing(state, settings.fold, settings.configuration, settings.resume, settings.restart)
    if settings.restart and state.has_training:
        kept = set_aside(folder)
        print(f"fold {settings.fold}: the previous training ({state.describe()}) is kept as {kept}")
    try:
        acquire_lock(folder)
    except FoldBusyError as err:
        raise TrainingError(str(err)) from None
    try:
        write_settings(settings, started=True)
        if settings.num_gpus == 1:
            summary = run_worker(settings)
        else:
            from training.ddp import run_ddp

            summary = run_ddp(settings)
        recorded = {k: v for k, v in (summary or {}).items() if k != "validation"}
        write_settings(settings, finished=True, **recorded)
        return summary
    except TrainingInterrupted as err:
        err = with_newest_checkpoint(err, folder)
        write_settings(settings, interrupted=err.signal_name, epochs_done=err.epochs_done)
        raise err from None
    finally:
        release_lock(folder)


def with_newest_checkpoint(err: TrainingInterrupted, folder: Path) -> TrainingInterrupted:
    """The interruption with the fold's newest checkpoint when it was raised without one.

    A signal during the trainer's set-up, the validation or the final checkpoint's write
    is raised where no checkpoint is known: the fold may still have one (an earlier run's,
    or the final one), and the user is told to continue from it.

    Returns:
        ``err`` itself, or a copy naming the newest checkpoint (unchanged when there is none).
    """
    if err.checkpoint is not None:
        return err
    newest = newest_checkpoint(folder)
    if newest is None:
        return err
    return TrainingInterrupted(err.signum, newest.path, newest.epochs_done, err.kept)
