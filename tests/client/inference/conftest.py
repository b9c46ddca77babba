"""A small trained site for the inference tests: one synthetic hospital (32 px), a random ResNet-18 backbone,
global layers stored as a coordinator would send them, and one evaluation (which fits the personal head,
chooses the operating point and writes ``site_model.json``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from client.site_session import SiteSession
from client.site_settings import SiteSettings
from client.site_state import SiteState, tensor_fingerprint
from common.config import FederationConfig
from common.data.synthetic_hospitals import generate_federation
from common.models.backbones import build_backbone
from common.models.layer_policy import apply_policy, resolve_policy

GLOBAL_ID = "global-test-0001"


@dataclass(frozen=True)
class TrainedSite:
    state_dir: Path
    manifest: Path
    session: SiteSession


def make_trained_site(root: Path, *, images: int = 48, seed: int = 5, config_overrides: dict | None = None) -> TrainedSite:
    manifest = generate_federation(root / "data", num_sites=1, seed=seed, image_size=32, site_sizes=[images],
                                   with_clinical=False)[0]
    config = FederationConfig.from_dict({
        "model": {"architecture": "resnet18", "image_size": 32},
        "privacy": {"enabled": False},
        "training": {"rounds": 1, "batch_size": 16, "device": "cpu", "personal_finetune_epochs": 0},
        **(config_overrides or {}),
    })
    torch.manual_seed(0)
    model = build_backbone(config.model, load_weights=False)
    groups = apply_policy(model, resolve_policy(config.policy, "resnet18"))
    backbone = {k: v.clone() for k, v in model.state_dict().items() if k not in set(groups.local)}
    fingerprint = tensor_fingerprint(backbone)
    state_dir = root / "state"
    state = SiteState(state_dir)
    state.store_backbone(fingerprint, backbone, {"mean": [0.5], "std": [0.25], "source": "test: random init"})
    state.store_global_layers(GLOBAL_ID, {name: backbone[name] for name in groups.shared})
    settings = SiteSettings(site_name="hospital-a", manifest=Path(manifest), state_dir=state_dir, device="cpu",
                            storage="memory")
    session = SiteSession.open(settings, config, fingerprint)
    session.load_shared(state.load_global_layers()[1])
    session.evaluate(GLOBAL_ID)
    return TrainedSite(state_dir=state_dir, manifest=Path(manifest), session=session)


@pytest.fixture(scope="session")
def trained_site(tmp_path_factory: pytest.TempPathFactory) -> TrainedSite:
    return make_trained_site(tmp_path_factory.mktemp("trained-site"))


@pytest.fixture(scope="session")
def finetuned_site(tmp_path_factory: pytest.TempPathFactory) -> TrainedSite:
    """The same site whose personal model fine-tunes its own copy of the shared layers (LP-FT)."""
    return make_trained_site(tmp_path_factory.mktemp("finetuned-site"), config_overrides={"training": {
        "rounds": 1, "batch_size": 16, "device": "cpu", "personal_finetune_epochs": 2}})
