"""IPv6 literals work everywhere an address is given, in brackets, and fail early without."""

import socket
import subprocess

from taser_harness import Bridge, Broker, StandIn, child_env, replace_options


def raw_request(port: int, request: bytes) -> bytes:
    with socket.create_connection(("::1", port), timeout=10) as s:
        s.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        return data


def test_whole_path_over_ipv6_loopback(harness, taser_bin, certs):
    standin = StandIn(harness.work_dir, name="standin-v6", env=child_env())
    standin.argv = replace_options(standin.argv, {"--listen": "[::1]:0"})
    harness._track(standin)
    standin.start()
    broker = Broker(taser_bin, certs, harness.work_dir, name="broker-v6", plaintext=True,
                    extra_args=["--allow-connect", f"[::1]:{standin.port}"], env=child_env())
    broker.argv = replace_options(broker.argv, {"--listen": "[::1]:0",
                                                "--bridge-listen": "[::1]:0",
                                                "--admin-listen": "[::1]:0"})
    harness._track(broker)
    broker.start()
    bridge = Bridge(taser_bin, certs, harness.work_dir, broker, f"http://[::1]:{standin.port}",
                    name="bridge-v6", extra_args=["--allow-tunnels"], env=child_env())
    bridge.argv = replace_options(bridge.argv,
                                  {"--broker-address": f"[::1]:{broker.bridge_port}"})
    harness._track(bridge)
    bridge.start()

    # Host names an IPv6 literal; the bridge still goes only to its vault address.
    reply = raw_request(broker.client_port,
                        b"GET /v1/sys/health HTTP/1.1\r\nHost: [fd00::10]:8443\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200")
    tunnel = raw_request(broker.client_port,
                         f"CONNECT [::1]:{standin.port} HTTP/1.1\r\n"
                         f"Host: [::1]:{standin.port}\r\n\r\n".encode())
    assert tunnel.startswith(b"HTTP/1.1 200")

    connected = broker.wait_for_event("bridge_connected", 10)
    assert connected["peer"].startswith("[::1]:")
    listener = broker.wait_for_event("listener_started", 10, listener="client")
    assert listener["address"].startswith("[::1]:")


def test_unbracketed_ipv6_is_a_startup_error(taser_bin, certs):
    completed = subprocess.run(
        [str(taser_bin), "bridge", "--broker-address", "localhost:8444",
         "--ca-cert", str(certs / "ca.pem"), "--client-cert", str(certs / "bridge.pem"),
         "--client-key", str(certs / "bridge-key.pem"), "--vault-address", "http://::1:8200"],
        capture_output=True, timeout=30)

    assert completed.returncode == 2
    assert b"brackets" in completed.stderr
