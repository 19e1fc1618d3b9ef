"""The GPU check (``make gpu-check``) and its wheels, every part that runs without a GPU.

The whole check runs end to end on the CPU (``--device cpu``, tiny models and a small
case), started by the device call that benchmarks/README.md documents and installed the
GPU machine's way: the carried packages only on ``PYTHONPATH`` in a pip ``--target``
layout, a Python that lacks them, a ``PATH`` without the target's ``bin/``. The same
stages, processes, profiler runs and results files as on a GPU, with the device figures
absent. A second run is killed half-way and must have returned what finished. The GPU
section is also written from figures shaped like a GPU run's, the time budget is driven by
a fake clock, and the carried wheels are checked against what the GPU machine has.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import signal
import site
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from benchmarks import gpu_check, gpu_report
from benchmarks.cases import BenchCase
from benchmarks.gpu_cases import CaseSpec, tiles_on_grid
from benchmarks.gpu_check import GpuCheck, TimeBudget, build_parser, exit_status
from benchmarks.gpu_site import ensure_packages
from scripts import gpu_wheels, lock
from tests.conftest import REPO

FLARE_SPACING = (1.0, 0.8037, 0.8037)
FLARE_PATCH = (96, 160, 160)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- cases and time -------------------------------------------------------------------------


def test_cases_have_the_reviewed_sizes_and_tile_counts():
    cases = {c: CaseSpec.parse(c) for c in gpu_check.DEFAULT_CASES}
    shapes = {c: s.target_shape(FLARE_SPACING) for c, s in cases.items()}
    assert shapes == {
        "554@1.0": (554, 510, 510),
        "692@1.25": (865, 510, 510),
        "215@2.5": (538, 510, 510),
    }
    tiles = {c: tiles_on_grid(shape, FLARE_PATCH) for c, shape in shapes.items()}
    # the review's 396 tiles for 554x510x510; 504 for 692 slices at 1 mm
    assert tiles == {"554@1.0": 396, "692@1.25": 648, "215@2.5": 396}
    assert tiles_on_grid((692, 510, 510), FLARE_PATCH) == 504
    assert tiles_on_grid((40, 100, 100), FLARE_PATCH) == 1  # smaller than a tile
    assert cases["554@1.0"].name == "GPU_0554s_1000um"
    assert cases["692@1.25"].shape_zyx == (692, 512, 512)
    assert cases["692@1.25"].spacing_zyx_mm == (1.25, 0.8, 0.8)
    for bad in ("554", "554@", "x@1.0", "0@1.0", "554@-1"):
        with pytest.raises(ValueError, match="SLICES@MM"):
            CaseSpec.parse(bad)


def test_time_budget_gives_each_stage_what_is_left_minus_the_reserve():
    clock = FakeClock()
    budget = TimeBudget(480, reserve_s=15, clock=clock)
    assert budget.allot(120, 30) == 120
    clock.now += 400  # 80 s left, 65 after the reserve
    assert budget.allot(120, 30) == pytest.approx(65)
    assert budget.allot(120, 70) is None
    clock.now += 40
    assert budget.remaining_s() == pytest.approx(40)
    assert budget.allot(120, 30) is None


def _check(tmp_path, clock, argv=()):
    args = build_parser().parse_args(
        ["--device", "cpu", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "w"), *argv]
    )
    return GpuCheck(args, TimeBudget(args.budget_s, clock=clock))


def test_stages_are_skipped_not_overrun_when_the_budget_runs_short(tmp_path):
    clock = FakeClock()
    check = _check(tmp_path, clock)
    check.cases = [
        BenchCase(c, CaseSpec.parse(c).name, CaseSpec.parse(c).shape_zyx, (1, 1, 1), tmp_path)
        for c in gpu_check.DEFAULT_CASES
    ]
    check.models = [SimpleNamespace(name="flare"), SimpleNamespace(name="ensemble")]
    clock.now += 480 - 60  # a minute left: 45 s after the reserve
    assert check.allot("tile") == pytest.approx(45)  # wants 150, at least 30
    clock.now += 20  # 25 s after the reserve: too little for any stage
    assert check.probe("context") is False
    assert check.ours() is False
    assert check.nnunet() is False
    stages = {s.name: s for s in check.state.stages}
    assert stages["context"].status == "skipped" and "30 s needed" in stages["context"].note
    # the largest case is the first one ours would have run
    assert stages["ours"].status == "skipped"
    assert stages["ours"].note.endswith("GPU_0692s_1250um, GPU_0554s_1000um, GPU_0215s_2500um")
    assert stages["nnunet_tta"].status == stages["nnunet_notta"].status == "skipped"
    # the paper's comparison (no TTA) is the one that gets the time first
    assert [s.name for s in check.state.stages][-2:] == ["nnunet_notta", "nnunet_tta"]
    assert exit_status(check) == gpu_check.EXIT_INCOMPLETE
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert "stage cases: not run" in log and "stage context: skipped" in log


# -- the GPU machine's way: its Python, the wheels in a --target folder, the device call ---


def readme_call(marker: str) -> str:
    """The sh lines of the README's code block after ``<!-- marker -->``, one string."""
    text = (REPO / "benchmarks" / "README.md").read_text(encoding="utf-8")
    block = re.search(rf"<!-- {marker} -->\n```sh\n(.*?)```", text, re.S)
    assert block, f"benchmarks/README.md has no {marker} block"
    return block.group(1).strip()


def carried_tops() -> dict[str, list[str]]:
    """Each carried distribution installed here: its top-level entries in site-packages."""
    tops = {}
    for pin in _pins():
        try:
            dist = importlib.metadata.distribution(pin.key)
        except importlib.metadata.PackageNotFoundError:
            continue  # not needed by the versions installed here
        files = [f for f in dist.files or [] if f.parts[0] not in ("..", "__pycache__")]
        tops[pin.key] = sorted({f.parts[0] for f in files})
    return tops


def machine_python(folder: Path, hidden: set[str]) -> Path:
    """A venv of this Python with every installed package except ``hidden`` (the carried ones).

    Like the GPU machine's Python: torch and the scientific stack, none of the carried
    packages, no console scripts in its ``bin/``. The entries are symbolic links.
    """
    base = Path(sys.base_prefix) / "bin" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
    subprocess.run([str(base), "-m", "venv", "--without-pip", str(folder)], check=True)
    (target,) = folder.glob("lib/python*/site-packages")
    for site_dir in filter(Path.is_dir, map(Path, site.getsitepackages())):
        for entry in site_dir.iterdir():
            if entry.name not in hidden and entry.name != "__pycache__":
                (target / entry.name).symlink_to(entry)
    return folder / "bin" / "python3"


def target_folder(folder: Path, tops: dict[str, list[str]], leave_out: str = "") -> Path:
    """What ``pip install --target folder`` of the carried wheels leaves (links, no copies).

    Console scripts go into ``folder/bin`` as pip writes them; the check must not need them.
    """
    (folder / "bin").mkdir(parents=True)
    for key, names in tops.items():
        if key == leave_out:
            continue
        dist = importlib.metadata.distribution(key)
        for name in names:
            (folder / name).symlink_to(dist.locate_file(name))
        for f in dist.files or []:
            if f.parts[0] == ".." and f.parts[-2] == "bin":
                shutil.copy(f.locate(), folder / "bin" / f.name)
    return folder


@pytest.fixture(scope="module")
def gpu_machine(tmp_path_factory) -> dict[str, str]:
    """The environment of a command on the GPU machine after the device call's pip line."""
    root = tmp_path_factory.mktemp("gpu_machine")
    tops = carried_tops()
    python = machine_python(root / "python", {n for names in tops.values() for n in names})
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    # python3 is the machine's; nothing on PATH holds an nnUNetv2_* script
    env["PATH"] = os.pathsep.join([str(python.parent), "/usr/bin", "/bin"])
    env["PYTHONPATH"] = str(target_folder(root / "site", tops))
    return env


def device_call(marker: str, extra: list[str]) -> str:
    """The README's device call after its pip line, with ``extra`` arguments for the check."""
    lines = readme_call(marker).splitlines()
    check = lines[-1]
    assert check.startswith("PYTHONUNBUFFERED=1 python3 -m benchmarks.gpu_check")
    check = check.replace("benchmarks.gpu_check", "benchmarks.gpu_check " + " ".join(extra), 1)
    return "set -o pipefail; " + check


CPU_ARGS = [
    "--device", "cpu", "--models", "tiny", "tiny_ensemble", "--cases", "12@2.5",
    "--in-plane", "64", "--tile-repeats", "1", "--tile-warmup", "0", "--no-warm-up",
]  # fmt: skip


@pytest.fixture(scope="module")
def cpu_check(gpu_machine, tmp_path_factory):
    """One end-to-end run of the documented device call on the CPU, the GPU machine's way.

    Tiny models, one small case, nnU-Net included.
    """
    root = tmp_path_factory.mktemp("gpu_check")
    out = root / "out"
    out.mkdir()  # the device call's $OUT exists before tee opens console.log
    results_before = (REPO / "benchmarks" / "RESULTS.md").read_bytes()
    extra = [*CPU_ARGS, "--work", str(root / "work"), "--site", str(root / "no_site")]
    done = subprocess.run(
        ["bash", "-c", device_call("gpu-check device call", extra)],
        cwd=REPO,
        env={**gpu_machine, "OUT": str(out)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert (REPO / "benchmarks" / "RESULTS.md").read_bytes() == results_before
    return done.returncode, out, root / "work"


def test_readme_documents_the_device_calls_without_make():
    call = readme_call("gpu-check device call")
    pip, check = call.splitlines()
    assert pip.startswith("python3 -m pip install -q --no-index --no-deps ")
    assert "--target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit;" in pip
    assert check == "PYTHONUNBUFFERED=1 python3 -m benchmarks.gpu_check 2>&1 | tee $OUT/console.log"
    assert "make" not in call.split()
    # the check's own install goes where the device call's does
    assert build_parser().parse_args([]).site == Path("/tmp/site")
    fallback = readme_call("gpu-check fallback call").splitlines()
    assert fallback[0] == "export PYTHONPATH=/tmp/site; set -o pipefail"
    argv = fallback[1].split("benchmarks.gpu_check ")[1].split(" 2>&1")[0].split()
    args = build_parser().parse_args(argv)
    assert args.models == ["flare"] and args.cases == ["692@1.25"] and not args.nnunet
    assert args.budget_s <= 150  # with the start-up, inside the second call's 180 s


def test_cpu_check_runs_every_stage_installed_the_gpu_machines_way(cpu_check):
    status, out, work = cpu_check
    data = json.loads((out / "gpu_check.json").read_text())
    assert status == 0, (data["stages"], (out / "console.log").read_text()[-3000:])
    assert data["exit_status"] == 0 and data["partial"] is False
    assert sorted(p.name for p in out.iterdir()) == [
        "RESULTS.md",
        "console.log",
        "context.json",
        "gpu_check.json",
        "gpu_check.log",
        "gpu_section.md",
        "reports.tar.gz",
        "tile.json",
    ]  # eight: the most a device call brings back
    assert [s["name"] for s in data["stages"]] == [
        "wheels",
        "preflight",
        "models",
        "context",
        "tile",
        "cases",
        "ours",
        "nnunet_notta",
        "nnunet_tta",
    ]
    assert all(s["status"] == "done" for s in data["stages"])
    assert data["wheels"]["missing"] == []  # the device call's pip line provided them
    # nnU-Net's console script was not on PATH: a launcher of its entry function was
    launcher = Path(data["programs"]["nnUNetv2_predict_from_modelfolder"])
    assert launcher.parent == work / "bin"
    # the context probe loads the single model and the ensemble's second member
    moments = [m["moment"] for m in data["context"]["moments"]]
    assert moments[0] == "idle, before CUDA" and moments[-1] == "after loading tiny_seed1"
    assert json.loads((out / "context.json").read_text()) == data["context"]
    assert json.loads((out / "tile.json").read_text()) == data["tile"]
    assert [(r["cudnn_benchmark"], r["channels_last_3d"]) for r in data["tile"]["rows"]] == [
        (False, False),
        (True, False),
        (False, True),
        (True, True),
    ]
    assert data["tile"]["tile_flops"] > 0
    assert [(r["model"], r["peer"], r["ok"]) for r in data["runs"]] == [
        ("tiny", "ours", True),
        ("tiny_ensemble", "ours", True),
        ("tiny", "nnunet_notta", True),
        ("tiny", "nnunet_tta", True),
    ]
    (case,) = data["cases"]
    assert case["name"] == "GPU_0012s_2500um" and case["tiles"] == 1  # one tile: cheap on the CPU
    assert "stage nnunet_tta: done" in (out / "console.log").read_text()


def _stages_done(path: Path) -> list[str]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    return [s["name"] for s in data["stages"] if s["status"] == "done"]


def test_a_check_killed_half_way_returns_the_stages_that_finished(gpu_machine, tmp_path):
    """Killed (SIGKILL, with its children) after the context probe, as at a call's limit."""
    out = tmp_path / "out"
    argv = ["python3", "-m", "benchmarks.gpu_check", *CPU_ARGS, "--no-nnunet", "--out", str(out)]
    argv += ["--work", str(tmp_path / "work"), "--site", str(tmp_path / "no_site")]
    proc = subprocess.Popen(
        argv,
        cwd=REPO,
        env=gpu_machine,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    try:
        while "context" not in _stages_done(out / "gpu_check.json"):
            assert proc.poll() is None, "the check ended before the context stage was recorded"
            assert time.monotonic() < deadline, "no gpu_check.json with the context stage"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    data = json.loads((out / "gpu_check.json").read_text())
    assert data["partial"] is True and "exit_status" not in data
    assert _stages_done(out / "gpu_check.json")[:4] == ["wheels", "preflight", "models", "context"]
    # killed during the tile probe: no profiled run had ended, or written the file, yet
    assert "ours" not in _stages_done(out / "gpu_check.json") and data["runs"] == []
    assert data["context"]["moments"][-1]["moment"] == "after loading tiny_seed1"
    assert json.loads((out / "context.json").read_text()) == data["context"]
    assert len(list(out.iterdir())) <= 8


def test_a_missing_import_stops_the_check_at_start_naming_it(gpu_machine, tmp_path):
    """nnunetv2 is there, but not blosc2, which its predict path imports: exit 2 at once."""
    tops = carried_tops()
    assert "blosc2" in tops
    site_dir = target_folder(tmp_path / "site", tops, leave_out="blosc2")
    out = tmp_path / "out"
    argv = ["python3", "-m", "benchmarks.gpu_check", *CPU_ARGS, "--out", str(out)]
    argv += ["--work", str(tmp_path / "work"), "--site", str(tmp_path / "no_site")]
    t0 = time.monotonic()
    done = subprocess.run(
        argv,
        cwd=REPO,
        env={**gpu_machine, "PYTHONPATH": str(site_dir)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    seconds = time.monotonic() - t0
    assert done.returncode == gpu_check.EXIT_USAGE, done.stderr[-3000:]
    assert seconds < 90  # the preflight imports torch and nnU-Net once, on a busy CI machine
    assert "No module named 'blosc2'" in done.stderr
    data = json.loads((out / "gpu_check.json").read_text())
    assert data["exit_status"] == gpu_check.EXIT_USAGE and data["partial"] is False
    assert [(s["name"], s["status"]) for s in data["stages"]] == [
        ("wheels", "done"),
        ("preflight", "failed"),
    ]
    assert "import nnunetv2.inference.predict_from_raw_data" in data["stages"][-1]["note"]


def test_cpu_check_results_file_keeps_the_cpu_section(cpu_check):
    _, out, _ = cpu_check
    section = (out / "gpu_section.md").read_text()
    written = (out / "RESULTS.md").read_text()
    committed = (REPO / "benchmarks" / "RESULTS.md").read_text()

    def between(text, device):
        return re.search(rf"BEGIN {device} section -->\n(.*?)<!-- END", text, re.S).group(1)

    assert between(written, "cpu") == between(committed, "cpu")
    assert between(written, "gpu") == section
    for heading in ("### Targets", "### One tile", "### Stages", "#### Model `tiny_ensemble`"):
        assert heading in section
    assert "GPU_0012s_2500um (64×64×12 at 2.5 mm; 32×32×15 at the model's spacing" in section
    assert "- Packages (as the run imported them): torch " in section and "nnunetv2 " in section
    with tarfile.open(out / "reports.tar.gz") as tar:
        names = tar.getnames()
    assert "logs/probe_tile.log" in names
    logs = [n for n in names if n.endswith("/GPU_0012s_2500um.log")]
    assert len(logs) == 4  # ours with each model, nnU-Net without and with TTA
    assert sum("/nnunet_notta/" in n or "/nnunet_tta/" in n for n in logs) == 2
    assert not any("predictions" in n for n in names)


# -- the GPU section from GPU-shaped figures ---------------------------------------------------


def _moment(name, nvml_used, reserved=0.0, allocated=0.0, **extra):
    return {
        "moment": name,
        "t_s": 1.0,
        "nvml_total_mb": 143771.0,
        "nvml_used_mb": nvml_used,
        "cuda_total_mb": 143167.0,
        "cuda_used_mb": nvml_used - 604.0,
        "reserved_mb": reserved,
        "allocated_mb": allocated,
        "nvml_source": "nvml",
        **extra,
    }


def test_gpu_section_derives_driver_context_and_tile_figures():
    context = {
        "moments": [
            {"moment": "idle, before CUDA", "t_s": 0.0, "nvml_used_mb": 610.0},
            _moment("after CUDA init", 1110.0),
            _moment("after the model loads", 1240.0, reserved=126.0, allocated=118.0),
            _moment(
                "after the first float16 tile",
                3900.0,
                reserved=2400.0,
                allocated=130.0,
                max_reserved_mb=2400.0,
                max_allocated_mb=2050.0,
            ),
        ],
        "cap_4096": {"cap_mb": 2598.0, "describe": "allocator cap 2598 MB = ..."},
    }
    tile = {
        "model": "/x/flare",
        "patch_size": [96, 160, 160],
        "n_parameters": 30_800_000,
        "tile_flops": 1.12e12,
        "rows": [
            {"cudnn_benchmark": b, "channels_last_3d": c, "first_ms": 900.0, "median_ms": m}
            | {"min_ms": m - 1, "repeats": 10, "peak_allocated_mb": 2000.0}
            | {"peak_reserved_mb": 2300.0, "activations_mb": 1880.0}
            for b, c, m in ((False, False, 40.0), (True, False, 28.0), (False, True, 35.0))
        ],
    }
    data = {
        "gpu": {"available": True, "name": "NVIDIA H200", "driver": "580", "total_mb": 143771.0},
        "context": context,
        "tile": tile,
        "stages": [{"name": "nnunet_notta", "status": "skipped", "seconds": 0.0, "note": "x"}],
        "checks": [],
        "budget_s": 480,
        "elapsed_s": 470,
        "versions": {"nnunetv2": "2.8.1", "torch": "2.9.0", "SimpleITK": "2.5.7", "six": "1"},
    }
    section = gpu_report.gpu_section(data, None)
    assert (
        "- Packages (as the run imported them): torch 2.9.0, nnunetv2 2.8.1, SimpleITK" in section
    )
    assert "NVIDIA H200, driver 580, 143771 MB (NVML)" in section
    assert (
        "Driver reservation (NVML total − CUDA total, invisible to mem_get_info): 604 MB" in section
    )
    assert "used before this process touched CUDA; CUDA context at start: 500 MB" in section
    # outside the allocator: 1240-126 = 1114 after loading, 3900-2400 = 1500 after the tile
    assert "Context growth at the first float16 tile" in section and ": 386 MB" in section
    assert "| after the model loads | 1240 | 636 | 126 | 118 | 1.0 |" in section
    assert "1.12 TFLOP per tile" in section
    assert "| on | off | 28.0 | 27.0 | 900 | 40.0 | 2000 | 2300 | 1880 |" in section
    assert "Fastest: cudnn.benchmark on, channels_last_3d off (28.0 ms" in section
    assert "**Incomplete**: nnunet_notta skipped (x)" in section
    assert "No profiled run" in section


def _run(model, peer, case, time_s, ok=True, error=None):
    return SimpleNamespace(
        model=model,
        peer=peer,
        case=case,
        ok=ok,
        result=SimpleNamespace(error=error, metrics=SimpleNamespace(time_s=time_s)),
    )


def test_a_stopped_nnunet_run_bounds_the_speed_up_from_below():
    stopped = "timed out after 300 s and was killed"
    suite = SimpleNamespace(
        runs=[
            _run("flare", "ours", "big", 40.0),
            _run("flare", "ours", "big", 30.0),  # a second repeat: the bound takes the slower
            _run("flare", "nnunet_tta", "big", 300.0, ok=False, error=stopped),
            _run("ensemble", "ours", "big", 80.0),
            _run("ensemble", "nnunet_tta", "big", 300.0, ok=False, error=stopped),
            _run("other", "ours", "big", 10.0),
            _run("other", "nnunet_tta", "big", 20.0, ok=False, error="exit code 1"),
        ]
    )
    flare, ensemble = gpu_report.lower_bounds(suite)
    assert flare["model"] == "flare" and flare["met"] is True
    assert flare["measured"].startswith("≥ 7.50× on big")
    assert ensemble["met"] is None and ensemble["measured"].startswith("≥ 3.75×")


# -- wheels ------------------------------------------------------------------------------------


def _pins():
    return gpu_wheels.pins_from_lock(gpu_wheels.PINS.read_text(), gpu_wheels.LOCK.read_text())


def test_wheel_pins_are_the_versions_the_project_runs_with():
    pins = {p.key: p.version for p in _pins()}
    assert {"simpleitk", "dynamic_network_architectures", "nnunetv2"} <= set(pins)
    locked = lock.lock_pins()
    for name, version in pins.items():
        assert locked[lock.normalize(name)] == version, name
        assert importlib.metadata.version(name) == version, name
    with pytest.raises(ValueError, match=r"not in requirements\.lock"):
        gpu_wheels.pins_from_lock("nnunetv2\nnot-a-locked-package\n", gpu_wheels.LOCK.read_text())
    with pytest.raises(ValueError, match="not a bare package name"):
        gpu_wheels.pins_from_lock("nnunetv2==2.8.1\n", gpu_wheels.LOCK.read_text())


def test_wheel_folder_logic():
    with pytest.raises(ValueError, match="not name==version"):
        gpu_wheels.parse_pins("numpy>=2\n")
    with pytest.raises(ValueError, match="pinned twice"):
        gpu_wheels.parse_pins("SimpleITK==2.5.7\nsimpleitk==2.5.6\n")
    pin = gpu_wheels.Pin("SimpleITK", "2.5.7")
    current = "simpleitk-2.5.7-cp311-abi3-manylinux2014_x86_64.manylinux_2_17_x86_64.whl"
    assert gpu_wheels.matches(current, pin)
    assert not gpu_wheels.matches(current.replace("2.5.7", "2.5.6"), pin)
    acvl = gpu_wheels.Pin("acvl-utils", "0.2.6")
    assert gpu_wheels.matches("acvl_utils-0.2.6-py3-none-any.whl", acvl)
    files = [current, current.replace("2.5.7", "2.5.6"), "acvl_utils-0.2.6-py3-none-any.whl"]
    assert gpu_wheels.stale([*files, "notes.txt"], [pin, acvl]) == [files[1]]
    argv = gpu_wheels.download_argv(pin, Path("/w"))
    assert argv[-3:] == ["-d", "/w", "SimpleITK==2.5.7"]
    assert "--only-binary=:all:" in argv and argv[argv.index("--python-version") + 1] == "3.12"
    assert argv.count("--platform") == len(gpu_wheels.PLATFORMS) >= 5
    assert gpu_wheels.is_pure("acvl_utils-0.2.6-py3-none-any.whl")
    assert not gpu_wheels.is_pure(current)


def _tiny_wheel(folder: Path) -> Path:
    """A real wheel of a one-module package, as pip would accept it."""
    name, version = "gpu_check_probe_pkg", "1.0"
    files = {
        f"{name}.py": b"VALUE = 42\n" + b"# padding to be worth compressing\n" * 64,
        f"{name}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\n"
        f"Version: {version}\n".encode(),
        f"{name}-{version}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\n"
        b"Root-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = [
        f"{path},sha256={hashlib.sha256(data).hexdigest()},{len(data)}"
        for path, data in files.items()
    ]
    files[f"{name}-{version}.dist-info/RECORD"] = (
        "\n".join([*record, f"{name}-{version}.dist-info/RECORD,,"]) + "\n"
    ).encode()
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for entry, data in files.items():
            info = zipfile.ZipInfo(entry, date_time=(2024, 5, 6, 7, 8, 10))
            info.external_attr = (0o755 if entry.endswith(".py") else 0o644) << 16
            z.writestr(info, data, zipfile.ZIP_DEFLATED)
    return path


def test_recompressed_wheel_installs_where_a_module_is_missing(tmp_path, monkeypatch):
    wheels = tmp_path / "whl"
    wheels.mkdir()
    wheel = _tiny_wheel(wheels)

    def entries(path):
        with zipfile.ZipFile(path) as z:
            return {i.filename: (z.read(i), i.date_time, i.external_attr) for i in z.infolist()}

    before = entries(wheel)
    assert not gpu_wheels.is_recompressed(wheel)
    gpu_wheels.recompress(wheel)
    assert gpu_wheels.is_recompressed(wheel)
    assert entries(wheel) == before  # bytes, dates and permissions
    with zipfile.ZipFile(wheel) as z:
        assert z.getinfo("gpu_check_probe_pkg.py").compress_type == zipfile.ZIP_LZMA

    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", "")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    target = tmp_path / "site"
    info = ensure_packages(wheels, target, ["gpu_check_probe_pkg", "json"], timeout_s=120)
    assert info["missing"] == ["gpu_check_probe_pkg"] and info["installed"] == [wheel.name]
    # importable here and in child processes (PYTHONPATH), pip's bin/ on PATH
    child = subprocess.run(
        [sys.executable, "-c", "import gpu_check_probe_pkg as m; print(m.VALUE)"],
        capture_output=True,
        text=True,
    )
    assert child.stdout.strip() == "42", child.stderr
    assert str(target / "bin") in __import__("os").environ["PATH"]
    # a second run finds it installed and installs nothing
    assert ensure_packages(wheels, target, ["gpu_check_probe_pkg"], 120)["installed"] == []
    with pytest.raises(RuntimeError, match="no wheels"):
        ensure_packages(tmp_path / "none", tmp_path / "site2", ["no_such_module_x"], 10)


def test_carried_wheels_cover_what_the_gpu_machine_lacks(cpu_check):
    """Every package the check and nnU-Net's predict path import is there or carried.

    The preflight stage imported them all in the machine-like Python and named each
    distribution it loaded.
    """
    _, out, _ = cpu_check
    versions = json.loads((out / "gpu_check.json").read_text())["versions"]
    imported = {gpu_wheels.normalize(n) for n in versions}
    assert {"nnunetv2", "simpleitk", "dynamic_network_architectures", "torch"} <= imported
    there = {
        gpu_wheels.normalize(line)
        for line in (REPO / "benchmarks" / "gpu_machine_packages.txt").read_text().splitlines()
        if line and not line.startswith("#")
    }
    carried = {p.key for p in _pins()}
    # tifffile tries imagecodecs and falls back without it
    optional = {"imagecodecs"}
    assert imported - there - carried - optional == set()
    assert carried.isdisjoint(there)  # nothing carried that the machine has
