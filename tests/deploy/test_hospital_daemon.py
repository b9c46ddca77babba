"""fedtl-hospital start: the SuperNode command, the node config it carries, and the refusals."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from flwr.common.config import parse_config_args

from client.hospital_daemon import (
    HospitalSettings,
    HospitalSetupError,
    main,
    prepare_site,
    supernode_env,
)
from client.site_settings import SiteSettingsError, settings_from_node_config
from server.ops.federation_pki import init_pki


@pytest.fixture
def site(tmp_path: Path) -> HospitalSettings:
    pki = init_pki(tmp_path / "pki", hospitals=["north"])
    manifest = tmp_path / "data dir" / "labels 'v2'.csv"
    manifest.parent.mkdir()
    manifest.write_text("path,label\n")
    return HospitalSettings(
        superlink="coordinator.example:9092",
        ca_cert=pki.ca_cert,
        private_key=pki.hospital_private_key("north"),
        manifest=manifest,
        state_dir=tmp_path / "state",
        site_name="north",
        device="cuda:1",
        storage="disk",
        runtime_port=19094,
        max_retries=5,
        max_wait_time=600.0,
    )


def _flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_supernode_command_uses_tls_node_auth_loopback_runtime_and_retries(site: HospitalSettings) -> None:
    command = prepare_site(site)

    assert Path(command[0]).name == "flower-supernode"
    assert _flag(command, "--superlink") == "coordinator.example:9092"
    assert _flag(command, "--root-certificates") == str(site.ca_cert.resolve())
    assert _flag(command, "--auth-supernode-private-key") == str(site.private_key.resolve())
    assert _flag(command, "--host") == "127.0.0.1"
    assert _flag(command, "--port") == "19094"
    assert _flag(command, "--max-retries") == "5"
    assert _flag(command, "--max-wait-time") == "600.0"
    assert "--insecure" not in command


def test_node_config_file_reaches_the_client_app_intact_even_with_odd_paths(site: HospitalSettings) -> None:
    command = prepare_site(site)

    node_config = parse_config_args([_flag(command, "--node-config")])  # exactly what flower-supernode does
    settings = settings_from_node_config(node_config)

    assert settings.manifest == site.manifest.resolve()
    assert settings.state_dir == site.state_dir.resolve()
    assert settings.site_name == "north"
    assert settings.device == "cuda:1"
    assert settings.storage == "disk"


def test_a_wrong_storage_setting_is_refused_with_the_accepted_values() -> None:
    with pytest.raises(SiteSettingsError, match="'storage'.*'ram' is not one of auto, memory, disk"):
        settings_from_node_config({"manifest": "/data/labels.csv", "state-dir": "/var/lib/fedtl", "storage": "ram"})


def test_supernode_environment_turns_telemetry_and_update_check_off_and_isolates_flwr_home(site: HospitalSettings) -> None:
    env = supernode_env(site, base={"PATH": "/usr/bin", "FLWR_TELEMETRY_ENABLED": "1"})

    assert env["FLWR_TELEMETRY_ENABLED"] == "0"
    assert env["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    assert env["FLWR_HOME"] == str((site.state_dir / "flwr-home").resolve())


def test_state_dir_is_private_to_the_site_account(site: HospitalSettings) -> None:
    prepare_site(site)

    assert os.stat(site.state_dir).st_mode & 0o077 == 0


def test_a_private_key_readable_by_others_is_refused(site: HospitalSettings) -> None:
    os.chmod(site.private_key, 0o644)

    with pytest.raises(HospitalSetupError, match="chmod 600"):
        prepare_site(site)


def test_a_pem_certificate_given_as_key_is_refused_with_the_fix(site: HospitalSettings) -> None:
    wrong = site.ca_cert.parent / "server.key"
    with pytest.raises(HospitalSetupError, match="OpenSSH"):
        prepare_site(HospitalSettings(**{**site.__dict__, "private_key": wrong}))


def test_a_superlink_without_port_is_refused(site: HospitalSettings) -> None:
    with pytest.raises(HospitalSetupError, match="HOST:PORT"):
        prepare_site(HospitalSettings(**{**site.__dict__, "superlink": "coordinator.example"}))


def test_print_command_prints_without_starting(site: HospitalSettings, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "start",
            "--superlink", site.superlink,
            "--ca", str(site.ca_cert),
            "--key", str(site.private_key),
            "--manifest", str(site.manifest),
            "--state-dir", str(site.state_dir),
            "--site-name", site.site_name,
            "--print-command",
        ]
    )

    assert code == 0
    assert "flower-supernode --superlink coordinator.example:9092" in capsys.readouterr().out
    assert not (site.state_dir / "supernode.json").exists()
