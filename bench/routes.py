"""The upstream web server and the ways to reach it that the benchmark compares.

A route is everything between the load generator and a backend port on 127.0.0.1: nothing
(direct), an OpenSSH reverse tunnel, haproxy in TCP mode, or a taser broker and bridge. Each
route starts its processes on loopback ports and stops them by PID.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import ssl
import subprocess
from pathlib import Path
from typing import Optional

from processes import (
    BenchError,
    Process,
    descendants,
    end_pid,
    free_port,
    port_accepts,
    vmhwm_mib,
    wait_until,
)

START_TIMEOUT = 30.0
KV_PATH = "/v1/secret/data/bench"
LARGE_PATH = "/large.bin"
KV_SIZE = 1024
LARGE_SIZE = 256 * 1024 * 1024
NOBODY_USER = "nobody"
NOBODY_GROUP = "nogroup"


def kv_document() -> bytes:
    """Return a 1 KiB JSON body shaped like a Vault KV version 2 read."""
    document = {
        "request_id": "2f7b3a90-5c1e-4d0b-9a61-7c2d8e4f1a36",
        "lease_id": "",
        "renewable": False,
        "lease_duration": 0,
        "data": {
            "data": {
                "username": "bench-service",
                "password": "",
                "database_url": "postgres://db.internal:5432/app",
            },
            "metadata": {
                "created_time": "2024-05-02T09:41:17.153412Z",
                "custom_metadata": None,
                "deletion_time": "",
                "destroyed": False,
                "version": 7,
            },
        },
        "wrap_info": None,
        "warnings": None,
        "auth": None,
    }
    padding = KV_SIZE - len(json.dumps(document, separators=(",", ":")).encode())
    document["data"]["data"]["password"] = "x" * padding
    body = json.dumps(document, separators=(",", ":")).encode()
    if len(body) != KV_SIZE:
        raise BenchError(f"KV document is {len(body)} bytes, expected {KV_SIZE}")
    return body


def http_get(port: int, path: str, scheme: str = "http", cafile: Optional[Path] = None,
             timeout: float = 10.0) -> tuple[int, bytes]:
    """Send one GET to 127.0.0.1:PORT on a new connection and return the status and the body."""
    if scheme == "https":
        context = ssl.create_default_context(cafile=str(cafile))
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            "127.0.0.1", port, timeout=timeout, context=context
        )
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


class Nginx:
    """nginx on 127.0.0.1 serving the KV document and a 256 MiB file, from WORK_DIR/www."""

    def __init__(self, work_dir: Path) -> None:
        self.work_dir = work_dir
        self.port = 0
        self.process: Optional[Process] = None

    def write_content(self) -> None:
        www = self.work_dir / "www"
        kv_file = www / KV_PATH.lstrip("/")
        kv_file.parent.mkdir(parents=True, exist_ok=True)
        kv_file.write_bytes(kv_document())
        # Random bytes, so that no layer can compress the file or skip reading it.
        with open(www / LARGE_PATH.lstrip("/"), "wb") as large:
            for _ in range(LARGE_SIZE // (1 << 20)):
                large.write(os.urandom(1 << 20))
        # nginx workers run as nobody, so they need to traverse the work folder.
        for folder in [self.work_dir, *www.rglob("*"), www]:
            os.chmod(folder, 0o755 if folder.is_dir() else 0o644)

    def start(self) -> "Nginx":
        self.port = free_port()
        temp = self.work_dir / "nginx-temp"
        temp.mkdir(exist_ok=True)
        config = self.work_dir / "nginx.conf"
        config.write_text(f"""
worker_processes auto;
pid {self.work_dir}/nginx.pid;
error_log {self.work_dir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    default_type application/json;
    server {{
        listen 127.0.0.1:{self.port} backlog=4096;
        root {self.work_dir}/www;
        location = {LARGE_PATH} {{ default_type application/octet-stream; }}
    }}
}}
""")
        self.process = Process(
            "nginx",
            [
                "nginx", "-p", str(self.work_dir), "-e", str(self.work_dir / "nginx-error.log"),
                "-c", str(config), "-g", "daemon off; master_process on;",
            ],
            self.work_dir / "nginx.log",
        ).start()
        wait_until(lambda: port_accepts(self.port), START_TIMEOUT, "nginx to listen", self.process)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


class Route:
    """A way from the load generator to a backend port. Subclasses start the processes."""

    key = ""
    label = ""
    scheme = "http"

    def __init__(self, work_dir: Path, target_port: int) -> None:
        self.work_dir = work_dir
        self.target_port = target_port
        self.port = 0
        self.cafile: Optional[Path] = None

    def start(self) -> "Route":
        return self

    def stop(self) -> None:
        pass

    def url(self, path: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{path}"

    def memory_mib(self) -> dict[str, float]:
        """Return the peak resident set size of each process of the route, in MiB."""
        return {}

    def check(self, path: str = KV_PATH, expected_size: int = KV_SIZE) -> None:
        """Raise BenchError unless one GET through the route returns 200 and EXPECTED_SIZE bytes."""
        status, body = http_get(self.port, path, self.scheme, self.cafile)
        if status != 200 or len(body) != expected_size:
            raise BenchError(
                f"{self.label}: GET {path} returned {status} with {len(body)} bytes, "
                f"expected 200 with {expected_size}"
            )


class DirectRoute(Route):
    key = "direct"
    label = "direct"

    def start(self) -> "DirectRoute":
        self.port = self.target_port
        return self


class SshRoute(Route):
    """`ssh -N -R` to an sshd started here, both as the nobody user, with throwaway keys."""

    key = "ssh"
    label = "ssh -R"

    def __init__(self, work_dir: Path, target_port: int, name: str = "ssh") -> None:
        super().__init__(work_dir, target_port)
        self.ssh_dir = work_dir / name
        self.sshd: Optional[Process] = None
        self.client: Optional[Process] = None
        self.cipher = ""

    def _as_nobody(self, argv: list[str]) -> list[str]:
        # setpriv executes the program in place, so the PID we hold is sshd's or ssh's own.
        return [
            "setpriv", f"--reuid={NOBODY_USER}", f"--regid={NOBODY_GROUP}", "--clear-groups",
            *argv,
        ]

    def _write_keys_and_config(self, sshd_port: int) -> Path:
        self.ssh_dir.mkdir(mode=0o700, exist_ok=True)
        for key in ("host_key", "client_key"):
            if not (self.ssh_dir / key).exists():
                subprocess.run(
                    ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.ssh_dir / key)],
                    check=True, timeout=30,
                )
        shutil.copy(self.ssh_dir / "client_key.pub", self.ssh_dir / "authorized_keys")
        config = self.ssh_dir / "sshd_config"
        # UsePAM yes: the nobody account is locked, and sshd without PAM rejects locked
        # accounts even for key authentication.
        config.write_text(f"""ListenAddress 127.0.0.1:{sshd_port}
HostKey {self.ssh_dir}/host_key
AuthorizedKeysFile {self.ssh_dir}/authorized_keys
PidFile none
StrictModes no
UsePAM yes
PasswordAuthentication no
KbdInteractiveAuthentication no
AllowTcpForwarding remote
AllowAgentForwarding no
X11Forwarding no
PermitTTY no
PrintMotd no
""")
        subprocess.run(
            ["chown", "-R", f"{NOBODY_USER}:{NOBODY_GROUP}", str(self.ssh_dir)],
            check=True, timeout=30,
        )
        return config

    def start(self) -> "SshRoute":
        sshd_port = free_port()
        self.port = free_port()
        config = self._write_keys_and_config(sshd_port)
        self.sshd = Process(
            "sshd",
            self._as_nobody(["/usr/sbin/sshd", "-D", "-e", "-f", str(config)]),
            self.ssh_dir / "sshd.log",
        ).start()
        wait_until(lambda: port_accepts(sshd_port), START_TIMEOUT, "sshd to listen", self.sshd)
        ssh_options = [
            "-F", "/dev/null", "-i", str(self.ssh_dir / "client_key"),
            "-o", "UserKnownHostsFile=/dev/null", "-o", "StrictHostKeyChecking=no",
            "-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes", "-p", str(sshd_port),
        ]
        self.client = Process(
            "ssh",
            self._as_nobody([
                "ssh", "-N", *ssh_options,
                "-R", f"127.0.0.1:{self.port}:127.0.0.1:{self.target_port}",
                f"{NOBODY_USER}@127.0.0.1",
            ]),
            self.ssh_dir / "ssh.log",
        ).start()
        wait_until(
            lambda: port_accepts(self.port), START_TIMEOUT, "the ssh -R port to listen",
            self.client,
        )
        self.cipher = self._negotiated_cipher(ssh_options)
        return self

    def _negotiated_cipher(self, ssh_options: list[str]) -> str:
        """Return the first cipher of the client's list, which OpenSSH's sshd also offers."""
        result = subprocess.run(
            ["ssh", "-G", *ssh_options, "127.0.0.1"], capture_output=True, text=True, timeout=10
        )
        for line in result.stdout.splitlines():
            if line.startswith("ciphers "):
                return line.split()[1].split(",")[0]
        return "unknown"

    def memory_mib(self) -> dict[str, float]:
        memory = {}
        if self.client is not None and self.client.running():
            memory["ssh"] = self.client.vmhwm_mib()
        if self.sshd is not None and self.sshd.running():
            # The per-connection sshd processes do the forwarding, so take the largest.
            children = [vmhwm_mib(pid) for pid in descendants(self.sshd.pid)]
            memory["sshd"] = max(children, default=0.0)
        return memory

    def stop(self) -> None:
        # Stopping the client closes the connection, which ends sshd's per-connection
        # processes. Any that remain are ended by PID after the listener stops.
        if self.client is not None:
            self.client.stop()
        if self.sshd is not None and self.sshd.running():
            leftover = descendants(self.sshd.pid)
            self.sshd.stop()
            for pid in leftover:
                end_pid(pid)


class HaproxyRoute(Route):
    key = "haproxy"
    label = "haproxy tcp"

    def __init__(self, work_dir: Path, target_port: int, max_connections: int = 4096) -> None:
        super().__init__(work_dir, target_port)
        self.max_connections = max_connections
        self.process: Optional[Process] = None

    def start(self) -> "HaproxyRoute":
        self.port = free_port()
        config = self.work_dir / f"haproxy-{self.port}.cfg"
        config.write_text(f"""global
    maxconn {self.max_connections}
defaults
    mode tcp
    timeout connect 5s
    timeout client 300s
    timeout server 300s
frontend bench
    bind 127.0.0.1:{self.port}
    default_backend upstream
backend upstream
    server upstream 127.0.0.1:{self.target_port}
""")
        self.process = Process(
            "haproxy", ["haproxy", "-db", "-f", str(config)], self.work_dir / "haproxy.log"
        ).start()
        wait_until(
            lambda: port_accepts(self.port), START_TIMEOUT, "haproxy to listen", self.process
        )
        return self

    def memory_mib(self) -> dict[str, float]:
        if self.process is None or not self.process.running():
            return {}
        return {"haproxy": self.process.vmhwm_mib()}

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


class TaserRoute(Route):
    """A taser broker and one bridge connected to it over mutual TLS.

    MODE is the broker's client edge: "http" (plain HTTP, --plaintext), "https", or
    "passthrough" (the bridge runs with --allow-tunnels and the bytes reach the target as sent).
    """

    def __init__(self, work_dir: Path, target_port: int, taser_bin: Path, certs: Path,
                 mode: str, broker_args: tuple[str, ...] = (),
                 bridge_args: tuple[str, ...] = ()) -> None:
        super().__init__(work_dir, target_port)
        self.taser_bin = taser_bin
        self.certs = certs
        self.mode = mode
        self.key = f"taser-{mode}"
        self.label = f"taser {mode}"
        self.scheme = "https" if mode == "https" else "http"
        self.cafile = certs / "client-ca.pem" if mode == "https" else None
        self.extra_broker_args = list(broker_args)
        self.extra_bridge_args = list(bridge_args)
        self.bridge_port = 0
        self.broker: Optional[Process] = None
        self.bridge: Optional[Process] = None

    def broker_argv(self) -> list[str]:
        argv = [str(self.taser_bin), "broker", "--listen", f"127.0.0.1:{self.port}"]
        if self.mode == "http":
            argv += ["--plaintext"]
        elif self.mode == "https":
            argv += [
                "--tls-cert", str(self.certs / "client-edge.pem"),
                "--tls-key", str(self.certs / "client-edge-key.pem"),
            ]
        else:
            argv += ["--client-edge", "passthrough"]
        return argv + [
            "--bridge-listen", f"127.0.0.1:{self.bridge_port}",
            "--bridge-cert", str(self.certs / "broker.pem"),
            "--bridge-key", str(self.certs / "broker-key.pem"),
            "--bridge-ca", str(self.certs / "ca.pem"),
            "--admin-listen", "off",
            *self.extra_broker_args,
        ]

    def bridge_argv(self) -> list[str]:
        argv = [
            str(self.taser_bin), "bridge",
            "--broker-address", f"localhost:{self.bridge_port}",
            "--ca-cert", str(self.certs / "ca.pem"),
            "--client-cert", str(self.certs / "bridge.pem"),
            "--client-key", str(self.certs / "bridge-key.pem"),
            "--vault-address", f"http://127.0.0.1:{self.target_port}",
        ]
        if self.mode == "passthrough":
            argv += ["--allow-tunnels"]
        return argv + self.extra_bridge_args

    def start_broker(self) -> Process:
        """Start the broker on the route's ports, which stay the same across restarts."""
        self.broker = Process(
            f"broker-{self.mode}", self.broker_argv(), self.work_dir / f"broker-{self.mode}.log"
        ).start()
        return self.broker

    def bridge_connections(self) -> int:
        """Return how many times the bridge has logged a connected broker session."""
        if self.bridge is None:
            return 0
        return self.bridge.log_text().count('"event":"broker_connected"')

    def start(self) -> "TaserRoute":
        self.port = free_port()
        self.bridge_port = free_port()
        broker = self.start_broker()
        wait_until(
            lambda: port_accepts(self.port) and port_accepts(self.bridge_port),
            START_TIMEOUT, f"{self.label} broker to listen", broker,
        )
        self.bridge = Process(
            f"bridge-{self.mode}", self.bridge_argv(), self.work_dir / f"bridge-{self.mode}.log"
        ).start()
        wait_until(
            lambda: self.bridge_connections() > 0, START_TIMEOUT,
            f"{self.label} bridge to connect", self.bridge,
        )
        return self

    def memory_mib(self) -> dict[str, float]:
        memory = {}
        for name, process in (("broker", self.broker), ("bridge", self.bridge)):
            if process is not None and process.running():
                memory[name] = process.vmhwm_mib()
        return memory

    def stop(self) -> None:
        for process in (self.bridge, self.broker):
            if process is not None:
                process.stop()
