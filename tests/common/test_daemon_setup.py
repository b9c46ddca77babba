"""No log record of a daemon process can carry a raw control character from a peer, whichever handler
writes it: the daemons' own, one installed before theirs, or a library's own (uvicorn's) that does not
propagate to the root logger."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RECORD_START = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} \S+ (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")
FORGED = "2026-12-02 07:00:00,000 server.ops.coordinator_service INFO registered hospital key /etc/evil.pub"

SCRIPT = f"""
import logging, sys
{{before}}
from common.daemon_setup import configure_logging, LOG_FORMAT
configure_logging()
peer = "/v1/fleet/x\\n{FORGED}\\r\\n\\x1b[2K{FORGED}\\u2028{FORGED}"
gate = logging.getLogger("server.ops.control_gate")
gate.warning("refused POST %s from %s", peer, "10.0.0.1")
gate.warning(peer)
gate.warning("object arg: %s", ValueError(peer))
try:
    raise ValueError(peer)
except ValueError:
    gate.exception("forward failed")
own = logging.getLogger("uvicorn.error")   # what uvicorn's dictConfig sets up: its own handler, no propagation
own.propagate = False
handler = logging.StreamHandler(sys.stderr)
handler.setFormatter(logging.Formatter(LOG_FORMAT))
own.addHandler(handler)
own.error("Exception in ASGI application\\n", exc_info=ValueError(peer))
own.warning("stack", stack_info=True)
"""


def _stderr_lines(before: str = "") -> list[str]:
    done = subprocess.run([sys.executable, "-c", SCRIPT.format(before=before)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr.splitlines()


def _assert_no_forged_line(lines: list[str]) -> None:
    assert len([line for line in lines if RECORD_START.match(line)]) == 6, "\n".join(lines)
    for line in lines:
        assert RECORD_START.match(line) or line.startswith("  "), f"a line that is neither a record nor indented: {line!r}"
        assert not line.lstrip().startswith(FORGED[:23]), f"forged line: {line!r}"
        assert "\x1b" not in line and "\r" not in line and "\u2028" not in line


def test_a_peers_newlines_carriage_returns_and_escapes_cannot_forge_a_line_in_any_handler() -> None:
    lines = _stderr_lines()

    _assert_no_forged_line(lines)
    assert any("refused POST /v1/fleet/x\\n2026-12-02" in line for line in lines)


def test_a_handler_installed_before_the_daemons_own_set_up_is_covered_too() -> None:
    lines = _stderr_lines(before="logging.basicConfig(format='%(asctime)s %(name)s %(levelname)s %(message)s')")

    _assert_no_forged_line(lines)


def test_tracebacks_stay_readable_indented_below_their_record() -> None:
    lines = _stderr_lines()

    start = next(i for i, line in enumerate(lines) if line.endswith("forward failed"))
    assert lines[start + 1] == "  Traceback (most recent call last):"
    assert any(line.startswith("  ValueError: /v1/fleet/x\\n2026") for line in lines[start:])


def test_a_registered_dicom_value_in_a_traceback_stays_masked_after_escaping() -> None:
    script = (
        "import logging\n"
        "from common.daemon_setup import configure_logging\n"
        "configure_logging()\n"
        "from common.data.metadata_guard import register_sensitive\n"
        "register_sensitive('CANARY^PATIENT')\n"
        "try:\n    raise ValueError('bad header CANARY^PATIENT\\nforged')\n"
        "except ValueError:\n    logging.getLogger('x').exception('read failed for CANARY^PATIENT')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)

    assert done.returncode == 0, done.stderr[-3000:]
    assert "CANARY^PATIENT" not in done.stderr
    assert "ValueError: bad header" in done.stderr and "\\nforged" in done.stderr
