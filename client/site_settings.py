"""Where a site's data and state live, read from the SuperNode's node config.

A hospital starts its SuperNode with ``--node-config "manifest='...' state-dir='...' site-name='...'"``
(``fedtl-hospital start`` writes that file), optionally with ``device`` and ``storage`` (where images
and trunk features live while training: ``auto``, ``memory`` or ``disk``, see ``common.data.memory_budget``).
In simulation, the simulation runtime gives each virtual node a ``partition-id`` that the
simulation maps to a synthetic hospital (see ``SiteDirectory``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from common.data.memory_budget import Storage, check_storage
from common.wire_contract import EVALUATION_METRICS_DECIMALS, EVALUATION_METRICS_SETTINGS

logger = logging.getLogger(__name__)


class SiteSettingsError(ValueError):
    """The SuperNode was started without the settings a fedtl site needs."""


@dataclass(frozen=True)
class SiteSettings:
    """One hospital's local settings; none of it ever leaves the site."""

    site_name: str
    manifest: Path
    state_dir: Path
    device: str = "auto"
    decoded_cache_dir: Path | None = None  # default: <state_dir>/decoded; safe to share (keyed by file content)
    features_cache_dir: Path | None = None  # default: <state_dir>/features; safe to share (keyed by backbone,
    # preprocessing, cut point, image content and split)
    storage: Storage = "auto"  # images and trunk features in RAM, or memory-mapped on disk (common.data.memory_budget)
    evaluation_metrics: str = "exact"  # how test results leave the site: exact, rounded or none (wire_contract)

    def torch_device(self) -> torch.device:
        return resolve_device(self.device)


# Simulation: partition-id -> settings, filled by the simulation before it starts the runtime.
SiteDirectory = Mapping[int, SiteSettings]


def settings_from_node_config(
    node_config: Mapping[str, object], directory: SiteDirectory | None = None
) -> SiteSettings:
    """Build a site's settings from the node config a SuperNode was started with."""
    if "manifest" in node_config:
        missing = [key for key in ("state-dir",) if key not in node_config]
        if missing:
            raise SiteSettingsError(
                f"node config lacks {missing}; start the SuperNode with "
                "--node-config \"manifest='/data/labels.csv' state-dir='/var/lib/fedtl' site-name='my-hospital'\""
            )
        return SiteSettings(
            site_name=str(node_config.get("site-name", "site")),
            manifest=Path(str(node_config["manifest"])),
            state_dir=Path(str(node_config["state-dir"])),
            device=str(node_config.get("device", "auto")),
            storage=_storage_setting(node_config.get("storage", "auto")),
            evaluation_metrics=_evaluation_metrics_setting(node_config.get("evaluation-metrics", "exact")),
        )
    if "partition-id" in node_config and directory is not None:
        partition = int(node_config["partition-id"])  # type: ignore[arg-type]
        if partition not in directory:
            raise SiteSettingsError(f"simulation has no site for partition {partition}")
        return directory[partition]
    raise SiteSettingsError(
        "this SuperNode has no fedtl site settings: pass --node-config with manifest, state-dir and site-name"
    )


def _evaluation_metrics_setting(value: object) -> str:
    if str(value) not in EVALUATION_METRICS_SETTINGS:
        raise SiteSettingsError(
            f"node config 'evaluation-metrics' is {str(value)[:40]!r}; use 'exact' (test results as computed), "
            f"'rounded' (to {EVALUATION_METRICS_DECIMALS} decimals) or 'none' (only the number of test images)"
        )
    return str(value)


def _storage_setting(value: object) -> Storage:
    try:
        return check_storage(str(value))
    except ValueError as exc:
        raise SiteSettingsError(
            f"node config 'storage': {exc}; 'disk' keeps images and trunk features memory-mapped on the "
            "site's disk, 'memory' in RAM, 'auto' decides by the memory available"
        ) from exc


def resolve_device(requested: str) -> torch.device:
    """'auto' picks the site's GPU when there is one, else the CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        logger.warning("device %s requested but no CUDA GPU is visible; training on the CPU", requested)
        return torch.device("cpu")
    return device
