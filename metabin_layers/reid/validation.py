"""One check of a whole ``TrainConfig``, before any folder is created or any data is read.

``TrainConfig`` runs it when it is built (``validate_config(cfg, environment=False)``: types,
ranges, NaN and infinity, the constraints between keys), so the CLI's ``--set``, a YAML file, the
presets and the Python API meet the same rules; ``train`` and the CLI run it again with
``environment=True`` (the device exists, the backbone and the datasets are known), which also
catches a config changed after it was built. Each refusal is a ``ConfigError`` of one line,
``<key>=<value>: expected <what>``.

Examples:
    >>> from metabin_layers.reid.config import TrainConfig
    >>> from metabin_layers.reid.errors import ConfigError
    >>> from metabin_layers.reid.validation import validate_config
    >>> cfg = TrainConfig()
    >>> cfg.lr = float("nan")
    >>> try:
    ...     validate_config(cfg)
    ... except ConfigError as err:
    ...     print(err)
    lr=nan: expected a finite number > 0
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, Callable, Optional

from .errors import ConfigError

if TYPE_CHECKING:
    from .config import TrainConfig

__all__ = ["validate_config", "source_domains", "check_meta_domains"]

#: The largest seed + 1: numpy's generators take seeds below 2**32.
SEED_LIMIT = 2**32


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "int": (_is_int, "an integer"),
    "float": (_is_number, "a number"),
    "bool": (lambda v: isinstance(v, bool), "a boolean (true or false)"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "list[str]": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings"),
    "list[int]": (lambda v: isinstance(v, list) and all(_is_int(x) for x in v), "a list of integers"),
    "list[bool]": (lambda v: isinstance(v, list) and all(isinstance(x, bool) for x in v), "a list of booleans"),
}
#: What the type check calls a list of each key, where "a list of strings" says too little.
_LIST_NAMES = {"sources": "a list of dataset names", "targets": "a list of dataset names"}


def _fail(name: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"{name}={value!r}: expected {expected}")


def _check_type(name: str, annotation: str, value: Any) -> None:
    optional = annotation.startswith("Optional[")
    kind = annotation[len("Optional[") : -1] if optional else annotation
    if optional and value is None:
        return
    test, expected = _KINDS[kind]
    if name == "combine_all":
        return  # one value or one per source: checked (and expanded) by TrainConfig
    if not test(value):
        expected = _LIST_NAMES.get(name, expected)
        raise _fail(name, value, expected + (" or none" if optional else ""))


def _finite(name: str, value: Any, low: float, high: float = math.inf, low_open: bool = False, high_open: bool = False) -> None:
    """A finite number in the interval; ``None`` passes (optional keys)."""
    if value is None:
        return
    ok = math.isfinite(value) and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if ok:
        return
    if high == math.inf:
        bound = f"> {low:g}" if low_open else f">= {low:g}"
        raise _fail(name, value, f"a finite number {bound}")
    left, right = "(" if low_open else "[", ")" if high_open else "]"
    raise _fail(name, value, f"a finite number in {left}{low:g}, {high:g}{right}")


def _at_least(name: str, value: Optional[int], low: int) -> None:
    if value is not None and value < low:
        raise _fail(name, value, f"an integer >= {low}")


def source_domains(cfg: TrainConfig) -> Optional[int]:
    """How many training domains ``cfg`` has, when it is known before the data are read.

    Args:
        cfg: the config.

    Returns:
        ``None`` with ``cameras_as_domains`` (the cameras are counted when the data are read);
        else the synthetic styles left for training (no ``data_root``), or one per source.

    Examples:
        >>> from metabin_layers.reid.config import TrainConfig
        >>> from metabin_layers.reid.validation import source_domains
        >>> source_domains(TrainConfig()), source_domains(TrainConfig(data_root="d", sources=["market1501"], norm="bn"))
        (4, 1)
    """
    if cfg.cameras_as_domains:
        return None
    if cfg.data_root is None:
        return cfg.syn_styles - len(set(cfg.syn_held_out))
    return len(cfg.sources)


def _check_values(cfg: TrainConfig) -> None:
    from .model import NORM_VARIANTS

    if cfg.norm not in NORM_VARIANTS:
        raise ConfigError(f"norm must be one of {NORM_VARIANTS}, got {cfg.norm!r}")
    if cfg.amp_dtype not in ("float16", "bfloat16"):
        raise ConfigError(f"amp_dtype must be 'float16' or 'bfloat16', got {cfg.amp_dtype!r}")
    if cfg.in_affine_init not in ("copy", "identity"):
        raise ConfigError(f"in_affine_init must be 'copy' or 'identity', got {cfg.in_affine_init!r}")
    if cfg.metric not in ("cosine", "euclidean"):
        raise ConfigError(f"metric must be 'cosine' or 'euclidean', got {cfg.metric!r}")
    if cfg.checkpoint_every_minutes is not None and not (
        math.isfinite(cfg.checkpoint_every_minutes) and cfg.checkpoint_every_minutes > 0
    ):
        raise ConfigError(f"checkpoint_every_minutes must be > 0 or None, got {cfg.checkpoint_every_minutes}")
    if not cfg.sources:
        raise _fail("sources", cfg.sources, "at least one dataset name")
    if not 1 <= cfg.num_splits <= 10:
        raise _fail("num_splits", cfg.num_splits, "an integer between 1 and 10 (the small test sets have 10 splits)")
    for name in ("height", "width", "batch_size", "num_instances", "meta_batch_size", "epochs", "log_every"):
        _at_least(name, getattr(cfg, name), 1)
    for name in ("eval_batch_size", "syn_train_ids", "syn_test_ids", "first_inner_loop"):
        _at_least(name, getattr(cfg, name), 1)
    for name in ("iters_per_epoch", "max_iters", "checkpoint_every"):
        _at_least(name, getattr(cfg, name), 1)
    for name in ("rerank_k1", "rerank_k2", "query_expansion_k"):
        _at_least(name, getattr(cfg, name), 1)
    for name in ("pad", "workers", "warmup_epochs", "syn_distractor_ids", "precise_bn_iters"):
        _at_least(name, getattr(cfg, name), 0)
    _at_least("syn_styles", cfg.syn_styles, 2)
    _at_least("syn_images_per_id", cfg.syn_images_per_id, 2)
    if any(not 0 <= s < cfg.syn_styles for s in cfg.syn_held_out) or not 1 <= len(set(cfg.syn_held_out)) < cfg.syn_styles:
        raise _fail("syn_held_out", cfg.syn_held_out, f"at least one style of 0..{cfg.syn_styles - 1}, leaving one to train on")
    if any(m < 0 for m in cfg.milestones):
        raise _fail("milestones", cfg.milestones, "epochs >= 0")
    if cfg.last_stride not in (1, 2):
        raise _fail("last_stride", cfg.last_stride, "1 or 2")
    if not 0 <= cfg.seed < SEED_LIMIT:
        raise _fail("seed", cfg.seed, "an integer with 0 <= seed < 2**32")
    _finite("rho_init", cfg.rho_init, 0.0, 1.0)
    _finite("lr", cfg.lr, 0.0, low_open=True)
    _finite("bias_lr_factor", cfg.bias_lr_factor, 0.0)
    _finite("momentum", cfg.momentum, 0.0, 1.0, high_open=True)
    _finite("weight_decay", cfg.weight_decay, 0.0)
    _finite("gamma", cfg.gamma, 0.0, low_open=True)
    _finite("warmup_factor", cfg.warmup_factor, 0.0, 1.0)
    _finite("rho_lr_factor", cfg.rho_lr_factor, 0.0)
    _finite("inner_lr", cfg.inner_lr, 0.0)
    _finite("cyclic_middle_lr", cfg.cyclic_middle_lr, 0.0, low_open=True)
    _finite("cyclic_ratio", cfg.cyclic_ratio, 1.0)
    _finite("cyclic_period_per_epoch", cfg.cyclic_period_per_epoch, 0.0, low_open=True)
    _finite("cyclic_up_ratio", cfg.cyclic_up_ratio, 0.0, 1.0, low_open=True, high_open=True)
    _finite("ce_epsilon", cfg.ce_epsilon, 0.0, 1.0, high_open=True)
    _finite("margin", cfg.margin, 0.0)
    _finite("rerank_lambda", cfg.rerank_lambda, 0.0, 1.0)
    _finite("query_expansion_alpha", cfg.query_expansion_alpha, 0.0)
    for name in ("output", "backbone", "device"):
        if not getattr(cfg, name).strip():
            raise _fail(name, getattr(cfg, name), "a non-empty string")
    if cfg.compile is not None and not cfg.compile.strip():
        raise _fail("compile", cfg.compile, "a torch.compile backend name (e.g. 'inductor') or none")


def _check_cross(cfg: TrainConfig) -> None:
    """Constraints between keys: the P x K batch; on the synthetic data, the meta batch and the
    meta-train domains (on real data ``checks.check_sources`` checks them against the domains read)."""
    if cfg.batch_size % cfg.num_instances:
        raise ConfigError(f"batch_size ({cfg.batch_size}) must be a multiple of num_instances ({cfg.num_instances})")
    from .model import META_LEARNED_NORMS

    d = source_domains(cfg)
    if cfg.data_root is None and d is not None and cfg.norm in META_LEARNED_NORMS:
        check_meta_domains(cfg, d)
    else:
        _at_least("num_meta_train_domains", cfg.num_meta_train_domains, 1)


def check_meta_domains(cfg: TrainConfig, d: int) -> None:
    """``num_meta_train_domains`` and ``meta_batch_size`` of a meta-learned ``norm`` fit ``d`` domains.

    Args:
        cfg: the config (``norm``, ``num_meta_train_domains``, ``meta_batch_size``,
            ``num_instances``, ``sources`` are read).
        d: the number of training domains.

    Raises:
        ConfigError: naming the key that does not fit.

    Examples:
        >>> from metabin_layers.reid.config import TrainConfig
        >>> from metabin_layers.reid.errors import ConfigError
        >>> from metabin_layers.reid.validation import check_meta_domains
        >>> check_meta_domains(TrainConfig(num_meta_train_domains=3), 5)
        >>> try:
        ...     check_meta_domains(TrainConfig(num_meta_train_domains=3), 3)
        ... except ConfigError as err:
        ...     print(str(err).split(" (")[0])
        num_meta_train_domains=3: expected an integer between 1 and 2
    """
    from .model import META_LEARNED_NORMS

    if cfg.norm not in META_LEARNED_NORMS:
        return
    if d < 2:
        raise _fail(
            "sources",
            cfg.sources,
            f"at least 2 source domains for norm={cfg.norm} (one per source; with a single source set cameras_as_domains=true)",
        )
    k = cfg.num_meta_train_domains
    if k is not None and not 1 <= k <= d - 1:
        raise _fail("num_meta_train_domains", k, f"an integer between 1 and {d - 1} (the {d} source domains less one) or none")
    if cfg.meta_batch_size % (d * cfg.num_instances):
        raise _fail(
            "meta_batch_size",
            cfg.meta_batch_size,
            f"a multiple of num_domains x num_instances = {d} x {cfg.num_instances} = {d * cfg.num_instances}",
        )


def _check_environment(cfg: TrainConfig) -> None:
    """What depends on this machine and the installed packages: the device, backbone and datasets."""
    import torch

    if cfg.device != "auto":
        try:
            device = torch.device(cfg.device)
        except (RuntimeError, ValueError):
            raise _fail("device", cfg.device, "'auto' or a torch device such as 'cpu', 'cuda' or 'cuda:1'") from None
        if device.type == "cuda":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if count == 0:
                raise _fail("device", cfg.device, "an available device (CUDA is not available here; use 'cpu' or 'auto')")
            if device.index is not None and device.index >= count:
                raise _fail("device", cfg.device, f"an available device (this machine has {count} CUDA devices)")
        elif device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise _fail("device", cfg.device, "an available device (MPS is not available here)")
    if not _known_backbone(cfg.backbone):
        raise _fail("backbone", cfg.backbone, "a timm model name, 'tv:<name>' for torchvision, or 'mobilenetv2_x1_4'")
    if cfg.data_root is not None:
        from .datasets import dataset_names

        known = set(dataset_names())
        for key in ("sources", "targets"):
            unknown = [n for n in getattr(cfg, key) if _dataset_key(n) not in known]
            if unknown:
                raise _fail(
                    key, getattr(cfg, key), f"known dataset names ({unknown[0]!r} is not one of {', '.join(sorted(known))})"
                )


def _dataset_key(name: str) -> str:
    key = name.strip().lower()
    return key[3:] if key.startswith("dg_") else key


def _known_backbone(name: str) -> bool:
    from .model import MOBILENETV2_X1_4

    if name == MOBILENETV2_X1_4:
        return True
    if name.startswith("tv:"):
        import torchvision

        return name[3:] in torchvision.models.list_models()
    import timm

    return bool(timm.is_model(name))


def validate_config(cfg: TrainConfig, environment: bool = True) -> None:
    """Check every key of ``cfg``: its type, its range (NaN and infinity refused) and the
    constraints between keys; with ``environment``, also that the device exists and the backbone
    and datasets are known.

    Args:
        cfg: the config to check.
        environment: also check what depends on this machine (``device``, ``backbone``, the
            dataset names); ``TrainConfig`` itself checks without, so a config can be built
            (and saved, or evaluated on another device) anywhere.

    Raises:
        ConfigError: the first key found wrong, as one line ``<key>=<value>: expected <what>``.

    Examples:
        >>> from metabin_layers.reid.config import TrainConfig
        >>> from metabin_layers.reid.validation import validate_config
        >>> validate_config(TrainConfig(backbone="resnet18"))
        >>> TrainConfig(first_inner_loop=0)
        Traceback (most recent call last):
            ...
        metabin_layers.reid.errors.ConfigError: first_inner_loop=0: expected an integer >= 1
    """
    for f in dataclasses.fields(cfg):
        _check_type(f.name, str(f.type), getattr(cfg, f.name))
    _check_values(cfg)
    _check_cross(cfg)
    if environment:
        _check_environment(cfg)
