"""Global-layer sync: a site rebuilds exactly the coordinator's version from a delta, or asks again."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord

from common.wire.global_sync import (
    FULL_WEIGHTS_BASE,
    Downlink,
    GlobalOutOfSync,
    apply_downlink,
    encode_downlink,
    global_id,
)
from common.wire.update_encoding import EncodedUpdate

StateDict = dict[str, torch.Tensor]


def layers(seed: int) -> StateDict:
    generator = torch.Generator().manual_seed(seed)
    return {"block.conv.weight": torch.randn(8, 4, 3, 3, generator=generator),
            "block.conv.bias": torch.randn(8, generator=generator)}


def moved(weights: StateDict, seed: int, step: float = 1e-3) -> StateDict:
    generator = torch.Generator().manual_seed(seed)
    return {name: value + step * torch.randn(value.shape, generator=generator) for name, value in weights.items()}


def over_the_wire(update: EncodedUpdate) -> EncodedUpdate:
    """What Flower delivers: the tensors serialised into ArrayRecords and read back."""
    tensors = ArrayRecord(torch_state_dict=update.tensors).to_torch_state_dict()
    scales = ArrayRecord(torch_state_dict=update.scales).to_torch_state_dict() if update.scales else {}
    return EncodedUpdate(tensors=tensors, scales=scales)


def test_the_id_names_the_values_not_the_order_or_the_object() -> None:
    weights = layers(0)
    assert global_id(weights) == global_id(dict(reversed(list(weights.items()))))
    assert global_id(weights) == global_id({k: v.clone() for k, v in weights.items()})
    assert global_id(weights) != global_id(moved(weights, 1))


@pytest.mark.parametrize("encoding", ["fp16", "int8"])
def test_a_site_rebuilds_the_published_version_bit_for_bit_from_the_delta(encoding: str) -> None:
    old = layers(0)
    published = encode_downlink(moved(old, 1), old, global_id(old), encoding)  # type: ignore[arg-type]
    assert published.delta is not None and published.delta.base_id == global_id(old)
    wire = Downlink(published.delta.target_id, published.delta.base_id, over_the_wire(published.delta.update))
    rebuilt = apply_downlink((global_id(old), old), wire)
    assert global_id(rebuilt) == published.version_id
    for name in old:
        assert torch.equal(rebuilt[name], published.weights[name]), name


@pytest.mark.parametrize("encoding", ["fp16", "int8"])
def test_versions_chain_without_drift_over_many_rounds(encoding: str) -> None:
    coordinator = layers(0)
    coordinator_id = global_id(coordinator)
    site = (coordinator_id, {k: v.clone() for k, v in coordinator.items()})
    for round_ in range(1, 8):
        published = encode_downlink(moved(coordinator, round_), coordinator, coordinator_id, encoding)  # type: ignore[arg-type]
        assert published.delta is not None
        site = (published.version_id, apply_downlink(site, published.delta))
        coordinator, coordinator_id = published.weights, published.version_id
    assert site[0] == coordinator_id
    assert all(torch.equal(site[1][name], coordinator[name]) for name in coordinator)


def test_the_published_version_differs_from_the_aggregate_by_at_most_the_rounding() -> None:
    old = layers(0)
    new = moved(old, 1, step=1e-2)
    published = encode_downlink(new, old, global_id(old), "int8")
    assert published.delta is not None and published.delta.update is not None
    for name in old:
        scale = float(published.delta.update.scales[name])
        assert float((published.weights[name] - new[name]).abs().max()) <= scale / 2 + 1e-7


def test_fp32_publishes_the_aggregate_exactly_and_sends_full_weights() -> None:
    old = layers(0)
    new = moved(old, 1)
    published = encode_downlink(new, old, global_id(old), "fp32")
    assert published.delta is None
    assert all(torch.equal(published.weights[name], new[name]) for name in new)
    full = Downlink.full(published.weights, published.version_id)
    assert full.base_id == FULL_WEIGHTS_BASE
    assert global_id(apply_downlink(None, full)) == published.version_id


def test_a_message_without_tensors_is_applied_only_when_the_site_holds_the_target() -> None:
    weights = layers(0)
    version = global_id(weights)
    assert global_id(apply_downlink((version, weights), Downlink.nothing(version))) == version
    with pytest.raises(GlobalOutOfSync, match="holds none"):
        apply_downlink(None, Downlink.nothing(version))


def test_a_delta_from_another_version_is_refused_so_the_site_asks_for_full_weights() -> None:
    old = layers(0)
    published = encode_downlink(moved(old, 1), old, global_id(old), "int8")
    assert published.delta is not None
    stale = moved(old, 9)
    with pytest.raises(GlobalOutOfSync, match="delta from version"):
        apply_downlink((global_id(stale), stale), published.delta)


def test_a_damaged_delta_is_caught_by_the_id_check() -> None:
    old = layers(0)
    published = encode_downlink(moved(old, 1), old, global_id(old), "int8")
    assert published.delta is not None and published.delta.update is not None
    tensors = {k: v.clone() for k, v in published.delta.update.tensors.items()}
    tensors["block.conv.bias"][0] += 1
    damaged = Downlink(published.version_id, published.delta.base_id,
                       EncodedUpdate(tensors=tensors, scales=published.delta.update.scales))
    with pytest.raises(GlobalOutOfSync, match="damaged in transit"):
        apply_downlink((global_id(old), old), damaged)


def test_full_weights_must_be_float32() -> None:
    weights = layers(0)
    half = Downlink(global_id(weights), FULL_WEIGHTS_BASE,
                    EncodedUpdate(tensors={k: v.half() for k, v in weights.items()}))
    with pytest.raises(GlobalOutOfSync, match="float32"):
        apply_downlink(None, half)


def test_an_int8_delta_is_a_quarter_of_the_full_weights() -> None:
    old = layers(0)
    published = encode_downlink(moved(old, 1), old, global_id(old), "int8")
    assert published.delta is not None and published.delta.update is not None
    delta_bytes = sum(t.numel() * t.element_size() for t in published.delta.update.tensors.values())
    full_bytes = sum(t.numel() * t.element_size() for t in old.values())
    assert delta_bytes * 4 == full_bytes
