"""Turn the BatchNorm layers of any model into MetaBIN layers, and find them again."""

from __future__ import annotations

import fnmatch
import sys
import warnings
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ._tree import replace_modules
from .distributed import SyncMetaBIN, convert_sync_metabin
from .layers import MetaBIN1d, MetaBIN2d, MetaBIN3d, MetaBINAct2d, _check_rho_init, _MetaBINBase

__all__ = [
    "convert_bn_to_metabin",
    "metabin_modules",
    "rho_parameters",
    "base_parameters",
    "LayerFilter",
]

#: A layer selector: a qualified-name pattern (``fnmatch``, e.g. ``"layer4.*"``), or a callable
#: ``(qualified_name, module) -> bool``, or a sequence of those (any match selects).
LayerFilter = Union[str, Callable[[str, nn.Module], bool], Sequence[Union[str, Callable[[str, nn.Module], bool]]]]

IN_AFFINE_INITS = ("copy", "identity")


def _timm_norm_act_types() -> tuple[type, ...]:
    # Only look timm up if the user imported it: a model cannot hold timm layers otherwise.
    if "timm" not in sys.modules:
        return ()
    try:
        from timm.layers import BatchNormAct2d, SyncBatchNormAct
    except ImportError:  # pragma: no cover - very old timm
        return ()
    return (BatchNormAct2d, SyncBatchNormAct)


def _matches(selector: Optional[LayerFilter], name: str, module: nn.Module) -> bool:
    if selector is None:
        return False
    if isinstance(selector, str) or callable(selector):
        selector = [selector]
    for s in selector:
        if isinstance(s, str):
            if fnmatch.fnmatchcase(name, s):
                return True
        elif callable(s):
            if s(name, module):
                return True
        else:
            raise TypeError(f"include/exclude entries must be name patterns or callables, got {type(s).__name__}")
    return False


def _target_class(module: nn.Module, norm_act: tuple[type, ...]) -> Optional[type[_MetaBINBase]]:
    if norm_act and isinstance(module, norm_act):
        # timm's SyncBatchNormAct stays synchronised (see _convert_one).
        return MetaBINAct2d
    t = type(module)
    if t is nn.BatchNorm1d:
        return MetaBIN1d
    if t is nn.BatchNorm2d:
        return MetaBIN2d
    if t is nn.SyncBatchNorm:
        # Synchronised as before, over the same process group; like SyncBatchNorm, SyncMetaBIN
        # takes inputs of any dimensionality ((N, C) to (N, C, D, H, W)).
        return SyncMetaBIN
    if t is nn.BatchNorm3d:
        return MetaBIN3d
    return None


def _convert_one(bn: _BatchNorm, cls: type[_MetaBINBase], rho_init: float, in_affine_init: str) -> _MetaBINBase:
    ref = bn.weight if bn.weight is not None else bn.running_mean
    factory: dict[str, Any] = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}
    if cls is MetaBINAct2d:
        new: _MetaBINBase = cls(
            bn.num_features,
            bn.eps,
            bn.momentum,
            bn.affine,
            bn.track_running_stats,
            act_layer=getattr(bn, "act", None),
            drop_layer=getattr(bn, "drop", None),
            rho_init=rho_init,
            **factory,
        )
    else:
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, rho_init=rho_init, **factory)
        if isinstance(new, SyncMetaBIN):
            new.process_group = getattr(bn, "process_group", None)
    with torch.no_grad():
        if bn.affine:
            # Share the Parameter objects: device, dtype, requires_grad and optimizer references
            # survive, as in torch.nn.SyncBatchNorm.convert_sync_batchnorm.
            new.weight = bn.weight  # type: ignore[assignment]
            new.bias = bn.bias  # type: ignore[assignment]
            in_w, in_b = new.in_weight, new.in_bias
            assert in_w is not None and in_b is not None  # affine
            if in_affine_init == "copy":
                in_w.copy_(bn.weight)
                in_b.copy_(bn.bias)
            in_w.requires_grad_(bn.weight.requires_grad)
            in_b.requires_grad_(bn.bias.requires_grad)
        if bn.track_running_stats:
            # Shared buffers: the state-dict keys and the statistics stay those of the BN.
            new.running_mean = bn.running_mean  # type: ignore[assignment]
            new.running_var = bn.running_var  # type: ignore[assignment]
            new.num_batches_tracked = bn.num_batches_tracked  # type: ignore[assignment]
    new.train(bn.training)
    if hasattr(bn, "qconfig"):
        new.qconfig = bn.qconfig  # type: ignore[assignment]
    if cls is MetaBINAct2d and isinstance(bn, nn.SyncBatchNorm):  # timm's SyncBatchNormAct
        return convert_sync_metabin(new, getattr(bn, "process_group", None))  # type: ignore[return-value]
    return new


def convert_bn_to_metabin(
    module: nn.Module,
    rho_init: float = 1.0,
    include: Optional[LayerFilter] = None,
    exclude: Optional[LayerFilter] = None,
    in_affine_init: str = "copy",
    strict: bool = False,
    sync: bool = False,
    process_group: Optional[object] = None,
) -> nn.Module:
    """Replace the BatchNorm layers of ``module`` by MetaBIN layers, recursively.

    Converted: ``nn.BatchNorm1d/2d/3d``, timm's ``BatchNormAct2d`` (to ``MetaBINAct2d``,
    keeping ``act`` and ``drop``), and the synchronised layers to synchronised MetaBIN layers over
    the same ``process_group``: ``nn.SyncBatchNorm`` to
    ``SyncMetaBIN`` (any input dimensionality, as SyncBatchNorm)
    and timm's ``SyncBatchNormAct`` to ``SyncMetaBIN`` with its ``act`` and ``drop``.
    Deliberately skipped: frozen BatchNorm (torchvision ``FrozenBatchNorm2d``, timm
    ``FrozenBatchNormAct2d``: fixed statistics are a choice of the model's author, and they have no
    batch branch to mix), other ``_BatchNorm`` subclasses such as timm's ``SplitBatchNorm2d`` (their
    extra behaviour would be lost silently; a warning names them), and LayerNorm / GroupNorm /
    InstanceNorm (no batch statistics).

    Like ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` the BN ``weight``/``bias`` Parameters and
    the running buffers are shared with the new layer (not copied), so device, dtype,
    ``requires_grad`` and existing optimizer references are kept, and the state-dict keys of the
    original stay valid. ``eps``, ``momentum`` (``None`` too), ``affine``, ``track_running_stats``
    and the training flag are copied.

    Args:
        module: the model (converted in place; the root itself is replaced when it is a BN).
        rho_init: initial rho; 1.0 (the paper's default) makes the converted model compute exactly
            what the original computes, in train and eval mode.
        include: convert only layers matching this selector (qualified-name pattern, predicate
            ``(name, module) -> bool``, or a sequence of them). None converts every BN.
        exclude: never convert layers matching this selector (e.g. ``"neck.*"`` for a BNNeck,
            which the paper keeps as plain BN).
        in_affine_init: ``"copy"`` (default) starts the IN affine as a copy of the BN affine, so
            both branches produce outputs at the scale the network was trained for and a small step
            of rho changes the function smoothly; ``"identity"`` starts it at weight 1 / bias 0, the
            authors' default (``LOAD_IN_AFFINE=False``).
        strict: raise instead of warning when nothing was converted.
        sync: then make every MetaBIN layer of the model a synchronised one
            (``convert_sync_metabin``: BN-branch statistics over
            the whole process group, for multi-GPU training; see ``docs/distributed.md``).
        process_group: the group ``sync`` synchronises over; None is the default group.

    Returns:
        ``module`` (or the new root layer when ``module`` itself is a BatchNorm).

    Examples:
        >>> import torchvision
        >>> model = convert_bn_to_metabin(torchvision.models.resnet18(), exclude="fc")
        >>> len(metabin_modules(model))
        20
    """
    _check_rho_init(rho_init)
    if process_group is not None and not sync:
        raise ValueError("process_group is only used with sync=True")
    if in_affine_init not in IN_AFFINE_INITS:
        raise ValueError(f"in_affine_init must be one of {IN_AFFINE_INITS}, got {in_affine_init!r}")
    norm_act = _timm_norm_act_types()
    converted = 0
    skipped: list[str] = []

    def convert(name: str, mod: nn.Module) -> Optional[nn.Module]:
        nonlocal converted
        if not isinstance(mod, _BatchNorm):
            return None  # descend
        cls = _target_class(mod, norm_act)
        if cls is None:
            skipped.append(f"{name or '<root>'} ({type(mod).__name__})")
        elif (include is None or _matches(include, name, mod)) and not _matches(exclude, name, mod):
            converted += 1
            return _convert_one(mod, cls, rho_init, in_affine_init)
        return mod

    result = replace_modules(module, convert)
    if skipped:
        warnings.warn(
            "convert_bn_to_metabin left these BatchNorm subclasses unconverted (unknown behaviour "
            f"would be lost): {', '.join(skipped)}",
            stacklevel=2,
        )
    if converted == 0:
        msg = f"convert_bn_to_metabin found no BatchNorm layer to convert in {type(module).__name__}"
        if strict:
            raise ValueError(msg)
        warnings.warn(msg + "; the model is returned unchanged", stacklevel=2)
    if sync:
        result = convert_sync_metabin(result, process_group)
    return result


def metabin_modules(model: nn.Module) -> list[_MetaBINBase]:
    """All MetaBIN layers of ``model``, in ``model.modules()`` order.

    Args:
        model: any module.

    Returns:
        The MetaBIN layers (plain and synchronised), each once.

    Examples:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), MetaBIN2d(8), nn.ReLU())
        >>> [type(m).__name__ for m in metabin_modules(model)]
        ['MetaBIN2d']
    """
    return [m for m in model.modules() if isinstance(m, _MetaBINBase)]


def rho_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The ``rho`` Parameters of every MetaBIN layer (each once, in module order).

    Args:
        model: any module.

    Returns:
        The ``rho`` Parameters: what ``MetaBINOptimizer`` meta-learns.

    Examples:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), MetaBIN2d(8))
        >>> [p.shape for p in rho_parameters(model)]
        [torch.Size([8])]
    """
    seen: set[int] = set()
    out = []
    for m in metabin_modules(model):
        if id(m.rho) not in seen:
            seen.add(id(m.rho))
            out.append(m.rho)
    return out


def base_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter of ``model`` except the MetaBIN ``rho`` (what the base optimizer steps).

    Args:
        model: any module.

    Returns:
        Every Parameter of ``model`` that is not a ``rho``, in ``model.parameters()`` order.

    Examples:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), MetaBIN2d(8))
        >>> opt = torch.optim.SGD(base_parameters(model), lr=0.01)
        >>> len(base_parameters(model))  # conv weight and bias, BN and IN affines
        6
    """
    rho_ids = {id(p) for p in rho_parameters(model)}
    return [p for p in model.parameters() if id(p) not in rho_ids]
