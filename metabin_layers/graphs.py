"""CapturedIteration: a whole MetaBIN iteration (base step + meta step) in one CUDA graph."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from .optim import MetaBINOptimizer

__all__ = ["CapturedIteration"]


def _check_inputs(inputs: Sequence[Tensor], static: Sequence[Tensor]) -> None:
    """Each input must match the captured buffer it is copied into (a graph has fixed shapes)."""
    if len(inputs) != len(static):
        raise ValueError(f"the iteration was captured with {len(static)} inputs, got {len(inputs)}")
    for i, (x, s) in enumerate(zip(inputs, static)):
        if not isinstance(x, Tensor):
            raise TypeError(f"input {i} must be a Tensor, got {type(x).__name__}")
        if x.shape != s.shape or x.dtype != s.dtype:
            raise ValueError(
                f"input {i} has shape {tuple(x.shape)} and dtype {x.dtype}, but the iteration was captured with "
                f"{tuple(s.shape)} and {s.dtype}: a CUDA graph replays fixed shapes (capture again, or run eagerly)"
            )


class CapturedIteration:
    """Capture ``iteration(*inputs)`` in one ``torch.cuda.CUDAGraph``; each call replays it on new inputs.

    ``iteration`` is one training iteration written as for eager mode: ``opt.zero_grad()``, the
    base forward, ``opt.backward``, ``opt.step()`` and ``opt.meta_step(...)``, reading its batch
    only from its arguments. Its tensors are captured once; a call copies the new inputs into the
    captured buffers, runs ``opt.before_replay()`` (the inner-lr schedule and the meta step count
    advance on the host, the step size goes to the device) and replays the graph: no Python, one
    launch for the whole iteration.

    What the graph cannot hold is refused when it is captured (``RuntimeError`` naming it): a
    ``GradScaler`` (use bfloat16 autocast), ``second_order=True``, ``torch.distributed``, a rho
    optimizer that is not fused, a host sync in your own code. Also keep in mind:

    * inputs keep their shapes and dtypes (the meta-train / meta-test index tensors too: a
      domain-balanced meta batch splits into fixed sizes); another shape raises ``ValueError``;
    * learning rates are captured: to schedule the base learning rate, build the base optimizer
      with ``fused=True`` and a tensor ``lr`` (torch's schedulers then write it in place);
    * ``warmup`` eager iterations run first on the example inputs, on a side stream (CUDA needs
      them before a capture); they are training iterations like any other;
    * use ``torch.autocast(..., cache_enabled=False)`` in ``iteration``.

    Args:
        optimizer: the ``MetaBINOptimizer`` that ``iteration`` steps; None for an iteration
            without a meta step (a plain BatchNorm baseline).
        iteration: the function to capture; what it returns is returned by every call (its
            tensors are the graph's buffers, overwritten by the next replay).
        *example_inputs: CUDA tensors of the shapes and dtypes of every later call's inputs.
        warmup: eager iterations before the capture (>= 1); ``warmup_outputs`` holds what the
            last one returned.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from metabin_layers import CapturedIteration, MetaBINOptimizer, base_parameters, convert_bn_to_metabin
        >>> def iteration(x, y, train_index, test_index):  # one iteration, reading only its arguments
        ...     opt.zero_grad()
        ...     loss = nn.functional.cross_entropy(model(x), y)
        ...     opt.backward(loss)
        ...     opt.step()
        ...     out = opt.meta_step(
        ...         lambda: model(x[train_index]).logsumexp(1).mean(),
        ...         lambda: nn.functional.cross_entropy(model(x[test_index]), y[test_index]))
        ...     return loss.detach(), out["meta_test_loss"]
        >>> if torch.cuda.is_available():
        ...     net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(1), nn.Linear(288, 4))
        ...     model = convert_bn_to_metabin(net).cuda()
        ...     opt = MetaBINOptimizer(model, torch.optim.SGD(base_parameters(model), lr=0.01), inner_lr=0.01)
        ...     x, y = torch.randn(8, 3, 8, 8, device="cuda"), torch.arange(8, device="cuda") % 4
        ...     tr, te = torch.arange(4, device="cuda"), torch.arange(4, 8, device="cuda")
        ...     step = CapturedIteration(opt, iteration, x, y, tr, te)
        ...     base_loss, meta_test_loss = step(x, y, tr, te)  # one replay: copy the batch in, replay
    """

    def __init__(
        self,
        optimizer: Optional[MetaBINOptimizer],
        iteration: Callable[..., Any],
        *example_inputs: Tensor,
        warmup: int = 3,
    ) -> None:
        if optimizer is not None and not isinstance(optimizer, MetaBINOptimizer):
            raise TypeError(f"optimizer must be a MetaBINOptimizer or None, got {type(optimizer).__name__}")
        if not callable(iteration):
            raise TypeError(f"iteration must be callable, got {type(iteration).__name__}")
        if not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup must be an int >= 1 (CUDA needs eager iterations before a capture), got {warmup!r}")
        if not torch.cuda.is_available():
            raise RuntimeError("CapturedIteration needs a CUDA device (torch.cuda.is_available() is False)")
        for i, x in enumerate(example_inputs):
            if not isinstance(x, Tensor) or not x.is_cuda:
                raise ValueError(f"example input {i} must be a CUDA tensor, got {getattr(x, 'device', type(x).__name__)}")
        if optimizer is not None and not optimizer.rhos[0].is_cuda:
            raise ValueError(f"the model must be on a CUDA device, its rho is on {optimizer.rhos[0].device}")
        self.optimizer = optimizer
        self.inputs = [x.detach().clone() for x in example_inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self.warmup_outputs = iteration(*self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = iteration(*self.inputs)

    def __call__(self, *inputs: Tensor) -> Any:
        """Copy ``inputs`` into the captured buffers and replay the iteration; returns its outputs."""
        _check_inputs(inputs, self.inputs)
        for buffer, x in zip(self.inputs, inputs):
            buffer.copy_(x, non_blocking=True)
        if self.optimizer is not None:
            self.optimizer.before_replay()
        self.graph.replay()
        return self.outputs
