"""The submission container's contract, checked without a Docker engine.

The organizers run ``/bin/bash -c "sh predict.sh"`` in WORKDIR /workspace of the image.
These tests check what that needs, piece by piece:

* the Dockerfile copies only paths that exist and that ``.dockerignore`` lets through,
  and the build context leaves out the virtualenv, work folders and tests;
* ``predict.sh`` run exactly so, in a folder laid out like the image's /workspace (the
  script, ``inference/``, ``models/submission``; nothing else of the repository), with
  only INPUT_DIR/OUTPUT_DIR overridden through the environment, predicts a case, and
  treats sub-folders of ``models/submission`` as an ensemble;
* every third-party module that ``inference/`` imports comes from requirements.txt, and
  (slow) a fresh virtual environment built from requirements.txt alone runs predict.sh.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from inference.nifti import Geometry, read_image, write_image
from tests.conftest import REPO, Payload

WORKSPACE_PARTS = ("predict.sh", "inference")


# -- Dockerfile and build context ----------------------------------------------------------


def dockerfile_args() -> dict[str, str]:
    """ARG defaults of the Dockerfile."""
    text = (REPO / "Dockerfile").read_text()
    return dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, re.MULTILINE))


def dockerfile_copy_sources() -> list[str]:
    """Source paths of every COPY from the build context, with ARG defaults substituted
    (``COPY --from=STAGE`` copies between build stages and is left out)."""
    args = dockerfile_args()
    sources = []
    for line in (REPO / "Dockerfile").read_text().splitlines():
        parts = line.split()
        if not parts or parts[0] != "COPY" or any(w.startswith("--from") for w in parts):
            continue
        words = [w for w in parts[1:] if not w.startswith("--")]
        for src in words[:-1]:
            sources.append(re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], src))
    return sources


def dockerignore_patterns() -> list[tuple[bool, re.Pattern]]:
    """``.dockerignore`` as (is_exception, regex) pairs, in order (Docker's semantics)."""
    rules = []
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:] if negate else line
        pattern = pattern.strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**", i):
                regex += ".*"
                i += 2
                if pattern.startswith("/", i):
                    regex += "/?"
                    i += 1
                continue
            c = pattern[i]
            regex += "[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c)
            i += 1
        rules.append((negate, re.compile(regex + "$")))
    return rules


def in_build_context(path: str) -> bool:
    """Whether Docker sends ``path`` (relative to the repository) to the build.

    A pattern matches a path or any of its parent folders; the last matching pattern
    decides (``!`` re-includes).
    """
    parts = Path(path).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    included = True
    for negate, regex in dockerignore_patterns():
        if any(regex.match(c) for c in candidates):
            included = negate
    return included


def test_dockerfile_copies_only_existing_paths_that_reach_the_build_context():
    sources = dockerfile_copy_sources()
    model = dockerfile_args()["MODEL"]
    assert set(sources) >= {"predict.sh", "inference/", "requirements.txt", model}
    for src in sources:
        if src == model:
            continue  # checked by the next test, against the trained demo model
        if "[" in src:
            # An optional source (the wildcard may match nothing): build/wheelhouse, which
            # only `make image-local` writes.
            assert src == "build/wheelhous[e]"
            assert in_build_context("build/wheelhouse/numpy-2.4.6-cp311.whl")
            continue
        path = REPO / src
        assert path.exists(), f"the Dockerfile copies {src}, which does not exist"
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        for f in files:
            rel = f.relative_to(REPO).as_posix()
            if "__pycache__" not in rel:
                assert in_build_context(rel), f"{rel} is copied but excluded by .dockerignore"
    # requirements.txt is self-contained: the lock's exact pins, no option referring
    # to a file the build context leaves out.
    assert not [
        line
        for line in (REPO / "requirements.txt").read_text().splitlines()
        if line.startswith("-")
    ]


def test_default_model_of_the_image_exists_and_is_complete():
    model = REPO / dockerfile_args()["MODEL"]
    if not model.is_dir():
        pytest.fail(f"{model.relative_to(REPO)} (the image's MODEL) is missing: train it first")
    members = [model] if (model / "plans.json").is_file() else sorted(model.iterdir())
    for member in members:
        for name in ("plans.json", "dataset.json"):
            assert (member / name).is_file() and in_build_context(
                (member / name).relative_to(REPO).as_posix()
            )
        checkpoints = list(member.glob("fold_*/checkpoint_final.pth"))
        assert checkpoints, f"{member} has no fold_*/checkpoint_final.pth"
        for ckpt in checkpoints:
            assert in_build_context(ckpt.relative_to(REPO).as_posix())


def test_build_context_leaves_out_everything_the_image_does_not_need():
    for path in (
        ".venv/bin/python",
        "work/x",
        "demo_out/summary.md",
        "bench_out/a.csv",
        "tests/test_container.py",
        "training/cli.py",
        "scripts/demo.py",
        ".git/HEAD",
        "inference/__pycache__/cli.cpython-311.pyc",
        "models/demo/fold_0/validation/case.nii.gz",
        "models/demo/fold_0/checkpoint_latest.pth",
        "models/demo/fold_0/checkpoint_best.pth",
        "models/demo/fold_0/progress.png",
        "build/requirements-image.txt",
        "build/flare24.tar.gz",
        "container/submission.py",
    ):
        assert not in_build_context(path), path
    for path in (
        "predict.sh",
        "inference/cli.py",
        "models/demo/plans.json",
        "models/demo/fold_0/checkpoint_final.pth",
        "models/ensemble/bs8/fold_all/checkpoint_final.pth",
        "container/slim.py",
        "build/wheelhouse/numpy-2.4.6-cp311-cp311-manylinux_2_28_x86_64.whl",
    ):
        assert in_build_context(path), path
    # What is sent besides the models stays small (folders left out are not descended:
    # no pattern here re-includes anything below an excluded folder).
    sent = []
    for folder, dirs, files in os.walk(REPO):
        rel = Path(folder).relative_to(REPO)
        dirs[:] = [d for d in dirs if in_build_context((rel / d).as_posix()) and d != "models"]
        sent += [Path(folder) / f for f in files if in_build_context((rel / f).as_posix())]
    assert {p.relative_to(REPO).as_posix() for p in sent} >= {"predict.sh", "inference/cli.py"}
    assert sum(p.stat().st_size for p in sent) < 2 * 2**20, sorted(map(str, sent))


# -- predict.sh in an image-like /workspace ------------------------------------------------


def make_workspace(root: Path, models: dict[str, Path]) -> Path:
    """Lay out ``root`` like the image's /workspace: predict.sh, inference/, the models."""
    root.mkdir(parents=True)
    shutil.copy2(REPO / "predict.sh", root / "predict.sh")
    shutil.copytree(
        REPO / "inference", root / "inference", ignore=shutil.ignore_patterns("__pycache__")
    )
    submission = root / "models" / "submission"
    if list(models) == [""]:
        shutil.copytree(models[""], submission)
    else:
        for name, folder in models.items():
            shutil.copytree(folder, submission / name)
    return root


def write_cases(folder: Path, n: int = 1) -> dict[str, Geometry]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    geos = {}
    for i in range(n):
        shape = (14, 64, 64)
        vol = rng.normal(40, 30, shape)
        vol[:, :8] = -1000
        geo = Geometry(
            tuple(reversed(shape)), (0.8, 0.8, 2.5), (1.0, 2.0, 3.0), (1, 0, 0, 0, 1, 0, 0, 0, 1)
        )
        write_image(folder / f"case{i}_0000.nii.gz", vol.astype(np.int16), geo)
        geos[f"case{i}"] = geo
    return geos


def run_predict_sh(
    workspace: Path, python_bin: Path, timeout_s: float = 600
) -> subprocess.CompletedProcess:
    """The organizers' command, in ``workspace``; only the I/O folders come from the env."""
    # Nothing of this session's environment that predict.sh should set itself.
    drop = ("PYTHONPATH", "MODEL_DIR", "PYTHONDONTWRITEBYTECODE", "PREDICT_ARGS", "PYTHON")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(
        INPUT_DIR=str(workspace / "inputs"),
        OUTPUT_DIR=str(workspace / "outputs"),
        PATH=f"{python_bin}{os.pathsep}{env.get('PATH', '')}",
        OMP_NUM_THREADS="2",
    )
    return subprocess.run(
        ["/bin/bash", "-c", "sh predict.sh"],
        cwd=workspace,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def check_outputs(workspace: Path, geos: dict[str, Geometry]) -> None:
    out = workspace / "outputs"
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{n}.nii.gz" for n in geos)
    for name, geo in geos.items():
        labels, written = read_image(out / f"{name}.nii.gz")
        assert written.mismatch(geo) is None
        assert labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1}


def test_predict_sh_runs_as_in_the_image(tiny_model, tmp_path):
    ws = make_workspace(tmp_path / "workspace", {"": tiny_model})
    geos = write_cases(ws / "inputs", 2)
    result = run_predict_sh(ws, Path(sys.executable).parent)
    assert result.returncode == 0, result.stderr
    assert "1 model(s), 1 network(s)" in result.stderr
    assert f"written to {ws / 'outputs'}" in result.stderr
    check_outputs(ws, geos)
    # The script compiled nothing into the read-only image (PYTHONDONTWRITEBYTECODE).
    assert not list((ws / "inference").rglob("__pycache__"))


def test_predict_sh_treats_model_subfolders_as_an_ensemble(tiny_model, tiny_model_b, tmp_path):
    ws = make_workspace(tmp_path / "workspace", {"bs4": tiny_model, "bs8": tiny_model_b})
    geos = write_cases(ws / "inputs", 1)
    result = run_predict_sh(ws, Path(sys.executable).parent)
    assert result.returncode == 0, result.stderr
    assert "2 model(s), 2 network(s) [bs4:3d_fullres, bs8:3d_fullres]" in result.stderr
    check_outputs(ws, geos)


def test_predict_sh_fails_clearly_without_a_model(tmp_path):
    ws = tmp_path / "workspace"
    (ws / "models" / "submission").mkdir(parents=True)
    shutil.copy2(REPO / "predict.sh", ws / "predict.sh")
    write_cases(ws / "inputs", 1)
    result = run_predict_sh(ws, Path(sys.executable).parent)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: MODEL_DIR {ws}/models/submission holds no plans.json and no model sub-folders"
    ]


# -- slim checkpoints (the Dockerfile's model stage) ---------------------------------------


def with_optimizer_state(model: Path, destination: Path) -> Path:
    """A copy of ``model`` whose checkpoint holds SGD state, as nnUNetv2_train saves it."""
    from inference.model import load_model

    shutil.copytree(model, destination)
    path = destination / "fold_all" / "checkpoint_final.pth"
    checkpoint = torch.load(path, weights_only=False)
    net = load_model(model).networks[0]
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.99, nesterov=True)
    sum(p.sum() for p in net.parameters()).backward()
    optimizer.step()  # fills the momentum buffers
    checkpoint["optimizer_state"] = optimizer.state_dict()
    torch.save(checkpoint, path)
    return destination


def test_slim_checkpoints_keep_what_both_predictors_read(tiny_model, tmp_path):
    from container.slim import main as slim_main
    from inference.model import load_model
    from tests.conftest import nnunet_reference

    full = with_optimizer_state(tiny_model, tmp_path / "full")
    slim = Path(shutil.copytree(full, tmp_path / "slim"))
    path = slim / "fold_all" / "checkpoint_final.pth"
    # The script the Dockerfile runs, as it runs it: a file alone, no project imports.
    result = subprocess.run(
        [sys.executable, REPO / "container" / "slim.py", slim],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert result.returncode == 0, result.stderr
    assert "MB saved" in result.stdout.splitlines()[-1]
    before = (full / "fold_all" / "checkpoint_final.pth").stat().st_size
    # The momentum buffers are as large as the weights: about half of the file goes.
    assert path.stat().st_size < 0.6 * before
    original = torch.load(full / "fold_all" / "checkpoint_final.pth", weights_only=False)
    slimmed = torch.load(path, weights_only=True)  # no numpy scalars left either
    assert slimmed["optimizer_state"] is None and slimmed["logging"] is None
    assert original["optimizer_state"] is not None
    for key in ("trainer_name", "init_args", "inference_allowed_mirroring_axes"):
        assert slimmed[key] == original[key]
    for name, tensor in original["network_weights"].items():
        assert torch.equal(slimmed["network_weights"][name], tensor), name
    # Our predictor and nnU-Net's load it; both predict what they predict from the original.
    ours = load_model(slim).networks[0].state_dict()
    assert all(torch.equal(ours[k], v) for k, v in original["network_weights"].items())
    reference = nnunet_reference(slim)
    for name, tensor in original["network_weights"].items():
        assert torch.equal(reference.list_of_parameters[0][name], tensor), name
    ws = make_workspace(tmp_path / "workspace", {"": slim})
    geos = write_cases(ws / "inputs", 1)
    assert run_predict_sh(ws, Path(sys.executable).parent).returncode == 0
    check_outputs(ws, geos)
    # Anything that is not an nnU-Net checkpoint is refused in one line.
    torch.save({"weights": torch.ones(2)}, path)
    assert slim_main([str(slim)]) == 1


def test_slim_refuses_a_checkpoint_that_would_run_code(tmp_path, capsys):
    from container.slim import _checkpoint_globals
    from container.slim import main as slim_main
    from inference.model import checkpoint_globals

    marker = tmp_path / "payload-ran"
    fold = tmp_path / "model" / "fold_all"
    fold.mkdir(parents=True)
    torch.save({"network_weights": {}, "x": Payload(marker)}, fold / "checkpoint_final.pth")
    assert slim_main([str(tmp_path / "model")]) == 1
    assert not marker.exists()
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    # the copy kept for the image's build stage is the predictor's list
    assert _checkpoint_globals() == checkpoint_globals()


# -- requirements ----------------------------------------------------------------------------


def requirement_names(path: Path = REPO / "requirements.txt") -> set[str]:
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            names.add(re.split(r"[<>=!~\[; ]", line)[0].lower().replace("_", "-"))
    return names


def third_party_imports(package: Path) -> set[str]:
    """Top-level modules imported anywhere in ``package`` that are not stdlib or local."""
    found = set()
    for source in package.rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return {m for m in found if m not in sys.stdlib_module_names and m != package.name}


def test_every_module_inference_imports_is_in_requirements():
    from importlib.metadata import packages_distributions

    dists = packages_distributions()
    required = requirement_names()
    modules = third_party_imports(REPO / "inference")
    assert {"torch", "numpy", "SimpleITK"} <= modules
    # plus what inference.model imports by name from plans.json (network, conv, norm, ...)
    from scripts.random_model import plans

    arch = plans("flare")["configurations"]["3d_fullres"]["architecture"]
    named = [
        arch["network_class_name"],
        *(arch["arch_kwargs"][k] or "" for k in arch["_kw_requires_import"]),
    ]
    modules |= {n.split(".")[0] for n in named if n}
    assert "dynamic_network_architectures" in modules
    for module in sorted(modules):
        names = {d.lower().replace("_", "-") for d in dists.get(module, [])}
        assert names & required, f"inference/ imports {module}, not in requirements.txt"
    # the training stack stays out of the image
    assert not required & {"nnunetv2", "scikit-learn", "scikit-image", "batchgenerators"}


@pytest.fixture(scope="session")
def requirements_venv(tmp_path_factory) -> Path:
    """A fresh virtual environment installed as the image is: torch with its dependencies
    (the base image's part), then requirements.txt with --no-deps (the Dockerfile's deps
    stage), so none of what dynamic-network-architectures declares but never imports."""
    venv = tmp_path_factory.mktemp("image_env") / "venv"
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=300)
    pip = [venv / "bin" / "python", "-m", "pip", "install", "-q"]
    for args in (
        ["-c", "requirements.lock", "torch==2.13.0"],
        ["--no-deps", "-r", "requirements.txt"],
    ):
        result = subprocess.run(
            [*pip, *args], cwd=REPO, capture_output=True, text=True, timeout=900
        )
        assert result.returncode == 0, result.stderr
    print(f"\nvenv from requirements.txt: {time.perf_counter() - t:.0f} s")
    return venv


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("CI") == "true",
    reason="CI builds the real image the same way (torch, then requirements.txt --no-deps) "
    "and runs predict.sh in it (tests/test_docker.py, which must run under CI=true)",
)
def test_requirements_alone_run_predict_sh(requirements_venv, tiny_model, tmp_path):
    python = requirements_venv / "bin" / "python"
    missing = subprocess.run(
        [
            python,
            "-c",
            "import importlib.util as u; print([m for m in "
            "('nnunetv2', 'sklearn', 'skimage', 'batchgenerators', 'scipy', 'timm', "
            "'torchvision', 'huggingface_hub', 'safetensors', 'einops') if u.find_spec(m)])",
        ],
        capture_output=True,
        text=True,
    )
    # no training stack, nothing that only dynamic-network-architectures' transformers need
    assert missing.stdout.strip() == "[]", missing.stdout
    ws = make_workspace(tmp_path / "workspace", {"": tiny_model})
    geos = write_cases(ws / "inputs", 1)
    result = run_predict_sh(ws, python.parent)
    assert result.returncode == 0, result.stderr
    check_outputs(ws, geos)
