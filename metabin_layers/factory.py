"""Build MetaBIN layers by name, and hand them to model constructors as ``norm_layer``.

Names are case-insensitive, ``_`` and ``-`` are ignored (as in timm):

| name | layer |
|---|---|
| ``metabin``, ``metabin2d`` | ``MetaBIN2d`` |
| ``metabin1d`` | ``MetaBIN1d`` |
| ``metabin3d`` | ``MetaBIN3d`` |
| ``metabinact2d`` | ``MetaBINAct2d`` |
| ``syncmetabin`` | ``SyncMetaBIN`` (norm-only models) |
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable, Union

from torch import nn

from .layers import MetaBIN1d, MetaBIN2d, MetaBIN3d, MetaBINAct2d

__all__ = ["NORM_LAYERS", "get_norm_layer", "create_norm_layer"]

NORM_LAYERS = ("metabin", "metabin1d", "metabin2d", "metabin3d", "metabinact2d", "syncmetabin")
"""The names ``get_norm_layer`` and ``create_norm_layer`` know."""


def _layer_class(name: str) -> type[nn.Module]:
    key = name.replace("_", "").replace("-", "").lower()
    if key == "syncmetabin":
        from .distributed import SyncMetaBIN  # only who asks for it imports the distributed module

        return SyncMetaBIN
    classes: dict[str, type[nn.Module]] = {
        "metabin": MetaBIN2d,
        "metabin1d": MetaBIN1d,
        "metabin2d": MetaBIN2d,
        "metabin3d": MetaBIN3d,
        "metabinact2d": MetaBINAct2d,
    }
    if key not in classes:
        raise ValueError(f"unknown norm layer {name!r}; expected one of {NORM_LAYERS}")
    return classes[key]


def _teach_timm() -> None:
    """Let timm's ``get_norm_act_layer`` turn ``MetaBIN2d`` into ``MetaBINAct2d``, as it turns
    ``nn.BatchNorm2d`` into ``BatchNormAct2d``.

    Models such as EfficientNet and MobileNetV3 ask timm for the norm + activation counterpart of
    their ``norm_layer`` and bind their own activation to it; timm finds that counterpart in its
    tables, so MetaBIN is added to them. Nothing happens while timm is not imported.
    """
    tables = sys.modules.get("timm.layers.create_norm_act")
    if tables is None:
        return
    to_norm_act = getattr(tables, "_NORM_TO_NORM_ACT_MAP", None)
    norm_act_types = getattr(tables, "_NORM_ACT_TYPES", None)
    requires_act = getattr(tables, "_NORM_ACT_REQUIRES_ARG", None)
    if not (isinstance(to_norm_act, dict) and isinstance(norm_act_types, set) and isinstance(requires_act, set)):
        return  # another timm layout: norm + act models then report the layer themselves
    to_norm_act.setdefault(MetaBIN2d.__name__.lower(), MetaBINAct2d)
    norm_act_types.add(MetaBINAct2d)
    requires_act.add(MetaBINAct2d)


def get_norm_layer(name: str, **kwargs: Any) -> Union[type[nn.Module], Callable[..., nn.Module]]:
    """The MetaBIN layer class called ``name``, with ``kwargs`` bound: what a model takes as ``norm_layer``.

    Pass the result to any constructor that builds its normalization as ``norm_layer(C)``
    (torchvision ResNets, timm ResNets, fast-reid style backbones). When timm is imported (call
    this after ``import timm``), timm is also taught that the norm + activation counterpart of
    ``MetaBIN2d`` is ``MetaBINAct2d``, so timm models that fuse norm and activation
    (EfficientNet, MobileNetV3, ...) build ``MetaBINAct2d`` layers with their own activation.

    Args:
        name: one of ``NORM_LAYERS`` (case-insensitive; ``_`` and ``-`` ignored).
        **kwargs: keyword arguments bound to the layer (``rho_init``, ``eps``, ``momentum``, ...).

    Returns:
        The class, or a ``functools.partial`` of it when ``kwargs`` are given.

    Raises:
        ValueError: ``name`` is not one of ``NORM_LAYERS``.

    Examples:
        >>> import torch
        >>> import torchvision
        >>> from metabin_layers import get_norm_layer
        >>> net = torchvision.models.resnet18(norm_layer=get_norm_layer("metabin", rho_init=0.5))
        >>> type(net.bn1).__name__, net.bn1.rho_init
        ('MetaBIN2d', 0.5)
    """
    cls = _layer_class(name)
    _teach_timm()
    return functools.partial(cls, **kwargs) if kwargs else cls


def create_norm_layer(name: str, num_features: int, **kwargs: Any) -> nn.Module:
    """A MetaBIN layer built by name (fast-reid's ``get_norm(norm, out_channels)``, timm's ``create_norm_layer``).

    Args:
        name: one of ``NORM_LAYERS`` (case-insensitive; ``_`` and ``-`` ignored).
        num_features: number of channels ``C``.
        **kwargs: keyword arguments of the layer (``rho_init``, ``eps``, ``momentum``, ...).

    Returns:
        The layer.

    Raises:
        ValueError: ``name`` is not one of ``NORM_LAYERS``.

    Examples:
        >>> from metabin_layers import create_norm_layer
        >>> create_norm_layer("MetaBIN", 64, rho_init=0.5)
        MetaBIN2d(64, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True, rho_init=0.5)
    """
    return _layer_class(name)(num_features, **kwargs)
