"""Long trainings, as a FLARE24 team runs them: nothing lost, resumable, all folds at once.

Real nnU-Net training on the tiny synthetic dataset of ``tests/training_fixtures.py``; each
test that trains works in its own copy of the planned work folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

pytest.register_assert_rewrite("tests.training_fixtures")

from inference.atomic import is_temporary  # noqa: E402
from tests.conftest import Payload  # noqa: E402
from tests.training_fixtures import DATASET, SPACING  # noqa: E402
from training.cli import main  # noqa: E402
from training.workspace import TrainingError  # noqa: E402

pytest_plugins = ["tests.training_fixtures"]

REPO = Path(__file__).resolve().parents[1]


def results_folder(work: Path, configuration: str, plans: str = "nnUNetPlans") -> Path:
    """``nnUNet_results/DATASET/nnUNetTrainer__PLANS__CONFIG``."""
    return work / "nnUNet_results" / DATASET / f"nnUNetTrainer__{plans}__{configuration}"


# --------------------------------------------------------------------------- requests


@pytest.mark.parametrize(
    "option", ["--epochs", "--iterations-per-epoch", "--val-iterations", "--checkpoint-every"]
)
@pytest.mark.parametrize("value", ["0", "-3"])
def test_zero_or_negative_counts_are_usage_errors(option, value, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--work", str(tmp_path), "-d", "42", option, value])
    assert exit_info.value.code == 2
    assert f"argument {option}: must be at least 1, got {value}" in capsys.readouterr().err


def test_prepare_rejects_zero_counts_and_continuing_keeps_the_recorded_schedule(tmp_path):
    from training.train import Schedule, _schedule, prepare
    from training.workspace import Workspace

    with pytest.raises(TrainingError, match="--epochs must be at least 1, got 0"):
        prepare(Workspace(tmp_path), "42", "3d_fullres", epochs=0)
    previous = {"epochs": 7, "iterations_per_epoch": 9, "val_iterations": 3}
    assert _schedule(None, None, None, previous) == Schedule(7, 9, 3)
    assert _schedule(12, None, None, previous) == Schedule(12, 9, 3)
    assert _schedule(None, None, None, None) == Schedule(1000, 250, 50)  # nnU-Net's


def test_numbered_fold_with_fewer_than_five_cases_is_one_line(fresh_work, capsys, nnunet_env):
    preprocessed = fresh_work / "nnUNet_preprocessed" / DATASET
    (preprocessed / "splits_final.json").unlink(missing_ok=True)
    # A dataset of 3 cases, raw and preprocessed alike (train refuses incomplete data).
    raw = fresh_work / "nnUNet_raw" / DATASET
    for path in [*preprocessed.glob("*/Tiny_00[345]*"), *raw.glob("*/Tiny_00[345]*")]:
        path.unlink()
    argv = ["train", "--work", str(fresh_work), "-d", "42", "-c", "3d_compact", "-f", "0",
            "--device", "cpu"]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "needs at least 5 cases; the dataset has 3 (use -f all" in err


# --------------------------------------------------------------------------- checkpoints


class _Trainer:
    """Writes a checkpoint the way nnU-Net's ``save_checkpoint`` does (one torch.save)."""

    def __init__(self) -> None:
        self.epoch = 0
        self.crash = False

    def save_checkpoint(self, filename: str) -> None:
        import torch

        torch.save({"current_epoch": self.epoch, "w": torch.arange(50_000.0)}, filename)
        if self.crash:  # killed in the middle of writing: half a file is left
            size = os.path.getsize(filename)
            with open(filename, "r+b") as f:
                f.truncate(size // 2)
            raise KeyboardInterrupt


def test_checkpoint_writes_are_atomic_and_resume_takes_the_newest_readable(tmp_path):
    import torch

    from training.checkpoints import make_saves_atomic, newest_checkpoint, readable_checkpoints

    trainer = _Trainer()
    make_saves_atomic(trainer)
    latest = tmp_path / "checkpoint_latest.pth"
    trainer.epoch = 2
    trainer.save_checkpoint(str(latest))
    trainer.epoch, trainer.crash = 3, True
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint(str(latest))
    assert torch.load(latest, weights_only=False)["current_epoch"] == 2  # the old one, whole
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_latest.pth"]  # no temp left

    # final 3, latest 5 but truncated, best 4: the newest readable one is best.
    torch.save({"current_epoch": 3}, tmp_path / "checkpoint_final.pth")
    torch.save({"current_epoch": 4}, tmp_path / "checkpoint_best.pth")
    torch.save({"current_epoch": 5, "w": torch.arange(50_000.0)}, latest)
    with open(latest, "r+b") as f:
        f.truncate(latest.stat().st_size // 2)
    _, broken = readable_checkpoints(tmp_path)
    assert [p.name for p, _ in broken] == ["checkpoint_latest.pth"]
    assert newest_checkpoint(tmp_path).path.name == "checkpoint_best.pth"
    torch.save({"current_epoch": 5}, latest)
    assert newest_checkpoint(tmp_path).epochs_done == 5


def test_planted_checkpoint_is_refused_without_running_its_payload(
    fresh_work, capsys, nnunet_env, tmp_path
):
    import torch

    fold = results_folder(fresh_work, "3d_compact") / "fold_all"
    fold.mkdir(parents=True)
    marker = tmp_path / "payload-ran"
    torch.save({"current_epoch": 3, "note": Payload(marker)}, fold / "checkpoint_latest.pth")
    argv = ["train", "--work", str(fresh_work), "-d", "42", "-c", "3d_compact", "-f", "all",
            "--device", "cpu"]  # fmt: skip
    for extra in ([], ["--continue"]):
        assert main([*argv, *extra]) == 1
        assert not marker.exists(), extra
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert "checkpoint_latest.pth refused: it asks for " in err, err


@pytest.mark.parametrize("slim", [True, False])
def test_export_refuses_a_checkpoint_that_would_run_code(tmp_path, slim):
    import torch

    from training.export import copy_checkpoint
    from training.workspace import WorkspaceError

    marker = tmp_path / "payload-ran"
    source = tmp_path / "checkpoint_final.pth"
    torch.save({"current_epoch": 3, "network_weights": {}, "note": Payload(marker)}, source)
    with pytest.raises(WorkspaceError, match=r"refused: it asks for \S+_plant"):
        copy_checkpoint(source, tmp_path / "exported.pth", slim)
    assert not marker.exists()
    assert not (tmp_path / "exported.pth").exists()


def test_plans_recorded_in_a_planted_checkpoint_are_read_without_running_it(tmp_path):
    import torch

    from inference.model import ModelError
    from training.fold_state import plans_mismatch

    marker = tmp_path / "payload-ran"
    path = tmp_path / "checkpoint_final.pth"
    torch.save({"init_args": {"plans": {}}, "note": Payload(marker)}, path)
    with pytest.raises(ModelError, match=r"refused: it asks for \S+_plant"):
        plans_mismatch(path, {}, "3d_fullres")  # what export and --continue compare
    assert not marker.exists()


def test_parameter_count_is_nnunets_and_refuses_plans_that_name_a_function(tmp_path):
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    from scripts.random_model import dataset_json, plans
    from training.plan import count_parameters
    from training.workspace import WorkspaceError

    tiny, dataset = plans("tiny"), dataset_json()
    arch = tiny["configurations"]["3d_fullres"]["architecture"]
    reference = get_network_from_plans(
        arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"], 1, 2,
        allow_init=False, deep_supervision=False,
    )  # fmt: skip
    assert count_parameters(tiny, dataset, "3d_fullres") == sum(
        p.numel() for p in reference.parameters()
    )
    marker = tmp_path / "payload-ran"
    arch["arch_kwargs"].update(nonlin="os.system", nonlin_kwargs={"command": f"touch {marker}"})
    with pytest.raises(WorkspaceError, match=r"nonlin = 'os\.system' refused unexecuted") as err:
        count_parameters(tiny, dataset, "3d_fullres")
    assert "--allow-network-class" not in str(err.value)  # an option of the predictor only
    assert not marker.exists()


def test_plans_that_name_a_python_function_are_refused_before_training(
    fresh_work, capsys, nnunet_env, tmp_path
):
    # nnU-Net's trainer would pydoc.locate the name and call it with the plans' arguments.
    plans_file = fresh_work / "nnUNet_preprocessed" / DATASET / "nnUNetPlans.json"
    plans = json.loads(plans_file.read_text())
    marker = tmp_path / "payload-ran"
    arch = plans["configurations"]["3d_compact"]["architecture"]["arch_kwargs"]
    arch.update(nonlin="os.system", nonlin_kwargs={"command": f"touch {marker}"})
    plans_file.write_text(json.dumps(plans))
    argv = ["train", "--work", str(fresh_work), "-d", "42", "-c", "3d_compact", "-f", "all",
            "--device", "cpu", "--epochs", "1", "--iterations-per-epoch", "1",
            "--val-iterations", "1", "--no-progress"]  # fmt: skip
    assert main(argv) == 1
    assert not marker.exists()
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "configuration 3d_compact: plans.json nonlin = 'os.system' refused unexecuted" in err
    assert "--allow-network-class" not in err  # an option of the predictor only
    assert not results_folder(fresh_work, "3d_compact").exists()


# --------------------------------------------------------------------------- signals


def _drain(stream) -> threading.Thread:
    """Read ``stream`` to its end on a thread; the lines land in ``thread.lines``."""
    thread = threading.Thread(target=lambda: thread.lines.extend(stream), daemon=True)
    thread.lines = []
    thread.start()
    return thread


def test_signals_are_deferred_in_the_loop_raise_outside_and_handlers_come_back():
    import time

    from training.interrupt import StopRequest, TrainingInterrupted

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    # Left unhandled by the block, the first signal is raised as the block ends.
    with pytest.raises(TrainingInterrupted), StopRequest() as stop, stop.deferred():
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: recorded, the loop decides
        time.sleep(0.05)
        assert stop.signum == signal.SIGINT
        with pytest.raises(TrainingInterrupted):  # a second signal does not wait
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
    with pytest.raises(TrainingInterrupted) as info, StopRequest():
        os.kill(os.getpid(), signal.SIGTERM)  # outside the loop: at once
        time.sleep(0.05)
    assert info.value.exit_status == 143 and info.value.signal_name == "SIGTERM"
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


@pytest.mark.slow
def test_sigterm_stops_with_a_checkpoint_no_workers_left_and_continue_resumes(
    fresh_work, capsys, nnunet_env
):
    import psutil
    import torch

    folder = results_folder(fresh_work, "3d_compact") / "fold_all"
    latest = folder / "checkpoint_latest.pth"
    argv = ["train", "--work", str(fresh_work), "-d", "42", "-c", "3d_compact", "--epochs", "3",
            "--iterations-per-epoch", "20", "--val-iterations", "1", "--device", "cpu",
            "--threads", "1", "--no-progress", "--seed", "0"]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "training", *argv, "--da-workers", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env,
    )  # fmt: skip
    workers: list = []
    try:
        for line in proc.stdout:
            if line.rstrip().endswith("Epoch 1"):  # nnU-Net's log line: epoch 0 is done
                break
        else:
            pytest.fail(f"training ended before epoch 1: {proc.stderr.read()[-2000:]}")
        # Keep both pipes drained so that the child never blocks on a full one.
        rest = [_drain(proc.stdout), _drain(proc.stderr)]
        workers = psutil.Process(proc.pid).children(recursive=True)
        assert len(workers) >= 2  # nnU-Net's augmentation processes (train, validation)
        assert latest.is_file()  # after every epoch (nnU-Net alone: every 50)
        epoch_0 = torch.load(latest, weights_only=False)["network_weights"]
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        _, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive, "augmentation workers outlived the training"
        rest[1].join(timeout=10)
        err = "".join(rest[1].lines)
    finally:
        for leftover in [proc, *workers]:  # whatever happened, leave no process behind
            with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
                leftover.kill()
    assert proc.returncode == 128 + signal.SIGTERM
    said = [line for line in err.splitlines() if line.startswith("interrupted")]
    assert len(said) == 1 and said[0] == err.strip().splitlines()[-1]
    assert f"checkpoint {latest} holds 1 finished epochs" in said[0]
    assert said[0].endswith("--continue") and "python -m training train" in said[0]
    checkpoint = torch.load(latest, weights_only=False)
    assert checkpoint["current_epoch"] == 1
    # Written at the signal: the weights carry the iterations of the interrupted epoch.
    assert any(not torch.equal(checkpoint["network_weights"][k], v) for k, v in epoch_0.items())
    assert not [p for p in folder.iterdir() if is_temporary(p)]

    capsys.readouterr()
    resume = [*argv, "--da-workers", "0", "--iterations-per-epoch", "2", "--continue"]
    assert main(resume) == 0
    assert "continuing from checkpoint_latest.pth at epoch 1" in capsys.readouterr().out
    final = torch.load(folder / "checkpoint_final.pth", weights_only=False)
    assert final["current_epoch"] == 3
    assert len(final["logging"]["train_losses"]) == 3


def test_a_signal_deferred_to_the_end_of_a_block_is_raised_there_not_lost():
    import time

    from training.interrupt import StopRequest, TrainingInterrupted

    reached_the_end = False
    with StopRequest() as stop, pytest.raises(TrainingInterrupted) as info, stop.deferred():
        os.kill(os.getpid(), signal.SIGTERM)  # e.g. while the final checkpoint is written
        time.sleep(0.05)
        reached_the_end = True  # the block itself is not cut short
    assert reached_the_end and info.value.signum == signal.SIGTERM
    with StopRequest() as stop, stop.deferred():
        pass  # no signal: nothing raised


def _signal_in(monkeypatch, owner, name: str, when=lambda *a, **k: True) -> None:
    """Make ``owner.name`` send this process SIGTERM (when ``when(args)``) before it runs."""
    original = getattr(owner, name)

    def signalled(*args, **kwargs):
        if when(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, signalled)


@pytest.mark.slow
def test_sigterm_while_the_final_checkpoint_is_written_stops_before_validation_and_next_fold(
    fresh_work, capsys, nnunet_env, monkeypatch
):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    trainer = results_folder(fresh_work, "3d_compact")
    final = trainer / "fold_0" / "checkpoint_final.pth"
    _signal_in(monkeypatch, nnUNetTrainer, "save_checkpoint", lambda _, f: "checkpoint_final" in f)
    argv = ["train", "--work", str(fresh_work), "-d", "42", "-c", "3d_compact", "-f", "0", "1",
            "--epochs", "1", "--iterations-per-epoch", "2", "--val-iterations", "1",
            "--device", "cpu", "--threads", "1", "--no-progress", "--validate"]  # fmt: skip
    assert main(argv) == 128 + signal.SIGTERM
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(
        f"interrupted by SIGTERM: checkpoint {final} holds 1 finished epochs; continue with:"
    )
    assert final.is_file()  # the signal waited for it
    assert not (trainer / "fold_0" / "validation").exists()
    assert not (trainer / "fold_1").exists()


@pytest.mark.slow
def test_sigterm_during_trainer_set_up_says_that_no_fold_has_finished(
    fresh_work, capsys, nnunet_env, monkeypatch
):
    import training.train

    _signal_in(monkeypatch, training.train, "build_trainer")
    argv = ["train", "--work", str(fresh_work), "-d", "42", "-c", "3d_compact", "-f", "0", "1",
            "--epochs", "1", "--device", "cpu", "--threads", "1", "--no-progress"]  # fmt: skip
    assert main(argv) == 128 + signal.SIGTERM
    assert (
        capsys.readouterr()
        .err.strip()
        .splitlines()[-1]
        .startswith(
            "interrupted by SIGTERM: no fold has finished: fold 0 has no checkpoint, "
            "fold 1 has no checkpoint; continue with: python -m training train"
        )
    )


def _process_tree(pid: int) -> list:
    import psutil

    with contextlib.suppress(psutil.Error):
        return psutil.Process(pid).children(recursive=True)
    return []


@pytest.mark.slow
def test_sigterm_during_plan_stops_nnunet_workers_and_says_one_line(fresh_work, nnunet_env):
    import time

    import psutil

    argv = ["plan", "--work", str(fresh_work), "-d", "42", "--clean", "--num-processes", "1"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "training", *argv],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    # Read by the character: nnU-Net's progress bar ends its updates with \r, not \n. The
    # reader ends only when every process holding the pipe (the pool's workers, the
    # resource tracker) has gone: what they print on the way out is read too.
    said: list[str] = []
    reader = threading.Thread(target=lambda: said.extend(iter(lambda: proc.stderr.read(1), "")))
    reader.start()
    children: list = []
    alive: list = []
    try:
        deadline = time.monotonic() + 180
        # The bar starts once nnU-Net's pool is up and its tasks are queued.
        while "Extracting dataset fingerprint" not in "".join(said):
            assert proc.poll() is None, f"plan ended first: {''.join(said)[-2000:]}"
            assert time.monotonic() < deadline, "fingerprinting did not start"
            time.sleep(0.05)
        children = _process_tree(proc.pid)
        assert children  # the pool's worker and the resource tracker
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        reader.join(timeout=60)
        _, alive = psutil.wait_procs(children, timeout=10)
    finally:
        for leftover in [proc, *children]:
            with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
                leftover.kill()
        reader.join(timeout=10)
    err = "".join(said)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert not alive and not reader.is_alive(), "nnU-Net's workers outlived plan"
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted by SIGTERM: planning did not finish; run it again: ")
    assert "Traceback" not in err and "leaked" not in err, err[-2000:]


def _fake_training_output(work: Path) -> Path:
    """The files ``export`` checks before copying (their content is never read here)."""
    plans = json.dumps({"configurations": {"3d_fullres": {"batch_size": 2}}})
    preprocessed = work / "nnUNet_preprocessed" / DATASET
    preprocessed.mkdir(parents=True)
    (preprocessed / "nnUNetPlans.json").write_text(plans)
    source = results_folder(work, "3d_fullres")
    (source / "fold_all").mkdir(parents=True)
    (source / "plans.json").write_text(plans)
    (source / "fold_all" / "checkpoint_final.pth").write_bytes(bytes(1000))
    return source


#: ``python -m training export`` with a SIGTERM half-way through copying a checkpoint
#: (``copy``) or just before the staging folder is renamed into place (``publish``).
SIGNAL_IN_EXPORT = """
import os, signal, sys, time
import training.export as export

def copy_checkpoint(source, destination, slim):
    destination.write_bytes(b"half a checkpoint")
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)

def assemble(staging, *args):
    (staging / "manifest.json").write_text("{}")

def publish(staging, output, original=export._publish):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.1)
    original(staging, output)

# the fake checkpoints hold no plans to compare (tests/test_training_checks.py does that)
export.check_fold_plans = lambda *args: None
if sys.argv[1] == "copy":
    export.copy_checkpoint = copy_checkpoint
else:
    export._assemble, export._publish = assemble, publish
from training.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize(
    ("where", "says"),
    [
        (
            "copy",
            "nothing exported, the partial copy was removed; run it again: "
            "python -m training export --work {work} -d 42 -o {model}",
        ),
        ("publish", "the model was written to {model}"),  # the renames are not parted
    ],
)
def test_sigterm_during_export_leaves_no_partial_copy(where, says, tmp_path):
    work, model = tmp_path / "work", tmp_path / "models" / "model"
    _fake_training_output(work)
    argv = ["export", "--work", str(work), "-d", "42", "-o", str(model)]
    done = subprocess.run(
        [sys.executable, "-c", SIGNAL_IN_EXPORT, where, *argv],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert done.returncode == 128 + signal.SIGTERM, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == [
        f"interrupted by SIGTERM: {says.format(work=work, model=model)}"
    ]
    assert [p.name for p in model.parent.iterdir()] == (["model"] if where == "publish" else [])


def test_export_removes_only_stale_staging_folders_it_can_prove_are_its_own(tmp_path):
    import socket

    from training.export import remove_stale_staging, staging_prefix

    output, host = tmp_path / "model", socket.gethostname()
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)  # fmt: skip
    dead = int(ended.stdout)
    stale = tmp_path / f".model.export-{dead}-{host}-a1b2c3d4"
    kept = [
        tmp_path / f".model.export-{os.getppid()}-{host}-a1b2c3d4",  # its writer runs
        tmp_path / (staging_prefix(output) + "a1b2c3d4"),  # this very process's
        tmp_path / ".model.export-a1b2c3d4",  # no owner in the name (older exports)
        tmp_path / f".model.export-{dead}-not-{host}-a1b2c3d4",  # another host's
        tmp_path / f".model2.export-{dead}-{host}-a1b2c3d4",  # another output's
        tmp_path / f".model.export-{dead}-{host}-a1b2c3d4.notes",  # not a mkdtemp name
    ]
    for folder in [stale, *kept]:
        (folder / "fold_0").mkdir(parents=True)
        (folder / "fold_0" / "checkpoint_final.pth").write_bytes(b"partial")
    lookalike_file = tmp_path / f".model.export-{dead}-{host}-e5f6g7h8"
    lookalike_file.write_text("not a folder")
    assert remove_stale_staging(output) == [stale]
    assert not stale.exists()
    assert all(path.exists() for path in [*kept, lookalike_file])


# --------------------------------------------------------------------------- folds


@pytest.mark.slow
def test_all_folds_in_one_command_resume_as_a_whole_with_lesion_metrics_and_export(
    fresh_work, tmp_path, capsys, nnunet_env
):
    """Folds 0 and 1 with validation (lesion DSC/NSD, pooled summary, export), then ``cv``.

    Validating costs two of nnU-Net's spawned worker pools per fold, so the second command
    trains folds 2-4 without it (side by side, in their own processes): the summary code
    is the same for two folds as for five.
    """
    from evaluation.metrics import flare_scores
    from inference.nifti import read_image

    trainer = results_folder(fresh_work, "3d_compact")
    common = ["train", "--work", str(fresh_work), "-d", "42", "-c", "3d_compact", "--epochs",
              "1", "--iterations-per-epoch", "2", "--val-iterations", "1", "--device", "cpu",
              "--threads", "1", "--no-progress", "--num-processes", "1"]  # fmt: skip
    pair = tmp_path / "folds01"
    assert main([*common, "-f", "0", "1", "--export", str(pair)]) == 0
    out = capsys.readouterr().out
    assert "fold 0 validation, 2 cases: lesion DSC" in out and "nnU-Net validation Dice" in out
    assert "false positives" in out  # the partial-label caveat
    assert "cross-validation (0, 1): 3 cases" in out
    summary = json.loads((trainer / "crossval_lesion_metrics.json").read_text())
    assert summary["folds"] == ["0", "1"] and len(summary["per_case"]) == 3
    # The figures come from the fold's own validation predictions, scored as FLARE does.
    record = json.loads((trainer / "fold_0" / "validation" / "lesion_metrics.json").read_text())
    assert record["ema_pseudo_dice"] is not None and record["cases"] == 2
    for case, scores in record["per_case"].items():
        pred, _ = read_image(trainer / "fold_0" / "validation" / f"{case}.nii.gz")
        gt, geometry = read_image(
            fresh_work / "nnUNet_preprocessed" / DATASET / "gt_segmentations" / f"{case}.nii.gz"
        )
        expected = flare_scores(gt > 0, pred > 0, geometry.spacing_zyx_mm, 2.0)
        assert scores["dsc"] == pytest.approx(expected.dsc)
        assert scores["nsd"] == pytest.approx(expected.nsd)
    manifest = json.loads((pair / "manifest.json").read_text())
    assert manifest["cross_validation"]["cases"] == 3
    assert manifest["per_fold"]["0"]["validation"]["lesion_dsc_mean"] == record["lesion_dsc_mean"]
    stamps = {f: (trainer / f"fold_{f}" / "checkpoint_final.pth").stat().st_mtime_ns for f in "01"}

    assert main([*common, "-f", "cv"]) == 1  # folds 0 and 1 exist: never silently redone
    assert "--continue" in capsys.readouterr().err

    model = tmp_path / "model"
    cv = [*common, "-f", "cv", "--continue", "--no-validate", "--export", str(model)]
    assert main([*cv, "--parallel-folds", "2"]) == 0
    out = capsys.readouterr().out
    assert "fold 0: finished, 1 epochs, validated: nothing to do" in out
    stamps_now = {
        f: (trainer / f"fold_{f}" / "checkpoint_final.pth").stat().st_mtime_ns for f in "01"
    }
    assert stamps_now == stamps
    for fold in "234":
        assert f"fold {fold}: started" in out
        assert (trainer / f"fold_{fold}" / "checkpoint_final.pth").is_file()
    manifest = json.loads((model / "manifest.json").read_text())
    assert manifest["folds"] == ["0", "1", "2", "3", "4"]
    assert all((model / f"fold_{f}" / "checkpoint_final.pth").is_file() for f in "01234")

    assert main(cv) == 0  # nothing left to do; the export is redone in place
    assert capsys.readouterr().out.count("nothing to do") == 5


# --------------------------------------------------------------------------- ResEnc


@pytest.mark.slow
def test_resenc_preset_is_planned_beside_the_default_and_trains(fresh_work, capsys, nnunet_env):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    preprocessed = fresh_work / "nnUNet_preprocessed" / DATASET
    assert main(["plan", "--work", str(fresh_work), "-d", "42", "--resenc", "M",
                 "--batch-sizes", "3", "--compact", "--compact-features", "4", "8", "16",
                 "--compact-patch", "16", "32", "32", "--compact-spacing", *map(str, SPACING),
                 "--preprocess", "none", "--num-processes", "1"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "dataset fingerprint up to date: reused" in out
    assert "nnUNetResEncUNetMPlans.json" in out
    resenc = PlansManager(str(preprocessed / "nnUNetResEncUNetMPlans.json"))
    fullres = resenc.get_configuration("3d_fullres")
    assert fullres.network_arch_class_name.endswith("ResidualEncoderUNet")
    assert fullres.data_identifier == "nnUNetPlans_3d_fullres"  # the default plans' data
    assert resenc.plans["configurations"]["3d_fullres_bs3"] == {
        "inherits_from": "3d_fullres",
        "batch_size": 3,
    }
    default = PlansManager(str(preprocessed / "nnUNetPlans.json"))
    assert "3d_compact" in default.plans["configurations"]

    assert main(["train", "--work", str(fresh_work), "-d", "42", "-p", "resenc-m",
                 "-c", "3d_fullres", "--batch-size", "3", "--epochs", "1",
                 "--iterations-per-epoch", "1", "--val-iterations", "1", "--device", "cpu",
                 "--threads", "1", "--no-progress"]) == 0  # fmt: skip
    folder = results_folder(fresh_work, "3d_fullres_bs3", "nnUNetResEncUNetMPlans")
    assert (folder / "fold_all" / "checkpoint_final.pth").is_file()
    model = fresh_work / "model"
    assert main(["export", "--work", str(fresh_work), "-d", "42", "-p", "resenc-m",
                 "-c", "3d_fullres", "--batch-size", "3", "-o", str(model)]) == 0  # fmt: skip
    manifest = json.loads((model / "manifest.json").read_text())
    assert manifest["plans"] == "nnUNetResEncUNetMPlans"
    assert manifest["network"] == "ResidualEncoderUNet" and manifest["batch_size"] == 3


# --------------------------------------------------------------------------- DDP


def _killed_worker(rank: int) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def test_ddp_worker_killed_by_a_signal_is_a_one_line_error():
    from training.ddp import spawn_workers

    with pytest.raises(TrainingError) as info:
        spawn_workers(_killed_worker, (), 1)
    message = str(info.value)
    assert len(message.splitlines()) == 1
    assert "DDP worker 0" in message and "was killed by SIGKILL" in message


def test_ddp_workers_meet_on_localhost_whatever_is_inherited():
    from training.ddp import ddp_environment

    env = ddp_environment({"MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "29555"})
    assert env == {"MASTER_ADDR": "localhost", "MASTER_PORT": "29555"}
    assert ddp_environment({})["MASTER_PORT"].isdigit()


# --------------------------------------------------------------------------- benchmark


@pytest.mark.slow
def test_training_benchmark_measures_a_batch_size_and_writes_its_section(fresh_work, tmp_path):
    from benchmarks.training import (
        Measurement,
        Preset,
        Run,
        build_parser,
        measure,
        predicted_peak_mb,
        section_markdown,
        update_results,
    )

    preset = Preset("tiny", "3d_compact", 42, (4, 8, 16), SPACING, (16, 32, 32), "tiny test net")
    args = build_parser().parse_args(
        ["--device", "cpu", "--iterations", "2", "--warmup", "1", "--threads", "1",
         "--da-workers", "1"]
    )  # fmt: skip
    m = measure(fresh_work, DATASET, preset, 2, args)
    assert m.status == "ok", m.note
    assert 0 < m.s_per_iteration < m.wall_s
    assert 0 <= m.data_wait_s_per_iteration <= m.s_per_iteration
    assert m.peak_rss_mb > 200  # torch and nnU-Net in the trainer and its worker

    skipped = Measurement("tiny", 8, "cpu", status="skipped", note="predicted peak too large")
    run = Run(
        command="python -m benchmarks.training --test",
        started="start",
        finished="end",
        load_average={"start": [0.5, 0.5, 0.5], "end": [0.5, 0.5, 0.5]},
        machine={"cpu": "test cpu", "cpu_cores_logical": 2, "ram_mb": 1},
        settings={"iterations": 2, "warmup": 1, "threads": 1, "da_workers": 1},
        configurations={"tiny": {"description": "tiny", "patch": [16, 32, 32], "parameters": 1e5}},
        measurements=[m, skipped],
    )
    results = tmp_path / "RESULTS.md"
    results.write_text(
        "# Results\n\n<!-- BEGIN cpu section -->\nkeep me\n<!-- END cpu section -->\n"
    )
    update_results(results, section_markdown(run))
    update_results(results, section_markdown(run))
    text = results.read_text()
    assert "keep me" in text and text.count("<!-- BEGIN training section -->") == 1
    assert f"| tiny | cpu | 2 | {m.s_per_iteration:.2f} |" in text
    assert "| tiny | cpu | 8 |" in text and "skipped: predicted peak too large" in text

    done = [
        Measurement("t", 2, "cpu", peak_rss_mb=1000.0),
        Measurement("t", 4, "cpu", peak_rss_mb=1500.0),
    ]
    assert predicted_peak_mb(done, 8) == pytest.approx(2500.0)
    assert predicted_peak_mb(done[:1], 8) == pytest.approx(4000.0)
