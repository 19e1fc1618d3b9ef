"""Run the matrix: every case x model x peer, each as a whole process under the profiler.

Runs are interleaved per case (case -> repeat -> model -> peer), so that a slow spell of a
shared machine hits every peer of a case alike instead of one peer's whole column, and the
peer order rotates between repeats. Each (model, peer, repeat) keeps a full profiler report
(results.csv, results.json with raw samples, summary.md, plots, logs/<case>.log,
predictions/<case>.nii.gz) under ``OUT/reports/<model>/<peer>/run<k>/``.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import platform
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from benchmarks.cases import BenchCase
from benchmarks.models import BenchModel
from benchmarks.peers import REPO, Peer
from profiling.plots import write_plots
from profiling.report import write_csv, write_json, write_summary
from profiling.runner import CaseResult, ProfileOptions, RunSpec, run_case
from profiling.sources import GpuSource, machine_info, open_gpu_source

#: Packages whose versions go into the results.
VERSIONED = ("torch", "nnunetv2", "dynamic_network_architectures", "SimpleITK", "numpy")


@dataclass(frozen=True)
class SuiteSettings:
    """How every run is made.

    Attributes:
        device: ``cpu`` or ``cuda``, given to every peer.
        repeat: runs of each (case, model, peer).
        interval_s: the profiler's sampling interval.
        timeout_s: kill a run after this long (None: no limit).
        plots: write the profiler's PNG plots into each report.
        warm_up: run one unmeasured import of torch and nnU-Net first and read the models
            and cases once, so the first measured peer does not pay for a cold disk cache.
    """

    device: str = "cpu"
    repeat: int = 1
    interval_s: float = 0.1
    timeout_s: float | None = None
    plots: bool = True
    warm_up: bool = True


@dataclass
class Run:
    """One measured process.

    Attributes:
        model: model name.
        peer: peer name.
        case: case name.
        repeat: 1-based repeat number.
        report_dir: the profiler report this run belongs to.
        result: what the profiler measured.
    """

    model: str
    peer: str
    case: str
    repeat: int
    report_dir: Path
    result: CaseResult

    @property
    def ok(self) -> bool:
        """The command succeeded and wrote an output with the input's geometry."""
        return not self.result.failed and self.result.metrics is not None

    @property
    def log_path(self) -> Path | None:
        """The run's stdout+stderr as the profiler kept it."""
        return self.result.log_path


@dataclass
class SuiteResult:
    """Everything a suite run produced.

    Attributes:
        runs: the measured processes in run order.
        cases: the cases.
        models: the models.
        peers: the peers.
        settings: the settings.
        context: machine, GPU, versions, start and end time, the command line.
        out_dir: the output folder.
        skipped: notes on what was asked for but not run (one line each).
        interrupted: the suite was stopped (Ctrl-C, SIGTERM) before every run was made.
        plan: case names per model, for models that run only some of the cases.
        peers_by_case: peer names per case, for cases that only some peers run.
    """

    runs: list[Run]
    cases: list[BenchCase]
    models: list[BenchModel]
    peers: list[Peer]
    settings: SuiteSettings
    context: dict[str, object]
    out_dir: Path
    skipped: list[str] = field(default_factory=list)
    interrupted: bool = False
    plan: dict[str, tuple[str, ...]] = field(default_factory=dict)
    peers_by_case: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def cases_of(self, model: str) -> list[BenchCase]:
        """The cases planned for ``model`` (all cases when the plan does not name it)."""
        names = self.plan.get(model)
        return [c for c in self.cases if names is None or c.name in names]

    @property
    def n_failed(self) -> int:
        """Runs that failed."""
        return sum(not r.ok for r in self.runs)


def versions() -> dict[str, str]:
    """Python and package versions (read from metadata: nothing heavy is imported)."""
    found = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def suite_context(gpu: GpuSource, argv: Sequence[str] | None = None) -> dict[str, object]:
    """Machine, GPU and versions for the results, with the command line that ran the suite."""
    return {
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "gpu": gpu.describe(),
        "versions": versions(),
        "command_line": shlex.join(
            ["python", "-m", "benchmarks", *(sys.argv[1:] if argv is None else argv)]
        ),
    }


def _report_context(
    base: dict[str, object], cases_dir: Path, argv: list[str], settings: SuiteSettings
) -> dict[str, object]:
    """The context a profiler report expects (as ``python -m profiling`` writes it)."""
    return {
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": base["machine"],
        "gpu": base["gpu"],
        "settings": {
            "cases_dir": str(cases_dir),
            "command": argv,
            "command_line": shlex.join(argv),
            "cwd": str(REPO),
            "docker_image": None,
            "container_name": None,
            "interval_s": settings.interval_s,
            "gpu_index": 0,
            "subtract_idle": False,
            "idle_s": None,
            "timeout_s": settings.timeout_s,
        },
    }


def warm_up(models: Sequence[BenchModel], cases: Sequence[BenchCase]) -> None:
    """Fill the page cache: import torch and nnU-Net's predictor once, read every file once.

    Every peer then starts from the same warm cache; the organizers' container starts from
    whatever its host has cached, which is not ours to model.
    """
    subprocess.run(
        [sys.executable, "-c", "import torch, SimpleITK, nnunetv2.inference.predict_from_raw_data"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
    )
    paths = [c.image_path for c in cases]
    for m in models:
        paths += sorted(m.folder.rglob("*.pth")) + sorted(m.nnunet_folder.rglob("*.pth"))
    for path in dict.fromkeys(paths):
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass


def schedule(
    cases: Sequence[BenchCase],
    models: Sequence[BenchModel],
    peers: Sequence[Peer],
    repeat: int,
    plan: dict[str, Sequence[str]] | None = None,
    peers_by_case: dict[str, Sequence[str]] | None = None,
) -> list[tuple[BenchCase, int, BenchModel, Peer]]:
    """The run order: case -> repeat -> model -> peer, the peers rotated by one per repeat.

    Args:
        cases: the cases.
        models: the models.
        peers: the peers.
        repeat: runs per (case, model, peer).
        plan: case names per model name for models that run only some cases.
        peers_by_case: peer names per case name for cases that only some peers run.

    Returns:
        ``(case, repeat number from 1, model, peer)`` in run order.
    """
    order = []
    for case in cases:
        allowed = (peers_by_case or {}).get(case.name)
        case_peers = [p for p in peers if allowed is None or p.name in allowed]
        for k in range(1, repeat + 1):
            shift = (k - 1) % max(1, len(case_peers))
            rotated = [*case_peers[shift:], *case_peers[:shift]]
            for model in models:
                if plan and model.name in plan and case.name not in plan[model.name]:
                    continue
                order += [(case, k, model, peer) for peer in rotated]
    return order


def _finish_report(runs: list[Run], context: dict[str, object], plots: bool) -> None:
    """Write a report's summary.md (and plots) once all its cases are in."""
    report_dir = runs[0].report_dir
    results = [r.result for r in runs]
    overview = write_plots(results, report_dir / "plots") if plots else []
    write_summary(results, report_dir / "summary.md", context, overview)


def run_suite(
    cases: Sequence[BenchCase],
    models: Sequence[BenchModel],
    peers: Sequence[Peer],
    out_dir: str | Path,
    settings: SuiteSettings = SuiteSettings(),
    gpu: GpuSource | None = None,
    argv: Sequence[str] | None = None,
    progress: bool = True,
    plan: dict[str, Sequence[str]] | None = None,
    peers_by_case: dict[str, Sequence[str]] | None = None,
) -> SuiteResult:
    """Profile every case x model x peer (x repeat) and keep the profiler's reports.

    A failing run is recorded, not raised: its report says why, the other runs go on. An
    interrupt (Ctrl-C; SIGTERM once :func:`interrupt_on_sigterm` is installed) kills the
    running command's process tree and returns what was measured so far.

    Args:
        cases: the cases (already generated).
        models: the models (already written).
        peers: the peers.
        out_dir: reports go to ``out_dir/reports/<model>/<peer>/run<k>/`` (``reports/`` is
            emptied first).
        settings: device, repeats, sampling, timeout.
        gpu: GPU source; None opens NVML (a null source without a GPU).
        argv: the suite's command-line arguments, for the results (default: sys.argv).
        progress: a tqdm bar over the runs.
        plan: case names (``FLARE24_0001``) per model name for models that should run only
            some of the cases; models not named run every case.
        peers_by_case: peer names per case name for cases that only some peers should run
            (the wide case skips nnU-Net's TTA run by default); cases not named run all.

    Returns:
        The runs with their measurements and the context.
    """
    out = Path(out_dir)
    own_gpu = gpu is None
    gpu = open_gpu_source(0) if gpu is None else gpu
    context = suite_context(gpu, argv)
    commands = {(m.name, p.name): p.command(m, settings.device) for m in models for p in peers}
    if settings.warm_up:
        warm_up(models, cases)
    planned = {m.name: tuple(plan[m.name]) for m in models if plan and m.name in plan}
    by_case = {c: tuple(p) for c, p in (peers_by_case or {}).items()}
    order = schedule(cases, models, peers, settings.repeat, planned, by_case)
    # The reports folder holds this run only: no log or prediction of an older run is left
    # to pass for one of this run's.
    shutil.rmtree(out / "reports", ignore_errors=True)
    reports: dict[tuple[str, str, int], list[Run]] = {}
    contexts: dict[tuple[str, str, int], dict[str, object]] = {}
    runs: list[Run] = []
    options = ProfileOptions(interval_s=settings.interval_s)
    cases_dir = cases[0].image_path.parent if cases else out
    interrupted = False
    try:
        bar = tqdm(order, unit="run", disable=not progress, dynamic_ncols=True, file=sys.stderr)
        for case, k, model, peer in bar:
            bar.set_postfix_str(f"{case.name} {model.name} {peer.name} #{k}")
            key = (model.name, peer.name, k)
            argv_run = commands[(model.name, peer.name)]
            report_dir = out / "reports" / model.name / peer.name / f"run{k}"
            if key not in contexts:
                report_dir.mkdir(parents=True)
                contexts[key] = _report_context(context, cases_dir, argv_run, settings)
            spec = RunSpec(command=tuple(argv_run), cwd=REPO, timeout_s=settings.timeout_s)
            result = run_case(case.as_case(), spec, gpu, report_dir, out / ".staging", options)
            run = Run(model.name, peer.name, case.name, k, report_dir, result)
            runs.append(run)
            reports.setdefault(key, []).append(run)
            # Rewritten after every run: an aborted suite keeps what it measured.
            done = [r.result for r in reports[key]]
            write_csv(done, report_dir / "results.csv")
            write_json(done, report_dir / "results.json", contexts[key])
            _report_line(run)
    except KeyboardInterrupt:
        # run_case has killed the command's process group before re-raising.
        interrupted = True
        print("error: interrupted; results cover the finished runs", file=sys.stderr)
    finally:
        if own_gpu:
            gpu.close()
        for key, group in reports.items():
            _finish_report(group, contexts[key], settings.plots)
    context["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    return SuiteResult(
        runs,
        list(cases),
        list(models),
        list(peers),
        settings,
        context,
        out,
        [],
        interrupted,
        planned,
        by_case,
    )


@contextmanager
def interrupt_on_sigterm() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C while the block runs (the old handler comes back after).

    A killed suite still stops its child processes; restoring matters where ``main`` is
    called in-process (tests): a handler left behind is inherited by every later fork.
    """

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _report_line(run: Run) -> None:
    m = run.result.metrics
    figures = f"{m.time_s:.1f} s, RSS {m.max_rss_mb:.0f} MB" if m else "not run"
    if m is not None and m.max_gpu_mb is not None:
        figures += f", GPU {m.max_gpu_mb:.0f} MB"
    status = "ok" if run.ok else f"FAILED: {run.result.error}"
    tqdm.write(
        f"{run.case} {run.model} {run.peer} #{run.repeat}: {figures}, {status}", file=sys.stderr
    )
