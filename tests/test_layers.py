"""MetaBIN layer state, modes, checkpoints and bad input."""

import copy

import pytest
import torch
from reference import reference_bin
from torch import nn

from metabin_layers import MetaBIN1d, MetaBIN2d, MetaBIN3d, MetaBINAct2d, convert_bn_to_metabin, stats_mode
from metabin_layers.layers import set_stats_mode


def test_tensor_names_and_initial_values():
    m = MetaBIN2d(4, rho_init=0.25)
    assert set(m.state_dict()) == {
        "weight",
        "bias",
        "running_mean",
        "running_var",
        "num_batches_tracked",
        "in_weight",
        "in_bias",
        "rho",
    }
    assert torch.equal(m.rho, torch.full((4,), 0.25))
    assert torch.equal(m.weight, torch.ones(4)) and torch.equal(m.in_bias, torch.zeros(4))
    assert [n for n, _ in m.named_parameters()] == ["weight", "bias", "in_weight", "in_bias", "rho"]


def _random_bn(cls, c, affine=True, track=True):
    bn = cls(c, affine=affine, track_running_stats=track)
    with torch.no_grad():
        if affine:
            bn.weight.uniform_(0.5, 2.0)
            bn.bias.uniform_(-1, 1)
        if track:
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.num_batches_tracked.fill_(7)
    return bn


@pytest.mark.parametrize("rho_init", [1.0, 0.3])
@pytest.mark.parametrize("in_affine_init", ["copy", "identity"])
@pytest.mark.parametrize("bn_cls, cls", [(nn.BatchNorm1d, MetaBIN1d), (nn.BatchNorm2d, MetaBIN2d), (nn.BatchNorm3d, MetaBIN3d)])
def test_batchnorm_state_dict_loads_strictly_filled_as_the_converter_fills(bn_cls, cls, rho_init, in_affine_init):
    bn = _random_bn(bn_cls, 3)
    m = cls(3, rho_init=rho_init, in_affine_init=in_affine_init)
    with torch.no_grad():  # state the load must overwrite
        for p in (m.rho, m.in_weight, m.in_bias):
            p.fill_(0.7)
    result = m.load_state_dict(bn.state_dict())  # strict
    assert result.missing_keys == [] and result.unexpected_keys == []
    # the hand-written expectation: the BN's tensors, rho = rho_init, IN affine copied or 1 / 0
    assert torch.equal(m.rho, torch.full((3,), rho_init))
    want_w = bn.weight if in_affine_init == "copy" else torch.ones(3)
    want_b = bn.bias if in_affine_init == "copy" else torch.zeros(3)
    assert torch.equal(m.in_weight, want_w) and torch.equal(m.in_bias, want_b)
    assert m.in_weight.data_ptr() != m.weight.data_ptr()  # a copy, trained separately
    # and the converter's layer holds the same tensors
    converted = convert_bn_to_metabin(copy.deepcopy(bn), rho_init=rho_init, in_affine_init=in_affine_init)
    assert converted.rho_init == rho_init and converted.in_affine_init == in_affine_init
    for k, v in converted.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k


@pytest.mark.parametrize("affine, track", [(False, True), (True, False), (False, False)])
def test_batchnorm_state_dict_without_affine_or_running_stats_loads_strictly(affine, track):
    bn = _random_bn(nn.BatchNorm2d, 4, affine=affine, track=track)
    m = MetaBIN2d(4, affine=affine, track_running_stats=track, rho_init=0.25)
    m.load_state_dict(bn.state_dict())
    assert torch.equal(m.rho, torch.full((4,), 0.25))
    if affine:
        assert torch.equal(m.in_weight, bn.weight) and torch.equal(m.weight, bn.weight)
    if track:
        assert torch.equal(m.running_var, bn.running_var)


def test_other_state_dict_mismatches_stay_strict():
    bn = _random_bn(nn.BatchNorm2d, 3)
    sd = bn.state_dict()
    del sd["running_var"]  # not a whole BatchNorm: nothing is filled
    with pytest.raises(RuntimeError, match="Missing key.*running_var") as err:
        MetaBIN2d(3).load_state_dict(sd)
    assert '"rho"' in str(err.value) and '"in_weight"' in str(err.value)
    partial = {**bn.state_dict(), "rho": torch.full((3,), 0.5)}  # a MetaBIN state missing its IN affine
    with pytest.raises(RuntimeError, match=r"Missing key.*in_weight"):
        MetaBIN2d(3).load_state_dict(partial)
    extra = {**bn.state_dict(), "extra": torch.zeros(3)}
    with pytest.raises(RuntimeError, match=r"Unexpected key.*extra"):
        MetaBIN2d(3).load_state_dict(extra)
    result = MetaBIN2d(3).load_state_dict(extra, strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == ["extra"]


def test_batchnorm_state_dict_before_version_2_loads_strictly():
    bn = _random_bn(nn.BatchNorm2d, 3)
    sd = bn.state_dict()
    del sd["num_batches_tracked"]  # written by torch < 0.4.1: no num_batches_tracked, version 1
    sd._metadata = {"": {"version": 1}}
    m = MetaBIN2d(3, rho_init=0.5)
    m.load_state_dict(sd)
    assert int(m.num_batches_tracked) == 0 and torch.equal(m.rho, torch.full((3,), 0.5))
    assert torch.equal(m.in_bias, bn.bias)


def test_in_affine_init_is_checked_and_kept_by_sync_conversion():
    with pytest.raises(ValueError, match="in_affine_init"):
        MetaBIN2d(3, in_affine_init="random")
    from metabin_layers import convert_sync_metabin

    model = convert_sync_metabin(nn.Sequential(MetaBIN2d(3, rho_init=0.5, in_affine_init="identity")))
    assert (model[0].rho_init, model[0].in_affine_init) == (0.5, "identity")
    bn = _random_bn(nn.BatchNorm2d, 3)
    model[0].load_state_dict(bn.state_dict())
    assert torch.equal(model[0].in_weight, torch.ones(3)) and torch.equal(model[0].rho, torch.full((3,), 0.5))


def test_authors_checkpoint_layout_is_remapped():
    # bismex/MetaBIN stores the branches as bat_n.* / ins_n.* and rho as "gate".
    sd = {
        "bat_n.weight": torch.full((2,), 2.0),
        "bat_n.bias": torch.full((2,), 3.0),
        "bat_n.running_mean": torch.full((2,), 0.5),
        "bat_n.running_var": torch.full((2,), 4.0),
        "bat_n.num_batches_tracked": torch.tensor(7),
        "ins_n.weight": torch.full((2,), 5.0),
        "ins_n.bias": torch.full((2,), 6.0),
        "gate": torch.full((2,), 0.3),
    }
    m = MetaBIN2d(2)
    m.load_state_dict(sd)
    assert m.weight.tolist() == [2, 2] and m.in_bias.tolist() == [6, 6] and int(m.num_batches_tracked) == 7
    torch.testing.assert_close(m.rho, torch.full((2,), 0.3))


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_loading_rho_outside_unit_interval_is_refused(bad):
    m = MetaBIN2d(3)
    sd = m.state_dict()
    sd["rho"] = torch.tensor([0.5, bad, 0.5])
    with pytest.raises(RuntimeError, match=r"rho must lie in \[0, 1\]"):
        m.load_state_dict(sd)
    assert torch.equal(m.rho, torch.ones(3))


@pytest.mark.parametrize("bad", [-0.01, 1.01, "one", None])
def test_rho_init_outside_unit_interval(bad):
    with pytest.raises(ValueError, match="rho_init"):
        MetaBIN2d(3, rho_init=bad)


@pytest.mark.parametrize(
    "cls,shape",
    [(MetaBIN2d, (2, 3, 4)), (MetaBIN2d, (2, 3, 4, 4, 4)), (MetaBIN1d, (2, 3, 4, 4)), (MetaBIN3d, (2, 3, 4, 4))],
)
def test_wrong_number_of_dimensions(cls, shape):
    with pytest.raises(ValueError, match=r"expected .*D input, got \dD input"):
        cls(3)(torch.randn(shape))


def test_channel_count_mismatch():
    with pytest.raises(ValueError, match=r"MetaBIN2d\(3\) got input with 5 channels"):
        MetaBIN2d(3)(torch.randn(2, 5, 4, 4))


def test_training_with_one_value_per_channel():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        MetaBIN2d(3)(torch.randn(1, 3, 1, 1))


def test_spatial_size_one_uses_the_batch_branch_only():
    # No instance statistics: the layer is its BatchNorm (tests/test_single_value_inputs.py has the rest).
    x = torch.randn(8, 3)
    with pytest.warns(UserWarning, match="single value per channel and sample"):
        y = MetaBIN1d(3, rho_init=0.5)(x)
    torch.testing.assert_close(y, (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-5))


def test_1d_layer_accepts_two_and_three_dims():
    m = MetaBIN1d(4, rho_init=0.5)
    x = torch.randn(6, 4, 5)
    torch.testing.assert_close(m(x).double(), reference_bin(x, m.rho, m.weight, m.bias, m.in_weight, m.in_bias))


def test_stats_mode_validation_and_context_manager_restores_on_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), MetaBIN2d(4), nn.ReLU(), MetaBIN2d(4, stats_mode="eval"))
    with pytest.raises(ValueError, match="stats_mode must be one of"):
        model[1].stats_mode = "frozen"
    with pytest.raises(ValueError, match="mode must be one of"):
        set_stats_mode(model, "bogus")
    with pytest.raises(RuntimeError, match="boom"):
        with stats_mode(model, "hold"):
            assert model[1].stats_mode == "hold" and model[3].stats_mode == "hold"
            raise RuntimeError("boom")
    assert model[1].stats_mode == "update" and model[3].stats_mode == "eval"
    set_stats_mode(model, "hold")
    assert model[1].stats_mode == model[3].stats_mode == "hold"


def test_stats_mode_eval_in_training_uses_running_stats():
    m = MetaBIN2d(3, rho_init=0.5, stats_mode="eval")
    with torch.no_grad():
        m.running_mean.fill_(0.3)
        m.running_var.fill_(2.0)
    x = torch.randn(4, 3, 5, 5)
    ref = reference_bin(x, m.rho, m.weight, m.bias, m.in_weight, m.in_bias, m.running_mean, m.running_var)
    torch.testing.assert_close(m(x).double(), ref, rtol=1e-5, atol=1e-5)


def test_rho_override_replaces_rho_and_carries_gradient():
    m = MetaBIN2d(3, rho_init=0.5)
    x = torch.randn(4, 3, 5, 5)
    fast = torch.full((3,), 0.2, requires_grad=True)
    with m.rho_override(fast):
        y = m(x)
    ref = reference_bin(x, fast.detach(), m.weight, m.bias, m.in_weight, m.in_bias)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert fast.grad is not None and m.rho.grad is None
    assert m._rho_override is None
    with pytest.raises(ValueError, match="shape"):
        with m.rho_override(torch.ones(4)):
            pass


def test_metabin_act_keeps_activation_and_drop():
    m = MetaBINAct2d(3, act_layer=nn.ReLU, drop_layer=nn.Dropout(0.0), rho_init=0.5)
    x = torch.randn(4, 3, 5, 5)
    ref = reference_bin(x, m.rho, m.weight, m.bias, m.in_weight, m.in_bias).clamp_min(0)
    torch.testing.assert_close(m(x).double(), ref, rtol=1e-5, atol=1e-5)
    assert isinstance(m.act, nn.ReLU) and isinstance(m.drop, nn.Dropout)
    assert isinstance(MetaBINAct2d(3, apply_act=False).act, nn.Identity)


def test_num_features_validation():
    with pytest.raises(ValueError, match="num_features"):
        MetaBIN2d(0)


def test_backend_validation():
    with pytest.raises(ValueError, match="backend"):
        MetaBIN2d(3, backend="magic")


# -- MetaBINAct2d: timm's BatchNormAct2d signature and checkpoints ---------------------------


def test_metabin_act_takes_batchnorm_act2d_arguments_in_timm_order():
    timm_layers = pytest.importorskip("timm.layers")
    import inspect

    ours = list(inspect.signature(MetaBINAct2d.__init__).parameters.values())[1:]
    theirs = list(inspect.signature(timm_layers.BatchNormAct2d.__init__).parameters.values())[1:]
    assert [p.name for p in ours[: len(theirs)]] == [p.name for p in theirs]
    assert [p.default for p in ours[: len(theirs)]] == [p.default for p in theirs]
    # MetaBIN's own arguments come after, keyword-only
    assert [(p.name, p.kind) for p in ours[len(theirs) :]] == [
        (name, inspect.Parameter.KEYWORD_ONLY) for name in ("rho_init", "stats_mode", "backend", "in_affine_init")
    ]


def test_metabin_act_passes_act_kwargs_and_inplace():
    m = MetaBINAct2d(3, act_layer=nn.LeakyReLU, act_kwargs={"negative_slope": 0.25}, inplace=False)
    assert isinstance(m.act, nn.LeakyReLU) and m.act.negative_slope == 0.25 and m.act.inplace is False
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    m = m.double()
    ref = nn.functional.leaky_relu(reference_bin(x, m.rho, m.weight, m.bias, m.in_weight, m.in_bias), 0.25)
    torch.testing.assert_close(m(x), ref)
    # an activation without an inplace argument is built without it
    assert isinstance(MetaBINAct2d(3, act_layer=nn.GELU, act_kwargs={"approximate": "tanh"}).act, nn.GELU)
    assert MetaBINAct2d(3, act_layer=nn.GELU, act_kwargs={"approximate": "tanh"}).act.approximate == "tanh"


def test_metabin_act_resolves_timm_activation_names():
    pytest.importorskip("timm")
    assert isinstance(MetaBINAct2d(3, act_layer="silu").act, nn.SiLU)
    assert isinstance(MetaBINAct2d(3, act_layer="relu", apply_act=False).act, nn.Identity)


@pytest.mark.parametrize("act", [nn.Tanh, nn.Sigmoid, nn.GELU, nn.ReLU])
def test_metabin_act_builds_activations_with_and_without_an_inplace_option(act):
    """Tanh and Sigmoid inherit nn.Module's ``(*args, **kwargs)``: they get no ``inplace``."""
    layer = MetaBINAct2d(3, act_layer=act).double()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    assert type(layer.act) is act
    torch.testing.assert_close(layer(x), act()(nn.BatchNorm2d(3).double()(x)), rtol=1e-12, atol=1e-12)


def test_metabin_act_keeps_a_type_error_raised_inside_a_constructor():
    class BrokenAct(nn.Module):
        def __init__(self, inplace: bool = False):
            super().__init__()
            raise TypeError("bad activation config")

    class BrokenDrop(nn.Module):
        def __init__(self):
            super().__init__()
            raise TypeError("bad drop config")

    with pytest.raises(TypeError, match="bad activation config"):
        MetaBINAct2d(3, act_layer=BrokenAct)
    with pytest.raises(TypeError, match="bad drop config"):
        MetaBINAct2d(3, drop_layer=BrokenDrop)
    with pytest.raises(TypeError, match="negative_slop"):  # a misspelt act_kwargs key is an error, not dropped
        MetaBINAct2d(3, act_layer=nn.LeakyReLU, act_kwargs={"negative_slop": 0.1})


def test_batchnorm_act2d_state_dict_loads_strictly():
    timm_layers = pytest.importorskip("timm.layers")
    bn = timm_layers.BatchNormAct2d(4, act_layer=nn.ReLU)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    bn.num_batches_tracked.fill_(7)
    m = MetaBINAct2d(4, act_layer=nn.ReLU)
    result = m.load_state_dict(bn.state_dict())
    assert result.unexpected_keys == [] and result.missing_keys == []
    assert torch.equal(m.rho, torch.ones(4)) and torch.equal(m.in_weight, bn.weight) and torch.equal(m.in_bias, bn.bias)
    # rho = 1 (the initial value): the loaded layer computes BatchNormAct2d, in eval and training mode
    x = torch.randn(3, 4, 5, 5)
    bn.eval(), m.eval()
    torch.testing.assert_close(m(x), bn(x), rtol=1e-5, atol=1e-5)
    assert int(m.num_batches_tracked) == 7
    # as the converter's layer, whose IN affine starts as the identity here
    ident = MetaBINAct2d(4, act_layer=nn.ReLU, rho_init=0.5, in_affine_init="identity")
    ident.load_state_dict(bn.state_dict())
    converted = convert_bn_to_metabin(copy.deepcopy(bn), rho_init=0.5, in_affine_init="identity")
    for k, v in converted.state_dict().items():
        assert torch.equal(ident.state_dict()[k], v), k
