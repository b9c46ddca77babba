"""No single site steers the global layers: updates above the round's median norm are shortened to it."""

from __future__ import annotations

import pytest
import torch

from common.config import StrategyConfig
from server.reply_validation import update_norm
from server.strategies.base import weighted_average
from server.update_clipping import clip_to_median, clipping_applies

GLOBAL = {"w": torch.zeros(64), "b": torch.zeros(8)}


def honest_updates(count: int, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return {f"site-{i}": {key: 0.1 * torch.randn(v.shape, generator=generator) for key, v in GLOBAL.items()}
            for i in range(count)}


def scaled(weights: dict[str, torch.Tensor], factor: float) -> dict[str, torch.Tensor]:
    return {key: GLOBAL[key] + factor * (value - GLOBAL[key]) for key, value in weights.items()}


def fedavg(updates: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return weighted_average(GLOBAL, [(updates[site], 100) for site in sorted(updates)])


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return update_norm(a, b)


def test_one_site_scaling_its_update_by_5_moves_fedavg_less_than_the_stated_bound() -> None:
    honest = honest_updates(4)
    attacked = {**honest, "site-0": scaled(honest["site-0"], 5.0)}

    clean, _ = clip_to_median(honest, GLOBAL)
    clipped, record = clip_to_median(attacked, GLOBAL)
    limit = sum(sorted(update_norm(w, GLOBAL) for w in honest.values())[1:3]) / 2
    limit_attacked = sum(sorted(update_norm(w, GLOBAL) for w in attacked.values())[1:3]) / 2
    weight = 0.25  # one site of four, equal num-examples
    # Its own clipped update (at most the clip norm) plus what its norm does to the median for the others.
    bound = weight * limit_attacked + (1 - weight) * abs(limit_attacked - limit)

    moved = distance(fedavg(clipped), fedavg(clean))
    assert "site-0" in [item.site for item in record]
    assert moved <= bound + 1e-9
    # Without clipping the same site moves it by its weight x 4 x its own norm: the bound is real.
    unclipped_move = distance(fedavg(attacked), fedavg(honest))
    assert unclipped_move == pytest.approx(weight * 4 * update_norm(honest["site-0"], GLOBAL), rel=1e-4)
    assert unclipped_move > 2 * bound


def test_updates_at_or_below_the_median_are_untouched_and_a_clipped_one_keeps_its_direction() -> None:
    updates = honest_updates(5, seed=1)
    clipped, record = clip_to_median(updates, GLOBAL)
    norms = {site: update_norm(w, GLOBAL) for site, w in updates.items()}
    median = sorted(norms.values())[2]

    for site, weights in updates.items():
        if norms[site] <= median:
            assert all(torch.equal(clipped[site][k], weights[k]) for k in weights)
        else:
            assert update_norm(clipped[site], GLOBAL) == pytest.approx(median, rel=1e-6)
            cosine = torch.nn.functional.cosine_similarity(clipped[site]["w"], weights["w"], dim=0)
            assert float(cosine) == pytest.approx(1.0, abs=1e-6)
    assert len(record) == 2


@pytest.mark.parametrize(("mode", "updates", "applies"), [
    ("auto", 3, False), ("auto", 4, True), ("median", 2, True), ("median", 1, False), ("off", 10, False),
])
def test_auto_clips_from_four_usable_updates_median_always_and_off_never(mode: str, updates: int, applies: bool) -> None:
    assert clipping_applies(StrategyConfig(update_clipping=mode), updates) is applies
