"""Self-test of the Vault API stand-in: starts it on a free port and checks its behaviours.

Run with `/usr/bin/python3 -m pytest test/vault_standin -q`. Needs Debian's python3-hvac.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import json
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import hvac
import pytest
import requests

STANDIN = Path(__file__).with_name("vault_standin.py")
START_TIMEOUT_S = 10
HTTP_TIMEOUT_S = 10


@contextlib.contextmanager
def running_standin(work_dir: Path, *args: str):
    """Start the stand-in with port 0 and yield (process, port, record path)."""
    ready_file = work_dir / "ready"
    record_file = work_dir / "record.jsonl"
    ready_file.unlink(missing_ok=True)
    command = [sys.executable, str(STANDIN), "--ready-file", str(ready_file)]
    command += ["--record", str(record_file), "--log-level", "WARNING", *args]
    if "--listen" not in args:
        command += ["--listen", "127.0.0.1:0"]
    process = subprocess.Popen(command)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready_file.exists():
            if process.poll() is not None:
                raise RuntimeError(f"stand-in exited with status {process.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"stand-in did not write {ready_file} in {START_TIMEOUT_S} s")
            time.sleep(0.02)
        yield process, int(ready_file.read_text()), record_file
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    with running_standin(tmp_path_factory.mktemp("standin")) as (process, port, record):
        yield port, record


@pytest.fixture(autouse=True)
def reset_standin(request):
    if "standin" in request.fixturenames:
        port, _ = request.getfixturevalue("standin")
        status, _, _ = send(port, "POST", "/_standin/reset")
        assert status == 204


def send(port, method, target, headers=(), body=None, host="127.0.0.1", connection=None):
    """Send one request and return (status, header pairs, body bytes)."""
    own_connection = connection is None
    if own_connection:
        connection = http.client.HTTPConnection(host, port, timeout=HTTP_TIMEOUT_S)
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
        if own_connection:
            connection.close()


def header_values(pairs, name):
    return [value for key, value in pairs if key.lower() == name.lower()]


def set_modes(port, **modes):
    status, _, body = send(port, "POST", "/_standin/mode", body=json.dumps(modes).encode())
    assert status == 200, body
    return json.loads(body)


def expected_pattern(size: int) -> bytes:
    return bytes((i + i // 65521) % 251 for i in range(size))


ROOT = [("X-Vault-Token", "root")]


def vault_client(port, token="root"):
    session = requests.Session()
    session.trust_env = False  # never send test traffic through a proxy from the environment
    return hvac.Client(url=f"http://127.0.0.1:{port}", token=token, session=session)


# --- sys/health and tokens ------------------------------------------------------------------


def test_health_get_and_head(standin):
    port, _ = standin
    status, headers, body = send(port, "GET", "/v1/sys/health")
    health = json.loads(body)
    assert status == 200
    assert header_values(headers, "Content-Type") == ["application/json"]
    assert health["initialized"] is True
    assert health["sealed"] is False
    assert health["standby"] is False
    assert health["version"]

    status, headers, body = send(port, "HEAD", "/v1/sys/health")
    assert status == 200
    assert body == b""

    health = vault_client(port).sys.read_health_status(method="GET")
    assert health["initialized"] is True


def test_health_sealed_and_standby_codes(standin):
    port, _ = standin
    set_modes(port, sealed=True)
    status, _, body = send(port, "GET", "/v1/sys/health")
    assert status == 503
    assert json.loads(body)["sealed"] is True
    status, _, _ = send(port, "GET", "/v1/sys/health?sealedcode=200")
    assert status == 200

    set_modes(port, sealed=False, standby_redirect="http://127.0.0.1:1")
    status, _, body = send(port, "GET", "/v1/sys/health")
    assert status == 429
    assert json.loads(body)["standby"] is True
    status, _, _ = send(port, "GET", "/v1/sys/health?standbyok=true")
    assert status == 200
    status, _, _ = send(port, "GET", "/v1/sys/health?standbycode=abc")
    assert status == 400


def test_token_missing_or_wrong_is_denied(standin):
    port, _ = standin
    for headers in ([], [("X-Vault-Token", "wrong")]):
        status, pairs, body = send(port, "GET", "/v1/auth/token/lookup-self", headers)
        assert status == 403
        assert header_values(pairs, "Content-Type") == ["application/json"]
        assert json.loads(body) == {"errors": ["permission denied"]}
    status, _, _ = send(port, "GET", "/v1/test/echo", [("Authorization", "Bearer root")])
    assert status == 200
    assert vault_client(port, token="wrong").is_authenticated() is False
    assert vault_client(port).is_authenticated() is True


# --- KV version 2 ---------------------------------------------------------------------------


def test_kv_roundtrip_with_hvac(standin):
    port, _ = standin
    kv = vault_client(port).secrets.kv.v2
    first = kv.create_or_update_secret(path="app/db", secret={"password": "one"})
    second = kv.create_or_update_secret(path="app/db", secret={"password": "two"})
    kv.create_or_update_secret(path="app/nested/key", secret={"x": "y"})
    assert first["data"]["version"] == 1
    assert second["data"]["version"] == 2

    latest = kv.read_secret_version(path="app/db")
    assert latest["data"]["data"] == {"password": "two"}
    assert latest["data"]["metadata"]["version"] == 2
    assert latest["lease_id"] == ""
    assert latest["wrap_info"] is None
    older = kv.read_secret_version(path="app/db", version=1)
    assert older["data"]["data"] == {"password": "one"}

    assert kv.list_secrets(path="app")["data"]["keys"] == ["db", "nested/"]
    metadata = kv.read_secret_metadata(path="app/db")["data"]
    assert metadata["current_version"] == 2
    assert sorted(metadata["versions"]) == ["1", "2"]

    kv.delete_latest_version_of_secret(path="app/db")
    with pytest.raises(hvac.exceptions.InvalidPath):
        kv.read_secret_version(path="app/db")
    assert kv.read_secret_version(path="app/db", version=1)["data"]["data"]["password"] == "one"

    kv.delete_metadata_and_all_versions(path="app/db")
    kv.delete_metadata_and_all_versions(path="app/nested/key")
    with pytest.raises(hvac.exceptions.InvalidPath):
        kv.list_secrets(path="app")


def test_kv_raw_responses(standin):
    port, _ = standin
    status, headers, body = send(port, "GET", "/v1/secret/data/missing", ROOT)
    assert status == 404
    assert json.loads(body) == {"errors": []}
    assert header_values(headers, "Content-Type") == ["application/json"]
    status, _, body = send(port, "GET", "/v1/no/such/path", ROOT)
    assert status == 404
    assert json.loads(body) == {"errors": []}
    status, _, body = send(port, "LIST", "/v1/secret/metadata/", ROOT)
    assert status == 404
    assert json.loads(body) == {"errors": []}

    write = json.dumps({"data": {"k": "v"}, "options": {}}).encode()
    status, _, _ = send(port, "PUT", "/v1/secret/data/a/b", ROOT, write)
    assert status == 200
    list_requests = (("LIST", "/v1/secret/metadata/a"), ("GET", "/v1/secret/metadata/a?list=true"))
    for method, target in list_requests:
        status, _, body = send(port, method, target, ROOT)
        assert status == 200
        assert json.loads(body)["data"]["keys"] == ["b"]

    stale = json.dumps({"data": {"k": "w"}, "options": {"cas": 0}}).encode()
    status, _, body = send(port, "POST", "/v1/secret/data/a/b", ROOT, stale)
    assert status == 400
    assert "check-and-set" in json.loads(body)["errors"][0]
    status, _, _ = send(port, "POST", "/v1/secret/data/a/b", ROOT, b"{not json")
    assert status == 400
    status, _, body = send(port, "DELETE", "/v1/secret/data/a/b", ROOT)
    assert status == 204
    assert body == b""
    status, _, _ = send(port, "DELETE", "/v1/secret/metadata/a/b", ROOT)
    assert status == 204


# --- auth and response wrapping -------------------------------------------------------------


def test_approle_login_and_lookup_self(standin):
    port, _ = standin
    client = vault_client(port, token=None)
    login = client.auth.approle.login(role_id="role", secret_id="secret")
    token = login["auth"]["client_token"]
    assert token
    assert client.token == token
    lookup = client.lookup_token()
    assert lookup["data"]["id"] == token
    assert lookup["data"]["policies"] == ["default"]
    assert vault_client(port).lookup_token()["data"]["policies"] == ["root"]

    credentials = json.dumps({"role_id": "role", "secret_id": "secret"}).encode()
    status, headers, _ = send(port, "POST", "/v1/auth/approle/login", body=credentials)
    assert status == 200
    assert len(header_values(headers, "X-Vault-Index")) == 1
    status, _, body = send(port, "POST", "/v1/auth/approle/login", body=b"{}")
    assert status == 400
    assert json.loads(body) == {"errors": ["missing role_id"]}


def test_response_wrapping_and_unwrap(standin):
    port, _ = standin
    vault_client(port).secrets.kv.v2.create_or_update_secret(path="w", secret={"s": "1"})
    wrap_request = ROOT + [("X-Vault-Wrap-TTL", "60s")]
    status, _, body = send(port, "GET", "/v1/secret/data/w", wrap_request)
    wrapped = json.loads(body)
    assert status == 200
    assert wrapped["data"] is None
    assert wrapped["wrap_info"]["ttl"] == 60
    assert wrapped["wrap_info"]["creation_path"] == "secret/data/w"
    assert wrapped["wrap_info"]["creation_time"]

    unwrapped = vault_client(port, token=wrapped["wrap_info"]["token"]).sys.unwrap()
    assert unwrapped["data"]["data"] == {"s": "1"}
    used_token = [("X-Vault-Token", wrapped["wrap_info"]["token"])]
    status, _, body = send(port, "POST", "/v1/sys/wrapping/unwrap", used_token)
    assert status == 400
    assert json.loads(body) == {"errors": ["wrapping token is not valid or does not exist"]}

    status, _, body = send(port, "GET", "/v1/secret/data/w", wrap_request)
    token = json.loads(body)["wrap_info"]["token"]
    assert vault_client(port).sys.unwrap(token=token)["data"]["data"] == {"s": "1"}
    status, _, _ = send(port, "GET", "/v1/secret/data/w", ROOT + [("X-Vault-Wrap-TTL", "soon")])
    assert status == 400


# --- test-only endpoints --------------------------------------------------------------------


def test_bytes_fixed_chunked_and_head(standin):
    port, _ = standin
    size = 300_007
    expected = expected_pattern(size)
    digest = hashlib.sha256(expected).hexdigest()
    status, headers, body = send(port, "GET", f"/v1/test/bytes?size={size}&digest=1", ROOT)
    assert status == 200
    assert header_values(headers, "Content-Length") == [str(size)]
    assert header_values(headers, "X-Standin-Body-Sha256") == [digest]
    assert body == expected

    status, headers, body = send(port, "GET", f"/v1/test/bytes?size={size}&chunked=1", ROOT)
    assert status == 200
    assert header_values(headers, "Transfer-Encoding") == ["chunked"]
    assert header_values(headers, "Content-Length") == []
    assert body == expected

    status, headers, body = send(port, "HEAD", f"/v1/test/bytes?size={size}", ROOT)
    assert status == 200
    assert header_values(headers, "Content-Length") == [str(size)]
    assert body == b""


def test_echo_keeps_header_order_and_records(standin):
    port, record = standin
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=HTTP_TIMEOUT_S)
    pieces = [b"a" * 1000, b"b" * 70000, b"c"]
    headers = {"X-Vault-Token": "root", "Transfer-Encoding": "chunked"}
    connection.putrequest("PUT", "/v1/test/echo?q=1")
    for name, value in [*headers.items(), ("X-Dup", "1"), ("x-dup", "2"), ("X-Other", "3")]:
        connection.putheader(name, value)
    connection.endheaders()
    for piece in pieces:
        connection.send(b"%x\r\n%s\r\n" % (len(piece), piece))
    connection.send(b"0\r\n\r\n")
    echoed = json.loads(connection.getresponse().read())
    connection.close()

    whole = b"".join(pieces)
    assert echoed["method"] == "PUT"
    assert echoed["target"] == "/v1/test/echo?q=1"
    assert echoed["body_length"] == len(whole)
    assert echoed["body_sha256"] == hashlib.sha256(whole).hexdigest()
    names = [name for name, _ in echoed["headers"]]
    assert names[-3:] == ["X-Dup", "x-dup", "X-Other"]

    entry = json.loads(record.read_text().splitlines()[-1])
    assert entry["method"] == "PUT"
    assert entry["target"] == "/v1/test/echo?q=1"
    assert entry["headers"] == echoed["headers"]
    assert entry["body_sha256"] == echoed["body_sha256"]


def test_record_skips_control_endpoints(standin):
    port, record = standin
    send(port, "GET", "/v1/sys/health")
    set_modes(port, sealed=False)
    targets = [json.loads(line)["target"] for line in record.read_text().splitlines()]
    assert targets[-1] == "/v1/sys/health"
    assert not any(target.startswith("/_standin/") for target in targets)


def test_sink_streams_large_chunked_body(standin):
    port, _ = standin
    piece = bytes(range(256)) * 4096  # 1 MiB
    count = 64
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=HTTP_TIMEOUT_S)
    body = iter([piece] * count)
    connection.request("POST", "/v1/test/sink", body=body, headers=dict(ROOT), encode_chunked=True)
    result = json.loads(connection.getresponse().read())
    connection.close()
    expected = hashlib.sha256()
    for _ in range(count):
        expected.update(piece)
    assert result["body_length"] == len(piece) * count
    assert result["body_sha256"] == expected.hexdigest()


def test_delay_longpoll_and_stream(standin):
    port, _ = standin
    started = time.monotonic()
    status, _, body = send(port, "GET", "/v1/test/delay?ms=200", ROOT)
    assert status == 200
    assert time.monotonic() - started >= 0.2

    started = time.monotonic()
    status, _, _ = send(port, "GET", "/v1/test/longpoll?s=1", ROOT)
    assert status == 200
    assert time.monotonic() - started >= 1.0

    started = time.monotonic()
    status, headers, body = send(port, "GET", "/v1/test/stream?chunks=3&ms=100", ROOT)
    assert status == 200
    assert header_values(headers, "Transfer-Encoding") == ["chunked"]
    assert [json.loads(line)["chunk"] for line in body.splitlines()] == [0, 1, 2]
    assert time.monotonic() - started >= 0.2

    status, _, _ = send(port, "GET", "/v1/test/delay?ms=-1", ROOT)
    assert status == 400


# --- modes ----------------------------------------------------------------------------------


def test_standby_redirect_mode(standin):
    port, _ = standin
    set_modes(port, standby_redirect="https://active.example:8200/")
    status, headers, body = send(port, "GET", "/v1/secret/data/x?version=2", ROOT)
    assert status == 307
    location = "https://active.example:8200/v1/secret/data/x?version=2"
    assert header_values(headers, "Location") == [location]
    assert header_values(headers, "Content-Length") == ["0"]
    assert body == b""
    status, _, _ = send(port, "POST", "/v1/test/sink", ROOT, b"x" * 100000)
    assert status == 307


def test_sealed_and_rate_limited_modes(standin):
    port, _ = standin
    set_modes(port, sealed=True)
    status, _, body = send(port, "GET", "/v1/secret/data/x", ROOT)
    assert status == 503
    assert json.loads(body) == {"errors": ["Vault is sealed"]}

    set_modes(port, sealed=False, rate_limited=True)
    status, headers, body = send(port, "GET", "/v1/secret/data/x", ROOT)
    assert status == 429
    assert header_values(headers, "Retry-After") == ["7"]
    assert "errors" in json.loads(body)


def test_index_required_mode(standin):
    port, _ = standin
    set_modes(port, index_required=True)
    status, _, body = send(port, "GET", "/v1/secret/data/x", ROOT)
    assert status == 412
    assert json.loads(body)["errors"]

    write = json.dumps({"data": {"k": "v"}}).encode()
    status, headers, _ = send(port, "POST", "/v1/secret/data/x", ROOT, write)
    assert status == 200
    index = header_values(headers, "X-Vault-Index")
    assert len(index) == 1
    status, _, _ = send(port, "GET", "/v1/secret/data/x", ROOT + [("X-Vault-Index", "bogus")])
    assert status == 412
    status, _, body = send(port, "GET", "/v1/secret/data/x", ROOT + [("X-Vault-Index", index[0])])
    assert status == 200
    assert json.loads(body)["data"]["data"] == {"k": "v"}


def test_repeat_index_mode(standin):
    port, _ = standin
    set_modes(port, repeat_index=True)
    for target in ("/v1/sys/health", "/v1/secret/data/none"):
        status, headers, _ = send(port, "GET", target, ROOT)
        values = header_values(headers, "X-Vault-Index")
        assert len(values) == 2
        assert values[0] != values[1]
        counters = [int(base64.b64decode(value).decode().split(":")[2]) for value in values]
        assert counters[0] < counters[1]


def test_mode_endpoint_and_reset(standin):
    port, _ = standin
    status, _, body = send(port, "GET", "/_standin/mode")
    assert status == 200
    assert json.loads(body) == {
        "standby_redirect": None,
        "sealed": False,
        "rate_limited": False,
        "index_required": False,
        "repeat_index": False,
    }
    invalid_updates = (
        b'{"bogus": true}',
        b'{"sealed": "yes"}',
        b'{"standby_redirect": "ftp://x"}',
        b"[]",
    )
    for update in invalid_updates:
        status, _, body = send(port, "POST", "/_standin/mode", body=update)
        assert status == 400, update
        assert json.loads(body)["errors"]

    assert set_modes(port, sealed=True)["sealed"] is True
    vault_client(port).sys.read_health_status(method="GET")
    send(port, "POST", "/_standin/reset")
    assert json.loads(send(port, "GET", "/_standin/mode")[2])["sealed"] is False


# --- robustness -----------------------------------------------------------------------------


def exchange_raw(port, data: bytes) -> bytes:
    """Send raw bytes, then read until the server closes the connection or 3 s pass."""
    with socket.create_connection(("127.0.0.1", port), timeout=3) as connection:
        connection.sendall(data)
        received = b""
        with contextlib.suppress(TimeoutError):
            for _ in range(1000):
                piece = connection.recv(65536)
                if not piece:
                    break
                received += piece
        return received


SINK = b"POST /v1/test/sink HTTP/1.1\r\nX-Vault-Token: root\r\n"
BYTES = b"GET /v1/test/bytes"


@pytest.mark.parametrize(
    "raw, expected_status",
    [
        (b"GARBAGE\r\n\r\n", b"400"),
        (b"GET /v1/sys/health HTTP/9.9\r\n\r\n", b"505"),
        (b"GET /v1/sys/health HTTP/1.1\r\nno colon here\r\n\r\n", b"400"),
        (SINK + b"Content-Length: x\r\n\r\n", b"400"),
        (SINK + b"Content-Length: 1\r\nContent-Length: 2\r\n\r\n", b"400"),
        (SINK + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n", b"400"),
        (SINK + b"Transfer-Encoding: chunked\r\n\r\n1\r\nab\r\n", b"400"),
        (SINK + b"Transfer-Encoding: gzip\r\n\r\n", b"501"),
        (SINK + b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n", b"400"),
        (BYTES + b"?size=abc HTTP/1.1\r\nX-Vault-Token: root\r\nConnection: close\r\n\r\n", b"400"),
        (BYTES + b"?size=1 HTTP/1.1\r\nX-Vault-Token: root\r\nConnection: close\r\n\r\n", b"200"),
    ],
)
def test_malformed_request_rejected(standin, raw, expected_status):
    port, _ = standin
    response = exchange_raw(port, raw)
    assert response.startswith(b"HTTP/1.1 " + expected_status), response[:200]
    status, _, _ = send(port, "GET", "/v1/sys/health")
    assert status == 200


def test_concurrent_keepalive_clients(standin):
    port, _ = standin
    client_count = 64
    requests_per_client = 5
    failures = []

    def run_client(number):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=HTTP_TIMEOUT_S)
        try:
            first_socket = None
            for _ in range(requests_per_client):
                target = f"/v1/test/bytes?size={number * 10}"
                status, _, body = send(port, "GET", target, ROOT, connection=connection)
                first_socket = first_socket or connection.sock
                if status != 200 or len(body) != number * 10 or connection.sock is not first_socket:
                    failures.append((number, status, len(body)))
        except OSError as error:
            failures.append((number, repr(error)))
        finally:
            connection.close()

    threads = [threading.Thread(target=run_client, args=(n,)) for n in range(client_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=HTTP_TIMEOUT_S)
    assert not any(thread.is_alive() for thread in threads)
    assert failures == []


# --- listen options -------------------------------------------------------------------------


def ipv6_loopback_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not ipv6_loopback_available(), reason="no IPv6 loopback address")
def test_ipv6_listen_and_startup_flags(tmp_path):
    args = ("--listen", "[::1]:0", "--token", "alpha", "--token", "beta", "--sealed")
    with running_standin(tmp_path, *args) as (_, port, _):
        status, _, _ = send(port, "GET", "/v1/sys/health", host="::1")
        assert status == 503
        send(port, "POST", "/_standin/mode", body=b'{"sealed": false}', host="::1")
        for token, expected in (("alpha", 200), ("beta", 200), ("root", 403)):
            headers = [("X-Vault-Token", token)]
            status, _, _ = send(port, "GET", "/v1/test/echo", headers, host="::1")
            assert status == expected, token


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl command not found")
def test_tls_listen(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    command = ["openssl", "req", "-x509", "-nodes", "-days", "1", "-subj", "/CN=localhost"]
    command += ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
    command += ["-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)]
    subprocess.run(command, check=True, capture_output=True, timeout=30)
    context = ssl.create_default_context(cafile=str(cert))
    with running_standin(tmp_path, "--tls-cert", str(cert), "--tls-key", str(key)) as (_, port, _):
        # A plain-text client comes first: it must not stop the server.
        exchange_raw(port, b"GET /v1/sys/health HTTP/1.1\r\n\r\n")
        connection = http.client.HTTPSConnection(
            "127.0.0.1", port, timeout=HTTP_TIMEOUT_S, context=context
        )
        try:
            for _ in range(2):
                status, _, body = send(port, "GET", "/v1/sys/health", connection=connection)
                assert status == 200
                assert json.loads(body)["initialized"] is True
        finally:
            connection.close()
