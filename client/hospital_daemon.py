"""One command that turns a hospital machine into a federation member: ``fedtl-hospital start``.

It checks the site's files, writes the node config, then starts and supervises
(:mod:`client.site_supervisor`) the site's two processes:

    flower-supernode --superlink HOST:PORT --root-certificates CA --auth-supernode-private-key KEY
                     --node-config STATE_DIR/node-config.toml --host 127.0.0.1 --port RUNTIME_PORT
                     --isolation process [--max-retries N] [--max-wait-time S]
    python -m client.clientapp_worker --runtime-api-address 127.0.0.1:RUNTIME_PORT

with ``FLWR_TELEMETRY_ENABLED=0``, ``FLWR_DISABLE_UPDATE_CHECK=1`` and ``FLWR_HOME=STATE_DIR/flwr-home``.
The worker (:mod:`client.clientapp_worker`) is one long-lived ClientApp process that serves every
message, so torch is imported once and the site session stays open between messages;
``--clientapp per-message`` keeps Flower's default instead (``--isolation subprocess``: the SuperNode
starts a fresh ``flwr-clientapp`` process for every message). The daemon records what runs in
``STATE_DIR/supernode.json`` (read by ``fedtl-hospital health``) and, while the site is connected,
when it last was: a restart right after a crash is let in again by itself once Flower's heartbeat
window has passed, a refused key stops the site with exit code 1 (:mod:`client.rejoin_policy`).

The node config carries ``manifest``, ``state-dir``, ``site-name`` and ``device`` (what
:mod:`client.site_settings` reads); it is passed as a TOML file, so paths with spaces or quotes
survive. The SuperNode's own Runtime API (where the ClientApp fetches its work) listens on loopback
only, on a port chosen per site. Runtime dependency installation stays off (the SuperNode default):
sites are offline.

What leaves the site: only the Fleet API calls to the coordinator (TLS, signed with the site's key).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import stat
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from client.supernode_record import DAEMON_RECORD, key_identity
from common.daemon_setup import FlowerNotInstalled, configure_logging, flower_executable
from common.data.memory_budget import STORAGE_CHOICES
from common.wire_contract import EVALUATION_METRICS_SETTINGS

logger = logging.getLogger(__name__)

DEFAULT_RUNTIME_PORT = 9094
NODE_CONFIG_FILE = "node-config.toml"
CLIENTAPP_WARM = "warm"
CLIENTAPP_PER_MESSAGE = "per-message"
CLIENTAPP_MODES = (CLIENTAPP_WARM, CLIENTAPP_PER_MESSAGE)


class HospitalSetupError(ValueError):
    """The site is not ready to join; the message names the file or option and the fix."""


@dataclass(frozen=True)
class HospitalSettings:
    """One hospital's daemon settings.

    superlink : ``HOST:PORT`` of the coordinator's gate (what ``init-pki --host/--ip`` covered).
    ca_cert : the federation's ``ca.crt`` (verifies the coordinator's TLS certificate).
    private_key : this site's node key (OpenSSH EC private key, ``hospitals/NAME.key``), mode 0600.
    manifest : the site's labels/manifest file (never leaves the site).
    state_dir : the site's persistent state (privacy ledger, local head, backbone cache, FLWR_HOME).
    site_name : a name for logs and health output.
    device : ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
    storage : ``auto``, ``memory`` or ``disk``: where the site's decoded images and trunk features
        live while it trains (``disk``: memory-mapped files in the state dir).
    evaluation_metrics : how the site's test results leave it: ``exact``, ``rounded`` or ``none``
        (see ``common.wire_contract.OUTBOUND_FIELDS``).
    runtime_port : loopback port of the SuperNode's Runtime API; must differ between sites that
        share a machine; ``0`` picks a free one at start.
    max_retries / max_wait_time : reconnection limits; ``None`` retries forever (Flower's default).
    clientapp : ``warm`` (one long-lived ClientApp process, :mod:`client.clientapp_worker`) or
        ``per-message`` (Flower's default: a fresh ClientApp process for every message).
    """

    superlink: str
    ca_cert: Path
    private_key: Path
    manifest: Path
    state_dir: Path
    site_name: str
    device: str = "auto"
    storage: str = "auto"
    evaluation_metrics: str = "exact"
    runtime_port: int = DEFAULT_RUNTIME_PORT
    max_retries: int | None = None
    max_wait_time: float | None = None
    clientapp: str = CLIENTAPP_WARM

    @property
    def flwr_home(self) -> Path:
        return self.state_dir / "flwr-home"

    @property
    def node_config_path(self) -> Path:
        return self.state_dir / NODE_CONFIG_FILE

    @property
    def record_path(self) -> Path:
        return self.state_dir / DAEMON_RECORD


def check_site(settings: HospitalSettings) -> list[str]:
    """Refuse to start on a misconfigured site; return warnings that do not block."""
    warnings: list[str] = []
    host, _, port = settings.superlink.rpartition(":")
    if not host or not port.isdigit():
        raise HospitalSetupError(
            f"--superlink {settings.superlink!r} must be HOST:PORT of the coordinator (e.g. coordinator.example:9092)"
        )
    if not settings.ca_cert.is_file():
        raise HospitalSetupError(f"--ca {settings.ca_cert}: no such file; copy ca.crt from the coordinator")
    if b"BEGIN CERTIFICATE" not in settings.ca_cert.read_bytes():
        raise HospitalSetupError(f"--ca {settings.ca_cert}: not a PEM certificate; use the federation's ca.crt")
    if not settings.private_key.is_file():
        raise HospitalSetupError(
            f"--key {settings.private_key}: no such file; use the site's NAME.key from init-pki or "
            "'ssh-keygen -t ecdsa -b 384 -N \"\" -f NAME.key' (then send NAME.pub to the coordinator)"
        )
    if b"BEGIN OPENSSH PRIVATE KEY" not in settings.private_key.read_bytes():
        raise HospitalSetupError(
            f"--key {settings.private_key}: not an OpenSSH private key; Flower node authentication needs "
            "an EC key in OpenSSH format (ssh-keygen -t ecdsa)"
        )
    mode = stat.S_IMODE(settings.private_key.stat().st_mode)
    if mode & 0o077:
        raise HospitalSetupError(
            f"--key {settings.private_key} is readable by other users (mode {mode:o}); run "
            f"'chmod 600 {settings.private_key}'"
        )
    if not settings.manifest.exists():
        warnings.append(f"manifest {settings.manifest} does not exist yet: training requests will fail until it does")
    return warnings


def node_config_toml(settings: HospitalSettings) -> str:
    """The node config file: the keys :func:`client.site_settings.settings_from_node_config` reads."""
    values = {
        "manifest": str(settings.manifest.resolve()),
        "state-dir": str(settings.state_dir.resolve()),
        "site-name": settings.site_name,
        "device": settings.device,
        "storage": settings.storage,
        "evaluation-metrics": settings.evaluation_metrics,
    }
    # A JSON string literal is a valid TOML basic string (same escapes).
    return "".join(f'"{key}" = {json.dumps(value)}\n' for key, value in values.items())


def supernode_command(settings: HospitalSettings, runtime_port: int) -> list[str]:
    """The exact ``flower-supernode`` command line for this site."""
    command = [
        _supernode_executable(),
        "--superlink",
        settings.superlink,
        "--root-certificates",
        str(settings.ca_cert.resolve()),
        "--auth-supernode-private-key",
        str(settings.private_key.resolve()),
        "--node-config",
        str(settings.node_config_path.resolve()),
        "--host",
        "127.0.0.1",
        "--port",
        str(runtime_port),
    ]
    if settings.clientapp == CLIENTAPP_WARM:
        command += ["--isolation", "process"]  # the daemon's ClientApp worker claims the tasks
    if settings.max_retries is not None:
        command += ["--max-retries", str(settings.max_retries)]
    if settings.max_wait_time is not None:
        command += ["--max-wait-time", str(settings.max_wait_time)]
    return command


def worker_command(runtime_port: int) -> list[str]:
    """The ClientApp worker's command line (:mod:`client.clientapp_worker`), this Python."""
    return [sys.executable, "-m", "client.clientapp_worker", "--runtime-api-address", f"127.0.0.1:{runtime_port}"]


def supernode_env(settings: HospitalSettings, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of the SuperNode: telemetry and update check off, the site's own FLWR_HOME, this
    venv's commands first."""
    env = dict(os.environ if base is None else base)
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"  # Flower 1.41 otherwise calls its update-check URL at start
    env["FLWR_HOME"] = str(settings.flwr_home.resolve())
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def pick_runtime_port(requested: int) -> int:
    """``requested`` itself, or a free loopback port when it is 0."""
    if requested:
        return requested
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def prepare_site(settings: HospitalSettings) -> list[str]:
    """Check the site, create its state dir (0700) and write the node config; return the command."""
    for warning in check_site(settings):
        logger.warning("%s", warning)
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(settings.state_dir, 0o700)
    settings.flwr_home.mkdir(parents=True, exist_ok=True)
    _write_text(settings.node_config_path, node_config_toml(settings))
    return supernode_command(settings, pick_runtime_port(settings.runtime_port))


def start(settings: HospitalSettings, extra_node_config: Mapping[str, str] | None = None) -> int:
    """Prepare the site, run the SuperNode (and the ClientApp worker) until SIGTERM or a final failure;
    return the daemon's exit code (0 after a stop signal, 1 for a refused key or a dead SuperNode).

    extra_node_config : more node-config keys for the ClientApp (a Python-only door for test apps;
        the command line has none).
    """
    from client.site_supervisor import SiteProcesses, supervise

    command = prepare_site(settings)
    if extra_node_config:
        with settings.node_config_path.open("a", encoding="utf-8") as node_config:
            for config_key, value in extra_node_config.items():
                node_config.write(f"{json.dumps(config_key)} = {json.dumps(value)}\n")
    runtime_port = int(command[command.index("--port") + 1])
    worker = worker_command(runtime_port) if settings.clientapp == CLIENTAPP_WARM else None
    record_base = {
        "command": command,
        "worker_command": worker,
        **{key: str(value.resolve() if isinstance(value, Path) else value) for key, value in asdict(settings).items()},
    }
    logger.info("site %s joins %s: %s", settings.site_name, settings.superlink, " ".join(command))
    if worker is not None:
        logger.info("site %s runs its ClientApp in one long-lived process: %s", settings.site_name, " ".join(worker))
    processes = SiteProcesses(
        supernode=command,
        worker=worker,
        env=supernode_env(settings),
        record_path=settings.record_path,
        record_base=record_base,
        superlink=settings.superlink,
        key_id=key_identity(settings.private_key),
    )
    return supervise(processes)


def _supernode_executable() -> str:
    try:
        return flower_executable("flower-supernode")
    except FlowerNotInstalled as exc:
        raise HospitalSetupError(str(exc)) from None


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedtl-hospital start", description="Join the federation: start this site's SuperNode over TLS."
    )
    parser.add_argument("--superlink", required=True, help="coordinator HOST:PORT (its Fleet gate)")
    parser.add_argument("--ca", required=True, type=Path, help="federation ca.crt")
    parser.add_argument("--key", required=True, type=Path, help="this site's OpenSSH EC private key (NAME.key)")
    parser.add_argument("--manifest", required=True, type=Path, help="the site's manifest file")
    parser.add_argument("--state-dir", required=True, type=Path, help="the site's persistent state directory")
    parser.add_argument("--site-name", required=True, help="name of this site (logs, health output)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--storage",
        default="auto",
        choices=STORAGE_CHOICES,
        help="where decoded images and trunk features live while training: 'memory', 'disk' (memory-mapped "
        "files in the state dir) or 'auto' (disk when they would take over a quarter of the free memory)",
    )
    parser.add_argument(
        "--evaluation-metrics",
        default="exact",
        choices=EVALUATION_METRICS_SETTINGS,
        help="how this site's test results are sent to the coordinator: 'exact', 'rounded' (2 decimals) or "
        "'none' (only the number of test images; the coordinator's report then has no figures for this site)",
    )
    parser.add_argument(
        "--runtime-port",
        type=int,
        default=DEFAULT_RUNTIME_PORT,
        help=f"loopback port of the SuperNode Runtime API (default {DEFAULT_RUNTIME_PORT}; 0 = any free port)",
    )
    parser.add_argument(
        "--clientapp",
        default=CLIENTAPP_WARM,
        choices=CLIENTAPP_MODES,
        help="'warm' (default): one long-lived ClientApp process serves every message (torch imported once, "
        "the site session kept open); 'per-message': Flower's default, a fresh ClientApp process per message",
    )
    parser.add_argument("--max-retries", type=int, default=None, help="give up after N reconnection attempts")
    parser.add_argument("--max-wait-time", type=float, default=None, help="give up reconnecting after S seconds")
    parser.add_argument("--print-command", action="store_true", help="print the SuperNode command and exit")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``fedtl-hospital start ...`` (runs the site until SIGTERM (0), a refused key or a dead SuperNode (1),
    a setup error (2); ``--print-command`` prints the SuperNode command (0)), ``fedtl-hospital health ...`` (see :mod:`client.site_health`) or
    ``fedtl-hospital predict|export ...`` (see :mod:`client.inference.commands`) or
    ``fedtl-hospital quality-report MANIFEST ...`` (see :mod:`common.data.data_quality`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["health"]:
        from client.site_health import main as health_main

        return health_main(argv[1:])
    if argv[:1] == ["quality-report"]:  # local only, and light: no torch
        from common.data.data_quality import main as quality_main

        return quality_main(argv[1:])
    if argv[:1] in (["predict"], ["export"]):  # use the site's model (client.inference); nothing is sent
        from client.inference.commands import export_main, predict_main

        return (predict_main if argv[0] == "predict" else export_main)(argv[1:])
    if argv[:1] == ["start"]:
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    configure_logging()
    settings = HospitalSettings(
        superlink=args.superlink,
        ca_cert=args.ca,
        private_key=args.key,
        manifest=args.manifest,
        state_dir=args.state_dir,
        site_name=args.site_name,
        device=args.device,
        storage=args.storage,
        evaluation_metrics=args.evaluation_metrics,
        runtime_port=args.runtime_port,
        max_retries=args.max_retries,
        max_wait_time=args.max_wait_time,
        clientapp=args.clientapp,
    )
    try:
        if args.print_command:
            print(" ".join(prepare_site(settings)))
            return 0
        return start(settings)
    except HospitalSetupError as exc:
        logger.error("%s", exc)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
