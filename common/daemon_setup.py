"""What the two daemons (``fedtl-coordinator``, ``fedtl-hospital``) set up the same way.

* :func:`flower_executable`: the pinned Flower console scripts (``flower-superlink``,
  ``flower-supernode``, ``flwr``) installed next to this Python, never another flwr on ``PATH``;
* :func:`configure_logging`: one log format, every line tagged by the logger's name, and control
  characters escaped in every record of the process (:func:`install_log_escaping`) so that nothing
  a remote peer sends can forge a log line.
"""

from __future__ import annotations

import logging
import sys
import threading
import traceback
from pathlib import Path
from typing import Any

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


CONTINUATION_PREFIX = "  "  # every line of a traceback or stack below a record starts with it


def escape_control_characters(text: str) -> str:
    """``text`` with every non-printable character written as an escape (a newline becomes ``\\n``,
    ``\\r`` and ANSI escapes likewise); spaces are kept."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() or ch == " " else ascii(ch)[1:-1] for ch in text)


def _as_continuation(text: str) -> str:
    lines = text.rstrip("\n").split("\n")
    return "\n".join(CONTINUATION_PREFIX + escape_control_characters(line) for line in lines)


def _traceback_lines(exc: BaseException, seen: set[int] | None = None) -> list[str]:
    """Python's traceback of ``exc`` (with its causes) as lines, each exception's message on ONE line."""
    seen = set() if seen is None else seen
    seen.add(id(exc))
    lines: list[str] = []
    if exc.__cause__ is not None and id(exc.__cause__) not in seen:
        lines += _traceback_lines(exc.__cause__, seen)
        lines += ["", "The above exception was the direct cause of the following exception:", ""]
    elif exc.__context__ is not None and not exc.__suppress_context__ and id(exc.__context__) not in seen:
        lines += _traceback_lines(exc.__context__, seen)
        lines += ["", "During handling of the above exception, another exception occurred:", ""]
    if exc.__traceback__ is not None:
        lines.append("Traceback (most recent call last):")
        for frame in traceback.format_tb(exc.__traceback__):
            lines += frame.rstrip("\n").split("\n")
    lines += [escape_control_characters(part.rstrip("\n")) for part in traceback.format_exception_only(type(exc), exc)]
    return lines


def escape_record(record: logging.LogRecord) -> None:
    """Make ``record`` unable to forge a log line, whatever a remote peer put into it.

    The message becomes one line (control characters escaped; a trailing newline dropped); a
    traceback is rendered now with each exception's message on one line (escaped), and every line
    of a traceback or stack is indented by :data:`CONTINUATION_PREFIX`, so no line of it can pass
    for a record.
    """
    try:
        message = record.getMessage()
    except Exception:  # a broken format string: leave it to logging's own error path
        return
    escaped = escape_control_characters(message.rstrip("\r\n"))
    if escaped != message:
        record.msg, record.args = escaped, None
    error = record.exc_info[1] if record.exc_info else None
    if isinstance(error, BaseException):  # rendered again even if the log guard rendered it first:
        from common.data.metadata_guard import REGISTRY  # its masking is applied to our rendering too

        text = "\n".join(_traceback_lines(error))
        record.exc_text = REGISTRY.mask(text) if len(REGISTRY) else text
    elif record.exc_info and not record.exc_text:
        record.exc_text = logging.Formatter().formatException(record.exc_info)
    if record.exc_text:
        record.exc_text = _as_continuation(record.exc_text)
    if record.stack_info:
        record.stack_info = _as_continuation(record.stack_info)


_escaping_lock = threading.Lock()
_escaping_installed = False


def install_log_escaping() -> None:
    """Escape every log record created in this process from now on (idempotent).

    Done in the log-record factory, not in a handler filter, so that it holds for every logger
    and handler of the process: uvicorn's (which do not propagate to the root logger when uvicorn
    configures them), Flower's, and handlers installed before or after ours.
    """
    global _escaping_installed
    with _escaping_lock:
        if _escaping_installed:
            return
        previous = logging.getLogRecordFactory()

        def escaping_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            escape_record(record)
            return record

        logging.setLogRecordFactory(escaping_factory)
        _escaping_installed = True


def configure_logging(level: int = logging.INFO) -> None:
    """Give the process the daemons' log format (once; a host application's own set-up is kept)."""
    from common.data.metadata_guard import install_log_guard

    install_log_guard()  # mask registered DICOM header values in every record of this process
    install_log_escaping()  # before the early return: a handler set up by someone else is covered too
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
