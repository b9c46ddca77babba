"""Check every site reply against the wire contract before it can touch the global model.

The stock Flower strategies end the whole run on one inconsistent reply. The coordinator
instead validates each reply on its own: a bad hospital is dropped from the round (with a
reason for the log), the federation goes on.

Three outcomes per reply:

* ``ValidReply`` / ``ValidEvaluation`` -- the reply follows ``common.wire_contract`` and can
  be aggregated / recorded.
* ``Declined`` -- the site answered properly but did not train: its privacy budget is spent
  (``declined-budget``), it has no backbone yet (``need-backbone``) or its copy of the global
  layers does not match the delta it was sent (``need-global``). Not a failure.
* ``Rejection`` -- anything else: a contract violation, a NaN, a site-reported failure, a
  Flower error message. ``reason`` names the record/field and what is wrong.

Every outcome except Rejection carries the STATUS record's ``site_name`` (the name the site's
admin configured; checked to be plain text) and backbone ``fingerprint`` when sent.

Decoding fp16/int8 updates is left to the caller (``common.wire.update_encoding.decode_update``);
``ValidReply`` has the ``.tensors`` and ``.scales`` that function reads.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, TypeAlias

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode

from common import wire_contract as wc

logger = logging.getLogger(__name__)

Encoding = Literal["fp32", "fp16", "int8"]

# Keys a STATUS ConfigRecord may carry (the contract names no others).
STATUS_RECORD_KEYS: frozenset[str] = frozenset(
    {wc.STATUS_KEY, wc.STATUS_FINGERPRINT, wc.STATUS_SITE_NAME, wc.STATUS_GLOBAL_ID}
)
_MAX_SITE_NAME = 64
# Evaluation rates that may be NaN when undefined (e.g. a test split with one class only).
_RATE_METRICS: frozenset[str] = frozenset(
    {"accuracy", "balanced-accuracy", "auc", "sensitivity", "specificity"}
)
_WIRE_DTYPES: dict[str, np.dtype] = {
    "fp32": np.dtype(np.float32),
    "fp16": np.dtype(np.float16),
    "int8": np.dtype(np.int8),
}
_MAX_LISTED = 5  # how many offending keys a reason lists before "..."


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype a shared tensor has in the global model (not on the wire)."""

    shape: tuple[int, ...]
    dtype: np.dtype

    @classmethod
    def of(cls, value: np.ndarray | torch.Tensor | TensorSpec) -> TensorSpec:
        """Describe ``value`` (a global-model tensor, an array or an existing spec)."""
        if isinstance(value, TensorSpec):
            return value
        if isinstance(value, torch.Tensor):
            name = str(value.dtype).removeprefix("torch.")
            try:
                dtype = np.dtype(name)
            except TypeError:
                raise TypeError(
                    f"shared tensor dtype {value.dtype} has no numpy equivalent; "
                    "keep shared layers in float32"
                ) from None
            return cls(tuple(value.shape), dtype)
        array = np.asarray(value)
        return cls(tuple(array.shape), array.dtype)


@dataclass(frozen=True)
class ValidReply:
    """A train reply that follows the contract.

    ``tensors`` are as received (still encoded for fp16/int8); ``scales`` holds one float per
    key for int8 and is empty otherwise; ``metrics`` holds every TRAIN_METRIC_KEYS entry.
    """

    tensors: dict[str, np.ndarray]
    scales: dict[str, float]
    num_examples: int
    metrics: dict[str, float]
    encoding: Encoding
    fingerprint: str | None = None
    site_name: str | None = None
    kind: Literal["valid"] = "valid"


@dataclass(frozen=True)
class ValidEvaluation:
    """An evaluate reply that follows the contract; ``metrics`` has EVALUATE_METRIC_KEYS."""

    num_examples: int
    metrics: dict[str, float]
    fingerprint: str | None = None
    site_name: str | None = None
    kind: Literal["valid"] = "valid"


@dataclass(frozen=True)
class Declined:
    """The site did not train/evaluate on purpose (``status`` says why). Not a failure.

    ``metrics`` holds whatever contract metrics the site sent along (often epsilon/delta).
    """

    status: str
    metrics: dict[str, float] = field(default_factory=dict)
    fingerprint: str | None = None
    site_name: str | None = None
    kind: Literal["declined"] = "declined"


@dataclass(frozen=True)
class Rejection:
    """The reply cannot be used. ``field`` is the record/key at fault, ``reason`` says why."""

    field: str
    reason: str
    kind: Literal["rejected"] = "rejected"

    def __str__(self) -> str:
        return f"{self.field}: {self.reason}"


TrainOutcome: TypeAlias = ValidReply | Declined | Rejection
EvaluateOutcome: TypeAlias = ValidEvaluation | Declined | Rejection


class _Invalid(Exception):
    """Internal: carries a Rejection out of nested checks."""

    def __init__(self, field_name: str, reason: str) -> None:
        super().__init__(reason)
        self.rejection = Rejection(field_name, reason)


def wire_dtype(reference: np.dtype, encoding: Encoding) -> np.dtype:
    """Dtype a tensor must have on the wire: floats follow the encoding, others stay as they are."""
    if encoding not in _WIRE_DTYPES:
        raise ValueError(f"unknown update encoding {encoding!r}; use one of {sorted(_WIRE_DTYPES)}")
    if not np.issubdtype(reference, np.floating):
        return np.dtype(reference)
    return _WIRE_DTYPES[encoding]


# --------------------------------------------------------------------------- train replies


def validate_train_message(
    message: Message,
    expected: Mapping[str, np.ndarray | torch.Tensor | TensorSpec],
    encoding: Encoding,
    expected_fingerprint: str | None = None,
) -> TrainOutcome:
    """Like ``validate_train_reply`` but also turns a Flower error message into a Rejection."""
    if message.has_error():
        return _error_rejection(message)
    return validate_train_reply(message.content, expected, encoding, expected_fingerprint)


def validate_train_reply(
    content: RecordDict,
    expected: Mapping[str, np.ndarray | torch.Tensor | TensorSpec],
    encoding: Encoding,
    expected_fingerprint: str | None = None,
) -> TrainOutcome:
    """Check a train reply's content against the wire contract.

    Parameters
    ----------
    content:
        The reply's RecordDict.
    expected:
        The global shared tensors (or their ``TensorSpec``) the site was sent, by key.
    encoding:
        The update encoding the coordinator asked for (``training.update_encoding``).
    expected_fingerprint:
        The backbone fingerprint of this run; a reply whose STATUS names another one is
        rejected. ``None`` skips the check.
    """
    specs = {key: TensorSpec.of(value) for key, value in expected.items()}
    try:
        _check_record_names(content, wc.TRAIN_REPLY_RECORDS, "train")
        status = _read_status(content, expected_fingerprint)
        if status.value != wc.STATUS_OK:
            return _not_trained(content, status, wc.TRAIN_METRIC_KEYS | wc.TRAIN_METRIC_OPTIONAL_KEYS)
        tensors = _read_shared(content, specs, encoding)
        scales = _read_scales(content, specs, encoding)
        metrics = _read_metrics(content, wc.TRAIN_METRIC_KEYS, exact=True, optional=wc.TRAIN_METRIC_OPTIONAL_KEYS)
    except _Invalid as invalid:
        logger.info("train reply rejected: %s", invalid.rejection)
        return invalid.rejection
    return ValidReply(
        tensors=tensors,
        scales=scales,
        num_examples=int(metrics[wc.NUM_EXAMPLES]),
        metrics=metrics,
        encoding=encoding,
        fingerprint=status.fingerprint,
        site_name=status.site_name,
    )


# ------------------------------------------------------------------------ evaluate replies


def validate_evaluate_message(
    message: Message, expected_fingerprint: str | None = None
) -> EvaluateOutcome:
    """Like ``validate_evaluate_reply`` but also turns a Flower error message into a Rejection."""
    if message.has_error():
        return _error_rejection(message)
    return validate_evaluate_reply(message.content, expected_fingerprint)


def validate_evaluate_reply(
    content: RecordDict, expected_fingerprint: str | None = None
) -> EvaluateOutcome:
    """Check an evaluate reply: STATUS plus, for "ok", METRICS with EVALUATE_REQUIRED_KEYS and either
    all of EVALUATION_RESULT_KEYS or none of them (a site whose ``evaluation-metrics`` is "none").

    Rates (accuracy, balanced-accuracy, auc, sensitivity, specificity) must lie in [0, 1]; they
    may be NaN when undefined on the site's test split (the recorder stores them as null).
    """
    try:
        _check_record_names(content, wc.EVALUATE_REPLY_RECORDS, "evaluate")
        status = _read_status(content, expected_fingerprint)
        if status.value != wc.STATUS_OK:
            return _not_trained(content, status, wc.EVALUATE_METRIC_KEYS)
        metrics = _read_metrics(content, wc.EVALUATE_REQUIRED_KEYS, exact=True, optional=wc.EVALUATION_RESULT_KEYS)
        results = set(metrics) & wc.EVALUATION_RESULT_KEYS
        if results and results != wc.EVALUATION_RESULT_KEYS:
            _check_keys(wc.METRICS, set(metrics), set(wc.EVALUATE_METRIC_KEYS))  # all results or none
    except _Invalid as invalid:
        logger.info("evaluate reply rejected: %s", invalid.rejection)
        return invalid.rejection
    return ValidEvaluation(
        num_examples=int(metrics[wc.NUM_EXAMPLES]),
        metrics=metrics,
        fingerprint=status.fingerprint,
        site_name=status.site_name,
    )


# --------------------------------------------------------------------------- norm outliers


def update_norm(weights: Mapping[str, torch.Tensor], global_weights: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of ``weights - global_weights`` over all shared tensors (float64)."""
    total = 0.0
    for key, reference in global_weights.items():
        delta = torch.as_tensor(weights[key]).double() - reference.double()
        total += float(torch.sum(delta * delta))
    return math.sqrt(total)


def drop_norm_outliers(
    updates: Mapping[str, Mapping[str, torch.Tensor]],
    global_weights: Mapping[str, torch.Tensor],
    factor: float,
) -> tuple[dict[str, Mapping[str, torch.Tensor]], dict[str, str]]:
    """Drop updates whose distance from the global weights is far above the typical one.

    Parameters
    ----------
    updates:
        Decoded shared weights by site name.
    global_weights:
        The global shared weights the sites started from.
    factor:
        An update is dropped when its delta norm exceeds ``factor`` x the median delta norm
        (``strategy.norm_outlier_factor``).

    Returns ``(kept, rejected)``: kept updates by site, and a reason by dropped site. With
    fewer than 3 updates, or a median norm of 0, there is no majority to judge by and all are
    kept (a non-finite norm is always dropped).
    """
    if factor <= 1:
        raise ValueError(f"norm outlier factor must be > 1 (got {factor}); see strategy.norm_outlier_factor")
    norms = {site: update_norm(weights, global_weights) for site, weights in updates.items()}
    rejected = {
        site: "update norm is not finite" for site, norm in norms.items() if not math.isfinite(norm)
    }
    finite = {site: norm for site, norm in norms.items() if site not in rejected}
    if len(finite) >= 3:
        median = float(np.median(list(finite.values())))
        if median > 0:
            limit = factor * median
            for site, norm in finite.items():
                if norm > limit:
                    rejected[site] = (
                        f"update norm {norm:.4g} exceeds {factor:g} x median norm {median:.4g}"
                    )
        else:
            logger.info("median update norm is 0; norm outlier check skipped this round")
    for site, reason in rejected.items():
        logger.warning("dropping update from %s: %s", site, reason)
    kept = {site: weights for site, weights in updates.items() if site not in rejected}
    return kept, rejected


# -------------------------------------------------------------------------------- helpers


# Flower error codes whose reason is the text of an exception raised at the site (loading or running
# its ClientApp): it can name the site's files, rows and patients, so the coordinator never stores it.
_SITE_EXCEPTION_CODES: frozenset[int] = frozenset({
    ErrorCode.UNKNOWN, ErrorCode.LOAD_CLIENT_APP_EXCEPTION, ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
    ErrorCode.CLIENT_APP_CRASHED, ErrorCode.MOD_FAILED_PRECONDITION,
})


def _error_rejection(message: Message) -> Rejection:
    error = message.error
    if error.code in _SITE_EXCEPTION_CODES:
        reason = (f"site's ClientApp failed (Flower error code {error.code}); its text is not kept here (it may "
                  "name the site's files): see the site's own log")
    else:  # Flower's own delivery errors (message or node unavailable): no site data in them
        reason = f"site returned a Flower error (code {error.code}): {error.reason or 'no reason given'}"
    logger.info("reply rejected: %s", reason)
    return Rejection("message", reason)


def _check_record_names(content: RecordDict, allowed: frozenset[str], kind: str) -> None:
    unexpected = sorted(set(content.keys()) - allowed)
    if unexpected:
        raise _Invalid(
            "records",
            f"{kind} reply carries record(s) {_listed(unexpected)} that the wire contract does "
            f"not allow (allowed: {sorted(allowed)})",
        )


def _record(content: RecordDict, name: str, record_type: type, required: bool = True):  # type: ignore[no-untyped-def]
    if name not in content:
        if required:
            raise _Invalid(name, f"record '{name}' is missing")
        return None
    record = content[name]
    if not isinstance(record, record_type):
        raise _Invalid(
            name, f"record '{name}' must be a {record_type.__name__}, got {type(record).__name__}"
        )
    return record


@dataclass(frozen=True)
class _Status:
    value: str
    fingerprint: str | None
    site_name: str | None


def _read_status(content: RecordDict, expected_fingerprint: str | None) -> _Status:
    record: ConfigRecord = _record(content, wc.STATUS, ConfigRecord)
    extra = sorted(set(record.keys()) - STATUS_RECORD_KEYS)
    if extra:
        raise _Invalid(
            wc.STATUS,
            f"STATUS carries key(s) {_listed(extra)} not in the contract (allowed: {sorted(STATUS_RECORD_KEYS)})",
        )
    status = record.get(wc.STATUS_KEY)
    if not isinstance(status, str) or status not in wc.STATUS_VALUES:
        raise _Invalid(
            f"{wc.STATUS}.{wc.STATUS_KEY}",
            f"unknown status {status!r}; expected one of {sorted(wc.STATUS_VALUES)}",
        )
    fingerprint = record.get(wc.STATUS_FINGERPRINT)
    if fingerprint is not None and not isinstance(fingerprint, str):
        raise _Invalid(f"{wc.STATUS}.{wc.STATUS_FINGERPRINT}", "backbone fingerprint must be a string")
    held = record.get(wc.STATUS_GLOBAL_ID)
    if held is not None and not _is_version_id(held):
        raise _Invalid(
            f"{wc.STATUS}.{wc.STATUS_GLOBAL_ID}",
            "must be the hex id of global layers the coordinator sent (or empty); the site software is "
            "out of date or the reply was altered",
        )
    site_name = record.get(wc.STATUS_SITE_NAME)
    if site_name is not None and not _is_plain_name(site_name):
        raise _Invalid(
            f"{wc.STATUS}.{wc.STATUS_SITE_NAME}",
            f"site name {str(site_name)[:80]!r} is not plain; the site admin must set a name of at "
            f"most {_MAX_SITE_NAME} letters, digits, '-', '_' or '.'",
        )
    if status == wc.STATUS_FAILED:
        raise _Invalid(f"{wc.STATUS}.{wc.STATUS_KEY}", "site reported status 'failed'; see the site's log")
    if (
        status == wc.STATUS_OK
        and expected_fingerprint is not None
        and fingerprint is not None
        and fingerprint != expected_fingerprint
    ):
        raise _Invalid(
            f"{wc.STATUS}.{wc.STATUS_FINGERPRINT}",
            f"site used backbone {fingerprint!r} but this run uses {expected_fingerprint!r}; "
            "the site must reinstall the run's backbone",
        )
    return _Status(status, fingerprint, site_name)


def _is_version_id(value: object) -> bool:
    return isinstance(value, str) and len(value) <= 128 and all(ch in "0123456789abcdef" for ch in value)


def _is_plain_name(name: object) -> bool:
    return (
        isinstance(name, str)
        and 0 < len(name) <= _MAX_SITE_NAME
        and all(ch.isascii() and (ch.isalnum() or ch in "-_.") for ch in name)
    )


def _not_trained(content: RecordDict, status: _Status, metric_keys: frozenset[str]) -> Declined:
    for name in (wc.SHARED, wc.SHARED_SCALE):
        if name in content:
            raise _Invalid(name, f"a reply with status {status.value!r} must not carry record '{name}'")
    metrics = _read_metrics(content, metric_keys, exact=False) if wc.METRICS in content else {}
    logger.info("site %s declined (%s)", status.site_name or "(unnamed)", status.value)
    return Declined(
        status=status.value, metrics=metrics, fingerprint=status.fingerprint, site_name=status.site_name
    )


def _read_shared(
    content: RecordDict, specs: Mapping[str, TensorSpec], encoding: Encoding
) -> dict[str, np.ndarray]:
    record: ArrayRecord = _record(content, wc.SHARED, ArrayRecord)
    _check_keys(wc.SHARED, set(record.keys()), set(specs))
    tensors: dict[str, np.ndarray] = {}
    for key, spec in specs.items():
        where = f"{wc.SHARED}[{key}]"
        array = _decode_array(record[key], where)
        want_dtype = wire_dtype(spec.dtype, encoding)
        if array.dtype != want_dtype:
            raise _Invalid(
                where, f"dtype is {array.dtype}, expected {want_dtype} for encoding {encoding!r}"
            )
        if tuple(array.shape) != spec.shape:
            raise _Invalid(where, f"shape is {tuple(array.shape)}, expected {spec.shape}")
        if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
            raise _Invalid(where, "contains NaN or Inf values")
        tensors[key] = array
    return tensors


def _read_scales(
    content: RecordDict, specs: Mapping[str, TensorSpec], encoding: Encoding
) -> dict[str, float]:
    if encoding != "int8":
        if wc.SHARED_SCALE in content:
            raise _Invalid(wc.SHARED_SCALE, f"record only belongs to int8 updates, not {encoding!r}")
        return {}
    scaled_keys = {k for k, spec in specs.items() if np.issubdtype(spec.dtype, np.floating)}
    record: ArrayRecord = _record(content, wc.SHARED_SCALE, ArrayRecord)
    _check_keys(wc.SHARED_SCALE, set(record.keys()), scaled_keys)
    scales: dict[str, float] = {}
    for key in sorted(scaled_keys):
        where = f"{wc.SHARED_SCALE}[{key}]"
        array = _decode_array(record[key], where)
        if array.dtype != np.float32 or array.size != 1:
            raise _Invalid(
                where, f"must be one float32 scalar, got dtype {array.dtype} with shape {array.shape}"
            )
        value = float(array.reshape(()))
        if not math.isfinite(value):
            raise _Invalid(where, "contains NaN or Inf values")
        if value < 0:
            raise _Invalid(where, f"scale must be non-negative, got {value}")
        scales[key] = value
    return scales


def _decode_array(array: Array, where: str) -> np.ndarray:
    try:
        decoded = array.numpy()
    except Exception as exc:  # noqa: BLE001 - any decode failure is the site's fault
        raise _Invalid(where, f"cannot be decoded as a numpy array ({exc})") from None
    if str(decoded.dtype) != array.dtype or tuple(decoded.shape) != tuple(array.shape):
        raise _Invalid(
            where,
            f"declared dtype/shape {array.dtype}/{tuple(array.shape)} differ from its data "
            f"{decoded.dtype}/{tuple(decoded.shape)}",
        )
    return decoded


def _read_metrics(content: RecordDict, keys: frozenset[str], exact: bool,
                  optional: frozenset[str] = frozenset()) -> dict[str, float]:
    """The METRICS record's numbers; ``exact``: every one of ``keys``, plus any of ``optional``, nothing else."""
    record: MetricRecord = _record(content, wc.METRICS, MetricRecord)
    present = set(record.keys())
    if exact:
        _check_keys(wc.METRICS, present, set(keys) | (present & optional))
    else:
        extra = sorted(present - keys)
        if extra:
            raise _Invalid(wc.METRICS, f"unexpected key(s) {_listed(extra)}")
    metrics: dict[str, float] = {}
    for key in sorted(present):
        metrics[key] = _check_metric(key, record[key])
    return metrics


def _check_metric(key: str, value: object) -> float:
    where = f"{wc.METRICS}.{key}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Invalid(where, f"must be a single number, got {type(value).__name__}")
    number = float(value)
    if key == wc.NUM_EXAMPLES:
        if not number.is_integer() or number <= 0:
            raise _Invalid(where, f"must be a positive integer, got {value!r}")
        return int(number)
    if key in _RATE_METRICS and math.isnan(number):
        return number
    if not math.isfinite(number):
        raise _Invalid(where, f"must be finite, got {value!r}")
    if key in ("epsilon", "delta") and number < 0:
        raise _Invalid(where, f"must be non-negative, got {value!r}")
    if key == "delta" and number > 1:
        raise _Invalid(where, f"is a probability and must be <= 1, got {value!r}")
    if key in _RATE_METRICS and not 0.0 <= number <= 1.0:
        raise _Invalid(where, f"must lie in [0, 1], got {value!r}")
    return number


def _check_keys(where: str, present: set[str], wanted: set[str]) -> None:
    missing = sorted(wanted - present)
    extra = sorted(present - wanted)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing key(s) {_listed(missing)}")
        if extra:
            parts.append(f"unexpected key(s) {_listed(extra)}")
        raise _Invalid(where, "; ".join(parts))


def _listed(keys: list[str]) -> str:
    shown = ", ".join(repr(k) for k in keys[:_MAX_LISTED])
    return shown + (f" and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else "")
