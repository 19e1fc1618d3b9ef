"""The dependency lock: the environment the tests run in is exactly requirements.lock.

A fresh clone installs the lock (``make setup``, ``.ci/run``); when the registry publishes
a newer version of anything, the install still takes the locked one, and these tests fail
if it did not, or if an input under requirements/ changed without ``make lock``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from scripts import lock
from tests.conftest import REPO


def test_installed_environment_is_exactly_the_lock():
    # Every installed distribution at its locked version, nothing locked missing, nothing
    # installed that the lock does not name (but pip itself and a CUDA torch's libraries).
    assert lock.current_drift() == []


def test_lock_is_fresh_for_its_inputs_and_requirements_txt_is_its_view():
    assert lock.check() == []


def _copy_of_the_lock(tmp_path: Path) -> Path:
    shutil.copytree(REPO / "requirements", tmp_path / "requirements")
    for name in ("requirements.lock", "requirements.txt"):
        shutil.copy(REPO / name, tmp_path / name)
    return tmp_path / "requirements.lock"


def test_an_input_changed_without_make_lock_is_caught(tmp_path):
    copy = _copy_of_the_lock(tmp_path)
    assert lock.check(copy) == []
    runtime = tmp_path / "requirements" / "runtime.in"
    runtime.write_text(runtime.read_text() + "scipy\n")
    problems = lock.check(copy)
    assert any("changed since the lock was made" in p for p in problems), problems


def test_a_hand_edited_image_requirements_file_is_caught(tmp_path):
    copy = _copy_of_the_lock(tmp_path)
    image = tmp_path / "requirements.txt"
    image.write_text(image.read_text().replace("numpy==", "numpy>="))
    assert lock.check(copy) == ["requirements.txt is not the lock's view: run `make lock`"]


def test_drift_names_every_difference():
    pins = {"numpy": "2.4.6", "blosc2": "4.14.1", "torch": "2.13.0", "tqdm": "4.70.1"}
    found = {
        "numpy": "2.4.6",
        "blosc2": "4.15.0",  # the registry moved on
        "torch": "2.13.0+cpu",  # a local build label is the same release
        "pip": "23.2.1",
        "nvidia-cudnn-cu13": "9.1",
        "requests": "2.0",
    }
    drift = lock.environment_drift(pins, found, {"pip", "nvidia-cudnn-cu13"})
    assert drift == [
        "blosc2: locked 4.14.1, installed 4.15.0",
        "tqdm: locked 4.70.1, not installed",
        "requests: installed 2.0, not in the lock",
    ]


def test_image_requirements_follow_the_runtime_input_with_lock_versions():
    pins = lock.lock_pins()
    image = lock.read_pins((REPO / "requirements.txt").read_text())
    assert list(image) == lock.input_names(REPO / "requirements" / "runtime.in")
    assert all(pins[name] == version for name, version in image.items())
    assert image["torch"] == "2.13.0"  # the base image's release, no local build label
    with pytest.raises(ValueError, match="not in the lock"):
        lock.image_requirements({"torch": "2.13.0"})


def test_inputs_name_what_the_project_imports_and_the_lock_pins_them_all():
    names = lock.input_names(REPO / "requirements" / "dev.in")
    assert {"torch", "nnunetv2", "simpleitk", "pytest", "ruff", "nvidia-ml-py"} <= set(names)
    assert set(names) <= set(lock.lock_pins())
    with pytest.raises(ValueError, match="pinned twice"):
        lock.read_pins("SimpleITK==2.5.7\nsimpleitk==2.5.6\n")
