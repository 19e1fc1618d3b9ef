"""Training commands refuse what would silently go wrong, in one line each.

Most checks run on fabricated folders (plans dicts, checkpoints written with ``torch.save``);
those about preprocessed data use a copy of the session's planned tiny dataset
(``tests/training_fixtures.py``) and never train.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import shutil
import stat
from pathlib import Path

import pytest

pytest.register_assert_rewrite("tests.training_fixtures")

from tests.training_fixtures import DATASET, SPACING, write_tiny_flare_folder  # noqa: E402
from training.cli import main  # noqa: E402

pytest_plugins = ["tests.training_fixtures"]

CONFIG = "3d_fullres"
OLD_WINDOW = {"mean": 90.0, "std": 70.0, "percentile_00_5": -45.0, "percentile_99_5": 219.0}
#: Should a check fail to refuse, the training it lets through stays short.
ONE_ITERATION = ["--epochs", "1", "--iterations-per-epoch", "1", "--val-iterations", "1",
                 "--threads", "1", "--da-workers", "0", "--no-progress"]  # fmt: skip
NEW_WINDOW = {"mean": -52.23, "std": 268.8, "percentile_00_5": -900.0, "percentile_99_5": 619.0}


def fake_plans(window: dict = OLD_WINDOW, features: tuple[int, ...] = (4, 8, 16)) -> dict:
    """A plans dict with what export and train read from one 3d_fullres configuration."""
    return {
        "plans_name": "nnUNetPlans",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "foreground_intensity_properties_per_channel": {"0": dict(window)},
        "configurations": {
            CONFIG: {
                "data_identifier": "nnUNetPlans_3d_fullres",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 2,
                "patch_size": [16, 32, 32],
                "spacing": list(SPACING),
                "normalization_schemes": ["CTNormalization"],
                "use_mask_for_norm": [False],
                "architecture": {
                    "network_class_name": "dynamic_network_architectures.architectures.unet."
                    "PlainConvUNet",
                    "arch_kwargs": {
                        "n_stages": len(features),
                        "features_per_stage": list(features),
                    },
                },
            }
        },
    }


def trainer_folder(work: Path, configuration: str = CONFIG) -> Path:
    """``nnUNet_results/DATASET/nnUNetTrainer__nnUNetPlans__CONFIG``."""
    return work / "nnUNet_results" / DATASET / f"nnUNetTrainer__nnUNetPlans__{configuration}"


def write_checkpoint(path: Path, plans: dict | None, epochs: int = 1) -> None:
    """A checkpoint as nnU-Net's trainer writes one, without weights."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    init_args = {"configuration": CONFIG, "fold": path.parent.name.removeprefix("fold_")}
    if plans is not None:
        init_args["plans"] = copy.deepcopy(plans)
    torch.save(
        {
            "current_epoch": epochs,
            "trainer_name": "nnUNetTrainer",
            "init_args": init_args,
            "network_weights": {"w": torch.zeros(2)},
            "optimizer_state": None,
            "grad_scaler_state": None,
            "logging": {"train_losses": [1.0], "ema_fg_dice": [0.5]},
        },
        path,
    )


def fake_training(work: Path, plans: dict, fold_plans: dict[str, dict]) -> Path:
    """A results folder whose ``plans.json`` is ``plans`` and whose folds were trained with
    ``fold_plans`` (fold -> plans); the preprocessed plans file holds ``plans`` too."""
    preprocessed = work / "nnUNet_preprocessed" / DATASET
    preprocessed.mkdir(parents=True)
    (preprocessed / "nnUNetPlans.json").write_text(json.dumps(plans))
    folder = trainer_folder(work)
    folder.mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(plans))
    dataset = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "lesion": 1}}
    (folder / "dataset.json").write_text(json.dumps({**dataset, "numTraining": 6}))
    for fold, trained_with in fold_plans.items():
        write_checkpoint(folder / f"fold_{fold}" / "checkpoint_final.pth", trained_with)
    return folder


def export_argv(work: Path, output: Path, *folds: str) -> list[str]:
    """``python -m training export`` of ``folds`` of the fabricated training."""
    return ["export", "--work", str(work), "-d", "42", "-c", CONFIG, "-f", *folds,
            "-o", str(output)]  # fmt: skip


def one_line(capsys) -> str:
    """The single line the command wrote to stderr (fails on more, or on a traceback)."""
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    return err


# --------------------------------------------------------------------------- item 3


def test_export_refuses_folds_trained_with_other_plans_naming_them(tmp_path, capsys, nnunet_env):
    work = tmp_path / "work"
    old, new = fake_plans(OLD_WINDOW), fake_plans(NEW_WINDOW)
    # Fold 0 trained again after a re-plan (it rewrote plans.json); folds 1-4 are the old ones.
    fake_training(work, new, {"0": new, **{f: old for f in "1234"}})
    model = tmp_path / "model"

    assert main(export_argv(work, model, "cv")) == 1
    err = one_line(capsys)
    assert "folds 1, 2, 3, 4 of 3d_fullres were trained with other plans" in err
    assert "CT normalisation -45..219 HU vs -900..619 HU" in err
    assert not model.exists() and [p.name for p in tmp_path.iterdir()] == ["work"]
    assert main(export_argv(work, model, "0", "3")) == 1
    assert "fold 3 of 3d_fullres was trained with other plans" in one_line(capsys)
    # The fold trained with the exported plans alone is fine; so is a batch-size variant
    # added to the plans since (prediction does not depend on it).
    newer = copy.deepcopy(new)
    newer["configurations"]["3d_fullres_bs4"] = {"inherits_from": CONFIG, "batch_size": 4}
    (trainer_folder(work) / "plans.json").write_text(json.dumps(newer))
    assert main(export_argv(work, model, "0")) == 0
    assert (model / "fold_0" / "checkpoint_final.pth").is_file()


def test_continue_refuses_folds_trained_with_other_plans_naming_them(tmp_path):
    """``train -f cv --continue`` after a re-plan: finished folds would be skipped as done."""
    from training.train import prepare
    from training.workspace import TrainingError, Workspace

    work = tmp_path / "work"
    old, new = fake_plans(OLD_WINDOW), fake_plans(NEW_WINDOW, features=(8, 16, 32))
    fake_training(work, new, {"0": new, "2": old, "3": old})
    data = work / "nnUNet_preprocessed" / DATASET / "nnUNetPlans_3d_fullres"
    data.mkdir()
    for i in range(6):
        for suffix in (".b2nd", "_seg.b2nd", ".pkl"):
            (data / f"Tiny_{i:03d}{suffix}").touch()
    splits = [{"train": [f"Tiny_{j:03d}" for j in range(6) if j != i], "val": []} for i in range(5)]
    (data.parent / "splits_final.json").write_text(json.dumps(splits))

    with pytest.raises(TrainingError) as info:
        prepare(Workspace(work), "42", CONFIG, folds=["cv"], device="cpu", resume=True)
    message = str(info.value)
    assert "\n" not in message
    assert "folds 2, 3 of 3d_fullres were trained with other plans than nnUNetPlans.json" in message
    assert "CT normalisation -45..219 HU vs -900..619 HU now" in message and "network" in message
    # A fold trained with today's plans continues; one without a training starts.
    runs = prepare(Workspace(work), "42", CONFIG, folds=["0", "1"], device="cpu", resume=True)
    assert [r.resume for r in runs] == [True, False]


# --------------------------------------------------------------------------- item 4


def test_train_refuses_data_preprocessed_with_other_plans(fresh_work, capsys, nnunet_env):
    from training.preprocessed import record_path
    from training.train import prepare
    from training.workspace import Workspace

    data = fresh_work / "nnUNet_preprocessed" / DATASET / "nnUNetPlans_3d_fullres"
    record = json.loads(record_path(data).read_text())
    assert [p.name for p in data.iterdir() if not p.name.endswith((".b2nd", ".pkl"))] == []
    assert record["configuration"] == CONFIG and "preprocessing" in record
    assert prepare(Workspace(fresh_work), "42", CONFIG, device="cpu")  # as planned: accepted
    # The README's way to add a preset without preprocessing again, with another normalisation.
    assert main(["plan", "--work", str(fresh_work), "-d", "42", "--ct-normalization", "flare24",
                 "--preprocess", "none", "--num-processes", "1"]) == 0  # fmt: skip
    warning = capsys.readouterr().err
    assert "warning: the preprocessed data nnUNetPlans_3d_fullres was made with other" in warning

    argv = ["train", "--work", str(fresh_work), "-d", "42", "-c", CONFIG, "--device", "cpu",
            *ONE_ITERATION]  # fmt: skip
    assert main(argv) == 1
    err = one_line(capsys)
    assert f"the preprocessed data in {data} was made with other plans" in err
    assert "CT normalisation" in err and "-900..619 HU now" in err
    assert not trainer_folder(fresh_work).exists()


# --------------------------------------------------------------------------- item 9


def test_full_disk_in_plan_is_one_line_and_train_names_the_incomplete_cases(
    fresh_work, capsys, monkeypatch, nnunet_env
):
    from nnunetv2.experiment_planning import plan_and_preprocess_api

    data = fresh_work / "nnUNet_preprocessed" / DATASET / "nnUNetPlans_3d_fullres"

    def fill_the_disk(*args, **kwargs) -> None:
        # As nnU-Net's pool leaves it: the folder emptied, Tiny_000 written, Tiny_001's image
        # and label written but not its properties, the rest never started.
        keep = {"Tiny_000.b2nd", "Tiny_000_seg.b2nd", "Tiny_000.pkl", "Tiny_001.b2nd",
                "Tiny_001_seg.b2nd"}  # fmt: skip
        for path in data.iterdir():
            if path.name not in keep:
                path.unlink()
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(plan_and_preprocess_api, "preprocess_dataset", fill_the_disk)
    assert main(["plan", "--work", str(fresh_work), "-d", "42", "--num-processes", "1"]) == 1
    err = one_line(capsys)
    assert err.startswith("error: no space left on the disk of")
    assert "while preprocessing 3d_fullres" in err

    argv = ["train", "--work", str(fresh_work), "-d", "42", "-c", CONFIG, "--device", "cpu",
            *ONE_ITERATION]  # fmt: skip
    assert main(argv) == 1
    err = one_line(capsys)
    assert f"the preprocessed data in {data} is incomplete" in err
    assert "Tiny_001 (no .pkl)" in err and "Tiny_002 (missing)" in err and "Tiny_000" not in err
    assert "and 0 more" not in err


def test_incomplete_cases_reads_each_suffix_once(tmp_path):
    from training.preprocessed import incomplete_cases

    for name in ("a.b2nd", "a_seg.b2nd", "a.pkl", "b_seg.b2nd", "b.pkl", "c.pkl", "x.json"):
        (tmp_path / name).touch()
    assert incomplete_cases(tmp_path, ["a", "b", "d"]) == {
        "b": "no .b2nd",
        "c": "no .b2nd, _seg.b2nd",
        "d": "missing",
    }


# --------------------------------------------------------------------------- item 12


def test_convert_counts_unused_nii_pairs_and_extra_channels(tmp_path, capsys, nnunet_env):
    import gzip

    root = write_tiny_flare_folder(tmp_path / "flare", 2)
    images, labels = root / "imagesTr", root / "labelsTr"
    shutil.copy(images / "Tiny_000_0000.nii.gz", images / "Tiny_000_0001.nii.gz")
    for name, target in (("Tiny_001_0000", images), ("Tiny_001", labels)):
        source = target / f"{name}.nii.gz"
        (target / f"{name}.nii").write_bytes(gzip.decompress(source.read_bytes()))
        source.unlink()
    (labels / "notes.txt").write_text("not a label")

    rc = main(["convert", "--work", str(tmp_path / "work"), "-i", str(root), "--dataset-id", "9",
               "--name", "Nii", "--workers", "1"])  # fmt: skip
    out, err = capsys.readouterr()
    assert rc == 0
    skipped = {
        line.split(":", 1)[0].removeprefix("skipped "): line
        for line in err.splitlines()
        if line.startswith("skipped ")
    }
    assert set(skipped) == {"Tiny_000_0001.nii.gz", "Tiny_001", "notes.txt"}
    assert "extra channel _0001 of Tiny_000" in skipped["Tiny_000_0001.nii.gz"]
    assert "uncompressed .nii image and label" in skipped["Tiny_001"]
    assert "1 kept, 3 skipped, 1 unlabeled" in out


# --------------------------------------------------------------------------- item 13


def test_export_into_a_path_below_a_file_is_one_line(tmp_path, capsys, nnunet_env):
    work = tmp_path / "work"
    plans = fake_plans()
    fake_training(work, plans, {"all": plans})
    (tmp_path / "afile").write_text("a file")

    assert main(export_argv(work, tmp_path / "afile" / "model", "all")) == 1
    err = one_line(capsys)
    assert f"{tmp_path / 'afile'} is a file, not a folder" in err


def test_continue_into_another_network_is_one_line(tmp_path):
    """A checkpoint of another network (re-planned since): torch's 167-line size mismatch."""
    import torch

    from training.train import _resume
    from training.workspace import TrainingError

    torch.save({"current_epoch": 2}, tmp_path / "checkpoint_latest.pth")

    class Trainer:
        def load_checkpoint(self, path: str) -> None:
            torch.nn.Linear(4, 2).load_state_dict(torch.nn.Linear(8, 2).state_dict())

    with pytest.raises(TrainingError) as info:
        _resume(Trainer(), tmp_path, rank=0)
    message = str(info.value)
    assert "\n" not in message and "holds another network than the plans build now" in message
    assert "size mismatch for weight" in message and "--restart" in message


# --------------------------------------------------------------------------- item 14


def test_exported_model_folder_is_readable_by_others(tmp_path, nnunet_env):
    work = tmp_path / "work"
    plans = fake_plans()
    fake_training(work, plans, {"all": plans})
    model = tmp_path / "model"
    old = os.umask(0o022)
    try:
        assert main(export_argv(work, model, "all")) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(model.stat().st_mode) == 0o755
    assert stat.S_IMODE((model / "fold_all").stat().st_mode) == 0o755


@pytest.mark.parametrize("kind", ["FIFO", "link to /dev/zero", "folder"])
def test_checkpoint_that_is_no_regular_file_is_named_so(kind, tmp_path, capsys, nnunet_env):
    from training.checkpoints import readable_checkpoints

    work = tmp_path / "work"
    plans = fake_plans()
    folder = fake_training(work, plans, {}) / "fold_all"
    folder.mkdir()
    checkpoint = folder / "checkpoint_final.pth"
    if kind == "FIFO":
        os.mkfifo(checkpoint)
    elif kind == "folder":
        checkpoint.mkdir()
    else:
        checkpoint.symlink_to("/dev/zero")

    assert main(export_argv(work, tmp_path / "model", "all")) == 1
    err = one_line(capsys)
    expected = {"FIFO": "a FIFO", "folder": "a folder", "link to /dev/zero": "a device (a link"}
    assert f"{checkpoint} is not a regular file ({expected[kind]}" in err
    # train --continue reports it as unreadable instead of opening it (a FIFO would block).
    good, broken = readable_checkpoints(folder)
    assert good == [] and broken[0][1].startswith("not a regular file: " + expected[kind])
