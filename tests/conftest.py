"""Shared fixtures: small model folders and NIfTI cases built from real components."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

# Two cores in CI: keep torch from oversubscribing when tests run subprocesses.
torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO = Path(__file__).resolve().parents[1]
#: The trained demo model; DEMO_MODEL=path runs the model-dependent tests on another folder.
DEMO_MODEL = Path(os.environ.get("DEMO_MODEL", REPO / "models" / "demo"))


#: SIGTERM/SIGINT handlers as the suite starts; every test must leave them so.
SESSION_HANDLERS = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}


@pytest.fixture(autouse=True)
def _signal_handlers_come_back():
    """Fail a test that leaves a SIGTERM/SIGINT handler behind (and put the old one back).

    A handler left in the pytest process is inherited by every process forked later:
    nnU-Net's planning forks a ``multiprocessing.Pool`` and terminates it with SIGTERM, and
    a worker whose inherited handler does not end it keeps the suite waiting for ever.
    Compared with the handlers at the suite's start, so that a leak from a module or
    session fixture (set up before this fixture) fails too.
    """
    yield
    leaked = [s.name for s, h in SESSION_HANDLERS.items() if signal.getsignal(s) is not h]
    for sig, handler in SESSION_HANDLERS.items():
        signal.signal(sig, handler)
    assert not leaked, f"the test (or a fixture) left a handler for {', '.join(leaked)} installed"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A complete nnU-Net v2 model folder (tiny PlainConvUNet) with seeded random weights."""
    from scripts.random_model import write_random_model

    return write_random_model(tmp_path_factory.mktemp("models") / "tiny", "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_model_b(tmp_path_factory) -> Path:
    """A second tiny model with other weights (ensemble tests)."""
    from scripts.random_model import write_random_model

    return write_random_model(tmp_path_factory.mktemp("models") / "tiny_b", "tiny", seed=1)


@pytest.fixture(scope="session")
def demo_model() -> Path:
    """The trained demo model shipped in models/demo."""
    if not (DEMO_MODEL / "plans.json").is_file():
        pytest.fail("models/demo is missing: build it with `make demo-model`")
    return DEMO_MODEL


def nnunet_reference(model_dir: Path, folds: tuple[str, ...] = ("all",)):
    """nnU-Net's own ``nnUNetPredictor`` as the reference for correctness: the same
    sliding window (step 0.5, Gaussian) with mirroring off, on the CPU."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    pred = nnUNetPredictor(
        tile_step_size=0.5,
        use_gaussian=True,
        use_mirroring=False,
        perform_everything_on_device=False,
        device=torch.device("cpu"),
        verbose=False,
        allow_tqdm=False,
    )
    pred.initialize_from_trained_model_folder(str(model_dir), use_folds=folds)
    return pred


def _plant(marker: str) -> None:
    """What a planted checkpoint's payload does: write ``marker`` (harmless code execution)."""
    Path(marker).write_text("the payload ran")


class Payload:
    """Unpickling this calls :func:`_plant` on a marker file: code execution, harmless.

    Planted in a checkpoint, it shows whether a loader unpickles freely (the marker file
    appears) or refuses what the file names (no marker).
    """

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (_plant, (str(self.marker),))
