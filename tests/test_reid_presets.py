"""Paper presets against the authors' configs, the page generated from them, and the keys they use."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from metabin_layers import metabin_modules
from metabin_layers.reid.config import TrainConfig, load_config
from metabin_layers.reid.data import RecipeData, TargetSplit
from metabin_layers.reid.model import ReIDModel, build_backbone
from metabin_layers.reid.presets import PAPER_PRESETS, paper_preset, preset_rows, reproducibility_markdown
from metabin_layers.reid.train import Trainer, evaluate_model

DOC = Path(__file__).resolve().parents[1] / "docs" / "reproducibility.md"


def test_reproducibility_page_is_generated_from_the_presets():
    assert DOC.read_text() == reproducibility_markdown(), (
        "docs/reproducibility.md is stale: regenerate it with python -m metabin_layers.reid.presets > docs/reproducibility.md"
    )


@pytest.mark.parametrize("preset", sorted(PAPER_PRESETS))
def test_every_key_has_a_row_and_every_difference_a_reason(preset):
    rows = preset_rows(preset)
    assert [r[0] for r in rows] == [f.name for f in dataclasses.fields(TrainConfig)]
    unexplained = [r[0] for r in rows if r[4] == "differs"]
    assert not unexplained, f"{preset}: settings differ from the authors' without a reason: {unexplained}"


# The authors' values, typed from their configs/Base-DG.yml and configs/Sample/{M,D}-resnet.yml.
AUTHORS = {
    "multi-source-dg": dict(batch_size=80, meta_batch_size=80, rho_lr_factor=10.0, num_meta_train_domains=3, epochs=100,
                            milestones=[40, 70], cameras_as_domains=False, color_jitter=False, meta_train_ce=False,
                            meta_test_ce=False),
    "market-to-duke": dict(batch_size=96, meta_batch_size=96, rho_lr_factor=20.0, num_meta_train_domains=3, epochs=120,
                           milestones=[50, 90], cameras_as_domains=True, color_jitter=True, meta_train_ce=True,
                           meta_test_ce=True),
    "duke-to-market": dict(batch_size=96, meta_batch_size=96, rho_lr_factor=50.0, num_meta_train_domains=4, epochs=120,
                           milestones=[50, 90], cameras_as_domains=True, color_jitter=True, meta_train_ce=True,
                           meta_test_ce=True),
}  # fmt: skip
AUTHORS["supervised-market"] = AUTHORS["market-to-duke"]


@pytest.mark.parametrize("preset", sorted(PAPER_PRESETS))
def test_presets_hold_the_authors_values(preset):
    cfg = paper_preset(preset)
    for key, value in AUTHORS[preset].items():
        assert getattr(cfg, key) == value, key
    assert (cfg.in_affine_init, cfg.eval_invalid_as_zero, cfg.lr, cfg.warmup_epochs, cfg.first_inner_loop) == (
        "identity", True, 0.01, 10, 10
    )  # fmt: skip
    assert cfg.backbone == "resnet50" and cfg.norm == "metabin" and cfg.seed == 2020
    cfg.lr = 1.0
    assert PAPER_PRESETS[preset].lr == 0.01  # a copy
    with pytest.raises(ValueError, match="preset must be one of"):
        paper_preset("market")


def test_library_defaults_stay_and_bad_in_affine_init_is_named():
    assert TrainConfig().in_affine_init == "copy" and TrainConfig().eval_invalid_as_zero is False
    with pytest.raises(ValueError, match="in_affine_init must be 'copy' or 'identity'"):
        TrainConfig(in_affine_init="ones")


def test_in_affine_init_identity_starts_the_in_branch_at_one_zero(tmp_path):
    source, _ = build_backbone("resnet18")
    with torch.no_grad():
        source.bn1.weight.uniform_(2, 3)
        source.bn1.bias.uniform_(1, 2)
    path = tmp_path / "w.pth"
    torch.save(source.state_dict(), path)
    ident = metabin_modules(ReIDModel("resnet18", 3, pretrained_path=str(path), in_affine_init="identity"))[0]
    copy = metabin_modules(ReIDModel("resnet18", 3, pretrained_path=str(path)))[0]
    assert torch.equal(ident.weight, source.bn1.weight) and torch.equal(copy.in_weight, source.bn1.weight)
    assert ident.in_weight.eq(1).all() and ident.in_bias.eq(0).all()


def _tiny(tmp_path, **kw):
    overrides = {"output": str(tmp_path), "syn_train_ids": 16, "syn_test_ids": 6, "syn_images_per_id": 4, "max_iters": 2}
    return load_config(overrides={**overrides, **kw}, quick=True)


def test_iterations_per_epoch_are_the_authors_count(tmp_path):
    t = Trainer(_tiny(tmp_path, iters_per_epoch=None))
    sampler = t.base_batches.sampler
    k = t.cfg.num_instances
    counts = np.bincount([pid for _, pid, _, _ in t.data.train_items])
    total = sum(max(k, -(-int(n) // k) * k) for n in counts if n)
    estimate = total - total % t.cfg.batch_size - t.cfg.batch_size  # their sampler's estimate
    assert sampler.estimated_num_images == estimate and t.ipe == estimate // t.cfg.batch_size


def _smoothed_ce(logits, target, eps):
    k = logits.shape[1]
    q = torch.full_like(logits, eps / (k - 1)).scatter_(1, target[:, None], 1 - eps)
    return -(q * logits.double().log_softmax(1).to(logits.dtype)).sum(1).mean()


def test_meta_losses_add_cross_entropy_when_configured(tmp_path):
    t = Trainer(_tiny(tmp_path, meta_train_ce=False, meta_test_ce=False))
    t.model.train()
    seen = {}

    def capture(mtr, mte):
        for flag in (False, True):
            t.cfg.meta_train_ce = t.cfg.meta_test_ce = flag
            seen[flag] = (mtr().detach(), mte().detach())
        return {"meta_train_loss": seen[True][0], "meta_test_loss": seen[True][1], "inner_lr": 0.0, "skipped": False}

    batch, split = {}, {}
    next_batch, split_fn = t.meta_batches.next, t.opt.split
    t.meta_batches.next = lambda: batch.setdefault("b", next_batch())
    t.opt.split = lambda dom, n=None: split.setdefault("s", split_fn(dom, n))
    t.opt.meta_step = capture
    t.meta_step()
    x, pid, _, _ = batch["b"]
    with torch.no_grad():
        for i, mask in enumerate((split["s"].train_mask, split["s"].test_mask)):
            _, logits = t.model(x[mask])
            ce = _smoothed_ce(logits, pid[mask], t.cfg.ce_epsilon)
            torch.testing.assert_close(seen[True][i] - seen[False][i], ce, rtol=1e-5, atol=1e-5)


class _Items(torch.utils.data.Dataset):
    def __init__(self, feats, pids, camids):
        self.rows = list(zip(feats, pids, camids))

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        f, p, c = self.rows[i]
        return {"img": torch.tensor(f, dtype=torch.float32), "pid": p, "camid": c}


@pytest.mark.parametrize("invalid_as_zero", [False, True])
def test_evaluation_averaging_is_selectable_and_recorded(invalid_as_zero):
    # query 0 matches gallery 0 at rank 2 (AP 1/2); query 1's only match shares its camera: invalid
    query = _Items([[1.0, 0.0], [0.0, 1.0]], [0, 1], [0, 0])
    gallery = _Items([[0.9, 0.1], [1.0, 0.05], [0.0, 1.0]], [0, 5, 1], [1, 1, 0])
    data = RecipeData([], query, 1, 1, {"toy": [TargetSplit(query, gallery)]}, "toy")
    cfg = TrainConfig(eval_invalid_as_zero=invalid_as_zero, workers=0, metric="euclidean")
    entry = evaluate_model(torch.nn.Identity(), data, cfg, torch.device("cpu"))["toy"]
    assert entry["mAP"] == pytest.approx(0.25 if invalid_as_zero else 0.5)
    assert entry["map_averaging"] == ("all queries, invalid ones as 0" if invalid_as_zero else "valid queries")
