"""The recipe's re-ranking, query expansion, precise BN and tensorboard events, end to end on tiny data.

References: the slow re-ranking / query expansion of ``test_reid_rerank``, the exact per-batch
mean and variance of each layer's input, and the run's own ``results.json`` / checkpoint for the
tensorboard scalars.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys

import numpy as np
import pytest
import torch
from test_reid_evaluation import slow_reference
from test_reid_rerank import paper_rerank, reference_aqe
from torch.utils.data import DataLoader

import metabin_layers.reid.report as report
from metabin_layers import metabin_modules
from metabin_layers.reid.checkpoint import load_checkpoint
from metabin_layers.reid.cli import EVAL_KEYS, main
from metabin_layers.reid.config import TrainConfig, parse_overrides
from metabin_layers.reid.data import build_data
from metabin_layers.reid.evaluation import extract_features
from metabin_layers.reid.model import ReIDModel
from metabin_layers.reid.sampler import RandomIdentitySampler
from metabin_layers.reid.train import precise_bn

TINY = ["backbone=resnet10t", "height=32", "width=16", "pad=2", "syn_train_ids=16", "syn_test_ids=6", "max_iters=2"]


# -- config ---------------------------------------------------------------------------------------------


def test_config_keys_are_typed_checked_and_honoured_by_eval():
    values = parse_overrides(
        ["rerank=true", "rerank_k1=10", "rerank_lambda=0.5", "query_expansion=on", "query_expansion_k=3", "precise_bn_iters=7"]
    )
    assert values == {
        "rerank": True,
        "rerank_k1": 10,
        "rerank_lambda": 0.5,
        "query_expansion": True,
        "query_expansion_k": 3,
        "precise_bn_iters": 7,
    }
    cfg = TrainConfig()
    assert (cfg.rerank, cfg.rerank_k1, cfg.rerank_k2, cfg.rerank_lambda) == (False, 20, 6, 0.3)
    assert (cfg.query_expansion, cfg.query_expansion_k, cfg.query_expansion_alpha) == (False, 5, 3.0)
    assert (cfg.precise_bn_iters, cfg.tensorboard) == (0, False)
    for key, value, match in (
        ("rerank_k1", 0, "rerank_k1=0: expected an integer >= 1"),
        ("query_expansion_k", 0, "query_expansion_k=0: expected an integer >= 1"),
        ("rerank_lambda", 1.5, r"rerank_lambda=1.5: expected a finite number in \[0, 1\]"),
        ("rerank_lambda", float("nan"), r"rerank_lambda=nan: expected a finite number in \[0, 1\]"),
        ("query_expansion_alpha", -1.0, "query_expansion_alpha=-1.0: expected a finite number >= 0"),
        ("precise_bn_iters", -1, "precise_bn_iters=-1: expected an integer >= 0"),
    ):
        with pytest.raises(ValueError, match=match):
            TrainConfig(**{key: value})
    assert {"rerank", "rerank_k1", "query_expansion", "precise_bn_iters"} <= set(EVAL_KEYS)


# -- precise BN in the recipe ---------------------------------------------------------------------------


def test_precise_bn_averages_over_the_training_batches_it_names():
    cfg = TrainConfig(
        syn_train_ids=4, syn_test_ids=2, syn_styles=3, syn_held_out=[2], syn_images_per_id=2, height=32, width=16,
        workers=0, batch_size=4, num_instances=2, precise_bn_iters=3, seed=5,
    )  # fmt: skip
    data = build_data(cfg)
    torch.manual_seed(0)
    model = ReIDModel("test_resnet", data.num_classes, norm="metabin").eval()
    # the reference: the neck's input over the same batches (same sampler and seed), exact statistics
    reference = ReIDModel("test_resnet", data.num_classes, norm="metabin")
    reference.load_state_dict(model.state_dict())
    reference.train()
    seen = []
    reference.neck.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().double()))
    sampler = RandomIdentitySampler(data.train_items, 4, 2, seed=cfg.seed + 2, num_batches=3)
    rng_before = torch.get_rng_state()
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed + 2)
        with torch.no_grad():
            loader = DataLoader(data.train_set, batch_sampler=sampler, generator=torch.Generator().manual_seed(cfg.seed + 2))
            for batch in loader:
                reference(batch["img"])
    assert precise_bn(model, data, cfg, torch.device("cpu")) == 3
    assert torch.equal(torch.get_rng_state(), rng_before)  # the run's generator is left alone
    assert len(seen) == 3 and not model.training
    mean = sum(x.mean(0) for x in seen) / 3
    var = sum(x.var(0, unbiased=True) for x in seen) / 3
    torch.testing.assert_close(model.neck.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.neck.running_var.double(), var, rtol=1e-5, atol=1e-6)
    assert int(model.neck.num_batches_tracked) == 3 and model.neck.momentum == 0.1
    assert all(int(m.num_batches_tracked) == 3 for m in metabin_modules(model))
    assert precise_bn(model, data, TrainConfig(**{**cfg.to_dict(), "precise_bn_iters": 0}), torch.device("cpu")) is None


# -- one run, evaluated in several ways ------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-iteration MetaBIN run with tensorboard events and precise BN, logging every iteration."""
    out = tmp_path_factory.mktemp("run")
    mp = pytest.MonkeyPatch()
    mp.setattr(report, "matplotlib_available", lambda: False)
    sets = [*TINY, "log_every=1", "precise_bn_iters=2", "tensorboard=true"]
    with contextlib.redirect_stdout(io.StringIO()):
        status = main(["train", "--quick", "--norm", "metabin", "--no-progress", "--output", str(out), "--set", *sets])
    mp.undo()
    assert status == 0
    return out


@pytest.mark.slow
def test_eval_reranks_and_expands_as_the_references_on_the_checkpoint(run, capsys):
    trained = json.loads((run / "results.json").read_text())
    assert trained["precise_bn_batches"] == 2
    assert trained["targets"]["style4"]["ranking"] == "plain distances"
    out = run.parent / "eval-rerank"
    args = ["eval", "--checkpoint", str(run / "checkpoint.pt"), "--output", str(out), "--rerank", "--query-expansion"]
    assert main([*args, "--set", "rerank_k1=4", "rerank_k2=2", "query_expansion_k=3", "device=cpu"]) == 0
    printed = capsys.readouterr().out
    label = "average query expansion (k=3, alpha=3) + k-reciprocal re-ranking (k1=4, k2=2, lambda=0.3)"
    assert f"metrics in % after {label}, with precise BN over 2 batches:" in printed
    assert f"Metrics after {label}, with precise BN over 2 batches." in (out / "results.md").read_text()
    results = json.loads((out / "results.json").read_text())
    entry = results["targets"]["style4"]
    assert entry["ranking"] == label and results["precise_bn_batches"] == 2
    assert results["config"]["rerank"] and results["config"]["query_expansion"]

    # the reference: the checkpoint's model, precise BN, features, then the slow references
    cfg = TrainConfig(**{**load_checkpoint(run / "checkpoint.pt")["config"], "device": "cpu"})
    data = build_data(cfg)
    model = ReIDModel(cfg.backbone, data.num_classes, norm=cfg.norm, last_stride=cfg.last_stride)
    model.load_state_dict(load_checkpoint(run / "checkpoint.pt")["model"])
    assert precise_bn(model, data, cfg, torch.device("cpu")) == 2
    split = data.targets["style4"][0]
    qf, q_pids, q_cams = extract_features(model, DataLoader(split.query, batch_size=8), "cpu")
    gf, g_pids, g_cams = extract_features(model, DataLoader(split.gallery, batch_size=8), "cpu")
    eq, eg = reference_aqe(qf.double().numpy(), gf.double().numpy(), 3, 3.0, 1)
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    cos = lambda a, b: 1 - unit(a) @ unit(b).T  # noqa: E731
    dist = paper_rerank(cos(eq, eg), cos(eq, eq), cos(eg, eg), 4, 2, 0.3)
    ref_cmc, ref_ap, ref_inp, _ = slow_reference(dist, q_pids, g_pids, q_cams, g_cams, len(g_pids))
    assert entry["rank1"] == pytest.approx(ref_cmc[0]) and entry["rank5"] == pytest.approx(ref_cmc[4])
    assert entry["mAP"] == pytest.approx(ref_ap, abs=1e-6) and entry["mINP"] == pytest.approx(ref_inp, abs=1e-6)

    # without the flags eval reproduces the run's own evaluation (precise BN included, from its config)
    plain = run.parent / "eval-plain"
    assert main(["eval", "--checkpoint", str(run / "checkpoint.pt"), "--output", str(plain)]) == 0
    again = json.loads((plain / "results.json").read_text())["targets"]["style4"]
    assert again["mAP"] == pytest.approx(trained["targets"]["style4"]["mAP"], abs=1e-6)
    assert again["mAP"] != pytest.approx(entry["mAP"], abs=1e-9)


def _scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list((folder / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1, files
    acc = EventAccumulator(str(files[0]))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.slow
def test_tensorboard_events_hold_the_logged_values(run):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install 'metabin-layers[tensorboard]')")
    from metabin_layers.reid.events import rho_per_stage

    scalars = _scalars(run)
    results = json.loads((run / "results.json").read_text())
    history = results["history"]
    assert [h["it"] for h in history] == [1, 2]
    tags = {"ce": "loss/ce", "tri": "loss/tri", "mtr": "loss/mtr", "mte": "loss/mte", "lr": "lr/base"}
    tags.update(inner_lr="lr/inner", rho="rho/mean", degenerate="train/degenerate_losses")
    for key, tag in tags.items():
        want = [(h["it"], h[key]) for h in history]
        got = scalars[tag]
        assert [s for s, _ in got] == [s for s, _ in want], tag
        np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=1e-6, err_msg=tag)  # float32 events
    # the mean rho per stage at the last iteration: from the saved model
    model = ReIDModel("resnet10t", 16, norm="metabin")
    model.load_state_dict(load_checkpoint(run / "checkpoint.pt")["model"])
    stages = rho_per_stage(model.backbone)
    assert {"rho/bn1", "rho/layer1", "rho/layer4"} <= {f"rho/{s}" for s in stages}
    for stage, value in stages.items():
        step, logged = scalars[f"rho/{stage}"][-1]
        assert step == 2 and logged == pytest.approx(value, rel=1e-6), stage
    for metric in ("rank1", "rank5", "rank10", "mAP", "mINP"):
        assert scalars[f"eval/style4/{metric}"] == [(2, pytest.approx(results["targets"]["style4"][metric], rel=1e-6))]


def test_tensorboard_missing_is_one_line_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    args = ["train", "--quick", "--norm", "bn", "--no-progress", "--output", str(tmp_path / "r"), "--set", *TINY]
    assert main([*args, "tensorboard=true"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "metabin-reid: error: tensorboard=true needs the tensorboard package: pip install 'metabin-layers[tensorboard]'"
    assert not (tmp_path / "r").exists()
