"""Specification of the privacy plan: one noise multiplier for every step of the federation, as Opacus counts steps."""

from __future__ import annotations

import warnings

import pytest
from opacus.accountants import RDPAccountant

from client.privacy.privacy_plan import PrivacyBudgetError, default_delta, plan_noise, planned_steps, sample_rate_for, steps_per_epoch


@pytest.fixture(autouse=True)
def _quiet_opacus_warnings() -> None:
    warnings.filterwarnings("ignore", message=".*Optimal order.*")


def test_default_delta_is_at_most_one_over_n_to_the_1_1_and_at_most_1e_5() -> None:
    assert default_delta(30) == pytest.approx(1e-5)  # small sites: 1/30^1.1 = 0.024 is far too loose
    assert default_delta(10**6) == pytest.approx(1 / (10**6) ** 1.1)
    for n in (1, 7, 29, 100, 1000, 10**5, 10**7):
        assert default_delta(n) <= min(1e-5, 1 / n**1.1) * (1 + 1e-12)
    with pytest.raises(ValueError):
        default_delta(0)


def test_sample_rate_matches_opacus_one_over_number_of_batches() -> None:
    assert sample_rate_for(64, 16) == pytest.approx(1 / 4)
    assert sample_rate_for(65, 16) == pytest.approx(1 / 5)
    assert steps_per_epoch(1 / 7) == 7
    assert planned_steps(rounds=5, local_epochs=2, sample_rate=1 / 4) == 40


def test_planned_noise_spends_at_most_the_target_over_all_planned_steps() -> None:
    rate = sample_rate_for(64, 16)
    plan = {"target_epsilon": 3.0, "delta": 1e-3, "sample_rate": rate, "planned_steps": planned_steps(3, 1, rate),
            "accountant": "rdp"}
    sigma = plan_noise(**plan)
    accountant = RDPAccountant()
    accountant.history = [(sigma, plan["sample_rate"], plan["planned_steps"])]
    epsilon = accountant.get_epsilon(delta=1e-3)
    assert epsilon <= 3.0
    assert epsilon > 3.0 - 0.05


def test_impossible_budget_raises_a_clear_error() -> None:
    with pytest.raises(PrivacyBudgetError, match="target_epsilon"):
        plan_noise(target_epsilon=0.01, delta=1e-10, sample_rate=1.0, planned_steps=10)
