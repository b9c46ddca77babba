"""The federation loop aggregates the same updates to the same global layers, whatever order they came in."""

from __future__ import annotations

import torch
from flwr.app import ConfigRecord, Message, Metadata, RecordDict

from common import wire_contract as wc
from server.strategies import weighted_average
from server.federation_loop import SiteNames, in_site_order


def named(names: SiteNames, node: int, site: str) -> None:
    status = ConfigRecord({wc.STATUS_KEY: wc.STATUS_OK, wc.STATUS_SITE_NAME: site})
    metadata = Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0, reply_to_message_id="m0",
                        group_id="1", created_at=0.0, ttl=60.0, message_type=wc.TRAIN)
    names.learn(node, Message(content=RecordDict({wc.STATUS: status}), metadata=metadata))


def test_updates_are_aggregated_in_site_name_order_so_node_ids_and_arrival_order_do_not_matter() -> None:
    global_weights = {"w": torch.zeros(4)}
    # even float64 sums of these depend on their order ((1e20 + 1) - 1e20 is 0, (1e20 - 1e20) + 1 is 1)
    values = {"hospital-a": 1e20, "hospital-b": 1.0, "hospital-c": -1e20}
    first, second = SiteNames(), SiteNames()
    for names, ids in ((first, (11, 22, 33)), (second, (93, 12, 57))):  # Flower's node ids differ per run
        for node, site in zip(ids, values):
            named(names, node, site)
    run_one = {node: ({"w": torch.full((4,), values[first.of(node)])}, 10) for node in (33, 11, 22)}
    run_two = {node: ({"w": torch.full((4,), values[second.of(node)])}, 10) for node in (12, 57, 93)}

    raw_one = weighted_average(global_weights, list(run_one.values()))["w"]
    raw_two = weighted_average(global_weights, list(run_two.values()))["w"]
    ordered_one = weighted_average(global_weights, in_site_order(run_one, first))["w"]
    ordered_two = weighted_average(global_weights, in_site_order(run_two, second))["w"]

    assert not torch.equal(raw_one, raw_two), "the example must be order-sensitive to test anything"
    assert torch.equal(ordered_one, ordered_two)
