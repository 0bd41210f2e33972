"""Several source datasets as one training set, one domain per source (multi-source DG)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .base import ReIDItem

__all__ = ["MultiSourceDataset", "cameras_as_domains", "combine_sources"]


class MultiSourceDataset:
    """Training items of several sources with identities and domains relabelled over the union.

    Source ``s`` (in the given order) becomes domain ``s``; its training identities (relabelled
    ``0..P_s-1`` in sorted order) are shifted by ``pid_offsets[s] = P_0 + ... + P_{s-1}``, so
    pids are ``0..num_train_pids-1`` over the union (MetaBIN ``data/common.py``; torchreid's
    ``Dataset.__add__``). Camera ids are shifted likewise (``camid_offsets``) unless
    ``offset_camids=False``, so that a camera id names one camera of one source.

    For MetaBIN's multi-source DG, build each source with ``combine_all=True`` (every image of a
    source dataset is training data), e.g.
    ``combine_sources([build_dataset(n, root, combine_all=True) for n in names])``.

    Args:
        sources: datasets (anything with a ``train`` list) or plain item sequences
            ``(img_path, pid, camid[, domain])``; the items' own domain field is replaced.
        names: optional source names (default: the datasets' ``name`` or ``source<i>``).
        offset_camids: shift camera ids per source.

    Attributes:
        train: the combined ``ReIDItem`` list (``query`` and ``gallery`` are empty lists).
        num_train_pids: identities over all sources (each source's ids shifted by ``pid_offsets``).
        num_train_cams: cameras over all sources (shifted by ``camid_offsets`` when ``offset_camids``).
        num_domains: number of sources; an item's domain is its source's index.
        names: the source names.
        pid_offsets: per source, the label of its first identity.
        camid_offsets: per source, the id of its first camera (all 0 without ``offset_camids``).

    Raises:
        ValueError: no sources, a source without training items, or ``names`` of another
            length than ``sources``.

    Examples:
        >>> from metabin_layers.reid.datasets import MultiSourceDataset
        >>> market = [("m1.jpg", 5, 0), ("m2.jpg", 9, 3)]
        >>> duke = [("d1.jpg", 5, 0)]
        >>> ms = MultiSourceDataset([market, duke], names=["market", "duke"])
        >>> [(item.pid, item.camid, item.domain) for item in ms.train]
        [(0, 0, 0), (1, 1, 0), (2, 2, 1)]
        >>> ms.num_train_pids, ms.num_domains, ms.pid_offsets
        (3, 2, [0, 2])
    """

    def __init__(
        self,
        sources: Sequence[Any],
        names: Sequence[str] | None = None,
        *,
        offset_camids: bool = True,
    ) -> None:
        if len(sources) == 0:
            raise ValueError("MultiSourceDataset: need at least one source")
        if names is not None and len(names) != len(sources):
            raise ValueError(f"MultiSourceDataset: {len(names)} names for {len(sources)} sources")
        self.sources = list(sources)
        self.names = (
            list(names) if names is not None else [str(getattr(src, "name", f"source{i}")) for i, src in enumerate(sources)]
        )
        self.train: list[ReIDItem] = []
        self.query: list[ReIDItem] = []
        self.gallery: list[ReIDItem] = []
        self.pid_offsets: list[int] = []
        self.camid_offsets: list[int] = []
        pid_offset = camid_offset = 0
        for domain, src in enumerate(self.sources):
            items = [it if isinstance(it, ReIDItem) else ReIDItem(*it) for it in getattr(src, "train", src)]
            if not items:
                raise ValueError(f"MultiSourceDataset: source {self.names[domain]!r} has no training items")
            pid_map = {pid: i for i, pid in enumerate(sorted({it.pid for it in items}))}
            cam_map = {cam: i for i, cam in enumerate(sorted({it.camid for it in items}))}
            self.pid_offsets.append(pid_offset)
            self.camid_offsets.append(camid_offset if offset_camids else 0)
            for it in items:
                camid = camid_offset + cam_map[it.camid] if offset_camids else it.camid
                self.train.append(ReIDItem(it.img_path, pid_offset + pid_map[it.pid], camid, domain))
            pid_offset += len(pid_map)
            camid_offset += len(cam_map)

    @property
    def num_train_pids(self) -> int:
        """Identities over the union."""
        return len({it.pid for it in self.train})

    @property
    def num_train_cams(self) -> int:
        """Camera ids over the union."""
        return len({it.camid for it in self.train})

    @property
    def num_domains(self) -> int:
        """Number of sources."""
        return len(self.sources)

    def summary(self) -> str:
        """One line per source: domain, name, pid offset, identities, images."""
        lines = ["  domain | source          | pid offset | # ids | # images"]
        for d, name in enumerate(self.names):
            items = [it for it in self.train if it.domain == d]
            n_ids = len({it.pid for it in items})
            lines.append(f"  {d:6d} | {name:<15} | {self.pid_offsets[d]:10d} | {n_ids:5d} | {len(items):8d}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"MultiSourceDataset(sources={self.names}, train={len(self.train)}, num_train_pids={self.num_train_pids})"


def combine_sources(
    datasets: Sequence[Any], names: Sequence[str] | None = None, *, offset_camids: bool = True
) -> MultiSourceDataset:
    """Combine the training sets of ``datasets``, one domain per dataset; see
    ``MultiSourceDataset``.

    Args:
        datasets: datasets (anything with a ``train`` list) or plain item sequences
            ``(img_path, pid, camid[, domain])``.
        names: optional source names (default: the datasets' ``name`` or ``source<i>``).
        offset_camids: shift camera ids per source, so that a camera id names one camera of
            one source.

    Returns:
        ``MultiSourceDataset(datasets, names, offset_camids=offset_camids)``.

    Examples:
        >>> from metabin_layers.reid.datasets import combine_sources
        >>> train = combine_sources([[("a.jpg", 3, 1)], [("b.jpg", 3, 1)]], offset_camids=False)
        >>> train.train
        [ReIDItem(img_path='a.jpg', pid=0, camid=1, domain=0), ReIDItem(img_path='b.jpg', pid=1, camid=1, domain=1)]
        >>> train.names
        ['source0', 'source1']
    """
    return MultiSourceDataset(datasets, names, offset_camids=offset_camids)


def cameras_as_domains(items: Sequence[ReIDItem]) -> list[ReIDItem]:
    """Items with one domain per camera (MetaBIN's ``CAMERA_TO_DOMAIN``, for single-source DG):
    ``domain`` = rank of ``camid`` among the sorted camera ids present (0..C-1).

    Args:
        items: the training items (e.g. ``dataset.train`` of one source).

    Returns:
        New items, in the same order, with ``domain`` replaced (paths, pids and camids kept).

    Examples:
        >>> from metabin_layers.reid.datasets import ReIDItem, cameras_as_domains
        >>> items = [ReIDItem("a.jpg", 0, 5), ReIDItem("b.jpg", 0, 2), ReIDItem("c.jpg", 1, 5)]
        >>> [item.domain for item in cameras_as_domains(items)]
        [1, 0, 1]
    """
    rank = {cam: i for i, cam in enumerate(sorted({it.camid for it in items}))}
    return [it._replace(domain=rank[it.camid]) for it in items]
