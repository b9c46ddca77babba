"""Bytes per site per round: full-model fp32 FedAvg against fedtl's shared-layer exchange.

* Full-model FedAvg (the plain recipe): the coordinator sends the whole state dict and the site
  returns the whole state dict, both float32 (integer buffers at their own width).
* fedtl: the coordinator sends the global shared layers (float32, ``ArrayRecord SHARED``); the
  site returns them encoded with ``common.update_encoding.encode_update`` as fp32 weights, fp16
  deltas or int8 deltas with per-tensor scales. The frozen trunk plus the initial shared
  layers travel once per backbone fingerprint (``ArrayRecord BACKBONE``): reported separately.

Both the tensor payload (``numel x element size``) and the serialised size of the Flower
``ArrayRecord`` that carries it are given. The coordinator's evaluate broadcast (the new global
layers, once per round, in both schemes) is reported as a separate figure.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord

from common.update_encoding import ENCODINGS, encode_update, encoded_nbytes

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
    """Per-site, per-round bytes of full-model fp32 FedAvg and of fedtl (fp32, fp16, int8 uplink).

    Args:
        model: the FedModel (its state dict is what full-model FedAvg exchanges).
        groups: ``ParameterGroups`` from ``common.layer_policy.apply_policy`` for the policy measured.
        seed: seed of the simulated local update.
    """
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
    down_payload = payload_bytes(shared)
    down_record = record_bytes(shared)
    trained = simulated_update(shared, seed)
    fedtl: dict[str, Any] = {
        "down_bytes": down_payload,
        "evaluate_broadcast_bytes": down_payload,
        "backbone_install_once_bytes": payload_bytes(backbone),
        "backbone_install_once_record_bytes": record_bytes(backbone),
        "shared_values": sum(t.numel() for t in shared.values()),
        "model_values": sum(t.numel() for t in state.values()),
        "by_encoding": {},
    }
    for encoding in ENCODINGS:
        encoded = encode_update(trained, shared, encoding)
        up_payload = encoded_nbytes(encoded)
        up_record = record_bytes(encoded.tensors) + record_bytes(encoded.scales)
        fedtl["by_encoding"][encoding] = {
            "up_bytes": up_payload,
            "round_bytes": down_payload + up_payload,
            "round_record_bytes": down_record + up_record,
            "ratio_vs_full_fedavg": (down_payload + up_payload) / full["round_bytes"],
            "record_ratio_vs_full_fedavg": (down_record + up_record) / full["round_record_bytes"],
            "ratio_with_evaluate_broadcast": (2 * down_payload + up_payload)
            / (full["round_bytes"] + full["evaluate_broadcast_bytes"]),
        }
    # Not implemented in fedtl: what a delta-encoded DOWNLINK (global delta since the layers the
    # site already holds) would give, for the report's proposal.
    fedtl["hypothetical_downlink_encoded_ratio"] = {
        encoding: (2 * fedtl["by_encoding"][encoding]["up_bytes"]) / full["round_bytes"]
        for encoding in ENCODINGS
    }
    return {"full_model_fedavg_fp32": full, "fedtl": fedtl}
