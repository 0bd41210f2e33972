"""Every config value is checked before a folder is created or data is read: the CLI's ``--set``,
a YAML file, the presets and the Python API alike, each error one line naming the key, the value
and what is expected."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from metabin_layers.reid.checks import check_sources
from metabin_layers.reid.cli import main
from metabin_layers.reid.config import TrainConfig, load_config
from metabin_layers.reid.data import RecipeData
from metabin_layers.reid.errors import ConfigError, RecipeError
from metabin_layers.reid.train import Trainer, train
from metabin_layers.reid.validation import validate_config

#: A --quick run of a tiny timm ResNet on 32x16 images (never reached by these tests).
TINY = ["backbone=resnet10t", "height=32", "width=16", "pad=2", "syn_train_ids=16", "syn_test_ids=6"]

_NO_CUDA_DEVICE = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"

#: ``--set`` values that must be refused: (pair, fragments the one error line holds).
BAD_SETS = [
    ("lr=-1", ["lr", "-1", "> 0"]),
    ("weight_decay=-1", ["weight_decay", "-1", ">= 0"]),
    ("rho_init=5", ["rho_init", "5", "[0, 1]"]),
    ("rho_init=nan", ["rho_init", "nan", "[0, 1]"]),
    ("rho_init=-1", ["rho_init", "-1", "[0, 1]"]),
    ("inner_lr=nan", ["inner_lr", "nan", "finite"]),
    ("cyclic_ratio=0", ["cyclic_ratio", "0", ">= 1"]),
    ("workers=-1", ["workers", "-1", ">= 0"]),
    ("seed=-1", ["seed", "-1", "0 <= seed"]),
    ("seed=100000000000000000000", ["seed", "100000000000000000000", "0 <= seed"]),
    (f"device={_NO_CUDA_DEVICE}", ["device", _NO_CUDA_DEVICE, "available"]),
    ("backbone=no_such_net", ["backbone", "no_such_net", "timm"]),
    ("ce_epsilon=2", ["ce_epsilon", "2", "[0, 1)"]),
    ("margin=nan", ["margin", "nan", "finite"]),
    ("momentum=1.5", ["momentum", "1.5", "[0, 1)"]),
    ("num_meta_train_domains=0", ["num_meta_train_domains", "0", "between 1 and 3"]),
    ("num_meta_train_domains=9", ["num_meta_train_domains", "9", "between 1 and 3"]),
    ("eval_batch_size=0", ["eval_batch_size", "0", ">= 1"]),
    ("gamma=nan", ["gamma", "nan", "finite"]),
    ("first_inner_loop=0", ["first_inner_loop", "0", ">= 1"]),
    ("first_inner_loop=-1", ["first_inner_loop", "-1", ">= 1"]),
    ("max_iters=0", ["max_iters", "0", ">= 1"]),
    ("max_iters=-5", ["max_iters", "-5", ">= 1"]),
    ("meta_batch_size=24", ["meta_batch_size", "24", "multiple of num_domains x num_instances"]),
    ("checkpoint_every=0", ["checkpoint_every", "0", ">= 1"]),
]

#: YAML files that must be refused: (text, fragments).
BAD_FILES = [
    ("lr: [1, 2]\n", ["lr", "[1, 2]", "a number"]),
    ("seed: true\n", ["seed", "True", "an integer"]),
    ("sources: 5\n", ["sources", "5", "list of dataset names"]),
    ("log_every: 1.5\n", ["log_every", "1.5", "an integer"]),
    ("milestones: [1, x]\n", ["milestones", "x", "integers"]),
]


def _no_training(monkeypatch):
    """Fail a test at once if a refused config reaches the data or the training loop."""

    def never(self, *args, **kwargs):
        raise AssertionError("the run started")

    monkeypatch.setattr(Trainer, "__init__", never)


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("metabin-reid: error: "), err
    return err


@pytest.mark.parametrize("pair, fragments", BAD_SETS, ids=[p for p, _ in BAD_SETS])
def test_a_bad_set_value_is_one_line_exit_2_before_any_folder(tmp_path, monkeypatch, capsys, pair, fragments):
    _no_training(monkeypatch)
    out = tmp_path / "out"
    args = ["train", "--quick", "--norm", "metabin", "--no-progress", "--output", str(out), "--set", *TINY, pair]
    assert main(args) == 2
    err = _one_line(capsys)
    for text in fragments:
        assert text in err, (text, err)
    assert not out.exists()


@pytest.mark.parametrize("text, fragments", BAD_FILES, ids=[t.strip() for t, _ in BAD_FILES])
def test_a_bad_yaml_value_is_one_line_exit_2_before_any_folder(tmp_path, monkeypatch, capsys, text, fragments):
    _no_training(monkeypatch)
    config = tmp_path / "run.yaml"
    config.write_text(text)
    out = tmp_path / "out"
    assert main(["train", "--quick", "--norm", "bn", "--config", str(config), "--output", str(out)]) == 2
    err = _one_line(capsys)
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert not out.exists()


def test_the_python_api_refuses_the_same_values_naming_key_value_and_expectation(tmp_path):
    with pytest.raises(ConfigError, match=r"^lr=-1\.0: expected a finite number > 0$"):
        TrainConfig(lr=-1.0)
    with pytest.raises(ConfigError, match=r"gamma=nan: expected a finite number > 0"):
        load_config(overrides={"gamma": "nan"})
    assert issubclass(ConfigError, RecipeError) and issubclass(ConfigError, ValueError)
    # a config changed after it was built is checked again by train(), before the folder exists
    cfg = load_config(overrides={"output": str(tmp_path / "run")}, quick=True)
    cfg.max_iters = 0
    with pytest.raises(ConfigError, match=r"max_iters=0: expected an integer >= 1"):
        train(cfg, progress=False)
    assert not (tmp_path / "run").exists()
    cfg.max_iters, cfg.device = 2, _NO_CUDA_DEVICE
    with pytest.raises(ConfigError, match="device="):
        validate_config(cfg)


def test_every_default_preset_and_paper_preset_passes():
    from metabin_layers.reid.presets import PAPER_PRESETS, paper_preset

    validate_config(TrainConfig(), environment=False)
    validate_config(load_config(quick=True))
    validate_config(load_config(main_job=True))
    for name in PAPER_PRESETS:
        cfg = paper_preset(name)
        validate_config(cfg, environment=False)  # resnet50 + a pretrained file that exists elsewhere
        assert dataclasses.asdict(cfg) == cfg.to_dict()


def test_meta_train_domains_are_checked_against_the_sources():
    # the synthetic data: 5 styles, one held out -> 4 source domains
    assert load_config(overrides={"num_meta_train_domains": 3}).num_meta_train_domains == 3
    with pytest.raises(ConfigError, match=r"num_meta_train_domains=4: expected an integer between 1 and 3"):
        load_config(overrides={"num_meta_train_domains": 4})
    # real data: checked against the domains read, before the first iteration
    items = [(f"{d}_{p}_{k}.jpg", 10 * d + p, k % 2, d) for d in range(2) for p in range(8) for k in range(4)]
    data = RecipeData(items, None, 16, 2, {}, "", folders={"market1501": "m", "dukemtmcreid": "d"})
    two = dict(data_root="d", sources=["market1501", "dukemtmcreid"], batch_size=8, meta_batch_size=16)
    check_sources(TrainConfig(**two, num_meta_train_domains=1), data)
    with pytest.raises(ConfigError, match=r"num_meta_train_domains=2: expected an integer between 1 and 1"):
        check_sources(TrainConfig(**two, num_meta_train_domains=2), data)
    with pytest.raises(ConfigError, match=r"meta_batch_size=20: expected a multiple of num_domains x num_instances = 2 x 4"):
        check_sources(TrainConfig(**{**two, "meta_batch_size": 20}), data)
    # one source: the meta step needs two domains (cameras as domains, or several sources)
    one = RecipeData([it for it in items if it[3] == 0], None, 8, 1, {}, "", folders={"market1501": "m"})
    with pytest.raises(ConfigError, match=r"sources=\['market1501'\]: expected at least 2 source domains"):
        check_sources(TrainConfig(data_root="d", sources=["market1501"], batch_size=8, meta_batch_size=16), one)
    check_sources(TrainConfig(data_root="d", sources=["market1501"], norm="bn", batch_size=8), one)


def test_first_inner_loop_and_max_iters_bounds_hold_in_the_trainer(tmp_path):
    cfg = load_config(overrides={"output": str(tmp_path), **dict(p.split("=") for p in TINY)}, quick=True)
    assert cfg.first_inner_loop == 1 and cfg.max_iters == 4
    assert Path(cfg.output) == tmp_path
    with pytest.raises(ConfigError, match="first_inner_loop=0"):
        dataclasses.replace(cfg, first_inner_loop=0)
    with pytest.raises(ConfigError, match="max_iters=-5"):
        dataclasses.replace(cfg, max_iters=-5)
