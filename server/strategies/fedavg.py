"""FedAvg: the global shared layers are the sites' weights averaged by their ``num-examples``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from common.config import StrategyConfig
from server.strategies.base import Strategy, Update, Weights, register_strategy, weighted_average


class WeightedAverage(Strategy):
    """FedAvg aggregation: stateless weighted mean by num-examples."""

    name = "fedavg"

    def aggregate(self, global_weights: Mapping[str, torch.Tensor], updates: Sequence[Update]) -> Weights:
        """See ``weighted_average``."""
        return weighted_average(global_weights, updates)


@register_strategy("fedavg")
def _fedavg(strategy_config: StrategyConfig) -> Strategy:
    return WeightedAverage()
