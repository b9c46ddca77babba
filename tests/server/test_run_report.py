"""One report writer for real runs and simulations: it compares the federation with what each site could do alone
and with the pooled ceiling, states the privacy guarantee, and prints one line per round."""

from __future__ import annotations

import math

import pytest

from server.run_report import (
    ROW_LABELS,
    SUMMARY_ROWS,
    format_report,
    format_round_line,
    format_table,
    mean_balanced_accuracy,
    summarize_federated_run,
    comparison_targets,
    seed_spread,
    write_report,
)


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
    found = comparison_targets(METRICS["summary"])
    assert found["best_single_site"] == pytest.approx(0.85)
    assert found["federated_gain_over_best_single_site"] == pytest.approx(0.05)
    assert found["federated_share_of_gap_to_ceiling"] == pytest.approx(0.5)


def test_the_lp_ft_alone_row_is_one_of_the_single_site_alternatives() -> None:
    found = comparison_targets({"federated": 0.9, "local_linear_probe": 0.8, "local_linear_probe_finetune": 0.88,
                                "local_finetune": 0.85})
    assert found["best_single_site"] == pytest.approx(0.88)
    assert found["federated_gain_over_best_single_site"] == pytest.approx(0.02)


def test_a_ceiling_below_the_best_site_alone_gives_no_share() -> None:
    found = comparison_targets({"federated": 0.9, "local_linear_probe": 0.85, "pooled_ceiling": 0.8})
    assert "federated_share_of_gap_to_ceiling" not in found


def test_the_table_shows_each_sites_interval_and_the_spread_over_seeds() -> None:
    table = format_table(METRICS)
    federated = next(line for line in table.splitlines() if line.startswith(f"| {ROW_LABELS['federated']} |"))
    assert "0.800 [0.60, 0.95]" in federated
    assert "over 3 seeds: 0.880 ± 0.020" in federated
    report = format_report({**METRICS, "summary": {**METRICS["summary"], **comparison_targets(METRICS["summary"])}}, [])
    assert "unit of privacy one image" in report  # the configuration above predates the patient unit
    assert "+0.050 against it, 50% of the way to the pooled ceiling" in report


def test_the_ceilings_headroom_over_the_best_site_alone_is_a_target_too() -> None:
    found = comparison_targets(METRICS["summary"])
    assert found["pooled_ceiling_gain_over_best_single_site"] == pytest.approx(0.10)
    assert "pooled_ceiling_share_of_gap_to_ceiling" not in found


def test_the_report_lists_each_seeds_paired_gain_over_the_best_site_alone() -> None:
    over_seeds = {"federated_gain_over_best_single_site": seed_spread([0.01, -0.02, 0.04]),
                  "pooled_ceiling_gain_over_best_single_site": seed_spread([0.05, 0.05])}
    summary = {**METRICS["summary"], **comparison_targets(METRICS["summary"]), "over_seeds": over_seeds}
    report = format_report({**METRICS, "summary": summary}, [])
    assert f"- {ROW_LABELS['federated']} minus the best alone, over 3 seeds: +0.010, -0.020, +0.040 " \
           "(mean +0.010 ± 0.030)" in report
    assert f"- {ROW_LABELS['pooled_ceiling']} minus the best alone, over 2 seeds: +0.050, +0.050 " \
           "(mean +0.050 ± 0.000)" in report
    assert f"{ROW_LABELS['federated_no_dp']} minus" not in report  # no seeds measured it


def test_the_report_states_the_unit_epsilon_and_delta_of_the_privacy_guarantee() -> None:
    config = {"name": "t", "privacy": {"enabled": True, "target_epsilon": 3.0, "unit": "patient"}}
    report = format_report({**METRICS, "config": config, "summary": {**METRICS["summary"], "max_delta": 8.1e-6}}, [])
    assert "target epsilon 3.0 per site" in report
    assert "unit of privacy one patient (all of a patient's images)" in report
    assert "delta at most 8.1e-06" in report


ROUND = {
    "round": 3, "wall_time_s": 12.34, "bytes_sent": 2_500_000, "bytes_received": 1_200_000,
    "sites": {
        "north": {"status": "ok", "eval_status": "ok", "balanced_accuracy": 0.9, "epsilon": 2.5},
        "south": {"status": "ok", "eval_status": "ok", "balanced_accuracy": 0.7, "epsilon": 3.25},
        "east": {"status": "declined-budget", "eval_status": "ok", "balanced_accuracy": 0.5, "epsilon": 7.9},
        "west": {"status": "no-reply", "eval_status": "no-reply"},
    },
    "dropped": [{"site": "south", "reason": "update norm 12.0 > 5 x median"},
                {"site": "west", "reason": "no reply within 45 s"}],
}


def test_the_round_line_names_who_trained_declined_and_was_dropped_with_the_reason() -> None:
    line = format_round_line(ROUND)
    assert line.startswith("round   3 | 1 trained (north) | declined east (declined-budget) | dropped 2 [")
    assert "south: update norm 12.0 > 5 x median" in line and "west: no reply within 45 s" in line
    assert "mean balanced acc. 0.700" in line  # unweighted over the three sites that were evaluated
    assert "max epsilon 7.90" in line and "2.5 MB out / 1.2 MB in" in line and line.endswith("12.3 s")


def test_a_real_runs_rows_are_each_sites_last_evaluation_and_its_report_says_why_there_are_no_intervals(
    tmp_path,
) -> None:
    metrics = {
        "config": {"name": "real", "privacy": {"enabled": True, "target_epsilon": 8.0, "unit": "patient"}},
        "rounds": [
            {"round": 1, "sites": {"a": {"balanced_accuracy": 0.6}, "b": {"balanced_accuracy": 0.7}}, "dropped": []},
            {"round": 2, "sites": {"a": {"balanced_accuracy": 0.8}, "b": {"status": "no-reply"}},
             "dropped": [{"site": "b", "reason": "no reply within 45 s"}]},
        ],
        "summary": {"rounds_completed": 2, "max_delta": 1e-5},
    }
    summarize_federated_run(metrics)
    assert metrics["summary"]["federated"] == pytest.approx(0.75)  # a: round 2, b: its last evaluation (round 1)
    assert metrics["summary"]["privacy"] == {"unit": "patient", "target_epsilon": 8.0, "max_delta": 1e-5,
                                             "enabled": True}
    report = write_report(tmp_path, metrics).read_text()
    assert "| federated, personal models, DP on | 0.750 | 0.800 | 0.700 |" in report
    assert "no intervals: a site sends its test metrics, never per-patient results" in report
    assert "- round 2, b: no reply within 45 s" in report
    assert (tmp_path / "plots" / "balanced_accuracy.png").stat().st_size > 0
