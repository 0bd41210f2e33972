"""MetaBIN layers: BatchNorm and InstanceNorm branches mixed by a per-channel ``rho``."""

from __future__ import annotations

import contextlib
import inspect
import math
import warnings
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Union

import torch
from torch import Tensor, nn

from ._registry import BINArgs
from .functional import BACKENDS, _compiler_flag, _exporting_graph, _load_backend, _run

__all__ = [
    "MetaBIN1d",
    "MetaBIN2d",
    "MetaBIN3d",
    "MetaBINAct2d",
    "STATS_MODES",
    "set_stats_mode",
    "stats_mode",
    "metabin_modules",
    "rho_parameters",
    "base_parameters",
    "check_rho",
    "clamp_rho_",
    "replace_modules",
    "AUTHORS_LAYER_KEYS",
    "IN_AFFINE_INITS",
]

STATS_MODES = ("update", "hold", "eval")
"""Statistics modes of a MetaBIN layer (the authors' ``type_running_stats``): ``"update"`` normalises
with batch statistics and updates the running ones (normal training), ``"hold"`` normalises with
batch statistics and leaves the running ones untouched (meta steps), ``"eval"`` normalises the BN
branch with the running statistics."""


#: How the IN-branch affine starts when a BatchNorm becomes a MetaBIN layer: ``"copy"`` of the BN
#: affine, or ``"identity"`` (weight 1, bias 0). See ``convert_bn_to_metabin``.
IN_AFFINE_INITS = ("copy", "identity")

#: The tensors a MetaBIN layer has and a BatchNorm lacks: filled when a BatchNorm state dict is loaded.
_METABIN_ONLY_KEYS = ("rho", "in_weight", "in_bias")

#: The authors' checkpoints keep a layer's branches in sub-modules: (their key, our flat name) pairs.
AUTHORS_LAYER_KEYS = (
    ("bat_n.weight", "weight"),
    ("bat_n.bias", "bias"),
    ("bat_n.running_mean", "running_mean"),
    ("bat_n.running_var", "running_var"),
    ("bat_n.num_batches_tracked", "num_batches_tracked"),
    ("ins_n.weight", "in_weight"),
    ("ins_n.bias", "in_bias"),
    ("gate", "rho"),
)


class _MetaBINBase(nn.Module):
    """Shared implementation of ``MetaBIN1d``, ``MetaBIN2d`` and ``MetaBIN3d``.

    Tensors: ``weight``, ``bias`` (BN-branch affine), ``running_mean``, ``running_var``,
    ``num_batches_tracked`` (same names and semantics as ``nn.BatchNorm``), ``in_weight``,
    ``in_bias`` (IN-branch affine) and ``rho`` (per-channel mixing weight in [0, 1]).

    Inputs with a single value per channel and sample (``(N, C)``, or spatial size 1: squeeze-excite
    blocks, auxiliary heads on 1x1 maps) have no instance statistics. For them the layer uses its
    batch branch only, as if ``rho`` were 1: it computes exactly its BatchNorm (``weight``,
    ``bias``, running statistics used and updated per ``stats_mode``), in training, in eval and
    folded for export, and ``rho`` gets no gradient from such a call. The first such call of each
    layer warns once.

    A plain BatchNorm state dict (``weight``, ``bias``, ``running_mean``, ``running_var``,
    ``num_batches_tracked``, as far as the layer has them, and no ``rho``, ``in_weight`` or
    ``in_bias``) loads strictly: the three missing tensors are filled as ``convert_bn_to_metabin``
    fills them, ``rho`` with ``rho_init`` and the IN affine per ``in_affine_init`` (``"copy"``: the
    loaded BN affine; ``"identity"``: weight 1, bias 0). So a model built with MetaBIN layers and
    then given the BatchNorm model's weights equals the converted BatchNorm model. Any other
    missing or unexpected key stays an error in strict mode.

    rho must lie in [0, 1] and be finite; a value outside is an error naming the layer, never
    clamped silently. It is checked where it enters: ``rho_init``, ``load_state_dict``,
    ``rho_override``, folding (``fold_metabin_for_inference``, every time), ``MetaBINOptimizer``
    (when built and at each ``meta_step``) and the forward. The forward and ``meta_step`` check
    lazily, on the host and without a device sync on the training path: only when rho's autograd
    version counter (or the tensor) changed since the last check, i.e. after ``rho.fill_(...)``
    under ``no_grad``, ``rho.copy_(...)``, a new Parameter, ``.to()``; the library's own updates
    (``meta_step``, ``clamp_rho_``) mark their result checked. Writes through ``rho.data`` bypass
    the version counter: folding and ``check_rho`` still see them.
    """

    _input_dims: tuple[int, ...] = ()
    if TYPE_CHECKING:  # for type checkers only: nn.Module's __getattr__ types them Tensor | Module
        weight: Optional[nn.Parameter]
        bias: Optional[nn.Parameter]
        in_weight: Optional[nn.Parameter]
        in_bias: Optional[nn.Parameter]
        rho: nn.Parameter
        running_mean: Optional[Tensor]
        running_var: Optional[Tensor]
        num_batches_tracked: Optional[Tensor]
    _rho_override: Optional[Tensor]  # attribute types for TorchScript
    _stats_mode: str
    _backend: str
    # Set once the layer has warned about an input with a single value per channel and sample.
    _single_value_warned: bool = False
    # (id, version, data pointer) of the rho last found valid: the forward re-checks only on change.
    _rho_checked: Optional[tuple[int, int, int]] = None
    __jit_unused_properties__ = ["stats_mode", "backend"]
    _version = 2  # same as nn.BatchNorm: num_batches_tracked exists

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        rho_init: float = 1.0,
        stats_mode: str = "update",
        backend: str = "auto",
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
        in_affine_init: str = "copy",
    ) -> None:
        """Create a MetaBIN layer.

        Args:
            num_features: number of channels ``C`` of the input.
            eps: added to the variances for numerical stability (as in ``nn.BatchNorm2d``).
            momentum: running-statistics update factor; ``None`` gives a cumulative average.
            affine: learn the BN-branch affine (``weight``, ``bias``) and the IN-branch affine
                (``in_weight``, ``in_bias``).
            track_running_stats: keep ``running_mean`` / ``running_var`` for the BN branch; without
                them the BN branch always uses batch statistics.
            rho_init: initial per-channel balance in [0, 1]; 1 computes exactly BatchNorm.
            stats_mode: ``"update"``, ``"hold"`` or ``"eval"`` (see ``STATS_MODES``).
            backend: ``"auto"`` or one of ``BACKENDS``: which implementation of the math runs.
            device: device of the parameters and buffers.
            dtype: dtype of the parameters and buffers.
            in_affine_init: how loading a plain BatchNorm state dict fills the IN affine, one of
                ``IN_AFFINE_INITS``: ``"copy"`` (the loaded BN affine, as ``convert_bn_to_metabin``'s
                default) or ``"identity"`` (weight 1, bias 0). A new layer's IN affine is 1 / 0 either way.

        Shape:
            Input and output have the same shape: ``(N, C)`` or ``(N, C, L)`` (1d),
            ``(N, C, H, W)`` (2d), ``(N, C, D, H, W)`` (3d).
        """
        super().__init__()
        if not isinstance(num_features, int) or num_features <= 0:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        _check_rho_init(rho_init)
        if in_affine_init not in IN_AFFINE_INITS:
            raise ValueError(f"in_affine_init must be one of {IN_AFFINE_INITS}, got {in_affine_init!r}")
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.rho_init = float(rho_init)
        self.in_affine_init = in_affine_init
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            self.bias = nn.Parameter(torch.empty(num_features, **factory))
            self.in_weight = nn.Parameter(torch.empty(num_features, **factory))
            self.in_bias = nn.Parameter(torch.empty(num_features, **factory))
        else:
            for name in ("weight", "bias", "in_weight", "in_bias"):
                self.register_parameter(name, None)
        self.rho = nn.Parameter(torch.empty(num_features, **factory))
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer(
                "num_batches_tracked",
                torch.tensor(0, dtype=torch.long, device=device),
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.stats_mode = stats_mode
        self.backend = backend
        # rho' of a meta step: a tensor with autograd history that replaces rho in forward.
        self._rho_override: Optional[Tensor] = None
        self.reset_parameters()

    # -- state -----------------------------------------------------------------------------
    @property
    def stats_mode(self) -> str:
        """``"update"``, ``"hold"`` or ``"eval"``; see ``STATS_MODES``."""
        return self._stats_mode

    @stats_mode.setter
    def stats_mode(self, mode: str) -> None:
        if mode not in STATS_MODES:
            raise ValueError(f"stats_mode must be one of {STATS_MODES}, got {mode!r}")
        self._stats_mode = mode

    @property
    def backend(self) -> str:
        """``"auto"`` or one of ``BACKENDS`` (``"fused"``, ``"composite"``, ``"triton"``): the implementation that runs."""
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value != "auto" and value not in BACKENDS:
            raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {value!r}")
        if value == "triton":
            _load_backend("triton")  # registered now, so that graph capture need not import it
        self._backend = value

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()  # type: ignore[union-attr]
            self.running_var.fill_(1)  # type: ignore[union-attr]
            self.num_batches_tracked.zero_()  # type: ignore[union-attr]

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        with torch.no_grad():
            if self.affine:
                for p, value in ((self.weight, 1.0), (self.bias, 0.0), (self.in_weight, 1.0), (self.in_bias, 0.0)):
                    assert p is not None
                    p.fill_(value)
            self.rho.fill_(self.rho_init)
        self._mark_rho_checked()  # rho_init was checked in [0, 1]

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}, rho_init={self.rho_init}"
        )

    @contextlib.contextmanager
    def rho_override(self, rho: Tensor) -> Iterator[None]:
        """Use ``rho`` (which may carry autograd history) in place of ``self.rho`` inside the block.

        Examples:
            >>> import torch
            >>> from metabin_layers import MetaBIN2d
            >>> m = MetaBIN2d(3)
            >>> with m.rho_override(m.rho * 0.5):
            ...     y = m(torch.randn(2, 3, 4, 4))
        """
        if rho.shape != self.rho.shape:
            raise ValueError(f"rho override must have shape {tuple(self.rho.shape)}, got {tuple(rho.shape)}")
        problem = rho_problem(rho)
        if problem is not None:
            raise ValueError(f"{self._label()}: rho override: {problem}")
        previous, self._rho_override = self._rho_override, rho
        try:
            yield
        finally:
            self._rho_override = previous

    @torch.jit.unused
    def _warn_batch_branch_only(self, shape: tuple[int, ...]) -> None:
        """Warn once per layer that an input of ``shape`` has a single value per channel and sample.

        Such an input (``(N, C)``, ``(N, C, 1)``, ``(N, C, 1, 1)``: squeeze-excite blocks, auxiliary
        heads on 1x1 maps, BatchNorm1d over token features) has no instance statistics, so the
        layer uses its batch branch only and is exactly its BatchNorm. Not while compiling:
        torch.compile cannot trace ``warnings.warn``.
        """
        if not self._single_value_warned and not _compiler_flag("is_compiling"):
            self._single_value_warned = True
            warnings.warn(
                f"{type(self).__name__}({self.num_features}): input of shape {shape} has a single value per "
                "channel and sample, which has no instance statistics; this layer uses its batch branch only "
                "for such inputs (it computes its BatchNorm, rho gets no gradient from them). Warned once per layer.",
                UserWarning,
                stacklevel=3,
            )

    # -- rho checks ---------------------------------------------------------------------------
    def _label(self) -> str:
        return f"{type(self).__name__}({self.num_features})"

    @torch.jit.unused
    def _rho_key(self) -> Optional[tuple[int, int, int]]:
        """What identifies rho's current values on the host (None: not trackable, e.g. an inference tensor)."""
        try:
            return (id(self.rho), self.rho._version, self.rho.data_ptr())
        except RuntimeError:
            return None

    @torch.jit.unused
    def _mark_rho_checked(self) -> None:
        self._rho_checked = self._rho_key()

    @torch.jit.unused
    def _rho_changed(self) -> bool:
        """Whether rho may have changed since it was last found valid (host-side, no device sync)."""
        if _compiler_flag("is_compiling") or torch.jit.is_tracing():
            return False  # traced or compiled code cannot branch on values
        key = self._rho_key()
        if key is None or key == self._rho_checked:
            return False
        return not (self.rho.is_cuda and torch.cuda.is_current_stream_capturing())  # nor can a CUDA graph capture

    @torch.jit.unused
    def _check_rho_if_changed(self) -> None:
        """The forward's lazy check: rho in [0, 1] and finite, re-checked (one sync) only after a change."""
        if self._rho_changed():
            problem = rho_problem(self.rho)
            if problem is not None:
                raise ValueError(f"{self._label()}: {problem}")
            self._mark_rho_checked()

    # -- forward -----------------------------------------------------------------------------
    def _check_input(self, x: Tensor) -> None:
        if x.dim() not in self._input_dims:
            dims = " or ".join(f"{d}D" for d in self._input_dims)
            raise ValueError(f"{type(self).__name__} expected {dims} input, got {x.dim()}D input of shape {tuple(x.shape)}")
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}({self.num_features}) got input with {x.shape[1]} channels "
                f"(shape {tuple(x.shape)}); expected {self.num_features}"
            )

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            raise RuntimeError(
                "MetaBIN layers do not run under torch.jit.script: fold the eval model "
                "(metabin_layers.export.fold_metabin_for_inference) and script that, or use torch.compile / torch.export"
            )
        return self._eager_forward(x)

    @torch.jit.unused
    def _eager_forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if not self.training and _exporting_graph():
            # The folded eval form: standard ops and no autograd.Function, so exported graphs
            # (ONNX with either exporter) are clean and load in onnxruntime as they are.
            from .export import folded_eval_forward

            return folded_eval_forward(self, x)
        self._check_rho_if_changed()
        shape = tuple(x.shape)  # the caller's shape, for the messages (before any unsqueeze)
        squeeze = x.dim() == 2
        if squeeze:
            x = x.unsqueeze(-1)
        spatial = math.prod(x.shape[2:])  # no indexing: that would add two tensor ops per call
        if x.shape[0] == 0:
            if self.training:
                raise ValueError(
                    f"{type(self).__name__}: empty batch (input of shape {shape}) in training: the batch "
                    "statistics need at least one sample"
                )
            # As BatchNorm in eval mode: an empty output (kept in the autograd graph of rho).
            y0 = x + (self.rho.sum() * 0).to(x.dtype)
            return y0.squeeze(-1) if squeeze else y0
        if self.training and x.shape[0] * spatial <= 1:
            raise ValueError(
                f"{type(self).__name__}: expected more than 1 value per channel when training, got input of "
                f"shape {shape} (batch 1 with a single spatial value)"
            )
        rho = self._rho_override if self._rho_override is not None else self.rho
        batch_only = spatial == 1
        if batch_only:
            # One value per channel and sample: instance statistics do not exist, so the layer is
            # its BatchNorm (train, eval and folded alike); rho gets no gradient from this call.
            self._warn_batch_branch_only(shape)
        has_running = self.running_mean is not None and self.running_var is not None
        mode = self._stats_mode if self.training else "eval"
        if mode == "eval" and not has_running:
            mode = "hold"  # no running statistics: the batch ones, as nn.BatchNorm
        elif mode == "update" and not (self.training and self.track_running_stats and has_running):
            mode = "hold"
        args = BINArgs(
            x, rho, self.weight, self.bias, self.in_weight, self.in_bias, self.running_mean, self.running_var,
            self.num_batches_tracked, self.momentum, self.eps, mode, batch_only,
        )  # fmt: skip
        y = _run(args, self._backend)
        return y.squeeze(-1) if squeeze else y

    # -- checkpoints -------------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        for old, new in AUTHORS_LAYER_KEYS:
            if prefix + old in state_dict and prefix + new not in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old)
        version = local_metadata.get("version", None)
        if (version is None or version < 2) and self.track_running_stats:
            # nn.BatchNorm checkpoints before version 2 have no num_batches_tracked.
            key = prefix + "num_batches_tracked"
            if key not in state_dict:
                state_dict[key] = torch.tensor(0, dtype=torch.long)
        self._fill_batchnorm_state(state_dict, prefix)
        rho = state_dict.get(prefix + "rho")
        if rho is not None and rho.numel() and (rho.min() < 0 or rho.max() > 1 or rho.isnan().any()):
            error_msgs.append(f"{prefix}rho must lie in [0, 1], got values in [{rho.min().item():.4g}, {rho.max().item():.4g}]")
            state_dict = {k: v for k, v in state_dict.items() if k != prefix + "rho"}
        errors = len(error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if rho is not None and len(error_msgs) == errors:
            self._mark_rho_checked()  # loaded, and checked above

    def _fill_batchnorm_state(self, state_dict: dict[str, Any], prefix: str) -> None:
        """Add ``rho`` / ``in_weight`` / ``in_bias`` to a plain BatchNorm's entries, as the converter sets them.

        Only when every other tensor of the layer is there and none of the three is: any other
        key set is left for the strict check to report.
        """
        own = [name for name, t in (*self._parameters.items(), *self._buffers.items()) if t is not None]
        own = [n for n in own if n not in self._non_persistent_buffers_set]
        if any(prefix + n in state_dict for n in _METABIN_ONLY_KEYS):
            return
        if not all(prefix + n in state_dict for n in own if n not in _METABIN_ONLY_KEYS):
            return
        with torch.no_grad():
            state_dict[prefix + "rho"] = torch.full_like(self.rho, self.rho_init)
            if self.in_weight is not None and self.in_bias is not None:
                if getattr(self, "in_affine_init", "copy") == "copy":  # layers pickled before the attribute: the default
                    state_dict[prefix + "in_weight"] = state_dict[prefix + "weight"].detach().clone()
                    state_dict[prefix + "in_bias"] = state_dict[prefix + "bias"].detach().clone()
                else:
                    state_dict[prefix + "in_weight"] = torch.ones_like(self.in_weight)
                    state_dict[prefix + "in_bias"] = torch.zeros_like(self.in_bias)


def rho_problem(rho: Tensor) -> Optional[str]:
    """Why ``rho`` is not a valid rho (a value outside [0, 1], NaN or infinite), or None.

    Reads the values on the host (one device sync): for the checks outside the training path.
    """
    r = rho.detach().flatten()
    bad = ~((r >= 0) & (r <= 1))  # NaN fails both comparisons
    if r.numel() == 0 or not bool(bad.any()):
        return None
    channels = bad.nonzero().flatten().tolist()
    first = channels[0]
    return (
        f"rho must lie in [0, 1] and be finite, got {float(r[first]):g} in channel {first} "
        f"({len(channels)} of {r.numel()} channels outside)"
    )


def check_rho(model: nn.Module) -> None:
    """Check that every MetaBIN layer's rho lies in [0, 1] and is finite (a host read per layer).

    What folding and ``MetaBINOptimizer`` run; call it after changing rho by hand (e.g. through
    ``rho.data``, which the layers' own lazy check does not see).

    Args:
        model: a model, or a single MetaBIN layer.

    Raises:
        ValueError: naming the first layer (its path in ``model``), the channel and the value.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from metabin_layers import MetaBIN2d, check_rho
        >>> model = nn.Sequential(MetaBIN2d(2), MetaBIN2d(3))
        >>> check_rho(model)  # rho_init=1: fine
        >>> model[1].rho.data[2] = 1.5
        >>> check_rho(model)
        Traceback (most recent call last):
            ...
        ValueError: layer '1' (MetaBIN2d(3)): rho must lie in [0, 1] and be finite, got 1.5 in channel 2 (1 of 3 channels outside)
    """
    for name, m in model.named_modules():
        if isinstance(m, _MetaBINBase):
            problem = rho_problem(m.rho)
            if problem is not None:
                raise ValueError(f"layer {name or '<root>'!r} ({m._label()}): {problem}")
            m._mark_rho_checked()


@torch.no_grad()
def clamp_rho_(model: nn.Module) -> None:
    """Clamp every rho of ``model`` to [0, 1] in place (foreach ops, no host sync), after a step.

    For optimizers that step rho themselves (rho trained end to end with the task loss); the
    layers then take the clamped values as checked (no re-check in the next forward). A NaN stays
    NaN: keep the loss finite (e.g. with a ``GradScaler``, which skips such steps).

    Args:
        model: a model, or a single MetaBIN layer.

    Examples:
        >>> import torch
        >>> from metabin_layers import MetaBIN2d, clamp_rho_
        >>> layer = MetaBIN2d(2)
        >>> with torch.no_grad():
        ...     _ = layer.rho.add_(0.5)
        >>> clamp_rho_(layer); layer.rho.tolist()
        [1.0, 1.0]
    """
    layers = metabin_modules(model)
    rhos: list[Tensor] = [m.rho for m in layers]
    if rhos:
        torch._foreach_clamp_min_(rhos, 0.0)
        torch._foreach_clamp_max_(rhos, 1.0)
    for m in layers:
        m._mark_rho_checked()


def _check_rho_init(rho_init: float) -> None:
    if isinstance(rho_init, bool) or not isinstance(rho_init, (int, float)) or not 0.0 <= float(rho_init) <= 1.0:
        raise ValueError(f"rho_init must be a number in [0, 1], got {rho_init!r}")


class MetaBIN1d(_MetaBINBase):
    """MetaBIN over ``(N, C)`` or ``(N, C, L)`` inputs (the counterpart of ``nn.BatchNorm1d``).

    ``(N, C)`` inputs (and ``L == 1``) have no instance statistics: the layer then computes its
    BatchNorm (batch branch only, in training and eval; one warning per layer).

    Examples:
        >>> import torch
        >>> from metabin_layers import MetaBIN1d
        >>> m = MetaBIN1d(8, rho_init=0.5)
        >>> m(torch.randn(4, 8, 16)).shape
        torch.Size([4, 8, 16])
    """

    _input_dims: tuple[int, ...] = (2, 3)


class MetaBIN2d(_MetaBINBase):
    """MetaBIN over ``(N, C, H, W)`` inputs: ``rho * BN(x) + (1 - rho) * IN(x)``.

    Drop-in for ``nn.BatchNorm2d``: with ``rho_init=1`` it computes exactly BatchNorm.

    Examples:
        >>> import torch
        >>> from metabin_layers import MetaBIN2d
        >>> m = MetaBIN2d(16)
        >>> m(torch.randn(4, 16, 8, 8)).shape
        torch.Size([4, 16, 8, 8])
    """

    _input_dims: tuple[int, ...] = (4,)


class MetaBIN3d(_MetaBINBase):
    """MetaBIN over ``(N, C, D, H, W)`` inputs (the counterpart of ``nn.BatchNorm3d``).

    Examples:
        >>> import torch
        >>> from metabin_layers import MetaBIN3d
        >>> m = MetaBIN3d(4)
        >>> m(torch.randn(2, 4, 3, 5, 5)).shape
        torch.Size([2, 4, 3, 5, 5])
    """

    _input_dims: tuple[int, ...] = (5,)


class MetaBINAct2d(MetaBIN2d):
    """MetaBIN2d followed by ``drop`` and ``act``: the counterpart of timm's ``BatchNormAct2d``.

    Takes ``BatchNormAct2d``'s arguments in the same order, then MetaBIN's own. Its state-dict
    keys are those of ``BatchNormAct2d`` plus ``in_weight``, ``in_bias`` and ``rho``; a
    ``BatchNormAct2d`` state dict loads strictly, those three filled as ``convert_bn_to_metabin``
    fills them (``rho_init``, ``in_affine_init``).

    Args:
        num_features: number of channels ``C``.
        eps: added to the variances for numerical stability.
        momentum: running-statistics update factor; ``None`` gives a cumulative average.
        affine: learn the BN-branch and IN-branch affines.
        track_running_stats: keep running statistics for the BN branch.
        apply_act: apply the activation (else ``act`` is ``nn.Identity``).
        act_layer: activation: a class or factory (called with ``inplace`` when it takes that
            argument, and ``act_kwargs``), a module instance, a timm activation name such as
            ``"silu"`` (needs timm), or None for no activation.
        act_kwargs: keyword arguments of ``act_layer``.
        inplace: passed to ``act_layer`` when it takes an ``inplace`` argument.
        drop_layer: optional dropout / drop-block class (called without arguments) or instance,
            applied before ``act``.
        device: device of the parameters and buffers.
        dtype: dtype of the parameters and buffers.
        rho_init: initial per-channel balance in [0, 1]; 1 computes exactly ``BatchNormAct2d``.
        stats_mode: ``"update"``, ``"hold"`` or ``"eval"`` (see ``STATS_MODES``).
        backend: ``"auto"`` or one of ``metabin_layers.functional.BACKENDS``.
        in_affine_init: how loading a plain BatchNorm state dict fills the IN affine
            (``IN_AFFINE_INITS``).

    Shape:
        Input and output: ``(N, C, H, W)``.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from metabin_layers import MetaBINAct2d
        >>> m = MetaBINAct2d(8, act_layer=nn.ReLU)
        >>> bool((m(torch.randn(2, 8, 4, 4)) >= 0).all())
        True
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        apply_act: bool = True,
        act_layer: Union[str, Callable[..., nn.Module], nn.Module, None] = nn.ReLU,
        act_kwargs: Optional[dict[str, Any]] = None,
        inplace: bool = True,
        drop_layer: Union[Callable[..., nn.Module], nn.Module, None] = None,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
        *,
        rho_init: float = 1.0,
        stats_mode: str = "update",
        backend: str = "auto",
        in_affine_init: str = "copy",
    ) -> None:
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            rho_init=rho_init,
            stats_mode=stats_mode,
            backend=backend,
            device=device,
            dtype=dtype,
            in_affine_init=in_affine_init,
        )
        self.drop = _build(drop_layer) if drop_layer is not None else nn.Identity()
        if apply_act and act_layer is not None:
            self.act = _build(_resolve_act(act_layer), inplace=inplace, **(act_kwargs or {}))
        else:
            self.act = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(super().forward(x)))


def _resolve_act(act_layer: Union[str, Callable[..., nn.Module], nn.Module]) -> Union[Callable[..., nn.Module], nn.Module]:
    if not isinstance(act_layer, str):
        return act_layer
    try:  # activation names are timm's vocabulary ("silu", "hard_swish", "gelu_tanh", ...)
        from timm.layers import get_act_layer
    except ImportError as err:
        raise ImportError(f"act_layer={act_layer!r} is a timm activation name and needs timm; pass a class (nn.SiLU)") from err
    resolved = get_act_layer(act_layer)
    if resolved is None:
        raise ValueError(f"act_layer {act_layer!r} names no activation")
    return resolved


def _takes(factory: Callable[..., Any], name: str) -> bool:
    """Whether ``factory`` accepts a keyword argument ``name`` (explicitly or through ``**kwargs``)."""
    if isinstance(factory, type) and getattr(factory, "__init__", None) is nn.Module.__init__:
        return False  # Tanh, Sigmoid, ...: nn.Module's own ``(*args, **kwargs)`` takes no options
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # no introspectable signature
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _build(layer: Union[Callable[..., nn.Module], nn.Module], inplace: Optional[bool] = None, **kwargs: Any) -> nn.Module:
    """``layer`` itself when it is a module, else ``layer(**kwargs)``, with ``inplace`` only where it is accepted.

    The signature decides whether ``inplace`` is passed (GELU, Sigmoid, ... take none), so a
    ``TypeError`` raised inside the constructor reaches the caller.
    """
    if isinstance(layer, nn.Module):
        return layer
    if inplace is not None and _takes(layer, "inplace"):
        kwargs["inplace"] = inplace
    return layer(**kwargs)


# -- model walking ---------------------------------------------------------------------------


def replace_modules(module: nn.Module, visit: Callable[[str, nn.Module], Optional[nn.Module]]) -> nn.Module:
    """Rewrite a module tree in place, depth first: the recursion shared by the converters.

    ``visit(qualified_name, m)`` returns the module to put in ``m``'s place (``m`` itself to keep
    it), or None to descend into ``m``'s children. Parents are rewritten with ``setattr``, as in
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``.

    Args:
        module: the root.
        visit: the decision for each module.

    Returns:
        The new root: ``module`` unless the root itself was replaced.

    Examples:
        >>> from torch import nn
        >>> from metabin_layers.layers import replace_modules
        >>> net = replace_modules(nn.Sequential(nn.ReLU()), lambda _, m: nn.GELU() if isinstance(m, nn.ReLU) else None)
        >>> net
        Sequential(
          (0): GELU(approximate='none')
        )
    """

    def walk(mod: nn.Module, name: str) -> nn.Module:
        replacement = visit(name, mod)
        if replacement is not None:
            return replacement
        for child_name, child in mod.named_children():
            new_child = walk(child, f"{name}.{child_name}" if name else child_name)
            if new_child is not child:
                setattr(mod, child_name, new_child)
        return mod

    return walk(module, "")


def metabin_modules(model: nn.Module) -> list[_MetaBINBase]:
    """All MetaBIN layers of ``model`` (plain and synchronised), in ``model.modules()`` order.

    Args:
        model: any module.

    Returns:
        The MetaBIN layers, each once.

    Examples:
        >>> from torch import nn
        >>> from metabin_layers import MetaBIN2d, metabin_modules
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), MetaBIN2d(8), nn.ReLU())
        >>> [type(m).__name__ for m in metabin_modules(model)]
        ['MetaBIN2d']
    """
    return [m for m in model.modules() if isinstance(m, _MetaBINBase)]


def rho_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The ``rho`` Parameters of every MetaBIN layer of ``model`` (each once, in module order).

    Args:
        model: any module.

    Returns:
        The ``rho`` Parameters: what ``MetaBINOptimizer`` meta-learns.

    Examples:
        >>> from torch import nn
        >>> from metabin_layers import MetaBIN2d, rho_parameters
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), MetaBIN2d(8))
        >>> [p.shape for p in rho_parameters(model)]
        [torch.Size([8])]
    """
    seen: set[int] = set()
    out = []
    for m in metabin_modules(model):
        if id(m.rho) not in seen:
            seen.add(id(m.rho))
            out.append(m.rho)
    return out


def base_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter of ``model`` except the MetaBIN ``rho``: what the base optimizer steps.

    Args:
        model: any module.

    Returns:
        The Parameters of ``model`` that are not a ``rho``, in ``model.parameters()`` order.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from metabin_layers import MetaBIN2d, base_parameters
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), MetaBIN2d(8))
        >>> opt = torch.optim.SGD(base_parameters(model), lr=0.01)
        >>> len(base_parameters(model))  # conv weight and bias, BN and IN affines
        6
    """
    rho_ids = {id(p) for p in rho_parameters(model)}
    return [p for p in model.parameters() if id(p) not in rho_ids]


def set_stats_mode(model: nn.Module, mode: str) -> None:
    """Set the statistics mode of every MetaBIN layer in ``model``.

    Args:
        model: any module; its MetaBIN layers (at any depth) are set.
        mode: one of ``STATS_MODES``.

    Raises:
        ValueError: ``mode`` is not one of ``STATS_MODES``.

    Examples:
        >>> from torch import nn
        >>> from metabin_layers import MetaBIN2d
        >>> from metabin_layers.layers import set_stats_mode
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), MetaBIN2d(8))
        >>> set_stats_mode(model, "hold")
        >>> model[1].stats_mode
        'hold'
    """
    if mode not in STATS_MODES:
        raise ValueError(f"mode must be one of {STATS_MODES}, got {mode!r}")
    for m in metabin_modules(model):
        m.stats_mode = mode


@contextlib.contextmanager
def stats_mode(model: nn.Module, mode: str) -> Iterator[None]:
    """Context manager: every MetaBIN layer of ``model`` uses ``mode`` inside the block.

    Each layer's previous mode is restored on exit, also when the block raises.

    Args:
        model: any module; its MetaBIN layers (at any depth) are switched.
        mode: one of ``STATS_MODES``.

    Yields:
        Nothing; the layers are in ``mode`` inside the ``with`` block.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from metabin_layers import MetaBIN2d, stats_mode
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), MetaBIN2d(8))
        >>> with stats_mode(model, "hold"):   # batch statistics, running stats untouched
        ...     _ = model(torch.randn(2, 3, 8, 8))
        >>> int(model[1].num_batches_tracked)
        0
    """
    if mode not in STATS_MODES:
        raise ValueError(f"mode must be one of {STATS_MODES}, got {mode!r}")
    layers = metabin_modules(model)
    previous = [m.stats_mode for m in layers]
    try:
        for m in layers:
            m.stats_mode = mode
        yield
    finally:
        for m, p in zip(layers, previous):
            m.stats_mode = p
