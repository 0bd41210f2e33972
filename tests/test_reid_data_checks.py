"""Data problems are found before the first iteration, each error naming the dataset and its folder."""

from __future__ import annotations

import dataclasses

import pytest
from PIL import Image

from metabin_layers.reid.config import load_config
from metabin_layers.reid.data import build_data
from metabin_layers.reid.errors import DataError
from metabin_layers.reid.train import Trainer


def _market(root, ids=6, query=True):
    """A Market-1501-style folder: ``ids`` identities x 2 cameras in train; query and gallery."""
    base = root / "Market-1501-v15.09.15"
    for sub in ("bounding_box_train", "query", "bounding_box_test"):
        (base / sub).mkdir(parents=True)
    img = Image.new("RGB", (16, 32), (120, 60, 30))
    for pid in range(1, ids + 1):
        for cam in (1, 2):
            img.save(base / "bounding_box_train" / f"{pid:04d}_c{cam}s1_000{cam}01_00.jpg")
    for pid in (101, 102):
        img.save(base / "bounding_box_test" / f"{pid:04d}_c2s1_000101_00.jpg")
        if query:
            img.save(base / "query" / f"{pid:04d}_c1s1_000101_00.jpg")
    return base


def _real_config(tmp_path, **kw):
    overrides = {
        "data_root": str(tmp_path),
        "sources": ["market1501"],
        "targets": ["market1501"],
        "norm": "bn",
        "backbone": "resnet10t",
        "height": 32,
        "width": 16,
        "batch_size": 8,
        "num_instances": 2,
        "workers": 0,
        "output": str(tmp_path / "run"),
        "max_iters": 1,
    }
    overrides.update(kw)
    return load_config(overrides=overrides)


def _no_training(monkeypatch):
    def never(self, *args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(Trainer, "run", never)


def test_an_empty_query_folder_is_found_before_training(tmp_path, monkeypatch):
    base = _market(tmp_path, query=False)
    _no_training(monkeypatch)
    with pytest.raises(DataError, match=rf"target market1501 \(folder {base}\): the query set is empty"):
        Trainer(_real_config(tmp_path))


def test_a_source_without_enough_identities_for_p_x_k_is_found_before_training(tmp_path, monkeypatch):
    base = _market(tmp_path, ids=3)
    _no_training(monkeypatch)
    with pytest.raises(DataError, match=rf"3 identities, fewer than P = .* = 8 \(market1501 \(folder {base}\): 3\)"):
        # P = 8; a single source trains on its train split (combine_all off): 3 identities
        Trainer(_real_config(tmp_path, batch_size=16))


def _synthetic(tmp_path, **kw):
    overrides = {"output": str(tmp_path / "run"), "syn_train_ids": 16, "syn_test_ids": 6, "syn_images_per_id": 4}
    overrides.update(kw)
    cfg = load_config(overrides=overrides, quick=True)
    return cfg, build_data(cfg)


def test_a_domain_too_small_for_the_meta_batch_is_found_before_training(tmp_path, monkeypatch):
    cfg, data = _synthetic(tmp_path, meta_batch_size=32)  # 32 / (4 domains x 4) = 2 identities per domain
    keep = sorted({it[1] for it in data.train_items if it[3] == 2})[:1]
    items = [it for it in data.train_items if it[3] != 2 or it[1] in keep]  # domain 2: one identity left
    data = dataclasses.replace(data, train_items=items)
    _no_training(monkeypatch)
    with pytest.raises(DataError, match="source domain 2 of synthetic data: 1 identities, fewer than the 2 per domain"):
        Trainer(cfg, data=data)


def test_an_empty_gallery_split_is_named(tmp_path):
    cfg, data = _synthetic(tmp_path)
    split = data.targets["style4"][0]
    data = dataclasses.replace(data, targets={"style4": [split, dataclasses.replace(split, gallery=[])]})
    with pytest.raises(DataError, match=r"target style4 \(synthetic data\), split 1: the gallery set is empty"):
        Trainer(cfg, data=data)
