"""Norm clipping of site updates at the median: no single site can steer the global layers.

Before aggregation, each site's update (its shared weights minus the global ones) whose L2 norm is
above ``factor`` x the median update norm of the round is scaled down to that norm, keeping its
direction. With at least ``min_sites`` usable updates (``strategy.update_clipping = "auto"``: 4; the
median of fewer is not a majority), a site that scales its update by any amount moves a weighted-mean
aggregate by at most ``w L' + (1 - w) |L' - L|`` from where its honest update would have put it (``w``
its weight, ``L`` and ``L'`` the clip norms without and with its scaling: its norm moves the median by
at most one rank), instead of ``w (scale - 1) x its norm``. Honest updates at or below the median are
untouched; those above it (often the noisiest DP sites) are shortened, which is what it costs.

It composes with every strategy (FedAvg, FedProx, FedAdam, trimmed mean): the strategy aggregates
the clipped updates. The far-out check (``reply_validation.drop_norm_outliers``, 10 x the median)
still drops absurd updates first.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from common.config import StrategyConfig
from server.reply_validation import update_norm

logger = logging.getLogger(__name__)

AUTO_MIN_SITES = 4


@dataclass(frozen=True)
class ClippedUpdate:
    """One update that was shortened: its norm before, and the norm it was scaled to."""

    site: str
    norm: float
    limit: float


def clipping_applies(strategy: StrategyConfig, usable_updates: int) -> bool:
    """Whether this round clips: ``median`` always (with 2+ updates), ``auto`` from 4 updates, ``off`` never."""
    if strategy.update_clipping == "off" or usable_updates < 2:
        return False
    return strategy.update_clipping == "median" or usable_updates >= AUTO_MIN_SITES


def clip_to_median(
    updates: Mapping[str, Mapping[str, torch.Tensor]],
    global_weights: Mapping[str, torch.Tensor],
    factor: float = 1.0,
) -> tuple[dict[str, dict[str, torch.Tensor]], list[ClippedUpdate]]:
    """Scale every update whose delta norm exceeds ``factor`` x the median delta norm down to that norm.

    Parameters
    ----------
    updates:
        Shared weights by site (decoded, finite).
    global_weights:
        The global shared weights every site started from.
    factor:
        The clip norm as a multiple of the median norm (``strategy.update_clip_factor``, >= 1).

    Returns the (possibly shortened) weights by site and what was clipped. A median of 0 clips nothing.
    """
    norms = {site: update_norm(weights, global_weights) for site, weights in updates.items()}
    limit = factor * float(np.median(list(norms.values()))) if norms else 0.0
    out: dict[str, dict[str, torch.Tensor]] = {}
    clipped: list[ClippedUpdate] = []
    for site, weights in updates.items():
        norm = norms[site]
        if limit <= 0 or norm <= limit:
            out[site] = dict(weights)
            continue
        scale = limit / norm
        out[site] = {key: (reference + (weights[key].to(reference.dtype) - reference) * scale)
                     for key, reference in global_weights.items()}
        clipped.append(ClippedUpdate(site, norm, limit))
        logger.info("update of %s clipped from norm %.4g to the median-based limit %.4g", site, norm, limit)
    return out, clipped
