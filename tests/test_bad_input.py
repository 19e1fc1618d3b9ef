"""Bad input and faults: one clear line per problem, the other cases still written, no debris.

Every test builds a real input folder (NIfTI files written with SimpleITK or nibabel, some
with patched header bytes) next to a good case, runs the real CLI on the tiny random
model, and checks (via ``Outcome.check``):

* the exit status (0 all written, 1 some case failed, 2 the run could not start);
* one line ``ERROR <case>: <reason>`` per refused case, ``WARNING <case>: <note>`` for
  a case predicted despite an oddity, ``error: <reason>`` for a run that cannot start,
  and no multi-line output (tracebacks, ITK warning blocks) on stderr at all;
* the good case (and every predicted bad one) is written with its input's geometry, and
  the output folder holds exactly the expected files: nothing for refused cases, no
  temporary file.

The CLI runs in-process (``inference.cli.main``) so that torch is imported once for the
file; stderr is captured at the file-descriptor level, so that what ITK's C++ code prints
is seen too. ``test_predictor.py`` and ``test_container.py`` run the CLI as a subprocess.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

import inference.pipeline as pipeline
from inference.atomic import temporary_name
from inference.cli import main
from inference.model import load_model
from inference.nifti import Geometry, read_image, write_image
from inference.predictor import Predictor
from inference.validate import InputError, check_image
from tests.conftest import REPO

CPU = torch.device("cpu")
GOOD = "good"
# At (0.8, 0.8, 2.5) mm this is larger than the tiny model's patch (16, 32, 32) at
# (2.0, 1.6, 1.6) mm, so the good case itself draws no warning.
GOOD_SHAPE_ZYX = (13, 64, 64)
SPACING_XYZ = (0.8, 0.8, 2.5)
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def ct_volume(shape_zyx, seed: int = 0, dtype=np.int16) -> np.ndarray:
    """A CT-like volume: air around an elliptic body of soft tissue with a few bright spots."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape_zyx), indexing="ij")
    body = (y / 0.8) ** 2 + (x / 0.9) ** 2 < 1
    vol = np.where(body, 40.0, -1000.0) + rng.normal(0, 20, shape_zyx)
    for _ in range(3):
        c = rng.uniform(-0.5, 0.5, 3)
        vol[(z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 < 0.05] = 300.0
    return vol.astype(dtype)


def geometry(shape_zyx, spacing_xyz=SPACING_XYZ) -> Geometry:
    return Geometry(tuple(reversed(shape_zyx)), spacing_xyz, (-20.0, 15.0, 7.5), IDENTITY)


def write_case(folder: Path, name: str, array=None, spacing_xyz=SPACING_XYZ) -> Path:
    array = ct_volume(GOOD_SHAPE_ZYX) if array is None else array
    path = folder / f"{name}_0000.nii.gz"
    write_image(path, array, geometry(array.shape, spacing_xyz))
    return path


def write_nibabel(path: Path, array_xyz: np.ndarray, spacing_xyz=SPACING_XYZ) -> Path:
    """Write with nibabel: for headers SimpleITK would not write (4-D)."""
    nib.save(nib.Nifti1Image(array_xyz, np.diag([*spacing_xyz, 1.0])), path)
    return path


def patch_pixdim(path: Path, pixdim_xyz) -> None:
    """Overwrite pixdim[1..3] in the header bytes of a .nii.gz (what a broken writer leaves)."""
    raw = bytearray(gzip.decompress(path.read_bytes()))
    for i, value in enumerate(pixdim_xyz):
        struct.pack_into("<f", raw, 76 + 4 * (i + 1), value)
    path.write_bytes(gzip.compress(bytes(raw)))


#: Every line the CLI writes to stderr: start-up, per-case summary, notes, errors, end.
LINE_FORMATS = re.compile(
    r"^(\d+ case\(s\); .*|\[\d+/\d+\] \S+ \d+x\d+x\d+: .*|(ERROR|WARNING) [^\s:]+: \S.*"
    r"|error: \S.*|removed \S+: .*|done: \d+/\d+ case\(s\) written .*)$"
)


@dataclass
class Outcome:
    """A finished CLI run: exit status, stderr lines, the output folder."""

    rc: int
    lines: list[str]
    out: Path
    src: Path

    def lines_for(self, level: str, name: str) -> list[str]:
        return [ln for ln in self.lines if ln.startswith(f"{level} {name}: ")]

    def check(
        self,
        rc: int,
        written: set[str] = frozenset({GOOD}),
        errors: dict[str, str] | None = None,
        warnings: dict[str, str] | None = None,
    ) -> None:
        """Exit status, one ERROR line per refused case, notes, exact output folder content."""
        text = "\n".join(self.lines)
        assert self.rc == rc, text
        # Only the CLI's own one-line messages: no traceback, no ITK warning block.
        for line in self.lines:
            assert LINE_FORMATS.match(line), f"not one of the CLI's lines: {line!r}\n{text}"
        for name, reason in (errors or {}).items():
            found = self.lines_for("ERROR", name)
            assert len(found) == 1, f"expected one ERROR line for {name}:\n{text}"
            assert re.search(reason, found[0], re.IGNORECASE), found[0]
        for name, note in (warnings or {}).items():
            found = [ln for ln in self.lines_for("WARNING", name) if re.search(note, ln, re.I)]
            assert found, f"expected a WARNING for {name} matching {note!r}:\n{text}"
        failed = {m.group(1) for ln in self.lines if (m := re.match(r"ERROR (\S+): ", ln))}
        assert failed == set(errors or {}), text
        # Exactly the expected outputs: nothing partial, nothing for refused cases.
        present = sorted(p.name for p in self.out.iterdir()) if self.out.is_dir() else []
        assert present == sorted(f"{n}.nii.gz" for n in written), text
        for name in written:
            labels, geo = read_image(self.out / f"{name}.nii.gz")
            assert labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1}
            source = self.src / f"{name}_0000.nii.gz"
            if source.exists():
                _, geo_in = read_image(source)
                assert geo.mismatch(geo_in) is None, name


@pytest.fixture
def run(tiny_model, tmp_path, capfd):
    """Run the CLI in-process on ``tmp_path/in`` (with a good case) into ``tmp_path/out``."""
    return make_runner(tiny_model, tmp_path, capfd)


def make_runner(tiny_model, tmp_path, capfd):
    """The ``run`` fixture's function (shared with test_faults.py)."""
    src = tmp_path / "in"
    src.mkdir()
    write_case(src, GOOD)

    def _run(*extra, src=src, out=tmp_path / "out", model=tiny_model) -> Outcome:
        capfd.readouterr()
        rc = main(["-i", str(src), "-o", str(out), "-m", str(model), "--device", "cpu", *extra])
        err = capfd.readouterr().err
        return Outcome(rc, [ln for ln in err.splitlines() if ln], out, src)

    _run.src = src
    return _run


# -- files that cannot be read ----------------------------------------------------------


def test_file_that_is_not_nifti_is_refused(run):
    (run.src / "text_0000.nii.gz").write_text("patient list\n")
    (run.src / "gzipped_text_0000.nii.gz").write_bytes(gzip.compress(b"not an image" * 100))
    (run.src / "png_0000.nii.gz").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    run().check(
        1,
        errors={
            "text": "not a NIfTI file",
            "gzipped_text": "not a NIfTI file",
            "png": "not a NIfTI file",
        },
    )


def test_truncated_nii_gz_is_refused_although_simpleitk_reads_it(run):
    full = write_case(run.src, "full", ct_volume((30, 72, 72), seed=3))
    raw = full.read_bytes()
    # SimpleITK reads a cut-off .nii.gz without complaint and fills the rest with zeros:
    cut = run.src / "cut_0000.nii.gz"
    cut.write_bytes(raw[: len(raw) * 2 // 3])
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(cut)))[-1].max() == 0
    # a complete gzip stream whose NIfTI data is short, and a header cut in the middle
    short = run.src / "short_0000.nii.gz"
    short.write_bytes(gzip.compress(gzip.decompress(raw)[:-1000]))
    (run.src / "header_0000.nii.gz").write_bytes(gzip.compress(gzip.decompress(raw)[:200]))
    full.unlink()
    run().check(
        1,
        errors={
            "cut": r"truncated file: \d+ of 311040 bytes of voxel data",
            "short": r"truncated file: 310040 of 311040 bytes",
            "header": "truncated file: it ends inside the NIfTI header",
        },
    )


def test_empty_file_is_refused(run):
    (run.src / "empty_0000.nii.gz").write_bytes(b"")
    run().check(1, errors={"empty": "empty file"})


# -- images without a meaningful 3-D geometry -------------------------------------------


def test_2d_image_is_refused(run):
    sitk.WriteImage(
        sitk.GetImageFromArray(ct_volume((1, 72, 72))[0]), str(run.src / "flat_0000.nii.gz")
    )
    run().check(1, errors={"flat": r"2-D image \(size 72x72\); a 3-D CT volume is expected"})


def test_4d_image_is_refused_unless_it_holds_one_volume(run):
    vol_xyz = ct_volume(GOOD_SHAPE_ZYX).T
    write_nibabel(run.src / "series_0000.nii.gz", np.stack([vol_xyz] * 3, axis=-1))
    # a 4-D header with a single volume is read as 3-D by SimpleITK and predicted
    write_nibabel(run.src / "single_0000.nii.gz", vol_xyz[..., None])
    run().check(
        1,
        written={GOOD, "single"},
        errors={"series": r"4-D image \(size 64x64x13x3\)"},
    )


# -- odd but predictable images -----------------------------------------------------------


def test_image_with_one_slice_is_predicted_with_a_warning(run):
    write_case(run.src, "slice", ct_volume((1, 72, 72)))
    # one slice thinner than half a voxel of the model (2 mm): resampled to one voxel
    write_case(run.src, "thin", ct_volume((1, 72, 72)), spacing_xyz=(0.8, 0.8, 0.5))
    run().check(
        0,
        written={GOOD, "slice", "thin"},
        warnings={
            "slice": "a single slice along one axis",
            "thin": r"along z the image spans 0.5 mm, less than half a voxel",
        },
    )


def test_image_smaller_than_the_patch_is_predicted_with_a_warning(run):
    write_case(run.src, "tiny", ct_volume((3, 5, 6)))
    outcome = run()
    outcome.check(
        0,
        written={GOOD, "tiny"},
        warnings={"tiny": r"smaller than the network's patch .*z 4 < 16, y 3 < 32, x 3 < 32"},
    )
    assert not outcome.lines_for("WARNING", GOOD)


def test_nan_and_inf_voxels_are_replaced_with_a_warning(run):
    vol = ct_volume(GOOD_SHAPE_ZYX, dtype=np.float32)
    vol[0, :3, :4] = np.nan
    vol[5, 10, 10:12] = np.inf
    vol[6, 10, 10] = -np.inf
    write_case(run.src, "nan", vol)
    write_case(run.src, "allnan", np.full(GOOD_SHAPE_ZYX, np.nan, np.float32))
    # SimpleITK alone would hand back zeros in their place; read_image restores them
    assert np.count_nonzero(~np.isfinite(read_image(run.src / "nan_0000.nii.gz")[0])) == 15
    assert (
        np.count_nonzero(
            sitk.GetArrayFromImage(sitk.ReadImage(str(run.src / "nan_0000.nii.gz"))) == 0
        )
        >= 15
    )
    run().check(
        0,
        written={GOOD, "nan", "allnan"},
        warnings={
            "nan": "15 NaN/Inf voxels replaced",
            "allnan": r"no finite voxel value .*predicted as air",
        },
    )


def test_float64_and_uint8_storage_are_predicted_with_a_warning(run):
    write_case(run.src, "f64", ct_volume(GOOD_SHAPE_ZYX, dtype=np.float64))
    write_case(run.src, "u8", np.clip(ct_volume(GOOD_SHAPE_ZYX) + 1000, 0, 255).astype(np.uint8))
    run().check(
        0,
        written={GOOD, "f64", "u8"},
        warnings={"f64": "float64 voxels converted to float32", "u8": "not Hounsfield units"},
    )


def test_very_large_or_negative_hu_is_predicted_with_a_warning(run):
    write_case(run.src, "huge", ct_volume(GOOD_SHAPE_ZYX, dtype=np.float32) * 1e30)
    low = ct_volume(GOOD_SHAPE_ZYX, dtype=np.int32)
    low[:, :10] = -2_000_000_000
    write_case(run.src, "low", low)
    run().check(
        0,
        written={GOOD, "huge", "low"},
        warnings={
            "huge": r"intensities -1\.\d+e\+33\.\.3e\+32 outside the plausible HU range",
            "low": r"intensities -2e\+09\.\.300 outside",
        },
    )


def test_intensities_that_are_not_plausible_ct_are_predicted_with_a_warning(run):
    # An ignored rescale intercept: the same CT shifted by -1024 (every tile looks like air,
    # the mask is empty) or by +1024 (the whole body above the model's foreground range).
    write_case(run.src, "down", ct_volume(GOOD_SHAPE_ZYX) - 1024)
    write_case(run.src, "up", ct_volume(GOOD_SHAPE_ZYX) + 1024)
    outcome = run()
    outcome.check(
        0,
        written={GOOD, "down", "up"},
        warnings={
            "down": r"no voxel above the body threshold -500 HU \(the image's maximum is "
            r"-724\): every tile looks like air and the mask will be empty",
            "up": r"intensities far from the model's foreground range -900\.\.619 HU "
            r"\(4\d\.\d% of the voxels inside it, 0\.0% below",
        },
    )
    assert not outcome.lines_for("WARNING", GOOD), outcome.lines
    assert len(outcome.lines_for("WARNING", "down")) == 1, outcome.lines


def test_shifted_ct_with_bone_above_the_threshold_is_still_noted():
    # Dense bone shifted by -1024 stays above a body threshold of -49 HU (the demo model's
    # foreground 0.5th percentile), so the body is found; its soft tissue is not in range.
    from inference.validate import check_intensity_for_model

    shifted = ct_volume(GOOD_SHAPE_ZYX) - 1024
    shifted[:, 30:34, 30:34] = 1300 - 1024
    window = (-49.0, 254.0)
    notes = check_intensity_for_model(shifted, -49.0, window)
    assert len(notes) == 1 and re.match(
        r"intensities far from the model's foreground range -49\.\.254 HU \(0\.0% of the "
        r"voxels inside it",
        notes[0],
    ), notes
    assert check_intensity_for_model(ct_volume(GOOD_SHAPE_ZYX), -49.0, window) == []
    # With FLARE's wide range the bone is inside it; the median, darker than air, tells.
    wide = np.full((13, 160, 160), -1000 - 1024, np.int16)  # a wider field of view
    wide[:, 48:112, 48:112] = ct_volume((13, 64, 64)) - 1024
    wide[:, 60:80, 60:80] = 1300 - 1024  # 1.6% of the voxels: inside the range
    notes = check_intensity_for_model(wide, -500.0, (-900.0, 619.0))
    assert len(notes) == 1 and re.search(r"\d% below; median -20\d\d\)", notes[0]), notes


def test_zero_or_negative_spacing_in_the_header(run, capfd):
    # SimpleITK never returns a spacing <= 0 from a NIfTI file: pixdim 0 (or NaN) is read
    # as 1 mm and a negative pixdim as its absolute value with the axis flipped. Both
    # keep a usable 3-D geometry, so the case is predicted and the header is reported.
    zero = write_case(run.src, "zero")
    patch_pixdim(zero, (0.8, 0.0, 2.5))
    negative = write_case(run.src, "negative")
    patch_pixdim(negative, (0.8, 0.8, -2.5))
    sitk.ProcessObject.SetGlobalWarningDisplay(True)  # ITK's default
    capfd.readouterr()
    assert read_image(zero)[1].spacing_xyz_mm == pytest.approx((0.8, 1.0, 2.5))
    # ITK also prints a multi-line warning block, which the CLI must switch off
    assert "unexpected scales in sform" in capfd.readouterr().err
    neg_geo = read_image(negative)[1]
    assert neg_geo.spacing_xyz_mm == pytest.approx((0.8, 0.8, 2.5))
    assert neg_geo.direction[8] == -1.0
    run().check(
        0,
        written={GOOD, "zero", "negative"},
        warnings={
            "zero": "header voxel spacing along y is 0; SimpleITK reads it as 1 mm",
            "negative": r"negative header voxel spacing along z \(-2.5 mm\)",
        },
    )
    # A geometry with such spacing (from another reader) is refused, not guessed.
    with pytest.raises(InputError, match="invalid voxel spacing"):
        check_image(ct_volume((4, 8, 8)), geometry((4, 8, 8), (0.8, 0.0, 2.5)))
    with pytest.raises(InputError, match="invalid voxel spacing"):
        check_image(ct_volume((4, 8, 8)), geometry((4, 8, 8), (0.8, -0.8, 2.5)))


def test_extremely_anisotropic_spacing(run):
    write_case(run.src, "thick", ct_volume((4, 72, 72)), spacing_xyz=(0.5, 0.5, 60.0))
    # 10 m voxels in-plane: the resampled image would need tens of billions of voxels
    write_case(run.src, "absurd", ct_volume((4, 40, 40)), spacing_xyz=(1e4, 1e4, 2.0))
    run().check(
        1,
        written={GOOD, "thick"},
        errors={"absurd": r"would have \d+ M voxels .*check the voxel spacing"},
        warnings={"thick": r"strongly anisotropic spacing \(0.5, 0.5, 60\) mm"},
    )


# -- folders ------------------------------------------------------------------------------


def test_files_not_named_case_0000_are_skipped_with_a_warning(run):
    write_case(run.src, "other_channel").rename(run.src / "other_0001.nii.gz")
    write_case(run.src, "plain").rename(run.src / "plain_0000.nii")
    (run.src / "notes.txt").write_text("x")
    (run.src / "sub").mkdir()
    (run.src / ".hidden_0000.nii.gz").write_bytes(b"")
    outcome = run()
    outcome.check(0, written={GOOD})
    for name in ("other_0001.nii.gz", "plain_0000.nii", "notes.txt", "sub"):
        assert outcome.lines_for("WARNING", name) == [
            f"WARNING {name}: not named <case>_0000.nii.gz; skipped"
        ]


def test_empty_input_folder_is_a_usage_error(run, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    outcome = run(src=empty)
    assert outcome.rc == 2
    assert outcome.lines == [f"error: no <case>_0000.nii.gz files in {empty}"]
    assert not outcome.out.exists()


def test_missing_input_folder_is_a_usage_error(run, tmp_path):
    outcome = run(src=tmp_path / "nope")
    assert outcome.rc == 2
    assert outcome.lines == [f"error: input folder {tmp_path / 'nope'} does not exist"]


def test_output_folder_that_cannot_be_written(run, tmp_path):
    # Tests run as root, which chmod does not stop: a folder below a regular file cannot
    # be created by anyone.
    blocker = tmp_path / "file"
    blocker.write_text("x")
    outcome = run(out=blocker / "out")
    assert outcome.rc == 2
    assert outcome.lines == [
        f"error: output folder {blocker / 'out'} is not writable (Not a directory)"
    ]
    # One output path taken by a folder: that case fails at the rename, the rest is written.
    write_case(run.src, "second")
    out = tmp_path / "out"
    (out / "good.nii.gz").mkdir(parents=True)
    outcome = run(out=out)
    assert outcome.rc == 1
    found = outcome.lines_for("ERROR", GOOD)
    assert len(found) == 1 and "cannot write output" in found[0], outcome.lines
    assert sorted(p.name for p in out.iterdir()) == ["good.nii.gz", "second.nii.gz"]
    assert (out / "good.nii.gz").is_dir() and (out / "second.nii.gz").is_file()


# -- models -------------------------------------------------------------------------------


def _damage(model: Path, how: str) -> Path:
    if how == "missing folder":
        shutil.rmtree(model)
    elif how == "no plans.json":
        (model / "plans.json").unlink()
    elif how == "plans.json not JSON":
        (model / "plans.json").write_text('{"configurations": ')
    elif how == "no checkpoint":
        (model / "fold_all" / "checkpoint_final.pth").unlink()
    elif how == "truncated checkpoint":
        ckpt = model / "fold_all" / "checkpoint_final.pth"
        ckpt.write_bytes(ckpt.read_bytes()[:5000])
    elif how == "not a checkpoint":
        torch.save({"weights": torch.ones(3)}, model / "fold_all" / "checkpoint_final.pth")
    return model


@pytest.mark.parametrize(
    ("how", "reason"),
    [
        ("missing folder", r"model folder .* does not exist"),
        ("no plans.json", r"model folder .* has no plans.json"),
        ("plans.json not JSON", r"plans.json is not valid JSON"),
        ("no checkpoint", r"no fold_\*/checkpoint_final.pth in"),
        ("truncated checkpoint", r"checkpoint .*checkpoint_final.pth cannot be read"),
        ("not a checkpoint", r"is not an nnU-Net checkpoint"),
    ],
)
def test_missing_or_damaged_model_folder(run, tiny_model, tmp_path, how, reason):
    model = _damage(Path(shutil.copytree(tiny_model, tmp_path / "model")), how)
    outcome = run(model=model)
    assert outcome.rc == 2
    assert len(outcome.lines) == 1 and outcome.lines[0].startswith("error: "), outcome.lines
    assert re.search(reason, outcome.lines[0]), outcome.lines[0]
    assert list(outcome.out.iterdir()) == []


def test_plans_that_do_not_match_the_checkpoint(run, tiny_model, tmp_path):
    model = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    plans = json.loads((model / "plans.json").read_text())
    arch = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    arch["features_per_stage"] = [8, 16, 32]
    (model / "plans.json").write_text(json.dumps(plans))
    outcome = run(model=model)
    assert outcome.rc == 2
    assert len(outcome.lines) == 1, outcome.lines
    assert re.match(
        r"error: .*checkpoint_final.pth does not match plans.json: size mismatch for ",
        outcome.lines[0],
    )
    assert list(outcome.out.iterdir()) == []


def test_checkpoint_saved_on_a_gpu_loads_on_the_cpu(run, tiny_model, tmp_path, monkeypatch):
    # Simulated: no CUDA tensor can be made here. torch.save records each storage's device
    # as a location string ("cpu", "cuda:0") via torch.serialization.location_tag; saving
    # with that function returning "cuda:0" writes exactly what a GPU-trained nnU-Net
    # checkpoint holds. Loading it needs map_location, or torch tries to restore the
    # tensors onto a CUDA device.
    model = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    ckpt_path = model / "fold_all" / "checkpoint_final.pth"
    checkpoint = torch.load(ckpt_path, weights_only=False)
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(checkpoint, ckpt_path)
    import zipfile

    with zipfile.ZipFile(ckpt_path) as z:
        pickle = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    assert b"cuda:0" in pickle
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(ckpt_path, weights_only=True)  # what happens without map_location
    loaded = load_model(model)
    assert all(p.device.type == "cpu" for p in loaded.networks[0].parameters())
    outcome = run(model=model)
    outcome.check(0)
    original = run(model=tiny_model, out=tmp_path / "out_original")
    original.check(0)
    assert (outcome.out / "good.nii.gz").read_bytes() == (original.out / "good.nii.gz").read_bytes()


# -- device memory --------------------------------------------------------------------------


class OutOfMemoryFirst(torch.nn.Module):
    """A network that raises CUDA's out-of-memory error on its first ``failures`` calls."""

    def __init__(self, net: torch.nn.Module, failures: int) -> None:
        super().__init__()
        self.net, self.failures, self.calls = net, failures, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls <= self.failures:
            raise torch.cuda.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 2.00 GiB (simulated)\nsecond line"
            )
        return self.net(x)


def _inject_oom(model, failures: int):
    model.networks = [OutOfMemoryFirst(n, failures) for n in model.networks]
    return model


def test_out_of_memory_retries_with_a_smaller_footprint(tiny_model, tmp_path, monkeypatch, run):
    # No GPU here: the predictor runs on the CPU, where it starts from the all-on-device
    # plan, and the injected error exercises the same retry path as a real CUDA OOM.
    image = ct_volume(GOOD_SHAPE_ZYX)
    spacing = tuple(reversed(SPACING_XYZ))
    reference = Predictor([load_model(tiny_model)], CPU).predict(image, spacing)
    assert reference.notes == []

    # The ladder: float16 accumulator on the device before anything moves to the host.
    model = _inject_oom(load_model(tiny_model), failures=3)
    result = Predictor([model], CPU).predict(image, spacing)
    retries = [n for n in result.notes if n.startswith("out of GPU memory with ")]
    assert len(retries) == 3 and all(n.endswith("retrying with less") for n in retries)
    assert "image fp32 on device, logits fp32 on device" in retries[0]
    assert "image fp16 on device, logits fp16 on device" in retries[1]
    assert "image fp16 on device, logits fp32 on host" in retries[2]
    assert (result.plan.image_on_device, result.plan.acc_on_device) == (False, False)
    np.testing.assert_array_equal(result.labels, reference.labels)

    # All four plans fail: the case is predicted on the CPU as a last resort.
    model = _inject_oom(load_model(tiny_model), failures=4)
    result = Predictor([model], CPU).predict(image, spacing)
    assert len(result.notes) == 5
    assert result.notes[-1] == "out of GPU memory with every plan; predicting this case on the CPU"
    assert result.device == "cpu"
    np.testing.assert_array_equal(result.labels, reference.labels)

    # Nothing helps: the error reaches the caller (the CLI reports the case and goes on).
    model = _inject_oom(load_model(tiny_model), failures=10**6)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        Predictor([model], CPU).predict(image, spacing)

    # Through the CLI: the retries are logged, a case that cannot be saved fails alone.
    import inference.model

    real_load = inference.model.load_model
    write_case(run.src, "second")
    monkeypatch.setattr(
        inference.model, "load_model", lambda *a, **k: _inject_oom(real_load(*a, **k), 2)
    )
    outcome = run()
    outcome.check(
        0, written={GOOD, "second"}, warnings={GOOD: r"out of GPU memory with .*retrying"}
    )
    assert not outcome.lines_for("WARNING", "second")
    monkeypatch.setattr(
        inference.model, "load_model", lambda *a, **k: _inject_oom(real_load(*a, **k), 10**6)
    )
    outcome = run(out=tmp_path / "out_failing")
    outcome.check(
        1,
        written=set(),
        errors={
            GOOD: r"^ERROR good: OutOfMemoryError: CUDA out of memory\. .*\(simulated\)$",
            "second": "OutOfMemoryError",
        },
    )


# -- outputs --------------------------------------------------------------------------------


def test_output_never_overwrites_an_input(run):
    # Case "x_0000" (file x_0000_0000.nii.gz) would write x_0000.nii.gz: the input of
    # case "x" when the outputs go to the input folder.
    write_case(run.src, "x")
    write_case(run.src, "x_0000", ct_volume(GOOD_SHAPE_ZYX, seed=5))
    before = {p.name: p.read_bytes() for p in run.src.iterdir()}
    outcome = run(out=run.src)
    assert outcome.rc == 1
    assert outcome.lines_for("ERROR", "x_0000") == [
        "ERROR x_0000: its output x_0000.nii.gz would overwrite the input of case x; "
        "skipped (write the outputs to another folder)"
    ]
    after = {p.name: p.read_bytes() for p in run.src.iterdir()}
    assert {k: after[k] for k in before} == before  # every input unchanged
    assert sorted(set(after) - set(before)) == ["good.nii.gz", "x.nii.gz"]


def test_rerun_gives_the_same_files_and_clears_partial_ones(run):
    write_case(run.src, "second", ct_volume(GOOD_SHAPE_ZYX, seed=7))
    (run.src / "broken_0000.nii.gz").write_text("x")
    first = run()
    first.check(1, written={GOOD, "second"}, errors={"broken": "not a NIfTI file"})
    files = {p.name: p.read_bytes() for p in first.out.iterdir()}
    # a temporary file left by a killed run (nobody holds its lock)
    stale = temporary_name(first.out / "second.nii.gz")
    stale.write_bytes(b"partial")
    second = run()
    second.check(1, written={GOOD, "second"}, errors={"broken": "not a NIfTI file"})
    assert {p.name: p.read_bytes() for p in second.out.iterdir()} == files
    assert [ln for ln in second.lines if ln.startswith("ERROR")] == [
        ln for ln in first.lines if ln.startswith("ERROR")
    ]
    assert any(ln.startswith(f"removed {stale.name}: ") for ln in second.lines)


@pytest.mark.slow
def test_memory_does_not_grow_from_case_to_case(tiny_model, tmp_path):
    # 30 identical cases in one process; the CLI logs its resident memory after each
    # write. The first cases raise it to a plateau (torch and numpy warm their caches;
    # the glibc settings of inference.runtime keep freed memory for reuse within a case,
    # and the pipeline hands the heap's free pages back between cases: without that, on
    # a loaded machine, stranded free space grows by tens of MB over the run). A leak
    # grows steadily: keeping one input volume per case (2.4 MB as int16, the smallest
    # buffer of a case) puts the median of cases 21-30 about 24 MB above that of cases
    # 11-20 (about 22 MB). Allowed: 8 MB, for the occasional step of a few MB that the
    # heap and the threads' malloc arenas take (up to about 10 MB, at most once per run,
    # which the medians absorb). The image is large in voxels but small at the
    # model's spacing, so the network runs only two tiles a case.
    src = tmp_path / "in"
    src.mkdir()
    volume = ct_volume((48, 160, 160), seed=11)
    for i in range(30):
        write_case(src, f"case{i:02d}", volume, spacing_xyz=(0.3, 0.3, 0.8))
    args = ["-i", src, "-o", tmp_path / "out", "-m", tiny_model, "--device", "cpu"]
    result = subprocess.run(
        [sys.executable, "-m", "inference", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "2"},
    )
    assert result.returncode == 0, result.stderr
    rss_mb = [float(m) for m in re.findall(r"\| rss (\d+) MB", result.stderr)]
    assert len(rss_mb) == 30, result.stderr
    assert np.median(rss_mb[20:]) - np.median(rss_mb[10:20]) <= 8.0, rss_mb
    assert len(list((tmp_path / "out").iterdir())) == 30


def test_free_heap_memory_is_given_back_between_cases():
    # The allocator settings keep freed blocks in the heap (fast forward passes) and a
    # loaded machine strands free space between live blocks from case to case (resident
    # memory tens of MB higher over ten cases). Between cases the pipeline hands
    # the free pages back. Here: 200 blocks of 1 MB from the heap, freed, with a small
    # live block above them so that the heap's top cannot shrink on its own.
    script = """
import numpy as np
from inference.pipeline import rss_mb
from inference.runtime import release_free_memory, tune_allocator
assert tune_allocator()
blocks = [np.ones(2**20, np.uint8) for _ in range(200)]
pin = np.ones(1024, np.uint8)
del blocks
before = rss_mb()
assert release_free_memory()
print(before, rss_mb())
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stderr
    before, after = map(float, out.stdout.split())
    assert before - after >= 150, (before, after)


def test_masks_waiting_for_a_slow_writer_are_bounded(run, monkeypatch):
    # A writer slower than the predictor (a slow disk; here 0.4 s per mask against about
    # 0.1 s per prediction) must not let masks pile up in its queue: the next mask waits
    # for a free slot. Counted with weak references to every label map the predictor
    # returns: alive are the one being written and the one just predicted (a third for a
    # moment, while the writer's thread drops the one it has finished). Without the
    # bound all eight are alive by the end of the predictions.
    for i in range(7):
        write_case(run.src, f"more{i}")
    alive: list[weakref.ref] = []
    most_alive = [0]
    real_predict, real_write = Predictor.predict, pipeline.write_case

    def predict(self, *args, **kwargs):
        result = real_predict(self, *args, **kwargs)
        alive.append(weakref.ref(result.labels))
        most_alive[0] = max(most_alive[0], sum(r() is not None for r in alive))
        return result

    def slow_write(*args, **kwargs):
        time.sleep(0.4)
        return real_write(*args, **kwargs)

    trims = []
    monkeypatch.setattr(Predictor, "predict", predict)
    monkeypatch.setattr(pipeline, "write_case", slow_write)
    monkeypatch.setattr(pipeline, "release_free_memory", lambda: trims.append(1))
    outcome = run()
    outcome.check(0, written={GOOD, *(f"more{i}" for i in range(7))})
    assert len(alive) == 8
    assert len(trims) == 7  # the heap's free pages handed back between cases
    assert most_alive[0] <= 3, most_alive
