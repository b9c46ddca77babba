"""Planning a site's DP-SGD noise once, for every step of the whole federation.

The privacy unit, the budget and how it is spent are described in ``client.privacy.privacy_budget``,
whose ledger keeps the plan made here. The noise multiplier is chosen ONCE, for all planned steps
of the federation (``rounds x local_epochs x steps_per_epoch``), by :func:`plan_noise`. It is
never re-planned: re-planning every round (``make_private_with_epsilon``) spends the whole budget
every round. Sample rates and steps are computed as Opacus computes them, so the plan and the
accountant agree.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Literal

from opacus.accountants.utils import get_noise_multiplier

from client.privacy.budget_errors import PrivacyBudgetError

logger = logging.getLogger(__name__)

AccountantKind = Literal["rdp", "prv"]
SUPPORTED_ACCOUNTANTS: frozenset[str] = frozenset({"rdp", "prv"})


MAX_DEFAULT_DELTA = 1e-5


def default_delta(n_units: int) -> float:
    """Delta for a site with ``n_units`` training units (patients, or images under the image unit).

    ``min(1e-5, 1 / n^1.1)``: well below ``1 / n``, so that no mechanism that simply publishes
    one unit's records at random can meet it, and never above the usual 1e-5.

    Args:
        n_units: number of privacy units (patients or images) in the site's training set.
    """
    if n_units < 1:
        raise ValueError(f"need at least one training patient (or image) to choose a delta, got {n_units}")
    return min(MAX_DEFAULT_DELTA, 1.0 / float(n_units) ** 1.1)


def sample_rate_for(n_train: int, batch_size: int) -> float:
    """The Poisson sample rate Opacus will use: ``1 / len(data_loader)``, i.e. ``1 / ceil(n / B)``.

    ``PrivacyEngine.make_private`` derives the rate from the number of batches, not from
    ``batch_size / n``; planning with the same figure keeps the plan and the accountant equal.

    Args:
        n_train: number of training images at the site.
        batch_size: the (expected) batch size of the training data loader.
    """
    if n_train < 1 or batch_size < 1:
        raise ValueError(f"n_train and batch_size must be >= 1, got {n_train} and {batch_size}")
    return 1.0 / math.ceil(n_train / batch_size)


def steps_per_epoch(sample_rate: float) -> int:
    """Optimizer steps in one epoch of Poisson sampling at ``sample_rate`` (``ceil(1 / q)``)."""
    check_sample_rate(sample_rate)
    return max(1, math.ceil(1.0 / sample_rate - 1e-9))


def planned_steps(rounds: int, local_epochs: int, sample_rate: float) -> int:
    """All DP-SGD steps a site takes if it trains in every round: rounds x epochs x steps/epoch."""
    if rounds < 1 or local_epochs < 1:
        raise ValueError(f"rounds and local_epochs must be >= 1, got {rounds} and {local_epochs}")
    return rounds * local_epochs * steps_per_epoch(sample_rate)


def plan_noise(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    planned_steps: int,
    accountant: AccountantKind = "rdp",
) -> float:
    """The noise multiplier that spends exactly ``target_epsilon`` over ``planned_steps`` steps.

    Chosen once per federation; every round trains with this same multiplier.

    Args:
        target_epsilon: the site's total epsilon for the whole federation.
        delta: the site's delta (see :func:`default_delta`).
        sample_rate: Poisson sample rate of one step (see :func:`sample_rate_for`).
        planned_steps: all steps of all rounds (see :func:`planned_steps`).
        accountant: ``"rdp"`` or ``"prv"``.
    """
    check_plan_inputs(target_epsilon, delta, sample_rate, planned_steps, accountant)
    try:
        sigma = _search_noise_multiplier(
            float(target_epsilon), float(delta), float(sample_rate), int(planned_steps), accountant
        )
    except ValueError as error:
        raise PrivacyBudgetError(
            f"no noise multiplier reaches epsilon={target_epsilon} at delta={delta} over "
            f"{planned_steps} steps at sample rate {sample_rate} ({error}); raise "
            "privacy.target_epsilon or lower training.rounds / training.local_epochs"
        ) from error
    logger.info(
        "privacy plan: noise multiplier %.4f for %d steps at q=%.5f (epsilon=%s, delta=%.3g, %s)",
        sigma,
        planned_steps,
        sample_rate,
        target_epsilon,
        delta,
        accountant,
    )
    return float(sigma)


@functools.lru_cache(maxsize=64)
def _search_noise_multiplier(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str
) -> float:
    """Opacus' binary search; pure, so cached (the PRV search takes seconds)."""
    return get_noise_multiplier(
        target_epsilon=target_epsilon,
        target_delta=delta,
        sample_rate=sample_rate,
        steps=steps,
        accountant=accountant,
    )


@dataclass(frozen=True)
class PrivacyPlan:
    """The inputs the noise multiplier was planned from.

    Attributes:
        target_epsilon: total epsilon the site allows for the federation.
        delta: the site's delta.
        sample_rate: Poisson sample rate of one step.
        planned_steps: steps over all planned rounds.
        accountant: ``"rdp"`` or ``"prv"``.
        unit: what one unit of privacy is, ``"patient"`` or ``"image"`` (ledgers written before
            the patient unit existed are image-level).
    """

    target_epsilon: float
    delta: float
    sample_rate: float
    planned_steps: int
    accountant: str
    unit: str = "image"


def check_sample_rate(sample_rate: float) -> None:
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")


def check_plan_inputs(
    target_epsilon: float, delta: float, sample_rate: float, planned_steps: int, accountant: str
) -> None:
    if target_epsilon <= 0:
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon}")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    check_sample_rate(sample_rate)
    if planned_steps < 1:
        raise ValueError(f"planned_steps must be >= 1, got {planned_steps}")
    if accountant not in SUPPORTED_ACCOUNTANTS:
        raise ValueError(
            f"accountant must be one of {sorted(SUPPORTED_ACCOUNTANTS)}, got {accountant!r}"
        )
