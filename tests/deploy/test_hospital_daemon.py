"""fedtl-hospital start: the SuperNode command, the node config it carries, the refusals, and the
supervision of its two processes (the SuperNode and the ClientApp worker) and of a refused activation."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flwr.common.config import parse_config_args

from client import site_supervisor
from client.hospital_daemon import (
    CLIENTAPP_PER_MESSAGE,
    HospitalSettings,
    HospitalSetupError,
    main,
    prepare_site,
    supernode_env,
    worker_command,
)
from client.rejoin_policy import HEARTBEAT_WINDOW_ENV, HEARTBEAT_WINDOW_S, heartbeat_window_s, judge_refusal
from client.site_health import check_site
from client.site_settings import SiteSettingsError, settings_from_node_config
from client.site_supervisor import EXIT_LOST, EXIT_REFUSED, STOP_GRACE_S, SiteProcesses, SiteSupervisor
from client.supernode_record import read_record, write_record
from server.ops.federation_pki import init_pki
from tests.deploy.harness import REPO_ROOT, free_port


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


def test_the_warm_clientapp_runs_the_supernode_in_process_isolation_next_to_one_worker(site: HospitalSettings) -> None:
    warm = prepare_site(site)
    per_message = prepare_site(HospitalSettings(**{**site.__dict__, "clientapp": CLIENTAPP_PER_MESSAGE}))

    assert _flag(warm, "--isolation") == "process"
    assert "--isolation" not in per_message  # Flower's default: a fresh ClientApp process per message
    assert worker_command(19094)[1:] == ["-m", "client.clientapp_worker", "--runtime-api-address", "127.0.0.1:19094"]


# ------------------------------------------------------------------ a refused activation, judged
SUPERLINK = "coordinator.example:9092"


def test_a_refusal_right_after_a_crash_is_flowers_heartbeat_window_and_is_retried_until_it_has_passed() -> None:
    now = 1_000_000.0
    refusal = judge_refusal({"alive_at": now - 20, "superlink": SUPERLINK, "key_id": "k1"}, SUPERLINK, "k1", now)

    assert refusal.retry
    assert refusal.until == now - 20 + HEARTBEAT_WINDOW_S
    assert "still counts this site's previous session online" in refusal.explanation


def test_a_refusal_once_the_window_has_passed_is_a_refused_key_and_says_what_to_do() -> None:
    now = 1_000_000.0
    refusal = judge_refusal({"alive_at": now - HEARTBEAT_WINDOW_S - 1, "superlink": SUPERLINK, "key_id": "k1"},
                            SUPERLINK, "k1", now)

    assert not refusal.retry
    assert "refused this site's key" in refusal.explanation
    assert "register" in refusal.explanation and "NAME.pub" in refusal.explanation


def test_the_heartbeat_window_is_flowers_unless_the_site_sets_its_own_and_a_bad_value_is_refused() -> None:
    assert heartbeat_window_s({}) == heartbeat_window_s({HEARTBEAT_WINDOW_ENV: " "}) == HEARTBEAT_WINDOW_S
    assert heartbeat_window_s({HEARTBEAT_WINDOW_ENV: "12.5"}) == 12.5
    assert heartbeat_window_s({HEARTBEAT_WINDOW_ENV: "0"}) == 0.0
    for bad in ("soon", "-1", "nan", "inf"):
        with pytest.raises(ValueError, match=f"{HEARTBEAT_WINDOW_ENV}=.*unset it to use 75 s"):
            heartbeat_window_s({HEARTBEAT_WINDOW_ENV: bad})


def test_a_refusal_is_judged_against_the_window_the_site_set() -> None:
    now = 1_000_000.0
    record = {"alive_at": now - 20, "superlink": SUPERLINK, "key_id": "k1"}

    inside = judge_refusal(record, SUPERLINK, "k1", now, window_s=30.0)
    after = judge_refusal(record, SUPERLINK, "k1", now, window_s=10.0)

    assert inside.retry and inside.until == now + 10
    assert not after.retry and after.until == now - 10
    assert "more than 10 s ago" in after.explanation


def test_a_bad_heartbeat_window_stops_the_site_before_any_child_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(HEARTBEAT_WINDOW_ENV, "a minute")

    with pytest.raises(ValueError, match=HEARTBEAT_WINDOW_ENV):
        SiteSupervisor(_processes(tmp_path, _stand_in(tmp_path, "supernode", REFUSED), None), out=io.BytesIO())
    assert _starts(tmp_path, "supernode") == 0


@pytest.mark.parametrize("record", [
    {},  # never connected from this state dir
    {"alive_at": 999_990.0, "superlink": SUPERLINK, "key_id": "another key"},
    {"alive_at": 999_990.0, "superlink": "other.example:9092", "key_id": "k1"},
])
def test_a_refusal_without_an_earlier_connection_of_this_key_to_this_coordinator_is_a_refused_key(
    record: dict[str, object],
) -> None:
    refusal = judge_refusal(record, SUPERLINK, "k1", now=1_000_000.0)

    assert not refusal.retry and refusal.until is None


# ------------------------------------------------------------- the supervisor, with stand-in children
def _stand_in(tmp_path: Path, name: str, body: str) -> list[str]:
    """A child command: a small Python program (counts its starts in NAME.starts)."""
    script = tmp_path / f"{name}.py"
    script.write_text(
        "import pathlib, sys, time\n"
        f"counter = pathlib.Path({str(tmp_path / (name + '.starts'))!r})\n"
        "counter.write_text(str(int(counter.read_text() or 0) + 1) if counter.exists() else '1')\n" + body
    )
    return [sys.executable, str(script)]


def _processes(tmp_path: Path, supernode: list[str], worker: list[str] | None, record: dict | None = None) -> SiteProcesses:
    record_path = tmp_path / "supernode.json"
    if record is not None:
        write_record(record_path, record)
    return SiteProcesses(supernode=supernode, worker=worker, env=dict(os.environ), record_path=record_path,
                         record_base={"site_name": "north"}, superlink=SUPERLINK, key_id="k1")


def _starts(tmp_path: Path, name: str) -> int:
    path = tmp_path / f"{name}.starts"
    return int(path.read_text()) if path.exists() else 0


REFUSED = "print('Failed to initialize the connection to the SuperLink.')\nprint('[code: 2004] Failed to activate SuperNode', flush=True)\nsys.exit(305)\n"


def test_a_supernode_refused_inside_the_window_is_started_again_until_the_window_has_passed_then_exit_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(site_supervisor, "RETRY_INTERVAL_S", 0.2)
    crashed = {"alive_at": time.time() - HEARTBEAT_WINDOW_S + 1.5, "superlink": SUPERLINK, "key_id": "k1"}
    supervisor = SiteSupervisor(_processes(tmp_path, _stand_in(tmp_path, "supernode", REFUSED),
                                           _stand_in(tmp_path, "worker", "time.sleep(60)\n"), crashed),
                                out=io.BytesIO())

    with caplog.at_level("INFO"):
        code = supervisor.run()

    assert code == EXIT_REFUSED
    assert _starts(tmp_path, "supernode") >= 3  # refused, retried inside the window, refused for good
    assert "still counts this site's previous session online" in caplog.text
    assert "refused this site's key" in caplog.text


def test_a_refused_key_that_never_connected_stops_the_site_at_once(tmp_path: Path) -> None:
    supervisor = SiteSupervisor(_processes(tmp_path, _stand_in(tmp_path, "supernode", REFUSED), None), out=io.BytesIO())

    assert supervisor.run() == EXIT_REFUSED
    assert _starts(tmp_path, "supernode") == 1


def test_a_supernode_that_dies_takes_the_site_down_with_its_own_exit_code_and_stops_the_worker(tmp_path: Path) -> None:
    supervisor = SiteSupervisor(_processes(tmp_path, _stand_in(tmp_path, "supernode", "time.sleep(1)\nsys.exit(42)\n"),
                                           _stand_in(tmp_path, "worker", "time.sleep(60)\n")), out=io.BytesIO())
    started = time.monotonic()

    code = supervisor.run()
    worker_pid = read_record(tmp_path / "supernode.json")["worker_pid"]

    assert code == 42
    assert time.monotonic() - started < STOP_GRACE_S  # the worker stopped on SIGTERM, not killed at the end
    assert not _pid_alive(worker_pid)


def test_a_dead_worker_is_started_again_and_one_that_keeps_dying_stops_the_site(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(site_supervisor, "MAX_WORKER_RESTARTS", 2)
    supervisor = SiteSupervisor(_processes(tmp_path, _stand_in(tmp_path, "supernode", "time.sleep(60)\n"),
                                           _stand_in(tmp_path, "worker", "sys.exit(1)\n")), out=io.BytesIO())

    assert supervisor.run() == EXIT_LOST
    assert _starts(tmp_path, "worker") == 3  # the first start and two restarts
    assert not _pid_alive(read_record(tmp_path / "supernode.json")["pid"])


def test_the_daemon_stamps_when_the_site_was_last_connected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(site_supervisor, "ALIVE_STAMP_S", 0.1)
    connected = "print('INFO :      SuperNode ID: 1234', flush=True)\ntime.sleep(1.5)\nsys.exit(305)\n"
    supervisor = SiteSupervisor(_processes(tmp_path, _stand_in(tmp_path, "supernode", connected), None), out=io.BytesIO())
    before = time.time()

    supervisor.run()
    record = read_record(tmp_path / "supernode.json")

    assert record["node_id"] == "1234"
    assert before < record["alive_at"] <= time.time()
    assert record["superlink"] == SUPERLINK and record["key_id"] == "k1" and record["site_name"] == "north"


def _pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


# --------------------------------------------------------------- the real daemon, without a coordinator
@pytest.mark.slow
def test_the_real_daemon_restarts_a_killed_worker_reports_health_and_stops_everything_on_sigterm(
    site: HospitalSettings,
) -> None:
    argv = [sys.executable, "-m", "client.hospital_daemon", "start", "--superlink", f"127.0.0.1:{free_port()}",
            "--ca", str(site.ca_cert), "--key", str(site.private_key), "--manifest", str(site.manifest),
            "--state-dir", str(site.state_dir), "--site-name", "north", "--device", "cpu",
            "--runtime-port", str(free_port())]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    daemon = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    record_path = site.state_dir / "supernode.json"
    try:
        first = _wait_for(lambda: _running_children(record_path), timeout_s=60)
        assert check_site(site.state_dir).supernode_alive  # what `fedtl-hospital health` reports

        os.kill(first["worker_pid"], signal.SIGKILL)
        second = _wait_for(lambda: (r := _running_children(record_path)) and r["worker_pid"] != first["worker_pid"]
                           and r, timeout_s=30)
        assert second["pid"] == first["pid"]  # the SuperNode kept running

        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0
        assert not _pid_alive(second["pid"]) and not _pid_alive(second["worker_pid"])
        assert not check_site(site.state_dir).supernode_alive
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()


def _running_children(record_path: Path) -> dict | None:
    record = read_record(record_path)
    pids = [record.get("pid"), record.get("worker_pid")]
    return record if all(isinstance(pid, int) and _pid_alive(pid) for pid in pids) else None


def _wait_for(probe, timeout_s: float):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if result := probe():
            return result
        time.sleep(0.2)
    raise AssertionError(f"not reached within {timeout_s:.0f} s")
