"""What leaves a site is a contract: real replies from the real ClientApp, inspected key by key.

The site's DICOM files carry distinctive made-up patient tags; no header value, patient id, file
name or local-head tensor may appear anywhere in what the ClientApp sends back.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict

from client.client_app import make_client_app
from client.site_state import SiteState
from common import wire_contract as wc
from common.config import FederationConfig
from common.data.site_manifest import load_manifest
from common.data.synthetic_hospitals import generate_federation
from common.wire.global_sync import Downlink, global_id
from server.backbone_source import prepare_backbone
from common.wire.global_sync import downlink_records

CONFIG = FederationConfig.from_dict({
    "model": {"architecture": "resnet18", "image_size": 32},
    "privacy": {"enabled": True, "target_epsilon": 8.0},
    "training": {"rounds": 3, "local_epochs": 1, "batch_size": 8, "device": "cpu"},
})


def _message(content: RecordDict, message_type: str) -> Message:
    metadata = Metadata(run_id=1, message_id=f"m-{message_type}", src_node_id=0, dst_node_id=7,
                        reply_to_message_id="", group_id="1", created_at=time.time(), ttl=600.0,
                        message_type=message_type)
    return Message(content=content, metadata=metadata)


def _config(backbone_fingerprint: str, server_round: int = 1) -> ConfigRecord:
    return ConfigRecord({
        wc.CONFIG_FEDERATION: CONFIG.to_json(), wc.CONFIG_ROUND: server_round,
        wc.CONFIG_FINGERPRINT: backbone_fingerprint, wc.CONFIG_ENCODING: "fp32", wc.CONFIG_PROXIMAL_MU: 0.01,
    })


def _with_global(shared: dict[str, torch.Tensor], config: ConfigRecord) -> RecordDict:
    """A coordinator message carrying the full global shared layers (as a first contact does)."""
    records, entries = downlink_records(Downlink.full(shared, global_id(shared)))
    for key, value in entries.items():
        config[key] = value
    return RecordDict({**records, wc.CONFIG: config})


def _strings_in(content: RecordDict) -> list[str]:
    """Every string a reply carries: record names, keys, and string values."""
    found: list[str] = []
    for name, record in content.items():
        found.append(name)
        for key, value in record.items():
            found.append(str(key))
            if isinstance(value, (str, bytes)):
                found.append(value if isinstance(value, str) else value.decode(errors="replace"))
            elif isinstance(value, list):
                found.extend(str(v) for v in value)
    return found


@pytest.fixture(scope="module")
def site_replies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("contract")
    manifest = generate_federation(root / "data", num_sites=1, seed=3, image_size=32, site_sizes=[36])[0]
    backbone = prepare_backbone(CONFIG, root / "cache", random_init=True)
    node_config = {"manifest": str(manifest), "state-dir": str(root / "state"), "site-name": "north"}
    context = Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})
    app = make_client_app()

    install = RecordDict({
        wc.BACKBONE: ArrayRecord(torch_state_dict=backbone.tensors),
        wc.CONFIG: ConfigRecord({wc.CONFIG_FINGERPRINT: backbone.fingerprint,
                                 wc.CONFIG_NORMALIZATION_MEAN: list(backbone.mean), wc.CONFIG_NORMALIZATION_STD: list(backbone.std),
                                 wc.CONFIG_BACKBONE_SOURCE: backbone.source}),
    })
    shared = lambda: _with_global(backbone.shared, _config(backbone.fingerprint))  # noqa: E731
    before_install = app(_message(shared(), wc.TRAIN), context)
    installed = app(_message(install, wc.INSTALL_BACKBONE), context)
    trained = app(_message(shared(), wc.TRAIN), context)
    evaluated = app(_message(shared(), wc.EVALUATE), context)
    held_id = global_id(backbone.shared)
    nothing_records, nothing_entries = downlink_records(Downlink.nothing(held_id))
    nothing_config = _config(backbone.fingerprint)
    for key, value in nothing_entries.items():
        nothing_config[key] = value
    evaluated_without_tensors = app(_message(RecordDict({**nothing_records, wc.CONFIG: nothing_config}),
                                             wc.EVALUATE), context)
    stale = _with_global(backbone.shared, _config(backbone.fingerprint))
    stale[wc.CONFIG][wc.CONFIG_GLOBAL_BASE] = "ab" * 32  # a delta from a version the site never had
    stale[wc.CONFIG][wc.CONFIG_GLOBAL_ID] = "cd" * 32
    out_of_step = app(_message(stale, wc.TRAIN), context)

    forbidden: set[str] = set()
    for entry in load_manifest(manifest, list(CONFIG.model.class_names)).entries:
        forbidden |= {entry.patient_id, Path(entry.path).name, str(entry.path)}
        dataset = pydicom.dcmread(entry.path, stop_before_pixels=True)
        for element in dataset.iterall():
            if element.VR in {"PN", "LO", "SH", "DA", "TM", "DT", "UI", "CS", "ST", "LT", "AS"} and element.value:
                text = str(element.value)
                if len(text) >= 6:  # short codes like "CR" or "F" are not identifying
                    forbidden.add(text)
    head = SiteState(root / "state").load_local_head(backbone_fingerprint=backbone.fingerprint)
    return {"before": before_install, "installed": installed, "trained": trained, "evaluated": evaluated,
            "evaluated_without_tensors": evaluated_without_tensors, "out_of_step": out_of_step,
            "forbidden": forbidden, "backbone": backbone, "head": head, "held_id": held_id}


def test_a_site_without_the_backbone_asks_for_it_and_sends_nothing_else(site_replies) -> None:
    reply = site_replies["before"]
    assert set(reply.content.keys()) == {wc.STATUS}
    assert reply.content[wc.STATUS][wc.STATUS_KEY] == wc.STATUS_NEED_BACKBONE
    assert set(site_replies["installed"].content.keys()) <= wc.INSTALL_REPLY_RECORDS


def test_a_train_reply_holds_exactly_the_shared_layers_and_the_named_metrics(site_replies) -> None:
    reply = site_replies["trained"]
    assert not reply.has_error(), reply.error if reply.has_error() else ""
    assert set(reply.content.keys()) == {wc.SHARED, wc.METRICS, wc.STATUS}
    sent = reply.content[wc.SHARED].to_torch_state_dict()
    assert set(sent) == set(site_replies["backbone"].shared), "only the shared layers may leave"
    assert set(reply.content[wc.METRICS].keys()) == wc.TRAIN_METRIC_KEYS
    assert set(reply.content[wc.STATUS].keys()) <= {wc.STATUS_KEY, wc.STATUS_SITE_NAME, wc.STATUS_FINGERPRINT,
                                                    wc.STATUS_GLOBAL_ID}
    assert reply.content[wc.STATUS][wc.STATUS_KEY] == wc.STATUS_OK
    assert 0 < reply.content[wc.METRICS]["epsilon"] <= CONFIG.privacy.target_epsilon


def test_no_local_head_tensor_leaves_the_site(site_replies) -> None:
    head = site_replies["head"]
    assert head, "the site must have saved its local head"
    sent = site_replies["trained"].content[wc.SHARED].to_torch_state_dict()
    assert not any(name.startswith("head") for name in sent)
    for tensor in sent.values():
        for local in head.values():
            assert tensor.shape != local.shape or not torch.equal(tensor, local)


def test_an_evaluate_reply_holds_only_aggregate_metrics(site_replies) -> None:
    reply = site_replies["evaluated"]
    assert set(reply.content.keys()) == {wc.METRICS, wc.STATUS}
    metrics = reply.content[wc.METRICS]
    assert set(metrics.keys()) == wc.EVALUATE_METRIC_KEYS
    assert all(isinstance(v, (int, float)) for v in metrics.values()), "no per-sample lists"


def test_no_dicom_header_value_patient_id_or_file_name_appears_in_any_reply(site_replies) -> None:
    forbidden = site_replies["forbidden"]
    assert any("^" in value for value in forbidden), "the test data must carry patient names"
    for name in ("before", "installed", "trained", "evaluated"):
        reply = site_replies[name]
        text = "\n".join(_strings_in(reply.content))
        leaked = [value for value in forbidden if value in text]
        assert not leaked, f"{name} reply leaks {leaked[:3]}"
        for record in reply.content.array_records.values():
            for array in record.values():
                raw = bytes(array.data)
                assert not any(value.encode() in raw for value in forbidden if len(value) >= 8)


def test_reply_tensors_are_finite_floats(site_replies) -> None:
    for array in site_replies["trained"].content[wc.SHARED].to_numpy_ndarrays():
        assert array.dtype == np.float32 and np.isfinite(array).all()


def test_every_reply_says_which_global_layers_the_site_holds(site_replies) -> None:
    for name in ("before", "trained", "evaluated"):
        assert site_replies[name].content[wc.STATUS][wc.STATUS_GLOBAL_ID] == site_replies["held_id"], name


def test_a_site_that_holds_the_global_layers_evaluates_without_receiving_them_again(site_replies) -> None:
    reply = site_replies["evaluated_without_tensors"]
    assert not reply.has_error(), reply.error if reply.has_error() else ""
    assert reply.content[wc.STATUS][wc.STATUS_KEY] == wc.STATUS_OK
    assert reply.content[wc.METRICS]["balanced-accuracy"] == site_replies["evaluated"].content[wc.METRICS]["balanced-accuracy"]


def test_a_delta_from_a_version_the_site_does_not_hold_gets_need_global_and_nothing_else(site_replies) -> None:
    reply = site_replies["out_of_step"]
    assert set(reply.content.keys()) == {wc.STATUS}
    assert reply.content[wc.STATUS][wc.STATUS_KEY] == wc.STATUS_NEED_GLOBAL
    assert reply.content[wc.STATUS][wc.STATUS_GLOBAL_ID] == site_replies["held_id"], "the copy it holds is kept"


def test_a_failure_at_the_site_is_answered_with_the_failed_status_and_no_exception_text(
    tmp_path: Path, site_replies, caplog: pytest.LogCaptureFixture  # noqa: ANN001
) -> None:
    """A manifest that cannot be read (its path names a patient) must not reach the coordinator's logs."""
    canary = "DOE_JANE_19580312"
    backbone = site_replies["backbone"]
    node_config = {"manifest": str(tmp_path / canary / "labels.csv"), "state-dir": str(tmp_path / "state"),
                   "site-name": "east"}
    context = Context(run_id=1, node_id=8, node_config=node_config, state=RecordDict(), run_config={})
    app = make_client_app()
    SiteState(tmp_path / "state").store_backbone(
        backbone.fingerprint, backbone.tensors,
        {"mean": list(backbone.mean), "std": list(backbone.std), "source": backbone.source})
    with caplog.at_level("ERROR", logger="client.client_app"):
        for kind in (wc.TRAIN, wc.EVALUATE):
            reply = app(_message(_with_global(backbone.shared, _config(backbone.fingerprint)), kind), context)
            assert not reply.has_error(), "an exception reached Flower, which would send its text"
            assert set(reply.content.keys()) == {wc.STATUS}
            assert dict(reply.content[wc.STATUS]) == {wc.STATUS_KEY: wc.STATUS_FAILED, wc.STATUS_SITE_NAME: "east"}
            assert not any(canary in text for text in _strings_in(reply.content))
    assert canary in caplog.text, "the details belong in the site's own log"


def test_a_site_chooses_how_its_test_results_leave_it() -> None:
    from client.client_app import disclosed_evaluation

    metrics = {wc.NUM_EXAMPLES: 12, "balanced-accuracy": 0.83333, "auc": 0.91666, "loss": 0.41234}

    assert disclosed_evaluation(metrics, "exact") == metrics
    assert disclosed_evaluation(metrics, "rounded") == {wc.NUM_EXAMPLES: 12, "balanced-accuracy": 0.83,
                                                        "auc": 0.92, "loss": 0.41}
    assert disclosed_evaluation(metrics, "none") == {wc.NUM_EXAMPLES: 12}


def test_an_unknown_evaluation_metrics_setting_is_refused_with_the_choices() -> None:
    from client.site_settings import SiteSettingsError, settings_from_node_config

    with pytest.raises(SiteSettingsError, match="'exact'.*'rounded'.*'none'"):
        settings_from_node_config({"manifest": "m.csv", "state-dir": "s", "evaluation-metrics": "all"})
