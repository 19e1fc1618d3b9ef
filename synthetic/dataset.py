"""Writing synthetic cases to disk: single cases, FLARE24-style training and test folders.

Layouts:

- training (``write_flare_folder``)::

      OUT/imagesTr/<case>_0000.nii.gz        labeled cases (full and partial)
      OUT/labelsTr/<case>.nii.gz             labels as shipped (partial ones miss lesions)
      OUT/unlabeledTr/<case>_0000.nii.gz     unlabeled cases
      OUT/labelsTr_complete/<case>.nii.gz    complete ground truth of every case
      OUT/manifest.json

- held-out (``write_test_folder``)::

      OUT/images/<case>_0000.nii.gz   OUT/labels/<case>.nii.gz (complete)   OUT/manifest.json
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from inference.atomic import write_json_atomically
from inference.cases import IMAGE_SUFFIX, LABEL_SUFFIX
from inference.nifti import write_image
from synthetic.case import KINDS, SyntheticCase, generate_case

DEFAULT_SHAPE_ZYX = (48, 96, 96)
#: The extra small smoke case of the Table 4 folder (FLARE24_small, 2.5 x 0.8 x 0.8 mm).
SMALL_SHAPE_ZYX = (32, 128, 128)
#: FLARE24 ships about half partially labeled and half unlabeled scans; we add fully
#: labeled ones so that a model trained on them can be evaluated against complete labels.
DEFAULT_KIND_FRACTIONS = {"full": 0.5, "partial": 0.25, "unlabeled": 0.25}
#: Table 4 of the method paper: case id -> number of 512x512 slices.
TABLE4_SLICES = {
    "0001": 55, "0017": 150, "0019": 215, "0029": 554,
    "0048": 499, "0051": 100, "0063": 448, "0099": 334,
}  # fmt: skip
TABLE4_INPLANE_MM = 0.8
CASE_PREFIX = "FLARE24"
#: Lesions per Table 4 case (fixed so benchmark cases are comparable).
TABLE4_LESIONS = 3

Progress = Callable[[str], None]


def case_name(index: int, prefix: str = CASE_PREFIX) -> str:
    """Challenge-style case name, e.g. ``FLARE24_0001`` for index 1."""
    return f"{prefix}_{index:04d}"


def case_seed(seed: int, index: int) -> int:
    """Seed of case ``index`` in a folder generated with ``seed`` (independent streams)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def check_shape(shape_zyx: Sequence[int]) -> tuple[int, int, int]:
    """Validate an array shape given by a user: three positive sizes.

    Raises:
        ValueError: with a one-line reason.
    """
    if len(shape_zyx) != 3 or any(int(s) < 1 for s in shape_zyx):
        raise ValueError(f"shape must be three positive sizes Z Y X, got {tuple(shape_zyx)}")
    return tuple(int(s) for s in shape_zyx)  # type: ignore[return-value]


def _check_count(n_cases: int) -> None:
    if not 0 <= n_cases <= 9999:  # names have four digits
        raise ValueError(f"number of cases must be in 0..9999, got {n_cases}")


def write_case(
    case: SyntheticCase,
    name: str,
    images_dir: str | os.PathLike,
    labels_dir: str | os.PathLike | None = None,
    complete_labels_dir: str | os.PathLike | None = None,
) -> dict[str, Path]:
    """Write a case's image and labels as gzip-1 NIfTI with the case's geometry.

    Args:
        case: the generated case.
        name: case name; the image becomes ``<name>_0000.nii.gz``.
        images_dir: folder for the image (created if needed).
        labels_dir: folder for the shipped label ``<name>.nii.gz``; skipped when None or
            when the case ships no label (unlabeled).
        complete_labels_dir: folder for the complete ground truth ``<name>.nii.gz``, or None.

    Returns:
        The written paths under the keys ``"image"``, ``"label"``, ``"complete_label"``.
    """
    paths: dict[str, Path] = {}
    targets = [("image", images_dir, IMAGE_SUFFIX, case.image)]
    if labels_dir is not None and case.shipped_label is not None:
        targets.append(("label", labels_dir, LABEL_SUFFIX, case.shipped_label))
    if complete_labels_dir is not None:
        targets.append(("complete_label", complete_labels_dir, LABEL_SUFFIX, case.label))
    for key, folder, suffix, array in targets:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths[key] = write_image(folder / f"{name}{suffix}", array, case.geometry)
    return paths


def assign_kinds(
    n_cases: int, kinds: Sequence[str], fractions: Sequence[float] | None, seed: int
) -> list[str]:
    """Kinds of ``n_cases`` cases in proportion to ``fractions`` (largest remainder), shuffled.

    Args:
        n_cases: number of cases.
        kinds: the kinds to use, a subset of ("full", "partial", "unlabeled").
        fractions: their shares; None uses ``DEFAULT_KIND_FRACTIONS`` (renormalised).
        seed: shuffling seed.
    """
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {tuple(kinds)}")
    if fractions is None:
        fractions = [DEFAULT_KIND_FRACTIONS[k] for k in kinds]
    if len(fractions) != len(kinds) or min(fractions) < 0 or sum(fractions) <= 0:
        raise ValueError("fractions must be one non-negative share per kind")
    shares = np.asarray(fractions, dtype=float) / sum(fractions) * n_cases
    counts = np.floor(shares).astype(int)
    for i in np.argsort(-(shares - counts), kind="stable")[: n_cases - counts.sum()]:
        counts[i] += 1
    assigned = [k for k, c in zip(kinds, counts, strict=True) for _ in range(c)]
    np.random.default_rng([seed, 7]).shuffle(assigned)
    return assigned


def _record(name: str, case: SyntheticCase, seed: int, paths: dict[str, Path], root: Path) -> dict:
    g = case.geometry
    return {
        "name": name,
        "kind": case.kind,
        "seed": seed,
        "files": {k: p.relative_to(root).as_posix() for k, p in paths.items()},
        "shape_zyx": list(g.shape_zyx),
        "spacing_zyx_mm": list(g.spacing_zyx_mm),
        "origin_xyz_mm": list(g.origin_xyz_mm),
        "direction": list(g.direction),
        "orientation": case.info.get("orientation"),
        "noise_sigma_hu": case.info.get("noise_sigma_hu"),
        "n_lesions": len(case.lesions),
        "n_labeled_lesions": sum(1 for les in case.lesions if les["labeled"]),
        "lesions": case.lesions,
    }


def _write_manifest(out: Path, manifest: dict) -> None:
    write_json_atomically(out / "manifest.json", manifest, indent=1)


def write_flare_folder(
    out_dir: str | os.PathLike,
    n_cases: int,
    seed: int = 0,
    shape_zyx: tuple[int, int, int] = DEFAULT_SHAPE_ZYX,
    kinds: Sequence[str] = KINDS,
    fractions: Sequence[float] | None = None,
    spacing_zyx_mm: tuple[float, float, float] | None = None,
    progress: bool = False,
) -> dict:
    """Write a FLARE24-style training folder of synthetic cases.

    Args:
        out_dir: destination folder (created).
        n_cases: number of cases, named ``FLARE24_0001``...
        seed: folder seed; case ``i`` uses ``case_seed(seed, i)``.
        shape_zyx: array shape of every case.
        kinds: which kinds to generate.
        fractions: share of each kind; None: full 1/2, partial 1/4, unlabeled 1/4.
        spacing_zyx_mm: fixed spacing, or None for random realistic spacings.
        progress: show a tqdm bar.

    Returns:
        The manifest, also written to ``out_dir/manifest.json``.
    """
    shape_zyx = check_shape(shape_zyx)
    _check_count(n_cases)
    kinds_of = assign_kinds(n_cases, kinds, fractions, seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for index in _progress(range(1, n_cases + 1), progress, "flare cases"):
        name, cseed, kind = case_name(index), case_seed(seed, index), kinds_of[index - 1]
        case = generate_case(cseed, shape_zyx, spacing_zyx_mm=spacing_zyx_mm, kind=kind)
        labeled = kind != "unlabeled"
        paths = write_case(
            case,
            name,
            out / ("imagesTr" if labeled else "unlabeledTr"),
            labels_dir=out / "labelsTr" if labeled else None,
            complete_labels_dir=out / "labelsTr_complete",
        )
        records.append(_record(name, case, cseed, paths, out))
    manifest = {
        "layout": "flare_train",
        "seed": seed,
        "shape_zyx": list(shape_zyx),
        "n_cases": n_cases,
        "kinds": {k: kinds_of.count(k) for k in KINDS},
        "cases": records,
    }
    _write_manifest(out, manifest)
    return manifest


def write_test_folder(
    out_dir: str | os.PathLike,
    n_cases: int,
    seed: int = 0,
    shape_zyx: tuple[int, int, int] = DEFAULT_SHAPE_ZYX,
    spacing_zyx_mm: tuple[float, float, float] | None = None,
    progress: bool = False,
) -> dict:
    """Write held-out cases with complete ground truth (for prediction and evaluation).

    Args:
        out_dir: destination folder (created).
        n_cases: number of cases, named ``FLARE24_0001``...
        seed: folder seed; use a different one from the training folder's.
        shape_zyx: array shape of every case.
        spacing_zyx_mm: fixed spacing, or None for random realistic spacings.
        progress: show a tqdm bar.

    Returns:
        The manifest, also written to ``out_dir/manifest.json``.
    """
    shape_zyx = check_shape(shape_zyx)
    _check_count(n_cases)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for index in _progress(range(1, n_cases + 1), progress, "test cases"):
        name, cseed = case_name(index), case_seed(seed, index)
        case = generate_case(cseed, shape_zyx, spacing_zyx_mm=spacing_zyx_mm, kind="full")
        paths = write_case(case, name, out / "images", labels_dir=out / "labels")
        records.append(_record(name, case, cseed, paths, out))
    manifest = {
        "layout": "test",
        "seed": seed,
        "shape_zyx": list(shape_zyx),
        "n_cases": n_cases,
        "cases": records,
    }
    _write_manifest(out, manifest)
    return manifest


def table4_spacing_z_mm(n_slices: int) -> float:
    """The z spacing FLARE24.md prescribes for a benchmark case with ``n_slices`` slices."""
    if n_slices <= 100:
        return 5.0
    if n_slices <= 215:
        return 2.5
    return 1.25


def table4_cases() -> list[tuple[str, tuple[int, int, int], tuple[float, float, float]]]:
    """The eight image sizes of the method paper's Table 4 with FLARE24.md's spacings.

    Returns:
        ``(name, shape_zyx, spacing_zyx_mm)`` per case, e.g.
        ``("FLARE24_0029", (554, 512, 512), (1.25, 0.8, 0.8))``.
    """
    return [
        (
            f"{CASE_PREFIX}_{cid}",
            (n, 512, 512),
            (table4_spacing_z_mm(n), TABLE4_INPLANE_MM, TABLE4_INPLANE_MM),
        )
        for cid, n in TABLE4_SLICES.items()
    ]


def write_table4_folder(
    out_dir: str | os.PathLike,
    seed: int = 0,
    only: Sequence[str] | None = None,
    small_shape_zyx: tuple[int, int, int] | None = None,
    progress: bool = False,
) -> dict:
    """Write the Table 4 benchmark cases (complete labels alongside).

    Args:
        out_dir: destination; images in ``out_dir/images``, labels in ``out_dir/labels``.
        seed: folder seed.
        only: case ids (``"0029"``) or names (``"FLARE24_0029"``) to write; None for all.
        small_shape_zyx: also write a small case ``FLARE24_small`` of this shape (a quick
            smoke case for the benchmark), or None.
        progress: show a tqdm bar.

    Returns:
        The manifest, also written to ``out_dir/manifest.json``.
    """
    cases = table4_cases()
    if only:
        wanted = {w if w.startswith(CASE_PREFIX) else f"{CASE_PREFIX}_{w}" for w in only}
        unknown = wanted - {name for name, _, _ in cases}
        if unknown:
            raise ValueError(f"unknown Table 4 case(s): {', '.join(sorted(unknown))}")
        cases = [c for c in cases if c[0] in wanted]
    if small_shape_zyx is not None:
        cases.append((f"{CASE_PREFIX}_small", check_shape(small_shape_zyx), (2.5, 0.8, 0.8)))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for name, shape, spacing in _progress(cases, progress, "table4 cases"):
        # Seeded by the case id, so `--only` selections reproduce the same volumes.
        suffix = name.rsplit("_", 1)[1]
        cseed = case_seed(seed, 10_000 + (int(suffix) if suffix.isdigit() else 0))
        case = generate_case(
            cseed,
            shape,
            spacing_zyx_mm=spacing,
            kind="full",
            n_lesions=TABLE4_LESIONS,
            oblique=False,
        )
        paths = write_case(case, name, out / "images", labels_dir=out / "labels")
        records.append(_record(name, case, cseed, paths, out))
    manifest = {"layout": "table4", "seed": seed, "n_cases": len(records), "cases": records}
    _write_manifest(out, manifest)
    return manifest


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="case")
