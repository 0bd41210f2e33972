"""The recipe's training loop, written with the library's public API only: copy it for your own work.

One iteration (Algorithm 1 of the paper):
1. base update on a batch from all source domains: label-smoothed CE + batch-hard triplet;
2. a domain-balanced batch, split into meta-train / meta-test domains (``opt.split``);
3. ``opt.meta_step``: meta-train loss (shuffle + triplet + scatter) -> inner step on rho ->
   meta-test triplet through rho' -> rho update.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shlex
import shutil
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader

from .. import (
    CapturedIteration,
    MetaBINOptimizer,
    clamp_rho_,
    convert_sync_metabin,
    metabin_modules,
    rho_parameters,
    update_bn_stats,
)
from ..episode import CyclicInnerLR
from ..losses import cross_entropy_label_smooth, inter_domain_shuffle_loss, intra_domain_scatter_loss, triplet_loss
from .checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from .checks import check_data, check_images, check_pretrained
from .config import RANKING_KEYS, TrainConfig
from .data import RecipeData, build_data
from .errors import CheckpointError, OutputFolderError, RecipeError
from .evaluation import evaluate
from .events import log_iteration, log_metrics, require_tensorboard, tensorboard_writer
from .lock import check_unlocked, run_lock
from .model import END_TO_END_RHO_NORMS, META_LEARNED_NORMS, ReIDModel
from .report import NORM_LABELS, write_results, write_text_atomic
from .rerank import QueryExpansion, ReRanking
from .sampler import DomainBalancedSampler, RandomIdentitySampler
from .validation import validate_config
from .visualize import save_ranked_pictures

__all__ = [
    "train",
    "evaluate_model",
    "precise_bn",
    "ranking_settings",
    "Trainer",
    "TrainingInterrupted",
    "check_output",
    "clear_output",
    "config_differences",
    "checkpoint_due",
    "progress_postfix",
    "format_log_line",
    "read_resume",
    "replacing_results",
]


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped by Ctrl-C (or SIGTERM): where it stopped and what can be resumed.

    A ``KeyboardInterrupt``, so code that catches that keeps working. Nothing partial is left
    behind: a checkpoint being written when the interrupt came is discarded (see
    ``metabin_layers.reid.checkpoint.save_checkpoint``) and the last complete one stays.

    Attributes:
        output: The run folder (``--resume`` it to continue).
        iteration: The iterations completed when the interrupt came.
        max_iters: The iterations the run was to do.
        checkpoint_iteration: The iteration of the last complete checkpoint in ``output``;
            ``None``: none was saved (a resume starts again from iteration 0).

    Examples:
        >>> from metabin_layers.reid.train import TrainingInterrupted
        >>> stop = TrainingInterrupted("runs/quick", iteration=3, max_iters=4, checkpoint_iteration=2)
        >>> isinstance(stop, KeyboardInterrupt), stop.resume_command
        (True, 'metabin-reid train --resume runs/quick')
    """

    def __init__(self, output: str, iteration: int, max_iters: int, checkpoint_iteration: Optional[int]) -> None:
        super().__init__(output, iteration, max_iters, checkpoint_iteration)
        self.output = output
        self.iteration = iteration
        self.max_iters = max_iters
        self.checkpoint_iteration = checkpoint_iteration

    @property
    def resume_command(self) -> str:
        """The command that continues the run from its last checkpoint."""
        return f"metabin-reid train --resume {shlex.quote(self.output)}"


def checkpoint_due(
    iteration: int,
    max_iters: int,
    every_iters: Optional[int],
    every_minutes: Optional[float],
    minutes_since_save: float,
) -> bool:
    """Whether a checkpoint is saved after ``iteration``: at the end, every ``every_iters``
    iterations, and once ``every_minutes`` minutes have passed since the last save.

    Args:
        iteration: Iterations completed.
        max_iters: The run's last iteration (always saved).
        every_iters: Iterations between checkpoints (``None``: not by iterations).
        every_minutes: Minutes between checkpoints (``None``: not by time).
        minutes_since_save: Minutes since the last save (or since training started).

    Returns:
        True when a checkpoint is due.

    Examples:
        >>> from metabin_layers.reid.train import checkpoint_due
        >>> [it for it in range(1, 8) if checkpoint_due(it, 7, 3, None, 0.0)]
        [3, 6, 7]
        >>> checkpoint_due(5, 100, None, 10.0, 9.9), checkpoint_due(5, 100, None, 10.0, 10.0)
        (False, True)
        >>> checkpoint_due(99, 100, None, None, 60.0), checkpoint_due(100, 100, None, None, 0.0)
        (False, True)
    """
    if iteration >= max_iters:
        return True
    if every_iters is not None and iteration % every_iters == 0:
        return True
    return every_minutes is not None and minutes_since_save >= every_minutes


def progress_postfix(loss: float, rho: Optional[float]) -> str:
    """The progress bar's text after the counts: the base-step loss and the mean rho.

    Short, so that a terminal of 80 columns shows it whole beside tqdm's iteration rate and ETA.

    Args:
        loss: The base step's loss (cross-entropy + triplet).
        rho: The mean rho over every MetaBIN layer; ``None``: a variant without rho.

    Returns:
        ``"loss=<3 decimals> rho=<3 decimals>"`` (without ``rho`` when it is ``None``).

    Examples:
        >>> from metabin_layers.reid.train import progress_postfix
        >>> progress_postfix(1.23449, 0.93431)
        'loss=1.234 rho=0.934'
        >>> progress_postfix(12.5, None)
        'loss=12.500'
    """
    text = f"loss={loss:.3f}"
    return text if rho is None else f"{text} rho={rho:.3f}"


def format_log_line(logs: dict[str, Any]) -> str:
    """One line of ``log.txt``: ``key=value`` pairs, floats to 4 significant digits.

    Args:
        logs: One iteration's logged values (a ``Trainer.history`` entry).

    Returns:
        The line, without a newline.

    Examples:
        >>> from metabin_layers.reid.train import format_log_line
        >>> format_log_line({"ce": 3.18249, "it": 7, "rho": 0.93431})
        'ce=3.182 it=7 rho=0.9343'
    """
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in logs.items())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def cuda_grad_scaler() -> Any:
    """A CUDA ``GradScaler``: ``torch.amp.GradScaler("cuda")`` where torch has it (2.3+), else
    ``torch.cuda.amp.GradScaler()``."""
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler("cuda")
    return torch.cuda.amp.GradScaler()


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _lacks_negatives(labels: Tensor, domains: Optional[Tensor] = None) -> Tensor:
    """1 when the batch-hard loss of these labels has no triplet (the loss is then a zero), else 0.

    Without ``domains``: fewer than two identities (the triplet loss). With ``domains``: no domain
    holds two identities (the inter-domain shuffle loss). An int64 tensor on the labels' device:
    counted without a host sync.
    """
    other = labels.unsqueeze(0) != labels.unsqueeze(1)
    if domains is not None:
        other &= domains.unsqueeze(0) == domains.unsqueeze(1)
    return (~other.any()).long()


def warmup_multistep(iteration: int, warmup_iters: int, warmup_factor: float, milestones: list[int], gamma: float) -> float:
    """The authors' WarmupMultiStepLR factor: linear warm-up from ``warmup_factor``, then steps."""
    w = 1.0
    if iteration < warmup_iters:
        alpha = iteration / warmup_iters
        w = warmup_factor * (1 - alpha) + alpha
    return w * gamma ** sum(1 for m in milestones if m <= iteration)


def build_base_optimizer(model: nn.Module, cfg: TrainConfig, capturable: bool = False) -> torch.optim.SGD:
    """SGD over every parameter but rho; biases get ``bias_lr_factor`` x lr (the authors' groups).

    ``capturable``: fused, with tensor learning rates that the LR schedule writes in place, so that
    a CUDA graph replays the scheduled values.
    """
    rho_ids = {id(p) for p in rho_parameters(model)}
    weights: list[nn.Parameter] = []
    biases: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in rho_ids:
            continue
        (biases if name.endswith("bias") else weights).append(p)
    groups: list[dict[str, Any]] = [{"params": weights}, {"params": biases, "lr": cfg.lr * cfg.bias_lr_factor}]
    groups = [g for g in groups if g["params"]]
    if not capturable:
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    device = next(model.parameters()).device
    for g in groups:
        g["lr"] = torch.tensor(g.get("lr", cfg.lr), device=device)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=True)


def cuda_graph_blocker(cfg: TrainConfig, device: torch.device, world_size: int) -> Optional[str]:
    """Why the run's iterations cannot be captured in a CUDA graph; None: they can."""
    if device.type != "cuda":
        return f"needs a CUDA device (the run trains on {device})"
    if world_size > 1:
        return "is for one process (the meta step's collectives are not captured)"
    if cfg.second_order:
        return "holds the first-order meta step only (second_order=true)"
    if cfg.amp and cfg.amp_dtype == "float16":
        return "cannot hold fp16 AMP's GradScaler (it skips steps on the host): use amp_dtype=bfloat16"
    if cfg.compile:
        return "is not combined with compile (use compile's own CUDA graphs: mode='reduce-overhead')"
    return None


def _tensor_learning_rates(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Make every group's lr a tensor on ``device`` (a checkpoint may restore floats, or CPU tensors)."""
    for group in optimizer.param_groups:
        lr = group["lr"]
        if not isinstance(lr, Tensor) or lr.device.type != device.type:
            group["lr"] = torch.as_tensor(lr, dtype=torch.float32).to(device)


class _Batches:
    """An endless stream of dict batches from a batch sampler, counting what was consumed."""

    def __init__(self, dataset, sampler, workers: int, device: torch.device) -> None:
        self.sampler = sampler
        # Its own generator: creating the iterator must not draw from the global RNG, or a resumed
        # run (which creates it later) would see different augmentations.
        self.loader = DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=workers,
            pin_memory=device.type == "cuda",
            generator=torch.Generator().manual_seed(sampler.seed),
        )
        self.device = device
        self.consumed = 0
        self._it: Optional[Iterator] = None

    def next(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Images, identities and domains on the device, and the domains as loaded (on the CPU)."""
        if self._it is None:
            self._it = iter(self.loader)
        batch = next(self._it)
        self.consumed += 1
        to = lambda t: t.to(self.device, non_blocking=True)  # noqa: E731
        return to(batch["img"]), to(batch["pid"]), to(batch["domain"]), batch["domain"]

    def state_dict(self) -> dict[str, Any]:
        state = self.sampler.state_dict()
        state["position"] = self.consumed  # the loader may have prefetched further
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)
        self.consumed = int(state["position"])


class Trainer:
    """Holds the model, the optimizers and the data streams of one run; ``run`` trains.

    Seeds every generator with ``cfg.seed``, checks the data, builds the ``ReIDModel``, the
    samplers, the optimizers (``MetaBINOptimizer`` for the meta-learned variants) and the
    learning-rate schedule. ``base_step`` and ``meta_step`` do one step each; ``run`` does the
    iterations up to ``max_iters`` (``train`` adds the output folder, resuming and evaluation).

    Args:
        cfg: The run's configuration.
        data: The run's data; ``None``: ``build_data(cfg)``.

    Raises:
        DataError: If the data cannot fill the run's batches (``check_data``).

    Examples:
        >>> import tempfile
        >>> from metabin_layers.reid.config import TrainConfig
        >>> from metabin_layers.reid.train import Trainer
        >>> cfg = TrainConfig(
        ...     syn_train_ids=4, syn_test_ids=2, syn_styles=3, syn_held_out=[2], syn_images_per_id=2,
        ...     backbone="test_resnet", height=32, width=16, pad=2, workers=0, batch_size=4, num_instances=2,
        ...     meta_batch_size=8, max_iters=1, iters_per_epoch=1, first_inner_loop=1, warmup_epochs=0,
        ...     milestones=[10], num_meta_train_domains=1, output=tempfile.mkdtemp(), eval_batch_size=8,
        ... )
        >>> trainer = Trainer(cfg)
        >>> trainer.max_iters, type(trainer.opt).__name__
        (1, 'MetaBINOptimizer')
        >>> sorted(trainer.base_step())
        ['ce', 'tri']
    """

    def __init__(self, cfg: TrainConfig, data: Optional[RecipeData] = None) -> None:
        validate_config(cfg)  # also a config changed after it was built
        self.cfg = cfg
        self.rank, self.world_size = _dist_info()
        self.device = _device(cfg.device)
        seed_everything(cfg.seed)
        check_pretrained(cfg)
        self.data = data if data is not None else build_data(cfg)
        check_data(cfg, self.data)  # before the first iteration, not after hours of training
        check_images(self.data)  # every image header, the test sets' too
        self.model = ReIDModel(
            cfg.backbone,
            self.data.num_classes,
            norm=cfg.norm,
            last_stride=cfg.last_stride,
            pretrained_path=cfg.pretrained,
            rho_init=cfg.rho_init,
            in_affine_init=cfg.in_affine_init,
        ).to(self.device)
        base_sampler = RandomIdentitySampler(
            self.data.train_items, cfg.batch_size, cfg.num_instances, seed=cfg.seed, rank=self.rank, world_size=self.world_size
        )
        self.ipe = (
            cfg.iters_per_epoch
            if cfg.iters_per_epoch is not None
            else max(1, base_sampler.estimated_num_images // cfg.batch_size)
        )
        self.max_iters = cfg.max_iters if cfg.max_iters is not None else cfg.epochs * self.ipe
        self.base_batches = _Batches(self.data.train_set, base_sampler, cfg.workers, self.device)
        self.meta_batches: Optional[_Batches] = None
        if cfg.norm in META_LEARNED_NORMS:
            per_domain = cfg.meta_batch_size // max(1, self.data.num_domains * cfg.num_instances)
            if per_domain < 2 * self.world_size:
                on = f" per rank on {self.world_size} ranks" if self.world_size > 1 else ""
                raise RecipeError(
                    f"meta_batch_size={cfg.meta_batch_size} gives {per_domain // self.world_size} identities per "
                    f"domain{on} for {self.data.num_domains} domains x {cfg.num_instances} instances; the "
                    f"inter-domain shuffle loss needs >= 2: use meta_batch_size >= "
                    f"{2 * self.world_size * self.data.num_domains * cfg.num_instances}"
                )
            meta_sampler = DomainBalancedSampler(
                self.data.train_items,
                cfg.meta_batch_size,
                cfg.num_instances,
                seed=cfg.seed + 1,
                rank=self.rank,
                world_size=self.world_size,
            )
            self.meta_batches = _Batches(self.data.train_set, meta_sampler, cfg.workers, self.device)

        # One CUDA graph per iteration where the run allows it; else eager, saying why.
        self.use_cuda_graph = False
        if cfg.cuda_graph:
            blocker = cuda_graph_blocker(cfg, self.device, self.world_size)
            self.use_cuda_graph = blocker is None
            if blocker is not None and self.rank == 0:
                print(f"metabin-reid: note: cuda_graph: capture {blocker}; training eagerly", file=sys.stderr, flush=True)
        self._graph: Optional[CapturedIteration] = None
        use_amp = cfg.amp and self.device.type == "cuda"
        amp_dtype = torch.bfloat16 if cfg.amp_dtype == "bfloat16" else torch.float16
        cache = not self.use_cuda_graph  # cast weights must not outlive a captured region
        self.autocast = lambda: torch.autocast("cuda", dtype=amp_dtype, enabled=use_amp, cache_enabled=cache)  # noqa: E731
        # fp16 needs loss scaling; bf16 has fp32's exponent range and does without
        self.scaler = cuda_grad_scaler() if use_amp and amp_dtype == torch.float16 else None
        base = build_base_optimizer(self.model, cfg, capturable=self.use_cuda_graph)
        rho_lr = cfg.lr * cfg.rho_lr_factor
        self.rho_opt: Optional[torch.optim.Optimizer] = None
        if cfg.norm in META_LEARNED_NORMS:
            inner = (
                cfg.inner_lr
                if cfg.inner_lr is not None
                else CyclicInnerLR(
                    iters_per_epoch=self.ipe,
                    middle_lr=cfg.cyclic_middle_lr,
                    ratio=cfg.cyclic_ratio,
                    period_per_epoch=cfg.cyclic_period_per_epoch,
                    up_ratio=cfg.cyclic_up_ratio,
                )
            )
            self.opt: torch.optim.Optimizer = MetaBINOptimizer(
                self.model,
                base,
                rho_lr=rho_lr,
                inner_lr=inner,
                second_order=cfg.second_order,
                grad_scaler=self.scaler,
                seed=cfg.seed,
            )
        else:
            self.opt = base
            if cfg.norm in END_TO_END_RHO_NORMS:  # rho trained end to end with the same loss (Nam & Kim)
                self.rho_opt = torch.optim.SGD(rho_parameters(self.model), lr=rho_lr, momentum=0.0, weight_decay=0.0)
        warm = cfg.warmup_epochs * self.ipe
        milestones = [m * self.ipe for m in cfg.milestones]
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda it: warmup_multistep(it, warm, cfg.warmup_factor, milestones, cfg.gamma)
        )
        self.net: nn.Module = self.model
        if self.world_size > 1:
            # Synchronized batch statistics; DDP built after MetaBINOptimizer (rho is frozen then,
            # so DDP leaves it out: the optimizer averages rho's meta gradients itself).
            convert_sync_metabin(self.model)
            if self.device.type == "cuda":  # torch's SyncBatchNorm (BN variant, neck) is CUDA-only
                self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            self.net = nn.parallel.DistributedDataParallel(self.model)
        # The model the meta steps call: the unwrapped one (meta steps bypass DDP), compiled too
        # (one graph per phase: the base step, the held meta-train forward, the one through rho'),
        # but for second order: compiled autograd has no double backward.
        self.meta_net: nn.Module = self.model
        if cfg.compile:
            self.net = torch.compile(self.net, backend=cfg.compile)  # type: ignore[assignment]
            if not cfg.second_order:
                self.meta_net = torch.compile(self.model, backend=cfg.compile)  # type: ignore[assignment]
        self.iteration = 0
        #: The iteration of the last complete checkpoint written or loaded (None: none yet).
        self.checkpoint_iteration: Optional[int] = None
        self.history: list[dict[str, float]] = []
        #: A tensorboard ``SummaryWriter`` that ``run`` writes the logged iterations to (None: none).
        self.events: Optional[Any] = None
        # Losses that had no triplet (a zero loss, see metabin_layers.losses), summed over ranks:
        # counted on the device, read when logged or saved.
        self._degenerate = torch.zeros((), dtype=torch.int64, device=self.device)
        self._local_degenerate = torch.zeros((), dtype=torch.int64, device=self.device)

    # -- one iteration -------------------------------------------------------------------------
    def _backward_and_step(self, loss: Tensor) -> None:
        if isinstance(self.opt, MetaBINOptimizer):
            self.opt.zero_grad()
            self.opt.backward(loss)
            self.opt.step()
            return
        self.opt.zero_grad(set_to_none=True)
        if self.rho_opt is not None:
            self.rho_opt.zero_grad(set_to_none=True)
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        for opt in [self.opt] + ([self.rho_opt] if self.rho_opt is not None else []):
            if self.scaler:
                self.scaler.step(opt)
            else:
                opt.step()
        if self.scaler:
            self.scaler.update()
        if self.rho_opt is not None:
            clamp_rho_(self.model)  # in [0, 1], and taken as checked by the layers (no re-check)

    def base_step(self) -> dict[str, Tensor]:
        """One base update; returns its detached losses (tensors: read them when logging)."""
        x, pid, _, _ = self.base_batches.next()
        return self._base_update(x, pid)

    def meta_step(self) -> dict[str, Any]:
        """One meta step on rho; returns its detached losses (tensors) and the inner step size."""
        return self._meta_update(*self._meta_batch())

    def _base_update(self, x: Tensor, pid: Tensor) -> dict[str, Tensor]:
        self._local_degenerate += _lacks_negatives(pid)
        with self.autocast():
            features, logits = self.net(x)
            ce = cross_entropy_label_smooth(logits, pid, self.cfg.ce_epsilon)
            tri = triplet_loss(features, pid, self.cfg.margin)
        self._backward_and_step(ce + tri)
        return {"ce": ce.detach(), "tri": tri.detach()}

    def _meta_batch(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The next meta batch on the device and its meta-train / meta-test indices."""
        assert isinstance(self.opt, MetaBINOptimizer) and self.meta_batches is not None
        x, pid, dom, host_dom = self.meta_batches.next()
        # The split reads the domains on the host: the loader's CPU copy costs no device sync,
        # and the index tensors select each side by a gather.
        split = self.opt.split(host_dom, self.cfg.num_meta_train_domains)
        assert split.train_index is not None and split.test_index is not None
        tr = split.train_index.to(self.device, non_blocking=True)
        te = split.test_index.to(self.device, non_blocking=True)
        return x, pid, dom, tr, te

    def _meta_update(self, x: Tensor, pid: Tensor, dom: Tensor, tr: Tensor, te: Tensor) -> dict[str, Any]:
        assert isinstance(self.opt, MetaBINOptimizer)
        model, margin, cfg = self.meta_net, self.cfg.margin, self.cfg
        self._local_degenerate += _lacks_negatives(pid[tr], dom[tr]) + _lacks_negatives(pid[tr]) + _lacks_negatives(pid[te])

        def meta_train_loss() -> Tensor:
            with self.autocast():
                f, logits = model(x[tr])
            loss = (
                inter_domain_shuffle_loss(f, pid[tr], dom[tr])
                + triplet_loss(f, pid[tr], margin)
                + intra_domain_scatter_loss(f, dom[tr])
            )
            if cfg.meta_train_ce:  # the authors' single-source configs
                loss = loss + cross_entropy_label_smooth(logits, pid[tr], cfg.ce_epsilon)
            return loss

        def meta_test_loss() -> Tensor:
            with self.autocast():
                f, logits = model(x[te])
            loss = triplet_loss(f, pid[te], margin)
            if cfg.meta_test_ce:
                loss = loss + cross_entropy_label_smooth(logits, pid[te], cfg.ce_epsilon)
            return loss

        out = self.opt.meta_step(meta_train_loss, meta_test_loss)
        return {"mtr": out["meta_train_loss"], "mte": out["meta_test_loss"], "inner_lr": out["inner_lr"]}

    def _update(self, *batch: Tensor) -> dict[str, Any]:
        """One iteration's base step and meta step on given batches: what a CUDA graph captures."""
        logs = self._base_update(batch[0], batch[1])
        if len(batch) > 2:
            logs.update(self._meta_update(*batch[2:]))
        return logs

    def graph_step(self) -> dict[str, Any]:
        """One iteration (base step + meta step) replayed from a CUDA graph; captured on its first call.

        The first call's iteration is the capture's eager warm-up; a batch of another shape
        than the captured one ends the replays (said once) and the run goes on eagerly.
        """
        batch = list(self.base_batches.next()[:2])
        if self.meta_batches is not None:
            batch += self._meta_batch()
        if self._graph is None:
            _tensor_learning_rates(self.opt, self.device)
            self._graph = CapturedIteration(
                self.opt if isinstance(self.opt, MetaBINOptimizer) else None, self._update, *batch, warmup=1
            )
            return dict(self._graph.warmup_outputs)
        captured = [(tuple(t.shape), t.dtype) for t in self._graph.inputs]
        if [(tuple(t.shape), t.dtype) for t in batch] != captured:
            self.use_cuda_graph = False
            if self.rank == 0:
                print(
                    f"metabin-reid: note: cuda_graph: the batch shapes changed at iteration {self.iteration} "
                    f"({[tuple(t.shape) for t in batch]}, captured {[s for s, _ in captured]}); training eagerly",
                    file=sys.stderr,
                    flush=True,
                )
            return self._update(*batch)
        return dict(self._graph(*batch))

    def _count_degenerate(self) -> None:
        """Add this iteration's degenerate losses, summed over the ranks, to the run's count (on the device)."""
        # In place: a captured iteration keeps adding to the same tensor.
        if self.world_size > 1:
            dist.all_reduce(self._local_degenerate)
        self._degenerate += self._local_degenerate
        self._local_degenerate.zero_()

    @property
    def degenerate_losses(self) -> int:
        """Losses of the run so far that had no triplet, summed over the ranks (reads the device)."""
        return int(self._degenerate)

    def mean_rho(self) -> Optional[float]:
        rhos = rho_parameters(self.model)
        return float(torch.cat([r.detach().flatten() for r in rhos]).mean()) if rhos else None

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = {
            "config": self.cfg.to_dict(),
            "iteration": self.iteration,
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "base_batches": self.base_batches.state_dict(),
            "rng": capture_rng_state(),
            "history": self.history,
            "degenerate_losses": self.degenerate_losses,
        }
        if self.meta_batches is not None:
            state["meta_batches"] = self.meta_batches.state_dict()
        if self.rho_opt is not None:
            state["rho_optimizer"] = self.rho_opt.state_dict()
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.base_batches.load_state_dict(state["base_batches"])
        if self.meta_batches is not None:
            self.meta_batches.load_state_dict(state["meta_batches"])
        if self.rho_opt is not None:
            self.rho_opt.load_state_dict(state["rho_optimizer"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        restore_rng_state(state["rng"])
        self.iteration = int(state["iteration"])
        self.history = list(state.get("history", []))
        self._degenerate.fill_(int(state.get("degenerate_losses", 0)))
        self.checkpoint_iteration = self.iteration

    def save(self, path: Path) -> None:
        """Write ``state_dict`` to ``path`` (rank 0; atomic, see ``.checkpoint``)."""
        if self.rank == 0:
            save_checkpoint(self.state_dict(), path)
        self.checkpoint_iteration = self.iteration

    # -- the loop --------------------------------------------------------------------------------
    def run(self, output: Path, progress: bool = True) -> None:
        """Train from ``self.iteration`` to ``max_iters``, logging into and checkpointing to ``output``.

        ``log.txt`` is rewritten from ``history`` first, so a resumed run logs every iteration
        once (lines logged after the checkpoint it resumes from are dropped: those iterations run
        again). Checkpoints follow ``checkpoint_due`` (``checkpoint_every``,
        ``checkpoint_every_minutes``, and after the last iteration). Each logged iteration also
        goes to ``self.events``, a tensorboard ``SummaryWriter``, when one is set
        (``metabin_layers.reid.events.log_iteration``).

        Args:
            output: The run folder (it must exist).
            progress: A progress bar (loss, mean rho, iterations per second, ETA); else log
                lines are printed.

        Raises:
            TrainingInterrupted: On ``KeyboardInterrupt``, with the iteration reached and the
                last complete checkpoint.
        """
        from tqdm.auto import tqdm

        cfg = self.cfg
        is_main = self.rank == 0
        bar = tqdm(
            total=self.max_iters,
            initial=self.iteration,
            disable=not (progress and is_main),
            desc=f"train {cfg.norm}",
            dynamic_ncols=True,
        )
        log = None
        if is_main:
            log = open(output / "log.txt", "w")
            log.writelines(format_log_line(entry) + "\n" for entry in self.history)
            log.flush()
        start = last_save = time.perf_counter()
        try:
            while self.iteration < self.max_iters:
                self.model.train()
                # The authors' FIRST_INNER_LOOP: extra base steps before the very first meta step.
                if self.use_cuda_graph and self.iteration > 0:
                    step_logs = self.graph_step()
                else:
                    warm = cfg.first_inner_loop if self.iteration == 0 else 1
                    for _ in range(warm):
                        step_logs = self.base_step()
                    if self.meta_batches is not None:
                        step_logs.update(self.meta_step())
                self.scheduler.step()
                self.iteration += 1
                self._count_degenerate()
                bar.update(1)
                # The iteration's values stay on the device; they are read (one wait for the GPU)
                # only on the iterations that log.
                if self.iteration % cfg.log_every == 0 or self.iteration == self.max_iters:
                    logs = {k: float(v) for k, v in step_logs.items()}
                    logs.update(lr=float(self.scheduler.get_last_lr()[0]), it=self.iteration, degenerate=self.degenerate_losses)
                    rho = self.mean_rho()
                    if rho is not None:
                        logs["rho"] = rho
                    if not all(math.isfinite(v) for v in logs.values()):
                        raise FloatingPointError(f"loss is not finite at iteration {self.iteration}: {logs}")
                    bar.set_postfix_str(progress_postfix(logs["ce"] + logs["tri"], rho), refresh=False)
                    self.history.append(logs)
                    line = format_log_line(logs)
                    if log is not None:
                        log.write(line + "\n")
                        log.flush()
                    if self.events is not None and is_main:
                        log_iteration(self.events, logs, self.model.backbone)
                    if not progress and is_main:
                        print(line, flush=True)
                minutes = (time.perf_counter() - last_save) / 60
                if checkpoint_due(self.iteration, self.max_iters, cfg.checkpoint_every, cfg.checkpoint_every_minutes, minutes):
                    self.save(output / "checkpoint.pt")
                    last_save = time.perf_counter()
        except KeyboardInterrupt as err:  # Ctrl-C (or SIGTERM, see the CLI): what is saved, how to go on
            if isinstance(err, TrainingInterrupted):
                raise
            raise TrainingInterrupted(str(output), self.iteration, self.max_iters, self.checkpoint_iteration) from err
        finally:
            bar.close()
            if log is not None:
                log.close()
        self.train_seconds = time.perf_counter() - start


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    data: RecipeData,
    cfg: TrainConfig,
    device: torch.device,
    distances: Optional[dict[str, dict[str, Any]]] = None,
) -> dict[str, dict[str, Any]]:
    """Rank-1/5/10, mAP, mINP (and the CMC) of every target; mean and std over its splits.

    Args:
        model: The model; called in eval mode, it returns the test embeddings.
        data: The run's data; its ``targets`` map each target to its query/gallery splits.
        cfg: The evaluation settings (``metric``, ``eval_flip``, ``eval_batch_size``, ``workers``,
            ``eval_invalid_as_zero``).
        device: Where features are computed.
        distances: A dict to fill, per target, with the first split's distances, identities and
            cameras (``evaluate``'s ``return_distances``) for ``save_ranked_pictures``.

    Returns:
        Per target: ``rank1``, ``rank5``, ``rank10``, ``mAP``, ``mINP`` (percent, mean over the
        splits) with their ``*_std``, the mean ``cmc``, ``num_splits`` and ``map_averaging``.

    Examples:
        >>> import torch
        >>> from metabin_layers.reid.config import TrainConfig
        >>> from metabin_layers.reid.data import build_data
        >>> from metabin_layers.reid.model import ReIDModel
        >>> from metabin_layers.reid.train import evaluate_model
        >>> cfg = TrainConfig(syn_train_ids=4, syn_test_ids=2, syn_styles=3, syn_held_out=[2],
        ...                   syn_images_per_id=2, height=32, width=16, workers=0)
        >>> data = build_data(cfg)
        >>> model = ReIDModel("test_resnet", data.num_classes, norm="bn")
        >>> metrics = evaluate_model(model, data, cfg, torch.device("cpu"))
        >>> list(metrics), metrics["style2"]["num_splits"], 0 <= metrics["style2"]["rank1"] <= 100
        (['style2'], 1, True)
    """
    results: dict[str, dict[str, Any]] = {}
    model.eval()
    for name, splits in data.targets.items():
        runs = []
        for i, split in enumerate(splits):
            q = DataLoader(split.query, batch_size=cfg.eval_batch_size, num_workers=cfg.workers)
            g = DataLoader(split.gallery, batch_size=cfg.eval_batch_size, num_workers=cfg.workers)
            keep = distances is not None and i == 0
            runs.append(
                evaluate(
                    model,
                    q,
                    g,
                    device=device,
                    metric=cfg.metric,
                    flip=cfg.eval_flip,
                    invalid_as_zero=cfg.eval_invalid_as_zero,
                    return_distances=keep,
                    **ranking_settings(cfg),
                )
            )
            if keep:
                assert distances is not None
                distances[name] = {k: runs[-1].pop(k) for k in ("distmat", "q_pids", "g_pids", "q_camids", "g_camids")}
                distances[name]["split"] = split
        entry: dict[str, Any] = {}
        for key in ("rank1", "rank5", "rank10", "mAP", "mINP"):
            values = np.array([r[key] for r in runs], dtype=np.float64)
            entry[key] = float(values.mean())
            entry[f"{key}_std"] = float(values.std())  # population std over splits, as the authors
        entry["cmc"] = np.mean([np.asarray(r["cmc"]) for r in runs], axis=0).tolist()
        entry["num_splits"] = len(runs)
        # which queries mAP / mINP average over (the authors' Cython evaluator: all of them)
        entry["map_averaging"] = "all queries, invalid ones as 0" if cfg.eval_invalid_as_zero else "valid queries"
        entry["ranking"] = runs[0]["ranking"]  # plain distances, or re-ranked / query-expanded
        results[name] = entry
    return results


def ranking_settings(cfg: TrainConfig) -> dict[str, Any]:
    """``evaluate``'s ``rerank`` and ``query_expansion`` arguments from the config.

    Args:
        cfg: its ``rerank*`` and ``query_expansion*`` keys are read.

    Returns:
        ``{"rerank": ReRanking or None, "query_expansion": QueryExpansion or None}``.

    Examples:
        >>> from metabin_layers.reid.config import TrainConfig
        >>> from metabin_layers.reid.train import ranking_settings
        >>> ranking_settings(TrainConfig(rerank=True, rerank_k1=10))
        {'rerank': ReRanking(k1=10, k2=6, lambda_value=0.3), 'query_expansion': None}
    """
    rerank = ReRanking(cfg.rerank_k1, cfg.rerank_k2, cfg.rerank_lambda) if cfg.rerank else None
    qe = QueryExpansion(cfg.query_expansion_k, cfg.query_expansion_alpha) if cfg.query_expansion else None
    return {"rerank": rerank, "query_expansion": qe}


def precise_bn(
    model: nn.Module, data: RecipeData, cfg: TrainConfig, device: torch.device, rank: int = 0, world_size: int = 1
) -> Optional[int]:
    """Precise BN: the running statistics of every BatchNorm and MetaBIN layer of ``model`` become
    their average over ``cfg.precise_bn_iters`` training batches (``metabin_layers.update_bn_stats``).

    The batches are the base step's kind (``RandomIdentitySampler``, training transforms) from a
    stream of their own, seeded by ``cfg.seed``: a run's final evaluation and ``metabin-reid eval``
    of its checkpoint see the same batches, and the run's random generators are left as they were.
    With several processes, every rank must call it (synchronised layers average over the group).

    Args:
        model: the model (its train/eval mode is kept).
        data: the run's data (its ``train_set``).
        cfg: ``precise_bn_iters`` (0: nothing is done), ``batch_size``, ``num_instances``, ``seed``, ``workers``.
        device: where the batches go.
        rank: this process's rank.
        world_size: the number of processes.

    Returns:
        The number of batches averaged over; None when ``cfg.precise_bn_iters`` is 0.

    Examples:
        >>> import torch
        >>> from metabin_layers.reid.config import TrainConfig
        >>> from metabin_layers.reid.data import build_data
        >>> from metabin_layers.reid.model import ReIDModel
        >>> from metabin_layers.reid.train import precise_bn
        >>> cfg = TrainConfig(syn_train_ids=4, syn_test_ids=2, syn_styles=3, syn_held_out=[2], syn_images_per_id=2,
        ...                   height=32, width=16, workers=0, batch_size=4, num_instances=2, precise_bn_iters=3)
        >>> data = build_data(cfg)
        >>> model = ReIDModel("test_resnet", data.num_classes, norm="metabin").eval()
        >>> precise_bn(model, data, cfg, torch.device("cpu")), int(model.neck.num_batches_tracked), model.training
        (3, 3, False)
    """
    if cfg.precise_bn_iters <= 0:
        return None
    seed = cfg.seed + 2  # the base (seed) and meta (seed + 1) streams have their own
    sampler = RandomIdentitySampler(
        data.train_items,
        cfg.batch_size,
        cfg.num_instances,
        seed=seed,
        num_batches=cfg.precise_bn_iters,
        rank=rank,
        world_size=world_size,
    )
    loader = DataLoader(
        data.train_set,
        batch_sampler=sampler,
        num_workers=cfg.workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(seed),
    )
    with torch.random.fork_rng(devices=[]):  # the augmentations draw from a generator of their own
        torch.manual_seed(seed)
        return update_bn_stats(model, loader, num_iters=cfg.precise_bn_iters, device=device)


#: Files a run writes into its output folder; any of them there means an earlier run.
RUN_FILES = ("config.json", "log.txt", "checkpoint.pt", "results.json", "results.md", "rho.png", "cmc.png", "ranked.png")
#: The files that describe a finished run (with the ``ranked-<target>.png`` pictures of a run with
#: several targets); a resumed run keeps them until it writes its own (``replacing_results``).
RESULT_FILES = ("results.json", "results.md", "rho.png", "cmc.png", "ranked.png")
#: Config keys that may differ from the checkpoint's when resuming: where the run writes, how far it
#: goes and how it is logged or evaluated, none of which changes the iterations already done.
RESUME_FREE_KEYS = (
    "output",
    "cuda_graph",
    "max_iters",
    "log_every",
    "checkpoint_every",
    "checkpoint_every_minutes",
    "device",
    "eval_flip",
    "metric",
    "eval_batch_size",
    *RANKING_KEYS,
    "tensorboard",
)


def check_output(output: Path, overwrite: bool = False, resuming: bool = False) -> None:
    """Refuse to mix a new run with an earlier one in ``output``.

    A folder holding files of an earlier run (``RUN_FILES``) is refused unless ``overwrite``
    or ``resuming``; ``clear_output`` then removes what would otherwise be left stale.

    Args:
        output: The run folder.
        overwrite: An earlier run there may be replaced.
        resuming: The run continues the one there.

    Raises:
        OutputFolderError: an earlier run is there and neither flag is given, or ``output`` is a file.

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from metabin_layers.reid.errors import OutputFolderError
        >>> from metabin_layers.reid.train import check_output
        >>> run = Path(tempfile.mkdtemp())
        >>> check_output(run)  # empty: fine
        >>> _ = (run / "results.json").write_text("{}")
        >>> try:
        ...     check_output(run)
        ... except OutputFolderError as err:
        ...     print(str(err).split(";")[0].replace(str(run), "<run>"))
        output <run>: holds an earlier run (results.json)
        >>> check_output(run, overwrite=True)
    """
    if output.exists() and not output.is_dir():
        raise OutputFolderError(f"output {output}: exists and is not a folder")
    earlier = [name for name in RUN_FILES if (output / name).exists()]
    if earlier and not (overwrite or resuming):
        raise OutputFolderError(
            f"output {output}: holds an earlier run ({', '.join(earlier)}); pass --overwrite to replace it, "
            "--resume to continue it, or choose another --output"
        )


def clear_output(output: Path, overwrite: bool = False, resuming: bool = False) -> None:
    """Create ``output``; delete an earlier run's files (``overwrite``) or its stale results.

    So a run that fails later never leaves its new files beside stale results. A resumed run
    (``resuming``) keeps the results of the run it continues until its own replace them
    (``replacing_results``): if it fails, they are still there. The temporary file of a save cut
    short by a killed process (``.checkpoint.pt.<pid>.tmp``) is deleted too.

    Args:
        output: The run folder (created with its parents if missing).
        overwrite: Delete every file of an earlier run (``RUN_FILES``).
        resuming: Keep the earlier run (it takes precedence over ``overwrite``). With neither,
            the results (``RESULT_FILES``) are deleted.

    Examples:
        >>> import os, tempfile
        >>> from pathlib import Path
        >>> from metabin_layers.reid.train import clear_output
        >>> run = Path(tempfile.mkdtemp()) / "run"
        >>> clear_output(run)
        >>> for name in ("checkpoint.pt", "results.json", "notes.txt"):
        ...     _ = (run / name).write_text("")
        >>> clear_output(run, resuming=True)
        >>> sorted(os.listdir(run))
        ['checkpoint.pt', 'notes.txt', 'results.json']
        >>> clear_output(run, overwrite=True)
        >>> sorted(os.listdir(run))
        ['notes.txt']
    """
    output.mkdir(parents=True, exist_ok=True)
    for stale in output.glob(".checkpoint.pt.*.tmp"):  # a save cut short by a killed process
        stale.unlink(missing_ok=True)
    if resuming:
        return
    for name in RUN_FILES if overwrite else RESULT_FILES:
        (output / name).unlink(missing_ok=True)
    if overwrite:  # the earlier run's tensorboard events
        shutil.rmtree(output / "tensorboard", ignore_errors=True)
    for picture in output.glob("ranked-*.png"):
        picture.unlink()


def _result_files(output: Path) -> dict[Path, tuple[int, int]]:
    """The results in ``output`` (``RESULT_FILES``, ``ranked-*.png``) with their inode and mtime."""
    paths = [output / name for name in RESULT_FILES] + sorted(output.glob("ranked-*.png"))
    found = {}
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            st = p.stat()
            found[p] = (st.st_ino, st.st_mtime_ns)
    return found


@contextlib.contextmanager
def replacing_results(output: Path) -> Iterator[None]:
    """Write a run's results over the earlier ones in the block; the earlier stay until then.

    Every results file is written atomically (a temporary file renamed over the old one); once
    the block has written them all, the earlier files it did not rewrite are deleted (e.g. the
    plots of a run that had matplotlib). If the block fails, the earlier results are all still
    there, and a folder the block created is removed again when it holds nothing.

    Args:
        output: The run (or evaluation) folder; created if missing.

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from metabin_layers.reid.train import replacing_results
        >>> run = Path(tempfile.mkdtemp())
        >>> _ = (run / "results.json").write_text("old"); _ = (run / "rho.png").write_text("old")
        >>> with replacing_results(run):
        ...     _ = (run / "results.json").write_text("new")
        >>> sorted(p.name for p in run.iterdir()), (run / "results.json").read_text()
        (['results.json'], 'new')
    """
    created = not output.exists()
    output.mkdir(parents=True, exist_ok=True)
    earlier = _result_files(output)
    try:
        yield
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                output.rmdir()  # only when empty: what was written stays for the user to see
        raise
    now = _result_files(output)
    for path, stamp in earlier.items():
        if now.get(path) == stamp:  # not rewritten: a stale result of the earlier run
            path.unlink(missing_ok=True)


def config_differences(saved: dict[str, Any], cfg: TrainConfig, ignore: tuple[str, ...] = RESUME_FREE_KEYS) -> list[str]:
    """``"key: saved -> now"`` for every config key whose value differs (keys in ``ignore`` skipped).

    Args:
        saved: A run's saved config (``TrainConfig.to_dict()``, e.g. from a checkpoint).
        cfg: The config now.
        ignore: Keys allowed to differ (default ``RESUME_FREE_KEYS``).

    Returns:
        One ``"key: saved -> now"`` line per differing key (a key missing from ``saved`` shows
        ``'<missing>'``), in field order.

    Examples:
        >>> from metabin_layers.reid.config import TrainConfig
        >>> from metabin_layers.reid.train import config_differences
        >>> cfg = TrainConfig()
        >>> config_differences({**cfg.to_dict(), "lr": 0.5, "max_iters": 7}, cfg)
        ['lr: 0.5 -> 0.01']
    """
    now = cfg.to_dict()
    keys = [k for k in now if k not in ignore and (k not in saved or saved[k] != now[k])]
    return [f"{k}: {saved.get(k, '<missing>')!r} -> {now[k]!r}" for k in keys]


def read_resume(resume: str) -> tuple[Optional[dict[str, Any]], dict[str, Any], Path]:
    """What ``--resume`` points at: the checkpoint's state, the run's config and where it was read.

    Args:
        resume: A ``checkpoint.pt``, or a run folder (its ``checkpoint.pt``; without one, its
            ``config.json``: a run stopped before its first save).

    Returns:
        ``(state, config, source)``: the checkpoint's state (``None`` when only ``config.json``
        is there), the run's saved config (``TrainConfig.to_dict()``) and the file it came from.

    Raises:
        CheckpointError: The checkpoint cannot be read, or the folder holds no run, or no
            config is found; the message names the file or folder.

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from metabin_layers.reid.config import TrainConfig
        >>> from metabin_layers.reid.train import read_resume
        >>> run = Path(tempfile.mkdtemp())
        >>> _ = (run / "config.json").write_text(json.dumps(TrainConfig(lr=0.5).to_dict()))
        >>> state, config, source = read_resume(str(run))
        >>> state, config["lr"], source.name
        (None, 0.5, 'config.json')
    """
    path = Path(resume)
    state: Optional[dict[str, Any]] = None
    if path.is_dir():
        if (path / "checkpoint.pt").exists():
            source = path / "checkpoint.pt"
            state = load_checkpoint(source)
            saved = state.get("config")
        elif (path / "config.json").exists():
            source = path / "config.json"
            try:
                saved = json.loads(source.read_text())
            except (OSError, ValueError) as err:
                raise CheckpointError(f"resume {source}: unreadable run config ({err})") from err
        else:
            raise CheckpointError(f"resume {path}: the folder holds no checkpoint.pt and no config.json of a run")
    else:
        source = path
        state = load_checkpoint(path)
        saved = state.get("config")
    if not isinstance(saved, dict):
        raise CheckpointError(f"resume {source}: no run config in it")
    return state, saved, source


def _resume_state(resume: str, cfg: TrainConfig, allow_config_change: bool) -> tuple[Optional[dict[str, Any]], Path]:
    """The checkpoint to resume from (None: a run folder whose first save never completed) and its file."""
    state, saved, source = read_resume(resume)
    if state is None:  # stopped before its first checkpoint: start again from iteration 0, same config
        print(f"{source.parent}: no checkpoint yet (the run stopped before its first save); training from iteration 0")
    diff = config_differences(saved, cfg)
    if diff and not allow_config_change:
        raise CheckpointError(
            f"resume {source}: the config differs from the one the run was started with ({'; '.join(diff)}); "
            "pass --allow-config-change to continue with the new values"
        )
    return state, source


def train(
    cfg: TrainConfig,
    resume: Optional[str] = None,
    progress: bool = True,
    overwrite: bool = False,
    allow_config_change: bool = False,
    data: Optional[RecipeData] = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Train one run of ``cfg``, evaluate it on every target, write results; returns the results.

    Writes into ``cfg.output``: ``config.json``, ``log.txt``, ``checkpoint.pt``,
    ``results.json``, ``results.md``, ``ranked.png`` (``ranked-<target>.png`` with several
    targets: a few queries and their top-10, ``metabin_layers.reid.visualize``) and, with
    matplotlib, ``rho.png`` and ``cmc.png``; with ``cfg.tensorboard``, tensorboard events in
    ``tensorboard/`` (``metabin_layers.reid.events``). With ``cfg.precise_bn_iters`` the running
    statistics are recomputed before the evaluation (``precise_bn``; the checkpoint keeps those of
    training, ``metabin-reid eval`` recomputes them the same way).

    Args:
        cfg: the run's configuration.
        resume: a ``checkpoint.pt``, or a run folder, to continue from. The checkpoint is opened
            and checked before anything is written; its config must equal ``cfg`` except for
            ``RESUME_FREE_KEYS`` unless ``allow_config_change``. A run folder without a
            checkpoint (stopped before its first save) starts again from iteration 0. Prints
            ``resumed from iteration N (<checkpoint>)``.
        progress: show a progress bar (else log lines).
        overwrite: replace an earlier run in ``cfg.output`` (refused otherwise, see ``check_output``).
        allow_config_change: resume although the config differs from the checkpoint's.
        data: the run's data, e.g. shared by runs of the same data config; None: ``build_data(cfg)``.
        verbose: print the data's description, the captioned results table and the run folder.

    Returns:
        On rank 0, the results written to ``results.json``: ``config``, ``seed``, ``norm``,
        ``iterations``, ``train_seconds``, per-target ``targets`` metrics (``evaluate_model``),
        ``test_splits``, ``mean_rho`` (over every rho channel; None without rho),
        ``rho_per_layer``, ``history`` and ``precise_bn_batches`` (None without precise BN);
        ``{}`` on the other ranks.

    Raises:
        ConfigError: If a config value is wrong (``validate_config``), before anything is read
            or written.
        OutputFolderError: If ``cfg.output`` holds an earlier run and neither ``overwrite`` nor
            ``resume`` is given, or another run holds the folder (``metabin_layers.reid.lock``:
            on rank 0 the run holds ``.metabin-reid.lock`` there until it ends).
        RecipeError: If ``cfg.tensorboard`` is set and tensorboard is not installed.
        DiskError: If the disk is full, read-only or over quota while a file is written (the
            previous checkpoint and results intact).
        CheckpointError: If the checkpoint to resume cannot be read, its config differs (without
            ``allow_config_change``) or it does not fit the run.
        TrainingInterrupted: On ``KeyboardInterrupt`` (Ctrl-C) while training (``Trainer.run``):
            it gives the iteration reached and the last complete checkpoint; nothing partial is left.

    Examples:
        >>> import contextlib, io, os, tempfile
        >>> from metabin_layers.reid.config import TrainConfig
        >>> from metabin_layers.reid.train import train
        >>> cfg = TrainConfig(
        ...     syn_train_ids=4, syn_test_ids=2, syn_styles=3, syn_held_out=[2], syn_images_per_id=2,
        ...     backbone="test_resnet", height=32, width=16, pad=2, workers=0, batch_size=4, num_instances=2,
        ...     meta_batch_size=8, max_iters=1, iters_per_epoch=1, first_inner_loop=1, warmup_epochs=0,
        ...     milestones=[10], num_meta_train_domains=1, output=tempfile.mkdtemp(), eval_batch_size=8,
        ...     norm="bn",  # the plain baseline keeps this one-iteration run short; "metabin" works alike
        ... )
        >>> with contextlib.redirect_stdout(io.StringIO()):  # the data, a log line, the results table
        ...     results = train(cfg, progress=False)
        >>> results["iterations"], list(results["targets"]), "checkpoint.pt" in os.listdir(cfg.output)
        (1, ['style2'], True)
    """
    validate_config(cfg)  # before any folder is created or any data is read
    output = Path(cfg.output)
    check_output(output, overwrite=overwrite, resuming=bool(resume))
    if cfg.tensorboard:
        require_tensorboard()  # before training, not after it
    if _dist_info()[0] == 0:
        check_unlocked(output)  # another run there: said before the data are read
    state, source = _resume_state(resume, cfg, allow_config_change) if resume else (None, None)
    trainer = Trainer(cfg, data)
    if state is not None:
        try:
            trainer.load_state_dict(state)
        except (KeyError, RuntimeError, ValueError, TypeError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CheckpointError(f"resume {resume}: the checkpoint does not fit this run ({first})") from err
        del state  # the model and optimizers hold their copies now
    with run_lock(output, rank=trainer.rank):  # one run per folder, released also on errors and Ctrl-C
        return _train_in(output, trainer, cfg, source, progress, overwrite, bool(resume), verbose)


def _train_in(
    output: Path,
    trainer: Trainer,
    cfg: TrainConfig,
    source: Optional[Path],
    progress: bool,
    overwrite: bool,
    resuming: bool,
    verbose: bool,
) -> dict[str, Any]:
    """``train``'s work in the locked run folder: train, evaluate, write the results."""
    if trainer.rank == 0:
        check_output(output, overwrite=overwrite, resuming=resuming)  # again, now that the folder is ours
        clear_output(output, overwrite=overwrite, resuming=resuming)
        write_text_atomic(output / "config.json", json.dumps(cfg.to_dict(), indent=2))
        if verbose:
            print(trainer.data.description, flush=True)
        if trainer.checkpoint_iteration is not None:
            print(f"resumed from iteration {trainer.checkpoint_iteration} ({source})", flush=True)
    writer = None
    if cfg.tensorboard and trainer.rank == 0:  # a resumed run hides the events after its checkpoint
        writer = tensorboard_writer(output, purge_step=trainer.iteration or None)
    trainer.events = writer
    try:
        trainer.run(output, progress=progress)
        # every rank: synchronised layers average the statistics over the group
        precise = precise_bn(trainer.model, trainer.data, cfg, trainer.device, trainer.rank, trainer.world_size)
        results: dict[str, Any] = {}
        if trainer.rank == 0:
            results = _evaluate_and_report(trainer, cfg, output, verbose, precise, writer)
    finally:
        if writer is not None:
            writer.close()
    return results


def _evaluate_and_report(
    trainer: Trainer, cfg: TrainConfig, output: Path, verbose: bool, precise: Optional[int], writer: Optional[Any]
) -> dict[str, Any]:
    """The end of ``train`` on rank 0: evaluation, ``results.*``, pictures and tensorboard metrics."""
    distances: dict[str, dict[str, Any]] = {}
    metrics = evaluate_model(trainer.model, trainer.data, cfg, trainer.device, distances=distances)
    if writer is not None:
        log_metrics(writer, metrics, trainer.iteration)
    results = {
        "config": cfg.to_dict(),
        "seed": cfg.seed,
        "norm": cfg.norm,
        "iterations": trainer.iteration,
        "train_seconds": round(getattr(trainer, "train_seconds", 0.0), 2),
        "targets": metrics,
        "test_splits": trainer.data.test_splits,
        "mean_rho": trainer.mean_rho(),
        "rho_per_layer": [
            {
                "layer": i,
                "mean": float(m.rho.detach().mean()),
                "min": float(m.rho.detach().min()),
                "max": float(m.rho.detach().max()),
            }
            for i, m in enumerate(metabin_modules(trainer.model.backbone))
        ],
        "history": trainer.history,
        "precise_bn_batches": precise,
    }
    with replacing_results(output):  # a resumed run's earlier results stay until these are written
        write_results(results, output, echo=verbose)
        save_ranked_pictures(distances, output, NORM_LABELS.get(cfg.norm, cfg.norm))
    if verbose:
        print(f"Results, plots and checkpoint: {output}", flush=True)
    return results


@contextlib.contextmanager
def distributed_from_env(timeout: timedelta = timedelta(minutes=10)) -> Iterator[None]:
    """Initialise torch.distributed when launched by torchrun (WORLD_SIZE > 1), tear it down after.

    ``timeout`` bounds every collective: a rank that failed or took another branch makes the
    others raise (``DistributedStepError``) after it instead of waiting for ever.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or dist.is_initialized():
        yield
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, timeout=timeout)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        yield
    finally:
        dist.destroy_process_group()
