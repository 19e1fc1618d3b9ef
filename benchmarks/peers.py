"""The peers: the commands that predict one case, each run by the profiler as a whole process.

- ``ours``: ``sh predict.sh`` with ``MODEL_DIR``, exactly the container's entry point;
- ``ours_noskip``: the same with ``--no-skip-air``: every tile of nnU-Net's grid runs, so
  the difference to ``ours`` is what skipping air tiles saves (``inference.air``);
- ``nnunet_tta``: ``nnUNetv2_predict_from_modelfolder`` as it comes (test-time mirroring);
- ``nnunet_notta``: the same with ``--disable_tta`` (the method paper's setting).

Every command reads ``INPUT_DIR`` (one case) and writes ``OUTPUT_DIR/<case>.nii.gz``; the
profiler sets both. nnU-Net's command reads folders, so it runs inside ``sh -c``. It starts
worker processes (preprocessing, export); the profiler sums RSS over the whole process tree,
so they are counted.
"""

from __future__ import annotations

import shlex
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.models import BenchModel

REPO = Path(__file__).resolve().parents[1]
OURS, NNUNET_NOTTA, NNUNET_TTA = "ours", "nnunet_notta", "nnunet_tta"
OURS_NOSKIP = "ours_noskip"
PEER_NAMES = (OURS, OURS_NOSKIP, NNUNET_NOTTA, NNUNET_TTA)
#: Peers compared with ``ours`` (the ratios are nnU-Net / ours).
NNUNET_PEERS = (NNUNET_NOTTA, NNUNET_TTA)
#: Peers that run our own predictor (no nnU-Net program needed).
OUR_PEERS = (OURS, OURS_NOSKIP)
LABELS = {
    OURS: "ours (predict.sh)",
    OURS_NOSKIP: "ours --no-skip-air",
    NNUNET_NOTTA: "nnU-Net --disable_tta",
    NNUNET_TTA: "nnU-Net default (TTA)",
}
#: Heading of the ratio column after each peer (the peer's figure / ours).
RATIO_LABELS = {
    OURS_NOSKIP: "no-skip / ours",
    NNUNET_NOTTA: "nnU-Net / ours",
    NNUNET_TTA: "nnU-Net / ours",
}
NNUNET_PREDICT = "nnUNetv2_predict_from_modelfolder"


def find_program(name: str) -> str:
    """The path of a console script: next to this Python first (a venv need not be on PATH).

    Raises:
        FileNotFoundError: not installed.
    """
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found next to {sys.executable} or on PATH")
    return found


@dataclass(frozen=True)
class Peer:
    """A way to predict a case.

    Attributes:
        name: ``ours``, ``ours_noskip``, ``nnunet_notta`` or ``nnunet_tta``.
        label: column heading in the results.
    """

    name: str
    label: str

    def command(self, model: BenchModel, device: str) -> list[str]:
        """The argv the profiler runs for ``model`` on ``device`` (``cpu`` or ``cuda``)."""
        if self.name in OUR_PEERS:
            extra = ("--no-skip-air",) if self.name == OURS_NOSKIP else ()
            return ours_command(model, device, extra=extra)
        return nnunet_command(model, device, tta=self.name == NNUNET_TTA)


def ours_command(
    model: BenchModel, device: str, python: str = sys.executable, extra: Sequence[str] = ()
) -> list[str]:
    """``sh predict.sh`` with ``MODEL_DIR`` and ``--device``, run from the repository root.

    ``env`` sets the variables and replaces itself with ``sh``: no extra process remains.
    ``PYTHON`` names this interpreter so that a venv that is not on PATH still works.
    ``extra`` arguments go into ``PREDICT_ARGS`` after ``--device``.
    """
    return [
        "env",
        f"MODEL_DIR={model.folder}",
        f"PYTHON={python}",
        "PREDICT_ARGS=" + " ".join(["--device", device, *extra]),
        "sh",
        "predict.sh",
    ]


def nnunet_command(
    model: BenchModel, device: str, tta: bool, program: str | None = None
) -> list[str]:
    """``sh -c 'nnUNetv2_predict_from_modelfolder -i "$INPUT_DIR" -o "$OUTPUT_DIR" ...'``.

    Everything else is nnU-Net's default (3 preprocessing and 3 export workers, step 0.5,
    ``checkpoint_final.pth``); ``-f`` lists the folds our predictor uses on its own.
    """
    exe = program or find_program(NNUNET_PREDICT)
    args = [exe, "-m", str(model.nnunet_folder), "-f", *model.nnunet_folds, "-device", device]
    if not tta:
        args.append("--disable_tta")
    script = f'exec {shlex.quote(args[0])} -i "$INPUT_DIR" -o "$OUTPUT_DIR" {shlex.join(args[1:])}'
    return ["sh", "-c", script]


def get_peers(names: Sequence[str]) -> list[Peer]:
    """Peers by name, in the order given.

    Raises:
        ValueError: an unknown name.
    """
    unknown = [n for n in names if n not in PEER_NAMES]
    if unknown:
        raise ValueError(f"unknown peer(s) {', '.join(unknown)}; choose from {PEER_NAMES}")
    return [Peer(n, LABELS[n]) for n in names]
