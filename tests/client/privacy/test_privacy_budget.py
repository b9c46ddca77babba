"""Specification of the site's privacy budget: planned once, cumulative, persisted, never reset."""

from __future__ import annotations

import hashlib

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from client.privacy.privacy_budget import LedgerCorruptError, LedgerPlanMismatchError, PrivacyBudgetError, PrivacyLedger
from client.privacy.privacy_plan import plan_noise, planned_steps, sample_rate_for, steps_per_epoch

REPO_ROOT = Path(__file__).resolve().parents[3]
N_TRAIN = 64
BATCH = 16
ROUNDS = 3
EPSILON = 3.0
DELTA = 1e-3


@pytest.fixture(autouse=True)
def _quiet_opacus_warnings() -> None:
    warnings.filterwarnings("ignore", module="opacus")
    warnings.filterwarnings("ignore", message=".*Optimal order.*")
    warnings.filterwarnings("ignore", message=".*Full backward hook.*")


def _plan() -> dict:
    rate = sample_rate_for(N_TRAIN, BATCH)
    return {
        "target_epsilon": EPSILON,
        "delta": DELTA,
        "sample_rate": rate,
        "planned_steps": planned_steps(ROUNDS, 1, rate),
        "accountant": "rdp",
    }


def _loader(seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(N_TRAIN, 4, generator=generator)
    labels = torch.randint(0, 2, (N_TRAIN,), generator=generator)
    return DataLoader(TensorDataset(features, labels), batch_size=BATCH)


def _train_one_round(ledger: PrivacyLedger, seed: int) -> float:
    """One federated round the way the client is meant to do it; returns the recorded epsilon."""
    torch.manual_seed(seed)
    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = PrivacyEngine(accountant=ledger.accountant_kind)
    ledger.attach(engine)
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=_loader(seed),
        noise_multiplier=ledger.noise_multiplier,
        max_grad_norm=1.0,
    )
    steps = len(loader)
    assert ledger.can_spend(steps)
    ledger.reserve(steps)
    try:
        for features, labels in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(features), labels).backward()
            optimizer.step()
    finally:
        epsilon = ledger.record(engine.accountant)
    return epsilon


def test_new_ledger_is_written_to_disk_and_spends_nothing(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger.load_or_create(path, **_plan())
    assert path.exists()
    assert ledger.spent_epsilon() == 0.0
    assert ledger.rounds_done == 0
    assert ledger.noise_multiplier == pytest.approx(plan_noise(**_plan()))


def test_epsilon_is_cumulative_across_rounds_and_equals_one_accountant_over_all_steps(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ledger.json"
    epsilons = []
    for round_index in range(ROUNDS):
        ledger = PrivacyLedger.load_or_create(path, **_plan())  # a fresh object each round
        epsilons.append(_train_one_round(ledger, seed=round_index))

    assert epsilons[0] < epsilons[1] < epsilons[2]
    final = PrivacyLedger.load(path)
    assert final.rounds_done == ROUNDS
    assert final.steps_done == _plan()["planned_steps"]
    reference = RDPAccountant()
    reference.history = [(final.noise_multiplier, final.sample_rate, final.steps_done)]
    assert epsilons[-1] == pytest.approx(reference.get_epsilon(delta=DELTA))
    assert epsilons[-1] <= EPSILON


def test_site_declines_a_round_beyond_the_planned_budget(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    for round_index in range(ROUNDS):
        _train_one_round(PrivacyLedger.load_or_create(path, **_plan()), seed=round_index)
    ledger = PrivacyLedger.load_or_create(path, **_plan())
    one_round = steps_per_epoch(ledger.sample_rate)
    assert ledger.projected_epsilon(one_round) > EPSILON
    assert not ledger.can_spend(one_round)
    assert ledger.can_spend(0)


def test_a_fresh_privacy_engine_per_round_would_under_report_what_the_ledger_counts(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ledger.json"
    _train_one_round(PrivacyLedger.load_or_create(path, **_plan()), seed=0)
    ledger = PrivacyLedger.load_or_create(path, **_plan())
    naive_engine_accountant = RDPAccountant()
    naive_engine_accountant.history = [(ledger.noise_multiplier, ledger.sample_rate, 4)]
    cumulative = _train_one_round(ledger, seed=1)
    assert cumulative > naive_engine_accountant.get_epsilon(delta=DELTA) * 1.2


def test_budget_resumes_in_a_new_process(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    spent = _train_one_round(PrivacyLedger.load_or_create(path, **_plan()), seed=0)
    script = (
        "import sys, warnings; warnings.filterwarnings('ignore');"
        "from client.privacy.privacy_budget import PrivacyLedger;"
        "ledger = PrivacyLedger.load(sys.argv[1]);"
        "print(repr(ledger.spent_epsilon()), ledger.rounds_done)"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    epsilon_text, rounds_text = result.stdout.split()
    assert float(epsilon_text) == pytest.approx(spent)
    assert int(rounds_text) == 1


def test_restored_accountant_carries_the_history_into_opacus(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    _train_one_round(PrivacyLedger.load_or_create(path, **_plan()), seed=0)
    ledger = PrivacyLedger.load(path)
    engine = PrivacyEngine(accountant="rdp")
    ledger.attach(engine)
    assert engine.get_epsilon(DELTA) == pytest.approx(ledger.spent_epsilon())
    json.dumps(engine.accountant.state_dict())  # the history is JSON-safe


def test_recording_a_fresh_accountant_is_refused_and_keeps_the_ledger(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    _train_one_round(PrivacyLedger.load_or_create(path, **_plan()), seed=0)
    ledger = PrivacyLedger.load(path)
    before = path.read_bytes()
    forgetful = RDPAccountant()
    forgetful.step(noise_multiplier=ledger.noise_multiplier, sample_rate=ledger.sample_rate)
    with pytest.raises(PrivacyBudgetError, match="attach"):
        ledger.record(forgetful)
    assert path.read_bytes() == before


def test_a_round_that_died_mid_way_counts_its_reserved_steps_as_spent(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger.load_or_create(path, **_plan())
    ledger.reserve(4)  # ... and the process is killed before record()
    resumed = PrivacyLedger.load(path)
    assert resumed.steps_done == 4
    assert resumed.reserved_steps == 0
    assert resumed.spent_epsilon() == pytest.approx(ledger.projected_epsilon(0))
    assert resumed.spent_epsilon() > 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"delta": DELTA / 2}, "delta"),
        ({"sample_rate": 1 / 2}, "sample rate"),
        ({"accountant": "prv"}, "accountant"),
        ({"target_epsilon": EPSILON * 2}, "can not be raised"),
        ({"unit": "patient"}, "unit can not change"),
    ],
)
def test_incompatible_plan_change_is_refused_and_never_resets_the_budget(
    tmp_path: Path, change: dict, message: str
) -> None:
    path = tmp_path / "ledger.json"
    spent = _train_one_round(PrivacyLedger.load_or_create(path, **_plan()), seed=0)
    before = path.read_bytes()
    with pytest.raises(LedgerPlanMismatchError, match=message) as raised:
        PrivacyLedger.load_or_create(path, **{**_plan(), **change})
    assert str(path) in str(raised.value)
    assert path.read_bytes() == before
    assert PrivacyLedger.load(path).spent_epsilon() == pytest.approx(spent)


def test_lowering_the_target_is_accepted_and_makes_the_site_stricter(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    original = PrivacyLedger.load_or_create(path, **_plan())
    stricter = PrivacyLedger.load_or_create(path, **{**_plan(), "target_epsilon": 1.0})
    assert stricter.noise_multiplier == original.noise_multiplier
    assert stricter.target_epsilon == 1.0
    assert PrivacyLedger.load(path).target_epsilon == 1.0
    assert not stricter.can_spend(_plan()["planned_steps"])


def test_truncated_ledger_refuses_to_train_and_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    _train_one_round(PrivacyLedger.load_or_create(path, **_plan()), seed=0)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(LedgerCorruptError) as raised:
        PrivacyLedger.load_or_create(path, **_plan())
    assert str(path) in str(raised.value)
    assert "refuses to train" in str(raised.value)
    assert path.read_bytes()[:40] == path.read_bytes()  # not overwritten with a fresh ledger


def test_hand_edited_ledger_is_detected_by_its_checksum(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    _train_one_round(PrivacyLedger.load_or_create(path, **_plan()), seed=0)
    document = json.loads(path.read_text())
    document["ledger"]["history"] = []  # "forget" the spent budget
    path.write_text(json.dumps(document))
    with pytest.raises(LedgerCorruptError, match="checksum"):
        PrivacyLedger.load(path)


def test_prv_accountant_is_supported(tmp_path: Path) -> None:
    plan = {**_plan(), "accountant": "prv"}
    ledger = PrivacyLedger.load_or_create(tmp_path / "ledger.json", **plan)
    assert ledger.accountant().mechanism() == "prv"
    assert 0 < ledger.projected_epsilon(plan["planned_steps"]) <= EPSILON + 0.05


def test_a_ledger_written_before_the_patient_unit_existed_reads_as_image_level(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    PrivacyLedger.load_or_create(path, **_plan())
    document = json.loads(path.read_text())
    del document["ledger"]["plan"]["unit"]
    document["checksum"] = hashlib.sha256(
        json.dumps(document["ledger"], sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    path.write_text(json.dumps(document))

    assert PrivacyLedger.load(path).unit == "image"
