"""Aggregation of the shared layers, checked against values worked out by hand."""

from __future__ import annotations

import io

import pytest
import torch

from common.config import StrategyConfig
from server.strategies import (
    AggregationError,
    FedAdam,
    TrimmedMean,
    WeightedAverage,
    make_aggregator,
)


def test_fedavg_weights_each_site_by_its_number_of_examples() -> None:
    global_weights = {"w": torch.zeros(2)}
    updates = [({"w": torch.tensor([1.0, 2.0])}, 10), ({"w": torch.tensor([4.0, 8.0])}, 30)]
    result = WeightedAverage().aggregate(global_weights, updates)
    # (1*10 + 4*30) / 40 = 3.25 ; (2*10 + 8*30) / 40 = 6.5
    assert torch.allclose(result["w"], torch.tensor([3.25, 6.5]))
    assert result["w"].dtype == torch.float32


def test_fedavg_of_identical_updates_is_that_update() -> None:
    weights = {"a": torch.randn(3, 2), "b": torch.randn(4)}
    result = WeightedAverage().aggregate({k: torch.zeros_like(v) for k, v in weights.items()},
                                         [(weights, 5), (weights, 7)])
    for key in weights:
        assert torch.allclose(result[key], weights[key])


def test_fedprox_and_fedavg_aggregate_the_same_way() -> None:
    assert isinstance(make_aggregator(StrategyConfig(name="fedprox")), WeightedAverage)
    assert isinstance(make_aggregator(StrategyConfig(name="fedavg")), WeightedAverage)


def test_trimmed_mean_cuts_the_extremes_of_each_coordinate_and_ignores_weights() -> None:
    values = [(1.0, -50.0), (2.0, 1.0), (3.0, 2.0), (4.0, 3.0), (100.0, 4.0)]
    updates = [({"w": torch.tensor(v)}, n) for v, n in zip(values, [1, 1, 1, 1, 1000], strict=True)]
    result = TrimmedMean(trim_fraction=0.2).aggregate({"w": torch.zeros(2)}, updates)
    # 20% of 5 sites = 1 cut at each end: mean(2,3,4) = 3 ; mean(1,2,3) = 2
    assert torch.allclose(result["w"], torch.tensor([3.0, 2.0]))


def test_trimmed_mean_with_too_few_sites_to_trim_is_the_plain_mean() -> None:
    updates = [({"w": torch.tensor([0.0])}, 1), ({"w": torch.tensor([10.0])}, 9)]
    result = TrimmedMean(trim_fraction=0.2).aggregate({"w": torch.zeros(1)}, updates)
    assert torch.allclose(result["w"], torch.tensor([5.0]))


def test_trim_fraction_outside_its_range_is_refused() -> None:
    with pytest.raises(ValueError, match="trim_fraction"):
        TrimmedMean(0.5)


def test_fedadam_first_step_matches_the_adam_formula() -> None:
    adam = FedAdam(eta=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3)
    result = adam.aggregate({"w": torch.tensor([0.0])}, [({"w": torch.tensor([0.5])}, 3)])
    # d = 0.5; m = 0.1*d = 0.05; v = 0.01*d^2 = 0.0025, sqrt(v) = 0.05;
    # bias correction sqrt(1-0.99)/(1-0.9) = 1; new = 0.1 * 0.05 / (0.05 + 0.001)
    assert result["w"].item() == pytest.approx(0.1 * 0.05 / 0.051, rel=1e-6)
    assert adam.step == 1


def test_fedadam_moves_each_coordinate_toward_the_site_average() -> None:
    adam = FedAdam(eta=0.01)
    result = adam.aggregate({"w": torch.tensor([1.0, 1.0])}, [({"w": torch.tensor([3.0, -2.0])}, 1)])
    assert 1.0 < result["w"][0].item() < 3.0
    assert -2.0 < result["w"][1].item() < 1.0


def test_fedadam_resumed_from_its_state_continues_exactly_like_an_uninterrupted_run() -> None:
    start = {"w": torch.tensor([0.0, 1.0])}
    updates = [({"w": torch.tensor([0.5, 0.0])}, 2), ({"w": torch.tensor([1.5, 2.0])}, 6)]

    uninterrupted = FedAdam(eta=0.1)
    after_one = uninterrupted.aggregate(start, updates)
    after_two = uninterrupted.aggregate(after_one, updates)

    first_run = FedAdam(eta=0.1)
    first_run.aggregate(start, updates)
    buffer = io.BytesIO()
    torch.save(first_run.state_dict(), buffer)
    buffer.seek(0)
    resumed = FedAdam(eta=0.1)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.step == 1
    assert torch.allclose(resumed.aggregate(after_one, updates)["w"], after_two["w"])


def test_fedadam_state_from_another_strategy_is_refused() -> None:
    with pytest.raises(ValueError, match="FedAdam"):
        FedAdam(eta=0.1).load_state_dict({})


def test_make_aggregator_uses_the_configured_server_learning_rate_and_trim() -> None:
    adam = make_aggregator(StrategyConfig(name="fedadam", server_learning_rate=0.3))
    assert isinstance(adam, FedAdam) and adam.eta == 0.3
    trimmed = make_aggregator(StrategyConfig(name="trimmed_mean", trim_fraction=0.1))
    assert isinstance(trimmed, TrimmedMean) and trimmed.trim_fraction == 0.1


def test_updates_whose_keys_do_not_match_the_global_model_are_refused() -> None:
    with pytest.raises(AggregationError, match="missing"):
        WeightedAverage().aggregate({"w": torch.zeros(1), "b": torch.zeros(1)}, [({"w": torch.zeros(1)}, 1)])
    with pytest.raises(AggregationError, match="no updates"):
        WeightedAverage().aggregate({"w": torch.zeros(1)}, [])
    with pytest.raises(AggregationError, match="shape"):
        TrimmedMean(0.1).aggregate({"w": torch.zeros(2)}, [({"w": torch.zeros(3)}, 1)])
