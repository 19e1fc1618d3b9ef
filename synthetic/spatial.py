"""Where a synthetic case lies in space: spacing, direction and origin, and voxel <-> mm maps.

Anatomy is laid out in a *canonical* frame: millimetres from the volume centre along each
array axis, with +x towards the patient's left, +y posterior and +z superior (the LPS
convention that SimpleITK uses). When the direction matrix flips an axis (an RAS-stored
scan, or slices stored head to feet), the content is flipped with it, so that the patient
still lies the right way round in physical space, as a real scanner export would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from inference.nifti import Geometry

#: Slice thicknesses seen in FLARE-like abdominal CT (mm), all within 0.8-5 mm.
Z_SPACINGS_MM = (0.8, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 5.0)
#: In-plane pixel spacing range (mm).
INPLANE_SPACING_RANGE_MM = (0.6, 0.9)
#: Fraction of cases with a non-identity direction when the caller does not choose.
OBLIQUE_FRACTION = 0.25


@dataclass(frozen=True)
class Axis:
    """One array axis in the canonical frame.

    Attributes:
        size: number of voxels.
        spacing_mm: voxel size in mm.
        flipped: True when array index grows against the canonical direction.
    """

    size: int
    spacing_mm: float
    flipped: bool = False

    @property
    def extent_mm(self) -> float:
        """Field of view along this axis in mm."""
        return self.size * self.spacing_mm

    @property
    def _sign(self) -> float:
        return -1.0 if self.flipped else 1.0

    def coords_mm(self, index: slice | None = None) -> np.ndarray:
        """Canonical mm coordinate (float32) of each voxel centre, 0 at the volume centre.

        Args:
            index: restrict to this slice of voxel indices (a bounding box); None for all.
        """
        start, stop, _ = (index or slice(0, self.size)).indices(self.size)
        i = np.arange(start, stop, dtype=np.float32)
        return ((i + 0.5 - self.size / 2) * (self._sign * self.spacing_mm)).astype(np.float32)

    def coord_of(self, index: int) -> float:
        """Canonical mm coordinate of the centre of voxel ``index``."""
        return (index + 0.5 - self.size / 2) * self._sign * self.spacing_mm

    def index_of(self, coord_mm: float) -> int:
        """Index of the voxel whose centre is nearest to ``coord_mm`` (may lie outside)."""
        return math.floor(coord_mm * self._sign / self.spacing_mm + self.size / 2)

    def index_slice(self, lo_mm: float, hi_mm: float) -> slice:
        """Voxels whose centres lie in ``[lo_mm, hi_mm]``, clipped to the array (maybe empty)."""
        if self.flipped:
            lo_mm, hi_mm = -hi_mm, -lo_mm
        first = math.ceil(lo_mm / self.spacing_mm + self.size / 2 - 0.5)
        last = math.floor(hi_mm / self.spacing_mm + self.size / 2 - 0.5)
        first, last = max(first, 0), min(last, self.size - 1)
        return slice(first, max(first, last + 1))


@dataclass(frozen=True)
class Frame:
    """The three axes of a case in array order (z, y, x) plus its file geometry."""

    axes: tuple[Axis, Axis, Axis]
    geometry: Geometry
    orientation: str

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        """Array shape (z, y, x)."""
        return tuple(a.size for a in self.axes)  # type: ignore[return-value]

    @property
    def extent_zyx_mm(self) -> tuple[float, float, float]:
        """Field of view in mm along (z, y, x)."""
        return tuple(a.extent_mm for a in self.axes)  # type: ignore[return-value]

    def box(self, lo_zyx_mm: np.ndarray, hi_zyx_mm: np.ndarray) -> tuple[slice, slice, slice]:
        """Array slices of the voxels inside a canonical mm box (clipped, maybe empty)."""
        return tuple(
            a.index_slice(float(lo), float(hi))
            for a, lo, hi in zip(self.axes, lo_zyx_mm, hi_zyx_mm, strict=True)
        )  # type: ignore[return-value]

    def voxel_of(self, point_zyx_mm: np.ndarray) -> tuple[int, int, int] | None:
        """Voxel index nearest to a canonical point, or None when it lies outside the array."""
        idx = tuple(a.index_of(float(p)) for a, p in zip(self.axes, point_zyx_mm, strict=True))
        if all(0 <= i < a.size for i, a in zip(idx, self.axes, strict=True)):
            return idx  # type: ignore[return-value]
        return None

    def point_of(self, voxel_zyx: tuple[int, int, int]) -> np.ndarray:
        """Canonical mm coordinate (z, y, x) of a voxel centre."""
        return np.array(
            [a.coord_of(i) for a, i in zip(self.axes, voxel_zyx, strict=True)], dtype=np.float64
        )


def choose_spacing(rng: np.random.Generator) -> tuple[float, float, float]:
    """A realistic (z, y, x) spacing in mm: in-plane 0.6-0.9 (square pixels), z 0.8-5.

    Values are rounded to 1e-4 mm so that they survive the float32 NIfTI header exactly
    enough for a 1e-4 comparison.
    """
    inplane = round(float(rng.uniform(*INPLANE_SPACING_RANGE_MM)), 4)
    z = float(rng.choice(Z_SPACINGS_MM))
    return (z, inplane, inplane)


def _rotation(axis: str, angle_rad: float) -> np.ndarray:
    c, s = math.cos(angle_rad), math.sin(angle_rad)
    if axis == "x":
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]], dtype=np.float64)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]], dtype=np.float64)


def choose_direction(
    rng: np.random.Generator, oblique: bool
) -> tuple[np.ndarray, tuple[bool, bool, bool], str]:
    """Pick a direction matrix.

    Args:
        rng: random generator.
        oblique: False gives the identity; True one of: x/y flipped (RAS-stored), z flipped
            (slices stored head to feet), a gantry tilt of 3-15 degrees about x, a 2-10 degree
            rotation about z, or a flip combined with a tilt.

    Returns:
        ``(direction 3x3 in xyz, flipped_zyx, description)``; ``flipped_zyx`` says which
        array axes run against the canonical frame (the content is flipped accordingly).
    """
    if not oblique:
        return np.eye(3), (False, False, False), "identity"
    kind = str(rng.choice(["flip_xy", "flip_z", "tilt_x", "rotate_z", "flip_xy+tilt_x"]))
    flips_xyz = {"flip_xy": (True, True, False), "flip_z": (False, False, True)}
    flip = flips_xyz.get(kind.split("+")[0], (False, False, False))
    direction = np.diag([-1.0 if f else 1.0 for f in flip])
    if "tilt_x" in kind:
        angle = math.radians(float(rng.uniform(3.0, 15.0)) * float(rng.choice([-1.0, 1.0])))
        direction = _rotation("x", angle) @ direction
        kind += f"({math.degrees(angle):.1f}deg)"
    elif kind == "rotate_z":
        angle = math.radians(float(rng.uniform(2.0, 10.0)) * float(rng.choice([-1.0, 1.0])))
        direction = _rotation("z", angle) @ direction
        kind += f"({math.degrees(angle):.1f}deg)"
    return direction, (flip[2], flip[1], flip[0]), kind


def choose_frame(
    rng: np.random.Generator,
    shape_zyx: tuple[int, int, int],
    spacing_zyx_mm: tuple[float, float, float] | None = None,
    oblique: bool | None = None,
) -> Frame:
    """Choose spacing, direction and a non-zero origin for a case.

    Args:
        rng: random generator.
        shape_zyx: array shape.
        spacing_zyx_mm: fixed spacing, or None for a random realistic one.
        oblique: True for a non-identity direction, False for identity, None for random
            (about one case in four).

    Returns:
        The case's frame (axes in array order plus the geometry to write).
    """
    if len(shape_zyx) != 3 or min(shape_zyx) < 1:
        raise ValueError(f"shape_zyx must be three positive sizes, got {shape_zyx}")
    spacing = choose_spacing(rng) if spacing_zyx_mm is None else tuple(map(float, spacing_zyx_mm))
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing_zyx_mm must be three positive values, got {spacing_zyx_mm}")
    if oblique is None:
        oblique = bool(rng.random() < OBLIQUE_FRACTION)
    direction, flipped_zyx, description = choose_direction(rng, oblique)
    size_xyz = np.array(shape_zyx[::-1], dtype=np.float64)
    spacing_xyz = np.array(spacing[::-1], dtype=np.float64)
    # A scanner-like table position: patient centre off the isocentre, z far from 0.
    centre_xyz = np.array([rng.uniform(-25, 25), rng.uniform(-230, -120), rng.uniform(-900, -150)])
    origin = centre_xyz - direction @ (spacing_xyz * (size_xyz - 1) / 2)
    geometry = Geometry(
        size_xyz=tuple(int(s) for s in shape_zyx[::-1]),
        spacing_xyz_mm=tuple(float(s) for s in spacing_xyz),
        origin_xyz_mm=tuple(round(float(o), 2) for o in origin),
        direction=tuple(float(d) for d in direction.reshape(-1)),
    )
    axes = tuple(
        Axis(int(n), float(s), bool(f))
        for n, s, f in zip(shape_zyx, spacing, flipped_zyx, strict=True)
    )
    return Frame(axes=axes, geometry=geometry, orientation=description)  # type: ignore[arg-type]
