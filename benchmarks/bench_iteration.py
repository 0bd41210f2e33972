"""Iteration benchmark: what one MetaBIN training iteration costs against a plain BN iteration and
against the authors' iteration structure rebuilt with the naive layer.

    python benchmarks/bench_iteration.py                     # CPU: ResNet-18, 64x32 images, batch 40
    python benchmarks/bench_iteration.py --device cuda       # CUDA: ResNet-50, 256x128, batch 80
    python benchmarks/bench_iteration.py --threads 1 --repeats 11

Tables and JSON go to ``--output`` (default benchmarks/out/, untracked).

Configurations (same model architecture, same synthetic batches, interleaved, medians):

(a) ``plain BN``: one ordinary iteration: forward of the base batch, label-smoothed CE + batch-hard
    triplet, backward, SGD step.
(b) ``naive (authors' structure)``: every BN replaced by a module that runs a BN and an IN and
    mixes them with in-place multiplies (the authors' ``Meta_bin_gate_ver2``); the authors'
    trainer: base step (backward into everything, main optimizer steps the weights), then one
    domain-balanced meta batch split by domain, meta-train forward in ``hold`` mode,
    ``torch.autograd.grad(L_mtr, every gate)``, fast gates ``clamp(rho - beta g)`` (straight-
    through), meta-test forward with them, ``L_mte.backward()`` into *every* weight (as their
    ``basic_backward`` does), the gate optimizer steps, gates clamped.
(c) ``ours``: ``convert_bn_to_metabin`` + ``MetaBINOptimizer``: ``step()`` for the base update and
    ``meta_step()`` for the episode, on the same batches.

Modes (``--modes``): ``eager``; ``graph``: the whole iteration captured in one CUDA graph and
replayed (``CapturedIteration``; CUDA only, total time only); ``compile``: the model called
through ``torch.compile`` in every phase (``--compile-backend``).

"split": one meta batch of B images (5 domains), split 3/2 by domain (the paper's 48/32 of 80);
"full": separate meta-train and meta-test batches of B images each (B + B + B per iteration).

Phases: ``base`` (forward, loss, backward, step), ``meta-train`` (meta-train forward, loss, inner
gradient, fast rho), ``meta-test`` (meta-test forward, loss, outer backward, rho step). Peak
memory is measured in a fresh subprocess per configuration (CUDA: ``max_memory_allocated``;
CPU: peak RSS, see ``--help`` of ``--no-memory`` and benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if __name__ == "__main__" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # --backend triton on a CPU: before anything imports Triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
try:
    import metabin_layers  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402
import launches  # noqa: E402

#: which statistic of the repeats the tables use (``--stat``): "median" or "min"
STAT = common.STAT

from metabin_layers import CapturedIteration, MetaBIN2d, MetaBINOptimizer, convert_bn_to_metabin  # noqa: E402
from metabin_layers.losses import (  # noqa: E402
    cross_entropy_label_smooth,
    inter_domain_shuffle_loss,
    intra_domain_scatter_loss,
    triplet_loss,
)

NUM_DOMAINS = 5
MARGIN = 0.3
LR, RHO_LR = 0.01, 0.1

CONFIGS = ("a_plain", "b_naive_split", "c_ours_split", "b_naive_full", "c_ours_full")
MODES = ("eager", "graph", "compile")
MODE_LABELS = {"eager": "", "graph": ", CUDA graph", "compile": ", torch.compile"}
LABELS = {
    "a_plain": "(a) plain BN iteration",
    "b_naive_split": "(b) naive layer, authors' structure (split meta batch)",
    "c_ours_split": "(c) ours: MetaBINOptimizer (split meta batch)",
    "b_naive_full": "(b) naive layer, authors' structure (full-size meta batches)",
    "c_ours_full": "(c) ours: MetaBINOptimizer (full-size meta batches)",
}


def split_key(key: str) -> tuple[str, str]:
    """``"c_ours_split:graph"`` -> ``("c_ours_split", "graph")``; no suffix: eager."""
    config, _, mode = key.partition(":")
    return config, mode or "eager"


def key_of(config: str, mode: str) -> str:
    return config if mode == "eager" else f"{config}:{mode}"


def label(key: str) -> str:
    config, mode = split_key(key)
    return LABELS[config] + MODE_LABELS[mode]


# -- the naive layer (the authors' Meta_bin_gate_ver2, rebuilt) ----------------------------------


class NaiveMetaBIN2d(nn.Module):
    """BN module + IN module + gate, mixed with in-place multiplies as in the authors' code.

    ``mode``: ``general`` (batch stats, update running stats), ``hold`` (batch stats, running
    stats untouched), ``eval``. ``fast_gate`` replaces the gate in the meta-test forward.
    """

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        c = bn.num_features
        self.bat_n = bn
        self.ins_n = nn.InstanceNorm2d(c, affine=True, track_running_stats=False)
        self.gate = nn.Parameter(torch.ones(c, device=bn.weight.device))
        self.mode = "general"
        self.fast_gate: Optional[Tensor] = None

    def forward(self, x: Tensor) -> Tensor:
        bn = self.bat_n
        if not self.training:
            out_bn = bn(x)
        elif self.mode == "hold":
            out_bn = F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
        else:
            out_bn = bn(x)
        out_in = self.ins_n(x)
        gate = self.fast_gate if self.fast_gate is not None else self.gate
        g = gate.view(1, -1, 1, 1)
        out_bn.mul_(g)
        out_in.mul_(1 - g)
        return out_bn + out_in


def convert_naive(model: nn.Module) -> nn.Module:
    for name, child in model.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(model, name, NaiveMetaBIN2d(child))
        else:
            convert_naive(child)
    return model


# -- model and data ------------------------------------------------------------------------------


class ReIDNet(nn.Module):
    """ResNet trunk (last stride 1) -> average pooling -> BN neck -> linear classifier."""

    def __init__(self, arch: str, num_classes: int):
        super().__init__()
        import torchvision

        net = getattr(torchvision.models, arch)(weights=None)
        for m in net.layer4[0].modules():  # last stride 1 (the Re-ID convention)
            if isinstance(m, nn.Conv2d) and m.stride == (2, 2):
                m.stride = (1, 1)
        channels = net.fc.in_features
        net.fc = nn.Identity()
        self.backbone = net
        self.neck = nn.BatchNorm1d(channels)
        self.neck.bias.requires_grad_(False)
        self.classifier = nn.Linear(channels, num_classes, bias=False)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        f = self.backbone(x)
        return f, self.classifier(self.neck(f))


def make_batch(ids_per_domain: dict[int, int], k: int, h: int, w: int, num_ids_per_domain: int, gen: torch.Generator):
    """Images (random), identity labels and domain labels: ``ids_per_domain[d]`` identities of domain d, k each."""
    pids, doms = [], []
    for d, n in ids_per_domain.items():
        chosen = torch.randperm(num_ids_per_domain, generator=gen)[:n] + d * num_ids_per_domain
        for p in chosen.tolist():
            pids += [p] * k
            doms += [d] * k
    x = torch.randn(len(pids), 3, h, w, generator=gen)
    return x, torch.tensor(pids), torch.tensor(doms)


def spread(total_ids: int, domains: list[int]) -> dict[int, int]:
    base, extra = divmod(total_ids, len(domains))
    return {d: base + (1 if i < extra else 0) for i, d in enumerate(domains)}


def make_data(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    k = 4
    ids = args.batch // k
    nid = args.ids_per_domain
    base = make_batch(spread(ids, list(range(NUM_DOMAINS))), k, args.height, args.width, nid, gen)
    meta = make_batch(spread(ids, list(range(NUM_DOMAINS))), k, args.height, args.width, nid, gen)
    train_domains, test_domains = [0, 1, 2], [3, 4]
    mask = torch.isin(meta[2], torch.tensor(train_domains))
    split_tr = tuple(t[mask] for t in meta)
    split_te = tuple(t[~mask] for t in meta)
    full_tr = make_batch(spread(ids, train_domains), k, args.height, args.width, nid, gen)
    full_te = make_batch(spread(ids, test_domains), k, args.height, args.width, nid, gen)
    to = lambda b: tuple(t.to(device) for t in b)  # noqa: E731
    return {
        "base": to(base),
        "split": (to(split_tr), to(split_te)),
        "full": (to(full_tr), to(full_te)),
        "num_classes": NUM_DOMAINS * nid,
    }


def base_loss(model: nn.Module, batch) -> Tensor:
    x, pid, _ = batch
    f, logits = model(x)
    return cross_entropy_label_smooth(logits, pid) + triplet_loss(f, pid, MARGIN)


def meta_train_loss(model: nn.Module, batch) -> Tensor:
    x, pid, dom = batch
    f, _ = model(x)
    return inter_domain_shuffle_loss(f, pid, dom) + triplet_loss(f, pid, MARGIN) + intra_domain_scatter_loss(f, dom)


def meta_test_loss(model: nn.Module, batch) -> Tensor:
    x, pid, _ = batch
    f, _ = model(x)
    return triplet_loss(f, pid, MARGIN)


# -- the three iterations ------------------------------------------------------------------------


class Clock:
    def __init__(self, device: torch.device):
        self.device = device
        self.marks: list[float] = []

    def mark(self) -> None:
        common.sync(self.device)
        self.marks.append(time.perf_counter())

    def phases(self, names: tuple[str, ...]) -> dict[str, float]:
        out = {n: b - a for n, a, b in zip(names, self.marks, self.marks[1:])}
        out["total"] = self.marks[-1] - self.marks[0]
        return out


class LaunchClock:
    """A clock that counts instead of timing: launches (ATen ops + Triton launches) per phase."""

    def __init__(self, counter: launches.LaunchCounter):
        self.counter = counter
        self.marks: list[int] = []

    def mark(self) -> None:
        self.marks.append(self.counter.aten + self.counter.launches)

    def phases(self, names: tuple[str, ...]) -> dict[str, float]:
        out = {n: b - a for n, a, b in zip(names, self.marks, self.marks[1:])}
        out["total"] = self.marks[-1] - self.marks[0]
        return out


class _NoClock:
    """The clock of a captured iteration: no marks (a mark waits for the GPU)."""

    def mark(self) -> None:
        pass

    def phases(self, names: tuple[str, ...]) -> dict[str, float]:
        return {}


def _setup(runner, args, data, device, compile_backend: Optional[str]) -> None:
    """What every runner shares: the data, autocast, and the module its phases call (compiled or not)."""
    runner.data, runner.device, runner.autocast = data, device, args.autocast
    runner.net = torch.compile(runner.model, backend=compile_backend) if compile_backend else runner.model


class Plain:
    def __init__(self, args, data, device, compile_backend: Optional[str] = None):
        torch.manual_seed(0)
        self.model = ReIDNet(args.arch, data["num_classes"]).to(device).train()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4)
        _setup(self, args, data, device, compile_backend)

    def iteration(self, meta: str, clock: Optional[Any] = None) -> dict[str, float]:
        clock = clock or Clock(self.device)
        clock.mark()
        self.opt.zero_grad(set_to_none=True)
        with self.autocast():
            loss = base_loss(self.net, self.data["base"])
        loss.backward()
        self.opt.step()
        clock.mark()
        return clock.phases(("base",))


class Naive:
    """The authors' trainer structure with the naive layer."""

    def __init__(self, args, data, device, compile_backend: Optional[str] = None):
        torch.manual_seed(0)
        self.model = convert_naive(ReIDNet(args.arch, data["num_classes"])).to(device).train()
        self.layers = [m for m in self.model.modules() if isinstance(m, NaiveMetaBIN2d)]
        self.gates = [m.gate for m in self.layers]
        gate_ids = {id(g) for g in self.gates}
        main = [p for p in self.model.parameters() if p.requires_grad and id(p) not in gate_ids]
        self.opt = torch.optim.SGD(main, lr=LR, momentum=0.9, weight_decay=5e-4)
        self.opt_gate = torch.optim.SGD(self.gates, lr=RHO_LR, momentum=0.0)
        self.beta = RHO_LR * 0.01
        _setup(self, args, data, device, compile_backend)

    def _mode(self, mode: str) -> None:
        for m in self.layers:
            m.mode = mode

    def _clamp(self) -> None:
        with torch.no_grad():
            for g in self.gates:
                g.clamp_(0, 1)

    def iteration(self, meta: str, clock: Optional[Any] = None) -> dict[str, float]:
        clock = clock or Clock(self.device)
        clock.mark()
        # base update: backward into everything (gates too), only the main optimizer steps
        self._mode("general")
        self.opt.zero_grad(set_to_none=True)
        self.opt_gate.zero_grad(set_to_none=True)
        with self.autocast():
            loss = base_loss(self.net, self.data["base"])
        loss.backward()
        self.opt.step()
        self._clamp()
        clock.mark()
        tr, te = self.data[meta]
        # meta-train: hold mode, inner gradient wrt every gate
        self._mode("hold")
        self.opt.zero_grad(set_to_none=True)
        self.opt_gate.zero_grad(set_to_none=True)
        with self.autocast():
            l_mtr = meta_train_loss(self.net, tr)
        grads = torch.autograd.grad(l_mtr, self.gates)
        for m, g in zip(self.layers, grads):
            fast = m.gate - self.beta * g.detach()
            m.fast_gate = fast + (fast.clamp(0, 1) - fast).detach()  # value clamp, straight-through
        clock.mark()
        # meta-test: backward into every weight, only the gate optimizer steps
        with self.autocast():
            l_mte = meta_test_loss(self.net, te)
        l_mte.backward()
        self.opt_gate.step()
        self._clamp()
        for m in self.layers:
            m.fast_gate = None
        self.opt.zero_grad(set_to_none=True)
        self.opt_gate.zero_grad(set_to_none=True)
        self._mode("general")
        clock.mark()
        return clock.phases(("base", "meta-train", "meta-test"))


class Ours:
    def __init__(self, args, data, device, compile_backend: Optional[str] = None):
        torch.manual_seed(0)
        self.model = convert_bn_to_metabin(ReIDNet(args.arch, data["num_classes"]), exclude="neck").to(device).train()
        layers = [m for m in self.model.modules() if isinstance(m, MetaBIN2d)]
        for m in layers:
            m.backend = args.backend
        rho_ids = {id(m.rho) for m in layers}
        base_params = [p for p in self.model.parameters() if id(p) not in rho_ids]
        base = torch.optim.SGD(base_params, lr=LR, momentum=0.9, weight_decay=5e-4)
        self.opt = MetaBINOptimizer(self.model, base, rho_lr=RHO_LR, inner_lr=0.001)
        _setup(self, args, data, device, compile_backend)

    def iteration(self, meta: str, clock: Optional[Any] = None) -> dict[str, float]:
        clock = clock or Clock(self.device)
        clock.mark()
        self.opt.zero_grad()
        with self.autocast():
            loss = base_loss(self.net, self.data["base"])
        loss.backward()
        self.opt.step()
        clock.mark()
        tr, te = self.data[meta]

        def mtr() -> Tensor:
            with self.autocast():
                return meta_train_loss(self.net, tr)

        def mte() -> Tensor:
            clock.mark()  # meta-train forward, inner gradient and rho' are done
            with self.autocast():
                return meta_test_loss(self.net, te)

        self.opt.meta_step(mtr, mte)
        clock.mark()
        return clock.phases(("base", "meta-train", "meta-test"))


def build(key: str, args, data, device):
    """``step(clock=None)``: one iteration of ``key`` (a configuration, ``:mode`` for a non-eager
    mode), timed (or counted, with a ``LaunchClock``)."""
    config, mode = split_key(key)
    backend = args.compile_backend if mode == "compile" else None
    runner = {"a": Plain, "b": Naive, "c": Ours}[config.split("_")[0]](args, data, device, backend)
    meta = "full" if config.endswith("full") else "split"
    if mode == "graph":
        return captured(runner, meta, device)
    return lambda clock=None: runner.iteration(meta, clock)


def captured(runner, meta: str, device: torch.device):
    """The runner's iteration in one CUDA graph; the step replays it (total time only)."""
    if device.type != "cuda":
        raise RuntimeError("CUDA graphs need a CUDA device")

    def iteration():
        return runner.iteration(meta, _NoClock())

    # 3 warm-up iterations on a side stream, then the capture; (a) and (b) have no meta step to advance
    replay = CapturedIteration(runner.opt if isinstance(runner, Ours) else None, iteration)

    def step(clock=None):
        clock = clock or Clock(device)
        clock.mark()
        replay()
        clock.mark()
        return clock.phases(())

    return step


def count_launches(step) -> dict[str, float]:
    """Launches per phase of one more iteration (the counter's dispatch mode slows it: never timed)."""
    with launches.LaunchCounter() as counter:
        return step(LaunchClock(counter))


# -- memory (one configuration per process) ------------------------------------------------------


def measure_memory(config: str, args, device: torch.device) -> dict[str, Any]:
    data = make_data(args, device)
    step = build(config, args, data, device)
    step()  # first iteration: optimizer state, lazy initialisations
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return {"config": config, "peak_mib": (torch.cuda.max_memory_allocated() - before) / 2**20, "how": "cuda"}
    before = common.read_vm_rss_kib()
    ok = common.reset_vm_hwm()
    step()
    step()
    peak = common.read_vm_hwm_kib()
    if not ok or before is None or peak is None:
        return {"config": config, "peak_mib": None, "how": "unavailable"}
    return {"config": config, "peak_mib": (peak - before) / 1024, "how": "rss"}


def memory_in_subprocesses(args, configs) -> dict[str, Optional[float]]:
    out: dict[str, Optional[float]] = {}
    env_args = (
        [
            os.path.abspath(__file__),
            "--_memory",
            "",
            "--device",
            args.device,
            "--arch",
            args.arch,
            "--batch",
            str(args.batch),
            "--height",
            str(args.height),
            "--width",
            str(args.width),
            "--ids-per-domain",
            str(args.ids_per_domain),
        ]
        + (["--threads", str(args.threads)] if args.threads else [])
        + (["--amp", "--amp-dtype", args.amp_dtype] if args.amp else [])
        + ["--backend", args.backend]
    )
    for config in configs:
        a = list(env_args)
        a[2] = config
        prev = os.environ.get("MALLOC_MMAP_THRESHOLD_")
        # glibc: serve every block over 64 KiB by mmap and return it on free, so that the RSS
        # follows the live memory and its peak (VmHWM) is the peak live memory.
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
        try:
            out[config] = common.run_json_subprocess(a)["peak_mib"]
        except Exception as e:  # noqa: BLE001
            print(f"[bench_iteration] memory of {config} failed: {e}", file=sys.stderr)
            out[config] = None
        finally:
            if prev is None:
                os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
            else:
                os.environ["MALLOC_MMAP_THRESHOLD_"] = prev
    return out


# -- main ----------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    global STAT
    STAT = args.stat
    device = torch.device(args.device)
    common.set_threads(args.threads)
    env = common.environment(device)
    data = make_data(args, device)
    configs = [key_of(c, m) for m in MODES if m in args.modes for c in CONFIGS if c in args.configs]
    steps, failed = {}, {}
    for c in configs:
        try:
            steps[c] = build(c, args, data, device)
        except Exception as e:  # noqa: BLE001  (reported in the configuration's row)
            failed[c] = "failed: " + common.short_reason(e)
    _, first_failed = common.first_calls(steps)
    failed.update(first_failed)
    ran = [c for c in configs if c not in failed]
    # the first call was one warm-up
    stats = common.interleaved({c: steps[c] for c in ran}, repeats=args.repeats, warmup=max(args.warmup - 1, 0))
    # Launches are counted in eager mode only: a replay is one launch, a compiled graph's kernels
    # are not ATen ops.
    eager = [c for c in ran if split_key(c)[1] == "eager"]
    counts = {c: count_launches(steps[c]) for c in eager} if args.launches else {}
    memory = memory_in_subprocesses(args, eager) if args.memory else {}
    sizes = {
        "base": int(data["base"][0].shape[0]),
        "split": [int(data["split"][0][0].shape[0]), int(data["split"][1][0].shape[0])],
        "full": [int(data["full"][0][0].shape[0]), int(data["full"][1][0].shape[0])],
    }
    payload = {
        "benchmark": "iteration",
        "env": env,
        "config": {
            "stat": args.stat,
            "arch": args.arch,
            "image": [args.height, args.width],
            "batch": args.batch,
            "sizes": sizes,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "amp": args.amp_dtype if args.amp else False,
            "device": args.device,
            "backend": args.backend,
            "modes": [m for m in MODES if m in args.modes],
            "compile_backend": args.compile_backend,
        },
        "results": {
            c: {"status": "ok", "timing": stats[c], "launches": counts.get(c), "peak_mib": memory.get(c)}
            if c in stats
            else {"status": failed[c]}
            for c in configs
        },
    }
    payload["summary"] = summarize(payload["results"])
    return render(payload), payload


def _t(results, config, phase="total") -> Optional[float]:
    r = results.get(config)
    if r is None or r.get("status", "ok") != "ok" or phase not in r["timing"]:
        return None
    return r["timing"][phase][STAT]


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """(c)/(a) and (c)/(b) per meta-batch size and mode (keys ``c_over_a_split``, ``..._split:graph``)."""
    s: dict[str, Any] = {}
    for mode in MODES:
        suffix = "" if mode == "eager" else f":{mode}"
        a = _t(results, key_of("a_plain", mode))
        for size in ("split", "full"):
            b, c = _t(results, key_of(f"b_naive_{size}", mode)), _t(results, key_of(f"c_ours_{size}", mode))
            if c is not None and a is not None:
                s[f"c_over_a_{size}{suffix}"] = c / a
            if c is not None and b is not None:
                s[f"c_over_b_{size}{suffix}"] = c / b
    return s


def cuda_targets(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """The CUDA iteration targets for (c), split meta batch: total <= 3.0x (a) eager and <= 2.0x
    (a) with both in CUDA graphs; <= 0.5x (b); peak memory <= 1.2x (a)."""
    res = payload["results"]
    out: list[dict[str, Any]] = []

    def target(name: str, num: str, den: str, limit: float) -> None:
        n, d = _t(res, num), _t(res, den)
        if n is not None and d is not None:
            out.append({"target": name, "met": n / d <= limit, "figure": f"{n / d:.2f}x"})

    target("(c) iteration <= 3.0x plain (a), eager", "c_ours_split", "a_plain", 3.0)
    target("(c) iteration <= 2.0x plain (a), both in CUDA graphs", "c_ours_split:graph", "a_plain:graph", 2.0)
    target("(c) iteration <= 0.5x the authors' structure (b), eager", "c_ours_split", "b_naive_split", 0.5)
    ma, mc = (res.get(k, {}).get("peak_mib") for k in ("a_plain", "c_ours_split"))
    if ma and mc:
        out.append({"target": "(c) peak memory <= 1.2x plain (a)", "met": mc / ma <= 1.2, "figure": f"{mc / ma:.2f}x"})
    return out


def _cell(timing: dict[str, Any], phase: str) -> str:
    return common.ms(timing[phase][STAT], 1) if phase in timing else "-"


def render(payload: dict[str, Any]) -> str:
    cfg, env, res, summ = payload["config"], payload["env"], payload["results"], payload["summary"]
    sizes = cfg["sizes"]
    lines = [
        f"### Iteration benchmark: {cfg['arch']}, {cfg['image'][0]}x{cfg['image'][1]} images, "
        f"{cfg['repeats']} interleaved repeats ({cfg.get('stat', 'median')})" + (", AMP" if cfg["amp"] else ""),
        "",
        f"Machine: {common.describe(env)}.",
        f"Batches: base {sizes['base']}; split meta batch {sizes['base']} = meta-train {sizes['split'][0]} + "
        f"meta-test {sizes['split'][1]} (3 of 5 domains / 2 of 5); full-size meta batches "
        f"{sizes['full'][0]} + {sizes['full'][1]}. Times in ms; / (a) and / (b) against the same mode; "
        "a CUDA graph replays the whole iteration (total only).",
        "",
    ]
    rows = []
    for key, r in res.items():
        if r.get("status", "ok") != "ok":
            rows.append([label(key), r["status"]] + ["-"] * 6)
            continue
        config, mode = split_key(key)
        t, mem = r["timing"], r.get("peak_mib")
        a = _t(res, key_of("a_plain", mode))
        naive = _t(res, key_of("b_naive_" + ("full" if config.endswith("full") else "split"), mode))
        rows.append(
            [
                label(key),
                _cell(t, "base"),
                _cell(t, "meta-train"),
                _cell(t, "meta-test"),
                _cell(t, "total"),
                common.ratio(t["total"][STAT], a),
                common.ratio(t["total"][STAT], naive) if config.startswith("c") else "-",
                "-" if mem is None else f"{mem:.0f}",
            ]
        )
    mem_note = (
        "peak CUDA memory above the state before the iteration (`torch.cuda.max_memory_allocated`)"
        if env["device"] == "cuda"
        else "peak RSS increase during two steady-state iterations (fresh process per configuration, "
        "glibc `MALLOC_MMAP_THRESHOLD_=65536` so freed blocks leave the RSS; VmHWM reset after a warm-up iteration)"
    )
    lines.append(
        common.md_table(
            ["configuration", "base", "meta-train + inner grad", "meta-test + outer", "total", "/ (a)", "/ (b)", "peak MiB"],
            rows,
            "lrrrrrrr",
        )
    )
    lines.append("")
    lines.append(f"peak MiB: {mem_note} (eager configurations).")
    lines.append("")
    a = _t(res, "a_plain")
    prow = []
    for size in ("split", "full"):
        b, c = res.get(f"b_naive_{size}"), res.get(f"c_ours_{size}")
        if b is None or c is None or "timing" not in b or "timing" not in c:
            continue
        cells = [f"(c)/(b), {size} meta batch"]
        for phase in ("base", "meta-train", "meta-test", "total"):
            cells.append(common.ratio(c["timing"][phase][STAT], b["timing"][phase][STAT]))
        prow.append(cells)
        if a is not None:
            prow.append(
                [
                    f"(c)/(a), {size} meta batch",
                    common.ratio(c["timing"]["base"][STAT], a),
                    "-",
                    "-",
                    common.ratio(c["timing"]["total"][STAT], a),
                ]
            )
    if prow:
        headers = ["phase ratio (eager)", "base", "meta-train + inner grad", "meta-test + outer", "total"]
        lines.append(common.md_table(headers, prow, "lrrrr"))
        lines.append("")
    lines += render_launches(res)
    for mode in MODES:
        suffix = "" if mode == "eager" else f":{mode}"
        for size in ("split", "full"):
            if f"c_over_a_{size}{suffix}" not in summ:
                continue
            q = summ[f"c_over_a_{size}{suffix}"]
            extra = f"; (c)/(b) = {summ[f'c_over_b_{size}{suffix}']:.2f}x" if f"c_over_b_{size}{suffix}" in summ else ""
            cpu_target = size == "split" and mode == "eager" and env["device"] != "cuda"
            target = f" (target <= 2.2x: **{'met' if q <= 2.2 else 'not met'}**)" if cpu_target else ""
            lines.append(f"- {size} meta batch, {mode}: (c)/(a) = {q:.2f}x{target}{extra}.")
    lines.append("")
    if env["device"] == "cuda":
        for t in cuda_targets(payload):
            lines.append(f"- {t['target']}: **{'met' if t['met'] else 'not met'}** ({t['figure']})")
        lines.append("")
    return "\n".join(lines)


PHASES = ("base", "meta-train", "meta-test", "total")


def render_launches(res: dict[str, Any]) -> list[str]:
    """The launch table: ATen ops + Triton launches per phase, and the total against (a)."""
    counted = {c: r["launches"] for c, r in res.items() if r.get("launches")}
    if not counted:
        return []
    a = counted.get("a_plain", {}).get("total")
    rows = [
        [label(c)] + [f"{n[p]:.0f}" if p in n else "-" for p in PHASES] + [common.ratio(n["total"], a)]
        for c, n in counted.items()
    ]
    return [
        "Kernel launches per iteration (ATen ops that are not views, plus Triton launches; each is at most one "
        "kernel launch on CUDA), counted on one extra iteration:",
        "",
        common.md_table(["configuration", *PHASES, "/ (a)"], rows, "lrrrrr"),
        "",
    ]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_run_arguments(p, "iteration")
    cpu, cuda = common.ITERATION["cpu"], common.ITERATION["cuda"]

    def both(key: str) -> str:
        return f"default: {cpu[key]} on CPU, {cuda[key]} on CUDA"

    p.add_argument("--arch", default=None, help=f"torchvision ResNet ({both('arch')})")
    p.add_argument("--batch", type=int, default=None, help=f"images per batch ({both('batch')})")
    p.add_argument("--height", type=int, default=None, help=f"image height ({both('height')})")
    p.add_argument("--width", type=int, default=None, help=f"image width ({both('width')})")
    p.add_argument("--ids-per-domain", type=int, default=50, help="identities per synthetic domain (default: %(default)s)")
    p.add_argument("--configs", default=",".join(CONFIGS), help="subset of " + ",".join(CONFIGS))
    modes = ",".join(MODES)
    p.add_argument("--modes", default="eager", help=f"subset of {modes} (default: %(default)s; graph: CUDA only)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (compile mode; default: %(default)s)")
    p.add_argument("--amp", action="store_true", help="autocast (dtype: --amp-dtype)")
    p.add_argument(
        "--amp-dtype",
        default=None,
        choices=["float16", "bfloat16"],
        help="autocast dtype (default: float16 on CUDA, bfloat16 on CPU)",
    )
    p.add_argument("--backend", default="auto", help="MetaBIN backend of configuration (c) (default: %(default)s)")
    p.add_argument(
        "--no-launches", dest="launches", action="store_false", help="skip the launch count per phase (one more iteration each)"
    )
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the per-configuration memory subprocesses")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the JSON to PATH")
    p.add_argument("--_memory", default=None, help=argparse.SUPPRESS)
    return p


def finish_args(args: argparse.Namespace) -> argparse.Namespace:
    """Check the options and fill in the device-dependent defaults."""
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    defaults = common.ITERATION[args.device]
    args.arch = args.arch or defaults["arch"]
    args.batch = args.batch or defaults["batch"]
    args.height = args.height or defaults["height"]
    args.width = args.width or defaults["width"]
    args.repeats = args.repeats or common.REPEATS["iteration"][args.device]
    if args.batch % 4 or args.batch // 4 < NUM_DOMAINS:
        raise SystemExit("--batch must be a multiple of 4 with at least 5 identities (K = 4 images each)")
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = set(args.configs) - set(CONFIGS)
    if unknown:
        raise SystemExit(f"unknown configs {sorted(unknown)}; choose from {CONFIGS}")
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or set(args.modes) - set(MODES):
        raise SystemExit(f"--modes: choose from {MODES}, got {args.modes}")
    dev_type = "cuda" if cuda else "cpu"
    args.amp_dtype = args.amp_dtype or ("float16" if cuda else "bfloat16")
    amp_dtype = getattr(torch, args.amp_dtype)
    # No weight-cast cache: a CUDA graph must not keep casts made at capture (one forward per
    # autocast region here, so the cache saves nothing in eager mode either).
    args.autocast = (lambda: torch.autocast(dev_type, dtype=amp_dtype, cache_enabled=False)) if args.amp else (lambda: _null())
    return args


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def main(argv: Optional[list[str]] = None) -> tuple[str, dict[str, Any]]:
    args = finish_args(parser().parse_args(argv))
    if args._memory:
        common.set_threads(args.threads)
        print(json.dumps(measure_memory(args._memory, args, torch.device(args.device))))
        raise SystemExit(0)
    text, payload = run(args)
    common.write_text(os.path.join(args.output, "iteration.md"), text)
    common.write_json(os.path.join(args.output, "iteration.json"), payload)
    if args.json:
        common.write_json(args.json, payload)
    return text, payload


if __name__ == "__main__":
    print(main()[0])
