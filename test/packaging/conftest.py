"""Shared helpers of the packaging tests: where the build outputs are, and processes that are
started on loopback and stopped by their PID.

Build outputs, each of which can be overridden by an environment variable:
  TASER_STATIC_BIN  stripped static executable, default build/static/stripped/taser
                    (made by packaging/static/build)
  TASER_DEB         Debian package, default the newest build/release/taser_*.deb (made by cpack)
  TASER_BIN         any taser executable, for reading --help; default the first that exists of
                    the static one, build/release/taser and build/asan/taser
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGING_DIR = REPO_ROOT / "packaging"
MAKE_CERTS_SCRIPT = REPO_ROOT / "test" / "certs" / "make-certs.sh"
STANDIN_SCRIPT = REPO_ROOT / "test" / "vault_standin" / "vault_standin.py"

# Debian's interpreter. The `python3` on PATH may be another one.
SYSTEM_PYTHON = "/usr/bin/python3"

START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
POLL_INTERVAL = 0.05


def static_binary_path() -> Path:
    return Path(os.environ.get("TASER_STATIC_BIN", REPO_ROOT / "build/static/stripped/taser"))


def deb_path() -> Optional[Path]:
    configured = os.environ.get("TASER_DEB")
    if configured:
        return Path(configured)
    candidates = sorted(
        (REPO_ROOT / "build" / "release").glob("taser_*.deb"), key=lambda p: p.stat().st_mtime
    )
    return candidates[-1] if candidates else None


def any_taser_binary() -> Optional[Path]:
    configured = os.environ.get("TASER_BIN")
    if configured:
        return Path(configured)
    for candidate in (
        static_binary_path(),
        REPO_ROOT / "build/release/taser",
        REPO_ROOT / "build/asan/taser",
    ):
        if candidate.exists():
            return candidate
    return None


def _interrupt_on_sigterm(signum, frame):
    raise KeyboardInterrupt(f"received signal {signum}")


def pytest_configure(config):
    # Python's default SIGTERM action ends the process at once, which would leave brokers,
    # bridges and stand-ins running. As a KeyboardInterrupt, pytest runs the fixture teardowns.
    signal.signal(signal.SIGTERM, _interrupt_on_sigterm)


class ManagedProcess:
    """A child process whose stdout and stderr go to LOG_PATH, stopped by its PID."""

    def __init__(self, name: str, args: list[str], log_path: Path, **popen_args):
        self.name = name
        self.log_path = log_path
        self._log_file = open(log_path, "wb")
        self.process = subprocess.Popen(
            args, stdout=self._log_file, stderr=subprocess.STDOUT, **popen_args
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_events(self) -> list[dict]:
        """Return the JSON log lines written so far, skipping any other line."""
        events = []
        for line in self.log_text().splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return events

    def wait_for_event(self, matches: Callable[[dict], bool], timeout: float = START_TIMEOUT):
        """Return the first log event for which MATCHES is true, or fail after TIMEOUT s."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.log_events():
                if matches(event):
                    return event
            if self.process.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited with {self.process.returncode} before the expected "
                    f"log event; log:\n{self.log_text()[-4000:]}"
                )
            time.sleep(POLL_INTERVAL)
        raise AssertionError(
            f"{self.name}: expected log event not seen within {timeout} s; log:\n"
            f"{self.log_text()[-4000:]}"
        )

    def stop(self) -> Optional[int]:
        """Send SIGTERM, then SIGKILL after STOP_TIMEOUT s; return the exit code."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=STOP_TIMEOUT)
        self._log_file.close()
        return self.process.returncode


@pytest.fixture
def processes():
    """Start processes with start(name, args, log_path, ...) and stop them all afterwards."""
    started: list[ManagedProcess] = []

    def start(name: str, args: list[str], log_path: Path, **popen_args) -> ManagedProcess:
        process = ManagedProcess(name, args, log_path, **popen_args)
        started.append(process)
        return process

    yield start
    for process in reversed(started):
        process.stop()


@pytest.fixture(scope="session")
def test_certs(tmp_path_factory) -> Path:
    """Directory of the throwaway certificates that test/certs/make-certs.sh writes."""
    out_dir = tmp_path_factory.mktemp("certs")
    subprocess.run(
        ["bash", str(MAKE_CERTS_SCRIPT), str(out_dir)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return out_dir
