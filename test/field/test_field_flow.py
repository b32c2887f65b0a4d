"""Flow-control faults from the field: a congested tunnel link, a reader that stops, half-closes.

Each test names the fault it reproduces. Clients speak plain HTTP to the broker, and every
relay and raw vault listens on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
import socket
import threading
import time

import pytest

from field_helpers import (
    RELAY_BUFFER_BYTES,
    RELAY_CHUNK_BYTES,
    LinkRelay,
    Reply,
    admin_get,
    established_connections_to,
    metric_value,
    plain_request,
)
from http_clients import read_response_head, read_until_closed

TOKEN = {"X-Vault-Token": "root"}


# ---------------------------------------------------------------------------------------------
# A congested link makes stream writes time out


# 256 kbit/s, the rate of a badly congested link.
CONGESTED_RATE_BYTES_PER_S = 256 * 1000 / 8
UPLOAD_COUNT = 16
UPLOAD_BYTES = 256 * 1024
# The broker's deadline for a response head, far below the ~128 s that the uploads need.
CONGESTED_REQUEST_TIMEOUT_S = 3
# No request may run longer than this, whatever its outcome.
CONGESTED_REQUEST_BOUND_S = 20.0
# The bridge's deadline for the vault's response, which also ends a vault request whose body
# stopped arriving.
BRIDGE_REQUEST_TIMEOUT_S = 4
# Once the link is fast again, the vault side must be idle within this many seconds.
UNCONGESTED_IDLE_BOUND_S = 15
# A bridge deadline that never fires during the reset test.
RESET_ONLY_BRIDGE_TIMEOUT_S = 60
# Bytes that a reset may wait behind on its way from the broker to the bridge. In the broker:
# one piece of the write batch (16 KiB) and the kernel's unsent bytes (TCP_NOTSENT_LOWAT of
# 16 KiB plus one 16 KiB TLS record). In the relay: its receive buffer (the kernel doubles the
# 32 KiB requested) and one chunk. When a whole 256 KiB batch went first, the reset arrived
# 7.7 s after the timeout in this test.
RESET_QUEUE_BYTES = 16 * 1024 + 32 * 1024 + 2 * RELAY_BUFFER_BYTES + RELAY_CHUNK_BYTES
# Time from the broker's timeout to the bridge's receipt of the reset, with 1 s of slack for
# a busy machine.
RESET_DELIVERY_BOUND_S = RESET_QUEUE_BYTES / CONGESTED_RATE_BYTES_PER_S + 1


def start_congestible_path(
    harness, relay: LinkRelay, bridge_request_timeout_s: float = BRIDGE_REQUEST_TIMEOUT_S
):
    """Start a stand-in, a broker, and a bridge that reaches the broker through RELAY.

    Returns (standin, broker, bridge). The broker gives up on a response head after
    CONGESTED_REQUEST_TIMEOUT_S, and the bridge on the vault after BRIDGE_REQUEST_TIMEOUT_S.
    """
    standin = harness.start_standin()
    broker = harness.start_broker(
        plaintext=True,
        extra_args=["--request-timeout", f"{CONGESTED_REQUEST_TIMEOUT_S}s", "--bridge-wait", "2s"],
    )
    relay.target_ports = [broker.bridge_port]
    bridge = harness.start_bridge_with_options(
        broker,
        standin,
        {"--broker-address": f"localhost:{relay.port}"},
        extra_args=[
            "--admin-listen",
            "127.0.0.1:0",
            # Every connection to the vault closes after its request, so that the count of
            # open vault connections is the count of vault requests still running.
            "--vault-max-idle",
            "0",
            "--request-timeout",
            f"{bridge_request_timeout_s:g}s",
        ],
    )
    assert plain_request(broker.client_port, "GET", "/v1/sys/health").status == 200
    return standin, broker, bridge


def test_congested_link_write_timeout_resets_streams(harness):
    with LinkRelay([]) as relay:
        standin, broker, bridge = start_congestible_path(harness, relay)
        broker_offset = broker.log_offset()
        bridge_offset = bridge.log_offset()

        relay.rate_bytes_per_s = CONGESTED_RATE_BYTES_PER_S
        replies = run_uploads(broker.client_port)
        relay.rate_bytes_per_s = None
        # The bridge must end every vault request of a reset stream, rather than keep a
        # half-sent body open at the vault.
        vault_side = wait_for_idle_vault_side(bridge, standin.port, UNCONGESTED_IDLE_BOUND_S)
        after = None
        for _ in range(50):
            after = plain_request(
                broker.client_port, "PUT", "/v1/test/sink?after=1", headers=TOKEN, body=b"x" * 4096
            )
            if after.status == 200:
                break
            time.sleep(0.2)
        broker_disconnects = broker.find_events("bridge_disconnected", broker_offset)
        bridge_disconnects = bridge.find_events("broker_disconnected", bridge_offset)

    outcomes = [reply.status or reply.error.split(":")[0] for reply in replies]
    slowest = max(reply.seconds for reply in replies)
    timeouts = broker.find_events("request_timeout", broker_offset)
    print(
        f"congested uploads: outcomes {outcomes}, slowest {slowest:.1f} s; vault side after "
        f"the congestion {vault_side}"
    )
    assert slowest < CONGESTED_REQUEST_BOUND_S
    for reply in replies:
        # An explicit status, or a connection the broker closed while the body was still coming.
        assert reply.status in (200, 502, 503, 504) or reply.error, reply
    assert outcomes.count(504) == len(timeouts), outcomes
    assert timeouts, "no stream hit the broker's request timeout"
    assert vault_side["idle_after_s"] is not None, vault_side
    assert after is not None and after.status == 200, after
    # The session that was congested carries the request after the congestion.
    assert broker_disconnects == []
    assert bridge_disconnects == []


def test_reset_reaches_bridge_while_congested(harness):
    with LinkRelay([]) as relay:
        standin, broker, bridge = start_congestible_path(
            harness, relay, bridge_request_timeout_s=RESET_ONLY_BRIDGE_TIMEOUT_S
        )
        broker_offset = broker.log_offset()
        bridge_offset = bridge.log_offset()
        relay.rate_bytes_per_s = CONGESTED_RATE_BYTES_PER_S
        reply = plain_request(
            broker.client_port,
            "PUT",
            "/v1/test/sink?single=1",
            headers=TOKEN,
            body=b"r" * (1 << 20),
            timeout=CONGESTED_REQUEST_BOUND_S,
        )
        # Still congested. The bridge's own deadline is far away, so only the broker's reset
        # can end the vault request.
        reset = bridge.wait_for_event(
            "stream_reset_by_peer", RESET_DELIVERY_BOUND_S + 5, offset=bridge_offset
        )
        vault_side = wait_for_idle_vault_side(bridge, standin.port, UNCONGESTED_IDLE_BOUND_S)
        relay.rate_bytes_per_s = None
        wait_for_idle_vault_side(bridge, standin.port, UNCONGESTED_IDLE_BOUND_S)

    timed_out = broker.find_events("request_timeout", broker_offset)
    assert reply.status == 504, reply
    assert len(timed_out) == 1, timed_out
    delay = log_time(reset) - log_time(timed_out[0])
    print(f"reset under congestion: at the bridge {delay:.2f} s after the timeout, {vault_side}")
    assert reset["code"] == "timeout", reset
    assert delay < RESET_DELIVERY_BOUND_S, (delay, RESET_DELIVERY_BOUND_S)
    # The reset ended the vault request while the link was still congested.
    assert vault_side["idle_after_s"] is not None, vault_side


def log_time(event: dict) -> float:
    """Return the time of a log event in seconds since the epoch."""
    return datetime.fromisoformat(event["time"].replace("Z", "+00:00")).timestamp()


def run_uploads(port: int) -> list[Reply]:
    """Send UPLOAD_COUNT PUTs of UPLOAD_BYTES at once and return their outcomes."""
    bodies = [bytes([index]) * UPLOAD_BYTES for index in range(UPLOAD_COUNT)]
    replies: list[Reply] = [Reply(error="never finished") for _ in bodies]

    def upload(index: int) -> None:
        replies[index] = plain_request(
            port,
            "PUT",
            f"/v1/test/sink?upload={index}",
            headers=TOKEN,
            body=bodies[index],
            timeout=CONGESTED_REQUEST_BOUND_S,
        )

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(UPLOAD_COUNT)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=CONGESTED_REQUEST_BOUND_S + 10)
    return replies


def wait_for_idle_vault_side(bridge, vault_port: int, timeout: float) -> dict:
    """Wait until the bridge has no stream and no vault connection, and the vault no client.

    Returns the last readings and `idle_after_s`, the seconds waited, or None on timeout.
    """
    started = time.monotonic()
    readings: dict = {"idle_after_s": None}
    while time.monotonic() - started < timeout:
        _, text = admin_get(bridge, "/metrics")
        readings["vault_connections_open"] = metric_value(text, "taser_vault_connections_open")
        readings["streams_open"] = metric_value(text, "taser_streams_open")
        readings["established_at_vault"] = established_connections_to(vault_port)
        if (
            readings["vault_connections_open"] == 0
            and readings["streams_open"] == 0
            and readings["established_at_vault"] == 0
        ):
            readings["idle_after_s"] = round(time.monotonic() - started, 2)
            break
        time.sleep(0.2)
    return readings


# ---------------------------------------------------------------------------------------------
# A client that stops reading a large response


def test_stalled_reader_stream_reset(harness):
    standin = harness.start_standin()
    idle_timeout_s = 2
    broker = harness.start_broker(
        plaintext=True, extra_args=["--idle-timeout", f"{idle_timeout_s}s"]
    )
    bridge = harness.start_bridge(broker, standin, extra_args=["--admin-listen", "127.0.0.1:0"])
    offset = broker.log_offset()
    target = f"/v1/test/bytes?size={256 << 20}"

    stalled = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    stalled.settimeout(10)
    stalled.connect(("127.0.0.1", broker.client_port))
    try:
        stalled.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\nX-Vault-Token: root\r\n\r\n".encode())
        assert stalled.recv(4096).startswith(b"HTTP/1.1 200")
        # Reads nothing more: the broker's write to this client stops making progress.
        others = [plain_request(broker.client_port, "GET", "/v1/sys/health") for _ in range(20)]
        ended = broker.wait_for_event(
            "request", idle_timeout_s + 10, offset=offset, path="/v1/test/bytes"
        )
        streams_after = None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            _, text = admin_get(bridge, "/metrics")
            streams_after = metric_value(text, "taser_streams_open")
            if streams_after == 0:
                break
            time.sleep(0.2)
        # What the socket buffers still hold arrives, then the end of the connection.
        drained = 0
        stalled.settimeout(5)
        while drained < (256 << 20):
            try:
                chunk = stalled.recv(1 << 20)
            except (ConnectionResetError, socket.timeout):
                break
            if not chunk:
                break
            drained += len(chunk)
    finally:
        stalled.close()

    print(f"stalled reader: request line {ended}, {drained} bytes left in buffers")
    # test/e2e/test_fairness.py checks their latency, so here they only have to succeed.
    assert [reply.status for reply in others] == [200] * 20
    assert ended["complete"] is False
    assert isinstance(ended["stream"], int)
    assert drained < (256 << 20)
    assert streams_after == 0
    assert broker.find_events("bridge_disconnected", offset) == []
    assert plain_request(broker.client_port, "GET", "/v1/sys/health").status == 200


# ---------------------------------------------------------------------------------------------
# The vault half-closes a byte tunnel while the client still sends


class HalfClosingVault:
    """A TCP server that responds to the first request, half-closes, and counts what comes after.

    It reads up to the end of the first request head, sends a fixed response and shuts down
    its sending side. Then it reads until the client's end of stream, and records the count
    and SHA-256 of the bytes that arrived after its own FIN.
    """

    RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=4)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.after_fin = hashlib.sha256()
        self.after_fin_bytes = 0
        self.finished = threading.Event()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                connection, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with connection:
                self._serve_one(connection)
            return

    def _serve_one(self, connection: socket.socket) -> None:
        connection.settimeout(0.2)
        received = b""
        deadline = time.monotonic() + 20
        while b"\r\n\r\n" not in received and time.monotonic() < deadline:
            try:
                chunk = connection.recv(65536)
            except socket.timeout:
                continue
            if not chunk:
                return
            received += chunk
        head, _, rest = received.partition(b"\r\n\r\n")
        connection.sendall(self.RESPONSE)
        connection.shutdown(socket.SHUT_WR)
        self.after_fin.update(rest)
        self.after_fin_bytes += len(rest)
        while time.monotonic() < deadline and not self.stopping.is_set():
            try:
                chunk = connection.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                break
            if not chunk:
                self.finished.set()
                break
            self.after_fin.update(chunk)
            self.after_fin_bytes += len(chunk)

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)
        self.sock.close()


def test_tunnel_survives_vault_half_close(harness):
    vault = HalfClosingVault()
    authority = f"127.0.0.1:{vault.port}"
    trailing = bytes(range(256)) * 256  # 64 KiB sent after the vault's FIN
    try:
        broker = harness.start_broker(plaintext=True, extra_args=["--allow-connect", authority])
        standin = harness.start_standin()
        harness.start_bridge_with_options(
            broker,
            standin,
            {"--vault-address": f"http://{authority}"},
            extra_args=["--allow-tunnels"],
        )
        with socket.create_connection(("127.0.0.1", broker.client_port), timeout=10) as sock:
            sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
            head, early = read_response_head(sock, timeout=10)
            sock.sendall(b"GET /v1/sys/health HTTP/1.1\r\nHost: x\r\n\r\n")
            # The vault's response, then its FIN: the client reads to the end of stream.
            response = early
            sock.settimeout(10)
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                response += chunk
            # The client's own direction stays open after the vault's FIN.
            sock.sendall(trailing)
            sock.shutdown(socket.SHUT_WR)
            vault.finished.wait(timeout=15)
            rest, closed = read_until_closed(sock, timeout=10)
    finally:
        vault.close()

    assert head.startswith(b"HTTP/1.1 200"), head
    assert response == HalfClosingVault.RESPONSE
    assert vault.finished.is_set(), "the vault never saw the client's end of stream"
    assert vault.after_fin_bytes == len(trailing)
    assert vault.after_fin.hexdigest() == hashlib.sha256(trailing).hexdigest()
    assert rest == b""
    assert closed
