"""Where our predictor's time goes: the stages of its per-case log line against wall time.

``python -m inference`` logs one line per case, e.g.::

    [1/1] FLARE24_0001 512x512x55: read 1.20s preprocess 0.61s predict 40.10s forward 38.90s
    restore 0.95s (9 tiles, cpu) | 3 of 9 air tiles skipped (~17.3 s saved) | foreground
    12.3 ml | write 0.40s | rss 1900 MB

(one line in the log) and a start-up line ``...; start-up 2.1 s (models 0.3 s)``. The
profiler keeps that output in ``REPORT/logs/<case>.log`` and measures the wall time of the
whole process; the difference between the wall time and the logged stages is process start
(interpreter, imports, model loading) and exit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_CASE_LINE = re.compile(
    r"^\[\d+/\d+\] (?P<case>\S+) (?P<size>\S+): read (?P<read>[\d.]+)s (?P<stages>.*?) "
    r"\((?P<tiles>\d+) tiles, (?P<device>[^)]+)\)(?P<rest>.*)$"
)
_STAGE = re.compile(r"(\w+) ([\d.]+)s")
_WRITE = re.compile(r"\| write ([\d.]+)s")
_SKIPPED = re.compile(r"\| (\d+) of \d+ air tiles skipped \(~([\d.]+) s saved\)")
_STARTUP = re.compile(r"start-up ([\d.]+) s \(models ([\d.]+) s\)")
#: Stages timed inside another stage (``forward`` is part of ``predict``); every other
#: logged stage runs one after the other, so their sum is the logged per-case work.
NESTED = ("forward",)


@dataclass(frozen=True)
class StageTimes:
    """One case's logged stages (seconds).

    Attributes:
        case: the case name from the log.
        stages_s: ``read``, ``preprocess``, ``predict``, ``forward``, ``restore``,
            ``write`` (and any other stage the predictor logs), as logged.
        n_tiles: sliding-window tiles (nnU-Net's grid).
        device: the device the predictor ran on.
        n_skipped: tiles skipped as air.
        air_saved_s: the forward time the predictor estimates the skipped tiles would
            have cost.
        startup_s: the logged start-up (CLI start to models loaded), if found.
        models_s: the part of it spent loading models, if found.
    """

    case: str
    stages_s: dict[str, float]
    n_tiles: int
    device: str
    startup_s: float | None = None
    models_s: float | None = None
    n_skipped: int = 0
    air_saved_s: float = 0.0

    @property
    def logged_s(self) -> float:
        """Sum of the sequential stages (all but the nested ``forward``)."""
        return sum(v for k, v in self.stages_s.items() if k not in NESTED)

    @property
    def forward_s(self) -> float:
        """Seconds in the networks' forward passes."""
        return self.stages_s.get("forward", 0.0)


def parse_log(text: str, case: str | None = None) -> StageTimes | None:
    """The stage times of ``case`` (or of the first case) from the predictor's output.

    Returns:
        The times, or None when no complete case line is found (a failed run).
    """
    startup = _STARTUP.search(text)
    for line in text.splitlines():
        match = _CASE_LINE.match(line.strip())
        if match is None or (case is not None and match["case"] != case):
            continue
        write = _WRITE.search(match["rest"])
        if write is None:  # logged before its write finished: the run did not complete
            continue
        stages = {"read": float(match["read"])}
        stages.update({k: float(v) for k, v in _STAGE.findall(match["stages"])})
        stages["write"] = float(write.group(1))
        skipped = _SKIPPED.search(match["rest"])
        return StageTimes(
            case=match["case"],
            stages_s=stages,
            n_tiles=int(match["tiles"]),
            device=match["device"],
            startup_s=float(startup.group(1)) if startup else None,
            models_s=float(startup.group(2)) if startup else None,
            n_skipped=int(skipped.group(1)) if skipped else 0,
            air_saved_s=float(skipped.group(2)) if skipped else 0.0,
        )
    return None


def read_log(path: str | Path, case: str | None = None) -> StageTimes | None:
    """:func:`parse_log` on a log file; None if the file cannot be read."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    return parse_log(text, case)


@dataclass(frozen=True)
class Breakdown:
    """Wall time split into the predictor's stages plus process start.

    Attributes:
        wall_s: the profiler's wall time of the whole process.
        parts_s: ``read``, ``preprocess``, ``sliding window`` (predict minus forward),
            ``forward``, ``restore``, ``write``, ``process start`` (wall minus the logged
            stages; never negative), in that order.
        times: the parsed log.
    """

    wall_s: float
    parts_s: dict[str, float]
    times: StageTimes

    @property
    def outside_forward_share(self) -> float:
        """Share of the wall time not spent in the networks' forward passes."""
        return max(0.0, self.wall_s - self.times.forward_s) / self.wall_s if self.wall_s else 0.0


def breakdown(times: StageTimes, wall_s: float) -> Breakdown:
    """Split the measured wall time of a run into the logged stages and process start."""
    s = times.stages_s
    parts = {
        "read": s.get("read", 0.0),
        "preprocess": s.get("preprocess", 0.0),
        "sliding window (predict − forward)": max(0.0, s.get("predict", 0.0) - times.forward_s),
        "forward": times.forward_s,
        "restore": s.get("restore", 0.0),
    }
    known = {"read", "preprocess", "predict", "restore", "write", *NESTED}
    # Stages a later predictor may add (e.g. a crop step) are shown under their own names.
    parts.update({k: v for k, v in s.items() if k not in known})
    parts["write"] = s.get("write", 0.0)
    parts["process start (wall − stages)"] = max(0.0, wall_s - times.logged_s)
    return Breakdown(wall_s, parts, times)


# A finished tqdm bar: "100%|██████████| 9/9 [02:18<00:00, 15.43s/it]", optionally after a
# description ("Collecting results: 100%|..."); the elapsed time is [h:]mm:ss.
_TQDM_DONE = re.compile(
    r"(?P<desc>[^\r\n|]*?)100%\|[^|\r\n]*\| (?P<n>\d+)/(?P=n) \[(?P<elapsed>[\d:]+)<[^\]\r\n]*\]"
)


def nnunet_loop_s(text: str) -> float | None:
    """Seconds nnU-Net spent in its sliding-window loops, read from its progress bars.

    ``nnUNetv2_predict_from_modelfolder`` shows one bar (no description) per network and
    case over the tiles; a closing bar is printed twice, so a repeat right after the first
    counts once. Resolution is one second. None when no finished bar is found (e.g. with
    ``--disable_progress_bar``).
    """
    total, found, last_end = 0.0, False, None
    for match in _TQDM_DONE.finditer(text):
        if match["desc"].strip():  # "Collecting results" and other described bars
            last_end = None
            continue
        if last_end is not None and not text[last_end : match.start()].strip():
            last_end = match.end()  # the same bar's final state printed again
            continue
        seconds = 0.0
        for part in match["elapsed"].split(":"):
            seconds = seconds * 60 + float(part)
        total, found, last_end = total + seconds, True, match.end()
    return total if found else None
