"""Who is who in the federation: ``fedtl-coordinator hospitals`` and ``fedtl-coordinator revoke NAME``.

The SuperLink knows every registered hospital key as a node (id, status, activation times, the name given
at registration: the key file's stem, e.g. ``north`` for ``hospitals/north.pub``). This module asks the
loopback SuperLink's Control API directly (Flower's own client, through the coordinator's connection
profile; so, like ``run``, it works on the coordinator machine only) and adds what fedtl recorded: the
last cumulative epsilon each site reported in the newest run started with ``fedtl-coordinator run``.

Revoking unregisters the node at the SuperLink (its next connection, or any SuperNode started with that
key, is refused) and moves ``NAME.pub`` to ``PKI/hospitals-revoked/`` so that a restarted coordinator
does not register it again.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from server.ops.control_client import control_client
from server.ops.coordinator_settings import CoordinatorError, CoordinatorSettings
from server.ops.run_command import latest_run

logger = logging.getLogger(__name__)

REVOKED_DIR = "hospitals-revoked"


@dataclass(frozen=True)
class HospitalEntry:
    """One hospital as the coordinator sees it.

    name : the name the key was registered with (the ``NAME.pub`` stem).
    node_id : the SuperLink's node id (what Flower's own commands and logs show).
    status : ``online``, ``offline``, ``registered`` (never connected) or ``unregistered`` (revoked).
    last_seen : when the node last connected (online) or went away (offline), ISO 8601 UTC; None if never.
    last_epsilon : the cumulative epsilon the site last reported in the newest run, if any.
    """

    name: str
    node_id: int
    status: str
    last_seen: str | None
    last_epsilon: float | None

    @property
    def online(self) -> bool:
        return self.status == "online"


def _last_epsilons(settings: CoordinatorSettings) -> dict[str, float]:
    run = latest_run(settings)
    if run is None:
        return {}
    try:
        summary = json.loads((run.out_dir / "metrics.json").read_text(encoding="utf-8")).get("summary", {})
    except (OSError, ValueError):
        return {}
    return {str(site): float(value) for site, value in summary.get("epsilon_by_site", {}).items()
            if isinstance(value, (int, float))}


def list_hospitals(settings: CoordinatorSettings, *, include_revoked: bool = True) -> list[HospitalEntry]:
    """Every hospital key the SuperLink knows, sorted by name."""
    from flwr.proto.control_pb2 import ListNodesRequest  # pylint: disable=no-name-in-module

    with control_client(settings) as client:
        nodes = list(client.ListNodes(ListNodesRequest()).nodes_info)
    epsilons = _last_epsilons(settings)
    entries = []
    for node in nodes:
        if node.status == "unregistered" and not include_revoked:
            continue
        seen = node.last_activated_at if node.status == "online" else node.last_deactivated_at
        name = node.name or f"node-{node.node_id}"
        entries.append(HospitalEntry(name=name, node_id=int(node.node_id), status=str(node.status),
                                     last_seen=seen or None, last_epsilon=epsilons.get(name)))
    return sorted(entries, key=lambda entry: (entry.name, entry.node_id))


def revoke_hospital(settings: CoordinatorSettings, name: str, pki_dir: Path | None = None) -> HospitalEntry:
    """Unregister hospital ``name`` at the SuperLink and retire its public key from the PKI directory."""
    from flwr.proto.control_pb2 import UnregisterNodeRequest  # pylint: disable=no-name-in-module

    registered = [entry for entry in list_hospitals(settings) if entry.status != "unregistered"]
    matches = [entry for entry in registered if entry.name == name]
    if not matches:
        known = ", ".join(sorted({e.name for e in registered})) or "none"
        raise CoordinatorError(f"no registered hospital is named {name!r} (registered: {known}); "
                               "'fedtl-coordinator hospitals' lists them")
    with control_client(settings) as client:
        for entry in matches:
            client.UnregisterNode(UnregisterNodeRequest(node_id=entry.node_id))
            logger.info("revoked hospital %s (node %d)", name, entry.node_id)
    pki = Path(pki_dir) if pki_dir is not None else recorded_pki_dir(settings)
    if pki is not None:
        key = pki / "hospitals" / f"{name}.pub"
        if key.exists():
            (pki / REVOKED_DIR).mkdir(exist_ok=True)
            shutil.move(str(key), str(pki / REVOKED_DIR / key.name))
            logger.info("moved %s to %s: a restarted coordinator will not register it again", key, pki / REVOKED_DIR)
    return [entry for entry in list_hospitals(settings) if entry.node_id == matches[0].node_id][0]


def recorded_pki_dir(settings: CoordinatorSettings) -> Path | None:
    """The PKI directory the running coordinator was started with (``STATE_DIR/coordinator.json``)."""
    try:
        return Path(json.loads((settings.state_dir / "coordinator.json").read_text(encoding="utf-8"))["pki_dir"])
    except (OSError, ValueError, KeyError):
        return None


def format_hospitals(entries: Sequence[HospitalEntry]) -> str:
    """The table ``fedtl-coordinator hospitals`` prints."""
    rows = [("hospital", "node id", "online", "status", "last seen (UTC)", "last epsilon")]
    for e in entries:
        rows.append((e.name, str(e.node_id), "yes" if e.online else "no", e.status,
                     (e.last_seen or "never")[:19].replace("T", " "),
                     "-" if e.last_epsilon is None else f"{e.last_epsilon:.3f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def hospitals_json(entries: Sequence[HospitalEntry]) -> str:
    return json.dumps([{**asdict(e), "online": e.online} for e in entries], indent=2)
