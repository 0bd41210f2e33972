"""Re-ID dataset parsers (torchreid / fast-reid / MetaBIN folder layouts), a torch ``Dataset``
wrapper and the multi-source helper.

Example:
    >>> from metabin_layers.reid.datasets import build_dataset, combine_sources, ImageDataset
    >>> names = ["market1501", "dukemtmcreid", "cuhk02", "cuhk03", "cuhksysu"]
    >>> sources = [build_dataset(n, "datasets", combine_all=True) for n in names]  # doctest: +SKIP
    >>> train = combine_sources(sources)                                         # doctest: +SKIP
    >>> test = build_dataset("prid", "datasets", split_id=3)                      # doctest: +SKIP
    >>> loader_ds = ImageDataset(test.query, transform)                           # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from .base import (
    IMG_EXTENSIONS,
    Layout,
    PathLike,
    ReIDDataset,
    ReIDItem,
    SplitReIDDataset,
    list_images,
)
from .cuhk02 import CUHK02
from .cuhk03 import CUHK03, extract_cuhk03_images
from .cuhksysu import CUHKSYSU
from .dukemtmcreid import DukeMTMCreID
from .grid import GRID
from .ilids import iLIDS
from .image_dataset import ImageDataset, UnreadableImageError, read_image
from .market1501 import Market1501
from .msmt17 import MSMT17
from .multi_source import MultiSourceDataset, cameras_as_domains, combine_sources
from .prid import PRID
from .viper import VIPeR

__all__ = [
    "CUHK02",
    "CUHK03",
    "CUHKSYSU",
    "DATASETS",
    "GRID",
    "IMG_EXTENSIONS",
    "MSMT17",
    "PRID",
    "DukeMTMCreID",
    "ImageDataset",
    "Layout",
    "Market1501",
    "MultiSourceDataset",
    "ReIDDataset",
    "ReIDItem",
    "SplitReIDDataset",
    "UnreadableImageError",
    "VIPeR",
    "build_dataset",
    "cameras_as_domains",
    "combine_sources",
    "dataset_names",
    "extract_cuhk03_images",
    "iLIDS",
    "list_images",
    "read_image",
    "register_dataset",
]

#: Registry ``{name: class}`` (torchreid keys).
DATASETS: dict[str, type[ReIDDataset]] = {
    "market1501": Market1501,
    "dukemtmcreid": DukeMTMCreID,
    "cuhk03": CUHK03,
    "cuhk02": CUHK02,
    "cuhksysu": CUHKSYSU,
    "msmt17": MSMT17,
    "grid": GRID,
    "viper": VIPeR,
    "prid": PRID,
    "ilids": iLIDS,
}

#: Other spellings -> (registry key, default keyword arguments).
_ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    "market": ("market1501", {}),
    "market-1501": ("market1501", {}),
    "duke": ("dukemtmcreid", {}),
    "dukemtmc": ("dukemtmcreid", {}),
    "dukemtmc-reid": ("dukemtmcreid", {}),
    "cuhk03_detected": ("cuhk03", {"labeled": False}),
    "cuhk03_labeled": ("cuhk03", {"labeled": True}),
    "cuhk_sysu": ("cuhksysu", {}),
    "cuhk-sysu": ("cuhksysu", {}),
    "prid2011": ("prid", {}),
    "prid_2011": ("prid", {}),
    "qmul-ilids": ("ilids", {}),
    "qmul_ilids": ("ilids", {}),
}

#: MetaBIN's ``DG_<name>`` training sources use every image (train + query + gallery).
_DG_SOURCES = frozenset({"market1501", "dukemtmcreid", "cuhk02", "cuhk03", "cuhksysu", "msmt17"})


def register_dataset(name: str, cls: type[ReIDDataset], *, overwrite: bool = False) -> None:
    """Add ``cls`` to ``DATASETS`` under ``name`` (lower-cased).

    Args:
        name: the registry key (case-insensitive, as in ``build_dataset``).
        cls: the dataset class, built as ``cls(root, **kwargs)``.
        overwrite: replace a class already registered under ``name``.

    Raises:
        ValueError: ``name`` is already registered and ``overwrite`` is false.

    Examples:
        >>> from metabin_layers.reid.datasets import DATASETS, Market1501, register_dataset
        >>> class MyMarket(Market1501):
        ...     name = "MyMarket"
        >>> register_dataset("MyMarket", MyMarket)
        >>> DATASETS["mymarket"].__name__
        'MyMarket'
        >>> register_dataset("market1501", MyMarket)
        Traceback (most recent call last):
        ...
        ValueError: dataset 'market1501' is already registered (Market1501); pass overwrite=True
        >>> del DATASETS["mymarket"]  # leave the registry as it was
    """
    key = name.lower()
    if key in DATASETS and not overwrite:
        raise ValueError(f"dataset {name!r} is already registered ({DATASETS[key].__name__}); pass overwrite=True")
    DATASETS[key] = cls


def dataset_names() -> list[str]:
    """Registered names and accepted aliases.

    Returns:
        The names ``build_dataset`` accepts (without the ``DG_`` prefixed forms), sorted.

    Examples:
        >>> from metabin_layers.reid.datasets import dataset_names
        >>> [name for name in dataset_names() if name.startswith("cuhk03")]
        ['cuhk03', 'cuhk03_detected', 'cuhk03_labeled']
    """
    return sorted({*DATASETS, *_ALIASES})


def build_dataset(name: str, root: PathLike, **kwargs: Any) -> ReIDDataset:
    """Build a registered dataset: ``DATASETS[name](root, **kwargs)``.

    Names are case-insensitive; aliases such as ``"cuhk03_labeled"``, ``"duke"``,
    ``"cuhk_sysu"`` or ``"prid2011"`` are accepted, and MetaBIN's names too: ``"DG_Market1501"``,
    ``"DG_DukeMTMC"``, ``"DG_CUHK02"``, ``"DG_CUHK03_detected"``, ``"DG_CUHK_SYSU"`` default to
    ``combine_all=True`` (all images are training data, as in the authors' code);
    ``"DG_GRID"``, ``"DG_VIPeR"``, ``"DG_PRID"``, ``"DG_iLIDS"`` are the split test sets.
    Keyword arguments override alias defaults.

    Args:
        name: a registered name, an alias or a ``DG_`` name (see ``dataset_names``).
        root: the dataset root, passed to the class.
        **kwargs: keyword arguments of the class (e.g. ``split_id``, ``combine_all``, ``domain``).

    Returns:
        The dataset, parsed.

    Raises:
        ValueError: unknown name (the message lists the accepted names).

    Examples:
        >>> import os, tempfile
        >>> from PIL import Image
        >>> from metabin_layers.reid.datasets import build_dataset
        >>> with tempfile.TemporaryDirectory() as root:
        ...     os.makedirs(os.path.join(root, "cuhksysu", "cropped_images"))
        ...     Image.new("RGB", (8, 16)).save(os.path.join(root, "cuhksysu", "cropped_images", "p00005_s00001_1.jpg"))
        ...     sysu = build_dataset("cuhk-sysu", root)
        ...     dg_sysu = build_dataset("DG_CUHK_SYSU", root, domain=1)
        >>> type(sysu).__name__, len(sysu.train), sysu.combine_all, dg_sysu.combine_all, dg_sysu.domain
        ('CUHKSYSU', 1, False, True, 1)
    """
    key = name.strip().lower()
    dg = key.startswith("dg_")
    if dg:
        key = key[3:]
    defaults: dict[str, Any] = {}
    if key not in DATASETS and key in _ALIASES:
        key, defaults = _ALIASES[key][0], dict(_ALIASES[key][1])
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(dataset_names())}")
    if dg and key in _DG_SOURCES:
        defaults.setdefault("combine_all", True)
    return DATASETS[key](root, **{**defaults, **kwargs})
