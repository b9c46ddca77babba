"""FedProx: FedAvg's aggregation, plus a proximal term ``mu/2 ||w - w_global||^2`` in each site's training.

The coordinator's half is the weighted average; the site's half is ``client.dp.proximal`` (its
gradient is added after DP privatisation, where Opacus cannot drop it), driven by the
``proximal-mu`` entry this strategy puts into every train message.
"""

from __future__ import annotations

from common import wire_contract as wc
from common.config import StrategyConfig
from server.strategies.base import Strategy, register_strategy
from server.strategies.fedavg import WeightedAverage


class FedProx(WeightedAverage):
    """Weighted average on the coordinator; ``mu`` for the sites' proximal term."""

    name = "fedprox"

    def __init__(self, mu: float) -> None:
        self.mu = mu

    def client_config(self) -> dict[str, float]:
        return {wc.CONFIG_PROXIMAL_MU: self.mu}


@register_strategy("fedprox")
def _fedprox(strategy_config: StrategyConfig) -> Strategy:
    return FedProx(strategy_config.proximal_mu)
