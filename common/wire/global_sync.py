"""Keeping each site's copy of the global shared layers in step with the coordinator's, in few bytes.

The coordinator used to send the full float32 shared layers in every train and every evaluate
message. Every site already holds the previous round's layers, so the coordinator now sends only
what changed, in the federation's update encoding (``training.update_encoding``):

* Every version of the global shared layers has an id, :func:`global_id` (SHA-256 over names,
  dtypes, shapes and bytes), so both ends can tell exactly which version a site holds.
* A :class:`Downlink` names the target version and either carries nothing (the site already holds
  it: the evaluate message of round t and the train message of round t+1 carry the same layers, so
  the second sends none), full float32 weights (``base_id == ""``: a new site, or one out of step),
  or an fp16/int8 delta from the version ``base_id``.
* With fp16/int8 the coordinator's new global layers are *defined* as what the sites reconstruct:
  ``R_new = decode(encode(G_new - R_old), R_old)`` (:func:`encode_downlink`). Decoding is the
  same float32 elementwise arithmetic on both ends, so the site's copy has exactly the id the
  coordinator announced, and the site checks that id before it trains. Nothing drifts: the next
  round's updates are encoded against ``R_new`` on both ends.

fp32 keeps full weights and is lossless; it still saves the second copy per round.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping

import torch
from flwr.app import ArrayRecord, RecordDict

from common import wire_contract as wc
from common.models.model_weights import fingerprint
from common.wire.update_encoding import Encoding, EncodedUpdate, UpdateEncodingError, decode_update, encode_update

logger = logging.getLogger(__name__)

FULL_WEIGHTS_BASE: str = ""
"""``base_id`` of a downlink that carries the full float32 weights."""


class GlobalOutOfSync(RuntimeError):
    """The site cannot rebuild the announced global layers; it answers ``need-global``."""


def global_id(tensors: Mapping[str, torch.Tensor]) -> str:
    """The id of one version of the global shared layers (``common.models.model_weights.fingerprint``)."""
    return fingerprint({name: tensor.detach().to("cpu", torch.float32) for name, tensor in tensors.items()})


@dataclass(frozen=True)
class Downlink:
    """What the coordinator sends one site so that it holds the version ``target_id``.

    Attributes:
        target_id: the version the site must hold after applying this message.
        base_id: ``""`` when ``update`` holds the full float32 weights; otherwise the version the
            fp16/int8 delta in ``update`` applies to.
        update: the tensors, or ``None`` when the site already holds ``target_id``.
    """

    target_id: str
    base_id: str
    update: EncodedUpdate | None

    @staticmethod
    def nothing(target_id: str) -> Downlink:
        """The site already holds ``target_id``: send no tensors."""
        return Downlink(target_id=target_id, base_id=FULL_WEIGHTS_BASE, update=None)

    @staticmethod
    def full(weights: Mapping[str, torch.Tensor], target_id: str) -> Downlink:
        """The full float32 weights of version ``target_id``."""
        tensors = {name: tensor.detach().to("cpu", torch.float32).clone() for name, tensor in weights.items()}
        return Downlink(target_id=target_id, base_id=FULL_WEIGHTS_BASE, update=EncodedUpdate(tensors=tensors))


@dataclass(frozen=True)
class PublishedVersion:
    """A new global version: the weights every site will hold, and the delta that gets them there."""

    weights: dict[str, torch.Tensor]
    version_id: str
    delta: Downlink | None
    """From the previous version (``None`` for fp32, where sites always get full weights)."""


def encode_downlink(
    new_global: Mapping[str, torch.Tensor],
    previous: Mapping[str, torch.Tensor],
    previous_id: str,
    encoding: Encoding,
) -> PublishedVersion:
    """Turn freshly aggregated global layers into the version sites will hold.

    Args:
        new_global: the aggregate (float32) of this round.
        previous: the version every up-to-date site holds now.
        previous_id: ``global_id(previous)``.
        encoding: ``training.update_encoding``; ``"fp32"`` publishes ``new_global`` exactly.

    Raises:
        UpdateEncodingError: names or shapes differ from ``previous``, or values are not finite.
    """
    if encoding == "fp32":
        weights = {name: tensor.detach().to("cpu", torch.float32).clone() for name, tensor in new_global.items()}
        return PublishedVersion(weights=weights, version_id=global_id(weights), delta=None)
    encoded = encode_update(new_global, previous, encoding)
    weights = decode_update(encoded, previous)
    version_id = global_id(weights)
    return PublishedVersion(weights=weights, version_id=version_id,
                            delta=Downlink(target_id=version_id, base_id=previous_id, update=encoded))


def apply_downlink(
    held: tuple[str, Mapping[str, torch.Tensor]] | None, downlink: Downlink
) -> dict[str, torch.Tensor]:
    """The site's side: rebuild version ``downlink.target_id`` from what the site holds.

    Args:
        held: ``(id, weights)`` of the version the site holds, or ``None`` for none.
        downlink: what the coordinator sent.

    Raises:
        GlobalOutOfSync: the site holds another version than the delta's base (or none when no
            tensors came), the tensors cannot be decoded, or the result's id is not the target's
            (damaged in transit). The site then answers ``need-global`` and gets full weights.
    """
    if downlink.update is None:
        if held is not None and held[0] == downlink.target_id:
            return {name: tensor.clone() for name, tensor in held[1].items()}
        raise GlobalOutOfSync(
            f"the coordinator sent no shared layers because it believes this site holds version "
            f"{downlink.target_id[:12]}, but the site holds {_short(held)}; asking for the full weights"
        )
    if downlink.base_id == FULL_WEIGHTS_BASE:
        bad = sorted(name for name, tensor in downlink.update.tensors.items() if tensor.dtype != torch.float32)
        if bad or downlink.update.scales:
            raise GlobalOutOfSync(
                f"full global weights must be float32 without scales; tensors {bad[:3]} are not; asking again"
            )
        weights = {name: tensor.detach().to("cpu").clone() for name, tensor in downlink.update.tensors.items()}
    else:
        if held is None or held[0] != downlink.base_id:
            raise GlobalOutOfSync(
                f"the coordinator sent a delta from version {downlink.base_id[:12]} but this site holds "
                f"{_short(held)}; asking for the full weights"
            )
        try:
            weights = decode_update(downlink.update, held[1])
        except UpdateEncodingError as error:
            raise GlobalOutOfSync(f"the global delta cannot be applied: {error}") from error
    actual = global_id(weights)
    if actual != downlink.target_id:
        raise GlobalOutOfSync(
            f"the rebuilt global layers have id {actual[:12]}, not the announced {downlink.target_id[:12]} "
            "(damaged in transit); asking for the full weights"
        )
    return weights


def _short(held: tuple[str, Mapping[str, torch.Tensor]] | None) -> str:
    return "none" if held is None else f"version {held[0][:12]}"


# ---------------------------------------------------------------------------------------------
# The downlink on the wire: both halves of the codec (coordinator writes, site reads)
# ---------------------------------------------------------------------------------------------


def downlink_records(downlink: Downlink) -> tuple[dict[str, ArrayRecord], dict[str, str]]:
    """The ArrayRecords and CONFIG entries that carry ``downlink`` (see ``common.wire_contract``)."""
    config = {wc.CONFIG_GLOBAL_ID: downlink.target_id, wc.CONFIG_GLOBAL_BASE: downlink.base_id}
    records: dict[str, ArrayRecord] = {}
    if downlink.update is not None:
        records[wc.SHARED] = ArrayRecord(torch_state_dict=downlink.update.tensors)
        if downlink.update.scales:
            records[wc.SHARED_SCALE] = ArrayRecord(torch_state_dict=downlink.update.scales)
    return records, config


def read_downlink(content: RecordDict) -> Downlink:
    """The :class:`Downlink` a train or evaluate message carries (the inverse of :func:`downlink_records`)."""
    config_record = content[wc.CONFIG]
    if wc.CONFIG_GLOBAL_ID not in config_record:
        raise ValueError(
            f"the coordinator's message has no '{wc.CONFIG_GLOBAL_ID}' in its config record; the coordinator "
            "runs an older fedtl than this site: upgrade the coordinator"
        )
    update = None
    if wc.SHARED in content:
        scales = content[wc.SHARED_SCALE].to_torch_state_dict() if wc.SHARED_SCALE in content else {}
        update = EncodedUpdate(tensors=content[wc.SHARED].to_torch_state_dict(), scales=scales)
    return Downlink(target_id=str(config_record[wc.CONFIG_GLOBAL_ID]),
                    base_id=str(config_record.get(wc.CONFIG_GLOBAL_BASE, "")), update=update)
