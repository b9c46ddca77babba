"""Opening a site session on the ``hospital`` fixture (``tests/client/conftest.py``) and one DP round on it."""

from __future__ import annotations

from pathlib import Path

import torch

from client.site_session import SiteSession
from client.site_settings import SiteSettings
from client.site_state import SiteState, tensor_fingerprint
from common.config import FederationConfig


def open_site(hospital: tuple[Path, FederationConfig, dict[str, torch.Tensor]], state_dir: Path,
              config: FederationConfig | None = None) -> SiteSession:
    manifest, default_config, backbone = hospital
    fingerprint = tensor_fingerprint(backbone)
    SiteState(state_dir).store_backbone(fingerprint, backbone, {"mean": [0.5], "std": [0.25], "source": "test"})
    settings = SiteSettings(site_name="hospital-a", manifest=manifest, state_dir=state_dir, device="cpu",
                            storage="memory")
    return SiteSession.open(settings, config or default_config, fingerprint)


def dp_round(session: SiteSession) -> dict[str, torch.Tensor]:
    session.train_round(1, proximal_mu=0.0, ledger=session.privacy_ledger())
    return session.shared_state()
