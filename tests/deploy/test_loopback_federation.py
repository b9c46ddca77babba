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

from client.rejoin_policy import HEARTBEAT_WINDOW_ENV
from server.ops.coordinator_service import register_public_keys
from server.ops.federation_pki import init_pki
from tests.deploy.harness import FIXTURE_APP, REPO_ROOT, LoopbackFederation

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def foreign_pki(tmp_path_factory: pytest.TempPathFactory):
    """Another federation's CA and a hospital key the coordinator never registered."""
    return init_pki(tmp_path_factory.mktemp("foreign-pki"), hospitals=["intruder"])


def test_run_over_tls_with_registered_hospitals_is_followed_to_its_end_and_exits_zero(
    federation: LoopbackFederation,
) -> None:
    result = federation.coordinator_command("run", str(FIXTURE_APP))

    assert result.returncode == 0, f"{result.stdout}{result.stderr}; logs in {federation.supervisor.log_dir}"
    lines = result.stdout.splitlines()
    assert lines[0].startswith("run ") and lines[0].endswith(" submitted")
    assert lines[-1].endswith(": finished:completed")  # it returned when the run had ended, not before


def test_a_run_that_fails_exits_non_zero_with_flowers_reason(federation: LoopbackFederation) -> None:
    result = federation.coordinator_command(
        "run", str(FIXTURE_APP), "--run-config", "expected-nodes=4", "--run-config", "wait-for-nodes-s=1.0"
    )

    assert result.returncode == 1, result.stdout + result.stderr
    assert "finished:failed" in result.stdout
    assert "flwr log" in result.stdout  # and where the coordinator's log is


def test_hospitals_lists_each_hospital_by_name_with_its_node_id_and_that_it_is_online(
    federation: LoopbackFederation,
) -> None:
    result = federation.coordinator_command("hospitals", "--json")
    table = federation.coordinator_command("hospitals")

    assert result.returncode == 0, result.stdout + result.stderr
    entries = {entry["name"]: entry for entry in json.loads(result.stdout)}
    assert set(entries) == {"h1", "h2", "h3"}
    for name, entry in entries.items():
        assert entry["node_id"] == federation.node_id(name)
        assert entry["online"] and entry["status"] == "online" and entry["last_seen"]
    assert table.stdout.splitlines()[0].split()[:3] == ["hospital", "node", "id"]
    assert any(line.startswith("h2 ") and " yes " in line for line in table.stdout.splitlines())


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


def test_a_revoked_hospital_is_refused_when_it_connects_again_and_stays_revoked(federation: LoopbackFederation) -> None:
    """Last in the module: it takes h3 out of the federation for good.

    h3 is killed and started again at once, so its daemon first takes the refusal for its old session
    and retries through the heartbeat window, then stops as refused. The window is the site's own
    setting, shortened here from 75 s to 10 s: a revoked key is refused whatever the window."""
    result = federation.coordinator_command("revoke", "h3")
    federation.kill_hospital("h3")
    again = federation.start_hospital("h3", max_retries=1, extra_env={HEARTBEAT_WINDOW_ENV: "10"})
    exit_code = again.wait_for_exit(timeout_s=90)
    listed = {entry["name"]: entry for entry in json.loads(federation.coordinator_command("hospitals", "--json").stdout)}

    assert result.returncode == 0, result.stdout + result.stderr
    assert "revoked h3" in result.stdout
    assert exit_code not in (None, 0), f"a revoked hospital was let back in:\n{again.output()[-2000:]}"
    assert "refused this site's key" in again.output()  # told apart at the end of the window, not earlier
    assert "SuperNode ID" not in again.output()
    assert listed["h3"]["status"] == "unregistered" and not listed["h3"]["online"]
    assert listed["h1"]["online"] and listed["h2"]["online"]
    # A restarted coordinator registers every hospitals/*.pub again: the revoked key is no longer there.
    assert not federation.pki.hospital_public_key("h3").exists()
    assert (federation.pki.root / "hospitals-revoked" / "h3.pub").exists()
