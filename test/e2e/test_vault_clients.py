"""End-to-end tests with real Vault clients, and with Vault's own statuses and headers.

hvac (Debian's python3-hvac) and node-vault (npm, installed by `npm ci --prefix
test/e2e/clients`) run the same scenarios through the broker's HTTPS client edge and trust
client-ca.pem, as a pod does through VAULT_CACERT. The other tests check that Vault's redirects,
error statuses and X-Vault-* headers pass through unchanged, that the client edge negotiates
only HTTP/1.1, how long requests may take, and the errors that taser itself returns.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import pytest

from http_clients import (
    curl_transfer,
    echo_headers,
    header_values,
    https_connection,
    tls_context,
)
from taser_harness import SYSTEM_PYTHON

CLIENTS_DIR = Path(__file__).resolve().parent / "clients"
HVAC_SCENARIO = CLIENTS_DIR / "hvac_scenario.py"
NODE_SCENARIO = CLIENTS_DIR / "node_vault_scenario.js"
CLIENTS = ("hvac", "node-vault")
# Each client subprocess does about a dozen requests, so this is a deadline, not a budget.
CLIENT_TIMEOUT = 90

TOKEN_HEADER = "X-Vault-Token: root"
# The address that a standby names in its redirects. Pods behind a broker cannot reach such an
# address, and no test may send traffic there. The .test top-level domain is reserved for
# testing (RFC 6761) and is not delegated in the public DNS.
STANDBY_ADDRESS = "https://vault-2.example.test:8200"
# The namespace that the client scenarios send in X-Vault-Namespace.
NAMESPACE = "team-a/"
# Header names that a forwarding proxy would add. taser adds none of them.
PROXY_HEADERS = ("X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host", "Forwarded", "Via")
PROXY_VARIABLES = (
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "ALL_PROXY",
    "all_proxy",
)

SOCKET_TIMEOUT = 30.0
MAX_RAW_HEADER_BYTES = 64 << 10


# -----------------------------------------------------------------------------------------------
# Helpers


def client_env(broker) -> dict[str, str]:
    """Return the environment of a client subprocess: a pod's VAULT_* settings and no proxy."""
    env = {key: value for key, value in os.environ.items() if key not in PROXY_VARIABLES}
    env.update(
        {
            "VAULT_ADDR": broker.url,
            "VAULT_CACERT": str(broker.client_ca),
            "VAULT_TOKEN": "root",
            "NO_PROXY": "127.0.0.1,localhost,::1",
            "no_proxy": "127.0.0.1,localhost,::1",
        }
    )
    return env


def node_binary() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node not found on PATH. The node-vault tests need Node.js 18 or later.")
    if not (CLIENTS_DIR / "node_modules" / "node-vault").is_dir():
        pytest.fail(
            f"node-vault is not installed in {CLIENTS_DIR}. "
            "Run `npm ci --prefix test/e2e/clients` to install it from package-lock.json."
        )
    return node


def run_client(client: str, scenario: str, broker, secret_path: str) -> dict[str, Any]:
    """Run SCENARIO of the client's scenario script against BROKER and return its JSON output."""
    if client == "hvac":
        argv = [SYSTEM_PYTHON, str(HVAC_SCENARIO), scenario, secret_path]
    else:
        argv = [node_binary(), str(NODE_SCENARIO), scenario, secret_path]
    completed = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT,
        env=client_env(broker),
        cwd=CLIENTS_DIR,
    )
    assert completed.returncode == 0, f"{client} {scenario} failed:\n{completed.stderr}"
    return json.loads(completed.stdout)


def request_pairs(standin) -> list[tuple[str, str]]:
    """Return (method, path without query) of every request the stand-in recorded, in order."""
    return [(record["method"], record["target"].partition("?")[0]) for record in standin.records()]


def records_for(standin, target: str) -> list[dict[str, Any]]:
    return [record for record in standin.records() if record["target"] == target]


def exchange(
    port: int,
    cafile: Optional[Path],
    method: str,
    target: str,
    headers: tuple[tuple[str, str], ...] = (),
    body: Optional[bytes] = None,
) -> tuple[int, list[tuple[str, str]], bytes]:
    """Send one request over HTTPS (with CAFILE) or plain HTTP, return (status, headers, body).

    The header list keeps duplicates and their order.
    """
    if cafile is None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=SOCKET_TIMEOUT)
    else:
        connection = https_connection(port, cafile, timeout=SOCKET_TIMEOUT)
    try:
        connection.putrequest(method, target, skip_accept_encoding=True)
        for name, value in headers:
            connection.putheader(name, value)
        if body is None:
            connection.endheaders()
        else:
            connection.putheader("Content-Length", str(len(body)))
            connection.endheaders(body)
        response = connection.getresponse()
        return response.status, response.getheaders(), response.read()
    finally:
        connection.close()


def values_of(headers: list[tuple[str, str]], name: str) -> list[str]:
    return [value for key, value in headers if key.lower() == name.lower()]


def read_raw_response(tls_socket: ssl.SSLSocket, buffered: bytearray) -> tuple[bytes, bytes]:
    """Read one response with a Content-Length body from TLS_SOCKET, return (head, body).

    BUFFERED contains the bytes read past the previous response and receives those past this one.
    The head is returned byte for byte, status line included, without the blank line.
    """
    while b"\r\n\r\n" not in buffered:
        assert len(buffered) < MAX_RAW_HEADER_BYTES, "response head too large"
        data = tls_socket.recv(16384)
        assert data, f"connection closed before a whole response head: {bytes(buffered)!r}"
        buffered += data
    end = buffered.index(b"\r\n\r\n")
    head = bytes(buffered[:end])
    del buffered[: end + 4]
    lengths = [
        line.split(b":", 1)[1].strip()
        for line in head.split(b"\r\n")[1:]
        if line.lower().startswith(b"content-length:")
    ]
    assert len(lengths) == 1, f"expected one Content-Length in {head!r}"
    length = int(lengths[0])
    while len(buffered) < length:
        data = tls_socket.recv(16384)
        assert data, "connection closed inside the response body"
        buffered += data
    body = bytes(buffered[:length])
    del buffered[:length]
    return head, body


def status_of(head: bytes) -> int:
    return int(head.split(b" ", 2)[1])


def without_server_time(document: Any) -> Any:
    """Drop sys/health's server_time_utc, which changes every second, from a JSON document."""
    if isinstance(document, dict):
        return {key: value for key, value in document.items() if key != "server_time_utc"}
    return document


def index_counter(value: str) -> int:
    """Return N of a stand-in X-Vault-Index value, which is base64 of "v1:standin:N:N"."""
    return int(base64.b64decode(value).decode().split(":")[2])


def assert_taser_error(headers: list[tuple[str, str]], body: bytes) -> list[str]:
    """Check that a response is an error in Vault's JSON shape and return its messages."""
    assert "application/json" in (values_of(headers, "Content-Type") or [""])[0], headers
    errors = json.loads(body)["errors"]
    assert isinstance(errors, list), body
    assert errors, body
    assert all(isinstance(message, str) and message for message in errors), body
    return errors


# -----------------------------------------------------------------------------------------------
# Real clients: the same scenario with hvac and node-vault


# What each client surfaces when reading a KV v2 secret whose latest version was deleted (404).
READ_AFTER_DELETE = {"hvac": "InvalidPath", "node-vault": 404}


@pytest.mark.parametrize("client", CLIENTS)
def test_client_kv_scenario_through_broker(tunnel, client):
    folder = f"e2e/{client}"
    path = f"{folder}/app"

    output = run_client(client, "kv", tunnel.broker, path)

    assert output["health"] == {"initialized": True, "sealed": False, "standby": False}
    assert output["write_version"] == 1
    secret = output["read_data"]
    assert secret["username"] == "app"
    assert secret["password"].startswith("s3cr3t-from-")
    assert output["list_leaf"] in output["list_keys"]
    assert output["metadata_current_version"] == 1
    assert output["metadata_versions"] == ["1"]
    assert output["lookup_self"] == {"id": "root", "policies": ["root"]}
    assert output["namespace_echo"] == [NAMESPACE]
    assert output["wrap_info"] == {
        "ttl": 60,
        "creation_path": f"secret/data/{path}",
        "has_token": True,
        "data": None,
    }
    assert output["unwrapped_data"] == secret
    assert output["delete_status"] == 204
    assert output["read_after_delete"] == READ_AFTER_DELETE[client]

    # One request per client call, in order: taser neither drops, repeats nor adds requests.
    assert request_pairs(tunnel.standin) == [
        ("GET", "/v1/sys/health"),
        ("POST", f"/v1/secret/data/{path}"),
        ("GET", f"/v1/secret/data/{path}"),
        ("LIST", f"/v1/secret/metadata/{folder}"),
        ("GET", f"/v1/secret/metadata/{path}"),
        ("GET", "/v1/auth/token/lookup-self"),
        ("GET", "/v1/test/echo"),
        ("GET", f"/v1/secret/data/{path}"),
        ("POST", "/v1/sys/wrapping/unwrap"),
        ("DELETE", f"/v1/secret/data/{path}"),
        ("GET", f"/v1/secret/data/{path}"),
    ]
    records = tunnel.standin.records()
    health_query = records[0]["target"].partition("?")[2]
    assert health_query.lower() == "standbyok=true"
    echo_record = records[6]
    assert header_values(echo_record, "X-Vault-Namespace") == [NAMESPACE]
    for record in records[:6] + records[7:]:
        assert header_values(record, "X-Vault-Namespace") == [], record["target"]
    wrapped_record = records[7]
    assert header_values(wrapped_record, "X-Vault-Wrap-TTL") == ["60s"]
    for record in records:
        assert header_values(record, "X-Vault-Token") == ["root"], record["target"]
        for name in PROXY_HEADERS:
            assert header_values(record, name) == [], f"{name} added to {record['target']}"


# -----------------------------------------------------------------------------------------------
# Standby redirects: passed to the client unchanged, never followed


def test_curl_gets_standby_redirect_unchanged(tunnel, tmp_path):
    tunnel.standin.set_modes(standby_redirect=STANDBY_ADDRESS)
    target = "/v1/secret/data/app/config?version=2"

    # No -L: curl reports the redirect instead of following it.
    result = curl_transfer(
        f"{tunnel.url}{target}", tmp_path, tunnel.client_ca, args=("-H", TOKEN_HEADER)
    )

    assert result.exit_code == 0, result.stderr
    assert result.status == 307
    assert result.header("Location") == STANDBY_ADDRESS + target
    assert result.header("Content-Length") == "0"
    assert result.body_bytes == 0
    assert [record["target"] for record in tunnel.standin.records()] == [target]


def test_redirect_keeps_connection_and_sends_body_once(tunnel):
    tunnel.standin.set_modes(standby_redirect=STANDBY_ADDRESS)
    target = "/v1/secret/data/app/config"
    body = json.dumps({"data": {"password": "must-not-be-replayed"}}).encode()
    put_request = (
        f"PUT {target} HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{tunnel.broker.client_port}\r\n"
        "X-Vault-Token: root\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "\r\n"
    ).encode() + body
    echo_request = (
        "GET /v1/test/echo?after=redirect HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{tunnel.broker.client_port}\r\n"
        "X-Vault-Token: root\r\n"
        "\r\n"
    ).encode()
    context = tls_context(tunnel.client_ca)
    buffered = bytearray()

    with socket.create_connection(
        ("127.0.0.1", tunnel.broker.client_port), timeout=SOCKET_TIMEOUT
    ) as raw_socket:
        with context.wrap_socket(raw_socket, server_hostname="127.0.0.1") as tls_socket:
            tls_socket.sendall(put_request)
            redirect_head, redirect_body = read_raw_response(tls_socket, buffered)
            tunnel.standin.set_modes(standby_redirect=None)
            # The same connection carries the next request.
            tls_socket.sendall(echo_request)
            echo_head, echo_body = read_raw_response(tls_socket, buffered)

    assert status_of(redirect_head) == 307, redirect_head
    redirect_lines = redirect_head.split(b"\r\n")[1:]
    assert f"Location: {STANDBY_ADDRESS}{target}".encode() in redirect_lines
    assert b"connection: close" not in redirect_head.lower()
    assert redirect_body == b""
    assert status_of(echo_head) == 200, echo_head
    assert json.loads(echo_body)["target"] == "/v1/test/echo?after=redirect"
    put_records = [record for record in tunnel.standin.records() if record["method"] == "PUT"]
    assert len(put_records) == 1
    assert put_records[0]["body_length"] == len(body)
    assert put_records[0]["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert [record["target"] for record in tunnel.standin.records()] == [
        target,
        "/v1/test/echo?after=redirect",
    ]


# What each client returns for a 307 when it is set not to follow redirects. hvac returns the
# requests.Response of any status other than 200, and it raises only for 400 and above.
# node-vault rejects every status other than 200 and 204 with an ApiResponseError, except on
# sys/health, where it resolves with the body.
EXPECTED_REDIRECT_OUTCOMES = {
    "hvac": {
        "health": {"outcome": "response", "status": 429},
        "read": {"outcome": "response", "status": 307},
        "write": {"outcome": "response", "status": 307},
    },
    "node-vault": {
        "health": {"outcome": "value"},
        "read": {"outcome": "error", "error": "ApiResponseError", "status": 307},
        "write": {"outcome": "error", "error": "ApiResponseError", "status": 307},
    },
}


@pytest.mark.parametrize("client", CLIENTS)
def test_client_sees_standby_redirect(tunnel, client):
    tunnel.standin.set_modes(standby_redirect=STANDBY_ADDRESS)
    path = f"e2e/{client}/standby"

    output = run_client(client, "redirect", tunnel.broker, path)

    healthy = output["health_standbyok"]
    assert healthy["outcome"] == "value", healthy
    assert healthy["value"]["standby"] is True
    for step, expected in EXPECTED_REDIRECT_OUTCOMES[client].items():
        outcome = output[step]
        assert {key: outcome.get(key) for key in expected} == expected, f"{step}: {outcome}"
    if client == "hvac":
        for step in ("read", "write"):
            assert output[step]["location"] == f"{STANDBY_ADDRESS}/v1/secret/data/{path}", step
    # Each call reached the stand-in once. A client that followed the redirect would have
    # reported a connection error or another status, not the 307.
    assert request_pairs(tunnel.standin) == [
        ("GET", "/v1/sys/health"),
        ("GET", "/v1/sys/health"),
        ("GET", f"/v1/secret/data/{path}"),
        ("POST", f"/v1/secret/data/{path}"),
    ]


# -----------------------------------------------------------------------------------------------
# Vault's statuses and X-Vault-* headers pass through unchanged


@pytest.mark.parametrize(
    ("modes", "target", "status"),
    [
        ({"index_required": True}, "/v1/secret/data/app", 412),
        ({"rate_limited": True}, "/v1/secret/data/app", 429),
        ({"sealed": True}, "/v1/secret/data/app", 503),
        # A performance standby returns 473 from sys/health. The stand-in has no performance
        # standby, but Vault's activecode parameter makes it send the same status.
        ({}, "/v1/sys/health?activecode=473", 473),
    ],
    ids=["412-index-required", "429-rate-limited", "503-sealed", "473-perf-standby"],
)
def test_vault_status_passes_unchanged(tunnel, modes, target, status):
    if modes:
        tunnel.standin.set_modes(**modes)
    token = (("X-Vault-Token", "root"),)

    direct = exchange(tunnel.standin.port, None, "GET", target, token)
    tunneled = exchange(tunnel.broker.client_port, tunnel.client_ca, "GET", target, token)

    direct_status, direct_headers, direct_body = direct
    tunneled_status, tunneled_headers, tunneled_body = tunneled
    assert direct_status == status, direct_body
    assert tunneled_status == status, tunneled_body
    assert without_server_time(json.loads(tunneled_body)) == without_server_time(
        json.loads(direct_body)
    )
    for name in ("Content-Type", "Cache-Control", "Retry-After"):
        assert values_of(tunneled_headers, name) == values_of(direct_headers, name), name
    if status == 429:
        assert values_of(tunneled_headers, "Retry-After") == ["7"]
    if status == 503:
        assert json.loads(tunneled_body) == {"errors": ["Vault is sealed"]}


def test_index_required_until_index_matches(tunnel):
    tunnel.standin.set_modes(index_required=True)
    port, cafile = tunnel.broker.client_port, tunnel.client_ca
    token = ("X-Vault-Token", "root")
    target = "/v1/secret/data/consistency"
    write_body = json.dumps({"data": {"color": "blue"}}).encode()

    stale_status, _, stale_body = exchange(port, cafile, "GET", target, (token,))
    write_status, write_headers, write_response = exchange(
        port, cafile, "POST", target, (token,), write_body
    )
    index_values = values_of(write_headers, "X-Vault-Index")
    assert len(index_values) == 1, write_headers
    read_status, _, read_body = exchange(
        port, cafile, "GET", target, (token, ("X-Vault-Index", index_values[0]))
    )

    assert stale_status == 412, stale_body
    assert json.loads(stale_body) == {"errors": ["required index state not present"]}
    assert write_status == 200, write_response
    assert read_status == 200, read_body
    assert json.loads(read_body)["data"]["data"] == {"color": "blue"}


def test_repeated_index_response_headers_keep_order(tunnel):
    tunnel.standin.set_modes(repeat_index=True)

    status, headers, body = exchange(
        tunnel.broker.client_port,
        tunnel.client_ca,
        "GET",
        "/v1/auth/token/lookup-self",
        (("X-Vault-Token", "root"),),
    )

    assert status == 200, body
    values = values_of(headers, "X-Vault-Index")
    assert len(values) == 2, headers
    # The stand-in sends the lower counter first.
    assert index_counter(values[0]) < index_counter(values[1])


def vault_headers_of_echo(body: bytes) -> list[tuple[str, str]]:
    """Return the X-Vault-* header pairs that /v1/test/echo received, in received order."""
    return [
        (name, value)
        for name, value in echo_headers(json.loads(body))
        if name.lower().startswith("x-vault-")
    ]


def test_vault_request_headers_arrive_in_order(tunnel):
    sent = (
        ("X-Vault-Token", "root"),
        ("X-Vault-Index", "dmVyc2lvbi0x"),
        ("X-Vault-Index", "dmVyc2lvbi0y"),
        ("X-Vault-Inconsistent", "forward-active-node"),
        ("X-Vault-Forward", "active-node"),
        ("X-Vault-Request", "true"),
    )

    status, _, body = exchange(
        tunnel.broker.client_port, tunnel.client_ca, "GET", "/v1/test/echo", sent
    )

    assert status == 200, body
    assert vault_headers_of_echo(body) == list(sent)
    for name in PROXY_HEADERS:
        assert header_values(json.loads(body), name) == [], name


def test_client_forwarded_for_passes_as_sent(tunnel):
    # taser neither adds X-Forwarded-For nor appends to one that a pod sends, so the vault must
    # not trust the field from the bridge's address (x_forwarded_for_authorized_addrs).
    sent = (("X-Vault-Token", "root"), ("X-Forwarded-For", "203.0.113.7"))

    status, _, body = exchange(
        tunnel.broker.client_port, tunnel.client_ca, "GET", "/v1/test/echo", sent
    )

    assert status == 200, body
    assert header_values(json.loads(body), "X-Forwarded-For") == ["203.0.113.7"]


def test_interleaved_index_headers_keep_their_order(tunnel):
    # NOTE: the broker parses requests with Boost.Beast, whose field list inserts a repeated
    # name after the last field of that name. Interleaved names therefore arrive grouped:
    # Index 1, Index 2, Inconsistent. RFC 9110 section 5.3 makes only the order of fields with
    # the same name significant, and Vault (Go net/http) keeps only that order too.
    sent = (
        ("X-Vault-Token", "root"),
        ("X-Vault-Index", "dmVyc2lvbi0x"),
        ("X-Vault-Inconsistent", "forward-active-node"),
        ("X-Vault-Index", "dmVyc2lvbi0y"),
        ("X-Vault-Forward", "active-node"),
    )

    status, _, body = exchange(
        tunnel.broker.client_port, tunnel.client_ca, "GET", "/v1/test/echo", sent
    )

    assert status == 200, body
    received = vault_headers_of_echo(body)
    assert sorted(received) == sorted(sent)
    for name in ("X-Vault-Index", "X-Vault-Inconsistent", "X-Vault-Forward"):
        expected = [value for key, value in sent if key == name]
        assert [value for key, value in received if key == name] == expected, name


# -----------------------------------------------------------------------------------------------
# ALPN on the client edge: HTTP/1.1 only


def test_curl_http2_negotiates_http11(tunnel):
    completed = subprocess.run(
        [
            "curl",
            "-sS",
            "--max-time",
            "20",
            "--http2",
            "--cacert",
            str(tunnel.client_ca),
            "-H",
            TOKEN_HEADER,
            "--output",
            "/dev/null",
            "--write-out",
            "%{http_version} %{http_code}",
            f"{tunnel.url}/v1/sys/health",
        ],
        capture_output=True,
        text=True,
        timeout=40,
    )

    assert completed.returncode == 0, completed.stderr
    assert completed.stdout == "1.1 200"


@pytest.mark.parametrize(
    ("offered", "expected_line"),
    [("h2,http/1.1", "ALPN protocol: http/1.1"), ("h2", "No ALPN negotiated")],
)
def test_openssl_alpn_offers_only_http11(tunnel, offered, expected_line):
    completed = subprocess.run(
        [
            "openssl",
            "s_client",
            "-alpn",
            offered,
            "-connect",
            f"127.0.0.1:{tunnel.broker.client_port}",
            "-CAfile",
            str(tunnel.client_ca),
            "-verify_return_error",
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert completed.returncode == 0, completed.stderr
    assert expected_line in completed.stdout.splitlines(), completed.stdout[-2000:]


# -----------------------------------------------------------------------------------------------
# Timeouts and streaming

LONG_POLL_SECONDS = 90


@pytest.mark.slow
def test_long_poll_90s_with_default_timeouts(tunnel, tmp_path):
    # The broker's and the bridge's default request timeout is 120 s, and their idle timeouts
    # must not end a request whose response head is still on its way.
    started = time.monotonic()
    result = curl_transfer(
        f"{tunnel.url}/v1/test/longpoll?s={LONG_POLL_SECONDS}",
        tmp_path,
        tunnel.client_ca,
        args=("-H", TOKEN_HEADER),
        timeout=LONG_POLL_SECONDS + 60,
    )
    elapsed = time.monotonic() - started

    assert result.exit_code == 0, result.stderr
    assert result.status == 200
    assert result.json() == {"waited_s": LONG_POLL_SECONDS}
    assert elapsed >= LONG_POLL_SECONDS


def test_request_timeout_returns_504(harness, standin, tmp_path):
    broker = harness.start_broker(extra_args=["--request-timeout", "3s"])
    harness.start_bridge(broker, standin)

    started = time.monotonic()
    result = curl_transfer(
        f"{broker.url}/v1/test/longpoll?s=6",
        tmp_path,
        broker.client_ca,
        args=("-H", TOKEN_HEADER),
        timeout=30,
    )
    elapsed = time.monotonic() - started

    assert result.exit_code == 0, result.stderr
    assert result.status == 504
    assert_taser_error(result.headers, result.body_prefix)
    assert result.header("Retry-After") is None
    assert 2.5 <= elapsed < 6, f"504 after {elapsed:.1f} s with --request-timeout 3s"
    assert [record["target"] for record in standin.records()] == ["/v1/test/longpoll?s=6"]


STREAM_CHUNKS = 6
STREAM_INTERVAL_MS = 400


def read_stream_lines(tunnel) -> tuple[Any, list[bytes], list[float], bytes]:
    """GET /v1/test/stream through the broker; return (response, lines, arrival times, rest)."""
    connection = https_connection(tunnel.broker.client_port, tunnel.client_ca)
    arrivals = []
    lines = []
    try:
        connection.request(
            "GET",
            f"/v1/test/stream?chunks={STREAM_CHUNKS}&ms={STREAM_INTERVAL_MS}",
            headers={"X-Vault-Token": "root"},
        )
        response = connection.getresponse()
        for _ in range(STREAM_CHUNKS + 1):
            line = response.readline()
            if not line:
                break
            arrivals.append(time.monotonic())
            lines.append(line)
        rest = response.read()
    finally:
        connection.close()
    return response, lines, arrivals, rest


def test_stream_chunks_pass_intact(tunnel):
    response, lines, _, rest = read_stream_lines(tunnel)

    assert response.status == 200
    assert response.chunked
    assert response.getheader("Content-Type") == "application/x-ndjson"
    assert lines == [b'{"chunk":%d}\n' % index for index in range(STREAM_CHUNKS)]
    assert rest == b""


def test_stream_chunks_arrive_as_sent(tunnel):
    response, lines, arrivals, _ = read_stream_lines(tunnel)

    assert response.status == 200
    assert len(lines) == STREAM_CHUNKS
    # Each chunk reaches the client when the stand-in sends it, not all of them at the end:
    # the first and the last are about (STREAM_CHUNKS - 1) * STREAM_INTERVAL_MS apart.
    spread = arrivals[-1] - arrivals[0]
    minimum = 0.6 * (STREAM_CHUNKS - 1) * STREAM_INTERVAL_MS / 1000
    assert spread >= minimum, f"first and last chunk {spread:.2f} s apart"


# -----------------------------------------------------------------------------------------------
# Errors that taser itself returns


def test_no_bridge_returns_503_with_retry_after(harness, tmp_path):
    broker = harness.start_broker(extra_args=["--bridge-wait", "1s"])

    result = curl_transfer(
        f"{broker.url}/v1/secret/data/app", tmp_path, broker.client_ca, args=("-H", TOKEN_HEADER)
    )

    assert result.exit_code == 0, result.stderr
    assert result.status == 503
    assert result.header("Retry-After") == "1"
    assert_taser_error(result.headers, result.body_prefix)


def test_bridge_lost_mid_request_returns_502(harness, standin, tmp_path):
    broker = harness.start_broker()
    bridge = harness.start_bridge(broker, standin)
    target = "/v1/test/delay?ms=3000"

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(
            curl_transfer,
            f"{broker.url}{target}",
            tmp_path,
            broker.client_ca,
            ("-H", TOKEN_HEADER),
            30,
        )
        # The request is in flight once the stand-in has recorded it.
        standin.wait_until(
            lambda: records_for(standin, target), 10, "the delayed request at the stand-in"
        )
        os.kill(bridge.pid, signal.SIGKILL)
        result = pending.result(timeout=60)
    bridge.stop()

    assert result.exit_code == 0, result.stderr
    assert result.status == 502
    messages = assert_taser_error(result.headers, result.body_prefix)
    assert result.header("Retry-After") is None
    assert any("tunnel" in message for message in messages), messages
    assert len(records_for(standin, target)) == 1


def test_vault_unreachable_returns_503_with_retry_after(harness, standin, broker, tmp_path):
    harness.start_bridge(broker, standin)
    # The stand-in's port is free once it stopped, so the bridge's connect is refused.
    standin.stop()

    result = curl_transfer(
        f"{broker.url}/v1/secret/data/app", tmp_path, broker.client_ca, args=("-H", TOKEN_HEADER)
    )

    assert result.exit_code == 0, result.stderr
    assert result.status == 503
    assert result.header("Retry-After") == "1"
    messages = assert_taser_error(result.headers, result.body_prefix)
    assert any("cannot reach the vault" in message for message in messages), messages
