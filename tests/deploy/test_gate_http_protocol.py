"""A connection to the gate has ``idle_timeout_s`` to send a complete request head (idle and slowloris
connections close); a request being served is not cut by that deadline; a head over the cap is refused."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn

from server.ops.gate_http_protocol import HeadDeadlineH11Protocol
from tests.deploy.harness import free_port

DEADLINE_S = 1


async def _slow_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Reads the whole body (however slow), then answers 200."""
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body", False):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    chosen = free_port()
    config = uvicorn.Config(app=_slow_app, host="127.0.0.1", port=chosen, http=HeadDeadlineH11Protocol, ws="none",
                            timeout_keep_alive=DEADLINE_S, lifespan="off", log_config=None, access_log=False,
                            h11_max_incomplete_event_size=4096)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield chosen
    server.should_exit = True
    thread.join(timeout=5)


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        return sock.recv(1024) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def test_a_connection_that_never_sends_a_request_is_closed_after_the_deadline(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        assert _closed_within(sock, DEADLINE_S + 2)


def test_a_request_head_sent_a_byte_at_a_time_is_closed_after_the_deadline(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        started = time.monotonic()
        closed = False
        for byte in b"POST /v1/fleet/pull-messages HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            if _closed_within(sock, 0.2):
                closed = True
                break
        assert closed and time.monotonic() - started < DEADLINE_S + 2


def test_a_request_whose_body_is_still_arriving_is_not_cut_by_the_head_deadline(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\n")
        for byte in b"abcd":
            time.sleep(DEADLINE_S * 0.8)
            sock.sendall(bytes([byte]))
        sock.settimeout(5)
        assert sock.recv(1024).startswith(b"HTTP/1.1 200")


def test_a_request_head_growing_past_the_cap_is_refused(port: int) -> None:
    answer = b""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"POST /x HTTP/1.1\r\nHost: x\r\n")
        try:
            for _ in range(64):  # 64 KiB of headers, in pieces as they would arrive (TLS records are <= 16 KiB)
                sock.sendall(b"X-Big: " + b"a" * 1000 + b"\r\n")
                time.sleep(0.005)
        except OSError:
            pass
        sock.settimeout(5)
        try:
            answer = sock.recv(1024)
        except OSError:
            pass
    assert answer.startswith(b"HTTP/1.1 400"), answer  # h11 gives up at the cap, before any app code runs


async def _refusing_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers 413 with Connection: close without reading the body (what the gate does to an oversized one)."""
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-length", b"0"), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": b""})


def test_a_refused_tls_connection_is_cut_off_not_drained_while_the_peer_keeps_sending(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    import ssl

    from server.ops.federation_pki import init_pki

    pki = init_pki(tmp_path_factory.mktemp("pki"), hosts=["localhost"], ips=["127.0.0.1"])
    chosen = free_port()
    config = uvicorn.Config(app=_refusing_app, host="127.0.0.1", port=chosen, http=HeadDeadlineH11Protocol, ws="none",
                            lifespan="off", log_config=None, access_log=False, ssl_certfile=str(pki.server_cert),
                            ssl_keyfile=str(pki.server_key))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)  # uvicorn's own loop choice (uvloop), as the gate
    thread.start()
    while not server.started:
        time.sleep(0.05)
    accepted = 0
    try:
        context = ssl.create_default_context(cafile=str(pki.ca_cert))
        with context.wrap_socket(socket.create_connection(("127.0.0.1", chosen)), server_hostname="localhost") as sock:
            sock.sendall(b"POST /v1/fleet/get-run HTTP/1.1\r\nHost: x\r\nContent-Length: 314572800\r\n\r\n")
            sock.settimeout(5)
            answer = sock.recv(1024)
            try:
                while accepted < 300 << 20:
                    sock.sendall(b"\0" * (1 << 20))
                    accepted += 1 << 20
            except (OSError, ssl.SSLError):
                pass
    finally:
        server.should_exit = True
        thread.join(timeout=5)

    assert answer.startswith(b"HTTP/1.1 413")
    assert accepted < 64 << 20, f"the server read {accepted >> 20} MiB after refusing the request"
