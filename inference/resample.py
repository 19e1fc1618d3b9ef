"""Separable resampling in torch that reproduces nnU-Net's resampling.

nnU-Net resamples with scikit-image / scipy on the CPU (``default_resampling.py``): spline
order 3 for images and order 1 for logits, and on anisotropic data it resamples the
in-plane axes with that order and the out-of-plane axis with ``order_z`` (0: nearest).
That path is the largest cost outside the network in nnU-Net's predictor, so the method
replaces it with torch on the device. This module reproduces it axis by axis:

* order 0: nearest neighbour, as ``map_coordinates(order=0)``;
* order 1: linear, as scikit-image's order-1 ``resize``;
* order 3: cubic B-spline, as ``scipy.ndimage.zoom(order=3, mode="nearest",
  grid_mode=True)`` behind scikit-image's ``resize``: the samples are edge-extended,
  turned into B-spline coefficients by the recursive prefilter (pole sqrt(3) - 2), and
  the spline is evaluated at the half-pixel-mapped coordinates; output is clipped to the
  input range as ``resize(clip=True)`` does.

The B-spline is a tensor product and its prefilter is separable, so resampling one axis
after another gives scipy's 3-D result up to float rounding. Each axis reads a bounded
neighbourhood (the prefilter's influence decays by 0.27 per sample and is cut after
``SPLINE_CONTEXT`` samples), so the work can be cut into slabs along z with the same
result as the whole volume.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

#: nnU-Net's ANISO_THRESHOLD: spacings more anisotropic than this get a separate z axis.
ANISOTROPY_THRESHOLD = 3.0


@dataclass(frozen=True)
class AxisPlan:
    """How one axis is resampled.

    Attributes:
        size_in: input length along the axis.
        size_out: output length along the axis.
        order: interpolation order on this axis (0 nearest, 1 linear, 3 cubic).
    """

    size_in: int
    size_out: int
    order: int

    @property
    def identity(self) -> bool:
        """True when the axis keeps its size (nnU-Net does not touch such an axis)."""
        return self.size_in == self.size_out


def separate_z_axis(
    current_spacing: Sequence[float],
    new_spacing: Sequence[float],
    force_separate_z: bool | None = None,
    threshold: float = ANISOTROPY_THRESHOLD,
) -> int | None:
    """The axis nnU-Net resamples separately (with ``order_z``), or None.

    Mirrors ``nnunetv2.preprocessing.resampling.default_resampling.determine_do_sep_z_and_axis``:
    the current spacing decides first, then the new spacing; the low-resolution axis must be
    unique, otherwise nothing is resampled separately.
    """

    def lowres_axes(spacing: Sequence[float]) -> list[int]:
        top = max(spacing)
        return [i for i, s in enumerate(spacing) if top / s == 1]

    def anisotropic(spacing: Sequence[float]) -> bool:
        return max(spacing) / min(spacing) > threshold

    if force_separate_z is not None:
        axes = lowres_axes(current_spacing) if force_separate_z else []
    elif anisotropic(current_spacing):
        axes = lowres_axes(current_spacing)
    elif anisotropic(new_spacing):
        axes = lowres_axes(new_spacing)
    else:
        axes = []
    return axes[0] if len(axes) == 1 else None


@dataclass(frozen=True)
class ResamplePlan:
    """How a volume goes from one grid to another, axis by axis.

    Attributes:
        axes: one AxisPlan per spatial axis.
        separate_axis: the low-resolution axis nnU-Net treats on its own, or None.
    """

    axes: tuple[AxisPlan, ...]
    separate_axis: int | None

    @property
    def shape_in(self) -> tuple[int, ...]:
        """Spatial input shape."""
        return tuple(a.size_in for a in self.axes)

    @property
    def shape_out(self) -> tuple[int, ...]:
        """Spatial output shape."""
        return tuple(a.size_out for a in self.axes)

    @property
    def identity(self) -> bool:
        """True when no axis changes size."""
        return all(a.identity for a in self.axes)


def plan_resampling(
    shape_in: Sequence[int],
    shape_out: Sequence[int],
    current_spacing: Sequence[float],
    new_spacing: Sequence[float],
    order: int,
    order_z: int,
    force_separate_z: bool | None = None,
) -> ResamplePlan:
    """Interpolation plan equivalent to nnU-Net's ``resample_data_or_seg_to_shape``.

    Args:
        shape_in: spatial input shape.
        shape_out: spatial output shape.
        current_spacing: spacing of the input grid (mm), same axis order as the shapes.
        new_spacing: spacing of the output grid (mm).
        order: interpolation order for the (in-plane) axes.
        order_z: order for the separate low-resolution axis, if there is one.
        force_separate_z: nnU-Net's ``force_separate_z`` (None: decide from the spacings).
    """
    z_axis = separate_z_axis(current_spacing, new_spacing, force_separate_z)
    axes = tuple(
        AxisPlan(int(n_in), int(n_out), order_z if axis == z_axis else order)
        for axis, (n_in, n_out) in enumerate(zip(shape_in, shape_out, strict=True))
    )
    return ResamplePlan(axes, z_axis)


def source_coordinates(plan: AxisPlan, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Input coordinates (float64) of output samples ``start..stop`` (half-pixel mapping).

    This is scikit-image's and nnU-Net's mapping: ``x_in = (x_out + 0.5) * n_in / n_out - 0.5``.
    """
    stop = plan.size_out if stop is None else stop
    scale = plan.size_in / plan.size_out
    out = torch.arange(start, stop, dtype=torch.float64)
    return (out + 0.5) * scale - 0.5


def _taps(plan: AxisPlan, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Input indices (int64, clamped to the edge) and weights (float64) per output sample.

    For order 3 the indices address B-spline coefficients, whose grid is the input grid
    extended beyond both edges (index -1 is the coefficient left of the first sample).

    Returns:
        ``(indices, weights)``, each of shape (stop - start, n_taps).
    """
    coords = source_coordinates(plan, start, stop)
    last = plan.size_in - 1
    if plan.order == 0:
        idx = torch.floor(coords + 0.5).to(torch.int64).clamp_(0, last)
        return idx[:, None], torch.ones_like(coords)[:, None]
    base = torch.floor(coords)
    frac = coords - base
    base = base.to(torch.int64)
    if plan.order == 1:
        idx = torch.stack([base, base + 1], dim=1).clamp_(0, last)
        weights = torch.stack([1.0 - frac, frac], dim=1)
        return idx, weights
    if plan.order == 3:
        offsets = torch.arange(-1, 3, dtype=torch.int64)
        idx = base[:, None] + offsets[None, :]
        dist = (frac[:, None] - offsets[None, :].to(torch.float64)).abs()
        return idx, _cubic_bspline(dist)
    raise ValueError(f"unsupported interpolation order {plan.order} (use 0, 1 or 3)")


def _cubic_bspline(dist: torch.Tensor) -> torch.Tensor:
    """The cubic B-spline basis function at absolute distances ``dist``."""
    near = 2.0 / 3.0 - dist**2 + 0.5 * dist**3
    far = (2.0 - dist) ** 3 / 6.0
    return torch.where(dist < 1, near, torch.where(dist < 2, far, torch.zeros_like(dist)))


#: Pole of the cubic B-spline prefilter.
SPLINE_POLE = math.sqrt(3.0) - 2.0
#: Samples of context on each side of a coefficient; the prefilter's influence beyond is
#: below 0.27 ** 16 = 1e-9 of the signal.
SPLINE_CONTEXT = 16


def _coefficient_span(plan: AxisPlan, start: int, stop: int) -> tuple[int, int]:
    """Inclusive range of extended input indices whose samples the outputs depend on."""
    idx, _ = _taps(plan, start, stop)
    return int(idx.min()) - SPLINE_CONTEXT, int(idx.max()) + SPLINE_CONTEXT


def bspline_coefficients(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Cubic B-spline coefficients of ``x`` along ``dim`` (recursive prefilter, gain 6).

    The two recursions start from the steady state of a constant signal, i.e. the samples
    are taken as continued by their edge values: the same boundary as scipy's ``nearest``
    mode. Callers extend ``x`` by :data:`SPLINE_CONTEXT` samples so that the start
    matters only below float precision.
    """
    z = SPLINE_POLE
    t = x.movedim(dim, 0).contiguous()
    n = t.shape[0]
    causal = torch.empty_like(t)
    causal[0] = t[0] / (1.0 - z)
    for k in range(1, n):
        torch.add(t[k], causal[k - 1], alpha=z, out=causal[k])
    # the anticausal pass overwrites the causal buffer from the end
    coef = causal
    coef[n - 1] = causal[n - 1] * (-z / (1.0 - z))
    for k in range(n - 2, -1, -1):
        torch.sub(coef[k + 1], causal[k], out=coef[k])
        coef[k].mul_(z)
    coef.mul_(6.0)
    return coef.movedim(0, dim)


def input_range(plan: AxisPlan, start: int, stop: int) -> tuple[int, int]:
    """The half-open range of input indices that output samples ``start..stop`` read."""
    if plan.identity:
        return start, stop
    if plan.order == 3:
        lo, hi = _coefficient_span(plan, start, stop)
        return max(0, lo), min(plan.size_in, hi + 1)
    idx, _ = _taps(plan, start, stop)
    return int(idx.min()), int(idx.max()) + 1


def resample_axis(
    x: torch.Tensor,
    dim: int,
    plan: AxisPlan,
    start: int = 0,
    stop: int | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """Resample tensor ``x`` along ``dim`` and return output samples ``start..stop``.

    Args:
        x: input tensor (any dtype the device can do arithmetic in; float16/32 here).
        dim: the axis of ``x`` to resample.
        plan: sizes and order for this axis.
        start: first output index to produce.
        stop: one past the last output index (default: all).
        offset: index of ``x``'s first element along ``dim`` in the full input axis
            (when ``x`` is a slab cut out with :func:`input_range`).

    Returns:
        A tensor like ``x`` whose ``dim`` has ``stop - start`` samples.
    """
    stop = plan.size_out if stop is None else stop
    if plan.identity:
        return x.narrow(dim, start - offset, stop - start)
    idx, weights = _taps(plan, start, stop)
    if plan.order == 3:
        # Edge-extend the samples the outputs depend on, turn them into B-spline
        # coefficients, and index those instead of the samples.
        lo, hi = _coefficient_span(plan, start, stop)
        source = torch.arange(lo, hi + 1).clamp_(0, plan.size_in - 1) - offset
        if int(source.min()) < 0 or int(source.max()) >= x.shape[dim]:
            raise ValueError("slab does not cover the input range needed for these outputs")
        x = bspline_coefficients(x.index_select(dim, source.to(x.device)), dim)
        idx = idx - lo
        offset = 0
    idx = idx - offset
    if int(idx.min()) < 0 or int(idx.max()) >= x.shape[dim]:
        raise ValueError("slab does not cover the input range needed for these outputs")
    idx = idx.to(x.device)
    n_out, n_taps = idx.shape
    view = [1] * x.ndim
    view[dim] = n_out
    out = None
    for k in range(n_taps):
        sample = x.index_select(dim, idx[:, k])
        if n_taps == 1:
            return sample
        w = weights[:, k].to(device=x.device, dtype=x.dtype).view(view)
        out = sample.mul_(w) if out is None else out.addcmul_(sample, w)
    return out


def needs_clip(plan: ResamplePlan) -> bool:
    """True when an in-plane axis is cubic: scikit-image clips such output to the input range."""
    return any(
        a.order == 3 and not a.identity for i, a in enumerate(plan.axes) if i != plan.separate_axis
    )


def value_bounds(x: torch.Tensor, plan: ResamplePlan) -> tuple[torch.Tensor, torch.Tensor]:
    """The range cubic output is clipped to, as scikit-image's ``resize(clip=True)`` does.

    Without a separate axis nnU-Net resizes the whole volume at once: the bounds are the
    volume's min and max. With a separate axis it resizes slice by slice along that axis:
    the bounds are per slice (shape broadcastable to ``x``).
    """
    spatial = len(plan.axes)
    lead = x.ndim - spatial
    if plan.separate_axis is None:
        return x.amin(), x.amax()
    dims = [lead + a for a in range(spatial) if a != plan.separate_axis]
    return x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)


def resample_slab(
    x: torch.Tensor,
    plan: ResamplePlan,
    start: int = 0,
    stop: int | None = None,
    offset: int = 0,
    bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Resample the trailing spatial axes of ``x``; produce outputs ``start..stop`` of axis 0.

    ``x`` may be the whole input or a slab along the first spatial axis that covers
    :func:`input_range` of the requested outputs (``offset`` = its first input index).

    Args:
        x: tensor whose trailing ``len(plan.axes)`` axes are spatial.
        plan: the plan from :func:`plan_resampling`.
        start: first output index along the first spatial axis.
        stop: one past the last output index (default: all).
        offset: input index of ``x``'s first slice along the first spatial axis.
        bounds: clipping bounds from :func:`value_bounds` of the whole input. Needed only
            for slabs of cubic data whose clipping range spans the first axis (no
            separate axis, or a separate axis other than the first); computed here
            otherwise.

    Returns:
        The resampled slab.
    """
    spatial = len(plan.axes)
    lead = x.ndim - spatial
    stop = plan.axes[0].size_out if stop is None else stop
    sep = plan.separate_axis
    clip = needs_clip(plan)
    whole = offset == 0 and x.shape[lead] == plan.axes[0].size_in
    if clip and bounds is None and sep != 0 and not whole:
        raise ValueError("bounds of the whole input are needed to resample this slab")

    def along(t: torch.Tensor, axis: int) -> torch.Tensor:
        if axis == 0:
            return resample_axis(t, lead, plan.axes[0], start, stop, offset)
        return resample_axis(t, lead + axis, plan.axes[axis])

    def inplane(t: torch.Tensor) -> torch.Tensor:
        lo_hi = bounds if bounds is not None or not clip else value_bounds(t, plan)
        for axis in range(spatial):
            if axis != sep:
                t = along(t, axis)
        if clip:
            t = torch.maximum(torch.minimum(t, lo_hi[1]), lo_hi[0])
        return t

    if sep is None:
        return inplane(x)
    sep_plan = plan.axes[sep]
    if sep_plan.order == 0 and sep_plan.size_out < sep_plan.size_in:
        # Nearest neighbour only picks slices, which commutes with per-slice resizing and
        # clipping; picking first is cheaper when the axis shrinks.
        return inplane(along(x, sep))
    return along(inplane(x), sep)


def resample(x: torch.Tensor, plan: ResamplePlan) -> torch.Tensor:
    """Resample the whole tensor (see :func:`resample_slab`)."""
    return resample_slab(x, plan)


def output_shape(
    shape_in: Sequence[int], spacing_in: Sequence[float], spacing_out: Sequence[float]
) -> tuple[int, ...]:
    """nnU-Net's ``compute_new_shape``: ``round(spacing_in / spacing_out * shape_in)`` per axis.

    An axis thinner than half a voxel at the new spacing keeps one sample (nnU-Net would
    round it to zero and fail), so even a single thin slice gets a prediction.
    """
    return tuple(
        max(1, round(s_in / s_out * n))
        for n, s_in, s_out in zip(shape_in, spacing_in, spacing_out, strict=True)
    )


def slab_bounds(size: int, slab: int) -> list[tuple[int, int]]:
    """Split ``range(size)`` into consecutive ``[start, stop)`` chunks of at most ``slab``."""
    slab = max(1, int(slab))
    return [(s, min(size, s + slab)) for s in range(0, size, slab)]
