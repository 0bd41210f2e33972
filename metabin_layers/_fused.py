"""The fused backend: a hand-written backward and few passes over ``x``; the CPU path.

Forward: read ``x`` twice, write ``y`` once; backward: one reduction over ``(x, dy)`` and one
elementwise pass, the memory traffic of BatchNorm. The backward is ``once_differentiable``; the
coefficients and gradient formulas are ``_bin_math``'s.

On the CPU it uses plain ATen kernels, no compiled extension. A contiguous input is viewed as
``(1, N*C, M)``, one row per ``(n, c)``: ``mean(x)`` per row gives ``mu``; ``y <- x - mu`` is
written into the output buffer; one reduction of ``y`` gives ``sum(y * y)``, the exact two-pass
variance (no ``E[x^2] - E[x]^2`` cancellation, and much faster than ``var_mean``, whose CPU
kernel is a scalar Welford loop); then ``y <- scale * y + shift`` in place. The per-row
reductions and affine maps are ATen's BatchNorm CPU kernels applied to that view (see
``_row_sums`` and ``_row_affine``). Channels-last inputs are viewed as ``(N, M, C)``.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._bin_math import about, batch_stats, coefficients, dx_coefficients, gradient_sums, parameter_grads, stat_dtype
from ._composite import apply_affine, bcast, instance_stats, mixing_terms
from ._registry import BINArgs, register_backend, update_running_stats

__all__: list[str] = []

_aten = torch.ops.aten
_nbn_backward = _aten.native_batch_norm_backward.default


# -- the fused path: where the passes over x run ------------------------------------------------
#
# * "rows" (CPU, contiguous input): x is viewed as (1, N*C, M) rows. Per-row reductions and per-row
#   affine maps use ATen's BatchNorm CPU kernels on that view: the eval-mode forward with variance
#   1 and eps 0 is ``w * (x - mean) + b`` per row, and the eval-mode backward returns ``sum(dy)``
#   and ``sum((x - mean) * dy)`` per row. Both are vectorised, take one coefficient per row and
#   write no temporary; elementwise ops with two per-row broadcast operands (e.g.
#   ``addcmul(shift, x, scale)``) would run a scalar loop instead.
# * "cl" (CPU, channels-last input): x is viewed as (N, M, C); per-(n, c) broadcasts are then
#   contiguous along C and plain elementwise ops vectorise. For large samples the per-(n, c)
#   reductions call the channels-last BatchNorm backward kernel once per sample.
# * "generic" (other devices, empty inputs): plain tensor ops (var_mean, sum, addcmul).


def _layout(x: Tensor) -> tuple[Tensor, str]:
    """``(x, path)``: ``x`` or a contiguous copy of it, and the path that handles it."""
    if x.device.type != "cpu" or x.numel() == 0:
        return x, "generic"
    if x.is_contiguous():
        return x, "rows"
    if x.movedim(1, -1).is_contiguous():
        return x, "cl"
    return x.contiguous(), "rows"


def _nmc(t: Tensor, n: int, m: int, c: int) -> Tensor:
    """Channels-last ``(N, C, *spatial)`` as its ``(N, M, C)`` view (a copy if ``t`` is not
    channels-last)."""
    return t.movedim(1, -1).reshape(n, m, c)


def _row_sums(dy: Tensor, x: Tensor, mean: Tensor, ones: Tensor) -> tuple[Tensor, Tensor]:
    """``(sum((x - mean) * dy), sum(dy))`` per row of ``(1, R, M)`` views, in one pass.

    ATen's eval-mode BatchNorm backward with variance 1 and eps 0 (invstd exactly 1) returns
    these as grad_weight and grad_bias, in float32 for fp16/bf16 inputs."""
    _, dot, s = _nbn_backward(dy, x, None, mean, ones, None, None, False, 0.0, [False, True, True])
    return dot, s


def _row_affine(x: Tensor, scale: Tensor, shift: Tensor, mean: Tensor, ones: Tensor, out: Tensor) -> Tensor:
    """``out = scale * (x - mean) + shift`` per row of ``(1, R, M)`` views, one vectorised pass.

    ATen's eval-mode BatchNorm with variance 1 and eps 0; ``out`` may be ``x`` itself (each
    element is read before it is written). fp16/bf16 ``x`` (and ``out``) with float32
    coefficients is computed in float32."""
    e = mean.new_empty(0)
    torch.native_batch_norm(x, scale, shift, mean, ones, False, 0.0, 0.0, out=(out, e, e))
    return out


# Channels-last inputs with large samples: per-sample calls of the (vectorised, channels-last)
# BatchNorm backward kernel give sum(dy) and sum((x - mean) dy) per (n, c) without a temporary;
# below this many elements per sample the per-call overhead outweighs the saved pass.
_CL_SAMPLE_LOOP_MIN = 32768


def _use_sample_loop(x: Tensor, m: int, c: int) -> bool:
    if m * c < _CL_SAMPLE_LOOP_MIN or x.dim() not in (4, 5):
        return False
    return x.is_contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)


def _cl_sample_sums(dy: Tensor, x: Tensor, mean: Tensor, ones: Tensor) -> tuple[Tensor, Tensor]:
    """``(sum((x - mean) * dy), sum(dy))`` per (n, c) of channels-last 4-D/5-D tensors, (N, C) each;
    ``mean`` is (N, C), or (C,) for every sample."""
    dots, sums = [], []
    per_sample = mean.dim() == 2
    for i in range(x.shape[0]):
        _, dot, s = _nbn_backward(
            dy[i : i + 1], x[i : i + 1], None, mean[i] if per_sample else mean, ones, None, None, False, 0.0, [False, True, True]
        )
        dots.append(dot)
        sums.append(s)
    return torch.stack(dots), torch.stack(sums)


def _centred_stats(
    x: Tensor, path: str, sd: torch.dtype, eps: float, ones: Tensor, zeros: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Instance statistics by the exact two-pass method, without a full-size temporary.

    ``mu_nc = sum(x) / M``; ``yc = x - mu_nc`` is written into a new buffer ``y`` (the output
    buffer of the layer for float32/float64 inputs); one reduction of ``yc`` gives
    ``var_nc = mean(yc^2)`` with no ``E[x^2] - E[x]^2`` cancellation (ATen's BatchNorm does the
    same). ``ones`` and ``zeros`` (one entry per channel) serve the channels-last sample loop.

    Returns ``(y, yc, mu_nc, var_nc + eps)``; ``yc`` is the row / (N, M, C) view of ``y``.
    """
    n, c = x.shape[0], x.shape[1]
    nc = n * c
    m = x.numel() // nc
    if path == "cl":
        xv = _nmc(x, n, m, c)
        total = xv.sum(1) if x.dtype == sd else xv.sum(1, dtype=sd)  # (N, C)
        y = torch.empty_like(x, dtype=sd)  # keeps the channels-last strides
        yc = torch.sub(xv, total.unsqueeze(1), alpha=1.0 / m, out=_nmc(y, n, m, c))
        if _use_sample_loop(y, m, c):
            ss = _cl_sample_sums(y, y, zeros, ones)[0]
        else:
            ss = torch.linalg.vector_norm(yc, dim=1).square_()
    else:
        xv = x.view(1, nc, m)
        total = xv.sum(-1) if x.dtype == sd else xv.sum(-1, dtype=sd)  # (1, NC)
        y = torch.empty(x.shape, dtype=sd, device=x.device)
        yc = torch.sub(xv, total.unsqueeze(-1), alpha=1.0 / m, out=y.view(1, nc, m))
        # a plain reduction of one tensor: faster than the two-input BatchNorm kernel
        ss = torch.linalg.vector_norm(yc, dim=-1).square_()
    return y, yc, total.view(n, c).mul_(1.0 / m), ss.view(n, c).mul_(1.0 / m).add_(eps)


class _FusedBIN(torch.autograd.Function):
    """``apply(x, rho, w_b, b_b, w_i, b_i, mu_b_fixed, var_b_fixed, eps, sync=None) -> (y, mu_b, var_b)``.

    ``mu_b, var_b`` are the batch statistics (non-differentiable) when ``mu_b_fixed`` is None and
    empty tensors otherwise. ``sync`` (the synchronised layers) supplies the batch statistics of
    the whole process group and sums the per-channel gradient sums over it. The backward is
    hand-written and once-differentiable; the coefficients come from ``_bin_math``.
    """

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
        sync: Any = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        ctx.set_materialize_grads(False)
        sd = stat_dtype(x.dtype)
        ctx.param_dtypes = (rho.dtype, w_b.dtype, b_b.dtype, w_i.dtype, b_i.dtype)
        if rho.dtype != sd or w_b.dtype != sd or b_b.dtype != sd or w_i.dtype != sd or b_i.dtype != sd:
            rho, w_b, b_b, w_i, b_i = [t.to(sd) for t in (rho, w_b, b_b, w_i, b_i)]
        x, path = _layout(x)
        n, c = x.shape[0], x.shape[1]
        nc = n * c
        m = math.prod(x.shape[2:])
        # -- instance statistics (v_nc = var_nc + eps) ---------------------------------------------
        if path == "generic":
            var_nc, mu_nc = instance_stats(x)
            v_nc = var_nc + eps
            ones = zeros = y = yc = None
        else:
            ones = torch.ones(nc if path == "rows" else c, dtype=sd, device=x.device)
            zeros = torch.zeros_like(ones)
            y, yc, mu_nc, v_nc = _centred_stats(x, path, sd, eps, ones, zeros)
        # -- BN statistics: of the batch (of the group under sync), or the running ones ----------
        count: Union[int, Tensor, None] = None
        if mu_b_fixed is None and sync is None:
            # batch_stats of (var + eps) is (var_B + eps): eps added once per (n, c) averages to eps
            mu_b, v_b, dev = batch_stats(v_nc, mu_nc)
            var_b = v_b - eps
            count = n * m
        else:
            if mu_b_fixed is None:
                mu_b, var_b = sync.batch_stats(v_nc - eps, mu_nc, m, False)
                count = sync.count
            else:
                assert var_b_fixed is not None
                mu_b, var_b = mu_b_fixed.to(sd), var_b_fixed.to(sd)  # no copy when the dtype matches
            v_b = var_b + eps
            dev = mu_nc - mu_b
        inv_nc = v_nc.rsqrt_()
        inv_b = v_b.rsqrt()
        scale, shift, a_b, a_i = coefficients(rho, w_b, b_b, w_i, b_i, inv_b, inv_nc, dev)
        # -- y = scale * (x - mu_nc) + shift ---------------------------------------------------
        if path == "generic":
            y = apply_affine(x, scale, about(scale, shift, mu_nc))
        elif path == "rows" and x.dtype == sd:  # y holds yc = x - mu_nc: rescale it in place
            assert yc is not None and ones is not None and zeros is not None
            _row_affine(yc, scale.view(nc), shift.view(nc), zeros, ones, out=yc)
        elif path == "cl":
            assert y is not None and yc is not None
            torch.addcmul(shift.unsqueeze(1), yc, scale.unsqueeze(1), out=yc)
            if y.dtype != x.dtype:
                y = y.to(x.dtype)
        else:  # fp16 / bf16 rows: one mixed-precision pass from x (computed in float32)
            assert ones is not None
            y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
            _row_affine(x.view(1, nc, m), scale.view(nc), shift.view(nc), mu_nc.view(nc), ones, out=y.view(1, nc, m))
        ctx.save_for_backward(x, rho, w_b, b_b, w_i, b_i, inv_b, mu_nc, inv_nc, dev, a_i, a_b, scale)
        ctx.path, ctx.ones, ctx.count, ctx.sync = path, ones, count, sync
        # The batch statistics are returned so that the caller can update running buffers
        # without recomputing them (empty when running statistics were used).
        if mu_b_fixed is not None:
            mu_b, var_b = mu_nc.new_empty(0), mu_nc.new_empty(0)
        ctx.mark_non_differentiable(mu_b, var_b)
        assert y is not None
        return y, mu_b, var_b

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Optional[Tensor], _dmu: Optional[Tensor], _dvar: Optional[Tensor]):  # type: ignore[override]
        x, rho, w_b, b_b, w_i, b_i, inv_b, mu_nc, inv_nc, dev, a_i, a_b, scale = ctx.saved_tensors
        need, sync, path, ones = ctx.needs_input_grad, ctx.sync, ctx.path, ctx.ones
        if dy is None:  # y did not reach the loss
            if sync is None or ctx.count is None or not need[0]:
                return (None,) * 10
            dy = torch.zeros_like(x)  # the other ranks wait for this rank's (zero) sums
        sd = mu_nc.dtype
        n, c = x.shape[0], x.shape[1]
        nc = n * c
        m = math.prod(x.shape[2:])
        # -- one reduction over (x, dy): s1 = sum dy, dot = sum (x - mu_nc) dy per (n, c) -------
        if path == "rows":
            xv = x.view(1, nc, m)
            dyv = dy.contiguous().view(1, nc, m)
            dot, s1 = _row_sums(dyv, xv, mu_nc.view(nc), ones)
            dot, s1 = dot.view(n, c), s1.view(n, c)
        elif path == "cl":
            xv = _nmc(x, n, m, c)
            if _use_sample_loop(x, m, c) and dy.dtype == x.dtype:
                dy = dy.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
                dot, s1 = _cl_sample_sums(dy, x, mu_nc, ones)
                dyv = _nmc(dy, n, m, c)
            else:
                dyv = _nmc(dy, n, m, c)
                s1 = dyv.sum(1) if dyv.dtype == sd else dyv.sum(1, dtype=sd)
                xc = torch.sub(xv, mu_nc.unsqueeze(1))
                dot = torch.linalg.vecdot(xc, dyv if dyv.dtype == sd else dyv.to(sd), dim=1)
                del xc
        else:
            dims = tuple(range(2, x.dim()))
            xf = x if x.dtype == sd else x.to(sd)
            dyf = dy if dy.dtype == sd else dy.to(sd)
            s1 = dyf.sum(dims)
            dot = ((xf - bcast(mu_nc, x.dim())) * dyf).sum(dims)
        t_i, t_b = gradient_sums(dot, s1, dev, inv_b, inv_nc)
        s1_c = s1.sum(0)
        grads = parameter_grads(rho, w_b, b_b, w_i, b_i, t_b, s1_c, t_i.sum(0), need[1:6], ctx.param_dtypes)
        if not need[0]:
            return (None, *grads, None, None, None, None)
        batch = None
        if ctx.count is not None:  # the BN branch used batch statistics
            if sync is not None:  # dx needs the sums over the whole group's batch
                glob = sync.sum(torch.cat([s1_c, t_b]))
                s1_c, t_b = glob[:c], glob[c:]
            batch = (t_b, s1_c, dev, ctx.count)
        if x.numel() == 0:
            return (torch.zeros_like(x), *grads, None, None, None, None)
        cx, c0 = dx_coefficients(a_b, a_i, inv_b, inv_nc, t_i, s1, m, batch)
        # dx = scale * dy + cx * (x - mu_nc) + c0
        if path == "rows" and x.dtype == sd:
            dx = torch.empty(x.shape, dtype=sd, device=x.device)
            dxv = _row_affine(xv, cx.view(nc), c0.view(nc), mu_nc.view(nc), ones, out=dx.view(1, nc, m))
            dxv.addcmul_(dyv, scale.view(1, nc, 1))
        elif path == "rows":  # fp16 / bf16: accumulate in float32, round once
            dxv = torch.mul(xv, cx.view(1, nc, 1))
            dxv.addcmul_(dyv, scale.view(1, nc, 1)).add_(about(cx, c0, mu_nc).view(1, nc, 1))
            dx = dxv.view(x.shape).to(x.dtype)
        elif path == "cl":
            dx = torch.empty_like(x, dtype=sd)
            dxv = torch.addcmul(about(cx, c0, mu_nc).unsqueeze(1), xv, cx.unsqueeze(1), out=_nmc(dx, n, m, c))
            dxv.addcmul_(dyv, scale.unsqueeze(1))
        else:
            nd = x.dim()
            dx = torch.addcmul(bcast(about(cx, c0, mu_nc), nd), xf, bcast(cx, nd)).addcmul_(dyf, bcast(scale, nd))
        if dx.dtype != x.dtype:
            dx = dx.to(x.dtype)
        return (dx, *grads, None, None, None, None)


@register_backend("fused")
def fused_backend(a: BINArgs) -> Tensor:
    fixed = (a.running_mean, a.running_var) if a.mode == "eval" else (None, None)
    y, mu_b, var_b = _FusedBIN.apply(a.x, *mixing_terms(a), *fixed, a.eps, a.group)
    if a.mode == "update":
        count = a.group.count if a.group is not None else a.x.shape[0] * math.prod(a.x.shape[2:])
        update_running_stats(a, mu_b, var_b, count)
    return y
