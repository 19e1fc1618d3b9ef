"""Resumable checkpoints: written atomically, found by epoch, checked before use.

nnU-Net's trainer writes ``checkpoint_latest.pth`` every ``save_every`` epochs (50 by
default), ``checkpoint_best.pth`` whenever the EMA pseudo Dice improves and
``checkpoint_final.pth`` at the end, each with a plain ``torch.save`` to the final name: a
crash or a kill in the middle of a save leaves a truncated file under a name ``--continue``
trusts. Here the trainer instance's ``save_checkpoint`` is wrapped (not subclassed: the
checkpoint records the class name and ``nnUNetPredictor`` looks the class up by it, so our
models stay loadable by stock nnU-Net) so that every checkpoint is written to a temporary
file in the same folder, flushed to disk and renamed over the old one
(:func:`inference.atomic.atomic_path`): the name always holds a complete checkpoint, old
or new. The cadence is nnU-Net's own ``save_every``, set per run (``train
--checkpoint-every``, default 1 epoch).

Resuming picks the checkpoint with the most epochs among final, latest and best that can
actually be opened, in nnU-Net's preference order on ties; a broken one (or one whose
pickle names anything but tensors, containers and numbers) is reported and skipped, never
loaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from inference.atomic import atomic_path

#: nnU-Net's checkpoint names, in its ``--continue`` preference order.
CHECKPOINT_NAMES = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")
FINAL, LATEST, BEST = CHECKPOINT_NAMES


@dataclass(frozen=True)
class CheckpointInfo:
    """One readable checkpoint.

    Attributes:
        path: the file.
        epochs_done: epochs completed when it was written (nnU-Net's ``current_epoch``).
    """

    path: Path
    epochs_done: int


def make_saves_atomic(trainer) -> None:
    """Make every ``trainer.save_checkpoint(filename)`` write through :func:`atomic_path`.

    nnU-Net's method still builds and writes the checkpoint; this wrapper only redirects
    it to the temporary file, which is flushed and renamed over ``filename`` when the save
    returns. Where nnU-Net writes nothing (ranks other than 0, checkpointing disabled) the
    temporary file stays empty and ``filename`` is left as it was.
    """
    save = trainer.save_checkpoint

    def save_atomically(filename: str) -> None:
        try:
            with atomic_path(filename) as temporary:
                save(str(temporary))
                if temporary.stat().st_size == 0:
                    raise _NothingSaved
        except _NothingSaved:
            pass

    trainer.save_checkpoint = save_atomically


class _NothingSaved(Exception):
    """nnU-Net's ``save_checkpoint`` returned without writing: nothing to publish."""


def read_epochs_done(path: Path) -> int:
    """The ``current_epoch`` recorded in a checkpoint (memory-mapped, weights not read).

    Loaded as the predictor loads a model (``weights_only``): a file planted in a fold
    folder is inspected before any command decides what to do with it, and unpickling
    it freely would run whatever it names even when the command is then refused.

    Raises:
        Exception: ``inference.model.ModelError`` (one line) for a truncated, foreign or
            code-running file, KeyError when the file is not an nnU-Net checkpoint.
    """
    from inference.model import load_checkpoint

    return int(load_checkpoint(path, mmap=True)["current_epoch"])


def not_a_regular_file(path: Path) -> str | None:
    """What ``path`` is when it exists but is no regular file to read, else None.

    A FIFO or a link to ``/dev/zero`` under a checkpoint's name would block or never end
    ``torch.load``; a folder is no checkpoint either. Links to regular files are fine.
    """
    if not path.exists():
        return "a broken link" if path.is_symlink() else None
    if path.is_file():
        return None
    if path.is_dir():
        kind = "a folder"
    elif path.is_fifo():
        kind = "a FIFO"
    elif path.is_char_device() or path.is_block_device():
        kind = "a device"
    elif path.is_socket():
        kind = "a socket"
    else:
        kind = "not a regular file"
    if path.is_symlink():
        kind += f" (a link to {os.readlink(path)})"
    return kind


def read_recorded_plans(path: Path) -> dict | None:
    """The plans a checkpoint's trainer was built with (``init_args``), or None.

    Memory-mapped: the weights are not read. Loaded as :func:`read_epochs_done` loads
    (``weights_only``), for the same reason: nothing a planted file names is run.

    Raises:
        Exception: ``inference.model.ModelError`` (one line) for a truncated, foreign or
            code-running file.
    """
    from inference.model import load_checkpoint

    checkpoint = load_checkpoint(path, mmap=True)
    init_args = checkpoint.get("init_args") if isinstance(checkpoint, dict) else None
    plans = init_args.get("plans") if isinstance(init_args, dict) else None
    return plans if isinstance(plans, dict) else None


def readable_checkpoints(folder: Path) -> tuple[list[CheckpointInfo], list[tuple[Path, str]]]:
    """The checkpoints of a fold folder that open, and the ones that do not (with why).

    Returns:
        ``(good, broken)``: good ones in nnU-Net's preference order (final, latest, best),
        broken ones as ``(path, one-line reason)``.
    """
    good, broken = [], []
    for name in CHECKPOINT_NAMES:
        path = folder / name
        kind = not_a_regular_file(path)
        if kind is not None:
            broken.append((path, f"not a regular file: {kind}"))
            continue
        if not path.is_file():
            continue
        try:
            good.append(CheckpointInfo(path, read_epochs_done(path)))
        except Exception as err:  # a truncated zip, a pickle error, a foreign file
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            broken.append((path, reason))
    return good, broken


def newest_checkpoint(folder: Path) -> CheckpointInfo | None:
    """The readable checkpoint with the most epochs (nnU-Net's order breaks ties), or None."""
    good, _ = readable_checkpoints(folder)
    if not good:
        return None
    # max() keeps the first of equal keys, and ``good`` is in nnU-Net's preference order.
    return max(good, key=lambda c: c.epochs_done)
