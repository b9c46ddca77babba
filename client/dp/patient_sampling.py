"""Patient-level DP-SGD: patients are sampled, and each patient's summed gradient is clipped.

Opacus samples and clips single examples. With ``privacy.unit = "patient"`` one step instead

1. draws every training *patient* independently with probability ``q`` (Poisson sampling of
   patients, :class:`PatientPoissonSampler`); the batch is all images of the drawn patients;
2. clips each patient's *summed* gradient: with ``ghost`` (the default) in one backward pass, the
   norm of each patient's sum coming from Gram products of the patient's images
   (``client.dp.patient_gradient_norms.patient_clipped_backward``), no per-image
   gradient formed; with ``hooks``/``functorch`` (or a tail whose layers the patient norms do not
   cover, :func:`grad_sample_mode_for`) from per-image gradients summed per patient
   (:func:`sum_grad_samples_by_patient`) before Opacus clips. Either way the clipped "samples" are
   patients, so adding or removing all of one patient's images moves the clipped sum by at most
   ``max_grad_norm``;
3. adds Opacus' Gaussian noise as usual, and the accountant counts steps at rate ``q``: the
   epsilon is a patient's.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler


class PatientPoissonSampler(Sampler[list[int]]):
    """Batches of image indices: each patient's images, for patients drawn with probability ``q``.

    Args:
        patient_codes: one integer patient code per image (0..P-1).
        sample_rate: ``q``, each patient's probability of being in a step's batch.
        steps: batches per epoch (``len`` of the loader; Opacus derives ``q = 1 / len``).
        generator: the draws' random source.
    """

    def __init__(
        self, patient_codes: torch.Tensor, sample_rate: float, steps: int, generator: torch.Generator
    ) -> None:
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        codes = torch.as_tensor(patient_codes, dtype=torch.long)
        self.num_patients = int(codes.max()) + 1 if codes.numel() else 0
        order = torch.argsort(codes, stable=True)
        counts = torch.bincount(codes, minlength=self.num_patients).tolist()
        self._images_of = list(torch.split(order, counts))
        self.sample_rate = float(sample_rate)
        self.steps = int(steps)
        self.generator = generator

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            drawn = torch.rand(self.num_patients, generator=self.generator) < self.sample_rate
            chosen = [self._images_of[p] for p in drawn.nonzero().flatten().tolist()]
            yield torch.cat(chosen).tolist() if chosen else []


class _Rows(torch.utils.data.Dataset):
    """Rows of equally long tensors, fetched a whole batch at a time (an empty batch included)."""

    def __init__(self, *tensors: torch.Tensor) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        return tuple(t[index] for t in self.tensors)

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, ...]:
        rows = torch.as_tensor(indices, dtype=torch.long)
        return tuple(t[rows] for t in self.tensors)


def _batch_as_is(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return batch


def patient_codes_of(patients: Sequence[str]) -> torch.Tensor:
    """One integer code per image, equal for images of the same patient (first-seen order)."""
    codes: dict[str, int] = {}
    return torch.tensor([codes.setdefault(p, len(codes)) for p in patients], dtype=torch.long)


def patient_loader(
    tensors: Sequence[torch.Tensor], patients: Sequence[str], sample_rate: float, generator: torch.Generator
) -> DataLoader:
    """A loader over ``tensors`` (plus the patient code as the last item) with patient Poisson batches.

    ``ceil(1 / q)`` batches per epoch, so that Opacus' ``1 / len(loader)`` is the planned rate.
    """
    if len(patients) != len(tensors[0]):
        raise ValueError(f"{len(patients)} patient ids for {len(tensors[0])} images; give one per image")
    codes = patient_codes_of(patients)
    steps = max(1, math.ceil(1.0 / sample_rate - 1e-9))
    sampler = PatientPoissonSampler(codes, 1.0 / steps, steps, generator)
    return DataLoader(_Rows(*tensors, codes), batch_sampler=sampler, collate_fn=_batch_as_is)


def sum_grad_samples_by_patient(params: Sequence[nn.Parameter], patient_codes: torch.Tensor) -> int:
    """Replace each parameter's per-image ``grad_sample`` by its per-patient sums, in place.

    Called between the backward pass and the DP optimizer's step; Opacus then clips each patient's
    summed gradient as one sample. Returns the number of patients in the batch.
    """
    _, group = torch.unique(patient_codes, return_inverse=True)
    num_groups = int(group.max()) + 1 if group.numel() else 0
    for param in params:
        per_image = getattr(param, "grad_sample", None)
        if per_image is None:
            continue
        if not isinstance(per_image, torch.Tensor):
            raise ValueError("per-image gradients were accumulated over several batches; the patient unit "
                             "needs one backward pass per step")
        if len(per_image) != len(group):
            raise ValueError(f"a per-image gradient has {len(per_image)} rows for {len(group)} images")
        summed = per_image.new_zeros((num_groups, *per_image.shape[1:]))
        summed.index_add_(0, group.to(per_image.device), per_image)
        param.grad_sample = summed
    return num_groups


def grad_sample_mode_for(configured: str, unit: str, *, patient_norms_supported: bool = False) -> str:
    """The Opacus grad-sample mode a step uses.

    The configured one, except ``ghost`` with the patient unit on a tail whose layers the per-patient
    ghost norms do not cover (``patient_norms_supported`` False): then per-image gradients (``hooks``),
    summed per patient before clipping.
    """
    if unit == "patient" and configured == "ghost" and not patient_norms_supported:
        return "hooks"
    return configured
