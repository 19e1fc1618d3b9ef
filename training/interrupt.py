"""SIGTERM / SIGINT during training: stop between two iterations, never in the middle of one.

A cluster scheduler sends SIGTERM some seconds before it kills a job; Ctrl-C sends SIGINT.
Python's default for SIGTERM ends the process on the spot (no clean-up, so nnU-Net's
augmentation workers outlive it), and a ``KeyboardInterrupt`` raised in the middle of an
optimizer step could leave half the weights updated. So while the epoch loop runs, a signal
only sets a flag (``StopRequest.deferring``); the loop checks it between iterations, writes
a resumable checkpoint and raises :class:`TrainingInterrupted`. Outside the loop (the final
validation, which can be rerun) and on a second signal, the handler raises at once.

A signal recorded in a deferred block and not acted on inside it (one that arrives while
the final checkpoint is written, after the last stop point) is raised when the block ends:
it is never swallowed, so neither the next fold nor the validation starts after it.

The other commands (``plan``, ``export``) use the same handlers without deferral: the
exception unwinds through nnU-Net's ``with Pool(...)`` (which terminates its workers) and
through our clean-up, where Python's default for SIGTERM would end the process on the spot.

Processes forked while the handlers are installed (the augmentation workers) get the
default handlers back, so that a signal sent to the whole process group ends them as it
would without us.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager

HANDLED = (signal.SIGTERM, signal.SIGINT)


class TrainingInterrupted(Exception):
    """Training stopped on a signal (after writing a checkpoint where one was due).

    Attributes:
        signum: the signal received.
        checkpoint: the checkpoint to continue from (None when there is none).
        epochs_done: epochs recorded in that checkpoint.
        kept: without a checkpoint, a few words on what the command leaves behind (None:
            not known where the exception was raised; a caller that knows adds it).
        finished: the command's work was complete when the (deferred) signal was acted
            on: there is nothing to run again.
    """

    def __init__(
        self,
        signum: int,
        checkpoint=None,
        epochs_done: int = 0,
        kept: str | None = None,
        finished: bool = False,
    ) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.checkpoint = checkpoint
        self.epochs_done = epochs_done
        self.kept = kept
        self.finished = finished

    @property
    def signal_name(self) -> str:
        """``SIGTERM`` or ``SIGINT``."""
        return signal.Signals(self.signum).name

    @property
    def exit_status(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + its number."""
        return 128 + self.signum


_active: StopRequest | None = None


def _restore_defaults_in_child() -> None:
    if _active is not None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)


os.register_at_fork(after_in_child=_restore_defaults_in_child)


class StopRequest:
    """Catches SIGTERM/SIGINT for the duration of a ``with`` block (main thread only).

    Attributes:
        signum: the first signal received, or None.
        deferring: inside ``deferred()``: a first signal only sets ``signum``.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.deferring = False
        self._previous: dict[int, object] = {}
        self._outer: StopRequest | None = None

    @property
    def requested(self) -> bool:
        """A signal has been received."""
        return self.signum is not None

    def _handle(self, signum: int, frame) -> None:
        first = self.signum is None
        if first:
            self.signum = signum
        if not (first and self.deferring):
            raise TrainingInterrupted(self.signum)

    def __enter__(self) -> StopRequest:
        global _active
        for signum in HANDLED:
            self._previous[signum] = signal.signal(signum, self._handle)
        self._outer, _active = _active, self
        return self

    def __exit__(self, *exc) -> None:
        global _active
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        _active, self._outer = self._outer, None

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """Within this block a first signal is only recorded (checked by the loop).

        Raises:
            TrainingInterrupted: on leaving the block normally when a signal was recorded
                in it: the block had no later stop point to act on it, and the caller must
                not go on as if none had come.
        """
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False
        if self.requested:
            raise TrainingInterrupted(self.signum)


@contextmanager
def stop_request() -> Iterator[StopRequest]:
    """Install the handlers in the main thread; elsewhere a no-op request (never set)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield StopRequest()
        return
    with StopRequest() as request:
        yield request
