"""The GPU check's packages: the carried wheels, installed where something is missing.

The GPU machine has no network. What its Python lacks travels as wheels (``make
gpu-wheels`` fills ``.whl/``, scripts/gpu_wheels.py) and is installed with pip into a
scratch folder (``--target``), which is then put on ``sys.path`` here and on
``PYTHONPATH`` / ``PATH`` for the check's child processes (predict.sh, the probes and
``nnUNetv2_predict_from_modelfolder``, whose console script pip writes into ``bin/``).
Only the standard library is imported here: this runs before anything else can be.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
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
