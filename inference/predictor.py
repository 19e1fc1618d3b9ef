"""The predictor: models loaded once, then one call per image.

``Predictor(models, device).predict(array, spacing)`` runs the whole data flow for one
image: prepare (crop, normalise, resample) -> sliding window over every network of every
model into one logit accumulator -> restore to the input grid -> uint8 labels. It keeps
per-stage timings, applies the device-memory budget, and on a CUDA out-of-memory error
retries the image with a smaller footprint, then on the CPU, saying so in its notes.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from inference.air import BODY_THRESHOLD_HU, MARGIN_VOX, normalised_threshold, select_tiles
from inference.budget import MB, BufferPlan, activation_mb, host_plan, plan_buffers, retry_plans
from inference.device_memory import (
    CONTEXT_MARGIN_MB,
    AllocatorCap,
    CudaMemory,
    DeviceMemory,
    HostMemory,
)
from inference.memory_model import CUDA_CONTEXT_MB, DevicePeak, predict_device_peak
from inference.model import Model, ModelError
from inference.preprocess import prepare
from inference.restore import restore
from inference.sliding_window import (
    ForwardTimer,
    output_channels,
    predict_sliding_window,
)
from inference.validate import InputError

log = logging.getLogger(__name__)


@dataclass
class PredictOptions:
    """Knobs of the predictor.

    Attributes:
        step_size: tile step as a fraction of the patch (nnU-Net: 0.5).
        vram_budget_mb: device-level memory budget (CUDA context and other processes
            included, as the organizers measure it); <= 0 disables the limit.
        max_tile_batch: largest number of tiles per forward pass on CUDA.
        progress: show a tqdm bar over tiles.
        skip_air: leave out the tiles of nnU-Net's grid that hold no body voxel (CT above
            ``body_threshold_hu``, within ``air_margin_vox``); body voxels keep exactly
            nnU-Net's average (see :mod:`inference.air`).
        air_margin_vox: preprocessed voxels around the body whose tiles are still run.
        crop_body: crop CT to the body's bounding box (voxels above ``body_threshold_hu``
            plus a margin) before the sliding window: fewer tiles over air, slightly
            different tile positions than nnU-Net.
        body_threshold_hu: the body threshold of ``skip_air`` and ``crop_body``.
        max_target_voxels: refuse images whose resampled size exceeds this (a spacing
            error such as 100 mm slices would otherwise ask for tens of GB).
    """

    step_size: float = 0.5
    vram_budget_mb: float = 4096
    max_tile_batch: int = 1
    progress: bool = False
    max_target_voxels: int = 1_500_000_000
    skip_air: bool = True
    air_margin_vox: int = MARGIN_VOX
    crop_body: bool = False
    body_threshold_hu: float = BODY_THRESHOLD_HU


@dataclass
class Prediction:
    """The result for one image.

    Attributes:
        labels: (z, y, x) uint8 label map on the input grid.
        timings_s: seconds per stage (preprocess, predict, restore) and, within predict,
            the networks' forward passes (forward).
        n_tiles: tiles per network (nnU-Net's grid; the largest grid of an ensemble).
        device: where it finally ran.
        plan: the buffer plan that succeeded.
        notes: retries and fallbacks, one line each.
        n_skipped: tiles of that grid skipped as air.
        device_peak: predicted device-level memory peak of this case on CUDA with the
            buffer plan used (on the CPU: the plan the budget would pick on CUDA, so a CPU
            run shows what a GPU would need).
    """

    labels: np.ndarray
    timings_s: dict[str, float]
    n_tiles: int
    device: str
    plan: BufferPlan
    notes: list[str] = field(default_factory=list)
    n_skipped: int = 0
    device_peak: DevicePeak | None = None

    @property
    def air_saved_s(self) -> float:
        """Forward time the skipped tiles would have cost (forward time per run tile)."""
        run = self.n_tiles - self.n_skipped
        if self.n_skipped == 0 or run <= 0:
            return 0.0
        return self.timings_s.get("forward", 0.0) / run * self.n_skipped

    def tiles_summary(self) -> str:
        """One phrase for the log: ``3 of 9 air tiles skipped (~70.1 s saved)``."""
        if self.n_skipped == 0:
            return "no air tile skipped"
        return (
            f"{self.n_skipped} of {self.n_tiles} air tiles skipped "
            f"(~{self.air_saved_s:.1f} s saved)"
        )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _features_and_strides(model: Model) -> tuple[list[int], list[list[int]]]:
    encoder = getattr(model.networks[0], "encoder", None)
    features = list(getattr(encoder, "output_channels", [32]))
    strides = [list(s) if isinstance(s, list | tuple) else [s] * 3 for s in encoder.strides]
    return features, strides


def _weights_bytes(models: Sequence[Model]) -> int:
    return sum(
        p.numel() * p.element_size()
        for model in models
        for net in model.networks
        for p in net.parameters()
    )


class Predictor:
    """Predicts label maps with one or more nnU-Net models (an ensemble averages logits).

    Args:
        models: loaded models; they must share preprocessing (target spacing,
            normalisation, transpose) and the number of classes. Patch sizes may differ.
        device: the compute device.
        options: step size, memory budget, tile batch, progress.
        memory: the device's memory (allocator cap, cache releases); None picks
            :class:`~inference.device_memory.CudaMemory` on CUDA and a no-op on the CPU.
    """

    def __init__(
        self,
        models: Sequence[Model],
        device: torch.device,
        options: PredictOptions | None = None,
        memory: DeviceMemory | None = None,
    ) -> None:
        if not models:
            raise ModelError("no model given")
        first = models[0]
        for other in models[1:]:
            if other.preprocessing.key() != first.preprocessing.key():
                raise ModelError(
                    f"ensemble members must share preprocessing: {other.folder} differs from "
                    f"{first.folder} (spacing {other.preprocessing.spacing_mm} vs "
                    f"{first.preprocessing.spacing_mm})"
                )
            if other.num_classes != first.num_classes:
                raise ModelError(f"{other.folder} predicts a different number of classes")
        self.models = list(models)
        self.options = options or PredictOptions()
        self.device = device
        self.preprocessing = first.preprocessing
        self.num_classes = first.num_classes
        self.n_networks = sum(len(m.networks) for m in self.models)
        if memory is None:
            memory = CudaMemory(device) if device.type == "cuda" else HostMemory()
        self.memory = memory
        self.allocator_cap: AllocatorCap | None = None
        self._cap_mb: float | None = None
        for model in self.models:
            model.to(device)
        if device.type == "cuda":
            self._cap_mb = self._limit_allocator()

    # -- memory -----------------------------------------------------------------------
    def _limit_allocator(self) -> float | None:
        """Cap the caching allocator so device-level use (NVML total - free) stays in budget."""
        cap = self.memory.cap(self.options.vram_budget_mb, CONTEXT_MARGIN_MB)
        self.allocator_cap = cap
        if cap is None:
            return None
        if not cap.fits:
            raise ModelError(
                f"the CUDA context, the driver and other processes already use "
                f"{cap.outside_mb:.0f} MB of the {cap.budget_mb:.0f} MB budget"
            )
        log.info(cap.describe())
        return cap.cap_mb

    def _plan(self, volume_voxels: int) -> BufferPlan:
        if self.device.type != "cuda":
            return host_plan()
        acc_channels = output_channels(self.num_classes)
        weights = torch.cuda.memory_allocated(self.device) / MB
        act = self._activation_mb() or 0.0
        # float16 copies of the weights made by autocast
        weights *= 1.5
        available = (self._cap_mb if self._cap_mb is not None else float("inf")) - weights
        return plan_buffers(
            volume_voxels,
            acc_channels,
            available,
            0.0,
            act,
            max_tile_batch=self.options.max_tile_batch,
        )

    def _activation_mb(self) -> float | None:
        """Float16 activations of one tile of the largest network (lean forward).

        None for a network that is not an nnU-Net U-Net (no ``encoder``).
        """
        act = 0.0
        for model in self.models:
            if not hasattr(getattr(model.networks[0], "encoder", None), "strides"):
                return None
            features, strides = _features_and_strides(model)
            patch, classes = model.patch_size, model.num_classes
            residual = type(model.networks[0].encoder).__name__ == "ResidualEncoder"
            act = max(
                act,
                activation_mb(
                    patch, features, strides, num_classes=classes, residual_encoder=residual
                ),
            )
        return act

    def device_peak(self, volume_voxels: int, plan: BufferPlan | None = None) -> DevicePeak | None:
        """The predicted device peak of a case with ``volume_voxels`` at the target spacing.

        Args:
            volume_voxels: voxels of the preprocessed image.
            plan: the buffer plan used on CUDA; None: the plan the budget would pick on
                CUDA (for a CPU run).

        Returns:
            The parts and their sum; None when the networks' activations cannot be
            modelled (not an nnU-Net U-Net).
        """
        weights = _weights_bytes(self.models)
        act = self._activation_mb()
        if act is None:
            return None
        if plan is None:
            budget = self.options.vram_budget_mb
            available = (budget if budget > 0 else float("inf")) - CUDA_CONTEXT_MB
            available -= 1.5 * weights / MB
            plan = plan_buffers(
                volume_voxels,
                output_channels(self.num_classes),
                available,
                0.0,
                act,
                max_tile_batch=self.options.max_tile_batch,
            )
        return predict_device_peak(
            volume_voxels,
            output_channels(self.num_classes),
            weights,
            act,
            plan.image_on_device,
            plan.image_fp16,
            plan.acc_on_device,
            plan.acc_fp16,
            plan.tile_batch,
        )

    # -- prediction -------------------------------------------------------------------
    def predict(
        self, array_zyx: np.ndarray, spacing_zyx_mm: Sequence[float], name: str = ""
    ) -> Prediction:
        """Predict the label map of one image.

        Args:
            array_zyx: the image as read, (z, y, x), finite values.
            spacing_zyx_mm: its spacing in the same order.
            name: case name for progress bars.

        Returns:
            The label map on the input grid with timings and notes.
        """
        notes: list[str] = []
        voxels = self._target_voxels(array_zyx.shape, spacing_zyx_mm)
        if voxels > self.options.max_target_voxels:
            limit = self.options.max_target_voxels / 1e6
            raise InputError(
                f"at the model's spacing {self.preprocessing.spacing_mm} mm this image would "
                f"have {voxels / 1e6:.0f} M voxels (limit {limit:.0f} M); check the voxel spacing"
            )
        # The ladder (inference.budget.smaller_plan): this plan, one tile per batch, the
        # float16 accumulator on the device, the accumulator on the host, the image on the
        # host; then the CPU.
        for plan in retry_plans(self._plan(voxels)):
            try:
                return self._run(array_zyx, spacing_zyx_mm, self.device, plan, notes, name)
            except torch.cuda.OutOfMemoryError:
                pass
            # Outside the except block: the exception's traceback no longer pins the
            # failed attempt's tensors, so the cache can really be emptied.
            self.memory.release("out of memory")
            notes.append(f"out of GPU memory with {plan.describe()}; retrying with less")
        notes.append("out of GPU memory with every plan; predicting this case on the CPU")
        cpu = torch.device("cpu")
        for model in self.models:
            model.to(cpu)
        try:
            return self._run(array_zyx, spacing_zyx_mm, cpu, host_plan(), notes, name)
        finally:
            for model in self.models:
                model.to(self.device)

    def _target_voxels(self, shape_zyx: Sequence[int], spacing_zyx_mm: Sequence[float]) -> int:
        prep = self.preprocessing
        n = 1
        for axis, target in zip(prep.transpose_forward, prep.spacing_mm, strict=True):
            n *= max(1, round(spacing_zyx_mm[axis] / target * shape_zyx[axis]))
        return n

    def _run(
        self,
        array_zyx: np.ndarray,
        spacing_zyx_mm: Sequence[float],
        device: torch.device,
        plan: BufferPlan,
        notes: list[str],
        name: str,
    ) -> Prediction:
        on_cuda = device.type == "cuda"
        host = torch.device("cpu")
        timings: dict[str, float] = {}

        t = time.perf_counter()
        image, prepared = prepare(
            array_zyx,
            spacing_zyx_mm,
            self.preprocessing,
            compute_device=device,
            out_device=device if plan.image_on_device else host,
            out_dtype=torch.float16 if (on_cuda and plan.image_fp16) else torch.float32,
            pin_memory=on_cuda,
            body_threshold_hu=self.options.body_threshold_hu if self.options.crop_body else None,
        )
        _sync(device)
        timings["preprocess"] = time.perf_counter() - t

        t = time.perf_counter()
        timer = ForwardTimer(device)
        logits, n_tiles, n_skipped = self._sliding_window(image, device, plan, name, timer)
        _sync(device)
        timings["predict"] = time.perf_counter() - t
        timings["forward"] = timer.seconds
        voxels = math.prod(image.shape[1:])
        del image  # the restore step needs the memory more
        # Hand the image's and the tiles' cached blocks back to the device: the organizers
        # integrate device-level memory over time, and restore and write need little.
        self.memory.release("sliding window")

        t = time.perf_counter()
        labels = restore(logits, prepared, self.preprocessing, device)
        del logits
        self.memory.release("restore")
        timings["restore"] = time.perf_counter() - t
        peak = self.device_peak(voxels, plan if on_cuda else None)
        return Prediction(labels, timings, n_tiles, str(device), plan, notes, n_skipped, peak)

    def _sliding_window(
        self,
        image: torch.Tensor,
        device: torch.device,
        plan: BufferPlan,
        name: str,
        timer: ForwardTimer,
    ) -> tuple[torch.Tensor, int, int]:
        on_cuda = device.type == "cuda"
        acc_device = device if plan.acc_on_device else torch.device("cpu")
        acc_dtype = torch.float16 if (on_cuda and plan.acc_fp16) else torch.float32
        channels = output_channels(self.num_classes)
        shape = tuple(image.shape[1:])
        logits = torch.zeros(
            (channels, *shape),
            dtype=acc_dtype,
            device=acc_device,
            pin_memory=on_cuda and acc_device.type == "cpu",
        )
        groups: dict[tuple[int, ...], list] = {}
        for model in self.models:
            groups.setdefault(model.patch_size, []).extend(model.networks)
        threshold = None
        if self.options.skip_air:
            threshold = normalised_threshold(self.preprocessing, self.options.body_threshold_hu)
        selections = {
            patch: select_tiles(
                image, patch, self.options.step_size, threshold, self.options.air_margin_vox
            )
            for patch in groups
        }
        bar = None
        if self.options.progress:
            from tqdm import tqdm

            to_run = sum(int(sel.run.sum()) for sel in selections.values())
            bar = tqdm(total=to_run, desc=name or "tiles", unit="tile", leave=False)
        progress: Callable[[int], None] | None = bar.update if bar is not None else None
        try:
            for patch, networks in groups.items():
                predict_sliding_window(
                    networks,
                    image,
                    patch,
                    self.num_classes,
                    logits,
                    step_size=self.options.step_size,
                    compute_device=device,
                    autocast=on_cuda,
                    tile_batch=plan.tile_batch if on_cuda else 1,
                    scale=1.0 / self.n_networks,
                    progress=progress,
                    forward_timer=timer,
                    run_tiles=selections[patch].run,
                )
        finally:
            if bar is not None:
                bar.close()
        largest = max(selections.values(), key=lambda sel: sel.n_tiles)
        return logits, largest.n_tiles, largest.n_skipped
