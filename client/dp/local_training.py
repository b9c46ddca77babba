"""Local fine-tuning of the trainable tail (shared layers + local head), with or without DP.

Under DP every step is DP-SGD through Opacus: Poisson sampling of the privacy unit (patients by
default, see ``client.dp.patient_sampling``; images with ``privacy.unit = "image"``), clipping of
each unit's gradient (ghost clipping by default: for images with fedtl's convolution norm
samplers, for patients with ``client.dp.patient_gradient_norms``), Gaussian noise on every trainable parameter, shared and local. The loss is a mean of
per-sample terms with fixed class weights (``client.dp.sample_weighted_loss``), so no sample's
term depends on another's. In ghost mode the backward is ``client.dp.ghost_clipping``'s:
Opacus' two passes, the first one computing no parameter gradients. The accountant comes from
the site's ledger, so the epsilon after this call is the site's cumulative one. FedProx's
proximal gradient is added after privatisation, where Opacus cannot drop it (see
``client.dp.proximal``).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import common.models.conv_norm_samplers  # noqa: F401 - registers Opacus norm samplers for convolutions
from client.dp.fused_noise_optimizer import use_fused_noise
from client.dp.ghost_clipping import DirectWeightGradients, TrainableInputLeaves, ghost_clipped_backward
from client.dp.patient_gradient_norms import patient_clipped_backward, tail_supports_patient_norms
from client.dp.patient_sampling import grad_sample_mode_for, patient_loader, sum_grad_samples_by_patient
from client.dp.sample_weighted_loss import SampleWeightedCrossEntropy
from client.privacy.privacy_budget import PrivacyLedger
from client.dp.proximal import dp_step_with_proximal
from common.config import PrivacyConfig, TrainingConfig

logger = logging.getLogger(__name__)

Augment = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TrainingOutcome:
    """What one round of local training produced (aggregates only)."""

    mean_loss: float
    steps: int
    num_examples: int


def train_tail(tail: nn.Module, *args: object, named_shared: list[tuple[str, nn.Parameter]],
               named_local: list[tuple[str, nn.Parameter]], **kwargs: object) -> TrainingOutcome:
    """Train ``tail(inputs, clinical) -> logits`` for ``training.local_epochs`` epochs (see :func:`_train_tail`).

    Only ``named_shared`` and ``named_local`` are trained: any other parameter of ``tail`` that requires a
    gradient (a shared value the site leaves alone, ``training.shared_trainable``) is set not to for the
    call, so Opacus neither clips nor noises it, and restored afterwards.
    """
    trained = {id(p) for _, p in named_shared + named_local}
    paused = [p for p in tail.parameters() if p.requires_grad and id(p) not in trained]
    for p in paused:
        p.requires_grad_(False)
    try:
        return _train_tail(tail, *args, named_shared=named_shared, named_local=named_local, **kwargs)  # type: ignore[arg-type]
    finally:
        for p in paused:
            p.requires_grad_(True)


def _train_tail(
    tail: nn.Module,
    inputs: torch.Tensor,
    clinical: torch.Tensor,
    labels: torch.Tensor,
    *,
    named_shared: list[tuple[str, nn.Parameter]],
    named_local: list[tuple[str, nn.Parameter]],
    training: TrainingConfig,
    privacy: PrivacyConfig,
    ledger: PrivacyLedger | None,
    global_shared: Mapping[str, torch.Tensor] | None,
    proximal_mu: float,
    class_weights: torch.Tensor | None,
    device: torch.device,
    seed: int,
    augment: Augment | None = None,
    patients: Sequence[str] | None = None,
) -> TrainingOutcome:
    """Train ``tail(inputs, clinical) -> logits`` for ``training.local_epochs`` epochs.

    ``patients`` (one site-local id per image) is required under DP with the patient unit.
    """
    if len(inputs) == 0:
        raise ValueError("this site has no training images; check its manifest and the split")
    by_patient = privacy.enabled and privacy.unit == "patient"
    if by_patient and patients is None:
        raise ValueError("privacy.unit = 'patient' needs the patient id of every training image")
    generator = torch.Generator().manual_seed(seed)
    tail.to(device).train()
    params = [p for _, p in named_shared] + [p for _, p in named_local]
    optimizer: torch.optim.Optimizer = torch.optim.SGD(
        params, lr=training.learning_rate, momentum=training.momentum
    )
    criterion: Callable[..., torch.Tensor] = SampleWeightedCrossEntropy(
        class_weights.to(device) if class_weights is not None else None
    )
    if by_patient:
        # Opacus keeps this loader (no Poisson re-wrapping): its batches already are Poisson
        # draws of patients, at the rate the ledger planned (1 / number of batches).
        assert patients is not None
        batches = max(1, -(-len(inputs) // training.batch_size))
        loader = patient_loader((inputs, clinical, labels), patients, 1.0 / batches, generator)
    else:
        dataset = TensorDataset(inputs, clinical, labels)
        loader = DataLoader(dataset, batch_size=training.batch_size, shuffle=True, generator=generator)
    grad_sample_mode = grad_sample_mode_for(privacy.grad_sample_mode, privacy.unit,
                                            patient_norms_supported=tail_supports_patient_norms(tail))
    if privacy.enabled and grad_sample_mode != privacy.grad_sample_mode:
        logger.info("privacy.unit = %r: per-image gradients in %r mode (a layer of this tail has no per-patient "
                    "ghost norm)", privacy.unit, grad_sample_mode)
    global_on_device = (
        {name: tensor.to(device) for name, tensor in global_shared.items()} if global_shared else None
    )

    dp_module = None
    if privacy.enabled:
        if ledger is None:
            raise ValueError("DP is on but no privacy ledger was given")
        from opacus import PrivacyEngine

        engine = PrivacyEngine(accountant=ledger.accountant_kind)
        ledger.attach(engine)  # before make_private: Opacus binds its step hook to this accountant
        ledger.reserve(training.local_epochs * len(loader))  # a crash mid-round still counts as spent
        made = engine.make_private(
            module=tail,
            optimizer=optimizer,
            criterion=criterion,
            data_loader=loader,
            noise_multiplier=ledger.noise_multiplier,
            max_grad_norm=privacy.max_grad_norm,
            poisson_sampling=not by_patient,
            grad_sample_mode=grad_sample_mode,
            noise_generator=torch.Generator(device=device).manual_seed(seed + 1),
        )
        if grad_sample_mode == "ghost":
            dp_module, optimizer, criterion, loader = made
            optimizer = use_fused_noise(optimizer)  # same noised gradients, fewer copies per step
        else:
            dp_module, optimizer, loader = made
        if by_patient:  # the mean is over expected patients, the units that are clipped
            optimizer.expected_batch_size = max(1, round(loader.batch_sampler.num_patients / len(loader)))
        model_call: nn.Module = dp_module
    else:
        engine = None
        model_call = tail

    fast_ghost = dp_module is not None and grad_sample_mode == "ghost"
    direct = DirectWeightGradients.attach(tail) if fast_ghost else None
    input_leaves = TrainableInputLeaves.attach(tail) if fast_ghost else None
    patient_ghost = fast_ghost and by_patient
    if patient_ghost:
        assert dp_module is not None
        dp_module.disable_hooks()  # the per-patient norms come from the direct captures, not Opacus' hooks
    losses: list[float] = []
    steps = 0
    try:
        # Opacus' per-image hooks are full backward hooks on a tail whose inputs (cached trunk
        # outputs) need no gradient; torch warns about exactly that, harmlessly, once per process.
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
        for _epoch in range(training.local_epochs):
            for batch in loader:
                batch_inputs, batch_clinical, batch_labels = batch[:3]
                optimizer.zero_grad(set_to_none=True)
                if len(batch_labels) == 0:
                    # Poisson sampling can draw an empty batch: the step still happens (noise only).
                    for p in params:
                        p.grad = torch.zeros_like(p)
                        if dp_module is not None and not fast_ghost:  # hooks/functorch clip per-sample rows
                            p.grad_sample = p.new_zeros((0, *p.shape))
                else:
                    batch_inputs = batch_inputs.to(device, non_blocking=True)
                    batch_clinical = batch_clinical.to(device)
                    if augment is not None:
                        batch_inputs = augment(batch_inputs)
                    if input_leaves is not None:
                        input_leaves.start_batch()
                    logits = model_call(batch_inputs, batch_clinical)
                    loss = criterion(logits, batch_labels.to(device))
                    if input_leaves is not None and patient_ghost:
                        patient_clipped_backward(loss, dp_module, input_leaves.leaves(), direct, batch[3])
                    elif input_leaves is not None:
                        ghost_clipped_backward(loss, dp_module, input_leaves.leaves(), direct)
                    else:
                        loss.backward()
                    if by_patient and not patient_ghost:
                        sum_grad_samples_by_patient(params, batch[3])
                    losses.append(float(loss.item()))
                dp_step_with_proximal(optimizer, named_shared, global_on_device, proximal_mu)
                steps += 1
    finally:
        if direct is not None:
            direct.close()
        if input_leaves is not None:
            input_leaves.close()
        if dp_module is not None:
            dp_module._close()  # remove Opacus hooks so the next round does not stack them
        if ledger is not None and engine is not None:
            ledger.record(engine.accountant)
    mean_loss = sum(losses) / len(losses) if losses else float("nan")
    return TrainingOutcome(mean_loss=mean_loss, steps=steps, num_examples=len(inputs))


def random_flip_and_shift(max_shift: int = 4, generator: torch.Generator | None = None) -> Augment:
    """A light augmentation: random horizontal flip and a small random translation per image.

    ``generator`` (CPU) makes the draws reproducible whatever else the process did before.
    """

    def augment(batch: torch.Tensor) -> torch.Tensor:
        if batch.dim() != 4:
            return batch
        flip = (torch.rand(len(batch), generator=generator) < 0.5).to(batch.device)
        batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
        dx, dy = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,), generator=generator))
        return torch.roll(batch, shifts=(dy, dx), dims=(-2, -1))

    return augment
