"""The production ClientApp, plus a test-only fault: a hospital whose node config has ``fault``
corrupts the SHARED tensors of its train replies after the real app built them.

``fault`` is a comma-separated list of modes, used in turn by server round (round 1 takes the
first): ``nan`` fills every floating-point tensor with NaN (with the int8 encoding those are
the per-tensor scales in SHARED_SCALE: int8 codes cannot be NaN), ``shape`` appends one element
to every SHARED tensor (so no shape matches the global model). Sites without ``fault`` behave
exactly like production.
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from client.client_app import app as production_app
from common import wire_contract as wc

logger = logging.getLogger(__name__)

FAULT_KEY = "fault"
FAULT_MODES = ("nan", "shape")

app = ClientApp()


def fault_for_round(node_config: dict[str, object], server_round: int) -> str | None:
    """The fault mode this site injects in ``server_round`` (``None``: behave normally)."""
    spec = str(node_config.get(FAULT_KEY, "")).strip()
    if not spec:
        return None
    modes = [mode.strip() for mode in spec.split(",") if mode.strip()]
    unknown = sorted(set(modes) - set(FAULT_MODES))
    if unknown:
        raise ValueError(f"node config {FAULT_KEY}={spec!r}: unknown mode(s) {unknown}; use {FAULT_MODES}")
    return modes[(server_round - 1) % len(modes)]


def corrupt(tensors: dict[str, np.ndarray], mode: str) -> dict[str, np.ndarray]:
    """Every tensor made unusable the way ``mode`` says (dtype kept, so only the fault differs)."""
    if mode == "nan":
        return {key: np.full_like(value, np.nan) if np.issubdtype(value.dtype, np.floating) else value
                for key, value in tensors.items()}
    return {key: np.append(value.ravel(), value.ravel()[:1]).astype(value.dtype) for key, value in tensors.items()}


@app.train()
def train(msg: Message, context: Context) -> Message:
    reply = production_app(msg, context)
    server_round = int(msg.content[wc.CONFIG][wc.CONFIG_ROUND])
    mode = fault_for_round(dict(context.node_config), server_round)
    if mode is None or reply.has_error() or wc.SHARED not in reply.content:
        return reply
    names = [wc.SHARED] + ([wc.SHARED_SCALE] if mode == "nan" and wc.SHARED_SCALE in reply.content else [])
    for name in names:
        record = reply.content[name]
        tensors = dict(zip(record.keys(), record.to_numpy_ndarrays()))
        reply.content[name] = ArrayRecord({key: Array(value) for key, value in corrupt(tensors, mode).items()})
    logger.warning("test fault: round %d train reply carries %s tensors", server_round, mode)
    return reply


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return production_app(msg, context)


@app.query()
def install_backbone(msg: Message, context: Context) -> Message:
    return production_app(msg, context)
