"""What a fold folder holds before a training touches it: nothing, a run, or a running one.

A ``train`` command decides from this what it may do with ``fold_X``: start (nothing
there), continue (``--continue``), set the old run aside and start over (``--restart``;
the old folder is renamed, never deleted), or refuse with one line. A fold that another
process is training is refused whatever the flags: two trainers writing the same
checkpoints would corrupt both runs.

"Running" is an advisory ``flock`` on ``fold_X/.training.lock``, held by the process that
trains the fold for as long as it lives (the kernel releases it when the process dies, so
a killed run never leaves a stale lock). Forked helper processes (nnU-Net's augmentation
workers) close their copy of the descriptor, so the lock dies with the trainer.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from training.checkpoints import FINAL, CheckpointInfo, read_recorded_plans, readable_checkpoints
from training.plan import describe_differences, network_parts
from training.workspace import WorkspaceError

LOCK_FILE = ".training.lock"
#: nnU-Net's validation output and ours (see training.validation).
VALIDATION_FOLDER = "validation"
NNUNET_VALIDATION_SUMMARY = "summary.json"
LESION_METRICS = "lesion_metrics.json"


@dataclass(frozen=True)
class FoldState:
    """The training found in one fold folder.

    Attributes:
        folder: ``.../TRAINER__PLANS__CONFIG/fold_X``.
        newest: the readable checkpoint with the most epochs, or None.
        broken: unreadable checkpoints as ``(path, reason)``.
        finished: ``checkpoint_final.pth`` is the newest checkpoint.
        validated: the final validation and its lesion metrics were written.
        running: ``"pid N on HOST"`` of the process training it now, or None.
    """

    folder: Path
    newest: CheckpointInfo | None
    broken: tuple[tuple[Path, str], ...]
    finished: bool
    validated: bool
    running: str | None

    @property
    def epochs_done(self) -> int:
        """Epochs in the newest readable checkpoint (0 without one)."""
        return self.newest.epochs_done if self.newest else 0

    @property
    def has_training(self) -> bool:
        """A checkpoint (readable or not) exists: starting afresh would overwrite a run."""
        return self.newest is not None or bool(self.broken)

    def describe(self) -> str:
        """A few words for messages: ``finished, 3 epochs`` or ``stopped after 2 epochs``."""
        if self.finished:
            return f"finished, {self.epochs_done} epochs"
        if self.newest is not None:
            return f"stopped after {self.epochs_done} epochs"
        path, reason = self.broken[0]
        return f"only unreadable checkpoints; {path.name}: {reason}"


def inspect_fold(folder: Path) -> FoldState:
    """Read a fold folder's state (checkpoints are opened memory-mapped, weights not read)."""
    good, broken = readable_checkpoints(folder)
    newest = max(good, key=lambda c: c.epochs_done) if good else None
    finished = newest is not None and newest.path.name == FINAL
    return FoldState(
        folder=folder,
        newest=newest,
        broken=tuple(broken),
        finished=finished,
        validated=finished and _validated_epochs(folder) == newest.epochs_done,
        running=lock_holder(folder),
    )


def _validated_epochs(folder: Path) -> int | None:
    # The validation counts only for the checkpoint it was run on: after a --continue
    # with more epochs it is stale.
    validation = folder / VALIDATION_FOLDER
    if not (validation / NNUNET_VALIDATION_SUMMARY).is_file():
        return None
    try:
        return int(json.loads((validation / LESION_METRICS).read_text())["epochs"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def plans_mismatch(checkpoint: Path, plans: dict, configuration: str) -> str | None:
    """How the plans a checkpoint was trained with differ from ``plans``, in a few words.

    Only what the network and its data depend on counts (``training.plan.network_parts``):
    another batch-size variant added to the plans since is no difference.

    Returns:
        None when they agree or the checkpoint records no plans (trained elsewhere).

    Raises:
        Exception: ``inference.model.ModelError`` (one line) for an unreadable checkpoint,
            or one whose pickle names anything but tensors, containers and numbers.
    """
    recorded = read_recorded_plans(checkpoint)
    if recorded is None:
        return None
    current = network_parts(plans, configuration)
    try:
        trained = network_parts(recorded, configuration)
    except (WorkspaceError, KeyError, TypeError):
        return f"its plans have no {configuration}"
    if trained == current:
        return None
    return describe_differences(trained, current) or "plans differ"


def other_plans_line(differing: dict[str, str], configuration: str, plans_label: str) -> str:
    """``folds 1, 2 of C were trained with other plans than LABEL (first difference)``.

    Args:
        differing: fold -> :func:`plans_mismatch`'s words, in the folds' order.
        configuration: the configuration the folds belong to.
        plans_label: the plans compared with, as the sentence names them.
    """
    several = len(differing) > 1
    return (
        f"fold{'s' if several else ''} {', '.join(differing)} of {configuration} "
        f"{'were' if several else 'was'} trained with other plans than {plans_label} "
        f"({next(iter(differing.values()))})"
    )


# --------------------------------------------------------------------------- lock

_held: dict[Path, int] = {}


def _close_in_child() -> None:
    # A forked child must not keep the trainer's lock alive after the trainer is gone.
    for fd in list(_held.values()):
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_close_in_child)


def lock_holder(folder: Path) -> str | None:
    """``"pid N on HOST"`` when another process holds the fold's lock, else None."""
    path = folder / LOCK_FILE
    if folder.resolve() in _held or not path.is_file():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            record = json.loads(Path(path).read_text() or "{}")
        except (OSError, ValueError):
            record = {}
        return f"pid {record.get('pid', '?')} on {record.get('host', '?')}"
    finally:
        os.close(fd)
    return None


class FoldBusyError(RuntimeError):
    """Another process trains this fold; the message is one line."""


def acquire_lock(folder: Path) -> None:
    """Hold the fold's lock until this process exits (or ``release_lock``).

    Raises:
        FoldBusyError: another process holds it.
    """
    folder = folder.resolve()
    if folder in _held:
        return
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise FoldBusyError(
            f"{folder} is being trained by {lock_holder(folder) or 'another process'}"
        ) from None
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.now().isoformat(timespec="seconds"),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    _held[folder] = fd


def release_lock(folder: Path) -> None:
    """Give the fold's lock back (a no-op when this process does not hold it)."""
    fd = _held.pop(folder.resolve(), None)
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def set_aside(folder: Path) -> Path:
    """Rename a fold folder to ``fold_X.replaced-YYYYmmdd-HHMMSS`` (nothing is deleted).

    Returns:
        The new name of the old folder.
    """
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    target = folder.with_name(f"{folder.name}.replaced-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = folder.with_name(f"{folder.name}.replaced-{stamp}-{n}")
    folder.rename(target)
    return target
