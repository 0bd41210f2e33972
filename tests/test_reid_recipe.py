"""The recipe end to end on tiny synthetic data: config, model, train, resume, eval, CLI."""

import json

import pytest
import torch

from metabin_layers import metabin_modules
from metabin_layers.reid.checkpoint import load_checkpoint
from metabin_layers.reid.cli import main
from metabin_layers.reid.config import TrainConfig, load_config, parse_overrides
from metabin_layers.reid.model import NORM_VARIANTS, ReIDModel, apply_norm_variant, build_backbone, load_pretrained
from metabin_layers.reid.train import Trainer, warmup_multistep


def tiny_config(tmp_path, **kw):
    overrides = {"output": str(tmp_path / "run"), "syn_train_ids": 16, "syn_test_ids": 6, "syn_images_per_id": 4, "max_iters": 2}
    overrides.update(kw)
    return load_config(overrides=overrides, quick=True)


def test_config_layers_defaults_presets_files_and_overrides(tmp_path):
    paper = TrainConfig()
    assert (paper.backbone, paper.batch_size, paper.lr, paper.epochs, paper.milestones) == ("resnet50", 80, 0.01, 100, [40, 70])
    assert paper.rho_lr_factor == 10.0 and paper.first_inner_loop == 10 and paper.margin == 0.3
    syn = load_config()
    assert syn.data_root is None and syn.backbone == "resnet18" and (syn.height, syn.width) == (64, 32)
    f = tmp_path / "c.yaml"
    f.write_text("lr: 0.05\nbackbone: resnet34\nmilestones: [3, 5]\n")
    cfg = load_config(f, {"lr": "0.07"})
    assert cfg.lr == 0.07 and cfg.backbone == "resnet34" and cfg.milestones == [3, 5]
    real = load_config(overrides={"data_root": "/data"})
    assert real.backbone == "resnet50"  # no synthetic preset for real data
    assert parse_overrides(["sources=market1501,cuhk02", "inner_lr=none"]) == {
        "sources": ["market1501", "cuhk02"],
        "inner_lr": None,
    }
    with pytest.raises(KeyError, match="unknown config key 'lrr'"):
        parse_overrides(["lrr=1"])
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["lr"])
    with pytest.raises(ValueError, match="norm must be one of"):
        load_config(overrides={"norm": "gn"})
    with pytest.raises(ValueError, match="--quick"):
        load_config(overrides={"data_root": "/data"}, quick=True)


def test_warmup_multistep_matches_the_authors_formula():
    assert warmup_multistep(0, 10, 0.01, [40, 70], 0.1) == pytest.approx(0.01)
    assert warmup_multistep(5, 10, 0.01, [40, 70], 0.1) == pytest.approx(0.01 * 0.5 + 0.5)
    assert warmup_multistep(10, 10, 0.01, [40, 70], 0.1) == 1.0
    assert warmup_multistep(40, 10, 0.01, [40, 70], 0.1) == pytest.approx(0.1)
    assert warmup_multistep(75, 10, 0.01, [40, 70], 0.1) == pytest.approx(0.01)


def test_model_variants_and_last_stride():
    net, c = build_backbone("resnet18", last_stride=2)
    assert net(torch.zeros(1, 3, 64, 32)).shape[-2:] == (2, 1)
    net, c = build_backbone("resnet18", last_stride=1)
    assert net(torch.zeros(1, 3, 64, 32)).shape[-2:] == (4, 2)
    tv, c2 = build_backbone("tv:mobilenet_v2", last_stride=1)
    assert c2 == 1280 and tv(torch.zeros(1, 3, 64, 32)).shape[-2:] == (4, 2)
    with pytest.raises(ValueError, match="unknown timm model"):
        build_backbone("not_a_model")
    for variant in NORM_VARIANTS:
        model = ReIDModel("resnet18", num_classes=5, norm=variant)
        layers = metabin_modules(model.backbone)
        assert isinstance(model.neck, torch.nn.BatchNorm1d)  # neck stays plain BN
        if variant == "bn":
            assert not layers
            continue
        rho = torch.cat([m.rho.detach() for m in layers])
        if variant == "in":
            assert torch.equal(rho, torch.zeros_like(rho)) and not layers[0].rho.requires_grad
        elif variant == "bin-half":
            assert layers[0].rho[:32].eq(1).all() and layers[0].rho[32:].eq(0).all()
        else:
            assert torch.equal(rho, torch.ones_like(rho))
    with pytest.raises(ValueError, match="norm must be one of"):
        apply_norm_variant(build_backbone("resnet18")[0], "ln")


def test_pretrained_weights_load_from_a_local_file(tmp_path):
    source, _ = build_backbone("resnet18")
    with torch.no_grad():
        source.bn1.running_mean.uniform_()
        source.conv1.weight.uniform_()
    path = tmp_path / "weights.pth"
    torch.save({"model": {**source.state_dict(), "fc.weight": torch.zeros(3)}}, path)
    model = ReIDModel("resnet18", num_classes=4, pretrained_path=str(path))
    assert torch.equal(model.backbone.conv1.weight, source.conv1.weight)
    assert torch.equal(model.backbone.bn1.running_mean, source.bn1.running_mean)  # BN branch of MetaBIN
    torch.save({"unrelated": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="no tensor of the checkpoint matches"):
        load_pretrained(build_backbone("resnet18")[0], str(path))


@pytest.mark.slow
def test_train_resume_continues_identically(tmp_path):
    full = tiny_config(tmp_path, max_iters=3, checkpoint_every=1, output=str(tmp_path / "full"))
    t = Trainer(full)
    (tmp_path / "full").mkdir()
    t.run(tmp_path / "full", progress=False)
    expected = t.model.state_dict()

    part = tiny_config(tmp_path, max_iters=2, checkpoint_every=1, output=str(tmp_path / "part"))
    t2 = Trainer(part)
    (tmp_path / "part").mkdir()
    t2.run(tmp_path / "part", progress=False)
    state = load_checkpoint(tmp_path / "part" / "checkpoint.pt")
    assert state["iteration"] == 2
    t3 = Trainer(full)
    t3.load_state_dict(state)
    t3.run(tmp_path / "part", progress=False)
    assert t3.iteration == 3
    for k, v in t3.model.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=0, atol=0, msg=k)


@pytest.mark.slow
def test_cli_train_eval_resume_end_to_end(tmp_path, capsys):
    out = tmp_path / "cli"
    args = [
        "--quick",
        "--norm",
        "metabin",
        "--no-progress",
        "--output",
        str(out),
        "--set",
        "max_iters=2",
        "syn_train_ids=16",
        "syn_test_ids=6",
    ]
    assert main(["train", *args]) == 0
    results = json.loads((out / "results.json").read_text())
    entry = results["targets"]["style4"]
    assert 0 <= entry["mAP"] <= 1 and 0 <= entry["rank1"] <= entry["rank5"] <= entry["rank10"] <= 1
    assert results["iterations"] == 2 and len(results["rho_per_layer"]) == 20
    assert (out / "results.md").read_text().count("| style4 |") == 1
    assert (out / "rho.png").stat().st_size > 0 and (out / "cmc.png").stat().st_size > 0
    # resume to 3 iterations, then evaluate the checkpoint again: same numbers as the run printed
    resumed = ["--quick", "--no-progress", "--output", str(out), "--set", "max_iters=3", "syn_train_ids=16", "syn_test_ids=6"]
    assert main(["train", *resumed, "--resume", str(out / "checkpoint.pt")]) == 0  # max_iters may change
    after = json.loads((out / "results.json").read_text())
    assert after["iterations"] == 3
    assert main(["eval", "--checkpoint", str(out / "checkpoint.pt"), "--output", str(tmp_path / "ev")]) == 0
    ev = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert ev["targets"]["style4"]["mAP"] == pytest.approx(after["targets"]["style4"]["mAP"], abs=1e-6)


def test_meta_batch_too_small_for_shuffle_loss(tmp_path):
    with pytest.raises(ValueError, match="meta_batch_size=16 gives 1 identities per domain"):
        Trainer(tiny_config(tmp_path, meta_batch_size=16))


@pytest.mark.parametrize("norm", NORM_VARIANTS)
def test_every_variant_trains_and_treats_rho_as_the_paper_says(tmp_path, norm):
    cfg = tiny_config(tmp_path, norm=norm, max_iters=2, first_inner_loop=1, rho_lr_factor=1000.0)
    t = Trainer(cfg)
    (tmp_path / "run").mkdir()
    before = [m.rho.detach().clone() for m in metabin_modules(t.model)]
    weights = t.model.backbone.conv1.weight.detach().clone()
    t.run(tmp_path / "run", progress=False)
    after = [m.rho.detach() for m in metabin_modules(t.model)]
    assert not torch.equal(weights, t.model.backbone.conv1.weight), "weights must train"
    moved = any(not torch.equal(a, b) for a, b in zip(before, after))
    if norm == "bn":
        assert not after and "rho" not in t.history[-1]
    elif norm in ("in", "bin-half"):
        assert not moved  # fixed mixtures
    else:  # bin: end to end; metabin: meta-learned
        assert moved and all(0 <= float(r.min()) and float(r.max()) <= 1 for r in after)


@pytest.mark.slow
def test_cli_runs_under_torchrun_with_two_processes(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "metabin_layers.reid.cli",
        "train",
        "--quick",
        "--norm",
        "metabin",
        "--no-progress",
        "--output",
        str(out),
        "--set",
        "max_iters=2",
        "meta_batch_size=64",
        "syn_train_ids=24",
        "syn_test_ids=6",
        "workers=0",
    ]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("| style4 |") == 1  # rank 0 alone evaluates and reports
    assert json.loads((out / "results.json").read_text())["iterations"] == 2
