"""Configuration of the Re-ID recipe: one dataclass, the authors' defaults, YAML and ``key=value``.

Defaults reproduce the paper's multi-source DG setting (ResNet-50, 256x128, batches of 80 = 20
identities x 4, SGD lr 0.01, 100 epochs, ...). Without ``data_root`` the recipe trains on the
built-in synthetic dataset and ``SYNTHETIC_PRESET`` replaces the settings that only make sense
for real data (a ResNet-18 on 64x32 images, smaller batches, a few epochs), unless you set them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Sequence, Union

__all__ = [
    "TrainConfig",
    "SYNTHETIC_PRESET",
    "QUICK_PRESET",
    "MAIN_JOB_PRESET",
    "load_config",
    "read_config_file",
    "default_output",
    "parse_overrides",
]

#: The keys of how a trained model is evaluated (re-ranking, query expansion, precise BN): ``eval``
#: honours them, and a resumed run may change them.
RANKING_KEYS = (
    "rerank",
    "rerank_k1",
    "rerank_k2",
    "rerank_lambda",
    "query_expansion",
    "query_expansion_k",
    "query_expansion_alpha",
    "precise_bn_iters",
)


@dataclass
class TrainConfig:
    """Every setting of a recipe run. Field comments give the authors' config key where one exists.

    Attributes:
        data_root: Folder holding the datasets; ``None``: the built-in synthetic dataset.
        sources: Training data sets (the source domains).
        targets: Test data sets (unseen domains in the DG setting).
        combine_all: ``DATASETS.COMBINEALL``, one value per source (a single value applies to all):
            train on every image of a source (train + query + gallery). ``None``: the authors'
            choice, on with several sources (their ``DG_*`` datasets), off with one.
        num_splits: Random query/gallery splits of the small test sets.
        cameras_as_domains: Single-source DG: cameras are the domains (``CAMERA_TO_DOMAIN``).
        height: Input image height.
        width: Input image width.
        flip: Random horizontal flip in training.
        pad: Padding before the random crop, in pixels.
        color_jitter: Colour jitter in training (``INPUT.CJ.ENABLED``).
        workers: Data loader processes.
        syn_train_ids: Synthetic data: training identities.
        syn_test_ids: Synthetic data: test identities.
        syn_styles: Synthetic data: number of styles (domains).
        syn_held_out: Synthetic data: the styles held out for testing.
        syn_images_per_id: Synthetic data: images per identity and style.
        syn_distractor_ids: Synthetic data: extra gallery-only identities per held-out style.
        backbone: A timm name, ``"tv:<name>"`` for torchvision, or ``"mobilenetv2_x1_4"``.
        last_stride: Stride of the backbone's last stage (1: a finer last map).
        pretrained: Local ImageNet checkpoint path; nothing is downloaded.
        norm: The normalization, one of ``model.NORM_VARIANTS``.
        rho_init: Initial rho (``BIN_INIT`` ``'one'``: 1).
        in_affine_init: IN-branch affine at conversion: ``"copy"`` of the BN affine (library
            default) or ``"identity"`` (weight 1, bias 0: the authors' ``LOAD_IN_AFFINE`` False,
            used by the paper presets).
        batch_size: Base-step batch size (``IMS_PER_BATCH``), a multiple of ``num_instances``.
        num_instances: Images per identity in a batch.
        meta_batch_size: Meta-step batch size (``MTRAIN_MINI_BATCH``: all domains, split into
            meta-train/test).
        lr: Base learning rate.
        bias_lr_factor: Learning-rate factor of the biases.
        momentum: SGD momentum.
        weight_decay: Weight decay.
        epochs: Training epochs.
        milestones: Epochs where the learning rate is multiplied by ``gamma``.
        gamma: Learning-rate decay factor at each milestone.
        warmup_epochs: Epochs of linear learning-rate warm-up.
        warmup_factor: Learning-rate factor at the start of the warm-up.
        iters_per_epoch: Iterations per epoch; ``None``: the authors' formula from the sampler.
        max_iters: Total iterations; overrides ``epochs * iters_per_epoch``.
        rho_lr_factor: ``LR_FACTOR.GATE``: rho learning rate = ``lr * rho_lr_factor``, constant.
        inner_lr: Meta-train inner step size beta; ``None``: cyclic (the ``cyclic_*`` fields).
        cyclic_middle_lr: Geometric middle of the cyclic inner learning-rate ratio.
        cyclic_ratio: The cycle spans ``[cyclic_middle_lr / cyclic_ratio, cyclic_middle_lr * cyclic_ratio]``.
        cyclic_period_per_epoch: Sets the cycle's period: ``iters_per_epoch / cyclic_period_per_epoch``
            meta steps.
        cyclic_up_ratio: Share of the cycle spent increasing.
        first_inner_loop: Plain base steps before the first meta step.
        num_meta_train_domains: Domains in meta-train (the rest meta-test); ``None``: 3 of 5.
        second_order: Differentiate through the inner step's gradient (second order).
        meta_train_ce: ``"CrossEntropyLoss"`` in ``META.LOSS.MTRAIN_NAME`` (single-source configs).
        meta_test_ce: ``"CrossEntropyLoss"`` in ``META.LOSS.MTEST_NAME`` (single-source configs).
        ce_epsilon: Label smoothing of the cross-entropy.
        margin: Triplet margin.
        amp: Automatic mixed precision (CUDA only).
        amp_dtype: ``"float16"`` (with a GradScaler) or ``"bfloat16"``.
        compile: ``torch.compile`` backend of the model in the base and the meta steps, e.g.
            ``"inductor"``; ``None``: eager.
        cuda_graph: Capture each training iteration (base step + meta step) in one CUDA graph and
            replay it (CUDA, first order, bfloat16 or no AMP, one process); where a run cannot be
            captured it says why and trains eagerly.
        seed: Random seed.
        device: ``"auto"`` (CUDA if available, else CPU), or a torch device string.
        output: Run folder (results, checkpoints, logs).
        log_every: Iterations between log lines.
        checkpoint_every: Iterations between checkpoints; ``None``: by time only.
        checkpoint_every_minutes: Minutes between checkpoints; ``None``: by iterations only.
            A checkpoint is saved when either is due, and always after the last iteration.
        eval_flip: Average the embeddings of an image and its horizontal flip at test time.
        metric: Test distance, ``"cosine"`` or ``"euclidean"``.
        eval_batch_size: Batch size of feature extraction at test time.
        eval_invalid_as_zero: mAP / mINP over all queries, a query without a valid gallery match
            counting 0 (the authors' Cython evaluator, which produced their tables); False: over
            valid queries only.
        rerank: k-reciprocal re-ranking of the test distances (Zhong et al. 2017, as fast-reid's
            ``TEST.RERANK.ENABLED``); results are labelled re-ranked.
        rerank_k1: ``TEST.RERANK.K1``: the k-reciprocal neighbourhood size.
        rerank_k2: ``TEST.RERANK.K2``: neighbours of the local query expansion of the encodings.
        rerank_lambda: ``TEST.RERANK.LAMBDA``: weight of the original distance, in [0, 1].
        query_expansion: average query expansion of the test features (fast-reid's ``TEST.AQE``),
            before the distances (and the re-ranking).
        query_expansion_k: ``TEST.AQE.QE_K``: neighbours combined per item, itself included.
        query_expansion_alpha: ``TEST.AQE.ALPHA``: exponent of the similarity weights.
        precise_bn_iters: Precise BN (``TEST.PRECISE_BN.NUM_ITER``): before evaluating, recompute the
            running statistics of every BatchNorm and MetaBIN layer as their average over this many
            training batches (``metabin_layers.update_bn_stats``); 0: off.
        tensorboard: Write tensorboard events (losses, learning rates, mean rho per stage, eval
            metrics) to ``<output>/tensorboard`` (needs ``pip install 'metabin-layers[tensorboard]'``).

    Raises:
        ConfigError: If a setting has the wrong type, is out of range (NaN and infinity
            included) or conflicts with another (``batch_size`` not a multiple of
            ``num_instances``, ``num_meta_train_domains`` not below the number of source domains,
            ...): see ``metabin_layers.reid.validation.validate_config``. A ``ValueError``.
        ValueError: If ``combine_all`` is not one boolean per source.

    Examples:
        >>> from metabin_layers.reid.config import TrainConfig
        >>> cfg = TrainConfig(sources=["market1501"], targets=["dukemtmcreid"])
        >>> cfg.combine_all, cfg.batch_size // cfg.num_instances
        ([False], 20)
        >>> TrainConfig(batch_size=30)
        Traceback (most recent call last):
            ...
        metabin_layers.reid.errors.ConfigError: batch_size (30) must be a multiple of num_instances (4)
    """

    # -- data ----------------------------------------------------------------------------------
    data_root: Optional[str] = None  # None: the synthetic dataset
    sources: list[str] = field(default_factory=lambda: ["market1501", "dukemtmcreid", "cuhk02", "cuhk03_detected", "cuhksysu"])
    targets: list[str] = field(default_factory=lambda: ["grid", "viper", "prid", "ilids"])
    # DATASETS.COMBINEALL, one value per source (a single value applies to all): train on every
    # image of a source (train + query + gallery). None: the authors' choice, on with several
    # sources (their DG_* datasets), off with one (M-resnet.yml, D-resnet.yml, supervised)
    combine_all: Optional[list[bool]] = None
    num_splits: int = 10  # random query/gallery splits of the small test sets
    cameras_as_domains: bool = False  # single-source DG: cameras are the domains (CAMERA_TO_DOMAIN)
    height: int = 256
    width: int = 128
    flip: bool = True
    pad: int = 10
    color_jitter: bool = False
    workers: int = 4
    # synthetic data (used when data_root is None)
    syn_train_ids: int = 200
    syn_test_ids: int = 50
    syn_styles: int = 5
    syn_held_out: list[int] = field(default_factory=lambda: [4])
    syn_images_per_id: int = 8
    syn_distractor_ids: int = 0

    # -- model -----------------------------------------------------------------------------------
    backbone: str = "resnet50"  # timm name, or "tv:<name>" for torchvision
    last_stride: int = 1
    pretrained: Optional[str] = None  # local checkpoint path; nothing is downloaded
    norm: str = "metabin"  # one of model.NORM_VARIANTS
    rho_init: float = 1.0  # BIN_INIT 'one'
    # IN-branch affine at conversion: "copy" of the BN affine (library default) or "identity"
    # (weight 1, bias 0: the authors' LOAD_IN_AFFINE False, used by the paper presets)
    in_affine_init: str = "copy"

    # -- optimisation ----------------------------------------------------------------------------
    batch_size: int = 80  # IMS_PER_BATCH
    num_instances: int = 4
    meta_batch_size: int = 80  # MTRAIN_MINI_BATCH (all domains, split into meta-train/test)
    lr: float = 0.01
    bias_lr_factor: float = 2.0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    epochs: int = 100
    milestones: list[int] = field(default_factory=lambda: [40, 70])
    gamma: float = 0.1
    warmup_epochs: int = 10
    warmup_factor: float = 0.01
    iters_per_epoch: Optional[int] = None  # None: the authors' formula from the sampler
    max_iters: Optional[int] = None  # overrides epochs * iters_per_epoch
    rho_lr_factor: float = 10.0  # LR_FACTOR.GATE: rho lr = lr * 10, constant
    inner_lr: Optional[float] = None  # None: cyclic (below); a number: constant beta
    cyclic_middle_lr: float = 0.01
    cyclic_ratio: float = 10.0
    cyclic_period_per_epoch: float = 0.2
    cyclic_up_ratio: float = 0.5
    first_inner_loop: int = 10  # plain base steps before the first meta step
    num_meta_train_domains: Optional[int] = None  # None: 3 of 5
    second_order: bool = False
    meta_train_ce: bool = False  # "CrossEntropyLoss" in META.LOSS.MTRAIN_NAME (single-source configs)
    meta_test_ce: bool = False  # "CrossEntropyLoss" in META.LOSS.MTEST_NAME (single-source configs)
    ce_epsilon: float = 0.1
    margin: float = 0.3
    amp: bool = True  # CUDA only
    amp_dtype: str = "float16"  # float16 (with a GradScaler) | bfloat16
    compile: Optional[str] = None  # torch.compile backend of the base and meta steps' model, e.g. "inductor"
    cuda_graph: bool = False  # one CUDA graph per iteration, replayed (falls back to eager, saying why)

    # -- run ---------------------------------------------------------------------------------------
    seed: int = 2020
    device: str = "auto"
    output: str = "runs/metabin"
    log_every: int = 20
    checkpoint_every: Optional[int] = None  # iterations; None: by time only
    checkpoint_every_minutes: Optional[float] = 10.0  # None: by iterations only (and always at the end)
    eval_flip: bool = False
    metric: str = "cosine"
    eval_batch_size: int = 128
    # mAP / mINP over all queries, a query without a valid gallery match counting 0 (the authors'
    # Cython evaluator, which produced their tables); False: over valid queries only
    eval_invalid_as_zero: bool = False
    rerank: bool = False  # TEST.RERANK.ENABLED
    rerank_k1: int = 20  # TEST.RERANK.K1
    rerank_k2: int = 6  # TEST.RERANK.K2
    rerank_lambda: float = 0.3  # TEST.RERANK.LAMBDA
    query_expansion: bool = False  # TEST.AQE.ENABLED
    query_expansion_k: int = 5  # TEST.AQE.QE_K
    query_expansion_alpha: float = 3.0  # TEST.AQE.ALPHA
    precise_bn_iters: int = 0  # TEST.PRECISE_BN.NUM_ITER when enabled; 0: off
    tensorboard: bool = False  # events in <output>/tensorboard

    def __post_init__(self) -> None:
        from .validation import validate_config

        # Types, ranges and the constraints between keys; the device, backbone and datasets are
        # checked by train() and the CLI (validate_config with environment=True).
        validate_config(self, environment=False)
        self.combine_all = _per_source(self.combine_all, self.sources)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _per_source(combine_all: Any, sources: Sequence[str]) -> list[bool]:
    """``combine_all`` as one bool per source: ``None`` -> the authors' rule, one value -> all."""
    if combine_all is None:
        return [len(sources) > 1] * len(sources)
    values = [combine_all] if isinstance(combine_all, bool) else list(combine_all)
    if not all(isinstance(v, bool) for v in values):
        raise ValueError(f"combine_all must be booleans (one per source, or one for all), got {combine_all!r}")
    if len(values) == 1:
        return values * len(sources)
    if len(values) != len(sources):
        raise ValueError(
            f"combine_all has {len(values)} values for {len(sources)} sources {list(sources)}; "
            "give one value per source or a single value for all"
        )
    return values


#: Settings replaced when training on the synthetic data (unless set explicitly).
SYNTHETIC_PRESET: dict[str, Any] = {
    "backbone": "resnet18",
    "height": 64,
    "width": 32,
    "pad": 3,
    "workers": 0,
    "batch_size": 32,
    "meta_batch_size": 32,
    "epochs": 6,
    "milestones": [4],
    "warmup_epochs": 1,
    # The benchmark's schedule, pinned: 6 x 48 = 288 iterations whatever the epoch formula.
    "iters_per_epoch": 48,
    "syn_test_ids": 100,
    "syn_distractor_ids": 100,
    # A few hundred iterations instead of the paper's ~10^5: with the authors' rho lr (10x the
    # base lr) rho barely leaves 1 (mean 0.994 after 300 iterations, i.e. MetaBIN == BN); see
    # docs/synthetic_benchmark.md for the measurements behind this value.
    "rho_lr_factor": 300.0,
    "log_every": 10,
    "checkpoint_every": 100,
    "eval_batch_size": 64,
}

#: ``metabin-reid train`` with no variant chosen: BN and MetaBIN side by side in under 3 minutes on
#: 2 CPU cores. Half the synthetic schedule (3 x 48 = 144 iterations each) already separates them
#: on the held-out style (docs/synthetic_benchmark.md).
MAIN_JOB_PRESET: dict[str, Any] = {
    "epochs": 3,
    "milestones": [2],
}

#: ``--quick``: a smoke run of well under a minute on 2 CPU cores.
QUICK_PRESET: dict[str, Any] = {
    "syn_train_ids": 24,
    "syn_test_ids": 8,
    "syn_distractor_ids": 0,
    "syn_images_per_id": 4,
    "max_iters": 4,
    "first_inner_loop": 1,
    "batch_size": 16,
    "meta_batch_size": 32,
    "iters_per_epoch": 2,
    "backbone": "resnet18",
    "log_every": 1,
    # one checkpoint, after the last iteration
    "checkpoint_every": None,
    "checkpoint_every_minutes": None,
}

_FIELDS = {f.name: f for f in fields(TrainConfig)}


def _coerce(name: str, value: Any) -> Any:
    """Turn a YAML/CLI value into the field's type (lists from comma-separated strings)."""
    if name not in _FIELDS:
        raise KeyError(f"unknown config key {name!r}; known keys: {', '.join(sorted(_FIELDS))}")
    spec = _FIELDS[name]
    default = spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in ("none", "null"):
            return None
        if name == "combine_all":
            return [_boolean(name, t.strip()) for t in text.strip("[]").split(",") if t.strip()]
        if isinstance(default, list):
            items = [t.strip() for t in text.strip("[]").split(",") if t.strip()]
            return (
                [_number(name, t, int, "a list of integers") for t in items] if default and isinstance(default[0], int) else items
            )
        if isinstance(default, bool):
            return _boolean(name, text)
        if isinstance(default, int) or name in ("iters_per_epoch", "max_iters", "num_meta_train_domains", "checkpoint_every"):
            return _number(name, text, int, "an integer")
        if isinstance(default, float) or name == "inner_lr":
            return _number(name, text, float, "a number")
        return text
    return value


def _number(name: str, text: str, kind: type, expected: str) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"{name} expects {expected}, got {text!r}") from None


def _boolean(name: str, text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} expects a boolean, got {text!r}")


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """``["lr=0.02", "sources=market1501,dukemtmcreid"]`` -> typed dict.

    Args:
        pairs: ``key=value`` strings (the CLI's ``--set``); lists are comma-separated, ``none``
            gives ``None``.

    Returns:
        The values typed as the ``TrainConfig`` fields.

    Raises:
        ValueError: If a pair has no ``=`` or a boolean value is not one.
        KeyError: If a key is not a ``TrainConfig`` field.

    Examples:
        >>> from metabin_layers.reid.config import parse_overrides
        >>> parse_overrides(["lr=0.02", "milestones=10,20", "amp=false"])
        {'lr': 0.02, 'milestones': [10, 20], 'amp': False}
        >>> parse_overrides(["combine_all=true,false"])
        {'combine_all': [True, False]}
    """
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--set expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key.strip()] = _coerce(key.strip(), value)
    return out


def read_config_file(path: Union[str, Path]) -> dict[str, Any]:
    """The config keys of a YAML file, typed as the ``TrainConfig`` fields (no defaults added).

    Args:
        path: A YAML file mapping config keys to values.

    Returns:
        The file's keys and values, each parsed as in ``parse_overrides``.

    Raises:
        ValueError: If the file is not a mapping or a value does not fit its key.
        KeyError: If a key is not a ``TrainConfig`` field.

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from metabin_layers.reid.config import read_config_file
        >>> path = Path(tempfile.mkdtemp()) / "run.yaml"
        >>> _ = path.write_text("lr: 0.02\\nmilestones: 10,20\\n")
        >>> read_config_file(path)
        {'lr': 0.02, 'milestones': [10, 20]}
    """
    import yaml

    with open(path) as f:
        loaded = yaml.safe_load(f) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a mapping of config keys, got {type(loaded).__name__}")
    return {k: _coerce(k, v) for k, v in loaded.items()}


def load_config(
    path: Optional[Union[str, Path]] = None,
    overrides: Optional[dict[str, Any]] = None,
    quick: bool = False,
    main_job: bool = False,
) -> TrainConfig:
    """Defaults, then the synthetic preset (if no data root), the main job's, ``--quick``, the YAML
    file, overrides.

    Args:
        path: A YAML file mapping config keys to values; ``None``: none.
        overrides: Config values that take precedence over the file's (strings are parsed as in
            ``parse_overrides``).
        quick: Apply ``QUICK_PRESET`` (a smoke run on the synthetic data).
        main_job: Apply ``MAIN_JOB_PRESET`` (BN and MetaBIN side by side on the synthetic data).

    Returns:
        The configuration; ``output`` defaults to ``default_output``'s folder.

    Raises:
        ValueError: If the file is not a mapping, ``quick`` is set with a ``data_root``, or a value
            is invalid.
        KeyError: If a key is not a ``TrainConfig`` field.

    Examples:
        >>> from metabin_layers.reid.config import load_config
        >>> cfg = load_config(overrides={"lr": 0.02})
        >>> cfg.backbone, cfg.lr, cfg.data_root, cfg.epochs
        ('resnet18', 0.02, None, 6)
        >>> load_config(main_job=True).epochs
        3
    """
    user: dict[str, Any] = read_config_file(path) if path is not None else {}
    user.update({k: _coerce(k, v) for k, v in (overrides or {}).items()})
    values: dict[str, Any] = {}
    if user.get("data_root") is None:
        values.update(SYNTHETIC_PRESET)
        if main_job:
            values.update(MAIN_JOB_PRESET)
        if quick:
            values.update(QUICK_PRESET)
    elif quick:
        raise ValueError("--quick runs on the synthetic data; drop --data-root")
    values.update(user)
    if "output" not in user:
        values["output"] = default_output(values.get("norm", "metabin"), synthetic=user.get("data_root") is None, quick=quick)
    return TrainConfig(**values)


def default_output(norm: Optional[str], synthetic: bool = True, quick: bool = False, preset: Optional[str] = None) -> str:
    """The run folder used when ``output`` is not set: one per data kind, preset and variant, so
    runs of different variants (or a ``--quick`` smoke run) never meet in one folder.

    Args:
        norm: the normalization variant of the run; None: the folder holding several variants
            (BN and MetaBIN side by side, ``metabin-reid train`` on the synthetic data; ``compare``).
        synthetic: the run trains on the built-in synthetic data.
        quick: a ``--quick`` smoke run.
        preset: the paper preset of a real-data run, if any.

    Returns:
        ``runs/synthetic`` or ``runs/quick`` (several variants), ``runs/synthetic-<norm>``,
        ``runs/quick-<norm>``, ``runs/<preset>[-<norm>]`` (MetaBIN: no suffix), or ``runs/<norm>``
        for other real-data runs.

    Examples:
        >>> from metabin_layers.reid.config import default_output
        >>> default_output(None), default_output("metabin"), default_output("bn"), default_output(None, quick=True)
        ('runs/synthetic', 'runs/synthetic-metabin', 'runs/synthetic-bn', 'runs/quick')
        >>> default_output("metabin", synthetic=False), default_output("bn", synthetic=False, preset="market-to-duke")
        ('runs/metabin', 'runs/market-to-duke-bn')
    """
    if synthetic:
        base = "runs/quick" if quick else "runs/synthetic"
        return base if norm is None else f"{base}-{norm}"
    if preset:
        return f"runs/{preset}" if norm in (None, "metabin") else f"runs/{preset}-{norm}"
    return f"runs/{norm or 'metabin'}"
