"""Start, watch and stop the processes of taser's end-to-end tests.

Every process is started on loopback, logs to its own file, and is stopped by its PID: SIGTERM
first, SIGKILL after a timeout. Every wait in this module has a deadline.
"""

from __future__ import annotations

import atexit
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

REPO_ROOT = Path(__file__).resolve().parents[2]
STANDIN_SCRIPT = REPO_ROOT / "test" / "vault_standin" / "vault_standin.py"
MAKE_CERTS_SCRIPT = REPO_ROOT / "test" / "certs" / "make-certs.sh"

# Debian's interpreter, which can import python3-hvac. The `python3` on PATH may be another one.
SYSTEM_PYTHON = "/usr/bin/python3"

# Deadlines in seconds. A sanitizer build starts and handshakes several times slower than a
# release build, so these leave room for that on a loaded 2-core machine.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
POLL_INTERVAL = 0.05

# Lines that AddressSanitizer, LeakSanitizer and UndefinedBehaviorSanitizer print when they find
# an error. Any of them in a taser log fails the test that started the process.
SANITIZER_REPORT = re.compile(
    r"ERROR: (AddressSanitizer|LeakSanitizer)|runtime error:|WARNING: ThreadSanitizer"
)

TCP_LISTEN_STATE = "0A"

# How many times to start a broker again when a port from free_port() was taken meanwhile.
PORT_RETRIES = 3


class ProcessError(RuntimeError):
    """A managed process exited or did not reach the expected state in time."""


# ---------------------------------------------------------------------------------------------
# Inspection helpers


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free on HOST a moment ago.

    Another process may take the port before the caller binds it; prefer port 0 where the
    program under test reports the port it bound.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def vmhwm_kib(pid: int) -> int:
    """Return the peak resident set size (VmHWM) of process PID, in KiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmHWM:\s+(\d+)\s+kB$", status, re.MULTILINE)
    if match is None:
        raise ProcessError(f"no VmHWM line in /proc/{pid}/status")
    return int(match.group(1))


# Memory scans read this much of /proc/PID/mem at a time.
MEMORY_SCAN_CHUNK = 16 << 20


def _dumpable_mappings(pid: int) -> list[tuple[int, int]]:
    """Return the (start, end) of each mapping of PID that a core file would contain.

    Kept: readable mappings, except those marked "dd" (MADV_DONTDUMP, such as AddressSanitizer's
    shadow memory), [vvar] and [vsyscall]. Reservations without permissions are left out
    because they hold no data.
    """
    mappings = []
    current: Optional[tuple[int, int, str, str]] = None
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        header = re.match(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+\s*(.*)$", line)
        if header:
            start, end, permissions, name = header.groups()
            current = (int(start, 16), int(end, 16), permissions, name)
            continue
        if line.startswith("VmFlags:") and current is not None:
            start, end, permissions, name = current
            flags = line.split()[1:]
            if (
                permissions.startswith("r")
                and "dd" not in flags
                and name not in ("[vvar]", "[vsyscall]")
            ):
                mappings.append((start, end))
            current = None
    return mappings


def scan_process_memory(pid: int, needles: Iterable[bytes]) -> dict[bytes, int]:
    """Count each of NEEDLES in the memory that a core file of process PID would contain.

    The process is stopped with SIGSTOP while its memory is read from /proc/PID/mem, and
    continued afterwards. This is what a search of a `gcore` file finds, without writing the
    file: gdb 13 also writes the mappings without permissions, and AddressSanitizer reserves
    terabytes of those, so a core file of a sanitizer build would not fit on the disk.
    """
    needles = list(needles)
    counts = {needle: 0 for needle in needles}
    overlap = max(len(needle) for needle in needles) - 1
    os.kill(pid, signal.SIGSTOP)
    try:
        with open(f"/proc/{pid}/mem", "rb", buffering=0) as memory:
            for start, end in _dumpable_mappings(pid):
                tail = b""
                address = start
                while address < end:
                    size = min(MEMORY_SCAN_CHUNK, end - address)
                    try:
                        memory.seek(address)
                        chunk = memory.read(size)
                    except OSError:
                        # Some mappings (device memory, guard pages) cannot be read.
                        break
                    if not chunk:
                        break
                    window = tail + chunk
                    for needle in needles:
                        # Only matches that end in the new chunk count: the others were counted
                        # with the previous chunk.
                        first_new_match = max(0, len(tail) - len(needle) + 1)
                        counts[needle] += window[first_new_match:].count(needle)
                    tail = window[-overlap:] if overlap > 0 else b""
                    address += len(chunk)
    finally:
        os.kill(pid, signal.SIGCONT)
    return counts


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for entry in fd_dir.iterdir():
        try:
            target = os.readlink(entry)
        except OSError:
            # The descriptor was closed between listing and reading it.
            continue
        match = re.fullmatch(r"socket:\[(\d+)\]", target)
        if match:
            inodes.add(match.group(1))
    return inodes


def _decode_proc_net_address(hex_address: str) -> tuple[str, int]:
    """Decode an "ADDRESS:PORT" field of /proc/net/tcp or tcp6 into (ip, port).

    The kernel prints the address as 32-bit words in host byte order (little-endian on x86-64)
    and the port in big-endian hex.
    """
    hex_ip, hex_port = hex_address.split(":")
    raw = bytes.fromhex(hex_ip)
    # Reverse the bytes inside each 32-bit word to get network byte order.
    network_order = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    family = socket.AF_INET if len(network_order) == 4 else socket.AF_INET6
    return socket.inet_ntop(family, network_order), int(hex_port, 16)


def listening_sockets(pid: int) -> list[tuple[str, int]]:
    """Return the (ip, port) of every TCP socket in LISTEN state that process PID holds.

    Reads /proc/PID/net/tcp and tcp6, which show the process's own network namespace, and keeps
    the rows whose inode is one of the process's socket descriptors.
    """
    inodes = _socket_inodes(pid)
    found = []
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            columns = line.split()
            if len(columns) < 10:
                continue
            local_address, state, inode = columns[1], columns[3], columns[9]
            if state == TCP_LISTEN_STATE and inode in inodes:
                found.append(_decode_proc_net_address(local_address))
    return found


def log_events(path: Path | str, offset: int = 0) -> list[dict[str, Any]]:
    """Parse the JSON-object lines of a log file, starting at byte OFFSET.

    Lines that are not JSON objects (sanitizer reports, a partial last line) are skipped.
    """
    events = []
    with open(path, "rb") as log:
        log.seek(offset)
        data = log.read()
    for raw_line in data.split(b"\n"):
        line = raw_line.strip()
        if not line.startswith(b"{"):
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            events.append(event)
    return events


def sanitizer_reports(path: Path | str) -> list[str]:
    """Return the lines of a log file that start a sanitizer error report."""
    with open(path, "r", errors="replace") as log:
        return [line.rstrip("\n") for line in log if SANITIZER_REPORT.search(line)]


def log_tail(path: Path | str, max_lines: int = 40) -> str:
    """Return the last lines of a log file, for failure messages."""
    try:
        with open(path, "r", errors="replace") as log:
            lines = log.readlines()
    except OSError as error:
        return f"(cannot read {path}: {error})"
    return "".join(lines[-max_lines:])


def parse_host_port(address: str) -> tuple[str, int]:
    """Split "HOST:PORT" or "[V6]:PORT" into (host, port)."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def replace_options(argv: list[str], replacements: dict[str, Optional[str]]) -> list[str]:
    """Return ARGV with the value of each "--option VALUE" pair named in REPLACEMENTS replaced.

    A replacement of None drops the option and its value. Raises ValueError when an option of
    REPLACEMENTS is not in ARGV, so that a renamed option cannot go unnoticed.
    """
    result = []
    found = set()
    index = 0
    while index < len(argv):
        arg = argv[index]
        if arg in replacements and index + 1 < len(argv):
            found.add(arg)
            if replacements[arg] is not None:
                result += [arg, str(replacements[arg])]
            index += 2
            continue
        result.append(arg)
        index += 1
    missing = set(replacements) - found
    if missing:
        raise ValueError(f"options not in the command line: {sorted(missing)}")
    return result


def make_certs(out_dir: Path) -> Path:
    """Run test/certs/make-certs.sh into OUT_DIR and return OUT_DIR."""
    subprocess.run(
        ["bash", str(MAKE_CERTS_SCRIPT), str(out_dir)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return out_dir


# ---------------------------------------------------------------------------------------------
# Managed processes


def _matches(event: dict[str, Any], name: str, fields: dict[str, Any]) -> bool:
    if event.get("event") != name:
        return False
    return all(event.get(key) == value for key, value in fields.items())


# Processes started and not yet stopped. The exit handler stops them if a test run is cut short
# before the fixtures' teardown runs.
_live_processes: set["ManagedProcess"] = set()


@atexit.register
def _stop_live_processes() -> None:
    for process in list(_live_processes):
        process.stop(timeout=2.0)


class ManagedProcess:
    """One child process whose stdout and stderr go to a log file, stopped by its PID."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        log_path: Path,
        env: Optional[dict[str, str]] = None,
        cwd: Optional[Path] = None,
    ) -> None:
        self.name = name
        self.argv = [str(arg) for arg in argv]
        self.log_path = log_path
        self.env = env
        self.cwd = cwd
        self.popen: Optional[subprocess.Popen] = None
        self.returncode: Optional[int] = None
        self.killed = False

    def start(self) -> "ManagedProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"# {' '.join(self.argv)}\n".encode())
            log.flush()
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
            )
        _live_processes.add(self)
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None, f"{self.name} was never started"
        return self.popen.pid

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log_offset(self) -> int:
        """Return the current size of the log, to wait only for events logged after now."""
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def events(self, offset: int = 0) -> list[dict[str, Any]]:
        return log_events(self.log_path, offset)

    def find_events(self, name: str, offset: int = 0, **fields: Any) -> list[dict[str, Any]]:
        return [event for event in self.events(offset) if _matches(event, name, fields)]

    def describe_failure(self, message: str) -> str:
        tail = log_tail(self.log_path)
        return f"{self.name} (pid {self.pid}): {message}\n--- {self.log_path}:\n{tail}"

    def wait_until(self, condition: Callable[[], Any], timeout: float, what: str) -> Any:
        """Poll CONDITION until it returns a true value, the process exits, or TIMEOUT passes."""
        deadline = time.monotonic() + timeout
        while True:
            result = condition()
            if result:
                return result
            if not self.running():
                # One last look: the process may have logged the event just before exiting.
                result = condition()
                if result:
                    return result
                raise ProcessError(
                    self.describe_failure(f"exited with {self.popen.returncode} before {what}")
                )
            if time.monotonic() >= deadline:
                raise ProcessError(
                    self.describe_failure(f"timed out after {timeout:.0f} s waiting for {what}")
                )
            time.sleep(POLL_INTERVAL)

    def wait_for_event(
        self, name: str, timeout: float = START_TIMEOUT, offset: int = 0, **fields: Any
    ) -> dict[str, Any]:
        """Wait for a log event named NAME whose keys match FIELDS, logged after byte OFFSET."""

        def find() -> Optional[dict[str, Any]]:
            matching = self.find_events(name, offset, **fields)
            return matching[0] if matching else None

        detail = f" with {fields}" if fields else ""
        return self.wait_until(find, timeout, f"log event {name!r}{detail}")

    def stop(self, timeout: float = STOP_TIMEOUT) -> Optional[int]:
        """Send SIGTERM, wait up to TIMEOUT, then SIGKILL. Return the exit code.

        Safe to call more than once. A negative exit code is the signal that ended the process.
        """
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            try:
                self.popen.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.killed = True
                self.popen.kill()
                self.popen.wait(timeout=timeout)
        self.returncode = self.popen.returncode
        _live_processes.discard(self)
        return self.returncode


class StandIn(ManagedProcess):
    """The Vault API stand-in (test/vault_standin/vault_standin.py) on a loopback port."""

    def __init__(
        self,
        work_dir: Path,
        name: str = "standin",
        token: str = "root",
        tls_cert: Optional[Path] = None,
        tls_key: Optional[Path] = None,
        env: Optional[dict[str, str]] = None,
    ) -> None:
        self.ready_file = work_dir / f"{name}.port"
        self.record_path = work_dir / f"{name}.record.jsonl"
        self.token = token
        self.tls = tls_cert is not None
        argv = [
            SYSTEM_PYTHON,
            str(STANDIN_SCRIPT),
            "--listen",
            "127.0.0.1:0",
            "--ready-file",
            str(self.ready_file),
            "--record",
            str(self.record_path),
            "--token",
            token,
        ]
        if tls_cert is not None:
            argv += ["--tls-cert", str(tls_cert), "--tls-key", str(tls_key)]
        super().__init__(name, argv, work_dir / f"{name}.log", env=env)
        self.port = 0

    def start(self, timeout: float = START_TIMEOUT) -> "StandIn":
        super().start()

        def read_port() -> int:
            try:
                text = self.ready_file.read_text().strip()
                return int(text) if text else 0
            except (FileNotFoundError, ValueError):
                return 0

        self.port = self.wait_until(read_port, timeout, f"a port in {self.ready_file}")
        return self

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        host = "localhost" if self.tls else "127.0.0.1"
        return f"{scheme}://{host}:{self.port}"

    def records(self) -> list[dict[str, Any]]:
        """Return the requests the stand-in received so far, oldest first."""
        if not self.record_path.exists():
            return []
        return log_events(self.record_path)

    def set_modes(self, timeout: float = 10.0, **modes: Any) -> dict[str, Any]:
        """POST MODES to the stand-in's /_standin/mode and return all modes it then has.

        Keys are those of the stand-in's README, for example standby_redirect="https://..." or
        sealed=True. The request goes straight to the stand-in, not through a broker.
        """
        if self.tls:
            raise ProcessError(f"{self.name}: set_modes() supports only a plain HTTP stand-in")
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            body = json.dumps(modes).encode()
            connection.request(
                "POST", "/_standin/mode", body=body, headers={"Content-Type": "application/json"}
            )
            response = connection.getresponse()
            payload = response.read()
        finally:
            connection.close()
        if response.status != 200:
            raise ProcessError(
                f"{self.name}: /_standin/mode returned {response.status}: {payload!r}"
            )
        return json.loads(payload)


class Broker(ManagedProcess):
    """`taser broker` with an HTTPS (or plain HTTP) client edge and a mutual-TLS bridge edge."""

    def __init__(
        self,
        taser_bin: Path,
        certs: Path,
        work_dir: Path,
        name: str = "broker",
        extra_args: Iterable[str] = (),
        plaintext: bool = False,
        env: Optional[dict[str, str]] = None,
    ) -> None:
        self.certs = certs
        self.plaintext = plaintext
        self.client_port = 0
        self.bridge_port = 0
        argv = [str(taser_bin), "broker", "--listen", f"127.0.0.1:{free_port()}"]
        if plaintext:
            argv += ["--plaintext"]
        else:
            argv += [
                "--tls-cert",
                str(certs / "client-edge.pem"),
                "--tls-key",
                str(certs / "client-edge-key.pem"),
            ]
        argv += [
            "--bridge-listen",
            f"127.0.0.1:{free_port()}",
            "--bridge-cert",
            str(certs / "broker.pem"),
            "--bridge-key",
            str(certs / "broker-key.pem"),
            "--bridge-ca",
            str(certs / "ca.pem"),
            "--admin-listen",
            "127.0.0.1:0",
            "--log-level",
            "debug",
            *extra_args,
        ]
        self.admin_port = 0
        super().__init__(name, argv, work_dir / f"{name}.log", env=env)

    def start(self, timeout: float = START_TIMEOUT) -> "Broker":
        super().start()
        client = self.wait_for_event("listener_started", timeout, listener="client")
        bridge = self.wait_for_event("listener_started", timeout, listener="bridge")
        self.client_port = parse_host_port(client["address"])[1]
        self.bridge_port = parse_host_port(bridge["address"])[1]
        admin = self.wait_for_event("listener_started", timeout, listener="admin")
        self.admin_port = parse_host_port(admin["address"])[1]
        return self

    def admin_get(self, path: str, timeout: float = 5.0) -> tuple[int, str]:
        """GETs a path of the admin listener; returns the status and the body text."""
        conn = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=timeout)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read().decode()
        finally:
            conn.close()

    def passthrough_port(self, timeout: float = START_TIMEOUT) -> int:
        """Return the port of the --passthrough-listen listener, from its listener_started event."""
        event = self.wait_for_event("listener_started", timeout, listener="passthrough")
        return parse_host_port(event["address"])[1]

    @property
    def url(self) -> str:
        """The client edge's base URL. The client-edge certificate names IP 127.0.0.1."""
        scheme = "http" if self.plaintext else "https"
        return f"{scheme}://127.0.0.1:{self.client_port}"

    @property
    def client_ca(self) -> Path:
        return self.certs / "client-ca.pem"


class Bridge(ManagedProcess):
    """`taser bridge` dialling a broker and replaying requests against a stand-in."""

    def __init__(
        self,
        taser_bin: Path,
        certs: Path,
        work_dir: Path,
        broker: Broker,
        vault_address: str,
        name: str = "bridge",
        cert_name: str = "bridge",
        key_name: Optional[str] = None,
        extra_args: Iterable[str] = (),
        env: Optional[dict[str, str]] = None,
    ) -> None:
        self.broker = broker
        key_name = key_name or f"{cert_name}-key"
        argv = [
            str(taser_bin),
            "bridge",
            "--broker-address",
            f"localhost:{broker.bridge_port}",
            "--ca-cert",
            str(certs / "ca.pem"),
            "--client-cert",
            str(certs / f"{cert_name}.pem"),
            "--client-key",
            str(certs / f"{key_name}.pem"),
            "--vault-address",
            vault_address,
            "--log-level",
            "debug",
            *extra_args,
        ]
        super().__init__(name, argv, work_dir / f"{name}.log", env=env)

    def start(self, timeout: float = START_TIMEOUT, wait_connected: bool = True) -> "Bridge":
        broker_offset = self.broker.log_offset()
        super().start()
        if wait_connected:
            self.wait_for_event("broker_connected", timeout)
            self.broker.wait_for_event("bridge_connected", timeout, offset=broker_offset)
        return self


@dataclass
class PeerListener:
    """A port where the test itself accepts bridges, in place of a taser broker.

    Bridge only needs `bridge_port` and `log_offset()` from its broker; this listener has no log.
    """

    bridge_port: int

    def log_offset(self) -> int:
        return 0


# ---------------------------------------------------------------------------------------------
# A set of processes for one test


def child_env(extra: Optional[dict[str, str]] = None) -> dict[str, str]:
    """Return the environment for a child process: this one's, plus sanitizer defaults, plus EXTRA.

    ASAN_OPTIONS and UBSAN_OPTIONS in EXTRA are appended to the inherited ones, so that a later
    option overrides an earlier one as the sanitizers read them.
    """
    env = dict(os.environ)
    env.setdefault("ASAN_OPTIONS", "halt_on_error=1:detect_leaks=1:print_stacktrace=1")
    env.setdefault("UBSAN_OPTIONS", "halt_on_error=1:print_stacktrace=1")
    for key, value in (extra or {}).items():
        if key in ("ASAN_OPTIONS", "UBSAN_OPTIONS", "LSAN_OPTIONS") and env.get(key):
            env[key] = f"{env[key]}:{value}"
        else:
            env[key] = value
    return env


@dataclass
class Harness:
    """Starts the processes of one test and stops all of them, by PID, in reverse order."""

    taser_bin: Path
    certs: Path
    work_dir: Path
    processes: list[ManagedProcess] = field(default_factory=list)

    def _track(self, process: ManagedProcess) -> None:
        # Tracked before start() so that a process that fails to become ready is still stopped.
        self.processes.append(process)

    def _unique_name(self, base: str) -> str:
        used_names = {process.name for process in self.processes}
        if base not in used_names:
            return base
        for index in range(2, 1000):
            candidate = f"{base}{index}"
            if candidate not in used_names:
                return candidate
        raise ProcessError(f"too many processes named {base}")

    def start_standin(self, tls: bool = False, token: str = "root") -> StandIn:
        tls_args = {}
        if tls:
            tls_args = {
                "tls_cert": self.certs / "vault.pem",
                "tls_key": self.certs / "vault-key.pem",
            }
        standin = StandIn(
            self.work_dir,
            name=self._unique_name("standin"),
            token=token,
            env=child_env(),
            **tls_args,
        )
        self._track(standin)
        return standin.start()

    def start_broker(
        self,
        extra_args: Iterable[str] = (),
        plaintext: bool = False,
        env: Optional[dict[str, str]] = None,
    ) -> Broker:
        # The ports come from free_port(), so another process may bind one of them first.
        # A broker that exits because its address is in use is retried with new ports.
        for attempt in range(1, PORT_RETRIES + 1):
            broker = Broker(
                self.taser_bin,
                self.certs,
                self.work_dir,
                name=self._unique_name("broker"),
                extra_args=list(extra_args),
                plaintext=plaintext,
                env=child_env(env),
            )
            self._track(broker)
            try:
                return broker.start()
            except ProcessError:
                address_in_use = "in use" in log_tail(broker.log_path).lower()
                if broker.running() or not address_in_use or attempt == PORT_RETRIES:
                    raise
        raise AssertionError("unreachable")

    def start_bridge(
        self,
        broker: Broker,
        standin: StandIn,
        cert_name: str = "bridge",
        key_name: Optional[str] = None,
        extra_args: Iterable[str] = (),
        env: Optional[dict[str, str]] = None,
        wait_connected: bool = True,
    ) -> Bridge:
        extra = list(extra_args)
        if standin.tls and "--vault-ca" not in extra:
            extra += ["--vault-ca", str(self.certs / "vault-ca.pem")]
        bridge = Bridge(
            self.taser_bin,
            self.certs,
            self.work_dir,
            broker,
            standin.url,
            name=self._unique_name("bridge"),
            cert_name=cert_name,
            key_name=key_name,
            extra_args=extra,
            env=child_env(env),
        )
        self._track(bridge)
        return bridge.start(wait_connected=wait_connected)

    def start_broker_with_options(
        self,
        replacements: dict[str, Optional[str]],
        extra_args: Iterable[str] = (),
        plaintext: bool = False,
        env: Optional[dict[str, str]] = None,
    ) -> Broker:
        """Start a broker whose usual options named in REPLACEMENTS get other values.

        REPLACEMENTS works as in replace_options(): None drops an option. Like start_broker(),
        this retries with new ports when a port from free_port() was taken meanwhile.
        """
        for attempt in range(1, PORT_RETRIES + 1):
            broker = Broker(
                self.taser_bin,
                self.certs,
                self.work_dir,
                name=self._unique_name("broker"),
                extra_args=list(extra_args),
                plaintext=plaintext,
                env=child_env(env),
            )
            broker.argv = replace_options(broker.argv, replacements)
            self._track(broker)
            try:
                return broker.start()
            except ProcessError:
                address_in_use = "in use" in log_tail(broker.log_path).lower()
                if broker.running() or not address_in_use or attempt == PORT_RETRIES:
                    raise
        raise AssertionError("unreachable")

    def start_passthrough_broker(
        self,
        extra_args: Iterable[str] = (),
        env: Optional[dict[str, str]] = None,
    ) -> Broker:
        """Start a broker with --client-edge passthrough, whose client port carries raw bytes.

        Clients speak TLS with the vault itself through broker.client_port, so they verify the
        vault's certificate, and the broker's client_ca property does not apply.
        """
        return self.start_broker_with_options(
            {"--tls-cert": None, "--tls-key": None},
            extra_args=["--client-edge", "passthrough", *extra_args],
            env=env,
        )

    def start_bridge_with_options(
        self,
        broker: Broker,
        standin: StandIn,
        replacements: dict[str, Optional[str]],
        extra_args: Iterable[str] = (),
        env: Optional[dict[str, str]] = None,
        wait_connected: bool = True,
    ) -> Bridge:
        """Start a bridge whose usual options named in REPLACEMENTS get other values.

        REPLACEMENTS works as in replace_options(), for example {"--ca-cert": path}.
        """
        extra = list(extra_args)
        if standin.tls and "--vault-ca" not in extra:
            extra += ["--vault-ca", str(self.certs / "vault-ca.pem")]
        bridge = Bridge(
            self.taser_bin,
            self.certs,
            self.work_dir,
            broker,
            standin.url,
            name=self._unique_name("bridge"),
            extra_args=extra,
            env=child_env(env),
        )
        bridge.argv = replace_options(bridge.argv, replacements)
        self._track(bridge)
        return bridge.start(wait_connected=wait_connected)

    def start_bridge_to_peer(
        self,
        port: int,
        standin: StandIn,
        extra_args: Iterable[str] = (),
        env: Optional[dict[str, str]] = None,
    ) -> Bridge:
        """Start a bridge that dials PORT on localhost, where the test accepts it itself.

        The bridge is not waited for: the test sees the connection on its own listener.
        """
        bridge = Bridge(
            self.taser_bin,
            self.certs,
            self.work_dir,
            PeerListener(port),  # type: ignore[arg-type]
            standin.url,
            name=self._unique_name("bridge"),
            extra_args=list(extra_args),
            env=child_env(env),
        )
        self._track(bridge)
        return bridge.start(wait_connected=False)

    def stop_all(self) -> None:
        """Stop every process this harness started, newest first."""
        for process in reversed(self.processes):
            try:
                process.stop()
            except Exception:  # noqa: BLE001 - keep stopping the others
                pass

    def sanitizer_failures(self) -> list[str]:
        """Return a message for each taser process whose log contains a sanitizer report."""
        failures = []
        for process in self.processes:
            if isinstance(process, (Broker, Bridge)) and process.log_path.exists():
                reports = sanitizer_reports(process.log_path)
                if reports:
                    failures.append(
                        f"{process.name}: sanitizer report in {process.log_path}:\n"
                        + log_tail(process.log_path, 80)
                    )
        return failures


class CanaryListener:
    """A listener on 127.0.0.1 that counts the connections made to it."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                connection, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.connections += 1
            connection.close()

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)
        self.sock.close()
