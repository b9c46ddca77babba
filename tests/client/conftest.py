"""Fixtures of the client tests: one small synthetic hospital (64 images, 32 px, a random backbone)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.config import FederationConfig
from common.data.synthetic_hospitals import generate_federation
from common.models.backbones import build_backbone
from common.models.layer_policy import apply_policy, resolve_policy


@pytest.fixture(scope="module")
def hospital(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, FederationConfig, dict[str, torch.Tensor]]:
    root = tmp_path_factory.mktemp("hospital")
    manifest = generate_federation(root / "data", num_sites=1, seed=5, image_size=32, site_sizes=[64])[0]
    config = FederationConfig.from_dict({
        "model": {"architecture": "resnet18", "image_size": 32},
        "privacy": {"enabled": True, "target_epsilon": 8.0},
        "training": {"rounds": 2, "local_epochs": 1, "batch_size": 16, "device": "cpu"},
    })
    torch.manual_seed(0)
    model = build_backbone(config.model, load_weights=False)
    groups = apply_policy(model, resolve_policy(config.policy, "resnet18"))
    backbone = {k: v.clone() for k, v in model.state_dict().items() if k not in set(groups.local)}
    return Path(manifest), config, backbone
