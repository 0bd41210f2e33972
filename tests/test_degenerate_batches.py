"""Unlucky batches: a degenerate loss is counted, not fatal; empty batches; shape messages."""

from __future__ import annotations

import os
import socket
import warnings
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from metabin_layers import MetaBIN1d, MetaBIN2d, MetaBIN3d, MetaBINAct2d
from metabin_layers.reid.config import load_config
from metabin_layers.reid.train import Trainer


def tiny_config(tmp_path, **kw):
    overrides = {
        "output": str(tmp_path / "run"),
        "syn_train_ids": 24,
        "syn_test_ids": 6,
        "syn_images_per_id": 4,
        "max_iters": 2,
        "backbone": "resnet10t",
        "height": 32,
        "width": 16,
        "pad": 2,
        "workers": 0,
    }
    overrides.update(kw)
    return load_config(overrides=overrides, quick=True)


def _one_identity_on_call(batches, which_calls):
    """Make the batches returned on the given calls hold a single identity (all labels 0)."""
    original, calls = batches.next, [0]

    def next_batch():
        x, pid, dom, host_dom = original()
        calls[0] += 1
        return (x, torch.zeros_like(pid) if calls[0] in which_calls else pid, dom, host_dom)

    batches.next = next_batch


@pytest.mark.slow
def test_a_batch_of_one_identity_is_counted_not_fatal(tmp_path):
    cfg = tiny_config(tmp_path, max_iters=3)
    t = Trainer(cfg)
    _one_identity_on_call(t.base_batches, {2})  # iteration 2's base batch: the triplet has no negative
    _one_identity_on_call(t.meta_batches, {3})  # iteration 3's meta batch: shuffle, meta-train and meta-test triplets
    (tmp_path / "run").mkdir()
    t.run(tmp_path / "run", progress=False)
    assert t.iteration == 3
    assert [h["degenerate"] for h in t.history] == [0, 1, 4]
    assert (tmp_path / "run" / "log.txt").read_text().splitlines()[-1].count("degenerate=4") == 1
    assert t.state_dict()["degenerate_losses"] == 4


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _count_worker(rank, port, tmp):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    try:
        from pathlib import Path

        cfg = tiny_config(Path(tmp), meta_batch_size=64, output=str(Path(tmp) / f"run{rank}"))
        t = Trainer(cfg)
        if rank == 0:  # only rank 0 gets the unlucky batch
            _one_identity_on_call(t.base_batches, {1})
        Path(cfg.output).mkdir()
        t.run(Path(cfg.output), progress=False)
        counts = torch.tensor([h["degenerate"] for h in t.history])
        everyone = [torch.zeros_like(counts) for _ in range(2)]
        dist.all_gather(everyone, counts)
        assert everyone[0].tolist() == everyone[1].tolist() == [1, 1], everyone
        dist.barrier()  # no rank tears its group down while the other still talks to it
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_the_count_is_the_same_on_every_rank(tmp_path):
    mp.spawn(_count_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)


# -- empty batches and shapes in the layers -------------------------------------------------------


@pytest.mark.parametrize(
    "cls, shape, bn",
    [
        (MetaBIN1d, (0, 3), nn.BatchNorm1d),
        (MetaBIN1d, (0, 3, 5), nn.BatchNorm1d),
        (MetaBIN2d, (0, 3, 4, 4), nn.BatchNorm2d),
        (MetaBIN3d, (0, 3, 2, 2, 2), nn.BatchNorm3d),
        (MetaBINAct2d, (0, 3, 4, 4), nn.BatchNorm2d),
    ],
)
@pytest.mark.parametrize("backend", ["fused", "composite"])
def test_an_empty_batch_behaves_like_batchnorm_in_eval_and_says_so_in_training(cls, shape, bn, backend):
    layer = cls(3, rho_init=0.5, backend=backend).eval()
    reference = bn(3).eval()
    x = torch.randn(shape, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # BatchNorm warns about nothing here: neither may the layer
        y = layer(x)
    expected = reference(x)
    assert y.shape == expected.shape and y.dtype == expected.dtype and y.numel() == 0
    y.sum().backward()  # still in the graph
    assert x.grad is not None and x.grad.shape == x.shape
    before = layer.running_mean.clone(), layer.num_batches_tracked.clone()
    layer.train()
    with pytest.raises(ValueError, match=rf"{cls.__name__}: empty batch \(input of shape \({shape[0]}, 3"):
        layer(x)
    assert torch.equal(layer.running_mean, before[0]) and torch.equal(layer.num_batches_tracked, before[1])


def test_metabin1d_shape_errors_show_the_callers_shape():
    layer = MetaBIN1d(4).train()
    with pytest.warns(UserWarning, match=r"input of shape \(8, 4\) has a single value"):
        layer(torch.randn(8, 4))  # (N, C) has one value per instance: the batch branch only
    with pytest.raises(ValueError, match=r"input of shape \(1, 4\) \(batch 1"):
        layer(torch.randn(1, 4))
    with pytest.raises(ValueError, match=r"got 4D input of shape \(2, 4, 3, 3\)"):
        layer(torch.randn(2, 4, 3, 3))
