"""The profiler's Docker mode without a Docker engine: argv, cgroup memory, overhead.

A stand-in ``docker`` client and a cgroup tree written into a temporary folder check the
pieces; ``tests/test_docker.py`` runs the same mode against a real engine.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from profiling.cli import main
from profiling.docker import ContainerMemory, ContainerReading, docker_argv, predictor_time_s
from profiling.metrics import case_metrics, container_curve_mb, with_predictor_time
from profiling.sampler import Sampler
from profiling.sources import NullSource, TreeUsage
from tests.test_profiling import ScriptedGpu, write_case

CID = "0123456789abcdef" * 4
MB = 2**20


def test_docker_argv_leaves_out_gpus_on_a_host_without_one():
    organizers = (
        "docker container run -m 28G --name team --rm "
        "-v /data/in/:/workspace/inputs/ -v /data/out/:/workspace/outputs/ "
        "--network none "
        'team:latest /bin/bash -c "sh predict.sh"'
    )
    argv = docker_argv(
        "team:latest", Path("/data/in"), Path("/data/out"), "team", None, ["--network", "none"]
    )
    assert argv == shlex.split(organizers)


def _cgroup(root: Path, folder: str, files: dict[str, int]) -> Path:
    path = root / folder
    path.mkdir(parents=True)
    for name, value in files.items():
        (path / name).write_text(f"{value}\n")
    return path


@pytest.mark.parametrize(
    ("folder", "files", "peak_mb"),
    [
        (
            f"memory/docker/{CID}",  # cgroup v1, Docker's cgroupfs driver
            {"memory.usage_in_bytes": 300 * MB, "memory.max_usage_in_bytes": 512 * MB},
            512.0,
        ),
        (
            f"system.slice/docker-{CID}.scope",  # cgroup v2, systemd driver
            {"memory.current": 300 * MB, "memory.peak": 512 * MB},
            512.0,
        ),
        (f"docker/{CID}", {"memory.current": 300 * MB}, None),  # v2 before Linux 5.19
    ],
)
def test_container_memory_comes_from_the_cgroup_named_by_the_cidfile(
    tmp_path, folder, files, peak_mb
):
    root = tmp_path / "cgroup"
    cidfile = tmp_path / "container.id"
    memory = ContainerMemory(cidfile, root)
    assert memory.read() is None  # the client has not created the container yet
    cidfile.write_text(CID[:20])  # written partly
    assert memory.read() is None
    cidfile.write_text(CID)
    assert memory.read() is None  # the id is known, its cgroup not there yet
    cgroup = _cgroup(root, folder, files)
    assert memory.read() == ContainerReading(300.0, peak_mb)
    assert memory.container_id == CID
    usage = next(n for n in files if n in ("memory.usage_in_bytes", "memory.current"))
    (cgroup / usage).write_text(f"{100 * MB}\n")
    assert memory.read() == ContainerReading(100.0, peak_mb)
    for f in cgroup.iterdir():  # --rm removed the container
        f.unlink()
    cgroup.rmdir()
    assert memory.read() is None


class ScriptedContainer:
    """A container memory source: None until created, then scripted readings, then None."""

    def __init__(self, readings):
        self.readings = list(readings)

    def read(self):
        return self.readings.pop(0) if self.readings else None


def test_container_curve_peak_and_area():
    clock = iter(i * 0.1 for i in range(100))
    readings = [None, ContainerReading(100.0, 100.0), ContainerReading(300.0, 700.0)]
    readings += [None, ContainerReading(200.0, 700.0), None]
    sampler = Sampler(
        NullSource("t"), 0.1, clock=lambda: next(clock), container=ScriptedContainer(readings)
    )
    tree = SimpleNamespace(read=lambda: TreeUsage((1,), 5.0, 0.0))
    for _ in range(7):
        sampler._take(tree, 0.0)
    samples = sampler._samples
    assert samples.container_mb == [None, 100.0, 300.0, None, 200.0, None, None]
    # 0 before the container exists and after it is gone; a failed read holds the last value.
    assert container_curve_mb(samples) == [0.0, 100.0, 300.0, 300.0, 200.0, 0.0, 0.0]
    m = case_metrics(0.7, samples)
    # The kernel's high-water mark (700) beats the largest sample (300): a spike between ticks.
    assert m.max_container_mb == 700.0
    assert m.total_container_mb_s == pytest.approx(0.1 * (100 + 300 + 300 + 200))
    assert case_metrics(0.7, Sampler(NullSource("t"))._samples).max_container_mb is None


def test_predictor_time_and_overhead_from_the_log():
    log = (
        "1 case(s); 1 model(s), 1 network(s) [demo:3d_fullres] on cpu; start-up 1.2 s\n"
        "[1/1] c 8x7x4: read 0.01s ...\n"
        "done: 1/1 case(s) written to /workspace/outputs in 4.25 s\n"
    )
    assert predictor_time_s(log) == 4.25
    assert predictor_time_s("Traceback ...\nKilled\n") is None
    m = case_metrics(6.0, Sampler(NullSource("t"))._samples)
    m = with_predictor_time(m, predictor_time_s(log))
    assert (m.predictor_s, m.overhead_s) == (4.25, pytest.approx(1.75))
    assert with_predictor_time(m, None) is m


FAKE_DOCKER = """
import json, os, shutil, sys
from pathlib import Path
argv = sys.argv[1:]
mounts = dict(argv[i + 1].split(":", 1)[::-1] for i, a in enumerate(argv) if a == "-v")
out = Path(mounts["/workspace/outputs/"])
cid = argv[argv.index("--cidfile") + 1]
Path(cid).write_text("%s")
with open(os.environ["FAKE_DOCKER_RECORD"], "a") as f:
    f.write(json.dumps(["docker", *argv]) + "\\n")
for p in Path(mounts["/workspace/inputs/"]).iterdir():
    shutil.copy(p, out / p.name.replace("_0000.nii.gz", ".nii.gz"))
print("done: 1/1 case(s) written to /workspace/outputs in 0.05 s", file=sys.stderr)
"""


@pytest.mark.parametrize("gpu", [None, ScriptedGpu([1000.0])], ids=["no GPU", "GPU"])
def test_profiler_gives_gpus_only_with_a_gpu_and_reports_overhead(tmp_path, monkeypatch, gpu):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "docker"
    fake.write_text(f"#!{sys.executable}\n" + textwrap.dedent(FAKE_DOCKER % CID))
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    record = tmp_path / "record.jsonl"
    monkeypatch.setenv("FAKE_DOCKER_RECORD", str(record))
    cases = tmp_path / "cases"
    cases.mkdir()
    write_case(cases, "c1")
    report = tmp_path / "report"
    argv = ["-i", str(cases), "-o", str(report), "-q", "--no-plots", "--work-dir", str(tmp_path)]
    argv += ["--docker", "team:latest", "--docker-options", "--network none --read-only"]
    assert main(argv, gpu or NullSource("no GPU here")) == 0
    seen = json.loads(record.read_text())
    assert ("--gpus" in seen) == (gpu is not None)
    image = seen.index("team:latest")
    assert seen[image - 5 : image - 1] == ["--network", "none", "--read-only", "--cidfile"]
    # the case's staging folder is one the profiler made (c1.XXXXXXXX), gone after the case
    cidfile = Path(seen[image - 1])
    assert cidfile.name == "container.id" and cidfile.parent.parent == tmp_path
    assert cidfile.parent.name.startswith("c1.") and not cidfile.parent.exists()
    data = json.loads((report / "results.json").read_text())
    metrics = data["cases"][0]["metrics"]
    assert metrics["predictor_s"] == 0.05
    assert metrics["overhead_s"] == pytest.approx(metrics["time_s"] - 0.05)
    assert metrics["max_container_mb"] is None  # no such cgroup on this host: n/a, not 0
    line = data["settings"]["command_line"]
    assert ("--gpus" in line) == (gpu is not None) and "--network none --read-only" in line
    summary = (report / "summary.md").read_text()
    assert "## Container" in summary and "| c1 |" in summary


def test_docker_options_are_checked(tmp_path, capsys):
    cases = tmp_path / "cases"
    cases.mkdir()
    write_case(cases, "c1")
    argv = ["-i", str(cases), "-o", str(tmp_path / "report"), "-q"]
    assert main([*argv, "--docker-options", "--network none"], NullSource("x")) == 2
    assert capsys.readouterr().err.strip() == "error: --docker-options needs --docker IMAGE"
    assert main([*argv, "--docker", "t", "--docker-options", "--network 'none"]) == 2
    assert capsys.readouterr().err.strip() == "error: --docker-options: No closing quotation"
