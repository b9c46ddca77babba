"""Why the coordinator refused to let this site in, and whether to try again.

Flower 1.41's SuperLink answers ``[code: 2004] Failed to activate SuperNode`` both to a key it does
not know and to a known key whose node it still counts online. A node stays online until
``HEARTBEAT_PATIENCE`` (2) x ``HEARTBEAT_DEFAULT_INTERVAL`` (30 s) after its last heartbeat, and
heartbeats come every 17.5-22.5 s, so after a crash (SIGKILL, power loss) the old session blocks
the site's return for 35-60 s. The daemon stamps ``alive_at`` into its record every few seconds
while the SuperNode is connected (:mod:`client.supernode_record`); a refusal then means:

* within ``alive_at + HEARTBEAT_WINDOW_S`` (same key, same coordinator): the old session is still
  online. Try again every ``RETRY_INTERVAL_S`` until the window has certainly passed.
* after it, or with no record of this key ever being connected to this coordinator: the key is
  refused (not registered, revoked, or the same key connected from another machine). Stop.

The window is ``HEARTBEAT_WINDOW_S`` unless the site's environment sets ``FEDTL_HEARTBEAT_WINDOW_S``
(:func:`heartbeat_window_s`): longer where a site's clock may be stepped, shorter where a revoked
site should stop sooner (a window shorter than Flower's may stop a site that a crash left waiting).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass

HEARTBEAT_WINDOW_S = 75.0
"""Seconds after the last ``alive_at`` stamp by which Flower has certainly marked the old session
offline: the crash came at most ``ALIVE_STAMP_S`` after the stamp, the last heartbeat was before
the crash, and the node is offline 60 s (2 x 30 s) after its last heartbeat; plus 10 s of margin."""
HEARTBEAT_WINDOW_ENV = "FEDTL_HEARTBEAT_WINDOW_S"
"""Environment variable that replaces ``HEARTBEAT_WINDOW_S`` (seconds, a number >= 0)."""
ALIVE_STAMP_S = 5.0
"""How often the daemon stamps ``alive_at`` while the SuperNode is connected."""
RETRY_INTERVAL_S = 2.0
"""Seconds between a refused SuperNode's exit and the next attempt inside the heartbeat window (each
attempt is a new ``flower-supernode`` process, which takes a few seconds of its own to start)."""
ACTIVATION_REFUSED_MARKERS = ("Failed to activate SuperNode", "[code: 2004]")
"""What the SuperNode prints when the SuperLink refuses to activate it."""


@dataclass(frozen=True)
class Refusal:
    """What a refused activation means for this site.

    retry : try again (the old session may still be online).
    until : epoch seconds when the heartbeat window has certainly passed (``None``: no window).
    explanation : what the daemon logs, in words for the site's admin.
    """

    retry: bool
    until: float | None
    explanation: str


def is_activation_refusal(output: str) -> bool:
    """True when a SuperNode's output says the SuperLink refused to activate it."""
    return any(marker in output for marker in ACTIVATION_REFUSED_MARKERS)


def heartbeat_window_s(environ: Mapping[str, str] | None = None) -> float:
    """``HEARTBEAT_WINDOW_S``, or ``FEDTL_HEARTBEAT_WINDOW_S`` where ``environ`` (default: this process's
    environment) sets it; a value that is not a finite number >= 0 is refused with what to set instead."""
    raw = (os.environ if environ is None else environ).get(HEARTBEAT_WINDOW_ENV, "").strip()
    if not raw:
        return HEARTBEAT_WINDOW_S
    try:
        window = float(raw)
    except ValueError:
        window = math.nan
    if not math.isfinite(window) or window < 0:
        raise ValueError(f"{HEARTBEAT_WINDOW_ENV}={raw!r} is not a number of seconds >= 0; unset it to use "
                         f"{HEARTBEAT_WINDOW_S:.0f} s (Flower's two missed 30 s heartbeats plus margin)")
    return window


def judge_refusal(
    record: dict[str, object],
    superlink: str,
    key_id: str,
    now: float | None = None,
    window_s: float = HEARTBEAT_WINDOW_S,
) -> Refusal:
    """Classify a refused activation from the daemon's record of the site's last connection.

    record : ``STATE_DIR/supernode.json`` as the daemon last wrote it (``alive_at``, ``superlink``,
        ``key_id``), possibly from before a crash.
    superlink, key_id : the coordinator and key this start uses (see ``supernode_record.key_identity``).
    window_s : seconds after ``alive_at`` during which a refusal is the old session (:func:`heartbeat_window_s`).
    """
    now = time.time() if now is None else now
    alive_at = record.get("alive_at")
    same_site = record.get("superlink") == superlink and record.get("key_id") == key_id
    if same_site and isinstance(alive_at, (int, float)):
        until = float(alive_at) + window_s
        if now < until:
            return Refusal(True, until, (
                f"the coordinator still counts this site's previous session online (it was connected "
                f"{now - alive_at:.0f} s ago and Flower waits for two missed 30 s heartbeats before it lets the same "
                f"key in again): retrying every {RETRY_INTERVAL_S:.0f} s until {time.strftime('%H:%M:%S', time.localtime(until))}"
            ))
        return Refusal(False, until, (
            f"the coordinator refused this site's key: the previous session ended more than "
            f"{window_s:.0f} s ago, so this is no longer Flower's heartbeat window. " + _REFUSED_ADVICE
        ))
    return Refusal(False, None, "the coordinator refused this site's key. " + _REFUSED_ADVICE)


_REFUSED_ADVICE = (
    "Either the key is not registered (or was revoked) at the coordinator, or the same key is connected "
    "from another machine. Send this site's public key (NAME.pub, next to the --key file) to the "
    "coordinator's admin and ask them to register it ('fedtl-coordinator register --state-dir STATE_DIR NAME.pub'); "
    "make sure no other machine runs this site with the same key; then start the site again."
)
