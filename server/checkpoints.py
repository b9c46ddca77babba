"""Coordinator checkpoints: one file per completed round, so ``--resume`` continues a run.

Layout under ``run_dir/checkpoints/``::

    round-<n>.pt   global shared tensors, round number, aggregator state, backbone
                   fingerprint and the run configuration (JSON)
    latest.json    {"round": n, "file": "round-<n>.pt"} -- the last completed round

Both are written atomically (``common.atomic_io``), checkpoint first and pointer second, so
a crash at any moment leaves the previous round loadable. Only the last ``keep_last`` round
files are kept.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.atomic_io import atomic_torch_save, atomic_write_json
from common.config import FederationConfig

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LATEST_FILE = "latest.json"
FORMAT_VERSION = 1
# Settings that may change between a run and its resumption (they do not change what the
# checkpoint means): more rounds, another timeout, another device.
RESUMABLE_CHANGES: frozenset[str] = frozenset(
    {"training.rounds", "strategy.round_timeout_s", "training.device"}
)
_ROUND_FILE = re.compile(r"^round-(\d+)\.pt$")


class CheckpointMismatchError(RuntimeError):
    """A checkpoint belongs to another configuration or backbone than the resumed run."""


class CheckpointReadError(RuntimeError):
    """No checkpoint of a run directory can be read."""


@dataclass(frozen=True)
class Checkpoint:
    """A completed round's coordinator state."""

    round: int
    global_weights: dict[str, torch.Tensor]
    aggregator_state: dict[str, Any]
    backbone_fingerprint: str
    config_json: str
    path: Path

    @property
    def config(self) -> FederationConfig:
        """The configuration the checkpoint was written with."""
        return FederationConfig.from_json(self.config_json)


def checkpoint_dir(run_dir: str | Path) -> Path:
    """Where a run keeps its checkpoints."""
    return Path(run_dir) / CHECKPOINT_DIR


def save_checkpoint(
    run_dir: str | Path,
    server_round: int,
    global_weights: Mapping[str, torch.Tensor],
    aggregator_state: Mapping[str, Any],
    backbone_fingerprint: str,
    config: FederationConfig,
    keep_last: int = 3,
) -> Path:
    """Write ``round-<server_round>.pt``, point ``latest.json`` at it, prune older rounds.

    Parameters
    ----------
    run_dir:
        The run's output directory.
    server_round:
        The round just completed (1-based).
    global_weights:
        Global shared tensors after this round's aggregation.
    aggregator_state:
        ``Aggregator.state_dict()`` (e.g. FedAdam moments).
    backbone_fingerprint:
        Fingerprint of the frozen backbone every site must hold.
    config:
        The run configuration.
    keep_last:
        How many round files to keep (>= 1).
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    directory = checkpoint_dir(run_dir)
    file_name = f"round-{server_round}.pt"
    payload = {
        "format_version": FORMAT_VERSION,
        "round": int(server_round),
        "global_weights": {k: v.detach().cpu().clone() for k, v in global_weights.items()},
        "aggregator_state": dict(aggregator_state),
        "backbone_fingerprint": backbone_fingerprint,
        "config_json": config.to_json(),
    }
    path = directory / file_name
    atomic_torch_save(path, payload)
    atomic_write_json(directory / LATEST_FILE, {"round": int(server_round), "file": file_name})
    logger.info("checkpoint for round %d written to %s", server_round, path)
    _prune(directory, keep_last, protect=path)
    return path


def latest_checkpoint(
    run_dir: str | Path,
    config: FederationConfig | None = None,
    backbone_fingerprint: str | None = None,
) -> Checkpoint | None:
    """Load the last completed round's checkpoint, or ``None`` when the run has none.

    When ``config`` / ``backbone_fingerprint`` are given, the checkpoint must match them
    (except the settings in ``RESUMABLE_CHANGES``); otherwise CheckpointMismatchError names
    the differing field. If the file ``latest.json`` points at cannot be read, the newest
    readable older round is used (with a warning).
    """
    directory = checkpoint_dir(run_dir)
    candidates = _candidate_files(directory)
    if not candidates:
        return None
    problems: list[str] = []
    for path in candidates:
        try:
            checkpoint = _load(path)
        except Exception as exc:  # noqa: BLE001 - a damaged file: try the previous round
            problems.append(f"{path.name}: {exc}")
            logger.warning("checkpoint %s cannot be read (%s); trying an older one", path, exc)
            continue
        if config is not None:
            check_config_matches(checkpoint, config)
        if backbone_fingerprint is not None and checkpoint.backbone_fingerprint != backbone_fingerprint:
            raise CheckpointMismatchError(
                f"{path}: written with backbone fingerprint {checkpoint.backbone_fingerprint!r}, but "
                f"this run's backbone is {backbone_fingerprint!r}. Resume with the original backbone "
                f"(model.weights / model.checkpoint), or start a new run in a fresh run directory."
            )
        return checkpoint
    raise CheckpointReadError(
        f"{directory}: no checkpoint can be read ({'; '.join(problems)}). Start a new run in a "
        "fresh run directory, or restore the checkpoint files from a backup."
    )


def check_config_matches(checkpoint: Checkpoint, config: FederationConfig) -> None:
    """Raise CheckpointMismatchError if ``config`` differs from the checkpoint's in a way that matters."""
    saved = _flatten(json.loads(checkpoint.config_json))
    current = _flatten(json.loads(config.to_json()))
    differing = sorted(
        key
        for key in set(saved) | set(current)
        if key not in RESUMABLE_CHANGES and saved.get(key, "<absent>") != current.get(key, "<absent>")
    )
    if differing:
        details = "; ".join(
            f"{key}: checkpoint has {saved.get(key, '<absent>')!r}, this run has "
            f"{current.get(key, '<absent>')!r}"
            for key in differing
        )
        raise CheckpointMismatchError(
            f"{checkpoint.path}: cannot resume, the configuration differs ({details}). Resume with "
            f"the configuration the run started with (only {sorted(RESUMABLE_CHANGES)} may change), "
            "or start a new run in a fresh run directory."
        )


def _candidate_files(directory: Path) -> list[Path]:
    """Round files, the one latest.json names first, then the others newest first."""
    rounds = sorted(
        (int(match.group(1)), directory / name)
        for name in (p.name for p in directory.glob("round-*.pt"))
        if (match := _ROUND_FILE.match(name))
    )
    ordered = [path for _, path in reversed(rounds)]
    pointer = directory / LATEST_FILE
    if pointer.exists():
        try:
            named = directory / json.loads(pointer.read_text(encoding="utf-8"))["file"]
        except (ValueError, KeyError, TypeError) as exc:
            logger.warning("%s is unreadable (%s); using the newest round file", pointer, exc)
        else:
            if named in ordered:
                # Rounds newer than the pointer were written but never confirmed: skip them.
                ordered = ordered[ordered.index(named):]
            else:
                logger.warning("%s names %s, which does not exist", pointer, named.name)
    return ordered


def _load(path: Path) -> Checkpoint:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"unknown checkpoint format {payload.get('format_version')!r}")
    return Checkpoint(
        round=int(payload["round"]),
        global_weights=dict(payload["global_weights"]),
        aggregator_state=dict(payload["aggregator_state"]),
        backbone_fingerprint=str(payload["backbone_fingerprint"]),
        config_json=str(payload["config_json"]),
        path=path,
    )


def _prune(directory: Path, keep_last: int, protect: Path) -> None:
    rounds = sorted(
        (int(match.group(1)), directory / name)
        for name in (p.name for p in directory.glob("round-*.pt"))
        if (match := _ROUND_FILE.match(name))
    )
    for _, path in rounds[:-keep_last]:
        if path != protect:
            path.unlink(missing_ok=True)
            logger.debug("pruned old checkpoint %s", path)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
