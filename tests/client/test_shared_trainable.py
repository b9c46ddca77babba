"""``training.shared_trainable``: which values of the shared layers a site trains.

With ``scale_shift`` a DP round trains only the per-channel scale/shift adapters of the shared
block (and the local head): the convolutions keep their global values bit for bit, Opacus noises
only what is trained, and the model is left as it was found (every shared parameter trainable again
for the next round). The default, ``weights``, trains the block's own weights and leaves the
adapters at the identity.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.config import FederationConfig
from tests.client.hospital_fixture import open_site


def trainable(config: FederationConfig, mode: str, *, unit: str = "patient") -> FederationConfig:
    return config.model_copy(update={
        "training": config.training.model_copy(update={"shared_trainable": mode}),
        "privacy": config.privacy.model_copy(update={"unit": unit}),
    })


@pytest.mark.parametrize("unit", ["patient", "image"])
def test_scale_shift_trains_only_the_adapters_of_the_shared_block(hospital, tmp_path: Path, unit: str) -> None:  # noqa: ANN001
    _manifest, config, _backbone = hospital
    session = open_site(hospital, tmp_path / unit, trainable(config, "scale_shift", unit=unit))
    names = session.trained_shared_names()
    assert names and all(".adapter." in n for n in names)
    before = session.shared_state()
    outcome = session.run_round(1, proximal_mu=0.0)
    assert outcome.shared is not None and outcome.epsilon > 0
    for name, tensor in outcome.shared.items():
        if name in names:
            assert not torch.equal(tensor, before[name]), f"{name} was trained (signal and noise)"
        else:
            assert torch.equal(tensor, before[name]), f"{name} must keep its global value"
    assert all(p.requires_grad for n, p in session.model.named_parameters() if n in session.groups.shared), \
        "every shared parameter is trainable again after the round"


def test_weights_leave_the_adapters_at_identity_and_all_trains_both(hospital, tmp_path: Path) -> None:  # noqa: ANN001
    _manifest, config, _backbone = hospital
    weights = open_site(hospital, tmp_path / "weights", trainable(config, "weights"))
    names = weights.trained_shared_names()
    assert names and not any(".adapter." in n for n in names)
    outcome = weights.run_round(1, proximal_mu=0.0)
    assert outcome.shared is not None
    for name, tensor in outcome.shared.items():
        if ".adapter." in name:
            assert torch.equal(tensor, torch.ones_like(tensor) if name.endswith("scale") else torch.zeros_like(tensor))
    both = open_site(hospital, tmp_path / "all", trainable(config, "all"))
    assert set(both.trained_shared_names()) == {n for n in both.groups.shared if n in both._named}
