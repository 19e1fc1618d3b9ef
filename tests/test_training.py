"""The training package with real nnU-Net on tiny synthetic CT: convert, plan, train, export.

The slow tests share one work folder (module scope): convert -> plan -> train -> export,
about 1-2 minutes on 2 CPU cores, most of it nnU-Net's spawn pools starting up.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from inference.nifti import Geometry, read_geometry, read_image, write_image
from synthetic import generate_case, write_case
from training.cli import main

SHAPE = (16, 32, 32)
SPACING = (2.0, 1.5, 1.5)
N_CASES = 6
BATCH = 3
EPOCHS, ITERATIONS = 3, 6
DATASET = "Dataset042_Tiny"


def tree_digest(folder: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file below ``folder``."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def nnunet_env():
    """Keep nnU-Net's environment variables (set by the CLI) local to this module."""
    with pytest.MonkeyPatch.context() as mp:
        for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            mp.setenv(key, "unset-by-test")
        mp.setenv("nnUNet_def_n_proc", "1")
        mp.setenv("nnUNet_n_proc_DA", "0")
        yield mp


def write_tiny_flare_folder(root: Path, n_cases: int) -> Path:
    """A FLARE24-style folder of tiny, fully labeled cases (3 lesions each) + 1 unlabeled."""
    for i in range(n_cases):
        case = generate_case(100 + i, SHAPE, spacing_zyx_mm=SPACING, kind="full", n_lesions=3)
        write_case(case, f"Tiny_{i:03d}", root / "imagesTr", root / "labelsTr")
    unlabeled = generate_case(99, SHAPE, spacing_zyx_mm=SPACING, kind="unlabeled")
    write_case(unlabeled, "Tiny_999", root / "unlabeledTr")
    return root


# --------------------------------------------------------------------------- convert


@pytest.fixture
def messy_folder(tmp_path) -> Path:
    """Two good pairs (one with an int16 label), and one pair per kind of defect."""
    root = write_tiny_flare_folder(tmp_path / "flare", 1)  # Tiny_000: good uint8
    images, labels = root / "imagesTr", root / "labelsTr"

    def add(name: str, seed: int) -> tuple[np.ndarray, np.ndarray, Geometry]:
        case = generate_case(seed, SHAPE, spacing_zyx_mm=SPACING, kind="full", n_lesions=2)
        write_image(images / f"{name}_0000.nii.gz", case.image, case.geometry)
        return case.image, case.label, case.geometry

    _, label, g = add("good_int16", 1)
    write_image(labels / "good_int16.nii.gz", label.astype(np.int16), g)
    _, label, g = add("bad_size", 2)
    smaller = Geometry((30, 32, 16), g.spacing_xyz_mm, g.origin_xyz_mm, g.direction)
    write_image(labels / "bad_size.nii.gz", label[:, :, :30], smaller)
    _, label, g = add("bad_spacing", 3)
    other = Geometry(g.size_xyz, (1.5, 1.5, 2.5), g.origin_xyz_mm, g.direction)
    write_image(labels / "bad_spacing.nii.gz", label, other)
    _, label, g = add("bad_value", 4)
    label = label.copy()
    label[0, 0, 0] = 2
    write_image(labels / "bad_value.nii.gz", label, g)
    _, label, g = add("bad_unreadable", 5)
    write_image(labels / "bad_unreadable.nii.gz", label, g)
    (images / "bad_unreadable_0000.nii.gz").write_bytes(b"this is not a NIfTI file" * 10)
    add("no_label", 6)
    return root


def test_convert_keeps_valid_pairs_reports_bad_ones_and_leaves_source_unchanged(
    messy_folder, tmp_path, capsys, nnunet_env
):
    before = tree_digest(messy_folder)
    work = tmp_path / "work"

    rc = main(["convert", "--work", str(work), "-i", str(messy_folder), "--dataset-id", "7",
               "--name", "Messy", "--workers", "1"])  # fmt: skip

    out, err = capsys.readouterr()
    assert rc == 0
    assert tree_digest(messy_folder) == before
    dataset = work / "nnUNet_raw" / "Dataset007_Messy"
    assert sorted(p.name for p in (dataset / "imagesTr").iterdir()) == [
        "Tiny_000_0000.nii.gz",
        "good_int16_0000.nii.gz",
    ]
    assert sorted(p.name for p in (dataset / "labelsTr").iterdir()) == [
        "Tiny_000.nii.gz",
        "good_int16.nii.gz",
    ]
    reasons = {
        line.split(":", 1)[0].removeprefix("skipped "): line
        for line in err.splitlines()
        if line.startswith("skipped ")
    }
    assert set(reasons) == {"bad_size", "bad_spacing", "bad_value", "bad_unreadable", "no_label"}
    assert "size" in reasons["bad_size"]
    assert "spacing" in reasons["bad_spacing"]
    assert "label values 2" in reasons["bad_value"]
    assert "unreadable image" in reasons["bad_unreadable"]
    assert "no label" in reasons["no_label"]
    assert "2 kept, 5 skipped, 1 unlabeled" in out

    meta = json.loads((dataset / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "CT"}
    assert meta["labels"] == {"background": 0, "lesion": 1}
    assert meta["numTraining"] == 2 and meta["file_ending"] == ".nii.gz"
    # Images are hard links of the source files; the int16 label became a uint8 copy.
    src_image = messy_folder / "imagesTr" / "Tiny_000_0000.nii.gz"
    assert (dataset / "imagesTr" / "Tiny_000_0000.nii.gz").stat().st_ino == src_image.stat().st_ino
    label, geometry = read_image(dataset / "labelsTr" / "good_int16.nii.gz")
    assert label.dtype == np.uint8
    assert geometry == read_geometry(messy_folder / "labelsTr" / "good_int16.nii.gz")

    # --strict fails on skipped pairs; the same id under another name is refused.
    strict = ["convert", "--work", str(work), "-i", str(messy_folder), "--dataset-id", "7",
              "--name", "Messy", "--workers", "1", "--overwrite", "--strict"]  # fmt: skip
    assert main(strict) == 1
    assert main(["convert", "--work", str(work), "-i", str(messy_folder), "--dataset-id", "7",
                 "--name", "Other"]) == 1  # fmt: skip
    assert "already used by Dataset007_Messy" in capsys.readouterr().err
    assert tree_digest(messy_folder) == before


# --------------------------------------------------------------------------- plan, train, export


@pytest.fixture(scope="module")
def planned(tmp_path_factory, nnunet_env) -> Path:
    """A converted and planned tiny dataset (3d_fullres, bs 4/5 variants, tiny compact)."""
    root = tmp_path_factory.mktemp("training")
    source = write_tiny_flare_folder(root / "flare", N_CASES)
    work = root / "work"
    assert main(["convert", "--work", str(work), "-i", str(source), "--dataset-id", "42",
                 "--name", "Tiny", "--workers", "1"]) == 0  # fmt: skip
    assert main(["plan", "--work", str(work), "-d", "42", "--batch-sizes", "4", "5",
                 "--compact", "--compact-features", "4", "8", "16",
                 "--compact-patch", "16", "32", "32", "--compact-spacing", *map(str, SPACING),
                 "--num-processes", "1"]) == 0  # fmt: skip
    return work


@pytest.fixture(scope="module")
def trained(planned) -> Path:
    """A short CPU training of the tiny compact network with --batch-size 3."""
    rc = main(["train", "--work", str(planned), "-d", "42", "-c", "3d_compact",
               "--batch-size", str(BATCH), "--epochs", str(EPOCHS),
               "--iterations-per-epoch", str(ITERATIONS), "--val-iterations", "1",
               "--device", "cpu", "--seed", "0", "--threads", "2", "--da-workers", "0",
               "--no-progress"])  # fmt: skip
    assert rc == 0
    return planned


@pytest.mark.slow
def test_plan_batch_size_configurations_share_3d_fullres_data(planned):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    preprocessed = planned / "nnUNet_preprocessed" / DATASET
    plans = PlansManager(str(preprocessed / "nnUNetPlans.json"))
    fullres = plans.get_configuration("3d_fullres")
    for n in (4, 5):
        raw = plans.plans["configurations"][f"3d_fullres_bs{n}"]
        assert raw == {"inherits_from": "3d_fullres", "batch_size": n}
        resolved = plans.get_configuration(f"3d_fullres_bs{n}")
        assert resolved.batch_size == n
        assert resolved.data_identifier == fullres.data_identifier
        assert resolved.patch_size == fullres.patch_size
    compact = plans.get_configuration("3d_compact")
    assert compact.data_identifier != fullres.data_identifier
    assert compact.patch_size == [16, 32, 32]
    assert compact.network_arch_init_kwargs["features_per_stage"] == [4, 8, 16]
    data_folders = sorted(p.name for p in preprocessed.iterdir() if p.is_dir())
    assert data_folders == sorted(
        [fullres.data_identifier, compact.data_identifier, "gt_segmentations"]
    )
    for identifier in (fullres.data_identifier, compact.data_identifier):
        assert len(list((preprocessed / identifier).glob("*.pkl"))) == N_CASES


@pytest.mark.slow
def test_train_records_batch_size_and_loss_goes_down(trained):
    import torch
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    folder = (
        trained / "nnUNet_results" / DATASET / f"nnUNetTrainer__nnUNetPlans__3d_compact_bs{BATCH}"
    )
    checkpoint = torch.load(folder / "fold_all" / "checkpoint_final.pth", weights_only=False)
    assert checkpoint["trainer_name"] == "nnUNetTrainer"
    init = checkpoint["init_args"]
    assert init["configuration"] == f"3d_compact_bs{BATCH}"
    assert PlansManager(init["plans"]).get_configuration(init["configuration"]).batch_size == BATCH
    saved_plans = PlansManager(str(folder / "plans.json"))
    assert saved_plans.get_configuration(f"3d_compact_bs{BATCH}").batch_size == BATCH
    assert checkpoint["current_epoch"] == EPOCHS
    losses = checkpoint["logging"]["train_losses"]
    assert len(losses) == EPOCHS
    assert losses[-1] < losses[0]
    settings = json.loads((folder / "fold_all" / "training_settings.json").read_text())
    assert settings["batch_size"] == BATCH and settings["iterations_per_epoch"] == ITERATIONS
    # the predictor's loader (weights_only, numpy scalars allowed) reads what nnU-Net wrote,
    # optimizer and grad-scaler state included
    from inference.model import load_checkpoint

    for name in ("checkpoint_final.pth", "checkpoint_best.pth"):
        safe = load_checkpoint(folder / "fold_all" / name)
        assert set(safe) == set(checkpoint) and safe["optimizer_state"] is not None


@pytest.mark.slow
def test_train_rejects_impossible_requests(planned, capsys):
    common = ["train", "--work", str(planned), "--device", "cpu", "--epochs", "1"]
    assert main([*common, "-d", "42", "-c", "3d_compact", "--batch-size", "7"]) == 1
    assert f"larger than the {N_CASES} training cases" in capsys.readouterr().err
    assert main([*common, "-d", "42", "-c", "3d_nonexistent"]) == 1
    assert "unknown configuration '3d_nonexistent'" in capsys.readouterr().err
    assert main([*common, "-d", "43"]) == 1
    assert "dataset 43 not found" in capsys.readouterr().err


@pytest.mark.slow
def test_exported_model_predicts_with_nnunet_predictor_keeping_geometry(trained, tmp_path):
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    model = tmp_path / "model"
    assert main(["export", "--work", str(trained), "-d", "42", "-c", "3d_compact",
                 "--batch-size", str(BATCH), "-o", str(model), "--slim"]) == 0  # fmt: skip
    assert (model / "plans.json").is_file() and (model / "dataset.json").is_file()
    checkpoint = torch.load(model / "fold_all" / "checkpoint_final.pth", weights_only=False)
    assert checkpoint["optimizer_state"] is None
    manifest = json.loads((model / "manifest.json").read_text())
    assert manifest["configuration"] == f"3d_compact_bs{BATCH}"
    assert manifest["batch_size"] == BATCH
    assert manifest["epochs"] == EPOCHS and manifest["iterations_per_epoch"] == ITERATIONS
    assert manifest["num_training_cases"] == N_CASES
    assert manifest["fingerprint"]["median_spacing_zyx_mm"] == list(SPACING)
    assert set(manifest["fingerprint"]["ct_intensity"]) >= {"mean", "std", "percentile_00_5"}
    assert manifest["versions"]["nnunetv2"] == "2.8.1"

    case = generate_case(7, (20, 36, 30), spacing_zyx_mm=(2.5, 1.2, 1.4), oblique=True)
    write_case(case, "Pred_001", tmp_path / "in")
    predictor = nnUNetPredictor(use_mirroring=False, device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model), use_folds=("all",))
    (tmp_path / "out").mkdir()
    predictor.predict_from_files_sequential(
        [[str(tmp_path / "in" / "Pred_001_0000.nii.gz")]], [str(tmp_path / "out" / "Pred_001")]
    )
    prediction, geometry = read_image(tmp_path / "out" / "Pred_001.nii.gz")
    assert geometry.mismatch(read_geometry(tmp_path / "in" / "Pred_001_0000.nii.gz")) is None
    assert prediction.shape == case.image.shape
    assert set(np.unique(prediction).tolist()) <= {0, 1}


@pytest.mark.slow
def test_continue_extends_a_finished_training(planned):
    import torch

    common = ["train", "--work", str(planned), "-d", "42", "-c", "3d_compact", "--batch-size",
              "2", "--iterations-per-epoch", "2", "--val-iterations", "1", "--device", "cpu",
              "--da-workers", "0", "--no-progress"]  # fmt: skip
    assert main([*common, "--epochs", "1"]) == 0
    assert main([*common, "--epochs", "2", "--continue"]) == 0
    folder = planned / "nnUNet_results" / DATASET / "nnUNetTrainer__nnUNetPlans__3d_compact"
    checkpoint = torch.load(folder / "fold_all" / "checkpoint_final.pth", weights_only=False)
    assert checkpoint["current_epoch"] == 2
    assert len(checkpoint["logging"]["train_losses"]) == 2


def test_help_and_imports_stay_light():
    import subprocess
    import sys

    code = (
        "import sys, training.cli, training.convert, training.plan, training.train, "
        "training.export; print('nnunetv2' in sys.modules, 'torch' in sys.modules)"
    )
    repo = Path(__file__).resolve().parents[1]
    light = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo
    )
    assert light.stdout.split() == ["False", "False"]
    for command in ([], ["convert"], ["plan"], ["train"], ["export"]):
        result = subprocess.run(
            [sys.executable, "-m", "training", *command, "--help"],
            capture_output=True,
            text=True,
            check=False,
            cwd=repo,
        )
        assert result.returncode == 0, result.stderr
        assert "usage: python -m training" in result.stdout


def test_flare24_ct_normalization_replaces_the_clip_window_and_keeps_the_dataset_values():
    from training.plan import FLARE24_CT_NORMALIZATION, use_flare24_ct_normalization

    own = {"mean": 93.5, "std": 73.8, "percentile_00_5": -25.0, "percentile_99_5": 259.0}
    plans = {"foreground_intensity_properties_per_channel": {"0": dict(own)}}
    use_flare24_ct_normalization(plans)
    used = plans["foreground_intensity_properties_per_channel"]["0"]
    assert {k: used[k] for k in FLARE24_CT_NORMALIZATION} == FLARE24_CT_NORMALIZATION
    assert used["percentile_00_5"] == -900.0 and used["percentile_99_5"] == 619.0
    assert plans["dataset_foreground_intensity_properties"] == {"0": own}


@pytest.mark.slow
def test_seeded_cpu_training_is_reproducible(planned):
    import torch

    command = ["train", "--work", str(planned), "-d", "42", "-c", "3d_compact", "--batch-size",
               "4", "--epochs", "1", "--iterations-per-epoch", "3", "--val-iterations", "1",
               "--device", "cpu", "--seed", "5", "--threads", "1", "--da-workers", "0",
               "--no-progress"]  # fmt: skip
    folder = planned / "nnUNet_results" / DATASET / "nnUNetTrainer__nnUNetPlans__3d_compact_bs4"
    weights = []
    for _ in range(2):
        assert main(command) == 0
        checkpoint = torch.load(folder / "fold_all" / "checkpoint_final.pth", weights_only=False)
        weights.append(checkpoint["network_weights"])
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
