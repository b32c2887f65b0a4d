"""HTTP clients for the end-to-end tests: curl in a subprocess and http.client over TLS.

Large bodies are streamed through curl and hashed chunk by chunk, so the test process never
keeps a whole body in memory.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import socket
import ssl
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

CURL = "curl"
CHUNK_BYTES = 1 << 20
# curl_transfer keeps at most this many leading body bytes, enough for any JSON response.
BODY_PREFIX_BYTES = 64 << 10


@dataclass
class CurlResult:
    """Outcome of one curl transfer whose body was hashed while it streamed."""

    exit_code: int
    status: int
    headers: list[tuple[str, str]]
    body_bytes: int
    body_sha256: str
    body_prefix: bytes
    stderr: str

    def json(self) -> Any:
        """Parse the kept body prefix as JSON. Fails if the body was longer than the prefix."""
        assert self.body_bytes <= len(self.body_prefix), "body too long to parse as JSON here"
        return json.loads(self.body_prefix)

    def header(self, name: str) -> Optional[str]:
        """Return the first value of header NAME (case-insensitive), or None."""
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None


def parse_header_dump(text: str) -> tuple[int, list[tuple[str, str]]]:
    """Parse curl's --dump-header output into the last response's status and headers.

    curl writes one block per response, interim 1xx responses included, so only the last block
    counts.
    """
    status = 0
    headers: list[tuple[str, str]] = []
    for line in text.splitlines():
        line = line.rstrip("\r")
        if line.startswith("HTTP/"):
            parts = line.split()
            status = int(parts[1]) if len(parts) > 1 else 0
            headers = []
        elif ":" in line:
            name, _, value = line.partition(":")
            headers.append((name.strip(), value.strip()))
    return status, headers


def curl_transfer(
    url: str,
    work_dir: Path,
    cafile: Optional[Path] = None,
    args: tuple[str, ...] = (),
    timeout: float = 120.0,
) -> CurlResult:
    """Run curl on URL with ARGS, hashing the response body as it arrives.

    The response headers go to a file in WORK_DIR and the body through a pipe into SHA-256.
    Only the first BODY_PREFIX_BYTES of the body are kept.
    """
    descriptor, header_name = tempfile.mkstemp(prefix="curl-headers-", suffix=".txt", dir=work_dir)
    os.close(descriptor)
    header_file = Path(header_name)
    argv = [CURL, "-sS", "--max-time", str(int(timeout)), "--dump-header", str(header_file)]
    if cafile is not None:
        argv += ["--cacert", str(cafile)]
    argv += [*args, "--output", "-", url]

    digest = hashlib.sha256()
    body_bytes = 0
    body_prefix = b""
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
        assert process.stdout is not None
        while True:
            chunk = process.stdout.read(CHUNK_BYTES)
            if not chunk:
                break
            digest.update(chunk)
            body_bytes += len(chunk)
            if len(body_prefix) < BODY_PREFIX_BYTES:
                body_prefix += chunk[: BODY_PREFIX_BYTES - len(body_prefix)]
        # curl's own --max-time bounds the transfer, and this timeout bounds anything after it.
        _, stderr = process.communicate(timeout=30)

    header_text = header_file.read_text(errors="replace")
    status, headers = parse_header_dump(header_text)
    return CurlResult(
        exit_code=process.returncode,
        status=status,
        headers=headers,
        body_bytes=body_bytes,
        body_sha256=digest.hexdigest(),
        body_prefix=body_prefix,
        stderr=stderr.decode(errors="replace"),
    )


def curl_json(
    url: str,
    cafile: Optional[Path] = None,
    args: tuple[str, ...] = (),
    timeout: float = 30.0,
) -> tuple[int, Any, str]:
    """Run curl for a small response and return (status, parsed JSON or None, raw body)."""
    argv = [CURL, "-sS", "--max-time", str(int(timeout)), "--write-out", "\n%{http_code}"]
    if cafile is not None:
        argv += ["--cacert", str(cafile)]
    argv += [*args, url]
    completed = subprocess.run(argv, capture_output=True, timeout=timeout + 10)
    if completed.returncode != 0:
        raise AssertionError(
            f"curl exited with {completed.returncode} for {url}: "
            f"{completed.stderr.decode(errors='replace').strip()}"
        )
    body, _, status_text = completed.stdout.decode(errors="replace").rpartition("\n")
    try:
        document = json.loads(body) if body.strip() else None
    except ValueError:
        document = None
    return int(status_text), document, body


def tls_context(cafile: Path) -> ssl.SSLContext:
    """Return a client TLS context that trusts CAFILE only and checks the host name."""
    context = ssl.create_default_context(cafile=str(cafile))
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def https_connection(port: int, cafile: Path, timeout: float = 30.0) -> http.client.HTTPSConnection:
    """Return a keep-alive HTTPS connection to 127.0.0.1:PORT that verifies against CAFILE."""
    return http.client.HTTPSConnection(
        "127.0.0.1", port, context=tls_context(cafile), timeout=timeout
    )


def write_random_file(path: Path, size: int, seed: int = 0) -> str:
    """Write SIZE pseudo-random bytes (repeatable for SEED) to PATH and return their SHA-256.

    Random content keeps any compression or deduplication on the path from shortening the
    transfer.
    """
    generator = random.Random(seed)
    digest = hashlib.sha256()
    written = 0
    with open(path, "wb") as out:
        while written < size:
            block = generator.randbytes(min(CHUNK_BYTES, size - written))
            out.write(block)
            digest.update(block)
            written += len(block)
    return digest.hexdigest()


# -----------------------------------------------------------------------------------------------
# Documents returned by the stand-in's /v1/test/echo and written to its --record file


def echo_headers(document: dict[str, Any]) -> list[tuple[str, str]]:
    """Return the ordered (name, value) header pairs of an echo or record document."""
    return [(str(name), str(value)) for name, value in document["headers"]]


def header_values(document: dict[str, Any], name: str) -> list[str]:
    """Return every value of header NAME (case-insensitive) in an echo or record document."""
    return [value for key, value in echo_headers(document) if key.lower() == name.lower()]


def body_length(document: dict[str, Any]) -> int:
    for key in ("body_length", "body_bytes", "length"):
        if key in document:
            return int(document[key])
    raise KeyError(f"no body length in {sorted(document)}")


def body_sha256(document: dict[str, Any]) -> str:
    for key in ("body_sha256", "sha256"):
        if key in document:
            return str(document[key])
    raise KeyError(f"no body SHA-256 in {sorted(document)}")


# -----------------------------------------------------------------------------------------------
# Raw sockets, for requests that http.client and curl would not send


def read_until_closed(
    sock: socket.socket, timeout: float, max_bytes: int = 64 << 20
) -> tuple[bytes, bool]:
    """Read from SOCK until the peer closes it, TIMEOUT seconds pass or MAX_BYTES arrive.

    Returns the bytes and whether the peer closed the connection (EOF or reset).
    """
    deadline = time.monotonic() + timeout
    received = bytearray()
    while len(received) < max_bytes:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return bytes(received), False
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(CHUNK_BYTES)
        except socket.timeout:
            return bytes(received), False
        except (ConnectionResetError, BrokenPipeError):
            return bytes(received), True
        if not chunk:
            return bytes(received), True
        received += chunk
    return bytes(received), False


def raw_exchange(
    port: int,
    data: bytes,
    timeout: float = 10.0,
    shutdown_write: bool = False,
    host: str = "127.0.0.1",
) -> tuple[bytes, bool]:
    """Send DATA to HOST:PORT over plain TCP and read until the peer closes or TIMEOUT passes.

    With SHUTDOWN_WRITE, the sending side is half-closed after DATA. Returns the bytes read and
    whether the peer closed the connection.
    """
    with socket.create_connection((host, port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
        except (ConnectionResetError, BrokenPipeError):
            # The peer may reject the data early and close before reading all of it.
            pass
        if shutdown_write:
            sock.shutdown(socket.SHUT_WR)
        return read_until_closed(sock, timeout)


def read_response_head(sock: socket.socket, timeout: float) -> tuple[bytes, bytes]:
    """Read from SOCK to the end of an HTTP response head and return (head, bytes after it).

    Raises AssertionError when the connection closes or TIMEOUT passes first.
    """
    deadline = time.monotonic() + timeout
    received = b""
    while b"\r\n\r\n" not in received:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no response head within {timeout} s, got {received[:200]!r}"
        sock.settimeout(remaining)
        chunk = sock.recv(CHUNK_BYTES)
        assert chunk, f"connection closed before a response head, got {received[:200]!r}"
        received += chunk
    head, _, rest = received.partition(b"\r\n\r\n")
    return head + b"\r\n\r\n", rest


@dataclass
class RawResponse:
    """An HTTP/1.1 response read off a raw socket."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> Optional[str]:
        """Return the first value of header NAME (case-insensitive), or None."""
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None


def parse_raw_response(data: bytes) -> RawResponse:
    """Parse the first response in DATA: status line, headers and everything after the head.

    The body is not de-chunked. Status 0 means that DATA contains no status line.
    """
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        return RawResponse(0, [], data)
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name.strip(), value.strip()))
    return RawResponse(int(parts[1]), headers, body)
