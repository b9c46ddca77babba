"""The gate lets the Fleet API and /health through and answers 403 to everything else."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from server.ops.control_gate import FleetOnlyGate, GateSettings, is_forwarded


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/v1/fleet/pull-messages"), ("POST", "/v1/fleet/activate-node"), ("GET", "/health"), ("HEAD", "/health")],
)
def test_fleet_calls_and_health_are_forwarded(method: str, path: str) -> None:
    assert is_forwarded(method, path)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/control/start-run"),
        ("POST", "/v1/control/register-node"),
        ("POST", "/v1/runtime/push-messages"),
        ("POST", "/v1/fleet/../control/start-run"),
        ("POST", "/v1/fleet//pull-messages"),
        ("POST", "/v1/fleet/"),
        ("GET", "/v1/fleet/pull-messages"),
        ("POST", "/health"),
        ("GET", "/docs"),
        ("GET", "/openapi.json"),
    ],
)
def test_control_runtime_and_crafted_paths_are_not_forwarded(method: str, path: str) -> None:
    assert not is_forwarded(method, path)


def test_refused_request_never_reaches_the_superlink(tmp_path: Path) -> None:
    # The upstream is a closed port: a forwarded request would come back 502, a refused one 403.
    gate = FleetOnlyGate(GateSettings(upstream="https://127.0.0.1:9", ca_cert=tmp_path / "unused.crt"))

    async def post(path: str) -> httpx.Response:
        transport = httpx.ASGITransport(app=gate)
        async with httpx.AsyncClient(transport=transport, base_url="https://gate") as client:
            return await client.post(path, content=b"x")

    response = asyncio.run(post("/v1/control/start-run"))

    assert response.status_code == 403
    assert b"fedtl-coordinator run" in response.content


def test_fleet_call_to_a_superlink_that_is_down_answers_502_so_supernodes_retry(tmp_path: Path) -> None:
    from server.ops.federation_pki import init_pki

    pki = init_pki(tmp_path)
    gate = FleetOnlyGate(GateSettings(upstream="https://127.0.0.1:9", ca_cert=pki.ca_cert))

    async def post(path: str) -> httpx.Response:
        transport = httpx.ASGITransport(app=gate)
        async with httpx.AsyncClient(transport=transport, base_url="https://gate") as client:
            return await client.post(path, content=b"x")

    response = asyncio.run(post("/v1/fleet/pull-messages"))

    assert response.status_code == 502
