"""Evaluate a folder of predictions against a folder of ground-truth label maps.

Cases are the ``<case>.nii.gz`` files of the ground-truth folder; the prediction of a
case is ``PRED_DIR/<case>.nii.gz``. Every pair is checked (presence and geometry, from
the headers only) before any voxel is read, so a wrong folder fails in seconds, not after
an hour of scoring.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from evaluation.metrics import DEFAULT_TOLERANCE_MM, flare_scores
from inference.cases import LABEL_SUFFIX
from inference.nifti import NiftiError, read_geometry, read_image


class EvaluationError(ValueError):
    """The folders cannot be evaluated; the message is one line that names the case."""


@dataclass(frozen=True)
class CaseResult:
    """Scores and volumes of one case.

    Attributes:
        case: case name (file name without ``.nii.gz``).
        dsc: Dice similarity coefficient (FLARE conventions).
        nsd: normalised surface Dice at the tolerance (FLARE conventions).
        gt_voxels: lesion voxels in the ground truth (any value > 0).
        pred_voxels: lesion voxels in the prediction (any value > 0).
        gt_volume_ml: ground-truth lesion volume in ml.
        pred_volume_ml: predicted lesion volume in ml.
        pred_missing: the prediction file did not exist and was counted as empty.
        notes: remarks for the report (e.g. label values other than 0/1).
    """

    case: str
    dsc: float
    nsd: float
    gt_voxels: int
    pred_voxels: int
    gt_volume_ml: float
    pred_volume_ml: float
    pred_missing: bool = False
    notes: tuple[str, ...] = field(default=())

    @property
    def gt_empty(self) -> bool:
        """No lesion in the ground truth (a healthy case)."""
        return self.gt_voxels == 0

    @property
    def pred_empty(self) -> bool:
        """No lesion predicted."""
        return self.pred_voxels == 0

    @property
    def false_positive(self) -> bool:
        """Lesion predicted in a case without lesions."""
        return self.gt_empty and not self.pred_empty

    @property
    def missed(self) -> bool:
        """Nothing predicted in a case with lesions."""
        return not self.gt_empty and self.pred_empty


def list_label_cases(gt_dir: str | os.PathLike) -> list[str]:
    """Case names of the ``<case>.nii.gz`` files in ``gt_dir``, sorted.

    Raises:
        EvaluationError: the folder does not exist or holds no ``.nii.gz`` file.
    """
    folder = Path(gt_dir)
    if not folder.is_dir():
        raise EvaluationError(f"ground-truth folder {folder} does not exist")
    cases = sorted(
        p.name[: -len(LABEL_SUFFIX)]
        for p in folder.iterdir()
        if p.name.endswith(LABEL_SUFFIX) and not p.name.startswith(".") and p.is_file()
    )
    if not cases:
        raise EvaluationError(f"no <case>{LABEL_SUFFIX} files in ground-truth folder {folder}")
    return cases


def match_predictions(
    cases: Iterable[str],
    gt_dir: str | os.PathLike,
    pred_dir: str | os.PathLike,
    allow_missing: bool = False,
) -> dict[str, Path | None]:
    """Find each case's prediction and check that it lies on the ground truth's grid.

    Only headers are read. Size, spacing, origin and direction must agree
    (:meth:`Geometry.mismatch`), as the organizers' script compares voxel arrays and
    takes the spacing from the ground truth.

    Args:
        cases: case names.
        gt_dir: folder of ``<case>.nii.gz`` ground-truth label maps.
        pred_dir: folder of ``<case>.nii.gz`` predictions.
        allow_missing: map a missing prediction to None (scored as empty) instead of failing.

    Returns:
        Case name -> prediction path (None for a missing one, with ``allow_missing``).

    Raises:
        EvaluationError: a prediction is missing (unless allowed), unreadable, or its
            geometry differs; the message names the case and the difference.
    """
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise EvaluationError(f"prediction folder {pred_dir} does not exist")
    found: dict[str, Path | None] = {}
    for case in cases:
        gt_path = Path(gt_dir) / f"{case}{LABEL_SUFFIX}"
        pred_path = pred_dir / f"{case}{LABEL_SUFFIX}"
        if not pred_path.exists():
            if not allow_missing:
                raise EvaluationError(
                    f"case {case}: prediction {pred_path} is missing "
                    "(use --allow-missing to score it as empty)"
                )
            found[case] = None
            continue
        gt_geometry = _header(gt_path, case, "ground truth")
        pred_geometry = _header(pred_path, case, "prediction")
        reason = pred_geometry.mismatch(gt_geometry)
        if reason:
            raise EvaluationError(
                f"case {case}: prediction geometry differs from the ground truth: "
                f"{reason} (prediction != ground truth)"
            )
        found[case] = pred_path
    return found


def unmatched_predictions(cases: Iterable[str], pred_dir: str | os.PathLike) -> list[str]:
    """Names of ``<case>.nii.gz`` files in ``pred_dir`` that have no ground truth (sorted)."""
    known = set(cases)
    folder = Path(pred_dir)
    if not folder.is_dir():
        return []
    return sorted(
        p.name[: -len(LABEL_SUFFIX)]
        for p in folder.iterdir()
        if p.name.endswith(LABEL_SUFFIX)
        and not p.name.startswith(".")
        and p.name[: -len(LABEL_SUFFIX)] not in known
    )


def evaluate_case(
    case: str,
    gt_path: str | os.PathLike,
    pred_path: str | os.PathLike | None,
    tolerance_mm: float = DEFAULT_TOLERANCE_MM,
) -> CaseResult:
    """Read one ground truth and its prediction and score the lesion label.

    Any voxel value > 0 is lesion, in both files; a prediction must hold whole numbers
    (a float file with only 0.0 / 1.0 is fine, a probability map is refused). The spacing
    comes from the ground truth in (z, y, x) order, matching the arrays.

    Args:
        case: case name (for messages).
        gt_path: ground-truth label map.
        pred_path: prediction, or None to score a missing prediction as empty.
        tolerance_mm: NSD tolerance.

    Returns:
        The case's :class:`CaseResult`.

    Raises:
        EvaluationError: a file is unreadable, the arrays do not have the same shape, or
            the prediction holds values that are not whole numbers.
    """
    gt_array, geometry = _read(gt_path, case, "ground truth")
    gt = gt_array > 0
    del gt_array
    notes: list[str] = []
    if pred_path is None:
        pred = np.zeros_like(gt)
        notes.append("prediction missing, scored as empty")
    else:
        pred_array, _ = _read(pred_path, case, "prediction")
        if pred_array.shape != gt.shape:
            raise EvaluationError(
                f"case {case}: prediction shape {pred_array.shape} != ground truth {gt.shape}"
            )
        _check_labels(pred_array, case)
        pred = pred_array > 0
        low, top = pred_array.min(), pred_array.max()
        if top > 1 or low < 0:
            # The organizers' Task 1 script scores a prediction with labels > 1 as 0.
            notes.append(
                f"prediction holds values other than 0/1 (min {low}, max {top}); "
                "voxels > 0 count as lesion"
            )
        del pred_array
    scores = flare_scores(gt, pred, geometry.spacing_zyx_mm, tolerance_mm)
    voxel_ml = math.prod(geometry.spacing_xyz_mm) / 1000.0
    gt_voxels, pred_voxels = int(np.count_nonzero(gt)), int(np.count_nonzero(pred))
    return CaseResult(
        case=case,
        dsc=scores.dsc,
        nsd=scores.nsd,
        gt_voxels=gt_voxels,
        pred_voxels=pred_voxels,
        gt_volume_ml=gt_voxels * voxel_ml,
        pred_volume_ml=pred_voxels * voxel_ml,
        pred_missing=pred_path is None,
        notes=tuple(notes),
    )


def evaluate_folder(
    pred_dir: str | os.PathLike,
    gt_dir: str | os.PathLike,
    tolerance_mm: float = DEFAULT_TOLERANCE_MM,
    allow_missing: bool = False,
    progress: bool = True,
) -> list[CaseResult]:
    """Score every ground-truth case against its prediction.

    Args:
        pred_dir: folder of ``<case>.nii.gz`` predictions.
        gt_dir: folder of ``<case>.nii.gz`` ground-truth label maps (defines the cases).
        tolerance_mm: NSD tolerance.
        allow_missing: score a missing prediction as empty instead of failing.
        progress: show a tqdm bar over cases (on stderr).

    Returns:
        One :class:`CaseResult` per case, sorted by case name.

    Raises:
        EvaluationError: see :func:`match_predictions` and :func:`evaluate_case`.
    """
    cases = list_label_cases(gt_dir)
    predictions = match_predictions(cases, gt_dir, pred_dir, allow_missing)
    results = []
    for case in tqdm(cases, desc="evaluate", unit="case", disable=not progress):
        gt_path = Path(gt_dir) / f"{case}{LABEL_SUFFIX}"
        results.append(evaluate_case(case, gt_path, predictions[case], tolerance_mm))
    return results


def _check_labels(pred: np.ndarray, case: str) -> None:
    """Refuse a prediction that is not a label map (a probability map, say).

    Scoring ``> 0`` on probabilities would make every voxel above 0 lesion (0.01
    background included) and report a DSC near 0 with no hint why; no threshold is
    guessed for the user.

    Raises:
        EvaluationError: ``pred`` holds a value that is not a whole number (NaN included).
    """
    if not np.issubdtype(pred.dtype, np.floating):
        return
    # NaN and +-inf are no labels either.
    fractional = ~np.isfinite(pred) | (pred != np.round(pred))
    if fractional.any():
        example = pred[fractional].flat[0]
        raise EvaluationError(
            f"case {case}: prediction values are not integers ({np.count_nonzero(fractional)} "
            f"voxel(s), e.g. {example:g}): a probability map? give a label map "
            "(0 = background, 1 = lesion)"
        )


def _header(path: Path, case: str, what: str):
    try:
        return read_geometry(path)
    except NiftiError as err:
        raise EvaluationError(f"case {case}: {what} {path} is unreadable: {err}") from None


def _read(path: str | os.PathLike, case: str, what: str):
    try:
        return read_image(path)
    except NiftiError as err:
        raise EvaluationError(f"case {case}: {what} {path} is unreadable: {err}") from None
