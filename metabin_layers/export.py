"""Eval-time folding of MetaBIN layers, for export (ONNX, TorchScript, TensorRT).

In eval mode the BN branch of a MetaBIN layer normalises with the running statistics, so it is a
fixed per-channel affine map ``a_c * x + b_c``. The layer then reduces to

    y = a_c * x + b_c + (1 - rho_c) * (w_I * (x - mu_nc) / sqrt(var_nc + eps) + b_I)
      = A[n, c] * x + B[n, c],
    A[n, c] = a_c + g_c / sqrt(var_nc + eps),   B[n, c] = b'_c - g_c * mu_nc / sqrt(var_nc + eps),

with ``g_c = (1 - rho_c) * w_I``, ``b'_c = b_c + (1 - rho_c) * b_I``: per-(n, c) statistics over
the spatial dimensions, then one affine pass. Layers whose IN branch vanishes (``g_c == 0`` in
every channel, e.g. ``rho == 1``) become a pure per-channel affine, like a BatchNorm folded for
inference. ``FoldedMetaBIN`` holds only buffers and uses only standard ops (no custom
autograd function, no Python-only control flow), so the folded model exports to ONNX with either
exporter, scripts with ``torch.jit.script`` and compiles with ``torch.compile``. See
``docs/export.md``.
"""

from __future__ import annotations

import copy
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._bin_math import about, batch_stats, branch_terms, mix, stat_dtype
from .layers import MetaBINAct2d, _MetaBINBase, check_rho, replace_modules, rho_problem

__all__ = ["FoldedMetaBIN", "FoldedMetaBINAct2d", "fold_metabin_for_inference", "folded_eval_forward"]


class FoldedMetaBIN(nn.Module):
    """Inference-only MetaBIN layer: per-(n, c) instance statistics and one affine map.

    Built from an eval-mode MetaBIN layer by ``from_metabin`` (or, for a whole model, by
    ``fold_metabin_for_inference``). It computes the eval-mode output of that layer,

    ``y = scale * x + shift + in_scale * (x - mu_nc) / sqrt(var_nc + eps)``,

    from per-(n, c) statistics and one affine map, with standard ops only.

    Buffers, each of shape ``(C,)`` (no Parameters: like ``FrozenBatchNorm2d`` it stays frozen in
    ``train()`` mode too):

    * ``scale``, ``shift``: the BN branch with the running statistics and ``rho`` folded in, plus
      the IN-branch bias ``(1 - rho) * b_I`` in ``shift``;
    * ``in_scale``: ``(1 - rho) * w_I``, the weight of the normalised instance term;
    * ``bn_scale``, ``bn_shift``: the layer's BatchNorm alone (as if ``rho`` were 1), which is what
      the layer computes for inputs with a single value per channel and sample (``(N, C)``,
      spatial size 1), where instance statistics do not exist.

    Modes, fixed at construction (plain attributes, constants for TorchScript):

    * ``instance_stats`` is False when ``in_scale`` is 0 in every channel (``rho == 1``): a pure
      per-channel affine, no statistics pass;
    * ``batch_stats`` is True for layers that track no running statistics: their eval output uses
      the statistics of the batch, so ``scale`` holds ``rho * w_B``, ``shift`` holds
      ``rho * b_B + (1 - rho) * b_I``, and the batch statistics are derived from the instance ones
      (mean of ``mu_nc``; mean of ``var_nc + (mu_nc - mu_B)^2``), as the layer does.

    Args:
        scale: ``(C,)``, the weight of the BN term (see above).
        shift: ``(C,)``, the bias of the output (see above).
        in_scale: ``(C,)``, the weight of the normalised instance term (see above).
        eps: the layer's eps.
        instance_stats: None (default) decides from ``in_scale`` as above.
        batch_stats: see above.
        bn_scale: ``(C,)``, the weight of the BatchNorm alone (see above); default ``scale``.
        bn_shift: ``(C,)``, the bias of the BatchNorm alone; default ``shift``.

    Inputs ``(N, C, *spatial)`` of any rank, and ``(N, C)`` (one value per instance, as
    ``MetaBIN1d`` accepts in eval mode). Statistics are computed in float32 at least (float64 for
    float64 inputs); fp16 / bf16 inputs return their own dtype.

    Examples:
        >>> from metabin_layers import MetaBIN2d
        >>> from metabin_layers.export import FoldedMetaBIN
        >>> layer = MetaBIN2d(4, rho_init=0.5).eval()
        >>> folded = FoldedMetaBIN.from_metabin(layer)
        >>> x = torch.randn(2, 4, 8, 8)
        >>> torch.allclose(folded(x), layer(x), atol=1e-6)
        True
    """

    def __init__(
        self,
        scale: Tensor,
        shift: Tensor,
        in_scale: Tensor,
        eps: float = 1e-5,
        instance_stats: Optional[bool] = None,
        batch_stats: bool = False,
        bn_scale: Optional[Tensor] = None,
        bn_shift: Optional[Tensor] = None,
    ) -> None:
        super().__init__()
        if scale.dim() != 1 or shift.shape != scale.shape or in_scale.shape != scale.shape:
            raise ValueError(
                "scale, shift and in_scale must be vectors of the same length (C,), got "
                f"{tuple(scale.shape)}, {tuple(shift.shape)}, {tuple(in_scale.shape)}"
            )
        self.num_features = int(scale.numel())
        self.eps = float(eps)
        self.batch_stats = bool(batch_stats)
        if instance_stats is None:
            instance_stats = bool((in_scale != 0).any()) or self.batch_stats
        if self.batch_stats and not instance_stats:
            raise ValueError("batch_stats=True needs instance_stats=True (batch statistics come from them)")
        if not instance_stats and bool((in_scale != 0).any()):
            raise ValueError("instance_stats=False needs in_scale == 0 in every channel")
        self.instance_stats = bool(instance_stats)
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("shift", shift.detach().clone())
        self.register_buffer("in_scale", in_scale.detach().clone())
        for name, value, default in (("bn_scale", bn_scale, scale), ("bn_shift", bn_shift, shift)):
            value = default if value is None else value
            if value.shape != scale.shape:
                raise ValueError(f"{name} must have the shape of scale {tuple(scale.shape)}, got {tuple(value.shape)}")
            self.register_buffer(name, value.detach().clone())

    @classmethod
    def from_metabin(cls, layer: _MetaBINBase) -> FoldedMetaBIN:
        """The folded form of an eval-mode MetaBIN layer (its current ``rho``, affines and buffers).

        Args:
            layer: a MetaBIN layer in eval mode.

        Returns:
            The ``FoldedMetaBIN`` computing the layer's eval-mode normalisation.

        Raises:
            ValueError: ``layer`` is in training mode (its output then uses batch statistics and
                updates the running ones: there is nothing fixed to fold).
        """
        return cls(**_folded_tensors(layer))

    def _fold(self, x: Tensor) -> Tensor:
        if not torch.jit.is_tracing() and (x.dim() < 2 or x.shape[1] != self.num_features):
            raise ValueError("FoldedMetaBIN: expected an input (N, C, *spatial) with C = num_features")
        squeeze = x.dim() == 2
        if squeeze:  # (N, C): one value per instance, as MetaBIN1d in eval mode
            x = x.unsqueeze(-1)
        xs = x if x.dtype == torch.float64 or x.dtype == torch.float32 else x.float()
        shape = [1, -1] + [1] * (xs.dim() - 2)
        scale = self.scale.view(shape)  # type: ignore[operator]
        shift = self.shift.view(shape)  # type: ignore[operator]
        in_scale = self.in_scale.view(shape)  # type: ignore[operator]
        if scale.dtype != xs.dtype:  # e.g. float32 coefficients, float64 input
            scale, shift, in_scale = scale.to(xs.dtype), shift.to(xs.dtype), in_scale.to(xs.dtype)
        if _single_value(xs):  # no instance statistics: the layer is its BatchNorm alone
            y = self._batch_norm_only(xs, shape).to(x.dtype)
            return y.squeeze(-1) if squeeze else y
        if self.instance_stats:
            # Exact two-pass statistics, as the fused eager path: m0 = mean(x), d = x - m0, then
            # mean(d) (the rounding residual: mu_nc = m0 + mean(d)) and mean(d^2). The affine map
            # is applied to d, so nothing is lost when |mu_nc| >> sigma_nc, where A * x + B with A
            # up to 1 / sqrt(eps) would amplify the rounding of mu_nc. (torch.var_mean computes the
            # same but runs ~10x slower on CPU.)
            dims = list(range(2, xs.dim()))
            m0 = xs.mean(dims, keepdim=True)
            d = xs - m0
            dm = d.mean(dims, keepdim=True)
            var = ((d * d).mean(dims, keepdim=True) - dm * dm).clamp_min(0.0)
            mu = m0 + dm
            if self.batch_stats:  # scale = rho w_B, shift = beta: the BN statistics of this batch
                _, var_b, dev = batch_stats(var, mu)
                scale = scale * torch.rsqrt(var_b + self.eps)
            else:  # scale = a_B, shift = beta - a_B mu_B: the BN term is a_B (x - 0) + shift
                dev = mu
            scale, shift = mix(scale, in_scale * torch.rsqrt(var + self.eps), shift, dev)
            shift = about(scale, shift, dm)  # y = scale * (x - mu) + shift = scale * d + shift'
            xs = d
        y = (xs * scale).add_(shift)  # (addcmul with two broadcast operands is 3x slower on CPU)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        if squeeze:
            y = y.squeeze(-1)
        return y

    def _batch_norm_only(self, xs: Tensor, shape: list[int]) -> Tensor:
        bn_scale = self.bn_scale.view(shape).to(xs.dtype)  # type: ignore[operator]
        bn_shift = self.bn_shift.view(shape).to(xs.dtype)  # type: ignore[operator]
        if self.batch_stats:  # batch statistics over the samples, as BatchNorm without running ones
            mu_b = xs.mean(0, keepdim=True)
            var_b = ((xs - mu_b) * (xs - mu_b)).mean(0, keepdim=True)
            return (xs - mu_b) * (bn_scale * torch.rsqrt(var_b + self.eps)) + bn_shift
        return xs * bn_scale + bn_shift

    def _normalize(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return self._fold(x)
        return self._eager_normalize(x)

    @torch.jit.unused
    def _eager_normalize(self, x: Tensor) -> Tensor:
        legacy_onnx = torch.onnx.is_in_onnx_export() and torch.jit.is_tracing()  # the TorchScript-based exporter
        if legacy_onnx and not self.batch_stats and not _single_value(x) and x.dtype == self.scale.dtype:
            # BatchNormalization (the affine: mean 0, variance 1, eps 0) + InstanceNormalization: the
            # map of _fold as two standard ONNX ops. The elementwise form's equal coefficient tensors
            # become Identity nodes there, which onnxruntime's EliminateIdentity rewrite breaks.
            ones = torch.ones_like(self.scale)  # type: ignore[arg-type]
            y = F.batch_norm(x, ones - 1, ones, self.scale, self.shift, False, 0.0, 0.0)  # type: ignore[arg-type]
            if self.instance_stats:
                y = y + F.instance_norm(x, weight=self.in_scale, eps=self.eps)  # type: ignore[arg-type]
            return y
        return self._fold(x)

    def forward(self, x: Tensor) -> Tensor:
        return self._normalize(x)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, instance_stats={self.instance_stats}, batch_stats={self.batch_stats}"


class FoldedMetaBINAct2d(FoldedMetaBIN):
    """``FoldedMetaBIN`` followed by ``drop`` and ``act``: the folded ``MetaBINAct2d``.

    ``drop`` and ``act`` are the layer's own modules (copied by ``fold_metabin_for_inference``
    unless ``inplace=True``).

    Args:
        scale: BN-branch scale, ``(C,)`` (see ``FoldedMetaBIN``).
        shift: shift, ``(C,)``.
        in_scale: weight of the normalised instance term, ``(C,)``.
        eps: the layer's eps.
        instance_stats: None (default) decides from ``in_scale``.
        batch_stats: the layer tracks no running statistics.
        drop: module applied after the normalization (default ``nn.Identity``).
        act: module applied last (default ``nn.Identity``).
        bn_scale: the BatchNorm alone, for single-value inputs (see ``FoldedMetaBIN``).
        bn_shift: the BatchNorm alone, for single-value inputs.

    Examples:
        >>> from metabin_layers.export import FoldedMetaBINAct2d
        >>> layer = MetaBINAct2d(4, act_layer=nn.ReLU, rho_init=0.5).eval()
        >>> folded = FoldedMetaBINAct2d.from_metabin(layer)
        >>> x = torch.randn(2, 4, 8, 8)
        >>> torch.allclose(folded(x), layer(x), atol=1e-6)
        True
    """

    def __init__(
        self,
        scale: Tensor,
        shift: Tensor,
        in_scale: Tensor,
        eps: float = 1e-5,
        instance_stats: Optional[bool] = None,
        batch_stats: bool = False,
        drop: Optional[nn.Module] = None,
        act: Optional[nn.Module] = None,
        bn_scale: Optional[Tensor] = None,
        bn_shift: Optional[Tensor] = None,
    ) -> None:
        super().__init__(scale, shift, in_scale, eps, instance_stats, batch_stats, bn_scale, bn_shift)
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    @classmethod
    def from_metabin(cls, layer: _MetaBINBase) -> FoldedMetaBINAct2d:
        """The folded form of an eval-mode ``MetaBINAct2d`` (sharing its ``drop`` and ``act``).

        Args:
            layer: a ``MetaBINAct2d`` in eval mode.

        Returns:
            The ``FoldedMetaBINAct2d`` computing the layer's eval-mode output.

        Raises:
            ValueError: ``layer`` is in training mode.
        """
        return cls(**_folded_tensors(layer), drop=getattr(layer, "drop", None), act=getattr(layer, "act", None))

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(self._normalize(x)))


@torch.no_grad()
def _folded_tensors(layer: _MetaBINBase, for_capture: bool = False) -> dict:
    """The coefficients of ``FoldedMetaBIN`` for ``layer``.

    ``for_capture``: computed in the statistics dtype (no float64 ops in an exported graph) and
    without any decision on their values (traced and exported graphs cannot branch on them).
    """
    if not isinstance(layer, _MetaBINBase):
        raise TypeError(f"expected a MetaBIN layer, got {type(layer).__name__}")
    if layer.training:
        raise ValueError(
            f"{type(layer).__name__} is in training mode: call model.eval() before folding (only the "
            "eval-mode output, with running statistics, is a fixed function that can be folded)"
        )
    rho_t = layer._rho_override if layer._rho_override is not None else layer.rho
    if not for_capture:  # a folded layer must compute what a valid layer computes: never fold a bad rho
        problem = rho_problem(rho_t)
        if problem is not None:
            raise ValueError(f"{layer._label()}: {problem}")
    sd = stat_dtype(layer.rho.dtype)
    cd = sd if for_capture else torch.float64  # coefficients in float64, stored in the statistics dtype
    rho = rho_t.detach().to(cd)
    ones, zeros = torch.ones_like(rho), torch.zeros_like(rho)
    w_b = layer.weight.detach().to(cd) if layer.weight is not None else ones
    b_b = layer.bias.detach().to(cd) if layer.bias is not None else zeros
    w_i = layer.in_weight.detach().to(cd) if layer.in_weight is not None else ones
    b_i = layer.in_bias.detach().to(cd) if layer.in_bias is not None else zeros
    no_running = layer.running_mean is None or layer.running_var is None
    # (bn_scale, bn_shift): the BatchNorm alone (rho = 1), for inputs with a single value per channel and sample
    if no_running:  # 1 / s_B and mu_B come from each batch: scale = rho w_B, shift = beta
        scale, in_scale, shift = branch_terms(rho, w_b, b_b, w_i, b_i, ones)
        bn_scale, _, bn_shift = branch_terms(ones, w_b, b_b, w_i, b_i, ones)
    else:  # scale = a_B, shift = beta - a_B mu_B
        inv_b = torch.rsqrt(layer.running_var.detach().to(cd) + layer.eps)  # type: ignore[union-attr]
        mean = layer.running_mean.detach().to(cd)  # type: ignore[union-attr]
        scale, in_scale, beta = branch_terms(rho, w_b, b_b, w_i, b_i, inv_b)
        shift = about(scale, beta, mean)
        bn_scale, _, bn_beta = branch_terms(ones, w_b, b_b, w_i, b_i, inv_b)
        bn_shift = about(bn_scale, bn_beta, mean)
    return {
        "scale": scale.to(sd),
        "shift": shift.to(sd),
        "in_scale": in_scale.to(sd),
        "eps": layer.eps,
        "instance_stats": True if for_capture else bool((in_scale != 0).any()) or no_running,
        "batch_stats": no_running,
        "bn_scale": bn_scale.to(sd),
        "bn_shift": bn_shift.to(sd),
    }


def _single_value(x: Tensor) -> bool:
    """True for inputs ``(N, C, *spatial)`` with spatial size 1 (and ``(N, C)``): no instance statistics."""
    if torch.jit.is_scripting():
        spatial = 1
        for size in x.shape[2:]:
            spatial *= size
        return spatial == 1
    return x.shape[2:].numel() == 1  # a Python int, also while tracing (no TracerWarning)


def folded_eval_forward(layer: _MetaBINBase, x: Tensor) -> Tensor:
    """The eval-mode output of ``layer`` (its normalisation, without ``drop`` / ``act``) as standard
    ops: a BatchNorm with the running statistics plus an InstanceNorm, with ``rho`` folded into
    their affines, ``BN(x; rho w_B, rho b_B) + IN(x; (1 - rho) w_I, (1 - rho) b_I)``.

    The eval-mode forward of a MetaBIN layer takes this path while a graph is being captured for
    export (``torch.onnx.export`` with either exporter, ``torch.export``, ``torch.jit.trace``), so
    ``torch.onnx.export(model.eval(), x)`` of a converted model gives ONNX ``BatchNormalization``
    and ``InstanceNormalization`` nodes, which every runtime knows (onnxruntime fuses the first into
    the preceding convolution). Layers without running statistics, inputs with a single value per
    instance (the layer is then its BatchNorm alone) and inputs of another dtype than the layer's
    use the ``FoldedMetaBIN`` formula.

    Args:
        layer: a MetaBIN layer (``MetaBIN1d`` / ``2d`` / ``3d``, ``MetaBINAct2d``, or a synchronised
            one); its ``rho`` (or the rho of a running meta step), affines and running statistics
            are used.
        x: the input ``(N, C, *spatial)``, as the layer takes it.

    Returns:
        The layer's eval-mode normalisation of ``x``, same shape and dtype.

    Examples:
        >>> from metabin_layers import MetaBIN2d
        >>> layer = MetaBIN2d(4, rho_init=0.5).eval()
        >>> x = torch.randn(2, 4, 8, 8)
        >>> torch.allclose(folded_eval_forward(layer, x), layer(x), atol=1e-5)
        True
    """
    rho = layer._rho_override if layer._rho_override is not None else layer.rho
    running_mean, running_var = layer.running_mean, layer.running_var
    if running_mean is None or running_var is None or x.dim() < 3 or math.prod(x.shape[2:]) < 2 or x.dtype != rho.dtype:
        return FoldedMetaBIN(**_folded_tensors(layer, for_capture=True))._fold(x)
    ones = torch.ones_like(rho)
    w_b = ones if layer.weight is None else layer.weight
    b_b = ones - 1 if layer.bias is None else layer.bias
    w_i = ones if layer.in_weight is None else layer.in_weight
    b_i = ones - 1 if layer.in_bias is None else layer.in_bias
    # BN(x; rho w_B, beta) + IN(x; (1 - rho) w_I, 0): a_B (x - mu_B) + beta + a_I (x - mu_nc)
    bn_weight, in_weight, beta = branch_terms(rho, w_b, b_b, w_i, b_i, ones)
    y = F.batch_norm(x, running_mean, running_var, bn_weight, beta, False, 0.0, layer.eps)
    return y + F.instance_norm(x, weight=in_weight, eps=layer.eps)


def _fold_one(layer: _MetaBINBase) -> FoldedMetaBIN:
    if isinstance(layer, MetaBINAct2d):
        return FoldedMetaBINAct2d.from_metabin(layer)
    return FoldedMetaBIN.from_metabin(layer)


def fold_metabin_for_inference(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Replace every MetaBIN layer of an eval-mode ``model`` by its ``FoldedMetaBIN`` form.

    The result computes what ``model`` computes in eval mode (up to rounding), with standard ops
    only: export it with ``torch.onnx.export``, script it with ``torch.jit.script``, or compile it
    (per-(n, c) statistics and one affine map per layer; layers with ``rho == 1`` in every channel
    become a pure per-channel affine). ``MetaBINAct2d`` becomes
    ``FoldedMetaBINAct2d``, keeping ``drop`` and ``act``. Each layer is folded with its
    current ``rho``, affines and running statistics: fold again after further training.

    Args:
        model: a model (or a single MetaBIN layer) in eval mode.
        inplace: replace the layers of ``model`` itself; by default a deep copy is folded and
            ``model`` is left untouched (it can go on training).

    Returns:
        The folded model (the copy, or ``model``; the new root when ``model`` is a MetaBIN layer).

    Raises:
        ValueError: ``model`` or one of its MetaBIN layers is in training mode, or a layer's rho
            lies outside [0, 1] or is not finite (the message names the layer's path).

    Examples:
        >>> import torchvision
        >>> from metabin_layers import convert_bn_to_metabin, metabin_modules
        >>> from metabin_layers.export import fold_metabin_for_inference
        >>> model = convert_bn_to_metabin(torchvision.models.resnet18(num_classes=10), rho_init=0.5)
        >>> model = model.eval()
        >>> folded = fold_metabin_for_inference(model)
        >>> x = torch.randn(2, 3, 128, 64)
        >>> torch.allclose(folded(x), model(x), atol=1e-5)
        True
        >>> len(metabin_modules(folded))
        0
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    training = [
        name or "<root>" for name, m in model.named_modules() if m.training and (m is model or isinstance(m, _MetaBINBase))
    ]
    if training:
        shown = ", ".join(training[:5]) + (f" and {len(training) - 5} more" if len(training) > 5 else "")
        raise ValueError(
            f"fold_metabin_for_inference needs a model in eval mode; in training mode: {shown}. "
            "Call model.eval() first (folding uses the running statistics)"
        )
    check_rho(model)  # names the layer whose rho is outside [0, 1] or not finite
    if not inplace:
        model = copy.deepcopy(model)

    return replace_modules(model, lambda _, mod: _fold_one(mod) if isinstance(mod, _MetaBINBase) else None)
