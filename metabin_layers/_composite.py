"""The composite backend: the layer as ordinary differentiable torch ops.

Double backward works through it (second-order meta steps use it), and graph capture
(``torch.compile``, ``torch.export``) traces it; the coefficients are ``_bin_math``'s.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor

from ._bin_math import about, batch_stats, coefficients, stat_dtype
from ._registry import BINArgs, register_backend, update_running_stats

__all__: list[str] = []


def affine_or(value: Optional[Tensor], fill: float, like: Tensor) -> Tensor:
    """``value`` in the dtype of ``like``, or ``full_like(like, fill)`` for a layer without affine."""
    if value is None:
        return torch.full_like(like, fill)
    return value if value.dtype == like.dtype else value.to(like.dtype)


def mixing_terms(a: BINArgs) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(rho, w_B, b_B, w_I, b_I)`` of a call: rho is 1 for a batch-branch-only input."""
    rho = torch.ones_like(a.rho) if a.batch_only else a.rho
    fills = ((a.weight, 1.0), (a.bias, 0.0), (a.in_weight, 1.0), (a.in_bias, 0.0))
    w_b, b_b, w_i, b_i = [affine_or(p, fill, rho) for p, fill in fills]
    return rho, w_b, b_b, w_i, b_i


def bcast(v: Tensor, ndim: int) -> Tensor:
    """(C,) -> (1, C, 1, ..); (N, C) -> (N, C, 1, ..)."""
    if v.dim() == 1:
        return v.reshape((1, -1) + (1,) * (ndim - 2))
    return v.reshape(v.shape + (1,) * (ndim - 2))


def instance_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Biased variance and mean per (n, c), in the statistics dtype (differentiable; Welford)."""
    sd = stat_dtype(x.dtype)
    x = x if x.dtype == sd else x.to(sd)
    dims = tuple(range(2, x.dim()))
    if x.shape[0] == 0:
        # An empty local batch (a SyncMetaBIN rank without samples): var_mean would warn that its
        # degrees of freedom are <= 0 (it divides numel by the empty output's numel); the
        # statistics of no sample are empty, and these ops keep them in the graph.
        mean = x.mean(dims)
        return (x - bcast(mean, x.dim())).square().mean(dims), mean
    return torch.var_mean(x, dim=dims, correction=0)


def apply_affine(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``scale * x + shift`` with per-(n, c) coefficients, in the dtype of ``x``."""
    nd = x.dim()
    y = torch.addcmul(bcast(shift, nd), x, bcast(scale, nd))
    return y if y.dtype == x.dtype else y.to(x.dtype)


def composite_bin(
    x: Tensor,
    rho: Tensor,
    w_b: Tensor,
    b_b: Tensor,
    w_i: Tensor,
    b_i: Tensor,
    mu_b_fixed: Optional[Tensor],
    var_b_fixed: Optional[Tensor],
    eps: float,
    group: Any = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, mu_B, var_B)``: the layer in differentiable ops; the batch statistics (detached) come
    from ``x``, from ``group`` (a process group's), or are the fixed ``mu_b_fixed, var_b_fixed``."""
    # One copy of x in the statistics dtype feeds both the statistics and the affine map, so the
    # two gradient paths into x (through scale * x and through mu_nc) add up in that dtype. Cast
    # to fp16 / bf16 separately, each would round a term of size a_I * dy, and their difference,
    # the true gradient, is small where a_I is large (few spatial values: a_I ~ 1 / sqrt(eps)).
    sd = stat_dtype(x.dtype)
    xs = x if x.dtype == sd else x.to(sd)
    var_nc, mu_nc = instance_stats(xs)
    if mu_b_fixed is None and group is None:
        mu_b, var_b, dev = batch_stats(var_nc, mu_nc)
    else:
        if mu_b_fixed is None:
            mu_b, var_b = group.batch_stats(var_nc, mu_nc, math.prod(x.shape[2:]), True)
        else:
            assert var_b_fixed is not None
            mu_b, var_b = mu_b_fixed.to(sd), var_b_fixed.to(sd)
        dev = mu_nc - mu_b
    rho_, w_b_, b_b_, w_i_, b_i_ = [t.to(sd) for t in (rho, w_b, b_b, w_i, b_i)]
    scale, shift, _, _ = coefficients(rho_, w_b_, b_b_, w_i_, b_i_, torch.rsqrt(var_b + eps), torch.rsqrt(var_nc + eps), dev)
    return apply_affine(xs, scale, about(scale, shift, mu_nc)).to(x.dtype), mu_b.detach(), var_b.detach()


@register_backend("composite")
def composite_backend(a: BINArgs) -> Tensor:
    fixed = (a.running_mean, a.running_var) if a.mode == "eval" else (None, None)
    y, mu_b, var_b = composite_bin(a.x, *mixing_terms(a), *fixed, a.eps, a.group)
    if a.mode == "update":
        count = a.group.count if a.group is not None else a.x.shape[0] * math.prod(a.x.shape[2:])
        update_running_stats(a, mu_b, var_b, count)
    return y
