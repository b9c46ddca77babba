"""The federated model: an image trunk cut into named stages, and a local head.

``FedModel.stages`` is the ordered trunk (``"stem"``, ``"layer1"`` ... for ResNet); ``head`` is a
:class:`LocalHead` (pool, optional final norm, optional clinical branch, classifier). Which
stages are frozen, shared with the federation or kept local is decided by
:mod:`common.models.layer_policy`; :meth:`FedModel.tail` gives the part after a cut point, with the
same parameter names, for the frozen-trunk cache and as the module Opacus wraps.

:func:`build_backbone` is the one door in: it builds the torchvision model without weights,
loads torchvision weights from the local hub cache (never downloading), makes it DP-safe
(:mod:`common.models.backbone_families`), folds RGB to gray when asked, adds the local head and, if
configured, loads a fedtl backbone checkpoint on top.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping

import torchvision
from torch import Tensor, nn
from torchvision.models.vision_transformer import interpolate_embeddings

from common.models.dp_safe_rewrites import make_opacus_safe
from common.models.backbone_families import (
    TrunkParts,
    family,
    fold_input_channels,
    modernise_torchvision_keys,
)
from common.config import ModelConfig
from common.models.model_weights import (
    WeightsError,
    check_checkpoint_fits,
    load_backbone_checkpoint,
    load_torchvision_state_dict,
)
from common.models.fed_model import FedModel, LocalHead
from common.models.opacus_compat import ADAPTER_SUFFIXES
from common.models.state_groups import StateMismatchError, merge_state


logger = logging.getLogger(__name__)

def _load_into_torchvision(
    model: nn.Module, architecture: str, state: Mapping[str, Tensor], image_size: int
) -> None:
    """Load a torchvision-format ``state`` into torchvision ``model``, skipping the ImageNet classifier."""
    recipe = family(architecture)
    state = modernise_torchvision_keys(architecture, state)
    if recipe.sized_by_image and "encoder.pos_embedding" in state:
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
    tv_model = torchvision.models.get_model(architecture, weights=None, **recipe.builder_kwargs(config.image_size))
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
    """Load a complete FedModel state dict, with an error naming any missing, extra or ill-shaped tensor.

    A checkpoint written before the BatchNorm adapters existed (``AdaptableFrozenBatchNorm2d``) has no
    ``*.adapter.scale``/``*.adapter.shift`` tensors; those keep their identity values (what the model
    computed without them)."""
    expected = model.state_dict()
    state = {**{k: v for k, v in expected.items() if k.endswith(ADAPTER_SUFFIXES) and k not in state}, **state}
    try:
        merged = merge_state({source: state}, expected=expected)
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
