"""Device memory of a case: activations measured on the CPU, a model of them, and the peak.

Three things live here, from measurement to prediction:

* :class:`LiveTensorMeter` measures. It is a ``TorchDispatchMode`` that sees every tensor
  an operator returns and keeps a weak reference to its storage; at each operator it adds
  the new storages and drops the ones that have been freed, so ``peak_bytes`` is the
  largest number of tensor bytes alive at any moment of a forward pass. That is what a
  CUDA caching allocator must hold for the pass (in inference mode nothing is kept for
  autograd), without the allocator's own rounding (512-byte blocks, 2 MB segments: small
  against tensors of tens to hundreds of MB) and without convolution workspaces, which
  are not tensors an operator returns (cuDNN's are counted as a margin below; the CPU's
  oneDNN scratch memory is why a CPU process's RSS grows more than this count). It works
  on the ``meta`` device too, where no arithmetic runs: the full 96x160x160 tile of the
  FLARE network is measured in a second.
* :func:`activation_values_per_voxel` models the same peak from the architecture alone
  (features, strides), for the network's own forward and for the lean forward of
  :mod:`inference.forward`: the values alive per voxel of the tile at the worst moment.
  ``tests/test_memory_model.py`` checks it against the meter on the CPU for the FLARE
  default and the compact network, both forwards. For the FLARE default network (6
  stages, 32-320 features): 211.6 values per voxel with the network's forward (about 990
  MiB per 96x160x160 tile in float16), 105 with the lean forward (492 MiB).
* :func:`predict_device_peak` adds up a case's device memory: the CUDA context, the
  weights (float32 plus the float16 copies autocast makes), the preprocessed image, the
  logit accumulator, one tile batch's activations and a cuDNN workspace margin. The
  image, accumulator and activations are exact sizes; the context and workspace are
  assumptions (:data:`CUDA_CONTEXT_MB`, :data:`CUDNN_WORKSPACE_MB`) until a GPU check
  measures them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

MB = 2**20

#: Device memory of the CUDA context once the first convolutions have run (driver
#: reservation, torch's kernels, cuDNN and cuBLAS handles, lazily loaded kernels).
#: An assumption from public reports for torch 2.x on Ampere GPUs (about 300-500 MB at
#: start, growing as cuDNN loads), not a measurement of this project: the GPU check
#: replaces it.
CUDA_CONTEXT_MB = 600.0
#: Margin for cuDNN's convolution workspace (its algorithm heuristics ask for up to a
#: few hundred MB on large 3-D inputs). Also an assumption until measured.
CUDNN_WORKSPACE_MB = 256.0


class LiveTensorMeter(TorchDispatchMode):
    """Counts the bytes of tensor storages alive while operators run.

    Every tensor an operator returns is recorded by its storage (views and in-place
    results share one), with a weak reference that says when the storage is freed.
    Tensors made before the meter was entered (weights, a caller's input) are not
    counted; create the input inside the ``with`` block to count it.

    Attributes:
        current_bytes: bytes alive after the last operator (updated again on exit).
        peak_bytes: the most bytes alive right after any operator (its inputs are still
            referenced then, so this is the operator's own peak too).
        peak_op: the operator at the peak, for diagnostics.
    """

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current_bytes = 0
        self.peak_bytes = 0
        self.peak_op = ""

    def _sweep(self) -> None:
        dead = [key for key, (ref, _) in self._live.items() if ref.expired()]
        for key in dead:
            self.current_bytes -= self._live.pop(key)[1]

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        self._sweep()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor):
                storage = item.untyped_storage()
                ref = StorageWeakRef(storage)
                if ref.cdata not in self._live:
                    self._live[ref.cdata] = (ref, storage.nbytes())
                    self.current_bytes += storage.nbytes()
        self._sweep()
        if self.current_bytes > self.peak_bytes:
            self.peak_bytes = self.current_bytes
            self.peak_op = str(func)
        return out


def measure_forward_bytes(
    forward: Callable[[torch.Tensor], torch.Tensor],
    input_shape: Sequence[int],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> int:
    """Peak tensor bytes alive during ``forward`` on one input of zeros (input included).

    Args:
        forward: e.g. ``net`` or ``lambda x: lean_forward(net, x)``; its parameters must
            be on ``device``.
        input_shape: (N, C, *patch).
        device: ``cpu`` (real arithmetic) or ``meta`` (sizes only, instant).
        dtype: element type of the input (and so of the activations).

    Returns:
        The peak in bytes; weights are not counted.
    """
    x = torch.zeros(tuple(input_shape), device=device, dtype=dtype)
    return measure_forward(forward, x)[0]


def measure_forward(
    forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor
) -> tuple[int, torch.Tensor]:
    """Run ``forward`` on a copy of ``x`` made inside the meter (so the input counts).

    Returns:
        The peak of live tensor bytes and the output.
    """
    with torch.inference_mode(), LiveTensorMeter() as meter:
        y = forward(x.clone())
    return meter.peak_bytes, y


def _stage_voxels(patch_size: Sequence[int], strides: Sequence[Sequence[int]]) -> list[int]:
    """Voxels of each stage's feature maps.

    A 3x3x3 convolution with padding 1 and stride s gives ceil(n / s) along an axis.
    """
    sizes, voxels = list(patch_size), []
    for stride in strides:
        sizes = [math.ceil(n / s) for n, s in zip(sizes, stride, strict=True)]
        voxels.append(math.prod(sizes))
    return voxels


def activation_values(
    patch_size: Sequence[int],
    features_per_stage: Sequence[int],
    strides: Sequence[Sequence[int]],
    num_classes: int = 2,
    input_channels: int = 1,
    lean: bool = True,
    residual_encoder: bool = False,
    decoder_convs: int = 2,
) -> float:
    """Peak number of activation values alive in one forward pass of an nnU-Net U-Net.

    The U-Net is nnU-Net's ``PlainConvUNet``: per stage convolutions each followed by a
    norm (a new tensor) and an in-place nonlinearity; the decoder upsamples with a
    transposed convolution and concatenates the skip. The tile itself is counted. With
    ``residual_encoder`` (``ResidualEncoderUNet``, the ResEnc presets) each encoder block
    keeps its input for the residual sum while its two convolutions run: the block input,
    the first convolution's output and the second's conv and norm outputs are alive.

    With ``lean`` (:func:`inference.forward.lean_forward`), at encoder stage s the skips
    of the stages above plus a convolution output and its norm are alive; at decoder
    level l the finer skips, the skip and the concatenation buffer (or the buffer, the
    upsampled tensor and the lower-resolution input), then the buffer and the first
    convolution's output. Without it (the network's own forward) every skip stays alive
    to the end and the concatenation lives through its whole stage.

    Args:
        patch_size: the tile.
        features_per_stage: channels per stage.
        strides: stride per stage (the first is usually 1).
        num_classes: output channels.
        input_channels: input channels.
        lean: model the lean forward (True) or the network's own (False).
        residual_encoder: the encoder is nnU-Net's ResidualEncoder (residual blocks).
        decoder_convs: convolutions per decoder stage (the own forward keeps the
            concatenation through all of them).

    Returns:
        Values (elements) alive at the peak, for a batch of one tile.
    """
    n = len(features_per_stage)
    vox = _stage_voxels(patch_size, strides)
    size = [c * v for c, v in zip(features_per_stage, vox, strict=True)]
    tile = input_channels * math.prod(patch_size)
    peaks = []
    # Encoder: skips of the stages above, plus a conv output and its norm output; a
    # residual block also holds its input (or its projected residual) and the first
    # convolution's output.
    per_stage = 4 if residual_encoder else 2
    if lean:
        for s in range(n):
            peaks.append(sum(size[:s]) + per_stage * size[s])
        # Decoder level l: finer skips + (skip + buffer) or (buffer + upsampled + lower
        # input) or (buffer + first conv output); the first two are the larger ones.
        for level in range(n - 2, -1, -1):
            finer = sum(size[:level])
            peaks.append(finer + 3 * size[level] + size[level + 1])
        peaks.append(size[0] + num_classes * vox[0])
    else:
        # Nested containers keep each block's input alive: input, conv and norm outputs.
        for s in range(n):
            peaks.append(sum(size[:s]) + max(3, per_stage) * size[s])
        skips = sum(size)
        held = 5 if decoder_convs >= 2 else 4
        for level in range(n - 2, -1, -1):
            # the concatenation (2x) + the first block's output + the second block's conv
            # and norm outputs (one block: its conv and norm outputs), next to every skip
            # and the stage below's output (the bottleneck is a skip already)
            below = size[level + 1] if level < n - 2 else 0
            peaks.append(skips + below + held * size[level])
        peaks.append(skips + size[0] + num_classes * vox[0])
    return tile + max(peaks)


def activation_values_per_voxel(
    patch_size: Sequence[int],
    features_per_stage: Sequence[int],
    strides: Sequence[Sequence[int]],
    num_classes: int = 2,
    lean: bool = True,
    residual_encoder: bool = False,
) -> float:
    """:func:`activation_values` divided by the tile's voxels (e.g. 105 for FLARE, lean)."""
    values = activation_values(
        patch_size,
        features_per_stage,
        strides,
        num_classes,
        lean=lean,
        residual_encoder=residual_encoder,
    )
    return values / math.prod(patch_size)


@dataclass(frozen=True)
class DevicePeak:
    """A case's predicted device-level memory peak (MB) and its parts.

    Attributes:
        context_mb: CUDA context (:data:`CUDA_CONTEXT_MB`).
        weights_mb: parameters of every network, float32 plus float16 autocast copies.
        image_mb: the preprocessed image, if kept on the device.
        accumulator_mb: the logit accumulator, if kept on the device.
        activations_mb: one tile batch's activations at their peak.
        workspace_mb: cuDNN workspace margin (:data:`CUDNN_WORKSPACE_MB`).
    """

    context_mb: float
    weights_mb: float
    image_mb: float
    accumulator_mb: float
    activations_mb: float
    workspace_mb: float

    @property
    def total_mb(self) -> float:
        """The predicted peak: every part is alive during the sliding window."""
        return (
            self.context_mb
            + self.weights_mb
            + self.image_mb
            + self.accumulator_mb
            + self.activations_mb
            + self.workspace_mb
        )

    def describe(self) -> str:
        """One line for the log."""
        return (
            f"predicted GPU peak {self.total_mb:.0f} MB = context {self.context_mb:.0f} + "
            f"weights {self.weights_mb:.0f} + image {self.image_mb:.0f} + logits "
            f"{self.accumulator_mb:.0f} + activations {self.activations_mb:.0f} + "
            f"workspace {self.workspace_mb:.0f}"
        )


def predict_device_peak(
    volume_voxels: int,
    acc_channels: int,
    weights_bytes: int,
    activations_mb: float,
    image_on_device: bool = True,
    image_fp16: bool = True,
    acc_on_device: bool = True,
    acc_fp16: bool = False,
    tile_batch: int = 1,
    context_mb: float = CUDA_CONTEXT_MB,
    workspace_mb: float = CUDNN_WORKSPACE_MB,
) -> DevicePeak:
    """The device peak of one case with a given buffer placement.

    Args:
        volume_voxels: voxels of the preprocessed image (target spacing).
        acc_channels: accumulator channels (1 for two classes).
        weights_bytes: bytes of every network's parameters as stored (float32).
        activations_mb: one tile's activations (:func:`inference.budget.activation_mb`).
        image_on_device: the image is on the device (the buffer plan,
            :class:`inference.budget.BufferPlan`).
        image_fp16: the image is stored in float16.
        acc_on_device: the accumulator is on the device.
        acc_fp16: the accumulator is stored in float16.
        tile_batch: tiles per forward pass.
        context_mb: CUDA context.
        workspace_mb: convolution workspace margin.

    Returns:
        The parts and their sum.
    """
    image = volume_voxels * (2 if image_fp16 else 4) / MB if image_on_device else 0.0
    acc = volume_voxels * acc_channels * (2 if acc_fp16 else 4) / MB if acc_on_device else 0.0
    # autocast keeps a float16 copy of each weight while a forward pass runs
    weights = 1.5 * weights_bytes / MB
    return DevicePeak(context_mb, weights, image, acc, activations_mb * tile_batch, workspace_mb)
