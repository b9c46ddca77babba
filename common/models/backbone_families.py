"""Turning a torchvision model into DP-safe named stages, one recipe per architecture family.

A recipe takes a freshly built (and possibly weight-loaded) torchvision model and returns
:class:`TrunkParts`: the ordered stages of the image trunk, the pooling, an optional final
norm and the pooled feature size. Before splitting, :func:`common.models.dp_safe_rewrites.make_opacus_safe` rewrites the model so
that DP-SGD is sound and does not crash (frozen BatchNorm, out-of-place residual adds, Opacus attention).

The first convolution is folded to one input channel (filters summed over RGB) when asked.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.models.vision_transformer import EncoderBlock

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Parameter-free building blocks
# ---------------------------------------------------------------------------------------------


class GlobalAveragePool(nn.Module):
    """``(N, C, H, W) -> (N, C)``: mean over the spatial positions."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=(2, 3))


class ClassTokenPool(nn.Module):
    """``(N, L, D) -> (N, D)``: the class token (position 0) of a token sequence."""

    def forward(self, x: Tensor) -> Tensor:
        return x[:, 0]


class PatchEmbedding(nn.Module):
    """ViT input stage: patchify with ``conv_proj``, prepend the class token, add position embeddings.

    Args:
        conv_proj: the patch projection (kernel = stride = ``patch_size``).
        class_token: ``(1, 1, D)`` learnable class token.
        pos_embedding: ``(1, 1 + (image_size / patch_size)^2, D)`` position embeddings.
        dropout: dropout probability applied after adding position embeddings.
        image_size: square input side this embedding was made for.
        patch_size: side of one patch.
    """

    def __init__(
        self,
        conv_proj: nn.Conv2d,
        class_token: Tensor,
        pos_embedding: Tensor,
        dropout: float,
        image_size: int,
        patch_size: int,
    ) -> None:
        super().__init__()
        self.conv_proj = conv_proj
        self.class_token = nn.Parameter(class_token.detach().clone())
        self.pos_embedding = nn.Parameter(pos_embedding.detach().clone())
        self.dropout = nn.Dropout(dropout)
        self.image_size = image_size
        self.patch_size = patch_size

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"this ViT was built for {self.image_size}x{self.image_size} images, got "
                f"{tuple(x.shape[-2:])}; resize the images or set [model] image_size"
            )
        tokens = self.conv_proj(x).flatten(2).transpose(1, 2)
        class_tokens = self.class_token.expand(x.shape[0], -1, -1)
        return self.dropout(torch.cat([class_tokens, tokens], dim=1) + self.pos_embedding)


def fold_first_conv_to_gray(conv: nn.Conv2d) -> nn.Conv2d:
    """A 1-input-channel copy of ``conv`` whose filters are the sum of the RGB filters.

    A gray image ``g`` through the folded conv equals ``[g, g, g]`` through the original.
    """
    if conv.in_channels != 3 or conv.groups != 1:
        raise ValueError(f"can only fold a 3-channel, ungrouped first convolution, got {conv}")
    folded = nn.Conv2d(
        1,
        conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )
    with torch.no_grad():
        folded.weight.copy_(conv.weight.sum(dim=1, keepdim=True))
        if conv.bias is not None:
            folded.bias.copy_(conv.bias)
    return folded


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


# ---------------------------------------------------------------------------------------------
# Family recipes
# ---------------------------------------------------------------------------------------------


@dataclass
class TrunkParts:
    """What a family recipe extracts from a torchvision model.

    Attributes:
        stages: ordered (name, module) stages of the image trunk.
        pool: maps the last stage's output to ``(N, feature_dim)``.
        norm: optional final norm applied to the pooled features (part of the local head).
        feature_dim: pooled image feature size.
        dropout: dropout probability before the classifier (0 = none).
    """

    stages: list[tuple[str, nn.Module]]
    pool: nn.Module
    norm: nn.Module | None
    feature_dim: int
    dropout: float = 0.0


def _resnet_parts(model: nn.Module) -> TrunkParts:
    stem = nn.Sequential(
        OrderedDict(conv1=model.conv1, bn1=model.bn1, relu=model.relu, maxpool=model.maxpool)
    )
    stages = [("stem", stem)] + [(f"layer{i}", getattr(model, f"layer{i}")) for i in range(1, 5)]
    return TrunkParts(stages, GlobalAveragePool(), None, model.fc.in_features)


def _densenet_parts(model: nn.Module) -> TrunkParts:
    f = model.features
    stem = nn.Sequential(OrderedDict(conv0=f.conv0, norm0=f.norm0, relu0=f.relu0, pool0=f.pool0))
    stages: list[tuple[str, nn.Module]] = [("stem", stem)]
    for name, child in f.named_children():
        if name.startswith(("denseblock", "transition")):
            stages.append((name, child))
    stages.append(("norm5", nn.Sequential(OrderedDict(norm=f.norm5, relu=nn.ReLU()))))
    return TrunkParts(stages, GlobalAveragePool(), None, model.classifier.in_features)


def _efficientnet_parts(model: nn.Module) -> TrunkParts:
    f = list(model.features)
    stages = [("stem", f[0])] + [(f"stage{i}", f[i]) for i in range(1, len(f) - 1)] + [("top", f[-1])]
    dropout, linear = model.classifier[0], model.classifier[1]
    return TrunkParts(stages, GlobalAveragePool(), None, linear.in_features, dropout.p)


def _mobilenet_v3_parts(model: nn.Module) -> TrunkParts:
    f = list(model.features)
    stages = [("stem", f[0])] + [(f"block{i}", f[i]) for i in range(1, len(f) - 1)] + [("top", f[-1])]
    hidden, activation, dropout = model.classifier[0], model.classifier[1], model.classifier[2]
    proj = nn.Conv2d(hidden.in_features, hidden.out_features, kernel_size=1, bias=hidden.bias is not None)
    with torch.no_grad():
        proj.weight.copy_(hidden.weight.reshape(proj.weight.shape))
        if hidden.bias is not None:
            proj.bias.copy_(hidden.bias)
    pre_logits = nn.Sequential(
        OrderedDict(pool=nn.AdaptiveAvgPool2d(1), proj=proj, act=type(activation)())
    )
    stages.append(("pre_logits", pre_logits))
    return TrunkParts(stages, GlobalAveragePool(), None, hidden.out_features, dropout.p)


def _convnext_parts(model: nn.Module) -> TrunkParts:
    f = list(model.features)
    names = ["stem", "stage1", "down2", "stage2", "down3", "stage3", "down4", "stage4"]
    if len(f) != len(names):
        raise ValueError(f"unexpected ConvNeXt layout: {len(f)} feature blocks")
    norm2d, linear = model.classifier[0], model.classifier[2]
    norm = nn.LayerNorm(norm2d.normalized_shape, eps=norm2d.eps)
    norm.load_state_dict(norm2d.state_dict())
    return TrunkParts(list(zip(names, f)), GlobalAveragePool(), norm, linear.in_features)


def _vit_parts(model: nn.Module) -> TrunkParts:
    embed = PatchEmbedding(
        conv_proj=model.conv_proj,
        class_token=model.class_token,
        pos_embedding=model.encoder.pos_embedding,
        dropout=model.encoder.dropout.p,
        image_size=model.image_size,
        patch_size=model.patch_size,
    )
    stages: list[tuple[str, nn.Module]] = [("embed", embed)]
    stages += [(name, block) for name, block in model.encoder.layers.named_children()]
    if not all(isinstance(block, EncoderBlock) for _, block in stages[1:]):
        raise ValueError("unexpected ViT layout: encoder.layers holds something other than EncoderBlocks")
    return TrunkParts(stages, ClassTokenPool(), model.encoder.ln, model.hidden_dim)


@dataclass(frozen=True)
class Family:
    """Everything fedtl needs to know about one torchvision architecture (one registration each).

    Attributes:
        first_conv: dotted path of the input convolution in the torchvision model.
        is_classifier_key: true for torchvision state-dict keys of the ImageNet classifier,
            which fedtl replaces with its own local head (never loaded).
        parts: recipe that splits the (rewritten) torchvision model into :class:`TrunkParts`.
        default_shared: the module prefixes the federation shares by default (the last block or
            blocks: small enough for DP noise and bandwidth, deep enough to adapt).
        sized_by_image: the torchvision builder takes ``image_size`` (ViT: position embeddings).
    """

    first_conv: str
    is_classifier_key: Callable[[str], bool]
    parts: Callable[[nn.Module], TrunkParts]
    default_shared: tuple[str, ...]
    sized_by_image: bool = False

    def builder_kwargs(self, image_size: int) -> dict[str, int]:
        """Extra keyword arguments for ``torchvision.models.get_model``."""
        return {"image_size": image_size} if self.sized_by_image else {}


FAMILIES: dict[str, Family] = {}


def register_family(architecture: str, recipe: Family) -> Family:
    """Register ``architecture`` (a ``common.config.Architecture`` value); each name once."""
    if architecture in FAMILIES:
        raise ValueError(f"architecture {architecture!r} is registered twice")
    FAMILIES[architecture] = recipe
    return recipe


register_family("resnet18", Family("conv1", lambda k: k.startswith("fc."), _resnet_parts, ("stages.layer4.1",)))
register_family("resnet50", Family("conv1", lambda k: k.startswith("fc."), _resnet_parts, ("stages.layer4.2",)))
register_family("densenet121", Family("features.conv0", lambda k: k.startswith("classifier."), _densenet_parts,
                                      ("stages.denseblock4",)))
register_family("efficientnet_b0", Family("features.0.0", lambda k: k.startswith("classifier."), _efficientnet_parts,
                                          ("stages.stage7", "stages.top")))
register_family("mobilenet_v3_large", Family("features.0.0", lambda k: k.startswith("classifier.3."),
                                             _mobilenet_v3_parts, ("stages.block15", "stages.top", "stages.pre_logits")))
register_family("convnext_tiny", Family("features.0.0", lambda k: k.startswith("classifier.2."), _convnext_parts,
                                        ("stages.stage4.2",)))
register_family("vit_b_16", Family("conv_proj", lambda k: k.startswith("heads."), _vit_parts,
                                   ("stages.encoder_layer_11",), sized_by_image=True))

_OLD_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def family(architecture: str) -> Family:
    """The conversion recipe for ``architecture`` (a ``common.config.Architecture`` value)."""
    try:
        return FAMILIES[architecture]
    except KeyError:
        raise ValueError(
            f"unknown architecture {architecture!r}; use one of: {', '.join(sorted(FAMILIES))}"
        ) from None


def modernise_torchvision_keys(architecture: str, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename legacy keys (DenseNet's ``norm.1`` -> ``norm1``) the way torchvision's own loader does."""
    if not architecture.startswith("densenet"):
        return dict(state)
    renamed: dict[str, Tensor] = {}
    for key, tensor in state.items():
        match = _OLD_DENSENET_KEY.match(key)
        renamed[match.group(1) + match.group(2) if match else key] = tensor
    return renamed


def fold_input_channels(model: nn.Module, architecture: str, in_channels: int) -> None:
    """Fold the first convolution of torchvision ``model`` to ``in_channels`` (1) by summing RGB filters."""
    if in_channels == 3:
        return
    if in_channels != 1:
        raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
    path = family(architecture).first_conv
    _set_submodule(model, path, fold_first_conv_to_gray(model.get_submodule(path)))
