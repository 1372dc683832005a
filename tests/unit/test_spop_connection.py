"""gateway.spop.connection: the agent-side state machine, fed like a socket would."""

from __future__ import annotations

import ast
import struct
from ipaddress import ip_address
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gateway.spop
from gateway.spop import (
    Ack, AgentConnection, AgentDisconnect, AgentHello, ConnectionClosed, ConnectionState,
    DisconnectReceived, FrameType, HaproxyHello, HelloReceived, Int64, Message, Notify,
    NotifyReceived, Scope, SetVar, SpopError, Status, UInt32, decode_frame, encode_ack,
    encode_agent_disconnect, encode_hdrs_bin, encode_haproxy_disconnect, encode_haproxy_hello,
    encode_kv_list, encode_notify, encode_varint, parse_hdrs_bin,
)

fuzz = settings(max_examples=200, deadline=None)


def frames_in(data: bytes) -> list:
    """Split queued output into decoded frames."""
    out, pos = [], 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        out.append(decode_frame(data[pos + 4:pos + 4 + length]))
        pos += 4 + length
    assert pos == len(data)
    return out


def raw_frame(ftype: int, payload: bytes, flags: int = 1, sid: int = 0, fid: int = 0) -> bytes:
    body = bytes([ftype]) + struct.pack(">I", flags) + encode_varint(sid) + encode_varint(fid) + payload
    return struct.pack(">I", len(body)) + body


HELLO = encode_haproxy_hello(("2.0",), 16380, ("pipelining", "async"), engine_id="engine-1")


def established(**kwargs) -> AgentConnection:
    conn = AgentConnection(**kwargs)
    [event] = conn.receive_data(HELLO)
    assert isinstance(event, HelloReceived)
    conn.data_to_send()
    return conn


def closed_with(conn: AgentConnection, data: bytes, status: Status) -> ConnectionClosed:
    events = conn.receive_data(data)
    assert isinstance(events[-1], ConnectionClosed), events
    assert events[-1].status == status
    assert conn.state is ConnectionState.CLOSED
    last = frames_in(conn.data_to_send())[-1]
    assert isinstance(last, AgentDisconnect) and last.status == status
    assert conn.receive_data(HELLO + data) == []  # everything after is ignored
    assert conn.data_to_send() == b""
    return events[-1]


# ------------------------------------------------------ a realistic session

def request(i: int) -> Message:
    hdrs = encode_hdrs_bin([(b"host", b"shop.example"), (b"user-agent", b"curl/8.5.0"),
                            (b"cookie", b"a=1"), (b"cookie", b"b=" + b"x" * 300)])
    return Message("check-request", (
        ("unique-id", None),
        ("src-ip", ip_address("203.0.113.7") if i % 2 else ip_address("2001:db8::7")),
        ("src-port", Int64(40000 + i)),
        ("dst-ip", ip_address("10.0.0.1")),
        ("method", "POST"),
        ("path", f"/cart/{i}"),
        ("query", None if i % 3 else "q=1&b=%27"),
        ("reqver", "1.1"),
        ("headers", hdrs),
        ("body", b"item=42&qty=\xff" * i),
    ))


NOTIFIES = [Notify(1000 + i, 1, (request(i),)) for i in range(6)]
SESSION = (HELLO + b"".join(encode_notify(n.stream_id, n.frame_id, n.messages) for n in NOTIFIES)
           + encode_haproxy_disconnect(0, "idle timeout"))
EXPECTED = ([HelloReceived(HaproxyHello(("2.0",), 16380, frozenset({"pipelining", "async"}),
                                        False, "engine-1"))]
            + [NotifyReceived(n) for n in NOTIFIES]
            + [DisconnectReceived(0, "idle timeout")])


def run(chunks) -> tuple[list, bytes, AgentConnection]:
    conn = AgentConnection()
    events, out = [], b""
    for chunk in chunks:
        new = conn.receive_data(chunk)
        for ev in new:  # answer as the server would, as soon as each NOTIFY lands
            if isinstance(ev, NotifyReceived):
                conn.send_ack(ev.notify.stream_id, ev.notify.frame_id,
                              [SetVar(Scope.TRANSACTION, "verdict", "allow")])
        events += new
        out += conn.data_to_send()
        assert len(conn._buf) <= conn.max_frame_size + 4
    return events, out, conn


def check_session(chunks) -> list:
    events, out, conn = run(chunks)
    assert events == EXPECTED
    assert conn.state is ConnectionState.CLOSED
    frames = frames_in(out)
    assert frames[0] == AgentHello("2.0", 16380, frozenset({"pipelining"}))
    # ACKs for NOTIFYs that came in the same read as the DISCONNECT are dropped.
    acks = [Ack(n.stream_id, 1, (SetVar(Scope.TRANSACTION, "verdict", "allow"),)) for n in NOTIFIES]
    assert frames[1:-1] == acks[:len(frames) - 2]
    assert frames[-1] == AgentDisconnect(Status.NORMAL, "normal")
    return frames


def test_session_whole():
    check_session([SESSION])
    headers = parse_hdrs_bin(EXPECTED[1].notify.messages[0].arg("headers"))
    assert [name for name, _ in headers] == [b"host", b"user-agent", b"cookie", b"cookie"]


def test_session_byte_by_byte():
    frames = check_session([SESSION[i:i + 1] for i in range(len(SESSION))])
    assert len(frames) == 2 + len(NOTIFIES)  # every ACK went out before the goodbye


def test_session_with_trailing_bytes():
    check_session([SESSION + b"\x00\x00\x00\x07garbage after the goodbye"])
    check_session([SESSION, HELLO, b"\xff" * 50])


def test_session_as_bytearray_and_memoryview():
    check_session([bytearray(SESSION[:500]), memoryview(SESSION)[500:]])


@fuzz
@given(st.lists(st.integers(0, len(SESSION)), max_size=30))
def test_session_in_random_splits(cuts):
    cuts = sorted(set(cuts))
    bounds = [0, *cuts, len(SESSION)]
    check_session([SESSION[a:b] for a, b in zip(bounds, bounds[1:]) if b > a])


def test_session_stopped_mid_frame_keeps_the_partial_frame():
    cut = len(SESSION) - 10
    events, _, conn = run([SESSION[:cut]])
    assert events == EXPECTED[:-1]
    assert conn.state is ConnectionState.ESTABLISHED
    assert conn.receive_data(SESSION[cut:]) == EXPECTED[-1:]


# ----------------------------------------------------------------- HELLO

def test_hello_reply_negotiates():
    conn = AgentConnection(max_frame_size=8192, capabilities=("pipelining", "async"))
    events = conn.receive_data(encode_haproxy_hello(("2.0",), 16380, ("async",)))
    assert conn.state is ConnectionState.ESTABLISHED and not conn.healthcheck
    assert conn.max_frame_size == 8192
    [reply] = frames_in(conn.data_to_send())
    assert reply == AgentHello("2.0", 8192, frozenset({"async"}))
    assert events[0].hello.max_frame_size == 16380

    conn = AgentConnection(engine_id="agent-7")
    conn.receive_data(encode_haproxy_hello(("2.0",), 1024, ()))
    assert conn.max_frame_size == 1024
    assert frames_in(conn.data_to_send()) == [AgentHello("2.0", 1024, frozenset(), "agent-7")]


@pytest.mark.parametrize("versions", [("2.0",), ("2.0", "1.5"), ("1.0", " 2.1 "), ("2.9",), ("3.0", "2.0")])
def test_hello_versions_accepted(versions):
    conn = AgentConnection()
    conn.receive_data(encode_haproxy_hello(versions))
    assert conn.state is ConnectionState.ESTABLISHED
    assert frames_in(conn.data_to_send())[0].version == "2.0"


@pytest.mark.parametrize("versions", [(), ("1.0",), ("1.5",), ("3.0",), ("abc",), ("2",), ("2.0.1",),
                                      ("v2.0",)])
def test_hello_versions_refused(versions):
    closed_with(AgentConnection(), encode_haproxy_hello(versions), Status.BAD_VERSION)


def test_healthcheck_hello():
    conn = AgentConnection()
    events = conn.receive_data(encode_haproxy_hello(("2.0",), 16380, (), healthcheck=True))
    assert events == [HelloReceived(HaproxyHello(("2.0",), 16380, frozenset(), True))]
    assert conn.healthcheck and conn.state is ConnectionState.CLOSED
    assert frames_in(conn.data_to_send()) == [AgentHello("2.0", 16380, frozenset())]
    conn.send_ack(1, 1, [])  # dropped
    assert conn.receive_data(encode_notify(1, 1, [])) == []
    assert conn.data_to_send() == b""


def hello_with(**items) -> bytes:
    base = {"supported-versions": "2.0", "max-frame-size": UInt32(16380), "capabilities": "pipelining"}
    base.update(items)
    items = [(k, v) for k, v in base.items() if v is not ...]  # ... leaves an item out
    return raw_frame(FrameType.HAPROXY_HELLO, encode_kv_list(items))


@pytest.mark.parametrize(("items", "status"), [
    ({"supported-versions": ...}, Status.NO_VERSION),
    ({"max-frame-size": ...}, Status.NO_FRAME_SIZE),
    ({"capabilities": ...}, Status.NO_CAPABILITIES),
    ({"supported-versions": "1.0"}, Status.BAD_VERSION),
    ({"max-frame-size": UInt32(255)}, Status.BAD_FRAME_SIZE),
    ({"max-frame-size": Int64(-1)}, Status.BAD_FRAME_SIZE),
    ({"max-frame-size": "big"}, Status.INVALID),
])
def test_hello_errors(items, status):
    closed_with(AgentConnection(), hello_with(**items), status)


def test_smallest_frame_size_is_accepted():
    conn = AgentConnection()
    conn.receive_data(hello_with(**{"max-frame-size": UInt32(256)}))
    assert conn.state is ConnectionState.ESTABLISHED and conn.max_frame_size == 256


# -------------------------------------------------------- protocol errors

def test_notify_before_hello():
    closed_with(AgentConnection(), encode_notify(1, 1, [Message("m")]), Status.INVALID)


def test_hello_twice():
    closed_with(established(), HELLO, Status.INVALID)


@pytest.mark.parametrize("ftype", [FrameType.AGENT_HELLO, FrameType.AGENT_DISCONNECT, FrameType.ACK])
def test_agent_frames_from_haproxy(ftype):
    frame = {FrameType.AGENT_HELLO: encode_haproxy_hello()[:4] + b"\x65" + encode_haproxy_hello()[5:],
             FrameType.AGENT_DISCONNECT: encode_agent_disconnect(0, "x"),
             FrameType.ACK: encode_ack(1, 1, [])}[ftype]
    closed_with(established(), frame, Status.INVALID)


@pytest.mark.parametrize("frame", [
    raw_frame(77, b""),  # unknown type
    b"\x00\x00\x00\x00",  # empty frame
    b"\x00\x00\x00\x06" b"\x03\x00\x00\x00\x01\x01",  # shorter than its metadata
    raw_frame(FrameType.NOTIFY, b"\x05chec", sid=1, fid=1),  # truncated message
    raw_frame(FrameType.NOTIFY, b"\x01m\x01\x01a\x0c", sid=1, fid=1),  # reserved data type
    raw_frame(FrameType.HAPROXY_DISCONNECT, encode_kv_list([("message", "no status")])),
])
def test_invalid_frames(frame):
    conn = established()
    closed_with(conn, frame, Status.INVALID)


@pytest.mark.parametrize("frame", [
    raw_frame(FrameType.NOTIFY, b"", flags=0, sid=1, fid=1),  # no FIN
    raw_frame(FrameType.NOTIFY, b"", flags=3, sid=1, fid=1),  # FIN|ABORT
    raw_frame(FrameType.UNSET, b"rest", sid=1, fid=1),  # a continuation
])
def test_fragmentation_unsupported(frame):
    closed_with(established(), frame, Status.FRAGMENTATION_UNSUPPORTED)


def test_too_big_before_hello_without_reading_the_body():
    conn = AgentConnection()
    closed_with(conn, struct.pack(">I", 16381), Status.TOO_BIG)
    assert len(conn._buf) == 0


def test_too_big_after_negotiation():
    conn = AgentConnection()
    conn.receive_data(encode_haproxy_hello(("2.0",), 1024))
    conn.data_to_send()
    ok = raw_frame(FrameType.NOTIFY, b"\x01m\x01\x01b\x09" + encode_varint(1009) + b"x" * 1009, sid=1, fid=1)
    assert len(ok) - 4 == 1024
    [event] = conn.receive_data(ok)
    assert isinstance(event, NotifyReceived)
    big = raw_frame(FrameType.NOTIFY, b"\x01m\x01\x01b\x09" + encode_varint(1010) + b"x" * 1010, sid=1, fid=1)
    closed_with(conn, big[:8], Status.TOO_BIG)


def test_error_after_good_frames_keeps_their_events():
    conn = established()
    good = encode_notify(1, 1, [Message("m")])
    events = conn.receive_data(good + good + raw_frame(99, b"") + good)
    assert [type(e) for e in events] == [NotifyReceived, NotifyReceived, ConnectionClosed]
    assert events[-1].status == Status.INVALID


def test_partial_frame_buffer_is_bounded():
    conn = established(max_frame_size=300)
    frame = raw_frame(FrameType.NOTIFY, b"\x01m\x01\x01b\x09" + encode_varint(280) + b"y" * 280, sid=9, fid=9)
    assert len(frame) - 4 <= 300
    stream = frame * 5
    for i in range(0, len(stream), 7):
        conn.receive_data(stream[i:i + 7])
        assert len(conn._buf) <= 300 + 4
    assert len(conn._buf) == 0


# ------------------------------------------------------------- goodbyes

def test_haproxy_disconnect_before_hello():
    conn = AgentConnection()
    assert conn.receive_data(encode_haproxy_disconnect(Status.TIMEOUT, "hello timeout")) == [
        DisconnectReceived(2, "hello timeout")]
    assert frames_in(conn.data_to_send()) == [AgentDisconnect(0, "normal")]
    assert conn.state is ConnectionState.CLOSED


def test_haproxy_disconnect_with_unknown_status():
    conn = established()
    events = conn.receive_data(encode_haproxy_disconnect(4000, "custom"))
    assert events == [DisconnectReceived(4000, "custom")]


@pytest.mark.parametrize("status", list(Status))
def test_agent_disconnect_any_status(status):
    conn = established()
    conn.disconnect(status, "shutting down")
    assert conn.state is ConnectionState.CLOSED
    assert frames_in(conn.data_to_send()) == [AgentDisconnect(status, "shutting down")]
    conn.disconnect()  # once only
    assert conn.data_to_send() == b""


def test_disconnect_message_is_cut_to_255_bytes():
    conn = established()
    conn.disconnect(Status.UNKNOWN, "é" * 200)
    [frame] = frames_in(conn.data_to_send())
    assert frame.message == "é" * 127 and len(frame.message.encode()) <= 255


def test_eof():
    conn = established()
    assert conn.receive_data(b"") == [ConnectionClosed(Status.NORMAL, "connection closed by peer")]
    assert conn.state is ConnectionState.CLOSED and conn.data_to_send() == b""
    assert conn.receive_data(b"") == []

    conn = established()
    conn.receive_data(encode_notify(1, 1, [Message("m")])[:-1])
    [event] = conn.receive_data(b"")
    assert event.status == Status.IO and conn.data_to_send() == b""


# ------------------------------------------------------------------- ACKs

def test_send_ack():
    conn = AgentConnection()
    with pytest.raises(SpopError) as info:
        conn.send_ack(1, 1, [])
    assert info.value.status == Status.INVALID
    conn.receive_data(encode_haproxy_hello(("2.0",), 300))
    conn.data_to_send()
    conn.send_ack(5, 6, [SetVar(Scope.TRANSACTION, "score", Int64(12))])
    assert frames_in(conn.data_to_send()) == [Ack(5, 6, (SetVar(Scope.TRANSACTION, "score", 12),))]
    with pytest.raises(SpopError) as info:
        conn.send_ack(5, 7, [SetVar(Scope.TRANSACTION, "reason", "x" * 300)])
    assert info.value.status == Status.TOO_BIG
    assert conn.data_to_send() == b"" and conn.state is ConnectionState.ESTABLISHED
    conn.disconnect()
    conn.data_to_send()
    conn.send_ack(5, 8, [])  # silently dropped once closed
    assert conn.data_to_send() == b""


def test_constructor_checks():
    with pytest.raises(ValueError):
        AgentConnection(max_frame_size=255)
    with pytest.raises(ValueError):
        AgentConnection(max_frame_size=2**32)
    with pytest.raises(ValueError):
        AgentConnection(capabilities=("pipelining", "fragmentation"))


# ------------------------------------------------------------------ fuzzing

@fuzz
@given(st.binary(max_size=300), st.lists(st.integers(1, 64), max_size=10))
def test_random_bytes_after_hello(junk, sizes):
    conn = established()
    events, pos = [], 0
    for size in [*sizes, len(junk)]:
        if junk[pos:pos + size]:  # b"" would mean EOF
            events += conn.receive_data(junk[pos:pos + size])
        pos += size
        assert len(conn._buf) <= conn.max_frame_size + 4
    assert all(isinstance(e, (NotifyReceived, DisconnectReceived, ConnectionClosed)) for e in events)
    closes = [e for e in events if isinstance(e, ConnectionClosed)]
    assert len(closes) <= 1
    out = frames_in(conn.data_to_send())
    if closes:
        assert events[-1] is closes[0] and conn.state is ConnectionState.CLOSED
        assert out[-1] == AgentDisconnect(closes[0].status, out[-1].message)


framed_junk = st.lists(st.tuples(st.sampled_from([0, 1, 2, 3, 4, 101, 103, 200]),
                                 st.sampled_from([1, 1, 1, 0, 3, 0x80000001]),
                                 st.integers(0, 300), st.integers(0, 3), st.binary(max_size=60)),
                       max_size=6)


@fuzz
@given(framed_junk, st.integers(1, 50))
def test_random_frames_after_hello(frames, chunk):
    # Well-framed junk gets past the length check and into the decoders.
    stream = b"".join(raw_frame(t, payload, flags, sid, fid) for t, flags, sid, fid, payload in frames)
    conn = established()
    events = []
    for i in range(0, len(stream), chunk):
        events += conn.receive_data(stream[i:i + chunk])
        assert len(conn._buf) <= conn.max_frame_size + 4
    closes = [e for e in events if isinstance(e, ConnectionClosed)]
    assert len(closes) <= 1 and (not closes or events[-1] is closes[0])
    out = frames_in(conn.data_to_send())
    if closes:
        assert isinstance(out[-1], AgentDisconnect) and out[-1].status == closes[0].status
    elif conn.state is ConnectionState.ESTABLISHED:
        assert all(isinstance(e, NotifyReceived) for e in events) and not out


# Frames HAProxy might send, and the state each one leads to from each state.
KINDS = {
    "hello": HELLO,
    "healthcheck": encode_haproxy_hello(healthcheck=True),
    "notify": encode_notify(3, 4, [Message("m", (("a", "b"),))]),
    "disconnect": encode_haproxy_disconnect(0, "bye"),
    "ack": encode_ack(1, 1, []),
    "eof": b"",
}
A, E, C = ConnectionState.AWAIT_HELLO, ConnectionState.ESTABLISHED, ConnectionState.CLOSED
MODEL = {(A, "hello"): E, (A, "healthcheck"): C, (A, "disconnect"): C, (A, "eof"): C,
         (E, "notify"): E, (E, "disconnect"): C, (E, "eof"): C}


@fuzz
@given(st.lists(st.sampled_from(sorted(KINDS)), max_size=8))
def test_state_machine_walk(kinds):
    conn = AgentConnection()
    for kind in kinds:
        before = conn.state
        events = conn.receive_data(KINDS[kind])
        out = frames_in(conn.data_to_send())
        if before is C:
            assert events == [] and out == [] and conn.state is C
            continue
        expected = MODEL.get((before, kind), C)
        assert conn.state is expected
        if (before, kind) not in MODEL:  # anything else is a protocol error
            assert events == [ConnectionClosed(Status.INVALID, events[0].message)]
            assert out == [AgentDisconnect(Status.INVALID, out[0].message)]


def test_codec_does_no_io():
    # gateway.spop must stay importable and usable without asyncio or sockets.
    for path in Path(gateway.spop.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not {n.split(".")[0] for n in names} & {"asyncio", "socket", "selectors"}, path
