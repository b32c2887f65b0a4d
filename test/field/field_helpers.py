"""Network stand-ins for the field-fault tests: a link relay, raw vaults and small HTTP helpers.

Everything listens on 127.0.0.1 only. Every thread here is a daemon thread, and every blocking
call has a timeout of at most 5 s.
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

# The granularity of every wait in this module, in seconds.
POLL_S = 0.2
# Pieces that the relay moves at a time. Small pieces keep a throttled rate smooth.
RELAY_CHUNK_BYTES = 4096
# Socket buffers of the relay's own sockets. Small buffers make a slow link slow at once,
# instead of after the kernel buffered megabytes on loopback.
RELAY_BUFFER_BYTES = 32 * 1024


# ---------------------------------------------------------------------------------------------
# A TCP relay that can throttle its flows or drop idle ones, as a congested link or a NAT


@dataclass
class _Flow:
    """One relayed connection: both sockets, and when a byte last passed in either direction."""

    downstream: socket.socket
    upstream: socket.socket
    last_activity: float
    dropped: bool = False
    bytes_forwarded: int = 0
    bytes_discarded: int = 0


class LinkRelay:
    """A TCP relay on 127.0.0.1 to local ports, with a bandwidth limit and a NAT idle timeout.

    Each new connection goes to the first of TARGET_PORTS that accepts it, as a load balancer
    sends new connections only to replicas that still listen.

    `rate_bytes_per_s` (None is unlimited) caps each direction of each flow, and can change at
    any time. With `nat_idle_timeout_s`, a flow on which no byte passed for that long is
    dropped, as a NAT drops an idle mapping: later bytes in either direction are read and
    discarded, and neither side gets a FIN or a RST. New connections are always relayed.
    """

    def __init__(
        self,
        target_ports: int | list[int],
        rate_bytes_per_s: Optional[float] = None,
        nat_idle_timeout_s: Optional[float] = None,
    ) -> None:
        if isinstance(target_ports, int):
            target_ports = [target_ports]
        self.target_ports = list(target_ports)
        self.rate_bytes_per_s = rate_bytes_per_s
        self.nat_idle_timeout_s = nat_idle_timeout_s
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted sockets inherit the receive buffer size of the listener.
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RELAY_BUFFER_BYTES)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._listener.settimeout(POLL_S)
        self.port = self._listener.getsockname()[1]
        self.flows: list[_Flow] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> "LinkRelay":
        self._start_thread(self._accept_loop, f"relay-accept-{self.port}")
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stopping.set()
        for thread in list(self._threads):
            thread.join(timeout=5)
        with self._lock:
            for flow in self.flows:
                flow.downstream.close()
                flow.upstream.close()
        self._listener.close()

    def connections_accepted(self) -> int:
        with self._lock:
            return len(self.flows)

    def dropped_flows(self) -> int:
        """Return how many flows the NAT timeout dropped so far."""
        with self._lock:
            return sum(1 for flow in self.flows if flow.dropped or self._idle_too_long(flow))

    def _idle_too_long(self, flow: _Flow) -> bool:
        if self.nat_idle_timeout_s is None:
            return False
        return time.monotonic() - flow.last_activity > self.nat_idle_timeout_s

    def _start_thread(self, target: Callable[..., None], name: str, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                downstream, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            downstream.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, RELAY_BUFFER_BYTES)
            upstream = self._connect_upstream()
            if upstream is None:
                downstream.close()
                continue
            for sock in (downstream, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.settimeout(POLL_S)
            flow = _Flow(downstream, upstream, time.monotonic())
            with self._lock:
                self.flows.append(flow)
            index = len(self.flows)
            self._start_thread(self._pump, f"relay-up-{index}", flow, downstream, upstream)
            self._start_thread(self._pump, f"relay-down-{index}", flow, upstream, downstream)

    def _connect_upstream(self) -> Optional[socket.socket]:
        for port in self.target_ports:
            upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            upstream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RELAY_BUFFER_BYTES)
            upstream.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, RELAY_BUFFER_BYTES)
            upstream.settimeout(5)
            try:
                upstream.connect(("127.0.0.1", port))
            except OSError:
                upstream.close()
                continue
            return upstream
        return None

    def _pump(self, flow: _Flow, source: socket.socket, sink: socket.socket) -> None:
        # The earliest time at which the next piece may go, to keep to the rate.
        next_send = time.monotonic()
        while not self._stopping.is_set():
            try:
                data = source.recv(RELAY_CHUNK_BYTES)
            except socket.timeout:
                continue
            except OSError:
                return
            if not data:
                if not flow.dropped:
                    try:
                        sink.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                return
            with self._lock:
                if flow.dropped or self._idle_too_long(flow):
                    flow.dropped = True
                    flow.bytes_discarded += len(data)
                    continue
                flow.last_activity = time.monotonic()
            rate = self.rate_bytes_per_s
            if rate:
                next_send = max(next_send, time.monotonic())
                while not self._stopping.is_set() and time.monotonic() < next_send:
                    time.sleep(min(POLL_S, next_send - time.monotonic()))
                next_send += len(data) / rate
            if not self._send_all(sink, data):
                return
            with self._lock:
                flow.bytes_forwarded += len(data)
                flow.last_activity = time.monotonic()

    def _send_all(self, sink: socket.socket, data: bytes) -> bool:
        view = memoryview(data)
        while view and not self._stopping.is_set():
            try:
                sent = sink.send(view)
            except socket.timeout:
                continue
            except OSError:
                return False
            view = view[sent:]
        return not view


# ---------------------------------------------------------------------------------------------
# A raw HTTP/1.1 vault that records request heads byte for byte


@dataclass
class RecordedRequest:
    """A request as the raw vault read it: the head bytes and the length of the body."""

    head: bytes
    body_length: int

    @property
    def request_line(self) -> str:
        return self.head.split(b"\r\n", 1)[0].decode("latin-1")

    def header_lines(self) -> list[str]:
        lines = self.head.decode("latin-1").split("\r\n")[1:]
        return [line for line in lines if line]

    def header_values(self, name: str) -> list[str]:
        values = []
        for line in self.header_lines():
            key, _, value = line.partition(":")
            if key.strip().lower() == name.lower():
                values.append(value.strip())
        return values


def _read_chunked_length(sock: socket.socket, buffer: bytearray, deadline: float) -> int:
    """Consume a chunked body from BUFFER and SOCK and return its decoded length."""
    total = 0
    while True:
        line = _read_line(sock, buffer, deadline)
        size = int(line.split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            # Trailer fields, up to the empty line.
            while _read_line(sock, buffer, deadline):
                pass
            return total
        _read_exactly(sock, buffer, size + 2, deadline)
        total += size


def _fill(sock: socket.socket, buffer: bytearray, deadline: float) -> None:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError("raw vault: request not complete in time")
    sock.settimeout(min(POLL_S * 5, remaining))
    try:
        chunk = sock.recv(65536)
    except socket.timeout:
        return
    if not chunk:
        raise ConnectionError("raw vault: connection closed mid-request")
    buffer += chunk


def _read_line(sock: socket.socket, buffer: bytearray, deadline: float) -> bytes:
    while b"\r\n" not in buffer:
        _fill(sock, buffer, deadline)
    line, _, rest = bytes(buffer).partition(b"\r\n")
    buffer[:] = rest
    return line


def _read_exactly(sock: socket.socket, buffer: bytearray, count: int, deadline: float) -> bytes:
    while len(buffer) < count:
        _fill(sock, buffer, deadline)
    data = bytes(buffer[:count])
    del buffer[:count]
    return data


class RawVault:
    """A minimal HTTP/1.1 server on 127.0.0.1 that records heads and responds with RESPONSE.

    RESPONSE is the whole response (head and body) sent for every request. Connections stay
    open between requests unless a request carries `Connection: close`. Any number of header
    fields is accepted, unlike Python's http.server, which rejects more than 100.
    """

    def __init__(self, response: bytes, max_head_bytes: int = 4 << 20) -> None:
        self.response = response
        self.max_head_bytes = max_head_bytes
        self.requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        self._listener.settimeout(POLL_S)
        self.port = self._listener.getsockname()[1]
        self._threads: list[threading.Thread] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "RawVault":
        thread = threading.Thread(target=self._accept_loop, name="raw-vault", daemon=True)
        self._threads.append(thread)
        thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stopping.set()
        for thread in list(self._threads):
            thread.join(timeout=5)
        self._listener.close()

    def recorded(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self.requests)

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                connection, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            thread = threading.Thread(
                target=self._serve, args=(connection,), name="raw-vault-conn", daemon=True
            )
            self._threads.append(thread)
            thread.start()

    def _serve(self, connection: socket.socket) -> None:
        buffer = bytearray()
        with connection:
            while not self._stopping.is_set():
                deadline = time.monotonic() + 30
                try:
                    while b"\r\n\r\n" not in buffer:
                        if len(buffer) > self.max_head_bytes:
                            return
                        if not buffer and self._stopping.is_set():
                            return
                        _fill(connection, buffer, deadline)
                    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
                    buffer[:] = rest
                    recorded = RecordedRequest(head + b"\r\n\r\n", 0)
                    lengths = recorded.header_values("Content-Length")
                    if recorded.header_values("Transfer-Encoding"):
                        recorded.body_length = _read_chunked_length(connection, buffer, deadline)
                    elif lengths:
                        body = _read_exactly(connection, buffer, int(lengths[0]), deadline)
                        recorded.body_length = len(body)
                except (OSError, TimeoutError, ValueError):
                    return
                with self._lock:
                    self.requests.append(recorded)
                try:
                    connection.sendall(self.response)
                except OSError:
                    return
                closing = [v.lower() for v in recorded.header_values("Connection")]
                if "close" in closing:
                    return


# ---------------------------------------------------------------------------------------------
# HTTP helpers


@dataclass
class Reply:
    """The outcome of one plain-HTTP request: a status with headers and body, or an error."""

    status: int = 0
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    error: str = ""
    seconds: float = 0.0

    def header(self, name: str) -> Optional[str]:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None


def plain_request(
    port: int,
    method: str,
    target: str,
    headers: Optional[dict[str, str]] = None,
    body: Optional[bytes] = None,
    timeout: float = 10.0,
) -> Reply:
    """Send one request to a plain-HTTP broker on 127.0.0.1:PORT on a new connection."""
    started = time.monotonic()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, target, body=body, headers=headers or {})
        response = connection.getresponse()
        payload = response.read()
        return Reply(
            response.status, response.getheaders(), payload, "", time.monotonic() - started
        )
    except (OSError, http.client.HTTPException) as error:
        return Reply(error=f"{type(error).__name__}: {error}", seconds=time.monotonic() - started)
    finally:
        connection.close()


def admin_get(process, path: str) -> tuple[int, str]:
    """GET PATH from the admin listener of a taser process, found from its log.

    Returns the status and the body text.
    """
    event = process.wait_for_event("listener_started", 10, listener="admin")
    port = int(event["address"].rpartition(":")[2])
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def metric_value(text: str, name: str) -> Optional[float]:
    """Return the value of the unlabelled sample NAME in Prometheus text, or None."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def established_connections_to(port: int) -> int:
    """Count ESTABLISHED TCP connections whose remote end is 127.0.0.1:PORT, host-wide."""
    count = 0
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            columns = line.split()
            remote, state = columns[2], columns[3]
            # 0100007F is 127.0.0.1 in the kernel's little-endian hex, 01 is ESTABLISHED.
            if state == "01" and remote == f"0100007F:{port:04X}":
                count += 1
    return count
