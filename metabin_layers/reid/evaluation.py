"""Re-ID evaluation: features, distances, CMC / mAP / mINP (torchreid / fast-reid conventions).

Protocol (authors' ``evaluation/reid_evaluation.py`` and ``rank.py``):

* distances between query and gallery features (default ``1 - cos`` of L2-normalised features);
* for every query the gallery is sorted by distance (stable sort: ties keep gallery order) and
  gallery items with the query's identity **and** camera are removed;
* a query with no remaining true match is *invalid* and skipped;
* CMC: cumulative first-match indicator, averaged over valid queries;
* AP: mean of the precision at each true-match position; INP: ``#matches / (1-based position of
  the last match)``; mAP / mINP average over valid queries (the authors' pure-Python path).
  Their compiled Cython path averages AP / INP over *all* queries (invalid ones counting 0);
  ``invalid_as_zero=True`` reproduces that.

Optionally the ranking is post-processed first (``metabin_layers.reid.rerank``): average query
expansion of the features (fast-reid's ``aqe``), then k-reciprocal re-ranking of the distances
(Zhong et al. 2017), in fast-reid's order.

Examples:
    >>> from metabin_layers.reid.evaluation import evaluate_rank
    >>> import numpy as np
    >>> d = np.array([[0.1, 0.5, 0.3]])
    >>> cmc, mAP, mINP = evaluate_rank(d, np.array([1]), np.array([1, 1, 2]),
    ...                                np.array([0]), np.array([1, 1, 1]), max_rank=3)
    >>> cmc.tolist(), mAP, mINP
    ([1.0, 1.0, 1.0], 0.8333333333333333, 0.6666666666666666)
"""

from __future__ import annotations

import warnings
from typing import Any, Iterable, Mapping, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .rerank import QueryExpansion, QueryExpansionArg, RerankArg, ReRanking, average_query_expansion, k_reciprocal_rerank

__all__ = ["evaluate_rank", "extract_features", "compute_distance", "evaluate", "ranking_label", "rerank_distances"]

# Queries per chunk are chosen so that a chunk's (queries x gallery) working arrays stay small.
_CHUNK_ELEMENTS = 1 << 22


def _as_1d(x: Any, name: str, length: int) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array, got shape {arr.shape}")
    if arr.shape[0] != length:
        raise ValueError(f"{name}: expected length {length} (from distmat), got {arr.shape[0]}")
    return arr


def evaluate_rank(
    distmat: np.ndarray | torch.Tensor,
    q_pids: Any,
    g_pids: Any,
    q_camids: Any,
    g_camids: Any,
    max_rank: int = 50,
    *,
    invalid_as_zero: bool = False,
    rerank: RerankArg = None,
    query_expansion: QueryExpansionArg = None,
    features: Optional[tuple[Any, Any]] = None,
    metric: str = "cosine",
    q_q_distmat: Any = None,
    g_g_distmat: Any = None,
) -> tuple[np.ndarray, float, float]:
    """CMC, mAP and mINP of a query x gallery distance matrix (market1501 protocol).

    Vectorised over the gallery (per-row ``argsort``, boolean masks, cumulative sums); queries
    are processed in chunks to bound memory. With ``rerank`` / ``query_expansion`` the distances
    are post-processed first (``rerank_distances``).

    Args:
        distmat: ``(num_query, num_gallery)`` distances, smaller = more similar (no NaN); None
            when ``features`` are given with ``query_expansion`` (the distances are then those of
            the expanded features).
        q_pids: identities of the queries (1-D, any comparable dtype), one per row of ``distmat``.
        g_pids: identities of the gallery items, one per column of ``distmat``.
        q_camids: camera ids of the queries.
        g_camids: camera ids of the gallery items; a gallery item of the query's identity and
            camera is left out for that query.
        max_rank: length of the returned CMC curve. If larger than the gallery, a warning is
            issued and the gallery size is used (as torchreid does).
        invalid_as_zero: average AP / INP over *all* queries with invalid ones counting 0
            (the authors' Cython behaviour) instead of over valid queries. CMC always averages
            over valid queries.
        rerank: k-reciprocal re-ranking: True (Zhong et al.'s ``k1=20, k2=6, lambda=0.3``) or
            a ``ReRanking``; needs the query x query and gallery x gallery distances:
            ``q_q_distmat`` and ``g_g_distmat``, or ``features``.
        query_expansion: average query expansion of the features: True (fast-reid's ``k=5,
            alpha=3``) or a ``QueryExpansion``; needs ``features`` and ``distmat=None``.
        features: ``(query_features, gallery_features)``: the distances (``metric``) are computed
            from them (after the query expansion) where ``distmat`` or the re-ranking needs them.
        metric: the distance of ``features``: ``"cosine"`` or ``"euclidean"`` (``compute_distance``).
        q_q_distmat: ``(num_query, num_query)`` distances for ``rerank`` without ``features``.
        g_g_distmat: ``(num_gallery, num_gallery)`` distances for ``rerank`` without ``features``.

    Returns:
        ``(cmc, mAP, mINP)``: ``cmc`` is a float64 array of length ``max_rank`` (values in
        [0, 1], ``cmc[k]`` = fraction of valid queries with a true match within the top k+1),
        ``mAP`` and ``mINP`` are floats in [0, 1].

    Raises:
        ValueError: bad shapes (the message names the argument), NaN distances, ``max_rank < 1``,
            no valid query at all, or re-ranking / query expansion without what it needs.

    Examples:
        >>> import numpy as np
        >>> from metabin_layers.reid.evaluation import evaluate_rank
        >>> d = np.array([[0.2, 0.1], [0.3, 0.2]])
        >>> cmc, mAP, mINP = evaluate_rank(d, [0, 1], [1, 0], [0, 0], [1, 1], max_rank=2)
        >>> cmc.tolist(), mAP
        ([0.5, 1.0], 0.75)
    """
    if rerank or query_expansion:
        distmat = rerank_distances(
            distmat,
            rerank=rerank,
            query_expansion=query_expansion,
            features=features,
            metric=metric,
            q_q_distmat=q_q_distmat,
            g_g_distmat=g_g_distmat,
        )
    elif distmat is None:
        if features is None:
            raise ValueError("distmat: None needs features=(query_features, gallery_features)")
        distmat = compute_distance(*features, metric=metric)
    if isinstance(distmat, torch.Tensor):
        distmat = distmat.detach().cpu().numpy()
    distmat = np.asarray(distmat)
    if distmat.ndim != 2:
        raise ValueError(f"distmat: expected a 2-D (num_query, num_gallery) array, got shape {distmat.shape}")
    if not np.issubdtype(distmat.dtype, np.number) or np.issubdtype(distmat.dtype, np.complexfloating):
        raise ValueError(f"distmat: expected a real numeric array, got dtype {distmat.dtype}")
    num_q, num_g = distmat.shape
    if num_q == 0:
        raise ValueError("distmat: no queries (0 rows)")
    if num_g == 0:
        raise ValueError("distmat: empty gallery (0 columns)")
    if np.isnan(distmat).any():
        raise ValueError("distmat: contains NaN")
    q_pids = _as_1d(q_pids, "q_pids", num_q)
    g_pids = _as_1d(g_pids, "g_pids", num_g)
    q_camids = _as_1d(q_camids, "q_camids", num_q)
    g_camids = _as_1d(g_camids, "g_camids", num_g)
    max_rank = int(max_rank)
    if max_rank < 1:
        raise ValueError(f"max_rank: must be >= 1, got {max_rank}")
    if max_rank > num_g:
        warnings.warn(
            f"max_rank={max_rank} exceeds the gallery size {num_g}; using {num_g}",
            RuntimeWarning,
            stacklevel=2,
        )
        max_rank = num_g

    ranks = np.arange(1, max_rank + 1)
    cmc_sum = np.zeros(max_rank, dtype=np.float64)
    ap_sum = 0.0
    inp_sum = 0.0
    num_valid = 0
    chunk = max(1, _CHUNK_ELEMENTS // num_g)
    for start in range(0, num_q, chunk):
        stop = min(start + chunk, num_q)
        order = np.argsort(distmat[start:stop], axis=1, kind="stable")
        same_pid = g_pids[order] == q_pids[start:stop, None]
        same_cam = g_camids[order] == q_camids[start:stop, None]
        keep = ~(same_pid & same_cam)
        matches = same_pid & keep  # true matches, in sorted order
        num_rel = matches.sum(axis=1)
        valid = num_rel > 0
        if not valid.any():
            continue
        matches, keep, num_rel = matches[valid], keep[valid], num_rel[valid]
        rows = np.arange(matches.shape[0])
        # 1-based rank of every kept gallery item after the same-id/same-camera removal
        kept_rank = np.cumsum(keep, axis=1)
        first = matches.argmax(axis=1)
        last = num_g - 1 - matches[:, ::-1].argmax(axis=1)
        first_rank = kept_rank[rows, first]
        cmc_sum += (ranks[None, :] >= first_rank[:, None]).sum(axis=0)
        hits = np.cumsum(matches, axis=1)
        precision = np.where(matches, hits / np.maximum(kept_rank, 1), 0.0)
        ap_sum += float((precision.sum(axis=1) / num_rel).sum())
        inp_sum += float((num_rel / kept_rank[rows, last]).sum())
        num_valid += int(valid.sum())

    if num_valid == 0:
        raise ValueError("no valid query: no query has a true match in the gallery from another camera")
    denom = num_q if invalid_as_zero else num_valid
    return cmc_sum / num_valid, ap_sum / denom, inp_sum / denom


def _settings(value: Any, cls: type, name: str) -> Any:
    """``True`` -> the defaults, a settings object -> itself, None / False -> None."""
    if value is None or value is False:
        return None
    if value is True:
        return cls()
    if isinstance(value, cls):
        return value
    raise TypeError(f"{name}: expected a bool or a {cls.__name__}, got {type(value).__name__}")


def rerank_distances(
    distmat: Any,
    *,
    rerank: RerankArg = None,
    query_expansion: QueryExpansionArg = None,
    features: Optional[tuple[Any, Any]] = None,
    metric: str = "cosine",
    q_q_distmat: Any = None,
    g_g_distmat: Any = None,
) -> np.ndarray:
    """The query x gallery distances after query expansion and re-ranking (fast-reid's order).

    With ``query_expansion``, ``features`` are expanded (``average_query_expansion``) and the
    distances computed from them (``compute_distance(..., metric)``); ``distmat`` must then be None.
    With ``rerank``, the distances are re-ranked (``k_reciprocal_rerank``) with the query x query
    and gallery x gallery distances of the same features (or ``q_q_distmat`` / ``g_g_distmat``
    when no ``features`` are given).

    Args:
        distmat: ``(num_query, num_gallery)`` distances, or None with ``features``.
        rerank: True (Zhong et al.'s defaults), a ``ReRanking``, or None / False: none.
        query_expansion: True (fast-reid's defaults), a ``QueryExpansion``, or None / False: none.
        features: ``(query_features, gallery_features)``.
        metric: the distance of ``features``, ``"cosine"`` or ``"euclidean"``.
        q_q_distmat: query x query distances, for ``rerank`` without ``features``.
        g_g_distmat: gallery x gallery distances, for ``rerank`` without ``features``.

    Returns:
        The ``(num_query, num_gallery)`` distances (float64 when re-ranked).

    Raises:
        ValueError: what a step needs is missing or given twice.

    Examples:
        >>> import numpy as np
        >>> from metabin_layers.reid.evaluation import rerank_distances
        >>> from metabin_layers.reid.rerank import ReRanking
        >>> qf, gf = np.eye(3)[:1], np.eye(3)
        >>> int(rerank_distances(None, rerank=ReRanking(k1=2, k2=1), features=(qf, gf)).argmin())
        0
    """
    rr = _settings(rerank, ReRanking, "rerank")
    qe = _settings(query_expansion, QueryExpansion, "query_expansion")
    if qe is not None:
        if features is None:
            raise ValueError("query_expansion: needs features=(query_features, gallery_features)")
        if distmat is not None:
            raise ValueError("distmat: pass None with query_expansion (the distances are those of the expanded features)")
        features = average_query_expansion(*features, k=qe.k, alpha=qe.alpha, times=qe.times)
    if features is not None:
        qf, gf = features
        if distmat is None:
            distmat = compute_distance(qf, gf, metric)
    elif distmat is None:
        raise ValueError("distmat: None needs features=(query_features, gallery_features)")
    if rr is None:
        return np.asarray(distmat)
    if features is not None:
        if q_q_distmat is not None or g_g_distmat is not None:
            raise ValueError("q_q_distmat / g_g_distmat: give them or features, not both")
        q_q_distmat, g_g_distmat = compute_distance(qf, qf, metric), compute_distance(gf, gf, metric)
    elif q_q_distmat is None or g_g_distmat is None:
        raise ValueError("rerank: needs q_q_distmat and g_g_distmat (or features) besides distmat")
    return k_reciprocal_rerank(distmat, q_q_distmat, g_g_distmat, rr.k1, rr.k2, rr.lambda_value)


def ranking_label(rerank: RerankArg = None, query_expansion: QueryExpansionArg = None) -> str:
    """How the ranking was made, for reports: ``"plain distances"`` or the post-processing steps.

    Args:
        rerank: the re-ranking (True, a ``ReRanking``, or None / False).
        query_expansion: the query expansion (True, a ``QueryExpansion``, or None / False).

    Returns:
        The label, query expansion first (it runs first).

    Examples:
        >>> from metabin_layers.reid.evaluation import ranking_label
        >>> ranking_label(), ranking_label(rerank=True, query_expansion=True)
        ('plain distances', 'average query expansion (k=5, alpha=3) + k-reciprocal re-ranking (k1=20, k2=6, lambda=0.3)')
    """
    steps = [
        s.describe()
        for s in (_settings(query_expansion, QueryExpansion, "query_expansion"), _settings(rerank, ReRanking, "rerank"))
        if s is not None
    ]
    return " + ".join(steps) if steps else "plain distances"


def _model_output_to_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if isinstance(out, Mapping):
        for key in ("features", "feat", "bn_features", "embeddings"):
            if key in out:
                return out[key]
    raise TypeError(
        "model output must be a tensor, a tuple/list whose first element is the feature tensor, "
        f"or a dict with a 'features' key; got {type(out).__name__}"
    )


@torch.no_grad()
def extract_features(
    model: torch.nn.Module,
    loader: Iterable[Mapping[str, Any]],
    device: torch.device | str | None = None,
    flip: bool = False,
) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Run ``model`` in eval mode over ``loader`` and collect features, identities and cameras.

    Args:
        model: maps an image batch ``(N, C, H, W)`` to features ``(N, D)`` (or ``(N, D, 1, 1)``;
            a tuple's first element or a dict's ``"features"`` entry is also accepted).
        loader: yields dicts with keys ``img`` (float tensor batch), ``pid`` and ``camid``.
        device: where to run; default: the device of the model's first parameter (else CPU).
        flip: average the features of each image and its horizontal mirror.

    Returns:
        ``(features, pids, camids)``: a float32 CPU tensor ``(N, D)`` and two int64 numpy arrays.
        The model's train/eval mode is restored afterwards.

    Examples:
        >>> import torch
        >>> from metabin_layers.reid.evaluation import extract_features
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4))
        >>> batch = {"img": torch.randn(2, 3, 2, 2), "pid": torch.tensor([0, 1]),
        ...          "camid": torch.tensor([0, 0])}
        >>> f, p, c = extract_features(net, [batch], "cpu", flip=True)
        >>> tuple(f.shape), p.tolist()
        ((2, 4), [0, 1])
    """
    if device is None:
        param = next(iter(model.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    was_training = model.training
    model.eval()
    feats: list[torch.Tensor] = []
    pids: list[np.ndarray] = []
    camids: list[np.ndarray] = []
    try:
        for batch in loader:
            img = batch["img"].to(device, non_blocking=True)
            f = _model_output_to_tensor(model(img)).float()
            if flip:
                f = (f + _model_output_to_tensor(model(torch.flip(img, dims=[3]))).float()) / 2
            feats.append(f.reshape(f.shape[0], -1).cpu())
            pids.append(np.asarray(torch.as_tensor(batch["pid"]).cpu(), dtype=np.int64).reshape(-1))
            camids.append(np.asarray(torch.as_tensor(batch["camid"]).cpu(), dtype=np.int64).reshape(-1))
    finally:
        model.train(was_training)
    if not feats:
        raise ValueError("loader: yielded no batch")
    return torch.cat(feats), np.concatenate(pids), np.concatenate(camids)


def compute_distance(
    query: torch.Tensor | np.ndarray,
    gallery: torch.Tensor | np.ndarray,
    metric: str = "cosine",
) -> np.ndarray:
    """Query x gallery distance matrix as a float32 numpy array.

    ``metric="cosine"``: ``1 - cos`` between L2-normalised features (range [0, 2]);
    ``metric="euclidean"``: plain (not squared) euclidean distance.

    Args:
        query: query features ``(N, D)``, a tensor or an array.
        gallery: gallery features ``(M, D)``.
        metric: ``"cosine"`` or ``"euclidean"``.

    Returns:
        The ``(N, M)`` float32 distance matrix, smaller = more similar.

    Raises:
        ValueError: ``query`` or ``gallery`` not 2-D, feature dimensions that differ, or an
            unknown ``metric``.

    Examples:
        >>> import torch
        >>> from metabin_layers.reid.evaluation import compute_distance
        >>> q = torch.tensor([[1.0, 0.0]]); g = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
        >>> compute_distance(q, g).tolist(), [round(float(v), 3) for v in compute_distance(q, g, "euclidean")[0]]
        ([[0.0, 1.0]], [1.0, 1.414])
    """
    q = torch.as_tensor(query).float()
    g = torch.as_tensor(gallery).float()
    if q.ndim != 2:
        raise ValueError(f"query: expected a 2-D (N, D) array, got shape {tuple(q.shape)}")
    if g.ndim != 2:
        raise ValueError(f"gallery: expected a 2-D (M, D) array, got shape {tuple(g.shape)}")
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"gallery: feature dimension {g.shape[1]} differs from the query's {q.shape[1]}")
    if metric == "cosine":
        dist = 1.0 - F.normalize(q, dim=1) @ F.normalize(g, dim=1).t()
    elif metric == "euclidean":
        dist = torch.cdist(q.double(), g.double()).float()
    else:
        raise ValueError(f"metric: expected 'cosine' or 'euclidean', got {metric!r}")
    return dist.cpu().numpy()


def evaluate(
    model: torch.nn.Module,
    query_loader: Iterable[Mapping[str, Any]],
    gallery_loader: Iterable[Mapping[str, Any]],
    device: torch.device | str | None = None,
    metric: str = "cosine",
    flip: bool = False,
    max_rank: int = 50,
    invalid_as_zero: bool = False,
    return_distances: bool = False,
    rerank: RerankArg = None,
    query_expansion: QueryExpansionArg = None,
) -> dict[str, Any]:
    """Extract features, compute distances and return the Re-ID metrics.

    Args:
        model: maps an image batch to features (see ``extract_features``).
        query_loader: yields the query batches, dicts with keys ``img``, ``pid`` and ``camid``.
        gallery_loader: yields the gallery batches, the same kind of dicts.
        device: where to run; default: the device of the model's first parameter (else CPU).
        metric: the distance, ``"cosine"`` or ``"euclidean"`` (see ``compute_distance``).
        flip: average the features of each image and its horizontal mirror.
        max_rank: length of the CMC curve (at most the gallery size).
        invalid_as_zero: average AP / INP over all queries, queries without a true match in the
            gallery counting 0 (see ``evaluate_rank``).
        return_distances: also return ``"distmat"`` (the query x gallery distances) and the
            ``"q_pids"``, ``"g_pids"``, ``"q_camids"``, ``"g_camids"`` arrays (for pictures of
            the ranked results, ``metabin_layers.reid.visualize``); re-ranked when ``rerank``.
        rerank: k-reciprocal re-ranking (True: Zhong et al.'s defaults, or a ``ReRanking``).
        query_expansion: average query expansion (True: fast-reid's defaults, or a ``QueryExpansion``).

    Returns:
        ``{"rank1", "rank5", "rank10", "mAP", "mINP"}`` as floats in [0, 1] (multiply by 100 for
        the usual percentages) and ``"cmc"``, the CMC curve as a numpy array of length
        ``min(max_rank, gallery size)``. When the gallery is smaller than k, rank-k is the last
        CMC value. ``"ranking"`` says how the ranking was made (``ranking_label``).

    Examples:
        >>> import torch
        >>> from metabin_layers.reid.evaluation import evaluate
        >>> net = torch.nn.Flatten()
        >>> q = [{"img": torch.eye(2).reshape(2, 1, 1, 2), "pid": [0, 1], "camid": [0, 0]}]
        >>> g = [{"img": torch.eye(2).reshape(2, 1, 1, 2), "pid": [0, 1], "camid": [1, 1]}]
        >>> evaluate(net, q, g)["rank1"]
        1.0
    """
    qf, q_pids, q_camids = extract_features(model, query_loader, device, flip=flip)
    gf, g_pids, g_camids = extract_features(model, gallery_loader, device, flip=flip)
    if rerank or query_expansion:
        distmat = rerank_distances(None, rerank=rerank, query_expansion=query_expansion, features=(qf, gf), metric=metric)
    else:
        distmat = compute_distance(qf, gf, metric=metric)
    cmc, mAP, mINP = evaluate_rank(
        distmat,
        q_pids,
        g_pids,
        q_camids,
        g_camids,
        max_rank=min(max_rank, distmat.shape[1]),
        invalid_as_zero=invalid_as_zero,
    )
    result: dict[str, Any] = {f"rank{k}": float(cmc[min(k, len(cmc)) - 1]) for k in (1, 5, 10)}
    result.update(mAP=float(mAP), mINP=float(mINP), cmc=cmc, ranking=ranking_label(rerank, query_expansion))
    if return_distances:
        result.update(distmat=distmat, q_pids=q_pids, g_pids=g_pids, q_camids=q_camids, g_camids=g_camids)
    return result
