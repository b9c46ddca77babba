"""Combine the sites' shared-layer weights into the next global shared layers.

One interface (``Aggregator``), three rules:

* ``WeightedAverage`` -- FedAvg, weights proportional to each site's ``num-examples``.
  FedProx aggregates the same way: its proximal term acts inside each site's training.
* ``FedAdam`` -- the weighted average gives a pseudo-gradient (average - global); an Adam
  step on the server moves the global weights (Reddi et al. 2021, "Adaptive Federated
  Optimization"). Moments and step count survive a restart via ``state_dict()``.
* ``TrimmedMean`` -- per coordinate, drop the ``trim_fraction`` largest and smallest values
  and average the rest (Yin et al. 2018); unweighted, robust to a few wild sites. Uses
  Flower's own ``trim_mean``.

Only the shared layers pass through here; site-local heads never leave the site.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean

from common.config import StrategyConfig

logger = logging.getLogger(__name__)

Weights = dict[str, torch.Tensor]
Update = tuple[Mapping[str, torch.Tensor], int]  # (shared weights, num-examples)


class Aggregator(Protocol):
    """Turns this round's site updates into new global shared weights."""

    def aggregate(self, global_weights: Mapping[str, torch.Tensor], updates: Sequence[Update]) -> Weights:
        """Return new global weights from ``global_weights`` and ``(weights, num_examples)`` updates."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """State that must survive a coordinator restart (torch.save-able)."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what ``state_dict()`` returned."""
        ...


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
        averaged[key] = _cast_like(accumulator, reference)
    return averaged


def _cast_like(value: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    if not reference.dtype.is_floating_point:
        value = torch.round(value)
    return value.to(dtype=reference.dtype)


class WeightedAverage:
    """FedAvg / FedProx aggregation: stateless weighted mean by num-examples."""

    def aggregate(self, global_weights: Mapping[str, torch.Tensor], updates: Sequence[Update]) -> Weights:
        """See ``weighted_average``."""
        return weighted_average(global_weights, updates)

    def state_dict(self) -> dict[str, Any]:
        """Nothing to keep."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Nothing to restore."""


class TrimmedMean:
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
            result[key] = _cast_like(torch.from_numpy(trimmed), reference)
        return result

    def state_dict(self) -> dict[str, Any]:
        """Stateless."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Stateless."""


class FedAdam:
    """Server-side Adam on the pseudo-gradient ``weighted_average(updates) - global``.

    Per key, with d the pseudo-gradient and t the aggregation count (from 1):
    ``m = b1*m + (1-b1)*d``, ``v = b2*v + (1-b2)*d**2``,
    ``new = global + eta * sqrt(1-b2**t)/(1-b1**t) * m / (sqrt(v) + tau)``.
    Flower's FedAdam applies the same bias correction, counted by server round.

    Parameters
    ----------
    eta:
        Server learning rate (``strategy.server_learning_rate``).
    beta_1, beta_2:
        Decay of the first and second moment estimates.
    tau:
        Adaptivity floor added to sqrt(v); larger is closer to plain FedAvg-with-momentum.
    """

    def __init__(self, eta: float, beta_1: float = 0.9, beta_2: float = 0.99, tau: float = 1e-3) -> None:
        if eta <= 0 or not 0 <= beta_1 < 1 or not 0 <= beta_2 < 1 or tau <= 0:
            raise ValueError(
                f"FedAdam needs eta > 0, 0 <= beta_1, beta_2 < 1, tau > 0 "
                f"(got eta={eta}, beta_1={beta_1}, beta_2={beta_2}, tau={tau})"
            )
        self.eta = eta
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.tau = tau
        self.step = 0
        self.m: dict[str, torch.Tensor] = {}
        self.v: dict[str, torch.Tensor] = {}

    def aggregate(self, global_weights: Mapping[str, torch.Tensor], updates: Sequence[Update]) -> Weights:
        """One Adam step of the global weights toward the sites' weighted average."""
        check_updates(global_weights, updates)
        if self.m and set(self.m) != set(global_weights):
            raise AggregationError(
                "FedAdam moments were built for other shared keys than this model's; the run's "
                "layer policy changed. Start a new run, or resume with the original configuration."
            )
        average = weighted_average(global_weights, updates)
        self.step += 1
        correction = np.sqrt(1 - self.beta_2**self.step) / (1 - self.beta_1**self.step)
        new_weights: Weights = {}
        for key, reference in global_weights.items():
            base = reference.detach().cpu().double()
            if not reference.dtype.is_floating_point:
                new_weights[key] = average[key]  # counters are averaged, not optimised
                continue
            delta = average[key].double() - base
            m = self.m.get(key, torch.zeros_like(base))
            v = self.v.get(key, torch.zeros_like(base))
            m = self.beta_1 * m + (1 - self.beta_1) * delta
            v = self.beta_2 * v + (1 - self.beta_2) * delta * delta
            self.m[key], self.v[key] = m, v
            updated = base + self.eta * correction * m / (torch.sqrt(v) + self.tau)
            new_weights[key] = updated.to(dtype=reference.dtype)
        return new_weights

    def state_dict(self) -> dict[str, Any]:
        """Step count, hyper-parameters and moments (float64 tensors)."""
        return {
            "step": self.step,
            "eta": self.eta,
            "beta_1": self.beta_1,
            "beta_2": self.beta_2,
            "tau": self.tau,
            "m": {k: t.clone() for k, t in self.m.items()},
            "v": {k: t.clone() for k, t in self.v.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore moments and step; hyper-parameters come from the current configuration."""
        missing = {"step", "m", "v"} - set(state)
        if missing:
            raise ValueError(
                f"FedAdam state lacks {sorted(missing)}; the checkpoint was not written by FedAdam. "
                "Resume with the strategy the run started with."
            )
        if set(state["m"]) != set(state["v"]):
            raise ValueError("FedAdam state is inconsistent: first and second moments have different keys")
        for name in ("eta", "beta_1", "beta_2", "tau"):
            if name in state and state[name] != getattr(self, name):
                logger.warning(
                    "FedAdam %s was %s in the checkpoint and is %s now; using the current value",
                    name, state[name], getattr(self, name),
                )
        self.step = int(state["step"])
        self.m = {k: torch.as_tensor(t, dtype=torch.float64).clone() for k, t in state["m"].items()}
        self.v = {k: torch.as_tensor(t, dtype=torch.float64).clone() for k, t in state["v"].items()}


def make_aggregator(strategy_config: StrategyConfig) -> Aggregator:
    """Build the aggregator ``strategy.name`` asks for."""
    name = strategy_config.name
    if name in ("fedavg", "fedprox"):
        return WeightedAverage()
    if name == "fedadam":
        return FedAdam(eta=strategy_config.server_learning_rate)
    if name == "trimmed_mean":
        return TrimmedMean(strategy_config.trim_fraction)
    raise ValueError(
        f"strategy.name={name!r} has no aggregator; use fedavg, fedprox, fedadam or trimmed_mean"
    )
