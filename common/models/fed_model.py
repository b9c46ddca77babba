"""The federated model's shape: an image trunk cut into named stages, and the head after it.

``FedModel.stages`` is the ordered trunk (``"stem"``, ``"layer1"`` ... for ResNet); ``head`` is a
:class:`LocalHead` (pool, optional final norm, optional clinical branch, classifier).
:meth:`FedModel.tail` gives the part after a cut point, with the same parameter names, for the
frozen-trunk cache and as the module Opacus wraps. Built by :func:`common.models.backbones.build_backbone`;
which parts are frozen, shared or local is :mod:`common.models.layer_policy`'s business.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import torch
from torch import Tensor, nn

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
