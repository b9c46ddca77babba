"""``fedtl``: the researcher's command line (simulate a federation, check a site's data, benchmark)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from common.config import ConfigError, FederationConfig

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "demo.toml"


def _simulate(args: argparse.Namespace) -> int:
    from common.data.partitioning import PartitionError
    from common.data.site_manifest import ManifestError
    from server.run_report import format_table
    from simulations.experiment import run_experiment
    from simulations.preflight import PreflightRefused, check_sites, format_checks, refuse_unless_ready
    from simulations.simulate import RunFolderInUse, SimulationPlan, prepare_run_folder
    from simulations.site_sources import resolve_sites

    config = FederationConfig.from_toml(args.config)
    if args.rounds:
        config = config.model_copy(update={"training": config.training.model_copy(update={"rounds": args.rounds})})
    own_data = args.sites_from is not None or bool(config.sites) or (
        config.partition is not None and config.partition.manifest is not None)
    if own_data and args.sites is not None:
        print("error: --sites sets the number of synthetic hospitals; the sites here are your own "
              "(--sites-from, [[sites]] or [partition] manifest): remove --sites", file=sys.stderr)
        return 2
    run_dir = Path(args.out) if args.out else Path("runs") / config.name
    try:
        prepare_run_folder(run_dir, resume=args.resume, overwrite=args.overwrite)
    except RunFolderInUse as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    plan = SimulationPlan(config=config, run_dir=run_dir, num_sites=args.sites or 4, data_seed=args.data_seed,
                          site_scale=args.site_scale, max_parallel_sites=args.parallel, resume=args.resume,
                          sites_from=args.sites_from)
    try:
        sites = resolve_sites(plan)
    except (ManifestError, PartitionError) as exc:
        print(f"error: the sites cannot be made: {exc}", file=sys.stderr)
        return 2
    checks = check_sites(sites, config)
    print("pre-flight check of every site (counts stay on this machine):")
    print(format_checks(checks))
    try:
        refuse_unless_ready(checks)
    except PreflightRefused as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    metrics = run_experiment(plan, baselines=not args.no_baselines, privacy_sweep=args.privacy_sweep,
                             extra_rows=args.extra_rows,
                             seeds=args.seeds, sites=sites)
    print()
    print(format_table(metrics))
    print()
    print(f"report: {run_dir / 'report.md'}")
    print(f"metrics: {run_dir / 'metrics.json'} and {run_dir / 'metrics.csv'}; plots in {run_dir / 'plots'}; "
          f"TensorBoard: tensorboard --logdir {run_dir.parent}")
    return 0


def _quality_report(args: argparse.Namespace) -> int:
    from common.data.data_quality import main as quality_main

    return int(quality_main([str(args.manifest), *args.extra]) or 0)


def _synthetic_hospitals(args: argparse.Namespace) -> int:
    from common.data.synthetic_hospitals import generate_federation

    names = [name.strip() for name in args.names.split(",") if name.strip()]
    sizes = [args.images] * len(names) if args.images else None
    manifests = generate_federation(args.out, len(names), seed=args.seed, image_size=args.image_size,
                                    site_sizes=sizes)
    for name, manifest in zip(names, manifests):
        target = manifest.parent.with_name(name)
        if target.exists():
            print(f"error: {target} exists; choose another --out", file=sys.stderr)
            return 2
        manifest.parent.rename(target)
        print(f"{name}: {target / manifest.name}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedtl", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    simulate = sub.add_parser("simulate", help="simulate a federation (synthetic hospitals or your own sites; "
                              "Flower + Ray)")
    simulate.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                          help="federation TOML (its [[sites]] or [partition] name your own sites)")
    simulate.add_argument("--sites", type=int, default=None, help="number of synthetic hospitals (default 4)")
    simulate.add_argument("--sites-from", type=Path, default=None,
                          help="your own sites: a folder with one sub-folder per site, each holding a manifest.csv")
    simulate.add_argument("--rounds", type=int, default=0, help="override training.rounds")
    simulate.add_argument("--out", type=Path, default=None, help="run folder (default runs/<name>)")
    simulate.add_argument("--data-seed", type=int, default=0)
    simulate.add_argument("--site-scale", type=float, default=1.0, help="multiply every site's size")
    simulate.add_argument("--parallel", type=int, default=2, help="sites training at once (1 CPU each)")
    simulate.add_argument("--resume", action="store_true", help="continue after the last completed round")
    simulate.add_argument("--overwrite", action="store_true",
                          help="replace an earlier run in the same folder (its simulated hospitals start afresh)")
    simulate.add_argument("--no-baselines", action="store_true", help="federated run only")
    simulate.add_argument("--seeds", type=int, default=1,
                          help="run the whole comparison for this many seeds and report each row's spread")
    simulate.add_argument("--extra-rows", action="store_true",
                          help="also the random-init federation and the sites alone and pooled under the DP budget "
                          "(three more DP trainings)")
    simulate.add_argument("--privacy-sweep", action="store_true",
                          help="also run the federation at epsilon 1 and 3 (two more federations) for the "
                          "privacy-utility plot")
    simulate.set_defaults(handler=_simulate)

    synthetic = sub.add_parser("synthetic-hospitals", help="write synthetic hospitals (DICOM files + manifest.csv "
                               "per site) to try a real federation before the real data is in place")
    synthetic.add_argument("--out", type=Path, required=True, help="parent folder: one sub-folder per hospital")
    synthetic.add_argument("--names", default="north,south,east", help="comma-separated hospital names")
    synthetic.add_argument("--image-size", type=int, default=64)
    synthetic.add_argument("--images", type=int, default=None,
                           help="images per hospital (default: sizes that differ per site, 40 to 400)")
    synthetic.add_argument("--seed", type=int, default=0)
    synthetic.set_defaults(handler=_synthetic_hospitals)

    quality = sub.add_parser("quality-report", help="a site's data-quality report (stays on this machine)")
    quality.add_argument("manifest", type=Path)
    quality.add_argument("extra", nargs=argparse.REMAINDER)
    quality.set_defaults(handler=_quality_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    from common.data.metadata_guard import install_log_guard

    install_log_guard()  # researchers' own DICOM sites: header values never reach a log
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
