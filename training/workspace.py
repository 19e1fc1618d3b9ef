"""The work folder: where nnU-Net's raw, preprocessed and results trees live, and its env vars.

nnU-Net v2 finds its folders through the environment variables ``nnUNet_raw``,
``nnUNet_preprocessed`` and ``nnUNet_results``, and reads a few process-count variables
(``nnUNet_def_n_proc``, ``nnUNet_n_proc_DA``) when its modules are imported. Everything here
is plain Python (no nnunetv2 import) so that the variables are set before nnunetv2 is first
imported by a subcommand.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

#: The default work folder (ignored by git).
DEFAULT_WORK = Path("work")
#: The plans identifier nnU-Net's default planner writes (``nnUNetPlans.json``).
DEFAULT_PLANS = "nnUNetPlans"
#: Short names for plans identifiers: nnU-Net's default planner and its residual-encoder
#: presets (nnUNetPlannerResEncM / L, recommended by nnU-Net since 2024).
PLANS_PRESETS = {
    "default": DEFAULT_PLANS,
    "resenc-m": "nnUNetResEncUNetMPlans",
    "resenc-l": "nnUNetResEncUNetLPlans",
}
#: The trainer class every model of this project is trained with. Checkpoints record this
#: name and ``nnUNetPredictor`` looks the class up by it, so it must be nnU-Net's own.
TRAINER_NAME = "nnUNetTrainer"

_DATASET_RE = re.compile(r"^Dataset(\d{3})_(.+)$")


class WorkspaceError(RuntimeError):
    """A missing or ambiguous dataset, configuration or folder; the message is one line."""


class TrainingError(RuntimeError):
    """Training cannot start or stopped; the message is one line for the user."""


@dataclass(frozen=True)
class Workspace:
    """The root of the nnU-Net folder trees used by the training commands.

    Attributes:
        root: the work folder; ``nnUNet_raw``, ``nnUNet_preprocessed`` and ``nnUNet_results``
            are created below it.
    """

    root: Path

    @property
    def raw(self) -> Path:
        """``ROOT/nnUNet_raw``: converted datasets (images, labels, dataset.json)."""
        return self.root / "nnUNet_raw"

    @property
    def preprocessed(self) -> Path:
        """``ROOT/nnUNet_preprocessed``: fingerprints, plans and preprocessed arrays."""
        return self.root / "nnUNet_preprocessed"

    @property
    def results(self) -> Path:
        """``ROOT/nnUNet_results``: trainer output folders (checkpoints, logs)."""
        return self.root / "nnUNet_results"

    def activate(self) -> Workspace:
        """Create the three folders and point nnU-Net's environment variables at them.

        Must run before the first ``import nnunetv2`` of a process that relies on the
        variables read at import time; the folder variables themselves are read lazily by
        nnunetv2 2.8.1, but setting everything first keeps the order simple. Child processes
        (nnU-Net's spawn pools, DDP workers) inherit the variables.

        Returns:
            self, with absolute paths.
        """
        ws = Workspace(self.root.resolve())
        for key, folder in (
            ("nnUNet_raw", ws.raw),
            ("nnUNet_preprocessed", ws.preprocessed),
            ("nnUNet_results", ws.results),
        ):
            folder.mkdir(parents=True, exist_ok=True)
            os.environ[key] = str(folder)
        return ws

    def dataset_folders(self, dataset_id: int) -> list[Path]:
        """Every ``DatasetXXX_*`` folder with this id in the raw, preprocessed or results tree."""
        prefix = f"Dataset{dataset_id:03d}_"
        found = []
        for tree in (self.raw, self.preprocessed, self.results):
            if tree.is_dir():
                found += [p for p in sorted(tree.iterdir()) if p.name.startswith(prefix)]
        return found

    def resolve_dataset(self, dataset: str) -> str:
        """Turn ``"501"`` or ``"Dataset501_FLARE24"`` into the dataset's folder name.

        Raises:
            WorkspaceError: no dataset, or more than one name for the id.
        """
        match = _DATASET_RE.match(dataset)
        if match:
            dataset_id = int(match.group(1))
        else:
            try:
                dataset_id = int(dataset)
            except ValueError:
                raise WorkspaceError(
                    f"dataset must be an id (e.g. 501) or a name DatasetXXX_NAME, got {dataset!r}"
                ) from None
        names = sorted({p.name for p in self.dataset_folders(dataset_id)})
        if match and dataset not in names:
            names = []
        if not names:
            raise WorkspaceError(
                f"dataset {dataset} not found under {self.root} (run `python -m training "
                f"convert` first, or pass --work)"
            )
        if len(names) > 1:
            raise WorkspaceError(f"dataset id {dataset_id} is ambiguous: {', '.join(names)}")
        return names[0]

    def plans_file(self, dataset_name: str, plans: str = DEFAULT_PLANS) -> Path:
        """``nnUNet_preprocessed/DATASET/PLANS.json``."""
        return self.preprocessed / dataset_name / f"{plans}.json"

    def trainer_folder(
        self, dataset_name: str, configuration: str, plans: str = DEFAULT_PLANS
    ) -> Path:
        """The output folder nnU-Net's trainer uses: ``results/DATASET/TRAINER__PLANS__CONFIG``."""
        return self.results / dataset_name / f"{TRAINER_NAME}__{plans}__{configuration}"


def plans_identifier(name: str) -> str:
    """A plans preset (``default``, ``resenc-m``, ``resenc-l``) or identifier -> identifier."""
    return PLANS_PRESETS.get(name, name)


def dataset_name(dataset_id: int, name: str) -> str:
    """The nnU-Net folder name ``DatasetXXX_NAME`` (XXX: three digits, 1..999).

    Raises:
        WorkspaceError: an id out of range or a name nnU-Net cannot parse back.
    """
    if not 1 <= dataset_id <= 999:
        raise WorkspaceError(f"dataset id must be between 1 and 999, got {dataset_id}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_\-]*", name):
        raise WorkspaceError(f"dataset name must be letters, digits, '_' or '-', got {name!r}")
    return f"Dataset{dataset_id:03d}_{name}"


def dataset_id_of(name: str) -> int:
    """The numeric id of a ``DatasetXXX_NAME`` folder name."""
    match = _DATASET_RE.match(name)
    if not match:
        raise WorkspaceError(f"not an nnU-Net dataset name: {name!r}")
    return int(match.group(1))


def set_process_counts(num_processes: int, da_workers: int | None = None) -> None:
    """Tell nnU-Net how many worker processes it may start.

    Args:
        num_processes: pools for fingerprinting, preprocessing and the final validation
            (``nnUNet_def_n_proc``; nnU-Net's default is 8).
        da_workers: data-augmentation workers per GPU (``nnUNet_n_proc_DA``); 0 runs the
            augmentation in the training process. None leaves the variable as it is.
    """
    # nnU-Net's own (mixed-case) variable names.
    os.environ["nnUNet_def_n_proc"] = str(max(1, num_processes))  # noqa: SIM112
    if da_workers is not None:
        os.environ["nnUNet_n_proc_DA"] = str(max(0, da_workers))  # noqa: SIM112
