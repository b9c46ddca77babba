"""Reply validation: a bad site reply is rejected with a reason, never crashes the round."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, Metadata, MetricRecord, RecordDict

from common import wire_contract as wc
from server.reply_validation import (
    Declined,
    Rejection,
    TensorSpec,
    ValidEvaluation,
    ValidReply,
    drop_norm_outliers,
    validate_evaluate_message,
    validate_evaluate_reply,
    validate_train_message,
    validate_train_reply,
)

GLOBAL = {"head.weight": torch.zeros(2, 3), "head.bias": torch.zeros(2)}
FINGERPRINT = "abc123"


def train_metrics(**overrides: float | int) -> MetricRecord:
    values: dict[str, float | int] = {
        wc.NUM_EXAMPLES: 40,
        "train-loss": 0.5,
        "epsilon": 1.2,
        "delta": 1e-5,
    }
    values.update(overrides)
    return MetricRecord(values)


def train_reply(
    tensors: dict[str, np.ndarray] | None = None,
    status: str = wc.STATUS_OK,
    metrics: MetricRecord | None = None,
    scales: dict[str, np.ndarray] | None = None,
    **extra_records: object,
) -> RecordDict:
    if tensors is None:
        tensors = {k: np.full(tuple(v.shape), 0.1, dtype=np.float32) for k, v in GLOBAL.items()}
    content = RecordDict(
        {
            wc.SHARED: ArrayRecord({k: Array(v) for k, v in tensors.items()}),
            wc.METRICS: metrics if metrics is not None else train_metrics(),
            wc.STATUS: ConfigRecord(
                {wc.STATUS_KEY: status, wc.STATUS_FINGERPRINT: FINGERPRINT, wc.STATUS_SITE_NAME: "st-mary"}
            ),
        }
    )
    if scales is not None:
        content[wc.SHARED_SCALE] = ArrayRecord({k: Array(v) for k, v in scales.items()})
    for name, record in extra_records.items():
        content[name.replace("_", "-")] = record
    return content


def rejected(outcome: object, field_part: str) -> Rejection:
    assert isinstance(outcome, Rejection), f"expected a rejection, got {outcome!r}"
    assert field_part in outcome.field, outcome
    return outcome


def test_a_contract_following_fp32_reply_is_valid_with_its_num_examples() -> None:
    outcome = validate_train_reply(train_reply(), GLOBAL, "fp32", FINGERPRINT)
    assert isinstance(outcome, ValidReply)
    assert outcome.num_examples == 40
    assert outcome.site_name == "st-mary"
    assert set(outcome.tensors) == set(GLOBAL)
    assert outcome.scales == {}
    assert outcome.metrics["epsilon"] == pytest.approx(1.2)


def test_an_unknown_record_name_is_rejected_naming_the_record() -> None:
    content = train_reply(local_head=ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))}))
    outcome = rejected(validate_train_reply(content, GLOBAL, "fp32"), "records")
    assert "local-head" in outcome.reason


def test_a_missing_status_record_is_rejected() -> None:
    content = train_reply()
    del content[wc.STATUS]
    rejected(validate_train_reply(content, GLOBAL, "fp32"), wc.STATUS)


def test_an_unknown_status_value_is_rejected() -> None:
    outcome = rejected(validate_train_reply(train_reply(status="great"), GLOBAL, "fp32"), "status.status")
    assert "great" in outcome.reason


def test_an_unknown_status_key_is_rejected() -> None:
    content = train_reply()
    content[wc.STATUS]["patient-id"] = "123"
    outcome = rejected(validate_train_reply(content, GLOBAL, "fp32"), wc.STATUS)
    assert "patient-id" in outcome.reason


def test_a_site_name_with_odd_characters_is_rejected() -> None:
    content = train_reply()
    content[wc.STATUS][wc.STATUS_SITE_NAME] = "=HYPERLINK(evil)"
    rejected(validate_train_reply(content, GLOBAL, "fp32"), wc.STATUS_SITE_NAME)


def test_a_missing_shared_key_is_rejected_naming_the_key() -> None:
    tensors = {"head.weight": np.zeros((2, 3), dtype=np.float32)}
    outcome = rejected(validate_train_reply(train_reply(tensors), GLOBAL, "fp32"), wc.SHARED)
    assert "missing" in outcome.reason and "head.bias" in outcome.reason


def test_an_extra_shared_key_is_rejected_naming_the_key() -> None:
    tensors = {k: np.zeros(tuple(v.shape), dtype=np.float32) for k, v in GLOBAL.items()}
    tensors["classifier.weight"] = np.zeros(3, dtype=np.float32)
    outcome = rejected(validate_train_reply(train_reply(tensors), GLOBAL, "fp32"), wc.SHARED)
    assert "unexpected" in outcome.reason and "classifier.weight" in outcome.reason


def test_a_wrong_shape_is_rejected_with_both_shapes() -> None:
    tensors = {"head.weight": np.zeros((3, 2), dtype=np.float32), "head.bias": np.zeros(2, dtype=np.float32)}
    outcome = rejected(validate_train_reply(train_reply(tensors), GLOBAL, "fp32"), "head.weight")
    assert "(3, 2)" in outcome.reason and "(2, 3)" in outcome.reason


def test_a_dtype_that_does_not_match_the_encoding_is_rejected() -> None:
    tensors = {k: np.zeros(tuple(v.shape), dtype=np.float64) for k, v in GLOBAL.items()}
    outcome = rejected(validate_train_reply(train_reply(tensors), GLOBAL, "fp32"), wc.SHARED)
    assert "float64" in outcome.reason and "float32" in outcome.reason


def test_fp16_replies_must_carry_float16() -> None:
    tensors16 = {k: np.zeros(tuple(v.shape), dtype=np.float16) for k, v in GLOBAL.items()}
    assert isinstance(validate_train_reply(train_reply(tensors16), GLOBAL, "fp16"), ValidReply)
    rejected(validate_train_reply(train_reply(), GLOBAL, "fp16"), wc.SHARED)


def test_nan_or_inf_in_a_shared_tensor_is_rejected() -> None:
    for bad in (np.nan, np.inf):
        tensors = {k: np.zeros(tuple(v.shape), dtype=np.float32) for k, v in GLOBAL.items()}
        tensors["head.bias"][1] = bad
        outcome = rejected(validate_train_reply(train_reply(tensors), GLOBAL, "fp32"), "head.bias")
        assert "NaN or Inf" in outcome.reason


def test_fp16_overflow_to_inf_is_rejected() -> None:
    tensors = {k: np.zeros(tuple(v.shape), dtype=np.float16) for k, v in GLOBAL.items()}
    with np.errstate(over="ignore"):
        tensors["head.weight"][0, 0] = np.float16(70000.0)  # beyond float16 range -> inf
    rejected(validate_train_reply(train_reply(tensors), GLOBAL, "fp16"), "head.weight")


def int8_tensors() -> dict[str, np.ndarray]:
    return {k: np.ones(tuple(v.shape), dtype=np.int8) for k, v in GLOBAL.items()}


def test_int8_replies_need_one_float32_scale_per_key() -> None:
    scales = {k: np.array(0.01, dtype=np.float32) for k in GLOBAL}
    outcome = validate_train_reply(train_reply(int8_tensors(), scales=scales), GLOBAL, "int8")
    assert isinstance(outcome, ValidReply)
    assert outcome.scales == {k: pytest.approx(0.01) for k in GLOBAL}


def test_int8_reply_without_scales_is_rejected() -> None:
    rejected(validate_train_reply(train_reply(int8_tensors()), GLOBAL, "int8"), wc.SHARED_SCALE)


def test_int8_scale_missing_a_key_or_not_a_float32_scalar_is_rejected() -> None:
    partial = {"head.weight": np.array(0.01, dtype=np.float32)}
    outcome = rejected(
        validate_train_reply(train_reply(int8_tensors(), scales=partial), GLOBAL, "int8"), wc.SHARED_SCALE
    )
    assert "head.bias" in outcome.reason
    vector = {k: np.array([0.01, 0.02], dtype=np.float32) for k in GLOBAL}
    rejected(validate_train_reply(train_reply(int8_tensors(), scales=vector), GLOBAL, "int8"), wc.SHARED_SCALE)
    wide = {k: np.array(0.01, dtype=np.float64) for k in GLOBAL}
    rejected(validate_train_reply(train_reply(int8_tensors(), scales=wide), GLOBAL, "int8"), wc.SHARED_SCALE)


def test_a_scale_record_on_a_non_int8_reply_is_rejected() -> None:
    scales = {k: np.array(0.01, dtype=np.float32) for k in GLOBAL}
    rejected(validate_train_reply(train_reply(scales=scales), GLOBAL, "fp32"), wc.SHARED_SCALE)


@pytest.mark.parametrize(
    ("overrides", "field_name"),
    [
        ({wc.NUM_EXAMPLES: 0}, wc.NUM_EXAMPLES),
        ({wc.NUM_EXAMPLES: -3}, wc.NUM_EXAMPLES),
        ({wc.NUM_EXAMPLES: 2.5}, wc.NUM_EXAMPLES),
        ({"epsilon": -0.1}, "epsilon"),
        ({"epsilon": math.inf}, "epsilon"),
        ({"delta": math.nan}, "delta"),
        ({"train-loss": math.nan}, "train-loss"),
    ],
)
def test_bad_metric_values_are_rejected_naming_the_metric(
    overrides: dict[str, float], field_name: str
) -> None:
    content = train_reply(metrics=train_metrics(**overrides))
    rejected(validate_train_reply(content, GLOBAL, "fp32"), field_name)


def test_metrics_must_carry_exactly_the_train_keys() -> None:
    missing = MetricRecord({wc.NUM_EXAMPLES: 4, "train-loss": 0.1, "epsilon": 1.0})
    outcome = rejected(validate_train_reply(train_reply(metrics=missing), GLOBAL, "fp32"), wc.METRICS)
    assert "delta" in outcome.reason
    extra = train_metrics(**{"mean-age": 61.0})
    outcome = rejected(validate_train_reply(train_reply(metrics=extra), GLOBAL, "fp32"), wc.METRICS)
    assert "mean-age" in outcome.reason


def test_an_integral_float_num_examples_is_accepted_as_an_integer() -> None:
    outcome = validate_train_reply(train_reply(metrics=train_metrics(**{wc.NUM_EXAMPLES: 40.0})), GLOBAL, "fp32")
    assert isinstance(outcome, ValidReply) and outcome.num_examples == 40


def test_declined_for_budget_is_not_a_failure_and_keeps_its_privacy_metrics() -> None:
    content = train_reply(status=wc.STATUS_DECLINED_BUDGET)
    del content[wc.SHARED]
    outcome = validate_train_reply(content, GLOBAL, "fp32")
    assert isinstance(outcome, Declined)
    assert outcome.status == wc.STATUS_DECLINED_BUDGET
    assert outcome.metrics["epsilon"] == pytest.approx(1.2)


def test_need_backbone_without_metrics_is_declined() -> None:
    content = RecordDict({wc.STATUS: ConfigRecord({wc.STATUS_KEY: wc.STATUS_NEED_BACKBONE})})
    outcome = validate_train_reply(content, GLOBAL, "fp32")
    assert isinstance(outcome, Declined) and outcome.status == wc.STATUS_NEED_BACKBONE


def test_a_declined_reply_that_still_carries_tensors_is_rejected() -> None:
    rejected(validate_train_reply(train_reply(status=wc.STATUS_DECLINED_BUDGET), GLOBAL, "fp32"), wc.SHARED)


def test_a_site_reporting_failure_is_rejected() -> None:
    content = RecordDict({wc.STATUS: ConfigRecord({wc.STATUS_KEY: wc.STATUS_FAILED})})
    outcome = rejected(validate_train_reply(content, GLOBAL, "fp32"), "status")
    assert "failed" in outcome.reason


def test_a_reply_for_another_backbone_is_rejected() -> None:
    outcome = rejected(validate_train_reply(train_reply(), GLOBAL, "fp32", "other-fp"), wc.STATUS_FINGERPRINT)
    assert "other-fp" in outcome.reason


def test_array_metadata_that_lies_about_its_data_is_rejected() -> None:
    content = train_reply()
    honest = content[wc.SHARED]["head.bias"]
    content[wc.SHARED]["head.bias"] = Array(dtype="float32", shape=(2,), stype=honest.stype,
                                            data=Array(np.zeros(5, dtype=np.float32)).data)
    rejected(validate_train_reply(content, GLOBAL, "fp32"), "head.bias")


def test_a_flower_error_message_becomes_a_rejection() -> None:
    metadata = Metadata(
        run_id=1, message_id="m1", src_node_id=7, dst_node_id=0, reply_to_message_id="m0",
        group_id="1", created_at=0.0, ttl=60.0, message_type=wc.TRAIN,
    )
    reply = Message(error=Error(code=3, reason="message unavailable"), metadata=metadata)
    outcome = rejected(validate_train_message(reply, GLOBAL, "fp32"), "message")
    assert "message unavailable" in outcome.reason  # Flower's own delivery error: kept


@pytest.mark.parametrize("code", [1, 2, 8])  # loading the ClientApp failed, it raised, it crashed
def test_the_text_of_an_exception_raised_at_a_site_is_never_kept_by_the_coordinator(code: int) -> None:
    metadata = Metadata(
        run_id=1, message_id="m1", src_node_id=7, dst_node_id=0, reply_to_message_id="m0",
        group_id="1", created_at=0.0, ttl=60.0, message_type=wc.EVALUATE,
    )
    text = "ManifestError: /data/CANARY-Smith-John/labels.csv row 4: file CANARY-Smith-John-19650203.dcm"
    reply = Message(error=Error(code=code, reason=text), metadata=metadata)

    outcome = rejected(validate_evaluate_message(reply), "message")

    assert "CANARY" not in outcome.reason and "site's own log" in outcome.reason


def test_expected_shapes_may_be_given_as_specs_or_arrays() -> None:
    specs = {k: TensorSpec.of(v.numpy()) for k, v in GLOBAL.items()}
    assert isinstance(validate_train_reply(train_reply(), specs, "fp32"), ValidReply)


def eval_metrics(**overrides: float | int) -> MetricRecord:
    values: dict[str, float | int] = {
        wc.NUM_EXAMPLES: 20, "loss": 0.4, "accuracy": 0.8, "balanced-accuracy": 0.75, "auc": 0.9,
        "sensitivity": 0.7, "specificity": 0.8, "epsilon": 1.0, "delta": 1e-5,
    }
    values.update(overrides)
    return MetricRecord(values)


def eval_reply(metrics: MetricRecord) -> RecordDict:
    return RecordDict({wc.METRICS: metrics, wc.STATUS: ConfigRecord({wc.STATUS_KEY: wc.STATUS_OK})})


def test_a_contract_following_evaluate_reply_is_valid() -> None:
    outcome = validate_evaluate_reply(eval_reply(eval_metrics()))
    assert isinstance(outcome, ValidEvaluation)
    assert outcome.num_examples == 20 and outcome.metrics["balanced-accuracy"] == pytest.approx(0.75)


def test_a_site_that_discloses_no_test_results_sends_only_counts_and_budget_and_is_valid() -> None:
    outcome = validate_evaluate_reply(eval_reply(MetricRecord({wc.NUM_EXAMPLES: 20, "epsilon": 1.0, "delta": 1e-5})))
    assert isinstance(outcome, ValidEvaluation)
    assert set(outcome.metrics) == wc.EVALUATE_REQUIRED_KEYS


def test_an_evaluate_reply_with_some_but_not_all_test_results_is_rejected() -> None:
    partial = MetricRecord({wc.NUM_EXAMPLES: 20, "epsilon": 1.0, "delta": 1e-5, "balanced-accuracy": 0.7})
    rejected(validate_evaluate_reply(eval_reply(partial)), wc.METRICS)


def test_a_train_reply_without_the_loss_is_valid_as_sent_under_dp() -> None:
    metrics = MetricRecord({wc.NUM_EXAMPLES: 40, "epsilon": 1.2, "delta": 1e-5})
    assert isinstance(validate_train_reply(train_reply(metrics=metrics), GLOBAL, "fp32", FINGERPRINT), ValidReply)


def test_an_undefined_auc_is_allowed_but_an_out_of_range_rate_is_not() -> None:
    assert isinstance(validate_evaluate_reply(eval_reply(eval_metrics(auc=math.nan))), ValidEvaluation)
    rejected(validate_evaluate_reply(eval_reply(eval_metrics(accuracy=1.5))), "accuracy")
    rejected(validate_evaluate_reply(eval_reply(eval_metrics(loss=math.nan))), "loss")


def test_an_evaluate_reply_must_not_carry_tensors() -> None:
    content = eval_reply(eval_metrics())
    content[wc.SHARED] = ArrayRecord({"x": Array(np.zeros(2, dtype=np.float32))})
    rejected(validate_evaluate_reply(content), "records")


def shifted(by: float) -> dict[str, torch.Tensor]:
    return {k: v + by for k, v in GLOBAL.items()}


def test_an_update_far_above_the_median_norm_is_dropped() -> None:
    updates = {"site-1": shifted(0.1), "site-2": shifted(0.12), "site-3": shifted(0.09), "site-4": shifted(50.0)}
    kept, dropped = drop_norm_outliers(updates, GLOBAL, factor=10.0)
    assert set(kept) == {"site-1", "site-2", "site-3"}
    assert set(dropped) == {"site-4"} and "median" in dropped["site-4"]


def test_norm_outliers_are_not_judged_with_fewer_than_three_updates() -> None:
    kept, dropped = drop_norm_outliers({"site-1": shifted(0.1), "site-2": shifted(50.0)}, GLOBAL, 10.0)
    assert set(kept) == {"site-1", "site-2"} and dropped == {}


def test_an_update_within_the_factor_is_kept() -> None:
    updates = {"site-1": shifted(0.1), "site-2": shifted(0.1), "site-3": shifted(0.9)}
    kept, dropped = drop_norm_outliers(updates, GLOBAL, factor=10.0)
    assert len(kept) == 3 and not dropped
