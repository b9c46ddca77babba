"""What an unreadable image says: the error a reader raises, and library messages made safe to show.

A reason names the file, the structural problem and the fix, and never a header value: library
messages are kept whole (pydicom puts each decoding plugin's cause on its own line) but quoted
values are replaced and registered identifying values masked. pydicom's own per-plugin tracebacks,
which name no file, are dropped: the reader's error carries their causes.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from common.data.metadata_guard import REGISTRY


class UnreadableImageError(Exception):
    """An image file cannot be turned into pixels.

    ``path`` is the file, ``reason`` says what is wrong and what to do; ``str(error)`` is
    ``"<path>: <reason>"``. Neither ever contains a DICOM header value.
    """

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")



_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"|b'[^']*'")


def describe_failure(exc: BaseException) -> str:
    """Exception type and the library's own reason, every line of it (pydicom puts each decoding
    plugin's cause on a line of its own), with quoted values replaced: a library may quote the
    header value it choked on. Identifying values are also masked, as defence in depth."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    message = REGISTRY.mask(_QUOTED.sub("<value>", "; ".join(lines)))
    if len(message) > 400:
        message = message[:397] + "..."
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


class _NoPluginTracebacks(logging.Filter):
    """pydicom logs a full traceback for every decoding plugin that fails on a file, without the
    file's name (``LOGGER.exception``); the reader's own error keeps each plugin's cause and names
    the file, so those records are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.exc_info is None


def quiet_pydicom_plugin_failures() -> None:
    # a filter applies to records of its own logger only, not to a child's: name the one that logs
    plugin_logger = logging.getLogger("pydicom.pixels.decoders.base")
    if not any(isinstance(f, _NoPluginTracebacks) for f in plugin_logger.filters):
        plugin_logger.addFilter(_NoPluginTracebacks())
