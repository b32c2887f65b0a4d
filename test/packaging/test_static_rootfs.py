"""The static executable runs broker and bridge in an otherwise empty root directory.

The root directory contains only the stripped static taser, the test certificates and an
/etc/hosts that maps broker.test to 127.0.0.1: no shared library, no /etc/nsswitch.conf, no
/etc/resolv.conf and no /dev. Broker and bridge run under chroot(8), which needs root. The
vault stand-in runs outside on 127.0.0.1, and the bridge dials the broker by name, so glibc's
resolver inside the static executable must read /etc/hosts on its own.

The static executable comes from packaging/static/build (see conftest.py for the override).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import STANDIN_SCRIPT, SYSTEM_PYTHON, START_TIMEOUT, static_binary_path

BROKER_NAME = "broker.test"

pytestmark = [
    pytest.mark.skipif(
        not static_binary_path().exists(),
        reason=f"no static build at {static_binary_path()}: run packaging/static/build",
    ),
    pytest.mark.skipif(os.geteuid() != 0, reason="chroot needs root"),
]


def make_broker_certificate(certs: Path, out_dir: Path) -> None:
    """Issue a bridge-port certificate for BROKER_NAME from the test tunnel CA."""
    extensions = out_dir / "broker-test.ext"
    extensions.write_text(
        "basicConstraints = critical, CA:false\n"
        "keyUsage = critical, digitalSignature\n"
        "extendedKeyUsage = serverAuth\n"
        f"subjectAltName = DNS:{BROKER_NAME}\n"
    )
    key = out_dir / "broker-test-key.pem"
    request = out_dir / "broker-test.csr"
    subprocess.run(
        ["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-out", str(key)],
        check=True, capture_output=True, timeout=30,
    )
    subprocess.run(
        ["openssl", "req", "-new", "-key", str(key), "-subj", f"/CN={BROKER_NAME}",
         "-out", str(request)],
        check=True, capture_output=True, timeout=30,
    )
    subprocess.run(
        ["openssl", "x509", "-req", "-in", str(request), "-CA", str(certs / "ca.pem"),
         "-CAkey", str(certs / "ca-key.pem"), "-CAcreateserial",
         "-CAserial", str(out_dir / "ca.srl"), "-days", "2", "-sha256",
         "-extfile", str(extensions), "-out", str(out_dir / "broker-test.pem")],
        check=True, capture_output=True, timeout=30,
    )


@pytest.fixture
def rootfs(tmp_path, test_certs) -> Path:
    """Empty root directory with the static taser, certificates and /etc/hosts only."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "certs").mkdir()
    shutil.copy2(static_binary_path(), root / "taser")
    (root / "etc" / "hosts").write_text(f"127.0.0.1 {BROKER_NAME}\n")

    issue_dir = tmp_path / "issue"
    issue_dir.mkdir()
    make_broker_certificate(test_certs, issue_dir)
    for source, target in [
        (test_certs / "ca.pem", "ca.pem"),
        (test_certs / "bridge.pem", "bridge.pem"),
        (test_certs / "bridge-key.pem", "bridge-key.pem"),
        (issue_dir / "broker-test.pem", "broker.pem"),
        (issue_dir / "broker-test-key.pem", "broker-key.pem"),
    ]:
        shutil.copy2(source, root / "certs" / target)
    return root


def start_standin(processes, tmp_path) -> int:
    ready_file = tmp_path / "standin.port"
    processes(
        "vault stand-in",
        [SYSTEM_PYTHON, str(STANDIN_SCRIPT), "--listen", "127.0.0.1:0",
         "--ready-file", str(ready_file)],
        tmp_path / "standin.log",
    )
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if ready_file.exists() and ready_file.read_text().strip():
            return int(ready_file.read_text())
        time.sleep(0.05)
    raise AssertionError(f"vault stand-in wrote no port to {ready_file} in {START_TIMEOUT} s")


def listener_port(process, listener: str) -> int:
    event = process.wait_for_event(
        lambda e: e.get("event") == "listener_started" and e.get("listener") == listener
    )
    return int(event["address"].rsplit(":", 1)[1])


def vault_request(method: str, url: str, body: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url, data=data, method=method, headers={"X-Vault-Token": "root"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, json.loads(response.read() or b"{}")


def test_static_binary_has_no_interpreter():
    headers = subprocess.run(
        ["readelf", "--program-headers", "--wide", str(static_binary_path())],
        check=True, capture_output=True, text=True, timeout=30,
    ).stdout
    dynamic = subprocess.run(
        ["readelf", "--dynamic", "--wide", str(static_binary_path())],
        check=True, capture_output=True, text=True, timeout=30,
    ).stdout
    assert "INTERP" not in headers
    assert "(NEEDED)" not in dynamic


def test_static_binary_is_position_independent():
    # A static PIE (ELF type DYN) is loaded at a random address, like a dynamic executable.
    header = subprocess.run(
        ["readelf", "--file-header", str(static_binary_path())],
        check=True, capture_output=True, text=True, timeout=30,
    ).stdout
    assert "DYN (Position-Independent Executable file)" in header


def test_static_binary_links_jemalloc():
    # jemalloc's own messages begin with "<jemalloc>: "; glibc's allocator has no such text.
    assert b"<jemalloc>: " in static_binary_path().read_bytes()


def test_chroot_request_through_tunnel(rootfs, tmp_path, processes):
    standin_port = start_standin(processes, tmp_path)

    broker = processes(
        "broker",
        ["chroot", str(rootfs), "/taser", "broker",
         "--listen", "127.0.0.1:0", "--plaintext",
         "--bridge-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
         "--bridge-cert", "/certs/broker.pem", "--bridge-key", "/certs/broker-key.pem",
         "--bridge-ca", "/certs/ca.pem", "--log-level", "debug"],
        tmp_path / "broker.log",
    )
    client_port = listener_port(broker, "client")
    bridge_port = listener_port(broker, "bridge")

    bridge = processes(
        "bridge",
        ["chroot", str(rootfs), "/taser", "bridge",
         "--broker-address", f"{BROKER_NAME}:{bridge_port}",
         "--vault-address", f"http://127.0.0.1:{standin_port}",
         "--client-cert", "/certs/bridge.pem", "--client-key", "/certs/bridge-key.pem",
         "--ca-cert", "/certs/ca.pem", "--log-level", "debug"],
        tmp_path / "bridge.log",
    )
    connected = bridge.wait_for_event(lambda e: e.get("event") == "broker_connected")
    assert connected["broker"] == f"{BROKER_NAME}:{bridge_port}"

    base = f"http://127.0.0.1:{client_port}/v1"
    status, _ = vault_request("POST", f"{base}/secret/data/static", {"data": {"k": "v"}})
    assert status == 200
    status, body = vault_request("GET", f"{base}/secret/data/static")
    assert status == 200
    assert body["data"]["data"] == {"k": "v"}

    assert broker.stop() == 0
    assert bridge.stop() == 0


def test_chroot_name_needs_etc_hosts(rootfs, tmp_path, processes):
    # Without /etc/hosts (and with no DNS server configured) the name cannot resolve: the
    # bridge reports the failed step and keeps retrying.
    (rootfs / "etc" / "hosts").unlink()
    bridge = processes(
        "bridge",
        ["chroot", str(rootfs), "/taser", "bridge",
         "--broker-address", f"{BROKER_NAME}:8444",
         "--client-cert", "/certs/bridge.pem", "--client-key", "/certs/bridge-key.pem",
         "--ca-cert", "/certs/ca.pem"],
        tmp_path / "bridge.log",
    )
    failure = bridge.wait_for_event(lambda e: e.get("event") == "connect_failed")
    assert failure["stage"] == "resolve"
    assert bridge.stop() == 0
