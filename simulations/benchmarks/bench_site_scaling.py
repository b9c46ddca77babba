"""How a simulated round's wall time grows with the number of hospitals (issue 7: linear in sites).

For each federation size the whole federated job runs through Flower's simulation runtime
(``fedtl simulate --no-baselines``, one fresh process each) on the demo configuration with
smaller synthetic sites, and the round times come from the run's own ``metrics.json``. Round 1
includes every site's one-off set-up (backbone install, data decoding, trunk features), so the
steady-state figure is the mean of the later rounds. A least-squares line ``seconds = a + b *
sites`` is fitted to the steady-state times; ``r2`` close to 1 and a per-site time that does not
grow with the size say the round is linear in the number of sites.

Run:  .venv/bin/python -m simulations.benchmarks.bench_site_scaling --sites 10 25 50 --out runs/bench_sites.json
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common.atomic_io import atomic_write_json
from simulations.benchmarks.bench_coordinator import linear_fit

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO_ROOT / "simulations" / "configs" / "demo.toml"


def run_size(sites: int, rounds: int, site_scale: float, parallel: int, work_dir: Path) -> dict[str, Any]:
    """One federated simulation of ``sites`` hospitals; its per-round wall times."""
    run_dir = work_dir / f"sites-{sites}"
    command = [sys.executable, "-m", "simulations.cli", "simulate", "--config", str(DEMO_CONFIG),
               "--no-baselines", "--sites", str(sites), "--rounds", str(rounds), "--site-scale", str(site_scale),
               "--parallel", str(parallel), "--out", str(run_dir)]
    logger.info("simulating %d sites: %s", sites, " ".join(command))
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"the {sites}-site simulation failed (exit {result.returncode}):\n{result.stderr[-4000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    round_times = [float(record["wall_time_s"]) for record in metrics["rounds"]]
    trained = [sum(1 for row in record["sites"].values() if row.get("status") == "ok") for record in metrics["rounds"]]
    steady = round_times[1:]
    return {
        "sites": sites,
        "round_wall_s": round_times,
        "sites_trained_per_round": trained,
        "steady_round_s": sum(steady) / len(steady),
        "steady_round_s_per_site": sum(steady) / len(steady) / sites,
        "process_wall_s": round(wall, 1),
    }


def measure(sizes: list[int], rounds: int = 3, site_scale: float = 0.3, parallel: int = 2) -> dict[str, Any]:
    """Round times for each federation size plus the linear fit of the steady-state round."""
    if rounds < 2:
        raise ValueError("at least 2 rounds: round 1 holds the one-off set-up and is not steady state")
    with tempfile.TemporaryDirectory(prefix="fedtl-sites-") as tmp:
        runs = [run_size(n, rounds, site_scale, parallel, Path(tmp)) for n in sizes]
    fit = linear_fit([float(r["sites"]) for r in runs], [r["steady_round_s"] for r in runs])
    per_site = [r["steady_round_s_per_site"] for r in runs]
    return {
        "setting": {"config": str(DEMO_CONFIG.relative_to(REPO_ROOT)), "rounds": rounds, "site_scale": site_scale,
                    "parallel_sites": parallel},
        "runs": runs,
        "steady_round_fit": fit,
        "per_site_time_largest_over_smallest": per_site[-1] / per_site[0],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[10, 25, 50])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--site-scale", type=float, default=0.3)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_sites.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    report = measure(sorted(args.sites), args.rounds, args.site_scale, args.parallel)
    atomic_write_json(args.out, report)
    fit = report["steady_round_fit"]
    for run in report["runs"]:
        print(f"{run['sites']:>4} sites: steady round {run['steady_round_s']:6.1f} s "
              f"({run['steady_round_s_per_site']:.3f} s/site), rounds {run['round_wall_s']}")
    print(f"fit: {fit['intercept_s']:.2f} s + {fit['slope_s_per_site']:.3f} s/site, r2 {fit['r2']:.4f}; "
          f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
