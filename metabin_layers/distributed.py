"""Synchronised MetaBIN layers for multi-GPU and multi-node training on ``torch.distributed``.

``SyncMetaBIN`` is to the MetaBIN layers what ``torch.nn.SyncBatchNorm`` is to BatchNorm: in
training its BN branch normalises with the statistics of the *global* batch (every rank of the
process group), while the IN branch stays per instance, so nothing about it is communicated.

What crosses the wire, per layer and per training step (all in the statistics dtype):

* forward: one ``all_gather`` of ``(mean_c, M2_c, count)`` per rank, ``2C + 1`` numbers. The
  global mean and variance are combined from them with Chan's parallel formula
  (``M2 = sum_r M2_r + sum_r n_r (mean_r - mean)^2``), which is stable where
  ``E[x^2] - E[x]^2`` cancels, and which weights ranks by their counts (uneven or empty local
  batches are fine);
* backward: one ``all_reduce`` (sum) of ``(sum dy, sum dy * x_hat_B)`` per channel, ``2C`` numbers,
  the only global quantities the input gradient needs. Parameter gradients stay local, as in
  ``SyncBatchNorm``: DDP (or ``MetaBINOptimizer`` for rho) averages them.

With the differentiable ``"composite"`` backend (second-order meta steps) the forward gathers the
same ``2C + 1`` numbers through an autograd-aware gather whose backward is one ``all_reduce``, so
double backward works across ranks too.

Evaluation mode never communicates (ranks may evaluate alone), and a layer whose process group is
not initialised or has a single rank is exactly the plain layer.

Examples:
    >>> from metabin_layers import convert_bn_to_metabin
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    >>> model = convert_bn_to_metabin(model, sync=True)
    >>> type(model[1]).__name__
    'SyncMetaBIN'
    >>> model(torch.randn(2, 3, 8, 8)).shape  # no process group: the plain MetaBIN2d computation
    torch.Size([2, 8, 6, 6])
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ._bin_math import combine_moments, local_moments
from ._collectives import DistributedStepError, active_group, all_gather_differentiable, all_gather_stacked, all_reduce_sum
from ._registry import BINArgs
from .functional import _run
from .layers import MetaBIN1d, MetaBIN2d, MetaBIN3d, MetaBINAct2d, _MetaBINBase, replace_modules

__all__ = ["SyncMetaBIN", "convert_sync_metabin", "DistributedStepError"]

_FWD = "SyncMetaBIN: all_gather of the batch statistics"
_BWD = "SyncMetaBIN: all_reduce of the per-channel gradient sums"


class _GroupBatch:
    """The batch of a whole process group, as the fused and composite backends see it: its BN
    statistics (and their count, kept for the backward and the running statistics), and sums of
    per-channel gradient terms over it."""

    def __init__(self, group: Any) -> None:
        self.group = group
        self.count: Optional[Tensor] = None

    def batch_stats(self, var_nc: Tensor, mu_nc: Tensor, spatial: int, differentiable: bool) -> tuple[Tensor, Tensor]:
        local = local_moments(var_nc, mu_nc, spatial)
        gather = all_gather_differentiable if differentiable else all_gather_stacked
        mu_b, var_b, count = combine_moments(gather(local, self.group, _FWD), mu_nc.shape[1])
        self.count = count.detach()
        return mu_b, var_b

    def sum(self, t: Tensor) -> Tensor:
        return all_reduce_sum(t, self.group, _BWD)


class SyncMetaBIN(_MetaBINBase):
    """MetaBIN whose BN-branch batch statistics are those of the whole process group.

    Same tensors, state-dict keys, statistics modes, backends and errors as the plain layers; on
    top, ``process_group`` (None: the default group). Like ``nn.SyncBatchNorm`` it accepts
    ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)`` and ``(N, C, D, H, W)`` inputs.
    ``convert_sync_metabin`` turns every MetaBIN layer into one; a converted ``MetaBINAct2d``
    keeps its ``drop`` and ``act`` modules (applied after the normalization, same state-dict keys).

    Synchronisation happens in training mode with batch statistics (``stats_mode`` ``"update"``
    and ``"hold"``), when ``torch.distributed`` is initialised and the group has more than one
    rank; otherwise the layer is exactly its plain counterpart. Running statistics are updated
    with the global mean and the global unbiased variance, identically on every rank. A local
    batch may be empty (the rank still takes part in the collectives).

    Every rank must call a synchronised layer the same number of times in the same order, in
    forward and in backward; see ``docs/distributed.md``.

    Args:
        num_features: number of channels ``C``.
        eps: added to the variances for numerical stability.
        momentum: running-statistics update factor; ``None`` gives a cumulative average.
        affine: learn the BN-branch and IN-branch affines.
        track_running_stats: keep running statistics for the BN branch.
        rho_init: initial per-channel balance in [0, 1].
        stats_mode: ``"update"``, ``"hold"`` or ``"eval"``.
        backend: ``"auto"`` or one of ``BACKENDS``.
        device: device of the parameters and buffers.
        dtype: dtype of the parameters and buffers.
        process_group: the group to synchronise over (None: the default group).
        drop: module applied after the normalization, or None (with ``act``: ``nn.Identity``).
        act: module applied last, or None (with ``drop``: ``nn.Identity``).
        in_affine_init: how loading a plain BatchNorm state dict fills the IN affine (``"copy"`` or
            ``"identity"``, see ``MetaBIN2d``).

    Shape:
        Input and output have the same shape, ``(N, C, *)`` with 0 to 3 trailing dimensions.

    Examples:
        >>> m = SyncMetaBIN(8, rho_init=0.5)
        >>> m(torch.randn(4, 8, 5, 5)).shape
        torch.Size([4, 8, 5, 5])
        >>> m = SyncMetaBIN(8, act=nn.ReLU())
        >>> bool((m(torch.randn(2, 8, 6)) >= 0).all())
        True
    """

    _input_dims: tuple[int, ...] = (2, 3, 4, 5)

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        rho_init: float = 1.0,
        stats_mode: str = "update",
        backend: str = "auto",
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
        process_group: Any = None,
        drop: Optional[nn.Module] = None,
        act: Optional[nn.Module] = None,
        in_affine_init: str = "copy",
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, rho_init, stats_mode, backend, device, dtype, in_affine_init
        )
        self.process_group = process_group
        if drop is not None or act is not None:  # the timm-style norm + drop + act layer
            self.drop = drop if drop is not None else nn.Identity()
            self.act = act if act is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = self._synchronised_forward(x)
        if "act" in self._modules:
            y = self.act(self.drop(y))
        return y

    def _synchronised_forward(self, x: Tensor) -> Tensor:
        if not self.training:  # evaluation never communicates (a rank may evaluate alone)
            return super().forward(x)
        has_running = self.running_mean is not None and self.running_var is not None
        if self._stats_mode == "eval" and has_running:
            return super().forward(x)
        group = active_group(self.process_group)
        if group is None:
            return super().forward(x)
        self._check_input(x)
        self._check_rho_if_changed()
        shape = tuple(x.shape)
        squeeze = x.dim() == 2
        if squeeze:
            x = x.unsqueeze(-1)
        rho = self._rho_override if self._rho_override is not None else self.rho
        batch_only = math.prod(x.shape[2:]) == 1
        if batch_only:
            self._warn_batch_branch_only(shape)  # no instance statistics: the batch branch only
        update = self._stats_mode == "update" and self.track_running_stats
        args = BINArgs(
            x, rho, self.weight, self.bias, self.in_weight, self.in_bias, self.running_mean, self.running_var,
            self.num_batches_tracked, self.momentum, self.eps, "update" if update else "hold", batch_only, _GroupBatch(group),
        )  # fmt: skip
        # Running statistics: the global mean and unbiased variance, identical on every rank
        # (kept as they were when every rank's batch is empty).
        y = _run(args, self._backend)
        return y.squeeze(-1) if squeeze else y


_CONVERTIBLE = (MetaBIN1d, MetaBIN2d, MetaBIN3d, MetaBINAct2d)


def _to_sync(layer: _MetaBINBase, process_group: Any) -> SyncMetaBIN:
    config = (layer.num_features, layer.eps, layer.momentum, layer.affine, layer.track_running_stats)
    modes = {
        "rho_init": layer.rho_init,
        "stats_mode": layer.stats_mode,
        "backend": layer.backend,
        "in_affine_init": getattr(layer, "in_affine_init", "copy"),
    }
    drop, act = (layer.drop, layer.act) if "act" in layer._modules else (None, None)
    new = SyncMetaBIN(*config, process_group=process_group, drop=drop, act=act, **modes)  # type: ignore[arg-type]
    # Share Parameters and buffers by identity (as SyncBatchNorm.convert_sync_batchnorm):
    # optimizer references, requires_grad (rho frozen by MetaBINOptimizer), device and dtype stay.
    for name, p in layer._parameters.items():
        new._parameters[name] = p
    for name, b in layer._buffers.items():
        new._buffers[name] = b
    new._non_persistent_buffers_set = set(layer._non_persistent_buffers_set)
    new._rho_override = layer._rho_override
    new.train(layer.training)
    if hasattr(layer, "qconfig"):
        new.qconfig = layer.qconfig  # type: ignore[assignment]
    return new


def convert_sync_metabin(module: nn.Module, process_group: Any = None) -> nn.Module:
    """Replace every MetaBIN layer of ``module`` by a ``SyncMetaBIN``, recursively.

    The counterpart of ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``: ``MetaBIN1d/2d/3d``
    and ``MetaBINAct2d`` (keeping its ``drop`` and ``act`` modules) become ``SyncMetaBIN``.
    Parameters (``rho`` included) and buffers are shared by identity, so state-dict keys,
    ``requires_grad``, existing optimizers (also a ``MetaBINOptimizer``, which finds the new
    layers itself) and devices stay valid. Layers that are already synchronised are kept (their
    ``process_group`` is replaced when one is given). Plain BatchNorm is not touched: call
    ``convert_bn_to_metabin(model, sync=True)`` to do both. Subclasses of the layers that add
    behaviour of their own are left alone with a warning.

    Convert before wrapping the model in ``DistributedDataParallel``.

    Args:
        module: the model (converted in place; the root itself is replaced when it is a layer).
        process_group: the group to synchronise over; None is the default (world) group.

    Returns:
        ``module``, or the new root layer.

    Examples:
        >>> from metabin_layers import MetaBIN2d
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), MetaBIN2d(8))
        >>> rho = model[1].rho
        >>> model = convert_sync_metabin(model)
        >>> type(model[1]).__name__, model[1].rho is rho
        ('SyncMetaBIN', True)
    """
    unknown: list[str] = []

    def convert(name: str, mod: nn.Module) -> Optional[nn.Module]:
        if isinstance(mod, SyncMetaBIN):
            if process_group is not None:
                mod.process_group = process_group
            return mod
        if not isinstance(mod, _MetaBINBase):
            return None  # descend
        if type(mod) not in _CONVERTIBLE:
            unknown.append(f"{name or '<root>'} ({type(mod).__name__})")
            return mod
        return _to_sync(mod, process_group)

    result = replace_modules(module, convert)
    if unknown:
        warnings.warn(
            "convert_sync_metabin left these MetaBIN subclasses unsynchronised (unknown behaviour would "
            f"be lost): {', '.join(unknown)}",
            stacklevel=2,
        )
    return result
