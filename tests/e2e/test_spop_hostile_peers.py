"""A real gateway (and wafsvc) against hostile SPOP peers on raw sockets:
the bounded fuzz run, slow and silent peers, oversized frames, and
backpressure when wafsvc stalls. No HAProxy: these peers pretend to be it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time

import pytest

from fuzz import spop_fuzz
from gateway.spop import (AgentDisconnect, Message, SetVar, decode_frame, encode_haproxy_hello,
                          encode_hdrs_bin, encode_notify)

FUZZ_SECONDS = float(os.environ.get("SPOP_FUZZ_SECONDS", "3"))
HELLO_MS, FRAME_MS, IDLE_MS = 1000, 1000, 2500
TIMEOUTS = {"GATEWAY_HELLO_TIMEOUT_MS": str(HELLO_MS), "GATEWAY_FRAME_TIMEOUT_MS": str(FRAME_MS),
            "GATEWAY_IDLE_TIMEOUT_MS": str(IDLE_MS)}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    stack = spop_fuzz.start_gateway(tmp_path_factory.mktemp("fuzz"), TIMEOUTS)
    yield stack
    stack.stop()


def _connect(stack) -> socket.socket:
    return socket.create_connection(("127.0.0.1", stack.spec.gateway_port), timeout=10)


def _read_frames(sock: socket.socket, until_closed: bool = True, timeout: float = 10) -> tuple[list, float]:
    """Frames the gateway sent, and the seconds until it closed."""
    started = time.monotonic()
    sock.settimeout(timeout)
    data = bytearray()
    while True:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            break
        if not chunk:
            break
        data += chunk
        if not until_closed:
            break
    return spop_fuzz.parse_output(bytes(data), 1 << 20), time.monotonic() - started


def _disconnect(frames: list) -> AgentDisconnect:
    assert frames and isinstance(frames[-1], AgentDisconnect), frames
    return frames[-1]


def _hello(max_frame_size: int = 16380) -> bytes:
    return encode_haproxy_hello(("2.0",), max_frame_size, ("pipelining",))


def _notify(stream_id: int, attack: bool = False, body: bytes = b"") -> bytes:
    message = spop_fuzz.check_request(stream_id, attack)
    if body:
        message = Message(message.name, tuple((k, body if k == "body" else v) for k, v in message.args))
    return encode_notify(stream_id, 1, [message])


# -- the bounded fuzz run of `make test` (`make fuzz` runs it longer) -------

def _show(request, text: str) -> None:
    """Shown in `make test` output even when pytest captures: the counts are the point."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line("\n" + text)


def test_fuzzed_frames_get_the_right_disconnect_and_others_keep_their_verdicts(gateway, request):
    started = time.monotonic()
    seed = int(time.time())
    stats = asyncio.run(spop_fuzz.run("127.0.0.1", gateway.spec.gateway_port, FUZZ_SECONDS,
                                      seed=seed, concurrency=4))
    _show(request, f"[seed {seed}] " + spop_fuzz.report(stats, time.monotonic() - started).split("\n")[0])
    assert not stats.failures, spop_fuzz.report(stats, 0)
    assert not stats.verdict_errors, stats.verdict_errors[:5]
    assert stats.cases > 100 and stats.verdicts > 10
    assert len(stats.statuses) >= 5  # the mutations reach many different errors
    assert gateway.proc("gateway").poll() is None


# -- slow and silent peers ---------------------------------------------------

def test_silent_peer_is_closed_after_the_hello_timeout(gateway):
    with _connect(gateway) as sock:
        frames, seconds = _read_frames(sock)
    assert _disconnect(frames).status == 2  # TIMEOUT
    assert HELLO_MS / 1000 * 0.8 < seconds < HELLO_MS / 1000 + 3


def test_hello_trickled_byte_by_byte_is_cut_off(gateway):
    hello = _hello()
    with _connect(gateway) as sock:
        started = time.monotonic()
        sent = 0
        try:
            for byte in hello:  # 50 ms per byte: the whole HELLO would take seconds
                sock.send(bytes([byte]))
                sent += 1
                time.sleep(0.05)
        except (BrokenPipeError, ConnectionResetError):
            pass
        frames, _ = _read_frames(sock)
        seconds = time.monotonic() - started
    assert sent < len(hello) and _disconnect(frames).status == 2
    assert seconds < HELLO_MS / 1000 + 3


def test_frame_trickled_forever_after_hello_is_cut_off(gateway):
    """Each byte resets the idle timer; the frame timeout still ends it."""
    notify = _notify(1, body=b"x" * 2000)
    with _connect(gateway) as sock:
        sock.sendall(_hello())
        frames, _ = _read_frames(sock, until_closed=False)
        assert type(frames[0]).__name__ == "AgentHello"
        started = time.monotonic()
        sent = 0
        try:
            while sent < len(notify) and time.monotonic() - started < 30:
                sock.send(notify[sent:sent + 1])
                sent += 1
                time.sleep(0.02)
        except (BrokenPipeError, ConnectionResetError):
            pass
        frames, _ = _read_frames(sock)
        seconds = time.monotonic() - started
    disconnect = _disconnect(frames)
    assert disconnect.status == 2 and "frame" in disconnect.message
    assert sent < len(notify) and seconds < FRAME_MS / 1000 + 3


def test_idle_peer_is_closed_after_the_idle_timeout(gateway):
    with _connect(gateway) as sock:
        sock.sendall(_hello())
        frames, seconds = _read_frames(sock)
    assert type(frames[0]).__name__ == "AgentHello"
    disconnect = _disconnect(frames)
    assert disconnect.status == 2 and disconnect.message == "idle"
    assert IDLE_MS / 1000 * 0.8 < seconds < IDLE_MS / 1000 + 3


# -- frame size -------------------------------------------------------------

def test_frames_stay_within_the_negotiated_size(gateway):
    with _connect(gateway) as sock:
        sock.sendall(_hello(max_frame_size=300))
        frames, _ = _read_frames(sock, until_closed=False)
        assert frames[0].max_frame_size == 300
        sock.sendall(_notify(7, attack=True))  # fits: 200-odd bytes
        ack, _ = _read_frames(sock, until_closed=False)
        values = {a.name: a.value for a in ack[0].actions if isinstance(a, SetVar)}
        assert values["intervention"] == 1 and str(spop_fuzz.ATTACK_RULE_ID) in values["rules"]
        big = _notify(8, body=b"y" * 400)
        sock.sendall(big)
        frames, _ = _read_frames(sock)
    assert _disconnect(frames).status == 3  # TOO_BIG
    for frame in ack + frames:
        assert len(encode_frame_bytes(frame)) - 4 <= 300


def encode_frame_bytes(frame) -> bytes:
    from gateway.spop import encode_frame
    return encode_frame(frame)


# -- backpressure -----------------------------------------------------------

def test_gateway_stops_reading_when_wafsvc_stalls(tmp_path, request):
    """wafsvc frozen (SIGSTOP): the gateway must stop reading NOTIFYs after
    GATEWAY_MAX_INFLIGHT instead of queueing them, so the peer's writes block.
    When wafsvc thaws, every NOTIFY still gets its ACK."""
    stack = spop_fuzz.start_gateway(tmp_path, {"GATEWAY_MAX_INFLIGHT": "4", "GATEWAY_DEADLINE_MS": "5000"})
    count, body = 2000, b"b" * 12000  # 24 MB of NOTIFYs
    frames = [_notify(i + 1, body=body) for i in range(count)]
    total = sum(map(len, frames))
    wafsvc = stack.proc("wafsvc1")
    try:
        with _connect(stack) as sock:
            sock.sendall(_hello())
            _read_frames(sock, until_closed=False)
            os.killpg(wafsvc.pid, signal.SIGSTOP)
            sock.setblocking(False)
            data, sent = b"".join(frames), 0
            stalled_until = time.monotonic() + 2.0
            while time.monotonic() < stalled_until and sent < total:
                try:
                    sent += sock.send(data[sent:sent + 65536])
                except BlockingIOError:
                    time.sleep(0.01)
            accepted_while_stalled = sent
            rss = spop_fuzz.rss_kib(stack.proc("gateway").pid)
            os.killpg(wafsvc.pid, signal.SIGCONT)
            acks, buffer, deadline = 0, bytearray(), time.monotonic() + 120
            while acks < count and time.monotonic() < deadline:
                if sent < total:
                    try:
                        sent += sock.send(data[sent:sent + 65536])
                    except BlockingIOError:
                        pass
                try:
                    buffer += sock.recv(1 << 20)
                except BlockingIOError:
                    time.sleep(0.002)
                while len(buffer) >= 4 and len(buffer) >= 4 + int.from_bytes(buffer[:4], "big"):
                    n = int.from_bytes(buffer[:4], "big")
                    assert type(decode_frame(bytes(buffer[4:4 + n]))).__name__ == "Ack"
                    del buffer[:4 + n]
                    acks += 1
        _show(request, f"backpressure: {accepted_while_stalled / 1e6:.1f} of {total / 1e6:.1f} MB accepted while "
              f"wafsvc was stalled; gateway RSS then {rss // 1024} MiB; {acks}/{count} ACKs after it resumed")
        assert accepted_while_stalled < total / 2
        assert acks == count
        assert stack.proc("gateway").poll() is None
    finally:
        try:
            os.killpg(wafsvc.pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
        stack.stop()
