"""Per-sample gradient norms for convolutions and normalisation layers, for Opacus ghost clipping.

Opacus 1.6 computes per-sample gradient *norms* without per-sample gradients ("ghost clipping")
only for ``nn.Linear`` and ``nn.Embedding``. Every other trainable layer falls back to
materialising a ``batch x parameter-size`` per-sample gradient, which for a 512x512x3x3
convolution and a batch of 64 is 600 MB. This module registers norm samplers (Opacus'
``register_norm_sampler`` registry) for:

* ``nn.Conv1d`` / ``nn.Conv2d``: any stride, padding (including ``"same"`` and non-zero padding
  modes), dilation and groups (depthwise included), with or without bias;
* ``nn.LayerNorm``, torchvision's ``LayerNorm2d`` (ConvNeXt) and ``nn.GroupNorm``.

Convolution norms (mixed ghost clipping, Bu et al. 2022). For one sample and one group, let
``A`` be the unfolded input (``T`` output positions x ``d`` = in-channels-per-group x kernel
taps) and ``B`` the output gradient (``T`` x ``p`` out-channels-per-group). The weight gradient
is ``B^T A`` and its squared Frobenius norm equals ``sum_{t,s} (A A^T)_{ts} (B B^T)_{ts}``:

* ghost: two ``T x T`` Gram matrices, cost ``T^2 (d + p)``, memory ``T^2``;
* materialise: ``B^T A`` itself, cost ``T d p``, memory ``d p``.

Each call picks whichever costs fewer multiply-adds for that layer and input size (late,
spatially small layers go ghost; early, spatially large or depthwise layers materialise), and
processes the batch in chunks so that neither path holds more than
``MAX_CHUNK_ELEMENTS`` floats at once.

Normalisation layers have per-sample gradients the size of one channel vector, so their norm
samplers materialise them (that is already the cheap side); registering them keeps the layers
off Opacus' slower functorch fallback (``LayerNorm2d`` has no Opacus grad sampler at all).

Importing this module registers the samplers; ``register_conv_norm_samplers()`` does it again
(idempotent) for callers that want the dependency to be explicit.
"""

from __future__ import annotations

import logging
import math
from typing import Literal, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from opacus.grad_sample import register_norm_sampler
from torchvision.models.convnext import LayerNorm2d

logger = logging.getLogger(__name__)

NormMethod = Literal["auto", "ghost", "materialise"]
NormSamples = dict[nn.Parameter, torch.Tensor]

MAX_CHUNK_ELEMENTS: int = 2**25
"""Upper bound on the floats one chunk of the batch may allocate for Gram matrices or
per-sample gradients (2^25 float32 = 128 MiB)."""

_SUPPORTED_CONVS: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d)


# --------------------------------------------------------------------------------------------
# Convolutions
# --------------------------------------------------------------------------------------------


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float64 stays float64; everything else (fp16, bf16 under autocast) is summed in float32."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def unfold_conv_input(layer: nn.Conv1d | nn.Conv2d, inputs: torch.Tensor) -> torch.Tensor:
    """Unfold a convolution's input into patches, padded exactly as ``layer.forward`` pads.

    Args:
        layer: the convolution whose forward received ``inputs``.
        inputs: the layer input, ``(n, C_in, L)`` for Conv1d or ``(n, C_in, H, W)`` for Conv2d.

    Returns:
        ``(n, C_in * prod(kernel_size), T)`` with channels slowest, so that the rows of one
        group (``C_in / groups`` consecutive channels) are contiguous. ``T`` is the number of
        output positions.
    """
    if not isinstance(layer, _SUPPORTED_CONVS):
        raise TypeError(
            f"unfold_conv_input: got a {type(layer).__name__}; only nn.Conv1d and nn.Conv2d "
            "are supported here"
        )
    # _reversed_padding_repeated_twice is what nn.Conv uses for non-zero padding modes and
    # for padding="same" (possibly asymmetric); it is all zeros for padding="valid".
    pad = list(layer._reversed_padding_repeated_twice)
    if any(pad):
        mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
        inputs = F.pad(inputs, pad, mode=mode)
    if isinstance(layer, nn.Conv1d):
        inputs = inputs.unsqueeze(2)
        kernel = (1, *layer.kernel_size)
        stride, dilation = (1, *layer.stride), (1, *layer.dilation)
    else:
        kernel, stride, dilation = layer.kernel_size, layer.stride, layer.dilation
    return F.unfold(inputs, kernel_size=kernel, dilation=dilation, stride=stride)


def conv_norm_costs(layer: nn.Conv1d | nn.Conv2d, positions: int) -> tuple[int, int]:
    """Multiply-adds per sample of (ghost, materialise) for the weight-gradient norm.

    Args:
        layer: the convolution.
        positions: ``T``, the number of output positions of one sample.
    """
    groups = layer.groups
    d = layer.in_channels // groups * math.prod(layer.kernel_size)
    p = layer.out_channels // groups
    ghost = groups * positions * positions * (d + p)
    materialise = groups * positions * d * p
    return ghost, materialise


def choose_conv_norm_method(
    layer: nn.Conv1d | nn.Conv2d, positions: int
) -> Literal["ghost", "materialise"]:
    """The cheaper way to get this layer's per-sample weight-gradient norm at ``positions`` outputs."""
    ghost, materialise = conv_norm_costs(layer, positions)
    return "ghost" if ghost < materialise else "materialise"


def _chunks(n: int, per_sample_elements: int) -> list[slice]:
    step = max(1, MAX_CHUNK_ELEMENTS // max(1, per_sample_elements))
    return [slice(start, min(n, start + step)) for start in range(0, n, step)]


def _weight_sq_norms_ghost(patches: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Squared weight-gradient norms via Gram matrices.

    Args:
        patches: ``(n, G, d, T)`` unfolded input per group.
        grads: ``(n, G, p, T)`` output gradient per group.
    """
    n, groups, _, positions = patches.shape
    out = patches.new_empty(n)
    for part in _chunks(n, 3 * groups * positions * positions):
        a, b = patches[part], grads[part]
        gram_a = a.transpose(-1, -2) @ a  # (c, G, T, T)
        gram_b = b.transpose(-1, -2) @ b
        out[part] = (gram_a * gram_b).sum(dim=(1, 2, 3))
    return out


def _weight_sq_norms_materialised(patches: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Squared weight-gradient norms by forming each sample's ``(G, p, d)`` gradient."""
    n, groups, d, _ = patches.shape
    p = grads.shape[2]
    out = patches.new_empty(n)
    for part in _chunks(n, groups * d * p):
        per_sample = grads[part] @ patches[part].transpose(-1, -2)  # (c, G, p, d)
        out[part] = per_sample.square().sum(dim=(1, 2, 3))
    return out


def conv_norm_sample(
    layer: nn.Conv1d | nn.Conv2d,
    activations: Sequence[torch.Tensor],
    backprops: torch.Tensor,
    method: NormMethod = "auto",
) -> NormSamples:
    """Per-sample gradient norms of a convolution's trainable weight and bias.

    Args:
        layer: the convolution (Conv1d or Conv2d, any stride/padding/dilation/groups).
        activations: Opacus' captured forward inputs; ``activations[0]`` is the layer input.
        backprops: gradient of the (per-sample summed) loss w.r.t. the layer output,
            ``(n, C_out, *spatial_out)``, batch first (Opacus has already rescaled it for the
            loss reduction).
        method: ``"auto"`` picks the cheaper of ``"ghost"`` and ``"materialise"`` for this
            call; the explicit values exist for tests and benchmarks.

    Returns:
        ``{param: (n,) tensor of L2 norms}`` for each of weight/bias that requires grad.
    """
    inputs = activations[0]
    n = inputs.shape[0]
    dtype = _compute_dtype(backprops)
    result: NormSamples = {}
    grads = backprops.flatten(2).to(dtype)  # (n, C_out, T)
    grads = grads.reshape(n, layer.groups, layer.out_channels // layer.groups, grads.shape[-1])

    if layer.weight.requires_grad:
        if n == 0:
            result[layer.weight] = backprops.new_zeros(0, dtype=dtype)
        else:
            patches = unfold_conv_input(layer, inputs.to(dtype))
            positions = patches.shape[-1]
            if positions != grads.shape[-1]:
                raise RuntimeError(
                    f"conv_norm_sample: {layer} produced {grads.shape[-1]} output positions "
                    f"but its unfolded input has {positions}; report this layer configuration"
                )
            patches = patches.reshape(n, layer.groups, -1, positions)
            chosen = choose_conv_norm_method(layer, positions) if method == "auto" else method
            if chosen == "ghost":
                sq = _weight_sq_norms_ghost(patches, grads)
            elif chosen == "materialise":
                sq = _weight_sq_norms_materialised(patches, grads)
            else:
                raise ValueError(
                    f"conv_norm_sample: method must be 'auto', 'ghost' or 'materialise', got {method!r}"
                )
            result[layer.weight] = sq.clamp(min=0).sqrt()

    if layer.bias is not None and layer.bias.requires_grad:
        result[layer.bias] = grads.sum(dim=-1).flatten(1).norm(2, dim=1)
    return result


# --------------------------------------------------------------------------------------------
# Normalisation layers (per-sample gradients are one vector per channel: materialise them)
# --------------------------------------------------------------------------------------------


def _affine_norms(
    layer: nn.Module, normalised: torch.Tensor, grads: torch.Tensor, reduce_dims: tuple[int, ...]
) -> NormSamples:
    """Norms of ``weight`` (= sum of normalised * grads) and ``bias`` (= sum of grads) per sample."""
    result: NormSamples = {}
    weight, bias = getattr(layer, "weight", None), getattr(layer, "bias", None)
    if weight is not None and weight.requires_grad:
        per_sample = (normalised * grads).sum(dim=reduce_dims) if reduce_dims else normalised * grads
        result[weight] = per_sample.flatten(1).norm(2, dim=1)
    if bias is not None and bias.requires_grad:
        per_sample = grads.sum(dim=reduce_dims) if reduce_dims else grads
        result[bias] = per_sample.flatten(1).norm(2, dim=1)
    return result


def layer_norm_norm_sample(
    layer: nn.LayerNorm, activations: Sequence[torch.Tensor], backprops: torch.Tensor
) -> NormSamples:
    """Per-sample gradient norms of ``nn.LayerNorm`` (input ``(n, ..., *normalized_shape)``).

    Args:
        layer: the LayerNorm.
        activations: Opacus' captured inputs; ``activations[0]`` is the layer input.
        backprops: gradient w.r.t. the layer output, same shape as the input.
    """
    dtype = _compute_dtype(backprops)
    inputs, grads = activations[0].to(dtype), backprops.to(dtype)
    normalised = F.layer_norm(inputs, layer.normalized_shape, eps=layer.eps)
    reduce_dims = tuple(range(1, inputs.dim() - len(layer.normalized_shape)))
    return _affine_norms(layer, normalised, grads, reduce_dims)


def layer_norm_2d_norm_sample(
    layer: LayerNorm2d, activations: Sequence[torch.Tensor], backprops: torch.Tensor
) -> NormSamples:
    """Per-sample gradient norms of torchvision's channels-first ``LayerNorm2d`` (``(n, C, H, W)``)."""
    dtype = _compute_dtype(backprops)
    inputs, grads = activations[0].to(dtype), backprops.to(dtype)
    normalised = F.layer_norm(inputs.permute(0, 2, 3, 1), layer.normalized_shape, eps=layer.eps)
    return _affine_norms(layer, normalised.permute(0, 3, 1, 2), grads, (2, 3))


def group_norm_norm_sample(
    layer: nn.GroupNorm, activations: Sequence[torch.Tensor], backprops: torch.Tensor
) -> NormSamples:
    """Per-sample gradient norms of ``nn.GroupNorm`` (input ``(n, C, *spatial)``)."""
    dtype = _compute_dtype(backprops)
    inputs, grads = activations[0].to(dtype), backprops.to(dtype)
    normalised = F.group_norm(inputs, layer.num_groups, eps=layer.eps)
    return _affine_norms(layer, normalised, grads, tuple(range(2, inputs.dim())))


# --------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------


def register_conv_norm_samplers() -> None:
    """Register this module's norm samplers in Opacus' ghost-clipping registry (idempotent).

    Afterwards ``GradSampleModuleFastGradientClipping.NORM_SAMPLERS`` maps Conv1d, Conv2d,
    LayerNorm, LayerNorm2d and GroupNorm to the functions above, so
    ``make_private(..., grad_sample_mode="ghost")`` never materialises their per-sample gradients
    unless that is the cheaper side.
    """
    register_norm_sampler(list(_SUPPORTED_CONVS))(conv_norm_sample)
    register_norm_sampler(nn.LayerNorm)(layer_norm_norm_sample)
    register_norm_sampler(LayerNorm2d)(layer_norm_2d_norm_sample)
    register_norm_sampler(nn.GroupNorm)(group_norm_norm_sample)
    logger.debug(
        "registered ghost-clipping norm samplers for Conv1d, Conv2d, LayerNorm, LayerNorm2d, GroupNorm"
    )


register_conv_norm_samplers()
