"""End to end on loopback: TLS + SuperNode auth, and only the coordinator can start runs.

One real federation per module (see conftest.py): ``flower-superlink`` on a loopback port behind
the Fleet-only TLS gate, three hospitals whose keys were registered at start, each running
``flower-supernode`` through ``client.hospital_daemon``.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from server.ops.coordinator_service import register_public_keys
from server.ops.federation_pki import init_pki
from tests.deploy.harness import FIXTURE_APP, REPO_ROOT, LoopbackFederation

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def foreign_pki(tmp_path_factory: pytest.TempPathFactory):
    """Another federation's CA and a hospital key the coordinator never registered."""
    return init_pki(tmp_path_factory.mktemp("foreign-pki"), hospitals=["intruder"])


def test_run_over_tls_with_registered_hospitals_completes(federation: LoopbackFederation) -> None:
    run_id = federation.submit_fixture_run()

    status = federation.wait_for_run(run_id, timeout_s=60)

    assert status == "finished:completed", f"run {run_id} ended {status}; logs in {federation.supervisor.log_dir}"


def test_hospital_health_reports_connected_site(federation: LoopbackFederation) -> None:
    state_dir = federation.root / "sites" / "h1"

    result = subprocess.run(
        [sys.executable, "-m", "client.hospital_daemon", "health", "--state-dir", str(state_dir), "--json"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )

    report = json.loads(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert report["connected"] and report["supernode_alive"] and report["superlink_reachable"]


def test_registering_a_known_hospital_again_is_harmless(federation: LoopbackFederation) -> None:
    results = register_public_keys(federation.coordinator, [federation.pki.hospital_public_key("h2")])

    assert results[0].registered and results[0].already_known


def test_supernode_with_unregistered_key_is_refused(federation: LoopbackFederation, foreign_pki) -> None:
    intruder = federation.start_hospital("intruder", key=foreign_pki.hospital_private_key("intruder"))

    exit_code = intruder.wait_for_exit(timeout_s=45)

    assert exit_code not in (None, 0), f"unregistered SuperNode still running:\n{intruder.output()[-2000:]}"
    assert "Failed to activate SuperNode" in intruder.output()
    assert federation.online_nodes() == 3


def test_supernode_trusting_another_ca_is_refused(federation: LoopbackFederation, foreign_pki) -> None:
    misconfigured = federation.start_hospital(
        "h1-wrong-ca", key=federation.pki.hospital_private_key("h1"), ca_cert=foreign_pki.ca_cert
    )

    exit_code = misconfigured.wait_for_exit(timeout_s=45)

    assert exit_code not in (None, 0), f"SuperNode accepted a certificate from another CA:\n{misconfigured.output()[-2000:]}"
    assert "CERTIFICATE_VERIFY_FAILED" in misconfigured.output()


def _network_side_profile(federation: LoopbackFederation, home: Path) -> Path:
    """What anyone on the network could write: a flwr profile aimed at the public address, trusting the CA."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "outside"\n\n[superlink.outside]\n'
        f'address = "{federation.public_address}"\nroot-certificates = "{federation.pki.ca_cert}"\n',
        encoding="utf-8",
    )
    return home


def test_run_submission_is_refused_from_the_network_and_accepted_on_the_coordinator(
    federation: LoopbackFederation, tmp_path: Path
) -> None:
    outside_home = _network_side_profile(federation, tmp_path / "outside-flwr-home")

    from_network = federation.flwr("run", str(FIXTURE_APP), "outside", flwr_home=outside_home)
    from_coordinator = federation.submit_fixture_run()

    assert from_network.returncode != 0
    assert "403 Forbidden" in from_network.stdout + from_network.stderr
    assert "Successfully started run" not in from_network.stdout
    assert from_coordinator > 0  # accepted; the first test follows such a run to completion
    assert not federation.run_status(from_coordinator).startswith("finished:failed")


@pytest.mark.parametrize(
    "path",
    [
        "/v1/control/start-run",
        "/v1/control/register-node",
        "/v1/control/list-runs",
        "/v1/runtime/push-messages",
        "/v1/fleet/../control/start-run",
        "/docs",
    ],
)
def test_gate_answers_403_to_everything_but_the_fleet_api(federation: LoopbackFederation, path: str) -> None:
    context = ssl.create_default_context(cafile=str(federation.pki.ca_cert))
    url = httpx.URL(f"https://{federation.public_address}").copy_with(raw_path=path.encode())

    with httpx.Client(verify=context) as client:
        refused = client.post(url, content=b"", headers={"content-type": "application/protobuf"})
        health = client.get(f"https://{federation.public_address}/health")

    assert refused.status_code == 403
    assert health.status_code == 200
