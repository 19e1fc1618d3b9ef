"""DSC and NSD of one binary lesion mask against the ground truth, FLARE's way.

Pure functions on boolean (z, y, x) arrays and a spacing in the same axis order. The
surface computation is DeepMind's ``surface_distance`` package, the one the FLARE
organizers' ``SurfaceDice.py`` copies; the conventions for empty masks and low DSC are
those of their FLARE24 Task 1 script (``T1_FLARE24_DSC_NSD_Eval.py``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import surface_distance
from scipy import ndimage

#: FLARE sets NSD to 0 when DSC is below this value (the surfaces are not computed).
MIN_DSC_FOR_NSD = 0.2
#: The usual NSD tolerance for lesions in FLARE (mm).
DEFAULT_TOLERANCE_MM = 2.0
#: Voxels kept around the union of both masks when cropping. One voxel is enough for the
#: 2x2x2 surface kernel; two keep a safety margin at no measurable cost.
CROP_MARGIN = 2


class Scores(NamedTuple):
    """FLARE scores of one case (a named tuple: ``dsc, nsd = flare_scores(...)``).

    Attributes:
        dsc: Dice similarity coefficient in [0, 1].
        nsd: normalised surface Dice at the tolerance, in [0, 1].
    """

    dsc: float
    nsd: float


def dice(gt: np.ndarray, pred: np.ndarray) -> float:
    """Dice similarity coefficient ``2|A∩B| / (|A| + |B|)`` of two boolean masks.

    Args:
        gt: ground-truth mask (bool).
        pred: predicted mask (bool), same shape.

    Returns:
        The DSC; 1.0 when both masks are empty (FLARE's convention).
    """
    _check_pair(gt, pred)
    total = int(np.count_nonzero(gt)) + int(np.count_nonzero(pred))
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(gt & pred)) / total


def union_bounding_box(
    gt: np.ndarray, pred: np.ndarray, margin: int = CROP_MARGIN
) -> tuple[slice, ...] | None:
    """The bounding box of ``gt | pred`` grown by ``margin`` voxels (clipped to the array).

    The union is never built at full size: the first axis is found from per-slice
    projections of each mask, the other axes only inside that slab, which keeps a
    512x512x500 volume cheap.

    Returns:
        One slice per axis, or None when both masks are empty.
    """
    _check_pair(gt, pred)
    slab = _span(_any_except(gt, 0) | _any_except(pred, 0))
    if slab is None:
        return None
    gt_s, pred_s = gt[slab[0] : slab[1] + 1], pred[slab[0] : slab[1] + 1]
    spans = [slab]
    for axis in range(1, gt.ndim):
        span = _span(_any_except(gt_s, axis) | _any_except(pred_s, axis))
        assert span is not None  # the slab holds at least one foreground voxel
        spans.append(span)
    return tuple(
        slice(max(lo - margin, 0), min(hi + margin + 1, n))
        for (lo, hi), n in zip(spans, gt.shape, strict=True)
    )


def surface_dice(
    gt: np.ndarray,
    pred: np.ndarray,
    spacing_mm: Sequence[float],
    tolerance_mm: float = DEFAULT_TOLERANCE_MM,
) -> float:
    """Normalised surface Dice at ``tolerance_mm``, without FLARE's DSC cut-off.

    The fraction of both surfaces (weighted by surfel area) lying within ``tolerance_mm``
    of the other surface (``<=``, as ``surface_distance`` counts it). The result equals
    ``compute_surface_dice_at_tolerance(compute_surface_distances(gt, pred, spacing))`` on
    the full arrays, but the package only ever sees small crops: the foreground is split
    into groups that lie more than the tolerance apart (see :func:`surface_groups`), and
    each group is measured in its own bounding box. Surfels farther apart than the
    tolerance never match, so only the areas of the groups need adding up. Without this,
    one stray voxel far from the lesion makes the package build distance maps of the
    whole 512x512x500 volume (minutes, gigabytes).

    Args:
        gt: ground-truth mask (bool), (z, y, x).
        pred: predicted mask (bool), same shape.
        spacing_mm: voxel spacing in the arrays' axis order, e.g. ``Geometry.spacing_zyx_mm``.
        tolerance_mm: distance within which a surface element counts as matched.

    Returns:
        NSD in [0, 1].

    Raises:
        ValueError: a mask is empty (NSD is undefined; see :func:`flare_scores`), or the
            shapes or spacing do not fit.
    """
    _check_pair(gt, pred)
    spacing = [float(s) for s in spacing_mm]
    if len(spacing) != gt.ndim:
        raise ValueError(f"spacing {tuple(spacing_mm)} does not fit a {gt.ndim}-D mask")
    if not gt.any() or not pred.any():
        raise ValueError("surface Dice needs two non-empty masks")
    matched_mm2 = total_mm2 = 0.0
    for box in surface_groups(gt, pred, spacing, tolerance_mm):
        matched, total = _surface_areas(gt[box], pred[box], spacing, tolerance_mm)
        matched_mm2 += matched
        total_mm2 += total
    return matched_mm2 / total_mm2


def surface_groups(
    gt: np.ndarray,
    pred: np.ndarray,
    spacing_mm: Sequence[float],
    tolerance_mm: float,
    block: int = 8,
) -> list[tuple[slice, ...]]:
    """Boxes that together hold all foreground, each more than ``tolerance_mm`` from the others.

    The union of both masks is reduced to blocks of ``block`` voxels per axis, the
    occupied blocks are grouped by 26-connectivity, and the groups' boxes are merged
    until no two come within the tolerance (plus two voxels) of each other. Each box
    keeps a margin of :data:`CROP_MARGIN` voxels of background for the surface kernel.

    Args:
        gt: ground-truth mask (bool).
        pred: predicted mask (bool), same shape.
        spacing_mm: voxel spacing in the arrays' axis order.
        tolerance_mm: the NSD tolerance the groups must be apart by.
        block: edge of the coarse blocks in voxels (speed only; any value is exact).

    Returns:
        Slices per box (usually one; one per far-apart cluster of stray voxels).
    """
    box = union_bounding_box(gt, pred, margin=0)
    if box is None:
        return []
    union = gt[box] | pred[box]
    coarse = union
    for axis, n in enumerate(union.shape):
        coarse = np.logical_or.reduceat(coarse, np.arange(0, n, block), axis=axis)
    labels, _ = ndimage.label(coarse, structure=np.ones((3,) * coarse.ndim, bool))
    starts = np.array([s.start for s in box])
    shape = np.array(union.shape)
    lo, hi = [], []
    for obj in ndimage.find_objects(labels):
        lo.append(starts + np.array([s.start for s in obj]) * block)
        hi.append(starts + np.minimum(np.array([s.stop for s in obj]) * block, shape))
    # Boxes closer than this (in voxels, per axis) may hold surfels within the tolerance.
    reach = np.array([math.ceil(tolerance_mm / s) + 2 for s in spacing_mm])
    lo_m, hi_m = _merge_boxes(np.array(lo), np.array(hi), reach)
    return [
        tuple(
            slice(max(int(a) - CROP_MARGIN, 0), min(int(b) + CROP_MARGIN, n))
            for a, b, n in zip(lo_row, hi_row, gt.shape, strict=True)
        )
        for lo_row, hi_row in zip(lo_m, hi_m, strict=True)
    ]


def flare_scores(
    gt: np.ndarray,
    pred: np.ndarray,
    spacing_mm: Sequence[float],
    tolerance_mm: float = DEFAULT_TOLERANCE_MM,
) -> Scores:
    """DSC and NSD of one case with the FLARE24 Task 1 conventions.

    - both masks empty: DSC = NSD = 1;
    - exactly one empty: DSC = NSD = 0;
    - DSC < 0.2: NSD = 0 (surfaces not computed);
    - otherwise NSD = :func:`surface_dice` at ``tolerance_mm``.

    Args:
        gt: ground-truth lesion mask (bool), (z, y, x).
        pred: predicted lesion mask (bool), same shape.
        spacing_mm: voxel spacing in the arrays' axis order (``Geometry.spacing_zyx_mm``).
        tolerance_mm: NSD tolerance.

    Returns:
        The case's :class:`Scores`.
    """
    _check_pair(gt, pred)
    gt_any, pred_any = bool(gt.any()), bool(pred.any())
    if not gt_any and not pred_any:
        return Scores(1.0, 1.0)
    if not gt_any or not pred_any:
        return Scores(0.0, 0.0)
    box = union_bounding_box(gt, pred)
    # Everything below works on the crop: it holds all foreground of both masks.
    gt_c, pred_c = gt[box], pred[box]
    dsc = dice(gt_c, pred_c)
    if dsc < MIN_DSC_FOR_NSD:
        return Scores(dsc, 0.0)
    return Scores(dsc, surface_dice(gt_c, pred_c, spacing_mm, tolerance_mm))


def _surface_areas(
    gt: np.ndarray, pred: np.ndarray, spacing_mm: list[float], tolerance_mm: float
) -> tuple[float, float]:
    """Matched and total surfel area (mm²) of both masks in one crop.

    The sums are those of ``compute_surface_dice_at_tolerance``, kept apart so that crops
    can be added up.
    """
    has_gt, has_pred = bool(gt.any()), bool(pred.any())
    with warnings.catch_warnings():
        # surface_distance 0.1 calls scipy.ndimage.filters/morphology, deprecated aliases
        # that still work; the warning would only bury the user's output.
        warnings.simplefilter("ignore", DeprecationWarning)
        if has_gt and has_pred:
            d = surface_distance.compute_surface_distances(
                np.ascontiguousarray(gt), np.ascontiguousarray(pred), spacing_mm
            )
            matched = float(np.sum(d["surfel_areas_gt"][d["distances_gt_to_pred"] <= tolerance_mm]))
            matched += float(
                np.sum(d["surfel_areas_pred"][d["distances_pred_to_gt"] <= tolerance_mm])
            )
            total = float(np.sum(d["surfel_areas_gt"]) + np.sum(d["surfel_areas_pred"]))
            return matched, total
        # Only one mask here: nothing in this crop can match. The package cannot measure
        # one mask against an empty one (it fails on NumPy 2), so the surface area comes
        # from comparing the mask with itself.
        mask = np.ascontiguousarray(gt if has_gt else pred)
        d = surface_distance.compute_surface_distances(mask, mask, spacing_mm)
        return 0.0, float(np.sum(d["surfel_areas_gt"]))


def _merge_boxes(
    lo: np.ndarray, hi: np.ndarray, reach: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Merge boxes ``[lo, hi)`` until no two come within ``reach`` voxels of each other."""
    lo, hi = lo.copy(), hi.copy()
    i = 0
    while i < len(lo):
        near = np.all((lo - reach < hi[i]) & (lo[i] < hi + reach), axis=1)
        near[i] = False
        if near.any():
            lo[i] = np.minimum(lo[i], lo[near].min(axis=0))
            hi[i] = np.maximum(hi[i], hi[near].max(axis=0))
            keep = ~near
            lo, hi = lo[keep], hi[keep]
            i = int(np.count_nonzero(keep[:i]))  # the grown box may now reach others: retry
            continue
        i += 1
    return lo, hi


def _check_pair(gt: np.ndarray, pred: np.ndarray) -> None:
    if gt.dtype != np.bool_ or pred.dtype != np.bool_:
        raise TypeError(f"masks must be bool arrays, got {gt.dtype} and {pred.dtype}")
    if gt.shape != pred.shape:
        raise ValueError(f"mask shapes differ: {gt.shape} != {pred.shape}")


def _any_except(mask: np.ndarray, axis: int) -> np.ndarray:
    """Projection of ``mask`` onto ``axis`` (True where any voxel of that index is set)."""
    return np.any(mask, axis=tuple(a for a in range(mask.ndim) if a != axis))


def _span(profile: np.ndarray) -> tuple[int, int] | None:
    """First and last True index of a 1-D profile, or None."""
    idx = np.flatnonzero(profile)
    if idx.size == 0:
        return None
    return int(idx[0]), int(idx[-1])
