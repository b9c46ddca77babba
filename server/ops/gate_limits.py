"""How much the coordinator's gate accepts from the network, and why each number is what it is.

Largest legitimate request body (Flower 1.41, read in flwr's sources, measured on loopback)
--------------------------------------------------------------------------------------------
Only SuperNodes talk to the gate (the ServerApp reaches the SuperLink on loopback). A SuperNode's
requests are small protobufs (``send-node-heartbeat``, ``pull-messages``, ``get-run``, ``get-fab``,
``pull-object``, ``confirm-message-received``: node id, run id, object ids, a few hundred bytes)
except two:

* ``push-messages`` carries the reply *without its content* (``remove_content_from_message``)
  plus the reply's object tree: a list of 64-hex-digit object ids, a few kB even for hundreds of
  tensors;
* ``push-object`` carries ONE object of that tree per request (``push_object_contents_from_iterable``,
  2 in flight per SuperNode). Records and messages deflate to small JSON/protobuf bodies (the fedtl
  reply's MetricRecord/ConfigRecord are a few hundred bytes); an ``Array`` is never sent whole: it
  is split into ``ArrayChunk`` objects of at most ``FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE`` bytes
  (5 MiB = 5,242,880 B by default, ``flwr.app.message.array.Array.slice_array``). So a reply with
  the shared layers in fp32 (tens of MB) arrives as many ``push-object`` requests of at most
  5 MiB of chunk data plus an object header and the protobuf fields (node, run id, object id,
  session id): about 5 MiB + 200 B.

Measured on the loopback federation (3 hospitals, the real fedtl app with the configuration of
``tests/deploy/test_real_federation.py``: resnet18 at 32 px, ``stages.layer4`` shared, one round
without DP), from the line the gate logs at shutdown with the largest body per Fleet call: with
``update_encoding = "fp32"`` the largest request was a ``push-object`` of 5,243,033 B (one full
5,242,880 B chunk of a 9.4 MB conv weight plus 153 B), ``push-messages`` 979 B, everything else
under 300 B; with the default int8 encoding, 2,359,577 B (a whole int8 tensor in one chunk).

The cap, 8 MiB by default, leaves 60 % above that (a larger record, a SuperNode started with
``FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE`` up to ~7.5 MiB; raise ``--max-request-mb`` with it), while one
request can no longer hold hundreds of MB. Bodies are streamed to the SuperLink, never buffered
whole, so the gate's own memory does not grow with the cap; the SuperLink buffers each body it
receives, so ``max_forwards x max_request_bytes`` (128 x 8 MiB = 1 GiB) bounds what requests
in flight can cost it, even from clients that forge well-formed (unverified) auth headers.

Connections and concurrency (sized for 200 hospitals heartbeating and pulling)
-----------------------------------------------------------------------------
A SuperNode polls ``pull-messages`` every 3 s and heartbeats every 30 s; during a round it pulls
and pushes objects with 2 requests in flight each. It holds at most ~5 connections (one httpx
pool shared by the main loop, the heartbeat thread and the 2+2 object workers), so 200 hospitals
need ~1000 connections and at most ~800 requests in flight at once; idle, they make ~70 requests
per second that each last milliseconds.

* ``max_connections`` 2048: uvicorn's ``limit_concurrency`` (open connections or running
  requests); beyond it uvicorn answers ``503``, which SuperNodes retry.
* ``max_forwards`` 128: requests being forwarded to the SuperLink at once; a request waits up to
  ``forward_wait_s`` (30 s) for a slot, then gets ``503`` (retried by SuperNodes). Idle, 200
  hospitals use ~1 slot on average; in a round, pushes queue for a slot instead of piling up
  bodies in the SuperLink.
* ``idle_timeout_s`` 15: a connection must send a complete request head within 15 s of opening
  (or of its previous response), else it is closed. Flower's httpx client drops its own idle
  connections after 5 s and sends a head in one write, so it never meets this deadline; an idle
  or slow-header (slowloris) connection does.
* ``body_timeout_s`` 120: the whole body must arrive within 120 s, else ``408``; a 5 MiB chunk
  then needs 44 kB/s (0.35 Mbit/s).
* ``max_head_bytes`` 16 KiB: request line plus headers (h11's limit); Flower's are ~1 kB.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, fields

MIB = 1 << 20
FLOWER_ARRAY_CHUNK_BYTES = 5 * MIB  # flwr.common.constant.FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE's default
DEFAULT_MAX_REQUEST_MB = 8


@dataclass(frozen=True)
class GateLimits:
    """What the gate accepts per request and in total (see the module docstring for the derivation).

    max_request_bytes : largest request body; a larger ``Content-Length`` gets ``413`` before any of
        the body is read, a chunked body is cut off with ``413`` once it passes the cap.
    max_connections : open connections or running requests (uvicorn ``limit_concurrency``).
    max_forwards : requests forwarded to the SuperLink at the same time.
    forward_wait_s : how long a request waits for a forwarding slot before ``503``.
    idle_timeout_s : seconds a connection may take to send a complete request head, from its
        opening or its previous response (also uvicorn's keep-alive timeout).
    body_timeout_s : seconds a request's whole body may take to arrive before ``408``.
    max_head_bytes : largest request line plus headers (h11's ``max_incomplete_event_size``).
    """

    max_request_bytes: int = DEFAULT_MAX_REQUEST_MB * MIB
    max_connections: int = 2048
    max_forwards: int = 128
    forward_wait_s: float = 30.0
    idle_timeout_s: float = 15.0
    body_timeout_s: float = 120.0
    max_head_bytes: int = 16 * 1024

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if not value > 0:
                raise ValueError(f"GateLimits.{item.name} must be positive, got {value!r}")
        if self.max_request_bytes < FLOWER_ARRAY_CHUNK_BYTES + 64 * 1024:
            raise ValueError(
                f"GateLimits.max_request_bytes={self.max_request_bytes} is below one Flower array chunk "
                f"({FLOWER_ARRAY_CHUNK_BYTES} B + headers): hospitals could not send their updates; "
                "use at least 6 MB (--max-request-mb)"
            )

    @classmethod
    def from_megabytes(cls, max_request_mb: float, **others: float) -> GateLimits:
        """Limits with a body cap of ``max_request_mb`` MiB (the ``--max-request-mb`` flag) and the other
        fields given by name (``max_connections=...``), the rest at their defaults."""
        return cls(max_request_bytes=int(max_request_mb * MIB), **others)  # type: ignore[arg-type]


def _positive(kind: type[int] | type[float]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be positive")
        return value

    return parse


def _request_megabytes(text: str) -> float:
    value = _positive(float)(text)
    if value * MIB < FLOWER_ARRAY_CHUNK_BYTES + 64 * 1024:
        raise argparse.ArgumentTypeError(
            f"{text} MB is below one Flower array chunk (5 MiB + headers): hospitals could not send their "
            "updates; use at least 6"
        )
    return value


def add_gate_limit_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``fedtl-coordinator start`` flags that set :class:`GateLimits` (defaults: the class's)."""
    defaults = GateLimits()
    group = parser.add_argument_group("gate caps (see server/ops/gate_limits.py for how the defaults were chosen)")
    group.add_argument("--max-request-mb", type=_request_megabytes, default=DEFAULT_MAX_REQUEST_MB,
                       help=f"largest request body in MiB; larger ones get 413 (default {DEFAULT_MAX_REQUEST_MB}: "
                            "Flower sends updates in 5 MiB chunks)")
    group.add_argument("--max-connections", type=_positive(int), default=defaults.max_connections,
                       help=f"open connections or running requests; beyond, 503 (default {defaults.max_connections})")
    group.add_argument("--max-forwards", type=_positive(int), default=defaults.max_forwards,
                       help=f"requests forwarded to the SuperLink at once (default {defaults.max_forwards})")
    group.add_argument("--idle-timeout-s", type=_positive(float), default=defaults.idle_timeout_s,
                       help="seconds a connection may take to send a complete request head "
                            f"(default {defaults.idle_timeout_s:.0f})")
    group.add_argument("--body-timeout-s", type=_positive(float), default=defaults.body_timeout_s,
                       help=f"seconds a request body may take to arrive; then 408 (default {defaults.body_timeout_s:.0f})")


def gate_limits_from_args(args: argparse.Namespace) -> GateLimits:
    """:class:`GateLimits` from the flags added by :func:`add_gate_limit_arguments`."""
    return GateLimits.from_megabytes(
        args.max_request_mb,
        max_connections=args.max_connections,
        max_forwards=args.max_forwards,
        idle_timeout_s=args.idle_timeout_s,
        body_timeout_s=args.body_timeout_s,
    )
