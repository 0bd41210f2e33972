"""MetaBINOptimizer: the base update of the weights and the meta-learned update of rho."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional, Sequence, Union, cast

import torch
from torch import Tensor, nn

from ._collectives import active_group, average_over_group, global_domains
from .episode import ConstantInnerLR, CyclicInnerLR, DomainSplit, InnerLR, _split_batch, split_domains
from .layers import _MetaBINBase, check_rho, metabin_modules, rho_parameters, rho_problem

__all__ = ["MetaBINOptimizer"]

LossClosure = Callable[[], Tensor]


def _inner_step(rhos: Sequence[Tensor], grads: list[Tensor], betas: list[float], scale: Optional[Tensor] = None) -> list[Tensor]:
    """``rho' = clamp(rho - beta * g, 0, 1)`` over every layer at once, as foreach ops.

    The clamp is straight-through (the authors' ``.data.clamp_``): ``rho'`` keeps the gradient of
    ``rho - beta * g`` (to ``rho``, and to ``g`` when ``g`` carries a graph: second order). One
    foreach launch per op and per distinct beta (a rho optimizer with several learning rates).
    ``scale``: a 0-dim device tensor multiplying every beta (the schedule's value in a CUDA graph,
    where a Python float would be frozen at capture).
    """
    if scale is not None:
        grads = list(torch._foreach_mul(grads, scale))
    out: list[Optional[Tensor]] = [None] * len(rhos)
    for beta in dict.fromkeys(betas):
        idx = [i for i, b in enumerate(betas) if b == beta]
        rho, grad = [rhos[i] for i in idx], [grads[i] for i in idx]
        stepped = torch._foreach_add(rho, grad, alpha=-beta)
        with torch.no_grad():
            shift = torch._foreach_clamp_min(stepped, 0.0)
            torch._foreach_clamp_max_(shift, 1.0)
            torch._foreach_sub_(shift, stepped)
        for i, t in zip(idx, torch._foreach_add(stepped, shift)):
            out[i] = t
    return out  # type: ignore[return-value]


def _check_finite(grads: list[Tensor], found_inf: Tensor, inv_scale: Tensor) -> None:
    """Multiply ``grads`` by ``inv_scale`` in place and set ``found_inf`` to 1 if one is not finite.

    GradScaler's own kernel (one launch on the GPU): the decision stays on the device.
    """
    torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale)


@contextlib.contextmanager
def _hold_plain_norms(model: nn.Module) -> Iterator[None]:
    """Hold the running statistics of every non-MetaBIN norm layer that tracks them.

    Held: a layer in training mode normalises with batch statistics and its ``running_mean``,
    ``running_var`` and ``num_batches_tracked`` stay exactly as they were; a layer in eval mode
    keeps normalising with its running statistics. Restored on exit, also when the block raises.

    * ``_BatchNorm`` subclasses (``nn.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm``, timm's
      ``BatchNormAct2d`` / ``SyncBatchNormAct``, whose forward is a copy of torch's): their
      ``track_running_stats`` is set to False inside the block. torch's forward then passes no
      buffers in training (batch statistics, no update, no ``num_batches_tracked`` bump) and still
      passes them in eval mode. No copy, no update arithmetic, and ``SyncBatchNorm`` still
      synchronises its batch statistics (the same collectives on every rank), so it is DDP-safe.
      ``momentum=0`` would not do: it still bumps ``num_batches_tracked``, and ``momentum=None``
      averages cumulatively.
    * Any other ``_NormBase`` that tracks statistics (e.g. ``nn.InstanceNorm2d(...,
      track_running_stats=True)``, whose forward updates the buffers whenever it uses input
      statistics, whatever the flag): its buffers are saved and copied back in place, bit-exact
      and keeping the tensors' identity (DDP holds references to them).
    """
    flipped: list[nn.modules.batchnorm._NormBase] = []
    saved: list[tuple[Tensor, Tensor]] = []
    try:
        for m in model.modules():
            if isinstance(m, _MetaBINBase) or not isinstance(m, nn.modules.batchnorm._NormBase):
                continue
            if not m.track_running_stats:
                continue
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.track_running_stats = False
                flipped.append(m)
            else:
                for buf in (m.running_mean, m.running_var, m.num_batches_tracked):
                    if isinstance(buf, Tensor):
                        saved.append((buf, buf.detach().clone()))
        yield
    finally:
        for m in flipped:
            m.track_running_stats = True
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)


def _default_rho_optimizer(rhos: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """Plain SGD over rho; fused where torch has the kernel, so a skipped step stays on the device."""
    try:
        return torch.optim.SGD(rhos, lr=lr, momentum=0.0, weight_decay=0.0, fused=True)
    except RuntimeError:  # a device without fused kernels
        return torch.optim.SGD(rhos, lr=lr, momentum=0.0, weight_decay=0.0)


def _capturing(device: torch.device) -> bool:
    """Whether the current CUDA stream is being captured into a CUDA graph."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _check_loss(value: Any, name: str) -> Tensor:
    if not isinstance(value, Tensor) or value.numel() != 1:
        raise TypeError(f"{name} must return a scalar loss tensor, got {type(value).__name__}")
    if not value.requires_grad:
        raise ValueError(f"{name} returned a loss that does not depend on rho (requires_grad=False)")
    return value.reshape(())


class MetaBINOptimizer(torch.optim.Optimizer):
    """The MetaBIN iteration: ``step`` updates the weights, ``meta_step`` meta-learns rho.

    ``step`` steps ``base_optimizer`` (rho is frozen outside ``meta_step``). ``meta_step`` runs
    the episode with every normalization layer's running statistics held: ``rho' = clamp(rho -
    beta * dL_mtr/drho)``, then rho is updated from ``L_mte`` computed through rho'. The episode,
    the held statistics, LR schedulers, ``GradScaler`` and DDP are described in
    ``docs/concepts.md`` and ``docs/distributed.md``.

    Args:
        model: the converted model, or a ``DistributedDataParallel`` around it.
        base_optimizer: optimizer over ``base_parameters(model)`` (never rho).
        rho_lr: learning rate of the default rho optimizer (SGD, no momentum, no weight decay).
        inner_lr: inner step size ``beta``: an ``InnerLR`` schedule, a float, or None for the
            authors' ``CyclicInnerLR``.
        second_order: differentiate through the inner step (double backward); default first order.
        rho_optimizer: replaces the default rho optimizer (must hold exactly the rho parameters).
        grad_scaler: a ``torch.amp.GradScaler`` shared by both phases (call ``backward`` for the
            base loss); it is updated once per iteration.
        seed: seed of the domain split (the same on every rank).
        process_group: group over which rho's meta gradients are averaged; None: the DDP's group
            or the default group.
        distributed: average rho's meta gradients over the group; None decides at each call.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from metabin_layers import MetaBINOptimizer, base_parameters, convert_bn_to_metabin
        >>> model = convert_bn_to_metabin(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(1), nn.LazyLinear(4)))
        >>> x, y = torch.randn(8, 3, 8, 8), torch.arange(8) % 4
        >>> _ = model(x)  # materialise the lazy layer
        >>> opt = MetaBINOptimizer(model, torch.optim.SGD(base_parameters(model), lr=0.01), rho_lr=0.1, inner_lr=0.01)
        >>> opt.zero_grad(); opt.backward(nn.functional.cross_entropy(model(x), y)); opt.step()
        >>> out = opt.meta_step(
        ...     meta_train_loss=lambda: model(x[:4]).logsumexp(1).mean(),
        ...     meta_test_loss=lambda: nn.functional.cross_entropy(model(x[4:]), y[4:]))
        >>> sorted(out)
        ['inner_lr', 'meta_test_loss', 'meta_train_loss', 'skip_flags', 'skipped']
    """

    def __init__(
        self,
        model: nn.Module,
        base_optimizer: torch.optim.Optimizer,
        rho_lr: float = 0.1,
        inner_lr: Union[InnerLR, float, None] = None,
        second_order: bool = False,
        rho_optimizer: Optional[torch.optim.Optimizer] = None,
        grad_scaler: Optional[torch.amp.GradScaler] = None,
        seed: int = 0,
        process_group: Any = None,
        distributed: Optional[bool] = None,
    ) -> None:
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            raise TypeError(f"base_optimizer must be a torch.optim.Optimizer, got {type(base_optimizer).__name__}")
        self.ddp: Optional[nn.parallel.DistributedDataParallel] = None
        if isinstance(model, nn.parallel.DistributedDataParallel):
            self.ddp, model = model, model.module
        if distributed not in (None, True, False):
            raise ValueError(f"distributed must be None (auto), True or False, got {distributed!r}")
        if distributed and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise ValueError("distributed=True needs an initialised process group (torch.distributed.init_process_group)")
        self.distributed = distributed
        self.process_group = process_group
        self.model = model
        self.layers: list[_MetaBINBase] = metabin_modules(model)
        self.rhos = rho_parameters(model)
        self._index = {id(p): i for i, p in enumerate(self.rhos)}
        if not self.layers:
            raise ValueError("model has no MetaBIN layer: convert it first with convert_bn_to_metabin(model)")
        check_rho(model)  # names a layer whose rho lies outside [0, 1] or is not finite
        rho_ids = {id(p) for p in self.rhos}
        for group in base_optimizer.param_groups:
            if any(id(p) in rho_ids for p in group["params"]):
                raise ValueError("base_optimizer must not hold rho (it is meta-learned); build it with base_parameters(model)")
        if rho_optimizer is None:
            if not isinstance(rho_lr, (int, float)) or not rho_lr >= 0:
                raise ValueError(f"rho_lr must be a number >= 0, got {rho_lr!r}")
            rho_optimizer = _default_rho_optimizer(self.rhos, rho_lr)
        else:
            held = {id(p) for g in rho_optimizer.param_groups for p in g["params"]}
            if held != rho_ids:
                raise ValueError("rho_optimizer must hold exactly the rho parameters of the model (rho_parameters(model))")
        if inner_lr is None:
            inner_lr = CyclicInnerLR()
        elif not isinstance(inner_lr, InnerLR):
            inner_lr = ConstantInnerLR(inner_lr)  # validates the number
        self.base_optimizer = base_optimizer
        self.rho_optimizer = rho_optimizer
        self.inner_lr = inner_lr
        self.second_order = bool(second_order)
        self.grad_scaler = grad_scaler
        self._scaler_update_pending = False  # step() ran through the scaler, update() not yet
        self.generator = torch.Generator().manual_seed(seed)
        self.num_meta_steps = 0
        self._skipped = torch.zeros((), dtype=torch.float32, device=self.rhos[0].device)
        self._ones: dict[torch.device, Tensor] = {}
        self._ratio: Optional[Tensor] = None  # the schedule's value on the device (CUDA graphs)
        # A DDP built while rho required grad has registered rho with its reducer, which then waits
        # for rho's gradient after every backward: keep rho grad-enabled in the base step for it.
        self._rho_in_ddp = self.ddp is not None and any(
            p.requires_grad and not getattr(p, "_ddp_ignored", False) for p in self.rhos
        )
        # Share the base optimizer's groups so that LR schedulers attached here scale them
        # (the pattern of timm's Lookahead wrapper).
        super().__init__(base_optimizer.param_groups, base_optimizer.defaults)
        self.param_groups = base_optimizer.param_groups
        self.defaults = base_optimizer.defaults
        self.state = base_optimizer.state
        self._freeze_rho(True)

    def _freeze_rho(self, frozen: bool) -> None:
        frozen = frozen and not self._rho_in_ddp
        for p in self.rhos:
            p.requires_grad_(not frozen)

    def _group(self) -> Any:
        """The group rho's meta gradients are averaged over, or None (nothing to synchronise)."""
        if self.distributed is False:
            return None
        group = self.process_group
        if group is None and self.ddp is not None:
            group = self.ddp.process_group
        return active_group(group)

    # -- base update ---------------------------------------------------------------------------
    def _update_scaler(self) -> None:
        # The one GradScaler.update() of an iteration (see grad_scaler in the class docstring).
        self._scaler_update_pending = False
        if self.grad_scaler is not None:
            self.grad_scaler.update()

    def _finish_pending_update(self) -> None:
        if self._scaler_update_pending:
            self._update_scaler()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients of the base parameters and of rho (and finish a pending scaler update).

        Args:
            set_to_none: passed to the base optimizer's ``zero_grad``; rho's ``.grad`` is always
                set to None.
        """
        self._finish_pending_update()
        self.base_optimizer.zero_grad(set_to_none=set_to_none)
        for p in self.rhos:
            p.grad = None

    def backward(self, loss: Tensor) -> None:
        """``loss.backward()``, scaled by the grad scaler when there is one.

        Args:
            loss: the base loss (``L_base``) of this iteration, a scalar tensor.
        """
        self._finish_pending_update()
        (self.grad_scaler.scale(loss) if self.grad_scaler is not None else loss).backward()

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:  # type: ignore[override]
        """Base update: step the base optimizer (through the grad scaler if any). rho is not touched.

        With a grad scaler its ``update()`` is left to ``meta_step`` (or to the next
        ``zero_grad`` / ``backward``): one update per iteration.

        Args:
            closure: passed to the base optimizer's ``step`` (not supported with a grad scaler).

        Returns:
            What the base optimizer's ``step`` returns (the closure's loss, or None); None with a
            grad scaler.

        Raises:
            ValueError: a ``closure`` together with a grad scaler.
        """
        if self.grad_scaler is not None:
            if closure is not None:
                raise ValueError("closure is not supported together with a grad_scaler")
            self._finish_pending_update()  # a second step() without zero_grad()/backward()
            self.grad_scaler.step(self.base_optimizer)
            self._scaler_update_pending = True
            return None
        return self.base_optimizer.step(closure)

    def split(self, domains: Tensor, num_meta_train: Optional[int] = None) -> DomainSplit:
        """Draw this episode's meta-train / meta-test domains from a batch's domain labels.

        Uses the optimizer's own seeded generator (saved in ``state_dict``). Under
        ``torch.distributed`` (see ``distributed``) ``domains`` are this rank's labels: the
        domains of the whole group are gathered first, so every rank draws the same split that a
        single process would draw from the global batch (the masks select this rank's samples),
        and a generator that differs between ranks (another seed) raises on every rank.

        Args:
            domains: the per-sample domain labels of the batch, a 1-D integer tensor.
            num_meta_train: how many domains go to meta-train; default as in ``split_domains``.

        Returns:
            The ``DomainSplit``, with the masks and indices over ``domains``.

        Raises:
            ValueError: as ``split_domains``; under ``torch.distributed`` also when the ranks'
                generators differ.
        """
        group = self._group()
        if group is None or not isinstance(domains, Tensor):
            return split_domains(domains, num_meta_train, generator=self.generator)
        if domains.dim() != 1 or domains.dtype.is_floating_point or domains.dtype == torch.bool:
            raise ValueError(
                f"domains must be a 1-D sequence of integer domain ids, got {domains.dtype} of shape {tuple(domains.shape)}"
            )
        state = self.generator.get_state().to(torch.int64)
        fingerprint = int((state * torch.arange(1, state.numel() + 1)).sum())
        union = global_domains(domains, group, self.rhos[0].device, fingerprint)
        drawn = split_domains(union.tolist(), num_meta_train, generator=self.generator)
        return _split_batch(domains, drawn.train_domains, drawn.test_domains)

    # -- meta update ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def _episode(self) -> Iterator[None]:
        # Found again each time: layers converted after construction (convert_sync_metabin) share
        # rho by identity and are picked up.
        self.layers = metabin_modules(self.model)
        modes = [m.stats_mode for m in self.layers]
        backends = [m.backend for m in self.layers]
        try:
            for m in self.layers:
                m.stats_mode = "hold"
                if self.second_order:
                    m.backend = "composite"
            self._freeze_rho(False)
            # A DDP forward in a closure must not arm the reducer: nothing here calls backward().
            no_sync = self.ddp.no_sync() if self.ddp is not None else contextlib.nullcontext()
            with torch.enable_grad(), no_sync, _hold_plain_norms(self.model):
                yield
        finally:
            for m, mode, backend in zip(self.layers, modes, backends):
                m.stats_mode = mode
                m.backend = backend
                m._rho_override = None
            self._freeze_rho(True)

    def _grad(
        self, loss: Tensor, scaler: Optional[torch.amp.GradScaler], create_graph: bool, phase: str = "inner"
    ) -> list[Tensor]:
        scaled = scaler.scale(loss) if scaler is not None else loss
        raw = torch.autograd.grad(scaled, self.rhos, create_graph=create_graph, allow_unused=True)
        # A layer the closure never reached gets a zero gradient.
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(raw, self.rhos)]
        group = self._group()
        if group is not None:
            # autograd.grad bypasses DDP's reducer: average over the ranks ourselves, before any
            # finiteness decision, so that every rank decides (and steps) the same way.
            what = f"MetaBINOptimizer.meta_step: all_reduce of rho's {phase} gradient"
            grads = average_over_group(grads, group, differentiable=create_graph, what=what)
        return grads

    def _rho_lrs(self) -> dict[int, float]:
        return {id(p): g["lr"] for g in self.rho_optimizer.param_groups for p in g["params"]}

    def meta_step(self, meta_train_loss: LossClosure, meta_test_loss: LossClosure) -> dict[str, Any]:
        """One MetaBIN episode on rho; returns the losses and the inner step size used.

        A call that raises (a closure fails) changes nothing: rho, its ``.grad``,
        ``num_meta_steps`` and the inner-lr schedule keep their values. A non-finite inner or outer
        gradient does not raise: the step is skipped on the device and counted in
        ``skipped_meta_steps`` (the schedule still advances, as under a grad scaler).

        Args:
            meta_train_loss: computes ``L_mtr`` on the meta-train domains by calling the model.
            meta_test_loss: computes ``L_mte`` on the meta-test domains by calling the model;
                it runs with rho' installed in every layer.

        A non-finite meta-train or meta-test loss is refused the same way, also when its
        gradients are finite (a detached NaN added to it): rho is left untouched, and
        ``skip_reason`` names the loss. A rho changed outside the optimizer to a value outside
        [0, 1] or not finite raises ``ValueError`` naming the layer (checked on the host, and
        only for layers whose rho changed: no device sync otherwise).

        Returns:
            ``{"meta_train_loss": Tensor, "meta_test_loss": Tensor, "inner_lr": float,
            "skipped": Tensor, "skip_flags": Tensor}``: the losses (detached), ``skipped`` (a
            0-dim bool tensor, True when a gradient or a loss was not finite) and ``skip_flags``
            (bool ``[meta-train loss, meta-test loss, skipped]``, read by ``skip_reason``) stay
            on the device; read them when you log. Inside a CUDA graph capture ``inner_lr`` is a
            device tensor too (see ``before_replay``).
        """
        schedule, count, grads = self.inner_lr.state_dict(), self.num_meta_steps, [p.grad for p in self.rhos]
        try:
            return self._episode_step(meta_train_loss, meta_test_loss)
        except BaseException:
            self.inner_lr.load_state_dict(schedule)
            self.num_meta_steps = count
            for p, g in zip(self.rhos, grads):
                p.grad = g
            raise

    def _check_changed_rho(self) -> None:
        """Refuse a rho changed outside the optimizer to a value outside [0, 1] or not finite.

        Host-side: only layers whose rho changed since it was last checked are read (one sync
        each), so the optimizer's own updates cost nothing; see the rho policy of ``MetaBIN2d``.
        """
        for m in metabin_modules(self.model):  # as _episode finds them: layers converted after construction too
            if m._rho_changed():
                problem = rho_problem(m.rho)
                if problem is not None:
                    name = next(n for n, module in self.model.named_modules() if module is m)
                    raise ValueError(
                        f"MetaBINOptimizer.meta_step: layer {name or '<root>'!r} ({m._label()}): {problem}; "
                        "rho was changed outside the optimizer: set it back in [0, 1]"
                    )
                m._mark_rho_checked()

    def _mark_rho_checked(self) -> None:
        for m in self.layers:
            m._mark_rho_checked()

    def _episode_step(self, meta_train_loss: LossClosure, meta_test_loss: LossClosure) -> dict[str, Any]:
        scaler = self.grad_scaler if self.grad_scaler is not None and self.grad_scaler.is_enabled() else None
        device = self.rhos[0].device
        if not _capturing(device):
            self._check_changed_rho()
        lrs = self._rho_lrs()
        factors = [lrs[id(p)] if self.inner_lr.relative else 1.0 for p in self.rhos]
        scale: Optional[Tensor] = None
        inner_lr: Union[Tensor, float]
        if _capturing(device):
            # In a CUDA graph the schedule's value is read from the device: before_replay() steps
            # the schedule on the host and writes it there before each replay.
            self._check_capturable(scaler)
            scale = self._device_ratio()
            betas, inner_lr = factors, scale * factors[0]
        else:
            ratio = self.inner_lr.step()
            self.num_meta_steps += 1
            betas = [ratio * f for f in factors]
            inner_lr = betas[0]
        found_inf = torch.zeros((), dtype=torch.float32, device=device)
        one = self._one(device)
        with self._episode():
            l_mtr = _check_loss(meta_train_loss(), "meta_train_loss")
            inner = self._grad(l_mtr, scaler, create_graph=self.second_order)
            inv_scale = scaler.scale(one.double()).reciprocal().float() if scaler is not None else one
            if self.second_order:  # the check on a copy; the unscale stays in the graph
                _check_finite(list(torch._foreach_mul([g.detach() for g in inner], inv_scale)), found_inf, one)
                inner = list(torch._foreach_mul(inner, inv_scale))
            else:
                inner = [g.detach() for g in inner]
                _check_finite(inner, found_inf, inv_scale)
            rho_prime = _inner_step(self.rhos, inner, betas, scale)
            for m in self.layers:
                m._rho_override = rho_prime[self._index[id(m.rho)]]
            l_mte = _check_loss(meta_test_loss(), "meta_test_loss")
            outer = self._grad(l_mte, scaler, create_graph=False, phase="outer")
        for p, g in zip(self.rhos, outer):
            p.grad = g
        # A loss that is not finite refuses the step even when its gradients are (a detached NaN
        # added to it): folded into found_inf on the device, so the skip costs no host sync.
        losses = torch.stack([l_mtr.detach(), l_mte.detach()])
        loss_bad = (losses - losses).ne(0)  # NaN for inf and NaN: two launches where isfinite takes four
        if scaler is not None:
            # The scaler finds the overflow of the outer gradient itself; make it see the inner
            # one and a non-finite loss too (inf added where found_inf is 1): it then skips.
            torch.maximum(found_inf, loss_bad.any(), out=found_inf)
            outer[0].add_(found_inf / (1.0 - found_inf))
            _check_finite(outer, found_inf, one)
            scaler.step(self.rho_optimizer)
            self._update_scaler()  # one update for the base and the meta step of this iteration
        else:
            _check_finite(outer, found_inf, one)
            torch.maximum(found_inf, loss_bad.any(), out=found_inf)
            self._step_rho_unless(found_inf)
        self.clamp_rho()
        self._count_skipped(found_inf)
        skipped = found_inf > 0
        return {
            "meta_train_loss": losses[0],
            "meta_test_loss": losses[1],
            "inner_lr": inner_lr,
            "skipped": skipped,
            "skip_flags": torch.cat([loss_bad, skipped.reshape(1)]),
        }

    @staticmethod
    def skip_reason(stats: dict[str, Any]) -> Optional[str]:
        """Why the ``meta_step`` that returned ``stats`` was skipped; None when it stepped rho.

        Reads the device (one sync): call it when you log, e.g. when ``stats["skipped"]``.

        Args:
            stats: what ``meta_step`` returned.

        Returns:
            ``"meta_train_loss is not finite (nan): ..."``, the same for ``meta_test_loss``, or
            a sentence on a non-finite gradient of rho; None for a step taken.

        Examples:
            >>> import torch
            >>> from torch import nn
            >>> from metabin_layers import MetaBINOptimizer, base_parameters, convert_bn_to_metabin
            >>> model = convert_bn_to_metabin(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), rho_init=0.5)
            >>> opt = MetaBINOptimizer(model, torch.optim.SGD(base_parameters(model), lr=0.1), inner_lr=0.1)
            >>> x = torch.randn(4, 3, 6, 6)
            >>> out = opt.meta_step(lambda: model(x[:2]).square().mean(), lambda: model(x[2:]).mean() + float("nan"))
            >>> print(MetaBINOptimizer.skip_reason(out))
            meta_test_loss is not finite (nan): the meta step was skipped, rho is unchanged
        """
        mtr_bad, mte_bad, skipped = (bool(v) for v in stats["skip_flags"].tolist())
        for bad, name in ((mtr_bad, "meta_train_loss"), (mte_bad, "meta_test_loss")):
            if bad:
                return f"{name} is not finite ({float(stats[name]):g}): the meta step was skipped, rho is unchanged"
        if skipped:
            return "a gradient of rho was not finite: the meta step was skipped, rho is unchanged"
        return None

    # -- CUDA graphs ---------------------------------------------------------------------------
    def before_replay(self) -> None:
        """Advance the meta step's host state for one replay of a captured iteration.

        Inside a ``torch.cuda.graph`` capture, ``meta_step`` reads the inner step size from a
        device tensor and leaves the host state alone (no Python runs at replay). Call this
        before each ``graph.replay()``: it steps the inner-lr schedule, counts the meta step and
        writes the step's ratio to the device (one small copy, no sync). ``CapturedIteration``
        calls it for you.

        Examples:
            >>> import torch
            >>> from torch import nn
            >>> from metabin_layers import MetaBINOptimizer, base_parameters, convert_bn_to_metabin
            >>> model = convert_bn_to_metabin(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
            >>> opt = MetaBINOptimizer(model, torch.optim.SGD(base_parameters(model), lr=0.1), inner_lr=0.05)
            >>> opt.before_replay(); opt.num_meta_steps
            1
        """
        ratio = self.inner_lr.step()
        self.num_meta_steps += 1
        self._device_ratio().fill_(ratio)

    def _device_ratio(self) -> Tensor:
        if self._ratio is None:
            self._ratio = torch.zeros((), dtype=torch.float32, device=self.rhos[0].device)
        return self._ratio

    def _check_capturable(self, scaler: Optional[torch.amp.GradScaler]) -> None:
        """Refuse, with the reason, what a CUDA graph cannot hold (host decisions, collectives)."""
        why = None
        if scaler is not None:
            why = "a GradScaler (its step reads found_inf on the host); use bfloat16 autocast without one"
        elif self.second_order:
            why = "second_order=True; capture the first-order meta step"
        elif self._group() is not None:
            why = "torch.distributed (rho's meta gradients are all-reduced by the optimizer)"
        elif not all(group.get("fused") for group in self.rho_optimizer.param_groups):
            why = "a rho optimizer that is not fused (its skip is decided on the host); keep the default"
        if why is not None:
            raise RuntimeError(f"MetaBINOptimizer.meta_step cannot be captured in a CUDA graph with {why}")

    def _one(self, device: torch.device) -> Tensor:
        # A constant 1.0 on the device, made once (the check-only scale of _check_finite).
        one = self._ones.get(device)
        if one is None:
            one = self._ones[device] = torch.ones((), dtype=torch.float32, device=device)
        return one

    def _step_rho_unless(self, found_inf: Tensor) -> None:
        """Step the rho optimizer unless ``found_inf`` is 1, deciding on the device where it can.

        torch's fused optimizers take ``found_inf`` and skip on the device (as ``GradScaler.step``
        uses them); any other optimizer needs the flag on the host: one sync, as in GradScaler.
        """
        opt = self.rho_optimizer
        if all(group.get("fused") for group in opt.param_groups):
            opt.grad_scale, opt.found_inf = None, found_inf  # type: ignore[attr-defined]
            try:
                opt.step()
            finally:
                del opt.grad_scale, opt.found_inf  # type: ignore[attr-defined]
        elif not found_inf.item():
            opt.step()

    def _count_skipped(self, found_inf: Tensor) -> None:
        if self._skipped.device != found_inf.device:
            self._skipped = self._skipped.to(found_inf.device)
        self._skipped.add_(found_inf)

    @property
    def skipped_meta_steps(self) -> Tensor:
        """How many meta steps were skipped for a non-finite gradient: a tensor on rho's device.

        Counted on the device (reading it, e.g. ``int(opt.skipped_meta_steps)``, waits for the GPU:
        do it when you log). A skipped step leaves rho as it was; with a grad scaler, the scaler
        also lowers its scale, as for any skipped step.
        """
        return self._skipped

    @torch.no_grad()
    def clamp_rho(self) -> None:
        """Clamp every rho to [0, 1] in place (two foreach launches for all layers).

        The layers take the result as checked: ``meta_step`` starts from a valid rho (refusing one
        changed outside it, see ``MetaBIN2d``) and skips non-finite gradients and losses, so the
        clamp only trims a step that went past 0 or 1.
        """
        rhos = cast(list[Tensor], self.rhos)
        torch._foreach_clamp_min_(rhos, 0.0)
        torch._foreach_clamp_max_(rhos, 1.0)
        self._mark_rho_checked()

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """Base and rho optimizer states, the inner-lr schedule position and the split generator.

        Returns:
            ``{"base", "rho", "inner_lr", "generator", "num_meta_steps", "skipped_meta_steps"}``,
            for ``load_state_dict``.
        """
        return {
            "base": self.base_optimizer.state_dict(),
            "rho": self.rho_optimizer.state_dict(),
            "inner_lr": self.inner_lr.state_dict(),
            "generator": self.generator.get_state(),
            "num_meta_steps": self.num_meta_steps,
            "skipped_meta_steps": self._skipped,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Restore what ``state_dict`` saved (optimizers, inner-lr position, generator, step count).

        Args:
            state_dict: a dict returned by ``state_dict``.

        Raises:
            KeyError: ``state_dict`` misses one of its keys.
        """
        missing = {"base", "rho", "inner_lr", "generator", "num_meta_steps"} - set(state_dict)
        if missing:
            raise KeyError(f"MetaBINOptimizer state_dict misses {sorted(missing)}")
        self.base_optimizer.load_state_dict(state_dict["base"])
        self.rho_optimizer.load_state_dict(state_dict["rho"])
        self.inner_lr.load_state_dict(state_dict["inner_lr"])
        self.generator.set_state(state_dict["generator"])
        self.num_meta_steps = int(state_dict["num_meta_steps"])
        # Saved since 0.2: older states start the count again.
        self._skipped = torch.as_tensor(state_dict.get("skipped_meta_steps", 0.0), dtype=torch.float32).to(self.rhos[0].device)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
