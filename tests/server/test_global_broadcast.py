"""The coordinator sends each site the cheapest downlink that brings it to the current global version."""

from __future__ import annotations

import time

import torch
from flwr.app import ConfigRecord, Message, Metadata, RecordDict

from common import wire_contract as wc
from common.wire.global_sync import FULL_WEIGHTS_BASE, apply_downlink
from common.wire.global_sync import downlink_records
from server.global_broadcast import GlobalBroadcast


def layers(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"conv.weight": torch.randn(8, 4, 3, 3, generator=generator), "conv.bias": torch.randn(8, generator=generator)}


def reply_holding(version_id: str | None, status: str = wc.STATUS_OK) -> Message:
    record = ConfigRecord({wc.STATUS_KEY: status})
    if version_id is not None:
        record[wc.STATUS_GLOBAL_ID] = version_id
    metadata = Metadata(run_id=1, message_id="r", src_node_id=5, dst_node_id=0, reply_to_message_id="m",
                        group_id="1", created_at=time.time(), ttl=60.0, message_type=wc.TRAIN)
    return Message(content=RecordDict({wc.STATUS: record}), metadata=metadata)


def test_an_unknown_site_gets_the_full_float32_weights() -> None:
    broadcast = GlobalBroadcast(layers(0), "int8")
    downlink = broadcast.downlink_for(7)
    assert downlink.base_id == FULL_WEIGHTS_BASE and downlink.update is not None
    assert all(t.dtype == torch.float32 for t in downlink.update.tensors.values())


def test_a_site_that_holds_the_current_version_gets_no_tensors() -> None:
    broadcast = GlobalBroadcast(layers(0), "int8")
    broadcast.note_reply(7, reply_holding(broadcast.version_id))
    records, config = downlink_records(broadcast.downlink_for(7))
    assert records == {}
    assert config[wc.CONFIG_GLOBAL_ID] == broadcast.version_id


def test_after_a_round_an_up_to_date_site_gets_only_the_int8_delta_and_rebuilds_the_new_version() -> None:
    broadcast = GlobalBroadcast(layers(0), "int8")
    site = (broadcast.version_id, {k: v.clone() for k, v in broadcast.weights.items()})
    broadcast.note_reply(7, reply_holding(broadcast.version_id))
    new = broadcast.publish({k: v + 1e-3 for k, v in broadcast.weights.items()})
    downlink = broadcast.downlink_for(7)
    records, _ = downlink_records(downlink)
    assert set(records) == {wc.SHARED, wc.SHARED_SCALE}
    assert all(t.dtype == torch.int8 for t in records[wc.SHARED].to_torch_state_dict().values())
    rebuilt = apply_downlink(site, downlink)
    assert all(torch.equal(rebuilt[k], new[k]) for k in new)


def test_a_site_two_versions_behind_or_asking_for_the_layers_gets_full_weights() -> None:
    broadcast = GlobalBroadcast(layers(0), "int8")
    first = broadcast.version_id
    broadcast.note_reply(7, reply_holding(first))
    broadcast.publish({k: v + 1e-3 for k, v in broadcast.weights.items()})
    broadcast.publish({k: v + 1e-3 for k, v in broadcast.weights.items()})
    assert broadcast.downlink_for(7).base_id == FULL_WEIGHTS_BASE
    broadcast.note_reply(8, reply_holding("", status=wc.STATUS_NEED_GLOBAL))
    assert broadcast.downlink_for(8).base_id == FULL_WEIGHTS_BASE


def test_fp32_federations_send_full_weights_once_per_version() -> None:
    broadcast = GlobalBroadcast(layers(0), "fp32")
    new = {k: v + 1e-3 for k, v in broadcast.weights.items()}
    assert all(torch.equal(broadcast.publish(new)[k], new[k]) for k in new)
    broadcast.note_reply(7, reply_holding("0" * 64))
    assert broadcast.downlink_for(7).base_id == FULL_WEIGHTS_BASE
    broadcast.note_reply(7, reply_holding(broadcast.version_id))
    assert broadcast.downlink_for(7).update is None


def test_a_site_that_could_not_apply_the_delta_gets_full_weights_even_if_it_holds_the_base() -> None:
    broadcast = GlobalBroadcast(layers(0), "int8")
    base = broadcast.version_id
    broadcast.publish({k: v + 1e-3 for k, v in broadcast.weights.items()})
    broadcast.note_reply(7, reply_holding(base))
    assert broadcast.downlink_for(7).base_id == base, "up to date but one round: the delta"
    broadcast.note_reply(7, reply_holding(base, status=wc.STATUS_NEED_GLOBAL))
    assert broadcast.downlink_for(7).base_id == FULL_WEIGHTS_BASE
