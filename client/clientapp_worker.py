"""The site's long-lived ClientApp process: one Python process, torch imported once, serving every message.

Flower 1.41's SuperNode in its default ``--isolation subprocess`` starts ``flower-superexec``,
which starts a fresh ``flwr-clientapp`` process for every message (every train, evaluate and
backbone install): Python, torch, Opacus and torchvision are imported again each time (about 5 s
on a 2-core machine) and the site session (manifest, decoded images, trunk features) is reopened.
Flower's own ``flwr-clientapp`` serves exactly one task and exits; its warm executor pools exist
only for Kubernetes and not for ClientApps.

With ``flower-supernode --isolation process`` the SuperNode starts nothing and waits for an
executor to claim tasks on its Runtime API (loopback). This module is that executor, started and
supervised by ``fedtl-hospital start`` (:mod:`client.hospital_daemon`). It does, for each task,
what ``flwr.supernode.runtime.run_clientapp`` does in a fresh process, with Flower's own Runtime
API client and functions: claim the task (``AcquireTask``, which hands out the task's token), send
task heartbeats, pull the message, context, run and FAB, install the FAB (once per FAB hash),
load the ClientApp it names, call it, push the reply and the context back. The messages and
their content are exactly those of the per-message process; what changes is that the process,
its imports and the ClientApp module's in-memory site sessions (``client.client_app``) stay.

What differs on purpose:

* an exception that escapes the ClientApp (the fedtl handlers catch everything themselves, but a
  FAB's own module could fail to import) is logged here in full and answered with Flower's error
  code and a reason that holds no text of the exception (Flower's own process puts ``str(exc)``
  into the reply, which leaves the site);
* a task the SuperNode gives up on (its heartbeat answered "not valid", or its token refused with
  401, on which Flower's Runtime client sends SIGINT to its own process) ends that task only: the
  process goes on with the next one. SIGINT ends the process only once the daemon is gone.

A FAB's own modules (the app bundle's package) are forgotten when a run of another FAB arrives,
so a new app version is imported afresh; fedtl itself is the site's installed package.

Run (the daemon does):  python -m client.clientapp_worker --runtime-api-address 127.0.0.1:PORT --parent-pid PID
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger("client.clientapp_worker")  # the same name when run with -m

DEFAULT_POLL_S = 0.2
"""Seconds between two ``AcquireTask`` calls while the site is idle (Flower's SuperExec: 1 s)."""
WARM_MODULE = "client.client_app"
"""Imported before the first task, so the first message finds torch, Opacus and the app loaded."""
ESCAPED_REASON = "the ClientApp raised an exception at the site; the details are in the site's log"


class TaskInterrupted(BaseException):
    """SIGINT while the daemon lives: Flower's Runtime client gave up on the running task. A
    ``BaseException``, so that no handler's ``except Exception`` mistakes it for the task failing."""


@dataclass
class TaskTiming:
    """Where one task's time went, in seconds (logged per task; the benchmark reads it)."""

    task_id: int
    message_type: str = "?"
    pull_s: float = 0.0
    load_s: float = 0.0
    handler_s: float = 0.0
    push_s: float = 0.0

    def line(self) -> str:
        return (f"task {self.task_id} {self.message_type}: pull {self.pull_s:.3f} s, load {self.load_s:.3f} s, "
                f"handler {self.handler_s:.3f} s, push {self.push_s:.3f} s")


@dataclass
class AppCache:
    """The FABs this process installed and the ClientApps it loaded, by FAB hash."""

    apps: dict[str, Any] = field(default_factory=dict)
    project_dirs: dict[str, Path] = field(default_factory=dict)

    def client_app(self, run: Any, fab: Any) -> Any:
        """The ClientApp of ``run``'s FAB: installed and imported on first use, then reused."""
        from flwr.cli.install import install_from_fab
        from flwr.clientapp.utils import get_load_client_app_fn
        from flwr.common.config import get_project_dir

        if fab.hash_str in self.apps:
            return self.apps[fab.hash_str]
        for old_hash in list(self.apps):  # another FAB: its modules must not shadow the new one's
            forget_modules_under(self.project_dirs.pop(old_hash))
            del self.apps[old_hash]
        install_from_fab(fab.content, skip_prompt=True)
        self.project_dirs[fab.hash_str] = Path(get_project_dir(run.fab_id, run.fab_version, fab.hash_str)).resolve()
        load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
        self.apps[fab.hash_str] = load(run.fab_id, run.fab_version, fab.hash_str)
        return self.apps[fab.hash_str]


def forget_modules_under(directory: Path) -> None:
    """Drop every imported module whose file lies under ``directory`` and the directory from ``sys.path``."""
    for name, module in list(sys.modules.items()):
        origin = getattr(module, "__file__", None)
        if origin and Path(origin).resolve().is_relative_to(directory):
            del sys.modules[name]
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != directory]


def runtime_client(address: str, token: str | None = None) -> Any:
    """A Flower Runtime API client for the SuperNode at ``address`` (loopback, plain HTTP as Flower's
    own SuperExec uses it); with ``token``, authorised for that one task."""
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supercore.runtime.tracing import RuntimeTracingInterceptor

    interceptors: list[Any] = [RuntimeTracingInterceptor(),
                               RuntimeVersionHttpInterceptor(component_name="flwr-clientapp" if token else "SuperExec")]
    if token:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(server_address=address, insecure=True, root_certificates=None,
                                                 interceptors=interceptors, retry_invoker=make_simple_http_retry_invoker())


class _TaskHeartbeat:
    """Flower's task heartbeat (``SendTaskHeartbeat``), but a refused one marks the task abandoned
    instead of raising SIGINT in this long-lived process."""

    def __init__(self, client: Any) -> None:
        from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest  # type: ignore[attr-defined]
        from flwr.supercore.heartbeat import HeartbeatSender

        self.abandoned = threading.Event()
        self._client = client
        self._request = SendTaskHeartbeatRequest()
        self._sender = HeartbeatSender(self._beat)

    def _beat(self) -> bool:
        import httpx

        try:
            response = self._client.SendTaskHeartbeat(self._request)
        except httpx.TransportError:
            return False
        except httpx.HTTPStatusError as error:
            if error.response.status_code in (503, 504):
                return False
            self.abandoned.set()
            return True
        if not response.success:
            self.abandoned.set()
        return True

    def __enter__(self) -> _TaskHeartbeat:
        self._sender.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._sender.is_running:
            self._sender.stop()


def serve_task(address: str, token: str, task_id: int, apps: AppCache) -> TaskTiming:
    """Run one claimed task exactly as ``flwr-clientapp --token`` would, in this process."""
    from flwr.app import Error, Message
    from flwr.clientapp.client_app import LoadClientAppError
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

    timing = TaskTiming(task_id)
    client = runtime_client(address, token)
    message = context = reply = None
    sub_status, details = SubStatus.FAILED, "ClientApp task failed at the site"
    try:
        with _TaskHeartbeat(client) as heartbeat:
            try:
                started = time.perf_counter()
                message, context, run, fab = pull_task_input(client)
                timing.message_type = message.metadata.message_type
                timing.pull_s = time.perf_counter() - started
                started = time.perf_counter()
                app = apps.client_app(run, fab)
                timing.load_s = time.perf_counter() - started
                started = time.perf_counter()
                reply = app(message=message, context=context)
                timing.handler_s = time.perf_counter() - started
                sub_status, details = SubStatus.COMPLETED, ""
            except Exception as error:  # noqa: BLE001 - one failed task must not end the site's process
                code = (ErrorCode.LOAD_CLIENT_APP_EXCEPTION if isinstance(error, LoadClientAppError)
                        else ErrorCode.CLIENT_APP_RAISED_EXCEPTION)
                logger.exception("task %d: the ClientApp failed; the coordinator gets Flower's error code %d only",
                                 task_id, code)
                if message is not None:
                    reply = Message(Error(code=code, reason=ESCAPED_REASON), reply_to=message)
            if heartbeat.abandoned.is_set():
                logger.warning("task %d: the SuperNode gave up on this task while it ran; its reply is dropped", task_id)
            started = time.perf_counter()
            if reply is not None and context is not None:
                try:
                    push_message(client, reply, context)
                except Exception:  # noqa: BLE001
                    logger.exception("task %d: the reply could not be handed to the SuperNode", task_id)
            timing.push_s = time.perf_counter() - started
    finally:
        push_task_output(client=client, context=context, sub_status=sub_status, details=details)
        client.close()
    return timing


def serve(address: str, poll_s: float = DEFAULT_POLL_S, stop: threading.Event | None = None) -> None:
    """Claim and run ClientApp tasks from the SuperNode at ``address`` until ``stop`` is set."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # type: ignore[attr-defined]
    from flwr.supercore.constant import TaskType

    stop = stop or threading.Event()
    started = time.perf_counter()
    __import__(WARM_MODULE)
    logger.info("ClientApp worker ready (imports %.1f s); claiming tasks from the SuperNode at %s",
                time.perf_counter() - started, address)
    apps = AppCache()
    acquire = runtime_client(address)
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP], agentapp_fab_hashes=[])
    try:
        while not stop.is_set():
            try:
                response = acquire.AcquireTask(request)
                if response.HasField("task") and response.token:
                    logger.info("%s", serve_task(address, response.token, response.task.task_id, apps).line())
                    continue
            except TaskInterrupted:
                logger.warning("a task was interrupted: the SuperNode no longer accepts its token (it gave the "
                               "task up, or restarted); no reply from this site for that message")
                continue
            stop.wait(poll_s)
    finally:
        acquire.close()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m client.clientapp_worker --runtime-api-address HOST:PORT [--parent-pid PID]``."""
    from common.daemon_setup import configure_logging

    parser = argparse.ArgumentParser(prog="python -m client.clientapp_worker", description=__doc__.splitlines()[0])
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API (loopback HOST:PORT)")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process (the daemon) is gone")
    parser.add_argument("--poll-s", type=float, default=DEFAULT_POLL_S, help="seconds between task claims while idle")
    args = parser.parse_args(argv)
    configure_logging()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Runtime API call otherwise
    logging.getLogger("flwr").propagate = False  # Flower's logger has its own console handler
    stop = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        if stop.is_set():  # a second SIGTERM (the daemon's after a group-wide one) while exiting
            return
        logger.info("ClientApp worker stopping (signal %d)", signum)
        stop.set()
        raise SystemExit(0)

    def interrupted(_signum: int, _frame: object) -> None:
        if args.parent_pid is None or not _pid_exists(args.parent_pid):
            raise KeyboardInterrupt
        raise TaskInterrupted

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, interrupted)
    if args.parent_pid is not None:
        from flwr.supercore.app_utils import start_parent_process_monitor

        start_parent_process_monitor(args.parent_pid)  # SIGINT once the daemon is gone
    try:
        serve(args.runtime_api_address, args.poll_s, stop)
    except KeyboardInterrupt:
        logger.warning("ClientApp worker: the daemon that started it is gone; exiting")
        return 1
    return 0


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


if __name__ == "__main__":
    raise SystemExit(main())
