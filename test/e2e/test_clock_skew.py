"""Validity-date failures name the local time, so that clock skew is easy to recognise."""


def test_not_yet_valid_bridge_names_local_time(harness, standin, broker):
    bridge = harness.start_bridge(broker, standin, cert_name="notyet-bridge", wait_connected=False)

    rejected = broker.wait_for_event("bridge_rejected", 15)
    bridge.wait_for_event("connect_failed", 15)

    assert "not yet valid" in rejected["error"]
    assert "local time" in rejected["error"]
    assert bridge.running()  # it keeps retrying with backoff, it does not give up


def test_expired_bridge_names_local_time(harness, standin, broker):
    harness.start_bridge(broker, standin, cert_name="expired-bridge", wait_connected=False)

    rejected = broker.wait_for_event("bridge_rejected", 15)

    assert "expired" in rejected["error"]
    assert "local time" in rejected["error"]
