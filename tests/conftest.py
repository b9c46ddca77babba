"""Shared test set-up: quiet, deterministic, one CPU thread per test process.

``make test`` runs the suite on two pytest-xdist workers, one module per work unit
(``--dist loadscope``: a module's module-scoped federation is started once, by one worker).
The modules below take most of the suite's time, mostly waiting on Flower (heartbeat windows,
round timeouts); they are handed out first so that the two workers end together instead of one
starting a five-minute module at the end. Serial runs only see the modules in another order.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import torch  # noqa: E402

torch.set_num_threads(1)

LONGEST_FIRST = (  # measured on 2 cores, serial (pytest --durations)
    "tests/deploy/test_real_federation.py",  # ~300 s: two real federations with a crash and a restart
    "tests/deploy/test_loopback_federation.py",  # ~90 s
    "tests/simulations/test_simulation_end_to_end.py",  # ~70 s
    "tests/deploy/test_gate_under_abuse.py",  # ~40 s
    "tests/simulations/test_ray_cluster.py",  # ~35 s
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Put the longest modules first, keeping every module's own test order."""
    rank = {path: index for index, path in enumerate(LONGEST_FIRST)}

    def key(item: pytest.Item) -> int:
        path = item.nodeid.split("::", 1)[0]
        return rank.get(path, len(rank))

    items.sort(key=key)  # stable: the order within a module and among the rest is unchanged
