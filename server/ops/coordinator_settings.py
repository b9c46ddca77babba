"""Where a coordinator installation lives and how its Flower processes are started: the settings every
``fedtl-coordinator`` command shares (state dir, PKI, ports, the loopback connection profile's name)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from common.daemon_setup import FlowerNotInstalled
from common.daemon_setup import flower_executable as installed_flower_executable
from server.ops.federation_pki import FederationPki
from server.ops.gate_limits import GateLimits

PROFILE_NAME = "fedtl-coordinator"
LOOPBACK = "127.0.0.1"
DEFAULT_PUBLIC_PORT = 9092
DEFAULT_LINK_PORT = 9093
DEFAULT_STATE_DIR = Path("/var/lib/fedtl-coordinator")
DEFAULT_PKI_DIR = Path("/etc/fedtl/pki")
IN_MEMORY_DATABASE = ":flwr-in-memory:"
SUPERLINK_START_TIMEOUT_S = 60.0
SUPERLINK_STOP_TIMEOUT_S = 10.0


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
    gate_limits : the gate's caps on request size, connections, concurrency and slow clients.
    """

    pki_dir: Path = DEFAULT_PKI_DIR
    state_dir: Path = DEFAULT_STATE_DIR
    public_host: str = "0.0.0.0"
    public_port: int = DEFAULT_PUBLIC_PORT
    link_port: int = DEFAULT_LINK_PORT
    database: str | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    gate_limits: GateLimits = field(default_factory=GateLimits)

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
