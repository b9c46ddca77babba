"""The cached RDP epsilon is Opacus' RDP accountant's epsilon, to the last bit."""

from __future__ import annotations

import pytest
from opacus.accountants import RDPAccountant

from client.privacy.rdp_epsilon import rdp_epsilon

HISTORIES = [
    [(0.72, 0.0625, 32)],
    [(1.1, 0.1, 10), (1.1, 0.05, 7), (0.9, 0.1, 100)],
    [(5.0, 0.5, 1)],
    [(0.6, 0.01, 5000)],
]


@pytest.mark.parametrize("history", HISTORIES)
@pytest.mark.parametrize("delta", [1e-3, 1e-5, 1e-7])
def test_epsilon_equals_opacus_rdp_accountant(history: list[tuple[float, float, int]], delta: float) -> None:
    accountant = RDPAccountant()
    accountant.history = list(history)
    assert rdp_epsilon(history, delta) == accountant.get_epsilon(delta=delta)


def test_more_steps_spend_more_and_no_steps_spend_nothing() -> None:
    assert rdp_epsilon([], 1e-5) == 0.0
    assert rdp_epsilon([(1.0, 0.1, 10)], 1e-5) < rdp_epsilon([(1.0, 0.1, 11)], 1e-5)
