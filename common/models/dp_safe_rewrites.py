"""Rewrites that make a torchvision model sound and crash-free under DP-SGD (Opacus).

:func:`make_opacus_safe` rewrites a freshly built torchvision model in place:

* every ``BatchNorm2d`` becomes a ``torchvision.ops.misc.FrozenBatchNorm2d`` with the same
  statistics (it never mixes samples, even after ``model.train()``), followed by a per-channel
  scale/shift adapter that starts as the identity
  (:class:`~common.models.opacus_compat.AdaptableFrozenBatchNorm2d`);
* every ``inplace=True`` activation / dropout is switched to out-of-place;
* residual blocks that add the shortcut in place (ResNet ``BasicBlock``/``Bottleneck``,
  EfficientNet ``MBConv``/``FusedMBConv``, MobileNetV3 ``InvertedResidual``, ConvNeXt
  ``CNBlock``) get an out-of-place forward (the instance's class is swapped for a subclass);
* ConvNeXt's raw ``layer_scale`` parameter moves into a :class:`~common.models.opacus_compat.LayerScale`
  module, and ViT's ``nn.MultiheadAttention`` becomes an Opacus ``DPMultiheadAttention``
  (:class:`~common.models.opacus_compat.BatchFirstDPMultiheadAttention`) with the same weights.

A new architecture whose residual block adds in place registers its out-of-place subclass in
``_OUT_OF_PLACE``; everything else about an architecture is in :mod:`common.models.backbone_families`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from opacus.layers import DPMultiheadAttention
from torch import Tensor, nn
from torchvision.models.convnext import CNBlock
from torchvision.models.efficientnet import FusedMBConv, MBConv
from torchvision.models.mobilenetv3 import InvertedResidual
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops.misc import FrozenBatchNorm2d, Permute

from common.models.opacus_compat import AdaptableFrozenBatchNorm2d, BatchFirstDPMultiheadAttention, LayerScale

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Residual blocks with an out-of-place shortcut addition
# ---------------------------------------------------------------------------------------------


class OutOfPlaceBasicBlock(BasicBlock):
    """ResNet ``BasicBlock`` whose shortcut is added out of place (Opacus hooks need the output intact)."""

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + shortcut)


class OutOfPlaceBottleneck(Bottleneck):
    """ResNet ``Bottleneck`` with an out-of-place shortcut addition."""

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + shortcut)


class OutOfPlaceMBConv(MBConv):
    """EfficientNet ``MBConv`` with an out-of-place shortcut addition."""

    def forward(self, x: Tensor) -> Tensor:
        out = self.block(x)
        if self.use_res_connect:
            out = self.stochastic_depth(out) + x
        return out


class OutOfPlaceFusedMBConv(FusedMBConv):
    """EfficientNetV2 ``FusedMBConv`` with an out-of-place shortcut addition."""

    def forward(self, x: Tensor) -> Tensor:
        out = self.block(x)
        if self.use_res_connect:
            out = self.stochastic_depth(out) + x
        return out


class OutOfPlaceInvertedResidual(InvertedResidual):
    """MobileNetV3 ``InvertedResidual`` with an out-of-place shortcut addition."""

    def forward(self, x: Tensor) -> Tensor:
        out = self.block(x)
        return out + x if self.use_res_connect else out


class OutOfPlaceCNBlock(CNBlock):
    """ConvNeXt ``CNBlock`` made DP-friendly, same parameters and names.

    ``layer_scale`` is a :class:`LayerScale` module, the shortcut is added out of place, and the
    norm + MLP run on ``(N, H*W, C)`` tokens instead of ``(N, H, W, C)`` maps (same values):
    Opacus' ghost-clipping norm sampler for ``nn.Linear`` handles 2-D and 3-D inputs only and
    silently returns nothing for 4-D ones.
    """

    def forward(self, x: Tensor) -> Tensor:
        depthwise, norm, expand, activation, project = (m for m in self.block if not isinstance(m, Permute))
        y = depthwise(x)
        batch, channels, height, width = y.shape
        tokens = y.flatten(2).transpose(1, 2)
        tokens = project(activation(expand(norm(tokens))))
        y = tokens.transpose(1, 2).reshape(batch, channels, height, width)
        return self.stochastic_depth(self.layer_scale(y)) + x


_OUT_OF_PLACE: dict[type[nn.Module], type[nn.Module]] = {
    BasicBlock: OutOfPlaceBasicBlock,
    Bottleneck: OutOfPlaceBottleneck,
    MBConv: OutOfPlaceMBConv,
    FusedMBConv: OutOfPlaceFusedMBConv,
    InvertedResidual: OutOfPlaceInvertedResidual,
    CNBlock: OutOfPlaceCNBlock,
}


# ---------------------------------------------------------------------------------------------
# Rewrites
# ---------------------------------------------------------------------------------------------


def _replace_children(root: nn.Module, replace: Callable[[nn.Module], nn.Module | None]) -> int:
    """Replace every descendant ``m`` for which ``replace(m)`` returns a module; return the count."""
    count = 0
    for parent in list(root.modules()):
        for child_name, child in list(parent.named_children()):
            new_child = replace(child)
            if new_child is not None:
                setattr(parent, child_name, new_child)
                count += 1
    return count


def frozen_batch_norm(module: nn.Module) -> FrozenBatchNorm2d | None:
    """A ``FrozenBatchNorm2d`` with ``module``'s statistics and affine values, or None if not a BatchNorm2d."""
    if not isinstance(module, nn.modules.batchnorm._BatchNorm):
        return None
    if not isinstance(module, nn.BatchNorm2d):
        raise TypeError(f"cannot freeze {type(module).__name__}: only BatchNorm2d is supported")
    if module.running_mean is None or module.running_var is None:
        raise TypeError("cannot freeze a BatchNorm2d without running statistics (track_running_stats=False)")
    frozen = AdaptableFrozenBatchNorm2d(module.num_features, eps=module.eps)
    with torch.no_grad():
        if module.weight is not None:
            frozen.weight.copy_(module.weight)
        if module.bias is not None:
            frozen.bias.copy_(module.bias)
        frozen.running_mean.copy_(module.running_mean)
        frozen.running_var.copy_(module.running_var)
    return frozen


def dp_multihead_attention(module: nn.Module) -> DPMultiheadAttention | None:
    """An Opacus-compatible copy of ``nn.MultiheadAttention`` ``module`` (None for any other module)."""
    if not isinstance(module, nn.MultiheadAttention):
        return None
    has_bias = module.in_proj_bias is not None
    if module.batch_first:
        plain = module.bias_k is None and not module.add_zero_attn and module._qkv_same_embed_dim
        if not plain:
            raise TypeError("batch-first attention with bias_kv, zero_attn or distinct k/v sizes is not supported")
        replacement: DPMultiheadAttention = BatchFirstDPMultiheadAttention(
            module.embed_dim, module.num_heads, dropout=module.dropout, bias=has_bias
        )
    else:
        replacement = DPMultiheadAttention(
            embed_dim=module.embed_dim,
            num_heads=module.num_heads,
            dropout=module.dropout,
            bias=has_bias,
            add_bias_kv=module.bias_k is not None,
            add_zero_attn=module.add_zero_attn,
            kdim=module.kdim,
            vdim=module.vdim,
        )
    replacement.load_state_dict(dict(module.state_dict()))
    return replacement


def make_opacus_safe(model: nn.Module) -> nn.Module:
    """Rewrite ``model`` in place so that DP-SGD with Opacus is sound and does not crash (see module doc)."""
    frozen = _replace_children(model, frozen_batch_norm)
    attention = _replace_children(model, dp_multihead_attention)
    swapped = 0
    for module in model.modules():
        replacement = _OUT_OF_PLACE.get(type(module))
        if replacement is not None:
            if isinstance(module, CNBlock):
                layout = [type(m) for m in module.block]
                if layout != [nn.Conv2d, Permute, nn.LayerNorm, nn.Linear, nn.GELU, nn.Linear, Permute]:
                    raise TypeError(f"unexpected ConvNeXt block layout {[t.__name__ for t in layout]}")
                scale = module.layer_scale.detach()
                del module.layer_scale
                module.layer_scale = LayerScale(scale)
            module.__class__ = replacement
            swapped += 1
    inplace = 0
    for module in model.modules():
        if getattr(module, "inplace", None) is True:
            module.inplace = False
            inplace += 1
    logger.debug(
        "opacus-safe rewrite: %d BatchNorm frozen, %d attention replaced, %d residual blocks, %d in-place ops",
        frozen, attention, swapped, inplace,
    )
    return model
