"""The report compares the federation with what each site could do alone and with the pooled ceiling."""

from __future__ import annotations

import math

import pytest

from simulations.experiment import ROW_LABELS, SUMMARY_ROWS, _targets, format_report, format_table, mean_balanced_accuracy


def site(value: float, low: float, high: float) -> dict[str, float]:
    return {"balanced_accuracy": value, "ci_low": low, "ci_high": high}


METRICS = {
    "config": {"name": "t", "privacy": {"enabled": True, "target_epsilon": 8.0}},
    "summary": {"federated": 0.9, "local_linear_probe": 0.8, "local_finetune": 0.85, "pooled_ceiling": 0.95,
                "over_seeds": {"federated": {"seeds": 3, "mean": 0.88, "sd": 0.02, "values": [0.9, 0.88, 0.86]}}},
    "per_site_final": {
        "federated": {"a": site(1.0, 0.9, 1.0), "b": site(0.8, 0.6, 0.95)},
        "local_linear_probe": {"a": site(0.9, 0.8, 1.0), "b": site(0.7, 0.5, 0.9)},
    },
}


def test_every_row_the_issue_names_is_in_the_summary_order_with_a_label() -> None:
    for name in ("federated", "federated_no_dp", "local_linear_probe", "local_finetune", "pooled_ceiling", "local",
                 "pooled", "random_init"):
        assert name in SUMMARY_ROWS and name in ROW_LABELS


def test_the_mean_counts_every_site_once_and_skips_missing_values() -> None:
    rows = {"a": {"balanced_accuracy": 1.0}, "b": {"balanced_accuracy": 0.5}, "c": {"balanced_accuracy": math.nan},
            "d": {"status": "failed"}}
    assert mean_balanced_accuracy(rows) == pytest.approx(0.75)


def test_targets_measure_the_gain_over_the_best_site_alone_and_the_share_of_the_gap_to_the_ceiling() -> None:
    targets = _targets(METRICS["summary"])
    assert targets["best_single_site"] == pytest.approx(0.85)
    assert targets["federated_gain_over_best_single_site"] == pytest.approx(0.05)
    assert targets["federated_share_of_gap_to_ceiling"] == pytest.approx(0.5)


def test_a_ceiling_below_the_best_site_alone_gives_no_share() -> None:
    targets = _targets({"federated": 0.9, "local_linear_probe": 0.85, "pooled_ceiling": 0.8})
    assert "federated_share_of_gap_to_ceiling" not in targets


def test_the_table_shows_each_sites_interval_and_the_spread_over_seeds() -> None:
    table = format_table(METRICS)
    federated = next(line for line in table.splitlines() if line.startswith(f"| {ROW_LABELS['federated']} |"))
    assert "0.800 [0.60, 0.95]" in federated
    assert "over 3 seeds: 0.880 ± 0.020" in federated
    report = format_report({**METRICS, "summary": {**METRICS["summary"], **_targets(METRICS["summary"])}}, [])
    assert "unit of privacy one image" in report  # the configuration above predates the patient unit
    assert "+0.050 against it, 50% of the way to the pooled ceiling" in report


def test_the_report_states_the_unit_epsilon_and_delta_of_the_privacy_guarantee() -> None:
    config = {"name": "t", "privacy": {"enabled": True, "target_epsilon": 3.0, "unit": "patient"}}
    report = format_report({**METRICS, "config": config, "summary": {**METRICS["summary"], "max_delta": 8.1e-6}}, [])
    assert "target epsilon 3.0 per site" in report
    assert "unit of privacy one patient (all of a patient's images)" in report
    assert "delta at most 8.1e-06" in report
