"""Checks on an input image before prediction: refuse what cannot be predicted, repair the rest.

A challenge submission is better off predicting an odd case than skipping it (a missing
output scores zero), so only inputs that have no meaningful 3-D geometry are refused;
everything else is predicted, with a note for the log.

Refused (``InputError``, the case is skipped): 2-D images and 4-D images with more than
one volume; a non-positive or non-finite spacing in the geometry; non-numeric or complex
voxels; an image less than half a voxel thick at the model's spacing.

Predicted with a note: a single slice; an image smaller than the network's patch (the
sliding window zero-pads it); NaN/Inf voxels (replaced by the finite min/max) or no
finite voxel at all (predicted as air); float64 voxels (converted) and uint8 voxels (not
HU); intensities outside the plausible HU range (normalisation clips them); a header
spacing of 0 or NaN (SimpleITK reads 1 mm) or below 0 (read as its absolute value with the
axis flipped); a header size (``dim``) of 0 or below 0 along an axis (SimpleITK reads one
voxel there); strongly anisotropic spacing; for a CT model, no voxel above the body
threshold or intensities far from the plans' foreground range (not HU, or shifted).

Files that are not NIfTI, empty or truncated are refused earlier, by ``inference.nifti``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from inference.nifti import Geometry, NiftiHeader

#: HU outside this range is not CT as stored by scanners; CT normalisation clips it anyway.
PLAUSIBLE_HU = (-4096.0, 16384.0)
#: Spacing ratios beyond this are worth a note (the resampled size is checked separately).
ANISOTROPY_NOTE = 20.0
#: Image intensities vs the plans' foreground range (:func:`check_intensity_for_model`):
#: a CT in HU has far more than 1% of its voxels inside the range (soft tissue) and, when
#: the range starts above air, far more than 1% below it (air around and inside the body).
MIN_SHARE = 0.01
#: Air in HU, with room for noise: a range starting above it has air below it.
AIR_LEVEL_HU = -950.0
#: Below this median the image is mostly darker than air: shifted down, or not HU.
MIN_MEDIAN_HU = -1100.0
#: Every n-th voxel along each axis is sampled for those shares (1/64 of the image).
INTENSITY_STRIDE = 4
#: The value an image without a single finite voxel is predicted as: air in HU.
AIR_HU = -1024.0
_AXES_XYZ = "xyz"


class InputError(ValueError):
    """An input image that cannot be predicted; the message is one line for the user."""


def check_header(header: NiftiHeader | None) -> list[str]:
    """Notes on header fields that SimpleITK silently repairs (the case is still predicted).

    NIfTI allows ``pixdim`` values that are not voxel sizes. SimpleITK reads a spacing of
    0 or NaN as 1.0 mm and a negative one as its absolute value with the axis direction
    flipped, so the image is predicted on that geometry; the note says so. A ``dim`` of 0
    or below 0 is read as one voxel along that axis: the image read is then not what the
    file's data holds (its length cannot be checked either).

    Args:
        header: the raw header from :func:`inference.nifti.read_header` (None: not NIfTI).

    Returns:
        One note per odd spatial spacing.
    """
    if header is None:
        return []
    notes = []
    for k, size in enumerate(header.dim):
        if size < 1:
            axis = f" ({_AXES_XYZ[k]})" if k < 3 else ""
            notes.append(
                f"header dim[{k + 1}]{axis} is {size}; SimpleITK reads one voxel along it, "
                "so the image may not be what the file holds"
            )
    for axis, value in zip(_AXES_XYZ, header.pixdim[:3], strict=False):
        if not math.isfinite(value) or value == 0:
            notes.append(
                f"header voxel spacing along {axis} is {value:g}; SimpleITK reads it as 1 mm"
            )
        elif value < 0:
            notes.append(
                f"negative header voxel spacing along {axis} ({value:g} mm); read as "
                f"{-value:g} mm with the axis direction flipped"
            )
    return notes


def check_image(array: np.ndarray, geometry: Geometry) -> tuple[np.ndarray, list[str]]:
    """Validate an image read from disk and return a usable array with notes.

    Args:
        array: voxel values in (z, y, x) order as read.
        geometry: the image's geometry.

    Returns:
        ``(array, notes)``: the array (float64 converted to float32, non-finite values
        replaced) and one short note per repair or oddity.

    Raises:
        InputError: 2-D or 4-D images, non-positive or non-finite spacing, or non-numeric
            voxels.
    """
    notes: list[str] = []
    if array.ndim != 3:
        size = "x".join(str(s) for s in geometry.size_xyz)
        raise InputError(f"{array.ndim}-D image (size {size}); a 3-D CT volume is expected")
    spacing = geometry.spacing_xyz_mm
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise InputError(f"invalid voxel spacing {spacing} mm (must be positive)")
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.number):
        raise InputError(f"voxel type {array.dtype} is not a CT intensity")
    if np.iscomplexobj(array):
        raise InputError("complex voxel values")

    if array.dtype == np.float64:
        array = array.astype(np.float32)
        notes.append("float64 voxels converted to float32")
    if array.dtype == np.uint8:
        notes.append("uint8 voxels: values 0..255 are not Hounsfield units; predicting anyway")

    if np.issubdtype(array.dtype, np.floating):
        finite = np.isfinite(array)
        n_bad = int(array.size - np.count_nonzero(finite))
        if n_bad == array.size:
            # Geometry is intact, so an (almost surely empty) mask still beats no output.
            array = np.full(array.shape, AIR_HU, dtype=array.dtype)
            notes.append(f"no finite voxel value (all NaN/Inf); predicted as air ({AIR_HU:g})")
        elif n_bad:
            lo, hi = float(array[finite].min()), float(array[finite].max())
            array = np.nan_to_num(array, nan=lo, posinf=hi, neginf=lo)
            notes.append(f"{n_bad} NaN/Inf voxels replaced by the image's finite min/max")
        del finite

    lo, hi = float(array.min()), float(array.max())
    if lo < PLAUSIBLE_HU[0] or hi > PLAUSIBLE_HU[1]:
        notes.append(
            f"intensities {lo:.4g}..{hi:.4g} outside the plausible HU range; "
            "normalisation clips them"
        )
    if min(array.shape) == 1:
        notes.append("a single slice along one axis; predicted as a thin volume")
    if max(spacing) / min(spacing) > ANISOTROPY_NOTE:
        notes.append(f"strongly anisotropic spacing {_fmt(spacing)} mm")
    return array, notes


def check_for_model(
    shape_zyx: Sequence[int],
    spacing_zyx_mm: Sequence[float],
    target_spacing_mm: Sequence[float],
    transpose_forward: Sequence[int],
    patch_size: Sequence[int],
) -> list[str]:
    """Check an image's size at a model's spacing: too thin to predict, or smaller than a patch.

    Args:
        shape_zyx: array shape as read.
        spacing_zyx_mm: spacing in the same order.
        target_spacing_mm: the model's spacing, in its transposed axis order.
        transpose_forward: the model's axis order (position i holds array axis
            ``transpose_forward[i]``).
        patch_size: the network's tile size, transposed order.

    Returns:
        Notes: along some axis the image is thinner than half a voxel at the model's
        spacing (it is resampled to one voxel there), or the resampled image is smaller
        than the patch (the sliding window pads it with zeros, which costs accuracy near
        the border only).
    """
    small, notes = [], []
    for pos, axis in enumerate(transpose_forward):
        extent_mm = shape_zyx[axis] * spacing_zyx_mm[axis]
        n = round(extent_mm / target_spacing_mm[pos])
        name = "zyx"[axis]
        if n < 1:
            notes.append(
                f"along {name} the image spans {extent_mm:.3g} mm, less than half a voxel at "
                f"the model's {target_spacing_mm[pos]:g} mm spacing; resampled to one voxel"
            )
            n = 1
        if n < patch_size[pos]:
            small.append(f"{name} {n} < {patch_size[pos]}")
    if small:
        notes.append(
            f"smaller than the network's patch at the model's spacing ({', '.join(small)} "
            "voxels); zero-padded"
        )
    return notes


def check_intensity_for_model(
    array: np.ndarray,
    body_threshold_hu: float,
    foreground_window_hu: tuple[float, float],
) -> list[str]:
    """Check that an image's intensities look like the CT a model was trained on.

    Signs that the values are not Hounsfield units as the plans expect (shifted by an
    ignored rescale intercept, say, or another modality): not one voxel above the body
    threshold (every tile looks like air, the mask will be empty); or values that miss the
    plans' foreground range (0.5th..99.5th percentile of the training foreground), which
    CT normalisation clips to its ends: fewer than :data:`MIN_SHARE` of the voxels inside
    it, or, for a range that starts above air, fewer than that below it (no air: shifted
    up); or a median below :data:`MIN_MEDIAN_HU` (mostly darker than air: shifted down).
    A shifted image whose bone still reaches into the range, in a field of view filled by
    the body, can pass. The shares and the median come from every
    :data:`INTENSITY_STRIDE`-th voxel along each axis, so the check costs one pass over
    the image (its maximum) and a small sample.

    Args:
        array: the image as read (z, y, x), in its stored units.
        body_threshold_hu: the value above which a voxel is body (see inference.air).
        foreground_window_hu: the plans' foreground ``(percentile_00_5, percentile_99_5)``.

    Returns:
        At most one note.
    """
    hi = float(array.max())
    lo_fg, hi_fg = foreground_window_hu
    if hi <= body_threshold_hu:
        return [
            f"no voxel above the body threshold {body_threshold_hu:g} HU (the image's maximum "
            f"is {hi:.4g}): every tile looks like air and the mask will be empty; are the "
            "intensities Hounsfield units?"
        ]
    sample = array[(slice(None, None, INTENSITY_STRIDE),) * array.ndim]
    inside = float(np.count_nonzero((sample >= lo_fg) & (sample <= hi_fg))) / sample.size
    below = float(np.count_nonzero(sample < lo_fg)) / sample.size
    median = float(np.median(sample))
    no_air = lo_fg > AIR_LEVEL_HU and below < MIN_SHARE
    if inside < MIN_SHARE or no_air or median < MIN_MEDIAN_HU:
        return [
            f"intensities far from the model's foreground range {lo_fg:g}..{hi_fg:g} HU "
            f"({100 * inside:.1f}% of the voxels inside it, {100 * below:.1f}% below; median "
            f"{median:.4g}): predicting anyway; are they Hounsfield units?"
        ]
    return []


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"
