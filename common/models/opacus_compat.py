"""DP-compatible building blocks and the Opacus rules that make them trainable under DP-SGD.

Opacus computes per-sample gradients layer by layer from a registry that maps a layer type to a
rule (``opacus.grad_sample.register_grad_sampler`` for hooks mode, ``register_norm_sampler`` for
ghost clipping). A raw ``nn.Parameter`` that sits directly on a composite block (ConvNeXt's
``CNBlock.layer_scale``) has no rule, so this module gives it a tiny layer of its own,
:class:`LayerScale`, together with both rules. It also registers a hooks-mode grad sampler for
torchvision's ``LayerNorm2d`` (Opacus only knows ``nn.LayerNorm``), and provides
:class:`BatchFirstDPMultiheadAttention`: Opacus 1.6's ``DPMultiheadAttention`` scrambles heads
and positions when ``batch_first=True`` (it views ``(N*H, L, D)`` as ``(N, L, H*D)`` without
transposing; meta-pytorch/opacus PR #825), so ViT blocks use this corrected subclass.

Importing this module registers everything here and the ghost-clipping norm samplers for
convolutions and normalisation layers in :mod:`common.models.conv_norm_samplers`.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from opacus.grad_sample import register_grad_sampler, register_norm_sampler
from opacus.layers import DPMultiheadAttention
from torch import Tensor, nn
from torchvision.models.convnext import LayerNorm2d
from torchvision.ops.misc import FrozenBatchNorm2d

import common.models.conv_norm_samplers  # noqa: F401  (registers conv / norm ghost-clipping samplers)

logger = logging.getLogger(__name__)


class LayerScale(nn.Module):
    """Per-channel learnable scale of a ``(N, C, H, W)`` map: ``x * scale`` with ``scale`` of shape ``(C, 1, 1)``.

    Args:
        scale: initial values, shape ``(C, 1, 1)`` (copied).
    """

    def __init__(self, scale: Tensor) -> None:
        super().__init__()
        if scale.dim() != 3 or scale.shape[1:] != (1, 1):
            raise ValueError(f"LayerScale expects a (C, 1, 1) tensor, got shape {tuple(scale.shape)}")
        self.scale = nn.Parameter(scale.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale

    def extra_repr(self) -> str:
        return f"channels={self.scale.shape[0]}"


class ChannelAffine(nn.Module):
    """Per-channel scale and shift of a ``(N, C, H, W)`` map: ``x * scale + shift``, starting as the identity.

    It sits inside every frozen BatchNorm (:class:`AdaptableFrozenBatchNorm2d`) so that a block can
    be adapted by ``2 C`` values per norm instead of its convolutions (``training.shared_trainable =
    "scale_shift"``): under DP, fewer trainable values means less noise for the same privacy.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(channels))
        self.shift = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale[None, :, None, None] + self.shift[None, :, None, None]

    def extra_repr(self) -> str:
        return f"channels={self.scale.shape[0]}"


ADAPTER_SUFFIXES = (".adapter.scale", ".adapter.shift")
"""How the state-dict keys of the BatchNorm adapters end (``stages.layer4.1.bn1.adapter.scale``)."""


class AdaptableFrozenBatchNorm2d(FrozenBatchNorm2d):
    """torchvision's ``FrozenBatchNorm2d`` (statistics and affine values are buffers, never trained) followed
    by a :class:`ChannelAffine` child ``adapter`` (identity until trained). The state-dict keys of the
    BatchNorm itself are unchanged (``bn1.weight``, ``bn1.running_mean``...), so pretrained weights load
    as before; the adapter adds ``bn1.adapter.scale`` and ``bn1.adapter.shift``."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__(num_features, eps=eps)
        self.adapter = ChannelAffine(num_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.adapter(super().forward(x))


class BatchFirstDPMultiheadAttention(DPMultiheadAttention):
    """``DPMultiheadAttention`` (``batch_first=True``) with a correct head merge.

    Same parameters and state-dict names as Opacus' layer (``qlinear``, ``klinear``,
    ``vlinear``, ``out_proj``); every Linear sees batch-first ``(N, L, E)`` inputs, so Opacus'
    per-sample gradient hooks apply unchanged. Supports self- and cross-attention without
    masks (what a ViT encoder needs); masks, ``add_bias_kv`` and ``add_zero_attn`` are refused.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias, batch_first=True)

    def forward(  # type: ignore[override]
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        if key_padding_mask is not None or attn_mask is not None or is_causal:
            raise NotImplementedError("BatchFirstDPMultiheadAttention does not support attention masks")
        batch, target_len, embed_dim = query.shape
        source_len = key.shape[1]
        heads, head_dim = self.num_heads, embed_dim // self.num_heads
        q = (self.qlinear(query) * head_dim**-0.5).view(batch, target_len, heads, head_dim).transpose(1, 2)
        k = self.klinear(key).view(batch, source_len, heads, head_dim).transpose(1, 2)
        v = self.vlinear(value).view(batch, source_len, heads, head_dim).transpose(1, 2)
        weights = self.dropout(torch.softmax(q @ k.transpose(-2, -1), dim=-1))
        merged = (weights @ v).transpose(1, 2).reshape(batch, target_len, embed_dim)
        return self.out_proj(merged), (weights.mean(dim=1) if need_weights else None)


def layer_scale_grad_sample(
    layer: LayerScale, activations: list[Tensor], backprops: Tensor
) -> dict[nn.Parameter, Tensor]:
    """Per-sample gradient of ``LayerScale.scale``: sum over space of input x output-gradient, ``(N, C, 1, 1)``."""
    if not layer.scale.requires_grad:
        return {}
    inputs = activations[0].to(backprops.dtype)
    return {layer.scale: (inputs * backprops).sum(dim=(2, 3), keepdim=True)}


def layer_scale_norm_sample(
    layer: LayerScale, activations: list[Tensor], backprops: Tensor
) -> dict[nn.Parameter, Tensor]:
    """Per-sample gradient norm of ``LayerScale.scale`` (the gradient is one channel vector, so materialise it)."""
    return {
        param: grad.flatten(start_dim=1).norm(2, dim=1)
        for param, grad in layer_scale_grad_sample(layer, activations, backprops).items()
    }


def channel_affine_grad_sample(
    layer: ChannelAffine, activations: list[Tensor], backprops: Tensor
) -> dict[nn.Parameter, Tensor]:
    """Per-sample gradients of ``ChannelAffine``: scale = sum over space of input x output-gradient, shift = sum
    of the output gradient; each ``(N, C)``."""
    grads: dict[nn.Parameter, Tensor] = {}
    if layer.scale.requires_grad:
        grads[layer.scale] = (activations[0].to(backprops.dtype) * backprops).sum(dim=(2, 3))
    if layer.shift.requires_grad:
        grads[layer.shift] = backprops.sum(dim=(2, 3))
    return grads


def channel_affine_norm_sample(
    layer: ChannelAffine, activations: list[Tensor], backprops: Tensor
) -> dict[nn.Parameter, Tensor]:
    """Per-sample gradient norms of ``ChannelAffine`` (one channel vector per sample: materialised)."""
    return {param: grad.norm(2, dim=1)
            for param, grad in channel_affine_grad_sample(layer, activations, backprops).items()}


def layer_norm_2d_grad_sample(
    layer: LayerNorm2d, activations: list[Tensor], backprops: Tensor
) -> dict[nn.Parameter, Tensor]:
    """Per-sample gradients of a channels-first ``LayerNorm2d`` (normalises over C at every pixel)."""
    inputs = activations[0].to(backprops.dtype)
    grads: dict[nn.Parameter, Tensor] = {}
    if layer.weight is not None and layer.weight.requires_grad:
        normalised = F.layer_norm(inputs.permute(0, 2, 3, 1), layer.normalized_shape, eps=layer.eps)
        grads[layer.weight] = (normalised.permute(0, 3, 1, 2) * backprops).sum(dim=(2, 3))
    if layer.bias is not None and layer.bias.requires_grad:
        grads[layer.bias] = backprops.sum(dim=(2, 3))
    return grads


def register_opacus_rules() -> None:
    """Register this module's grad and norm samplers with Opacus (idempotent; done on import)."""
    register_grad_sampler(LayerScale)(layer_scale_grad_sample)
    register_norm_sampler(LayerScale)(layer_scale_norm_sample)
    register_grad_sampler(ChannelAffine)(channel_affine_grad_sample)
    register_norm_sampler(ChannelAffine)(channel_affine_norm_sample)
    register_grad_sampler(LayerNorm2d)(layer_norm_2d_grad_sample)
    logger.debug("registered Opacus rules for LayerScale, ChannelAffine and LayerNorm2d")


register_opacus_rules()

__all__ = [
    "BatchFirstDPMultiheadAttention",
    "LayerScale",
    "layer_norm_2d_grad_sample",
    "layer_scale_grad_sample",
    "layer_scale_norm_sample",
    "register_opacus_rules",
]
