"""The one atomic-file helper (inference/atomic.py) and the writers that go through it.

A write that fails part way, in the writer or at the flush to disk, must leave the final
name as it was (absent, or the previous complete file) and no temporary file behind:
for the helper itself, a training checkpoint and the profiling reports.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

import inference.atomic
import profiling.report
from inference.atomic import (
    atomic_path,
    is_temporary,
    remove_stale_temporaries,
    temporary_name,
    write_json_atomically,
    write_text_atomically,
)
from profiling.report import write_csv, write_json, write_summary
from profiling.runner import CaseResult
from training.checkpoints import make_saves_atomic


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _raise_eio(fd: int) -> None:
    """An ``fsync`` that fails, as on a disk that reports a lost write only at the flush."""
    raise OSError(errno.EIO, os.strerror(errno.EIO))


@pytest.fixture
def failing_flush(monkeypatch):
    """Make every ``fsync`` fail."""
    monkeypatch.setattr(inference.atomic.os, "fsync", _raise_eio)


# -- the helper ---------------------------------------------------------------------------------


def test_partial_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "record.json"
    write_json_atomically(path, {"n": 1})
    with pytest.raises(RuntimeError, match="killed"), atomic_path(path) as tmp:
        tmp.write_text('{"n": 2, "half', encoding="utf-8")
        assert path.read_text(encoding="utf-8") == '{\n  "n": 1\n}\n'  # not replaced yet
        raise RuntimeError("killed mid-write")
    assert path.read_text(encoding="utf-8") == '{\n  "n": 1\n}\n'
    assert _names(tmp_path) == ["record.json"]
    # a first write that fails leaves nothing at all
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "new.txt") as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert _names(tmp_path) == ["record.json"]


def test_a_failed_flush_publishes_nothing(tmp_path, failing_flush):
    path = tmp_path / "summary.md"
    path.write_text("old\n", encoding="utf-8")
    with pytest.raises(OSError, match="Input/output error"):
        write_text_atomically(path, "new\n")
    assert path.read_text(encoding="utf-8") == "old\n"
    assert _names(tmp_path) == ["summary.md"]


def test_temporary_names_are_hidden_unique_and_recognised(tmp_path):
    first, second = temporary_name(tmp_path / "a.nii.gz"), temporary_name(tmp_path / "a.nii.gz")
    assert first != second and first.name.startswith(".a.") and first.name.endswith(".nii.gz")
    assert is_temporary(first) and is_temporary(temporary_name(tmp_path / "x.pth"))
    assert not is_temporary(tmp_path / ".a.nii.gz.tmp") and not is_temporary(tmp_path / "a.nii.gz")
    assert remove_stale_temporaries(tmp_path / "missing") == []


# -- a training checkpoint ----------------------------------------------------------------------


class _Trainer:
    """Saves the way nnU-Net's ``save_checkpoint`` does: one write to the name it is given."""

    def __init__(self) -> None:
        self.payload = b"epoch 1 " * 1000
        self.crash = False
        self.writes = True  # False: a rank other than 0, or checkpointing disabled

    def save_checkpoint(self, filename: str) -> None:
        if not self.writes:
            return
        with open(filename, "wb") as f:
            f.write(self.payload[: len(self.payload) // 2] if self.crash else self.payload)
        if self.crash:
            raise KeyboardInterrupt  # killed half way through the write


def test_checkpoint_write_that_fails_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    trainer = _Trainer()
    make_saves_atomic(trainer)
    latest = tmp_path / "checkpoint_latest.pth"
    trainer.save_checkpoint(str(latest))
    assert latest.read_bytes() == b"epoch 1 " * 1000
    trainer.payload, trainer.crash = b"epoch 2 " * 1000, True
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint(str(latest))
    assert latest.read_bytes() == b"epoch 1 " * 1000
    assert _names(tmp_path) == ["checkpoint_latest.pth"]
    # nothing written by nnU-Net: the old checkpoint stays, no empty file replaces it
    trainer.writes = False
    trainer.save_checkpoint(str(latest))
    trainer.save_checkpoint(str(tmp_path / "checkpoint_best.pth"))
    assert latest.read_bytes() == b"epoch 1 " * 1000
    assert _names(tmp_path) == ["checkpoint_latest.pth"]
    # a flush that fails: the complete new bytes never reach the name
    trainer.writes, trainer.crash = True, False
    monkeypatch.setattr(inference.atomic.os, "fsync", _raise_eio)
    with pytest.raises(OSError, match="Input/output error"):
        trainer.save_checkpoint(str(latest))
    assert latest.read_bytes() == b"epoch 1 " * 1000
    assert _names(tmp_path) == ["checkpoint_latest.pth"]


# -- the profiling reports ----------------------------------------------------------------------


def _results() -> list[CaseResult]:
    return [CaseResult(f"c{i}", (8, 8, 8), ["x"], exit_code=0) for i in range(3)]


def test_profiling_report_write_that_fails_keeps_the_previous_report(tmp_path, monkeypatch):
    report = tmp_path / "report"
    report.mkdir()
    paths = {
        "csv": write_csv(_results()[:1], report / "results.csv"),
        "json": write_json(_results()[:1], report / "results.json", {"gpu": {}}),
        "md": write_summary(_results()[:1], report / "summary.md", {"gpu": {}}),
    }
    before = {key: path.read_bytes() for key, path in paths.items()}

    # the csv is written row by row: a row that fails leaves half a table in the temporary
    real_row, calls = profiling.report.csv_row, []

    def row_then_fail(result):
        calls.append(result)
        if len(calls) == 2:
            raise RuntimeError("killed mid-write")
        return real_row(result)

    monkeypatch.setattr(profiling.report, "csv_row", row_then_fail)
    with pytest.raises(RuntimeError, match="killed"):
        write_csv(_results(), paths["csv"])
    monkeypatch.setattr(profiling.report, "csv_row", real_row)

    # the summary and the JSON: the flush fails after the whole text was written
    monkeypatch.setattr(inference.atomic.os, "fsync", _raise_eio)
    with pytest.raises(OSError, match="Input/output error"):
        write_summary(_results(), paths["md"], {"gpu": {}})
    with pytest.raises(OSError, match="Input/output error"):
        write_json(_results(), paths["json"], {"gpu": {}})

    assert {key: path.read_bytes() for key, path in paths.items()} == before
    assert _names(report) == ["results.csv", "results.json", "summary.md"]
