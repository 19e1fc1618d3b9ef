"""The predictor as a whole: ensembles, buffer plans, CLI contract and geometry."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from inference.budget import BufferPlan, activation_mb, plan_buffers, smaller_plan
from inference.model import ModelError, load_model
from inference.nifti import Geometry, read_geometry, read_image, write_image
from inference.predictor import Predictor
from inference.preprocess import prepare
from inference.restore import restore
from inference.sliding_window import predict_sliding_window
from tests.conftest import REPO
from tests.test_inference_steps import _ct_like

CPU = torch.device("cpu")
OBLIQUE = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)


def _accumulate(models, data, scale):
    acc = torch.zeros((1, *data.shape[1:]))
    for m in models:
        predict_sliding_window(m.networks, data, m.patch_size, 2, acc, 0.5, scale=scale)
    return acc


def test_ensemble_averages_the_logits_of_its_members(tiny_model, tiny_model_b):
    a, b = load_model(tiny_model), load_model(tiny_model_b)
    img = _ct_like((30, 60, 50), 2)
    data, _ = prepare(img, (2.0, 1.2, 1.2), a.preprocessing, CPU)
    alone_a = _accumulate([a], data, 1.0)
    alone_b = _accumulate([b], data, 1.0)
    assert not torch.allclose(alone_a, alone_b)
    both = _accumulate([a, b], data, 0.5)
    torch.testing.assert_close(both, (alone_a + alone_b) / 2, rtol=1e-5, atol=1e-5)


def test_ensemble_prediction_is_the_sign_of_the_averaged_logits(tiny_model, tiny_model_b):
    # The predictor itself against a hand-made average of two different models' logits,
    # restored to the input grid: neither member alone gives that label map.
    a, b = load_model(tiny_model), load_model(tiny_model_b)
    img, spacing = _ct_like((30, 60, 50), 2), (2.0, 1.2, 1.2)
    data, prepared = prepare(img, spacing, a.preprocessing, CPU)
    logits_a, logits_b = _accumulate([a], data, 1.0), _accumulate([b], data, 1.0)
    by_hand = restore((logits_a + logits_b) / 2, prepared, a.preprocessing, CPU)
    for alone in (logits_a, logits_b):
        assert np.count_nonzero(restore(alone, prepared, a.preprocessing, CPU) != by_hand) > 1000
    labels = Predictor([a, b], CPU).predict(img, spacing).labels
    assert labels.shape == img.shape
    # the same up to float rounding of near-ties (the sum is formed in another order)
    assert np.count_nonzero(labels != by_hand) <= by_hand.size // 10_000


def test_transposed_plans_predict_as_nnunet_does(tiny_model, tmp_path):
    # plans whose axis order is a 3-cycle: transpose_backward is not transpose_forward,
    # so skipping the transpose, or undoing it with the forward order, shows.
    import json
    import shutil

    from tests.conftest import nnunet_reference

    model_dir = Path(shutil.copytree(tiny_model, tmp_path / "transposed"))
    plans = json.loads((model_dir / "plans.json").read_text())
    plans["transpose_forward"], plans["transpose_backward"] = [1, 2, 0], [2, 0, 1]
    (model_dir / "plans.json").write_text(json.dumps(plans))
    model = load_model(model_dir)
    assert model.preprocessing.transpose_forward == (1, 2, 0)
    img, spacing = _ct_like((24, 50, 40), 3), (2.5, 1.0, 1.3)
    ours = Predictor([model], CPU).predict(img, spacing).labels
    reference = nnunet_reference(model_dir).predict_single_npy_array(
        img[None].astype(np.float32), {"spacing": list(spacing)}, None, None, False
    )
    assert ours.shape == reference.shape == img.shape
    assert reference.sum() > 1000, "the random model should mark some voxels"
    overlap = 2 * np.count_nonzero(ours & reference) / (ours.sum() + reference.sum())
    assert overlap >= 0.97, f"Dice vs nnU-Net {overlap:.4f}"


def test_folds_of_one_model_form_an_ensemble(tiny_model, tmp_path):
    import shutil

    model_dir = tmp_path / "two_folds"
    shutil.copytree(tiny_model, model_dir)
    shutil.copytree(model_dir / "fold_all", model_dir / "fold_0")
    shutil.copytree(model_dir / "fold_all", model_dir / "fold_1")
    assert load_model(model_dir).folds == ["0", "1"]  # numbered folds first, like nnU-Net
    assert load_model(model_dir, ["all"]).folds == ["all"]
    two = load_model(model_dir, ["0", "1"])
    assert len(two.networks) == 2


def test_ensemble_members_must_share_preprocessing(tiny_model, tmp_path):
    import shutil

    other = tmp_path / "other_spacing"
    shutil.copytree(tiny_model, other)
    plans = json.loads((other / "plans.json").read_text())
    plans["configurations"]["3d_fullres"]["spacing"] = [3.0, 2.0, 2.0]
    (other / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(ModelError, match="share preprocessing"):
        Predictor([load_model(tiny_model), load_model(other)], CPU)


def test_buffer_plan_prefers_device_fp32_then_smaller_footprints():
    voxels = 692 * 510 * 510  # the largest FLARE case at 1 mm slices
    act = activation_mb(
        (96, 160, 160), [32, 64, 128, 256, 320, 320], [[1, 1, 1]] + [[2, 2, 2]] * 4 + [[1, 2, 2]]
    )
    assert 480 < act < 500  # 105 values per voxel in float16 (tests/test_memory_model.py)
    roomy = plan_buffers(voxels, 1, 10_000, 200, act)
    assert (roomy.image_on_device, roomy.acc_on_device, roomy.acc_fp16) == (True, True, False)
    tighter = plan_buffers(voxels, 1, roomy.estimate_mb - 1, 200, act)
    assert (tighter.acc_on_device, tighter.acc_fp16) == (True, True)
    tight = plan_buffers(voxels, 1, tighter.estimate_mb - 1, 200, act)
    assert (tight.image_on_device, tight.acc_on_device) == (True, False)
    tiny = plan_buffers(voxels, 1, 100, 200, act)
    assert (tiny.image_on_device, tiny.acc_on_device) == (False, False)
    batched = plan_buffers(voxels, 1, 10_000, 200, act, max_tile_batch=4)
    assert batched.tile_batch == 4
    assert (
        plan_buffers(voxels, 1, roomy.estimate_mb + act, 200, act, max_tile_batch=4).tile_batch == 2
    )

    chain, plan = [], BufferPlan(True, True, True, False, 4, 0.0)
    while plan is not None:
        chain.append(plan)
        plan = smaller_plan(plan)
    assert [p.tile_batch for p in chain] == [4, 1, 1, 1, 1]
    assert [(p.image_on_device, p.acc_on_device, p.acc_fp16) for p in chain[1:]] == [
        (True, True, False),
        (True, True, True),
        (True, False, False),
        (False, False, False),
    ]


def _write_case(folder, name, shape_zyx, spacing_xyz, direction=OBLIQUE, seed=0):
    img = _ct_like(shape_zyx, seed)
    geometry = Geometry(tuple(reversed(shape_zyx)), spacing_xyz, (12.5, -40.0, 3.0), direction)
    write_image(folder / f"{name}_0000.nii.gz", img, geometry)
    return geometry


def run_cli(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "inference", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        **kwargs,
    )


def test_cli_writes_uint8_masks_with_the_input_geometry(tiny_model, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    geos = {
        "caseA": _write_case(src, "caseA", (20, 50, 40), (0.7, 0.7, 3.0)),
        "caseB": _write_case(
            src, "caseB", (8, 30, 30), (0.8, 0.8, 1.25), (1, 0, 0, 0, 1, 0, 0, 0, 1)
        ),
    }
    result = run_cli("-i", src, "-o", out, "-m", tiny_model, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["caseA.nii.gz", "caseB.nii.gz"]
    for name, geometry in geos.items():
        labels, written = read_image(out / f"{name}.nii.gz")
        assert written.mismatch(geometry) is None
        assert read_geometry(out / f"{name}.nii.gz") == written
        assert labels.dtype == np.uint8
        assert set(np.unique(labels)) <= {0, 1}
    assert "caseA" in result.stderr and "read" in result.stderr and "predict" in result.stderr
    assert "predicted GPU peak" in result.stderr


def test_cli_rerun_gives_identical_files(tiny_model, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    _write_case(src, "c1", (12, 40, 40), (0.8, 0.8, 2.5))
    assert run_cli("-i", src, "-o", out, "-m", tiny_model, "-q").returncode == 0
    first = (out / "c1.nii.gz").read_bytes()
    assert run_cli("-i", src, "-o", out, "-m", tiny_model, "-q").returncode == 0
    assert (out / "c1.nii.gz").read_bytes() == first


def test_cli_help_and_usage_errors(tmp_path, tiny_model):
    assert run_cli("--help").returncode == 0
    missing = run_cli("-i", tmp_path / "nope", "-o", tmp_path / "o", "-m", tiny_model)
    assert missing.returncode == 2
    assert "does not exist" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
