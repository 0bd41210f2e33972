"""Eval-time folding, ONNX export, torch.compile and TorchScript of converted models."""

import copy
import io
import shutil
import warnings

import pytest
import timm
import torch
import torchvision
from torch import nn

from metabin_layers import MetaBIN1d, MetaBIN2d, MetaBIN3d, MetaBINAct2d, convert_bn_to_metabin, metabin_modules
from metabin_layers.export import FoldedMetaBIN, FoldedMetaBINAct2d, fold_metabin_for_inference

X_SHAPE = (2, 3, 64, 32)  # batch 2, 64x32: layer4 of a ResNet sees 2x1 maps


@torch.no_grad()
def _randomize(model, seed=0, rho_one=(), rho_zero=()):
    """Random rho in [0, 1], affines and running statistics; rho exactly 1 / 0 in the named layers
    (and the layers below a named module)."""
    g = torch.Generator().manual_seed(seed)
    layers = set(metabin_modules(model))
    for name, m in model.named_modules():
        if m not in layers:
            continue
        c = m.num_features
        m.rho.copy_(torch.rand(c, generator=g))
        if any(name == p or name.startswith(p + ".") for p in rho_one):
            m.rho.fill_(1.0)
        if any(name == p or name.startswith(p + ".") for p in rho_zero):
            m.rho.fill_(0.0)
        if m.affine:
            m.weight.copy_(1 + 0.2 * torch.randn(c, generator=g))
            m.bias.copy_(0.1 * torch.randn(c, generator=g))
            m.in_weight.copy_(1 + 0.2 * torch.randn(c, generator=g))
            m.in_bias.copy_(0.1 * torch.randn(c, generator=g))
        if m.track_running_stats:
            m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
            m.running_var.copy_(0.5 + torch.rand(c, generator=g))
    return model


def _resnet18(**randomize):
    torch.manual_seed(0)
    return _randomize(convert_bn_to_metabin(torchvision.models.resnet18(num_classes=10)), **randomize).eval()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny tensors: intra-op threads only add fork/join overhead, and on a busy 2-core machine the
    # many small parallel regions of float64 depthwise convolutions slow down by 100x or more.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def resnet():
    # IN over the 2x1 maps of layer4 amplifies rounding by up to 1 / (2 sqrt(eps)) ~ 158 per layer:
    # there, two float32 implementations (PyTorch's own eager output against float64 included)
    # differ by ~2e-4 whatever the formula. layer4 keeps rho = 1 so that atol=1e-4 is meaningful
    # (and the pure-affine folding is exported too); the other 15 layers mix BN and IN.
    return _resnet18(rho_one=("layer4",))


@pytest.fixture(scope="module")
def x():
    return torch.randn(X_SHAPE, generator=torch.Generator().manual_seed(1))


# -- folding -------------------------------------------------------------------------------------


def _tinynet_with_dropout():
    model = timm.create_model("tinynet_e", num_classes=5)  # EfficientNet family: BatchNormAct2d + SiLU
    model.bn2.drop = nn.Dropout(0.1)  # a norm-act drop layer must survive conversion and folding
    return model


MODELS = {
    "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "timm_tinynet_e": _tinynet_with_dropout,
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_fold_equals_eval_output_float64(name):
    torch.manual_seed(0)
    model = convert_bn_to_metabin(MODELS[name]())
    layers = metabin_modules(model)
    names = [n for n, m in model.named_modules() if m in layers]
    model = _randomize(model, rho_one=names[::4], rho_zero=names[2::4]).double().eval()
    folded = fold_metabin_for_inference(model)
    x = torch.randn(X_SHAPE, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=0, atol=1e-10)
    assert metabin_modules(folded) == [] and len(metabin_modules(model)) == len(layers)  # a copy by default
    fl = [m for m in folded.modules() if isinstance(m, FoldedMetaBIN)]
    assert len(fl) == len(layers)
    assert sum(not m.instance_stats for m in fl) == len(names[::4])  # rho == 1: pure per-channel affine
    acts = [m for m in layers if isinstance(m, MetaBINAct2d)]
    folded_acts = [m for m in fl if isinstance(m, FoldedMetaBINAct2d)]
    assert len(folded_acts) == len(acts) and (name == "resnet18") == (not acts)
    assert [type(m.act) for m in folded_acts] == [type(m.act) for m in acts]
    assert [type(m.drop) for m in folded_acts] == [type(m.drop) for m in acts]
    assert name == "resnet18" or {nn.SiLU, nn.Identity} <= {type(m.act) for m in folded_acts}
    assert name == "resnet18" or isinstance(folded.bn2.drop, nn.Dropout)
    assert not list(fl[0].parameters()) and fl[0].scale.dtype == torch.float64


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.trace is deprecated
def test_rho_one_is_a_pure_affine_and_skips_instance_statistics():
    layer = _randomize(nn.Sequential(MetaBIN2d(6)), rho_one=("0",))[0].eval()
    folded = FoldedMetaBIN.from_metabin(layer)
    assert not folded.instance_stats
    x = torch.randn(3, 6, 5, 4) * 3 + 2
    torch.testing.assert_close(folded(x), layer(x), rtol=1e-6, atol=1e-6)
    a = (layer.weight / torch.sqrt(layer.running_var + layer.eps)).detach()
    torch.testing.assert_close(folded.scale, a)  # the BN affine, exactly
    graph = str(torch.jit.trace(folded, x).graph)
    assert "aten::mean" not in graph and "aten::sub" not in graph  # no instance statistics
    with torch.no_grad():
        layer.rho[2] = 0.5
    mixed = FoldedMetaBIN.from_metabin(layer)
    assert mixed.instance_stats and "aten::mean" in str(torch.jit.trace(mixed, x).graph)
    torch.testing.assert_close(mixed(x), layer(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "make,shape",
    [
        (lambda: MetaBIN1d(5), (4, 5)),
        (lambda: MetaBIN1d(5), (4, 5, 7)),
        (lambda: MetaBIN3d(5), (2, 5, 3, 4, 2)),
        (lambda: MetaBIN2d(5, affine=False), (2, 5, 4, 3)),
        (lambda: MetaBIN2d(5, track_running_stats=False), (3, 5, 4, 3)),  # eval uses batch statistics
        (lambda: MetaBIN2d(5, momentum=None), (2, 5, 4, 3)),
    ],
)
def test_fold_layer_variants(make, shape):
    layer = _randomize(nn.Sequential(make()))[0].double().eval()
    folded = fold_metabin_for_inference(layer)  # a bare layer: the new root is returned
    assert type(folded) is FoldedMetaBIN and folded.batch_stats == (not layer.track_running_stats)
    x = torch.randn(shape, dtype=torch.float64) * 2 + 1
    with torch.no_grad():
        torch.testing.assert_close(folded(x), layer(x), rtol=0, atol=1e-12)


def test_fold_channels_last_large_mean_and_half_precision():
    layer = _randomize(nn.Sequential(MetaBIN2d(8)))[0].eval()
    folded = FoldedMetaBIN.from_metabin(layer)
    x = (torch.randn(2, 8, 6, 5) * 0.01 + 30).to(memory_format=torch.channels_last)
    truth = copy.deepcopy(layer).double()(x.double())
    # Two-pass statistics and the affine map applied to x - mean: float32 stays at the accuracy of
    # the fused eager path (~4e-6 here, outputs ~30) where A * x + B loses ~3e-4 (|mu| / sigma = 3000).
    torch.testing.assert_close(folded(x).double(), truth, rtol=0, atol=2e-5)
    assert folded(x).is_contiguous(memory_format=torch.channels_last)
    xh = torch.randn(2, 8, 6, 5).half()
    assert folded(xh).dtype == torch.half
    torch.testing.assert_close(folded(xh), layer(xh), rtol=2e-3, atol=2e-3)


def test_fold_refuses_training_mode_and_folds_in_place_on_request():
    model = _resnet18(rho_one=("layer4",))
    with pytest.raises(ValueError, match=r"eval mode.*<root>"):
        fold_metabin_for_inference(model.train())
    model.eval()
    model.layer2[0].bn1.train()  # one layer left in training mode
    with pytest.raises(ValueError, match=r"layer2\.0\.bn1"):
        fold_metabin_for_inference(model)
    with pytest.raises(ValueError, match="training mode"):
        FoldedMetaBIN.from_metabin(model.layer2[0].bn1)
    model.eval()
    x = torch.randn(X_SHAPE)
    with torch.no_grad():
        expected = model(x)
    assert fold_metabin_for_inference(model, inplace=True) is model
    assert metabin_modules(model) == []
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="C = num_features"):
        model.layer1[0].bn1(torch.randn(2, 32, 8, 8))


# -- ONNX --------------------------------------------------------------------------------------


def _ort_run(data, x, **session_kwargs):
    ort = pytest.importorskip("onnxruntime")
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"], **session_kwargs)
    return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])


def _onnx_bytes(model, x, dynamo, dynamic=True, **kwargs):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy exporter deprecation, tracer warnings
        if dynamo:
            pytest.importorskip("onnxscript")
            if dynamic:
                kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch", min=2, max=64)},)
            program = torch.onnx.export(model, (x,), dynamo=True, opset_version=18, verbose=False, **kwargs)
            return program.model_proto.SerializeToString()
        if dynamic:
            kwargs["dynamic_axes"] = {"x": {0: "batch"}}
        f = io.BytesIO()
        torch.onnx.export(model, (x,), f, dynamo=False, opset_version=18, input_names=["x"], **kwargs)
        return f.getvalue()


@pytest.mark.parametrize(
    "folded,dynamo",
    [
        pytest.param(True, True, marks=pytest.mark.slow),  # the default exporter: ~30 s on a resnet
        pytest.param(False, True, marks=pytest.mark.slow),
        (True, False),
        (False, False),
    ],
    ids=["folded-default", "unfolded-default", "folded-legacy", "unfolded-legacy"],
)
def test_onnx_export_matches_pytorch(resnet, x, folded, dynamo):
    model = fold_metabin_for_inference(resnet) if folded else resnet
    dynamic = folded or not dynamo  # a dynamic batch costs the default exporter ~3 s more: once is enough
    data = _onnx_bytes(model, x, dynamo, dynamic=dynamic)
    with torch.no_grad():  # onnxruntime with its default options
        torch.testing.assert_close(_ort_run(data, x), model(x), rtol=0, atol=1e-4)
        if dynamic:
            x3 = torch.randn(3, *X_SHAPE[1:])
            torch.testing.assert_close(_ort_run(data, x3), model(x3), rtol=0, atol=1e-4)
    onnx = pytest.importorskip("onnx")
    ops = {n.op_type for n in onnx.load_from_string(data).graph.node}
    if folded and dynamo:
        assert not ops & {"InstanceNormalization", "BatchNormalization"}  # elementwise ops and reductions only
    else:  # the converted model, and a folded one under the legacy exporter: standard normalisation nodes
        assert {"InstanceNormalization", "BatchNormalization"} <= ops


def _identical_layers():
    # Equal coefficients in several layers, as in a freshly converted model: the legacy exporter
    # merges equal initializers through Identity nodes, which onnxruntime's EliminateIdentity
    # rewrite used to break ("Invalid model. Node input ... is not a graph input, ...").
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), MetaBIN2d(4, rho_init=0.5), nn.ReLU(), nn.Conv2d(4, 4, 3), MetaBIN2d(4, rho_init=0.5)
    )


EXPORT_CASES = {
    "identical-layers": (_identical_layers, (2, 3, 8, 8)),
    "tv-resnet18-fresh": (
        lambda: convert_bn_to_metabin(torchvision.models.resnet18(num_classes=10), rho_init=0.5),
        (2, 3, 64, 32),
    ),
    "timm-bn-act": (
        lambda: convert_bn_to_metabin(timm.create_model("mobilenetv3_small_050", num_classes=10), rho_init=0.5),
        (2, 3, 64, 64),
    ),
}


@pytest.mark.parametrize(
    "case,dynamo,opset",
    [
        ("identical-layers", False, 17),
        ("identical-layers", True, 18),
        ("tv-resnet18-fresh", False, 17),
        ("tv-resnet18-fresh", False, 18),
        ("tv-resnet18-fresh", True, 17),
        ("timm-bn-act", False, 18),
        pytest.param("timm-bn-act", True, 18, marks=pytest.mark.slow),
    ],
)
def test_onnx_export_as_users_call_it_loads_with_default_options(case, dynamo, opset, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    if dynamo:
        pytest.importorskip("onnxscript")
    make, shape = EXPORT_CASES[case]
    model = make().eval()
    x = torch.randn(shape)
    path = str(tmp_path / "model.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (x,), path, dynamo=dynamo, opset_version=opset)  # nothing else
    session = ort.InferenceSession(path)  # default options
    out = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        expected = model(x)
    # float32 rounding, amplified by instance statistics over 2 values in the last stage of the ResNet
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-3 * float(expected.abs().max()))
    assert all(m.training is False for m in metabin_modules(model))


def test_onnx_legacy_exporter_of_a_folded_model_with_identical_layers_loads_with_default_options():
    folded = fold_metabin_for_inference(_identical_layers().eval())
    x = torch.randn(2, 3, 8, 8)
    data = _onnx_bytes(folded, x, dynamo=False)
    torch.testing.assert_close(_ort_run(data, x), folded(x), rtol=0, atol=1e-5)


# -- torch.compile -----------------------------------------------------------------------------


def _has_cxx_compiler():
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


def _check_train_step(net, backend, x):
    """Compiled forward, backward (rho included) and running-statistics update equal eager's."""
    net.train()
    twin = copy.deepcopy(net)
    compiled = torch.compile(twin, backend=backend, fullgraph=True)  # fullgraph: no graph break
    out, ref = compiled(x), net(x)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    (out * weights).sum().backward()
    (ref * weights).sum().backward()
    for (name, p), q in zip(net.named_parameters(), twin.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-7, atol=1e-9, msg=lambda m, name=name: f"{name}: {m}")
    assert all(m.rho.grad.abs().sum() > 0 for m in metabin_modules(twin))
    for a, b in zip(metabin_modules(net), metabin_modules(twin)):
        torch.testing.assert_close(b.running_mean, a.running_mean)
        torch.testing.assert_close(b.running_var, a.running_var)
        assert int(b.num_batches_tracked) == int(a.num_batches_tracked)


@pytest.mark.slow
def test_compile_eager_backend_matches_eager(resnet):
    # The converted ResNet-18 in float64: eval (unfolded and folded), then train forward + backward.
    torch._dynamo.reset()
    net = copy.deepcopy(resnet).double()
    x = torch.randn(X_SHAPE, dtype=torch.float64)
    with torch.no_grad():
        expected = net(x)
        compiled = torch.compile(net, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), expected, rtol=1e-9, atol=1e-9)
        folded = torch.compile(fold_metabin_for_inference(net), backend="eager", fullgraph=True)
        torch.testing.assert_close(folded(x), expected, rtol=1e-9, atol=1e-9)
    _check_train_step(net, "eager", x)


@pytest.mark.skipif(not _has_cxx_compiler(), reason="inductor on CPU needs a C++ compiler")
def test_compile_inductor_matches_eager():
    # A small model: a cold inductor start (C++ toolchain, kernel builds) takes 15-25 s on 2 CPU
    # cores (a ResNet-18 over a minute); later runs hit inductor's on-disk cache (~2 s).
    torch._dynamo.reset()
    net = _randomize(nn.Sequential(MetaBIN2d(8), MetaBINAct2d(8, act_layer=nn.SiLU))).double().eval()
    x = torch.randn(4, 8, 12, 8, dtype=torch.float64)
    with torch.no_grad():
        compiled = torch.compile(net, backend="inductor", fullgraph=True)
        torch.testing.assert_close(compiled(x), net(x), rtol=1e-9, atol=1e-9)
    _check_train_step(net, "inductor", x)


# -- TorchScript -------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
def test_jit_trace_and_script(resnet, x):
    folded = fold_metabin_for_inference(resnet)
    with torch.no_grad(), torch.jit.optimized_execution(False):  # skip the profiling runs
        expected = resnet(x)
        traced = torch.jit.trace(resnet, (x,), check_trace=False)  # unfolded: the composite path is traced
        torch.testing.assert_close(traced(x), expected, rtol=0, atol=1e-5)
        buf = io.BytesIO()
        torch.jit.save(torch.jit.script(folded), buf)  # the folded model scripts and survives save / load
        buf.seek(0)
        loaded = torch.jit.load(buf)
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=1e-5)
        x3 = torch.randn(3, *X_SHAPE[1:])
        torch.testing.assert_close(loaded(x3), folded(x3), rtol=0, atol=1e-5)  # any batch size


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_scripted_unfolded_layer_says_to_fold_first(resnet, x):
    """The layers have no TorchScript forward: a scripted unfolded model raises a clear error, while
    the folded one scripts and computes the eval output (test_jit_trace_and_script)."""
    scripted = torch.jit.script(copy.deepcopy(resnet))
    with pytest.raises(torch.jit.Error, match="fold_metabin_for_inference"):
        scripted(x)
