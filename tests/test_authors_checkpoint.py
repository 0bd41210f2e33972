"""The authors' released-model layout loads strictly into ReIDModel and evaluates; their MobileNetV2 x1.4."""

import json
import re

import pytest
import torch

from metabin_layers import metabin_modules
from metabin_layers.layers import _MetaBINBase
from metabin_layers.reid.authors_checkpoint import is_authors_checkpoint, load_authors_checkpoint
from metabin_layers.reid.cli import main
from metabin_layers.reid.config import load_config
from metabin_layers.reid.data import build_data
from metabin_layers.reid.mobilenetv2 import MobileNetV2x14
from metabin_layers.reid.model import ReIDModel
from metabin_layers.reid.train import evaluate_model

IMAGENET_X255 = (torch.tensor([0.485, 0.456, 0.406]) * 255, torch.tensor([0.229, 0.224, 0.225]) * 255)


def randomized(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                t.fill_(7)
            elif name.endswith(("running_var", "rho")):
                t.copy_(torch.rand(t.shape, generator=g) * 0.9 + 0.05)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.1 + (1.0 if name.endswith("weight") and t.dim() == 1 else 0.0))
    return model.eval()


def to_authors_layout(model, gate1=False):
    """Our model's tensors written under the authors' fast-reid names (as their checkpoints hold them)."""
    branch = {"weight": "bat_n.weight", "bias": "bat_n.bias", "running_mean": "bat_n.running_mean",
              "running_var": "bat_n.running_var", "num_batches_tracked": "bat_n.num_batches_tracked",
              "in_weight": "ins_n.weight", "in_bias": "ins_n.bias", "rho": "gate"}  # fmt: skip
    layers = {n for n, m in model.named_modules() if isinstance(m, _MetaBINBase)}
    out = {}
    for key, value in model.state_dict().items():
        path, _, leaf = key.rpartition(".")
        theirs = path.replace(".downsample.0", ".downsample.conv").replace(".downsample.1", ".downsample.bn")
        if path == "neck":
            theirs = "heads.classifier_norm"
        elif path == "classifier":
            theirs = "heads.classifier_fc"
        if path in layers and gate1:
            if leaf in ("in_weight", "in_bias"):
                continue  # one affine
            leaf = "gate" if leaf == "rho" else leaf
        elif path in layers:
            leaf = branch[leaf]
        out[f"{theirs}.{leaf}"] = value.clone()
    out["pixel_mean"], out["pixel_std"] = (t.view(1, 3, 1, 1) for t in IMAGENET_X255)
    return {"model": out, "iteration": 12345}


def test_resnet50_metabin_release_loads_strictly_with_every_tensor_in_place(tmp_path):
    source = randomized(ReIDModel("resnet50", num_classes=11, norm="metabin"))
    ckpt = to_authors_layout(source)
    for key in ("backbone.bn1.gate", "backbone.layer1.0.downsample.bn.bat_n.running_mean", "backbone.layer4.2.bn3.ins_n.weight",
                "backbone.layer2.0.downsample.conv.weight", "heads.classifier_norm.running_var", "heads.classifier_fc.weight"):  # fmt: skip
        assert key in ckpt["model"], key
    path = tmp_path / "model_final.pth"
    torch.save(ckpt, path)
    assert is_authors_checkpoint(str(path))
    model = load_authors_checkpoint(path)
    assert model.norm == "metabin" and len(metabin_modules(model)) == 53
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        assert torch.equal(model(x), source(x))


def test_mobilenet_gate1_release_evaluates_through_the_cli_with_our_evaluator(tmp_path):
    source = randomized(ReIDModel("mobilenetv2_x1_4", num_classes=5, norm="bin-gate1"))
    path = tmp_path / "mobilenet.pth"
    ckpt = to_authors_layout(source, gate1=True)
    ckpt["model"] = {k: v for k, v in ckpt["model"].items() if "num_batches_tracked" not in k}  # may be absent
    torch.save(ckpt, path)
    model = load_authors_checkpoint(path)
    layer = metabin_modules(model)[0]
    assert model.norm == "bin-gate1" and layer.in_weight is layer.weight
    assert torch.equal(layer.rho, metabin_modules(source)[0].rho)
    out = tmp_path / "eval"
    # an authors' release holds no config: eval takes the data keys too
    args = ["eval", "--checkpoint", str(path), "--output", str(out), "--set", "syn_train_ids=16", "syn_test_ids=6"]
    args += ["syn_distractor_ids=0", "syn_images_per_id=4"]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["checkpoint_layout"] == "authors" and (out / "ranked.png").exists()
    small = {"syn_train_ids": 16, "syn_test_ids": 6, "syn_distractor_ids": 0, "syn_images_per_id": 4}
    cfg = load_config(overrides=small)
    expected = evaluate_model(source, build_data(cfg), cfg, torch.device("cpu"))["style4"]
    assert results["targets"]["style4"]["mAP"] == pytest.approx(expected["mAP"], abs=1e-6)
    assert results["targets"]["style4"]["rank1"] == pytest.approx(expected["rank1"])


def test_not_the_authors_layout_is_refused(tmp_path):
    path = tmp_path / "x.pth"
    torch.save({"model": {"conv.weight": torch.zeros(1)}}, path)
    assert not is_authors_checkpoint(str(path))
    with pytest.raises(ValueError, match="not in the authors' layout"):
        load_authors_checkpoint(path)
    torch.save({"model": {"heads.classifier_fc.weight": torch.zeros(3, 4), "backbone.conv1.weight": torch.zeros(1)}}, path)
    with pytest.raises(ValueError, match="unknown backbone"):
        load_authors_checkpoint(path)
    source = ReIDModel("mobilenetv2_x1_4", num_classes=3, norm="bn")
    ckpt = to_authors_layout(source)
    ckpt["model"]["pixel_std"] = torch.ones(1, 3, 1, 1)
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match="pixel_std"):
        load_authors_checkpoint(path)


def test_mobilenet_widths_and_torchreid_imagenet_names(tmp_path):
    net = MobileNetV2x14()
    widths = [net.layer1.conv.out_channels] + [getattr(net, f"layer{i}")[-1].bn.num_features for i in range(2, 9)]
    assert widths == [int(c * 1.4) for c in (32, 16, 24, 32, 64, 96, 160, 320)] == [44, 22, 33, 44, 89, 134, 224, 448]
    assert net.layer9.conv.out_channels == 1792 and tuple(net(torch.zeros(1, 3, 256, 128)).shape) == (1, 1792, 16, 8)
    assert [len(getattr(net, f"layer{i}")) for i in range(2, 9)] == [1, 2, 3, 4, 3, 3, 1]
    randomized(net)
    torchreid = {}  # torchreid's names: convK, conv3.0 (projection conv), conv3.1 (its BN)
    for key, value in net.state_dict().items():
        key = re.sub(r"^layer(\d)\.(\d+)\.conv3\.", r"layer\1.\2.conv3.0.", key)
        key = re.sub(r"^layer(\d)\.(\d+)\.bn\.", r"layer\1.\2.conv3.1.", key)
        torchreid["conv" + key[len("layer") :]] = value
    torchreid["classifier.weight"] = torch.zeros(1000, 1792)
    assert "conv2.0.conv3.1.running_mean" in torchreid and "conv9.bn.weight" in torchreid
    path = tmp_path / "mobilenetv2_1.4.pth"
    torch.save(torchreid, path)
    model = ReIDModel("mobilenetv2_x1_4", num_classes=3, norm="bn", pretrained_path=str(path))
    for key, value in net.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], value), key


@pytest.mark.parametrize("problem", ["unknown_backbone", "wrong_shape", "pixel_std"])
def test_a_malformed_authors_checkpoint_is_one_line_and_creates_no_folder(tmp_path, capsys, problem):
    path = tmp_path / "model_final.pth"
    if problem == "unknown_backbone":
        ckpt = {"model": {"heads.classifier_fc.weight": torch.zeros(3, 4), "backbone.conv1.weight": torch.zeros(1)}}
        expected = "unknown backbone"
    else:
        ckpt = to_authors_layout(ReIDModel("mobilenetv2_x1_4", num_classes=3, norm="bn"))
        if problem == "wrong_shape":
            ckpt["model"]["backbone.layer1.conv.weight"] = torch.zeros(2, 2)
            expected = "backbone.layer1.conv.weight"
        else:
            ckpt["model"]["pixel_std"] = torch.ones(1, 3, 1, 1)
            expected = "pixel_std"
    torch.save(ckpt, path)
    out = tmp_path / "out"
    assert main(["eval", "--checkpoint", str(path), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"metabin-reid: error: checkpoint {path}: ") and expected in err, err
    assert not out.exists()
