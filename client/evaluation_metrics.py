"""Classification metrics a site reports after evaluation: aggregates only, never per image.

:func:`classification_metrics` returns exactly the keys of
``common.wire_contract.EVALUATE_METRIC_KEYS`` minus ``epsilon`` and ``delta`` (the caller adds
those from the privacy ledger):

``loss``
    mean cross-entropy (from logits by log-softmax, from probabilities by ``-log p``).
``accuracy``
    fraction of argmax predictions equal to the label.
``balanced-accuracy``
    mean recall over the classes PRESENT in the labels (as scikit-learn does).
``auc``
    area under the ROC curve. Binary: for class 1. Multi-class: one-vs-rest, macro mean over
    all ``num_classes`` classes. A class whose one-vs-rest AUC is undefined (no example of the
    class, or only examples of it) contributes 0.5, the value of an uninformative classifier.
    A site that lacks a class therefore reports an AUC pulled toward 0.5: conservative, and
    the federation-wide average stays defined.
``sensitivity`` / ``specificity``
    Binary: for class 1 as the positive class. Multi-class: macro mean over the classes for
    which the one-vs-rest rate is defined (sensitivity needs an example of the class,
    specificity an example of another class). A rate that is undefined everywhere is 0.0.
``num-examples``
    number of evaluated examples (the aggregation weight).

With no examples at all every metric is 0.0 and ``num-examples`` is 0, so a weighted average
over sites ignores the site.
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
import torch

from common.wire_contract import NUM_EXAMPLES

logger = logging.getLogger(__name__)

METRIC_KEYS: frozenset[str] = frozenset(
    {"loss", "accuracy", "balanced-accuracy", "auc", "sensitivity", "specificity", NUM_EXAMPLES}
)
_UNINFORMATIVE_AUC = 0.5
_PROBABILITY_FLOOR = 1e-12

ArrayLike = torch.Tensor | np.ndarray


def classification_metrics(
    logits_or_probs: ArrayLike,
    labels: ArrayLike,
    num_classes: int,
    *,
    scores: Literal["logits", "probabilities"] = "logits",
) -> dict[str, float]:
    """Aggregate metrics of one evaluation pass (see the module docstring for each key).

    Args:
        logits_or_probs: ``(N, num_classes)`` model outputs for all N evaluated examples.
        labels: ``(N,)`` integer class labels in ``[0, num_classes)``.
        num_classes: number of diagnostic classes (>= 2).
        scores: whether ``logits_or_probs`` holds raw logits or class probabilities.
    """
    outputs = _as_float_matrix(logits_or_probs)
    targets = _as_label_vector(labels)
    _check_shapes(outputs, targets, num_classes, scores)
    count = int(targets.shape[0])
    if count == 0:
        return {key: 0.0 for key in METRIC_KEYS}

    probabilities, log_probabilities = _probabilities(outputs, scores)
    predictions = probabilities.argmax(axis=1)
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (targets, predictions), 1)

    sensitivity, specificity = _sensitivity_specificity(confusion)
    return {
        "loss": float(-log_probabilities[np.arange(count), targets].mean()),
        "accuracy": float(np.trace(confusion) / count),
        "balanced-accuracy": _balanced_accuracy(confusion),
        "auc": _auc(probabilities, targets, num_classes),
        "sensitivity": sensitivity,
        "specificity": specificity,
        NUM_EXAMPLES: float(count),
    }


def _probabilities(outputs: np.ndarray, scores: str) -> tuple[np.ndarray, np.ndarray]:
    if scores == "logits":
        log_probabilities = torch.log_softmax(torch.from_numpy(outputs), dim=1).numpy()
        return np.exp(log_probabilities), log_probabilities
    return outputs, np.log(np.clip(outputs, _PROBABILITY_FLOOR, None))


def _balanced_accuracy(confusion: np.ndarray) -> float:
    support = confusion.sum(axis=1)
    present = support > 0
    recalls = np.diag(confusion)[present] / support[present]
    return float(recalls.mean())


def _one_vs_rest_rates(confusion: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-class sensitivity and specificity, leaving out the undefined ones."""
    total = confusion.sum()
    sensitivities: list[float] = []
    specificities: list[float] = []
    for cls in range(confusion.shape[0]):
        true_positive = confusion[cls, cls]
        positives = confusion[cls, :].sum()
        negatives = total - positives
        false_positive = confusion[:, cls].sum() - true_positive
        if positives > 0:
            sensitivities.append(true_positive / positives)
        if negatives > 0:
            specificities.append((negatives - false_positive) / negatives)
    return sensitivities, specificities


def _sensitivity_specificity(confusion: np.ndarray) -> tuple[float, float]:
    if confusion.shape[0] == 2:
        (true_negative, false_positive), (false_negative, true_positive) = confusion
        positives = true_positive + false_negative
        negatives = true_negative + false_positive
        sensitivity = true_positive / positives if positives else 0.0
        specificity = true_negative / negatives if negatives else 0.0
        return float(sensitivity), float(specificity)
    sensitivities, specificities = _one_vs_rest_rates(confusion)
    return (
        float(np.mean(sensitivities)) if sensitivities else 0.0,
        float(np.mean(specificities)) if specificities else 0.0,
    )


def _auc(probabilities: np.ndarray, targets: np.ndarray, num_classes: int) -> float:
    classes = [1] if num_classes == 2 else list(range(num_classes))
    per_class = []
    for cls in classes:
        is_class = targets == cls
        if is_class.all() or not is_class.any():
            per_class.append(_UNINFORMATIVE_AUC)
            continue
        per_class.append(_binary_auc(is_class, probabilities[:, cls]))
    return float(np.mean(per_class))


def _binary_auc(is_positive: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve: the share of (positive, negative) pairs the scores order right, ties counting
    one half (Mann-Whitney U over average ranks; the trapezoidal ROC area, ties included)."""
    _values, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based rank, averaged over a tie
    ranks = average_rank[inverse.reshape(-1)]
    positives = int(is_positive.sum())
    negatives = len(scores) - positives
    u_statistic = ranks[is_positive].sum() - positives * (positives + 1) / 2.0
    return float(u_statistic / (positives * negatives))


def _as_float_matrix(values: ArrayLike) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().to("cpu", torch.float64).numpy()
    return np.asarray(values, dtype=np.float64)


def _as_label_vector(values: ArrayLike) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().to("cpu").numpy()
    array = np.asarray(values)
    if array.size and not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.equal(np.mod(array, 1), 0)):
            raise ValueError("labels must be integer class indices")
    return array.astype(np.int64).reshape(-1) if array.ndim <= 1 else array.astype(np.int64)


def _check_shapes(outputs: np.ndarray, targets: np.ndarray, num_classes: int, scores: str) -> None:
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if scores not in ("logits", "probabilities"):
        raise ValueError(f"scores must be 'logits' or 'probabilities', got {scores!r}")
    if outputs.size == 0 and targets.size == 0:
        return
    if targets.ndim != 1:
        raise ValueError(f"labels must be a vector of class indices, got shape {targets.shape}")
    if outputs.ndim != 2 or outputs.shape[1] != num_classes or outputs.shape[0] != targets.shape[0]:
        raise ValueError(
            f"model outputs must have shape (N, num_classes) = ({targets.shape[0]}, {num_classes}), "
            f"got {outputs.shape}"
        )
    if targets.size and (targets.min() < 0 or targets.max() >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}); got values from {targets.min()} to {targets.max()}"
        )
    if not np.all(np.isfinite(outputs)):
        raise ValueError("model outputs contain NaN or infinity; the model diverged")


def bootstrap_balanced_accuracy(
    logits: ArrayLike, labels: ArrayLike, patients: list[str], *, resamples: int = 2000, seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the balanced accuracy, resampling *patients* (all their images).

    Images of one patient are not independent, so the unit resampled is the patient. Resamples in
    which a class is absent average the recalls of the classes present, as the point estimate does.
    Returns ``(low, high)`` at ``level``; both NaN when there are no test images.
    """
    outputs = _as_float_matrix(logits)
    targets = _as_label_vector(labels)
    if len(targets) == 0:
        return float("nan"), float("nan")
    correct = (outputs.argmax(axis=1) == targets).astype(np.float64)
    ids = {patient: index for index, patient in enumerate(dict.fromkeys(patients))}
    patient_of = np.array([ids[p] for p in patients])
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(len(ids), np.full(len(ids), 1.0 / len(ids)), size=resamples)  # (B, patients)
    weights = counts[:, patient_of].astype(np.float64)  # (B, images)
    recalls = []
    for cls in np.unique(targets):
        in_class = targets == cls
        total = weights[:, in_class].sum(axis=1)
        hit = (weights[:, in_class] * correct[in_class]).sum(axis=1)
        recalls.append(np.where(total > 0, hit / np.maximum(total, 1e-12), np.nan))
    scores = np.nanmean(np.vstack(recalls), axis=0)
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.nanpercentile(scores, [tail, 100.0 - tail])
    return float(low), float(high)
