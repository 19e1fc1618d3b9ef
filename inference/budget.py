"""Where the big buffers live, decided from their size and the device-memory budget.

The challenge measures *device-level* used memory (total - free, CUDA context included)
and tolerates 4 GB. The predictor's large buffers are the preprocessed image and the
logit accumulator, both at the target spacing (about 180 M voxels for a 512x512x554 case
at 1 mm slices). Everything else is small (slabs) or fixed (weights, one tile's
activations). This module estimates those sizes and picks, in order of preference:

1. image float16 and accumulator float32 on the device;
2. accumulator float16 on the device (contributions are pre-normalised, so they stay in
   logit range);
3. image on the device, accumulator in pinned host memory;
4. both in pinned host memory (tiles are copied up, contributions copied down).

The plan is a pure function of sizes, so it is tested without a GPU; the running
predictor enforces the budget with the CUDA caching allocator's hard limit (set from
NVML's device-level figure, :mod:`inference.device_memory`) and on an out-of-memory error
walks down :func:`smaller_plan`'s ladder before it moves the case to the CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

MB = 2**20


@dataclass(frozen=True)
class BufferPlan:
    """Placement and precision of the predictor's large buffers.

    Attributes:
        image_on_device: keep the preprocessed image on the compute device.
        image_fp16: store the preprocessed image in float16.
        acc_on_device: keep the logit accumulator on the compute device.
        acc_fp16: store the accumulator in float16.
        tile_batch: tiles per forward pass.
        estimate_mb: estimated peak allocator memory of this plan in MB.
    """

    image_on_device: bool
    image_fp16: bool
    acc_on_device: bool
    acc_fp16: bool
    tile_batch: int
    estimate_mb: float

    def describe(self) -> str:
        """One short line for the log."""
        where = {True: "device", False: "host"}
        bits = {True: "fp16", False: "fp32"}
        img = f"image {bits[self.image_fp16]} on {where[self.image_on_device]}"
        acc = f"logits {bits[self.acc_fp16]} on {where[self.acc_on_device]}"
        return f"{img}, {acc}, {self.tile_batch} tile(s)/batch, ~{self.estimate_mb:.0f} MB"


def activation_mb(
    patch_size: Sequence[int],
    features_per_stage: Sequence[int],
    strides: Sequence[Sequence[int]],
    bytes_per_element: int = 2,
    tile_batch: int = 1,
    num_classes: int = 2,
    lean: bool = True,
    residual_encoder: bool = False,
) -> float:
    """Peak activation memory of one U-Net forward pass (inference mode), in MB.

    The values alive at the peak come from :func:`inference.memory_model.activation_values`,
    a model of the lean forward (:mod:`inference.forward`) that is checked against the
    live tensor bytes measured during real forward passes (tests/test_memory_model.py).
    Convolution workspaces are not activations: the device peak counts them separately
    (:data:`inference.memory_model.CUDNN_WORKSPACE_MB`).
    """
    from inference.memory_model import activation_values

    values = activation_values(
        patch_size,
        features_per_stage,
        strides,
        num_classes,
        lean=lean,
        residual_encoder=residual_encoder,
    )
    return values * bytes_per_element * tile_batch / MB


def plan_buffers(
    volume_voxels: int,
    acc_channels: int,
    available_mb: float,
    weights_mb: float,
    activations_mb: float,
    slab_mb: float = 200.0,
    max_tile_batch: int = 1,
) -> BufferPlan:
    """Pick the first placement that fits ``available_mb`` of allocator memory.

    Args:
        volume_voxels: voxels of the preprocessed image (target spacing).
        acc_channels: accumulator channels (1 for two classes).
        available_mb: allocator memory allowed for this case (budget minus CUDA context
            and what other processes use).
        weights_mb: parameters of all networks (float32) plus their float16 copies.
        activations_mb: peak activations of one tile (see :func:`activation_mb`).
        slab_mb: working set of the preprocessing and restore slabs.
        max_tile_batch: largest tile batch to consider; the plan uses the largest that fits.

    Returns:
        The chosen plan; the last (all on host, one tile) when nothing fits, with its
        estimate, so the caller can report the shortfall.
    """
    image16 = volume_voxels * 2 / MB
    acc32 = volume_voxels * acc_channels * 4 / MB
    acc16 = acc32 / 2
    fixed = weights_mb + slab_mb
    options = [
        (True, True, True, False, image16 + acc32),
        (True, True, True, True, image16 + acc16),
        (True, True, False, False, image16),
        (False, True, False, False, 0.0),
    ]
    for img_dev, img16, acc_dev, acc16_, buffers in options:
        for batch in range(max(1, max_tile_batch), 0, -1):
            estimate = fixed + buffers + activations_mb * batch
            if estimate <= available_mb:
                return BufferPlan(img_dev, img16, acc_dev, acc16_, batch, estimate)
    return BufferPlan(False, True, False, False, 1, fixed + activations_mb)


def host_plan() -> BufferPlan:
    """The plan for CPU inference: float32 everywhere, buffers in ordinary memory."""
    return BufferPlan(True, False, True, False, 1, 0.0)


def smaller_plan(plan: BufferPlan) -> BufferPlan | None:
    """The next smaller footprint after an out-of-memory error, or None when none is left.

    The ladder: one tile per batch, then the float16 accumulator on the device (half its
    memory, no transfers), then the accumulator in host memory, then the image in host
    memory too. After that the caller moves the case to the CPU. Precision is given up
    before the device: a float16 accumulator holds pre-normalised logits, while every
    step to the host adds a copy per tile.
    """
    if plan.tile_batch > 1:
        return BufferPlan(
            plan.image_on_device, plan.image_fp16, plan.acc_on_device, plan.acc_fp16, 1, 0.0
        )
    if plan.acc_on_device and not plan.acc_fp16:
        return BufferPlan(plan.image_on_device, True, True, True, 1, 0.0)
    if plan.acc_on_device:
        return BufferPlan(plan.image_on_device, True, False, False, 1, 0.0)
    if plan.image_on_device:
        return BufferPlan(False, True, False, False, 1, 0.0)
    return None


def retry_plans(plan: BufferPlan) -> list[BufferPlan]:
    """``plan`` and every smaller one :func:`smaller_plan` leads to, in the order tried."""
    plans = [plan]
    while (smaller := smaller_plan(plans[-1])) is not None:
        plans.append(smaller)
    return plans
