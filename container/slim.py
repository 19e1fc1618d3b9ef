"""Slim nnU-Net checkpoints for the submission image: keep what prediction reads, drop the rest.

``python slim.py MODEL_DIR`` rewrites every ``fold_*/checkpoint_*.pth`` below MODEL_DIR
(one model folder or an ensemble folder of model folders) in place and prints one line
per checkpoint with the bytes saved. It runs in the Dockerfile's ``model`` stage on the
copy that goes into the image; the model folder on the host is never touched.

What stays: ``network_weights`` and the small entries that nnU-Net's ``nnUNetPredictor``
and our predictor read (``trainer_name``, ``init_args``, ``inference_allowed_mirroring_axes``,
``current_epoch``). What goes: the optimizer state (SGD's momentum buffer, as large as the
weights), the grad-scaler state and the training log; those keys stay in the file with
the value None, as ``python -m training export --slim`` writes them, so the checkpoint keeps
the structure nnU-Net expects. The folder layout (plans.json, dataset.json,
fold_X/checkpoint_final.pth) is unchanged.

This file is copied alone into the build stage: it imports nothing but torch and numpy.
Checkpoints are read with torch's ``weights_only`` loader, as the predictor reads them, so
a checkpoint that names anything else (a pickle that would run code) is refused unrun.
"""

from __future__ import annotations

import os
import pickle
import re
import sys
from pathlib import Path

#: Entries only training needs: set to None.
TRAINING_ONLY = ("optimizer_state", "grad_scaler_state", "logging")


def _checkpoint_globals() -> list:
    """The numpy scalar constructor and dtype classes an nnU-Net checkpoint adds.

    The same list as ``inference.model.checkpoint_globals`` (which says how it was
    found); repeated here because this file is copied into the image's build alone.
    tests/test_container.py checks that the two agree.
    """
    import numpy as np

    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    numeric = sorted({type(np.dtype(code)) for code in "?bBhHiIlLqQefdg"}, key=str)
    return [
        np.dtype,
        *numeric,
        (scalar, "numpy._core.multiarray.scalar"),
        (scalar, "numpy.core.multiarray.scalar"),
    ]


def slim_checkpoint(path: Path) -> tuple[int, int]:
    """Rewrite one checkpoint without its training-only state.

    Written to a temporary name in the same folder and renamed, so an interrupted run
    leaves either the old or the new file.

    Returns:
        The file size in bytes before and after.
    """
    import torch

    before = path.stat().st_size
    try:
        with torch.serialization.safe_globals(_checkpoint_globals()):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        named = re.search(r"GLOBAL ([\w.]+)|got <class '([\w.]+)'>", str(err))
        what = next((g for g in named.groups() if g), "?") if named else "?"
        raise ValueError(f"{path} refused unrun: it asks for {what}") from None
    if not isinstance(checkpoint, dict) or "network_weights" not in checkpoint:
        raise ValueError(f"{path} is not an nnU-Net checkpoint (no network_weights)")
    for key in TRAINING_ONLY:
        if key in checkpoint:
            checkpoint[key] = None
    # A numpy scalar (nnU-Net stores _best_ema as one) would keep the file from loading
    # with torch.load(weights_only=True); as a Python float it loads either way.
    if "_best_ema" in checkpoint and checkpoint["_best_ema"] is not None:
        checkpoint["_best_ema"] = float(checkpoint["_best_ema"])
    tmp = path.with_name(f".{path.name}.slim-tmp")
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)
    return before, path.stat().st_size


def slim_model_folder(folder: Path) -> list[tuple[Path, int, int]]:
    """Slim every ``fold_*/checkpoint_*.pth`` below ``folder``.

    Returns:
        (path, bytes before, bytes after) per checkpoint, sorted by path.
    """
    results = []
    for path in sorted(folder.rglob("fold_*/checkpoint_*.pth")):
        results.append((path, *slim_checkpoint(path)))
    return results


def main(argv: list[str] | None = None) -> int:
    """``python slim.py MODEL_DIR``; returns the exit status."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] in ("-h", "--help"):
        print("usage: python slim.py MODEL_DIR\n" + (__doc__ or "").split("\n\n")[1])
        return 0 if args[:1] in (["-h"], ["--help"]) else 2
    folder = Path(args[0])
    try:
        results = slim_model_folder(folder)
    except Exception as err:  # one line, as every command of the project reports
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        print(f"error: {type(err).__name__}: {first}", file=sys.stderr)
        return 1
    if not results:
        print(f"error: no fold_*/checkpoint_*.pth below {folder}", file=sys.stderr)
        return 1
    total_before = sum(b for _, b, _ in results)
    total_after = sum(a for _, _, a in results)
    for path, before, after in results:
        print(f"{path.relative_to(folder)}: {before / 2**20:.1f} MB -> {after / 2**20:.1f} MB")
    print(
        f"checkpoints: {total_before / 2**20:.1f} MB -> {total_after / 2**20:.1f} MB "
        f"({(total_before - total_after) / 2**20:.1f} MB saved)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
