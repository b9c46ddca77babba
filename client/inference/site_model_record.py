"""``site_model.json``: what a site's usable model is, beside the tensors in its state directory.

The tensors (backbone, global shared layers, personal head, local head) are in the files
``client.site_state`` keeps; this record adds what a hospital needs to *use* them and that no tensor
file holds: the federation configuration the model was built with (architecture, image size, classes,
layer policy, frame policy), which global layers and backbone the personal head was fitted on, the
operating point chosen on the site's validation patients, and the site's test metrics with their
intervals. The site writes it when it fits its personal head (the end of every evaluation, so after
the last round it describes the final model) and when it evaluates that head on its test patients.

Nothing in it leaves the site.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Mapping

from client.inference.operating_point import OperatingPoint
from common.atomic_io import atomic_write_json
from common.config import FederationConfig

SITE_MODEL_FILE = "site_model.json"
RECORD_FORMAT_VERSION = 1


class SiteModelError(RuntimeError):
    """The state directory does not hold a usable model; the message names the missing file and the fix."""


def record_path(state_dir: str | Path) -> Path:
    return Path(state_dir) / SITE_MODEL_FILE


def record_fit(
    state_dir: str | Path, *, config: FederationConfig, backbone_fingerprint: str, global_id: str,
    last_trained_round: int | None, operating_point: OperatingPoint,
) -> None:
    """Write the record of a newly fitted personal head (its test metrics follow with :func:`record_test_metrics`)."""
    atomic_write_json(record_path(state_dir), {
        "format_version": RECORD_FORMAT_VERSION,
        "config": json.loads(config.to_json()),
        "backbone_fingerprint": backbone_fingerprint,
        "global_id": global_id,
        "last_trained_round": last_trained_round,
        "head": config.training.personal_head,
        "operating_point": operating_point.to_dict(),
        "fitted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "test_metrics": None,
    })


def record_test_metrics(state_dir: str | Path, *, global_id: str, metrics: Mapping[str, float]) -> None:
    """Add the site's test metrics of the model recorded for ``global_id`` (ignored for another model)."""
    path = record_path(state_dir)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if record.get("global_id") != global_id:
        return
    record["test_metrics"] = {key.replace("-", "_"): float(value) for key, value in metrics.items()}
    atomic_write_json(path, record)


def read_record(state_dir: str | Path) -> dict[str, Any]:
    """The record, checked; raises :class:`SiteModelError` saying what to do when it is missing or damaged."""
    path = record_path(state_dir)
    if not path.is_file():
        raise SiteModelError(
            f"{path} is missing: this state directory holds no finished site model. The site writes it when it "
            "fits its personal head after an evaluation round; run (or finish) a federation with this site, or "
            "pass the --state-dir of a site that took part in one."
        )
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        record["config"] = FederationConfig.model_validate(record["config"])
        record["operating_point"] = OperatingPoint.from_dict(record["operating_point"])
        for key in ("backbone_fingerprint", "global_id", "head"):
            record[key] = str(record[key])
    except Exception as error:  # damaged JSON or a field missing: one message, the fix
        raise SiteModelError(
            f"{path} is damaged ({type(error).__name__}: {error}); it is rewritten at the site's next evaluation "
            "round. Restore it from a backup to use the model now."
        ) from error
    return record
