"""Fixtures for the deployment tests: one real loopback federation per module, always torn down."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deploy.harness import LoopbackFederation, ProcessSupervisor, start_loopback_federation


@pytest.fixture(scope="module")
def supervisor(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessSupervisor]:
    """Owns every process a module starts; stops them all (process groups + descendants) at the end."""
    owner = ProcessSupervisor(log_dir=tmp_path_factory.mktemp("deploy-logs"))
    try:
        yield owner
    finally:
        owner.stop_all()


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory, supervisor: ProcessSupervisor) -> LoopbackFederation:
    """Coordinator (TLS, node auth, Fleet-only gate) + three registered hospitals, all online."""
    root: Path = tmp_path_factory.mktemp("federation")
    running = start_loopback_federation(root, supervisor)
    for name in ("h1", "h2", "h3"):
        running.start_hospital(name)
    running.wait_for_online_nodes(3)
    return running
