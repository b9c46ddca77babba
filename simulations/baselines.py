"""What each site could do without the federation, and the pooled ceiling, on the same data and splits.

Every baseline reuses the hospital client's own code path (``SiteSession``: same backbone, same
patient split, same trunk cut, same personal head fitted on each site's own training patients),
so the comparison with the federated model is like for like:

* ``local_linear_probe``: no training at all; each site fits its personal head (a class-balanced
  linear probe) on the frozen pretrained features. Nothing leaves a site, so no DP.
* ``local_linear_probe_finetune`` (with ``training.personal_finetune_epochs``): the same probe, then
  the site's personal fine-tune from the pretrained layers (LP-FT alone, DP off).
* ``local_finetune``: each site fine-tunes alone with DP off for as many epochs as the federation
  ran, then fits its personal model on its fine-tuned features (as every row below does, with the
  personal fine-tune when it is configured).
* ``local``: the same under the federation's DP settings and budget (kept for comparison).
* ``pooled_ceiling``: every site's training data in one place, fine-tuned with DP off; each site
  then fits its own head on those features. Not allowed in practice: the ceiling.
* ``pooled``: the same under DP (kept for comparison).

Each returns ``{site: metrics}`` with a 95% patient-bootstrap interval (``ci-low``, ``ci-high``).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from tqdm import tqdm

from client.site_session import SiteSession, concatenate_splits
from client.site_settings import SiteSettings
from client.site_state import SiteState
from common.config import FederationConfig
from server.backbone_source import PreparedBackbone

logger = logging.getLogger(__name__)

SiteResults = dict[str, dict[str, float]]


def install_backbone(settings: SiteSettings, backbone: PreparedBackbone) -> None:
    SiteState(settings.state_dir).store_backbone(
        backbone.fingerprint, backbone.tensors,
        {"mean": list(backbone.mean), "std": list(backbone.std), "source": backbone.source},
    )


def without_dp(config: FederationConfig) -> FederationConfig:
    return config.model_copy(update={"privacy": config.privacy.model_copy(update={"enabled": False})})


def train_rounds(session: SiteSession, config: FederationConfig) -> None:
    """``config.training.rounds`` rounds of local training, as the ClientApp runs them (same budget
    decision and bookkeeping), stopping at the first round the site's budget declines."""
    for server_round in range(1, config.training.rounds + 1):
        if session.run_round(server_round, proximal_mu=0.0).shared is None:
            logger.info("[%s] budget reached after %d round(s)", session.settings.site_name, server_round - 1)
            break


def _open(config: FederationConfig, settings: SiteSettings, backbone: PreparedBackbone, folder: Path) -> SiteSession:
    own = dataclasses.replace(settings, state_dir=folder / settings.site_name)
    install_backbone(own, backbone)
    return SiteSession.open(own, config, backbone.fingerprint)


def run_local_linear_probe(config: FederationConfig, sites: dict[int, SiteSettings], backbone: PreparedBackbone,
                           out_dir: Path, *, finetune: bool = False) -> SiteResults:
    """Each site's personal head on the frozen pretrained features; no training, no federation.

    ``finetune``: then the site's personal fine-tune from there (LP-FT alone, ``training.personal_finetune_*``).
    """
    epochs = config.training.personal_finetune_epochs if finetune else 0
    probe_config = without_dp(config).model_copy(update={"training": config.training.model_copy(
        update={"personal_head": "linear_probe", "personal_finetune_epochs": epochs})})
    name = "local-linear-probe-finetune" if finetune else "local-linear-probe"
    return {s.site_name: _open(probe_config, s, backbone, out_dir / name).test_report(seed=config.seed)
            for s in tqdm(list(sites.values()), desc=f"baseline: {name.replace('-', ' ')}", unit="site")}


def run_local_only(config: FederationConfig, sites: dict[int, SiteSettings], backbone: PreparedBackbone,
                   out_dir: Path, *, name: str = "local") -> SiteResults:
    """Each site trains alone for as many rounds as the federation ran; evaluated on its own test split."""
    results: SiteResults = {}
    for settings in tqdm(list(sites.values()), desc=f"baseline: {name}", unit="site"):
        session = _open(config, settings, backbone, out_dir / name)
        train_rounds(session, config)
        results[settings.site_name] = session.test_report(seed=config.seed)
    return results


def run_local_finetune(config: FederationConfig, sites: dict[int, SiteSettings], backbone: PreparedBackbone,
                       out_dir: Path) -> SiteResults:
    """Each site fine-tunes alone with DP off (nothing leaves it, so it needs none)."""
    return run_local_only(without_dp(config), sites, backbone, out_dir, name="local-finetune")


def run_pooled(config: FederationConfig, sites: dict[int, SiteSettings], backbone: PreparedBackbone,
               out_dir: Path, *, name: str = "pooled") -> SiteResults:
    """One model trained on every site's training split together; each site then evaluates it with its
    own personal head (fitted on its own training patients) on its own test split."""
    folder = out_dir / name
    sessions = {s.site_name: _open(config, s, backbone, folder) for s in sites.values()}
    pooled_site = dataclasses.replace(next(iter(sites.values())), site_name="pooled")
    trainer = _open(config, pooled_site, backbone, folder)
    trainer.train = concatenate_splits([s.train for s in sessions.values()])
    logger.info("baseline: %s training on %d images from %d sites", name, trainer.num_train, len(sessions))
    train_rounds(trainer, config)
    trained = trainer.model.state_dict()
    results: SiteResults = {}
    for site_name, session in sessions.items():
        session.model.load_state_dict(trained)
        results[site_name] = session.test_report(seed=config.seed)
    return results


def run_pooled_ceiling(config: FederationConfig, sites: dict[int, SiteSettings], backbone: PreparedBackbone,
                       out_dir: Path) -> SiteResults:
    """Pooled training with DP off: the ceiling no federation of these sites can pass."""
    return run_pooled(without_dp(config), sites, backbone, out_dir, name="pooled-ceiling")


def evaluate_federated_sites(config: FederationConfig, sites: dict[int, SiteSettings],
                             backbone: PreparedBackbone) -> SiteResults:
    """Each simulated hospital's final model, from its own state folder: the last global layers it
    received and its personal head fitted on them (what the site itself evaluated), with intervals."""
    results: SiteResults = {}
    for settings in sites.values():
        state = SiteState(settings.state_dir)
        held = state.load_global_layers()
        if held is None or not state.has_backbone(backbone.fingerprint):
            logger.warning("[%s] holds no global layers; left out of the table", settings.site_name)
            continue
        session = SiteSession.open(settings, config, backbone.fingerprint)
        session.load_shared(held[1])
        results[settings.site_name] = session.test_report(held[0], seed=config.seed)
    return results
