"""Coordinate-wise trimmed mean (Yin et al. 2018): unweighted, robust to a few wild sites (Flower's ``trim_mean``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean

from common.config import StrategyConfig
from server.strategies.base import Strategy, Update, Weights, cast_like, check_updates, register_strategy


class TrimmedMean(Strategy):
    """Coordinate-wise trimmed mean (unweighted).

    Parameters
    ----------
    trim_fraction:
        Fraction cut from EACH tail per coordinate, in [0, 0.5). With n updates,
        ``int(trim_fraction * n)`` values are cut at each end (none when n is small).
    """

    def __init__(self, trim_fraction: float) -> None:
        if not 0.0 <= trim_fraction < 0.5:
            raise ValueError(
                f"trim_fraction must lie in [0, 0.5), got {trim_fraction}; see strategy.trim_fraction"
            )
        self.trim_fraction = trim_fraction

    def aggregate(self, global_weights: Mapping[str, torch.Tensor], updates: Sequence[Update]) -> Weights:
        """Trimmed mean per coordinate over the sites' values; num-examples are ignored."""
        check_updates(global_weights, updates)
        result: Weights = {}
        for key, reference in global_weights.items():
            stacked = np.stack([weights[key].detach().cpu().double().numpy() for weights, _ in updates])
            trimmed = np.asarray(trim_mean(stacked, self.trim_fraction))
            result[key] = cast_like(torch.from_numpy(trimmed), reference)
        return result


@register_strategy("trimmed_mean")
def _trimmed_mean(strategy_config: StrategyConfig) -> Strategy:
    return TrimmedMean(strategy_config.trim_fraction)
