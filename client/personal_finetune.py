"""The site's personal fine-tune: LP-FT of its own copy of the shared layers, on top of the global ones.

After the linear probe (``client.personal_head``) is fitted on the current global features, a
site may fine-tune *its own copy* of the shared layers together with that probe on its training
patients (linear probe, then fine-tune: the probe is the starting head, so the first steps do not
wreck the features with a random head's gradients). The fine-tuned layers are the site's personal
model, next to the global ones; the probe is then fitted again on their features, so its L2
strength and the operating point come from patient-level cross-validation as before. This is
"FedAvg + local fine-tuning", the strongest federated recipe on FLamby's hospital splits.

Privacy: it runs with DP off on the site's own data. That is allowed for the same reason as the
personal head: the copy never leaves the site and never feeds a DP step (the model DP-SGD trains
is not touched; ``tests/client/test_personal_finetune.py`` checks the next update bit for bit).

Reproducible: the batches come from a generator seeded by the caller; BatchNorm layers keep the
global running statistics (eval mode), so a small site's few batches cannot skew them.
"""

from __future__ import annotations

import copy
import logging
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from client.personal_head import PersonalHead
from common.data.patient_split import class_weights
from common.models.fed_model import StagesTail

logger = logging.getLogger(__name__)

GRADIENT_CLIP_NORM = 1.0
"""Largest norm of a fine-tune step's whole gradient (not DP: a guard against diverging steps)."""


class PersonalFinetuneDiverged(RuntimeError):
    """The fine-tuned copy holds non-finite values; the site keeps the probe on the layers it started from."""


class _ProbeOnStages(nn.Module):
    """Stages + the head's pooling + the personal probe: its fixed standardisation, then its linear layer
    (trained in the standardised space, so a feature with a tiny spread does not get a huge step)."""

    def __init__(self, tail: StagesTail, head: PersonalHead) -> None:
        super().__init__()
        self.stages = copy.deepcopy(tail.stages)
        self.pool = copy.deepcopy(tail.head)  # only its ``features`` (pool, norm) is used
        self.register_buffer("mean", head.mean.float().clone())
        self.register_buffer("scale", head.scale.float().clone())
        self.linear = nn.Linear(head.weight.shape[1], head.weight.shape[0])
        with torch.no_grad():
            self.linear.weight.copy_(head.weight.float())
            self.linear.bias.copy_(head.bias.float())

    def forward(self, h: torch.Tensor, clinical: torch.Tensor) -> torch.Tensor:
        for stage in self.stages.values():
            h = stage(h)
        features = self.pool.features(h).float()
        if clinical.numel():
            features = torch.cat([features, clinical.float()], dim=1)
        return self.linear((features - self.mean) / self.scale)


def finetune_personal_layers(
    tail: StagesTail,
    head: PersonalHead,
    inputs: torch.Tensor,
    clinical: torch.Tensor,
    labels: torch.Tensor,
    *,
    shared_names: list[str],
    trainable_names: list[str] | None = None,
    num_classes: int,
    epochs: int,
    learning_rate: float,
    batch_size: int,
    seed: int,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """The site's own copy of the shared layers after ``epochs`` of LP-FT (DP off); ``tail`` is not changed.

    ``shared_names`` are the model's shared tensor names (``"stages.layer4.0.conv1.weight"``, running
    statistics included); the result has exactly those keys, on the CPU. ``trainable_names`` (default:
    every shared parameter) are the ones tuned, as the federation trains them (``training.shared_trainable``).
    """
    if len(labels) == 0:
        raise ValueError("this site has no training images; check its manifest and the split")
    work = _ProbeOnStages(tail, head).to(device)
    work.eval()  # BatchNorm keeps the global running statistics (see the module docstring)
    tuned_names = set(shared_names if trainable_names is None else trainable_names)
    trainable = [p for name, p in work.stages.named_parameters() if f"stages.{name}" in tuned_names]
    params = trainable + list(work.linear.parameters())
    for p in work.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.SGD(params, lr=learning_rate, momentum=0.9)
    weights = class_weights(labels, num_classes).to(device)  # class-balanced: each class weighs the same
    generator = torch.Generator().manual_seed(seed)
    n = len(labels)
    with torch.enable_grad():  # the site's evaluation runs under no_grad
        for _epoch in range(epochs):
            order = torch.randperm(n, generator=generator)
            for start in range(0, n, batch_size):
                index = order[start : start + batch_size]
                logits = work(inputs[index].to(device), clinical[index].to(device))
                loss = F.cross_entropy(logits, labels[index].long().to(device), weight=weights)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, GRADIENT_CLIP_NORM)  # a steep first batch cannot blow it up
                optimizer.step()
    tuned = {f"stages.{name}": tensor.detach().cpu().clone() for name, tensor in work.stages.state_dict().items()}
    if not all(bool(torch.isfinite(t).all()) for t in tuned.values() if t.is_floating_point()):
        raise PersonalFinetuneDiverged(
            f"the personal fine-tune diverged (non-finite layers after {epochs} epochs at learning rate "
            f"{learning_rate:g}); lower training.personal_finetune_learning_rate")
    missing = set(shared_names) - set(tuned)
    if missing:
        raise ValueError(f"the shared layers {sorted(missing)[:3]} are not in the tail's stages; "
                         "training.personal_finetune_epochs needs the shared layers inside the trained stages")
    return {name: tuned[name] for name in shared_names}


def with_shared(tail: StagesTail, shared: Mapping[str, torch.Tensor]) -> StagesTail:
    """A copy of ``tail`` holding ``shared`` (names as in the model) in place of its shared tensors."""
    copied = copy.deepcopy(tail)
    state = copied.state_dict()
    for name, tensor in shared.items():
        state[name] = tensor.to(state[name].device, state[name].dtype)
    copied.load_state_dict(state)
    return copied
