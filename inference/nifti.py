"""NIfTI input/output with the geometry kept exactly: the one place that touches image files.

Arrays are in SimpleITK's numpy order (z, y, x), the order nnU-Net's ``SimpleITKIO`` uses.
Geometry is kept in SimpleITK's own order (x, y, z) so that an output written with it
matches the input to the bit. This module imports no torch, so the profiler, the
evaluation and the training tools can share it without the inference stack.

SimpleITK (through niftilib) is lenient in two ways that would hide a broken input, so
reading also looks at the NIfTI header itself (:func:`read_header`):

* a ``.nii.gz`` whose data is cut short reads without error, the missing voxels set to 0;
  :func:`read_image` compares the data length with the header and refuses such files;
* NaN and Inf voxels of float images are silently replaced by 0; :func:`read_image` puts
  them back, so that the caller sees (and can report) them.
"""

from __future__ import annotations

import os
import re
import struct
import zlib
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


#: NIfTI datatype codes of floating-point voxels (the only ones that can hold NaN or Inf).
FLOAT_DATATYPES = {16: "f4", 64: "f8"}
_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK_BYTES = 4 * 2**20


@dataclass(frozen=True)
class NiftiHeader:
    """The fields of a NIfTI-1 or NIfTI-2 header that tell whether a file is complete and sane.

    Attributes:
        version: 1 or 2.
        dim: voxels per axis, ``dim[1..dim[0]]`` of the header (x, y, z, t, ...).
        pixdim: voxel size per axis as stored, same axes; SimpleITK turns 0 or NaN into
            1.0 and negative values into positive ones (with a flipped direction).
        datatype: NIfTI datatype code (4 = int16, 16 = float32, ...).
        bitpix: bits per voxel.
        vox_offset: where the voxel data starts in the (decompressed) file, in bytes.
        byte_order: ``"<"`` or ``">"``.
        compressed: the file is gzip-compressed.
        single_file: the data follows the header in the same file (``n+1``/``n+2``).
    """

    version: int
    dim: tuple[int, ...]
    pixdim: tuple[float, ...]
    datatype: int
    bitpix: int
    vox_offset: int
    byte_order: str
    compressed: bool
    single_file: bool

    @property
    def n_voxels(self) -> int | None:
        """Number of voxel values (all axes), or None when ``dim`` is not valid."""
        if not self.dim or any(d < 1 for d in self.dim):
            return None
        n = 1
        for d in self.dim:
            n *= d
        return n

    @property
    def data_bytes(self) -> int | None:
        """Length of the voxel data in bytes, or None when the header does not say."""
        n = self.n_voxels
        if n is None or self.bitpix <= 0 or self.bitpix % 8:
            return None
        return n * self.bitpix // 8


def read_header(path: str | os.PathLike) -> NiftiHeader | None:
    """Parse the NIfTI header of ``path`` (plain or gzip-compressed).

    Returns:
        The header, or None when the file does not start with a NIfTI-1/2 header (it may
        still be an image SimpleITK can read in another format).

    Raises:
        NiftiError: the file is missing, empty, or ends inside the header.
    """
    _check_readable(path)
    with open(path, "rb") as f:
        compressed = f.read(2) == _GZIP_MAGIC
    try:
        if compressed:
            head = _gzip_prefix(path, 544)
        else:
            with open(path, "rb") as f:
                head = f.read(544)
    except (OSError, zlib.error, EOFError) as err:
        raise NiftiError(f"not a readable gzip file ({err})") from None
    for order in "<>":
        if len(head) >= 4 and struct.unpack(order + "i", head[:4])[0] in (348, 540):
            break
    else:
        return None
    version = 1 if struct.unpack(order + "i", head[:4])[0] == 348 else 2
    needed = 348 if version == 1 else 540
    if len(head) < needed:
        raise NiftiError(f"truncated file: it ends inside the NIfTI header ({len(head)} bytes)")
    if version == 1:
        dims = struct.unpack_from(order + "8h", head, 40)
        datatype, bitpix = struct.unpack_from(order + "2h", head, 70)
        pixdim = struct.unpack_from(order + "8f", head, 76)
        vox_offset = int(struct.unpack_from(order + "f", head, 108)[0])
        magic = head[344:348]
        single_file, minimum_offset = magic == b"n+1\0", 348
    else:
        datatype, bitpix = struct.unpack_from(order + "2h", head, 12)
        dims = struct.unpack_from(order + "8q", head, 16)
        pixdim = struct.unpack_from(order + "8d", head, 104)
        vox_offset = struct.unpack_from(order + "q", head, 168)[0]
        single_file, minimum_offset = head[4:8] == b"n+2\0", 540
    n_dims = dims[0] if 1 <= dims[0] <= 7 else 0
    return NiftiHeader(
        version=version,
        dim=tuple(int(d) for d in dims[1 : 1 + n_dims]),
        pixdim=tuple(float(p) for p in pixdim[1 : 1 + n_dims]),
        datatype=int(datatype),
        bitpix=int(bitpix),
        # niftilib never reads voxels from inside the header, whatever vox_offset says
        vox_offset=max(int(vox_offset), minimum_offset),
        byte_order=order,
        compressed=compressed,
        single_file=single_file,
    )


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

    NIfTI files are checked against their header: data shorter than the header announces
    is refused (SimpleITK would fill it with zeros), and the NaN/Inf voxels of float images
    are returned as stored (SimpleITK turns them into zeros). That costs a second pass over
    the data of float images only; integer images cost one read of the gzip trailer.

    Raises:
        NiftiError: the file is missing, empty, truncated or not a readable image.
    """
    header = read_header(path)
    if header is None and str(path).endswith((".nii", ".nii.gz")):
        raise NiftiError("not a NIfTI file (no NIfTI-1/2 header at its start)")
    has_data = header is not None and header.single_file and header.data_bytes is not None
    scan_floats = has_data and header.datatype in FLOAT_DATATYPES
    if has_data and not scan_floats:
        _check_data_length(path, header)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise NiftiError(f"not a readable NIfTI image ({_first_line(err)})") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise NiftiError(
            f"expected one value per voxel, found {image.GetNumberOfComponentsPerPixel()}"
        )
    array = sitk.GetArrayFromImage(image)
    if scan_floats:
        _restore_non_finite(path, header, array)
    return array, geometry_of(image)


def _gzip_prefix(path: str | os.PathLike, n_bytes: int) -> bytes:
    """The first ``n_bytes`` of the decompressed stream (fewer if it ends early)."""
    out = bytearray()
    for chunk in _payload(path, compressed=True, chunk_bytes=64 * 1024):
        out += chunk
        if len(out) >= n_bytes:
            break
    return bytes(out[:n_bytes])


def _payload(path: str | os.PathLike, compressed: bool, chunk_bytes: int = _CHUNK_BYTES):
    """Yield the (decompressed) bytes of a file in chunks; stops quietly where data ends.

    Concatenated gzip members (pigz, bgzip) are followed; a stream cut short or corrupt
    simply ends, the caller compares the length it got with the length it needs.
    """
    with open(path, "rb") as f:
        if not compressed:
            while chunk := f.read(chunk_bytes):
                yield chunk
            return
        inflater = zlib.decompressobj(wbits=31)
        while raw := f.read(chunk_bytes):
            while raw:
                try:
                    out = inflater.decompress(raw)
                except zlib.error:
                    return
                if out:
                    yield out
                if not inflater.eof:
                    break
                raw = inflater.unused_data
                inflater = zlib.decompressobj(wbits=31)


def _check_data_length(path: str | os.PathLike, header: NiftiHeader) -> None:
    """Refuse a file whose voxel data is shorter than its header announces."""
    needed = header.vox_offset + header.data_bytes
    if not header.compressed:
        size = Path(path).stat().st_size
    else:
        # Fast path: a gzip file ends with the length of its data modulo 2**32, so a
        # complete single-member file is recognised from its last 4 bytes.
        with open(path, "rb") as f:
            f.seek(-4, os.SEEK_END)
            if struct.unpack("<I", f.read(4))[0] == needed % 2**32:
                return
        size = 0
        for chunk in _payload(path, compressed=True):
            size += len(chunk)
            if size >= needed:
                return
    if size < needed:
        _raise_truncated(size, header)


def _raise_truncated(size: int, header: NiftiHeader) -> None:
    have = max(0, size - header.vox_offset)
    raise NiftiError(
        f"truncated file: {have} of {header.data_bytes} bytes of voxel data "
        f"({100.0 * have / max(1, header.data_bytes):.0f}%)"
    )


def _restore_non_finite(path: str | os.PathLike, header: NiftiHeader, array: np.ndarray) -> None:
    """Check the data length and put back the NaN/Inf voxels that SimpleITK set to 0.

    The voxel order of a NIfTI file (x fastest) is the C order of SimpleITK's (z, y, x)
    array, so the n-th stored value is ``array.flat[n]``.
    """
    dtype = np.dtype(header.byte_order + FLOAT_DATATYPES[header.datatype])
    restore = array.size == header.n_voxels and np.issubdtype(array.dtype, np.floating)
    flat = array.reshape(-1)
    skip, size, n_done, carry = header.vox_offset, 0, 0, b""
    for chunk in _payload(path, header.compressed):
        size += len(chunk)
        if skip:
            chunk, skip = chunk[skip:], max(0, skip - len(chunk))
        data = carry + chunk
        usable = len(data) - len(data) % dtype.itemsize
        values = np.frombuffer(data, dtype=dtype, count=usable // dtype.itemsize)
        carry = data[usable:]
        bad = np.flatnonzero(~np.isfinite(values))
        if restore and bad.size:
            bad = bad[n_done + bad < flat.size]
            flat[n_done + bad] = values[bad]
        n_done += values.size
    if size < header.vox_offset + header.data_bytes:
        _raise_truncated(size, header)


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


#: Temporary names made by :func:`atomic_path`: ``.<stem>.tmp<pid><suffix>``.
_TEMPORARY = re.compile(r"^\..+\.tmp(\d+)(\.nii\.gz|\.[^.]*)?$")


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete what killed runs left behind: temporary files of :func:`atomic_path`.

    A process killed while writing (SIGKILL, a container stopped) cannot remove its
    temporary file. Files of processes that still run are kept, except those of this
    process, which has not started writing yet when it calls this.

    Returns:
        The files removed.
    """
    removed = []
    for entry in Path(folder).iterdir():
        match = _TEMPORARY.match(entry.name)
        if not match or not entry.is_file():
            continue
        pid = int(match.group(1))
        if pid != os.getpid() and _process_exists(pid):
            continue
        try:
            entry.unlink()
            removed.append(entry)
        except OSError:
            pass
    return removed


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


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
