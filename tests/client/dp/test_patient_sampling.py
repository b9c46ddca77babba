"""Patient-level DP-SGD: a patient is sampled whole, and one patient moves the clipped sum by at most C."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from client.dp.local_training import train_tail
from client.dp.patient_sampling import PatientPoissonSampler, patient_codes_of, sum_grad_samples_by_patient
from common.config import PrivacyConfig, TrainingConfig

CLIP = 2.0  # between the smallest and the largest patient gradient norm: some are clipped, some not
CLASS_WEIGHTS = torch.tensor([1.0, 3.0])  # class weighting on: fixed weights, as under DP


class Tail(nn.Module):
    """A small trainable tail with the signature of fedtl's: ``tail(inputs, clinical) -> logits``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, inputs: torch.Tensor, clinical: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(inputs)).mean(dim=(2, 3)))


class NoNoiseLedger:
    """A ledger stand-in with noise multiplier 0, so that a step's update IS the clipped sum."""

    accountant_kind = "rdp"
    noise_multiplier = 0.0

    def attach(self, engine: Any) -> None:
        pass

    def reserve(self, steps: int) -> None:
        pass

    def record(self, accountant: Any) -> float:
        return 0.0


def federation_site(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Ten patients with 1-4 images each; patient p0 has four."""
    generator = torch.Generator().manual_seed(seed)
    patients = [f"p{p}" for p, count in enumerate([4, 1, 2, 3, 1, 2, 4, 1, 3, 2]) for _ in range(count)]
    inputs = torch.randn(len(patients), 3, 6, 6, generator=generator) * 3
    labels = torch.tensor([int(p[1:]) % 2 for p in patients])
    return inputs, labels, patients


def clipped_sum(inputs: torch.Tensor, labels: torch.Tensor, patients: list[str], *, unit: str, mode: str,
                ) -> torch.Tensor:
    """One DP step at q = 1 (every unit in the batch), noise 0, SGD lr 1: the clipped sum of the units'
    gradients, recovered from the parameter change and the optimizer's divisor."""
    torch.manual_seed(0)
    tail = Tail()
    before = torch.cat([p.detach().flatten().clone() for p in tail.parameters()])
    training = TrainingConfig(rounds=1, local_epochs=1, batch_size=len(labels), learning_rate=1.0, momentum=0.0)
    privacy = PrivacyConfig(enabled=True, unit=unit, target_delta=1e-5, max_grad_norm=CLIP, grad_sample_mode=mode)
    named = list(tail.named_parameters())
    outcome = train_tail(
        tail, inputs, torch.zeros(len(labels), 0), labels, named_shared=named[:2], named_local=named[2:],
        training=training, privacy=privacy, ledger=NoNoiseLedger(), global_shared=None, proximal_mu=0.0,
        class_weights=CLASS_WEIGHTS, device=torch.device("cpu"), seed=0, patients=patients,
    )
    assert outcome.steps == 1
    after = torch.cat([p.detach().flatten() for p in tail.parameters()])
    units = len(set(patients)) if unit == "patient" else len(labels)
    return (before - after) * units  # the mean over expected units, times the units


def without_patient(inputs: torch.Tensor, labels: torch.Tensor, patients: list[str], patient: str):
    keep = [i for i, p in enumerate(patients) if p != patient]
    return inputs[keep], labels[keep], [patients[i] for i in keep]


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ghost"])
def test_removing_all_of_one_patients_images_moves_the_clipped_sum_by_at_most_the_clip_norm(mode: str) -> None:
    inputs, labels, patients = federation_site()

    changes = worst_changes(inputs, labels, patients, unit="patient", mode=mode)

    assert max(changes.values()) <= CLIP * (1 + 1e-4), changes
    assert max(changes.values()) >= CLIP * 0.99  # reached: some patient's summed gradient was clipped


def test_the_stock_weighted_mean_loss_would_break_that_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """Why the loss is a plain mean of weighted terms: ``CrossEntropyLoss(weight=...)`` divides by the
    batch's weight sum, so one patient's labels rescale every other patient's gradient."""
    import client.dp.local_training as local_training

    monkeypatch.setattr(local_training, "SampleWeightedCrossEntropy", lambda w: nn.CrossEntropyLoss(weight=w))
    inputs, labels, patients = federation_site()

    assert max(worst_changes(inputs, labels, patients, unit="patient", mode="hooks").values()) > CLIP * 1.05


def worst_changes(inputs: torch.Tensor, labels: torch.Tensor, patients: list[str], *, unit: str, mode: str,
                  ) -> dict[str, float]:
    """Removed patient -> norm of the change of the clipped sum."""
    with_all = clipped_sum(inputs, labels, patients, unit=unit, mode=mode)
    return {
        removed: float((with_all - clipped_sum(*without_patient(inputs, labels, patients, removed), unit=unit,
                                               mode=mode)).norm())
        for removed in sorted(set(patients))
    }


def test_with_the_image_unit_the_same_patient_moves_it_by_several_clip_norms() -> None:
    """What the patient unit fixes: four images of one patient are four clipped samples."""
    inputs, labels, patients = federation_site()

    changes = worst_changes(inputs, labels, patients, unit="image", mode="hooks")

    assert changes["p0"] > 1.5 * CLIP


def test_a_drawn_patient_comes_with_all_of_their_images_and_patients_are_drawn_at_the_planned_rate() -> None:
    patients = [f"p{i // 3}" for i in range(300)]  # 100 patients, 3 images each
    codes = patient_codes_of(patients)
    sampler = PatientPoissonSampler(codes, sample_rate=0.2, steps=400, generator=torch.Generator().manual_seed(1))

    batches = list(sampler)
    drawn = [sorted({patients[i] for i in batch}) for batch in batches]

    assert len(batches) == len(sampler) == 400
    for batch, names in zip(batches, drawn):
        assert len(batch) == 3 * len(names)  # never a patient cut in half
    rate = sum(len(names) for names in drawn) / (400 * 100)
    assert rate == pytest.approx(0.2, abs=0.01)
    assert any(len(batch) == 0 for batch in PatientPoissonSampler(codes, 0.005, 200, torch.Generator()))


def test_per_image_gradients_are_summed_per_patient_before_clipping() -> None:
    param = nn.Parameter(torch.zeros(2))
    param.grad_sample = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 5.0]])

    patients = sum_grad_samples_by_patient([param], torch.tensor([7, 3, 7]))

    assert patients == 2
    assert torch.equal(param.grad_sample, torch.tensor([[2.0, 0.0], [1.0, 5.0]]))  # codes 3, then 7


def test_training_by_patient_needs_the_patient_of_every_image() -> None:
    inputs, labels, patients = federation_site()
    tail = Tail()
    named = list(tail.named_parameters())

    with pytest.raises(ValueError, match="patient id of every training image"):
        train_tail(tail, inputs, torch.zeros(len(labels), 0), labels, named_shared=named, named_local=[],
                   training=TrainingConfig(batch_size=8), privacy=PrivacyConfig(enabled=True, target_delta=1e-5),
                   ledger=NoNoiseLedger(), global_shared=None, proximal_mu=0.0, class_weights=None,
                   device=torch.device("cpu"), seed=0)


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_an_epoch_with_empty_poisson_batches_still_takes_every_step(mode: str) -> None:
    """40 patients at q = 1/40: about a third of the batches are empty; each is a noise-only step."""
    torch.manual_seed(0)
    patients = [f"p{i}" for i in range(40)]
    tail = Tail()
    named = list(tail.named_parameters())

    outcome = train_tail(
        tail, torch.randn(40, 3, 6, 6), torch.zeros(40, 0), torch.tensor([i % 2 for i in range(40)]),
        named_shared=named[:2], named_local=named[2:], training=TrainingConfig(batch_size=1, momentum=0.0),
        privacy=PrivacyConfig(enabled=True, grad_sample_mode=mode, target_delta=1e-5), ledger=NoNoiseLedger(),
        global_shared=None, proximal_mu=0.0, class_weights=None, device=torch.device("cpu"), seed=0,
        patients=patients,
    )

    assert outcome.steps == 40
