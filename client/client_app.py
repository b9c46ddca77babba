"""The hospital's Flower ClientApp: install backbone, train, evaluate.

Train and evaluate messages bring the global shared layers as a ``common.wire.global_sync`` downlink
(nothing, a delta from the copy the site holds, or full weights); the site rebuilds them, checks
their id, keeps them in its state directory and answers ``need-global`` when it cannot.

Each handler builds its reply only from ``common.wire_contract`` names: the trained shared
layers, aggregate metrics and a status. Images, DICOM metadata, patient ids and the local
head never enter a reply.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections import OrderedDict
from typing import Callable

import torch

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.site_session import BackboneMissing, SiteSession
from client.site_settings import SiteDirectory, SiteSettings, settings_from_node_config
from client.site_state import SiteState
from common import wire_contract as wc
from common.config import FederationConfig
from common.wire.global_sync import GlobalOutOfSync, apply_downlink, read_downlink
from common.wire.update_encoding import encode_update

logger = logging.getLogger(__name__)

_SESSIONS: OrderedDict[tuple[str, str, str], SiteSession] = OrderedDict()
_MAX_SESSIONS = 4  # a simulation worker serves many sites; keep only the most recent in memory


Handler = Callable[[Message, Context], Message]


def _contained(handler: Handler, directory: SiteDirectory | None) -> Handler:
    """Answer ``failed`` instead of raising: the exception's text stays in the site's own log.

    Flower turns an exception raised in a ClientApp into ``Error(reason=str(exception))`` and sends it
    to the SuperLink; a manifest error's text names files, paths and rows. So every handler catches
    everything, logs the details here, and replies with the contract's ``failed`` status only.
    """

    @functools.wraps(handler)
    def contained(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Exception:  # noqa: BLE001 - nothing of an exception may leave the site
            name = _plain_site_name(context, directory)
            logger.exception("[%s] the %s message failed at this site; the coordinator is told only %r",
                             name or "site", msg.metadata.message_type, wc.STATUS_FAILED)
            record = ConfigRecord({wc.STATUS_KEY: wc.STATUS_FAILED})
            if name:
                record[wc.STATUS_SITE_NAME] = name
            return Message(content=RecordDict({wc.STATUS: record}), reply_to=msg)

    return contained


def _plain_site_name(context: Context, directory: SiteDirectory | None) -> str | None:
    """The admin-given site name when it can be read and is plain; else ``None`` (the coordinator
    then names the site by its node id)."""
    try:
        name = settings_from_node_config(context.node_config, directory).site_name
    except Exception:  # noqa: BLE001 - the settings themselves may be what failed
        return None
    return name if name and len(name) <= 64 and all(ch.isalnum() or ch in "-_." for ch in name) else None


def make_client_app(directory: SiteDirectory | None = None) -> ClientApp:
    """A ClientApp; in simulation ``directory`` maps each partition id to a synthetic hospital."""
    app = ClientApp()

    @app.query()
    @functools.partial(_contained, directory=directory)
    def install_backbone(msg: Message, context: Context) -> Message:
        settings = settings_from_node_config(context.node_config, directory)
        config = msg.content[wc.CONFIG]
        fingerprint = str(config[wc.CONFIG_FINGERPRINT])
        tensors = msg.content[wc.BACKBONE].to_torch_state_dict()
        meta = {"mean": list(config[wc.CONFIG_NORMALIZATION_MEAN]), "std": list(config[wc.CONFIG_NORMALIZATION_STD]),
                "source": str(config.get(wc.CONFIG_BACKBONE_SOURCE, "unknown"))}
        SiteState(settings.state_dir).store_backbone(fingerprint, tensors, meta)
        logger.info("[%s] installed backbone %s", settings.site_name, fingerprint[:12])
        return _reply(msg, settings, wc.STATUS_OK, fingerprint=fingerprint)

    @app.train()
    @functools.partial(_contained, directory=directory)
    def train(msg: Message, context: Context) -> Message:
        settings = settings_from_node_config(context.node_config, directory)
        config_record = msg.content[wc.CONFIG]
        server_round = int(config_record[wc.CONFIG_ROUND])
        ready = _ready_session(msg, settings)
        if isinstance(ready, Message):
            return ready
        session, version_id, reference = ready
        outcome = session.run_round(server_round, float(config_record[wc.CONFIG_PROXIMAL_MU]))
        metrics = {wc.NUM_EXAMPLES: outcome.num_examples, "epsilon": outcome.epsilon, "delta": outcome.delta}
        if not session.config.privacy.enabled:  # under DP the loss would be an unprotected statistic
            metrics[wc.TRAIN_LOSS] = outcome.train_loss
        if outcome.shared is None:
            return _reply(msg, settings, outcome.status, global_id=version_id, metrics=metrics)
        encoded = encode_update(outcome.shared, reference, str(config_record[wc.CONFIG_ENCODING]))
        records: dict[str, ArrayRecord] = {wc.SHARED: ArrayRecord(torch_state_dict=encoded.tensors)}
        if encoded.scales:
            records[wc.SHARED_SCALE] = ArrayRecord(torch_state_dict=encoded.scales)
        logger.info("[%s] round %d trained: loss %.4f, epsilon %.3f", settings.site_name, server_round,
                    outcome.train_loss, outcome.epsilon)
        return _reply(msg, settings, outcome.status, arrays=records, global_id=version_id, metrics=metrics)

    @app.evaluate()
    @functools.partial(_contained, directory=directory)
    def evaluate(msg: Message, context: Context) -> Message:
        settings = settings_from_node_config(context.node_config, directory)
        ready = _ready_session(msg, settings)
        if isinstance(ready, Message):
            return ready
        session, version_id, _weights = ready
        last_round = int(msg.content[wc.CONFIG][wc.CONFIG_ROUND]) >= session.config.training.rounds
        # the personal fine-tune (training.personal_finetune_epochs) runs once, on the last global layers
        metrics = disclosed_evaluation(session.evaluate(version_id, finetune=last_round), settings.evaluation_metrics)
        privacy = {"epsilon": 0.0, "delta": 0.0}
        if session.config.privacy.enabled and session.state.ledger_path.exists():
            ledger = session.privacy_ledger()
            privacy = {"epsilon": ledger.spent_epsilon(), "delta": ledger.delta}
        return _reply(msg, settings, wc.STATUS_OK, global_id=version_id, metrics={**metrics, **privacy})

    return app


def disclosed_evaluation(metrics: dict[str, float], setting: str) -> dict[str, float]:
    """The test results as the site chose to disclose them (``evaluation-metrics``): exact, rounded or none.

    ``num-examples`` always goes (the coordinator weights means by it); see
    ``common.wire_contract.OUTBOUND_FIELDS`` for what each field reveals.
    """
    if setting == wc.EVALUATION_METRICS_NONE:
        return {wc.NUM_EXAMPLES: metrics[wc.NUM_EXAMPLES]}
    if setting == wc.EVALUATION_METRICS_ROUNDED:
        return {key: value if key == wc.NUM_EXAMPLES else round(value, wc.EVALUATION_METRICS_DECIMALS)
                for key, value in metrics.items()}
    return metrics


def _ready_session(
    msg: Message, settings: SiteSettings
) -> tuple[SiteSession, str, dict[str, torch.Tensor]] | Message:
    """The site's session holding the global layers the message announces, with their id and weights,
    or the reply to send instead (``need-global`` or ``need-backbone``)."""
    received = _receive_global(msg, settings)
    if isinstance(received, Message):
        return received
    version_id, weights = received
    try:
        session = _session(settings, msg.content[wc.CONFIG])
    except BackboneMissing:
        return _reply(msg, settings, wc.STATUS_NEED_BACKBONE, global_id=version_id)
    session.sync_local_head()
    session.load_shared(weights)
    return session, version_id, weights


def _receive_global(msg: Message, settings: SiteSettings) -> tuple[str, dict[str, torch.Tensor]] | Message:
    """Rebuild the global shared layers the message announces; a ``need-global`` reply if the site cannot."""
    downlink = read_downlink(msg.content)
    state = SiteState(settings.state_dir)
    held = state.load_global_layers()
    try:
        weights = apply_downlink(held, downlink)
    except GlobalOutOfSync as error:
        logger.warning("[%s] %s", settings.site_name, error)
        return _reply(msg, settings, wc.STATUS_NEED_GLOBAL, global_id=held[0] if held is not None else "")
    if held is None or held[0] != downlink.target_id:
        state.store_global_layers(downlink.target_id, weights)
    return downlink.target_id, weights


def _session(settings: SiteSettings, config_record: ConfigRecord) -> SiteSession:
    config_json = str(config_record[wc.CONFIG_FEDERATION])
    fingerprint = str(config_record[wc.CONFIG_FINGERPRINT])
    key = (str(settings.state_dir), fingerprint, hashlib.sha256(config_json.encode()).hexdigest())
    if key in _SESSIONS:
        _SESSIONS.move_to_end(key)
        return _SESSIONS[key]
    session = SiteSession.open(settings, FederationConfig.from_json(config_json), fingerprint)
    _SESSIONS[key] = session
    while len(_SESSIONS) > _MAX_SESSIONS:
        _SESSIONS.popitem(last=False)
    return session


def _reply(
    msg: Message,
    settings: SiteSettings,
    status: str,
    *,
    fingerprint: str | None = None,
    global_id: str | None = None,
    arrays: dict[str, ArrayRecord] | None = None,
    metrics: dict[str, float | int] | None = None,
) -> Message:
    status_record = ConfigRecord({wc.STATUS_KEY: status, wc.STATUS_SITE_NAME: settings.site_name})
    if fingerprint is not None:
        status_record[wc.STATUS_FINGERPRINT] = fingerprint
    if global_id is not None:
        status_record[wc.STATUS_GLOBAL_ID] = global_id
    content = RecordDict({wc.STATUS: status_record})
    for name, record in (arrays or {}).items():
        content[name] = record
    if metrics is not None:
        content[wc.METRICS] = MetricRecord({k: (int(v) if k == wc.NUM_EXAMPLES else float(v)) for k, v in metrics.items()})
    return Message(content=content, reply_to=msg)


# Deployment entry point (pyproject [tool.flwr.app.components] clientapp): settings from node config.
app = make_client_app()
