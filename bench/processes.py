"""Start, wait for and stop the processes of a benchmark run, each by its PID.

Every process started through this module is recorded until it is stopped, so that
stop_all() can end the ones still running when the run fails or is interrupted. Every wait
has a deadline.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional, TypeVar

POLL_INTERVAL = 0.02
STOP_TIMEOUT = 5.0

T = TypeVar("T")


class BenchError(RuntimeError):
    """A process did not start, did not become ready, or a workload failed."""


class Process:
    """One child process whose stdout and stderr go to a log file."""

    def __init__(self, name: str, argv: list[str], log_path: Path) -> None:
        self.name = name
        self.argv = [str(arg) for arg in argv]
        self.log_path = log_path
        self.popen: Optional[subprocess.Popen] = None

    def start(self) -> "Process":
        with open(self.log_path, "ab") as log:
            log.write(f"# {' '.join(self.argv)}\n".encode())
            log.flush()
            self.popen = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        _live_processes.append(self)
        return self

    @property
    def pid(self) -> int:
        if self.popen is None:
            raise BenchError(f"{self.name} was never started")
        return self.popen.pid

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, max_lines: int = 20) -> str:
        return "".join(self.log_text().splitlines(keepends=True)[-max_lines:])

    def vmhwm_mib(self) -> float:
        return vmhwm_mib(self.pid)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Send SIGTERM, wait up to TIMEOUT seconds, then SIGKILL. Safe to call twice."""
        if self.popen is None:
            return
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=timeout)
        if self in _live_processes:
            _live_processes.remove(self)

    def kill(self) -> None:
        """Send SIGKILL and wait for the process to exit."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(timeout=STOP_TIMEOUT)
        if self in _live_processes:
            _live_processes.remove(self)


# Processes started and not yet stopped, oldest first.
_live_processes: list[Process] = []


def stop_all() -> None:
    """Stop every process that is still running, newest first."""
    for process in reversed(list(_live_processes)):
        try:
            process.stop()
        except (OSError, subprocess.SubprocessError) as error:
            print(f"bench: failed to stop {process.name} (pid {process.pid}): {error}")


def wait_until(condition: Callable[[], T], timeout: float, what: str,
               process: Optional[Process] = None) -> T:
    """Poll CONDITION until it returns a true value, or raise BenchError after TIMEOUT seconds.

    When PROCESS exits first, the error shows the end of its log.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if process is not None and not process.running():
            raise BenchError(
                f"{process.name} exited before {what}; end of {process.log_path}:\n"
                + process.log_tail()
            )
        if time.monotonic() >= deadline:
            detail = ""
            if process is not None:
                detail = f"; end of {process.log_path}:\n{process.log_tail()}"
            raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}{detail}")
        time.sleep(POLL_INTERVAL)


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free a moment ago. Another process may still take it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_accepts(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def vmhwm_mib(pid: int) -> float:
    """Return the peak resident set size (VmHWM in /proc/PID/status) of PID, in MiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmHWM:\s+(\d+)\s+kB$", status, re.MULTILINE)
    if match is None:
        raise BenchError(f"no VmHWM line in /proc/{pid}/status")
    return int(match.group(1)) / 1024


def descendants(pid: int) -> list[int]:
    """Return the PIDs of all descendants of PID, read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name in brackets may contain spaces, so split after its closing bracket.
        fields = stat[stat.rfind(")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found = []
    pending = [pid]
    while pending and len(found) < 10000:
        parent = pending.pop()
        for child in children.get(parent, []):
            found.append(child)
            pending.append(child)
    return found


def end_pid(pid: int, timeout: float = STOP_TIMEOUT) -> None:
    """Send SIGTERM to PID, which is not our child, then SIGKILL if it outlives TIMEOUT."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists() or _is_zombie(pid):
            return
        time.sleep(POLL_INTERVAL)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rfind(")") + 2 :].startswith("Z")
