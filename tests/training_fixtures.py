"""Fixtures shared by the training test modules (loaded with ``pytest_plugins``).

One tiny synthetic dataset is converted and planned once per session (about half of the
training tests' set-up time is nnU-Net's spawn pools starting); tests that train copy its
work folder (``fresh_work``) so that none sees another's results.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from synthetic import generate_case, write_case

SHAPE = (16, 32, 32)
SPACING = (2.0, 1.5, 1.5)
N_CASES = 6
DATASET = "Dataset042_Tiny"
TINY_ENV = {"nnUNet_def_n_proc": "1", "nnUNet_n_proc_DA": "0"}


def tree_digest(folder: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file below ``folder``."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def write_tiny_flare_folder(root: Path, n_cases: int) -> Path:
    """A FLARE24-style folder of tiny, fully labeled cases (3 lesions each) + 1 unlabeled."""
    for i in range(n_cases):
        case = generate_case(100 + i, SHAPE, spacing_zyx_mm=SPACING, kind="full", n_lesions=3)
        write_case(case, f"Tiny_{i:03d}", root / "imagesTr", root / "labelsTr")
    unlabeled = generate_case(99, SHAPE, spacing_zyx_mm=SPACING, kind="unlabeled")
    write_case(unlabeled, "Tiny_999", root / "unlabeledTr")
    return root


@pytest.fixture(scope="module")
def nnunet_env():
    """Keep nnU-Net's environment variables (set by the CLI) local to a test module."""
    with pytest.MonkeyPatch.context() as mp:
        for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            mp.setenv(key, "unset-by-test")
        for key, value in TINY_ENV.items():
            mp.setenv(key, value)
        yield mp


@pytest.fixture(scope="session")
def planned_session(tmp_path_factory) -> Path:
    """A converted and planned tiny dataset (3d_fullres, bs 4/5 variants, tiny compact)."""
    from training.cli import main

    root = tmp_path_factory.mktemp("training")
    source = write_tiny_flare_folder(root / "flare", N_CASES)
    work = root / "work"
    with pytest.MonkeyPatch.context() as mp:
        for key, value in TINY_ENV.items():
            mp.setenv(key, value)
        assert main(["convert", "--work", str(work), "-i", str(source), "--dataset-id", "42",
                     "--name", "Tiny", "--workers", "1"]) == 0  # fmt: skip
        assert main(["plan", "--work", str(work), "-d", "42", "--batch-sizes", "4", "5",
                     "--compact", "--compact-features", "4", "8", "16",
                     "--compact-patch", "16", "32", "32", "--compact-spacing", *map(str, SPACING),
                     "--num-processes", "1"]) == 0  # fmt: skip
    return work


@pytest.fixture
def fresh_work(planned_session, tmp_path) -> Path:
    """A private copy of the planned work folder (raw and preprocessed data, no results)."""
    work = tmp_path / "work"
    for tree in ("nnUNet_raw", "nnUNet_preprocessed"):
        shutil.copytree(planned_session / tree, work / tree, symlinks=True)
    return work
