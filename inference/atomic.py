"""Atomic files: a name holds the complete old file or the complete new one, never a part.

Every file the project writes for others to read (predictions, checkpoints, records,
reports) goes through :func:`atomic_path`: the content is written to a hidden temporary
sibling, flushed to disk, and renamed over the final name, and the rename is flushed
too. On any failure the temporary file is removed and the final name is left as it was.

The temporary file is locked (``flock``) for as long as it exists, so that
:func:`remove_stale_temporaries` can tell the file of a live writer (in this process,
another one, or another container on the same host or file server) from one a killed
run left behind. Standard library only: every tool can use it without numpy or torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: Marker of the temporary names made by :func:`temporary_name`:
#: ``.<name>.partial-<32 hex digits><suffix>``, random per write, so that two writers
#: never share a name, whatever their host or pid namespace.
_PARTIAL = ".partial-"
_TEMPORARY = re.compile(r"^\..*\.partial-[0-9a-f]{32}(\.nii\.gz|\.[A-Za-z0-9]+)?$", re.DOTALL)


def temporary_name(path: str | os.PathLike) -> Path:
    """A fresh temporary sibling of ``path``: hidden, same suffix, unique across hosts.

    The name is shortened where the folder's limit on name length (255 bytes) would
    refuse it though the final name fits.
    """
    path = Path(path)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    stem = os.fsencode(path.name[: len(path.name) - len(suffix)])
    tail = os.fsencode(f"{_PARTIAL}{uuid.uuid4().hex}{suffix}")
    try:
        limit = os.pathconf(path.parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    stem = stem[: max(1, limit - len(tail) - 1)]
    return path.with_name(os.fsdecode(b"." + stem + tail))


def is_temporary(path: str | os.PathLike) -> bool:
    """True when ``path``'s name is one :func:`temporary_name` makes."""
    return bool(_TEMPORARY.match(Path(path).name))


def flush_to_disk(path: str | os.PathLike) -> None:
    """Flush the file (or folder) ``path`` to disk (``fsync``).

    Raises:
        OSError: the flush failed, e.g. a write error the kernel reports only now.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` (same suffix) and rename it over ``path`` on success.

    The temporary file is created here (empty) and locked for as long as it exists. The
    writer may replace its content (opening it with truncation keeps the inode and the
    lock). When the block ends normally the file is flushed to disk (``fsync``: a write
    error the kernel reports only now, on NFS or over a quota, raises here), renamed over
    ``path``, and the folder is flushed so that the rename survives a power cut. On an
    exception, from the block or from the flush, the temporary file is removed and
    ``path`` is left untouched.
    """
    path = Path(path)
    tmp, fd = _create_locked(path)
    try:
        yield tmp
        flush_to_disk(tmp)
        os.replace(tmp, path)
        # not every file system can flush a folder; the rename is done either way
        with contextlib.suppress(OSError):
            flush_to_disk(path.parent)
    finally:
        try:
            if os.path.lexists(tmp):
                tmp.unlink()
        finally:
            os.close(fd)


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through :func:`atomic_path`; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomically(
    path: str | os.PathLike, content: object, *, indent: int = 2, **dumps_options: object
) -> Path:
    """Write ``content`` as JSON (one trailing newline) through :func:`atomic_path`.

    Args:
        path: the final file.
        content: anything :func:`json.dumps` takes.
        indent: JSON indentation.
        **dumps_options: further :func:`json.dumps` options (``sort_keys``, ``allow_nan``).

    Returns:
        The path.
    """
    return write_text_atomically(path, json.dumps(content, indent=indent, **dumps_options) + "\n")


def check_writable(folder: str | os.PathLike) -> None:
    """Create and remove a temporary file in ``folder`` (no existing file is touched).

    Raises:
        OSError: the folder cannot be written.
    """
    tmp, fd = _create_locked(Path(folder) / "write-test.nii.gz")
    try:
        tmp.unlink()
    finally:
        os.close(fd)


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete what killed runs left behind: temporary files of :func:`atomic_path`.

    A process killed while writing (SIGKILL, a container stopped) cannot remove its
    temporary file. Only names of :func:`temporary_name`'s own pattern are considered, and
    only those whose lock nobody holds are removed: the temporary file of a writer that is
    still running is kept, and so is every file where locks are not available.

    Returns:
        The files removed (none when ``folder`` is not a folder).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in folder.iterdir():
        if not _TEMPORARY.match(entry.name) or not entry.is_file() or entry.is_symlink():
            continue
        try:
            fd = os.open(entry, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            if _lock(fd, blocking=False) and os.path.samestat(os.fstat(fd), entry.lstat()):
                entry.unlink()
                removed.append(entry)
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


def _create_locked(path: Path) -> tuple[Path, int]:
    """Create and lock a fresh temporary file for ``path``; returns it and its descriptor."""
    while True:
        tmp = temporary_name(path)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        if not _lock(fd, blocking=True) or os.fstat(fd).st_nlink > 0:
            return tmp, fd
        # a cleaner removed it between creation and lock: take another name
        os.close(fd)


def _lock(fd: int, blocking: bool) -> bool:
    """Take an exclusive flock on ``fd``; False where the filesystem has no locks or it is held."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except OSError:
        return False
    return True
