"""Post-processing of a Re-ID ranking: k-reciprocal re-ranking and average query expansion.

* ``k_reciprocal_rerank``: the re-ranking of Zhong et al., "Re-ranking Person Re-identification with
  k-reciprocal Encoding", CVPR 2017, with their defaults ``k1=20``, ``k2=6``, ``lambda=0.3`` (those
  of torchreid's ``utils/rerank.py`` and fast-reid's ``TEST.RERANK``), computed as the authors'
  released code and torchreid compute it (see the function for every step).
* ``average_query_expansion``: fast-reid's average query expansion (``evaluation/query_expansion.py``,
  ``TEST.AQE``: ``k=5``, ``alpha=3.0``, one round) over the joint query + gallery set.

Examples:
    >>> import numpy as np
    >>> from metabin_layers.reid.rerank import k_reciprocal_rerank
    >>> rng = np.random.default_rng(0)
    >>> q, g = rng.normal(size=(3, 4)), rng.normal(size=(8, 4))
    >>> d = lambda a, b: np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1))
    >>> k_reciprocal_rerank(d(q, g), d(q, q), d(g, g), k1=4, k2=2).shape
    (3, 8)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import torch

__all__ = ["ReRanking", "QueryExpansion", "k_reciprocal_rerank", "average_query_expansion"]


@dataclass(frozen=True)
class ReRanking:
    """Settings of ``k_reciprocal_rerank`` (Zhong et al. 2017's defaults).

    Attributes:
        k1: size of the k-reciprocal neighbourhood (``R(p, k1)``); its expansion uses ``round(k1 / 2)``.
        k2: neighbours averaged by the local query expansion of the encodings (1: none).
        lambda_value: weight of the original distance in the final one (``1 - lambda`` for the
            Jaccard distance), in [0, 1].

    Examples:
        >>> from metabin_layers.reid.rerank import ReRanking
        >>> ReRanking().describe()
        'k-reciprocal re-ranking (k1=20, k2=6, lambda=0.3)'
    """

    k1: int = 20
    k2: int = 6
    lambda_value: float = 0.3

    def __post_init__(self) -> None:
        for name in ("k1", "k2"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"rerank {name} must be an int >= 1, got {value!r}")
        lam = self.lambda_value
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0.0 <= float(lam) <= 1.0:
            raise ValueError(f"rerank lambda_value must be a number in [0, 1], got {lam!r}")

    def describe(self) -> str:
        """A label for reports."""
        return f"k-reciprocal re-ranking (k1={self.k1}, k2={self.k2}, lambda={self.lambda_value:g})"


@dataclass(frozen=True)
class QueryExpansion:
    """Settings of ``average_query_expansion`` (fast-reid's ``TEST.AQE`` defaults).

    Attributes:
        k: neighbours combined per item, the item itself included (``QE_K``).
        alpha: exponent of the cosine-similarity weights (``ALPHA``).
        times: rounds of expansion (``QE_TIME``).

    Examples:
        >>> from metabin_layers.reid.rerank import QueryExpansion
        >>> QueryExpansion().describe()
        'average query expansion (k=5, alpha=3)'
    """

    k: int = 5
    alpha: float = 3.0
    times: int = 1

    def __post_init__(self) -> None:
        for name in ("k", "times"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"query expansion {name} must be an int >= 1, got {value!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not np.isfinite(self.alpha):
            raise ValueError(f"query expansion alpha must be a finite number, got {self.alpha!r}")

    def describe(self) -> str:
        """A label for reports."""
        rounds = f", {self.times} rounds" if self.times != 1 else ""
        return f"average query expansion (k={self.k}, alpha={self.alpha:g}{rounds})"


def _matrix(x: Any, name: str, shape: tuple[int, int]) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.shape != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    return arr


def _reciprocal(rank: np.ndarray, k: int) -> np.ndarray:
    """``R(i, k)`` of every item as a dense boolean matrix: j among i's k+1 nearest and i among j's."""
    n = rank.shape[0]
    forward = np.zeros((n, n), dtype=bool)
    forward[np.arange(n)[:, None], rank[:, : k + 1]] = True
    return forward & forward.T


def k_reciprocal_rerank(
    q_g_dist: Any,
    q_q_dist: Any,
    g_g_dist: Any,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
) -> np.ndarray:
    """k-reciprocal re-ranking (Zhong et al., CVPR 2017) of a query x gallery distance matrix.

    The steps, on the joint set of the ``q`` queries and ``g`` gallery items (``n = q + g``), as in
    the authors' released code and torchreid's ``re_ranking`` (float64 here):

    1. ``D``: the ``n x n`` matrix assembled from ``q_q_dist``, ``q_g_dist``, ``q_g_dist.T`` and
       ``g_g_dist``; ``d = (D ** 2 / column max of D ** 2).T`` (squared, each item's distances
       scaled to at most 1);
    2. the initial ranking of every item by ``d`` (a stable sort: ties keep index order);
    3. ``R(i, k1)``: the items among i's ``k1 + 1`` nearest (i included) that have i among their
       ``k1 + 1`` nearest; it is expanded by ``R(c, round(k1 / 2))`` of every candidate
       ``c`` in ``R(i, k1)`` with ``|R(c, k1/2) ∩ R(i, k1)| > 2/3 |R(c, k1/2)|`` (``round`` halves to
       even, as ``np.around``);
    4. the encoding ``V[i]``: ``exp(-d[i, j])`` over the expanded set, normalised to sum 1;
    5. local query expansion (``k2 > 1``): ``V[i]`` becomes the mean of ``V`` over i's ``k2``
       nearest (by the initial ranking, i first);
    6. the Jaccard distance ``1 - s / (2 - s)`` with ``s = sum_k min(V[i, k], V[j, k])`` (summed
       through an inverted index of the non-zero entries);
    7. ``final = (1 - lambda_value) * jaccard + lambda_value * d``, of which the query x gallery
       block is returned.

    Memory: a few dense ``n x n`` float64 matrices (``8 n^2`` bytes each): fine for a few thousand
    items (the recipe's test sets), a lot for Market-1501's 19k.

    Args:
        q_g_dist: ``(q, g)`` query x gallery distances (the recipe's ``1 - cos`` or euclidean).
        q_q_dist: ``(q, q)`` query x query distances, of the same kind.
        g_g_dist: ``(g, g)`` gallery x gallery distances, of the same kind.
        k1: the k-reciprocal neighbourhood size.
        k2: the neighbours of the local query expansion (1: none).
        lambda_value: the weight of the original distance, in [0, 1].

    Returns:
        The re-ranked ``(q, g)`` float64 distances, smaller = more similar.

    Raises:
        ValueError: shapes that do not fit together, NaN / infinite distances, an item whose
            distances to every item are 0, or settings out of range (see ``ReRanking``).

    Examples:
        >>> import numpy as np
        >>> from metabin_layers.reid.rerank import k_reciprocal_rerank
        >>> q_g = np.array([[0.1, 0.9, 0.8]])
        >>> q_q = np.array([[0.0]])
        >>> g_g = np.array([[0.0, 0.9, 0.85], [0.9, 0.0, 0.2], [0.85, 0.2, 0.0]])
        >>> int(np.argmin(k_reciprocal_rerank(q_g, q_q, g_g, k1=2, k2=1)))
        0
    """
    ReRanking(k1, k2, lambda_value)  # validates
    q_g = np.asarray(q_g_dist.detach().cpu() if isinstance(q_g_dist, torch.Tensor) else q_g_dist)
    if q_g.ndim != 2 or 0 in q_g.shape:
        raise ValueError(f"q_g_dist: expected a non-empty 2-D (num_query, num_gallery) array, got shape {q_g.shape}")
    q, g = q_g.shape
    q_g = _matrix(q_g, "q_g_dist", (q, g))
    q_q = _matrix(q_q_dist, "q_q_dist", (q, q))
    g_g = _matrix(g_g_dist, "g_g_dist", (g, g))
    n = q + g
    dist = np.block([[q_q, q_g], [q_g.T, g_g]]) ** 2
    col_max = dist.max(axis=0)
    if not (col_max > 0).all():
        raise ValueError("distances: an item is at distance 0 from every item (all features identical?)")
    original = (dist / col_max).T
    del dist
    rank = np.argsort(original, axis=1, kind="stable")

    # 3. k-reciprocal sets and their expansion
    r_k1 = _reciprocal(rank, k1)
    r_half = _reciprocal(rank, int(np.around(k1 / 2.0)))
    half_size = r_half.sum(axis=1)
    expanded = r_k1.copy()
    rows, cands = np.nonzero(r_k1)
    # |R(c, k1/2) ∩ R(i, k1)| for every (i, c) with c in R(i, k1): a gather over c's short list
    width = min(int(np.around(k1 / 2.0)) + 1, n)
    half_lists = np.where(r_half[np.arange(n)[:, None], rank[:, :width]], rank[:, :width], -1)  # R(c, k1/2), -1 padded
    members = half_lists[cands]  # (pairs, width)
    valid = members >= 0
    inter = (r_k1[rows[:, None], np.where(valid, members, 0)] & valid).sum(axis=1)
    grow = inter > 2.0 / 3 * half_size[cands]
    grow_rows = np.repeat(rows[grow], width)
    grow_cols = members[grow].reshape(-1)
    keep = grow_cols >= 0
    expanded[grow_rows[keep], grow_cols[keep]] = True
    del r_k1, r_half

    # 4. Gaussian-kernel encodings
    weights = np.where(expanded, np.exp(-original), 0.0)
    V = weights / weights.sum(axis=1, keepdims=True)
    del weights, expanded
    # 5. local query expansion over the k2 nearest
    if k2 != 1:
        nearest = rank[:, : min(k2, n)]
        V_qe = np.zeros_like(V)
        for t in range(nearest.shape[1]):
            V_qe += V[nearest[:, t]]
        V = V_qe / nearest.shape[1]
    del rank

    # 6. Jaccard distance of every query to every item through the inverted index (column lists of V)
    cols_t, rows_t = np.nonzero(V.T)  # sorted by column, then row
    values = V[rows_t, cols_t]
    indptr = np.searchsorted(cols_t, np.arange(n + 1))
    jaccard = np.empty((q, n))
    for i in range(q):
        nz = np.flatnonzero(V[i])
        starts, lengths = indptr[nz], indptr[nz + 1] - indptr[nz]
        offsets = np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())
        contrib = np.minimum(np.repeat(V[i, nz], lengths), values[offsets])
        s = np.bincount(rows_t[offsets], weights=contrib, minlength=n)
        jaccard[i] = 1.0 - s / (2.0 - s)

    # 7. the blend, query x gallery block
    final = jaccard * (1 - lambda_value) + original[:q] * lambda_value
    return final[:, q:]


def average_query_expansion(
    query_features: Any,
    gallery_features: Any,
    k: int = 5,
    alpha: float = 3.0,
    times: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Average query expansion as fast-reid's ``aqe``, over the joint query + gallery features.

    For ``times`` rounds, every item ``x`` (query and gallery alike) is replaced by
    ``sum_{j in N_k(x)} s_j^alpha f_j / k``, where ``N_k(x)`` are the ``k`` items of highest
    cosine similarity ``s_j`` to ``x`` (``x`` itself included, as its similarity 1 is the highest;
    ties by index order) and ``f_j`` their features of the round before (not normalised: the
    similarities of the next round use them L2-normalised). The returned features are these
    weighted means, not normalised, exactly as fast-reid returns them; the recipe's cosine
    distance normalises them, its euclidean distance takes them as they are.

    Args:
        query_features: ``(q, D)`` features (tensor or array).
        gallery_features: ``(g, D)`` features.
        k: neighbours combined per item, itself included (at most ``q + g`` are used).
        alpha: exponent of the similarity weights.
        times: rounds.

    Returns:
        ``(query, gallery)``: the expanded features as float64 CPU tensors, shapes as the inputs.

    Raises:
        ValueError: features that are not 2-D, that differ in dimension, or that are not finite;
            settings out of range (see ``QueryExpansion``); a weight that is NaN (a non-integer
            ``alpha`` with a negative similarity).

    Examples:
        >>> import torch
        >>> from metabin_layers.reid.rerank import average_query_expansion
        >>> q = torch.tensor([[1.0, 0.0]]); g = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> qe, ge = average_query_expansion(q, g, k=2)
        >>> qe.tolist(), ge[1].tolist()  # items 0 and 1 (identical, similarity 1) are averaged
        ([[1.0, 0.0]], [0.0, 0.5])
    """
    QueryExpansion(k, alpha, times)  # validates
    qf = torch.as_tensor(query_features).detach().cpu().double()
    gf = torch.as_tensor(gallery_features).detach().cpu().double()
    if qf.ndim != 2:
        raise ValueError(f"query_features: expected a 2-D (N, D) array, got shape {tuple(qf.shape)}")
    if gf.ndim != 2:
        raise ValueError(f"gallery_features: expected a 2-D (M, D) array, got shape {tuple(gf.shape)}")
    if qf.shape[1] != gf.shape[1]:
        raise ValueError(f"gallery_features: feature dimension {gf.shape[1]} differs from the query's {qf.shape[1]}")
    feats = torch.cat([qf, gf])
    if not torch.isfinite(feats).all():
        raise ValueError("features: contain NaN or infinite values")
    top = min(k, feats.shape[0])
    for _ in range(times):
        unit = torch.nn.functional.normalize(feats, dim=1)
        sims = unit @ unit.t()
        order = torch.from_numpy(np.argsort(-sims.numpy(), axis=1, kind="stable")[:, :top])
        weights = torch.gather(sims, 1, order) ** alpha
        if torch.isnan(weights).any():
            raise ValueError(f"query expansion: alpha={alpha} gives NaN weights for negative similarities; use an integer alpha")
        feats = (feats[order] * weights.unsqueeze(-1)).sum(dim=1) / top
    return feats[: qf.shape[0]], feats[qf.shape[0] :]


RerankArg = Union[bool, ReRanking, None]
QueryExpansionArg = Union[bool, QueryExpansion, None]
