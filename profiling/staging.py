"""Per-case folders: a fresh input folder holding only that case, and a fresh output folder.

Each case gets a folder of its own making (``<case>.XXXXXXXX`` in the work folder), and
only that folder is ever removed: whatever else the work folder holds is left alone.

The organizers put a single case into ``inputs/`` for each run. The image is copied there,
read-only: a hard link or a symlink would let the profiled command change the original
case (a hard link shares the file, and permissions stop nobody who runs as root, as
containers do). Where the filesystem can clone a file (btrfs, XFS: ``FICLONE``), the copy
is a clone that shares the blocks until written, so it costs no time or space; elsewhere
it is a real copy, made before the command starts and never counted in its time.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from inference.cases import Case

#: How the image got into the staged input folder: a clone (copy on write) or a copy.
CLONE, COPY = "clone", "copy"
#: The ``FICLONE`` ioctl of Linux (``_IOW(0x94, 9, int)``).
_FICLONE = 0x40049409


@dataclass(frozen=True)
class StagedCase:
    """The folders one run sees.

    Attributes:
        root: the case's staging folder, holding ``inputs/`` and ``outputs/``.
        input_dir: folder with only ``<case>_0000.nii.gz`` (``INPUT_DIR``).
        output_dir: empty folder for the prediction (``OUTPUT_DIR``).
        input_path: the staged image.
        method: how the image was staged: ``clone`` or ``copy``.
    """

    root: Path
    input_dir: Path
    output_dir: Path
    input_path: Path
    method: str

    def cleanup(self) -> None:
        """Remove the staging folder (the original image is untouched)."""
        shutil.rmtree(self.root, ignore_errors=True)


def stage_case(case: Case, work_dir: str | os.PathLike, for_docker: bool = False) -> StagedCase:
    """Make a fresh ``work_dir/<case>.XXXXXXXX/`` holding ``inputs/`` (this case) and ``outputs/``.

    The folder is new (``mkdtemp``: a random suffix, created exclusively), so nothing
    already in ``work_dir`` is reused or removed: a folder of the user's named like the
    case stays as it is, and :meth:`StagedCase.cleanup` removes only what this made.

    Args:
        case: the case to stage.
        work_dir: where staging folders go (created if missing).
        for_docker: the folders will be bind-mounted into a container that may run as
            another user: the output folder is made writable by all.

    Returns:
        The staged folders; ``method`` says whether the image was cloned or copied.

    Raises:
        OSError: ``work_dir`` cannot be created or written.
    """
    work_dir = Path(work_dir).absolute()
    work_dir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix=f"{case.name}.", dir=work_dir))
    try:
        # mkdtemp makes it 0700; keep the usual mode, as a plain mkdir would.
        root.chmod(0o755)
        input_dir, output_dir = root / "inputs", root / "outputs"
        input_dir.mkdir()
        output_dir.mkdir()
        if for_docker:
            # The container may run as another user; the organizers chmod 777 their outputs.
            output_dir.chmod(0o777)
        target = input_dir / case.image_path.name
        method = _copy(case.image_path, target)
        target.chmod(0o444)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return StagedCase(root, input_dir, output_dir, target, method)


def _copy(source: Path, target: Path) -> str:
    """Copy ``source`` to a new file ``target``: a clone where possible; returns how."""
    with open(source, "rb") as src, open(target, "xb") as dst:
        try:
            import fcntl

            fcntl.ioctl(dst.fileno(), _FICLONE, src.fileno())
            return CLONE
        except (ImportError, OSError):
            pass
    shutil.copyfile(source, target)
    return COPY
