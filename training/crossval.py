"""Several folds in one command: one after another, or one per GPU; resumable as a whole.

``train -f cv`` trains nnU-Net's folds 0-4 (any list of folds works, ``all`` included). A
fold that is finished and validated for the requested epochs is skipped, a stopped one is
continued, a missing one started, so running the same command again with ``--continue``
after an interruption picks up where it stopped. After the folds: the cross-validation
summary (lesion DSC/NSD over every case, each predicted by the fold that did not train on
it), written to ``TRAINER__PLANS__CONFIG/crossval_lesion_metrics.json``.

With several GPUs (and one GPU per fold) the folds run side by side, each in its own
``python -m training train`` process with ``CUDA_VISIBLE_DEVICES`` set to one GPU and its
output in ``TRAINER__PLANS__CONFIG/train_fold_X.log``; a signal to the parent is passed to
every running fold, which each write a checkpoint.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from inference.atomic import write_json_atomically
from training.fold_state import FoldState, inspect_fold
from training.interrupt import TrainingInterrupted, stop_request
from training.train import TrainSettings, fold_folder, train
from training.validation import PARTIAL_LABEL_NOTE, describe, read_lesion_metrics
from training.workspace import TrainingError

CROSSVAL_FILE = "crossval_lesion_metrics.json"
#: Seconds between polls of the fold processes.
POLL_S = 0.5


def is_done(settings: TrainSettings) -> bool:
    """Finished for the requested epochs (and validated, when validation is asked for)."""
    state = inspect_fold(fold_folder(settings))
    return (
        settings.resume
        and state.finished
        and state.epochs_done >= settings.epochs
        and (state.validated or not settings.validate)
    )


def default_parallel(device: str, num_gpus: int, n_folds: int) -> int:
    """One fold per visible GPU when there are several GPUs and several folds, else 1."""
    if device != "cuda" or num_gpus != 1 or n_folds < 2:
        return 1
    import torch

    return max(1, min(torch.cuda.device_count(), n_folds))


def visible_gpus() -> list[str]:
    """The GPU ids a child may be given (``CUDA_VISIBLE_DEVICES`` order, else 0..n-1)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed:
        return [g.strip() for g in listed.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def child_command(settings: TrainSettings) -> list[str]:
    """The ``python -m training train`` command that runs one fold of ``settings``."""
    s = settings
    argv = [
        sys.executable, "-m", "training", "train", "--work", s.work, "-d", s.dataset,
        "-c", s.configuration, "-f", s.fold, "--plans", s.plans, "--epochs", str(s.epochs),
        "--iterations-per-epoch", str(s.iterations_per_epoch),
        "--val-iterations", str(s.val_iterations), "--device", s.device,
        "--checkpoint-every", str(s.checkpoint_every), "--no-progress",
        "--num-processes", str(s.num_processes),
        "--validate" if s.validate else "--no-validate",
    ]  # fmt: skip
    if s.resume:
        argv.append("--continue")
    if s.restart:
        argv.append("--restart")
    for flag, value in (
        ("--seed", s.seed),
        ("--threads", s.threads),
        ("--oversample-foreground", s.oversample_foreground),
    ):
        if value is not None:
            argv += [flag, str(value)]
    return argv


@dataclass
class _Child:
    settings: TrainSettings
    process: subprocess.Popen
    log: Path
    gpu: str | None
    signalled: bool = False


def _last_error(log: Path) -> str:
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith(("error:", "interrupted"))]
    return (errors or lines or ["no output"])[-1]


def _start(settings: TrainSettings, gpu: str | None) -> _Child:
    log = fold_folder(settings).parent / f"train_fold_{settings.fold}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    with log.open("a") as out:
        process = subprocess.Popen(
            child_command(settings), stdout=out, stderr=subprocess.STDOUT, env=env
        )
    where = f" on GPU {gpu}" if gpu is not None else ""
    print(f"fold {settings.fold}: started{where} (pid {process.pid}, log {log})", flush=True)
    return _Child(settings, process, log, gpu)


def _finished(child: _Child, failures: list[str]) -> None:
    rc = child.process.returncode
    fold = child.settings.fold
    if rc == 0:
        record = read_lesion_metrics(fold_folder(child.settings))
        print(describe(record) if record else f"fold {fold}: done", flush=True)
    elif rc in (143, 130):
        # The fold's own last line says whether it had a checkpoint to stop with.
        print(f"fold {fold}: stopped ({_last_error(child.log)})", flush=True)
    else:
        failures.append(f"fold {fold}: {_last_error(child.log)} (log {child.log})")


def run_parallel(runs: list[TrainSettings], parallel: int) -> None:
    """Train the folds in up to ``parallel`` child processes (one GPU each on CUDA).

    Raises:
        TrainingInterrupted: a signal arrived; it was passed to every running fold.
        TrainingError: a fold failed (the others still ran to their end).
    """
    gpus: list[str | None]
    if runs and runs[0].device == "cuda":
        gpus = list(visible_gpus()[:parallel])
    else:
        gpus = [None] * parallel
    queue, running, failures = list(runs), [], []
    with stop_request() as stop:
        try:
            with stop.deferred():
                while queue or running:
                    if stop.requested:
                        queue.clear()
                        for child in running:
                            if not child.signalled:
                                child.process.send_signal(stop.signum)
                                child.signalled = True
                    busy = {c.gpu for c in running} if gpus[0] is not None else set()
                    while queue and len(running) < len(gpus):
                        gpu = next((g for g in gpus if g not in busy), None)
                        busy.add(gpu)
                        running.append(_start(queue.pop(0), gpu))
                    time.sleep(POLL_S)
                    for child in [c for c in running if c.process.poll() is not None]:
                        running.remove(child)
                        _finished(child, failures)
        except TrainingInterrupted:
            # A second signal, or the first once every fold has stopped.
            for child in running:
                child.process.terminate()
            raise
    if failures:
        raise TrainingError("; ".join(failures))


def run_folds(runs: list[TrainSettings], parallel: int = 1) -> list[TrainSettings]:
    """Train (or continue, or only validate) every fold not done yet.

    Returns:
        The folds that had work to do.

    Raises:
        TrainingInterrupted: a signal arrived; checkpoints were written.
        TrainingError: a fold could not be trained.
    """
    pending = []
    for settings in runs:
        if is_done(settings):
            state = inspect_fold(fold_folder(settings))
            validated = ", validated" if state.validated else ""
            print(f"fold {settings.fold}: {state.describe()}{validated}: nothing to do")
        else:
            pending.append(settings)
    if parallel > 1 and len(pending) > 1:
        if any(s.num_gpus > 1 for s in pending):
            raise TrainingError("folds in parallel take one GPU each (--num-gpus 1)")
        run_parallel(pending, parallel)
        return pending
    # Between two folds a signal ends the command at once: every fold is then either
    # finished or stopped with its checkpoint.
    with stop_request():
        for settings in pending:
            print(f"fold {settings.fold}:", flush=True)
            train(settings)
    return pending


def _fold_kept(fold: str, state: FoldState) -> str:
    if state.finished:
        return f"fold {fold} finished ({state.epochs_done} epochs)"
    if state.newest is not None:
        return f"fold {fold} stopped after {state.epochs_done} epochs"
    if state.broken:
        return f"fold {fold} has only unreadable checkpoints"
    return f"fold {fold} has no checkpoint"


def folds_kept(runs: list[TrainSettings]) -> str:
    """What an interrupted ``train`` leaves, read from the fold folders (for its last line).

    Read from the folders rather than remembered, so that it is true whatever the signal
    interrupted: a fold's set-up, its validation, the time between two folds.

    Returns:
        ``fold 0 finished (5 epochs), fold 1 has no checkpoint``; prefixed with
        ``no fold has finished:`` when none has.
    """
    states = [(s.fold, inspect_fold(fold_folder(s))) for s in runs]
    kept = ", ".join(_fold_kept(fold, state) for fold, state in states)
    if any(state.finished for _, state in states):
        return kept
    return f"no fold has finished: {kept}"


def crossval_summary(trainer_folder: Path, folds: list[str]) -> dict | None:
    """Pool the folds' validation cases into one summary (numbered folds only).

    Returns:
        The summary written to ``CROSSVAL_FILE``, or None when a fold has no validation.
    """
    numbered = [f for f in folds if f != "all"]
    records = {f: read_lesion_metrics(trainer_folder / f"fold_{f}") for f in numbered}
    if len(numbered) < 2 or any(r is None for r in records.values()):
        return None
    per_case = {}
    for fold, record in records.items():
        for case, scores in record["per_case"].items():
            per_case[case] = {"fold": fold, **scores}
    dsc = [v["dsc"] for v in per_case.values()]
    nsd = [v["nsd"] for v in per_case.values()]
    summary = {
        "folds": numbered,
        "cases": len(per_case),
        "lesion_dsc_mean": sum(dsc) / len(dsc) if dsc else None,
        "lesion_nsd_mean": sum(nsd) / len(nsd) if nsd else None,
        "nsd_tolerance_mm": next(iter(records.values()))["nsd_tolerance_mm"],
        "per_fold": {
            fold: {k: v for k, v in record.items() if k not in ("per_case", "notes")}
            for fold, record in records.items()
        },
        "notes": [PARTIAL_LABEL_NOTE],
        "per_case": per_case,
    }
    write_json_atomically(trainer_folder / CROSSVAL_FILE, summary)
    return summary


def _text(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def summary_lines(summary: dict) -> list[str]:
    """A small table: each fold's lesion DSC/NSD, nnU-Net Dice, pseudo Dice; then the pool."""
    tol = summary["nsd_tolerance_mm"]
    lines = [f"fold  cases  lesion DSC  NSD ({tol:g} mm)  nnU-Net Dice  EMA pseudo Dice"]
    for fold, r in summary["per_fold"].items():
        lines.append(
            f"{fold:>4}  {r['cases']:>5}  {_text(r['lesion_dsc_mean']):>10}  "
            f"{_text(r['lesion_nsd_mean']):>12}  {_text(r['nnunet_validation_dice']):>12}  "
            f"{_text(r['ema_pseudo_dice']):>15}"
        )
    lines.append(
        f"cross-validation ({', '.join(summary['folds'])}): {summary['cases']} cases, lesion "
        f"DSC {_text(summary['lesion_dsc_mean'])}, NSD {_text(summary['lesion_nsd_mean'])}; "
        f"{PARTIAL_LABEL_NOTE}"
    )
    return lines
