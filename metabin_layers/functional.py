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

* ``"fused"``: a custom ``torch.autograd.Function`` with a hand-written backward. It is the
  fast path; its backward is ``once_differentiable`` (double backward raises).
* ``"composite"``: the same formulas as ordinary differentiable torch ops. Autograd derives its
  backward, so double backward works (second-order meta steps use it).

How the fused path runs on the CPU (plain ATen kernels, no compiled extension). A contiguous
input is viewed as ``(1, N*C, M)``: one row per ``(n, c)``, ``M`` the spatial size.

* forward, four vectorised passes and no full-size temporary: ``sum(x)`` per row gives the row
  mean ``m``; ``y <- x - m`` is written into the output buffer; one fused reduction of ``y``
  gives ``sum(y)`` and ``sum(y * y)``, the exact two-pass variance (no ``E[x^2] - E[x]^2``
  cancellation, and much faster than ``var_mean``, whose CPU kernel is a scalar Welford loop);
  then ``y <- scale * y + shift`` in place.
* backward, three passes: one fused reduction gives ``sum(dy)`` and ``sum((x - mu_nc) * dy)``
  per row (no ``dy * x`` temporary); ``dx = cx * (x - mu_nc) + c0`` is written in one pass and
  ``dx += scale * dy`` in place.

The per-row reductions and per-row affine maps are ATen's BatchNorm CPU kernels applied to the
``(1, N*C, M)`` view: eval-mode BatchNorm with mean ``mu``, variance 1 and eps 0 computes
``w * (x - mu) + b``, and eval-mode BatchNorm backward returns ``sum(dy)`` and
``sum((x - mu) * dy)``. They are vectorised, take one coefficient per row and allocate nothing
(elementwise ops with two per-row broadcast operands, e.g. ``addcmul(shift, x, scale)``, run a
scalar loop instead). Channels-last inputs are viewed as ``(N, M, C)``, where per-(n, c)
operands are contiguous along ``C`` and plain elementwise ops vectorise. Other devices use the
same formulas with generic tensor ops (see ``_layout``).
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    "batch_instance_norm",
    "BACKENDS",
    "BACKEND_ENV",
    "resolve_backend",
    "triton_fallback_reason",
    "reset_triton_fallback",
]

BACKENDS = ("fused", "composite", "triton")
"""Names accepted by ``batch_instance_norm(..., backend=...)``: ``"fused"`` (plain PyTorch with a
hand-written backward; the CPU path), ``"composite"`` (differentiable twice; the reference) and
``"triton"`` (Triton kernels; CUDA, or CPU under ``TRITON_INTERPRET=1`` for testing)."""

BACKEND_ENV = "METABIN_BACKEND"
"""Environment variable that forces the backend chosen by ``"auto"`` (e.g. ``METABIN_BACKEND=fused``)."""


def resolve_backend(x: Tensor, backend: str = "auto") -> str:
    """The backend that ``backend`` means for input ``x``.

    ``"auto"`` picks ``$METABIN_BACKEND`` when set; else ``"triton"`` for CUDA tensors when the
    compiled kernels passed the library's CUDA tests for this release
    (``metabin_layers.kernels.cuda_validated``), Triton imports and the kernels have not
    failed in this process (``triton_fallback_reason``); else ``"fused"``, whose CUDA path
    is plain ATen ops. Any other value is returned as it is (validated).

    Args:
        x: the input the layer is about to normalise (its device decides ``"auto"``).
        backend: ``"auto"`` or one of ``BACKENDS``.

    Returns:
        One of ``BACKENDS``.

    Raises:
        ValueError: ``backend`` is neither ``"auto"`` nor one of ``BACKENDS``.

    Examples:
        >>> resolve_backend(torch.zeros(2, 3, 4))
        'fused'
    """
    return _resolve(x, backend)[0]


def _resolve(x: Tensor, backend: str) -> tuple[str, bool]:
    """``(backend, may_fall_back)``: the concrete backend, and whether ``"auto"`` chose Triton
    itself (then a Triton failure falls back to ``"fused"`` instead of raising)."""
    if backend == "auto":
        forced = os.environ.get(BACKEND_ENV, "").strip().lower()
        if forced and forced != "auto":
            if forced not in BACKENDS:
                raise ValueError(f"{BACKEND_ENV} must be 'auto' or one of {BACKENDS}, got {forced!r}")
            return forced, False
        if _auto_prefers_triton(x):
            return "triton", True
        return "fused", False
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    return backend, False


def _auto_prefers_triton(x: Tensor) -> bool:
    if not x.is_cuda or _TRITON_FAILURE:
        return False
    from . import kernels

    return kernels.cuda_validated() and kernels.is_available(x)


# The first Triton failure of this process under backend="auto" (compile or launch error): from
# then on "auto" runs the fused path. Inspect with triton_fallback_reason(), clear with
# reset_triton_fallback().
_TRITON_FAILURE: list[str] = []


def triton_fallback_reason() -> Optional[str]:
    """Why ``backend="auto"`` stopped using the Triton kernels in this process, or None.

    Returns:
        The first Triton failure of this process (where it happened, the exception type and
        message), or None when there was none since the start or the last
        ``reset_triton_fallback``.

    Examples:
        >>> triton_fallback_reason() is None
        True
    """
    return _TRITON_FAILURE[0] if _TRITON_FAILURE else None


def reset_triton_fallback() -> None:
    """Let ``backend="auto"`` try the Triton kernels again (after ``triton_fallback_reason``).

    After a Triton failure, ``backend="auto"`` uses the ``fused`` backend for the rest of the
    process; this forgets the failure (for instance after fixing the Triton install).

    Examples:
        >>> from metabin_layers.functional import reset_triton_fallback, triton_fallback_reason
        >>> reset_triton_fallback()
        >>> triton_fallback_reason() is None
        True
    """
    _TRITON_FAILURE.clear()


def _record_triton_failure(where: str, err: BaseException) -> None:
    """Remember the first failure and warn once; later calls of "auto" choose "fused"."""
    if _TRITON_FAILURE:
        return
    reason = f"{where}: {type(err).__name__}: {err}"
    _TRITON_FAILURE.append(reason)
    warnings.warn(
        f"metabin_layers: the Triton kernels failed in the {reason}. This call and every later "
        "backend='auto' call of this process use the 'fused' backend instead (same results). "
        "Pass backend='triton' to get the error raised.",
        RuntimeWarning,
        stacklevel=3,
    )


_aten = torch.ops.aten


def _stat_dtype(x: Tensor) -> torch.dtype:
    # Statistics are kept in float32 at least, also for fp16/bf16 activations.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _affine_or(value: Optional[Tensor], fill: float, like: Tensor) -> Tensor:
    if value is None:
        return torch.full_like(like, fill)
    return value if value.dtype == like.dtype else value.to(like.dtype)


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
        dt = running_mean.dtype
        running_mean.lerp_(mu_b if mu_b.dtype == dt else mu_b.to(dt), factor)
        unbiased = var_b * (count / (count - 1))
        dt = running_var.dtype
        running_var.lerp_(unbiased if unbiased.dtype == dt else unbiased.to(dt), factor)


# -- the fused path ------------------------------------------------------------------------------
#
# Three ways to run the same math, chosen per call:
#
# * "rows" (CPU, contiguous input): x is viewed as (1, N*C, M) rows. Per-row reductions and per-row
#   affine maps use ATen's BatchNorm CPU kernels on that view: the eval-mode forward with mean 0,
#   variance 1 and eps 0 is ``w * x + b`` per row, and the eval-mode backward returns
#   ``sum(dy)`` and ``sum((x - mean) * dy)`` per row. Both are vectorised, take one coefficient
#   per row and write no temporary; elementwise ops with two per-row broadcast operands (e.g.
#   ``addcmul(shift, x, scale)``) would run a scalar loop instead.
# * "cl" (CPU, channels-last input): x is viewed as (N, M, C); per-(n, c) broadcasts are then
#   contiguous along C and plain elementwise ops vectorise. For large samples the per-(n, c)
#   reductions call the channels-last BatchNorm backward kernel once per sample.
# * "generic" (other devices, empty inputs): plain tensor ops (var_mean, sum, addcmul).

_CONSTS: dict = {}


def _const(n: int, value: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A cached, read-only vector ``full(n, value)`` (mean 0 / variance 1 of the BN kernels)."""
    key = (n, value, dtype, device)
    t = _CONSTS.get(key)
    if t is None:
        if len(_CONSTS) > 256:
            _CONSTS.clear()
        t = torch.full((n,), value, dtype=dtype, device=device)
        _CONSTS[key] = t
    return t


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
    _, dot, s = _aten.native_batch_norm_backward(dy, x, None, mean, ones, None, None, False, 0.0, [False, True, True])
    return dot, s


def _row_affine(x: Tensor, scale: Tensor, shift: Tensor, mean: Tensor, ones: Tensor, out: Tensor) -> Tensor:
    """``out = scale * (x - mean) + shift`` per row of ``(1, R, M)`` views, one vectorised pass.

    ATen's eval-mode BatchNorm with variance 1 and eps 0; ``out`` may be ``x`` itself (each
    element is read before it is written). fp16/bf16 ``x`` (and ``out``) with float32
    coefficients is computed in float32."""
    e = x.new_empty(0, dtype=scale.dtype)
    _aten.native_batch_norm.out(x, scale, shift, mean, ones, False, 0.0, 0.0, out=out, save_mean=e, save_invstd=e)
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
        _, dot, s = _aten.native_batch_norm_backward(
            dy[i : i + 1],
            x[i : i + 1],
            None,
            mean[i] if per_sample else mean,
            ones,
            None,
            None,
            False,
            0.0,
            [False, True, True],
        )
        dots.append(dot)
        sums.append(s)
    return torch.stack(dots), torch.stack(sums)


def _centred_stats(x: Tensor, path: str, sd: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor, Optional[Tensor]]:
    """Instance statistics by the exact two-pass method, without a full-size temporary.

    ``mean0 = sum(x) / M``; ``yc = x - mean0`` is written into a new buffer ``y`` (the output
    buffer of the layer for float32/float64 inputs); one fused reduction of ``yc`` gives
    ``d = mean(yc)`` (rounding level) and ``mean(yc^2)``, so ``mu_nc = mean0 + d`` and
    ``var_nc = mean(yc^2) - d^2`` carry no ``E[x^2] - E[x]^2`` cancellation.

    Returns ``(y, mean0, d, var_nc, yc)``; ``yc`` is the row / (N, M, C) view of ``y``.
    """
    n, c = x.shape[0], x.shape[1]
    nc = n * c
    m = x.numel() // nc
    inv_m = 1.0 / m
    if path == "cl":
        xv = _nmc(x, n, m, c)
        mean0 = (xv.sum(1) if x.dtype == sd else xv.sum(1, dtype=sd)).mul_(inv_m)  # (N, C)
        y = torch.empty_like(x, dtype=sd)  # keeps the channels-last strides
        yc = torch.sub(xv, mean0.unsqueeze(1), out=_nmc(y, n, m, c))
        if _use_sample_loop(y, m, c):
            ss, s = _cl_sample_sums(y, y, _const(c, 0.0, sd, x.device), _const(c, 1.0, sd, x.device))
        else:
            s = yc.sum(1)
            ss = torch.linalg.vecdot(yc, yc, dim=1)
    else:
        xv = x.view(1, nc, m)
        mean0 = (xv.sum(-1) if x.dtype == sd else xv.sum(-1, dtype=sd)).view(n, c).mul_(inv_m)
        y = torch.empty(x.shape, dtype=sd, device=x.device)
        yc = torch.sub(xv, mean0.view(1, nc, 1), out=y.view(1, nc, m))
        ss, s = _row_sums(yc, yc, _const(nc, 0.0, sd, x.device), _const(nc, 1.0, sd, x.device))
        ss, s = ss.view(n, c), s.view(n, c)
    d = s.mul_(inv_m)
    var_nc = torch.addcmul(ss.mul_(inv_m), d, d, value=-1).clamp_min_(0.0)
    return y, mean0, d, var_nc, yc


class _FusedBIN(torch.autograd.Function):
    """``apply(x, rho, w_b, b_b, w_i, b_i, mu_b_fixed, var_b_fixed, eps) -> (y, mu_b, var_b)``.

    ``mu_b, var_b`` are the batch statistics (non-differentiable) when ``mu_b_fixed`` is None and
    empty tensors otherwise. The backward is hand-written and once-differentiable.
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
    ) -> tuple[Tensor, Tensor, Tensor]:
        ctx.set_materialize_grads(False)
        sd = _stat_dtype(x)
        rho_, w_b_, b_b_, w_i_, b_i_ = [t if t.dtype == sd else t.to(sd) for t in (rho, w_b, b_b, w_i, b_i)]
        use_batch = mu_b_fixed is None
        x, path = _layout(x)
        n, c = x.shape[0], x.shape[1]
        nc = n * c
        # -- instance statistics ---------------------------------------------------------------
        y: Optional[Tensor]
        yc: Optional[Tensor]
        d: Optional[Tensor]
        if path == "generic":
            var_nc, mu_nc = _instance_stats(x)
            y = yc = d = None
        else:
            y, mean0, d, var_nc, yc = _centred_stats(x, path, sd)
            mu_nc = mean0 + d
        # -- batch statistics (law of total variance) or the running ones ----------------------
        if use_batch:
            mu_b = mu_nc.mean(0)
            dev = mu_nc - mu_b
            var_b = torch.addcmul(var_nc, dev, dev).mean(0)
        else:
            assert mu_b_fixed is not None and var_b_fixed is not None
            mu_b = mu_b_fixed.to(sd)  # no copy when the dtype already matches
            var_b = var_b_fixed.to(sd)
            dev = mu_nc - mu_b
        inv_nc = var_nc.add(eps).rsqrt_()
        inv_b = var_b.add(eps).rsqrt_()
        # -- y = scale * (x - mu_nc) + shift -----------------------------------------------------
        a_b = torch.mul(rho_, w_b_).mul_(inv_b)  # rho w_B / s_B, (C,)
        a_i = torch.addcmul(w_i_, rho_, w_i_, value=-1) * inv_nc  # (1 - rho) w_I / s_nc, (N, C)
        scale = a_i + a_b
        shift = torch.addcmul(torch.lerp(b_i_, b_b_, rho_), a_b, dev)  # rho b_B + (1 - rho) b_I + a_B (mu_nc - mu_B)
        if path == "generic":
            nd = x.dim()
            shift.addcmul_(scale, mu_nc, value=-1)  # y = scale * x + shift
            if x.dtype == sd:
                y = torch.addcmul(_bcast(shift, nd), x, _bcast(scale, nd))
            else:
                y = torch.addcmul(_bcast(shift, nd), x, _bcast(scale, nd)).to(x.dtype)
        elif x.dtype == sd:  # y holds yc = x - mean0 = x - mu_nc + d: rescale it in place
            assert yc is not None and d is not None
            shift.addcmul_(scale, d, value=-1)
            if path == "cl":
                torch.addcmul(shift.unsqueeze(1), yc, scale.unsqueeze(1), out=yc)
            else:
                zeros, ones = _const(nc, 0.0, sd, x.device), _const(nc, 1.0, sd, x.device)
                _row_affine(yc, scale.view(nc), shift.view(nc), zeros, ones, out=yc)
        elif path == "cl":  # fp16 / bf16
            assert y is not None and yc is not None and d is not None
            shift.addcmul_(scale, d, value=-1)
            torch.addcmul(shift.unsqueeze(1), yc, scale.unsqueeze(1), out=yc)
            y = y.to(x.dtype)
        else:  # fp16 / bf16 rows: one mixed-precision pass from x (computed in float32)
            y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
            m = x.numel() // nc
            ones = _const(nc, 1.0, sd, x.device)
            _row_affine(x.view(1, nc, m), scale.view(nc), shift.view(nc), mu_nc.view(nc), ones, out=y.view(1, nc, m))
        ctx.save_for_backward(x, rho_, w_b_, b_b_, w_i_, b_i_, inv_b, mu_nc, inv_nc, dev, a_i, a_b, scale)
        ctx.use_batch = use_batch
        ctx.path = path
        ctx.param_dtypes = (rho.dtype, w_b.dtype, b_b.dtype, w_i.dtype, b_i.dtype)
        # The batch statistics are returned so that the caller can update running buffers
        # without recomputing them (empty when running statistics were used).
        if use_batch:
            stats = (mu_b, var_b)
        else:
            stats = (x.new_empty(0, dtype=sd), x.new_empty(0, dtype=sd))
        ctx.mark_non_differentiable(*stats)
        assert y is not None
        return y, stats[0], stats[1]

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Optional[Tensor], _dmu: Optional[Tensor], _dvar: Optional[Tensor]):  # type: ignore[override]
        if dy is None:  # y did not reach the loss
            return (None,) * 9
        x, rho, w_b, b_b, w_i, b_i, inv_b, mu_nc, inv_nc, dev, a_i, a_b, scale = ctx.saved_tensors
        sd = mu_nc.dtype
        n, c = x.shape[0], x.shape[1]
        nc = n * c
        m = x.numel() // nc if nc else 0
        path = ctx.path
        need = ctx.needs_input_grad
        # -- one reduction over (x, dy): s1 = sum dy, dot = sum (x - mu_nc) dy per (n, c) -------
        if path == "rows":
            xv = x.view(1, nc, m)
            dyv = dy.contiguous().view(1, nc, m)
            ones = _const(nc, 1.0, sd, x.device)
            dot, s1 = _row_sums(dyv, xv, mu_nc.view(nc), ones)
            dot, s1 = dot.view(n, c), s1.view(n, c)
        elif path == "cl":
            xv = _nmc(x, n, m, c)
            if _use_sample_loop(x, m, c) and dy.dtype == x.dtype:
                dy = dy.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
                dot, s1 = _cl_sample_sums(dy, x, mu_nc, _const(c, 1.0, sd, x.device))
                dyv = _nmc(dy, n, m, c)
            else:
                dyv = _nmc(dy, n, m, c)
                s1 = dyv.sum(1) if dyv.dtype == sd else dyv.sum(1, dtype=sd)
                xc = torch.sub(xv, mu_nc.unsqueeze(1))
                dot = torch.linalg.vecdot(xc, dyv if dyv.dtype == sd else dyv.to(sd), dim=1)
                del xc
        else:
            dims = tuple(range(2, x.dim()))
            nd = x.dim()
            xf = x if x.dtype == sd else x.to(sd)
            dyf = dy if dy.dtype == sd else dy.to(sd)
            s1 = dyf.sum(dims)
            dot = ((xf - _bcast(mu_nc, nd)) * dyf).sum(dims)
        t_i = inv_nc * dot  # sum over the slice of dy * x_hat_I, (N, C)
        t_b = torch.addcmul(dot, dev, s1).sum(0).mul_(inv_b)  # sum of dy * x_hat_B, (C,)
        s1_c = s1.sum(0)
        ti_c = t_i.sum(0)
        pd = ctx.param_dtypes
        grads: list[Optional[Tensor]] = [None] * 9
        if need[1]:  # rho: w_B t_B + b_B S1 - w_I t_I - b_I S1
            g = torch.addcmul(w_b * t_b, b_b - b_i, s1_c).addcmul_(w_i, ti_c, value=-1)
            grads[1] = g if g.dtype == pd[0] else g.to(pd[0])
        if need[2]:
            g = rho * t_b
            grads[2] = g if g.dtype == pd[1] else g.to(pd[1])
        if need[3]:
            g = rho * s1_c
            grads[3] = g if g.dtype == pd[2] else g.to(pd[2])
        if need[4]:
            g = torch.addcmul(ti_c, rho, ti_c, value=-1)  # (1 - rho) t_I
            grads[4] = g if g.dtype == pd[3] else g.to(pd[3])
        if need[5]:
            g = torch.addcmul(s1_c, rho, s1_c, value=-1)
            grads[5] = g if g.dtype == pd[4] else g.to(pd[4])
        if not need[0]:
            return tuple(grads)
        if m == 0:
            grads[0] = torch.zeros_like(x)
            return tuple(grads)
        # dx = scale * dy + cx * (x - mu_nc) + c0 per (n, c), with
        #   IN branch: cx = -a_I t_I / (M s_nc), c0 = -a_I S1 / M
        #   BN branch: cx += -a_B t_B / (NM s_B), c0 += -a_B S1_c / (NM) + cx_B (mu_nc - mu_B)
        if ctx.use_batch:
            k = -1.0 / (n * m)
            cx_b = (a_b * inv_b).mul_(t_b).mul_(k)  # (C,)
            cx = torch.addcmul(cx_b, a_i * inv_nc, t_i, value=-1.0 / m)
            c0 = torch.addcmul(cx_b * dev, a_b, s1_c, value=k).addcmul_(a_i, s1, value=-1.0 / m)
        else:
            cx = (a_i * inv_nc).mul_(t_i).mul_(-1.0 / m)
            c0 = (a_i * s1).mul_(-1.0 / m)
        if path == "rows" and x.dtype == sd:
            dx = torch.empty(x.shape, dtype=sd, device=x.device)
            dxv = _row_affine(xv, cx.view(nc), c0.view(nc), mu_nc.view(nc), ones, out=dx.view(1, nc, m))
            dxv.addcmul_(dyv, scale.view(1, nc, 1))
        elif path == "rows":  # fp16 / bf16: accumulate in float32, round once
            c0.addcmul_(cx, mu_nc, value=-1)
            dxv = torch.mul(xv, cx.view(1, nc, 1))
            dxv.addcmul_(dyv, scale.view(1, nc, 1)).add_(c0.view(1, nc, 1))
            dx = dxv.view(x.shape).to(x.dtype)
        elif path == "cl":
            c0.addcmul_(cx, mu_nc, value=-1)
            dx = torch.empty_like(x, dtype=sd)
            dxv = torch.addcmul(c0.unsqueeze(1), xv, cx.unsqueeze(1), out=_nmc(dx, n, m, c))
            dxv.addcmul_(dyv, scale.unsqueeze(1))
            if dx.dtype != x.dtype:
                dx = dx.to(x.dtype)
        else:
            c0.addcmul_(cx, mu_nc, value=-1)
            dx = torch.addcmul(_bcast(c0, nd), xf, _bcast(cx, nd)).addcmul_(dyf, _bcast(scale, nd))
            if dx.dtype != x.dtype:
                dx = dx.to(x.dtype)
        grads[0] = dx
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
    scale, shift = _coefficients(p[0], p[1], p[2], p[3], p[4], mu_b, torch.rsqrt(var_b + eps), mu_nc, torch.rsqrt(var_nc + eps))
    return _apply(x, scale, shift), mu_b.detach(), var_b.detach()


def _triton(
    x: Tensor,
    rho: Tensor,
    w_b: Tensor,
    b_b: Tensor,
    w_i: Tensor,
    b_i: Tensor,
    mu_fixed: Optional[Tensor],
    var_fixed: Optional[Tensor],
    eps: float,
    may_fall_back: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    if not may_fall_back:
        from .kernels import is_available

        if not is_available(x):
            raise RuntimeError(
                "backend='triton' needs Triton and a CUDA tensor (or TRITON_INTERPRET=1 for testing on CPU); "
                f"got a {x.device.type} tensor"
            )
        from .kernels.triton_bin import TritonBIN

        return TritonBIN.apply(x, rho, w_b, b_b, w_i, b_i, mu_fixed, var_fixed, eps)
    try:
        from .kernels.triton_bin import TritonBIN

        # fallback=True: a failing backward kernel recomputes the gradients with the composite ops
        return TritonBIN.apply(x, rho, w_b, b_b, w_i, b_i, mu_fixed, var_fixed, eps, True)
    except Exception as err:  # noqa: BLE001  (Triton compile / launch errors have no common base class)
        _record_triton_failure("forward", err)
        return _FusedBIN.apply(x, rho, w_b, b_b, w_i, b_i, mu_fixed, var_fixed, eps)


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
        weight: weight of the BN branch, ``(C,)`` or None (1).
        bias: bias of the BN branch, ``(C,)`` or None (0).
        in_weight: weight of the IN branch, ``(C,)`` or None (1).
        in_bias: bias of the IN branch, ``(C,)`` or None (0).
        running_mean: BN running mean, used when ``use_batch_stats`` is False and updated in place
            when ``update_running_stats`` is True.
        running_var: BN running variance, used and updated like ``running_mean``.
        use_batch_stats: normalise the BN branch with the statistics of this batch.
        update_running_stats: blend the batch statistics into the running buffers with
            ``momentum`` (nn.BatchNorm semantics: unbiased variance is stored).
        momentum: weight of the new batch statistics in the running average.
        eps: added to the variances.
        backend: ``"fused"`` (custom backward, fast), ``"composite"`` (plain autograd ops,
            supports double backward), ``"triton"`` (CUDA kernels; see ``BACKENDS``) or
            ``"auto"`` (``resolve_backend``; a Triton failure then falls back to ``"fused"``
            with a warning instead of raising).

    Returns:
        A tensor like ``x``.

    Examples:
        >>> x = torch.randn(4, 3, 5, 5)
        >>> y = batch_instance_norm(x, rho=torch.full((3,), 0.5))
        >>> y.shape
        torch.Size([4, 3, 5, 5])
    """
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    if x.dim() < 3:
        raise ValueError(f"x must have shape (N, C, *spatial) with at least one spatial dimension, got {tuple(x.shape)}")
    if not use_batch_stats and (running_mean is None or running_var is None):
        raise ValueError("use_batch_stats=False needs running_mean and running_var")
    if update_running_stats and (running_mean is None or running_var is None):
        raise ValueError("update_running_stats=True needs running_mean and running_var")
    spatial = math.prod(x.shape[2:])
    count = x.shape[0] * spatial
    if use_batch_stats and count <= 1:
        raise ValueError(f"Expected more than 1 value per channel for batch statistics, got input of shape {tuple(x.shape)}")
    ref = rho
    w_b = _affine_or(weight, 1.0, ref)
    b_b = _affine_or(bias, 0.0, ref)
    w_i = _affine_or(in_weight, 1.0, ref)
    b_i = _affine_or(in_bias, 0.0, ref)
    mu_fixed = None if use_batch_stats else running_mean
    var_fixed = None if use_batch_stats else running_var
    name, may_fall_back = _resolve(x, backend)  # the one backend decision of this call
    if name == "fused":
        y, mu_b, var_b = _FusedBIN.apply(x, rho, w_b, b_b, w_i, b_i, mu_fixed, var_fixed, eps)
    elif name == "triton":
        y, mu_b, var_b = _triton(x, rho, w_b, b_b, w_i, b_i, mu_fixed, var_fixed, eps, may_fall_back)
    else:
        y, mu_b, var_b = _composite(x, rho, w_b, b_b, w_i, b_i, mu_fixed, var_fixed, eps)
    if update_running_stats and use_batch_stats:
        _update_running(running_mean, running_var, mu_b, var_b, count, momentum)  # type: ignore[arg-type]
    return y
