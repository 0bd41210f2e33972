"""Tests for metabin_layers.reid.evaluation against slow, loop-based references."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from metabin_layers.reid import evaluation
from metabin_layers.reid.evaluation import compute_distance, evaluate, evaluate_rank, extract_features


def slow_reference(distmat, q_pids, g_pids, q_camids, g_camids, max_rank):
    """Plain-Python market1501 protocol (one loop per query, one per gallery item)."""
    all_cmc, all_ap, all_inp = [], [], []
    for i in range(distmat.shape[0]):
        order = sorted(range(distmat.shape[1]), key=lambda j: (distmat[i, j], j))
        ranked = []  # match flags of the kept gallery items, in rank order
        for j in order:
            if g_pids[j] == q_pids[i] and g_camids[j] == q_camids[i]:
                continue
            ranked.append(1 if g_pids[j] == q_pids[i] else 0)
        if sum(ranked) == 0:
            continue
        cmc = []
        seen = 0
        for k in range(max_rank):
            if k < len(ranked) and ranked[k]:
                seen = 1
            cmc.append(seen)
        all_cmc.append(cmc)
        hits, precisions, last = 0, [], 0
        for pos, m in enumerate(ranked, start=1):
            if m:
                hits += 1
                precisions.append(hits / pos)
                last = pos
        all_ap.append(sum(precisions) / hits)
        all_inp.append(hits / last)
    return np.mean(np.array(all_cmc, dtype=float), axis=0), float(np.mean(all_ap)), float(np.mean(all_inp)), len(all_ap)


def random_problem(rng, num_q, num_g, num_pids, num_cams):
    # a random permutation of distinct values: no ties
    distmat = rng.permutation(num_q * num_g).reshape(num_q, num_g).astype(np.float64) / (num_q * num_g)
    q_pids = rng.integers(0, num_pids, num_q)
    g_pids = rng.integers(0, num_pids, num_g)
    q_camids = rng.integers(0, num_cams, num_q)
    g_camids = rng.integers(0, num_cams, num_g)
    return distmat, q_pids, g_pids, q_camids, g_camids


@pytest.mark.parametrize("seed", range(6))
def test_matches_slow_reference_on_random_problems(seed):
    rng = np.random.default_rng(seed)
    num_q, num_g = int(rng.integers(5, 40)), int(rng.integers(20, 120))
    problem = random_problem(rng, num_q, num_g, num_pids=int(rng.integers(3, 15)), num_cams=int(rng.integers(2, 6)))
    max_rank = min(15, num_g)
    cmc, mAP, mINP = evaluate_rank(*problem, max_rank=max_rank)
    ref_cmc, ref_ap, ref_inp, _ = slow_reference(*problem, max_rank)
    assert cmc.shape == (max_rank,) and cmc.dtype == np.float64
    np.testing.assert_allclose(cmc, ref_cmc, rtol=0, atol=1e-12)
    assert mAP == pytest.approx(ref_ap, abs=1e-12)
    assert mINP == pytest.approx(ref_inp, abs=1e-12)
    assert 0.0 <= mINP <= mAP <= 1.0 + 1e-12  # INP <= AP holds per query
    assert np.all(np.diff(cmc) >= 0)


def test_chunked_processing_matches_unchunked(monkeypatch):
    rng = np.random.default_rng(11)
    problem = random_problem(rng, 37, 50, num_pids=8, num_cams=3)
    expected = evaluate_rank(*problem, max_rank=20)
    monkeypatch.setattr(evaluation, "_CHUNK_ELEMENTS", 120)  # 2 queries per chunk
    got = evaluate_rank(*problem, max_rank=20)
    np.testing.assert_array_equal(got[0], expected[0])
    assert got[1] == pytest.approx(expected[1], abs=1e-14)
    assert got[2] == pytest.approx(expected[2], abs=1e-14)


def test_hand_computed_single_query():
    # gallery sorted by distance: pid2/c1, pid1/c0 (same id+cam: removed), pid1/c1, pid3/c2, pid1/c2
    distmat = np.array([[0.1, 0.2, 0.3, 0.4, 0.5]])
    g_pids = np.array([2, 1, 1, 3, 1])
    g_camids = np.array([1, 0, 1, 2, 2])
    cmc, mAP, mINP = evaluate_rank(distmat, [1], g_pids, [0], g_camids, max_rank=4)
    # kept ranking: [no, yes, no, yes] -> first match at rank 2, AP = (1/2 + 2/4) / 2, INP = 2/4
    np.testing.assert_array_equal(cmc, [0.0, 1.0, 1.0, 1.0])
    assert mAP == pytest.approx(0.5)
    assert mINP == pytest.approx(0.5)


def test_hand_computed_two_queries_and_gallery_order_shuffled():
    # query 0 (pid 5, cam 0): ranking [5/c1, 7/c1, 5/c2] -> AP = (1 + 2/3)/2, INP = 2/3, rank-1 hit
    # query 1 (pid 7, cam 1): 7/c1 removed; ranking [5/c1, 5/c2, 7/c0] -> AP = 1/3, INP = 1/3
    g_pids = np.array([5, 7, 5, 7])
    g_camids = np.array([1, 1, 2, 0])
    distmat = np.array([[0.1, 0.2, 0.3, 0.9], [0.1, 0.05, 0.2, 0.3]])
    perm = np.array([2, 0, 3, 1])
    for d, gp, gc in ((distmat, g_pids, g_camids), (distmat[:, perm], g_pids[perm], g_camids[perm])):
        cmc, mAP, mINP = evaluate_rank(d, [5, 7], gp, [0, 1], gc, max_rank=3)
        np.testing.assert_allclose(cmc, [0.5, 0.5, 1.0])
        assert mAP == pytest.approx(((1 + 2 / 3) / 2 + 1 / 3) / 2)
        assert mINP == pytest.approx((2 / 3 + 1 / 3) / 2)


def test_invalid_queries_are_skipped():
    # query 1's only true match shares its camera -> invalid; query 2's pid is absent -> invalid
    distmat = np.array([[0.2, 0.1, 0.3], [0.1, 0.2, 0.3], [0.5, 0.6, 0.7]])
    q_pids, q_camids = np.array([1, 2, 9]), np.array([0, 0, 0])
    g_pids, g_camids = np.array([1, 2, 3]), np.array([1, 0, 1])
    cmc, mAP, mINP = evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=2)
    # only query 0 is valid: ranking [pid 2, pid 1, pid 3] -> match at rank 2
    np.testing.assert_array_equal(cmc, [0.0, 1.0])
    assert mAP == pytest.approx(0.5) and mINP == pytest.approx(0.5)
    # the authors' Cython averaging counts the two invalid queries as 0 (CMC unchanged)
    cmc0, mAP0, mINP0 = evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=2, invalid_as_zero=True)
    np.testing.assert_array_equal(cmc0, cmc)
    assert mAP0 == pytest.approx(0.5 / 3) and mINP0 == pytest.approx(0.5 / 3)


def test_invalid_queries_skipped_on_random_problem():
    rng = np.random.default_rng(3)
    problem = random_problem(rng, 30, 40, num_pids=25, num_cams=2)
    cmc, mAP, mINP = evaluate_rank(*problem, max_rank=10)
    ref_cmc, ref_ap, ref_inp, num_valid = slow_reference(*problem, 10)
    assert 0 < num_valid < 30  # the problem does contain invalid queries
    np.testing.assert_allclose(cmc, ref_cmc, atol=1e-12)
    assert mAP == pytest.approx(ref_ap) and mINP == pytest.approx(ref_inp)
    _, mAP0, _ = evaluate_rank(*problem, max_rank=10, invalid_as_zero=True)
    assert mAP0 == pytest.approx(ref_ap * num_valid / 30)


def test_no_valid_query_raises():
    with pytest.raises(ValueError, match="no valid query"):
        evaluate_rank(np.zeros((2, 2)), [1, 1], [1, 2], [0, 0], [0, 1], max_rank=1)


def test_max_rank_larger_than_gallery_warns_and_truncates():
    rng = np.random.default_rng(0)
    problem = random_problem(rng, 6, 7, num_pids=3, num_cams=3)
    with pytest.warns(RuntimeWarning, match="max_rank"):
        cmc, mAP, _ = evaluate_rank(*problem, max_rank=50)
    assert cmc.shape == (7,)
    ref_cmc, ref_ap, _, _ = slow_reference(*problem, 7)
    np.testing.assert_allclose(cmc, ref_cmc)
    assert cmc[-1] == 1.0  # every valid query has its match somewhere in the whole gallery
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        evaluate_rank(*problem, max_rank=7)


@pytest.mark.parametrize(
    "override, name",
    [
        ({"distmat": np.zeros(4)}, "distmat"),
        ({"distmat": np.zeros((2, 3, 1))}, "distmat"),
        ({"q_pids": np.zeros(3)}, "q_pids"),
        ({"g_pids": np.zeros(5)}, "g_pids"),
        ({"q_camids": np.zeros((2, 1))}, "q_camids"),
        ({"g_camids": np.zeros(2)}, "g_camids"),
        ({"max_rank": 0}, "max_rank"),
        ({"distmat": np.array([[0.0, np.nan, 1.0, 2.0]] * 2)}, "distmat"),
        ({"distmat": np.zeros((2, 0)), "g_pids": np.zeros(0), "g_camids": np.zeros(0)}, "distmat"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(override, name):
    args = dict(
        distmat=np.zeros((2, 4)),
        q_pids=np.zeros(2),
        g_pids=np.zeros(4),
        q_camids=np.zeros(2),
        g_camids=np.ones(4),
        max_rank=2,
    )
    args.update(override)
    with pytest.raises(ValueError, match=name):
        evaluate_rank(**args)


def test_accepts_torch_tensors():
    rng = np.random.default_rng(5)
    problem = random_problem(rng, 8, 12, num_pids=4, num_cams=3)
    expected = evaluate_rank(*problem, max_rank=5)
    got = evaluate_rank(*(torch.as_tensor(x) for x in problem), max_rank=5)
    np.testing.assert_allclose(got[0], expected[0])
    assert got[1] == pytest.approx(expected[1]) and got[2] == pytest.approx(expected[2])


def test_compute_distance_against_formulas():
    rng = np.random.default_rng(1)
    q, g = rng.normal(size=(5, 7)), rng.normal(size=(9, 7))
    cos = np.array([[1 - a @ b / np.linalg.norm(a) / np.linalg.norm(b) for b in g] for a in q])
    euc = np.array([[np.sqrt(((a - b) ** 2).sum()) for b in g] for a in q])
    np.testing.assert_allclose(compute_distance(torch.tensor(q), torch.tensor(g)), cos, atol=1e-5)
    np.testing.assert_allclose(compute_distance(q, g, "euclidean"), euc, atol=1e-4)
    with pytest.raises(ValueError, match="metric"):
        compute_distance(q, g, "manhattan")
    with pytest.raises(ValueError, match="gallery"):
        compute_distance(q, g[:, :3])
    with pytest.raises(ValueError, match="query"):
        compute_distance(q[0], g)


class _Asym(torch.nn.Module):
    """Features that change under a horizontal flip: the first and last pixel columns."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(2.0))

    def forward(self, x):
        assert not self.training
        return torch.cat([x[:, :, :, 0].flatten(1), x[:, :, :, -1].flatten(1)], dim=1) * self.scale


def _loader(imgs, pids, camids, bs=3):
    return [
        {"img": imgs[i : i + bs], "pid": torch.as_tensor(pids[i : i + bs]), "camid": torch.as_tensor(camids[i : i + bs])}
        for i in range(0, len(imgs), bs)
    ]


def test_extract_features_flip_averaging_and_mode_restored():
    torch.manual_seed(0)
    imgs = torch.randn(7, 3, 4, 5)
    pids, camids = np.arange(7) % 3, np.arange(7) % 2
    model = _Asym().train()
    feats, p, c = extract_features(model, _loader(imgs, pids, camids), "cpu")
    assert model.training
    direct = torch.cat([imgs[:, :, :, 0].flatten(1), imgs[:, :, :, -1].flatten(1)], 1) * 2
    torch.testing.assert_close(feats, direct)
    np.testing.assert_array_equal(p, pids)
    np.testing.assert_array_equal(c, camids)
    feats_f, _, _ = extract_features(model, _loader(imgs, pids, camids), "cpu", flip=True)
    flipped = torch.cat([imgs[:, :, :, -1].flatten(1), imgs[:, :, :, 0].flatten(1)], 1) * 2
    torch.testing.assert_close(feats_f, (direct + flipped) / 2)


def test_evaluate_end_to_end_matches_manual_pipeline():
    g = torch.Generator().manual_seed(0)
    num_ids = 6
    centres = torch.randn(num_ids, 3, 2, 2, generator=g)
    g_pids = np.repeat(np.arange(num_ids), 3)
    g_camids = np.tile(np.array([1, 2, 3]), num_ids)
    q_pids, q_camids = np.arange(num_ids), np.zeros(num_ids, dtype=int)
    g_imgs = centres[g_pids] + 0.8 * torch.randn(len(g_pids), 3, 2, 2, generator=g)
    q_imgs = centres[q_pids] + 0.8 * torch.randn(num_ids, 3, 2, 2, generator=g)
    model = torch.nn.Flatten()
    res = evaluate(model, _loader(q_imgs, q_pids, q_camids), _loader(g_imgs, g_pids, g_camids), max_rank=50)
    assert set(res) == {"rank1", "rank5", "rank10", "mAP", "mINP", "cmc", "ranking"}
    assert res["ranking"] == "plain distances"
    distmat = compute_distance(q_imgs.flatten(1), g_imgs.flatten(1))
    ref_cmc, ref_ap, ref_inp, _ = slow_reference(distmat, q_pids, g_pids, q_camids, g_camids, len(g_pids))
    np.testing.assert_allclose(res["cmc"], ref_cmc)
    assert res["rank1"] == pytest.approx(ref_cmc[0])
    assert res["rank5"] == pytest.approx(ref_cmc[4])
    assert res["rank10"] == pytest.approx(ref_cmc[9])
    assert res["mAP"] == pytest.approx(ref_ap) and res["mINP"] == pytest.approx(ref_inp)
    # identical query/gallery features of the right identity give perfect scores
    perfect = evaluate(model, _loader(centres, q_pids, q_camids), _loader(centres, q_pids, np.ones(num_ids, dtype=int)))
    assert perfect["rank1"] == perfect["mAP"] == perfect["mINP"] == 1.0
    assert perfect["cmc"].shape == (num_ids,)


def test_evaluate_with_query_expansion_and_rerank_matches_the_references():
    from test_reid_rerank import paper_rerank, reference_aqe

    from metabin_layers.reid.rerank import QueryExpansion, ReRanking

    g = torch.Generator().manual_seed(1)
    centres = torch.randn(4, 3, 2, 2, generator=g)
    g_pids = np.repeat(np.arange(4), 4)
    g_camids = np.tile(np.array([1, 2, 3, 4]), 4)
    q_pids, q_camids = np.arange(4).repeat(2), np.zeros(8, dtype=int)
    g_imgs = (centres[g_pids] + 1.2 * torch.randn(len(g_pids), 3, 2, 2, generator=g)).double()
    q_imgs = (centres[q_pids] + 1.2 * torch.randn(8, 3, 2, 2, generator=g)).double()
    model = torch.nn.Flatten()
    res = evaluate(
        model,
        _loader(q_imgs, q_pids, q_camids),
        _loader(g_imgs, g_pids, g_camids),
        metric="euclidean",
        rerank=ReRanking(k1=4, k2=2, lambda_value=0.3),
        query_expansion=QueryExpansion(k=3),
        return_distances=True,
    )
    assert res["ranking"] == "average query expansion (k=3, alpha=3) + k-reciprocal re-ranking (k1=4, k2=2, lambda=0.3)"
    # extract_features returns float32 features: the references start from the same values
    qf, gf = (t.flatten(1).float().double().numpy() for t in (q_imgs, g_imgs))
    eq, eg = reference_aqe(qf, gf, 3, 3.0, 1)
    euclid = lambda a, b: np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1))  # noqa: E731
    want = paper_rerank(euclid(eq, eg), euclid(eq, eq), euclid(eg, eg), 4, 2, 0.3)
    # compute_distance returns float32 distances: re-ranked from those, equal to float32 precision
    np.testing.assert_allclose(res["distmat"], want, rtol=0, atol=1e-5)
    ref_cmc, ref_ap, ref_inp, _ = slow_reference(res["distmat"], q_pids, g_pids, q_camids, g_camids, len(g_pids))
    np.testing.assert_allclose(res["cmc"], ref_cmc)
    assert res["mAP"] == pytest.approx(ref_ap) and res["mINP"] == pytest.approx(ref_inp)
    plain = evaluate(model, _loader(q_imgs, q_pids, q_camids), _loader(g_imgs, g_pids, g_camids), metric="euclidean")
    assert plain["mAP"] != res["mAP"]
