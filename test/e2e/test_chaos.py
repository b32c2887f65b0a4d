"""Faults under client load: killed processes, a silent network path, replicas and drains.

Every test runs keep-alive clients whose requests each carry a unique marker, and checks every
response against its own request. A response is allowed to be correct for its request, an error
status 502, 503 or 504 with a JSON error body, or a connection error (refused, reset, timed out,
or a body cut short). Anything else fails the test: a body of another request, another status,
or a truncated body that the client read as complete.

The bridge redials after at most 1 s, and the tests of a silent path use a 0.5 s keepalive
interval and a 1 s keepalive timeout, so that every fault is noticed within about 2.5 s. Clients
speak plain HTTP to the broker to keep the load light on a shared machine.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import hashlib
import http.client
import json
import os
import re
import selectors
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from http_clients import body_length, body_sha256, header_values
from taser_harness import (
    START_TIMEOUT,
    SYSTEM_PYTHON,
    Bridge,
    Broker,
    Harness,
    ManagedProcess,
    ProcessError,
    StandIn,
    child_env,
    free_port,
    listening_sockets,
)

BRIDGE_WAIT_S = 2.0
# The short keepalive of the tests that measure how fast a silent path is noticed.
KEEPALIVE_INTERVAL_S = 0.5
KEEPALIVE_TIMEOUT_S = 1.0
FAST_KEEPALIVE_ARGS = ["--keepalive-interval", "500ms", "--keepalive-timeout", "1s"]
# A killed process closes its sockets, so the other tests notice faults without keepalive. On
# a loaded 2-core machine a 1 s keepalive timeout also ended healthy sessions during stalls of
# 1-2 s, so these tests allow 5 s.
STEADY_KEEPALIVE_ARGS = ["--keepalive-interval", "500ms", "--keepalive-timeout", "5s"]
BROKER_ARGS = ["--bridge-wait", "2s", *STEADY_KEEPALIVE_ARGS]
BRIDGE_ARGS = ["--reconnect-max", "1s", *STEADY_KEEPALIVE_ARGS]
FAST_BROKER_ARGS = ["--bridge-wait", "2s", *FAST_KEEPALIVE_ARGS]
FAST_BRIDGE_ARGS = ["--reconnect-max", "1s", *FAST_KEEPALIVE_ARGS]

# Both sides must notice a silent path within one keepalive interval and timeout, plus a
# margin for a loaded machine.
DETECTION_LIMIT_S = KEEPALIVE_INTERVAL_S + KEEPALIVE_TIMEOUT_S + 1.0
# The goal for the time from a restarted process to the first successful request is 1 s. The
# assertion allows 3 s because the machine running the suite may be busy.
RECONNECT_LIMIT_S = 3.0

# Per-operation socket timeout of the load clients. Every fault here ends a request well before.
CLIENT_TIMEOUT_S = 8.0
# Upper bounds on every load, whatever a test waits for.
LOAD_MAX_SECONDS = 90.0
LOAD_MAX_REQUESTS = 200_000
# Pause of a load client after a failed request, so that a refused port is not hammered.
ERROR_PAUSE_S = 0.02
ALLOWED_ERROR_STATUSES = (502, 503, 504)
# taser truncates its log times to milliseconds, so an event happened up to this long after the
# time it shows.
LOG_TIME_RESOLUTION_S = 0.002

HAPROXY = "/usr/sbin/haproxy"

# Outcome verdicts of one load request.
OK = "ok"
ERROR_STATUS = "error_status"
CONNECTION_ERROR = "connection_error"
WRONG = "wrong"


# ---------------------------------------------------------------------------------------------
# Processes and logs


def event_time(event: dict[str, Any]) -> float:
    """Return the wall-clock time of a taser log event, in seconds since the epoch."""
    stamp = datetime.strptime(event["time"], "%Y-%m-%dT%H:%M:%S.%fZ")
    return stamp.replace(tzinfo=timezone.utc).timestamp()


def wait_for_any_event(
    process: ManagedProcess, names: Iterable[str], offset: int, timeout: float
) -> dict[str, Any]:
    """Wait for the first log event named one of NAMES after byte OFFSET, and return it."""
    expected_names = set(names)

    def find() -> Optional[dict[str, Any]]:
        for event in process.events(offset):
            if event.get("event") in expected_names:
                return event
        return None

    return process.wait_until(find, timeout, f"one of the log events {sorted(expected_names)}")


def sigkill(process: ManagedProcess) -> int:
    """Kill PROCESS with SIGKILL by its PID, wait for it, and return its exit code."""
    process.popen.kill()
    process.popen.wait(timeout=10)
    # stop() only records the exit code of a process that has already ended.
    return process.stop()


def unique_name(harness: Harness, name: str) -> str:
    """Return NAME without its trailing digits, numbered if a process of HARNESS has that name."""
    base = re.sub(r"\d+$", "", name)
    used = {process.name for process in harness.processes}
    if base not in used:
        return base
    for index in range(2, 1000):
        candidate = f"{base}{index}"
        if candidate not in used:
            return candidate
    raise ProcessError(f"too many processes named {base}")


def start_again(harness: Harness, process: ManagedProcess, **start_args: Any) -> ManagedProcess:
    """Start a copy of a stopped broker or bridge with the same command line.

    A broker copy listens on the same ports. The copy logs to a file of its own and is stopped
    with the harness's other processes. START_ARGS go to the copy's start().
    """
    assert not process.running(), f"{process.name} (pid {process.pid}) still runs"
    again = copy.copy(process)
    again.name = unique_name(harness, process.name)
    again.log_path = process.log_path.with_name(f"{again.name}.log")
    again.popen = None
    again.returncode = None
    again.killed = False
    harness.processes.append(again)
    return again.start(**start_args)


def start_bridge_via(
    harness: Harness,
    broker: Broker,
    standin: StandIn,
    broker_address: str,
    extra_args: Iterable[str] = (),
    wait_connected: bool = True,
) -> Bridge:
    """Start a bridge for BROKER that dials BROKER_ADDRESS, a relay or load balancer before it."""
    bridge = Bridge(
        harness.taser_bin,
        harness.certs,
        harness.work_dir,
        broker,
        standin.url,
        name=unique_name(harness, "bridge"),
        extra_args=list(extra_args),
        env=child_env(),
    )
    position = bridge.argv.index("--broker-address")
    bridge.argv[position + 1] = broker_address
    harness.processes.append(bridge)
    return bridge.start(wait_connected=wait_connected)


class Haproxy(ManagedProcess):
    """haproxy in TCP mode on 127.0.0.1, sending connections round-robin to backend ports."""

    def __init__(self, work_dir: Path, backend_ports: list[int], name: str = "haproxy") -> None:
        self.port = free_port()
        self.config_path = work_dir / f"{name}.cfg"
        servers = "".join(
            f"    server replica{index} 127.0.0.1:{port}\n"
            for index, port in enumerate(backend_ports, start=1)
        )
        # Long client and server timeouts, so that haproxy never cuts an idle tunnel itself.
        self.config_path.write_text(
            "global\n"
            "    maxconn 256\n"
            "defaults\n"
            "    mode tcp\n"
            "    timeout connect 2s\n"
            "    timeout client 120s\n"
            "    timeout server 120s\n"
            "frontend bridges\n"
            f"    bind 127.0.0.1:{self.port}\n"
            "    default_backend brokers\n"
            "backend brokers\n"
            "    balance roundrobin\n"
            f"{servers}"
        )
        # -db keeps haproxy in the foreground, so that its PID is the one this test started.
        argv = [HAPROXY, "-f", str(self.config_path), "-db"]
        super().__init__(name, argv, work_dir / f"{name}.log")

    def start(self, timeout: float = START_TIMEOUT) -> "Haproxy":
        super().start()
        self.wait_until(
            lambda: ("127.0.0.1", self.port) in listening_sockets(self.pid),
            timeout,
            f"haproxy to listen on port {self.port}",
        )
        return self


# ---------------------------------------------------------------------------------------------
# A TCP relay that can go silent


class TcpRelay:
    """A TCP relay from a port on 127.0.0.1 to a target address, which can be frozen.

    Frozen, the relay neither accepts nor reads, but keeps every socket open, so no FIN or RST
    reaches either side, as behind a router that drops every packet. Connections that arrive
    meanwhile wait in the listen backlog and are served after unfreeze(). One thread does all
    the work, from __enter__ until __exit__.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        self._listener.setblocking(False)
        self.port = self._listener.getsockname()[1]
        self._peers: dict[socket.socket, socket.socket] = {}
        self._ended_reading: set[socket.socket] = set()
        self._selector = selectors.DefaultSelector()
        self._freeze_requested = threading.Event()
        # Set by the relay thread once it has stopped moving bytes.
        self._frozen = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"relay-{self.port}", daemon=True)
        self.connections_accepted = 0

    def __enter__(self) -> "TcpRelay":
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stopping.set()
        self._thread.join(timeout=10)
        assert not self._thread.is_alive(), "relay thread did not stop within 10 s"
        for sock in list(self._peers):
            sock.close()
        self._listener.close()
        self._selector.close()

    def freeze(self) -> None:
        """Stop forwarding, and return once the relay thread moves no more bytes."""
        self._freeze_requested.set()
        assert self._frozen.wait(timeout=5), "relay did not freeze within 5 s"

    def unfreeze(self) -> None:
        self._freeze_requested.clear()

    def _run(self) -> None:
        while not self._stopping.is_set():
            if self._freeze_requested.is_set():
                self._frozen.set()
                self._stopping.wait(0.01)
                continue
            self._frozen.clear()
            for key, _ in self._selector.select(timeout=0.02):
                # Checked between connections, so that a freeze waits for one forward at most.
                if self._freeze_requested.is_set():
                    break
                if key.fileobj is self._listener:
                    self._accept()
                elif key.fileobj in self._peers:
                    self._forward(key.fileobj)

    def _accept(self) -> None:
        try:
            downstream, _ = self._listener.accept()
        except BlockingIOError:
            return
        self.connections_accepted += 1
        try:
            upstream = socket.create_connection(self.target, timeout=2)
        except OSError:
            downstream.close()
            return
        for sock in (downstream, upstream):
            # A send blocks for at most 2 s, and then the relay closes the stuck pair.
            sock.settimeout(2)
            self._selector.register(sock, selectors.EVENT_READ)
        self._peers[downstream] = upstream
        self._peers[upstream] = downstream

    def _forward(self, sock: socket.socket) -> None:
        peer = self._peers[sock]
        try:
            data = sock.recv(65536)
            if data:
                peer.sendall(data)
                return
            # Pass an end of stream on to the peer, and close the pair once both directions ended.
            self._selector.unregister(sock)
            self._ended_reading.add(sock)
            peer.shutdown(socket.SHUT_WR)
            if peer in self._ended_reading:
                self._close_pair(sock)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close_pair(sock)

    def _close_pair(self, sock: socket.socket) -> None:
        peer = self._peers.pop(sock)
        self._peers.pop(peer, None)
        for pair_member in (sock, peer):
            if pair_member not in self._ended_reading:
                self._selector.unregister(pair_member)
            self._ended_reading.discard(pair_member)
            pair_member.close()


# ---------------------------------------------------------------------------------------------
# Client load with a check of every response


@dataclass
class Outcome:
    """One load request and what came back. Times are wall-clock seconds, as in taser's logs."""

    index: int
    client: int
    target: str
    started: float
    sent: Optional[float]  # when the whole request was written, or None if writing failed
    finished: float
    status: int  # 0 when no response arrived
    verdict: str  # OK, ERROR_STATUS, CONNECTION_ERROR or WRONG
    detail: str

    @property
    def ok(self) -> bool:
        return self.verdict == OK

    def describe(self) -> str:
        sent = f"{self.sent - self.started:.3f}" if self.sent is not None else "never"
        return (
            f"request {self.index} (client {self.client}) {self.target}: {self.verdict}, "
            f"status {self.status}, started {self.started:.3f}, sent +{sent} s, "
            f"took {self.finished - self.started:.3f} s: {self.detail}"
        )


@dataclass
class PlannedRequest:
    """A load request and the check of its response."""

    method: str
    target: str
    headers: dict[str, str]
    body: Optional[bytes]
    check: Callable[[bytes], str]  # returns "" when the 200 response is right, else the fault


def check_echo(method: str, target: str, marker: str, body: Optional[bytes]) -> Callable:
    def check(payload: bytes) -> str:
        document = json.loads(payload)
        echoed = f"{document['method']} {document['target']}"
        if echoed != f"{method} {target}":
            return f"echo of another request: {echoed}"
        markers = header_values(document, "X-Request-Marker")
        if markers != [marker]:
            return f"echo has markers {markers}"
        expected_body = body or b""
        if body_length(document) != len(expected_body):
            return f"echo has a body of {body_length(document)} bytes, sent {len(expected_body)}"
        if body_sha256(document) != hashlib.sha256(expected_body).hexdigest():
            return "echo has the SHA-256 of another body"
        return ""

    return check


def check_delay(delay_ms: int) -> Callable:
    def check(payload: bytes) -> str:
        document = json.loads(payload)
        if document != {"delay_ms": delay_ms}:
            return f"expected delay_ms {delay_ms}, got {document}"
        return ""

    return check


def judge(request: PlannedRequest, status: int, payload: bytes) -> tuple[str, str]:
    """Return the verdict and a detail for a response that arrived complete."""
    if status == 200:
        try:
            fault = request.check(payload)
        except (ValueError, KeyError, TypeError) as error:
            fault = f"unreadable body ({error}): {payload[:200]!r}"
        return (WRONG, fault) if fault else (OK, "")
    if status in ALLOWED_ERROR_STATUSES:
        try:
            errors = json.loads(payload)["errors"]
        except (ValueError, KeyError, TypeError):
            return WRONG, f"error status without a JSON errors list: {payload[:200]!r}"
        if not isinstance(errors, list) or not errors:
            return WRONG, f"error status with an empty errors list: {payload[:200]!r}"
        return ERROR_STATUS, "; ".join(str(message) for message in errors)[:200]
    return WRONG, f"unexpected status: {payload[:200]!r}"


class EchoLoad:
    """Keep-alive HTTP clients on threads, sending checked requests to 127.0.0.1:PORT.

    Each request has a unique marker in its target and in X-Request-Marker. Every third echo
    request is a POST with a body of its own. The first SLOW_CLIENTS clients request
    /v1/test/delay instead, each with its own delay value of about SLOW_MS milliseconds, which
    the response has to repeat. A client opens a new connection after any failure or close.
    The load ends on stop(), after LOAD_MAX_SECONDS, or after LOAD_MAX_REQUESTS requests.
    """

    def __init__(
        self,
        port: int,
        clients: int,
        slow_clients: int = 0,
        slow_ms: int = 1500,
        timeout: float = CLIENT_TIMEOUT_S,
    ) -> None:
        self.port = port
        self.timeout = timeout
        self.slow_clients = slow_clients
        self.slow_ms = slow_ms
        self.run_id = uuid.uuid4().hex[:12]
        self._lock = threading.Lock()
        self._outcomes: list[Outcome] = []
        self._next_index = 0
        self._stopping = threading.Event()
        self._deadline = 0.0
        self._client_failures: list[str] = []
        self._threads = [
            threading.Thread(target=self._run_client, args=(client,), name=f"load-{client}")
            for client in range(clients)
        ]

    def __enter__(self) -> "EchoLoad":
        self._deadline = time.monotonic() + LOAD_MAX_SECONDS
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        self.stop(check=exc_type is None)

    def stop(self, check: bool = True) -> None:
        """Stop sending and wait for the clients, each of which first ends its running request."""
        self._stopping.set()
        for thread in self._threads:
            thread.join(timeout=self.timeout + 5)
        alive = [thread.name for thread in self._threads if thread.is_alive()]
        if check:
            assert alive == [], f"load clients still running after stop: {alive}"
            assert self._client_failures == [], self._client_failures

    def outcomes(self) -> list[Outcome]:
        with self._lock:
            return list(self._outcomes)

    def wait_until(
        self, condition: Callable[[list[Outcome]], Any], timeout: float, what: str
    ) -> Any:
        """Poll CONDITION on the outcomes so far until it returns a true value or TIMEOUT passes."""
        deadline = time.monotonic() + timeout
        while True:
            result = condition(self.outcomes())
            if result:
                return result
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"timed out after {timeout:.0f} s waiting for {what}; {self.summary()}"
                )
            time.sleep(0.02)

    def wait_for_successes(self, count: int, after: float, timeout: float = 20.0) -> None:
        """Wait until COUNT requests that started at or after AFTER have succeeded."""
        self.wait_until(
            lambda outcomes: sum(1 for o in outcomes if o.ok and o.started >= after) >= count,
            timeout,
            f"{count} successful requests",
        )

    def wait_for_first_success(self, after: float, timeout: float = 20.0) -> Outcome:
        """Wait for a request that succeeded after time AFTER, and return the earliest one."""

        def successes(outcomes: list[Outcome]) -> list[Outcome]:
            return [o for o in outcomes if o.ok and o.finished >= after]

        self.wait_until(successes, timeout, "a successful request")
        # A client that finished slightly earlier may record its outcome a moment later.
        time.sleep(0.1)
        return min(successes(self.outcomes()), key=lambda o: o.finished)

    def summary(self) -> str:
        outcomes = self.outcomes()
        verdicts = collections.Counter(o.verdict for o in outcomes)
        statuses = collections.Counter(o.status for o in outcomes if o.status)
        return f"{len(outcomes)} requests, verdicts {dict(verdicts)}, statuses {dict(statuses)}"

    def _take_index(self) -> Optional[int]:
        with self._lock:
            if self._stopping.is_set() or time.monotonic() >= self._deadline:
                return None
            if self._next_index >= LOAD_MAX_REQUESTS:
                return None
            index = self._next_index
            self._next_index += 1
            return index

    def _plan(self, index: int, client: int) -> PlannedRequest:
        marker = f"{self.run_id}-{index}"
        headers = {"X-Vault-Token": "root", "X-Request-Marker": marker}
        if client < self.slow_clients:
            # Unique among the few delay requests that run at the same time.
            delay_ms = self.slow_ms + index % 500
            target = f"/v1/test/delay?ms={delay_ms}&request={marker}"
            return PlannedRequest("GET", target, headers, None, check_delay(delay_ms))
        target = f"/v1/test/echo?request={marker}&client={client}"
        body = None
        if index % 3 == 0:
            body = f"body-{marker};".encode() * (1 + index % 40)
        method = "POST" if body is not None else "GET"
        return PlannedRequest(
            method, target, headers, body, check_echo(method, target, marker, body)
        )

    def _run_client(self, client: int) -> None:
        connection: Optional[http.client.HTTPConnection] = None
        try:
            while (index := self._take_index()) is not None:
                if connection is None:
                    connection = http.client.HTTPConnection(
                        "127.0.0.1", self.port, timeout=self.timeout
                    )
                request = self._plan(index, client)
                started = time.time()
                sent = None
                status = 0
                try:
                    connection.request(
                        request.method, request.target, body=request.body, headers=request.headers
                    )
                    sent = time.time()
                    response = connection.getresponse()
                    status = response.status
                    # Raises IncompleteRead when the body ends before its declared length.
                    payload = response.read()
                    will_close = response.will_close
                except (OSError, http.client.HTTPException) as error:
                    connection.close()
                    connection = None
                    self._record(
                        index,
                        client,
                        request,
                        started,
                        sent,
                        status,
                        CONNECTION_ERROR,
                        f"{type(error).__name__}: {error}",
                    )
                    self._stopping.wait(ERROR_PAUSE_S)
                    continue
                verdict, detail = judge(request, status, payload)
                self._record(index, client, request, started, sent, status, verdict, detail)
                if will_close:
                    connection.close()
                    connection = None
                if verdict != OK:
                    self._stopping.wait(ERROR_PAUSE_S)
        except Exception as error:  # noqa: BLE001 - reported by stop()
            self._client_failures.append(f"load client {client} failed: {error!r}")
        finally:
            if connection is not None:
                connection.close()

    def _record(
        self,
        index: int,
        client: int,
        request: PlannedRequest,
        started: float,
        sent: Optional[float],
        status: int,
        verdict: str,
        detail: str,
    ) -> None:
        outcome = Outcome(
            index, client, request.target, started, sent, time.time(), status, verdict, detail
        )
        with self._lock:
            self._outcomes.append(outcome)


def assert_no_wrong_responses(outcomes: list[Outcome]) -> None:
    wrong = [o.describe() for o in outcomes if o.verdict == WRONG]
    assert wrong == [], f"{len(wrong)} wrong responses, first: {wrong[:5]}"


def failures_of(outcomes: Iterable[Outcome]) -> list[str]:
    return [o.describe() for o in outcomes if not o.ok]


# ---------------------------------------------------------------------------------------------
# Tests


def test_broker_sigkill_restart_under_load(harness):
    standin = harness.start_standin()
    broker = harness.start_broker(extra_args=BROKER_ARGS, plaintext=True)
    bridge = harness.start_bridge(broker, standin, extra_args=BRIDGE_ARGS)
    bridge_offset = bridge.log_offset()

    with EchoLoad(broker.client_port, clients=8) as load:
        load.wait_for_successes(50, after=time.time())
        killed_at = time.time()
        sigkill(broker)
        # Half a second without a broker, so that clients meet refused connections.
        time.sleep(0.5)
        restarted = start_again(harness, broker)
        listening = restarted.wait_for_event("listener_started", listener="bridge")
        listening_at = event_time(listening)
        first = load.wait_for_first_success(after=listening_at)
        settled_at = first.finished + 1.0
        load.wait_for_successes(50, after=settled_at)

    outcomes = load.outcomes()
    reconnect_s = first.finished - listening_at
    print(f"broker restart: first success {reconnect_s:.3f} s after the bridge listener started")
    print(f"broker restart load: {load.summary()}")
    assert_no_wrong_responses(outcomes)
    assert restarted.client_port == broker.client_port
    assert restarted.bridge_port == broker.bridge_port
    assert reconnect_s < RECONNECT_LIMIT_S, first.describe()
    assert [o for o in outcomes if not o.ok and o.started < killed_at - 1.0] == []
    assert failures_of(o for o in outcomes if o.started >= settled_at) == []
    assert bridge.find_events("broker_disconnected", bridge_offset)
    assert restarted.find_events("bridge_connected")


def test_bridge_sigkill_restart_under_load(harness):
    standin = harness.start_standin()
    broker = harness.start_broker(extra_args=BROKER_ARGS, plaintext=True)
    bridge = harness.start_bridge(broker, standin, extra_args=BRIDGE_ARGS)
    broker_offset = broker.log_offset()

    with EchoLoad(broker.client_port, clients=8) as load:
        load.wait_for_successes(50, after=time.time())
        killed_at = time.time()
        sigkill(bridge)
        disconnected_at = event_time(
            broker.wait_for_event("bridge_disconnected", 10, offset=broker_offset)
        )
        time.sleep(0.5)
        restarted = start_again(harness, bridge, wait_connected=False)
        started_at = event_time(restarted.wait_for_event("bridge_started"))
        connected_at = event_time(restarted.wait_for_event("broker_connected"))
        first = load.wait_for_first_success(after=started_at)
        settled_at = first.finished + 1.0
        load.wait_for_successes(50, after=settled_at)

    outcomes = load.outcomes()
    reconnect_s = first.finished - started_at
    print(
        f"bridge restart: first success {reconnect_s:.3f} s after the bridge started, "
        f"{first.finished - connected_at:.3f} s after it connected"
    )
    print(f"bridge restart load: {load.summary()}")
    assert_no_wrong_responses(outcomes)
    assert reconnect_s < RECONNECT_LIMIT_S, first.describe()
    assert [o for o in outcomes if not o.ok and o.started < killed_at - 1.0] == []
    assert failures_of(o for o in outcomes if o.started >= settled_at) == []
    # Sent while the broker had no bridge: each waits for the new bridge, or gets 503.
    outage = [
        o for o in outcomes if disconnected_at + LOG_TIME_RESOLUTION_S <= o.started < connected_at
    ]
    assert outage, "no request was sent while the bridge was down"
    assert {o.status for o in outage if not o.ok} <= {503}, failures_of(outage)[:5]


def test_silent_path_detected_by_keepalive(harness):
    standin = harness.start_standin()
    broker = harness.start_broker(extra_args=FAST_BROKER_ARGS, plaintext=True)

    with TcpRelay("127.0.0.1", broker.bridge_port) as relay:
        bridge = start_bridge_via(
            harness, broker, standin, f"localhost:{relay.port}", extra_args=FAST_BRIDGE_ARGS
        )
        with EchoLoad(broker.client_port, clients=4) as load:
            load.wait_for_successes(50, after=time.time())
            broker_offset = broker.log_offset()
            bridge_offset = bridge.log_offset()
            freezing_at = time.time()
            relay.freeze()
            # Bytes may still pass between freezing_at and frozen_at, while freeze() waits for
            # the relay thread to finish its current forward.
            frozen_at = time.time()
            broker_noticed = wait_for_any_event(
                broker, ["keepalive_timeout", "bridge_disconnected"], broker_offset, 10
            )
            bridge_noticed = wait_for_any_event(
                bridge, ["keepalive_timeout", "broker_disconnected"], bridge_offset, 10
            )
            # Frozen one second longer, so that requests also meet a broker without bridge.
            time.sleep(1.0)
            unfrozen_at = time.time()
            relay.unfreeze()
            first = load.wait_for_first_success(after=unfrozen_at)
            settled_at = first.finished + 1.0
            load.wait_for_successes(30, after=settled_at)

    outcomes = load.outcomes()
    broker_delay_s = event_time(broker_noticed) - freezing_at
    bridge_delay_s = event_time(bridge_noticed) - freezing_at
    recovery_s = first.finished - unfrozen_at
    during = [o for o in outcomes if frozen_at <= o.started < unfrozen_at]
    # A response head that passed before the freeze may still end in a cut body, which the
    # client sees as a connection error. A request sent into the frozen path gets no head.
    hung = [o.describe() for o in during if o.verdict == CONNECTION_ERROR]
    slowest_s = max((o.finished - o.started for o in during), default=0.0)
    print(
        f"silent path: broker noticed after {broker_delay_s:.3f} s ({broker_noticed['event']}), "
        f"bridge after {bridge_delay_s:.3f} s ({bridge_noticed['event']}), first success "
        f"{recovery_s:.3f} s after unfreeze, slowest answer while frozen {slowest_s:.3f} s, "
        f"freeze() took {frozen_at - freezing_at:.3f} s"
    )
    print(f"silent path load: {load.summary()}")
    assert_no_wrong_responses(outcomes)
    assert broker_delay_s <= DETECTION_LIMIT_S
    assert bridge_delay_s <= DETECTION_LIMIT_S
    assert during, "no request was sent while the path was frozen"
    assert hung == [], f"requests that got no answer while frozen: {hung[:5]}"
    # A request waits at most for the keepalive to fail the session, or for --bridge-wait.
    assert slowest_s < DETECTION_LIMIT_S + BRIDGE_WAIT_S
    assert {o.status for o in during if not o.ok} <= {502, 503}
    assert recovery_s < RECONNECT_LIMIT_S, first.describe()
    assert failures_of(o for o in outcomes if o.started >= settled_at) == []


# A path that goes silent right after an ACK is the slowest case for keepalive: the next PING
# goes out one interval after the last one, and goes unanswered for the timeout. PINGs must
# follow each other every interval, as docs/protocol.md section 5.7 describes, and not wait
# for the timeout after an ACK, or the detection takes interval + 2 * timeout.
def test_keepalive_detects_silence_right_after_ack(harness):
    standin = harness.start_standin()
    broker = Broker(
        harness.taser_bin,
        harness.certs,
        harness.work_dir,
        name=unique_name(harness, "broker"),
        extra_args=FAST_BROKER_ARGS,
        plaintext=True,
        env=child_env(),
    )
    # Trace level logs ping_acknowledged, the moment an ACK of the broker's own PING arrives.
    broker.argv[broker.argv.index("--log-level") + 1] = "trace"
    harness.processes.append(broker)
    broker.start()

    with TcpRelay("127.0.0.1", broker.bridge_port) as relay:
        start_bridge_via(
            harness, broker, standin, f"localhost:{relay.port}", extra_args=FAST_BRIDGE_ARGS
        )
        with EchoLoad(broker.client_port, clients=1) as load:
            load.wait_for_successes(10, after=time.time())
            offset = broker.log_offset()
            acknowledged = broker.wait_for_event("ping_acknowledged", 10, offset=offset)
            relay.freeze()
            # Measured once the relay stopped, which can only shorten the delay below.
            frozen_at = time.time()
            noticed = wait_for_any_event(
                broker, ["keepalive_timeout", "bridge_disconnected"], offset, 10
            )
            relay.unfreeze()
            load.wait_for_first_success(after=time.time())

    since_ack_s = frozen_at - event_time(acknowledged)
    delay_s = event_time(noticed) - frozen_at
    print(
        f"silence right after an ACK: frozen {since_ack_s:.3f} s after the ACK, broker noticed "
        f"after {delay_s:.3f} s ({noticed['event']})"
    )
    assert_no_wrong_responses(load.outcomes())
    assert since_ack_s < KEEPALIVE_INTERVAL_S, "the freeze came too late after the ACK"
    assert delay_s <= KEEPALIVE_INTERVAL_S + KEEPALIVE_TIMEOUT_S + 0.3


def test_two_bridges_survivor_takes_all(harness):
    standin = harness.start_standin()
    broker = harness.start_broker(extra_args=BROKER_ARGS, plaintext=True)
    doomed = harness.start_bridge(broker, standin, extra_args=BRIDGE_ARGS)
    survivor = harness.start_bridge(broker, standin, extra_args=BRIDGE_ARGS)
    clients = 8

    with EchoLoad(broker.client_port, clients=clients) as load:
        load.wait_for_successes(100, after=time.time())
        broker_offset = broker.log_offset()
        sigkill(doomed)
        disconnected = broker.wait_for_event("bridge_disconnected", 10, offset=broker_offset)
        disconnected_at = event_time(disconnected)
        load.wait_for_successes(200, after=disconnected_at)

    outcomes = load.outcomes()
    before_kill = [e for e in broker.find_events("request") if event_time(e) < disconnected_at]
    bridges_used = {event["bridge_conn"] for event in before_kill}
    failed = [o for o in outcomes if not o.ok]
    print(f"two bridges: {len(failed)} failed requests; {load.summary()}")
    assert_no_wrong_responses(outcomes)
    assert len(bridges_used) == 2, f"requests went through bridge connections {bridges_used}"
    assert survivor.running()
    assert (
        failures_of(o for o in outcomes if o.started >= disconnected_at + LOG_TIME_RESOLUTION_S)
        == []
    )
    # Only requests running on the killed bridge may fail, and each client runs one at a time.
    assert len(failed) <= clients, failures_of(failed)[:10]


def test_bridge_joins_both_replicas_behind_haproxy(harness):
    standin = harness.start_standin()
    replicas = [
        harness.start_broker(
            extra_args=[*BROKER_ARGS, "--replicas", "2", "--instance-id", name], plaintext=True
        )
        for name in ("replica-a", "replica-b")
    ]
    haproxy = Haproxy(harness.work_dir, [replica.bridge_port for replica in replicas])
    harness.processes.append(haproxy)
    haproxy.start()

    bridge = start_bridge_via(
        harness,
        replicas[0],
        standin,
        f"localhost:{haproxy.port}",
        extra_args=BRIDGE_ARGS,
        wait_connected=False,
    )
    for replica in replicas:
        replica.wait_for_event("bridge_connected", 20)
    bridge.wait_until(
        lambda: len({e["instance"] for e in bridge.find_events("broker_connected")}) >= 2,
        20,
        "sessions to two broker instances",
    )
    started_at = time.time()
    with contextlib.ExitStack() as stack:
        loads = [
            stack.enter_context(EchoLoad(replica.client_port, clients=4)) for replica in replicas
        ]
        for load in loads:
            load.wait_for_successes(100, after=started_at)

    instances = {event["instance"] for event in bridge.find_events("broker_connected")}
    for replica, load in zip(replicas, loads):
        print(f"replica {replica.name}: {load.summary()}")
        assert_no_wrong_responses(load.outcomes())
        assert failures_of(load.outcomes()) == []
        assert replica.find_events("bridge_replaced") == []
    assert len(instances) == 2
    assert bridge.find_events("broker_disconnected") == []


# When replica-a is gone, the bridge redials through haproxy, and haproxy sends some of those
# dials to replica-b, which already has a working session from this bridge. The clients of
# replica-b must not notice. If replica-b closed its working session, or the bridge kept
# neither session, they would get 502 and 503 until the next redial.
def test_replica_loss_leaves_other_replica_served(harness):
    standin = harness.start_standin()
    replicas = [
        harness.start_broker(
            extra_args=[*BROKER_ARGS, "--replicas", "2", "--instance-id", name], plaintext=True
        )
        for name in ("replica-a", "replica-b")
    ]
    lost_replica, kept_replica = replicas
    haproxy = Haproxy(harness.work_dir, [replica.bridge_port for replica in replicas])
    harness.processes.append(haproxy)
    haproxy.start()
    start_bridge_via(
        harness,
        lost_replica,
        standin,
        f"localhost:{haproxy.port}",
        extra_args=BRIDGE_ARGS,
        wait_connected=False,
    )
    for replica in replicas:
        replica.wait_for_event("bridge_connected", 20)
    kept_replica_offset = kept_replica.log_offset()

    with EchoLoad(kept_replica.client_port, clients=4) as load:
        load.wait_for_successes(50, after=time.time())
        killed_at = time.time()
        sigkill(lost_replica)
        # Long enough for several redials through haproxy while replica-a is gone.
        time.sleep(6)

    outcomes = load.outcomes()
    after_kill = [o for o in outcomes if o.started >= killed_at]
    print(f"replica loss: load on the kept replica: {load.summary()}")
    assert_no_wrong_responses(outcomes)
    assert after_kill
    # A redial that lands on the kept replica may replace its session, but by GOAWAY: running
    # requests finish on the old session while new ones take the new session.
    assert failures_of(outcomes) == []
    assert kept_replica.admin_get("/readyz")[0] == 200


def test_broker_sigterm_drains_under_load(harness):
    standin = harness.start_standin()
    broker = harness.start_broker(
        extra_args=[*BROKER_ARGS, "--drain-timeout", "10s"], plaintext=True
    )
    harness.start_bridge(broker, standin, extra_args=BRIDGE_ARGS)
    readiness: list[tuple[float, int]] = []

    # Four clients keep 1.5 s requests running, so that the drain lasts long enough to watch.
    with EchoLoad(broker.client_port, clients=64, slow_clients=4, slow_ms=1500) as load:
        load.wait_for_successes(500, after=time.time())
        load.wait_until(
            lambda outcomes: any(o.ok and o.target.startswith("/v1/test/delay") for o in outcomes),
            10,
            "a delay request to finish",
        )
        signalled_at = time.time()
        os.kill(broker.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while broker.running() and time.monotonic() < deadline:
            requested_at = time.time()
            try:
                status, _ = broker.admin_get("/readyz", timeout=1)
                readiness.append((requested_at, status))
            except (OSError, http.client.HTTPException):
                # The admin listener closes as the broker exits.
                pass
            time.sleep(0.05)
    exit_code = broker.stop()

    outcomes = load.outcomes()
    sent_before = [o for o in outcomes if o.sent is not None and o.sent < signalled_at]
    spanning = [o for o in sent_before if o.finished > signalled_at]
    drain_started_at = event_time(broker.wait_for_event("drain_started"))
    drain_s = event_time(broker.wait_for_event("drain_finished")) - drain_started_at
    # A readiness request sent after drain_started is handled in the drain, because the broker
    # serves /readyz on the same event loop.
    during_drain = [status for requested_at, status in readiness if requested_at > drain_started_at]
    print(
        f"drain: {len(sent_before)} requests sent before SIGTERM, {len(spanning)} of them "
        f"still running at the signal; drain_started {drain_started_at - signalled_at:.3f} s "
        f"after the signal, drain took {drain_s:.3f} s; /readyz answers in the drain "
        f"{collections.Counter(during_drain)}; {load.summary()}"
    )
    assert_no_wrong_responses(outcomes)
    assert not broker.killed, "broker did not exit within the stop timeout"
    assert exit_code == 0
    assert failures_of(sent_before) == []
    assert any(o.target.startswith("/v1/test/delay") for o in spanning)
    assert during_drain, "/readyz never answered during the drain"
    assert set(during_drain) == {503}


RETRYING_CLIENT = r"""
import json, sys, time
import hvac, requests

url, path, deadline_s = sys.argv[1], sys.argv[2], float(sys.argv[3])
secret = json.loads(sys.argv[4])
client = hvac.Client(url=url, token="root", timeout=10)
deadline = time.monotonic() + deadline_s
delay = 0.25
failures = []
while True:
    try:
        read = client.secrets.kv.v2.read_secret_version(path=path, mount_point="secret")
        break
    except (hvac.exceptions.VaultError, requests.exceptions.RequestException) as error:
        failures.append(type(error).__name__)
        if time.monotonic() + delay > deadline:
            print(json.dumps({"failures": failures, "data": None}))
            sys.exit(1)
        time.sleep(delay)
        delay = min(delay * 2, 2.0)
print(json.dumps({"failures": failures, "data": read["data"]["data"], "succeeded_at": time.time()}))
"""


def test_retrying_hvac_client_rides_out_outage(harness):
    standin = harness.start_standin()
    broker = harness.start_broker(extra_args=BROKER_ARGS, plaintext=True)
    bridge = harness.start_bridge(broker, standin, extra_args=BRIDGE_ARGS)
    path = f"chaos/{uuid.uuid4().hex[:8]}"
    secret = {"password": f"pw-{uuid.uuid4().hex}"}
    write = http.client.HTTPConnection("127.0.0.1", broker.client_port, timeout=10)
    try:
        write.request(
            "POST",
            f"/v1/secret/data/{path}",
            body=json.dumps({"data": secret}),
            headers={"X-Vault-Token": "root", "Content-Type": "application/json"},
        )
        written = write.getresponse()
        written.read()
    finally:
        write.close()
    assert written.status == 200

    bridge_exit = bridge.stop()
    stopped_at = time.time()
    client = ManagedProcess(
        "retrying-client",
        [SYSTEM_PYTHON, "-c", RETRYING_CLIENT, broker.url, path, "40", json.dumps(secret)],
        harness.work_dir / "retrying-client.log",
    )
    harness.processes.append(client)
    client.start()
    # The outage lasts 5 s from the bridge's exit.
    time.sleep(max(0.0, stopped_at + 5.0 - time.time()))
    restarted = start_again(harness, bridge)
    connected_at = event_time(restarted.wait_for_event("broker_connected"))
    client.wait_until(lambda: not client.running(), 60, "the retrying client to finish")
    client_exit = client.stop()

    lines = [line for line in client.log_path.read_text().splitlines() if line.startswith("{")]
    assert lines, client.describe_failure("printed no result")
    result = json.loads(lines[-1])
    print(
        f"retrying client: failures {result['failures']}, "
        f"success {result.get('succeeded_at', 0) - connected_at:.3f} s after reconnect"
    )
    assert bridge_exit == 0
    assert client_exit == 0, client.describe_failure("failed")
    assert result["data"] == secret
    assert result["failures"], "the client never met the outage"
    assert set(result["failures"]) <= {"VaultDown", "BadGateway", "ConnectionError"}
    assert result["succeeded_at"] >= connected_at - 0.01
    assert result["succeeded_at"] - connected_at < RECONNECT_LIMIT_S
