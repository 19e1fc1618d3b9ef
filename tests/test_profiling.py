"""The profiler (python -m profiling): real child processes, real NIfTI files, a fake GPU.

No GPU is needed: GPU arithmetic is checked with a scripted GPU source handed to the
sampler and the CLI (constructor injection), against values computed by hand.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from inference.cases import find_cases
from inference.nifti import Geometry, read_geometry, write_image
from profiling.cli import main
from profiling.compare import compare, format_table, load_report
from profiling.docker import container_name_for, docker_argv
from profiling.metrics import area_mb_s, case_metrics
from profiling.report import CSV_COLUMNS, csv_row
from profiling.runner import CaseResult
from profiling.sampler import Sampler, Samples, measure_idle_mb
from profiling.sources import (
    GpuReading,
    GpuUnavailable,
    NullSource,
    NvmlSource,
    open_gpu_source,
)
from profiling.staging import CLONE, COPY, stage_case

PY = sys.executable


class ScriptedGpu:
    """A GPU source that returns scripted device memory, one value per read (the last one
    repeats), and records which pids it was asked about."""

    def __init__(self, values_mb: list[float], process_mb: float | None = None) -> None:
        self.values_mb = values_mb
        self.process_mb = process_mb
        self.calls = 0
        self.pids_seen: list[tuple[int, ...] | None] = []
        self.lock = threading.Lock()

    def read(self, pids):
        with self.lock:
            value = self.values_mb[min(self.calls, len(self.values_mb) - 1)]
            self.calls += 1
            self.pids_seen.append(None if pids is None else tuple(pids))
        return GpuReading(used_mb=value, util_percent=50.0, process_mb=self.process_mb)

    def describe(self):
        return {"available": True, "index": 0, "name": "Fake GPU", "driver": "0.0", "total_mb": 8e3}

    def close(self):
        pass


def write_case(folder: Path, name: str, size_xyz=(8, 7, 4)) -> Path:
    geometry = Geometry(size_xyz, (0.8, 0.8, 5.0), (1.0, 2.0, 3.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    path = folder / f"{name}_0000.nii.gz"
    write_image(path, np.zeros(geometry.shape_zyx, np.int16), geometry)
    return path


def write_script(path: Path, body: str) -> Path:
    path.write_text(textwrap.dedent(body))
    return path


def read_csv(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0].keys()) == CSV_COLUMNS
    return {row["case"]: row for row in rows}


# A command that behaves per case: copies the input to the expected output, or fails in the
# ways a submission can fail. Case names pick the behaviour.
CASE_COMMAND = """
    import os, shutil, sys, time
    from pathlib import Path
    src = next(Path(os.environ["INPUT_DIR"]).glob("*_0000.nii.gz"))
    name = src.name[: -len("_0000.nii.gz")]
    out = Path(os.environ["OUTPUT_DIR"]) / f"{name}.nii.gz"
    print("staged:", sorted(p.name for p in src.parent.iterdir()))
    if name.startswith("crash"):
        print("boom: model file missing", file=sys.stderr)
        sys.exit(3)
    if name.startswith("silent"):
        sys.exit(0)
    if name.startswith("hang"):
        time.sleep(60)
    if name.startswith("wrongsize"):
        other = Path(sys.argv[1])
        shutil.copy(other, out)
        sys.exit(0)
    time.sleep(float(os.environ.get("CHILD_SLEEP_S", "0")))
    shutil.copy(src, out)
"""


def test_trapezoid_area_matches_hand_computation():
    # 0.1 * [(0+1000)/2 + (1000+5000)/2 + (5000+5000)/2 + (5000+1000)/2] = 50+300+500+300
    assert area_mb_s([0, 1000, 5000, 5000, 1000], 0.1) == pytest.approx(1150.0)
    assert area_mb_s([2000, 2000, 2000], 0.25) == pytest.approx(1000.0)
    assert area_mb_s([3000], 0.1) == 0.0
    assert area_mb_s([], 0.1) == 0.0


def _samples(gpu_mb, interval_s=0.1, rss_mb=None):
    n = len(gpu_mb)
    return Samples(
        interval_s=interval_s,
        t_s=[k * interval_s for k in range(n)],
        gpu_used_mb=list(gpu_mb),
        gpu_process_mb=[None] * n,
        gpu_util_percent=[None] * n,
        rss_mb=list(rss_mb) if rss_mb is not None else [100.0] * n,
        cpu_percent=[0.0] * n,
    )


def test_gpu_metrics_and_flags_at_45_s_and_4096_mb():
    m = case_metrics(45.0, _samples([0, 1000, 5000, 5000, 1000]))
    assert m.max_gpu_mb == 5000
    assert m.total_gpu_mb_s == pytest.approx(1150.0)
    assert m.over_memory is True
    assert m.over_time is False  # exactly at the tolerance is within it
    assert case_metrics(45.01, _samples([100])).over_time is True
    assert case_metrics(1.0, _samples([4096, 4096])).over_memory is False
    assert case_metrics(1.0, _samples([4096, 4096.5])).over_memory is True
    # A failed GPU read holds the previous value, so the tick grid (dx) stays intact.
    gap = case_metrics(1.0, _samples([None, 1000, None, 3000]))
    assert gap.max_gpu_mb == 3000
    assert gap.total_gpu_mb_s == pytest.approx(area_mb_s([1000, 1000, 1000, 3000], 0.1))
    rss = case_metrics(1.0, _samples([0, 0, 0], rss_mb=[100, 300, 200]))
    assert rss.max_rss_mb == 300
    assert rss.total_rss_mb_s == pytest.approx(0.1 * (200 + 250))


def test_no_gpu_gives_na_never_zero():
    samples = _samples([None, None, None])
    m = case_metrics(2.0, samples)
    assert m.max_gpu_mb is None and m.total_gpu_mb_s is None and m.over_memory is None
    result = CaseResult("c", (8, 7, 4), ["x"], exit_code=0, metrics=m, output_ok=True)
    row = csv_row(result)
    assert row["max_gpu_mb"] == row["total_gpu_mb_s"] == row["over_memory"] == "n/a"
    assert row["time_s"] == "2.000" and row["over_time"] == "false"
    gpu = open_gpu_source(index=10**6)  # no NVML here, or no such device on a GPU machine
    assert isinstance(gpu, NullSource)
    assert gpu.read([os.getpid()]) is None
    assert gpu.describe()["available"] is False
    assert gpu.describe()["reason"].startswith(("no NVML", "no device"))


class FakeNvml:
    """The few pynvml functions NvmlSource calls, with one 8 GiB device."""

    class NVMLError(Exception):
        pass

    MIB = 1 << 20

    def __init__(self, mine: int, fail_init: bool = False) -> None:
        self.mine, self.fail_init, self.shutdowns = mine, fail_init, 0

    def nvmlInit(self):
        if self.fail_init:
            raise self.NVMLError("NVML Shared Library Not Found")

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetCount(self):
        return 1

    def nvmlDeviceGetHandleByIndex(self, index):
        return ("handle", index)

    def nvmlDeviceGetMemoryInfo(self, handle):
        # NVML's own "used" excludes reserved memory; the organizers use total - free.
        return SimpleNamespace(total=8192 * self.MIB, free=5120 * self.MIB, used=2900 * self.MIB)

    def nvmlDeviceGetUtilizationRates(self, handle):
        return SimpleNamespace(gpu=37, memory=10)

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        return [
            SimpleNamespace(pid=self.mine, usedGpuMemory=512 * self.MIB),
            SimpleNamespace(pid=1, usedGpuMemory=1024 * self.MIB),  # someone else's
        ]

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle):
        return [SimpleNamespace(pid=self.mine, usedGpuMemory=512 * self.MIB)]  # same process

    def nvmlDeviceGetName(self, handle):
        return b"Fake H100"

    def nvmlSystemGetDriverVersion(self):
        return "550.54"

    def nvmlSystemGetNVMLVersion(self):
        return "12.550"


def test_nvml_source_reads_total_minus_free_and_the_tree_processes():
    nvml = FakeNvml(mine=4242)
    source = NvmlSource(0, nvml=nvml)
    reading = source.read([4242, 4243])
    assert reading.used_mb == 3072.0  # 8192 - 5120, not NVML's "used"
    assert reading.process_mb == 512.0  # counted once, other users' processes left out
    assert reading.util_percent == 37.0
    assert source.read(None).process_mb is None
    info = source.describe()
    assert info["name"] == "Fake H100" and info["driver"] == "550.54"
    assert info["total_mb"] == 8192.0 and info["available"] is True
    source.close()
    assert nvml.shutdowns == 1
    with pytest.raises(GpuUnavailable, match="no device: GPU index 3"):
        NvmlSource(3, nvml=FakeNvml(mine=1))
    with pytest.raises(GpuUnavailable, match="no NVML"):
        NvmlSource(0, nvml=FakeNvml(mine=1, fail_init=True))


def test_idle_baseline_is_measured_and_subtracted():
    gpu = ScriptedGpu([500, 520, 5000, 510])
    idle = measure_idle_mb(gpu, duration_s=0.4, interval_s=0.1, sleep=lambda s: None)
    assert idle == pytest.approx(515.0)  # median: a spike from another user is ignored
    m = case_metrics(1.0, _samples([1500, 2500, 1500]), idle_gpu_mb=500)
    assert m.max_gpu_mb == 2000
    assert m.total_gpu_mb_s == pytest.approx(0.1 * (1500 + 1500))
    assert m.idle_gpu_mb == 500


def test_sampler_reads_the_fake_gpu_for_the_process_tree():
    gpu = ScriptedGpu([100, 200, 300])
    child = subprocess.Popen([PY, "-c", "import time; time.sleep(0.6)"])
    sampler = Sampler(gpu, interval_s=0.05)
    sampler.start(child.pid)
    child.wait()
    samples = sampler.stop()
    assert len(samples) >= 3
    assert samples.gpu_used_mb[:3] == [100, 200, 300]
    assert set(samples.gpu_used_mb[3:]) <= {300}
    assert samples.t_s == sorted(samples.t_s) and samples.t_s[0] < 0.05
    assert all(pids is not None and child.pid in pids for pids in gpu.pids_seen[:3])
    assert max(samples.rss_mb) > 1  # a live python process has resident memory

    quiet = ScriptedGpu([100])
    sampler = Sampler(quiet, interval_s=0.05, attribute_gpu_processes=False)
    sampler.start(os.getpid())
    samples = sampler.stop()
    assert quiet.pids_seen and all(p is None for p in quiet.pids_seen)


def test_held_memory_gives_expected_time_rss_and_area(tmp_path, capsys):
    # A parent that starts a child which touches 300 MB and holds it for 1.5 s: the tree's
    # RSS must add up both processes.
    cases = tmp_path / "cases"
    cases.mkdir()
    write_case(cases, "held")
    child = write_script(
        tmp_path / "child.py",
        """
        import os, shutil, time
        from pathlib import Path
        block = b"\\x01" * (300 << 20)  # written, so every page is resident
        time.sleep(1.5)
        src = next(Path(os.environ["INPUT_DIR"]).glob("*_0000.nii.gz"))
        shutil.copy(src, Path(os.environ["OUTPUT_DIR"]) / "held.nii.gz")
        print("child done")
        """,
    )
    parent = write_script(
        tmp_path / "parent.py",
        f"import subprocess, sys; sys.exit(subprocess.call([sys.executable, {str(child)!r}]))",
    )
    report = tmp_path / "report"
    rc = main(["-i", str(cases), "-o", str(report), "-q", "--", PY, str(parent)], NullSource("t"))
    assert rc == 0, capsys.readouterr().err
    row = read_csv(report / "results.csv")["held"]
    time_s, rss_mb = float(row["time_s"]), float(row["max_rss_mb"])
    # Stated tolerances: time at least the 1.5 s sleep (plus start-up, generously bounded);
    # peak RSS 300 MB plus two interpreters; area 300 MB x 1.5 s within -10 % / +50 %.
    assert 1.5 <= time_s < 10
    assert 300 <= rss_mb <= 420
    record = json.loads((report / "results.json").read_text())["cases"][0]
    area = record["metrics"]["total_rss_mb_s"]
    assert 0.9 * 450 <= area <= 1.5 * 450
    assert row["output_ok"] == "true" and row["exit_code"] == "0" and row["error"] == ""
    assert row["max_gpu_mb"] == "n/a"
    assert (report / "predictions" / "held.nii.gz").is_file()
    assert "child done" in (report / "logs" / "held.log").read_text()


def test_fake_gpu_figures_reach_every_report(tmp_path, monkeypatch):
    cases = tmp_path / "cases"
    cases.mkdir()
    write_case(cases, "a", (8, 7, 4))
    write_case(cases, "b", (6, 5, 3))
    script = write_script(tmp_path / "cmd.py", CASE_COMMAND)
    gpu = ScriptedGpu([5000.0])
    report = tmp_path / "report"
    monkeypatch.setenv("CHILD_SLEEP_S", "0.3")
    rc = main(["-i", str(cases), "-o", str(report), "-q", "--", PY, str(script)], gpu)
    assert rc == 0
    rows = read_csv(report / "results.csv")
    data = json.loads((report / "results.json").read_text())
    for record in data["cases"]:
        row = rows[record["case"]]
        n = len(record["samples"]["gpu_used_mb"])
        assert n >= 2
        assert float(row["max_gpu_mb"]) == 5000.0
        # Constant 5000 MB over n samples 0.1 s apart: 5000 * 0.1 * (n - 1) MB·s.
        assert float(row["total_gpu_mb_s"]) == pytest.approx(5000 * 0.1 * (n - 1), abs=0.05)
        assert row["over_memory"] == "true" and row["over_time"] == "false"
    assert rows["a"]["image_size"] == "8x7x4" and rows["b"]["image_size"] == "6x5x3"
    assert data["gpu"]["name"] == "Fake GPU"
    assert data["settings"]["command"] == [PY, str(script)]
    assert data["machine"]["cpu_cores_logical"] == os.cpu_count()
    summary = (report / "summary.md").read_text()
    assert "| Case | Image Size | Running Time (s) | Max GPU (MB) | Total GPU (MB·s) |" in summary
    assert "| a | 8×7×4 |" in summary and "**5000** ⚠" in summary
    assert "| **Mean** | 2 ok case(s) | " in summary and "| **Median** |" in summary
    assert "Over 4096 MB: 2 of 2" in summary
    for name in ("memory_all.png", "time_per_case.png", "memory_a.png", "memory_b.png"):
        png = (report / "plots" / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    # Locally the sampler asks the GPU about the command's own process tree.
    assert any(p for p in gpu.pids_seen if p)


def test_subtract_idle_takes_the_baseline_off_every_sample(tmp_path):
    cases = tmp_path / "cases"
    cases.mkdir()
    write_case(cases, "c1")
    script = write_script(tmp_path / "cmd.py", CASE_COMMAND)
    gpu = ScriptedGpu([500.0, 500.0, 500.0, 3000.0])  # 3 idle reads, then the run
    report = tmp_path / "report"
    argv = ["-i", str(cases), "-o", str(report), "-q", "--no-plots", "--subtract-idle"]
    rc = main([*argv, "--idle-s", "0.3", "--", PY, str(script)], gpu)
    assert rc == 0
    record = json.loads((report / "results.json").read_text())["cases"][0]
    n = len(record["samples"]["gpu_used_mb"])
    assert record["samples"]["gpu_used_mb"] == [3000.0] * n  # raw samples stay raw
    assert record["metrics"]["idle_gpu_mb"] == 500.0
    assert record["metrics"]["max_gpu_mb"] == 2500.0
    assert record["metrics"]["total_gpu_mb_s"] == pytest.approx(2500 * 0.1 * (n - 1))
    assert "**subtracted**" in (report / "summary.md").read_text()


def test_failures_are_reported_per_case_and_the_run_continues(tmp_path, capsys):
    cases = tmp_path / "cases"
    cases.mkdir()
    for name in ("crash", "good", "silent", "wrongsize"):
        write_case(cases, name)
    other = write_case(tmp_path, "other", (5, 5, 5))
    (cases / "notes.txt").write_text("not a case")
    (cases / "broken_0000.nii.gz").write_bytes(b"not gzip at all")
    script = write_script(tmp_path / "cmd.py", CASE_COMMAND)
    report = tmp_path / "report"
    rc = main(
        ["-i", str(cases), "-o", str(report), "--no-plots", "--", PY, str(script), str(other)],
        NullSource("no GPU in tests"),
    )
    err = capsys.readouterr().err
    assert rc == 1
    rows = read_csv(report / "results.csv")
    assert list(rows) == ["broken", "crash", "good", "silent", "wrongsize"]
    assert rows["broken"]["error"].startswith("input unreadable")
    assert rows["broken"]["exit_code"] == "" and rows["broken"]["max_gpu_mb"] == "n/a"
    assert rows["crash"]["exit_code"] == "3" and rows["crash"]["output_ok"] == "false"
    assert "exit code 3: boom: model file missing" in rows["crash"]["error"]
    assert "no output crash.nii.gz" in rows["crash"]["error"]
    assert rows["silent"]["exit_code"] == "0"
    assert rows["silent"]["error"] == "no output silent.nii.gz"
    assert "geometry differs: size" in rows["wrongsize"]["error"]
    assert rows["good"]["error"] == "" and rows["good"]["output_ok"] == "true"
    assert "error: case crash: exit code 3" in err and "error: case silent:" in err
    assert "skipping notes.txt" in err
    # Each run saw a fresh input folder holding its own case only.
    assert "staged: ['good_0000.nii.gz']" in (report / "logs" / "good.log").read_text()
    summary = (report / "summary.md").read_text()
    assert "| crash ✗ |" in summary and "## Failures" in summary
    assert "| **Mean** | 1 ok case(s) |" in summary  # failed cases stay out of the statistics
    assert "No GPU figures" in summary and "no GPU in tests" in summary
    assert not (report / ".staging").exists()


def test_timeout_kills_the_case_and_the_run_goes_on(tmp_path):
    cases = tmp_path / "cases"
    cases.mkdir()
    write_case(cases, "hang")
    write_case(cases, "ok")
    script = write_script(tmp_path / "cmd.py", CASE_COMMAND)
    report = tmp_path / "report"
    argv = ["-i", str(cases), "-o", str(report), "-q", "--no-plots", "--timeout-s", "1"]
    command = ["sh", "-c", f"{shlex.quote(PY)} {shlex.quote(str(script))}"]
    rc = main([*argv, "--", *command], NullSource("t"))
    rows = read_csv(report / "results.csv")
    assert rc == 1
    assert "timed out after 1 s" in rows["hang"]["error"]
    assert float(rows["hang"]["time_s"]) < 30
    assert rows["ok"]["error"] == ""


def test_docker_argv_is_exactly_the_organizers_line():
    organizers = (
        'docker container run --gpus "device=0" -m 28G --name team --rm '
        "-v /data/in/:/workspace/inputs/ -v /data/out/:/workspace/outputs/ "
        'team:latest /bin/bash -c "sh predict.sh"'
    )
    argv = docker_argv("team:latest", Path("/data/in"), Path("/data/out"), "team")
    assert argv == shlex.split(organizers)
    assert container_name_for("registry.example.org/org/team:v2") == "team"
    assert container_name_for("team") == "team"


def test_docker_mode_runs_the_organizers_line_on_a_copy(tmp_path, monkeypatch):
    # No Docker engine here: a stand-in `docker` records its argv, checks what a bind mount
    # would see, and plays the container by copying the input to the output.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "docker"
    fake.write_text(
        f"#!{PY}\n"
        + textwrap.dedent(
            """
            import json, os, shutil, sys
            from pathlib import Path
            argv = sys.argv[1:]
            mounts = dict(argv[i + 1].split(":", 1)[::-1] for i, a in enumerate(argv) if a == "-v")
            inp = Path(mounts["/workspace/inputs/"])
            out = Path(mounts["/workspace/outputs/"])
            images = sorted(inp.iterdir())
            record = {
                "argv": ["docker", *argv],
                "symlinks": [p.is_symlink() for p in images],
                "inodes": [p.stat().st_ino for p in images],
                "out_mode": oct(out.stat().st_mode & 0o777),
            }
            with open(os.environ["FAKE_DOCKER_RECORD"], "a") as f:
                f.write(json.dumps(record) + "\\n")
            for p in images:
                shutil.copy(p, out / p.name.replace("_0000.nii.gz", ".nii.gz"))
            """
        )
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    record_path = tmp_path / "record.jsonl"
    monkeypatch.setenv("FAKE_DOCKER_RECORD", str(record_path))
    cases = tmp_path / "cases"
    cases.mkdir()
    source = write_case(cases, "c1")
    work = tmp_path / "work"
    report = tmp_path / "report"
    gpu = ScriptedGpu([1000.0])
    argv = ["-i", str(cases), "-o", str(report), "-q", "--no-plots", "--work-dir", str(work)]
    rc = main([*argv, "--docker", "team:latest"], gpu)
    assert rc == 0
    record = json.loads(record_path.read_text().splitlines()[0])
    staged = Path(record["argv"][record["argv"].index("--cidfile") + 1]).parent
    assert staged.parent == work.absolute() and staged.name.startswith("c1.")
    # The organizers' line, plus --cidfile: the client writes the container id there, from
    # which the sampler finds the container's memory cgroup.
    assert record["argv"] == docker_argv(
        "team:latest",
        staged / "inputs",
        staged / "outputs",
        "team",
        0,
        ["--cidfile", str(staged / "container.id")],
    )
    assert record["symlinks"] == [False]
    assert record["inodes"] != [source.stat().st_ino]  # a copy: the container cannot change it
    assert record["out_mode"] == "0o777"
    # The container's processes are not our descendants: no per-process attribution.
    assert gpu.pids_seen and all(p is None for p in gpu.pids_seen)
    row = read_csv(report / "results.csv")["c1"]
    assert row["output_ok"] == "true" and row["max_gpu_mb"] == "1000.0"
    summary = (report / "summary.md").read_text()
    assert "--gpus device=0 -m 28G --name team --rm -v $IN/:/workspace/inputs/" in summary


def test_staging_copies_the_image_read_only(tmp_path):
    cases = tmp_path / "cases"
    cases.mkdir()
    image = write_case(cases, "c1")
    case = find_cases(cases)[0][0]
    staged = stage_case(case, tmp_path / "work")
    assert staged.method in (CLONE, COPY)
    assert not os.path.samestat(staged.input_path.stat(), image.stat())
    assert not staged.input_path.is_symlink()
    assert staged.input_path.read_bytes() == image.read_bytes()
    assert staged.input_path.stat().st_mode & 0o777 == 0o444
    assert sorted(p.name for p in staged.input_dir.iterdir()) == ["c1_0000.nii.gz"]
    assert list(staged.output_dir.iterdir()) == []
    (staged.output_dir / "stale.nii.gz").write_bytes(b"x")
    again = stage_case(case, tmp_path / "work")  # a fresh output folder every run
    assert again.root != staged.root and list(again.output_dir.iterdir()) == []
    assert read_geometry(again.input_path) == read_geometry(image)
    again.cleanup()
    assert not again.root.exists() and image.is_file()


def test_staging_never_removes_what_the_profiler_did_not_create(tmp_path):
    # A work dir holding a folder named like a case, and a report folder with a .staging
    # of the user's: both survive the run, during which each case had a fresh folder.
    cases = tmp_path / "cases"
    cases.mkdir()
    write_case(cases, "FLARE24_0001")
    script = write_script(tmp_path / "cmd.py", CASE_COMMAND)
    work = tmp_path / "work"
    (work / "FLARE24_0001").mkdir(parents=True)
    (work / "FLARE24_0001" / "important.txt").write_text("keep")
    report = tmp_path / "report"
    (report / ".staging" / "FLARE24_0001").mkdir(parents=True)
    (report / ".staging" / "FLARE24_0001" / "mine.txt").write_text("keep")
    argv = ["-i", str(cases), "-q", "--no-plots", "--", PY, str(script)]
    assert main(["-o", str(report), "--work-dir", str(work), *argv], NullSource("t")) == 0
    assert (work / "FLARE24_0001" / "important.txt").read_text() == "keep"
    assert sorted(p.name for p in work.iterdir()) == ["FLARE24_0001"]  # own folders gone
    assert main(["-o", str(report), *argv], NullSource("t")) == 0
    assert (report / ".staging" / "FLARE24_0001" / "mine.txt").read_text() == "keep"
    assert read_csv(report / "results.csv")["FLARE24_0001"]["error"] == ""
    log = (report / "logs" / "FLARE24_0001.log").read_text()
    assert "staged: ['FLARE24_0001_0000.nii.gz']" in log  # the case alone, as before


def test_unwritable_work_dir_or_report_is_one_line(tmp_path, capsys, monkeypatch):
    cases = tmp_path / "cases"
    cases.mkdir()
    write_case(cases, "c1")
    script = write_script(tmp_path / "cmd.py", CASE_COMMAND)
    blocker = tmp_path / "afile"
    blocker.write_text("a file, not a folder")
    command = ["--", PY, str(script)]
    report = tmp_path / "report"
    argv = ["-i", str(cases), "-o", str(report), "-q", "--no-plots"]
    assert main([*argv, "--work-dir", str(blocker / "sub"), *command], NullSource("t")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "afile/sub" in err and "Traceback" not in err

    # A report folder on a read-only mount: it exists, nothing can be created in it (root
    # ignores file modes, so the mount's refusal is played by os.open and os.mkdir).
    readonly = tmp_path / "ro"
    readonly.mkdir()
    real_open, real_mkdir = os.open, os.mkdir

    def refuse(path) -> None:
        if Path(path).is_relative_to(readonly):
            raise OSError(30, "Read-only file system", str(path))  # EROFS

    def open_ro(path, flags, *args, **kwargs):
        if flags & os.O_CREAT:
            refuse(path)
        return real_open(path, flags, *args, **kwargs)

    def mkdir_ro(path, *args, **kwargs):
        refuse(path)
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_ro)
    monkeypatch.setattr(os, "mkdir", mkdir_ro)
    for extra in (["-o", str(readonly)], ["-o", str(report), "--work-dir", str(readonly)]):
        assert main([*argv, *extra, *command], NullSource("t")) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert "Read-only file system" in err and str(readonly) in err, err


def test_report_that_cannot_be_written_mid_run_is_one_line(tmp_path, capsys):
    # The folder is writable, but logs/ is a file: the first case's log cannot be made.
    cases = tmp_path / "cases"
    cases.mkdir()
    write_case(cases, "c1")
    script = write_script(tmp_path / "cmd.py", CASE_COMMAND)
    report = tmp_path / "report"
    report.mkdir()
    (report / "logs").write_text("in the way")
    argv = ["-i", str(cases), "-o", str(report), "-q", "--no-plots", "--", PY, str(script)]
    assert main(argv, NullSource("t")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write the report") and err.count("\n") == 1, err
    assert "logs" in err
    assert not (report / ".staging").exists()  # the staging is still cleaned up


def test_profiled_command_cannot_change_the_original_case(tmp_path):
    # The command writes into its input in place (as root, file modes stop nobody).
    cases = tmp_path / "cases"
    cases.mkdir()
    image = write_case(cases, "c1")
    before = image.read_bytes()
    script = write_script(
        tmp_path / "tamper.py",
        """
        import os, shutil
        from pathlib import Path
        src = next(Path(os.environ["INPUT_DIR"]).glob("*_0000.nii.gz"))
        shutil.copy(src, Path(os.environ["OUTPUT_DIR"]) / "c1.nii.gz")
        os.chmod(src, 0o644)
        with open(src, "r+b") as f:
            f.write(b"overwritten by the profiled command")
        """,
    )
    report = tmp_path / "report"
    rc = main(["-i", str(cases), "-o", str(report), "-q", "--no-plots", "--", PY, str(script)],
              NullSource("t"))  # fmt: skip
    assert rc == 0
    assert image.read_bytes() == before


def _dead(pid: int) -> bool:
    """The process is gone or a zombie waiting for its parent (it runs no more)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


# Starts a grandchild that would outlive the command, records both pids, then copies the
# input (c1) or hangs (c2).
SPAWNING_COMMAND = """
    import os, shutil, subprocess, sys, time
    from pathlib import Path
    src = next(Path(os.environ["INPUT_DIR"]).glob("*_0000.nii.gz"))
    name = src.name[: -len("_0000.nii.gz")]
    grandchild = subprocess.Popen(["sleep", "60"])
    Path(sys.argv[1], name).write_text(f"{os.getpid()} {grandchild.pid}")
    if name == "c2":
        time.sleep(60)
    shutil.copy(src, Path(os.environ["OUTPUT_DIR"]) / f"{name}.nii.gz")
"""


def test_what_a_case_leaves_running_is_killed(tmp_path):
    cases = tmp_path / "cases"
    cases.mkdir()
    write_case(cases, "c1")
    script = write_script(tmp_path / "spawn.py", SPAWNING_COMMAND)
    pids = tmp_path / "pids"
    pids.mkdir()
    report = tmp_path / "report"
    argv = ["-i", str(cases), "-o", str(report), "-q", "--no-plots"]
    assert main([*argv, "--", PY, str(script), str(pids)], NullSource("t")) == 0
    child, grandchild = map(int, (pids / "c1").read_text().split())
    assert _dead(child) and _dead(grandchild)
    # a hung command is stopped by default, well above the 45 s limit
    from profiling.cli import build_parser

    assert 45 < build_parser().parse_args(argv).timeout_s < float("inf")


# Starts processes that leave the command's process group (their own session), records
# their pids, holds on for HOLD_S and copies the input. "daemon": a middle process starts
# the escapee and exits at once, so it is reparented away from the tree within
# milliseconds. "bare": the escapee is the command's own child, with an empty environment.
ESCAPING_COMMAND = """
    import os, shutil, subprocess, sys, time
    from pathlib import Path
    src = next(Path(os.environ["INPUT_DIR"]).glob("*_0000.nii.gz"))
    pids = []
    if sys.argv[2] == "daemon":
        middle = subprocess.check_output(
            [sys.executable, "-c", "import subprocess; "
             "print(subprocess.Popen(['sleep', '60'], start_new_session=True, "
             "stdout=subprocess.DEVNULL).pid)"],
        )
        pids.append(int(middle))
    else:
        pids.append(subprocess.Popen(["sleep", "60"], start_new_session=True, env={}).pid)
    Path(sys.argv[1]).write_text(" ".join(map(str, pids)))
    time.sleep(float(os.environ.get("HOLD_S", "0")))
    shutil.copy(src, Path(os.environ["OUTPUT_DIR"]) / src.name.replace("_0000", ""))
"""


@pytest.mark.parametrize(
    ("kind", "interval_s", "hold_s"),
    [
        # Gone from the tree before any sample after the first: found by the environment
        # mark every process of the case inherits.
        ("daemon", "5", "0.3"),
        # No environment mark, but a child of the command at a sample (0.1 s apart while
        # the command holds on for 0.5 s): found in the recorded process tree.
        ("bare", "0.1", "0.5"),
    ],
)
def test_processes_that_left_the_group_are_killed(tmp_path, monkeypatch, kind, interval_s, hold_s):
    cases = tmp_path / "cases"
    cases.mkdir()
    write_case(cases, "c1")
    script = write_script(tmp_path / "escape.py", ESCAPING_COMMAND)
    pid_file = tmp_path / "pids"
    monkeypatch.setenv("HOLD_S", hold_s)
    argv = ["-i", str(cases), "-o", str(tmp_path / "r"), "-q", "--no-plots"]
    argv += ["--interval-s", interval_s, "--", PY, str(script), str(pid_file), kind]
    try:
        assert main(argv, NullSource("t")) == 0
        pids = [int(pid) for pid in pid_file.read_text().split()]
        assert pids and all(os.getsid(pid) != os.getsid(0) for pid in pids if not _dead(pid))
        deadline = time.monotonic() + 5  # SIGKILL is asynchronous
        while not all(_dead(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(_dead(pid) for pid in pids), kind
    finally:  # a failing run must not leave its sleepers behind
        for pid in map(int, pid_file.read_text().split() if pid_file.exists() else []):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_sigterm_stops_the_case_and_keeps_the_finished_ones(tmp_path):
    cases = tmp_path / "cases"
    cases.mkdir()
    write_case(cases, "c1")
    write_case(cases, "c2")
    write_case(cases, "c3")
    script = write_script(tmp_path / "spawn.py", SPAWNING_COMMAND)
    pids = tmp_path / "pids"
    pids.mkdir()
    report = tmp_path / "report"
    proc = subprocess.Popen(
        [PY, "-m", "profiling", "-i", str(cases), "-o", str(report), "--no-plots",
         "--", PY, str(script), str(pids)],
        cwd=Path(__file__).resolve().parents[1], stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lines = []
    for line in proc.stderr:
        lines.append(line.strip())
        if line.startswith("c1: "):
            while not (pids / "c2").exists():  # c2 and its grandchild are running
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            break
    lines += [ln.strip() for ln in proc.stderr.read().splitlines()]
    assert proc.wait(timeout=60) == 143, lines
    assert (
        "error: interrupted by SIGTERM; the reports cover the 1 finished case(s); "
        "not done: c2, c3" in lines
    ), lines
    assert list(read_csv(report / "results.csv")) == ["c1"]
    assert (report / "summary.md").is_file()
    assert not (report / ".staging").exists()
    for name in ("c1", "c2"):
        assert all(_dead(int(pid)) for pid in (pids / name).read_text().split()), name
    assert not (pids / "c3").exists()


def _report(folder: Path, cases: dict[str, tuple[float, float | None]], failed=()) -> Path:
    """A results.json with the given (time_s, max_gpu_mb) per case; GPU area = 0.2 s x max,
    RSS = 10 x time_s; cases named in ``failed`` carry an error."""
    from profiling.report import write_json

    folder.mkdir()
    results = []
    for name, (time_s, max_gpu) in cases.items():
        gpu = [None] * 3 if max_gpu is None else [max_gpu] * 3
        m = case_metrics(time_s, _samples(gpu, rss_mb=[time_s * 10] * 3))
        if max_gpu is not None:
            assert m.total_gpu_mb_s == pytest.approx(max_gpu * 0.2)
        error = "exit code 1" if name in failed else None
        results.append(CaseResult(name, (8, 8, 8), ["x"], 0, m, output_ok=True, error=error))
    write_json(results, folder / "results.json", {"gpu": {}})
    return folder


def test_compare_gives_per_case_ratios_and_geometric_mean(tmp_path, capsys):
    a = _report(tmp_path / "A", {"x": (10.0, 4000.0), "y": (20.0, 1000.0), "w": (9, 9)}, ["w"])
    b = _report(tmp_path / "B", {"x": (5.0, 2000.0), "y": (40.0, 4000.0), "w": (1, 1), "z": (1, 1)})
    result = compare(load_report(a), load_report(b))
    assert result.memory == "gpu"
    by_case = {r.case: r.ratios for r in result.rows}
    assert by_case["x"] == pytest.approx((0.5, 0.5, 0.5))
    assert by_case["y"] == pytest.approx((2.0, 4.0, 4.0))
    assert result.geomean == pytest.approx((1.0, 2**0.5, 2**0.5))  # w failed in A: left out
    assert [r.case for r in result.rows if r.failed] == ["w"]
    assert result.only_b == ["z"] and result.only_a == []

    assert main(["compare", str(a), str(b), "--markdown"]) == 0
    out = capsys.readouterr().out
    assert "| x | 10.00 | 5.00 | 0.500 |" in out
    assert "| geo. mean |  |  | 1.000 |  |  | 1.414 |" in out
    assert "only in B: z" in out and "| w ✗ |" in out

    # Without GPU figures in one report, memory falls back to RSS for both.
    c = _report(tmp_path / "C", {"x": (20.0, None), "y": (10.0, None)})
    rss = compare(load_report(a), load_report(c))
    assert rss.memory == "rss"
    assert {r.case: r.ratios for r in rss.rows}["x"] == pytest.approx((2.0, 2.0, 2.0))
    assert "max RSS B/A" in format_table(rss)
    assert main(["compare", str(a), str(tmp_path / "missing")]) == 2
    assert "no results.json" in capsys.readouterr().err


def test_usage_errors_are_one_line(tmp_path, capsys, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = tmp_path / "cases"
    cases.mkdir()
    write_case(cases, "c1")
    report = str(tmp_path / "r")
    null = NullSource("none")
    checks = [
        (["-i", str(tmp_path / "nope"), "-o", report], "does not exist"),
        (["-i", str(empty), "-o", report], "no <case>_0000.nii.gz files"),
        (["-i", str(cases), "-o", report, "--", "no-such-program-xyz"], "unknown command"),
        (["-i", str(cases), "-o", report, "--docker", "t", "--", "true"], "either --docker"),
        (["-i", str(cases), "-o", report, "--interval-s", "0"], "--interval-s must be > 0"),
        (["-i", str(cases), "-o", report, "--"], "nothing after --"),
    ]
    for argv, message in checks:
        assert main(argv, null) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    monkeypatch.setenv("PATH", str(empty))
    assert main(["-i", str(cases), "-o", report, "--docker", "t"], null) == 2
    assert "docker not found" in capsys.readouterr().err
