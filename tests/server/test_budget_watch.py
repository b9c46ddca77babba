"""The coordinator excludes an update whose cumulative epsilon went down (a reset budget) or exceeds the target."""

from __future__ import annotations

from server.budget_watch import BudgetWatch


def test_a_growing_cumulative_epsilon_within_the_target_is_accepted() -> None:
    watch = BudgetWatch(8.0)
    assert [watch.check("a", epsilon) for epsilon in (1.0, 2.5, 2.5, 8.0)] == [None] * 4


def test_an_epsilon_that_went_down_is_a_reset_budget_and_names_both_figures() -> None:
    watch = BudgetWatch(8.0)
    watch.check("a", 3.0)

    reason = watch.check("a", 0.8)

    assert reason is not None and "budget reset" in reason and "3 to 0.8" in reason
    assert watch.check("a", 3.5) is None  # once the ledger is restored, the site counts again
    assert watch.check("b", 0.8) is None  # another site's figure is its own


def test_an_epsilon_above_the_federation_target_is_refused() -> None:
    reason = BudgetWatch(3.0).check("a", 3.2)
    assert reason is not None and "above the federation's target 3" in reason


def test_a_resumed_coordinator_remembers_what_each_site_reported_in_recorded_rounds() -> None:
    rounds = [{"round": 1, "sites": {"a": {"status": "ok", "epsilon": 2.0}, "b": {"status": "no-reply"}}},
              {"round": 2, "sites": {"a": {"status": "declined-budget", "epsilon": 2.2},
                                     "b": {"status": "dropped", "epsilon": 9.0}}}]
    watch = BudgetWatch(8.0, rounds)

    assert watch.check("a", 2.1) is not None  # below the 2.2 it reported before the restart
    assert watch.check("b", 1.0) is None  # a dropped reply's figure never counted
