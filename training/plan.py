"""nnU-Net fingerprint, planning and preprocessing for ``3d_fullres``, plus our configurations.

Two kinds of configuration are added to nnU-Net's plans file:

* batch-size variants ``<base>_bsN`` = ``{"inherits_from": base, "batch_size": N}``: they
  share the base configuration's ``data_identifier``, so its preprocessed data is reused and
  nothing is preprocessed twice;
* an optional compact configuration (default name ``3d_compact``): fewer stages, coarser
  spacing, smaller patch and fewer features, with its own data identifier and its own
  nnU-Net preprocessing. A public FLARE24 entry used (3.0, 2.0, 2.0) mm, patch
  (96, 128, 128) and a 4-stage U-Net; those are the defaults here.

nnU-Net's residual-encoder presets (``nnUNetPlannerResEncM`` / ``L``, the configurations
nnU-Net recommends since 2024) can be planned beside the default: each writes its own plans
file (``nnUNetResEncUNetMPlans.json`` / ``...LPlans.json``) whose ``3d_fullres`` uses the
default plans' preprocessed data (nnU-Net's ResEnc planners keep the data identifier
``nnUNetPlans_3d_fullres``), and gets the same batch-size variants and CT normalisation.
The compact configuration stays in the default plans (it is a plain U-Net).

Spacings and patch sizes given by the user are in the image array's (z, y, x) order; they
are permuted to the plans' order (``transpose_forward``) here, which is the identity for CT
(z is the coarsest axis).

nnunetv2 is imported inside the functions: the workspace's environment variables must be
set before its first import.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from training.workspace import DEFAULT_PLANS, Workspace, WorkspaceError, dataset_id_of

#: nnU-Net's default configuration; the batch-size variants and the compact one derive from it.
FULLRES = "3d_fullres"
#: Name of the compact configuration.
COMPACT = "3d_compact"
#: A public FLARE24 entry's compact setting (../shared/FLARE24.md), (z, y, x).
COMPACT_SPACING_MM = (3.0, 2.0, 2.0)
COMPACT_PATCH = (96, 128, 128)
COMPACT_FEATURES = (32, 64, 128, 256)
#: nnU-Net's smallest bottleneck edge (``UNet_featuremap_min_edge_length``).
MIN_FEATURE_MAP_EDGE = 4
#: The CT normalisation of the full FLARE24 Task 1 training set (../shared/FLARE24.md): the
#: four values nnU-Net's CTNormalization uses (clip to the percentiles, then z-score).
FLARE24_CT_NORMALIZATION = {
    "mean": -52.23,
    "std": 268.80,
    "percentile_00_5": -900.0,
    "percentile_99_5": 619.0,
}


#: ``--resenc`` size -> (nnU-Net planner class name, plans identifier it writes).
RESENC_PLANNERS = {
    "M": ("nnUNetPlannerResEncM", "nnUNetResEncUNetMPlans"),
    "L": ("nnUNetPlannerResEncL", "nnUNetResEncUNetLPlans"),
}


@dataclass(frozen=True)
class CompactSpec:
    """The size of the compact configuration.

    Attributes:
        features: feature maps per stage; its length is the number of stages.
        patch_zyx: patch size in voxels, (z, y, x); None: ``COMPACT_PATCH`` clipped to the
            median image shape at the compact spacing (as nnU-Net clips its own patch).
        spacing_zyx_mm: target spacing, (z, y, x) mm; None: ``COMPACT_SPACING_MM``, but never
            finer than ``3d_fullres``'s spacing on any axis.
        batch_size: the configuration's batch size.
        batch_dice: Dice over the whole batch rather than per sample; nnU-Net's choice
            for 3d_fullres on large images (FLARE), steadier for small, sparse lesions.
        name: configuration name in the plans.
    """

    features: tuple[int, ...] = COMPACT_FEATURES
    patch_zyx: tuple[int, int, int] | None = None
    spacing_zyx_mm: tuple[float, float, float] | None = None
    batch_size: int = 2
    batch_dice: bool = True
    name: str = COMPACT


def batch_size_configuration_name(base: str, batch_size: int) -> str:
    """``<base>_bs<N>``, the name of a batch-size variant."""
    return f"{base}_bs{batch_size}"


def add_batch_size_configuration(plans: dict, base: str, batch_size: int) -> str:
    """Add (or update) ``<base>_bsN`` inheriting from ``base`` with only the batch size changed.

    A base that is itself a pure batch-size variant is followed to its parent, so that
    ``3d_fullres_bs4`` with batch size 8 becomes ``3d_fullres_bs8``, not ``..._bs4_bs8``.

    Returns:
        The name of the configuration holding ``batch_size`` (``base`` itself when its batch
        size already is ``batch_size``).

    Raises:
        WorkspaceError: unknown base configuration or a batch size below 1.
    """
    configurations = plans["configurations"]
    if base not in configurations:
        raise WorkspaceError(
            f"unknown configuration {base!r}; available: {', '.join(configurations)}"
        )
    if batch_size < 1:
        raise WorkspaceError(f"batch size must be at least 1, got {batch_size}")
    own = configurations[base]
    if set(own) == {"inherits_from", "batch_size"}:
        base = own["inherits_from"]
    if resolve_configuration(plans, base)["batch_size"] == batch_size:
        return base
    name = batch_size_configuration_name(base, batch_size)
    configurations[name] = {"inherits_from": base, "batch_size": batch_size}
    return name


def resolve_configuration(plans: dict, name: str) -> dict:
    """A configuration with its ``inherits_from`` chain applied (as nnU-Net's PlansManager does)."""
    configurations = plans["configurations"]
    if name not in configurations:
        raise WorkspaceError(
            f"unknown configuration {name!r}; available: {', '.join(configurations)}"
        )
    seen = []
    chain = []
    while name is not None:
        if name in seen:
            raise WorkspaceError(f"circular inherits_from: {' -> '.join([*seen, name])}")
        seen.append(name)
        chain.append(configurations[name])
        name = configurations[name].get("inherits_from")
    resolved: dict = {}
    for configuration in reversed(chain):
        resolved.update(deepcopy(configuration))
    return resolved


#: What a configuration's preprocessed data depends on: keys of the resolved configuration
#: and of the plans' top level. Data made with other values is other data.
PREPROCESSING_KEYS = (
    "data_identifier",
    "preprocessor_name",
    "spacing",
    "normalization_schemes",
    "use_mask_for_norm",
    "resampling_fn_data",
    "resampling_fn_data_kwargs",
    "resampling_fn_seg",
    "resampling_fn_seg_kwargs",
)
PREPROCESSING_TOP_KEYS = ("transpose_forward", "foreground_intensity_properties_per_channel")
#: What a trained network depends on beyond its data: a checkpoint trained with other values
#: does not belong in the same model (the batch size is left out: prediction ignores it).
NETWORK_KEYS = ("patch_size", "architecture")
NETWORK_TOP_KEYS = ("transpose_backward",)
#: Words for the keys in messages.
_KEY_WORDS = {
    "foreground_intensity_properties_per_channel": "CT normalisation",
    "normalization_schemes": "normalisation scheme",
    "transpose_forward": "axis order",
    "transpose_backward": "axis order",
    "patch_size": "patch size",
    "architecture": "network",
}


def preprocessing_parts(plans: dict, configuration: str) -> dict:
    """The parts of ``plans`` that a configuration's preprocessed data was made with.

    Raises:
        WorkspaceError: unknown configuration.
    """
    resolved = resolve_configuration(plans, configuration)
    parts = {key: resolved.get(key) for key in PREPROCESSING_KEYS}
    parts.update({key: plans.get(key) for key in PREPROCESSING_TOP_KEYS})
    return json.loads(json.dumps(parts))  # tuples -> lists, as a JSON round trip gives


def network_parts(plans: dict, configuration: str) -> dict:
    """The parts of ``plans`` a network of ``configuration`` was trained and predicts with.

    Raises:
        WorkspaceError: unknown configuration.
    """
    resolved = resolve_configuration(plans, configuration)
    parts = preprocessing_parts(plans, configuration)
    parts.update({key: resolved.get(key) for key in NETWORK_KEYS})
    parts.update({key: plans.get(key) for key in NETWORK_TOP_KEYS})
    return json.loads(json.dumps(parts))


def _window(properties: object) -> str | None:
    # "-45..219 HU": the clip window CTNormalization uses, for messages.
    try:
        channel = properties["0"]  # type: ignore[index]
        return f"{channel['percentile_00_5']:g}..{channel['percentile_99_5']:g} HU"
    except (KeyError, TypeError, ValueError):
        return None


def describe_differences(recorded: dict, current: dict) -> str:
    """A few words on how two ``preprocessing_parts``/``network_parts`` differ ("" if not).

    ``recorded`` is what the data or checkpoint was made with, ``current`` today's plans.
    """
    words = []
    for key in dict.fromkeys([*recorded, *current]):
        if recorded.get(key) == current.get(key):
            continue
        word = _KEY_WORDS.get(key, key.replace("_", " "))
        if key == "foreground_intensity_properties_per_channel":
            old, new = _window(recorded.get(key)), _window(current.get(key))
            if old and new and old != new:
                word += f" {old} vs {new} now"
        elif key == "spacing":
            word += f" {recorded.get(key)} vs {current.get(key)} now"
        if word not in words:
            words.append(word)
    return ", ".join(words)


def _to_plans_order(values_zyx, transpose_forward: list[int]) -> list:
    return [values_zyx[i] for i in transpose_forward]


def median_shape_at(fingerprint: dict, spacing_zyx_mm) -> np.ndarray:
    """Median image shape (z, y, x) after cropping and resampling to ``spacing_zyx_mm``."""
    spacings = np.asarray(fingerprint["spacings"], dtype=float)
    shapes = np.asarray(fingerprint["shapes_after_crop"], dtype=float)
    new_shapes = np.round(shapes * spacings / np.asarray(spacing_zyx_mm, dtype=float))
    return np.median(new_shapes, axis=0)


def compact_configuration(plans: dict, fingerprint: dict, spec: CompactSpec) -> dict:
    """Build the compact configuration from ``3d_fullres`` and the dataset fingerprint.

    The topology (pooling per axis, kernel sizes) comes from nnU-Net's own
    ``get_pool_and_conv_props`` for the compact spacing and patch, cut to
    ``len(spec.features)`` stages; the patch is then padded to a multiple of the total
    pooling, as nnU-Net does.

    Raises:
        WorkspaceError: the plans have no 3d_fullres, or an invalid spec.
    """
    from nnunetv2.experiment_planning.experiment_planners.network_topology import (
        get_pool_and_conv_props,
        pad_shape,
    )

    if FULLRES not in plans["configurations"]:
        raise WorkspaceError("the plans have no 3d_fullres configuration (is the dataset 3D?)")
    if len(spec.features) < 2:
        raise WorkspaceError("the compact network needs at least 2 stages (--compact-features)")
    fullres = resolve_configuration(plans, FULLRES)
    forward = plans["transpose_forward"]
    backward = plans["transpose_backward"]
    fullres_spacing_zyx = _to_plans_order(fullres["spacing"], backward)

    if spec.spacing_zyx_mm is None:
        pairs = zip(COMPACT_SPACING_MM, fullres_spacing_zyx, strict=True)
        spacing_zyx = [max(a, b) for a, b in pairs]
    else:
        spacing_zyx = [float(s) for s in spec.spacing_zyx_mm]
    if len(spacing_zyx) != 3 or min(spacing_zyx) <= 0:
        raise WorkspaceError(f"compact spacing must be 3 positive values, got {spacing_zyx}")
    median_zyx = median_shape_at(fingerprint, spacing_zyx)
    if spec.patch_zyx is None:
        patch_zyx = [int(min(p, max(m, 1))) for p, m in zip(COMPACT_PATCH, median_zyx, strict=True)]
    else:
        patch_zyx = [int(p) for p in spec.patch_zyx]
    if len(patch_zyx) != 3 or min(patch_zyx) < 1:
        raise WorkspaceError(f"compact patch must be 3 positive sizes, got {patch_zyx}")

    spacing = _to_plans_order(spacing_zyx, forward)
    patch = _to_plans_order(patch_zyx, forward)
    _, strides, kernels, _, _ = get_pool_and_conv_props(
        spacing, patch, MIN_FEATURE_MAP_EDGE, 999999
    )
    n_stages = min(len(spec.features), len(strides))
    strides = [list(s) for s in strides[:n_stages]]
    kernels = [list(k) for k in kernels[:n_stages]]
    divisible_by = np.prod(np.asarray(strides), axis=0)
    patch = [int(p) for p in pad_shape(patch, divisible_by)]

    configuration = deepcopy(fullres)
    configuration.pop("inherits_from", None)
    configuration.update(
        {
            "data_identifier": f"{plans['plans_name']}_{spec.name}",
            "batch_size": int(spec.batch_size),
            "patch_size": patch,
            "median_image_size_in_voxels": [float(m) for m in _to_plans_order(median_zyx, forward)],
            "spacing": [float(s) for s in spacing],
            "batch_dice": bool(spec.batch_dice),
        }
    )
    configuration["architecture"]["arch_kwargs"].update(
        {
            "n_stages": n_stages,
            "features_per_stage": [int(f) for f in spec.features[:n_stages]],
            "kernel_sizes": kernels,
            "strides": strides,
            "n_conv_per_stage": [2] * n_stages,
            "n_conv_per_stage_decoder": [2] * (n_stages - 1),
        }
    )
    return configuration


def count_parameters(plans: dict, dataset_json: dict, configuration: str) -> int:
    """Number of trainable parameters of the network a configuration builds.

    Built as the predictor builds it (on the meta device, every class name of the
    architecture checked against its allowlist): a plans file that is reused may come
    from anywhere, and nnU-Net's builder would import and call whatever it names.

    Raises:
        WorkspaceError: the architecture names a class that is refused or not found.
    """
    from inference.model import ModelError, NameRefused, build_network

    resolved = resolve_configuration(plans, configuration)
    try:
        network = build_network(
            resolved, len(dataset_json["channel_names"]), len(dataset_json["labels"])
        )
    except NameRefused as err:
        raise WorkspaceError(f"configuration {configuration}: {err.reason}") from None
    except ModelError as err:
        raise WorkspaceError(f"configuration {configuration}: {err}") from None
    return sum(p.numel() for p in network.parameters() if p.requires_grad)


def use_flare24_ct_normalization(plans: dict) -> None:
    """Normalise CT as nnU-Net's plans for the full FLARE24 Task 1 training set do.

    For a subset of FLARE24 or a synthetic imitation of it, the dataset's own foreground
    percentiles can give a much narrower window (a few hundred lesion voxels decide it);
    lung nodules, for instance, may then be clipped to the value of the lung around them.
    The dataset's own values are kept under ``dataset_foreground_intensity_properties``.
    """
    properties = plans["foreground_intensity_properties_per_channel"]
    plans["dataset_foreground_intensity_properties"] = deepcopy(properties)
    properties["0"] = {**properties.get("0", {}), **FLARE24_CT_NORMALIZATION}
    plans["ct_normalization_source"] = "FLARE24 Task 1 training set (published nnU-Net plans)"


@contextmanager
def _planner_threads() -> Iterator[None]:
    """Let nnU-Net's planner run with ``nnUNet_n_proc_DA=0`` (augmentation in-process).

    The planner calls ``torch.set_num_threads(get_allowed_n_proc_DA())`` to estimate memory,
    which raises for 0; it gets 1 for the duration of planning.
    """
    key = "nnUNet_n_proc_DA"
    old = os.environ.get(key)
    if old is not None and old.strip() == "0":
        os.environ[key] = "1"
    try:
        yield
    finally:
        if old is not None:
            os.environ[key] = old


@dataclass
class PlanResult:
    """What ``plan_dataset`` wrote.

    Attributes:
        plans_file: the plans JSON.
        configurations: names of the configurations added or (re)planned by this run.
        preprocessed: configurations whose data was preprocessed by this run.
        resenc: residual-encoder plans written: plans file -> its configurations.
        fingerprint_reused: the dataset fingerprint was up to date and not recomputed.
        stale: one line per data folder left as it was that the plans no longer describe
            (``--preprocess none`` after another normalisation); train refuses them.
    """

    plans_file: Path
    configurations: list[str]
    preprocessed: list[str]
    resenc: dict[Path, list[str]] = field(default_factory=dict)
    fingerprint_reused: bool = False
    stale: list[str] = field(default_factory=list)


def _fingerprint(
    workspace: Workspace, name: str, num_processes: int, verify: bool, clean: bool, progress: bool
) -> bool:
    """Extract the dataset fingerprint unless an up-to-date one exists; True when reused.

    Up to date: written after the raw dataset's ``dataset.json`` (which ``convert`` rewrites
    on every run). Reading every CT again takes long on a FLARE-size dataset, so adding a
    configuration or a preset later does not redo it.
    """
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprint_dataset

    fingerprint = workspace.preprocessed / name / "dataset_fingerprint.json"
    raw_json = workspace.raw / name / "dataset.json"
    reuse = (
        not clean
        and not verify
        and fingerprint.is_file()
        and fingerprint.stat().st_mtime >= raw_json.stat().st_mtime
    )
    extract_fingerprint_dataset(
        dataset_id_of(name),
        num_processes=num_processes,
        check_dataset_integrity=verify,
        clean=not reuse,
        verbose=False,
        show_progress_bar=progress,
    )
    return reuse


def _plan_with(
    planner_class, dataset_id: int, gpu_memory_gb: float | None, plans_name: str | None
) -> None:
    from nnunetv2.experiment_planning.plan_and_preprocess_api import plan_experiment_dataset

    with _planner_threads():
        plan_experiment_dataset(
            dataset_id,
            experiment_planner_class=planner_class,
            gpu_memory_target_in_gb=gpu_memory_gb,
            overwrite_plans_name=plans_name,
        )


def _finish_plans(plans: dict, ct_normalization: str, batch_sizes: list[int]) -> list[str]:
    """Our additions to a freshly planned plans dict; returns the configurations written."""
    if ct_normalization == "flare24":
        use_flare24_ct_normalization(plans)
    written = [FULLRES]
    for batch_size in batch_sizes:
        written.append(add_batch_size_configuration(plans, FULLRES, batch_size))
    return written


def plan_resenc(
    workspace: Workspace,
    name: str,
    sizes: list[str],
    batch_sizes: list[int],
    ct_normalization: str,
) -> dict[Path, list[str]]:
    """Plan nnU-Net's residual-encoder presets and add our batch-size variants to each.

    Returns:
        Plans file -> configurations written, per preset.
    """
    from nnunetv2.experiment_planning.experiment_planners.residual_unets import (
        residual_encoder_unet_planners as resenc,
    )

    written = {}
    for size in sizes:
        class_name, identifier = RESENC_PLANNERS[size]
        _plan_with(getattr(resenc, class_name), dataset_id_of(name), None, None)
        plans_file = workspace.plans_file(name, identifier)
        plans = json.loads(plans_file.read_text())
        if FULLRES not in plans["configurations"]:
            raise WorkspaceError(f"nnU-Net's {class_name} planned no 3d_fullres for {name}")
        written[plans_file] = _finish_plans(plans, ct_normalization, batch_sizes)
        plans_file.write_text(json.dumps(plans, indent=4) + "\n")
    return written


def plan_dataset(
    workspace: Workspace,
    dataset: str,
    batch_sizes: list[int] | None = None,
    compact: CompactSpec | None = None,
    num_processes: int = 2,
    preprocess: str = "all",
    gpu_memory_gb: float | None = None,
    plans_name: str = DEFAULT_PLANS,
    verify: bool = False,
    ct_normalization: str = "dataset",
    progress: bool = True,
    resenc: list[str] | None = None,
    clean: bool = False,
) -> PlanResult:
    """Fingerprint, plan and preprocess a converted dataset; add our configurations.

    Args:
        workspace: the activated work folder.
        dataset: dataset id or ``DatasetXXX_NAME``.
        batch_sizes: add ``3d_fullres_bsN`` for each N, in every plans file written (the
            compact one gets ``_bsN`` variants from ``train --batch-size``).
        compact: add the compact configuration when given.
        num_processes: processes for fingerprinting and preprocessing.
        preprocess: ``all`` (3d_fullres and, if asked, the compact one), ``compact`` (only
            the compact one: a FLARE-size 3d_fullres is hundreds of GB) or ``none``.
        gpu_memory_gb: nnU-Net default planner's GPU memory target (default 8, nnU-Net's);
            the ResEnc presets keep their own (M 8, L 24).
        plans_name: plans identifier of the default planner.
        verify: also run nnU-Net's ``verify_dataset_integrity`` first.
        ct_normalization: ``dataset`` (nnU-Net's: this dataset's foreground percentiles)
            or ``flare24`` (the full FLARE24 training set's, see
            ``use_flare24_ct_normalization``).
        progress: show nnU-Net's progress bars.
        resenc: residual-encoder presets to plan too (``M``, ``L``).
        clean: recompute the fingerprint even when an up-to-date one exists.

    Returns:
        The plans file and the configurations written.
    """
    from training.preprocessed import stale_data  # it imports this module

    if preprocess not in ("all", "compact", "none"):
        raise WorkspaceError(f"preprocess must be all, compact or none, got {preprocess!r}")
    if ct_normalization not in ("dataset", "flare24"):
        raise WorkspaceError(
            f"ct normalization must be dataset or flare24, not {ct_normalization!r}"
        )
    if preprocess == "compact" and compact is None:
        raise WorkspaceError("--preprocess compact needs --compact")
    unknown = sorted(set(resenc or []) - set(RESENC_PLANNERS))
    if unknown:
        raise WorkspaceError(f"unknown ResEnc preset {unknown[0]!r}; choose from M, L")
    name = workspace.resolve_dataset(dataset)
    if not (workspace.raw / name / "dataset.json").is_file():
        raise WorkspaceError(f"{workspace.raw / name} has no dataset.json (run convert first)")
    dataset_id = dataset_id_of(name)

    reused = _fingerprint(workspace, name, num_processes, verify, clean, progress)
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import (
        ExperimentPlanner,
    )

    _plan_with(
        ExperimentPlanner,
        dataset_id,
        gpu_memory_gb,
        None if plans_name == DEFAULT_PLANS else plans_name,
    )
    plans_file = workspace.plans_file(name, plans_name)
    plans = json.loads(plans_file.read_text())
    if FULLRES not in plans["configurations"]:
        raise WorkspaceError(f"nnU-Net planned no 3d_fullres for {name} (2D images?)")
    written = _finish_plans(plans, ct_normalization, batch_sizes or [])
    if compact is not None:
        fingerprint = json.loads(
            (workspace.preprocessed / name / "dataset_fingerprint.json").read_text()
        )
        plans["configurations"][compact.name] = compact_configuration(plans, fingerprint, compact)
        written.append(compact.name)
    plans_file.write_text(json.dumps(plans, indent=4) + "\n")
    resenc_written = plan_resenc(
        workspace, name, list(resenc or []), batch_sizes or [], ct_normalization
    )

    to_preprocess = []
    if preprocess == "all":
        to_preprocess.append(FULLRES)
    if preprocess in ("all", "compact") and compact is not None:
        to_preprocess.append(compact.name)
    if to_preprocess:
        _preprocess(workspace, name, plans, plans_name, to_preprocess, num_processes, progress)
    stale = []
    for plans_path, names in [(plans_file, written), *resenc_written.items()]:
        left = [n for n in names if n not in to_preprocess]
        stale += stale_data(plans_path, json.loads(plans_path.read_text()), left)
    return PlanResult(
        plans_file, list(dict.fromkeys(written)), to_preprocess, resenc_written, reused, stale
    )


def _preprocess(
    workspace: Workspace,
    name: str,
    plans: dict,
    plans_name: str,
    configurations: list[str],
    num_processes: int,
    progress: bool,
) -> None:
    """nnU-Net's preprocessing of ``configurations``, each data folder recorded when done.

    Raises:
        WorkspaceError: the disk filled up (one line instead of a worker's traceback).
    """
    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess_dataset

    from training.preprocessed import disk_full_as_error, forget_record, write_record

    folder = workspace.preprocessed / name
    data = {c: folder / resolve_configuration(plans, c)["data_identifier"] for c in configurations}
    for data_folder in data.values():
        forget_record(data_folder)
    with disk_full_as_error(folder, f"preprocessing {', '.join(configurations)}"):
        preprocess_dataset(
            dataset_id_of(name),
            plans_identifier=plans_name,
            configurations=configurations,
            num_processes=[num_processes],
            verbose=False,
            show_progress_bar=progress,
        )
        for configuration, data_folder in data.items():
            write_record(data_folder, plans, plans_name, configuration)


def describe_configurations(plans: dict, dataset_json: dict, names: list[str]) -> list[str]:
    """One line per configuration: batch size, patch, spacing, stages, parameters, data folder."""
    lines = []
    for name in names:
        c = resolve_configuration(plans, name)
        arch = c["architecture"]["arch_kwargs"]
        n_params = count_parameters(plans, dataset_json, name)
        spacing = ", ".join(f"{s:.4g}" for s in c["spacing"])
        lines.append(
            f"{name}: batch {c['batch_size']}, patch {tuple(c['patch_size'])}, spacing "
            f"({spacing}) mm, {arch['n_stages']} stages {tuple(arch['features_per_stage'])}, "
            f"{n_params / 1e6:.2f} M parameters, data {c['data_identifier']}"
        )
    return lines
