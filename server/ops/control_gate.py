"""The coordinator's network face: a TLS front that lets hospitals reach the Fleet API and nothing else.

Flower 1.41's ``flower-superlink`` serves three APIs on ONE HTTP port: Fleet (``/v1/fleet/*``,
what SuperNodes use), Control (``/v1/control/*``, what ``flwr run`` uses to submit code that every
hospital then executes; no user authentication in the open-source build) and Runtime
(``/v1/runtime/*``, what the ServerApp process uses). They cannot be bound to different addresses.

So the coordinator binds the SuperLink to 127.0.0.1 only and puts this gate on the network address:
uvicorn terminating TLS with the federation's server certificate, forwarding

* ``POST /v1/fleet/<name>`` (the Fleet API; SuperNode authentication headers pass through untouched
  and are checked by the SuperLink itself), and
* ``GET``/``HEAD /health``

to the loopback SuperLink over TLS (verified against the federation CA). Every other method or
path is answered ``403`` without reaching the SuperLink. Paths are matched on the decoded path
against a strict pattern (no ``..``, no ``//``, no query string is forwarded), so a crafted path
cannot be normalised into a Control route on the way through.
"""

from __future__ import annotations

import logging
import re
import ssl
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

FLEET_PATH = re.compile(r"^/v1/fleet/[a-z0-9][a-z0-9-]*$")
HEALTH_PATH = "/health"
MAX_BODY_BYTES = 1 << 30  # Fleet objects are chunked by Flower; 1 GiB is a generous ceiling
UPSTREAM_TIMEOUT_S = 300.0

_HOP_BY_HOP = frozenset(
    {
        b"host",
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
    }
)
REFUSAL = (
    b"This address serves the Fleet API only (hospital SuperNodes). Runs are started on the "
    b"coordinator machine itself: fedtl-coordinator run APP_DIR.\n"
)


def is_forwarded(method: str, path: str) -> bool:
    """True when a request with this method and decoded path may reach the SuperLink."""
    if method == "POST" and FLEET_PATH.match(path):
        return True
    return method in ("GET", "HEAD") and path == HEALTH_PATH


@dataclass(frozen=True)
class GateSettings:
    """Where the gate forwards to and how it checks the SuperLink behind it.

    upstream : base URL of the loopback SuperLink, e.g. ``https://127.0.0.1:9093``.
    ca_cert : federation CA certificate used to verify the SuperLink's TLS certificate.
    """

    upstream: str
    ca_cert: Path


class FleetOnlyGate:
    """ASGI application forwarding Fleet API calls to the loopback SuperLink and refusing the rest."""

    def __init__(self, settings: GateSettings) -> None:
        self.settings = settings
        self._client: httpx.AsyncClient | None = None

    def _http_client(self) -> httpx.AsyncClient:
        if self._client is None:
            verify = ssl.create_default_context(cafile=str(self.settings.ca_cert))
            self._client = httpx.AsyncClient(
                base_url=self.settings.upstream, verify=verify, timeout=UPSTREAM_TIMEOUT_S
            )
        return self._client

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        method: str = scope["method"]
        path: str = scope["path"]
        if not is_forwarded(method, path):
            logger.warning(
                "refused %s %s from %s: only the Fleet API is reachable from the network",
                method,
                path,
                (scope.get("client") or ("?",))[0],
            )
            await _respond(send, 403, REFUSAL)
            return
        body = await _read_body(receive)
        if body is None:
            await _respond(send, 413, b"request body too large\n")
            return
        await self._forward(scope, method, path, body, send)

    async def _forward(self, scope: Scope, method: str, path: str, body: bytes, send: Send) -> None:
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in _HOP_BY_HOP]
        client = self._http_client()
        try:
            request = client.build_request(method, path, headers=headers, content=body)
            response = await client.send(request, stream=True)
        except httpx.HTTPError as exc:
            logger.error("SuperLink behind the gate unreachable (%s): %s", self.settings.upstream, exc)
            await _respond(send, 502, b"the coordinator's SuperLink is not reachable; retry later\n")
            return
        try:
            out_headers = [
                (k.lower(), v) for k, v in response.headers.raw if k.lower() not in _HOP_BY_HOP
            ]
            await send({"type": "http.response.start", "status": response.status_code, "headers": out_headers})
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._http_client()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._client is not None:
                    await self._client.aclose()
                    self._client = None
                await send({"type": "lifespan.shutdown.complete"})
                return


async def _read_body(receive: Receive) -> bytes | None:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"".join(chunks)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _respond(send: Send, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


def build_gate_server(
    settings: GateSettings,
    host: str,
    port: int,
    server_cert: Path,
    server_key: Path,
) -> Any:
    """A ``uvicorn.Server`` serving the gate with TLS on ``host:port`` (call ``.run()`` to block)."""
    import uvicorn  # imported here: only the coordinator process needs it

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per Fleet call otherwise

    config = uvicorn.Config(
        app=FleetOnlyGate(settings),
        host=host,
        port=port,
        ssl_certfile=str(server_cert),
        ssl_keyfile=str(server_key),
        lifespan="on",
        access_log=False,
        log_level="warning",
        workers=1,
    )
    return uvicorn.Server(config)
