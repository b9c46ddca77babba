"""Record what each round did, per site, into ``metrics.json`` and ``metrics.csv`` (and TensorBoard).

Both files are rewritten atomically after every round, so a crash never leaves a half file
and a resumed run keeps its earlier rounds; the round's scalars are also appended to
``tensorboard/`` (``server.tensorboard_log``). ``metrics.json`` is read by other tools
(``server.report_plots``, the simulations); its schema::

    {"config": {...}, "backbone": {...},
     "rounds": [{"round": n, "wall_time_s": x, "bytes_sent": n, "bytes_received": n,
                 "sites": {site: {"status", "num_examples", "train_loss", "epsilon", "delta",
                                  "loss", "accuracy", "balanced_accuracy", "auc",
                                  "sensitivity", "specificity", "eval_num_examples",
                                  "eval_status", "bytes_sent", "bytes_received"}},
                 "aggregate": {...}, "dropped": [{"site", "reason"}]}],
     "summary": {...}}

Site names are assigned by the coordinator (``site_name(node_id)``), never taken from what a
site reports about itself. Metric keys are the wire keys with ``-`` turned into ``_``; a
train reply's ``num-examples`` is ``num_examples`` and an evaluate reply's is
``eval_num_examples``. Undefined values (NaN, not reported) are stored as ``null``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord

from common.atomic_io import atomic_write_json, atomic_write_text
from server.tensorboard_log import write_round

logger = logging.getLogger(__name__)

METRICS_JSON = "metrics.json"
METRICS_CSV = "metrics.csv"
AGGREGATE_ROW = "aggregate"  # site column of the CSV's per-round aggregate row
EVALUATE_KEYS = ("loss", "accuracy", "balanced_accuracy", "auc", "sensitivity", "specificity")
CSV_COLUMNS = (
    "round",
    "site",
    "status",
    "eval_status",
    "num_examples",
    "eval_num_examples",
    "train_loss",
    *EVALUATE_KEYS,
    "epsilon",
    "delta",
    "bytes_sent",
    "bytes_received",
    "wall_time_s",
)


def site_name(node_id: int) -> str:
    """The coordinator's name for a site: from its Flower node id, never from its data."""
    return f"site-{node_id}"


def array_record_nbytes(record: ArrayRecord) -> int:
    """Payload bytes of an ArrayRecord: the sum of its serialized Array data lengths."""
    return sum(len(array.data) for array in record.values())


class RunRecorder:
    """Collects one run's per-round, per-site records and writes them after every round.

    Parameters
    ----------
    run_dir:
        Directory for ``metrics.json`` / ``metrics.csv``.
    config:
        The run configuration as a JSON-able dict (``json.loads(config.to_json())``).
    backbone:
        Backbone description (architecture, fingerprint, ...), JSON-able.
    resume_after_round:
        ``None`` starts afresh (an existing metrics.json is overwritten). A round number
        keeps the existing file's rounds up to and including that round (the last
        checkpointed one) and drops later ones, which the resumed run will redo.
    """

    def __init__(
        self,
        run_dir: str | Path,
        config: Mapping[str, Any],
        backbone: Mapping[str, Any],
        resume_after_round: int | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.config = dict(config)
        self.backbone = dict(backbone)
        self.rounds: list[dict[str, Any]] = []
        self._open: dict[int, dict[str, Any]] = {}
        self._started: dict[int, float] = {}
        if resume_after_round is not None:
            self.rounds = self._load_rounds(resume_after_round)

    @property
    def json_path(self) -> Path:
        """Where metrics.json is written."""
        return self.run_dir / METRICS_JSON

    @property
    def csv_path(self) -> Path:
        """Where metrics.csv is written."""
        return self.run_dir / METRICS_CSV

    # ----------------------------------------------------------------------- per round

    def begin_round(self, server_round: int) -> None:
        """Start the wall clock of ``server_round``."""
        self._started[server_round] = time.monotonic()
        self._round(server_round)

    def add_bytes(self, server_round: int, site: str, sent: int = 0, received: int = 0) -> None:
        """Count bytes sent to / received from ``site`` (adds up over train and evaluate)."""
        entry = self._site(server_round, site)
        entry["bytes_sent"] += int(sent)
        entry["bytes_received"] += int(received)

    def record_train(
        self, server_round: int, site: str, status: str, metrics: Mapping[str, float] | None = None
    ) -> None:
        """Store a train reply's status and metrics (wire keys, e.g. ``train-loss``)."""
        entry = self._site(server_round, site)
        entry["status"] = status
        for key, value in (metrics or {}).items():
            entry[_field_name(key)] = _clean(value)

    def record_evaluate(
        self, server_round: int, site: str, status: str, metrics: Mapping[str, float] | None = None
    ) -> None:
        """Store an evaluate reply's status and metrics (wire keys, e.g. ``balanced-accuracy``)."""
        entry = self._site(server_round, site)
        entry["eval_status"] = status
        for key, value in (metrics or {}).items():
            name = _field_name(key)
            entry["eval_num_examples" if name == "num_examples" else name] = _clean(value)

    def record_clipped(self, server_round: int, site: str, norm: float, limit: float) -> None:
        """Note that ``site``'s update was shortened from ``norm`` to ``limit`` before aggregation."""
        self._round(server_round)["clipped"].append({"site": site, "norm": float(norm), "limit": float(limit)})

    def record_dropped(self, server_round: int, site: str, reason: str) -> None:
        """Note that ``site``'s update was not used this round, and why."""
        self._round(server_round)["dropped"].append({"site": site, "reason": reason})

    def end_round(self, server_round: int) -> dict[str, Any]:
        """Close ``server_round``: totals, weighted aggregate, wall time; write both files."""
        record = self._round(server_round)
        started = self._started.pop(server_round, None)
        record["wall_time_s"] = round(time.monotonic() - started, 6) if started is not None else None
        sites = record["sites"]
        record["bytes_sent"] = sum(s["bytes_sent"] for s in sites.values())
        record["bytes_received"] = sum(s["bytes_received"] for s in sites.values())
        record["aggregate"] = aggregate_sites(sites)
        del self._open[server_round]
        self.rounds = [r for r in self.rounds if r["round"] != server_round] + [record]
        self.rounds.sort(key=lambda r: r["round"])
        self.write()
        write_round(self.run_dir, record)
        return record

    # ------------------------------------------------------------------------- output

    def to_dict(self) -> dict[str, Any]:
        """The metrics.json document."""
        return {
            "config": self.config,
            "backbone": self.backbone,
            "rounds": self.rounds,
            "summary": summarize(self.rounds),
        }

    def write(self) -> None:
        """Atomically rewrite metrics.json and metrics.csv from the closed rounds."""
        atomic_write_json(self.json_path, self.to_dict())
        atomic_write_text(self.csv_path, to_csv(self.rounds))

    # ------------------------------------------------------------------------ helpers

    def _round(self, server_round: int) -> dict[str, Any]:
        if server_round not in self._open:
            self._open[server_round] = {
                "round": int(server_round),
                "wall_time_s": None,
                "bytes_sent": 0,
                "bytes_received": 0,
                "sites": {},
                "aggregate": {},
                "dropped": [],
                "clipped": [],
            }
        return self._open[server_round]

    def _site(self, server_round: int, site: str) -> dict[str, Any]:
        sites = self._round(server_round)["sites"]
        if site not in sites:
            sites[site] = {"status": None, "bytes_sent": 0, "bytes_received": 0}
        return sites[site]

    def _load_rounds(self, resume_after_round: int) -> list[dict[str, Any]]:
        if not self.json_path.exists():
            logger.warning("%s does not exist; the resumed run starts a new record", self.json_path)
            return []
        try:
            document = json.loads(self.json_path.read_text(encoding="utf-8"))
            rounds = list(document["rounds"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(
                f"{self.json_path}: cannot be read as a fedtl metrics file ({exc}); move it "
                "aside to start a new record"
            ) from None
        kept = [r for r in rounds if int(r["round"]) <= resume_after_round]
        if len(kept) < len(rounds):
            logger.info(
                "dropping %d recorded round(s) after round %d; they will be redone",
                len(rounds) - len(kept), resume_after_round,
            )
        return kept


def aggregate_sites(sites: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Weighted means over sites: train_loss by num_examples, evaluation metrics by
    eval_num_examples; only sites whose status is "ok" count. Also counts, sums and max epsilon.
    """
    trained = {s: e for s, e in sites.items() if e.get("status") == "ok"}
    evaluated = {s: e for s, e in sites.items() if e.get("eval_status") == "ok"}
    result: dict[str, Any] = {
        "sites_trained": len(trained),
        "sites_evaluated": len(evaluated),
        "num_examples": sum(int(e.get("num_examples") or 0) for e in trained.values()),
        "eval_num_examples": sum(int(e.get("eval_num_examples") or 0) for e in evaluated.values()),
        "train_loss": _weighted_mean(trained.values(), "train_loss", "num_examples"),
    }
    for key in EVALUATE_KEYS:
        result[key] = _weighted_mean(evaluated.values(), key, "eval_num_examples")
    epsilons = [e["epsilon"] for e in sites.values() if isinstance(e.get("epsilon"), (int, float))]
    result["max_epsilon"] = max(epsilons) if epsilons else None
    return result


def summarize(rounds: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Run-level totals: rounds done, bytes, time, final and best balanced accuracy, epsilon per site."""
    if not rounds:
        return {"rounds_completed": 0}
    best = max(
        (r for r in rounds if r["aggregate"].get("balanced_accuracy") is not None),
        key=lambda r: r["aggregate"]["balanced_accuracy"],
        default=None,
    )
    final_epsilon: dict[str, float] = {}
    delta: dict[str, float] = {}
    for record in rounds:
        for site, entry in record["sites"].items():
            if isinstance(entry.get("epsilon"), (int, float)):
                final_epsilon[site] = max(final_epsilon.get(site, 0.0), entry["epsilon"])
            if isinstance(entry.get("delta"), (int, float)) and entry["delta"] > 0:
                delta[site] = float(entry["delta"])
    return {
        "rounds_completed": len(rounds),
        "last_round": rounds[-1]["round"],
        "total_wall_time_s": sum(r["wall_time_s"] or 0.0 for r in rounds),
        "total_bytes_sent": sum(r["bytes_sent"] for r in rounds),
        "total_bytes_received": sum(r["bytes_received"] for r in rounds),
        "final": rounds[-1]["aggregate"],
        "best_balanced_accuracy": best["aggregate"]["balanced_accuracy"] if best else None,
        "best_round": best["round"] if best else None,
        "epsilon_by_site": final_epsilon,
        "max_epsilon": max(final_epsilon.values()) if final_epsilon else None,
        "delta_by_site": delta,
        "max_delta": max(delta.values()) if delta else None,
    }


def to_csv(rounds: list[Mapping[str, Any]]) -> str:
    """One row per (round, site), plus one ``aggregate`` row per round."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for record in rounds:
        for site, entry in sorted(record["sites"].items()):
            writer.writerow(_csv_row({**entry, "round": record["round"], "site": site}))
        aggregate = record["aggregate"]
        writer.writerow(
            _csv_row(
                {
                    **aggregate,
                    "round": record["round"],
                    "site": AGGREGATE_ROW,
                    "epsilon": aggregate.get("max_epsilon"),
                    "bytes_sent": record["bytes_sent"],
                    "bytes_received": record["bytes_received"],
                    "wall_time_s": record["wall_time_s"],
                }
            )
        )
    return buffer.getvalue()


def _csv_row(values: Mapping[str, Any]) -> dict[str, Any]:
    return {column: "" if values.get(column) is None else values.get(column) for column in CSV_COLUMNS}


def _weighted_mean(entries: Any, key: str, weight_key: str) -> float | None:
    pairs = [
        (float(e[key]), float(e.get(weight_key) or 0))
        for e in entries
        if isinstance(e.get(key), (int, float))
    ]
    total = sum(w for _, w in pairs)
    if total <= 0:
        return None
    return sum(v * w for v, w in pairs) / total


def _field_name(wire_key: str) -> str:
    return wire_key.replace("-", "_")


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/Inf become None, numpy scalars become Python numbers."""
    if isinstance(value, (np.generic,)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
