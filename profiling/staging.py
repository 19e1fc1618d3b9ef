"""Per-case folders: a fresh input folder holding only that case, and a fresh output folder.

The organizers put a single case into ``inputs/`` for each run. Cases are large, so the
image is linked into the staged folder, never copied when avoidable:
- a hard link (same inode) is used whenever the staging folder is on the same filesystem;
- otherwise, locally, a symlink to the absolute path;
- for Docker, a symlink would dangle inside the container (a bind mount cannot follow a
  link that points outside the mounted folder), so the last resort there is a copy, and the
  caller is told so that it can warn.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from inference.nifti import Case

#: How the image got into the staged input folder.
HARDLINK, SYMLINK, COPY = "hardlink", "symlink", "copy"


@dataclass(frozen=True)
class StagedCase:
    """The folders one run sees.

    Attributes:
        root: the case's staging folder, holding ``inputs/`` and ``outputs/``.
        input_dir: folder with only ``<case>_0000.nii.gz`` (``INPUT_DIR``).
        output_dir: empty folder for the prediction (``OUTPUT_DIR``).
        input_path: the staged image.
        method: how the image was staged: ``hardlink``, ``symlink`` or ``copy``.
    """

    root: Path
    input_dir: Path
    output_dir: Path
    input_path: Path
    method: str

    def cleanup(self) -> None:
        """Remove the staging folder (the original image is untouched)."""
        shutil.rmtree(self.root, ignore_errors=True)


def stage_case(
    case: Case,
    work_dir: str | os.PathLike,
    for_docker: bool = False,
    hardlink: Callable[[Path, Path], None] = os.link,
) -> StagedCase:
    """Make ``work_dir/<case>/inputs`` (only this case) and an empty ``work_dir/<case>/outputs``.

    Any previous staging folder of the case is removed first, so every run starts clean.

    Args:
        case: the case to stage.
        work_dir: where staging folders go; on the cases' filesystem, hard links work.
        for_docker: the folders will be bind-mounted, so symlinks are not an option.
        hardlink: the function that makes a hard link (replaceable in tests).

    Returns:
        The staged folders; ``method`` says whether a copy had to be made.
    """
    root = Path(work_dir).absolute() / case.name
    if root.exists():
        shutil.rmtree(root)
    input_dir, output_dir = root / "inputs", root / "outputs"
    input_dir.mkdir(parents=True)
    output_dir.mkdir()
    if for_docker:
        # The container may run as another user; the organizers chmod 777 their outputs too.
        output_dir.chmod(0o777)
    source = case.image_path.resolve()
    target = input_dir / case.image_path.name
    try:
        hardlink(source, target)
        method = HARDLINK
    except OSError:
        if for_docker:
            shutil.copy2(source, target)
            method = COPY
        else:
            target.symlink_to(source)
            method = SYMLINK
    return StagedCase(root, input_dir, output_dir, target, method)
