"""bench/openloop.c against a small HTTP server: it reads every kind of
answer the setups give (Content-Length, chunked, connection: close), loses
nothing, and counts latency from the intended send time, so requests that
wait behind a slow answer show that wait (no coordinated omission)."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import threading

import pytest

from bench import openloop

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc missing: bash scripts/install.sh bench")
SLOW_S = 0.05


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ")[1]
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            await reader.readexactly(length)
            if path == b"/slow":
                await asyncio.sleep(SLOW_S)
            if path == b"/chunked":
                writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                             b"5\r\nhello\r\n7\r\n, world\r\n0\r\n\r\n")
            elif path == b"/close":
                writer.write(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 3\r\nconnection: close\r\n\r\nno\n")
                await writer.drain()
                writer.close()
                return
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nhello\n")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


@pytest.fixture
def server_port():
    loop = asyncio.new_event_loop()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = loop.run_until_complete(asyncio.start_server(handle, sock=sock))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield sock.getsockname()[1]
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


def run(tmp_path, port: int, requests: list[bytes], rate: float, seconds: float, connections: int) -> dict:
    path = tmp_path / "requests.bin"
    path.write_bytes(b"".join(len(r).to_bytes(4, "big") + r for r in requests))
    out = tmp_path / "out.json"
    subprocess.run([str(openloop.binary(tmp_path)), str(port), str(rate), "0", str(seconds), str(connections),
                    str(path), str(out)], check=True, timeout=60)
    return json.loads(out.read_text())


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode()


def test_every_answer_kind_is_read_and_counted(tmp_path, server_port):
    post = b"POST /cl HTTP/1.1\r\nHost: t\r\nContent-Length: 7\r\n\r\na=b&c=d"
    result = run(tmp_path, server_port, [get("/cl"), get("/chunked"), get("/close"), post], 400, 0.5, 4)
    assert result["sent"] == result["answered"] == 200
    assert result["statuses"] == {"200": 150, "403": 50}
    assert result["errors"] == {"connect": 0, "io": 0, "lost": 0, "unanswered": 0}
    assert result["latency_us"]["samples"] == 200


def test_latency_counts_from_the_intended_send_time(tmp_path, server_port):
    """One connection, answers taking SLOW_S, requests due five times as
    often: they queue for the connection, and their latency includes it."""
    result = run(tmp_path, server_port, [get("/slow")], 100, 0.5, 1)
    assert result["answered"] == 50 and result["errors"]["unanswered"] == 0
    assert result["queued_for_connection"] > 0
    lat = result["latency_us"]
    assert lat["p50"] >= SLOW_S * 1e6
    # Each request waits for all earlier ones: the last waits about 40 answers.
    assert lat["max"] >= 20 * SLOW_S * 1e6
