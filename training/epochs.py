"""The epoch loop: nnU-Net's hooks in nnU-Net's order, with stop points between iterations.

The loop calls the trainer's hooks as ``nnUNetTrainer.run_training`` does (nnunetv2 2.8.1).
Owning it gives a progress bar per epoch, a clear message when the first batch does not fit
in GPU memory, and a place to stop on SIGTERM/SIGINT between two iterations (see
``training.interrupt``): there the weights are consistent, a resumable checkpoint is written
and the augmentation workers are shut down before the exception leaves.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from pathlib import Path

from training.checkpoints import LATEST
from training.interrupt import StopRequest, TrainingInterrupted
from training.workspace import TrainingError


class OutOfMemory(TrainingError):
    """A batch did not fit in device memory; the message is one line for the user."""


def _is_oom(err: BaseException) -> bool:
    import torch

    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def stop_dataloaders(trainer) -> None:
    """End nnU-Net's augmentation worker processes (train and validation), if any run."""
    for loader in (trainer.dataloader_train, trainer.dataloader_val):
        finish = getattr(loader, "_finish", None)
        if finish is not None:
            with contextlib.suppress(Exception):
                finish()


def _trim_log(trainer, epochs_done: int) -> None:
    # The interrupted epoch's first entries (learning rate, start time) are dropped so that
    # the resumed run logs that epoch once, as nnU-Net's logger expects.
    for values in trainer.logger.local_logger.my_fantastic_logging.values():
        if isinstance(values, list):
            del values[epochs_done:]


def save_resumable(trainer) -> tuple[Path, int]:
    """Write ``checkpoint_latest.pth`` with the weights as they are now.

    The epoch counter records the completed epochs only, so ``--continue`` runs the
    interrupted epoch again in full, starting from these (newer) weights: nothing trained
    is lost, at the price of a few extra iterations.

    Returns:
        The checkpoint path and the epochs it records.
    """
    done = int(trainer.current_epoch)
    _trim_log(trainer, done)
    path = Path(trainer.output_folder) / LATEST
    trainer.current_epoch = done - 1  # nnU-Net's save_checkpoint records current_epoch + 1
    try:
        trainer.save_checkpoint(str(path))
    finally:
        trainer.current_epoch = done
    return path, done


def _agreed(trainer, requested: bool) -> bool:
    """In DDP every rank must stop at the same iteration, or the others hang in a collective."""
    if not trainer.is_ddp:
        return requested
    import torch
    import torch.distributed as dist

    flag = torch.tensor([1 if requested else 0], device=trainer.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _stop_if_requested(trainer, stop: StopRequest) -> None:
    if not _agreed(trainer, stop.requested):
        return
    path, done = save_resumable(trainer)
    raise TrainingInterrupted(stop.signum or signal.SIGTERM, path, done)


def _next_batch(loader, trainer, stop: StopRequest):
    try:
        return next(loader)
    except Exception:
        # A signal sent to the whole process group also ends the augmentation workers; the
        # loader then fails, but the weights are intact and still worth a checkpoint.
        if stop.requested:
            _stop_if_requested(trainer, stop)
        raise


def _oom_error(trainer, first: bool) -> OutOfMemory:
    import torch

    cm = trainer.configuration_manager
    total_gib = (
        torch.cuda.get_device_properties(trainer.device).total_memory / 2**30
        if trainer.device.type == "cuda"
        else float("nan")
    )
    when = "at the first iteration" if first else "during training"
    return OutOfMemory(
        f"out of memory {when}: batch size {trainer.batch_size} per GPU with patch "
        f"{tuple(cm.patch_size)} does not fit on {trainer.device} ({total_gib:.1f} GiB); use "
        f"a smaller --batch-size or more --num-gpus"
    )


def _train_epoch(trainer, stop: StopRequest, epoch: int, show: bool) -> None:
    from tqdm import tqdm

    trainer.on_train_epoch_start()
    outputs = []
    bar = tqdm(
        range(trainer.num_iterations_per_epoch),
        desc=f"epoch {epoch + 1}/{trainer.num_epochs}",
        unit="it",
        leave=False,
        disable=not show,
        file=sys.stdout,
    )
    for _ in bar:
        batch = _next_batch(trainer.dataloader_train, trainer, stop)
        try:
            outputs.append(trainer.train_step(batch))
        except Exception as err:
            if _is_oom(err):
                raise _oom_error(trainer, first=not outputs and epoch == 0) from err
            raise
        bar.set_postfix(loss=f"{float(outputs[-1]['loss']):.4f}")
        _stop_if_requested(trainer, stop)
    bar.close()
    trainer.on_train_epoch_end(outputs)


def _validate_epoch(trainer, stop: StopRequest) -> None:
    import torch

    with torch.no_grad():
        trainer.on_validation_epoch_start()
        outputs = []
        for _ in range(trainer.num_val_iterations_per_epoch):
            outputs.append(
                trainer.validation_step(_next_batch(trainer.dataloader_val, trainer, stop))
            )
            _stop_if_requested(trainer, stop)
        trainer.on_validation_epoch_end(outputs)


def run_epochs(trainer, stop: StopRequest | None = None, progress: bool = True) -> None:
    """Run the remaining epochs; on a stop request save a checkpoint and raise.

    Args:
        trainer: an nnU-Net trainer (initialised or not; loaded from a checkpoint or not).
        stop: the signal flag to check between iterations (None: never stops early).
        progress: show a progress bar per epoch (rank 0 only).

    Raises:
        TrainingInterrupted: a signal arrived; ``checkpoint_latest.pth`` was written.
        OutOfMemory: a batch did not fit (with the batch size and patch in the message).
    """
    stop = stop or StopRequest()
    show = progress and trainer.local_rank == 0
    try:
        trainer.on_train_start()
        _stop_if_requested(trainer, stop)
        for epoch in range(trainer.current_epoch, trainer.num_epochs):
            trainer.on_epoch_start()
            _train_epoch(trainer, stop, epoch, show)
            _validate_epoch(trainer, stop)
            trainer.on_epoch_end()
            _stop_if_requested(trainer, stop)
    except BaseException:
        stop_dataloaders(trainer)
        raise
    trainer.on_train_end()
