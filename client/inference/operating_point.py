"""The site's decision threshold for the positive class, chosen on its own validation patients.

Binary problems: the positive class is the last one (``"finding"``), a study is called positive when
its probability is at least the threshold. Candidate thresholds are the midpoints between neighbouring
distinct validation scores (plus one below the lowest and one above the highest), so a threshold never
sits on a validation score and the sensitivity/specificity it reports are exactly what it gives there.

* ``youden``: the threshold with the largest sensitivity + specificity - 1 (ties: the one nearest 0.5);
* ``sensitivity``: the highest threshold whose validation sensitivity reaches the target (the best
  specificity at that sensitivity);
* ``specificity``: the lowest threshold whose validation specificity reaches the target;
* ``argmax``: no threshold, the most probable class.

More than two classes have no single threshold: the rule is recorded as ``argmax`` and predictions
are the most probable class. With too few validation patients (fewer than two per class, so the
personal head could not be cross-validated) the site also falls back to ``argmax`` and says so.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from common.config import OperatingPointConfig


NO_VALIDATION_NOTE = ("too few training patients per class for validation folds (at least two per class); "
                      "the most probable class is predicted")


@dataclass(frozen=True)
class OperatingPoint:
    """A site's decision rule and what it gave on the validation patients.

    rule: ``youden``, ``sensitivity``, ``specificity`` or ``argmax``.
    target: the configured sensitivity/specificity target (``None`` for youden/argmax).
    threshold: probability of the positive class at or above which a study is positive; ``None`` = argmax.
    positive_class: the class the threshold is for (``None`` for argmax).
    sensitivity, specificity: on the validation patients at this threshold (``None`` when not measured).
    validation_images, validation_patients: how much validation data it was chosen on.
    note: why the rule is not the configured one, when it is not.
    """

    rule: str
    target: float | None
    threshold: float | None
    positive_class: str | None
    sensitivity: float | None
    specificity: float | None
    validation_images: int
    validation_patients: int
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> OperatingPoint:
        return cls(**{key: raw.get(key) for key in cls.__dataclass_fields__ if key != "note"}, note=raw.get("note", ""))

    def decide(self, probabilities: torch.Tensor) -> torch.Tensor:
        """Class index per row of ``(N, C)`` probabilities under this rule."""
        if self.threshold is None:
            return probabilities.argmax(dim=1)
        return (probabilities[:, -1] >= self.threshold).long() * (probabilities.shape[1] - 1)

    def describe(self) -> str:
        if self.threshold is None:
            return f"most probable class ({self.note or 'argmax'})"
        goal = f" {self.rule} >= {self.target:g}" if self.target is not None else " youden"
        measured = ""
        if self.sensitivity is not None and self.specificity is not None:
            measured = (f"; validation sensitivity {self.sensitivity:.3f}, specificity {self.specificity:.3f} "
                        f"on {self.validation_patients} patients")
        return f"P({self.positive_class}) >= {self.threshold:.4f} ({goal.strip()}{measured})"


def candidate_thresholds(scores: np.ndarray) -> np.ndarray:
    """Midpoints between neighbouring distinct scores, plus one below the lowest and one above the highest."""
    distinct = np.unique(scores)
    if distinct.size == 0:
        return np.array([0.5])
    inner = (distinct[1:] + distinct[:-1]) / 2.0
    return np.concatenate([[distinct[0] / 2.0], inner, [(distinct[-1] + 1.0) / 2.0]])


def rates_at(threshold: float, scores: np.ndarray, positive: np.ndarray) -> tuple[float, float]:
    """(sensitivity, specificity) of calling ``scores >= threshold`` positive."""
    called = scores >= threshold
    sensitivity = float(called[positive].mean()) if positive.any() else float("nan")
    specificity = float((~called[~positive]).mean()) if (~positive).any() else float("nan")
    return sensitivity, specificity


def choose_threshold(scores: np.ndarray, positive: np.ndarray, rule: str, target: float | None) -> float:
    """The threshold ``rule`` picks on validation ``scores`` (probability of the positive class).

    Raises ValueError when the validation data hold only one class (no rule is defined then).
    """
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    if positive.all() or not positive.any():
        raise ValueError("the validation patients hold only one class; no threshold can be chosen")
    candidates = candidate_thresholds(scores)
    rates = np.array([rates_at(t, scores, positive) for t in candidates])
    sensitivity, specificity = rates[:, 0], rates[:, 1]
    if rule == "youden":
        youden = sensitivity + specificity - 1.0
        best = np.flatnonzero(np.isclose(youden, youden.max()))
        return float(candidates[best[np.argmin(np.abs(candidates[best] - 0.5))]])
    if rule == "sensitivity":
        assert target is not None
        meets = np.flatnonzero(sensitivity >= target - 1e-12)
        return float(candidates[meets].max())  # the lowest candidate calls everything positive: never empty
    if rule == "specificity":
        assert target is not None
        meets = np.flatnonzero(specificity >= target - 1e-12)
        return float(candidates[meets].min())
    raise ValueError(f"unknown operating-point rule {rule!r}")


def operating_point_from_validation(
    probabilities: torch.Tensor | None, labels: torch.Tensor, patients: list[str], class_names: list[str],
    config: OperatingPointConfig, *, no_validation_note: str = NO_VALIDATION_NOTE,
) -> OperatingPoint:
    """Apply the configured rule to validation probabilities ``(N, C)`` (``None``: no validation data,
    for the reason ``no_validation_note``)."""
    count, patient_count = int(len(labels)), len(set(patients))
    fallback = dict(rule="argmax", target=None, threshold=None, positive_class=None, sensitivity=None,
                    specificity=None, validation_images=count, validation_patients=patient_count)
    if len(class_names) != 2:
        return OperatingPoint(**fallback, note=f"{len(class_names)} classes have no single threshold; "
                                               "the most probable class is predicted")
    if config.rule == "argmax":
        return OperatingPoint(**fallback, note="configured: operating_point.rule = argmax")
    if probabilities is None:
        return OperatingPoint(**fallback, note=no_validation_note)
    scores = probabilities[:, -1].double().numpy()
    positive = labels.numpy() == len(class_names) - 1
    try:
        threshold = choose_threshold(scores, positive, config.rule, config.target)
    except ValueError as error:
        return OperatingPoint(**fallback, note=str(error))
    sensitivity, specificity = rates_at(threshold, scores, positive)
    return OperatingPoint(rule=config.rule, target=config.target, threshold=threshold, positive_class=class_names[-1],
                          sensitivity=sensitivity, specificity=specificity, validation_images=count,
                          validation_patients=patient_count)
