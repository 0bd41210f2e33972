"""Build the training set and the evaluation targets of a recipe run, real or synthetic."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from torch.utils.data import Dataset

from .config import TrainConfig
from .datasets import ImageDataset, build_dataset, cameras_as_domains, combine_sources
from .synthetic import SyntheticReID, SyntheticReIDDataset
from .transforms import build_test_transform, build_train_transform

__all__ = ["TargetSplit", "RecipeData", "build_data"]


@dataclass
class TargetSplit:
    """One query/gallery evaluation set (one random split of a small test set, or a held-out style)."""

    query: Dataset
    gallery: Dataset


@dataclass
class RecipeData:
    train_items: Sequence[Sequence[Any]]
    train_set: Dataset
    num_classes: int
    num_domains: int
    targets: dict[str, list[TargetSplit]]
    description: str


def _synthetic(cfg: TrainConfig, train_tf: Callable, test_tf: Callable) -> RecipeData:
    syn = SyntheticReID(
        num_train_ids=cfg.syn_train_ids,
        num_test_ids=cfg.syn_test_ids,
        num_styles=cfg.syn_styles,
        held_out_styles=tuple(cfg.syn_held_out),
        images_per_id_per_style=cfg.syn_images_per_id,
        height=cfg.height,
        width=cfg.width,
        seed=cfg.seed,
        num_distractor_ids=cfg.syn_distractor_ids,
    )
    targets = {
        f"style{s}": [
            TargetSplit(SyntheticReIDDataset(syn, syn.query[s], test_tf), SyntheticReIDDataset(syn, syn.gallery[s], test_tf))
        ]
        for s in syn.held_out_styles
    }
    return RecipeData(
        syn.train, SyntheticReIDDataset(syn, syn.train, train_tf), syn.num_train_pids, syn.num_domains, targets, repr(syn)
    )


def _real(cfg: TrainConfig, train_tf: Callable, test_tf: Callable) -> RecipeData:
    assert cfg.data_root is not None
    # Multi-source DG uses every image of a source (train + query + gallery), one domain each; a
    # source that is also a target trains on its train split only (its query/gallery are the test).
    sources = [build_dataset(name, cfg.data_root, combine_all=name not in cfg.targets) for name in cfg.sources]
    train = combine_sources(sources)
    items = train.train
    if cfg.cameras_as_domains:
        items = cameras_as_domains(items)
    num_domains = len({it[3] for it in items})
    targets: dict[str, list[TargetSplit]] = {}
    for name in cfg.targets:
        probe = build_dataset(name, cfg.data_root)
        splits = cfg.num_splits if hasattr(probe, "num_splits") else 1
        sets = [probe] + [build_dataset(name, cfg.data_root, split_id=i) for i in range(1, splits)]
        targets[name] = [TargetSplit(ImageDataset(d.query, test_tf), ImageDataset(d.gallery, test_tf)) for d in sets]
    return RecipeData(items, ImageDataset(items, train_tf), train.num_train_pids, num_domains, targets, train.summary())


def build_data(cfg: TrainConfig) -> RecipeData:
    """The training set (with the paper's transforms) and every evaluation target of ``cfg``."""
    train_tf = build_train_transform(cfg.height, cfg.width, flip=cfg.flip, pad=cfg.pad, color_jitter=cfg.color_jitter)
    test_tf = build_test_transform(cfg.height, cfg.width)
    return _synthetic(cfg, train_tf, test_tf) if cfg.data_root is None else _real(cfg, train_tf, test_tf)
