"""``make gpu-check``: one run that settles the GPU targets within a hard time budget.

Made for a GPU machine lent for minutes, without network: its Python 3.12 has torch with
CUDA and the scientific stack; what else is needed travels as wheels (``make gpu-wheels``,
``.whl/``) and is installed into a scratch folder first. Then, in this order, each stage
with its own time limit taken from what is left of the budget (default 480 s):

1. ``wheels``: install the carried wheels where a needed package is missing;
   ``preflight``: every program and module the run's processes will need, checked in a
   child process with their environment; a missing one stops the check within seconds
   (exit 2) instead of minutes later. nnU-Net's console script is found through its
   entry point, not ``PATH`` (benchmarks/gpu_site.py);
2. ``cases``: synthetic 512x512 CT cases (554 slices at 1.0 mm, 692 at 1.25 mm, 215 at
   2.5 mm by default), one process each, generated while the GPU stages run;
3. ``models``: the FLARE default network and the two-model ensemble, random weights;
4. ``context``: NVML total - free before CUDA, after CUDA starts, after the model loads
   and after the first float16 tile, next to ``mem_get_info`` (benchmarks/gpu_probe.py);
5. ``tile``: one tile's time and peak allocated / reserved memory with cudnn.benchmark
   and channels_last_3d on and off;
6. ``ours``: ``predict.sh`` with each model on each case, one process per case under the
   profiler (device-level memory from NVML every 0.1 s), the largest case first;
7. ``nnunet``: ``nnUNetv2_predict_from_modelfolder --disable_tta`` (the method paper's
   comparison) first, then the default (test-time mirroring), which gets what is left,
   with the FLARE network on the largest case. A run stopped at its time limit still
   counts: its time is a lower bound, so is the speed-up over it.

When too little time is left for a stage, it and the rest are skipped and the results say
so; nothing overruns the budget by more than a stage's own clean-up. The parent process
never touches CUDA, so every figure is of one process on an otherwise idle device.

Output (``--out``, at most 8 files): ``gpu_check.json`` (rewritten after every stage and
every profiled run, so a check killed at its command's limit still returns what finished),
``context.json`` and ``tile.json`` (each probe's figures, as soon as it has them),
``gpu_check.log``, and at the end ``RESULTS.md`` (benchmarks/RESULTS.md with its GPU
section rewritten), ``gpu_section.md`` and ``reports.tar.gz`` (the profiler reports and
logs, no predictions); seven files, leaving one for the console log. On a CUDA run
benchmarks/RESULTS.md itself is rewritten too.

Exit status: 0 when every stage ran and every run succeeded, 1 when some stage failed,
timed out or was skipped (results are written all the same), 2 when the check cannot start.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.gpu_cases import CaseSpec, image_path, start_generation, tiles_on_grid
from benchmarks.gpu_site import ensure_packages, provide_program
from inference.atomic import write_text_atomically

# Only the standard library and the two modules above (which use nothing else) up here:
# the packages the rest needs may first have to be installed from the carried wheels.

REPO = Path(__file__).resolve().parents[1]
BUDGET_S = 480.0
#: Kept back from every stage for writing the results.
RESERVE_S = 15.0
DEFAULT_CASES = ("554@1.0", "692@1.25", "215@2.5")
DEFAULT_MODELS = ("flare", "ensemble")
#: Modules whose absence means the carried wheels must be installed.
NEEDED_MODULES = ("SimpleITK", "dynamic_network_architectures", "psutil", "pynvml")
NNUNET_MODULE = "nnunetv2"
NNUNET_PREDICT = "nnUNetv2_predict_from_modelfolder"
#: What the check and its processes import, deeper than the top-level modules above: the
#: parent's later stages, the probes, predict.sh (``inference``) and the case generator.
CHECK_MODULES = (
    "benchmarks.suite",
    "benchmarks.analysis",
    "benchmarks.results",
    "benchmarks.models",
    "benchmarks.gpu_report",
    "benchmarks.gpu_probe",
    "inference.cli",
    "inference.device_memory",
    "inference.sliding_window",
    "synthetic.dataset",
    "scripts.random_model",
    "profiling.sources",
    "torch.utils.flop_counter",
)
#: What ``nnUNetv2_predict_from_modelfolder`` imports on its way (trainer included).
NNUNET_MODULES = (
    "nnunetv2.inference.predict_from_raw_data",
    "nnunetv2.training.nnUNetTrainer.nnUNetTrainer",
    "nnunetv2.imageio.reader_writer_registry",
    "nnunetv2.inference.export_prediction",
)
#: Programs the profiled commands start (benchmarks/peers.py: ``env ... sh predict.sh``).
PROGRAMS = ("sh", "env")
EXIT_OK, EXIT_INCOMPLETE, EXIT_USAGE = 0, 1, 2
IN_PLANE = 512
#: (wanted, minimum) seconds per stage; a stage gets min(wanted, what is left). nnU-Net
#: with TTA runs last and takes the rest: stopped, it is still a lower bound.
STAGE_TIME_S = {
    "wheels": (90.0, 20.0),
    "preflight": (60.0, 10.0),
    "context": (120.0, 30.0),
    "tile": (150.0, 30.0),
    "cases": (240.0, 10.0),
    "ours_run": (120.0, 30.0),
    "nnunet_notta": (300.0, 60.0),
    "nnunet_tta": (math.inf, 60.0),
}


# -- time -----------------------------------------------------------------------------------


@dataclass
class TimeBudget:
    """The check's hard limit, shared out stage by stage.

    Attributes:
        total_s: the whole check's budget.
        reserve_s: kept back from every stage for writing the results.
        clock: monotonic seconds (tests pass a fake).
    """

    total_s: float
    reserve_s: float = RESERVE_S
    clock: Callable[[], float] = time.monotonic
    start_s: float = field(init=False)

    def __post_init__(self) -> None:
        self.start_s = self.clock()

    def elapsed_s(self) -> float:
        """Seconds since the check started."""
        return self.clock() - self.start_s

    def remaining_s(self) -> float:
        """Seconds left before the budget is spent."""
        return self.total_s - self.elapsed_s()

    def allot(self, want_s: float, min_s: float) -> float | None:
        """A stage's time limit: ``want_s`` or what is left, None when under ``min_s``."""
        left = self.remaining_s() - self.reserve_s
        if left < min_s:
            return None
        return min(want_s, left)


@dataclass
class Stage:
    """What became of one stage.

    Attributes:
        name: the stage.
        status: ``done``, ``failed``, ``timed out`` or ``skipped``.
        seconds: how long it took.
        note: why, in one line, when not done.
    """

    name: str
    status: str
    seconds: float = 0.0
    note: str = ""


# -- the check --------------------------------------------------------------------------------


class Log:
    """Lines to stderr and to ``gpu_check.log``, each stamped with the check's clock."""

    def __init__(self, path: Path, budget: TimeBudget) -> None:
        self.path, self.budget = path, budget
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("", encoding="utf-8")

    def __call__(self, message: str) -> None:
        """Write one line."""
        line = f"[{self.budget.elapsed_s():6.1f} s] {message}"
        print(line, file=sys.stderr, flush=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(line + "\n")


@dataclass
class CheckState:
    """Everything the check found so far; written to gpu_check.json after every stage."""

    args: dict[str, Any]
    stages: list[Stage] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    suites: list[Any] = field(default_factory=list)


class GpuCheck:
    """The stages in order, sharing one time budget (see the module docstring)."""

    def __init__(self, args: argparse.Namespace, budget: TimeBudget) -> None:
        self.args = args
        self.budget = budget
        self.out: Path = args.out.resolve()
        self.work: Path = args.work.resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.log = Log(self.out / "gpu_check.log", budget)
        self.state = CheckState({k: str(v) for k, v in vars(args).items()})
        self.specs: list[CaseSpec] = []
        self.cases: list[Any] = []
        self.models: list[Any] = []
        self.gpu: Any = None

    # -- bookkeeping ----------------------------------------------------------------------
    def record(self, name: str, status: str, t0: float, note: str = "") -> Stage:
        """Record a stage's outcome and log it."""
        stage = Stage(name, status, round(time.perf_counter() - t0, 1), note)
        self.state.stages.append(stage)
        self.log(
            f"stage {name}: {status} in {stage.seconds:.1f} s" + (f" ({note})" if note else "")
        )
        self.write_json()
        return stage

    def json_data(self) -> dict[str, Any]:
        """gpu_check.json's content so far: every stage recorded, every figure measured."""
        data = self.state.data
        data["stages"] = [asdict(s) for s in self.state.stages]
        data["budget_s"] = self.budget.total_s
        data["elapsed_s"] = round(self.budget.elapsed_s(), 1)
        data["args"] = self.state.args
        data["runs"] = [run_record(r) for s in self.state.suites for r in s.runs]
        return data

    def write_json(self, final: bool = False) -> None:
        """Write gpu_check.json now: a kill at the command's limit leaves the last one whole."""
        data = self.json_data()
        data["partial"] = not final
        write_text_atomically(
            self.out / "gpu_check.json", json.dumps(data, indent=1, default=str) + "\n"
        )

    def allot(self, key: str, name: str | None = None) -> float | None:
        """The stage's time limit, or None (then the stage is recorded as skipped)."""
        want, least = STAGE_TIME_S[key]
        limit = self.budget.allot(want, least)
        if limit is None:
            left = self.budget.remaining_s()
            self.record(
                name or key,
                "skipped",
                time.perf_counter(),
                f"{left:.0f} s left of the budget, {least:.0f} s needed",
            )
        return limit

    # -- stages ---------------------------------------------------------------------------
    def wheels(self) -> bool:
        """Stage 1: the carried wheels, where something is missing."""
        t0 = time.perf_counter()
        limit = self.allot("wheels")
        if limit is None:
            return False
        modules = list(NEEDED_MODULES) + ([NNUNET_MODULE] if self.args.nnunet else [])
        try:
            info = ensure_packages(self.args.wheels, self.args.site, modules, limit)
        except RuntimeError as err:
            self.record("wheels", "failed", t0, str(err))
            return False
        self.state.data["wheels"] = info
        note = (
            f"installed {len(info['installed'])} wheels" if info["installed"] else "nothing missing"
        )
        self.record("wheels", "done", t0, note)
        return True

    def preflight(self) -> bool:
        """Stage 1b: every program and import the run will need, named when missing."""
        t0 = time.perf_counter()
        limit = self.allot("preflight")
        if limit is None:
            return False
        missing = [f"program {p}" for p in PROGRAMS if shutil.which(p) is None]
        programs = {}
        if self.args.nnunet:
            try:
                programs[NNUNET_PREDICT] = provide_program(NNUNET_PREDICT, self.work / "bin")
            except FileNotFoundError as err:
                missing.append(str(err))
        modules = list(CHECK_MODULES) + (list(NNUNET_MODULES) if self.args.nnunet else [])
        try:
            failed, versions = import_check(modules, limit)
        except RuntimeError as err:
            missing.append(str(err))
            failed, versions = {}, {}
        missing += [f"import {m}: {why}" for m, why in failed.items()]
        self.state.data["programs"] = programs
        self.state.data["versions"] = versions
        if missing:
            self.record("preflight", "failed", t0, "; ".join(missing))
            return False
        self.record("preflight", "done", t0, f"{len(modules)} imports, {len(programs)} programs")
        return True

    def start_cases(self) -> dict[str, subprocess.Popen]:
        """Stage 2 (started): one process per missing case, running while the GPU stages do."""
        self.specs = [CaseSpec.parse(c, self.args.in_plane) for c in self.args.cases]
        folder = self.work / "cases"
        folder.mkdir(parents=True, exist_ok=True)
        index = self._case_index()
        todo = [
            s
            for s in self.specs
            if index.get(s.name) != self._case_key(s) or not image_path(s, folder).is_file()
        ]
        self.log(f"cases: generating {len(todo)} of {len(self.specs)} in the background")
        return {
            s.name: start_generation(
                s, self.args.seed, folder, self.work / "logs" / f"case_{s.name}.log", REPO
            )
            for s in todo
        }

    def _case_key(self, spec: CaseSpec) -> list:
        return [self.args.seed, list(spec.spacing_zyx_mm), list(spec.shape_zyx)]

    def _case_index(self) -> dict[str, Any]:
        try:
            return json.loads((self.work / "cases" / "cases.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def finish_cases(self, running: dict[str, subprocess.Popen]) -> bool:
        """Stage 2 (finished): wait for the case processes within the budget; kill on overrun."""
        from benchmarks.cases import BenchCase

        t0 = time.perf_counter()
        folder = self.work / "cases"
        if running:
            limit = self.allot("cases")
            if limit is None:
                stop(running)
                return False
            index = self._case_index()
            failed = []
            try:
                for name, proc in running.items():
                    left = max(1.0, limit - (time.perf_counter() - t0))
                    if proc.wait(timeout=left) != 0:
                        failed.append(name)
                    else:
                        index[name] = self._case_key(next(s for s in self.specs if s.name == name))
            except subprocess.TimeoutExpired:
                stop(running)
                self.record("cases", "timed out", t0, f"generation ran past {limit:.0f} s")
                return False
            finally:
                (folder / "cases.json").write_text(json.dumps(index, indent=1) + "\n")
            if failed:
                log = self.work / "logs" / f"case_{failed[0]}.log"
                self.record("cases", "failed", t0, f"{', '.join(failed)}: {last_line(log)}")
                return False
        self.cases = [
            BenchCase(s.text, s.name, s.shape_zyx, s.spacing_zyx_mm, image_path(s, folder))
            for s in self.specs
        ]
        self.state.data["cases"] = [
            {
                "name": s.name,
                "shape_zyx": list(s.shape_zyx),
                "spacing_zyx_mm": list(s.spacing_zyx_mm),
            }
            for s in self.specs
        ]
        cached = len(self.specs) - len(running)
        self.record("cases", "done", t0, f"{len(running)} generated, {cached} cached")
        return True

    def write_models(self) -> bool:
        """Stage 3: the models (random weights), written into the work folder."""
        from benchmarks.models import ModelUnavailable, get_model

        t0 = time.perf_counter()
        try:
            self.models = [get_model(m, self.work / "models") for m in self.args.models]
            if self.models[0].n_networks != 1:
                raise ValueError(
                    f"the first model must be a single network, not {self.models[0].name}"
                )
        except (ModelUnavailable, ValueError, OSError) as err:
            self.models = []
            self.record("models", "failed", t0, str(err))
            return False
        self.record("models", "done", t0, ", ".join(m.name for m in self.models))
        return True

    def probe(self, kind: str) -> bool:
        """Stages 4 and 5: one probe in a fresh process, stopped at its time limit."""
        limit = self.allot(kind)
        if limit is None:
            return False
        t0 = time.perf_counter()
        if not self.models:
            self.record(kind, "failed", t0, "no model")
            return False
        first = self.models[0]
        folders = [first.folder]
        if kind == "context":
            folders += [m.folder for m in self.models[1:] if m.n_networks == 1]
            members = sorted(p.parent for p in self.models[-1].folder.glob("*/plans.json"))
            folders += members[1:2]
        argv = [sys.executable, "-m", "benchmarks.gpu_probe", kind, "--device", self.args.device]
        for folder in folders:
            argv += ["--model", str(folder)]
        result_path = self.work / f"{kind}.json"
        result_path.unlink(missing_ok=True)
        argv += ["--json", str(result_path), "--repeats", str(self.args.tile_repeats)]
        argv += ["--warmup", str(self.args.tile_warmup)]
        log_path = self.work / "logs" / f"probe_{kind}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("w", encoding="utf-8") as log_file:
            try:
                done = subprocess.run(
                    argv, cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT, timeout=limit
                )
            except subprocess.TimeoutExpired:
                self.record(kind, "timed out", t0, f"stopped after {limit:.0f} s")
                return False
        if done.returncode != 0 or not result_path.is_file():
            self.record(kind, "failed", t0, last_line(log_path))
            return False
        text = result_path.read_text(encoding="utf-8")
        write_text_atomically(self.out / result_path.name, text)  # back even if the check is killed
        self.state.data[kind] = json.loads(text)
        self.record(kind, "done", t0)
        return True

    def _suite(self, name: str, cases, models, peers, timeout_s: float, warm_up: bool):
        from benchmarks.suite import SuiteSettings, run_suite

        settings = SuiteSettings(
            device=self.args.device, timeout_s=timeout_s, plots=False, warm_up=warm_up
        )
        suite = run_suite(
            cases,
            models,
            peers,
            self.work / "runs" / name,
            settings,
            self.gpu,
            argv=[],
            progress=False,
        )
        self.state.suites.append(suite)
        self.write_json()
        for run in suite.runs:
            m = run.result.metrics
            figures = f"{m.time_s:.1f} s" if m else "not run"
            if m is not None and m.max_gpu_mb is not None:
                figures += f", GPU peak {m.max_gpu_mb:.0f} MB"
            status = "ok" if run.ok else f"FAILED: {run.result.error}"
            self.log(f"  {run.case} {run.model} {run.peer}: {figures}, {status}")
        return suite

    def ours(self) -> bool:
        """Stage 6: our predictor, every model on every case, the largest case first."""
        from benchmarks.peers import get_peers

        t0 = time.perf_counter()
        if not self.models or not self.cases:
            self.record("ours", "failed", t0, "no model or no case")
            return False
        peers = get_peers(["ours"])
        complete = True
        for i, case in enumerate(sorted(self.cases, key=lambda c: -c.n_voxels)):
            want, least = STAGE_TIME_S["ours_run"]
            per_run = self.budget.allot(want * len(self.models), least * len(self.models))
            if per_run is None:
                left = [c.name for c in sorted(self.cases, key=lambda c: -c.n_voxels)[i:]]
                self.record("ours", "skipped", t0, f"too little time left for {', '.join(left)}")
                return False
            suite = self._suite(
                f"ours_{case.name}",
                [case],
                self.models,
                peers,
                per_run / len(self.models),
                i == 0 and self.args.warm_up,
            )
            complete &= suite.n_failed == 0 and not suite.interrupted
        self.record(
            "ours", "done" if complete else "failed", t0, "" if complete else "some runs failed"
        )
        return complete

    def nnunet(self) -> bool:
        """Stage 7: nnU-Net --disable_tta, then the default with what is left; largest case.

        The paper's own comparison (no TTA) goes first: TTA takes several times as long
        and, run first, would take the time both need; stopped, it is still a lower bound.
        """
        from benchmarks.peers import NNUNET_NOTTA, NNUNET_TTA, get_peers

        t0 = time.perf_counter()
        try:
            provide_program(NNUNET_PREDICT, self.work / "bin")
            if not self.models or not self.cases:
                raise FileNotFoundError("no model or no case")
        except FileNotFoundError as err:
            self.record("nnunet_notta", "failed", t0, str(err))
            self.record("nnunet_tta", "failed", t0, str(err))
            return False
        largest = max(self.cases, key=lambda c: c.n_voxels)
        model = self.models[0]
        complete = True
        for key, peer in (("nnunet_notta", NNUNET_NOTTA), ("nnunet_tta", NNUNET_TTA)):
            limit = self.allot(key)
            if limit is None:
                complete = False
                continue
            t1 = time.perf_counter()
            suite = self._suite(
                f"{peer}_{largest.name}", [largest], [model], get_peers([peer]), limit, False
            )
            run = suite.runs[0] if suite.runs else None
            if run is not None and run.ok:
                self.record(key, "done", t1)
            elif run is not None and (run.result.error or "").startswith("timed out"):
                self.record(
                    key, "timed out", t1, f"stopped after {limit:.0f} s: its time is a lower bound"
                )
                complete = False
            else:
                self.record(key, "failed", t1, run.result.error if run else "no run")
                complete = False
        return complete

    # -- results --------------------------------------------------------------------------
    def write_results(self) -> None:
        """gpu_check.json, gpu_section.md, RESULTS.md and reports.tar.gz in ``--out``."""
        from benchmarks import gpu_report

        data = self.json_data()
        data["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        suite_md = None
        if self.state.suites:
            from benchmarks.analysis import analyse
            from benchmarks.results import section_markdown

            suite = merge_suites(self.state.suites, self.cases, self.models, data)
            analysis = analyse(suite)
            data["checks"] = [asdict(c) for c in analysis.checks] + gpu_report.lower_bounds(suite)
            suite_md = section_markdown(suite, analysis, self.work)
        self.add_case_facts(data)
        section = gpu_report.gpu_section(data, suite_md)
        (self.out / "gpu_section.md").write_text(section, encoding="utf-8")
        self.write_json(final=True)
        self.write_results_files(section)
        self.pack_reports()

    def add_case_facts(self, data: dict[str, Any]) -> None:
        """Each case's shape at the first model's spacing and its tiles on nnU-Net's grid."""
        if not self.models or "cases" not in data:
            return
        try:
            from inference.model import load_model

            model = load_model(self.models[0].folder)
        except Exception:  # facts for the report only
            return
        for case in data["cases"]:
            spec = CaseSpec(
                case["shape_zyx"][0],
                case["spacing_zyx_mm"][0],
                case["shape_zyx"][1],
                case["spacing_zyx_mm"][1],
            )
            shape = spec.target_shape(model.preprocessing.spacing_mm)
            case["target_shape_zyx"] = list(shape)
            case["tiles"] = tiles_on_grid(shape, model.patch_size)

    def write_results_files(self, section: str) -> None:
        """RESULTS.md in ``--out`` (and the repository's on a CUDA run) with this GPU section."""
        from benchmarks.results import RESULTS_MD, update_results_file

        copy = self.out / "RESULTS.md"
        if RESULTS_MD.is_file():
            shutil.copyfile(RESULTS_MD, copy)
        update_results_file(copy, "gpu", section)
        if self.args.results is not None:
            update_results_file(self.args.results, "gpu", section)

    def pack_reports(self) -> None:
        """The profiler reports and logs, without predictions, as one archive."""
        with tarfile.open(self.out / "reports.tar.gz", "w:gz") as tar:
            for path in sorted(self.work.rglob("*")):
                rel = path.relative_to(self.work)
                if (
                    path.is_file()
                    and rel.parts[0] in ("runs", "logs")
                    and "predictions" not in rel.parts
                ):
                    tar.add(path, arcname=str(rel))


def import_check(modules: Sequence[str], timeout_s: float) -> tuple[dict[str, str], dict[str, str]]:
    """Import ``modules`` in a child process, as the check's own children will.

    A child, run as they are (this Python, the repository as working folder, this
    environment), sees what they will see; the parent stays free of them.

    Returns:
        The modules that failed, each with its one-line error, and the version of every
        distribution the imports loaded (which the results then name).

    Raises:
        RuntimeError: the child crashed or ran past ``timeout_s`` (one line).
    """
    code = (
        "import importlib, importlib.metadata as md, json, sys\n"
        "failed = {}\n"
        "for m in sys.argv[1:]:\n"
        "    try:\n"
        "        importlib.import_module(m)\n"
        "    except Exception as err:\n"
        "        failed[m] = f'{type(err).__name__}: {err}'\n"
        "tops = {n.split('.')[0] for n in sys.modules} - set(sys.stdlib_module_names)\n"
        "dists = md.packages_distributions()\n"
        "names = {d for t in tops for d in dists.get(t, [])}\n"
        "versions = {d: md.version(d) for d in sorted(names)}\n"
        "print(json.dumps({'failed': failed, 'versions': versions}))\n"
    )
    argv = [sys.executable, "-c", code, *modules]
    try:
        done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"the import check ran past {timeout_s:.0f} s") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise RuntimeError(f"the import check failed: {last}")
    found = json.loads(done.stdout.strip().splitlines()[-1])
    return found["failed"], found["versions"]


def stop(running: dict[str, subprocess.Popen]) -> None:
    """Kill the case processes still running."""
    for proc in running.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def last_line(path: Path) -> str:
    """The last line of a log, for a one-line reason."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    except OSError:
        return "no log"
    return lines[-1] if lines else "no output"


def run_record(run) -> dict[str, Any]:
    """One profiled process, flat, for gpu_check.json."""
    m = run.result.metrics
    return {
        "model": run.model,
        "peer": run.peer,
        "case": run.case,
        "ok": run.ok,
        "error": run.result.error,
        "time_s": None if m is None else m.time_s,
        "max_gpu_mb": None if m is None else m.max_gpu_mb,
        "total_gpu_mb_s": None if m is None else m.total_gpu_mb_s,
        "max_rss_mb": None if m is None else m.max_rss_mb,
    }


def merge_suites(suites: Sequence[Any], cases, models, data: dict[str, Any]):
    """One SuiteResult of several runs of the suite (each wrote its own reports)."""
    from benchmarks.suite import SuiteResult

    peers = list({p.name: p for s in suites for p in s.peers}.values())
    context = dict(suites[0].context)
    context["started"] = data.get("started", context.get("started"))
    context["finished"] = data.get("finished")
    context["command_line"] = data.get("command_line", "")
    return SuiteResult(
        runs=[r for s in suites for r in s.runs],
        cases=list(cases),
        models=list(models),
        peers=peers,
        settings=suites[0].settings,
        context=context,
        out_dir=suites[0].out_dir.parent,
        skipped=[],
        interrupted=any(s.interrupted for s in suites),
    )


# -- command line -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used for --help)."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_check",
        description=(
            "The one GPU run that fills the GPU section of benchmarks/RESULTS.md: driver and "
            "context memory, one tile, the FLARE default network and a two-model ensemble on "
            "synthetic 512x512 cases, and nnUNetv2_predict on the largest, within a hard time "
            "budget. `--device cpu` runs every stage on the CPU (for tests)."
        ),
        epilog="See benchmarks/README.md (GPU check) for the wheels and the device call.",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path(os.environ.get("OUT") or REPO / "bench_out" / "gpu_check"),
        help="results, at most 8 files (default: $OUT, else bench_out/gpu_check)",
    )
    p.add_argument(
        "--work",
        type=Path,
        default=REPO / "bench_out" / "gpu_check_work",
        help="cases, models, raw reports",
    )
    p.add_argument("--wheels", type=Path, default=REPO / ".whl", help="carried wheels (.whl)")
    p.add_argument(
        "--site",
        type=Path,
        default=Path("/tmp/site"),
        help="where the wheels are installed when a module is missing (the device call's "
        "own pip --target folder, /tmp/site)",
    )
    p.add_argument(
        "--budget-s", type=float, default=BUDGET_S, help="hard limit of the whole check (480)"
    )
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="default: cuda")
    p.add_argument(
        "--models",
        nargs="+",
        default=list(DEFAULT_MODELS),
        help="first: single model for the probes and nnU-Net (default: flare ensemble)",
    )
    p.add_argument(
        "--cases",
        nargs="+",
        default=list(DEFAULT_CASES),
        metavar="SLICES@MM",
        help="synthetic cases (default: 554@1.0 692@1.25 215@2.5)",
    )
    p.add_argument(
        "--in-plane", type=int, default=IN_PLANE, help="rows and columns of the cases (512)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic cases")
    p.add_argument("--tile-repeats", type=int, default=10, help="timed tiles per setting")
    p.add_argument("--tile-warmup", type=int, default=3, help="untimed tiles per setting")
    p.add_argument(
        "--no-nnunet", dest="nnunet", action="store_false", help="skip the nnU-Net stage"
    )
    p.add_argument(
        "--no-warm-up",
        dest="warm_up",
        action="store_false",
        help="skip the profiler's unmeasured warm-up before the first run",
    )
    p.add_argument(
        "--results",
        type=Path,
        default=None,
        help="also rewrite this RESULTS.md's GPU section (default on CUDA: benchmarks/RESULTS.md)",
    )
    p.add_argument(
        "--no-results-file", action="store_true", help="leave benchmarks/RESULTS.md alone"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the check; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    budget = TimeBudget(args.budget_s)
    try:
        for c in args.cases:
            CaseSpec.parse(c, args.in_plane)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    if args.results is None and args.device == "cuda" and not args.no_results_file:
        args.results = REPO / "benchmarks" / "RESULTS.md"
    if args.no_results_file:
        args.results = None
    check = GpuCheck(args, budget)
    check.state.data["command_line"] = shlex.join(["python", "-m", "benchmarks.gpu_check", *argv])
    check.state.data["started"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    check.log(f"GPU check, budget {args.budget_s:.0f} s, device {args.device}, out {check.out}")
    if not check.wheels() or not check.preflight():
        check.log("error: the check cannot start: what it needs is missing (see above)")
        check.state.data["exit_status"] = EXIT_USAGE
        check.write_json(final=True)
        return EXIT_USAGE
    return run_stages(check)


def run_stages(check: GpuCheck) -> int:
    """Stages 2-7 and the results; the exit status."""
    from profiling.sources import machine_info, open_gpu_source

    args = check.args
    check.gpu = open_gpu_source(0)
    info = check.gpu.describe()
    check.state.data["gpu"] = info
    check.state.data["machine"] = machine_info()
    if args.device == "cuda" and not info.get("available"):
        check.log(f"error: --device cuda but no GPU through NVML ({info.get('reason')})")
        check.gpu.close()
        return EXIT_USAGE
    running = check.start_cases()
    try:
        if check.write_models():
            check.probe("context")
            check.probe("tile")
        cases_ok = check.finish_cases(running)
        if cases_ok and check.models:
            check.ours()
            if args.nnunet:
                check.nnunet()
    finally:
        stop(running)
        check.gpu.close()
        # in the JSON too: behind `| tee` the shell reports tee's status, not the check's
        status = check.state.data["exit_status"] = exit_status(check)
        check.write_results()
    files = ", ".join(sorted(p.name for p in check.out.iterdir()))
    check.log(f"results in {check.out}: {files}")
    return status


def exit_status(check: GpuCheck) -> int:
    """0 when every stage ran and succeeded; 1 otherwise (the log says which did not)."""
    expected = ["wheels", "preflight", "cases", "models", "context", "tile", "ours"]
    if check.args.nnunet:
        expected += ["nnunet_notta", "nnunet_tta"]
    recorded = {s.name for s in check.state.stages}
    for name in expected:
        if name not in recorded:
            check.log(f"stage {name}: not run (an earlier stage failed or the budget ran out)")
    done = all(s.status == "done" for s in check.state.stages)
    return EXIT_OK if done and recorded >= set(expected) else EXIT_INCOMPLETE


if __name__ == "__main__":
    sys.exit(main())
