"""Where a real federation's round goes: three hospitals on loopback against the same federation simulated.

The real federation is the one of ``tests/deploy/test_real_federation.py``: the coordinator
(``fedtl-coordinator start``: SuperLink behind the Fleet gate, TLS, node authentication) and three
``fedtl-hospital start`` daemons, each a real SuperNode with its own state dir, running the production
ServerApp and ClientApp (the test bundle ``tests/deploy/real_app``, which wraps them unchanged), once
with each ``--clientapp`` mode: ``warm`` (one long-lived ClientApp process, ``client.clientapp_worker``)
and ``per-message`` (Flower's default, a fresh ClientApp process per message). The simulation runs the
same federation config on the same three sites through Flower's simulation runtime
(``simulations.simulate.run_federated``). All read their per-round wall times from the run's own
``metrics.json``; round 1 carries the backbone (sent over the network to the real sites) and every
site's one-off set-up, so the steady-state figure is the mean of the later rounds.

The breakdown of each round comes from the hospitals' own logs (``FLWR_LOG_LEVEL=DEBUG`` gives
Flower's lines timestamps): for the slowest site's train and evaluate message, see
:func:`message_breakdown` (download, startup, app, reply); ``between_s``, what the round's wall time
holds beyond those two messages, is the coordinator's own work and Flower's fixed polling
(:data:`FLOWER_INTERVALS`).

Nothing is downloaded: the backbone is pretrained here on synthetic data (the coordinator's cache dir),
the sites are synthetic DICOM hospitals.

Run:  .venv/bin/python -m simulations.benchmarks.bench_real_rounds --out runs/bench_real_rounds.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from common.atomic_io import atomic_write_json

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
HOSPITALS = ("h1", "h2", "h3")
SITE_SIZES = (40, 30, 30)
IMAGE_SIZE = 32
_TIMESTAMP = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")


def federation_config(rounds: int, round_timeout_s: float = 120.0) -> dict[str, Any]:
    """The deployment tests' federation: resnet18 at 32 px, DP at epsilon 8, one local epoch, CPU."""
    return {
        "name": "bench-real-rounds",
        "seed": 0,
        "model": {"architecture": "resnet18", "image_size": IMAGE_SIZE},
        "privacy": {"enabled": True, "target_epsilon": 8.0},
        "strategy": {"name": "fedavg", "min_sites": 2, "round_timeout_s": round_timeout_s},
        "training": {"rounds": rounds, "local_epochs": 1, "batch_size": 16, "device": "cpu"},
    }


def write_toml(path: Path, config: dict[str, Any], sites: dict[str, Path] | None = None) -> Path:
    """Write ``config`` as a federation TOML (with ``[[sites]]`` tables for a simulation of ``sites``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"{key} = {json.dumps(value)}" for key, value in config.items() if not isinstance(value, dict)]
    for section, values in config.items():
        if isinstance(values, dict):
            lines.append(f"\n[{section}]")
            lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    for name, manifest in (sites or {}).items():
        lines += ["\n[[sites]]", f"name = {json.dumps(name)}", f"manifest = {json.dumps(str(manifest))}"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def round_times(metrics: dict[str, Any]) -> dict[str, Any]:
    """Per-round wall times and sites trained, and the steady-state mean (rounds after the first)."""
    rounds = metrics["rounds"]
    walls = [float(record["wall_time_s"]) for record in rounds]
    trained = [int(record["aggregate"]["sites_trained"]) for record in rounds]
    steady = walls[1:] or walls
    return {"round_wall_s": walls, "sites_trained_per_round": trained, "steady_round_s": statistics.mean(steady)}


# ------------------------------------------------------------------------------ log breakdown
_ROUND = re.compile(r"\[RUN \d+, ROUND (\d+)\]")
_WARM_TASK = re.compile(r"task \d+ (\w+): pull ([\d.]+) s, load ([\d.]+) s, handler ([\d.]+) s, push ([\d.]+) s")


def _stamp(line: str) -> float | None:
    found = _TIMESTAMP.search(line)
    if not found:
        return None
    return datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def message_breakdown(log_text: str) -> list[dict[str, Any]]:
    """One entry per message a hospital handled, from its SuperNode's and ClientApp's log lines.

    ``download_s``: the SuperNode pulling the message from the coordinator;
    ``startup_s``: message at the SuperNode -> the ClientApp's handler starts. One process per message:
    SuperExec's poll, a new Python process, Flower's imports, the FAB install; the warm worker:
    its task claim and pulling the message over the loopback Runtime API;
    ``app_s``: one process per message: importing the app (torch, Opacus, torchvision, fedtl) and the
    handler, which opens the site session every time; the warm worker: the handler only;
    ``reply_s``: the handler's end -> the SuperNode has sent the reply (its 0.5 s reply poll, upload);
    ``total_s``: the SuperNode receiving the message -> the reply sent.
    """
    entries: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    round_number: int | None = None
    for raw in log_text.splitlines():
        line = re.sub(r"\x1b\[[0-9;]*m", "", raw)
        stamp = _stamp(line)
        if (found := _ROUND.search(line)) is not None:
            round_number = int(found.group(1))
        if "Receiving:" in line and " message" in line:
            kind = line.split("Receiving:", 1)[1].split(" message", 1)[0].strip()
            current = {"type": kind, "round": round_number, "received": stamp}
        elif current is None or stamp is None:
            continue
        elif "Received successfully" in line:
            current["received_ok"] = stamp
        elif "Loading ClientApp" in line:
            current["app_start"] = stamp
        elif "Finished task" in line:
            current.setdefault("app_end", stamp)
        elif (warm := _WARM_TASK.search(line)) is not None:
            handler, push = float(warm.group(4)), float(warm.group(5))
            current["app_end"] = stamp - push
            current["app_start"] = stamp - push - handler
        elif "Sent successfully" in line:
            current["sent"] = stamp
            if all(current.get(key) is not None for key in ("received", "received_ok", "app_start", "app_end")):
                entries.append({
                    "type": current["type"],
                    "round": current["round"],
                    "download_s": round(current["received_ok"] - current["received"], 3),
                    "startup_s": round(max(0.0, current["app_start"] - current["received_ok"]), 3),
                    "app_s": round(current["app_end"] - current["app_start"], 3),
                    "reply_s": round(stamp - current["app_end"], 3),
                    "total_s": round(stamp - current["received"], 3),
                })
            current = None
    return entries


def round_breakdown(per_site: dict[str, list[dict[str, Any]]], walls: Sequence[float]) -> list[dict[str, Any]]:
    """Per round: the slowest site's train and evaluate exchanges and what the round holds beyond them.

    ``between_s`` is the round's wall time minus the slowest site's train and evaluate messages:
    the coordinator's own work (validation, aggregation, checkpoint, report) and Flower's polling on
    both sides (the ServerApp's grid asks for replies every 3 s, an idle SuperNode asks for work every 3 s).
    """
    rounds: list[dict[str, Any]] = []
    for number, wall in enumerate(walls, start=1):
        row: dict[str, Any] = {"round": number, "wall_s": round(wall, 3)}
        site_side = 0.0
        for kind in ("train", "evaluate"):
            messages = [entry for entries in per_site.values() for entry in entries
                        if entry["round"] == number and entry["type"] == kind]
            if messages:
                slowest = max(messages, key=lambda entry: entry["total_s"])
                row[kind] = {key: slowest[key] for key in ("download_s", "startup_s", "app_s", "reply_s", "total_s")}
                site_side += slowest["total_s"]
        row["between_s"] = round(wall - site_side, 3)
        rounds.append(row)
    return rounds


def summarize_breakdown(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over the steady-state rounds (after the first) of :func:`round_breakdown`."""
    steady = rounds[1:] or rounds
    summary: dict[str, Any] = {"wall_s": round(statistics.mean(r["wall_s"] for r in steady), 3),
                               "between_s": round(statistics.mean(r["between_s"] for r in steady), 3)}
    for kind in ("train", "evaluate"):
        rows = [r[kind] for r in steady if kind in r]
        if rows:
            summary[kind] = {key: round(statistics.mean(row[key] for row in rows), 3) for key in rows[0]}
    return summary


def clientapp_import_seconds(repeats: int = 3) -> float:
    """What a fresh ClientApp process pays before it can handle a message: Python start and the app's
    imports (``python -c 'import client.client_app'``), best of ``repeats``."""
    import subprocess

    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import client.client_app"], cwd=REPO_ROOT, check=True,
                       capture_output=True)
        best = min(best, time.perf_counter() - started)
    return round(best, 3)


# ------------------------------------------------------------------------------- the runs
@contextmanager
def _env(**values: str) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_loopback(work: Path, manifests: dict[str, Path], cache_dir: Path, rounds: int,
                 hospital_args: Sequence[str] = (), site_threads: int | None = None) -> dict[str, Any]:
    """The real federation on loopback (``hospital_args``: more ``fedtl-hospital start`` options); its
    round times and the per-message breakdown at the sites.

    ``site_threads``: ``OMP_NUM_THREADS`` of the hospitals' processes (torch's CPU threads per site; the
    simulation gives each site one CPU); ``None`` leaves torch's default (every core, per site).
    """
    from tests.deploy.harness import REAL_APP, ProcessSupervisor, start_loopback_federation

    supervisor = ProcessSupervisor(log_dir=work / "logs")
    run_dir = work / "run"
    config = write_toml(work / "federation.toml", federation_config(rounds))
    try:
        with _env(FLWR_LOG_LEVEL="DEBUG"):
            started = time.perf_counter()
            federation = start_loopback_federation(work / "federation", supervisor, HOSPITALS)
            with _env(**({"OMP_NUM_THREADS": str(site_threads)} if site_threads else {})):
                for site in HOSPITALS:
                    federation.start_hospital(site, manifest=manifests[site], state_dir=work / "sites" / site,
                                              extra_args=hospital_args)
            federation.wait_for_online_nodes(len(HOSPITALS), timeout_s=120)
            up = time.perf_counter() - started
            run_id = federation.submit_run(REAL_APP, {"config-file": str(config), "run-dir": str(run_dir),
                                                      "cache-dir": str(cache_dir)})
            status = federation.wait_for_run(run_id, timeout_s=300 * rounds, poll_s=2.0)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        per_site = {site: message_breakdown("".join(p.read_text(errors="replace") for p in
                                                    sorted(supervisor.log_dir.glob(f"hospital-{site}*.log"))))
                    for site in HOSPITALS}
    finally:
        supervisor.stop_all()
    times = round_times(metrics)
    rounds = round_breakdown(per_site, times["round_wall_s"])
    return {"status": status, "federation_up_s": round(up, 1), **times, "steady_breakdown": summarize_breakdown(rounds),
            "rounds": rounds, "messages": per_site}


def run_simulated(work: Path, manifests: dict[str, Path], cache_dir: Path, rounds: int) -> dict[str, Any]:
    """The same federation through Flower's simulation runtime (Ray), the three sites two at a time."""
    from common.config import FederationConfig
    from simulations.simulate import SimulationPlan, run_federated

    config = FederationConfig.from_toml(write_toml(work / "simulated.toml", federation_config(rounds), manifests))
    plan = SimulationPlan(config=config, run_dir=work / "simulated", cache_root=cache_dir, max_parallel_sites=2)
    return round_times(run_federated(plan))


CLIENTAPP_MODES = ("warm", "per-message")
"""``fedtl-hospital start --clientapp``: the long-lived ClientApp worker, and Flower's process per message."""


def measure(rounds: int = 3, clientapp_modes: Sequence[str] = CLIENTAPP_MODES, keep: Path | None = None,
            site_threads: int | None = 1) -> dict[str, Any]:
    """The real federation once per ClientApp mode and the simulation, on the same synthetic sites and
    backbone; each mode's steady round over the simulated one.

    ``keep``: a folder that keeps the runs and every process's log (default: a temporary one, removed).
    """
    from common.config import FederationConfig
    from common.data.synthetic_hospitals import generate_federation
    from server.backbone_source import prepare_backbone

    if rounds < 2:
        raise ValueError("at least 2 rounds: round 1 holds the one-off set-up and is not steady state")
    with tempfile.TemporaryDirectory(prefix="fedtl-real-rounds-") as tmp:
        work = keep or Path(tmp)
        manifests = dict(zip(HOSPITALS, generate_federation(work / "data", len(HOSPITALS), seed=0,
                                                           image_size=IMAGE_SIZE, site_sizes=SITE_SIZES)))
        cache_dir = work / "coordinator-cache"
        prepare_backbone(FederationConfig.from_dict(federation_config(rounds)), cache_dir)
        loopback = {mode: run_loopback(work / f"real-{mode}", manifests, cache_dir, rounds, ["--clientapp", mode],
                                       site_threads) for mode in clientapp_modes}
        simulated = run_simulated(work / "sim", manifests, cache_dir, rounds)
    return {
        "setting": {"sites": dict(zip(HOSPITALS, SITE_SIZES)), "image_size": IMAGE_SIZE, "rounds": rounds,
                    "privacy": "DP, epsilon 8", "site_threads": site_threads, "load_average": os.getloadavg()},
        "simulated": simulated,
        "loopback": loopback,
        "steady_ratio_real_over_simulated": {mode: round(run["steady_round_s"] / simulated["steady_round_s"], 2)
                                             for mode, run in loopback.items()},
        "clientapp_import_s": clientapp_import_seconds(),
        "flower_fixed_intervals_s": FLOWER_INTERVALS,
    }


FLOWER_INTERVALS = {
    "supernode_idle_pull": 3.0,
    "supernode_reply_wait": 0.5,
    "serverapp_grid_reply_pull": 3.0,
    "superexec_task_poll_default": 1.0,
}
"""Flower 1.41's fixed waits on a message's path (``flwr/supernode/start_client_internal.py``: an idle
SuperNode sleeps 3 s between pulls and polls for the ClientApp's reply every 0.5 s;
``flwr/superlink/grid/http_grid.py``: ``send_and_receive`` pulls replies every 3 s;
``flwr/supercore/superexec/run_superexec.py``: ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``, 1 s, the only
configurable one, replaced by the warm worker's 0.2 s). Only the last is configurable."""


def format_lines(report: dict[str, Any]) -> list[str]:
    """The benchmark table's lines for this measurement."""
    simulated = report["simulated"]
    lines = [f"real rounds, 3 hospitals on loopback (round wall s; steady = rounds 2+): simulation "
             f"{_walls(simulated)} steady {simulated['steady_round_s']:.1f}"]
    for mode, run in report["loopback"].items():
        steady = run["steady_breakdown"]
        lines.append(f"  {mode:<12} {_walls(run)} steady {run['steady_round_s']:.1f} "
                     f"({report['steady_ratio_real_over_simulated'][mode]:.1f}x simulation); slowest site per "
                     f"round: train {steady.get('train', {}).get('total_s', 0):.1f} s (startup "
                     f"{steady.get('train', {}).get('startup_s', 0):.1f}, app {steady.get('train', {}).get('app_s', 0):.1f}), "
                     f"evaluate {steady.get('evaluate', {}).get('total_s', 0):.1f} s; between exchanges "
                     f"{steady['between_s']:.1f} s")
    lines.append(f"  a fresh ClientApp process's imports: {report['clientapp_import_s']:.1f} s")
    return lines


def _walls(run: dict[str, Any]) -> str:
    return "[" + ", ".join(f"{wall:.1f}" for wall in run["round_wall_s"]) + "]"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clientapp", nargs="+", default=list(CLIENTAPP_MODES), choices=CLIENTAPP_MODES)
    parser.add_argument("--keep", type=Path, default=None, help="keep the runs and logs in this folder")
    parser.add_argument("--site-threads", type=int, default=1,
                        help="torch CPU threads per hospital (OMP_NUM_THREADS; the simulation gives each site one "
                             "CPU); 0 leaves torch's default of every core per site")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_real_rounds.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    report = measure(args.rounds, args.clientapp, args.keep, args.site_threads or None)
    atomic_write_json(args.out, report)
    print("\n".join(format_lines(report)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
