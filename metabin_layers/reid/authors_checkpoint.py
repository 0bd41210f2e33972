"""Load the MetaBIN authors' released models (their fast-reid checkpoint layout) into ``ReIDModel``.

Their checkpoints are ``{"model": state_dict, ...}`` with keys

* ``backbone.<path>``: ResNet-50 (``conv1``, ``bn1``, ``layerS.B.{conv,bn}{1,2,3}``,
  ``layerS.0.downsample.{conv,bn}``) or their MobileNetV2 x1.4 (``layer1`` .. ``layer9``);
* a MetaBIN layer as ``<path>.bat_n.*`` (BN branch and running statistics), ``<path>.ins_n.*``
  (IN affine) and ``<path>.gate`` (rho); a BIN_gate1 layer as a BatchNorm plus ``<path>.gate``;
* ``heads.classifier_norm.*`` (the BN neck), ``heads.classifier_fc.weight`` (the classifier) and the
  input normalisation buffers ``pixel_mean`` / ``pixel_std`` (ImageNet mean / std x 255; our
  transforms normalise the same way, so they are checked and dropped).

``load_authors_checkpoint`` maps these names onto ours and loads strictly.

Examples:
    >>> from metabin_layers.reid.authors_checkpoint import authors_key_to_recipe
    >>> authors_key_to_recipe("backbone.layer1.0.downsample.bn.bat_n.running_var")
    'backbone.layer1.0.downsample.1.running_var'
    >>> authors_key_to_recipe("heads.classifier_norm.weight"), authors_key_to_recipe("backbone.bn1.gate")
    ('neck.weight', 'backbone.bn1.rho')
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor

from ..layers import AUTHORS_LAYER_KEYS
from .config import TrainConfig
from .errors import CheckpointError
from .model import MOBILENETV2_X1_4, ReIDModel
from .transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "authors_key_to_recipe",
    "authors_state_dict_to_recipe",
    "is_authors_checkpoint",
    "load_authors_checkpoint",
    "evaluate_authors_checkpoint",
]

_CLASSIFIER = "heads.classifier_fc.weight"
_SUFFIXES = AUTHORS_LAYER_KEYS  # a MetaBIN layer's sub-modules -> our flat names


def authors_key_to_recipe(key: str) -> str:
    """One key of the authors' layout -> the ``ReIDModel`` key.

    Args:
        key: A state-dict key of the authors' checkpoint.

    Returns:
        The matching ``ReIDModel`` state-dict key (unchanged where the names agree).

    Examples:
        >>> from metabin_layers.reid.authors_checkpoint import authors_key_to_recipe
        >>> authors_key_to_recipe("backbone.layer1.0.bn1.ins_n.weight")
        'backbone.layer1.0.bn1.in_weight'
        >>> authors_key_to_recipe("heads.classifier_fc.weight")
        'classifier.weight'
    """
    if key.startswith("heads.classifier_norm."):
        return "neck." + key[len("heads.classifier_norm.") :]
    if key.startswith("heads.classifier_fc."):
        return "classifier." + key[len("heads.classifier_fc.") :]
    key = re.sub(r"\.downsample\.conv\.", ".downsample.0.", key)
    key = re.sub(r"\.downsample\.bn\.", ".downsample.1.", key)
    for theirs, ours in _SUFFIXES:
        if key.endswith("." + theirs):
            return key[: -len(theirs)] + ours
    return key


def _unwrap(state: Any) -> dict[str, Tensor]:
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ValueError(f"expected a state dict or a dict holding one under 'model', got {type(state).__name__}")
    return state


def is_authors_checkpoint(checkpoint: Any) -> bool:
    """True when ``checkpoint`` (a loaded checkpoint, or a file) is in the authors' layout.

    A file is read with ``weights_only=True``; one that needs more than tensors (e.g. the recipe's
    own training checkpoints, which hold RNG states) is not theirs.

    Args:
        checkpoint: A loaded checkpoint (a state dict, or a dict holding one under ``model``) or a
            file path.

    Returns:
        Whether it holds the authors' classifier key ``heads.classifier_fc.weight``.

    Examples:
        >>> import torch
        >>> from metabin_layers.reid.authors_checkpoint import is_authors_checkpoint
        >>> is_authors_checkpoint({"model": {"heads.classifier_fc.weight": torch.zeros(3, 8)}})
        True
        >>> is_authors_checkpoint({"classifier.weight": torch.zeros(3, 8)})
        False
    """
    if isinstance(checkpoint, (str, Path)):
        try:
            checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except Exception:  # unpickling refused: not a plain tensor checkpoint
            return False
    try:
        return _CLASSIFIER in _unwrap(checkpoint)
    except ValueError:
        return False


def authors_state_dict_to_recipe(state: Any) -> dict[str, Tensor]:
    """The authors' state dict (or checkpoint) with our key names; ``pixel_mean``/``pixel_std`` checked and dropped.

    Args:
        state: The authors' state dict, or their checkpoint holding it under ``model``.

    Returns:
        The state dict with ``ReIDModel`` key names (``authors_key_to_recipe``).

    Raises:
        ValueError: If ``state`` holds no state dict, or ``pixel_mean`` / ``pixel_std`` are not
            ImageNet's mean / std x 255.

    Examples:
        >>> import torch
        >>> from metabin_layers.reid.authors_checkpoint import authors_state_dict_to_recipe
        >>> theirs = {"backbone.bn1.gate": torch.ones(4), "pixel_mean": torch.tensor([123.675, 116.28, 103.53])}
        >>> list(authors_state_dict_to_recipe({"model": theirs}))
        ['backbone.bn1.rho']
    """
    state = _unwrap(state)
    for name, values in (("pixel_mean", IMAGENET_MEAN), ("pixel_std", IMAGENET_STD)):
        if name in state:
            expected = torch.tensor(values, dtype=torch.float64) * 255
            if not torch.allclose(state[name].double().flatten(), expected, atol=1e-3):
                raise ValueError(f"{name} is {state[name].flatten().tolist()}, expected ImageNet {expected.tolist()}")
    return {authors_key_to_recipe(k): v for k, v in state.items() if k not in ("pixel_mean", "pixel_std")}


def _architecture(state: dict[str, Tensor]) -> tuple[str, str]:
    if "backbone.layer9.conv.weight" in state:
        backbone = MOBILENETV2_X1_4
    elif "backbone.layer4.0.conv3.weight" in state and "backbone.layer3.5.conv1.weight" in state:
        if "backbone.layer3.6.conv1.weight" in state:
            raise ValueError("the checkpoint's ResNet has more than 6 blocks in layer3: only ResNet-50 is supported")
        backbone = "resnet50"
    else:
        raise ValueError("unknown backbone: expected the authors' ResNet-50 or MobileNetV2 x1.4 keys")
    if any(".bat_n." in k for k in state):
        norm = "metabin"
    elif any(k.endswith(".gate") for k in state):
        norm = "bin-gate1"  # one affine + gate (BIN_gate1; rho fixed at evaluation)
    else:
        norm = "bn"
    return backbone, norm


def load_authors_checkpoint(path: Union[str, Path], device: Optional[torch.device] = None) -> ReIDModel:
    """Build the ``ReIDModel`` of an authors' checkpoint and load it strictly.

    Backbone (ResNet-50 or MobileNetV2 x1.4), normalization (MetaBIN, BIN_gate1 or BN) and the
    number of classes are read from the keys. ``torch.load(weights_only=True)``: tensors only.

    Args:
        path: The checkpoint file (``{"model": state_dict, ...}`` or a bare state dict).
        device: Where the model goes; ``None``: CPU.

    Returns:
        The model, in eval mode.

    Raises:
        CheckpointError: If the file is not in the authors' layout, its backbone is not supported
            or a tensor does not fit (a ``ValueError``; one line naming the file).

    Examples:
        >>> import os, tempfile, torch
        >>> from metabin_layers.reid.authors_checkpoint import load_authors_checkpoint
        >>> from metabin_layers.reid.model import ReIDModel
        >>> ours = ReIDModel("mobilenetv2_x1_4", num_classes=3, norm="bn").state_dict()
        >>> theirs = {
        ...     k.replace("neck.", "heads.classifier_norm.").replace("classifier.", "heads.classifier_fc."): v
        ...     for k, v in ours.items()
        ... }
        >>> path = os.path.join(tempfile.mkdtemp(), "model_final.pth")
        >>> torch.save({"model": theirs}, path)
        >>> model = load_authors_checkpoint(path)
        >>> model.norm, model.classifier.out_features, model.training
        ('bn', 3, False)
    """
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
        theirs = _unwrap(raw)
        if _CLASSIFIER not in theirs:
            raise ValueError(f"not in the authors' layout (no {_CLASSIFIER!r})")
        backbone, norm = _architecture(theirs)
        state = authors_state_dict_to_recipe(theirs)
        model = ReIDModel(backbone, num_classes=int(theirs[_CLASSIFIER].shape[0]), norm=norm, last_stride=1)
        own = model.state_dict()
        for key in own.keys() - state.keys():
            if key.endswith("num_batches_tracked"):  # theirs may not save the counter
                state[key] = torch.zeros((), dtype=torch.long)
            elif key.endswith(("in_weight", "in_bias")) and norm == "bin-gate1":  # tied: the BN affine
                state[key] = state[key.replace(".in_", ".")]
        model.load_state_dict(state, strict=True)
    except CheckpointError:
        raise
    except (ValueError, RuntimeError, KeyError, TypeError, AttributeError, IndexError) as err:
        raise CheckpointError(f"checkpoint {path}: {_one_line(err)}") from err
    return model.to(device or "cpu").eval()


def _one_line(err: BaseException) -> str:
    """The first line of ``err`` and, for a strict load, the first tensor named in its report."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    first = lines[0].rstrip(":")
    return f"{first}: {lines[1]}" if len(lines) > 1 and first.startswith("Error(s) in loading state_dict") else first


def evaluate_authors_checkpoint(path: Union[str, Path], cfg: TrainConfig) -> dict[str, Any]:
    """Evaluate an authors' checkpoint on ``cfg``'s targets with our evaluator; writes ``results.json``,
    ``results.md``, the CMC plot and the ranked-retrieval picture.

    Args:
        path: The authors' checkpoint file (``load_authors_checkpoint``).
        cfg: The recipe configuration: its target data sets, evaluation settings, ``device`` and
            ``output`` folder (where ``results.json`` is written).

    Returns:
        The results written: configuration, checkpoint path and layout, norm and per-target metrics
        under ``"targets"``.

    Examples:
        >>> from metabin_layers.reid.authors_checkpoint import evaluate_authors_checkpoint  # doctest: +SKIP
        >>> from metabin_layers.reid.config import load_config  # doctest: +SKIP
        >>> cfg = load_config(overrides={"data_root": "datasets"})  # doctest: +SKIP
        >>> evaluate_authors_checkpoint("DG-resnet/model_final.pth", cfg)["targets"]["grid"]["rank1"]  # doctest: +SKIP
    """
    from .checks import check_images, check_targets
    from .data import build_data
    from .report import write_results
    from .train import _device, evaluate_model, precise_bn, replacing_results
    from .visualize import save_ranked_pictures

    device = _device(cfg.device)
    model = load_authors_checkpoint(path, device)  # refused before any data is read or folder made
    data = build_data(cfg)
    check_targets(data)
    check_images(data)
    precise = precise_bn(model, data, cfg, device)
    distances: dict[str, dict[str, Any]] = {}
    metrics = evaluate_model(model, data, cfg, device, distances=distances)
    out = Path(cfg.output)
    results = {
        "config": cfg.to_dict(),
        "checkpoint": str(path),
        "checkpoint_layout": "authors",
        "seed": cfg.seed,
        "norm": model.norm,
        "iterations": None,
        "targets": metrics,
        "precise_bn_batches": precise,
    }
    with replacing_results(out):  # an earlier evaluation there stays until this one is written
        write_results(results, out)
        save_ranked_pictures(distances, out, f"{model.norm} checkpoint")
    print(f"Results and plots: {out}", flush=True)
    return results
