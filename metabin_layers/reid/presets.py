"""The paper's settings as ``TrainConfig`` presets, and their comparison with the authors' configs.

``PAPER_PRESETS`` holds one config per published setting (multi-source DG, Market->Duke,
Duke->Market, supervised Market). ``AUTHORS_SETTINGS`` records, for every config key, the
authors' config key and value (their ``configs/Base-DG.yml`` and ``configs/Sample/{DG,M,D}-resnet.yml``);
``reproducibility_markdown`` renders ``docs/reproducibility.md`` from both, one row per field of
``TrainConfig``, so that a new config key shows up in the page by itself.

    python -m metabin_layers.reid.presets > docs/reproducibility.md
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

from .config import TrainConfig

__all__ = [
    "PAPER_PRESETS",
    "AUTHORS_SETTINGS",
    "NOT_IN_AUTHORS_CONFIGS",
    "FIXED_IN_CODE",
    "AuthorsSetting",
    "paper_preset",
    "preset_rows",
    "reproducibility_markdown",
]

_PAPER_COMMON: dict[str, Any] = {
    "in_affine_init": "identity",  # LOAD_IN_AFFINE False: IN affine starts at 1 / 0
    "eval_invalid_as_zero": True,  # their Cython evaluator
}
_SINGLE_SOURCE: dict[str, Any] = {
    **_PAPER_COMMON,
    "cameras_as_domains": True,
    "color_jitter": True,
    "batch_size": 96,
    "meta_batch_size": 96,
    "epochs": 120,
    "milestones": [50, 90],
    "meta_train_ce": True,
    "meta_test_ce": True,
}

#: The paper's settings. Pass a local ImageNet checkpoint as ``pretrained`` (nothing is downloaded).
PAPER_PRESETS: dict[str, TrainConfig] = {
    "multi-source-dg": TrainConfig(
        **_PAPER_COMMON,
        sources=["cuhk02", "cuhk03_detected", "market1501", "dukemtmcreid", "cuhksysu"],  # their order
        num_meta_train_domains=3,
    ),
    "market-to-duke": TrainConfig(
        **_SINGLE_SOURCE, sources=["market1501"], targets=["dukemtmcreid"], rho_lr_factor=20.0, num_meta_train_domains=3
    ),
    "duke-to-market": TrainConfig(
        **_SINGLE_SOURCE, sources=["dukemtmcreid"], targets=["market1501"], rho_lr_factor=50.0, num_meta_train_domains=4
    ),
    "supervised-market": TrainConfig(
        **_SINGLE_SOURCE, sources=["market1501"], targets=["market1501"], rho_lr_factor=20.0, num_meta_train_domains=3
    ),
}

_TITLES = {
    "multi-source-dg": "Multi-source DG (Base-DG.yml + DG-resnet.yml)",
    "market-to-duke": "Market-1501 -> DukeMTMC-reID (M-resnet.yml)",
    "duke-to-market": "DukeMTMC-reID -> Market-1501 (D-resnet.yml)",
    "supervised-market": "Supervised Market-1501 (M-resnet.yml, tested on Market)",
}


def paper_preset(name: str) -> TrainConfig:
    """A fresh copy of one of ``PAPER_PRESETS``.

    Args:
        name: The preset's name, a key of ``PAPER_PRESETS``.

    Returns:
        A new ``TrainConfig`` (changing it leaves ``PAPER_PRESETS`` as it is).

    Raises:
        ValueError: If ``name`` is not a preset.

    Examples:
        >>> from metabin_layers.reid.presets import paper_preset
        >>> cfg = paper_preset("market-to-duke")
        >>> cfg.meta_batch_size, cfg.rho_lr_factor, cfg.num_meta_train_domains
        (96, 20.0, 3)
    """
    if name not in PAPER_PRESETS:
        raise ValueError(f"preset must be one of {sorted(PAPER_PRESETS)}, got {name!r}")
    return dataclasses.replace(PAPER_PRESETS[name])


@dataclass(frozen=True)
class AuthorsSetting:
    """The authors' config key and value for one of our keys (``value``: one value, or one per preset).

    ``note`` justifies, in one line, why a preset keeps a value other than the authors'.

    Attributes:
        key: The authors' config key (with a hint where it needs one).
        value: The authors' value: one for every preset, or a dict with one per preset name.
        note: Why a preset differs from the authors' value (empty: no difference recorded).

    Examples:
        >>> from metabin_layers.reid.presets import AuthorsSetting
        >>> setting = AuthorsSetting("SOLVER.BASE_LR", 0.01)
        >>> setting.value_for("market-to-duke")
        0.01
    """

    key: str
    value: Any
    note: str = ""

    def value_for(self, preset: str) -> Any:
        if isinstance(self.value, dict) and set(self.value) == set(PAPER_PRESETS):
            return self.value[preset]
        return self.value


def _per_preset(dg: Any, market: Any, duke: Any) -> dict[str, Any]:
    return {"multi-source-dg": dg, "market-to-duke": market, "duke-to-market": duke, "supervised-market": market}


_DG_SOURCES = ["cuhk02", "cuhk03_detected", "market1501", "dukemtmcreid", "cuhksysu"]

#: Our key -> the authors' setting (their defaults.py, Base-DG.yml and the Sample configs).
AUTHORS_SETTINGS: dict[str, AuthorsSetting] = {
    "sources": AuthorsSetting("DATASETS.NAMES", _per_preset(_DG_SOURCES, ["market1501"], ["dukemtmcreid"])),
    "targets": AuthorsSetting(
        "DATASETS.TESTS",
        _per_preset(["grid", "viper", "prid", "ilids"], ["market1501", "dukemtmcreid"], ["market1501", "dukemtmcreid"]),
        "single-source: one run of theirs tests both sets; each preset names the set its table reports",
    ),
    "combine_all": AuthorsSetting(
        "DATASETS.COMBINEALL (their DG_* sources: every image)", _per_preset([True] * 5, [False], [False])
    ),
    "num_splits": AuthorsSetting("ALL_* test protocols (10 trials)", 10),
    "cameras_as_domains": AuthorsSetting("DATALOADER.CAMERA_TO_DOMAIN", _per_preset(False, True, True)),
    "height": AuthorsSetting("INPUT.SIZE_TRAIN[0]", 256),
    "width": AuthorsSetting("INPUT.SIZE_TRAIN[1]", 128),
    "flip": AuthorsSetting("INPUT.DO_FLIP", True),
    "pad": AuthorsSetting("INPUT.PADDING (DO_PAD)", 10),
    "color_jitter": AuthorsSetting("INPUT.CJ.ENABLED", _per_preset(False, True, True)),
    "workers": AuthorsSetting("DATALOADER.NUM_WORKERS", 2, "loader processes only: no effect on the numbers"),
    "backbone": AuthorsSetting("MODEL.BACKBONE.NAME / DEPTH", "resnet50"),
    "last_stride": AuthorsSetting("MODEL.BACKBONE.LAST_STRIDE", 1),
    "pretrained": AuthorsSetting(
        "MODEL.BACKBONE.PRETRAIN", "ImageNet ResNet-50", "nothing is downloaded: pass pretrained=<local ImageNet file>"
    ),
    "norm": AuthorsSetting("MODEL.NORM.TYPE_BACKBONE (BIN_gate2)", "metabin"),
    "rho_init": AuthorsSetting("MODEL.NORM.BIN_INIT ('one')", 1.0),
    "in_affine_init": AuthorsSetting("MODEL.NORM.LOAD_IN_AFFINE (False: 1 / 0)", "identity"),
    "batch_size": AuthorsSetting("SOLVER.IMS_PER_BATCH", _per_preset(80, 96, 96)),
    "num_instances": AuthorsSetting("DATALOADER.NUM_INSTANCE", 4),
    "meta_batch_size": AuthorsSetting("META.DATA.MTRAIN_MINI_BATCH", _per_preset(80, 96, 96)),
    "lr": AuthorsSetting("SOLVER.BASE_LR", 0.01),
    "bias_lr_factor": AuthorsSetting("SOLVER.BIAS_LR_FACTOR", 2.0),
    "momentum": AuthorsSetting("SOLVER.MOMENTUM", 0.9),
    "weight_decay": AuthorsSetting("SOLVER.WEIGHT_DECAY (= _BIAS)", 5e-4),
    "epochs": AuthorsSetting("SOLVER.MAX_ITER (epochs)", _per_preset(100, 120, 120)),
    "milestones": AuthorsSetting("SOLVER.STEPS (epochs)", _per_preset([40, 70], [50, 90], [50, 90])),
    "gamma": AuthorsSetting("SOLVER.GAMMA", 0.1),
    "warmup_epochs": AuthorsSetting("SOLVER.WARMUP_ITERS (epochs)", 10),
    "warmup_factor": AuthorsSetting("SOLVER.WARMUP_FACTOR", 0.01),
    "iters_per_epoch": AuthorsSetting("sampler estimate // IMS_PER_BATCH (None: same formula)", None),
    "max_iters": AuthorsSetting("MAX_ITER x iterations per epoch (None: from epochs)", None),
    "rho_lr_factor": AuthorsSetting("META.SOLVER.LR_FACTOR.GATE", _per_preset(10.0, 20.0, 50.0)),
    "inner_lr": AuthorsSetting("META.SOLVER.LR_FACTOR.META (0.0: cyclic, our None)", None),
    "cyclic_middle_lr": AuthorsSetting("META_CYCLIC_MIDDLE_LR", 0.01),
    "cyclic_ratio": AuthorsSetting("META_CYCLIC_RATIO", 10.0),
    "cyclic_period_per_epoch": AuthorsSetting("META_CYCLIC_PERIOD_PER_EPOCH", 0.2),
    "cyclic_up_ratio": AuthorsSetting("META_CYCLIC_UP_RATIO", 0.5),
    "first_inner_loop": AuthorsSetting("META.SOLVER.INIT.FIRST_INNER_LOOP", 10),
    "num_meta_train_domains": AuthorsSetting("META.SOLVER.MTRAIN.NUM_DOMAIN", _per_preset(3, 3, 4)),
    "second_order": AuthorsSetting("META.SOLVER.MTRAIN.SECOND_ORDER", False),
    "meta_train_ce": AuthorsSetting("CrossEntropyLoss in META.LOSS.MTRAIN_NAME", _per_preset(False, True, True)),
    "meta_test_ce": AuthorsSetting("CrossEntropyLoss in META.LOSS.MTEST_NAME", _per_preset(False, True, True)),
    "ce_epsilon": AuthorsSetting("MODEL.LOSSES.CE.EPSILON", 0.1),
    "margin": AuthorsSetting("MODEL.LOSSES.TRI(_MTRAIN, _MTEST).MARGIN", 0.3),
    "amp": AuthorsSetting("SOLVER.AMP", True),
    "amp_dtype": AuthorsSetting("SOLVER.AMP (float16 autocast)", "float16"),
    "seed": AuthorsSetting("META.SOLVER.MANUAL_SEED", 2020),
    "eval_flip": AuthorsSetting("test-time flip (none in their evaluator)", False),
    "metric": AuthorsSetting("TEST.METRIC", "cosine"),
    "eval_batch_size": AuthorsSetting("TEST.IMS_PER_BATCH", 128),
    "eval_invalid_as_zero": AuthorsSetting("their Cython evaluator (mean over all queries)", True),
    "rerank": AuthorsSetting("TEST.RERANK.ENABLED", False),
    "rerank_k1": AuthorsSetting("TEST.RERANK.K1", 20),
    "rerank_k2": AuthorsSetting("TEST.RERANK.K2", 6),
    "rerank_lambda": AuthorsSetting("TEST.RERANK.LAMBDA", 0.3),
    "query_expansion": AuthorsSetting("TEST.AQE.ENABLED", False),
    "query_expansion_k": AuthorsSetting("TEST.AQE.QE_K", 5),
    "query_expansion_alpha": AuthorsSetting("TEST.AQE.ALPHA", 3.0),
    "precise_bn_iters": AuthorsSetting("TEST.PRECISE_BN (ENABLED False: 0; NUM_ITER 300 when on)", 0),
}

#: Keys with no counterpart in the authors' configs (where to run, what to log, synthetic data).
NOT_IN_AUTHORS_CONFIGS: dict[str, str] = {
    "data_root": "where the datasets are (theirs: an environment variable)",
    "device": "where to run",
    "output": "where results go",
    "log_every": "logging only",
    "tensorboard": "logging only",
    "checkpoint_every": "checkpointing only",
    "checkpoint_every_minutes": "checkpointing only",
    "compile": "torch.compile of the base and meta steps: speed only",
    "cuda_graph": "one CUDA graph per iteration: speed only",
    **{
        f.name: "synthetic data only"
        for f in dataclasses.fields(TrainConfig)
        if f.name.startswith("syn_")  # the built-in synthetic dataset's knobs
    },
}

#: What the recipe's code fixes (same in every preset): (setting, authors, ours, note).
FIXED_IN_CODE: list[tuple[str, str, str, str]] = [
    ("pooling", "global average (avgpool)", "global average", ""),
    ("neck", "BN, bias frozen at 0, held in meta steps", "BN, bias frozen at 0, held in meta steps", ""),
    ("classifier", "linear, no bias, N(0, 0.001^2)", "linear, no bias, N(0, 0.001^2)", ""),
    ("base loss", "label-smoothed CE + batch-hard triplet, weights 1", "same", ""),
    ("meta-train loss", "shuffle (soft margin) + triplet + scatter (cosine), weights 1", "same", ""),
    ("meta-test loss", "batch-hard triplet", "same", ""),
    ("base sampler", "NaiveIdentitySampler", "RandomIdentitySampler (same draws)", ""),
    ("meta sampler", "DomainSuffleSampler", "DomainBalancedSampler (same layout)", ""),
    ("main optimizer", "SGD, weight decay on all weights incl. norm affines", "same", ""),
    ("rho optimizer", "SGD, momentum 0, weight decay 0, constant lr", "same", ""),
    ("lr schedule", "linear warm-up, multi-step", "same", ""),
    ("running statistics", "general in base steps, hold in meta steps", "same, every norm layer", ""),
    (
        "AMP in meta steps",
        "inner gradient at loss scale 1 in fp16, no overflow check",
        "scaled, unscaled, overflow skipped",
        "same maths; ours keeps small fp16 gradients and skips overflowing steps",
    ),
    ("num_batches_tracked", "stays 0", "counts base steps", "never read: momentum is fixed at 0.1"),
    (
        "small test-set splits",
        "their split files",
        "their split files when present, else seeded ones under their own names (results say which)",
        "put their files next to the data to compare numbers exactly",
    ),
]


def _fmt(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) if value else "(none)"
    if value is None:
        return "None"
    return str(value)


def preset_rows(preset: str) -> list[tuple[str, str, str, str, str]]:
    """``(key, authors' key, authors' value, ours, status)`` for every ``TrainConfig`` field.

    ``status`` is ``"same"``, ``"n/a: <why>"``, ``"differs: <why>"`` or ``"differs"`` (no reason
    recorded: the test suite rejects that).

    Args:
        preset: The preset's name, a key of ``PAPER_PRESETS``.

    Returns:
        One row per ``TrainConfig`` field, in field order.

    Examples:
        >>> from metabin_layers.reid.presets import preset_rows
        >>> preset_rows("duke-to-market")[0]
        ('data_root', '-', '-', 'None', 'n/a: where the datasets are (theirs: an environment variable)')
        >>> [row for row in preset_rows("duke-to-market") if row[0] == "rho_lr_factor"]
        [('rho_lr_factor', 'META.SOLVER.LR_FACTOR.GATE', '50.0', '50.0', 'same')]
    """
    cfg = PAPER_PRESETS[preset]
    rows = []
    for f in dataclasses.fields(TrainConfig):
        ours = getattr(cfg, f.name)
        setting = AUTHORS_SETTINGS.get(f.name)
        if setting is None:
            why = NOT_IN_AUTHORS_CONFIGS.get(f.name, "not in the authors' configs")
            rows.append((f.name, "-", "-", _fmt(ours), f"n/a: {why}"))
            continue
        theirs = setting.value_for(preset)
        if theirs == ours:
            status = "same"
        else:
            status = f"differs: {setting.note}" if setting.note else "differs"
        rows.append((f.name, setting.key, _fmt(theirs), _fmt(ours), status))
    return rows


_INTRO = """# Reproducing the paper: our presets against the authors' configs

Generated by `python -m metabin_layers.reid.presets > docs/reproducibility.md` from
`metabin_layers/reid/presets.py` (`PAPER_PRESETS`, `AUTHORS_SETTINGS`); a test checks that this
page equals what the presets produce. One row per recipe config key; "authors" is the key and the
value in their `configs/Base-DG.yml` and `configs/Sample/{DG,M,D}-resnet.yml` (their `defaults.py`
where a YAML file does not set it). Run a preset with

```bash
metabin-reid train --preset market-to-duke --data-root datasets --set pretrained=weights/resnet50_imagenet.pth
```

Library default vs presets: `in_affine_init` defaults to `copy` (the IN affine starts as a copy of
the pretrained BN affine, so a small step of rho changes the function smoothly); the presets use
the authors' `identity` (1 / 0). `eval_invalid_as_zero` defaults to False (mAP / mINP over valid
queries, as torchreid and fast-reid's Python evaluator); the presets average over all queries with
an unmatched query counting 0, as the authors' Cython evaluator that produced their tables
(`results.json` records which: `map_averaging`). In the four DG test sets and in Market / Duke
every query has a match, so the two agree there.
"""


def _table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def reproducibility_markdown() -> str:
    """The page ``docs/reproducibility.md``: one table per preset, then what the code fixes.

    Returns:
        The page's Markdown text.

    Examples:
        >>> from metabin_layers.reid.presets import reproducibility_markdown
        >>> page = reproducibility_markdown()
        >>> page.splitlines()[0]
        "# Reproducing the paper: our presets against the authors' configs"
        >>> page.count("| `rho_lr_factor` |")
        4
    """
    parts = [_INTRO]
    for name in PAPER_PRESETS:
        rows = [(f"`{r[0]}`", f"`{r[1]}`" if r[1] != "-" else "-", *r[2:]) for r in preset_rows(name)]
        parts.append(f"## {_TITLES[name]}: `--preset {name}`\n\n" + _table(rows, ("key", "authors' key", "authors", "ours", "")))
    fixed = [(a, b, c, f"differs: {d}" if d else "same") for a, b, c, d in FIXED_IN_CODE]
    parts.append("## Fixed by the recipe's code (every preset)\n\n" + _table(fixed, ("setting", "authors", "ours", "")))
    return "\n\n".join(parts) + "\n"


def _main() -> int:
    print(reproducibility_markdown(), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
