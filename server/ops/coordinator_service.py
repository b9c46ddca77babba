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
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from common.daemon_setup import configure_logging
from server.ops.control_gate import GateSettings, build_gate_server
from server.ops.gate_limits import add_gate_limit_arguments, gate_limits_from_args
from server.ops.coordinator_settings import (  # noqa: F401  (re-exported: the commands' shared settings)
    DEFAULT_LINK_PORT,
    DEFAULT_PKI_DIR,
    DEFAULT_PUBLIC_PORT,
    DEFAULT_STATE_DIR,
    IN_MEMORY_DATABASE,
    LOOPBACK,
    PROFILE_NAME,
    SUPERLINK_START_TIMEOUT_S,
    SUPERLINK_STOP_TIMEOUT_S,
    CoordinatorError,
    CoordinatorSettings,
    coordinator_env,
    flower_executable,
)
from server.ops.run_command import submit_run  # noqa: F401  (re-exported for scripts and tests)

logger = logging.getLogger(__name__)

_ALREADY_REGISTERED = re.compile(r"already in use", re.IGNORECASE)


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


class _Shutdown(Exception):
    """Raised by the SIGTERM handler so that ``serve`` stops the SuperLink on its way out."""


def _raise_shutdown(signum: int, frame: FrameType | None) -> None:
    raise _Shutdown(signal.Signals(signum).name)


def _record_installation(settings: CoordinatorSettings) -> None:
    """``STATE_DIR/coordinator.json``: where this coordinator's PKI is (``revoke`` retires keys there)."""
    document = {"pki_dir": str(settings.pki_dir.resolve()), "public_port": settings.public_port,
                "link_port": settings.link_port}
    path = settings.state_dir / "coordinator.json"
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


def serve(settings: CoordinatorSettings) -> int:
    """Run the coordinator until SIGTERM/SIGINT or until the SuperLink dies; return an exit code."""
    _check_pki(settings)
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(settings.state_dir, 0o700)
    _record_installation(settings)
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
        GateSettings(upstream=f"https://{settings.link_address}", ca_cert=pki.ca_cert, limits=settings.gate_limits),
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
    add_gate_limit_arguments(start)

    register = sub.add_parser("register", help="register hospital public keys (NAME.pub) with the running SuperLink")
    add_state_dir(register)
    register.add_argument("public_keys", nargs="+", type=Path, help="OpenSSH EC public key files")

    run = sub.add_parser(
        "run",
        help="start a federation run and follow it to its end (one line per round, then the results)",
        description="Start a run on this coordinator and follow it: one line per completed round, then the "
        "results folder and the headline table. Exit code 0 when every round completed, 1 when the run failed "
        "or stopped early, 3 when the SuperLink stopped answering.",
    )
    add_state_dir(run)
    run.add_argument("--config", type=Path, help="the federation's TOML file (see simulations/configs/demo.toml)")
    run.add_argument("--out", type=Path, help="results folder (report.md, metrics, plots, checkpoints); new "
                     "unless --resume or --overwrite")
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    run.add_argument("--overwrite", action="store_true", help="replace the earlier run in --out")
    run.add_argument("--cache-dir", type=Path, default=None,
                     help="where the backbone is prepared and kept (default STATE_DIR/cache)")
    run.add_argument("--app-dir", type=Path, default=None,
                     help="the Flower app to submit (default: this fedtl installation)")
    run.add_argument("app_dir_positional", type=Path, nargs="?", default=None, metavar="APP_DIR",
                     help="without --config: submit this Flower app as it is (e.g. tests/deploy/fixture_app)")
    run.add_argument("--run-config", action="append", default=[],
                     help="another 'key=value' run-config entry, TOML values (strings quoted); repeatable")
    run.add_argument("--detach", action="store_true", help="return once the run is submitted")

    hospitals = sub.add_parser("hospitals", help="list the hospitals: name, node id, online, last seen, last epsilon")
    add_state_dir(hospitals)
    hospitals.add_argument("--json", action="store_true", help="print JSON instead of a table")

    revoke = sub.add_parser("revoke", help="unregister a hospital's key: its next connection is refused")
    add_state_dir(revoke)
    revoke.add_argument("name", help="the hospital's name, as 'fedtl-coordinator hospitals' lists it")
    revoke.add_argument("--pki", type=Path, default=None,
                        help="PKI directory whose hospitals/NAME.pub is retired (default: the one 'start' used)")
    return parser


def _run(settings: CoordinatorSettings, args: argparse.Namespace) -> int:
    from server.ops.run_command import prepare_request, run_federation_command

    if args.config is None:
        if args.out is not None or args.resume or args.overwrite:
            raise CoordinatorError("--out, --resume and --overwrite need --config FILE.toml")
        app = args.app_dir or args.app_dir_positional
        return run_federation_command(settings, None, app_dir=app, raw_run_config=args.run_config,
                                      detach=args.detach)
    if args.out is None:
        raise CoordinatorError("--config needs --out DIR: the folder for the report, metrics, plots and checkpoints")
    request = prepare_request(settings, args.config, args.out, resume=args.resume, overwrite=args.overwrite,
                              cache_dir=args.cache_dir, app_dir=args.app_dir or args.app_dir_positional,
                              extra=args.run_config)
    return run_federation_command(settings, request, detach=args.detach)


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
                gate_limits=gate_limits_from_args(args),
            )
            return serve(settings)
        settings = CoordinatorSettings(state_dir=args.state_dir)
        if args.command == "register":
            results = register_public_keys(settings, args.public_keys)
            return 0 if all(r.registered for r in results) else 1
        if args.command == "hospitals":
            from server.ops.hospital_registry import format_hospitals, hospitals_json, list_hospitals

            entries = list_hospitals(settings)
            print(hospitals_json(entries) if args.json else format_hospitals(entries))
            return 0
        if args.command == "revoke":
            from server.ops.hospital_registry import revoke_hospital

            entry = revoke_hospital(settings, args.name, args.pki)
            print(f"revoked {entry.name} (node {entry.node_id}): now {entry.status}; its next connection is refused")
            return 0
        return _run(settings, args)
    except CoordinatorError as exc:
        logger.error("%s", exc)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
