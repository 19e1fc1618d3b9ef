"""Evaluation (FLARE DSC / NSD) and model selection, on real NIfTI files.

Expected values are computed by hand in the comments, not taken from the code under test.
"""

from __future__ import annotations

import csv
import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import surface_distance

from evaluation.cli import main
from evaluation.metrics import (
    dice,
    flare_scores,
    surface_dice,
    surface_groups,
    union_bounding_box,
)
from inference.nifti import Geometry, write_image

REPO = Path(__file__).resolve().parents[1]

# Spacing of the hand-computed cases: coarse z (3 mm), fine in-plane (1 mm).
SPACING_ZYX_MM = (3.0, 1.0, 1.0)
SHAPE_ZYX = (8, 5, 6)

# Surfel areas of DeepMind's surface_distance for spacing (z, y, x) = (3, 1, 1) mm. The
# package places a marching-cubes patch at every voxel corner whose 2x2x2 neighbourhood is
# mixed, with vertices at the midpoints of the cube edges.
# - Corner patch (1 of the 8 voxels inside): the triangle through the midpoints of the three
#   edges leaving that voxel, at (1.5, 0, 0), (0, 0.5, 0), (0, 0, 0.5) mm. With
#   u = (-1.5, 0.5, 0), v = (-1.5, 0, 0.5): u x v = (0.25, 0.75, 0.75), |u x v|^2 = 19/16,
#   area = |u x v| / 2 = sqrt(19) / 8 ≈ 0.5449 mm².
A_CORNER = math.sqrt(19) / 8
# - Edge patch (2 voxels stacked along z inside): a rectangle through the midpoints of the
#   four in-plane edges, 3 mm long along z and sqrt(0.5² + 0.5²) = 1/sqrt(2) mm wide,
#   area = 3 / sqrt(2) ≈ 2.1213 mm².
A_EDGE = 3 / math.sqrt(2)
# Two one-voxel-wide columns, ground truth at z = 2..3, prediction at z = 3..4 (one slice =
# 3 mm apart along the coarse axis). Surface points lie on the 4 vertical corner lines of
# the column. Per line the ground truth has a corner patch at z = 1.5, an edge patch at
# z = 2.5 and a corner patch at z = 3.5; the prediction has the same at z = 2.5, 3.5, 4.5.
# The ground truth's points at 2.5 and 3.5 coincide with prediction points (distance 0);
# its point at 1.5 is 3 mm from the nearest prediction point (2.5 on the same line), and
# mirror-wise for the prediction's point at 4.5. At a tolerance below 3 mm the matched
# area per line and side is A_EDGE + A_CORNER out of A_EDGE + 2 A_CORNER:
NSD_COLUMNS_BELOW_3MM = (A_EDGE + A_CORNER) / (A_EDGE + 2 * A_CORNER)  # ≈ 0.8303
# DSC: 1 shared voxel (z = 3) of 2 + 2 -> 2 * 1 / 4.
DSC_COLUMNS = 0.5


def geometry_for(
    shape_zyx=SHAPE_ZYX, spacing_zyx_mm=SPACING_ZYX_MM, origin_xyz_mm=(0.0, 0.0, 0.0)
) -> Geometry:
    return Geometry(
        size_xyz=tuple(reversed(shape_zyx)),
        spacing_xyz_mm=tuple(float(s) for s in reversed(spacing_zyx_mm)),
        origin_xyz_mm=tuple(float(o) for o in origin_xyz_mm),
        direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
    )


def column(z0: int, z1: int, shape=SHAPE_ZYX) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[z0:z1, 2, 3] = True
    return mask


def empty(shape=SHAPE_ZYX) -> np.ndarray:
    return np.zeros(shape, bool)


def write_mask(path: Path, mask: np.ndarray, geometry: Geometry | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_image(path, mask.astype(np.uint8), geometry or geometry_for(mask.shape))


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


# --- metrics --------------------------------------------------------------------------


def test_dice_counts_overlap_by_hand():
    gt = np.zeros((3, 3, 3), bool)
    gt[1, 1, :] = True  # 3 voxels
    pred = np.zeros_like(gt)
    pred[1, 1, 2] = pred[1, 2, 2] = True  # 2 voxels, 1 shared -> 2 * 1 / (3 + 2)
    assert dice(gt, pred) == pytest.approx(0.4)


def test_nsd_of_columns_offset_along_coarse_axis_matches_hand_computation():
    gt, pred = column(2, 4), column(3, 5)
    scores = flare_scores(gt, pred, SPACING_ZYX_MM, tolerance_mm=2.0)
    assert scores.dsc == pytest.approx(DSC_COLUMNS)
    assert scores.nsd == pytest.approx(NSD_COLUMNS_BELOW_3MM, abs=1e-9)
    # The offset is 3 mm along z only if the spacing is read in (z, y, x) order; in
    # (x, y, z) order it would be 1 mm and every surfel would match.
    assert surface_dice(gt, pred, (1.0, 1.0, 3.0), 2.0) == pytest.approx(1.0)


def test_tolerance_decides_which_surfels_match():
    gt, pred = column(2, 4), column(3, 5)
    # Distances are 0 or exactly 3 mm: any tolerance below 3 mm gives the same value, and
    # surface_distance counts a distance equal to the tolerance as matched.
    for tolerance_mm in (0.0, 1.0, 2.99):
        assert surface_dice(gt, pred, SPACING_ZYX_MM, tolerance_mm) == pytest.approx(
            NSD_COLUMNS_BELOW_3MM, abs=1e-9
        )
    assert surface_dice(gt, pred, SPACING_ZYX_MM, 3.0) == pytest.approx(1.0)


def test_one_slice_slabs_offset_by_one_slice_match_half_their_surface():
    # Ground truth: slab z = 2, prediction: slab z = 3 (3 mm higher), same in-plane
    # rectangle. The prediction's bottom face is exactly the ground truth's top face
    # (distance 0); the ground truth's bottom face is 3 mm from the prediction's bottom
    # face, and mirror-wise for the prediction's top face. Top and bottom faces are mirror
    # images, so they have equal area: half of each surface matches below 3 mm.
    gt, pred = empty(), empty()
    gt[2, 1:4, 1:5] = True
    pred[3, 1:4, 1:5] = True
    assert surface_dice(gt, pred, SPACING_ZYX_MM, 2.0) == pytest.approx(0.5)
    assert surface_dice(gt, pred, SPACING_ZYX_MM, 3.0) == pytest.approx(1.0)
    # No voxel in common: DSC 0 < 0.2, so FLARE reports NSD 0, not 0.5.
    assert flare_scores(gt, pred, SPACING_ZYX_MM) == (0.0, 0.0)


def test_nsd_is_zero_when_dsc_below_0_2():
    gt = empty()
    gt[2:4, 1:4, 1:4] = True  # 18 voxels
    pred = empty()
    pred[2, 2, 2] = True  # 1 voxel inside: DSC = 2 / 19 ≈ 0.105 < 0.2
    scores = flare_scores(gt, pred, SPACING_ZYX_MM)
    assert scores.dsc == pytest.approx(2 / 19)
    assert surface_dice(gt, pred, SPACING_ZYX_MM, 2.0) > 0  # would be non-zero
    assert scores.nsd == 0.0
    # 4 ground-truth voxels, 1 predicted inside: DSC = 2 / 5 = 0.4, NSD is computed.
    gt4 = empty()
    gt4[2, 1:3, 1:3] = True
    scores4 = flare_scores(gt4, pred, SPACING_ZYX_MM)
    assert scores4.dsc == pytest.approx(0.4)
    assert scores4.nsd == pytest.approx(surface_dice(gt4, pred, SPACING_ZYX_MM, 2.0))
    assert scores4.nsd > 0


def test_empty_mask_conventions():
    lesion = column(2, 4)
    assert flare_scores(empty(), empty(), SPACING_ZYX_MM) == (1.0, 1.0)
    assert flare_scores(empty(), lesion, SPACING_ZYX_MM) == (0.0, 0.0)
    assert flare_scores(lesion, empty(), SPACING_ZYX_MM) == (0.0, 0.0)


def test_cropping_keeps_the_full_volume_nsd():
    # Scattered blobs (lesion plus stray voxels): surface_dice measures far-apart groups in
    # separate crops, some holding only one mask; the package measures the full arrays.
    rng = np.random.default_rng(0)
    shape = (30, 60, 50)
    gt, pred = np.zeros(shape, bool), np.zeros(shape, bool)
    gt[5:12, 10:25, 8:20] = rng.random((7, 15, 12)) > 0.3
    pred[6:13, 12:27, 9:22] = rng.random((7, 15, 13)) > 0.3
    pred[25, 50, 45] = pred[1, 55, 2] = gt[28, 2, 40] = True
    spacing = (2.5, 0.8, 0.7)
    # The lesion pair and the three stray voxels lie far apart: four groups.
    assert len(surface_groups(gt, pred, spacing, 2.0)) == 4
    for tolerance_mm in (0.0, 1.0, 2.0, 5.0):
        with warnings.catch_warnings():  # surface_distance 0.1 uses deprecated SciPy aliases
            warnings.simplefilter("ignore", DeprecationWarning)
            full = surface_distance.compute_surface_dice_at_tolerance(
                surface_distance.compute_surface_distances(gt, pred, spacing), tolerance_mm
            )
        assert surface_dice(gt, pred, spacing, tolerance_mm) == pytest.approx(full, abs=1e-12)
    # Foreground spans z 1..28, y 2..55, x 2..45; grown by 2 and clipped (stop exclusive).
    assert union_bounding_box(gt, pred, margin=2) == (slice(0, 30), slice(0, 58), slice(0, 48))
    assert union_bounding_box(gt[:20], pred[:20], margin=2) == (
        slice(0, 15),
        slice(8, 58),
        slice(0, 24),
    )


def test_nearby_stray_voxels_are_measured_together():
    # Two single voxels 17 voxels apart along x at 0.1 mm: different coarse blocks, but
    # within 2 mm, so they must be measured in one crop. Each voxel has 8 corner surfels of
    # equal area, 4 on each x face. Ground-truth faces at x = -0.5 and 0.5 voxel, prediction
    # faces at 16.5 and 17.5: the near faces are 16 x 0.1 = 1.6 mm apart, the far faces 1.7 mm
    # from the other's near face.
    gt, pred = np.zeros((3, 3, 20), bool), np.zeros((3, 3, 20), bool)
    gt[1, 1, 0] = pred[1, 1, 17] = True
    spacing = (1.0, 1.0, 0.1)
    assert len(surface_groups(gt, pred, spacing, 2.0)) == 1
    assert surface_dice(gt, pred, spacing, 2.0) == pytest.approx(1.0)  # all within 2 mm
    assert surface_dice(gt, pred, spacing, 1.65) == pytest.approx(0.5)  # near faces only
    assert surface_dice(gt, pred, spacing, 1.5) == pytest.approx(0.0)


# --- folder evaluation (CLI) ----------------------------------------------------------


@pytest.fixture
def folders(tmp_path) -> tuple[Path, Path]:
    """Four cases: the hand-computed columns, a correct healthy case, a false positive
    on a healthy case and a missed lesion."""
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    cases = {
        "case_columns": (column(2, 4), column(3, 5)),
        "case_healthy": (empty(), empty()),
        "case_fp": (empty(), column(0, 2)),
        "case_missed": (column(4, 7), empty()),
    }
    for name, (gt, pred) in cases.items():
        write_mask(gt_dir / f"{name}.nii.gz", gt)
        write_mask(pred_dir / f"{name}.nii.gz", pred)
    return pred_dir, gt_dir


def test_evaluate_writes_per_case_scores_and_split_summary(folders, tmp_path, capsys):
    pred_dir, gt_dir = folders
    out = tmp_path / "report"
    assert main(["-p", str(pred_dir), "-g", str(gt_dir), "-o", str(out), "-q"]) == 0

    with (out / "evaluation.csv").open() as f:
        header = f.readline().strip().split(",")
    assert header == [
        "case",
        "dsc",
        "nsd",
        "gt_voxels",
        "pred_voxels",
        "gt_volume_ml",
        "pred_volume_ml",
        "gt_empty",
        "pred_empty",
    ]
    rows = {r["case"]: r for r in read_csv(out / "evaluation.csv")}
    assert sorted(rows) == ["case_columns", "case_fp", "case_healthy", "case_missed"]
    col = rows["case_columns"]
    assert float(col["dsc"]) == pytest.approx(DSC_COLUMNS)
    assert float(col["nsd"]) == pytest.approx(NSD_COLUMNS_BELOW_3MM, abs=1e-6)
    # 2 voxels of 3 x 1 x 1 mm = 6 mm³ = 0.006 ml
    assert int(col["gt_voxels"]) == 2
    assert float(col["gt_volume_ml"]) == pytest.approx(0.006)
    assert (float(rows["case_healthy"]["dsc"]), float(rows["case_healthy"]["nsd"])) == (1, 1)
    assert (float(rows["case_fp"]["dsc"]), float(rows["case_fp"]["nsd"])) == (0, 0)
    assert rows["case_fp"]["gt_empty"] == "True" and rows["case_fp"]["pred_empty"] == "False"
    assert (float(rows["case_missed"]["dsc"]), float(rows["case_missed"]["nsd"])) == (0, 0)

    # all:     DSC 0.5, 1, 0, 0 -> mean 0.375, median 0.25
    # lesion:  DSC 0.5, 0       -> mean 0.25 ± 0.25 (population std), median 0.25
    # healthy: DSC 1, 0         -> mean 0.5 ± 0.5; 1 false positive of 2
    printed = capsys.readouterr().out
    lines = {ln.split()[0]: ln.split() for ln in printed.splitlines() if ln.strip()}
    assert lines["all"][1:5] == ["4", "0.3750", "±", "0.4146"]
    assert lines["all"][5] == "0.2500"
    assert lines["lesion"][1:5] == ["2", "0.2500", "±", "0.2500"]
    assert lines["healthy"][1:5] == ["2", "0.5000", "±", "0.5000"]
    nsd_lesion = (NSD_COLUMNS_BELOW_3MM + 0) / 2
    assert f"{nsd_lesion:.4f}" in lines["lesion"]
    assert "False-positive cases (no lesion in GT, lesion predicted): 1 of 2 (case_fp)" in printed
    assert "Missed cases (lesion in GT, nothing predicted): 1 of 2 (case_missed)" in printed

    md = (out / "evaluation.md").read_text()
    assert "| lesion (lesion in the ground truth) | 2 | 0.2500 ± 0.2500 | 0.2500 |" in md
    assert "| healthy (no lesion in the ground truth) | 2 | 0.5000 ± 0.5000 | 0.5000 |" in md
    assert "| case_fp | 0.0000 | 0.0000 |" in md and "false positive" in md


def test_tolerance_option_changes_nsd(folders, tmp_path):
    pred_dir, gt_dir = folders
    out = tmp_path / "tol3"
    args = ["evaluate", "-p", str(pred_dir), "-g", str(gt_dir), "-o", str(out), "-q"]
    assert main([*args, "--tolerance-mm", "3"]) == 0
    rows = {r["case"]: r for r in read_csv(out / "evaluation.csv")}
    assert float(rows["case_columns"]["nsd"]) == pytest.approx(1.0)  # 3 mm offsets match


def test_missing_prediction_fails_with_case_name(folders, tmp_path):
    pred_dir, gt_dir = folders
    (pred_dir / "case_missed.nii.gz").unlink()
    proc = subprocess.run(
        [sys.executable, "-m", "evaluation", "-p", str(pred_dir), "-g", str(gt_dir), "-q"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    errors = proc.stderr.strip().splitlines()
    assert len(errors) == 1
    assert "case_missed" in errors[0] and "missing" in errors[0]
    assert not (pred_dir / "evaluation" / "evaluation.csv").exists()


def test_allow_missing_scores_missing_prediction_as_empty(folders, tmp_path, capsys):
    pred_dir, gt_dir = folders
    (pred_dir / "case_columns.nii.gz").unlink()
    (pred_dir / "case_healthy.nii.gz").unlink()
    out = tmp_path / "report"
    argv = ["-p", str(pred_dir), "-g", str(gt_dir), "-o", str(out), "-q", "--allow-missing"]
    assert main(argv) == 0
    rows = {r["case"]: r for r in read_csv(out / "evaluation.csv")}
    assert float(rows["case_columns"]["dsc"]) == 0.0  # lesion vs. empty
    assert float(rows["case_healthy"]["dsc"]) == 1.0  # empty vs. empty
    assert rows["case_columns"]["pred_empty"] == "True"
    assert "Missing predictions (scored as empty): 2" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("geometry", "difference"),
    [
        (geometry_for(spacing_zyx_mm=(2.5, 1.0, 1.0)), "spacing"),
        (geometry_for(origin_xyz_mm=(0.0, 0.0, 10.0)), "origin"),
        (geometry_for(shape_zyx=(9, 5, 6)), "size"),
    ],
)
def test_geometry_mismatch_fails_with_case_name(folders, tmp_path, capsys, geometry, difference):
    pred_dir, gt_dir = folders
    write_mask(pred_dir / "case_fp.nii.gz", np.zeros(geometry.shape_zyx, bool), geometry)
    assert main(["-p", str(pred_dir), "-g", str(gt_dir), "-o", str(tmp_path / "r"), "-q"]) != 0
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1
    assert "case_fp" in errors[0] and difference in errors[0]


def test_probability_map_prediction_fails_with_case_name(folders, tmp_path, capsys):
    # A float32 map of 0.01 background and 0.9 lesion is not a label map: scored as > 0 it
    # would make the whole volume lesion (DSC 0.014 in the issue), so the case fails.
    pred_dir, gt_dir = folders
    probabilities = np.where(column(3, 5), 0.9, 0.01).astype(np.float32)
    write_image(pred_dir / "case_columns.nii.gz", probabilities, geometry_for())
    out = tmp_path / "r"
    assert main(["-p", str(pred_dir), "-g", str(gt_dir), "-o", str(out), "-q"]) == 1
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1, errors
    assert "case case_columns" in errors[0] and "not integers" in errors[0]
    assert "0.01" in errors[0]  # the offending value, as stored
    assert not (out / "evaluation.csv").exists()


def test_integer_valued_float_prediction_is_scored(folders, tmp_path):
    # Stored as float, but every value is 0 or 1: still a label map.
    pred_dir, gt_dir = folders
    write_image(pred_dir / "case_columns.nii.gz", column(3, 5).astype(np.float32), geometry_for())
    out = tmp_path / "r"
    assert main(["-p", str(pred_dir), "-g", str(gt_dir), "-o", str(out), "-q"]) == 0
    rows = {r["case"]: r for r in read_csv(out / "evaluation.csv")}
    assert float(rows["case_columns"]["dsc"]) == pytest.approx(DSC_COLUMNS)


def test_out_of_range_note_states_min_and_max(folders, tmp_path, capsys):
    # -1 in the lesion, 0 elsewhere: the note named "max 0" before; it must say -1.
    pred_dir, gt_dir = folders
    labels = np.where(column(3, 5), -1, 0).astype(np.int16)
    write_image(pred_dir / "case_columns.nii.gz", labels, geometry_for())
    out = tmp_path / "r"
    assert main(["-p", str(pred_dir), "-g", str(gt_dir), "-o", str(out), "-q"]) == 0
    warnings_ = [ln for ln in capsys.readouterr().err.splitlines() if "case_columns" in ln]
    assert len(warnings_) == 1, warnings_
    assert "min -1" in warnings_[0] and "max 0" in warnings_[0], warnings_
    assert "other than 0/1" in warnings_[0]


# --- model selection ------------------------------------------------------------------

PROFILE_HEADER = (
    "case,image_size,time_s,max_gpu_mb,total_gpu_mb_s,max_rss_mb,exit_code,output_ok,"
    "over_time,over_memory,error\n"
)


def test_selection_joins_accuracy_and_profiles_with_na_gpu(folders, tmp_path, capsys):
    pred_dir, gt_dir = folders
    eval_a, eval_b = tmp_path / "eval_a", tmp_path / "eval_b"
    assert main(["-p", str(pred_dir), "-g", str(gt_dir), "-o", str(eval_a), "-q"]) == 0
    # Model b: the false positive removed -> DSC 0.5, 1, 1, 0 (mean 0.625)
    write_mask(pred_dir / "case_fp.nii.gz", empty())
    assert main(["-p", str(pred_dir), "-g", str(gt_dir), "-o", str(eval_b), "-q"]) == 0

    prof_gpu, prof_cpu = tmp_path / "prof_gpu", tmp_path / "prof_cpu"
    prof_gpu.mkdir()
    prof_cpu.mkdir()
    # Written the way profiling/report.py writes it: lowercase flags, n/a without a GPU.
    (prof_gpu / "results.csv").write_text(
        PROFILE_HEADER
        + "case_columns,6x5x8,20.0,3000,40000,1500,0,true,false,false,\n"
        + "case_healthy,6x5x8,50.0,5000,90000,1600,0,true,true,true,\n"
        + "case_fp,6x5x8,30.0,3500,50000,1400,0,true,false,false,\n"
        + "case_missed,6x5x8,40.0,3900,60000,1450,1,false,false,false,crashed\n"
    )
    (prof_cpu / "results.csv").write_text(
        PROFILE_HEADER
        + "case_columns_0000.nii.gz,6x5x8,10.0,n/a,n/a,900,0,true,false,n/a,\n"
        + "case_healthy_0000.nii.gz,6x5x8,12.0,n/a,n/a,950,0,true,false,n/a,\n"
        + "case_fp_0000.nii.gz,6x5x8,14.0,n/a,n/a,800,0,true,false,n/a,\n"
        + "case_missed_0000.nii.gz,6x5x8,60.0,n/a,n/a,990,0,true,true,n/a,\n"
    )
    out = tmp_path / "selection"
    argv = ["select", "--eval", f"{eval_a}:bs4", f"{eval_b}/evaluation.csv:bs8"]
    argv += ["--profile", str(prof_gpu), str(prof_cpu / "results.csv"), "-o", str(out)]
    assert main(argv) == 0

    summary = {r["model"]: r for r in read_csv(out / "selection.csv")}
    a, b = summary["bs4"], summary["bs8"]
    assert float(a["dsc_mean"]) == pytest.approx(0.375)
    assert float(b["dsc_mean"]) == pytest.approx(0.625)
    assert (a["false_positive_cases"], b["false_positive_cases"]) == ("1", "0")
    # bs4 times 20, 50, 30, 40 -> mean 35, max 50, one over 45 s; GPU max 5000, one over
    # 4096; areas mean (40000 + 90000 + 50000 + 60000) / 4 = 60000; one failed run.
    assert float(a["time_mean_s"]) == pytest.approx(35.0)
    assert float(a["time_max_s"]) == pytest.approx(50.0)
    assert float(a["max_gpu_mb"]) == pytest.approx(5000)
    assert float(a["mean_total_gpu_mb_s"]) == pytest.approx(60000)
    assert (a["over_time_cases"], a["over_memory_cases"], a["failed_cases"]) == ("1", "1", "1")
    # bs8 without GPU: times 10, 12, 14, 60 -> mean 24; GPU figures unknown, not 0.
    assert float(b["time_mean_s"]) == pytest.approx(24.0)
    assert b["over_time_cases"] == "1"
    assert b["max_gpu_mb"] == b["mean_total_gpu_mb_s"] == b["over_memory_cases"] == "n/a"
    assert b["unmeasured_gpu_cases"] == "4"

    cases = [r for r in read_csv(out / "selection_cases.csv") if r["model"] == "bs8"]
    assert {r["case"] for r in cases} == {"case_columns", "case_healthy", "case_fp", "case_missed"}
    assert all(r["max_gpu_mb"] == "n/a" and r["over_memory"] == "n/a" for r in cases)

    md = (out / "selection.md").read_text()
    row_b = next(ln for ln in md.splitlines() if ln.startswith("| bs8 | 4 |"))
    cells = [c.strip() for c in row_b.strip("|").split("|")]
    assert cells[9] == "n/a" and cells[10] == "n/a" and cells[12] == "n/a"  # GPU columns
    row_a = next(ln for ln in md.splitlines() if ln.startswith("| bs4 | 4 |"))
    cells = [c.strip() for c in row_a.strip("|").split("|")]
    assert cells[7:] == ["35.0 ± 11.2", "50.0", "5000", "60000", "1/4", "1/4", "1"]
    row_case = next(ln for ln in md.splitlines() if ln.startswith("| case_healthy |"))
    cells = [c.strip() for c in row_case.strip("|").split("|")]
    # case | bs4 DSC NSD time GPU flags | bs8 DSC NSD time GPU flags
    assert cells[1:6] == ["1.0000", "1.0000", "50.0", "5000", "T M"]
    assert cells[6:11] == ["1.0000", "1.0000", "12.0", "n/a", ""]
    row_fp = next(ln for ln in md.splitlines() if ln.startswith("| case_fp |"))
    cells = [c.strip() for c in row_fp.strip("|").split("|")]
    assert (cells[5], cells[10]) == ("FP", "")  # bs8 has no false positive
    row_missed = next(ln for ln in md.splitlines() if ln.startswith("| case_missed |"))
    cells = [c.strip() for c in row_missed.strip("|").split("|")]
    assert (cells[5], cells[10]) == ("F", "T")  # bs4 run failed, bs8 over 45 s

    png = (out / "selection.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_selection_needs_one_profile_per_evaluation(folders, tmp_path, capsys):
    pred_dir, gt_dir = folders
    report = tmp_path / "eval"
    assert main(["-p", str(pred_dir), "-g", str(gt_dir), "-o", str(report), "-q"]) == 0
    capsys.readouterr()
    argv = ["select", "--eval", f"{report}:a", f"{report}:b", "--profile", str(report)]
    assert main([*argv, "-o", str(tmp_path / "s")]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "2 --eval" in err and len(err.splitlines()) == 1


def test_training_cli_forwards_evaluate(folders, tmp_path):
    """``python -m training evaluate`` is the same command (the issue's suggested name)."""
    from training.cli import main as training_main

    pred_dir, gt_dir = folders
    out = tmp_path / "via_training"
    args = ["-p", str(pred_dir), "-g", str(gt_dir), "-o", str(out), "-q"]
    assert training_main(["evaluate", *args]) == 0
    rows = {r["case"]: r for r in read_csv(out / "evaluation.csv")}
    assert float(rows["case_columns"]["dsc"]) == pytest.approx(DSC_COLUMNS)
    assert training_main(["evaluate", "-p", str(tmp_path / "nowhere"), "-g", str(gt_dir)]) != 0
