"""``training.training_head``: the head the DP-SGD steps train the shared layers through.

``own`` (the default): each site's local head starts from its own seed and is trained by the same DP-SGD.
``fixed_common`` (FedBABU): every site holds the same seeded head and never trains it; only the shared layers
learn. The head is data-independent either way, so neither costs privacy beyond the DP steps.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from client.site_session import SiteSession
from common.config import FederationConfig
from tests.client.hospital_fixture import open_site


def with_head(config: FederationConfig, mode: str) -> FederationConfig:
    return config.model_copy(update={"training": config.training.model_copy(update={"training_head": mode})})


def head_of(session: SiteSession) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in session.model.state_dict().items()
            if name in set(session.groups.local)}


def open_as(hospital, state_dir: Path, config: FederationConfig, site_name: str) -> SiteSession:  # noqa: ANN001
    session = open_site(hospital, state_dir, config)
    settings = dataclasses.replace(session.settings, site_name=site_name)
    return SiteSession.open(settings, config, session.fingerprint)


def equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_fixed_common_head_is_the_same_at_every_site_and_never_trained(hospital, tmp_path: Path) -> None:  # noqa: ANN001
    config = with_head(hospital[1], "fixed_common")
    first = open_as(hospital, tmp_path / "a", config, "hospital-a")
    second = open_as(hospital, tmp_path / "b", config, "hospital-b")
    assert equal(head_of(first), head_of(second))

    head, shared = head_of(first), first.shared_state()
    outcome = first.run_round(1, proximal_mu=0.0)
    assert outcome.shared is not None and outcome.epsilon > 0
    assert equal(head_of(first), head), "the common head is never trained"
    assert not equal(outcome.shared, shared), "the shared layers learn through it"
    reopened = open_as(hospital, tmp_path / "a", config, "hospital-a")
    assert equal(head_of(reopened), head)


def test_each_sites_own_head_starts_from_its_own_seed_and_is_trained(hospital, tmp_path: Path) -> None:  # noqa: ANN001
    config = with_head(hospital[1], "own")
    first = open_as(hospital, tmp_path / "a", config, "hospital-a")
    second = open_as(hospital, tmp_path / "b", config, "hospital-b")
    assert not equal(head_of(first), head_of(second))
    head = head_of(first)
    first.run_round(1, proximal_mu=0.0)
    assert not equal(head_of(first), head)


def test_a_fixed_head_without_a_personal_head_is_refused_with_what_to_set(hospital) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match="personal_head = 'linear_probe'"):
        FederationConfig.from_dict({**hospital[1].model_dump(mode="json"),
                                    "training": {"training_head": "fixed_common", "personal_head": "none"}})
