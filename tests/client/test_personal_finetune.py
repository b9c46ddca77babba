"""The personal model's layers: validated against the pretrained ones, and the fine-tune (LP-FT), DP off.

A site's probe sits on the global shared layers, on the pretrained ones where those validate better
on its own patients, or on its own fine-tuned copy. Whichever, it must never change what the site
sends (the next DP update is bit-identical with or without it); the fine-tune must start exactly
where the linear probe is, be reproducible, travel with the personal head on the site's disk, and
be what the site's evaluation measures.
"""

from __future__ import annotations

from pathlib import Path

import torch

from client.personal_finetune import _ProbeOnStages, finetune_personal_layers
from client.personal_head import PersonalHead
from common.config import FederationConfig
from tests.client.hospital_fixture import dp_round, open_site


def with_finetune(config: FederationConfig, epochs: int = 3, layers: str = "validated") -> FederationConfig:
    return config.model_copy(update={"training": config.training.model_copy(
        update={"personal_finetune_epochs": epochs, "personal_finetune_learning_rate": 0.05,
                "personal_layers": layers})})


def test_the_probe_moves_to_the_pretrained_layers_only_where_they_validate_better(hospital, tmp_path: Path) -> None:  # noqa: ANN001
    _manifest, config, _backbone = hospital
    session = open_site(hospital, tmp_path / "validated", with_finetune(config, epochs=0))
    same = session.fit_personal_head()
    assert same.layers == "global" and same.shared is None, "identical layers: the global ones win the tie"

    pretrained = session.shared_state()
    session.load_shared({name: torch.zeros_like(t) if t.is_floating_point() else t for name, t in pretrained.items()})
    rescued = session.fit_personal_head()  # all-zero global layers: features without information
    assert rescued.layers == "pretrained" and rescued.shared is not None
    for name, tensor in rescued.shared.items():
        assert torch.equal(tensor, pretrained[name]), name
    assert torch.equal(session.shared_state()[next(iter(pretrained))], torch.zeros_like(next(iter(pretrained.values())))), \
        "the choice never touches the layers the site trains and sends"

    always_global = open_site(hospital, tmp_path / "global", with_finetune(config, epochs=0, layers="global"))
    always_global.load_shared(session.shared_state())
    assert always_global.fit_personal_head().layers == "global"


def test_the_fine_tune_starts_from_the_linear_probe_itself(hospital, tmp_path: Path) -> None:  # noqa: ANN001
    session = open_site(hospital, tmp_path / "start")
    head = session.fit_personal_head()
    folded = _ProbeOnStages(session.model.tail(session.boundary), head).eval()
    with torch.no_grad():
        got = folded(session.test.inputs, session.test.clinical)
    torch.testing.assert_close(got.double(), head.logits(session.features(session.test)).double(), atol=1e-4, rtol=0)


def test_zero_epochs_leave_the_global_layers_and_the_session_model_untouched(hospital, tmp_path: Path) -> None:  # noqa: ANN001
    session = open_site(hospital, tmp_path / "zero")
    head = session.fit_personal_head()
    before = {k: v.clone() for k, v in session.model.state_dict().items()}
    tuned = finetune_personal_layers(
        session.model.tail(session.boundary), head, session.train.inputs, session.train.clinical, session.train.labels,
        shared_names=list(session.groups.shared), num_classes=2, epochs=0, learning_rate=0.1, batch_size=16, seed=0,
        device=torch.device("cpu"))
    assert set(tuned) == set(session.groups.shared)
    for name, tensor in tuned.items():
        assert torch.equal(tensor, before[name]), name
    tuned = finetune_personal_layers(
        session.model.tail(session.boundary), head, session.train.inputs, session.train.clinical, session.train.labels,
        shared_names=list(session.groups.shared), num_classes=2, epochs=2, learning_rate=0.1, batch_size=16, seed=0,
        device=torch.device("cpu"))
    assert any(not torch.equal(tuned[name], before[name]) for name in tuned), "two epochs change the copy"
    for name, tensor in session.model.state_dict().items():
        assert torch.equal(tensor, before[name]), f"{name}: the session's own model was changed"


def test_the_shared_update_is_bit_identical_whatever_the_personal_fine_tune(hospital, tmp_path: Path) -> None:  # noqa: ANN001
    _manifest, config, _backbone = hospital
    plain = open_site(hospital, tmp_path / "plain", with_finetune(config, epochs=0))
    plain.evaluate("global-0")
    untouched = dp_round(plain)

    tuned = open_site(hospital, tmp_path / "tuned", with_finetune(config, epochs=3))
    tuned.evaluate("global-0")  # fits the probe, fine-tunes its own copy, fits the probe again
    stored = tuned.state.load_personal_head()
    assert stored is not None and PersonalHead.from_state_dict(stored[0]).shared is not None
    after = dp_round(tuned)

    assert untouched.keys() == after.keys()
    for name in untouched:
        assert torch.equal(untouched[name], after[name]), name
    assert plain.privacy_ledger().spent_epsilon() == tuned.privacy_ledger().spent_epsilon()


def test_the_personal_model_is_reproducible_and_is_what_the_evaluation_measures(hospital, tmp_path: Path) -> None:  # noqa: ANN001
    _manifest, config, _backbone = hospital
    no_dp = with_finetune(config.model_copy(update={"privacy": config.privacy.model_copy(update={"enabled": False})}))
    first = open_site(hospital, tmp_path / "first", no_dp)
    second = open_site(hospital, tmp_path / "second", no_dp)
    torch.manual_seed(123)  # whatever the process drew before
    a, b = first.fit_personal_head("g"), second.fit_personal_head("g")
    assert a.shared is not None and b.shared is not None
    for name in a.shared:
        assert torch.equal(a.shared[name], b.shared[name]), name
    torch.testing.assert_close(a.weight, b.weight)

    stored = PersonalHead.from_state_dict(first.state.load_personal_head()[0])
    assert stored.shared is not None and set(stored.shared) == set(a.shared)
    expected = a.logits(first.personal_features(a, first.test).double())
    report = first.test_report("g")
    assert report["balanced-accuracy"] == first.evaluate("g")["balanced-accuracy"]
    from client.evaluation_metrics import classification_metrics

    assert report["balanced-accuracy"] == classification_metrics(expected, first.test.labels, 2)["balanced-accuracy"]
    global_features = first.features(first.test)
    assert not torch.equal(first.personal_features(a, first.test), global_features), "the copy's features are used"


def test_the_fine_tune_runs_only_when_asked_for_the_last_round(hospital, tmp_path: Path) -> None:  # noqa: ANN001
    _manifest, config, _backbone = hospital
    session = open_site(hospital, tmp_path / "rounds", with_finetune(config, epochs=2, layers="global"))
    session.evaluate("round-1", finetune=False)
    assert PersonalHead.from_state_dict(session.state.load_personal_head()[0]).layers == "global"
    session.evaluate("round-2", finetune=True)
    assert PersonalHead.from_state_dict(session.state.load_personal_head()[0]).layers == "fine-tuned"
