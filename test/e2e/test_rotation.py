"""Certificates rotated on disk are picked up without a restart and without dropping work."""

import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

from http_clients import curl_json

RELOAD = ["--cert-reload-interval", "200ms"]


def issue(certs: Path, out: Path, name: str, cn: str, usage: str) -> None:
    """Issues NAME.pem and NAME-key.pem in OUT from the tunnel CA in CERTS, valid one day."""
    key, csr, cert = out / f"{name}-key.pem", out / f"{name}.csr", out / f"{name}.pem"
    ext = out / f"{name}.ext"
    ext.write_text(f"extendedKeyUsage={usage}\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n")
    subprocess.run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout",
                    "-out", str(key)], check=True, capture_output=True)
    subprocess.run(["openssl", "req", "-new", "-key", str(key), "-subj", f"/CN={cn}",
                    "-out", str(csr)], check=True, capture_output=True)
    subprocess.run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(certs / "ca.pem"),
                    "-CAkey", str(certs / "ca-key.pem"), "-CAcreateserial", "-days", "1",
                    "-extfile", str(ext), "-out", str(cert)], check=True, capture_output=True)


def replace_atomically(source: Path, target: Path) -> None:
    """Replaces target with a copy of source by rename, as secret volumes do."""
    staging = target.with_suffix(".staging")
    shutil.copyfile(source, staging)
    os.replace(staging, target)


class Load:
    """Sequential requests on a background thread; every failure is kept."""

    def __init__(self, url: str, cafile: Path):
        self.url, self.cafile = url, cafile
        self.done = threading.Event()
        self.ok = 0
        self.failures: list[str] = []
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        deadline = time.monotonic() + 60
        while not self.done.is_set() and time.monotonic() < deadline:
            status, _, body = curl_json(f"{self.url}/v1/sys/health", cafile=self.cafile)
            if status == 200:
                self.ok += 1
            else:
                self.failures.append(f"{status} {body}")

    def __enter__(self) -> "Load":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join(timeout=30)


def test_broker_bridge_cert_rotates_without_restart(harness, standin, certs, tmp_path):
    live = tmp_path / "live"
    live.mkdir()
    for name in ("broker.pem", "broker-key.pem"):
        shutil.copyfile(certs / name, live / name)
    broker = harness.start_broker_with_options(
        {"--bridge-cert": str(live / "broker.pem"), "--bridge-key": str(live / "broker-key.pem")},
        extra_args=RELOAD)
    first = harness.start_bridge(broker, standin)
    old_subject = first.wait_for_event("broker_connected", 10)["certificate"]
    issue(certs, tmp_path, "rotated", "localhost", "serverAuth")

    with Load(broker.url, broker.client_ca) as load:
        offset = broker.log_offset()
        replace_atomically(tmp_path / "rotated-key.pem", live / "broker-key.pem")
        replace_atomically(tmp_path / "rotated.pem", live / "broker.pem")
        broker.wait_for_event("certificates_reloaded", 10, offset=offset, edge="bridge")
        second = harness.start_bridge(broker, standin)
        new_subject = second.wait_for_event("broker_connected", 10)["certificate"]
        time.sleep(0.5)

    assert load.failures == []
    assert load.ok > 0
    assert new_subject != old_subject
    assert "serial=" in new_subject
    assert first.running()


def test_invalid_new_cert_keeps_previous(harness, standin, certs, tmp_path):
    live = tmp_path / "live"
    live.mkdir()
    for name in ("broker.pem", "broker-key.pem"):
        shutil.copyfile(certs / name, live / name)
    broker = harness.start_broker_with_options(
        {"--bridge-cert": str(live / "broker.pem"), "--bridge-key": str(live / "broker-key.pem")},
        extra_args=RELOAD)
    issue(certs, tmp_path, "other", "localhost", "serverAuth")

    # Only the certificate changes: it no longer matches the key on disk.
    offset = broker.log_offset()
    replace_atomically(tmp_path / "other.pem", live / "broker.pem")
    failed = broker.wait_for_event("certificate_reload_failed", 10, offset=offset)
    bridge = harness.start_bridge(broker, standin)

    assert failed["edge"] == "bridge"
    assert bridge.running()
    status, _, _ = curl_json(f"{broker.url}/v1/sys/health", cafile=broker.client_ca)
    assert status == 200


def test_bridge_client_cert_reloads_on_sighup(harness, standin, broker, certs, tmp_path):
    live = tmp_path / "live"
    live.mkdir()
    for name in ("bridge.pem", "bridge-key.pem"):
        shutil.copyfile(certs / name, live / name)
    bridge = harness.start_bridge_with_options(
        broker, standin,
        {"--client-cert": str(live / "bridge.pem"), "--client-key": str(live / "bridge-key.pem")},
        extra_args=["--cert-reload-interval", "1h"])
    issue(certs, tmp_path, "bridge2", "bridge-rotated", "clientAuth")
    replace_atomically(tmp_path / "bridge2-key.pem", live / "bridge-key.pem")
    replace_atomically(tmp_path / "bridge2.pem", live / "bridge.pem")

    offset = bridge.log_offset()
    os.kill(bridge.pid, signal.SIGHUP)
    bridge.wait_for_event("certificates_reloaded", 10, offset=offset, edge="broker")
    # A new connection is needed to present the new certificate: restart the broker on the
    # same ports, and the bridge dials it again.
    broker.stop()
    offset = broker.log_offset()
    broker.start()
    connected = broker.wait_for_event("bridge_connected", 15, offset=offset)

    assert "CN=bridge-rotated" in connected["certificate"]
