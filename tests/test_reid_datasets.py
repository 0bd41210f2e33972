"""Tests of metabin_layers.reid.datasets on tiny fake folders in the real layouts."""

from __future__ import annotations

import io
import json
import os
import random
import re
import sys
from collections.abc import Iterable
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat
from torch.utils.data import DataLoader

from metabin_layers.reid.datasets import (
    CUHK02,
    CUHK03,
    CUHKSYSU,
    DATASETS,
    GRID,
    MSMT17,
    PRID,
    DukeMTMCreID,
    ImageDataset,
    Market1501,
    MultiSourceDataset,
    ReIDItem,
    SplitReIDDataset,
    UnreadableImageError,
    VIPeR,
    build_dataset,
    cameras_as_domains,
    combine_sources,
    iLIDS,
    register_dataset,
)
from metabin_layers.reid.datasets import cuhk03 as cuhk03_module

# ---------------------------------------------------------------------------------------------
# helpers

_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP"}
_BYTES: dict[str, bytes] = {}


def _image_bytes(ext: str) -> bytes:
    """An 8x4 RGB image encoded for ``ext`` (generated once, then copied)."""
    if ext not in _BYTES:
        buf = io.BytesIO()
        Image.new("RGB", (8, 4), (120, 30, 200)).save(buf, _FORMATS[ext])
        _BYTES[ext] = buf.getvalue()
    return _BYTES[ext]


def touch(folder: Path, names: Iterable[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(_image_bytes(os.path.splitext(name)[1].lower()))


def by_name(items: Iterable[ReIDItem]) -> dict[str, ReIDItem]:
    return {os.path.basename(it.img_path): it for it in items}


def names(items: Iterable[ReIDItem]) -> list[str]:
    return [os.path.basename(it.img_path) for it in items]


# ---------------------------------------------------------------------------------------------
# Market-1501 / DukeMTMC-reID

MARKET_TRAIN = [
    "0002_c1s1_000451_03.jpg",
    "0002_c2s1_000301_01.jpg",
    "0007_c3s3_000001_01.jpg",
    "0010_c6s1_000001_01.jpg",
    "0010_c1s1_000002_01.jpg",
]
MARKET_QUERY = ["0003_c1s1_000001_00.jpg", "0005_c2s1_000001_00.jpg"]
MARKET_GALLERY = [
    "0003_c4s1_000001_01.jpg",
    "0005_c5s1_000001_01.jpg",
    "0000_c1s1_000001_01.jpg",  # distractor
    "-1_c2s1_000001_01.jpg",  # junk
]


def make_market(folder: Path) -> Path:
    touch(folder / "bounding_box_train", MARKET_TRAIN)
    touch(folder / "query", MARKET_QUERY)
    touch(folder / "bounding_box_test", MARKET_GALLERY)
    (folder / "bounding_box_train" / "Thumbs.db").write_bytes(b"not an image")
    return folder


@pytest.mark.parametrize("sub", ["Market-1501-v15.09.15", "market1501/Market-1501-v15.09.15", "market1501", ""])
def test_market_layouts_counts_relabel_and_junk(tmp_path: Path, sub: str) -> None:
    make_market(tmp_path / sub if sub else tmp_path)
    ds = Market1501(tmp_path)
    assert ds.dataset_dir == str(tmp_path / sub if sub else tmp_path)
    assert len(ds.train) == 5 and len(ds.query) == 2 and len(ds.gallery) == 3
    train = by_name(ds.train)
    # raw ids 2, 7, 10 -> 0, 1, 2 (sorted), camids 0-based
    assert train["0002_c1s1_000451_03.jpg"] == ReIDItem(train["0002_c1s1_000451_03.jpg"].img_path, 0, 0, 0)
    assert train["0002_c2s1_000301_01.jpg"].pid == 0 and train["0002_c2s1_000301_01.jpg"].camid == 1
    assert train["0007_c3s3_000001_01.jpg"].pid == 1 and train["0007_c3s3_000001_01.jpg"].camid == 2
    assert train["0010_c6s1_000001_01.jpg"].pid == 2 and train["0010_c6s1_000001_01.jpg"].camid == 5
    assert ds.num_train_pids == 3 and ds.num_train_cams == 4
    # deterministic, sorted listing; Thumbs.db ignored
    assert names(ds.train) == sorted(MARKET_TRAIN)
    # query/gallery keep raw ids; junk -1 dropped, distractor 0 kept
    assert [(it.pid, it.camid) for it in ds.query] == [(3, 0), (5, 1)]
    assert sorted(it.pid for it in ds.gallery) == [0, 3, 5]
    assert "-1_c2s1_000001_01.jpg" not in names(ds.gallery)
    assert {it.domain for it in ds.train + ds.query + ds.gallery} == {0}


def test_market_domain_and_combine_all(tmp_path: Path) -> None:
    make_market(tmp_path / "Market-1501-v15.09.15")
    ds = Market1501(tmp_path, combine_all=True, domain=3)
    assert {it.domain for it in ds.train + ds.query + ds.gallery} == {3}
    # 5 train + 2 query + 2 gallery (distractor 0 and junk -1 dropped)
    assert len(ds.train) == 9
    train = by_name(ds.train)
    assert "0000_c1s1_000001_01.jpg" not in train
    # test ids follow the training ones: raw 3 -> 3, raw 5 -> 4
    assert train["0003_c1s1_000001_00.jpg"].pid == 3 == train["0003_c4s1_000001_01.jpg"].pid
    assert train["0005_c2s1_000001_00.jpg"].pid == 4 == train["0005_c5s1_000001_01.jpg"].pid
    assert ds.num_train_pids == 5
    assert len(ds.query) == 2 and len(ds.gallery) == 3  # unchanged (torchreid combineall)


def test_market_missing_folder_error_names_dataset_root_and_layout(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as exc:
        Market1501(tmp_path)
    msg = str(exc.value)
    assert "Market1501" in msg and str(tmp_path) in msg
    assert "<root>/Market-1501-v15.09.15/{bounding_box_train,query,bounding_box_test}" in msg


def test_market_malformed_layout_names_missing_subfolder(tmp_path: Path) -> None:
    base = tmp_path / "Market-1501-v15.09.15"
    touch(base / "bounding_box_train", MARKET_TRAIN)
    touch(base / "bounding_box_test", MARKET_GALLERY)
    with pytest.raises(ValueError) as exc:
        Market1501(tmp_path)
    msg = str(exc.value)
    assert "Market1501" in msg and str(tmp_path) in msg and "lacks query" in msg


def test_market_bad_file_name_is_reported(tmp_path: Path) -> None:
    make_market(tmp_path / "Market-1501-v15.09.15")
    touch(tmp_path / "Market-1501-v15.09.15" / "query", ["holiday.jpg"])
    with pytest.raises(ValueError, match="holiday.jpg"):
        Market1501(tmp_path)


DUKE_TRAIN = ["0001_c2_f0046182.jpg", "0001_c8_f0046500.jpg", "0005_c1_f0000001.jpg"]
DUKE_QUERY = ["0011_c1_f0000001.jpg"]
DUKE_GALLERY = ["0011_c7_f0000001.jpg", "0013_c3_f0000001.jpg"]


def make_duke(folder: Path) -> Path:
    touch(folder / "bounding_box_train", DUKE_TRAIN)
    touch(folder / "query", DUKE_QUERY)
    touch(folder / "bounding_box_test", DUKE_GALLERY)
    return folder


@pytest.mark.parametrize("sub", ["DukeMTMC-reID", "dukemtmc-reid/DukeMTMC-reID"])
def test_duke(tmp_path: Path, sub: str) -> None:
    make_duke(tmp_path / sub)
    ds = DukeMTMCreID(tmp_path, domain=1)
    assert [(it.pid, it.camid, it.domain) for it in ds.train] == [(0, 1, 1), (0, 7, 1), (1, 0, 1)]
    assert [(it.pid, it.camid) for it in ds.gallery] == [(11, 6), (13, 2)]
    assert ds.num_query_pids == 1 and ds.num_gallery_pids == 2


def test_duke_missing_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"DukeMTMCreID.*DukeMTMC-reID/\{bounding_box_train"):
        DukeMTMCreID(tmp_path)


# ---------------------------------------------------------------------------------------------
# CUHK03


def _cuhk03_names() -> list[str]:
    """2 pairs x 2 persons x (2 images in view 1 + 2 in view 2), torchreid names."""
    return [f"{pair}_{person:03d}_{1 if n <= 5 else 2}_{n:02d}.png" for pair in (1, 2) for person in (1, 2) for n in (1, 2, 6, 7)]


def _write_new_protocol(path: Path, names: list[str]) -> None:
    labels = [2 * (int(n.split("_")[0]) - 1) + int(n.split("_")[1]) for n in names]  # ids 1..4
    train_idx = [i + 1 for i, lab in enumerate(labels) if lab in (1, 2)]
    test = [i + 1 for i, lab in enumerate(labels) if lab in (3, 4)]
    query_idx = [i for i in test if names[i - 1].endswith("_1_01.png")]
    gallery_idx = [i for i in test if i not in query_idx]
    filelist = np.empty((len(names), 1), dtype=object)
    for i, n in enumerate(names):
        filelist[i, 0] = n
    savemat(
        str(path),
        {
            "filelist": filelist,
            "labels": np.array(labels, dtype=np.float64).reshape(-1, 1),
            "train_idx": np.array(train_idx, dtype=np.float64).reshape(-1, 1),
            "query_idx": np.array(query_idx, dtype=np.float64).reshape(-1, 1),
            "gallery_idx": np.array(gallery_idx, dtype=np.float64).reshape(-1, 1),
        },
    )


def test_cuhk03_new_protocol_mat_layout(tmp_path: Path) -> None:
    names = _cuhk03_names()
    touch(tmp_path / "cuhk03" / "images_detected", names)
    _write_new_protocol(tmp_path / "cuhk03" / "cuhk03_new_protocol_config_detected.mat", names)
    ds = CUHK03(tmp_path)
    assert ds.used_layout == "mat" and ds.dataset_dir.endswith("images_detected")
    assert len(ds.train) == 8 and len(ds.query) == 2 and len(ds.gallery) == 6
    train = by_name(ds.train)
    assert {train["1_001_1_01.png"].pid, train["1_002_2_06.png"].pid} == {0, 1}  # labels 1, 2 relabelled
    assert train["1_001_1_01.png"].pid == 0 and train["1_002_1_01.png"].pid == 1
    assert train["1_001_1_01.png"].camid == 0 and train["1_001_2_06.png"].camid == 1  # camid = view - 1
    assert [(it.pid, it.camid) for it in ds.query] == [(3, 0), (4, 0)]
    assert {it.pid for it in ds.gallery} == {3, 4} and {it.camid for it in ds.gallery} == {0, 1}
    everything = CUHK03(tmp_path, combine_all=True)
    assert len(everything.train) == 16 and everything.num_train_pids == 4


def test_cuhk03_mat_layout_reports_missing_images(tmp_path: Path) -> None:
    names = _cuhk03_names()
    touch(tmp_path / "cuhk03" / "images_labeled", names[:-1])
    _write_new_protocol(tmp_path / "cuhk03" / "cuhk03_new_protocol_config_labeled.mat", names)
    with pytest.raises(ValueError, match=r"1 images listed .* missing .*2_002_2_07\.png"):
        CUHK03(tmp_path, labeled=True)


def test_cuhk03_np_folder_layout_labeled_vs_detected(tmp_path: Path) -> None:
    for mode, n_train in (("detected", 3), ("labeled", 2)):
        base = tmp_path / "cuhk03-np" / mode
        touch(base / "bounding_box_train", ["0001_c1_1.png", "0001_c2_2.png", "0002_c1_1.png"][:n_train])
        touch(base / "query", ["0010_c1_1.png"])
        touch(base / "bounding_box_test", ["0010_c2_1.png", "0011_c2_1.png"])
    det = CUHK03(tmp_path)
    lab = build_dataset("cuhk03_labeled", tmp_path)
    assert det.used_layout == "folder" and det.dataset_dir == str(tmp_path / "cuhk03-np" / "detected")
    assert isinstance(lab, CUHK03) and lab.labeled and lab.dataset_dir == str(tmp_path / "cuhk03-np" / "labeled")
    assert [(it.pid, it.camid) for it in det.train] == [(0, 0), (0, 1), (1, 0)]
    assert len(lab.train) == 2
    assert [(it.pid, it.camid) for it in det.gallery] == [(10, 1), (11, 1)]


def test_cuhk03_without_scipy_falls_back_to_folders_or_says_what_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "scipy.io", None)  # import scipy.io -> ImportError
    touch(tmp_path / "cuhk03" / "images_detected", _cuhk03_names())
    (tmp_path / "cuhk03" / "cuhk03_new_protocol_config_detected.mat").write_bytes(b"placeholder")
    with pytest.raises(ImportError, match=r"CUHK03: .*needs scipy.*cuhk03-np/detected"):
        CUHK03(tmp_path)
    with pytest.raises(ImportError, match="needs scipy"):
        CUHK03(tmp_path, layout="mat")
    base = tmp_path / "cuhk03-np" / "detected"
    touch(base / "bounding_box_train", ["0001_c1_1.png"])
    touch(base / "query", ["0010_c1_1.png"])
    touch(base / "bounding_box_test", ["0010_c2_1.png"])
    assert CUHK03(tmp_path).used_layout == "folder"


def test_cuhk03_all_images_for_dg(tmp_path: Path) -> None:
    names = _cuhk03_names()
    touch(tmp_path / "cuhk03" / "images_detected", names)
    ds = build_dataset("DG_CUHK03_detected", tmp_path)
    assert ds.combine_all and isinstance(ds, CUHK03) and ds.used_layout == "images"
    assert len(ds.train) == 16 and ds.query == [] and ds.gallery == []
    train = by_name(ds.train)
    # identity = (pair, person): person 1 of pair 1 and person 1 of pair 2 differ
    assert train["1_001_1_01.png"].pid != train["2_001_1_01.png"].pid
    assert train["1_001_1_01.png"].pid == train["1_001_2_07.png"].pid
    assert ds.num_train_pids == 4 and {it.camid for it in ds.train} == {0, 1}
    # without combine_all there is no protocol for these images: an explicit error
    with pytest.raises(ValueError, match=r"CUHK03: malformed layout under root .*cuhk03_new_protocol_config_detected"):
        CUHK03(tmp_path)


def test_cuhk03_missing_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as exc:
        CUHK03(tmp_path)
    msg = str(exc.value)
    assert "CUHK03" in msg and str(tmp_path) in msg and "cuhk03-np/detected/{bounding_box_train" in msg


def _fake_raw_mat() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """An h5py-like mapping shaped like cuhk-03.mat: 2 pairs, 2 persons, some empty cells."""
    img = np.arange(4 * 8 * 3, dtype=np.uint8).reshape(4, 8, 3)
    mat: dict[str, np.ndarray] = {"img": img.T, "empty": np.zeros(2, dtype=np.uint64)}
    pair_refs = []
    for pair in range(2):
        refs = np.full((2, 10), "empty", dtype=object)  # (persons, 10 images)
        refs[:, [0, 1, 5]] = "img"  # images 1, 2 (view 1) and 6 (view 2)
        mat[f"pair{pair}"] = refs.T  # MATLAB order, transposed back by the reader
        pair_refs.append(f"pair{pair}")
    mat["detected"] = np.array([pair_refs], dtype=object)
    return mat, img


def test_cuhk03_extraction_from_raw_mat_structure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mat, img = _fake_raw_mat()
    out = tmp_path / "images_detected"
    assert cuhk03_module._extract_images(mat, "detected", str(out)) == 12
    written = sorted(os.listdir(out))
    assert written[:3] == ["1_001_1_01.png", "1_001_1_02.png", "1_001_2_06.png"] and len(written) == 12
    assert np.array_equal(np.asarray(Image.open(out / "1_001_1_01.png")), img)
    assert not (tmp_path / "images_detected.partial").exists()

    # the dataset extracts images_<mode> from cuhk03_release/cuhk-03.mat when it is missing
    root = tmp_path / "root"
    (root / "cuhk03" / "cuhk03_release").mkdir(parents=True)
    (root / "cuhk03" / "cuhk03_release" / "cuhk-03.mat").write_bytes(b"placeholder")
    calls: list[str] = []

    def fake_extract(raw: str, mode: str, out_dir: str) -> int:
        calls.append(raw)
        return cuhk03_module._extract_images(mat, mode, out_dir)

    monkeypatch.setattr(cuhk03_module, "extract_cuhk03_images", fake_extract)
    ds = CUHK03(root, combine_all=True)
    assert calls == [str(root / "cuhk03" / "cuhk03_release" / "cuhk-03.mat")]
    assert len(ds.train) == 12 and ds.num_train_pids == 4


def test_cuhk03_extraction_with_h5py(tmp_path: Path) -> None:
    img = np.full((4, 8, 3), 7, dtype=np.uint8)
    path = tmp_path / "cuhk-03.mat"
    with h5py.File(path, "w") as f:
        image = f.create_dataset("image", data=img.T)
        empty = f.create_dataset("empty", data=np.zeros(2, dtype=np.uint64))
        refs = np.empty((10, 1), dtype=h5py.ref_dtype)
        for n in range(10):
            refs[n, 0] = image.ref if n in (0, 5) else empty.ref
        pair = f.create_dataset("pair0", data=refs)
        detected = f.create_dataset("detected", (1, 1), dtype=h5py.ref_dtype)
        detected[0, 0] = pair.ref
    out = tmp_path / "images_detected"
    assert cuhk03_module.extract_cuhk03_images(path, "detected", out) == 2
    assert sorted(os.listdir(out)) == ["1_001_1_01.png", "1_001_2_06.png"]


# ---------------------------------------------------------------------------------------------
# CUHK02, CUHK-SYSU, MSMT17


def make_cuhk02(base: Path) -> None:
    for k in range(1, 6):
        persons = ("001", "002") if k < 5 else ("010", "011")
        for cam in ("cam1", "cam2"):
            touch(base / f"P{k}" / cam, [f"{p}_{1 if cam == 'cam1' else 3}.png" for p in persons])


@pytest.mark.parametrize("sub", ["cuhk02/Dataset", "cuhk02"])
def test_cuhk02(tmp_path: Path, sub: str) -> None:
    make_cuhk02(tmp_path / sub)
    ds = CUHK02(tmp_path)
    assert len(ds.train) == 16 and ds.num_train_pids == 8  # same number in two pairs = two people
    by_pair = {
        (os.path.basename(os.path.dirname(os.path.dirname(it.img_path))), os.path.basename(it.img_path)): it for it in ds.train
    }
    assert by_pair[("P1", "001_1.png")].pid != by_pair[("P2", "001_1.png")].pid
    assert by_pair[("P1", "001_1.png")].pid == by_pair[("P1", "001_3.png")].pid
    assert by_pair[("P1", "001_1.png")].camid == 0 and by_pair[("P2", "001_3.png")].camid == 3
    assert [(it.pid, it.camid) for it in ds.query] == [(10, 8), (11, 8)]
    assert [(it.pid, it.camid) for it in ds.gallery] == [(10, 9), (11, 9)]
    dg = build_dataset("DG_CUHK02", tmp_path)
    assert len(dg.train) == 20 and dg.num_train_pids == 10 and dg.num_train_cams == 10


def test_cuhk02_missing_camera_pair(tmp_path: Path) -> None:
    make_cuhk02(tmp_path / "cuhk02")
    for cam in ("cam1", "cam2"):
        for f in (tmp_path / "cuhk02" / "P3" / cam).iterdir():
            f.unlink()
        (tmp_path / "cuhk02" / "P3" / cam).rmdir()
    (tmp_path / "cuhk02" / "P3").rmdir()
    with pytest.raises(ValueError, match=r"CUHK02: malformed layout .*lacks P3/cam1, P3/cam2.*P1\.\.P5/\{cam1,cam2\}"):
        CUHK02(tmp_path)


@pytest.mark.parametrize(
    "sub,files",
    [
        ("cuhksysu/cropped_images", ["p11422_s16929_1.jpg", "p11422_s16930_2.jpg", "p00005_s00001_1.jpg"]),
        (
            "CUHK-SYSU/cropped_image",
            ["p11422_n01_s16929_hard0.png", "p11422_n02_s16930_hard1.png", "p00005_n01_s00001_hard0.png"],
        ),
    ],
)
def test_cuhksysu(tmp_path: Path, sub: str, files: list[str]) -> None:
    touch(tmp_path / sub, files)
    ds = CUHKSYSU(tmp_path)
    pids = {n: it.pid for n, it in by_name(ds.train).items()}
    assert pids[files[2]] == 0 and pids[files[0]] == pids[files[1]] == 1
    assert {it.camid for it in ds.train} == {0}
    assert ds.query == [] and ds.gallery == []


def test_cuhksysu_bad_name(tmp_path: Path) -> None:
    touch(tmp_path / "cuhksysu" / "cropped_images", ["p1_s1.jpg", "person.jpg"])
    with pytest.raises(ValueError, match="person.jpg"):
        CUHKSYSU(tmp_path)


def make_msmt(base: Path, train_dir: str, test_dir: str) -> None:
    lists = {
        "list_train.txt": (
            train_dir,
            [
                ("0000/0000_000_01_0303morning_0015_0.jpg", 0),
                ("0000/0000_001_03_0303morning_0016_0.jpg", 0),
                ("0001/0001_000_15_0303noon_0001_0.jpg", 1),
            ],
        ),
        "list_val.txt": (train_dir, [("0001/0001_001_02_0303noon_0002_0.jpg", 1)]),
        "list_query.txt": (test_dir, [("0000/0000_000_02_0303morning_0001_0.jpg", 0)]),
        "list_gallery.txt": (
            test_dir,
            [("0000/0000_001_05_0303morning_0002_0.jpg", 0), ("0001/0001_000_01_0303noon_0003_0.jpg", 1)],
        ),
    }
    for list_name, (folder, entries) in lists.items():
        touch(base / folder, [rel for rel, _ in entries])
        (base / list_name).write_text("".join(f"{rel} {pid}\n" for rel, pid in entries))


@pytest.mark.parametrize(
    "sub,train_dir,test_dir",
    [("msmt17/MSMT17_V1", "train", "test"), ("MSMT17_V2", "mask_train_v2", "mask_test_v2")],
)
def test_msmt17(tmp_path: Path, sub: str, train_dir: str, test_dir: str) -> None:
    make_msmt(tmp_path / sub, train_dir, test_dir)
    ds = MSMT17(tmp_path)
    assert ds.dataset_dir == str(tmp_path / sub)
    assert [(it.pid, it.camid) for it in ds.train] == [(0, 0), (0, 2), (1, 14)]  # no val images
    assert [(it.pid, it.camid) for it in ds.query] == [(0, 1)]
    assert [(it.pid, it.camid) for it in ds.gallery] == [(0, 4), (1, 0)]
    assert all(os.path.isfile(it.img_path) for it in ds.train + ds.query + ds.gallery)
    dg = build_dataset("msmt17", tmp_path, combine_all=True)
    # 3 train + 1 val + 1 query + 2 gallery; test ids 0/1 are other people than train ids 0/1
    assert len(dg.train) == 7 and dg.num_train_pids == 4
    assert by_name(dg.train)["0000_000_02_0303morning_0001_0.jpg"].pid == 2


def test_msmt17_list_pointing_to_missing_images(tmp_path: Path) -> None:
    base = tmp_path / "MSMT17_V1"
    make_msmt(base, "train", "test")
    (base / "list_query.txt").write_text("0099/0099_000_02_x_0001_0.jpg 99\n")
    with pytest.raises(ValueError, match=r"MSMT17: .*list_query\.txt.*0099_000_02_x_0001_0\.jpg"):
        MSMT17(tmp_path)
    (base / "list_query.txt").write_text("just-one-field\n")
    with pytest.raises(ValueError, match=r"malformed line 1 of .*list_query\.txt"):
        MSMT17(tmp_path)


def test_msmt17_missing_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"MSMT17: no dataset found under root .*MSMT17_V2/\{mask_train_v2"):
        MSMT17(tmp_path)


# ---------------------------------------------------------------------------------------------
# split test sets: GRID, VIPeR, PRID, iLIDS (full-size fakes, so the protocol sizes are checked)


def make_grid(base: Path, small: bool = False) -> None:
    n, n_distractors = (20, 5) if small else (250, 775)
    touch(base / "probe", [f"{i:04d}_{i % 8 + 1}_{10000 + i}_1_1_1.jpeg" for i in range(1, n + 1)])
    paired = [f"{i:04d}_{(i + 3) % 8 + 1}_{20000 + i}_1_1_1.jpeg" for i in range(1, n + 1)]
    distractors = [f"0000_{k % 8 + 1}_{30000 + k}_1_1_1.jpeg" for k in range(n_distractors)]
    touch(base / "gallery", paired + distractors)


def make_viper(base: Path, small: bool = False) -> list[int]:
    ids = sorted(random.Random(5).sample(range(874), 20 if small else 632))
    touch(base / "cam_a", [f"{i:03d}_{(i * 45) % 180}.bmp" for i in ids])
    touch(base / "cam_b", [f"{i:03d}_{(i * 90) % 180}.bmp" for i in ids])
    return ids


def make_prid(base: Path, small: bool = False) -> None:
    n_a, n_b = (25, 30) if small else (385, 749)
    touch(base / "cam_a", [f"person_{i:04d}.png" for i in range(1, n_a + 1)])
    touch(base / "cam_b", [f"person_{i:04d}.png" for i in range(1, n_b + 1)])


def make_ilids(base: Path, small: bool = False) -> None:
    n_ids, n_imgs = (20, 3) if small else (119, 4)
    touch(base, [f"{pid:04d}{seq:03d}.jpg" for pid in range(1, n_ids + 1) for seq in range(1, n_imgs + 1)])


def _pid_of(dataset: str, name: str) -> int:
    if dataset == "prid":
        return int(name[7:11])
    if dataset == "ilids":
        return int(name[:4])
    return int(name.split("_")[0])


SPLIT_SETS = {
    # name: (class, data folder (torchreid layout), maker, authors' split file name relative to root)
    "grid": (GRID, "grid/underground_reid", make_grid, "grid/splits.json"),
    "viper": (VIPeR, "viper/VIPeR", make_viper, "viper/splits.json"),
    "prid": (PRID, "prid2011/prid_2011/single_shot", make_prid, "prid2011/splits_single_shot.json"),
    "ilids": (iLIDS, "ilids/i-LIDS_Pedestrian/Persons", make_ilids, "ilids/splits.json"),
}


def generated_file(split_file: str, seed: int) -> str:
    """Where generated splits are cached: ``<stem>_generated_seed<seed>.json`` next to the authors' name."""
    return split_file.replace(".json", f"_generated_seed{seed}.json")


def _signature(ds: object) -> tuple[list[str], list[str], list[str]]:
    return tuple(sorted(names(getattr(ds, s))) for s in ("train", "query", "gallery"))  # type: ignore[return-value]


@pytest.mark.parametrize("dataset", sorted(SPLIT_SETS))
def test_split_sets_seeded_determinism(tmp_path: Path, dataset: str) -> None:
    cls, sub, make, split_file = SPLIT_SETS[dataset]
    roots = [tmp_path / r for r in ("a", "b", "c")]
    for root in roots:
        make(root / sub, small=True)  # the protocol sizes are checked on full-size fakes below
    a0 = cls(roots[0], split_id=0)
    # generated splits get a file of their own; the authors' file name stays free
    assert not (roots[0] / split_file).exists()
    assert a0.split_origin == "generated" and not a0.uses_authors_splits
    assert a0.split_path == str(roots[0] / generated_file(split_file, 0))
    splits = json.loads((roots[0] / generated_file(split_file, 0)).read_text())
    assert len(splits) == (20 if dataset == "viper" else 10) and {s["seed"] for s in splits} == {0}
    b0 = cls(roots[1], split_id=0, seed=0)  # same seed, other folder -> same split
    assert _signature(a0) == _signature(b0)
    assert _signature(cls(roots[0], split_id=0)) == _signature(a0)  # re-read from the cache
    a1 = cls(roots[0], split_id=1)  # other split -> other train/test partition
    assert _signature(a1)[1] != _signature(a0)[1] and _signature(a1)[0] != _signature(a0)[0]
    c0 = cls(roots[2], split_id=0, seed=1)  # other seed -> other split, in its own file
    assert _signature(c0)[1] != _signature(a0)[1]
    assert (roots[2] / generated_file(split_file, 1)).is_file()
    assert _signature(cls(roots[0], split_id=0, seed=1)) == _signature(c0)  # seeds do not clash
    with pytest.raises(ValueError, match="split_id"):
        cls(roots[0], split_id=10)
    # train and test identities never overlap; train ids relabelled 0..P-1
    for ds in (a0, a1, c0):
        train_raw = {_pid_of(dataset, n) for n in names(ds.train)}
        test_raw = {_pid_of(dataset, n) for n in names(ds.query)}
        assert train_raw.isdisjoint(test_raw)
        assert sorted({it.pid for it in ds.train}) == list(range(len(train_raw)))


def test_grid_protocol_sizes(tmp_path: Path) -> None:
    make_grid(tmp_path / "GRID")  # MetaBIN layout
    ds = GRID(tmp_path, split_id=4, domain=2)
    assert (tmp_path / "GRID" / "splits_generated_seed0.json").is_file() and ds.split_origin == "generated"
    assert len(ds.query) == 125 and len(ds.gallery) == 900 and len(ds.train) == 250
    assert ds.num_train_pids == 125 and ds.num_query_pids == 125
    assert sum(it.pid == 0 for it in ds.gallery) == 775
    assert {it.pid for it in ds.gallery} - {0} == {it.pid for it in ds.query}
    q = by_name(ds.query)
    name = next(iter(q))
    assert q[name].camid == int(name.split("_")[1]) - 1 and q[name].domain == 2
    every = GRID(tmp_path, split_id=4, combine_all=True)
    assert len(every.train) == 500 and every.num_train_pids == 250  # distractors dropped


def test_grid_uses_features_and_partitions_mat(tmp_path: Path) -> None:
    make_grid(tmp_path / "grid" / "underground_reid", small=True)  # paired ids 1..20
    rng = np.random.default_rng(0)
    partitions = [np.arange(1, 11), np.arange(11, 21)] + [
        np.sort(rng.choice(np.arange(1, 21), 10, replace=False)) for _ in range(8)
    ]
    cell = np.empty((1, 10), dtype=object)
    for k, ids in enumerate(partitions):
        cell[0, k] = {
            "testIdx": np.zeros((1, 1)),
            "probeIdx": np.zeros((1, 1)),
            "trainIdx": ids.reshape(1, -1).astype(np.float64),
        }
    savemat(str(tmp_path / "grid" / "underground_reid" / "features_and_partitions.mat"), {"trainIdxAll": cell})
    ds0 = GRID(tmp_path, split_id=0)
    ds1 = GRID(tmp_path, split_id=1)
    assert {_pid_of("grid", n) for n in names(ds0.train)} == set(range(1, 11))
    assert {it.pid for it in ds0.query} == set(range(11, 21))
    assert {it.pid for it in ds1.query} == set(range(1, 11))
    assert {_pid_of("grid", n) for n in names(GRID(tmp_path, split_id=7).train)} == set(partitions[7].tolist())
    # the official partitions are the authors' splits; read directly, nothing written
    assert ds0.split_origin == "authors" and ds0.split_path.endswith("features_and_partitions.mat")
    assert sorted(p.name for p in (tmp_path / "grid").iterdir()) == ["underground_reid"]
    assert GRID(tmp_path, split_id=0, use_mat=False).split_origin == "generated"


def test_grid_reads_foreign_torchreid_split_file(tmp_path: Path) -> None:
    make_grid(tmp_path / "GRID", small=True)  # paired ids 1..20
    train_items = [
        [f"/home/someone/datasets/GRID/probe/{i:04d}_{i % 8 + 1}_{10000 + i}_1_1_1.jpeg", i - 1, 0] for i in range(6, 16)
    ]
    (tmp_path / "GRID" / "splits.json").write_text(json.dumps([{"train": train_items, "query": [], "gallery": []}] * 10))
    ds = GRID(tmp_path, split_id=2)
    assert ds.split_origin == "authors" and ds.split_path == str(tmp_path / "GRID" / "splits.json")
    assert {_pid_of("grid", n) for n in names(ds.train)} == set(range(6, 16))
    assert {it.pid for it in ds.query} == set(range(1, 6)) | set(range(16, 21))
    with pytest.warns(UserWarning, match="records no seed"):
        GRID(tmp_path, split_id=2, seed=3)


def test_viper_protocol_and_metabin_split_folders(tmp_path: Path) -> None:
    ids = make_viper(tmp_path / "viper")  # MetaBIN layout: viper/{cam_a,cam_b}
    ds = VIPeR(tmp_path, split_id=3)
    assert len(ds.query) == 316 and len(ds.gallery) == 316 and len(ds.train) == 632
    assert {it.camid for it in ds.query} == {0} and {it.camid for it in ds.gallery} == {1}
    assert {it.pid for it in ds.query} == {it.pid for it in ds.gallery}
    assert {it.pid for it in ds.query} | {_pid_of("viper", n) for n in names(ds.train)} == set(ids)
    splits = json.loads((tmp_path / "viper" / "splits_generated_seed0.json").read_text())
    assert "cam_a" in splits[6]["query"][0][0] and "cam_b" in splits[7]["query"][0][0]
    assert {it.pid for it in ds.query} == {_pid_of("viper", os.path.basename(q[0])) for q in splits[6]["query"]}

    # the authors' pre-made folders win when present
    folder = tmp_path / "viper" / "split_4a"
    touch(folder / "train", ["p001_c1_d045.png", "p001_c2_d090.png"])
    touch(folder / "query", ["p007_c1_d000.png"])
    touch(folder / "gallery", ["p007_c2_d090.png", "p009_c2_d090.png"])
    ds = VIPeR(tmp_path, split_id=3)
    assert ds.split_path == str(folder) and ds.split_origin == "authors"
    assert [(it.pid, it.camid) for it in ds.train] == [(0, 0), (0, 1)]
    assert [(it.pid, it.camid) for it in ds.query] == [(7, 0)]
    assert [(it.pid, it.camid) for it in ds.gallery] == [(7, 1), (9, 1)]
    assert len(VIPeR(tmp_path, split_id=3, use_split_folders=False).query) == 316


def test_prid_protocol_and_torchreid_split_file(tmp_path: Path) -> None:
    make_prid(tmp_path / "prid_2011" / "single_shot")  # MetaBIN layout
    ds = PRID(tmp_path, split_id=0)
    assert (tmp_path / "prid_2011" / "splits_single_shot_generated_seed0.json").is_file()
    assert not (tmp_path / "prid_2011" / "splits_single_shot.json").exists()
    assert len(ds.query) == 100 and len(ds.gallery) == 649 and len(ds.train) == 200
    assert {it.camid for it in ds.query} == {0} and {it.camid for it in ds.gallery} == {1}
    q_ids = {it.pid for it in ds.query}
    assert q_ids <= set(range(1, 201)) and {it.pid for it in ds.gallery} == q_ids | set(range(201, 750))
    every = PRID(tmp_path, split_id=0, combine_all=True)
    assert len(every.train) == 400 and every.num_train_pids == 200  # distractors dropped

    (tmp_path / "prid_2011" / "splits_single_shot.json").write_text(
        json.dumps([{"train": list(range(1, 101)), "test": list(range(101, 201))}] * 10)
    )
    ds = PRID(tmp_path, split_id=5)
    assert ds.split_origin == "authors" and ds.split_path.endswith("splits_single_shot.json")
    assert {it.pid for it in ds.query} == set(range(101, 201))
    assert {_pid_of("prid", n) for n in names(ds.train)} == set(range(1, 101))


def test_ilids_protocol(tmp_path: Path) -> None:
    make_ilids(tmp_path / "QMUL-iLIDS" / "images")  # MetaBIN layout
    ds = iLIDS(tmp_path, split_id=2)
    assert (tmp_path / "QMUL-iLIDS" / "splits_generated_seed0.json").is_file()
    assert ds.num_train_pids == 59 and len(ds.train) == 236
    assert len(ds.query) == 60 and len(ds.gallery) == 60
    assert [it.pid for it in ds.query] == [it.pid for it in ds.gallery] and len(set(names(ds.query))) == 60
    assert all(q.img_path != g.img_path for q, g in zip(ds.query, ds.gallery))
    q = ds.query[0]
    assert q.camid == int(os.path.basename(q.img_path)[4:7]) - 1


def test_split_file_referring_to_missing_image(tmp_path: Path) -> None:
    make_ilids(tmp_path / "QMUL-iLIDS" / "images", small=True)
    (tmp_path / "QMUL-iLIDS" / "splits.json").write_text(
        json.dumps([{"train": ["0200001.jpg"], "query": [], "gallery": []}] * 10)
    )
    with pytest.raises(ValueError, match=r"iLIDS: split file .* refers to missing image .*0200001\.jpg"):
        iLIDS(tmp_path)


@pytest.mark.parametrize(
    "cls,expected",
    [
        (GRID, "grid/underground_reid/{probe,gallery}"),
        (VIPeR, "viper/VIPeR/{cam_a,cam_b}"),
        (PRID, "prid_2011/single_shot/{cam_a,cam_b}"),
        (iLIDS, "QMUL-iLIDS/images"),
    ],
)
def test_split_sets_missing_error(tmp_path: Path, cls: type[SplitReIDDataset], expected: str) -> None:
    with pytest.raises(FileNotFoundError) as exc:
        cls(tmp_path)
    msg = str(exc.value)
    assert cls.name in msg and str(tmp_path) in msg and expected in msg


# ---------------------------------------------------------------------------------------------
# registry and combination


def test_registry_and_build_dataset(tmp_path: Path) -> None:
    assert set(DATASETS) == {
        "market1501",
        "dukemtmcreid",
        "cuhk03",
        "cuhk02",
        "cuhksysu",
        "msmt17",
        "grid",
        "viper",
        "prid",
        "ilids",
    }
    make_market(tmp_path / "Market-1501-v15.09.15")
    plain = build_dataset("Market1501", tmp_path)
    dg = build_dataset("DG_Market1501", tmp_path)
    assert type(plain) is Market1501 and not plain.combine_all and len(plain.train) == 5
    assert dg.combine_all and len(dg.train) == 9
    assert not build_dataset("DG_Market1501", tmp_path, combine_all=False).combine_all
    with pytest.raises(ValueError, match=r"unknown dataset 'mars'.*market1501"):
        build_dataset("mars", tmp_path)
    with pytest.raises(ValueError, match="already registered"):
        register_dataset("market1501", Market1501)
    with pytest.raises(TypeError):
        build_dataset("market1501", tmp_path, split_id=1)  # not a split dataset


def test_combine_sources_offsets_and_domains(tmp_path: Path) -> None:
    make_market(tmp_path / "Market-1501-v15.09.15")
    touch(tmp_path / "cuhksysu" / "cropped_images", ["p00005_s1_1.jpg", "p00009_s2_1.jpg", "p00009_s3_1.jpg"])
    market, sysu = Market1501(tmp_path, domain=7), CUHKSYSU(tmp_path)
    extra = [("x.jpg", 40, 2), ("y.jpg", 10, 2), ("z.jpg", 40, 5)]
    ms = combine_sources([market, sysu, extra])
    assert isinstance(ms, MultiSourceDataset) and ms.num_domains == 3
    assert ms.names == ["Market1501", "CUHKSYSU", "source2"]
    assert ms.pid_offsets == [0, 3, 5] and ms.camid_offsets == [0, 4, 5]
    assert len(ms.train) == 5 + 3 + 3 and ms.num_train_pids == 3 + 2 + 2
    assert [it.domain for it in ms.train] == [0] * 5 + [1] * 3 + [2] * 3
    assert [it.pid for it in ms.train[:5]] == [it.pid for it in market.train]
    assert [it.pid for it in ms.train[5:8]] == [3, 4, 4]
    assert [(it.img_path, it.pid, it.camid) for it in ms.train[8:]] == [("x.jpg", 6, 5), ("y.jpg", 5, 5), ("z.jpg", 6, 6)]
    assert {it.camid for it in ms.train[:5]} == {0, 1, 2, 3}  # market cams 0,1,2,5 -> 0..3
    same_cams = combine_sources([market, sysu], offset_camids=False)
    assert [it.camid for it in same_cams.train] == [it.camid for it in market.train] + [0, 0, 0]
    with pytest.raises(ValueError, match="no training items"):
        combine_sources([market, []])


def test_cameras_as_domains() -> None:
    items = [ReIDItem("a", 0, 5, 0), ReIDItem("b", 1, 2, 0), ReIDItem("c", 1, 5, 0)]
    assert [it.domain for it in cameras_as_domains(items)] == [1, 0, 1]


# ---------------------------------------------------------------------------------------------
# ImageDataset


def _to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def test_image_dataset_items_and_loader(tmp_path: Path) -> None:
    make_market(tmp_path / "Market-1501-v15.09.15")
    ds = Market1501(tmp_path, domain=2)
    data = ImageDataset(ds.train, _to_tensor)
    assert len(data) == 5
    sample = data[3]
    assert set(sample) == {"img", "pid", "camid", "domain", "path"}
    assert sample["img"].shape == (3, 4, 8) and sample["img"].dtype == torch.uint8
    assert (sample["pid"], sample["camid"], sample["domain"], sample["path"]) == (
        ds.train[3].pid,
        ds.train[3].camid,
        2,
        ds.train[3].img_path,
    )
    batch = next(iter(DataLoader(data, batch_size=5)))
    assert batch["img"].shape == (5, 3, 4, 8) and batch["pid"].tolist() == [it.pid for it in ds.train]
    assert isinstance(ImageDataset([("p.jpg", 1, 2)]).items[0], ReIDItem)
    pil = ImageDataset(ds.query)[0]["img"]
    assert isinstance(pil, Image.Image) and pil.mode == "RGB" and pil.size == (8, 4)


def test_image_dataset_unreadable_image_names_path(tmp_path: Path) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 definitely not a jpeg")
    missing = tmp_path / "missing.jpg"
    data = ImageDataset([ReIDItem(str(broken), 0, 0, 0), ReIDItem(str(missing), 1, 0, 0)], _to_tensor)
    with pytest.raises(UnreadableImageError, match=f"cannot read image {re.escape(repr(str(broken)))}") as exc:
        data[0]
    assert exc.value.path == str(broken)
    with pytest.raises(UnreadableImageError, match=f"cannot read image {re.escape(repr(str(missing)))}"):
        data[1]
    # in a worker process the error reaches the main process with the path in its message
    with pytest.raises(UnreadableImageError, match=f"cannot read image {re.escape(repr(str(broken)))}"):
        next(iter(DataLoader(data, batch_size=1, num_workers=1)))
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        ImageDataset(data.items, check_files=True)
