"""Losses used by MetaBIN: batch-hard triplet, label-smoothed cross-entropy, and the two
meta-train regularisers of the paper, intra-domain scatter and inter-domain shuffle.

All losses follow the authors' published definitions (the MetaBIN paper and its code), are
vectorised (boolean masks over the ``(N, N)`` distance matrix, no Python loop over anchors or
domains), stay differentiable to second order (they are used inside
``torch.autograd.grad(..., create_graph=True)`` for the meta steps), and compute in float32 at
least: fp16 / bf16 features are upcast, and the returned loss is float32 (float64 for float64
inputs).

Differences from the authors' code, all deliberate:

* Hard mining is done with masks instead of row-by-row loops; an anchor without any negative
  is left out of the mean instead of raising.
* A degenerate batch (no anchor has a negative: one identity, no two identities within a domain,
  or no sample at all) gives a zero loss that stays connected to the autograd graph (zero
  gradient), instead of raising: one unlucky batch does not stop a long run. The recipe counts
  these events in its training log.
* The soft-margin triplet is ``softplus(d_ap - d_an)``, which cannot overflow, so the
  authors' "if inf, fall back to a 0.3 hinge" branch is not needed.
* Label-smoothed CE is the plain batch mean (the authors divide the sum by the number of
  samples with a non-zero loss, which is the batch size in practice).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "pairwise_euclidean",
    "triplet_loss",
    "cross_entropy_label_smooth",
    "intra_domain_scatter_loss",
    "inter_domain_shuffle_loss",
    "TripletLoss",
    "CrossEntropyLabelSmooth",
    "IntraDomainScatterLoss",
    "InterDomainShuffleLoss",
]

_NORM_EPS = 1e-12  # the authors' ``x / (|x| + 1e-12)``
_DIST_MIN = 1e-12  # the authors' clamp of the squared distance
_NO_IGNORE_INDEX = -(2**63)  # nll_loss ignores -100 by default: a target of -100 must raise too


# --------------------------------------------------------------------------------------------
# validation and small helpers
# --------------------------------------------------------------------------------------------


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (fp16 / bf16 are upcast)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_matrix(x: object, name: str, form: str = "(N, D)", allow_empty: bool = False) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {form}, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D with shape {form}, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.shape[0] == 0 and not allow_empty:
        raise ValueError(f"{name} must have at least one row, got shape {tuple(x.shape)}")
    return x


def _check_vector(v: object, name: str, n: int, ref: str) -> Tensor:
    if not isinstance(v, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (N,), got {type(v).__name__}")
    if v.dim() != 1 or v.shape[0] != n:
        raise ValueError(f"{name} must be 1-D of length N={n} (one entry per row of {ref}), got shape {tuple(v.shape)}")
    return v


def _check_margin(margin: float) -> float:
    margin = float(margin)
    if not math.isfinite(margin) or margin < 0:
        raise ValueError(f"margin must be a finite number >= 0 (0 selects the soft margin), got {margin}")
    return margin


def _check_epsilon(epsilon: float) -> float:
    epsilon = float(epsilon)
    if not (0.0 <= epsilon < 1.0):
        raise ValueError(f"epsilon must be in [0, 1), got {epsilon}")
    return epsilon


def _l2_normalize(x: Tensor) -> Tensor:
    # The authors' form x / (|x| + 1e-12); vector_norm has a zero gradient at x = 0, not NaN.
    return x / (torch.linalg.vector_norm(x, dim=1, keepdim=True) + _NORM_EPS)


def _euclidean(x: Tensor, y: Tensor) -> Tensor:
    xx = x.square().sum(1, keepdim=True)
    yy = y.square().sum(1).unsqueeze(0)
    d2 = torch.addmm(xx + yy, x, y.t(), beta=1.0, alpha=-2.0)
    return d2.clamp(min=_DIST_MIN).sqrt()


def _zero_loss(x: Tensor) -> Tensor:
    """A zero scalar that stays in the autograd graph of ``x`` (its gradient is zero)."""
    return x.sum() * 0.0


def _hard_mining_loss(dist: Tensor, is_pos: Tensor, is_neg: Tensor, margin: float) -> Tensor:
    """Batch-hard loss from a distance matrix and boolean positive / negative masks.

    ``d_ap`` = farthest positive, ``d_an`` = nearest negative, per anchor (row). Rows without
    a negative are left out of the mean; ``is_pos`` always contains the diagonal. No row with a
    negative (or no row): a zero loss connected to the graph. No host sync: the rows are selected
    by ``torch.where`` and counted on the device.
    """
    if dist.shape[0] == 0:
        return _zero_loss(dist)
    valid = is_neg.any(dim=1)
    d_ap = dist.masked_fill(~is_pos, float("-inf")).max(dim=1).values
    d_an = dist.masked_fill(~is_neg, float("inf")).min(dim=1).values
    diff = torch.where(valid, d_ap - d_an, 0.0)  # a row without a negative has d_an = inf
    per_anchor = F.softplus(diff) if margin == 0 else F.relu(diff + margin)
    return (per_anchor * valid).sum() / valid.sum().clamp(min=1)


# --------------------------------------------------------------------------------------------
# functional API
# --------------------------------------------------------------------------------------------


def pairwise_euclidean(x: Tensor, y: Optional[Tensor] = None) -> Tensor:
    """Euclidean distance matrix, the authors' definition.

    ``d[i, j] = sqrt(clamp(|x_i|^2 + |y_j|^2 - 2 x_i . y_j, min=1e-12))``, so the
    self-distance is about 1e-6 rather than 0 and the gradient is finite everywhere.

    Args:
        x: ``(N, D)`` floating-point features.
        y: ``(M, D)`` features, or ``None`` for ``y = x``.

    Returns:
        ``(N, M)`` distances in float32 (float64 if an input is float64).

    Examples:
        >>> import torch
        >>> from metabin_layers.losses import pairwise_euclidean
        >>> pairwise_euclidean(torch.tensor([[0.0, 0.0], [3.0, 4.0]]))[0, 1].item()
        5.0
    """
    _check_matrix(x, "x")
    if y is None:
        dtype = _compute_dtype(x)
        xf = x.to(dtype)
        return _euclidean(xf, xf)
    _check_matrix(y, "y", "(M, D)")
    if y.shape[1] != x.shape[1]:
        raise ValueError(f"y must have the same feature size D as x: x has shape {tuple(x.shape)}, y has shape {tuple(y.shape)}")
    dtype = _compute_dtype(x, y)
    return _euclidean(x.to(dtype), y.to(dtype))


def triplet_loss(features: Tensor, labels: Tensor, margin: float = 0.3, normalize: bool = False) -> Tensor:
    """Batch-hard triplet loss (Hermans et al.), as used by MetaBIN for ``L_tr``.

    For every anchor ``i``: ``d_ap`` = distance to the farthest sample with the same label (the
    anchor itself counts, so a lone identity gives ``d_ap ~ 0``), ``d_an`` = distance to the
    nearest sample with another label. The loss is the mean over anchors of
    ``relu(d_ap - d_an + margin)``, or of the soft margin ``softplus(d_ap - d_an)`` when
    ``margin == 0``.

    Args:
        features: ``(N, D)`` embeddings (MetaBIN uses the pooled features before the BNNeck).
        labels: ``(N,)`` identity labels.
        margin: hinge margin (>= 0); ``0`` selects the soft margin.
        normalize: L2-normalise the features first (``x / (|x| + 1e-12)``).

    Returns:
        The scalar loss, float32 (float64 for float64 features).

    A batch with a single identity (or no sample) has no negative: the loss is then a zero that
    stays connected to the graph (zero gradient), not an error.

    Raises:
        ValueError: on malformed inputs.

    Examples:
        >>> import torch
        >>> from metabin_layers.losses import triplet_loss
        >>> f = torch.tensor([[0.0], [2.0], [3.0], [4.0]])
        >>> round(triplet_loss(f, torch.tensor([0, 0, 1, 1]), margin=0.3).item(), 4)
        0.4
        >>> triplet_loss(f.requires_grad_(), torch.zeros(4, dtype=torch.long)).item()  # one identity
        0.0
    """
    _check_matrix(features, "features", allow_empty=True)
    _check_vector(labels, "labels", features.shape[0], "features")
    margin = _check_margin(margin)
    x = features.to(_compute_dtype(features))
    if normalize:
        x = _l2_normalize(x)
    dist = _euclidean(x, x)
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    return _hard_mining_loss(dist, is_pos=same, is_neg=~same, margin=margin)


def cross_entropy_label_smooth(logits: Tensor, targets: Tensor, epsilon: float = 0.1) -> Tensor:
    """Cross-entropy with the authors' label smoothing.

    The target distribution puts ``1 - epsilon`` on the true class and ``epsilon / (K - 1)`` on
    each of the other ``K - 1`` classes (not ``epsilon / K`` as in ``F.cross_entropy``'s
    ``label_smoothing``). Mean over the batch. ``epsilon = 0`` is plain cross-entropy.

    Args:
        logits: ``(N, K)`` unnormalised scores.
        targets: ``(N,)`` integer class indices in ``[0, K)``.
        epsilon: smoothing in ``[0, 1)``.

    Returns:
        The scalar loss, float32 (float64 for float64 logits); a zero in the graph for an empty
        batch.

    Raises:
        ValueError: malformed shapes, non-integer ``targets``, ``epsilon`` outside ``[0, 1)``, or
            ``K < 2`` with ``epsilon > 0``.
        IndexError: a class index outside ``[0, K)`` (``nll_loss``'s own check: on a GPU it is a
            device-side assert).

    Examples:
        >>> import torch
        >>> from metabin_layers.losses import cross_entropy_label_smooth
        >>> logits = torch.tensor([[2.0, 0.0, 0.0]])
        >>> loss = cross_entropy_label_smooth(logits, torch.tensor([0]), epsilon=0.1)
        >>> logp = logits.log_softmax(1)[0]
        >>> torch.allclose(loss, -(0.9 * logp[0] + 0.05 * logp[1] + 0.05 * logp[2]))
        True
    """
    _check_matrix(logits, "logits", "(N, K)", allow_empty=True)
    _check_vector(targets, "targets", logits.shape[0], "logits")
    epsilon = _check_epsilon(epsilon)
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ValueError(f"targets must hold integer class indices, got dtype {targets.dtype}")
    k = logits.shape[1]
    if epsilon > 0 and k < 2:
        raise ValueError(f"logits must have at least 2 classes (K >= 2) when epsilon > 0, got shape {tuple(logits.shape)}")
    if logits.shape[0] == 0:  # an empty batch: zero, in the graph
        return _zero_loss(logits.to(_compute_dtype(logits)))
    logp = logits.to(_compute_dtype(logits)).log_softmax(dim=1)
    # nll_loss checks the targets on the device (an index outside [0, K) raises on the CPU and
    # asserts on the GPU): no host sync. No index is ignored.
    nll = F.nll_loss(logp, targets.long(), ignore_index=_NO_IGNORE_INDEX)
    if epsilon == 0:
        return nll
    # -mean((1 - eps) * logp_true + eps / (K - 1) * (sum(logp) - logp_true))
    other = epsilon / (k - 1)
    return (1.0 - epsilon - other) * nll - other * logp.sum(dim=1).mean()


def intra_domain_scatter_loss(features: Tensor, domains: Tensor, normalize: bool = True) -> Tensor:
    """Intra-domain scatter loss ``L_scat`` (the authors' ``SCT``, type ``cosine_sim``).

    Features are L2-normalised (``x / (|x| + 1e-12)``) when ``normalize``. For each domain ``d``
    in the batch, ``c_d`` is the mean of its features (not re-normalised) and
    ``S_d = mean_{i in d} cos(c_d, x_i)``. The loss is the mean of ``S_d`` over the domains
    present, with a positive sign: minimising it spreads features away from their domain centroid.

    Args:
        features: ``(N, D)`` embeddings.
        domains: ``(N,)`` domain labels (any values; only equality matters).
        normalize: L2-normalise the features first (the authors' setting).

    Returns:
        The scalar loss, float32 (float64 for float64 features); a zero in the graph for an empty
        batch.

    Examples:
        >>> import torch
        >>> from metabin_layers.losses import intra_domain_scatter_loss
        >>> f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 2.0]])
        >>> loss = intra_domain_scatter_loss(f, torch.tensor([0, 0, 1, 1]))
        >>> round(loss.item(), 4)  # (cos 45 deg + 1) / 2
        0.8536
    """
    _check_matrix(features, "features", allow_empty=True)
    _check_vector(domains, "domains", features.shape[0], "features")
    x = features.to(_compute_dtype(features))
    if x.shape[0] == 0:  # an empty batch: zero, in the graph
        return _zero_loss(x)
    if normalize:
        x = _l2_normalize(x)
    # Pairwise domain equality instead of torch.unique: no host sync, no data-dependent shape.
    same = (domains.unsqueeze(0) == domains.unsqueeze(1)).to(x.dtype)  # (N, N)
    counts = same.sum(1)  # (N,): the size of each sample's domain
    c = (same @ x) / counts.unsqueeze(1)  # (N, D): each sample's own centroid, not re-normalised
    denom = torch.linalg.vector_norm(c, dim=1) * torch.linalg.vector_norm(x, dim=1)
    cos = (c * x).sum(1) / denom.clamp(min=_DIST_MIN)
    # The mean over domains of S_d: a domain of n samples weighs each of its samples 1 / n, and the
    # number of domains is the sum of those weights.
    weight = counts.reciprocal()
    return (cos * weight).sum() / weight.sum()


def inter_domain_shuffle_loss(features: Tensor, labels: Tensor, domains: Tensor, margin: float = 0.0) -> Tensor:
    """Inter-domain shuffle loss ``L_shuf`` (the authors' ``TripletLoss_add``).

    A batch-hard triplet with swapped roles for domains. For every anchor ``i``: "positives" are
    ``i`` itself and every sample of *another domain* (hardest = farthest); negatives are the
    samples of the *same domain with another label* (hardest = nearest). Same-domain samples with
    the same label are neither. Loss per anchor: ``softplus(d_ap - d_an)`` for ``margin == 0``
    (the authors' setting), ``relu(d_ap - d_an + margin)`` otherwise; mean over the anchors that
    have a negative. Minimising it pulls other domains closer than same-domain strangers.

    Args:
        features: ``(N, D)`` embeddings (not normalised, as in the authors' configuration).
        labels: ``(N,)`` identity labels.
        domains: ``(N,)`` domain labels.
        margin: hinge margin (>= 0); ``0`` selects the soft margin.

    Returns:
        The scalar loss, float32 (float64 for float64 features).

    When no domain holds two identities (or there is no sample) no anchor has a negative: the
    loss is then a zero that stays connected to the graph, not an error.

    Raises:
        ValueError: on malformed inputs.

    Examples:
        >>> import torch
        >>> from metabin_layers.losses import inter_domain_shuffle_loss
        >>> f = torch.tensor([[0.0], [1.0], [3.0], [6.0]])
        >>> labels, domains = torch.tensor([0, 1, 2, 3]), torch.tensor([0, 0, 1, 1])
        >>> loss = inter_domain_shuffle_loss(f, labels, domains, margin=1.0)
        >>> round(loss.item(), 4)  # (6 + 5 + 1 + 4) / 4
        4.0
    """
    _check_matrix(features, "features", allow_empty=True)
    n = features.shape[0]
    _check_vector(labels, "labels", n, "features")
    _check_vector(domains, "domains", n, "features")
    margin = _check_margin(margin)
    x = features.to(_compute_dtype(features))
    dist = _euclidean(x, x)
    same_domain = domains.unsqueeze(0) == domains.unsqueeze(1)
    same_label = labels.unsqueeze(0) == labels.unsqueeze(1)
    eye = torch.eye(n, dtype=torch.bool, device=dist.device)
    return _hard_mining_loss(dist, is_pos=~same_domain | eye, is_neg=same_domain & ~same_label, margin=margin)


# --------------------------------------------------------------------------------------------
# nn.Module wrappers
# --------------------------------------------------------------------------------------------


class TripletLoss(nn.Module):
    """Module form of ``triplet_loss``.

    Args:
        margin: hinge margin; 0 gives the soft-margin form ``softplus(d_ap - d_an)``.
        normalize: L2-normalise the features before the distances.

    Examples:
        >>> import torch
        >>> from metabin_layers.losses import TripletLoss
        >>> loss_fn = TripletLoss(margin=0.3)
        >>> loss = loss_fn(torch.randn(8, 16), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
        >>> loss.dim()
        0
    """

    def __init__(self, margin: float = 0.3, normalize: bool = False) -> None:
        super().__init__()
        self.margin = _check_margin(margin)
        self.normalize = bool(normalize)

    def forward(self, features: Tensor, labels: Tensor) -> Tensor:
        return triplet_loss(features, labels, margin=self.margin, normalize=self.normalize)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, normalize={self.normalize}"


class CrossEntropyLabelSmooth(nn.Module):
    """Module form of ``cross_entropy_label_smooth``.

    Args:
        epsilon: smoothing mass in [0, 1).

    Examples:
        >>> import torch
        >>> from metabin_layers.losses import CrossEntropyLabelSmooth
        >>> loss_fn = CrossEntropyLabelSmooth(epsilon=0.1)
        >>> loss = loss_fn(torch.randn(4, 10), torch.tensor([0, 3, 9, 1]))
        >>> bool(loss > 0)
        True
    """

    def __init__(self, epsilon: float = 0.1) -> None:
        super().__init__()
        self.epsilon = _check_epsilon(epsilon)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        return cross_entropy_label_smooth(logits, targets, epsilon=self.epsilon)

    def extra_repr(self) -> str:
        return f"epsilon={self.epsilon}"


class IntraDomainScatterLoss(nn.Module):
    """Module form of ``intra_domain_scatter_loss``.

    Args:
        normalize: L2-normalise the features first (the authors' setting).

    Examples:
        >>> import torch
        >>> from metabin_layers.losses import IntraDomainScatterLoss
        >>> loss_fn = IntraDomainScatterLoss()
        >>> loss = loss_fn(torch.randn(6, 16), torch.tensor([0, 0, 1, 1, 2, 2]))
        >>> bool(0 <= loss <= 1)
        True
    """

    def __init__(self, normalize: bool = True) -> None:
        super().__init__()
        self.normalize = bool(normalize)

    def forward(self, features: Tensor, domains: Tensor) -> Tensor:
        return intra_domain_scatter_loss(features, domains, normalize=self.normalize)

    def extra_repr(self) -> str:
        return f"normalize={self.normalize}"


class InterDomainShuffleLoss(nn.Module):
    """Module form of ``inter_domain_shuffle_loss``.

    Args:
        margin: hinge margin; 0 gives the soft-margin form.

    Examples:
        >>> import torch
        >>> from metabin_layers.losses import InterDomainShuffleLoss
        >>> loss_fn = InterDomainShuffleLoss()
        >>> labels = torch.tensor([0, 1, 2, 3])
        >>> loss = loss_fn(torch.randn(4, 16), labels, torch.tensor([0, 0, 1, 1]))
        >>> bool(loss > 0)
        True
    """

    def __init__(self, margin: float = 0.0) -> None:
        super().__init__()
        self.margin = _check_margin(margin)

    def forward(self, features: Tensor, labels: Tensor, domains: Tensor) -> Tensor:
        return inter_domain_shuffle_loss(features, labels, domains, margin=self.margin)

    def extra_repr(self) -> str:
        return f"margin={self.margin}"
