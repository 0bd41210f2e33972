"""The Batch-Instance Normalization math, in one place: statistics -> coefficients -> gradients.

For an input ``x`` of shape ``(N, C, *spatial)``, per-channel parameters ``rho``, ``w_B``,
``b_B`` (BN branch), ``w_I``, ``b_I`` (IN branch), the BN statistics ``mu_B``, ``var_B`` and the
per-(n, c) instance statistics ``mu_nc``, ``var_nc`` (over the ``M`` spatial positions), MetaBIN is

    y = rho * (w_B (x - mu_B) / s_B + b_B) + (1 - rho) * (w_I (x - mu_nc) / s_nc + b_I)

with ``s = sqrt(var + eps)``. Both branches are affine in ``x`` inside one ``(n, c)`` slice:

    y = scale[n, c] * (x - mu_nc) + shift[n, c]
    a_B = rho w_B / s_B                 (C,)     the weight of the BN term
    a_I = (1 - rho) w_I / s_nc          (N, C)   the weight of the IN term
    beta = rho b_B + (1 - rho) b_I      (C,)
    scale = a_B + a_I,    shift = beta + a_B (mu_nc - mu_B)

Backward, from the per-(n, c) sums ``S1 = sum dy`` and ``D = sum (x - mu_nc) dy``:

    t_I = D / s_nc                                  (N, C)  sum of dy * x_hat_I
    t_B = sum_n (D + (mu_nc - mu_B) S1) / s_B       (C,)    sum of dy * x_hat_B
    dx = scale dy + cx (x - mu_nc) + c0
    cx = -a_I t_I / (M s_nc) - a_B t_B / (K s_B)
    c0 = -a_I S1 / M - a_B sum_n S1 / K - a_B t_B / (K s_B) (mu_nc - mu_B)

``K`` is the number of values per channel behind the batch statistics (``N * M``, or the global
count under ``torch.distributed``); the BN terms of ``dx`` exist only when the batch statistics
are used (running statistics are constants). Parameter gradients are per-channel sums of the
same quantities (``parameter_grads``).

Every backend calls these functions: the fused ATen path and the composite one
(``functional``), the synchronised layers (``distributed``), the Triton kernels (which only do
the reductions and the elementwise passes) and the folded inference form (``export``).
``stat_dtype``, ``batch_stats``, ``branch_terms`` and ``mix`` are written in the subset that
``torch.jit.script`` compiles (the folded model scripts).
"""

from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

__all__ = [
    "stat_dtype",
    "batch_stats",
    "local_moments",
    "combine_moments",
    "branch_terms",
    "mix",
    "coefficients",
    "about",
    "gradient_sums",
    "parameter_grads",
    "dx_coefficients",
]


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of statistics and coefficients: float32 at least (float64 for float64 inputs)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def batch_stats(var_nc: Tensor, mu_nc: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """``(mu_B, var_B, mu_nc - mu_B)`` of the batch from the ``(N, C)`` instance statistics.

    The law of total variance, ``var_B = mean_n(var_nc + (mu_nc - mu_B)^2)``: stable where
    ``E[x^2] - E[x]^2`` cancels. Differentiable (no in-place op on an input).
    """
    mu_b = mu_nc.mean(0)
    dev = mu_nc - mu_b
    var_b = torch.addcmul(var_nc, dev, dev).mean(0)
    return mu_b, var_b, dev


def local_moments(var_nc: Tensor, mu_nc: Tensor, spatial: int) -> Tensor:
    """``[mean_c (C), M2_c (C), count (1)]`` of one rank's batch, from its instance statistics.

    ``M2`` is the sum of squared deviations from ``mean_c``; an empty batch gives zeros.
    """
    n = mu_nc.shape[0]
    mean = mu_nc.sum(0) / max(n, 1)
    m2 = (var_nc + (mu_nc - mean).square()).sum(0) * spatial
    return torch.cat([mean, m2, mean.new_full((1,), float(n * spatial))])


def combine_moments(stacked: Tensor, c: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Mean, biased variance and count ``(1,)`` of the union of batches from their stacked
    ``local_moments`` ``(R, 2C + 1)`` (Chan et al.); batches with count 0 contribute nothing."""
    mean_r, m2_r, cnt_r = stacked[:, :c], stacked[:, c : 2 * c], stacked[:, 2 * c :]
    total = cnt_r.sum(0)
    mean = (cnt_r * mean_r).sum(0) / total
    m2 = m2_r.sum(0) + (cnt_r * (mean_r - mean).square()).sum(0)
    return mean, m2 / total, total


def branch_terms(rho: Tensor, w_b: Tensor, b_b: Tensor, w_i: Tensor, b_i: Tensor, inv_b: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-channel ``(a_B, g_I, beta)``: ``rho w_B / s_B``, ``(1 - rho) w_I`` (``a_I = g_I / s_nc``)
    and ``rho b_B + (1 - rho) b_I``; ``inv_b = 1 / s_B``."""
    return rho * w_b * inv_b, w_i - rho * w_i, torch.lerp(b_i, b_b, rho)


def mix(a_b: Tensor, a_i: Tensor, beta: Tensor, dev: Tensor) -> Tuple[Tensor, Tensor]:
    """``(scale, shift)`` of ``y = scale * (x - mu_nc) + shift`` from the branch terms and
    ``dev = mu_nc - mu_B``."""
    return a_b + a_i, torch.addcmul(beta, a_b, dev)


def coefficients(
    rho: Tensor, w_b: Tensor, b_b: Tensor, w_i: Tensor, b_i: Tensor, inv_b: Tensor, inv_nc: Tensor, dev: Tensor
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(scale, shift, a_B, a_I)`` of ``y = scale * (x - mu_nc) + shift``.

    ``inv_b = 1 / s_B`` ``(C,)``, ``inv_nc = 1 / s_nc`` ``(N, C)``, ``dev = mu_nc - mu_B``; every
    tensor in the statistics dtype. Differentiable.
    """
    a_b, g_i, beta = branch_terms(rho, w_b, b_b, w_i, b_i, inv_b)
    a_i = g_i * inv_nc
    scale, shift = mix(a_b, a_i, beta, dev)
    return scale, shift, a_b, a_i


def about(scale: Tensor, shift: Tensor, offset: Tensor) -> Tensor:
    """The shift of the same affine map about another origin: ``scale * (x - mu) + shift`` equals
    ``scale * (x - o) + about(scale, shift, mu - o)``. (``o = 0`` gives ``y = scale * x + B``.)"""
    return torch.addcmul(shift, scale, offset, value=-1)


def gradient_sums(dot: Tensor, s1: Tensor, dev: Tensor, inv_b: Tensor, inv_nc: Tensor) -> Tuple[Tensor, Tensor]:
    """``(t_I, t_B)``: ``sum dy * x_hat_I`` per (n, c) and this batch's ``sum dy * x_hat_B`` per
    channel, from ``dot = sum (x - mu_nc) dy`` and ``s1 = sum dy`` per (n, c)."""
    return inv_nc * dot, torch.addcmul(dot, dev, s1).sum(0).mul_(inv_b)


def parameter_grads(
    rho: Tensor,
    w_b: Tensor,
    b_b: Tensor,
    w_i: Tensor,
    b_i: Tensor,
    t_b: Tensor,
    s1_c: Tensor,
    ti_c: Tensor,
    needs: Sequence[bool],
    dtypes: Sequence[torch.dtype],
) -> List[Optional[Tensor]]:
    """Gradients of ``(rho, w_B, b_B, w_I, b_I)`` (None where ``needs`` is False), cast to ``dtypes``.

    ``t_b`` (C,) is ``sum dy * x_hat_B``, ``s1_c`` and ``ti_c`` the per-channel sums of ``S1`` and
    ``t_I`` over the batch.
    """
    grads: List[Optional[Tensor]] = [None] * 5
    if needs[0]:  # d/drho: w_B t_B + (b_B - b_I) S1 - w_I t_I
        grads[0] = torch.addcmul(w_b * t_b, b_b - b_i, s1_c).addcmul_(w_i, ti_c, value=-1)
    if needs[1]:
        grads[1] = rho * t_b
    if needs[2]:
        grads[2] = rho * s1_c
    if needs[3]:
        grads[3] = torch.addcmul(ti_c, rho, ti_c, value=-1)  # (1 - rho) t_I
    if needs[4]:
        grads[4] = torch.addcmul(s1_c, rho, s1_c, value=-1)
    for k, g in enumerate(grads):
        if g is not None and g.dtype != dtypes[k]:
            grads[k] = g.to(dtypes[k])
    return grads


def dx_coefficients(
    a_b: Tensor,
    a_i: Tensor,
    inv_b: Tensor,
    inv_nc: Tensor,
    t_i: Tensor,
    s1: Tensor,
    spatial: int,
    batch: Optional[Tuple[Tensor, Tensor, Tensor, Union[int, Tensor]]],
) -> Tuple[Tensor, Tensor]:
    """``(cx, c0)`` ``(N, C)`` of ``dx = scale * dy + cx * (x - mu_nc) + c0``.

    ``batch`` is ``(t_B, S1_c, dev, K)`` when the BN branch used the batch statistics: the
    per-channel sums over the batch behind them (global ones under ``torch.distributed``),
    ``dev = mu_nc - mu_B`` and their count ``K``; None when it used fixed (running) statistics.
    """
    k_i = -1.0 / spatial
    cx = a_i * inv_nc
    if batch is None:
        return cx.mul_(t_i).mul_(k_i), (a_i * s1).mul_(k_i)
    t_b, s1_c, dev, count = batch
    k_b = -1.0 / count
    cx_b = (a_b * inv_b).mul_(t_b).mul_(k_b)  # (C,)
    cx = torch.addcmul(cx_b, cx, t_i, value=k_i)
    c0 = torch.addcmul((a_b * s1_c).mul_(k_b), cx_b, dev).addcmul_(a_i, s1, value=k_i)
    return cx, c0
