"""The personal head: each site's own linear probe on the global features, which never touches DP training.

A site fits a class-balanced multinomial logistic regression on the pooled features of its training
patients, with the L2 strength chosen by patient-level cross-validation, and evaluates that. The
fit must be the textbook one (scikit-learn's, for the same strength), folds must never split a
patient, and the shared-layer update a site sends must be bit-identical whatever its personal head.
Training must also be reproducible whatever the process ran before (Ray workers serve sites in any
order).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from client.personal_head import PersonalHead, balanced_weights, fit_logistic, fit_personal_head, patient_folds
from tests.client.hospital_fixture import dp_round, open_site



def blobs(n: int = 120, d: int = 6, classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    centres = rng.normal(0, 2, (classes, d))
    x = centres[labels] + rng.normal(0, 1.5, (n, d))
    return torch.tensor(x), torch.tensor(labels)


def test_the_fit_is_scikit_learns_class_balanced_multinomial_logistic_regression() -> None:
    x, y = blobs()
    l2 = 0.05
    weights = balanced_weights(y, 3)
    weight, bias = fit_logistic(x, y, 3, l2, weights, max_iter=500)
    reference = LogisticRegression(C=1.0 / (l2 * float(weights.sum())), class_weight="balanced", max_iter=5000,
                                   tol=1e-10).fit(x.numpy(), y.numpy())
    # scikit-learn's multinomial coefficients are defined up to a common shift of the intercepts
    np.testing.assert_allclose(weight.numpy(), reference.coef_, atol=2e-4)
    np.testing.assert_allclose((bias - bias.mean()).numpy(), reference.intercept_ - reference.intercept_.mean(),
                               atol=2e-4)


def test_balanced_weights_give_each_class_the_same_total() -> None:
    labels = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1])
    weights = balanced_weights(labels, 2)
    assert float(weights[labels == 0].sum()) == pytest.approx(float(weights[labels == 1].sum()))


def test_folds_never_split_a_patient_and_each_fold_holds_both_classes() -> None:
    patients = [f"p{i // 3}" for i in range(60)]  # 20 patients, 3 images each
    labels = torch.tensor([(i // 3) % 2 for i in range(60)])
    folds = patient_folds(patients, labels, 2)
    assert len(folds) == 5
    assert torch.stack(folds).sum(0).eq(1).all(), "every image is in exactly one validation fold"
    for fold in folds:
        held_out = {p for p, m in zip(patients, fold.tolist()) if m}
        kept = {p for p, m in zip(patients, fold.tolist()) if not m}
        assert not held_out & kept
        assert set(labels[fold].tolist()) == {0, 1}


def test_too_few_patients_of_a_class_means_no_cross_validation_and_the_default_strength() -> None:
    x, y = blobs(n=12, classes=2)
    y[:] = 0
    y[0] = 1  # one patient of class 1
    head = fit_personal_head(x.float(), y, [f"p{i}" for i in range(12)], 2)
    assert head.folds == 0
    assert head.l2 == pytest.approx(1 / 12)


def test_a_personal_head_separates_what_a_linear_rule_separates_and_round_trips_its_state() -> None:
    x, y = blobs(n=200, classes=2, seed=4)
    x[:, 0] += 6.0 * y.double()  # a clear linear signal
    patients = [f"p{i // 2}" for i in range(200)]
    head = fit_personal_head(x.float(), y, patients, 2)
    assert head.folds >= 2
    accuracy = float((head.logits(x).argmax(1) == y).double().mean())
    assert accuracy > 0.95
    again = PersonalHead.from_state_dict(head.state_dict())
    torch.testing.assert_close(again.logits(x), head.logits(x))


# ---------------------------------------------------------------------------------------------
# On a real site session (a synthetic hospital, a randomly initialised backbone, 32 px)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("training_head", ["own", "fixed_common"])
def test_the_shared_update_is_bit_identical_whatever_the_personal_head(
        hospital, tmp_path: Path, training_head: str) -> None:  # noqa: ANN001
    config = hospital[1].model_copy(
        update={"training": hospital[1].training.model_copy(update={"training_head": training_head})})
    plain = open_site(hospital, tmp_path / "plain", config)
    untouched = dp_round(plain)

    personal = open_site(hospital, tmp_path / "personal", config)
    personal.evaluate("global-0")  # fits and stores a personal head
    stored = personal.state.load_personal_head()
    assert stored is not None and stored[1]["global_id"] == "global-0"
    tampered = {k: (torch.randn_like(v) * 100 if v.is_floating_point() and v.dim() else v) for k, v in stored[0].items()}
    personal.state.save_personal_head(tampered, global_id="global-0", backbone_fingerprint=personal.fingerprint)
    after_head = dp_round(personal)

    assert untouched.keys() == after_head.keys()
    for name in untouched:
        assert torch.equal(untouched[name], after_head[name]), name
    assert plain.privacy_ledger().spent_epsilon() == personal.privacy_ledger().spent_epsilon()


def test_a_dp_round_is_the_same_whatever_the_process_drew_before(hospital, tmp_path: Path) -> None:  # noqa: ANN001
    first = open_site(hospital, tmp_path / "first")
    torch.manual_seed(1)
    torch.rand(1000)
    a = dp_round(first)
    second = open_site(hospital, tmp_path / "second")
    torch.manual_seed(2)
    b = dp_round(second)
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} depends on the global RNG (Poisson sampling or noise)"


def test_without_dp_the_site_model_does_not_collapse_to_one_class(hospital, tmp_path: Path) -> None:  # noqa: ANN001
    _manifest, config, _backbone = hospital
    no_dp = config.model_copy(update={
        "privacy": config.privacy.model_copy(update={"enabled": False}),
        "training": config.training.model_copy(update={"local_epochs": 3}),
    })
    session = open_site(hospital, tmp_path / "no-dp", no_dp)
    for server_round in (1, 2):
        session.train_round(server_round, proximal_mu=0.0, ledger=None)
    head = session.fit_personal_head()  # with the default personal fine-tune
    logits = head.logits(session.personal_features(head, session.test).double())
    assert set(logits.argmax(1).tolist()) == {0, 1}
    report = session.test_report()
    assert report["ci-low"] <= report["balanced-accuracy"] <= report["ci-high"]


def test_a_site_trained_by_two_workers_in_turn_matches_one_worker_training_it_throughout(
    hospital, tmp_path: Path  # noqa: ANN001
) -> None:
    """Ray may run a site's rounds on different workers, each keeping its own session in memory."""
    alone = open_site(hospital, tmp_path / "alone")
    for server_round in (1, 2, 3):
        alone.sync_local_head()
        alone.run_round(server_round, proximal_mu=0.0)

    worker_a = open_site(hospital, tmp_path / "shared")
    worker_a.run_round(1, proximal_mu=0.0)
    worker_b = open_site(hospital, tmp_path / "shared")
    worker_b.load_shared(worker_a.shared_state())
    worker_b.run_round(2, proximal_mu=0.0)
    worker_a.sync_local_head()  # what the ClientApp does before every round
    worker_a.load_shared(worker_b.shared_state())
    worker_a.run_round(3, proximal_mu=0.0)

    expected, actual = alone.model.state_dict(), worker_a.model.state_dict()
    for name in alone.groups.shared + alone.groups.local:
        assert torch.equal(expected[name], actual[name]), name


def test_an_evaluation_of_the_same_global_layers_reuses_the_stored_personal_head(hospital, tmp_path: Path) -> None:  # noqa: ANN001
    session = open_site(hospital, tmp_path / "reuse")
    first = session.evaluate("global-1")
    stored = session.state.load_personal_head()
    assert stored is not None
    shifted = {**stored[0], "bias": stored[0]["bias"] + torch.tensor([50.0, -50.0], dtype=torch.float64)}
    session.state.save_personal_head(shifted, global_id="global-1", backbone_fingerprint=session.fingerprint)
    assert session.evaluate("global-1")["balanced-accuracy"] == pytest.approx(0.5), "the stored head is used"
    assert session.evaluate("global-2") == first, "other global layers mean a new fit"
