"""Specification of the evaluation metrics, checked against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from client.evaluation_metrics import METRIC_KEYS, bootstrap_balanced_accuracy, classification_metrics
from common.wire_contract import EVALUATE_METRIC_KEYS, NUM_EXAMPLES

# Binary case: labels and P(class 1); predictions [0, 1, 1, 0, 1] -> TP=2 FN=1 TN=1 FP=1.
BINARY_LABELS = torch.tensor([0, 0, 1, 1, 1])
BINARY_P1 = torch.tensor([0.1, 0.6, 0.7, 0.4, 0.9])
BINARY_PROBS = torch.stack([1 - BINARY_P1, BINARY_P1], dim=1)

# Three classes; predictions [0, 1, 1, 2, 2, 0].
MULTI_LABELS = np.array([0, 0, 1, 2, 2, 2])
MULTI_PROBS = np.array(
    [
        [0.7, 0.2, 0.1],
        [0.3, 0.5, 0.2],
        [0.1, 0.8, 0.1],
        [0.1, 0.1, 0.8],
        [0.2, 0.2, 0.6],
        [0.5, 0.1, 0.4],
    ]
)


def test_keys_are_exactly_the_wire_contract_evaluate_keys_without_privacy() -> None:
    metrics = classification_metrics(BINARY_PROBS, BINARY_LABELS, 2, scores="probabilities")
    assert set(metrics) == METRIC_KEYS
    assert METRIC_KEYS | {"epsilon", "delta"} == EVALUATE_METRIC_KEYS
    assert all(isinstance(value, float) for value in metrics.values())


def test_binary_metrics_match_hand_computed_values() -> None:
    metrics = classification_metrics(BINARY_PROBS, BINARY_LABELS, 2, scores="probabilities")
    assert metrics["accuracy"] == pytest.approx(3 / 5)
    assert metrics["sensitivity"] == pytest.approx(2 / 3)  # TP / (TP + FN)
    assert metrics["specificity"] == pytest.approx(1 / 2)  # TN / (TN + FP)
    assert metrics["balanced-accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert metrics["auc"] == pytest.approx(5 / 6)  # 5 of 6 positive/negative pairs ranked right
    correct_class_probability = [0.9, 0.4, 0.7, 0.4, 0.9]
    expected_loss = -sum(math.log(p) for p in correct_class_probability) / 5
    assert metrics["loss"] == pytest.approx(expected_loss)
    assert metrics[NUM_EXAMPLES] == 5.0


def test_logits_give_cross_entropy_and_the_same_ranking_metrics() -> None:
    logits = torch.log(BINARY_PROBS) + 3.0  # softmax of these is BINARY_PROBS
    from_logits = classification_metrics(logits, BINARY_LABELS, 2)
    from_probs = classification_metrics(BINARY_PROBS, BINARY_LABELS, 2, scores="probabilities")
    assert from_logits == pytest.approx(from_probs)
    uniform = classification_metrics(torch.zeros(4, 2), torch.tensor([0, 1, 0, 1]), 2)
    assert uniform["loss"] == pytest.approx(math.log(2))


def test_multiclass_metrics_are_macro_one_vs_rest() -> None:
    metrics = classification_metrics(MULTI_PROBS, MULTI_LABELS, 3, scores="probabilities")
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    recalls = [1 / 2, 1 / 1, 2 / 3]
    assert metrics["balanced-accuracy"] == pytest.approx(sum(recalls) / 3)
    assert metrics["sensitivity"] == pytest.approx(sum(recalls) / 3)
    specificities = [3 / 4, 4 / 5, 3 / 3]
    assert metrics["specificity"] == pytest.approx(sum(specificities) / 3)
    assert metrics["auc"] == pytest.approx((7 / 8 + 1 + 1) / 3)
    assert metrics["auc"] == pytest.approx(
        roc_auc_score(MULTI_LABELS, MULTI_PROBS, multi_class="ovr", average="macro")
    )


def test_a_class_absent_from_the_labels_contributes_auc_one_half() -> None:
    labels = np.array([0, 0, 1, 1])
    probs = np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1]])
    metrics = classification_metrics(probs, labels, 3, scores="probabilities")
    assert metrics["auc"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert metrics["balanced-accuracy"] == pytest.approx(1.0)  # recall over present classes
    assert metrics["sensitivity"] == pytest.approx(1.0)


def test_binary_site_without_positives_reports_auc_one_half_and_zero_sensitivity() -> None:
    metrics = classification_metrics(
        torch.tensor([[0.9, 0.1], [0.3, 0.7]]), torch.tensor([0, 0]), 2, scores="probabilities"
    )
    assert metrics["auc"] == 0.5
    assert metrics["sensitivity"] == 0.0
    assert metrics["specificity"] == pytest.approx(1 / 2)


def test_no_examples_gives_zeros_with_weight_zero() -> None:
    metrics = classification_metrics(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), 2)
    assert set(metrics) == METRIC_KEYS
    assert all(value == 0.0 for value in metrics.values())


@pytest.mark.parametrize(
    ("outputs", "labels", "message"),
    [
        (torch.zeros(3, 3), torch.tensor([0, 1, 0]), "shape"),
        (torch.zeros(3, 2), torch.tensor([0, 2, 0]), "labels must lie"),
        (torch.tensor([[0.0, float("nan")]]), torch.tensor([0]), "NaN"),
    ],
)
def test_malformed_inputs_are_rejected_with_a_clear_message(
    outputs: torch.Tensor, labels: torch.Tensor, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        classification_metrics(outputs, labels, 2)


@pytest.mark.parametrize("seed", range(5))
def test_auc_equals_the_trapezoidal_roc_area_with_tied_scores(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 40)
    labels[:2] = [0, 1]
    scores = rng.integers(0, 6, 40) / 5.0  # few distinct values: many ties
    probabilities = np.stack([1 - scores, scores], axis=1)
    metrics = classification_metrics(probabilities, labels, 2, scores="probabilities")
    assert metrics["auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_the_bootstrap_interval_resamples_patients_and_holds_the_point_estimate() -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1] * 20, 3)  # 40 patients, 3 images each
    patients = [f"p{i // 3}" for i in range(len(labels))]
    logits = np.stack([1 - labels, labels], axis=1).astype(float)
    wrong = rng.choice(len(labels), 30, replace=False)
    logits[wrong] = logits[wrong][:, ::-1]
    point = classification_metrics(logits, labels, 2)["balanced-accuracy"]
    low, high = bootstrap_balanced_accuracy(logits, labels, patients, seed=3)
    assert low < point < high
    assert (low, high) == bootstrap_balanced_accuracy(logits, labels, patients, seed=3)
    # the same images counted as 120 independent patients give a narrower interval
    narrow = bootstrap_balanced_accuracy(logits, labels, [str(i) for i in range(len(labels))], seed=3)
    assert narrow[1] - narrow[0] < high - low


def test_a_perfect_model_has_a_degenerate_interval_and_no_images_give_nan() -> None:
    labels = np.array([0, 1, 0, 1])
    assert bootstrap_balanced_accuracy(np.eye(2)[labels], labels, ["a", "b", "c", "d"]) == (1.0, 1.0)
    low, high = bootstrap_balanced_accuracy(np.zeros((0, 2)), np.zeros(0, dtype=int), [])
    assert np.isnan(low) and np.isnan(high)
