"""Train/test split by patient, and class weights for the loss.

Splitting by image would put images of the same patient on both sides and overstate test
accuracy; here every patient is entirely in train or entirely in test.

Algorithm (deterministic, independent of file order):

1. group images by patient; a patient's stratum is its majority label (ties -> the
   smaller label index);
2. within each stratum, order the patients by SHA-256 of ``"<seed>:<patient id>"`` (a
   seeded shuffle that does not depend on the order or the number of other patients);
3. the first ``round(n * test_fraction)`` patients of each stratum go to test, keeping at
   least one patient on each side of a stratum that has two or more; if that leaves the
   test side empty overall (every stratum has one patient) the first patient of the
   largest stratum goes to test.

Because the order in step 2 is a per-patient hash, adding patients later moves at most a
few existing patients across the split, and a restart always gives the same split.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Sequence

import numpy as np
import torch


def split_by_patient(
    patient_ids: Sequence[str],
    labels: Sequence[int] | np.ndarray | torch.Tensor,
    test_fraction: float,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test), each sorted ascending, with no patient on both sides.

    patient_ids: one id per image.
    labels: one class index per image.
    test_fraction: wanted share of PATIENTS in test, per majority-label stratum (0 < f < 1).
    seed: changes which patients go to test.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be between 0 and 1 (exclusive), not {test_fraction}")
    label_list = [int(v) for v in (labels.tolist() if hasattr(labels, "tolist") else labels)]
    if len(label_list) != len(patient_ids):
        raise ValueError(f"{len(patient_ids)} patient ids but {len(label_list)} labels; give one of each per image")

    images_of: dict[str, list[int]] = defaultdict(list)
    for index, patient in enumerate(patient_ids):
        images_of[str(patient)].append(index)
    strata: dict[int, list[str]] = defaultdict(list)
    for patient in sorted(images_of):
        counts = Counter(label_list[i] for i in images_of[patient])
        majority = min(counts, key=lambda label: (-counts[label], label))
        strata[majority].append(patient)

    test_patients: set[str] = set()
    for label in sorted(strata):
        ordered = sorted(strata[label], key=lambda p: (_rank(seed, p), p))
        count = len(ordered)
        take = round(count * test_fraction)
        if count >= 2:
            take = min(max(take, 1), count - 1)
        else:
            take = 0
        test_patients.update(ordered[:take])
    if not test_patients and len(images_of) >= 2:
        largest = max(sorted(strata), key=lambda label: len(strata[label]))
        test_patients.add(sorted(strata[largest], key=lambda p: (_rank(seed, p), p))[0])

    test = sorted(i for p in test_patients for i in images_of[p])
    test_set = set(test)
    train = [i for i in range(len(label_list)) if i not in test_set]
    return np.asarray(train, dtype=np.int64), np.asarray(test, dtype=np.int64)


def _rank(seed: int, patient: str) -> str:
    return hashlib.sha256(f"{seed}:{patient}".encode()).hexdigest()


def class_weights(labels: Sequence[int] | np.ndarray | torch.Tensor, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights for a weighted loss, float32 (num_classes,), mean 1.

    Present classes get weights proportional to 1 / count; a class with no examples gets
    1.0 (the loss never sees it), so the mean over all classes is exactly 1.
    """
    values = torch.as_tensor(np.asarray(labels, dtype=np.int64)).flatten()
    if values.numel() and (values.min() < 0 or values.max() >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}")
    counts = torch.bincount(values, minlength=num_classes).to(torch.float64)
    weights = torch.ones(num_classes, dtype=torch.float64)
    present = counts > 0
    if present.any():
        inverse = 1.0 / counts[present]
        weights[present] = inverse / inverse.mean()
    return weights.to(torch.float32)
