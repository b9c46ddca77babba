"""What one simulation runs: the federation config, the run folder, where its sites come from, the machine share."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.config import FederationConfig


@dataclass(frozen=True)
class SimulationPlan:
    """What to simulate: the federation config plus its sites and the machine share.

    The sites are the researcher's own when ``sites_from`` (a folder with one sub-folder per site,
    each holding a ``manifest.csv``), ``config.sites`` (``[[sites]]``) or ``config.partition``
    (``[partition]``) says so; otherwise ``num_sites`` synthetic hospitals (``data_seed``,
    ``site_scale``). See ``simulations.site_sources``.
    """

    config: FederationConfig
    run_dir: Path
    num_sites: int = 4
    data_seed: int = 0
    site_scale: float = 1.0
    cpus_per_site: float = 1.0
    max_parallel_sites: int = 2
    resume: bool = False
    random_init: bool = False
    cache_root: Path | None = None
    sites_from: Path | None = None

    @property
    def cache_dir(self) -> Path:
        """Shared across runs: synthetic data and the pretrained backbone are made once."""
        return self.cache_root or self.run_dir.parent / ".cache"
