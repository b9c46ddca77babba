"""``fedtl-hospital export``: a TorchScript file that needs no fedtl code, and a model card that says what it is."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from client.hospital_daemon import main as hospital_main
from client.inference.predict import discover_inputs, load_pixels, run_predictions
from client.inference.site_model import load_site_model
from tests.client.inference.conftest import GLOBAL_ID

PLAIN_TORCH = """
import json, sys
import torch
model = torch.jit.load(sys.argv[1])
images = torch.load(sys.argv[2])
extra = {"model_card.json": ""}
torch.jit.load(sys.argv[1], _extra_files=extra)
ours = sorted({name.split(".")[0] for name in sys.modules} & {"client", "common", "server", "simulations"})
print(json.dumps({"probabilities": model(images).tolist(), "fedtl_modules": ours,
                  "card_classes": json.loads(extra["model_card.json"])["classes"]}))
"""


@pytest.fixture(scope="module")
def exported(trained_site, tmp_path_factory) -> Path:  # noqa: ANN001
    out = tmp_path_factory.mktemp("export") / "model"
    assert hospital_main(["export", "--state-dir", str(trained_site.state_dir), "--out", str(out)]) == 0
    return out


def test_the_exported_file_loads_with_plain_torch_and_gives_predicts_probabilities(trained_site, exported,  # noqa: ANN001
                                                                                 tmp_path) -> None:
    model = load_site_model(trained_site.state_dir)
    inputs = discover_inputs(trained_site.manifest)[:5]
    predicted = run_predictions(model, inputs, progress=False).predictions
    batch = model.preprocessing.normalise(np.stack([load_pixels(model, item)[0] for item in inputs]))
    torch.save(batch, tmp_path / "batch.pt")
    outside = tmp_path / "elsewhere"  # not the repository: fedtl is not importable from the working folder
    outside.mkdir()
    result = subprocess.run([sys.executable, "-I", "-c", PLAIN_TORCH, str(exported / "model.pt"),
                             str(tmp_path / "batch.pt")], cwd=outside, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["fedtl_modules"] == []
    assert answer["card_classes"] == ["normal", "finding"]
    np.testing.assert_allclose(np.array(answer["probabilities"]), np.array([p.probabilities for p in predicted]),
                               atol=1e-5, rtol=0)


def test_the_model_card_names_the_model_its_origin_its_decision_rule_its_metrics_and_its_privacy(trained_site,  # noqa: ANN001
                                                                                                 exported) -> None:
    card = json.loads((exported / "model_card.json").read_text())
    record = json.loads((trained_site.state_dir / "site_model.json").read_text())
    assert card["model"]["architecture"] == "resnet18" and card["model"]["file"] == "model.pt"
    assert card["backbone"]["fingerprint"] == trained_site.session.fingerprint
    assert card["backbone"]["source"] == "test: random init"
    assert card["global_layers"]["id"] == GLOBAL_ID
    assert card["model"]["personal_layers"] == "global"
    assert card["classes"] == ["normal", "finding"]
    assert card["preprocessing"]["key"] == "g1-s32-c1-m0.5-sd0.25"
    assert card["operating_point"]["threshold"] == pytest.approx(record["operating_point"]["threshold"])
    for key in ("balanced_accuracy", "ci_low", "ci_high", "auc", "test_patients"):
        assert key in card["test_metrics"]
    assert card["privacy"]["enabled"] is False and "DP was off" in card["privacy"]["note"]
    markdown = (exported / "model_card.md").read_text()
    for text in ("resnet18", GLOBAL_ID, "Decision rule", "95% patient-bootstrap interval", "Privacy spent",
                 "on the global shared layers"):
        assert text in markdown


def test_the_privacy_spent_comes_from_the_sites_ledger_without_writing_it(trained_site, tmp_path) -> None:  # noqa: ANN001
    from client.inference.model_card import privacy_spent
    from client.site_state import SiteState

    state = SiteState(tmp_path / "dp-site")
    ledger = state.open_ledger(target_epsilon=8.0, delta=1e-5, sample_rate=0.1, planned_steps=100)
    ledger.reserve(10)
    before = state.ledger_path.read_bytes()
    spent = privacy_spent(state.root, privacy_enabled=True)
    assert state.ledger_path.read_bytes() == before
    assert spent["delta"] == pytest.approx(1e-5) and spent["epsilon"] > 0 and spent["unit"] in ("image", "patient")
