"""The operating point: a site's decision threshold, chosen on its validation patients for a configured target."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from client.inference.operating_point import (
    OperatingPoint,
    choose_threshold,
    operating_point_from_validation,
    rates_at,
)
from common.config import ConfigError, FederationConfig, OperatingPointConfig

# Three positives and four negatives with known rates at every cut.
SCORES = np.array([0.9, 0.8, 0.4, 0.7, 0.3, 0.2, 0.1])
POSITIVE = np.array([True, True, True, False, False, False, False])


def test_youden_takes_the_cut_with_the_largest_sensitivity_plus_specificity() -> None:
    # cut 0.75: sens 2/3, spec 1 (J 0.667); cut 0.35: sens 1, spec 3/4 (J 0.75, the largest)
    threshold = choose_threshold(SCORES, POSITIVE, "youden", None)
    assert threshold == pytest.approx(0.35)
    assert rates_at(threshold, SCORES, POSITIVE) == pytest.approx((1.0, 0.75))


def test_a_sensitivity_target_takes_the_highest_threshold_that_reaches_it() -> None:
    threshold = choose_threshold(SCORES, POSITIVE, "sensitivity", 0.6)
    assert threshold == pytest.approx(0.75)  # sens 2/3 >= 0.6 with specificity 1
    assert rates_at(threshold, SCORES, POSITIVE) == pytest.approx((2 / 3, 1.0))
    assert choose_threshold(SCORES, POSITIVE, "sensitivity", 0.9) == pytest.approx(0.35)  # needs all three


def test_a_specificity_target_takes_the_lowest_threshold_that_reaches_it() -> None:
    threshold = choose_threshold(SCORES, POSITIVE, "specificity", 0.5)
    assert threshold == pytest.approx(0.25)
    assert rates_at(threshold, SCORES, POSITIVE) == pytest.approx((1.0, 0.5))


def test_thresholds_never_sit_on_a_validation_score() -> None:
    for rule, target in (("youden", None), ("sensitivity", 0.6), ("specificity", 0.5)):
        assert choose_threshold(SCORES, POSITIVE, rule, target) not in set(SCORES.tolist())


def test_the_operating_point_reports_what_it_gave_on_the_validation_patients_and_decides_with_it() -> None:
    probabilities = torch.tensor(np.stack([1 - SCORES, SCORES], axis=1), dtype=torch.float32)
    labels = torch.tensor(POSITIVE.astype(int))
    point = operating_point_from_validation(probabilities, labels, [f"p{i}" for i in range(7)], ["normal", "finding"],
                                            OperatingPointConfig(rule="sensitivity", target=0.6))
    assert (point.threshold, point.sensitivity, point.specificity) == pytest.approx((0.75, 2 / 3, 1.0))
    assert point.positive_class == "finding" and point.validation_patients == 7
    assert point.decide(probabilities).tolist() == [1, 1, 0, 0, 0, 0, 0]
    assert OperatingPoint.from_dict(json.loads(json.dumps(point.to_dict()))) == point


def test_more_than_two_classes_or_no_validation_folds_mean_the_most_probable_class_and_say_why() -> None:
    three = operating_point_from_validation(torch.rand(6, 3).softmax(1), torch.tensor([0, 1, 2, 0, 1, 2]),
                                            list("abcdef"), ["a", "b", "c"], OperatingPointConfig())
    assert three.threshold is None and "3 classes" in three.note
    none = operating_point_from_validation(None, torch.tensor([0, 1]), ["p", "q"], ["normal", "finding"],
                                           OperatingPointConfig())
    assert none.threshold is None and "too few" in none.note
    probabilities = torch.tensor([[0.6, 0.4], [0.3, 0.7]])
    assert none.decide(probabilities).tolist() == [0, 1]


def test_the_configuration_refuses_a_target_that_does_not_fit_the_rule() -> None:
    with pytest.raises(ConfigError, match=r"\[operating_point\].*needs a target between 0 and 1"):
        FederationConfig.from_dict({"operating_point": {"rule": "sensitivity"}}, source="site.toml")
    with pytest.raises(ConfigError, match="takes no target"):
        FederationConfig.from_dict({"operating_point": {"rule": "youden", "target": 0.9}}, source="site.toml")
    assert FederationConfig().operating_point.rule == "youden"


def test_the_site_chooses_its_threshold_on_out_of_fold_predictions_of_its_training_patients(trained_site) -> None:  # noqa: ANN001
    record = json.loads((trained_site.state_dir / "site_model.json").read_text())
    point = record["operating_point"]
    session = trained_site.session
    assert point["rule"] == "youden" and 0.0 < point["threshold"] < 1.0
    assert point["validation_images"] == len(session.train.labels)  # training patients only, never the test ones
    assert point["validation_patients"] == len(set(session.train.patients))
    assert 0.0 <= point["sensitivity"] <= 1.0 and 0.0 <= point["specificity"] <= 1.0
    assert record["test_metrics"]["ci_low"] <= record["test_metrics"]["balanced_accuracy"] <= record["test_metrics"]["ci_high"]
