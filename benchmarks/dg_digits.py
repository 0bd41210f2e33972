"""Digits domain generalization: leave one domain out, BN / IN / BIN-half / BIN / MetaBIN side by side.

Four digit domains at 32x32 RGB, all from installed packages (``dg_digits_data.py``; nothing is
downloaded): MNIST, MNIST-M, SYN and USPS-like scanned digits. Each rotation trains on three of
them and tests on the fourth. Every variant of a rotation and seed starts from the same weights
and sees the same batches in the same order; MetaBIN also draws a meta batch per iteration.

    pip install -e ".[bench]"
    python benchmarks/dg_digits.py --quick            # one rotation (held-out MNIST-M), one seed
    python benchmarks/dg_digits.py                    # 4 rotations x 3 seeds
    python benchmarks/dg_digits.py --update-docs      # the same, written to docs/results/

Writes ``dg_digits.md`` / ``.json`` / ``.png`` (``dg_digits_quick.*`` with ``--quick``) to
``--output`` (default ``benchmarks/out/dg_digits``).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from functools import partial
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import dg_digits_data as data  # noqa: E402

from metabin_layers import MetaBINOptimizer, base_parameters, clamp_rho_, convert_bn_to_metabin, rho_parameters  # noqa: E402
from metabin_layers.episode import CyclicInnerLR  # noqa: E402
from metabin_layers.losses import (  # noqa: E402
    cross_entropy_label_smooth,
    inter_domain_shuffle_loss,
    intra_domain_scatter_loss,
    triplet_loss,
)
from metabin_layers.reid.evaluation import compute_distance, evaluate_rank  # noqa: E402

VARIANTS = ("bn", "in", "bin-half", "bin", "metabin")
LABELS = {
    "bn": "BN",
    "in": "IN",
    "bin-half": "BIN-half (rho = 0.5, fixed)",
    "bin": "BIN (rho end to end)",
    "metabin": "MetaBIN",
}
#: ``--quick``: this held-out domain (a colour/texture shift, what instance statistics address) and seed 0
QUICK_ROTATION = "mnist_m"
SEEDS = (0, 1, 2)
OUTPUT_DIR = os.path.join(common.OUTPUT_DIR, "dg_digits")
DOCS_RESULTS = os.path.join(os.path.dirname(common.HERE), "docs", "results")
#: sized for the 2-core CPU machine shared with other jobs (one torch thread): the five variants
#: of one rotation and seed in about 4 minutes, the full table (12 of them) in under an hour
#: (docs/dg_digits.md has the measurement)
DEFAULTS: dict[str, Any] = {
    "iterations": 350,
    "width": 8,
    "classes_per_batch": 5,
    "images_per_class": 2,
    "train_per_class": 200,
    "test_per_class": 50,
    "lr": 0.05,
    "rho_lr": 3.0,
    "warmup": 0.1,
    "eval_batch": 500,
    "threads": 1,
}


# -- the model -----------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convolutions, projection shortcut when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int, norm: Any) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class DigitsResNet(nn.Module):
    """ResNet-18 for 32x32 images: a 3x3 stem (stride 1, no max-pool), four stages of two basic
    blocks (widths ``w, 2w, 4w, 8w``, strides 1, 2, 2, 2), global average pooling, a BN neck (bias
    frozen at 0, plain BatchNorm in every variant, as the paper's) and a linear classifier.

    ``forward`` takes uint8 images (scaled to [-1, 1]) or floats and returns ``(features, logits)``:
    in training the pooled features before the neck (what the triplet and meta losses see, while
    the cross-entropy sees the neck's output), in eval mode the neck's output (the test embedding).
    """

    def __init__(self, width: int = 16, num_classes: int = 10, norm_layer: Any = nn.BatchNorm2d) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), norm_layer(width), nn.ReLU(inplace=True))
        blocks, cin = [], width
        for k, stride in enumerate((1, 2, 2, 2)):
            cout = width * 2**k
            blocks += [BasicBlock(cin, cout, stride, norm_layer), BasicBlock(cout, cout, 1, norm_layer)]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.neck = nn.BatchNorm1d(cin)
        self.neck.bias.requires_grad_(False)
        self.fc = nn.Linear(cin, num_classes, bias=False)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """The globally pooled backbone features ``(N, 8w)``."""
        if x.dtype == torch.uint8:
            x = x.float() / 127.5 - 1.0
        return torch.flatten(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feat = self.pooled(x)
        embedding = self.neck(feat)
        return (feat if self.training else embedding), self.fc(embedding)


def build_model(variant: str, width: int, seed: int) -> nn.Module:
    """The network of one variant; every variant of a seed starts from the same convolution weights.

    BIN-half, BIN and MetaBIN are the BatchNorm model converted with ``convert_bn_to_metabin``
    (rho 0.5 frozen for BIN-half, 1 for the other two; the neck stays BatchNorm); IN uses affine
    ``nn.InstanceNorm2d`` in the backbone.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
    torch.manual_seed(seed)
    if variant == "in":
        return DigitsResNet(width, norm_layer=partial(nn.InstanceNorm2d, affine=True))
    model = DigitsResNet(width)
    if variant == "bn":
        return model
    model = convert_bn_to_metabin(model, rho_init=0.5 if variant == "bin-half" else 1.0, exclude="neck")
    if variant == "bin-half":
        for rho in rho_parameters(model):
            rho.requires_grad_(False)
    return model


# -- batches -------------------------------------------------------------------------------------


def batch_indices(
    labels: np.ndarray, domains: np.ndarray, iterations: int, classes: int, per_class: int, rng: np.random.Generator
) -> np.ndarray:
    """``(iterations, D * classes * per_class)`` indices into the source pool.

    Every batch draws ``classes`` of the 10 digits and, from each of the ``D`` domains, ``per_class``
    distinct images of each of them, laid out domain by domain (so each digit has positives in its
    own domain and in the others).
    """
    if not 1 <= classes <= 10:
        raise ValueError(f"classes: expected 1..10 digits per batch, got {classes}")
    doms = np.unique(domains)
    pools = {}
    for d in doms:
        for c in range(10):
            pools[d, c] = np.flatnonzero((domains == d) & (labels == c))
            if len(pools[d, c]) < per_class:
                raise ValueError(
                    f"domain {d} has {len(pools[d, c])} training images of digit {c}, fewer than per_class={per_class}"
                )
    out = np.empty((iterations, len(doms), classes, per_class), dtype=np.int64)
    for it in range(iterations):
        digits = rng.choice(10, size=classes, replace=False)
        for i, d in enumerate(doms):
            for j, c in enumerate(digits):
                out[it, i, j] = rng.choice(pools[d, c], size=per_class, replace=False)
    return out.reshape(iterations, -1)


# -- one iteration -------------------------------------------------------------------------------


def base_iteration(model, optimizer, rho_optimizer, batch):
    """One plain iteration (BN, IN, BIN-half; BIN also steps rho with its own SGD, clamped to [0, 1])."""
    images, labels, _ = batch
    optimizer.zero_grad(set_to_none=True)
    if rho_optimizer is not None:
        rho_optimizer.zero_grad(set_to_none=True)
    features, logits = model(images)
    loss = cross_entropy_label_smooth(logits, labels) + triplet_loss(features, labels)
    loss.backward()
    optimizer.step()
    if rho_optimizer is not None:
        rho_optimizer.step()
        clamp_rho_(model)
    return loss.detach()


def metabin_iteration(model, opt, batch, meta_batch):
    """One MetaBIN iteration: a base update on all source domains, then the episode on rho."""
    images, labels, _ = batch
    opt.zero_grad()  # 1) base update of the weights (rho frozen): CE + triplet
    features, logits = model(images)
    loss = cross_entropy_label_smooth(logits, labels) + triplet_loss(features, labels)
    opt.backward(loss)
    opt.step()

    x, y, domains = meta_batch  # 2) the episode: meta-train / meta-test source domains
    split = opt.split(domains.cpu())  # the split reads the domain labels on the host
    tr, te = split.train_index.to(x.device), split.test_index.to(x.device)

    def meta_train_loss():  # over- and under-style-normalization, simulated on the meta-train domains
        f, _ = model(x[tr])
        d = domains[tr]
        return inter_domain_shuffle_loss(f, y[tr], d) + triplet_loss(f, y[tr]) + intra_domain_scatter_loss(f, d)

    def meta_test_loss():  # the unseen domain, through the inner-updated rho'
        f, _ = model(x[te])
        return triplet_loss(f, y[te])

    out = opt.meta_step(meta_train_loss=meta_train_loss, meta_test_loss=meta_test_loss)
    return loss.detach(), out


# -- training and evaluation ---------------------------------------------------------------------


def lr_factor(iteration: int, iterations: int, warmup: float) -> float:
    """Linear warm-up from 0.1 over the first ``warmup`` share of the run, then a cosine to 0."""
    warm = max(1, int(round(warmup * iterations)))
    if iteration < warm:
        return 0.1 + 0.9 * iteration / warm
    return 0.5 * (1.0 + math.cos(math.pi * (iteration - warm) / max(1, iterations - warm)))


def mean_rho(model: nn.Module) -> Optional[float]:
    rhos = rho_parameters(model)
    return float(torch.cat([r.detach().flatten() for r in rhos]).mean()) if rhos else None


def train(
    variant: str,
    model: nn.Module,
    pool: Sequence[torch.Tensor],
    batches: np.ndarray,
    meta_batches: np.ndarray,
    args,
    seed: int,
    bar=None,
) -> dict[str, Any]:
    """Train one variant on the source pool ``(images, labels, domains)``; returns timing and the last loss."""
    images, labels, domains = pool
    base = torch.optim.SGD(base_parameters(model), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(base, lambda it: lr_factor(it, args.iterations, args.warmup))
    opt: Any = base
    rho_opt = None
    if variant == "metabin":
        iters_per_epoch = max(1, len(labels) // batches.shape[1])
        opt = MetaBINOptimizer(
            model, base, rho_lr=args.rho_lr, inner_lr=CyclicInnerLR(iters_per_epoch=iters_per_epoch), seed=seed
        )
    elif variant == "bin":
        rho_opt = torch.optim.SGD(rho_parameters(model), lr=args.rho_lr)
    model.train()
    start = time.perf_counter()
    loss = torch.zeros(())
    for it in range(args.iterations):
        idx = torch.from_numpy(batches[it]).to(images.device)
        batch = (images[idx], labels[idx], domains[idx])
        if variant == "metabin":
            midx = torch.from_numpy(meta_batches[it]).to(images.device)
            loss, _ = metabin_iteration(model, opt, batch, (images[midx], labels[midx], domains[midx]))
        else:
            loss = base_iteration(model, opt, rho_opt, batch)
        schedule.step()
        if bar is not None:
            bar.update(1)
            if it % 20 == 0 or it == args.iterations - 1:
                bar.set_postfix(loss=f"{float(loss):.3f}")
    common.sync(images.device)
    seconds = time.perf_counter() - start
    return {"train_seconds": seconds, "seconds_per_iteration": seconds / max(1, args.iterations), "final_loss": float(loss)}


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 500) -> tuple[float, float]:
    """Accuracy and retrieval mAP (class as identity; every test image queries all the others, cosine distance)."""
    model.eval()
    feats, preds = [], []
    for i in range(0, len(labels), batch):
        f, logits = model(images[i : i + batch])
        feats.append(f.float().cpu())
        preds.append(logits.argmax(1).cpu())
    model.train()
    y = labels.cpu().numpy()
    accuracy = float((torch.cat(preds).numpy() == y).mean())
    feats_all = torch.cat(feats)
    own = np.arange(len(y))  # a query's own image is its only "same camera" item: left out
    _, mAP, _ = evaluate_rank(compute_distance(feats_all, feats_all), y, y, own, own, max_rank=1)
    return accuracy, float(mAP)


def run_one(
    rotation: str, seed: int, variant: str, domains: dict[str, data.DomainData], args, device: torch.device, bar=None
) -> dict[str, Any]:
    """Train ``variant`` on every domain but ``rotation`` and test it on ``rotation``'s test split."""
    sources = [d for d in data.DOMAINS if d != rotation]
    pool = (
        torch.from_numpy(np.concatenate([domains[d].train_x for d in sources])).to(device),
        torch.from_numpy(np.concatenate([domains[d].train_y for d in sources])).to(device),
        torch.from_numpy(np.concatenate([np.full(len(domains[d].train_y), k) for k, d in enumerate(sources)])).to(device),
    )
    rot = data.DOMAINS.index(rotation)
    y_np, d_np = pool[1].cpu().numpy(), pool[2].cpu().numpy()
    # The same batches for every variant (seeded by seed and rotation); MetaBIN's meta batches come from their own stream.
    sample = partial(batch_indices, y_np, d_np, args.iterations, args.classes_per_batch, args.images_per_class)
    batches = sample(np.random.default_rng([seed, rot, 0]))
    meta = sample(np.random.default_rng([seed, rot, 1])) if variant == "metabin" else batches
    model = build_model(variant, args.width, seed).to(device)
    result: dict[str, Any] = {"held_out": rotation, "sources": sources, "seed": seed, "variant": variant}
    result.update(train(variant, model, pool, batches, meta, args, seed, bar))
    start = time.perf_counter()

    def split(d: str) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(domains[d].test_x).to(device), torch.from_numpy(domains[d].test_y).to(device)

    acc, mAP = evaluate(model, *split(rotation), batch=args.eval_batch)
    source_acc = [evaluate(model, *split(d), batch=args.eval_batch)[0] for d in sources]
    result.update(
        accuracy=acc,
        mAP=mAP,
        source_accuracy=float(np.mean(source_acc)),
        mean_rho=mean_rho(model),
        eval_seconds=time.perf_counter() - start,
        test_images=len(domains[rotation].test_y),
    )
    return result


# -- report --------------------------------------------------------------------------------------


def _mean_std(values: Sequence[float]) -> tuple[float, Optional[float]]:
    return float(np.mean(values)), (statistics.stdev(values) if len(values) > 1 else None)


def summarize(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{held_out: {variant: {metric: {"mean", "std", "n"}}}}`` over seeds (std: sample std, None for one seed)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for r in runs:
        out.setdefault(r["held_out"], {}).setdefault(r["variant"], {"_runs": []})["_runs"].append(r)
    for per_variant in out.values():
        for entry in per_variant.values():
            rs = entry.pop("_runs")
            for metric in ("accuracy", "mAP", "source_accuracy", "mean_rho"):
                vals = [r[metric] for r in rs if r[metric] is not None]
                if vals:
                    mean, std = _mean_std(vals)
                    entry[metric] = {"mean": mean, "std": std, "n": len(vals)}
    return out


def _cell(entry: Optional[dict[str, Any]], scale: float = 100.0, digits: int = 1) -> str:
    if not entry:
        return "-"
    text = f"{entry['mean'] * scale:.{digits}f}"
    return text + (f" ± {entry['std'] * scale:.{digits}f}" if entry["std"] is not None else "")


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {int(round(seconds % 60))} s"


def markdown(payload: dict[str, Any]) -> str:
    """The report: set-up, one table per metric (variants x held-out domain), the per-run rows."""
    s, summary = payload["settings"], payload["summary"]
    rotations = [d for d in data.DOMAINS if d in summary]
    variants = [v for v in VARIANTS if any(v in summary[r] for r in rotations)]
    seeds = s["seeds"]
    title = "Digits domain generalization" + (": quick run (one rotation, one seed)" if s["quick"] else "")
    lines = [
        f"# {title}",
        "",
        "<!-- --8<-- [start:summary] -->",
        f"Command: `{payload['command']}`. Machine: {common.describe(payload['environment'])}. "
        f"Wall time: {_minutes(payload['wall_seconds'])}.",
        "",
        f"Set-up: ResNet-18 for 32x32 (width {s['width']}), from scratch; {s['iterations']} iterations, batch "
        f"{s['batch']} (3 source domains x {s['classes_per_batch']} digits x {s['images_per_class']}), "
        f"SGD lr {s['lr']} (warm-up, cosine), rho lr {s['rho_lr']} (BIN, MetaBIN); "
        f"{s['train_per_class']} training / {s['test_per_class']} test images per class and domain at most; "
        f"seeds {', '.join(map(str, seeds))}. Mean ± sample std over seeds, in %.",
    ]
    tables = [
        ("accuracy", "Held-out accuracy"),
        ("mAP", "Held-out retrieval mAP (class as identity)"),
        ("source_accuracy", "Accuracy on the source domains' test splits"),
    ]
    header = ["variant", *[f"held-out {r}" for r in rotations]] + (["mean over rotations"] if len(rotations) > 1 else [])
    for metric, caption in tables:
        rows = []
        for v in variants:
            cells = [_cell(summary[r].get(v, {}).get(metric)) for r in rotations]
            means = [summary[r][v][metric]["mean"] for r in rotations if metric in summary[r].get(v, {})]
            rows.append([LABELS[v], *cells] + ([f"{100 * np.mean(means):.1f}"] if len(rotations) > 1 else []))
        lines += ["", f"**{caption}**", "", common.md_table(header, rows)]
    rho_rows = [
        [LABELS[v], *[_cell(summary[r].get(v, {}).get("mean_rho"), 1.0, 3) for r in rotations]]
        for v in variants
        if v in ("bin", "metabin")
    ]
    if rho_rows:
        lines += [
            "",
            "**Mean rho at the end** (1 = BatchNorm, 0 = InstanceNorm)",
            "",
            common.md_table(header[: 1 + len(rotations)], rho_rows),
        ]
    lines += ["<!-- --8<-- [end:summary] -->", "", "## Every run", ""]
    run_rows = [
        [
            r["held_out"],
            r["seed"],
            LABELS[r["variant"]],
            f"{100 * r['accuracy']:.1f}",
            f"{100 * r['mAP']:.1f}",
            f"{100 * r['source_accuracy']:.1f}",
            "-" if r["mean_rho"] is None else f"{r['mean_rho']:.3f}",
            f"{r['train_seconds']:.0f}",
            f"{1e3 * r['seconds_per_iteration']:.0f}",
        ]
        for r in payload["runs"]
    ]
    headers = ["held out", "seed", "variant", "accuracy", "mAP", "source acc.", "mean rho", "train s", "ms / iteration"]
    lines += [common.md_table(headers, run_rows, "lrlrrrrrr")]
    if "estimate_full_seconds" in payload:
        lines += [
            "",
            "From these timings the full table (4 rotations x 3 seeds) takes about "
            f"{_minutes(payload['estimate_full_seconds'])} here.",
        ]
    return "\n".join(lines) + "\n"


def bar_chart(payload: dict[str, Any], path: str) -> None:
    """Held-out accuracy and mAP per held-out domain, one bar per variant (error bars: std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = payload["summary"]
    rotations = [d for d in data.DOMAINS if d in summary]
    variants = [v for v in VARIANTS if any(v in summary[r] for r in rotations)]
    fig, axes = plt.subplots(1, 2, figsize=(4 + 2.2 * len(rotations), 3.6), squeeze=False)
    width = 0.8 / len(variants)
    for ax, (metric, name) in zip(axes[0], (("accuracy", "held-out accuracy (%)"), ("mAP", "held-out mAP (%)"))):
        for k, v in enumerate(variants):
            entries = [summary[r].get(v, {}).get(metric) for r in rotations]
            means = [100 * e["mean"] if e else np.nan for e in entries]
            stds = [100 * e["std"] if e and e["std"] is not None else 0.0 for e in entries]
            ax.bar(
                np.arange(len(rotations)) + (k - (len(variants) - 1) / 2) * width,
                means,
                width,
                yerr=stds if any(stds) else None,  # no error bars for a single seed
                capsize=2,
                label=LABELS[v],
            )
        ax.set_xticks(np.arange(len(rotations)), [f"held-out\n{r}" for r in rotations])
        ax.set_ylabel(name)
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="upper left")
    kind = "quick run" if payload["settings"]["quick"] else "leave one domain out"
    fig.suptitle(f"Digits DG, {kind} (seeds {payload['settings']['seeds']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- command line --------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"one rotation (held-out {QUICK_ROTATION}) and seed 0")
    p.add_argument("--device", default=common.default_device(), choices=["cpu", "cuda"])
    p.add_argument(
        "--threads",
        type=int,
        default=DEFAULTS["threads"],
        help="torch.set_num_threads (on a 2-core machine shared with other jobs, 2 OpenMP threads stall each other: "
        "up to 25x slower iterations; 2 pays on a quiet machine)",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=None, help=f"training seeds (default {' '.join(map(str, SEEDS))})")
    p.add_argument("--rotations", nargs="+", choices=data.DOMAINS, default=None, help="held-out domains (default: all four)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--output", default=None, help=f"results folder (default {os.path.relpath(OUTPUT_DIR)})")
    p.add_argument("--update-docs", action="store_true", help="write the results to docs/results/ (what the docs page shows)")
    p.add_argument("--cache", default=None, help=f"cache folder of the domains (default {data.default_cache_dir()})")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--iterations", type=int, default=DEFAULTS["iterations"])
    p.add_argument("--width", type=int, default=DEFAULTS["width"], help="channels of the first stage (ResNet-18: 64)")
    p.add_argument("--classes-per-batch", type=int, default=DEFAULTS["classes_per_batch"], help="digits in a batch (of 10)")
    p.add_argument(
        "--images-per-class", type=int, default=DEFAULTS["images_per_class"], help="per class and source domain in a batch"
    )
    p.add_argument("--train-per-class", type=int, default=DEFAULTS["train_per_class"])
    p.add_argument("--test-per-class", type=int, default=DEFAULTS["test_per_class"])
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    p.add_argument("--rho-lr", type=float, default=DEFAULTS["rho_lr"])
    p.add_argument("--warmup", type=float, default=DEFAULTS["warmup"], help="share of the iterations spent warming up")
    p.add_argument("--eval-batch", type=int, default=DEFAULTS["eval_batch"])
    args = p.parse_args(argv)
    if args.quick and (args.seeds or args.rotations):
        p.error("--quick runs one rotation and one seed: drop --seeds / --rotations")
    if args.update_docs and args.output:
        p.error("--update-docs writes to docs/results/: drop --output")
    for name in (
        "iterations",
        "width",
        "classes_per_batch",
        "images_per_class",
        "train_per_class",
        "test_per_class",
        "eval_batch",
    ):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(args, name)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    args.seeds = [0] if args.quick else (args.seeds or list(SEEDS))
    args.rotations = [QUICK_ROTATION] if args.quick else (args.rotations or list(data.DOMAINS))
    args.output = DOCS_RESULTS if args.update_docs else (args.output or OUTPUT_DIR)
    return args


def main(argv: Optional[Sequence[str]] = None) -> tuple[dict[str, Any], dict[str, str]]:
    """Run the benchmark; returns the JSON payload and the paths written (``md``, ``json``, ``png``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    missing = data.missing_packages()
    if missing:
        raise SystemExit(f"dg_digits: missing packages {missing}: {data.INSTALL_HINT}")
    common.set_threads(args.threads)
    device = torch.device(args.device)
    wall = time.perf_counter()
    domains, manifest = data.load_or_build(args.cache, args.train_per_class, args.test_per_class)
    data_seconds = time.perf_counter() - wall
    from tqdm import tqdm

    jobs = [(r, s, v) for r in args.rotations for s in args.seeds for v in args.variants]
    runs = []
    with tqdm(
        total=len(jobs) * args.iterations, desc="dg_digits", unit="it", disable=args.no_progress, dynamic_ncols=True
    ) as bar:
        for rotation, seed, variant in jobs:
            bar.set_description(f"held-out {rotation} seed {seed} {variant}")
            runs.append(run_one(rotation, seed, variant, domains, args, device, bar))
    wall_seconds = time.perf_counter() - wall
    stem = "dg_digits_quick" if args.quick else "dg_digits"
    payload: dict[str, Any] = {
        "benchmark": "dg_digits",
        "command": " ".join(["python benchmarks/dg_digits.py", *argv]),
        "environment": common.environment(device),
        "settings": {
            **{k: getattr(args, k) for k in DEFAULTS},
            "quick": args.quick,
            "seeds": args.seeds,
            "rotations": args.rotations,
            "variants": args.variants,
            "batch": 3 * args.classes_per_batch * args.images_per_class,
            "device": args.device,
        },
        "data": {k: manifest[k] for k in ("data_version", "seed", "sizes", "packages", "sha256")},
        "data_seconds": data_seconds,
        "wall_seconds": wall_seconds,
        "runs": runs,
        "summary": summarize(runs),
    }
    if args.quick:  # the full table runs 4 x 3 = 12 times what one rotation and seed took
        per_job = sum(r["train_seconds"] + r["eval_seconds"] for r in runs)
        payload["estimate_full_seconds"] = per_job * len(data.DOMAINS) * len(SEEDS)
    paths = {ext: os.path.join(args.output, f"{stem}.{ext}") for ext in ("md", "json", "png")}
    common.write_json(paths["json"], payload)
    common.write_text(paths["md"], markdown(payload))
    bar_chart(payload, paths["png"])
    print(markdown(payload).split("<!-- --8<-- [end:summary] -->")[0].split("<!-- --8<-- [start:summary] -->")[1].strip())
    print(f"\nwritten: {', '.join(paths.values())}")
    return payload, paths


if __name__ == "__main__":
    main()
