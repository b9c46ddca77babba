"""Strategies are registered by name; each owns the client-side keys its rule needs."""

from __future__ import annotations

import pytest

from common import wire_contract as wc
from common.config import StrategyConfig
from server.strategies import Strategy, make_aggregator, register_strategy, registered_strategies
from server.strategies import base as strategy_base


def test_every_configurable_strategy_name_is_registered() -> None:
    names = set(StrategyConfig.model_fields["name"].annotation.__args__)  # the Literal's values
    assert names == set(registered_strategies())


def test_fedprox_sends_its_mu_and_the_others_send_no_proximal_pull() -> None:
    assert make_aggregator(StrategyConfig(name="fedprox", proximal_mu=0.3)).client_config() == {
        wc.CONFIG_PROXIMAL_MU: 0.3}
    for name in ("fedavg", "fedadam", "trimmed_mean"):
        assert make_aggregator(StrategyConfig(name=name, proximal_mu=0.3)).client_config() == {
            wc.CONFIG_PROXIMAL_MU: 0.0}, name
    for name in registered_strategies():  # whatever a strategy sends, the contract declares it
        keys = set(make_aggregator(StrategyConfig(name=name)).client_config())
        assert all(key in vars(wc).values() for key in keys), name


def test_a_new_strategy_is_one_registration_and_a_name_cannot_be_taken_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(strategy_base, "_REGISTRY", dict(strategy_base._REGISTRY))

    class KeepGlobal(Strategy):
        def aggregate(self, global_weights, updates):  # noqa: ANN001, ANN201
            return dict(global_weights)

    register_strategy("keep_global")(lambda config: KeepGlobal())
    assert "keep_global" in registered_strategies()
    with pytest.raises(ValueError, match="twice"):
        register_strategy("fedavg")(lambda config: KeepGlobal())
