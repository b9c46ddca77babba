"""Bytes per site per round: full-model fp32 FedAvg against fedtl's shared-layer exchange.

* Full-model FedAvg (the plain recipe): the coordinator sends the whole state dict and the site
  returns the whole state dict, both float32 (integer buffers at their own width). Flower's
  stock strategies also send the whole model again for evaluation (``evaluate_broadcast_bytes``).
* fedtl, steady state (a site that took part in the previous round): the coordinator's evaluate
  message carries the new global shared layers as a ``common.wire.global_sync`` downlink (full float32
  weights for fp32, an fp16/int8 delta from the site's copy otherwise), and the next train
  message carries no tensors, because the site already holds that version. The site returns its
  update encoded with ``common.wire.update_encoding.encode_update``. So one downlink and one uplink
  per round, built here by the shipping code (``server.global_broadcast``).
* Once per site and backbone fingerprint: the frozen trunk plus the initial shared layers
  (``ArrayRecord BACKBONE``) and a first full copy of the global layers; reported separately.

Both the tensor payload (``numel x element size``) and the serialised size of the Flower
``ArrayRecord`` that carries it are given.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord

from common.wire.update_encoding import ENCODINGS, encode_update, encoded_nbytes

logger = logging.getLogger(__name__)


def payload_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """Tensor data bytes of ``tensors`` (no framing)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def record_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """Bytes of the serialised tensors of a Flower ``ArrayRecord`` built from ``tensors``."""
    if not tensors:
        return 0
    record = ArrayRecord(torch_state_dict={k: v.detach().cpu() for k, v in tensors.items()})
    return sum(len(array.data) for array in record.values())


def simulated_update(reference: Mapping[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Weights a round of local training could produce: the reference plus small random steps."""
    generator = torch.Generator().manual_seed(seed)
    trained = {}
    for name, tensor in reference.items():
        step = torch.randn(tensor.shape, generator=generator) * 1e-3 * (float(tensor.abs().mean()) + 1e-3)
        trained[name] = tensor.float() + step
    return trained


def traffic_per_round(model: Any, groups: Any, seed: int = 0) -> dict[str, Any]:
    """Per-site, per-round bytes of full-model fp32 FedAvg and of fedtl for each encoding.

    Args:
        model: the FedModel (its state dict is what full-model FedAvg exchanges).
        groups: ``ParameterGroups`` from ``common.models.layer_policy.apply_policy`` for the policy measured.
        seed: seed of the simulated local update and aggregate.
    """
    from common.wire.global_sync import downlink_records
    from server.global_broadcast import GlobalBroadcast

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    shared = {k: state[k].float() for k in groups.shared}
    backbone = {k: state[k] for k in groups.frozen + groups.shared}
    full_payload = payload_bytes(state)
    full_record = record_bytes(state)
    full = {
        "down_bytes": full_payload,
        "up_bytes": full_payload,
        "round_bytes": 2 * full_payload,
        "round_record_bytes": 2 * full_record,
        "evaluate_broadcast_bytes": full_payload,
    }
    fedtl: dict[str, Any] = {
        "backbone_install_once_bytes": payload_bytes(backbone),
        "backbone_install_once_record_bytes": record_bytes(backbone),
        "first_contact_full_global_once_bytes": payload_bytes(shared),
        "shared_values": sum(t.numel() for t in shared.values()),
        "model_values": sum(t.numel() for t in state.values()),
        "by_encoding": {},
    }
    site = 7
    for encoding in ENCODINGS:
        broadcast = GlobalBroadcast(shared, encoding)
        held = broadcast.version_id
        trained = simulated_update(broadcast.weights, seed)
        encoded = encode_update(trained, broadcast.weights, encoding)
        up_payload = encoded_nbytes(encoded)
        up_record = record_bytes(encoded.tensors) + record_bytes(encoded.scales)
        broadcast.publish(simulated_update(broadcast.weights, seed + 1))  # this round's aggregate
        broadcast.mark_held(site, held)  # the site holds the previous version (it took part last round)
        evaluate_records, _ = downlink_records(broadcast.downlink_for(site))
        broadcast.mark_held(site, broadcast.version_id)  # its evaluate reply said it now holds the new one
        train_records, _ = downlink_records(broadcast.downlink_for(site))
        down_payload = sum(payload_bytes(r.to_torch_state_dict()) for r in evaluate_records.values())
        down_record = sum(sum(len(a.data) for a in r.values()) for r in evaluate_records.values())
        train_down = sum(payload_bytes(r.to_torch_state_dict()) for r in train_records.values())
        round_payload = down_payload + train_down + up_payload
        fedtl["by_encoding"][encoding] = {
            "down_bytes": down_payload + train_down,
            "evaluate_message_bytes": down_payload,
            "train_message_bytes": train_down,
            "up_bytes": up_payload,
            "round_bytes": round_payload,
            "round_record_bytes": down_record + up_record,
            "ratio_vs_full_fedavg": round_payload / full["round_bytes"],
            "record_ratio_vs_full_fedavg": (down_record + up_record) / full["round_record_bytes"],
            "ratio_vs_full_fedavg_with_its_evaluate_broadcast": round_payload
            / (full["round_bytes"] + full["evaluate_broadcast_bytes"]),
        }
    return {"full_model_fedavg_fp32": full, "fedtl": fedtl}
