"""Each step of the predictor against the nnU-Net v2 code it replaces (same inputs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nnunetv2.inference.export_prediction import (
    convert_predicted_logits_to_segmentation_with_correct_shape,
)
from nnunetv2.inference.sliding_window_prediction import (
    compute_gaussian,
    compute_steps_for_sliding_window,
)
from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape
from scipy.ndimage import gaussian_filter

from inference.model import load_model
from inference.preprocess import prepare
from inference.resample import input_range, plan_resampling, resample, resample_slab, value_bounds
from inference.restore import restore
from inference.sliding_window import (
    TileGrid,
    compute_steps,
    gaussian_profile,
    predict_sliding_window,
)
from tests.conftest import nnunet_reference

CPU = torch.device("cpu")

# (shape_in, shape_out, spacing_in, spacing_out): anisotropic up/down, isotropic, mixed
GEOMETRIES = [
    ((20, 40, 40), (50, 42, 42), (2.5, 0.8, 0.8), (1.0, 0.8037, 0.8037)),
    ((30, 40, 40), (37, 42, 42), (1.25, 0.8, 0.8), (1.0, 0.8037, 0.8037)),
    ((50, 42, 42), (10, 40, 40), (1.0, 0.8037, 0.8037), (5.0, 0.8, 0.8)),
    ((37, 42, 42), (30, 40, 40), (1.0, 0.8037, 0.8037), (1.25, 0.8, 0.8)),
    ((12, 30, 60), (24, 20, 70), (4.0, 1.0, 1.0), (2.0, 1.5, 0.8)),
]


def smooth_volume(shape, seed=0, sigma=2.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return gaussian_filter(rng.standard_normal(shape), sigma).astype(np.float32)


def nnunet_resample(x, shape_out, sp_in, sp_out, order, order_z=0):
    return resample_data_or_seg_to_shape(
        x[None],
        shape_out,
        sp_in,
        sp_out,
        is_seg=False,
        order=order,
        order_z=order_z,
        force_separate_z=None,
    )[0]


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_linear_and_nearest_resampling_equal_nnunet(geometry):
    shape_in, shape_out, sp_in, sp_out = geometry
    x = smooth_volume(shape_in)
    ref = nnunet_resample(x, shape_out, sp_in, sp_out, order=1)
    plan = plan_resampling(shape_in, shape_out, sp_in, sp_out, 1, 0)
    ours = resample(torch.from_numpy(x).double()[None], plan)[0].numpy()
    assert ours.shape == tuple(shape_out)
    assert np.abs(ours - ref).max() < 1e-6 * np.ptp(x)


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("smooth", [True, False], ids=["smooth", "white_noise"])
def test_cubic_resampling_equals_nnunet_spline(geometry, smooth):
    # nnU-Net: scikit-image resize(order=3) = scipy zoom with a cubic B-spline; here the
    # same spline, axis by axis in torch. White noise is the hardest input for the match.
    shape_in, shape_out, sp_in, sp_out = geometry
    x = smooth_volume(shape_in) if smooth else np.random.default_rng(1).standard_normal(shape_in)
    x = x.astype(np.float32)
    ref = nnunet_resample(x, shape_out, sp_in, sp_out, order=3)
    plan = plan_resampling(shape_in, shape_out, sp_in, sp_out, 3, 0)
    ours = resample(torch.from_numpy(x).double()[None], plan)[0].numpy()
    assert np.abs(ours - ref).max() < 1e-6 * np.ptp(x)
    # scikit-image clips cubic output to the input range; so do we
    assert ours.min() >= x.min() - 1e-6 and ours.max() <= x.max() + 1e-6


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("order", [1, 3])
def test_slabs_give_the_same_result_as_the_whole_volume(geometry, order):
    shape_in, shape_out, sp_in, sp_out = geometry
    x = torch.from_numpy(smooth_volume(shape_in)).double()[None]
    plan = plan_resampling(shape_in, shape_out, sp_in, sp_out, order, 0)
    whole = resample(x, plan)
    bounds = value_bounds(x, plan) if plan.separate_axis != 0 else None
    parts = []
    for start in range(0, shape_out[0], 7):
        stop = min(shape_out[0], start + 7)
        lo, hi = input_range(plan.axes[0], start, stop)
        parts.append(resample_slab(x[:, lo:hi], plan, start, stop, lo, bounds))
    # the spline prefilter sees a bounded context per slab: equal up to float rounding
    torch.testing.assert_close(torch.cat(parts, dim=1), whole, rtol=0, atol=1e-9)


@pytest.mark.parametrize("size", [(16, 32, 32), (17, 50, 33), (40, 100, 77), (200, 161, 33)])
@pytest.mark.parametrize("step", [0.5, 0.33, 1.0])
def test_tile_positions_equal_nnunet(size, step):
    tile = (16, 32, 32)
    assert compute_steps(size, tile, step) == compute_steps_for_sliding_window(size, tile, step)


@pytest.mark.parametrize("tile", [(16, 32, 32), (96, 160, 160), (20, 28, 36)])
def test_gaussian_weights_equal_nnunet(tile):
    ref = compute_gaussian(tile, 1 / 8, 1, dtype=torch.float64, device=CPU).numpy()
    grid = TileGrid.build(tile, tile, 0.5)  # one tile: the weight G / W is 1 everywhere
    assert grid.n_tiles == 1
    # the code's own profiles, whose outer product is the weight the tiles are given
    profiles = [gaussian_profile(t) for t in tile]
    ours = profiles[0][:, None, None] * profiles[1][None, :, None] * profiles[2][None, None, :]
    np.testing.assert_allclose(ours / ours.max(), ref / ref.max(), rtol=1e-10, atol=1e-15)
    w = grid.weight((0, 0, 0), CPU, torch.float64).numpy()
    np.testing.assert_allclose(w, 1.0)


def _ct_like(shape, seed=0) -> np.ndarray:
    img = (smooth_volume(shape, seed, 3.0) * 3000 - 100).astype(np.int16)
    img[:, :3] = 0  # a zero border: nnU-Net crops it away
    return img


@pytest.mark.parametrize(
    ("shape", "spacing"),
    [
        ((40, 100, 90), (3.0, 0.8, 0.8)),
        ((60, 70, 80), (1.25, 0.7, 0.7)),
        ((6, 20, 30), (2.0, 1.6, 1.6)),
    ],
)
def test_preprocessing_matches_nnunet(tiny_model, shape, spacing):
    pred = nnunet_reference(tiny_model)
    img = _ct_like(shape)
    props = {"spacing": list(spacing)}
    ref, _, props = DefaultPreprocessor(verbose=False).run_case_npy(
        img[None].astype(np.float32),
        None,
        props,
        pred.plans_manager,
        pred.configuration_manager,
        pred.dataset_json,
    )
    ours, record = prepare(img, spacing, load_model(tiny_model).preprocessing, CPU)
    assert [list(b) for b in record.bbox] == [list(b) for b in props["bbox_used_for_cropping"]]
    assert tuple(ours.shape) == ref.shape
    err = np.abs(ours.numpy() - ref)
    assert err.max() < 1e-5 * np.ptp(ref)  # float32 rounding only


@pytest.mark.parametrize(
    "shape", [(40, 60, 45), (10, 20, 40)]
)  # the second is smaller than the patch
def test_sliding_window_matches_nnunet_logits(tiny_model, shape):
    pred = nnunet_reference(tiny_model)
    data = torch.from_numpy(smooth_volume(shape, 3))[None]
    ref = pred.predict_logits_from_preprocessed_data(data).float()
    ref_diff = (ref[1] - ref[0]).numpy()
    model = load_model(tiny_model)
    acc = torch.zeros((1, *shape))
    predict_sliding_window(model.networks, data, model.patch_size, 2, acc, 0.5)
    ours = acc[0].numpy()
    # nnU-Net accumulates in float16, where the Gaussian underflows at tile corners; compare
    # where its weight sum is well above float16 resolution.
    grid = TileGrid.build(
        [max(s, p) for s, p in zip(shape, model.patch_size)], model.patch_size, 0.5
    )
    wsum = np.zeros(grid.image_size)
    g = compute_gaussian(tuple(model.patch_size), 1 / 8, 10, dtype=torch.float16, device=CPU)
    for tile in grid.tiles():
        wsum[grid.slices(tile)] += g.float().numpy()
    pads = [(p - s) // 2 if p > s else 0 for s, p in zip(shape, model.patch_size)]
    wsum = wsum[tuple(slice(p, p + s) for p, s in zip(pads, shape))]
    good = wsum > 1e-2
    assert good.mean() > 0.6
    assert np.abs(ours - ref_diff)[good].max() < 0.02 * np.abs(ref_diff).max()
    assert np.mean(np.sign(ours[good]) == np.sign(ref_diff[good])) > 0.999


@pytest.mark.parametrize(
    ("shape", "spacing"), [((40, 100, 90), (3.0, 0.8, 0.8)), ((60, 70, 80), (1.25, 0.7, 0.7))]
)
def test_restore_matches_nnunet_export(tiny_model, shape, spacing):
    pred = nnunet_reference(tiny_model)
    img = _ct_like(shape, 5)
    model = load_model(tiny_model)
    data, record = prepare(img, spacing, model.preprocessing, CPU)
    logits = torch.from_numpy(smooth_volume(tuple(data.shape[1:]), 7, 1.5) * 5)
    two = torch.stack([torch.zeros_like(logits), logits])
    props = {
        "spacing": list(spacing),
        "shape_before_cropping": record.shape_transposed,
        "bbox_used_for_cropping": [list(b) for b in record.bbox],
        "shape_after_cropping_and_before_resampling": record.shape_cropped,
    }
    ref = convert_predicted_logits_to_segmentation_with_correct_shape(
        two, pred.plans_manager, pred.configuration_manager, pred.label_manager, props
    )
    ours = restore(logits[None], record, model.preprocessing, CPU)
    assert ours.shape == ref.shape == shape
    assert ours.dtype == np.uint8
    assert np.count_nonzero(ours != ref) == 0
    assert 0 < ours.sum() < ours.size
