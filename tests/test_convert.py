"""convert_bn_to_metabin on real timm and torchvision models, and its options."""

import copy
import warnings

import pytest
import timm
import torch
import torchvision
from torch import nn

from metabin_layers import (
    MetaBIN1d,
    MetaBIN2d,
    MetaBIN3d,
    MetaBINAct2d,
    base_parameters,
    convert_bn_to_metabin,
    metabin_modules,
    rho_parameters,
)
from metabin_layers.distributed import SyncMetaBIN

TV_MODELS = {
    "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(num_classes=10, width_mult=0.35),
    "mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(num_classes=10),
    "efficientnet_b0": lambda: torchvision.models.efficientnet_b0(num_classes=10),
    "regnet_x_400mf": lambda: torchvision.models.regnet_x_400mf(num_classes=10),
    "shufflenet_v2_x0_5": lambda: torchvision.models.shufflenet_v2_x0_5(num_classes=10),
    "densenet121": lambda: torchvision.models.densenet121(num_classes=10),
}
TIMM_MODELS = [
    "resnet18",
    "efficientnet_b0",
    "mobilenetv2_050",
    "mobilenetv3_small_050",
    "regnetx_002",
    "densenet121",
    "cspresnet50",
]


def _norm_types(model):
    return {type(m).__name__ for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def _check_equivalence(original: nn.Module, size=(2, 3, 64, 64)):
    # float64 so that the comparison is tight (deep float32 nets amplify rounding differences)
    original = original.double()
    converted = convert_bn_to_metabin(copy.deepcopy(original))
    assert not _norm_types(converted), "every BatchNorm must be converted"
    assert len(metabin_modules(converted)) > 0
    x = torch.randn(size, dtype=torch.float64)
    for train in (True, False):
        original.train(train)
        converted.train(train)
        torch.manual_seed(1)  # same dropout / drop-path masks in both
        want = original(x)
        torch.manual_seed(1)
        got = converted(x)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    # Running statistics were updated identically by the train-mode forward.
    sd_o, sd_c = original.state_dict(), converted.state_dict()
    for k, v in sd_o.items():
        torch.testing.assert_close(sd_c[k], v, rtol=1e-9, atol=1e-9, msg=k)
    _check_strict_loading(original, x)


def _check_strict_loading(original: nn.Module, x: torch.Tensor):
    """The original's state dict loads strictly into a converted model holding other values, which
    then equals ``convert_bn_to_metabin(original)``: state and outputs (rho 0.5: both branches count)."""
    want_model = convert_bn_to_metabin(copy.deepcopy(original), rho_init=0.5).eval()
    other = copy.deepcopy(original)
    with torch.no_grad():  # every tensor different from the original's
        for t in [*other.parameters(), *other.buffers()]:
            t.add_(1 if t.dtype.is_floating_point else 3)
    converted = convert_bn_to_metabin(other, rho_init=0.5)
    with torch.no_grad():
        for m in metabin_modules(converted):
            m.rho.fill_(0.9)
            if m.in_weight is not None:
                m.in_weight.mul_(3)
    result = converted.load_state_dict(original.state_dict())  # strict
    assert result.missing_keys == [] and result.unexpected_keys == []
    want = want_model.state_dict()
    got = converted.state_dict()
    assert list(got) == list(want)
    for k, v in want.items():
        assert torch.equal(got[k], v), k
    converted.eval()
    torch.testing.assert_close(converted(x), want_model(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(TV_MODELS))
def test_torchvision_models_compute_the_same_after_conversion(name):
    _check_equivalence(TV_MODELS[name]())


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_timm_models_compute_the_same_after_conversion(name):
    model = timm.create_model(name, num_classes=10, pretrained=False)
    had_norm_act = "BatchNormAct2d" in _norm_types(model)
    _check_equivalence(model)
    if had_norm_act:
        converted = convert_bn_to_metabin(copy.deepcopy(model))
        assert any(isinstance(m, MetaBINAct2d) for m in converted.modules())


def test_parameters_and_buffers_are_shared_and_state_copied():
    bn = nn.BatchNorm2d(4, eps=1e-3, momentum=None).double()
    bn.weight.requires_grad_(False)
    bn.eval()
    model = nn.Sequential(nn.Conv2d(3, 4, 3).double(), bn)
    convert_bn_to_metabin(model)
    m = model[1]
    assert isinstance(m, MetaBIN2d)
    assert m.weight is bn.weight and m.bias is bn.bias
    assert m.running_mean is bn.running_mean and m.num_batches_tracked is bn.num_batches_tracked
    assert m.eps == 1e-3 and m.momentum is None and not m.training
    assert m.rho.dtype == torch.float64 and m.in_weight.dtype == torch.float64
    assert not m.in_weight.requires_grad and m.bias.requires_grad


def test_in_affine_initialisation_choices():
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1, 1)
    copied = convert_bn_to_metabin(copy.deepcopy(bn))
    assert torch.equal(copied.in_weight, bn.weight) and torch.equal(copied.in_bias, bn.bias)
    assert copied.in_weight is not copied.weight  # a copy, trained separately
    identity = convert_bn_to_metabin(copy.deepcopy(bn), in_affine_init="identity")
    assert torch.equal(identity.in_weight, torch.ones(3)) and torch.equal(identity.in_bias, torch.zeros(3))
    with pytest.raises(ValueError, match="in_affine_init"):
        convert_bn_to_metabin(copy.deepcopy(bn), in_affine_init="random")


def test_root_batchnorm_and_all_dims():
    assert isinstance(convert_bn_to_metabin(nn.BatchNorm1d(3)), MetaBIN1d)
    assert isinstance(convert_bn_to_metabin(nn.BatchNorm3d(3)), MetaBIN3d)
    assert isinstance(convert_bn_to_metabin(nn.SyncBatchNorm(3)), SyncMetaBIN)
    m = convert_bn_to_metabin(nn.BatchNorm2d(3), rho_init=0.5)
    assert torch.equal(m.rho, torch.full((3,), 0.5))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8))
        self.neck = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 4)


def test_include_and_exclude_by_pattern_and_predicate():
    net = convert_bn_to_metabin(Net(), exclude="neck")
    assert isinstance(net.neck, nn.BatchNorm1d) and len(metabin_modules(net)) == 2
    net = convert_bn_to_metabin(Net(), include="backbone.*")
    assert isinstance(net.neck, nn.BatchNorm1d) and len(metabin_modules(net)) == 2
    net = convert_bn_to_metabin(Net(), include=["backbone.3", "neck"])
    assert isinstance(net.backbone[1], nn.BatchNorm2d) and isinstance(net.backbone[3], MetaBIN2d)
    assert isinstance(net.neck, MetaBIN1d)
    net = convert_bn_to_metabin(Net(), exclude=lambda name, m: isinstance(m, nn.BatchNorm1d))
    assert isinstance(net.neck, nn.BatchNorm1d)
    with pytest.raises(TypeError, match="name patterns or callables"):
        convert_bn_to_metabin(Net(), exclude=[3])


def test_frozen_and_unknown_batchnorms_are_skipped():
    frozen = torchvision.ops.FrozenBatchNorm2d(4)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), frozen, nn.BatchNorm2d(4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert_bn_to_metabin(model)
    assert model[1] is frozen and isinstance(model[2], MetaBIN2d)

    class MyBN(nn.BatchNorm2d):
        pass

    with pytest.warns(UserWarning, match=r"0 \(MyBN\)"):
        model = convert_bn_to_metabin(nn.Sequential(MyBN(3), nn.BatchNorm2d(3)))
    assert type(model[0]) is MyBN


def test_model_without_batchnorm_warns_or_raises():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.LayerNorm(4), nn.InstanceNorm2d(4))
    before = copy.deepcopy(model.state_dict())
    with pytest.warns(UserWarning, match="no BatchNorm layer"):
        out = convert_bn_to_metabin(model)
    assert out is model and all(torch.equal(before[k], v) for k, v in out.state_dict().items())
    with pytest.raises(ValueError, match="no BatchNorm layer"):
        convert_bn_to_metabin(model, strict=True)


def test_bad_rho_init_in_converter():
    with pytest.raises(ValueError, match="rho_init"):
        convert_bn_to_metabin(Net(), rho_init=2.0)


def test_parameter_helpers_partition_the_parameters():
    net = convert_bn_to_metabin(Net(), exclude="neck")
    rhos = rho_parameters(net)
    base = base_parameters(net)
    assert len(rhos) == 2 and all(p.shape == (8,) for p in rhos)
    assert {id(p) for p in rhos}.isdisjoint(id(p) for p in base)
    assert len(rhos) + len(base) == len(list(net.parameters()))
    assert [type(m) for m in metabin_modules(net)] == [MetaBIN2d, MetaBIN2d]


@pytest.mark.parametrize("shape", [(6, 4), (6, 4, 5), (6, 4, 3, 3), (4, 4, 2, 3, 3)])
def test_sync_batchnorm_stays_synchronised_over_its_group_for_any_dims(shape):
    group = object()  # stands for a process group: kept by identity (no collective runs here)
    sync_bn = nn.SyncBatchNorm(4, momentum=0.3, process_group=group)
    with torch.no_grad():
        sync_bn.weight.uniform_(0.5, 1.5)
        sync_bn.bias.uniform_(-1, 1)
    reference = copy.deepcopy(sync_bn)
    layer = convert_bn_to_metabin(nn.Sequential(sync_bn))[0]
    assert isinstance(layer, SyncMetaBIN) and layer.process_group is group
    x = torch.randn(shape, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (N, C): one value per instance, the batch branch only (says a warning)
        y = layer(x)
    torch.testing.assert_close(y, reference(x), rtol=1e-5, atol=1e-5)  # rho = 1: SyncBatchNorm's output
    torch.testing.assert_close(layer.running_mean, reference.running_mean, rtol=0, atol=1e-7)


def test_timm_sync_batchnorm_act_stays_synchronised_with_its_act_and_drop():
    from timm.layers import BatchNormAct2d
    from timm.layers.norm_act import convert_sync_batchnorm

    group = object()
    model = convert_sync_batchnorm(nn.Sequential(nn.Conv2d(3, 8, 3), BatchNormAct2d(8, act_layer=nn.ReLU6)), group)
    act = model[1].act
    converted = convert_bn_to_metabin(model)[1]
    assert isinstance(converted, SyncMetaBIN) and converted.process_group is group and converted.act is act
    assert bool((converted(torch.randn(2, 8, 5, 5)) <= 6).all())


# -- a training step and a meta step on converted models -------------------------------------


def _tv(name, **kwargs):
    return lambda: getattr(torchvision.models, name)(num_classes=4, **kwargs)


def _timm(name, **kwargs):
    return lambda: timm.create_model(name, pretrained=False, num_classes=4, **kwargs)


# name -> (model factory, input side): the smallest input each model takes (inception_v3's auxiliary
# head needs 299 x 299). Many of their BatchNorm layers see a single value per channel and sample:
# squeeze-excite blocks (rexnet, regnety, mobilenetv3), stages past a 32 x 32 input's resolution,
# inception_v3's auxiliary head, LeViT's BatchNorm1d over (N, C) tokens.
TRAIN_MODELS = {
    "tv/resnet18": (_tv("resnet18"), 32),
    "tv/resnet50": (_tv("resnet50"), 32),
    "tv/mobilenet_v2": (_tv("mobilenet_v2", width_mult=0.35), 32),
    "tv/mobilenet_v3_small": (_tv("mobilenet_v3_small"), 32),
    "tv/mobilenet_v3_large": (_tv("mobilenet_v3_large"), 32),
    "tv/efficientnet_b0": (_tv("efficientnet_b0"), 32),
    "tv/regnet_x_400mf": (_tv("regnet_x_400mf"), 32),
    "tv/regnet_y_400mf": (_tv("regnet_y_400mf"), 32),
    "tv/shufflenet_v2_x0_5": (_tv("shufflenet_v2_x0_5"), 32),
    "tv/mnasnet0_5": (_tv("mnasnet0_5"), 32),
    "tv/densenet121": (_tv("densenet121"), 32),
    "tv/googlenet_aux": (_tv("googlenet", aux_logits=True, init_weights=True), 32),
    "tv/inception_v3_aux": (_tv("inception_v3", aux_logits=True, init_weights=True), 299),
    "timm/rexnet_100": (_timm("rexnet_100"), 32),
    "timm/levit_128s": (_timm("levit_128s", img_size=64), 64),
    "timm/efficientnet_b0": (_timm("efficientnet_b0"), 32),
    "timm/mobilenetv3_small_050": (_timm("mobilenetv3_small_050"), 32),
    "timm/mobilenetv4_conv_small": (_timm("mobilenetv4_conv_small"), 32),
    "timm/regnety_002": (_timm("regnety_002"), 32),
    "timm/cspresnet50": (_timm("cspresnet50"), 32),
    "timm/seresnext26d_32x4d": (_timm("seresnext26d_32x4d"), 32),
    "timm/ghostnet_050": (_timm("ghostnet_050"), 32),
    "timm/mixnet_s": (_timm("mixnet_s"), 32),
    "timm/lcnet_050": (_timm("lcnet_050"), 32),
    "timm/dla34": (_timm("dla34"), 32),
    "timm/gernet_s": (_timm("gernet_s"), 32),
    "timm/ese_vovnet19b_dw": (_timm("ese_vovnet19b_dw"), 32),
    "timm/repvit_m0_9": (_timm("repvit_m0_9"), 32),
    "timm/fastvit_t8": (_timm("fastvit_t8"), 32),
    "timm/efficientvit_b0": (_timm("efficientvit_b0"), 32),
    "timm/mobilevit_xxs": (_timm("mobilevit_xxs"), 64),
    "timm/inception_v3": (_timm("inception_v3"), 75),
}
# Models whose single-value layers this test is about (32 models: 36 s on 2 quiet cores).
SINGLE_VALUE_MODELS = {"timm/rexnet_100", "timm/levit_128s", "tv/inception_v3_aux"}


def _classification_loss(output, target):
    # Training-mode outputs of inception_v3 / googlenet with auxiliary heads are tuples of logits.
    logits = [t for t in output if t is not None] if isinstance(output, tuple) else [output]
    return sum(nn.functional.cross_entropy(t, target) for t in logits)


@pytest.fixture
def one_thread():
    # Small tensors: one intra-op thread is faster, and far faster on a busy 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", list(TRAIN_MODELS))
def test_converted_models_train_and_meta_step(name, one_thread):
    from metabin_layers import MetaBINOptimizer

    make, side = TRAIN_MODELS[name]
    torch.manual_seed(0)
    original = make().eval()
    model = convert_bn_to_metabin(copy.deepcopy(original)).eval()
    layers = metabin_modules(model)
    x, target = torch.randn(4, 3, side, side), torch.arange(4)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with torch.no_grad():  # rho = 1: the converted model computes what the original computes
            want = original(x[:2])
            torch.testing.assert_close(model(x[:2]), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
            for m in layers:
                m.rho.fill_(0.5)
        model.train()
        opt = MetaBINOptimizer(model, torch.optim.SGD(base_parameters(model), lr=0.01), rho_lr=0.5, inner_lr=0.1)
        opt.zero_grad()
        loss = _classification_loss(model(x), target)
        assert torch.isfinite(loss)
        opt.backward(loss)
        bn_grads = [m.weight.grad for m in layers if m.weight is not None]
        assert all(g is not None and bool(torch.isfinite(g).all()) for g in bn_grads), "every BN-branch weight gets a gradient"
        assert any(bool(g.abs().sum() > 0) for g in bn_grads)
        opt.step()
        before = [m.rho.detach().clone() for m in layers]
        out = opt.meta_step(
            meta_train_loss=lambda: _classification_loss(model(x[:2]), target[:2]),
            meta_test_loss=lambda: _classification_loss(model(x[2:]), target[2:]),
        )
    assert torch.isfinite(out["meta_train_loss"]) and torch.isfinite(out["meta_test_loss"])
    single = [m._single_value_warned for m in layers]
    changed = [not torch.equal(m.rho, b) for m, b in zip(layers, before)]
    assert any(changed), "the meta step moves rho"
    assert not any(c and s for c, s in zip(changed, single)), "layers with single-value inputs get no rho gradient"
    warned = [w for w in record if "single value per channel and sample" in str(w.message)]
    assert len(warned) == sum(single), "one warning per layer with single-value inputs"
    if name in SINGLE_VALUE_MODELS:
        assert any(single)  # these models exercise the single-value path
    # the original's state dict loads strictly into the trained converted model, which then holds
    # what conversion gives (rho 1, IN affine = BN affine)
    model.load_state_dict(original.state_dict())
    for k, v in convert_bn_to_metabin(copy.deepcopy(original)).state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
