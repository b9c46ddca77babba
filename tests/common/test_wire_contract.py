"""Every field a site may send is declared in the wire contract with its privacy status."""

from __future__ import annotations

from common import wire_contract as wc


def test_every_metric_and_record_a_site_may_send_has_a_declared_status() -> None:
    may_send = {wc.SHARED, wc.SHARED_SCALE}
    may_send |= {f"{wc.METRICS}.{key}" for key in wc.TRAIN_METRIC_KEYS | wc.TRAIN_METRIC_OPTIONAL_KEYS}
    may_send |= {f"{wc.METRICS}.{key}" for key in wc.EVALUATE_METRIC_KEYS}
    may_send |= {f"{wc.STATUS}.{key}" for key in (wc.STATUS_KEY, wc.STATUS_FINGERPRINT, wc.STATUS_SITE_NAME,
                                                   wc.STATUS_GLOBAL_ID)}

    assert may_send == set(wc.OUTBOUND_FIELDS)
    for field, (status, what) in wc.OUTBOUND_FIELDS.items():
        assert status in (wc.DP, wc.EXACT), field
        assert len(what) > 20, f"{field}: say what it reveals"


def test_only_the_shared_layer_update_is_claimed_to_be_covered_by_dp() -> None:
    covered = {field for field, (status, _) in wc.OUTBOUND_FIELDS.items() if status == wc.DP}
    assert covered == {wc.SHARED, wc.SHARED_SCALE}


def test_the_train_loss_is_not_a_field_every_train_reply_carries() -> None:
    assert wc.TRAIN_LOSS not in wc.TRAIN_METRIC_KEYS  # it would be an unprotected statistic under DP
