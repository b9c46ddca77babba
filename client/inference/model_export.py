"""Export the site's model as one self-contained TorchScript file for the hospital's own inference stack.

The file holds the whole :class:`client.inference.site_model.SiteClassifier` (trunk, global shared
layers, the personal head) traced with ``torch.jit.trace``: it takes a *preprocessed* image batch,
float32 ``(N, C, S, S)`` (see the model card for the preprocessing), and returns class probabilities
``(N, classes)``; a model that fuses clinical values takes them as a second float32 ``(N, K)`` input.
It loads with ``torch.jit.load`` alone: no fedtl code, no torchvision. The model card (JSON) is also
stored inside the file (``_extra_files={"model_card.json": ...}``), so the two can not drift apart.

TorchScript rather than ``torch.export``: one ``.pt`` file that ``torch.jit.load`` (Python) and
``torch::jit::load`` (libtorch C++) run without the model's Python code, which is what most hospital
inference stacks take today. torch 2.14 marks ``torch.jit`` deprecated in favour of ``torch.export``
(a FutureWarning on save and load; it still works): a ``.pt2`` export is the follow-up once the
hospitals' runtimes read it. Tracing is safe here: the model has no data-dependent control flow
(frozen BatchNorm, fixed stages), and the trace is checked against the eager model on another batch size.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from client.inference.site_model import SiteClassifier, SiteModel

logger = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
CARD_IN_FILE = "model_card.json"
TRACE_TOLERANCE = 1e-5


class _ImagesOnly(nn.Module):
    def __init__(self, classifier: SiteClassifier) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, images: Tensor) -> Tensor:
        return self.classifier(images)


class _ImagesAndClinical(nn.Module):
    def __init__(self, classifier: SiteClassifier) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, images: Tensor, clinical: Tensor) -> Tensor:
        return self.classifier(images, clinical)


def example_inputs(site_model: SiteModel, batch: int = 2, seed: int = 0) -> tuple[Tensor, ...]:
    """Random inputs of the exported file's shapes (CPU, float32)."""
    config = site_model.config.model
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, config.in_channels, config.image_size, config.image_size, generator=generator)
    if site_model.classifier.num_clinical:
        return images, torch.randn(batch, site_model.classifier.num_clinical, generator=generator)
    return (images,)


def export_torchscript(site_model: SiteModel, path: Path, card: Mapping[str, Any] | None = None) -> Path:
    """Trace the site's model on the CPU, check the trace and write it to ``path`` (with the card inside)."""
    classifier = site_model.classifier.to("cpu").eval()
    wrapper = (_ImagesAndClinical if classifier.num_clinical else _ImagesOnly)(classifier).eval()
    inputs = example_inputs(site_model)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit.*deprecated.*")
        traced = torch.jit.trace(wrapper, inputs, check_trace=False)
        checks = example_inputs(site_model, batch=3, seed=1)  # another batch size than the trace's
        gap = float((traced(*checks) - wrapper(*checks)).abs().max())
    if not gap <= TRACE_TOLERANCE:
        raise RuntimeError(f"the traced model differs from the site's model by {gap:.2e}; export refused")
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = {CARD_IN_FILE: json.dumps(card, indent=2, sort_keys=True)} if card is not None else {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit.*deprecated.*")
        torch.jit.save(traced, str(path), _extra_files=extra)
    site_model.classifier.to(site_model.device)
    logger.info("exported the site model to %s (trace checked to %.1e)", path, gap)
    return path
