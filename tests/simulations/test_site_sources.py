"""Which sites a simulation runs on: [[sites]] tables, --sites-from, [partition], or the synthetic default."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import pytest

from common.config import FederationConfig
from simulations.simulation_plan import SimulationPlan
from simulations.site_sources import SiteSourceError, pooled_synthetic_manifest, resolve_sites
from tests.simulations.site_folders import balanced_patients, write_site


def plan_for(tmp_path: Path, config: FederationConfig, **changes: object) -> SimulationPlan:
    return SimulationPlan(config=config, run_dir=tmp_path / "run", cache_root=tmp_path / "cache", **changes)


def test_sites_tables_in_the_toml_name_the_sites_with_paths_relative_to_the_toml(tmp_path: Path) -> None:
    write_site(tmp_path / "study" / "data" / "north", balanced_patients("n"))
    write_site(tmp_path / "study" / "data" / "south", balanced_patients("s"))
    toml = tmp_path / "study" / "federation.toml"
    toml.write_text(
        'name = "study"\n'
        '[[sites]]\nname = "south"\nmanifest = "data/south/manifest.csv"\nstate_dir = "state/south"\n'
        '[[sites]]\nname = "north"\nmanifest = "data/north/manifest.csv"\n'
    )
    config = FederationConfig.from_toml(toml)
    sites = resolve_sites(plan_for(tmp_path, config))
    assert [s.site_name for s in sites.values()] == ["north", "south"]
    assert sites[0].manifest == (tmp_path / "study/data/north/manifest.csv").resolve()
    assert sites[0].state_dir == tmp_path / "run" / "sites" / "north"
    assert sites[1].state_dir == (tmp_path / "study/state/south").resolve()
    assert sites[0].decoded_cache_dir != sites[1].decoded_cache_dir
    sent = config.to_json()  # what the coordinator sends to every site
    assert "north" not in sent and "manifest.csv" not in sent, "where the researcher's files are never travels"


def test_sites_from_a_folder_take_each_sub_folders_name(tmp_path: Path) -> None:
    for name in ("b-clinic", "a_hospital"):
        write_site(tmp_path / "sites" / name, balanced_patients(name))
    (tmp_path / "sites" / "notes").mkdir()  # no manifest.csv: not a site
    sites = resolve_sites(plan_for(tmp_path, FederationConfig(), sites_from=tmp_path / "sites"))
    assert [s.site_name for s in sites.values()] == ["a_hospital", "b-clinic"]
    assert all(s.manifest.name == "manifest.csv" for s in sites.values())


def test_a_folder_without_site_manifests_or_sites_given_twice_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(SiteSourceError, match="no sub-folder holds a manifest.csv"):
        resolve_sites(plan_for(tmp_path, FederationConfig(), sites_from=tmp_path / "empty"))
    write_site(tmp_path / "sites" / "one", balanced_patients("o"))
    config = FederationConfig.from_dict({"sites": [{"name": "x", "manifest": str(tmp_path / "m.csv")}]})
    with pytest.raises(SiteSourceError, match="given twice"):
        resolve_sites(plan_for(tmp_path, config, sites_from=tmp_path / "sites"))
    with pytest.raises(Exception, match="either \\[\\[sites\\]\\] tables or a \\[partition\\]"):
        FederationConfig.from_dict({"sites": [{"name": "x", "manifest": "m.csv"}],
                                    "partition": {"by": "iid", "num_sites": 2}})


def test_a_partition_is_written_into_the_run_folder_and_its_sites_are_the_run_sites(tmp_path: Path) -> None:
    manifest = write_site(tmp_path / "pooled", {f"p{i}": ("finding" if i % 2 else "normal", 2) for i in range(16)})
    toml = tmp_path / "federation.toml"
    toml.write_text('[partition]\nby = "iid"\nnum_sites = 3\nmanifest = "pooled/manifest.csv"\nseed = 4\n')
    config = FederationConfig.from_toml(toml)
    assert config.partition is not None and config.partition.manifest == manifest.resolve()
    sites = resolve_sites(plan_for(tmp_path, config))
    assert [s.site_name for s in sites.values()] == ["hospital-0", "hospital-1", "hospital-2"]
    for site in sites.values():
        assert site.manifest == (tmp_path / "run" / "partition" / site.site_name / "manifest.csv").resolve()
        assert site.state_dir == tmp_path / "run" / "sites" / site.site_name
    assert (tmp_path / "run" / "partition" / "partition.json").is_file()


def test_without_a_manifest_a_partition_cuts_the_pooled_synthetic_hospitals(tmp_path: Path) -> None:
    config = FederationConfig.from_dict({"model": {"image_size": 16}})
    plan = plan_for(tmp_path, config, num_sites=2, site_scale=0.05)
    pooled = list(csv.DictReader(pooled_synthetic_manifest(plan).open()))
    assert {row["hospital"] for row in pooled} == {"hospital-0", "hospital-1"}
    natural = dataclasses.replace(plan, config=FederationConfig.from_dict(
        {"model": {"image_size": 16}, "partition": {"by": "column", "column": "hospital"}}))
    sites = resolve_sites(natural)
    assert [s.site_name for s in sites.values()] == ["hospital-0", "hospital-1"]
    rows = [len(list(csv.DictReader(s.manifest.open()))) for s in sites.values()]
    assert sum(rows) == len(pooled)


def test_the_shipped_dirichlet_demo_cuts_the_pooled_demo_hospitals_into_ten_skewed_sites() -> None:
    config = FederationConfig.from_toml(Path(__file__).resolve().parents[2] / "simulations/configs/demo-dirichlet.toml")
    demo = FederationConfig.from_toml(Path(__file__).resolve().parents[2] / "simulations/configs/demo.toml")
    assert config.partition is not None and config.partition.manifest is None  # the synthetic hospitals, pooled
    assert (config.partition.by, config.partition.num_sites, config.partition.alpha) == ("dirichlet", 10, 0.3)
    assert config.model_copy(update={"name": demo.name, "partition": None}) == demo, "otherwise the demo's settings"


def test_caches_made_from_the_generators_data_are_keyed_by_its_version(monkeypatch: pytest.MonkeyPatch,
                                                                       tmp_path: Path) -> None:
    """Another version of the generator (or of the pretraining code) never reuses data or a backbone made
    by this one: the same command gives the same table whatever an older checkout left in the cache."""
    from server import backbone_source
    from simulations import site_sources

    config = FederationConfig()
    plan = SimulationPlan(config=config, run_dir=tmp_path / "run")
    data_dir = site_sources._synthetic_dir(plan)
    backbone = backbone_source.pretrained_checkpoint_path(config.model, tmp_path, seed=0)
    assert data_dir == site_sources._synthetic_dir(plan)  # stable for one version
    assert backbone == backbone_source.pretrained_checkpoint_path(config.model, tmp_path, seed=0)
    monkeypatch.setattr(site_sources, "generator_digest", lambda: "0ther000")
    monkeypatch.setattr(backbone_source, "generator_digest", lambda: "0ther000")
    assert site_sources._synthetic_dir(plan) != data_dir
    assert backbone_source.pretrained_checkpoint_path(config.model, tmp_path, seed=0) != backbone
