"""``python -m benchmarks.container``: what the submission image costs (``make bench-container``).

Measured on this machine, with the local CPU base (``make image-local``):

- build time: the base image from nothing (``--clean-base``: Debian packages and the torch
  wheel, what ``make base-local`` does once per machine), the image with no build cache
  (``docker build --no-cache`` on the existing base: as after pulling the official base),
  the image again with everything cached, and after a change to the code only;
- image size: unpacked (``docker image inspect``; the base's share stated) and as the
  upload file (``docker save | gzip``, timed);
- per case: the wall time of the organizers' command against ``sh predict.sh`` run directly
  on the host (the same model, the same threads), each through the profiler, runs
  interleaved, medians over ``--repeat``: the difference is the container's overhead. The
  predictor's own time (from its log) and the container's peak memory (from its cgroup) are
  shown too.

Writes OUT/container.json, OUT/RESULTS.md and the ``container`` section of
benchmarks/RESULTS.md. The machine's load average is recorded before and after: the
figures are comparable only from a quiet machine.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.cases import SMALL, ensure_cases
from container.context import copy_build_context
from container.submission import save
from inference.atomic import write_text_atomically
from profiling.sources import machine_info
from synthetic.dataset import write_test_folder

REPO = Path(__file__).resolve().parents[1]
RESULTS_MD = REPO / "benchmarks" / "RESULTS.md"
BEGIN, END = "<!-- BEGIN container section -->", "<!-- END container section -->"
COMMAND = "python -m benchmarks.container"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used for --help)."""
    p = argparse.ArgumentParser(
        prog=COMMAND,
        description="Build times, image size (unpacked and as the upload file) and the "
        "per-case overhead of the organizers' docker command over `sh predict.sh`, with the "
        "local CPU base (make image-local). Needs a Docker engine; about 10 minutes on 2 "
        "cores, plus several with --clean-base.",
    )
    p.add_argument(
        "-o",
        "--out",
        type=Path,
        default=REPO / "bench_out" / "container",
        help="work and report folder (default bench_out/container)",
    )
    p.add_argument("--team", default="flare24-bench", help="image name (default flare24-bench)")
    p.add_argument("--repeat", type=int, default=3, help="runs per case and way (default 3)")
    p.add_argument(
        "--clean-base",
        action="store_true",
        help="also rebuild the local base image from nothing and time it (minutes)",
    )
    p.add_argument("--no-builds", action="store_true", help="skip the build-time measurements")
    p.add_argument("--no-upload", action="store_true", help="skip docker save | gzip")
    p.add_argument(
        "--no-results-md", action="store_true", help="do not rewrite benchmarks/RESULTS.md"
    )
    return p


def _make(*args: str) -> float:
    """Run ``make ARGS`` in the repository; returns its wall time."""
    t = time.perf_counter()
    result = subprocess.run(
        ["make", "--no-print-directory", *args], cwd=REPO, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"make {' '.join(args)} failed:\n{(result.stdout + result.stderr)[-3000:]}"
        )
    return time.perf_counter() - t


def _size_mb(image: str) -> float:
    result = subprocess.run(
        ["docker", "image", "inspect", "--format", "{{.Size}}", image],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(result.stdout.strip()) / 2**20


def measure_builds(team: str, out: Path, clean_base: bool) -> dict[str, float]:
    """Build times in seconds: base (optional), no cache, all cached, code changed."""
    times: dict[str, float] = {}
    if clean_base:
        print("building the base image from nothing ...", file=sys.stderr)
        times["base_clean_s"] = _make("base-local", "FORCE=1")
    # The base must exist before "no cache" is timed: image-local would otherwise build it
    # inside that figure (a no-op when it exists).
    _make("base-local")
    _make("wheelhouse")
    context = out / "context"
    shutil.rmtree(context, ignore_errors=True)
    copy_build_context(context, {"demo": REPO / "models" / "demo"})
    image = f"{team}-build:latest"
    common = [f"IMAGE={image}", "MODEL=models/demo", f"CONTEXT={context}"]
    print("building the image with no cache ...", file=sys.stderr)
    times["image_no_cache_s"] = _make("image-local", *common, "BUILD_ARGS=--no-cache")
    print("building it again, everything cached ...", file=sys.stderr)
    times["image_cached_s"] = _make("image-local", *common)
    with open(context / "inference" / "__init__.py", "a", encoding="utf-8") as f:
        f.write(f"# benchmark edit {time.time()}\n")
    print("building it after a code change ...", file=sys.stderr)
    times["image_code_change_s"] = _make("image-local", *common)
    subprocess.run(["docker", "image", "rm", image], capture_output=True, check=False)
    shutil.rmtree(context, ignore_errors=True)
    return times


def bench_cases(out: Path) -> list[Path]:
    """The benchmark suite's small case and a one-patch case, one folder holding both."""
    folder = out / "cases"
    small = ensure_cases(REPO / "bench_out" / "cases", [SMALL])[0]
    if not folder.is_dir():
        tmp = out / ".cases-tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        # 16x48x48 voxels at 2 x 1 x 1 mm: one patch of the demo model, the shortest run.
        write_test_folder(tmp, n_cases=1, seed=5, shape_zyx=(16, 48, 48), spacing_zyx_mm=(2, 1, 1))
        (tmp / "images").rename(folder)
        shutil.rmtree(tmp)
        os.link(small.image_path, folder / small.image_path.name)
    return sorted(folder.glob("*_0000.nii.gz"))


def _profile(cases: Path, report: Path, docker_image: str | None) -> dict[str, dict]:
    """One profiler run over ``cases``; per-case metrics."""
    argv = [sys.executable, "-m", "profiling", "-i", str(cases), "-o", str(report), "-q"]
    argv += ["--no-plots"]
    if docker_image:
        argv += ["--docker", docker_image, "--docker-options=--network none"]
    # predict.sh runs $PYTHON: this interpreter, whose environment has the requirements.
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, env=env)
    data = json.loads((report / "results.json").read_text())
    if result.returncode != 0:
        errors = [c["error"] for c in data["cases"] if c["error"]]
        raise RuntimeError(f"profiling failed: {errors or result.stderr[-2000:]}")
    return {c["case"]: c["metrics"] for c in data["cases"]}


def measure_cases(image: str, out: Path, repeat: int) -> dict[str, dict]:
    """Per case: medians of the organizers' command and of predict.sh run directly."""
    cases = bench_cases(out)
    runs: dict[str, dict[str, list[dict]]] = {}
    for r in range(repeat):
        # Alternate which way goes first, so a busy spell does not hit one way only.
        ways = ["docker", "local"] if r % 2 == 0 else ["local", "docker"]
        for way in ways:
            print(f"round {r + 1}/{repeat}: {way} ...", file=sys.stderr)
            report = out / "reports" / f"{way}-{r}"
            shutil.rmtree(report, ignore_errors=True)
            found = _profile(cases[0].parent, report, image if way == "docker" else None)
            for case, metrics in found.items():
                runs.setdefault(case, {}).setdefault(way, []).append(metrics)

    def median(items: list[dict], key: str) -> float | None:
        values = [m[key] for m in items if m.get(key) is not None]
        return statistics.median(values) if values else None

    summary = {}
    for case, ways in runs.items():
        summary[case] = {
            way: {
                key: median(items, key)
                for key in ("time_s", "predictor_s", "overhead_s", "max_container_mb", "max_rss_mb")
            }
            for way, items in ways.items()
        }
    return summary


def _opt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def section_markdown(data: dict) -> str:
    """The container section of RESULTS.md."""
    m = data["machine"]
    lines = [
        "## Container",
        "",
        f"`{data['command']}` on {data['date']}: {m['cpu']}, {m['cpu_cores_logical']} cores, "
        f"{m['ram_mb'] / 1024:.0f} GB RAM, no GPU; Docker engine {data['docker_version']}, "
        f"the local CPU base (`make image-local`). Load average (1 min) "
        f"{data['load_before'][0]:.1f} before, {data['load_after'][0]:.1f} after: "
        + (
            # The load after is mostly the benchmark's own last runs: up to one per core.
            "a quiet machine."
            if data["load_before"][0] < 1.5 and data["load_after"][0] <= m["cpu_cores_logical"]
            else "**the machine was busy; re-run on a quiet one for final figures**."
        ),
        "",
    ]
    sizes = data["sizes"]
    lines += [
        "| Image | Size |",
        "|---|---:|",
        f"| unpacked (`docker image inspect`) | {sizes['image_mb']:.0f} MB |",
        f"| of which the base (Debian, Python 3.11, torch CPU) | {sizes['base_mb']:.0f} MB |",
    ]
    if "upload_mb" in sizes:
        lines.append(
            f"| upload file (`docker save \\| {sizes['compressor']}`) "
            f"| {sizes['upload_mb']:.0f} MB (written in {sizes['upload_s']:.0f} s) |"
        )
    lines.append("")
    if data.get("builds"):
        b = data["builds"]
        lines += ["| Build | Time |", "|---|---:|"]
        if "base_clean_s" in b:
            lines.append(
                "| base image from nothing (`make base-local FORCE=1`) "
                f"| {b['base_clean_s']:.0f} s |"
            )
        lines += [
            "| image, no build cache (`--no-cache`, base present) "
            f"| {b['image_no_cache_s']:.0f} s |",
            f"| image, everything cached | {b['image_cached_s']:.0f} s |",
            f"| image after a code change (inference/) | {b['image_code_change_s']:.0f} s |",
            "",
        ]
    lines += [
        "| Case | `sh predict.sh` (s) | organizers' command (s) | difference (s) "
        "| outside the predictor, direct / container (s) | container peak memory (MB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for case, ways in data["cases"].items():
        local, docker = ways["local"], ways["docker"]
        lines.append(
            f"| {case} | {local['time_s']:.1f} | {docker['time_s']:.1f} "
            f"| {docker['time_s'] - local['time_s']:+.1f} "
            f"| {_opt(local['overhead_s'])} / {_opt(docker['overhead_s'])} "
            f"| {_opt(docker['max_container_mb'], 0)} |"
        )
    lines += [
        "",
        f"Medians of {data['repeat']} run(s) per case and way, interleaved; the same model "
        "(models/demo) and thread count. *Difference*: the organizers' command minus "
        "`sh predict.sh` on the host. *Outside the predictor*: wall time minus the time the "
        "predictor reports for itself (its `done: … in X s` line: from just after its first "
        "imports to its last write), i.e. interpreter start and imports directly, plus "
        "container creation, bind mounts, cgroup and removal (`--rm`) in the container; "
        "less sensitive to a busy machine than the difference of two whole runs. Container "
        "memory is the cgroup's high-water mark, page cache included, as `-m 28G` counts it. "
        "1 MB = 2^20 bytes.",
    ]
    return "\n".join(lines) + "\n"


def update_results_md(path: Path, section: str) -> None:
    """Replace (or add, before the hand-written notes) the container section."""
    text = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmark results\n"
    block = f"{BEGIN}\n{section.rstrip()}\n{END}"
    if BEGIN in text and END in text:
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        anchor = "## Reading these figures"
        at = text.find(anchor)
        text = (text[:at] + block + "\n\n" + text[at:]) if at >= 0 else text + "\n" + block + "\n"
    write_text_atomically(path, text)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.repeat < 1:
        print("error: --repeat must be at least 1", file=sys.stderr)
        return 2
    if (
        shutil.which("docker") is None
        or subprocess.run(["docker", "version"], capture_output=True).returncode
    ):
        print("error: no Docker engine answers (see docs/container.md)", file=sys.stderr)
        return 2
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    image = f"{args.team}:latest"
    data: dict = {
        "command": COMMAND + (" --clean-base" if args.clean_base else ""),
        "date": dt.date.today().isoformat(),
        "machine": machine_info(),
        "load_before": list(os.getloadavg()),
        "repeat": args.repeat,
        "docker_version": subprocess.run(
            ["docker", "version", "--format", "{{.Server.Version}}"],
            capture_output=True,
            text=True,
        ).stdout.strip(),
    }
    try:
        if not args.no_builds:
            data["builds"] = measure_builds(args.team, out, args.clean_base)
        print(f"building {image} ...", file=sys.stderr)
        _make("image-local", f"TEAM={args.team}")
        base = subprocess.run(
            ["make", "-s", "--no-print-directory", "print-LOCAL_BASE"],
            cwd=REPO,
            capture_output=True,
            text=True,
        ).stdout.strip()
        data["sizes"] = {"image_mb": _size_mb(image), "base_mb": _size_mb(base)}
        if not args.no_upload:
            print("docker save | gzip ...", file=sys.stderr)
            upload = out / f"{args.team}.tar.gz"
            data["sizes"]["upload_s"] = save(image, upload)
            data["sizes"]["upload_mb"] = upload.stat().st_size / 2**20
            data["sizes"]["compressor"] = "pigz" if shutil.which("pigz") else "gzip"
            upload.unlink()
        data["cases"] = measure_cases(image, out, args.repeat)
    except (RuntimeError, subprocess.CalledProcessError, OSError) as err:
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 1
    data["load_after"] = list(os.getloadavg())
    (out / "container.json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    section = section_markdown(data)
    (out / "RESULTS.md").write_text(section, encoding="utf-8")
    if not args.no_results_md:
        update_results_md(RESULTS_MD, section)
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
