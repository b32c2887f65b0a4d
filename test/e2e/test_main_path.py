"""End-to-end tests of the main path: Vault client -> broker (HTTPS) -> bridge -> vault stand-in."""

from __future__ import annotations

import email.utils
import hashlib
import json
import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple, Optional

import pytest

from http_clients import (
    body_length,
    body_sha256,
    curl_json,
    curl_transfer,
    header_values,
    https_connection,
    write_random_file,
)
from taser_harness import SYSTEM_PYTHON, listening_sockets, vmhwm_kib

MIB = 1 << 20
TOKEN_HEADER = "X-Vault-Token: root"

# Short enough to keep the tests fast, long enough for a sanitizer build to respond.
BRIDGE_WAIT = "1s"

# Peak resident memory allowed for the broker and the bridge while large bodies stream through.
MEMORY_LIMIT_KIB = 150 * 1024

# AddressSanitizer keeps freed memory in a quarantine (256 MiB by default on x86-64) to catch
# use-after-free. That memory stays resident, so a process streaming 256 MiB in many small
# allocations would reach the memory limit through the quarantine alone. The memory test
# shrinks the quarantine; a build without ASan ignores the variable.
SMALL_QUARANTINE = {"ASAN_OPTIONS": "quarantine_size_mb=16:thread_local_quarantine_size_kb=256"}


class EchoExchange(NamedTuple):
    """One request to /v1/test/echo and the response it got."""

    index: int
    method: str
    target: str
    marker: str
    body: Optional[bytes]
    status: int
    will_close: bool
    payload: bytes


HVAC_SCRIPT = r"""
import json, sys
import hvac

url, cafile, path = sys.argv[1:4]
secret = json.loads(sys.argv[4])
client = hvac.Client(url=url, token="root", verify=cafile, timeout=30)
authenticated = client.is_authenticated()
client.secrets.kv.v2.create_or_update_secret(path=path, secret=secret, mount_point="secret")
read = client.secrets.kv.v2.read_secret_version(path=path, mount_point="secret")
print(json.dumps({"authenticated": authenticated, "data": read["data"]["data"]}))
"""


def test_hvac_writes_and_reads_secret(tunnel):
    secret = {"username": "app", "password": f"pw-{uuid.uuid4().hex}"}

    completed = subprocess.run(
        [
            SYSTEM_PYTHON,
            "-c",
            HVAC_SCRIPT,
            tunnel.url,
            str(tunnel.client_ca),
            "e2e/hvac",
            json.dumps(secret),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout)
    assert result["authenticated"] is True
    assert result["data"] == secret
    targets = [record["target"] for record in tunnel.standin.records()]
    assert "/v1/secret/data/e2e/hvac" in targets


def test_curl_writes_and_reads_secret(tunnel):
    url = f"{tunnel.url}/v1/secret/data/e2e/curl"
    secret = {"api_key": f"key-{uuid.uuid4().hex}"}

    write_status, write_document, write_body = curl_json(
        url,
        tunnel.client_ca,
        args=(
            "-H",
            TOKEN_HEADER,
            "-H",
            "Content-Type: application/json",
            "--data",
            json.dumps({"data": secret}),
        ),
    )
    read_status, read_document, read_body = curl_json(
        url, tunnel.client_ca, args=("-H", TOKEN_HEADER)
    )

    assert write_status == 200, write_body
    assert write_document["data"]["version"] >= 1
    assert read_status == 200, read_body
    assert read_document["data"]["data"] == secret


def test_client_edge_cert_not_trusted_by_tunnel_ca(tunnel):
    # The client edge and the bridge edge use different CAs, so trusting the tunnel CA
    # must not be enough to talk to the client edge.
    completed = subprocess.run(
        [
            "curl",
            "-sS",
            "--max-time",
            "10",
            "--cacert",
            str(tunnel.harness.certs / "ca.pem"),
            f"{tunnel.url}/v1/sys/health",
        ],
        capture_output=True,
        timeout=30,
    )

    # curl exit code 60: the peer certificate cannot be authenticated with the given CA.
    assert completed.returncode == 60, completed.stderr


def test_concurrent_keepalive_clients_get_own_responses(tunnel):
    client_count = 64
    request_count = 2000
    deadline = time.monotonic() + 120
    run_id = uuid.uuid4().hex[:12]
    next_index = [0]
    index_lock = threading.Lock()

    def take_index():
        with index_lock:
            if next_index[0] >= request_count:
                return None
            index = next_index[0]
            next_index[0] += 1
            return index

    def run_client(client_id):
        connection = https_connection(tunnel.broker.client_port, tunnel.client_ca)
        sockets = []
        outcomes = []
        try:
            while (index := take_index()) is not None:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"client {client_id} passed the deadline at request {index}")
                marker = f"{run_id}-{index}"
                target = f"/v1/test/echo?request={marker}&client={client_id}"
                # Every fourth request carries a body of its own, to check bodies are not mixed up.
                body = f"body-{marker};".encode() * (1 + index % 50) if index % 4 == 0 else None
                method = "POST" if body is not None else "GET"
                headers = {"X-Vault-Token": "root", "X-Request-Marker": marker}
                connection.request(method, target, body=body, headers=headers)
                if not sockets or sockets[-1] is not connection.sock:
                    sockets.append(connection.sock)
                response = connection.getresponse()
                payload = response.read()
                outcomes.append(
                    EchoExchange(
                        index,
                        method,
                        target,
                        marker,
                        body,
                        response.status,
                        response.will_close,
                        payload,
                    )
                )
        finally:
            connection.close()
        return outcomes, len(sockets)

    with ThreadPoolExecutor(max_workers=client_count) as pool:
        futures = [pool.submit(run_client, client_id) for client_id in range(client_count)]
        results = [
            future.result(timeout=max(1.0, deadline - time.monotonic()) + 30) for future in futures
        ]

    outcomes = [outcome for client_outcomes, _ in results for outcome in client_outcomes]
    connections_opened = sum(socket_count for _, socket_count in results)
    mismatches = []
    for index, method, target, marker, body, status, will_close, payload in outcomes:
        if status != 200:
            mismatches.append(f"request {index}: status {status}: {payload[:200]!r}")
            continue
        document = json.loads(payload)
        expected_length = len(body) if body is not None else 0
        echoed_request = f"{document['method']} {document['target']}"
        if echoed_request != f"{method} {target}":
            mismatches.append(f"request {index}: sent {method} {target}, echo has {echoed_request}")
        echoed_markers = header_values(document, "X-Request-Marker")
        if echoed_markers != [marker]:
            mismatches.append(f"request {index}: marker {marker}, echo has {echoed_markers}")
        if body_length(document) != expected_length:
            mismatches.append(
                f"request {index}: body {expected_length} bytes, echo has {body_length(document)}"
            )
        if body_sha256(document) != hashlib.sha256(body or b"").hexdigest():
            mismatches.append(f"request {index}: echo has the SHA-256 of a different body")
        if will_close:
            mismatches.append(f"request {index}: response closed the keep-alive connection")
    assert len(outcomes) == request_count
    assert mismatches == [], f"{len(mismatches)} mismatched responses, first: {mismatches[:5]}"
    assert connections_opened == client_count


def test_large_bodies_stream_with_bounded_memory(harness, standin, tmp_path):
    broker = harness.start_broker(env=SMALL_QUARANTINE)
    bridge = harness.start_bridge(broker, standin, env=SMALL_QUARANTINE)
    download_size = 256 * MIB
    upload_size = 64 * MIB
    upload_path = tmp_path / "upload.bin"
    upload_sha256 = write_random_file(upload_path, upload_size)

    # digest=1 makes the stand-in send the body's SHA-256 in X-Standin-Body-Sha256.
    download = curl_transfer(
        f"{broker.url}/v1/test/bytes?size={download_size}&digest=1",
        tmp_path,
        broker.client_ca,
        args=("-H", TOKEN_HEADER),
    )
    upload = curl_transfer(
        f"{broker.url}/v1/test/sink",
        tmp_path,
        broker.client_ca,
        args=(
            "-H",
            TOKEN_HEADER,
            "-H",
            "Content-Type: application/octet-stream",
            "--upload-file",
            str(upload_path),
            "-X",
            "POST",
        ),
    )
    upload_path.unlink()
    broker_peak_kib = vmhwm_kib(broker.pid)
    bridge_peak_kib = vmhwm_kib(bridge.pid)

    assert download.exit_code == 0, download.stderr
    assert download.status == 200
    assert download.body_bytes == download_size
    assert download.body_sha256 == download.header("X-Standin-Body-Sha256")
    assert upload.exit_code == 0, upload.stderr
    assert upload.status == 200
    assert upload.json() == {"body_length": upload_size, "body_sha256": upload_sha256}
    sink_records = [record for record in standin.records() if record["target"] == "/v1/test/sink"]
    assert len(sink_records) == 1
    assert body_length(sink_records[0]) == upload_size
    assert body_sha256(sink_records[0]) == upload_sha256
    assert broker_peak_kib < MEMORY_LIMIT_KIB, f"broker VmHWM {broker_peak_kib} KiB"
    assert bridge_peak_kib < MEMORY_LIMIT_KIB, f"bridge VmHWM {bridge_peak_kib} KiB"


def test_chunked_response_passes_intact(tunnel, tmp_path):
    size = 8 * MIB + 12345

    result = curl_transfer(
        f"{tunnel.url}/v1/test/bytes?size={size}&chunked=1&digest=1",
        tmp_path,
        tunnel.client_ca,
        args=("-H", TOKEN_HEADER),
    )

    assert result.exit_code == 0, result.stderr
    assert result.status == 200
    assert result.body_bytes == size
    assert result.body_sha256 == result.header("X-Standin-Body-Sha256")


def test_bridge_has_no_listening_socket(tunnel):
    # Traffic first, so that the bridge's connections to the stand-in exist too.
    status, _, body = curl_json(
        f"{tunnel.url}/v1/test/echo", tunnel.client_ca, args=("-H", TOKEN_HEADER)
    )

    broker_listeners = listening_sockets(tunnel.broker.pid)
    bridge_listeners = listening_sockets(tunnel.bridge.pid)

    assert status == 200, body
    # The broker's own listeners prove that listening_sockets() finds a process's sockets.
    assert ("127.0.0.1", tunnel.broker.client_port) in broker_listeners
    assert ("127.0.0.1", tunnel.broker.bridge_port) in broker_listeners
    assert bridge_listeners == []


@pytest.mark.parametrize(
    "cert_name",
    ["other-bridge", "expired-bridge", "notyet-bridge", "server-only-bridge"],
)
def test_bridge_with_bad_cert_rejected(harness, standin, cert_name):
    broker = harness.start_broker(extra_args=["--bridge-wait", BRIDGE_WAIT])
    broker_offset = broker.log_offset()

    bridge = harness.start_bridge(broker, standin, cert_name=cert_name, wait_connected=False)
    rejected = broker.wait_for_event("bridge_rejected", offset=broker_offset)
    status, document, body = curl_json(
        f"{broker.url}/v1/test/echo", broker.client_ca, args=("-H", TOKEN_HEADER)
    )

    assert rejected.get("reason"), rejected
    assert status == 503, body
    assert document is not None and document.get("errors"), body
    assert broker.find_events("bridge_connected", broker_offset) == []
    assert bridge.find_events("broker_connected") == []
    assert standin.records() == []


def test_no_bridge_returns_503_then_recovers(harness, standin, tmp_path):
    broker = harness.start_broker(extra_args=["--bridge-wait", BRIDGE_WAIT])
    url = f"{broker.url}/v1/test/echo?attempt=1"

    started = time.monotonic()
    unavailable = curl_transfer(
        url, tmp_path, broker.client_ca, args=("-H", TOKEN_HEADER), timeout=30
    )
    waited = time.monotonic() - started
    harness.start_bridge(broker, standin)
    status, document, body = curl_json(
        f"{broker.url}/v1/test/echo?attempt=2", broker.client_ca, args=("-H", TOKEN_HEADER)
    )

    assert unavailable.exit_code == 0, unavailable.stderr
    assert unavailable.status == 503
    assert waited < 15, f"503 took {waited:.1f} s with --bridge-wait {BRIDGE_WAIT}"
    retry_after = unavailable.header("Retry-After")
    assert retry_after is not None
    assert retry_after.isdigit() or email.utils.parsedate_to_datetime(retry_after) is not None
    assert "json" in (unavailable.header("Content-Type") or "")
    errors = unavailable.json()["errors"]
    assert isinstance(errors, list)
    assert errors
    assert all(isinstance(message, str) for message in errors)
    assert status == 200, body
    assert document["target"] == "/v1/test/echo?attempt=2"
    assert [record["target"] for record in standin.records()] == ["/v1/test/echo?attempt=2"]


def test_request_waits_for_late_bridge(harness, standin, tmp_path):
    broker = harness.start_broker(extra_args=["--bridge-wait", "20s"])
    url = f"{broker.url}/v1/test/echo?late=1"

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(
            curl_transfer, url, tmp_path, broker.client_ca, ("-H", TOKEN_HEADER), 40
        )
        # Give the request time to reach the broker before any bridge exists.
        time.sleep(0.5)
        harness.start_bridge(broker, standin)
        result = pending.result(timeout=60)

    assert result.exit_code == 0, result.stderr
    assert result.status == 200
    assert result.json()["target"] == "/v1/test/echo?late=1"


def test_hop_by_hop_headers_removed(tunnel):
    end_to_end = [
        ("X-Vault-Token", "root"),
        ("X-Vault-Namespace", "team-a/"),
        ("X-Vault-Request", "true"),
        ("X-Vault-Wrap-TTL", "5m"),
        ("X-Vault-Index", "v1:first-index-state"),
        ("X-Vault-Index", "v1:second-index-state"),
        ("X-Custom-End-To-End", "kept"),
    ]
    hop_by_hop = [
        ("Connection", "keep-alive, X-Hop-Custom"),
        ("Keep-Alive", "timeout=5, max=100"),
        ("TE", "trailers"),
        ("Upgrade", "h2c"),
        ("Proxy-Connection", "keep-alive"),
        ("Proxy-Authorization", "Basic dXNlcjpwYXNzd29yZA=="),
        ("X-Hop-Custom", "named-in-connection"),
    ]
    connection = https_connection(tunnel.broker.client_port, tunnel.client_ca)

    try:
        connection.putrequest("GET", "/v1/test/echo?hop=1", skip_accept_encoding=True)
        for name, value in end_to_end + hop_by_hop:
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        payload = response.read()
    finally:
        connection.close()

    assert response.status == 200, payload
    document = json.loads(payload)
    for name in (
        "X-Vault-Token",
        "X-Vault-Namespace",
        "X-Vault-Request",
        "X-Vault-Wrap-TTL",
        "X-Custom-End-To-End",
    ):
        sent = [value for key, value in end_to_end if key == name]
        assert header_values(document, name) == sent, name
    assert header_values(document, "X-Vault-Index") == [
        "v1:first-index-state",
        "v1:second-index-state",
    ]
    for name in (
        "Keep-Alive",
        "TE",
        "Upgrade",
        "Proxy-Connection",
        "Proxy-Authorization",
        "X-Hop-Custom",
    ):
        assert header_values(document, name) == [], name
    # The bridge may send its own Connection options to the stand-in, but never the client's.
    for value in header_values(document, "Connection"):
        assert "x-hop-custom" not in value.lower()
    recorded = [
        record for record in tunnel.standin.records() if record["target"] == "/v1/test/echo?hop=1"
    ]
    assert len(recorded) == 1
    assert header_values(recorded[0], "X-Hop-Custom") == []


def test_sigterm_exits_zero(tunnel):
    status, _, body = curl_json(
        f"{tunnel.url}/v1/test/echo", tunnel.client_ca, args=("-H", TOKEN_HEADER)
    )

    bridge_exit = tunnel.bridge.stop()
    broker_exit = tunnel.broker.stop()

    assert status == 200, body
    assert not tunnel.bridge.killed, "bridge did not exit within the stop timeout after SIGTERM"
    assert bridge_exit == 0
    assert not tunnel.broker.killed, "broker did not exit within the stop timeout after SIGTERM"
    assert broker_exit == 0
