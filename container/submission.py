"""The file to upload: ``docker save IMAGE | gzip``, then loaded back and run on a case.

``python -m container.submission --image TEAM:latest -o build/TEAM.tar.gz`` (what
``make submission`` runs):

1. saves the image and compresses it with gzip (pigz where installed: the same format,
   on every core) into a temporary file, renamed when complete (never a partial file);
2. checks the file as the organizers will use it: the image's tag is removed (a second
   tag keeps its layers, so nothing is rebuilt), ``docker load`` brings TEAM:latest back
   from the file alone (Docker reads and checks every layer against its digest), and the
   organizers' command runs one synthetic case with that fresh tag; the mask must come
   out with the input's geometry. The tag is put back if anything fails on the way.

Exit status 0 when the file is written and checked; 1 when the check fails (the file is
left for inspection); 2 when nothing could be done (no Docker engine, no such image).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from inference.atomic import atomic_path
from profiling.docker import container_name_for, docker_argv

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE = 0, 1, 2


class SubmissionError(Exception):
    """A step failed; the message is one line."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used for --help)."""
    p = argparse.ArgumentParser(
        prog="python -m container.submission",
        description="Write the upload file of a submission image (docker save | gzip) and "
        "check it: load it back under a fresh tag and run the organizers' command on one "
        "synthetic case.",
    )
    p.add_argument("--image", required=True, help="the image, e.g. team:latest")
    p.add_argument("-o", "--output", required=True, type=Path, help="the .tar.gz to write")
    p.add_argument(
        "--no-check", action="store_true", help="only write the file, do not load and run it"
    )
    p.add_argument(
        "--docker-options",
        default="--network none",
        help="extra `docker container run` options for the check (default: --network none; "
        "the predictor needs no network)",
    )
    return p


def _docker(*args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, **kwargs)
    if check and result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise SubmissionError(f"docker {args[0]} failed: {last}")
    return result


def image_id(image: str) -> str | None:
    """The image's id, or None if there is no such image."""
    result = _docker("image", "inspect", "--format", "{{.Id}}", image, check=False)
    return result.stdout.strip() if result.returncode == 0 else None


def save(image: str, output: Path) -> float:
    """``docker save image | gzip > output``, atomically; returns the seconds it took."""
    output.parent.mkdir(parents=True, exist_ok=True)
    compressor = ["pigz", "-c"] if shutil.which("pigz") else ["gzip", "-c"]
    t = time.perf_counter()
    with atomic_path(output) as tmp, open(tmp, "wb") as f:
        saver = subprocess.Popen(["docker", "save", image], stdout=subprocess.PIPE)
        zipper = subprocess.run(compressor, stdin=saver.stdout, stdout=f, check=False)
        saver.stdout.close()
        if saver.wait() != 0 or zipper.returncode != 0:
            raise SubmissionError(f"docker save {image} | {compressor[0]} failed")
    return time.perf_counter() - t


def gpu_index() -> int | None:
    """0 where NVML sees a GPU (the check then passes ``--gpus``), else None."""
    from profiling.sources import open_gpu_source

    source = open_gpu_source(0)
    try:
        return 0 if source.describe().get("available") else None
    finally:
        source.close()


def run_case(image: str, options: list[str]) -> str:
    """The organizers' command on one synthetic case; returns the predictor's last line."""
    from inference.nifti import read_geometry
    from synthetic.dataset import write_test_folder

    with tempfile.TemporaryDirectory(prefix="submission-check-") as tmp:
        root = Path(tmp)
        # 16x48x48 voxels at 2 x 1 x 1 mm: about one patch of the demo model, seconds on a CPU.
        write_test_folder(
            root / "case", n_cases=1, seed=3, shape_zyx=(16, 48, 48), spacing_zyx_mm=(2, 1, 1)
        )
        images = sorted((root / "case" / "images").glob("*_0000.nii.gz"))
        inputs, outputs = root / "inputs", root / "outputs"
        inputs.mkdir()
        outputs.mkdir()
        outputs.chmod(0o777)  # the container may run as another user
        shutil.copy2(images[0], inputs / images[0].name)
        name = f"{container_name_for(image)}-check-{os.getpid()}"
        argv = docker_argv(image, inputs, outputs, name, gpu_index(), options)
        result = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
        lines = result.stderr.strip().splitlines()
        if result.returncode != 0:
            raise SubmissionError(
                f"the organizers' command exited with {result.returncode}: "
                + (lines[-1] if lines else "(no message)")
            )
        expected = outputs / images[0].name.replace("_0000.nii.gz", ".nii.gz")
        if not expected.is_file():
            raise SubmissionError(f"the organizers' command wrote no {expected.name}")
        mismatch = read_geometry(images[0]).mismatch(read_geometry(expected))
        if mismatch:
            raise SubmissionError(f"{expected.name} has another geometry: {mismatch}")
        return lines[-1] if lines else ""


def check(image: str, output: Path, options: list[str]) -> str:
    """Load ``output`` back as a fresh ``image`` tag and run a case with it."""
    built = image_id(image)
    repository = image.rsplit(":", 1)[0] if ":" in image.rsplit("/", 1)[-1] else image
    keep = f"{repository}:submission-check-{os.getpid()}"
    _docker("image", "tag", image, keep)  # holds the layers while the tag is gone
    try:
        _docker("image", "rm", image)
        loaded = _docker("image", "load", "--input", str(output), timeout=3600)
        if image_id(image) != built:
            raise SubmissionError(
                f"loading {output} did not give back {image} ({loaded.stdout.strip()})"
            )
        return run_case(image, options)
    finally:
        if image_id(image) is None:
            _docker("image", "tag", keep, image, check=False)
        _docker("image", "rm", keep, check=False)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    if shutil.which("docker") is None:
        print("error: docker not found on PATH", file=sys.stderr)
        return EXIT_USAGE
    if image_id(args.image) is None:
        print(
            f"error: no image {args.image}: build it first (make image, or make image-local "
            "on a machine without an image registry)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        seconds = save(args.image, args.output)
    except (SubmissionError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    size_mb = args.output.stat().st_size / 2**20
    print(f"wrote {args.output}: {size_mb:.0f} MB in {seconds:.0f} s", file=sys.stderr)
    if args.no_check:
        return EXIT_OK
    t = time.perf_counter()
    try:
        last = check(args.image, args.output, shlex.split(args.docker_options))
    except (SubmissionError, subprocess.TimeoutExpired, OSError) as err:
        print(f"error: check of {args.output} failed: {err}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    print(
        f"checked: {args.output} loads as {args.image} and runs a case with the organizers' "
        f"command ({time.perf_counter() - t:.0f} s; predictor: {last})",
        file=sys.stderr,
    )
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
