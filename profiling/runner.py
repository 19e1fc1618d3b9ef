"""Run one case as the organizers do and collect its figures.

One case = a fresh staged input folder with only that case, a fresh output folder, the
command as a child process (locally with ``INPUT_DIR`` / ``OUTPUT_DIR`` set, or the
organizers' ``docker container run`` line), the sampler thread watching it, the wall time
of the whole command, and a check that ``<case>.nii.gz`` came out with the input's geometry.

The command runs in a session of its own. When it exits, times out or is interrupted,
whatever it started is killed, so that nothing outlives its case
(:func:`end_case_processes`): its process group, every process the sampler met in its
tree (also one that moved to a session of its own since, ``setsid ... &``), and every
process that carries the case's mark in its environment (a daemon that left the tree
before a sample saw it).
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import psutil

from inference.cases import Case
from inference.nifti import Geometry, NiftiError, read_geometry
from profiling.docker import (
    ContainerMemory,
    docker_argv,
    kill_container,
    predictor_time_s,
)
from profiling.metrics import CaseMetrics, case_metrics, with_predictor_time
from profiling.sampler import Sampler, Samples, measure_idle_mb
from profiling.sources import GpuSource
from profiling.staging import StagedCase, stage_case

#: The repository root: the default command ``sh predict.sh`` runs from here.
REPO_ROOT = Path(__file__).resolve().parents[1]
#: What runs when no command is given.
DEFAULT_COMMAND = ("sh", "predict.sh")
#: Set for the command to a value of its own per case, and inherited by everything it
#: starts: what finds the case's processes that left its tree (see end_case_processes).
CASE_MARK_ENV = "PROFILING_CASE_MARK"


@dataclass(frozen=True)
class RunSpec:
    """How every case is run.

    Attributes:
        command: the local command (argv), used when ``docker_image`` is None.
        cwd: working folder of the local command.
        docker_image: run the organizers' Docker line with this image instead.
        container_name: ``--name`` of the container.
        gpu_index: NVML index of the measured GPU; also the device given to the container.
        timeout_s: stop a case after this long (None: wait for ever; the CLI's default is
            600 s).
        gpus: give the container ``--gpus`` (False on a host without a GPU, where the daemon
            refuses the option).
        docker_options: extra ``docker container run`` options (e.g. ``--network none``).
    """

    command: tuple[str, ...] = DEFAULT_COMMAND
    cwd: Path = REPO_ROOT
    docker_image: str | None = None
    container_name: str = "profiling"
    gpu_index: int = 0
    timeout_s: float | None = None
    gpus: bool = True
    docker_options: tuple[str, ...] = ()

    @property
    def docker(self) -> bool:
        """True in Docker mode."""
        return self.docker_image is not None

    def argv(self, staged: StagedCase) -> list[str]:
        """The argv for one staged case."""
        if self.docker_image is not None:
            return docker_argv(
                self.docker_image,
                staged.input_dir,
                staged.output_dir,
                self.container_name,
                self.gpu_index if self.gpus else None,
                # The client writes the container's id here: the sampler finds its cgroup.
                [*self.docker_options, "--cidfile", str(self.cidfile(staged))],
            )
        return list(self.command)

    @staticmethod
    def cidfile(staged: StagedCase) -> Path:
        """Where ``docker run --cidfile`` writes the container id (fresh for every case)."""
        return staged.root / "container.id"

    def env(self, staged: StagedCase, gpu_available: bool) -> dict[str, str]:
        """The child's environment: ours plus ``INPUT_DIR`` / ``OUTPUT_DIR`` and a new mark."""
        env = dict(os.environ)
        env["INPUT_DIR"] = str(staged.input_dir)
        env["OUTPUT_DIR"] = str(staged.output_dir)
        env[CASE_MARK_ENV] = uuid.uuid4().hex
        if gpu_available and not self.docker and "CUDA_VISIBLE_DEVICES" not in env:
            # The container sees only the measured device; do the same locally, in NVML's
            # (PCI bus) numbering so that the GPU we watch is the GPU the command uses.
            env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
            env["CUDA_VISIBLE_DEVICES"] = str(self.gpu_index)
        return env


@dataclass
class CaseResult:
    """Everything measured for one case.

    Attributes:
        case: the case name.
        image_size_xyz: the input's size from its header; None if unreadable.
        argv: what was run.
        exit_code: the command's exit status (negative: killed by that signal); None if the
            command never started.
        metrics: the figures; None if the command never started.
        samples: raw samples; None if the command never started.
        output_ok: ``<case>.nii.gz`` exists and has the input's geometry.
        error: one line saying what went wrong, None when nothing did.
        staging: how the input was staged (clone or copy).
        log_path: the command's stdout and stderr.
        prediction_path: where the prediction was kept, if there was one.
        extra_outputs: other files the command left in the output folder.
    """

    case: str
    image_size_xyz: tuple[int, ...] | None
    argv: list[str]
    exit_code: int | None = None
    metrics: CaseMetrics | None = None
    samples: Samples | None = None
    output_ok: bool = False
    error: str | None = None
    staging: str | None = None
    log_path: Path | None = None
    prediction_path: Path | None = None
    extra_outputs: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        """True when the command failed or its output is missing or wrong."""
        return self.error is not None


@dataclass(frozen=True)
class ProfileOptions:
    """Sampling settings shared by all cases.

    Attributes:
        interval_s: sampling interval (the organizers: 0.1 s).
        subtract_idle: measure the idle device memory before each case and subtract it.
        idle_s: how long to measure the idle baseline.
    """

    interval_s: float = 0.1
    subtract_idle: bool = False
    idle_s: float = 1.0


def run_case(
    case: Case,
    spec: RunSpec,
    gpu: GpuSource,
    report_dir: Path,
    work_dir: Path,
    options: ProfileOptions = ProfileOptions(),
) -> CaseResult:
    """Run the command on one case and measure it.

    A failing command, a timeout or a missing or wrong output is recorded in the result;
    only an interrupt (Ctrl-C) propagates, after the child's process group is killed.

    Args:
        case: the case.
        spec: how to run it.
        gpu: the GPU source (shared by all cases).
        report_dir: receives ``logs/<case>.log`` and ``predictions/<case>.nii.gz``.
        work_dir: the case's staging folder is made here (and removed after the case).
        options: sampling settings.
    """
    try:
        geometry = read_geometry(case.image_path)
    except NiftiError as err:
        return CaseResult(case.name, None, [], error=f"input unreadable: {err}")
    # A prediction left from an earlier run into this report must not pass for this one's.
    (report_dir / "predictions" / f"{case.name}.nii.gz").unlink(missing_ok=True)
    gpu_available = bool(gpu.describe().get("available"))
    idle_mb = None
    if options.subtract_idle and gpu_available:
        idle_mb = measure_idle_mb(gpu, options.idle_s, options.interval_s)
    try:
        staged = stage_case(case, work_dir, for_docker=spec.docker)
    except OSError as err:  # the work folder filled up or went away mid-run
        why = f"cannot stage the case in {work_dir}: {err.strerror or err}"
        return CaseResult(case.name, geometry.size_xyz, [], error=why)
    argv = spec.argv(staged)
    result = CaseResult(case.name, geometry.size_xyz, argv, staging=staged.method)
    log_path = report_dir / "logs" / f"{case.name}.log"
    result.log_path = log_path
    try:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "wb") as log:
            env = spec.env(staged, gpu_available)
            container = ContainerMemory(spec.cidfile(staged)) if spec.docker else None
            _execute(result, spec, gpu, argv, env, log, options, idle_mb, container)
        if result.exit_code is None:
            return result
        if result.metrics is not None:
            log_text = log_path.read_text(encoding="utf-8", errors="replace")
            result.metrics = with_predictor_time(result.metrics, predictor_time_s(log_text))
        expected = case.output_path(staged.output_dir)
        output_error = _check_output(expected, geometry)
        result.output_ok = output_error is None
        result.extra_outputs = sorted(
            p.name for p in staged.output_dir.iterdir() if p.name != expected.name
        )
        if expected.is_file():
            result.prediction_path = _keep(expected, report_dir / "predictions")
        problems = []
        if result.error:
            problems.append(result.error)
        if result.exit_code != 0 and not result.error:
            problems.append(f"exit code {result.exit_code}{_last_line(log_path)}")
        if output_error:
            problems.append(output_error)
        result.error = "; ".join(problems) or None
        return result
    finally:
        staged.cleanup()


def _execute(
    result: CaseResult,
    spec: RunSpec,
    gpu: GpuSource,
    argv: list[str],
    env: dict[str, str],
    log: BinaryIO,
    options: ProfileOptions,
    idle_mb: float | None,
    container: ContainerMemory | None = None,
) -> None:
    """Launch, sample, wait; fill exit code, samples, metrics (and error on timeout)."""
    sampler = Sampler(
        gpu, options.interval_s, attribute_gpu_processes=not spec.docker, container=container
    )
    cwd = None if spec.docker else spec.cwd
    t0 = time.perf_counter()
    try:
        # Own session: on a timeout or Ctrl-C the whole tree can be killed at once.
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError as err:
        result.error = f"cannot start {argv[0]}: {err.strerror or err}"
        return
    sampler.start(proc.pid)
    exited = False
    try:
        exited = wait_for_exit(proc.pid, spec.timeout_s)
        time_s = time.perf_counter() - t0
    finally:
        # After an exit, a timeout or Ctrl-C alike. The root is not reaped before this, so
        # its pid, which is its group's id too, cannot have been reused.
        samples = sampler.stop()
        end_case_processes(proc.pid, sampler.processes_seen(), env.get(CASE_MARK_ENV))
        if spec.docker and not exited:
            kill_container(spec.container_name)
        result.exit_code = proc.wait()
    if not exited:
        result.error = f"timed out after {spec.timeout_s:g} s and was killed"
    result.samples = samples
    result.metrics = case_metrics(time_s, samples, idle_mb)


def end_case_processes(
    root_pid: int, seen: Iterable[psutil.Process], mark: str | None, rounds: int = 3
) -> None:
    """Kill (SIGKILL) everything a case started; the caller reaps the root afterwards.

    Three nets, each catching what the others miss:

    - the root's process group: what stayed in it, found at once;
    - every process the sampler met in the tree: also one that left the group
      (``setsid``) and was reparented since its parent exited;
    - every process whose environment holds ``CASE_MARK_ENV=mark``: also a daemon
      that left the tree between two samples (a double fork takes milliseconds).

    What is not caught: a process that left the tree before a sample saw it *and* does not
    carry the mark (it was started with a new environment, ``env -i`` or ``execve``), and a
    process of another user whose environment cannot be read (set-uid). In Docker mode the
    container's processes are not ours: they end with the container (``--rm``), which is
    killed on a timeout or an interrupt. Up to ``rounds`` scans for the mark catch a child
    forked while its parent was being killed.

    Args:
        root_pid: the command's pid, not yet reaped (so that its group id is still its own).
        seen: the processes met in its tree while it ran.
        mark: the value of ``CASE_MARK_ENV`` given to the command; None: no scan.
        rounds: at most this many scans for the mark.
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(root_pid, signal.SIGKILL)
    done: set[psutil.Process] = set()
    targets = list(seen)
    for _ in range(rounds):
        if mark is not None:
            targets += _marked_processes(mark)
        fresh = [p for p in targets if p not in done]
        if not fresh:
            return
        for proc in fresh:
            # psutil checks the creation time first: a reused pid is not signalled
            with contextlib.suppress(psutil.Error):
                proc.kill()
            done.add(proc)
        targets = []


def _marked_processes(mark: str) -> list[psutil.Process]:
    """The processes whose environment holds ``CASE_MARK_ENV=mark``."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(CASE_MARK_ENV) == mark:
                found.append(proc)
        except psutil.Error:  # gone, a zombie, or another user's
            continue
    return found


def wait_for_exit(pid: int, timeout_s: float | None) -> bool:
    """Wait until child ``pid`` has exited, without reaping it; False on a timeout.

    Not reaping keeps the pid, which is also the id of the child's process group, from
    being reused, so that the group can still be killed safely afterwards. A pidfd wakes
    up the moment the child exits (the measured time stays exact); where there is none,
    the child is polled every 5 ms.
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        fd = None
    if fd is not None:
        try:
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            while True:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                if poller.poll(None if left is None else left * 1000):
                    return True
                if deadline is not None and time.monotonic() >= deadline:
                    return False
        finally:
            os.close(fd)
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        if deadline is not None and time.monotonic() >= deadline:
            return False
        time.sleep(0.005)
    return True


def _check_output(path: Path, geometry: Geometry) -> str | None:
    """None if ``path`` is a readable image with ``geometry``, else the reason."""
    if not path.is_file():
        return f"no output {path.name}"
    try:
        found = read_geometry(path)
    except NiftiError as err:
        return f"output {path.name} unreadable: {err}"
    mismatch = geometry.mismatch(found)
    return f"output {path.name} geometry differs: {mismatch}" if mismatch else None


def _keep(path: Path, folder: Path) -> Path:
    """Move the prediction out of the staging folder into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / path.name
    shutil.move(path, target)
    return target


def _last_line(log_path: Path, limit: int = 200) -> str:
    """``": <last non-empty line of the log>"``, shortened, or ``""``."""
    try:
        with open(log_path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            tail = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    lines = [ln.strip() for ln in tail.splitlines() if ln.strip()]
    if not lines:
        return ""
    line = lines[-1]
    return ": " + (line if len(line) <= limit else line[: limit - 3] + "...")
