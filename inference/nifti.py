"""The NIfTI format: headers, geometry, reading and writing images, checking their data.

This is the one place that touches image files, with the geometry kept exactly.

Arrays are in SimpleITK's numpy order (z, y, x), the order nnU-Net's ``SimpleITKIO`` uses.
Geometry is kept in SimpleITK's own order (x, y, z) so that an output written with it
matches the input to the bit. This module imports no torch, so the profiler, the
evaluation and the training tools can share it without the inference stack.

SimpleITK (through niftilib) is lenient in two ways that would hide a broken input, so
reading also looks at the NIfTI header itself (:func:`read_header`):

* a ``.nii.gz`` whose data is cut short reads without error, the missing voxels set to 0;
  :func:`read_image` compares the data length with the header and refuses such files;
* NaN and Inf voxels of float images are silently replaced by 0; :func:`read_image` puts
  them back, so that the caller sees (and can report) them;
* a ``.nii.gz`` whose compressed data is damaged reads without error too, the damaged part
  set to 0: :func:`read_image` verifies the gzip checksum (CRC-32) and length of every
  member, on a second thread while SimpleITK decompresses the same file.

SimpleITK's C++ layer aborts the whole process on a path that is not valid UTF-8, so
every path is checked before SimpleITK sees it. Writing is atomic
(:func:`inference.atomic.atomic_path`) and verified: a write that fails or comes out
short (a full disk, where ITK's writer returns without an error) raises and leaves
neither the file nor its temporary behind.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from inference.atomic import atomic_path, flush_to_disk
from inference.messages import itk_reason, printable


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
    try:
        with open(path, "rb") as f:
            head = f.read(544)
        compressed = head[:2] == _GZIP_MAGIC
        if compressed:
            head = _gzip_prefix(path, 544)
    except zlib.error as err:
        raise NiftiError(f"not a readable gzip file ({err})") from None
    except OSError as err:
        raise NiftiError(f"cannot read {printable(path)} ({err.strerror or err})") from None
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
    reader.SetFileName(_itk_path(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        # a damaged gzip stream is the better explanation, when it is one
        _check_payload(path, read_header(path))
        raise NiftiError(f"not a readable NIfTI image ({itk_reason(err)})") from None
    return geometry_of(reader)


def read_image(path: str | os.PathLike) -> tuple[np.ndarray, Geometry]:
    """Read an image as a (z, y, x) numpy array in its stored dtype, with its geometry.

    NIfTI files are checked against their header and their gzip checksums: data shorter
    than the header announces or damaged on the way is refused (SimpleITK would fill it
    with zeros), and the NaN/Inf voxels of float images are returned as stored (SimpleITK
    turns them into zeros).

    What that costs: the check decompresses the file a second time, on a second thread
    while SimpleITK decompresses it (both release the GIL), so on two free cores the read
    takes about as long as before. Float images are checked in the pass that restores
    their NaN/Inf voxels, after SimpleITK's read (that pass needs the array).

    Raises:
        NiftiError: the file is missing, empty, truncated, damaged or not a readable image.
    """
    header = read_header(path)
    if header is None and str(path).endswith((".nii", ".nii.gz")):
        raise NiftiError("not a NIfTI file (no NIfTI-1/2 header at its start)")
    has_data = header is not None and header.single_file and header.data_bytes is not None
    scan_floats = has_data and header.datatype in FLOAT_DATATYPES
    check = None
    if header is not None and not header.compressed:
        if has_data and not scan_floats:
            _check_payload(path, header)  # the file's size: no second thread needed
    elif not scan_floats:
        # without a data length to compare with, a damaged gzip stream is still damaged
        check = _Background(_check_payload, path, header if has_data else None)
    try:
        image = sitk.ReadImage(_itk_path(path))
    except RuntimeError as err:
        if check is not None:
            check.result()  # a damaged file is the better explanation
        raise NiftiError(f"not a readable NIfTI image ({itk_reason(err)})") from None
    if check is not None:
        check.result()
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise NiftiError(
            f"expected one value per voxel, found {image.GetNumberOfComponentsPerPixel()}"
        )
    array = sitk.GetArrayFromImage(image)
    if scan_floats:
        _restore_non_finite(path, header, array)
    return array, geometry_of(image)


class _Background:
    """Run a function on a daemon thread; :meth:`result` joins it and re-raises its error."""

    def __init__(self, fn: Callable[..., object], *args: object) -> None:
        self._error: BaseException | None = None

        def target() -> None:
            try:
                fn(*args)
            except BaseException as err:  # handed to the caller by result()
                self._error = err

        self._thread = threading.Thread(target=target, name="gzip-check", daemon=True)
        self._thread.start()

    def result(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error


def _gzip_prefix(path: str | os.PathLike, n_bytes: int) -> bytes:
    """The first ``n_bytes`` of the decompressed stream (fewer if it ends early).

    Only as much is decompressed as the prefix needs, so a checksum error at the end of a
    small file is not mistaken for a file without a header: it is found by the full check.
    """
    inflater = zlib.decompressobj(wbits=31)
    out = bytearray()
    with open(path, "rb") as f:
        while len(out) < n_bytes and (raw := inflater.unconsumed_tail or f.read(64 * 1024)):
            out += inflater.decompress(raw, n_bytes - len(out))
            if inflater.eof:
                break
    return bytes(out[:n_bytes])


class _CutShort(NiftiError):
    """The gzip stream ends before its last member's checksum (the file was cut short)."""


def _payload(path: str | os.PathLike, compressed: bool, chunk_bytes: int = _CHUNK_BYTES):
    """Yield the (decompressed) bytes of a file in chunks, checking every gzip checksum.

    Concatenated gzip members (pigz, bgzip) are followed, each with its CRC-32 and length
    verified by zlib; bytes after the last member that do not start another one are
    ignored, as ``gzip -d`` does.

    Raises:
        NiftiError: the compressed data is damaged (a checksum or format error).
        _CutShort: after the last chunk, when the stream was cut short; the caller
            compares the length it got with the length it needs to say how much is lost.
    """
    with open(path, "rb") as f:
        if not compressed:
            while chunk := f.read(chunk_bytes):
                yield chunk
            return
        inflater, member_start = zlib.decompressobj(wbits=31), False
        pending, end_of_file = b"", False
        while True:
            if not pending and not end_of_file:
                pending = f.read(chunk_bytes)
                end_of_file = not pending
            if member_start:
                if not pending:
                    return  # the last member ended with the file
                if not pending.startswith(_GZIP_MAGIC[: len(pending)]):
                    return  # trailing bytes after the last member
                member_start = False
            try:
                # bounded output: a label map of zeros must not inflate all at once
                out = inflater.decompress(pending, chunk_bytes)
            except zlib.error as err:
                raise NiftiError(f"damaged gzip data ({_zlib_reason(err)})") from None
            if out:
                yield out
            if inflater.eof:
                pending, member_start = inflater.unused_data, True
                inflater = zlib.decompressobj(wbits=31)
                continue
            pending = inflater.unconsumed_tail
            if not out and not pending and end_of_file:
                raise _CutShort("truncated file: the gzip stream ends before its checksum")


def _zlib_reason(err: zlib.error) -> str:
    text = str(err)
    if "incorrect data check" in text:
        return "CRC-32 checksum mismatch: the file was damaged after it was written"
    if "incorrect length check" in text:
        return "length check mismatch"
    return text.split(": ", 1)[-1]


def _payload_size(path: str | os.PathLike, header: NiftiHeader | None) -> int:
    """Bytes of (decompressed) data; raises NiftiError on damage or a cut stream."""
    size = 0
    try:
        for chunk in _payload(path, compressed=True):
            size += len(chunk)
    except _CutShort:
        if header is not None and size < header.vox_offset + header.data_bytes:
            _raise_truncated(size, header)
        raise
    return size


def _check_payload(path: str | os.PathLike, header: NiftiHeader | None) -> None:
    """Refuse a file whose data is damaged or shorter than its header announces.

    With ``header`` None (or one without a data length) only the gzip checksums are
    verified.
    """
    if header is None or header.data_bytes is None:
        if _is_gzip(path):
            _payload_size(path, None)
        return
    needed = header.vox_offset + header.data_bytes
    size = _payload_size(path, header) if header.compressed else Path(path).stat().st_size
    if size < needed:
        _raise_truncated(size, header)


def _is_gzip(path: str | os.PathLike) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == _GZIP_MAGIC


def _raise_truncated(size: int, header: NiftiHeader) -> None:
    have = max(0, size - header.vox_offset)
    raise NiftiError(
        f"truncated file: {have} of {header.data_bytes} bytes of voxel data "
        f"({100.0 * have / max(1, header.data_bytes):.0f}%)"
    )


def _restore_non_finite(path: str | os.PathLike, header: NiftiHeader, array: np.ndarray) -> None:
    """Check the data (length, checksums) and put back the NaN/Inf voxels SimpleITK set to 0.

    The voxel order of a NIfTI file (x fastest) is the C order of SimpleITK's (z, y, x)
    array, so the n-th stored value is ``array.flat[n]``.
    """
    dtype = np.dtype(header.byte_order + FLOAT_DATATYPES[header.datatype])
    restore = array.size == header.n_voxels and np.issubdtype(array.dtype, np.floating)
    flat = array.reshape(-1)
    skip, size, n_done, carry = header.vox_offset, 0, 0, b""
    chunks = _payload(path, header.compressed)
    while True:
        try:
            chunk = next(chunks)
        except StopIteration:
            break
        except _CutShort:
            if size >= header.vox_offset + header.data_bytes:
                raise
            break
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
    """Write a (z, y, x) array with ``geometry`` to ``path`` atomically, and verify it.

    The data goes to a hidden temporary file in the same folder. ITK's writer does not
    report a failed write (on a full disk it returns normally, leaving a short file), so
    the temporary file is checked (its gzip trailer against the CRC-32 and length of what
    was meant to be written) and synced to disk before it is renamed into place; on any
    failure it is removed and ``path`` is left as it was.

    Args:
        path: destination, normally ``<case>.nii.gz``.
        array_zyx: the voxel values; their dtype is kept (use uint8 for labels).
        geometry: spacing, origin and direction to store; its size must match the array.
        compression_level: gzip level 0-9. Level 1 is several times faster than the
            default 6 and, for sparse label maps, barely larger.

    Returns:
        The final path.

    Raises:
        NiftiError: the path cannot be given to SimpleITK (not valid UTF-8).
        OSError: the file could not be written completely (the reason names the errno,
            e.g. no space left on device, where it can be found).
    """
    path = Path(path)
    if tuple(array_zyx.shape) != geometry.shape_zyx:
        raise ValueError(f"array shape {array_zyx.shape} != geometry shape {geometry.shape_zyx}")
    image = geometry.apply_to(sitk.GetImageFromArray(array_zyx))
    with atomic_path(path) as tmp:
        try:
            sitk.WriteImage(image, _itk_path(tmp), True, compression_level)
        except RuntimeError as err:
            raise _write_error(tmp, itk_reason(err)) from None
        _verify_written(tmp, array_zyx)
    return path


def _verify_written(tmp: Path, array: np.ndarray) -> None:
    """Raise OSError unless ``tmp`` holds the complete image of ``array``, synced to disk.

    A complete gzip file ends with the CRC-32 and the length of everything it holds. The
    header is read back and the CRC-32 of header plus voxel bytes is computed from memory
    (about a fifth of the time of decompressing the file again); only when that does not
    match the file's last 8 bytes (a short write, or a layout this shortcut does not know)
    is the file decompressed and checked in full, which decides and says why.
    """
    try:
        header = read_header(tmp)
        if header is None or header.data_bytes != array.nbytes:
            raise NiftiError("no complete NIfTI header")
        if not (header.compressed and _trailer_matches(tmp, header, array)):
            _check_payload(tmp, header)
        # a write error the kernel reports only at the flush (NFS, quotas) is an incomplete
        # file too; atomic_path's own flush then finds nothing left to write
        flush_to_disk(tmp)
    except NiftiError as err:
        raise _write_error(tmp, str(err)) from None
    except OSError as err:
        raise _write_error(tmp, err.strerror or str(err), err.errno) from None


def _trailer_matches(path: Path, header: NiftiHeader, array: np.ndarray) -> bool:
    """True when the gzip trailer of ``path`` is that of its header followed by ``array``."""
    with open(path, "rb") as f:
        f.seek(-8, os.SEEK_END)
        crc, size = struct.unpack("<II", f.read(8))
    if size != (header.vox_offset + header.data_bytes) % 2**32:
        return False
    head = _gzip_prefix(path, header.vox_offset)
    data = np.ascontiguousarray(array)
    if len(head) < header.vox_offset or data.dtype.byteorder == ">":
        return False
    return crc == zlib.crc32(memoryview(data).cast("B"), zlib.crc32(head))


def _write_error(tmp: Path, detail: str, code: int | None = None) -> OSError:
    """An OSError for a failed write that says why, naming a full disk when it is one."""
    if code is None:
        try:
            full = os.statvfs(tmp.parent).f_bavail == 0
        except OSError:
            full = False
        code = errno.ENOSPC if full else errno.EIO
    reason = os.strerror(code)
    return OSError(code, f"{reason}: the file written was incomplete ({detail})")


def _check_readable(path: str | os.PathLike) -> None:
    """Raise NiftiError unless ``path`` is a non-empty regular file SimpleITK can be given.

    Links are followed; what is not a regular file (a folder, a named pipe, a device, a
    broken link or a link loop) is named as such rather than called missing, and a named
    pipe is never opened (that would wait for a writer for ever).
    """
    path = Path(path)
    _itk_path(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            target = os.fsdecode(os.readlink(path))
            raise NiftiError(
                f"broken symbolic link: {printable(path.name)} points to "
                f"{printable(target)}, which does not exist"
            ) from None
        raise NiftiError(f"file {printable(path)} does not exist") from None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise NiftiError(f"symbolic link loop at {printable(path.name)}") from None
        raise NiftiError(f"cannot read {printable(path)} ({err.strerror or err})") from None
    kind = _FILE_KINDS.get(stat.S_IFMT(info.st_mode))
    if kind is not None:
        raise NiftiError(f"{printable(path.name)} is {kind}, not a regular file")
    if info.st_size == 0:
        raise NiftiError("empty file")


#: What a path that is not a regular file is, for the message.
_FILE_KINDS = {
    stat.S_IFDIR: "a folder",
    stat.S_IFIFO: "a named pipe (FIFO)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def _itk_path(path: str | os.PathLike) -> str:
    """``path`` as a string SimpleITK can take.

    SimpleITK converts paths to UTF-8 in C++ and aborts the process (SIGABRT, no Python
    exception) on one that is not valid UTF-8, such as a file name with a Latin-1 byte.

    Raises:
        NiftiError: the path is not valid UTF-8.
    """
    text = os.fspath(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise NiftiError(
            f"the path {printable(text)} is not valid UTF-8, which SimpleITK cannot open "
            "(rename it)"
        ) from None
    return text


def is_utf8_path(path: str | os.PathLike) -> bool:
    """True when SimpleITK can be given ``path`` (it is valid UTF-8)."""
    try:
        os.fspath(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
