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
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader

from .. import CyclicInnerLR, MetaBINOptimizer, convert_sync_metabin, metabin_modules, rho_parameters
from ..losses import cross_entropy_label_smooth, inter_domain_shuffle_loss, intra_domain_scatter_loss, triplet_loss
from .config import TrainConfig
from .data import RecipeData, build_data
from .evaluation import evaluate
from .model import END_TO_END_RHO_NORMS, META_LEARNED_NORMS, ReIDModel
from .report import write_results
from .sampler import DomainBalancedSampler, RandomIdentitySampler

__all__ = ["train", "evaluate_model", "Trainer"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def warmup_multistep(iteration: int, warmup_iters: int, warmup_factor: float, milestones: list[int], gamma: float) -> float:
    """The authors' WarmupMultiStepLR factor: linear warm-up from ``warmup_factor``, then steps."""
    w = 1.0
    if iteration < warmup_iters:
        alpha = iteration / warmup_iters
        w = warmup_factor * (1 - alpha) + alpha
    return w * gamma ** sum(1 for m in milestones if m <= iteration)


def build_base_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.SGD:
    """SGD over every parameter but rho; biases get ``bias_lr_factor`` x lr (the authors' groups)."""
    rho_ids = {id(p) for p in rho_parameters(model)}
    weights: list[nn.Parameter] = []
    biases: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in rho_ids:
            continue
        (biases if name.endswith("bias") else weights).append(p)
    groups: list[dict[str, Any]] = [{"params": weights}, {"params": biases, "lr": cfg.lr * cfg.bias_lr_factor}]
    return torch.optim.SGD([g for g in groups if g["params"]], lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


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

    def next(self) -> tuple[Tensor, Tensor, Tensor]:
        if self._it is None:
            self._it = iter(self.loader)
        batch = next(self._it)
        self.consumed += 1
        to = lambda t: t.to(self.device, non_blocking=True)  # noqa: E731
        return to(batch["img"]), to(batch["pid"]), to(batch["domain"])

    def state_dict(self) -> dict[str, Any]:
        state = self.sampler.state_dict()
        state["position"] = self.consumed  # the loader may have prefetched further
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)
        self.consumed = int(state["position"])


class Trainer:
    """Holds the model, the optimizers and the data streams of one run; :meth:`run` trains."""

    def __init__(self, cfg: TrainConfig, data: Optional[RecipeData] = None) -> None:
        self.cfg = cfg
        self.rank, self.world_size = _dist_info()
        self.device = _device(cfg.device)
        seed_everything(cfg.seed)
        self.data = data if data is not None else build_data(cfg)
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
        self.ipe = cfg.iters_per_epoch or max(1, base_sampler.estimated_num_images // cfg.batch_size)
        self.max_iters = cfg.max_iters or cfg.epochs * self.ipe
        self.base_batches = _Batches(self.data.train_set, base_sampler, cfg.workers, self.device)
        self.meta_batches: Optional[_Batches] = None
        if cfg.norm in META_LEARNED_NORMS:
            per_domain = cfg.meta_batch_size // max(1, self.data.num_domains * cfg.num_instances)
            if per_domain < 2:
                raise ValueError(
                    f"meta_batch_size={cfg.meta_batch_size} gives {per_domain} identities per domain for "
                    f"{self.data.num_domains} domains x {cfg.num_instances} instances; the inter-domain shuffle "
                    f"loss needs >= 2: use meta_batch_size >= {2 * self.data.num_domains * cfg.num_instances}"
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

        use_amp = cfg.amp and self.device.type == "cuda"
        self.autocast = lambda: torch.autocast("cuda", dtype=torch.float16, enabled=use_amp)  # noqa: E731
        self.scaler = torch.amp.GradScaler("cuda") if use_amp else None
        base = build_base_optimizer(self.model, cfg)
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
        self.iteration = 0
        self.history: list[dict[str, float]] = []

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
            with torch.no_grad():
                for p in rho_parameters(self.model):
                    p.clamp_(0.0, 1.0)

    def base_step(self) -> dict[str, float]:
        x, pid, _ = self.base_batches.next()
        with self.autocast():
            features, logits = self.net(x)
            ce = cross_entropy_label_smooth(logits, pid, self.cfg.ce_epsilon)
            tri = triplet_loss(features, pid, self.cfg.margin)
        self._backward_and_step(ce + tri)
        return {"ce": ce.item(), "tri": tri.item()}

    def meta_step(self) -> dict[str, float]:
        assert isinstance(self.opt, MetaBINOptimizer) and self.meta_batches is not None
        x, pid, dom = self.meta_batches.next()
        split = self.opt.split(dom, self.cfg.num_meta_train_domains)
        tr, te = split.train_mask, split.test_mask
        model, margin, cfg = self.model, self.cfg.margin, self.cfg  # the unwrapped model: meta steps bypass DDP

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
        logs = {"mtr": float(out["meta_train_loss"]), "inner_lr": out["inner_lr"]}
        if out["meta_test_loss"] is not None:
            logs["mte"] = float(out["meta_test_loss"])
        return logs

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
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
            "history": self.history,
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
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        self.iteration = int(state["iteration"])
        self.history = list(state.get("history", []))

    def save(self, path: Path) -> None:
        if self.rank == 0:
            tmp = path.with_suffix(".tmp")
            torch.save(self.state_dict(), tmp)
            os.replace(tmp, path)

    # -- the loop --------------------------------------------------------------------------------
    def run(self, output: Path, progress: bool = True) -> None:
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
        log = open(output / "log.txt", "a") if is_main else None
        start = time.perf_counter()
        try:
            while self.iteration < self.max_iters:
                self.model.train()
                # The authors' FIRST_INNER_LOOP: extra base steps before the very first meta step.
                warm = cfg.first_inner_loop if self.iteration == 0 else 1
                for _ in range(warm):
                    logs = self.base_step()
                if self.meta_batches is not None:
                    logs.update(self.meta_step())
                self.scheduler.step()
                self.iteration += 1
                logs.update(lr=float(self.scheduler.get_last_lr()[0]), it=self.iteration)
                rho = self.mean_rho()
                if rho is not None:
                    logs["rho"] = rho
                if not all(math.isfinite(v) for v in logs.values()):
                    raise FloatingPointError(f"loss is not finite at iteration {self.iteration}: {logs}")
                bar.update(1)
                if self.iteration % cfg.log_every == 0 or self.iteration == self.max_iters:
                    self.history.append(logs)
                    line = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in logs.items())
                    bar.set_postfix_str(line[:80])
                    if log is not None:
                        log.write(line + "\n")
                        log.flush()
                    if not progress and is_main:
                        print(line, flush=True)
                if self.iteration % cfg.checkpoint_every == 0 or self.iteration == self.max_iters:
                    self.save(output / "checkpoint.pt")
        finally:
            bar.close()
            if log is not None:
                log.close()
        self.train_seconds = time.perf_counter() - start


@torch.no_grad()
def evaluate_model(model: nn.Module, data: RecipeData, cfg: TrainConfig, device: torch.device) -> dict[str, dict[str, Any]]:
    """Rank-1/5/10, mAP, mINP (and the CMC) of every target; mean and std over its splits."""
    results: dict[str, dict[str, Any]] = {}
    model.eval()
    for name, splits in data.targets.items():
        runs = []
        for split in splits:
            q = DataLoader(split.query, batch_size=cfg.eval_batch_size, num_workers=cfg.workers)
            g = DataLoader(split.gallery, batch_size=cfg.eval_batch_size, num_workers=cfg.workers)
            runs.append(
                evaluate(
                    model, q, g, device=device, metric=cfg.metric, flip=cfg.eval_flip, invalid_as_zero=cfg.eval_invalid_as_zero
                )
            )
        entry: dict[str, Any] = {}
        for key in ("rank1", "rank5", "rank10", "mAP", "mINP"):
            values = np.array([r[key] for r in runs], dtype=np.float64)
            entry[key] = float(values.mean())
            entry[f"{key}_std"] = float(values.std())  # population std over splits, as the authors
        entry["cmc"] = np.mean([np.asarray(r["cmc"]) for r in runs], axis=0).tolist()
        entry["num_splits"] = len(runs)
        # which queries mAP / mINP average over (the authors' Cython evaluator: all of them)
        entry["map_averaging"] = "all queries, invalid ones as 0" if cfg.eval_invalid_as_zero else "valid queries"
        results[name] = entry
    return results


def train(cfg: TrainConfig, resume: Optional[str] = None, progress: bool = True) -> dict[str, Any]:
    """Train one run of ``cfg``, evaluate it on every target, write results; returns the results.

    Writes into ``cfg.output``: ``config.json``, ``log.txt``, ``checkpoint.pt``,
    ``results.json``, ``results.md`` and (with matplotlib) ``rho.png`` and ``cmc.png``.
    """
    output = Path(cfg.output)
    output.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg)
    if trainer.rank == 0:
        (output / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        print(trainer.data.description, flush=True)
    if resume:
        state = torch.load(resume, map_location="cpu", weights_only=False)
        trainer.load_state_dict(state)
    trainer.run(output, progress=progress)
    results: dict[str, Any] = {}
    if trainer.rank == 0:
        metrics = evaluate_model(trainer.model, trainer.data, cfg, trainer.device)
        results = {
            "config": cfg.to_dict(),
            "seed": cfg.seed,
            "norm": cfg.norm,
            "iterations": trainer.iteration,
            "train_seconds": round(getattr(trainer, "train_seconds", 0.0), 2),
            "targets": metrics,
            "rho_per_layer": [
                {"layer": i, "mean": float(m.rho.mean()), "min": float(m.rho.min()), "max": float(m.rho.max())}
                for i, m in enumerate(metabin_modules(trainer.model.backbone))
            ],
            "history": trainer.history,
        }
        write_results(results, output)
    return results


@contextlib.contextmanager
def distributed_from_env() -> Iterator[None]:
    """Initialise torch.distributed when launched by torchrun (WORLD_SIZE > 1), tear it down after."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or dist.is_initialized():
        yield
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        yield
    finally:
        dist.destroy_process_group()
