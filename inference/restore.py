"""Bring the logits back to the input grid and turn them into a label map.

nnU-Net resamples all class logits to the cropped input shape (linear in-plane, nearest
along a separate z axis), takes the argmax, pastes the crop into a zero volume and undoes
the transpose. Here the same happens slab by slab along the first axis on the compute
device, so only one slab of float logits exists at full resolution at any time and the
result goes straight into the uint8 output.
"""

from __future__ import annotations

import numpy as np
import torch

from inference.model import Preprocessing
from inference.preprocess import Prepared
from inference.resample import input_range, plan_resampling, resample_slab

#: Float32 working set per output slab on the compute device.
SLAB_BYTES = 96 * 2**20


def labels_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Label map from accumulator channels: the sign for one channel, else the argmax.

    With one channel holding ``logit1 - logit0``, ``> 0`` is exactly argmax over the two
    logits (a tie goes to background, as argmax picks the first maximum).
    """
    if logits.shape[0] == 1:
        return (logits[0] > 0).to(torch.uint8)
    return logits.argmax(dim=0).to(torch.uint8)


def restore(
    logits: torch.Tensor,
    prepared: Prepared,
    prep: Preprocessing,
    compute_device: torch.device,
) -> np.ndarray:
    """Resample logits to the input grid and return the (z, y, x) uint8 label map.

    Args:
        logits: accumulator (channels, z, y, x) at the target spacing, on any device.
        prepared: the preprocessing record of this image (crop box, shapes, spacing).
        prep: the model's preprocessing (target spacing, logit resampling orders).
        compute_device: where resampling and argmax run.

    Returns:
        Labels with the input array's shape, in its (z, y, x) order, C-contiguous.
    """
    plan = plan_resampling(
        logits.shape[1:],
        prepared.shape_cropped,
        prep.spacing_mm,
        prepared.spacing_transposed,
        prep.logits_order,
        prep.logits_order_z,
        prep.logits_force_separate_z,
    )
    full = np.zeros(prepared.shape_transposed, dtype=np.uint8)
    (z0, _), (y0, y1), (x0, x1) = prepared.bbox
    out_slice = int(np.prod(prepared.shape_cropped[1:]))
    in_slice = int(np.prod(logits.shape[2:]))
    per_slice = 4 * logits.shape[0] * max(out_slice, in_slice) * 3
    slab = max(1, SLAB_BYTES // max(per_slice, 1))
    n_out = prepared.shape_cropped[0]
    for start in range(0, n_out, slab):
        stop = min(n_out, start + slab)
        lo, hi = input_range(plan.axes[0], start, stop)
        piece = logits[:, lo:hi].to(device=compute_device, dtype=torch.float32)
        piece = resample_slab(piece, plan, start, stop, lo)
        labels = labels_from_logits(piece).cpu().numpy()
        full[z0 + start : z0 + stop, y0:y1, x0:x1] = labels
    return np.ascontiguousarray(full.transpose(prep.transpose_backward))
