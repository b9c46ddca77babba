"""Each site's personal head: a class-balanced linear probe on the current global features.

After every round (and at the end) a site fits its own classifier on the pooled image features
that the frozen trunk and the *current global shared layers* give for its training patients,
and evaluates that. It is multinomial logistic regression, fitted by L-BFGS (SciPy, float64)
on standardised features, with the L2 strength chosen by patient-level k-fold cross-validation
on the training patients (weighted log-loss, so a tiny validation fold still ranks the choices).

Privacy: the personal head is fitted without DP on the site's own data. That is allowed because
it never leaves the site and never feeds a DP step: it is a separate object, never loaded into
the model that DP-SGD trains, so the shared-layer update a site sends is the same whatever its
personal head is (``tests/client/test_personal_head.py`` checks this bit for bit). Its class
weights and standardisation statistics come from the site's private data, which is fine here
for the same reason and would *not* be fine inside DP training.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import minimize

logger = logging.getLogger(__name__)

L2_GRID: tuple[float, ...] = tuple(10.0**e for e in (-3, -2, -1.5, -1, -0.5, 0, 1))
"""Candidate L2 strengths (on standardised features, per mean training example)."""

MAX_FOLDS = 5

LAYER_SOURCES = ("global", "pretrained", "fine-tuned")

SHARED_PREFIX = "shared/"
"""State-dict prefix of the personal copy of the shared layers, when the site fine-tuned one."""


@dataclass(frozen=True)
class PersonalHead:
    """Standardisation + linear classifier; ``logits(features) = ((x - mean) / scale) @ weight.T + bias``."""

    mean: torch.Tensor
    scale: torch.Tensor
    weight: torch.Tensor  # (num_classes, feature_dim)
    bias: torch.Tensor  # (num_classes,)
    l2: float
    folds: int  # 0 when there were too few patients to cross-validate and the default strength was used
    validation_loss: float = math.nan  # cross-validated class-balanced log-loss at ``l2`` (nan without folds)
    layers: str = "global"  # which shared layers the features come from: "global", "pretrained" or "fine-tuned"
    shared: Mapping[str, torch.Tensor] | None = field(default=None, repr=False)
    """The shared-layer tensors the features come from when they are not the global ones (the
    pretrained layers, or the site's own fine-tuned copy, ``client.personal_finetune``)."""

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        x = (features.double() - self.mean) / self.scale
        return (x @ self.weight.T + self.bias).float()

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"mean": self.mean, "scale": self.scale, "weight": self.weight, "bias": self.bias,
                 "l2": torch.tensor(self.l2, dtype=torch.float64), "folds": torch.tensor(self.folds),
                 "validation_loss": torch.tensor(self.validation_loss, dtype=torch.float64),
                 "layers": torch.tensor(LAYER_SOURCES.index(self.layers))}
        state.update({SHARED_PREFIX + name: tensor for name, tensor in (self.shared or {}).items()})
        return state

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor]) -> PersonalHead:
        shared = {name[len(SHARED_PREFIX):]: tensor for name, tensor in state.items() if name.startswith(SHARED_PREFIX)}
        return cls(mean=state["mean"], scale=state["scale"], weight=state["weight"], bias=state["bias"],
                   l2=float(state["l2"]), folds=int(state["folds"]),
                   validation_loss=float(state.get("validation_loss", math.nan)),
                   layers=LAYER_SOURCES[int(state.get("layers", 0))], shared=shared or None)


def balanced_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-example weights ``n / (num_classes * count[label])`` (scikit-learn's ``class_weight="balanced"``)."""
    counts = torch.bincount(labels, minlength=num_classes).double()
    per_class = len(labels) / (num_classes * counts.clamp(min=1))
    return per_class[labels]


def fit_logistic(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: float,
    sample_weight: torch.Tensor | None = None, max_iter: int = 200,
    start: tuple[torch.Tensor, torch.Tensor] | None = None, tolerance: float = 1e-7,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise ``sum_i s_i CE_i / sum_i s_i + l2/2 ||W||^2`` (bias not penalised); returns ``(W, b)``.

    Equivalent to scikit-learn's ``LogisticRegression(C=1 / (l2 * sum(s)))`` for the multinomial loss.
    Solved by SciPy's L-BFGS-B on the exact gradient, in float64 (SciPy, not ``torch.optim``: the first
    torch optimizer of a process imports TorchDynamo, which costs an evaluate-only ClientApp process
    about 1.7 s). ``start`` warm-starts it (from the solution for a neighbouring ``l2``, say).
    """
    x = features.double().numpy()
    y = labels.long().numpy()
    n, d = x.shape
    s = np.ones(n) if sample_weight is None else sample_weight.double().numpy()
    s = s / s.sum()
    onehot = np.zeros((n, num_classes))
    onehot[np.arange(n), y] = 1.0

    def loss_and_gradient(theta: np.ndarray) -> tuple[float, np.ndarray]:
        weight, bias = theta[: num_classes * d].reshape(num_classes, d), theta[num_classes * d :]
        logits = x @ weight.T + bias
        logits -= logits.max(axis=1, keepdims=True)
        log_norm = np.log(np.exp(logits).sum(axis=1))
        loss = float((s * (log_norm - (logits * onehot).sum(axis=1))).sum() + 0.5 * l2 * (weight * weight).sum())
        residual = (np.exp(logits - log_norm[:, None]) - onehot) * s[:, None]
        grad_weight = residual.T @ x + l2 * weight
        return loss, np.concatenate([grad_weight.ravel(), residual.sum(axis=0)])

    theta0 = (np.zeros(num_classes * (d + 1)) if start is None
              else np.concatenate([start[0].double().numpy().ravel(), start[1].double().numpy()]))
    result = minimize(loss_and_gradient, theta0, jac=True, method="L-BFGS-B",
                      options={"maxiter": max_iter, "gtol": tolerance, "ftol": tolerance * 1e-4})
    theta = result.x
    return (torch.from_numpy(theta[: num_classes * d].reshape(num_classes, d).copy()),
            torch.from_numpy(theta[num_classes * d :].copy()))


def patient_folds(patients: Sequence[str], labels: torch.Tensor, num_classes: int,
                  max_folds: int = MAX_FOLDS) -> list[torch.Tensor]:
    """Validation masks of a patient-level k-fold split (every image of a patient in one fold).

    Patients are dealt to folds class by class (by each patient's first label) in a fixed order, so
    every fold sees both classes where the data allow and the split is the same on every run.
    """
    first_label: dict[str, int] = {}
    for patient, label in zip(patients, labels.tolist()):
        first_label.setdefault(patient, int(label))
    per_class = [sorted(p for p, c in first_label.items() if c == k) for k in range(num_classes)]
    smallest = min((len(group) for group in per_class), default=0)
    folds = min(max_folds, smallest)
    if folds < 2:
        return []
    fold_of: dict[str, int] = {}
    for group in per_class:
        for index, patient in enumerate(group):
            fold_of[patient] = index % folds
    assignment = torch.tensor([fold_of[p] for p in patients])
    return [assignment == k for k in range(folds)]


def fit_personal_head(
    features: torch.Tensor, labels: torch.Tensor, patients: Sequence[str], num_classes: int,
    grid: Sequence[float] = L2_GRID,
) -> PersonalHead:
    """Fit the site's personal head on its training images (see the module docstring)."""
    return fit_personal_head_with_validation(features, labels, patients, num_classes, grid)[0]


def fit_personal_head_with_validation(
    features: torch.Tensor, labels: torch.Tensor, patients: Sequence[str], num_classes: int,
    grid: Sequence[float] = L2_GRID,
) -> tuple[PersonalHead, torch.Tensor | None]:
    """The personal head and its out-of-fold logits ``(N, num_classes)`` on the training images.

    Each image's out-of-fold logits come from the cross-validation fit (at the chosen L2 strength) that
    held out its patient's whole fold: they are predictions on *validation patients*, what the site's
    operating point is chosen on (``client.inference.operating_point``). ``None`` when there were too
    few patients to cross-validate. They cost no extra fit: the cross-validation computes them anyway.
    (The standardisation uses all training images, as the L2 choice does; it holds no label.)
    """
    if len(labels) == 0:
        raise ValueError("this site has no training images; check its manifest and the split")
    x = features.double()
    y = labels.long()
    mean = x.mean(0)
    scale = x.std(0, unbiased=False).clamp(min=1e-6)
    z = (x - mean) / scale
    folds = patient_folds(patients, y, num_classes)
    out_of_fold = None
    if folds:
        # Strongest regularisation first, each fit warm-started from the previous one (a path).
        order = sorted(range(len(grid)), key=lambda i: -grid[i])
        scores = [0.0] * len(grid)
        held_out = torch.zeros(len(grid), len(y), num_classes, dtype=torch.float64)
        for validation in folds:
            train = ~validation
            w_train = balanced_weights(y[train], num_classes)
            w_val = balanced_weights(y[validation], num_classes)
            solution = None
            for i in order:
                solution = fit_logistic(z[train], y[train], num_classes, grid[i], w_train, start=solution,
                                        tolerance=1e-5, max_iter=100)
                logits = z[validation] @ solution[0].T + solution[1]
                held_out[i, validation] = logits
                ce = F.cross_entropy(logits, y[validation], reduction="none")
                scores[i] += float((ce * w_val).sum() / w_val.sum()) / len(folds)
        chosen = min(range(len(grid)), key=lambda i: (scores[i], -grid[i]))
        l2 = grid[chosen]
        out_of_fold = held_out[chosen].float()
        validation_loss = scores[chosen]
    else:
        l2 = 1.0 / len(y)  # scikit-learn's default C=1
        validation_loss = math.nan
    weight, bias = fit_logistic(z, y, num_classes, l2, balanced_weights(y, num_classes))
    if not math.isfinite(float(weight.abs().sum())):
        raise ValueError("the personal head did not converge (non-finite weights); check the site's features")
    head = PersonalHead(mean=mean, scale=scale, weight=weight, bias=bias, l2=l2, folds=len(folds),
                        validation_loss=validation_loss)
    return head, out_of_fold
