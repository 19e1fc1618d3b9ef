"""Trainer output -> model folder: plans.json, dataset.json, fold_X/checkpoint_final.pth.

The folder stays a standard nnU-Net v2 results folder (``nnUNetPredictor`` and our lean
predictor load it), plus ``manifest.json``: what the model was trained with and on.
``slim`` drops the optimizer and grad-scaler state from the checkpoints; the network
weights, the trainer name, the init args and the mirroring axes that prediction needs stay.
A slim checkpoint can no longer be used to continue training.

``--overwrite`` never deletes data: an existing folder is replaced only when it is an
earlier export, recognised by its own ``manifest.json`` and holding nothing but the files an
export writes (``output_kind`` decides, before anything is touched). A dataset folder (the
synthetic generator writes a ``manifest.json`` too) or a trainer's results folder (it has a
``plans.json``) is refused.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import platform
import re
import shutil
import socket
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from training.checkpoints import BEST, FINAL, not_a_regular_file
from training.crossval import CROSSVAL_FILE
from training.fold_state import other_plans_line, plans_mismatch
from training.interrupt import TrainingInterrupted, stop_request
from training.plan import add_batch_size_configuration, resolve_configuration
from training.train import parse_folds, read_settings
from training.validation import read_lesion_metrics
from training.workspace import DEFAULT_PLANS, TRAINER_NAME, Workspace, WorkspaceError

#: Checkpoint entries only training needs; ``slim`` sets them to None.
TRAINING_ONLY_STATE = ("optimizer_state", "grad_scaler_state")
MANIFEST = "manifest.json"
#: The marker in every manifest this command writes: how ``--overwrite`` recognises the
#: folders it may replace.
WRITTEN_BY = "python -m training export"


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

    Raises:
        WorkspaceError: the checkpoint cannot be read, or its pickle names anything an
            nnU-Net checkpoint does not hold (loaded as the predictor loads it, with
            ``weights_only``: nothing it names is run).
    """
    import torch

    from inference.model import ModelError, load_checkpoint

    try:
        checkpoint = load_checkpoint(source)
    except ModelError as err:
        raise WorkspaceError(str(err)) from None
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
        "validation": _validation_record(folder, int(checkpoint["current_epoch"])),
        "checkpoint_sha256": sha256(exported),
    }


def _validation_record(folder: Path, epochs: int) -> dict | None:
    # The fold's lesion DSC/NSD, when its validation was run on this very checkpoint.
    record = read_lesion_metrics(folder)
    if record is None or record.get("epochs") != epochs:
        return None
    return {k: v for k, v in record.items() if k != "per_case"}


def resolve_trained_configuration(plans: dict, configuration: str, batch_size: int | None) -> str:
    """The configuration name a ``train -c CONFIG --batch-size N`` run wrote to."""
    if batch_size is None:
        resolve_configuration(plans, configuration)
        return configuration
    return add_batch_size_configuration(json.loads(json.dumps(plans)), configuration, batch_size)


# --------------------------------------------------------------------------- the output folder

#: Top-level files and per-fold files an export writes; nothing else is ever in its folder.
EXPORT_TOP_FILES = frozenset({"plans.json", "dataset.json", "dataset_fingerprint.json", MANIFEST})
EXPORT_FOLD_FILES = frozenset({"checkpoint_final.pth", "checkpoint_best.pth"})


def is_export_manifest(manifest: object) -> bool:
    """Whether a ``manifest.json`` was written by this command.

    Recognised by its ``written_by`` marker, or (a manifest without it) by the fields every
    export writes (per-fold checkpoint hashes, trainer, configuration, checkpoints).
    """
    if not isinstance(manifest, dict):
        return False
    if manifest.get("written_by") == WRITTEN_BY:
        return True
    per_fold = manifest.get("per_fold")
    return (
        isinstance(per_fold, dict)
        and bool(per_fold)
        and all(isinstance(r, dict) and "checkpoint_sha256" in r for r in per_fold.values())
        and {"trainer", "configuration", "checkpoints"} <= set(manifest)
    )


def foreign_entries(folder: Path, folds: list[str]) -> list[str]:
    """Paths below ``folder`` that an export of ``folds`` does not write (links included)."""
    fold_dirs = {f"fold_{f}" for f in folds}
    foreign = []
    for entry in sorted(folder.iterdir()):
        if entry.is_symlink():
            foreign.append(entry.name)
        elif entry.is_dir() and entry.name in fold_dirs:
            foreign += [
                f"{entry.name}/{sub.name}"
                for sub in sorted(entry.iterdir())
                if sub.is_symlink() or not sub.is_file() or sub.name not in EXPORT_FOLD_FILES
            ]
        elif not (entry.is_file() and entry.name in EXPORT_TOP_FILES):
            foreign.append(entry.name + ("/" if entry.is_dir() else ""))
    return foreign


def output_kind(folder: Path) -> tuple[str, str]:
    """What ``folder`` is, decided before anything may be deleted.

    Returns:
        ``(kind, reason)``: kind ``missing``, ``empty``, ``export`` (written by this command
        and holding nothing else: replaceable) or ``other`` (never replaced), and for
        ``other`` a few words on why.
    """
    if not folder.exists() and not folder.is_symlink():
        return "missing", ""
    if folder.is_symlink() or not folder.is_dir():
        return "other", "it is not a folder"
    if not any(folder.iterdir()):
        return "empty", ""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return "other", f"it has no readable {MANIFEST} written by export"
    if not is_export_manifest(manifest):
        return "other", f"its {MANIFEST} was not written by export"
    folds = [str(f) for f in manifest.get("folds") or manifest["per_fold"]]
    foreign = foreign_entries(folder, folds)
    if foreign:
        shown = ", ".join(foreign[:3]) + (
            f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        )
        return "other", f"it holds {shown}, which export did not write"
    return "export", ""


def check_output(output: Path, overwrite: bool) -> None:
    """Refuse an output folder that holds anything but an earlier export.

    An earlier export is refused too unless ``overwrite`` is given.

    Raises:
        WorkspaceError: with the reason in one line.
    """
    kind, reason = output_kind(output)
    if kind in ("missing", "empty"):
        return
    if kind == "other":
        raise WorkspaceError(
            f"{output} exists and is not a model folder written by export ({reason}); "
            "not replacing it"
        )
    if not overwrite:
        raise WorkspaceError(f"{output} holds an earlier export; pass --overwrite to replace it")


def staging_prefix(output: Path) -> str:
    """``.NAME.export-PID-HOST-``: the start of the hidden folder an export is assembled in.

    The process id and host in the name let a later export prove that a leftover one is
    its own kind and that its writer is gone (see ``remove_stale_staging``).
    """
    return f".{output.name}.export-{os.getpid()}-{socket.gethostname()}-"


def _staging_owner(entry: Path, output: Path) -> tuple[int, str] | None:
    # (pid, host) from a name ``staging_prefix`` + mkdtemp's random part; None: not ours.
    pattern = rf"\.{re.escape(output.name)}\.export-(\d+)-(.+)-[a-z0-9_]+"
    match = re.fullmatch(pattern, entry.name)
    return (int(match[1]), match[2]) if match else None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale_staging(output: Path) -> list[Path]:
    """Remove staging folders of ``output`` left by exports killed on this host.

    Only folders named by ``staging_prefix`` for ``output`` whose process is no longer
    running on this host: an older unnamed one, another host's, a live process's or a link
    is kept, since nothing proves it is an abandoned export.

    Returns:
        The folders removed.
    """
    if not output.parent.is_dir():
        return []
    host, removed = socket.gethostname(), []
    for entry in sorted(output.parent.glob(f".{glob.escape(output.name)}.export-*")):
        owner = _staging_owner(entry, output)
        if owner is None or owner[1] != host or entry.is_symlink() or not entry.is_dir():
            continue
        if owner[0] == os.getpid() or _process_alive(owner[0]):
            continue
        shutil.rmtree(entry)
        removed.append(entry)
    return removed


def _staging_folder(output: Path) -> Path:
    """A hidden, empty folder beside ``output``, with the mode ``mkdir`` would give it.

    ``mkdtemp`` makes it 0700, which the published model would keep: other users (a
    container running as another user) could not read it.

    Raises:
        WorkspaceError: the parent cannot be created or written (a file in the way, no
            permission), in one line.
    """
    blocking = next((p for p in output.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise WorkspaceError(f"cannot create {output}: {blocking} is a file, not a folder")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=output.parent, prefix=staging_prefix(output)))
    except OSError as err:
        raise WorkspaceError(f"cannot create {output}: {err.strerror or err}") from None
    staging.chmod(0o777 & ~_umask())
    return staging


def _umask() -> int:
    # The process umask can only be read by setting it; set it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _publish(staging: Path, output: Path) -> None:
    """Put the finished staging folder in place; an earlier export is removed only after."""
    if output.exists() and any(output.iterdir()):
        old = output.with_name(f".{output.name}.replaced-{os.getpid()}")
        output.rename(old)
        staging.rename(output)
        if output_kind(old)[0] == "export":  # checked again: nothing else is ever deleted
            shutil.rmtree(old)
        else:
            print(f"warning: kept {old}: it changed while exporting", file=sys.stderr)
        return
    if output.exists():
        output.rmdir()
    staging.rename(output)


# --------------------------------------------------------------------------- export


def _trained_source(
    workspace: Workspace,
    name: str,
    configuration: str,
    batch_size: int | None,
    plans_name: str,
    folds: list[str],
    include_best: bool,
) -> tuple[str, Path]:
    """The trained configuration and its results folder, checked for every fold's files."""
    plans_file = workspace.plans_file(name, plans_name)
    if not plans_file.is_file():
        raise WorkspaceError(f"no plans {plans_file}")
    configuration = resolve_trained_configuration(
        json.loads(plans_file.read_text()), configuration, batch_size
    )
    source = workspace.trainer_folder(name, configuration, plans_name)
    if not (source / "plans.json").is_file():
        raise WorkspaceError(f"no training output in {source} (run `python -m training train`)")
    for fold in folds:
        names = [FINAL] + ([BEST] if include_best else [])
        for checkpoint_name in names:
            path = source / f"fold_{fold}" / checkpoint_name
            kind = not_a_regular_file(path)
            if kind is not None:
                raise WorkspaceError(f"fold {fold}: {path} is not a regular file ({kind})")
            if not path.is_file():
                unfinished = " (training unfinished)" if checkpoint_name == FINAL else ""
                raise WorkspaceError(
                    f"fold {fold} of {configuration} has no {checkpoint_name}{unfinished}"
                )
    return configuration, source


def check_fold_plans(source: Path, folds: list[str], configuration: str) -> None:
    """Refuse folds trained with other plans than the ``plans.json`` being exported.

    The results folder's ``plans.json`` is rewritten by every training in it, so after a
    re-plan and one fold trained again it no longer describes the other folds; the predictor
    would normalise (or build the network) differently from how they were trained.

    Raises:
        WorkspaceError: naming the folds, in one line; or a checkpoint cannot be read.
    """
    plans = json.loads((source / "plans.json").read_text())
    differing: dict[str, str] = {}
    for fold in folds:
        path = source / f"fold_{fold}" / FINAL
        try:
            difference = plans_mismatch(path, plans, configuration)
        except Exception as err:  # a truncated zip, a pickle error, a foreign file
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise WorkspaceError(f"fold {fold}: {path} cannot be read ({reason})") from None
        if difference is not None:
            differing[fold] = difference
    if differing:
        them = "them" if len(differing) > 1 else "it"
        exported = f"the {source / 'plans.json'} being exported"
        raise WorkspaceError(
            other_plans_line(differing, configuration, exported)
            + f"; train {them} again (`train -f {' '.join(differing)} --restart`) "
            "or export only the others"
        )


def _copy_folds(
    staging: Path,
    source: Path,
    folds: list[str],
    include_best: bool,
    slim: bool,
    preprocessed: Path,
) -> tuple[dict, dict]:
    """Copy the checkpoints of every fold; returns the per-fold records and one checkpoint."""
    fold_records, first_checkpoint = {}, None
    for fold in folds:
        (staging / f"fold_{fold}").mkdir()
        names = ["checkpoint_final.pth"] + (["checkpoint_best.pth"] if include_best else [])
        for checkpoint_name in names:
            exported = staging / f"fold_{fold}" / checkpoint_name
            checkpoint = copy_checkpoint(source / f"fold_{fold}" / checkpoint_name, exported, slim)
            if checkpoint_name == "checkpoint_final.pth":
                fold_records[fold] = _fold_record(
                    source / f"fold_{fold}", checkpoint, exported, preprocessed
                )
                first_checkpoint = first_checkpoint or checkpoint
            else:
                fold_records[fold]["best_checkpoint_sha256"] = sha256(exported)
    return fold_records, first_checkpoint


def _crossval_record(source: Path, folds: list[str]) -> dict | None:
    # The pooled cross-validation figures, when the exported folds are the ones pooled.
    path = source / CROSSVAL_FILE
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    if sorted(summary.get("folds", [])) != sorted(f for f in folds if f != "all"):
        return None
    return {k: v for k, v in summary.items() if k != "per_case"}


def _manifest(
    name: str,
    configuration: str,
    plans_name: str,
    plans: dict,
    source: Path,
    folds: list[str],
    fold_records: dict,
    first_checkpoint: dict,
    slim: bool,
    include_best: bool,
) -> dict:
    import torch

    resolved = resolve_configuration(plans, configuration)
    arch = resolved["architecture"]["arch_kwargs"]
    first = fold_records[folds[0]]
    fingerprint_file = source / "dataset_fingerprint.json"
    return {
        "written_by": WRITTEN_BY,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "dataset": name,
        "trainer": first_checkpoint.get("trainer_name", TRAINER_NAME),
        "plans": plans_name,
        "configuration": configuration,
        "network": resolved["architecture"]["network_class_name"].rsplit(".", 1)[-1],
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
        "cross_validation": _crossval_record(source, folds),
        "versions": {
            "nnunetv2": _installed("nnunetv2"),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
    }


def _assemble(
    staging: Path,
    workspace: Workspace,
    name: str,
    configuration: str,
    plans_name: str,
    source: Path,
    folds: list[str],
    include_best: bool,
    slim: bool,
) -> None:
    """Write the whole model folder into ``staging``: plans, checkpoints, manifest."""
    plans = json.loads((source / "plans.json").read_text())
    for file in ("plans.json", "dataset.json", "dataset_fingerprint.json"):
        if (source / file).is_file():
            shutil.copy2(source / file, staging / file)
    fold_records, first_checkpoint = _copy_folds(
        staging, source, folds, include_best, slim, workspace.preprocessed / name
    )
    manifest = _manifest(
        name, configuration, plans_name, plans, source, folds, fold_records,
        first_checkpoint, slim, include_best,
    )  # fmt: skip
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


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

    The folder is assembled in a hidden staging folder beside ``output`` and renamed into
    place when complete. An existing ``output`` is replaced only when ``overwrite`` is given
    and it is an earlier export holding nothing else (see ``output_kind``).

    Args:
        workspace: the work folder.
        dataset: dataset id or name.
        configuration: the configuration as given to ``train -c``.
        output: the model folder to create.
        folds: folds to include (default ``all``; ``cv`` is folds 0-4).
        batch_size: the ``--batch-size`` given to ``train`` (selects ``<config>_bsN``).
        include_best: also copy ``checkpoint_best.pth``.
        slim: drop the optimizer/grad-scaler state from the checkpoints.
        plans_name: plans identifier.
        overwrite: replace an earlier export.

    Returns:
        The model folder.

    Raises:
        WorkspaceError: the training output or a checkpoint is missing, or the output exists
            and may not be replaced.
    """
    import nnunetv2  # noqa: F401 - checks the training extras are present

    name = workspace.resolve_dataset(dataset)
    folds = parse_folds(folds or ["all"])
    configuration, source = _trained_source(
        workspace, name, configuration, batch_size, plans_name, folds, include_best
    )
    check_fold_plans(source, folds, configuration)
    output = output.resolve()
    check_output(output, overwrite)

    for stale in remove_stale_staging(output):
        print(f"removed {stale}: left by an export that was killed", file=sys.stderr)
    # SIGTERM raises here: Python's default would end the process before the clean-up
    # below and leave a partial copy of every checkpoint beside the output.
    with stop_request() as stop:
        staging = _staging_folder(output)
        published = False
        try:
            _assemble(staging, workspace, name, configuration, plans_name, source, folds,
                      include_best, slim)  # fmt: skip
            with stop.deferred():  # two renames that must not be parted by a signal
                _publish(staging, output)
                published = True
        except TrainingInterrupted as err:
            kept = (
                f"the model was written to {output}"
                if published
                else "nothing exported, the partial copy was removed"
            )
            raise TrainingInterrupted(err.signum, kept=kept, finished=published) from None
        finally:
            if staging.exists():
                shutil.rmtree(staging)
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
