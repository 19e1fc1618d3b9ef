"""Rasterising smooth blobs: ellipsoids whose radius wobbles at low angular frequency.

Every shape is evaluated only inside its own bounding box, with float32 broadcasts of 1-D
coordinate vectors, so a large organ in a 512x512x554 volume costs a few million voxels of
work, never a full-volume temporary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from synthetic.spatial import Frame

Box = tuple[slice, slice, slice]


@dataclass(frozen=True)
class Wobble:
    """One low-frequency radius perturbation: ``amplitude * sin(k * (u . axis) + phase)``.

    ``u`` is the unit direction from the blob centre (in the blob's normalised frame), so
    the perturbation is a smooth function on the sphere with about ``k / pi`` bumps.
    """

    axis_zyx: tuple[float, float, float]
    k: float
    phase: float
    amplitude: float


@dataclass(frozen=True)
class Blob:
    """An ellipsoid in the canonical mm frame, rotated in-plane, with a wobbling radius.

    Attributes:
        center_zyx_mm: centre in canonical mm.
        radii_zyx_mm: semi-axes in mm before rotation.
        angle_rad: in-plane rotation (about z).
        wobbles: low-frequency radius perturbations; their amplitudes add up to at most
            ``max_wobble``, so the blob stays inside ``radii * (1 + max_wobble)``.
    """

    center_zyx_mm: tuple[float, float, float]
    radii_zyx_mm: tuple[float, float, float]
    angle_rad: float = 0.0
    wobbles: tuple[Wobble, ...] = field(default_factory=tuple)

    @property
    def max_wobble(self) -> float:
        """Largest relative radius change of the perturbation."""
        return sum(abs(w.amplitude) for w in self.wobbles)

    @property
    def bound_radii_zyx_mm(self) -> np.ndarray:
        """Half-size of an axis-aligned box that contains the blob."""
        rz, ry, rx = self.radii_zyx_mm
        c, s = abs(math.cos(self.angle_rad)), abs(math.sin(self.angle_rad))
        half = (
            np.array([rz, c * ry + s * rx, s * ry + c * rx])
            if self.angle_rad
            else np.array([rz, ry, rx])
        )
        return half * (1.0 + self.max_wobble)

    def box(self, frame: Frame) -> Box:
        """Array slices of the blob's bounding box (clipped to the array)."""
        centre = np.asarray(self.center_zyx_mm)
        half = self.bound_radii_zyx_mm
        return frame.box(centre - half, centre + half)

    def mask(self, frame: Frame, box: Box | None = None) -> tuple[Box, np.ndarray]:
        """Voxels inside the blob.

        Args:
            frame: the case's axes.
            box: evaluate in this box instead of the blob's own bounding box.

        Returns:
            ``(box, mask)``: the array slices and a bool mask of that box's shape.
        """
        box = self.box(frame) if box is None else box
        cz, cy, cx = (np.float32(c) for c in self.center_zyx_mm)
        rz, ry, rx = (np.float32(r) for r in self.radii_zyx_mm)
        dz = (frame.axes[0].coords_mm(box[0]) - cz)[:, None, None]
        dy = (frame.axes[1].coords_mm(box[1]) - cy)[None, :, None]
        dx = (frame.axes[2].coords_mm(box[2]) - cx)[None, None, :]
        nz = dz / rz
        if self.angle_rad:
            c, s = np.float32(math.cos(self.angle_rad)), np.float32(math.sin(self.angle_rad))
            ny = (c * dy - s * dx) / ry
            nx = (s * dy + c * dx) / rx
        else:
            ny, nx = dy / ry, dx / rx
        q = nz * nz + ny * ny + nx * nx  # squared normalised radius
        if not self.wobbles:
            return box, q <= 1.0
        # Only the shell that the wobble can move needs the (costly) angular term.
        outer = (1.0 + self.max_wobble) ** 2
        mask = q <= (1.0 - self.max_wobble) ** 2
        shell = (q <= outer) & ~mask
        if not shell.any():
            return box, mask
        idx = np.nonzero(shell)
        nzs, nys, nxs = (np.broadcast_to(a, q.shape)[idx] for a in (nz, ny, nx))
        qs = q[idx]
        inv = 1.0 / np.sqrt(np.maximum(qs, np.float32(1e-12)))
        factor = np.ones_like(qs)
        for w in self.wobbles:
            u = (nzs * w.axis_zyx[0] + nys * w.axis_zyx[1] + nxs * w.axis_zyx[2]) * inv
            factor += np.float32(w.amplitude) * np.sin(np.float32(w.k) * u + np.float32(w.phase))
        mask[idx] = qs <= factor * factor
        return box, mask


def random_wobbles(
    rng: np.random.Generator,
    total_amplitude: float,
    n: int = 3,
    k_range: tuple[float, float] = (2.0, 5.0),
) -> tuple[Wobble, ...]:
    """``n`` random low-frequency perturbations whose amplitudes sum to ``total_amplitude``."""
    weights = rng.uniform(0.5, 1.0, size=n)
    weights *= total_amplitude / weights.sum()
    wobbles = []
    for amp in weights:
        axis = rng.normal(size=3)
        axis /= np.linalg.norm(axis)
        wobbles.append(
            Wobble(
                axis_zyx=tuple(float(a) for a in axis),  # type: ignore[arg-type]
                k=float(rng.uniform(*k_range)),
                phase=float(rng.uniform(0, 2 * math.pi)),
                amplitude=float(amp),
            )
        )
    return tuple(wobbles)


def union_box(boxes: list[Box]) -> Box:
    """The smallest box containing all ``boxes`` (empty boxes are ignored)."""
    live = [b for b in boxes if all(s.stop > s.start for s in b)]
    if not live:
        return (slice(0, 0), slice(0, 0), slice(0, 0))
    return tuple(  # type: ignore[return-value]
        slice(min(b[i].start for b in live), max(b[i].stop for b in live)) for i in range(3)
    )


def union_mask(blobs: list[Blob], frame: Frame) -> tuple[Box, np.ndarray]:
    """Rasterise the union of several blobs in their common bounding box."""
    box = union_box([b.box(frame) for b in blobs])
    shape = tuple(s.stop - s.start for s in box)
    mask = np.zeros(shape, dtype=bool)
    if 0 in shape:
        return box, mask
    for blob in blobs:
        sub = blob.box(frame)
        if any(s.stop <= s.start for s in sub):
            continue
        _, m = blob.mask(frame, sub)
        local = tuple(
            slice(s.start - b.start, s.stop - b.start) for s, b in zip(sub, box, strict=True)
        )
        mask[local] |= m
    return box, mask
