"""The activation memory model against live tensor bytes measured during real forward passes.

The meter (``LiveTensorMeter``) counts the bytes of every tensor storage alive after each
operator. The FLARE default network (6 stages, 32-320 features) and the compact one (4
stages) run on the CPU on a small patch whose sizes divide by every stride, so each
feature map has exactly patch / stride voxels and the peak per voxel is that of the full
96x160x160 (96x128x128) tile; ``activation_mb`` for the full tile must equal the
measurement scaled up. The meta device, where no arithmetic runs, measures the full tile
directly and must agree.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from inference.budget import MB, activation_mb, plan_buffers
from inference.forward import lean_forward
from inference.memory_model import (
    CUDA_CONTEXT_MB,
    CUDNN_WORKSPACE_MB,
    LiveTensorMeter,
    activation_values,
    measure_forward_bytes,
    predict_device_peak,
)
from inference.model import build_network, load_model
from scripts.random_model import PRESETS, configuration

#: Small CPU patches that every stride divides (FLARE: z / 16, y and x / 32; instance norm
#: needs more than one voxel at the bottleneck).
SMALL_PATCH = {"flare": (16, 64, 32), "compact": (8, 16, 16)}


def random_network(preset: str, seed: int = 0) -> torch.nn.Module:
    """The preset's PlainConvUNet with seeded random weights, on the CPU, in eval mode."""
    net = build_network(configuration(preset), 1, 2).to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return net.eval()


def meta_network(preset: str) -> torch.nn.Module:
    return build_network(configuration(preset), 1, 2).eval()


def resenc_network(deep_supervision: bool = False, features=(8, 16, 32, 64)) -> nn.Module:
    """A small ResidualEncoderUNet with nnU-Net's ResEnc building blocks."""
    from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet

    torch.manual_seed(0)
    net = ResidualEncoderUNet(
        input_channels=1,
        n_stages=4,
        features_per_stage=list(features),
        conv_op=nn.Conv3d,
        kernel_sizes=[[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
        strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]],
        n_blocks_per_stage=[1, 2, 2, 2],
        num_classes=2,
        n_conv_per_stage_decoder=[1, 1, 1],
        conv_bias=True,
        norm_op=nn.InstanceNorm3d,
        norm_op_kwargs={"eps": 1e-5, "affine": True},
        nonlin=nn.LeakyReLU,
        nonlin_kwargs={"inplace": True},
        deep_supervision=deep_supervision,
    )
    return net.eval()


def test_meter_counts_live_storages_once():
    def fn(x: torch.Tensor) -> torch.Tensor:
        a = x * 2  # +4000 bytes: x, a alive
        b = a + 1  # +4000: x, a, b alive -> the peak, 12000
        del a
        b.mul_(3)  # in place: nothing new
        view = b[:500]  # a view shares b's storage
        return view.sum()

    with torch.inference_mode(), LiveTensorMeter() as meter:
        x = torch.zeros(1000)
        y = fn(x)
        del x
    assert meter.peak_bytes == 3 * 4000
    assert meter.current_bytes == y.untyped_storage().nbytes() == 4


@pytest.mark.parametrize("preset", ["flare", "compact"])
def test_activation_mb_matches_the_measured_peak_of_a_cpu_forward(preset):
    spec = PRESETS[preset]
    net = random_network(preset)
    small = SMALL_PATCH[preset]
    measured = measure_forward_bytes(lambda x: lean_forward(net, x), (1, 1, *small))
    per_voxel = measured / 4 / math.prod(small)
    full = tuple(spec["patch_size"])
    # float16 on the GPU: 2 bytes per value
    scaled_mb = per_voxel * math.prod(full) * 2 / MB
    modelled_mb = activation_mb(full, spec["features"], spec["strides"])
    assert modelled_mb == pytest.approx(scaled_mb, rel=1e-3)
    # The FLARE tile: 105 values per voxel, about 492 MiB in float16.
    if preset == "flare":
        assert per_voxel == pytest.approx(105.0, abs=0.1)
        assert 480 < modelled_mb < 500
    # The meta device measures the full tile directly (no arithmetic) and agrees.
    meta = meta_network(preset)
    direct = measure_forward_bytes(lambda x: lean_forward(meta, x), (1, 1, *full), "meta")
    assert direct / 4 / math.prod(full) == pytest.approx(per_voxel, rel=1e-3)


def test_model_of_the_networks_own_forward_matches_its_measurement():
    """The review's 'about 210 values per voxel' for the FLARE network's own forward."""
    spec = PRESETS["flare"]
    full = tuple(spec["patch_size"])
    meta = meta_network("flare")
    measured = measure_forward_bytes(meta, (1, 1, *full), "meta") / 4 / math.prod(full)
    modelled = activation_values(full, spec["features"], spec["strides"], lean=False)
    assert measured == pytest.approx(modelled / math.prod(full), rel=1e-3)
    assert 205 < measured < 215
    # the compact network's own forward on the CPU (real arithmetic) agrees with meta
    compact = random_network("compact")
    small = SMALL_PATCH["compact"]
    on_cpu = measure_forward_bytes(compact, (1, 1, *small))
    on_meta = measure_forward_bytes(meta_network("compact"), (1, 1, *small), "meta")
    assert on_cpu == on_meta


def test_activation_model_fits_the_demo_models_anisotropic_plans(demo_model):
    """Real plans from nnU-Net's planner (1x3x3 first kernels, 1x2x2 first stride)."""
    model = load_model(demo_model)
    net = model.networks[0]
    features = list(net.encoder.output_channels)
    strides = [list(s) for s in net.encoder.strides]
    patch = model.patch_size
    measured = measure_forward_bytes(lambda x: lean_forward(net, x), (1, 1, *patch))
    assert activation_values(patch, features, strides) * 4 == pytest.approx(measured, rel=1e-3)


def test_predicted_device_peak_adds_its_parts():
    voxels = 692 * 510 * 510  # the largest FLARE case at the FLARE network's spacing
    act = activation_mb((96, 160, 160), PRESETS["flare"]["features"], PRESETS["flare"]["strides"])
    weights = 30_800_000 * 4
    peak = predict_device_peak(voxels, 1, weights, act)
    assert peak.image_mb == pytest.approx(voxels * 2 / MB)
    assert peak.accumulator_mb == pytest.approx(voxels * 4 / MB)
    assert peak.weights_mb == pytest.approx(1.5 * weights / MB)
    assert (peak.context_mb, peak.workspace_mb) == (CUDA_CONTEXT_MB, CUDNN_WORKSPACE_MB)
    parts = (
        peak.context_mb,
        peak.weights_mb,
        peak.image_mb,
        peak.accumulator_mb,
        peak.activations_mb,
        peak.workspace_mb,
    )
    assert peak.total_mb == pytest.approx(sum(parts))
    assert f"{peak.total_mb:.0f} MB" in peak.describe()
    # on the host, the image and accumulator leave the device
    host = predict_device_peak(voxels, 1, weights, act, image_on_device=False, acc_on_device=False)
    assert host.total_mb == pytest.approx(peak.total_mb - peak.image_mb - peak.accumulator_mb)
    # the plan the 4 GB budget picks for it keeps both on the device, under 4096 MB
    plan = plan_buffers(voxels, 1, 4096 - CUDA_CONTEXT_MB - peak.weights_mb, 0.0, act)
    assert plan.image_on_device and plan.acc_on_device
    assert peak.total_mb < 4096


def test_activation_model_fits_the_residual_encoder_unet():
    """ResEnc blocks keep their input for the residual sum: 4 maps per encoder stage."""
    net = resenc_network(features=(32, 64, 128, 256)).to("meta")
    patch = (32, 64, 64)
    features, strides = [32, 64, 128, 256], [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]]
    lean = measure_forward_bytes(lambda x: lean_forward(net, x), (1, 1, *patch), "meta")
    modelled = activation_values(patch, features, strides, residual_encoder=True)
    assert modelled * 4 == pytest.approx(lean, rel=1e-3)
    own = measure_forward_bytes(net, (1, 1, *patch), "meta")
    modelled_own = activation_values(
        patch, features, strides, residual_encoder=True, lean=False, decoder_convs=1
    )
    assert modelled_own * 4 == pytest.approx(own, rel=1e-3)
