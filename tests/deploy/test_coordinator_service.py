"""fedtl-coordinator: the SuperLink stays on loopback with TLS + node auth; flwr reaches it via a local profile."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.cli.flower_config import read_superlink_connection

from server.ops.coordinator_service import (
    PROFILE_NAME,
    CoordinatorError,
    CoordinatorSettings,
    coordinator_env,
    main,
    submit_run,
    superlink_command,
    write_connection_profile,
)
from server.ops.federation_pki import init_pki


@pytest.fixture
def settings(tmp_path: Path) -> CoordinatorSettings:
    pki = init_pki(tmp_path / "pki", hospitals=["north"])
    return CoordinatorSettings(pki_dir=pki.root, state_dir=tmp_path / "state", public_port=19092, link_port=19093)


def _flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_superlink_binds_loopback_only_with_tls_node_auth_and_no_runtime_installs(
    settings: CoordinatorSettings,
) -> None:
    command = superlink_command(settings)

    assert _flag(command, "--host") == "127.0.0.1"
    assert _flag(command, "--port") == "19093"
    assert "--enable-supernode-auth" in command
    assert "--disable-runtime-dependency-installation" in command
    assert "--insecure" not in command
    assert _flag(command, "--ssl-ca-certfile") == str(settings.pki.ca_cert.resolve())
    assert _flag(command, "--ssl-certfile") == str(settings.pki.server_cert.resolve())
    assert _flag(command, "--ssl-keyfile") == str(settings.pki.server_key.resolve())
    assert _flag(command, "--database") == str(settings.state_dir / "superlink.db")


def test_public_address_never_reaches_the_superlink(settings: CoordinatorSettings) -> None:
    command = " ".join(superlink_command(settings))

    assert "0.0.0.0" not in command
    assert "19092" not in command


def test_connection_profile_points_flwr_at_the_loopback_superlink_over_tls(
    settings: CoordinatorSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_connection_profile(settings)
    monkeypatch.setenv("FLWR_HOME", str(settings.flwr_home))

    connection = read_superlink_connection(None)  # flwr's own reader, default profile

    assert connection.name == PROFILE_NAME
    assert connection.address == "127.0.0.1:19093"
    assert connection.root_certificates == str(settings.pki.ca_cert.resolve())
    assert not connection.insecure


def test_coordinator_processes_get_own_flwr_home_and_no_telemetry_or_update_check(settings: CoordinatorSettings) -> None:
    env = coordinator_env(settings, base={"PATH": "/usr/bin"})

    assert env["FLWR_HOME"] == str(settings.flwr_home)
    assert env["FLWR_TELEMETRY_ENABLED"] == "0"
    assert env["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"


def test_run_without_a_started_coordinator_says_where_runs_can_be_started(
    settings: CoordinatorSettings, tmp_path: Path
) -> None:
    with pytest.raises(CoordinatorError, match="only be started on the coordinator"):
        submit_run(settings, tmp_path)


def test_start_without_pki_names_the_missing_files_and_the_command(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    code = main(["start", "--pki", str(tmp_path / "nothing"), "--state-dir", str(tmp_path / "state")])

    assert code == 1
    assert "ca.crt" in caplog.text and "init-pki" in caplog.text


def test_init_pki_is_a_coordinator_subcommand(tmp_path: Path) -> None:
    code = main(["init-pki", "--out", str(tmp_path / "pki"), "--hospital", "north"])

    assert code == 0
    assert (tmp_path / "pki" / "hospitals" / "north.pub").exists()
