"""Multi-GPU and multi-node MetaBIN on ``torch.distributed``: synchronised layers and helpers.

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
    'SyncMetaBIN2d'
    >>> model(torch.randn(2, 3, 8, 8)).shape  # no process group: the plain MetaBIN2d computation
    torch.Size([2, 8, 6, 6])
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .functional import _apply, _coefficients, _instance_stats, _update_running
from .layers import MetaBIN1d, MetaBIN2d, MetaBIN3d, MetaBINAct2d, _MetaBINBase, replace_modules

__all__ = [
    "SyncMetaBIN",
    "SyncMetaBIN1d",
    "SyncMetaBIN2d",
    "SyncMetaBIN3d",
    "SyncMetaBINAct2d",
    "convert_sync_metabin",
    "DistributedStepError",
    "active_group",
]


class DistributedStepError(RuntimeError):
    """A collective of a synchronised MetaBIN layer or of the meta step failed or timed out.

    Usually another rank raised, skipped a step or took another branch, so the collectives no
    longer match; the original error of ``torch.distributed`` is chained (``__cause__``).

    Examples:
        >>> from metabin_layers.distributed import DistributedStepError
        >>> try:
        ...     try:
        ...         raise RuntimeError("Timed out waiting for all_reduce")
        ...     except RuntimeError as err:
        ...         raise DistributedStepError("rho all_reduce failed on rank 1") from err
        ... except DistributedStepError as err:
        ...     print(type(err.__cause__).__name__, isinstance(err, RuntimeError))
        RuntimeError True
    """


def active_group(process_group: Any = None) -> Optional[Any]:
    """The process group to synchronise over, or None when there is nothing to synchronise.

    None when ``torch.distributed`` is unavailable or not initialised, when the group has a single
    rank, or when this process is not a member of it. ``process_group=None`` is the default group.

    Args:
        process_group: a group of ``torch.distributed``, or None for the default group.

    Returns:
        The group, or None.

    Examples:
        >>> active_group() is None   # no init_process_group in this process
        True
    """
    if not dist.is_available() or not dist.is_initialized():
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    if dist.get_world_size(group) <= 1:  # -1 when this rank is not a member
        return None
    return group


def _fail(what: str, group: Any, err: BaseException) -> DistributedStepError:
    try:
        where = f"rank {dist.get_rank(group)} of {dist.get_world_size(group)}"
    except Exception:  # pragma: no cover - the group itself is broken
        where = "this rank"
    return DistributedStepError(
        f"{what} failed on {where}: {err}\nEvery rank must run the same forward and backward passes "
        "through synchronised MetaBIN layers and the same MetaBIN meta steps (same episode, same "
        "closures). A rank that raised, skipped a step or took another branch leaves the others "
        "waiting until the process group's timeout (init_process_group(timeout=...)); look for "
        "the first error in the other ranks' logs."
    )


def _all_gather_stacked(t: Tensor, group: Any, world: int, what: str) -> Tensor:
    """``(world, *t.shape)``: every rank's ``t``, in rank order."""
    t = t.contiguous()
    try:
        if hasattr(dist, "all_gather_into_tensor") and dist.get_backend(group) != "gloo":
            out = t.new_empty((world,) + tuple(t.shape))
            dist.all_gather_into_tensor(out, t, group=group)
            return out
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t, group=group)
    except RuntimeError as err:
        raise _fail(what, group, err) from err
    return torch.stack(parts)


def _all_reduce_sum(t: Tensor, group: Any, what: str) -> Tensor:
    """Sum of ``t`` over the group, in place (``t`` is returned)."""
    try:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    except RuntimeError as err:
        raise _fail(what, group, err) from err
    return t


class _DiffAllReduce(torch.autograd.Function):
    # Sum over the group; the adjoint of a sum over ranks is again a sum over ranks, so the
    # backward is the same Function and any order of derivatives works.
    @staticmethod
    def forward(ctx, t: Tensor, group: Any, what: str) -> Tensor:  # type: ignore[override]
        ctx.group, ctx.what = group, what
        return _all_reduce_sum(t.clone(memory_format=torch.contiguous_format), group, what)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        return _DiffAllReduce.apply(g, ctx.group, ctx.what), None, None


def all_reduce_differentiable(t: Tensor, group: Any, what: str = "all_reduce") -> Tensor:
    """Sum of ``t`` over ``group`` with autograd support (backward: the same sum of gradients).

    Args:
        t: the tensor to sum, the same shape on every rank.
        group: an initialised process group of ``torch.distributed``.
        what: names the collective in the ``DistributedStepError`` raised if it fails.

    Returns:
        The sum over the ranks, a new tensor.

    Raises:
        DistributedStepError: the collective failed or timed out.
    """
    return _DiffAllReduce.apply(t, group, what)


class _DiffAllGather(torch.autograd.Function):
    # Forward: stack every rank's tensor. Backward: each rank's slice of the stacked gradient,
    # summed over the ranks (a reduce-scatter, done as one all_reduce: the tensors are tiny).
    # The backward is made of differentiable ops, so double backward works.
    @staticmethod
    def forward(ctx, t: Tensor, group: Any, world: int, what: str) -> Tensor:  # type: ignore[override]
        ctx.group, ctx.what = group, what
        ctx.rank = dist.get_rank(group)
        return _all_gather_stacked(t, group, world, what)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        return all_reduce_differentiable(g, ctx.group, ctx.what + " (backward)")[ctx.rank], None, None, None


# -- the statistics ---------------------------------------------------------------------------


def _local_moments(var_nc: Tensor, mu_nc: Tensor, spatial: int) -> Tensor:
    """``[mean_c (C), M2_c (C), count (1)]`` of this rank's batch, from the instance statistics."""
    n = mu_nc.shape[0]
    mean = mu_nc.sum(0) / max(n, 1)  # zeros for an empty local batch
    m2 = (var_nc + (mu_nc - mean).square()).sum(0) * spatial
    return torch.cat([mean, m2, mean.new_full((1,), float(n * spatial))])


def _combine(stacked: Tensor, c: int) -> tuple[Tensor, Tensor, Tensor]:
    """Global mean, biased variance and count from every rank's ``[mean, M2, count]`` (Chan et al.).

    Ranks with count 0 contribute nothing (their mean and M2 are 0).
    """
    mean_r, m2_r, cnt_r = stacked[:, :c], stacked[:, c : 2 * c], stacked[:, 2 * c :]
    total = cnt_r.sum()
    mean = (cnt_r * mean_r).sum(0) / total
    m2 = m2_r.sum(0) + (cnt_r * (mean_r - mean).square()).sum(0)
    return mean, m2 / total, total


_FWD = "SyncMetaBIN: all_gather of the batch statistics"
_BWD = "SyncMetaBIN: all_reduce of the per-channel gradient sums"


class _SyncFusedBIN(torch.autograd.Function):
    """The fused MetaBIN map with global batch statistics; hand-written backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: Tensor,
        rho: Tensor,
        w_b: Tensor,
        b_b: Tensor,
        w_i: Tensor,
        b_i: Tensor,
        eps: float,
        group: Any,
        world: int,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        spatial = math.prod(x.shape[2:])
        var_nc, mu_nc = _instance_stats(x)
        sd = mu_nc.dtype
        stacked = _all_gather_stacked(_local_moments(var_nc, mu_nc, spatial), group, world, _FWD)
        mu_b, var_b, count = _combine(stacked, x.shape[1])
        inv_nc = torch.rsqrt(var_nc + eps)
        inv_b = torch.rsqrt(var_b + eps)
        p = [t.to(sd) for t in (rho, w_b, b_b, w_i, b_i)]
        scale, shift = _coefficients(p[0], p[1], p[2], p[3], p[4], mu_b, inv_b, mu_nc, inv_nc)
        y = _apply(x, scale, shift)
        ctx.save_for_backward(x, *p, mu_b, inv_b, mu_nc, inv_nc, scale, count)
        ctx.group = group
        ctx.param_dtypes = (rho.dtype, w_b.dtype, b_b.dtype, w_i.dtype, b_i.dtype)
        ctx.mark_non_differentiable(mu_b, var_b, count)
        return y, mu_b, var_b, count

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor, _dmu: Tensor, _dvar: Tensor, _dcount: Tensor):  # type: ignore[override]
        x, rho, w_b, b_b, w_i, b_i, mu_b, inv_b, mu_nc, inv_nc, scale, count = ctx.saved_tensors
        nd = x.dim()
        sd = mu_nc.dtype
        dims = tuple(range(2, nd))
        m = math.prod(x.shape[2:])
        dyf = dy if dy.dtype == sd else dy.to(sd)
        xf = x if x.dtype == sd else x.to(sd)
        # Per (n, c): S1 = sum dy, S2 = sum dy * x; per channel, this rank's share of the BN sums.
        s1 = dyf.sum(dims)
        s2 = (dyf * xf).sum(dims)
        t_i = inv_nc * (s2 - mu_nc * s1)  # (N, C): sum dy * x_hat_I per instance
        t_b = (inv_b * (s2 - mu_b * s1)).sum(0)  # (C,): local sum dy * x_hat_B
        s1_c = s1.sum(0)
        t_i_c = t_i.sum(0)
        need = ctx.needs_input_grad
        grads: list[Optional[Tensor]] = [None] * 9
        # Parameter gradients are this rank's share (DDP / the meta step average them).
        if need[1]:
            grads[1] = (w_b * t_b + b_b * s1_c - w_i * t_i_c - b_i * s1_c).to(ctx.param_dtypes[0])
        if need[2]:
            grads[2] = (rho * t_b).to(ctx.param_dtypes[1])
        if need[3]:
            grads[3] = (rho * s1_c).to(ctx.param_dtypes[2])
        if need[4]:
            grads[4] = ((1 - rho) * t_i_c).to(ctx.param_dtypes[3])
        if need[5]:
            grads[5] = ((1 - rho) * s1_c).to(ctx.param_dtypes[4])
        if need[0]:
            # The input gradient needs the sums over the global batch (every rank's dy).
            glob = _all_reduce_sum(torch.cat([s1_c, t_b]), ctx.group, _BWD)
            c = s1_c.shape[0]
            s1_g, t_b_g = glob[:c], glob[c:]
            k_i = (1 - rho) * w_i * inv_nc  # (N, C)
            cx = -(k_i * inv_nc * t_i) / m
            c0 = -k_i * s1 / m - cx * mu_nc
            k_b = rho * w_b * inv_b
            cx_b = -(k_b * inv_b * t_b_g) / count
            cx = cx + cx_b
            c0 = c0 + (-k_b * s1_g / count - cx_b * mu_b)
            dx = torch.addcmul(_bc(c0, nd), xf, _bc(cx, nd))
            dx.addcmul_(dyf, _bc(scale, nd))
            grads[0] = dx.to(x.dtype)
        return tuple(grads)


def _bc(v: Tensor, ndim: int) -> Tensor:
    # (C,) -> (1, C, 1, ..); (N, C) -> (N, C, 1, ..)
    if v.dim() == 1:
        return v.reshape((1, -1) + (1,) * (ndim - 2))
    return v.reshape(v.shape + (1,) * (ndim - 2))


def _sync_composite(
    x: Tensor, rho: Tensor, w_b: Tensor, b_b: Tensor, w_i: Tensor, b_i: Tensor, eps: float, group: Any, world: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The same map as ordinary differentiable ops (double backward works across ranks)."""
    spatial = math.prod(x.shape[2:])
    var_nc, mu_nc = _instance_stats(x)
    sd = mu_nc.dtype
    stacked = _DiffAllGather.apply(_local_moments(var_nc, mu_nc, spatial), group, world, _FWD)
    mu_b, var_b, count = _combine(stacked, x.shape[1])
    p = [t.to(sd) for t in (rho, w_b, b_b, w_i, b_i)]
    scale, shift = _coefficients(p[0], p[1], p[2], p[3], p[4], mu_b, torch.rsqrt(var_b + eps), mu_nc, torch.rsqrt(var_nc + eps))
    return _apply(x, scale, shift), mu_b.detach(), var_b.detach(), count.detach()


def _or_fill(value: Optional[Tensor], fill: float, like: Tensor) -> Tensor:
    return value if value is not None else torch.full_like(like, fill)


# -- the layers ---------------------------------------------------------------------------------


class SyncMetaBIN(_MetaBINBase):
    """MetaBIN whose BN-branch batch statistics are those of the whole process group.

    Same tensors, state-dict keys, statistics modes, backends and errors as the plain layers; on
    top, ``process_group`` (None: the default group). Accepts ``(N, C)``, ``(N, C, L)``,
    ``(N, C, H, W)`` and ``(N, C, D, H, W)`` like ``nn.SyncBatchNorm``; the dimension-checked
    variants ``SyncMetaBIN1d`` / ``2d`` / ``3d`` / ``SyncMetaBINAct2d`` are what
    ``convert_sync_metabin`` produces (they are also instances of ``MetaBIN1d`` / ...).

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

    Examples:
        >>> m = SyncMetaBIN(8, rho_init=0.5)
        >>> m(torch.randn(4, 8, 5, 5)).shape
        torch.Size([4, 8, 5, 5])
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
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, rho_init, stats_mode, backend, device, dtype)
        self.process_group = process_group

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:  # evaluation never communicates (a rank may evaluate alone)
            return super().forward(x)
        has_running = self.running_mean is not None and self.running_var is not None
        if self._stats_mode == "eval" and has_running:
            return super().forward(x)
        group = active_group(self.process_group)
        if group is None:
            return super().forward(x)
        self._check_input(x)
        shape = tuple(x.shape)
        squeeze = x.dim() == 2
        if squeeze:
            x = x.unsqueeze(-1)
        rho = self._rho_override if self._rho_override is not None else self.rho
        if math.prod(x.shape[2:]) == 1:  # no instance statistics: the batch branch only, as the plain layer
            rho = self._batch_branch_only(shape)
        update = self._stats_mode == "update" and self.track_running_stats
        momentum = 0.0 if self.momentum is None else self.momentum
        if update:
            tracked = self.num_batches_tracked
            assert tracked is not None  # update implies track_running_stats
            tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                momentum = 1.0 / float(tracked)
        w_b = _or_fill(self.weight, 1.0, rho)
        b_b = _or_fill(self.bias, 0.0, rho)
        w_i = _or_fill(self.in_weight, 1.0, rho)
        b_i = _or_fill(self.in_bias, 0.0, rho)
        world = dist.get_world_size(group)
        if self._backend == "composite":
            y, mu_b, var_b, count = _sync_composite(x, rho, w_b, b_b, w_i, b_i, self.eps, group, world)
        else:
            y, mu_b, var_b, count = _SyncFusedBIN.apply(x, rho, w_b, b_b, w_i, b_i, self.eps, group, world)
        if update:
            # Global mean and unbiased variance: identical running statistics on every rank.
            running_mean, running_var, tracked = self.running_mean, self.running_var, self.num_batches_tracked
            assert running_mean is not None and running_var is not None and tracked is not None
            before = running_mean.clone(), running_var.clone()
            _update_running(running_mean, running_var, mu_b, var_b, count, momentum)  # type: ignore[arg-type]
            # Every rank's batch empty: there are no statistics (0 / 0). Keep the running ones and
            # the count, without a host synchronisation.
            empty = count.reshape(()) == 0
            with torch.no_grad():
                running_mean.copy_(torch.where(empty, before[0], running_mean))
                running_var.copy_(torch.where(empty, before[1], running_var))
                tracked.sub_(empty.to(tracked.dtype))
        return y.squeeze(-1) if squeeze else y


class SyncMetaBIN1d(MetaBIN1d, SyncMetaBIN):
    """``SyncMetaBIN`` with the input checks of ``MetaBIN1d``.

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

    Examples:
        >>> SyncMetaBIN1d(4)(torch.randn(2, 4, 6)).shape
        torch.Size([2, 4, 6])
    """


class SyncMetaBIN2d(MetaBIN2d, SyncMetaBIN):
    """``SyncMetaBIN`` with the input checks of ``MetaBIN2d``.

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

    Examples:
        >>> isinstance(SyncMetaBIN2d(4), MetaBIN2d)
        True
    """


class SyncMetaBIN3d(MetaBIN3d, SyncMetaBIN):
    """``SyncMetaBIN`` with the input checks of ``MetaBIN3d``.

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

    Examples:
        >>> SyncMetaBIN3d(4)(torch.randn(2, 4, 3, 3, 3)).shape
        torch.Size([2, 4, 3, 3, 3])
    """


class SyncMetaBINAct2d(MetaBINAct2d, SyncMetaBIN):
    """``MetaBINAct2d`` (MetaBIN, ``drop``, ``act``) with synchronised statistics.

    Args:
        *args: the positional arguments of ``MetaBINAct2d`` (``num_features``, ``eps``,
            ``momentum``, ``affine``, ``track_running_stats``, ``apply_act``, ``act_layer``, ...).
        process_group: the group to synchronise over (None: the default group).
        **kwargs: the keyword arguments of ``MetaBINAct2d`` (``act_layer``, ``drop_layer``,
            ``rho_init``, ``stats_mode``, ``backend``, ``device``, ``dtype``, ...).

    Examples:
        >>> m = SyncMetaBINAct2d(8, act_layer=nn.ReLU)
        >>> bool((m(torch.randn(2, 8, 4, 4)) >= 0).all())
        True
    """

    def __init__(self, *args: Any, process_group: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.process_group = process_group


_SYNC_CLASSES: dict[type, type] = {
    MetaBIN1d: SyncMetaBIN1d,
    MetaBIN2d: SyncMetaBIN2d,
    MetaBIN3d: SyncMetaBIN3d,
    MetaBINAct2d: SyncMetaBINAct2d,
}


def _to_sync(layer: _MetaBINBase, cls: type, process_group: Any) -> _MetaBINBase:
    config = (layer.num_features, layer.eps, layer.momentum, layer.affine, layer.track_running_stats)
    modes = {"rho_init": layer.rho_init, "stats_mode": layer.stats_mode, "backend": layer.backend}
    if cls is SyncMetaBINAct2d:
        new = cls(*config, act_layer=layer.act, drop_layer=layer.drop, process_group=process_group, **modes)
    else:
        new = cls(*config, process_group=process_group, **modes)
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
    """Replace every MetaBIN layer of ``module`` by its synchronised counterpart, recursively.

    The counterpart of ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``: ``MetaBIN1d/2d/3d`` become
    ``SyncMetaBIN1d`` / ``2d`` / ``3d`` and ``MetaBINAct2d`` becomes ``SyncMetaBINAct2d``
    (keeping its ``act`` and ``drop`` modules). Parameters (``rho`` included) and buffers are
    shared by identity, so state-dict keys, ``requires_grad``, existing optimizers (also a
    ``MetaBINOptimizer``, which finds the new layers itself) and devices stay
    valid. Layers that are already synchronised are kept (their ``process_group`` is replaced when
    one is given). Plain BatchNorm is not touched: call ``convert_bn_to_metabin(model, sync=True)``
    to do both. Other ``_MetaBINBase`` subclasses are left alone with a warning.

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
        ('SyncMetaBIN2d', True)
    """
    unknown: list[str] = []

    def convert(name: str, mod: nn.Module) -> Optional[nn.Module]:
        if isinstance(mod, SyncMetaBIN):
            if process_group is not None:
                mod.process_group = process_group
            return mod
        if not isinstance(mod, _MetaBINBase):
            return None  # descend
        cls = _SYNC_CLASSES.get(type(mod))
        if cls is None:
            unknown.append(f"{name or '<root>'} ({type(mod).__name__})")
            return mod
        return _to_sync(mod, cls, process_group)

    result = replace_modules(module, convert)
    if unknown:
        warnings.warn(
            "convert_sync_metabin left these MetaBIN subclasses unsynchronised (unknown behaviour would "
            f"be lost): {', '.join(unknown)}",
            stacklevel=2,
        )
    return result


# -- helpers for MetaBINOptimizer -----------------------------------------------------------------


def average_over_group(
    tensors: Sequence[Tensor], group: Any, differentiable: bool = False, what: str = "all_reduce"
) -> list[Tensor]:
    """The mean over the ranks of ``group`` of each tensor, with one collective for all of them.

    ``differentiable=True`` keeps autograd history (second-order meta steps).

    Args:
        tensors: the tensors to average, the same shapes on every rank.
        group: an initialised process group of ``torch.distributed``.
        differentiable: keep the autograd graph through the collective.
        what: names the collective in the ``DistributedStepError`` raised if it fails.

    Returns:
        One averaged tensor per input, of the same shape; an empty list for no tensors.

    Raises:
        DistributedStepError: the collective failed or timed out.
    """
    if not tensors:
        return []
    world = dist.get_world_size(group)
    flat = torch.cat([t.reshape(-1) for t in tensors])
    if differentiable:
        total = all_reduce_differentiable(flat, group, what)
    else:
        total = _all_reduce_sum(flat.detach().clone(), group, what)
    total = total / world
    out, start = [], 0
    for t in tensors:
        out.append(total[start : start + t.numel()].view_as(t))
        start += t.numel()
    return out


def global_domains(labels: Tensor, group: Any, device: Union[torch.device, str], fingerprint: int) -> Tensor:
    """The sorted union over the group of the domain ids in ``labels`` (two small all_reduces).

    ``fingerprint`` (e.g. a hash of a generator state) must be equal on every rank; a mismatch
    raises the same ``ValueError`` on every rank.

    Args:
        labels: this rank's domain labels (integers; may be empty).
        group: an initialised process group of ``torch.distributed``.
        device: where the collectives run (CUDA for NCCL, CPU for gloo).
        fingerprint: an integer that must be equal on every rank.

    Returns:
        The sorted int64 domain ids present on any rank, on the CPU.

    Raises:
        ValueError: the fingerprints differ between ranks, or the domain ids span ``2**20``
            values or more.
        DistributedStepError: a collective failed or timed out.
    """
    local = torch.unique(labels.cpu()).to(torch.int64)
    big = 2**62
    lo, hi = (int(local.min()), int(local.max())) if local.numel() else (big, -big)
    fp = int(fingerprint) % (2**61)
    head = torch.tensor([hi, -lo, fp, -fp], dtype=torch.int64, device=device)
    try:
        dist.all_reduce(head, op=dist.ReduceOp.MAX, group=group)
    except RuntimeError as err:
        raise _fail("MetaBINOptimizer.split: all_reduce of the domain range", group, err) from err
    hi_g, lo_g, fp_max, fp_min = int(head[0]), -int(head[1]), int(head[2]), -int(head[3])
    if fp_max != fp_min:
        raise ValueError(
            "MetaBINOptimizer.split: the split generator differs between ranks, so the ranks would draw "
            "different meta-train / meta-test domains; build the optimizer with the same seed on every "
            "rank (seed=..., not seed + rank) and restore the same optimizer state everywhere"
        )
    if hi_g < lo_g:  # no labels anywhere
        return local
    if hi_g - lo_g > 2**20:
        raise ValueError(f"domain ids must span fewer than 2**20 values, got [{lo_g}, {hi_g}]")
    presence = torch.zeros(hi_g - lo_g + 1, dtype=torch.int32, device=device)
    presence[(local - lo_g).to(device)] = 1
    try:
        dist.all_reduce(presence, op=dist.ReduceOp.MAX, group=group)
    except RuntimeError as err:
        raise _fail("MetaBINOptimizer.split: all_reduce of the domain set", group, err) from err
    return presence.cpu().nonzero().flatten() + lo_g
