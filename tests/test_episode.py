"""Domain split and inner step size schedules."""

import pytest
import torch

from metabin_layers.episode import ConstantInnerLR, CyclicInnerLR, split_domains


def test_split_of_batch_labels_covers_all_domains_with_masks():
    labels = torch.tensor([3, 3, 7, 7, 1, 1, 9, 9, 4, 4, 3])
    split = split_domains(labels, generator=torch.Generator().manual_seed(0))
    assert len(split.train_domains) == 3 and len(split.test_domains) == 2
    assert set(split.train_domains.tolist()) | set(split.test_domains.tolist()) == {1, 3, 4, 7, 9}
    assert set(split.train_domains.tolist()).isdisjoint(split.test_domains.tolist())
    for i, d in enumerate(labels.tolist()):
        assert bool(split.train_mask[i]) == (d in split.train_domains.tolist())
    assert torch.equal(split.test_mask, ~split.train_mask)


def test_split_is_seeded_and_varies_between_draws():
    labels = torch.arange(5).repeat_interleave(4)
    a = [split_domains(labels, generator=g).train_domains.tolist() for g in [torch.Generator().manual_seed(5)] * 6]
    b = [split_domains(labels, generator=g).train_domains.tolist() for g in [torch.Generator().manual_seed(5)] * 6]
    assert a == b
    assert len({tuple(sorted(t)) for t in a}) > 1


@pytest.mark.parametrize("num_domains,expected", [(2, 1), (3, 2), (4, 2), (5, 3), (8, 5), (10, 6)])
def test_default_number_of_meta_train_domains(num_domains, expected):
    split = split_domains(list(range(num_domains)))
    assert len(split.train_domains) == expected and split.train_mask is None


def test_split_explicit_count_and_errors():
    assert len(split_domains([0, 1, 2, 3], num_meta_train=1).train_domains) == 1
    with pytest.raises(ValueError, match="at least two domains"):
        split_domains(torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match="num_meta_train"):
        split_domains([0, 1, 2], num_meta_train=3)
    with pytest.raises(ValueError, match="integer domain ids"):
        split_domains(torch.rand(4))


@pytest.mark.filterwarnings("ignore:Detected call of .lr_scheduler.step")
@pytest.mark.parametrize("ipe,period_per_epoch,up_ratio", [(10, 0.2, 0.5), (7, 0.5, 0.3), (3, 1.0, 0.5)])
def test_cyclic_schedule_matches_torch_cyclic_lr(ipe, period_per_epoch, up_ratio):
    sched = CyclicInnerLR(iters_per_epoch=ipe, period_per_epoch=period_per_epoch, up_ratio=up_ratio)
    period = int(ipe / period_per_epoch)
    up = int(period * up_ratio)
    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.001)
    torch_sched = torch.optim.lr_scheduler.CyclicLR(
        dummy, base_lr=0.001, max_lr=0.1, step_size_up=up, step_size_down=period - up, cycle_momentum=False
    )
    for _ in range(3 * period):
        torch_sched.step()  # the authors step the scheduler before reading it
        assert sched.step() == pytest.approx(dummy.param_groups[0]["lr"], rel=1e-9)


def test_cyclic_schedule_first_values_and_state():
    sched = CyclicInnerLR(iters_per_epoch=10)  # period 50, 25 up
    assert sched.step() == pytest.approx(0.001 + 0.099 / 25)
    for _ in range(24):
        v = sched.step()
    assert v == pytest.approx(0.1)
    state = sched.state_dict()
    nxt = [sched.step() for _ in range(5)]
    fresh = CyclicInnerLR(iters_per_epoch=10)
    fresh.load_state_dict(state)
    assert [fresh.step() for _ in range(5)] == nxt


def test_schedule_argument_errors():
    with pytest.raises(ValueError, match="iters_per_epoch"):
        CyclicInnerLR(iters_per_epoch=0)
    with pytest.raises(ValueError, match="up_ratio"):
        CyclicInnerLR(up_ratio=1.0)
    with pytest.raises(ValueError, match="inner_lr"):
        ConstantInnerLR(-1.0)
    assert ConstantInnerLR(0.5).step() == 0.5
