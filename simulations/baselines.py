"""Baselines on the same data and splits as the federation: local-only and pooled training.

Both reuse the hospital client's own code path (``SiteSession``: same backbone, same patient
split, same trunk cut, same DP-SGD and the same per-site privacy budget), so the comparison
with the federated model is like for like.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
from tqdm import tqdm

from client.privacy_budget import PrivacyLedger
from client.site_session import SiteSession, _Split
from client.site_settings import SiteSettings
from client.site_state import SiteState
from common.config import FederationConfig
from server.backbone_source import PreparedBackbone

logger = logging.getLogger(__name__)


def install_backbone(settings: SiteSettings, backbone: PreparedBackbone) -> None:
    SiteState(settings.state_dir).store_backbone(
        backbone.fingerprint, backbone.tensors,
        {"mean": list(backbone.mean), "std": list(backbone.std), "source": backbone.source},
    )


def _train_rounds(session: SiteSession, config: FederationConfig) -> None:
    ledger: PrivacyLedger | None = session.privacy_ledger() if config.privacy.enabled else None
    for server_round in range(1, config.training.rounds + 1):
        if ledger is not None and not ledger.can_spend(session.planned_steps_per_round()):
            logger.info("[%s] budget reached after %d round(s)", session.settings.site_name, server_round - 1)
            break
        session.train_round(server_round, proximal_mu=0.0, ledger=ledger)


def run_local_only(config: FederationConfig, sites: dict[int, SiteSettings], backbone: PreparedBackbone,
                   out_dir: Path) -> dict[str, dict[str, float]]:
    """Each site trains alone for as many epochs as the federation ran; evaluated on its own test split."""
    results: dict[str, dict[str, float]] = {}
    for settings in tqdm(list(sites.values()), desc="baseline: local-only", unit="site"):
        local = dataclasses.replace(settings, state_dir=out_dir / "local" / settings.site_name)
        install_backbone(local, backbone)
        session = SiteSession.open(local, config, backbone.fingerprint)
        _train_rounds(session, config)
        results[settings.site_name] = session.evaluate()
    return results


def run_pooled(config: FederationConfig, sites: dict[int, SiteSettings], backbone: PreparedBackbone,
               out_dir: Path) -> dict[str, dict[str, float]]:
    """One model trained on every site's training split together; evaluated on each site's test split."""
    sessions = {}
    for settings in sites.values():
        pooled_view = dataclasses.replace(settings, state_dir=out_dir / "pooled" / settings.site_name)
        install_backbone(pooled_view, backbone)
        sessions[settings.site_name] = SiteSession.open(pooled_view, config, backbone.fingerprint)
    first = next(iter(sessions.values()))
    first.train = _Split(
        inputs=torch.cat([s.train.inputs for s in sessions.values()]),
        clinical=torch.cat([s.train.clinical for s in sessions.values()]),
        labels=torch.cat([s.train.labels for s in sessions.values()]),
    )
    logger.info("baseline: pooled training on %d images from %d sites", first.num_train, len(sessions))
    _train_rounds(first, config)
    results = {}
    own_test = first.test
    for name, session in sessions.items():
        first.test = session.test if session is not first else own_test
        results[name] = first.evaluate()
    return results
