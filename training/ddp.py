"""More than one GPU: nnU-Net's DDP, one spawned process per GPU on this machine.

As nnU-Net's ``run_training`` does, the workers meet at ``localhost`` (an inherited
``MASTER_ADDR``, e.g. a cluster's head node, would make them wait for a peer that never
comes) on ``MASTER_PORT`` if set, else on a free port. The parent forwards SIGTERM/SIGINT
to the workers, which stop together at the next iteration (``training.epochs``) with a
checkpoint from rank 0, and turns any worker failure, including one killed by a signal,
into a one-line error.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
from collections.abc import Callable, Mapping

from training.interrupt import TrainingInterrupted, stop_request
from training.workspace import TrainingError

#: Seconds between checks of the workers (and of a pending signal) while they run.
POLL_S = 1.0


def free_port() -> int:
    """A TCP port free on this machine right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def ddp_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """``MASTER_ADDR``/``MASTER_PORT`` for workers on this machine (nnU-Net's choice)."""
    return {
        "MASTER_ADDR": "localhost",
        "MASTER_PORT": environ.get("MASTER_PORT") or str(free_port()),
    }


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else text


def _forward(context, signum: int) -> None:
    for process in context.processes:
        if process.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signum)


def spawn_workers(fn: Callable, args: tuple, nprocs: int) -> None:
    """Run ``fn(rank, *args)`` in ``nprocs`` spawned processes until all have ended.

    Raises:
        TrainingInterrupted: a signal arrived (forwarded to the workers, which stopped), or
            a worker ended with the status of an interrupted training.
        TrainingError: a worker raised or was ended otherwise (one line: which, and how).
    """
    import torch.multiprocessing as mp

    context = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    forwarded = None
    with stop_request() as stop:
        try:
            with stop.deferred():
                while not context.join(timeout=POLL_S):
                    if stop.requested and forwarded is None:
                        forwarded = stop.signum
                        _forward(context, forwarded)
        except mp.ProcessRaisedException as err:
            raise TrainingError(f"a DDP worker failed: {_last_line(str(err))}") from None
        except mp.ProcessExitedException as err:
            interrupted = {128 + signal.SIGTERM, 128 + signal.SIGINT}
            if stop.requested or err.exit_code in interrupted:
                raise TrainingInterrupted(stop.signum or err.exit_code - 128) from None
            how = (
                f"was killed by {err.signal_name}"
                if err.exit_code < 0
                else f"exited with status {err.exit_code}"
            )
            raise TrainingError(
                f"DDP worker {err.error_index} (pid {err.error_pid}) {how}"
            ) from None
        except TrainingInterrupted:
            # A second signal: pass it on, the workers then stop at once. (Or the first,
            # raised once every worker has ended: there is nobody left to pass it to.)
            _forward(context, signal.SIGTERM)
            raise


def _ddp_worker(rank: int, settings, world_size: int) -> None:
    import torch
    import torch.distributed as dist

    from training.train import run_worker

    dist.init_process_group("nccl", rank=rank, world_size=world_size)
    try:
        torch.cuda.set_device(torch.device("cuda", rank))
        summary = run_worker(settings, rank)
        if rank == 0:
            print(json.dumps(summary))
    except TrainingInterrupted as err:
        sys.exit(err.exit_status)
    finally:
        dist.destroy_process_group()


def run_ddp(settings) -> None:
    """Train one fold on ``settings.num_gpus`` GPUs with nnU-Net's DDP (rank 0 prints).

    Raises:
        TrainingInterrupted: after a signal (``train`` adds the fold's newest checkpoint).
        TrainingError: a worker failed.
    """
    os.environ.update(ddp_environment(os.environ))
    spawn_workers(_ddp_worker, (settings, settings.num_gpus), settings.num_gpus)
    return None
