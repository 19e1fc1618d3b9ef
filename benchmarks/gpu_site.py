"""The GPU check's packages: the carried wheels, installed where something is missing.

The GPU machine has no network. What its Python lacks travels as wheels (``make
gpu-wheels`` fills ``.whl/``, scripts/gpu_wheels.py) and is installed with pip into a
scratch folder (``--target``), which is then put on ``sys.path`` here and on
``PYTHONPATH`` for the check's child processes (predict.sh, the probes and
``nnUNetv2_predict_from_modelfolder``).

A console script such as ``nnUNetv2_predict_from_modelfolder`` is not looked up on
``PATH`` alone: the machine's own ``pip install --target DIR`` line writes it into
``DIR/bin``, which nothing puts on ``PATH``. :func:`provide_program` finds the
distribution's entry function instead (its metadata travels with the package, so it is
found wherever the package is importable) and writes a launcher for it.
Only the standard library is imported here: this runs before anything else can be.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def missing_modules(modules: Sequence[str]) -> list[str]:
    """The modules of ``modules`` that cannot be imported here."""
    importlib.invalidate_caches()
    return [m for m in modules if importlib.util.find_spec(m) is None]


def use_site(target: Path) -> None:
    """Make ``target`` (a pip --target folder) importable here and in child processes."""
    if str(target) not in sys.path:
        sys.path.insert(0, str(target))
    env_path = os.environ.get("PYTHONPATH", "")
    if str(target) not in env_path.split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(target), env_path) if p)
    bin_dir = str(target / "bin")
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join((bin_dir, os.environ.get("PATH", "")))
    importlib.invalidate_caches()


def install_wheels(
    wheels: Sequence[Path], target: Path, timeout_s: float, python: str = sys.executable
) -> None:
    """``pip install --no-index --no-deps --target`` of the carried wheels (no network).

    Raises:
        RuntimeError: pip failed or ran past ``timeout_s`` (one line).
    """
    argv = [python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
    argv += ["--no-cache-dir", "--upgrade", "--target", str(target), *map(str, wheels)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"pip install ran past {timeout_s:.0f} s") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise RuntimeError(f"pip install failed: {last}")


def ensure_packages(
    wheels_dir: Path, target: Path, modules: Sequence[str], timeout_s: float
) -> dict[str, Any]:
    """Install the carried wheels into ``target`` when one of ``modules`` is missing.

    Returns:
        What was done: ``missing`` before, ``installed`` wheel names, ``seconds``.

    Raises:
        RuntimeError: modules are missing and the wheels cannot provide them (one line).
    """
    t = time.perf_counter()
    if target.is_dir():
        use_site(target)  # an earlier run on this machine installed them already
    missing = missing_modules(modules)
    info: dict[str, Any] = {"missing": missing, "installed": [], "target": str(target)}
    if missing:
        wheels = sorted(wheels_dir.glob("*.whl"))
        if not wheels:
            raise RuntimeError(
                f"missing {', '.join(missing)} and no wheels in {wheels_dir} "
                "(run `make gpu-wheels` and carry .whl)"
            )
        install_wheels(wheels, target, timeout_s)
        use_site(target)
        info["installed"] = [w.name for w in wheels]
        info["mib"] = round(sum(w.stat().st_size for w in wheels) / 2**20, 1)
        still = missing_modules(modules)
        if still:
            raise RuntimeError(f"still missing after installing the wheels: {', '.join(still)}")
    info["seconds"] = round(time.perf_counter() - t, 1)
    return info


def entry_point(name: str) -> importlib.metadata.EntryPoint | None:
    """The console-script entry point ``name`` of an importable distribution, if any."""
    importlib.invalidate_caches()
    found = importlib.metadata.entry_points(group="console_scripts", name=name)
    return next(iter(found), None)


def write_launcher(
    name: str, ep: importlib.metadata.EntryPoint, folder: Path, python: str = sys.executable
) -> Path:
    """``folder/name``: a shell script that runs ``ep``'s function with ``python``.

    It does what the console script pip would write does, but with this interpreter
    (a script found elsewhere may name another one in its first line).
    """
    code = (
        f"import importlib, sys; f = importlib.import_module({ep.module!r})\n"
        f"for part in {ep.attr!r}.split('.'): f = getattr(f, part)\n"
        f"sys.argv[0] = {name!r}; sys.exit(f())"
    )
    path = folder / name
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f'#!/bin/sh\nexec {shlex.quote(python)} -c {shlex.quote(code)} "$@"\n', encoding="utf-8"
    )
    path.chmod(0o755)
    return path


def provide_program(name: str, folder: Path) -> str:
    """Make the console script ``name`` runnable by name in this process and its children.

    Next to this Python or on ``PATH`` as before; else a launcher of its entry function
    is written into ``folder``, which goes first on ``PATH``.

    Returns:
        The program's path.

    Raises:
        FileNotFoundError: neither a program nor an entry point of that name (one line).
    """
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if found is not None:
        return found
    ep = entry_point(name)
    if ep is None:
        raise FileNotFoundError(
            f"program {name}: not next to {sys.executable}, not on PATH, and no "
            "importable distribution has it as an entry point"
        )
    path = write_launcher(name, ep, folder)
    if str(folder) not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join(p for p in (str(folder), os.environ.get("PATH")) if p)
    return str(path)
