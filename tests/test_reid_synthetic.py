"""Tests for metabin_layers.reid.synthetic (and the recipe transforms it feeds)."""

from __future__ import annotations

import re
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from metabin_layers.reid.evaluation import compute_distance, evaluate_rank
from metabin_layers.reid.sampler import DomainBalancedSampler
from metabin_layers.reid.synthetic import SyntheticReID, SyntheticReIDDataset, save_examples
from metabin_layers.reid.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_test_transform,
    build_train_transform,
)

PATH = re.compile(r"^synthetic://style(\d+)/id(\d+)/(\d+)$")


def parse(path):
    m = PATH.match(path)
    assert m, path
    return tuple(int(x) for x in m.groups())


@pytest.fixture(scope="module")
def small():
    return SyntheticReID(
        num_train_ids=24,
        num_test_ids=10,
        num_styles=4,
        held_out_styles=(1, 3),
        images_per_id_per_style=5,
        cameras_per_style=3,
        seed=7,
    )


@pytest.fixture(scope="module")
def default():
    return SyntheticReID()


def test_determinism_same_seed_same_pixels(small):
    other = SyntheticReID(
        num_train_ids=24,
        num_test_ids=10,
        num_styles=4,
        held_out_styles=(1, 3),
        images_per_id_per_style=5,
        cameras_per_style=3,
        seed=7,
        cache=False,
    )
    assert other.train == small.train and other.query == small.query and other.gallery == small.gallery
    items = small.train[::7] + small.query[3][:3] + small.gallery[1][:3]
    first = [small.render(it).copy() for it in items]
    # render in another order, without cache, in a fresh object: identical pixels
    second = [other.render(it) for it in reversed(items)][::-1]
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(first[0], f) for f in first[1:])
    different = SyntheticReID(
        num_train_ids=24,
        num_test_ids=10,
        num_styles=4,
        held_out_styles=(1, 3),
        images_per_id_per_style=5,
        cameras_per_style=3,
        seed=8,
    )
    assert not np.array_equal(different.render(items[0]), first[0])


def test_item_counts(small):
    n = 5
    assert len(small.train) == 24 * n
    for s in (1, 3):
        assert len(small.query[s]) == 10
        assert len(small.gallery[s]) == 10 * (n - 1)
    shared = SyntheticReID(
        num_train_ids=6,
        num_test_ids=3,
        num_styles=3,
        held_out_styles=(0,),
        images_per_id_per_style=4,
        shared_train_ids=True,
        num_distractor_ids=2,
    )
    assert len(shared.train) == 6 * 4 * 2
    assert len(shared.gallery[0]) == 3 * 3 + 2 * 3
    assert Counter(it.pid for it in shared.train) == {pid: 8 for pid in range(6)}
    distractors = {it.pid for it in shared.gallery[0]} - {it.pid for it in shared.query[0]}
    assert len(distractors) == 2


def test_train_and_test_identities_disjoint(small):
    train_ids = {parse(it.img_path)[1] for it in small.train}
    assert {it.pid for it in small.train} == set(range(24)) == train_ids  # contiguous labels
    for s in (1, 3):
        test_ids = {parse(it.img_path)[1] for it in small.query[s] + small.gallery[s]}
        assert test_ids.isdisjoint(train_ids)
        assert {it.pid for it in small.query[s]} == test_ids  # every test id has a query
        assert {it.pid for it in small.gallery[s]} == test_ids


def test_held_out_styles_absent_from_train_and_domains(small):
    assert small.source_styles == [0, 2] and small.num_domains == 2
    train_styles = {parse(it.img_path)[0] for it in small.train}
    assert train_styles == {0, 2}
    for it in small.train:
        assert it.domain == small.source_styles.index(parse(it.img_path)[0])
        assert it.camid // 3 == parse(it.img_path)[0]  # global camera ids: style * cameras + camera
    for s in (1, 3):
        assert all(parse(it.img_path)[0] == s and it.domain == s for it in small.query[s] + small.gallery[s])
    # identities spread over the source domains, several cameras each
    per_domain = Counter(it.domain for it in small.train)
    assert per_domain == {0: 12 * 5, 1: 12 * 5}
    cams = defaultdict(set)
    for it in small.train:
        cams[it.pid].add(it.camid)
    assert all(len(c) >= 2 for c in cams.values())


def test_query_and_gallery_come_from_different_cameras(small):
    for s in (1, 3):
        gallery_cams = defaultdict(set)
        for it in small.gallery[s]:
            gallery_cams[it.pid].add(it.camid)
        for q in small.query[s]:
            assert q.camid not in gallery_cams[q.pid]
            assert len(gallery_cams[q.pid]) == 2  # the style's other two cameras


def test_styles_differ_in_colour_statistics(default):
    # the same 12 identities and poses rendered under every style
    stats = []
    for style in range(default.num_styles):
        imgs = np.stack([default.render_image(200 + i, style, i % 3, i) for i in range(12)]).astype(np.float64)
        stats.append(np.concatenate([imgs.mean(axis=(0, 1, 2)), imgs.std(axis=(0, 1, 2))]))
    stats = np.array(stats)
    for a in range(len(stats)):
        for b in range(a + 1, len(stats)):
            assert np.abs(stats[a] - stats[b]).max() > 8.0, (a, b, stats[a], stats[b])
    assert len({default.style_params(s)["background"] for s in range(5)}) == 5


def _pixel_features(imgs):
    x = np.stack(imgs).astype(np.float32)
    n, h, w, _ = x.shape
    x = x.reshape(n, h // 4, 4, w // 4, 4, 3).mean(axis=(2, 4))
    x = (x - x.mean(axis=(1, 2), keepdims=True)) / (x.std(axis=(1, 2), keepdims=True) + 1e-3)
    return x.reshape(n, -1)


def test_identities_recognisable_and_style_shift_hurts(default):
    s = default.held_out_styles[0]
    q, g = default.query[s], default.gallery[s]
    qf = _pixel_features([default.render(it) for it in q])
    gf = _pixel_features([default.render(it) for it in g])
    args = ([it.pid for it in q], [it.pid for it in g], [it.camid for it in q], [it.camid for it in g])
    cmc, mAP, _ = evaluate_rank(compute_distance(qf, gf, "euclidean"), *args)
    assert cmc[0] > 0.4  # chance is 1/50: raw pixels already identify people within a style
    # the same gallery poses/cameras rendered under a source style: a real domain gap
    cross = _pixel_features([default.render_image(it.pid, 0, it.camid % 3, k) for k, it in enumerate(g)])
    cmc_x, _, _ = evaluate_rank(compute_distance(qf, cross, "euclidean"), *args)
    assert cmc_x[0] < cmc[0] - 0.15


def test_dataset_items_and_dataloader(small):
    ds = small.dataset("train")
    assert len(ds) == len(small.train)
    sample = ds[3]
    it = small.train[3]
    assert sample["path"] == it.img_path and PATH.match(sample["path"])
    assert (sample["pid"], sample["camid"], sample["domain"]) == (it.pid, it.camid, it.domain)
    assert sample["img"].dtype == torch.uint8 and sample["img"].shape == (3, 64, 32)
    np.testing.assert_array_equal(sample["img"].permute(1, 2, 0).numpy(), small.render(it))

    tds = SyntheticReIDDataset(small, small.query[3], transform=build_test_transform(64, 32))
    x = tds[0]["img"]
    assert x.dtype == torch.float32 and x.shape == (3, 64, 32)
    assert len(small.dataset("gallery", style=1)) == len(small.gallery[1])
    with pytest.raises(ValueError, match="held-out"):
        small.dataset("query", style=0)

    sampler = DomainBalancedSampler(small.train, batch_size=16, num_instances=4, num_batches=2)
    loader = DataLoader(small.dataset("train", transform=build_train_transform(64, 32, pad=3)), batch_sampler=sampler)
    for batch in loader:
        assert batch["img"].shape == (16, 3, 64, 32)
        assert batch["domain"].tolist() == [0] * 8 + [1] * 8
        assert len(batch["path"]) == 16


def test_render_size_determinism_and_errors():
    ds = SyntheticReID(num_train_ids=40, num_test_ids=5, height=96, width=48, images_per_id_per_style=5)
    first = ds.render(ds.train[0])
    assert first.shape == (96, 48, 3) and first.dtype == np.uint8
    # an image is a function of its path: rendered again (by a second instance too), it is the same
    again = SyntheticReID(num_train_ids=40, num_test_ids=5, height=96, width=48, images_per_id_per_style=5)
    assert np.array_equal(again.render(ds.train[0]), first)
    assert not np.array_equal(ds.render(ds.train[1]), first)
    with pytest.raises(ValueError, match="not a synthetic path"):
        ds.render("market/0001.jpg")
    with pytest.raises(ValueError, match="held_out_styles"):
        SyntheticReID(num_styles=3, held_out_styles=(3,))
    with pytest.raises(ValueError, match="held_out_styles"):
        SyntheticReID(num_styles=2, held_out_styles=(0, 1))
    with pytest.raises(ValueError, match="cameras_per_style"):
        SyntheticReID(cameras_per_style=1)


def test_example_grid_png(tmp_path, small):
    path = tmp_path / "examples" / "grid.png"
    grid = small.save_examples(path, num_ids=3, per_style=2, scale=2)
    h, w, pad = 64, 32, 2
    expected = ((3 * (h + pad) + pad) * 2, (4 * 2 * (w + pad) + pad) * 2, 3)
    assert grid.shape == expected and grid.dtype == np.uint8
    loaded = np.asarray(Image.open(path).convert("RGB"))
    np.testing.assert_array_equal(loaded, grid)
    # cell (row 1, column 5) is identity num_train_ids + 1 under style 2, camera 1
    cell = grid[::2, ::2][pad + (h + pad) : pad + (h + pad) + h, pad + 5 * (w + pad) : pad + 5 * (w + pad) + w]
    np.testing.assert_array_equal(cell, small.render_image(24 + 1, 2, 1, 5))
    grid2 = save_examples(tmp_path / "g2.png", dataset=small, num_ids=1, per_style=1, scale=1)
    assert grid2.shape == (h + 2 * pad, 4 * (w + pad) + pad, 3)


# ------------------------------------------------------------------------------------ transforms


def test_test_transform_normalises_constant_image():
    img = np.full((128, 64, 3), (10, 128, 250), dtype=np.uint8)
    x = build_test_transform(64, 32)(img)
    expected = (torch.tensor([10, 128, 250]) / 255.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert x.shape == (3, 64, 32)
    torch.testing.assert_close(x[:, 10, 10], expected.float(), atol=1e-5, rtol=0)


def test_transforms_accept_pil_numpy_and_tensor():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (64, 32, 3), dtype=np.uint8)
    t = build_test_transform(64, 32)
    a = t(arr)
    torch.testing.assert_close(t(Image.fromarray(arr)), a)
    torch.testing.assert_close(t(torch.from_numpy(arr).permute(2, 0, 1)), a)
    # resize to the same size is the identity: ToTensor + Normalize only
    ref = (torch.from_numpy(arr).permute(2, 0, 1) / 255.0 - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(
        IMAGENET_STD
    )[:, None, None]
    torch.testing.assert_close(a, ref.float(), atol=1e-5, rtol=0)
    # without flip and pad the train transform is the test transform
    torch.testing.assert_close(build_train_transform(64, 32, flip=False, pad=0)(arr), a)
    with pytest.raises(TypeError):
        t(arr.astype(np.float32))


def test_train_transform_flips_and_shifts():
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, (64, 32, 3), dtype=np.uint8)
    plain = build_test_transform(64, 32, mean=None, std=None)(arr)
    torch.manual_seed(0)
    flip_only = build_train_transform(64, 32, pad=0, mean=None, std=None)
    outs = [flip_only(arr) for _ in range(20)]
    flipped = sum(torch.equal(o, plain.flip(2)) for o in outs)
    same = sum(torch.equal(o, plain) for o in outs)
    assert flipped + same == 20 and 3 <= flipped <= 17
    crop = build_train_transform(64, 32, flip=False, pad=4, mean=None, std=None)
    for _ in range(10):
        out = crop(arr)
        # the output is a 64x32 window of the zero-padded image
        padded = torch.nn.functional.pad(plain, (4, 4, 4, 4))
        assert any(torch.equal(out, padded[:, dy : dy + 64, dx : dx + 32]) for dy in range(9) for dx in range(9))
    jitter = build_train_transform(64, 32, color_jitter=True)
    assert jitter(arr).shape == (3, 64, 32)
