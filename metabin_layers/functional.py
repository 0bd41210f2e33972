"""The Batch-Instance Normalization math, written once.

For an input ``x`` of shape ``(N, C, *spatial)`` the MetaBIN output is

    y = rho * (w_B * (x - mu_B) / s_B + b_B) + (1 - rho) * (w_I * (x - mu_nc) / s_nc + b_I)

Both branches are affine in ``x`` inside one ``(n, c)`` slice, so the whole layer is one affine
map per sample and channel, ``y = A[n, c] * x + B[n, c]``. Batch statistics follow from the
instance statistics (``mu_B`` is the mean of ``mu_nc``; ``var_B`` is the mean of
``var_nc + (mu_nc - mu_B)^2``, the law of total variance, which stays stable where
``E[x^2] - E[x]^2`` cancels). The forward pass therefore reads ``x`` twice and writes ``y``
once, and the backward pass needs one reduction over ``(x, dy)`` and one elementwise pass:
the memory traffic of BatchNorm.

Two implementations share these formulas:

* ``"fused"``: a custom :class:`torch.autograd.Function` with a hand-written backward. It is the
  fast path; its backward is ``once_differentiable`` (double backward raises).
* ``"composite"``: the same formulas as ordinary differentiable torch ops. Autograd derives its
  backward, so double backward works (second-order meta steps use it).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["batch_instance_norm", "BACKENDS"]

#: Names accepted by ``batch_instance_norm(..., backend=...)``.
BACKENDS = ("fused", "composite")


def _stat_dtype(x: Tensor) -> torch.dtype:
    # Statistics are kept in float32 at least, also for fp16/bf16 activations.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _affine_or(value: Optional[Tensor], fill: float, like: Tensor) -> Tensor:
    return value.to(like.dtype) if value is not None else torch.full_like(like, fill)


def _bcast(v: Tensor, ndim: int) -> Tensor:
    # (C,) -> (C, 1, ..) aligned to dim 1; (N, C) -> (N, C, 1, ..)
    if v.dim() == 1:
        return v.reshape((1, -1) + (1,) * (ndim - 2))
    return v.reshape(v.shape + (1,) * (ndim - 2))


def _instance_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Biased variance and mean per (n, c), in the statistics dtype (one pass, Welford)."""
    dims = tuple(range(2, x.dim()))
    xs = x if x.dtype == _stat_dtype(x) else x.to(_stat_dtype(x))
    var, mean = torch.var_mean(xs, dim=dims, correction=0)
    return var, mean


def _batch_from_instance(var_nc: Tensor, mu_nc: Tensor) -> tuple[Tensor, Tensor]:
    mu_b = mu_nc.mean(0)
    var_b = (var_nc + (mu_nc - mu_b).square()).mean(0)
    return var_b, mu_b


def _coefficients(
    rho: Tensor,
    w_b: Tensor,
    b_b: Tensor,
    w_i: Tensor,
    b_i: Tensor,
    mu_b: Tensor,
    inv_b: Tensor,
    mu_nc: Tensor,
    inv_nc: Tensor,
) -> tuple[Tensor, Tensor]:
    """A[n, c] and B[n, c] of ``y = A * x + B``."""
    a_b = rho * w_b * inv_b  # (C,)
    a_i = (1 - rho) * w_i * inv_nc  # (N, C)
    scale = a_b + a_i
    shift = (rho * b_b - a_b * mu_b) + ((1 - rho) * b_i - a_i * mu_nc)
    return scale, shift


def _apply(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    nd = x.dim()
    if x.dtype == scale.dtype:
        return torch.addcmul(_bcast(shift, nd), x, _bcast(scale, nd))
    return torch.addcmul(_bcast(shift, nd), x, _bcast(scale, nd)).to(x.dtype)


def _update_running(
    running_mean: Tensor,
    running_var: Tensor,
    mu_b: Tensor,
    var_b: Tensor,
    count: int,
    factor: float,
) -> None:
    # nn.BatchNorm semantics: the running variance stores the unbiased estimate.
    with torch.no_grad():
        running_mean.lerp_(mu_b.to(running_mean.dtype), factor)
        running_var.lerp_((var_b * (count / (count - 1))).to(running_var.dtype), factor)


class _FusedBIN(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: Tensor,
        rho: Tensor,
        w_b: Tensor,
        b_b: Tensor,
        w_i: Tensor,
        b_i: Tensor,
        mu_b_fixed: Optional[Tensor],
        var_b_fixed: Optional[Tensor],
        eps: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        var_nc, mu_nc = _instance_stats(x)
        use_batch = mu_b_fixed is None
        if use_batch:
            var_b, mu_b = _batch_from_instance(var_nc, mu_nc)
        else:
            mu_b, var_b = mu_b_fixed, var_b_fixed  # type: ignore[assignment]
        sd = mu_nc.dtype
        inv_nc = torch.rsqrt(var_nc + eps)
        inv_b = torch.rsqrt(var_b.to(sd) + eps)
        mu_b = mu_b.to(sd)
        p = [t.to(sd) for t in (rho, w_b, b_b, w_i, b_i)]
        scale, shift = _coefficients(p[0], p[1], p[2], p[3], p[4], mu_b, inv_b, mu_nc, inv_nc)
        y = _apply(x, scale, shift)
        ctx.save_for_backward(x, *p, mu_b, inv_b, mu_nc, inv_nc, scale)
        ctx.use_batch = use_batch
        ctx.param_dtypes = (rho.dtype, w_b.dtype, b_b.dtype, w_i.dtype, b_i.dtype)
        # The batch statistics are returned so that the caller can update running buffers
        # without recomputing them (empty when running statistics were used).
        if use_batch:
            stats = (mu_b, var_b)
        else:
            stats = (x.new_empty(0, dtype=sd), x.new_empty(0, dtype=sd))
        ctx.mark_non_differentiable(*stats)
        return y, stats[0], stats[1]

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor, _dmu: Tensor, _dvar: Tensor):  # type: ignore[override]
        x, rho, w_b, b_b, w_i, b_i, mu_b, inv_b, mu_nc, inv_nc, scale = ctx.saved_tensors
        nd = x.dim()
        sd = mu_nc.dtype
        dims = tuple(range(2, nd))
        m = x[0, 0].numel()  # spatial size
        n = x.shape[0]
        # One reduction over (x, dy): S1 = sum dy, S2 = sum dy * x per (n, c).
        dyf = dy if dy.dtype == sd else dy.to(sd)
        xf = x if x.dtype == sd else x.to(sd)
        s1 = dyf.sum(dims)
        s2 = (dyf * xf).sum(dims)
        # sum over the slice of dy * x_hat for each branch
        t_i = inv_nc * (s2 - mu_nc * s1)  # (N, C)
        t_b_nc = inv_b * (s2 - mu_b * s1)  # (N, C)
        t_b = t_b_nc.sum(0)
        s1_c = s1.sum(0)

        grads = [None] * 9
        need = ctx.needs_input_grad
        if need[1]:
            grads[1] = (w_b * t_b + b_b * s1_c - w_i * t_i.sum(0) - b_i * s1_c).to(ctx.param_dtypes[0])
        if need[2]:
            grads[2] = (rho * t_b).to(ctx.param_dtypes[1])
        if need[3]:
            grads[3] = (rho * s1_c).to(ctx.param_dtypes[2])
        if need[4]:
            grads[4] = ((1 - rho) * t_i.sum(0)).to(ctx.param_dtypes[3])
        if need[5]:
            grads[5] = ((1 - rho) * s1_c).to(ctx.param_dtypes[4])
        if need[0]:
            # dx = scale * dy + cx * x + c0, one elementwise pass.
            k_i = (1 - rho) * w_i * inv_nc  # (N, C)
            cx = -(k_i * inv_nc * t_i) / m
            c0 = -k_i * s1 / m - cx * mu_nc
            if ctx.use_batch:
                k_b = rho * w_b * inv_b
                count = n * m
                cx_b = -(k_b * inv_b * t_b) / count
                cx = cx + cx_b
                c0 = c0 + (-k_b * s1_c / count - cx_b * mu_b)
            dx = torch.addcmul(_bcast(c0, nd), xf, _bcast(cx, nd))
            dx.addcmul_(dyf, _bcast(scale, nd))
            grads[0] = dx.to(x.dtype)
        return tuple(grads)


def _composite(
    x: Tensor,
    rho: Tensor,
    w_b: Tensor,
    b_b: Tensor,
    w_i: Tensor,
    b_i: Tensor,
    mu_b_fixed: Optional[Tensor],
    var_b_fixed: Optional[Tensor],
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    var_nc, mu_nc = _instance_stats(x)
    sd = mu_nc.dtype
    if mu_b_fixed is None:
        var_b, mu_b = _batch_from_instance(var_nc, mu_nc)
    else:
        mu_b, var_b = mu_b_fixed.to(sd), var_b_fixed.to(sd)  # type: ignore[union-attr]
    p = [t.to(sd) for t in (rho, w_b, b_b, w_i, b_i)]
    scale, shift = _coefficients(
        p[0], p[1], p[2], p[3], p[4], mu_b, torch.rsqrt(var_b + eps), mu_nc, torch.rsqrt(var_nc + eps)
    )
    return _apply(x, scale, shift), mu_b.detach(), var_b.detach()


def batch_instance_norm(
    x: Tensor,
    rho: Tensor,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    in_weight: Optional[Tensor] = None,
    in_bias: Optional[Tensor] = None,
    running_mean: Optional[Tensor] = None,
    running_var: Optional[Tensor] = None,
    use_batch_stats: bool = True,
    update_running_stats: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    backend: str = "fused",
) -> Tensor:
    """Batch-Instance Normalization: ``rho * BN(x) + (1 - rho) * IN(x)`` in one affine map.

    Args:
        x: input of shape ``(N, C, *spatial)`` with at least one spatial dimension.
        rho: per-channel mixing weight, shape ``(C,)``; 1 is pure BatchNorm, 0 pure InstanceNorm.
        weight, bias: affine of the BN branch, ``(C,)`` or None (1 and 0).
        in_weight, in_bias: affine of the IN branch, ``(C,)`` or None (1 and 0).
        running_mean, running_var: BN running statistics, used when ``use_batch_stats`` is False
            and updated in place when ``update_running_stats`` is True.
        use_batch_stats: normalise the BN branch with the statistics of this batch.
        update_running_stats: blend the batch statistics into the running buffers with
            ``momentum`` (nn.BatchNorm semantics: unbiased variance is stored).
        momentum: weight of the new batch statistics in the running average.
        eps: added to the variances.
        backend: ``"fused"`` (custom backward, fast) or ``"composite"`` (plain autograd ops,
            supports double backward).

    Returns:
        A tensor like ``x``.

    Example:
        >>> x = torch.randn(4, 3, 5, 5)
        >>> y = batch_instance_norm(x, rho=torch.full((3,), 0.5))
        >>> y.shape
        torch.Size([4, 3, 5, 5])
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if x.dim() < 3:
        raise ValueError(
            f"x must have shape (N, C, *spatial) with at least one spatial dimension, got {tuple(x.shape)}"
        )
    if not use_batch_stats and (running_mean is None or running_var is None):
        raise ValueError("use_batch_stats=False needs running_mean and running_var")
    if update_running_stats and (running_mean is None or running_var is None):
        raise ValueError("update_running_stats=True needs running_mean and running_var")
    spatial = math.prod(x.shape[2:])
    count = x.shape[0] * spatial
    if use_batch_stats and count <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel for batch statistics, got input of shape {tuple(x.shape)}"
        )
    ref = rho
    w_b = _affine_or(weight, 1.0, ref)
    b_b = _affine_or(bias, 0.0, ref)
    w_i = _affine_or(in_weight, 1.0, ref)
    b_i = _affine_or(in_bias, 0.0, ref)
    mu_fixed = None if use_batch_stats else running_mean
    var_fixed = None if use_batch_stats else running_var
    if backend == "fused":
        y, mu_b, var_b = _FusedBIN.apply(x, rho, w_b, b_b, w_i, b_i, mu_fixed, var_fixed, eps)
    else:
        y, mu_b, var_b = _composite(x, rho, w_b, b_b, w_i, b_i, mu_fixed, var_fixed, eps)
    if update_running_stats and use_batch_stats:
        _update_running(running_mean, running_var, mu_b, var_b, count, momentum)  # type: ignore[arg-type]
    return y
