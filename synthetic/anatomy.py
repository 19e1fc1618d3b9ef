"""A CT-like trunk: body outline, fat, muscle, spine, ribs, vessels, lungs and abdominal organs.

Everything scales with the field of view (a 48x48 test slice still shows a whole body with
its organs), laid out in the canonical frame of ``synthetic.spatial``. Painting order:

1. per slice, a cached 2-D template: air, CT table, subcutaneous fat, muscle wall,
   abdominal soft tissue, paraspinal muscles (only a few distinct templates exist, so the
   cost per slice is one copy);
2. 3-D organs, each inside its bounding box (lungs, heart, liver, spleen, kidneys,
   pancreas, bladder, bowel gas);
3. per slice, the bones and large vessels on top (spine with discs and canal, ribs,
   aorta, vena cava), so that no organ covers them.

Intensities are noise-free integers here; ``synthetic.case`` adds noise at the end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from synthetic.shapes import Blob, random_wobbles, union_mask
from synthetic.spatial import Frame

#: HU ranges per tissue (portal-venous contrast phase), drawn once per case.
TISSUE_HU_RANGES: dict[str, tuple[int, int]] = {
    "air": (-1000, -1000),
    "table": (150, 250),
    "fat": (-115, -85),
    "muscle": (40, 60),
    "soft_tissue": (15, 35),
    "csf": (5, 15),
    "bone_cortex": (650, 900),
    "bone_marrow": (180, 280),
    "disc": (70, 95),
    "aorta": (150, 200),
    "vena_cava": (110, 140),
    "lung": (-870, -820),
    "heart": (36, 48),
    "liver": (90, 125),
    "spleen": (105, 135),
    "kidney": (150, 210),
    "pancreas": (62, 85),
    "bladder": (0, 12),
    "gas": (-980, -940),
}


@dataclass(frozen=True)
class Organ:
    """An organ that can host lesions.

    Attributes:
        name: e.g. ``"liver"``, ``"kidney_left"``.
        tissue: key of its intensity in the case's HU table.
        hu: its noise-free intensity in this case.
        blobs: the shapes whose union is the organ.
    """

    name: str
    tissue: str
    hu: int
    blobs: tuple[Blob, ...]


@dataclass
class Anatomy:
    """The noise-free image and what lesions need to know about it."""

    image: np.ndarray
    hu: dict[str, int]
    organs: list[Organ]


def draw_intensities(rng: np.random.Generator) -> dict[str, int]:
    """Per-case HU of each tissue; all distinct so a tissue can be found by its value."""
    hu: dict[str, int] = {}
    used: set[int] = set()
    for name, (lo, hi) in TISSUE_HU_RANGES.items():
        value = int(rng.integers(lo, hi + 1))
        while value in used:
            value += 1
        hu[name] = value
        used.add(value)
    return hu


@dataclass(frozen=True)
class _Body:
    """Case-level body proportions in mm, derived from the in-plane field of view."""

    half_x_mm: float
    half_y_mm: float
    center_y_mm: float
    center_x_mm: float
    fat_scale: float  # inner edge of subcutaneous fat, relative to the outline
    muscle_scale: float  # inner edge of the muscle wall
    exponent: float  # >2 gives the boxy outline of a trunk


def _draw_body(rng: np.random.Generator, frame: Frame) -> _Body:
    _, ey, ex = frame.extent_zyx_mm
    fat_scale = float(rng.uniform(0.84, 0.93))
    return _Body(
        half_x_mm=float(rng.uniform(0.40, 0.45)) * ex,
        half_y_mm=float(rng.uniform(0.30, 0.35)) * ey,
        center_y_mm=float(rng.uniform(-0.04, 0.0)) * ey,
        center_x_mm=float(rng.uniform(-0.03, 0.03)) * ex,
        fat_scale=fat_scale,
        muscle_scale=fat_scale - float(rng.uniform(0.05, 0.08)),
        exponent=float(rng.uniform(2.0, 2.6)),
    )


class _SliceTemplates:
    """Cached 2-D slices: soft-tissue background and the bone/vessel overlay.

    A slice's look depends on z only through a few discrete states (body scale level,
    vertebra or disc, rib phase), so a 554-slice case needs only a few dozen templates.
    """

    SCALE_LEVELS = 12
    RIB_PHASES = 6
    PELVIS_LEVELS = 8

    def __init__(self, rng: np.random.Generator, frame: Frame, body: _Body, hu: dict[str, int]):
        self.frame, self.body, self.hu = frame, body, hu
        self.y = frame.axes[1].coords_mm()[:, None]
        # Body-relative x: the patient need not lie on the table's centre line.
        self.x = frame.axes[2].coords_mm()[None, :] - np.float32(body.center_x_mm)
        self.n_ribs = int(rng.integers(6, 9))
        self.rib_offset = float(rng.uniform(0, 2 * math.pi))
        self.spine_x_mm = float(rng.uniform(-0.02, 0.02)) * body.half_x_mm
        self._base: dict[int, np.ndarray] = {}
        self._overlay: dict[_SliceState, tuple[np.ndarray, np.ndarray]] = {}

    def _r(self, scale: float, cy: float = 0.0, cx: float = 0.0) -> np.ndarray:
        """Generalised-ellipse radius of each pixel relative to the body outline * scale."""
        b = self.body
        ny = np.abs((self.y - b.center_y_mm - cy) / (b.half_y_mm * scale))
        nx = np.abs((self.x - cx) / (b.half_x_mm * scale))
        return (ny**b.exponent + nx**b.exponent) ** (1.0 / b.exponent)

    def base(self, level: int) -> np.ndarray:
        """Background slice at body scale ``level``."""
        if level not in self._base:
            b, hu = self.body, self.hu
            scale = 0.95 + 0.1 * level / max(self.SCALE_LEVELS - 1, 1)
            r = self._r(scale)
            out = np.full(r.shape, hu["air"], dtype=np.int16)
            # CT table: a thin band under the patient's back.
            table_y = b.center_y_mm + b.half_y_mm * 1.08
            band = (np.abs(self.y - table_y) < max(0.012 * b.half_y_mm * 2, 1.0)) & (
                np.abs(self.x) < b.half_x_mm * 1.05
            )
            out[band] = hu["table"]
            out[r <= 1.0] = hu["fat"]
            out[r <= b.muscle_scale + (b.fat_scale - b.muscle_scale)] = hu["muscle"]
            out[r <= b.muscle_scale] = hu["soft_tissue"]
            # Paraspinal muscles beside the spine, at the back.
            for side in (-1.0, 1.0):
                pm = self._ellipse(
                    cy=b.half_y_mm * 0.62,
                    cx=self.spine_x_mm + side * 0.17 * b.half_x_mm,
                    ry=0.2 * b.half_y_mm,
                    rx=0.13 * b.half_x_mm,
                )
                out[pm & (r <= b.fat_scale)] = hu["muscle"]
            self._base[level] = out
        return self._base[level]

    def _ellipse(self, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
        dy = (self.y - self.body.center_y_mm - cy) / ry
        dx = (self.x - cx) / rx
        return dy * dy + dx * dx <= 1.0

    def overlay(self, state: _SliceState) -> tuple[np.ndarray, np.ndarray]:
        """Bones and vessels of a slice: ``(mask, values)``."""
        if state not in self._overlay:
            b, hu = self.body, self.hu
            values = np.zeros((self.y.shape[0], self.x.shape[1]), dtype=np.int16)
            mask = np.zeros(values.shape, dtype=bool)

            def paint(region: np.ndarray, value: int) -> None:
                values[region] = value
                mask[region] = True

            def bone(cy: float, cx: float, ry: float, rx: float, wall: float) -> None:
                """Cortical shell ``wall`` thick (relative) around cancellous bone."""
                paint(self._ellipse(cy, cx, ry, rx), hu["bone_cortex"])
                paint(self._ellipse(cy, cx, ry * (1 - wall), rx * (1 - wall)), hu["bone_marrow"])

            vb_r = 0.13 * b.half_x_mm  # vertebral body radius
            vb_y = b.half_y_mm * 0.42
            sx = self.spine_x_mm
            if state.disc:
                paint(self._ellipse(vb_y, sx, vb_r * 0.9, vb_r), hu["disc"])
            else:
                bone(vb_y, sx, vb_r * 0.9, vb_r, wall=0.17)
            canal_y = vb_y + vb_r * 0.9 + vb_r * 0.45
            paint(self._ellipse(canal_y, sx, vb_r * 0.6, vb_r * 0.9), hu["bone_cortex"])
            paint(self._ellipse(canal_y, sx, vb_r * 0.4, vb_r * 0.45), hu["csf"])
            paint(
                self._ellipse(canal_y + vb_r * 0.8, sx, vb_r * 0.45, vb_r * 0.18), hu["bone_cortex"]
            )
            vessel_y = vb_y - vb_r * 0.9 - 0.09 * b.half_x_mm
            r_aorta = 0.07 * b.half_x_mm
            paint(self._ellipse(vessel_y, sx + 0.13 * b.half_x_mm, r_aorta, r_aorta), hu["aorta"])
            paint(
                self._ellipse(
                    vessel_y, sx - 0.16 * b.half_x_mm, 0.06 * b.half_x_mm, 0.08 * b.half_x_mm
                ),
                hu["vena_cava"],
            )
            scale = 0.95 + 0.1 * state.level / max(self.SCALE_LEVELS - 1, 1)
            if state.rib_phase >= 0:
                r = self._r(b.muscle_scale * scale)
                ring = (r <= 1.0) & (r >= 1.0 - 0.045)
                angle = np.arctan2(self.y - b.center_y_mm, self.x)  # -pi/2 is anterior
                phase = self.rib_offset + 2 * math.pi * state.rib_phase / self.RIB_PHASES
                dots = np.cos(self.n_ribs * angle + phase) > 0.55
                not_front = np.abs(angle + math.pi / 2) > math.radians(35)
                paint(ring & dots & not_front, hu["bone_cortex"])
            if state.sternum:
                front = -b.half_y_mm * b.muscle_scale * scale * 0.97
                bone(front, 0.0, 0.045 * b.half_y_mm, 0.09 * b.half_x_mm, wall=0.3)
            if state.pelvis:
                # Iliac wings: long thin plates, tilted so their front ends point outwards,
                # flaring wider towards the top of the pelvis.
                flare = (state.pelvis - 1) / max(self.PELVIS_LEVELS - 1, 1)
                for side in (-1.0, 1.0):
                    theta = side * math.radians(30 + 15 * flare)
                    dy = self.y - b.center_y_mm - 0.15 * b.half_y_mm
                    dx = self.x - side * (0.45 + 0.15 * flare) * b.half_x_mm
                    length = (0.28 + 0.14 * flare) * b.half_y_mm
                    along = (math.cos(theta) * dy + math.sin(theta) * dx) / length
                    across = (-math.sin(theta) * dy + math.cos(theta) * dx) / (0.06 * b.half_x_mm)
                    q = along * along + across * across
                    paint(q <= 1.0, hu["bone_cortex"])
                    paint(q <= 0.4, hu["bone_marrow"])
            self._overlay[state] = (mask, values)
        return self._overlay[state]


class _SliceState(NamedTuple):
    """What a slice's templates depend on."""

    level: int  # body scale level
    disc: bool  # intervertebral disc (else vertebral body)
    rib_phase: int  # -1: no ribs
    sternum: bool
    pelvis: int  # 0: above the pelvis, 1..PELVIS_LEVELS: bottom to top of the iliac wings


def _slice_states(rng: np.random.Generator, frame: Frame) -> list[_SliceState]:
    """The template state of every slice, from feet (z index 0 when not flipped) to head."""
    axis = frame.axes[0]
    ez = axis.extent_mm
    z = axis.coords_mm().astype(np.float64)  # canonical: -ez/2 (feet) .. +ez/2 (head)
    frac = z / ez + 0.5
    wave = np.sin(2 * math.pi * (frac * rng.uniform(0.6, 1.4) + rng.uniform(0, 1)))
    levels = np.clip(
        np.round((wave + 1) / 2 * (_SliceTemplates.SCALE_LEVELS - 1)),
        0,
        _SliceTemplates.SCALE_LEVELS - 1,
    ).astype(int)
    n_vertebrae = int(np.clip(round(ez / 28.0), 3, 24))
    period = ez / n_vertebrae
    offset = float(rng.uniform(0, period))
    phase = ((z + offset) % period) / period
    # A disc is about a fifth of a vertebral period but at least one slice thick.
    disc_width = max(0.2, min(0.45, axis.spacing_mm / period))
    discs = phase < disc_width
    rib_phase = np.where(
        (frac > 0.35) & (np.sin(2 * math.pi * phase * 2) > -0.2),
        np.floor(phase * _SliceTemplates.RIB_PHASES).astype(int) % _SliceTemplates.RIB_PHASES,
        -1,
    )
    sternum = frac > 0.62
    in_pelvis = (frac > 0.03) & (frac < 0.24)
    n_pelvis = _SliceTemplates.PELVIS_LEVELS
    pelvis = np.where(
        in_pelvis, 1 + np.clip(np.floor((frac - 0.03) / 0.21 * n_pelvis), 0, n_pelvis - 1), 0
    )
    return [
        _SliceState(int(a), bool(b), int(c), bool(d), int(e))
        for a, b, c, d, e in zip(levels, discs, rib_phase, sternum, pelvis, strict=True)
    ]


def _organ_blobs(rng: np.random.Generator, frame: Frame, body: _Body) -> dict[str, list[Blob]]:
    """Shapes of the 3-D structures, in painting order (later ones cover earlier ones)."""
    ez = frame.extent_zyx_mm[0]
    bx, by, cy0, cx0 = body.half_x_mm, body.half_y_mm, body.center_y_mm, body.center_x_mm

    def jit(v: float, rel: float = 0.06) -> float:
        return v * float(rng.uniform(1 - rel, 1 + rel))

    def blob(
        z: float,
        y: float,
        x: float,
        rz: float,
        ry: float,
        rx: float,
        angle_deg: float = 0.0,
        wobble: float = 0.06,
    ) -> Blob:
        return Blob(
            center_zyx_mm=((jit(z, 0.03) - 0.5) * ez, cy0 + jit(y) * by, cx0 + jit(x) * bx),
            # A short z field of view (a thin slab) must not squash organs into discs.
            radii_zyx_mm=(
                max(jit(rz) * ez, 0.7 * min(ry * by, rx * bx)),
                jit(ry) * by,
                jit(rx) * bx,
            ),
            angle_rad=math.radians(angle_deg + float(rng.uniform(-8, 8))),
            wobbles=random_wobbles(rng, wobble, n=2, k_range=(1.5, 3.5)),
        )

    # Patient's right is -x (LPS), anterior is -y, superior is +z.
    structures: dict[str, list[Blob]] = {
        "lung_right": [blob(0.84, -0.02, -0.42, 0.32, 0.56, 0.30, wobble=0.04)],
        "lung_left": [blob(0.84, 0.0, 0.43, 0.31, 0.54, 0.28, wobble=0.04)],
        "heart": [blob(0.72, -0.35, 0.10, 0.09, 0.30, 0.28)],
        "liver": [
            blob(0.56, -0.05, -0.38, 0.13, 0.55, 0.36),
            blob(0.59, -0.40, 0.02, 0.07, 0.25, 0.32, angle_deg=-10),
        ],
        "spleen": [blob(0.57, 0.25, 0.56, 0.07, 0.28, 0.15, angle_deg=35)],
        "kidney_right": [blob(0.43, 0.36, -0.36, 0.075, 0.22, 0.13, angle_deg=-30)],
        "kidney_left": [blob(0.45, 0.36, 0.37, 0.075, 0.22, 0.13, angle_deg=30)],
        "pancreas": [blob(0.48, 0.02, 0.08, 0.035, 0.09, 0.32, angle_deg=12)],
        "bladder": [blob(0.06, -0.25, 0.0, 0.06, 0.28, 0.22)],
    }
    n_gas = int(rng.integers(3, 9))
    structures["gas"] = [
        Blob(
            center_zyx_mm=(
                (rng.uniform(0.08, 0.38) - 0.5) * ez,
                cy0 + rng.uniform(-0.6, 0.1) * by,
                cx0 + rng.uniform(-0.55, 0.55) * bx,
            ),
            radii_zyx_mm=(
                rng.uniform(0.01, 0.03) * ez,
                rng.uniform(0.05, 0.12) * by,
                rng.uniform(0.05, 0.12) * bx,
            ),
            wobbles=random_wobbles(rng, 0.1, n=2),
        )
        for _ in range(n_gas)
    ]
    return structures


#: Structure -> tissue intensity key.
_TISSUE_OF = {
    "lung_right": "lung",
    "lung_left": "lung",
    "heart": "heart",
    "liver": "liver",
    "spleen": "spleen",
    "kidney_right": "kidney",
    "kidney_left": "kidney",
    "pancreas": "pancreas",
    "bladder": "bladder",
    "gas": "gas",
}
#: Structures that can host lesions.
LESION_ORGANS = (
    "liver",
    "spleen",
    "kidney_right",
    "kidney_left",
    "pancreas",
    "lung_right",
    "lung_left",
)


class _SmoothField:
    """A smooth 3-D random field, evaluated slice by slice from a coarse grid.

    Values on a grid of ``cell_mm`` cells are interpolated trilinearly with element-wise
    operations only (no BLAS: exactly reproducible, and no thread pool to contend for);
    a 512x512 slice costs about a millisecond.
    """

    def __init__(self, rng: np.random.Generator, frame: Frame, cell_mm: float):
        ez, ey, ex = frame.extent_zyx_mm
        self.cell_mm = cell_mm
        shape = tuple(math.ceil(e / cell_mm) + 2 for e in (ez, ey, ex))
        self.grid = rng.standard_normal(shape).astype(np.float32)
        self.ez = ez
        self.iy, self.wy = self._cells(frame.axes[1].coords_mm() + ey / 2, shape[1])
        self.ix, self.wx = self._cells(frame.axes[2].coords_mm() + ex / 2, shape[2])

    def _cells(self, coords_mm: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Lower grid index and the weight of the upper neighbour for each coordinate."""
        g = np.clip(coords_mm / np.float32(self.cell_mm), 0, n - 1.001)
        i0 = np.floor(g).astype(np.intp)
        return i0, (g - i0).astype(np.float32)

    def slice(self, z_mm: float) -> np.ndarray:
        """The field on the slice at canonical ``z_mm`` (float32, shape (y, x))."""
        g = min(max((z_mm + self.ez / 2) / self.cell_mm, 0.0), self.grid.shape[0] - 1.001)
        i0 = int(g)
        w = np.float32(g - i0)
        plane = (1 - w) * self.grid[i0] + w * self.grid[i0 + 1]
        wy = self.wy[:, None]
        rows = (1 - wy) * plane[self.iy] + wy * plane[self.iy + 1]  # (y, grid x)
        return (1 - self.wx) * rows[:, self.ix] + self.wx * rows[:, self.ix + 1]


def _paint_mesentery(
    rng: np.random.Generator, frame: Frame, body: _Body, image: np.ndarray, hu: dict[str, int]
) -> None:
    """Turn part of the abdominal soft tissue into fat: bowel loops in mesenteric fat."""
    field = _SmoothField(rng, frame, cell_mm=0.11 * body.half_x_mm)
    fat_fraction = float(rng.uniform(0.25, 0.5))
    # Trilinear interpolation of unit normals has a standard deviation of about 0.55.
    threshold = 0.55 * float(_normal_quantile(1 - fat_fraction))
    axis = frame.axes[0]
    for z in range(axis.size):
        z_mm = axis.coord_of(z)
        frac = z_mm / axis.extent_mm + 0.5
        if frac > 0.62:
            continue  # the thorax has mediastinum, not bowel
        # Fade out towards the diaphragm.
        t = threshold + max(0.0, (frac - 0.5) * 15)
        plane = image[z]
        np.copyto(
            plane, np.int16(hu["fat"]), where=(field.slice(z_mm) > t) & (plane == hu["soft_tissue"])
        )


def _normal_quantile(p: float) -> float:
    """Inverse of the standard normal CDF, by bisection on ``math.erf``."""
    lo, hi = -8.0, 8.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if 0.5 * (1 + math.erf(mid / math.sqrt(2))) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def build_anatomy(rng: np.random.Generator, frame: Frame) -> Anatomy:
    """Paint a noise-free trunk into a new int16 (z, y, x) volume.

    Args:
        rng: random generator (consumed in a fixed order, so the result is deterministic).
        frame: the case's axes (shape, spacing, flips).

    Returns:
        The image, the per-case tissue intensities and the lesion-hosting organs.
    """
    hu = draw_intensities(rng)
    body = _draw_body(rng, frame)
    templates = _SliceTemplates(rng, frame, body, hu)
    states = _slice_states(rng, frame)
    structures = _organ_blobs(rng, frame, body)

    image = np.empty(frame.shape_zyx, dtype=np.int16)
    for z, state in enumerate(states):
        image[z] = templates.base(state.level)
    _paint_mesentery(rng, frame, body, image, hu)
    # Organs only inside the body's soft-tissue core, so none sticks out of the skin.
    for name, blobs in structures.items():
        box, mask = union_mask(blobs, frame)
        if mask.size == 0 or not mask.any():
            continue
        region = image[box]
        inside = region != hu["air"]
        np.copyto(region, np.int16(hu[_TISSUE_OF[name]]), where=mask & inside)
    for z, state in enumerate(states):
        mask, values = templates.overlay(state)
        np.copyto(image[z], values, where=mask)
    organs = [
        Organ(name=n, tissue=_TISSUE_OF[n], hu=hu[_TISSUE_OF[n]], blobs=tuple(structures[n]))
        for n in LESION_ORGANS
    ]
    # Abdominal soft tissue hosts lymph-node-like lesions; its blob is the body cavity.
    cavity = Blob(
        center_zyx_mm=(0.0, body.center_y_mm, body.center_x_mm),
        radii_zyx_mm=(
            frame.extent_zyx_mm[0] / 2,
            body.half_y_mm * body.muscle_scale * 0.9,
            body.half_x_mm * body.muscle_scale * 0.9,
        ),
    )
    organs.append(Organ("soft_tissue", "soft_tissue", hu["soft_tissue"], (cavity,)))
    return Anatomy(image=image, hu=hu, organs=organs)
