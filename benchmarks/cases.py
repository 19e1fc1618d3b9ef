"""Benchmark cases: the eight image sizes of the paper's Table 4, a small case and a wide one.

The cases are synthetic FLARE-like CT (``synthetic``), generated into a cache folder the
first time they are asked for and reused afterwards; they are never committed. Spacings
follow FLARE24.md: in-plane 0.8 mm, z 5.0 mm for <= 100 slices, 2.5 mm for 150-215 slices,
1.25 mm for >= 334 slices; the small case is 2.5 x 0.8 x 0.8 mm. The wide case
(``FLARE24_wide``) is a field of view much wider than the body: a 320x320-voxel synthetic
body (256 mm) centred in a 512x512 field of air (410 mm) at 0.8 mm, 16 slices of 2.5 mm;
it measures what skipping air tiles saves (``inference.air``).

Cache layout::

    CACHE/images/FLARE24_<id>_0000.nii.gz   what the peers predict
    CACHE/labels/FLARE24_<id>.nii.gz        complete ground truth (kept for accuracy checks)
    CACHE/cases.json                        shape, spacing and seed of every cached case
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from inference.atomic import write_json_atomically
from inference.cases import IMAGE_SUFFIX, Case
from synthetic import case_seed, generate_case, table4_cases, write_case, write_table4_folder
from synthetic.case import HU_MIN, SyntheticCase
from synthetic.dataset import CASE_PREFIX, SMALL_SHAPE_ZYX, TABLE4_LESIONS

#: The extra small case's id (``FLARE24_small``); the others are Table 4's ids.
SMALL = "small"
#: z, y, x spacing of the small case (the same as ``python -m synthetic table4`` uses).
SMALL_SPACING_ZYX_MM = (2.5, 0.8, 0.8)
#: The wide field-of-view case: its id, the body's shape and the field of view (voxels).
WIDE = "wide"
WIDE_BODY_ZYX = (16, 320, 320)
WIDE_FOV_YX = (512, 512)
WIDE_SPACING_ZYX_MM = (2.5, 0.8, 0.8)
#: Table 4 ids in the paper's order, then the small case.
TABLE4_IDS = tuple(name.rsplit("_", 1)[1] for name, _, _ in table4_cases())
CASE_IDS = (SMALL, WIDE, *TABLE4_IDS)
#: What ``python -m benchmarks`` measures by default: CPU-sized.
DEFAULT_CASE_IDS = (SMALL, "0001", WIDE)


@dataclass(frozen=True)
class BenchCase:
    """One benchmark case.

    Attributes:
        case_id: ``small`` or a Table 4 id such as ``0029``.
        name: the case name, e.g. ``FLARE24_0029``.
        shape_zyx: array shape.
        spacing_zyx_mm: voxel spacing.
        image_path: the cached ``<name>_0000.nii.gz``.
    """

    case_id: str
    name: str
    shape_zyx: tuple[int, int, int]
    spacing_zyx_mm: tuple[float, float, float]
    image_path: Path

    @property
    def size_xyz(self) -> str:
        """``512x512x55``: the paper's way of writing the size."""
        return "x".join(str(s) for s in reversed(self.shape_zyx))

    @property
    def n_voxels(self) -> int:
        """Number of voxels (picks the largest case of a run)."""
        return math.prod(self.shape_zyx)

    def as_case(self) -> Case:
        """The profiler's view of the case."""
        return Case(self.name, self.image_path)


def case_specs(
    case_ids: Sequence[str], small_shape_zyx: Sequence[int] = SMALL_SHAPE_ZYX
) -> list[tuple[str, str, tuple[int, int, int], tuple[float, float, float]]]:
    """``(case_id, name, shape_zyx, spacing_zyx_mm)`` of the asked-for cases, in that order.

    Args:
        case_ids: ids from :data:`CASE_IDS` (``FLARE24_`` prefixes are accepted).
        small_shape_zyx: shape of the small case.

    Raises:
        ValueError: an unknown id.
    """
    table4 = {name.rsplit("_", 1)[1]: (name, shape, sp) for name, shape, sp in table4_cases()}
    specs = []
    for raw in case_ids:
        cid = raw.removeprefix(f"{CASE_PREFIX}_")
        if cid == SMALL:
            shape = tuple(int(s) for s in small_shape_zyx)
            if len(shape) != 3 or min(shape) < 1:
                raise ValueError(f"small case shape must be three positive sizes, got {shape}")
            specs.append((cid, f"{CASE_PREFIX}_{SMALL}", shape, SMALL_SPACING_ZYX_MM))
        elif cid == WIDE:
            shape = (WIDE_BODY_ZYX[0], *WIDE_FOV_YX)
            specs.append((cid, f"{CASE_PREFIX}_{WIDE}", shape, WIDE_SPACING_ZYX_MM))
        elif cid in table4:
            name, shape, spacing = table4[cid]
            specs.append((cid, name, tuple(shape), tuple(spacing)))
        else:
            raise ValueError(f"unknown case {raw!r}; choose from {', '.join(CASE_IDS)}")
    return specs  # type: ignore[return-value]


def _load_index(cache_dir: Path) -> dict[str, dict]:
    try:
        return json.loads((cache_dir / "cases.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _save_index(cache_dir: Path, index: dict[str, dict]) -> None:
    write_json_atomically(cache_dir / "cases.json", index, indent=1, sort_keys=True)


def _generate(cid: str, name: str, shape: tuple[int, int, int], seed: int, into: Path) -> None:
    """Write one case's image and label into ``into/images`` and ``into/labels``."""
    if cid == SMALL:
        # write_table4_folder cannot write the small case alone (its `only` selects Table 4
        # ids, and an empty selection means all eight), so it is generated here with the
        # very parameters that function uses for FLARE24_small.
        case = generate_case(
            case_seed(seed, 10_000),
            shape,
            spacing_zyx_mm=SMALL_SPACING_ZYX_MM,
            kind="full",
            n_lesions=TABLE4_LESIONS,
            oblique=False,
        )
        write_case(case, name, into / "images", labels_dir=into / "labels")
    elif cid == WIDE:
        write_case(wide_case(case_seed(seed, 20_000)), name, into / "images", into / "labels")
    else:
        write_table4_folder(into, seed=seed, only=[cid])


def wide_case(seed: int) -> SyntheticCase:
    """A synthetic body in a field of view much wider than it (see the module docstring).

    The body is generated on its own grid, then padded with air (-1024 HU) to the field
    of view; the origin moves so that the body stays where it was in space.
    """
    case = generate_case(
        seed,
        WIDE_BODY_ZYX,
        spacing_zyx_mm=WIDE_SPACING_ZYX_MM,
        kind="full",
        n_lesions=TABLE4_LESIONS,
        oblique=False,
    )
    pads = [(0, 0)]
    for body, fov in zip(WIDE_BODY_ZYX[1:], WIDE_FOV_YX, strict=True):
        before = (fov - body) // 2
        pads.append((before, fov - body - before))
    image = np.pad(case.image, pads, constant_values=HU_MIN)
    label = np.pad(case.label, pads)
    g = case.geometry
    # identity direction (oblique=False): x and y move by the padding before them
    origin = (
        g.origin_xyz_mm[0] - pads[2][0] * g.spacing_xyz_mm[0],
        g.origin_xyz_mm[1] - pads[1][0] * g.spacing_xyz_mm[1],
        g.origin_xyz_mm[2],
    )
    geometry = replace(g, size_xyz=tuple(reversed(image.shape)), origin_xyz_mm=origin)
    return replace(case, image=image, label=label, shipped_label=label, geometry=geometry)


def ensure_cases(
    cache_dir: str | os.PathLike,
    case_ids: Sequence[str] = DEFAULT_CASE_IDS,
    seed: int = 0,
    small_shape_zyx: Sequence[int] = SMALL_SHAPE_ZYX,
    progress: bool = False,
) -> list[BenchCase]:
    """The asked-for cases, generated into the cache where missing or made differently.

    Args:
        cache_dir: the cache folder (created if needed).
        case_ids: ids from :data:`CASE_IDS`.
        seed: synthetic folder seed (the same seed gives the same volumes).
        small_shape_zyx: shape of the small case.
        progress: a tqdm bar while generating.

    Returns:
        The cases in the order asked for.

    Raises:
        ValueError: an unknown id.
    """
    cache = Path(cache_dir)
    specs = case_specs(case_ids, small_shape_zyx)
    index = _load_index(cache)
    missing = []
    for cid, name, shape, spacing in specs:
        wanted = {"shape_zyx": list(shape), "spacing_zyx_mm": list(spacing), "seed": seed}
        image = cache / "images" / f"{name}{IMAGE_SUFFIX}"
        if index.get(name) != wanted or not image.is_file():
            missing.append((cid, name, shape, wanted))
    if missing:
        from tqdm import tqdm

        (cache / "images").mkdir(parents=True, exist_ok=True)
        (cache / "labels").mkdir(parents=True, exist_ok=True)
        for cid, name, shape, wanted in tqdm(
            missing, desc="generating cases", unit="case", disable=not progress
        ):
            tmp = cache / f".tmp-{name}"
            shutil.rmtree(tmp, ignore_errors=True)
            _generate(cid, name, shape, seed, tmp)
            # Moved in only when complete: an interrupted run never leaves a half case.
            os.replace(tmp / "labels" / f"{name}.nii.gz", cache / "labels" / f"{name}.nii.gz")
            os.replace(
                tmp / "images" / f"{name}{IMAGE_SUFFIX}", cache / "images" / f"{name}{IMAGE_SUFFIX}"
            )
            shutil.rmtree(tmp, ignore_errors=True)
            index[name] = wanted
            _save_index(cache, index)
    return [
        BenchCase(cid, name, shape, spacing, cache / "images" / f"{name}{IMAGE_SUFFIX}")
        for cid, name, shape, spacing in specs
    ]
