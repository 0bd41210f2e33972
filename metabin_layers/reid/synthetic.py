"""A seeded synthetic multi-domain person Re-ID dataset, rendered on the fly (no files).

Identities are drawn figures: head (skin, hair or hat), torso (shirt colour with a pattern:
solid, horizontal / vertical stripes, checks, open jacket, logo), arms (long or short sleeves),
legs (trousers, shorts or skirt), shoes and an optional bag, with a body build and height.
Domains are camera *styles*: a colour cast, saturation, brightness / contrast / gamma,
vignetting, blur, sensor noise and a background texture (wall + tiled floor, sky gradient,
facade stripes, bricks, foliage, road). Each style is a deterministic function of
``(seed, style index)`` and holds ``cameras_per_style`` cameras with small variations
(gains, brightness, blur, viewing distance, background phase), so camera ids exist. Every image
adds pose jitter (shift, scale, horizontal flip, stride), a light change and fresh noise.

Rendering is vectorised numpy at 2x supersampling (about a millisecond for 64 x 32), fully
determined by ``(seed, identity, style, camera, instance)``; images are cached lazily.

Splits (multi-source domain generalisation):

* ``train``: identities ``0 .. num_train_ids-1`` under the *source* styles only;
  ``domain`` = index of the style among the source styles, ``pid`` = contiguous train label.
  By default each train identity lives in one source style (like real datasets, whose people
  are disjoint); ``shared_train_ids=True`` shows every train identity in every source style.
* ``query[style]`` / ``gallery[style]`` for each held-out style: test identities (disjoint from
  the train identities, ``pid`` = global identity number >= ``num_train_ids``), one query
  image per identity from one camera and the gallery images from the style's other cameras,
  plus optional gallery-only distractor identities. ``domain`` = the global style index.

Items are ``SyntheticItem`` ``(img_path, pid, camid, domain)`` (field-compatible with the
recipe's ``ReIDItem``); ``img_path`` is ``"synthetic://style{s}/id{identity}/{instance}"`` and
``camid`` is global: ``style * cameras_per_style + camera``.

Examples:
    >>> from metabin_layers.reid.synthetic import SyntheticReID
    >>> ds = SyntheticReID(num_train_ids=8, num_test_ids=4, num_styles=3, held_out_styles=(2,),
    ...                    images_per_id_per_style=4)
    >>> len(ds.train), len(ds.query[2]), len(ds.gallery[2])
    (32, 4, 12)
    >>> ds.render(ds.train[0]).shape
    (64, 32, 3)
    >>> sample = ds.dataset("train")[0]
    >>> sorted(sample), sample["img"].dtype
    (['camid', 'domain', 'img', 'path', 'pid'], torch.uint8)
"""

from __future__ import annotations

import colorsys
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "SyntheticItem",
    "SyntheticReID",
    "SyntheticReIDDataset",
    "BACKGROUNDS",
    "save_examples",
]

BACKGROUNDS: tuple[str, ...] = ("indoor", "sky", "facade", "bricks", "foliage", "road")

# SeedSequence tags keep the random streams of different purposes apart.
_TAG_IDENTITY, _TAG_STYLE, _TAG_CAMERA, _TAG_IMAGE, _TAG_LAYOUT, _TAG_GLOBAL = 1, 2, 3, 4, 5, 6
_SS = 2  # supersampling factor (anti-aliased edges)
_PATH_RE = re.compile(r"^synthetic://style(\d+)/id(\d+)/(\d+)$")


class SyntheticItem(NamedTuple):
    """One image: ``(img_path, pid, camid, domain)``, the recipe's item layout.

    Attributes:
        img_path: ``synthetic://style<s>/id<p>/<k>``, a key for the image (rendered, not read).
        pid: identity label.
        camid: camera (style) id.
        domain: source-domain index (one domain per style).

    Examples:
        >>> from metabin_layers.reid.synthetic import SyntheticItem
        >>> item = SyntheticItem("synthetic://style1/id0/0", pid=0, camid=1, domain=1)
        >>> item.pid, item.domain
        (0, 1)
    """

    img_path: str
    pid: int
    camid: int
    domain: int


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


_SKIN = np.array(
    [[0.98, 0.84, 0.72], [0.92, 0.73, 0.58], [0.80, 0.58, 0.43], [0.60, 0.41, 0.29], [0.42, 0.28, 0.19]],
    dtype=np.float32,
)
_HAIR = np.array(
    [[0.08, 0.07, 0.06], [0.25, 0.16, 0.10], [0.45, 0.30, 0.17], [0.86, 0.73, 0.45], [0.62, 0.62, 0.62], [0.62, 0.26, 0.10]],
    dtype=np.float32,
)
_PANTS = np.array(
    [[0.20, 0.30, 0.52], [0.10, 0.10, 0.12], [0.45, 0.46, 0.48], [0.72, 0.63, 0.45], [0.14, 0.17, 0.35], [0.40, 0.27, 0.16]],
    dtype=np.float32,
)
_SHOES = np.array([[0.08, 0.08, 0.08], [0.92, 0.92, 0.92], [0.40, 0.24, 0.12]], dtype=np.float32)
PATTERNS: tuple[str, ...] = ("solid", "hstripes", "vstripes", "checks", "jacket", "logo")


@dataclass(frozen=True)
class _Identity:
    skin: np.ndarray
    hair: np.ndarray
    hair_style: int  # 0 short, 1 long, 2 hat, 3 very short
    hat: np.ndarray
    shirt: np.ndarray
    shirt2: np.ndarray
    pattern: int
    period: float
    long_sleeves: bool
    pants: np.ndarray
    pants_type: int  # 0 trousers, 1 shorts, 2 skirt
    shoes: np.ndarray
    bag: int  # 0 none, 1 backpack straps, 2 shoulder bag, 3 hand bag
    bag_color: np.ndarray
    build: float
    height: float
    head: float


@dataclass(frozen=True)
class _Style:
    background: str
    bg_colors: np.ndarray  # (3, 3): three background colours
    bg_period: float
    horizon: float
    gains: np.ndarray  # per-channel colour cast
    saturation: float
    contrast: float
    brightness: float
    gamma: float
    vignette: float
    blur: float
    noise: float
    scale: float  # figure size (viewing distance)


@dataclass(frozen=True)
class _Camera:
    gains: np.ndarray
    brightness: float
    blur: float
    scale: float
    bg_shift: np.ndarray  # background colour shift
    phase: float
    horizon: float


def _identity(seed: int, gid: int) -> _Identity:
    r = _rng(seed, _TAG_IDENTITY, gid)
    hue = r.random()
    if r.random() < 0.2:  # neutral shirt: white / grey / black
        shirt = np.full(3, r.choice([0.12, 0.5, 0.92]) + r.uniform(-0.05, 0.05), dtype=np.float32)
    else:
        shirt = _hsv(hue, r.uniform(0.45, 0.95), r.uniform(0.45, 0.98))
    if r.random() < 0.3:
        shirt2 = np.full(3, r.choice([0.08, 0.95]), dtype=np.float32)
    else:
        shirt2 = _hsv(hue + 0.5 + r.uniform(-0.15, 0.15), r.uniform(0.5, 1.0), r.uniform(0.4, 1.0))
    pants = _PANTS[r.integers(len(_PANTS))] if r.random() < 0.6 else _hsv(r.random(), r.uniform(0.3, 0.9), r.uniform(0.25, 0.75))
    shoes = _SHOES[r.integers(len(_SHOES))] if r.random() < 0.7 else _hsv(r.random(), 0.8, 0.8)
    return _Identity(
        skin=np.clip(_SKIN[r.integers(len(_SKIN))] + r.uniform(-0.03, 0.03, 3), 0, 1).astype(np.float32),
        hair=_HAIR[r.integers(len(_HAIR))],
        hair_style=int(r.choice(4, p=[0.4, 0.3, 0.15, 0.15])),
        hat=_hsv(r.random(), r.uniform(0.3, 1.0), r.uniform(0.2, 0.95)),
        shirt=shirt,
        shirt2=shirt2,
        pattern=int(r.integers(len(PATTERNS))),
        period=float(r.uniform(0.045, 0.085)),
        long_sleeves=bool(r.random() < 0.5),
        pants=pants.astype(np.float32),
        pants_type=int(r.choice(3, p=[0.6, 0.2, 0.2])),
        shoes=shoes.astype(np.float32),
        bag=int(r.choice(4, p=[0.45, 0.2, 0.2, 0.15])),
        bag_color=_hsv(r.random(), r.uniform(0.2, 0.9), r.uniform(0.15, 0.9)),
        build=float(r.uniform(0.85, 1.2)),
        height=float(r.uniform(0.9, 1.0)),
        head=float(r.uniform(0.9, 1.1)),
    )


def _style(seed: int, style: int) -> _Style:
    base = _rng(seed, _TAG_GLOBAL)
    type_offset, hue_offset = int(base.integers(len(BACKGROUNDS))), float(base.random())
    r = _rng(seed, _TAG_STYLE, style)
    # consecutive styles get different backgrounds and well-separated colour-cast hues
    background = BACKGROUNDS[(style + type_offset) % len(BACKGROUNDS)]
    tint_hue = (hue_offset + style * 0.6180339887) % 1.0
    tint = _hsv(tint_hue, 1.0, 1.0)
    strength = r.uniform(0.12, 0.3)
    gains = 1.0 + strength * 2.0 * (tint - tint.mean())
    bg_hue = r.random()
    bg_colors = np.stack(
        [
            _hsv(bg_hue, r.uniform(0.1, 0.5), r.uniform(0.45, 0.9)),
            _hsv(bg_hue + r.uniform(0.2, 0.8), r.uniform(0.1, 0.6), r.uniform(0.25, 0.8)),
            _hsv(r.random(), r.uniform(0.0, 0.4), r.uniform(0.3, 0.95)),
        ]
    )
    return _Style(
        background=background,
        bg_colors=bg_colors,
        bg_period=float(r.uniform(0.08, 0.16)),
        horizon=float(r.uniform(0.55, 0.75)),
        gains=gains.astype(np.float32),
        saturation=float(r.uniform(0.45, 1.3)),
        contrast=float(r.uniform(0.75, 1.25)),
        brightness=float(r.uniform(-0.12, 0.12)),
        gamma=float(np.exp(r.uniform(-0.3, 0.3))),
        vignette=float(r.choice([0.0, r.uniform(0.2, 0.5)])),
        blur=float(r.choice([0.0, 0.4, 0.65, 0.9])),
        noise=float(r.uniform(0.005, 0.035)),
        scale=float(r.uniform(0.8, 0.92)),
    )


def _camera(seed: int, style: int, camera: int) -> _Camera:
    r = _rng(seed, _TAG_CAMERA, style, camera)
    return _Camera(
        gains=(1.0 + r.uniform(-0.05, 0.05, 3)).astype(np.float32),
        brightness=float(r.uniform(-0.04, 0.04)),
        blur=float(r.uniform(0.0, 0.3)),
        scale=float(r.uniform(0.94, 1.06)),
        bg_shift=r.uniform(-0.06, 0.06, 3).astype(np.float32),
        phase=float(r.random()),
        horizon=float(r.uniform(-0.05, 0.05)),
    )


# ------------------------------------------------------------------------------ drawing helpers


def _paint(canvas: np.ndarray, mask: np.ndarray, color: np.ndarray) -> None:
    """In-place ``canvas[mask] = color`` where ``color`` is (3,) or (H, W, 3)."""
    if color.ndim == 1:
        canvas[mask] = color
    else:
        canvas[mask] = color[mask]


def _bilinear(grid: np.ndarray, h: int, w: int, oy: float, ox: float) -> np.ndarray:
    """Upsample a small (gh, gw, C) grid to (h, w, C) with bilinear weights and a phase shift."""
    gh, gw = grid.shape[:2]
    y = (np.arange(h) + 0.5) / h * (gh - 1)
    x = (np.arange(w) + 0.5) / w * (gw - 1)
    y = np.clip(y + oy, 0, gh - 1.001)
    x = np.clip(x + ox, 0, gw - 1.001)
    y0, x0 = y.astype(int), x.astype(int)
    fy, fx = (y - y0)[:, None, None], (x - x0)[None, :, None]
    g00, g01 = grid[y0][:, x0], grid[y0][:, x0 + 1]
    g10, g11 = grid[y0 + 1][:, x0], grid[y0 + 1][:, x0 + 1]
    return (g00 * (1 - fx) + g01 * fx) * (1 - fy) + (g10 * (1 - fx) + g11 * fx) * fy


def _background(st: _Style, cam: _Camera, yy: np.ndarray, xx: np.ndarray, r: np.random.Generator) -> np.ndarray:
    """Background (H, W, 3) in image coordinates (``yy``: (H, 1) in [0, 1], ``xx``: (1, W))."""
    h, w = yy.shape[0], xx.shape[1]
    c = np.clip(st.bg_colors + cam.bg_shift, 0, 1)
    p = st.bg_period
    phase = cam.phase + r.uniform(-0.15, 0.15)
    x = xx + phase * p * 4
    horizon = st.horizon + cam.horizon
    kind = st.background
    out = np.empty((h, w, 3), dtype=np.float32)
    if kind == "indoor":  # plain wall above, checked tiles below
        wall = c[0] * (0.9 + 0.1 * yy[..., None])
        tiles = ((np.floor(x / p) + np.floor((yy - horizon) / (p * 0.6))) % 2)[..., None]
        floor = c[1] * (1 - tiles) + c[2] * tiles
        out[:] = np.where((yy >= horizon)[..., None], floor, wall)
    elif kind == "sky":  # vertical gradient with a distant ground band
        t = np.clip(yy / horizon, 0, 1)[..., None]
        sky = c[0] * (1 - t) + c[2] * t
        out[:] = np.where((yy >= horizon)[..., None], c[1] * (0.85 + 0.15 * (yy - horizon)[..., None]), sky)
    elif kind == "facade":  # vertical stripes (columns / windows)
        stripes = ((x / (p * 1.2)) % 1.0 < 0.35)[..., None]
        out[:] = np.where(stripes, c[1], c[0]) * (1.0 - 0.25 * yy[..., None])
        out[(yy >= horizon + 0.1)[:, 0]] = c[2] * 0.8
    elif kind == "bricks":
        row = np.floor(yy / (p * 0.8))
        xs = x / (p * 1.6) + 0.5 * (row % 2)
        mortar = ((yy / (p * 0.8)) % 1.0 < 0.15) | ((xs % 1.0) < 0.08)
        tone = 0.8 + 0.4 * ((row * 7.31 + np.floor(xs) * 3.17) % 1.0)
        out[:] = np.where(mortar[..., None], c[2] * 0.4 + 0.5, c[0] * tone[..., None])
    elif kind == "foliage":  # smooth random blotches of two colours
        grid = r.random((7, 5, 1)).astype(np.float32)
        t = _bilinear(grid, h, w, 0.0, 0.0)
        t = np.clip((t - 0.5) * 2.5 + 0.5, 0, 1)
        out[:] = c[0] * (1 - t) + c[1] * t
    elif kind == "road":  # asphalt with a lane mark, darker buildings above
        lane = (np.abs(x - 0.1) < 0.02) & (yy > horizon)
        out[:] = np.where((yy >= horizon)[..., None], c[2] * 0.6 + 0.15, c[0] * 0.6)
        out[lane] = 0.95
    else:  # pragma: no cover
        raise ValueError(kind)
    if r.random() < 0.35:  # a pole / clutter object
        px = r.uniform(-0.3, 0.3)
        pole = np.abs(xx - px) < r.uniform(0.01, 0.03)
        out[np.broadcast_to(pole, (h, w))] = _hsv(r.random(), r.uniform(0, 0.6), r.uniform(0.2, 0.9))
    return out


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable gaussian blur of an (H, W, C) image (edge padding)."""
    if sigma < 0.25:
        return img
    rad = max(1, int(math.ceil(2.5 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-rad, rad + 1) / sigma) ** 2)
    taps = (taps / taps.sum()).astype(np.float32)
    h, w = img.shape[:2]
    p = np.pad(img, ((rad, rad), (0, 0), (0, 0)), mode="edge")
    img = sum(t * p[i : i + h] for i, t in enumerate(taps))
    p = np.pad(img, ((0, 0), (rad, rad), (0, 0)), mode="edge")
    return sum(t * p[:, i : i + w] for i, t in enumerate(taps))


def _render(ident: _Identity, st: _Style, cam: _Camera, height: int, width: int, r: np.random.Generator) -> np.ndarray:
    """Render one uint8 (height, width, 3) image. ``r`` supplies the per-image randomness."""
    hs, ws = height * _SS, width * _SS
    yy = ((np.arange(hs, dtype=np.float32) + 0.5) / hs)[:, None]
    xx = (((np.arange(ws, dtype=np.float32) + 0.5) / ws - 0.5) * (width / height))[None, :]

    # pose jitter: scale, shift, flip, stride, arm swing
    scale = st.scale * cam.scale * ident.height * r.uniform(0.92, 1.08)
    top = (1.0 - scale) / 2 + r.uniform(-0.04, 0.04)
    shift = r.uniform(-0.08, 0.08) * (width / height)
    flip = -1.0 if r.random() < 0.5 else 1.0
    stride = r.uniform(0.0, 0.09)
    swing = r.uniform(-0.04, 0.04)
    light = r.uniform(0.9, 1.1)

    canvas = _background(st, cam, yy, xx, r)
    v = (yy - top) / scale  # figure coordinates: v from 0 (top of head) to 1 (soles)
    u = flip * (xx - shift) / scale
    b = ident.build
    au = np.abs(u)

    # body geometry
    hw_torso = (0.115 - 0.02 * np.clip((v - 0.18) / 0.38, 0, 1)) * b
    torso = (v >= 0.18) & (v <= 0.56) & (au <= hw_torso)
    arm_v = np.clip((v - 0.19) / 0.34, 0, 1)
    arm_x = (0.135 * b + 0.01) + (0.02 + swing) * arm_v
    arms = (v >= 0.19) & (v <= 0.55) & (np.abs(au - arm_x) <= 0.03)
    sleeve_end = 0.53 if ident.long_sleeves else 0.3
    leg_c = 0.045 * b + stride * np.clip(v - 0.555, 0, None)
    legs = (v >= 0.555) & (v <= 0.955) & (np.abs(au - leg_c) <= 0.04 * b)
    shoes = (v > 0.945) & (v <= 1.0) & (np.abs(au - leg_c - 0.008) <= 0.047 * b)
    head_cy, rx, ry = 0.085, 0.055 * ident.head, 0.075 * ident.head
    head = (u / rx) ** 2 + ((v - head_cy) / ry) ** 2 <= 1.0
    neck = (au <= 0.025) & (v >= 0.14) & (v <= 0.19)

    # shirt pattern (in figure coordinates so it moves and scales with the body)
    pv, pu = v / ident.period, u / ident.period
    pattern = PATTERNS[ident.pattern]
    if pattern == "hstripes":
        second = (pv % 1.0) < 0.5
    elif pattern == "vstripes":
        second = (pu % 1.0) < 0.5
    elif pattern == "checks":
        second = ((np.floor(pv) + np.floor(pu)) % 2) == 1
    elif pattern == "jacket":
        second = np.broadcast_to(au <= 0.035 * b, (hs, ws))
    elif pattern == "logo":
        second = (u**2 + (v - 0.32) ** 2) <= 0.045**2
    else:
        second = np.zeros((hs, ws), dtype=bool)
    shirt = np.where(np.broadcast_to(second, (hs, ws))[..., None], ident.shirt2, ident.shirt)

    body = np.zeros((hs, ws), dtype=bool)
    if ident.hair_style == 1:  # long hair, behind the body
        long_hair = (au <= rx * 1.1) & (v >= head_cy) & (v <= 0.26)
        _paint(canvas, long_hair, ident.hair)
        body |= long_hair
    _paint(canvas, arms, ident.skin)
    _paint(canvas, arms & (v <= sleeve_end), ident.shirt)
    _paint(canvas, legs, ident.pants)
    if ident.pants_type == 1:
        _paint(canvas, legs & (v >= 0.72), ident.skin)
    elif ident.pants_type == 2:
        _paint(canvas, legs & (v >= 0.7), ident.skin)
        skirt = (v >= 0.55) & (v <= 0.72) & (au <= (0.1 + 0.2 * (v - 0.55)) * b)
        _paint(canvas, skirt, ident.pants)
        body |= skirt
    _paint(canvas, shoes, ident.shoes)
    _paint(canvas, torso, shirt)
    _paint(canvas, neck, ident.skin)
    _paint(canvas, head, ident.skin)
    hair_top = head & (v <= head_cy - (0.045 if ident.hair_style == 3 else 0.015))
    if ident.hair_style == 2:  # hat with a brim
        hat = ((u / (rx * 1.15)) ** 2 + ((v - head_cy) / (ry * 1.1)) ** 2 <= 1.0) & (v <= head_cy - 0.02)
        brim = (au <= rx * 1.5) & (np.abs(v - (head_cy - 0.025)) <= 0.012)
        _paint(canvas, hat | brim, ident.hat)
        body |= hat | brim
    else:
        _paint(canvas, hair_top, ident.hair)
    if ident.bag == 1:  # backpack straps
        straps = torso & (np.abs(au - 0.06 * b) <= 0.014) & (v <= 0.42)
        _paint(canvas, straps, ident.bag_color)
    elif ident.bag == 2:  # shoulder bag with a diagonal strap
        strap = torso & (np.abs((u + 0.1 * b) - (v - 0.19) * 0.75) <= 0.012)
        bag = (u >= 0.14 * b) & (u <= 0.24 * b) & (v >= 0.42) & (v <= 0.56)
        _paint(canvas, strap | bag, ident.bag_color)
        body |= bag
    elif ident.bag == 3:  # hand bag
        bag = (u >= 0.13 * b) & (u <= 0.23 * b) & (v >= 0.52) & (v <= 0.62)
        _paint(canvas, bag, ident.bag_color)
        body |= bag
    body |= torso | arms | legs | shoes | head | neck

    # soft cylindrical shading and a light change on the person
    shade = 1.0 - 0.28 * np.clip(au / (0.17 * b), 0, 1) ** 2
    canvas = np.where(body[..., None], canvas * (shade * light)[..., None], canvas)

    # downsample (anti-aliasing), then the camera style
    img = canvas.reshape(height, _SS, width, _SS, 3).mean(axis=(1, 3))
    img = img * (st.gains * cam.gains)
    gray = img.mean(axis=2, keepdims=True)
    img = gray + st.saturation * (img - gray)
    img = (img - 0.5) * st.contrast + 0.5 + st.brightness + cam.brightness
    img = np.clip(img, 0.0, 1.0) ** st.gamma
    if st.vignette:
        ry_, rx_ = np.linspace(-1, 1, height)[:, None], np.linspace(-1, 1, width)[None, :]
        img = img * (1.0 - st.vignette * 0.5 * (ry_**2 + rx_**2))[..., None]
    img = _blur(img.astype(np.float32), st.blur + cam.blur)
    img = img + st.noise * r.standard_normal(img.shape, dtype=np.float32)
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


# ----------------------------------------------------------------------------------- the dataset


class SyntheticReID:
    """Seeded synthetic multi-domain Re-ID data: item lists plus an on-demand renderer.

    Args:
        num_train_ids: training identities (spread round-robin over the source styles).
        num_test_ids: test identities (shown under every held-out style).
        num_styles: camera styles (domains) in total.
        held_out_styles: styles never seen in training; each gets its own query / gallery.
        images_per_id_per_style: images of an identity in a style (test: 1 query + the rest
            gallery).
        cameras_per_style: cameras per style (>= 2; query and gallery use different cameras).
        height, width: image size (default 64 x 32).
        seed: everything (identities, styles, cameras, images) is a function of the seed.
        shared_train_ids: show each train identity in every source style (default: one style).
        num_distractor_ids: extra gallery-only identities per held-out style.
        cache: keep rendered images in memory (about 6 KB each at 64 x 32).

    Examples:
        >>> from metabin_layers.reid.synthetic import SyntheticReID
        >>> ds = SyntheticReID(num_train_ids=8, num_test_ids=4, num_styles=3, held_out_styles=(2,))
        >>> ds.source_styles, ds.num_domains, ds.num_train_pids
        ([0, 1], 2, 8)
        >>> ds.train[0].img_path
        'synthetic://style0/id0/0'
    """

    def __init__(
        self,
        num_train_ids: int = 200,
        num_test_ids: int = 50,
        num_styles: int = 5,
        held_out_styles: Sequence[int] = (4,),
        images_per_id_per_style: int = 8,
        cameras_per_style: int = 3,
        height: int = 64,
        width: int = 32,
        seed: int = 0,
        shared_train_ids: bool = False,
        num_distractor_ids: int = 0,
        cache: bool = True,
    ) -> None:
        held = sorted({int(s) for s in held_out_styles})
        if num_styles < 2:
            raise ValueError(f"num_styles must be >= 2, got {num_styles}")
        if any(not 0 <= s < num_styles for s in held):
            raise ValueError(f"held_out_styles {held} must lie in 0..{num_styles - 1}")
        if not held or len(held) == num_styles:
            raise ValueError("held_out_styles must hold at least one style and leave at least one source style")
        if num_train_ids < 1 or num_test_ids < 1 or num_distractor_ids < 0:
            raise ValueError("num_train_ids and num_test_ids must be >= 1, num_distractor_ids >= 0")
        if images_per_id_per_style < 2:
            raise ValueError(f"images_per_id_per_style must be >= 2, got {images_per_id_per_style}")
        if cameras_per_style < 2:
            raise ValueError(f"cameras_per_style must be >= 2, got {cameras_per_style}")
        if height < 8 or width < 4:
            raise ValueError(f"image size {height}x{width} is too small (min 8x4)")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.num_train_ids = int(num_train_ids)
        self.num_test_ids = int(num_test_ids)
        self.num_distractor_ids = int(num_distractor_ids)
        self.num_styles = int(num_styles)
        self.held_out_styles: list[int] = held
        self.source_styles: list[int] = [s for s in range(num_styles) if s not in held]
        self.images_per_id_per_style = int(images_per_id_per_style)
        self.cameras_per_style = int(cameras_per_style)
        self.height, self.width = int(height), int(width)
        self.seed = int(seed)
        self.shared_train_ids = bool(shared_train_ids)
        self._cache: dict[str, np.ndarray] | None = {} if cache else None
        self._identities: dict[int, _Identity] = {}
        self._styles: dict[int, _Style] = {}
        self._cameras: dict[tuple[int, int], _Camera] = {}
        self._camera_of: dict[tuple[int, int, int], int] = {}

        layout = _rng(self.seed, _TAG_LAYOUT)
        n, c = self.images_per_id_per_style, self.cameras_per_style
        self.train: list[SyntheticItem] = []
        for gid in range(self.num_train_ids):
            styles = self.source_styles if self.shared_train_ids else [self.source_styles[gid % len(self.source_styles)]]
            for s in styles:
                c0 = int(layout.integers(c))
                for k in range(n):
                    self.train.append(self._add(s, gid, k, (c0 + k) % c, pid=gid, domain=self.source_styles.index(s)))
        self.query: dict[int, list[SyntheticItem]] = {}
        self.gallery: dict[int, list[SyntheticItem]] = {}
        first_test = self.num_train_ids
        for s in held:
            q, g = [], []
            for gid in range(first_test, first_test + self.num_test_ids):
                c0 = int(layout.integers(c))
                others = [x for x in range(c) if x != c0]
                q.append(self._add(s, gid, 0, c0, pid=gid, domain=s))
                for k in range(1, n):
                    g.append(self._add(s, gid, k, others[(k - 1) % len(others)], pid=gid, domain=s))
            for gid in range(first_test + self.num_test_ids, first_test + self.num_test_ids + self.num_distractor_ids):
                c0 = int(layout.integers(c))
                for k in range(n - 1):
                    g.append(self._add(s, gid, k, (c0 + k) % c, pid=gid, domain=s))
            self.query[s], self.gallery[s] = q, g

    # -- bookkeeping ------------------------------------------------------------------------
    def _add(self, style: int, gid: int, k: int, camera: int, pid: int, domain: int) -> SyntheticItem:
        self._camera_of[(style, gid, k)] = camera
        return SyntheticItem(f"synthetic://style{style}/id{gid}/{k}", pid, style * self.cameras_per_style + camera, domain)

    @property
    def num_train_pids(self) -> int:
        """Number of training identities (classifier size); train pids are ``0 .. n-1``."""
        return self.num_train_ids

    @property
    def num_domains(self) -> int:
        """Number of source styles (training domains)."""
        return len(self.source_styles)

    def style_params(self, style: int) -> dict[str, Any]:
        """The parameters of a style (background kind, colour cast, blur, noise, ...)."""
        st = self._style(style)
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in st.__dict__.items()}

    def _identity(self, gid: int) -> _Identity:
        if gid not in self._identities:
            self._identities[gid] = _identity(self.seed, gid)
        return self._identities[gid]

    def _style(self, style: int) -> _Style:
        if not 0 <= style < self.num_styles:
            raise ValueError(f"style {style} outside 0..{self.num_styles - 1}")
        if style not in self._styles:
            self._styles[style] = _style(self.seed, style)
        return self._styles[style]

    def _camera(self, style: int, camera: int) -> _Camera:
        if not 0 <= camera < self.cameras_per_style:
            raise ValueError(f"camera {camera} outside 0..{self.cameras_per_style - 1}")
        key = (style, camera)
        if key not in self._cameras:
            self._cameras[key] = _camera(self.seed, style, camera)
        return self._cameras[key]

    # -- rendering --------------------------------------------------------------------------
    def render_image(self, identity: int, style: int, camera: int, instance: int) -> np.ndarray:
        """Render identity ``identity`` under ``style`` / ``camera``; ``instance`` picks the pose.

        Pure function of ``(seed, identity, style, camera, instance)``; not cached. Any
        identity can be rendered under any style (``save_examples`` uses this).
        """
        r = _rng(self.seed, _TAG_IMAGE, style, camera, identity, instance)
        return _render(self._identity(identity), self._style(style), self._camera(style, camera), self.height, self.width, r)

    def render(self, item: SyntheticItem | Sequence[Any] | str) -> np.ndarray:
        """The uint8 ``(height, width, 3)`` image of an item (or of its ``synthetic://`` path)."""
        path = item if isinstance(item, str) else item[0]
        if self._cache is not None and path in self._cache:
            return self._cache[path]
        m = _PATH_RE.match(path)
        if m is None:
            raise ValueError(f"not a synthetic path: {path!r}")
        style, gid, k = (int(x) for x in m.groups())
        try:
            camera = self._camera_of[(style, gid, k)]
        except KeyError:
            raise ValueError(f"{path!r} is not an image of this dataset") from None
        img = self.render_image(gid, style, camera, k)
        img.setflags(write=False)
        if self._cache is not None:
            self._cache[path] = img
        return img

    def dataset(
        self, split: str = "train", style: int | None = None, transform: Callable[[Any], Any] | None = None
    ) -> SyntheticReIDDataset:
        """A torch ``Dataset`` over ``"train"`` or over the ``"query"`` / ``"gallery"`` of a style.

        ``style`` defaults to the first held-out style for query / gallery.
        """
        if split == "train":
            items = self.train
        elif split in ("query", "gallery"):
            style = self.held_out_styles[0] if style is None else int(style)
            if style not in self.held_out_styles:
                raise ValueError(f"style {style} is not a held-out style {self.held_out_styles}")
            items = self.query[style] if split == "query" else self.gallery[style]
        else:
            raise ValueError(f"split must be 'train', 'query' or 'gallery', got {split!r}")
        return SyntheticReIDDataset(self, items, transform)

    def example_grid(self, num_ids: int = 6, per_style: int = 2, pad: int = 2, scale: int = 3) -> np.ndarray:
        """uint8 grid: one row per identity, ``per_style`` cameras of every style per row.

        Rows are the first ``num_ids`` test identities (they are not tied to a style); columns go
        style by style. Shape: ``((rows * (H + pad) + pad) * scale, (cols * (W + pad) + pad) * scale, 3)``
        with ``cols = num_styles * per_style``. Style groups are separated by grey gutters.
        """
        h, w = self.height, self.width
        cols = self.num_styles * per_style
        grid = np.full((num_ids * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, dtype=np.uint8)
        for col in range(cols):
            if col % per_style == 0 and col:
                x = col * (w + pad)
                grid[:, x : x + pad] = 128
        for row in range(num_ids):
            gid = self.num_train_ids + row
            for col in range(cols):
                style, cam = divmod(col, per_style)
                img = self.render_image(gid, style, cam % self.cameras_per_style, col)
                y, x = pad + row * (h + pad), pad + col * (w + pad)
                grid[y : y + h, x : x + w] = img
        if scale > 1:
            grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
        return grid

    def save_examples(self, path: str | Path, num_ids: int = 6, per_style: int = 2, scale: int = 3) -> np.ndarray:
        """Write ``example_grid`` as a PNG (PIL) and return the grid array."""
        from PIL import Image

        grid = self.example_grid(num_ids=num_ids, per_style=per_style, scale=scale)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid).save(path)
        return grid

    def __repr__(self) -> str:
        return (
            f"SyntheticReID(train={len(self.train)} images / {self.num_train_ids} ids / "
            f"{self.num_domains} source styles {self.source_styles}, held-out styles "
            f"{self.held_out_styles}: query {[len(self.query[s]) for s in self.held_out_styles]}, "
            f"gallery {[len(self.gallery[s]) for s in self.held_out_styles]}, "
            f"{self.height}x{self.width}, seed={self.seed})"
        )


class SyntheticReIDDataset(Dataset):
    """Torch dataset over synthetic items; returns ``{img, pid, camid, domain, path}``.

    ``img`` is ``transform(uint8 HWC numpy array)`` if a transform is given (e.g.
    ``metabin_layers.reid.transforms.build_train_transform``), else a uint8 tensor
    ``(3, H, W)``.

    Args:
        source: the ``SyntheticReID`` that renders the images.
        items: the items to serve (e.g. ``source.train`` or ``source.query[style]``).
        transform: applied to the uint8 ``(H, W, 3)`` array; None returns a uint8 tensor.

    Examples:
        >>> from metabin_layers.reid.synthetic import SyntheticReID, SyntheticReIDDataset
        >>> ds = SyntheticReID(num_train_ids=4, num_test_ids=2, num_styles=2, held_out_styles=(1,))
        >>> SyntheticReIDDataset(ds, ds.query[1])[0]["img"].shape
        torch.Size([3, 64, 32])
    """

    def __init__(
        self, source: SyntheticReID, items: Sequence[SyntheticItem], transform: Callable[[Any], Any] | None = None
    ) -> None:
        self.source = source
        self.items = list(items)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        img = self.source.render(item)
        out = self.transform(img) if self.transform is not None else torch.from_numpy(img.copy()).permute(2, 0, 1).contiguous()
        return {"img": out, "pid": int(item[1]), "camid": int(item[2]), "domain": int(item[3]), "path": item[0]}


def save_examples(
    path: str | Path, dataset: SyntheticReID | None = None, num_ids: int = 6, per_style: int = 2, scale: int = 3
) -> np.ndarray:
    """Write a PNG grid of a few identities under every style (default dataset if none given).

    Args:
        path: where to write the PNG.
        dataset: the dataset to draw from (default: ``SyntheticReID()``).
        num_ids: identities (rows).
        per_style: images per identity and style.
        scale: integer upscaling of each image.

    Returns:
        The grid as a uint8 ``(H, W, 3)`` array (what was written).

    Examples:
        >>> from metabin_layers.reid.synthetic import save_examples
        >>> import tempfile, os
        >>> with tempfile.TemporaryDirectory() as d:
        ...     grid = save_examples(os.path.join(d, "grid.png"), num_ids=2, scale=1)
        >>> grid.shape
        (134, 342, 3)
    """
    dataset = dataset if dataset is not None else SyntheticReID()
    return dataset.save_examples(path, num_ids=num_ids, per_style=per_style, scale=scale)
