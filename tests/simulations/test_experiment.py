"""With ``--seeds N`` the whole comparison runs N times and the summary carries each row's spread, and the spread
of each row's difference from the best a site could do alone, paired seed by seed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from common.config import FederationConfig
from simulations import experiment
from simulations.simulation_plan import SimulationPlan

SEED_RESULTS = {  # seed -> (federated, local linear probe, local fine-tuning, pooled ceiling)
    0: (0.90, 0.85, 0.80, 0.95),
    1: (0.84, 0.80, 0.86, 0.90),
    2: (0.88, 0.87, 0.82, 0.91),
}


def _fake_seed(plan: SimulationPlan, sites: Any, **_: Any) -> dict[str, Any]:
    federated, probe, finetune, ceiling = SEED_RESULTS[plan.config.seed]
    summary = {"federated": federated, "local_linear_probe": probe, "local_finetune": finetune,
               "pooled_ceiling": ceiling}
    summary.update(experiment.comparison_targets(summary))
    return {"config": {"name": "t"}, "summary": summary, "per_site_final": {}}


def test_seeds_give_every_rows_spread_and_the_paired_gain_over_the_best_alone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(experiment, "_run_one_seed", _fake_seed)
    config = FederationConfig.from_toml("simulations/configs/demo.toml")
    plan = SimulationPlan(config=config, run_dir=tmp_path / "run", num_sites=2, data_seed=0,
                          cache_root=tmp_path / "cache")
    (tmp_path / "run").mkdir()

    metrics = experiment.run_experiment(plan, seeds=3, sites={})

    over = metrics["summary"]["over_seeds"]
    assert over["federated"]["values"] == [0.90, 0.84, 0.88]
    # the best alone is chosen per seed (probe, fine-tuning, probe), not from the means
    assert over["federated_gain_over_best_single_site"]["values"] == pytest.approx([0.05, -0.02, 0.01])
    assert over["pooled_ceiling_gain_over_best_single_site"]["values"] == pytest.approx([0.10, 0.04, 0.04])
    assert over["federated_gain_over_best_single_site"]["sd"] == pytest.approx(0.0351, abs=1e-4)
    assert "minus the best alone, over 3 seeds: +0.050, -0.020, +0.010" in (tmp_path / "run" / "report.md").read_text()
