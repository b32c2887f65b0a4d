"""End-to-end tests of what taser rejects: bad bridges, bad brokers, and hostile client requests.

Every rejection must be logged and must leave the broker able to serve a good bridge and good
clients. All traffic goes to 127.0.0.1. Addresses such as 169.254.169.254 or 10.0.0.5 appear
only inside requests sent to the broker, which must never connect to them.
"""

from __future__ import annotations

import json
import random
import secrets
import select
import socket
import ssl
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pytest

from http_clients import curl_json, parse_raw_response, raw_exchange, read_until_closed
from taser_harness import Broker, CanaryListener, Harness, StandIn

TOKEN_HEADER = "X-Vault-Token: root"
BRIDGE_WAIT = "1s"

# Bridge options that make the dial loop retry quickly, so that a few seconds show several
# attempts.
FAST_RECONNECT = ["--reconnect-min", "100ms", "--reconnect-max", "400ms"]

OPENSSL_EXTENSIONS = """
[server_ext]
basicConstraints = critical, CA:false
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1, IP:::1

[client_ext]
basicConstraints = critical, CA:false
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
"""


# ---------------------------------------------------------------------------------------------
# Certificates made for these tests


@dataclass
class ExtraCerts:
    """Certificates that test/certs/make-certs.sh does not write."""

    # A second good bridge certificate from the tunnel CA, with its own key pin.
    bridge2: Path
    bridge2_key: Path
    # A broker certificate for localhost from the unrelated CA.
    other_broker: Path
    other_broker_key: Path


def issue_certificate(
    certs: Path, out_dir: Path, name: str, ca_name: str, section: str, common_name: str
) -> tuple[Path, Path]:
    """Issue NAME.pem and NAME-key.pem (EC P-256) in OUT_DIR, signed by CA_NAME of CERTS."""
    key = out_dir / f"{name}-key.pem"
    request = out_dir / f"{name}.csr"
    cert = out_dir / f"{name}.pem"
    extensions = out_dir / "extensions.cnf"
    extensions.write_text(OPENSSL_EXTENSIONS)
    commands = [
        ["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]
        + ["-out", str(key)],
        ["openssl", "req", "-new", "-key", str(key), "-subj", f"/O=taser test/CN={common_name}"]
        + ["-out", str(request)],
        ["openssl", "x509", "-req", "-in", str(request), "-CA", str(certs / f"{ca_name}.pem")]
        + ["-CAkey", str(certs / f"{ca_name}-key.pem"), "-set_serial", f"0x{secrets.token_hex(16)}"]
        + ["-days", "2", "-extfile", str(extensions), "-extensions", section, "-out", str(cert)],
    ]
    for command in commands:
        subprocess.run(command, check=True, capture_output=True, timeout=60)
    return cert, key


@pytest.fixture(scope="module")
def extra_certs(certs, tmp_path_factory) -> ExtraCerts:
    out_dir = tmp_path_factory.mktemp("extra-certs")
    bridge2, bridge2_key = issue_certificate(
        certs, out_dir, "bridge2", "ca", "client_ext", "bridge2"
    )
    other_broker, other_broker_key = issue_certificate(
        certs, out_dir, "other-broker", "other-ca", "server_ext", "localhost"
    )
    return ExtraCerts(bridge2, bridge2_key, other_broker, other_broker_key)


def key_pin(taser_bin: Path, cert: Path) -> str:
    completed = subprocess.run(
        [str(taser_bin), "pin", str(cert)], capture_output=True, text=True, timeout=30
    )
    assert completed.returncode == 0, completed.stderr
    return completed.stdout.strip()


def good_request_status(broker: Broker) -> tuple[int, str]:
    """Send one request through BROKER's client edge and return its status and body."""
    if broker.plaintext:
        status, _, body = curl_json(f"{broker.url}/v1/test/echo?check=1", args=("-H", TOKEN_HEADER))
    else:
        status, _, body = curl_json(
            f"{broker.url}/v1/test/echo?check=1", broker.client_ca, args=("-H", TOKEN_HEADER)
        )
    return status, body


# ---------------------------------------------------------------------------------------------
# Bridge port: connections that must be rejected


def tls_client(
    certs: Path,
    cert_name: Optional[str] = "bridge",
    maximum_version: Optional[ssl.TLSVersion] = None,
) -> ssl.SSLContext:
    """Return a client context that offers ALPN taser/1 and trusts the tunnel CA."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(certs / "ca.pem"))
    context.set_alpn_protocols(["taser/1"])
    if cert_name is not None:
        context.load_cert_chain(
            str(certs / f"{cert_name}.pem"), str(certs / f"{cert_name}-key.pem")
        )
    if maximum_version is not None:
        context.maximum_version = maximum_version
    return context


def tls_attempt(port: int, context: ssl.SSLContext, timeout: float = 10.0) -> str:
    """Connect with CONTEXT, read once, and return how the broker ended the connection.

    In TLS 1.3 the client finishes its handshake before the server checks the client
    certificate, so the rejection shows up on the first read.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
        try:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                data = tls.recv(1)
                return f"closed after handshake, read {data!r}"
        except ssl.SSLError as error:
            return f"TLS error: {error}"
        except (ConnectionResetError, BrokenPipeError) as error:
            return f"connection error: {error}"
        except socket.timeout:
            return "timed out"


def attempt_without_client_cert(harness: Harness, broker: Broker, standin: StandIn) -> str:
    return tls_attempt(broker.bridge_port, tls_client(harness.certs, cert_name=None))


def attempt_tls12(harness: Harness, broker: Broker, standin: StandIn) -> str:
    context = tls_client(harness.certs, maximum_version=ssl.TLSVersion.TLSv1_2)
    return tls_attempt(broker.bridge_port, context)


def attempt_http_text(harness: Harness, broker: Broker, standin: StandIn) -> str:
    request = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"
    received, closed = raw_exchange(broker.bridge_port, request, timeout=10)
    return f"read {len(received)} bytes, closed={closed}"


def attempt_random_bytes(harness: Harness, broker: Broker, standin: StandIn) -> str:
    # Seeded, so that a failure can be repeated. The first byte is not 0x16 (a TLS handshake
    # record), so the broker reads garbage at once.
    noise = b"\x00" + random.Random(20240611).randbytes(4095)
    received, closed = raw_exchange(broker.bridge_port, noise, timeout=10)
    return f"read {len(received)} bytes, closed={closed}"


def attempt_silence(harness: Harness, broker: Broker, standin: StandIn) -> str:
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", broker.bridge_port), timeout=10) as sock:
        received, closed = read_until_closed(sock, timeout=10)
    waited = time.monotonic() - started
    assert closed, "silent connection still open after 10 s"
    assert received == b""
    # --handshake-timeout 1s in this case.
    assert 0.8 <= waited < 3.0, f"silent connection closed after {waited:.2f} s"
    return f"closed after {waited:.2f} s"


def attempt_with_cert(cert_name: str) -> Callable[[Harness, Broker, StandIn], str]:
    def attempt(harness: Harness, broker: Broker, standin: StandIn) -> str:
        offset = broker.log_offset()
        bridge = harness.start_bridge(broker, standin, cert_name=cert_name, wait_connected=False)
        broker.wait_for_event("bridge_rejected", timeout=15, offset=offset)
        bridge.stop()
        return f"bridge with {cert_name}.pem stopped"

    return attempt


@dataclass
class BridgePortCase:
    attempt: Callable[[Harness, Broker, StandIn], str]
    reason: str
    # Text that the rejection's "error" field must contain, in lower case.
    error_part: str = ""
    broker_args: tuple[str, ...] = ()


BRIDGE_PORT_CASES = {
    "no-client-cert": BridgePortCase(attempt_without_client_cert, "handshake failed"),
    "other-ca": BridgePortCase(
        attempt_with_cert("other-bridge"), "handshake failed", "unable to get local issuer"
    ),
    "expired": BridgePortCase(attempt_with_cert("expired-bridge"), "handshake failed", "expired"),
    "not-yet-valid": BridgePortCase(
        attempt_with_cert("notyet-bridge"), "handshake failed", "not yet valid"
    ),
    "server-only-eku": BridgePortCase(
        attempt_with_cert("server-only-bridge"), "handshake failed", "purpose"
    ),
    "tls12": BridgePortCase(attempt_tls12, "handshake failed", "unsupported protocol"),
    "http-text": BridgePortCase(attempt_http_text, "handshake failed"),
    "random-bytes": BridgePortCase(attempt_random_bytes, "handshake failed"),
    "silence": BridgePortCase(
        attempt_silence, "handshake timeout", broker_args=("--handshake-timeout", "1s")
    ),
}


@pytest.mark.parametrize("case_name", list(BRIDGE_PORT_CASES))
def test_bridge_port_rejects(harness, case_name):
    case = BRIDGE_PORT_CASES[case_name]
    standin = harness.start_standin()
    broker = harness.start_broker(extra_args=["--bridge-wait", BRIDGE_WAIT, *case.broker_args])

    outcome = case.attempt(harness, broker, standin)
    rejected = broker.wait_for_event("bridge_rejected", timeout=15)
    connected_before = broker.find_events("bridge_connected")
    harness.start_bridge(broker, standin)
    status, body = good_request_status(broker)

    assert rejected.get("reason") == case.reason, (outcome, rejected)
    assert case.error_part in str(rejected.get("error", "")).lower(), (outcome, rejected)
    assert connected_before == [], outcome
    assert status == 200, body
    assert [record["target"] for record in standin.records()] == ["/v1/test/echo?check=1"]


def test_bridge_port_rejects_unpinned_cert(harness, extra_certs):
    standin = harness.start_standin()
    pin = key_pin(harness.taser_bin, extra_certs.bridge2)
    broker = harness.start_broker(extra_args=["--bridge-pin", pin, "--bridge-wait", BRIDGE_WAIT])

    # bridge.pem is valid and from the tunnel CA, but its key is not pinned.
    unpinned = harness.start_bridge(broker, standin, wait_connected=False)
    rejected = broker.wait_for_event("bridge_rejected", timeout=15)
    unavailable_status, _ = good_request_status(broker)
    unpinned.stop()
    harness.start_bridge_with_options(
        broker,
        standin,
        {"--client-cert": str(extra_certs.bridge2), "--client-key": str(extra_certs.bridge2_key)},
    )
    status, body = good_request_status(broker)

    assert rejected.get("reason") == "pin mismatch", rejected
    assert unavailable_status == 503
    assert status == 200, body
    assert [record["target"] for record in standin.records()] == ["/v1/test/echo?check=1"]


def rejected_total(broker: Broker, reason: str) -> float:
    _, text = broker.admin_get("/metrics")
    prefix = f'taser_bridge_rejected_total{{reason="{reason}"}} '
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return 0.0


def test_handshake_flood_capped(harness):
    standin = harness.start_standin()
    max_handshakes = 50
    flood_size = 200
    broker = harness.start_broker(
        extra_args=[
            "--max-handshakes",
            str(max_handshakes),
            "--handshake-timeout",
            "3s",
            "--bridge-wait",
            BRIDGE_WAIT,
        ]
    )

    flood = []
    try:
        for _ in range(flood_size):
            flood.append(socket.create_connection(("127.0.0.1", broker.bridge_port), timeout=10))
        broker.wait_until(
            lambda: rejected_total(broker, "too many handshakes") >= flood_size - max_handshakes,
            10,
            "the broker to reject the connections above --max-handshakes",
        )
        # While the cap is full, a good bridge waits in its retry loop and gets in when the
        # half-open connections reach the handshake timeout.
        bridge_started = time.monotonic()
        harness.start_bridge(broker, standin, extra_args=["--reconnect-max", "1s"])
        bridge_wait = time.monotonic() - bridge_started
        status, body = good_request_status(broker)
    finally:
        for sock in flood:
            sock.close()
    over_cap = rejected_total(broker, "too many handshakes")
    timed_out = rejected_total(broker, "handshake timeout")
    limited = broker.find_events("bridge_rejected", reason="too many handshakes")

    assert over_cap >= flood_size - max_handshakes
    # Only the good bridge's own attempts may add to the count while the cap was full.
    assert over_cap <= flood_size - max_handshakes + 20
    assert timed_out == max_handshakes
    assert limited, "no bridge_rejected line with reason 'too many handshakes'"
    assert bridge_wait < 15, f"good bridge connected after {bridge_wait:.1f} s"
    assert status == 200, body


# ---------------------------------------------------------------------------------------------
# Bridge side: brokers that the bridge must not trust


def failed_attempts(bridge) -> list[dict]:
    return [
        event
        for event in bridge.events()
        if event.get("event") in ("connect_failed", "broker_pin_mismatch")
    ]


@dataclass
class BrokerSideCase:
    # Options of the broker that replace the usual ones.
    broker_replacements: dict
    # Options of the bad bridge: replacements and extra arguments.
    bridge_replacements: dict
    bridge_args: tuple[str, ...]
    # Options of a bridge that trusts this broker.
    good_replacements: dict
    good_args: tuple[str, ...]
    event: str
    error_part: str


def broker_side_cases(harness: Harness, extra_certs: ExtraCerts) -> dict[str, BrokerSideCase]:
    other_ca = str(harness.certs / "other-ca.pem")
    wrong_pin = key_pin(harness.taser_bin, harness.certs / "other-bridge.pem")
    right_pin = key_pin(harness.taser_bin, harness.certs / "broker.pem")
    return {
        "other-ca-broker-cert": BrokerSideCase(
            broker_replacements={
                "--bridge-cert": str(extra_certs.other_broker),
                "--bridge-key": str(extra_certs.other_broker_key),
            },
            bridge_replacements={},
            bridge_args=(),
            good_replacements={"--ca-cert": other_ca},
            good_args=(),
            event="connect_failed",
            error_part="certificate",
        ),
        "wrong-server-name": BrokerSideCase(
            broker_replacements={},
            bridge_replacements={},
            bridge_args=("--server-name", "wrong.example"),
            good_replacements={},
            good_args=(),
            event="connect_failed",
            error_part="certificate",
        ),
        "broker-pin-mismatch": BrokerSideCase(
            broker_replacements={},
            bridge_replacements={},
            bridge_args=("--broker-pin", wrong_pin),
            good_replacements={},
            good_args=("--broker-pin", right_pin),
            event="broker_pin_mismatch",
            error_part="",
        ),
    }


@pytest.mark.parametrize(
    "case_name", ["other-ca-broker-cert", "wrong-server-name", "broker-pin-mismatch"]
)
def test_bridge_refuses_untrusted_broker(harness, extra_certs, case_name):
    case = broker_side_cases(harness, extra_certs)[case_name]
    standin = harness.start_standin()
    broker = harness.start_broker_with_options(
        case.broker_replacements, extra_args=["--bridge-wait", BRIDGE_WAIT]
    )

    bad_bridge = harness.start_bridge_with_options(
        broker,
        standin,
        case.bridge_replacements,
        extra_args=[*case.bridge_args, *FAST_RECONNECT],
        wait_connected=False,
    )
    bad_bridge.wait_until(lambda: len(failed_attempts(bad_bridge)) >= 3, 15, "three failures")
    # A few seconds of retries show the backoff.
    time.sleep(2.0)
    unavailable_status, unavailable_body = good_request_status(broker)
    attempts = failed_attempts(bad_bridge)
    delays = [event["delay_ms"] for event in bad_bridge.find_events("reconnect_scheduled")]
    connected = bad_bridge.find_events("broker_connected")
    bad_bridge.stop()
    harness.start_bridge_with_options(
        broker, standin, case.good_replacements, extra_args=list(case.good_args)
    )
    status, body = good_request_status(broker)

    assert connected == []
    assert {event["event"] for event in attempts} == {case.event}, attempts
    assert all(case.error_part in str(event.get("error", "")).lower() for event in attempts)
    assert len(attempts) >= 3
    # Retries are spaced by the backoff: at most 400 ms each, and no tight loop.
    assert len(delays) >= 3
    assert max(delays) <= 400, delays
    assert len(delays) <= 60, f"{len(delays)} retries in a few seconds"
    assert unavailable_status == 503, unavailable_body
    assert status == 200, body
    assert [record["target"] for record in standin.records()] == ["/v1/test/echo?check=1"]


# ---------------------------------------------------------------------------------------------
# Client edge: request smuggling and limits

MAX_HEADER_SIZE = 8 * 1024
MAX_BODY_SIZE = 64 * 1024


def request_bytes(*lines: str, body: bytes = b"") -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


SMUGGLING_CASES = {
    "content-length-and-chunked": (
        request_bytes(
            "POST /v1/test/echo HTTP/1.1",
            "Host: x",
            "X-Vault-Token: root",
            "Content-Length: 5",
            "Transfer-Encoding: chunked",
            body=b"0\r\n\r\n",
        ),
        400,
    ),
    "two-content-lengths": (
        request_bytes(
            "POST /v1/test/echo HTTP/1.1",
            "Host: x",
            "X-Vault-Token: root",
            "Content-Length: 5",
            "Content-Length: 6",
            body=b"hello!",
        ),
        400,
    ),
    "content-length-list": (
        request_bytes(
            "POST /v1/test/echo HTTP/1.1",
            "Host: x",
            "X-Vault-Token: root",
            "Content-Length: 5, 6",
            body=b"hello!",
        ),
        400,
    ),
    "signed-content-length": (
        request_bytes(
            "POST /v1/test/echo HTTP/1.1",
            "Host: x",
            "X-Vault-Token: root",
            "Content-Length: +5",
            body=b"hello",
        ),
        400,
    ),
    "chunked-vertical-tab": (
        request_bytes(
            "POST /v1/test/echo HTTP/1.1",
            "Host: x",
            "X-Vault-Token: root",
            "Transfer-Encoding: chunked\x0b",
            body=b"0\r\n\r\n",
        ),
        400,
    ),
    "xchunked": (
        request_bytes(
            "POST /v1/test/echo HTTP/1.1",
            "Host: x",
            "X-Vault-Token: root",
            "Transfer-Encoding: xchunked",
            body=b"0\r\n\r\n",
        ),
        400,
    ),
    "gzip-chunked": (
        request_bytes(
            "POST /v1/test/echo HTTP/1.1",
            "Host: x",
            "X-Vault-Token: root",
            "Transfer-Encoding: gzip, chunked",
            body=b"0\r\n\r\n",
        ),
        400,
    ),
    "chunked-twice": (
        request_bytes(
            "POST /v1/test/echo HTTP/1.1",
            "Host: x",
            "X-Vault-Token: root",
            "Transfer-Encoding: chunked",
            "Transfer-Encoding: chunked",
            body=b"0\r\n\r\n",
        ),
        400,
    ),
    "space-before-colon": (
        request_bytes(
            "POST /v1/test/echo HTTP/1.1",
            "Host: x",
            "X-Vault-Token: root",
            "Transfer-Encoding : chunked",
            "Content-Length: 5",
            body=b"0\r\n\r\n",
        ),
        400,
    ),
    "obs-fold": (
        request_bytes(
            "GET /v1/test/echo HTTP/1.1",
            "Host: x",
            "X-Vault-Token: root",
            "X-Folded: first",
            " second",
        ),
        400,
    ),
    "nul-in-header": (
        request_bytes(
            "GET /v1/test/echo HTTP/1.1", "Host: x", "X-Vault-Token: root", "X-Bad: a\x00b"
        ),
        400,
    ),
    "cr-in-header": (
        request_bytes(
            "GET /v1/test/echo HTTP/1.1", "Host: x", "X-Vault-Token: root", "X-Bad: a\rb"
        ),
        400,
    ),
    "header-too-large": (
        request_bytes(
            "GET /v1/test/echo HTTP/1.1",
            "Host: x",
            "X-Vault-Token: root",
            "X-Padding: " + "p" * MAX_HEADER_SIZE,
        ),
        431,
    ),
    "body-too-large": (
        request_bytes(
            "POST /v1/test/echo HTTP/1.1",
            "Host: x",
            "X-Vault-Token: root",
            f"Content-Length: {MAX_BODY_SIZE + 1}",
            body=b"b" * (MAX_BODY_SIZE + 1),
        ),
        413,
    ),
}


def start_plain_edge(
    harness: Harness, standin: StandIn, extra_args: tuple[str, ...] = ()
) -> Broker:
    """Start a plain-HTTP broker with small limits and a bridge to STANDIN."""
    broker = harness.start_broker(
        plaintext=True,
        extra_args=[
            "--max-header-size",
            f"{MAX_HEADER_SIZE // 1024}KiB",
            "--max-body-size",
            f"{MAX_BODY_SIZE // 1024}KiB",
            "--allow-connect",
            f"127.0.0.1:{standin.port}",
            *extra_args,
        ],
    )
    harness.start_bridge(broker, standin, extra_args=["--allow-tunnels"])
    return broker


@pytest.mark.parametrize("case_name", list(SMUGGLING_CASES))
def test_client_edge_rejects_request(harness, standin, case_name):
    request, expected_status = SMUGGLING_CASES[case_name]
    broker = start_plain_edge(harness, standin)

    received, closed = raw_exchange(broker.client_port, request, timeout=10)
    response = parse_raw_response(received)
    records_after_bad = standin.records()
    status, body = good_request_status(broker)

    assert response.status == expected_status, received[:300]
    assert closed, "connection left open after a rejected request"
    assert json.loads(response.body)["errors"], received[:300]
    assert broker.find_events("request_rejected"), "no request_rejected log line"
    assert records_after_bad == []
    assert status == 200, body


def test_chunked_body_over_limit_413(harness, standin):
    broker = start_plain_edge(harness, standin)
    chunk = b"c" * 16384
    chunk_line = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    request = request_bytes(
        "POST /v1/test/sink HTTP/1.1",
        "Host: x",
        "X-Vault-Token: root",
        "Transfer-Encoding: chunked",
        body=chunk_line * (MAX_BODY_SIZE // len(chunk) + 2) + b"0\r\n\r\n",
    )

    received, closed = raw_exchange(broker.client_port, request, timeout=10)
    response = parse_raw_response(received)
    # A chunked body may already be on its way when the limit is reached. The vault must then
    # never see it complete.
    complete = [
        record
        for record in standin.records()
        if record["target"] == "/v1/test/sink" and record.get("error") is None
    ]
    status, body = good_request_status(broker)

    assert response.status == 413, received[:300]
    assert closed
    assert broker.find_events("request_rejected"), "no request_rejected log line"
    assert complete == [], complete
    assert status == 200, body


@pytest.mark.parametrize(
    "coding", ["chunked\t", " chunked", "Chunked"], ids=["tab", "space", "case"]
)
def test_chunked_with_whitespace_framed_once(harness, standin, coding):
    # Whitespace around a field value is not part of the value (RFC 9110 section 5.5), and
    # transfer-coding names are case-insensitive (RFC 9112 section 7). So these bodies are
    # chunked, and the request after the body must arrive as a request of its own.
    broker = start_plain_edge(harness, standin)
    first = request_bytes(
        "POST /v1/test/echo?part=first HTTP/1.1",
        "Host: x",
        "X-Vault-Token: root",
        f"Transfer-Encoding: {coding}",
        body=b"5\r\nhello\r\n0\r\n\r\n",
    )
    second = request_bytes(
        "GET /v1/test/echo?part=second HTTP/1.1",
        "Host: x",
        "X-Vault-Token: root",
        "Connection: close",
    )

    received, closed = raw_exchange(broker.client_port, first + second, timeout=10)
    records = standin.records()

    assert closed
    assert received.count(b"HTTP/1.1 200 ") == 2, received[:600]
    assert [record["target"] for record in records] == [
        "/v1/test/echo?part=first",
        "/v1/test/echo?part=second",
    ]
    assert records[0]["body_length"] == 5
    assert records[1]["body_length"] == 0


def test_http10_chunked_request_closes_connection(harness, standin):
    # An HTTP/1.0 intermediary in front of the broker ignores Transfer-Encoding, so it would
    # read the chunked body as the start of the next request.
    broker = start_plain_edge(harness, standin)
    first = request_bytes(
        "POST /v1/test/echo?part=first HTTP/1.0",
        "Host: x",
        "X-Vault-Token: root",
        "Connection: keep-alive",
        "Transfer-Encoding: chunked",
        body=b"5\r\nhello\r\n0\r\n\r\n",
    )
    second = request_bytes(
        "GET /v1/test/echo?part=second HTTP/1.1",
        "Host: x",
        "X-Vault-Token: root",
        "Connection: close",
    )

    received, closed = raw_exchange(broker.client_port, first + second, timeout=10)
    targets = [record["target"] for record in standin.records()]

    assert closed
    assert "/v1/test/echo?part=second" not in targets, received[:600]


def test_request_targets_reach_only_vault(harness, standin):
    canary = CanaryListener()
    try:
        broker = start_plain_edge(harness, standin)
        canary_authority = f"127.0.0.1:{canary.port}"
        requests = {
            "/v1/kv/": request_bytes(
                "GET http://10.0.0.5:8500/v1/kv/ HTTP/1.1",
                "Host: 10.0.0.5:8500",
                "X-Vault-Token: root",
                "Connection: close",
            ),
            "/v1/test/echo?via=absolute": request_bytes(
                f"GET http://{canary_authority}/v1/test/echo?via=absolute HTTP/1.1",
                f"Host: {canary_authority}",
                "X-Vault-Token: root",
                "Connection: close",
            ),
            "/v1/test/echo?via=host22": request_bytes(
                "GET /v1/test/echo?via=host22 HTTP/1.1",
                "Host: 127.0.0.1:22",
                "X-Vault-Token: root",
                "Connection: close",
            ),
            "/v1/test/echo?via=host-canary": request_bytes(
                "GET /v1/test/echo?via=host-canary HTTP/1.1",
                f"Host: {canary_authority}",
                "X-Vault-Token: root",
                "Connection: close",
            ),
        }
        statuses = {}
        for target, request in requests.items():
            received, _ = raw_exchange(broker.client_port, request, timeout=10)
            statuses[target] = parse_raw_response(received).status
        connects = {}
        for authority in ("169.254.169.254:80", "127.0.0.1:22", canary_authority):
            request = request_bytes(f"CONNECT {authority} HTTP/1.1", f"Host: {authority}")
            received, _ = raw_exchange(broker.client_port, request, timeout=10)
            connects[authority] = parse_raw_response(received).status
        # Give a wrongly routed connection time to arrive.
        time.sleep(0.5)
    finally:
        canary.close()
    recorded_targets = [record["target"] for record in standin.records()]

    # The stand-in returns 404 for /v1/kv/, which it does not serve.
    assert statuses == {
        "/v1/kv/": 404,
        "/v1/test/echo?via=absolute": 200,
        "/v1/test/echo?via=host22": 200,
        "/v1/test/echo?via=host-canary": 200,
    }
    assert sorted(recorded_targets) == sorted(requests)
    assert connects == {authority: 403 for authority in connects}
    assert canary.connections == 0
    rejected = broker.find_events("request_rejected", reason="CONNECT to an authority not allowed")
    assert len(rejected) == 3


# ---------------------------------------------------------------------------------------------
# Slow loris


def test_slow_headers_closed_while_others_served(harness, standin):
    broker = harness.start_broker(plaintext=True, extra_args=["--header-timeout", "2s"])
    harness.start_bridge(broker, standin)
    connection_count = 300
    header = b"GET /v1/test/echo HTTP/1.1\r\nHost: x\r\nX-Vault-Token: root\r\n"
    good_statuses: list[int] = []
    stop_good_client = threading.Event()

    def keep_requesting() -> None:
        for _ in range(200):
            if stop_good_client.wait(0.2):
                return
            status, _ = good_request_status(broker)
            good_statuses.append(status)

    slow = []
    opened_at = {}
    closed_after = {}
    with ThreadPoolExecutor(max_workers=1) as pool:
        good_client = pool.submit(keep_requesting)
        try:
            for _ in range(connection_count):
                sock = socket.create_connection(("127.0.0.1", broker.client_port), timeout=10)
                sock.setblocking(False)
                slow.append(sock)
                opened_at[sock] = time.monotonic()
            deadline = time.monotonic() + 10
            for position in range(len(header)):
                if len(closed_after) == connection_count or time.monotonic() > deadline:
                    break
                for sock in slow:
                    if sock in closed_after:
                        continue
                    try:
                        sock.send(header[position : position + 1])
                    except (BlockingIOError, ConnectionError):
                        pass
                # Wait one second, noting every connection that the broker closes meanwhile.
                second_ends = time.monotonic() + 1.0
                while time.monotonic() < second_ends:
                    open_socks = [sock for sock in slow if sock not in closed_after]
                    if not open_socks:
                        break
                    readable, _, _ = select.select(open_socks, [], [], 0.1)
                    for sock in readable:
                        try:
                            data = sock.recv(4096)
                        except ConnectionError:
                            data = b""
                        except BlockingIOError:
                            continue
                        if not data:
                            closed_after[sock] = time.monotonic() - opened_at[sock]
        finally:
            stop_good_client.set()
            good_client.result(timeout=30)
            for sock in slow:
                sock.close()
    timeouts = broker.find_events("client_timeout")

    assert len(closed_after) == connection_count, f"{connection_count - len(closed_after)} open"
    assert max(closed_after.values()) < 2 + 3, f"slowest close after {max(closed_after.values())}"
    assert min(closed_after.values()) > 1.5
    assert len(timeouts) >= connection_count
    assert len(good_statuses) >= 5
    assert set(good_statuses) == {200}, good_statuses


# ---------------------------------------------------------------------------------------------
# Secrets in logs

SECRET_MARKERS = {
    "token_header": "hvs.TESTTOKENAAAA" + "A" * 20,
    "path_token": "hvs.PATHTOKENBBBB" + "B" * 20,
    "bearer": "hvs.BEARERCCCC" + "C" * 20,
    "query": "QUERYDDDD" + "D" * 20,
    "secret_id": "SECRETIDEEEE" + "E" * 20,
}


class ClosingListener:
    """A TCP listener on 127.0.0.1 that closes every connection without a response.

    A bridge pointed at it fails each request before any response byte, which the broker
    reports as 502.
    """

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopped.is_set():
            try:
                connection, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            # Read the request first, so that the bridge gets a close, not a reset.
            connection.settimeout(1.0)
            try:
                connection.recv(65536)
            except OSError:
                pass
            connection.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)
        self.sock.close()


def send_requests_with_secrets(port: int) -> list[int]:
    """Send every kind of secret-bearing request to a plain-HTTP broker and return the statuses."""
    token = SECRET_MARKERS["token_header"]
    requests = [
        request_bytes(
            f"GET /v1/test/echo?secret={SECRET_MARKERS['query']} HTTP/1.1",
            "Host: x",
            f"X-Vault-Token: {token}",
            "Connection: close",
        ),
        request_bytes(
            f"GET /v1/auth/token/lookup/{SECRET_MARKERS['path_token']} HTTP/1.1",
            "Host: x",
            f"X-Vault-Token: {token}",
            "Connection: close",
        ),
        request_bytes(
            "GET /v1/auth/token/lookup-self HTTP/1.1",
            "Host: x",
            f"Authorization: Bearer {SECRET_MARKERS['bearer']}",
            "Connection: close",
        ),
    ]
    statuses = []
    for request in requests:
        received, _ = raw_exchange(port, request, timeout=15)
        statuses.append(parse_raw_response(received).status)
    return statuses


@pytest.mark.parametrize("log_level", ["debug", "trace"])
def test_logs_never_contain_secrets(harness, log_level):
    token = SECRET_MARKERS["token_header"]
    standin = harness.start_standin(token=token)
    closing = ClosingListener()
    try:
        broker = harness.start_broker_with_options(
            {"--log-level": log_level},
            extra_args=[
                "--bridge-wait",
                BRIDGE_WAIT,
                "--allow-connect",
                f"127.0.0.1:{standin.port}",
            ],
            plaintext=True,
        )
        # The first bridge reaches the stand-in but takes no byte tunnels, so CONNECT gets 502.
        bridge = harness.start_bridge_with_options(broker, standin, {"--log-level": log_level})
        served = send_requests_with_secrets(broker.client_port)
        login_body = json.dumps(
            {"role_id": "standin-role", "secret_id": SECRET_MARKERS["secret_id"]}
        ).encode()
        login_received, _ = raw_exchange(
            broker.client_port,
            request_bytes(
                "POST /v1/auth/approle/login HTTP/1.1",
                "Host: x",
                "Content-Type: application/json",
                f"Content-Length: {len(login_body)}",
                "Connection: close",
                body=login_body,
            ),
            timeout=15,
        )
        login = parse_raw_response(login_received)
        client_token = json.loads(login.body)["auth"]["client_token"]
        lookup_received, _ = raw_exchange(
            broker.client_port,
            request_bytes(
                "GET /v1/auth/token/lookup-self HTTP/1.1",
                "Host: x",
                f"X-Vault-Token: {client_token}",
                "Connection: close",
            ),
            timeout=15,
        )
        connect_received, _ = raw_exchange(
            broker.client_port,
            request_bytes(
                f"CONNECT 127.0.0.1:{standin.port} HTTP/1.1",
                f"Host: 127.0.0.1:{standin.port}",
                f"X-Vault-Token: {token}",
                f"Proxy-Authorization: Bearer {SECRET_MARKERS['bearer']}",
            ),
            timeout=15,
        )
        # Then a bridge whose vault closes every connection: 502 for each request.
        bridge.stop()
        closing_bridge = harness.start_bridge_with_options(
            broker, standin, {"--vault-address": closing.url, "--log-level": log_level}
        )
        failed = send_requests_with_secrets(broker.client_port)
        # And no bridge at all: 503.
        closing_bridge.stop()
        unavailable = send_requests_with_secrets(broker.client_port)
    finally:
        closing.close()
    markers = dict(SECRET_MARKERS, client_token=client_token)
    leaks = {}
    for process in harness.processes:
        if process is standin:
            continue
        text = process.log_path.read_text(errors="replace")
        for name, marker in markers.items():
            if marker in text:
                leaks.setdefault(process.name, []).append(name)

    assert served == [200, 404, 403], served
    assert login.status == 200, login_received[:300]
    assert parse_raw_response(lookup_received).status == 200
    assert parse_raw_response(connect_received).status == 502
    assert failed == [502, 502, 502], failed
    assert unavailable == [503, 503, 503], unavailable
    assert leaks == {}, f"secrets in logs: {leaks}"
    # The logs did record the requests, so the check above looked at real log lines.
    assert broker.find_events("request"), "broker logged no request line at --log-level debug"


# Vault's token store takes a token or accessor as the last path segment on these routes. The
# form is deprecated but still served: vault/token_store.go in HashiCorp Vault declares each of
# these paths with an optional "urltoken" or "urlaccessor" parameter.
TOKEN_IN_PATH_ROUTES = [
    "lookup",
    "revoke",
    "renew",
    "lookup-accessor",
    "revoke-accessor",
    "revoke-orphan",
]


@pytest.mark.parametrize("route", TOKEN_IN_PATH_ROUTES)
def test_token_in_path_not_logged(harness, standin, route):
    marker = "hvs.PATHTOKENROUTE" + secrets.token_hex(16)
    broker = harness.start_broker(plaintext=True)
    bridge = harness.start_bridge(broker, standin)
    request = request_bytes(
        f"POST /v1/auth/token/{route}/{marker} HTTP/1.1",
        "Host: x",
        "X-Vault-Token: root",
        "Content-Length: 0",
        "Connection: close",
    )

    received, _ = raw_exchange(broker.client_port, request, timeout=10)
    broker.wait_for_event("request", timeout=5)
    logs = {
        process.name: process.log_path.read_text(errors="replace") for process in (broker, bridge)
    }

    # The stand-in does not serve these routes: 404 or 405 shows that the request went through.
    assert parse_raw_response(received).status in (404, 405), received[:300]
    assert [record["target"] for record in standin.records()] == [
        f"/v1/auth/token/{route}/{marker}"
    ]
    assert [name for name, text in logs.items() if marker in text] == []
