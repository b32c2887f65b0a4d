"""Tunnel lifecycle faults from the field: reconnect storms, NAT timeouts, drains, stale sessions.

Clients speak plain HTTP to the broker. The relays between bridge and broker listen on
127.0.0.1 and play a load balancer, a NAT or a congested link.
"""

from __future__ import annotations

import collections
import os
import signal
import threading
import time

import pytest

from field_helpers import LinkRelay, Reply, admin_get, metric_value, plain_request
from taser_harness import Bridge, Harness, child_env, replace_options
from test_chaos import event_time, sigkill, start_again

TOKEN = {"X-Vault-Token": "root"}


def start_bridge_via(harness, broker, standin, port: int, extra_args=(), wait_connected=True):
    """Start a bridge for BROKER that dials 127.0.0.1:PORT, a relay in front of the broker."""
    return harness.start_bridge_with_options(
        broker,
        standin,
        {"--broker-address": f"localhost:{port}"},
        extra_args=list(extra_args),
        wait_connected=wait_connected,
    )


# ---------------------------------------------------------------------------------------------
# Thundering herd: many bridges reconnect after a broker restart

HERD_SIZE = 50
HERD_RECONNECT_MAX_S = 1.0
HERD_OUTAGE_S = 3.0
HERD_RESTARTS = 3
HERD_BIN_S = 0.1
# Time for 50 TLS and tunnel handshakes on the single broker thread of a sanitizer build, on
# a busy 2-core machine. Without it, "every bridge back within two maximum backoffs" would
# measure the machine's load more than the bridges' backoff.
HERD_HANDSHAKE_ALLOWANCE_S = 1.0
# The highest count of reconnects in one 100 ms bin, over the mean count per bin, that still
# counts as spread out. A herd without jitter lands in one or two bins, a ratio near 10.
HERD_MAX_PEAK_TO_MEAN = 3.0


def start_herd(harness, broker, standin) -> list[Bridge]:
    """Start HERD_SIZE bridges with distinct instance ids, without waiting for them."""
    bridges = []
    for index in range(HERD_SIZE):
        bridge = Bridge(
            harness.taser_bin,
            harness.certs,
            harness.work_dir,
            broker,
            standin.url,
            name=f"herd-bridge-{index:02d}",
            extra_args=[
                "--instance-id",
                f"herd-{index:02d}",
                "--reconnect-max",
                f"{HERD_RECONNECT_MAX_S:g}s",
            ],
            env=child_env(),
        )
        # Info level keeps 50 processes from writing debug lines on a shared machine.
        bridge.argv = replace_options(bridge.argv, {"--log-level": "info"})
        harness._track(bridge)
        bridge.start(wait_connected=False)
        bridges.append(bridge)
    return bridges


# Full jitter makes a bridge's first dial after the restart come sooner than a uniform spread
# would: a bridge dials on average every half maximum backoff, so about 20% of the herd dials
# in the first 100 ms, an expected peak-to-mean near 2. With 50 reconnects, chance alone then
# crosses 3 in about 6% of runs (a simulation of 20,000 runs), so the bins of three restarts
# are added up: 150 reconnects cross 3 by chance in about 0.05% of runs.
def test_reconnect_storm_spread_by_jitter(harness):
    standin = harness.start_standin()
    broker = harness.start_broker(plaintext=True)
    offset = broker.log_offset()
    bridges = start_herd(harness, broker, standin)
    broker.wait_until(
        lambda: len(broker.find_events("bridge_connected", offset)) >= HERD_SIZE,
        90,
        f"{HERD_SIZE} bridges to connect",
    )

    bins: collections.Counter = collections.Counter()
    spans = []
    instances_per_restart = []
    for _ in range(HERD_RESTARTS):
        sigkill(broker)
        # Long enough for every bridge to fail several dials and reach the maximum backoff.
        time.sleep(HERD_OUTAGE_S)
        broker = start_again(harness, broker)
        listening_at = event_time(broker.wait_for_event("listener_started", listener="bridge"))
        broker.wait_until(
            lambda: len(broker.find_events("bridge_connected")) >= HERD_SIZE,
            30,
            f"{HERD_SIZE} bridges to connect again",
        )
        connected = broker.find_events("bridge_connected")
        delays = sorted(event_time(event) - listening_at for event in connected)
        bins.update(int(delay // HERD_BIN_S) for delay in delays)
        spans.append(round(delays[-1], 3))
        instances_per_restart.append(len({event["instance"] for event in connected}))
    for bridge in bridges:
        bridge.popen.send_signal(signal.SIGTERM)

    # The mean over the window in which full jitter spreads the dials: one maximum backoff.
    mean_per_bin = HERD_RESTARTS * HERD_SIZE / (HERD_RECONNECT_MAX_S / HERD_BIN_S)
    peak = max(bins.values())
    print(
        f"reconnect storm: reconnects per 100 ms over {HERD_RESTARTS} restarts "
        f"{sorted(bins.items())}, peak {peak}, mean {mean_per_bin:.1f}; last reconnect "
        f"after each restart {spans} s"
    )
    assert instances_per_restart == [HERD_SIZE] * HERD_RESTARTS
    assert peak / mean_per_bin < HERD_MAX_PEAK_TO_MEAN
    assert max(spans) <= 2 * HERD_RECONNECT_MAX_S + HERD_HANDSHAKE_ALLOWANCE_S
    assert broker.find_events("bridge_rejected") == []


# ---------------------------------------------------------------------------------------------
# A NAT that drops idle flows without telling either end

NAT_IDLE_TIMEOUT_S = 3.0


def test_keepalive_keeps_nat_mapping_alive(harness):
    # PINGs every second on both sides, well inside the NAT's 3 s idle timeout.
    keepalive = ["--keepalive-interval", "1s", "--keepalive-timeout", "2s"]
    standin = harness.start_standin()
    broker = harness.start_broker(plaintext=True, extra_args=keepalive)
    with LinkRelay(broker.bridge_port, nat_idle_timeout_s=NAT_IDLE_TIMEOUT_S) as relay:
        bridge = start_bridge_via(harness, broker, standin, relay.port, extra_args=keepalive)
        assert plain_request(broker.client_port, "GET", "/v1/sys/health").status == 200
        offset = broker.log_offset()

        # No request for almost three NAT timeouts.
        time.sleep(3 * NAT_IDLE_TIMEOUT_S - 1)
        reply = plain_request(broker.client_port, "GET", "/v1/test/echo", headers=TOKEN)
        dropped = relay.dropped_flows()
        accepted = relay.connections_accepted()
        # Read before the relay closes its flows, which ends the session.
        broker_disconnects = broker.find_events("bridge_disconnected", offset)
        bridge_disconnects = bridge.find_events("broker_disconnected")

    print(
        f"NAT kept alive: request after the idle time took {reply.seconds:.3f} s, "
        f"{dropped} flows dropped, {accepted} connections accepted"
    )
    assert reply.status == 200, reply
    assert reply.seconds < 1.0
    assert dropped == 0
    assert accepted == 1
    assert broker_disconnects == []
    assert bridge_disconnects == []


def test_keepalive_detects_nat_dropped_session(harness):
    # PINGs only every 6 s, so the NAT drops the flow between two of them.
    interval_s, timeout_s = 6.0, 1.0
    keepalive = [
        "--keepalive-interval",
        f"{interval_s:g}s",
        "--keepalive-timeout",
        f"{timeout_s:g}s",
    ]
    standin = harness.start_standin()
    broker = harness.start_broker(plaintext=True, extra_args=[*keepalive, "--bridge-wait", "5s"])
    with LinkRelay(broker.bridge_port, nat_idle_timeout_s=NAT_IDLE_TIMEOUT_S) as relay:
        bridge = start_bridge_via(
            harness, broker, standin, relay.port, extra_args=[*keepalive, "--reconnect-max", "1s"]
        )
        assert plain_request(broker.client_port, "GET", "/v1/sys/health").status == 200
        offset = broker.log_offset()
        bridge_offset = bridge.log_offset()
        broker.wait_until(lambda: relay.dropped_flows() >= 1, 2 * interval_s, "the NAT to drop")

        # This request goes into the dropped flow.
        lost = plain_request(
            broker.client_port, "GET", "/v1/test/echo?into=dropped", headers=TOKEN, timeout=60
        )
        broker.wait_for_event("bridge_connected", 20, offset=offset)
        after = plain_request(broker.client_port, "GET", "/v1/test/echo?after=1", headers=TOKEN)
        accepted = relay.connections_accepted()

    detected = broker.find_events("keepalive_timeout", offset) or broker.find_events(
        "bridge_disconnected", offset
    )
    print(
        f"NAT-dropped session: request into the dropped flow ended after {lost.seconds:.1f} s "
        f"with {lost.status or lost.error}; relay accepted {accepted} connections"
    )
    # Ended by the keepalive, which fires at most one interval and one timeout after the
    # request, with a margin for a loaded machine. Never the kernel's retransmission timeout.
    assert lost.seconds < interval_s + timeout_s + 3
    assert lost.status in (502, 503) or lost.error, lost
    assert detected, "the broker never noticed the dead session"
    assert bridge.find_events("broker_disconnected", bridge_offset)
    assert accepted >= 2
    assert after.status == 200, after


# ---------------------------------------------------------------------------------------------
# A draining broker sends its bridge to another replica at once


def test_draining_broker_sends_bridge_elsewhere(harness):
    standin = harness.start_standin()
    draining = harness.start_broker(plaintext=True, extra_args=["--drain-timeout", "20s"])
    other = harness.start_broker(plaintext=True)
    with LinkRelay([draining.bridge_port, other.bridge_port]) as service:
        bridge = start_bridge_via(
            harness,
            draining,
            standin,
            service.port,
            extra_args=["--reconnect-max", "1s", "--admin-listen", "127.0.0.1:0"],
        )
        long_reply: list[Reply] = []
        long_request = threading.Thread(
            target=lambda: long_reply.append(
                plain_request(
                    draining.client_port,
                    "GET",
                    "/v1/test/delay?ms=6000",
                    headers=TOKEN,
                    timeout=30,
                )
            )
        )
        long_request.start()
        draining.wait_until(lambda: standin.records(), 10, "the long request to reach the stand-in")

        signalled_at = time.monotonic()
        os.kill(draining.pid, signal.SIGTERM)
        first_success_s = None
        while time.monotonic() - signalled_at < 10:
            reply = plain_request(other.client_port, "GET", "/v1/sys/health", timeout=5)
            if reply.status == 200:
                first_success_s = time.monotonic() - signalled_at
                break
            time.sleep(0.1)
        long_request.join(timeout=30)
        # The broker ends by itself once its last request is done. A second SIGTERM from
        # stop() would force the exit instead.
        exit_code = draining.popen.wait(timeout=20)
        _, metrics = admin_get(bridge, "/metrics")

    connected_other = event_time(other.wait_for_event("bridge_connected", 5))
    disconnected_draining = event_time(bridge.wait_for_event("broker_disconnected", 5))
    print(
        f"drain: first success on the other replica {first_success_s} s after SIGTERM; "
        f"bridge joined it {disconnected_draining - connected_other:.3f} s before leaving "
        f"the draining one"
    )
    assert first_success_s is not None and first_success_s < 2.0
    assert long_reply and long_reply[0].status == 200, long_reply
    assert exit_code == 0
    # The bridge had a session to the other replica before the draining one ended.
    assert connected_other < disconnected_draining
    assert metric_value(metrics, "taser_brokers_connected") == 1


# ---------------------------------------------------------------------------------------------
# Grace periods longer than 30 s


GRACE_S = 45
LONG_REQUEST_MS = 35_000


@pytest.mark.slow
def test_grace_period_above_30s_honoured(harness):
    drain = ["--drain-timeout", f"{GRACE_S}s"]
    standin = harness.start_standin()
    # Two separate paths, so that the broker and the bridge each drain a long request.
    broker_path = harness.start_broker(plaintext=True, extra_args=drain)
    harness.start_bridge(broker_path, standin, extra_args=drain)
    bridge_path_broker = harness.start_broker(plaintext=True, extra_args=["--bridge-wait", "1s"])
    draining_bridge = harness.start_bridge(bridge_path_broker, standin, extra_args=drain)

    replies: dict[str, Reply] = {}

    def long_request(name: str, port: int) -> None:
        replies[name] = plain_request(
            port, "GET", f"/v1/test/delay?ms={LONG_REQUEST_MS}", headers=TOKEN, timeout=GRACE_S + 15
        )

    threads = [
        threading.Thread(target=long_request, args=("broker", broker_path.client_port)),
        threading.Thread(target=long_request, args=("bridge", bridge_path_broker.client_port)),
    ]
    for thread in threads:
        thread.start()
    standin_wait = time.monotonic() + 10
    while len(standin.records()) < 2 and time.monotonic() < standin_wait:
        time.sleep(0.05)
    signalled_at = time.monotonic()
    os.kill(broker_path.pid, signal.SIGTERM)
    os.kill(draining_bridge.pid, signal.SIGTERM)

    # New work during the drains: the draining broker takes no new connection, and the broker
    # whose only bridge drains responds at once with 503.
    time.sleep(1.0)
    refused_reply = plain_request(broker_path.client_port, "GET", "/v1/sys/health", timeout=5)
    during = plain_request(bridge_path_broker.client_port, "GET", "/v1/sys/health", timeout=5)

    for thread in threads:
        thread.join(timeout=GRACE_S + 20)
    broker_exit = broker_path.popen.wait(timeout=GRACE_S)
    bridge_exit = draining_bridge.popen.wait(timeout=GRACE_S)
    stopped_after_s = time.monotonic() - signalled_at

    print(
        f"grace: replies {[(name, r.status, round(r.seconds, 1)) for name, r in replies.items()]}, "
        f"both processes exited {stopped_after_s:.1f} s after SIGTERM"
    )
    assert replies["broker"].status == 200, replies["broker"]
    assert replies["bridge"].status == 200, replies["bridge"]
    assert replies["broker"].seconds > 30
    assert replies["bridge"].seconds > 30
    assert broker_exit == 0
    assert bridge_exit == 0
    # They exit once the last request is done, not at the end of the grace period.
    assert stopped_after_s < GRACE_S - 5
    assert "ConnectionRefusedError" in refused_reply.error, refused_reply
    assert during.status == 503, during
    assert during.seconds < 3
    assert during.header("Retry-After") == "1"


# The processes run under a harness of their own, so that their sanitizer reports fail the
# checks below rather than the fixture's teardown.
def test_second_sigterm_ends_drain_at_once(taser_bin, certs, tmp_path):
    own = Harness(taser_bin=taser_bin, certs=certs, work_dir=tmp_path)
    drain = ["--drain-timeout", f"{GRACE_S}s"]
    try:
        standin = own.start_standin()
        broker_path = own.start_broker(plaintext=True, extra_args=drain)
        own.start_bridge(broker_path, standin)
        bridge_path_broker = own.start_broker(plaintext=True)
        draining_bridge = own.start_bridge(bridge_path_broker, standin, extra_args=drain)
        threads = []
        for port in (broker_path.client_port, bridge_path_broker.client_port):
            thread = threading.Thread(
                target=plain_request,
                args=(port, "GET", "/v1/test/delay?ms=30000"),
                kwargs={"headers": TOKEN, "timeout": 40},
            )
            thread.start()
            threads.append(thread)
        standin_wait = time.monotonic() + 10
        while len(standin.records()) < 2 and time.monotonic() < standin_wait:
            time.sleep(0.05)

        exits = {}
        for name, process in (("broker", broker_path), ("bridge", draining_bridge)):
            os.kill(process.pid, signal.SIGTERM)
            process.wait_for_event("drain_started", 10)
            signalled_at = time.monotonic()
            os.kill(process.pid, signal.SIGTERM)
            exit_code = process.popen.wait(timeout=GRACE_S)
            exits[name] = (exit_code, time.monotonic() - signalled_at)
        for thread in threads:
            thread.join(timeout=40)
    finally:
        own.stop_all()

    print(f"second SIGTERM: exit codes and seconds to exit {exits}")
    for name, process in (("broker", broker_path), ("bridge", draining_bridge)):
        assert exits[name][1] < 3.0, name
        assert process.find_events("shutdown_forced"), name
    assert own.sanitizer_failures() == []


# ---------------------------------------------------------------------------------------------
# A bridge that comes back with the same identity replaces its stale session


STALE_BRIDGE_ARGS = ["--instance-id", "bridge-stale", "--reconnect-max", "1s"]


def wait_for_request_lines(broker, offset: int, path: str, count: int) -> list[dict]:
    """Wait until the broker logged COUNT `request` lines for PATH after OFFSET; return them."""

    def lines() -> list[dict]:
        found = broker.find_events("request", offset, path=path)
        return found if len(found) >= count else []

    return broker.wait_until(lines, 10, f"{count} request lines for {path}")


def test_returning_bridge_replaces_stale_session(harness):
    standin = harness.start_standin()
    broker = harness.start_broker(plaintext=True)
    stale = harness.start_bridge(broker, standin, extra_args=STALE_BRIDGE_ARGS)
    assert plain_request(broker.client_port, "GET", "/v1/sys/health").status == 200
    stale_conn = broker.find_events("bridge_connected")[-1]["conn"]

    # Frozen, the old process keeps its socket open but responds to nothing.
    os.kill(stale.pid, signal.SIGSTOP)
    try:
        offset = broker.log_offset()
        fresh = harness.start_bridge(broker, standin, extra_args=STALE_BRIDGE_ARGS)
        fresh_conn = broker.wait_for_event("bridge_connected", 10, offset=offset)["conn"]
        replies = [
            plain_request(broker.client_port, "GET", f"/v1/test/echo?n={n}", headers=TOKEN)
            for n in range(10)
        ]
        # The broker first asks the old session (a PING, up to 1 s) before it replaces it.
        broker.wait_for_event("bridge_replaced", 5, offset=offset)
        replaced = broker.find_events("bridge_replaced", offset)
        # The broker logs a request after its response went out, so a line may lag behind, and
        # the line of the health check above may come after the offset.
        echoes = wait_for_request_lines(broker, offset, "/v1/test/echo", len(replies))
        routed = {event["bridge_conn"] for event in echoes}
    finally:
        os.kill(stale.pid, signal.SIGCONT)

    assert [reply.status for reply in replies] == [200] * 10
    assert max(reply.seconds for reply in replies) < 1.0
    assert len(replaced) == 1, replaced
    assert replaced[0]["conn"] == stale_conn
    assert replaced[0]["by_conn"] == fresh_conn
    assert routed == {fresh_conn}
    assert fresh.running()
    # GOAWAY reached the old process once it ran again: it ends its old session.
    stale.wait_for_event("goaway_received", 10)


def test_resumed_duplicate_bridge_settles(harness):
    standin = harness.start_standin()
    broker = harness.start_broker(plaintext=True)
    stale = harness.start_bridge(broker, standin, extra_args=STALE_BRIDGE_ARGS)
    os.kill(stale.pid, signal.SIGSTOP)
    try:
        harness.start_bridge(broker, standin, extra_args=STALE_BRIDGE_ARGS)
    finally:
        os.kill(stale.pid, signal.SIGCONT)
    offset = broker.log_offset()
    replies = []
    for n in range(20):
        replies.append(
            plain_request(broker.client_port, "GET", f"/v1/test/echo?n={n}", headers=TOKEN)
        )
        time.sleep(0.25)
    replacements = len(broker.find_events("bridge_replaced", offset))

    print(f"duplicate bridges: {replacements} replacements in 5 s after the old one resumed")
    assert [reply.status for reply in replies] == [200] * 20
    # At most a few replacements while the two processes sort themselves out, not a loop.
    assert replacements <= 2
