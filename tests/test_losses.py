"""Tests for metabin_layers.losses against slow, obvious float64 reference implementations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from metabin_layers.losses import (
    CrossEntropyLabelSmooth,
    InterDomainShuffleLoss,
    IntraDomainScatterLoss,
    TripletLoss,
    cross_entropy_label_smooth,
    inter_domain_shuffle_loss,
    intra_domain_scatter_loss,
    pairwise_euclidean,
    triplet_loss,
)

# --------------------------------------------------------------------------------------------
# slow references (float64, explicit loops and sets)
# --------------------------------------------------------------------------------------------


def ref_dist(a: list[float], b: list[float]) -> float:
    sq = sum(u * u for u in a) + sum(v * v for v in b) - 2 * sum(u * v for u, v in zip(a, b))
    return math.sqrt(max(sq, 1e-12))


def ref_normalize(x: list[list[float]]) -> list[list[float]]:
    out = []
    for row in x:
        n = math.sqrt(sum(v * v for v in row))
        out.append([v / (n + 1e-12) for v in row])
    return out


def ref_hard_triplet(x, pos_sets, neg_sets, margin):
    terms = []
    for i in range(len(x)):
        if not neg_sets[i]:
            continue
        d_ap = max(ref_dist(x[i], x[j]) for j in pos_sets[i])
        d_an = min(ref_dist(x[i], x[j]) for j in neg_sets[i])
        if margin == 0:
            terms.append(math.log1p(math.exp(d_ap - d_an)))
        else:
            terms.append(max(0.0, d_ap - d_an + margin))
    return sum(terms) / len(terms)


def ref_triplet(features, labels, margin, normalize=False):
    x = features.double().tolist()
    if normalize:
        x = ref_normalize(x)
    lab = labels.tolist()
    n = len(lab)
    pos = [{j for j in range(n) if lab[j] == lab[i]} | {i} for i in range(n)]
    neg = [{j for j in range(n) if lab[j] != lab[i]} for i in range(n)]
    return ref_hard_triplet(x, pos, neg, margin)


def ref_shuffle(features, labels, domains, margin):
    x = features.double().tolist()
    lab, dom = labels.tolist(), domains.tolist()
    n = len(lab)
    pos = [{i} | {j for j in range(n) if dom[j] != dom[i]} for i in range(n)]
    neg = [{j for j in range(n) if dom[j] == dom[i] and lab[j] != lab[i]} for i in range(n)]
    return ref_hard_triplet(x, pos, neg, margin)


def ref_scatter(features, domains, normalize=True):
    x = features.double().tolist()
    if normalize:
        x = ref_normalize(x)
    dom = domains.tolist()
    per_domain = []
    for d in sorted(set(dom)):
        members = [x[i] for i in range(len(x)) if dom[i] == d]
        c = [sum(col) / len(members) for col in zip(*members)]
        nc = math.sqrt(sum(v * v for v in c))
        sims = []
        for m in members:
            nm = math.sqrt(sum(v * v for v in m))
            sims.append(sum(u * v for u, v in zip(c, m)) / (nc * nm))
        per_domain.append(sum(sims) / len(sims))
    return sum(per_domain) / len(per_domain)


def ref_ce_smooth(logits, targets, eps):
    total = 0.0
    z = logits.double().tolist()
    for row, t in zip(z, targets.tolist()):
        k = len(row)
        mx = max(row)
        lse = mx + math.log(sum(math.exp(v - mx) for v in row))
        for c in range(k):
            q = (1 - eps) if c == t else eps / (k - 1)
            total -= q * (row[c] - lse)
    return total / len(z)


def make_batch(seed=0, n_ids=4, per_id=3, n_domains=3, dim=8, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_ids).repeat_interleave(per_id)
    # identities belong to one domain each (as in Re-ID), plus a mix: domain = id % n_domains
    domains = labels % n_domains
    feats = torch.randn(labels.numel(), dim, generator=g, dtype=dtype)
    perm = torch.randperm(labels.numel(), generator=g)
    return feats[perm], labels[perm], domains[perm]


# --------------------------------------------------------------------------------------------
# pairwise_euclidean
# --------------------------------------------------------------------------------------------


def test_pairwise_euclidean_matches_loops():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 4, generator=g, dtype=torch.float64)
    y = torch.randn(3, 4, generator=g, dtype=torch.float64)
    d = pairwise_euclidean(x, y)
    assert d.shape == (5, 3)
    for i in range(5):
        for j in range(3):
            assert d[i, j].item() == pytest.approx(ref_dist(x[i].tolist(), y[j].tolist()), rel=1e-12)
    dxx = pairwise_euclidean(x)
    assert torch.allclose(dxx, torch.cdist(x, x), atol=1e-6)
    # the authors' clamp: self distance is sqrt(1e-12), not 0
    assert torch.allclose(dxx.diagonal(), torch.full((5,), 1e-6, dtype=torch.float64))


def test_pairwise_euclidean_half_inputs_compute_in_float32():
    x = torch.randn(6, 8).half()
    d = pairwise_euclidean(x)
    assert d.dtype == torch.float32
    assert torch.allclose(d, pairwise_euclidean(x.float()), atol=1e-5)


def test_pairwise_euclidean_bad_inputs():
    with pytest.raises(ValueError, match="x"):
        pairwise_euclidean(torch.randn(4))
    with pytest.raises(ValueError, match="y"):
        pairwise_euclidean(torch.randn(4, 3), torch.randn(2, 5))
    with pytest.raises(ValueError, match="y"):
        pairwise_euclidean(torch.randn(4, 3), torch.randn(2, 3, 1))


# --------------------------------------------------------------------------------------------
# triplet
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("margin", [0.3, 0.0, 5.0])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_triplet_matches_reference(margin, normalize, seed):
    f, y, _ = make_batch(seed, n_ids=5, per_id=3)
    got = triplet_loss(f, y, margin=margin, normalize=normalize)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(ref_triplet(f, y, margin, normalize), rel=1e-10, abs=1e-12)


def test_triplet_singleton_identity_uses_self_as_positive():
    g = torch.Generator().manual_seed(3)
    f = torch.randn(7, 5, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 9])  # identity 9 appears once
    got = triplet_loss(f, y, margin=0.3)
    assert got.item() == pytest.approx(ref_triplet(f, y, 0.3), rel=1e-10)
    # every identity a singleton: d_ap is the self distance sqrt(1e-12), so the soft margin
    # is softplus(1e-6 - nearest other) for every anchor
    y1 = torch.arange(7)
    nearest = torch.cdist(f, f).fill_diagonal_(float("inf")).min(1).values
    want = F.softplus(1e-6 - nearest).mean()
    assert triplet_loss(f, y1, margin=0.0).item() == pytest.approx(want.item(), rel=1e-9)


def test_triplet_hand_computed_line():
    # points 0, 2, 3, 4 on a line, labels 0 0 1 1
    # anchor 0: d_ap 2, d_an 3 | anchor 2: d_ap 2, d_an 1 | anchor 3: d_ap 1, d_an 1 | anchor 4: d_ap 1, d_an 2
    f = torch.tensor([[0.0], [2.0], [3.0], [4.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1])
    hinge = (0.0 + 1.3 + 0.3 + 0.0) / 4
    assert triplet_loss(f, y, margin=0.3).item() == pytest.approx(hinge, rel=1e-9)
    soft = sum(math.log1p(math.exp(v)) for v in (-1.0, 1.0, 0.0, -1.0)) / 4
    assert triplet_loss(f, y, margin=0.0).item() == pytest.approx(soft, rel=1e-9)


def test_triplet_soft_margin_is_softplus_not_hinge():
    # easy batch: anchors 0 and 6 have d_ap - d_an = 1 - 5, anchors 1 and 5 have 1 - 4
    f = torch.tensor([[0.0], [1.0], [5.0], [6.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1])
    assert triplet_loss(f, y, margin=0.3).item() == 0.0
    soft = triplet_loss(f, y, margin=0.0).item()
    assert soft == pytest.approx((math.log1p(math.exp(-4.0)) + math.log1p(math.exp(-3.0))) / 2, rel=1e-9)


def test_triplet_normalize_is_scale_invariant():
    f, y, _ = make_batch(4)
    scale = torch.rand(f.shape[0], 1, dtype=torch.float64) * 10 + 0.1
    a = triplet_loss(f, y, normalize=True)
    b = triplet_loss(f * scale, y, normalize=True)
    assert a.item() == pytest.approx(b.item(), rel=1e-9)
    assert triplet_loss(f * scale, y).item() != pytest.approx(triplet_loss(f, y).item(), rel=1e-3)


@pytest.mark.parametrize(
    "case",
    [
        "triplet: one identity",
        "triplet: empty",
        "shuffle: one identity per domain",
        "shuffle: empty",
        "scatter: empty",
        "ce: empty",
    ],
)
def test_degenerate_batches_give_a_zero_loss_connected_to_the_graph(case):
    n = 0 if case.endswith("empty") else 4
    features = torch.randn(n, 3, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1])[:n]
    if case == "triplet: one identity":
        loss = triplet_loss(features, torch.zeros(4, dtype=torch.long))
    elif case == "triplet: empty":
        loss = triplet_loss(features, labels)
    elif case == "shuffle: one identity per domain":
        loss = inter_domain_shuffle_loss(features, labels, labels)  # each domain holds a single identity
    elif case == "shuffle: empty":
        loss = inter_domain_shuffle_loss(features, labels, labels)
    elif case == "scatter: empty":
        loss = intra_domain_scatter_loss(features, labels)
    else:
        loss = cross_entropy_label_smooth(features, labels)
    assert loss.shape == () and loss.item() == 0.0 and loss.dtype == torch.float64
    assert loss.requires_grad and loss.grad_fn is not None  # a meta step can differentiate it
    (grad,) = torch.autograd.grad(loss, features)
    assert torch.equal(grad, torch.zeros_like(features))


def test_triplet_module_matches_function():
    f, y, _ = make_batch(5)
    m = TripletLoss(margin=0.5, normalize=True)
    assert "margin=0.5" in repr(m) and "normalize=True" in repr(m)
    assert torch.equal(m(f, y), triplet_loss(f, y, margin=0.5, normalize=True))


# --------------------------------------------------------------------------------------------
# inter-domain shuffle
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("margin", [0.0, 0.3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shuffle_matches_reference(margin, seed):
    g = torch.Generator().manual_seed(100 + seed)
    n = 18
    f = torch.randn(n, 6, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 5, (n,), generator=g)
    domains = torch.randint(0, 3, (n,), generator=g)
    got = inter_domain_shuffle_loss(f, labels, domains, margin=margin)
    assert got.item() == pytest.approx(ref_shuffle(f, labels, domains, margin), rel=1e-10)


def test_shuffle_hand_computed_line():
    # points 0, 1, 3, 6; labels all distinct; domains 0 0 1 1
    # anchor 0: farthest other-domain 6, nearest same-domain stranger 1 -> diff 5
    # anchor 1: 5, 1 -> 4 | anchor 3: 3, 3 -> 0 | anchor 6: 6, 3 -> 3
    f = torch.tensor([[0.0], [1.0], [3.0], [6.0]], dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3])
    d = torch.tensor([0, 0, 1, 1])
    soft = sum(math.log1p(math.exp(v)) for v in (5.0, 4.0, 0.0, 3.0)) / 4
    assert inter_domain_shuffle_loss(f, y, d).item() == pytest.approx(soft, rel=1e-9)
    assert inter_domain_shuffle_loss(f, y, d, margin=1.0).item() == pytest.approx(16.0 / 4, rel=1e-9)


def test_shuffle_same_domain_same_identity_is_neither_positive_nor_negative():
    # point 10 has label 0 and domain 0, like point 0: for anchor 0 it is neither positive
    # (would give d_ap 10) nor negative. Anchor 10: positives {self, 3, 6} -> 7, negative {1} -> 9;
    # it is an other-domain positive for anchor 3 (d_ap 7) and a far negative for anchor 1.
    f = torch.tensor([[0.0], [1.0], [3.0], [6.0], [10.0]], dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 0])
    d = torch.tensor([0, 0, 1, 1, 0])
    # anchor 0: 6 - 1 = 5; anchor 1: 5 - 1 = 4; anchor 3: 7 - 3 = 4; anchor 6: 6 - 3 = 3; anchor 10: 7 - 9 = -2
    want = sum(math.log1p(math.exp(v)) for v in (5.0, 4.0, 4.0, 3.0, -2.0)) / 5
    assert inter_domain_shuffle_loss(f, y, d).item() == pytest.approx(want, rel=1e-9)


def test_shuffle_single_domain_has_only_self_as_positive():
    # one domain: the positive set is the anchor alone (self distance sqrt(1e-12))
    f = torch.tensor([[0.0], [1.0], [3.0]], dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    d = torch.zeros(3, dtype=torch.long)
    want = sum(math.log1p(math.exp(1e-6 - v)) for v in (1.0, 1.0, 2.0)) / 3
    assert inter_domain_shuffle_loss(f, y, d).item() == pytest.approx(want, rel=1e-9)


def test_shuffle_anchor_without_negative_is_left_out():
    # domain 1 holds one sample: it has no same-domain stranger and must not enter the mean
    f = torch.tensor([[0.0], [1.0], [3.0]], dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    d = torch.tensor([0, 0, 1])
    # anchor 0: d_ap 3, d_an 1 -> 2 ; anchor 1: d_ap 2, d_an 1 -> 1
    want = (math.log1p(math.exp(2.0)) + math.log1p(math.exp(1.0))) / 2
    assert inter_domain_shuffle_loss(f, y, d).item() == pytest.approx(want, rel=1e-9)


def test_shuffle_module_matches_function():
    f, y, d = make_batch(6)
    m = InterDomainShuffleLoss(margin=0.2)
    assert "margin=0.2" in repr(m)
    assert torch.equal(m(f, y, d), inter_domain_shuffle_loss(f, y, d, margin=0.2))
    assert InterDomainShuffleLoss().margin == 0.0


# --------------------------------------------------------------------------------------------
# intra-domain scatter
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scatter_matches_reference(normalize, seed):
    g = torch.Generator().manual_seed(200 + seed)
    f = torch.randn(15, 6, generator=g, dtype=torch.float64) + 0.5
    domains = torch.tensor([7, 3, 3, 7, 11, 3, 11, 7, 7, 3, 11, 11, 7, 3, 42])  # unsorted, sparse, one singleton
    got = intra_domain_scatter_loss(f, domains, normalize=normalize)
    assert got.item() == pytest.approx(ref_scatter(f, domains, normalize), rel=1e-10)


def test_scatter_hand_computed():
    # domain 0: two orthogonal unit vectors -> centroid (0.5, 0.5), cos = 1/sqrt(2) each
    # domain 1: two parallel vectors of different lengths -> cos = 1
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [3.0, 3.0]], dtype=torch.float64)
    d = torch.tensor([0, 0, 1, 1])
    want = (1 / math.sqrt(2) + 1.0) / 2
    assert intra_domain_scatter_loss(f, d).item() == pytest.approx(want, rel=1e-9)
    # weighting is per domain, not per sample: a larger domain 1 does not change the value
    f3 = torch.cat([f, torch.tensor([[2.0, 2.0], [5.0, 5.0]], dtype=torch.float64)])
    d3 = torch.tensor([0, 0, 1, 1, 1, 1])
    assert intra_domain_scatter_loss(f3, d3).item() == pytest.approx(want, rel=1e-9)


def test_scatter_equals_centroid_norm_when_normalised():
    # with unit features, mean_i cos(c, x_i) = |c|: the loss is the mean centroid length
    f, _, d = make_batch(7, n_ids=6, per_id=4, n_domains=3)
    xn = f / f.norm(dim=1, keepdim=True)
    want = torch.stack([xn[d == k].mean(0).norm() for k in d.unique()]).mean()
    assert intra_domain_scatter_loss(f, d).item() == pytest.approx(want.item(), rel=1e-9)


def test_scatter_module_matches_function():
    f, _, d = make_batch(8)
    m = IntraDomainScatterLoss(normalize=False)
    assert "normalize=False" in repr(m)
    assert torch.equal(m(f, d), intra_domain_scatter_loss(f, d, normalize=False))
    assert IntraDomainScatterLoss().normalize is True


# --------------------------------------------------------------------------------------------
# label-smoothed cross-entropy
# --------------------------------------------------------------------------------------------


def test_ce_eps_zero_equals_cross_entropy():
    g = torch.Generator().manual_seed(9)
    z = torch.randn(6, 5, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 4, 2, 2, 1, 3])
    assert torch.allclose(cross_entropy_label_smooth(z, t, epsilon=0.0), F.cross_entropy(z, t))


@pytest.mark.parametrize("eps", [0.1, 0.5, 0.9])
def test_ce_matches_reference(eps):
    g = torch.Generator().manual_seed(10)
    z = torch.randn(7, 4, generator=g, dtype=torch.float64) * 3
    t = torch.randint(0, 4, (7,), generator=g)
    got = cross_entropy_label_smooth(z, t, epsilon=eps)
    assert got.item() == pytest.approx(ref_ce_smooth(z, t, eps), rel=1e-10)


def test_ce_uses_eps_over_k_minus_one():
    g = torch.Generator().manual_seed(11)
    z = torch.randn(3, 6, generator=g, dtype=torch.float64)
    t = torch.tensor([5, 0, 2])
    eps, k = 0.1, 6
    q = torch.full((3, k), eps / (k - 1), dtype=torch.float64)
    q[torch.arange(3), t] = 1 - eps
    assert torch.allclose(q.sum(1), torch.ones(3, dtype=torch.float64))
    want = -(q * z.log_softmax(1)).sum(1).mean()
    got = cross_entropy_label_smooth(z, t, epsilon=eps)
    assert torch.allclose(got, want)
    # ... which differs from torch's eps/K rule
    assert not torch.allclose(got, F.cross_entropy(z, t, label_smoothing=eps))


def test_ce_half_logits_give_float32_loss():
    z = torch.randn(4, 10).to(torch.bfloat16)
    t = torch.tensor([1, 2, 3, 4])
    got = cross_entropy_label_smooth(z, t)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref_ce_smooth(z.float(), t, 0.1), rel=1e-5)


def test_ce_module_matches_function():
    z = torch.randn(4, 10, dtype=torch.float64)
    t = torch.tensor([1, 2, 3, 4])
    m = CrossEntropyLabelSmooth(epsilon=0.2)
    assert "epsilon=0.2" in repr(m)
    assert torch.equal(m(z, t), cross_entropy_label_smooth(z, t, epsilon=0.2))
    assert CrossEntropyLabelSmooth().epsilon == 0.1


# --------------------------------------------------------------------------------------------
# gradients (first and second order, float64)
# --------------------------------------------------------------------------------------------


def _grad_batch():
    # small and with distinct distances, so the hard-mined indices do not flip under the
    # finite-difference perturbation
    g = torch.Generator().manual_seed(12)
    f = torch.randn(8, 3, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    domains = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])
    return f, labels, domains


@pytest.mark.parametrize(
    "fn",
    [
        lambda f, y, d: triplet_loss(f, y, margin=0.3),
        lambda f, y, d: triplet_loss(f, y, margin=0.0),
        lambda f, y, d: triplet_loss(f, y, margin=5.0, normalize=True),
        lambda f, y, d: inter_domain_shuffle_loss(f, y, d),
        lambda f, y, d: inter_domain_shuffle_loss(f, y, d, margin=5.0),
        lambda f, y, d: intra_domain_scatter_loss(f, d),
        lambda f, y, d: intra_domain_scatter_loss(f, d, normalize=False),
        lambda f, y, d: pairwise_euclidean(f),
    ],
    ids=["tri-hinge", "tri-soft", "tri-norm", "shuf-soft", "shuf-hinge", "sct", "sct-raw", "dist"],
)
def test_gradcheck_features(fn):
    f, y, d = _grad_batch()
    out = fn(f, y, d)
    g = torch.autograd.grad(out.sum(), f)[0]
    assert g.abs().sum() > 0  # the check below must not pass on a constant
    assert torch.autograd.gradcheck(lambda x: fn(x, y, d), (f,))
    assert torch.autograd.gradgradcheck(lambda x: fn(x, y, d), (f,))


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_gradcheck_ce(eps):
    g = torch.Generator().manual_seed(13)
    z = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 1, 3, 2, 0])
    assert torch.autograd.gradcheck(lambda x: cross_entropy_label_smooth(x, t, eps), (z,))
    assert torch.autograd.gradgradcheck(lambda x: cross_entropy_label_smooth(x, t, eps), (z,))


def test_create_graph_second_order_through_losses():
    # the meta step differentiates a gradient: d/dw of |d L / d f|^2 must exist and be finite
    f0, y, d = _grad_batch()
    w = torch.ones(3, dtype=torch.float64, requires_grad=True)
    f = f0.detach() * w
    total = triplet_loss(f, y) + inter_domain_shuffle_loss(f, y, d) + intra_domain_scatter_loss(f, d)
    (gf,) = torch.autograd.grad(total, f, create_graph=True)
    (gw,) = torch.autograd.grad(gf.square().sum(), w)
    assert torch.isfinite(gw).all() and gw.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_features_compute_in_float32(dtype):
    f, y, d = make_batch(14, dtype=torch.float32)
    fh = f.to(dtype)
    for fn in (
        lambda x: triplet_loss(x, y),
        lambda x: inter_domain_shuffle_loss(x, y, d),
        lambda x: intra_domain_scatter_loss(x, d),
    ):
        out = fn(fh)
        assert out.dtype == torch.float32
        assert torch.allclose(out, fn(fh.float()), rtol=1e-5, atol=1e-6)
    fh.requires_grad_(True)
    (g,) = torch.autograd.grad(triplet_loss(fh, y), fh)
    assert g.dtype == dtype and torch.isfinite(g.float()).all()


def test_zero_feature_row_has_finite_gradient():
    f, y, d = _grad_batch()
    f = f.detach().clone()
    f[0] = 0
    f.requires_grad_(True)
    for out in (triplet_loss(f, y, normalize=True), intra_domain_scatter_loss(f, d)):
        (g,) = torch.autograd.grad(out, f)
        assert torch.isfinite(g).all()


# --------------------------------------------------------------------------------------------
# input validation
# --------------------------------------------------------------------------------------------

F2 = torch.randn(4, 3)
L4 = torch.tensor([0, 0, 1, 1])
D4 = torch.tensor([0, 1, 0, 1])


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: triplet_loss(torch.randn(4), L4), "features"),
        (lambda: triplet_loss(torch.randn(4, 3, 2), L4), "features"),
        (lambda: triplet_loss(torch.randint(0, 3, (4, 3)), L4), "features"),
        (lambda: triplet_loss(F2, L4[:3]), "labels"),
        (lambda: triplet_loss(F2, L4.view(2, 2)), "labels"),
        (lambda: triplet_loss(F2, L4, margin=-0.1), "margin"),
        (lambda: triplet_loss(F2, L4, margin=float("nan")), "margin"),
        (lambda: TripletLoss(margin=-1.0), "margin"),
        (lambda: inter_domain_shuffle_loss(torch.randn(4), L4, D4), "features"),
        (lambda: inter_domain_shuffle_loss(F2, L4[:2], D4), "labels"),
        (lambda: inter_domain_shuffle_loss(F2, L4, D4[:3]), "domains"),
        (lambda: inter_domain_shuffle_loss(F2, L4, D4.view(4, 1)), "domains"),
        (lambda: inter_domain_shuffle_loss(F2, L4, D4, margin=-0.5), "margin"),
        (lambda: InterDomainShuffleLoss(margin=-0.5), "margin"),
        (lambda: intra_domain_scatter_loss(torch.randn(2, 2, 2), D4), "features"),
        (lambda: intra_domain_scatter_loss(F2, D4[:3]), "domains"),
        (lambda: intra_domain_scatter_loss(F2, D4.view(2, 2)), "domains"),
        (lambda: cross_entropy_label_smooth(torch.randn(4), L4), "logits"),
        (lambda: cross_entropy_label_smooth(torch.randn(4, 3), L4[:3]), "targets"),
        (lambda: cross_entropy_label_smooth(torch.randn(4, 3), torch.tensor([0.0, 1.0, 2.0, 1.0])), "targets"),
        (lambda: cross_entropy_label_smooth(torch.randn(4, 3), L4, epsilon=1.0), "epsilon"),
        (lambda: cross_entropy_label_smooth(torch.randn(4, 3), L4, epsilon=-0.1), "epsilon"),
        (lambda: cross_entropy_label_smooth(torch.randn(4, 1), torch.zeros(4, dtype=torch.long)), "logits"),
        (lambda: CrossEntropyLabelSmooth(epsilon=1.5), "epsilon"),
        (lambda: pairwise_euclidean(F2, torch.randn(3, 4)), "y"),
    ],
)
def test_bad_inputs_raise_value_error_naming_the_argument(call, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        call()


@pytest.mark.parametrize("bad", [3, -1, -100])  # -100: nll_loss's default ignore_index must not hide it
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_ce_target_outside_the_classes_raises(bad, eps):
    # Checked on the device by nll_loss (no host sync): an IndexError naming the target.
    with pytest.raises(IndexError, match=f"Target {bad} is out of bounds"):
        cross_entropy_label_smooth(torch.randn(4, 3), torch.tensor([0, bad, 2, 1]), epsilon=eps)


def test_non_tensor_inputs_raise_type_error_naming_the_argument():
    with pytest.raises(TypeError, match="features"):
        triplet_loss([[0.0, 1.0]], L4)
    with pytest.raises(TypeError, match="domains"):
        intra_domain_scatter_loss(F2, [0, 1, 0, 1])
    with pytest.raises(TypeError, match="targets"):
        cross_entropy_label_smooth(F2, [0, 1, 2, 0])


def test_ce_single_class_without_smoothing_is_allowed():
    z = torch.randn(3, 1)
    t = torch.zeros(3, dtype=torch.long)
    assert torch.allclose(cross_entropy_label_smooth(z, t, epsilon=0.0), F.cross_entropy(z, t))
