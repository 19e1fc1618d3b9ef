"""The synthetic FLARE-like CT generator: determinism, anatomy, lesions, labels, geometry, files."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from scipy import ndimage

from inference.nifti import read_geometry, read_image
from synthetic import (
    generate_case,
    table4_cases,
    write_case,
    write_flare_folder,
    write_test_folder,
)
from synthetic.__main__ import main as cli_main

TINY = (24, 48, 48)
SMALL = (32, 80, 80)
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def lesion_component(case, lesion) -> np.ndarray:
    """The labeled connected component that contains the lesion's centre voxel."""
    components, _ = ndimage.label(case.label)
    return components == components[tuple(lesion["center_zyx_vox"])]


def test_same_seed_gives_identical_case():
    a = generate_case(7, TINY, kind="partial")
    b = generate_case(7, TINY, kind="partial")
    assert np.array_equal(a.image, b.image)
    assert np.array_equal(a.label, b.label)
    assert np.array_equal(a.shipped_label, b.shipped_label)
    assert a.geometry == b.geometry
    assert a.lesions == b.lesions


def test_different_seeds_give_different_cases():
    a = generate_case(1, TINY)
    b = generate_case(2, TINY)
    assert not np.array_equal(a.image, b.image)


def test_image_and_label_dtypes_and_values():
    case = generate_case(3, TINY, n_lesions=4)
    assert case.image.dtype == np.int16 and case.image.shape == TINY
    assert case.label.dtype == np.uint8 and case.label.shape == TINY
    assert set(np.unique(case.label)) == {0, 1}
    assert case.image.min() >= -1024 and case.image.max() <= 3071
    # Air around the body, soft tissue, fat, lung and bone all present.
    assert np.all(case.image[:, 0, 0] < -900)
    centre = case.image[TINY[0] // 2]
    assert ((centre > -130) & (centre < -70)).mean() > 0.02  # fat
    assert ((centre > 0) & (centre < 150)).mean() > 0.1  # muscle, organs
    assert (case.image > 500).any()  # bone cortex
    upper = case.image[int(TINY[0] * 0.85)]
    assert ((upper > -900) & (upper < -780)).mean() > 0.05  # lungs


def test_lesion_count_and_physical_diameter():
    counts = []
    for seed in range(12):
        case = generate_case(seed, TINY)
        counts.append(len(case.lesions))
        spacing = np.asarray(case.geometry.spacing_zyx_mm)
        for lesion in case.lesions:
            assert 3.0 <= lesion["diameter_mm"] <= 40.0
            component = lesion_component(case, lesion)
            assert case.label[tuple(lesion["center_zyx_vox"])] == 1
            coords = np.argwhere(component)
            extent_mm = (coords.max(0) - coords.min(0)) * spacing
            # Voxel centres of a lesion lie within its bounding sphere.
            assert np.all(extent_mm <= lesion["diameter_mm"] + 1e-3), (seed, lesion)
    assert min(counts) >= 0 and max(counts) <= 6
    assert len(set(counts)) >= 3  # the count varies


def test_requested_lesion_count_and_large_lesions_scale_with_spacing():
    case = generate_case(5, SMALL, spacing_zyx_mm=(1.0, 0.7, 0.7), n_lesions=6)
    assert len(case.lesions) == 6
    _, n_components = ndimage.label(case.label)
    assert n_components >= 5  # separate lesions (one may be cut in two by its organ edge)
    big = max(case.lesions, key=lambda les: les["n_voxels"])
    # A lesion's voxel count matches a body of its physical size, not of its voxel size.
    voxel_mm3 = 1.0 * 0.7 * 0.7
    sphere_mm3 = np.pi / 6 * big["diameter_mm"] ** 3
    assert 0.05 * sphere_mm3 <= big["n_voxels"] * voxel_mm3 <= sphere_mm3


def test_partial_label_is_strict_subset_with_fewer_lesions():
    for seed in range(4):
        case = generate_case(seed, TINY, kind="partial")
        assert case.shipped_label is not None and case.shipped_label.dtype == np.uint8
        assert np.all(case.shipped_label <= case.label)
        assert 0 < case.shipped_label.sum() < case.label.sum()
        labeled = [les["labeled"] for les in case.lesions]
        assert 1 <= sum(labeled) < len(labeled)
        for lesion in case.lesions:
            centre = tuple(lesion["center_zyx_vox"])
            assert case.shipped_label[centre] == int(lesion["labeled"])


def test_full_ships_complete_label_and_unlabeled_ships_none():
    full = generate_case(4, TINY, kind="full", n_lesions=3)
    assert np.array_equal(full.shipped_label, full.label)
    assert all(les["labeled"] for les in full.lesions)
    unlabeled = generate_case(4, TINY, kind="unlabeled", n_lesions=3)
    assert unlabeled.shipped_label is None
    assert unlabeled.label.sum() > 0  # the complete ground truth still exists
    assert not any(les["labeled"] for les in unlabeled.lesions)


def test_invalid_arguments_are_rejected():
    with pytest.raises(ValueError, match="kind"):
        generate_case(0, TINY, kind="complete")
    with pytest.raises(ValueError, match="n_lesions"):
        generate_case(0, TINY, kind="partial", n_lesions=1)
    with pytest.raises(ValueError, match="n_lesions"):
        generate_case(0, TINY, n_lesions=7)


def test_hypo_and_hyper_lesions_in_several_organs():
    densities, organs = set(), set()
    for seed in range(6):
        case = generate_case(seed, SMALL, n_lesions=6)
        for lesion in case.lesions:
            densities.add(lesion["density"])
            organs.add(lesion["organ"])
            assert (lesion["contrast_hu"] < 0) == (lesion["density"] == "hypo")
    assert densities == {"hypo", "hyper"}
    assert len(organs) >= 4
    assert {"liver", "lung_left", "lung_right"} & organs


def test_lesions_differ_from_their_organ_by_the_intended_contrast():
    checked = 0
    for seed in range(3):
        case = generate_case(seed, SMALL, spacing_zyx_mm=(1.5, 0.8, 0.8), n_lesions=6)
        sigma = case.info["noise_sigma_hu"]
        for lesion in case.lesions:
            component = lesion_component(case, lesion)
            if component.sum() < 10:
                continue
            shell = (
                ndimage.binary_dilation(component, iterations=2) & ~component & (case.label == 0)
            )
            organ_median = float(np.median(case.image[shell]))
            lesion_mean = float(case.image[component].mean())
            assert abs(organ_median - lesion["organ_hu"]) < 3 * sigma, lesion
            assert abs(lesion_mean - lesion["organ_hu"] - lesion["contrast_hu"]) < sigma, lesion
            # Visible: the contrast is several noise standard deviations.
            assert abs(lesion["contrast_hu"]) >= 2.5 * sigma
            checked += 1
    assert checked >= 6


def test_spacing_and_origin_are_realistic():
    for seed in range(8):
        g = generate_case(seed, (8, 24, 24), n_lesions=0).geometry
        z, y, x = g.spacing_zyx_mm
        assert 0.6 <= x <= 0.9 and x == y
        assert 0.8 <= z <= 5.0
        assert any(abs(o) > 1.0 for o in g.origin_xyz_mm)
    assert generate_case(0, TINY, spacing_zyx_mm=(2.5, 0.8, 0.8)).geometry.spacing_zyx_mm == (
        2.5,
        0.8,
        0.8,
    )


def test_oblique_cases_have_orthonormal_non_identity_direction():
    orientations = set()
    for seed in range(10):
        case = generate_case(seed, (8, 24, 24), n_lesions=0, oblique=True)
        d = np.asarray(case.geometry.direction).reshape(3, 3)
        assert not np.allclose(d, np.eye(3))
        assert np.allclose(d @ d.T, np.eye(3), atol=1e-9)
        orientations.add(case.info["orientation"].split("(")[0])
        assert generate_case(seed, (8, 24, 24), n_lesions=0, oblique=False).geometry.direction == (
            IDENTITY
        )
    assert len(orientations) >= 3


def test_flipped_axes_keep_the_patient_the_right_way_round():
    """A right-kidney lesion lies at the patient's right (lower LPS x) whatever the storage."""
    seen = set()
    for seed in range(60):
        case = generate_case(seed, SMALL, n_lesions=6, oblique=seed % 2 == 0)
        g = case.geometry
        d = np.asarray(g.direction).reshape(3, 3)
        spacing_xyz = np.asarray(g.spacing_xyz_mm)
        centre = np.asarray(g.origin_xyz_mm) + d @ ((np.asarray(g.size_xyz) - 1) / 2 * spacing_xyz)
        for lesion in case.lesions:
            if lesion["organ"] not in ("kidney_right", "kidney_left"):
                continue
            index_xyz = np.asarray(lesion["center_zyx_vox"][::-1], dtype=float)
            x_mm = (np.asarray(g.origin_xyz_mm) + d @ (index_xyz * spacing_xyz))[0]
            side = -1 if lesion["organ"] == "kidney_right" else 1
            assert side * (x_mm - centre[0]) > 0, (seed, case.info, lesion)
            seen.add((d[0, 0] < 0, lesion["organ"]))
        if {flip for flip, _ in seen} == {False, True}:
            break
    assert {flip for flip, _ in seen} == {False, True}  # checked both storage orders


def test_geometry_and_arrays_round_trip_through_files(tmp_path):
    for seed in range(3):
        case = generate_case(seed, TINY, kind="partial", oblique=True)
        paths = write_case(
            case, f"FLARE24_000{seed}", tmp_path / "img", tmp_path / "lab", tmp_path / "gt"
        )
        assert paths["image"].name == f"FLARE24_000{seed}_0000.nii.gz"
        image, geometry = read_image(paths["image"])
        assert geometry.mismatch(case.geometry) is None
        assert geometry.direction != IDENTITY
        assert image.dtype == np.int16 and np.array_equal(image, case.image)
        shipped, _ = read_image(paths["label"])
        complete, _ = read_image(paths["complete_label"])
        assert shipped.dtype == np.uint8 and np.array_equal(shipped, case.shipped_label)
        assert np.array_equal(complete, case.label)


def test_unlabeled_case_writes_no_shipped_label(tmp_path):
    case = generate_case(0, TINY, kind="unlabeled")
    paths = write_case(case, "FLARE24_0001", tmp_path / "img", tmp_path / "lab", tmp_path / "gt")
    assert set(paths) == {"image", "complete_label"}
    assert not (tmp_path / "lab").exists()


def test_flare_folder_layout_and_manifest(tmp_path):
    manifest = write_flare_folder(tmp_path / "flare", 4, seed=3, shape_zyx=(16, 40, 40))
    root = tmp_path / "flare"
    assert manifest["kinds"] == {"full": 2, "partial": 1, "unlabeled": 1}
    assert json.loads((root / "manifest.json").read_text()) == manifest
    images = sorted(p.name[: -len("_0000.nii.gz")] for p in (root / "imagesTr").iterdir())
    labels = sorted(p.name[: -len(".nii.gz")] for p in (root / "labelsTr").iterdir())
    unlabeled = sorted(p.name[: -len("_0000.nii.gz")] for p in (root / "unlabeledTr").iterdir())
    complete = sorted(p.name[: -len(".nii.gz")] for p in (root / "labelsTr_complete").iterdir())
    assert images == labels and len(images) == 3 and len(unlabeled) == 1
    assert complete == sorted(images + unlabeled) == [f"FLARE24_000{i}" for i in range(1, 5)]
    for record in manifest["cases"]:
        for rel in record["files"].values():
            assert (root / rel).is_file()
        folder = "unlabeledTr" if record["kind"] == "unlabeled" else "imagesTr"
        assert record["files"]["image"] == f"{folder}/{record['name']}_0000.nii.gz"
        if record["kind"] == "partial":
            shipped, _ = read_image(root / record["files"]["label"])
            full, _ = read_image(root / record["files"]["complete_label"])
            assert np.all(shipped <= full) and shipped.sum() < full.sum()
            assert record["n_labeled_lesions"] < record["n_lesions"]
    # The manifest's seed reproduces the case.
    first = manifest["cases"][0]
    again = generate_case(first["seed"], (16, 40, 40), kind=first["kind"])
    image, _ = read_image(root / first["files"]["image"])
    assert np.array_equal(image, again.image)


def test_test_folder_layout(tmp_path):
    manifest = write_test_folder(tmp_path / "test", 2, seed=1, shape_zyx=(16, 40, 40))
    root = tmp_path / "test"
    assert sorted(p.name for p in (root / "images").iterdir()) == [
        "FLARE24_0001_0000.nii.gz",
        "FLARE24_0002_0000.nii.gz",
    ]
    assert sorted(p.name for p in (root / "labels").iterdir()) == [
        "FLARE24_0001.nii.gz",
        "FLARE24_0002.nii.gz",
    ]
    for record in manifest["cases"]:
        label, geometry = read_image(root / record["files"]["label"])
        assert geometry.mismatch(read_geometry(root / record["files"]["image"])) is None
        assert label.sum() == sum(les["n_voxels"] for les in record["lesions"])


def test_table4_cases_follow_flare24_spacings():
    cases = table4_cases()
    slices = {"0001": 55, "0017": 150, "0019": 215, "0029": 554,
              "0048": 499, "0051": 100, "0063": 448, "0099": 334}  # fmt: skip
    assert [name for name, _, _ in cases] == [f"FLARE24_{cid}" for cid in slices]
    for (name, shape, spacing), n in zip(cases, slices.values(), strict=True):
        assert shape == (n, 512, 512), name
        assert spacing[1:] == (0.8, 0.8)
        assert spacing[0] == (5.0 if n <= 100 else 2.5 if n <= 215 else 1.25), name


def test_cli_writes_folders_and_reports_failures(tmp_path, capsys):
    assert (
        cli_main(["test", "-o", str(tmp_path / "t"), "--cases", "1", "--shape", "8", "32", "32"])
        == 0
    )
    assert "wrote 1 cases" in capsys.readouterr().out
    assert (tmp_path / "t" / "images" / "FLARE24_0001_0000.nii.gz").is_file()
    assert (
        cli_main(
            ["table4", "-o", str(tmp_path / "b"), "--only", "0001", "--shape", "8", "32", "32"]
        )
        == 0
    )
    assert (tmp_path / "b" / "labels" / "FLARE24_small.nii.gz").is_file()
    assert read_geometry(tmp_path / "b" / "images" / "FLARE24_0001_0000.nii.gz").size_xyz == (
        512,
        512,
        55,
    )
    assert (
        cli_main(["flare", "-o", str(tmp_path / "f"), "--cases", "2", "--shape", "0", "32", "32"])
        == 1
    )
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("synthetic:")]
    assert len(err) == 1 and "shape" in err[0]
    assert not (tmp_path / "f").exists()  # rejected before anything was written


def test_cli_help_runs_as_module():
    result = subprocess.run(
        [sys.executable, "-m", "synthetic", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0
    for command in ("flare", "test", "table4"):
        assert command in result.stdout
