"""The federated model: an image trunk cut into named stages, and a local head.

``FedModel.stages`` is the ordered trunk (``"stem"``, ``"layer1"`` ... for ResNet); ``head`` is a
:class:`LocalHead` (pool, optional final norm, optional clinical branch, classifier). Which
stages are frozen, shared with the federation or kept local is decided by
:mod:`common.layer_policy`; :meth:`FedModel.tail` gives the part after a cut point, with the
same parameter names, for the frozen-trunk cache and as the module Opacus wraps.

:func:`build_backbone` is the one door in: it builds the torchvision model without weights,
loads torchvision weights from the local hub cache (never downloading), makes it DP-safe
(:mod:`common.backbone_families`), folds RGB to gray when asked, adds the local head and, if
configured, loads a fedtl backbone checkpoint on top.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.vision_transformer import interpolate_embeddings

from common.backbone_families import (
    TrunkParts,
    family,
    fold_input_channels,
    make_opacus_safe,
    modernise_torchvision_keys,
)
from common.config import ModelConfig
from common.model_weights import (
    WeightsError,
    check_checkpoint_fits,
    load_backbone_checkpoint,
    load_torchvision_state_dict,
)
from common.state_groups import StateMismatchError, merge_state

if TYPE_CHECKING:
    from common.layer_policy import LayerPolicy

logger = logging.getLogger(__name__)

CLINICAL_EMBEDDING_DIM = 32
"""Width of the clinical branch's output, concatenated with the pooled image features."""


class LocalHead(nn.Module):
    """Pooled image features (+ clinical branch) -> logits. Lives at the site.

    Children: ``pool`` (no parameters), optional ``norm``, optional ``clinical``
    (``Linear(num_clinical, 32) + ReLU``), optional ``dropout``, ``classifier`` (``Linear``).

    Args:
        pool: maps the last stage's output to ``(N, feature_dim)``.
        feature_dim: pooled image feature size.
        num_classes: classifier outputs.
        num_clinical: number of clinical input values per image (0 = no clinical branch).
        norm: optional norm applied to the pooled features (pretrained, e.g. ConvNeXt's LayerNorm).
        dropout: dropout probability before the classifier (0 = none).
    """

    def __init__(
        self,
        pool: nn.Module,
        feature_dim: int,
        num_classes: int,
        num_clinical: int = 0,
        norm: nn.Module | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.pool = pool
        self.norm = norm
        self.num_clinical = num_clinical
        self.clinical = (
            nn.Sequential(OrderedDict(linear=nn.Linear(num_clinical, CLINICAL_EMBEDDING_DIM), act=nn.ReLU()))
            if num_clinical > 0
            else None
        )
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        fused_dim = feature_dim + (CLINICAL_EMBEDDING_DIM if num_clinical > 0 else 0)
        self.classifier = nn.Linear(fused_dim, num_classes)

    def features(self, h: Tensor) -> Tensor:
        """Pooled (and normed) image features ``(N, feature_dim)`` of the last stage's output ``h``."""
        pooled = self.pool(h)
        return self.norm(pooled) if self.norm is not None else pooled

    def forward(self, h: Tensor, clinical: Tensor | None = None) -> Tensor:
        fused = self.features(h)
        if self.clinical is not None:
            if clinical is None:
                raise ValueError(
                    f"this model fuses {self.num_clinical} clinical feature(s): pass clinical= a "
                    f"(batch, {self.num_clinical}) tensor"
                )
            if clinical.dim() != 2 or clinical.shape[1] != self.num_clinical:
                raise ValueError(
                    f"clinical must have shape (batch, {self.num_clinical}), got {tuple(clinical.shape)}"
                )
            fused = torch.cat([fused, self.clinical(clinical.to(fused.dtype))], dim=1)
        elif clinical is not None and clinical.numel() > 0:
            raise ValueError(
                "clinical values were given but this model has no clinical branch; "
                "list the columns in [model] clinical_features"
            )
        if self.dropout is not None:
            fused = self.dropout(fused)
        return self.classifier(fused)


class StagesTail(nn.Module):
    """``stages[start:]`` + head of a FedModel, sharing its parameters and their names.

    Its ``named_parameters()`` match the FedModel's (``"stages.layer4.0.conv1.weight"``,
    ``"head.classifier.weight"``). Input: the output of ``stages[:start]`` (images when
    ``start == 0``) and the clinical values.
    """

    def __init__(self, stages: Mapping[str, nn.Module], head: LocalHead) -> None:
        super().__init__()
        self.stages = nn.ModuleDict(stages)
        self.head = head

    def forward(self, h: Tensor, clinical: Tensor | None = None) -> Tensor:
        for stage in self.stages.values():
            h = stage(h)
        return self.head(h, clinical)


class FedModel(nn.Module):
    """Image trunk as ordered named stages + a :class:`LocalHead`.

    Attributes:
        stages: ordered named trunk stages.
        head: pool / norm / clinical branch / classifier.
        architecture, num_classes, in_channels, image_size, num_clinical: how it was built.
        feature_dim: pooled image feature size.
    """

    def __init__(
        self,
        stages: list[tuple[str, nn.Module]],
        head: LocalHead,
        *,
        architecture: str,
        num_classes: int,
        in_channels: int,
        image_size: int,
        num_clinical: int,
        feature_dim: int,
    ) -> None:
        super().__init__()
        self.stages = nn.ModuleDict(OrderedDict(stages))
        self.head = head
        self.architecture = architecture
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.image_size = image_size
        self.num_clinical = num_clinical
        self.feature_dim = feature_dim

    @property
    def stage_names(self) -> list[str]:
        return list(self.stages.keys())

    def _check_range(self, start: int, stop: int | None) -> int:
        count = len(self.stages)
        stop = count if stop is None else stop
        if not 0 <= start <= stop <= count:
            raise IndexError(f"stage range [{start}:{stop}] outside the {count} stages of {self.architecture}")
        return stop

    def forward_stages(self, x: Tensor, start: int = 0, stop: int | None = None) -> Tensor:
        """Run ``stages[start:stop]`` on ``x`` (images when ``start == 0``)."""
        stop = self._check_range(start, stop)
        for stage in list(self.stages.values())[start:stop]:
            x = stage(x)
        return x

    def forward(self, x: Tensor, clinical: Tensor | None = None) -> Tensor:
        """Logits for images ``x`` of shape ``(N, in_channels, image_size, image_size)``."""
        return self.head(self.forward_stages(x), clinical)

    def tail(self, start: int) -> StagesTail:
        """Module mapping the output of ``stages[:start]`` (and clinical) to logits; shares parameters and names."""
        self._check_range(start, None)
        names = self.stage_names[start:]
        return StagesTail(OrderedDict((name, self.stages[name]) for name in names), self.head)


def _is_under(name: str, prefix: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def first_trainable_stage(model: FedModel, policy: LayerPolicy) -> int:
    """Index of the first stage holding a parameter under a shared or local prefix (``len(stages)`` if none)."""
    prefixes = tuple(policy.shared) + tuple(policy.local)
    for index, (stage_name, stage) in enumerate(model.stages.items()):
        for param_name, _ in stage.named_parameters(prefix=f"stages.{stage_name}"):
            if any(_is_under(param_name, prefix) for prefix in prefixes):
                return index
    return len(model.stages)


def _load_into_torchvision(
    model: nn.Module, architecture: str, state: Mapping[str, Tensor], image_size: int
) -> None:
    """Load a torchvision-format ``state`` into torchvision ``model``, skipping the ImageNet classifier."""
    recipe = family(architecture)
    state = modernise_torchvision_keys(architecture, state)
    if architecture.startswith("vit") and "encoder.pos_embedding" in state:
        tokens = state["encoder.pos_embedding"].shape[1]
        if tokens != model.encoder.pos_embedding.shape[1]:
            logger.info("interpolating ViT position embeddings from %d tokens to %dx%d images",
                        tokens, image_size, image_size)
            state = dict(interpolate_embeddings(image_size, model.patch_size, OrderedDict(state)))
    kept = {key: tensor for key, tensor in state.items() if not recipe.is_classifier_key(key)}
    try:
        result = model.load_state_dict(kept, strict=False)
    except RuntimeError as exc:
        raise WeightsError(f"{architecture} weights do not fit the architecture: {exc}") from None
    missing = [
        key
        for key in result.missing_keys
        if not recipe.is_classifier_key(key) and not key.endswith(".num_batches_tracked")
    ]
    if missing or result.unexpected_keys:
        raise WeightsError(
            f"weights are not a {architecture} state dict: missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected {result.unexpected_keys[:5]}"
            f"{' ...' if len(result.unexpected_keys) > 5 else ''}; check [model] architecture and weights"
        )


def from_torchvision_state(config: ModelConfig, state: Mapping[str, Tensor] | None = None) -> FedModel:
    """Build a FedModel for ``config`` from torchvision-format weights ``state`` (None = random init).

    Args:
        config: the model section (architecture, classes, channels, image size, clinical features).
        state: an ImageNet-style torchvision state dict (e.g. from the hub cache), loaded as RGB
            and then folded to gray when ``config.in_channels == 1``; its classifier is dropped.
    """
    architecture = config.architecture
    recipe = family(architecture)
    builder_kwargs = {"image_size": config.image_size} if architecture.startswith("vit") else {}
    tv_model = torchvision.models.get_model(architecture, weights=None, **builder_kwargs)
    if state is not None:
        _load_into_torchvision(tv_model, architecture, state, config.image_size)
    fold_input_channels(tv_model, architecture, config.in_channels)
    make_opacus_safe(tv_model)
    parts: TrunkParts = recipe.parts(tv_model)
    num_clinical = len(config.clinical_features)
    head = LocalHead(
        parts.pool,
        parts.feature_dim,
        config.num_classes,
        num_clinical=num_clinical,
        norm=parts.norm,
        dropout=parts.dropout,
    )
    model = FedModel(
        parts.stages,
        head,
        architecture=architecture,
        num_classes=config.num_classes,
        in_channels=config.in_channels,
        image_size=config.image_size,
        num_clinical=num_clinical,
        feature_dim=parts.feature_dim,
    )
    return model.eval()


def load_fedtl_state(model: FedModel, state: Mapping[str, Tensor], source: str = "checkpoint") -> None:
    """Load a complete FedModel state dict, with an error naming any missing, extra or ill-shaped tensor."""
    try:
        merged = merge_state({source: state}, expected=model.state_dict())
    except StateMismatchError as exc:
        raise WeightsError(f"{source}: {exc}") from None
    model.load_state_dict(merged)


def build_backbone(config: ModelConfig, *, load_weights: bool = True) -> FedModel:
    """Build the DP-safe FedModel described by ``config`` (in eval mode).

    Args:
        config: the model section. ``weights`` names torchvision weights to read from the local
            torch hub cache; ``checkpoint`` names a fedtl backbone checkpoint file.
        load_weights: False builds with random weights even when weights or a checkpoint are
            configured (for a site that receives the backbone tensors from the coordinator).

    Raises:
        WeightsNotFoundError: configured torchvision weights are not in the hub cache.
        WeightsError: the weights or checkpoint do not fit the configuration.
    """
    state = None
    if load_weights and config.weights:
        state = load_torchvision_state_dict(config.architecture, config.weights)
    model = from_torchvision_state(config, state)
    if load_weights and config.checkpoint is not None:
        checkpoint = load_backbone_checkpoint(config.checkpoint)
        check_checkpoint_fits(checkpoint, config, config.checkpoint)
        load_fedtl_state(model, checkpoint.state_dict, source=str(config.checkpoint))
        logger.info("loaded backbone checkpoint %s (fingerprint %s)", config.checkpoint, checkpoint.fingerprint[:12])
    return model
