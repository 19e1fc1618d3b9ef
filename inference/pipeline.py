"""The read -> predict -> write pipeline over a list of cases, with its threads in one place.

:class:`CasePipeline` owns the reader thread (images are read and validated ahead of the
prediction, starting before torch is imported), the writer thread (a result is written
while the next case is predicted) and their clean-up. It reports one line per case on the
``inference`` logger: the summary of a written case, ``WARNING <case>: <note>`` for an
oddity and ``ERROR <case>: <reason>`` for a case that could not be predicted or written;
the other cases go on. This module imports torch only when predicting starts.

Stopping: :func:`stop_signals` turns SIGTERM and SIGINT into an :class:`Interrupted`
exception in the main thread (where Python runs signal handlers, between two steps of
the interpreter: a forward pass is finished first). :meth:`CasePipeline.run` then stops
predicting, cancels the reads not started yet and still writes the predictions already
made, so that what is complete is kept; a second signal ends the process at once.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from inference.cases import Case
from inference.messages import one_line, printable
from inference.nifti import Geometry, NiftiError, read_header, read_image
from inference.runtime import release_free_memory
from inference.validate import InputError

log = logging.getLogger("inference")

#: The signals that stop a run cleanly: ``docker stop`` / a scheduler (TERM), Ctrl-C (INT).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):
    """Raised in the main thread by a stop signal.

    A BaseException, like KeyboardInterrupt, so that no ``except Exception`` swallows it.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
        self.name = signal.Signals(signum).name


@contextmanager
def stop_signals() -> Iterator[None]:
    """Turn SIGTERM and SIGINT into :class:`Interrupted` while the block runs.

    The first signal raises; it also restores the default action, so that a second one
    ends the process at once. Outside the main thread (where handlers cannot be set)
    nothing changes. The previous handlers are restored on leaving.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def case_error(name: str, reason: str) -> None:
    """Report a case that is skipped: ``ERROR <case>: <reason>`` on stderr.

    One ``write`` call per line: the writer thread reports too, and lines must not mix.
    """
    sys.stderr.write(f"ERROR {printable(name)}: {printable(one_line(reason))}\n")
    sys.stderr.flush()


def failure_reason(err: BaseException, known: tuple[type[BaseException], ...]) -> str:
    """One line for a failed case; unexpected exceptions keep their type for debugging."""
    text = one_line(str(err))
    if isinstance(err, known):
        return text or type(err).__name__
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def read_case(case: Case) -> tuple[Any, Geometry, list[str], float]:
    """Read and validate one case (on the reader thread).

    Returns:
        ``(array, geometry, notes, seconds)``.
    """
    from inference.validate import check_header, check_image

    t = time.perf_counter()
    notes = check_header(read_header(case.image_path))
    array, geometry = read_image(case.image_path)
    array, more = check_image(array, geometry)
    return array, geometry, notes + more, time.perf_counter() - t


def write_case(path: Path, labels: Any, geometry: Geometry, level: int) -> float:
    """Write one label map (on the writer thread); returns the seconds it took."""
    from inference.nifti import write_image

    t = time.perf_counter()
    write_image(path, labels, geometry, compression_level=level)
    return time.perf_counter() - t


def rss_mb() -> float | None:
    """Resident memory of this process in MB (Linux), for the per-case log line."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def summary_line(
    index: int, n_cases: int, name: str, geometry: Geometry, read_s: float, result: Any
) -> str:
    """The per-case log line (without the write time, added once the file is written).

    Args:
        index: 1-based position of the case.
        n_cases: number of cases predicted in this run.
        name: the case name.
        geometry: the input's geometry.
        read_s: seconds spent reading and validating the input.
        result: the :class:`inference.predictor.Prediction`.
    """
    voxel_ml = math.prod(geometry.spacing_xyz_mm) / 1000.0
    lesion_ml = float(result.labels.astype(bool).sum()) * voxel_ml
    size = "x".join(str(s) for s in geometry.size_xyz)
    stages = " ".join(f"{k} {v:.2f}s" for k, v in result.timings_s.items())
    line = (
        f"[{index}/{n_cases}] {printable(name)} {size}: read {read_s:.2f}s {stages} "
        f"({result.n_tiles} tiles, {result.device}) | {result.tiles_summary()} | "
        f"foreground {lesion_ml:.1f} ml"
    )
    if result.device_peak is not None:
        line += f" | {result.device_peak.describe()}"
    return line


def model_notes(models: Sequence[Any], array: Any, geometry: Geometry) -> list[str]:
    """Notes on an image for each model: its size and, for CT models, its intensities.

    Size: too thin or smaller than a patch at the model's spacing. Intensities: no body
    above the threshold the air-skipping uses, or values far from the plans' foreground
    range (see :func:`inference.validate.check_intensity_for_model`).
    """
    from inference.air import BODY_THRESHOLD_HU, effective_threshold_hu
    from inference.validate import check_for_model, check_intensity_for_model

    notes: list[str] = []
    for model in models:
        prep = model.preprocessing
        found = check_for_model(
            array.shape,
            geometry.spacing_zyx_mm,
            prep.spacing_mm,
            prep.transpose_forward,
            model.patch_size,
        )
        if prep.normalization == "CTNormalization":
            window = (prep.intensity["percentile_00_5"], prep.intensity["percentile_99_5"])
            threshold = effective_threshold_hu(prep, BODY_THRESHOLD_HU)
            found += check_intensity_for_model(array, threshold, window)
        notes += [note for note in found if note not in notes]
    return notes


class CasePipeline:
    """Reads, predicts and writes cases in order, overlapping the three steps.

    Use as a context manager: leaving it stops the reader (pending reads are cancelled)
    and waits for the writer, so that every prediction handed to it is written or reported.
    Run it inside :func:`stop_signals` so that a stop signal ends it cleanly.

    Args:
        cases: the cases to predict, in order.
        output_dir: where ``<case>.nii.gz`` goes.
        compression_level: gzip level of the written masks.
        prefetch: how many images are read ahead of the prediction.
        write_backlog: how many masks the writer may hold (writing or queued) when the
            next one is ready; that one waits for a slot, so memory stays bounded when
            writing is slower than predicting (a slow disk, many small images). With 1,
            a case is predicted while the previous one is written.
    """

    def __init__(
        self,
        cases: Sequence[Case],
        output_dir: Path,
        compression_level: int,
        prefetch: int = 2,
        write_backlog: int = 1,
    ) -> None:
        self.cases = list(cases)
        self.output_dir = output_dir
        self.compression_level = compression_level
        self.prefetch = prefetch
        self.write_backlog = write_backlog
        #: Names of the cases that failed, in the order they failed.
        self.failed: list[str] = []
        #: Names of the cases written, in order.
        self.written: list[str] = []
        #: The stop signal that ended :meth:`run` early, if one did.
        self.interrupted: Interrupted | None = None
        self._readers = ThreadPoolExecutor(max_workers=1, thread_name_prefix="read")
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="write")
        self._pending: dict[str, Future] = {}
        self._writes: list[Future] = []
        self._lock = threading.Lock()  # the writer thread reports too

    def __enter__(self) -> CasePipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start_reading(self) -> None:
        """Start reading the first images (call before the slow imports and model loading)."""
        for i in range(self.prefetch):
            self._schedule(i)

    def _schedule(self, i: int) -> None:
        if i < len(self.cases) and self.cases[i].name not in self._pending:
            self._pending[self.cases[i].name] = self._readers.submit(read_case, self.cases[i])

    @property
    def finished(self) -> set[str]:
        """Names of the cases written or failed."""
        with self._lock:
            return {*self.written, *self.failed}

    def run(self, predictor: Any, models: Sequence[Any]) -> None:
        """Predict every case with ``predictor``; results are written as they come.

        A case that fails (unreadable, refused, out of memory, not writable) is reported
        with one ``ERROR`` line and added to :attr:`failed`; the others go on. A stop
        signal (:class:`Interrupted`) ends the loop: the reads not started are cancelled,
        the predictions made are still written, and :attr:`interrupted` says so.
        """
        try:
            self._predict_all(predictor, models)
        except Interrupted as stop:
            self.interrupted = stop
            self._readers.shutdown(wait=False, cancel_futures=True)
        try:
            self._wait_for_writes()
        except Interrupted as stop:  # while the last results were written: they still are
            self.interrupted = stop
            self._wait_for_writes()

    def _predict_all(self, predictor: Any, models: Sequence[Any]) -> None:
        from inference.model import ModelError

        known_errors = (NiftiError, InputError, ModelError)
        for i, case in enumerate(self.cases):
            self._schedule(i + self.prefetch - 1)
            t_case = time.perf_counter()
            try:
                array, geometry, notes, read_s = self._pending.pop(case.name).result()
                notes += [n for n in model_notes(models, array, geometry) if n not in notes]
                for note in notes:
                    log.warning(f"WARNING {printable(case.name)}: {note}")
                result = predictor.predict(array, geometry.spacing_zyx_mm, name=case.name)
                del array
                for note in result.notes:
                    log.warning(f"WARNING {printable(case.name)}: {note}")
                summary = summary_line(i + 1, len(self.cases), case.name, geometry, read_s, result)
                self._wait_for_writer_slot()
                self._writes.append(
                    self._writer.submit(self._write, case, result.labels, geometry, summary)
                )
            except Exception as err:  # one bad case must not stop the others
                self._failed(case.name, failure_reason(err, known_errors))
            finally:
                if i + 1 < len(self.cases):
                    release_free_memory()  # for the next case; the last one ends the process
                log.debug(f"{case.name}: {time.perf_counter() - t_case:.2f}s")

    def _write(self, case: Case, labels: Any, geometry: Geometry, summary: str) -> None:
        """Write one result and report it (on the writer thread: the line comes at once)."""
        path = case.output_path(self.output_dir)
        try:
            write_s = write_case(path, labels, geometry, self.compression_level)
        except Exception as err:
            reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
            self._failed(case.name, f"cannot write output ({one_line(reason)})")
            return
        with self._lock:
            self.written.append(case.name)
        rss = rss_mb()
        memory = f" | rss {rss:.0f} MB" if rss else ""
        log.info(f"{summary} | write {write_s:.2f}s{memory}")

    def _failed(self, name: str, reason: str) -> None:
        with self._lock:
            self.failed.append(name)
        case_error(name, reason)

    def _wait_for_writer_slot(self) -> None:
        """Wait until the writer holds fewer than ``write_backlog`` masks.

        Without this the writer's queue would grow by one mask per case for as long as
        writing is slower than predicting, and memory with it.
        """
        pending = [f for f in self._writes if not f.done()]
        while len(pending) >= self.write_backlog:
            wait(pending, return_when=FIRST_COMPLETED)
            pending = [f for f in pending if not f.done()]

    def _wait_for_writes(self) -> None:
        """Wait until every result handed to the writer is written (or reported failed)."""
        for future in self._writes:
            future.result()

    def close(self) -> None:
        """Cancel the reads not started yet and wait for the writes handed over."""
        self._readers.shutdown(wait=False, cancel_futures=True)
        self._writer.shutdown(wait=True)
