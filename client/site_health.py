"""``fedtl-hospital health``: what a hospital admin needs to know at a glance.

* connected: the SuperNode started by ``fedtl-hospital start`` is alive (pid from
  ``STATE_DIR/supernode.json``, checked to still be a ``flower-supernode``) AND the coordinator
  answers ``GET /health`` over TLS verified against the federation CA;
* backbone: the fingerprint(s) cached under ``STATE_DIR/backbones/<fingerprint>.pt`` (newest first);
* privacy budget: target, spent and remaining epsilon from ``STATE_DIR/ledger.json``
  (:class:`client.privacy.privacy_budget.PrivacyLedger`, read-only).

Exit code 0 when connected, 1 otherwise, so it can serve as a container health check.
Nothing here writes to the state directory.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import shutil
import ssl
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from client.supernode_record import DAEMON_RECORD

logger = logging.getLogger(__name__)

LEDGER_FILE = "ledger.json"
BACKBONES_DIR = "backbones"
PROBE_TIMEOUT_S = 5.0


@dataclass
class PrivacyStatus:
    """The site's privacy budget as the ledger reports it; ``error`` says why a value is missing."""

    target_epsilon: float | None = None
    spent_epsilon: float | None = None
    remaining_epsilon: float | None = None
    delta: float | None = None
    unit: str | None = None
    error: str | None = None
    warning: str | None = None


@dataclass
class SiteHealth:
    """Everything ``fedtl-hospital health`` reports."""

    state_dir: str
    supernode_pid: int | None = None
    supernode_alive: bool = False
    superlink: str | None = None
    superlink_reachable: bool = False
    superlink_error: str | None = None
    backbone_fingerprints: list[str] = field(default_factory=list)
    privacy: PrivacyStatus = field(default_factory=PrivacyStatus)

    @property
    def connected(self) -> bool:
        return self.supernode_alive and self.superlink_reachable


def process_is_supernode(pid: int) -> bool:
    """True when ``pid`` runs and is a ``flower-supernode`` (a reused pid does not count)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc (not Linux): trust the signal probe
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
        if status.rsplit(")", 1)[-1].split()[0] == "Z":
            return False
    except (OSError, IndexError):
        pass
    return b"flower-supernode" in cmdline


def probe_superlink(address: str, ca_cert: Path, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """``None`` when ``https://address/health`` answers 200 with a certificate the CA vouches for, else why not."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        context = ssl.create_default_context(cafile=str(ca_cert))
        connection = http.client.HTTPSConnection(host, int(port), context=context, timeout=timeout_s)
        try:
            connection.request("GET", "/health")
            status = connection.getresponse().status
        finally:
            connection.close()
    except (OSError, ValueError, http.client.HTTPException) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None if status == 200 else f"HTTP {status}"


def backbone_fingerprints(state_dir: Path) -> list[str]:
    """Fingerprints of the cached backbones, newest first."""
    directory = state_dir / BACKBONES_DIR
    if not directory.is_dir():
        return []
    files = sorted(directory.glob("*.pt"), key=lambda p: p.stat().st_mtime, reverse=True)
    return [p.stem for p in files]


def privacy_status(state_dir: Path) -> PrivacyStatus:
    """Read the ledger without changing it; every failure becomes a readable ``error``."""
    path = state_dir / LEDGER_FILE
    if not path.exists():
        return PrivacyStatus(error=f"{path} does not exist yet (no private round trained)")
    try:
        from client.privacy.privacy_budget import PrivacyLedger  # heavy (Opacus); only when a ledger exists

        # PrivacyLedger.load settles a pending reservation by rewriting the file; a running round
        # owns that file, so the health check loads a private copy and never writes the real one.
        with tempfile.TemporaryDirectory(prefix="fedtl-health-") as scratch:
            copy = Path(scratch) / LEDGER_FILE
            shutil.copyfile(path, copy)
            ledger = PrivacyLedger.load(copy)
            spent = float(ledger.spent_epsilon())
            target = float(ledger.target_epsilon)
            delta = float(ledger.delta)
            unit = ledger.unit
        return PrivacyStatus(target, spent, max(target - spent, 0.0), delta, unit, warning=_reset_warning(state_dir, spent))
    except Exception as exc:  # noqa: BLE001 - the health report must survive any ledger problem
        target = _target_from_raw(path)
        return PrivacyStatus(target_epsilon=target, error=f"{type(exc).__name__}: {exc}")


def _reset_warning(state_dir: Path, spent: float) -> str | None:
    """A ledger that has spent less than the site's own round records say it did was reset."""
    from client.site_state import SiteState

    try:
        recorded = [float(entry["epsilon"]) for entry in SiteState(state_dir).round_history()
                    if isinstance(entry.get("epsilon"), (int, float))]
    except Exception:  # noqa: BLE001 - a damaged rounds.json is the state check's to report
        return None
    if recorded and spent < max(recorded) * (1 - 1e-6) - 1e-6:
        return (f"the ledger has spent epsilon {spent:.3f}, but this site's rounds.json records {max(recorded):.3f}: "
                "ledger.json was reset or replaced. The coordinator excludes this site's updates until the "
                "original ledger is restored from a backup")
    return None


def _target_from_raw(path: Path) -> float | None:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        body = document.get("ledger", document)
        return float(body["target_epsilon"])
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


def check_site(state_dir: Path, superlink: str | None = None, ca_cert: Path | None = None) -> SiteHealth:
    """Collect the site's health; ``superlink``/``ca_cert`` default to what the daemon recorded."""
    health = SiteHealth(state_dir=str(state_dir))
    record: dict[str, object] = {}
    record_path = state_dir / DAEMON_RECORD
    if record_path.exists():
        try:
            record = json.loads(record_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            health.superlink_error = f"{record_path} unreadable: {exc}"
    pid = record.get("pid")
    if isinstance(pid, int):
        health.supernode_pid = pid
        health.supernode_alive = process_is_supernode(pid)
    superlink = superlink or (str(record["superlink"]) if "superlink" in record else None)
    ca_path = ca_cert or (Path(str(record["ca_cert"])) if "ca_cert" in record else None)
    health.superlink = superlink
    if superlink is None or ca_path is None:
        health.superlink_error = health.superlink_error or (
            f"no {record_path}: start the site with 'fedtl-hospital start' or pass --superlink and --ca"
        )
    else:
        health.superlink_error = probe_superlink(superlink, ca_path)
        health.superlink_reachable = health.superlink_error is None
    health.backbone_fingerprints = backbone_fingerprints(state_dir)
    health.privacy = privacy_status(state_dir)
    return health


def render(health: SiteHealth) -> str:
    """The report as a few lines for a human."""
    lines = [f"site state      {health.state_dir}"]
    verdict = "CONNECTED" if health.connected else "NOT CONNECTED"
    lines.append(f"federation      {verdict}")
    alive = "running" if health.supernode_alive else "not running"
    lines.append(f"  supernode     {alive} (pid {health.supernode_pid if health.supernode_pid else '-'})")
    reach = "reachable over TLS" if health.superlink_reachable else f"unreachable ({health.superlink_error})"
    lines.append(f"  coordinator   {health.superlink or '-'}: {reach}")
    if health.backbone_fingerprints:
        newest, *older = health.backbone_fingerprints
        lines.append(f"backbone        {newest}" + (f" (+{len(older)} older cached)" if older else ""))
    else:
        lines.append("backbone        none cached yet")
    p = health.privacy
    if p.spent_epsilon is not None and p.target_epsilon is not None:
        lines.append(
            f"privacy budget  epsilon spent {p.spent_epsilon:.3f} of {p.target_epsilon:.3f}, "
            f"{p.remaining_epsilon:.3f} left (delta {p.delta:.3g}; unit: one {p.unit or 'image'})"
        )
        if p.warning:
            lines.append(f"  WARNING       {p.warning}")
    else:
        target = f"target epsilon {p.target_epsilon}; " if p.target_epsilon is not None else ""
        lines.append(f"privacy budget  {target}{p.error}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``fedtl-hospital health``: prints the report; exit 0 when connected, 1 when not."""
    parser = argparse.ArgumentParser(prog="fedtl-hospital health", description="Is this site part of the federation?")
    parser.add_argument("--state-dir", required=True, type=Path, help="the site's state directory")
    parser.add_argument("--superlink", default=None, help="coordinator HOST:PORT (default: as started)")
    parser.add_argument("--ca", type=Path, default=None, help="federation ca.crt (default: as started)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    health = check_site(args.state_dir, args.superlink, args.ca)
    if args.json:
        print(json.dumps({**asdict(health), "connected": health.connected}, indent=2))
    else:
        print(render(health))
    return 0 if health.connected else 1


if __name__ == "__main__":
    raise SystemExit(main())
