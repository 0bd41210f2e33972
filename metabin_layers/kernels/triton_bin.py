"""Triton kernels for Batch-Instance Normalization as one affine map per (sample, channel).

The math is the one of ``metabin_layers._bin_math`` (see also ``docs/concepts.md``, "The
Batch-Instance Normalization layer")::

    y = A[n, c] * x + B[n, c]
    A = rho * w_B / s_B + (1 - rho) * w_I / s_nc
    B = rho * (b_B - w_B * mu_B / s_B) + (1 - rho) * (b_I - w_I * mu_nc / s_nc)

Four kernels, the memory traffic of BatchNorm (forward 2R + 1W, backward 4R + 1W):

1. ``_stats_kernel``: per-(n, c) mean and M2 (sum of squared deviations) in fp32 (fp64 for
   fp64 inputs). Each program owns one ``(n, channel block)`` and a range of the spatial axis; it
   loops over ``(BLOCK_C, BLOCK_M)`` tiles keeping a Welford (mean, M2) per register lane (no
   cross-thread reduction inside the loop), then merges the ``BLOCK_M`` lanes with Chan's
   parallel combine. Never E[x^2] - E[x]^2. Values are shifted by the row's first element
   ``x[n, c, 0]`` first, so the accumulators hold numbers of the size of the spread even when
   ``|mean| >> std``. When ``N * channel blocks`` is too small to fill the GPU, the spatial axis
   is split over several programs and the partial (mean, M2) are merged by the same Chan
   formula in torch.
2. ``_affine_kernel``: ``y = A * x + B``.
3. ``_bwd_reduce_kernel``: per-(n, c) ``S1 = sum dy`` and ``S2c = sum dy * (x - mu_nc)``.
   ``S2c`` is the centred form of ``S2 = sum dy * x`` (``S2 = S2c + mu_nc * S1``): the same
   quantity, without the cancellation of ``S2 - mu * S1`` when ``|mu| >> std``.
4. ``_dx_kernel``: ``dx = scale * dy + cx * x + c0``.

The O(N * C) work in between (batch statistics, the coefficients A and B, the gradient sums and
the ``dx`` coefficients) is ``metabin_layers._bin_math``, the same functions as every other
backend, on small torch tensors.

Layouts: the kernels index an ``(N, C, M)`` view, ``M`` the product of the spatial dimensions,
in one of two dense layouts: NC(spatial)-contiguous, or channels-last (``N, *spatial, C``
contiguous, e.g. ``torch.channels_last`` / ``channels_last_3d``). For channels-last the tiles
are ``(BLOCK_C, BLOCK_M)`` blocks with the channel axis the contiguous one, so loads are
coalesced along C. Any other strides are made contiguous first. Outputs keep the input's
dtype and layout.

Execution: compiled for CUDA tensors, or in Triton's interpreter (CPU tensors too) when
``TRITON_INTERPRET=1`` was set before Triton was first imported. The mode is per process:
Triton decorates its own ``tl`` library functions at import time, so it cannot change later.

Tiles (``launch_config``): a fixed number of elements per kernel kind (``REDUCE_TILE``,
``ELEMENTWISE_TILE``; half for fp64), split between the channel and the spatial axis by the
extent of the contiguous axis, so the dispatcher chooses among a few compiled variants
(``launch_configs``). Their register use, compiled for sm_80 and sm_90 without a GPU, is
checked by ``benchmarks/kernel_registers.py`` (no spills).
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

from .._bin_math import about, batch_stats, coefficients, dx_coefficients, gradient_sums, parameter_grads, stat_dtype
from . import _interpreter_active, is_available

__all__ = [
    "TritonBIN",
    "triton_bin_forward",
    "triton_bin_backward",
    "is_available",
    "interpret_mode",
]

#: Elements per tile of the reductions (statistics, backward sums) and their warps: 1024 / (32 * 4)
#: = 8 values per thread and accumulator, which keeps the kernels far from register spills (see
#: benchmarks/kernel_registers.py). fp64 halves the tile (a value takes two registers).
REDUCE_TILE = 1024
REDUCE_WARPS = 4
#: Elements per tile of the elementwise kernels (``y = A x + B``, ``dx``) and their warps.
ELEMENTWISE_TILE = 2048
ELEMENTWISE_WARPS = 8
#: Cap on every tile (tests shrink it to force the tile loop and the split reductions).
MAX_TILE = 4096
#: Smallest tile extent along the contiguous axis (spatial for NC*-contiguous, C for channels-last).
MIN_BLOCK = 32
#: Channel block for channels-last tiles, in bytes of the input dtype (128 B -> 32 fp32 channels
#: is the minimum for a fully coalesced warp access; 256 B gives two transactions per row).
CL_ROW_BYTES = 256
#: Programs per SM aimed at by the split-M heuristic of the reductions.
PROGRAMS_PER_SM = 4

_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------------------------
# Kernels (plain Python functions; wrapped as compiled or interpreted Triton functions lazily)
# --------------------------------------------------------------------------------------------


def _stats_kernel(
    x_ptr,
    mean_ptr,
    m2_ptr,
    N,
    C,
    M,
    M_PER_SPLIT,
    n_cblocks,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_M: tl.constexpr,
    ACC: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    cb = pid % n_cblocks
    n = pid // n_cblocks
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    j = tl.arange(0, BLOCK_M)
    c_mask = c < C
    x_base = x_ptr + n.to(tl.int64) * C * M
    m_begin = split * M_PER_SPLIT
    m_end = tl.minimum(m_begin + M_PER_SPLIT, M)
    # Shift by the first value of each row, x[n, c, 0], for every split: the lanes and the
    # split partials then hold values of the size of the spread, not of the mean (stable when
    # |mean| >> std). The stored means are relative to that pivot; the host adds it back.
    if CHANNELS_LAST:
        pivot = tl.load(x_base + c, mask=c_mask, other=0.0).to(ACC)
    else:
        pivot = tl.load(x_base + c * M, mask=c_mask, other=0.0).to(ACC)
    # Welford per lane: lane (c, j) sees x[c, m_begin + j + k * BLOCK_M] for k = 0, 1, ...
    # Only the last tile is partial, so in iteration k every live lane holds k values and the
    # update needs the scalar 1 / (k + 1): no per-element division, no reduction in the loop.
    mean_l = tl.zeros([BLOCK_C, BLOCK_M], dtype=ACC)
    m2_l = tl.zeros([BLOCK_C, BLOCK_M], dtype=ACC)
    for start in range(m_begin, m_end, BLOCK_M):
        m = start + j
        mask = c_mask[:, None] & (m < m_end)[None, :]
        if CHANNELS_LAST:
            offs = m[None, :] * C + c[:, None]
        else:
            offs = c[:, None] * M + m[None, :]
        xv = tl.load(x_base + offs, mask=mask, other=0.0).to(ACC) - pivot[:, None]
        inv_k = 1.0 / ((start - m_begin) // BLOCK_M + 1).to(ACC)
        delta = tl.where(mask, xv - mean_l, 0.0)
        mean_l += delta * inv_k
        m2_l += delta * (xv - mean_l)
    # Chan's combine of the BLOCK_M lanes (law of total variance with per-lane counts)
    length = m_end - m_begin
    cnt_l = ((length - j + BLOCK_M - 1) // BLOCK_M).to(ACC)  # values seen by lane j
    mean = tl.sum(mean_l * cnt_l[None, :], axis=1) / length.to(ACC)
    dev = mean_l - mean[:, None]
    m2 = tl.sum(m2_l, axis=1) + tl.sum(dev * dev * cnt_l[None, :], axis=1)
    out = (split * N + n) * C + c
    tl.store(mean_ptr + out, mean, mask=c_mask)
    tl.store(m2_ptr + out, m2, mask=c_mask)


def _affine_kernel(
    x_ptr,
    a_ptr,
    b_ptr,
    y_ptr,
    C,
    M,
    n_cblocks,
    n_mblocks,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_M: tl.constexpr,
    ACC: tl.constexpr,
):
    pid = tl.program_id(0)
    mb = pid % n_mblocks
    rest = pid // n_mblocks
    cb = rest % n_cblocks
    n = rest // n_cblocks
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    c_mask = c < C
    mask = c_mask[:, None] & (m < M)[None, :]
    if CHANNELS_LAST:
        offs = m[None, :] * C + c[:, None]
    else:
        offs = c[:, None] * M + m[None, :]
    base = n.to(tl.int64) * C * M
    a = tl.load(a_ptr + n * C + c, mask=c_mask, other=0.0)
    b = tl.load(b_ptr + n * C + c, mask=c_mask, other=0.0)
    xv = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(ACC)
    y = xv * a[:, None] + b[:, None]
    tl.store(y_ptr + base + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def _bwd_reduce_kernel(
    dy_ptr,
    x_ptr,
    mu_ptr,
    s1_ptr,
    s2_ptr,
    N,
    C,
    M,
    M_PER_SPLIT,
    n_cblocks,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_M: tl.constexpr,
    ACC: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    cb = pid % n_cblocks
    n = pid // n_cblocks
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    base = n.to(tl.int64) * C * M
    dy_base = dy_ptr + base
    x_base = x_ptr + base
    mu = tl.load(mu_ptr + n * C + c, mask=c_mask, other=0.0)
    m_begin = split * M_PER_SPLIT
    m_end = tl.minimum(m_begin + M_PER_SPLIT, M)
    acc1 = tl.zeros([BLOCK_C, BLOCK_M], dtype=ACC)
    acc2 = tl.zeros([BLOCK_C, BLOCK_M], dtype=ACC)
    for start in range(m_begin, m_end, BLOCK_M):
        m = start + tl.arange(0, BLOCK_M)
        mask = c_mask[:, None] & (m < m_end)[None, :]
        if CHANNELS_LAST:
            offs = m[None, :] * C + c[:, None]
        else:
            offs = c[:, None] * M + m[None, :]
        g = tl.load(dy_base + offs, mask=mask, other=0.0).to(ACC)
        xv = tl.load(x_base + offs, mask=mask, other=0.0).to(ACC)
        acc1 += g
        acc2 += g * (xv - mu[:, None])  # g is 0 where masked
    out = (split * N + n) * C + c
    tl.store(s1_ptr + out, tl.sum(acc1, axis=1), mask=c_mask)
    tl.store(s2_ptr + out, tl.sum(acc2, axis=1), mask=c_mask)


def _dx_kernel(
    dy_ptr,
    x_ptr,
    scale_ptr,
    cx_ptr,
    c0_ptr,
    dx_ptr,
    C,
    M,
    n_cblocks,
    n_mblocks,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_M: tl.constexpr,
    ACC: tl.constexpr,
):
    pid = tl.program_id(0)
    mb = pid % n_mblocks
    rest = pid // n_mblocks
    cb = rest % n_cblocks
    n = rest // n_cblocks
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    c_mask = c < C
    mask = c_mask[:, None] & (m < M)[None, :]
    if CHANNELS_LAST:
        offs = m[None, :] * C + c[:, None]
    else:
        offs = c[:, None] * M + m[None, :]
    base = n.to(tl.int64) * C * M
    k = n * C + c
    s = tl.load(scale_ptr + k, mask=c_mask, other=0.0)
    cx = tl.load(cx_ptr + k, mask=c_mask, other=0.0)
    c0 = tl.load(c0_ptr + k, mask=c_mask, other=0.0)
    g = tl.load(dy_ptr + base + offs, mask=mask, other=0.0).to(ACC)
    xv = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(ACC)
    dx = g * s[:, None] + (xv * cx[:, None] + c0[:, None])
    tl.store(dx_ptr + base + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


_KERNEL_FNS = {
    "stats": _stats_kernel,
    "affine": _affine_kernel,
    "bwd_reduce": _bwd_reduce_kernel,
    "dx": _dx_kernel,
}
_KERNEL_CACHE: dict = {}


#: Whether Triton runs in interpreter mode in this process (fixed when Triton was imported).
INTERPRET: bool = _interpreter_active()


def interpret_mode(x: Optional[Tensor] = None) -> bool:
    """True when the kernels run in Triton's interpreter (TRITON_INTERPRET=1 at Triton import)."""
    return INTERPRET


def _kernel(name: str, interpret: bool):
    key = (name, interpret)
    k = _KERNEL_CACHE.get(key)
    if k is None:
        fn = _KERNEL_FNS[name]
        if interpret:
            from triton.runtime.interpreter import InterpretedFunction

            k = InterpretedFunction(fn)
        else:
            from triton.runtime.jit import JITFunction

            k = JITFunction(fn)
        _KERNEL_CACHE[key] = k
    return k


def _launch_mode(x: Tensor) -> bool:
    if not INTERPRET and not x.is_cuda:
        raise RuntimeError(
            f"the Triton BIN kernels are compiled for CUDA in this process; x is on {x.device}. "
            "Set TRITON_INTERPRET=1 before Triton is first imported to run them in the interpreter."
        )
    return INTERPRET


# --------------------------------------------------------------------------------------------
# Layout and launch configuration
# --------------------------------------------------------------------------------------------


def _acc(sd: torch.dtype):
    return tl.float64 if sd == torch.float64 else tl.float32


def _spatial(x: Tensor) -> int:
    m = 1
    for s in x.shape[2:]:
        m *= s
    return m


def _dense_layout(x: Tensor) -> tuple[Tensor, bool]:
    """``(x_dense, channels_last)``: x itself when NC*-contiguous or channels-last dense."""
    if x.is_contiguous():
        return x, False
    if x.movedim(1, -1).is_contiguous():
        return x, True
    return x.contiguous(), False


def _to_layout(t: Tensor, channels_last: bool) -> Tensor:
    if channels_last:
        if t.movedim(1, -1).is_contiguous():
            return t
        return t.movedim(1, -1).contiguous().movedim(-1, 1)
    return t.contiguous()


def _empty(x: Tensor, dtype: torch.dtype, channels_last: bool) -> Tensor:
    if channels_last:
        shape = (x.shape[0],) + tuple(x.shape[2:]) + (x.shape[1],)
        return torch.empty(shape, dtype=dtype, device=x.device).movedim(-1, 1)
    return torch.empty(x.shape, dtype=dtype, device=x.device)


_REDUCTIONS = ("stats", "bwd_reduce")


def launch_config(kind: str, c: int, m: int, channels_last: bool, dtype: torch.dtype) -> tuple[int, int, int]:
    """``(BLOCK_C, BLOCK_M, num_warps)`` of kernel ``kind`` for ``C`` channels and ``M`` spatial
    positions of ``dtype`` input.

    A tile always holds the kind's tile size (powers of two; the extent along the contiguous axis
    is ``next_power_of_2`` of that axis clamped to ``[MIN_BLOCK, row]``, the other axis takes the
    rest), so the choices are few: ``launch_configs`` lists them all.
    """
    tile = REDUCE_TILE if kind in _REDUCTIONS else ELEMENTWISE_TILE
    warps = REDUCE_WARPS if kind in _REDUCTIONS else ELEMENTWISE_WARPS
    if dtype == torch.float64:
        tile //= 2
    tile = max(1, min(tile, int(MAX_TILE)))
    if channels_last:
        row = max(1, CL_ROW_BYTES // torch.empty((), dtype=dtype).element_size())
        bc = min(max(triton.next_power_of_2(c), MIN_BLOCK), row, tile)
        bm = tile // bc
    else:
        bm = min(max(triton.next_power_of_2(m), MIN_BLOCK), tile)
        bc = tile // bm
    return bc, bm, warps


def launch_configs(kind: str, channels_last: bool, dtype: torch.dtype) -> list[tuple[int, int, int]]:
    """Every ``(BLOCK_C, BLOCK_M, num_warps)`` that ``launch_config`` can return for these
    arguments (it depends on ``C`` and ``M`` only through their next powers of two)."""
    sizes = [2**k for k in range(0, 31)]
    found = {launch_config(kind, v, v, channels_last, dtype) for v in sizes}
    return sorted(found)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _split_count(x: Tensor, programs: int, n_chunks: int, interpret: bool) -> int:
    """How many programs share the spatial axis of a reduction: enough for ``PROGRAMS_PER_SM``
    programs per SM when ``N * channel blocks`` alone would leave the GPU idle (1 when interpreted)."""
    if interpret or not x.is_cuda:
        return 1
    sms = _sm_count(x.device.index if x.device.index is not None else torch.cuda.current_device())
    target = PROGRAMS_PER_SM * sms
    return 1 if programs >= target else max(1, min(triton.cdiv(target, programs), n_chunks // 2))


def _splits(x: Tensor, programs: int, m: int, bm: int, interpret: bool) -> tuple[int, int]:
    """(number of spatial splits, spatial positions per split; a multiple of bm)."""
    n_chunks = triton.cdiv(m, bm)
    split = max(1, min(_split_count(x, programs, n_chunks, interpret), n_chunks))
    per = triton.cdiv(n_chunks, split) * bm
    return triton.cdiv(m, per), per


def _check(x: Tensor) -> None:
    if x.dim() < 3:
        raise ValueError(f"x must have shape (N, C, *spatial), got {tuple(x.shape)}")
    if x.dtype not in _SUPPORTED:
        raise TypeError(f"triton BIN supports {_SUPPORTED}, got {x.dtype}")
    if x.shape[1] * _spatial(x) >= 2**31 or x.shape[0] * x.shape[1] >= 2**31:
        raise ValueError("triton BIN needs C * spatial < 2**31 and N * C < 2**31")


def _per_nc_reduce(
    name: str, a: Tensor, b: Optional[Tensor], mu: Optional[Tensor], channels_last: bool
) -> tuple[Tensor, Tensor, list]:
    """Launch a reduction kernel; returns the (split, N, C) partials and the split counts."""
    n, c, m = a.shape[0], a.shape[1], _spatial(a)
    sd = stat_dtype(a.dtype)
    if n * c * m == 0:
        z = torch.zeros((1, n, c), dtype=sd, device=a.device)
        return z, z.clone(), [m]
    interpret = _launch_mode(a)
    bc, bm, warps = launch_config(name, c, m, channels_last, a.dtype)
    n_cb = triton.cdiv(c, bc)
    split, per = _splits(a, n * n_cb, m, bm, interpret)
    p1 = torch.empty((split, n, c), dtype=sd, device=a.device)
    p2 = torch.empty((split, n, c), dtype=sd, device=a.device)
    counts = [min(per, m - s * per) for s in range(split)]
    grid = (n * n_cb, split)
    kern = _kernel(name, interpret)
    meta = dict(CHANNELS_LAST=channels_last, BLOCK_C=bc, BLOCK_M=bm, ACC=_acc(sd), num_warps=warps)
    if interpret:
        meta.pop("num_warps")
    if name == "stats":
        kern[grid](a, p1, p2, n, c, m, per, n_cb, **meta)
    else:
        kern[grid](a, b, mu, p1, p2, n, c, m, per, n_cb, **meta)
    return p1, p2, counts


def _elementwise(name: str, out: Tensor, tensors: Sequence[Tensor], coefs: Sequence[Tensor], cl: bool) -> None:
    x = tensors[-1]
    n, c, m = x.shape[0], x.shape[1], _spatial(x)
    if x.numel() == 0:
        return
    interpret = _launch_mode(x)
    bc, bm, warps = launch_config(name, c, m, cl, x.dtype)
    n_cb, n_mb = triton.cdiv(c, bc), triton.cdiv(m, bm)
    meta = dict(CHANNELS_LAST=cl, BLOCK_C=bc, BLOCK_M=bm, ACC=_acc(coefs[0].dtype))
    if not interpret:
        meta["num_warps"] = warps
    _kernel(name, interpret)[(n * n_cb * n_mb,)](*tensors, *coefs, out, c, m, n_cb, n_mb, **meta)


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def instance_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(mu_nc, var_nc)``: per-(n, c) mean and biased variance, fp32 (fp64 for fp64 x)."""
    _check(x)
    xd, cl = _dense_layout(x)
    m = _spatial(xd)
    means, m2s, counts = _per_nc_reduce("stats", xd, None, None, cl)
    if m == 0:
        nan = torch.full(means.shape[1:], float("nan"), dtype=means.dtype, device=x.device)
        return nan, nan.clone()
    if means.shape[0] == 1:
        mean, m2 = means[0], m2s[0]
    else:  # Chan's combine of the spatial splits (means relative to the common pivot)
        w = torch.full((len(counts), 1, 1), float(counts[0]), dtype=means.dtype, device=means.device)
        w[-1] = float(counts[-1])  # only the last split may be shorter (no host-to-device copy)
        mean = (w * means).sum(0) / m
        m2 = m2s.sum(0) + (w * (means - mean).square()).sum(0)
    pivot = xd[(slice(None), slice(None)) + (0,) * (xd.dim() - 2)]  # x[:, :, 0, ..., 0]
    return mean + pivot.to(mean.dtype), m2 / m


def triton_bin_forward(
    x: Tensor,
    rho: Tensor,
    w_b: Tensor,
    b_b: Tensor,
    w_i: Tensor,
    b_i: Tensor,
    mu_b_fixed: Optional[Tensor],
    var_b_fixed: Optional[Tensor],
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Forward of Batch-Instance Normalization.

    Args:
        x: ``(N, C, *spatial)``, fp16 / bf16 / fp32 / fp64, NC*-contiguous or channels-last.
        rho, w_b, b_b, w_i, b_i: ``(C,)``.
        mu_b_fixed, var_b_fixed: ``(C,)`` running statistics for the BN branch, or None to use
            the batch statistics.
        eps: added to both variances.

    Returns:
        ``(y, mu_b, var_b, mu_nc, inv_nc, scale)``: ``y`` like ``x`` (dtype and layout);
        ``mu_b, var_b`` ``(C,)`` the BN-branch statistics that were used (batch statistics,
        biased variance, when ``mu_b_fixed`` is None; else the fixed ones); ``mu_nc``,
        ``inv_nc = rsqrt(var_nc + eps)`` and ``scale = A`` ``(N, C)``. All but ``y`` are in the
        statistics dtype (fp32; fp64 for fp64 inputs).
    """
    mu_nc, var_nc = instance_stats(x)
    sd = mu_nc.dtype
    if mu_b_fixed is None:
        mu_b, var_b, dev = batch_stats(var_nc, mu_nc)
    else:
        if var_b_fixed is None:
            raise ValueError("var_b_fixed is needed with mu_b_fixed")
        mu_b, var_b = mu_b_fixed.to(sd), var_b_fixed.to(sd)
        dev = mu_nc - mu_b
    inv_nc = torch.rsqrt(var_nc + eps)
    rho, w_b, b_b, w_i, b_i = [t.to(sd) for t in (rho, w_b, b_b, w_i, b_i)]
    scale, shift, _, _ = coefficients(rho, w_b, b_b, w_i, b_i, torch.rsqrt(var_b + eps), inv_nc, dev)
    scale = scale.contiguous()
    shift = about(scale, shift, mu_nc).contiguous()  # the kernel computes y = scale * x + shift
    xd, cl = _dense_layout(x)
    y = _empty(xd, x.dtype, cl)
    _elementwise("affine", y, (xd,), (scale, shift), cl)
    return y, mu_b, var_b, mu_nc, inv_nc, scale


def triton_bin_backward(
    dy: Tensor,
    x: Tensor,
    rho: Tensor,
    w_b: Tensor,
    b_b: Tensor,
    w_i: Tensor,
    b_i: Tensor,
    mu_b: Tensor,
    var_b: Tensor,
    mu_nc: Tensor,
    inv_nc: Tensor,
    scale: Tensor,
    eps: float,
    use_batch: bool,
    needs: Sequence[bool] = (True,) * 6,
) -> tuple[Optional[Tensor], ...]:
    """Backward of ``triton_bin_forward``.

    ``mu_b, var_b, mu_nc, inv_nc, scale`` are the forward's outputs, ``eps`` and ``use_batch``
    (``mu_b_fixed is None``) its arguments. ``needs`` = which of ``(x, rho, w_b, b_b, w_i, b_i)``
    need a gradient. Returns ``(dx, drho, dw_b, db_b, dw_i, db_i)``, None where not needed;
    ``dx`` has the dtype and layout of ``x``, the parameter gradients the statistics dtype.
    """
    needs = tuple(bool(v) for v in needs) + (False,) * (6 - len(needs))
    out: list[Optional[Tensor]] = [None] * 6
    if not any(needs):
        return tuple(out)
    xd, cl = _dense_layout(x)
    sd = mu_nc.dtype
    n, m = xd.shape[0], _spatial(xd)
    dyd = _to_layout(dy, cl)
    mu_nc = mu_nc.contiguous()
    p1, p2, _ = _per_nc_reduce("bwd_reduce", dyd, xd, mu_nc, cl)
    s1, s2c = (p1[0], p2[0]) if p1.shape[0] == 1 else (p1.sum(0), p2.sum(0))
    rho, w_b, b_b, w_i, b_i = [t.to(sd) for t in (rho, w_b, b_b, w_i, b_i)]
    inv_b = torch.rsqrt(var_b.to(sd) + eps)
    dev = mu_nc - mu_b.to(sd)
    t_i, t_b = gradient_sums(s2c, s1, dev, inv_b, inv_nc)
    s1_c = s1.sum(0)
    out[1:] = parameter_grads(rho, w_b, b_b, w_i, b_i, t_b, s1_c, t_i.sum(0), needs[1:], (sd,) * 5)
    if needs[0]:
        dx = _empty(xd, x.dtype, cl)
        if dx.numel():
            _, _, a_b, a_i = coefficients(rho, w_b, b_b, w_i, b_i, inv_b, inv_nc, dev)
            batch = (t_b, s1_c, dev, n * m) if use_batch else None
            cx, c0 = dx_coefficients(a_b, a_i, inv_b, inv_nc, t_i, s1, m, batch)
            c0 = about(cx, c0, mu_nc)  # the kernel computes dx = scale * dy + cx * x + c0
            _elementwise("dx", dx, (dyd, xd), (scale.contiguous(), cx.contiguous(), c0.contiguous()), cl)
        out[0] = dx
    return tuple(out)


def _backward_by_recompute(
    dy: Tensor,
    x: Tensor,
    params: Sequence[Tensor],
    fixed: tuple[Optional[Tensor], Optional[Tensor]],
    eps: float,
    needs: Sequence[bool],
) -> tuple[Optional[Tensor], ...]:
    """The gradients of ``functional._composite`` (plain ATen ops) at the same inputs."""
    from ..functional import _composite

    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(bool(n)) for t, n in zip((x, *params), needs)]
        xl, rho, w_b, b_b, w_i, b_i = leaves
        y, _, _ = _composite(xl, rho, w_b, b_b, w_i, b_i, fixed[0], fixed[1], eps)
        wanted = [t for t in leaves if t.requires_grad]
        grads = iter(torch.autograd.grad(y, wanted, dy) if wanted else ())
    return tuple(next(grads) if t.requires_grad else None for t in leaves)


class TritonBIN(torch.autograd.Function):
    """Same contract as ``functional._FusedBIN``:
    ``TritonBIN.apply(x, rho, w_b, b_b, w_i, b_i, mu_b_fixed, var_b_fixed, eps[, fallback]) -> (y, mu_b, var_b)``;
    ``mu_b, var_b`` are the batch statistics (non-differentiable) when ``mu_b_fixed`` is None,
    empty tensors otherwise. Backward is once-differentiable. With ``fallback=True`` a failing
    backward kernel (compile or launch error) warns once and the gradients are recomputed with
    the composite ATen ops instead of raising (``backend="auto"`` uses this)."""

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
        fallback: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor]:
        y, mu_b, var_b, mu_nc, inv_nc, scale = triton_bin_forward(x, rho, w_b, b_b, w_i, b_i, mu_b_fixed, var_b_fixed, eps)
        sd = mu_nc.dtype
        use_batch = mu_b_fixed is None
        p = [t.to(sd) for t in (rho, w_b, b_b, w_i, b_i)]
        ctx.save_for_backward(x, *p, mu_b, var_b, mu_nc, inv_nc, scale)
        ctx.eps = eps
        ctx.use_batch = use_batch
        ctx.fallback = fallback
        ctx.param_dtypes = (rho.dtype, w_b.dtype, b_b.dtype, w_i.dtype, b_i.dtype)
        if use_batch:
            stats = (mu_b, var_b)
        else:
            stats = (x.new_empty(0, dtype=sd), x.new_empty(0, dtype=sd))
        ctx.mark_non_differentiable(*stats)
        return y, stats[0], stats[1]

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor, _dmu: Tensor, _dvar: Tensor):  # type: ignore[override]
        x, rho, w_b, b_b, w_i, b_i, mu_b, var_b, mu_nc, inv_nc, scale = ctx.saved_tensors
        needs = ctx.needs_input_grad[:6]
        try:
            grads = triton_bin_backward(
                dy, x, rho, w_b, b_b, w_i, b_i, mu_b, var_b, mu_nc, inv_nc, scale,
                ctx.eps, ctx.use_batch, needs,
            )  # fmt: skip
        except Exception as err:
            if not ctx.fallback:
                raise
            from ..functional import _record_triton_failure

            _record_triton_failure("backward", err)
            fixed = (None, None) if ctx.use_batch else (mu_b, var_b)
            grads = _backward_by_recompute(dy, x, (rho, w_b, b_b, w_i, b_i), fixed, ctx.eps, needs)
        res: list[Optional[Tensor]] = [grads[0]]
        for g, dt in zip(grads[1:], ctx.param_dtypes):
            res.append(None if g is None else g.to(dt))
        return tuple(res) + (None, None, None, None)
