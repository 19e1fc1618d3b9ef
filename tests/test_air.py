"""Skipping air tiles: nnU-Net's grid is kept and body voxels get exactly the no-skip result.

Cases with much air: synthetic FLARE-like bodies placed in a 512x512 field of view at
0.8 mm (the body fills about half of it; the tiny model's tests use a 256x256 field, to
scale with its tiles). The tile selection is compared with a brute-force
one; the accumulated logits of voxels no skipped tile covers are compared bit for bit with
a run without skipping; the labels of every voxel whose resampling neighbours are such
voxels (the guaranteed region, which must hold the whole body) are compared voxel for
voxel (``tests/test_parity.py`` compares the whole prediction with nnU-Net's own
``nnUNetPredictor`` on a 512x512 case with air around the body).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import synthetic
from inference.air import (
    MARGIN_VOX,
    effective_threshold_hu,
    exact_mask,
    normalised_threshold,
    select_tiles,
)
from inference.model import Preprocessing, load_model
from inference.predictor import PredictOptions, Predictor
from inference.preprocess import prepare
from inference.restore import restore
from inference.sliding_window import TileGrid, predict_sliding_window

CPU = torch.device("cpu")
FOV = 512


def wide_case(
    seed: int, body_yx: int, n_slices: int, spacing_z_mm: float, lesions: int = 4, fov: int = FOV
):
    """A synthetic body of ``body_yx`` voxels across, centred in a ``fov`` x ``fov`` field of
    air (0.8 mm voxels)."""
    case = synthetic.generate_case(
        seed=seed,
        shape_zyx=(n_slices, body_yx, body_yx),
        spacing_zyx_mm=(spacing_z_mm, 0.8, 0.8),
        n_lesions=lesions,
        oblique=False,
    )
    before = (fov - body_yx) // 2
    after = fov - body_yx - before
    pads = ((0, 0), (before, after), (before, after))
    image = np.pad(case.image, pads, constant_values=-1024)
    return image, case.geometry.spacing_zyx_mm


def _brute_force(image: torch.Tensor, tile, step, threshold, margin) -> np.ndarray:
    shape = image.shape[1:]
    padded = [max(s, t) for s, t in zip(shape, tile, strict=True)]
    before = [max(0, t - s) // 2 for s, t in zip(shape, tile, strict=True)]
    grid = TileGrid.build(padded, tile, step)
    flags = []
    for t in grid.tiles():
        box = tuple(
            slice(max(0, sl.start - margin - b), max(0, sl.stop + margin - b))
            for sl, b in zip(grid.slices(t), before, strict=True)
        )
        flags.append(bool((image[0][box] > threshold).any()))
    return np.array(flags)


@pytest.mark.parametrize("shape", [(40, 70, 90), (10, 70, 25)], ids=["larger", "padded"])
def test_selection_equals_brute_force_on_the_tile_grid(shape):
    gen = torch.Generator().manual_seed(len(shape) + shape[0])
    image = torch.full((1, *shape), -3.0)
    for _ in range(3):  # a few small "body" blobs
        corner = [int(torch.randint(0, s - 3, (1,), generator=gen)) for s in shape]
        image[(0, *(slice(c, c + 3) for c in corner))] = 1.0
    tile, step = (16, 32, 32), 0.5
    for margin in (0, 2):
        sel = select_tiles(image, tile, step, threshold=0.0, margin_vox=margin)
        np.testing.assert_array_equal(sel.run, _brute_force(image, tile, step, 0.0, margin))
    assert 0 < sel.n_skipped < sel.n_tiles or shape[2] < tile[2]
    assert select_tiles(image, tile, step, threshold=None).run.all()


def _ct(intensity: dict, scheme: str = "CTNormalization") -> Preprocessing:
    return Preprocessing((0, 1, 2), (0, 1, 2), (1.0, 0.8, 0.8), scheme, intensity, False)


def test_threshold_follows_the_plans_ct_normalisation():
    flare = {"mean": -52.23, "std": 268.80, "percentile_00_5": -900.0, "percentile_99_5": 619.0}
    expected = (-500 + 52.23) / 268.80
    assert normalised_threshold(_ct(flare), -500.0) == pytest.approx(expected, abs=2e-3)
    # below the lower percentile the clip decides: air and fat are one value there
    # (the demo model's plans: lesion-only foreground statistics)
    demo = {"mean": 60.30206068832971, "std": 69.12635968796948}
    lesion_only = _ct(dict(demo, percentile_00_5=-49.0, percentile_99_5=254.0))
    assert effective_threshold_hu(lesion_only, -500.0) == -49.0
    # Air far from the body, resampled (cubic, float32, clipped only below), sits at the
    # clip floor only up to rounding: it must not count as body.
    image = np.full((8, 64, 64), -1024, dtype=np.int16)
    image[:, :6, :6] = 40  # a bit of soft tissue in a corner
    data, _ = prepare(image, (2.5, 0.75, 0.75), lesion_only, CPU)
    threshold = normalised_threshold(lesion_only, -500.0)
    assert (data[0, :, :6, :6] > threshold).all()
    assert not (data[0, :, 20:, 20:] > threshold).any()
    sel = select_tiles(data, (8, 16, 16), 0.5, threshold)
    assert 0 < sel.run.sum() < sel.n_tiles // 2
    assert normalised_threshold(_ct({}, "ZScoreNormalization"), -500.0) is None


def test_accumulated_logits_of_exact_voxels_are_bitwise_the_no_skip_ones(tiny_model):
    model = load_model(tiny_model)
    # the tiny model's 51 mm tiles: a 77 mm body in a 205 mm field of view (49 tiles)
    image, spacing = wide_case(5, body_yx=96, n_slices=6, spacing_z_mm=5.0, lesions=1, fov=256)
    data, _ = prepare(image, spacing, model.preprocessing, CPU)
    threshold = normalised_threshold(model.preprocessing, -500.0)
    sel = select_tiles(data, model.patch_size, 0.5, threshold)
    assert sel.n_skipped > sel.n_tiles // 3, "the case should be mostly air"

    def accumulate(run):
        acc = torch.zeros((1, *data.shape[1:]))
        predict_sliding_window(model.networks, data, model.patch_size, 2, acc, run_tiles=run)
        return acc[0]

    skipped, full = accumulate(sel.run), accumulate(None)
    exact = exact_mask(sel, data.shape[1:])
    assert torch.equal(skipped[exact], full[exact])
    # voxels within the margin of a body voxel are exact
    body = data[0] > threshold
    near = torch.nn.functional.max_pool3d(
        body[None, None].float(), 2 * MARGIN_VOX + 1, stride=1, padding=MARGIN_VOX
    )[0, 0].bool()
    assert exact[near].all()
    # voxels covered only by skipped tiles stay 0 (background); the others were changed
    assert not exact.all() and (skipped[~exact] != full[~exact]).any()


@pytest.mark.slow
def test_wide_field_of_view_labels_in_the_body_equal_the_no_skip_labels(demo_model):
    """The trained demo model, a 154 mm body in a 307 mm field of view (384x384, 0.8 mm).

    (``tests/test_parity.py`` compares the skipping predictor with ``nnUNetPredictor`` on a
    512x512 case with air around the body: Dice >= 0.98.)
    """
    model = load_model(demo_model)
    prep = model.preprocessing
    image, spacing = wide_case(seed=7, body_yx=192, n_slices=4, spacing_z_mm=5.0, fov=384)
    skip = Predictor([model], CPU).predict(image, spacing)
    full = Predictor([model], CPU, PredictOptions(skip_air=False)).predict(image, spacing)
    assert full.n_skipped == 0 and skip.n_tiles == full.n_tiles
    assert skip.n_skipped >= skip.n_tiles // 2, "the case should be mostly air"
    assert skip.air_saved_s > 0 and "air tiles skipped" in skip.tiles_summary()

    # The guaranteed region: output voxels whose resampling reads only exact voxels.
    data, prepared = prepare(image, spacing, prep, CPU)
    sel = select_tiles(data, model.patch_size, 0.5, normalised_threshold(prep, -500.0))
    assert sel.n_skipped == skip.n_skipped
    not_exact = (~exact_mask(sel, data.shape[1:])).float()[None]
    guaranteed = restore(not_exact, prepared, prep, CPU) == 0
    np.testing.assert_array_equal(skip.labels[guaranteed], full.labels[guaranteed])

    body = image > effective_threshold_hu(prep, -500.0)
    assert guaranteed[body].all(), "every body voxel of the input is in the guaranteed region"
    assert full.labels[body].any(), "the demo model should find lesions in the body"


def test_cli_logs_tiles_skipped_and_predicted_peak_and_can_run_every_tile(tiny_model, tmp_path):
    from inference.nifti import Geometry, write_image
    from tests.test_predictor import run_cli

    image, spacing = wide_case(5, body_yx=96, n_slices=6, spacing_z_mm=5.0, lesions=1, fov=256)
    identity = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    geometry = Geometry(
        tuple(reversed(image.shape)), tuple(reversed(spacing)), (0.0,) * 3, identity
    )
    (tmp_path / "in").mkdir()
    write_image(tmp_path / "in" / "wide_0000.nii.gz", image, geometry)
    args = ("-i", tmp_path / "in", "-m", tiny_model, "--device", "cpu")
    skip = run_cli(*args, "-o", tmp_path / "skip")
    full = run_cli(*args, "-o", tmp_path / "full", "--no-skip-air")
    assert skip.returncode == 0 and full.returncode == 0, skip.stderr + full.stderr
    (line,) = [ln for ln in skip.stderr.splitlines() if ln.startswith("[1/1] wide ")]
    assert re.search(
        r"\(\d+ tiles, cpu\) \| [1-9]\d* of \d+ air tiles skipped \(~[\d.]+ s saved\)", line
    )
    assert re.search(r"\| predicted GPU peak \d+ MB = context \d+ \+ weights", line)
    assert "no air tile skipped" in full.stderr
