"""The gate lets the Fleet API and /health through, answers 403 to everything else, and refuses before
reading a body what no SuperNode would send: no node-auth headers (401), a body over the cap (413),
a body too slow (408); when every forwarding slot is busy it answers 503 (SuperNodes retry)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.ops.control_gate import FleetOnlyGate, GateSettings, is_forwarded
from server.ops.gate_limits import MIB, GateLimits
from tests.deploy.gate_fakes import FakeSuperLink, chunks, flower_signed_headers

CAP = 6 * MIB


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
        ("POST", "/v1/fleet/get-run\n"),
        ("POST", "/v1/fleet/get-run\r\n"),
        ("GET", "/health\n"),
        ("GET", "/v1/fleet/pull-messages"),
        ("POST", "/health"),
        ("GET", "/docs"),
        ("GET", "/openapi.json"),
    ],
)
def test_control_runtime_and_crafted_paths_are_not_forwarded(method: str, path: str) -> None:
    assert not is_forwarded(method, path)


def _gate(upstream: FakeSuperLink, **limits: Any) -> FleetOnlyGate:
    settings = GateSettings(
        upstream="https://superlink", ca_cert=Path("unused.crt"), limits=GateLimits(max_request_bytes=CAP, **limits)
    )
    return FleetOnlyGate(settings, upstream_transport=httpx.ASGITransport(app=upstream))


async def _post(gate: FleetOnlyGate, path: str, content: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    transport = httpx.ASGITransport(app=gate)
    async with httpx.AsyncClient(transport=transport, base_url="https://gate") as client:
        return await client.post(path, content=content, headers=headers or {})


class _CountingReceive:
    """An ASGI ``receive`` that counts how often the app asked for the body."""

    def __init__(self, messages: list[dict[str, Any]], hang: bool = False) -> None:
        self.messages = messages
        self.calls = 0
        self.hang = hang

    async def __call__(self) -> dict[str, Any]:
        self.calls += 1
        if self.messages:
            return self.messages.pop(0)
        if self.hang:
            await asyncio.sleep(3600)
        return {"type": "http.disconnect"}


async def _call_raw(gate: FleetOnlyGate, path: str, headers: dict[str, str], receive: _CountingReceive) -> int:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "method": "POST", "path": path, "client": ("198.51.100.7", 5000),
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }
    await gate(scope, receive, send)
    return int(sent[0]["status"])


def test_refused_request_never_reaches_the_superlink() -> None:
    upstream = FakeSuperLink()

    response = asyncio.run(_post(_gate(upstream), "/v1/control/start-run", b"x"))

    assert response.status_code == 403
    assert b"fedtl-coordinator run" in response.content
    assert upstream.started == 0


def test_fleet_call_to_a_superlink_that_is_down_answers_502_so_supernodes_retry(tmp_path: Path) -> None:
    from server.ops.federation_pki import init_pki

    pki = init_pki(tmp_path)
    gate = FleetOnlyGate(GateSettings(upstream="https://127.0.0.1:9", ca_cert=pki.ca_cert))

    response = asyncio.run(_post(gate, "/v1/fleet/pull-messages", b"x", flower_signed_headers()))

    assert response.status_code == 502


def test_a_fleet_call_without_node_auth_headers_gets_401_before_its_body_is_read_and_never_reaches_the_superlink() -> None:
    upstream = FakeSuperLink()
    receive = _CountingReceive([{"type": "http.request", "body": b"\0" * 1024, "more_body": True}])

    status = asyncio.run(_call_raw(_gate(upstream), "/v1/fleet/get-run", {"content-length": str(300 * MIB)}, receive))

    assert status == 401
    assert receive.calls == 0
    assert upstream.started == 0


def test_health_needs_no_node_auth_headers() -> None:
    upstream = FakeSuperLink()

    async def get() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=_gate(upstream)), base_url="https://gate") as client:
            return await client.get("/health")

    assert asyncio.run(get()).status_code == 200
    assert upstream.completed == 1


def test_a_signed_fleet_call_reaches_the_superlink_with_its_body_and_auth_headers() -> None:
    upstream = FakeSuperLink()
    signed = flower_signed_headers()

    response = asyncio.run(_post(_gate(upstream), "/v1/fleet/push-object", b"\1" * (5 * MIB + 200), signed))

    assert response.status_code == 200
    assert upstream.bodies == [5 * MIB + 200]
    assert {k: upstream.headers[0][k] for k in signed} == signed


def test_a_declared_length_over_the_cap_gets_413_before_any_of_the_body_is_read() -> None:
    upstream = FakeSuperLink()
    receive = _CountingReceive([{"type": "http.request", "body": b"\0" * 1024, "more_body": True}])
    headers = {**flower_signed_headers(), "content-length": str(CAP + 1)}

    status = asyncio.run(_call_raw(_gate(upstream), "/v1/fleet/push-object", headers, receive))

    assert status == 413
    assert receive.calls == 0
    assert upstream.started == 0


def test_a_chunked_body_is_cut_off_with_413_once_it_passes_the_cap_and_the_superlink_never_gets_it_whole() -> None:
    upstream = FakeSuperLink()
    gate = _gate(upstream)

    response = asyncio.run(_post(gate, "/v1/fleet/push-object", chunks(300 * MIB), flower_signed_headers()))

    assert response.status_code == 413
    assert upstream.completed == 0
    assert gate.largest_bodies == {}


def test_a_body_slower_than_the_deadline_gets_408() -> None:
    upstream = FakeSuperLink()
    receive = _CountingReceive([{"type": "http.request", "body": b"\0" * 10, "more_body": True}], hang=True)
    gate = _gate(upstream, body_timeout_s=0.3)

    status = asyncio.run(_call_raw(gate, "/v1/fleet/push-object", flower_signed_headers(), receive))

    assert status == 408
    assert upstream.completed == 0


def test_when_every_forwarding_slot_is_busy_a_request_waits_then_gets_503_which_supernodes_retry() -> None:
    async def scenario() -> tuple[int, int]:
        upstream = FakeSuperLink(hold=asyncio.Event())
        gate = _gate(upstream, max_forwards=1, forward_wait_s=0.3)
        first = asyncio.create_task(_post(gate, "/v1/fleet/pull-messages", b"a", flower_signed_headers()))
        while upstream.started == 0:
            await asyncio.sleep(0.01)
        second = await _post(gate, "/v1/fleet/pull-messages", b"b", flower_signed_headers())
        upstream.hold.set()
        return (await first).status_code, second.status_code

    first_status, second_status = asyncio.run(scenario())

    assert (first_status, second_status) == (200, 503)


def test_the_largest_forwarded_body_per_fleet_call_is_recorded_for_the_shutdown_log() -> None:
    upstream = FakeSuperLink()
    gate = _gate(upstream)

    async def both() -> None:
        await _post(gate, "/v1/fleet/push-object", b"\0" * 1000, flower_signed_headers())
        await _post(gate, "/v1/fleet/push-object", b"\0" * 10, flower_signed_headers())

    asyncio.run(both())

    assert gate.largest_bodies == {"/v1/fleet/push-object": 1000}


@pytest.mark.parametrize("limits", [{"max_request_bytes": 1 * MIB}, {"max_forwards": 0}, {"body_timeout_s": -1.0}])
def test_caps_that_would_break_the_federation_or_make_no_sense_are_refused_by_name(limits: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(limits))):
        GateLimits(**limits)


def test_a_flood_of_refusals_is_logged_as_a_burst_then_counted_not_line_by_line(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from server.ops import control_gate

    clock = [1000.0]
    monkeypatch.setattr(control_gate.time, "monotonic", lambda: clock[0])
    refusals = control_gate._RefusalLog()

    with caplog.at_level("WARNING", logger="server.ops.control_gate"):
        for _ in range(control_gate.REFUSAL_LOG_BURST + 30):
            refusals.warning("refused %s", "x")
        clock[0] += control_gate.REFUSAL_LOG_WINDOW_S
        refusals.warning("refused %s", "y")

    messages = [record.getMessage() for record in caplog.records]
    assert messages.count("refused x") == control_gate.REFUSAL_LOG_BURST
    assert "30 more refusals in the last 10 s not logged one by one" in messages
    assert messages[-1] == "refused y"


def test_start_flags_set_the_gate_caps_and_the_defaults_are_the_documented_ones() -> None:
    from server.ops.coordinator_service import build_parser
    from server.ops.gate_limits import gate_limits_from_args

    defaults = gate_limits_from_args(build_parser().parse_args(["start"]))
    chosen = gate_limits_from_args(build_parser().parse_args([
        "start", "--max-request-mb", "16", "--max-connections", "4096", "--max-forwards", "64",
        "--idle-timeout-s", "30", "--body-timeout-s", "300",
    ]))

    assert defaults == GateLimits() and defaults.max_request_bytes == 8 * MIB
    assert chosen == GateLimits(max_request_bytes=16 * MIB, max_connections=4096, max_forwards=64,
                                idle_timeout_s=30.0, body_timeout_s=300.0)


def test_a_cap_below_one_flower_array_chunk_is_refused_at_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    from server.ops.coordinator_service import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["start", "--max-request-mb", "4"])

    assert "--max-request-mb" in capsys.readouterr().err
