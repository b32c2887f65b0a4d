"""The workloads of the benchmark. Each one runs against a started route and returns numbers.

Load comes from wrk (small requests), curl (the 256 MiB body) and inflight_client.py (10,000
requests held at once). Every external command has a timeout.
"""

from __future__ import annotations

import http.client
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from processes import BenchError, Process
from routes import KV_PATH, LARGE_PATH, LARGE_SIZE, Route, TaserRoute, http_get

BENCH_DIR = Path(__file__).resolve().parent
WRK_SCRIPT = BENCH_DIR / "wrk_report.lua"
INFLIGHT_CLIENT = BENCH_DIR / "inflight_client.py"
SYSTEM_PYTHON = "/usr/bin/python3"
GIB = float(1 << 30)

# A request that takes longer than this counts as a wrk timeout error.
WRK_TIMEOUT = "5s"
CURL_MAX_TIME = 300
# Upper bounds on the background transfers of the fairness workload.
MAX_BACKGROUND_TRANSFERS = 100
RESTART_POLL_INTERVAL = 0.010
RESTART_DEADLINE = 30.0
# The bridge starts its reconnect backoff anew after a session that lasted this long.
BACKOFF_RESET_AFTER = 10.5


def run_wrk(route: Route, connections: int, duration: int, path: str = KV_PATH) -> dict:
    """Run wrk with CONNECTIONS keep-alive connections for DURATION seconds.

    Returns the figures of wrk_report.lua plus "rps" (requests per second). Uses two threads,
    or one for a single connection.
    """
    threads = 1 if connections < 2 else 2
    argv = [
        "wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--timeout", WRK_TIMEOUT,
        "-s", str(WRK_SCRIPT), route.url(path),
    ]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    if result.returncode != 0:
        raise BenchError(f"wrk failed on {route.label}: {result.stderr.strip()}")
    report_lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if not report_lines:
        raise BenchError(f"wrk printed no report on {route.label}:\n{result.stdout}")
    report = json.loads(report_lines[-1])
    report["rps"] = report["requests"] / report["duration_s"] if report["duration_s"] else 0.0
    report["error_count"] = sum(report["errors"].values())
    report["connections"] = connections
    return report


def curl_argv(route: Route, path: str) -> list[str]:
    argv = ["curl", "-sS", "-o", "/dev/null", "--max-time", str(CURL_MAX_TIME)]
    if route.cafile is not None:
        argv += ["--cacert", str(route.cafile)]
    return argv + [route.url(path)]


def large_body(route: Route, runs: int) -> dict:
    """Download the 256 MiB file RUNS times with curl.

    Returns the GiB/s of each run and their median.
    """
    rates = []
    for _ in range(runs):
        argv = curl_argv(route, LARGE_PATH)
        argv[1:1] = ["-w", "%{http_code} %{size_download} %{time_total}"]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=CURL_MAX_TIME + 30)
        fields = result.stdout.split()
        if result.returncode != 0 or len(fields) != 3:
            raise BenchError(f"curl failed on {route.label}: {result.stderr.strip()}")
        status, size, seconds = fields[0], int(fields[1]), float(fields[2])
        if status != "200" or size != LARGE_SIZE:
            raise BenchError(
                f"{route.label}: large body returned {status} with {size} bytes, "
                f"expected 200 with {LARGE_SIZE}"
            )
        rates.append(size / seconds / GIB)
    return {"gib_per_s": statistics.median(rates), "runs_gib_per_s": rates}


class BackgroundTransfers:
    """Downloads the 256 MiB file over and over in a thread until stop() is called."""

    def __init__(self, route: Route, time_limit: float) -> None:
        self.route = route
        self.deadline = time.monotonic() + time_limit
        self.stopping = threading.Event()
        self.completed = 0
        self.failed = 0
        self.current: Optional[subprocess.Popen] = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        for _ in range(MAX_BACKGROUND_TRANSFERS):
            if self.stopping.is_set() or time.monotonic() >= self.deadline:
                return
            self.current = subprocess.Popen(
                curl_argv(self.route, LARGE_PATH),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            try:
                returncode = self.current.wait(timeout=max(0.1, self.deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.current.kill()
                self.current.wait()
                return
            if self.stopping.is_set():
                return
            if returncode == 0:
                self.completed += 1
            else:
                self.failed += 1

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        current = self.current
        if current is not None and current.poll() is None:
            current.kill()
            current.wait()
        self.thread.join(timeout=10)


def latency_with_transfer(route: Route, duration: int) -> dict:
    """Run wrk with one connection while 256 MiB downloads run back to back on the route."""
    transfers = BackgroundTransfers(route, time_limit=duration + 30)
    transfers.start()
    try:
        # Let the first download reach full speed before measuring.
        time.sleep(0.5)
        report = run_wrk(route, 1, duration)
    finally:
        transfers.stop()
    report["background_transfers_completed"] = transfers.completed
    report["background_transfers_failed"] = transfers.failed
    return report


def in_flight(route: Route, count: int, round_name: str, time_limit: float) -> dict:
    """Send COUNT requests at once through ROUTE to hold_backend.py and report completions."""
    argv = [
        SYSTEM_PYTHON, str(INFLIGHT_CLIENT), "--port", str(route.port), "--count", str(count),
        "--round", round_name, "--timeout", str(time_limit),
    ]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=time_limit + 60)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise BenchError(f"inflight_client.py printed no result:\n{result.stderr[-2000:]}")
    report = json.loads(lines[-1])
    report["memory_mib"] = route.memory_mib()
    return report


def broker_restart(route: TaserRoute, runs: int) -> dict:
    """SIGKILL the broker, start it again on the same ports, and time the first 200 response.

    Polls with a new connection every 10 ms. Before each run, waits until the bridge's session
    is old enough that its reconnect backoff starts from --reconnect-min again.
    """
    if route.broker is None:
        raise BenchError(f"{route.label} is not started")
    runs_ms = []
    listening_ms = []
    last_connect = time.monotonic() - BACKOFF_RESET_AFTER
    for _ in range(runs):
        time.sleep(max(0.0, last_connect + BACKOFF_RESET_AFTER - time.monotonic()))
        connections_before = route.bridge_connections()
        started = time.monotonic()
        route.broker.kill()
        route.start_broker()
        first_listening = None
        served = None
        while time.monotonic() - started < RESTART_DEADLINE:
            try:
                status, _ = http_get(route.port, KV_PATH, route.scheme, route.cafile)
            except (OSError, http.client.HTTPException):
                if not route.broker.running():
                    raise BenchError(
                        f"the restarted broker exited; end of {route.broker.log_path}:\n"
                        + route.broker.log_tail()
                    )
                time.sleep(RESTART_POLL_INTERVAL)
                continue
            if first_listening is None:
                first_listening = time.monotonic()
            if status == 200:
                served = time.monotonic()
                break
            time.sleep(RESTART_POLL_INTERVAL)
        if served is None:
            raise BenchError(
                f"no 200 response within {RESTART_DEADLINE:.0f} s of a broker restart; "
                f"end of {route.broker.log_path}:\n{route.broker.log_tail()}"
            )
        runs_ms.append((served - started) * 1000)
        listening_ms.append(((first_listening or served) - started) * 1000)
        last_connect = served
        if route.bridge_connections() <= connections_before:
            print("bench: warning: the bridge logged no new connection after the restart",
                  file=sys.stderr)
    return {
        "median_ms": statistics.median(runs_ms),
        "max_ms": max(runs_ms),
        "runs_ms": runs_ms,
        "first_response_ms": listening_ms,
    }


def profile(route: TaserRoute, duration: int, out_dir: Path, connections: int = 64) -> dict:
    """Record perf call graphs of the broker and the bridge under wrk load, then report them.

    Writes perf-broker.txt and perf-bridge.txt (perf report --stdio) into OUT_DIR.
    """
    if route.broker is None or route.bridge is None:
        raise BenchError(f"{route.label} is not started")
    records = []
    for name, process in (("broker", route.broker), ("bridge", route.bridge)):
        data = out_dir / f"perf-{name}.data"
        records.append((name, data, Process(
            f"perf-{name}",
            ["perf", "record", "-g", "-o", str(data), "-p", str(process.pid),
             "--", "sleep", str(duration)],
            out_dir / f"perf-{name}.log",
        )))
    load = threading.Thread(target=lambda: run_wrk(route, connections, duration + 4), daemon=True)
    load.start()
    time.sleep(1.0)
    for _, _, recorder in records:
        recorder.start()
    for _, _, recorder in records:
        if recorder.popen is not None:
            recorder.popen.wait(timeout=duration + 60)
        recorder.stop()
    load.join(timeout=duration + 120)
    reports = {}
    for name, data, _ in records:
        for suffix, extra in (("", []), ("-self", ["--no-children"])):
            output = out_dir / f"perf-{name}{suffix}.txt"
            with open(output, "w") as report:
                subprocess.run(
                    ["perf", "report", "-i", str(data), "--stdio", *extra],
                    stdout=report, stderr=subprocess.DEVNULL, timeout=300,
                )
            reports[f"{name}{suffix}"] = str(output)
    return reports
