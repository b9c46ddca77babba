"""The coordinator's side of ``common.wire.global_sync``: which version each site holds, what to send it.

The broadcast keeps the current global version (the weights every up-to-date site holds), the
delta from the previous version, and for every node the version its latest reply said it holds
(STATUS ``global-id``). For each message it picks the cheapest downlink that gets the node to
the current version: nothing, the delta, or the full float32 weights (a node it knows nothing
about, one that fell behind by more than a round, or one that answered ``need-global``).
"""

from __future__ import annotations

import logging
from typing import Mapping

import torch
from flwr.app import Message

from common import wire_contract as wc
from common.wire.global_sync import Downlink, PublishedVersion, encode_downlink, global_id
from common.wire.update_encoding import Encoding

logger = logging.getLogger(__name__)


class GlobalBroadcast:
    """Tracks the global shared layers and each node's copy of them.

    Args:
        initial: the global shared layers to start from (the backbone's, or a checkpoint's).
        encoding: ``training.update_encoding``; also the downlink's encoding.
    """

    def __init__(self, initial: Mapping[str, torch.Tensor], encoding: Encoding) -> None:
        self.encoding = encoding
        weights = {name: tensor.detach().to("cpu", torch.float32).clone() for name, tensor in initial.items()}
        self._current = PublishedVersion(weights=weights, version_id=global_id(weights), delta=None)
        self._full: Downlink | None = None  # the current version's full-weights downlink, built once
        self._held: dict[int, str] = {}

    @property
    def weights(self) -> dict[str, torch.Tensor]:
        """The current global shared layers (what every up-to-date site holds)."""
        return self._current.weights

    @property
    def version_id(self) -> str:
        return self._current.version_id

    def publish(self, new_global: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Make ``new_global`` (this round's aggregate) the current version; returns its weights.

        With fp16/int8 the returned weights are what the sites reconstruct from the encoded delta,
        which differ from ``new_global`` by at most the encoding's rounding.
        """
        self._current = encode_downlink(new_global, self._current.weights, self._current.version_id, self.encoding)
        self._full = None
        return self._current.weights

    def downlink_for(self, node: int) -> Downlink:
        """What to send ``node`` so that it holds the current version."""
        held = self._held.get(node)
        current = self._current
        if held == current.version_id:
            return Downlink.nothing(current.version_id)
        if current.delta is not None and held == current.delta.base_id:
            return current.delta
        if self._full is None:  # one copy per version, however many sites need the full weights
            self._full = Downlink.full(current.weights, current.version_id)
        return self._full

    def note_reply(self, node: int, reply: Message) -> None:
        """Learn from a reply's STATUS which version ``node`` holds now (forget it when unsure)."""
        held = None
        if not reply.has_error() and wc.STATUS in reply.content:
            status = reply.content[wc.STATUS]
            value = status.get(wc.STATUS_GLOBAL_ID)
            # after "need-global" the next message carries full weights, whatever the site holds:
            # a delta it could not apply once (damaged in transit) must not be sent again
            if isinstance(value, str) and value and status.get(wc.STATUS_KEY) != wc.STATUS_NEED_GLOBAL:
                held = value
        self.mark_held(node, held)

    def mark_held(self, node: int, version_id: str | None) -> None:
        """Record that ``node`` holds ``version_id`` (``None``: unknown, send full weights next)."""
        if version_id is None:
            self._held.pop(node, None)
        else:
            self._held[node] = version_id
