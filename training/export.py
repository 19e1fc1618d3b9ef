"""Trainer output -> model folder: plans.json, dataset.json, fold_X/checkpoint_final.pth.

The folder stays a standard nnU-Net v2 results folder (``nnUNetPredictor`` and our lean
predictor load it), plus ``manifest.json``: what the model was trained with and on.
``slim`` drops the optimizer and grad-scaler state from the checkpoints; the network
weights, the trainer name, the init args and the mirroring axes that prediction needs stay.
A slim checkpoint can no longer be used to continue training.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import platform
import shutil
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from training.plan import add_batch_size_configuration, resolve_configuration
from training.train import parse_fold, read_settings
from training.workspace import DEFAULT_PLANS, TRAINER_NAME, Workspace, WorkspaceError

#: Checkpoint entries only training needs; ``slim`` sets them to None.
TRAINING_ONLY_STATE = ("optimizer_state", "grad_scaler_state")
MANIFEST = "manifest.json"


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def copy_checkpoint(source: Path, destination: Path, slim: bool) -> dict:
    """Copy a checkpoint, optionally without its optimizer/grad-scaler state.

    Returns:
        The checkpoint's bookkeeping: ``current_epoch``, ``trainer_name``, ``init_args``
        (configuration, fold) and the logged per-epoch values.
    """
    import torch

    checkpoint = torch.load(source, map_location="cpu", weights_only=False)
    if slim:
        for key in TRAINING_ONLY_STATE:
            checkpoint[key] = None
        torch.save(checkpoint, destination)
    else:
        shutil.copy2(source, destination)
    return checkpoint


def fingerprint_summary(fingerprint: dict, plans: dict) -> dict:
    """Median spacing/shape (z, y, x), CT foreground intensities and the normalisation used.

    ``ct_intensity`` is the dataset's own foreground statistics; ``ct_normalization`` the
    values the plans normalise with (the same unless ``plan --ct-normalization flare24``).
    """
    spacings = np.asarray(fingerprint["spacings"], dtype=float)
    shapes = np.asarray(fingerprint["shapes_after_crop"], dtype=float)
    used = plans.get("foreground_intensity_properties_per_channel", {}).get("0", {})
    own = fingerprint.get("foreground_intensity_properties_per_channel", {}).get("0", used)
    return {
        "num_cases": len(spacings),
        "median_spacing_zyx_mm": [round(float(v), 4) for v in np.median(spacings, axis=0)],
        "median_shape_zyx": [float(v) for v in np.median(shapes, axis=0)],
        "ct_intensity": {k: round(float(v), 3) for k, v in own.items()},
        "ct_normalization": {k: round(float(v), 3) for k, v in used.items()},
        "ct_normalization_source": plans.get("ct_normalization_source", "dataset fingerprint"),
    }


def _debug_settings(folder: Path) -> dict:
    # nnU-Net's own record (debug.json, all values as strings) for folders trained elsewhere.
    path = folder / "debug.json"
    if not path.is_file():
        return {}
    debug = json.loads(path.read_text())
    out = {}
    for key, ours in (
        ("num_epochs", "epochs"),
        ("num_iterations_per_epoch", "iterations_per_epoch"),
        ("num_val_iterations_per_epoch", "val_iterations"),
        ("batch_size", "batch_size"),
    ):
        with contextlib.suppress(KeyError, ValueError):
            out[ours] = int(debug[key])
    out["device"] = debug.get("device")
    out["torch_version"] = debug.get("torch_version")
    return out


def _count_training_cases(folder: Path, preprocessed_dataset: Path) -> int | None:
    # For output folders trained without our settings file: nnU-Net's own split records.
    fold = folder.name.removeprefix("fold_")
    if fold == "all":
        dataset_json = folder.parent / "dataset.json"
        return (
            json.loads(dataset_json.read_text()).get("numTraining")
            if dataset_json.is_file()
            else None
        )
    splits = preprocessed_dataset / "splits_final.json"
    if splits.is_file() and fold.isdigit():
        folds = json.loads(splits.read_text())
        if int(fold) < len(folds):
            return len(folds[int(fold)]["train"])
    return None


def _fold_record(
    folder: Path, checkpoint: dict, exported: Path, preprocessed_dataset: Path
) -> dict:
    settings = read_settings(folder) or _debug_settings(folder)
    if settings.get("num_training_cases") is None:
        settings["num_training_cases"] = _count_training_cases(folder, preprocessed_dataset)
    logging = checkpoint.get("logging", {})
    losses = logging.get("train_losses", [])
    ema = logging.get("ema_fg_dice", [])
    return {
        "epochs": int(checkpoint["current_epoch"]),
        "epochs_planned": settings.get("epochs"),
        "iterations_per_epoch": settings.get("iterations_per_epoch"),
        "val_iterations": settings.get("val_iterations"),
        "num_training_cases": settings.get("num_training_cases"),
        "num_gpus": settings.get("num_gpus"),
        "device": settings.get("device"),
        "seed": settings.get("seed"),
        "oversample_foreground": settings.get("oversample_foreground"),
        "first_train_loss": float(losses[0]) if losses else None,
        "final_train_loss": float(losses[-1]) if losses else None,
        "final_ema_pseudo_dice": float(ema[-1]) if ema else None,
        "trained_with": {
            "nnunetv2": settings.get("nnunetv2_version"),
            "torch": settings.get("torch_version"),
            "finished": settings.get("written"),
        },
        "checkpoint_sha256": sha256(exported),
    }


def resolve_trained_configuration(plans: dict, configuration: str, batch_size: int | None) -> str:
    """The configuration name a ``train -c CONFIG --batch-size N`` run wrote to."""
    if batch_size is None:
        resolve_configuration(plans, configuration)
        return configuration
    return add_batch_size_configuration(json.loads(json.dumps(plans)), configuration, batch_size)


def export_model(
    workspace: Workspace,
    dataset: str,
    configuration: str,
    output: Path,
    folds: list[str] | None = None,
    batch_size: int | None = None,
    include_best: bool = False,
    slim: bool = False,
    plans_name: str = DEFAULT_PLANS,
    overwrite: bool = False,
) -> Path:
    """Write a model folder from a finished training.

    Args:
        workspace: the work folder.
        dataset: dataset id or name.
        configuration: the configuration as given to ``train -c``.
        output: the model folder to create.
        folds: folds to include (default ``all``).
        batch_size: the ``--batch-size`` given to ``train`` (selects ``<config>_bsN``).
        include_best: also copy ``checkpoint_best.pth``.
        slim: drop the optimizer/grad-scaler state from the checkpoints.
        plans_name: plans identifier.
        overwrite: replace an existing model folder.

    Returns:
        The model folder.

    Raises:
        WorkspaceError: the training output or a checkpoint is missing, or the output exists.
    """
    import nnunetv2  # noqa: F401 - version below; also checks the training extras are present
    import torch

    name = workspace.resolve_dataset(dataset)
    plans_file = workspace.plans_file(name, plans_name)
    if not plans_file.is_file():
        raise WorkspaceError(f"no plans {plans_file}")
    configuration = resolve_trained_configuration(
        json.loads(plans_file.read_text()), configuration, batch_size
    )
    source = workspace.trainer_folder(name, configuration, plans_name)
    if not (source / "plans.json").is_file():
        raise WorkspaceError(f"no training output in {source} (run `python -m training train`)")
    folds = [parse_fold(f) for f in (folds or ["all"])]
    for fold in folds:
        if not (source / f"fold_{fold}" / "checkpoint_final.pth").is_file():
            raise WorkspaceError(
                f"fold {fold} of {configuration} has no checkpoint_final.pth (training unfinished)"
            )
        if include_best and not (source / f"fold_{fold}" / "checkpoint_best.pth").is_file():
            raise WorkspaceError(f"fold {fold} of {configuration} has no checkpoint_best.pth")

    output = output.resolve()
    if output.exists() and any(output.iterdir()):
        if not overwrite:
            raise WorkspaceError(f"{output} exists and is not empty; pass --overwrite")
        if not (output / "plans.json").is_file() and not (output / MANIFEST).is_file():
            raise WorkspaceError(f"{output} does not look like a model folder; not replacing it")
    staging = output.with_name(f".{output.name}.export-tmp")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)

    plans = json.loads((source / "plans.json").read_text())
    for file in ("plans.json", "dataset.json", "dataset_fingerprint.json"):
        if (source / file).is_file():
            shutil.copy2(source / file, staging / file)
    fold_records = {}
    first_checkpoint = None
    for fold in folds:
        (staging / f"fold_{fold}").mkdir()
        names = ["checkpoint_final.pth"] + (["checkpoint_best.pth"] if include_best else [])
        for checkpoint_name in names:
            exported = staging / f"fold_{fold}" / checkpoint_name
            checkpoint = copy_checkpoint(source / f"fold_{fold}" / checkpoint_name, exported, slim)
            if checkpoint_name == "checkpoint_final.pth":
                fold_records[fold] = _fold_record(
                    source / f"fold_{fold}", checkpoint, exported, workspace.preprocessed / name
                )
                first_checkpoint = first_checkpoint or checkpoint
            elif checkpoint_name == "checkpoint_best.pth":
                fold_records[fold]["best_checkpoint_sha256"] = sha256(exported)

    resolved = resolve_configuration(plans, configuration)
    arch = resolved["architecture"]["arch_kwargs"]
    first = fold_records[folds[0]]
    fingerprint_file = source / "dataset_fingerprint.json"
    manifest = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "dataset": name,
        "trainer": first_checkpoint.get("trainer_name", TRAINER_NAME),
        "plans": plans_name,
        "configuration": configuration,
        "batch_size": int(resolved["batch_size"]),
        "folds": folds,
        "epochs": first["epochs"],
        "iterations_per_epoch": first["iterations_per_epoch"],
        "num_training_cases": first["num_training_cases"],
        "patch_size": resolved["patch_size"],
        "spacing_mm": resolved["spacing"],
        "n_stages": arch["n_stages"],
        "features_per_stage": arch["features_per_stage"],
        "fingerprint": fingerprint_summary(json.loads(fingerprint_file.read_text()), plans)
        if fingerprint_file.is_file()
        else None,
        "slim": slim,
        "checkpoints": ["checkpoint_final.pth"] + (["checkpoint_best.pth"] if include_best else []),
        "per_fold": fold_records,
        "versions": {
            "nnunetv2": _installed("nnunetv2"),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
    }
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")

    if output.exists():
        shutil.rmtree(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(output)
    return output


def _installed(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def update_manifest(model: Path, **fields) -> dict:
    """Merge ``fields`` into ``MODEL/manifest.json`` (e.g. held-out metrics) and return it."""
    path = model / MANIFEST
    manifest = json.loads(path.read_text()) if path.is_file() else {}
    manifest.update(fields)
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
