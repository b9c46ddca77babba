"""Test doubles for the gate: a fake SuperLink that counts what reaches it, and Flower-signed headers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx


def flower_signed_headers() -> dict[str, str]:
    """The node-auth headers a Flower 1.41 SuperNode puts on a Fleet call, made by Flower's own interceptor."""
    from flwr.supercore.primitives.asymmetric import generate_key_pairs
    from flwr.supercore.protobuf.client import ProtobufRequestContext
    from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

    private_key, public_key = generate_key_pairs()
    request = httpx.Request("POST", "https://superlink/v1/fleet/pull-messages")
    context = ProtobufRequestContext(rpc_method="/flwr.proto.Fleet/PullMessages", message=None, request=request)  # type: ignore[arg-type]
    NodeAuthHttpInterceptor(private_key, public_key).intercept(context, lambda ctx: httpx.Response(200))
    return {name: value for name, value in request.headers.items() if name.startswith("flwr-")}


@dataclass
class FakeSuperLink:
    """An ASGI app standing in for the SuperLink: counts requests, reads bodies, answers 200.

    hold : when set, every request waits for it before answering (to keep forwarding slots busy).
    """

    started: int = 0
    completed: int = 0
    bodies: list[int] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    hold: asyncio.Event | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.started += 1
        self.headers.append({k.decode(): v.decode() for k, v in scope["headers"]})
        size = 0
        while True:
            message = await receive()
            size += len(message.get("body", b""))
            if not message.get("more_body", False):
                break
        if self.hold is not None:
            await self.hold.wait()
        self.bodies.append(size)
        self.completed += 1
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/protobuf")]})
        await send({"type": "http.response.body", "body": b"ok", "more_body": False})


async def chunks(total: int, chunk: int = 1 << 20) -> AsyncIterator[bytes]:
    """``total`` bytes as a chunked request body."""
    sent = 0
    while sent < total:
        size = min(chunk, total - sent)
        sent += size
        yield b"\0" * size
