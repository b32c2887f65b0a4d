"""End-to-end tests of byte tunnels: the broker's passthrough edge and CONNECT.

In passthrough mode the client speaks TLS with the vault stand-in itself. The broker carries the
encrypted bytes unread, so it needs no copy of the stand-in's certificate and never reads a
token in plain text.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

from http_clients import (
    body_length,
    body_sha256,
    curl_json,
    curl_transfer,
    header_values,
    https_connection,
    parse_raw_response,
    read_response_head,
    read_until_closed,
    tls_context,
)
from taser_harness import (
    SYSTEM_PYTHON,
    Bridge,
    Broker,
    Harness,
    StandIn,
    scan_process_memory,
    vmhwm_kib,
)

MIB = 1 << 20
TOKEN_HEADER = "X-Vault-Token: root"

# Short enough to keep the tests fast, long enough for a sanitizer build to respond.
BRIDGE_WAIT = "1s"

# Peak resident memory allowed for the broker and the bridge while large bodies stream through.
MEMORY_LIMIT_KIB = 150 * 1024

# AddressSanitizer keeps freed memory in a quarantine (256 MiB by default on x86-64), which stays
# resident. The memory test shrinks it, as test_main_path.py does. Other builds ignore this.
SMALL_QUARANTINE = {"ASAN_OPTIONS": "quarantine_size_mb=16:thread_local_quarantine_size_kb=256"}

# The request that the half-close tests send inside a tunnel, before they half-close it.
HALF_CLOSE_REQUEST = (
    b"GET /v1/test/bytes?size=1048576&digest=1 HTTP/1.1\r\n"
    b"Host: x\r\n"
    b"X-Vault-Token: root\r\n"
    b"Connection: close\r\n"
    b"\r\n"
)

HVAC_SCRIPT = r"""
import json, sys
import hvac

url, cafile, token, path = sys.argv[1:5]
secret = json.loads(sys.argv[5])
client = hvac.Client(url=url, token=token, verify=cafile, timeout=30)
authenticated = client.is_authenticated()
client.secrets.kv.v2.create_or_update_secret(path=path, secret=secret, mount_point="secret")
read = client.secrets.kv.v2.read_secret_version(path=path, mount_point="secret")
print(json.dumps({"authenticated": authenticated, "data": read["data"]["data"]}))
"""


def metric(text: str, name: str, labels: str = "") -> float:
    """Return the value of one sample in Prometheus text, failing when it is absent."""
    pattern = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else "") + r" (\S+)"
    match = re.search(r"^" + pattern + r"$", text, re.MULTILINE)
    assert match, f"no sample {name}{{{labels}}} in:\n{text}"
    return float(match.group(1))


def broker_metric(broker: Broker, name: str, labels: str = "") -> float:
    status, text = broker.admin_get("/metrics")
    assert status == 200, text
    return metric(text, name, labels)


def wait_for_metric(
    broker: Broker,
    name: str,
    check: Callable[[float], bool],
    labels: str = "",
    timeout: float = 10.0,
) -> float:
    """Poll a broker metric until CHECK accepts its value, and return the value.

    taser_tunnels_total counts a tunnel when it opens, but taser_tunnel_bytes_total adds its
    bytes only when it has closed in both directions, a moment after the client saw its response.
    """
    values = []

    def reached() -> bool:
        values.append(broker_metric(broker, name, labels))
        return check(values[-1])

    broker.wait_until(reached, timeout, f"metric {name} to reach the expected value")
    return values[-1]


def start_passthrough_path(
    harness: Harness,
    standin: StandIn,
    broker_args: tuple[str, ...] = (),
    env: Optional[dict[str, str]] = None,
) -> tuple[Broker, Bridge]:
    """Start a passthrough broker and a bridge that accepts byte tunnels to STANDIN."""
    broker = harness.start_passthrough_broker(extra_args=broker_args, env=env)
    bridge = harness.start_bridge(broker, standin, extra_args=["--allow-tunnels"], env=env)
    return broker, bridge


def vault_ca(harness: Harness) -> Path:
    """The CA of the stand-in's own certificate, which clients of a passthrough edge trust."""
    return harness.certs / "vault-ca.pem"


# ---------------------------------------------------------------------------------------------
# Vault clients through the passthrough edge


def test_passthrough_hvac_and_curl_share_secret(harness):
    standin = harness.start_standin(tls=True)
    broker, _ = start_passthrough_path(harness, standin)
    url = f"https://127.0.0.1:{broker.client_port}"
    hvac_secret = {"username": "app", "password": f"pw-{uuid.uuid4().hex}"}
    curl_secret = {"api_key": f"key-{uuid.uuid4().hex}"}

    hvac_run = subprocess.run(
        [
            SYSTEM_PYTHON,
            "-c",
            HVAC_SCRIPT,
            url,
            str(vault_ca(harness)),
            "root",
            "e2e/passthrough-hvac",
            json.dumps(hvac_secret),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    curl_read_status, curl_read, curl_read_body = curl_json(
        f"{url}/v1/secret/data/e2e/passthrough-hvac", vault_ca(harness), args=("-H", TOKEN_HEADER)
    )
    curl_write_status, _, curl_write_body = curl_json(
        f"{url}/v1/secret/data/e2e/passthrough-curl",
        vault_ca(harness),
        args=(
            "-H",
            TOKEN_HEADER,
            "-H",
            "Content-Type: application/json",
            "--data",
            json.dumps({"data": curl_secret}),
        ),
    )
    curl_reread_status, curl_reread, curl_reread_body = curl_json(
        f"{url}/v1/secret/data/e2e/passthrough-curl", vault_ca(harness), args=("-H", TOKEN_HEADER)
    )
    # The certificate that a client sees is the stand-in's: the client-edge CA does not verify it.
    wrong_ca = subprocess.run(
        [
            "curl",
            "-sS",
            "--max-time",
            "10",
            "--cacert",
            str(broker.client_ca),
            f"{url}/v1/sys/health",
        ],
        capture_output=True,
        timeout=30,
    )

    assert hvac_run.returncode == 0, hvac_run.stderr
    hvac_result = json.loads(hvac_run.stdout)
    assert hvac_result["authenticated"] is True
    assert hvac_result["data"] == hvac_secret
    assert curl_read_status == 200, curl_read_body
    assert curl_read["data"]["data"] == hvac_secret
    assert curl_write_status == 200, curl_write_body
    assert curl_reread_status == 200, curl_reread_body
    assert curl_reread["data"]["data"] == curl_secret
    # curl exit code 60: the peer certificate cannot be authenticated with the given CA.
    assert wrong_ca.returncode == 60, wrong_ca.stderr
    assert not any("vault" in Path(arg).name for arg in broker.argv), broker.argv
    targets = [record["target"] for record in standin.records()]
    assert "/v1/secret/data/e2e/passthrough-hvac" in targets
    assert "/v1/secret/data/e2e/passthrough-curl" in targets


def test_passthrough_concurrent_clients_matched(harness):
    standin = harness.start_standin(tls=True)
    broker, _ = start_passthrough_path(harness, standin)
    client_count = 64
    request_count = 1000
    deadline = time.monotonic() + 90
    run_id = uuid.uuid4().hex[:12]
    indices = iter(range(request_count))
    index_lock = threading.Lock()

    def take_index() -> Optional[int]:
        with index_lock:
            return next(indices, None)

    def run_client(client_id: int) -> tuple[list[str], int, int]:
        connection = https_connection(broker.client_port, vault_ca(harness))
        sockets = []
        mismatches = []
        done = 0
        try:
            while (index := take_index()) is not None:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"client {client_id} passed the deadline at request {index}")
                marker = f"{run_id}-{index}"
                target = f"/v1/test/echo?request={marker}&client={client_id}"
                # Every third request carries a body of its own, so that bodies cannot mix.
                body = f"body-{marker};".encode() * (1 + index % 40) if index % 3 == 0 else None
                method = "POST" if body is not None else "GET"
                headers = {"X-Vault-Token": "root", "X-Request-Marker": marker}
                connection.request(method, target, body=body, headers=headers)
                if not sockets or sockets[-1] is not connection.sock:
                    sockets.append(connection.sock)
                response = connection.getresponse()
                payload = response.read()
                done += 1
                if response.status != 200:
                    mismatches.append(
                        f"request {index}: status {response.status}: {payload[:200]!r}"
                    )
                    continue
                document = json.loads(payload)
                if f"{document['method']} {document['target']}" != f"{method} {target}":
                    mismatches.append(f"request {index}: echo has {document['target']}")
                if header_values(document, "X-Request-Marker") != [marker]:
                    mismatches.append(f"request {index}: echo has another marker")
                if body_length(document) != len(body or b""):
                    mismatches.append(f"request {index}: echo has another body length")
                if body_sha256(document) != hashlib.sha256(body or b"").hexdigest():
                    mismatches.append(f"request {index}: echo has another body")
        finally:
            connection.close()
        return mismatches, done, len(sockets)

    with ThreadPoolExecutor(max_workers=client_count) as pool:
        futures = [pool.submit(run_client, client_id) for client_id in range(client_count)]
        results = [
            future.result(timeout=max(1.0, deadline - time.monotonic()) + 30) for future in futures
        ]

    mismatches = [message for client_mismatches, _, _ in results for message in client_mismatches]
    completed = sum(done for _, done, _ in results)
    connections_opened = sum(count for _, _, count in results)
    assert completed == request_count
    assert mismatches == [], f"{len(mismatches)} mismatched responses, first: {mismatches[:5]}"
    # Keep-alive works through the tunnel, so each client uses one TLS connection for all its
    # requests.
    assert connections_opened == client_count
    tunnels = wait_for_metric(broker, "taser_tunnels_total", lambda value: value >= client_count)
    assert tunnels == client_count


def test_passthrough_large_download_bounded_memory(harness, tmp_path):
    standin = harness.start_standin(tls=True)
    broker, bridge = start_passthrough_path(harness, standin, env=SMALL_QUARANTINE)
    size = 256 * MIB

    # digest=1 makes the stand-in send the body's SHA-256 in X-Standin-Body-Sha256.
    download = curl_transfer(
        f"https://127.0.0.1:{broker.client_port}/v1/test/bytes?size={size}&digest=1",
        tmp_path,
        vault_ca(harness),
        args=("-H", TOKEN_HEADER),
    )
    broker_peak_kib = vmhwm_kib(broker.pid)
    bridge_peak_kib = vmhwm_kib(bridge.pid)

    assert download.exit_code == 0, download.stderr
    assert download.status == 200
    assert download.body_bytes == size
    assert download.body_sha256 == download.header("X-Standin-Body-Sha256")
    assert broker_peak_kib < MEMORY_LIMIT_KIB, f"broker VmHWM {broker_peak_kib} KiB"
    assert bridge_peak_kib < MEMORY_LIMIT_KIB, f"bridge VmHWM {bridge_peak_kib} KiB"
    down = wait_for_metric(
        broker, "taser_tunnel_bytes_total", lambda value: value > 0, 'direction="down"'
    )
    assert broker_metric(broker, "taser_tunnels_total") == 1
    assert down > size
    assert broker_metric(broker, "taser_tunnel_bytes_total", 'direction="up"') < MIB


# ---------------------------------------------------------------------------------------------
# Half-close: the client ends its sending side and still receives the whole response


def check_half_close_response(received: bytes, closed: bool) -> None:
    response = parse_raw_response(received)
    assert closed, f"tunnel not closed after the response; got {len(received)} bytes"
    assert response.status == 200, received[:300]
    assert response.header("Content-Length") == str(MIB)
    assert len(response.body) == MIB
    assert hashlib.sha256(response.body).hexdigest() == response.header("X-Standin-Body-Sha256")


def test_connect_half_close_delivers_response(harness, standin):
    broker = harness.start_broker(
        plaintext=True, extra_args=["--allow-connect", f"127.0.0.1:{standin.port}"]
    )
    harness.start_bridge(broker, standin, extra_args=["--allow-tunnels"])

    with socket.create_connection(("127.0.0.1", broker.client_port), timeout=10) as sock:
        authority = f"127.0.0.1:{standin.port}"
        sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
        head, early = read_response_head(sock, timeout=10)
        sock.sendall(HALF_CLOSE_REQUEST)
        sock.shutdown(socket.SHUT_WR)
        rest, closed = read_until_closed(sock, timeout=30)

    assert parse_raw_response(head).status == 200, head
    check_half_close_response(early + rest, closed)
    assert [record["target"] for record in standin.records()] == [
        "/v1/test/bytes?size=1048576&digest=1"
    ]
    assert wait_for_metric(broker, "taser_tunnels_total", lambda value: value >= 1) == 1


def test_connect_carries_bytes_sent_with_head(harness, standin):
    # A client may send its first tunnel bytes right behind the CONNECT head, before the 200.
    broker = harness.start_broker(
        plaintext=True, extra_args=["--allow-connect", f"127.0.0.1:{standin.port}"]
    )
    harness.start_bridge(broker, standin, extra_args=["--allow-tunnels"])
    authority = f"127.0.0.1:{standin.port}"
    connect = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode()

    with socket.create_connection(("127.0.0.1", broker.client_port), timeout=10) as sock:
        sock.sendall(connect + HALF_CLOSE_REQUEST)
        head, early = read_response_head(sock, timeout=10)
        rest, closed = read_until_closed(sock, timeout=30)

    assert parse_raw_response(head).status == 200, head
    check_half_close_response(early + rest, closed)
    assert len(standin.records()) == 1


def test_connect_https_edge_passes_vault_close(harness, standin):
    broker = harness.start_broker(
        extra_args=[
            "--allow-connect",
            f"127.0.0.1:{standin.port}",
            "--tunnel-idle-timeout",
            "8s",
        ]
    )
    harness.start_bridge(broker, standin, extra_args=["--allow-tunnels"])
    authority = f"127.0.0.1:{standin.port}"

    with socket.create_connection(("127.0.0.1", broker.client_port), timeout=10) as raw:
        with tls_context(broker.client_ca).wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
            head, early = read_response_head(tls, timeout=10)
            tls.sendall(HALF_CLOSE_REQUEST)
            started = time.monotonic()
            rest, closed = read_until_closed(tls, timeout=15)
            waited = time.monotonic() - started

    assert parse_raw_response(head).status == 200, head
    check_half_close_response(early + rest, closed)
    # The stand-in closes the connection after the body (Connection: close), and the client
    # must get that close too.
    assert waited < 4, f"client saw the end after {waited:.1f} s"


def test_passthrough_half_close_delivers_response(harness, standin):
    broker, _ = start_passthrough_path(harness, standin)

    with socket.create_connection(("127.0.0.1", broker.client_port), timeout=10) as sock:
        sock.sendall(HALF_CLOSE_REQUEST)
        sock.shutdown(socket.SHUT_WR)
        received, closed = read_until_closed(sock, timeout=30)

    check_half_close_response(received, closed)
    assert [record["target"] for record in standin.records()] == [
        "/v1/test/bytes?size=1048576&digest=1"
    ]


# ---------------------------------------------------------------------------------------------
# CONNECT on the http edge


def connect_status(port: int, authority: str) -> tuple[int, bytes]:
    """Send CONNECT AUTHORITY to a plain-HTTP broker and return the status and the whole reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
        received, _ = read_until_closed(sock, timeout=15)
    return parse_raw_response(received).status, received


def test_connect_to_other_authority_403(harness, standin):
    broker = harness.start_broker(
        plaintext=True, extra_args=["--allow-connect", f"127.0.0.1:{standin.port}"]
    )
    harness.start_bridge(broker, standin, extra_args=["--allow-tunnels"])
    # Another port of the same host: only the exact authority of --allow-connect is allowed.
    other_authority = f"127.0.0.1:{standin.port + 1 if standin.port < 65535 else standin.port - 1}"

    status, reply = connect_status(broker.client_port, other_authority)

    response = parse_raw_response(reply)
    assert status == 403, reply
    assert "json" in (response.header("Content-Type") or "")
    assert json.loads(response.body)["errors"]
    assert standin.records() == []
    assert broker_metric(broker, "taser_tunnels_total") == 0


def test_connect_without_allow_connect_403(harness, standin):
    broker = harness.start_broker(plaintext=True)
    harness.start_bridge(broker, standin, extra_args=["--allow-tunnels"])

    status, reply = connect_status(broker.client_port, f"127.0.0.1:{standin.port}")

    assert status == 403, reply
    assert standin.records() == []


def test_connect_bridge_without_allow_tunnels_502(harness, standin):
    broker = harness.start_broker(
        plaintext=True, extra_args=["--allow-connect", f"127.0.0.1:{standin.port}"]
    )
    bridge = harness.start_bridge(broker, standin)

    status, reply = connect_status(broker.client_port, f"127.0.0.1:{standin.port}")

    # The bridge responds 403, which the broker reports as a failed tunnel.
    assert status == 502, reply
    assert bridge.wait_for_event("tunnel_rejected", timeout=5)
    assert standin.records() == []
    assert broker_metric(broker, "taser_tunnels_total") == 0


def test_connect_vault_down_not_200(harness, standin):
    broker = harness.start_broker(
        plaintext=True, extra_args=["--allow-connect", f"127.0.0.1:{standin.port}"]
    )
    bridge = harness.start_bridge(broker, standin, extra_args=["--allow-tunnels"])
    standin.stop()

    status, reply = connect_status(broker.client_port, f"127.0.0.1:{standin.port}")

    # 200 comes only after the bridge reached the vault, which is down.
    assert status in (502, 503), reply
    assert bridge.wait_for_event("vault_unreachable", timeout=5)
    assert broker_metric(broker, "taser_tunnels_total") == 0


# ---------------------------------------------------------------------------------------------
# Both edges on one broker


def test_http_and_passthrough_listeners_together(harness, tmp_path):
    standin = harness.start_standin(tls=True)
    broker = harness.start_broker(extra_args=["--passthrough-listen", "127.0.0.1:0"])
    harness.start_bridge(broker, standin, extra_args=["--allow-tunnels"])
    passthrough_port = broker.passthrough_port()
    passthrough_url = f"https://127.0.0.1:{passthrough_port}"
    passthrough_count = 3

    http_statuses = [
        curl_json(
            f"{broker.url}/v1/test/echo?edge=http", broker.client_ca, args=("-H", TOKEN_HEADER)
        )[0]
        for _ in range(4)
    ]
    passthrough_statuses = [
        curl_json(
            f"{passthrough_url}/v1/test/echo?edge=passthrough",
            vault_ca(harness),
            args=("-H", TOKEN_HEADER),
        )[0]
        for _ in range(passthrough_count - 1)
    ]
    download = curl_transfer(
        f"{passthrough_url}/v1/test/bytes?size={MIB}&digest=1",
        tmp_path,
        vault_ca(harness),
        args=("-H", TOKEN_HEADER),
    )
    down = wait_for_metric(
        broker, "taser_tunnel_bytes_total", lambda value: value > MIB, 'direction="down"'
    )
    # A moment more, so that a wrongly counted http request would show up too.
    time.sleep(0.5)

    assert http_statuses == [200] * 4
    assert passthrough_statuses == [200] * (passthrough_count - 1)
    assert download.status == 200
    assert download.body_sha256 == download.header("X-Standin-Body-Sha256")
    assert broker_metric(broker, "taser_tunnels_total") == passthrough_count
    assert down > MIB
    assert broker_metric(broker, "taser_tunnel_bytes_total", 'direction="up"') < MIB
    targets = [record["target"] for record in standin.records()]
    assert targets.count("/v1/test/echo?edge=http") == 4
    assert targets.count("/v1/test/echo?edge=passthrough") == passthrough_count - 1


# ---------------------------------------------------------------------------------------------
# No bridge


def test_passthrough_without_bridge_closes(harness):
    bridge_wait_s = 2
    broker = harness.start_passthrough_broker(extra_args=["--bridge-wait", f"{bridge_wait_s}s"])

    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", broker.client_port), timeout=10) as sock:
        # The start of a TLS ClientHello, which the broker does not read.
        sock.sendall(b"\x16\x03\x01\x00\x05hello")
        received, closed = read_until_closed(sock, timeout=bridge_wait_s + 10)
    waited = time.monotonic() - started

    assert closed, "connection still open"
    assert received == b""
    assert waited >= bridge_wait_s - 0.2, f"closed after {waited:.2f} s, before --bridge-wait"
    assert waited < bridge_wait_s + 2, f"closed after {waited:.2f} s"
    assert broker.find_events("no_bridge")
    assert broker_metric(broker, "taser_tunnels_total") == 0


def test_passthrough_bridge_without_allow_tunnels_closes(harness, standin):
    broker = harness.start_passthrough_broker(extra_args=["--bridge-wait", "5s"])
    bridge = harness.start_bridge(broker, standin)

    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", broker.client_port), timeout=10) as sock:
        sock.sendall(HALF_CLOSE_REQUEST)
        received, closed = read_until_closed(sock, timeout=10)
    waited = time.monotonic() - started

    assert closed
    assert received == b""
    # A rejected tunnel closes the connection at once, without waiting for another bridge.
    assert waited < 2, f"closed after {waited:.2f} s"
    assert bridge.wait_for_event("tunnel_rejected", timeout=5)
    assert standin.records() == []
    assert broker_metric(broker, "taser_tunnels_total") == 0


# ---------------------------------------------------------------------------------------------
# Secrets in the broker's memory


def run_requests_until(
    stop: threading.Event, port: int, cafile: Path, token: str, secret_value: str
) -> list[int]:
    """Write and read a KV secret over one keep-alive HTTPS connection until STOP is set."""
    statuses = []
    connection = https_connection(port, cafile, timeout=60)
    body = json.dumps({"data": {"value": secret_value}})
    try:
        for index in range(10_000):
            if stop.is_set():
                break
            headers = {"X-Vault-Token": token, "Content-Type": "application/json"}
            connection.request("POST", "/v1/secret/data/e2e/core", body=body, headers=headers)
            response = connection.getresponse()
            response.read()
            statuses.append(response.status)
            connection.request("GET", "/v1/secret/data/e2e/core", headers={"X-Vault-Token": token})
            response = connection.getresponse()
            response.read()
            statuses.append(response.status)
    finally:
        connection.close()
    return statuses


def scan_broker_during_requests(
    broker: Broker, port: int, cafile: Path, token: str, secret_value: str
) -> tuple[dict[bytes, int], list[int]]:
    """Scan the broker's memory while a client sends TOKEN and SECRET_VALUE through it."""
    stop = threading.Event()
    with ThreadPoolExecutor(max_workers=1) as pool:
        load = pool.submit(run_requests_until, stop, port, cafile, token, secret_value)
        # Let some requests through first, so that buffers that held them exist.
        time.sleep(1.5)
        try:
            counts = scan_process_memory(broker.pid, [token.encode(), secret_value.encode()])
        finally:
            stop.set()
        statuses = load.result(timeout=90)
    return counts, statuses


def distinctive_token() -> str:
    return "hvs.CORESCANTOKEN" + uuid.uuid4().hex + uuid.uuid4().hex


def test_passthrough_broker_memory_has_no_secrets(harness):
    token = distinctive_token()
    secret_value = "CORESCANSECRET" + uuid.uuid4().hex
    standin = harness.start_standin(tls=True, token=token)
    broker, _ = start_passthrough_path(harness, standin)

    counts, statuses = scan_broker_during_requests(
        broker, broker.client_port, vault_ca(harness), token, secret_value
    )
    log_text = broker.log_path.read_bytes()

    assert len(statuses) >= 4, statuses
    assert set(statuses) == {200}, statuses
    assert counts[token.encode()] == 0
    assert counts[secret_value.encode()] == 0
    assert token.encode() not in log_text
    assert secret_value.encode() not in log_text


def test_http_broker_memory_has_secrets(harness):
    # The control for the passthrough scan: a broker that terminates TLS does hold the token and
    # the secret, so a scan that finds nothing proves something.
    token = distinctive_token()
    secret_value = "CORESCANSECRET" + uuid.uuid4().hex
    standin = harness.start_standin(token=token)
    broker = harness.start_broker()
    harness.start_bridge(broker, standin)

    counts, statuses = scan_broker_during_requests(
        broker, broker.client_port, broker.client_ca, token, secret_value
    )

    assert len(statuses) >= 4, statuses
    assert set(statuses) == {200}, statuses
    assert counts[token.encode()] > 0
    assert counts[secret_value.encode()] > 0
