"""Benchmark models: the FLARE default network, a compact one, the ensemble, models/demo.

Inference time and memory do not depend on the weight values, so the paper's networks are
benchmarked with seeded random weights (``scripts.random_model``), written into a cache
folder on first use:

- ``flare``: the FLARE24 default ``3d_fullres`` of the method paper (6 stages, patch
  96x160x160 at 1.0 x 0.8037 x 0.8037 mm, 30.8 M parameters);
- ``compact``: 4 stages at 3.0 x 2.0 x 2.0 mm, patch 96x128x128 (5.6 M), a public
  FLARE24 entry's size;
- ``ensemble``: two ``flare`` networks with different seeds, the paper's two-model
  ensemble: for our predictor a folder of two model folders (``predict.sh`` passes each
  as ``-m``); for nnU-Net the same two checkpoints as ``fold_0`` and ``fold_1`` of one
  folder, so ``nnUNetv2_predict_from_modelfolder -f 0 1`` averages them in one process,
  nnU-Net's cheapest way to run two networks with the same plans;
- ``demo``: the trained ``models/demo`` shipped with the project;
- ``tiny``: 3 stages, patch 16x32x32, for the suite's own tests (``tiny_ensemble``: two).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO_DIR = REPO / "models" / "demo"
CHECKPOINT = "checkpoint_final.pth"

#: Random-weight models: name -> (preset, seeds); two seeds make an ensemble.
RANDOM_MODELS = {
    "flare": ("flare", (0,)),
    "compact": ("compact", (0,)),
    "ensemble": ("flare", (0, 1)),
    "tiny": ("tiny", (0,)),
    "tiny_ensemble": ("tiny", (0, 1)),
}
DESCRIPTIONS = {
    "flare": "FLARE default 3d_fullres (6 stages, 1.0x0.80x0.80 mm, patch 96x160x160), "
    "random weights",
    "compact": "compact (4 stages, 3.0x2.0x2.0 mm, patch 96x128x128), random weights",
    "ensemble": "two-model ensemble: 2 x FLARE default 3d_fullres (seeds 0, 1), random weights",
    "tiny": "tiny (3 stages, patch 16x32x32), random weights; for tests only",
    "tiny_ensemble": "two tiny networks (seeds 0, 1), random weights; for tests only",
    "demo": "models/demo: trained on synthetic CT (CPU demo model)",
}
MODEL_NAMES = ("demo", "compact", "flare", "ensemble", "tiny", "tiny_ensemble")
#: What ``python -m benchmarks`` measures by default: CPU-sized.
DEFAULT_MODEL_NAMES = ("demo", "compact")
_MARKER = "bench_model.json"


class ModelUnavailable(RuntimeError):
    """A model that cannot be benchmarked (e.g. models/demo not built yet); one line."""


@dataclass(frozen=True)
class BenchModel:
    """One benchmarked model as each peer sees it.

    Attributes:
        name: ``flare``, ``compact``, ``ensemble``, ``demo``, ``tiny`` or a user's name.
        description: one line for the results.
        folder: ``MODEL_DIR`` for ``predict.sh``: a model folder, or a folder of model
            folders (an ensemble).
        nnunet_folder: ``-m`` for ``nnUNetv2_predict_from_modelfolder``.
        nnunet_folds: ``-f`` for it (the folds our predictor finds on its own).
        n_networks: networks evaluated per tile.
        n_parameters: parameters of one network, if known.
    """

    name: str
    description: str
    folder: Path
    nnunet_folder: Path
    nnunet_folds: tuple[str, ...]
    n_networks: int
    n_parameters: int | None = None


def _folds(folder: Path) -> list[str]:
    from inference.model import available_folds

    return available_folds(folder, CHECKPOINT)


def count_parameters(checkpoint: Path) -> int | None:
    """Parameters of the network in an nnU-Net checkpoint (None if it cannot be read).

    Read as the predictor reads it (``weights_only``): a benchmark folder's checkpoint
    that names code is not run, just not counted.
    """
    from inference.model import load_checkpoint

    try:
        weights = load_checkpoint(checkpoint)["network_weights"]
    except Exception:  # a count is a nicety; an unreadable file fails later, in the peers
        return None
    # nnU-Net's state dicts list shared tensors under several names (``decoder.encoder.*``,
    # ``all_modules.*``); torch.load keeps them shared, so count each storage once.
    unique = {(v.data_ptr(), v.numel()): v.numel() for v in weights.values() if v.numel()}
    return int(sum(unique.values()))


def _write_random(folder: Path, preset: str, seed: int) -> Path:
    """A random-weight model folder, rewritten only when missing or made differently."""
    from scripts.random_model import plans, write_random_model

    # The plans are part of the key: a changed preset must not reuse an old checkpoint.
    wanted = json.loads(json.dumps({"preset": preset, "seed": seed, "plans": plans(preset)}))
    marker = folder / _MARKER
    try:
        if (
            json.loads(marker.read_text()) == wanted
            and (folder / "fold_all" / CHECKPOINT).is_file()
        ):
            return folder
    except (OSError, ValueError):
        pass
    shutil.rmtree(folder, ignore_errors=True)
    write_random_model(folder, preset, seed)
    marker.write_text(json.dumps(wanted) + "\n")
    return folder


def _link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _as_folds(members: Sequence[Path], folder: Path) -> Path:
    """The members' checkpoints as ``fold_0..`` of one nnU-Net folder (same plans needed)."""
    plans = [(m / "plans.json").read_text() for m in members]
    if len(set(plans)) != 1:
        raise ModelUnavailable("ensemble members have different plans; nnU-Net cannot fold them")
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("plans.json", "dataset.json"):
        _link_or_copy(members[0] / name, folder / name)
    for i, member in enumerate(members):
        _link_or_copy(member / "fold_all" / CHECKPOINT, folder / f"fold_{i}" / CHECKPOINT)
    return folder


def random_model(name: str, cache_dir: Path) -> BenchModel:
    """A random-weight benchmark model from :data:`RANDOM_MODELS`, written on first use."""
    preset, seeds = RANDOM_MODELS[name]
    if len(seeds) == 1:
        folder = _write_random(cache_dir / name, preset, seeds[0])
        return BenchModel(
            name,
            DESCRIPTIONS[name],
            folder,
            folder,
            tuple(_folds(folder)),
            1,
            count_parameters(folder / "fold_all" / CHECKPOINT),
        )
    folder = cache_dir / name
    members = [_write_random(folder / f"{preset}_seed{s}", preset, s) for s in seeds]
    nnunet = _as_folds(members, cache_dir / f"{name}_as_folds")
    return BenchModel(
        name,
        DESCRIPTIONS[name],
        folder,
        nnunet,
        tuple(str(i) for i in range(len(members))),
        len(members),
        count_parameters(members[0] / "fold_all" / CHECKPOINT),
    )


def folder_model(name: str, folder: Path, description: str | None = None) -> BenchModel:
    """A model folder as it is (``models/demo`` or a user's ``--model-dir NAME=PATH``).

    Raises:
        ModelUnavailable: no plans.json or no fold with a final checkpoint.
    """
    if not (folder / "plans.json").is_file():
        raise ModelUnavailable(f"model {name}: no plans.json in {folder}")
    folds = _folds(folder)
    if not folds:
        raise ModelUnavailable(f"model {name}: no fold_*/{CHECKPOINT} in {folder}")
    return BenchModel(
        name,
        description or f"{folder}",
        folder.resolve(),
        folder.resolve(),
        tuple(folds),
        len(folds),
        count_parameters(folder / f"fold_{folds[0]}" / CHECKPOINT),
    )


def get_model(name: str, cache_dir: str | os.PathLike, demo_dir: Path = DEMO_DIR) -> BenchModel:
    """The benchmark model called ``name`` (see :data:`MODEL_NAMES`).

    Raises:
        ModelUnavailable: ``demo`` is asked for but not built.
        ValueError: an unknown name.
    """
    if name == "demo":
        if not (demo_dir / "plans.json").is_file():
            raise ModelUnavailable(
                f"models/demo is not built yet (no {demo_dir / 'plans.json'}; `make demo-model`)"
            )
        return folder_model("demo", demo_dir, DESCRIPTIONS["demo"])
    if name in RANDOM_MODELS:
        return random_model(name, Path(cache_dir).resolve())
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODEL_NAMES)}")
