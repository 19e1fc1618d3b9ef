"""A fold's final validation: nnU-Net's prediction of its validation cases, scored as FLARE does.

nnU-Net's ``perform_actual_validation`` predicts the fold's validation cases (its sliding
window, with mirroring) into ``fold_X/validation/`` and writes its Dice in ``summary.json``.
The challenge ranks lesion DSC and NSD per case with its own conventions (both empty -> 1,
one empty -> 0, NSD 0 when DSC < 0.2, NSD at 2 mm), which ``evaluation`` computes; they are
written next to nnU-Net's figures in ``fold_X/validation/lesion_metrics.json``.

With partial labels (the method trains on them as if complete) a lesion the annotators left
out is background in the reference: a correct prediction of it counts as a false positive
here, so these figures understate the network on such cases.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from inference.atomic import write_json_atomically
from training.fold_state import LESION_METRICS, NNUNET_VALIDATION_SUMMARY, VALIDATION_FOLDER

#: Said wherever validation figures are shown.
PARTIAL_LABEL_NOTE = (
    "partial labels: lesions the annotators left out are background in the reference, so "
    "predicting them counts as false positives here"
)
FOLD_ALL_NOTE = "fold all validates on its own training cases (optimistic)"


def _mean(values: list[float]) -> float | None:
    return float(sum(values) / len(values)) if values else None


def _nnunet_dice(validation: Path) -> float | None:
    path = validation / NNUNET_VALIDATION_SUMMARY
    if not path.is_file():
        return None
    value = json.loads(path.read_text()).get("foreground_mean", {}).get("Dice")
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def score_validation(
    fold_folder: Path,
    gt_folder: Path,
    epochs: int,
    ema_pseudo_dice: float | None,
    tolerance_mm: float | None = None,
) -> dict:
    """Score ``fold_X/validation/*.nii.gz`` against the references and write the record.

    Args:
        fold_folder: the trainer's fold folder (its ``validation/`` holds the predictions).
        gt_folder: reference label maps ``<case>.nii.gz`` (nnU-Net's ``gt_segmentations``).
        epochs: epochs of the checkpoint that was validated (recorded; a later ``--continue``
            makes the record stale and the validation is run again).
        ema_pseudo_dice: nnU-Net's EMA pseudo Dice at the end of training, recorded beside.
        tolerance_mm: NSD tolerance (default: the evaluation package's, 2 mm).

    Returns:
        The record written to ``validation/lesion_metrics.json``.
    """
    from evaluation.evaluate import evaluate_case
    from evaluation.metrics import DEFAULT_TOLERANCE_MM
    from evaluation.report import summarize
    from inference.cases import LABEL_SUFFIX

    tolerance_mm = DEFAULT_TOLERANCE_MM if tolerance_mm is None else tolerance_mm
    validation = fold_folder / VALIDATION_FOLDER
    cases = sorted(p.name[: -len(LABEL_SUFFIX)] for p in validation.glob(f"*{LABEL_SUFFIX}"))
    results = [
        evaluate_case(
            case,
            gt_folder / f"{case}{LABEL_SUFFIX}",
            validation / f"{case}{LABEL_SUFFIX}",
            tolerance_mm,
        )
        for case in cases
    ]
    summary = summarize(results)
    lesion = summary.groups["lesion"]
    record = {
        "fold": fold_folder.name.removeprefix("fold_"),
        "epochs": epochs,
        "cases": len(results),
        "lesion_dsc_mean": _mean([r.dsc for r in results]),
        "lesion_nsd_mean": _mean([r.nsd for r in results]),
        "nsd_tolerance_mm": tolerance_mm,
        "lesion_cases": lesion.n,
        "lesion_cases_dsc_mean": None if lesion.n == 0 else lesion.dsc.mean,
        "false_positive_cases": summary.false_positive_cases,
        "missed_cases": summary.missed_cases,
        "nnunet_validation_dice": _nnunet_dice(validation),
        "ema_pseudo_dice": ema_pseudo_dice,
        "notes": [PARTIAL_LABEL_NOTE] + ([FOLD_ALL_NOTE] if fold_folder.name == "fold_all" else []),
        "per_case": {
            r.case: {
                "dsc": r.dsc,
                "nsd": r.nsd,
                "gt_voxels": r.gt_voxels,
                "pred_voxels": r.pred_voxels,
            }
            for r in results
        },
    }
    write_json_atomically(validation / LESION_METRICS, record)
    return record


def read_lesion_metrics(fold_folder: Path) -> dict | None:
    """The fold's ``validation/lesion_metrics.json``, or None."""
    path = fold_folder / VALIDATION_FOLDER / LESION_METRICS
    return json.loads(path.read_text()) if path.is_file() else None


def _text(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def describe(record: dict) -> str:
    """One line: the fold's lesion DSC/NSD beside nnU-Net's validation Dice and pseudo Dice."""
    return (
        f"fold {record['fold']} validation, {record['cases']} cases: lesion DSC "
        f"{_text(record['lesion_dsc_mean'])}, NSD ({record['nsd_tolerance_mm']:g} mm) "
        f"{_text(record['lesion_nsd_mean'])} (FLARE conventions); nnU-Net validation Dice "
        f"{_text(record['nnunet_validation_dice'])}, EMA pseudo Dice "
        f"{_text(record['ema_pseudo_dice'])}; " + "; ".join(record["notes"])
    )


@contextmanager
def validation_processes(num_processes: int) -> Iterator[None]:
    """Let nnU-Net's validation use ``num_processes`` export/metric workers.

    nnU-Net reads ``nnUNet_def_n_proc`` once, when ``nnunetv2`` is first imported (default
    8), and its trainer module keeps the value; in a process that imported nnunetv2 before
    our command set the variable, ``--num-processes`` would be ignored and eight spawned
    interpreters started per validation. The trainer module's value is set for the call.
    """
    from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as module

    old = module.default_num_processes
    module.default_num_processes = max(1, num_processes)
    try:
        yield
    finally:
        module.default_num_processes = old


def validate_fold(trainer, num_processes: int = 2) -> dict | None:
    """Run nnU-Net's final validation and score it (rank 0 returns the record, others None)."""
    with validation_processes(num_processes):
        trainer.perform_actual_validation(False)
    if trainer.local_rank != 0:
        return None
    ema = trainer._best_ema
    ema_values = trainer.logger.get_value("ema_fg_dice", step=None)
    return score_validation(
        Path(trainer.output_folder),
        Path(trainer.preprocessed_dataset_folder_base) / "gt_segmentations",
        epochs=int(trainer.current_epoch),
        ema_pseudo_dice=float(ema_values[-1])
        if ema_values
        else (None if ema is None else float(ema)),
    )
