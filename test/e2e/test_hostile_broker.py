"""A compromised broker cannot make the bridge reach anything but the vault address."""

import socket
import sys
import threading

from taser_harness import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "test" / "peer"))
import taser_peer as peer  # noqa: E402
from test_protocol_peer import TOKEN, broker_tls  # noqa: E402


class Canary:
    """A listener on another loopback port that counts every connection it receives."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self):
        self.stop.set()
        self.thread.join(timeout=5)
        self.sock.close()


def test_hostile_broker_reaches_only_the_vault(harness, standin):
    canary = Canary()
    broker = peer.PeerBroker(broker_tls(harness.certs), peer.Settings())
    probe = b"GET /v1/sys/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    try:
        bridge = harness.start_bridge_to_peer(broker.port, standin,
                                              extra_args=["--allow-tunnels"])
        session = broker.accept(timeout=30)
        absolute, _ = broker.request(
            session, "GET", f"http://127.0.0.1:{canary.port}/v1/sys/health", [TOKEN])
        host, _ = broker.request(
            session, "GET", "/v1/sys/health", [("Host", f"127.0.0.1:{canary.port}")])
        tunnels = [broker.request(session, "CONNECT", target, [], probe)
                   for target in (f"127.0.0.1:{canary.port}", "127.0.0.1:22",
                                  "169.254.169.254:80", "[::1]:8200")]
        records = standin.records()
    finally:
        broker.close()
        canary.close()

    assert absolute.status == 400
    assert host.status == 200
    for head, body in tunnels:
        # Every tunnel, whatever it named, ended at the vault: the stand-in answered the probe.
        assert head.status == 200
        assert body.startswith(b"HTTP/1.1 200")
    assert canary.connections == 0
    # The vault saw the Host request and one probe per tunnel, and never the absolute target.
    assert all(r["target"].startswith("/") for r in records)
    assert len([r for r in records if r["target"] == "/v1/sys/health"]) == 5
    assert bridge.running()


def test_tunnels_rejected_without_allow_tunnels(harness, standin):
    broker = peer.PeerBroker(broker_tls(harness.certs), peer.Settings())
    try:
        harness.start_bridge_to_peer(broker.port, standin)
        session = broker.accept(timeout=30)
        head, body = broker.request(session, "CONNECT", "127.0.0.1:22", [], b"x")
    finally:
        broker.close()

    assert head.status == 403
    assert b"errors" in body
