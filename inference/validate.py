"""Checks on an input image before prediction: refuse what cannot be predicted, repair the rest.

A challenge submission is better off predicting an odd case than skipping it (a missing
output scores zero), so only inputs that have no meaningful 3-D geometry are refused;
everything else is predicted, with a note for the log.
"""

from __future__ import annotations

import math

import numpy as np

from inference.nifti import Geometry

#: HU outside this range is not CT as stored by scanners; CT normalisation clips it anyway.
PLAUSIBLE_HU = (-4096.0, 16384.0)
#: Spacing ratios beyond this are worth a note (the resampled size is checked separately).
ANISOTROPY_NOTE = 20.0


class InputError(ValueError):
    """An input image that cannot be predicted; the message is one line for the user."""


def check_image(array: np.ndarray, geometry: Geometry) -> tuple[np.ndarray, list[str]]:
    """Validate an image read from disk and return a usable array with notes.

    Args:
        array: voxel values in (z, y, x) order as read.
        geometry: the image's geometry.

    Returns:
        ``(array, notes)``: the array (float64 converted to float32, non-finite values
        replaced) and one short note per repair or oddity.

    Raises:
        InputError: 2-D or 4-D images, non-positive or non-finite spacing, non-numeric
            voxels, or an image without a single finite voxel.
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
        if n_bad:
            if n_bad == array.size:
                raise InputError("no finite voxel values (all NaN or Inf)")
            lo, hi = float(array[finite].min()), float(array[finite].max())
            array = np.nan_to_num(array, nan=lo, posinf=hi, neginf=lo)
            notes.append(f"{n_bad} NaN/Inf voxels replaced by the image's finite min/max")

    lo, hi = float(array.min()), float(array.max())
    if lo < PLAUSIBLE_HU[0] or hi > PLAUSIBLE_HU[1]:
        notes.append(f"intensities {lo:.0f}..{hi:.0f} outside plausible HU; normalisation clips")
    if min(array.shape) == 1:
        notes.append("a single slice along one axis; predicted as a thin volume")
    if max(spacing) / min(spacing) > ANISOTROPY_NOTE:
        notes.append(f"strongly anisotropic spacing {tuple(round(s, 4) for s in spacing)} mm")
    return array, notes
