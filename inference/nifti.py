"""NIfTI input/output with the geometry kept exactly: the one place that touches image files.

Arrays are in SimpleITK's numpy order (z, y, x), the order nnU-Net's ``SimpleITKIO`` uses.
Geometry is kept in SimpleITK's own order (x, y, z) so that an output written with it
matches the input to the bit. This module imports no torch, so the profiler, the
evaluation and the training tools can share it without the inference stack.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

#: The challenge's image naming: one CT channel per case, ``<case>_0000.nii.gz``.
IMAGE_SUFFIX = "_0000.nii.gz"
#: Label / prediction naming: ``<case>.nii.gz``.
LABEL_SUFFIX = ".nii.gz"


class NiftiError(ValueError):
    """A file that cannot be used as a case; the message is one line for the user."""


@dataclass(frozen=True)
class Geometry:
    """Where an image lies in space, in SimpleITK's (x, y, z) order.

    Attributes:
        size_xyz: number of voxels along x, y, z.
        spacing_xyz_mm: voxel size in mm along x, y, z.
        origin_xyz_mm: physical position of the first voxel in mm.
        direction: the 3x3 direction cosine matrix, row-major, as SimpleITK gives it.
    """

    size_xyz: tuple[int, ...]
    spacing_xyz_mm: tuple[float, ...]
    origin_xyz_mm: tuple[float, ...]
    direction: tuple[float, ...]

    @property
    def shape_zyx(self) -> tuple[int, ...]:
        """Array shape in (z, y, x) order, as numpy sees the image."""
        return tuple(reversed(self.size_xyz))

    @property
    def spacing_zyx_mm(self) -> tuple[float, ...]:
        """Voxel spacing in (z, y, x) order, matching the array axes (nnU-Net's 'spacing')."""
        return tuple(reversed(self.spacing_xyz_mm))

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        """Copy this geometry onto a SimpleITK image (in place) and return it."""
        image.SetSpacing(self.spacing_xyz_mm)
        image.SetOrigin(self.origin_xyz_mm)
        image.SetDirection(self.direction)
        return image

    def mismatch(self, other: Geometry, tolerance: float = 1e-4) -> str | None:
        """Describe the first difference from ``other`` or return None when both agree.

        Args:
            other: the geometry to compare with.
            tolerance: absolute tolerance for spacing (mm), origin (mm) and direction cosines.

        Returns:
            A short reason such as ``"spacing (0.8, 0.8, 5.0) != (0.8, 0.8, 2.5)"``, or None.
        """
        if self.size_xyz != other.size_xyz:
            return f"size {self.size_xyz} != {other.size_xyz}"
        for name in ("spacing_xyz_mm", "origin_xyz_mm", "direction"):
            a, b = getattr(self, name), getattr(other, name)
            if len(a) != len(b) or not np.allclose(a, b, rtol=0.0, atol=tolerance):
                short = name.split("_")[0]
                return f"{short} {_fmt(a)} != {_fmt(b)}"
        return None


def _fmt(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"


def geometry_of(image: sitk.Image) -> Geometry:
    """The geometry of a SimpleITK image (or of a reader after ``ReadImageInformation``)."""
    return Geometry(
        size_xyz=tuple(int(s) for s in image.GetSize()),
        spacing_xyz_mm=tuple(float(s) for s in image.GetSpacing()),
        origin_xyz_mm=tuple(float(o) for o in image.GetOrigin()),
        direction=tuple(float(d) for d in image.GetDirection()),
    )


def read_geometry(path: str | os.PathLike) -> Geometry:
    """Read only the header of an image file.

    Raises:
        NiftiError: the file is missing, empty or not a readable image.
    """
    _check_readable(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        raise NiftiError(f"not a readable NIfTI image ({_first_line(err)})") from None
    return geometry_of(reader)


def read_image(path: str | os.PathLike) -> tuple[np.ndarray, Geometry]:
    """Read an image as a (z, y, x) numpy array in its stored dtype, with its geometry.

    Raises:
        NiftiError: the file is missing, empty, truncated or not a readable image.
    """
    _check_readable(path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise NiftiError(f"not a readable NIfTI image ({_first_line(err)})") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise NiftiError(
            f"expected one value per voxel, found {image.GetNumberOfComponentsPerPixel()}"
        )
    return sitk.GetArrayFromImage(image), geometry_of(image)


def write_image(
    path: str | os.PathLike,
    array_zyx: np.ndarray,
    geometry: Geometry,
    compression_level: int = 1,
) -> Path:
    """Write a (z, y, x) array with ``geometry`` to ``path`` atomically.

    The data goes to a hidden temporary file in the same folder and is renamed into place
    only when complete, so an interrupted run never leaves a partial ``.nii.gz`` behind.

    Args:
        path: destination, normally ``<case>.nii.gz``.
        array_zyx: the voxel values; their dtype is kept (use uint8 for labels).
        geometry: spacing, origin and direction to store; its size must match the array.
        compression_level: gzip level 0-9. Level 1 is several times faster than the
            default 6 and, for sparse label maps, barely larger.

    Returns:
        The final path.
    """
    path = Path(path)
    if tuple(array_zyx.shape) != geometry.shape_zyx:
        raise ValueError(f"array shape {array_zyx.shape} != geometry shape {geometry.shape_zyx}")
    image = geometry.apply_to(sitk.GetImageFromArray(array_zyx))
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, str(tmp), True, compression_level)
    return path


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` (same suffix) and rename it over ``path`` on success.

    On an exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    tmp = path.with_name(f".{path.name[: len(path.name) - len(suffix)]}.tmp{os.getpid()}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@dataclass(frozen=True)
class Case:
    """One input case: its name (``<case>``) and image path (``<case>_0000.nii.gz``)."""

    name: str
    image_path: Path

    def output_path(self, output_dir: str | os.PathLike) -> Path:
        """Where the prediction for this case goes: ``OUTPUT_DIR/<case>.nii.gz``."""
        return Path(output_dir) / f"{self.name}{LABEL_SUFFIX}"


def find_cases(input_dir: str | os.PathLike) -> tuple[list[Case], list[Path]]:
    """List the cases in ``input_dir``.

    Returns:
        ``(cases, ignored)``: the ``*_0000.nii.gz`` files as cases sorted by name, and the
        other visible files, which do not follow the naming and are not predicted.

    Raises:
        NiftiError: the folder does not exist or is not a folder.
    """
    folder = Path(input_dir)
    if not folder.exists():
        raise NiftiError(f"input folder {folder} does not exist")
    if not folder.is_dir():
        raise NiftiError(f"input path {folder} is not a folder")
    cases, ignored = [], []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.name.endswith(IMAGE_SUFFIX) and len(entry.name) > len(IMAGE_SUFFIX):
            cases.append(Case(entry.name[: -len(IMAGE_SUFFIX)], entry))
        else:
            ignored.append(entry)
    return cases, ignored


def _check_readable(path: str | os.PathLike) -> None:
    path = Path(path)
    if not path.is_file():
        raise NiftiError(f"file {path} does not exist")
    if path.stat().st_size == 0:
        raise NiftiError("empty file")


def _first_line(err: Exception) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    # ITK messages start with a file:line banner; the description is the useful part.
    for ln in lines:
        if ln.lower().startswith("description:"):
            return ln.split(":", 1)[1].strip()
    return lines[-1] if lines else type(err).__name__
