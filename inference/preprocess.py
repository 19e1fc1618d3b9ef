"""Prepare an image for the network as nnU-Net's DefaultPreprocessor does, with torch.

Order of operations (nnU-Net's): transpose -> crop to the nonzero bounding box ->
normalise -> resample to the target spacing. The resampling runs in slabs along the first
axis on the compute device, so the full-resolution float copy of the image never exists:
only the int16 input (host) and the resampled result (device or host) are whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from inference.model import Preprocessing
from inference.resample import (
    ResamplePlan,
    input_range,
    needs_clip,
    output_shape,
    plan_resampling,
    resample_slab,
)

#: Float32 working set per slab on the compute device (input slab + resampled slab).
SLAB_BYTES = 96 * 2**20


@dataclass(frozen=True)
class Prepared:
    """What is needed to map predictions of a preprocessed image back to its input grid.

    Attributes:
        bbox: crop box (start, stop) per axis, transposed order.
        shape_transposed: shape before cropping, transposed order.
        spacing_transposed: original spacing, transposed order.
    """

    bbox: tuple[tuple[int, int], ...]
    shape_transposed: tuple[int, ...]
    spacing_transposed: tuple[float, ...]

    @property
    def shape_cropped(self) -> tuple[int, ...]:
        """Shape of the cropped image before resampling."""
        return tuple(b - a for a, b in self.bbox)


def nonzero_bbox(array: np.ndarray) -> tuple[tuple[int, int], ...]:
    """Half-open bounding box of the nonzero voxels (the whole image if none are nonzero).

    nnU-Net fills holes in the nonzero mask before taking the box, which never changes
    the box itself, so the box is computed from the mask directly.
    """
    mask = array != 0
    box = []
    for axis in range(array.ndim):
        others = tuple(a for a in range(array.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=others))
        if hits.size == 0:
            return tuple((0, s) for s in array.shape)
        box.append((int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def body_bbox(
    array: np.ndarray, threshold_hu: float, margin_vox: tuple[int, ...]
) -> tuple[tuple[int, int], ...]:
    """Bounding box of voxels above ``threshold_hu`` (the body, table included), with a margin.

    Tiles that lie entirely in the air around the body cost as much as any other and
    predict background; cropping to this box before the sliding window skips them.
    """
    box = nonzero_bbox(array > threshold_hu)
    return tuple(
        (max(0, a - m), min(n, b + m))
        for (a, b), m, n in zip(box, margin_vox, array.shape, strict=True)
    )


def intersect(a: tuple[tuple[int, int], ...], b: tuple[tuple[int, int], ...]):
    """Intersection of two boxes (an empty intersection keeps ``a``)."""
    out = tuple((max(x0, y0), min(x1, y1)) for (x0, x1), (y0, y1) in zip(a, b, strict=True))
    return a if any(lo >= hi for lo, hi in out) else out


def normalizer(array: np.ndarray, prep: Preprocessing):
    """A function that normalises a float tensor in place, with statistics taken from ``array``.

    CT: clip to the foreground percentiles, subtract the mean, divide by the std (values
    from the plans). ZScore: the image's own mean and std. RescaleTo01: its min and max.
    """
    props = prep.intensity
    if prep.normalization == "CTNormalization":
        lo, hi = props["percentile_00_5"], props["percentile_99_5"]
        mean, std = props["mean"], max(props["std"], 1e-8)

        def ct(t: torch.Tensor) -> torch.Tensor:
            return t.clamp_(lo, hi).sub_(mean).div_(std)

        return ct
    if prep.normalization == "ZScoreNormalization":
        as32 = array.astype(np.float32, copy=False)
        mean, std = float(as32.mean()), max(float(as32.std()), 1e-8)
        return lambda t: t.sub_(mean).div_(std)
    if prep.normalization == "RescaleTo01Normalization":
        low = float(array.min())
        span = max(float(array.max()) - low, 1e-8)
        return lambda t: t.sub_(low).div_(span)
    return lambda t: t


def clip_bounds(
    array: np.ndarray, plan: ResamplePlan, normalize, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Bounds for cubic clipping that span the slab axis, from the raw array.

    Every supported normalisation is increasing, so the bounds of the normalised image are
    the normalised bounds of the raw one.
    """
    if not needs_clip(plan) or plan.separate_axis == 0:
        return None
    if plan.separate_axis is None:
        lo = torch.tensor(float(array.min()), dtype=torch.float32)
        hi = torch.tensor(float(array.max()), dtype=torch.float32)
    else:
        axes = tuple(a for a in range(array.ndim) if a != plan.separate_axis)
        lo = torch.from_numpy(array.min(axis=axes, keepdims=True).astype(np.float32))[None]
        hi = torch.from_numpy(array.max(axis=axes, keepdims=True).astype(np.float32))[None]
    return normalize(lo).to(device), normalize(hi).to(device)


def prepare(
    array_zyx: np.ndarray,
    spacing_zyx_mm: Sequence[float],
    prep: Preprocessing,
    compute_device: torch.device,
    out_device: torch.device | None = None,
    out_dtype: torch.dtype = torch.float32,
    pin_memory: bool = False,
    body_threshold_hu: float | None = None,
    body_margin_mm: float = 10.0,
) -> tuple[torch.Tensor, Prepared]:
    """Transpose, crop, normalise and resample an image for the network.

    Args:
        array_zyx: the image as read (any real dtype), (z, y, x).
        spacing_zyx_mm: its spacing in the same order.
        prep: the model's preprocessing.
        compute_device: where normalisation and resampling run.
        out_device: where the result is kept (default: ``compute_device``).
        out_dtype: dtype of the result (float16 halves it; under float16 autocast the
            network casts its input to float16 anyway).
        pin_memory: allocate a host result in pinned memory (faster tile uploads).
        body_threshold_hu: when set (CT only), also crop to the box of voxels above this
            intensity plus ``body_margin_mm``: fewer tiles over air. nnU-Net does not do
            this, so tile positions (and the averaging) differ slightly from its output.
        body_margin_mm: margin kept around the body box.

    Returns:
        The (1, z, y, x) network input at the target spacing, and the record needed to
        restore predictions to the input grid.
    """
    out_device = out_device or compute_device
    transposed = array_zyx.transpose(prep.transpose_forward)
    spacing_t = tuple(float(spacing_zyx_mm[a]) for a in prep.transpose_forward)
    bbox = nonzero_bbox(transposed)
    if body_threshold_hu is not None and prep.normalization == "CTNormalization":
        margin = tuple(int(np.ceil(body_margin_mm / s)) for s in spacing_t)
        bbox = intersect(bbox, body_bbox(transposed, body_threshold_hu, margin))
    cropped = transposed[tuple(slice(a, b) for a, b in bbox)]
    target_shape = output_shape(cropped.shape, spacing_t, prep.spacing_mm)
    plan = plan_resampling(
        cropped.shape,
        target_shape,
        spacing_t,
        prep.spacing_mm,
        prep.data_order,
        prep.data_order_z,
        prep.data_force_separate_z,
    )
    normalize = normalizer(cropped, prep)
    bounds = clip_bounds(cropped, plan, normalize, compute_device)

    out = torch.empty(
        (1, *target_shape),
        dtype=out_dtype,
        device=out_device,
        pin_memory=pin_memory and out_device.type == "cpu",
    )
    slice_bytes = 4 * int(np.prod(target_shape[1:])) * 2
    slab = max(1, SLAB_BYTES // max(slice_bytes, 1))
    for start in range(0, target_shape[0], slab):
        stop = min(target_shape[0], start + slab)
        lo, hi = input_range(plan.axes[0], start, stop)
        source = torch.from_numpy(np.ascontiguousarray(cropped[lo:hi]))
        piece = source.to(compute_device)
        # normalisation works in place: never on the caller's array
        piece = piece.to(torch.float32, copy=piece.data_ptr() == source.data_ptr())[None]
        piece = normalize(piece)
        piece = resample_slab(piece, plan, start, stop, lo, bounds)
        out[:, start:stop] = piece.to(device=out_device, dtype=out_dtype)
    return out, Prepared(bbox, tuple(transposed.shape), spacing_t)
