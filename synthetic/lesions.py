"""Irregular, clearly visible lesions inside organs.

A lesion is the union of a main ellipsoid and up to three overlapping satellites, each with
a low-frequency wobble of its radius, all inside a sphere of the lesion's nominal diameter
(3-40 mm, physical). It takes one uniform intensity, its organ's value plus a contrast of
tens of HU (hypo- or hyper-dense), and is painted only on voxels of its organ, so the label
marks exactly the voxels whose intensity changed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from synthetic.anatomy import Organ
from synthetic.shapes import Blob, Box, random_wobbles, union_mask
from synthetic.spatial import Frame

MIN_DIAMETER_MM = 3.0
MAX_DIAMETER_MM = 40.0
#: Organ -> (how often it hosts a lesion, probability of a hypodense lesion,
#: |contrast| range in HU for hypo, for hyper).
ORGAN_LESION_PROFILE: dict[str, tuple[float, float, tuple[int, int], tuple[int, int]]] = {
    "liver": (0.30, 0.65, (45, 90), (45, 80)),
    "kidney_right": (0.09, 0.60, (70, 140), (45, 80)),
    "kidney_left": (0.09, 0.60, (70, 140), (45, 80)),
    "spleen": (0.12, 0.70, (45, 85), (45, 75)),
    "pancreas": (0.10, 0.80, (40, 60), (45, 75)),
    # Lung nodules are soft tissue in air-filled lung: hyperdense by several hundred HU.
    "lung_right": (0.15, 0.00, (0, 0), (820, 900)),
    "lung_left": (0.15, 0.00, (0, 0), (820, 900)),
    # Lymph-node-like lesions in the abdominal soft tissue (and the fallback host of
    # tiny volumes, whose organs may be too thin for a 3 mm lesion).
    "soft_tissue": (0.05, 0.0, (0, 0), (50, 85)),
}
#: Share of the lesion's mask that must fall on its organ (the rest would cover other tissue).
_MIN_ORGAN_FRACTION = 0.9


@dataclass
class Lesion:
    """A placed lesion: its record and its voxels (a bool mask in ``box``)."""

    organ: str
    center_zyx_vox: tuple[int, int, int]
    diameter_mm: float
    contrast_hu: int
    organ_hu: int
    box: Box
    mask: np.ndarray

    def record(self, labeled: bool) -> dict:
        """JSON-ready description (the ``SyntheticCase.lesions`` entry)."""
        return {
            "organ": self.organ,
            "center_zyx_vox": list(self.center_zyx_vox),
            "diameter_mm": round(self.diameter_mm, 3),
            "contrast_hu": int(self.contrast_hu),
            "density": "hypo" if self.contrast_hu < 0 else "hyper",
            "organ_hu": int(self.organ_hu),
            "n_voxels": int(self.mask.sum()),
            "labeled": bool(labeled),
        }


def _lesion_shape(rng: np.random.Generator, center: np.ndarray, diameter_mm: float) -> list[Blob]:
    """Main ellipsoid plus 0-3 satellites, all within a sphere of ``diameter_mm``."""
    radius = diameter_mm / 2
    wobble = float(rng.uniform(0.12, 0.25))
    main_r = radius / (1 + wobble)
    blobs = [
        Blob(
            center_zyx_mm=tuple(float(c) for c in center),  # type: ignore[arg-type]
            radii_zyx_mm=tuple(float(main_r * f) for f in rng.uniform(0.6, 1.0, size=3)),  # type: ignore[arg-type]
            angle_rad=float(rng.uniform(0, math.pi)),
            wobbles=random_wobbles(rng, wobble, n=3, k_range=(2.0, 4.5)),
        )
    ]
    for _ in range(int(rng.choice([0, 1, 1, 2, 2, 3]))):
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        offset = radius * float(rng.uniform(0.35, 0.6))
        sat_r = (radius - offset) / (1 + wobble) * float(rng.uniform(0.6, 1.0))
        blobs.append(
            Blob(
                center_zyx_mm=tuple(float(c) for c in center + direction * offset),  # type: ignore[arg-type]
                radii_zyx_mm=tuple(float(sat_r * f) for f in rng.uniform(0.75, 1.0, size=3)),  # type: ignore[arg-type]
                angle_rad=float(rng.uniform(0, math.pi)),
                wobbles=random_wobbles(rng, wobble, n=2, k_range=(2.0, 4.5)),
            )
        )
    return blobs


def _sample_in_blob(rng: np.random.Generator, blob: Blob, max_fraction: float) -> np.ndarray:
    """A uniform point inside the blob's ellipsoid shrunk to ``max_fraction`` of its radii."""
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    unit = direction * max_fraction * float(rng.random()) ** (1 / 3)
    rz, ry, rx = blob.radii_zyx_mm
    nz, ny, nx = unit[0] * rz, unit[1] * ry, unit[2] * rx
    c, s = math.cos(blob.angle_rad), math.sin(blob.angle_rad)
    # Inverse of the in-plane rotation used by Blob.mask.
    dy, dx = c * ny + s * nx, -s * ny + c * nx
    return np.asarray(blob.center_zyx_mm) + np.array([nz, dy, dx])


def _inner_radius_mm(blob: Blob) -> float:
    """Smallest semi-axis of an organ blob, shrunk by its wobble (a safe inner radius)."""
    return float(min(blob.radii_zyx_mm)) * (1 - blob.max_wobble)


def _draw_diameter(rng: np.random.Generator, upper_mm: float, small: bool) -> float:
    """A diameter in [3 mm, upper_mm].

    One in three log-uniform over the whole range (many small lesions, as in metastatic
    disease), otherwise uniform over the upper two thirds (the large primary tumours that
    dominate a case's Dice); ``small`` biases towards 3 mm for volumes where nothing
    larger fits.
    """
    span = upper_mm - MIN_DIAMETER_MM
    if small:
        return MIN_DIAMETER_MM + span * float(rng.random()) ** 3
    if rng.random() < 1 / 3:
        return float(math.exp(rng.uniform(math.log(MIN_DIAMETER_MM), math.log(upper_mm))))
    return float(rng.uniform(max(MIN_DIAMETER_MM, upper_mm / 3), upper_mm))


def place_lesions(
    rng: np.random.Generator,
    frame: Frame,
    image: np.ndarray,
    organs: list[Organ],
    n_lesions: int,
    label: np.ndarray | None = None,
    max_attempts: int = 200,
) -> list[Lesion]:
    """Place and paint ``n_lesions`` non-touching lesions into ``image`` (in place).

    Args:
        rng: random generator.
        frame: the case's axes.
        image: the noise-free int16 volume from ``build_anatomy``; modified in place.
        organs: the candidate host organs (with their intensities).
        n_lesions: how many to place.
        label: a zero uint8 volume of the image's shape that receives 1 on every lesion
            voxel (the complete ground truth); None to allocate a scratch one.
        max_attempts: tries per lesion before giving up with an error.

    Returns:
        The lesions, in placement order.

    Raises:
        RuntimeError: a lesion found no room (the volume is too small for its organs).
    """
    occupied = np.zeros(image.shape, dtype=np.uint8) if label is None else label
    by_name = {o.name: o for o in organs}
    names = [n for n in ORGAN_LESION_PROFILE if n in by_name]
    weights = np.array([ORGAN_LESION_PROFILE[n][0] for n in names])
    lesions: list[Lesion] = []
    for _ in range(n_lesions):
        for attempt in range(max_attempts):
            organ = by_name[str(rng.choice(names, p=weights / weights.sum()))]
            lesion = _try_lesion(
                rng, frame, image, occupied, organ, relaxed=attempt > max_attempts // 2
            )
            if lesion is not None:
                break
        else:
            raise RuntimeError(
                f"no room for lesion {len(lesions) + 1} of {n_lesions} in a {image.shape} "
                "volume; use a larger shape or fewer lesions"
            )
        region = image[lesion.box]
        region[lesion.mask] = np.int16(lesion.organ_hu + lesion.contrast_hu)
        occupied[lesion.box][lesion.mask] = 1
        lesions.append(lesion)
    return lesions


def _try_lesion(
    rng: np.random.Generator,
    frame: Frame,
    image: np.ndarray,
    occupied: np.ndarray,
    organ: Organ,
    relaxed: bool,
) -> Lesion | None:
    volumes = np.array([math.prod(b.radii_zyx_mm) for b in organ.blobs])
    blob = organ.blobs[int(rng.choice(len(organ.blobs), p=volumes / volumes.sum()))]
    inner_r = _inner_radius_mm(blob)
    upper = min(MAX_DIAMETER_MM, 1.6 * inner_r)
    if upper < MIN_DIAMETER_MM and not relaxed:
        return None
    upper = max(upper, MIN_DIAMETER_MM)
    diameter = _draw_diameter(rng, upper, small=relaxed)
    max_fraction = max(0.1, 1 - (diameter / 2) / max(inner_r, 1e-6))
    point = _sample_in_blob(rng, blob, max_fraction)
    voxel = frame.voxel_of(point)
    if voxel is None:
        return None
    centre = frame.point_of(voxel)  # snap to a voxel centre: the centre voxel is always in
    blobs = _lesion_shape(rng, centre, diameter)
    box, mask = union_mask(blobs, frame)
    region = image[box]
    on_organ = mask & (region == organ.hu)
    n_mask = int(mask.sum())
    local_centre = tuple(v - s.start for v, s in zip(voxel, box, strict=True))
    if n_mask == 0 or not on_organ[local_centre]:
        return None
    if on_organ.sum() < (_MIN_ORGAN_FRACTION if not relaxed else 0.6) * n_mask:
        return None
    # Keep lesions apart by at least one voxel so each stays its own connected component.
    if _touches(occupied, box, on_organ):
        return None
    hypo_p, hypo_range, hyper_range = ORGAN_LESION_PROFILE[organ.name][1:]
    if rng.random() < hypo_p:
        contrast = -int(rng.integers(hypo_range[0], hypo_range[1] + 1))
    else:
        contrast = int(rng.integers(hyper_range[0], hyper_range[1] + 1))
    return Lesion(
        organ=organ.name,
        center_zyx_vox=tuple(int(v) for v in voxel),  # type: ignore[arg-type]
        diameter_mm=diameter,
        contrast_hu=contrast,
        organ_hu=organ.hu,
        box=box,
        mask=on_organ,
    )


def _touches(occupied: np.ndarray, box: Box, mask: np.ndarray) -> bool:
    """Whether ``mask`` (in ``box``) overlaps or touches (26-neighbourhood) an occupied voxel."""
    grown = tuple(
        slice(max(s.start - 1, 0), min(s.stop + 1, n))
        for s, n in zip(box, occupied.shape, strict=True)
    )
    region = occupied[grown]
    if not region.any():
        return False
    local = tuple(
        slice(s.start - g.start, s.start - g.start + (s.stop - s.start))
        for s, g in zip(box, grown, strict=True)
    )
    dilated = np.zeros(region.shape, dtype=bool)
    dilated[local] = mask
    for axis in range(3):
        dilated |= np.roll(dilated, 1, axis) | np.roll(dilated, -1, axis)
    return bool((dilated & (region != 0)).any())
