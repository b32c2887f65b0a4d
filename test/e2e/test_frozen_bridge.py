"""A bridge that stops reading (SIGSTOP) cannot make the broker grow without bound."""

import os
import signal
import threading
import time
from collections import Counter

from http_clients import https_connection
from taser_harness import vmhwm_kib

SMALL_QUARANTINE = {"ASAN_OPTIONS": "quarantine_size_mb=16:thread_local_quarantine_size_kb=256"}
MEMORY_LIMIT_KIB = 150 * 1024
BODY = b"v" * (64 * 1024)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_frozen_bridge_keeps_broker_bounded(harness):
    standin = harness.start_standin()
    broker = harness.start_broker(
        extra_args=["--keepalive-interval", "1s", "--keepalive-timeout", "2s",
                    "--bridge-wait", "1s", "--request-timeout", "5s"],
        env=SMALL_QUARANTINE)
    bridge = harness.start_bridge(broker, standin, env=SMALL_QUARANTINE)
    baseline_fds = open_fds(broker.pid)

    os.kill(bridge.pid, signal.SIGSTOP)
    statuses: Counter = Counter()
    lock = threading.Lock()
    deadline = time.monotonic() + 60

    def client(index: int) -> None:
        for n in range(10):
            if time.monotonic() > deadline:
                return
            try:
                conn = https_connection(broker.client_port, broker.client_ca, timeout=20)
                conn.request("PUT", f"/v1/test/sink?client={index}&n={n}", body=BODY,
                             headers={"X-Vault-Token": "root"})
                status = conn.getresponse().status
                conn.close()
            except OSError as e:
                status = type(e).__name__
            with lock:
                statuses[status] += 1

    try:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(200)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=90)
        peak = vmhwm_kib(broker.pid)
    finally:
        resumed_at = bridge.log_offset()
        os.kill(bridge.pid, signal.SIGCONT)

    print(f"statuses while the bridge was frozen: {dict(statuses)}, broker VmHWM {peak} KiB")
    assert sum(statuses.values()) == 2000
    # Nothing can succeed through a frozen bridge: each request ends in an explicit error.
    assert set(statuses) <= {502, 503, 504}
    assert peak < MEMORY_LIMIT_KIB

    # The bridge comes back by itself, and the broker's descriptors return to their baseline.
    bridge.wait_for_event("broker_connected", 30, offset=resumed_at)
    conn = https_connection(broker.client_port, broker.client_ca, timeout=20)
    for _ in range(50):
        conn.request("GET", "/v1/sys/health")
        response = conn.getresponse()
        response.read()
        if response.status == 200:
            break
        time.sleep(0.2)
    assert response.status == 200
    conn.close()
    broker.wait_until(lambda: open_fds(broker.pid) <= baseline_fds + 2, 30,
                      "the broker's descriptors to return to baseline")
