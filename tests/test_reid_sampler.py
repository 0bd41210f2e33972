"""Tests for metabin_layers.reid.sampler (P x K structure, domain balance, determinism, resume)."""

from __future__ import annotations

import itertools
import random
from collections import Counter
from typing import NamedTuple

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from metabin_layers.reid.sampler import DomainBalancedSampler, RandomIdentitySampler


class Item(NamedTuple):
    img_path: str
    pid: int
    camid: int
    domain: int


def make_items(ids_per_domain=(6, 9, 5), counts=(2, 3, 4, 5, 7, 9), seed=0) -> list[Item]:
    """Several domains, identities with varied image counts (some below K=4), unique pids."""
    rng = np.random.default_rng(seed)
    items, pid = [], 0
    for dom, n_ids in enumerate(ids_per_domain):
        for _ in range(n_ids):
            for j in range(int(rng.choice(counts))):
                items.append(Item(f"d{dom}/p{pid}/{j}.jpg", pid, j % 3, dom))
            pid += 1
    order = rng.permutation(len(items))  # items are not sorted by identity or domain
    return [items[i] for i in order]


def take(sampler, n):
    return [list(b) for b in itertools.islice(iter(sampler), n)]


def check_pk(batch, items, p, k):
    pids = [items[i].pid for i in batch]
    counts = Counter(pids)
    assert len(counts) == p and set(counts.values()) == {k}
    # each identity occupies one contiguous chunk of K positions
    for start in range(0, len(batch), k):
        assert len(set(pids[start : start + k])) == 1


# --------------------------------------------------------------------------- RandomIdentitySampler


def test_random_identity_pk_structure():
    items = make_items()
    s = RandomIdentitySampler(items, batch_size=16, num_instances=4, seed=3)
    for batch in take(s, 40):
        assert len(batch) == 16
        check_pk(batch, items, p=4, k=4)


def test_random_identity_pass_covers_every_image_once_when_counts_are_multiples_of_k():
    items = [Item("x", pid, 0, pid % 2) for pid in range(12) for _ in range(4)]
    s = RandomIdentitySampler(items, batch_size=12, num_instances=4, seed=0)
    batches = take(s, 8)
    for first in (0, 4):  # a pass is 12 ids / P=3 = 4 batches
        used = sorted(i for b in batches[first : first + 4] for i in b)
        assert used == list(range(48))


def test_random_identity_uses_identities_from_all_domains_and_small_ids_with_replacement():
    items = make_items()
    s = RandomIdentitySampler(items, batch_size=16, num_instances=4, seed=1)
    seen_domains, seen_pids = set(), set()
    for batch in take(s, 200):
        seen_domains |= {items[i].domain for i in batch}
        seen_pids |= {items[i].pid for i in batch}
    assert seen_domains == {0, 1, 2}
    assert seen_pids == {it.pid for it in items}


def test_random_identity_determinism_and_seeds():
    items = make_items()
    a = take(RandomIdentitySampler(items, 16, 4, seed=5), 30)
    b = take(RandomIdentitySampler(items, 16, 4, seed=5), 30)
    c = take(RandomIdentitySampler(items, 16, 4, seed=6), 30)
    assert a == b
    assert a != c


def test_global_rngs_untouched():
    items = make_items()
    np.random.seed(123)
    torch.manual_seed(123)
    random.seed(123)
    np_state, torch_state, py_state = np.random.get_state(), torch.get_rng_state(), random.getstate()
    take(RandomIdentitySampler(items, 16, 4), 20)
    take(DomainBalancedSampler(items, 24, 4), 20)
    assert np.array_equal(np.random.get_state()[1], np_state[1])
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == py_state


def test_finite_epochs_advance_and_set_epoch_reproduces():
    items = make_items()
    s = RandomIdentitySampler(items, 16, 4, seed=2, num_batches=5)
    assert len(s) == 5
    e0 = [list(b) for b in s]
    e1 = [list(b) for b in s]
    assert len(e0) == len(e1) == 5 and e0 != e1 and s.epoch == 2
    s.set_epoch(0)
    assert [list(b) for b in s] == e0
    s.set_epoch(1)
    assert [list(b) for b in s] == e1
    # the finite epoch is a prefix of that epoch's infinite stream
    inf = RandomIdentitySampler(items, 16, 4, seed=2)
    inf.set_epoch(1)
    assert take(inf, 5) == e1


@pytest.mark.parametrize("cls", [RandomIdentitySampler, DomainBalancedSampler])
def test_state_dict_resume_infinite(cls):
    items = make_items()
    reference = take(cls(items, batch_size=24, num_instances=4, seed=9), 25)
    a = cls(items, batch_size=24, num_instances=4, seed=9)
    it = iter(a)
    consumed = [list(next(it)) for _ in range(11)]
    state = a.state_dict()
    assert state["position"] == 11
    b = cls(items, batch_size=24, num_instances=4, seed=0)  # seed comes from the state
    b.load_state_dict(state)
    assert consumed + take(b, 14) == reference


def test_state_dict_resume_across_finite_epochs():
    items = make_items()
    ref = RandomIdentitySampler(items, 16, 4, seed=4, num_batches=6)
    uninterrupted = [list(b) for _ in range(3) for b in ref]
    a = RandomIdentitySampler(items, 16, 4, seed=4, num_batches=6)
    got = [list(b) for b in a]  # epoch 0
    it = iter(a)
    got += [list(next(it)) for _ in range(2)]  # part of epoch 1
    state = a.state_dict()
    assert (state["epoch"], state["position"]) == (1, 2)
    b = RandomIdentitySampler(items, 16, 4, seed=4, num_batches=6)
    b.load_state_dict(state)
    b.set_epoch(1)  # a training loop calling set_epoch(current) keeps the position
    got += [list(x) for x in b]
    got += [list(x) for x in b]  # epoch 2
    assert got == uninterrupted


def test_load_state_dict_rejects_other_configuration():
    items = make_items()
    state = RandomIdentitySampler(items, 16, 4).state_dict()
    with pytest.raises(ValueError, match="batch_size"):
        RandomIdentitySampler(items, 32, 4).load_state_dict(state)
    with pytest.raises(ValueError, match="sampler"):
        DomainBalancedSampler(items, 24, 4).load_state_dict(RandomIdentitySampler(items, 24, 4).state_dict())


@pytest.mark.parametrize("world_size", [2, 3, 6])
def test_ranks_partition_the_global_batch(world_size):
    items = make_items()
    full = take(RandomIdentitySampler(items, batch_size=24, num_instances=4, seed=7), 10)
    per_rank = [
        take(RandomIdentitySampler(items, batch_size=24, num_instances=4, seed=7, rank=r, world_size=world_size), 10)
        for r in range(world_size)
    ]
    for i, batch in enumerate(full):
        chunks = [per_rank[r][i] for r in range(world_size)]
        assert all(len(c) == 24 // world_size for c in chunks)
        assert sum(chunks, []) == batch  # r-th contiguous chunk, union = 1-process batch


def _papers_items(num_domains=5, ids_per_domain=30, seed=0):
    rng = np.random.default_rng(seed)
    items, pid = [], 0
    for dom in range(num_domains):
        for _ in range(ids_per_domain):
            items += [Item(f"d{dom}/{pid}/{j}.jpg", pid, j % 2, dom) for j in range(int(rng.integers(2, 9)))]
            pid += 1
    return items


def _check_whole_identities(items, per_rank, full, k, every_domain=False):
    for i, batch in enumerate(full):
        chunks = [ranks[i] for ranks in per_rank]
        assert sorted(sum(chunks, [])) == sorted(batch)  # the ranks share out the 1-process batch
        owner = {}
        for r, chunk in enumerate(chunks):
            counts = Counter(items[j].pid for j in chunk)
            assert set(counts.values()) == {k}, counts  # K images of every identity on this rank
            for pid in counts:
                assert owner.setdefault(pid, r) == r  # ... and on this rank only
            if every_domain:
                assert {items[j].domain for j in chunk} == {it.domain for it in items}


@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_identities_stay_whole_on_every_rank_with_the_papers_settings(world_size):
    items = _papers_items()
    batch, k = 80, 4  # the paper: IMS_PER_BATCH 80, K = 4; meta batch 80 over 5 domains
    if world_size == 8:  # 80 / 8 = 10 images per rank is no whole number of identities of 4
        with pytest.raises(ValueError, match="multiple of 32 \\(e.g. 64 or 96\\)"):
            RandomIdentitySampler(items, batch, k, world_size=8)
        with pytest.raises(ValueError, match="batch_size a multiple of 5 x 4 x 8 = 160"):
            DomainBalancedSampler(items, batch, k, world_size=8)
        batch = 64  # the nearest batch that works on 8 ranks: P = 2 identities per rank
    full = take(RandomIdentitySampler(items, batch, k, seed=3), 6)
    samplers = [RandomIdentitySampler(items, batch, k, seed=3, rank=r, world_size=world_size) for r in range(world_size)]
    assert all(s.num_pids_per_rank == batch // (world_size * k) for s in samplers)
    _check_whole_identities(items, [take(s, 6) for s in samplers], full, k)
    if world_size == 8:
        return
    full = take(DomainBalancedSampler(items, 80, k, seed=3), 6)
    per_rank = [take(DomainBalancedSampler(items, 80, k, seed=3, rank=r, world_size=world_size), 6) for r in range(world_size)]
    _check_whole_identities(items, per_rank, full, k, every_domain=True)


def test_a_rank_never_gets_part_of_an_identity():
    items = _papers_items()
    with pytest.raises(ValueError, match="batch_size=16 cannot be split into whole identities over world_size=4"):
        RandomIdentitySampler(items, batch_size=16, num_instances=8, world_size=4)


def test_domain_balanced_ranks_each_get_every_domain_and_whole_identities():
    items = make_items()
    sampler = DomainBalancedSampler(items, batch_size=24, num_instances=4, seed=7)
    full = take(sampler, 10)
    per_rank = [take(DomainBalancedSampler(items, 24, 4, seed=7, rank=r, world_size=2), 10) for r in range(2)]
    for i, batch in enumerate(full):
        chunks = [per_rank[r][i] for r in range(2)]
        assert sorted(sum(chunks, [])) == sorted(batch)
        for chunk in chunks:
            assert len(chunk) == 12
            assert {items[j][3] for j in chunk} == set(sampler.domains)
        for pid in {items[j][1] for j in batch}:  # an identity's K images stay on one rank
            assert sum(any(items[j][1] == pid for j in c) for c in chunks) == 1
    with pytest.raises(ValueError, match="must be a multiple of world_size"):
        DomainBalancedSampler(items, 24, 4, rank=0, world_size=4)


def test_works_as_dataloader_batch_sampler():
    items = make_items()
    ds = TensorDataset(torch.arange(len(items)))
    s = RandomIdentitySampler(items, 16, 4, seed=0, num_batches=3)
    loader = DataLoader(ds, batch_sampler=s)
    assert len(loader) == 3
    s.set_epoch(0)
    expected = [list(b) for b in s]
    s.set_epoch(0)
    assert [b[0].tolist() for b in loader] == expected
    with pytest.raises(TypeError):
        len(RandomIdentitySampler(items, 16, 4))


def test_estimated_num_images_matches_authors_formula():
    items = [Item("x", pid, 0, 0) for pid, n in enumerate([1, 4, 5, 8, 9, 3, 12]) for _ in range(n)]
    s = RandomIdentitySampler(items, batch_size=8, num_instances=4)
    rounded = 4 + 4 + 8 + 8 + 12 + 4 + 12  # = 52
    assert s.estimated_num_images == rounded - rounded % 8 - 8


def test_random_identity_errors():
    items = make_items()
    with pytest.raises(ValueError, match="multiple of num_instances"):
        RandomIdentitySampler(items, batch_size=18, num_instances=4)
    with pytest.raises(ValueError, match="at least P=30"):
        RandomIdentitySampler(items, batch_size=120, num_instances=4)
    with pytest.raises(ValueError, match="world_size"):
        RandomIdentitySampler(items, batch_size=16, num_instances=4, world_size=3)
    with pytest.raises(ValueError, match="rank"):
        RandomIdentitySampler(items, batch_size=16, num_instances=4, rank=2, world_size=2)
    small = next(it for it in items if sum(x.pid == it.pid for x in items) < 4)
    with pytest.raises(ValueError, match=rf"domain {small.domain} has fewer than K=4 images of identity \d+"):
        RandomIdentitySampler(items, batch_size=16, num_instances=4, allow_replacement=False)


# --------------------------------------------------------------------------- DomainBalancedSampler


def test_domain_balanced_structure():
    items = make_items(ids_per_domain=(6, 9, 5))
    s = DomainBalancedSampler(items, batch_size=24, num_instances=4, seed=1)
    assert s.domains == [0, 1, 2] and s.ids_per_domain == 2
    assert s.batch_domains() == [0] * 8 + [1] * 8 + [2] * 8
    for batch in take(s, 60):
        assert len(batch) == 24
        assert [items[i].domain for i in batch] == s.batch_domains()  # exactly its share, grouped
        for d in range(3):
            check_pk(batch[8 * d : 8 * (d + 1)], items, p=2, k=4)


def test_domain_balanced_recycles_small_domains():
    # domain 0 has exactly ids_per_domain identities of K images: each batch must contain all of
    # them; domain 1 is large and is cycled through without repeating an identity within a pass.
    items = [Item("x", pid, 0, 0) for pid in range(3) for _ in range(4)]
    items += [Item("x", pid, 0, 1) for pid in range(3, 33) for _ in range(4)]
    s = DomainBalancedSampler(items, batch_size=24, num_instances=4, seed=0)
    batches = take(s, 20)
    dom0 = sorted(i for i, it in enumerate(items) if it.domain == 0)
    for b in batches:
        assert sorted(b[:12]) == dom0
    first_pass = [i for b in batches[:10] for i in b[12:]]  # 30 ids / 3 per batch = 10 batches
    assert sorted(first_pass) == sorted(i for i, it in enumerate(items) if it.domain == 1)


def test_domain_balanced_key_is_domain_and_pid():
    # the same pid in two domains (e.g. camera-as-domain) is two separate identities
    items = [Item("x", pid, dom, dom) for dom in range(2) for pid in range(4) for _ in range(4)]
    s = DomainBalancedSampler(items, batch_size=16, num_instances=4)
    for b in take(s, 10):
        assert [items[i].domain for i in b] == [0] * 8 + [1] * 8


def test_domain_balanced_determinism():
    items = make_items()
    a = take(DomainBalancedSampler(items, 24, 4, seed=3), 20)
    assert a == take(DomainBalancedSampler(items, 24, 4, seed=3), 20)
    assert a != take(DomainBalancedSampler(items, 24, 4, seed=4), 20)


def test_domain_balanced_errors():
    items = make_items(ids_per_domain=(6, 9, 2))
    with pytest.raises(ValueError, match=r"multiple of num_domains x num_instances = 3 x 4 = 12"):
        DomainBalancedSampler(items, batch_size=20, num_instances=4)
    with pytest.raises(ValueError, match="domain 2 has 2 identities, fewer than the 3"):
        DomainBalancedSampler(items, batch_size=36, num_instances=4)
    with pytest.raises(ValueError, match="domain 3 has 0 identities"):
        DomainBalancedSampler(items, batch_size=16, num_instances=4, num_domains=4)
    with pytest.raises(ValueError, match="outside 0..1"):
        DomainBalancedSampler(items, batch_size=16, num_instances=4, num_domains=2)
    small = [Item("x", 0, 0, 0)] * 4 + [Item("x", 1, 0, 0)] * 4
    small += [Item("x", 2, 0, 1)] * 4 + [Item("x", 17, 0, 1)] * 3
    with pytest.raises(ValueError, match="domain 1 has fewer than K=4 images of identity 17"):
        DomainBalancedSampler(small, batch_size=8, num_instances=4, allow_replacement=False)
    DomainBalancedSampler(small, batch_size=8, num_instances=4)  # default: with replacement
