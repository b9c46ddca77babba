"""The coordinator's round loop over a Flower Grid: train, validate, aggregate, checkpoint, evaluate.

Unlike the stock strategies, one bad reply never ends the run: every reply is validated
(``server.reply_validation``) and a bad one is dropped with a logged reason. A round never
waits forever: it proceeds with the sites that answered within ``round_timeout_s`` provided
``min_sites`` did; sites that declined for budget are not failures. Each site receives the
backbone once per fingerprint (on its first "need-backbone" answer), not every round, and the
global shared layers as a delta from the copy it holds (``server.global_broadcast``): one encoded
delta per round, not the full layers in both the train and the evaluate message.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from common import wire_contract as wc
from common.config import FederationConfig
from common.wire.update_encoding import EncodedUpdate, UpdateEncodingError, decode_update
from server.strategies import Update, make_aggregator
from server.backbone_source import PreparedBackbone
from server.budget_watch import BudgetWatch
from server.checkpoints import latest_checkpoint, save_checkpoint
from common.wire.global_sync import downlink_records
from server.global_broadcast import GlobalBroadcast
from server.reply_validation import (
    Declined,
    ValidEvaluation,
    ValidReply,
    drop_norm_outliers,
    validate_evaluate_message,
    validate_train_message,
)
from server.update_clipping import clip_to_median, clipping_applies
from server.run_recorder import RunRecorder

logger = logging.getLogger(__name__)

NODE_WAIT_POLL_S = 0.5


class FederationStalled(RuntimeError):
    """Too few sites connected within the timeout to run a round."""


@dataclass
class RoundTraffic:
    """Bytes of tensors sent to and received from each node in one round."""

    sent: dict[int, int] = field(default_factory=dict)
    received: dict[int, int] = field(default_factory=dict)

    def add_sent(self, node: int, content: RecordDict) -> None:
        self.sent[node] = self.sent.get(node, 0) + _array_bytes(content)

    def add_received(self, node: int, content: RecordDict) -> None:
        self.received[node] = self.received.get(node, 0) + _array_bytes(content)


def run_federation(grid: Grid, config: FederationConfig, backbone: PreparedBackbone, run_dir: Path,
                   *, resume: bool = False,
                   on_round: Callable[[dict[str, Any]], None] | None = None) -> dict[str, torch.Tensor]:
    """Run (or resume) the federation; returns the final global shared layers."""
    run_dir.mkdir(parents=True, exist_ok=True)
    aggregator = make_aggregator(config.strategy)
    global_shared = {k: v.clone() for k, v in backbone.shared.items()}
    first_round = 1
    if resume:
        checkpoint = latest_checkpoint(run_dir, config, backbone.fingerprint)
        if checkpoint is not None:
            global_shared = {k: v.float() for k, v in checkpoint.global_weights.items()}
            aggregator.load_state_dict(checkpoint.aggregator_state)
            first_round = checkpoint.round + 1
            logger.info("resuming after round %d from %s", checkpoint.round, checkpoint.path.name)
    broadcast = GlobalBroadcast(global_shared, config.training.update_encoding)
    global_shared = broadcast.weights
    recorder = RunRecorder(run_dir, config=json.loads(config.to_json()), backbone=backbone.describe(),
                           resume_after_round=first_round - 1 if resume else None)
    names = SiteNames()
    budgets = BudgetWatch(config.privacy.target_epsilon, recorder.rounds) if config.privacy.enabled else None
    for server_round in range(first_round, config.training.rounds + 1):
        recorder.begin_round(server_round)
        traffic = RoundTraffic()
        nodes = _wait_for_nodes(grid, config)
        sampled = _sample(nodes, config, server_round)
        logger.info("[round %d] training on %d of %d site(s)", server_round, len(sampled), len(nodes))
        train_replies = _train(grid, config, backbone, broadcast, sampled, server_round, traffic)

        updates: dict[int, tuple[dict[str, torch.Tensor], int]] = {}
        for node in sampled:
            message = train_replies.get(node)
            if message is None:
                _drop(recorder, server_round, names.of(node),
                      f"no reply within {config.strategy.round_timeout_s:.0f} s", status="no-reply")
                continue
            site = names.learn(node, message)
            outcome = validate_train_message(message, global_shared, config.training.update_encoding,
                                             backbone.fingerprint)
            if isinstance(outcome, ValidReply):
                try:
                    weights = decode_update(EncodedUpdate(
                        tensors={k: torch.from_numpy(v.copy()) for k, v in outcome.tensors.items()},
                        scales={k: torch.tensor(s, dtype=torch.float32) for k, s in outcome.scales.items()},
                    ), global_shared)
                except UpdateEncodingError as exc:
                    _drop(recorder, server_round, site, f"update cannot be decoded: {exc}")
                    continue
                budget_problem = budgets.check(site, outcome.metrics["epsilon"]) if budgets is not None else None
                if budget_problem is not None:
                    recorder.record_train(server_round, site, "ok", outcome.metrics)
                    _drop(recorder, server_round, site, budget_problem)
                    continue
                updates[node] = (weights, outcome.num_examples)
                recorder.record_train(server_round, site, "ok", outcome.metrics)
            elif isinstance(outcome, Declined):
                recorder.record_train(server_round, site, outcome.status, outcome.metrics)
                logger.info("[round %d] %s declined: %s", server_round, site, outcome.status)
            else:
                _drop(recorder, server_round, site, str(outcome))

        if len(updates) >= 3:
            _kept, outliers = drop_norm_outliers({str(n): u[0] for n, u in updates.items()}, global_shared,
                                                 config.strategy.norm_outlier_factor)
            for node_key, reason in outliers.items():
                updates.pop(int(node_key))
                _drop(recorder, server_round, names.of(int(node_key)), reason)
        if clipping_applies(config.strategy, len(updates)):
            clipped_weights, clipped = clip_to_median({str(n): u[0] for n, u in updates.items()}, global_shared,
                                                      config.strategy.update_clip_factor)
            updates = {n: (clipped_weights[str(n)], count) for n, (_, count) in updates.items()}
            for item in clipped:
                recorder.record_clipped(server_round, names.of(int(item.site)), item.norm, item.limit)
        if len(updates) >= config.strategy.min_sites:
            global_shared = broadcast.publish(aggregator.aggregate(global_shared, in_site_order(updates, names)))
        else:
            logger.warning("[round %d] only %d usable update(s), %d needed: global layers unchanged",
                           server_round, len(updates), config.strategy.min_sites)
        save_checkpoint(run_dir, server_round, global_shared, aggregator.state_dict(), backbone.fingerprint, config)

        evaluations = _evaluate(grid, config, backbone, broadcast, nodes, server_round, traffic)
        for node, (message, outcome) in evaluations.items():
            site = names.learn(node, message)
            if isinstance(outcome, ValidEvaluation):
                recorder.record_evaluate(server_round, site, "ok", outcome.metrics)
            elif isinstance(outcome, Declined):
                recorder.record_evaluate(server_round, site, outcome.status, outcome.metrics)
            else:
                recorder.record_evaluate(server_round, site, "rejected")
                recorder.record_dropped(server_round, site, f"evaluate: {outcome}")
        for node in set(traffic.sent) | set(traffic.received):
            recorder.add_bytes(server_round, names.of(node), traffic.sent.get(node, 0), traffic.received.get(node, 0))
        record = recorder.end_round(server_round)
        logger.info("[round %d] done in %.1f s: %d update(s) aggregated, %d dropped", server_round,
                    record["wall_time_s"], len(updates), len(record["dropped"]))
        if on_round is not None:
            on_round(record)
    return global_shared


# ---------------------------------------------------------------------------- messaging
def _wait_for_nodes(grid: Grid, config: FederationConfig) -> list[int]:
    """Wait for at least ``min_sites`` connected nodes, at most ``round_timeout_s``."""
    deadline = time.monotonic() + config.strategy.round_timeout_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= config.strategy.min_sites:
            return nodes
        if time.monotonic() > deadline:
            raise FederationStalled(
                f"only {len(nodes)} site(s) connected after {config.strategy.round_timeout_s:.0f} s, "
                f"{config.strategy.min_sites} needed (strategy.min_sites); check that the hospitals' SuperNodes run"
            )
        time.sleep(NODE_WAIT_POLL_S)


def in_site_order(updates: Mapping[int, Update], names: SiteNames) -> list[Update]:
    """The round's updates sorted by site name (then node id).

    Floating-point sums depend on their order, and neither the order replies arrive in nor, in
    simulation, the random node ids Flower assigns may change the aggregate: the same federation
    with the same seeds must give the same global layers.
    """
    return [updates[node] for node in sorted(updates, key=lambda node: (names.of(node), node))]


def _sample(nodes: list[int], config: FederationConfig, server_round: int) -> list[int]:
    count = max(config.strategy.min_sites, round(config.strategy.fraction_train * len(nodes)))
    rng = random.Random(config.seed * 100_003 + server_round)
    return sorted(rng.sample(nodes, min(count, len(nodes))))


def _config_record(config: FederationConfig, backbone: PreparedBackbone, server_round: int) -> ConfigRecord:
    return ConfigRecord({
        wc.CONFIG_FEDERATION: config.to_json(),
        wc.CONFIG_ROUND: server_round,
        wc.CONFIG_FINGERPRINT: backbone.fingerprint,
        wc.CONFIG_ENCODING: config.training.update_encoding,
        **make_aggregator(config.strategy).client_config(),  # the strategy's own client-side keys
    })


def _exchange(grid: Grid, contents: dict[int, RecordDict], message_type: str, server_round: int,
              timeout: float, traffic: RoundTraffic) -> dict[int, Message]:
    messages = []
    for node, content in contents.items():
        traffic.add_sent(node, content)
        messages.append(Message(content=content, dst_node_id=node, message_type=message_type,
                                group_id=str(server_round)))
    replies: dict[int, Message] = {}
    received = list(grid.send_and_receive(messages, timeout=timeout))
    # File each reply under the site it was sent to: an error the SuperLink makes itself (node
    # offline, reply expired) carries the SuperLink's own node id as its sender.
    destination = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
    for reply in received:
        node = destination.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        if reply.has_content():
            traffic.add_received(node, reply.content)
        replies[node] = reply
    return replies


def _downlink_content(broadcast: GlobalBroadcast, node: int, config_record: ConfigRecord) -> RecordDict:
    """A message's content: the node's downlink of the global layers plus the round's CONFIG."""
    records, entries = downlink_records(broadcast.downlink_for(node))
    config_copy = ConfigRecord(dict(config_record))
    for key, value in entries.items():
        config_copy[key] = value
    return RecordDict({**records, wc.CONFIG: config_copy})


def _send_global(grid: Grid, broadcast: GlobalBroadcast, nodes: list[int], message_type: str,
                 config_record: ConfigRecord, server_round: int, timeout: float,
                 traffic: RoundTraffic) -> dict[int, Message]:
    """Send ``message_type`` with each node's downlink; learn from the replies what each node holds."""
    contents = {n: _downlink_content(broadcast, n, config_record) for n in nodes}
    replies = _exchange(grid, contents, message_type, server_round, timeout, traffic)
    for node, reply in replies.items():
        broadcast.note_reply(node, reply)
    return replies


def _train(grid: Grid, config: FederationConfig, backbone: PreparedBackbone, broadcast: GlobalBroadcast,
           nodes: list[int], server_round: int, traffic: RoundTraffic) -> dict[int, Message]:
    timeout = config.strategy.round_timeout_s
    config_record = _config_record(config, backbone, server_round)
    replies = _send_global(grid, broadcast, nodes, wc.TRAIN, config_record, server_round, timeout, traffic)
    missing = [n for n, r in replies.items() if _status(r) == wc.STATUS_NEED_BACKBONE]
    retry = [n for n, r in replies.items() if _status(r) == wc.STATUS_NEED_GLOBAL]
    if missing:
        logger.info("[round %d] sending the backbone to %d site(s)", server_round, len(missing))
        install = {n: RecordDict({
            wc.BACKBONE: ArrayRecord(torch_state_dict=backbone.tensors),
            wc.CONFIG: ConfigRecord({
                wc.CONFIG_FINGERPRINT: backbone.fingerprint,
                wc.CONFIG_NORMALIZATION_MEAN: list(backbone.mean),
                wc.CONFIG_NORMALIZATION_STD: list(backbone.std),
                wc.CONFIG_BACKBONE_SOURCE: backbone.source,
            }),
        }) for n in missing}
        installed = _exchange(grid, install, wc.INSTALL_BACKBONE, server_round, timeout, traffic)
        retry += [n for n, r in installed.items() if _status(r) == wc.STATUS_OK]
    if retry:
        logger.info("[round %d] sending train again to %d site(s) after backbone/global-layer sync",
                    server_round, len(retry))
        replies.update(_send_global(grid, broadcast, sorted(retry), wc.TRAIN, config_record, server_round,
                                    timeout, traffic))
    return replies


def _evaluate(grid: Grid, config: FederationConfig, backbone: PreparedBackbone, broadcast: GlobalBroadcast,
              nodes: list[int], server_round: int, traffic: RoundTraffic) -> dict[int, tuple[Message, object]]:
    timeout = config.strategy.round_timeout_s
    config_record = _config_record(config, backbone, server_round)
    replies = _send_global(grid, broadcast, nodes, wc.EVALUATE, config_record, server_round, timeout, traffic)
    retry = sorted(n for n, r in replies.items() if _status(r) == wc.STATUS_NEED_GLOBAL)
    if retry:
        logger.info("[round %d] %d site(s) asked for the full global layers", server_round, len(retry))
        replies.update(_send_global(grid, broadcast, retry, wc.EVALUATE, config_record, server_round,
                                    timeout, traffic))
    return {node: (reply, validate_evaluate_message(reply, backbone.fingerprint)) for node, reply in replies.items()}


# ---------------------------------------------------------------------------- helpers
def _status(message: Message) -> str | None:
    if message.has_error() or wc.STATUS not in message.content:
        return None
    return str(message.content[wc.STATUS].get(wc.STATUS_KEY))


class SiteNames:
    """Names for the report: the name the hospital admin gave the node, else ``node-<id>``."""

    def __init__(self) -> None:
        self._names: dict[int, str] = {}

    def of(self, node: int) -> str:
        return self._names.get(node, f"node-{node}")

    def learn(self, node: int, message: Message) -> str:
        if node not in self._names and not message.has_error() and wc.STATUS in message.content:
            name = str(message.content[wc.STATUS].get(wc.STATUS_SITE_NAME, ""))
            if name and len(name) <= 64 and name.replace("-", "").replace("_", "").isalnum():
                self._names[node] = name
        return self.of(node)


def _drop(recorder: RunRecorder, server_round: int, site: str, reason: str, status: str = "dropped") -> None:
    recorder.record_train(server_round, site, status)
    recorder.record_dropped(server_round, site, reason)
    logger.warning("[round %d] dropped %s: %s", server_round, site, reason)


def _array_bytes(content: RecordDict) -> int:
    return sum(record.count_bytes() for record in content.array_records.values())
