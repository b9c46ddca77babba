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
against a strict pattern (no ``..``, no ``//``, no control character, no query string is
forwarded), so a crafted path cannot be normalised into a Control route on the way through.

What a Fleet request must pass before its body is read (caps and their derivation:
:mod:`server.ops.gate_limits`):

1. Flower's SuperNode-auth headers, present and well formed (:mod:`server.ops.fleet_auth_headers`),
   else ``401``;
2. a ``Content-Length`` no larger than ``max_request_bytes``, else ``413``;
3. a forwarding slot (``max_forwards``) within ``forward_wait_s``, else ``503`` (SuperNodes retry).

The body is then streamed to the SuperLink, never buffered whole: a chunked body passing the cap
is cut off with ``413``, one that takes longer than ``body_timeout_s`` with ``408``, and both
abort the upstream request. Refusals close the connection.
"""

from __future__ import annotations

import asyncio
import logging
import re
import resource
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from server.ops.fleet_auth_headers import node_auth_problem
from server.ops.gate_limits import MIB, GateLimits

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

FLEET_PATH = re.compile(r"/v1/fleet/[a-z0-9][a-z0-9-]*")  # used with fullmatch: '$' would allow a final \n
HEALTH_PATH = "/health"
UPSTREAM_TIMEOUT_S = 300.0
UPSTREAM_CONNECT_TIMEOUT_S = 10.0
LOGGED_PATH_CHARS = 200  # a refused path is logged up to this length
REFUSAL_LOG_WINDOW_S = 10.0
REFUSAL_LOG_BURST = 20  # refusal lines per window; the rest are counted in one line
LARGEST_BODY_PATHS = 32  # Fleet calls whose largest body is kept (Flower 1.41 has 12; made-up names add none)

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
        b"expect",
    }
)
REFUSAL = (
    b"This address serves the Fleet API only (hospital SuperNodes). Runs are started on the "
    b"coordinator machine itself: fedtl-coordinator run APP_DIR.\n"
)


def is_forwarded(method: str, path: str) -> bool:
    """True when a request with this method and decoded path may reach the SuperLink."""
    if method == "POST" and FLEET_PATH.fullmatch(path):
        return True
    return method in ("GET", "HEAD") and path == HEALTH_PATH


@dataclass(frozen=True)
class GateSettings:
    """Where the gate forwards to, how it checks the SuperLink behind it, and what it accepts.

    upstream : base URL of the loopback SuperLink, e.g. ``https://127.0.0.1:9093``.
    ca_cert : federation CA certificate used to verify the SuperLink's TLS certificate.
    limits : request-size, concurrency and deadline caps (:class:`server.ops.gate_limits.GateLimits`).
    """

    upstream: str
    ca_cert: Path
    limits: GateLimits = field(default_factory=GateLimits)


class _Refused(Exception):
    """A request the gate answers itself (status and reason) instead of forwarding it further."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class _ClientGone(Exception):
    """The hospital disconnected while its body was being forwarded."""


class _RefusalLog:
    """At most ``REFUSAL_LOG_BURST`` refusal lines per ``REFUSAL_LOG_WINDOW_S``; a flood is summarised."""

    def __init__(self) -> None:
        self._window_start = 0.0
        self._logged = 0
        self._suppressed = 0

    def warning(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._window_start >= REFUSAL_LOG_WINDOW_S:
            if self._suppressed:
                logger.warning("%d more refusals in the last %.0f s not logged one by one", self._suppressed,
                               now - self._window_start)
            self._window_start, self._logged, self._suppressed = now, 0, 0
        if self._logged < REFUSAL_LOG_BURST:
            self._logged += 1
            logger.warning(message, *args)
        else:
            self._suppressed += 1


class FleetOnlyGate:
    """ASGI application forwarding Fleet API calls to the loopback SuperLink and refusing the rest."""

    def __init__(self, settings: GateSettings, upstream_transport: httpx.AsyncBaseTransport | None = None) -> None:
        """settings : upstream, CA and caps; upstream_transport : replaces the TLS connection to the
        SuperLink (tests pass an ``httpx.ASGITransport`` around a fake SuperLink)."""
        self.settings = settings
        self._upstream_transport = upstream_transport
        self.limits = settings.limits
        self._client: httpx.AsyncClient | None = None
        self._slots: asyncio.Semaphore | None = None
        self._refusals = _RefusalLog()
        self.largest_bodies: dict[str, int] = {}  # Fleet call -> largest body forwarded (bytes)

    def _http_client(self) -> httpx.AsyncClient:
        if self._client is None:
            verify = (
                ssl.create_default_context(cafile=str(self.settings.ca_cert))
                if self._upstream_transport is None else True
            )
            self._client = httpx.AsyncClient(
                base_url=self.settings.upstream,
                verify=verify,
                transport=self._upstream_transport,
                timeout=httpx.Timeout(UPSTREAM_TIMEOUT_S, connect=UPSTREAM_CONNECT_TIMEOUT_S),
                limits=httpx.Limits(
                    max_connections=self.limits.max_forwards,
                    max_keepalive_connections=min(64, self.limits.max_forwards),
                ),
            )
        return self._client

    def _forward_slots(self) -> asyncio.Semaphore:
        if self._slots is None:  # created in the serving loop
            self._slots = asyncio.Semaphore(self.limits.max_forwards)
        return self._slots

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        method: str = scope["method"]
        path: str = scope["path"]
        peer = (scope.get("client") or ("?",))[0]
        if not is_forwarded(method, path):
            self._refusals.warning(
                "refused %s %s from %s: only the Fleet API is reachable from the network",
                method, path[:LOGGED_PATH_CHARS], peer,
            )
            await _respond(send, 403, REFUSAL, close=True)
            return
        try:
            declared = self._admit(scope, path)
        except _Refused as refusal:
            self._refusals.warning("refused %s from %s with %d before reading its body: %s",
                                   path, peer, refusal.status, refusal.reason)
            await _respond(send, refusal.status, refusal.reason.encode() + b"\n", close=True)
            return
        slots = self._forward_slots()
        try:
            async with asyncio.timeout(self.limits.forward_wait_s):
                await slots.acquire()
        except TimeoutError:
            self._refusals.warning("refused %s from %s with 503: all %d forwarding slots busy for %.0f s",
                                   path, peer, self.limits.max_forwards, self.limits.forward_wait_s)
            await _respond(send, 503, b"the coordinator is busy; retry later\n", close=True,
                           extra=[(b"retry-after", b"5")])
            return
        try:
            await self._forward(scope, method, path, receive, send, declared, peer)
        finally:
            slots.release()

    def _admit(self, scope: Scope, path: str) -> int | None:
        """Checks made on the request head alone; returns the declared body length (``None``: chunked)."""
        if path == HEALTH_PATH:
            return None
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        problem = node_auth_problem(headers)
        if problem is not None:
            raise _Refused(401, f"SuperNode authentication headers required: {problem}")
        lengths = [value for name, value in headers if name == b"content-length"]
        if not lengths:
            return None
        if len(lengths) > 1 or not lengths[0].isdigit() or len(lengths[0]) > 18:
            raise _Refused(400, "invalid Content-Length")
        declared = int(lengths[0])
        if declared > self.limits.max_request_bytes:
            raise _Refused(413, f"request body of {declared} bytes is over the gate's cap of "
                                f"{self.limits.max_request_bytes} bytes")
        return declared

    async def _forward(
        self, scope: Scope, method: str, path: str, receive: Receive, send: Send, declared: int | None, peer: str
    ) -> None:
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in _HOP_BY_HOP]
        body: _BoundedBody | None = None
        if method == "POST":
            body = _BoundedBody(receive, self.limits.max_request_bytes, self.limits.body_timeout_s)
            if declared is not None:
                headers.append((b"content-length", str(declared).encode()))
        client = self._http_client()
        try:
            request = client.build_request(method, path, headers=headers, content=body)
            response = await client.send(request, stream=True)
        except _Refused as refusal:
            self._refusals.warning("refused %s from %s with %d: %s", path, peer, refusal.status, refusal.reason)
            await _respond(send, refusal.status, refusal.reason.encode() + b"\n", close=True)
            return
        except _ClientGone:
            return
        except httpx.HTTPError as exc:
            logger.error("SuperLink behind the gate unreachable (%s): %s", self.settings.upstream, exc)
            await _respond(send, 502, b"the coordinator's SuperLink is not reachable; retry later\n", close=True)
            return
        if body is not None and (path in self.largest_bodies or len(self.largest_bodies) < LARGEST_BODY_PATHS):
            self.largest_bodies[path] = max(self.largest_bodies.get(path, 0), body.size)
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
                self._forward_slots()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.largest_bodies:
                    logger.info("largest request bodies forwarded: %s", ", ".join(
                        f"{name} {size} B" for name, size in sorted(self.largest_bodies.items())))
                if self._client is not None:
                    await self._client.aclose()
                    self._client = None
                await send({"type": "lifespan.shutdown.complete"})
                return


class _BoundedBody:
    """The request body as an async byte stream for httpx, cut off at ``cap`` bytes or ``timeout_s``."""

    def __init__(self, receive: Receive, cap: int, timeout_s: float) -> None:
        self._receive = receive
        self._cap = cap
        self._timeout_s = timeout_s
        self.size = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout_s
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    message = await self._receive()
            except TimeoutError:
                raise _Refused(408, f"request body not received within {self._timeout_s:.0f} s "
                                    f"({self.size} bytes arrived)") from None
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk: bytes = message.get("body", b"")
            self.size += len(chunk)
            if self.size > self._cap:
                raise _Refused(413, f"request body over the gate's cap of {self._cap} bytes")
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                return


async def _respond(
    send: Send, status: int, body: bytes, close: bool = False, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]
    if close:  # the unread body is not worth draining: h11 closes the connection after this response
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers + (extra or [])})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _ensure_open_file_limit(needed: int) -> None:
    """Raise this process's soft open-file limit to ``needed`` (up to the hard limit), or warn."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < needed:
        logger.warning(
            "open-file limit is %d, below the %d the gate's caps need; lower --max-connections or raise "
            "LimitNOFILE in the service unit", target, needed,
        )


def build_gate_server(
    settings: GateSettings,
    host: str,
    port: int,
    server_cert: Path,
    server_key: Path,
) -> Any:
    """A ``uvicorn.Server`` serving the gate with TLS on ``host:port`` (call ``.run()`` to block).

    uvicorn's own log records (``uvicorn``, ``uvicorn.error``) go to the process's root handlers
    (``log_config=None``), so they get the daemon's format and its control-character escaping.
    """
    import uvicorn  # imported here: only the coordinator process needs it

    from server.ops.gate_http_protocol import HeadDeadlineH11Protocol

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per Fleet call otherwise
    limits = settings.limits
    _ensure_open_file_limit(limits.max_connections + limits.max_forwards + 256)
    config = uvicorn.Config(
        app=FleetOnlyGate(settings),
        host=host,
        port=port,
        ssl_certfile=str(server_cert),
        ssl_keyfile=str(server_key),
        lifespan="on",
        access_log=False,
        log_config=None,
        log_level="warning",
        workers=1,
        http=HeadDeadlineH11Protocol,
        ws="none",  # no WebSocket upgrades: the Fleet API is plain HTTP
        h11_max_incomplete_event_size=limits.max_head_bytes,
        limit_concurrency=limits.max_connections,
        timeout_keep_alive=max(1, round(limits.idle_timeout_s)),
    )
    logger.info(
        "gate caps: bodies up to %.1f MiB, %d connections, %d forwards in flight, %.0f s to send a request "
        "head, %.0f s for a body", limits.max_request_bytes / MIB, limits.max_connections, limits.max_forwards,
        limits.idle_timeout_s, limits.body_timeout_s,
    )
    return uvicorn.Server(config)
