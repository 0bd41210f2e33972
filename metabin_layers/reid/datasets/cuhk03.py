"""CUHK03 (Li et al., CVPR 2014) under the new 767/700 protocol (Zhong et al., CVPR 2017)."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

from .base import (
    Layout,
    PathLike,
    RawItem,
    ReIDDataset,
    list_images,
    parse_market_style,
    search_layout,
)

__all__ = ["CUHK03", "extract_cuhk03_images"]

_SUBSETS = ("bounding_box_train", "query", "bounding_box_test")
_MAT_BASES = ("cuhk03", "")
_NP_BASES = ("cuhk03-np", "cuhk03/cuhk03-np", "CUHK03-NP", "cuhk03_np", "")
#: ``<pair>_<person>_<view>_<image>.png``, torchreid's names for images extracted from cuhk-03.mat.
_EXTRACTED_RE = re.compile(r"^(\d+)_(\d+)_(\d+)_(\d+)\.")

CUHK03Layout = Literal["auto", "mat", "folder", "images"]


class CUHK03(ReIDDataset):
    """CUHK03, labeled or detected boxes, new protocol: 767 training ids, 700 test ids
    (detected: 7,365 train / 1,400 query / 5,332 gallery images), camid = view (0 or 1).

    Accepted layouts (``layout="auto"`` tries them in this order)::

        "mat"    <root>/cuhk03/{cuhk03_new_protocol_config_<mode>.mat, images_<mode>/}
                 torchreid / MetaBIN layout (<mode> = detected or labeled), read with
                 scipy.io.loadmat (needs scipy). ``images_<mode>/`` holds torchreid's
                 extracted images ``<pair>_<person:03d>_<view>_<n:02d>.png``; if it is missing
                 and ``<root>/cuhk03/cuhk03_release/cuhk-03.mat`` exists, the images are
                 extracted from it first (needs h5py, as torchreid). Also accepted directly
                 under <root>.
        "folder" <root>/cuhk03-np/<mode>/{bounding_box_train,query,bounding_box_test}
                 the common pre-extracted CUHK03-NP image folders (Market-style names
                 ``0001_c1_1.png``); also under <root>/cuhk03/cuhk03-np, <root>/CUHK03-NP,
                 <root>/cuhk03_np or <root>/<mode>. Needs neither scipy nor h5py; in
                 ``auto`` mode it is used when scipy (or h5py, for extraction) is missing.
        "images" <root>/cuhk03/images_<mode>/ without protocol file, only with
                 ``combine_all=True``: every image is training data with identity
                 ``(pair, person)`` (MetaBIN's ``DG_CUHK03_detected``).

    Only the new protocol is supported (not the 20 classic splits).

    Args:
        root: folder searched for the layouts above.
        labeled: use the hand-labeled boxes instead of the detected ones (default detected,
            as torchreid and MetaBIN).
        layout: ``"auto"`` (try the layouts in the order above), or ``"mat"``, ``"folder"`` or
            ``"images"`` to use that one only.
        extract: allow extracting ``images_<mode>`` from ``cuhk-03.mat``.
        combine_all: see ``ReIDDataset``.
        domain: see ``ReIDDataset``.
        verbose: see ``ReIDDataset``.

    Attributes:
        mode: ``"labeled"`` or ``"detected"``.
        used_layout: the layout found: ``"mat"``, ``"folder"`` or ``"images"``.

    Raises:
        ValueError: ``layout`` is not one of the four names, ``layout="images"`` without
            ``combine_all``, or a malformed layout.
        FileNotFoundError: no layout found under ``root``.
        ImportError: the only data found needs scipy or h5py, which is not installed.

    Examples:
        >>> import os, tempfile
        >>> from PIL import Image
        >>> from metabin_layers.reid.datasets import CUHK03
        >>> files = ["bounding_box_train/0001_c1_1.png", "query/0002_c1_1.png", "bounding_box_test/0002_c2_1.png"]
        >>> with tempfile.TemporaryDirectory() as root:
        ...     for f in files:
        ...         path = os.path.join(root, "cuhk03-np", "detected", f)
        ...         os.makedirs(os.path.dirname(path), exist_ok=True)
        ...         Image.new("RGB", (8, 16)).save(path)
        ...     ds = CUHK03(root)
        >>> ds.used_layout, ds.mode, len(ds.train), ds.gallery[0].camid
        ('folder', 'detected', 1, 1)
    """

    name: ClassVar[str] = "CUHK03"

    def __init__(
        self,
        root: PathLike,
        labeled: bool = False,
        *,
        layout: CUHK03Layout = "auto",
        extract: bool = True,
        combine_all: bool = False,
        domain: int = 0,
        verbose: bool = False,
    ) -> None:
        if layout not in ("auto", "mat", "folder", "images"):
            raise ValueError(f"{self.name}: layout must be auto, mat, folder or images, got {layout!r}")
        if layout == "images" and not combine_all:
            raise ValueError(f"{self.name}: layout='images' has no query/gallery; use it with combine_all=True")
        self.labeled = bool(labeled)
        self.mode = "labeled" if self.labeled else "detected"
        self.layout = layout
        self.extract = extract
        self.used_layout = ""
        self._missing_module = False
        super().__init__(root, combine_all=combine_all, domain=domain, verbose=verbose)

    # -- layout search ------------------------------------------------------------------------
    def _base(self, sub: str) -> str:
        return os.path.join(self.root, sub) if sub else self.root

    def _images_dir(self, base: str, problems: list[str]) -> str | None:
        """``base/images_<mode>``, extracting it from ``cuhk03_release/cuhk-03.mat`` if needed.
        In ``auto`` mode a missing h5py is recorded in ``problems`` instead of raised."""
        img_dir = os.path.join(base, f"images_{self.mode}")
        if os.path.isdir(img_dir):
            return img_dir
        raw = os.path.join(base, "cuhk03_release", "cuhk-03.mat")
        if self.extract and os.path.isfile(raw):
            try:
                extract_cuhk03_images(raw, self.mode, img_dir)
            except ImportError as exc:
                if self.layout != "auto":
                    raise
                problems.append(str(exc))
                self._missing_module = True
                return None
            return img_dir
        return None

    def _expected(self) -> str:
        m = self.mode
        return (
            f"<root>/cuhk03/{{cuhk03_new_protocol_config_{m}.mat,images_{m}}} (torchreid/MetaBIN; "
            f"images_{m} is extracted from <root>/cuhk03/cuhk03_release/cuhk-03.mat if h5py is "
            f"installed; needs scipy) or <root>/cuhk03-np/{m}/{{{','.join(_SUBSETS)}}} (CUHK03-NP "
            f"image folders) or, with combine_all=True, <root>/cuhk03/images_{m}"
        )

    def _load(self) -> tuple[list[RawItem], list[RawItem], list[RawItem]]:
        problems: list[str] = []
        self._missing_module = False
        if self.layout in ("auto", "mat"):
            for sub in _MAT_BASES:
                base = self._base(sub)
                cfg = os.path.join(base, f"cuhk03_new_protocol_config_{self.mode}.mat")
                if not os.path.isfile(cfg):
                    continue
                if self.layout == "auto" and not _has_scipy():
                    problems.append(f"reading {cfg!r} needs scipy (pip install scipy)")
                    self._missing_module = True
                    continue
                img_dir = self._images_dir(base, problems)
                if img_dir is None:
                    if not self._missing_module:
                        problems.append(f"{cfg!r} found but {os.path.join(base, f'images_{self.mode}')!r} is missing")
                    continue
                self.dataset_dir, self.used_layout = img_dir, "mat"
                return self._load_new_protocol(cfg, img_dir)
        if self.layout in ("auto", "folder"):
            layouts = [Layout(f"{sub}/{self.mode}".lstrip("/"), _SUBSETS) for sub in _NP_BASES]
            found, folder, malformed = search_layout(self.root, layouts)
            problems += [f"{d!r} lacks {', '.join(missing)}" for d, missing in malformed[:1]]
            if found is not None:
                self.dataset_dir, self.used_layout = folder, "folder"
                train, query, gallery = (parse_market_style(os.path.join(folder, s), self.name) for s in _SUBSETS)
                return train, query, gallery
        if self.layout in ("auto", "images") and self.combine_all:
            for sub in _MAT_BASES:
                img_dir = self._images_dir(self._base(sub), problems)
                if img_dir is not None:
                    self.dataset_dir, self.used_layout = img_dir, "images"
                    return self._load_all_images(img_dir), [], []
        if os.path.isdir(os.path.join(self.root, "cuhk03")) and not problems:
            problems.append(f"{os.path.join(self.root, 'cuhk03')!r} holds no usable {self.mode} data")
        if self._missing_module:
            raise ImportError(
                f"{self.name}: no usable layout under root {self.root!r}: {'; '.join(problems)}; expected {self._expected()}"
            )
        if problems:
            raise ValueError(
                f"{self.name}: malformed layout under root {self.root!r}: {'; '.join(problems)}; expected {self._expected()}"
            )
        raise FileNotFoundError(f"{self.name}: no dataset found under root {self.root!r}; expected {self._expected()}")

    # -- parsers --------------------------------------------------------------------------------
    def _load_new_protocol(self, cfg_path: str, img_dir: str) -> tuple[list[RawItem], list[RawItem], list[RawItem]]:
        try:
            from scipy.io import loadmat
        except ImportError:
            raise ImportError(
                f"{self.name}: reading {cfg_path!r} needs scipy (pip install scipy); or use the "
                "CUHK03-NP image-folder layout (layout='folder')"
            ) from None
        mat = loadmat(cfg_path)
        try:
            filelist = [_cell_to_str(cell) for cell in mat["filelist"].flatten()]
            labels = [int(x) for x in mat["labels"].flatten()]
            idxs = {k: [int(i) - 1 for i in mat[f"{k}_idx"].flatten()] for k in ("train", "query", "gallery")}
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                f"{self.name}: {cfg_path!r} is not a new-protocol config (needs filelist, labels, "
                f"train_idx, query_idx, gallery_idx): {exc!r}"
            ) from None
        out: list[list[RawItem]] = []
        missing: list[str] = []
        for key in ("train", "query", "gallery"):
            subset: list[RawItem] = []
            for i in idxs[key]:
                if not 0 <= i < len(filelist) or i >= len(labels):
                    raise ValueError(f"{self.name}: {key}_idx in {cfg_path!r} is out of range ({i + 1})")
                name = filelist[i]
                try:
                    camid = int(name.split("_")[2]) - 1
                except (IndexError, ValueError):
                    raise ValueError(
                        f"{self.name}: cannot parse the view from {name!r} in {cfg_path!r}; expected "
                        "'<pair>_<person>_<view>_<n>.png'"
                    ) from None
                path = os.path.join(img_dir, name)
                if not os.path.isfile(path):
                    missing.append(path)
                subset.append((path, labels[i], camid))
            out.append(subset)
        if missing:
            raise ValueError(
                f"{self.name}: {len(missing)} images listed in {cfg_path!r} are missing from "
                f"{img_dir!r} (e.g. {missing[0]!r}); re-extract {img_dir!r}"
            )
        return out[0], out[1], out[2]

    def _load_all_images(self, img_dir: str) -> list[RawItem]:
        items: list[RawItem] = []
        for path in list_images(img_dir):
            match = _EXTRACTED_RE.match(os.path.basename(path))
            if match is None:
                raise ValueError(f"{self.name}: cannot parse {path!r}; expected '<pair>_<person>_<view>_<n>.png'")
            pair, person, view = int(match.group(1)), int(match.group(2)), int(match.group(3))
            items.append((path, (pair, person), view - 1))
        if not items:
            raise ValueError(f"{self.name}: no images in {img_dir!r}")
        return items


def _has_scipy() -> bool:
    try:
        import scipy.io  # noqa: F401
    except ImportError:
        return False
    return True


def _cell_to_str(cell: Any) -> str:
    """A MATLAB cell holding a string, as returned by ``loadmat``, to ``str``."""
    while not isinstance(cell, str):
        if hasattr(cell, "flat"):
            cell = cell.flat[0]
        else:
            cell = str(cell)
    return cell


def extract_cuhk03_images(raw_mat_path: PathLike, image_type: str, out_dir: PathLike) -> int:
    """Extract the ``image_type`` (``"detected"`` or ``"labeled"``) images of the original
    ``cuhk-03.mat`` (MATLAB v7.3, read with h5py) into ``out_dir`` with torchreid's names
    ``<pair>_<person:03d>_<view>_<n:02d>.png`` (view 1 for images 1-5, 2 for 6-10).

    The folder is written under a temporary name and renamed when complete.

    Args:
        raw_mat_path: the original ``cuhk-03.mat``.
        image_type: ``"detected"`` or ``"labeled"``, the MATLAB variable to read.
        out_dir: the folder to create (``images_<image_type>`` in the ``"mat"`` layout of
            ``CUHK03``); an existing folder of that name is replaced.

    Returns:
        The number of images written (empty cells of the file are skipped).

    Raises:
        ImportError: h5py is not installed.

    Examples:
        A file with one camera pair and one person, who has images 1 and 6 only (stored
        transposed, as MATLAB writes them):

        >>> import os, tempfile
        >>> import h5py, numpy as np
        >>> from metabin_layers.reid.datasets import extract_cuhk03_images
        >>> with tempfile.TemporaryDirectory() as d:
        ...     raw = os.path.join(d, "cuhk-03.mat")
        ...     with h5py.File(raw, "w") as mat:
        ...         image = mat.create_dataset("image", data=np.zeros((3, 8, 16), np.uint8))
        ...         empty = mat.create_dataset("empty", data=np.zeros(2, np.uint64))
        ...         refs = [[image.ref if n in (0, 5) else empty.ref] for n in range(10)]
        ...         pair = mat.create_dataset("pair1", data=np.array(refs, dtype=h5py.ref_dtype))
        ...         _ = mat.create_dataset("detected", data=np.array([[pair.ref]], dtype=h5py.ref_dtype))
        ...     out = os.path.join(d, "images_detected")
        ...     extract_cuhk03_images(raw, "detected", out), sorted(os.listdir(out))
        (2, ['1_001_1_01.png', '1_001_2_06.png'])
    """
    try:
        import h5py
    except ImportError:
        raise ImportError(
            f"CUHK03: extracting images from {os.fspath(raw_mat_path)!r} needs h5py (pip install h5py); "
            f"or extract them once with torchreid into {os.fspath(out_dir)!r}"
        ) from None
    with h5py.File(os.fspath(raw_mat_path), "r") as mat:
        return _extract_images(mat, image_type, os.fspath(out_dir))


def _extract_images(mat: Any, image_type: str, out_dir: str) -> int:
    """Extraction logic over an h5py-like mapping (``mat[name][0]`` -> camera-pair refs,
    ``mat[ref][:]`` -> transposed arrays); split out for testing without h5py."""
    import numpy as np
    from PIL import Image

    tmp_dir = out_dir + ".partial"
    if os.path.isdir(tmp_dir):
        shutil.rmtree(tmp_dir)
    os.makedirs(tmp_dir)
    count = 0
    pair_refs: Sequence[Any] = mat[image_type][0]
    for pair_idx, pair_ref in enumerate(pair_refs):
        refs = np.asarray(mat[pair_ref][:]).T  # (num_persons, 10)
        for person in range(refs.shape[0]):
            for n, img_ref in enumerate(refs[person, :]):
                img = np.asarray(mat[img_ref][:]).T
                if img.size == 0 or img.ndim < 3:
                    continue  # empty cell: this person lacks this image
                view = 1 if n < 5 else 2
                name = f"{pair_idx + 1:01d}_{person + 1:03d}_{view:01d}_{n + 1:02d}.png"
                Image.fromarray(np.ascontiguousarray(img, dtype=np.uint8)).save(os.path.join(tmp_dir, name))
                count += 1
    os.replace(tmp_dir, out_dir)
    return count
