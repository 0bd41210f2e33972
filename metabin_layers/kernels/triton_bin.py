"""Triton kernels that compute a whole MetaBIN layer: two launches forward, two backward.

The second home of the BIN formulas (the first, the reference, is ``metabin_layers._bin_math``);
``tests/test_triton_kernels.py`` holds both to the float64 definition. For an input viewed as
``(N, C, M)`` (``M`` the product of the spatial sizes)::

    y  = scale[n, c] * (x - mu_nc) + shift[n, c]
    a_B = rho w_B / s_B,   a_I = (1 - rho) w_I / s_nc,   beta = rho b_B + (1 - rho) b_I
    scale = a_B + a_I,     shift = beta + a_B (mu_nc - mu_B)

Forward:

* ``_fwd_stats`` (grid ``N * channel blocks`` x spatial splits): per-(n, c) mean and M2 of its
  part of the spatial axis, by a per-lane Welford recurrence on values shifted by ``x[n, c, 0]``
  (never ``E[x^2] - E[x]^2``), accumulated in fp32 (fp64 for fp64 inputs), into a workspace that
  every program writes (``torch.empty``: no memset, no atomics).
* ``_fwd_apply`` (grid channel blocks x sample groups x spatial splits): combines the partials
  (Chan's formula) into ``mu_nc``, ``var_nc`` and, in registers, the batch statistics (law of
  total variance), forms the coefficients and writes ``y``. The first program of each channel
  block also writes the statistics that the backward needs and updates ``running_mean``,
  ``running_var`` (``num_batches_tracked`` is counted by ``_fwd_stats``, so the cumulative
  average reads it from the device).

Backward: ``_bwd_sums`` (per-(n, c) partial ``S1 = sum dy`` and ``D = sum dy (x - mu_nc)``) and
``_bwd_apply`` (combines them, writes ``dx``; the first program of each channel block writes the
five parameter gradients). Every reduction runs in a fixed order: results are bitwise repeatable.

Each program of ``_fwd_apply`` / ``_bwd_apply`` recomputes its channels' batch sums from the
``(N, C)`` partials (a few KB, read from L2); a program owns ``G`` samples so that this costs a
small fraction of its elementwise work (``WORK_PER_STAT``).

Layouts are strides: any input whose spatial dimensions collapse into one stride (NCHW,
channels-last, channel or spatial slices) is read in place with int64 offsets; outputs keep the
input's layout. Statistics modes, affine or not, the batch-branch-only case of a single spatial
value and the dtype are constexpr variants of the same four kernels. Launch plans are cached per
(shape, strides, dtype, SM count); nothing reads a tensor value on the host.

``TritonBIN`` is the autograd Function of eager runs; under ``torch.compile`` the same launchers
run inside the custom ops ``metabin_layers::bin_forward`` / ``bin_backward`` (with fake
implementations), so the compiler keeps the layer in its graph.
"""

from __future__ import annotations

import functools
import struct
from typing import NamedTuple, Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

from .._registry import BINArgs, record_triton_failure, register_backend
from . import _interpreter_active, is_available

__all__ = ["TritonBIN", "triton_bin_forward", "triton_bin_backward", "plan", "Plan", "is_available", "INTERPRET"]

#: Elements per tile of the reductions (``_fwd_stats``, ``_bwd_sums``; fp64 halves it) and their
#: warps. The elementwise passes (``_fwd_apply``, ``_bwd_apply``) take one 16-byte vector per
#: thread and tile, and a warp spans at most 32 vectors of the contiguous axis, so a thread
#: holds one channel (NCHW) or one vector of channels (channels-last) of every per-channel term.
REDUCE_TILE, REDUCE_WARPS = 1024, 4
APPLY_WARPS = 8
#: Elements per ``(samples, channels)`` tile of the statistics phase of the apply kernels.
STAT_TILE = 1024
#: Smallest tile extent along the contiguous axis, and the channel block of channels-last tiles
#: in bytes (256 B: two 128-byte transactions per row).
MIN_BLOCK, CL_ROW_BYTES = 32, 256
#: Programs per SM that the spatial splits aim for, and the SM count assumed by the interpreter
#: (tests raise it to exercise the split paths).
PROGRAMS_PER_SM = 4
INTERPRETER_SMS = 1
#: Elementwise values per program for each value of statistics it reads (sets the group size G).
WORK_PER_STAT = 4

_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MODES = ("update", "hold", "eval")

# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _merge_splits(p_ptr, off, mask, plane, S, PER, M, ACC: tl.constexpr):
    """(mean, M2) per (n, c) of ``off`` from the S spatial splits (Chan's pairwise formula);
    split s of the means lies at ``p_ptr + s * plane``, of the M2 at ``p_ptr + (S + s) * plane``."""
    mean = tl.load(p_ptr + off, mask=mask, other=0.0).to(ACC)
    m2 = tl.load(p_ptr + S * plane + off, mask=mask, other=0.0).to(ACC)
    cnt = tl.cast(tl.minimum(PER, M), ACC)
    for s in range(1, S):
        cnt_s = tl.cast(tl.minimum(PER, M - s * PER), ACC)
        mean_s = tl.load(p_ptr + s * plane + off, mask=mask, other=0.0).to(ACC)
        m2_s = tl.load(p_ptr + (S + s) * plane + off, mask=mask, other=0.0).to(ACC)
        tot = cnt + cnt_s
        delta = mean_s - mean
        mean += delta * (cnt_s / tot)
        m2 += m2_s + delta * delta * (cnt * cnt_s / tot)
        cnt = tot
    return mean, m2


@triton.jit
def _sum_splits(p_ptr, off, mask, plane, S, ACC: tl.constexpr):
    """(S1, D) per (n, c) of ``off``: the sums of the S spatial splits, in split order."""
    s1 = tl.load(p_ptr + off, mask=mask, other=0.0).to(ACC)
    dot = tl.load(p_ptr + S * plane + off, mask=mask, other=0.0).to(ACC)
    for s in range(1, S):
        s1 += tl.load(p_ptr + s * plane + off, mask=mask, other=0.0).to(ACC)
        dot += tl.load(p_ptr + (S + s) * plane + off, mask=mask, other=0.0).to(ACC)
    return s1, dot


@triton.jit
def _load_params(rho_ptr, w_b_ptr, b_b_ptr, w_i_ptr, b_i_ptr, c, c_mask, AFFINE: tl.constexpr, BATCH_ONLY: tl.constexpr, ACC):
    if BATCH_ONLY:  # one value per channel and sample: the batch branch alone (rho = 1)
        rho = tl.full(c.shape, 1.0, ACC)
    else:
        rho = tl.load(rho_ptr + c, mask=c_mask, other=0.0).to(ACC)
    if AFFINE:
        w_b = tl.load(w_b_ptr + c, mask=c_mask, other=0.0).to(ACC)
        b_b = tl.load(b_b_ptr + c, mask=c_mask, other=0.0).to(ACC)
        w_i = tl.load(w_i_ptr + c, mask=c_mask, other=0.0).to(ACC)
        b_i = tl.load(b_i_ptr + c, mask=c_mask, other=0.0).to(ACC)
    else:
        w_b = tl.full(c.shape, 1.0, ACC)
        b_b = tl.zeros(c.shape, ACC)
        w_i = tl.full(c.shape, 1.0, ACC)
        b_i = tl.zeros(c.shape, ACC)
    return rho, w_b, b_b, w_i, b_i


@triton.jit
def _fwd_stats(
    x_ptr, ws_ptr, nbt_ptr, N, C, M, sxn, sxc, sxm, PER,
    COUNT: tl.constexpr, CUMULATIVE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n_cb = tl.cdiv(C, BLOCK_C)
    n = pid // n_cb
    c = (pid % n_cb) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    plane = tl.cast(N, tl.int64) * C
    if COUNT:  # num_batches_tracked += 1; the cumulative average's factor 1 / count for _fwd_apply
        if (pid == 0) & (split == 0):
            tracked = tl.load(nbt_ptr) + 1
            tl.store(nbt_ptr, tracked)
            if CUMULATIVE:
                tl.store(ws_ptr + (2 * tl.num_programs(1) + 2) * plane + 2 * C, 1.0 / tl.cast(tracked, ACC))
    row = tl.cast(n, tl.int64) * sxn + tl.cast(c, tl.int64) * sxc
    m_begin = split * PER
    m_end = tl.minimum(m_begin + PER, M)
    # Values are shifted by x[n, c, 0] so the accumulators hold numbers of the size of the
    # spread even when |mean| >> std.
    pivot = tl.load(x_ptr + row, mask=c_mask, other=0.0).to(ACC)
    j = tl.arange(0, BLOCK_M)
    mean_l = tl.zeros([BLOCK_C, BLOCK_M], dtype=ACC)
    m2_l = tl.zeros([BLOCK_C, BLOCK_M], dtype=ACC)
    # Welford per lane: only the last tile is partial, so in iteration k every live lane holds k
    # values and the update needs the scalar 1 / (k + 1).
    for start in range(m_begin, m_end, BLOCK_M):
        m = start + j
        mask = c_mask[:, None] & (m < m_end)[None, :]
        xv = tl.load(x_ptr + row[:, None] + tl.cast(m, tl.int64)[None, :] * sxm, mask=mask, other=0.0).to(ACC)
        inv_k = 1.0 / tl.cast((start - m_begin) // BLOCK_M + 1, ACC)
        delta = tl.where(mask, xv - pivot[:, None] - mean_l, 0.0)
        mean_l += delta * inv_k
        m2_l += delta * (xv - pivot[:, None] - mean_l)
    # Chan's combine of the BLOCK_M lanes, each with its own count
    length = m_end - m_begin
    cnt_l = tl.cast((length - j + BLOCK_M - 1) // BLOCK_M, ACC)
    mean = tl.sum(mean_l * cnt_l[None, :], axis=1) / tl.cast(length, ACC)
    dev = mean_l - mean[:, None]
    m2 = tl.sum(m2_l, axis=1) + tl.sum(dev * dev * cnt_l[None, :], axis=1)
    out = split * plane + n * C + c
    tl.store(ws_ptr + out, mean + pivot, mask=c_mask)
    tl.store(ws_ptr + tl.num_programs(1) * plane + out, m2, mask=c_mask)


@triton.jit
def _fwd_apply(
    x_ptr, y_ptr, ws_ptr, rho_ptr, w_b_ptr, b_b_ptr, w_i_ptr, b_i_ptr, rmean_ptr, rvar_ptr,
    N, C, M, sxn, sxc, sxm, S, PER, G, PER2, eps, eps_lo, momentum, momentum_lo,
    USE_BATCH: tl.constexpr, UPDATE: tl.constexpr, CUMULATIVE: tl.constexpr, AFFINE: tl.constexpr,
    BATCH_ONLY: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    n_cb = tl.cdiv(C, BLOCK_C)
    n_groups = tl.cdiv(N, G)
    cb = pid % n_cb
    g = (pid // n_cb) % n_groups
    split = pid // (n_cb * n_groups)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    plane = tl.cast(N, tl.int64) * C
    saved = ws_ptr + 2 * S * plane  # mu_nc (N, C) | inv_nc (N, C) | mu_B (C) | inv_B (C) | factor
    eps_a = tl.cast(eps, ACC) + tl.cast(eps_lo, ACC)
    # -- BN statistics: of the batch (law of total variance over the samples), or the running ones
    if USE_BATCH:
        mean_b = tl.zeros([BLOCK_C], dtype=ACC)
        m2_b = tl.zeros([BLOCK_C], dtype=ACC)
        for n0 in range(0, N, BLOCK_N):
            rows = n0 + tl.arange(0, BLOCK_N)
            mask = (rows < N)[:, None] & c_mask[None, :]
            mu, m2 = _merge_splits(ws_ptr, rows[:, None] * C + c[None, :], mask, plane, S, PER, M, ACC)
            k = tl.cast(tl.minimum(N - n0, BLOCK_N), ACC)
            chunk_mean = tl.sum(tl.where(mask, mu, 0.0), axis=0) / k
            d = tl.where(mask, mu - chunk_mean[None, :], 0.0)
            chunk_m2 = tl.sum(tl.where(mask, m2, 0.0), axis=0) + tl.cast(M, ACC) * tl.sum(d * d, axis=0)
            before = tl.cast(n0, ACC)
            delta = chunk_mean - mean_b
            mean_b += delta * (k / (before + k))
            m2_b += chunk_m2 + delta * delta * (before * k / (before + k)) * tl.cast(M, ACC)
        var_b = m2_b / (tl.cast(N, ACC) * tl.cast(M, ACC))
    else:
        mean_b = tl.load(rmean_ptr + c, mask=c_mask, other=0.0).to(ACC)
        var_b = tl.load(rvar_ptr + c, mask=c_mask, other=1.0).to(ACC)
    inv_b = 1.0 / tl.sqrt(var_b + eps_a)
    if (g == 0) & (split == 0):
        tl.store(saved + 2 * plane + c, mean_b, mask=c_mask)
        tl.store(saved + 2 * plane + C + c, inv_b, mask=c_mask)
        if UPDATE:  # nn.BatchNorm: the running variance stores the unbiased estimate
            if CUMULATIVE:
                factor = tl.load(saved + 2 * plane + 2 * C)
            else:
                factor = tl.cast(momentum, ACC) + tl.cast(momentum_lo, ACC)
            rm = tl.load(rmean_ptr + c, mask=c_mask, other=0.0)
            rv = tl.load(rvar_ptr + c, mask=c_mask, other=0.0)
            count = tl.cast(N, ACC) * tl.cast(M, ACC)
            unbiased = var_b * (count / (count - 1.0))
            new_m = tl.cast(rm, ACC) + factor * (mean_b - tl.cast(rm, ACC))
            new_v = tl.cast(rv, ACC) + factor * (unbiased - tl.cast(rv, ACC))
            tl.store(rmean_ptr + c, new_m.to(rm.dtype), mask=c_mask)
            tl.store(rvar_ptr + c, new_v.to(rv.dtype), mask=c_mask)
    rho, w_b, b_b, w_i, b_i = _load_params(rho_ptr, w_b_ptr, b_b_ptr, w_i_ptr, b_i_ptr, c, c_mask, AFFINE, BATCH_ONLY, ACC)
    a_b = rho * w_b * inv_b
    g_i = (1.0 - rho) * w_i
    beta = rho * b_b + (1.0 - rho) * b_i
    # -- y = scale * (x - mu_nc) + shift for this program's samples and spatial range
    m_begin = split * PER2
    m_end = tl.minimum(m_begin + PER2, M)
    j = tl.arange(0, BLOCK_M)
    for n in range(g * G, tl.minimum(g * G + G, N)):
        off = n * C + c
        mu_n, m2_n = _merge_splits(ws_ptr, off, c_mask, plane, S, PER, M, ACC)
        inv_n = 1.0 / tl.sqrt(m2_n / tl.cast(M, ACC) + eps_a)
        scale = a_b + g_i * inv_n
        shift = beta + a_b * (mu_n - mean_b)
        if split == 0:
            tl.store(saved + off, mu_n, mask=c_mask)
            tl.store(saved + plane + off, inv_n, mask=c_mask)
        row = tl.cast(n, tl.int64) * sxn + tl.cast(c, tl.int64) * sxc
        for start in range(m_begin, m_end, BLOCK_M):
            m = start + j
            mask = c_mask[:, None] & (m < m_end)[None, :]
            offs = row[:, None] + tl.cast(m, tl.int64)[None, :] * sxm
            xv = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
            yv = (xv - mu_n[:, None]) * scale[:, None] + shift[:, None]
            tl.store(y_ptr + offs, yv.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_sums(
    dy_ptr, x_ptr, ws_ptr, N, C, M, sxn, sxc, sxm, sdn, sdc, sdm, PER,
    BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n_cb = tl.cdiv(C, BLOCK_C)
    n = pid // n_cb
    c = (pid % n_cb) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    S = tl.num_programs(1)
    plane = tl.cast(N, tl.int64) * C
    mu = tl.load(ws_ptr + 2 * S * plane + n * C + c, mask=c_mask, other=0.0)
    x_row = tl.cast(n, tl.int64) * sxn + tl.cast(c, tl.int64) * sxc
    dy_row = tl.cast(n, tl.int64) * sdn + tl.cast(c, tl.int64) * sdc
    m_begin = split * PER
    m_end = tl.minimum(m_begin + PER, M)
    acc1 = tl.zeros([BLOCK_C, BLOCK_M], dtype=ACC)
    acc2 = tl.zeros([BLOCK_C, BLOCK_M], dtype=ACC)
    for start in range(m_begin, m_end, BLOCK_M):
        m = tl.cast(start + tl.arange(0, BLOCK_M), tl.int64)
        mask = c_mask[:, None] & (m < m_end)[None, :]
        gv = tl.load(dy_ptr + dy_row[:, None] + m[None, :] * sdm, mask=mask, other=0.0).to(ACC)
        xv = tl.load(x_ptr + x_row[:, None] + m[None, :] * sxm, mask=mask, other=0.0).to(ACC)
        acc1 += gv
        acc2 += gv * (xv - mu[:, None])  # gv is 0 where masked
    out = split * plane + n * C + c
    tl.store(ws_ptr + out, tl.sum(acc1, axis=1), mask=c_mask)
    tl.store(ws_ptr + S * plane + out, tl.sum(acc2, axis=1), mask=c_mask)


@triton.jit
def _bwd_apply(
    dy_ptr, x_ptr, dx_ptr, ws_ptr, grad_ptr, rho_ptr, w_b_ptr, b_b_ptr, w_i_ptr, b_i_ptr,
    N, C, M, sxn, sxc, sxm, sdn, sdc, sdm, S, G, PER2,
    USE_BATCH: tl.constexpr, AFFINE: tl.constexpr, BATCH_ONLY: tl.constexpr, WRITE_DX: tl.constexpr,
    WRITE_GRADS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    n_cb = tl.cdiv(C, BLOCK_C)
    n_groups = tl.cdiv(N, G)
    cb = pid % n_cb
    g = (pid // n_cb) % n_groups
    split = pid // (n_cb * n_groups)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    plane = tl.cast(N, tl.int64) * C
    saved = ws_ptr + 2 * S * plane
    mean_b = tl.load(saved + 2 * plane + c, mask=c_mask, other=0.0)
    inv_b = tl.load(saved + 2 * plane + C + c, mask=c_mask, other=0.0)
    # -- per-channel sums over the batch, in sample order: t_B = sum dy x_hat_B, S1_c, sum t_I
    t_b = tl.zeros([BLOCK_C], dtype=ACC)
    s1_c = tl.zeros([BLOCK_C], dtype=ACC)
    ti_c = tl.zeros([BLOCK_C], dtype=ACC)
    if USE_BATCH or WRITE_GRADS:
        for n0 in range(0, N, BLOCK_N):
            rows = n0 + tl.arange(0, BLOCK_N)
            mask = (rows < N)[:, None] & c_mask[None, :]
            off = rows[:, None] * C + c[None, :]
            s1, dot = _sum_splits(ws_ptr, off, mask, plane, S, ACC)
            mu = tl.load(saved + off, mask=mask, other=0.0)
            inv = tl.load(saved + plane + off, mask=mask, other=0.0)
            t_b += tl.sum(dot + (mu - mean_b[None, :]) * s1, axis=0)
            s1_c += tl.sum(s1, axis=0)
            ti_c += tl.sum(inv * dot, axis=0)
        t_b = t_b * inv_b
    rho, w_b, b_b, w_i, b_i = _load_params(rho_ptr, w_b_ptr, b_b_ptr, w_i_ptr, b_i_ptr, c, c_mask, AFFINE, BATCH_ONLY, ACC)
    if WRITE_GRADS:
        if (g == 0) & (split == 0):
            gt = grad_ptr.dtype.element_ty
            tl.store(grad_ptr + c, (w_b * t_b + (b_b - b_i) * s1_c - w_i * ti_c).to(gt), mask=c_mask)
            tl.store(grad_ptr + C + c, (rho * t_b).to(gt), mask=c_mask)
            tl.store(grad_ptr + 2 * C + c, (rho * s1_c).to(gt), mask=c_mask)
            tl.store(grad_ptr + 3 * C + c, ((1.0 - rho) * ti_c).to(gt), mask=c_mask)
            tl.store(grad_ptr + 4 * C + c, ((1.0 - rho) * s1_c).to(gt), mask=c_mask)
    # -- dx = scale * dy + cx * (x - mu_nc) + c0 (the BN terms only with batch statistics)
    if WRITE_DX:
        a_b = rho * w_b * inv_b
        g_i = (1.0 - rho) * w_i
        k_i = -1.0 / tl.cast(M, ACC)
        if USE_BATCH:
            k_b = -1.0 / (tl.cast(N, ACC) * tl.cast(M, ACC))
            cx_b = a_b * inv_b * t_b * k_b
            c0_b = a_b * s1_c * k_b
        m_begin = split * PER2
        m_end = tl.minimum(m_begin + PER2, M)
        j = tl.arange(0, BLOCK_M)
        for n in range(g * G, tl.minimum(g * G + G, N)):
            off = n * C + c
            s1_n, dot_n = _sum_splits(ws_ptr, off, c_mask, plane, S, ACC)
            mu_n = tl.load(saved + off, mask=c_mask, other=0.0)
            inv_n = tl.load(saved + plane + off, mask=c_mask, other=0.0)
            a_i = g_i * inv_n
            scale = a_b + a_i
            cx = k_i * a_i * inv_n * inv_n * dot_n
            c0 = k_i * a_i * s1_n
            if USE_BATCH:
                cx += cx_b
                c0 += c0_b + cx_b * (mu_n - mean_b)
            x_row = tl.cast(n, tl.int64) * sxn + tl.cast(c, tl.int64) * sxc
            dy_row = tl.cast(n, tl.int64) * sdn + tl.cast(c, tl.int64) * sdc
            for start in range(m_begin, m_end, BLOCK_M):
                m = tl.cast(start + j, tl.int64)
                mask = c_mask[:, None] & (m < m_end)[None, :]
                x_offs = x_row[:, None] + m[None, :] * sxm
                gv = tl.load(dy_ptr + dy_row[:, None] + m[None, :] * sdm, mask=mask, other=0.0).to(ACC)
                xv = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(ACC)
                dxv = gv * scale[:, None] + (xv - mu_n[:, None]) * cx[:, None] + c0[:, None]
                tl.store(dx_ptr + x_offs, dxv.to(dx_ptr.dtype.element_ty), mask=mask)


KERNELS = {"fwd_stats": _fwd_stats, "fwd_apply": _fwd_apply, "bwd_sums": _bwd_sums, "bwd_apply": _bwd_apply}
"""The four kernels by name (``benchmarks/kernel_registers.py`` compiles each variant)."""

#: Whether Triton runs in interpreter mode in this process (fixed when Triton was imported).
INTERPRET: bool = _interpreter_active()


# --------------------------------------------------------------------------------------------
# Launch plans
# --------------------------------------------------------------------------------------------


class Plan(NamedTuple):
    """How the four kernels cover an ``(N, C, M)`` problem.

    ``reduce_block`` / ``apply_block``: ``(BLOCK_C, BLOCK_M)`` of the reductions and of the apply
    kernels; ``splits`` and ``per_split``: the spatial splits of the reductions (``per_split`` a
    multiple of its ``BLOCK_M``); ``group``: samples per apply program; ``apply_splits`` and
    ``apply_per_split``: the spatial splits of the apply kernels; ``block_n``: samples per tile of
    their statistics phase; ``workspace``: statistics-dtype elements of the workspace.
    """

    reduce_block: tuple[int, int]
    apply_block: tuple[int, int]
    splits: int
    per_split: int
    group: int
    apply_splits: int
    apply_per_split: int
    block_n: int
    workspace: int


def _np2(v: int) -> int:
    return triton.next_power_of_2(max(int(v), 1))


def _tile(elements: int, c: int, m: int, channels_last: bool, itemsize: int, widest: int) -> tuple[int, int]:
    """``(BLOCK_C, BLOCK_M)`` with ``elements`` values, the contiguous axis at least MIN_BLOCK
    and at most ``widest`` wide."""
    if channels_last:
        bc = min(max(_np2(c), MIN_BLOCK), widest, elements)
        return bc, max(elements // bc, 1)
    bm = min(max(_np2(m), MIN_BLOCK), widest, elements)
    return max(elements // bm, 1), bm


def _reduce_tile(c: int, m: int, channels_last: bool, itemsize: int) -> tuple[int, int]:
    elements = REDUCE_TILE // (2 if itemsize == 8 else 1)
    return _tile(elements, c, m, channels_last, itemsize, CL_ROW_BYTES // itemsize if channels_last else elements)


def _apply_tile(c: int, m: int, channels_last: bool, itemsize: int, aligned: bool) -> tuple[int, int]:
    # Triton vectorises only rows whose offsets it knows to be multiples of 16 (``aligned``)
    vector = max(16 // itemsize, 1) if aligned else 1
    return _tile(32 * APPLY_WARPS * vector, c, m, channels_last, itemsize, 32 * vector)


@functools.lru_cache(maxsize=4096)
def plan(n: int, c: int, m: int, channels_last: bool, itemsize: int, aligned: bool, sms: int) -> Plan:
    """The launch plan of an ``(N, C, M)`` problem whose channel axis is contiguous or not, for
    ``itemsize``-byte values (rows at offsets that are multiples of 16, or not) on a GPU with
    ``sms`` multiprocessors (cached).

    Examples:
        >>> p = plan(8, 64, 256, False, 4, True, 132)  # ResNet stage, fp32 NCHW, an H100
        >>> p.workspace == (2 * p.splits + 2) * 8 * 64 + 2 * 64 + 1
        True
    """
    shrink = 2 if itemsize == 8 else 1
    target = PROGRAMS_PER_SM * sms
    bc1, bm1 = _reduce_tile(c, m, channels_last, itemsize)
    programs = n * triton.cdiv(c, bc1)
    chunks = triton.cdiv(m, bm1)
    splits = 1 if programs >= target else max(1, min(triton.cdiv(target, programs), chunks // 2))
    per = triton.cdiv(chunks, splits) * bm1
    splits = triton.cdiv(m, per)
    bc2, bm2 = _apply_tile(c, m, channels_last, itemsize, aligned)
    block_n = max(1, min(_np2(n), (STAT_TILE // shrink) // bc2))
    group = max(1, min(n, triton.cdiv(WORK_PER_STAT * n * (2 * splits + 2), m)))
    programs = triton.cdiv(c, bc2) * triton.cdiv(n, group)
    chunks = triton.cdiv(m, bm2)
    apply_splits = 1 if programs >= target else max(1, min(triton.cdiv(target, programs), chunks))
    apply_per = triton.cdiv(chunks, apply_splits) * bm2
    apply_splits = triton.cdiv(m, apply_per)
    workspace = (2 * splits + 2) * n * c + 2 * c + 1
    return Plan((bc1, bm1), (bc2, bm2), splits, per, group, apply_splits, apply_per, block_n, workspace)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sms(x: Tensor) -> int:
    if not x.is_cuda:
        return INTERPRETER_SMS
    return _sm_count(x.device.index if x.device.index is not None else torch.cuda.current_device())


def _ncm_strides(t: Tensor) -> Optional[tuple[int, int, int]]:
    """Strides of ``t`` viewed as ``(N, C, M)``, or None when its spatial dimensions do not
    collapse into one stride."""
    sm, expect = 1, None
    for size, stride in zip(reversed(t.shape[2:]), reversed(t.stride()[2:])):
        if size == 1:
            continue
        if expect is None:
            sm = stride
        elif stride != expect:
            return None
        expect = stride * size
    return t.stride(0), t.stride(1), sm


def _dense_ncm(x: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
    """``x`` (or a contiguous copy) and its ``(N, C, M)`` strides; ``empty_like`` of the result
    has the same strides (dense, non-overlapping)."""
    strides = _ncm_strides(x)
    if strides is None or not (x.is_contiguous() or x.movedim(1, -1).is_contiguous()):
        x = x.contiguous()
        strides = _ncm_strides(x)
        assert strides is not None
    return x, strides


def _spatial(x: Tensor) -> int:
    m = 1
    for s in x.shape[2:]:
        m *= s
    return m


@functools.lru_cache(maxsize=64)
def _split_float(v: float) -> tuple[float, float]:
    """``(hi, lo)``: float32-representable parts whose sum is ``v`` to ~1e-14 (Triton passes
    Python floats as fp32; the fp64 kernels add the parts back)."""
    hi = struct.unpack("f", struct.pack("f", v))[0]
    return hi, struct.unpack("f", struct.pack("f", v - hi))[0]


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check(x: Tensor, mode: str) -> None:
    if x.dim() < 3:
        raise ValueError(f"x must have shape (N, C, *spatial), got {tuple(x.shape)}")
    if x.dtype not in _SUPPORTED:
        raise TypeError(f"the triton backend supports {_SUPPORTED}, got {x.dtype}")
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")


def _launch(name: str, grid: tuple[int, ...], args: Sequence, warps: int, **meta) -> None:
    kernel = KERNELS[name]
    if not INTERPRET:
        meta["num_warps"] = warps
    kernel[grid](*args, **meta)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _forward_outputs(x: Tensor) -> tuple[Tensor, tuple[int, int, int], Plan]:
    """The dense ``x``, its strides and plan (shared by the launcher and the fake op)."""
    xd, (sn, sc, sm) = _dense_ncm(x)
    channels_last = sc == 1 and sm != 1
    aligned = sn % 16 == 0 and (sm if channels_last else sc) % 16 == 0
    key = (x.shape[0], x.shape[1], _spatial(x), bool(channels_last), x.element_size(), bool(aligned), _sms(x))
    concrete = all(type(v) is int or type(v) is bool for v in key)
    p = plan(*key) if concrete else plan.__wrapped__(*key)  # symbolic sizes under torch.compile: not cached
    return xd, (sn, sc, sm), p


def triton_bin_forward(
    x: Tensor,
    rho: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    in_weight: Optional[Tensor],
    in_bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    num_batches_tracked: Optional[Tensor],
    momentum: Optional[float],
    eps: float,
    mode: str,
    batch_only: bool = False,
) -> tuple[Tensor, Tensor]:
    """Forward of a MetaBIN layer in two launches: ``(y, workspace)``.

    Args:
        x: ``(N, C, *spatial)``, fp16 / bf16 / fp32 / fp64, any strides (read in place when the
            spatial dimensions collapse into one stride and x is dense).
        rho, weight, bias, in_weight, in_bias: ``(C,)``; the four affine tensors all None, or none.
        running_mean, running_var: ``(C,)`` or None; read in ``"eval"`` mode, updated in place in
            ``"update"`` mode.
        num_batches_tracked: incremented in ``"update"`` mode (where given); its new value gives
            the factor of the cumulative average when ``momentum`` is None.
        momentum: running-statistics factor, or None for the cumulative average.
        eps: added to the variances.
        mode: ``"update"`` (batch statistics, running ones updated), ``"hold"`` (batch
            statistics) or ``"eval"`` (running statistics in the BN branch).
        batch_only: the batch branch alone (``rho`` taken as 1): inputs with one spatial value.

    Returns:
        ``y`` (dtype and layout of ``x``) and the workspace that ``triton_bin_backward`` reads.

    Examples:
        >>> device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: TRITON_INTERPRET=1
        >>> x, rho = torch.randn(4, 3, 5, 5, device=device), torch.full((3,), 0.5, device=device)
        >>> rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
        >>> nbt = torch.zeros((), dtype=torch.long, device=device)
        >>> y, ws = triton_bin_forward(x, rho, None, None, None, None, rm, rv, nbt, 0.1, 1e-5, "update")
        >>> y.shape, int(nbt)
        (torch.Size([4, 3, 5, 5]), 1)
        >>> dx, grads = triton_bin_backward(torch.ones_like(y), x, ws, rho, None, None, None, None, "update", False)
        >>> grads.shape  # d rho, d w_B, d b_B, d w_I, d b_I
        torch.Size([5, 3])
    """
    _check(x, mode)
    use_batch, update = mode != "eval", mode == "update"
    if (update or not use_batch) and (running_mean is None or running_var is None):
        raise ValueError(f"mode {mode!r} needs running_mean and running_var")
    cumulative = update and momentum is None
    if cumulative and num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
    xd, (sxn, sxc, sxm), p = _forward_outputs(x)
    n, c, m = x.shape[0], x.shape[1], _spatial(x)
    y = torch.empty_like(xd)
    ws = torch.empty(p.workspace, dtype=_stat_dtype(x.dtype), device=x.device)
    if y.numel() == 0:
        return y, ws
    acc = _acc(x.dtype)
    count = update and num_batches_tracked is not None
    bc1, bm1 = p.reduce_block
    _launch(
        "fwd_stats", (n * triton.cdiv(c, bc1), p.splits),
        (xd, ws, num_batches_tracked if count else ws, n, c, m, sxn, sxc, sxm, p.per_split),
        REDUCE_WARPS, COUNT=count, CUMULATIVE=cumulative, BLOCK_C=bc1, BLOCK_M=bm1, ACC=acc,
    )  # fmt: skip
    affine = weight is not None
    bc2, bm2 = p.apply_block
    grid = (triton.cdiv(c, bc2) * triton.cdiv(n, p.group) * p.apply_splits,)
    eps_hi, eps_lo = _split_float(float(eps))
    mom_hi, mom_lo = _split_float(float(momentum)) if momentum is not None else (0.0, 0.0)
    params = (rho, weight, bias, in_weight, in_bias) if affine else (rho,) * 5
    stats = (running_mean, running_var) if running_mean is not None else (ws, ws)
    _launch(
        "fwd_apply", grid,
        (xd, y, ws, *params, *stats, n, c, m, sxn, sxc, sxm,
         p.splits, p.per_split, p.group, p.apply_per_split, eps_hi, eps_lo, mom_hi, mom_lo),
        APPLY_WARPS, USE_BATCH=use_batch, UPDATE=update, CUMULATIVE=cumulative, AFFINE=affine,
        BATCH_ONLY=bool(batch_only), BLOCK_C=bc2, BLOCK_M=bm2, BLOCK_N=p.block_n, ACC=acc,
    )  # fmt: skip
    return y, ws


def triton_bin_backward(
    dy: Tensor,
    x: Tensor,
    ws: Tensor,
    rho: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    in_weight: Optional[Tensor],
    in_bias: Optional[Tensor],
    mode: str,
    batch_only: bool,
    needs_dx: bool = True,
    needs_params: bool = True,
) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """Backward of ``triton_bin_forward`` in two launches: ``(dx, grads)``.

    ``x`` and ``ws`` are the forward's input and workspace, ``mode`` and ``batch_only`` its
    arguments. ``dx`` has the dtype and layout of the forward's ``y``; ``grads`` is a ``(5, C)``
    tensor in ``rho``'s dtype holding the gradients of ``(rho, weight, bias, in_weight, in_bias)``
    (None where not asked for).
    """
    xd, (sxn, sxc, sxm), p = _forward_outputs(x)
    n, c, m = x.shape[0], x.shape[1], _spatial(x)
    dx = torch.empty_like(xd) if needs_dx else None
    grads = torch.empty((5, c), dtype=rho.dtype, device=x.device) if needs_params else None
    if not (needs_dx or needs_params):
        return None, None
    if x.numel() == 0:
        if grads is not None:
            grads.zero_()
        return dx, grads
    dyd = dy
    dstrides = _ncm_strides(dy)
    if dstrides is None:
        dyd = dy.contiguous()
        dstrides = _ncm_strides(dyd)
        assert dstrides is not None
    acc = _acc(x.dtype)
    bc1, bm1 = p.reduce_block
    _launch(
        "bwd_sums", (n * triton.cdiv(c, bc1), p.splits),
        (dyd, xd, ws, n, c, m, sxn, sxc, sxm, *dstrides, p.per_split),
        REDUCE_WARPS, BLOCK_C=bc1, BLOCK_M=bm1, ACC=acc,
    )  # fmt: skip
    affine = weight is not None
    params = (rho, weight, bias, in_weight, in_bias) if affine else (rho,) * 5
    bc2, bm2 = p.apply_block
    grid = (triton.cdiv(c, bc2) * triton.cdiv(n, p.group) * p.apply_splits,)
    _launch(
        "bwd_apply", grid,
        (dyd, xd, dx if dx is not None else xd, ws, grads if grads is not None else ws, *params,
         n, c, m, sxn, sxc, sxm, *dstrides, p.splits, p.group, p.apply_per_split),
        APPLY_WARPS, USE_BATCH=mode != "eval", AFFINE=affine, BATCH_ONLY=bool(batch_only), WRITE_DX=needs_dx,
        WRITE_GRADS=needs_params, BLOCK_C=bc2, BLOCK_M=bm2, BLOCK_N=p.block_n, ACC=acc,
    )  # fmt: skip
    return dx, grads


# --------------------------------------------------------------------------------------------
# Autograd, custom ops, registration
# --------------------------------------------------------------------------------------------


def _compiling() -> bool:
    flag = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(flag()) if flag is not None else False


def _backward_by_recompute(
    dy: Tensor, x: Tensor, ws: Tensor, params: Sequence[Optional[Tensor]], eps: float, mode: str, batch_only: bool, needs
) -> tuple[Optional[Tensor], ...]:
    """The gradients of the composite backend at the same inputs (after a failing kernel)."""
    from .._composite import composite_bin

    c = x.shape[1]
    fixed: tuple[Optional[Tensor], Optional[Tensor]] = (None, None)
    if mode == "eval":  # the running statistics as the forward read them (saved in the workspace)
        tail = ws[ws.numel() - 2 * c - 1 : ws.numel() - 1]
        fixed = (tail[:c], tail[c:].square().reciprocal() - eps)
    with torch.enable_grad():
        leaves = [None if t is None else t.detach().requires_grad_(bool(k)) for t, k in zip((x, *params), needs)]
        xl, rho, *affine = leaves
        assert xl is not None and rho is not None
        w_b, b_b, w_i, b_i = [t if t is not None else torch.full_like(rho, v) for t, v in zip(affine, (1.0, 0.0, 1.0, 0.0))]
        if batch_only:
            rho = torch.ones_like(rho)
        y, _, _ = composite_bin(xl, rho, w_b, b_b, w_i, b_i, fixed[0], fixed[1], eps)
        wanted = [t for t in leaves if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(y, wanted, dy) if wanted else ())
    return tuple(next(grads) if t is not None and t.requires_grad else None for t in leaves)


class TritonBIN(torch.autograd.Function):
    """``TritonBIN.apply(x, rho, weight, bias, in_weight, in_bias, running_mean, running_var,
    num_batches_tracked, momentum, eps, mode, batch_only, fallback) -> y``: the layer on the
    kernels (arguments as ``triton_bin_forward``); once-differentiable. With ``fallback=True`` a
    failing backward kernel warns once and the gradients are recomputed with the composite ops
    (``backend="auto"``). Under ``torch.compile`` the launchers run inside the custom ops."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x, rho, weight, bias, in_weight, in_bias, running_mean, running_var, num_batches_tracked,
        momentum, eps, mode, batch_only, fallback=False,
    ):  # fmt: skip
        args = (x, rho, weight, bias, in_weight, in_bias, running_mean, running_var, num_batches_tracked, momentum, eps, mode)
        if _compiling():
            y, ws = torch.ops.metabin_layers.bin_forward(*args, batch_only)
        else:
            y, ws = triton_bin_forward(*args, batch_only)
        ctx.save_for_backward(x, ws, rho, weight, bias, in_weight, in_bias)
        ctx.config = (eps, mode, batch_only, fallback)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):  # type: ignore[override]
        x, ws, rho, weight, bias, in_weight, in_bias = ctx.saved_tensors
        eps, mode, batch_only, fallback = ctx.config
        need = ctx.needs_input_grad
        needs_params = any(need[1:6])
        rest = (None,) * 8
        try:
            args = (dy, x, ws, rho, weight, bias, in_weight, in_bias, mode, batch_only, need[0], needs_params)
            if _compiling():
                dx, grads = torch.ops.metabin_layers.bin_backward(*args)
            else:
                dx, grads = triton_bin_backward(*args)
        except Exception as err:
            if not fallback:
                raise
            record_triton_failure("backward", err)
            params = (rho, weight, bias, in_weight, in_bias)
            return _backward_by_recompute(dy, x, ws, params, eps, mode, batch_only, need[:6]) + rest
        if not needs_params:
            return (dx, None, None, None, None, None) + rest
        g = grads.unbind(0)
        keep = (need[1] and not batch_only, need[2], need[3], need[4], need[5])
        return (dx if need[0] else None, *[t if k else None for t, k in zip(g, keep)]) + rest


@torch.library.custom_op("metabin_layers::bin_forward", mutates_args=("running_mean", "running_var", "num_batches_tracked"))
def _bin_forward_op(
    x: Tensor,
    rho: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    in_weight: Optional[Tensor],
    in_bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    num_batches_tracked: Optional[Tensor],
    momentum: Optional[float],
    eps: float,
    stats_mode: str,
    batch_only: bool,
) -> tuple[Tensor, Tensor]:
    y, ws = triton_bin_forward(
        x,
        rho,
        weight,
        bias,
        in_weight,
        in_bias,
        running_mean,
        running_var,
        num_batches_tracked,
        momentum,
        eps,
        stats_mode,
        batch_only,
    )
    return y, ws


@_bin_forward_op.register_fake
def _(
    x,
    rho,
    weight,
    bias,
    in_weight,
    in_bias,
    running_mean,
    running_var,
    num_batches_tracked,
    momentum,
    eps,
    stats_mode,
    batch_only,
):
    xd, _, p = _forward_outputs(x)
    return torch.empty_like(xd), x.new_empty(p.workspace, dtype=_stat_dtype(x.dtype))


@torch.library.custom_op("metabin_layers::bin_backward", mutates_args=())
def _bin_backward_op(
    dy: Tensor,
    x: Tensor,
    ws: Tensor,
    rho: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    in_weight: Optional[Tensor],
    in_bias: Optional[Tensor],
    stats_mode: str,
    batch_only: bool,
    needs_dx: bool,
    needs_params: bool,
) -> tuple[Tensor, Tensor]:
    dx, grads = triton_bin_backward(
        dy, x, ws, rho, weight, bias, in_weight, in_bias, stats_mode, batch_only, needs_dx, needs_params
    )
    return (dx if dx is not None else x.new_empty(0)), (grads if grads is not None else rho.new_empty(0))


@_bin_backward_op.register_fake
def _(dy, x, ws, rho, weight, bias, in_weight, in_bias, stats_mode, batch_only, needs_dx, needs_params):
    xd = _dense_ncm(x)[0]
    dx = torch.empty_like(xd) if needs_dx else x.new_empty(0)
    return dx, (rho.new_empty((5, x.shape[1])) if needs_params else rho.new_empty(0))


@register_backend("triton")
def triton_backend(a: BINArgs, fallback: bool = False) -> Tensor:
    """The layer on the kernels (``a.group`` is not supported: the dispatcher sends
    synchronised layers to the fused backend)."""
    affine: tuple[Optional[Tensor], ...] = (a.weight, a.bias, a.in_weight, a.in_bias)
    if any(t is None for t in affine) and not all(t is None for t in affine):  # some given: fill the others
        affine = tuple(t if t is not None else torch.full_like(a.rho, fill) for t, fill in zip(affine, (1.0, 0.0, 1.0, 0.0)))
    return TritonBIN.apply(
        a.x, a.rho, *affine, a.running_mean, a.running_var, a.num_batches_tracked,
        a.momentum, a.eps, a.mode, a.batch_only, fallback,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# The variants the dispatcher can launch (benchmarks/kernel_registers.py compiles them)
# --------------------------------------------------------------------------------------------

#: Constexpr flags of each kernel that ``triton_bin_forward`` / ``triton_bin_backward`` can pass,
#: the heaviest (most live values) first.
FLAG_VARIANTS: dict[str, list[dict[str, bool]]] = {
    "fwd_stats": [
        {"COUNT": True, "CUMULATIVE": True},
        {"COUNT": True, "CUMULATIVE": False},
        {"COUNT": False, "CUMULATIVE": False},
    ],
    "fwd_apply": [
        {"USE_BATCH": u, "UPDATE": up, "CUMULATIVE": cu, "AFFINE": af, "BATCH_ONLY": bo}
        for (u, up, cu) in ((True, True, True), (True, True, False), (True, False, False), (False, False, False))
        for af in (True, False)
        for bo in (False, True)
    ],
    "bwd_sums": [{}],
    "bwd_apply": [
        {"USE_BATCH": u, "AFFINE": af, "BATCH_ONLY": bo, "WRITE_DX": dx, "WRITE_GRADS": gr}
        for u in (True, False)
        for af in (True, False)
        for bo in (False, True)
        for (dx, gr) in ((True, True), (True, False), (False, True))
    ],
}


def launch_configs(kind: str, channels_last: bool, dtype: torch.dtype, aligned: bool = True) -> list[dict[str, int]]:
    """Every ``{BLOCK_C, BLOCK_M[, BLOCK_N]}`` that ``plan`` can give kernel ``kind`` (``BLOCK_N``
    at its largest, the most registers), with the warps it launches with as ``num_warps``."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    shrink = 2 if itemsize == 8 else 1
    apply = kind in ("fwd_apply", "bwd_apply")
    found = []
    for v in (2**k for k in range(0, 31)):
        bc, bm = _apply_tile(v, v, channels_last, itemsize, aligned) if apply else _reduce_tile(v, v, channels_last, itemsize)
        cfg = {"BLOCK_C": bc, "BLOCK_M": bm, "num_warps": APPLY_WARPS if apply else REDUCE_WARPS}
        if apply:
            cfg["BLOCK_N"] = max(1, (STAT_TILE // shrink) // bc)
        if cfg not in found:
            found.append(cfg)
    return found
