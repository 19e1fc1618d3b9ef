"""The training package with real nnU-Net on tiny synthetic CT: convert, plan, train, export.

The slow tests share one work folder (module scope): convert -> plan -> train -> export,
about 1-2 minutes on 2 CPU cores, most of it nnU-Net's spawn pools starting up.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.register_assert_rewrite("tests.training_fixtures")

from inference.nifti import Geometry, read_geometry, read_image, write_image  # noqa: E402
from synthetic import generate_case, write_case  # noqa: E402
from tests.training_fixtures import (  # noqa: E402
    DATASET,
    N_CASES,
    SHAPE,
    SPACING,
    tree_digest,
    write_tiny_flare_folder,
)
from training.cli import main  # noqa: E402

pytest_plugins = ["tests.training_fixtures"]

BATCH = 3
EPOCHS, ITERATIONS = 3, 6


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

    # --strict fails on skipped pairs and writes nothing: neither over an existing dataset
    # nor a new one. The same id under another name is refused.
    written = tree_digest(dataset)
    capsys.readouterr()
    strict = ["convert", "--work", str(work), "-i", str(messy_folder), "--dataset-id", "7",
              "--name", "Messy", "--workers", "1", "--overwrite", "--strict"]  # fmt: skip
    assert main(strict) == 1
    assert "--strict: nothing written" in capsys.readouterr().err
    assert tree_digest(dataset) == written
    assert main(["convert", "--work", str(work), "-i", str(messy_folder), "--dataset-id", "8",
                 "--name", "Strict", "--workers", "1", "--strict"]) == 1  # fmt: skip
    assert not (work / "nnUNet_raw" / "Dataset008_Strict").exists()
    assert main(["convert", "--work", str(work), "-i", str(messy_folder), "--dataset-id", "7",
                 "--name", "Other"]) == 1  # fmt: skip
    assert "already used by Dataset007_Messy" in capsys.readouterr().err
    assert tree_digest(messy_folder) == before


# --------------------------------------------------------------------------- plan, train, export


@pytest.fixture(scope="module")
def planned(planned_session, nnunet_env) -> Path:
    """The session's converted and planned tiny dataset (3d_fullres, bs 4/5, tiny compact)."""
    return planned_session


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
    plans_file = planned / "nnUNet_preprocessed" / DATASET / "nnUNetPlans.json"
    plans_before = plans_file.read_text()
    common = ["train", "--work", str(planned), "--device", "cpu", "--epochs", "1"]
    assert main([*common, "-d", "42", "-c", "3d_compact", "--batch-size", "7"]) == 1
    assert f"larger than the {N_CASES} training cases" in capsys.readouterr().err
    assert "2d" in json.loads(plans_before)["configurations"]
    assert main([*common, "-d", "42", "-c", "2d", "--batch-size", "2"]) == 1
    assert "no preprocessed data" in capsys.readouterr().err
    assert plans_file.read_text() == plans_before  # refused requests add no configuration
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
def test_export_overwrite_replaces_only_an_earlier_export(trained, tmp_path, capsys):
    from synthetic.dataset import write_flare_folder
    from training.export import output_kind

    export = ["export", "--work", str(trained), "-d", "42", "-c", "3d_compact", "--batch-size",
              str(BATCH), "--slim", "--overwrite"]  # fmt: skip
    # A folder written by `python -m synthetic flare` (it has a manifest.json): kept whole.
    data = tmp_path / "flare"
    write_flare_folder(data, 2, shape_zyx=SHAPE)
    before = tree_digest(data)
    assert main([*export, "-o", str(data)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a model folder written by export" in err
    assert tree_digest(data) == before
    # The trainer's own results folder (it has plans.json): kept whole.
    results = (
        trained / "nnUNet_results" / DATASET / f"nnUNetTrainer__nnUNetPlans__3d_compact_bs{BATCH}"
    )
    before = tree_digest(results)
    assert main([*export, "-o", str(results)]) == 1
    assert tree_digest(results) == before
    # An earlier export is replaced, also one whose manifest lacks the written_by marker.
    model = tmp_path / "model"
    assert main([*export, "-o", str(model)]) == 0
    manifest = json.loads((model / "manifest.json").read_text())
    assert manifest["written_by"] == "python -m training export"
    del manifest["written_by"]
    (model / "manifest.json").write_text(json.dumps(manifest))
    assert main([*export, "-o", str(model)]) == 0
    assert json.loads((model / "manifest.json").read_text())["written_by"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flare", "model"]  # no leftovers
    # ... but not once it holds anything export did not write.
    (model / "fold_all" / "notes.txt").write_text("mine")
    before = tree_digest(model)
    assert main([*export, "-o", str(model)]) == 1
    assert "fold_all/notes.txt" in capsys.readouterr().err
    assert tree_digest(model) == before
    # The shipped demo model (rebuilt with `export --overwrite`) is recognised as an export.
    assert output_kind(Path(__file__).resolve().parents[1] / "models" / "demo")[0] == "export"


@pytest.mark.slow
def test_train_never_restarts_a_trained_fold_silently(trained, capsys):
    import subprocess
    import sys

    folder = (
        trained / "nnUNet_results" / DATASET / f"nnUNetTrainer__nnUNetPlans__3d_compact_bs{BATCH}"
        / "fold_all"
    )  # fmt: skip
    command = ["train", "--work", str(trained), "-d", "42", "-c", "3d_compact", "--batch-size",
               str(BATCH), "--epochs", str(EPOCHS), "--iterations-per-epoch", "1",
               "--val-iterations", "1", "--device", "cpu", "--no-progress"]  # fmt: skip
    before = tree_digest(folder)
    capsys.readouterr()
    assert main(command) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"finished, {EPOCHS} epochs" in err and "--continue" in err and "--restart" in err
    assert tree_digest(folder) == before
    # --continue with the same epochs has nothing to train: the checkpoint stays as it is.
    final = before["checkpoint_final.pth"]
    assert main([*command, "--continue"]) == 0
    assert f"already trained {EPOCHS} epochs" in capsys.readouterr().out
    assert tree_digest(folder)["checkpoint_final.pth"] == final
    # A fold another process is training is refused, --continue or not.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; from training.fold_state "
         "import acquire_lock; acquire_lock(Path(sys.argv[1])); print('locked', flush=True); "
         "sys.stdin.read()", str(folder)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main([*command, "--continue"]) == 1
        err = capsys.readouterr().err
        assert f"being trained now by pid {holder.pid}" in err
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert tree_digest(folder)["checkpoint_final.pth"] == final


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
    for start in ([], ["--restart"]):
        assert main([*command, *start]) == 0
        checkpoint = torch.load(folder / "fold_all" / "checkpoint_final.pth", weights_only=False)
        weights.append(checkpoint["network_weights"])
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
