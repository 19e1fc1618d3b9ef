"""A U-Net forward pass that frees every decoder input as soon as it has been used.

The networks nnU-Net builds (``PlainConvUNet``, ``ResidualEncoderUNet`` of
dynamic_network_architectures) run ``skips = encoder(x); return decoder(skips)``. The
decoder then holds, at its last (full-resolution) stage, every skip tensor, the upsampled
tensor, their concatenation (alive through the whole stage, because the caller's variable
still names it) and the stage's conv and norm outputs: about 210 values per voxel for the
FLARE default network. Nothing of that is needed at once:

* the skips are popped from the list as the decoder consumes them, so each is freed right
  after its concatenation;
* the concatenation is written into one buffer: the skip is copied in first and freed,
  then the transposed convolution runs and its output is copied in and freed, so the skip,
  the upsampled tensor and the concatenation are never alive together (``torch.cat``
  needs all three);
* each stage is run module by module (convolution, norm, nonlinearity; residual blocks as
  a whole), with this function holding the only reference to the running tensor, so the
  concatenation is freed after the stage's first convolution instead of after the stage.

The arithmetic is the network's own: the same modules in the same order on the same
values (the buffer holds exactly what ``torch.cat`` would), so the output equals
``net(x)`` to float precision; ``tests/test_forward.py`` checks it and measures the peak
with :mod:`inference.memory_model`. The peak at the last decoder stage drops from about
210 to about 104 values per voxel for the FLARE default network (see
:func:`inference.memory_model.activation_values_per_voxel`).

Networks of another structure (deep supervision on, other classes or subclasses that may
override ``forward``) are run with their own ``forward``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

Step = Callable[[torch.Tensor], torch.Tensor]


def _flatten_types() -> tuple[type, ...]:
    """Module types whose ``forward`` is exactly "run my children in order"."""
    from dynamic_network_architectures.building_blocks.residual import StackedResidualBlocks
    from dynamic_network_architectures.building_blocks.simple_conv_blocks import (
        ConvDropoutNormReLU,
        StackedConvBlocks,
    )

    return (nn.Sequential, StackedConvBlocks, ConvDropoutNormReLU, StackedResidualBlocks)


def _children_in_order(module: nn.Module) -> list[nn.Module]:
    from dynamic_network_architectures.building_blocks.residual import StackedResidualBlocks
    from dynamic_network_architectures.building_blocks.simple_conv_blocks import (
        ConvDropoutNormReLU,
        StackedConvBlocks,
    )

    if type(module) is StackedConvBlocks:
        return [module.convs]
    if type(module) is ConvDropoutNormReLU:
        return [module.all_modules]
    if type(module) is StackedResidualBlocks:
        return [module.blocks]
    return list(module)  # nn.Sequential


def chain(module: nn.Module) -> list[Step]:
    """The leaf steps that ``module`` runs one after the other.

    Only modules whose type is *exactly* a known sequential container are opened (a
    subclass may override ``forward``); anything else, residual blocks included, is one
    step.
    """
    flat = _flatten_types()
    if type(module) not in flat:
        return [module]
    steps: list[Step] = []
    for child in _children_in_order(module):
        steps.extend(chain(child))
    return steps


@dataclass(frozen=True)
class LeanPlan:
    """The steps of a supported U-Net, prepared once per network.

    Attributes:
        encoder_stem: steps before the first stage (ResEnc's stem), possibly empty.
        encoder_stages: steps of each encoder stage; each stage's output is a skip.
        transpconvs: the decoder's upsampling convolutions, lowest resolution first.
        decoder_stages: steps of each decoder stage.
        seg_layer: the final 1x1x1 convolution.
    """

    encoder_stem: tuple[Step, ...]
    encoder_stages: tuple[tuple[Step, ...], ...]
    transpconvs: tuple[nn.Module, ...]
    decoder_stages: tuple[tuple[Step, ...], ...]
    seg_layer: nn.Module


_PLANS: weakref.WeakKeyDictionary[nn.Module, LeanPlan | None] = weakref.WeakKeyDictionary()


def lean_plan(net: nn.Module) -> LeanPlan | None:
    """The lean plan of ``net``, or None when its structure is not one this module knows."""
    if net in _PLANS:
        return _PLANS[net]
    plan = _build_plan(net)
    _PLANS[net] = plan
    return plan


def _build_plan(net: nn.Module) -> LeanPlan | None:
    try:
        from dynamic_network_architectures.architectures.unet import (
            PlainConvUNet,
            ResidualEncoderUNet,
        )
        from dynamic_network_architectures.building_blocks.plain_conv_encoder import (
            PlainConvEncoder,
        )
        from dynamic_network_architectures.building_blocks.residual_encoders import (
            ResidualEncoder,
        )
        from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
    except ImportError:  # pragma: no cover - the package is a runtime requirement
        return None
    if type(net) not in (PlainConvUNet, ResidualEncoderUNet):
        return None
    encoder, decoder = net.encoder, net.decoder
    if type(encoder) not in (PlainConvEncoder, ResidualEncoder) or type(decoder) is not UNetDecoder:
        return None
    if decoder.deep_supervision or not encoder.return_skips:
        return None
    stem = getattr(encoder, "stem", None)
    return LeanPlan(
        encoder_stem=tuple(chain(stem)) if stem is not None else (),
        encoder_stages=tuple(tuple(chain(stage)) for stage in encoder.stages),
        transpconvs=tuple(decoder.transpconvs),
        decoder_stages=tuple(tuple(chain(stage)) for stage in decoder.stages),
        seg_layer=decoder.seg_layers[-1],
    )


def _run(steps: tuple[Step, ...], holder: list[torch.Tensor]) -> torch.Tensor:
    """Run ``steps`` on the tensor in ``holder``, taking it out of the holder first.

    A Python caller keeps its argument alive until the call returns; handing the input
    over in a list that is emptied here leaves the loop variable as its only reference,
    so the input and every intermediate are freed as soon as the next step has run.
    """
    x = holder.pop()
    for step in steps:
        x = step(x)
    return x


def _upsampled_dtype(low_res: torch.Tensor) -> torch.dtype:
    """The dtype the transposed convolution will produce (autocast decides it if active)."""
    device = low_res.device.type
    if device in ("cuda", "cpu") and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return low_res.dtype


def lean_forward(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``net(x)`` for a U-Net built by nnU-Net, holding fewer tensors at its peak.

    Args:
        net: a network in eval mode (any module: unsupported ones run ``net(x)``).
        x: the input batch (N, C, *patch).

    Returns:
        The logits, equal to ``net(x)`` to float precision.
    """
    plan = lean_plan(net)
    if plan is None:
        return net(x)
    skips: list[torch.Tensor] = []
    if plan.encoder_stem:
        x = _run(plan.encoder_stem, [x])
    for stage in plan.encoder_stages:
        holder = [x]
        del x
        x = _run(stage, holder)
        skips.append(x)
    del x
    low = skips.pop()
    for transpconv, stage in zip(plan.transpconvs, plan.decoder_stages, strict=True):
        skip = skips.pop()
        n_up = transpconv.out_channels
        dtype = torch.promote_types(_upsampled_dtype(low), skip.dtype)
        joined = torch.empty(
            (skip.shape[0], n_up + skip.shape[1], *skip.shape[2:]),
            dtype=dtype,
            device=skip.device,
        )
        # torch.cat((up, skip)) layout: the upsampled channels first, then the skip.
        joined[:, n_up:].copy_(skip)
        del skip
        up = transpconv(low)
        del low
        joined[:, :n_up].copy_(up)
        del up
        holder = [joined]
        del joined
        low = _run(stage, holder)  # frees the concatenation after the stage's first step
    return plan.seg_layer(low)
