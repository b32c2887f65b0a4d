"""Fixtures for taser's end-to-end tests: certificates, the vault stand-in, broker and bridge.

The taser binary comes from $TASER_BIN, else build/asan/taser, else build/release/taser.
Every process a test starts is stopped by its PID when the test ends, and a sanitizer report in
a broker or bridge log fails the test.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from taser_harness import (  # noqa: E402
    REPO_ROOT,
    Bridge,
    Broker,
    Harness,
    StandIn,
    log_tail,
    make_certs,
)


def _find_taser_bin() -> Path:
    configured = os.environ.get("TASER_BIN")
    if configured:
        return Path(configured)
    for preset in ("asan", "release", "debug"):
        candidate = REPO_ROOT / "build" / preset / "taser"
        if candidate.exists():
            return candidate
    return REPO_ROOT / "build" / "asan" / "taser"


def _interrupt_on_sigterm(signum, frame):
    raise KeyboardInterrupt(f"received signal {signum}")


def pytest_configure(config):
    # Python's default SIGTERM action ends the process at once, which would leave the brokers,
    # bridges and stand-ins running. As a KeyboardInterrupt, pytest runs the fixture teardowns.
    signal.signal(signal.SIGTERM, _interrupt_on_sigterm)
    config.addinivalue_line(
        "markers", "slow: takes more than a minute, and still runs by default"
    )


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    # Store each phase's report on the test item so that fixtures can tell whether it failed.
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"report_{report.when}", report)


@pytest.fixture(scope="session")
def taser_bin() -> Path:
    path = _find_taser_bin()
    if not path.is_file() or not os.access(path, os.X_OK):
        pytest.fail(
            f"taser binary not found or not executable: {path}. Build it with "
            "`cmake --preset asan && cmake --build --preset asan`, or set TASER_BIN."
        )
    return path


@pytest.fixture(scope="session")
def certs(tmp_path_factory) -> Path:
    """Directory with the certificates that test/certs/make-certs.sh writes."""
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def harness(request, taser_bin, certs, tmp_path):
    """A Harness whose processes are all stopped when the test ends."""
    started = Harness(taser_bin=taser_bin, certs=certs, work_dir=tmp_path)
    yield started
    started.stop_all()

    reports = [getattr(request.node, f"report_{phase}", None) for phase in ("setup", "call")]
    if any(report is not None and report.failed for report in reports):
        # Printed output appears in the report of a failed test.
        for process in started.processes:
            heading = f"{process.name} (pid {process.pid}, exit {process.returncode})"
            print(f"--- {heading}: {process.log_path}")
            print(log_tail(process.log_path, 60))

    failures = started.sanitizer_failures()
    if failures:
        pytest.fail("\n\n".join(failures), pytrace=False)


@pytest.fixture
def standin(harness) -> StandIn:
    """The vault stand-in over plain HTTP on 127.0.0.1, with token `root`."""
    return harness.start_standin()


@pytest.fixture
def broker(harness) -> Broker:
    """A broker with an HTTPS client edge (client-edge.pem) and no bridge connected yet."""
    return harness.start_broker()


@dataclass
class Tunnel:
    """A stand-in, a broker and a bridge connected to each other."""

    harness: Harness
    standin: StandIn
    broker: Broker
    bridge: Bridge

    @property
    def url(self) -> str:
        return self.broker.url

    @property
    def client_ca(self) -> Path:
        return self.broker.client_ca


@pytest.fixture
def tunnel(harness, standin, broker) -> Tunnel:
    """The whole path: client edge on the broker, bridge connected, stand-in behind it."""
    bridge = harness.start_bridge(broker, standin)
    return Tunnel(harness=harness, standin=standin, broker=broker, bridge=bridge)
