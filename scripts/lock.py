"""The dependency lock: one file, every package at an exact version (``make lock``).

Inputs are the short hand-written files in ``requirements/`` (``*.in``), which name only
what the project imports. ``requirements/dev.in`` includes all the others, so resolving it
once with pip-tools' ``pip-compile`` gives one consistent set: ``requirements.lock``. Every
install reads it:

* ``make setup`` and CI: ``pip install -r requirements.lock`` into ``.venv``;
* the submission image (``make wheelhouse`` / ``image-local`` / ``image``):
  ``requirements.txt``, the lock's lines for the packages ``requirements/runtime.in``
  names, written by this script, installed ``--no-deps`` on the base image's torch;
* the GPU check's wheels (``make gpu-wheels``): the names in ``benchmarks/gpu_wheels.txt``
  at the lock's versions.

The lock records a digest of its inputs; :func:`check` (run by the tests) fails when an
input changed without ``make lock``, when ``requirements.txt`` is not the lock's view, and
:func:`environment_drift` names every installed distribution that differs from the lock.

Why no hashes: pip's hash-checking mode is all or nothing, and torch is the one package
whose file differs by machine for the same version (the CPU wheel here, the CUDA wheel on
a GPU machine, the base image's own in the container). The lock therefore pins torch by
version only (its local label, ``+cpu``, is dropped) and every other package by version.
A CUDA torch brings its CUDA libraries at the exact versions its own metadata pins; those
are the only distributions allowed beside the lock (:func:`environment_drift`).

Usage: ``python -m scripts.lock compile`` (what ``make lock`` runs, with pip-tools on
PATH) or ``python -m scripts.lock check``. Exit 0 when fresh and consistent, 1 otherwise
(the reasons on stderr).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
INPUTS = REPO / "requirements"
LOCK = REPO / "requirements.lock"
IMAGE_REQUIREMENTS = REPO / "requirements.txt"
#: Distributions a virtual environment has before anything is installed into it.
INSTALLER = frozenset({"pip"})
_DIGEST_LINE = "# inputs-sha256: "
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)")


def normalize(name: str) -> str:
    """A distribution name in PEP 503 form (lower case, runs of ``-_.`` become ``-``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def inputs_digest(folder: Path = INPUTS) -> str:
    """SHA-256 over every ``*.in`` file in ``folder`` (names and contents, sorted)."""
    h = hashlib.sha256()
    for path in sorted(folder.glob("*.in")):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def read_pins(text: str) -> dict[str, str]:
    """``name==version`` lines of a requirements text, by normalised name.

    Raises:
        ValueError: a name pinned twice.
    """
    pins: dict[str, str] = {}
    for line in text.splitlines():
        match = _PIN.match(line.strip())
        if match:
            name = normalize(match.group(1))
            if name in pins:
                raise ValueError(f"{match.group(1)} is pinned twice")
            pins[name] = match.group(2)
    return pins


def input_names(path: Path) -> list[str]:
    """The package names an input file asks for, following its ``-r`` includes."""
    names: list[str] = []
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("-r "):
            names += [n for n in input_names(path.parent / line[3:].strip()) if n not in names]
            continue
        name = normalize(re.split(r"[\s<>=!~;\[]", line, maxsplit=1)[0])
        if name not in names:
            names.append(name)
    return names


def lock_pins(lock: Path = LOCK) -> dict[str, str]:
    """The lock's pins, by normalised name."""
    return read_pins(lock.read_text())


def lock_digest(lock: Path = LOCK) -> str | None:
    """The inputs digest the lock was compiled from, or None when it records none."""
    for line in lock.read_text().splitlines():
        if line.startswith(_DIGEST_LINE):
            return line[len(_DIGEST_LINE) :].strip()
    return None


def image_requirements(pins: dict[str, str], runtime_in: Path = INPUTS / "runtime.in") -> str:
    """``requirements.txt``: the lock's lines for what the inference runtime names."""
    lines = [
        "# The submission image's packages (requirements/runtime.in) at the lock's versions.",
        "# Written by `make lock` from requirements.lock; do not edit. The image installs",
        "# these --no-deps on its base image's torch (Dockerfile).",
    ]
    for name in input_names(runtime_in):
        if name not in pins:
            raise ValueError(f"{name} (requirements/runtime.in) is not in the lock")
        lines.append(f"{name}=={pins[name]}")
    return "\n".join(lines) + "\n"


def _strip_local_labels(text: str) -> str:
    """Drop PEP 440 local labels (``torch==2.13.0+cpu`` -> ``torch==2.13.0``).

    ``==2.13.0`` still matches ``2.13.0+cpu`` where a machine offers the CPU build.
    """
    return re.sub(r"^([A-Za-z0-9._-]+==[^\s+]+)\+[A-Za-z0-9.]+", r"\1", text, flags=re.M)


def compile_lock(pip_compile: str = "pip-compile") -> None:
    """Resolve ``requirements/dev.in`` into ``requirements.lock``, then its views.

    Versions already in the lock are kept when they still satisfy the inputs (pip-compile's
    behaviour); ``--upgrade-package NAME`` through ``PIP_COMPILE_ARGS`` moves one on purpose.
    """
    env = dict(os.environ, CUSTOM_COMPILE_COMMAND="make lock")
    extra = os.environ.get("PIP_COMPILE_ARGS", "").split()
    cmd = [
        pip_compile,
        "--quiet",
        "--strip-extras",
        "--allow-unsafe",
        "--no-emit-index-url",
        "--no-emit-find-links",
        "--no-emit-trusted-host",
        *extra,
        "-o",
        str(LOCK),
        str(INPUTS / "dev.in"),
    ]
    subprocess.run(cmd, check=True, env=env, cwd=REPO)
    text = _strip_local_labels(LOCK.read_text())
    body = [line for line in text.splitlines() if not line.startswith(_DIGEST_LINE)]
    LOCK.write_text(f"{_DIGEST_LINE}{inputs_digest()}\n" + "\n".join(body) + "\n")
    IMAGE_REQUIREMENTS.write_text(image_requirements(lock_pins()))


def check(lock: Path = LOCK) -> list[str]:
    """Reasons the lock and its views are out of date; empty when all is consistent."""
    problems: list[str] = []
    if lock_digest(lock) != inputs_digest(lock.parent / "requirements"):
        problems.append("requirements/*.in changed since the lock was made: run `make lock`")
    pins = lock_pins(lock)
    for name in input_names(lock.parent / "requirements" / "dev.in"):
        if name not in pins:
            problems.append(f"{name} is an input but not in the lock: run `make lock`")
    try:
        expected = image_requirements(pins, lock.parent / "requirements" / "runtime.in")
    except ValueError as exc:
        problems.append(str(exc))
    else:
        image = lock.parent / "requirements.txt"
        if not image.is_file() or image.read_text() != expected:
            problems.append("requirements.txt is not the lock's view: run `make lock`")
    return problems


def installed() -> dict[str, str]:
    """Every distribution installed for this interpreter, by normalised name."""
    found: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(normalize(name), dist.version)
    return found


def _torch_platform_requirements() -> set[str]:
    """What the installed torch build itself requires (CUDA libraries on a CUDA build)."""
    try:
        requires = importlib.metadata.requires("torch") or []
    except importlib.metadata.PackageNotFoundError:
        return set()
    return {normalize(re.split(r"[\s<>=!~;\[(]", r, maxsplit=1)[0]) for r in requires}


def _base_version(version: str) -> str:
    return version.split("+", 1)[0]


def environment_drift(
    pins: dict[str, str], found: dict[str, str], allowed_extra: set[str] = frozenset()
) -> list[str]:
    """How the installed distributions differ from the lock, one line each.

    Args:
        pins: the lock's pins.
        found: installed distributions (name -> version).
        allowed_extra: names that may be installed without being locked (the installer,
            the torch build's own platform libraries).
    """
    drift: list[str] = []
    for name, version in sorted(pins.items()):
        have = found.get(name)
        if have is None:
            drift.append(f"{name}: locked {version}, not installed")
        elif _base_version(have) != _base_version(version):
            drift.append(f"{name}: locked {version}, installed {have}")
    for name, version in sorted(found.items()):
        if name not in pins and name not in allowed_extra:
            drift.append(f"{name}: installed {version}, not in the lock")
    return drift


def current_drift() -> list[str]:
    """:func:`environment_drift` for this interpreter's environment against the lock."""
    allowed = set(INSTALLER) | _torch_platform_requirements() | {"flare24-nnunet-lean"}
    return environment_drift(lock_pins(), installed(), allowed - set(lock_pins()))


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m scripts.lock``."""
    parser = argparse.ArgumentParser(prog="python -m scripts.lock", description=__doc__)
    parser.add_argument("action", choices=("compile", "check"))
    parser.add_argument("--pip-compile", default="pip-compile", help="the pip-compile program")
    args = parser.parse_args(argv)
    if args.action == "compile":
        compile_lock(args.pip_compile)
    problems = check() + current_drift() if args.action == "check" else check()
    for line in problems:
        print(f"lock: {line}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
