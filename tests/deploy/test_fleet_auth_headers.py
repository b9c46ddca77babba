"""The gate's node-auth check accepts what a Flower SuperNode sends and refuses what it never would."""

from __future__ import annotations

import base64
import datetime

import pytest

from server.ops import fleet_auth_headers as auth
from tests.deploy.gate_fakes import flower_signed_headers


def _raw(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(name.encode(), value.encode()) for name, value in headers.items()]


def test_the_header_names_are_the_ones_the_installed_flower_signs_with() -> None:
    from flwr.common.constant import TIMESTAMP_HEADER
    from flwr.supercore.constant import FLEET_HTTP_PUBLIC_KEY_HEADER, FLEET_HTTP_SIGNATURE_HEADER

    assert auth.PUBLIC_KEY_HEADER.decode() == FLEET_HTTP_PUBLIC_KEY_HEADER
    assert auth.SIGNATURE_HEADER.decode() == FLEET_HTTP_SIGNATURE_HEADER
    assert auth.TIMESTAMP_HEADER.decode() == TIMESTAMP_HEADER
    assert set(flower_signed_headers()) == {name.decode() for name in auth.NODE_AUTH_HEADERS}


def test_headers_made_by_flowers_own_supernode_interceptor_pass() -> None:
    assert auth.node_auth_problem(_raw(flower_signed_headers())) is None


def _with(**changes: str | None) -> dict[str, str]:
    headers = flower_signed_headers()
    for name, value in changes.items():
        key = name.replace("_", "-")
        if value is None:
            headers.pop(key)
        else:
            headers[key] = value
    return headers


@pytest.mark.parametrize(
    ("headers", "named"),
    [
        ({}, "flwr-public-key"),
        (_with(flwr_public_key=None), "flwr-public-key"),
        (_with(flwr_signature=None), "flwr-signature"),
        (_with(flwr_timestamp=None), "flwr-timestamp"),
        (_with(flwr_public_key="not base64!"), "flwr-public-key"),
        (_with(flwr_public_key="A" * 4000), "flwr-public-key"),
        (_with(flwr_public_key=base64.b64encode(b"just some bytes").decode()), "PEM"),
        (_with(flwr_signature="%%%%"), "flwr-signature"),
        (_with(flwr_signature=base64.b64encode(b"x" * 2000).decode()), "flwr-signature"),
        (_with(flwr_signature=""), "flwr-signature"),
        (_with(flwr_timestamp="yesterday"), "flwr-timestamp"),
        (_with(flwr_timestamp="2026-01-01T00:00:00"), "time zone"),
        (_with(flwr_timestamp="2001-01-01T00:00:00+00:00"), "window"),
        (_with(flwr_timestamp="9" * 100), "flwr-timestamp"),
    ],
    ids=["none", "no-key", "no-signature", "no-timestamp", "key-not-base64", "key-too-long", "key-not-pem",
         "signature-not-base64", "signature-too-long", "signature-empty", "timestamp-not-iso", "timestamp-naive",
         "timestamp-stale", "timestamp-too-long"],
)
def test_missing_or_malformed_node_auth_headers_are_refused_with_the_header_named(headers: dict[str, str], named: str) -> None:
    problem = auth.node_auth_problem(_raw(headers))

    assert problem is not None and named in problem


def test_a_duplicated_header_is_refused() -> None:
    headers = _raw(flower_signed_headers())

    assert "2 flwr-signature" in (auth.node_auth_problem(headers + [(b"flwr-signature", headers[-1][1])]) or "")


def test_the_window_is_never_stricter_than_flowers_own() -> None:
    signed = flower_signed_headers()
    signed_at = datetime.datetime.fromisoformat(signed["flwr-timestamp"])

    just_inside_flower = [signed_at - datetime.timedelta(seconds=4.9), signed_at + datetime.timedelta(seconds=304.9)]

    assert all(auth.node_auth_problem(_raw(signed), now=now) is None for now in just_inside_flower)


def test_the_reason_never_repeats_the_peers_header_value() -> None:
    forged = "2026-12-02 07:00:00,000 server.ops.coordinator_service INFO registered hospital key evil"

    problem = auth.node_auth_problem(_raw(_with(flwr_timestamp=forged))) or ""

    assert "registered" not in problem and "evil" not in problem
