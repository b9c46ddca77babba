"""A cross-entropy whose batch mean does not tie samples together.

``nn.CrossEntropyLoss(weight=w)`` with ``reduction="mean"`` divides by the sum of the batch's
weights: one sample's label then scales every other sample's gradient, and Opacus' per-sample
clipping (which assumes ``loss = sum of per-sample terms / batch size``) no longer bounds one
sample's influence (measured: 1.65 C in hooks mode). :class:`SampleWeightedCrossEntropy` divides
by the number of samples instead, in every reduction Opacus asks for (``ghost`` sets
``reduction = "none"`` itself).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SampleWeightedCrossEntropy(nn.Module):
    """``mean_i w[y_i] * CE(x_i, y_i)`` (or the per-sample terms, or their sum).

    Args:
        weight: one fixed weight per class, or ``None``. It must not come from the site's private
            label counts when DP is on (see ``SiteSession.loss_weights``).
    """

    def __init__(self, weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.weight = weight
        self.reduction = "mean"

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(logits.device, logits.dtype) if self.weight is not None else None
        per_sample = F.cross_entropy(logits, labels, weight=weight, reduction="none")
        if self.reduction == "none":
            return per_sample
        if self.reduction == "sum":
            return per_sample.sum()
        return per_sample.mean()
