"""deploy/: the systemd units, Dockerfiles and compose file run exactly the commands the tests run.

No Docker engine or systemd here: each file's command line is parsed by the same argparse
parser the tested entry points use, so a renamed or missing flag fails this test.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from client.hospital_daemon import build_parser as hospital_parser
from server.ops.coordinator_service import build_parser as coordinator_parser

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _exec_start(unit: str) -> list[str]:
    text = (DEPLOY / unit).read_text()
    joined = re.sub(r"\\\n\s*", " ", text)
    line = next(line for line in joined.splitlines() if line.startswith("ExecStart="))
    expanded = re.sub(r"\$\{(\w+)\}", lambda m: f"dummy-{m.group(1).lower()}", line.removeprefix("ExecStart="))
    return shlex.split(expanded)


def _after_module(argv: list[str], module: str) -> list[str]:
    return argv[argv.index(module) + 1 :]


def _dockerfile_instruction(name: str, instruction: str) -> list[str]:
    text = re.sub(r"\\\n\s*", " ", (DEPLOY / name).read_text())
    line = next(line for line in text.splitlines() if line.startswith(f"{instruction} "))
    return json.loads(line.removeprefix(f"{instruction} "))


def test_coordinator_unit_runs_a_valid_start_command_on_loopback_link() -> None:
    args = coordinator_parser().parse_args(_after_module(_exec_start("fedtl-coordinator.service"), "server.ops.coordinator_service"))

    assert args.command == "start"
    assert args.public_port != args.link_port


def test_hospital_unit_runs_a_valid_start_command() -> None:
    argv = _after_module(_exec_start("fedtl-hospital.service"), "client.hospital_daemon")

    assert argv[0] == "start"
    args = hospital_parser().parse_args(argv[1:])
    assert args.ca.name == "ca.crt"


def test_coordinator_image_starts_the_same_command() -> None:
    entrypoint = _dockerfile_instruction("Dockerfile.coordinator", "ENTRYPOINT")
    cmd = _dockerfile_instruction("Dockerfile.coordinator", "CMD")

    assert entrypoint == ["python", "-m", "server.ops.coordinator_service"]
    assert coordinator_parser().parse_args(cmd).command == "start"


@pytest.mark.parametrize("name", ["Dockerfile.coordinator", "Dockerfile.hospital"])
def test_images_turn_telemetry_and_update_check_off(name: str) -> None:
    text = (DEPLOY / name).read_text()

    assert "FLWR_TELEMETRY_ENABLED=0" in text
    assert "FLWR_DISABLE_UPDATE_CHECK=1" in text


@pytest.mark.parametrize("unit", ["fedtl-coordinator.service", "fedtl-hospital.service"])
def test_units_turn_telemetry_and_update_check_off(unit: str) -> None:
    text = (DEPLOY / unit).read_text()

    assert "Environment=FLWR_TELEMETRY_ENABLED=0" in text
    assert "Environment=FLWR_DISABLE_UPDATE_CHECK=1" in text


def test_compose_hospitals_run_valid_start_commands_and_publish_nothing() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    hospitals = {name: svc for name, svc in compose["services"].items() if name != "coordinator"}

    assert len(hospitals) >= 3
    for name, service in hospitals.items():
        assert service["command"][0] == "start"
        args = hospital_parser().parse_args(service["command"][1:])
        assert args.site_name == name
        assert args.superlink == "coordinator:9092"
        assert "ports" not in service


def test_compose_coordinator_publishes_only_the_fleet_gate() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    cmd = _dockerfile_instruction("Dockerfile.coordinator", "CMD")
    args = coordinator_parser().parse_args(cmd)

    assert compose["services"]["coordinator"]["ports"] == [f"{args.public_port}:{args.public_port}"]


def test_deploy_is_not_a_python_package() -> None:
    assert not (DEPLOY / "__init__.py").exists()


def test_the_example_federation_toml_is_a_valid_coordinator_config_with_dp_on() -> None:
    from common.config import FederationConfig

    config = FederationConfig.from_toml(DEPLOY / "federation.toml")

    assert config.privacy.enabled and config.privacy.unit == "patient"
    assert config.model.class_names == ["normal", "finding"]
