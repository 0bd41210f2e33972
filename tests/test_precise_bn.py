"""update_bn_stats (precise BN) against the exact mean / variance over the same batches, in float64."""

import copy

import pytest
import torch
from torch import nn

from metabin_layers import MetaBIN2d, convert_bn_to_metabin, metabin_modules, update_bn_stats
from metabin_layers.precise_bn import running_stats_layers


def _bn_model():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4, momentum=0.3),
        nn.ReLU(),
        nn.Conv2d(4, 5, 3),
        nn.BatchNorm2d(5),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(1),
        nn.BatchNorm1d(5),  # (N, C) input: a neck
    ).double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 2)
                m.bias.uniform_(-1, 1)
                m.running_mean.uniform_(-1, 1)  # left by "training": precise BN replaces them
                m.running_var.uniform_(0.5, 2)
                m.num_batches_tracked.fill_(11)
    return model


def _metabin_model():
    model = convert_bn_to_metabin(_bn_model(), rho_init=0.5, exclude="8")  # the neck stays BatchNorm1d
    with torch.no_grad():
        for m in metabin_modules(model):
            m.rho.uniform_(0.2, 0.8)
            m.in_weight.uniform_(0.5, 2)
    return model


def _batches(n=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    # different scales per batch, so that the average of the variances is not one batch's
    return [torch.randn(6, 3, 7, 7, generator=g, dtype=torch.float64) * (1 + i) + i for i in range(n)]


def _reference_stats(model, batches):
    """Per layer, the mean over batches of the batch mean and of the unbiased batch variance of its input."""
    ref = copy.deepcopy(model).train()
    for m in metabin_modules(ref):
        m.stats_mode = "hold"  # train-mode outputs use batch statistics: the running ones do not matter
    layers = running_stats_layers(ref)
    inputs = {id(m): [] for m in layers}
    hooks = [m.register_forward_pre_hook(lambda mod, args: inputs[id(mod)].append(args[0].detach().clone())) for m in layers]
    with torch.no_grad():
        for x in batches:
            ref(x)
    for h in hooks:
        h.remove()
    out = []
    for m in layers:
        means, variances = [], []
        for x in inputs[id(m)]:
            values = x.transpose(0, 1).reshape(x.shape[1], -1)  # (C, N * spatial)
            n = values.shape[1]
            mu = values.sum(1) / n
            means.append(mu)
            variances.append(((values - mu[:, None]) ** 2).sum(1) / (n - 1))
        out.append((sum(means) / len(means), sum(variances) / len(variances), len(means)))
    return out


@pytest.mark.parametrize("make", [_bn_model, _metabin_model], ids=["batchnorm", "metabin"])
@pytest.mark.parametrize("training", [False, True])
def test_running_stats_are_the_exact_average_over_the_batches(make, training):
    model = make().train(training)
    if not training:
        for m in metabin_modules(model):
            m.stats_mode = "hold"  # restored after the update
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    momenta = [m.momentum for m in running_stats_layers(model)]
    batches = _batches()
    want = _reference_stats(model, batches[:4])
    assert update_bn_stats(model, batches, num_iters=4) == 4  # the fifth batch is not used
    layers = running_stats_layers(model)
    assert len(layers) == 3
    for m, (mean, var, count) in zip(layers, want):
        torch.testing.assert_close(m.running_mean, mean, rtol=0, atol=1e-12)
        torch.testing.assert_close(m.running_var, var, rtol=0, atol=1e-12)
        assert int(m.num_batches_tracked) == count == 4
    # nothing else changed
    assert [m.momentum for m in layers] == momenta == [0.3, 0.1, 0.1]
    assert model.training is training
    assert all(m.stats_mode == ("update" if training else "hold") for m in metabin_modules(model))
    for k, v in model.named_parameters():
        assert torch.equal(v, params[k]), k
        assert v.grad is None, k


def test_batches_as_tuples_or_dicts_and_all_of_them():
    batches = _batches(3)
    a, b, c = _metabin_model(), _metabin_model(), _metabin_model()
    assert update_bn_stats(a, batches) == 3
    assert update_bn_stats(b, [(x, torch.zeros(6)) for x in batches]) == 3
    assert update_bn_stats(c, ({"img": x, "pid": 0} for x in batches)) == 3  # a generator: read once
    for m in (b, c):
        for k, v in a.state_dict().items():
            assert torch.equal(m.state_dict()[k], v), k


def test_cumulative_average_matches_torch_momentum_none():
    # The same pass done by hand with torch's own momentum=None BatchNorm from fresh statistics.
    model = _bn_model()
    by_hand = copy.deepcopy(model)
    for m in running_stats_layers(by_hand):
        m.reset_running_stats()
        m.momentum = None
    by_hand.train()
    batches = _batches()
    with torch.no_grad():
        for x in batches:
            by_hand(x)
    update_bn_stats(model, batches)
    for k, v in by_hand.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=1e-13, msg=k)


def test_bad_input_is_refused_and_leaves_the_model_as_it_was():
    model = _metabin_model().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="fewer than num_iters=5"):
        update_bn_stats(model, _batches(2), num_iters=5)
    with pytest.raises(ValueError, match="no batch"):
        update_bn_stats(model, [])
    with pytest.raises(TypeError, match="'img'"):
        update_bn_stats(model, [{"image": _batches(1)[0]}])
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="num_iters"):
            update_bn_stats(model, _batches(1), num_iters=bad)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not model.training and [m.momentum for m in running_stats_layers(model)] == [0.3, 0.1, 0.1]
    with pytest.raises(ValueError, match="no BatchNorm or MetaBIN layer"):
        update_bn_stats(nn.Sequential(nn.Conv2d(3, 3, 1), MetaBIN2d(3, track_running_stats=False)), _batches(1))
