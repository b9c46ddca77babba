"""The real fedtl apps over TLS + node authentication on loopback, and the faults they must survive.

Each scenario is one coordinator (``server.ops.coordinator_service start``: SuperLink behind the
Fleet-only gate) and three hospitals (``client.hospital_daemon start``), each with tiny synthetic
data and its own state dir. Runs are submitted from the coordinator's own profile with the app in
``real_app/``: the production ServerApp and ClientApp, the ClientApp wrapped so that a site whose
node config has ``fault`` corrupts its train replies (production code has no such switch).

Two scenarios, each run once per module and then examined by several tests (a scenario costs
minutes of CPU, so its run is shared):

* ``hospital_crash``: 4 rounds with DP; the backbone travels over the network in round 1; in
  round 2 hospital h3 is SIGKILLed mid-training (after its ledger reserved the round's steps),
  the round completes with h1 and h2, and ``fedtl-hospital start`` is run again for h3 at once,
  with the same state dir, and only once: Flower refuses the node while it still counts the old
  session online (two missed 30 s heartbeats), and the daemon must tell that from a refused key
  and get in by itself. Round 4 is the one h3 is certain to train in.
* ``coordinator_restart``: 2 rounds without DP, the hospitals already hold the backbone, h3
  sends NaN tensors in round 1 and wrongly shaped ones in round 2; after round 1 the whole
  coordinator (service, SuperLink, ServerApp) is SIGKILLed, restarted with its persistent
  SuperLink database, and the run is submitted again with ``resume=true``.

The pretrained backbone is made once for the module (the coordinator's ``cache-dir``). Refused
keys and CAs are covered in ``test_loopback_federation.py``.
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from client.privacy.privacy_budget import PrivacyLedger
from client.site_state import SiteState
from common.config import FederationConfig
from common.data.synthetic_hospitals import generate_federation
from server.backbone_source import PreparedBackbone, prepare_backbone
from server.checkpoints import checkpoint_dir, latest_checkpoint
from tests.phi_canaries import CANARY_FILE, canary_hits, plant_canaries
from tests.deploy.harness import REAL_APP, LoopbackFederation, ProcessSupervisor, start_loopback_federation

logger = logging.getLogger(__name__)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

HOSPITALS = ("h1", "h2", "h3")
SITE_SIZES = (40, 30, 30)
IMAGE_SIZE = 32
CRASHED = "h3"
CRASH_ROUNDS = 4
MALFORMED = "h3"
# Per exchange (train, backbone install, evaluate). With the hospitals' long-lived ClientApp
# worker a site's reply takes 2-15 s on a loaded 2-core machine, but the backbone install of round 1
# (45 MB over TLS to three sites at once) took 27-30 s beside the rest of the suite; 45 s leaves room
# for it without making the crashed site's round long.
ROUND_TIMEOUT_S = 45.0
# Flower counts a killed node online until 2 heartbeat intervals (2 x 30 s) after its last
# heartbeat: a restart is let in 35-60 s after the kill, plus the daemon's retry interval.
REJOIN_TIMEOUT_S = 120.0


def federation_config(*, rounds: int, privacy: bool, round_timeout_s: float = ROUND_TIMEOUT_S,
                      local_epochs: int = 1, batch_size: int = 16) -> dict[str, Any]:
    """A federation small enough for CI: resnet18 at 32 px, one local epoch, CPU."""
    return {
        "name": "deploy-e2e",
        "seed": 0,
        "model": {"architecture": "resnet18", "image_size": IMAGE_SIZE},
        "privacy": {"enabled": privacy, "target_epsilon": 8.0},
        "strategy": {"name": "fedavg", "min_sites": 2, "round_timeout_s": round_timeout_s},
        "training": {"rounds": rounds, "local_epochs": local_epochs, "batch_size": batch_size, "device": "cpu"},
    }


def write_config(path: Path, config: dict[str, Any]) -> Path:
    """Write the federation TOML the coordinator reads (``config-file`` in the run config)."""
    lines = [f"{key} = {json.dumps(value)}" for key, value in config.items() if not isinstance(value, dict)]
    for section, values in config.items():
        if isinstance(values, dict):
            lines.append(f"\n[{section}]")
            lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    FederationConfig.from_toml(path)  # the test's own configuration must be valid
    return path


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, PreparedBackbone]:
    """The coordinator's cache-dir, shared by every scenario (pretraining happens here, once),
    and the backbone the ServerApp will prepare from it."""
    cache = tmp_path_factory.mktemp("coordinator-cache")
    config = FederationConfig.from_dict(federation_config(rounds=1, privacy=True))
    return cache, prepare_backbone(config, cache)


@pytest.fixture(scope="module")
def hospital_manifests(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three tiny synthetic hospitals (DICOM files + manifest), one per site name; h1 holds the canaries."""
    manifests = generate_federation(
        tmp_path_factory.mktemp("hospital-data"), len(HOSPITALS), seed=0, image_size=IMAGE_SIZE, site_sizes=SITE_SIZES
    )
    plant_canaries(manifests[0])
    return dict(zip(HOSPITALS, manifests))


@dataclass
class Scenario:
    """One running federation and where its run writes."""

    federation: LoopbackFederation
    manifests: dict[str, Path]
    cache_dir: Path
    run_dir: Path

    @property
    def log_dir(self) -> Path:
        return self.federation.supervisor.log_dir

    def state_dir(self, site: str) -> Path:
        return self.federation.root / "sites" / site

    def start_hospital(self, site: str, fault: str | None = None) -> None:
        self.federation.start_hospital(
            site,
            manifest=self.manifests[site],
            state_dir=self.state_dir(site),
            extra_node_config={"fault": fault} if fault else None,
        )

    def submit(self, config_file: Path, *, resume: bool = False) -> int:
        return self.federation.submit_run(
            REAL_APP,
            {
                "config-file": str(config_file),
                "run-dir": str(self.run_dir),
                "cache-dir": str(self.cache_dir),
                "resume": resume,
            },
        )

    def metrics(self) -> dict[str, Any]:
        path = self.run_dir / "metrics.json"
        return json.loads(path.read_text()) if path.exists() else {"rounds": []}

    def recorded_rounds(self) -> list[int]:
        return [record["round"] for record in self.metrics()["rounds"]]

    def wait_until(self, what: str, condition: Callable[[], bool], timeout_s: float, run_id: int) -> None:
        """Poll ``condition`` (cheap: files on disk), checking now and then that the run still runs."""
        deadline = time.monotonic() + timeout_s
        next_status_check = time.monotonic() + 20
        while time.monotonic() < deadline:
            if condition():
                return
            if time.monotonic() > next_status_check:
                status = self.federation.run_status(run_id)
                if status.startswith("finished") and not condition():
                    raise AssertionError(f"run {run_id} ended {status} before {what}; logs in {self.log_dir}")
                next_status_check = time.monotonic() + 20
            time.sleep(0.1)
        raise AssertionError(f"not {what} after {timeout_s:.0f} s; logs in {self.log_dir}")

    def wait_for_rounds(self, rounds: int, run_id: int, timeout_s: float) -> None:
        self.wait_until(f"round {rounds} recorded", lambda: len(self.recorded_rounds()) >= rounds, timeout_s, run_id)

    def finish(self, run_id: int, timeout_s: float = 60) -> str:
        return self.federation.wait_for_run(run_id, timeout_s=timeout_s, poll_s=2.0)


def start_scenario(
    root: Path,
    supervisor: ProcessSupervisor,
    manifests: dict[str, Path],
    cache_dir: Path,
    *,
    faults: dict[str, str] | None = None,
    database: str | None = ":flwr-in-memory:",
) -> Scenario:
    federation = start_loopback_federation(root / "federation", supervisor, HOSPITALS, database)
    scenario = Scenario(federation, manifests, cache_dir, root / "run")
    for site in HOSPITALS:
        scenario.start_hospital(site, fault=(faults or {}).get(site))
    federation.wait_for_online_nodes(len(HOSPITALS), timeout_s=60)
    return scenario


def preinstall_backbone(state_dir: Path, backbone: PreparedBackbone) -> None:
    """What a site's earlier ``install_backbone`` left behind: the backbone cached by fingerprint."""
    meta = {"mean": list(backbone.mean), "std": list(backbone.std), "source": backbone.source}
    SiteState(state_dir).store_backbone(backbone.fingerprint, backbone.tensors, meta)


def ledger_document(state_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((state_dir / "ledger.json").read_text())["ledger"]
    except (OSError, ValueError, KeyError):
        return {}


@dataclass(frozen=True)
class HeadSnapshot:
    """The local head file as seen at one moment: modification time and whether it loads."""

    mtime_ns: int
    loadable: bool

    @classmethod
    def of(cls, state_dir: Path, fingerprint: str) -> HeadSnapshot:
        state = SiteState(state_dir)
        head = state.local_head_path
        if not head.exists():
            return cls(0, False)
        return cls(head.stat().st_mtime_ns, state.load_local_head(backbone_fingerprint=fingerprint) is not None)


# ------------------------------------------------------------------------- scenario: crash
@dataclass
class HospitalCrash:
    """What the crash scenario observed."""

    scenario: Scenario
    run_status: str
    metrics: dict[str, Any]
    node_id_before: int
    node_id_after: int
    epsilon_before_kill: float
    epsilon_after_restart: float
    epsilon_at_end: float
    head_before_kill: HeadSnapshot
    head_after_restart: HeadSnapshot
    head_at_end: HeadSnapshot
    rejoin_log: str = ""
    rounds_done_at_rejoin: int = 0
    restarted_exit: int | None = None
    timings: dict[str, float] = field(default_factory=dict)


@pytest.fixture(scope="module")
def hospital_crash(
    tmp_path_factory: pytest.TempPathFactory,
    backbone: tuple[Path, PreparedBackbone],
    hospital_manifests: dict[str, Path],
) -> Iterator[HospitalCrash]:
    root = tmp_path_factory.mktemp("hospital-crash")
    supervisor = ProcessSupervisor(log_dir=root / "logs")
    cache_dir, prepared = backbone
    try:
        started = time.monotonic()
        scenario = start_scenario(root, supervisor, hospital_manifests, cache_dir)
        # 8 DP steps a round at the crashed site (30 images, batch 8, 2 epochs) instead of 2: its training
        # must still be running when the kill lands, also on a loaded machine (a DP step at 32 px is fast).
        config = write_config(root / "federation.toml",
                              federation_config(rounds=CRASH_ROUNDS, privacy=True, local_epochs=2, batch_size=8))
        crashed_dir = scenario.state_dir(CRASHED)
        timings = {"federation_up_s": time.monotonic() - started}

        run_id = scenario.submit(config)
        scenario.wait_for_rounds(1, run_id, timeout_s=300)
        timings["round_1_s"] = time.monotonic() - started - timings["federation_up_s"]
        epsilon_before = PrivacyLedger.load(crashed_dir / "ledger.json").spent_epsilon()
        head_before = HeadSnapshot.of(crashed_dir, prepared.fingerprint)
        node_before = scenario.federation.node_id(CRASHED)

        # Mid-round: the site has reserved round 2's privacy steps and is training.
        scenario.wait_until(
            f"{CRASHED} training round 2",
            lambda: ledger_document(crashed_dir).get("reserved_steps", 0) > 0,
            timeout_s=120,
            run_id=run_id,
        )
        scenario.federation.kill_hospital(CRASHED)
        killed_at = time.monotonic()

        # One immediate restart, as a service manager would do it: the daemon itself waits out
        # Flower's heartbeat window (the old session still counts as online) and gets back in.
        scenario.start_hospital(CRASHED)
        restarted = scenario.federation.hospitals[CRASHED]
        scenario.federation.wait_until_connected(CRASHED, timeout_s=REJOIN_TIMEOUT_S)
        timings["kill_to_rejoin_s"] = time.monotonic() - killed_at
        rounds_done_at_rejoin = len(scenario.recorded_rounds())
        rejoin_log = restarted.output()
        epsilon_after_restart = PrivacyLedger.load(crashed_dir / "ledger.json").spent_epsilon()
        head_after_restart = HeadSnapshot.of(crashed_dir, prepared.fingerprint)

        scenario.wait_for_rounds(CRASH_ROUNDS, run_id, timeout_s=300)
        status = scenario.finish(run_id)
        timings["total_s"] = time.monotonic() - started
        logger.info("hospital crash scenario timings: %s", timings)
        yield HospitalCrash(
            scenario=scenario,
            run_status=status,
            metrics=scenario.metrics(),
            node_id_before=node_before,
            node_id_after=scenario.federation.node_id(CRASHED),
            epsilon_before_kill=epsilon_before,
            epsilon_after_restart=epsilon_after_restart,
            epsilon_at_end=PrivacyLedger.load(crashed_dir / "ledger.json").spent_epsilon(),
            head_before_kill=head_before,
            head_after_restart=head_after_restart,
            head_at_end=HeadSnapshot.of(crashed_dir, prepared.fingerprint),
            rejoin_log=rejoin_log,
            rounds_done_at_rejoin=rounds_done_at_rejoin,
            restarted_exit=restarted.popen.poll(),
            timings=timings,
        )
    finally:
        supervisor.stop_all()


def test_a_federated_run_with_dp_completes_and_records_every_site_each_round(hospital_crash: HospitalCrash) -> None:
    rounds = hospital_crash.metrics["rounds"]
    first, last = rounds[0], rounds[-1]

    assert hospital_crash.run_status == "finished:completed", f"logs in {hospital_crash.scenario.log_dir}"
    assert [record["round"] for record in rounds] == list(range(1, CRASH_ROUNDS + 1))
    for record in rounds:  # only the federation's own sites, named as their admins named them
        assert set(record["sites"]) <= set(HOSPITALS), f"round {record['round']}: {sorted(record['sites'])}"
    for record in (first, last):  # before the crash, and once the crashed site is back
        assert set(record["sites"]) == set(HOSPITALS)
        assert record["dropped"] == []
        for site, row in record["sites"].items():
            assert (row["status"], row["eval_status"]) == ("ok", "ok"), (record["round"], site, row)
            assert 0.0 < row["epsilon"] <= 8.0
    for site in ("h1", "h2"):
        epsilons = [record["sites"][site]["epsilon"] for record in rounds]
        assert all(a < b for a, b in zip(epsilons, epsilons[1:])), (site, epsilons)
    latest = latest_checkpoint(hospital_crash.scenario.run_dir)
    assert latest is not None and latest.round == CRASH_ROUNDS


def test_a_hospital_killed_mid_round_is_left_out_and_the_round_completes_with_the_others(
    hospital_crash: HospitalCrash,
) -> None:
    crash_round = hospital_crash.metrics["rounds"][1]

    assert crash_round["sites"][CRASHED]["status"] in ("no-reply", "dropped")
    assert [d["site"] for d in crash_round["dropped"]].count(CRASHED) >= 1, crash_round["dropped"]
    for site in ("h1", "h2"):
        assert (crash_round["sites"][site]["status"], crash_round["sites"][site]["eval_status"]) == ("ok", "ok")
    assert crash_round["aggregate"]["sites_trained"] == 2
    assert (checkpoint_dir(hospital_crash.scenario.run_dir) / "round-2.pt").exists()


def test_a_restarted_hospital_rejoins_with_its_privacy_ledger_and_local_head_intact(
    hospital_crash: HospitalCrash,
) -> None:
    final_round = hospital_crash.metrics["rounds"][-1]["sites"][CRASHED]

    assert hospital_crash.node_id_after == hospital_crash.node_id_before  # the same identity rejoined
    # The steps reserved before the kill count as spent: epsilon never goes back.
    assert hospital_crash.epsilon_before_kill > 0
    assert hospital_crash.epsilon_after_restart > hospital_crash.epsilon_before_kill
    assert hospital_crash.epsilon_at_end > hospital_crash.epsilon_after_restart
    assert math.isclose(final_round["epsilon"], hospital_crash.epsilon_at_end, rel_tol=1e-9)
    assert final_round["status"] == "ok"
    # The head trained in round 1 survived the kill untouched, and the site trained on from it.
    assert hospital_crash.head_before_kill.loadable
    assert hospital_crash.head_after_restart == hospital_crash.head_before_kill
    assert hospital_crash.head_at_end.loadable
    assert hospital_crash.head_at_end.mtime_ns > hospital_crash.head_before_kill.mtime_ns


def test_a_hospital_restarted_at_once_after_a_crash_waits_out_the_heartbeat_window_and_gets_in_by_itself(
    hospital_crash: HospitalCrash,
) -> None:
    log = hospital_crash.rejoin_log
    # The round running when the site got back in may have started without it; every later one has it.
    first_round_after = hospital_crash.rounds_done_at_rejoin + 2
    later = [record for record in hospital_crash.metrics["rounds"] if record["round"] >= first_round_after]

    assert hospital_crash.restarted_exit is None  # the one restart kept running until the end
    # Refused at first (Flower still counted the old session online), and told apart from a refused key:
    assert "still counts this site's previous session online" in log
    assert "refused this site's key" not in log
    assert hospital_crash.node_id_after == hospital_crash.node_id_before
    assert later, (hospital_crash.rounds_done_at_rejoin, hospital_crash.timings)  # the run had a round left for it
    for record in later:
        assert record["sites"].get(CRASHED, {}).get("status") == "ok", (record["round"], hospital_crash.timings)


# -------------------------------------------------------------- scenario: coordinator restart
@dataclass
class CoordinatorRestart:
    """What the coordinator-restart scenario observed."""

    scenario: Scenario
    first_run_id: int
    resumed_run_id: int
    resumed_status: str
    metrics_before_kill: dict[str, Any]
    metrics: dict[str, Any]
    round_one_checkpoint_mtime_ns: int
    command: subprocess.CompletedProcess[str]
    timings: dict[str, float] = field(default_factory=dict)


@pytest.fixture(scope="module")
def coordinator_restart(
    tmp_path_factory: pytest.TempPathFactory,
    backbone: tuple[Path, PreparedBackbone],
    hospital_manifests: dict[str, Path],
) -> Iterator[CoordinatorRestart]:
    root = tmp_path_factory.mktemp("coordinator-restart")
    supervisor = ProcessSupervisor(log_dir=root / "logs")
    cache_dir, prepared = backbone
    try:
        started = time.monotonic()
        for site in HOSPITALS:
            preinstall_backbone(root / "federation" / "sites" / site, prepared)
        # The production default: SuperLink state in STATE_DIR/superlink.db survives a restart.
        scenario = start_scenario(
            root, supervisor, hospital_manifests, cache_dir, faults={MALFORMED: "nan,shape"}, database=None
        )
        # A generous timeout: after the restart the hospitals reconnect and start fresh ClientApp
        # processes for the new run, which takes tens of seconds on a loaded 2-core machine.
        config = write_config(
            root / "federation.toml", federation_config(rounds=2, privacy=False, round_timeout_s=150)
        )
        timings = {"federation_up_s": time.monotonic() - started}

        first_run = scenario.submit(config)
        scenario.wait_for_rounds(1, first_run, timeout_s=240)
        scenario.federation.kill_coordinator()
        before_kill = scenario.metrics()
        round_one = checkpoint_dir(scenario.run_dir) / "round-1.pt"
        round_one_mtime = round_one.stat().st_mtime_ns
        timings["round_1_s"] = time.monotonic() - started - timings["federation_up_s"]

        scenario.federation.restart_coordinator()
        scenario.federation.wait_for_online_nodes(len(HOSPITALS), timeout_s=60)
        # The operator's command: resolve and check the paths, submit, follow to the end, exit code.
        command = scenario.federation.coordinator_command(
            "run", "--config", str(config), "--out", str(scenario.run_dir), "--resume",
            "--cache-dir", str(cache_dir), "--app-dir", str(REAL_APP), timeout_s=300,
        )
        resumed_run = int(command.stdout.split()[1])
        status = scenario.finish(resumed_run)
        timings["total_s"] = time.monotonic() - started
        logger.info("coordinator restart scenario timings: %s", timings)
        yield CoordinatorRestart(
            scenario=scenario,
            first_run_id=first_run,
            resumed_run_id=resumed_run,
            resumed_status=status,
            metrics_before_kill=before_kill,
            metrics=scenario.metrics(),
            round_one_checkpoint_mtime_ns=round_one_mtime,
            command=command,
            timings=timings,
        )
    finally:
        supervisor.stop_all()


def test_malformed_updates_are_dropped_with_a_logged_reason_and_the_run_goes_on(
    coordinator_restart: CoordinatorRestart,
) -> None:
    rounds = coordinator_restart.metrics["rounds"]
    reasons = {
        record["round"]: [d["reason"] for d in record["dropped"] if d["site"] == MALFORMED] for record in rounds
    }

    assert coordinator_restart.resumed_status == "finished:completed"
    assert [record["round"] for record in rounds] == [1, 2]
    assert any("NaN" in reason for reason in reasons[1]), reasons[1]  # round 1: NaN tensors
    assert any("shape" in reason for reason in reasons[2]), reasons[2]  # round 2: wrong shapes
    for record in rounds:
        assert record["sites"][MALFORMED]["status"] == "dropped"
        assert record["sites"][MALFORMED]["eval_status"] == "ok"  # the site itself stays in the federation
        for site in ("h1", "h2"):
            assert record["sites"][site]["status"] == "ok"
        assert record["aggregate"]["sites_trained"] == 2


def test_a_coordinator_killed_and_resumed_loses_no_completed_round(coordinator_restart: CoordinatorRestart) -> None:
    before = coordinator_restart.metrics_before_kill["rounds"]
    after = coordinator_restart.metrics["rounds"]
    checkpoints = checkpoint_dir(coordinator_restart.scenario.run_dir)

    assert coordinator_restart.resumed_run_id != coordinator_restart.first_run_id
    assert [record["round"] for record in before] == [1]
    assert after[0] == before[0], "the completed round is kept as it was, not redone"
    assert [record["round"] for record in after] == [1, 2]
    assert (checkpoints / "round-1.pt").stat().st_mtime_ns == coordinator_restart.round_one_checkpoint_mtime_ns
    assert json.loads((checkpoints / "latest.json").read_text())["round"] == 2
    latest = latest_checkpoint(coordinator_restart.scenario.run_dir)
    assert latest is not None and latest.round == 2


def test_the_operators_run_command_follows_the_resumed_run_round_by_round_and_ends_with_its_results(
    coordinator_restart: CoordinatorRestart,
) -> None:
    command = coordinator_restart.command
    lines = command.stdout.splitlines()
    round_lines = [line for line in lines if line.startswith("round ")]
    report = (coordinator_restart.scenario.run_dir / "report.md").read_text()

    assert command.returncode == 0, command.stdout + command.stderr
    assert lines[0].startswith(f"run {coordinator_restart.resumed_run_id} submitted: federation.toml, 2 round(s)")
    assert len(round_lines) == 1 and round_lines[0].startswith("round   2 | 2 trained (h1, h2)")  # round 1 was done
    assert f"dropped 1 [{MALFORMED}: " in round_lines[0] and "shape" in round_lines[0]
    assert f"run {coordinator_restart.resumed_run_id}: finished:completed" in lines
    assert lines[-1].startswith(f"results: {coordinator_restart.scenario.run_dir} (report.md")
    assert any(line.startswith("| federated, personal models, DP off |") for line in lines)  # this run: no DP
    # The same report writer as a simulation's: the table, the left-out updates, the plots.
    assert "| federated, personal models, DP off |" in report and f"- round 2, {MALFORMED}:" in report
    assert (coordinator_restart.scenario.run_dir / "plots" / "balanced_accuracy.png").exists()


# ------------------------------------------------------------------------------ PHI canaries
def coordinator_files(scenario: Scenario) -> list[Path]:
    """Everything the coordinator stored or logged: its logs, the run folder, its own state (SuperLink
    database, PKI, cache); not the hospitals' own state or logs, which stay at the sites."""
    sites = scenario.federation.root / "sites"
    candidates = [*scenario.log_dir.rglob("*"), *scenario.run_dir.rglob("*"), *scenario.federation.root.rglob("*")]
    return sorted({path for path in candidates if path.is_file() and sites not in path.parents
                   and not path.name.startswith("hospital-")})


def test_no_phi_canary_from_a_hospitals_files_headers_or_manifest_reaches_what_the_coordinator_stores_or_logs(
    hospital_crash: HospitalCrash, coordinator_restart: CoordinatorRestart
) -> None:
    files = coordinator_files(hospital_crash.scenario) + coordinator_files(coordinator_restart.scenario)
    sizes = {path: path.stat().st_size for path in files}
    hits = canary_hits(files)
    logger.info("PHI canaries: %d coordinator files, %d bytes grepped, %d hit(s)", len(files), sum(sizes.values()),
                len(hits))

    assert any(path.suffix == ".log" for path in files) and (hospital_crash.scenario.run_dir / "metrics.json") in files
    assert hits == []
    # the canaries did travel: the site itself logged the bad rows (its own log, which stays at the site)
    site_logs = b"".join(p.read_bytes() for p in hospital_crash.scenario.log_dir.glob("hospital-h1*.log"))
    assert CANARY_FILE.encode() in site_logs
    rounds = hospital_crash.metrics["rounds"]
    assert rounds[0]["sites"]["h1"]["status"] == "ok"  # 3 bad rows of 43 did not stop the site
