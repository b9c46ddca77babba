"""Aggregation strategies: one file per rule, registered by name (see ``base``).

Importing this package registers every strategy below; ``make_aggregator`` builds the configured one.
"""

from server.strategies import fedadam, fedavg, fedprox, trimmed_mean  # noqa: F401 - registration
from server.strategies.base import (
    AggregationError,
    Strategy,
    Update,
    Weights,
    check_updates,
    make_aggregator,
    register_strategy,
    registered_strategies,
    weighted_average,
)
from server.strategies.fedadam import FedAdam
from server.strategies.fedavg import WeightedAverage
from server.strategies.fedprox import FedProx
from server.strategies.trimmed_mean import TrimmedMean

__all__ = [
    "AggregationError", "FedAdam", "FedProx", "Strategy", "TrimmedMean", "Update", "WeightedAverage", "Weights",
    "check_updates", "make_aggregator", "register_strategy", "registered_strategies", "weighted_average",
]
