"""Turn the BatchNorm layers of any model into MetaBIN layers."""

from __future__ import annotations

import fnmatch
import sys
import warnings
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .layers import IN_AFFINE_INITS, MetaBIN1d, MetaBIN2d, MetaBIN3d, MetaBINAct2d, _check_rho_init, _MetaBINBase, replace_modules

__all__ = ["convert_bn_to_metabin", "LayerFilter"]

#: A layer selector: a qualified-name pattern (``fnmatch``, e.g. ``"layer4.*"``), or a callable
#: ``(qualified_name, module) -> bool``, or a sequence of those (any match selects).
LayerFilter = Union[str, Callable[[str, nn.Module], bool], Sequence[Union[str, Callable[[str, nn.Module], bool]]]]


def _timm_norm_act_types() -> tuple[type, ...]:
    # A model can only hold timm's layers once timm defined them: look in sys.modules, import nothing.
    norm_act = sys.modules.get("timm.layers.norm_act")
    if norm_act is None:
        return ()
    return tuple(t for t in (getattr(norm_act, "BatchNormAct2d", None), getattr(norm_act, "SyncBatchNormAct", None)) if t)


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
        return MetaBINAct2d  # timm's BatchNormAct2d; its SyncBatchNormAct is synchronised afterwards
    t = type(module)
    if t is nn.BatchNorm1d:
        return MetaBIN1d
    if t is nn.BatchNorm2d:
        return MetaBIN2d
    if t is nn.BatchNorm3d:
        return MetaBIN3d
    if t is nn.SyncBatchNorm:
        # Only a model that already synchronises its BatchNorm imports the distributed module.
        from .distributed import SyncMetaBIN  # any input dimensionality, as nn.SyncBatchNorm

        return SyncMetaBIN
    return None


def _convert_one(bn: _BatchNorm, cls: type[_MetaBINBase], rho_init: float, in_affine_init: str) -> _MetaBINBase:
    ref = bn.weight if bn.weight is not None else bn.running_mean
    factory: dict[str, Any] = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}
    config = (bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    new: _MetaBINBase
    if cls is MetaBINAct2d:
        act, drop = getattr(bn, "act", None), getattr(bn, "drop", None)
        new = MetaBINAct2d(*config, act_layer=act, drop_layer=drop, rho_init=rho_init, in_affine_init=in_affine_init, **factory)
    else:
        # The layer keeps rho_init and in_affine_init: loading a BatchNorm state dict fills the same way.
        new = cls(*config, rho_init=rho_init, in_affine_init=in_affine_init, **factory)
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
    if isinstance(bn, nn.SyncBatchNorm):  # stays synchronised, over the same process group
        from .distributed import SyncMetaBIN, convert_sync_metabin

        if isinstance(new, SyncMetaBIN):
            new.process_group = bn.process_group
        else:  # timm's SyncBatchNormAct: a MetaBINAct2d made synchronised, keeping act and drop
            new = convert_sync_metabin(new, bn.process_group)  # type: ignore[assignment]
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
            authors' default (``LOAD_IN_AFFINE=False``). The new layers keep ``rho_init`` and
            ``in_affine_init``: loading a BatchNorm state dict into them later
            (``load_state_dict``, strict) fills ``rho`` and the IN affine the same way.
        strict: raise instead of warning when nothing was converted.
        sync: shorthand for ``convert_sync_metabin(convert_bn_to_metabin(module, ...), process_group)``:
            every MetaBIN layer synchronises its BN-branch statistics over the process group
            (multi-GPU training; see ``docs/distributed.md``). Composing the two converters says
            the same and is the preferred spelling.
        process_group: the group ``sync`` synchronises over; None is the default group.

    Returns:
        ``module`` (or the new root layer when ``module`` itself is a BatchNorm).

    Examples:
        >>> from torch import nn
        >>> from metabin_layers import convert_bn_to_metabin
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(1), nn.BatchNorm1d(8 * 6 * 6))
        >>> model = convert_bn_to_metabin(model, exclude="4")  # keep the last BatchNorm (a BNNeck, say)
        >>> type(model[1]).__name__, type(model[4]).__name__
        ('MetaBIN2d', 'BatchNorm1d')
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
        from .distributed import convert_sync_metabin

        result = convert_sync_metabin(result, process_group)
    return result
