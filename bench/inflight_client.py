#!/usr/bin/python3
"""Send COUNT requests at once, one per connection, and report how many completed.

Every connection sends `GET /hold?round=NAME&n=COUNT` to hold_backend.py (directly or through a
proxy), so no response can arrive before all COUNT requests are held by the backend. Prints one
JSON object: the number of 200 responses, the failures by reason, and the times in seconds.

Usage: inflight_client.py --host 127.0.0.1 --port PORT --count 10000 --round NAME
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import sys
import time

# Connections in the TCP handshake at once. More can overflow the server's accept queue,
# and Linux retries a dropped SYN only after a second.
CONNECT_CONCURRENCY = 256


async def one_request(
    host: str, port: int, target: str, connect_slots: asyncio.Semaphore, sent: list[float]
) -> str:
    """Send one request on a new connection and return "ok" or the reason it failed."""
    async with connect_slots:
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError as error:
            return f"connect: {error.strerror or error}"
    try:
        writer.write(
            f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode()
        )
        await writer.drain()
        sent.append(time.monotonic())
        head = await reader.readuntil(b"\r\n\r\n")
        status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        status = status_line.split(" ")[1]
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        await reader.readexactly(length)
        return "ok" if status == "200" else f"status {status}"
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as error:
        return f"{type(error).__name__}"
    finally:
        writer.close()


async def run(host: str, port: int, count: int, round_name: str, timeout: float) -> dict:
    connect_slots = asyncio.Semaphore(CONNECT_CONCURRENCY)
    sent: list[float] = []
    target = f"/hold?round={round_name}&n={count}"
    started = time.monotonic()
    tasks = [
        asyncio.ensure_future(one_request(host, port, target, connect_slots, sent))
        for _ in range(count)
    ]
    done, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        task.cancel()
    finished = time.monotonic()
    outcomes = collections.Counter(task.result() for task in done)
    if pending:
        outcomes["client timeout"] += len(pending)
    return {
        "count": count,
        "ok": outcomes.pop("ok", 0),
        "failed": dict(outcomes),
        "all_sent_s": round(max(sent) - started, 3) if sent else None,
        "elapsed_s": round(finished - started, 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, default=10000, help="requests in flight at once")
    parser.add_argument("--round", required=True, help="round name, unique per run")
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="seconds until unfinished requests fail"
    )
    args = parser.parse_args()
    result = asyncio.run(run(args.host, args.port, args.count, args.round, args.timeout))
    print(json.dumps(result))
    return 0 if result["ok"] == args.count else 1


if __name__ == "__main__":
    sys.exit(main())
