"""Everything a hospital site must keep across process restarts, in one state directory.

A Flower SuperNode keeps ``context.state`` in memory only; what must survive a restart lives
here, on the site's own disk, and never leaves the site.

Layout of ``<root>/``::

    ledger.json                 privacy budget (client.privacy.privacy_budget.PrivacyLedger); NEVER delete
    local_head.pt               the site's private layers (state dict + backbone fingerprint)
    global_layers.pt            the coordinator's global shared layers as last received (version id + tensors)
    rounds.json                 round bookkeeping: last round trained, status/epsilon per round
    backbones/<fingerprint>.pt  backbone cache, one file per fingerprint (tensors + metadata)
    features/<fingerprint>/     trunk-feature cache (owned by the training code), per backbone
    decoded/                    decoded-image cache (owned by the data code)

Every write is atomic (``common.atomic_io``: temporary file, fsync, rename), so a crash leaves
the previous version of a file intact. A file that is damaged anyway (disk fault, manual
editing) is handled by how much it matters:

* backbone cache: :class:`BackboneCacheError` naming the file; delete it and the site asks the
  coordinator for the backbone again (``need-backbone``).
* local head: a warning, and the head is re-initialised (the site loses its personalisation,
  not its privacy).
* global layers: a warning; the site answers ``need-global`` and gets the full weights again.
* ledger: :class:`client.privacy.privacy_budget.LedgerCorruptError`; the site refuses to train until an
  admin restores the file. A missing ledger while ``rounds.json`` shows privacy already spent
  is refused the same way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from client.privacy.privacy_budget import LedgerCorruptError, PrivacyLedger
from common.atomic_io import atomic_torch_save, atomic_write_json
from common.wire_contract import STATUS_OK, STATUS_VALUES

logger = logging.getLogger(__name__)

STATE_FORMAT_VERSION = 1
_FINGERPRINT_PATTERN = re.compile(r"^[A-Za-z0-9_:\-][A-Za-z0-9_.:\-]{0,127}$")


class SiteStateError(RuntimeError):
    """A file in the site state directory can not be used; the message says what to do."""


class BackboneCacheError(SiteStateError):
    """A cached backbone file is unreadable or does not match its fingerprint."""


def tensor_fingerprint(tensors: Mapping[str, torch.Tensor]) -> str:
    """The backbone fingerprint of ``tensors``: ``common.models.model_weights.fingerprint`` if present.

    Falls back to a local SHA-256 over names, dtypes, shapes and bytes only while that module
    does not exist yet.

    Args:
        tensors: parameter/buffer name -> tensor.
    """
    return _fingerprint_function()(tensors)


def _fingerprint_function() -> Callable[[Mapping[str, torch.Tensor]], str]:
    try:
        from common.models.model_weights import fingerprint
    except ImportError:
        return _sha256_fingerprint
    return fingerprint


def _sha256_fingerprint(tensors: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(name.encode("utf-8"))
        digest.update(str(tensor.dtype).encode("utf-8"))
        digest.update(str(tuple(tensor.shape)).encode("utf-8"))
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class SiteState:
    """One site's state directory (see the module docstring for the layout).

    Args:
        root: the directory; created if missing. One directory per site, never shared.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        for directory in (self.root, self.backbones_dir, self.features_dir, self.decoded_dir):
            directory.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ paths
    @property
    def ledger_path(self) -> Path:
        """``ledger.json``: the privacy budget."""
        return self.root / "ledger.json"

    @property
    def local_head_path(self) -> Path:
        """``local_head.pt``: the site's private layers."""
        return self.root / "local_head.pt"

    @property
    def personal_head_path(self) -> Path:
        """``personal_head.pt``: the site's own linear probe on the global features (never sent)."""
        return self.root / "personal_head.pt"

    @property
    def global_layers_path(self) -> Path:
        """``global_layers.pt``: the coordinator's global shared layers the site holds."""
        return self.root / "global_layers.pt"

    @property
    def rounds_path(self) -> Path:
        """``rounds.json``: round bookkeeping."""
        return self.root / "rounds.json"

    @property
    def backbones_dir(self) -> Path:
        """``backbones/``: backbone cache keyed by fingerprint."""
        return self.root / "backbones"

    @property
    def features_dir(self) -> Path:
        """``features/``: trunk-feature cache."""
        return self.root / "features"

    @property
    def decoded_dir(self) -> Path:
        """``decoded/``: decoded-image cache."""
        return self.root / "decoded"

    def features_dir_for(self, fingerprint: str) -> Path:
        """``features/<fingerprint>/``: trunk features are only valid for one backbone."""
        directory = self.features_dir / _checked_fingerprint(fingerprint)
        directory.mkdir(parents=True, exist_ok=True)
        return directory

    def backbone_path(self, fingerprint: str) -> Path:
        """``backbones/<fingerprint>.pt``; the fingerprint comes from the coordinator, so it is
        checked to be a plain name (no path separators)."""
        return self.backbones_dir / f"{_checked_fingerprint(fingerprint)}.pt"

    # ------------------------------------------------------------------ privacy ledger
    def open_ledger(
        self,
        *,
        target_epsilon: float,
        delta: float,
        sample_rate: float,
        planned_steps: int,
        accountant: str = "rdp",
        unit: str = "image",
    ) -> PrivacyLedger:
        """Resume or create ``ledger.json`` (see :meth:`PrivacyLedger.load_or_create`).

        Refuses to create a new ledger when ``rounds.json`` shows that privacy was already
        spent: a deleted ledger must not reset the budget.
        """
        if not self.ledger_path.exists():
            spent = [entry for entry in self.round_history() if (entry.get("epsilon") or 0) > 0]
            if spent:
                raise LedgerCorruptError(
                    f"privacy ledger {self.ledger_path} is missing, but {self.rounds_path} shows "
                    f"{len(spent)} round(s) that spent privacy (last epsilon "
                    f"{spent[-1]['epsilon']:.3f}). The site refuses to train, because a new ledger "
                    "would forget that budget. Restore ledger.json from a backup."
                )
        return PrivacyLedger.load_or_create(
            self.ledger_path,
            target_epsilon=target_epsilon,
            delta=delta,
            sample_rate=sample_rate,
            planned_steps=planned_steps,
            accountant=accountant,  # type: ignore[arg-type]
            unit=unit,
        )

    # ------------------------------------------------------------------ local head
    def save_local_head(
        self, state_dict: Mapping[str, torch.Tensor], *, backbone_fingerprint: str | None = None
    ) -> None:
        """Store the site's private layers atomically.

        Args:
            state_dict: name -> tensor of the local (never shared) layers.
            backbone_fingerprint: the backbone the head was trained on; a later load for
                another backbone re-initialises instead of loading mismatched weights.
        """
        payload = {
            "format_version": STATE_FORMAT_VERSION,
            "backbone_fingerprint": backbone_fingerprint,
            "state_dict": {name: tensor.detach().to("cpu") for name, tensor in state_dict.items()},
        }
        atomic_torch_save(self.local_head_path, payload)

    def local_head_stamp(self) -> tuple[int, int, int] | None:
        """(inode, size, mtime in ns) of the local-head file, ``None`` when absent: changes with every save."""
        try:
            info = self.local_head_path.stat()
        except FileNotFoundError:
            return None
        return (info.st_ino, info.st_size, info.st_mtime_ns)

    def load_local_head(
        self, *, backbone_fingerprint: str | None = None
    ) -> dict[str, torch.Tensor] | None:
        """The stored local head, or ``None`` (re-initialise) when absent, damaged or stale.

        Args:
            backbone_fingerprint: when given, a head saved for another backbone is not loaded.
        """
        path = self.local_head_path
        if not path.exists():
            return None
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            state_dict = payload["state_dict"]
            saved_for = payload.get("backbone_fingerprint")
        except Exception as error:  # torch.load raises many types for a damaged zip/pickle
            logger.warning(
                "local head %s is unreadable (%s: %s); the local head is re-initialised and the "
                "next round overwrites the file",
                path,
                type(error).__name__,
                error,
            )
            return None
        if backbone_fingerprint is not None and saved_for not in (None, backbone_fingerprint):
            logger.warning(
                "local head %s was trained on backbone %s, the site now uses %s; the local head is "
                "re-initialised",
                path,
                saved_for,
                backbone_fingerprint,
            )
            return None
        return dict(state_dict)

    # ------------------------------------------------------------------ personal head
    def save_personal_head(self, state_dict: Mapping[str, torch.Tensor], *, global_id: str,
                           backbone_fingerprint: str) -> None:
        """Store the personal head with the global layers and backbone it was fitted on."""
        atomic_torch_save(self.personal_head_path, {
            "format_version": STATE_FORMAT_VERSION,
            "backbone_fingerprint": backbone_fingerprint,
            "global_id": global_id,
            "state_dict": {name: tensor.detach().to("cpu") for name, tensor in state_dict.items()},
        })

    def load_personal_head(self) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        """The stored personal head and what it was fitted on, or ``None`` when absent or unreadable."""
        path = self.personal_head_path
        if not path.exists():
            return None
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            return dict(payload["state_dict"]), {"global_id": str(payload["global_id"]),
                                                 "backbone_fingerprint": str(payload["backbone_fingerprint"])}
        except Exception as error:  # torch.load raises many types for a damaged zip/pickle
            logger.warning("personal head %s is unreadable (%s); it is fitted again at the next evaluation",
                           path, type(error).__name__)
            return None

    # ------------------------------------------------------------------ backbone cache
    def has_backbone(self, fingerprint: str) -> bool:
        """Whether a file for ``fingerprint`` is cached (its content is checked on load)."""
        return self.backbone_path(fingerprint).is_file()

    def cached_backbones(self) -> list[str]:
        """Fingerprints of all cached backbone files."""
        return sorted(path.stem for path in self.backbones_dir.glob("*.pt"))

    def store_backbone(
        self,
        fingerprint: str,
        tensors: Mapping[str, torch.Tensor],
        meta: Mapping[str, Any] | None = None,
    ) -> Path:
        """Cache a backbone received from the coordinator; returns the file written.

        Args:
            fingerprint: the fingerprint the coordinator announced; the tensors must match it.
            tensors: name -> tensor (frozen and initial shared layers).
            meta: JSON-like metadata (architecture, weights name, ...).
        """
        path = self.backbone_path(fingerprint)
        actual = tensor_fingerprint(tensors)
        if actual != fingerprint:
            raise BackboneCacheError(
                f"the backbone received for {fingerprint} has fingerprint {actual}; it was not "
                f"cached at {path}. The transfer was damaged or the coordinator announced the "
                "wrong fingerprint: ask the coordinator to send the backbone again."
            )
        meta_dict = dict(meta or {})
        try:
            json.dumps(meta_dict)
        except TypeError as error:
            raise TypeError(
                f"backbone metadata for {fingerprint} must be JSON-like (str, numbers, lists, "
                f"dicts): {error}"
            ) from error
        payload = {
            "format_version": STATE_FORMAT_VERSION,
            "fingerprint": fingerprint,
            "meta": meta_dict,
            "tensors": {name: tensor.detach().to("cpu") for name, tensor in tensors.items()},
        }
        atomic_torch_save(path, payload)
        logger.info("cached backbone %s at %s", fingerprint, path)
        return path

    def load_backbone(
        self, fingerprint: str
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """``(tensors, meta)`` of a cached backbone, or ``None`` when it is not cached.

        Raises :class:`BackboneCacheError` when the file is damaged or its content does not
        match ``fingerprint``.

        Args:
            fingerprint: the backbone fingerprint the coordinator asks for.
        """
        path = self.backbone_path(fingerprint)
        if not path.exists():
            return None
        advice = (
            f"Delete {path}; the site then answers 'need-backbone' and the coordinator sends "
            "the backbone again."
        )
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            tensors = dict(payload["tensors"])
            meta = dict(payload["meta"])
        except Exception as error:  # torch.load raises many types for a damaged zip/pickle
            raise BackboneCacheError(
                f"backbone cache file {path} is corrupt ({type(error).__name__}: {error}). {advice}"
            ) from error
        actual = tensor_fingerprint(tensors)
        if actual != fingerprint:
            raise BackboneCacheError(
                f"backbone cache file {path} holds tensors with fingerprint {actual}, not "
                f"{fingerprint}. {advice}"
            )
        return tensors, meta

    # ------------------------------------------------------------------ global layers
    def store_global_layers(self, version_id: str, tensors: Mapping[str, torch.Tensor]) -> None:
        """Keep the coordinator's global shared layers of version ``version_id`` (atomic write)."""
        payload = {
            "format_version": STATE_FORMAT_VERSION,
            "version_id": str(version_id),
            "tensors": {name: tensor.detach().to("cpu") for name, tensor in tensors.items()},
        }
        atomic_torch_save(self.global_layers_path, payload)

    def load_global_layers(self) -> tuple[str, dict[str, torch.Tensor]] | None:
        """``(version_id, tensors)`` of the global layers held, or ``None`` (none yet, or damaged)."""
        path = self.global_layers_path
        if not path.exists():
            return None
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            return str(payload["version_id"]), dict(payload["tensors"])
        except Exception as error:  # torch.load raises many types for a damaged zip/pickle
            logger.warning("global layers file %s is unreadable (%s); the site will ask the coordinator "
                           "for the full global layers", path, type(error).__name__)
            return None

    # ------------------------------------------------------------------ round bookkeeping
    def record_round(
        self,
        server_round: int,
        status: str,
        *,
        epsilon: float | None = None,
        delta: float | None = None,
        num_examples: int | None = None,
        steps: int | None = None,
    ) -> None:
        """Append one training round's outcome to ``rounds.json``.

        Args:
            server_round: the coordinator's round number.
            status: one of ``common.wire_contract.STATUS_VALUES``.
            epsilon: cumulative epsilon after the round (privacy ledger), if DP is on.
            delta: the site's delta.
            num_examples: training examples at the site.
            steps: DP-SGD/SGD steps taken this round.
        """
        if status not in STATUS_VALUES:
            raise ValueError(f"status must be one of {sorted(STATUS_VALUES)}, got {status!r}")
        document = self._read_rounds()
        document["history"].append(
            {
                "round": int(server_round),
                "status": status,
                "epsilon": None if epsilon is None else float(epsilon),
                "delta": None if delta is None else float(delta),
                "num_examples": None if num_examples is None else int(num_examples),
                "steps": None if steps is None else int(steps),
            }
        )
        if status == STATUS_OK:
            previous = document["last_trained_round"]
            document["last_trained_round"] = max(int(server_round), previous or 0)
        atomic_write_json(self.rounds_path, document)

    def last_trained_round(self) -> int | None:
        """The highest round this site trained successfully, or ``None``."""
        return self._read_rounds()["last_trained_round"]

    def round_history(self) -> list[dict[str, Any]]:
        """All recorded rounds, oldest first (dicts with round/status/epsilon/delta/...)."""
        return list(self._read_rounds()["history"])

    def _read_rounds(self) -> dict[str, Any]:
        path = self.rounds_path
        if not path.exists():
            return {"format_version": STATE_FORMAT_VERSION, "last_trained_round": None, "history": []}
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(document["history"], list):
                raise TypeError("'history' is not a list")
            document["last_trained_round"]  # noqa: B018 - presence check
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
            raise SiteStateError(
                f"round bookkeeping {path} is corrupt ({type(error).__name__}: {error}). It holds "
                "no privacy budget (that is ledger.json); move it aside to continue, after "
                "checking that ledger.json is intact."
            ) from error
        return document


def _checked_fingerprint(fingerprint: str) -> str:
    if not isinstance(fingerprint, str) or not _FINGERPRINT_PATTERN.match(fingerprint):
        raise ValueError(
            f"backbone fingerprint {fingerprint!r} is not a plain name (letters, digits, '_', "
            "'-', ':', '.'; at most 128 characters); refusing to use it as a cache file name"
        )
    return fingerprint
