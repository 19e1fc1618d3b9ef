"""Load a standard nnU-Net v2 results folder without nnU-Net's training stack.

A model folder is ``plans.json``, ``dataset.json`` and ``fold_X/checkpoint_*.pth``. The
network is rebuilt from the plans with dynamic_network_architectures (what nnU-Net does in
``get_network_from_plans``), so prediction needs torch, numpy and that package only;
importing nnunetv2 would pull in scikit-learn, scikit-image, batchgenerators and more, and
every second of start-up counts in the challenge's timing.
"""

from __future__ import annotations

import json
import math
import pickle
import pydoc
import re
from collections.abc import Sequence
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

SUPPORTED_NORMALIZATION = {
    "CTNormalization",
    "ZScoreNormalization",
    "NoNormalization",
    "RescaleTo01Normalization",
}
DEFAULT_RESAMPLING_FN = "resample_data_or_seg_to_shape"


class ModelError(ValueError):
    """A model folder that cannot be used; the message is one line for the user."""


@dataclass(frozen=True)
class Preprocessing:
    """Everything about a configuration that decides how an image is prepared and restored.

    Attributes:
        transpose_forward: axis order nnU-Net applies to the (z, y, x) array.
        transpose_backward: its inverse.
        spacing_mm: target spacing, in transposed axis order.
        normalization: the normalization scheme name (one input channel).
        intensity: the scheme's intensity properties (CT: mean, std, percentile_00_5, ...).
        use_mask_for_norm: nnU-Net's flag (only False is supported with ZScore).
        data_order: resampling order for the image, and ``data_order_z`` for its separate axis.
        logits_order: resampling order for the logits, and ``logits_order_z`` likewise.
        data_force_separate_z / logits_force_separate_z: nnU-Net's force_separate_z.
    """

    transpose_forward: tuple[int, ...]
    transpose_backward: tuple[int, ...]
    spacing_mm: tuple[float, ...]
    normalization: str
    intensity: dict[str, float]
    use_mask_for_norm: bool
    data_order: int = 3
    data_order_z: int = 0
    data_force_separate_z: bool | None = None
    logits_order: int = 1
    logits_order_z: int = 0
    logits_force_separate_z: bool | None = None

    def key(self) -> tuple:
        """What must match for two models to share one preprocessed image."""
        return (
            self.transpose_forward,
            tuple(round(s, 6) for s in self.spacing_mm),
            self.normalization,
            tuple(sorted(self.intensity.items())),
            self.use_mask_for_norm,
            self.data_order,
            self.data_order_z,
            self.data_force_separate_z,
        )


@dataclass
class Model:
    """One model folder with its networks (one per fold) ready for inference.

    Attributes:
        folder: the model folder.
        configuration: the nnU-Net configuration the checkpoints were trained with.
        preprocessing: how images are prepared for this model.
        patch_size: the network's tile size, transposed axis order.
        num_classes: number of output channels (segmentation heads).
        folds: the folds loaded, in order.
        networks: one eval-mode network per fold, on the CPU until moved.
        trainer_name: the trainer class recorded in the first checkpoint.
    """

    folder: Path
    configuration: str
    preprocessing: Preprocessing
    patch_size: tuple[int, ...]
    num_classes: int
    folds: list[str]
    networks: list[nn.Module] = field(repr=False)
    trainer_name: str = "nnUNetTrainer"

    def to(self, device: torch.device) -> Model:
        """Move the networks to ``device`` (in place) and return self."""
        self.networks = [net.to(device) for net in self.networks]
        return self

    @property
    def n_parameters(self) -> int:
        """Parameters of one network."""
        return sum(p.numel() for p in self.networks[0].parameters())


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ModelError(f"model folder {path.parent} has no {path.name}")
    try:
        content = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(content, dict):
        raise ModelError(f"{path} does not hold a JSON object (found {type(content).__name__})")
    return content


def available_folds(folder: Path, checkpoint: str) -> list[str]:
    """Folds of ``folder`` that hold ``checkpoint``.

    Numbered folds are preferred, as nnU-Net's auto-detection does; ``all`` is used only
    when no numbered fold exists.
    """
    numbered = sorted(
        (p.name[len("fold_") :] for p in folder.glob("fold_*") if (p / checkpoint).is_file()),
        key=lambda f: (f == "all", int(f) if f.isdigit() else 0),
    )
    digits = [f for f in numbered if f.isdigit()]
    return digits or [f for f in numbered if f == "all"]


def resolve_configuration(plans: dict, name: str) -> dict:
    """A configuration with its ``inherits_from`` chain merged, as nnU-Net's PlansManager does."""
    configs = plans.get("configurations", {})
    if not isinstance(configs, dict):
        raise ModelError("plans.json 'configurations' is not an object")
    seen: list[str] = []
    chain = []
    while True:
        if name not in configs:
            raise ModelError(
                f"configuration {name!r} not in plans.json (has: {', '.join(configs) or 'none'})"
            )
        if name in seen:
            raise ModelError(f"circular inherits_from in plans.json: {' -> '.join([*seen, name])}")
        seen.append(name)
        if not isinstance(configs[name], dict):
            raise ModelError(f"configuration {name!r} in plans.json is not an object")
        chain.append(configs[name])
        parent = configs[name].get("inherits_from")
        if parent is None:
            break
        name = parent
    merged: dict = {}
    for config in reversed(chain):
        merged.update(deepcopy(config))
    return merged


def num_segmentation_heads(dataset: dict) -> int:
    """Output channels of the network for ``dataset.json``'s labels (regions unsupported)."""
    labels = dataset.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise ModelError("dataset.json has no 'labels'")
    if any(isinstance(v, list | tuple) for v in labels.values()):
        raise ModelError("region-based models (labels with lists of values) are not supported")
    return len([k for k in labels if k != "ignore"])


def preprocessing_from(plans: dict, config: dict) -> Preprocessing:
    """Read the preprocessing of a resolved configuration from the plans."""
    if plans.get("image_reader_writer", "SimpleITKIO") != "SimpleITKIO":
        raise ModelError(
            f"plans use image reader {plans['image_reader_writer']!r}; only SimpleITKIO is "
            "supported (other readers orient the array differently)"
        )
    schemes = config.get("normalization_schemes", [])
    if len(schemes) != 1:
        raise ModelError(f"expected one input channel, the plans have {len(schemes)}")
    scheme = schemes[0]
    if scheme not in SUPPORTED_NORMALIZATION:
        raise ModelError(f"normalization {scheme!r} is not supported")
    use_mask = bool(config.get("use_mask_for_norm", [False])[0])
    if use_mask and scheme == "ZScoreNormalization":
        raise ModelError("ZScore normalization inside a nonzero mask is not supported")
    props = plans.get("foreground_intensity_properties_per_channel", {}).get("0", {})
    if scheme == "CTNormalization" and not {
        "mean",
        "std",
        "percentile_00_5",
        "percentile_99_5",
    } <= set(props):
        raise ModelError("plans lack the CT intensity properties of channel 0")
    for key in ("resampling_fn_data", "resampling_fn_probabilities"):
        if config.get(key, DEFAULT_RESAMPLING_FN) != DEFAULT_RESAMPLING_FN:
            raise ModelError(f"{key} {config[key]!r} is not supported")
    data_kw = config.get("resampling_fn_data_kwargs", {})
    logit_kw = config.get("resampling_fn_probabilities_kwargs", {})
    forward = _permutation(plans, "transpose_forward")
    backward = _permutation(plans, "transpose_backward")
    if tuple(forward[a] for a in backward) != (0, 1, 2):
        raise ModelError(
            f"plans.json transpose_backward {list(backward)} does not undo "
            f"transpose_forward {list(forward)}"
        )
    return Preprocessing(
        transpose_forward=forward,
        transpose_backward=backward,
        spacing_mm=positive_numbers(config, "spacing", float),
        normalization=scheme,
        intensity=_intensity(props, scheme),
        use_mask_for_norm=use_mask,
        data_order=int(data_kw.get("order", 3)),
        data_order_z=int(data_kw.get("order_z", 0)),
        data_force_separate_z=data_kw.get("force_separate_z"),
        logits_order=int(logit_kw.get("order", 1)),
        logits_order_z=int(logit_kw.get("order_z", 0)),
        logits_force_separate_z=logit_kw.get("force_separate_z"),
    )


def positive_numbers(config: dict, key: str, kind: type = float) -> tuple:
    """Three finite, positive numbers of a configuration (``spacing``, ``patch_size``).

    A zero or NaN here would fail every case later; it is a broken model, found at start.
    """
    values = config.get(key)
    try:
        numbers = tuple(kind(v) for v in values)
        ok = len(numbers) == 3 and all(math.isfinite(v) and v > 0 for v in numbers)
        if kind is int:
            ok = ok and all(float(v) == n for v, n in zip(values, numbers, strict=True))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ModelError(f"plans.json {key} {values!r} is not three positive numbers")
    return numbers


def _permutation(plans: dict, key: str) -> tuple[int, ...]:
    values = plans.get(key, [0, 1, 2])
    try:
        axes = tuple(int(a) for a in values)
    except (TypeError, ValueError):
        axes = ()
    if sorted(axes) != [0, 1, 2]:
        raise ModelError(f"plans.json {key} {values!r} is not an order of the axes 0, 1, 2")
    return axes


def _intensity(props: dict, scheme: str) -> dict[str, float]:
    """The intensity properties as floats; CT normalisation needs them finite and ordered."""
    try:
        values = {k: float(v) for k, v in props.items()}
    except (TypeError, ValueError):
        raise ModelError("plans.json intensity properties of channel 0 are not numbers") from None
    if scheme == "CTNormalization":
        needed = ("mean", "std", "percentile_00_5", "percentile_99_5")
        bad = [k for k in needed if not math.isfinite(values[k])]
        if bad:
            raise ModelError(f"plans.json CT intensity {bad[0]} is {values[bad[0]]:g}")
        if values["std"] < 0 or values["percentile_00_5"] > values["percentile_99_5"]:
            raise ModelError(
                "plans.json CT intensities are inconsistent (std < 0 or the 0.5th "
                "percentile above the 99.5th)"
            )
    return values


#: Where the layers an architecture takes by name (``conv_op``, ``norm_op``,
#: ``dropout_op``, ``nonlin``) are defined in torch: convolutions, norms, dropout and
#: nonlinearities, nothing else of torch.
TORCH_LAYER_MODULES = frozenset(
    {
        "torch.nn.modules.conv",
        "torch.nn.modules.batchnorm",
        "torch.nn.modules.instancenorm",
        "torch.nn.modules.normalization",
        "torch.nn.modules.dropout",
        "torch.nn.modules.activation",
    }
)
#: The package whose modules (architectures and their building blocks) plans may name.
NETWORK_PACKAGE = "dynamic_network_architectures"


class NameRefused(ModelError):
    """A class name in the plans that is not built (nothing it names was called).

    Attributes:
        key: where the name stands (``network_class_name``, ``nonlin``, ...).
        name: the dotted name.
        reason: the message without the predictor's hint (``--allow-network-class``),
            for commands that have no such option.
    """

    def __init__(self, key: str, name: str, why: str) -> None:
        self.key, self.name = key, name
        self.reason = (
            f"plans.json {key} = {name!r} refused unexecuted: {why}; only "
            f"{NETWORK_PACKAGE} architectures and torch.nn layers are built"
        )
        super().__init__(f"{self.reason} (--allow-network-class {name} allows it)")


def network_class(key: str, name: str, allowed: frozenset[str] = frozenset()) -> type[nn.Module]:
    """Resolve a dotted name from plans.json to a class a network may be built from.

    nnU-Net resolves these names with ``pydoc.locate`` and calls the result with the plans'
    arguments, so a hostile plans file could name ``os.system`` as a nonlinearity. Only
    names inside dynamic_network_architectures or torch.nn are imported at all, and what
    they resolve to must be an ``nn.Module`` class defined in that package or in one of
    :data:`TORCH_LAYER_MODULES`. Names in ``allowed`` (the user's extension) are imported
    as given and need only be ``nn.Module`` classes.

    Args:
        key: where the name stands in plans.json (``network_class_name``, ``nonlin``, ...).
        name: the dotted name.
        allowed: further dotted names the user trusts.

    Raises:
        ModelError: the name is refused (nothing named by it was called) or not found.
    """
    extra = name in allowed
    if not extra and not name.startswith(("torch.nn.", f"{NETWORK_PACKAGE}.")):
        raise NameRefused(key, name, "outside the packages a network is built from")
    try:
        located = pydoc.locate(name)
    except pydoc.ErrorDuringImport as err:
        raise ModelError(f"{key} = {name} in plans.json cannot be imported ({err.value})") from None
    if located is None:
        raise ModelError(f"{key} = {name} in plans.json cannot be imported")
    if not (isinstance(located, type) and issubclass(located, nn.Module)):
        raise NameRefused(key, name, "not a torch.nn.Module class")
    home = located.__module__
    if not extra and not (home in TORCH_LAYER_MODULES or home.startswith(f"{NETWORK_PACKAGE}.")):
        raise NameRefused(key, name, f"defined in {home}, which is not a network or layer module")
    return located


def resolve_architecture(
    config: dict, allowed: frozenset[str] = frozenset()
) -> tuple[type[nn.Module], dict[str, Any]]:
    """The architecture class and its arguments, every name checked by :func:`network_class`.

    Args:
        config: a resolved configuration of plans.json.
        allowed: dotted names the user trusts beyond the built-in allowlist.

    Returns:
        ``(class, arch_kwargs)`` with the names of ``_kw_requires_import`` resolved.

    Raises:
        ModelError: no architecture, or a name refused (:class:`NameRefused`) or not found.
    """
    arch = config.get("architecture")
    if not arch:
        raise ModelError("plans.json configuration has no 'architecture' (plans older than v2.4?)")
    if not isinstance(arch, dict) or not isinstance(arch.get("arch_kwargs"), dict):
        raise ModelError("plans.json architecture has no 'arch_kwargs' object")
    cls = network_class("network_class_name", str(arch.get("network_class_name")), allowed)
    kwargs = dict(arch["arch_kwargs"])
    requires_import = arch.get("_kw_requires_import", [])
    if not isinstance(requires_import, list):
        raise ModelError("plans.json architecture _kw_requires_import is not a list")
    for name in requires_import:
        if kwargs.get(name) is not None:
            kwargs[name] = network_class(str(name), str(kwargs[name]), allowed)
    return cls, kwargs


def build_network(
    config: dict,
    num_input_channels: int,
    num_classes: int,
    allowed: frozenset[str] = frozenset(),
) -> nn.Module:
    """Instantiate the configuration's architecture on the meta device (no weights yet).

    Building on ``meta`` skips the random initialisation that nnU-Net runs and then
    overwrites with the checkpoint; the weights are assigned by :func:`load_weights`.
    Every class the plans name is checked by :func:`network_class` before it is called.

    Args:
        config: a resolved configuration of plans.json.
        num_input_channels: image channels.
        num_classes: segmentation heads.
        allowed: dotted names the user trusts beyond the built-in allowlist.
    """
    cls, kwargs = resolve_architecture(config, allowed)
    kwargs["deep_supervision"] = False
    try:
        with torch.device("meta"):
            net = cls(input_channels=num_input_channels, num_classes=num_classes, **kwargs)
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, AssertionError) as err:
        # a missing or malformed architecture argument
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ModelError(f"plans.json architecture cannot be built: {detail}") from None
    return net


def checkpoint_globals() -> list:
    """What an nnU-Net v2 checkpoint holds besides what ``weights_only`` loading allows.

    Found by loading real ones (an exported model, a training step's checkpoint_final and
    checkpoint_best, saved on CPU and GPU): ``torch.serialization``'s default allow-list
    covers tensors, containers, numbers, strings and ``torch.device`` (``init_args``);
    the logged metrics and ``_best_ema`` are numpy scalars (float32, float64), which need
    numpy's scalar constructor, ``numpy.dtype`` and the dtype's class (``Float32DType``,
    whose state is set on unpickling). numpy 2 pickles the constructor as
    ``numpy._core.multiarray.scalar``, numpy 1 as ``numpy.core.multiarray.scalar``;
    both names map to the same function. None of these can run code: a scalar is built
    from a dtype and raw bytes. The dtype classes of all numeric types are allowed.
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


def load_checkpoint(path: Path, mmap: bool = False) -> dict[str, Any]:
    """Load an nnU-Net checkpoint onto the CPU (works for checkpoints saved on a GPU).

    Unpickling runs whatever callable a pickle names, so only torch's ``weights_only``
    loader is used, with :func:`checkpoint_globals` added to what it allows.

    Args:
        path: the ``.pth`` file.
        mmap: map the tensors' storage instead of reading it (to inspect bookkeeping only).

    Raises:
        ModelError: the file is missing or damaged, or names anything else (one line that
            names the file and what it asked for); nothing of it is executed.
    """
    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals(checkpoint_globals()):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):
            raise ModelError(f"checkpoint {path} cannot be read (damaged pickle: {err})") from None
        found = re.search(r"GLOBAL ([\w.]+)|got <class '([\w.]+)'>", str(err))
        what = next((g for g in found.groups() if g), "code") if found else "code"
        raise ModelError(
            f"checkpoint {path} refused: it asks for {what}, which an nnU-Net checkpoint "
            "does not hold (loading it could run code)"
        ) from None
    except Exception as err:
        detail = str(err).splitlines()[0] if str(err) else ""
        raise ModelError(
            f"checkpoint {path} cannot be read ({type(err).__name__}: {detail})"
        ) from None
    if not isinstance(checkpoint, dict):
        raise ModelError(f"{path} is not an nnU-Net checkpoint (not a dictionary)")
    return checkpoint


def load_weights(net: nn.Module, state: dict[str, torch.Tensor], source: str) -> nn.Module:
    """Assign checkpoint weights to a meta-device network; explain a plans/checkpoint mismatch."""
    try:
        net.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        detail = next(
            (ln.strip() for ln in str(err).splitlines() if "size mismatch" in ln or "key" in ln),
            str(err).splitlines()[0],
        )
        raise ModelError(f"{source} does not match plans.json: {detail}") from None
    leftover = [n for n, t in [*net.named_parameters(), *net.named_buffers()] if t.is_meta]
    if leftover:
        raise ModelError(f"{source} lacks weights for {leftover[0]}")
    return net.eval()


def load_model(
    folder: str | Path,
    folds: Sequence[str] | None = None,
    checkpoint: str = "checkpoint_final.pth",
    allowed_classes: Sequence[str] = (),
) -> Model:
    """Load a model folder: plans, dataset, one network per fold.

    Args:
        folder: an nnU-Net v2 results folder.
        folds: folds to load (``"0"``..``"4"``, ``"all"``); None for every available fold.
        checkpoint: checkpoint file name in each fold folder.
        allowed_classes: dotted class names plans.json may name beyond the built-in
            allowlist (see :func:`network_class`).

    Raises:
        ModelError: the folder is missing, incomplete or inconsistent.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(f"model folder {folder} does not exist")
    plans = _read_json(folder / "plans.json")
    dataset = _read_json(folder / "dataset.json")
    if folds is None or len(folds) == 0:
        folds = available_folds(folder, checkpoint)
        if not folds:
            raise ModelError(f"no fold_*/{checkpoint} in {folder}")
    folds = [str(f) for f in folds]
    num_classes = num_segmentation_heads(dataset)
    n_channels = len(dataset.get("channel_names", dataset.get("modality", {"0": "CT"})))

    networks, configuration, config, trainer = [], None, None, "nnUNetTrainer"
    for fold in folds:
        path = folder / f"fold_{fold}" / checkpoint
        ckpt = load_checkpoint(path)
        if not isinstance(ckpt.get("network_weights"), dict):
            raise ModelError(f"{path} is not an nnU-Net checkpoint (no network_weights)")
        init_args = ckpt.get("init_args")
        name = init_args.get("configuration") if isinstance(init_args, dict) else None
        if name is None:
            raise ModelError(f"{path} does not record its configuration")
        if configuration is None:
            configuration, trainer = name, ckpt.get("trainer_name", trainer)
            config = resolve_configuration(plans, configuration)
            # a broken plans file fails here, before any network is built
            preprocessing = preprocessing_from(plans, config)
            patch_size = positive_numbers(config, "patch_size", int)
        elif name != configuration:
            raise ModelError(f"folds of {folder} use different configurations")
        net = build_network(config, n_channels, num_classes, frozenset(allowed_classes))
        networks.append(load_weights(net, ckpt["network_weights"], str(path)))
        del ckpt

    return Model(
        folder=folder,
        configuration=configuration,
        preprocessing=preprocessing,
        patch_size=patch_size,
        num_classes=num_classes,
        folds=folds,
        networks=networks,
        trainer_name=trainer,
    )
