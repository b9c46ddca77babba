"""What ``fedtl-hospital start`` runs once the site is prepared: the SuperNode and the ClientApp worker, supervised.

Children (same process group, so ``systemctl stop`` / ``docker stop`` / a group kill reach them all):

* ``flower-supernode`` (TLS + node key to the coordinator). Its output passes through this process
  (to the daemon's own stdout, i.e. the journal) and is read on the way for ``SuperNode ID: N``
  (connected) and for an activation refusal (:mod:`client.rejoin_policy`);
* with the warm ClientApp (the default): ``python -m client.clientapp_worker``, the one long-lived
  process that runs every message (:mod:`client.clientapp_worker`).

Rules, so that systemd sees the truth:

* SIGTERM or SIGINT to the daemon stops both children (SIGTERM, then SIGKILL after
  ``STOP_GRACE_S``) and the daemon exits 0;
* both children die with the daemon (``PR_SET_PDEATHSIG``), even when it is SIGKILLed;
* a dead worker is restarted; more than ``MAX_WORKER_RESTARTS`` deaths within
  ``WORKER_RESTART_WINDOW_S`` stop the site with exit code 3 (``EXIT_LOST``);
* a SuperNode refused while Flower still counts the site's previous session online is started
  again every few seconds until the window has certainly passed; a refused key then stops the site
  with exit code 1 (``EXIT_REFUSED``); a SuperNode that exits for any other reason stops it with the
  SuperNode's own exit code, or 3 (``EXIT_LOST``) when that was 0, 1, 2 or a signal.

While the SuperNode is connected the daemon stamps ``alive_at`` into ``STATE_DIR/supernode.json``
every ``ALIVE_STAMP_S`` (with ``pid``: the SuperNode's, which ``fedtl-hospital health`` checks).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from client.rejoin_policy import (
    ALIVE_STAMP_S,
    RETRY_INTERVAL_S,
    heartbeat_window_s,
    is_activation_refusal,
    judge_refusal,
)
from client.supernode_record import read_record, write_record

logger = logging.getLogger(__name__)

EXIT_REFUSED = 1
"""The coordinator refused this site's key (the service unit does not restart it)."""
EXIT_LOST = 3
"""A child is lost: the SuperNode ended with 0, 1, 2 or by a signal (its own codes above 2 are passed
on), or the worker kept dying. The service manager may start the site again."""
STOP_GRACE_S = 15.0
MAX_WORKER_RESTARTS = 5
WORKER_RESTART_WINDOW_S = 600.0
_POLL_S = 0.2
_CONNECTED = re.compile(rb"SuperNode ID: (\d+)")
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: receive SIGTERM when the daemon dies (Linux; elsewhere a no-op)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
    except (OSError, AttributeError):
        pass


@dataclass
class SiteProcesses:
    """What the supervisor starts.

    supernode : the ``flower-supernode`` command line.
    worker : the ClientApp worker's command line (``None``: Flower's one process per message).
    env : the environment of both.
    record_path : ``STATE_DIR/supernode.json``.
    record_base : what every record holds (settings, commands); pids and stamps are added.
    superlink, key_id : the coordinator and key of this start (see ``client.rejoin_policy.judge_refusal``).
    """

    supernode: list[str]
    worker: list[str] | None
    env: dict[str, str]
    record_path: Path
    record_base: dict[str, Any]
    superlink: str
    key_id: str


@dataclass
class _SuperNode:
    popen: subprocess.Popen[bytes]
    node_id: str | None = None
    connected_at: float | None = None
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=40))
    reader: threading.Thread | None = None


class SiteSupervisor:
    """Runs :class:`SiteProcesses` until a stop signal or a final failure; :meth:`run` returns the exit code."""

    def __init__(self, processes: SiteProcesses, out: BinaryIO | None = None) -> None:
        self.processes = processes
        self._heartbeat_window_s = heartbeat_window_s()  # a bad FEDTL_HEARTBEAT_WINDOW_S stops the start here
        self._out = out if out is not None else sys.stdout.buffer
        self._stop = threading.Event()
        self._supernode: _SuperNode | None = None
        self._worker: subprocess.Popen[bytes] | None = None
        self._worker_deaths: deque[float] = deque()
        previous = read_record(processes.record_path)
        same_site = previous.get("superlink") == processes.superlink and previous.get("key_id") == processes.key_id
        self._record: dict[str, Any] = {
            **processes.record_base,
            "daemon_pid": os.getpid(),
            "started_at": time.time(),
            "superlink": processes.superlink,
            "key_id": processes.key_id,
        }
        if same_site and "alive_at" in previous:  # a crash right before this start: keep its window
            self._record["alive_at"] = previous["alive_at"]

    # ------------------------------------------------------------------------------ control
    def request_stop(self, signum: int = signal.SIGTERM, _frame: object = None) -> None:
        """Stop both children and return 0 from :meth:`run` (the daemon's SIGTERM/SIGINT handler)."""
        logger.info("site stopping (signal %d): stopping the SuperNode and the ClientApp worker", signum)
        self._stop.set()

    def run(self) -> int:
        try:
            if self.processes.worker is not None:
                self._start_worker()
            self._start_supernode()
            return self._supervise()
        finally:
            self._stop_children()

    # ---------------------------------------------------------------------------- the loop
    def _supervise(self) -> int:
        last_stamp = 0.0
        while not self._stop.is_set():
            assert self._supernode is not None
            if self._worker is not None and self._worker.poll() is not None:
                if not self._restart_worker():
                    return EXIT_LOST
            code = self._supernode.popen.poll()
            if code is not None:
                outcome = self._after_supernode_exit(code)
                if outcome is not None:
                    return outcome
                continue
            if self._supernode.node_id is not None and time.monotonic() - last_stamp >= ALIVE_STAMP_S:
                self._record["node_id"] = self._supernode.node_id
                self._record["connected_at"] = self._supernode.connected_at
                self._record["alive_at"] = time.time()
                self._write_record()
                last_stamp = time.monotonic()
            self._stop.wait(_POLL_S)
        return 0

    def _after_supernode_exit(self, code: int) -> int | None:
        """Start the SuperNode again (``None``) or the daemon's exit code."""
        assert self._supernode is not None
        if self._supernode.reader is not None:
            self._supernode.reader.join(timeout=5)
        output = "\n".join(self._supernode.tail)
        if self._stop.is_set():
            return 0
        if is_activation_refusal(output):
            refusal = judge_refusal(self._record, self.processes.superlink, self.processes.key_id,
                                    window_s=self._heartbeat_window_s)
            if refusal.retry:
                logger.warning("site not let in yet: %s", refusal.explanation)
                if self._stop.wait(RETRY_INTERVAL_S):
                    return 0
                self._start_supernode()
                return None
            logger.error("site stopped: %s", refusal.explanation)
            return EXIT_REFUSED
        logger.error("site stopped: the SuperNode exited with code %d (its output is above); "
                     "the site's service manager may start it again", code)
        return code if code > 2 else EXIT_LOST

    def _restart_worker(self) -> bool:
        assert self._worker is not None
        now = time.monotonic()
        self._worker_deaths.append(now)
        while self._worker_deaths and now - self._worker_deaths[0] > WORKER_RESTART_WINDOW_S:
            self._worker_deaths.popleft()
        code = self._worker.returncode
        if len(self._worker_deaths) > MAX_WORKER_RESTARTS:
            logger.error("site stopped: the ClientApp worker died %d times within %.0f s (last exit code %s); "
                         "see its errors above", len(self._worker_deaths), WORKER_RESTART_WINDOW_S, code)
            return False
        logger.warning("the ClientApp worker exited with code %s; starting it again (the message it was "
                       "running, if any, gets no reply from this site)", code)
        self._start_worker()
        return True

    # -------------------------------------------------------------------------- processes
    def _start_worker(self) -> None:
        assert self.processes.worker is not None
        command = [*self.processes.worker, "--parent-pid", str(os.getpid())]
        self._worker = subprocess.Popen(command, env=self.processes.env, preexec_fn=_die_with_parent)
        self._record["worker_pid"] = self._worker.pid
        self._write_record()

    def _start_supernode(self) -> None:
        popen = subprocess.Popen(self.processes.supernode, env=self.processes.env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        supernode = _SuperNode(popen)
        supernode.reader = threading.Thread(target=self._forward, args=(supernode,), daemon=True,
                                            name="supernode-output")
        supernode.reader.start()
        self._supernode = supernode
        self._record["pid"] = popen.pid
        self._write_record()

    def _forward(self, supernode: _SuperNode) -> None:
        """Copy the SuperNode's output to the daemon's, noting the node id and the last lines."""
        assert supernode.popen.stdout is not None
        for line in iter(supernode.popen.stdout.readline, b""):
            try:
                self._out.write(line)
                self._out.flush()
            except (OSError, ValueError):
                pass
            supernode.tail.append(line.decode(errors="replace"))
            found = _CONNECTED.search(line)
            if found:  # the record itself is written by the main thread only
                supernode.connected_at = time.time()
                supernode.node_id = found.group(1).decode()

    def _stop_children(self) -> None:
        children = [p for p in (self._supernode.popen if self._supernode else None, self._worker) if p is not None]
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for child in children:
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("pid %d did not stop within %.0f s; killing it", child.pid, STOP_GRACE_S)
                child.kill()
                child.wait(timeout=5)

    def _write_record(self) -> None:
        try:
            write_record(self.processes.record_path, self._record)
        except OSError as error:
            logger.warning("could not write %s: %s", self.processes.record_path, error)


def supervise(processes: SiteProcesses, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)) -> int:
    """Run the site until a signal in ``signals`` or a final failure; the daemon's exit code."""
    supervisor = SiteSupervisor(processes)
    for signum in signals:
        signal.signal(signum, supervisor.request_stop)
    return supervisor.run()
