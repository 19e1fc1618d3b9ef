"""Skip the tiles of nnU-Net's own grid that hold no body: the network never sees air.

A CT's field of view is often much wider than the body (a 512x512 slice at 0.8 mm is
41 cm across), and a tile of air costs the network as much as any other. Skipping such
tiles changes nothing for the body, because of how the sliding window averages:

* Tiles stay where nnU-Net puts them (``compute_steps``, unlike ``--crop-body``, which
  moves the grid). Each voxel's logit is ``sum_t G_t(v) l_t(v) / W(v)``, the sum over the
  tiles t that contain v, with ``W(v)`` the sum of their Gaussian weights. The
  accumulator receives every tile's contribution pre-divided by ``W`` (the separable sum
  over *all* tiles, skipped ones included; see :mod:`inference.sliding_window`).
* "Body" is decided on the grid the tiles live on: the preprocessed image (cropped,
  normalised, resampled to the target spacing). A voxel is body when its value is above
  ``threshold_hu`` (default -500 HU, between air at -1000 and fat at -100) mapped through
  the plans' CT normalisation (clip to the foreground percentiles, subtract the mean,
  divide by the std; increasing, so "above" is kept). Only CT normalisation has HU
  semantics; other schemes skip nothing.
* A tile is run when its box, widened by ``margin_vox`` voxels on every side, holds a body
  voxel. So every tile that contains a voxel within ``margin_vox`` of the body is run, and
  such a voxel receives exactly the contributions it receives without skipping, in the
  same order: its accumulated value is bit for bit the no-skip value.
* Voxels covered only by skipped tiles keep the accumulator's initial 0 (a logit
  difference of 0 restores as background: ``> 0`` is foreground, ties go to
  background). Voxels covered by run and skipped tiles keep a partial sum. Both are at
  least ``margin_vox + 1`` voxels from the body. Restoring to the input grid interpolates
  linearly between neighbouring voxels (nnU-Net's order 1 for logits; nearest along a
  separate z axis), so it reads at most one voxel beyond an output voxel's position:
  with ``margin_vox >= 1`` no output voxel whose interpolation neighbours are body
  voxels, or lie within ``margin_vox`` of the body, can see a changed value.

Inside the body, air-like tissue is below the threshold too: lung parenchyma (about
-850 HU), bowel gas. A tile that held nothing else would be skipped and its voxels would
not be guaranteed; vessels and airway walls run through the lungs every few millimetres,
so with the FLARE default network's 96x129x129 mm tiles (the demo model's 32x48x48 mm
ones too) that does not happen in practice, and a lesion (soft tissue, above the
threshold) is always body.

What is guaranteed, exactly: every output voxel whose interpolation neighbours on the
preprocessed grid are "exact" (covered only by run tiles, :func:`exact_mask`; this
includes every voxel within ``margin_vox`` of a preprocessed body voxel) gets the no-skip
label. Body voxels of the input image (above the threshold at the input resolution)
are such voxels unless the resampling has moved the body's edge by more than
``margin_vox`` preprocessed voxels, which a thin structure next to the threshold can do;
``tests/test_air.py`` measures the guaranteed share on wide-field-of-view cases and
checks equality there voxel for voxel. (With a cubic logit resampling, which nnU-Net
does not use for logits by default, the prefilter reaches further and the equality
becomes approximate.)
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from inference.model import Preprocessing
from inference.sliding_window import TileGrid

#: Body threshold (HU): between air (-1000) and fat (about -100). Lung parenchyma (about
#: -850) is below it, but vessels and airway walls (above it) run through the lungs, so a
#: tile in the lungs holds body voxels unless the patch is much smaller than the vessels'
#: spacing (see the module docstring).
BODY_THRESHOLD_HU = -500.0
#: Preprocessed voxels around the body whose tiles are run, so that the logit resampling
#: (reading one neighbour on each side) never mixes a skipped voxel into the body.
MARGIN_VOX = 2
#: Added to the normalised threshold: above float32 rounding of a resampled constant.
ROUNDING_MARGIN = 1e-3


def normalised_threshold(prep: Preprocessing, threshold_hu: float) -> float | None:
    """``threshold_hu`` as a value of the preprocessed image, or None (not CT-normalised).

    The normalisation clips to the plans' foreground percentiles first. When the
    threshold lies below the lower one (a model whose foreground statistics exclude fat,
    say p0.5 = -49 HU), air and everything up to that percentile become one value, and
    "body" can only mean "above the lower percentile": the effective threshold in HU is
    ``max(threshold_hu, p0.5)`` (:func:`effective_threshold_hu`). Cubic resampling
    reproduces a constant only up to float32 rounding, so the threshold is raised by
    :data:`ROUNDING_MARGIN` (in units of the normalised image, i.e. a fraction of the
    foreground std): a field of air never counts as body by a rounding error.
    """
    if prep.normalization != "CTNormalization":
        return None
    props = prep.intensity
    hu = effective_threshold_hu(prep, threshold_hu)
    return (hu - props["mean"]) / max(props["std"], 1e-8) + ROUNDING_MARGIN


def effective_threshold_hu(prep: Preprocessing, threshold_hu: float) -> float:
    """The body threshold in HU after the plans' clipping (see :func:`normalised_threshold`)."""
    props = prep.intensity
    return min(max(threshold_hu, props["percentile_00_5"]), props["percentile_99_5"])


@dataclass(frozen=True)
class TileSelection:
    """Which tiles of a grid are run.

    Attributes:
        grid: nnU-Net's tile grid of the padded image.
        run: one flag per tile, in :meth:`TileGrid.tiles` order.
        pad_before: zero padding added before the image on each axis (the grid's
            coordinates minus these are image coordinates).
    """

    grid: TileGrid
    run: np.ndarray
    pad_before: tuple[int, ...]

    @property
    def n_tiles(self) -> int:
        """Tiles in the grid."""
        return self.grid.n_tiles

    @property
    def n_skipped(self) -> int:
        """Tiles skipped as air."""
        return int((~self.run).sum())


def _pad_before(image_size: Sequence[int], tile_size: Sequence[int]) -> tuple[int, ...]:
    # as inference.sliding_window.pad_to_tile (nnU-Net's pad_nd_image): centred
    return tuple(max(0, t - s) // 2 for s, t in zip(image_size, tile_size, strict=True))


def _cells(
    steps: Sequence[int], tile: int, margin: int, before: int, size: int
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Cut one axis at every widened tile edge.

    Returns:
        The cells (start, stop) in image coordinates, and for each step the range of cell
        indices its widened tile covers.
    """
    spans = [
        (min(max(s - margin - before, 0), size), min(max(s + tile + margin - before, 0), size))
        for s in steps
    ]
    edges = sorted({e for span in spans for e in span} | {0, size})
    cells = list(itertools.pairwise(edges))
    index = {start: i for i, (start, _) in enumerate(cells)}
    covers = []
    for lo, hi in spans:
        first = index.get(lo, len(cells))
        last = first
        while last < len(cells) and cells[last][1] <= hi:
            last += 1
        covers.append((first, last))
    return cells, covers


def _cell_maxima(image: torch.Tensor, cells: list[list[tuple[int, int]]]) -> torch.Tensor:
    """Maximum of ``image`` (z, y, x) over every cell of the axis partitions.

    One pass over the image, then reductions of ever smaller arrays.
    """
    x = image
    for axis, axis_cells in enumerate(cells):
        x = torch.stack([x.narrow(axis, a, b - a).amax(dim=axis) for a, b in axis_cells], axis)
    return x


def select_tiles(
    image: torch.Tensor,
    tile_size: Sequence[int],
    step_size: float,
    threshold: float | None,
    margin_vox: int = MARGIN_VOX,
) -> TileSelection:
    """The tiles of nnU-Net's grid that hold a body voxel (within ``margin_vox``).

    Args:
        image: the preprocessed image (C, z, y, x) before padding, on any device; the
            first channel decides.
        tile_size: the patch size.
        step_size: tile step as a fraction of the patch.
        threshold: body threshold as a preprocessed value (:func:`normalised_threshold`);
            None runs every tile.
        margin_vox: run a tile when a body voxel lies within this many voxels of it.

    Returns:
        The grid and the flags.
    """
    shape = tuple(image.shape[1:])
    padded = [max(s, t) for s, t in zip(shape, tile_size, strict=True)]
    grid = TileGrid.build(padded, tile_size, step_size)
    before = _pad_before(shape, tile_size)
    tiles = grid.tiles()
    if threshold is None:
        return TileSelection(grid, np.ones(len(tiles), dtype=bool), before)
    per_axis = [
        _cells(steps, t, margin_vox, b, s)
        for steps, t, b, s in zip(grid.steps, tile_size, before, shape, strict=True)
    ]
    with torch.inference_mode():
        maxima = _cell_maxima(image[0], [cells for cells, _ in per_axis]).float().cpu()
    has_body = (maxima > threshold).numpy()
    run = np.empty(len(tiles), dtype=bool)
    for i, tile in enumerate(tiles):
        box = tuple(slice(*per_axis[a][1][k]) for a, k in enumerate(tile))
        run[i] = bool(has_body[box].any())
    return TileSelection(grid, run, before)


def exact_mask(selection: TileSelection, image_shape: Sequence[int]) -> torch.Tensor:
    """Voxels (z, y, x, image coordinates) that no skipped tile covers.

    Their accumulated logits are bit for bit those of a run without skipping; a diagnostic
    for tests and for the guarantee in this module's docstring (one bool per voxel).
    """
    exact = torch.ones(tuple(image_shape), dtype=torch.bool)
    grid = selection.grid
    for flag, tile in zip(selection.run, grid.tiles(), strict=True):
        if flag:
            continue
        box = tuple(
            slice(max(0, sl.start - b), max(0, sl.stop - b))
            for sl, b in zip(grid.slices(tile), selection.pad_before, strict=True)
        )
        exact[box] = False
    return exact
