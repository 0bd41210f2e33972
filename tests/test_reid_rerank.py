"""k-reciprocal re-ranking and average query expansion against slow float64 references.

Two independent references for the re-ranking: the definitions of Zhong et al. (CVPR 2017) with
Python sets and loops (Jaccard distance as ``1 - sum(min) / sum(max)``, the paper's form), and a
line-by-line transcription of the structure of the published algorithm (the authors' and
torchreid's ``re_ranking``: per-item loops, ``intersect1d``, inverted index, float32).
"""

import math

import numpy as np
import pytest
import torch

from metabin_layers.reid.evaluation import compute_distance, evaluate_rank
from metabin_layers.reid.rerank import QueryExpansion, ReRanking, average_query_expansion, k_reciprocal_rerank


def _features(q=6, g=15, dim=5, seed=0):
    """Queries and gallery items around a few identity centres, so neighbourhoods are not trivial."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(5, dim))
    qf = centres[rng.integers(0, 5, q)] + 0.6 * rng.normal(size=(q, dim))
    gf = centres[rng.integers(0, 5, g)] + 0.6 * rng.normal(size=(g, dim))
    return qf, gf


def _distances(qf, gf, metric):
    return tuple(
        compute_distance(torch.from_numpy(a), torch.from_numpy(b), metric).astype(np.float64)
        for a, b in ((qf, gf), (qf, qf), (gf, gf))
    )


def _euclid(a, b):
    return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))


# -- reference 1: the paper's definitions, plain Python ----------------------------------------------


def paper_rerank(q_g, q_q, g_g, k1, k2, lam, stats=None):
    q, g = len(q_g), len(q_g[0])
    n = q + g
    full = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            if i < q and j < q:
                full[i][j] = float(q_q[i][j])
            elif i < q:
                full[i][j] = float(q_g[i][j - q])
            elif j < q:
                full[i][j] = float(q_g[j][i - q])
            else:
                full[i][j] = float(g_g[i - q][j - q])
    sq = [[full[i][j] ** 2 for j in range(n)] for i in range(n)]
    col_max = [max(sq[r][c] for r in range(n)) for c in range(n)]
    d = [[sq[j][i] / col_max[i] for j in range(n)] for i in range(n)]  # scaled by column, transposed

    def nearest(i, k):  # N(i, k): the k + 1 nearest, i itself first (ties by index)
        return sorted(range(n), key=lambda j: (d[i][j], j))[: k + 1]

    def reciprocal(i, k):  # R(i, k) = {j in N(i, k) : i in N(j, k)}
        return {j for j in nearest(i, k) if i in nearest(j, k)}

    half = round(k1 / 2)  # Python rounds halves to even, as np.around
    V = []
    for i in range(n):
        base = reciprocal(i, k1)
        star = set(base)
        for c in base:
            rc = reciprocal(c, half)
            if len(rc & base) > 2 / 3 * len(rc):
                star |= rc
                if stats is not None:
                    stats["expanded"] += 1
            elif stats is not None:
                stats["refused"] += 1
        total = sum(math.exp(-d[i][j]) for j in star)
        V.append([math.exp(-d[i][j]) / total if j in star else 0.0 for j in range(n)])
    if k2 > 1:
        V = [[sum(V[t][j] for t in nearest(i, k2 - 1)) / k2 for j in range(n)] for i in range(n)]
    out = [[0.0] * g for _ in range(q)]
    for i in range(q):
        for j in range(q, n):
            jaccard = 1 - sum(min(a, b) for a, b in zip(V[i], V[j])) / sum(max(a, b) for a, b in zip(V[i], V[j]))
            out[i][j - q] = (1 - lam) * jaccard + lam * d[i][j]
    return np.array(out)


# -- reference 2: the published algorithm's structure ------------------------------------------------


def published_rerank(q_g, q_q, g_g, k1=20, k2=6, lambda_value=0.3, dtype=np.float32):
    query_num = q_g.shape[0]
    all_num = query_num + q_g.shape[1]
    original = np.concatenate([np.concatenate([q_q, q_g], axis=1), np.concatenate([q_g.T, g_g], axis=1)], axis=0)
    original = np.power(original, 2).astype(dtype)
    original = np.transpose(1.0 * original / np.max(original, axis=0))
    V = np.zeros_like(original).astype(dtype)
    initial_rank = np.argsort(original, kind="stable").astype(np.int32)
    for i in range(all_num):
        forward = initial_rank[i, : k1 + 1]
        backward = initial_rank[forward, : k1 + 1]
        k_reciprocal = forward[np.where(backward == i)[0]]
        expansion = k_reciprocal
        for candidate in k_reciprocal:
            c_forward = initial_rank[candidate, : int(np.around(k1 / 2.0)) + 1]
            c_backward = initial_rank[c_forward, : int(np.around(k1 / 2.0)) + 1]
            c_reciprocal = c_forward[np.where(c_backward == candidate)[0]]
            if len(np.intersect1d(c_reciprocal, k_reciprocal)) > 2.0 / 3 * len(c_reciprocal):
                expansion = np.append(expansion, c_reciprocal)
        expansion = np.unique(expansion)
        weight = np.exp(-original[i, expansion])
        V[i, expansion] = 1.0 * weight / np.sum(weight)
    original = original[:query_num]
    if k2 != 1:
        V_qe = np.zeros_like(V, dtype=dtype)
        for i in range(all_num):
            V_qe[i, :] = np.mean(V[initial_rank[i, :k2], :], axis=0)
        V = V_qe
    inverted = [np.where(V[:, i] != 0)[0] for i in range(all_num)]
    jaccard = np.zeros_like(original, dtype=dtype)
    for i in range(query_num):
        temp_min = np.zeros(shape=[1, all_num], dtype=dtype)
        nonzero = np.where(V[i, :] != 0)[0]
        for k in nonzero:
            temp_min[0, inverted[k]] = temp_min[0, inverted[k]] + np.minimum(V[i, k], V[inverted[k], k])
        jaccard[i] = 1 - temp_min / (2.0 - temp_min)
    final = jaccard * (1 - lambda_value) + original * lambda_value
    return final[:query_num, query_num:]


SETTINGS = [(20, 6, 0.3), (4, 2, 0.3), (5, 1, 0.0), (6, 3, 0.5), (3, 4, 1.0)]


@pytest.mark.parametrize("k1, k2, lam", SETTINGS)
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_rerank_equals_the_paper_definitions(k1, k2, lam, metric):
    qf, gf = _features()
    if metric == "euclidean":
        q_g, q_q, g_g = _euclid(qf, gf), _euclid(qf, qf), _euclid(gf, gf)
    else:
        q_g, q_q, g_g = _distances(qf, gf, "cosine")
    stats = {"expanded": 0, "refused": 0}
    want = paper_rerank(q_g, q_q, g_g, k1, k2, lam, stats)
    got = k_reciprocal_rerank(q_g, q_q, g_g, k1=k1, k2=k2, lambda_value=lam)
    assert got.shape == (6, 15) and got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    if k1 < 20:  # the expansion step is exercised both ways
        assert stats["expanded"] > 0 and stats["refused"] > 0


@pytest.mark.parametrize("k1, k2, lam", SETTINGS)
def test_rerank_equals_the_published_algorithm(k1, k2, lam):
    qf, gf = _features(q=9, g=25, seed=3)
    q_g, q_q, g_g = _distances(qf, gf, "cosine")
    got = k_reciprocal_rerank(q_g, q_q, g_g, k1, k2, lam)
    np.testing.assert_allclose(got, published_rerank(q_g, q_q, g_g, k1, k2, lam, dtype=np.float64), rtol=0, atol=1e-12)
    # and the float32 original within float32 rounding
    np.testing.assert_allclose(got, published_rerank(q_g, q_q, g_g, k1, k2, lam), rtol=0, atol=2e-6)


def test_rerank_defaults_are_zhong_et_al():
    assert (ReRanking().k1, ReRanking().k2, ReRanking().lambda_value) == (20, 6, 0.3)
    qf, gf = _features(q=5, g=30, seed=4)
    dists = _distances(qf, gf, "euclidean")
    np.testing.assert_array_equal(k_reciprocal_rerank(*dists), k_reciprocal_rerank(*dists, 20, 6, 0.3))
    # lambda 1: the scaled squared original distances themselves
    q_g, q_q, g_g = dists
    full = np.block([[q_q, q_g], [q_g.T, g_g]]) ** 2
    scaled = (full / full.max(axis=0)).T[:5, 5:]
    np.testing.assert_allclose(k_reciprocal_rerank(*dists, lambda_value=1.0), scaled, rtol=0, atol=1e-15)


def test_rerank_bad_input():
    qf, gf = _features()
    q_g, q_q, g_g = _distances(qf, gf, "cosine")
    with pytest.raises(ValueError, match="q_q_dist: expected shape"):
        k_reciprocal_rerank(q_g, g_g, g_g)
    with pytest.raises(ValueError, match="g_g_dist: expected shape"):
        k_reciprocal_rerank(q_g, q_q, q_q)
    bad = q_g.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="q_g_dist: contains NaN"):
        k_reciprocal_rerank(bad, q_q, g_g)
    for kwargs, match in (({"k1": 0}, "k1"), ({"k2": 1.5}, "k2"), ({"lambda_value": 1.2}, "lambda_value")):
        with pytest.raises(ValueError, match=match):
            k_reciprocal_rerank(q_g, q_q, g_g, **kwargs)
    with pytest.raises(ValueError, match="distance 0 from every item"):
        k_reciprocal_rerank(np.zeros((2, 3)), np.zeros((2, 2)), np.zeros((3, 3)))


# -- average query expansion ------------------------------------------------------------------------------


def reference_aqe(qf, gf, k, alpha, times):
    """fast-reid's aqe by loops, float64: each item becomes sum(s^alpha f) / k over its k most similar."""
    feats = [list(map(float, row)) for row in np.concatenate([qf, gf])]
    n = len(feats)
    for _ in range(times):
        unit = [[v / math.sqrt(sum(x * x for x in f)) for v in f] for f in feats]
        new = []
        for i in range(n):
            sims = [sum(a * b for a, b in zip(unit[i], unit[j])) for j in range(n)]
            top = sorted(range(n), key=lambda j: (-sims[j], j))[:k]
            new.append([sum(sims[j] ** alpha * feats[j][d] for j in top) / k for d in range(len(feats[i]))])
        feats = new
    out = np.array(feats)
    return out[: len(qf)], out[len(qf) :]


@pytest.mark.parametrize("k, alpha, times", [(5, 3.0, 1), (3, 1.0, 2), (1, 3.0, 1), (4, 0.0, 1)])
def test_query_expansion_equals_fast_reid_aqe(k, alpha, times):
    qf, gf = _features(q=4, g=9, dim=6, seed=2)
    qf32 = torch.from_numpy(qf).float()  # a float32 tensor and a float64 array: both taken as they are
    got_q, got_g = average_query_expansion(qf32, gf, k=k, alpha=alpha, times=times)
    want_q, want_g = reference_aqe(qf32.double().numpy(), gf, k, alpha, times)
    np.testing.assert_allclose(got_q.numpy(), want_q, rtol=0, atol=1e-12)
    np.testing.assert_allclose(got_g.numpy(), want_g, rtol=0, atol=1e-12)
    if k == 1:  # only the item itself, weight 1: unchanged
        np.testing.assert_allclose(got_g.numpy(), gf, rtol=0, atol=1e-12)
    assert QueryExpansion().k == 5 and QueryExpansion().alpha == 3.0  # fast-reid's TEST.AQE defaults


def test_query_expansion_bad_input():
    qf, gf = _features()
    with pytest.raises(ValueError, match="feature dimension"):
        average_query_expansion(qf, gf[:, :3])
    with pytest.raises(ValueError, match="query expansion k"):
        average_query_expansion(qf, gf, k=0)
    with pytest.raises(ValueError, match="NaN weights"):
        average_query_expansion(np.array([[1.0, 0.0]]), np.array([[-1.0, 0.0]]), k=2, alpha=0.5)


# -- evaluate_rank with re-ranking / query expansion ------------------------------------------------------


def test_evaluate_rank_reranks_and_expands_as_the_functions_do():
    qf, gf = _features(q=6, g=15, seed=5)
    rng = np.random.default_rng(0)
    q_pids, g_pids = rng.integers(0, 3, 6), rng.integers(0, 3, 15)
    q_cams, g_cams = np.zeros(6, int), np.ones(15, int)
    q_g, q_q, g_g = _distances(qf, gf, "cosine")
    plain = evaluate_rank(q_g, q_pids, g_pids, q_cams, g_cams, max_rank=10)
    reranked = k_reciprocal_rerank(q_g, q_q, g_g, 4, 2, 0.3)
    want = evaluate_rank(reranked, q_pids, g_pids, q_cams, g_cams, max_rank=10)
    got = evaluate_rank(
        q_g, q_pids, g_pids, q_cams, g_cams, max_rank=10, rerank=ReRanking(4, 2, 0.3), q_q_distmat=q_q, g_g_distmat=g_g
    )
    np.testing.assert_array_equal(got[0], want[0])
    assert got[1:] == want[1:] and got[1] != plain[1]
    # from features: the distances of the expanded features, then re-ranked
    eq, eg = average_query_expansion(qf, gf)
    e_dists = _distances(eq.numpy(), eg.numpy(), "cosine")
    want = evaluate_rank(k_reciprocal_rerank(*e_dists), q_pids, g_pids, q_cams, g_cams, max_rank=10)
    got = evaluate_rank(None, q_pids, g_pids, q_cams, g_cams, max_rank=10, rerank=True, query_expansion=True, features=(qf, gf))
    np.testing.assert_allclose(got[0], want[0])
    assert got[1:] == pytest.approx(want[1:], abs=1e-12)
    with pytest.raises(ValueError, match="q_q_distmat"):
        evaluate_rank(q_g, q_pids, g_pids, q_cams, g_cams, rerank=True)
    with pytest.raises(ValueError, match="features"):
        evaluate_rank(q_g, q_pids, g_pids, q_cams, g_cams, query_expansion=True)
    with pytest.raises(ValueError, match="distmat"):
        evaluate_rank(q_g, q_pids, g_pids, q_cams, g_cams, query_expansion=True, features=(qf, gf))
