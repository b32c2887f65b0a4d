#!/usr/bin/env python3
"""Stand-in for the HashiCorp Vault HTTP API, used by the taser tests.

It serves an in-memory subset of Vault's API (KV version 2 at secret/, sys/health, token
lookup-self, AppRole login, response wrapping) and test-only endpoints that send or consume
large or slow bodies. Switchable modes imitate a standby node, a sealed vault, rate limiting
and the X-Vault-Index consistency headers of Vault Enterprise. It uses only the Python 3.11
standard library. README.md in this folder lists the options and endpoints.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import datetime
import hashlib
import http
import http.server
import json
import logging
import os
import re
import secrets
import signal
import socket
import socketserver
import ssl
import sys
import threading
import time
import urllib.parse
import uuid

LOG = logging.getLogger("vault_standin")

VAULT_VERSION = "1.15.6"
CLUSTER_NAME = "vault-cluster-standin"
CLUSTER_ID = "5e0d1c8a-6f2b-4c1e-9a7d-3b2f7c9e0a11"

# Vault's default max_request_size (listener setting) is 32 MiB. It limits bodies that the
# stand-in parses as JSON. Bodies that are only hashed may be up to MAX_STREAMED_BODY.
MAX_JSON_BODY = 32 * 1024 * 1024
MAX_CONTROL_BODY = 1024 * 1024
MAX_STREAMED_BODY = 16 * 1024**3
MAX_BYTES_SIZE = 16 * 1024**3
IO_PIECE = 1024 * 1024
MAX_LINE = 65536
MAX_TRAILER_LINES = 100
MAX_CHUNKS = 1 << 24
MAX_QUERY_FIELDS = 1000
MAX_REQUESTS_PER_CONNECTION = 1_000_000
MAX_DELAY_MS = 600_000
MAX_LONGPOLL_S = 3600
MAX_STREAM_CHUNKS = 100_000
MAX_STREAM_INTERVAL_MS = 60_000
MAX_DIGEST_CACHE_ENTRIES = 16
RETRY_AFTER_SECONDS = "7"
CLIENT_TOKEN_TTL_S = 2_764_800  # 768 h, Vault's default max lease TTL

# Piece sizes of /v1/test/bytes?chunked=1, used in turn. Odd sizes exercise chunk parsers.
CHUNKED_PIECE_SIZES = (1, 3, 4093, 16384, 65536, 1048573, IO_PIECE)

# Byte i of every /v1/test/bytes body is (i + i // PATTERN_SEGMENT) % PATTERN_MODULUS.
# Both numbers are prime, so shifted, repeated or reordered pieces change the bytes.
PATTERN_SEGMENT = 65521
PATTERN_MODULUS = 251
_PATTERN_BASE = bytes(i % PATTERN_MODULUS for i in range(PATTERN_MODULUS + PATTERN_SEGMENT))

MODE_FLAGS = ("sealed", "rate_limited", "index_required", "repeat_index")
MODE_KEYS = ("standby_redirect",) + MODE_FLAGS

TRUE_VALUES = frozenset(("", "1", "t", "T", "true", "TRUE", "True"))

# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def rfc3339_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def rfc3339_at(epoch_seconds: float) -> str:
    moment = datetime.datetime.fromtimestamp(epoch_seconds, datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def format_address(address: tuple) -> str:
    host, port = address[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def printable(text: str, limit: int = 200) -> str:
    """Escape control and non-ASCII characters so a request line cannot forge log lines."""
    escaped = text.encode("unicode_escape").decode("ascii")
    if len(escaped) > limit:
        return escaped[:limit] + "..."
    return escaped


def pattern_bytes(offset: int, length: int) -> bytes:
    """Return bytes [offset, offset + length) of the deterministic /v1/test/bytes stream."""
    parts = []
    position = offset
    end = offset + length
    while position < end:  # one pass per segment, at most length // PATTERN_SEGMENT + 2
        segment = position // PATTERN_SEGMENT
        segment_end = min(end, (segment + 1) * PATTERN_SEGMENT)
        start = (position + segment) % PATTERN_MODULUS
        parts.append(_PATTERN_BASE[start : start + segment_end - position])
        position = segment_end
    return b"".join(parts)


def pattern_sha256(size: int) -> str:
    digest = hashlib.sha256()
    for offset in range(0, size, IO_PIECE):
        digest.update(pattern_bytes(offset, min(IO_PIECE, size - offset)))
    return digest.hexdigest()


def vault_response(data=None, auth=None, wrap_info=None) -> dict:
    """Build a response body in the shape of Vault's logical.HTTPResponse."""
    return {
        "request_id": str(uuid.uuid4()),
        "lease_id": "",
        "renewable": False,
        "lease_duration": 0,
        "data": data,
        "wrap_info": wrap_info,
        "warnings": None,
        "auth": auth,
    }


def new_token(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(18)


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}


def parse_duration_seconds(text: str) -> int:
    """Parse a Vault duration ("300", "90s", "1h30m") into whole seconds or raise ValueError."""
    text = text.strip()
    if re.fullmatch(r"\d+", text):
        return int(text)
    if not text or _DURATION_PART.sub("", text):
        raise ValueError(f"invalid duration {text!r}")
    total = 0.0
    for number, unit in _DURATION_PART.findall(text):
        total += float(number) * _DURATION_UNITS[unit]
    return int(total)


def query_value(query: dict, name: str) -> str | None:
    values = query.get(name)
    return values[0] if values else None


def query_flag(query: dict, name: str) -> bool:
    value = query_value(query, name)
    return value is not None and value in TRUE_VALUES


class QueryError(ValueError):
    """Invalid query parameter, reported to the client as a 400 response."""


def query_int(query: dict, name: str, default: int | None, maximum: int) -> int:
    value = query_value(query, name)
    if value is None or value == "":
        if default is None:
            raise QueryError(f"missing query parameter {name}")
        return default
    if not re.fullmatch(r"\d{1,19}", value) or int(value) > maximum:
        raise QueryError(f"invalid value for {name}: expected an integer from 0 to {maximum}")
    return int(value)


def split_target(target: str) -> tuple[str, str] | None:
    """Split an origin-form or absolute-form request target into path and query."""
    if target.startswith("/"):
        path, _, query = target.partition("?")
        return path, query
    parts = urllib.parse.urlsplit(target)
    if parts.scheme.lower() in ("http", "https") and parts.netloc:
        return parts.path or "/", parts.query
    return None


# ---------------------------------------------------------------------------------------------
# Modes and shared state
# ---------------------------------------------------------------------------------------------


def default_modes() -> dict:
    modes = {"standby_redirect": None}
    modes.update({flag: False for flag in MODE_FLAGS})
    return modes


def validate_mode_update(update: object) -> dict:
    """Return a checked copy of a mode update, or raise ValueError naming the bad key."""
    if not isinstance(update, dict):
        raise ValueError("the mode update must be a JSON object")
    checked = {}
    for key, value in update.items():
        if key == "standby_redirect":
            if value is None or value == "":
                checked[key] = None
                continue
            if (
                not isinstance(value, str)
                or not value.startswith(("http://", "https://"))
                or any(character in value for character in "\r\n\0")
            ):
                raise ValueError("standby_redirect must be an http:// or https:// URL or null")
            checked[key] = value
        elif key in MODE_FLAGS:
            if not isinstance(value, bool):
                raise ValueError(f"{key} must be true or false")
            checked[key] = value
        else:
            raise ValueError(f"unknown mode key {key!r}, valid keys: {', '.join(MODE_KEYS)}")
    return checked


class KvStore:
    """In-memory KV version 2 secrets engine mounted at secret/.

    NOTE: every version is kept. Vault's default max_versions of 10 is not enforced.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._secrets: dict[str, dict] = {}

    def clear(self) -> None:
        with self._lock:
            self._secrets.clear()

    @staticmethod
    def _version_metadata(number: int, version: dict) -> dict:
        return {
            "created_time": version["created_time"],
            "custom_metadata": None,
            "deletion_time": version["deletion_time"],
            "destroyed": version["destroyed"],
            "version": number,
        }

    def write(self, path: str, data: dict, cas: int | None) -> tuple[dict | None, str | None]:
        """Store a new version. Return (version metadata, None) or (None, error message)."""
        now = rfc3339_now()
        with self._lock:
            secret = self._secrets.get(path)
            current = secret["current_version"] if secret else 0
            if cas is not None and cas != current:
                return None, "check-and-set parameter did not match the current version"
            if secret is None:
                secret = {"created_time": now, "current_version": 0, "versions": {}}
                self._secrets[path] = secret
            number = current + 1
            version = {"data": data, "created_time": now, "deletion_time": "", "destroyed": False}
            secret["versions"][number] = version
            secret["current_version"] = number
            secret["updated_time"] = now
            return self._version_metadata(number, version), None

    def read(self, path: str, number: int) -> tuple[dict | None, dict] | None:
        """Return (data, version metadata) of a version, 0 meaning the latest.

        Returns None when the secret or version does not exist, and data None when the
        version was deleted.
        """
        with self._lock:
            secret = self._secrets.get(path)
            if secret is None:
                return None
            number = number or secret["current_version"]
            version = secret["versions"].get(number)
            if version is None:
                return None
            live = not version["deletion_time"] and not version["destroyed"]
            return (version["data"] if live else None), self._version_metadata(number, version)

    def soft_delete_latest(self, path: str) -> None:
        with self._lock:
            secret = self._secrets.get(path)
            if secret is None:
                return
            version = secret["versions"][secret["current_version"]]
            if not version["deletion_time"]:
                version["deletion_time"] = rfc3339_now()

    def delete_all(self, path: str) -> None:
        with self._lock:
            self._secrets.pop(path, None)

    def metadata(self, path: str) -> dict | None:
        with self._lock:
            secret = self._secrets.get(path)
            if secret is None:
                return None
            versions = {
                str(number): {
                    "created_time": version["created_time"],
                    "deletion_time": version["deletion_time"],
                    "destroyed": version["destroyed"],
                }
                for number, version in secret["versions"].items()
            }
            return {
                "cas_required": False,
                "created_time": secret["created_time"],
                "current_version": secret["current_version"],
                "custom_metadata": None,
                "delete_version_after": "0s",
                "max_versions": 0,
                "oldest_version": min(secret["versions"]),
                "updated_time": secret["updated_time"],
                "versions": versions,
            }

    def list_keys(self, folder: str) -> list[str]:
        """List the keys directly under a folder, sub-folders with a trailing slash."""
        prefix = folder + "/" if folder else ""
        keys = set()
        with self._lock:
            for path in self._secrets:
                if not path.startswith(prefix) or len(path) == len(prefix):
                    continue
                rest = path[len(prefix) :]
                head, slash, _ = rest.partition("/")
                keys.add(head + slash)
        return sorted(keys)


class StandinState:
    """Server state shared by all connection threads: modes, tokens, wrapped responses."""

    def __init__(self, tokens: list[str], approles: dict[str, str], modes: dict) -> None:
        self.lock = threading.Lock()
        self.static_tokens = frozenset(tokens)
        self.approles = dict(approles)
        self.kv = KvStore()
        self.modes = default_modes()
        self.modes.update(modes)
        self.client_tokens: dict[str, dict] = {}
        self.wrapped: dict[str, dict] = {}
        self.issued_indexes: set[str] = set()
        self.index_counter = 0
        self.started = time.time()

    def reset(self) -> None:
        """Turn every mode off and forget secrets, issued tokens and wrapped responses.

        The index counter keeps counting, so an index value from before the reset is unknown
        afterwards.
        """
        self.kv.clear()
        with self.lock:
            self.modes = default_modes()
            self.client_tokens.clear()
            self.wrapped.clear()
            self.issued_indexes.clear()

    def snapshot_modes(self) -> dict:
        with self.lock:
            return dict(self.modes)

    def update_modes(self, checked: dict) -> dict:
        with self.lock:
            self.modes.update(checked)
            return dict(self.modes)

    def issue_index(self) -> str:
        """Return a new X-Vault-Index value and remember it as known.

        The value is base64 of "v1:standin:N:N", and N grows by one per value, so a test
        can decode two values to see which was issued first.
        """
        with self.lock:
            self.index_counter += 1
            number = self.index_counter
            value = base64.b64encode(f"v1:standin:{number}:{number}".encode()).decode()
            self.issued_indexes.add(value)
            return value

    def has_known_index(self, values: list[str]) -> bool:
        with self.lock:
            return any(value.strip() in self.issued_indexes for value in values)

    def token_kind(self, token: str | None) -> str | None:
        """Return "static", "client" or "wrapping" for a known token, otherwise None."""
        if not token:
            return None
        if token in self.static_tokens:
            return "static"
        with self.lock:
            if token in self.client_tokens:
                return "client"
            if token in self.wrapped:
                return "wrapping"
        return None

    def issue_client_token(self, role_id: str) -> dict:
        now = time.time()
        info = {
            "token": new_token("hvs."),
            "accessor": new_token(""),
            "role_id": role_id,
            "issued": now,
            "expires": now + CLIENT_TOKEN_TTL_S,
        }
        with self.lock:
            self.client_tokens[info["token"]] = info
        return info

    def client_token_info(self, token: str) -> dict | None:
        with self.lock:
            return self.client_tokens.get(token)

    def wrap(self, response: dict, ttl_s: int, creation_path: str) -> dict:
        """Store a response under a new single-use wrapping token and return its wrap_info."""
        now = time.time()
        auth = response.get("auth") or {}
        wrap_info = {
            "token": new_token("hvs."),
            "accessor": new_token(""),
            "ttl": ttl_s,
            "creation_time": rfc3339_at(now),
            "creation_path": creation_path,
            "wrapped_accessor": auth.get("accessor", ""),
        }
        with self.lock:
            self.wrapped[wrap_info["token"]] = {"response": response, "expires": now + ttl_s}
        return wrap_info

    def unwrap(self, token: str) -> dict | None:
        """Remove and return a wrapped response, or None if the token is unknown or expired."""
        with self.lock:
            entry = self.wrapped.pop(token, None)
        if entry is None or entry["expires"] < time.time():
            return None
        return entry["response"]


class Recorder:
    """Appends one JSON line per received request to the --record file."""

    def __init__(self, path: str) -> None:
        self._lock = threading.Lock()
        self._path = path
        self._file = open(path, "a", encoding="utf-8")

    def write(self, entry: dict) -> None:
        line = json.dumps(entry) + "\n"
        with self._lock:
            try:
                self._file.write(line)
                self._file.flush()
            except OSError as error:
                LOG.error("failed to append to record file %s: %s", self._path, error)

    def close(self) -> None:
        with self._lock:
            self._file.close()


# ---------------------------------------------------------------------------------------------
# Request bodies
# ---------------------------------------------------------------------------------------------


class BodyFramingError(Exception):
    """Invalid or truncated request body framing. Status None means no response is possible."""

    def __init__(self, status: int | None, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclasses.dataclass
class RequestBody:
    length: int
    sha256: str
    data: bytes | None  # the body when the route parses it, otherwise None
    too_large: bool


def iter_fixed_body(rfile, length: int):
    remaining = length
    while remaining > 0:  # each pass consumes at least one byte or raises
        data = rfile.read(min(remaining, IO_PIECE))
        if not data:
            raise BodyFramingError(None, "connection closed before the request body ended")
        remaining -= len(data)
        yield data


def iter_chunked_body(rfile):
    """Decode a chunked request body (RFC 9112 section 7.1), discarding trailer fields."""
    total = 0
    for _ in range(MAX_CHUNKS):
        line = rfile.readline(MAX_LINE + 1)
        if not line:
            raise BodyFramingError(None, "connection closed inside the chunked request body")
        if len(line) > MAX_LINE or not line.endswith(b"\n"):
            raise BodyFramingError(400, "chunk size line is too long")
        size_text = line.split(b";", 1)[0].strip()
        if not re.fullmatch(rb"[0-9A-Fa-f]{1,15}", size_text):
            raise BodyFramingError(400, "invalid chunk size line")
        size = int(size_text, 16)
        if size == 0:
            for _ in range(MAX_TRAILER_LINES):
                trailer = rfile.readline(MAX_LINE + 1)
                if not trailer:
                    raise BodyFramingError(None, "connection closed inside the chunk trailer")
                if trailer in (b"\r\n", b"\n"):
                    return
            raise BodyFramingError(400, "too many trailer fields")
        total += size
        if total > MAX_STREAMED_BODY:
            raise BodyFramingError(413, "request body too large")
        yield from iter_fixed_body(rfile, size)
        ending = rfile.readline(MAX_LINE + 1)
        if ending not in (b"\r\n", b"\n"):
            raise BodyFramingError(400, "missing CRLF after chunk data")
    raise BodyFramingError(400, f"more than {MAX_CHUNKS} chunks in the request body")


def read_request_body(rfile, headers, keep_limit: int) -> RequestBody:
    """Read and hash the whole request body, keeping at most keep_limit bytes of it.

    A body longer than keep_limit is still read to the end, so the connection stays usable,
    and is returned with too_large set.
    """
    transfer_encodings = headers.get_all("Transfer-Encoding") or []
    content_lengths = headers.get_all("Content-Length") or []
    if transfer_encodings:
        if content_lengths:
            raise BodyFramingError(400, "both Transfer-Encoding and Content-Length are set")
        codings = [
            coding.strip().lower()
            for value in transfer_encodings
            for coding in value.split(",")
            if coding.strip()
        ]
        if codings != ["chunked"]:
            raise BodyFramingError(501, f"unsupported Transfer-Encoding: {', '.join(codings)}")
        pieces = iter_chunked_body(rfile)
    elif content_lengths:
        values = {part.strip() for value in content_lengths for part in value.split(",")}
        if len(values) != 1 or not re.fullmatch(r"\d{1,19}", next(iter(values))):
            raise BodyFramingError(400, "invalid Content-Length")
        length = int(values.pop())
        if length > MAX_STREAMED_BODY:
            raise BodyFramingError(413, "request body too large")
        pieces = iter_fixed_body(rfile, length)
    else:
        pieces = iter(())

    digest = hashlib.sha256()
    kept: list[bytes] | None = [] if keep_limit > 0 else None
    length = 0
    too_large = False
    for piece in pieces:
        digest.update(piece)
        length += len(piece)
        if kept is not None:
            if length > keep_limit:
                kept = None
                too_large = True
            else:
                kept.append(piece)
    data = b"".join(kept) if kept is not None else None
    return RequestBody(length, digest.hexdigest(), data, too_large)


def parse_json_object(body: RequestBody) -> dict:
    """Parse a request body as a JSON object (empty means {}) or raise ValueError."""
    if not body.data:
        return {}
    try:
        value = json.loads(body.data)
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"failed to parse JSON input: {error}") from None
    if not isinstance(value, dict):
        raise ValueError("failed to parse JSON input: the body must be a JSON object")
    return value


# ---------------------------------------------------------------------------------------------
# HTTP handler
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class JsonResult:
    status: int
    body: dict | None
    headers: list[tuple[str, str]] = dataclasses.field(default_factory=list)


def errors_result(status: int, messages: list[str], headers=()) -> JsonResult:
    return JsonResult(status, {"errors": messages}, list(headers))


NOT_FOUND = (404, [])
UNSUPPORTED = (405, ["unsupported operation"])
PERMISSION_DENIED = (403, ["permission denied"])


def classify_operation(method: str, query: dict) -> str | None:
    """Map an HTTP method to Vault's logical operation: read, list, update or delete."""
    if method == "LIST":
        return "list"
    if method in ("GET", "HEAD"):
        return "list" if query_flag(query, "list") else "read"
    if method in ("POST", "PUT"):
        return "update"
    if method == "DELETE":
        return "delete"
    return None


class VaultStandinHandler(http.server.BaseHTTPRequestHandler):
    """Serves one connection. Every request is dispatched by path, whatever its method."""

    protocol_version = "HTTP/1.1"
    server_version = "vault-standin"
    sys_version = ""
    disable_nagle_algorithm = True

    @property
    def timeout(self) -> float:
        return self.server.idle_timeout

    @property
    def state(self) -> StandinState:
        return self.server.state

    def version_string(self) -> str:
        return self.server_version

    # --- connection and request framing ----------------------------------------------------

    def handle(self) -> None:
        client = format_address(self.client_address)
        try:
            if isinstance(self.connection, ssl.SSLSocket):
                self.connection.do_handshake()
            for _ in range(MAX_REQUESTS_PER_CONNECTION):
                self.handle_one_request()
                if self.close_connection:
                    break
        except ssl.SSLError as error:
            LOG.warning("TLS error on connection from %s: %s", client, error)
        except TimeoutError:
            LOG.debug("connection from %s timed out", client)
        except OSError as error:
            LOG.info("connection from %s ended: %s", client, error)

    def handle_one_request(self) -> None:
        self.close_connection = True
        self.command = ""
        self.request_version = ""
        self.requestline = ""
        self.vault_modes = None
        self.response_status = None
        self.response_bytes = 0

        raw_requestline = self.rfile.readline(MAX_LINE + 1)
        if not raw_requestline:
            return
        if len(raw_requestline) > MAX_LINE:
            self.send_error(http.HTTPStatus.REQUEST_URI_TOO_LONG)
            return
        self.raw_requestline = raw_requestline
        if not self.parse_request():
            return

        started = time.monotonic()
        try:
            self.process_request()
        except OSError:
            self.close_connection = True
            raise
        except Exception:
            LOG.exception("internal error while handling %s %s", self.command, self.log_target())
            self.close_connection = True
            if self.response_status is None:
                self.send_errors(500, ["internal error in the vault stand-in"])
        finally:
            self.log_completed(started)
        self.wfile.flush()

    def raw_target(self) -> str:
        words = self.requestline.split()
        return words[1] if len(words) >= 2 else ""

    def log_target(self) -> str:
        return printable(self.raw_target())

    def log_completed(self, started: float) -> None:
        elapsed_ms = (time.monotonic() - started) * 1000
        LOG.info(
            '%s "%s %s" %s %d bytes %.1f ms',
            format_address(self.client_address),
            printable(self.command, 20),
            self.log_target(),
            self.response_status if self.response_status is not None else "-",
            self.response_bytes,
            elapsed_ms,
        )

    def log_request(self, code="-", size="-") -> None:
        """Do nothing, because log_completed writes one line per request after the body."""

    def log_message(self, format, *args) -> None:  # noqa: A002 - name fixed by the base class
        LOG.warning("%s %s", format_address(self.client_address), format % args)

    def send_error(self, code, message=None, explain=None) -> None:
        """Send a Vault-style JSON error and close the connection.

        The base class calls this for malformed request lines and headers.
        """
        text = message or http.HTTPStatus(code).phrase
        LOG.warning(
            "%s rejected a malformed request: %d %s",
            format_address(self.client_address),
            code,
            printable(text),
        )
        self.close_connection = True
        if not self.request_version.startswith("HTTP/1."):
            # The base class omits the status line for HTTP/0.9, so respond as HTTP/1.1.
            self.request_version = "HTTP/1.1"
        self.send_errors(int(code), [text])

    # --- responses --------------------------------------------------------------------------

    def start_response(self, status: int, headers: list[tuple[str, str]]) -> None:
        """Send the status line and headers, adding the repeat_index and Connection headers."""
        self.send_response(status)
        pairs = list(headers)
        if self.vault_modes is not None and self.vault_modes["repeat_index"]:
            pairs = [(name, value) for name, value in pairs if name.lower() != "x-vault-index"]
            first = self.state.issue_index()
            second = self.state.issue_index()
            pairs += [("X-Vault-Index", first), ("X-Vault-Index", second)]
        for name, value in pairs:
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        elif self.request_version == "HTTP/1.0":
            self.send_header("Connection", "keep-alive")
        self.end_headers()
        self.response_status = status

    def write_body(self, data: bytes) -> None:
        if self.command != "HEAD" and data:
            self.wfile.write(data)
            self.response_bytes += len(data)

    def send_json(self, status: int, body: dict | None, headers=()) -> None:
        pairs = [("Cache-Control", "no-store")]
        payload = b""
        if body is not None:
            payload = json.dumps(body, separators=(",", ":")).encode("utf-8") + b"\n"
            pairs.append(("Content-Type", "application/json"))
        if status >= 200 and status not in (204, 304):
            pairs.append(("Content-Length", str(len(payload))))
        self.start_response(status, pairs + list(headers))
        self.write_body(payload)

    def send_result(self, result: JsonResult) -> None:
        self.send_json(result.status, result.body, result.headers)

    def send_errors(self, status: int, messages: list[str], headers=()) -> None:
        self.send_json(status, {"errors": messages}, headers)

    def choose_chunked_response(self) -> bool:
        """Return True for chunked coding, or mark the connection to close after the body.

        HTTP/1.0 clients do not understand chunked coding, so their body ends at EOF.
        """
        if self.request_version == "HTTP/1.0":
            self.close_connection = True
            return False
        return True

    def write_chunk(self, data: bytes, chunked: bool) -> None:
        if not data:
            return
        if chunked:
            self.write_body(b"%x\r\n" % len(data) + data + b"\r\n")
        else:
            self.write_body(data)

    def finish_chunks(self, chunked: bool) -> None:
        if chunked:
            self.write_body(b"0\r\n\r\n")

    # --- dispatch ---------------------------------------------------------------------------

    def process_request(self) -> None:
        if self.request_version == "HTTP/0.9":
            self.send_error(400, "HTTP/0.9 requests are not supported")
            return
        if self.headers.defects:
            # The email parser stops at a line without a colon, so later headers would be lost.
            self.send_error(400, "malformed header line")
            return
        target = self.raw_target()
        split = split_target(target)
        path = urllib.parse.unquote(split[0]) if split else None
        is_control = path is not None and path.startswith("/_standin/")
        keep_limit = 0
        if is_control:
            keep_limit = MAX_CONTROL_BODY
        elif path is not None and self.command in ("POST", "PUT"):
            if path not in ("/v1/test/echo", "/v1/test/sink"):
                keep_limit = MAX_JSON_BODY

        try:
            body = read_request_body(self.rfile, self.headers, keep_limit)
        except BodyFramingError as error:
            self.close_connection = True
            if not is_control:
                self.record(target, None, error.message)
            if error.status is not None:
                self.send_errors(error.status, [error.message])
            return
        if not is_control:
            self.record(target, body, None)

        if split is None:
            self.send_errors(400, ["invalid request target"])
            return
        if body.too_large:
            self.send_errors(413, ["http: request body too large"])
            return
        try:
            query = urllib.parse.parse_qs(
                split[1], keep_blank_values=True, max_num_fields=MAX_QUERY_FIELDS
            )
        except ValueError as error:
            self.send_errors(400, [f"invalid query string: {error}"])
            return

        if is_control:
            self.dispatch_control(path, body)
        elif path.startswith("/v1/"):
            self.dispatch_vault(path[len("/v1/") :], split, query, body)
        else:
            self.send_errors(*NOT_FOUND)

    def record(self, target: str, body: RequestBody | None, error: str | None) -> None:
        recorder = self.server.recorder
        if recorder is None:
            return
        entry = {
            "time": rfc3339_now(),
            "method": self.command,
            "target": target,
            "version": self.request_version,
            "headers": [[name, value] for name, value in self.headers.items()],
            "body_length": body.length if body else None,
            "body_sha256": body.sha256 if body else None,
        }
        if error is not None:
            entry["error"] = error
        recorder.write(entry)

    def request_token(self) -> str | None:
        token = self.headers.get("X-Vault-Token")
        if token:
            return token.strip()
        authorization = self.headers.get("Authorization", "")
        if authorization[:7].lower() == "bearer ":
            return authorization[7:].strip()
        return None

    def is_authorized(self, api_path: str) -> bool:
        """Check the request token. Logins need none, and unwrap checks its token itself."""
        if api_path in ("auth/approle/login", "sys/wrapping/unwrap"):
            return True
        return self.state.token_kind(self.request_token()) in ("static", "client")

    def dispatch_vault(self, api_path: str, split: tuple[str, str], query, body) -> None:
        """Apply the modes, token and index checks in Vault's order, then route the request."""
        modes = self.state.snapshot_modes()
        self.vault_modes = modes
        if api_path == "sys/health":
            self.handle_health(query, modes)
            return
        if modes["standby_redirect"]:
            path, query_string = split
            origin_target = path + ("?" + query_string if query_string else "")
            location = modes["standby_redirect"].rstrip("/") + origin_target
            self.start_response(307, [("Location", location), ("Content-Length", "0")])
            return
        if modes["sealed"]:
            self.send_errors(503, ["Vault is sealed"])
            return
        if modes["rate_limited"]:
            message = f'request path "{api_path}": rate limit quota exceeded'
            self.send_errors(429, [message], [("Retry-After", RETRY_AFTER_SECONDS)])
            return

        operation = classify_operation(self.command, query)
        is_test = api_path.startswith("test/")
        if operation is None and not is_test:
            self.send_errors(*UNSUPPORTED)
            return
        if not self.is_authorized(api_path):
            self.send_errors(*PERMISSION_DENIED)
            return
        if modes["index_required"] and operation in ("read", "list"):
            if not self.state.has_known_index(self.headers.get_all("X-Vault-Index") or []):
                self.send_errors(412, ["required index state not present"])
                return

        try:
            if is_test:
                self.dispatch_test_endpoint(api_path[len("test/") :], query, body)
                return
            wrap_ttl = self.requested_wrap_ttl()
            result = self.route_vault(api_path, operation, query, body)
        except QueryError as error:
            self.send_errors(400, [str(error)])
            return
        if wrap_ttl and result.status == 200 and result.body is not None:
            if api_path != "sys/wrapping/unwrap":
                wrap_info = self.state.wrap(result.body, wrap_ttl, api_path)
                result = JsonResult(200, vault_response(wrap_info=wrap_info), result.headers)
        self.send_result(result)

    def requested_wrap_ttl(self) -> int:
        value = self.headers.get("X-Vault-Wrap-TTL")
        if value is None or not value.strip():
            return 0
        try:
            return parse_duration_seconds(value)
        except ValueError:
            raise QueryError("invalid X-Vault-Wrap-TTL: expected seconds or a duration like 5m")

    def route_vault(self, api_path: str, operation: str, query, body) -> JsonResult:
        if api_path.startswith("secret/data/"):
            path = api_path[len("secret/data/") :].strip("/")
            return self.route_kv_data(path, operation, query, body)
        if api_path == "secret/metadata" or api_path.startswith("secret/metadata/"):
            folder = api_path[len("secret/metadata") :].strip("/")
            return self.route_kv_metadata(folder, operation)
        if api_path == "auth/token/lookup-self":
            if operation != "read":
                return errors_result(*UNSUPPORTED)
            return self.lookup_self()
        if api_path == "auth/approle/login":
            if operation != "update":
                return errors_result(*UNSUPPORTED)
            return self.approle_login(body)
        if api_path == "sys/wrapping/unwrap":
            if operation != "update":
                return errors_result(*UNSUPPORTED)
            return self.unwrap(body)
        return errors_result(*NOT_FOUND)

    # --- KV version 2 -----------------------------------------------------------------------

    def route_kv_data(self, path: str, operation: str, query, body) -> JsonResult:
        if not path:
            return errors_result(*NOT_FOUND)
        if operation == "read":
            number = query_int(query, "version", 0, 2**31)
            found = self.state.kv.read(path, number)
            if found is None:
                return errors_result(*NOT_FOUND)
            data, metadata = found
            # Vault responds 404 with the metadata when the version was deleted.
            status = 200 if data is not None else 404
            return JsonResult(status, vault_response(data={"data": data, "metadata": metadata}))
        if operation == "update":
            try:
                payload = parse_json_object(body)
            except ValueError as error:
                return errors_result(400, [str(error)])
            data = payload.get("data")
            if not isinstance(data, dict):
                return errors_result(400, ["no data provided"])
            options = payload.get("options") or {}
            cas = options.get("cas") if isinstance(options, dict) else None
            if cas is not None and (not isinstance(cas, int) or isinstance(cas, bool)):
                return errors_result(400, ["cas must be an integer"])
            metadata, error = self.state.kv.write(path, data, cas)
            if error is not None:
                return errors_result(400, [error])
            headers = [("X-Vault-Index", self.state.issue_index())]
            return JsonResult(200, vault_response(data=metadata), headers)
        if operation == "delete":
            self.state.kv.soft_delete_latest(path)
            return JsonResult(204, None, [("X-Vault-Index", self.state.issue_index())])
        return errors_result(*UNSUPPORTED)

    def route_kv_metadata(self, path: str, operation: str) -> JsonResult:
        if operation == "list":
            keys = self.state.kv.list_keys(path)
            if not keys:
                return errors_result(*NOT_FOUND)
            return JsonResult(200, vault_response(data={"keys": keys}))
        if not path:
            return errors_result(*UNSUPPORTED)
        if operation == "read":
            metadata = self.state.kv.metadata(path)
            if metadata is None:
                return errors_result(*NOT_FOUND)
            return JsonResult(200, vault_response(data=metadata))
        if operation == "delete":
            self.state.kv.delete_all(path)
            return JsonResult(204, None, [("X-Vault-Index", self.state.issue_index())])
        return errors_result(*UNSUPPORTED)

    # --- auth and wrapping ------------------------------------------------------------------

    def lookup_self(self) -> JsonResult:
        token = self.request_token()
        info = self.state.client_token_info(token)
        if info is None:
            data = {
                "accessor": "",
                "creation_time": int(self.state.started),
                "creation_ttl": 0,
                "display_name": "token",
                "entity_id": "",
                "expire_time": None,
                "explicit_max_ttl": 0,
                "id": token,
                "issue_time": rfc3339_at(self.state.started),
                "meta": None,
                "num_uses": 0,
                "orphan": True,
                "path": "auth/token/root",
                "policies": ["root"],
                "renewable": False,
                "ttl": 0,
                "type": "service",
            }
        else:
            data = {
                "accessor": info["accessor"],
                "creation_time": int(info["issued"]),
                "creation_ttl": CLIENT_TOKEN_TTL_S,
                "display_name": "approle",
                "entity_id": "",
                "expire_time": rfc3339_at(info["expires"]),
                "explicit_max_ttl": 0,
                "id": token,
                "issue_time": rfc3339_at(info["issued"]),
                "meta": {"role_id": info["role_id"]},
                "num_uses": 0,
                "orphan": True,
                "path": "auth/approle/login",
                "policies": ["default"],
                "renewable": True,
                "ttl": max(0, int(info["expires"] - time.time())),
                "type": "service",
            }
        return JsonResult(200, vault_response(data=data))

    def approle_login(self, body: RequestBody) -> JsonResult:
        """Log in with any role_id and secret_id, or only with the --approle pairs if given."""
        try:
            payload = parse_json_object(body)
        except ValueError as error:
            return errors_result(400, [str(error)])
        role_id = payload.get("role_id")
        secret_id = payload.get("secret_id")
        if not isinstance(role_id, str) or not role_id:
            return errors_result(400, ["missing role_id"])
        if self.state.approles and self.state.approles.get(role_id) != secret_id:
            return errors_result(400, ["invalid role or secret ID"])
        info = self.state.issue_client_token(role_id)
        auth = {
            "client_token": info["token"],
            "accessor": info["accessor"],
            "policies": ["default"],
            "token_policies": ["default"],
            "metadata": {"role_name": "standin"},
            "lease_duration": CLIENT_TOKEN_TTL_S,
            "renewable": True,
            "entity_id": "",
            "token_type": "service",
            "orphan": True,
            "mfa_requirement": None,
            "num_uses": 0,
        }
        headers = [("X-Vault-Index", self.state.issue_index())]
        return JsonResult(200, vault_response(auth=auth), headers)

    def unwrap(self, body: RequestBody) -> JsonResult:
        """Return a wrapped response once. The wrapping token is in the body or X-Vault-Token.

        Like Vault, an unknown, used or expired wrapping token gets 400, not 403.
        """
        try:
            payload = parse_json_object(body)
        except ValueError as error:
            return errors_result(400, [str(error)])
        token = payload.get("token")
        if token:
            if self.state.token_kind(self.request_token()) not in ("static", "client"):
                return errors_result(*PERMISSION_DENIED)
        else:
            token = self.request_token()
        response = self.state.unwrap(token) if isinstance(token, str) else None
        if response is None:
            return errors_result(400, ["wrapping token is not valid or does not exist"])
        return JsonResult(200, dict(response, request_id=str(uuid.uuid4())))

    # --- sys/health -------------------------------------------------------------------------

    def handle_health(self, query, modes: dict) -> None:
        """Send sys/health with Vault's status codes and the code override parameters."""
        sealed = modes["sealed"]
        standby = bool(modes["standby_redirect"])
        try:
            active_code = query_int(query, "activecode", 200, 999)
            if sealed:
                status = query_int(query, "sealedcode", 503, 999)
            elif standby and not query_flag(query, "standbyok"):
                status = query_int(query, "standbycode", 429, 999)
            else:
                status = active_code
        except QueryError as error:
            self.send_errors(400, [str(error)])
            return
        if status < 100:
            self.send_errors(400, [f"invalid status code {status}"])
            return
        body = {
            "initialized": True,
            "sealed": sealed,
            "standby": standby and not sealed,
            "performance_standby": False,
            "replication_performance_mode": "disabled",
            "replication_dr_mode": "disabled",
            "server_time_utc": int(time.time()),
            "version": VAULT_VERSION,
            "cluster_name": CLUSTER_NAME,
            "cluster_id": CLUSTER_ID,
        }
        if self.command == "HEAD":
            # Vault's API documentation lists HEAD sys/health as an empty body.
            self.start_response(status, [("Cache-Control", "no-store"), ("Content-Length", "0")])
            return
        self.send_json(status, body)

    # --- test-only endpoints ----------------------------------------------------------------

    def dispatch_test_endpoint(self, name: str, query, body: RequestBody) -> None:
        """Route /v1/test/*: endpoints that exist only in the stand-in, never in Vault."""
        reads = ("GET", "HEAD")
        if name == "echo":
            self.serve_echo(body)
        elif name == "sink":
            if self.command not in ("POST", "PUT"):
                self.send_errors(*UNSUPPORTED)
                return
            self.send_json(200, {"body_length": body.length, "body_sha256": body.sha256})
        elif name not in ("bytes", "delay", "longpoll", "stream"):
            self.send_errors(*NOT_FOUND)
        elif self.command not in reads:
            self.send_errors(*UNSUPPORTED)
        elif name == "bytes":
            self.serve_bytes(query)
        elif name == "delay":
            delay_ms = query_int(query, "ms", None, MAX_DELAY_MS)
            self.server.stop_event.wait(delay_ms / 1000)
            self.send_json(200, {"delay_ms": delay_ms})
        elif name == "longpoll":
            wait_s = query_int(query, "s", None, MAX_LONGPOLL_S)
            self.server.stop_event.wait(wait_s)
            self.send_json(200, {"waited_s": wait_s})
        else:
            self.serve_stream(query)

    def serve_echo(self, body: RequestBody) -> None:
        self.send_json(
            200,
            {
                "method": self.command,
                "target": self.raw_target(),
                "version": self.request_version,
                "headers": [[name, value] for name, value in self.headers.items()],
                "body_length": body.length,
                "body_sha256": body.sha256,
            },
        )

    def serve_bytes(self, query) -> None:
        """Send `size` deterministic bytes with Content-Length, or chunked when chunked=1."""
        size = query_int(query, "size", None, MAX_BYTES_SIZE)
        headers = [("Content-Type", "application/octet-stream")]
        if query_flag(query, "digest"):
            headers.append(("X-Standin-Body-Sha256", self.server.cached_pattern_sha256(size)))
        if not query_flag(query, "chunked"):
            self.start_response(200, headers + [("Content-Length", str(size))])
            if self.command == "HEAD":
                return
            for offset in range(0, size, IO_PIECE):
                self.write_body(pattern_bytes(offset, min(IO_PIECE, size - offset)))
            return
        chunked = self.choose_chunked_response()
        if chunked:
            headers.append(("Transfer-Encoding", "chunked"))
        self.start_response(200, headers)
        if self.command == "HEAD":
            return
        offset = 0
        index = 0
        while offset < size:  # every pass sends at least one byte
            piece = min(CHUNKED_PIECE_SIZES[index % len(CHUNKED_PIECE_SIZES)], size - offset)
            self.write_chunk(pattern_bytes(offset, piece), chunked)
            offset += piece
            index += 1
        self.finish_chunks(chunked)

    def serve_stream(self, query) -> None:
        """Send `chunks` chunked pieces of one JSON line each, `ms` milliseconds apart."""
        chunks = query_int(query, "chunks", None, MAX_STREAM_CHUNKS)
        interval_ms = query_int(query, "ms", 0, MAX_STREAM_INTERVAL_MS)
        chunked = self.choose_chunked_response()
        headers = [("Content-Type", "application/x-ndjson"), ("Cache-Control", "no-store")]
        if chunked:
            headers.append(("Transfer-Encoding", "chunked"))
        self.start_response(200, headers)
        if self.command == "HEAD":
            return
        for index in range(chunks):
            if index and interval_ms and self.server.stop_event.wait(interval_ms / 1000):
                break
            self.write_chunk(b'{"chunk":%d}\n' % index, chunked)
            self.wfile.flush()
        self.finish_chunks(chunked)

    # --- control endpoints ------------------------------------------------------------------

    def dispatch_control(self, path: str, body: RequestBody) -> None:
        """Serve /_standin/*, which reads and switches modes. Needs no token, never recorded."""
        if path == "/_standin/mode":
            if self.command == "GET":
                self.send_json(200, self.state.snapshot_modes())
                return
            if self.command not in ("POST", "PUT"):
                self.send_errors(*UNSUPPORTED)
                return
            try:
                checked = validate_mode_update(parse_json_object(body))
            except ValueError as error:
                self.send_errors(400, [str(error)])
                return
            modes = self.state.update_modes(checked)
            LOG.info("modes changed: %s", json.dumps(modes, sort_keys=True))
            self.send_json(200, modes)
        elif path == "/_standin/reset":
            if self.command != "POST":
                self.send_errors(*UNSUPPORTED)
                return
            self.state.reset()
            LOG.info("state reset: modes off, secrets and issued tokens removed")
            self.send_json(204, None)
        else:
            self.send_errors(*NOT_FOUND)


# ---------------------------------------------------------------------------------------------
# Server and command line
# ---------------------------------------------------------------------------------------------


class StandinServer(http.server.ThreadingHTTPServer):
    """Threaded HTTP server with one thread per connection."""

    daemon_threads = True
    request_queue_size = 256

    def __init__(self, address, family, state, recorder, idle_timeout) -> None:
        self.address_family = family
        self.state = state
        self.recorder = recorder
        self.idle_timeout = idle_timeout
        self.stop_event = threading.Event()
        self._digest_lock = threading.Lock()
        self._digest_cache: dict[int, str] = {}
        super().__init__(address, VaultStandinHandler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind would resolve the host name, which can stall on DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request, client_address) -> None:
        LOG.exception("unhandled error on connection from %s", format_address(client_address))

    def cached_pattern_sha256(self, size: int) -> str:
        with self._digest_lock:
            digest = self._digest_cache.get(size)
            if digest is None:
                digest = pattern_sha256(size)
                if len(self._digest_cache) >= MAX_DIGEST_CACHE_ENTRIES:
                    self._digest_cache.clear()
                self._digest_cache[size] = digest
            return digest


def parse_listen(text: str) -> tuple[int, str, int]:
    """Parse HOST:PORT or [IPV6]:PORT into (address family, host, port)."""
    match = re.fullmatch(r"\[([0-9A-Fa-f:.%\w]+)\]:(\d{1,5})", text)
    if match:
        family, host = socket.AF_INET6, match.group(1)
    else:
        match = re.fullmatch(r"([^:\[\]]+):(\d{1,5})", text)
        if not match:
            raise ValueError(f"invalid --listen {text!r}: expected HOST:PORT or [IPV6]:PORT")
        family, host = socket.AF_INET, match.group(1)
    port = int(match.group(2))
    if port > 65535:
        raise ValueError(f"invalid port {port} in --listen: expected 0 to 65535")
    return family, host, port


def parse_approle(text: str) -> tuple[str, str]:
    role_id, separator, secret_id = text.partition(":")
    if not separator or not role_id:
        raise argparse.ArgumentTypeError(f"invalid --approle {text!r}: expected ROLE_ID:SECRET_ID")
    return role_id, secret_id


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Serve a small in-memory subset of the HashiCorp Vault HTTP API for tests."
    )
    parser.add_argument(
        "--listen",
        default="127.0.0.1:8200",
        help="address to listen on, HOST:PORT or [IPV6]:PORT. Port 0 picks a free port "
        "(default: %(default)s)",
    )
    parser.add_argument("--tls-cert", help="PEM certificate chain file. Enables TLS with --tls-key")
    parser.add_argument("--tls-key", help="PEM private key for --tls-cert")

    parser.add_argument(
        "--token",
        action="append",
        help="accepted X-Vault-Token value, repeatable (default: root)",
    )
    parser.add_argument(
        "--approle",
        action="append",
        type=parse_approle,
        default=[],
        metavar="ROLE_ID:SECRET_ID",
        help="accepted AppRole credentials, repeatable (default: accept any role_id)",
    )

    parser.add_argument("--record", metavar="FILE", help="append one JSON line per request here")
    parser.add_argument(
        "--ready-file", metavar="FILE", help="write the bound port here once listening"
    )

    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="close a connection when one socket read or write takes longer "
        "(default: %(default)s)",
    )

    parser.add_argument("--standby-redirect", metavar="URL", help="start in standby_redirect mode")
    parser.add_argument("--sealed", action="store_true", help="start in sealed mode")
    parser.add_argument("--rate-limited", action="store_true", help="start in rate_limited mode")
    parser.add_argument(
        "--index-required", action="store_true", help="start in index_required mode"
    )
    parser.add_argument("--repeat-index", action="store_true", help="start in repeat_index mode")

    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="stderr log level. INFO logs one line per request (default: %(default)s)",
    )
    return parser


def startup_modes(args: argparse.Namespace) -> dict:
    return validate_mode_update(
        {
            "standby_redirect": args.standby_redirect,
            "sealed": args.sealed,
            "rate_limited": args.rate_limited,
            "index_required": args.index_required,
            "repeat_index": args.repeat_index,
        }
    )


def write_ready_file(path: str, port: int) -> None:
    """Write the port through a temporary file and rename, so readers never see a partial file."""
    temporary = f"{path}.tmp{os.getpid()}"
    with open(temporary, "w", encoding="ascii") as file:
        file.write(f"{port}\n")
    os.replace(temporary, path)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s vault_standin %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    try:
        family, host, port = parse_listen(args.listen)
        modes = startup_modes(args)
    except ValueError as error:
        parser.error(str(error))
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key must be given together")
    if args.idle_timeout <= 0:
        parser.error("--idle-timeout must be greater than 0")

    tls_context = None
    if args.tls_cert:
        tls_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            tls_context.load_cert_chain(args.tls_cert, args.tls_key)
        except (OSError, ssl.SSLError) as error:
            parser.error(f"failed to load --tls-cert {args.tls_cert} or --tls-key: {error}")
        tls_context.set_alpn_protocols(["http/1.1"])
    try:
        recorder = Recorder(args.record) if args.record else None
    except OSError as error:
        parser.error(f"failed to open --record file: {error}")

    state = StandinState(args.token or ["root"], dict(args.approle), modes)
    try:
        server = StandinServer((host, port), family, state, recorder, args.idle_timeout)
    except OSError as error:
        LOG.error("failed to listen on %s: %s", args.listen, error)
        return 1
    if tls_context is not None:
        # The handshake runs in the connection thread, so a stalled client cannot block accept.
        server.socket = tls_context.wrap_socket(
            server.socket, server_side=True, do_handshake_on_connect=False
        )
    bound_port = server.server_address[1]

    def request_shutdown(signum, frame) -> None:
        LOG.info("received signal %d, stopping", signum)
        server.stop_event.set()
        # shutdown() waits for serve_forever() to return, so it must not run in this thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, request_shutdown)
    signal.signal(signal.SIGINT, request_shutdown)

    if args.ready_file:
        write_ready_file(args.ready_file, bound_port)
    LOG.info(
        "listening on %s (%s), modes %s",
        format_address((host, bound_port)),
        "https" if tls_context else "http",
        json.dumps(state.snapshot_modes(), sort_keys=True),
    )
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        if recorder is not None:
            recorder.close()
    LOG.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
