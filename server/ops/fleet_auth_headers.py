"""Does a Fleet request carry Flower's SuperNode authentication headers, well formed?

With ``--enable-supernode-auth`` a Flower 1.41 SuperNode signs every Fleet HTTP call
(``flwr.supernode.node_auth_http_interceptor.NodeAuthHttpInterceptor``) with three headers:

* ``flwr-public-key``: base64 of the node's public key as PEM (SubjectPublicKeyInfo);
* ``flwr-timestamp``: ``datetime.now(timezone.utc).isoformat()`` at signing time;
* ``flwr-signature``: base64 of the ECDSA (DER) signature of that timestamp.

The SuperLink (``flwr.superlink.routers.fleet.node_auth.authenticate_node``) checks them only after
reading and parsing the whole body, so a request without them used to cost a full body read
there. The gate answers ``401`` to a request whose headers are missing, duplicated or malformed
(not strict base64, absurd lengths, not a PEM key, an unparsable or naive timestamp, a timestamp
outside Flower's window) before reading any of its body. It does NOT verify the signature or that
the key is registered: the SuperLink still does, on every request.
"""

from __future__ import annotations

import binascii
import datetime
from base64 import b64decode
from collections.abc import Iterable

# flwr.supercore.constant.FLEET_HTTP_PUBLIC_KEY_HEADER / FLEET_HTTP_SIGNATURE_HEADER and
# flwr.common.constant.TIMESTAMP_HEADER (tests check they still match the installed flwr).
PUBLIC_KEY_HEADER = b"flwr-public-key"
SIGNATURE_HEADER = b"flwr-signature"
TIMESTAMP_HEADER = b"flwr-timestamp"
NODE_AUTH_HEADERS = (PUBLIC_KEY_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER)

# Flower accepts -SYSTEM_TIME_TOLERANCE < age < TIMESTAMP_TOLERANCE + SYSTEM_TIME_TOLERANCE (5 s, 300 s);
# the gate adds 1 s on both sides so that it is never stricter than the SuperLink checking just after it.
_MIN_AGE_S = -5.0 - 1.0
_MAX_AGE_S = 300.0 + 5.0 + 1.0
# A P-521 key is the largest Flower accepts: 268 B of PEM (360 base64 characters), a DER signature of
# at most 139 B (188 characters). The limits leave room and refuse kilobytes of garbage.
_MAX_KEY_CHARS = 1024
_MAX_SIGNATURE_CHARS = 512
_MIN_SIGNATURE_BYTES = 8
_MAX_TIMESTAMP_CHARS = 64
_PEM_PUBLIC_KEY = b"-----BEGIN PUBLIC KEY-----"


def node_auth_problem(
    headers: Iterable[tuple[bytes, bytes]], now: datetime.datetime | None = None
) -> str | None:
    """Why these request headers cannot be a Flower SuperNode's signed call, or ``None`` if they can.

    headers : the request's headers as ASGI gives them (lower-case names, raw byte values).
    now : the current time (UTC, aware); defaults to the clock now.

    The reason names the header and what is wrong with it, never its value (it is the peer's).
    """
    found: dict[bytes, list[bytes]] = {name: [] for name in NODE_AUTH_HEADERS}
    for name, value in headers:
        if name.lower() in found:
            found[name.lower()].append(value)
    for name, values in found.items():
        if not values:
            return f"no {name.decode()} header (not a signed SuperNode request)"
        if len(values) > 1:
            return f"{len(values)} {name.decode()} headers"
    key = _strict_base64(found[PUBLIC_KEY_HEADER][0], _MAX_KEY_CHARS)
    if key is None:
        return f"{PUBLIC_KEY_HEADER.decode()} is not base64 of at most {_MAX_KEY_CHARS} characters"
    if not key.startswith(_PEM_PUBLIC_KEY):
        return f"{PUBLIC_KEY_HEADER.decode()} is not a PEM public key"
    signature = _strict_base64(found[SIGNATURE_HEADER][0], _MAX_SIGNATURE_CHARS)
    if signature is None or len(signature) < _MIN_SIGNATURE_BYTES:
        return f"{SIGNATURE_HEADER.decode()} is not base64 of {_MIN_SIGNATURE_BYTES}+ bytes in at most {_MAX_SIGNATURE_CHARS} characters"
    return _timestamp_problem(found[TIMESTAMP_HEADER][0], now)


def _strict_base64(value: bytes, max_chars: int) -> bytes | None:
    if not value or len(value) > max_chars:
        return None
    try:
        return b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None


def _timestamp_problem(value: bytes, now: datetime.datetime | None) -> str | None:
    name = TIMESTAMP_HEADER.decode()
    if len(value) > _MAX_TIMESTAMP_CHARS:
        return f"{name} is longer than {_MAX_TIMESTAMP_CHARS} characters"
    try:
        signed_at = datetime.datetime.fromisoformat(value.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return f"{name} is not an ISO 8601 time"
    if signed_at.tzinfo is None:
        return f"{name} has no time zone"
    age = ((now or datetime.datetime.now(datetime.timezone.utc)) - signed_at).total_seconds()
    if not _MIN_AGE_S < age < _MAX_AGE_S:
        return f"{name} is {age:.0f} s old, outside Flower's window ({_MIN_AGE_S:.0f} s to {_MAX_AGE_S:.0f} s)"
    return None
