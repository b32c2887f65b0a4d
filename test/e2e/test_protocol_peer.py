"""End-to-end tests of the tunnel protocol (docs/protocol.md) against a second implementation.

test/peer/taser_peer.py is written from the specification alone. Here it plays the bridge in
front of the real broker and the broker in front of the real bridge, first by the rules, then
breaking one rule at a time. Each violation must get the documented GOAWAY or RST_STREAM code
and a log line, and the taser process must go on serving others afterwards. The memory tests
check that hostile peers cannot push the peak resident memory of a taser process above 150 MiB.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest

from http_clients import body_length, body_sha256, curl_json, curl_transfer, header_values
from taser_harness import REPO_ROOT, Broker, vmhwm_kib

sys.path.insert(0, str(REPO_ROOT / "test" / "peer"))

import taser_peer as peer  # noqa: E402

MIB = 1 << 20
TOKEN = ("X-Vault-Token", "root")
TOKEN_HEADER = "X-Vault-Token: root"
MEMORY_LIMIT_KIB = 150 * 1024
# The same quarantine as the main-path memory test: ASan's default 256 MiB quarantine alone
# would exceed the limit.
SMALL_QUARANTINE = {"ASAN_OPTIONS": "quarantine_size_mb=16:thread_local_quarantine_size_kb=256"}
# A bridge that dials the test's own listener again soon after each violation.
FAST_REDIAL = ["--reconnect-min", "50ms", "--reconnect-max", "200ms"]
# Running requests must not hold a stopping process for the whole default drain.
SHORT_DRAIN = ["--drain-timeout", "1s"]
CANNED_BODY = b'{"answered_by":"taser_peer"}'


# ---------------------------------------------------------------------------------------------
# Helpers


def bridge_tls(certs: Path):
    return peer.client_context(
        str(certs / "bridge.pem"), str(certs / "bridge-key.pem"), str(certs / "ca.pem")
    )


def broker_tls(certs: Path):
    return peer.server_context(
        str(certs / "broker.pem"), str(certs / "broker-key.pem"), str(certs / "ca.pem")
    )


def dial(broker: Broker, receive_buffer: Optional[int] = None) -> peer.RawConnection:
    return peer.RawConnection.dial(
        broker.bridge_port, bridge_tls(broker.certs), receive_buffer=receive_buffer
    )


def listen(receive_buffer: Optional[int] = None) -> socket.socket:
    """Return a loopback listener; accepted sockets inherit RECEIVE_BUFFER as SO_RCVBUF."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if receive_buffer is not None:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    return listener


def expect_goaway(connection: peer.RawConnection, code: str) -> peer.GoAway:
    goaway = connection.read_goaway(timeout=10)
    assert goaway is not None, "connection ended without GOAWAY"
    assert goaway.error_name == code, f"GOAWAY {goaway}"
    # A connection error ends the connection right after the GOAWAY (§7.1).
    connection.read_to_end(timeout=5)
    return goaway


def expect_reset(connection: peer.RawConnection, stream_id: int) -> str:
    """Read until RST_STREAM on STREAM_ID and return its code's name."""
    frame, seen = connection.read_until(
        lambda f: f.type == peer.FrameType.RST_STREAM and f.stream_id == stream_id, timeout=10
    )
    assert frame is not None, f"no RST_STREAM on stream {stream_id}: {[f.describe() for f in seen]}"
    return peer.error_name(peer.decode_u32(frame.payload))


def close_and_wait_gone(broker: Broker, connection: peer.RawConnection, offset: int) -> None:
    """Close a hostile bridge connection and wait until the broker dropped it from its pool."""
    connection.close()
    broker.wait_for_event("bridge_disconnected", timeout=10, offset=offset)


def assert_broker_serves(broker: Broker) -> None:
    """Connect a well-behaved peer bridge and send one client request through the broker."""
    bridge = peer.PeerBridge(
        broker.bridge_port,
        bridge_tls(broker.certs),
        peer.canned_handler(200, CANNED_BODY, [("Content-Type", "application/json")]),
    )
    try:
        status, _, body = curl_json(f"{broker.url}/v1/test/after", args=("-H", TOKEN_HEADER))
    finally:
        bridge.close()
    assert status == 200, body
    assert body.encode() == CANNED_BODY


def start_client(broker: Broker, path: str, *args: str) -> subprocess.Popen:
    """Start curl on the broker's plain-HTTP client edge; its stdout ends with the status."""
    return subprocess.Popen(
        ["curl", "-sS", "--max-time", "20", "--write-out", "\n%{http_code}", *args,
         "-H", TOKEN_HEADER, f"{broker.url}{path}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def client_status(client: subprocess.Popen) -> int:
    out, _ = client.communicate(timeout=30)
    return int(out.decode(errors="replace").rpartition("\n")[2] or 0)


def wait_for_stream(connection: peer.RawConnection) -> peer.Frame:
    """Read until the broker opens a stream and return its HEADERS frame."""
    frame, seen = connection.read_until(lambda f: f.type == peer.FrameType.HEADERS, timeout=15)
    assert frame is not None, f"no stream opened: {[f.describe() for f in seen]}"
    return frame


def serve_one_request(listener: socket.socket, certs: Path) -> peer.RequestHead:
    """Accept the bridge's next connection as a well-behaved broker and send one request."""
    connection = peer.RawConnection.accept(listener, broker_tls(certs), timeout=15)
    try:
        connection.exchange_hello(peer.Role.BROKER)
        target = "/v1/test/echo?after=violation"
        connection.send_headers(1, peer.RequestHead("GET", target, [TOKEN]))
        head, _ = connection.read_until(lambda f: f.type == peer.FrameType.HEADERS, timeout=15)
        assert head is not None, "bridge ended the connection instead of answering"
        end, _ = connection.read_until(lambda f: f.end_stream and f.stream_id == 1, timeout=15)
        assert end is not None, "bridge did not finish the response"
        return peer.decode_response_head(head.payload)
    finally:
        connection.close()


# ---------------------------------------------------------------------------------------------
# (a) Interoperation: the peer carries real requests


def test_peer_bridge_carries_client_requests(harness, standin, tmp_path):
    broker = harness.start_broker()
    offset = broker.log_offset()
    bridge = peer.PeerBridge(
        broker.bridge_port, bridge_tls(harness.certs), peer.http_forwarder("127.0.0.1", standin.port)
    )
    upload_path = tmp_path / "upload.bin"
    upload_path.write_bytes(bytes(range(256)) * (24 * 1024))  # 6 MiB, above one stream window
    try:
        broker.wait_for_event("bridge_connected", offset=offset)
        url = broker.url
        ca = broker.client_ca
        echo_status, echo, echo_body = curl_json(
            f"{url}/v1/test/echo?peer=1",
            ca,
            args=("-H", TOKEN_HEADER, "-H", "X-Custom: kept", "-H", "Connection: X-Hop",
                  "-H", "X-Hop: dropped"),
        )
        write_status, _, write_body = curl_json(
            f"{url}/v1/secret/data/peer/one",
            ca,
            args=("-H", TOKEN_HEADER, "--data", '{"data":{"k":"v"}}'),
        )
        read_status, read, read_body = curl_json(
            f"{url}/v1/secret/data/peer/one", ca, args=("-H", TOKEN_HEADER)
        )
        chunked_upload = curl_transfer(
            f"{url}/v1/test/sink",
            tmp_path,
            ca,
            args=("-H", TOKEN_HEADER, "-H", "Transfer-Encoding: chunked", "-X", "POST",
                  "--data-binary", f"@{upload_path}"),
        )
        download = curl_transfer(
            f"{url}/v1/test/bytes?size={9 * MIB + 7}&digest=1", tmp_path, ca, args=("-H", TOKEN_HEADER)
        )
        chunked_download = curl_transfer(
            f"{url}/v1/test/bytes?size=300001&chunked=1&digest=1", tmp_path, ca,
            args=("-H", TOKEN_HEADER),
        )
        head = curl_transfer(f"{url}/v1/sys/health", tmp_path, ca, args=("-I",))
        delete = curl_transfer(
            f"{url}/v1/secret/data/peer/one", tmp_path, ca, args=("-H", TOKEN_HEADER, "-X", "DELETE")
        )
    finally:
        bridge.close()

    assert echo_status == 200, echo_body
    assert echo["target"] == "/v1/test/echo?peer=1"
    assert header_values(echo, "X-Custom") == ["kept"]
    assert header_values(echo, "X-Hop") == []
    assert write_status == 200, write_body
    assert read_status == 200, read_body
    assert read["data"]["data"] == {"k": "v"}
    assert chunked_upload.status == 200, chunked_upload.stderr
    assert chunked_upload.json()["body_length"] == upload_path.stat().st_size
    assert chunked_upload.json()["body_sha256"] == hashlib.sha256(upload_path.read_bytes()).hexdigest()
    assert download.status == 200, download.stderr
    assert download.body_bytes == 9 * MIB + 7
    assert download.body_sha256 == download.header("X-Standin-Body-Sha256")
    assert chunked_download.status == 200, chunked_download.stderr
    assert chunked_download.body_bytes == 300001
    assert chunked_download.body_sha256 == chunked_download.header("X-Standin-Body-Sha256")
    assert head.exit_code == 0, head.stderr
    assert head.status == 200
    # curl -I prints the head as its output: nothing may follow the empty line.
    assert head.body_prefix.endswith(b"\r\n\r\n")
    assert delete.status == 204, delete.stderr
    assert broker.find_events("connection_error", offset) == []
    assert broker.find_events("stream_error", offset) == []


def test_peer_broker_sends_requests_through_bridge(harness, standin):
    # Small windows make the real bridge wait for the peer's WINDOW_UPDATEs.
    settings = peer.Settings(initial_stream_window=256 * 1024, initial_connection_window=MIB)
    broker = peer.PeerBroker(broker_tls(harness.certs), settings)
    upload = bytes(range(256)) * (20 * 1024)  # 5 MiB, above the bridge's stream window
    try:
        bridge = harness.start_bridge_to_peer(broker.port, standin)
        session = broker.accept(timeout=30)
        echo_head, echo_body = broker.request(
            session, "GET", "/v1/test/echo?peer=broker", [TOKEN, ("X-Custom", "kept")]
        )
        sink_head, sink_body = broker.request(
            session, "POST", "/v1/test/sink", [TOKEN, ("Content-Length", str(len(upload)))], upload
        )
        bytes_head, data = broker.request(session, "GET", f"/v1/test/bytes?size={5 * MIB}&digest=1",
                                          [TOKEN])
        health_head, health_body = broker.request(session, "HEAD", "/v1/sys/health")

        async def concurrent():
            return await asyncio.gather(
                *[session.request("GET", f"/v1/test/echo?n={n}", [TOKEN]) for n in range(24)]
            )

        results = broker.thread.call(concurrent(), timeout=60)
        window_updates = session.window_updates_received
    finally:
        broker.close()

    assert echo_head.status == 200, echo_body
    echo = json.loads(echo_body)
    assert echo["target"] == "/v1/test/echo?peer=broker"
    assert header_values(echo, "X-Custom") == ["kept"]
    assert sink_head.status == 200, sink_body
    sink = json.loads(sink_body)
    assert body_length(sink) == len(upload)
    assert body_sha256(sink) == hashlib.sha256(upload).hexdigest()
    assert bytes_head.status == 200
    assert len(data) == 5 * MIB
    assert hashlib.sha256(data).hexdigest() == bytes_head.field("X-Standin-Body-Sha256")
    assert health_head.status == 200
    assert health_body == b""
    assert [head.status for head, _ in results] == [200] * 24
    targets = [json.loads(body)["target"] for _, body in results]
    assert targets == [f"/v1/test/echo?n={n}" for n in range(24)]
    assert window_updates > 0
    assert bridge.find_events("connection_error") == []
    assert bridge.find_events("stream_error") == []


# ---------------------------------------------------------------------------------------------
# (b) Violations against the broker: the peer is a hostile bridge


# name, whether it replaces HELLO, the violation, GOAWAY code, debug text or None, broker flags
BROKER_CONNECTION_VIOLATIONS = [
    ("frame_before_hello", True, peer.violate_frame_before_hello, "protocol_error",
     "frame before HELLO", []),
    ("bad_version", True, peer.violate_bad_version, "version_mismatch",
     "unsupported protocol version", []),
    ("same_role", True, lambda c: peer.violate_same_role(c, peer.Role.BROKER), "protocol_error",
     "peer has the same role", []),
    ("hello_bad_length", True, peer.violate_hello_bad_length, "frame_size_error",
     "invalid first frame", []),
    ("second_hello", False, peer.violate_second_hello, "protocol_error", "second HELLO", []),
    ("ping_bad_length", False, peer.violate_ping_bad_length, "frame_size_error", None, []),
    ("window_update_bad_length", False, peer.violate_window_update_bad_length,
     "frame_size_error", None, []),
    ("payload_over_max", False, lambda c: peer.violate_payload_over_max(c, 64 * 1024),
     "frame_size_error", "frame length above max_frame_payload", []),
    ("unknown_type", False, peer.violate_unknown_type, "protocol_error", None, []),
    ("data_on_stream_zero", False, peer.violate_data_on_stream_zero, "protocol_error", None, []),
    ("data_unknown_stream", False, peer.violate_data_unknown_stream, "protocol_error",
     "DATA on a stream never opened", []),
    ("rst_unknown_stream", False, peer.violate_rst_unknown_stream, "protocol_error",
     "RST_STREAM on a stream never opened", []),
    ("window_update_unknown_stream", False, peer.violate_window_update_unknown_stream,
     "protocol_error", "WINDOW_UPDATE on a stream never opened", []),
    ("window_update_zero", False, peer.violate_window_update_zero, "protocol_error", None, []),
    ("connection_window_overflow", False, peer.violate_window_overflow, "flow_control_error",
     "connection window above 2^31-1", []),
    ("headers_from_bridge", False, peer.violate_headers_from_bridge, "protocol_error",
     "HEADERS on a stream the broker never opened", []),
    ("data_beyond_connection_window", False,
     lambda c: peer.violate_data_beyond_window(c, 1, 16 * 1024), "flow_control_error",
     "DATA beyond the connection window", ["--connection-window", "16KiB"]),
]


@pytest.mark.parametrize(
    "before_hello, violate, code, debug, broker_args",
    [case[1:] for case in BROKER_CONNECTION_VIOLATIONS],
    ids=[case[0] for case in BROKER_CONNECTION_VIOLATIONS],
)
def test_broker_answers_violation_with_goaway(harness, before_hello, violate, code, debug,
                                              broker_args):
    broker = harness.start_broker(plaintext=True, extra_args=broker_args)
    offset = broker.log_offset()
    connection = dial(broker)
    try:
        if not before_hello:
            connection.exchange_hello(peer.Role.BRIDGE)
        violate(connection)
        goaway = expect_goaway(connection, code)
    finally:
        connection.close()

    logged = broker.wait_for_event("connection_error", timeout=10, offset=offset, code=code)
    assert goaway.last_stream_id == 0
    if debug is not None:
        assert goaway.debug.decode() == debug
        assert logged["error"] == debug
    if before_hello:
        rejected = broker.wait_for_event("bridge_rejected", timeout=10, offset=offset)
        assert rejected["reason"] == "tunnel handshake failed"
    if code == "version_mismatch":
        mismatch = broker.wait_for_event("version_mismatch", timeout=10, offset=offset)
        assert mismatch["peer_version"] == peer.PROTOCOL_VERSION + 1
        assert mismatch["our_version"] == peer.PROTOCOL_VERSION
    assert_broker_serves(broker)


def test_broker_ping_flood_gets_enhance_your_calm(harness):
    broker = harness.start_broker(plaintext=True)
    offset = broker.log_offset()
    # A small receive buffer makes the broker's PING ACKs back up quickly.
    connection = dial(broker, receive_buffer=4096)
    try:
        connection.exchange_hello(peer.Role.BRIDGE)
        sent = peer.violate_ping_flood(connection)
        goaway = connection.read_goaway(timeout=10)
    finally:
        connection.close()

    logged = broker.wait_for_event("connection_error", timeout=10, offset=offset,
                                   code="enhance_your_calm")
    assert sent > 10000
    # Either limit may trip first: the rate of PINGs, or the queue of answers not yet sent.
    assert logged["error"] in ("PING flood", "control frame queue full")
    broker.wait_for_event("bridge_disconnected", timeout=10, offset=offset,
                          reason="enhance_your_calm")
    assert_broker_serves(broker)
    assert goaway is not None, "no GOAWAY arrived before the close"
    assert goaway.error_name == "enhance_your_calm"


def _stream_window_overflow(connection, stream_id):
    peer.violate_window_overflow(connection, stream_id)


def _data_before_head(connection, stream_id):
    connection.send_frame(peer.FrameType.DATA, 0, stream_id, b"early")


def _interim_head(connection, stream_id):
    connection.send_headers(stream_id, peer.ResponseHead(100, []), end_stream=False)


def _second_head(connection, stream_id):
    head = peer.ResponseHead(200, [("Content-Length", "5")])
    connection.send_headers(stream_id, head, end_stream=False)
    connection.send_headers(stream_id, head, end_stream=False)


# name, the violation on the stream the broker opened, RST_STREAM code, log text, client status
BROKER_STREAM_VIOLATIONS = [
    ("stream_window_overflow", _stream_window_overflow, "flow_control_error",
     "stream window above 2^31-1", 502),
    ("data_before_response_head", _data_before_head, "protocol_error",
     "DATA before the response head", 502),
    ("interim_response_head", _interim_head, "protocol_error", "malformed response head", 502),
    ("second_response_head", _second_head, "protocol_error", "second response head", None),
]


@pytest.mark.parametrize(
    "violate, code, error, client_expected",
    [case[1:] for case in BROKER_STREAM_VIOLATIONS],
    ids=[case[0] for case in BROKER_STREAM_VIOLATIONS],
)
def test_broker_answers_stream_violation_with_reset(harness, violate, code, error,
                                                    client_expected):
    broker = harness.start_broker(plaintext=True)
    offset = broker.log_offset()
    connection = dial(broker)
    client = None
    try:
        connection.exchange_hello(peer.Role.BRIDGE)
        client = start_client(broker, "/v1/test/stream-violation")
        stream_id = wait_for_stream(connection).stream_id
        violate(connection, stream_id)
        reset_code = expect_reset(connection, stream_id)
        still_alive = connection.ping()
        status = client_status(client)
        close_and_wait_gone(broker, connection, offset)
    finally:
        connection.close()
        if client is not None and client.poll() is None:
            client.kill()
            client.wait(10)

    assert reset_code == code
    assert still_alive, "a stream error must leave the connection up"
    logged = broker.wait_for_event("stream_error", timeout=10, offset=offset, code=code)
    assert logged["error"] == error
    assert broker.find_events("connection_error", offset) == []
    if client_expected is not None:
        assert status == client_expected
    assert_broker_serves(broker)


def test_broker_data_beyond_stream_window_ends_connection(harness):
    broker = harness.start_broker(plaintext=True, extra_args=["--stream-window", "16KiB"])
    offset = broker.log_offset()
    connection = dial(broker)
    client = None
    try:
        connection.exchange_hello(peer.Role.BRIDGE)
        client = start_client(broker, "/v1/test/window")
        stream_id = wait_for_stream(connection).stream_id
        connection.send_headers(stream_id, peer.ResponseHead(200, []), end_stream=False)
        peer.violate_data_beyond_window(connection, stream_id, 16 * 1024)
        goaway = expect_goaway(connection, "flow_control_error")
        status = client_status(client)
    finally:
        connection.close()
        if client is not None and client.poll() is None:
            client.kill()
            client.wait(10)

    logged = broker.wait_for_event("connection_error", timeout=10, offset=offset,
                                   code="flow_control_error")
    assert logged["error"] == "DATA beyond the stream window"
    assert goaway.last_stream_id == stream_id
    # Either the head reached the client and the body was cut (curl prints 200 and fails), or
    # the stream failed before its head went out (502). Never a complete response.
    assert status in (200, 502)
    assert_broker_serves(broker)


def test_broker_ignores_frames_on_closed_stream(harness):
    broker = harness.start_broker(plaintext=True)
    offset = broker.log_offset()
    connection = dial(broker)
    client = None
    try:
        connection.exchange_hello(peer.Role.BRIDGE)
        client = start_client(broker, "/v1/test/closed")
        stream_id = wait_for_stream(connection).stream_id
        head = peer.ResponseHead(200, [("Content-Length", "2")])
        connection.send_headers(stream_id, head, end_stream=False)
        connection.send_frame(peer.FrameType.DATA, peer.FLAG_END_STREAM, stream_id, b"{}")
        status = client_status(client)
        # The stream is closed at both ends now; late frames on it are ignored (§5.8).
        connection.send_frame(peer.FrameType.DATA, 0, stream_id, b"late")
        connection.send_frame(peer.FrameType.WINDOW_UPDATE, 0, stream_id, peer.encode_u32(10))
        connection.send_frame(peer.FrameType.RST_STREAM, 0, stream_id,
                              peer.encode_u32(peer.ErrorCode.CANCEL))
        still_alive = connection.ping()
    finally:
        connection.close()
        if client is not None and client.poll() is None:
            client.kill()
            client.wait(10)

    assert status == 200
    assert still_alive
    assert broker.find_events("connection_error", offset) == []
    assert broker.find_events("stream_error", offset) == []


# ---------------------------------------------------------------------------------------------
# (b) Violations against the bridge: the peer is a hostile broker


def _bridge_setup(harness, standin, extra_args=()):
    listener = listen()
    bridge = harness.start_bridge_to_peer(
        listener.getsockname()[1], standin, extra_args=[*FAST_REDIAL, *SHORT_DRAIN, *extra_args]
    )
    return listener, bridge


@pytest.mark.parametrize(
    "violate, code, event",
    [
        (peer.violate_frame_before_hello, "protocol_error", "connection_error"),
        (lambda c: peer.violate_bad_version(c, peer.Role.BROKER), "version_mismatch",
         "version_mismatch"),
    ],
    ids=["frame_before_hello", "bad_version"],
)
def test_bridge_rejects_bad_hello(harness, standin, violate, code, event):
    listener, bridge = _bridge_setup(harness, standin)
    try:
        connection = peer.RawConnection.accept(listener, broker_tls(harness.certs), timeout=15)
        try:
            violate(connection)
            goaway = expect_goaway(connection, code)
        finally:
            connection.close()
        served = serve_one_request(listener, harness.certs)
    finally:
        listener.close()

    assert goaway.last_stream_id == 0
    bridge.wait_for_event(event, timeout=10)
    failed = bridge.wait_for_event("connect_failed", timeout=10, stage="tunnel")
    assert failed["error"] == code
    assert served.status == 200


def test_bridge_refuses_streams_beyond_limit(harness, standin):
    listener, bridge = _bridge_setup(harness, standin, ["--max-streams", "2"])
    try:
        connection = peer.RawConnection.accept(listener, broker_tls(harness.certs), timeout=15)
        try:
            connection.exchange_hello(peer.Role.BROKER)
            peer.open_streams(connection, 1, 3, "/v1/test/delay?ms=1500")
            refused = expect_reset(connection, 3)
            statuses = {}
            ended = set()
            while len(ended) < 2:
                frame, _ = connection.read_until(lambda f: f.type == peer.FrameType.HEADERS
                                                 or f.end_stream, timeout=15)
                assert frame is not None, "bridge ended the connection"
                if frame.type == peer.FrameType.HEADERS:
                    statuses[frame.stream_id] = peer.decode_response_head(frame.payload).status
                if frame.end_stream:
                    ended.add(frame.stream_id)
            # Stream 3 was refused, not processed, so a new stream may carry it again.
            peer.open_streams(connection, 4, 1, "/v1/test/echo?retry=3")
            retried, _ = connection.read_until(
                lambda f: f.type == peer.FrameType.HEADERS and f.stream_id == 4, timeout=15
            )
        finally:
            connection.close()
    finally:
        listener.close()

    assert refused == "refused_stream"
    assert statuses == {1: 200, 2: 200}
    assert retried is not None
    bridge.wait_for_event("stream_refused", timeout=10, stream=3)
    assert bridge.find_events("connection_error") == []


def _reused_stream_id(connection):
    peer.open_streams(connection, 1, 1, "/v1/test/echo?first=1")
    connection.read_until(lambda f: f.end_stream and f.stream_id == 1, timeout=15)
    peer.open_streams(connection, 1, 1, "/v1/test/echo?again=1")


def _malformed_head(connection):
    # A field value with a line feed is malformed (§5.2 rule 4).
    payload = peer.encode_request_head(peer.RequestHead("GET", "/v1/test/echo", [("X-Bad", "a\nb")]))
    connection.send_frame(peer.FrameType.HEADERS, peer.FLAG_END_STREAM, 1, payload)


def _bridge_stream_window_overflow(connection):
    peer.open_streams(connection, 1, 1, "/v1/test/delay?ms=3000")
    peer.violate_window_overflow(connection, 1)


@pytest.mark.parametrize(
    "violate, frame_type, code, error",
    [
        (_reused_stream_id, "GOAWAY", "stream_closed", "HEADERS on a stream id already used"),
        (peer.violate_data_unknown_stream, "GOAWAY", "protocol_error",
         "DATA on a stream never opened"),
        (_malformed_head, "RST_STREAM", "protocol_error", "malformed request head"),
        (_bridge_stream_window_overflow, "RST_STREAM", "flow_control_error",
         "stream window above 2^31-1"),
    ],
    ids=["reused_stream_id", "data_unknown_stream", "malformed_request_head",
         "stream_window_overflow"],
)
def test_bridge_answers_violation(harness, standin, violate, frame_type, code, error):
    listener, bridge = _bridge_setup(harness, standin)
    try:
        connection = peer.RawConnection.accept(listener, broker_tls(harness.certs), timeout=15)
        try:
            connection.exchange_hello(peer.Role.BROKER)
            violate(connection)
            if frame_type == "GOAWAY":
                got = expect_goaway(connection, code).error_name
            else:
                got = expect_reset(connection, 1)
        finally:
            connection.close()
        served = serve_one_request(listener, harness.certs)
    finally:
        listener.close()

    assert got == code
    event = "connection_error" if frame_type == "GOAWAY" else "stream_error"
    logged = bridge.wait_for_event(event, timeout=10, code=code)
    assert logged["error"] == error
    assert served.status == 200


# ---------------------------------------------------------------------------------------------
# (c) Bounded memory against hostile peers


def test_broker_memory_bounded_when_bridge_never_reads(harness):
    broker = harness.start_broker(plaintext=True, extra_args=SHORT_DRAIN, env=SMALL_QUARANTINE)
    offset = broker.log_offset()
    # The hostile bridge allows the broker to send 2 GiB on each stream, then reads nothing.
    connection = dial(broker, receive_buffer=4096)
    uploads = []
    try:
        connection.exchange_hello(peer.Role.BRIDGE, peer.HUGE_WINDOWS)
        broker.wait_for_event("bridge_connected", offset=offset)
        for index in range(16):
            # An endless chunked upload from /dev/zero, each on its own stream.
            with open("/dev/zero", "rb") as zeros:
                uploads.append(
                    subprocess.Popen(
                        ["curl", "-sS", "--max-time", "8", "-H", TOKEN_HEADER, "-X", "POST",
                         "-T", "-", f"{broker.url}/v1/test/sink?upload={index}"],
                        stdin=zeros,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                )
        time.sleep(4)
        peak_kib = vmhwm_kib(broker.pid)
        # Another bridge still gets requests while the hostile one has 16 streams open.
        assert_broker_serves(broker)
    finally:
        connection.close()
        for upload in uploads:
            upload.kill()
            upload.wait(10)

    assert broker.running()
    assert peak_kib < MEMORY_LIMIT_KIB, f"broker VmHWM {peak_kib} KiB"


def test_bridge_memory_bounded_when_broker_never_reads(harness, standin):
    broker = harness.start_broker(plaintext=True)
    listener = listen(receive_buffer=4096)
    bridge = harness.start_bridge_to_peer(
        listener.getsockname()[1],
        standin,
        extra_args=["--broker-address", f"localhost:{broker.bridge_port}", *SHORT_DRAIN],
        env=SMALL_QUARANTINE,
    )
    try:
        connection = peer.RawConnection.accept(listener, broker_tls(harness.certs), timeout=15)
        try:
            connection.exchange_hello(peer.Role.BROKER, peer.HUGE_WINDOWS)
            # 64 downloads of 64 MiB each that the hostile broker never reads.
            peer.open_streams(connection, 1, 64, f"/v1/test/bytes?size={64 * MIB}")
            time.sleep(4)
            peak_kib = vmhwm_kib(bridge.pid)
            broker.wait_for_event("bridge_connected", timeout=15)
            status, _, body = curl_json(f"{broker.url}/v1/test/echo?meanwhile=1",
                                        args=("-H", TOKEN_HEADER))
        finally:
            connection.close()
    finally:
        listener.close()

    assert status == 200, body
    assert bridge.running()
    assert peak_kib < MEMORY_LIMIT_KIB, f"bridge VmHWM {peak_kib} KiB"


def test_bridge_memory_bounded_with_streams_beyond_limit(harness, standin):
    listener = listen(receive_buffer=4096)
    bridge = harness.start_bridge_to_peer(
        listener.getsockname()[1], standin, extra_args=SHORT_DRAIN, env=SMALL_QUARANTINE
    )
    limit = 16384  # the bridge's default --max-streams
    try:
        connection = peer.RawConnection.accept(listener, broker_tls(harness.certs), timeout=15)
        try:
            connection.exchange_hello(peer.Role.BROKER, peer.HUGE_WINDOWS)
            # Every stream waits for the vault; those beyond the limit are refused.
            peer.open_streams(connection, 1, limit + 2000, "/v1/test/delay?ms=20000")
            bridge.wait_for_event("stream_refused", timeout=30)
            time.sleep(1)
            peak_kib = vmhwm_kib(bridge.pid)
        finally:
            connection.close()
    finally:
        listener.close()

    assert bridge.running()
    assert peak_kib < MEMORY_LIMIT_KIB, f"bridge VmHWM {peak_kib} KiB"


def test_broker_memory_bounded_with_tiny_data_frames(harness):
    # The peer reads nothing while it sends, so the broker's keepalive must not end the
    # connection first (15 s + 10 s by default).
    broker = harness.start_broker(
        plaintext=True, extra_args=[*SHORT_DRAIN, "--keepalive-interval", "120s"],
        env=SMALL_QUARANTINE,
    )
    connection = dial(broker)
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        connection.exchange_hello(peer.Role.BRIDGE)
        # A client that sends one request and then reads nothing.
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect(("127.0.0.1", broker.client_port))
        client.sendall(b"GET /v1/test/tiny HTTP/1.1\r\nHost: vault\r\n" + TOKEN_HEADER.encode()
                       + b"\r\n\r\n")
        stream_id = wait_for_stream(connection).stream_id
        connection.send_headers(stream_id, peer.ResponseHead(200, []), end_stream=False)
        # Half of the 4 MiB stream window, one octet per DATA frame: 13 to 20 s of work for a
        # sanitizer build on 2 cores.
        frame_count = 2_000_000
        assert frame_count < connection.peer_hello.settings.initial_stream_window
        tiny = peer.encode_frame(peer.FrameType.DATA, 0, stream_id, b"x")
        connection.send(tiny * frame_count, timeout=60)
        still_alive = connection.ping(timeout=60)
        peak_kib = vmhwm_kib(broker.pid)
    finally:
        client.close()
        connection.close()

    assert still_alive
    assert peak_kib < MEMORY_LIMIT_KIB, f"broker VmHWM {peak_kib} KiB"
