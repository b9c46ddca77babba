"""``fedtl-coordinator run``: start a federation run on the coordinator machine and follow it to its end.

``run --config FILE.toml --out DIR`` resolves and checks every path before anything is submitted (the
federation TOML must load, the results folder must be new unless ``--resume``/``--overwrite``, and be
writable), submits the fedtl app through the coordinator's loopback profile with the run config
``config-file``, ``run-dir`` and ``cache-dir`` as absolute paths (``cache-dir`` defaults to
``STATE_DIR/cache``, so the pretrained backbone is prepared once per coordinator, not once per run),
then prints one line per completed round (read from the run folder's ``metrics.json``, which the
ServerApp rewrites after every round) and, at the end, the results folder and the headline table.
It returns when the run ends: exit code 0 only for a run that finished with every round; 1 when the
run failed or was stopped (with Flower's reason); 3 when the SuperLink stopped answering.

Every run started this way is recorded in ``STATE_DIR/runs.json`` (run id, results folder, config), so
``fedtl-coordinator hospitals`` can show each site's last reported epsilon.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common.atomic_io import atomic_write_json
from common.config import ConfigError, FederationConfig
from server.ops.control_client import control_client
from server.ops.coordinator_settings import PROFILE_NAME, CoordinatorError, CoordinatorSettings, coordinator_env
from server.ops.coordinator_settings import flower_executable
from server.run_folder import RunFolderInUse, prepare_run_folder
from server.run_report import REPORT_FILE, format_round_line, format_table

logger = logging.getLogger(__name__)

RUNS_FILE = "runs.json"
POLL_S = 2.0
UNREACHABLE_LIMIT_S = 60.0
EXIT_COMPLETED, EXIT_FAILED, EXIT_UNREACHABLE, EXIT_INTERRUPTED = 0, 1, 3, 130


def default_app_dir() -> Path:
    """The fedtl app: the installation holding this code's ``pyproject.toml`` (``[tool.flwr.app]``)."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").exists() else Path.cwd()


# --------------------------------------------------------------------------- submission
def submit_run(settings: CoordinatorSettings, app_dir: Path, run_config: Sequence[str] = ()) -> int:
    """Submit the Flower app in ``app_dir`` through the loopback profile; return its run id.

    ``run_config`` items are ``key=value`` with TOML values (strings quoted: ``'run-dir="/abs"'``).
    Returns as soon as the SuperLink accepted the run.
    """
    if not (settings.flwr_home / "config.toml").exists():
        raise CoordinatorError(
            f"no connection profile in {settings.flwr_home}; runs can only be started on the coordinator "
            f"machine after 'fedtl-coordinator start --state-dir {settings.state_dir}'"
        )
    command = [flower_executable("flwr"), "run", str(Path(app_dir).resolve()), PROFILE_NAME]
    for item in run_config:
        command += ["--run-config", item]
    command += ["--format", "json"]
    proc = subprocess.run(command, env=coordinator_env(settings), capture_output=True, text=True, timeout=300)
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


def toml_value(value: str | bool | int | float) -> str:
    """A run-config value as Flower's ``--run-config key=value`` parser (TOML) reads it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string literal is a valid TOML basic string
    return repr(value)


_KEY_VALUE = re.compile(r"^[A-Za-z0-9_.-]+=.+$")


@dataclass(frozen=True)
class FederationRunRequest:
    """What ``run --config FILE --out DIR`` submits, every path absolute and checked."""

    config_file: Path
    out_dir: Path
    cache_dir: Path
    app_dir: Path
    resume: bool
    rounds: int
    extra: tuple[str, ...] = ()

    def run_config(self) -> list[str]:
        values: dict[str, str | bool] = {
            "config-file": str(self.config_file), "run-dir": str(self.out_dir),
            "cache-dir": str(self.cache_dir), "resume": self.resume,
        }
        return [f"{key}={toml_value(value)}" for key, value in values.items()] + list(self.extra)


def prepare_request(settings: CoordinatorSettings, config_file: Path, out_dir: Path, *, resume: bool = False,
                    overwrite: bool = False, cache_dir: Path | None = None, app_dir: Path | None = None,
                    extra: Sequence[str] = ()) -> FederationRunRequest:
    """Resolve and check everything a run needs before it is submitted; raise with the fix otherwise."""
    config_file = Path(config_file).expanduser().resolve()
    if not config_file.is_file():
        raise CoordinatorError(f"--config {config_file}: no such file; give the federation's TOML file")
    try:
        config = FederationConfig.from_toml(config_file)
    except ConfigError as exc:
        raise CoordinatorError(f"--config {config_file} cannot be used: {exc}") from None
    out_dir = Path(out_dir).expanduser().resolve()
    try:
        prepare_run_folder(out_dir, resume=resume, overwrite=overwrite)
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".fedtl-write-check"
        probe.write_text("ok", encoding="utf-8")
        probe.unlink()
    except RunFolderInUse as exc:
        raise CoordinatorError(f"--out: {exc}") from None
    except OSError as exc:
        raise CoordinatorError(f"--out {out_dir} is not a folder this user can write ({exc.strerror})") from None
    cache = Path(cache_dir).expanduser().resolve() if cache_dir is not None else settings.state_dir.resolve() / "cache"
    app = Path(app_dir).expanduser().resolve() if app_dir is not None else default_app_dir()
    if not (app / "pyproject.toml").exists():
        raise CoordinatorError(f"--app-dir {app} holds no pyproject.toml; it must be the fedtl installation")
    reserved = {"config-file", "run-dir", "cache-dir", "resume"}
    for item in extra:
        if not _KEY_VALUE.match(item):
            raise CoordinatorError(f"--run-config {item!r}: write it as key=value (strings in quotes: key='\"text\"')")
        if item.split("=", 1)[0] in reserved:
            raise CoordinatorError(f"--run-config {item!r}: use --config, --out, --cache-dir or --resume for that key")
    return FederationRunRequest(config_file, out_dir, cache, app, resume, config.training.rounds, tuple(extra))


# ------------------------------------------------------------------------------- ledger
@dataclass(frozen=True)
class RecordedRun:
    """One run started by ``fedtl-coordinator run``."""

    run_id: int
    out_dir: Path
    config_file: Path | None
    submitted_at: float


def _as_json(run: RecordedRun) -> dict[str, Any]:
    return asdict(run) | {"out_dir": str(run.out_dir), "config_file": str(run.config_file) if run.config_file else None}


def record_run(settings: CoordinatorSettings, run: RecordedRun) -> None:
    """Append ``run`` to ``STATE_DIR/runs.json``."""
    runs = [_as_json(r) for r in [*recorded_runs(settings), run]]
    atomic_write_json(settings.state_dir / RUNS_FILE, {"runs": runs})


def recorded_runs(settings: CoordinatorSettings) -> list[RecordedRun]:
    try:
        document = json.loads((settings.state_dir / RUNS_FILE).read_text(encoding="utf-8"))
        return [RecordedRun(int(r["run_id"]), Path(r["out_dir"]),
                            Path(r["config_file"]) if r.get("config_file") else None, float(r["submitted_at"]))
                for r in document["runs"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def latest_run(settings: CoordinatorSettings) -> RecordedRun | None:
    runs = recorded_runs(settings)
    return max(runs, key=lambda r: r.submitted_at) if runs else None


# ------------------------------------------------------------------------------ follow
def run_status(settings: CoordinatorSettings, run_id: int) -> tuple[str, str]:
    """``(status, details)`` of a run as the SuperLink reports it, e.g. ``("finished:failed", "...")``."""
    from flwr.proto.control_pb2 import ListRunsRequest  # pylint: disable=no-name-in-module

    with control_client(settings) as client:
        runs = client.ListRuns(ListRunsRequest(run_id=run_id)).run_dict
    if run_id not in runs:
        raise CoordinatorError(f"the SuperLink knows no run {run_id}")
    status = runs[run_id].status
    text = status.status + (f":{status.sub_status}" if status.sub_status else "")
    return text, status.details


def _completed_rounds(out_dir: Path | None) -> list[dict[str, Any]]:
    if out_dir is None:
        return []
    try:
        return list(json.loads((out_dir / "metrics.json").read_text(encoding="utf-8")).get("rounds", []))
    except (OSError, ValueError):
        return []  # not written yet, or being replaced this instant


def follow_run(settings: CoordinatorSettings, run_id: int, out_dir: Path | None, *, skip_rounds: int = 0,
               emit: Callable[[str], None] = print, poll_s: float = POLL_S,
               unreachable_limit_s: float = UNREACHABLE_LIMIT_S) -> tuple[str, str]:
    """Print each round of ``run_id`` as it completes until the run ends; returns its final status."""
    shown = skip_rounds
    last_status = ""
    unreachable_since: float | None = None
    while True:
        rounds = _completed_rounds(out_dir)
        for record in rounds[shown:]:
            emit(format_round_line(record))
        shown = max(shown, len(rounds))
        try:
            status, details = run_status(settings, run_id)
            unreachable_since = None
        except CoordinatorError as exc:
            unreachable_since = unreachable_since or time.monotonic()
            if time.monotonic() - unreachable_since > unreachable_limit_s:
                return "unreachable", str(exc)
            time.sleep(poll_s)
            continue
        if status != last_status:
            emit(f"run {run_id}: {status}")
            last_status = status
        if status.startswith("finished"):
            for record in _completed_rounds(out_dir)[shown:]:
                emit(format_round_line(record))
            return status, details
        time.sleep(poll_s)


def run_federation_command(settings: CoordinatorSettings, request: FederationRunRequest | None, *,
                           app_dir: Path | None = None, raw_run_config: Sequence[str] = (), detach: bool = False,
                           emit: Callable[[str], None] = print) -> int:
    """Submit (a federation request, or a raw app with its run config), follow it, return the exit code."""
    if request is not None:
        before = len(_completed_rounds(request.out_dir)) if request.resume else 0
        run_id = submit_run(settings, request.app_dir, request.run_config())
        record_run(settings, RecordedRun(run_id, request.out_dir, request.config_file, time.time()))
        emit(f"run {run_id} submitted: {request.config_file.name}, {request.rounds} round(s); results in "
             f"{request.out_dir}")
    else:
        before = 0
        run_id = submit_run(settings, app_dir or default_app_dir(), raw_run_config)
        emit(f"run {run_id} submitted")
    if detach:
        emit(f"follow it with: FLWR_HOME={settings.flwr_home} flwr log {run_id}")
        return EXIT_COMPLETED
    out_dir = request.out_dir if request is not None else None
    try:
        status, details = follow_run(settings, run_id, out_dir, skip_rounds=before, emit=emit)
    except KeyboardInterrupt:
        emit(f"stopped following; run {run_id} goes on at the coordinator "
             f"(stop it with: FLWR_HOME={settings.flwr_home} flwr stop {run_id})")
        return EXIT_INTERRUPTED
    if status == "unreachable":
        emit(f"run {run_id}: lost contact with the SuperLink ({details}); the coordinator may have stopped")
        return EXIT_UNREACHABLE
    completed = len(_completed_rounds(out_dir))
    if out_dir is not None:
        _emit_results(out_dir, emit)
    if status != "finished:completed":
        emit(f"run {run_id} ended {status}" + (f": {details}" if details else "")
             + f"; the coordinator's log has the details (FLWR_HOME={settings.flwr_home} flwr log {run_id} --show)")
        return EXIT_FAILED
    if request is not None and completed < request.rounds:
        emit(f"run {run_id} finished after {completed} of {request.rounds} round(s); resume it with the same "
             f"command and --resume")
        return EXIT_FAILED
    return EXIT_COMPLETED


def _emit_results(out_dir: Path, emit: Callable[[str], None]) -> None:
    try:
        metrics = json.loads((out_dir / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        emit(f"results: {out_dir} (no metrics.json: no round completed)")
        return
    emit("")
    emit(format_table(metrics))
    emit("")
    emit(f"results: {out_dir} ({REPORT_FILE}, metrics.json, metrics.csv, plots/, checkpoints/)")


__all__ = ["FederationRunRequest", "RecordedRun", "follow_run", "latest_run", "prepare_request", "record_run",
           "recorded_runs", "run_federation_command", "run_status", "submit_run", "toml_value"]

