#!/usr/bin/python3
"""Measure taser against direct access, ssh -R and haproxy on loopback, and report the figures.

bench/run installs the tools, builds taser and calls this script, and docs/benchmarks.md
describes the workloads.
Prints a Markdown table of every figure with its ratio to direct access and to ssh -R, then the
targets, and writes the same data as JSON (--output) and Markdown (next to it, .md).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

from processes import BenchError, Process, stop_all, wait_until
from routes import (
    DirectRoute,
    HaproxyRoute,
    Nginx,
    Route,
    SshRoute,
    TaserRoute,
)
import workloads

REPO_ROOT = Path(__file__).resolve().parents[1]
MAKE_CERTS = REPO_ROOT / "test" / "certs" / "make-certs.sh"
HOLD_BACKEND = Path(__file__).resolve().parent / "hold_backend.py"
# Extra descriptors each process needs beyond its sockets: logs, listeners, epoll, certificates.
SPARE_DESCRIPTORS = 200


@dataclass
class Settings:
    """Durations and sizes of one run. FULL and QUICK below are the two presets."""

    mode: str
    rps_connections: list[int]
    rps_seconds: int
    latency_seconds: int
    fairness: bool
    large_runs: int
    inflight_count: int
    inflight_routes: list[str]
    inflight_time_limit: float
    restart_runs: int
    rounds: int
    warmup_seconds: int = 1
    profile_seconds: int = 10


FULL = Settings(
    mode="full",
    rps_connections=[1, 64, 1000],
    rps_seconds=5,
    latency_seconds=5,
    fairness=True,
    large_runs=3,
    inflight_count=10000,
    inflight_routes=["direct", "ssh", "haproxy", "taser-http", "taser-passthrough"],
    inflight_time_limit=60.0,
    restart_runs=3,
    rounds=3,
)

QUICK = Settings(
    mode="quick",
    rps_connections=[64],
    rps_seconds=3,
    latency_seconds=3,
    fairness=False,
    large_runs=1,
    inflight_count=1000,
    inflight_routes=["taser-http"],
    inflight_time_limit=60.0,
    restart_runs=1,
    rounds=1,
)


ROUTE_KEYS = ["direct", "ssh", "haproxy", "taser-http", "taser-https", "taser-passthrough"]


@dataclass
class Workload:
    """One row group of the table: what was measured, in which unit, and which way is better."""

    key: str
    title: str
    unit: str
    higher_is_better: bool
    format_value: Callable[[float], str]


WORKLOADS = [
    Workload("rps_c1", "small requests, 1 connection", "req/s", True, lambda v: f"{v:,.0f}"),
    Workload("rps_c64", "small requests, 64 connections", "req/s", True, lambda v: f"{v:,.0f}"),
    Workload("rps_c1000", "small requests, 1,000 connections", "req/s", True,
             lambda v: f"{v:,.0f}"),
    Workload("latency_p50", "median latency, 1 connection", "µs", False, lambda v: f"{v:,.0f}"),
    Workload("latency_p99", "p99 latency, 1 connection", "µs", False, lambda v: f"{v:,.0f}"),
    Workload("latency_p99_transfer", "p99 latency during 256 MiB transfers", "µs", False,
             lambda v: f"{v:,.0f}"),
    Workload("large_body", "one 256 MiB body", "GiB/s", True, lambda v: f"{v:.2f}"),
    Workload("inflight_seconds", "requests held at once: time until all completed", "s", False,
             lambda v: f"{v:.2f}"),
    Workload("inflight_rss", "requests held at once: largest peak RSS of one process", "MiB",
             False, lambda v: f"{v:.1f}"),
    Workload("restart_ms", "broker SIGKILL and start to first 200 (median)", "ms", False,
             lambda v: f"{v:,.0f}"),
]


@dataclass
class Figure:
    workload: str
    route: str
    value: Optional[float]
    note: str = ""
    detail: dict = field(default_factory=dict)


class Bench:
    """Runs the workloads of SETTINGS and collects one Figure per workload and route."""

    def __init__(self, settings: Settings, taser_bin: Path, work_dir: Path,
                 route_keys: list[str]) -> None:
        self.settings = settings
        self.route_keys = route_keys
        self.taser_bin = taser_bin
        self.work_dir = work_dir
        self.certs = work_dir / "certs"
        self.figures: list[Figure] = []
        self.route_labels: dict[str, str] = {}
        self.route_errors: dict[str, str] = {}
        self.ssh_cipher = ""

    # -- helpers ---------------------------------------------------------------------------

    def record(self, workload: str, route: Route, value: Optional[float], note: str = "",
               detail: Optional[dict] = None) -> None:
        self.figures.append(Figure(workload, route.key, value, note, detail or {}))
        printed_value = "failed" if value is None else f"{value:,.2f}"
        print(f"bench: {workload:<22} {route.label:<18} {printed_value} {note}", file=sys.stderr)

    def measure(self, workload: str, route: Route, action: Callable[[], None]) -> None:
        """Run ACTION, and record a failed figure with the message when it raises BenchError."""
        try:
            action()
        except (BenchError, subprocess.TimeoutExpired, OSError) as error:
            self.record(workload, route, None, note=f"failed: {str(error).splitlines()[0]}",
                        detail={"error": str(error)})

    def make_route(self, key: str, target_port: int, broker_args: tuple[str, ...] = (),
                   bridge_args: tuple[str, ...] = ()) -> Route:
        if key == "direct":
            return DirectRoute(self.work_dir, target_port)
        if key == "ssh":
            return SshRoute(self.work_dir, target_port, name=f"ssh-{target_port}")
        if key == "haproxy":
            return HaproxyRoute(self.work_dir, target_port)
        mode = key.removeprefix("taser-")
        return TaserRoute(self.work_dir, target_port, self.taser_bin, self.certs, mode,
                          broker_args, bridge_args)

    def start_routes(self, keys: list[str], target_port: int) -> list[Route]:
        started = []
        for key in keys:
            route = self.make_route(key, target_port)
            self.route_labels[route.key] = route.label
            try:
                route.start()
                route.check()
            except (BenchError, subprocess.SubprocessError, OSError) as error:
                self.route_errors[route.key] = str(error)
                print(f"bench: {route.label} did not start: {error}", file=sys.stderr)
                route.stop()
                continue
            if isinstance(route, SshRoute):
                self.ssh_cipher = route.cipher
            started.append(route)
        return started

    # -- workloads -------------------------------------------------------------------------

    def run_rounds(self, routes: list[Route], cases: list[str],
                   run_case: Callable[[Route, str], dict]) -> dict[tuple[str, str], list[dict]]:
        """Run every case on every route, SETTINGS.rounds times, rounds outermost.

        Interleaving the routes within each round spreads a spell of load from other programs
        over all routes, instead of over the one that happened to run then. Returns the
        reports of each (case, route key), and records a failed figure for a case that
        failed in every round.
        """
        reports: dict[tuple[str, str], list[dict]] = {}
        errors: dict[tuple[str, str], str] = {}
        for _ in range(self.settings.rounds):
            for case in cases:
                for route in routes:
                    try:
                        reports.setdefault((case, route.key), []).append(run_case(route, case))
                    except (BenchError, subprocess.TimeoutExpired, OSError) as error:
                        errors[(case, route.key)] = str(error)
        for (case, key), error in errors.items():
            if not reports.get((case, key)):
                route = next(r for r in routes if r.key == key)
                self.record(case, route, None, note=f"failed: {error.splitlines()[0]}",
                            detail={"error": error})
        return reports

    def run_throughput(self, routes: list[Route]) -> None:
        for route in routes:
            self.measure("warmup", route, lambda: workloads.run_wrk(
                route, 64, self.settings.warmup_seconds))
        cases = [f"rps_c{connections}" for connections in self.settings.rps_connections]

        def run_case(route: Route, case: str) -> dict:
            connections = int(case.removeprefix("rps_c"))
            return workloads.run_wrk(route, connections, self.settings.rps_seconds)

        reports = self.run_rounds(routes, cases, run_case)
        for case in cases:
            for route in routes:
                rounds = reports.get((case, route.key))
                if not rounds:
                    continue
                errors = sum(report["error_count"] for report in rounds)
                note = f"{errors} errors" if errors else ""
                if len(rounds) > 1:
                    each = ", ".join(f"{report['rps']:,.0f}" for report in rounds)
                    note = f"rounds {each}" + (f"; {note}" if note else "")
                self.record(case, route, statistics.median(r["rps"] for r in rounds), note,
                            {"rounds": rounds})

    def run_latency(self, routes: list[Route]) -> None:
        cases = ["idle", "transfer"] if self.settings.fairness else ["idle"]

        def run_case(route: Route, case: str) -> dict:
            if case == "idle":
                return workloads.run_wrk(route, 1, self.settings.latency_seconds)
            return workloads.latency_with_transfer(route, self.settings.latency_seconds)

        reports = self.run_rounds(routes, cases, run_case)
        for route in routes:
            idle = reports.get(("idle", route.key))
            if not idle:
                continue
            p50 = statistics.median(report["latency_us"]["p50"] for report in idle)
            idle_p99 = statistics.median(report["latency_us"]["p99"] for report in idle)
            self.record("latency_p50", route, p50, detail={"rounds": idle})
            self.record("latency_p99", route, idle_p99, detail={"rounds": idle})
            loaded = reports.get(("transfer", route.key))
            if not loaded:
                continue
            loaded_p99 = statistics.median(report["latency_us"]["p99"] for report in loaded)
            factor = loaded_p99 / max(1.0, idle_p99)
            transfers = sum(report["background_transfers_completed"] for report in loaded)
            self.record(
                "latency_p99_transfer", route, loaded_p99,
                note=f"{factor:.1f}x its idle p99; {transfers} transfers completed",
                detail={"rounds": loaded, "idle_p99_us": idle_p99, "p99_factor": factor},
            )

    def run_large_body(self, routes: list[Route]) -> None:
        for route in routes:
            def measure_large(route: Route = route) -> None:
                report = workloads.large_body(route, self.settings.large_runs)
                self.record("large_body", route, report["gib_per_s"], detail=report)
            self.measure("large_body", route, measure_large)

    def run_inflight(self) -> None:
        count = self.settings.inflight_count
        backend = self.start_hold_backend()
        soft_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        for key in (k for k in self.settings.inflight_routes if k in self.route_keys):
            # haproxy uses two sockets per connection in one process, the other routes one.
            per_process = 2 * count if key == "haproxy" else count
            if soft_limit < per_process + SPARE_DESCRIPTORS:
                self.route_labels.setdefault(key, key)
                placeholder = self.make_route(key, backend)
                self.record("inflight_seconds", placeholder, None,
                            note=f"not run: needs {per_process + SPARE_DESCRIPTORS} open files "
                            f"in one process, limit is {soft_limit}")
                continue
            extra_broker = ("--max-client-connections", str(count + 1024))
            extra_bridge = ("--vault-max-connections", str(count + 1024))
            route = self.make_route(key, backend, extra_broker, extra_bridge)
            if isinstance(route, HaproxyRoute):
                route.max_connections = count + 1024
            self.route_labels[route.key] = route.label
            try:
                route.start()
            except (BenchError, subprocess.SubprocessError, OSError) as error:
                self.record("inflight_seconds", route, None, note=f"failed to start: {error}")
                route.stop()
                continue
            try:
                self.measure_inflight(route, count)
            finally:
                route.stop()

    def start_hold_backend(self) -> int:
        ready_file = self.work_dir / "hold_backend.port"
        process = Process(
            "hold_backend",
            [workloads.SYSTEM_PYTHON, str(HOLD_BACKEND), "--listen", "127.0.0.1:0",
             "--ready-file", str(ready_file),
             "--max-wait", str(self.settings.inflight_time_limit - 10)],
            self.work_dir / "hold_backend.log",
        ).start()

        def read_port() -> int:
            try:
                return int(ready_file.read_text().strip() or 0)
            except (FileNotFoundError, ValueError):
                return 0

        return wait_until(read_port, 30, "hold_backend.py to listen", process)

    def measure_inflight(self, route: Route, count: int) -> None:
        def run() -> None:
            report = workloads.in_flight(route, count, f"{route.key}-{time.monotonic_ns()}",
                                         self.settings.inflight_time_limit)
            memory = report["memory_mib"]
            memory_note = ", ".join(f"{name} {mib:.1f} MiB" for name, mib in memory.items())
            outcome = f"{report['ok']}/{count} completed"
            if report["failed"]:
                outcome += f", failures {report['failed']}"
            value = report["elapsed_s"] if report["ok"] == count else None
            self.record("inflight_seconds", route, value, note=outcome, detail=report)
            if memory:
                self.record("inflight_rss", route, max(memory.values()), note=memory_note,
                            detail=report)
        self.measure("inflight_seconds", route, run)

    def run_restart(self, route: TaserRoute) -> None:
        def run() -> None:
            report = workloads.broker_restart(route, self.settings.restart_runs)
            runs = ", ".join(f"{ms:.0f}" for ms in report["runs_ms"])
            self.record("restart_ms", route, report["median_ms"],
                        note=f"runs {runs} ms; max {report['max_ms']:.0f} ms", detail=report)
        self.measure("restart_ms", route, run)

    def run_all(self) -> None:
        nginx = Nginx(self.work_dir)
        nginx.write_content()
        nginx.start()
        routes = self.start_routes(self.route_keys, nginx.port)
        self.run_throughput(routes)
        self.run_latency(routes)
        self.run_large_body(routes)
        # The in-flight workload starts routes of its own towards hold_backend.py, and the
        # restart workload kills a broker, so both come after the others.
        self.run_inflight()
        taser_http = next((r for r in routes if r.key == "taser-http"), None)
        if isinstance(taser_http, TaserRoute):
            self.run_restart(taser_http)
        for route in reversed(routes):
            route.stop()
        nginx.stop()

    def run_profile(self, out_dir: Path) -> dict:
        nginx = Nginx(self.work_dir)
        nginx.write_content()
        nginx.start()
        routes = self.start_routes(["taser-http"], nginx.port)
        if not routes:
            raise BenchError(f"taser http did not start: {self.route_errors.get('taser-http')}")
        route = routes[0]
        assert isinstance(route, TaserRoute)
        workloads.run_wrk(route, 64, self.settings.warmup_seconds)
        reports = workloads.profile(route, self.settings.profile_seconds, out_dir)
        route.stop()
        nginx.stop()
        return reports


# -- report ------------------------------------------------------------------------------------


def figure_value(figures: list[Figure], workload: str, route: str) -> Optional[float]:
    for figure in figures:
        if figure.workload == workload and figure.route == route:
            return figure.value
    return None


def ratio(value: Optional[float], reference: Optional[float]) -> str:
    if value is None or not reference:
        return "-"
    return f"{value / reference:.2f}"


def table_lines(bench: Bench) -> list[str]:
    lines = [
        "| workload | route | value | unit | ÷ direct | ÷ ssh -R | notes |",
        "| --- | --- | ---: | --- | ---: | ---: | --- |",
    ]
    for workload in WORKLOADS:
        for figure in bench.figures:
            if figure.workload != workload.key:
                continue
            direct = figure_value(bench.figures, workload.key, "direct")
            ssh = figure_value(bench.figures, workload.key, "ssh")
            printed_value = "-" if figure.value is None else workload.format_value(figure.value)
            note = figure.note
            if workload.key == "latency_p50" and figure.value is not None and direct is not None \
                    and figure.route != "direct":
                note = f"{figure.value - direct:+,.0f} µs against direct"
            label = bench.route_labels.get(figure.route, figure.route)
            lines.append(
                f"| {workload.title} | {label} | {printed_value} | {workload.unit} | "
                f"{ratio(figure.value, direct)} | {ratio(figure.value, ssh)} | {note} |"
            )
    return lines


@dataclass
class Target:
    name: str
    route: str
    met: Optional[bool]
    measured: str


def evaluate_targets(bench: Bench) -> list[Target]:
    """Check each target against the figures of every taser route that has them.

    A target whose figure is missing, or was not measured at its full size, has met=None.
    """
    figures = bench.figures
    targets = []
    taser_routes = [key for key in bench.route_labels if key.startswith("taser-")]
    for route in taser_routes:
        rps = figure_value(figures, "rps_c64", route)
        direct = figure_value(figures, "rps_c64", "direct")
        ssh = figure_value(figures, "rps_c64", "ssh")
        if rps is not None and direct and ssh:
            targets.append(Target(
                "64-connection throughput >= 2x ssh -R and >= 0.5x direct", route,
                rps >= 2 * ssh and rps >= 0.5 * direct,
                f"{rps / ssh:.2f}x ssh -R, {rps / direct:.2f}x direct"))
        else:
            targets.append(Target("64-connection throughput >= 2x ssh -R and >= 0.5x direct",
                                  route, None, "not measured"))

        p50 = figure_value(figures, "latency_p50", route)
        direct_p50 = figure_value(figures, "latency_p50", "direct")
        if p50 is not None and direct_p50 is not None:
            added = p50 - direct_p50
            targets.append(Target("median latency <= direct + 100 µs", route, added <= 100,
                                  f"+{added:.0f} µs"))

        large = figure_value(figures, "large_body", route)
        if large is not None:
            targets.append(Target("256 MiB body >= 1 GiB/s", route, large >= 1.0,
                                  f"{large:.2f} GiB/s"))

        inflight = [f for f in figures if f.workload == "inflight_seconds" and f.route == route]
        if inflight:
            detail = inflight[0].detail
            memory = detail.get("memory_mib", {})
            complete = inflight[0].value is not None
            full_size = bench.settings.inflight_count >= 10000
            under = bool(memory) and all(mib < 100 for mib in memory.values())
            measured = f"{detail.get('ok', 0)}/{bench.settings.inflight_count} completed; " + \
                ", ".join(f"{name} {mib:.1f} MiB" for name, mib in memory.items())
            targets.append(Target(
                "10,000 in flight complete, each process < 100 MiB", route,
                (complete and under) if full_size else None,
                measured if full_size else f"only {bench.settings.inflight_count}: {measured}"))

        loaded = [f for f in figures if f.workload == "latency_p99_transfer" and f.route == route]
        if loaded and loaded[0].value is not None:
            factor = loaded[0].detail["p99_factor"]
            targets.append(Target("p99 during a large transfer <= 2x idle p99", route,
                                  factor <= 2.0, f"{factor:.1f}x"))

        restart = [f for f in figures if f.workload == "restart_ms" and f.route == route]
        if restart and restart[0].value is not None:
            worst = restart[0].detail["max_ms"]
            targets.append(Target("first request <= 1 s after a broker restart", route,
                                  worst <= 1000, f"max {worst:.0f} ms"))
    return targets


def target_lines(targets: list[Target], labels: dict[str, str]) -> list[str]:
    lines = ["| target | route | measured | met |", "| --- | --- | --- | --- |"]
    for target in targets:
        met = {True: "yes", False: "no", None: "not measured"}[target.met]
        lines.append(f"| {target.name} | {labels.get(target.route, target.route)} | "
                     f"{target.measured} | {met} |")
    return lines


# -- environment -------------------------------------------------------------------------------


def load_average() -> list[float]:
    return [float(field) for field in Path("/proc/loadavg").read_text().split()[:3]]


def machine_info() -> dict:
    cpu_model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    mem_total_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_total_kib = int(line.split()[1])
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "kernel": platform.release(),
        "memory_gib": round(mem_total_kib / (1 << 20), 1),
        "open_files_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
    }


def command_output(argv: list[str]) -> str:
    """Return the first line a version command prints, on stdout or stderr."""
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"unavailable: {error}"
    text = (result.stdout or result.stderr).strip()
    return text.splitlines()[0] if text else ""


def software_info(taser_bin: Path, taser_copy: Path) -> dict:
    commit = command_output(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"])
    status = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain"],
                            capture_output=True, text=True, timeout=30).stdout
    return {
        "taser": command_output([str(taser_copy), "version"]),
        "taser_binary": str(taser_bin),
        "taser_sha256": hashlib.sha256(taser_copy.read_bytes()).hexdigest(),
        "git_commit": commit,
        "git_worktree_changed": bool(status.strip()),
        "nginx": command_output(["nginx", "-v"]),
        "haproxy": command_output(["haproxy", "-v"]),
        "wrk": command_output(["wrk", "-v"]),
        "openssh": command_output(["ssh", "-V"]),
        "curl": command_output(["curl", "--version"]),
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true",
                        help="shorter runs and fewer workloads (about a minute)")
    parser.add_argument("--profile", action="store_true",
                        help="only record perf profiles of the broker and the bridge under "
                        "64 connections, into the folder of --output")
    parser.add_argument("--taser", type=Path, default=REPO_ROOT / "build" / "release" / "taser",
                        help="taser binary (default: build/release/taser)")
    parser.add_argument("--output", type=Path,
                        default=REPO_ROOT / "bench" / "results" / "latest.json",
                        help="JSON file to write; the Markdown table goes next to it as .md")
    parser.add_argument("--routes", type=lambda text: text.split(","),
                        help="comma-separated routes to measure, of " + ", ".join(ROUTE_KEYS) +
                        " (default: all)")
    parser.add_argument("--keep-work", action="store_true",
                        help="keep the temporary folder with logs and configs")
    return parser.parse_args()


def raise_on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main() -> int:
    args = parse_args()
    signal.signal(signal.SIGTERM, raise_on_sigterm)
    if not args.taser.exists():
        print(f"bench: taser binary not found: {args.taser}; build it with "
              "'cmake --preset release && cmake --build --preset release'", file=sys.stderr)
        return 2
    settings = QUICK if args.quick else FULL
    work_dir = Path(tempfile.mkdtemp(prefix="taser-bench."))
    # Run a copy, so that a rebuild during the run cannot mix two builds in one report.
    taser_copy = work_dir / "taser"
    shutil.copy2(args.taser, taser_copy)
    software = software_info(args.taser, taser_copy)
    route_keys = args.routes or ROUTE_KEYS
    unknown = [key for key in route_keys if key not in ROUTE_KEYS]
    if unknown:
        print(f"bench: unknown route {', '.join(unknown)}; routes are {', '.join(ROUTE_KEYS)}",
              file=sys.stderr)
        return 2
    bench = Bench(settings, taser_copy, work_dir, route_keys)
    started_at = datetime.datetime.now(datetime.timezone.utc)
    load_before = load_average()
    print(f"bench: {settings.mode} run, work folder {work_dir}, load {load_before}",
          file=sys.stderr)
    failed = False
    try:
        subprocess.run(["bash", str(MAKE_CERTS), str(bench.certs)], check=True,
                       capture_output=True, timeout=120)
        if args.profile:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            reports = bench.run_profile(args.output.parent)
            for name, path in reports.items():
                print(f"bench: perf report of the {name}: {path}")
            return 0
        bench.run_all()
    except BaseException:
        failed = True
        raise
    finally:
        stop_all()
        if args.keep_work or failed:
            print(f"bench: logs kept in {work_dir}", file=sys.stderr)
        else:
            shutil.rmtree(work_dir, ignore_errors=True)

    targets = evaluate_targets(bench)
    report = {
        "schema": 1,
        "mode": settings.mode,
        "started_at": started_at.isoformat(timespec="seconds"),
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "machine": machine_info(),
        "software": software,
        "ssh_cipher": bench.ssh_cipher,
        "settings": asdict(settings),
        "routes": bench.route_labels,
        "route_errors": bench.route_errors,
        "results": [asdict(figure) for figure in bench.figures],
        "targets": [asdict(target) for target in targets],
    }
    table = table_lines(bench)
    target_table = target_lines(targets, bench.route_labels)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    markdown = args.output.with_suffix(".md")
    machine = report["machine"]
    header = [
        f"{settings.mode} run, {report['started_at']}, {machine['nproc']} x "
        f"{machine['cpu_model']}, kernel {machine['kernel']}, load average before "
        f"{load_before[0]:.2f} and after {report['load_average_after'][0]:.2f}",
        "",
        "Ratios divide the figure by the same figure of direct access or ssh -R, so above 1 "
        "is better for req/s and GiB/s and worse for µs, s, MiB and ms.",
        "",
    ]
    markdown.write_text("\n".join(header + table + [""] + target_table) + "\n")
    print("\n".join([""] + header + table + [""] + target_table))
    print(f"\nbench: wrote {args.output} and {markdown}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as error:
        print(f"bench: error: {error}", file=sys.stderr)
        sys.exit(1)
