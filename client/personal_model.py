"""How a site fits its personal model on the shared layers it holds (never sent, never fed to a DP step).

The procedure, on the site's training patients only:

1. the linear probe (``client.personal_head``) on the features of the current global layers, its L2
   strength chosen by patient-level cross-validation;
2. with ``training.personal_layers = "validated"``, the same probe on the pretrained layers: the one
   with the lower cross-validated loss wins (the global layers win ties);
3. with ``training.personal_finetune_epochs`` (and ``finetune``: the ClientApp asks for it at the
   federation's last round), LP-FT of the site's own copy of those layers from that probe
   (``client.personal_finetune``), then the probe fitted again on the copy's features. A diverging
   fine-tune keeps the probe of step 1 or 2 with a warning.

It returns the head (with the layers it sits on) and the probe's out-of-fold probabilities, from which
the site chooses its operating point.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Protocol

import torch

from client.personal_finetune import PersonalFinetuneDiverged, finetune_personal_layers, with_shared
from client.personal_head import PersonalHead, fit_personal_head_with_validation
from common.config import TrainingConfig
from common.models.fed_model import StagesTail

logger = logging.getLogger(__name__)

FeaturesOf = Callable[[StagesTail | None], torch.Tensor]
"""The training split's pooled features under a tail (None: the session's own, global layers)."""


class TrainingPatients(Protocol):
    """What the personal model is fitted on: the site's training split (``client.site_session.Split``)."""

    inputs: torch.Tensor  # the tail's inputs (cached trunk outputs)
    clinical: torch.Tensor
    labels: torch.Tensor
    patients: list[str]


def fit_personal_model(
    tail: StagesTail,
    features_of: FeaturesOf,
    train: TrainingPatients,
    *,
    training: TrainingConfig,
    num_classes: int,
    shared_names: list[str],
    trainable_names: list[str],
    pretrained_probe: Callable[[], tuple[PersonalHead, torch.Tensor | None]] | None,
    finetune: bool,
    seed: int,
    device: torch.device,
    site_name: str,
) -> tuple[PersonalHead, torch.Tensor | None]:
    """The site's personal head (and its own copy of the shared layers, where it has one) and the
    probe's out-of-fold logits (None where there were too few patients to cross-validate).

    ``tail`` is the session's trainable tail on the global layers; it is never changed.
    ``pretrained_probe`` (for ``personal_layers = "validated"``) gives the probe fitted on the pretrained
    layers (``layers="pretrained"``, ``shared`` set) and its out-of-fold logits: the same in every round,
    so the caller may keep it (:func:`fit_pretrained_probe` computes it).
    """
    head, out_of_fold = fit_personal_head_with_validation(features_of(None), train.labels, train.patients, num_classes)
    if training.personal_layers == "validated" and pretrained_probe is not None and head.folds:
        # The pretrained layers compete with the global ones on the site's own validation patients:
        # where DP noise or other sites' data made the global features worse here, the site keeps its
        # best model (the probe's cross-validated loss; the global layers win ties).
        rival, rival_out_of_fold = pretrained_probe()
        if rival.validation_loss < head.validation_loss:
            head, out_of_fold = rival, rival_out_of_fold
    if not (training.personal_finetune_epochs and finetune):
        return head, out_of_fold
    start_tail = with_shared(tail, head.shared) if head.shared is not None else tail
    try:
        tuned = finetune_personal_layers(
            start_tail, head, train.inputs, train.clinical, train.labels,
            shared_names=shared_names, trainable_names=trainable_names, num_classes=num_classes,
            epochs=training.personal_finetune_epochs, learning_rate=training.personal_finetune_learning_rate,
            batch_size=training.batch_size, seed=seed, device=device,
        )
    except PersonalFinetuneDiverged as exc:
        logger.warning("[%s] %s; the personal head stays on the %s layers", site_name, exc, head.layers)
        return head, out_of_fold
    head, out_of_fold = fit_personal_head_with_validation(
        features_of(with_shared(tail, tuned)), train.labels, train.patients, num_classes)
    return dataclasses.replace(head, layers="fine-tuned", shared=tuned), out_of_fold


def fit_pretrained_probe(tail: StagesTail, features_of: FeaturesOf, train: TrainingPatients,
                         pretrained_shared: Mapping[str, torch.Tensor],
                         num_classes: int) -> tuple[PersonalHead, torch.Tensor | None]:
    """The probe on the pretrained shared layers (the ``validated`` rival) and its out-of-fold logits."""
    rival, out_of_fold = fit_personal_head_with_validation(
        features_of(with_shared(tail, pretrained_shared)), train.labels, train.patients, num_classes)
    return dataclasses.replace(rival, layers="pretrained", shared=dict(pretrained_shared)), out_of_fold
