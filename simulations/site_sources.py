"""Which sites a simulation runs on: the synthetic hospitals, or the researcher's own data.

:func:`resolve_sites` looks, in this order, at

1. ``--sites-from DIR`` (``SimulationPlan.sites_from``): one sub-folder per site holding a
   ``manifest.csv``; the folder's name is the site's name (a multi-centre study, FLamby's natural splits);
2. ``[[sites]]`` tables in the federation TOML (``name``, ``manifest``, optional ``state_dir``);
3. ``[partition]``: one manifest cut into sites by a column, IID or Dirichlet
   (``common.data.partitioning``), written to ``<run>/partition/<site>/manifest.csv``; without a
   ``manifest`` the synthetic hospitals pooled into one manifest with a ``hospital`` column are cut;
4. otherwise ``num_sites`` synthetic hospitals (``common.data.synthetic_hospitals``), made once under
   the cache folder.

Only one of the first three may be given. Every run, variant, baseline and seed of the experiment
then uses the same sites and so the same patient splits. Each site keeps its state (ledger, heads)
in ``<run>/sites/<name>`` unless ``[[sites]] state_dir`` says otherwise; its decoded images and trunk
features are cached under the cache folder, once per site and manifest, shared by every run on it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from pathlib import Path

from client.site_settings import SiteSettings
from common.atomic_io import atomic_write_json, atomic_write_text
from common.config import ConfigError
from common.data.partitioning import write_partition
from common.data.synthetic_hospitals import default_site_sizes, generate_federation, generator_digest
from simulations.simulation_plan import SimulationPlan

logger = logging.getLogger(__name__)

SITE_MANIFEST = "manifest.csv"
PARTITION_DIR = "partition"
POOLED_MANIFEST = "pooled.csv"
SITE_COLUMN = "hospital"


class SiteSourceError(ConfigError):
    """The sites of a run cannot be found as configured; the message says what to change."""


def resolve_sites(plan: SimulationPlan) -> dict[int, SiteSettings]:
    """Partition id -> site settings for every simulated site of ``plan``, in site-name order for own data."""
    config = plan.config
    given = [label for label, present in (("--sites-from", plan.sites_from is not None),
                                          ("[[sites]]", bool(config.sites)),
                                          ("[partition]", config.partition is not None)) if present]
    if len(given) > 1:
        raise SiteSourceError(f"the sites are given twice ({' and '.join(given)}); keep one of them")
    if plan.sites_from is not None:
        return _numbered(plan, _sites_in_folder(plan.sites_from))
    if config.sites:
        named = [(site.name, site.manifest) for site in sorted(config.sites, key=lambda s: s.name)]
        state_dirs = {site.name: site.state_dir for site in config.sites if site.state_dir is not None}
        return _numbered(plan, named, state_dirs)
    if config.partition is not None:
        source = config.partition.manifest or pooled_synthetic_manifest(plan)
        if not Path(source).exists():
            raise SiteSourceError(f"[partition] manifest {source}: no such file or folder")
        parts = write_partition(source, config.partition, config.model.class_names, plan.run_dir / PARTITION_DIR)
        return _numbered(plan, [(part.name, part.manifest) for part in parts])
    return synthetic_sites(plan)


def describe_sites(plan: SimulationPlan) -> str:
    """Where the run's sites came from, in words (for the report)."""
    if plan.sites_from is not None:
        return f"the researcher's own sites, one per sub-folder of {plan.sites_from}"
    if plan.config.sites:
        return f"the researcher's own sites ({len(plan.config.sites)} [[sites]] tables)"
    partition = plan.config.partition
    if partition is not None:
        source = partition.manifest or f"the {plan.num_sites} synthetic hospitals pooled"
        return f"{partition.describe()} of {source} (per-site manifests in {plan.run_dir / PARTITION_DIR})"
    return f"{plan.num_sites} synthetic hospitals (data seed {plan.data_seed}, scale {plan.site_scale:g})"


def _sites_in_folder(folder: Path) -> list[tuple[str, Path]]:
    if not folder.is_dir():
        raise SiteSourceError(f"--sites-from {folder}: no such folder; give a folder with one sub-folder per site")
    found = [(child.name, child / SITE_MANIFEST) for child in sorted(folder.iterdir())
             if child.is_dir() and (child / SITE_MANIFEST).is_file()]
    if not found:
        raise SiteSourceError(
            f"--sites-from {folder}: no sub-folder holds a {SITE_MANIFEST}; make one folder per site "
            f"(its name is the site's name) with the site's {SITE_MANIFEST} inside"
        )
    odd = [name for name, _ in found if not all(ch.isalnum() or ch in "-_." for ch in name)]
    if odd:
        raise SiteSourceError(
            f"--sites-from {folder}: folder name(s) {', '.join(map(repr, odd))} cannot be site names; "
            "rename them with letters, digits, '-', '_' or '.' only"
        )
    return found


def _numbered(plan: SimulationPlan, sites: list[tuple[str, Path]],
              state_dirs: dict[str, Path] | None = None) -> dict[int, SiteSettings]:
    state_dirs = state_dirs or {}
    resolved = {}
    for index, (name, manifest) in enumerate(sites):
        manifest = Path(manifest).resolve()
        cache = plan.cache_dir / "sites" / f"{name}-{hashlib.sha256(str(manifest).encode()).hexdigest()[:12]}"
        resolved[index] = SiteSettings(
            site_name=name,
            manifest=manifest,
            state_dir=state_dirs.get(name) or plan.run_dir / "sites" / name,
            device=plan.config.training.device,
            # keyed by content: shared by every run, variant and baseline on this site
            decoded_cache_dir=cache / "decoded",
            features_cache_dir=cache / "features",
        )
    logger.info("%d sites: %s", len(resolved), ", ".join(s.site_name for s in resolved.values()))
    return resolved


# ----------------------------------------------------------------------------- synthetic hospitals


def _synthetic_dir(plan: SimulationPlan) -> Path:
    return plan.cache_dir / (f"hospitals-n{plan.num_sites}-s{plan.data_seed}-x{plan.site_scale:g}-"
                             f"{plan.config.model.image_size}px-g{generator_digest()}")


def _synthetic_manifests(plan: SimulationPlan) -> list[Path]:
    data_dir = _synthetic_dir(plan)
    marker = data_dir / "manifests.json"
    if marker.exists():
        return [data_dir / name for name in json.loads(marker.read_text())]
    sizes = [max(12, round(size * plan.site_scale)) for size in default_site_sizes(plan.num_sites)]
    manifests = generate_federation(data_dir, num_sites=plan.num_sites, seed=plan.data_seed,
                                    image_size=plan.config.model.image_size, site_sizes=sizes)
    atomic_write_json(marker, [str(Path(m).relative_to(data_dir)) for m in manifests])
    return [Path(m) for m in manifests]


def synthetic_sites(plan: SimulationPlan) -> dict[int, SiteSettings]:
    """Write (or reuse) the synthetic hospitals and map each simulation partition to one."""
    data_dir = _synthetic_dir(plan)
    return {
        index: SiteSettings(
            site_name=f"hospital-{index}",
            manifest=manifest,
            state_dir=plan.run_dir / "sites" / f"hospital-{index}",
            device=plan.config.training.device,
            # one decoded-image and one trunk-feature cache per synthetic site, shared by every run,
            # variant and baseline on it (both are keyed by content)
            decoded_cache_dir=data_dir / f"decoded-{index}",
            features_cache_dir=data_dir / f"features-{index}",
        )
        for index, manifest in enumerate(_synthetic_manifests(plan))
    }


def pooled_synthetic_manifest(plan: SimulationPlan) -> Path:
    """The synthetic hospitals as ONE manifest (absolute paths, plus a ``hospital`` column): what a
    ``[partition]`` without a ``manifest`` cuts. ``by = "column"``, ``column = "hospital"`` gives the
    synthetic hospitals back."""
    pooled = _synthetic_dir(plan) / POOLED_MANIFEST
    if pooled.exists():
        return pooled
    header: list[str] = []
    rows: list[dict[str, str]] = []
    for index, manifest in enumerate(_synthetic_manifests(plan)):
        with manifest.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            header = [*(reader.fieldnames or []), SITE_COLUMN]
            for row in reader:
                rows.append({**row, "path": str((manifest.parent / row["path"]).resolve()),
                             SITE_COLUMN: f"hospital-{index}"})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=header, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(pooled, buffer.getvalue())
    return pooled
