"""FLARE24-style folder -> nnU-Net v2 raw dataset (``DatasetXXX_NAME``), labeled cases only.

The method we follow trains on the partially labeled cases only and treats their partial
labels as complete; unlabeled images are counted and skipped. Every image/label pair is
checked before it is taken (readable, 3D, same geometry, label values in {0, 1}); a bad
pair is skipped with a one-line reason. The source folder is never written to: images are
hard-linked into the dataset when the file system allows it, else copied; labels are linked
too, or rewritten as uint8 when stored in another type.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np
from tqdm import tqdm

from inference.cases import IMAGE_SUFFIX, LABEL_SUFFIX, find_cases
from inference.nifti import NiftiError, read_geometry, read_image, write_image
from training.workspace import Workspace, WorkspaceError, dataset_name

#: Labels the challenge uses: 0 background, 1 lesion (all cancer types merged).
LABELS = {"background": 0, "lesion": 1}
#: Default tolerance (mm for spacing/origin, unitless for direction cosines) for image/label
#: geometry. Tighter than a voxel by far, looser than the float noise of some exporters.
GEOMETRY_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Pair:
    """One labeled training case: ``<case>_0000.nii.gz`` and ``<case>.nii.gz``."""

    name: str
    image_path: Path
    label_path: Path


@dataclass(frozen=True)
class Checked:
    """The outcome of checking one pair: ``reason`` is None when it is usable."""

    pair: Pair
    reason: str | None
    label_is_uint8: bool = True


@dataclass
class ConversionReport:
    """What ``convert_dataset`` kept and skipped.

    Attributes:
        dataset_folder: the written ``nnUNet_raw/DatasetXXX_NAME``.
        kept: case names written to the dataset.
        skipped: ``(case, reason)`` for each pair (or lone file) that was left out.
        unlabeled: number of unlabeled images counted and skipped.
        linked: files hard-linked (the rest were copied or rewritten).
        written: the dataset was written (False: ``strict`` and a pair was skipped).
    """

    dataset_folder: Path
    kept: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    unlabeled: int = 0
    linked: int = 0
    written: bool = True

    def summary(self) -> str:
        """One line: how many cases were kept and skipped."""
        if not self.written:
            return (
                f"{self.dataset_folder.name}: not written (--strict): {len(self.skipped)} "
                f"pairs would be skipped"
            )
        return (
            f"{self.dataset_folder.name}: {len(self.kept)} kept, {len(self.skipped)} skipped, "
            f"{self.unlabeled} unlabeled images not used"
        )


def find_pairs(images_dir: Path, labels_dir: Path) -> tuple[list[Pair], list[tuple[str, str]]]:
    """Match ``<case>_0000.nii.gz`` images with ``<case>.nii.gz`` labels.

    Returns:
        ``(pairs, lone)``: the matched pairs sorted by case, and ``(name, reason)`` for
        images without a label, labels without an image and every other file of the two
        folders (extra channels, uncompressed ``.nii``, other names), none of them used.

    Raises:
        NiftiError: a folder is missing.
    """
    cases, ignored = find_cases(images_dir)
    if not labels_dir.is_dir():
        raise NiftiError(f"label folder {labels_dir} does not exist")
    visible = [p for p in sorted(labels_dir.iterdir()) if not p.name.startswith(".")]
    labels = {p.name[: -len(LABEL_SUFFIX)]: p for p in visible if p.name.endswith(LABEL_SUFFIX)}
    unused_labels = [p for p in visible if not p.name.endswith(LABEL_SUFFIX)]
    pairs, lone = [], unused_files(ignored, unused_labels)
    for case in cases:
        label = labels.pop(case.name, None)
        if label is None:
            lone.append((case.name, f"no label {case.name}{LABEL_SUFFIX} in {labels_dir}"))
        else:
            pairs.append(Pair(case.name, case.image_path, label))
    for name in sorted(labels):
        lone.append((name, f"label without image {name}{IMAGE_SUFFIX} in {images_dir}"))
    return pairs, lone


#: ``<case>_<channel>.nii.gz``: an image of one channel, nnU-Net's naming.
_CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})\.nii\.gz$")


def _image_reason(path: Path) -> str:
    """Why an image-folder entry that is not ``<case>_0000.nii.gz`` is not used."""
    match = _CHANNEL_FILE.match(path.name)
    if match:
        return (
            f"extra channel _{match['channel']} of {match['case']}: FLARE24 Task 1 is CT "
            f"only, only _0000 is used"
        )
    if path.name.endswith(".nii"):
        return "uncompressed .nii: only .nii.gz is read (gzip it)"
    return f"not an image named <case>{IMAGE_SUFFIX}"


def unused_files(images: list[Path], labels: list[Path]) -> list[tuple[str, str]]:
    """``(name, reason)`` for the files in the image and label folders that are not used.

    An uncompressed ``<case>_0000.nii`` image with its ``<case>.nii`` label counts once.
    """
    label_names = {p.name for p in labels}
    unused = []
    for path in images:
        case = path.name.removesuffix("_0000.nii")
        if case != path.name and f"{case}.nii" in label_names:
            label_names.discard(f"{case}.nii")
            reason = "uncompressed .nii image and label: only .nii.gz is read (gzip both)"
            unused.append((case, reason))
        else:
            unused.append((path.name, _image_reason(path)))
    for name in sorted(label_names):
        reason = (
            "uncompressed .nii label: only .nii.gz is read (gzip it)"
            if name.endswith(".nii")
            else f"not a label named <case>{LABEL_SUFFIX}"
        )
        unused.append((name, reason))
    return unused


def check_pair(
    pair: Pair, tolerance: float = GEOMETRY_TOLERANCE, decode_image: bool = True
) -> Checked:
    """Check that a pair can be trained on.

    Args:
        pair: the image and label files.
        tolerance: absolute tolerance for spacing/origin (mm) and direction cosines.
        decode_image: decompress the whole image too (catches truncated files, costs a read
            of every CT); otherwise only its header is read.

    Returns:
        A ``Checked`` whose ``reason`` is a one-line description of the first problem found,
        or None when the pair is usable.
    """
    try:
        image_geometry = read_geometry(pair.image_path)
    except NiftiError as err:
        return Checked(pair, f"unreadable image: {err}")
    if len(image_geometry.size_xyz) != 3:
        return Checked(pair, f"image is {len(image_geometry.size_xyz)}D, expected 3D")
    try:
        label, label_geometry = read_image(pair.label_path)
    except NiftiError as err:
        return Checked(pair, f"unreadable label: {err}")
    if label.ndim != 3:
        return Checked(pair, f"label is {label.ndim}D, expected 3D")
    mismatch = label_geometry.mismatch(image_geometry, tolerance=tolerance)
    if mismatch is not None:
        return Checked(pair, f"label/image geometry differ: {mismatch}")
    values = np.unique(label)
    extra = sorted(set(values.tolist()) - set(LABELS.values()))
    if extra:
        shown = ", ".join(f"{v:g}" for v in extra[:5])
        return Checked(pair, f"label values {shown} not in {{0, 1}}")
    if decode_image:
        try:
            read_image(pair.image_path)
        except NiftiError as err:
            return Checked(pair, f"unreadable image: {err}")
    return Checked(pair, None, label_is_uint8=label.dtype == np.uint8)


def check_pairs(
    pairs: list[Pair],
    tolerance: float = GEOMETRY_TOLERANCE,
    decode_image: bool = True,
    workers: int = 2,
    progress: bool = True,
) -> list[Checked]:
    """Check many pairs, in ``workers`` processes when more than one, in input order."""
    bar = tqdm(total=len(pairs), desc="Checking pairs", unit="case", disable=not progress)
    with bar:
        if workers <= 1 or len(pairs) <= 1:
            results = []
            for pair in pairs:
                results.append(check_pair(pair, tolerance, decode_image))
                bar.update()
            return results
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(check_pair, p, tolerance, decode_image) for p in pairs]
            results = []
            for future in futures:
                results.append(future.result())
                bar.update()
            return results


def count_images(folder: Path | None) -> int:
    """Number of ``*_0000.nii.gz`` files in ``folder`` (0 when None or missing)."""
    if folder is None or not folder.is_dir():
        return 0
    return len(find_cases(folder)[0])


def link_or_copy(source: Path, destination: Path) -> bool:
    """Hard-link ``source`` to ``destination``, copying when linking is impossible.

    The destination is unlinked first, never opened for writing, so a link left by an
    earlier run cannot become a path for writing into the source file.

    Returns:
        True when linked, False when copied.
    """
    if destination.exists() or destination.is_symlink():
        destination.unlink()
    try:
        os.link(source, destination)
        return True
    except OSError as err:
        if err.errno not in (errno.EXDEV, errno.EPERM, errno.EACCES, errno.EMLINK, errno.ENOTSUP):
            raise
    shutil.copy2(source, destination)
    return False


def dataset_json(num_training: int, name: str, description: str = "") -> dict:
    """The ``dataset.json`` of a FLARE24 Task 1 dataset: one CT channel, lesion label."""
    return {
        "name": name,
        "description": description
        or "FLARE 2024 Task 1 pan-cancer lesions, labeled cases only (partial labels as full)",
        "channel_names": {"0": "CT"},
        "labels": dict(LABELS),
        "numTraining": num_training,
        "file_ending": LABEL_SUFFIX,
    }


def convert_dataset(
    workspace: Workspace,
    images_dir: Path,
    labels_dir: Path,
    dataset_id: int,
    name: str,
    unlabeled_dir: Path | None = None,
    tolerance: float = GEOMETRY_TOLERANCE,
    decode_images: bool = True,
    workers: int = 2,
    overwrite: bool = False,
    progress: bool = True,
    strict: bool = False,
) -> ConversionReport:
    """Write ``nnUNet_raw/DatasetXXX_NAME`` from the valid labeled pairs.

    Every pair is checked before anything is written; the dataset is assembled in a hidden
    folder beside the target and renamed into place, so an existing dataset is replaced
    only by a complete new one.

    Args:
        workspace: the work folder (its ``raw`` tree receives the dataset).
        images_dir: ``<case>_0000.nii.gz`` files (FLARE24 ``imagesTr``).
        labels_dir: ``<case>.nii.gz`` labels (FLARE24 ``labelsTr``); partial labels are
            taken as complete.
        dataset_id: nnU-Net dataset id, 1..999.
        name: dataset name (the ``NAME`` of ``DatasetXXX_NAME``).
        unlabeled_dir: unlabeled images; only counted.
        tolerance: image/label geometry tolerance (see ``check_pair``).
        decode_images: decompress every image while checking (see ``check_pair``).
        workers: processes for checking.
        overwrite: replace an existing dataset of the same name.
        progress: show a progress bar.
        strict: write nothing when any pair is skipped (``report.written`` is then False).

    Returns:
        The report of kept and skipped cases.

    Raises:
        WorkspaceError: the id is taken by another dataset name, the dataset exists and
            ``overwrite`` is False, or no valid pair was found.
        NiftiError: an input folder is missing.
    """
    folder_name = dataset_name(dataset_id, name)
    others = sorted({p.name for p in workspace.dataset_folders(dataset_id)} - {folder_name})
    if others:
        raise WorkspaceError(f"dataset id {dataset_id} is already used by {', '.join(others)}")
    target = workspace.raw / folder_name
    if target.exists() and not overwrite:
        raise WorkspaceError(f"{target} exists; pass --overwrite to replace it")

    pairs, lone = find_pairs(images_dir, labels_dir)
    checked = check_pairs(pairs, tolerance, decode_images, workers, progress)
    report = ConversionReport(target, skipped=list(lone), unlabeled=count_images(unlabeled_dir))
    good = [c for c in checked if c.reason is None]
    report.skipped += [(c.pair.name, c.reason) for c in checked if c.reason is not None]
    report.skipped.sort()
    if not good:
        raise WorkspaceError(f"no valid labeled pair in {images_dir} / {labels_dir}")
    if strict and report.skipped:
        report.written = False
        return report

    staging = target.with_name(f".{folder_name}.convert-{os.getpid()}")
    if staging.exists():
        shutil.rmtree(staging)  # our own leftover (the name carries our pid)
    try:
        _write_dataset(staging, good, report, progress)
        _write_json(staging / "dataset.json", dataset_json(len(good), name))
        _write_json(
            staging / "conversion_report.json",
            {
                "images": str(images_dir.resolve()),
                "labels": str(labels_dir.resolve()),
                "unlabeled": str(unlabeled_dir.resolve()) if unlabeled_dir else None,
                "kept": report.kept,
                "skipped": [{"case": n, "reason": r} for n, r in report.skipped],
                "unlabeled_images_skipped": report.unlabeled,
            },
        )
        if target.exists():
            shutil.rmtree(target)  # our own output: links and copies, never the source files
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return report


def _write_dataset(folder: Path, good: list[Checked], report: ConversionReport, progress: bool):
    images_out, labels_out = folder / "imagesTr", folder / "labelsTr"
    images_out.mkdir(parents=True)
    labels_out.mkdir()
    for c in tqdm(good, desc="Writing dataset", unit="case", disable=not progress):
        report.linked += link_or_copy(
            c.pair.image_path, images_out / f"{c.pair.name}{IMAGE_SUFFIX}"
        )
        label_out = labels_out / f"{c.pair.name}{LABEL_SUFFIX}"
        if c.label_is_uint8:
            report.linked += link_or_copy(c.pair.label_path, label_out)
        else:
            label, geometry = read_image(c.pair.label_path)
            write_image(label_out, label.astype(np.uint8), geometry)
        report.kept.append(c.pair.name)


def source_folders(
    folder: Path | None, images: Path | None, labels: Path | None, unlabeled: Path | None
) -> tuple[Path, Path, Path | None]:
    """Resolve ``-i FOLDER`` (imagesTr/labelsTr/unlabeledTr) or explicit folders.

    Raises:
        WorkspaceError: neither form, or an incomplete one, was given.
    """
    if folder is not None:
        if images is not None or labels is not None:
            raise WorkspaceError("give either -i FOLDER or --images/--labels, not both")
        default_unlabeled = folder / "unlabeledTr"
        return (
            folder / "imagesTr",
            folder / "labelsTr",
            unlabeled or (default_unlabeled if default_unlabeled.is_dir() else None),
        )
    if images is None or labels is None:
        raise WorkspaceError("give -i FOLDER, or both --images DIR and --labels DIR")
    return images, labels, unlabeled


def print_report(report: ConversionReport, stream_ok: TextIO, stream_err: TextIO) -> None:
    """Print one line per skipped case to ``stream_err`` and the summary to ``stream_ok``."""
    for name, reason in report.skipped:
        print(f"skipped {name}: {reason}", file=stream_err)
    print(report.summary(), file=stream_ok)


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2) + "\n")
