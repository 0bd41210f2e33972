"""Shared pieces of the Re-ID dataset parsers.

* ``ReIDItem``: one image, ``(img_path, pid, camid, domain)`` (torchreid's 4-tuple order).
* ``ReIDDataset``: base class. A subclass only parses its folder into *raw* lists
  ``(path, identity_key, camid)``; the base class relabels training identities to ``0..P-1``
  (sorted keys, so the labels do not depend on the file system), implements ``combine_all``
  and stamps every item with the dataset's ``domain``.
* ``SplitReIDDataset``: base class of the small test sets (GRID, VIPeR, PRID, iLIDS) that
  come with 10 random train/test splits: the authors' split files when present, else seeded
  splits generated under a file name of their own; ``split_origin`` says which.
* ``Layout`` / ``find_layout``: folder-layout search with error messages that name
  the dataset, the root searched and the expected layout.
* ``list_images``: sorted (deterministic) listing of the image files of a folder.
"""

from __future__ import annotations

import json
import os
import random
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, Union

__all__ = [
    "IMG_EXTENSIONS",
    "Layout",
    "PathLike",
    "RawItem",
    "ReIDDataset",
    "ReIDItem",
    "SplitReIDDataset",
    "find_layout",
    "item_name",
    "list_images",
    "parse_market_style",
    "search_layout",
]

PathLike = Union[str, "os.PathLike[str]"]

#: File extensions (lower case) treated as images by ``list_images``.
IMG_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class ReIDItem(NamedTuple):
    """One Re-ID image.

    Attributes:
        img_path: path of the image file.
        pid: identity label (``0..P-1`` in a training set; the dataset's own id in query/gallery).
        camid: 0-based camera id.
        domain: domain (source dataset) index; 0 for a single dataset.

    Examples:
        >>> from metabin_layers.reid.datasets import ReIDItem
        >>> item = ReIDItem("query/0002_c1s1_000451_03.jpg", pid=2, camid=0)
        >>> item.domain
        0
        >>> item._replace(domain=1)
        ReIDItem(img_path='query/0002_c1s1_000451_03.jpg', pid=2, camid=0, domain=1)
    """

    img_path: str
    pid: int
    camid: int
    domain: int = 0


#: What a parser produces before relabelling: ``(path, identity key, camid)``. Training keys
#: may be any sortable hashable (``int``, ``str``, tuples); query/gallery keys must be ``int``.
RawItem = tuple[str, Any, int]


def list_images(directory: PathLike) -> list[str]:
    """Image files directly inside ``directory``, sorted by file name (deterministic).

    A file counts as an image when its lower-cased name ends with one of ``IMG_EXTENSIONS``;
    sub-folders are not searched.

    Args:
        directory: the folder to list.

    Returns:
        The paths (``directory`` joined with each file name) of the image files.

    Raises:
        FileNotFoundError: ``directory`` does not exist.

    Examples:
        >>> import os, tempfile
        >>> from metabin_layers.reid.datasets import list_images
        >>> with tempfile.TemporaryDirectory() as d:
        ...     for name in ("b.png", "a.JPG", "notes.txt"):
        ...         open(os.path.join(d, name), "w").close()
        ...     [os.path.basename(p) for p in list_images(d)]
        ['a.JPG', 'b.png']
    """
    directory = os.fspath(directory)
    with os.scandir(directory) as entries:
        names = sorted(e.name for e in entries if e.name.lower().endswith(IMG_EXTENSIONS) and _is_file(e))
    return [os.path.join(directory, name) for name in names]


def _is_file(entry: os.DirEntry) -> bool:
    """A file, or an image name that cannot be followed (a symlink loop): listed, so that the
    image check names it instead of the dataset silently losing it."""
    try:
        return entry.is_file()
    except OSError:
        return entry.is_symlink()


_MARKET_RE = re.compile(r"^([-\d]+)_c(\d)")


def parse_market_style(directory: PathLike, dataset: str) -> list[RawItem]:
    """Parse a Market-1501-style folder (file names ``<pid>_c<cam>...``, torchreid regex
    ``([-\\d]+)_c(\\d)``). Junk images (pid -1) are dropped; camids become 0-based."""
    items: list[RawItem] = []
    for path in list_images(directory):
        name = os.path.basename(path)
        match = _MARKET_RE.match(name)
        try:
            if match is None:
                raise ValueError
            pid, cam = int(match.group(1)), int(match.group(2))
        except ValueError:
            raise ValueError(
                f"{dataset}: cannot parse identity and camera from file name {path!r}; "
                "expected names like '0002_c1s1_000451_03.jpg' (<pid>_c<camera>...)"
            ) from None
        if pid == -1:
            continue  # junk images
        if cam < 1:
            raise ValueError(f"{dataset}: camera ids start at 1, got c{cam} in {path!r}")
        items.append((path, pid, cam - 1))
    return items


@dataclass(frozen=True)
class Layout:
    """One accepted folder layout: ``<root>/<subdir>`` holding ``dirs`` and ``files``.

    Attributes:
        subdir: folder relative to the root, ``""`` for the root itself (``/`` separated).
        dirs: required sub-folders (relative to ``subdir``).
        files: required files (relative to ``subdir``).
        desc: human-readable description used in error messages (default: derived).

    Examples:
        >>> import tempfile
        >>> from metabin_layers.reid.datasets import Layout
        >>> layout = Layout("Market-1501-v15.09.15", ("bounding_box_train", "query", "bounding_box_test"))
        >>> layout.describe()
        '<root>/Market-1501-v15.09.15/{bounding_box_train,query,bounding_box_test}'
        >>> with tempfile.TemporaryDirectory() as root:
        ...     layout.missing(root)
        ['bounding_box_train', 'query', 'bounding_box_test']
    """

    subdir: str
    dirs: tuple[str, ...] = ()
    files: tuple[str, ...] = ()
    desc: str | None = None

    def path(self, root: str) -> str:
        """Absolute data folder of this layout under ``root``."""
        return os.path.join(root, *self.subdir.split("/")) if self.subdir else root

    def split_dir(self, root: str) -> str:
        """Folder that holds split files: the top-level dataset folder (``<root>/grid`` for
        ``grid/underground_reid``), as torchreid and the MetaBIN code place them."""
        return os.path.join(root, self.subdir.split("/")[0]) if self.subdir else root

    def missing(self, root: str) -> list[str]:
        """Required entries that are absent under ``root``."""
        base = self.path(root)
        out = [d for d in self.dirs if not os.path.isdir(os.path.join(base, d))]
        out += [f for f in self.files if not os.path.isfile(os.path.join(base, f))]
        return out

    def describe(self) -> str:
        """E.g. ``<root>/Market-1501-v15.09.15/{bounding_box_train,query,bounding_box_test}``."""
        if self.desc is not None:
            return self.desc
        base = "<root>" + (f"/{self.subdir}" if self.subdir else "")
        entries = [*self.dirs, *self.files]
        if not entries:
            return base + "/"
        if len(entries) == 1:
            return f"{base}/{entries[0]}"
        return base + "/{" + ",".join(entries) + "}"


def search_layout(root: str, layouts: Sequence[Layout]) -> tuple[Layout | None, str, list[tuple[str, list[str]]]]:
    """Return ``(layout, folder, malformed)``: the first complete layout under ``root`` and its
    folder (``None, ""`` if none), and the ``(folder, missing entries)`` of candidate folders
    that exist but are incomplete."""
    malformed: list[tuple[str, list[str]]] = []
    for layout in layouts:
        folder = layout.path(root)
        if not os.path.isdir(folder):
            continue
        missing = layout.missing(root)
        if not missing:
            return layout, folder, malformed
        n_required = len(layout.dirs) + len(layout.files)
        if layout.subdir or len(missing) < n_required:
            malformed.append((folder, missing))
    return None, "", malformed


def find_layout(dataset: str, root: str, layouts: Sequence[Layout], expected: str | None = None) -> tuple[Layout, str]:
    """Return the first layout in ``layouts`` that is complete under ``root`` and its folder.

    Raises:
        ValueError: a candidate folder exists but lacks required entries (malformed layout).
        FileNotFoundError: no candidate folder exists.
        Both messages name the dataset, the root searched and the expected layout(s).
    """
    layout, folder, malformed = search_layout(root, layouts)
    if layout is not None:
        return layout, folder
    if expected is None:
        expected = " or ".join(dict.fromkeys(layout.describe() for layout in layouts))
    if malformed:
        raise ValueError(
            f"{dataset}: malformed layout under root {root!r}: {_describe_malformed(malformed)}; expected {expected}"
        )
    raise FileNotFoundError(f"{dataset}: no dataset found under root {root!r}; expected {expected}")


def _describe_malformed(malformed: Sequence[tuple[str, list[str]]]) -> str:
    folder, missing = malformed[0]
    return f"{folder!r} lacks {', '.join(missing)}"


def _stats(items: Sequence[ReIDItem]) -> tuple[int, int, int]:
    return len({it.pid for it in items}), len(items), len({it.camid for it in items})


class ReIDDataset:
    """Base class of the image Re-ID datasets (torchreid / fast-reid conventions).

    Args:
        root: folder that holds the dataset folder (or the dataset folder itself).
        combine_all: use every image (train + query + gallery) as training data, as in
            multi-source domain generalisation (MetaBIN's ``DG_*`` sources). Query and gallery
            identities get labels after the training ones (``P..``); junk/distractor ids are
            dropped. ``query`` and ``gallery`` keep their content (torchreid's ``combineall``).
        domain: domain id stamped on every item (see ``combine_sources`` for several).
        verbose: print ``summary`` after loading.

    Attributes:
        train: training ``ReIDItem`` s, identities relabelled ``0..P-1`` (with ``combine_all``, the
            query and gallery identities follow as ``P..``).
        query: query ``ReIDItem`` s with the dataset's own identity ids.
        gallery: gallery ``ReIDItem`` s with the dataset's own identity ids.
        root: absolute path of ``root``.
        dataset_dir: the data folder found under ``root``.

    Examples:
        A parser implements ``_load``, which returns raw ``(path, identity key, camid)`` lists;
        the base class relabels the training keys in sorted order:

        >>> from metabin_layers.reid.datasets import ReIDDataset
        >>> class Tiny(ReIDDataset):
        ...     name = "Tiny"
        ...     def _load(self):
        ...         train = [("a.jpg", "bob", 0), ("b.jpg", "alice", 1)]
        ...         return train, [("c.jpg", 7, 0)], [("d.jpg", 7, 1)]
        >>> [item.pid for item in Tiny(".").train]
        [1, 0]
        >>> Tiny(".", combine_all=True, domain=2).train[-1]
        ReIDItem(img_path='d.jpg', pid=2, camid=1, domain=2)
    """

    #: Display name, used in messages.
    name: ClassVar[str] = "ReIDDataset"
    #: Identities dropped by ``combine_all`` (Market's 0 = distractors, -1 = junk).
    junk_pids: ClassVar[frozenset[int]] = frozenset()

    def __init__(
        self,
        root: PathLike,
        *,
        combine_all: bool = False,
        domain: int = 0,
        verbose: bool = False,
    ) -> None:
        self.root = os.path.abspath(os.path.expanduser(os.fspath(root)))
        self.combine_all = bool(combine_all)
        self.domain = int(domain)
        self.dataset_dir = self.root
        train, query, gallery = self._load()
        self.train, self.query, self.gallery = self._finalize(train, query, gallery)
        if verbose:
            print(self.summary())

    # -- to implement -------------------------------------------------------------------------
    def _load(self) -> tuple[list[RawItem], list[RawItem], list[RawItem]]:
        """Parse the folder; return raw ``(train, query, gallery)``. Set ``self.dataset_dir``."""
        raise NotImplementedError

    def is_junk(self, pid: int) -> bool:
        """Whether a query/gallery identity is dropped by ``combine_all``."""
        return pid in self.junk_pids

    # -- relabelling ------------------------------------------------------------------------------
    def _finalize(
        self, train: list[RawItem], query: list[RawItem], gallery: list[RawItem]
    ) -> tuple[list[ReIDItem], list[ReIDItem], list[ReIDItem]]:
        dom = self.domain
        train_keys = sorted({key for _, key, _ in train})
        label = {key: i for i, key in enumerate(train_keys)}
        out_train = [ReIDItem(p, label[k], int(c), dom) for p, k, c in train]
        if self.combine_all:
            extra = [(p, k, c) for p, k, c in (*query, *gallery) if not self.is_junk(int(k))]
            test_keys = sorted({int(k) for _, k, _ in extra})
            test_label = {key: len(train_keys) + i for i, key in enumerate(test_keys)}
            out_train += [ReIDItem(p, test_label[int(k)], int(c), dom) for p, k, c in extra]
        out_query = [ReIDItem(p, int(k), int(c), dom) for p, k, c in query]
        out_gallery = [ReIDItem(p, int(k), int(c), dom) for p, k, c in gallery]
        return out_train, out_query, out_gallery

    # -- statistics -------------------------------------------------------------------------------
    @property
    def num_train_pids(self) -> int:
        """Number of training identities."""
        return len({it.pid for it in self.train})

    @property
    def num_train_cams(self) -> int:
        """Number of cameras in the training set."""
        return len({it.camid for it in self.train})

    @property
    def num_query_pids(self) -> int:
        """Number of query identities."""
        return len({it.pid for it in self.query})

    @property
    def num_gallery_pids(self) -> int:
        """Number of gallery identities (distractor ids included)."""
        return len({it.pid for it in self.gallery})

    def summary(self) -> str:
        """Table of identities / images / cameras per subset."""
        lines = [
            f"=> {self.name} (domain {self.domain}) from {self.dataset_dir}",
            "  subset   | # ids | # images | # cameras",
            "  ---------------------------------------",
        ]
        for subset, items in (("train", self.train), ("query", self.query), ("gallery", self.gallery)):
            n_ids, n_imgs, n_cams = _stats(items)
            lines.append(f"  {subset:<8} | {n_ids:5d} | {n_imgs:8d} | {n_cams:9d}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={self.root!r}, train={len(self.train)}, "
            f"query={len(self.query)}, gallery={len(self.gallery)}, domain={self.domain})"
        )


def item_name(item: Any) -> str:
    """File name of a split-file item: ``[path, pid, camid]`` (torchreid) or a bare path or name."""
    path = str(item[0] if isinstance(item, (list, tuple)) else item)
    return path.replace("\\", "/").rsplit("/", 1)[-1]


def _write_json_atomic(path: str, obj: Any) -> None:
    text = json.dumps(obj)  # no indent: the C encoder is much faster on VIPeR/GRID-sized files
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


class SplitReIDDataset(ReIDDataset):
    """Base class of the small test sets with 10 random train/test splits (GRID, VIPeR, PRID,
    iLIDS).

    Where the splits come from is recorded in ``split_origin`` and ``split_path``:

    * ``"authors"``: the split files the MetaBIN authors distribute with their test data, read
      under their names (``splits.json`` of GRID and iLIDS, ``splits_single_shot.json`` of PRID,
      VIPeR's ``split_<k>a/`` folders, or GRID's ``features_and_partitions.mat``, from which the
      authors derive theirs). Only these make numbers comparable to the paper's. Image paths
      stored in a file are matched by file name, so a moved dataset still works.
    * ``"torchreid"``: VIPeR's torchreid ``splits.json`` (the authors do not use it).
    * ``"generated"``: 10 splits drawn by this library from ``random.Random(seed)`` over *sorted*
      ids (deterministic), cached under a name of their own,
      ``<stem>_generated_seed<seed>.json`` (e.g. ``splits_generated_seed0.json``), never under
      the authors' names: the authors' files, put next to them later, take precedence.
      A file under the authors' name whose entries record a ``seed`` was written by an earlier
      version of this library and counts as generated.

    Args:
        root: see ``ReIDDataset``.
        split_id: which of the 10 splits, ``0..9``.
        seed: seed of generated splits (``None`` means 0). A split file that records no seed
            (the authors' or torchreid's) is used as is, with a warning that the seed was
            ignored; a legacy generated file with another seed raises a ``ValueError``.
        combine_all: see ``ReIDDataset``.
        domain: see ``ReIDDataset``.
        verbose: see ``ReIDDataset``.

    Attributes:
        split_id: the split in use.
        seed: the ``seed`` argument.
        split_origin: ``"authors"``, ``"torchreid"`` or ``"generated"`` (see above).
        split_path: the split file (or the authors' split folder) the split was read from.

    Examples:
        Generated splits are cached under names of their own (full examples: ``GRID``,
        ``VIPeR``, ``PRID``, ``iLIDS``):

        >>> from metabin_layers.reid.datasets import PRID, SplitReIDDataset
        >>> SplitReIDDataset.generated_filename(None)
        'splits_generated_seed0.json'
        >>> PRID.generated_filename(3)
        'splits_single_shot_generated_seed3.json'
    """

    num_splits: ClassVar[int] = 10
    split_filename: ClassVar[str] = "splits.json"

    def __init__(
        self,
        root: PathLike,
        split_id: int = 0,
        *,
        seed: int | None = None,
        combine_all: bool = False,
        domain: int = 0,
        verbose: bool = False,
    ) -> None:
        if not isinstance(split_id, int) or not 0 <= split_id < self.num_splits:
            raise ValueError(f"{self.name}: split_id must be an int in 0..{self.num_splits - 1}, got {split_id!r}")
        self.split_id = split_id
        self.seed = seed
        self.split_path = ""
        self.split_origin = ""
        super().__init__(root, combine_all=combine_all, domain=domain, verbose=verbose)

    @property
    def uses_authors_splits(self) -> bool:
        """Whether this split was read from the authors' split files (comparable to the paper)."""
        return self.split_origin == "authors"

    @classmethod
    def generated_filename(cls, seed: int | None) -> str:
        """File name of generated splits: ``<stem>_generated_seed<seed>.json`` (never the authors')."""
        stem = cls.split_filename.rsplit(".", 1)[0]
        return f"{stem}_generated_seed{0 if seed is None else seed}.json"

    def _read_split_file(self, path: str, min_entries: int) -> list[dict[str, Any]]:
        try:
            with open(path) as f:
                splits = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{self.name}: cannot read split file {path!r}: {exc}") from exc
        except RecursionError:  # json's parser recurses once per nesting level
            raise ValueError(
                f"{self.name}: cannot read split file {path!r}: its JSON is nested too deep; delete it to regenerate the splits"
            ) from None
        if not isinstance(splits, list) or len(splits) < min_entries or not all(isinstance(s, dict) for s in splits):
            raise ValueError(
                f"{self.name}: split file {path!r} must be a JSON list of at least "
                f"{min_entries} objects; delete it to regenerate the splits"
            )
        return splits

    def _load_splits(
        self,
        known_path: str,
        generate: Callable[[random.Random], list[dict[str, Any]]],
        *,
        origin: str = "authors",
        min_entries: int | None = None,
    ) -> list[dict[str, Any]]:
        """The split entries: the file at ``known_path`` (the authors' or torchreid's name, of
        origin ``origin``) if it exists, else the generated file for ``self.seed`` next to it,
        else ``generate(rng)`` written there. Sets ``split_path`` and ``split_origin``."""
        min_entries = self.num_splits if min_entries is None else min_entries
        seed = 0 if self.seed is None else self.seed
        if os.path.isfile(known_path):
            splits = self._read_split_file(known_path, min_entries)
            recorded = {s.get("seed") for s in splits}
            self.split_path = known_path
            if recorded == {None}:
                self.split_origin = origin
                if self.seed is not None:
                    warnings.warn(
                        f"{self.name}: using the existing split file {known_path!r}, which records "
                        f"no seed; seed={self.seed} is ignored",
                        stacklevel=4,
                    )
                return splits
            # Written by an earlier version of this library under the authors' name.
            if recorded != {seed}:
                raise ValueError(
                    f"{self.name}: split file {known_path!r} was generated with seed "
                    f"{sorted(recorded, key=str)}, not {seed}; delete it to regenerate, "
                    "or pass the seed it records"
                )
            self.split_origin = "generated"
            return splits
        generated_path = os.path.join(os.path.dirname(known_path), self.generated_filename(self.seed))
        self.split_path, self.split_origin = generated_path, "generated"
        if os.path.isfile(generated_path):
            return self._read_split_file(generated_path, min_entries)
        splits = generate(random.Random(seed))
        for entry in splits:
            entry["seed"] = seed
        try:
            os.makedirs(os.path.dirname(generated_path), exist_ok=True)
            _write_json_atomic(generated_path, splits)
        except OSError as exc:
            warnings.warn(
                f"{self.name}: could not write split file {generated_path!r} ({exc}); "
                "using the generated splits without caching them",
                stacklevel=4,
            )
        return splits

    def _entry_list(self, entry: dict[str, Any], key: str) -> list[Any]:
        value = entry.get(key)
        if not isinstance(value, list):
            raise ValueError(  # noqa: TRY004 (bad file content, not a bad argument)
                f"{self.name}: split {self.split_id} in {self.split_path!r} has no list {key!r}"
            )
        return value
