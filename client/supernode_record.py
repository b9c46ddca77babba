"""Where the hospital daemon records what it started and when the site was last connected.

``STATE_DIR/supernode.json`` is read by ``fedtl-hospital health`` (``pid``: the running
``flower-supernode``) and by the next ``fedtl-hospital start`` (``alive_at``: the last moment the
site was known connected, so that a restart right after a crash can tell Flower's heartbeat window
from a refused key; see :mod:`client.rejoin_policy`).

Kept free of heavy imports: ``fedtl-hospital start`` must not load torch.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

DAEMON_RECORD = "supernode.json"
"""File name, in the site's state directory, of the daemon's record (command, ports, settings; no secrets)."""


def read_record(path: Path) -> dict[str, Any]:
    """The record at ``path``, or ``{}`` when there is none or it cannot be read."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return document if isinstance(document, dict) else {}


def write_record(path: Path, record: dict[str, Any]) -> None:
    """Replace the record atomically (a reader never sees half a file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2), encoding="utf-8")
    os.replace(tmp, path)


def key_identity(private_key: Path) -> str:
    """A digest of the site's key file: the record's ``alive_at`` only counts for the same key."""
    try:
        return hashlib.sha256(private_key.read_bytes()).hexdigest()[:16]
    except OSError:
        return ""
