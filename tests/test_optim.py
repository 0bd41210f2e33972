"""MetaBINOptimizer against a hand-written Algorithm 1, and its contracts."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metabin_layers import MetaBINOptimizer, base_parameters, convert_bn_to_metabin, metabin_modules, rho_parameters
from metabin_layers.episode import CyclicInnerLR


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3)
        self.n1 = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 5, 3)
        self.n2 = nn.BatchNorm2d(5)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        h = F.relu(self.n1(self.c1(x)))
        h = F.relu(self.n2(self.c2(h)))
        return self.fc(h.mean((2, 3)))


def make_model(rho=0.6):
    torch.manual_seed(0)
    model = convert_bn_to_metabin(Tiny(), rho_init=rho).double()
    with torch.no_grad():
        for m in metabin_modules(model):
            m.weight.uniform_(0.5, 1.5)
            m.in_weight.uniform_(0.5, 1.5)
            m.in_bias.uniform_(-0.5, 0.5)
            m.rho.uniform_(0.2, 0.9)
    return model


def data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 3, 6, 6, generator=g, dtype=torch.float64)
    y = torch.arange(12) % 3
    return x, y


def ref_forward(p, rhos, x, stats=None):
    """Hand-written functional model: BN branch with F.batch_norm, IN branch with F.instance_norm."""

    def bin_(h, i):
        bn = F.batch_norm(h, *(stats[i] if stats else (None, None)), p[f"n{i}.weight"], p[f"n{i}.bias"], True, 0.1, 1e-5)
        inorm = F.instance_norm(h, weight=p[f"n{i}.in_weight"], bias=p[f"n{i}.in_bias"], eps=1e-5)
        r = rhos[i - 1].view(1, -1, 1, 1)
        return r * bn + (1 - r) * inorm

    h = F.relu(bin_(F.conv2d(x, p["c1.weight"], p["c1.bias"]), 1))
    h = F.relu(bin_(F.conv2d(h, p["c2.weight"], p["c2.bias"]), 2))
    return F.linear(h.mean((2, 3)), p["fc.weight"], p["fc.bias"])


def mtr_loss(logits):
    return logits.logsumexp(1).mean() + logits.var()


def mte_loss(logits, y):
    return F.cross_entropy(logits, y)


def straight_through_clamp(t):
    return t + (t.clamp(0, 1) - t).detach()


@pytest.mark.parametrize("second_order", [False, True])
def test_one_iteration_matches_hand_written_algorithm_1(second_order):
    lr, rho_lr, beta = 0.1, 0.5, 0.7
    model = make_model()
    x, y = data()
    tr, te = slice(0, 6), slice(6, 12)

    # --- reference, written from the paper with torch's own BN / IN ---
    p = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters() if not k.endswith("rho")}
    rhos = [v.detach().clone() for k, v in model.named_parameters() if k.endswith("rho")]
    stats = {i: (model.get_buffer(f"n{i}.running_mean").clone(), model.get_buffer(f"n{i}.running_var").clone()) for i in (1, 2)}
    loss = F.cross_entropy(ref_forward(p, rhos, x, stats), y)  # base update, running stats updated
    grads = torch.autograd.grad(loss, list(p.values()))
    p = {k: (v - lr * g).detach() for (k, v), g in zip(p.items(), grads)}
    stats_after_base = copy.deepcopy(stats)
    rho_v = [r.clone().requires_grad_() for r in rhos]
    l_mtr = mtr_loss(ref_forward(p, rho_v, x[tr]))
    g = torch.autograd.grad(l_mtr, rho_v, create_graph=second_order)
    if second_order:
        fast = [straight_through_clamp(r - beta * gi) for r, gi in zip(rho_v, g)]
        l_mte = mte_loss(ref_forward(p, fast, x[te]), y[te])
        outer = torch.autograd.grad(l_mte, rho_v)
    else:
        fast = [(r - beta * gi).clamp(0, 1).detach().requires_grad_() for r, gi in zip(rho_v, g)]
        l_mte = mte_loss(ref_forward(p, fast, x[te]), y[te])
        outer = torch.autograd.grad(l_mte, fast)  # d rho'/d rho = I in first order
    rho_new = [(r - rho_lr * o).clamp(0, 1) for r, o in zip(rhos, outer)]

    # --- the library ---
    base = torch.optim.SGD(base_parameters(model), lr=lr)
    opt = MetaBINOptimizer(model, base, rho_lr=rho_lr, inner_lr=beta, second_order=second_order)
    opt.zero_grad()
    opt.backward(F.cross_entropy(model(x), y))
    opt.step()
    out = opt.meta_step(lambda: mtr_loss(model(x[tr])), lambda: mte_loss(model(x[te]), y[te]))

    for k, v in model.named_parameters():
        want = rho_new[0 if k.startswith("n1") else 1] if k.endswith("rho") else p[k]
        torch.testing.assert_close(v.detach(), want, rtol=1e-9, atol=1e-10, msg=k)
    for i in (1, 2):  # running stats come from the base step only ("hold" in the meta steps)
        torch.testing.assert_close(model.get_buffer(f"n{i}.running_mean"), stats_after_base[i][0])
        torch.testing.assert_close(model.get_buffer(f"n{i}.running_var"), stats_after_base[i][1])
        assert int(model.get_buffer(f"n{i}.num_batches_tracked")) == 1
    assert out["inner_lr"] == beta and not out["skipped"]
    torch.testing.assert_close(out["meta_train_loss"], l_mtr.detach())
    torch.testing.assert_close(out["meta_test_loss"], l_mte.detach())
    assert any(not torch.equal(a, b) for a, b in zip(rho_new, rhos)), "the episode must move rho"


def test_second_order_differs_from_first_order():
    x, y = data()
    results = []
    for second_order in (False, True):
        model = make_model()
        opt = MetaBINOptimizer(
            model, torch.optim.SGD(base_parameters(model), lr=0.1), rho_lr=0.5, inner_lr=0.7, second_order=second_order
        )
        opt.meta_step(lambda: mtr_loss(model(x[:6])), lambda: mte_loss(model(x[6:]), y[6:]))
        results.append(torch.cat([r.detach() for r in rho_parameters(model)]))
        assert all(m.backend == "auto" for m in metabin_modules(model))
    assert not torch.allclose(results[0], results[1])


def test_meta_step_computes_no_weight_gradients_and_leaves_weights_alone():
    model = make_model()
    x, y = data()
    opt = MetaBINOptimizer(model, torch.optim.SGD(base_parameters(model), lr=0.1), inner_lr=0.1)
    before = {k: v.detach().clone() for k, v in model.named_parameters() if not k.endswith("rho")}
    opt.zero_grad()
    opt.meta_step(lambda: mtr_loss(model(x[:6])), lambda: mte_loss(model(x[6:]), y[6:]))
    for k, v in model.named_parameters():
        if not k.endswith("rho"):
            assert v.grad is None, f"{k} got a gradient in the meta step"
            assert torch.equal(v.detach(), before[k])
    assert all(not r.requires_grad for r in rho_parameters(model)), "rho is frozen outside meta_step"


def test_base_step_never_changes_rho_and_computes_no_rho_gradient():
    model = make_model()
    x, y = data()
    opt = MetaBINOptimizer(model, torch.optim.SGD(base_parameters(model), lr=1.0, momentum=0.9), inner_lr=0.1)
    rhos = [r.detach().clone() for r in rho_parameters(model)]
    for _ in range(3):
        opt.zero_grad()
        opt.backward(F.cross_entropy(model(x), y))
        opt.step()
    assert all(torch.equal(a, b.detach()) for a, b in zip(rhos, rho_parameters(model)))
    assert all(r.grad is None for r in rho_parameters(model))


def test_rho_stays_in_unit_interval_under_extreme_learning_rates():
    model = make_model()
    x, y = data()
    opt = MetaBINOptimizer(model, torch.optim.SGD(base_parameters(model), lr=0.1), rho_lr=1e6, inner_lr=1e6)
    seen_inside = False
    for sign in (1.0, -1.0, 1.0):
        opt.meta_step(lambda: sign * mtr_loss(model(x[:6])), lambda: sign * mte_loss(model(x[6:]), y[6:]))
        for m in metabin_modules(model):
            assert 0.0 <= float(m.rho.min()) and float(m.rho.max()) <= 1.0
        seen_inside = True
    assert seen_inside
    assert any(((r == 0) | (r == 1)).any() for r in rho_parameters(model)), "such steps must hit the bounds"


def test_layers_are_restored_when_a_closure_raises():
    model = make_model()
    metabin_modules(model)[1].stats_mode = "eval"
    x, y = data()
    opt = MetaBINOptimizer(model, torch.optim.SGD(base_parameters(model), lr=0.1), inner_lr=0.1, second_order=True)

    def boom():
        raise RuntimeError("closure failed")

    with pytest.raises(RuntimeError, match="closure failed"):
        opt.meta_step(lambda: mtr_loss(model(x[:6])), boom)
    modes = [m.stats_mode for m in metabin_modules(model)]
    assert modes == ["update", "eval"]
    assert all(m._rho_override is None and m.backend == "auto" for m in metabin_modules(model))
    assert all(not r.requires_grad for r in rho_parameters(model))


def test_grad_scaler_skips_non_finite_steps_in_both_phases():
    model = make_model()
    x, y = data()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    opt = MetaBINOptimizer(model, torch.optim.SGD(base_parameters(model), lr=0.1), rho_lr=0.5, inner_lr=0.1, grad_scaler=scaler)
    rhos = [r.detach().clone() for r in rho_parameters(model)]
    inf = torch.tensor(float("inf"), dtype=torch.float64)

    out = opt.meta_step(lambda: mtr_loss(model(x[:6])) * inf, lambda: mte_loss(model(x[6:]), y[6:]))
    assert out["skipped"] and scaler.get_scale() == 512.0
    out = opt.meta_step(lambda: mtr_loss(model(x[:6])), lambda: mte_loss(model(x[6:]), y[6:]) * inf)
    assert out["skipped"] and scaler.get_scale() == 256.0
    assert all(torch.equal(a, b.detach()) for a, b in zip(rhos, rho_parameters(model)))

    weights = [p.detach().clone() for p in base_parameters(model)]
    opt.zero_grad()
    opt.backward(F.cross_entropy(model(x), y) * inf)
    opt.step()
    assert scaler.get_scale() == 256.0  # the update waits for the meta step, or the next zero_grad / backward
    opt.zero_grad()
    assert scaler.get_scale() == 128.0
    assert all(torch.equal(a, b.detach()) for a, b in zip(weights, base_parameters(model)))

    out = opt.meta_step(lambda: mtr_loss(model(x[:6])), lambda: mte_loss(model(x[6:]), y[6:]))
    assert not out["skipped"]
    assert any(not torch.equal(a, b.detach()) for a, b in zip(rhos, rho_parameters(model)))


def test_scaled_meta_step_equals_unscaled_one():
    x, y = data()
    rhos = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**12)):
        model = make_model()
        opt = MetaBINOptimizer(
            model, torch.optim.SGD(base_parameters(model), lr=0.1), rho_lr=0.5, inner_lr=0.3, grad_scaler=scaler
        )
        opt.meta_step(lambda: mtr_loss(model(x[:6])), lambda: mte_loss(model(x[6:]), y[6:]))
        rhos.append(torch.cat([r.detach() for r in rho_parameters(model)]))
    torch.testing.assert_close(rhos[0], rhos[1], rtol=1e-12, atol=1e-12)


def run_iterations(model, opt, n, x, y, domains):
    for _ in range(n):
        opt.zero_grad()
        opt.backward(F.cross_entropy(model(x), y))
        opt.step()
        split = opt.split(domains)
        tr, te = split.train_mask, split.test_mask
        opt.meta_step(lambda: mtr_loss(model(x[tr])), lambda: mte_loss(model(x[te]), y[te]))


def test_state_dict_resume_continues_identically():
    x, y = data()
    domains = torch.arange(12) % 4

    def build(model):
        base = torch.optim.SGD(base_parameters(model), lr=0.05, momentum=0.9, weight_decay=5e-4)
        return MetaBINOptimizer(model, base, rho_lr=0.5, inner_lr=CyclicInnerLR(iters_per_epoch=2), seed=3)

    model = make_model()
    opt = build(model)
    run_iterations(model, opt, 2, x, y, domains)
    ckpt = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    run_iterations(model, opt, 3, x, y, domains)
    expected = model.state_dict()

    resumed = make_model()
    opt2 = build(resumed)
    resumed.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.inner_lr.num_steps == 2 and opt2.num_meta_steps == 2
    run_iterations(resumed, opt2, 3, x, y, domains)
    for k, v in resumed.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=0, atol=0, msg=k)


def test_lr_scheduler_scales_base_groups_only():
    model = make_model()
    base = torch.optim.SGD(base_parameters(model), lr=0.1)
    opt = MetaBINOptimizer(model, base, rho_lr=0.2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = data()
    opt.zero_grad()
    opt.backward(F.cross_entropy(model(x), y))
    opt.step()
    sched.step()
    assert base.param_groups[0]["lr"] == pytest.approx(0.05)
    assert opt.rho_optimizer.param_groups[0]["lr"] == pytest.approx(0.2)


def test_cyclic_inner_lr_is_relative_to_rho_lr():
    model = make_model()
    x, y = data()
    opt = MetaBINOptimizer(
        model, torch.optim.SGD(base_parameters(model), lr=0.1), rho_lr=0.1, inner_lr=CyclicInnerLR(iters_per_epoch=10)
    )
    out = opt.meta_step(lambda: mtr_loss(model(x[:6])), lambda: mte_loss(model(x[6:]), y[6:]))
    assert out["inner_lr"] == pytest.approx(0.1 * (0.001 + 0.099 / 25))


def test_constructor_and_closure_errors():
    model = make_model()
    with pytest.raises(ValueError, match="must not hold rho"):
        MetaBINOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="no MetaBIN layer"):
        MetaBINOptimizer(Tiny(), torch.optim.SGD(Tiny().parameters(), lr=0.1))
    with pytest.raises(TypeError, match="base_optimizer"):
        MetaBINOptimizer(model, None)
    with pytest.raises(ValueError, match="rho_optimizer must hold exactly"):
        MetaBINOptimizer(
            model, torch.optim.SGD(base_parameters(model), lr=0.1), rho_optimizer=torch.optim.SGD(rho_parameters(model)[:1], lr=1)
        )
    with pytest.raises(ValueError, match="inner_lr"):
        MetaBINOptimizer(model, torch.optim.SGD(base_parameters(model), lr=0.1), inner_lr=-1.0)
    opt = MetaBINOptimizer(model, torch.optim.SGD(base_parameters(model), lr=0.1), inner_lr=0.1)
    x, y = data()
    with pytest.raises(TypeError, match="meta_train_loss must return a scalar"):
        opt.meta_step(lambda: model(x), lambda: mte_loss(model(x), y))
    with pytest.raises(ValueError, match="does not depend on rho"):
        opt.meta_step(lambda: torch.tensor(1.0), lambda: mte_loss(model(x), y))


def _one_update_per_iteration(scale, tracker, found_inf, growth_interval):
    """GradScaler.update's rule, written out: back off on inf/NaN, grow after ``growth_interval`` clean updates."""
    if found_inf:
        return scale * 0.5, 0
    tracker += 1
    if tracker == growth_interval:
        return scale * 2.0, 0
    return scale, tracker


def test_grad_scaler_is_updated_once_per_iteration():
    model = make_model()
    x, y = data()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=2)
    opt = MetaBINOptimizer(model, torch.optim.SGD(base_parameters(model), lr=0.01), rho_lr=0.1, inner_lr=0.05, grad_scaler=scaler)
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    bad = {4: "base", 7: "meta"}
    expected, got = [], []
    scale, tracker = 1024.0, 0
    for it in range(10):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        opt.backward(loss * inf if bad.get(it) == "base" else loss)
        opt.step()
        factor = inf if bad.get(it) == "meta" else 1.0
        opt.meta_step(lambda: mtr_loss(model(x[:6])), lambda: mte_loss(model(x[6:]), y[6:]) * factor)
        scale, tracker = _one_update_per_iteration(scale, tracker, it in bad, 2)
        expected.append(scale)
        got.append(scaler.get_scale())
    assert got == expected
    assert expected == [1024, 2048, 2048, 4096, 2048, 2048, 4096, 2048, 2048, 4096]

    # base steps alone (the warm-up before the first meta step): the next zero_grad() updates
    for _ in range(4):
        opt.zero_grad()
        opt.backward(F.cross_entropy(model(x), y))
        opt.step()
        scale, tracker = _one_update_per_iteration(scale, tracker, False, 2)
    opt.zero_grad()
    assert scaler.get_scale() == scale == 16384


def test_a_failed_meta_step_changes_nothing():
    model = make_model()
    x, y = data()
    opt = MetaBINOptimizer(
        model, torch.optim.SGD(base_parameters(model), lr=0.01), rho_lr=0.1, inner_lr=CyclicInnerLR(iters_per_epoch=3)
    )
    reference = CyclicInnerLR(iters_per_epoch=3)
    good = (lambda: mtr_loss(model(x[:6])), lambda: mte_loss(model(x[6:]), y[6:]))
    assert opt.meta_step(*good)["inner_lr"] == pytest.approx(0.1 * reference.step())
    rhos = [r.detach().clone() for r in rho_parameters(model)]
    grads = [r.grad.clone() for r in rho_parameters(model)]

    def boom():
        raise RuntimeError("data loader died")

    failing = [
        (boom, good[1], RuntimeError),
        (good[0], boom, RuntimeError),
    ]
    for mtr, mte, error in failing:
        with pytest.raises(error):
            opt.meta_step(mtr, mte)
        assert opt.num_meta_steps == 1 and opt.inner_lr.num_steps == 1
        assert all(torch.equal(a, b.detach()) for a, b in zip(rhos, rho_parameters(model)))
        assert all(torch.equal(a, b.grad) for a, b in zip(grads, rho_parameters(model)))
    # the schedule goes on as if the failed calls never happened
    assert opt.meta_step(*good)["inner_lr"] == pytest.approx(0.1 * reference.step())
    assert opt.num_meta_steps == 2


@pytest.mark.parametrize("rho_optimizer", ["default", "adam"])
def test_a_non_finite_meta_gradient_skips_the_step_on_the_device(rho_optimizer):
    # Without a grad scaler: the step is skipped, counted on the device, and the schedule goes on.
    model = make_model()
    x, y = data()
    custom = torch.optim.Adam(rho_parameters(model), lr=0.05) if rho_optimizer == "adam" else None
    opt = MetaBINOptimizer(
        model, torch.optim.SGD(base_parameters(model), lr=0.01), rho_lr=0.1, inner_lr=0.05, rho_optimizer=custom
    )
    if custom is None:
        assert opt.rho_optimizer.param_groups[0]["fused"]  # the skip needs no host read
    good = (lambda: mtr_loss(model(x[:6])), lambda: mte_loss(model(x[6:]), y[6:]))
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    rhos = [r.detach().clone() for r in rho_parameters(model)]
    for k, (mtr, mte) in enumerate([(lambda: good[0]() * nan, good[1]), (good[0], lambda: good[1]() * nan)], start=1):
        out = opt.meta_step(mtr, mte)
        assert out["skipped"].dtype == torch.bool and bool(out["skipped"])
        assert float(opt.skipped_meta_steps) == k and opt.num_meta_steps == k
        assert all(torch.equal(a, b.detach()) for a, b in zip(rhos, rho_parameters(model)))
    assert not opt.rho_optimizer.state or all(not s for s in opt.rho_optimizer.state.values())  # Adam took no step
    out = opt.meta_step(*good)
    assert not bool(out["skipped"]) and float(opt.skipped_meta_steps) == 2
    assert any(not torch.equal(a, b.detach()) for a, b in zip(rhos, rho_parameters(model)))
    restored = MetaBINOptimizer(model, torch.optim.SGD(base_parameters(model), lr=0.01), rho_lr=0.1, inner_lr=0.05)
    restored.load_state_dict(opt.state_dict())
    assert float(restored.skipped_meta_steps) == 2


class WithPlainNorms(nn.Module):
    """A converted trunk plus layers the converter never sees: a BN neck and other tracked norms."""

    def __init__(self):
        super().__init__()
        import timm.layers

        self.trunk = make_model()  # MetaBIN layers
        self.act_norm = timm.layers.BatchNormAct2d(3, act_layer=nn.ReLU).double()
        self.cumulative = nn.BatchNorm2d(3, momentum=None).double()  # cumulative averaging
        self.inorm = nn.InstanceNorm2d(3, track_running_stats=True).double()  # updates whenever it normalises
        self.frozen = nn.BatchNorm2d(3).double().eval()  # the user froze it: running statistics
        self.neck = nn.BatchNorm1d(3).double()

    def forward(self, x):
        h = self.frozen(self.inorm(self.cumulative(self.act_norm(x))))
        return self.neck(self.trunk(h))


def _norm_buffers(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def test_meta_step_holds_every_tracked_norm_layer_and_base_step_updates_them():
    pytest.importorskip("timm")  # timm's BatchNormAct2d is one of the held layers
    model = WithPlainNorms()
    with torch.no_grad():
        model.frozen.running_mean.uniform_(-1, 1)
        model.frozen.running_var.uniform_(0.5, 2)
    x, y = data()
    opt = MetaBINOptimizer(model, torch.optim.SGD(base_parameters(model), lr=0.1), inner_lr=0.1)
    model(x)  # one update so that the buffers are not at their initial values
    before = _norm_buffers(model)
    seen = {}

    def mtr():
        out = model(x[:6])
        # the neck normalised with the statistics of this batch: reference from its input
        feats = model.trunk(model.frozen(model.inorm(model.cumulative(model.act_norm(x[:6])))))
        ref = F.batch_norm(feats, None, None, model.neck.weight, model.neck.bias, True, 0.0, model.neck.eps)
        seen["neck_batch_stats"] = torch.allclose(out, ref, atol=1e-12)
        h = model.act_norm(x[:6])
        ref_frozen = F.batch_norm(
            h, model.frozen.running_mean, model.frozen.running_var, model.frozen.weight, model.frozen.bias, False, 0.0, 1e-5
        )
        seen["frozen_running_stats"] = torch.allclose(model.frozen(h), ref_frozen, atol=1e-12)
        return mtr_loss(out)

    opt.meta_step(mtr, lambda: mte_loss(model(x[6:]), y[6:]))
    after = _norm_buffers(model)
    assert seen == {"neck_batch_stats": True, "frozen_running_stats": True}
    assert before.keys() == after.keys() and len(before) == 3 * 7  # 2 MetaBIN + 5 plain layers
    for k in before:
        assert torch.equal(before[k], after[k]), f"{k} changed in meta_step"
    assert all(m.track_running_stats for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase))
    assert not model.frozen.training

    opt.zero_grad()
    mte_loss(model(1.5 * x + 0.3), y).backward()  # other data than the first update
    opt.step()
    updated = _norm_buffers(model)
    for k in before:
        if k.startswith("frozen.") or k == "inorm.num_batches_tracked":  # InstanceNorm never counts
            assert torch.equal(before[k], updated[k]), f"{k} must stay as it is"
        else:
            assert not torch.equal(before[k], updated[k]), f"{k} not updated by the base forward"


def test_plain_norms_are_restored_when_a_closure_raises():
    pytest.importorskip("timm")  # timm's BatchNormAct2d is one of the held layers
    model = WithPlainNorms()
    x, _ = data()
    opt = MetaBINOptimizer(model, torch.optim.SGD(base_parameters(model), lr=0.1), inner_lr=0.1)
    before = _norm_buffers(model)
    tracked_inside = []

    def boom():
        model(x[6:])  # buffers of the instance norm change here, and are restored
        tracked_inside.append(model.neck.track_running_stats)
        raise RuntimeError("closure failed")

    with pytest.raises(RuntimeError, match="closure failed"):
        opt.meta_step(lambda: mtr_loss(model(x[:6])), boom)
    assert tracked_inside == [False]
    assert all(m.track_running_stats for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase))
    after = _norm_buffers(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
