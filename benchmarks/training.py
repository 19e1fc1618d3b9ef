"""``python -m benchmarks.training``: what a larger batch costs per training iteration.

For each batch size, one ``nnUNetTrainer`` in its own process (so one batch size's memory
does not carry over into the next) runs ``--warmup`` iterations and then ``--iterations``
timed ones of nnU-Net's own ``train_step`` on batches from nnU-Net's own augmentation
pipeline; the parent samples the process tree's RSS (augmentation workers included, with
``profiling``'s sampler, every 0.1 s) and, on a GPU, NVML's device-level used memory; the
child reports ``torch.cuda.max_memory_allocated``. Written to the training section of
benchmarks/RESULTS.md and to ``OUT/training_benchmark.json``.

Configurations (synthetic FLARE-like cases generated at the configuration's own spacing,
so nothing is resampled; 8 fully labeled cases, enough for batch size 8):

- ``compact``: ``plan --compact``'s defaults: 4 stages (32-256 features), 3.0x2.0x2.0 mm,
  patch 96x128x128;
- ``default``: the FLARE24 default ``3d_fullres`` of the method paper (FLARE24.md): 6
  stages (32-320), 1.0x0.8037x0.8037 mm, patch 96x160x160, pooling from nnU-Net's own
  topology function, as nnU-Net plans it for FLARE.

On the CPU a batch size whose memory, extrapolated from the smaller ones measured, would not
fit in the memory available is skipped and reported as such (the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from inference.atomic import write_text_atomically

REPO = Path(__file__).resolve().parents[1]
RESULTS_MD = REPO / "benchmarks" / "RESULTS.md"
BEGIN, END = "<!-- BEGIN training section -->", "<!-- END training section -->"
#: Share of the available memory a batch size may be predicted to use before it is skipped.
MEMORY_HEADROOM = 0.85
#: nnU-Net's iterations per epoch, to turn s/iteration into what a team plans with.
ITERATIONS_PER_EPOCH = 250


@dataclass(frozen=True)
class Preset:
    """A configuration to benchmark (sizes in (z, y, x))."""

    name: str
    configuration: str
    dataset_id: int
    features: tuple[int, ...]
    spacing_mm: tuple[float, float, float]
    patch: tuple[int, int, int]
    description: str


PRESETS = {
    "compact": Preset(
        "compact",
        "3d_compact",
        951,
        (32, 64, 128, 256),
        (3.0, 2.0, 2.0),
        (96, 128, 128),
        "compact: 4 stages 32-256, 3.0x2.0x2.0 mm, patch 96x128x128 (`plan --compact` defaults)",
    ),
    "default": Preset(
        "default",
        "3d_flare_default",
        952,
        (32, 64, 128, 256, 320, 320),
        (1.0, 0.8037, 0.8037),
        (96, 160, 160),
        "FLARE24 default 3d_fullres: 6 stages 32-320, 1.0x0.80x0.80 mm, patch 96x160x160",
    ),
}


@dataclass
class Measurement:
    """One batch size of one configuration.

    Attributes:
        status: ``ok``, ``skipped`` (predicted not to fit), ``out of memory`` or ``failed``.
        s_per_iteration: wall seconds per timed iteration (data wait included).
        data_wait_s_per_iteration: of which waiting for the augmentation pipeline.
        peak_rss_mb: peak RSS summed over the process tree (augmentation workers included).
        cuda_max_allocated_mb: ``torch.cuda.max_memory_allocated`` (GPU runs).
        gpu_peak_used_mb: NVML device-level used memory, peak (GPU runs; includes context).
        wall_s: the whole child process, start to end.
        note: why skipped or failed.
    """

    preset: str
    batch_size: int
    device: str
    status: str = "ok"
    s_per_iteration: float | None = None
    data_wait_s_per_iteration: float | None = None
    peak_rss_mb: float | None = None
    cuda_max_allocated_mb: float | None = None
    gpu_peak_used_mb: float | None = None
    wall_s: float | None = None
    note: str = ""


@dataclass
class Run:
    """The whole benchmark run (what the JSON holds)."""

    command: str
    started: str
    finished: str = ""
    load_average: dict[str, list[float]] = field(default_factory=dict)
    machine: dict = field(default_factory=dict)
    gpu: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    configurations: dict[str, dict] = field(default_factory=dict)
    measurements: list[Measurement] = field(default_factory=list)


# --------------------------------------------------------------------------- data


def prepare_dataset(work: Path, preset: Preset, patch: tuple[int, int, int], n_cases: int) -> str:
    """Synthetic cases at the preset's spacing -> converted, planned, preprocessed (cached).

    Returns:
        The dataset folder name.
    """
    from synthetic import generate_case, write_case
    from training.convert import convert_dataset
    from training.plan import CompactSpec, plan_dataset
    from training.workspace import Workspace, dataset_name, set_process_counts

    workspace = Workspace(work).activate()
    set_process_counts(2)
    name = dataset_name(preset.dataset_id, f"Bench{preset.name.capitalize()}")
    spec = CompactSpec(
        features=preset.features,
        patch_zyx=patch,
        spacing_zyx_mm=preset.spacing_mm,
        batch_size=2,
        name=preset.configuration,
    )
    stamp = work / f".{name}.json"
    wanted = {"patch": list(patch), "cases": n_cases, "preset": asdict(preset)}
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return name
    source = work / "source" / name
    shape = tuple(p + m for p, m in zip(patch, (8, 16, 16), strict=True))
    for i in range(n_cases):
        case = generate_case(
            1000 + i, shape, spacing_zyx_mm=preset.spacing_mm, kind="full", n_lesions=3,
            oblique=False,
        )  # fmt: skip
        write_case(case, f"Bench_{i:03d}", source / "imagesTr", source / "labelsTr")
    convert_dataset(
        workspace,
        source / "imagesTr",
        source / "labelsTr",
        preset.dataset_id,
        name.split("_", 1)[1],
        overwrite=True,
        progress=False,
    )
    plan_dataset(workspace, name, compact=spec, preprocess="compact", progress=False, clean=True)
    stamp.write_text(json.dumps(wanted))
    return name


# --------------------------------------------------------------------------- child


def worker(args: argparse.Namespace) -> int:
    """Child process: time ``--iterations`` training steps after ``--warmup`` (prints JSON)."""
    from training.workspace import Workspace, set_process_counts

    workspace = Workspace(args.work).activate()
    set_process_counts(1, args.da_workers)
    import torch

    from training.epochs import stop_dataloaders
    from training.train import build_trainer, configure_torch, prepare

    [settings] = prepare(
        workspace,
        args.dataset,
        args.configuration,
        batch_size=args.batch_size,
        epochs=1,
        iterations_per_epoch=args.warmup + args.iterations,
        val_iterations=1,
        device=args.device,
        threads=args.threads,
        progress=False,
    )
    configure_torch(settings, 0)
    trainer = build_trainer(settings)
    cuda = args.device == "cuda"
    result: dict = {}
    try:
        trainer.on_train_start()
        for _ in range(args.warmup):
            trainer.train_step(next(trainer.dataloader_train))
        if cuda:
            torch.cuda.synchronize()
        wait_s, start = 0.0, time.perf_counter()
        for _ in range(args.iterations):
            t = time.perf_counter()
            batch = next(trainer.dataloader_train)
            wait_s += time.perf_counter() - t
            trainer.train_step(batch)
        if cuda:
            torch.cuda.synchronize()
        total_s = time.perf_counter() - start
        result = {
            "s_per_iteration": total_s / args.iterations,
            "data_wait_s_per_iteration": wait_s / args.iterations,
        }
    except Exception as err:  # out of memory is a result, anything else a failure
        oom = isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()
        result = {"error": "out of memory" if oom else f"{type(err).__name__}: {err}"}
    finally:
        stop_dataloaders(trainer)
    if cuda:
        result["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(result), flush=True)
    return 0 if "error" not in result else 3


# --------------------------------------------------------------------------- parent


def predicted_peak_mb(done: list[Measurement], batch_size: int) -> float | None:
    """Peak RSS of ``batch_size`` extrapolated from the measured ones (None: no data).

    Linear in the batch size through the two largest measured points; with one point,
    proportional to the batch size (an overestimate: part of the memory does not grow).
    """
    points = sorted((m.batch_size, m.peak_rss_mb) for m in done if m.peak_rss_mb)
    if not points:
        return None
    if len(points) == 1:
        b, mb = points[0]
        return mb * batch_size / b
    (b1, m1), (b2, m2) = points[-2], points[-1]
    slope = (m2 - m1) / (b2 - b1) if b2 != b1 else m2 / b2
    return m2 + slope * (batch_size - b2)


def measure(
    work: Path,
    dataset: str,
    preset: Preset,
    batch_size: int,
    args: argparse.Namespace,
) -> Measurement:
    """Run one child under the sampler and collect its figures."""
    from profiling.sampler import Sampler
    from profiling.sources import NullSource, open_gpu_source

    command = [
        sys.executable, "-m", "benchmarks.training", "--worker", "--work", str(work),
        "-d", dataset, "-c", preset.configuration, "--batch-size", str(batch_size),
        "--iterations", str(args.iterations), "--warmup", str(args.warmup),
        "--device", args.device, "--threads", str(args.threads),
        "--da-workers", str(args.da_workers),
    ]  # fmt: skip
    gpu = open_gpu_source() if args.device == "cuda" else NullSource("CPU run")
    sampler = Sampler(gpu)
    start = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    sampler.start(process.pid)
    out, err = process.communicate()
    samples = sampler.stop()
    wall_s = time.perf_counter() - start
    m = Measurement(preset.name, batch_size, args.device, wall_s=round(wall_s, 1))
    m.peak_rss_mb = round(max(samples.rss_mb), 1) if samples.rss_mb else None
    used = [v for v in samples.gpu_used_mb if v is not None]
    m.gpu_peak_used_mb = round(max(used), 1) if used else None
    found = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    if not found:
        lines = [ln for ln in (err or out).strip().splitlines() if ln.strip()]
        m.status, m.note = "failed", (lines[-1] if lines else f"exit status {process.returncode}")
        return m
    result = json.loads(found[-1].removeprefix("RESULT "))
    if "error" in result:
        m.status = "out of memory" if result["error"] == "out of memory" else "failed"
        m.note = result["error"]
    m.s_per_iteration = result.get("s_per_iteration")
    m.data_wait_s_per_iteration = result.get("data_wait_s_per_iteration")
    m.cuda_max_allocated_mb = result.get("cuda_max_allocated_mb")
    return m


def _available_mb() -> float:
    import psutil

    return psutil.virtual_memory().available / 2**20


def run_preset(work: Path, preset: Preset, args: argparse.Namespace, run: Run) -> None:
    """Measure every batch size of one configuration (skipping what cannot fit on the CPU)."""
    patch = tuple(args.patch) if args.patch else preset.patch
    print(f"{preset.name}: preparing synthetic data (patch {patch})", flush=True)
    dataset = prepare_dataset(work, preset, patch, max(8, max(args.batch_sizes)))
    run.configurations[preset.name] = _describe(work, dataset, preset)
    done: list[Measurement] = []
    for batch_size in sorted(args.batch_sizes):
        predicted = predicted_peak_mb(done, batch_size) if args.device == "cpu" else None
        available = _available_mb()
        if predicted is not None and predicted > MEMORY_HEADROOM * available:
            m = Measurement(preset.name, batch_size, args.device, status="skipped")
            m.note = (
                f"predicted peak {predicted:.0f} MB > {MEMORY_HEADROOM:.0%} of the "
                f"{available:.0f} MB available"
            )
        else:
            m = measure(work, dataset, preset, batch_size, args)
        print(_line(m), flush=True)
        run.measurements.append(m)
        if m.status == "ok":
            done.append(m)


def _describe(work: Path, dataset: str, preset: Preset) -> dict:
    from training.plan import count_parameters, resolve_configuration
    from training.workspace import Workspace

    workspace = Workspace(work)
    plans = json.loads(workspace.plans_file(dataset).read_text())
    dataset_json = json.loads((workspace.preprocessed / dataset / "dataset.json").read_text())
    c = resolve_configuration(plans, preset.configuration)
    arch = c["architecture"]["arch_kwargs"]
    return {
        "description": preset.description,
        "patch": c["patch_size"],
        "spacing_mm": c["spacing"],
        "features_per_stage": arch["features_per_stage"],
        "strides": arch["strides"],
        "parameters": count_parameters(plans, dataset_json, preset.configuration),
    }


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _line(m: Measurement) -> str:
    if m.status != "ok":
        return f"  batch {m.batch_size}: {m.status} ({m.note})"
    return (
        f"  batch {m.batch_size}: {_fmt(m.s_per_iteration)} s/iteration "
        f"(data wait {_fmt(m.data_wait_s_per_iteration)}), peak RSS {_fmt(m.peak_rss_mb, 0)} MB"
        + (
            f", CUDA allocated {_fmt(m.cuda_max_allocated_mb, 0)} MB"
            if m.cuda_max_allocated_mb
            else ""
        )
    )


def _load_note(run: Run) -> str:
    start = run.load_average.get("start", [])[:1]
    end = run.load_average.get("end", [])[:1]
    cores = run.machine.get("cpu_cores_logical") or 1
    # The load at the end includes the benchmark's own training and augmentation workers
    # (up to a core each plus one): only more than that, or a busy start, means others ran.
    if (start and start[0] > cores - 0.5) or (end and end[0] > cores + 1):
        return (
            " (above the core count: other jobs shared the machine, so the times are "
            "inflated; compare batch sizes only within one quiet run)"
        )
    return ""


def section_markdown(run: Run) -> str:
    """The training section of RESULTS.md for this run."""
    lines = [
        "## Training: time per iteration and peak memory by batch size",
        "",
        f"- Command: `{run.command}`",
        f"- Date: {run.started} to {run.finished} (UTC)",
        f"- Machine: {run.machine.get('cpu', '?')}, {run.machine.get('cpu_cores_logical', '?')} "
        f"logical cores, {run.machine.get('ram_mb', '?')} MB RAM; GPU: "
        + (run.gpu.get("name") or "none"),
        "- Load average (1, 5, 15 min) at start "
        + ", ".join(f"{v:.1f}" for v in run.load_average.get("start", []))
        + ", at end "
        + ", ".join(f"{v:.1f}" for v in run.load_average.get("end", []))
        + _load_note(run),
        f"- Per batch size: {run.settings['warmup']} warm-up + {run.settings['iterations']} "
        f"timed iterations of nnU-Net's `train_step` (SGD, Dice+CE, deep supervision) on "
        f"batches from its augmentation pipeline ({run.settings['da_workers']} worker "
        f"process(es)), torch threads {run.settings['threads']}; one process per batch size",
    ]
    override = run.settings.get("patch_override")
    if override:
        lines.append(
            f"- **Patch overridden** (`--patch {' '.join(map(str, override))}`): "
            "a quick check of the machinery, not the configuration as planned; run without "
            "`--patch` for the figures to plan with"
        )
    lines.append("")
    for name, c in run.configurations.items():
        lines.append(
            f"- `{name}`: {c['description']}; as measured: patch {'x'.join(map(str, c['patch']))}, "
            f"{c['parameters'] / 1e6:.1f} M parameters"
        )
    lines += [
        "",
        "| configuration | device | batch | s / iteration | of which data wait (s) | samples / s "
        "| s per 250-iteration epoch | peak RSS, process tree (MB) | CUDA allocated (MB) "
        "| GPU device used (MB) | status |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for m in run.measurements:
        per_s = m.batch_size / m.s_per_iteration if m.s_per_iteration else None
        epoch = m.s_per_iteration * ITERATIONS_PER_EPOCH if m.s_per_iteration else None
        status = m.status if not m.note else f"{m.status}: {m.note}"
        lines.append(
            f"| {m.preset} | {m.device} | {m.batch_size} | {_fmt(m.s_per_iteration)} | "
            f"{_fmt(m.data_wait_s_per_iteration)} | {_fmt(per_s)} | {_fmt(epoch, 0)} | "
            f"{_fmt(m.peak_rss_mb, 0)} | {_fmt(m.cuda_max_allocated_mb, 0)} | "
            f"{_fmt(m.gpu_peak_used_mb, 0)} | {status} |"
        )
    return "\n".join(lines) + "\n"


def load_run(path: Path) -> Run:
    """A run back from its ``training_benchmark.json``."""
    record = json.loads(path.read_text())
    record["measurements"] = [Measurement(**m) for m in record["measurements"]]
    return Run(**record)


def update_results(path: Path, section: str) -> Path:
    """Replace the training section of RESULTS.md (appended when missing), keeping the rest."""
    text = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmark results\n"
    block = f"{BEGIN}\n{section.rstrip()}\n{END}"
    if BEGIN in text and END in text:
        pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.DOTALL)
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    write_text_atomically(path, text)
    return path


def build_parser() -> argparse.ArgumentParser:
    """The argument parser."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.training",
        description=(
            "Seconds per training iteration and peak memory (process tree RSS with the "
            "augmentation workers; CUDA allocated and NVML device memory on a GPU) for "
            "several batch sizes of the compact configuration (and, on a GPU, the FLARE "
            "default one), with nnU-Net's own trainer on synthetic data."
        ),
        epilog=(
            "CPU (default): python -m benchmarks.training\n"
            "GPU:           python -m benchmarks.training --device cuda "
            "--configurations compact default"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=REPO / "bench_out" / "training", help="work dir")
    p.add_argument(
        "--configurations",
        nargs="+",
        choices=sorted(PRESETS),
        help="what to measure (default: compact on the CPU, compact and default on CUDA)",
    )
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[2, 4, 8], metavar="N")
    p.add_argument("--iterations", type=int, default=2, help="timed iterations (default 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations first (default 1)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    p.add_argument(
        "--da-workers", type=int, default=1, help="augmentation worker processes (default 1)"
    )
    p.add_argument(
        "--patch",
        type=int,
        nargs=3,
        metavar=("Z", "Y", "X"),
        help="override the patch (a quick check; the table then says so)",
    )
    p.add_argument(
        "--results",
        type=Path,
        default=RESULTS_MD,
        help="RESULTS.md to update (default benchmarks/RESULTS.md)",
    )
    p.add_argument("--no-results", action="store_true", help="do not touch RESULTS.md")
    # the child's options
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    p.add_argument("-d", "--dataset", help=argparse.SUPPRESS)
    p.add_argument("-c", "--configuration", help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or, with ``--worker``, one measurement); returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.worker:
        return worker(args)
    if min(args.batch_sizes) < 1 or args.iterations < 1 or args.warmup < 0:
        print("error: batch sizes and --iterations must be at least 1", file=sys.stderr)
        return 2
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    names = args.configurations or (
        ["compact", "default"] if args.device == "cuda" else ["compact"]
    )
    from profiling.sources import NullSource, machine_info, open_gpu_source

    gpu = open_gpu_source() if args.device == "cuda" else NullSource("CPU run")
    run = Run(
        command="python -m benchmarks.training "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        started=datetime.now(UTC).isoformat(timespec="seconds"),
        load_average={"start": list(os.getloadavg())},
        machine=machine_info(),
        gpu=gpu.describe(),
        settings={
            "iterations": args.iterations,
            "warmup": args.warmup,
            "threads": args.threads,
            "da_workers": args.da_workers,
            "patch_override": args.patch,
        },
    )
    args.out.mkdir(parents=True, exist_ok=True)
    for name in names:
        run_preset(args.out / "work", PRESETS[name], args, run)
    run.finished = datetime.now(UTC).isoformat(timespec="seconds")
    run.load_average["end"] = list(os.getloadavg())
    (args.out / "training_benchmark.json").write_text(json.dumps(asdict(run), indent=2) + "\n")
    section = section_markdown(run)
    (args.out / "RESULTS.md").write_text(section)
    if not args.no_results:
        update_results(args.results, section)
    print(section)
    failed = [m for m in run.measurements if m.status == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
