"""Epsilon of a DP-SGD history under the RDP accountant, with each step's RDP computed once.

Opacus' ``RDPAccountant.get_epsilon`` recomputes the Renyi divergence of the subsampled Gaussian
mechanism at every order for every history entry on every call. At the fractional orders that
is a slowly converging series: about 0.2 s per entry on a laptop core, and a site asks for its
epsilon several times per round (budget check, after training, in every evaluate reply).

The RDP of ``steps`` identical steps is ``steps`` times the RDP of one step (Opacus'
``compute_rdp`` multiplies by ``steps`` itself), so the one-step vector is cached per
``(noise_multiplier, sample_rate)`` and the rest is Opacus' own arithmetic, in Opacus' order:
the result is bit-for-bit ``RDPAccountant.get_epsilon`` (tested).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

RDP_ORDERS: tuple[float, ...] = tuple(RDPAccountant.DEFAULT_ALPHAS)
"""The orders Opacus' RDP accountant searches by default."""


@functools.lru_cache(maxsize=256)
def _one_step_rdp(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    rdp = rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDP_ORDERS)
    rdp.setflags(write=False)
    return rdp


def rdp_epsilon(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """Epsilon at ``delta`` after the DP-SGD steps in ``history``.

    Args:
        history: ``(noise_multiplier, sample_rate, steps)`` entries, as Opacus' accountant keeps them.
        delta: the target delta.
    """
    if not history:
        return 0.0
    total = sum(_one_step_rdp(float(nm), float(q)) * int(steps) for nm, q, steps in history)
    epsilon, _order = rdp_analysis.get_privacy_spent(orders=list(RDP_ORDERS), rdp=total, delta=delta)
    return float(epsilon)
