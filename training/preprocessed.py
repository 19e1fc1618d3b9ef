"""A configuration's preprocessed data: complete, and made with the plans training reads?

nnU-Net's preprocessing deletes ``nnUNet_preprocessed/DATASET/DATA_IDENTIFIER`` and writes,
per case of the raw dataset, ``CASE.b2nd`` (image), ``CASE_seg.b2nd`` (label) and
``CASE.pkl`` (properties). Nothing in the folder says which plans made it, so after
``plan --preprocess none`` with another CT normalisation the trainer would read data
normalised the old way under plans that say otherwise. ``plan`` therefore writes a record beside the
folder (``DATA_IDENTIFIER.preprocessing.json``: nnU-Net refuses a data folder holding any
file but its own) once a preprocessing has finished: the parts of the plans the data
depends on (``training.plan.preprocessing_parts``). ``train`` compares them with the
current plans and refuses data made with others. ``plan`` deletes the record before preprocessing
again, so a failed run never leaves a record that vouches for half of the data.

A failed or interrupted preprocessing (a full disk, a kill) leaves cases half written or
missing; ``train`` checks that every case of the raw dataset has its three files, and names
the ones that do not, before nnU-Net's data loader dies on them.
"""

from __future__ import annotations

import errno
import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from training.plan import describe_differences, preprocessing_parts, resolve_configuration
from training.workspace import WorkspaceError

#: ``DATA_IDENTIFIER`` + this, beside the data folder: the record ``plan`` writes.
RECORD_SUFFIX = ".preprocessing.json"
#: nnU-Net's files per case (blosc2 format of nnunetv2 2.6+).
DATA_SUFFIX, SEG_SUFFIX, PROPERTIES_SUFFIX = ".b2nd", "_seg.b2nd", ".pkl"
#: Cases named in a message; the rest are counted.
SHOWN = 5


def record_path(data_folder: Path) -> Path:
    """Where the record of ``data_folder`` lives (beside it)."""
    return data_folder.with_name(data_folder.name + RECORD_SUFFIX)


def forget_record(data_folder: Path) -> None:
    """Delete the record before the data is preprocessed again."""
    record_path(data_folder).unlink(missing_ok=True)


def write_record(data_folder: Path, plans: dict, plans_name: str, configuration: str) -> Path:
    """Record what ``data_folder`` was preprocessed with (atomically).

    Returns:
        The record file.
    """
    from inference.atomic import write_json_atomically

    path = record_path(data_folder)
    write_json_atomically(
        path,
        {
            "plans": plans_name,
            "configuration": configuration,
            "preprocessing": preprocessing_parts(plans, configuration),
        },
    )
    return path


def read_record(data_folder: Path) -> dict | None:
    """The record ``plan`` wrote, or None (data preprocessed without one, e.g. by nnU-Net)."""
    try:
        record = json.loads(record_path(data_folder).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def record_mismatch(data_folder: Path, plans: dict, configuration: str) -> str | None:
    """How the plans the data was made with differ from ``plans`` (None: same, or unknown)."""
    record = read_record(data_folder)
    if record is None or not isinstance(record.get("preprocessing"), dict):
        return None
    current = preprocessing_parts(plans, configuration)
    if record["preprocessing"] == current:
        return None
    return describe_differences(record["preprocessing"], current) or "plans differ"


def stale_data(plans_file: Path, plans: dict, configurations: list[str]) -> list[str]:
    """One line per existing data folder of ``configurations`` made with other plans.

    Args:
        plans_file: the plans file (its folder holds the data folders).
        plans: its content.
        configurations: configurations whose data was not preprocessed again.
    """
    lines, seen = [], set()
    for configuration in configurations:
        data = plans_file.parent / resolve_configuration(plans, configuration)["data_identifier"]
        if data in seen or not data.is_dir():
            continue
        seen.add(data)
        differences = record_mismatch(data, plans, configuration)
        if differences:
            lines.append(
                f"the preprocessed data {data.name} was made with other plans than "
                f"{plans_file.name}'s {configuration} now ({differences}); train refuses it "
                f"until `plan` preprocesses it again (without --preprocess none)"
            )
    return lines


def raw_cases(raw_dataset: Path) -> list[str] | None:
    """The cases nnU-Net preprocesses: ``imagesTr/CASE_0000<file_ending>`` (None: no dataset)."""
    try:
        ending = json.loads((raw_dataset / "dataset.json").read_text())["file_ending"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    images = raw_dataset / "imagesTr"
    if not images.is_dir():
        return None
    suffix = "_0000" + ending
    return sorted(p.name[: -len(suffix)] for p in images.iterdir() if p.name.endswith(suffix))


def incomplete_cases(data_folder: Path, expected: list[str] | None) -> dict[str, str]:
    """Cases whose preprocessed files are not all there: case -> what is missing.

    Args:
        data_folder: the configuration's preprocessed data.
        expected: the raw dataset's cases (None: only the cases found are checked).
    """
    names = {p.name for p in data_folder.iterdir()} if data_folder.is_dir() else set()
    found = set()
    for name in names:
        # _seg.b2nd first: it ends in .b2nd too.
        suffix = next(
            (s for s in (SEG_SUFFIX, DATA_SUFFIX, PROPERTIES_SUFFIX) if name.endswith(s)), None
        )
        if suffix is not None:
            found.add(name[: -len(suffix)])
    missing = {}
    for case in sorted(found | set(expected or [])):
        lacking = [
            suffix
            for suffix in (DATA_SUFFIX, SEG_SUFFIX, PROPERTIES_SUFFIX)
            if f"{case}{suffix}" not in names
        ]
        if len(lacking) == 3:
            missing[case] = "missing"
        elif lacking:
            missing[case] = "no " + ", ".join(lacking)
    return missing


def check_data(
    data_folder: Path, raw_dataset: Path, plans: dict, plans_name: str, configuration: str
) -> None:
    """Refuse preprocessed data that is incomplete or was made with other plans.

    Raises:
        WorkspaceError: with the cases, or the differing plans, in one line.
    """
    missing = incomplete_cases(data_folder, raw_cases(raw_dataset))
    if missing:
        shown = ", ".join(f"{c} ({why})" for c, why in list(missing.items())[:SHOWN])
        more = f" and {len(missing) - SHOWN} more" if len(missing) > SHOWN else ""
        raise WorkspaceError(
            f"the preprocessed data in {data_folder} is incomplete (a failed or interrupted "
            f"`plan`?): {shown}{more}; run `python -m training plan` again to preprocess it"
        )
    differences = record_mismatch(data_folder, plans, configuration)
    if differences:
        raise WorkspaceError(
            f"the preprocessed data in {data_folder} was made with other plans than "
            f"{plans_name}.json's {configuration} ({differences}); preprocess it again: rerun "
            f"`python -m training plan` with the same options, without --preprocess none"
        )


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` (or what caused it, e.g. in a worker process) is a full disk."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(current):
            return True
        current = current.__cause__ or current.__context__
    return False


@contextmanager
def disk_full_as_error(folder: Path, what: str) -> Iterator[None]:
    """Turn a full disk while ``what`` (into ``folder``) into one line.

    Raises:
        WorkspaceError: the disk holding ``folder`` is full.
    """
    try:
        yield
    except Exception as err:
        if not is_disk_full(err):
            raise
        existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("/"))
        free_mb = shutil.disk_usage(existing).free / 2**20
        raise WorkspaceError(
            f"no space left on the disk of {folder} while {what} ({free_mb:.0f} MB free); "
            f"free some and run `python -m training plan` again (train refuses the "
            f"incomplete data until then)"
        ) from None
