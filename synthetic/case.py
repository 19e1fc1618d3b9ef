"""One synthetic FLARE-like case: anatomy + lesions + noise, its labels and its geometry."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from inference.nifti import Geometry
from synthetic.anatomy import build_anatomy
from synthetic.lesions import Lesion, place_lesions
from synthetic.spatial import choose_frame

KINDS = ("full", "partial", "unlabeled")
MAX_LESIONS = 6
#: CT values are stored with this floor (scanner air clipped at -1024).
HU_MIN, HU_MAX = -1024, 3071


@dataclass
class SyntheticCase:
    """A generated case.

    Attributes:
        image: int16 HU, (z, y, x).
        label: uint8 {0, 1} (z, y, x): the complete ground truth, every lesion.
        shipped_label: what a dataset ships: the same array as ``label`` for "full", a
            strict subset (fewer lesions) for "partial", None for "unlabeled".
        geometry: spacing, origin and direction to write the arrays with.
        kind: "full", "partial" or "unlabeled".
        lesions: one dict per lesion: organ, center_zyx_vox, diameter_mm (bounding
            diameter, physical), contrast_hu (signed HU difference to the organ),
            density ("hypo"/"hyper"), organ_hu, n_voxels, labeled (in shipped_label).
        info: generation details (seed, orientation, noise level).
    """

    image: np.ndarray
    label: np.ndarray
    shipped_label: np.ndarray | None
    geometry: Geometry
    kind: str
    lesions: list[dict]
    info: dict = field(default_factory=dict)


def _noise_bank(rng: np.random.Generator, n_pixels: int, sigma_hu: float) -> np.ndarray:
    """Slightly correlated int16 Gaussian noise; slices take shifted windows of it.

    A bank of a few slices' worth, read at a random offset per slice, costs one add per
    voxel instead of drawing 145 M normal numbers for a 512x512x554 case.
    """
    white = rng.standard_normal(4 * n_pixels + 4096, dtype=np.float32)
    # Neighbour averaging gives the fine-grained correlation of reconstructed CT noise.
    smooth = (white[:-2] + white[1:-1] + white[2:]) / np.float32(np.sqrt(3.0))
    return np.rint(smooth * np.float32(sigma_hu)).astype(np.int16)


def _add_noise(rng: np.random.Generator, image: np.ndarray, sigma_hu: float) -> None:
    n_pixels = image.shape[1] * image.shape[2]
    bank = _noise_bank(rng, n_pixels, sigma_hu)
    offsets = rng.integers(0, bank.size - n_pixels, size=image.shape[0])
    for z, offset in enumerate(offsets):
        flat = image[z].reshape(-1)
        flat += bank[offset : offset + n_pixels]
    np.clip(image, HU_MIN, HU_MAX, out=image)


def _choose_labeled(rng: np.random.Generator, lesions: list[Lesion], kind: str) -> list[bool]:
    if kind == "full":
        return [True] * len(lesions)
    if kind == "unlabeled":
        return [False] * len(lesions)
    # Partial, as in FLARE24: the main (largest) lesion is annotated, at least one is not.
    order = sorted(range(len(lesions)), key=lambda i: -int(lesions[i].mask.sum()))
    labeled = [False] * len(lesions)
    labeled[order[0]] = True
    for i in order[1:-1]:
        labeled[i] = bool(rng.random() < 0.4)
    return labeled


def _paint_labels(shape: tuple[int, ...], lesions: list[Lesion], which: list[bool]) -> np.ndarray:
    label = np.zeros(shape, dtype=np.uint8)
    for lesion, keep in zip(lesions, which, strict=True):
        if keep:
            label[lesion.box][lesion.mask] = 1
    return label


def generate_case(
    seed: int,
    shape_zyx: tuple[int, int, int] = (48, 96, 96),
    spacing_zyx_mm: tuple[float, float, float] | None = None,
    kind: str = "full",
    n_lesions: int | None = None,
    oblique: bool | None = None,
) -> SyntheticCase:
    """Generate one CT-like case with lesions, deterministically from ``seed``.

    Args:
        seed: the same seed (and arguments) gives identical arrays and geometry.
        shape_zyx: array shape, from tiny test volumes to 512x512x554.
        spacing_zyx_mm: voxel size; None draws a realistic one (in-plane 0.6-0.9 mm,
            z 0.8-5 mm).
        kind: "full" (all lesions labeled), "partial" (at least one lesion labeled and at
            least one left out of ``shipped_label``) or "unlabeled" (no shipped label).
        n_lesions: number of lesions; None draws 0-6 (2-6 for "partial").
        oblique: non-identity direction (axis flips or a small rotation); None: about one
            case in four.

    Returns:
        The case.

    Raises:
        ValueError: an unknown kind, or a lesion count outside 0-6 (2-6 for "partial").
        RuntimeError: the volume has no room for the requested lesions.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    low = 2 if kind == "partial" else 0
    rng = np.random.default_rng(seed)
    if n_lesions is None:
        n_lesions = int(rng.integers(low, MAX_LESIONS + 1))
    elif not low <= n_lesions <= MAX_LESIONS:
        raise ValueError(
            f"n_lesions must be in {low}..{MAX_LESIONS} for kind {kind!r}, got {n_lesions}"
        )
    frame = choose_frame(rng, tuple(int(s) for s in shape_zyx), spacing_zyx_mm, oblique)  # type: ignore[arg-type]
    anatomy = build_anatomy(rng, frame)
    image = anatomy.image
    label = np.zeros(image.shape, dtype=np.uint8)
    lesions = place_lesions(rng, frame, image, anatomy.organs, n_lesions, label=label)
    sigma_hu = float(rng.uniform(8.0, 16.0))
    _add_noise(rng, image, sigma_hu)

    labeled = _choose_labeled(rng, lesions, kind)
    if kind == "full":
        shipped: np.ndarray | None = label
    elif kind == "partial":
        shipped = _paint_labels(image.shape, lesions, labeled)
    else:
        shipped = None
    return SyntheticCase(
        image=image,
        label=label,
        shipped_label=shipped,
        geometry=frame.geometry,
        kind=kind,
        lesions=[lesion.record(keep) for lesion, keep in zip(lesions, labeled, strict=True)],
        info={
            "seed": int(seed),
            "orientation": frame.orientation,
            "noise_sigma_hu": round(sigma_hu, 2),
        },
    )
