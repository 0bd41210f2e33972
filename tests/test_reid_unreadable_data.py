"""Unreadable data files are found before training, each named in one error line: image files that
are a symlink loop, empty, garbage, too large to decode, truncated; an empty training folder; a
split file nested too deep; a bad query or gallery image."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from metabin_layers.reid.checks import check_images
from metabin_layers.reid.cli import main
from metabin_layers.reid.config import load_config
from metabin_layers.reid.data import build_data
from metabin_layers.reid.errors import DataError
from metabin_layers.reid.train import Trainer


def _market(root: Path, ids: int = 6) -> Path:
    base = root / "Market-1501-v15.09.15"
    for sub in ("bounding_box_train", "query", "bounding_box_test"):
        (base / sub).mkdir(parents=True)
    img = Image.new("RGB", (16, 32), (120, 60, 30))
    for pid in range(1, ids + 1):
        for cam in (1, 2):
            img.save(base / "bounding_box_train" / f"{pid:04d}_c{cam}s1_000{cam}01_00.jpg")
    for pid in (101, 102):
        img.save(base / "bounding_box_test" / f"{pid:04d}_c2s1_000101_00.jpg")
        img.save(base / "query" / f"{pid:04d}_c1s1_000101_00.jpg")
    return base


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels (and holds none): a decompression bomb's header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))


def _args(root: Path, out: Path, *extra: str) -> list[str]:
    sets = ["norm=bn", "backbone=resnet10t", "height=32", "width=16", "batch_size=8", "num_instances=2", "workers=0"]
    return [
        "train", "--data-root", str(root), "--sources", "market1501", "--targets", *(extra or ("market1501",)),
        "--output", str(out), "--no-progress", "--set", *sets, "max_iters=1",
    ]  # fmt: skip


def _no_training(monkeypatch):
    def never(self, *args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(Trainer, "run", never)


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("metabin-reid: error: "), err
    return err


BAD_IMAGES = ["symlink_loop", "zero_bytes", "garbage", "bomb", "truncated_header"]


@pytest.mark.parametrize("problem", BAD_IMAGES)
@pytest.mark.parametrize("where", ["bounding_box_train", "bounding_box_test"])
def test_a_bad_image_is_named_before_training(tmp_path, monkeypatch, capsys, problem, where):
    base = _market(tmp_path / "data")
    bad = base / where / "0001_c1s1_000901_00.jpg"
    if problem == "symlink_loop":
        os.symlink(bad, bad)
    elif problem == "zero_bytes":
        bad.write_bytes(b"")
    elif problem == "garbage":
        bad.write_bytes(os.urandom(2000))
    elif problem == "bomb":
        bad = bad.with_suffix(".png")
        bad.write_bytes(_png_header(14000, 14000))
    else:  # the first bytes of a JPEG only: not even its header
        good = base / where / os.listdir(base / where)[0]
        bad.write_bytes(good.read_bytes()[:20])
    _no_training(monkeypatch)
    out = tmp_path / "out"
    assert main(_args(tmp_path / "data", out)) == 2
    err = _one_line(capsys)
    assert str(bad) in err, err
    assert not out.exists()


def test_check_images_reads_every_header_and_names_the_set(tmp_path):
    base = _market(tmp_path)
    cfg = load_config(overrides={"data_root": str(tmp_path), "sources": ["market1501"], "targets": ["market1501"], "norm": "bn"})
    data = build_data(cfg)
    check_images(data)  # all fine
    bad = base / "query" / "0101_c1s1_000101_00.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"target market1501, query: cannot read image .*0101_c1s1_000101_00\.jpg"):
        check_images(data)


def test_a_truncated_image_met_while_loading_is_one_line(tmp_path, capsys):
    base = _market(tmp_path / "data")
    path = next((base / "query").iterdir())
    Image.frombytes("RGB", (16, 32), os.urandom(16 * 32 * 3)).save(path)  # noise: most of the file is pixels
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 200])  # the header reads, the pixels do not: met when the query is read
    out = tmp_path / "out"
    assert main(_args(tmp_path / "data", out)) == 2
    err = _one_line(capsys)
    assert str(path) in err and "truncated" in err, err


def test_an_empty_training_folder_is_one_line(tmp_path, monkeypatch, capsys):
    base = _market(tmp_path / "data")
    for p in (base / "bounding_box_train").iterdir():
        p.unlink()
    _no_training(monkeypatch)
    out = tmp_path / "out"
    assert main(_args(tmp_path / "data", out)) == 2
    err = _one_line(capsys)
    assert "source market1501" in err and str(base) in err and "no training image" in err, err
    assert not out.exists()


def test_a_split_file_nested_too_deep_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    _market(tmp_path / "data")
    folder = tmp_path / "data" / "QMUL-iLIDS" / "images"
    folder.mkdir(parents=True)
    for pid in range(1, 5):
        for seq in (1, 2):
            Image.new("RGB", (8, 16)).save(folder / f"{pid:04d}{seq:03d}.jpg")
    splits = folder.parent / "splits.json"
    splits.write_text("[" * 100_000 + "]" * 100_000)
    _no_training(monkeypatch)
    out = tmp_path / "out"
    assert main(_args(tmp_path / "data", out, "ilids")) == 2
    err = _one_line(capsys)
    assert str(splits) in err and "nested too deep" in err, err
    json.loads("[" * 10 + "]" * 10)  # an ordinary file still reads
