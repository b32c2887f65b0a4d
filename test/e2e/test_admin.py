"""The admin listener: health, readiness that follows the bridges, and metrics that count."""

import re

from http_clients import curl_json


def metric(text: str, name: str, labels: str = "") -> float:
    """Returns the value of one sample in Prometheus text, failing when it is absent."""
    pattern = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else "") + r" (\S+)"
    match = re.search(r"^" + pattern + r"$", text, re.MULTILINE)
    assert match, f"no sample {name}{{{labels}}} in:\n{text}"
    return float(match.group(1))


def test_healthz_answers_without_bridge(broker):
    status, body = broker.admin_get("/healthz")

    assert status == 200
    assert body == "ok\n"


def test_readyz_follows_bridge(harness, standin, broker):
    status, _ = broker.admin_get("/readyz")
    assert status == 503

    bridge = harness.start_bridge(broker, standin)
    status, _ = broker.admin_get("/readyz")
    assert status == 200

    bridge.stop()
    broker.wait_until(lambda: broker.admin_get("/readyz")[0] == 503, 10, "readyz to turn 503")


def test_metrics_count_requests(tunnel):
    _, before = tunnel.broker.admin_get("/metrics")
    assert metric(before, "taser_bridges_connected") == 1

    for _ in range(3):
        status, _, _ = curl_json(f"{tunnel.url}/v1/sys/health", cafile=tunnel.client_ca)
        assert status == 200
    status, _, _ = curl_json(f"{tunnel.url}/v1/no/such/path", cafile=tunnel.client_ca,
                             args=("-H", "X-Vault-Token: root"))
    assert status == 404

    _, after = tunnel.broker.admin_get("/metrics")
    assert metric(after, "taser_requests_total") - metric(before, "taser_requests_total") == 4
    ok = metric(after, "taser_responses_total", 'class="2xx"')
    assert ok - metric(before, "taser_responses_total", 'class="2xx"') == 3
    missing = metric(after, "taser_responses_total", 'class="4xx"')
    assert missing - metric(before, "taser_responses_total", 'class="4xx"') == 1
    assert metric(after, "taser_request_duration_seconds_count") >= 4
    assert metric(after, "taser_client_bytes_total", 'direction="out"') > 0


def test_metrics_count_rejected_bridges(harness, standin, broker):
    bridge = harness.start_bridge(broker, standin, cert_name="other-bridge", wait_connected=False)
    broker.wait_for_event("bridge_rejected", 15)
    bridge.stop()

    _, text = broker.admin_get("/metrics")
    assert metric(text, "taser_bridge_rejected_total", 'reason="handshake failed"') >= 1


def test_unknown_admin_path_is_404(broker):
    status, _ = broker.admin_get("/v1/sys/health")

    assert status == 404


def bridge_admin_get(bridge, path):
    """GETs a path of a bridge's admin listener, found from its listener_started line."""
    import http.client

    from taser_harness import parse_host_port

    event = bridge.wait_for_event("listener_started", 10, listener="admin")
    port = parse_host_port(event["address"])[1]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def test_bridge_readyz_follows_broker(harness, standin, broker):
    bridge = harness.start_bridge(broker, standin, extra_args=["--admin-listen", "127.0.0.1:0"])
    status, _ = bridge_admin_get(bridge, "/readyz")
    assert status == 200
    _, text = bridge_admin_get(bridge, "/metrics")
    assert metric(text, "taser_brokers_connected") == 1

    broker.stop()
    bridge.wait_until(lambda: bridge_admin_get(bridge, "/readyz")[0] == 503, 15,
                      "the bridge's readyz to turn 503")


def test_bridge_admin_rejects_remote_address(taser_bin, certs):
    import subprocess

    completed = subprocess.run(
        [str(taser_bin), "bridge", "--broker-address", "localhost:1",
         "--ca-cert", str(certs / "ca.pem"), "--client-cert", str(certs / "bridge.pem"),
         "--client-key", str(certs / "bridge-key.pem"), "--admin-listen", "0.0.0.0:0"],
        capture_output=True, timeout=30)

    assert completed.returncode == 2
    assert b"loopback" in completed.stderr
