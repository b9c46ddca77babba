"""split_by_patient and class_weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.data.patient_split import class_weights, split_by_patient


def _cohort(num_patients: int = 40, seed: int = 1) -> tuple[list[str], list[int]]:
    rng = np.random.default_rng(seed)
    ids, labels = [], []
    for p in range(num_patients):
        label = int(p % 4 == 0)  # 25 % positive patients
        for _ in range(int(rng.integers(1, 5))):
            ids.append(f"patient-{p:03d}")
            labels.append(label)
    return ids, labels


def test_no_patient_is_on_both_sides_and_every_image_is_used() -> None:
    ids, labels = _cohort()
    train, test = split_by_patient(ids, labels, 0.25, seed=0)
    assert not {ids[i] for i in train} & {ids[i] for i in test}
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(len(ids)))


def test_split_is_stratified_by_the_patients_majority_label() -> None:
    ids, labels = _cohort(80)
    _, test = split_by_patient(ids, labels, 0.25, seed=0)
    test_patients = {ids[i] for i in test}
    positives = {ids[i] for i, y in enumerate(labels) if y == 1}
    assert len(test_patients & positives) == round(len(positives) * 0.25)
    assert len(test_patients - positives) == round((80 - len(positives)) * 0.25)


def test_same_seed_gives_the_same_split_regardless_of_file_order() -> None:
    ids, labels = _cohort()
    train, test = split_by_patient(ids, labels, 0.3, seed=7)
    order = np.random.default_rng(3).permutation(len(ids))
    shuffled_ids = [ids[i] for i in order]
    shuffled_labels = [labels[i] for i in order]
    _, test2 = split_by_patient(shuffled_ids, shuffled_labels, 0.3, seed=7)
    assert {ids[i] for i in test} == {shuffled_ids[i] for i in test2}
    again_train, again_test = split_by_patient(ids, labels, 0.3, seed=7)
    assert np.array_equal(train, again_train) and np.array_equal(test, again_test)


def test_different_seeds_give_different_splits() -> None:
    ids, labels = _cohort()
    tests = {tuple(split_by_patient(ids, labels, 0.3, seed=s)[1].tolist()) for s in range(5)}
    assert len(tests) > 1


def test_adding_a_patient_moves_few_existing_patients() -> None:
    ids, labels = _cohort(60)
    _, before = split_by_patient(ids, labels, 0.25, seed=0)
    _, after = split_by_patient(ids + ["patient-new"], labels + [0], 0.25, seed=0)
    moved = {ids[i] for i in before} ^ {(ids + ["patient-new"])[i] for i in after}
    assert len(moved - {"patient-new"}) <= 2


def test_tiny_sites_still_get_a_train_and_a_test_side() -> None:
    train, test = split_by_patient(["a", "a", "b"], [0, 0, 1], 0.25, seed=0)
    assert len(train) > 0 and len(test) > 0
    train, test = split_by_patient(["a", "b"], [0, 0], 0.1, seed=0)
    assert len(train) == 1 and len(test) == 1


def test_single_patient_goes_to_train() -> None:
    train, test = split_by_patient(["a", "a"], [0, 1], 0.5, seed=0)
    assert train.tolist() == [0, 1] and test.tolist() == []


def test_mixed_label_patient_follows_its_majority_label() -> None:
    ids = ["m", "m", "m"] + [f"n{i}" for i in range(3)] + [f"p{i}" for i in range(3)]
    labels = [1, 1, 0] + [0, 0, 0] + [1, 1, 1]
    # With 1/3 of each stratum in test and "m" counted as positive, positives have 4 patients.
    _, test = split_by_patient(ids, labels, 0.34, seed=0)
    test_patients = {ids[i] for i in test}
    assert len(test_patients & {"m", "p0", "p1", "p2"}) == 1


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="test_fraction"):
        split_by_patient(["a"], [0], 1.0, seed=0)
    with pytest.raises(ValueError, match="one of each per image"):
        split_by_patient(["a", "b"], [0], 0.5, seed=0)


def test_labels_may_be_a_tensor() -> None:
    ids, labels = _cohort()
    a = split_by_patient(ids, torch.tensor(labels), 0.25, seed=0)
    b = split_by_patient(ids, labels, 0.25, seed=0)
    assert np.array_equal(a[1], b[1])


def test_class_weights_are_inverse_frequency_with_mean_one() -> None:
    weights = class_weights([0, 0, 0, 1], num_classes=2)
    assert weights.dtype == torch.float32
    assert torch.isclose(weights.mean(), torch.tensor(1.0))
    assert torch.isclose(weights[1] / weights[0], torch.tensor(3.0))


def test_absent_class_gets_weight_one_and_mean_stays_one() -> None:
    weights = class_weights(torch.tensor([0, 0, 2]), num_classes=3)
    assert weights[1] == 1.0 and torch.isclose(weights.mean(), torch.tensor(1.0))
    assert torch.isclose(weights[2] / weights[0], torch.tensor(2.0))


def test_class_weights_reject_out_of_range_labels() -> None:
    with pytest.raises(ValueError, match="0..1"):
        class_weights([0, 2], num_classes=2)
