"""The coordinator: a loopback-only SuperLink behind a Fleet-only TLS gate, and the commands around it.

``fedtl-coordinator start`` runs, in one supervised unit:

* ``flower-superlink`` with TLS, SuperNode authentication and runtime dependency installation off,
  bound to ``127.0.0.1:LINK_PORT``. In Flower 1.41 that one port serves the Fleet, Control and
  Runtime APIs, so only processes on the coordinator machine can reach it.
* the gate (:mod:`server.ops.control_gate`) on ``PUBLIC_HOST:PUBLIC_PORT``: TLS with the federation's
  server certificate, forwarding only ``POST /v1/fleet/*`` and ``/health`` to the SuperLink.

Before the gate opens, every ``hospitals/*.pub`` of the PKI directory is registered, and a
``flwr`` connection profile pointing at the loopback SuperLink is written to
``STATE_DIR/flwr-home/config.toml``. ``register`` and ``run`` use that profile, so they work only on
the coordinator machine: that is the whole access control for "who may start a run".
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from common.daemon_setup import FlowerNotInstalled, configure_logging
from common.daemon_setup import flower_executable as installed_flower_executable
from server.ops.control_gate import GateSettings, build_gate_server
from server.ops.federation_pki import FederationPki

logger = logging.getLogger(__name__)

PROFILE_NAME = "fedtl-coordinator"
LOOPBACK = "127.0.0.1"
DEFAULT_PUBLIC_PORT = 9092
DEFAULT_LINK_PORT = 9093
DEFAULT_STATE_DIR = Path("/var/lib/fedtl-coordinator")
DEFAULT_PKI_DIR = Path("/etc/fedtl/pki")
IN_MEMORY_DATABASE = ":flwr-in-memory:"
SUPERLINK_START_TIMEOUT_S = 60.0
SUPERLINK_STOP_TIMEOUT_S = 10.0
_ALREADY_REGISTERED = re.compile(r"already in use", re.IGNORECASE)


class CoordinatorError(RuntimeError):
    """The coordinator cannot do what was asked; the message says why and what to do."""


@dataclass(frozen=True)
class CoordinatorSettings:
    """Everything ``fedtl-coordinator`` needs to know about one coordinator installation.

    pki_dir : directory written by ``init-pki`` (ca.crt, server.crt, server.key, hospitals/*.pub).
    state_dir : the coordinator's own state (SuperLink database, FLWR_HOME, logs).
    public_host / public_port : where hospitals connect (the gate); ``0.0.0.0`` for every interface.
    link_port : loopback port of the SuperLink itself (Fleet + Control + Runtime APIs).
    database : SuperLink state file; ``None`` means ``STATE_DIR/superlink.db`` (runs and registered
        nodes survive a restart), ``":flwr-in-memory:"`` keeps nothing.
    """

    pki_dir: Path = DEFAULT_PKI_DIR
    state_dir: Path = DEFAULT_STATE_DIR
    public_host: str = "0.0.0.0"
    public_port: int = DEFAULT_PUBLIC_PORT
    link_port: int = DEFAULT_LINK_PORT
    database: str | None = None
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def pki(self) -> FederationPki:
        return FederationPki(self.pki_dir)

    @property
    def flwr_home(self) -> Path:
        return self.state_dir / "flwr-home"

    @property
    def link_address(self) -> str:
        return f"{LOOPBACK}:{self.link_port}"

    @property
    def database_path(self) -> str:
        return self.database or str(self.state_dir / "superlink.db")


def flower_executable(name: str) -> str:
    """Path of a Flower console script installed next to this Python (the pinned flwr)."""
    try:
        return installed_flower_executable(name)
    except FlowerNotInstalled as exc:
        raise CoordinatorError(str(exc)) from None


def coordinator_env(settings: CoordinatorSettings, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for every Flower process of the coordinator: own FLWR_HOME, no telemetry, no update
    check, no runtime dependency installation."""
    env = dict(os.environ if base is None else base)
    env["FLWR_HOME"] = str(settings.flwr_home)
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"  # Flower 1.41 otherwise calls its update-check URL at start
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(settings.extra_env)
    return env


def superlink_command(settings: CoordinatorSettings) -> list[str]:
    """The exact ``flower-superlink`` command line the coordinator runs."""
    pki = settings.pki
    return [
        flower_executable("flower-superlink"),
        "--ssl-ca-certfile",
        str(pki.ca_cert.resolve()),
        "--ssl-certfile",
        str(pki.server_cert.resolve()),
        "--ssl-keyfile",
        str(pki.server_key.resolve()),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--host",
        LOOPBACK,
        "--port",
        str(settings.link_port),
        "--database",
        settings.database_path,
    ]


def write_connection_profile(settings: CoordinatorSettings) -> Path:
    """Write ``FLWR_HOME/config.toml`` with one default connection: the loopback SuperLink over TLS."""
    settings.flwr_home.mkdir(parents=True, exist_ok=True)
    path = settings.flwr_home / "config.toml"
    text = (
        "# Written by fedtl-coordinator start: flwr commands on this machine reach the loopback SuperLink.\n"
        "[superlink]\n"
        f'default = "{PROFILE_NAME}"\n\n'
        f'[superlink.{PROFILE_NAME}]\n'
        f'address = "{settings.link_address}"\n'
        f"root-certificates = {json.dumps(str(settings.pki.ca_cert.resolve()))}\n"
    )
    tmp = path.with_suffix(".toml.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def _check_pki(settings: CoordinatorSettings) -> None:
    pki = settings.pki
    missing = [p for p in (pki.ca_cert, pki.server_cert, pki.server_key) if not p.exists()]
    if missing:
        raise CoordinatorError(
            f"PKI directory {pki.root} lacks {', '.join(p.name for p in missing)}; create it with "
            f"'fedtl-coordinator init-pki --out {pki.root} --host NAME --ip ADDRESS --hospital NAME'"
        )


def wait_until_healthy(url: str, ca_cert: Path, timeout_s: float, process: subprocess.Popen[bytes] | None = None) -> None:
    """Poll ``GET url`` over TLS (verified against ``ca_cert``) until it answers 200."""
    context = ssl.create_default_context(cafile=str(ca_cert))
    deadline = time.monotonic() + timeout_s
    last_error = "no answer"
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise CoordinatorError(
                f"flower-superlink exited with code {process.returncode} while starting; see its log above"
            )
        try:
            with urllib.request.urlopen(url, context=context, timeout=2.0) as response:
                if response.status == 200:
                    return
                last_error = f"HTTP {response.status}"
        except (urllib.error.URLError, OSError) as exc:
            last_error = str(exc)
        time.sleep(0.25)
    raise CoordinatorError(f"{url} did not become healthy within {timeout_s:.0f} s ({last_error})")


@dataclass(frozen=True)
class Registration:
    """Outcome of registering one hospital public key with the SuperLink."""

    public_key: Path
    registered: bool
    already_known: bool
    detail: str


def register_public_keys(settings: CoordinatorSettings, public_keys: Sequence[Path]) -> list[Registration]:
    """Register each key with ``flwr supernode register`` through the coordinator's own profile.

    A key that the SuperLink already knows (e.g. after a restart with a persistent database)
    counts as registered.
    """
    if not (settings.flwr_home / "config.toml").exists():
        raise CoordinatorError(
            f"no connection profile in {settings.flwr_home}; run 'fedtl-coordinator start --state-dir "
            f"{settings.state_dir}' on this machine first"
        )
    results = []
    env = coordinator_env(settings)
    for key in public_keys:
        if not key.exists():
            raise CoordinatorError(f"public key {key} does not exist; ask the hospital for its NAME.pub")
        command = [
            flower_executable("flwr"),
            "supernode",
            "register",
            str(key.resolve()),
            PROFILE_NAME,
            "--name",
            key.stem,
        ]
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        output = (proc.stdout + proc.stderr).strip()
        if proc.returncode == 0:
            results.append(Registration(key, True, False, output))
            logger.info("registered hospital key %s", key)
        elif _ALREADY_REGISTERED.search(output):
            results.append(Registration(key, True, True, output))
            logger.info("hospital key %s was already registered", key)
        else:
            results.append(Registration(key, False, False, output))
            logger.error("could not register %s: %s", key, output)
    return results


def submit_run(
    settings: CoordinatorSettings,
    app_dir: Path,
    run_config: Sequence[str] = (),
    stream: bool = False,
) -> int:
    """Submit the Flower app in ``app_dir`` through the loopback profile; return its run id.

    With ``stream`` the run's logs follow on stdout until it ends (``flwr run --stream``), and
    the return value is the run id printed when the run was accepted.
    """
    if not (settings.flwr_home / "config.toml").exists():
        raise CoordinatorError(
            f"no connection profile in {settings.flwr_home}; runs can only be started on the coordinator "
            f"machine after 'fedtl-coordinator start --state-dir {settings.state_dir}'"
        )
    command = [flower_executable("flwr"), "run", str(Path(app_dir).resolve()), PROFILE_NAME]
    for item in run_config:
        command += ["--run-config", item]
    env = coordinator_env(settings)
    if stream:
        command.append("--stream")
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        run_id: int | None = None
        for line in proc.stdout:
            sys.stdout.write(line)
            match = re.search(r"started run (\d+)", line)
            if match and run_id is None:
                run_id = int(match.group(1))
        if proc.wait() != 0 or run_id is None:
            raise CoordinatorError(f"flwr run failed (exit code {proc.returncode}); see the output above")
        return run_id
    command += ["--format", "json"]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    payload = _last_json_object(proc.stdout)
    if proc.returncode != 0 or not payload or not payload.get("success"):
        raise CoordinatorError(
            f"flwr run refused the app in {app_dir} (exit code {proc.returncode}): "
            f"{(proc.stdout + proc.stderr).strip()[-2000:]}"
        )
    return int(payload["run-id"])


def _last_json_object(text: str) -> dict[str, object] | None:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


class _Shutdown(Exception):
    """Raised by the SIGTERM handler so that ``serve`` stops the SuperLink on its way out."""


def _raise_shutdown(signum: int, frame: FrameType | None) -> None:
    raise _Shutdown(signal.Signals(signum).name)


def serve(settings: CoordinatorSettings) -> int:
    """Run the coordinator until SIGTERM/SIGINT or until the SuperLink dies; return an exit code."""
    _check_pki(settings)
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(settings.state_dir, 0o700)
    signal.signal(signal.SIGTERM, _raise_shutdown)
    env = coordinator_env(settings)
    command = superlink_command(settings)
    logger.info("starting SuperLink on %s (loopback only): %s", settings.link_address, " ".join(command))
    superlink = subprocess.Popen(command, env=env)
    try:
        wait_until_healthy(
            f"https://{settings.link_address}/health", settings.pki.ca_cert, SUPERLINK_START_TIMEOUT_S, superlink
        )
        write_connection_profile(settings)
        keys = settings.pki.hospital_public_keys()
        failed = [r for r in register_public_keys(settings, keys) if not r.registered]
        if failed:
            raise CoordinatorError(
                "could not register " + ", ".join(str(r.public_key) for r in failed) + "; see the errors above"
            )
        logger.info("%d hospital key(s) registered from %s", len(keys), settings.pki.hospitals_dir)
        return _run_gate(settings, superlink)
    except (_Shutdown, KeyboardInterrupt):
        logger.info("coordinator stopping")
        return 0
    except CoordinatorError as exc:
        logger.error("%s", exc)
        return 1
    finally:
        _stop(superlink)


def _run_gate(settings: CoordinatorSettings, superlink: subprocess.Popen[bytes]) -> int:
    pki = settings.pki
    gate = build_gate_server(
        GateSettings(upstream=f"https://{settings.link_address}", ca_cert=pki.ca_cert),
        host=settings.public_host,
        port=settings.public_port,
        server_cert=pki.server_cert,
        server_key=pki.server_key,
    )

    def watch_superlink() -> None:
        superlink.wait()
        if not gate.should_exit:
            logger.error("flower-superlink exited with code %s; stopping the gate", superlink.returncode)
            gate.should_exit = True

    threading.Thread(target=watch_superlink, name="superlink-watch", daemon=True).start()
    logger.info(
        "hospitals connect to %s:%d (Fleet API only); runs start here with 'fedtl-coordinator run'",
        settings.public_host,
        settings.public_port,
    )
    gate.run()
    if superlink.poll() is not None:
        return 1
    return 0


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=SUPERLINK_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        logger.warning("flower-superlink ignored SIGTERM for %.0f s; killing it", SUPERLINK_STOP_TIMEOUT_S)
        process.kill()
        process.wait()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedtl-coordinator",
        description="Run and drive the fedtl coordinator. 'fedtl-coordinator init-pki --help' creates the PKI.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def add_state_dir(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--state-dir", type=Path, default=DEFAULT_STATE_DIR, help="coordinator state (database, FLWR_HOME)"
        )

    start = sub.add_parser("start", help="start the SuperLink (loopback) and the Fleet-only TLS gate")
    add_state_dir(start)
    start.add_argument("--pki", type=Path, default=DEFAULT_PKI_DIR, help="directory written by init-pki")
    start.add_argument("--public-host", default="0.0.0.0", help="address hospitals connect to (the gate)")
    start.add_argument("--public-port", type=int, default=DEFAULT_PUBLIC_PORT, help="port hospitals connect to")
    start.add_argument("--link-port", type=int, default=DEFAULT_LINK_PORT, help="loopback port of the SuperLink")
    start.add_argument(
        "--database",
        default=None,
        help=f"SuperLink state file (default STATE_DIR/superlink.db; '{IN_MEMORY_DATABASE}' keeps nothing)",
    )

    register = sub.add_parser("register", help="register hospital public keys (NAME.pub) with the running SuperLink")
    add_state_dir(register)
    register.add_argument("public_keys", nargs="+", type=Path, help="OpenSSH EC public key files")

    run = sub.add_parser("run", help="submit a Flower app (a directory with pyproject.toml) as a new run")
    add_state_dir(run)
    run.add_argument("app_dir", type=Path, nargs="?", default=Path("."), help="app directory (default: .)")
    run.add_argument("--run-config", action="append", default=[], help="'key=value' override (repeatable)")
    run.add_argument("--stream", action="store_true", help="follow the run's logs until it ends")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``fedtl-coordinator init-pki|start|register|run``; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["init-pki"]:
        from server.ops.federation_pki import main as init_pki_main

        return init_pki_main(argv[1:])
    args = build_parser().parse_args(argv)
    configure_logging()
    try:
        if args.command == "start":
            settings = CoordinatorSettings(
                pki_dir=args.pki,
                state_dir=args.state_dir,
                public_host=args.public_host,
                public_port=args.public_port,
                link_port=args.link_port,
                database=args.database,
            )
            return serve(settings)
        settings = CoordinatorSettings(state_dir=args.state_dir)
        if args.command == "register":
            results = register_public_keys(settings, args.public_keys)
            return 0 if all(r.registered for r in results) else 1
        run_id = submit_run(settings, args.app_dir, args.run_config, args.stream)
        print(f"run {run_id} submitted")
        return 0
    except CoordinatorError as exc:
        logger.error("%s", exc)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
