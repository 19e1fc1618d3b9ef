"""Write nnU-Net v2 model folders with seeded random weights (time/memory benchmarks, tests).

Time and memory of inference do not depend on the weight values, so the FLARE default
network can be benchmarked without a trained checkpoint. The folders are complete nnU-Net
v2 results folders (plans.json, dataset.json, fold_all/checkpoint_final.pth) that
``nnUNetPredictor`` loads as well as our predictor.

Presets:
    flare    the FLARE24 Task 1 ``3d_fullres`` plans of the method paper (../shared/FLARE24.md):
             spacing (1.0, 0.8037, 0.8037), patch (96, 160, 160), 6-stage PlainConvUNet.
    compact  4 stages at (3.0, 2.0, 2.0) mm, patch (96, 128, 128), a public FLARE24 entry's size.
    tiny     3 stages, patch (16, 32, 32): CPU tests in seconds.

Usage: ``python -m scripts.random_model --preset flare -o models/flare_random``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

#: Foreground CT intensity properties of the FLARE24 Task 1 training set (FLARE24.md).
FLARE_CT = {
    "max": 3071.0,
    "mean": -52.23,
    "median": -30.0,
    "min": -1024.0,
    "percentile_00_5": -900.0,
    "percentile_99_5": 619.0,
    "std": 268.80,
}

PRESETS = {
    "flare": {
        "spacing": [1.0, 0.8037, 0.8037],
        "patch_size": [96, 160, 160],
        "features": [32, 64, 128, 256, 320, 320],
        "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]],
        "batch_size": 2,
    },
    "compact": {
        "spacing": [3.0, 2.0, 2.0],
        "patch_size": [96, 128, 128],
        "features": [32, 64, 128, 256],
        "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]],
        "batch_size": 2,
    },
    "tiny": {
        "spacing": [2.0, 1.6, 1.6],
        "patch_size": [16, 32, 32],
        "features": [4, 8, 16],
        "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
        "batch_size": 2,
    },
}


def configuration(preset: str) -> dict:
    """An nnU-Net v2 ``3d_fullres`` configuration dict for a preset."""
    p = PRESETS[preset]
    n = len(p["features"])
    return {
        "data_identifier": f"nnUNetPlans_3d_fullres_{preset}",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": p["batch_size"],
        "patch_size": p["patch_size"],
        "median_image_size_in_voxels": [121, 512, 512],
        "spacing": p["spacing"],
        "normalization_schemes": ["CTNormalization"],
        "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {
            "is_seg": False,
            "order": 3,
            "order_z": 0,
            "force_separate_z": None,
        },
        "resampling_fn_seg_kwargs": {
            "is_seg": True,
            "order": 1,
            "order_z": 0,
            "force_separate_z": None,
        },
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {
            "is_seg": False,
            "order": 1,
            "order_z": 0,
            "force_separate_z": None,
        },
        "architecture": {
            "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {
                "n_stages": n,
                "features_per_stage": p["features"],
                "conv_op": "torch.nn.modules.conv.Conv3d",
                "kernel_sizes": [[3, 3, 3]] * n,
                "strides": p["strides"],
                "n_conv_per_stage": [2] * n,
                "n_conv_per_stage_decoder": [2] * (n - 1),
                "conv_bias": True,
                "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                "norm_op_kwargs": {"eps": 1e-05, "affine": True},
                "dropout_op": None,
                "dropout_op_kwargs": None,
                "nonlin": "torch.nn.LeakyReLU",
                "nonlin_kwargs": {"inplace": True},
            },
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
        },
        "batch_dice": False,
    }


def plans(preset: str, ct: dict | None = None) -> dict:
    """Complete plans.json content with the preset as ``3d_fullres``."""
    return {
        "dataset_name": "Dataset024_FLARE24synthetic",
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [3.0, 0.8037, 0.8037],
        "original_median_shape_after_transp": [121, 512, 512],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {"3d_fullres": configuration(preset)},
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": dict(ct or FLARE_CT)},
    }


def dataset_json(num_training: int = 0) -> dict:
    """dataset.json for one CT channel and the merged lesion label."""
    return {
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, "lesion": 1},
        "numTraining": num_training,
        "file_ending": ".nii.gz",
    }


def build_network(plans_dict: dict, num_classes: int = 2) -> torch.nn.Module:
    """The plans' network with nnU-Net's He initialisation (weights depend on the torch seed)."""
    from inference.model import build_network as build_meta

    arch = plans_dict["configurations"]["3d_fullres"]
    net = build_meta(arch, 1, num_classes).to_empty(device="cpu")
    init = getattr(net, "initialize", None)
    if init is not None:
        net.apply(init)
    for module in net.modules():
        # to_empty leaves norm affine params uninitialised; reset like the constructor
        if isinstance(module, torch.nn.modules.instancenorm._InstanceNorm) and module.affine:
            torch.nn.init.ones_(module.weight)
            torch.nn.init.zeros_(module.bias)
    return net


def write_random_model(out_dir: str | Path, preset: str = "tiny", seed: int = 0) -> Path:
    """Write a model folder with seeded random weights and return its path."""
    out = Path(out_dir)
    (out / "fold_all").mkdir(parents=True, exist_ok=True)
    p = plans(preset)
    ds = dataset_json()
    torch.manual_seed(seed)
    net = build_network(p)
    checkpoint = {
        "network_weights": net.state_dict(),
        "optimizer_state": None,
        "grad_scaler_state": None,
        "logging": {},
        "_best_ema": None,
        "current_epoch": 0,
        "init_args": {
            "plans": p,
            "configuration": "3d_fullres",
            "fold": "all",
            "dataset_json": ds,
            "device": "cpu",
        },
        "trainer_name": "nnUNetTrainer",
        "inference_allowed_mirroring_axes": (0, 1, 2),
    }
    (out / "plans.json").write_text(json.dumps(p, indent=2))
    (out / "dataset.json").write_text(json.dumps(ds, indent=2))
    torch.save(checkpoint, out / "fold_all" / "checkpoint_final.pth")
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="flare")
    parser.add_argument("-o", "--out", required=True, help="model folder to write")
    parser.add_argument("--seed", type=int, default=0, help="torch seed of the weights")
    args = parser.parse_args(argv)
    path = write_random_model(args.out, args.preset, args.seed)
    n = sum(t.numel() for t in build_network(plans(args.preset)).parameters())
    print(f"wrote {path} ({args.preset}, {n / 1e6:.2f} M parameters, seed {args.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
