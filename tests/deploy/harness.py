"""A real federation on loopback: coordinator (SuperLink + gate), hospitals (SuperNodes), and cleanup.

Everything runs as the real commands an operator would type (``python -m server.ops.coordinator_service
start``, ``python -m client.hospital_daemon start``, ``flwr``), each with its own free ports, its own
FLWR_HOME and its own log file under the test's temporary directory. :class:`ProcessSupervisor`
starts every command in its own process group and, on ``stop_all``, terminates the groups AND every
descendant it can find (Flower starts ``flower-superexec`` in a new session), then kills what is
left after a grace period.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from client.hospital_daemon import HospitalSettings
from client.site_health import probe_superlink
from server.ops.coordinator_service import (
    IN_MEMORY_DATABASE,
    CoordinatorSettings,
    coordinator_env,
    flower_executable,
    submit_run,
)
from server.ops.federation_pki import FederationPki, init_pki
from server.ops.run_command import toml_value

REPO_ROOT = Path(__file__).resolve().parents[2]
FIXTURE_APP = Path(__file__).resolve().parent / "fixture_app"
REAL_APP = Path(__file__).resolve().parent / "real_app"
STOP_GRACE_S = 8.0
_SUPERNODE_ID = re.compile(r"SuperNode ID: (\d+)")


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _children_by_parent() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc), found before anything is signalled."""
    children = _children_by_parent()
    found: list[int] = []
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


@dataclass
class ManagedProcess:
    """One command the harness started; ``log`` holds its stdout and stderr."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_for_exit(self, timeout_s: float) -> int | None:
        try:
            return self.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None


@dataclass
class ProcessSupervisor:
    """Starts commands in their own process groups and stops every one of them (and their children)."""

    log_dir: Path
    processes: list[ManagedProcess] = field(default_factory=list)

    def start(self, name: str, argv: Sequence[str], env: dict[str, str]) -> ManagedProcess:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{name}.log"
        restarts = 1
        while log.exists():  # a restarted process keeps the earlier log next to its own
            restarts += 1
            log = self.log_dir / f"{name}-{restarts}.log"
        with log.open("wb") as sink:
            popen = subprocess.Popen(
                list(argv), cwd=REPO_ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
            )
        managed = ManagedProcess(name, popen, log)
        self.processes.append(managed)
        return managed

    def stop(self, managed: ManagedProcess) -> None:
        pids = [managed.popen.pid, *descendants(managed.popen.pid)]
        for pid in pids:
            _signal(pid, signal.SIGTERM, group=pid == managed.popen.pid)
        deadline = time.monotonic() + STOP_GRACE_S
        while time.monotonic() < deadline:
            managed.popen.poll()
            if not any(_alive(pid) for pid in pids):
                break
            time.sleep(0.1)
        for pid in pids:
            if _alive(pid):
                _signal(pid, signal.SIGKILL, group=pid == managed.popen.pid)
        try:
            managed.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

    def kill(self, managed: ManagedProcess) -> None:
        """SIGKILL ``managed`` and every descendant at once (a crash: nothing gets to clean up)."""
        pids = [managed.popen.pid, *descendants(managed.popen.pid)]
        for pid in pids:
            _signal(pid, signal.SIGKILL, group=pid == managed.popen.pid)
        try:
            managed.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + 5
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)

    def stop_all(self) -> None:
        """Stop every process at once: SIGTERM to all (groups and descendants), one shared grace
        period, then SIGKILL to what is left (one after another cost up to a grace period each)."""
        targets = [(managed, [managed.popen.pid, *descendants(managed.popen.pid)]) for managed in reversed(self.processes)]
        for managed, pids in targets:
            for pid in pids:
                _signal(pid, signal.SIGTERM, group=pid == managed.popen.pid)
        deadline = time.monotonic() + STOP_GRACE_S
        while time.monotonic() < deadline:
            for managed, _ in targets:
                managed.popen.poll()
            if not any(_alive(pid) for _, pids in targets for pid in pids):
                break
            time.sleep(0.1)
        for managed, pids in targets:
            for pid in pids:
                if _alive(pid):
                    _signal(pid, signal.SIGKILL, group=pid == managed.popen.pid)
        for managed, _ in targets:
            try:
                managed.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.processes.clear()


def _signal(pid: int, sig: signal.Signals, group: bool) -> None:
    try:
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass
class LoopbackFederation:
    """A coordinator and its hospitals on 127.0.0.1, all started by ``supervisor``."""

    root: Path
    pki: FederationPki
    coordinator: CoordinatorSettings
    supervisor: ProcessSupervisor
    hospitals: dict[str, ManagedProcess] = field(default_factory=dict)
    coordinator_process: ManagedProcess | None = None

    @property
    def public_address(self) -> str:
        return f"127.0.0.1:{self.coordinator.public_port}"

    def hospital_settings(
        self,
        name: str,
        key: Path | None = None,
        ca_cert: Path | None = None,
        max_retries: int | None = None,
        manifest: Path | None = None,
        state_dir: Path | None = None,
    ) -> HospitalSettings:
        """What ``fedtl-hospital start`` gets for ``name``: by default its own key, the CA, and
        ``ROOT/sites/NAME`` as state dir holding ``manifest.csv``."""
        state_dir = state_dir or self.root / "sites" / name
        return HospitalSettings(
            superlink=self.public_address,
            ca_cert=ca_cert or self.pki.ca_cert,
            private_key=key or self.pki.hospital_private_key(name),
            manifest=manifest or state_dir / "manifest.csv",
            state_dir=state_dir,
            site_name=name,
            device="cpu",
            runtime_port=free_port(),
            max_retries=max_retries,
        )

    def start_hospital(
        self,
        name: str,
        key: Path | None = None,
        ca_cert: Path | None = None,
        max_retries: int | None = None,
        *,
        manifest: Path | None = None,
        state_dir: Path | None = None,
        extra_node_config: dict[str, str] | None = None,
        extra_args: Sequence[str] = (),
        extra_env: dict[str, str] | None = None,
    ) -> ManagedProcess:
        """Start ``client.hospital_daemon start`` for ``name`` (by default with its own key and the CA).

        ``extra_args`` are appended to the daemon's command line (e.g. ``--clientapp per-message``);
        ``extra_env`` is added to its environment (e.g. ``FEDTL_HEARTBEAT_WINDOW_S``).

        ``extra_node_config`` adds keys to the SuperNode's node config (test apps read them, e.g.
        ``fault``); the daemon's command line has no such option, so the daemon is then run through
        its Python entry point (``client.hospital_daemon.start(settings, extra_node_config)``).
        """
        settings = self.hospital_settings(name, key, ca_cert, max_retries, manifest, state_dir)
        env = {**_hospital_env(), **(extra_env or {})}
        if extra_node_config:
            spec = self.supervisor.log_dir / f"hospital-{name}-settings.json"
            spec.parent.mkdir(parents=True, exist_ok=True)
            spec.write_text(json.dumps({"settings": {k: str(v) if isinstance(v, Path) else v
                                                     for k, v in asdict(settings).items()},
                                        "extra_node_config": extra_node_config}))
            argv = [sys.executable, "-c", "import sys; from tests.deploy.harness import run_daemon_from_spec as run; "
                    "sys.exit(run(sys.argv[1]))", str(spec)]
            managed = self.supervisor.start(f"hospital-{name}", argv, env)
            self.hospitals[name] = managed
            return managed
        argv = [
            sys.executable,
            "-m",
            "client.hospital_daemon",
            "start",
            "--superlink",
            settings.superlink,
            "--ca",
            str(settings.ca_cert),
            "--key",
            str(settings.private_key),
            "--manifest",
            str(settings.manifest),
            "--state-dir",
            str(settings.state_dir),
            "--site-name",
            name,
            "--device",
            settings.device,
            "--runtime-port",
            str(settings.runtime_port),
        ]
        if max_retries is not None:
            argv += ["--max-retries", str(max_retries)]
        argv += list(extra_args)
        managed = self.supervisor.start(f"hospital-{name}", argv, env)
        self.hospitals[name] = managed
        return managed

    def kill_hospital(self, name: str) -> None:
        """SIGKILL the hospital's SuperNode and everything it started (its ClientApp processes)."""
        self.supervisor.kill(self.hospitals[name])

    def kill_coordinator(self) -> None:
        """SIGKILL the coordinator: its service, the SuperLink, SuperExec and the running ServerApp."""
        if self.coordinator_process is not None:
            self.supervisor.kill(self.coordinator_process)

    def restart_coordinator(self, timeout_s: float = 60) -> None:
        """Start the coordinator again with the same PKI, state dir, ports and database."""
        self.coordinator_process = start_coordinator(self.coordinator, self.pki, self.supervisor, timeout_s)

    def flwr(self, *args: str, flwr_home: Path | None = None, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
        """Run the real ``flwr`` CLI with the coordinator's FLWR_HOME (or another one)."""
        env = coordinator_env(self.coordinator, _child_env())
        if flwr_home is not None:
            env["FLWR_HOME"] = str(flwr_home)
        return subprocess.run(
            [flower_executable("flwr"), *args], env=env, capture_output=True, text=True, timeout=timeout_s
        )

    def coordinator_command(self, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
        """``fedtl-coordinator ARGS --state-dir STATE`` as the operator types it on the coordinator machine."""
        return subprocess.run(
            [sys.executable, "-m", "server.ops.coordinator_service", *args, "--state-dir", str(self.coordinator.state_dir)],
            cwd=REPO_ROOT, env=_child_env(), capture_output=True, text=True, timeout=timeout_s,
        )

    def online_nodes(self) -> int:
        result = self.flwr("supernode", "ls", "--format", "json")
        try:
            nodes = json.loads(result.stdout)["nodes"]
        except (ValueError, KeyError):
            return 0
        return sum(1 for node in nodes if node.get("status") == "online")

    def wait_for_online_nodes(self, count: int, timeout_s: float = 40) -> None:
        deadline = time.monotonic() + timeout_s
        seen = 0
        while time.monotonic() < deadline:
            seen = self.online_nodes()
            if seen >= count:
                return
            time.sleep(0.5)
        raise AssertionError(f"{seen} of {count} hospitals online after {timeout_s} s; logs in {self.supervisor.log_dir}")

    def node_id(self, name: str) -> int:
        """The node id the SuperLink gave hospital ``name`` (from its SuperNode's log)."""
        found = _SUPERNODE_ID.findall(self.hospitals[name].output())
        if not found:
            raise AssertionError(f"hospital {name} has not connected; see {self.hospitals[name].log}")
        return int(found[-1])

    def node_status(self, node_id: int) -> str:
        """``online``, ``offline``, ``registered`` ... as the SuperLink reports node ``node_id``."""
        result = self.flwr("supernode", "ls", "--format", "json")
        try:
            nodes = json.loads(result.stdout)["nodes"]
        except (ValueError, KeyError):
            return "unknown"
        return next((str(node["status"]) for node in nodes if int(node["node-id"]) == node_id), "absent")

    def wait_for_node_status(self, node_id: int, status: str, timeout_s: float, poll_s: float = 3.0) -> None:
        deadline = time.monotonic() + timeout_s
        seen = "unknown"
        while time.monotonic() < deadline:
            seen = self.node_status(node_id)
            if seen == status:
                return
            time.sleep(poll_s)
        raise AssertionError(f"node {node_id} still {seen!r}, not {status!r}, after {timeout_s:.0f} s")

    def wait_until_connected(self, name: str, timeout_s: float) -> float:
        """Wait until the latest start of hospital ``name`` has been let in (its log shows
        ``SuperNode ID``); the seconds it took. The daemon must get in by itself: if it exits
        first, this fails with its log."""
        managed = self.hospitals[name]
        started = time.monotonic()
        deadline = started + timeout_s
        while time.monotonic() < deadline:
            if _SUPERNODE_ID.search(managed.output()):
                return time.monotonic() - started
            if managed.popen.poll() is not None:
                raise AssertionError(f"hospital {name} exited with {managed.popen.returncode} before it was let in:\n"
                                     f"{managed.output()[-3000:]}")
            time.sleep(0.2)
        raise AssertionError(f"hospital {name} not let in after {timeout_s:.0f} s; see {managed.log}")

    def submit_fixture_run(self) -> int:
        """Submit the fixture app from the coordinator machine (the loopback profile)."""
        return submit_run(self.coordinator, FIXTURE_APP)

    def submit_run(self, app_dir: Path, run_config: dict[str, str | bool | int | float]) -> int:
        """Submit ``app_dir`` from the coordinator machine with ``--run-config`` overrides (TOML values)."""
        return submit_run(self.coordinator, app_dir, [f"{key}={toml_value(value)}" for key, value in run_config.items()])

    def run_status(self, run_id: int) -> str:
        result = self.flwr("ls", "--run-id", str(run_id), "--format", "json")
        try:
            return str(json.loads(result.stdout)["runs"][0]["status"])
        except (ValueError, KeyError, IndexError):
            return f"unknown ({result.stdout.strip()[-300:]} {result.stderr.strip()[-300:]})"

    def wait_for_run(self, run_id: int, timeout_s: float = 60, poll_s: float = 1.0) -> str:
        deadline = time.monotonic() + timeout_s
        status = "unknown"
        while time.monotonic() < deadline:
            status = self.run_status(run_id)
            if status.startswith("finished"):
                return status
            time.sleep(poll_s)
        return status


def run_daemon_from_spec(spec_path: str) -> int:
    """The daemon of a hospital whose node config carries extra keys (see ``start_hospital``)."""
    from client.hospital_daemon import start
    from common.daemon_setup import configure_logging

    spec = json.loads(Path(spec_path).read_text())
    values = spec["settings"]
    for name in ("ca_cert", "private_key", "manifest", "state_dir"):
        values[name] = Path(values[name])
    configure_logging()
    return start(HospitalSettings(**values), spec["extra_node_config"])


def _hospital_env() -> dict[str, str]:
    """A hospital's environment: one torch CPU thread (``OMP_NUM_THREADS``, unless the caller set one).
    The loopback hospitals share this machine's cores, as the simulation's sites get one CPU each;
    torch's default of every core per site oversubscribes them (measured by bench_real_rounds)."""
    env = _child_env()
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    return env


def start_coordinator(
    settings: CoordinatorSettings, pki: FederationPki, supervisor: ProcessSupervisor, timeout_s: float = 60
) -> ManagedProcess:
    """``server.ops.coordinator_service start`` with ``settings``; returns once the gate answers over TLS."""
    argv = [
        sys.executable,
        "-m",
        "server.ops.coordinator_service",
        "start",
        "--pki",
        str(settings.pki_dir),
        "--state-dir",
        str(settings.state_dir),
        "--public-host",
        settings.public_host,
        "--public-port",
        str(settings.public_port),
        "--link-port",
        str(settings.link_port),
    ]
    if settings.database is not None:
        argv += ["--database", settings.database]
    coordinator = supervisor.start("coordinator", argv, _child_env())
    address = f"127.0.0.1:{settings.public_port}"
    deadline = time.monotonic() + timeout_s
    error: str | None = "not started"
    while time.monotonic() < deadline:
        if coordinator.popen.poll() is not None:
            raise AssertionError(f"coordinator exited with {coordinator.popen.returncode}:\n{coordinator.output()[-3000:]}")
        error = probe_superlink(address, pki.ca_cert, timeout_s=1.0)
        if error is None:
            return coordinator
        time.sleep(0.3)
    raise AssertionError(f"coordinator gate not healthy after {timeout_s:.0f} s ({error}):\n{coordinator.output()[-3000:]}")


def start_loopback_federation(
    root: Path,
    supervisor: ProcessSupervisor,
    hospitals: Sequence[str] = ("h1", "h2", "h3"),
    database: str | None = IN_MEMORY_DATABASE,
) -> LoopbackFederation:
    """PKI for ``hospitals``, then the coordinator; returns once the gate answers over TLS.

    ``database`` is the SuperLink state: in memory by default; ``None`` keeps it in
    ``ROOT/coordinator/superlink.db`` (the production default, which survives a restart).
    """
    pki = init_pki(root / "pki", hosts=["localhost"], ips=["127.0.0.1"], hospitals=hospitals)
    settings = CoordinatorSettings(
        pki_dir=pki.root,
        state_dir=root / "coordinator",
        public_host="127.0.0.1",
        public_port=free_port(),
        link_port=free_port(),
        database=database,
    )
    federation = LoopbackFederation(root, pki, settings, supervisor)
    federation.coordinator_process = start_coordinator(settings, pki, supervisor)
    return federation
