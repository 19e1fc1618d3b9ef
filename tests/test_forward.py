"""The lean forward: the network's own outputs, at a much lower activation peak.

Networks as nnU-Net builds them from plans (PlainConvUNet: the FLARE default and the
compact preset, the demo model's real plans; ResidualEncoderUNet as nnU-Net's ResEnc
presets build it) run through ``lean_forward`` and through their own ``forward`` on the
same input; the outputs must agree to float precision and the peak of live tensor bytes
(``LiveTensorMeter``) must be at least 15 % lower. The sliding window must use it.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from inference.forward import lean_forward, lean_plan
from inference.memory_model import activation_values, measure_forward, measure_forward_bytes
from inference.model import load_model
from inference.sliding_window import predict_sliding_window
from scripts.random_model import PRESETS
from tests.test_memory_model import SMALL_PATCH, meta_network, random_network, resenc_network


def _compare(net: nn.Module, patch, seed: int = 0) -> tuple[int, int]:
    """Outputs equal to float precision; returns the peak bytes of the own and lean forward."""
    x = torch.randn((1, 1, *patch), generator=torch.Generator().manual_seed(seed))
    own_peak, own = measure_forward(net, x)
    lean_peak, lean = measure_forward(lambda t: lean_forward(net, t), x)
    torch.testing.assert_close(lean, own, rtol=1e-5, atol=1e-6)
    return own_peak, lean_peak


def test_plain_unet_same_outputs_half_the_peak():
    net = random_network("compact", seed=3)
    assert lean_plan(net) is not None
    own, lean = _compare(net, SMALL_PATCH["compact"])
    assert lean <= 0.85 * own
    assert lean / own == pytest.approx(105.0 / 211.5, rel=1e-3)


def test_flare_default_network_peak_halves_on_its_full_tile():
    """The FLARE default network on its 96x160x160 tile, sizes only (the meta device)."""
    net = meta_network("flare")
    assert lean_plan(net) is not None
    patch = (1, 1, *PRESETS["flare"]["patch_size"])
    own = measure_forward_bytes(net, patch, "meta")
    lean = measure_forward_bytes(lambda t: lean_forward(net, t), patch, "meta")
    # 211.6 -> 105 values per voxel: 990 -> 492 MiB in float16
    assert lean <= 0.85 * own
    assert (own / 2 / 2**20, lean / 2 / 2**20) == (
        pytest.approx(992, abs=3),
        pytest.approx(492, abs=2),
    )


def test_demo_models_real_plans_same_outputs_lower_peak(demo_model):
    model = load_model(demo_model)
    own, lean = _compare(model.networks[0], model.patch_size)
    assert lean <= 0.85 * own


def test_residual_encoder_unet_same_outputs_lower_peak():
    net = resenc_network()
    assert lean_plan(net) is not None
    own, lean = _compare(net, (4, 32, 32))
    assert lean <= 0.85 * own


def test_unknown_structures_run_their_own_forward():
    deep = resenc_network(deep_supervision=True)
    assert lean_plan(deep) is None
    x = torch.randn(1, 1, 4, 32, 32)
    with torch.inference_mode():
        for a, b in zip(lean_forward(deep, x), deep(x), strict=True):
            assert torch.equal(a, b)
    other = nn.Sequential(nn.Conv3d(1, 2, 1))
    assert lean_plan(other) is None
    with torch.inference_mode():
        assert torch.equal(lean_forward(other, x), other(x))


def test_sliding_window_runs_the_lean_forward():
    """The live bytes of a one-tile sliding window stay at the lean forward's peak."""
    spec = PRESETS["compact"]
    patch = SMALL_PATCH["compact"]
    net = random_network("compact")
    image = torch.randn((1, *patch))

    def window(_: torch.Tensor) -> torch.Tensor:
        out = torch.zeros((1, *patch))
        return predict_sliding_window([net], image, patch, 2, out)

    peak = measure_forward_bytes(window, (1,))
    lean = activation_values(patch, spec["features"], spec["strides"]) * 4
    own = activation_values(patch, spec["features"], spec["strides"], lean=False) * 4
    # the accumulator, weights of the tile and the logits are small next to activations
    assert lean <= peak < lean + 0.1 * (own - lean)
    assert math.prod(patch) * 4 * 5 > peak - lean
