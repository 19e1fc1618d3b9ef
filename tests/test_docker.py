"""The submission image, built and run for real with the organizers' command.

Needs a Docker engine (``DOCKER_HOST`` or the default socket; ``.ci/run`` starts one).
Without one every test here is skipped with one line saying why; under ``CI=true`` they
fail instead. The image is built once per session with ``make image-local`` (the local
CPU base, then the project's Dockerfile, offline) and reused by every test; the ensemble
image reuses the base and the dependency layers.

Every run is the organizers' command, one case per input folder, with ``--gpus`` only where
a GPU exists, plus ``--network none`` (the daemon of CI has no bridge network) and
``--read-only --tmpfs /tmp``: a run that wrote anywhere in the container but
``/workspace/outputs`` and ``/tmp`` would fail, so every passing run shows that it wrote
nothing else.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from container.context import copy_build_context
from inference.nifti import Geometry, read_image, write_image
from profiling.docker import docker_argv
from tests.conftest import REPO
from tests.test_bad_input import LINE_FORMATS, ct_volume
from tests.test_container import with_optimizer_state

pytestmark = pytest.mark.docker

TEAM = "flare24-test"
#: Options added to the organizers' command (see the module docstring).
RUN_OPTIONS = ("--network", "none", "--read-only", "--tmpfs", "/tmp")
#: Modules that dynamic-network-architectures declares but the image must not hold.
LEFT_OUT = ("timm", "torchvision", "huggingface_hub", "safetensors", "einops")


def _engine_problem() -> str | None:
    """None if a Docker engine answers, else one line saying why not."""
    if shutil.which("docker") is None:
        return "no docker client on PATH"
    try:
        result = subprocess.run(
            ["docker", "version", "--format", "{{.Server.Version}}"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except subprocess.TimeoutExpired:
        return "the Docker engine did not answer within 30 s"
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        return lines[-1] if lines else f"docker version exited with {result.returncode}"
    return None


def _base_problem() -> str | None:
    """None if the local base image exists or can be built, else why not."""
    base = make_variable("LOCAL_BASE")
    inspect = subprocess.run(["docker", "image", "inspect", base], capture_output=True)
    if inspect.returncode == 0 or shutil.which("mmdebstrap"):
        return None
    return f"no image {base} and no mmdebstrap to build it (apt-get install mmdebstrap)"


def make_variable(name: str) -> str:
    """A variable's value as the Makefile sets it."""
    result = subprocess.run(
        ["make", "--no-print-directory", "-s", f"print-{name}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.strip()


@pytest.fixture(scope="session")
def engine() -> None:
    """Skip (or, under CI=true, fail) the container tests when no Docker engine runs."""
    problem = _engine_problem() or _base_problem()
    if problem is None:
        return
    message = f"container tests skipped: {problem}"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true: {message} (.ci/run starts one)", pytrace=False)
    pytest.skip(message)


def make(*args: str, timeout_s: float = 1800) -> str:
    """``make ARGS`` in the repository; fails the test with the output's end on error."""
    result = subprocess.run(
        ["make", "--no-print-directory", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    output = result.stdout + result.stderr
    if result.returncode != 0:
        pytest.fail(f"make {' '.join(args)} failed:\n{output[-4000:]}", pytrace=False)
    return output


@pytest.fixture(scope="session")
def image(engine) -> str:
    """The submission image with the demo model, built once: ``make image-local``."""
    make("image-local", f"TEAM={TEAM}")
    return f"{TEAM}:latest"


@pytest.fixture(scope="session")
def gpu_index() -> int | None:
    """0 where NVML sees a GPU (runs then get ``--gpus``), else None."""
    from container.submission import gpu_index as nvml_gpu_index

    return nvml_gpu_index()


# -- running a case -----------------------------------------------------------------------


@dataclass
class Run:
    """A finished run: exit status, stderr lines, the output folder."""

    rc: int
    lines: list[str]
    out: Path

    def problems(self) -> list[str]:
        """The one-line messages about problems: ``error:``, ``ERROR <case>:``, ``WARNING``."""
        return [ln for ln in self.lines if re.match(r"(error: |ERROR |WARNING )", ln)]


def organizers_run(
    image: str,
    inputs: Path,
    outputs: Path,
    gpu: int | None,
    options: tuple[str, ...] = (),
    name: str = TEAM,
) -> Run:
    """The organizers' command on ``inputs`` -> ``outputs`` (created, world-writable)."""
    outputs.mkdir(parents=True, exist_ok=True)
    outputs.chmod(0o777)
    argv = docker_argv(image, inputs, outputs, name, gpu, [*RUN_OPTIONS, *options])
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, check=False)
    return Run(result.returncode, [ln for ln in result.stderr.splitlines() if ln], outputs)


def local_run(inputs: Path, outputs: Path, model: Path) -> Run:
    """``sh predict.sh`` straight from the repository on the same folder, for comparison."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PREDICT_ARGS")}
    env.update(
        INPUT_DIR=str(inputs), OUTPUT_DIR=str(outputs), MODEL_DIR=str(model), PYTHON=sys.executable
    )
    result = subprocess.run(
        ["sh", "predict.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    return Run(result.returncode, [ln for ln in result.stderr.splitlines() if ln], outputs)


def as_in_container(lines: list[str], inputs: Path, outputs: Path) -> list[str]:
    """Host paths of a local run's messages replaced by the container's."""
    return [
        ln.replace(str(inputs), "/workspace/inputs").replace(str(outputs), "/workspace/outputs")
        for ln in lines
    ]


def write_cases(folder: Path) -> dict[str, Geometry]:
    """Two small CT-like cases with different geometry (one rotated, one anisotropic)."""
    folder.mkdir(parents=True, exist_ok=True)
    rotated = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)
    cases = {
        # (z, y, x) array, spacing and origin (x, y, z), direction
        "caseA": ((16, 48, 48), (1.0, 1.0, 2.0), (-20.0, 15.0, 7.5), rotated),
        "caseB": ((24, 40, 56), (0.9, 1.2, 1.5), (3.0, -4.0, 100.0), None),
    }
    geometries = {}
    for i, (name, (shape, spacing, origin, direction)) in enumerate(cases.items()):
        geometry = Geometry(
            tuple(reversed(shape)),
            spacing,
            origin,
            direction or (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
        )
        write_image(folder / f"{name}_0000.nii.gz", ct_volume(shape, seed=i), geometry)
        geometries[name] = geometry
    return geometries


def one_case_folders(cases: Path, root: Path) -> list[tuple[str, Path]]:
    """One input folder per case, as the organizers run them."""
    folders = []
    for image in sorted(cases.glob("*_0000.nii.gz")):
        name = image.name[: -len("_0000.nii.gz")]
        folder = root / name
        folder.mkdir(parents=True)
        shutil.copy2(image, folder / image.name)
        folders.append((name, folder))
    return folders


def read_mask(path: Path) -> tuple[np.ndarray, Geometry]:
    labels, geometry = read_image(path)
    assert labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1}
    return labels, geometry


# -- the organizers' command ---------------------------------------------------------------


def test_organizers_command_writes_each_case_as_a_local_run_does(
    image, gpu_index, demo_model, tmp_path
):
    geometries = write_cases(tmp_path / "cases")
    for name, inputs in one_case_folders(tmp_path / "cases", tmp_path / "in"):
        run = organizers_run(image, inputs, tmp_path / "out" / name, gpu_index)
        assert run.rc == 0, "\n".join(run.lines)
        assert all(LINE_FORMATS.match(ln) for ln in run.lines), run.lines
        assert "1 model(s), 1 network(s) [submission:" in run.lines[0]
        # Only the mask, no temporary file; the input's exact geometry.
        assert [p.name for p in run.out.iterdir()] == [f"{name}.nii.gz"]
        labels, geometry = read_mask(run.out / f"{name}.nii.gz")
        assert geometry.mismatch(geometries[name]) is None
        # The same mask as predict.sh run directly with the same model.
        local = local_run(inputs, tmp_path / "local" / name, demo_model)
        assert local.rc == 0, "\n".join(local.lines)
        expected, _ = read_mask(local.out / f"{name}.nii.gz")
        np.testing.assert_array_equal(labels, expected)
        assert run.problems() == local.problems()


def test_bad_inputs_give_the_local_exit_status_and_messages(image, gpu_index, demo_model, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    good = tmp_path / "good"
    write_cases(good)
    raw = (good / "caseB_0000.nii.gz").read_bytes()
    (bad / "cut_0000.nii.gz").write_bytes(raw[: len(raw) // 2])
    (bad / "text_0000.nii.gz").write_text("patient list\n")
    flat = sitk.GetImageFromArray(ct_volume((1, 40, 40))[0])  # a 2-D image
    sitk.WriteImage(flat, str(bad / "flat_0000.nii.gz"))
    empty = tmp_path / "empty"
    empty.mkdir()
    for inputs, rc in ((bad, 1), (empty, 2)):
        run = organizers_run(image, inputs, tmp_path / "out" / inputs.name, gpu_index)
        local = local_run(inputs, tmp_path / "local" / inputs.name, demo_model)
        assert (run.rc, local.rc) == (rc, rc), "\n".join(run.lines + local.lines)
        assert all(LINE_FORMATS.match(ln) for ln in run.lines), run.lines
        assert run.problems() == as_in_container(local.problems(), inputs, local.out)
        assert run.problems(), run.lines
        # Nothing partial: no mask, no temporary file for a refused case.
        assert list(run.out.iterdir()) == []
    assert run.lines == ["error: no <case>_0000.nii.gz files in /workspace/inputs"]


def test_container_can_write_only_outputs_and_tmp(image, tmp_path):
    # The options every run here gets: what the predictor could not have written.
    script = (
        "for p in /tmp/a /workspace/outputs/b /workspace/c /workspace/models/d /root/e /f; do "
        'if touch "$p" 2>/dev/null; then echo "$p written"; else echo "$p refused"; fi; done'
    )
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o777)
    mount = ["-v", f"{out}/:/workspace/outputs/"]
    result = subprocess.run(
        ["docker", "container", "run", "--rm", *RUN_OPTIONS, *mount, image, "bash", "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:6] == [
        "/tmp/a written",
        "/workspace/outputs/b written",
        "/workspace/c refused",
        "/workspace/models/d refused",
        "/root/e refused",
        "/f refused",
    ]
    assert [p.name for p in out.iterdir()] == ["b"]


def test_image_holds_only_what_inference_needs(image):
    # dynamic-network-architectures is installed without the dependencies it declares;
    # the runs above show that `python -m inference` works without them.
    probe = (
        "import importlib.util, json, torch, numpy, SimpleITK, dynamic_network_architectures; "
        f"print(json.dumps([m for m in {LEFT_OUT!r} if importlib.util.find_spec(m)]))"
    )
    result = subprocess.run(
        ["docker", "container", "run", "--rm", *RUN_OPTIONS, image, "python", "-c", probe],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


def test_model_given_at_run_time(image, gpu_index, tiny_model, tmp_path):
    write_cases(tmp_path / "cases")
    (name, inputs), *_ = one_case_folders(tmp_path / "cases", tmp_path / "in")
    run = organizers_run(
        image,
        inputs,
        tmp_path / "out",
        gpu_index,
        ("-e", "MODEL_DIR=/models/x", "-v", f"{tiny_model}:/models/x:ro"),
    )
    assert run.rc == 0, "\n".join(run.lines)
    assert "1 model(s), 1 network(s) [x:3d_fullres]" in run.lines[0]
    local = local_run(inputs, tmp_path / "local", tiny_model)
    labels, _ = read_mask(run.out / f"{name}.nii.gz")
    np.testing.assert_array_equal(labels, read_mask(local.out / f"{name}.nii.gz")[0])


def test_two_model_ensemble_baked_in_with_slim_checkpoints(
    image, gpu_index, tiny_model, tiny_model_b, tmp_path
):
    member_a = with_optimizer_state(tiny_model, tmp_path / "a")
    context = copy_build_context(
        tmp_path / "context", {"ensemble/a": member_a, "ensemble/b": tiny_model_b}
    )
    ensemble = f"{TEAM}-ensemble:latest"
    make(
        "image-local",
        f"IMAGE={ensemble}",
        "MODEL=models/ensemble",
        f"CONTEXT={context}",
        "BUILD_ARGS=--quiet",
    )
    try:
        write_cases(tmp_path / "cases")
        (name, inputs), *_ = one_case_folders(tmp_path / "cases", tmp_path / "in")
        run = organizers_run(ensemble, inputs, tmp_path / "out", gpu_index)
        assert run.rc == 0, "\n".join(run.lines)
        assert "2 model(s), 2 network(s) [a:3d_fullres, b:3d_fullres]" in run.lines[0]
        local = local_run(inputs, tmp_path / "local", context / "models" / "ensemble")
        labels, _ = read_mask(run.out / f"{name}.nii.gz")
        np.testing.assert_array_equal(labels, read_mask(local.out / f"{name}.nii.gz")[0])
        # The baked-in checkpoint lost the optimizer state (the default), nothing else.
        probe = (
            "import os, torch; p = 'models/submission/a/fold_all/checkpoint_final.pth'; "
            "c = torch.load(p, weights_only=True); "
            "print(os.path.getsize(p), c['optimizer_state'], sorted(c['network_weights']))"
        )
        result = subprocess.run(
            ["docker", "container", "run", "--rm", *RUN_OPTIONS, ensemble, "python", "-c", probe],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr
        size, state, keys = result.stdout.split(" ", 2)
        source = member_a / "fold_all" / "checkpoint_final.pth"
        assert state == "None" and int(size) < 0.75 * source.stat().st_size
        weights = torch.load(source, weights_only=False)["network_weights"]
        assert keys.strip() == str(sorted(weights))
    finally:
        subprocess.run(["docker", "image", "rm", ensemble], capture_output=True, check=False)


# -- the profiler's Docker mode -------------------------------------------------------------


def test_profiler_docker_mode_measures_the_container(image, tmp_path):
    from profiling.cli import main

    write_cases(tmp_path / "cases")
    (tmp_path / "cases" / "caseB_0000.nii.gz").unlink()
    report = tmp_path / "report"
    rc = main(
        [
            "-i",
            str(tmp_path / "cases"),
            "-o",
            str(report),
            "-q",
            "--no-plots",
            "--docker",
            image,
            "--docker-options=--network none",
        ]
    )
    data = json.loads((report / "results.json").read_text())
    case = data["cases"][0]
    assert rc == 0, case["error"]
    assert case["output_ok"]
    if not data["gpu"]["available"]:
        assert "--gpus" not in case["argv"]
    m = case["metrics"]
    # The container's own memory: the predictor with torch and the model is hundreds of
    # MB, the docker client tens.
    assert m["max_container_mb"] > 150 > m["max_rss_mb"]
    assert m["total_container_mb_s"] > 0
    # samples are stored rounded to 0.1 MB, the peak is not
    assert max(v for v in case["samples"]["container_mb"] if v) <= m["max_container_mb"] + 0.05
    # The predictor's own time from its log, the rest is overhead.
    assert 0 < m["predictor_s"] < m["time_s"]
    assert m["overhead_s"] == pytest.approx(m["time_s"] - m["predictor_s"])
    assert "## Container" in (report / "summary.md").read_text()


# -- the upload file -------------------------------------------------------------------------


def test_submission_file_loads_under_a_fresh_tag_and_runs_a_case(image, tmp_path):
    target = tmp_path / "team.tar.gz"
    output = make("submission", f"IMAGE={image}", f"SUBMISSION={target}")
    with gzip.open(target) as f:
        assert f.read(512)  # a gzip stream
    assert f"checked: {target} loads as {image}" in output, output
    assert "done: 1/1 case(s) written to /workspace/outputs" in output
