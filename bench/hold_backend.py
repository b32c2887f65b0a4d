#!/usr/bin/python3
"""HTTP/1.1 backend that holds requests until a whole round of them has arrived.

A request for /hold?round=NAME&n=COUNT waits until COUNT requests of round NAME are held at
the same time, then all of them get 200. This proves that COUNT requests were in flight at
once through whatever sits between the client and this server. When --max-wait seconds pass
before the round is complete, the requests held so far get 504 instead.

GET /stats returns the peak number of requests held at once, as JSON.

Usage: hold_backend.py --listen 127.0.0.1:0 --ready-file PATH [--max-wait SECONDS]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from urllib.parse import parse_qs, urlsplit

MAX_HEAD_BYTES = 16 * 1024
# The listen backlog, capped by net.core.somaxconn. The default of asyncio (100) drops SYNs when
# thousands of connections arrive at once, and the dropped clients retry only after a second.
LISTEN_BACKLOG = 4096


class Round:
    """Requests of one round name: how many have arrived and the event that releases them."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.arrived = 0
        self.complete = asyncio.Event()


class HoldServer:
    def __init__(self, max_wait: float) -> None:
        self.max_wait = max_wait
        self.rounds: dict[str, Round] = {}
        self.held_now = 0
        self.peak_held = 0
        self.requests = 0

    async def handle_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                    return
                request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
                parts = request_line.split(" ")
                if len(parts) != 3:
                    error = {"errors": [f"invalid request line: {request_line!r}"]}
                    await self.respond(writer, 400, error, close=True)
                    return
                self.requests += 1
                status, body = await self.serve(parts[1])
                close = b"\r\nconnection: close" in head.lower()
                await self.respond(writer, status, body, close)
                if close:
                    return
        except ConnectionError:
            return
        finally:
            writer.close()

    async def serve(self, target: str) -> tuple[int, dict]:
        url = urlsplit(target)
        if url.path == "/stats":
            return 200, {"peak_held": self.peak_held, "requests": self.requests}
        if url.path != "/hold":
            return 404, {"errors": [f"no such path: {url.path}"]}
        query = parse_qs(url.query)
        try:
            name = query["round"][0]
            expected = int(query["n"][0])
        except (KeyError, ValueError):
            return 400, {"errors": ["/hold needs round=NAME and n=COUNT"]}

        hold_round = self.rounds.setdefault(name, Round(expected))
        hold_round.arrived += 1
        self.held_now += 1
        self.peak_held = max(self.peak_held, self.held_now)
        if hold_round.arrived >= hold_round.expected:
            hold_round.complete.set()
        try:
            await asyncio.wait_for(hold_round.complete.wait(), self.max_wait)
        except asyncio.TimeoutError:
            return 504, {"errors": [f"round {name}: {hold_round.arrived} of {expected} arrived"]}
        finally:
            self.held_now -= 1
        return 200, {"data": {"round": name, "arrived": hold_round.arrived}}

    @staticmethod
    async def respond(writer: asyncio.StreamWriter, status: int, body: dict, close: bool) -> None:
        payload = json.dumps(body).encode()
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 504: "Gateway Timeout"}
        head = (
            f"HTTP/1.1 {status} {reason.get(status, 'Status')}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n"
            f"Connection: {'close' if close else 'keep-alive'}\r\n\r\n"
        )
        writer.write(head.encode() + payload)
        await writer.drain()


async def serve_forever(host: str, port: int, ready_file: str, max_wait: float) -> None:
    server = HoldServer(max_wait)
    listener = await asyncio.start_server(
        server.handle_connection, host, port, backlog=LISTEN_BACKLOG, limit=MAX_HEAD_BYTES
    )
    bound_port = listener.sockets[0].getsockname()[1]
    # Write the port under a temporary name first, so a reader never sees a partial file.
    with open(ready_file + ".tmp", "w") as ready:
        ready.write(f"{bound_port}\n")
    os.replace(ready_file + ".tmp", ready_file)
    async with listener:
        await listener.serve_forever()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to listen on")
    parser.add_argument("--ready-file", required=True, help="file to write the bound port to")
    parser.add_argument(
        "--max-wait", type=float, default=60.0, help="seconds a request may be held (default 60)"
    )
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    try:
        asyncio.run(serve_forever(host.strip("[]"), int(port), args.ready_file, args.max_wait))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
