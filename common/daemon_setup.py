"""What the two daemons (``fedtl-coordinator``, ``fedtl-hospital``) set up the same way.

* :func:`flower_executable`: the pinned Flower console scripts (``flower-superlink``,
  ``flower-supernode``, ``flwr``) installed next to this Python, never another flwr on ``PATH``;
* :func:`configure_logging`: one log format, every line tagged by the logger's name, and control
  characters in log messages escaped so that nothing a remote peer sends can forge a log line.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


class FlowerNotInstalled(RuntimeError):
    """The pinned Flower command is missing from this environment; the message says how to install it."""


def flower_executable(name: str) -> str:
    """Path of the Flower console script ``name`` installed next to this Python (the pinned flwr)."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    raise FlowerNotInstalled(
        f"'{name}' is not installed next to {sys.executable}; install fedtl in this environment "
        "(pip install -e .) so that the pinned flwr and its commands are present"
    )


class _EscapeControlCharacters(logging.Filter):
    """Render a record's message with control characters escaped (``\\n`` becomes ``\\\\n``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        escaped = "".join(ch if ch.isprintable() or ch == " " else ascii(ch)[1:-1] for ch in message)
        if escaped != message:
            record.msg, record.args = escaped, None
        return True


def configure_logging(level: int = logging.INFO) -> None:
    """Give the process the daemons' log format (once; a host application's own set-up is kept)."""
    from common.data.metadata_guard import install_log_guard

    install_log_guard()  # mask registered DICOM header values in every record of this process
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(_EscapeControlCharacters())
    root.addHandler(handler)
    root.setLevel(level)
