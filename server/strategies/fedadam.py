"""FedAdam (Reddi et al. 2021, "Adaptive Federated Optimization"): an Adam step on the server.

The weighted average gives a pseudo-gradient (average - global); moments and step count survive a
coordinator restart via ``state_dict()``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from common.config import StrategyConfig
from server.strategies.base import (
    AggregationError,
    Strategy,
    Update,
    Weights,
    check_updates,
    register_strategy,
    weighted_average,
)

logger = logging.getLogger(__name__)


class FedAdam(Strategy):
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


@register_strategy("fedadam")
def _fedadam(strategy_config: StrategyConfig) -> Strategy:
    return FedAdam(eta=strategy_config.server_learning_rate)
