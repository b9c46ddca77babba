"""uvicorn's h11 HTTP protocol with a deadline on the request head: idle and slowloris connections close.

uvicorn 0.49 arms its keep-alive timer only after a response, and cancels it on any byte
received: a connection that never sends a request, or sends its head one byte at a time, stays
open for ever (and counts against ``limit_concurrency``). This protocol gives every connection
``idle_timeout_s`` to deliver a complete request head, from its opening (after the TLS handshake)
and again after each response; a request that is being served is not affected (its body has its
own deadline in the gate).

h11 (not httptools) is used because it bounds the request head (``h11_max_incomplete_event_size``);
httptools keeps appending headers until the connection closes.

A connection closed after a response (the gate's refusals say ``Connection: close``) is aborted
as soon as that response has left the process: the TLS shutdown (uvloop's, which uvicorn uses)
otherwise keeps reading, decrypting and discarding whatever the peer still sends while it waits
for the peer's close_notify; a refused 300 MB body was read to its end that way.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

FLUSH_WAIT_S = 10.0  # a closing response still being written gets up to this long to leave before the abort
FLUSH_POLL_S = 0.05


class HeadDeadlineH11Protocol(H11Protocol):
    """An ``H11Protocol`` that closes a connection which has not sent a full request head in time,
    and aborts one closed after a response instead of draining it.

    The deadline is ``config.timeout_keep_alive`` seconds (the gate sets it to its idle timeout).
    """

    _head_timer: asyncio.TimerHandle | None = None
    _cycle_when_armed: Any = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_deadline()

    _lost = False

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_head_deadline()
        else:  # closed after this response: stop reading what the peer still sends, once it has left
            self.loop.call_soon(self._abort_once_flushed, self.loop.time() + FLUSH_WAIT_S)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._cancel_head_deadline()
        super().connection_lost(exc)

    def _abort_once_flushed(self, give_up_at: float) -> None:
        if self._lost:
            return
        if self.transport.get_write_buffer_size() and self.loop.time() < give_up_at:
            self.loop.call_later(FLUSH_POLL_S, self._abort_once_flushed, give_up_at)
            return
        self.transport.abort()

    def _arm_head_deadline(self) -> None:
        self._cancel_head_deadline()
        self._cycle_when_armed = self.cycle
        self._head_timer = self.loop.call_later(self.timeout_keep_alive, self._head_deadline_passed)

    def _cancel_head_deadline(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_deadline_passed(self) -> None:
        self._head_timer = None
        no_new_request = self.cycle is self._cycle_when_armed
        idle = self.cycle is None or self.cycle.response_complete
        if no_new_request and idle and not self._lost:
            self.transport.abort()  # nothing to flush; close() would wait up to 30 s for the peer's close_notify
