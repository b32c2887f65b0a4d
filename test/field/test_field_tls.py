"""TLS faults from the field: trust bundles and certificates that change on disk, clock skew, SNI.

CA-1 is the tunnel CA of test/certs/make-certs.sh (ca.pem, which signs bridge.pem) and CA-2
its unrelated CA (other-ca.pem, which signs other-bridge.pem). The broker's own certificate
comes from CA-1 throughout, so every bridge verifies the broker with ca.pem.
"""

from __future__ import annotations

import datetime
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path
from typing import Optional

import pytest
from field_helpers import metric_value, plain_request
from taser_harness import Bridge, PeerListener, child_env, replace_options
from test_rotation import issue, replace_atomically

RELOAD = ["--cert-reload-interval", "200ms"]
# Long enough for several reload checks at 200 ms, on a loaded machine.
RELOAD_WAIT_S = 10


def write_bundle(path: Path, *parts: Path | bytes) -> None:
    """Replace PATH by rename with the concatenation of PARTS (files or raw bytes)."""
    staging = path.with_suffix(".staging")
    with open(staging, "wb") as out:
        for part in parts:
            out.write(part if isinstance(part, bytes) else part.read_bytes())
    os.replace(staging, path)


def start_broker_with_bundle(harness, bundle: Path, extra_args=()):
    return harness.start_broker_with_options(
        {"--bridge-ca": str(bundle)}, plaintext=True, extra_args=[*RELOAD, *extra_args]
    )


def wait_for_reload(broker, offset: int, event: str = "certificates_reloaded") -> dict:
    return broker.wait_for_event(event, RELOAD_WAIT_S, offset=offset, edge="bridge")


def broker_metric(broker, name: str) -> Optional[float]:
    _, text = broker.admin_get("/metrics")
    return metric_value(text, name)


# ---------------------------------------------------------------------------------------------
# The broker's trust bundle rotates on disk


def test_ca_rotation_applies_to_new_handshakes(harness, certs, tmp_path):
    standin = harness.start_standin()
    bundle = tmp_path / "bridge-ca-bundle.pem"
    write_bundle(bundle, certs / "ca.pem")
    broker = start_broker_with_bundle(harness, bundle)
    ca1_bridge = harness.start_bridge(broker, standin)
    ca1_conn = broker.find_events("bridge_connected")[-1]["conn"]

    # Control: before the rotation, a CA-2 bridge is rejected.
    offset = broker.log_offset()
    early = harness.start_bridge(broker, standin, cert_name="other-bridge", wait_connected=False)
    broker.wait_for_event("bridge_rejected", 15, offset=offset)
    early.stop()

    # Step 1: CA-1 and CA-2 both trusted. A CA-2 bridge connects without a restart.
    offset = broker.log_offset()
    write_bundle(bundle, certs / "ca.pem", certs / "other-ca.pem")
    wait_for_reload(broker, offset)
    ca2_bridge = harness.start_bridge(broker, standin, cert_name="other-bridge")

    # Step 2: CA-2 only. A new CA-1 handshake is rejected.
    offset = broker.log_offset()
    write_bundle(bundle, certs / "other-ca.pem")
    wait_for_reload(broker, offset)
    late = harness.start_bridge(broker, standin, wait_connected=False)
    rejected = broker.wait_for_event("bridge_rejected", 15, offset=offset)
    late.stop()

    # The CA-1 session from before the rotation is not checked again: with the CA-2 bridge
    # gone, it still carries requests.
    ca2_bridge.stop()
    broker.wait_until(
        lambda: broker_metric(broker, "taser_bridges_connected") == 1,
        10,
        "the CA-2 bridge to leave",
    )
    reply = plain_request(
        broker.client_port, "GET", "/v1/test/echo", headers={"X-Vault-Token": "root"}
    )
    # The broker logs a request after its response went out, so the line may lag.
    routed = broker.wait_for_event("request", 10, offset=offset)["bridge_conn"]

    assert "certificate" in rejected["error"] or "verify" in rejected["error"], rejected
    assert reply.status == 200, reply
    assert routed == ca1_conn
    assert ca1_bridge.running()
    assert broker.find_events("bridge_disconnected", 0, conn=ca1_conn) == []


@pytest.mark.parametrize(
    "content",
    [
        b"this is not a PEM bundle\n",
        b"",
        # A whole CA-2 certificate followed by a block cut off in the middle.
        None,
    ],
    ids=["garbage", "empty", "truncated-block"],
)
def test_malformed_ca_bundle_keeps_last_good(harness, certs, tmp_path, content):
    standin = harness.start_standin()
    bundle = tmp_path / "bridge-ca-bundle.pem"
    write_bundle(bundle, certs / "ca.pem")
    broker = start_broker_with_bundle(harness, bundle)
    if content is None:
        ca1_text = (certs / "ca.pem").read_bytes()
        content = (certs / "other-ca.pem").read_bytes() + ca1_text[: len(ca1_text) // 2]

    offset = broker.log_offset()
    write_bundle(bundle, content)
    failed = wait_for_reload(broker, offset, "certificate_reload_failed")
    # The last good bundle (CA-1 alone) stays in force.
    ca1_bridge = harness.start_bridge(broker, standin)
    ca2_bridge = harness.start_bridge(
        broker, standin, cert_name="other-bridge", wait_connected=False
    )
    rejected = broker.wait_for_event("bridge_rejected", 15, offset=offset)
    ca2_bridge.stop()

    assert failed["action"] == "kept the previous files"
    assert failed["error"], failed
    assert ca1_bridge.running()
    assert rejected["reason"] == "handshake failed"
    assert plain_request(broker.client_port, "GET", "/v1/sys/health").status == 200


# ---------------------------------------------------------------------------------------------
# The bridge's client certificate rotates on disk, written non-atomically


def test_cert_rotation_keeps_matching_pair(harness, certs, tmp_path):
    standin = harness.start_standin()
    broker = harness.start_broker(plaintext=True)
    live = tmp_path / "live"
    live.mkdir()
    for name in ("bridge.pem", "bridge-key.pem"):
        shutil.copyfile(certs / name, live / name)
    bridge = harness.start_bridge_with_options(
        broker,
        standin,
        {"--client-cert": str(live / "bridge.pem"), "--client-key": str(live / "bridge-key.pem")},
        extra_args=RELOAD,
    )
    issue(certs, tmp_path, "rotated", "bridge-rotated", "clientAuth")

    # The certificate first, written in place: for a while it does not match the key on disk.
    offset = bridge.log_offset()
    shutil.copyfile(tmp_path / "rotated.pem", live / "bridge.pem")
    # A check that reads the file while it is half written fails for another reason first.
    mismatches = bridge.wait_until(
        lambda: [
            event
            for event in bridge.find_events("certificate_reload_failed", offset, edge="broker")
            if "mismatch" in event["error"]
        ],
        RELOAD_WAIT_S,
        "a reload that fails on the mismatched pair",
    )
    during = plain_request(broker.client_port, "GET", "/v1/sys/health")
    time.sleep(2)
    offset = bridge.log_offset()
    shutil.copyfile(tmp_path / "rotated-key.pem", live / "bridge-key.pem")
    bridge.wait_for_event("certificates_reloaded", RELOAD_WAIT_S, offset=offset, edge="broker")

    # A new connection presents the new pair, without a restart or a SIGHUP of the bridge.
    broker.stop()
    broker_offset = broker.log_offset()
    broker.start()
    connected = broker.wait_for_event("bridge_connected", 20, offset=broker_offset)

    assert mismatches[0]["action"] == "kept the previous files"
    assert during.status == 200, during
    assert "CN=bridge-rotated" in connected["certificate"]
    assert "serial=" in connected["certificate"]
    assert "not_after=" in connected["certificate"]
    assert bridge.running()
    assert len(bridge.find_events("bridge_started")) == 1


# ---------------------------------------------------------------------------------------------
# Clock skew


def test_not_yet_valid_cert_recovers(harness, certs, tmp_path):
    standin = harness.start_standin()
    broker = harness.start_broker(plaintext=True)
    live = tmp_path / "live"
    live.mkdir()
    shutil.copyfile(certs / "notyet-bridge.pem", live / "bridge.pem")
    shutil.copyfile(certs / "notyet-bridge-key.pem", live / "bridge-key.pem")
    bridge = harness.start_bridge_with_options(
        broker,
        standin,
        {"--client-cert": str(live / "bridge.pem"), "--client-key": str(live / "bridge-key.pem")},
        extra_args=[*RELOAD, "--reconnect-max", "1s"],
        wait_connected=False,
    )
    broker.wait_until(
        lambda: len(broker.find_events("bridge_rejected")) >= 2,
        20,
        "two rejected handshakes",
    )
    rejected = broker.find_events("bridge_rejected")[0]

    # The key first, then the certificate, each by rename, as a secret volume updates.
    offset = broker.log_offset()
    replace_atomically(certs / "bridge-key.pem", live / "bridge-key.pem")
    replace_atomically(certs / "bridge.pem", live / "bridge.pem")
    broker.wait_for_event("bridge_connected", 20, offset=offset)

    assert "not yet valid" in rejected["error"]
    assert plain_request(broker.client_port, "GET", "/v1/sys/health").status == 200
    assert len(bridge.find_events("bridge_started")) == 1


def not_before(cert_file: Path) -> datetime.datetime:
    """Return the notBefore time of a PEM certificate, read with the openssl command."""
    completed = subprocess.run(
        ["openssl", "x509", "-noout", "-startdate", "-dateopt", "iso_8601", "-in", str(cert_file)],
        capture_output=True,
        check=True,
        text=True,
        timeout=30,
    )
    # For example "notBefore=2026-12-04 17:08:17Z".
    text = completed.stdout.strip().partition("=")[2]
    return datetime.datetime.strptime(text, "%Y-%m-%d %H:%M:%SZ").replace(
        tzinfo=datetime.timezone.utc
    )


def test_certs_command_backdates_not_before(taser_bin, tmp_path):
    out = tmp_path / "trial"
    completed = subprocess.run(
        [str(taser_bin), "certs", "--out", str(out), "--broker-host", "localhost"],
        capture_output=True,
        timeout=30,
    )
    assert completed.returncode == 0, completed.stderr
    now = datetime.datetime.now(datetime.timezone.utc)

    for name in ("ca.pem", "broker.pem", "bridge.pem"):
        # A peer whose clock is up to 5 minutes behind still accepts the certificate.
        backdated = now - not_before(out / name)
        assert backdated >= datetime.timedelta(minutes=4, seconds=50), (name, backdated)


# ---------------------------------------------------------------------------------------------
# SNI towards a broker named by an IP literal


class SniRecorder:
    """A TLS listener that records the server name each client sends, then ends the handshake."""

    def __init__(self, certs: Path, host: str) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.names: list[Optional[str]] = []
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(certs / "broker.pem", certs / "broker-key.pem")
        self.context.sni_callback = self._record
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.bind((host, 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _record(self, ssl_object, server_name, context) -> None:
        self.names.append(server_name)

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                connection, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            connection.settimeout(5)
            try:
                with self.context.wrap_socket(connection, server_side=True):
                    pass
            except (OSError, ssl.SSLError):
                pass
            finally:
                connection.close()

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)
        self.sock.close()


@pytest.mark.parametrize(
    ("listen_host", "broker_address_host", "server_name", "expected_sni"),
    [
        ("::1", "[::1]", None, None),
        ("127.0.0.1", "127.0.0.1", None, None),
        ("::1", "[::1]", "localhost", "localhost"),
    ],
    ids=["ipv6-literal", "ipv4-literal", "ipv6-with-server-name"],
)
def test_no_sni_for_ip_literal(
    harness, certs, listen_host, broker_address_host, server_name, expected_sni
):
    standin = harness.start_standin()
    recorder = SniRecorder(certs, listen_host)
    try:
        extra = ["--server-name", server_name] if server_name else []
        bridge = Bridge(
            harness.taser_bin,
            harness.certs,
            harness.work_dir,
            PeerListener(recorder.port),  # type: ignore[arg-type]
            standin.url,
            extra_args=extra,
            env=child_env(),
        )
        bridge.argv = replace_options(
            bridge.argv, {"--broker-address": f"{broker_address_host}:{recorder.port}"}
        )
        harness._track(bridge)
        bridge.start(wait_connected=False)
        bridge.wait_until(lambda: recorder.names, 20, "a TLS ClientHello at the recorder")
    finally:
        recorder.close()

    assert recorder.names[0] == expected_sni
