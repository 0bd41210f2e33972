"""Identity (P x K) batch samplers of the Re-ID recipe, resumable and DDP-ready.

Both samplers are *batch samplers*: they yield lists of dataset indices, to be passed as
``DataLoader(dataset, batch_sampler=sampler)``. ``items`` is any sequence of 4-sequences
``(img_path_or_index, pid, camid, domain)`` (e.g. ``ReIDItem`` or ``SyntheticItem``); only
``pid`` (position 1) and ``domain`` (position 3) are read.

* ``RandomIdentitySampler`` is the authors' ``NaiveIdentitySampler`` (base loader):
  ``P = batch_size / num_instances`` identities drawn uniformly across all domains, ``K =
  num_instances`` images each.
* ``DomainBalancedSampler`` is the authors' ``DomainSuffleSampler`` (meta loader): every
  batch holds every domain, ``batch_size / (D * K)`` identities x ``K`` images per domain,
  grouped by domain in ascending domain order; smaller domains are recycled.

Randomness comes only from the sampler's own ``numpy.random.Generator``, seeded from
``(seed, epoch)``; the global RNGs are never touched. The batch stream is a deterministic
function of ``(seed, epoch)``; the sampler's state is ``(epoch, position)``, where ``position``
counts the batches already yielded in the current epoch.

Length and epochs:

* ``num_batches=None`` (default): ``__iter__`` yields batches forever (``len()`` raises
  ``TypeError``). Use with an iteration-based trainer.
* ``num_batches=n``: ``__iter__`` yields ``n`` batches, then advances ``epoch`` by one, so two
  consecutive ``for`` loops see different batches even without ``set_epoch``. Calling
  ``set_epoch(e)`` explicitly (as with ``DistributedSampler``) works too.

Resume: ``state_dict()`` returns ``{"epoch", "position", ...}``; ``load_state_dict`` restores
it and the next ``__iter__`` regenerates the stream of that epoch and skips ``position``
batches, yielding exactly the batches an uninterrupted run would have yielded. Skipping costs
index arithmetic only (no image loading). A ``DataLoader`` with workers pulls a few batches
ahead of the training loop, so the sampler's position can be ahead of what the loop consumed;
a trainer that needs exact resume should save its own count of consumed batches of the epoch
in ``state["position"]`` before saving.

DDP: with ``world_size > 1`` every rank builds the same global batch (same seed) and takes its
own whole identities of it, so the union over ranks is the single-process batch and an
identity's K images are all on one rank (the triplet loss of each rank sees its positives).
``RandomIdentitySampler`` gives every rank ``P = batch_size / (world_size * K)``
identities (P per rank, as fast-reid's sampler), so ``batch_size`` must be a multiple of
``world_size * K``; ``DomainBalancedSampler`` gives every rank ``m / world_size``
identities of every domain, so ``m`` (identities per domain) must be a multiple of
``world_size``. Other settings are refused with the batch sizes that would work.

Examples:
    >>> from metabin_layers.reid.sampler import DomainBalancedSampler, RandomIdentitySampler
    >>> items = [(f"img{i}.jpg", i // 4, i % 2, (i // 4) % 2) for i in range(64)]
    >>> s = RandomIdentitySampler(items, batch_size=16, num_instances=4, seed=1, num_batches=3)
    >>> [len(b) for b in s]
    [16, 16, 16]
    >>> d = DomainBalancedSampler(items, batch_size=16, num_instances=4, num_batches=1)
    >>> [items[i][3] for i in next(iter(d))]
    [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1]
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Hashable, Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

__all__ = ["RandomIdentitySampler", "DomainBalancedSampler"]


def _make_chunks(indices: np.ndarray, k: int, rng: np.random.Generator) -> list[list[int]]:
    """Shuffle one identity's images and cut them into chunks of ``k`` (authors' rule).

    Fewer than ``k`` images: ``k`` drawn with replacement. Otherwise the shuffled list is padded
    to a multiple of ``k`` with images drawn without replacement from the identity's own list.
    Chunks are returned in pop order (the last chunk is used first).
    """
    if len(indices) < k:
        arr = rng.choice(indices, size=k, replace=True)
    else:
        arr = rng.permutation(indices)
        rem = len(arr) % k
        if rem:
            arr = np.concatenate([arr, rng.choice(indices, size=k - rem, replace=False)])
    return arr.reshape(-1, k).tolist()[::-1]


def _draw(pool: list[int], chunks: dict[int, list[list[int]]], n: int, rng: np.random.Generator, out: list[int]) -> None:
    """Draw ``n`` distinct ids from ``pool``, append one chunk of each to ``out``; drop empty ids."""
    selected = rng.choice(len(pool), size=n, replace=False)
    for pos in selected:
        out.extend(chunks[pool[pos]].pop())
    # swap-remove exhausted ids, highest position first so that pending positions stay valid
    for pos in sorted(selected.tolist(), reverse=True):
        if not chunks[pool[pos]]:
            pool[pos] = pool[-1]
            pool.pop()


class _IdentityBatchSampler(Sampler[list[int]]):
    """Shared machinery: validation, seeding, epochs, resume and rank slicing."""

    def __init__(
        self,
        items: Sequence[Sequence[Any]],
        batch_size: int,
        num_instances: int,
        seed: int,
        num_batches: int | None,
        rank: int,
        world_size: int,
        allow_replacement: bool,
    ) -> None:
        if len(items) == 0:
            raise ValueError("items: empty")
        if int(batch_size) != batch_size or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        if int(num_instances) != num_instances or num_instances <= 0:
            raise ValueError(f"num_instances must be a positive integer, got {num_instances}")
        if batch_size % num_instances:
            raise ValueError(f"batch_size={batch_size} must be a multiple of num_instances={num_instances}")
        if int(seed) != seed or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed}")
        if num_batches is not None and (int(num_batches) != num_batches or num_batches <= 0):
            raise ValueError(f"num_batches must be None or a positive integer, got {num_batches}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if batch_size % world_size:
            raise ValueError(f"batch_size={batch_size} must be divisible by world_size={world_size}")
        self.num_items = len(items)
        self.batch_size = int(batch_size)
        self.num_instances = int(num_instances)
        self.seed = int(seed)
        self.num_batches = None if num_batches is None else int(num_batches)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.allow_replacement = bool(allow_replacement)
        self.local_batch_size = self.batch_size // self.world_size
        self.epoch = 0
        self.position = 0

    # -- to be provided by subclasses -------------------------------------------------------
    def _global_batches(self, rng: np.random.Generator) -> Iterator[list[int]]:  # pragma: no cover
        raise NotImplementedError

    # -- public API -------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Select the batch stream of ``epoch``; restarts the epoch unless it is already current.

        ``set_epoch`` with the current epoch keeps the position, so
        ``load_state_dict(s); set_epoch(s["epoch"])`` still resumes mid-epoch.

        Args:
            epoch: the epoch number; it seeds the stream together with ``seed``.
        """
        epoch = int(epoch)
        if epoch != self.epoch:
            self.epoch = epoch
            self.position = 0

    def __iter__(self) -> Iterator[list[int]]:
        epoch = self.epoch
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch]))
        stream = self._global_batches(rng)
        for _ in range(self.position):
            next(stream)
        while self.num_batches is None or self.position < self.num_batches:
            batch = next(stream)
            self.position += 1
            yield self._local(batch)
        self.epoch = epoch + 1
        self.position = 0

    def _local(self, batch: list[int]) -> list[int]:
        """This rank's part of a global batch: the ``rank``-th contiguous chunk."""
        lo = self.rank * self.local_batch_size
        return batch[lo : lo + self.local_batch_size]

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError(f"{type(self).__name__} with num_batches=None is infinite and has no len()")
        return self.num_batches

    def _config(self) -> dict[str, Any]:
        return {
            "sampler": type(self).__name__,
            "num_items": self.num_items,
            "batch_size": self.batch_size,
            "num_instances": self.num_instances,
        }

    def state_dict(self) -> dict[str, Any]:
        """``{"seed", "epoch", "position", ...}``; ``position`` = batches yielded this epoch.

        Returns:
            The position and the configuration (sampler class, number of items, batch size, K)
            of the sampler, for ``load_state_dict``.
        """
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position, **self._config()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``seed``, ``epoch`` and ``position``; the configuration must match.

        Args:
            state: a dict returned by ``state_dict``.

        Raises:
            ValueError: a configuration key differs from this sampler's, or ``position`` lies
                outside ``[0, num_batches]``.
        """
        for key, value in self._config().items():
            if key in state and state[key] != value:
                raise ValueError(f"state_dict mismatch for {key!r}: saved {state[key]!r}, sampler has {value!r}")
        self.seed = int(state.get("seed", self.seed))
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        if self.num_batches is not None and not 0 <= self.position <= self.num_batches:
            raise ValueError(f"position {self.position} outside [0, num_batches={self.num_batches}]")

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_items={self.num_items}, batch_size={self.batch_size}, "
            f"num_instances={self.num_instances}, seed={self.seed}, num_batches={self.num_batches}, "
            f"rank={self.rank}, world_size={self.world_size})"
        )


class RandomIdentitySampler(_IdentityBatchSampler):
    """P x K identity sampler across all domains (authors' ``NaiveIdentitySampler``).

    Each pass (the authors' "epoch"): every identity's images are shuffled and cut into chunks
    of K (fewer than K images: sampled with replacement; a remainder is padded with images drawn
    without replacement from the identity's own list). Batches are formed by drawing
    ``P = batch_size / num_instances`` identities uniformly without replacement from those with
    chunks left and popping one chunk each; the pass ends when fewer than P identities remain,
    and a new pass starts (the stream is infinite). Domain proportions follow identity counts.

    An identity is keyed by ``pid`` alone (pids are expected to be unique over the union of
    domains, as after relabelling).

    Args:
        items: sequence of ``(img, pid, camid, domain)``.
        batch_size: global batch size (multiple of ``num_instances``; paper: 80).
        num_instances: K images per identity (paper: 4).
        seed: seeds the sampler's own generator (with the epoch).
        num_batches: ``None`` = infinite stream; otherwise batches per ``__iter__`` (epoch).
        rank: this process's rank: it yields the ``rank``-th contiguous chunk of
            ``batch_size / (world_size * K)`` whole identities of every global batch.
        world_size: the number of processes sharing each global batch (1: no split).
        allow_replacement: if False, an identity with fewer than K images is a ValueError.

    Examples:
        >>> from metabin_layers.reid.sampler import RandomIdentitySampler
        >>> items = [(None, pid, 0, 0) for pid in range(10) for _ in range(5)]
        >>> batch = next(iter(RandomIdentitySampler(items, batch_size=8, num_instances=4)))
        >>> sorted({items[i][1] for i in batch}).__len__()
        2
    """

    def __init__(
        self,
        items: Sequence[Sequence[Any]],
        batch_size: int = 80,
        num_instances: int = 4,
        seed: int = 0,
        num_batches: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        allow_replacement: bool = True,
    ) -> None:
        super().__init__(items, batch_size, num_instances, seed, num_batches, rank, world_size, allow_replacement)
        groups: dict[Hashable, list[int]] = defaultdict(list)
        domain_of: dict[Hashable, Any] = {}
        for idx, item in enumerate(items):
            groups[item[1]].append(idx)
            domain_of.setdefault(item[1], item[3])
        self.pids: list[Hashable] = list(groups)
        self._index: list[np.ndarray] = [np.asarray(groups[p], dtype=np.int64) for p in self.pids]
        self.num_pids_per_batch = self.batch_size // self.num_instances
        per_rank = self.world_size * self.num_instances
        if self.batch_size % per_rank:
            lo = max(per_rank, self.batch_size // per_rank * per_rank)
            raise ValueError(
                f"batch_size={self.batch_size} cannot be split into whole identities over world_size="
                f"{self.world_size} ranks with num_instances={self.num_instances}: every rank takes "
                f"P = batch_size / (world_size x num_instances) identities, so batch_size must be a multiple "
                f"of {per_rank} (e.g. {lo} or {lo + per_rank})"
            )
        #: P per rank: the identities of one rank's part of every batch.
        self.num_pids_per_rank = self.num_pids_per_batch // self.world_size
        if len(self.pids) < self.num_pids_per_batch:
            raise ValueError(
                f"need at least P={self.num_pids_per_batch} identities for batch_size={self.batch_size} "
                f"and num_instances={self.num_instances}, got {len(self.pids)}"
            )
        if not self.allow_replacement:
            for pid, idxs in zip(self.pids, self._index):
                if len(idxs) < self.num_instances:
                    raise ValueError(
                        f"domain {domain_of[pid]} has fewer than K={self.num_instances} images of "
                        f"identity {pid} ({len(idxs)}); use allow_replacement=True to sample with replacement"
                    )

    @property
    def estimated_num_images(self) -> int:
        """The authors' per-epoch image count (used for their iterations per epoch).

        Every identity's count rounded up to a multiple of K (at least K), summed, minus
        ``sum % batch_size`` and minus one more batch. ``// batch_size`` gives batches per epoch.
        """
        k = self.num_instances
        total = sum(max(k, -(-len(i) // k) * k) for i in self._index)
        return max(0, total - total % self.batch_size - self.batch_size)

    def _global_batches(self, rng: np.random.Generator) -> Iterator[list[int]]:
        p, k = self.num_pids_per_batch, self.num_instances
        while True:
            chunks = {i: _make_chunks(idxs, k, rng) for i, idxs in enumerate(self._index)}
            pool = list(range(len(self._index)))
            while len(pool) >= p:
                batch: list[int] = []
                _draw(pool, chunks, p, rng, batch)
                yield batch


class DomainBalancedSampler(_IdentityBatchSampler):
    """Domain-balanced P x K sampler (authors' ``DomainSuffleSampler``).

    With D domains, every batch holds ``m = batch_size / (D * K)`` identities x K images from
    each domain, laid out domain by domain in ascending domain order (positions
    ``[d*m*K, (d+1)*m*K)`` belong to the d-th domain). For each domain in turn, m identities are
    drawn uniformly without replacement from those with chunks left and one K-chunk is popped
    from each (chunks built as in ``RandomIdentitySampler``); a domain with fewer than m
    identities left is regenerated (re-shuffled), so smaller domains are recycled while every
    domain contributes equally to every batch. Identities are keyed by ``(domain, pid)``.

    Args:
        items: sequence of ``(img, pid, camid, domain)``.
        batch_size: global batch size, a multiple of ``D * num_instances`` (paper: 80 = 5 x 4 x 4).
        num_instances: K (paper: 4).
        seed: as in ``RandomIdentitySampler``.
        num_batches: as in ``RandomIdentitySampler``.
        rank: as in ``RandomIdentitySampler``.
        world_size: as in ``RandomIdentitySampler``.
        num_domains: if given, domain labels must be the integers ``0 .. num_domains-1`` and
            every one of them must have enough identities; if None the distinct labels of
            ``items`` (sorted) are the domains.
        allow_replacement: if False, an identity with fewer than K images is a ValueError
            (default True samples with replacement, like the authors).

    Examples:
        >>> from metabin_layers.reid.sampler import DomainBalancedSampler
        >>> items = [(None, pid, 0, pid % 3) for pid in range(12) for _ in range(4)]
        >>> s = DomainBalancedSampler(items, batch_size=24, num_instances=4)
        >>> s.ids_per_domain, s.domains
        (2, [0, 1, 2])
    """

    def __init__(
        self,
        items: Sequence[Sequence[Any]],
        batch_size: int = 80,
        num_instances: int = 4,
        seed: int = 0,
        num_domains: int | None = None,
        num_batches: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        allow_replacement: bool = True,
    ) -> None:
        super().__init__(items, batch_size, num_instances, seed, num_batches, rank, world_size, allow_replacement)
        groups: dict[Any, dict[Hashable, list[int]]] = defaultdict(lambda: defaultdict(list))
        for idx, item in enumerate(items):
            groups[item[3]][item[1]].append(idx)
        if num_domains is None:
            try:
                self.domains: list[Any] = sorted(groups)
            except TypeError:
                self.domains = list(groups)
        else:
            num_domains = int(num_domains)
            if num_domains <= 0:
                raise ValueError(f"num_domains must be positive, got {num_domains}")
            extra = [d for d in groups if d not in range(num_domains)]
            if extra:
                raise ValueError(f"domain label(s) {extra} outside 0..{num_domains - 1} (num_domains={num_domains})")
            self.domains = list(range(num_domains))
        d = len(self.domains)
        if self.batch_size % (d * self.num_instances):
            raise ValueError(
                f"batch_size={self.batch_size} must be a multiple of num_domains x num_instances = "
                f"{d} x {self.num_instances} = {d * self.num_instances}"
            )
        self.ids_per_domain = self.batch_size // (d * self.num_instances)
        self._pids: list[list[Hashable]] = []
        self._index: list[list[np.ndarray]] = []
        for dom in self.domains:
            pid_groups = groups.get(dom, {})
            if len(pid_groups) < self.ids_per_domain:
                raise ValueError(
                    f"domain {dom} has {len(pid_groups)} identities, fewer than the "
                    f"{self.ids_per_domain} identities per domain that batch_size={self.batch_size}, "
                    f"{d} domains and num_instances={self.num_instances} require"
                )
            if not self.allow_replacement:
                for pid, idxs in pid_groups.items():
                    if len(idxs) < self.num_instances:
                        raise ValueError(
                            f"domain {dom} has fewer than K={self.num_instances} images of identity {pid} "
                            f"({len(idxs)}); use allow_replacement=True to sample with replacement"
                        )
            self._pids.append(list(pid_groups))
            self._index.append([np.asarray(v, dtype=np.int64) for v in pid_groups.values()])

        if self.world_size > 1 and self.ids_per_domain % self.world_size:
            step = d * self.num_instances * self.world_size
            raise ValueError(
                f"with world_size={self.world_size} every rank needs whole identities of every domain: "
                f"ids per domain ({self.ids_per_domain} = batch_size / (num_domains x num_instances)) must be "
                f"a multiple of world_size, i.e. batch_size a multiple of {d} x {self.num_instances} x "
                f"{self.world_size} = {step}"
            )

    @property
    def num_domains(self) -> int:
        return len(self.domains)

    def _local(self, batch: list[int]) -> list[int]:
        """This rank's identities of *every* domain block, so each rank sees all domains (a
        meta split then leaves every rank with meta-train and meta-test samples)."""
        per_rank = self.ids_per_domain // self.world_size * self.num_instances
        block = self.ids_per_domain * self.num_instances
        lo = self.rank * per_rank
        return [i for start in range(0, len(batch), block) for i in batch[start + lo : start + lo + per_rank]]

    def batch_domains(self) -> list[Any]:
        """Domain label of every position of a global batch (domains are contiguous blocks).

        Returns:
            A list of ``batch_size`` domain labels.
        """
        per = self.ids_per_domain * self.num_instances
        return [dom for dom in self.domains for _ in range(per)]

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "num_domains": self.num_domains}

    def _global_batches(self, rng: np.random.Generator) -> Iterator[list[int]]:
        m, k = self.ids_per_domain, self.num_instances
        chunks: list[dict[int, list[list[int]]]] = [{} for _ in self.domains]
        pools: list[list[int]] = [[] for _ in self.domains]
        while True:
            batch: list[int] = []
            for d, index in enumerate(self._index):
                if len(pools[d]) < m:  # (re)generate this domain's chunks
                    chunks[d] = {i: _make_chunks(idxs, k, rng) for i, idxs in enumerate(index)}
                    pools[d] = list(range(len(index)))
                _draw(pools[d], chunks[d], m, rng, batch)
            yield batch
