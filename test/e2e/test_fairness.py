"""A client that stops reading a large response stalls only its own stream."""

import socket
import ssl
import statistics
import time

from http_clients import https_connection
from taser_harness import vmhwm_kib

SMALL_QUARANTINE = {"ASAN_OPTIONS": "quarantine_size_mb=16:thread_local_quarantine_size_kb=256"}
MEMORY_LIMIT_KIB = 150 * 1024


def test_stalled_download_does_not_block_others(harness):
    standin = harness.start_standin()
    broker = harness.start_broker(env=SMALL_QUARANTINE)
    bridge = harness.start_bridge(broker, standin, env=SMALL_QUARANTINE)

    # Client A asks for 512 MiB and then reads nothing: its socket buffer fills and stays full.
    context = ssl.create_default_context(cafile=str(broker.client_ca))
    raw = socket.create_connection(("127.0.0.1", broker.client_port), timeout=10)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    stalled = context.wrap_socket(raw, server_hostname="127.0.0.1")
    stalled.sendall(b"GET /v1/test/bytes?size=536870912 HTTP/1.1\r\nHost: x\r\n"
                    b"X-Vault-Token: root\r\n\r\n")
    assert stalled.recv(4096).startswith(b"HTTP/1.1 200")
    time.sleep(1.0)

    # Client B sends 100 small requests meanwhile, on one keep-alive connection.
    latencies = []
    conn = https_connection(broker.client_port, broker.client_ca, timeout=10)
    for _ in range(100):
        started = time.monotonic()
        conn.request("GET", "/v1/sys/health")
        response = conn.getresponse()
        response.read()
        latencies.append(time.monotonic() - started)
        assert response.status == 200
    conn.close()

    p99 = sorted(latencies)[98]
    print(f"small requests while a download is stalled: median "
          f"{statistics.median(latencies) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms")
    assert p99 < 1.0
    assert vmhwm_kib(broker.pid) < MEMORY_LIMIT_KIB
    assert vmhwm_kib(bridge.pid) < MEMORY_LIMIT_KIB
    stalled.close()
