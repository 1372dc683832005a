"""Soak: many requests through the whole stack, memory of every process
before and after. Growth that does not level off is a leak.

    python -m tools.soak --requests 100000        # make soak

Starts its own stack (backend, wafsvc with CRS, gateway, HAProxy) on free
ports, warms it up, records the RSS of each process, sends a mix of benign,
attacking, form, chunked and truncated requests on keep-alive connections,
then records RSS again. Every response must be the expected one (a verdict,
never a hang or a fail-closed 503).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import sys
import tempfile
import time
from collections import Counter

from stack import Stack, StackSpec

SQLI = b"1%27%20or%20%271%27%3D%271"

# (name, request bytes, expected status)
def _mix() -> list[tuple[str, bytes, int]]:
    def req(method: str, target: bytes, headers: bytes = b"", body: bytes = b"") -> bytes:
        head = (method.encode() + b" " + target + b" HTTP/1.1\r\nHost: soak.example\r\n"
                b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) soak\r\nAccept: text/html\r\n" + headers)
        if body and b"chunked" not in headers:
            head += b"Content-Length: %d\r\n" % len(body)
        return head + b"\r\n" + body
    form = b"Content-Type: application/x-www-form-urlencoded\r\n"
    chunked_body = b"a=1&b=2"
    get = ("get", req("GET", b"/products?id=42&sort=asc"), 200)
    return [get] * 8 + [
        ("sqli", req("GET", b"/?id=" + SQLI), 403),
        ("sqli", req("GET", b"/search?q=" + SQLI), 403),
        ("form", req("POST", b"/comment", form, b"name=alice&comment=" + b"hello+world+" * 40), 200),
        ("form", req("POST", b"/login", form, b"user=bob&password=secret"), 200),
        ("chunked", req("POST", b"/c", form + b"Transfer-Encoding: chunked\r\n",
                        b"%x\r\n" % len(chunked_body) + chunked_body + b"\r\n0\r\n\r\n"), 200),
        # Past HAProxy's buffer: denied as truncated (99010). Binary, so that
        # CRS does not parse 64 kB of arguments on every one of these.
        ("truncated", req("POST", b"/upload", b"Content-Type: application/octet-stream\r\n",
                          b"\x00" * 70000), 403),
    ]


def rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except FileNotFoundError:
        pass
    return 0


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (FileNotFoundError, ProcessLookupError, IndexError):
                pass
    return found


def snapshot(stack: Stack) -> dict[str, int]:
    rss = {}
    for name, proc in stack.procs:
        rss[name] = rss_kib(proc.pid)
        for i, child in enumerate(sorted(children(proc.pid))):
            rss[f"{name}/worker{i + 1}"] = rss_kib(child)
    return rss


async def _client(port: int, mix, counts: Counter, wrong: Counter, remaining: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    index = 0
    try:
        while remaining[0] > 0:
            remaining[0] -= 1
            name, raw, expected = mix[index % len(mix)]
            index += 1
            writer.write(raw)
            status_line = await asyncio.wait_for(reader.readline(), 30)
            if not status_line:
                raise ConnectionError("closed")
            status = int(status_line.split()[1])
            length, close = 0, False
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b""):
                    break
                key, _, value = line.partition(b":")
                if key.lower() == b"content-length":
                    length = int(value)
                elif key.lower() == b"connection" and b"close" in value.lower():
                    close = True
            await reader.readexactly(length)
            counts[f"{name}:{status}"] += 1
            if status != expected:
                wrong[f"{name}: {status} (expected {expected})"] += 1
            if close:  # HAProxy closes after a deny with a body it did not read
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
    finally:
        writer.close()


async def load(port: int, requests: int, concurrency: int) -> tuple[Counter, Counter]:
    counts, wrong = Counter(), Counter()
    remaining = [requests]
    await asyncio.gather(*(_client(port, _mix(), counts, wrong, remaining) for _ in range(concurrency)))
    return counts, wrong


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2, help="wafsvc worker processes")
    parser.add_argument("--crs-dir", default=os.environ.get("CRS_DIR", "/usr/share/modsecurity-crs"))
    args = parser.parse_args(argv)
    log_dir = pathlib.Path(tempfile.mkdtemp(prefix="soak-"))
    spec = StackSpec(log_dir=log_dir, wafsvc_workers=args.workers,
                     wafsvc_env={"CRS_DIR": args.crs_dir, "PARANOIA": "1", "MODE": "block",
                                 "LOG_LEVEL": "warning"},
                     gateway_env={"LOG_LEVEL": "warning"})
    stack = Stack(spec).start()
    try:
        port = spec.frontend_port
        asyncio.run(load(port, 2000, args.concurrency))  # warm-up: caches, connections, allocators
        before = snapshot(stack)
        started = time.monotonic()
        counts, wrong = asyncio.run(load(port, args.requests, args.concurrency))
        seconds = time.monotonic() - started
        after = snapshot(stack)
        alive = all(proc.poll() is None for _, proc in stack.procs)
    finally:
        stack.stop()
    total = sum(counts.values())
    print(f"soak: {total} requests in {seconds:.0f}s ({total / seconds:.0f}/s), concurrency "
          f"{args.concurrency}, logs in {log_dir}")
    print("  responses: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))
    print(f"  unexpected: {sum(wrong.values())} " + ", ".join(f"{k}={v}" for k, v in wrong.most_common(5)))
    print("  RSS (MiB)        start     end   growth")
    for name in before:
        a, b = before[name] / 1024, after.get(name, 0) / 1024
        print(f"  {name:<16} {a:7.1f} {b:7.1f} {b - a:+8.1f}")
    print(f"  all processes alive: {alive}")
    return 0 if alive and not wrong and total == args.requests else 1


if __name__ == "__main__":
    sys.exit(main())
