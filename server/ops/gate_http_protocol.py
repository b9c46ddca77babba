"""uvicorn's h11 HTTP protocol with a deadline on the request head: idle and slowloris connections close.

uvicorn 0.49 arms its keep-alive timer only after a response, and cancels it on any byte
received: a connection that never sends a request, or sends its head one byte at a time, stays
open for ever (and counts against ``limit_concurrency``). This protocol gives every connection
``idle_timeout_s`` to deliver a complete request head, from its opening (after the TLS handshake)
and again after each response; a request that is being served is not affected (its body has its
own deadline in the gate).

h11 (not httptools) is used because it bounds the request head (``h11_max_incomplete_event_size``);
httptools keeps appending headers until the connection closes.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol


class HeadDeadlineH11Protocol(H11Protocol):
    """An ``H11Protocol`` that closes a connection which has not sent a full request head in time.

    The deadline is ``config.timeout_keep_alive`` seconds (the gate sets it to its idle timeout).
    """

    _head_timer: asyncio.TimerHandle | None = None
    _cycle_when_armed: Any = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_deadline()
        super().connection_lost(exc)

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
        if no_new_request and idle and not self.transport.is_closing():
            self.transport.close()
