#!/usr/bin/env python3
"""A second implementation of the taser tunnel protocol, written from docs/protocol.md.

Python 3.11 standard library only. It plays either side of a tunnel connection:

- bridge: dials a broker with a client certificate and serves the streams the broker opens,
  by forwarding each request to a plain-HTTP server or with a canned response;
- broker: accepts one bridge and sends requests through it.

For tests it can also break the protocol on purpose: RawConnection sends arbitrary bytes and
frames over a blocking TLS socket, and VIOLATIONS lists ready-made protocol violations.

Section numbers (§) refer to docs/protocol.md.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import enum
import os
import re
import socket
import ssl
import struct
import sys
import threading
import time
from typing import Awaitable, Callable, Optional

# ---------------------------------------------------------------------------------------------
# Constants (§3, §4, §7)

ALPN_ID = "taser/1"
PROTOCOL_VERSION = 1
HEADER_SIZE = 9
MAX_LENGTH_FIELD = (1 << 24) - 1
MIN_MAX_FRAME_PAYLOAD = 16384
MAX_WINDOW = (1 << 31) - 1
MAX_STREAM_ID = (1 << 31) - 1
MAX_FIELDS = 512
# Encoded request heads that the open streams of one connection may hold at the bridge (§5.2).
REQUEST_HEAD_BUDGET = 32 * 1024 * 1024
HELLO_FIXED_BYTES = 20
SETTING_BYTES = 6

FLAG_END_STREAM = 0x1
FLAG_ACK = 0x1


class FrameType(enum.IntEnum):
    HELLO = 0x0
    HEADERS = 0x1
    DATA = 0x2
    WINDOW_UPDATE = 0x3
    RST_STREAM = 0x4
    PING = 0x5
    GOAWAY = 0x6


class ErrorCode(enum.IntEnum):
    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    STREAM_CLOSED = 0x4
    FRAME_SIZE_ERROR = 0x5
    REFUSED_STREAM = 0x6
    CANCEL = 0x7
    CONNECT_ERROR = 0x8
    TIMEOUT = 0x9
    VERSION_MISMATCH = 0xA
    ENHANCE_YOUR_CALM = 0xB
    FORBIDDEN = 0xC


def error_name(code: int) -> str:
    """Return the lower-case name that taser logs for an error code, or "unknown"."""
    try:
        return ErrorCode(code).name.lower()
    except ValueError:
        return "unknown"


class Role(enum.IntEnum):
    BROKER = 1
    BRIDGE = 2


class SettingId(enum.IntEnum):
    MAX_FRAME_PAYLOAD = 0x1
    INITIAL_STREAM_WINDOW = 0x2
    MAX_CONCURRENT_STREAMS = 0x3
    MAX_HEADER_BLOCK = 0x4
    INITIAL_CONNECTION_WINDOW = 0x5
    REPLICAS = 0x6


# Fields that never travel through the tunnel (§9.1).
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "transfer-encoding",
        "upgrade",
        "trailer",
        "proxy-authorization",
        "proxy-authenticate",
        "http2-settings",
    }
)

TOKEN_PATTERN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


class ProtocolViolation(Exception):
    """A rule of docs/protocol.md that the peer broke: a connection or a stream error (§7)."""

    def __init__(self, code: ErrorCode, text: str, stream_id: int = 0, stream_level: bool = False):
        super().__init__(f"{code.name}: {text}")
        self.code = code
        self.text = text
        self.stream_id = stream_id
        self.stream_level = stream_level


def connection_error(code: ErrorCode, text: str, stream_id: int = 0) -> ProtocolViolation:
    return ProtocolViolation(code, text, stream_id, stream_level=False)


def stream_error(code: ErrorCode, text: str, stream_id: int) -> ProtocolViolation:
    return ProtocolViolation(code, text, stream_id, stream_level=True)


class StreamReset(Exception):
    """The stream ended with RST_STREAM (sent or received) or its connection closed."""

    def __init__(self, code: int, by_peer: bool):
        who = "peer" if by_peer else "local side"
        super().__init__(f"stream reset by the {who} with {error_name(code)}")
        self.code = code
        self.by_peer = by_peer


# ---------------------------------------------------------------------------------------------
# Frame codec (§3-§5)


@dataclasses.dataclass
class Frame:
    type: int
    flags: int
    stream_id: int
    payload: bytes

    @property
    def end_stream(self) -> bool:
        return bool(self.flags & FLAG_END_STREAM)

    def describe(self) -> str:
        try:
            name = FrameType(self.type).name
        except ValueError:
            name = f"type 0x{self.type:x}"
        return f"{name} flags=0x{self.flags:x} stream={self.stream_id} length={len(self.payload)}"


def encode_header(length: int, frame_type: int, flags: int, stream_id: int) -> bytes:
    """Encode a 9-octet frame header. Values are masked to their field widths, not checked."""
    return struct.pack(
        ">I", length & MAX_LENGTH_FIELD
    )[1:] + struct.pack(">BBI", frame_type & 0xFF, flags & 0xFF, stream_id & 0xFFFFFFFF)


def encode_frame(frame_type: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return encode_header(len(payload), frame_type, flags, stream_id) + bytes(payload)


def parse_header(header: bytes) -> tuple[int, int, int, int]:
    """Split a frame header into (length, type, flags, stream id); the reserved bit is dropped."""
    length = int.from_bytes(header[0:3], "big")
    frame_type = header[3]
    flags = header[4]
    stream_id = int.from_bytes(header[5:9], "big") & MAX_STREAM_ID
    return length, frame_type, flags, stream_id


def check_header(length: int, frame_type: int, stream_id: int, max_payload: int) -> None:
    """Apply the header checks of §3.3 in their order; raise a connection error on failure."""
    if length > max_payload:
        raise connection_error(ErrorCode.FRAME_SIZE_ERROR, "frame length above max_frame_payload")
    if frame_type > FrameType.GOAWAY:
        raise connection_error(ErrorCode.PROTOCOL_ERROR, "unknown frame type")
    on_connection = stream_id == 0
    kind = FrameType(frame_type)
    stream_rule_broken = {
        FrameType.HELLO: not on_connection,
        FrameType.HEADERS: on_connection,
        FrameType.DATA: on_connection,
        FrameType.WINDOW_UPDATE: False,
        FrameType.RST_STREAM: on_connection,
        FrameType.PING: not on_connection,
        FrameType.GOAWAY: not on_connection,
    }[kind]
    if stream_rule_broken:
        raise connection_error(ErrorCode.PROTOCOL_ERROR, f"{kind.name} on the wrong stream")
    length_ok = {
        FrameType.HELLO: length >= HELLO_FIXED_BYTES
        and (length - HELLO_FIXED_BYTES) % SETTING_BYTES == 0,
        FrameType.HEADERS: True,
        FrameType.DATA: True,
        FrameType.WINDOW_UPDATE: length == 4,
        FrameType.RST_STREAM: length == 4,
        FrameType.PING: length == 8,
        FrameType.GOAWAY: length >= 8,
    }[kind]
    if not length_ok:
        raise connection_error(ErrorCode.FRAME_SIZE_ERROR, f"invalid length {length} for {kind.name}")


@dataclasses.dataclass
class Settings:
    """The settings of a HELLO (§4.2), with the defaults of the table."""

    max_frame_payload: int = 65536
    initial_stream_window: int = 4 * 1024 * 1024
    max_concurrent_streams: int = 16384
    max_header_block: int = 65536
    initial_connection_window: int = 32 * 1024 * 1024
    replicas: int = 0

    def items(self) -> list[tuple[int, int]]:
        return [
            (SettingId.MAX_FRAME_PAYLOAD, self.max_frame_payload),
            (SettingId.INITIAL_STREAM_WINDOW, self.initial_stream_window),
            (SettingId.MAX_CONCURRENT_STREAMS, self.max_concurrent_streams),
            (SettingId.MAX_HEADER_BLOCK, self.max_header_block),
            (SettingId.INITIAL_CONNECTION_WINDOW, self.initial_connection_window),
            (SettingId.REPLICAS, self.replicas),
        ]


@dataclasses.dataclass
class Hello:
    version: int = PROTOCOL_VERSION
    role: int = Role.BRIDGE
    instance: bytes = bytes(16)
    settings: Settings = dataclasses.field(default_factory=Settings)


def encode_hello(
    hello: Hello, extra_settings: list[tuple[int, int]] = (), reserved: int = 0
) -> bytes:
    out = struct.pack(">HBB", hello.version & 0xFFFF, hello.role & 0xFF, reserved & 0xFF)
    out += hello.instance[:16].ljust(16, b"\0")
    for setting_id, value in [*hello.settings.items(), *extra_settings]:
        out += struct.pack(">HI", setting_id & 0xFFFF, value & 0xFFFFFFFF)
    return out


def decode_hello(payload: bytes) -> Hello:
    """Decode and check a HELLO payload (§4.1, §4.2). The version is left to the caller."""
    if len(payload) < HELLO_FIXED_BYTES or (len(payload) - HELLO_FIXED_BYTES) % SETTING_BYTES:
        raise connection_error(ErrorCode.FRAME_SIZE_ERROR, "invalid HELLO length")
    version, role, _reserved = struct.unpack_from(">HBB", payload)
    if role not in (Role.BROKER, Role.BRIDGE):
        raise connection_error(ErrorCode.PROTOCOL_ERROR, f"invalid role {role}")
    settings = Settings()
    for offset in range(HELLO_FIXED_BYTES, len(payload), SETTING_BYTES):
        setting_id, value = struct.unpack_from(">HI", payload, offset)
        if setting_id == SettingId.MAX_FRAME_PAYLOAD:
            if not MIN_MAX_FRAME_PAYLOAD <= value <= MAX_LENGTH_FIELD:
                raise connection_error(ErrorCode.PROTOCOL_ERROR, "max_frame_payload out of range")
            settings.max_frame_payload = value
        elif setting_id == SettingId.INITIAL_STREAM_WINDOW:
            if value > MAX_WINDOW:
                raise connection_error(ErrorCode.FLOW_CONTROL_ERROR, "stream window above 2^31-1")
            settings.initial_stream_window = value
        elif setting_id == SettingId.MAX_CONCURRENT_STREAMS:
            settings.max_concurrent_streams = value
        elif setting_id == SettingId.MAX_HEADER_BLOCK:
            if value < 1024:
                raise connection_error(ErrorCode.PROTOCOL_ERROR, "max_header_block below 1024")
            settings.max_header_block = value
        elif setting_id == SettingId.INITIAL_CONNECTION_WINDOW:
            if value > MAX_WINDOW:
                raise connection_error(
                    ErrorCode.FLOW_CONTROL_ERROR, "connection window above 2^31-1"
                )
            settings.initial_connection_window = value
        elif setting_id == SettingId.REPLICAS:
            settings.replicas = value
        # Unknown identifiers are ignored (§4.2 rule 2).
    return Hello(version, role, bytes(payload[4:20]), settings)


Fields = list[tuple[str, str]]


@dataclasses.dataclass
class RequestHead:
    method: str
    target: str
    fields: Fields = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class ResponseHead:
    status: int
    fields: Fields = dataclasses.field(default_factory=list)

    def field(self, name: str) -> Optional[str]:
        return find_field(self.fields, name)


def find_field(fields: Fields, name: str) -> Optional[str]:
    for key, value in fields:
        if key.lower() == name.lower():
            return value
    return None


def _u16_string(data: bytes) -> bytes:
    if len(data) > 0xFFFF:
        raise ValueError(f"string of {len(data)} octets does not fit a u16 length")
    return struct.pack(">H", len(data)) + data


def _encode_fields(fields: Fields) -> bytes:
    out = struct.pack(">H", len(fields))
    for name, value in fields:
        out += _u16_string(name.encode("latin-1")) + _u16_string(value.encode("latin-1"))
    return out


def encode_request_head(head: RequestHead) -> bytes:
    return (
        _u16_string(head.method.encode("latin-1"))
        + _u16_string(head.target.encode("latin-1"))
        + _encode_fields(head.fields)
    )


def encode_response_head(head: ResponseHead) -> bytes:
    return struct.pack(">H", head.status) + _encode_fields(head.fields)


class _Reader:
    """Reads the items of a head; every read checks the octets left (§5.2 malformed rule 1)."""

    def __init__(self, data: bytes):
        self.data = data
        self.offset = 0

    def u16(self) -> int:
        if len(self.data) - self.offset < 2:
            raise ValueError("truncated integer")
        value = int.from_bytes(self.data[self.offset : self.offset + 2], "big")
        self.offset += 2
        return value

    def string(self) -> bytes:
        length = self.u16()
        if len(self.data) - self.offset < length:
            raise ValueError("string runs past the payload")
        value = self.data[self.offset : self.offset + length]
        self.offset += length
        return bytes(value)

    def fields(self) -> Fields:
        count = self.u16()
        if count > MAX_FIELDS:
            raise ValueError(f"{count} fields, above {MAX_FIELDS}")
        fields = []
        for _ in range(count):
            name = self.string()
            value = self.string()
            if not is_token(name) or not is_field_value(value):
                raise ValueError("invalid field name or value")
            fields.append((name.decode("latin-1"), value.decode("latin-1")))
        return fields

    def finish(self) -> None:
        if self.offset != len(self.data):
            raise ValueError("octets after the last field")


def is_token(data: bytes) -> bool:
    return TOKEN_PATTERN.fullmatch(data) is not None


def is_field_value(data: bytes) -> bool:
    return not any((octet < 0x20 and octet != 0x09) or octet == 0x7F for octet in data)


def is_request_target(data: bytes) -> bool:
    return bool(data) and all(0x21 <= octet <= 0x7E for octet in data)


def decode_request_head(payload: bytes) -> RequestHead:
    """Decode a request head; raise ValueError when it is malformed (§5.2)."""
    reader = _Reader(payload)
    method = reader.string()
    target = reader.string()
    fields = reader.fields()
    reader.finish()
    if not is_token(method) or not is_request_target(target):
        raise ValueError("invalid method or target")
    return RequestHead(method.decode("latin-1"), target.decode("latin-1"), fields)


def decode_response_head(payload: bytes) -> ResponseHead:
    """Decode a response head; raise ValueError when it is malformed (§5.2)."""
    reader = _Reader(payload)
    status = reader.u16()
    fields = reader.fields()
    reader.finish()
    if not 100 <= status <= 599:
        raise ValueError(f"status {status} out of range")
    return ResponseHead(status, fields)


@dataclasses.dataclass
class GoAway:
    last_stream_id: int
    error_code: int
    debug: bytes = b""

    @property
    def error_name(self) -> str:
        return error_name(self.error_code)


def encode_goaway(goaway: GoAway) -> bytes:
    return struct.pack(">II", goaway.last_stream_id & MAX_STREAM_ID, goaway.error_code) + goaway.debug


def decode_goaway(payload: bytes) -> GoAway:
    last_stream_id, code = struct.unpack_from(">II", payload)
    return GoAway(last_stream_id & MAX_STREAM_ID, code, bytes(payload[8:]))


def encode_u32(value: int) -> bytes:
    return struct.pack(">I", value & 0xFFFFFFFF)


def decode_u32(payload: bytes) -> int:
    return struct.unpack_from(">I", payload)[0]


# ---------------------------------------------------------------------------------------------
# TLS (§2)


def client_context(
    cert: str, key: str, ca: str, minimum: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3,
    alpn: Optional[list[str]] = None,
) -> ssl.SSLContext:
    """Return the TLS context of a bridge: client certificate, broker CA, ALPN taser/1."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = minimum
    context.load_verify_locations(ca)
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols([ALPN_ID] if alpn is None else alpn)
    return context


def server_context(
    cert: str, key: str, ca: str, minimum: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3
) -> ssl.SSLContext:
    """Return the TLS context of a broker: server certificate, required client certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = minimum
    context.load_cert_chain(cert, key)
    context.load_verify_locations(ca)
    context.verify_mode = ssl.CERT_REQUIRED
    # NOTE: Python's ssl module cannot fail the handshake when the client offers no matching
    # ALPN id, as §2.1 requires of a broker, so the ALPN check after the handshake closes.
    context.set_alpn_protocols([ALPN_ID])
    return context


def check_alpn(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> None:
    selected = ssl_object.selected_alpn_protocol()
    if selected != ALPN_ID:
        raise ConnectionError(f"ALPN {selected!r} negotiated, expected {ALPN_ID!r}")


# ---------------------------------------------------------------------------------------------
# A blocking connection that sends arbitrary frames, for tests of the other side's checks


class RawConnection:
    """A TLS connection that sends raw frames and reads frames without enforcing any rule.

    Every read has a deadline. Nothing is read unless a method that reads is called, so a test
    can stop reading to fill the other side's send buffers.
    """

    def __init__(self, sock: ssl.SSLSocket):
        self.sock = sock
        self.buffer = bytearray()
        self.eof = False
        self.peer_hello: Optional[Hello] = None

    @classmethod
    def dial(
        cls,
        port: int,
        context: ssl.SSLContext,
        host: str = "127.0.0.1",
        server_hostname: str = "localhost",
        receive_buffer: Optional[int] = None,
        timeout: float = 10.0,
    ) -> "RawConnection":
        """Connect to a broker. RECEIVE_BUFFER, when given, shrinks SO_RCVBUF before connecting."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        raw = socket.socket(family, socket.SOCK_STREAM)
        try:
            if receive_buffer is not None:
                raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
            raw.settimeout(timeout)
            raw.connect((host, port))
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock = context.wrap_socket(raw, server_hostname=server_hostname)
        except BaseException:
            raw.close()
            raise
        check_alpn(sock)
        return cls(sock)

    @classmethod
    def accept(
        cls, listener: socket.socket, context: ssl.SSLContext, timeout: float = 10.0
    ) -> "RawConnection":
        """Accept one bridge on LISTENER and complete the TLS handshake."""
        listener.settimeout(timeout)
        raw, _ = listener.accept()
        try:
            raw.settimeout(timeout)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock = context.wrap_socket(raw, server_side=True)
        except BaseException:
            raw.close()
            raise
        check_alpn(sock)
        return cls(sock)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    # --- sending ---

    def send(self, data: bytes, timeout: Optional[float] = 10.0) -> None:
        self.sock.settimeout(timeout)
        self.sock.sendall(data)

    def send_frame(self, frame_type: int, flags: int, stream_id: int, payload: bytes = b"") -> None:
        self.send(encode_frame(frame_type, flags, stream_id, payload))

    def send_hello(
        self,
        role: int = Role.BRIDGE,
        settings: Optional[Settings] = None,
        version: int = PROTOCOL_VERSION,
        extra_settings: list[tuple[int, int]] = (),
    ) -> None:
        hello = Hello(version, role, os.urandom(16), settings or Settings())
        self.send_frame(FrameType.HELLO, 0, 0, encode_hello(hello, extra_settings))

    def exchange_hello(
        self, role: int = Role.BRIDGE, settings: Optional[Settings] = None, timeout: float = 10.0
    ) -> Hello:
        """Send a valid HELLO, read the peer's and return it (§4.3)."""
        self.send_hello(role, settings)
        frame = self.read_frame(timeout)
        if frame is None or frame.type != FrameType.HELLO:
            got = "end of connection" if frame is None else frame.describe()
            raise ConnectionError(f"expected HELLO, got {got}")
        self.peer_hello = decode_hello(frame.payload)
        return self.peer_hello

    def send_headers(
        self, stream_id: int, head: RequestHead | ResponseHead, end_stream: bool = True
    ) -> None:
        payload = (
            encode_request_head(head) if isinstance(head, RequestHead) else encode_response_head(head)
        )
        self.send_frame(FrameType.HEADERS, FLAG_END_STREAM if end_stream else 0, stream_id, payload)

    # --- reading ---

    def _fill(self, count: int, deadline: float) -> bool:
        while len(self.buffer) < count:
            if self.eof:
                return False
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no complete frame within the deadline ({len(self.buffer)} octets)")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(256 * 1024)
            except (ssl.SSLEOFError, ConnectionResetError, BrokenPipeError):
                chunk = b""
            except ssl.SSLError as error:
                # An alert or a connection cut mid-record ends the connection too.
                if "EOF" in str(error) or "alert" in str(error).lower():
                    chunk = b""
                else:
                    raise
            if not chunk:
                self.eof = True
                return False
            self.buffer += chunk
        return True

    def read_frame(self, timeout: float = 10.0) -> Optional[Frame]:
        """Return the next frame, or None at the end of the connection. Raise TimeoutError."""
        deadline = time.monotonic() + timeout
        if not self._fill(HEADER_SIZE, deadline):
            return None
        length, frame_type, flags, stream_id = parse_header(self.buffer[:HEADER_SIZE])
        if not self._fill(HEADER_SIZE + length, deadline):
            return None
        payload = bytes(self.buffer[HEADER_SIZE : HEADER_SIZE + length])
        del self.buffer[: HEADER_SIZE + length]
        return Frame(frame_type, flags, stream_id, payload)

    def read_until(
        self, predicate: Callable[[Frame], bool], timeout: float = 10.0, answer_pings: bool = True
    ) -> tuple[Optional[Frame], list[Frame]]:
        """Read frames until PREDICATE is true or the connection ends.

        Returns (the matching frame or None at the end, every frame read). With ANSWER_PINGS set,
        each PING without ACK gets its ACK on the way.
        """
        deadline = time.monotonic() + timeout
        seen: list[Frame] = []
        while True:
            frame = self.read_frame(max(0.0, deadline - time.monotonic()))
            if frame is None:
                return None, seen
            seen.append(frame)
            if predicate(frame):
                return frame, seen
            if answer_pings and frame.type == FrameType.PING and not frame.flags & FLAG_ACK:
                self.send_frame(FrameType.PING, FLAG_ACK, 0, frame.payload)

    def read_goaway(self, timeout: float = 10.0) -> Optional[GoAway]:
        """Read until GOAWAY; return it, or None when the connection ended without one."""
        frame, _ = self.read_until(lambda f: f.type == FrameType.GOAWAY, timeout)
        return decode_goaway(frame.payload) if frame is not None else None

    def read_to_end(self, timeout: float = 10.0) -> list[Frame]:
        """Read every frame until the connection ends; raise TimeoutError if it does not."""
        frame, seen = self.read_until(lambda f: False, timeout, answer_pings=False)
        assert frame is None
        return seen

    def ping(self, data: bytes = b"peer-ok!", timeout: float = 10.0) -> bool:
        """Send a PING and return whether its ACK came back."""
        self.send_frame(FrameType.PING, 0, 0, data)
        frame, _ = self.read_until(
            lambda f: f.type == FrameType.PING and f.flags & FLAG_ACK and f.payload == data, timeout
        )
        return frame is not None


# ---------------------------------------------------------------------------------------------
# Protocol violations, for tests of the other side (§3-§6)


def send_flood(
    connection: RawConnection, frame: bytes, count: int, batch: int = 4096, stall: float = 0.3
) -> int:
    """Send FRAME COUNT times without reading, until the peer stops reading for STALL seconds.

    Returns how many frames were sent whole. The peer's replies are left unread, so its send
    buffers fill up.
    """
    sent = 0
    chunk = frame * batch
    while sent < count:
        try:
            connection.send(chunk, timeout=stall)
        except (TimeoutError, socket.timeout):
            break
        except (ssl.SSLError, OSError):
            break
        sent += batch
    return sent


def violate_frame_before_hello(connection: RawConnection) -> None:
    connection.send_frame(FrameType.PING, 0, 0, bytes(8))


def violate_bad_version(connection: RawConnection, role: int = Role.BRIDGE) -> None:
    connection.send_hello(role=role, version=PROTOCOL_VERSION + 1)


def violate_same_role(connection: RawConnection, role: int = Role.BROKER) -> None:
    connection.send_hello(role=role)


def violate_hello_bad_length(connection: RawConnection, role: int = Role.BRIDGE) -> None:
    payload = encode_hello(Hello(role=role)) + b"\0\0\0"
    connection.send_frame(FrameType.HELLO, 0, 0, payload)


def violate_second_hello(connection: RawConnection, role: int = Role.BRIDGE) -> None:
    connection.send_hello(role=role)


def violate_ping_bad_length(connection: RawConnection) -> None:
    connection.send_frame(FrameType.PING, 0, 0, bytes(7))


def violate_window_update_bad_length(connection: RawConnection) -> None:
    connection.send_frame(FrameType.WINDOW_UPDATE, 0, 0, bytes(5))


def violate_payload_over_max(connection: RawConnection, max_payload: int) -> None:
    # The header alone breaks the rule; the payload follows so that the stream stays in sync.
    connection.send(encode_header(max_payload + 1, FrameType.DATA, 0, 1) + bytes(max_payload + 1))


def violate_unknown_type(connection: RawConnection) -> None:
    connection.send_frame(0x7, 0, 0, b"")


def violate_data_on_stream_zero(connection: RawConnection) -> None:
    connection.send_frame(FrameType.DATA, 0, 0, b"x")


def violate_data_unknown_stream(connection: RawConnection, stream_id: int = 5) -> None:
    connection.send_frame(FrameType.DATA, 0, stream_id, b"x")


def violate_rst_unknown_stream(connection: RawConnection, stream_id: int = 5) -> None:
    connection.send_frame(FrameType.RST_STREAM, 0, stream_id, encode_u32(ErrorCode.CANCEL))


def violate_window_update_unknown_stream(connection: RawConnection, stream_id: int = 5) -> None:
    connection.send_frame(FrameType.WINDOW_UPDATE, 0, stream_id, encode_u32(1024))


def violate_window_update_zero(connection: RawConnection) -> None:
    connection.send_frame(FrameType.WINDOW_UPDATE, 0, 0, encode_u32(0))


def violate_window_overflow(connection: RawConnection, stream_id: int = 0) -> None:
    # Any window above 0 plus 2^31-1 is above 2^31-1.
    connection.send_frame(FrameType.WINDOW_UPDATE, 0, stream_id, encode_u32(MAX_WINDOW))


def violate_data_beyond_window(connection: RawConnection, stream_id: int, window: int) -> None:
    connection.send_frame(FrameType.DATA, 0, stream_id, bytes(window + 1))


def violate_headers_from_bridge(connection: RawConnection, stream_id: int = 1) -> None:
    head = ResponseHead(200, [("Content-Length", "0")])
    connection.send_headers(stream_id, head, end_stream=True)


def violate_ping_flood(connection: RawConnection, count: int = 2_000_000) -> int:
    return send_flood(connection, encode_frame(FrameType.PING, 0, 0, bytes(8)), count)


def open_streams(
    connection: RawConnection, first_id: int, count: int, target: str, end_stream: bool = True
) -> None:
    """Send COUNT HEADERS frames with consecutive stream ids, as a broker (possibly too many)."""
    frames = bytearray()
    for stream_id in range(first_id, first_id + count):
        head = RequestHead("GET", target, [("X-Vault-Token", "root")])
        flags = FLAG_END_STREAM if end_stream else 0
        frames += encode_frame(FrameType.HEADERS, flags, stream_id, encode_request_head(head))
    connection.send(bytes(frames), timeout=30.0)


HUGE_WINDOWS = Settings(
    max_frame_payload=MAX_LENGTH_FIELD,
    initial_stream_window=MAX_WINDOW,
    max_concurrent_streams=0xFFFFFFFF,
    max_header_block=MAX_LENGTH_FIELD,
    initial_connection_window=MAX_WINDOW,
)

# Violations that need nothing but a connection after TLS, by name, for the command line.
VIOLATIONS: dict[str, Callable[[RawConnection], object]] = {
    "frame-before-hello": violate_frame_before_hello,
    "bad-version": violate_bad_version,
    "hello-bad-length": violate_hello_bad_length,
    "ping-bad-length": violate_ping_bad_length,
    "window-update-bad-length": violate_window_update_bad_length,
    "payload-over-max": lambda c: violate_payload_over_max(c, 65536),
    "unknown-type": violate_unknown_type,
    "data-unknown-stream": violate_data_unknown_stream,
    "window-update-zero": violate_window_update_zero,
    "window-overflow": violate_window_overflow,
    "headers-from-bridge": violate_headers_from_bridge,
    "ping-flood": violate_ping_flood,
}
# Violations that must come before a valid HELLO, because they replace it.
VIOLATIONS_BEFORE_HELLO = {"frame-before-hello", "bad-version", "hello-bad-length"}


# ---------------------------------------------------------------------------------------------
# A session that follows the protocol (§4-§6), on asyncio


class Stream:
    """One stream of a Session: its windows, received data and state (§5.8)."""

    def __init__(self, session: "Session", stream_id: int):
        self.session = session
        self.id = stream_id
        self.request_bytes = 0  # the encoded request head's share of REQUEST_HEAD_BUDGET
        self.request: Optional[RequestHead] = None
        self.response: Optional[ResponseHead] = None
        self.response_ready = asyncio.Event()
        self.send_window = session.peer.settings.initial_stream_window
        self.receive_window = session.local.initial_stream_window
        self.unreturned = 0
        self.inbox: collections.deque[bytes] = collections.deque()
        self.inbox_changed = asyncio.Event()
        self.remote_ended = False
        self.local_ended = False
        self.reset_code: Optional[int] = None
        self.reset_by_peer = False

    @property
    def failed(self) -> bool:
        return self.reset_code is not None

    def _raise_if_failed(self) -> None:
        if self.reset_code is not None:
            raise StreamReset(self.reset_code, self.reset_by_peer)

    async def read(self) -> bytes:
        """Return the next body chunk, b"" at the end. Raise StreamReset when the stream failed."""
        while True:
            if self.inbox:
                chunk = self.inbox.popleft()
                self.session._credit_read(self, len(chunk))
                return chunk
            if self.remote_ended:
                return b""
            self._raise_if_failed()
            self.inbox_changed.clear()
            await self.inbox_changed.wait()

    async def read_all(self, limit: int = 1 << 30) -> bytes:
        parts = []
        total = 0
        while chunk := await self.read():
            parts.append(chunk)
            total += len(chunk)
            if total > limit:
                raise ValueError(f"body above {limit} octets")
        return b"".join(parts)

    async def read_response_head(self) -> ResponseHead:
        while self.response is None:
            self._raise_if_failed()
            self.response_ready.clear()
            await self.response_ready.wait()
        return self.response

    async def write(self, data: bytes, end_stream: bool = False) -> None:
        await self.session._send_data(self, data, end_stream)

    async def write_response_head(self, head: ResponseHead, end_stream: bool) -> None:
        await self.session._send_headers(self, encode_response_head(head), end_stream)

    def reset(self, code: int) -> None:
        self.session._reset(self, code)

    def _fail(self, code: int, by_peer: bool) -> None:
        if self.reset_code is None:
            self.reset_code = code
            self.reset_by_peer = by_peer
        self.inbox_changed.set()
        self.response_ready.set()


StreamHandler = Callable[[Stream], Awaitable[None]]


class Session:
    """One tunnel connection that follows docs/protocol.md, as broker or as bridge.

    Credit policy (§6.4 leaves it to the receiver): stream and connection credit are both
    returned as the application reads, once half of the initial window is unreturned, and at
    once for data on closed streams.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        role: Role,
        local: Optional[Settings] = None,
        handler: Optional[StreamHandler] = None,
        name: str = "peer",
    ):
        self.reader = reader
        self.writer = writer
        self.role = role
        self.local = local or Settings()
        self.handler = handler
        self.name = name
        self.instance = os.urandom(16)
        self.peer = Hello()
        self.streams: dict[int, Stream] = {}
        self.request_head_bytes = 0
        self.highest_stream_id = 0
        self.connection_send_window = 0
        self.connection_receive_window = self.local.initial_connection_window
        self.connection_unreturned = 0
        self.window_changed = asyncio.Condition()
        self.goaway_sent = False
        self.goaway_received: Optional[GoAway] = None
        self.closed = asyncio.Event()
        self.close_reason: Optional[BaseException] = None
        self.tasks: set[asyncio.Task] = set()
        self.frames_received = collections.Counter()
        self.window_updates_received = 0

    # --- setup ---

    async def handshake(self, timeout: float = 10.0) -> Hello:
        """Exchange HELLO frames (§4.3); on failure send GOAWAY, close and raise."""
        hello = Hello(PROTOCOL_VERSION, self.role, self.instance, self.local)
        self._write(FrameType.HELLO, 0, 0, encode_hello(hello))
        try:
            async with asyncio.timeout(timeout):
                header = await self.reader.readexactly(HEADER_SIZE)
                length, frame_type, _flags, stream_id = parse_header(header)
                try:
                    check_header(length, frame_type, stream_id, MIN_MAX_FRAME_PAYLOAD)
                except ProtocolViolation:
                    raise connection_error(ErrorCode.FRAME_SIZE_ERROR, "invalid first frame")
                if frame_type != FrameType.HELLO:
                    raise connection_error(ErrorCode.PROTOCOL_ERROR, "frame before HELLO")
                peer = decode_hello(await self.reader.readexactly(length))
                if peer.version != PROTOCOL_VERSION:
                    raise connection_error(
                        ErrorCode.VERSION_MISMATCH, f"unsupported protocol version {peer.version}"
                    )
                if peer.role == self.role:
                    raise connection_error(ErrorCode.PROTOCOL_ERROR, "peer has the same role")
        except ProtocolViolation as violation:
            await self._fail_connection(violation)
            raise
        except BaseException as error:
            await self.close(error)
            raise
        self.peer = peer
        self.connection_send_window = peer.settings.initial_connection_window
        return peer

    def start(self) -> None:
        """Run the read loop in the background."""
        self._spawn(self._read_loop())

    def _spawn(self, coroutine) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def close(self, reason: Optional[BaseException] = None) -> None:
        if self.closed.is_set():
            return
        self.close_reason = reason
        self.closed.set()
        for stream in list(self.streams.values()):
            stream._fail(ErrorCode.CANCEL, by_peer=False)
        self.streams.clear()
        self.request_head_bytes = 0
        async with self.window_changed:
            self.window_changed.notify_all()
        self.writer.close()
        try:
            async with asyncio.timeout(2):
                await self.writer.wait_closed()
        except (TimeoutError, OSError, ssl.SSLError):
            pass
        current = asyncio.current_task()
        for task in list(self.tasks):
            if task is not current:
                task.cancel()

    async def goaway(self, code: int = ErrorCode.NO_ERROR, text: str = "peer is done") -> None:
        """Send GOAWAY (§5.6): no new streams on this connection."""
        if not self.goaway_sent:
            self.goaway_sent = True
            self._write(
                FrameType.GOAWAY, 0, 0, encode_goaway(GoAway(self.highest_stream_id, code, text.encode()))
            )
            await self._drain()

    # --- writing ---

    def _write(self, frame_type: int, flags: int, stream_id: int, payload: bytes = b"") -> None:
        if not self.closed.is_set():
            self.writer.write(encode_frame(frame_type, flags, stream_id, payload))

    async def _drain(self) -> None:
        try:
            await self.writer.drain()
        except (ConnectionError, ssl.SSLError, RuntimeError) as error:
            await self.close(error)

    async def _send_headers(self, stream: Stream, payload: bytes, end_stream: bool) -> None:
        limit = min(self.peer.settings.max_header_block, self.peer.settings.max_frame_payload)
        if len(payload) > limit:
            raise ValueError(f"head of {len(payload)} octets above the peer's limit {limit}")
        stream._raise_if_failed()
        self._write(FrameType.HEADERS, FLAG_END_STREAM if end_stream else 0, stream.id, payload)
        if end_stream:
            self._end_local(stream)
        await self._drain()

    async def _send_data(self, stream: Stream, data: bytes, end_stream: bool) -> None:
        """Send DATA within the windows and the peer's max_frame_payload (§5.3, §6.1)."""
        view = memoryview(data)
        if stream.local_ended:
            raise ValueError(f"stream {stream.id} already ended")
        while True:
            stream._raise_if_failed()
            if self.closed.is_set():
                raise StreamReset(ErrorCode.CANCEL, by_peer=False)
            if not view:
                if end_stream:
                    self._write(FrameType.DATA, FLAG_END_STREAM, stream.id)
                    self._end_local(stream)
                    await self._drain()
                return
            async with self.window_changed:
                await self.window_changed.wait_for(
                    lambda: stream.failed
                    or self.closed.is_set()
                    or (stream.send_window > 0 and self.connection_send_window > 0)
                )
            if stream.failed or self.closed.is_set():
                continue
            size = min(
                len(view),
                stream.send_window,
                self.connection_send_window,
                self.peer.settings.max_frame_payload,
            )
            last = end_stream and size == len(view)
            self._write(FrameType.DATA, FLAG_END_STREAM if last else 0, stream.id, bytes(view[:size]))
            stream.send_window -= size
            self.connection_send_window -= size
            view = view[size:]
            if last:
                self._end_local(stream)
            await self._drain()
            if last:
                return

    def _end_local(self, stream: Stream) -> None:
        stream.local_ended = True
        if stream.remote_ended:
            self._forget(stream)

    def _forget(self, stream: Stream) -> None:
        if self.streams.pop(stream.id, None) is not None:
            self.request_head_bytes -= stream.request_bytes

    def _reset(self, stream: Stream, code: int) -> None:
        if stream.failed or self.closed.is_set():
            return
        if not (stream.local_ended and stream.remote_ended):
            self._write(FrameType.RST_STREAM, 0, stream.id, encode_u32(code))
        self._discard_inbox(stream)
        stream._fail(code, by_peer=False)
        self._forget(stream)

    def _discard_inbox(self, stream: Stream) -> None:
        dropped = sum(len(chunk) for chunk in stream.inbox)
        stream.inbox.clear()
        self._credit_connection(dropped)

    def _credit_read(self, stream: Stream, count: int) -> None:
        """Return credit for COUNT octets the application read from STREAM (§6.3)."""
        if count and not stream.remote_ended and not stream.failed:
            stream.unreturned += count
            if stream.unreturned >= max(self.local.initial_stream_window // 2, 1):
                stream.receive_window += stream.unreturned
                self._write(FrameType.WINDOW_UPDATE, 0, stream.id, encode_u32(stream.unreturned))
                stream.unreturned = 0
        self._credit_connection(count)

    def _credit_connection(self, count: int) -> None:
        self.connection_unreturned += count
        threshold = max(self.local.initial_connection_window // 2, 1)
        if self.connection_unreturned >= threshold:
            self.connection_receive_window += self.connection_unreturned
            self._write(FrameType.WINDOW_UPDATE, 0, 0, encode_u32(self.connection_unreturned))
            self.connection_unreturned = 0

    # --- streams opened by this side (broker) ---

    def can_open(self) -> bool:
        return (
            self.role == Role.BROKER
            and not self.closed.is_set()
            and not self.goaway_sent
            and self.goaway_received is None
            and len(self.streams) < self.peer.settings.max_concurrent_streams
            and self.highest_stream_id < MAX_STREAM_ID
        )

    async def open_stream(self, head: RequestHead, end_stream: bool) -> Stream:
        """Open a stream with a request head (§5.1, §5.2); broker only."""
        if not self.can_open():
            raise StreamReset(ErrorCode.REFUSED_STREAM, by_peer=False)
        self.highest_stream_id += 1
        stream = Stream(self, self.highest_stream_id)
        stream.request = head
        self.streams[stream.id] = stream
        await self._send_headers(stream, encode_request_head(head), end_stream)
        return stream

    async def request(
        self,
        method: str,
        target: str,
        fields: Fields = (),
        body: Optional[bytes] = None,
        timeout: float = 30.0,
    ) -> tuple[ResponseHead, bytes]:
        """Send one request through the bridge and return its response head and body."""
        head = RequestHead(method, target, list(fields))
        async with asyncio.timeout(timeout):
            stream = await self.open_stream(head, end_stream=not body)
            sender = None
            if body:
                sender = self._spawn(stream.write(body, end_stream=True))
            try:
                response = await stream.read_response_head()
                data = await stream.read_all()
            except BaseException:
                stream.reset(ErrorCode.CANCEL)
                raise
            finally:
                if sender is not None and not sender.done():
                    # The bridge sent its response before it took the whole body (§5.5 R5).
                    sender.cancel()
            return response, data

    # --- reading ---

    async def _read_loop(self) -> None:
        try:
            while True:
                try:
                    header = await self.reader.readexactly(HEADER_SIZE)
                except asyncio.IncompleteReadError:
                    await self.close(ConnectionError("connection closed by the peer"))
                    return
                length, frame_type, flags, stream_id = parse_header(header)
                check_header(length, frame_type, stream_id, self.local.max_frame_payload)
                payload = await self.reader.readexactly(length)
                self.frames_received[FrameType(frame_type).name] += 1
                try:
                    await self._dispatch(FrameType(frame_type), flags, stream_id, payload)
                except ProtocolViolation as violation:
                    if not violation.stream_level:
                        raise
                    stream = self.streams.get(violation.stream_id)
                    if stream is not None:
                        self._reset(stream, violation.code)
                    await self._drain()
        except ProtocolViolation as violation:
            await self._fail_connection(violation)
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError, OSError) as error:
            await self.close(error)

    async def _fail_connection(self, violation: ProtocolViolation) -> None:
        """Send GOAWAY with the error (§7.1) and close."""
        if not self.goaway_sent and not self.closed.is_set():
            self.goaway_sent = True
            goaway = GoAway(self.highest_stream_id, violation.code, violation.text.encode())
            self._write(FrameType.GOAWAY, 0, 0, encode_goaway(goaway))
            try:
                async with asyncio.timeout(1):
                    await self.writer.drain()
            except (TimeoutError, ConnectionError, ssl.SSLError):
                pass
        await self.close(violation)

    async def _dispatch(self, frame_type: FrameType, flags: int, stream_id: int, payload: bytes):
        if frame_type == FrameType.HELLO:
            raise connection_error(ErrorCode.PROTOCOL_ERROR, "second HELLO")
        if frame_type == FrameType.HEADERS:
            if self.role == Role.BRIDGE:
                await self._on_request_headers(flags, stream_id, payload)
            else:
                self._on_response_headers(flags, stream_id, payload)
        elif frame_type == FrameType.DATA:
            self._on_data(flags, stream_id, payload)
        elif frame_type == FrameType.WINDOW_UPDATE:
            await self._on_window_update(stream_id, payload)
        elif frame_type == FrameType.RST_STREAM:
            self._on_rst_stream(stream_id, payload)
        elif frame_type == FrameType.PING:
            await self._on_ping(flags, payload)
        elif frame_type == FrameType.GOAWAY:
            self._on_goaway(payload)

    async def _on_request_headers(self, flags: int, stream_id: int, payload: bytes) -> None:
        """§5.2, receiver rules at the bridge."""
        if len(payload) > self.local.max_header_block:
            raise connection_error(ErrorCode.FRAME_SIZE_ERROR, "HEADERS above max_header_block")
        if stream_id <= self.highest_stream_id:
            raise connection_error(
                ErrorCode.STREAM_CLOSED, "HEADERS on a stream id already used", stream_id
            )
        self.highest_stream_id = stream_id
        if (
            self.goaway_sent
            or len(self.streams) >= self.local.max_concurrent_streams
            or self.request_head_bytes + len(payload) > REQUEST_HEAD_BUDGET
        ):
            self._write(FrameType.RST_STREAM, 0, stream_id, encode_u32(ErrorCode.REFUSED_STREAM))
            await self._drain()
            return
        try:
            head = decode_request_head(payload)
        except ValueError:
            self._write(FrameType.RST_STREAM, 0, stream_id, encode_u32(ErrorCode.PROTOCOL_ERROR))
            await self._drain()
            return
        stream = Stream(self, stream_id)
        stream.request = head
        stream.request_bytes = len(payload)
        self.request_head_bytes += len(payload)
        stream.remote_ended = bool(flags & FLAG_END_STREAM)
        self.streams[stream_id] = stream
        if self.handler is None:
            self._reset(stream, ErrorCode.REFUSED_STREAM)
            return
        self._spawn(self._serve(stream))

    async def _serve(self, stream: Stream) -> None:
        try:
            await self.handler(stream)
        except StreamReset:
            pass
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - any handler failure ends only its stream
            stream.reset(ErrorCode.INTERNAL_ERROR)
            await self._drain()

    def _on_response_headers(self, flags: int, stream_id: int, payload: bytes) -> None:
        """§5.2, receiver rules at the broker."""
        if len(payload) > self.local.max_header_block:
            raise connection_error(ErrorCode.FRAME_SIZE_ERROR, "HEADERS above max_header_block")
        if stream_id > self.highest_stream_id:
            raise connection_error(
                ErrorCode.PROTOCOL_ERROR, "HEADERS on a stream the broker never opened", stream_id
            )
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        if stream.response is not None or stream.remote_ended:
            raise stream_error(ErrorCode.PROTOCOL_ERROR, "second response head", stream_id)
        try:
            head = decode_response_head(payload)
        except ValueError as error:
            raise stream_error(ErrorCode.PROTOCOL_ERROR, f"malformed response head: {error}", stream_id)
        if head.status < 200:
            raise stream_error(ErrorCode.PROTOCOL_ERROR, "interim response head", stream_id)
        stream.response = head
        stream.response_ready.set()
        if flags & FLAG_END_STREAM:
            self._end_remote(stream)

    def _end_remote(self, stream: Stream) -> None:
        stream.remote_ended = True
        stream.inbox_changed.set()
        if stream.local_ended:
            self._forget(stream)

    def _on_data(self, flags: int, stream_id: int, payload: bytes) -> None:
        """§5.3 receiver rules R1-R7 and §6.2."""
        length = len(payload)
        if length > self.connection_receive_window:
            raise connection_error(
                ErrorCode.FLOW_CONTROL_ERROR, "DATA beyond the connection window", stream_id
            )
        self.connection_receive_window -= length
        if stream_id > self.highest_stream_id:
            raise connection_error(ErrorCode.PROTOCOL_ERROR, "DATA on a stream never opened", stream_id)
        stream = self.streams.get(stream_id)
        if stream is None:
            self._credit_connection(length)
            return
        if stream.remote_ended:
            self._credit_connection(length)
            raise stream_error(ErrorCode.STREAM_CLOSED, "DATA after END_STREAM", stream_id)
        if self.role == Role.BROKER and stream.response is None:
            self._credit_connection(length)
            raise stream_error(ErrorCode.PROTOCOL_ERROR, "DATA before the response head", stream_id)
        if length > stream.receive_window:
            raise connection_error(
                ErrorCode.FLOW_CONTROL_ERROR, "DATA beyond the stream window", stream_id
            )
        stream.receive_window -= length
        if length:
            stream.inbox.append(payload)
        stream.inbox_changed.set()
        if flags & FLAG_END_STREAM:
            self._end_remote(stream)

    async def _on_window_update(self, stream_id: int, payload: bytes) -> None:
        """§5.4 receiver rules."""
        increment = decode_u32(payload)
        if increment == 0 or increment > MAX_WINDOW:
            raise connection_error(ErrorCode.PROTOCOL_ERROR, "WINDOW_UPDATE of 0 or above 2^31-1")
        self.window_updates_received += 1
        if stream_id == 0:
            self.connection_send_window += increment
            if self.connection_send_window > MAX_WINDOW:
                raise connection_error(ErrorCode.FLOW_CONTROL_ERROR, "connection window above 2^31-1")
        else:
            if stream_id > self.highest_stream_id:
                raise connection_error(
                    ErrorCode.PROTOCOL_ERROR, "WINDOW_UPDATE on a stream never opened", stream_id
                )
            stream = self.streams.get(stream_id)
            if stream is None:
                return
            stream.send_window += increment
            if stream.send_window > MAX_WINDOW:
                raise stream_error(ErrorCode.FLOW_CONTROL_ERROR, "stream window above 2^31-1", stream_id)
        async with self.window_changed:
            self.window_changed.notify_all()

    def _on_rst_stream(self, stream_id: int, payload: bytes) -> None:
        """§5.5 receiver rules."""
        if stream_id > self.highest_stream_id:
            raise connection_error(
                ErrorCode.PROTOCOL_ERROR, "RST_STREAM on a stream never opened", stream_id
            )
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        if not stream.remote_ended:
            self._discard_inbox(stream)
        stream._fail(decode_u32(payload), by_peer=True)
        self._forget(stream)
        self._spawn(self._notify_windows())

    async def _notify_windows(self) -> None:
        async with self.window_changed:
            self.window_changed.notify_all()

    async def _on_ping(self, flags: int, payload: bytes) -> None:
        """§5.7: send an ACK for every PING without one, unless the ACKs pile up unsent."""
        if flags & FLAG_ACK:
            return
        if self.writer.transport.get_write_buffer_size() > 4 * 1024 * 1024:
            raise connection_error(ErrorCode.ENHANCE_YOUR_CALM, "answers to PING are not read")
        self._write(FrameType.PING, FLAG_ACK, 0, payload)

    def _on_goaway(self, payload: bytes) -> None:
        """§5.6 receiver rules: the broker fails streams above the last stream identifier."""
        goaway = decode_goaway(payload)
        self.goaway_received = goaway
        if self.role == Role.BROKER:
            for stream in [s for s in self.streams.values() if s.id > goaway.last_stream_id]:
                stream._fail(ErrorCode.REFUSED_STREAM, by_peer=True)
                self._forget(stream)
            self._spawn(self._notify_windows())


# ---------------------------------------------------------------------------------------------
# Stream handlers of the bridge role (§9.2, §9.3)


def end_to_end(fields: Fields) -> Fields:
    """Remove hop-by-hop fields and those named in Connection (§9.1)."""
    nominated = set()
    for name, value in fields:
        if name.lower() == "connection":
            nominated.update(item.strip().lower() for item in value.split(",") if item.strip())
    return [
        (name, value)
        for name, value in fields
        if name.lower() not in HOP_BY_HOP and name.lower() not in nominated
    ]


def canned_handler(status: int = 200, body: bytes = b"", fields: Fields = ()) -> StreamHandler:
    """Return a handler that reads the request body and sends the same response on every stream."""

    async def handle(stream: Stream) -> None:
        await stream.read_all()
        head_fields = [*fields, ("Content-Length", str(len(body)))]
        no_body = not body or stream.request.method == "HEAD"
        await stream.write_response_head(ResponseHead(status, head_fields), end_stream=no_body)
        if not no_body:
            await stream.write(body, end_stream=True)

    return handle


class HttpError(Exception):
    """The HTTP server behind the bridge sent something this client cannot parse."""


async def _read_line(reader: asyncio.StreamReader) -> bytes:
    line = await reader.readuntil(b"\n")
    return line.rstrip(b"\r\n")


async def _read_response_head(reader: asyncio.StreamReader) -> tuple[int, Fields]:
    status_line = (await _read_line(reader)).decode("latin-1")
    match = re.fullmatch(r"HTTP/1\.[01] (\d{3})(?: .*)?", status_line)
    if not match:
        raise HttpError(f"invalid status line {status_line!r}")
    fields: Fields = []
    while line := await _read_line(reader):
        name, separator, value = line.decode("latin-1").partition(":")
        if not separator:
            raise HttpError(f"invalid header line {line!r}")
        fields.append((name.strip(), value.strip()))
    return int(match.group(1)), fields


async def _copy_chunked(reader: asyncio.StreamReader, stream: Stream) -> None:
    while True:
        size_line = (await _read_line(reader)).split(b";")[0].strip()
        size = int(size_line, 16)
        if size == 0:
            while await _read_line(reader):
                pass  # trailers are not carried (§9.1)
            await stream.write(b"", end_stream=True)
            return
        left = size
        while left:
            chunk = await reader.read(min(left, 64 * 1024))
            if not chunk:
                raise HttpError("connection closed inside a chunk")
            left -= len(chunk)
            await stream.write(chunk)
        await _read_line(reader)


def _vault_request_text(request: RequestHead, host: str, port: int, has_body: bool) -> bytes:
    """Build the HTTP/1.1 request head that the bridge sends to the vault (§9.2)."""
    fields = [(n, v) for n, v in end_to_end(request.fields) if n.lower() != "expect"]
    text = f"{request.method} {request.target} HTTP/1.1\r\n"
    if find_field(fields, "host") is None:
        text += f"Host: {host}:{port}\r\n"
    text += "".join(f"{name}: {value}\r\n" for name, value in fields)
    if has_body and find_field(fields, "content-length") is None:
        text += "Transfer-Encoding: chunked\r\n"
    # One connection per stream keeps this client simple.
    text += "Connection: close\r\n\r\n"
    return text.encode("latin-1")


async def _relay_response(reader: asyncio.StreamReader, stream: Stream) -> None:
    """Read the vault's response and send it on STREAM as HEADERS and DATA (§9.3)."""
    for _ in range(8):
        status, response_fields = await _read_response_head(reader)
        if status >= 200 or status == 101:
            break
    if status < 200:
        raise HttpError(f"status {status} is not a final response")
    coding = (find_field(response_fields, "transfer-encoding") or "").lower()
    content_length = find_field(response_fields, "content-length")
    no_body = (
        stream.request.method == "HEAD"
        or status in (204, 304)
        or (content_length == "0" and "chunked" not in coding)
    )

    head = ResponseHead(status, end_to_end(response_fields))
    await stream.write_response_head(head, end_stream=no_body)
    stream.response = head
    if no_body:
        return

    if "chunked" in coding:
        await _copy_chunked(reader, stream)
        return
    if content_length is not None:
        left = int(content_length)
        while left:
            chunk = await reader.read(min(left, 64 * 1024))
            if not chunk:
                raise HttpError("connection closed inside the body")
            left -= len(chunk)
            await stream.write(chunk, end_stream=left == 0)
        return
    while chunk := await reader.read(64 * 1024):
        await stream.write(chunk)
    await stream.write(b"", end_stream=True)


def http_forwarder(host: str, port: int, timeout: float = 60.0) -> StreamHandler:
    """Return a handler that replays each stream's request against http://HOST:PORT (§9.2, §9.3)."""

    async def upload(stream: Stream, writer: asyncio.StreamWriter, chunked: bool) -> None:
        try:
            while chunk := await stream.read():
                writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
                await writer.drain()
            if chunked:
                writer.write(b"0\r\n\r\n")
                await writer.drain()
        except (StreamReset, ConnectionError):
            # The response side notices the failure and resets or ends the stream.
            return

    async def handle(stream: Stream) -> None:
        request = stream.request
        if request.method == "CONNECT":
            await _respond_error(stream, 403, "byte tunnels are not enabled on this bridge")
            return
        if not request.target.startswith("/"):
            await _respond_error(stream, 400, "request target must be a path")
            return
        has_body = not stream.remote_ended or bool(stream.inbox)
        chunked = has_body and find_field(request.fields, "content-length") is None
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError as error:
            await _respond_error(stream, 503, f"the peer bridge cannot reach {host}:{port}: {error}")
            return

        uploader = None
        try:
            async with asyncio.timeout(timeout):
                writer.write(_vault_request_text(request, host, port, has_body))
                await writer.drain()
                if has_body:
                    uploader = asyncio.get_running_loop().create_task(upload(stream, writer, chunked))
                await _relay_response(reader, stream)
            if uploader is not None and not uploader.done():
                # The response is complete before the request body: stop the sender (§5.5 R5).
                uploader.cancel()
                stream.reset(ErrorCode.NO_ERROR)
        except (HttpError, ConnectionError, TimeoutError, ValueError, asyncio.IncompleteReadError):
            # §9.3 rule 4: before any response octet the vault was not reached.
            stream.reset(ErrorCode.INTERNAL_ERROR if stream.response else ErrorCode.CONNECT_ERROR)
        finally:
            if uploader is not None:
                uploader.cancel()
            writer.close()

    return handle


async def _respond_error(stream: Stream, status: int, message: str) -> None:
    body = ('{"errors":["%s"]}' % message.replace('"', "'")).encode()
    head = ResponseHead(
        status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    )
    await stream.write_response_head(head, end_stream=False)
    await stream.write(body, end_stream=True)


# ---------------------------------------------------------------------------------------------
# Running a session on a thread of its own, for tests


class PeerThread:
    """An asyncio loop on a daemon thread; call() runs a coroutine there and waits for it."""

    def __init__(self, name: str = "taser-peer"):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def call(self, coroutine, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        async def cancel_all():
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if self.loop.is_running():
            try:
                self.call(cancel_all(), timeout)
            except Exception:  # noqa: BLE001 - stopping anyway
                pass
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout)
        if not self.thread.is_alive():
            self.loop.close()


async def dial_bridge(
    port: int,
    context: ssl.SSLContext,
    handler: StreamHandler,
    host: str = "127.0.0.1",
    server_hostname: str = "localhost",
    settings: Optional[Settings] = None,
    timeout: float = 10.0,
) -> Session:
    """Dial a broker as a bridge, exchange HELLO and start serving streams with HANDLER."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(
            host, port, ssl=context, server_hostname=server_hostname
        )
    check_alpn(writer.get_extra_info("ssl_object"))
    session = Session(reader, writer, Role.BRIDGE, settings, handler, name="peer-bridge")
    await session.handshake(timeout)
    session.start()
    return session


class PeerBridge:
    """The peer as a bridge on its own thread: dials a broker and answers its streams."""

    def __init__(
        self,
        port: int,
        context: ssl.SSLContext,
        handler: StreamHandler,
        settings: Optional[Settings] = None,
    ):
        self.thread = PeerThread("taser-peer-bridge")
        try:
            self.session = self.thread.call(dial_bridge(port, context, handler, settings=settings))
        except BaseException:
            self.thread.stop()
            raise

    def close(self) -> None:
        try:
            self.thread.call(self.session.close(), timeout=5)
        except Exception:  # noqa: BLE001 - stopping anyway
            pass
        self.thread.stop()


class PeerBroker:
    """The peer as a broker on its own thread: accepts bridges and sends requests through them."""

    def __init__(self, context: ssl.SSLContext, settings: Optional[Settings] = None):
        self.context = context
        self.settings = settings
        self.thread = PeerThread("taser-peer-broker")
        self.sessions: asyncio.Queue = None  # created on the loop
        try:
            self.server, self.port = self.thread.call(self._listen())
        except BaseException:
            self.thread.stop()
            raise

    async def _listen(self):
        self.sessions = asyncio.Queue()

        async def on_connection(reader, writer):
            try:
                check_alpn(writer.get_extra_info("ssl_object"))
                session = Session(reader, writer, Role.BROKER, self.settings, name="peer-broker")
                await session.handshake()
            except (ProtocolViolation, ConnectionError, OSError, TimeoutError, ssl.SSLError):
                writer.close()
                return
            session.start()
            await self.sessions.put(session)

        server = await asyncio.start_server(on_connection, "127.0.0.1", 0, ssl=self.context)
        return server, server.sockets[0].getsockname()[1]

    def accept(self, timeout: float = 30.0) -> Session:
        """Wait for the next bridge to finish its HELLO exchange and return its session."""

        async def next_session():
            async with asyncio.timeout(timeout):
                return await self.sessions.get()

        return self.thread.call(next_session(), timeout + 5)

    def request(self, session: Session, method: str, target: str, fields: Fields = (),
                body: Optional[bytes] = None, timeout: float = 30.0) -> tuple[ResponseHead, bytes]:
        return self.thread.call(session.request(method, target, fields, body, timeout), timeout + 5)

    def close(self) -> None:
        async def shut():
            self.server.close()
            while not self.sessions.empty():
                await self.sessions.get_nowait().close()

        try:
            self.thread.call(shut(), timeout=5)
        except Exception:  # noqa: BLE001 - stopping anyway
            pass
        self.thread.stop()


# ---------------------------------------------------------------------------------------------
# Command line


def _split_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


async def _run_bridge(arguments) -> int:
    context = client_context(arguments.client_cert, arguments.client_key, arguments.ca_cert)
    host, port = _split_address(arguments.broker_address)
    if arguments.vault_address:
        match = re.fullmatch(r"http://([^/:]+|\[[^\]]+\]):(\d+)/?", arguments.vault_address)
        if not match:
            raise SystemExit(f"invalid --vault-address {arguments.vault_address!r}: expected http://HOST:PORT")
        handler = http_forwarder(match.group(1).strip("[]"), int(match.group(2)))
    else:
        handler = canned_handler(200, b'{"peer":"taser_peer.py"}\n', [("Content-Type", "application/json")])
    session = await dial_bridge(port, context, handler, host=host, server_hostname=arguments.server_name)
    print(f"connected to broker {arguments.broker_address}", file=sys.stderr)
    await session.closed.wait()
    print(f"connection ended: {session.close_reason}", file=sys.stderr)
    return 0


async def _run_broker(arguments) -> int:
    context = server_context(arguments.cert, arguments.key, arguments.ca)
    host, port = _split_address(arguments.listen)
    sessions: asyncio.Queue = asyncio.Queue()

    async def on_connection(reader, writer):
        check_alpn(writer.get_extra_info("ssl_object"))
        session = Session(reader, writer, Role.BROKER, name="peer-broker")
        await session.handshake()
        session.start()
        await sessions.put(session)

    server = await asyncio.start_server(on_connection, host, port, ssl=context)
    print(f"listening on {server.sockets[0].getsockname()}", file=sys.stderr)
    try:
        async with asyncio.timeout(arguments.timeout):
            session = await sessions.get()
    except TimeoutError:
        print(f"no bridge finished its HELLO within {arguments.timeout:g} s", file=sys.stderr)
        server.close()
        return 1
    head, body = await session.request(arguments.method, arguments.target,
                                       [tuple(f.split(":", 1)) for f in arguments.header],
                                       timeout=arguments.timeout)
    print(head.status)
    for name, value in head.fields:
        print(f"{name}: {value}")
    print()
    sys.stdout.flush()
    sys.stdout.buffer.write(body)
    await session.close()
    server.close()
    return 0


def _run_violation(arguments) -> int:
    context = client_context(arguments.client_cert, arguments.client_key, arguments.ca_cert)
    host, port = _split_address(arguments.broker_address)
    connection = RawConnection.dial(port, context, host=host, server_hostname=arguments.server_name,
                                    receive_buffer=4096)
    try:
        if arguments.violation not in VIOLATIONS_BEFORE_HELLO:
            connection.exchange_hello(Role.BRIDGE)
        VIOLATIONS[arguments.violation](connection)
        frames = connection.read_to_end(timeout=arguments.timeout)
    finally:
        connection.close()
    for frame in frames:
        line = frame.describe()
        if frame.type == FrameType.GOAWAY:
            goaway = decode_goaway(frame.payload)
            line += f" code={goaway.error_name} debug={goaway.debug.decode(errors='replace')!r}"
        elif frame.type == FrameType.RST_STREAM:
            line += f" code={error_name(decode_u32(frame.payload))}"
        print(line)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    def add_client_options(command):
        command.add_argument("--broker-address", required=True, help="HOST:PORT of the broker's bridge port")
        command.add_argument("--server-name", default="localhost", help="name the broker certificate must carry")
        command.add_argument("--client-cert", required=True, help="client certificate (PEM)")
        command.add_argument("--client-key", required=True, help="client key (PEM)")
        command.add_argument("--ca-cert", required=True, help="CA of the broker certificate (PEM)")

    bridge = commands.add_parser("bridge", help="dial a broker and serve its streams")
    add_client_options(bridge)
    bridge.add_argument("--vault-address", help="http://HOST:PORT to forward requests to; "
                                                "without it every request gets a canned 200")

    broker = commands.add_parser("broker", help="accept one bridge and send one request")
    broker.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to accept the bridge on")
    broker.add_argument("--cert", required=True, help="server certificate (PEM)")
    broker.add_argument("--key", required=True, help="server key (PEM)")
    broker.add_argument("--ca", required=True, help="CA of bridge client certificates (PEM)")
    broker.add_argument("--method", default="GET")
    broker.add_argument("--target", default="/v1/sys/health")
    broker.add_argument("--header", action="append", default=[], help="NAME:VALUE (repeatable)")
    broker.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the bridge and the response")

    violate = commands.add_parser("violate", help="dial a broker, break one rule, print the answer")
    add_client_options(violate)
    violate.add_argument("violation", choices=sorted(VIOLATIONS))
    violate.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the end of the connection")

    arguments = parser.parse_args(argv)
    if arguments.command == "bridge":
        return asyncio.run(_run_bridge(arguments))
    if arguments.command == "broker":
        return asyncio.run(_run_broker(arguments))
    return _run_violation(arguments)


if __name__ == "__main__":
    sys.exit(main())
