"""Collect the wheels the GPU check carries to a machine without network (``make gpu-wheels``).

The GPU machine's Python 3.12 has torch with CUDA and the scientific stack, but not
SimpleITK, dynamic_network_architectures, nnU-Net and the few packages nnU-Net's predict
path imports (benchmarks/gpu_wheels.txt names them, with why; the versions are the
lock's, requirements.lock). This script puts exactly those, one version each, into a
git-ignored folder (``.whl/``) for CPython 3.12 on manylinux x86_64:

1. a binary wheel from the package index (``pip download --only-binary=:all:`` with the
   target's Python version and platform tags), or, for a pure-Python package published
   only as a source archive, a wheel built here (``pip wheel --no-deps``; it must come
   out ``py3-none-any``, or it would not run there);
2. wheels that match no pin are removed (two versions of one package stop the install);
3. while the folder is over the size limit (60 MiB: the tree that travels with a device
   call has 64 MiB), the largest wheel is recompressed with LZMA. SimpleITK's wheel is
   50 MiB deflated and 27 MiB with LZMA; pip reads any compression Python's zipfile
   reads, and the files, RECORD and hashes inside do not change.

Usage: ``python -m scripts.gpu_wheels [--out .whl] [--limit-mib 60]``. Exit 0 when the
folder is complete and within the limit, 1 otherwise (one line on stderr).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from inference.atomic import atomic_path

REPO = Path(__file__).resolve().parents[1]
PINS = REPO / "benchmarks" / "gpu_wheels.txt"
LOCK = REPO / "requirements.lock"
MIB = 2**20
LIMIT_MIB = 60.0
PYTHON_VERSION = "3.12"
#: pip matches manylinux tags exactly, so every glibc level the wheels use is named.
PLATFORMS = (
    "manylinux_2_35_x86_64",
    "manylinux_2_34_x86_64",
    "manylinux_2_31_x86_64",
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
#: Entries smaller than this are left as they are when a wheel is recompressed.
_SMALL_ENTRY = 1024


@dataclass(frozen=True)
class Pin:
    """One ``name==version`` line.

    Attributes:
        name: the distribution name as written.
        version: the exact version.
    """

    name: str
    version: str

    @property
    def key(self) -> str:
        """The name as wheel file names spell it (PEP 427: runs of ``-_.`` become ``_``)."""
        return normalize(self.name)

    def __str__(self) -> str:
        return f"{self.name}=={self.version}"


def normalize(name: str) -> str:
    """A distribution name as it appears in wheel file names, lower case."""
    return re.sub(r"[-_.]+", "_", name).lower()


def parse_pins(text: str) -> list[Pin]:
    """``name==version`` lines; comments and blank lines are skipped.

    Raises:
        ValueError: a line that is not an exact pin, or a name given twice.
    """
    pins: list[Pin] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!_-]+)", line)
        if match is None:
            raise ValueError(f"line {number}: {line!r} is not name==version")
        pin = Pin(match.group(1), match.group(2))
        if any(p.key == pin.key for p in pins):
            raise ValueError(f"line {number}: {pin.name} is pinned twice")
        pins.append(pin)
    return pins


def pins_from_lock(names_text: str, lock_text: str) -> list[Pin]:
    """The names listed in ``names_text`` (one a line), each at the lock's version.

    Raises:
        ValueError: a line that is not a bare name, a name given twice, or one the lock
            does not pin (run ``make lock`` after adding it to ``requirements/*.in``).
    """
    locked = {normalize(p.name): p for p in parse_pins(_pin_lines(lock_text))}
    pins: list[Pin] = []
    for number, raw in enumerate(names_text.splitlines(), 1):
        name = raw.split("#", 1)[0].strip()
        if not name:
            continue
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            raise ValueError(f"line {number}: {name!r} is not a bare package name")
        if normalize(name) not in locked:
            raise ValueError(f"line {number}: {name} is not in requirements.lock")
        if any(p.key == normalize(name) for p in pins):
            raise ValueError(f"line {number}: {name} is listed twice")
        pins.append(Pin(name, locked[normalize(name)].version))
    return pins


def _pin_lines(lock_text: str) -> str:
    """The ``name==version`` lines of a pip-compile lock (its ``# via`` notes dropped)."""
    return "\n".join(line for line in lock_text.splitlines() if "==" in line.split("#")[0])


def wheel_pin_key(filename: str) -> tuple[str, str] | None:
    """(normalized name, version) of a wheel file name, None for anything else."""
    if not filename.endswith(".whl"):
        return None
    parts = filename[: -len(".whl")].split("-")
    if len(parts) < 5:
        return None
    return normalize(parts[0]), parts[1]


def matches(filename: str, pin: Pin) -> bool:
    """True when ``filename`` is a wheel of exactly this pin."""
    return wheel_pin_key(filename) == (pin.key, pin.version)


def stale(filenames: list[str], pins: list[Pin]) -> list[str]:
    """Wheels in the folder that match no pin (other versions, other packages)."""
    return [f for f in filenames if f.endswith(".whl") and not any(matches(f, p) for p in pins)]


def download_argv(pin: Pin, dest: Path, python: str = sys.executable) -> list[str]:
    """``pip download`` of the pin's binary wheel for CPython 3.12 on manylinux x86_64."""
    argv = [python, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]
    argv += ["--python-version", PYTHON_VERSION, "--implementation", "cp"]
    for platform in PLATFORMS:
        argv += ["--platform", platform]
    return [*argv, "-d", str(dest), str(pin)]


def build_argv(pin: Pin, dest: Path, python: str = sys.executable) -> list[str]:
    """``pip wheel`` of the pin alone, from its source archive."""
    return [python, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(dest), str(pin)]


def is_pure(filename: str) -> bool:
    """True for a wheel that runs on any Python 3 and platform (``py3-none-any``)."""
    tags = filename[: -len(".whl")].split("-")[-3:]
    return tags[1:] == ["none", "any"] and all(
        t.startswith("py3") or t == "py2" for t in tags[0].split(".")
    )


def is_recompressed(path: Path) -> bool:
    """True when every entry worth compressing is LZMA already."""
    with zipfile.ZipFile(path) as z:
        big = [i for i in z.infolist() if i.file_size >= _SMALL_ENTRY]
        return bool(big) and all(i.compress_type == zipfile.ZIP_LZMA for i in big)


def recompress(path: Path) -> None:
    """Rewrite the wheel with LZMA entries: same names, bytes, dates and permissions."""
    with (
        atomic_path(path) as tmp,
        zipfile.ZipFile(path) as src,
        zipfile.ZipFile(tmp, "w") as dst,
    ):
        for info in src.infolist():
            data = src.read(info)
            if info.file_size >= _SMALL_ENTRY:
                info.compress_type = zipfile.ZIP_LZMA
            dst.writestr(info, data)


def folder_mib(folder: Path) -> float:
    """Size of the folder's wheels in MiB."""
    return sum(p.stat().st_size for p in folder.glob("*.whl")) / MIB


def shrink_to(folder: Path, limit_mib: float, log=print) -> bool:
    """Recompress the largest wheels, one at a time, until the folder fits ``limit_mib``."""
    while folder_mib(folder) > limit_mib:
        candidates = [p for p in folder.glob("*.whl") if not is_recompressed(p)]
        if not candidates:
            return False
        largest = max(candidates, key=lambda p: p.stat().st_size)
        before = largest.stat().st_size / MIB
        log(f"recompressing {largest.name} ({before:.1f} MiB) with LZMA; this takes minutes")
        recompress(largest)
        log(f"  -> {largest.stat().st_size / MIB:.1f} MiB")
    return True


def fetch(pin: Pin, folder: Path, run=subprocess.run) -> str:
    """Put the pin's wheel into ``folder``; returns how (present, downloaded, built)."""
    if any(matches(p.name, pin) for p in folder.glob("*.whl")):
        return "present"
    if run(download_argv(pin, folder), capture_output=True, text=True).returncode == 0:
        return "downloaded"
    with tempfile.TemporaryDirectory() as tmp:
        done = run(build_argv(pin, Path(tmp)), capture_output=True, text=True)
        built = [p for p in Path(tmp).glob("*.whl") if matches(p.name, pin)]
        if done.returncode != 0 or not built:
            reason = (done.stderr or done.stdout or "").strip().splitlines()[-1:] or ["no wheel"]
            raise RuntimeError(f"{pin}: no binary wheel for Python 3.12 and no build ({reason[0]})")
        if not is_pure(built[0].name):
            raise RuntimeError(f"{pin}: only a source archive with compiled code ({built[0].name})")
        with atomic_path(folder / built[0].name) as tmp:
            shutil.copyfile(built[0], tmp)
    return "built"


def collect(folder: Path, pins: list[Pin], limit_mib: float, log=print) -> bool:
    """Make ``folder`` hold exactly the pins' wheels within ``limit_mib``; True when done."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in stale([p.name for p in folder.iterdir()], pins):
        log(f"removing {name}: no pin asks for it")
        (folder / name).unlink()
    for pin in pins:
        log(f"{pin}: {fetch(pin, folder)}")
    if not shrink_to(folder, limit_mib, log):
        log(f"error: {folder_mib(folder):.1f} MiB of wheels, over the {limit_mib:g} MiB limit")
        return False
    for path in sorted(folder.glob("*.whl")):
        how = "lzma" if is_recompressed(path) else "deflate"
        log(f"  {path.stat().st_size / MIB:6.1f} MiB  {how:<7}  {path.name}")
    log(f"  {folder_mib(folder):6.1f} MiB in all (limit {limit_mib:g} MiB), {len(pins)} wheels")
    return True


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    p = argparse.ArgumentParser(
        prog="python -m scripts.gpu_wheels",
        description=__doc__.split("\n\n")[0],
        epilog="Then name the folder in the device call's carry list (see benchmarks/README.md).",
    )
    p.add_argument("--out", type=Path, default=REPO / ".whl", help="wheel folder (.whl)")
    p.add_argument("--pins", type=Path, default=PINS, help="names (benchmarks/gpu_wheels.txt)")
    p.add_argument("--lock", type=Path, default=LOCK, help="versions (requirements.lock)")
    p.add_argument("--limit-mib", type=float, default=LIMIT_MIB, help="size limit (60)")
    args = p.parse_args(argv)
    try:
        pins = pins_from_lock(
            args.pins.read_text(encoding="utf-8"), args.lock.read_text(encoding="utf-8")
        )
        ok = collect(args.out, pins, args.limit_mib)
    except (OSError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
