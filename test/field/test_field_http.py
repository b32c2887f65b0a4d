"""HTTP faults from the field: header sizes, Connection-header abuse, Retry-After, SSRF by frame.

Clients speak plain HTTP to the broker, with the default header limits unless a test sets
others. A raw vault (field_helpers.RawVault) replaces the vault stand-in where a test needs the
request head byte for byte or a response that the vault stand-in cannot send.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from typing import Optional

import pytest

from field_helpers import RawVault, Reply, plain_request
from http_clients import (
    header_values,
    parse_raw_response,
    raw_exchange,
    read_response_head,
    read_until_closed,
)
from taser_harness import REPO_ROOT, CanaryListener, vmhwm_kib

sys.path.insert(0, str(REPO_ROOT / "test" / "peer"))

import taser_peer as peer  # noqa: E402

TOKEN = {"X-Vault-Token": "root"}
KIB = 1024
MIB = 1024 * KIB
RAW_VAULT_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
)


def request_bytes(*lines: str, body: bytes = b"") -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def start_path(harness, vault_url: str, broker_args=(), bridge_args=()):
    """Start a plain-HTTP broker and a bridge whose vault address is VAULT_URL."""
    broker = harness.start_broker(plaintext=True, extra_args=list(broker_args))
    # The harness builds a bridge's command line from a stand-in, whose URL is then replaced.
    standin = harness.start_standin()
    bridge = harness.start_bridge_with_options(
        broker, standin, {"--vault-address": vault_url}, extra_args=list(bridge_args)
    )
    return broker, bridge


# ---------------------------------------------------------------------------------------------
# Header sizes


def test_large_legitimate_headers_forwarded_intact(harness):
    # A 12 KiB bearer token (a long JWT) with a 40 KiB JSON login body, and 200 headers of
    # 100 bytes each (20 KiB): both inside the broker's default 64 KiB header block.
    jwt = "eyJ" + "j" * (12 * KIB - 3)
    login = json.dumps({"role": "app", "jwt": "x" * (40 * KIB)}).encode()
    many = [
        f"X-Field-{index:03d}: " + "v" * (100 - len(f"X-Field-{index:03d}: "))
        for index in range(200)
    ]

    with RawVault(RAW_VAULT_RESPONSE) as vault:
        broker, _ = start_path(harness, vault.url)
        login_reply, _ = raw_exchange(
            broker.client_port,
            request_bytes(
                "POST /v1/auth/jwt/login HTTP/1.1",
                "Host: vault.example.test",
                f"Authorization: Bearer {jwt}",
                "Content-Type: application/json",
                f"Content-Length: {len(login)}",
                "Connection: close",
                body=login,
            ),
        )
        many_reply, _ = raw_exchange(
            broker.client_port,
            request_bytes(
                "GET /v1/sys/health HTTP/1.1",
                "Host: vault.example.test",
                *many,
                "Connection: close",
            ),
        )
        recorded = vault.recorded()

    assert parse_raw_response(login_reply).status == 200, login_reply[:300]
    assert parse_raw_response(many_reply).status == 200, many_reply[:300]
    assert len(recorded) == 2
    assert recorded[0].header_values("Authorization") == [f"Bearer {jwt}"]
    assert recorded[0].body_length == len(login)
    forwarded = [line for line in recorded[1].header_lines() if line.startswith("X-Field-")]
    assert forwarded == many


def send_slowly(
    port: int, start: bytes, size: int, interval_s: float
) -> tuple[int, Optional[float]]:
    """Send START, then SIZE bytes one at a time INTERVAL_S apart, until the peer closes.

    Gives up after 10 s. Returns the count of single bytes sent and the seconds after which
    the peer closed the connection, or None if it never did.
    """
    sent = 0
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(start)
        sock.settimeout(interval_s)
        while sent < size and time.monotonic() - started < 10:
            try:
                sock.send(b"z")
                sent += 1
                if sock.recv(4096) == b"":
                    return sent, time.monotonic() - started
            except socket.timeout:
                continue
            except OSError:
                return sent, time.monotonic() - started
    return sent, None


def test_oversized_header_line_rejected(harness):
    broker, _ = start_path(harness, "http://127.0.0.1:1", broker_args=["--header-timeout", "2s"])
    line_start = b"GET /v1/sys/health HTTP/1.1\r\nHost: x\r\nX-Big: "
    peak_before = vmhwm_kib(broker.pid)

    # Sent at once by 16 clients: each gets 431 as soon as the 64 KiB limit is crossed.
    results: list[tuple[bytes, bool]] = []

    def send_big() -> None:
        results.append(raw_exchange(broker.client_port, line_start + b"z" * MIB, timeout=10))

    threads = [threading.Thread(target=send_big) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    peak_growth_kib = vmhwm_kib(broker.pid) - peak_before

    # Sent one byte every 10 ms: the header timeout ends it long before 1 MiB.
    sent, closed_after = send_slowly(broker.client_port, line_start, MIB, interval_s=0.01)

    print(
        f"oversized headers: 16 x 1 MiB raised the broker's peak RSS by {peak_growth_kib} KiB; "
        f"the slow sender was cut after {closed_after} s and {sent} bytes"
    )
    statuses = [parse_raw_response(received).status for received, _ in results]
    assert statuses == [431] * 16
    assert all(closed for _, closed in results)
    # The broker reads at most the 64 KiB limit of each header block.
    assert peak_growth_kib < 16 * 1024
    assert closed_after is not None and closed_after < 5.0
    assert sent < 64 * KIB


def test_many_tiny_headers_rejected_431(harness):
    with RawVault(RAW_VAULT_RESPONSE) as vault:
        broker, bridge = start_path(harness, vault.url)
        # 10,000 fields of 6 bytes: 60,000 bytes, inside the 64 KiB byte limit.
        received, closed = raw_exchange(
            broker.client_port,
            request_bytes(
                "GET /v1/sys/health HTTP/1.1", "Host: x", *(["a: b"] * 10_000), "Connection: close"
            ),
        )
        recorded = vault.recorded()

    response = parse_raw_response(received)
    assert response.status == 431, received[:300]
    assert json.loads(response.body)["errors"]
    assert recorded == []
    assert bridge.find_events("stream_error") == []


# ---------------------------------------------------------------------------------------------
# Connection-header abuse


def test_connection_nominated_request_headers_stripped(harness):
    standin = harness.start_standin()
    broker = harness.start_broker(plaintext=True)
    harness.start_bridge(broker, standin)

    # X-Forwarded-For named in Connection is hop-by-hop, so it is removed, not passed on.
    forwarded, _ = raw_exchange(
        broker.client_port,
        request_bytes(
            "GET /v1/test/echo?case=xff HTTP/1.1",
            "Host: vault.example.test",
            "X-Vault-Token: root",
            "Connection: keep-alive, X-Forwarded-For",
            "X-Forwarded-For: 10.0.0.99",
            "Connection: close",
        ),
    )
    # A client that names X-Vault-Token in Connection removes its own token: the vault receives
    # none and denies the request. Nothing is authorized by the broker on the client's behalf.
    token_named, _ = raw_exchange(
        broker.client_port,
        request_bytes(
            "GET /v1/secret/data/app HTTP/1.1",
            "Host: vault.example.test",
            "Connection: close, X-Vault-Token",
            "X-Vault-Token: root",
        ),
    )
    records = {record["target"]: record for record in standin.records()}

    forwarded_response = parse_raw_response(forwarded)
    assert forwarded_response.status == 200, forwarded[:300]
    assert header_values(json.loads(forwarded_response.body), "X-Forwarded-For") == []
    token_response = parse_raw_response(token_named)
    assert token_response.status == 403, token_named[:300]
    assert json.loads(token_response.body) == {"errors": ["permission denied"]}
    assert header_values(records["/v1/secret/data/app"], "X-Vault-Token") == []
    assert header_values(records["/v1/test/echo?case=xff"], "X-Forwarded-For") == []


def test_h2c_upgrade_not_honoured(harness):
    standin = harness.start_standin()
    broker = harness.start_broker(plaintext=True)
    harness.start_bridge(broker, standin)
    upgrade = request_bytes(
        "GET /v1/test/echo?case=h2c HTTP/1.1",
        "Host: vault.example.test",
        "X-Vault-Token: root",
        "Connection: Upgrade, HTTP2-Settings",
        "Upgrade: h2c",
        "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA",
        "Proxy-Authorization: Basic dGVzdDp0ZXN0",
    )
    follow_up = request_bytes(
        "GET /v1/test/echo?case=after-h2c HTTP/1.1",
        "Host: vault.example.test",
        "X-Vault-Token: root",
        "Connection: close",
    )

    with socket.create_connection(("127.0.0.1", broker.client_port), timeout=10) as sock:
        sock.sendall(upgrade)
        head, rest = read_response_head(sock, timeout=10)
        first = parse_raw_response(head + rest)
        length = int(first.header("Content-Length") or 0)
        body = rest
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        # The same connection still speaks HTTP/1.1.
        sock.sendall(follow_up)
        second_bytes, _ = read_until_closed(sock, timeout=10)
    second = parse_raw_response(second_bytes)
    echoed = json.loads(body[:length])

    assert first.status == 200, head
    assert first.header("Upgrade") is None
    for name in ("Upgrade", "HTTP2-Settings", "Proxy-Authorization"):
        assert header_values(echoed, name) == [], name
    assert second.status == 200, second_bytes[:300]
    assert json.loads(second.body)["target"] == "/v1/test/echo?case=after-h2c"


def test_connection_nominated_response_headers_stripped(harness):
    response = (
        b"HTTP/1.1 200 OK\r\n"
        b"Content-Type: application/json\r\n"
        b"Connection: X-Vault-Index, X-Internal-Hop\r\n"
        b"X-Vault-Index: dmF1bHQtaW5kZXgtdGVzdA\r\n"
        b"X-Internal-Hop: should-not-pass\r\n"
        b"X-Vault-Kept: passes\r\n"
        b"Content-Length: 2\r\n\r\n{}"
    )
    with RawVault(response) as vault:
        broker, _ = start_path(harness, vault.url)
        reply = plain_request(broker.client_port, "GET", "/v1/sys/health")

    assert reply.status == 200, reply
    assert reply.header("X-Vault-Index") is None
    assert reply.header("X-Internal-Hop") is None
    assert reply.header("X-Vault-Kept") == "passes"
    assert reply.body == b"{}"


# ---------------------------------------------------------------------------------------------
# Retry-After on every 503 that taser makes itself


def hold_long_request(
    port: int, delay_ms: int, target: str = ""
) -> tuple[threading.Thread, list[Reply]]:
    """Start a request on a thread and return the thread and its reply list.

    The request is /v1/test/delay?ms=DELAY_MS unless TARGET names another one.
    """
    replies: list[Reply] = []
    target = target or f"/v1/test/delay?ms={delay_ms}"
    thread = threading.Thread(
        target=lambda: replies.append(plain_request(port, "GET", target, headers=TOKEN, timeout=30))
    )
    thread.start()
    return thread, replies


def wait_for_records(standin, count: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while len(standin.records()) < count and time.monotonic() < deadline:
        time.sleep(0.05)


def overload_bridge_draining(harness, standin) -> Reply:
    broker = harness.start_broker(plaintext=True, extra_args=["--bridge-wait", "1s"])
    bridge = harness.start_bridge(broker, standin, extra_args=["--drain-timeout", "30s"])
    thread, _ = hold_long_request(broker.client_port, 4000)
    wait_for_records(standin, 1)
    os.kill(bridge.pid, signal.SIGTERM)
    bridge.wait_for_event("drain_started", 10)
    reply = plain_request(broker.client_port, "GET", "/v1/sys/health", timeout=10)
    thread.join(timeout=30)
    return reply


def overload_bridge_stream_limit(harness, standin) -> Reply:
    # The broker keeps a request for a full bridge waiting up to --bridge-wait, then responds 503.
    broker = harness.start_broker(plaintext=True, extra_args=["--bridge-wait", "1s"])
    harness.start_bridge(broker, standin, extra_args=["--max-streams", "1"])
    thread, _ = hold_long_request(broker.client_port, 4000)
    wait_for_records(standin, 1)
    reply = plain_request(broker.client_port, "GET", "/v1/sys/health", timeout=10)
    thread.join(timeout=30)
    return reply


def overload_vault_connections(harness, standin) -> Reply:
    broker = harness.start_broker(plaintext=True)
    harness.start_bridge(
        broker, standin, extra_args=["--vault-max-connections", "1", "--request-timeout", "2s"]
    )
    # A response that streams for 4 s occupies the only vault connection, while each read of
    # it stays inside the 2 s deadline. The second request's wait for a connection does not.
    thread, _ = hold_long_request(broker.client_port, 0, "/v1/test/stream?chunks=8&ms=500")
    wait_for_records(standin, 1)
    reply = plain_request(broker.client_port, "GET", "/v1/test/echo", headers=TOKEN, timeout=10)
    thread.join(timeout=30)
    return reply


OVERLOADS = {
    "bridge-draining": overload_bridge_draining,
    "bridge-stream-limit": overload_bridge_stream_limit,
    "vault-connections-busy": overload_vault_connections,
}


@pytest.mark.parametrize("overload", list(OVERLOADS))
def test_taser_503_carries_retry_after(harness, overload):
    standin = harness.start_standin()

    reply = OVERLOADS[overload](harness, standin)

    assert reply.status == 503, reply
    retry_after = reply.header("Retry-After")
    assert retry_after is not None and retry_after.isdigit(), reply.headers
    assert int(retry_after) >= 1
    assert reply.header("Content-Type") == "application/json"
    errors = json.loads(reply.body)["errors"]
    assert isinstance(errors, list) and errors and all(isinstance(e, str) and e for e in errors)


# ---------------------------------------------------------------------------------------------
# A broker (or something posing as one) names another target in a stream


def test_stream_target_cannot_redirect_bridge(harness, certs):
    standin = harness.start_standin()
    canary = CanaryListener()
    context = peer.server_context(
        str(certs / "broker.pem"), str(certs / "broker-key.pem"), str(certs / "ca.pem")
    )
    peer_broker = peer.PeerBroker(context)
    canary_authority = f"127.0.0.1:{canary.port}"
    tunneled_request = request_bytes(
        "GET /v1/test/echo?via=connect-frame HTTP/1.1",
        "Host: x",
        "X-Vault-Token: root",
        "Connection: close",
    )
    try:
        bridge = harness.start_bridge_to_peer(
            peer_broker.port, standin, extra_args=["--allow-tunnels", "--drain-timeout", "1s"]
        )
        session = peer_broker.accept(timeout=30)
        connect_head, connect_body = peer_broker.request(
            session, "CONNECT", canary_authority, [], tunneled_request
        )
        absolute_head, _ = peer_broker.request(
            session,
            "GET",
            f"http://{canary_authority}/v1/test/echo?via=absolute",
            [("X-Vault-Token", "root")],
        )
        host_head, _ = peer_broker.request(
            session,
            "GET",
            "/v1/test/echo?via=host",
            [("Host", canary_authority), ("X-Vault-Token", "root")],
        )
        time.sleep(0.5)
    finally:
        peer_broker.close()
        canary.close()
    targets = sorted(record["target"] for record in standin.records())

    assert connect_head.status == 200
    assert parse_raw_response(connect_body).status == 200, connect_body[:300]
    assert absolute_head.status == 400
    assert host_head.status == 200
    assert targets == ["/v1/test/echo?via=connect-frame", "/v1/test/echo?via=host"]
    assert canary.connections == 0
    assert bridge.find_events("request_rejected", reason="target not in origin form")
