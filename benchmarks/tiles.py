"""``python -m benchmarks.tiles``: how many tiles each way of leaving out air runs.

For each model (FLARE default, compact, demo) and benchmark case, without running a
network: the tiles of nnU-Net's grid on the preprocessed image, the tiles run when air
tiles are skipped (the default, exact: ``inference.air``) and the tiles of the grid
``--crop-body`` lays over the body's bounding box (not exact: the grid moves). Forward
time is proportional to the tiles run, so this says where each option can save time
before any timing is made; it takes seconds per case.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CASES = ("small", "0001", "wide")
DEFAULT_MODELS = ("flare", "compact", "demo")


def _preprocessing(name: str):
    """(preprocessing, patch) of a benchmark model, read from its plans."""
    from benchmarks.models import DEMO_DIR
    from inference.model import load_model, preprocessing_from, resolve_configuration
    from scripts.random_model import PRESETS, plans

    if name == "demo":
        model = load_model(DEMO_DIR)
        return model.preprocessing, model.patch_size
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; choose from demo, {', '.join(PRESETS)}")
    config = resolve_configuration(plans(name), "3d_fullres")
    return preprocessing_from(plans(name), config), tuple(PRESETS[name]["patch_size"])


def count(model: str, image_zyx: np.ndarray, spacing_zyx_mm, step_size: float = 0.5) -> dict:
    """Tiles of the grid, run with air skipped, and of the ``--crop-body`` grid."""
    import torch

    from inference.air import BODY_THRESHOLD_HU, normalised_threshold, select_tiles
    from inference.preprocess import body_bbox, prepare
    from inference.resample import output_shape
    from inference.sliding_window import TileGrid

    prep, patch = _preprocessing(model)
    data, _ = prepare(image_zyx, spacing_zyx_mm, prep, torch.device("cpu"))
    threshold = normalised_threshold(prep, BODY_THRESHOLD_HU)
    sel = select_tiles(data, patch, step_size, threshold)
    transposed = image_zyx.transpose(prep.transpose_forward)
    spacing_t = [spacing_zyx_mm[a] for a in prep.transpose_forward]
    margin = tuple(int(np.ceil(10.0 / s)) for s in spacing_t)
    box = body_bbox(transposed, BODY_THRESHOLD_HU, margin)
    cropped = output_shape([b - a for a, b in box], spacing_t, prep.spacing_mm)
    crop = TileGrid.build([max(s, p) for s, p in zip(cropped, patch, strict=True)], patch, 0.5)
    return {
        "grid": tuple(data.shape[1:]),
        "tiles": sel.n_tiles,
        "skip_air": sel.n_tiles - sel.n_skipped,
        "crop_body": crop.n_tiles,
    }


def main(argv: list[str] | None = None) -> int:
    """Print the table; returns the exit status."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.tiles",
        description="Tiles run per model and case: all, with air skipped (default, exact), "
        "with --crop-body (grid moved to the body box). No network runs.",
    )
    p.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES), metavar="ID")
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), metavar="NAME")
    p.add_argument("--cache", type=Path, default=REPO / "bench_out" / "cases")
    args = p.parse_args(argv)

    from benchmarks.cases import ensure_cases
    from inference.nifti import read_image

    try:
        cases = ensure_cases(args.cache, args.cases)
        for model in args.models:
            _preprocessing(model)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("| Model | Case | Grid (z×y×x) | Tiles | Run with air skipped | Run with --crop-body |")
    print("|---|---|---|---|---|---|")
    for case in cases:
        image, geometry = read_image(case.image_path)
        for model in args.models:
            c = count(model, image, geometry.spacing_zyx_mm)
            grid = "×".join(str(s) for s in c["grid"])
            print(
                f"| {model} | {case.name} | {grid} | {c['tiles']} | {c['skip_air']} "
                f"({1 - c['skip_air'] / c['tiles']:.0%} fewer) | {c['crop_body']} "
                f"({1 - c['crop_body'] / c['tiles']:.0%} fewer) |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
