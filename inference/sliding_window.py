"""Sliding-window prediction with nnU-Net's tiles and Gaussian weights, without mirroring.

Tile positions and the Gaussian importance map are nnU-Net's
(``compute_steps_for_sliding_window`` and ``compute_gaussian`` with sigma = patch / 8).
Two things differ in *how* the same weighted average is computed, both to save memory:

* The Gaussian is a product of three 1-D profiles and the tiles form a Cartesian grid,
  so the per-voxel sum of weights is the product of three 1-D sums. Each tile's
  contribution is divided by that sum as it is added (``G / W`` is again separable), which
  yields nnU-Net's ``sum(G * logits) / sum(G)`` without the full-size weight buffer, and
  keeps the accumulator in logit range (safe in float16).
* For two classes only the difference ``logit1 - logit0`` is accumulated: argmax on two
  logits is its sign, and every later step (averaging, linear resampling) is linear, so
  the decision is unchanged while the buffer is half the size.

Two more departures in how, not what: tiles that hold no body can be left out
(:mod:`inference.air`: nnU-Net's grid and the pre-division by the sum of weights over all
tiles are kept, so body voxels receive exactly the same sum), and each network runs
through :func:`inference.forward.lean_forward`, the network's own arithmetic with its
decoder inputs freed as soon as they are used.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from inference.forward import lean_forward

#: nnU-Net's Gaussian: sigma = patch size * 1/8, truncated at 4 sigma like scipy.
SIGMA_SCALE = 1.0 / 8
TRUNCATE_SIGMAS = 4.0


def compute_steps(image_size: Sequence[int], tile_size: Sequence[int], step_size: float):
    """Tile start positions per axis, exactly as nnU-Net's ``compute_steps_for_sliding_window``.

    Args:
        image_size: spatial size of the (padded) image, at least ``tile_size`` on every axis.
        tile_size: the patch size.
        step_size: tile step as a fraction of the tile (0 < step_size <= 1; nnU-Net uses 0.5).

    Returns:
        One list of start indices per axis.
    """
    if not 0 < step_size <= 1:
        raise ValueError(f"step size must be in (0, 1], got {step_size}")
    steps = []
    for size, tile in zip(image_size, tile_size, strict=True):
        if size < tile:
            raise ValueError(f"image size {size} is smaller than the tile {tile}")
        n_steps = math.ceil((size - tile) / (tile * step_size)) + 1
        if n_steps > 1:
            actual = (size - tile) / (n_steps - 1)
            steps.append([int(np.round(actual * i)) for i in range(n_steps)])
        else:
            steps.append([0])
    return steps


def gaussian_profile(tile: int, sigma_scale: float = SIGMA_SCALE) -> np.ndarray:
    """1-D Gaussian importance profile of one tile axis, peak 1 at ``tile // 2``.

    nnU-Net filters a centred impulse with scipy's ``gaussian_filter`` (truncate = 4 sigma,
    zero outside) and divides by the maximum; along one axis that is exactly this profile.
    """
    sigma = tile * sigma_scale
    radius = int(TRUNCATE_SIGMAS * sigma + 0.5)
    offsets = np.arange(tile) - tile // 2
    profile = np.exp(-0.5 * (offsets / sigma) ** 2)
    profile[np.abs(offsets) > radius] = 0.0
    positive = profile[profile > 0]
    # nnU-Net replaces zeros by the smallest non-zero weight (no division by zero later)
    profile[profile == 0] = positive.min()
    return profile


@dataclass(frozen=True)
class TileGrid:
    """Tile positions and per-tile separable weights for one image and patch size.

    Attributes:
        image_size: spatial size of the padded image.
        tile_size: the patch size.
        steps: start indices per axis (nnU-Net's).
        factors: per axis and per step, the 1-D weight ``G / W`` for that tile position.
    """

    image_size: tuple[int, ...]
    tile_size: tuple[int, ...]
    steps: tuple[tuple[int, ...], ...]
    factors: tuple[tuple[np.ndarray, ...], ...]

    @classmethod
    def build(
        cls, image_size: Sequence[int], tile_size: Sequence[int], step_size: float
    ) -> TileGrid:
        """Tile positions and normalised weights for ``image_size`` (already padded)."""
        steps = compute_steps(image_size, tile_size, step_size)
        factors = []
        for size, tile, axis_steps in zip(image_size, tile_size, steps, strict=True):
            profile = gaussian_profile(tile)
            total = np.zeros(size)
            for s in axis_steps:
                total[s : s + tile] += profile
            factors.append(tuple(profile / total[s : s + tile] for s in axis_steps))
        return cls(
            tuple(int(s) for s in image_size),
            tuple(int(t) for t in tile_size),
            tuple(tuple(s) for s in steps),
            tuple(factors),
        )

    @property
    def n_tiles(self) -> int:
        """Number of tiles."""
        return math.prod(len(s) for s in self.steps)

    def tiles(self) -> list[tuple[int, ...]]:
        """Tile indices (one step index per axis) in nnU-Net's order."""
        grids = np.meshgrid(*[np.arange(len(s)) for s in self.steps], indexing="ij")
        return [tuple(int(g.flat[i]) for g in grids) for i in range(grids[0].size)]

    def slices(self, tile: tuple[int, ...]) -> tuple[slice, ...]:
        """Spatial slices of a tile."""
        return tuple(
            slice(self.steps[a][i], self.steps[a][i] + self.tile_size[a])
            for a, i in enumerate(tile)
        )

    def device_factors(self, device: torch.device, dtype: torch.dtype) -> list[list[torch.Tensor]]:
        """The 1-D factors on ``device``, shaped to broadcast along their axis."""
        out = []
        for axis, per_step in enumerate(self.factors):
            shape = [1] * len(self.factors)
            shape[axis] = -1
            out.append([torch.as_tensor(f, dtype=dtype).to(device).view(shape) for f in per_step])
        return out

    def weight(
        self,
        tile: tuple[int, ...],
        device: torch.device,
        dtype: torch.dtype,
        factors: list[list[torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """The separable weight ``G / W`` of one tile as a (z, y, x) tensor on ``device``.

        Only 1-D factors travel to the device (once, when ``factors`` from
        :meth:`device_factors` is passed); the outer product is formed there.
        """
        factors = factors or self.device_factors(device, dtype)
        w = factors[0][tile[0]]
        for axis in range(1, len(tile)):
            w = w * factors[axis][tile[axis]]
        return w


def pad_to_tile(
    image: torch.Tensor, tile_size: Sequence[int]
) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Pad the spatial axes up to the tile size with zeros, centred as nnU-Net's ``pad_nd_image``.

    Returns:
        The (possibly) padded image and the slices that cut the original region back out.
    """
    spatial = image.shape[-len(tile_size) :]
    pads, crop = [], []
    for size, tile in zip(spatial, tile_size, strict=True):
        diff = max(0, tile - size)
        before = diff // 2
        pads.append((before, diff - before))
        crop.append(slice(before, before + size))
    if not any(p for pair in pads for p in pair):
        return image, tuple(crop)
    flat = [p for pair in reversed(pads) for p in pair]
    return torch.nn.functional.pad(image, flat, mode="constant", value=0.0), tuple(crop)


class ForwardTimer:
    """Sums the time of forward passes without stalling the GPU.

    On CUDA each pass is bracketed by events and read once at the end (no synchronisation
    per tile); on the CPU the passes are synchronous and a clock suffices.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._seconds = 0.0

    def start(self):
        """Mark the start of a forward pass; returns a token for :meth:`stop`."""
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def stop(self, token) -> None:
        """Mark the end of the pass started with ``token``."""
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events.append((token, end))
        else:
            self._seconds += time.perf_counter() - token

    @property
    def seconds(self) -> float:
        """Total forward time so far (synchronises CUDA once)."""
        if self._events:
            self._events[-1][1].synchronize()
            self._seconds += sum(a.elapsed_time(b) for a, b in self._events) / 1000.0
            self._events.clear()
        return self._seconds


def output_channels(num_classes: int) -> int:
    """Channels of the logit accumulator: one (a logit difference) for two classes."""
    return 1 if num_classes == 2 else num_classes


def reduce_logits(logits: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Turn network logits (N, C, ...) into accumulator channels (see :func:`output_channels`)."""
    if num_classes == 2:
        return logits[:, 1:2] - logits[:, 0:1]
    return logits


@torch.inference_mode()
def predict_sliding_window(
    networks: Sequence[nn.Module],
    image: torch.Tensor,
    tile_size: Sequence[int],
    num_classes: int,
    out: torch.Tensor,
    step_size: float = 0.5,
    compute_device: torch.device | None = None,
    autocast: bool = False,
    tile_batch: int = 1,
    scale: float = 1.0,
    progress: Callable[[int], None] | None = None,
    forward_timer: ForwardTimer | None = None,
    run_tiles: np.ndarray | None = None,
) -> torch.Tensor:
    """Add the Gaussian-weighted average logits of ``networks`` over ``image`` to ``out``.

    Args:
        networks: models that map (N, C_in, *tile) to (N, num_classes, *tile) logits; their
            outputs are summed (an ensemble averages by passing ``scale = 1 / n_models``).
        image: preprocessed image (C_in, z, y, x), on any device; tiles are copied to
            ``compute_device`` one batch at a time.
        tile_size: patch size of the networks.
        num_classes: number of network output channels.
        out: accumulator (output_channels(num_classes), z, y, x) on any device, float32 or
            float16; it receives ``scale * average logits``.
        step_size: tile step as a fraction of the tile.
        compute_device: where the networks run (default: the image's device).
        autocast: run the networks under float16 autocast (CUDA).
        tile_batch: tiles per forward pass.
        scale: factor applied to every contribution (ensemble weighting).
        progress: called with the number of tiles finished after each batch.
        forward_timer: accumulates the time spent in the networks' forward passes.
        run_tiles: one flag per tile of the grid (:meth:`TileGrid.tiles` order; see
            :func:`inference.air.select_tiles`): tiles flagged False are not run and add
            nothing. None runs every tile.

    Returns:
        ``out``.
    """
    compute_device = compute_device or image.device
    padded, crop = pad_to_tile(image, tile_size)
    grid = TileGrid.build(padded.shape[1:], tile_size, step_size)
    target = out
    if padded.shape[1:] != image.shape[1:]:
        target = torch.zeros((out.shape[0], *padded.shape[1:]), dtype=out.dtype, device=out.device)
    tiles = grid.tiles()
    if run_tiles is not None:
        if len(run_tiles) != len(tiles):
            raise ValueError(f"run_tiles has {len(run_tiles)} flags for {len(tiles)} tiles")
        tiles = [t for t, run in zip(tiles, run_tiles, strict=True) if run]
    factors = grid.device_factors(compute_device, torch.float32)
    for first in range(0, len(tiles), tile_batch):
        batch = tiles[first : first + tile_batch]
        slices = [grid.slices(t) for t in batch]
        x = torch.stack([padded[(slice(None), *s)] for s in slices]).to(
            compute_device, non_blocking=True
        )
        token = forward_timer.start() if forward_timer is not None else None
        with torch.autocast(compute_device.type, dtype=torch.float16, enabled=autocast):
            logits = None
            for net in networks:
                y = lean_forward(net, x)
                logits = y.float() if logits is None else logits.add_(y.float())
        if forward_timer is not None:
            forward_timer.stop(token)
        contribution = reduce_logits(logits, num_classes)
        for k, (tile, sl) in enumerate(zip(batch, slices, strict=True)):
            w = grid.weight(tile, compute_device, torch.float32, factors)
            if scale != 1.0:
                w = w * scale
            piece = (contribution[k] * w).to(device=target.device, dtype=target.dtype)
            target[(slice(None), *sl)] += piece
        if progress is not None:
            progress(len(batch))
    if target is not out:
        out += target[(slice(None), *crop)]
    return out
