"""The real gate (``fedtl-coordinator start``, one registered hospital online) under abuse from an
unauthenticated peer on loopback: oversized bodies, a connection flood, control characters in paths.

* A 300 MB body is refused before it is read (401 without node-auth headers, 413 with a
  Content-Length over the cap) or cut off at the cap (413, chunked), and the gate process's
  resident memory (VmRSS in /proc) grows by less than ``RSS_BOUND_MB`` meanwhile.
* A request without node-auth headers never reaches the SuperLink (its access log stays silent).
* Hundreds of idle, slow-header and half-open connections leave the Fleet API serving the
  registered hospital, and the gate closes the idle and slow ones after its idle timeout.
* ``%0A``, ``%0D``, ESC and U+2028 in a path cannot forge a line of the coordinator's log.
"""

from __future__ import annotations

import re
import select
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from server.ops.gate_limits import MIB, GateLimits
from tests.deploy.gate_fakes import flower_signed_headers
from tests.deploy.harness import FIXTURE_APP, LoopbackFederation, ProcessSupervisor, start_loopback_federation

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

RSS_BOUND_MB = 50
BODY_MB = 300
IDLE_TIMEOUT_S = GateLimits().idle_timeout_s
FORGED = "2026-12-02 07:00:00,000 server.ops.coordinator_service INFO registered hospital key /etc/evil.pub"
FORGED_PATH = FORGED.replace(" ", "%20")


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackFederation]:
    """Coordinator and one registered hospital (h1), online."""
    supervisor = ProcessSupervisor(log_dir=tmp_path_factory.mktemp("abuse-logs"))
    try:
        running = start_loopback_federation(tmp_path_factory.mktemp("abuse"), supervisor, hospitals=("h1",))
        running.start_hospital("h1")
        running.wait_for_online_nodes(1)
        yield running
    finally:
        supervisor.stop_all()


def _tls(federation: LoopbackFederation, timeout_s: float = 10.0) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=str(federation.pki.ca_cert))
    raw = socket.create_connection(("127.0.0.1", federation.coordinator.public_port), timeout=timeout_s)
    return context.wrap_socket(raw, server_hostname="localhost")


def _status(sock: ssl.SSLSocket, timeout_s: float = 10.0) -> int | None:
    """The status code of the response on ``sock``, or ``None`` if the connection closed without one."""
    sock.settimeout(timeout_s)
    data = b""
    try:
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    except (ConnectionError, ssl.SSLError, TimeoutError):
        pass
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", data)
    return int(match.group(1)) if match else None


def _head(path: str, headers: dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: localhost", "Content-Type: application/protobuf",
             *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _blast(sock: ssl.SSLSocket, total: int) -> int:
    """Send up to ``total`` body bytes; return how many were accepted before the connection was cut."""
    block = b"\0" * MIB
    sent = 0
    try:
        while sent < total:
            sock.sendall(block)
            sent += len(block)
    except (OSError, ssl.SSLError):
        pass
    return sent


def _send_watching_for_answer(sock: ssl.SSLSocket, total: int) -> tuple[int | None, int]:
    """Send ``total`` bytes as HTTP chunks until the peer answers or cuts the connection (one thread,
    non-blocking: an SSL socket must not be read and written from two threads); return the answer's
    status (``None`` if the connection was cut before one arrived) and the bytes accepted."""
    block = b"\0" * MIB
    framed = memoryview((b"%x\r\n" % len(block)) + block + b"\r\n")
    sock.setblocking(False)
    accepted, offset, answer = 0, 0, b""
    deadline = time.monotonic() + 30
    try:
        while accepted < total and time.monotonic() < deadline:
            readable, writable, _ = select.select([sock], [sock], [], 1.0)
            if readable:
                try:
                    answer += sock.recv(4096)
                except ssl.SSLWantReadError:
                    pass
                if answer:
                    break
            if writable:
                try:
                    offset += sock.send(framed[offset:])
                except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
                    continue
                if offset == len(framed):
                    accepted, offset = accepted + len(block), 0
    except (OSError, ssl.SSLError):
        pass
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", answer)
    return (int(match.group(1)) if match else None), accepted


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


@dataclass
class _RssPeak:
    """Samples a process's VmRSS every 20 ms in a thread; ``peak_mb`` is the largest seen."""

    pid: int
    peak_mb: float = 0.0
    running: bool = True

    def watch(self) -> None:
        while self.running:
            self.peak_mb = max(self.peak_mb, _rss_mb(self.pid))
            time.sleep(0.02)


def test_a_300_mb_body_is_refused_or_cut_off_and_the_gates_memory_grows_less_than_50_mb(
    federation: LoopbackFederation,
) -> None:
    assert federation.coordinator_process is not None
    gate_pid = federation.coordinator_process.popen.pid
    before_mb = _rss_mb(gate_pid)
    peak = _RssPeak(gate_pid, before_mb)
    watcher = threading.Thread(target=peak.watch, daemon=True)
    watcher.start()
    total = BODY_MB * MIB
    outcomes: dict[str, tuple[int | None, int]] = {}
    try:
        for name, headers, chunked in [
            ("unauthenticated", {"Content-Length": str(total)}, False),
            ("declared-over-cap", {**flower_signed_headers(), "Content-Length": str(total)}, False),
            ("chunked-over-cap", {**flower_signed_headers(), "Transfer-Encoding": "chunked"}, True),
        ]:
            with _tls(federation) as sock:
                sock.sendall(_head("/v1/fleet/get-run", headers))
                if chunked:  # the cap is only reached by sending: watch for the answer while sending
                    outcomes[name] = _send_watching_for_answer(sock, total)
                else:  # the answer comes from the head alone, before any of the body is sent
                    status = _status(sock)
                    outcomes[name] = (status, _blast(sock, total))
    finally:
        peak.running = False
        watcher.join(timeout=5)

    growth_mb = peak.peak_mb - before_mb
    print(f"gate VmRSS {before_mb:.0f} MB before, peak {peak.peak_mb:.0f} MB (+{growth_mb:.1f} MB); {outcomes}")
    assert outcomes["unauthenticated"][0] == 401
    assert outcomes["declared-over-cap"][0] == 413
    assert outcomes["chunked-over-cap"][0] == 413
    assert all(accepted < 64 * MIB for _, accepted in outcomes.values()), outcomes  # cut off, not drained
    assert growth_mb < RSS_BOUND_MB


def test_a_request_without_node_auth_headers_never_reaches_the_superlink(federation: LoopbackFederation) -> None:
    assert federation.coordinator_process is not None
    marker = "/v1/fleet/get-fab"  # never called by an idle SuperNode, logged by the SuperLink when it is
    log = federation.coordinator_process.log

    with _tls(federation) as sock:
        sock.sendall(_head(marker, {"Content-Length": "2"}) + b"\x08\x01")
        unauthenticated = _status(sock)
    with _tls(federation) as sock:
        sock.sendall(_head(marker, {**flower_signed_headers(), "Content-Length": "2"}) + b"\x08\x01")
        signed_by_a_stranger = _status(sock)
    time.sleep(1.0)
    superlink_saw = [line for line in log.read_text(errors="replace").splitlines() if f'"POST {marker} ' in line]

    assert unauthenticated == 401
    assert signed_by_a_stranger == 401  # well-formed headers pass the gate; the SuperLink's signature check refuses
    assert len(superlink_saw) == 1, superlink_saw  # the SuperLink logged only the second request


def _open_flood(federation: LoopbackFederation, idle: int, slow: int, half_open: int) -> dict[str, list[socket.socket]]:
    flood: dict[str, list[socket.socket]] = {"idle": [], "slow": [], "half-open": []}
    for _ in range(idle):
        flood["idle"].append(_tls(federation))
    for _ in range(slow):
        sock = _tls(federation)
        sock.sendall(b"POST /v1/fleet/pull-messages HTTP/1.1\r\nHost: x\r\n")
        flood["slow"].append(sock)
    for _ in range(half_open):  # TCP only: the TLS handshake never starts
        flood["half-open"].append(socket.create_connection(("127.0.0.1", federation.coordinator.public_port)))
    return flood


def _closed_by_peer(sock: socket.socket) -> bool:
    sock.settimeout(0.05)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except (OSError, ssl.SSLError):
        return True


def _drip(socks: list[socket.socket], stop: threading.Event) -> None:
    """One byte a second on each slow connection: a request head that never completes."""
    while not stop.wait(1.0):
        for sock in socks:
            try:
                sock.sendall(b"X")
            except (OSError, ssl.SSLError):
                pass


def test_a_flood_of_idle_slow_and_half_open_connections_leaves_the_fleet_api_serving_the_registered_hospital(
    federation: LoopbackFederation,
) -> None:
    hospital_log = federation.hospitals["h1"].log
    log_before = len(hospital_log.read_text(errors="replace"))
    flood = _open_flood(federation, idle=300, slow=100, half_open=100)
    opened = time.monotonic()
    stop = threading.Event()
    dripping = threading.Thread(target=_drip, args=(flood["slow"], stop), daemon=True)
    dripping.start()
    try:
        run_id = federation.submit_run(FIXTURE_APP, {"expected-nodes": 1, "reply-timeout-s": 45.0})
        run_status = federation.wait_for_run(run_id, timeout_s=60)  # the hospital pulls, trains, pushes meanwhile
        with _tls(federation) as sock:
            sock.sendall(_head("/v1/fleet/send-node-heartbeat", {**flower_signed_headers(), "Content-Length": "0"}))
            stranger_status = _status(sock)
        time.sleep(max(0.0, opened + IDLE_TIMEOUT_S + 3 - time.monotonic()))
        closed = {kind: sum(_closed_by_peer(s) for s in flood[kind]) for kind in ("idle", "slow")}
    finally:
        stop.set()
        dripping.join(timeout=5)
        for socks in flood.values():
            for sock in socks:
                sock.close()
    hospital_said = hospital_log.read_text(errors="replace")[log_before:]

    assert run_status == "finished:completed", f"run {run_id}: {run_status}; logs in {federation.supervisor.log_dir}"
    assert stranger_status == 401  # forwarded to the SuperLink, which refused the stranger's key
    assert "Connection attempt failed" not in hospital_said, hospital_said[-2000:]
    assert closed == {"idle": 300, "slow": 100}, closed  # closed by the gate after its idle timeout


RECORD_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} \S+ (DEBUG|INFO|WARNING|ERROR|CRITICAL) "  # the coordinator's own
    r"|  "  # a traceback line below its record
    r"|\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR|CRITICAL) \[\S+\] "  # flower-superlink's uvicorn
    r"|\x1b\[\d+m(DEBUG|INFO|WARNING|ERROR|CRITICAL) \x1b\[0m:  )"  # flower-superlink's own console lines
)


@pytest.mark.parametrize("control", ["%0A", "%0D%0A", "%0D", "%1B[2K%0D", "%E2%80%A8", "%00"])
def test_control_characters_in_a_path_cannot_forge_a_line_of_the_coordinators_log(
    federation: LoopbackFederation, control: str
) -> None:
    assert federation.coordinator_process is not None
    log = federation.coordinator_process.log
    for path in (
        f"/v1/control/list-runs{control}{FORGED_PATH}",
        f"/v1/fleet/get-run{control}{FORGED_PATH}",
        f"/v1/fleet/get-run{control}",
        f"/health{control}{FORGED_PATH}",
    ):
        with _tls(federation) as sock:
            sock.sendall(_head(path, {**flower_signed_headers(), "Content-Length": "0"}))
            assert _status(sock) in (400, 401, 403)
    time.sleep(0.5)
    lines = log.read_text(errors="replace").splitlines()

    malformed = [line for line in lines if not RECORD_LINE.match(line)]
    forged = [line for line in lines if line.lstrip().startswith(FORGED[:23])]
    assert not malformed and not forged, (malformed + forged)[:5]
    assert any(FORGED in line and "refused" in line for line in lines)  # logged, escaped, on the refusal's line


@pytest.mark.parametrize(
    "value",
    [b"\x1b[2K\r" + FORGED.encode(), b"x\xe2\x80\xa8" + FORGED.encode(), b"x\x00" + FORGED.encode(),
     b"x\r\n" + FORGED.encode()],
    ids=["escape", "unicode-line-separator", "nul", "crlf"],
)
def test_control_characters_in_headers_cannot_forge_a_line_of_the_coordinators_log(
    federation: LoopbackFederation, value: bytes
) -> None:
    assert federation.coordinator_process is not None
    log = federation.coordinator_process.log
    signed = flower_signed_headers()
    for name in (b"flwr-timestamp", b"flwr-public-key", b"user-agent"):
        headers = [(k.encode(), v.encode()) for k, v in signed.items() if k.encode() != name] + [(name, value)]
        head = b"POST /v1/fleet/get-run HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n"
        head += b"Content-Type: application/protobuf\r\n"
        head += b"".join(k + b": " + v + b"\r\n" for k, v in headers) + b"\r\n"
        with _tls(federation) as sock:
            sock.sendall(head)
            assert _status(sock) in (400, 401)
    time.sleep(0.5)
    lines = log.read_text(errors="replace").splitlines()

    malformed = [line for line in lines if not RECORD_LINE.match(line)]
    forged = [line for line in lines if line.lstrip().startswith(FORGED[:23])]
    assert not malformed and not forged, (malformed + forged)[:5]
