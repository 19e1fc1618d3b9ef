"""Faults a hostile user (or a full disk) brings, each with the line and the files it must leave.

Like test_bad_input.py (whose helpers these tests share), every test runs the real CLI on
real files next to a good case and checks the exit status, the one-line messages and the
exact content of the output folder. Faults that would kill the test process itself on a
broken build (SimpleITK aborting on a non-UTF-8 path, a real SIGTERM) run the CLI as a
subprocess.
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import inference.nifti
from inference.atomic import atomic_path, remove_stale_temporaries, temporary_name
from inference.model import ModelError, load_model
from inference.nifti import NiftiError, read_image, write_image
from tests.conftest import REPO, Payload
from tests.test_bad_input import (
    GOOD,
    GOOD_SHAPE_ZYX,
    ct_volume,
    geometry,
    make_runner,
    write_case,
)


@pytest.fixture
def run(tiny_model, tmp_path, capfd):
    """The CLI in-process on ``tmp_path/in`` (with a good case), as in test_bad_input.py."""
    return make_runner(tiny_model, tmp_path, capfd)


def _cli(module: str, *args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *map(os.fsdecode, args)],
        cwd=REPO,
        capture_output=True,
        timeout=600,
        **kwargs,
    )


def _lines(stderr: bytes) -> list[str]:
    return [ln for ln in stderr.decode("utf-8", "backslashreplace").splitlines() if ln]


# -- writing: a full disk, a writer that stops halfway --------------------------------------


@pytest.fixture
def full_tmpfs(tmp_path):
    """A 64 KB tmpfs holding an empty ``out`` folder, filled up to the last byte."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or ["mount failed"])[-1]
        pytest.skip(f"cannot mount a tmpfs here (needs root): {reason}")
    try:
        (mount / "out").mkdir()
        fd = os.open(mount / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, b"\0" * 1024)
        except OSError as err:
            assert err.errno == errno.ENOSPC
        finally:
            os.close(fd)
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_full_disk_is_a_failed_case_not_an_empty_mask(run, full_tmpfs):
    # ITK's writer returns normally on ENOSPC, leaving an empty or short file behind.
    outcome = run(out=full_tmpfs / "out")
    outcome.check(1, written=set(), errors={GOOD: r"cannot write output \(No space left"})
    assert outcome.lines[-1].startswith("done: 0/1 case(s) written")


def _failing_writer(monkeypatch, victim: str, raise_error: bool) -> None:
    """Make SimpleITK's writer stop halfway through ``victim``'s file, as a full disk does:
    half of the bytes reach the file, then it returns normally or raises."""
    real = sitk.WriteImage

    def write(image, path, *args):
        real(image, path, *args)
        if Path(path).name.startswith(f".{victim}."):
            data = Path(path).read_bytes()
            Path(path).write_bytes(data[: len(data) // 2])
            if raise_error:
                raise RuntimeError("ITK ERROR: ImageFileWriter: simulated write error")

    monkeypatch.setattr(inference.nifti.sitk, "WriteImage", write)


@pytest.mark.parametrize("raise_error", [False, True], ids=["silent", "raises"])
def test_writer_that_stops_halfway_leaves_no_file(run, monkeypatch, tmp_path, raise_error):
    write_case(run.src, "second", ct_volume(GOOD_SHAPE_ZYX, seed=4))
    _failing_writer(monkeypatch, "second", raise_error)
    outcome = run()
    outcome.check(1, written={GOOD}, errors={"second": r"cannot write output \(.*incomplete"})
    # the same through write_image: the error names the failure, the folder stays empty
    folder = tmp_path / "direct"
    folder.mkdir()
    with pytest.raises(OSError, match="the file written was incomplete"):
        write_image(folder / "second.nii.gz", ct_volume((4, 8, 8)), geometry((4, 8, 8)))
    assert list(folder.iterdir()) == []


# -- damaged gzip data ----------------------------------------------------------------------


def _flip_bytes(path: Path, offset: int, n: int = 16) -> None:
    raw = bytearray(path.read_bytes())
    for k in range(offset, offset + n):
        raw[k] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_damaged_gzip_is_refused_although_simpleitk_reads_it(run):
    damaged = write_case(run.src, "damaged", ct_volume((40, 64, 64), seed=2))
    original = sitk.GetArrayFromImage(sitk.ReadImage(str(damaged)))
    assert damaged.stat().st_size > 150_000
    _flip_bytes(damaged, 120_000)  # well after the first 64 KiB
    # SimpleITK reads it without a word, the damaged part set to zero
    read = sitk.GetArrayFromImage(sitk.ReadImage(str(damaged)))
    assert np.count_nonzero(read != original) > 10_000
    # the trailer (CRC-32 and length) of a small file is damaged: not "not a NIfTI file"
    small = write_case(run.src, "crc", ct_volume((4, 8, 8)))
    _flip_bytes(small, small.stat().st_size - 8, 1)
    run().check(
        1,
        errors={
            "damaged": r"damaged gzip data \(CRC-32 checksum mismatch",
            "crc": r"damaged gzip data \(CRC-32 checksum mismatch",
        },
    )


def test_uncompressed_nifti_is_read_and_checked_by_its_length(tmp_path):
    volume = ct_volume((6, 16, 16))
    image = sitk.GetImageFromArray(volume)
    sitk.WriteImage(image, str(tmp_path / "plain.nii"))
    array, _ = read_image(tmp_path / "plain.nii")
    np.testing.assert_array_equal(array, volume)
    raw = (tmp_path / "plain.nii").read_bytes()
    (tmp_path / "cut.nii").write_bytes(raw[:-100])
    with pytest.raises(NiftiError, match="truncated file: 2972 of 3072 bytes"):
        read_image(tmp_path / "cut.nii")


def test_evaluation_refuses_a_damaged_prediction(tmp_path):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir()
    pred.mkdir()
    labels = (np.random.default_rng(0).random((64, 96, 96)) > 0.5).astype(np.uint8)
    for folder in (gt, pred):
        write_image(folder / "c1.nii.gz", labels, geometry(labels.shape))
    assert (pred / "c1.nii.gz").stat().st_size > 80_000
    _flip_bytes(pred / "c1.nii.gz", 70_000)  # after the first 64 KiB
    damaged = sitk.GetArrayFromImage(sitk.ReadImage(str(pred / "c1.nii.gz")))
    assert np.count_nonzero(damaged != labels) > 1000  # read without a word
    with pytest.raises(NiftiError, match="damaged gzip data"):
        read_image(pred / "c1.nii.gz")
    result = _cli("evaluation", "-p", pred, "-g", gt, "-q")
    lines = _lines(result.stderr)
    assert result.returncode == 1, lines
    assert len(lines) == 1 and re.match(
        r"error: case c1: prediction .* is unreadable: damaged gzip data", lines[0]
    ), lines


# -- names: bytes that are not UTF-8, newlines ----------------------------------------------


def test_non_utf8_names_are_one_line_each(tiny_model, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    write_case(src, GOOD)
    bad = os.fsencode(src) + b"/caf\xe9_0000.nii.gz"  # Latin-1, as an old Windows share names it
    shutil.copy(src / f"{GOOD}_0000.nii.gz", bad)
    out = tmp_path / "out"
    result = _cli("inference", "-i", src, "-o", out, "-m", tiny_model, "--device", "cpu")
    lines = _lines(result.stderr)
    assert result.returncode == 1, lines
    errors = [ln for ln in lines if ln.startswith("ERROR")]
    assert errors == [
        r"ERROR caf\xe9: the path "
        + f"{src}/caf\\xe9_0000.nii.gz is not valid UTF-8, which SimpleITK cannot open "
        "(rename it)"
    ], lines
    assert sorted(os.listdir(out)) == [f"{GOOD}.nii.gz"]

    # a folder whose name is not UTF-8 is a usage error, before anything is read
    odd = os.fsencode(tmp_path) + b"/out\xff"
    result = _cli("inference", "-i", src, "-o", odd, "-m", tiny_model)
    assert result.returncode == 2
    assert _lines(result.stderr) == [
        f"error: -o {tmp_path}/out\\xff is not valid UTF-8, which SimpleITK cannot open "
        "(rename the folder)"
    ]
    assert not os.path.exists(odd)

    # evaluation: one line for the case, no abort
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir()
    pred.mkdir()
    labels = np.zeros((4, 8, 8), np.uint8)
    for folder in (gt, pred):
        write_image(folder / "c1.nii.gz", labels, geometry(labels.shape))
        shutil.copy(folder / "c1.nii.gz", os.fsencode(folder) + b"/caf\xe9.nii.gz")
    result = _cli("evaluation", "-p", pred, "-g", gt, "-q")
    lines = _lines(result.stderr)
    assert result.returncode == 1, lines
    assert len(lines) == 1 and "not valid UTF-8" in lines[0] and r"caf\xe9" in lines[0], lines


def test_newline_in_a_file_name_cannot_forge_a_log_line(run):
    (run.src / f"x\nERROR {GOOD}: forged\nWARNING y_0000.nii.gz").write_text("not an image")
    (run.src / "notes\nERROR z: forged").write_text("not a case")
    outcome = run()
    assert outcome.rc == 1, outcome.lines
    assert [ln for ln in outcome.lines if ln.startswith("ERROR")] == [
        f"ERROR x\\nERROR {GOOD}: forged\\nWARNING y: not a NIfTI file (no NIfTI-1/2 header "
        "at its start)"
    ], outcome.lines
    assert "WARNING notes\\nERROR z: forged: not named <case>_0000.nii.gz; skipped" in outcome.lines
    assert sorted(os.listdir(outcome.out)) == [f"{GOOD}.nii.gz"]


def test_long_case_name_that_fits_is_written(run):
    # 243 characters + ".nii.gz" is 250 bytes, within the 255 a name may have; the
    # temporary name (hidden, with a random part) would not fit as it is.
    name = "c" * 243
    image = sitk.GetImageFromArray(ct_volume(GOOD_SHAPE_ZYX))
    image.SetSpacing((0.8, 0.8, 2.5))
    sitk.WriteImage(image, str(run.src / f"{name}_0000.nii.gz"))
    run().check(0, written={GOOD, name})


# -- what is not a regular file ---------------------------------------------------------------


def test_links_pipes_folders_and_devices_are_named_for_what_they_are(run):
    src = run.src
    os.symlink(src / "loop_b", src / "loop_0000.nii.gz")
    os.symlink(src / "loop_0000.nii.gz", src / "loop_b")
    os.symlink(src / "gone.nii.gz", src / "dangling_0000.nii.gz")
    os.mkfifo(src / "fifo_0000.nii.gz")
    (src / "folder_0000.nii.gz").mkdir()
    os.symlink("/dev/null", src / "device_0000.nii.gz")
    run().check(
        1,
        errors={
            "loop": "symbolic link loop at loop_0000.nii.gz",
            "dangling": r"broken symbolic link: dangling_0000.nii.gz points to .*gone.nii.gz",
            "fifo": r"fifo_0000.nii.gz is a named pipe \(FIFO\), not a regular file",
            "folder": "folder_0000.nii.gz is a folder, not a regular file",
            "device": "device_0000.nii.gz is a character device, not a regular file",
        },
    )


def test_header_with_zero_or_negative_dim_is_noted(run):
    # SimpleITK reads dim 0 or -4 along z as a single slice, whatever the data holds.
    for name, dim_z in (("zero", 0), ("negative", -4)):
        path = write_case(run.src, name)
        raw = bytearray(gzip.decompress(path.read_bytes()))
        struct.pack_into("<h", raw, 40 + 2 * 3, dim_z)
        path.write_bytes(gzip.compress(bytes(raw)))
    run().check(
        0,
        written={GOOD, "zero", "negative"},
        warnings={
            "zero": r"header dim\[3\] \(z\) is 0; SimpleITK reads one voxel",
            "negative": r"header dim\[3\] \(z\) is -4; SimpleITK reads one voxel",
        },
    )


# -- outputs never replace inputs ---------------------------------------------------------------


def test_output_into_the_input_folder_keeps_its_other_files(run):
    # good.nii.gz is not a case: it is reported as skipped, and must then stay as it is.
    users = run.src / f"{GOOD}.nii.gz"
    users.write_bytes(b"the user's own file")
    write_case(run.src, "second")
    outcome = run(out=run.src)
    assert outcome.rc == 1, outcome.lines
    assert outcome.lines_for("ERROR", GOOD) == [
        f"ERROR {GOOD}: its output {GOOD}.nii.gz would replace the file {GOOD}.nii.gz of the "
        "input folder; skipped (write the outputs to another folder)"
    ]
    assert users.read_bytes() == b"the user's own file"
    assert (run.src / "second.nii.gz").is_file()


def test_output_folder_that_is_a_bind_mount_of_the_input_folder(run, tmp_path):
    write_case(run.src, "a")
    write_case(run.src, "a_0000", ct_volume(GOOD_SHAPE_ZYX, seed=5))
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    result = subprocess.run(["mount", "--bind", str(run.src), str(mirror)], capture_output=True)
    if result.returncode != 0:
        pytest.skip("cannot bind-mount here (needs root)")
    try:
        before = (run.src / "a_0000.nii.gz").read_bytes()
        outcome = run(out=mirror)
        assert outcome.lines_for("ERROR", "a_0000") == [
            "ERROR a_0000: its output a_0000.nii.gz would overwrite the input of case a; "
            "skipped (write the outputs to another folder)"
        ], outcome.lines
        assert (run.src / "a_0000.nii.gz").read_bytes() == before
    finally:
        subprocess.run(["umount", str(mirror)], check=False)


# -- temporary files ------------------------------------------------------------------------------


def test_cleanup_removes_only_its_own_stale_temporaries(tmp_path, monkeypatch):
    folder = tmp_path / "out"
    folder.mkdir()
    users = folder / ".results.tmp424242.csv"  # a user's file that looks like a temporary
    users.write_text("x")
    # another writer's temporary named by its pid (.NAME.tmpPID), from a process that has this
    # process's pid in another pid namespace (two containers on one host folder)
    other = folder / f".c1.tmp{os.getpid()}.nii.gz"
    other.write_bytes(b"being written")
    stale = temporary_name(folder / "c2.nii.gz")  # left by a killed run of ours
    stale.write_bytes(b"partial")
    with atomic_path(folder / "c3.nii.gz") as live:  # being written by a live writer
        live.write_bytes(b"in progress")
        assert remove_stale_temporaries(folder) == [stale]
        assert live.exists()
    assert sorted(p.name for p in folder.iterdir()) == sorted([users.name, other.name, "c3.nii.gz"])
    # two writers with the same pid (pid 1 in two containers) never share a name
    monkeypatch.setattr(os, "getpid", lambda: 1)
    with atomic_path(folder / "c4.nii.gz") as first, atomic_path(folder / "c4.nii.gz") as second:
        assert first != second


# -- arguments and models ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--step-size", "0"], r"--step-size must be in \(0, 1\], got 0"),
        (["--step-size", "nan"], r"--step-size must be in \(0, 1\], got nan"),
        (["--step-size", "2"], r"--step-size must be in \(0, 1\], got 2"),
        (["--threads", "0"], "--threads must be >= 1, got 0"),
        (["--threads", "-3"], "--threads must be >= 1, got -3"),
        (["--tile-batch", "-5"], "--tile-batch must be >= 1, got -5"),
        (["--vram-budget-mb", "nan"], "--vram-budget-mb must be >= 0"),
    ],
)
def test_argument_out_of_range_is_a_usage_error(run, extra, message):
    outcome = run(*extra)
    assert outcome.rc == 2, outcome.lines
    assert len(outcome.lines) == 1 and re.match(f"error: {message}", outcome.lines[0])
    assert not outcome.out.exists()


def _edit_plans(model: Path, how: str) -> None:
    plans_path = model / "plans.json"
    plans = json.loads(plans_path.read_text())
    config = plans["configurations"]["3d_fullres"]
    if how == "plans is a list":
        plans = []
    elif how == "no spacing":
        del config["spacing"]
    elif how == "zero spacing":
        config["spacing"] = [2.0, 0.0, 1.6]
    elif how == "zero patch":
        config["patch_size"] = [16, 0, 32]
    elif how == "no architecture argument":
        del config["architecture"]["arch_kwargs"]["n_conv_per_stage"]
    elif how == "nan std":
        plans["foreground_intensity_properties_per_channel"]["0"]["std"] = float("nan")
    elif how == "transpose not a permutation":
        plans["transpose_forward"] = [0, 0, 1]
    plans_path.write_text(json.dumps(plans))


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("plans is a list", r"plans.json does not hold a JSON object \(found list\)"),
        ("no spacing", r"plans.json spacing None is not three positive numbers"),
        ("zero spacing", r"plans.json spacing \[2.0, 0.0, 1.6\] is not three positive"),
        ("zero patch", r"plans.json patch_size \[16, 0, 32\] is not three positive"),
        ("no architecture argument", r"plans.json architecture cannot be built: .*n_conv_per"),
        ("nan std", "plans.json CT intensity std is nan"),
        ("transpose not a permutation", r"transpose_forward \[0, 0, 1\] is not an order"),
    ],
)
def test_broken_plans_are_a_usage_error(run, tiny_model, tmp_path, how, message):
    model = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    _edit_plans(model, how)
    outcome = run(model=model)
    assert outcome.rc == 2, outcome.lines
    assert len(outcome.lines) == 1, outcome.lines
    assert re.match(f"error: .*{message}", outcome.lines[0]), outcome.lines[0]
    assert list(outcome.out.iterdir()) == []


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_evaluation_tolerance_must_be_finite_and_not_negative(tmp_path, capsys, value):
    from evaluation.cli import main as evaluate

    gt = tmp_path / "gt"
    gt.mkdir()
    write_image(gt / "c1.nii.gz", np.zeros((4, 8, 8), np.uint8), geometry((4, 8, 8)))
    assert evaluate(["-p", str(gt), "-g", str(gt), "--tolerance-mm", value, "-q"]) == 1
    err = capsys.readouterr().err
    assert (
        err.startswith("error: --tolerance-mm must be a finite number >= 0")
        and err.count("\n") == 1
    ), err


def test_checkpoint_that_would_run_code_is_refused_unexecuted(run, tiny_model, tmp_path):
    model = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    path = model / "fold_all" / "checkpoint_final.pth"
    checkpoint = torch.load(path, weights_only=False)
    marker = tmp_path / "payload-ran"
    checkpoint["logging"] = {"note": Payload(marker)}
    torch.save(checkpoint, path)
    with pytest.raises(ModelError, match=r"refused: it asks for (tests\.)?conftest\._plant,"):
        load_model(model)
    outcome = run(model=model)
    assert outcome.rc == 2 and len(outcome.lines) == 1, outcome.lines
    assert re.match(
        rf"error: checkpoint {re.escape(str(path))} refused: it asks for \S+, which an "
        r"nnU-Net checkpoint does not hold",
        outcome.lines[0],
    )
    assert not marker.exists()


def test_checkpoint_with_numpy_scalars_loads_safely(tiny_model, tmp_path):
    # What nnU-Net logs: numpy float32/float64 scalars, a torch.device in init_args.
    model = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    path = model / "fold_all" / "checkpoint_final.pth"
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["logging"] = {"ema_fg_dice": [np.float32(0.5), np.float64(0.25)]}
    checkpoint["_best_ema"] = np.float32(0.5)
    checkpoint["init_args"]["device"] = torch.device("cpu")
    torch.save(checkpoint, path)
    assert len(load_model(model).networks) == 1


def _plans_naming(folder: Path, network: str | None = None, /, **arch_kwargs) -> Path:
    """Rewrite a model's plans so that its architecture names ``network`` / ``arch_kwargs``."""
    plans_path = folder / "plans.json"
    plans = json.loads(plans_path.read_text())
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    if network is not None:
        arch["network_class_name"] = network
    arch["arch_kwargs"].update(arch_kwargs)
    plans_path.write_text(json.dumps(plans))
    return folder


@pytest.mark.parametrize("how", ["nonlin os.system", "torch.hub.load with a hubconf.py"])
def test_plans_that_name_a_python_function_are_refused_unexecuted(tiny_model, tmp_path, how):
    # The real CLI, as predict.sh runs it: nnU-Net's pydoc.locate would call these.
    model = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    marker = tmp_path / "payload-ran"
    if how == "nonlin os.system":
        _plans_naming(model, nonlin="os.system", nonlin_kwargs={"command": f"touch {marker}"})
        refused = r"nonlin = 'os.system' refused unexecuted"
    else:
        (model / "hubconf.py").write_text(
            f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
            "def net(**kwargs):\n    return None\n"
        )
        _plans_naming(model, "torch.hub.load", repo_or_dir=str(model), model="net", source="local")
        refused = r"network_class_name = 'torch.hub.load' refused unexecuted"
    src = tmp_path / "in"
    src.mkdir()
    write_case(src, GOOD)
    result = _cli("inference", "-i", src, "-o", tmp_path / "out", "-m", model, "--device", "cpu")
    lines = _lines(result.stderr)
    assert result.returncode == 2 and len(lines) == 1, lines
    assert re.match(f"error: plans.json {refused}: ", lines[0]), lines[0]
    assert "--allow-network-class" in lines[0]
    assert not marker.exists()
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_allow_network_class_extends_the_allowlist_with_module_classes_only(
    run, tiny_model, tmp_path
):
    # nn.Identity takes any arguments and holds no weights, so it can stand in for the
    # tiny model's LeakyReLU; it lives in torch.nn.modules.linear, outside the allowlist.
    model = _plans_naming(
        Path(shutil.copytree(tiny_model, tmp_path / "model")), nonlin="torch.nn.Identity"
    )
    outcome = run(model=model)
    assert outcome.rc == 2 and len(outcome.lines) == 1, outcome.lines
    assert re.match(
        r"error: plans.json nonlin = 'torch.nn.Identity' refused unexecuted: defined in "
        r"torch.nn.modules.linear",
        outcome.lines[0],
    )
    allowed = run("--allow-network-class", "torch.nn.Identity", model=model, out=tmp_path / "ok")
    allowed.check(0)
    # Allowing a function does not make it callable: it must still be a module class.
    marker = tmp_path / "payload-ran"
    _plans_naming(model, nonlin="os.system", nonlin_kwargs={"command": f"touch {marker}"})
    outcome = run("--allow-network-class", "os.system", model=model, out=tmp_path / "no")
    assert outcome.rc == 2 and len(outcome.lines) == 1, outcome.lines
    assert (
        "nonlin = 'os.system' refused unexecuted: not a torch.nn.Module class" in outcome.lines[0]
    )
    assert not marker.exists()


# -- signals ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_stop_signal_keeps_what_is_complete(run, monkeypatch, sig, status):
    # The signal arrives while the second of three cases is predicted (sent from inside
    # the predictor, so the timing is exact).
    from inference.predictor import Predictor

    write_case(run.src, "second", ct_volume(GOOD_SHAPE_ZYX, seed=3))
    write_case(run.src, "third", ct_volume(GOOD_SHAPE_ZYX, seed=4))
    real, calls = Predictor.predict, []

    def predict(self, *args, **kwargs):
        calls.append(kwargs.get("name"))
        if len(calls) == 2:
            os.kill(os.getpid(), sig)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Predictor, "predict", predict)
    before = signal.getsignal(sig)
    outcome = run()
    assert signal.getsignal(sig) is before  # handlers restored
    assert outcome.rc == status, outcome.lines
    assert re.fullmatch(
        rf"error: interrupted by {signal.Signals(sig).name} after [\d.]+ s: 1/3 case\(s\) "
        rf"written to {re.escape(str(outcome.out))}; not done: second, third",
        outcome.lines[-1],
    ), outcome.lines
    outcome.check(status, written={GOOD})
    assert calls == [GOOD, "second"]


def test_sigterm_to_the_process_stops_it_cleanly(tiny_model, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    write_case(src, "a_first", ct_volume((8, 40, 40)))
    # hundreds of tiles at the model's spacing: seconds per case on 2 cores
    for name in ("b_slow", "c_slow"):
        write_case(src, name, ct_volume((48, 128, 128), seed=1), spacing_xyz=(1.6, 1.6, 2.0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "inference", "-i", str(src), "-o", str(out), "-m",
         str(tiny_model), "--device", "cpu"],
        cwd=REPO, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lines = []
    for line in proc.stderr:
        lines.append(line.rstrip("\n"))
        if line.startswith("[1/3] a_first"):  # logged as soon as it is written
            proc.send_signal(signal.SIGTERM)
            break
    lines += proc.stderr.read().splitlines()
    assert proc.wait(timeout=120) == 143, lines
    assert re.fullmatch(
        r"error: interrupted by SIGTERM after [\d.]+ s: 1/3 case\(s\) written to .*; "
        r"not done: b_slow, c_slow",
        lines[-1],
    ), lines
    assert not any("Traceback" in ln for ln in lines), lines
    assert sorted(os.listdir(out)) == ["a_first.nii.gz"]


def test_stop_signal_while_loading_models_is_one_line(run, monkeypatch):
    import inference.model

    def slow_load(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # interrupted by the handler's exception

    monkeypatch.setattr(inference.model, "load_model", slow_load)
    t = time.perf_counter()
    outcome = run()
    assert time.perf_counter() - t < 5
    assert outcome.rc == 143
    assert outcome.lines == ["error: interrupted by SIGTERM; no case was predicted"]
    assert list(outcome.out.iterdir()) == []
