"""What every aggregation strategy is, and the registry that names them.

A strategy is one file in this package that defines a :class:`Strategy` subclass and registers it
with :func:`register_strategy` under the name ``[strategy] name`` uses. It owns both halves of
its rule: ``aggregate`` (coordinator side) and ``client_config`` (the keys of the train message's
config record that the sites' training reads, for example FedProx's ``proximal-mu``; every such key
is declared in ``common.wire_contract``). Whatever the strategy, a bad reply is dropped by
``server.reply_validation`` before it reaches ``aggregate``: one hospital cannot end the run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch

from common import wire_contract as wc
from common.config import StrategyConfig

logger = logging.getLogger(__name__)

Weights = dict[str, torch.Tensor]
Update = tuple[Mapping[str, torch.Tensor], int]  # (shared weights, num-examples)


class Strategy:
    """Turns this round's site updates into new global shared weights; stateless unless overridden."""

    name: ClassVar[str] = ""

    def aggregate(self, global_weights: Mapping[str, torch.Tensor], updates: Sequence[Update]) -> Weights:
        """Return new global weights from ``global_weights`` and ``(weights, num_examples)`` updates."""
        raise NotImplementedError

    def client_config(self) -> dict[str, float]:
        """Config-record entries the sites' local training reads (declared in ``common.wire_contract``)."""
        return {wc.CONFIG_PROXIMAL_MU: 0.0}

    def state_dict(self) -> dict[str, Any]:
        """State that must survive a coordinator restart (torch.save-able)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what ``state_dict()`` returned."""


StrategyFactory = Callable[[StrategyConfig], Strategy]
_REGISTRY: dict[str, StrategyFactory] = {}


def register_strategy(name: str) -> Callable[[StrategyFactory], StrategyFactory]:
    """Class (or factory) decorator: ``@register_strategy("fedavg")``; the factory takes the ``[strategy]`` section."""

    def register(factory: StrategyFactory) -> StrategyFactory:
        if name in _REGISTRY:
            raise ValueError(f"strategy {name!r} is registered twice")
        _REGISTRY[name] = factory
        return factory

    return register


def registered_strategies() -> list[str]:
    return sorted(_REGISTRY)


def make_aggregator(strategy_config: StrategyConfig) -> Strategy:
    """Build the strategy ``[strategy] name`` asks for."""
    try:
        factory = _REGISTRY[strategy_config.name]
    except KeyError:
        raise ValueError(
            f"strategy.name={strategy_config.name!r} has no aggregator; use one of {', '.join(registered_strategies())}"
        ) from None
    return factory(strategy_config)


class AggregationError(ValueError):
    """Updates cannot be combined (no updates, or keys/shapes that do not match the global model)."""


def check_updates(global_weights: Mapping[str, torch.Tensor], updates: Sequence[Update]) -> None:
    """Raise AggregationError unless every update has the global keys, shapes and a positive weight."""
    if not updates:
        raise AggregationError("no updates to aggregate; the round needs at least one valid reply")
    expected = set(global_weights)
    for index, (weights, num_examples) in enumerate(updates):
        if set(weights) != expected:
            missing = sorted(expected - set(weights))
            extra = sorted(set(weights) - expected)
            raise AggregationError(
                f"update #{index} does not match the global shared keys (missing {missing}, extra "
                f"{extra}); validate replies with server.reply_validation first"
            )
        for key, reference in global_weights.items():
            if tuple(weights[key].shape) != tuple(reference.shape):
                raise AggregationError(
                    f"update #{index} key {key!r} has shape {tuple(weights[key].shape)}, "
                    f"global has {tuple(reference.shape)}"
                )
        if not num_examples > 0:
            raise AggregationError(f"update #{index} has num_examples={num_examples}; it must be > 0")


def weighted_average(global_weights: Mapping[str, torch.Tensor], updates: Sequence[Update]) -> Weights:
    """Average the updates weighted by num-examples (in float64), cast back to the global dtypes."""
    check_updates(global_weights, updates)
    total = float(sum(num_examples for _, num_examples in updates))
    averaged: Weights = {}
    for key, reference in global_weights.items():
        accumulator = torch.zeros(reference.shape, dtype=torch.float64)
        for weights, num_examples in updates:
            accumulator += weights[key].detach().cpu().double() * (num_examples / total)
        averaged[key] = cast_like(accumulator, reference)
    return averaged


def cast_like(value: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    if not reference.dtype.is_floating_point:
        value = torch.round(value)
    return value.to(dtype=reference.dtype)
