"""Checks of a run's data that fail before the first iteration, not after hours of training.

Each error names the dataset and the folder it was read from (synthetic data: the style).

Examples:
    >>> from metabin_layers.reid.checks import check_targets
    >>> from metabin_layers.reid.data import RecipeData, TargetSplit
    >>> data = RecipeData([(None, 0, 0, 0)], None, 1, 1, {"viper": [TargetSplit([], [1])]}, "", folders={"viper": "/data/viper"})
    >>> check_targets(data)
    Traceback (most recent call last):
    ...
    metabin_layers.reid.errors.DataError: target viper (folder /data/viper): the query set is empty
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Any, Iterable, Optional

from .config import TrainConfig
from .data import RecipeData
from .errors import DataError, RecipeError
from .validation import check_meta_domains

__all__ = ["check_targets", "check_sources", "check_data", "check_images", "check_pretrained"]


def check_pretrained(cfg: TrainConfig) -> None:
    """The ``pretrained`` checkpoint, if set, is a file: checked before the data are built.

    Args:
        cfg: the run's config; ``pretrained`` is read.

    Raises:
        RecipeError: ``pretrained`` names no file (the message gives the path).

    Examples:
        >>> from metabin_layers.reid.checks import check_pretrained
        >>> from metabin_layers.reid.config import TrainConfig
        >>> check_pretrained(TrainConfig())  # none set: nothing to check
        >>> try:
        ...     check_pretrained(TrainConfig(pretrained="/no/such/resnet50.pth"))
        ... except RecipeError as err:
        ...     print(err)
        pretrained /no/such/resnet50.pth: no such file (a local ImageNet checkpoint; nothing is downloaded)
    """
    if cfg.pretrained is not None and not os.path.isfile(cfg.pretrained):
        raise RecipeError(f"pretrained {cfg.pretrained}: no such file (a local ImageNet checkpoint; nothing is downloaded)")


def _where(data: RecipeData, name: str) -> str:
    folder = data.folders.get(name)
    return f"{name} (folder {folder})" if folder else f"{name} (synthetic data)"


def check_targets(data: RecipeData) -> None:
    """Every evaluation target has a non-empty query and gallery in every split.

    Args:
        data: the run's data (``metabin_layers.reid.data.build_data``); its ``targets`` are checked.

    Raises:
        DataError: naming the target, its folder and the split.

    Examples:
        >>> from metabin_layers.reid.checks import check_targets
        >>> from metabin_layers.reid.data import RecipeData, TargetSplit
        >>> targets = {"grid": [TargetSplit([0], [1, 2]), TargetSplit([0], [])]}
        >>> check_targets(RecipeData([(None, 0, 0, 0)], None, 1, 1, targets, "", folders={"grid": "/data/grid"}))
        Traceback (most recent call last):
        ...
        metabin_layers.reid.errors.DataError: target grid (folder /data/grid), split 1: the gallery set is empty
    """
    for name, splits in data.targets.items():
        if not splits:
            raise DataError(f"target {_where(data, name)}: no query/gallery split")
        for i, split in enumerate(splits):
            which = f", split {i}" if len(splits) > 1 else ""
            for part in ("query", "gallery"):
                if len(getattr(split, part)) == 0:
                    raise DataError(f"target {_where(data, name)}{which}: the {part} set is empty")


def _domain_names(cfg: TrainConfig, data: RecipeData) -> dict[Any, str]:
    domains = sorted({item[3] for item in data.train_items})
    if cfg.data_root is not None and not cfg.cameras_as_domains and len(cfg.sources) == len(domains):
        return {d: _where(data, name) for d, name in zip(domains, cfg.sources)}
    kind = "camera domain" if cfg.cameras_as_domains else "domain"
    source = ", ".join(_where(data, n) for n in cfg.sources) if cfg.data_root is not None else "synthetic data"
    return {d: f"{kind} {d} of {source}" for d in domains}


def check_sources(cfg: TrainConfig, data: RecipeData) -> None:
    """The training sources can fill the P x K batch and, for MetaBIN, the domain-balanced meta batch.

    Raises:
        ConfigError: for a meta-learned ``norm`` on real data, fewer than two domains, or
            ``num_meta_train_domains`` / ``meta_batch_size`` that do not fit the domains read
            (``validation.check_meta_domains``).
        DataError: no training image; fewer identities over all sources than ``P = batch_size /
            num_instances``; a source (domain) with fewer identities than the meta batch takes from
            each domain (``meta_batch_size / (num_domains * num_instances)``). Each names the
            dataset and its folder.

    Args:
        cfg: the run's config; ``batch_size``, ``num_instances``, ``meta_batch_size``, ``norm``,
            ``sources``, ``data_root`` and ``cameras_as_domains`` are read.
        data: the run's data (``metabin_layers.reid.data.build_data``); its ``train_items``
            ``(img_path, pid, camid, domain)`` are checked.

    Examples:
        >>> from metabin_layers.reid.checks import check_sources
        >>> from metabin_layers.reid.config import TrainConfig
        >>> from metabin_layers.reid.data import build_data
        >>> from metabin_layers.reid.errors import DataError
        >>> cfg = TrainConfig(syn_train_ids=4, syn_test_ids=2, syn_styles=3, syn_held_out=[2],
        ...                   syn_images_per_id=2, batch_size=8, num_instances=2, meta_batch_size=16)
        >>> try:
        ...     check_sources(cfg, build_data(cfg))
        ... except DataError as err:
        ...     print(str(err).split(",")[0])
        source domain 0 of synthetic data: 2 identities
    """
    if len(data.train_items) == 0:
        raise DataError(f"sources {', '.join(_where(data, n) for n in cfg.sources)}: no training image")
    ids: dict[Any, set] = defaultdict(set)
    for item in data.train_items:
        ids[item[3]].add(item[1])
    names = _domain_names(cfg, data)
    p = cfg.batch_size // cfg.num_instances
    total = len(set().union(*ids.values()))
    if total < p:
        counts = ", ".join(f"{names[d]}: {len(v)}" for d, v in sorted(ids.items()))
        raise DataError(
            f"the sources hold {total} identities, fewer than P = batch_size / num_instances = "
            f"{cfg.batch_size} / {cfg.num_instances} = {p} ({counts})"
        )
    if cfg.data_root is not None:  # the synthetic data's domains were checked with the config
        check_meta_domains(cfg, len(ids))
    if cfg.norm == "metabin":
        per_domain = cfg.meta_batch_size // max(1, len(ids) * cfg.num_instances)
        for d, v in sorted(ids.items()):
            if len(v) < per_domain:
                raise DataError(
                    f"source {names[d]}: {len(v)} identities, fewer than the {per_domain} per domain that "
                    f"meta_batch_size={cfg.meta_batch_size} over {len(ids)} domains x num_instances="
                    f"{cfg.num_instances} takes"
                )


def check_data(cfg: TrainConfig, data: RecipeData) -> None:
    """``check_sources`` and ``check_targets``: everything that would stop a run later.

    Args:
        cfg: the run's config (see ``check_sources``).
        data: the run's data, built from ``cfg`` by ``metabin_layers.reid.data.build_data``.

    Raises:
        DataError: the first problem found, sources first.

    Examples:
        >>> from metabin_layers.reid.checks import check_data
        >>> from metabin_layers.reid.config import TrainConfig
        >>> from metabin_layers.reid.data import build_data
        >>> cfg = TrainConfig(syn_train_ids=4, syn_test_ids=2, syn_styles=3, syn_held_out=[2],
        ...                   syn_images_per_id=2, batch_size=8, num_instances=2, meta_batch_size=8)
        >>> check_data(cfg, build_data(cfg))  # passes silently
    """
    check_sources(cfg, data)
    check_targets(data)


def _image_problem(path: str) -> Optional[str]:
    """Why ``path`` does not open as an image (its header only is read), or None."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.size  # noqa: B018 (parsed from the header; the pixels are not decoded)
    except Image.DecompressionBombError as err:  # a header asking for more pixels than PIL decodes
        return f"too large to decode ({err})"
    except (OSError, ValueError, SyntaxError) as err:  # PIL raises all three for bad files
        return f"{type(err).__name__}: {err}"
    return None


def _image_sets(data: RecipeData) -> Iterable[tuple[str, Iterable[str]]]:
    from .datasets import ImageDataset

    yield "the training set", (str(item[0]) for item in data.train_items)
    for name, splits in data.targets.items():
        for i, split in enumerate(splits):
            which = f", split {i}" if len(splits) > 1 else ""
            for part in ("query", "gallery"):
                ds = getattr(split, part)
                if isinstance(ds, ImageDataset):
                    yield f"target {name}{which}, {part}", (it.img_path for it in ds.items)


def check_images(data: RecipeData) -> None:
    """Every image file of the run opens as an image: training, query and gallery sets alike.

    Reads each file's header (a few hundred bytes; the pixels are not decoded), so a file that is
    empty, not an image, a broken symlink or a symlink loop, or too large for PIL to decode
    (``PIL.Image.MAX_IMAGE_PIXELS``) is found before the first iteration, not in the middle of
    training or after it. Images of the synthetic data are drawn, not read: nothing to check.

    Args:
        data: the run's data (``metabin_layers.reid.data.build_data``).

    Raises:
        DataError: naming the set, the file and why it does not open.

    Examples:
        >>> import os, tempfile
        >>> from metabin_layers.reid.checks import check_images
        >>> from metabin_layers.reid.data import RecipeData
        >>> bad = os.path.join(tempfile.mkdtemp(), "0001_c1s1_000101_00.jpg")
        >>> _ = open(bad, "wb").write(b"")
        >>> data = RecipeData([(bad, 0, 0, 0)], None, 1, 1, {}, "", folders={"market1501": "/data"})
        >>> try:
        ...     check_images(data)
        ... except DataError as err:
        ...     print(str(err).split(":")[0])
        the training set
    """
    if not data.folders:  # synthetic data
        return
    seen: set[str] = set()
    for where, paths in _image_sets(data):
        for path in paths:
            if path in seen:
                continue
            seen.add(path)
            problem = _image_problem(path)
            if problem is not None:
                raise DataError(f"{where}: cannot read image {path}: {problem}")
