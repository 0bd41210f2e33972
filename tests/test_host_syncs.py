"""No host sync in library code over a whole MetaBIN iteration (base step, split, meta step).

A host sync (``.item()``, ``bool(tensor)``, ``nonzero``, boolean masking) stalls the GPU queue and
forbids CUDA-graph capture. Counted on the CPU: every dispatched op that reads a tensor value on
the host is recorded with the innermost ``metabin_layers`` frame that led to it; the counter is
checked on code with known syncs first.
"""

import traceback
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import metabin_layers
from metabin_layers import MetaBINOptimizer, base_parameters, convert_bn_to_metabin, rho_parameters
from metabin_layers.losses import (
    cross_entropy_label_smooth,
    inter_domain_shuffle_loss,
    intra_domain_scatter_loss,
    triplet_loss,
)

PACKAGE = str(Path(metabin_layers.__file__).parent)
SYNC_OPS = {"_local_scalar_dense", "item", "nonzero", "is_nonzero"}


class HostSyncs(TorchDispatchMode):
    """Records ``(op, file:line)`` for every host-reading op dispatched from a library frame."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._overloadpacket.__name__
        if name in SYNC_OPS:
            ours = [f for f in traceback.extract_stack() if f.filename.startswith(PACKAGE)]
            if ours:
                self.found.append((name, f"{Path(ours[-1].filename).name}:{ours[-1].lineno}"))
        return func(*args, **(kwargs or {}))


def test_the_counter_sees_syncs_in_library_code_only():
    x = torch.tensor([0.0, 2.0, 0.0])
    with HostSyncs() as c:
        x.nonzero()  # this test's own frame: not library code
        float(x.sum())
    assert c.found == []
    with HostSyncs() as c:
        metabin_layers.episode.split_domains(torch.tensor([0, 1, 1]))  # host values by tolist(): no op
    assert c.found == []
    with HostSyncs() as c:  # loading checks rho's range on the host (not part of an iteration)
        metabin_layers.MetaBIN2d(2).load_state_dict(metabin_layers.MetaBIN2d(2).state_dict())
    assert c.found and all(f.startswith("layers.py:") for _, f in c.found), c.found


class Net(nn.Module):
    """Two converted conv blocks, a plain BatchNorm neck and a classifier, as in Re-ID models."""

    def __init__(self, classes: int = 6) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.BatchNorm2d(16)
        )
        self.neck = nn.BatchNorm1d(16)
        self.head = nn.Linear(16, classes, bias=False)

    def forward(self, x):
        f = self.body(x).mean((2, 3))
        return f, self.head(self.neck(f))


def _iteration(model, opt, x, pid, dom):
    """The recipe's iteration: CE + triplet base step, shuffle + triplet + scatter, triplet + CE."""
    f, logits = model(x)
    opt.zero_grad()
    opt.backward(cross_entropy_label_smooth(logits, pid, 0.1) + triplet_loss(f, pid, 0.3))
    opt.step()
    s = opt.split(dom)
    tr, te = s.train_index, s.test_index

    def meta_train():
        f, _ = model(x[tr])
        return (
            inter_domain_shuffle_loss(f, pid[tr], dom[tr]) + triplet_loss(f, pid[tr], 0.3) + intra_domain_scatter_loss(f, dom[tr])
        )

    def meta_test():
        f, logits = model(x[te])
        return triplet_loss(f, pid[te], 0.3) + F.cross_entropy(logits, pid[te])

    return opt.meta_step(meta_train, meta_test)


@pytest.mark.parametrize(
    "backend, scaled, second_order",
    [("auto", False, False), ("auto", True, False), ("auto", False, True), ("auto", True, True), ("triton", False, False)],
)
def test_a_whole_iteration_makes_no_host_sync(backend, scaled, second_order):
    if backend == "triton":
        pytest.importorskip("triton")
    torch.manual_seed(0)
    model = convert_bn_to_metabin(Net(), rho_init=0.7)
    for m in metabin_layers.metabin_modules(model):
        m.backend = backend
    model.neck = nn.BatchNorm1d(16)  # a plain norm, held during the meta step
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0) if scaled else None
    opt = MetaBINOptimizer(
        model,
        # fused: GradScaler.step then skips on the device too (it reads found_inf on the host otherwise)
        torch.optim.SGD(base_parameters(model), lr=0.01, momentum=0.9, fused=True),
        rho_lr=0.5,
        grad_scaler=scaler,
        second_order=second_order,
    )
    x, pid = torch.randn(24, 3, 10, 8), torch.arange(24) // 4
    dom = pid % 3
    _iteration(model, opt, x, pid, dom)  # first call: lazy state (momentum buffers, caches)
    before = [r.detach().clone() for r in rho_parameters(model)]
    with HostSyncs() as c:
        out = _iteration(model, opt, x, pid, dom)
    assert c.found == [], c.found
    assert not bool(out["skipped"]) and any(not torch.equal(a, b) for a, b in zip(before, rho_parameters(model)))


def test_degenerate_batches_make_no_host_sync():
    # One identity, no two identities in a domain: the losses' zero stays on the device.
    f = torch.randn(6, 4, requires_grad=True)
    one_id, dom = torch.zeros(6, dtype=torch.long), torch.tensor([0, 0, 1, 1, 2, 2])
    with HostSyncs() as c:
        loss = triplet_loss(f, one_id) + inter_domain_shuffle_loss(f, dom, dom)  # one identity per domain
        loss.backward()
    assert c.found == [] and float(loss.detach()) == 0.0 and torch.equal(f.grad, torch.zeros_like(f))
