"""The data protocols of the paper on fake folders: which images a run trains on (combine_all per
source), where the test splits come from (the authors' files or generated ones, reported in
results.json and the table), and every folder layout the authors distribute."""

from __future__ import annotations

import json
import os
import random
import re
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
from scipy.io import savemat
from test_reid_datasets import (
    DUKE_GALLERY,
    DUKE_QUERY,
    DUKE_TRAIN,
    MARKET_GALLERY,
    MARKET_QUERY,
    MARKET_TRAIN,
    make_cuhk02,
    make_duke,
    make_grid,
    make_ilids,
    make_market,
    make_msmt,
    make_prid,
    make_viper,
    names,
    touch,
)

from metabin_layers.reid.config import TrainConfig, load_config, parse_overrides
from metabin_layers.reid.data import SplitProvenanceWarning, build_data
from metabin_layers.reid.datasets import GRID, PRID, VIPeR, build_dataset, iLIDS
from metabin_layers.reid.report import results_table, write_results

MARKET_DIR, DUKE_DIR = "Market-1501-v15.09.15", "DukeMTMC-reID"

# ---------------------------------------------------------------------------------------------
# combine_all per source


def test_combine_all_follows_the_authors_configs_and_accepts_overrides(tmp_path: Path) -> None:
    # Base-DG.yml (DG_* sources): on; M-resnet.yml / D-resnet.yml / supervised: COMBINEALL False
    assert TrainConfig().combine_all == [True] * 5
    assert TrainConfig(sources=["market1501"]).combine_all == [False]
    assert TrainConfig(sources=["dukemtmcreid"], combine_all=[True]).combine_all == [True]
    two = {"data_root": "/d", "sources": "market1501,dukemtmcreid"}
    assert load_config(overrides={**two, "combine_all": "false"}).combine_all == [False, False]
    assert load_config(overrides={**two, "combine_all": "true,false"}).combine_all == [True, False]
    assert parse_overrides(["combine_all=on,off,1"]) == {"combine_all": [True, False, True]}
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("data_root: /d\nsources: [market1501, cuhk02, cuhksysu]\ncombine_all: [true, false, true]\n")
    assert load_config(yaml_file).combine_all == [True, False, True]
    yaml_file.write_text("data_root: /d\nsources: [market1501, cuhk02]\ncombine_all: false\n")
    assert load_config(yaml_file).combine_all == [False, False]
    with pytest.raises(ValueError, match=r"combine_all has 3 values for 2 sources"):
        load_config(overrides={**two, "combine_all": "true,false,true"})
    with pytest.raises(ValueError, match="combine_all expects a boolean, got 'maybe'"):
        parse_overrides(["combine_all=maybe"])
    with pytest.raises(ValueError, match="combine_all must be booleans"):
        TrainConfig(combine_all=["yes"])  # type: ignore[list-item]
    assert json.loads(json.dumps(TrainConfig(sources=["market1501"]).to_dict()))["combine_all"] == [False]


def _image_files(folder: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.endswith(".jpg"))


def _pid(name: str) -> int:
    return int(name.split("_")[0])


@pytest.mark.parametrize("source,target", [("market1501", "dukemtmcreid"), ("dukemtmcreid", "market1501")])
def test_single_source_training_set_is_the_train_split(tmp_path: Path, source: str, target: str) -> None:
    make_market(tmp_path / MARKET_DIR)
    make_duke(tmp_path / DUKE_DIR)
    cfg = load_config(overrides={"data_root": str(tmp_path), "sources": source, "targets": target, "cameras_as_domains": "true"})
    assert cfg.combine_all == [False]
    data = build_data(cfg)
    folder = tmp_path / (MARKET_DIR if source == "market1501" else DUKE_DIR)
    expected = _image_files(folder / "bounding_box_train")  # the files on disk, not the parser
    assert expected == sorted(MARKET_TRAIN if source == "market1501" else DUKE_TRAIN)
    assert sorted(names(data.train_items)) == expected
    assert data.num_classes == len({_pid(n) for n in expected})
    assert data.num_domains == len({n.split("_")[1][:2] for n in expected})  # cameras as domains
    query, gallery = (MARKET_QUERY, MARKET_GALLERY) if target == "market1501" else (DUKE_QUERY, DUKE_GALLERY)
    split = data.targets[target][0]
    assert sorted(names(split.query.items)) == sorted(query)
    assert sorted(names(split.gallery.items)) == sorted(n for n in gallery if _pid(n) != -1)
    assert data.test_splits[target] == {"authors_split_files": None, "origin": "fixed", "files": []}


def test_multi_source_training_set_is_every_image_of_every_source(tmp_path: Path) -> None:
    make_market(tmp_path / MARKET_DIR)
    make_duke(tmp_path / DUKE_DIR)
    cfg = load_config(overrides={"data_root": str(tmp_path), "sources": "market1501,dukemtmcreid", "targets": "market1501"})
    assert cfg.combine_all == [True, True]
    # Market drops junk (-1) and distractors (0), Duke junk only: counted from the file names
    market = [n for n in MARKET_TRAIN + MARKET_QUERY + MARKET_GALLERY if _pid(n) > 0]
    duke = [n for n in DUKE_TRAIN + DUKE_QUERY + DUKE_GALLERY if _pid(n) >= 0]
    with pytest.raises(ValueError, match=r"target 'market1501' is also a source with combine_all on"):
        build_data(cfg)
    cfg.targets = ["dukemtmcreid"]
    cfg.sources, cfg.combine_all = ["dukemtmcreid", "market1501"], [False, True]  # supervised Duke + all of Market
    data = build_data(cfg)
    assert sorted(names(data.train_items)) == sorted(DUKE_TRAIN + market)
    cfg.sources, cfg.combine_all, cfg.targets = ["market1501", "dukemtmcreid"], [True, True], []
    data = build_data(cfg)
    assert sorted(names(data.train_items)) == sorted(market + duke)
    assert data.num_domains == 2
    assert data.num_classes == len({_pid(n) for n in market}) + len({_pid(n) for n in duke}) == 5 + 4


def test_supervised_protocol_trains_on_the_train_split_and_tests_on_query_gallery(tmp_path: Path) -> None:
    make_market(tmp_path / MARKET_DIR)
    cfg = load_config(overrides={"data_root": str(tmp_path), "sources": "market1501", "targets": "market1501"})
    data = build_data(cfg)
    train = set(names(data.train_items))
    test = names(data.targets["market1501"][0].query.items) + names(data.targets["market1501"][0].gallery.items)
    assert train == set(MARKET_TRAIN) and train.isdisjoint(test)


# ---------------------------------------------------------------------------------------------
# split provenance: the authors' files, or generated ones under names of their own

SMALL_TEST_SETS = {
    # target: (MetaBIN data folder, maker, the authors' split file or folder, generated file)
    "grid": ("GRID", make_grid, "GRID/splits.json", "GRID/splits_generated_seed0.json"),
    "viper": ("viper", make_viper, "viper/split_1a", "viper/splits_generated_seed0.json"),
    "prid": (
        "prid_2011/single_shot",
        make_prid,
        "prid_2011/splits_single_shot.json",
        "prid_2011/splits_single_shot_generated_seed0.json",
    ),
    "ilids": ("QMUL-iLIDS/images", make_ilids, "QMUL-iLIDS/splits.json", "QMUL-iLIDS/splits_generated_seed0.json"),
}


def _split_cfg(root: Path) -> TrainConfig:
    make_market(root / MARKET_DIR)
    return load_config(
        overrides={"data_root": str(root), "sources": "market1501", "targets": "grid,viper,prid,ilids", "num_splits": 3}
    )


def test_generated_splits_are_reported_and_warned_about_once(tmp_path: Path) -> None:
    for sub, make, _, _ in SMALL_TEST_SETS.values():
        make(tmp_path / sub, small=True)
    with pytest.warns(SplitProvenanceWarning) as caught:
        data = build_data(_split_cfg(tmp_path))
    provenance_warnings = [w for w in caught if issubclass(w.category, SplitProvenanceWarning)]
    assert len(provenance_warnings) == 1  # one warning for the run, not one per test set or split
    message = str(provenance_warnings[0].message)
    assert "NOT COMPARABLE TO THE PAPER" in message and all(f"  {n}: generated" in message for n in SMALL_TEST_SETS)
    for name, (_, _, authors, generated) in SMALL_TEST_SETS.items():
        assert data.test_splits[name] == {
            "authors_split_files": False,
            "origin": "generated",
            "files": [str(tmp_path / generated)],
        }
        assert not (tmp_path / authors).exists()  # the authors' names stay free
        assert len(data.targets[name]) == 3


def _write_authors_splits(root: Path) -> None:
    """Split files in the authors' formats, written the way their loaders write them."""
    rng = random.Random(7)
    grid_ids = list(range(1, 21))
    grid = []
    for _ in range(10):
        train = sorted(rng.sample(grid_ids, 10))
        items = [[f"/their/machine/GRID/probe/{i:04d}_{i % 8 + 1}_{10000 + i}_1_1_1.jpeg", k, i % 8] for k, i in enumerate(train)]
        grid.append({"train": items, "query": [], "gallery": [], "num_train_pids": 125, "num_query_pids": 125})
    (root / "GRID" / "splits.json").write_text(json.dumps(grid, indent=4))
    prid = []
    for _ in range(10):
        train = sorted(rng.sample(range(1, 21), 10))
        prid.append({"train": train, "test": [i for i in range(1, 21) if i not in train]})
    (root / "prid_2011" / "splits_single_shot.json").write_text(json.dumps(prid))
    images = sorted(os.listdir(root / "QMUL-iLIDS" / "images"))
    ilids = []
    for _ in range(10):
        test_ids = rng.sample(range(1, 21), 10)
        ilids.append(
            {
                "train": [n for n in images if int(n[:4]) not in test_ids],
                "query": [f"{i:04d}001.jpg" for i in test_ids],
                "gallery": [f"{i:04d}002.jpg" for i in test_ids],
            }
        )
    (root / "QMUL-iLIDS" / "splits.json").write_text(json.dumps(ilids))
    make_viper_split_folders(root / "viper", num_ids=20)


def make_viper_split_folders(folder: Path, num_ids: int = 632, variants: str = "a") -> list[int]:
    """The authors' VIPeR test data: ``split_<k><v>/{train,query,gallery}`` only (their
    ``make_split.m``: ids halved per split; "a" = query cam 1, gallery cam 2 of the test half)."""
    ids = sorted(random.Random(5).sample(range(874), num_ids))
    for k in range(1, 11):
        order = random.Random(k).sample(ids, len(ids))
        half1, half2 = order[: len(ids) // 2], order[len(ids) // 2 :]
        for v in variants:
            train_half, test_half = (half1, half2) if v in "ac" else (half2, half1)
            q_cam, g_cam = (1, 2) if v in "ab" else (2, 1)
            base = folder / f"split_{k}{v}"
            touch(base / "train", [f"p{i:03d}_c{c}_d{(i * 45 * c) % 180:03d}.png" for i in train_half for c in (1, 2)])
            touch(base / "query", [f"p{i:03d}_c{q_cam}_d{(i * 45 * q_cam) % 180:03d}.png" for i in test_half])
            touch(base / "gallery", [f"p{i:03d}_c{g_cam}_d{(i * 45 * g_cam) % 180:03d}.png" for i in test_half])
    return ids


def test_authors_split_files_win_and_silence_the_warning(tmp_path: Path) -> None:
    for sub, make, _, _ in SMALL_TEST_SETS.values():
        make(tmp_path / sub, small=True)
    with pytest.warns(SplitProvenanceWarning):
        build_data(_split_cfg(tmp_path))  # generated files exist now
    _write_authors_splits(tmp_path)  # a later download of the authors' files: no overwrite needed
    with warnings.catch_warnings():
        warnings.simplefilter("error", SplitProvenanceWarning)
        data = build_data(_split_cfg(tmp_path))
    for name in SMALL_TEST_SETS:
        assert data.test_splits[name]["authors_split_files"] is True and data.test_splits[name]["origin"] == "authors"
    assert data.test_splits["viper"]["files"] == [str(tmp_path / "viper" / f"split_{k}a") for k in (1, 2, 3)]
    # the splits are the authors': split 1 of PRID tests the ids their file lists
    prid = json.loads((tmp_path / "prid_2011" / "splits_single_shot.json").read_text())
    assert {it.pid for it in data.targets["prid"][1].query.items} == set(prid[1]["test"])
    ilids = json.loads((tmp_path / "QMUL-iLIDS" / "splits.json").read_text())
    assert names(data.targets["ilids"][2].gallery.items) == ilids[2]["gallery"]


def test_legacy_generated_file_under_the_authors_name_is_not_taken_for_theirs(tmp_path: Path) -> None:
    make_prid(tmp_path / "prid_2011" / "single_shot", small=True)
    legacy = [{"train": list(range(1, 11)), "test": list(range(11, 21)), "seed": 0}] * 10
    (tmp_path / "prid_2011" / "splits_single_shot.json").write_text(json.dumps(legacy))
    ds = PRID(tmp_path, split_id=0)
    assert ds.split_origin == "generated" and not ds.uses_authors_splits
    assert {it.pid for it in ds.query} == set(range(11, 21))
    with pytest.raises(ValueError, match=r"generated with seed \[0\], not 4"):
        PRID(tmp_path, split_id=0, seed=4)


def test_results_table_and_json_say_whether_the_authors_splits_were_used(tmp_path: Path, capsys) -> None:
    metrics = {"rank1": 0.5, "rank5": 0.6, "rank10": 0.7, "mAP": 0.55, "mINP": 0.55, "cmc": [0.5, 0.6]}
    test_splits = {
        "grid": {"authors_split_files": True, "origin": "authors", "files": ["/d/GRID/splits.json"]},
        "prid": {"authors_split_files": False, "origin": "generated", "files": ["/d/x_generated_seed0.json"]},
        "dukemtmcreid": {"authors_split_files": None, "origin": "fixed", "files": []},
    }
    results = {"norm": "metabin", "seed": 1, "iterations": 3, "targets": dict.fromkeys(test_splits, metrics)}
    write_results({**results, "test_splits": test_splits}, tmp_path)
    printed = capsys.readouterr().out
    assert "| target | rank1 | rank5 | rank10 | mAP | mINP | authors' splits |" in printed
    assert "| grid | 50.0 | 60.0 | 70.0 | 55.0 | 55.0 | yes |" in printed
    assert "| prid | 50.0 | 60.0 | 70.0 | 55.0 | 55.0 | NO (generated) |" in printed
    assert "| dukemtmcreid | 50.0 | 60.0 | 70.0 | 55.0 | 55.0 | n/a |" in printed
    assert "NOT COMPARABLE TO THE PAPER: prid not evaluated" in printed
    assert json.loads((tmp_path / "results.json").read_text())["test_splits"] == test_splits
    assert "NO (generated)" in (tmp_path / "results.md").read_text()
    assert "authors' splits" not in results_table(results["targets"])  # without provenance: as before


@pytest.mark.slow
def test_a_real_data_run_records_split_provenance_in_results(tmp_path: Path, capsys) -> None:
    from metabin_layers.reid.cli import main
    from metabin_layers.reid.train import train

    for sub, n_cams in ((MARKET_DIR, 6), (DUKE_DIR, 8)):
        files = [f"{pid:04d}_c{(pid + k) % n_cams + 1}s1_{k:06d}_01.jpg" for pid in range(1, 9) for k in range(4)]
        touch(tmp_path / sub / "bounding_box_train", files[:16])
        touch(tmp_path / sub / "query", files[16:20])
        touch(tmp_path / sub / "bounding_box_test", files[20:])
    make_prid(tmp_path / "prid_2011" / "single_shot", small=True)
    make_viper_split_folders(tmp_path / "viper", num_ids=20)
    run = tmp_path / "run"
    overrides = {
        "data_root": str(tmp_path),
        "sources": "market1501,dukemtmcreid",
        "targets": "prid,viper",
        "backbone": "resnet18",
        "height": 32,
        "width": 16,
        "pad": 2,
        "batch_size": 8,
        "num_instances": 2,
        "meta_batch_size": 8,
        "max_iters": 2,
        "first_inner_loop": 1,
        "iters_per_epoch": 2,
        "warmup_epochs": 0,
        "workers": 0,
        "amp": False,
        "num_splits": 2,
        "device": "cpu",
        "output": str(run),
    }
    with pytest.warns(SplitProvenanceWarning, match="prid: generated"):
        results = train(load_config(overrides=overrides), progress=False)
    expected = {
        "prid": {
            "authors_split_files": False,
            "origin": "generated",
            "files": [str(tmp_path / "prid_2011" / "splits_single_shot_generated_seed0.json")],
        },
        "viper": {
            "authors_split_files": True,
            "origin": "authors",
            "files": [str(tmp_path / "viper" / "split_1a"), str(tmp_path / "viper" / "split_2a")],
        },
    }
    assert results["test_splits"] == expected
    assert json.loads((run / "results.json").read_text())["test_splits"] == expected
    out = capsys.readouterr().out
    assert re.search(r"\| prid \|.*\| NO \(generated\) \|", out) and re.search(r"\| viper \|.*\| yes \|", out)
    with pytest.warns(SplitProvenanceWarning):
        main(["eval", "--checkpoint", str(run / "checkpoint.pt"), "--output", str(tmp_path / "eval")])
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["test_splits"] == expected


# ---------------------------------------------------------------------------------------------
# every layout the authors distribute (their README, section 8, and their test-data download)


def _write_raw_cuhk03(path: Path, persons_per_pair: tuple[int, ...], images: tuple[int, ...]) -> None:
    """``cuhk-03.mat`` (MATLAB v7.3): ``detected[0][pair]`` -> (10, persons) refs -> images."""
    img = np.full((6, 4, 3), 9, dtype=np.uint8)
    with h5py.File(path, "w") as f:
        image = f.create_dataset("image", data=img.T)
        empty = f.create_dataset("empty", data=np.zeros(2, dtype=np.uint64))
        pairs = f.create_dataset("detected", (1, len(persons_per_pair)), dtype=h5py.ref_dtype)
        for k, persons in enumerate(persons_per_pair):
            refs = np.empty((10, persons), dtype=h5py.ref_dtype)
            for n in range(10):
                for p in range(persons):
                    refs[n, p] = image.ref if n in images else empty.ref
            pairs[0, k] = f.create_dataset(f"pair{k}", data=refs).ref


def _write_protocol(path: Path, names_: list[str], test_persons: set[tuple[int, int]]) -> None:
    """``cuhk03_new_protocol_config_<mode>.mat``: train/query/gallery indices over ``filelist``."""
    key = [(int(n.split("_")[0]), int(n.split("_")[1])) for n in names_]
    labels = [sorted(set(key)).index(k) + 1 for k in key]
    test = [i + 1 for i, k in enumerate(key) if k in test_persons]
    query = [i for i in test if names_[i - 1].split("_")[2] == "1" and names_[i - 1].endswith("_01.png")]
    filelist = np.empty((len(names_), 1), dtype=object)
    filelist[:, 0] = names_
    savemat(
        str(path),
        {
            "filelist": filelist,
            "labels": np.array(labels, dtype=np.float64).reshape(-1, 1),
            "train_idx": np.array([i + 1 for i, k in enumerate(key) if k not in test_persons], dtype=np.float64).reshape(-1, 1),
            "query_idx": np.array(query, dtype=np.float64).reshape(-1, 1),
            "gallery_idx": np.array([i for i in test if i not in query], dtype=np.float64).reshape(-1, 1),
        },
    )


def _grid_partitions(path: Path, paired: list[int]) -> list[list[int]]:
    """``features_and_partitions.mat``: 10 ``trainIdxAll`` partitions of 125 ids."""
    lists = [sorted(random.Random(100 + k).sample(paired, len(paired) // 2)) for k in range(10)]
    cell = np.empty((1, 10), dtype=object)
    for k, ids in enumerate(lists):
        cell[0, k] = {"testIdx": np.zeros((1, 1)), "probeIdx": np.zeros((1, 1)), "trainIdx": np.array([ids], dtype=np.float64)}
    savemat(str(path), {"trainIdxAll": cell, "features": np.zeros((3, 3))})
    return lists


def _counts(ds) -> tuple[int, int, int, int]:
    return len(ds.train), ds.num_train_pids, len(ds.query), len(ds.gallery)


def test_authors_layout_market_duke_msmt(tmp_path: Path) -> None:
    make_market(tmp_path / MARKET_DIR)
    touch(tmp_path / MARKET_DIR / "gt_bbox", ["0002_c1s1_000451_03.jpg"])  # in their tree, unused
    touch(tmp_path / MARKET_DIR / "gt_query", ["0003_c1s1_000001_00.jpg"])
    make_duke(tmp_path / DUKE_DIR)
    make_msmt(tmp_path / "MSMT17_V2", "mask_train_v2", "mask_test_v2")
    assert _counts(build_dataset("market1501", tmp_path)) == (5, 3, 2, 3)
    assert _counts(build_dataset("DG_Market1501", tmp_path))[:2] == (9, 5)
    assert _counts(build_dataset("dukemtmcreid", tmp_path)) == (3, 2, 1, 2)
    assert _counts(build_dataset("DG_DukeMTMC", tmp_path))[:2] == (6, 4)
    assert _counts(build_dataset("msmt17", tmp_path)) == (3, 2, 1, 2)


def test_authors_layout_cuhk02_and_cuhk_sysu(tmp_path: Path) -> None:
    make_cuhk02(tmp_path / "cuhk02")  # their cuhk02/P1..P5
    sysu = tmp_path / "CUHK-SYSU"
    touch(sysu / "cropped_image", ["p00001_n01_s00001_hard0.png", "p00001_n02_s00007_hard1.png", "p00002_n01_s00002_hard0.png"])
    touch(sysu / "Image" / "SSM", ["s1.jpg"])  # the scene images next to the crops are not read
    (sysu / "annotation").mkdir()
    assert _counts(build_dataset("DG_CUHK02", tmp_path))[:2] == (20, 10)
    assert _counts(build_dataset("DG_CUHK_SYSU", tmp_path)) == (3, 2, 0, 0)


def test_authors_layout_cuhk03_raw_release_and_protocol_files(tmp_path: Path) -> None:
    # their cuhk03/{cuhk03_release/cuhk-03.mat, cuhk03_new_protocol_config_{detected,labeled}.mat}
    base = tmp_path / "cuhk03"
    (base / "cuhk03_release").mkdir(parents=True)
    _write_raw_cuhk03(base / "cuhk03_release" / "cuhk-03.mat", persons_per_pair=(3, 2), images=(0, 1, 5, 6))
    extracted = [
        f"{pair}_{p:03d}_{1 if n <= 5 else 2}_{n:02d}.png"
        for pair, ps in ((1, 3), (2, 2))
        for p in range(1, ps + 1)
        for n in (1, 2, 6, 7)
    ]
    _write_protocol(base / "cuhk03_new_protocol_config_detected.mat", extracted, test_persons={(2, 1), (2, 2)})
    dg = build_dataset("DG_CUHK03_detected", tmp_path)  # images extracted with h5py on first use
    assert sorted(os.listdir(base / "images_detected")) == sorted(extracted)
    assert _counts(dg)[:2] == (20, 5)
    ds = build_dataset("cuhk03", tmp_path)
    assert ds.used_layout == "mat" and _counts(ds) == (12, 3, 2, 6)


def test_authors_test_download_grid_viper_prid_ilids_full_size(tmp_path: Path) -> None:
    """Their test data (GRID, prid_2011, QMUL-iLIDS, viper) at full size: protocol counts and the
    splits their files fix."""
    make_grid(tmp_path / "GRID")
    partitions = _grid_partitions(tmp_path / "GRID" / "features_and_partitions.mat", list(range(1, 251)))
    make_prid(tmp_path / "prid_2011" / "single_shot")
    touch(tmp_path / "prid_2011" / "multi_shot" / "cam_a" / "person_0001", ["0001.png"])  # unused
    prid_splits = [{"train": sorted(random.Random(k).sample(range(1, 201), 100))} for k in range(10)]
    for s in prid_splits:
        s["test"] = [i for i in range(1, 201) if i not in s["train"]]
    (tmp_path / "prid_2011" / "splits_single_shot.json").write_text(json.dumps(prid_splits))
    make_ilids(tmp_path / "QMUL-iLIDS" / "images")
    viper_ids = make_viper_split_folders(tmp_path / "viper", variants="ab")
    for k in (0, 9):
        grid = GRID(tmp_path, split_id=k)
        assert grid.uses_authors_splits and _counts(grid) == (250, 125, 125, 900)
        assert {it.pid for it in grid.query}.isdisjoint(partitions[k]) and len({it.pid for it in grid.gallery}) == 126
        viper = VIPeR(tmp_path, split_id=k)
        assert viper.uses_authors_splits and viper.split_path == str(tmp_path / "viper" / f"split_{k + 1}a")
        assert _counts(viper) == (632, 316, 316, 316)
        assert {it.camid for it in viper.query} == {0} and {it.camid for it in viper.gallery} == {1}
        q_ids = {it.pid for it in viper.query}
        assert q_ids == {it.pid for it in viper.gallery} and len(q_ids | {int(n[1:4]) for n in names(viper.train)}) == 632
        assert q_ids <= set(viper_ids)
        prid = PRID(tmp_path, split_id=k)
        assert prid.uses_authors_splits and _counts(prid) == (200, 100, 100, 649)
        assert {it.pid for it in prid.query} == set(prid_splits[k]["test"])
    ilids = iLIDS(tmp_path, split_id=0)
    assert ilids.split_origin == "generated" and _counts(ilids) == (236, 59, 60, 60)  # no splits.json shipped here
    assert sorted(p.name for p in (tmp_path / "GRID").iterdir()) == ["features_and_partitions.mat", "gallery", "probe"]


def test_viper_split_folders_alone_errors_name_what_is_missing(tmp_path: Path) -> None:
    make_viper_split_folders(tmp_path / "viper", num_ids=20)
    (tmp_path / "viper" / "split_3a" / "query").rename(tmp_path / "viper" / "split_3a" / "probe")
    with pytest.raises(ValueError, match=r"VIPeR: malformed split folder .*split_3a.*lacks query"):
        VIPeR(tmp_path, split_id=2)
    for name in os.listdir(tmp_path / "viper"):
        if name != "split_1a":
            os.rename(tmp_path / "viper" / name, tmp_path / f"moved_{name}")
    with pytest.raises(ValueError, match=r"no split_2a folder under root .*found split_1a.*expected <root>/viper/split_2a"):
        VIPeR(tmp_path, split_id=1)
    with pytest.raises(FileNotFoundError, match=r"VIPeR: no dataset found .*viper/split_1a/\{train,query,gallery\}"):
        VIPeR(tmp_path / "elsewhere", split_id=0)
    # without the split folders the original cam_a/cam_b images give generated splits
    make_viper(tmp_path / "viper" / "VIPeR", small=True)
    assert VIPeR(tmp_path, split_id=1).split_origin == "generated"
    assert VIPeR(tmp_path, split_id=0).split_origin == "authors"


def test_viper_torchreid_split_file_is_used_but_not_reported_as_the_authors(tmp_path: Path) -> None:
    ids = make_viper(tmp_path / "viper" / "VIPeR", small=True)  # torchreid layout, ids sorted
    train_ids = ids[::2]
    train = [[f"/x/viper/VIPeR/cam_a/{i:03d}_0.bmp", k, 0] for k, i in enumerate(train_ids)]
    (tmp_path / "viper" / "splits.json").write_text(json.dumps([{"train": train, "query": [], "gallery": []}] * 20))
    ds = VIPeR(tmp_path, split_id=4)
    assert ds.split_origin == "torchreid" and not ds.uses_authors_splits
    assert ds.split_path == str(tmp_path / "viper" / "splits.json")
    assert {it.pid for it in ds.query} == set(ids[1::2]) == {it.pid for it in ds.gallery}
    assert not (tmp_path / "viper" / "splits_generated_seed0.json").exists()
