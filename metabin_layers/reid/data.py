"""Build the training set and the evaluation targets of a recipe run, real or synthetic."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from torch.utils.data import Dataset

from .config import TrainConfig
from .datasets import ImageDataset, ReIDDataset, SplitReIDDataset, build_dataset, cameras_as_domains, combine_sources
from .errors import DataError
from .synthetic import SyntheticReID, SyntheticReIDDataset
from .transforms import build_test_transform, build_train_transform

__all__ = ["TargetSplit", "RecipeData", "SplitProvenanceWarning", "build_data", "split_provenance"]


class SplitProvenanceWarning(UserWarning):
    """Test splits that are not the authors': the run's numbers are not comparable to the paper's.

    ``build_data`` warns once per run with this category; turn it into an error to refuse such
    runs.

    Examples:
        >>> import warnings
        >>> from metabin_layers.reid.data import SplitProvenanceWarning
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("error", SplitProvenanceWarning)
        ...     try:
        ...         warnings.warn("GRID: generated splits", SplitProvenanceWarning)
        ...     except SplitProvenanceWarning as exc:
        ...         print("refused:", exc)
        refused: GRID: generated splits
    """


@dataclass
class TargetSplit:
    """One query/gallery evaluation set (one random split of a small test set, or a held-out style).

    Attributes:
        query: the query images, a dataset of ``{"img", "pid", "camid", ...}`` dicts.
        gallery: the gallery images, searched for each query.

    Examples:
        >>> from metabin_layers.reid.data import TargetSplit
        >>> from metabin_layers.reid.datasets import ImageDataset
        >>> split = TargetSplit(ImageDataset([("q.jpg", 1, 0)]), ImageDataset([("g1.jpg", 1, 1), ("g2.jpg", 7, 1)]))
        >>> len(split.query), len(split.gallery)
        (1, 2)
    """

    query: Dataset
    gallery: Dataset


@dataclass
class RecipeData:
    """Everything a run reads: training items and set, label and domain counts, the targets.

    ``test_splits`` says, per target, where its query/gallery splits come from (see
    ``split_provenance``); it goes into ``results.json`` and the printed table.

    Attributes:
        train_items: the training items ``(img_path, pid, camid, domain)``, all sources.
        train_set: the dataset serving ``train_items`` with the training transforms.
        num_classes: training identities (the classifier's outputs), labelled ``0..num_classes-1``.
        num_domains: distinct domains among ``train_items`` (sources, cameras or styles).
        targets: per target name, its ``TargetSplit`` s (``num_splits`` for the small split test
            sets, one otherwise).
        description: a printable summary of the training data.
        test_splits: per target name, ``split_provenance`` of its splits.
        folders: where each source and target dataset was read from (name -> folder); empty for
            synthetic data.

    Examples:
        >>> from metabin_layers.reid.config import TrainConfig
        >>> from metabin_layers.reid.data import build_data
        >>> cfg = TrainConfig(syn_train_ids=4, syn_test_ids=2, syn_styles=3, syn_held_out=[2], syn_images_per_id=2)
        >>> data = build_data(cfg)
        >>> data.num_classes, data.num_domains, len(data.train_items), len(data.targets["style2"])
        (4, 2, 8, 1)
        >>> data.test_splits
        {'style2': {'authors_split_files': None, 'origin': 'synthetic', 'files': []}}
    """

    train_items: Sequence[Sequence[Any]]
    train_set: Dataset
    num_classes: int
    num_domains: int
    targets: dict[str, list[TargetSplit]]
    description: str
    test_splits: dict[str, dict[str, Any]] = field(default_factory=dict)
    folders: dict[str, str] = field(default_factory=dict)


def split_provenance(datasets: Sequence[ReIDDataset]) -> dict[str, Any]:
    """Where the query/gallery splits of one target (all its split datasets) come from.

    Args:
        datasets: the datasets of one target, one per split (``SplitReIDDataset`` s), or a
            dataset with a fixed query/gallery.

    Returns:
        ``{"authors_split_files": bool | None, "origin": str, "files": [paths]}``:
        ``authors_split_files`` is True when every split was read from the authors' split files,
        False when any was generated or read from another tool's file, and None for a dataset with a
        fixed query/gallery (no split files involved; ``origin`` ``"fixed"``). ``origin`` is the
        datasets' ``split_origin`` (``"authors"``, ``"torchreid"``, ``"generated"``), or
        ``"mixed"`` when the splits disagree. ``files`` are the split files read, sorted.

    Examples:
        >>> from metabin_layers.reid.data import split_provenance
        >>> split_provenance([])
        {'authors_split_files': None, 'origin': 'fixed', 'files': []}
    """
    split_sets = [d for d in datasets if isinstance(d, SplitReIDDataset)]
    if not split_sets:
        return {"authors_split_files": None, "origin": "fixed", "files": []}
    origins = {d.split_origin for d in split_sets}
    return {
        "authors_split_files": origins == {"authors"},
        "origin": origins.pop() if len(origins) == 1 else "mixed",
        "files": sorted({d.split_path for d in split_sets}),
    }


def _warn_not_comparable(test_splits: dict[str, dict[str, Any]]) -> None:
    """One loud warning per run naming every target whose splits are not the authors'."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return
    other = {name: p for name, p in test_splits.items() if p["authors_split_files"] is False}
    if not other:
        return
    lines = [f"  {name}: {p['origin']} splits ({', '.join(p['files'])})" for name, p in other.items()]
    warnings.warn(
        "\n" + "!" * 88 + "\nTHE NUMBERS OF THIS RUN ARE NOT COMPARABLE TO THE PAPER'S: these test sets do not use "
        "the authors' split files:\n" + "\n".join(lines) + "\nPut the authors' split files in place "
        "(docs/recipe.md, 'Dataset preparation') to evaluate on the published splits.\n" + "!" * 88,
        SplitProvenanceWarning,
        stacklevel=3,
    )


def _synthetic(cfg: TrainConfig, train_tf: Callable, test_tf: Callable) -> RecipeData:
    try:
        syn = SyntheticReID(
            num_train_ids=cfg.syn_train_ids,
            num_test_ids=cfg.syn_test_ids,
            num_styles=cfg.syn_styles,
            held_out_styles=tuple(cfg.syn_held_out),
            images_per_id_per_style=cfg.syn_images_per_id,
            height=cfg.height,
            width=cfg.width,
            seed=cfg.seed,
            num_distractor_ids=cfg.syn_distractor_ids,
        )
    except ValueError as err:  # a syn_* setting out of range
        raise DataError(f"synthetic data (the syn_* config keys): {err}") from err
    targets = {
        f"style{s}": [
            TargetSplit(SyntheticReIDDataset(syn, syn.query[s], test_tf), SyntheticReIDDataset(syn, syn.gallery[s], test_tf))
        ]
        for s in syn.held_out_styles
    }
    test_splits: dict[str, dict[str, Any]] = {
        name: {"authors_split_files": None, "origin": "synthetic", "files": []} for name in targets
    }
    return RecipeData(
        syn.train,
        SyntheticReIDDataset(syn, syn.train, train_tf),
        syn.num_train_pids,
        syn.num_domains,
        targets,
        repr(syn),
        test_splits,
    )


def _real(cfg: TrainConfig, train_tf: Callable, test_tf: Callable) -> RecipeData:
    assert cfg.data_root is not None
    if not os.path.isdir(cfg.data_root):
        raise DataError(f"--data-root {cfg.data_root}: no such folder")
    # combine_all (the authors' DATASETS.COMBINEALL / DG_* names): every image of a source is
    # training data in multi-source DG; single-source and supervised runs use the train split.
    flags = cfg.combine_all or [False] * len(cfg.sources)
    problems = _DatasetProblems(cfg.data_root)  # every missing or malformed dataset in one error
    sources = [problems.build(name, combine_all=flag) for name, flag in zip(cfg.sources, flags)]
    probes = {name: problems.build(name) for name in cfg.targets}
    problems.check()
    for name, ds in zip(cfg.sources, sources):
        if not ds.train:  # an empty training folder
            raise DataError(f"source {name} (folder {ds.dataset_dir}): no training image in it")
    train = combine_sources(sources)
    items = train.train
    if cfg.cameras_as_domains:
        items = cameras_as_domains(items)
    num_domains = len({it[3] for it in items})
    folders = {name: ds.dataset_dir for name, ds in zip(cfg.sources, sources)}
    targets: dict[str, list[TargetSplit]] = {}
    test_splits: dict[str, dict[str, Any]] = {}
    for name in cfg.targets:
        probe = probes[name]
        _check_no_leak(name, probe, sources)
        splits = cfg.num_splits if isinstance(probe, SplitReIDDataset) else 1
        sets = [probe] + [build_dataset(name, cfg.data_root, split_id=i) for i in range(1, splits)]
        targets[name] = [TargetSplit(ImageDataset(d.query, test_tf), ImageDataset(d.gallery, test_tf)) for d in sets]
        folders[name] = probe.dataset_dir
        test_splits[name] = split_provenance(sets)
    _warn_not_comparable(test_splits)
    return RecipeData(
        items, ImageDataset(items, train_tf), train.num_train_pids, num_domains, targets, train.summary(), test_splits, folders
    )


class _DatasetProblems:
    """Builds datasets, noting each that fails, so that one ``DataError`` lists them all: a wrong
    ``--data-root`` makes every dataset fail, and the user learns it from one message."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.missing: dict[str, str] = {}
        self.unreadable: dict[str, str] = {}  # found but malformed: layout, file names, split file

    def build(self, name: str, **kwargs: Any) -> Any:
        try:
            return build_dataset(name, self.root, **kwargs)
        except FileNotFoundError as err:
            self.missing.setdefault(name, str(err))
        except ValueError as err:  # also an unknown dataset name (the message lists the known ones)
            self.unreadable.setdefault(name, str(err))
        return None

    def check(self) -> None:
        problems = {**self.missing, **self.unreadable}
        if len(problems) == 1:
            raise DataError(next(iter(problems.values())))
        if problems:
            kinds = (("not found", self.missing), ("unreadable", self.unreadable))
            parts = [f"{kind}: {', '.join(names)}" for kind, names in kinds if names]
            example = next(iter((self.unreadable or self.missing).values()))
            raise DataError(
                f"--data-root {self.root}: {len(problems)} datasets cannot be read ({'; '.join(parts)})\n"
                f"e.g. {example} (every layout: docs/recipe.md, 'Dataset preparation')"
            )


def _check_no_leak(name: str, target: ReIDDataset, sources: Sequence[ReIDDataset]) -> None:
    """A source trained with combine_all holds the query/gallery images of the same dataset."""
    for src in sources:
        if src.combine_all and type(src) is type(target) and src.dataset_dir == target.dataset_dir:
            raise DataError(
                f"target {name!r} is also a source with combine_all on: its query and gallery images would be "
                "training data; set combine_all=false for that source (supervised protocol)"
            )


def build_data(cfg: TrainConfig) -> RecipeData:
    """The training set (with the paper's transforms) and every evaluation target of ``cfg``.

    Without ``cfg.data_root`` the data are synthetic (``SyntheticReID`` with the ``syn_*``
    settings; each held-out style is a target). Otherwise every name of ``cfg.sources`` is built
    under ``cfg.data_root`` with its ``combine_all`` flag and combined, one domain per source (one
    per camera with ``cfg.cameras_as_domains``), and every name of ``cfg.targets`` is built with
    ``cfg.num_splits`` splits if it is a split test set.

    Args:
        cfg: the run's settings (data, image size and augmentation fields are read).

    Returns:
        A ``RecipeData``: the training items and set, the targets, and where each target's
        splits come from.

    Raises:
        DataError: ``cfg.data_root`` is not a folder; datasets are missing or malformed (one
            error lists them all); a target is also a source built with ``combine_all`` (its
            query and gallery images would be training data).

    Warns:
        SplitProvenanceWarning: once, naming every target whose splits are not the authors'.

    Examples:
        >>> from metabin_layers.reid.config import TrainConfig
        >>> from metabin_layers.reid.data import build_data
        >>> cfg = TrainConfig(syn_train_ids=4, syn_test_ids=2, syn_styles=3, syn_held_out=[2], height=16, width=8)
        >>> data = build_data(cfg)  # no data_root: synthetic data
        >>> list(data.targets), data.train_set[0]["img"].shape
        (['style2'], torch.Size([3, 16, 8]))
    """
    train_tf = build_train_transform(cfg.height, cfg.width, flip=cfg.flip, pad=cfg.pad, color_jitter=cfg.color_jitter)
    test_tf = build_test_transform(cfg.height, cfg.width)
    return _synthetic(cfg, train_tf, test_tf) if cfg.data_root is None else _real(cfg, train_tf, test_tf)
