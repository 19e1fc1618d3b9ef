"""Cases and folders: which files are cases, and where their outputs may safely go.

The challenge's naming: one CT channel per case, ``<case>_0000.nii.gz`` in the input
folder, and the prediction ``<case>.nii.gz`` in the output folder. The output folder is
made writable and cleared of what killed runs left before a run starts, and an output
never replaces an input (files are compared by device and inode, which sees through
links and bind mounts).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from inference.atomic import check_writable, remove_stale_temporaries
from inference.messages import printable
from inference.nifti import NiftiError, is_utf8_path

log = logging.getLogger("inference")

#: The challenge's image naming: one CT channel per case, ``<case>_0000.nii.gz``.
IMAGE_SUFFIX = "_0000.nii.gz"
#: Label / prediction naming: ``<case>.nii.gz``.
LABEL_SUFFIX = ".nii.gz"


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


def non_utf8_argument(arguments: Iterable[tuple[str, Path]]) -> str | None:
    """Why one of the ``(flag, path)`` arguments cannot be used, or None.

    SimpleITK cannot open a path that is not valid UTF-8 (see :func:`is_utf8_path`), and
    every file of a run lies below one of these folders.
    """
    for flag, path in arguments:
        if not is_utf8_path(path):
            return (
                f"{flag} {printable(path)} is not valid UTF-8, which SimpleITK cannot open "
                "(rename the folder)"
            )
    return None


def prepare_output_dir(output: Path) -> str | None:
    """Create the output folder, make sure it is writable, and clear stale temporaries.

    Returns:
        Why the folder cannot be used, or None.
    """
    try:
        output.mkdir(parents=True, exist_ok=True)
        check_writable(output)
    except OSError as err:
        return f"output folder {output} is not writable ({err.strerror or err})"
    for path in remove_stale_temporaries(output):
        log.warning(f"removed {printable(path.name)}: a partial file left by an interrupted run")
    return None


def _identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of what ``path`` names (links followed), or None if nothing."""
    try:
        info = os.stat(path)
    except (OSError, ValueError):
        return None
    return info.st_dev, info.st_ino


def blocked_outputs(cases: list[Case], input_dir: Path, output: Path) -> dict[str, str]:
    """Cases whose output would replace an input or another file of the input folder.

    Files are compared by identity (device and inode), not by path: a link, or a bind
    mount of the input folder under another name, is seen through. When the output folder
    is the input folder, no file already in it is replaced: the files that are not cases
    were just reported as skipped, and a prediction must not then overwrite them.
    ``x_0000`` next to ``x`` with ``-o`` equal to ``-i`` is the classic case.

    Returns:
        ``{case name: reason}`` for every case that must be skipped.
    """
    inputs = {}
    for case in cases:
        identity = _identity(case.image_path)
        if identity is not None:
            inputs.setdefault(identity, case)
    in_place = _identity(output) is not None and _identity(output) == _identity(input_dir)
    blocked = {}
    for case in cases:
        target = case.output_path(output)
        victim = inputs.get(_identity(target))
        name = printable(target.name)
        if victim is not None:
            blocked[case.name] = (
                f"its output {name} would overwrite the input of case {printable(victim.name)}; "
                "skipped (write the outputs to another folder)"
            )
        elif in_place and os.path.lexists(target):
            blocked[case.name] = (
                f"its output {name} would replace the file {name} of the input folder; "
                "skipped (write the outputs to another folder)"
            )
    return blocked
