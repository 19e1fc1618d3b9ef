"""Train one configuration and fold with nnU-Net's own ``nnUNetTrainer`` (and its DDP).

The trainer class is nnU-Net's, unchanged: checkpoints record the trainer's class name and
``nnUNetPredictor`` looks the class up by that name when it loads an exported model, so a
subclass would make our models unloadable elsewhere. Epochs and iterations are set on the
instance before it is initialised (the poly learning-rate schedule reads ``num_epochs``).

The epoch loop below calls the trainer's hooks in the order of
``nnUNetTrainer.run_training`` (nnunetv2 2.8.1); owning the loop gives a progress bar per
epoch and a clear message when the first batch does not fit in GPU memory.

An alternate batch size is a plans configuration ``<config>_bsN`` that inherits from the
configuration and changes only the batch size, so the preprocessed data is shared.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import sys
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from training.plan import add_batch_size_configuration, resolve_configuration
from training.workspace import DEFAULT_PLANS, TRAINER_NAME, Workspace, WorkspaceError

#: Written next to the checkpoints: what the run was asked to do (read by ``export``).
SETTINGS_FILE = "training_settings.json"
#: nnU-Net's defaults (nnUNetTrainer.__init__), used when a fresh run does not set them.
NNUNET_EPOCHS, NNUNET_ITERATIONS, NNUNET_VAL_ITERATIONS = 1000, 250, 50
#: nnU-Net's seed for its 5-fold split (nnUNetTrainer.do_split).
SPLIT_SEED = 12345


class TrainingError(RuntimeError):
    """Training cannot start or stopped; the message is one line for the user."""


@dataclass
class TrainSettings:
    """Everything one training run needs; picklable, so DDP workers receive it as is.

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
        resume: continue from the newest checkpoint of this fold.
        validate: run nnU-Net's final validation on the fold's validation cases.
        oversample_foreground: share of each batch centred on foreground (nnU-Net's
            ``oversample_foreground_percent``, 0.33 by default); None keeps nnU-Net's.
        seed: seeds python, numpy and torch in every process (None: not seeded).
        threads: torch CPU threads (CPU training).
        plans: plans identifier.
        progress: per-epoch progress bars.
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
    validate: bool = False
    oversample_foreground: float | None = None
    seed: int | None = None
    threads: int | None = None
    plans: str = DEFAULT_PLANS
    progress: bool = True
    num_training_cases: int = 0
    command: list[str] = field(default_factory=list)

    @property
    def fold_value(self) -> int | str:
        """The fold as nnU-Net's trainer takes it."""
        return "all" if self.fold == "all" else int(self.fold)


def parse_fold(fold: str) -> str:
    """Validate a fold argument: ``all`` or a non-negative integer (as a string)."""
    if fold == "all":
        return fold
    try:
        value = int(fold)
    except ValueError:
        raise WorkspaceError(f"fold must be 'all' or a number, got {fold!r}") from None
    if value < 0:
        raise WorkspaceError(f"fold must be 'all' or a number >= 0, got {fold!r}")
    return str(value)


def case_identifiers(data_folder: Path) -> list[str]:
    """Case names in a preprocessed data folder (the ``.pkl`` property files nnU-Net writes)."""
    return sorted(p.name[: -len(".pkl")] for p in data_folder.glob("*.pkl"))


def training_cases(preprocessed_dataset: Path, data_folder: Path, fold: str) -> list[str]:
    """The cases nnU-Net's trainer will train on for ``fold`` (its ``do_split``, no writes).

    ``all`` trains on every case; fold k uses ``splits_final.json`` when present and
    otherwise nnU-Net's seeded 5-fold split; folds beyond the split file get nnU-Net's
    seeded random 80:20 split.
    """
    cases = case_identifiers(data_folder)
    if fold == "all":
        return cases
    k = int(fold)
    splits_file = preprocessed_dataset / "splits_final.json"
    if splits_file.is_file():
        splits = json.loads(splits_file.read_text())
    else:
        from nnunetv2.utilities.crossval_split import generate_crossval_split

        splits = generate_crossval_split(cases, seed=SPLIT_SEED, n_splits=5)
    if k < len(splits):
        return sorted(splits[k]["train"])
    rnd = np.random.RandomState(seed=SPLIT_SEED + k)
    return sorted(cases[i] for i in rnd.choice(len(cases), int(len(cases) * 0.8), replace=False))


def prepare(
    workspace: Workspace,
    dataset: str,
    configuration: str,
    fold: str = "all",
    batch_size: int | None = None,
    epochs: int | None = None,
    iterations_per_epoch: int | None = None,
    val_iterations: int | None = None,
    device: str = "cuda",
    num_gpus: int = 1,
    resume: bool = False,
    validate: bool = False,
    oversample_foreground: float | None = None,
    seed: int | None = None,
    threads: int | None = None,
    plans_name: str = DEFAULT_PLANS,
    progress: bool = True,
) -> TrainSettings:
    """Check a training request and turn it into settings; add the batch-size configuration.

    Raises:
        WorkspaceError: missing dataset, plans, configuration or preprocessed data.
        TrainingError: a batch size that cannot work, or a device that is not there.
    """
    import torch

    name = workspace.resolve_dataset(dataset)
    fold = parse_fold(fold)
    plans_file = workspace.plans_file(name, plans_name)
    if not plans_file.is_file():
        raise WorkspaceError(f"no plans {plans_file} (run `python -m training plan` first)")
    plans = json.loads(plans_file.read_text())
    resolve_configuration(plans, configuration)  # raises for an unknown configuration
    if batch_size is not None:
        existing = set(plans["configurations"])
        configuration = add_batch_size_configuration(plans, configuration, batch_size)
        if configuration not in existing:
            plans_file.write_text(json.dumps(plans, indent=4) + "\n")
    resolved = resolve_configuration(plans, configuration)

    data_folder = workspace.preprocessed / name / resolved["data_identifier"]
    if not data_folder.is_dir() or not case_identifiers(data_folder):
        raise WorkspaceError(
            f"configuration {configuration} has no preprocessed data in {data_folder} (run "
            f"`python -m training plan` with the matching options)"
        )
    cases = training_cases(workspace.preprocessed / name, data_folder, fold)
    global_batch = int(resolved["batch_size"])
    if global_batch > len(cases):
        raise TrainingError(
            f"batch size {global_batch} is larger than the {len(cases)} training cases of fold "
            f"{fold}; every batch would repeat cases (use --batch-size {len(cases)} or less)"
        )

    if oversample_foreground is not None and not 0.0 <= oversample_foreground <= 1.0:
        raise TrainingError(
            f"--oversample-foreground must be in [0, 1], got {oversample_foreground}"
        )
    if device not in ("cpu", "cuda"):
        raise TrainingError(f"device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise TrainingError("--device cuda but no CUDA GPU is available (use --device cpu)")
    if num_gpus < 1:
        raise TrainingError(f"--num-gpus must be at least 1, got {num_gpus}")
    if num_gpus > 1:
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

    previous = read_settings(
        workspace.trainer_folder(name, configuration, plans_name) / f"fold_{fold}"
    )
    if resume and previous is not None:
        # Continuing keeps the schedule the run was started with unless told otherwise.
        epochs = epochs or previous.get("epochs")
        iterations_per_epoch = iterations_per_epoch or previous.get("iterations_per_epoch")
        val_iterations = val_iterations or previous.get("val_iterations")
    settings = TrainSettings(
        work=str(workspace.root),
        dataset=name,
        configuration=configuration,
        fold=fold,
        batch_size=global_batch,
        epochs=epochs or NNUNET_EPOCHS,
        iterations_per_epoch=iterations_per_epoch or NNUNET_ITERATIONS,
        val_iterations=val_iterations or NNUNET_VAL_ITERATIONS,
        device=device,
        num_gpus=num_gpus,
        resume=resume,
        validate=validate,
        oversample_foreground=oversample_foreground,
        seed=seed,
        threads=threads,
        plans=plans_name,
        progress=progress,
        num_training_cases=len(cases),
        command=list(sys.argv),
    )
    for key in ("epochs", "iterations_per_epoch", "val_iterations"):
        if getattr(settings, key) < 1:
            raise TrainingError(f"{key.replace('_', ' ')} must be at least 1")
    return settings


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
    """Record the settings (and ``extra`` fields) in the fold folder."""
    import nnunetv2
    import torch

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
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def build_trainer(settings: TrainSettings):
    """Instantiate nnU-Net's ``nnUNetTrainer`` for the settings (not yet initialised).

    Returns:
        The trainer, with epochs and iterations set on the instance.
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
    if settings.oversample_foreground is not None:
        trainer.oversample_foreground_percent = settings.oversample_foreground
    return trainer


def newest_checkpoint(folder: Path) -> Path | None:
    """The checkpoint ``--continue`` starts from, in nnU-Net's order: final, latest, best."""
    for name in ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth"):
        if (folder / name).is_file():
            return folder / name
    return None


def _seed_everything(seed: int | None, rank: int) -> None:
    if seed is None:
        return
    import torch

    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)


def _is_oom(err: BaseException) -> bool:
    import torch

    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def _stop_dataloaders(trainer) -> None:
    # Background augmentation workers would keep the process alive after an error.
    for loader in (trainer.dataloader_train, trainer.dataloader_val):
        finish = getattr(loader, "_finish", None)
        if finish is not None:
            with contextlib.suppress(Exception):
                finish()


def run_epochs(trainer, progress: bool = True) -> None:
    """Run the remaining epochs, calling the hooks as ``nnUNetTrainer.run_training`` does.

    Raises:
        TrainingError: GPU memory ran out (with the batch size and patch in the message).
    """
    import torch
    from tqdm import tqdm

    show = progress and trainer.local_rank == 0
    trainer.on_train_start()
    try:
        for epoch in range(trainer.current_epoch, trainer.num_epochs):
            trainer.on_epoch_start()
            trainer.on_train_epoch_start()
            outputs = []
            bar = tqdm(
                range(trainer.num_iterations_per_epoch),
                desc=f"epoch {epoch + 1}/{trainer.num_epochs}",
                unit="it",
                leave=False,
                disable=not show,
                file=sys.stdout,
            )
            for _ in bar:
                try:
                    outputs.append(trainer.train_step(next(trainer.dataloader_train)))
                except Exception as err:
                    if _is_oom(err):
                        raise _oom_error(trainer, first=not outputs and epoch == 0) from err
                    raise
                bar.set_postfix(loss=f"{float(outputs[-1]['loss']):.4f}")
            bar.close()
            trainer.on_train_epoch_end(outputs)
            with torch.no_grad():
                trainer.on_validation_epoch_start()
                val_outputs = [
                    trainer.validation_step(next(trainer.dataloader_val))
                    for _ in range(trainer.num_val_iterations_per_epoch)
                ]
                trainer.on_validation_epoch_end(val_outputs)
            trainer.on_epoch_end()
    except BaseException:
        _stop_dataloaders(trainer)
        raise
    trainer.on_train_end()


def _oom_error(trainer, first: bool) -> TrainingError:
    import torch

    cm = trainer.configuration_manager
    total_gib = (
        torch.cuda.get_device_properties(trainer.device).total_memory / 2**30
        if trainer.device.type == "cuda"
        else float("nan")
    )
    when = "at the first iteration" if first else "during training"
    return TrainingError(
        f"out of memory {when}: batch size {trainer.batch_size} per GPU with patch "
        f"{tuple(cm.patch_size)} does not fit on {trainer.device} ({total_gib:.1f} GiB); use "
        f"a smaller --batch-size or more --num-gpus"
    )


def run_worker(settings: TrainSettings, rank: int = 0) -> dict:
    """Build the trainer, optionally resume, train, optionally validate (one process).

    Returns:
        A summary: epochs done, last train loss, best EMA pseudo Dice, checkpoint path.
    """
    import torch

    _seed_everything(settings.seed, rank)
    if settings.device == "cpu":
        torch.set_num_threads(settings.threads or os.cpu_count() or 1)
    else:
        # nnU-Net's own choice for GPU training: CPU threads do not help the GPU.
        torch.set_num_threads(1)
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True

    trainer = build_trainer(settings)
    folder = Path(trainer.output_folder)
    if settings.resume:
        checkpoint = newest_checkpoint(folder)
        if checkpoint is None:
            print(
                f"WARNING: no checkpoint in {folder} to continue from; starting a new training",
                file=sys.stderr,
            )
        else:
            trainer.load_checkpoint(str(checkpoint))
            if rank == 0:
                print(f"continuing from {checkpoint.name} at epoch {trainer.current_epoch}")
    if trainer.current_epoch >= trainer.num_epochs:
        if rank == 0:
            print(f"already trained {trainer.current_epoch} epochs (--epochs {trainer.num_epochs})")
    else:
        run_epochs(trainer, settings.progress)
    if settings.validate:
        trainer.perform_actual_validation(False)
    losses = trainer.logger.get_value("train_losses", step=None)
    return {
        "epochs_done": int(trainer.current_epoch),
        "last_train_loss": float(losses[-1]) if losses else None,
        "best_ema_pseudo_dice": None if trainer._best_ema is None else float(trainer._best_ema),
        "checkpoint": str(folder / "checkpoint_final.pth"),
    }


def _ddp_worker(rank: int, settings: TrainSettings, world_size: int) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("nccl", rank=rank, world_size=world_size)
    try:
        torch.cuda.set_device(torch.device("cuda", rank))
        summary = run_worker(settings, rank)
        if rank == 0:
            print(json.dumps(summary))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def train(settings: TrainSettings) -> dict | None:
    """Run a prepared training, in this process or in ``num_gpus`` DDP workers.

    Returns:
        The summary of ``run_worker`` (None for DDP, whose rank 0 prints it).

    Raises:
        TrainingError: out of memory, or a DDP worker failed.
    """
    write_settings(settings, started=True)
    if settings.num_gpus == 1:
        summary = run_worker(settings)
        write_settings(settings, finished=True, **summary)
        return summary

    import torch.multiprocessing as mp

    os.environ.setdefault("MASTER_ADDR", "localhost")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    try:
        mp.spawn(
            _ddp_worker, args=(settings, settings.num_gpus), nprocs=settings.num_gpus, join=True
        )
    except mp.ProcessRaisedException as err:
        last = [ln for ln in str(err).strip().splitlines() if ln.strip()]
        raise TrainingError(f"a DDP worker failed: {last[-1] if last else err}") from err
    write_settings(settings, finished=True)
    return None
