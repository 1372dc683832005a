"""gateway.spop.frames: every frame type, known answers, malformed input."""

from __future__ import annotations

import struct
from ipaddress import ip_address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.spop import (
    Ack, AgentDisconnect, AgentHello, FrameFlags, FrameType, HaproxyDisconnect, HaproxyHello,
    Int32, Int64, Message, Notify, Scope, SetVar, SpopError, Status, UInt32, UInt64, UnsetVar,
    decode_frame, decode_frame_header, decode_payload, encode_ack, encode_agent_disconnect,
    encode_agent_hello,
    encode_frame, encode_hdrs_bin, encode_haproxy_hello, encode_kv_list, encode_name,
    encode_notify, encode_typed, encode_varint,
)

fuzz = settings(max_examples=200, deadline=None)

U64 = 2**64 - 1
typed_values = st.one_of(
    st.none(), st.booleans(),
    st.integers(-(2**31), 2**31 - 1).map(Int32), st.integers(0, 2**32 - 1).map(UInt32),
    st.integers(-(2**63), 2**63 - 1).map(Int64), st.integers(0, U64).map(UInt64),
    st.ip_addresses(v=4), st.ip_addresses(v=6), st.text(max_size=30), st.binary(max_size=30),
)
# Items of comma-separated lists: no commas, no surrounding spaces, not empty.
tokens = st.text("abcdefghijklmnopqrstuvwxyz0123456789.-_", min_size=1, max_size=12)
ids = st.integers(0, U64)
u32 = st.integers(0, 2**32 - 1)

haproxy_hellos = st.builds(
    HaproxyHello, st.lists(tokens, max_size=4).map(tuple), u32, st.frozensets(tokens, max_size=4),
    st.booleans(), st.none() | st.text(max_size=40))
agent_hellos = st.builds(AgentHello, st.text(max_size=10), u32, st.frozensets(tokens, max_size=4),
                         st.none() | st.text(max_size=40))
messages = st.builds(Message, st.text(max_size=20),
                     st.lists(st.tuples(st.text(max_size=20), typed_values), max_size=12).map(tuple))
notifies = st.builds(Notify, ids, ids, st.lists(messages, max_size=4).map(tuple))
actions = st.one_of(st.builds(SetVar, st.sampled_from(Scope), st.text(max_size=20), typed_values),
                    st.builds(UnsetVar, st.sampled_from(Scope), st.text(max_size=20)))
acks = st.builds(Ack, ids, ids, st.lists(actions, max_size=6).map(tuple))
all_frames = st.one_of(
    haproxy_hellos, agent_hellos, notifies, acks,
    st.builds(HaproxyDisconnect, u32, st.text(max_size=50)),
    st.builds(AgentDisconnect, u32, st.text(max_size=50)),
)


def raw_frame(ftype: int, payload: bytes, flags: int = FrameFlags.FIN, sid: int = 0, fid: int = 0) -> bytes:
    body = bytes([ftype]) + struct.pack(">I", flags) + encode_varint(sid) + encode_varint(fid) + payload
    return struct.pack(">I", len(body)) + body


def fails(payload: bytes, status: Status = Status.INVALID) -> SpopError:
    with pytest.raises(SpopError) as info:
        decode_frame(payload)
    assert info.value.status == status, info.value
    return info.value


# ---------------------------------------------------------------- round trips

@fuzz
@given(all_frames)
def test_every_frame_round_trips(frame):
    raw = encode_frame(frame)
    assert struct.unpack(">I", raw[:4])[0] == len(raw) - 4
    assert decode_frame(raw[4:]) == frame
    assert decode_frame(memoryview(raw)[4:]) == frame
    assert decode_frame(bytearray(raw[4:])) == frame


@fuzz
@given(all_frames)
def test_header_says_fin_and_type(frame):
    raw = encode_frame(frame)
    ftype, flags, *_ = decode_frame_header(raw[4:])
    assert flags == FrameFlags.FIN
    assert ftype == {HaproxyHello: 1, HaproxyDisconnect: 2, Notify: 3, AgentHello: 101,
                     AgentDisconnect: 102, Ack: 103}[type(frame)]


@fuzz
@given(notifies, st.data())
def test_truncated_notify_is_invalid_or_a_prefix(notify, data):
    raw = encode_frame(notify)[4:]
    head = decode_frame_header(raw)[4]
    cut = data.draw(st.integers(head, len(raw) - 1)) if len(raw) > head else head
    try:
        got = decode_frame(raw[:cut])
    except SpopError as exc:
        assert exc.status == Status.INVALID
    else:  # the cut fell between two messages
        assert got.messages == notify.messages[:len(got.messages)]


@fuzz
@given(st.binary(max_size=200))
def test_random_bytes_only_raise_spop_errors(raw):
    try:
        decode_frame(raw)
    except SpopError:
        pass


@fuzz
@given(st.sampled_from([1, 2, 3, 101, 102, 103]), st.binary(max_size=120))
def test_random_payloads_only_raise_spop_errors(ftype, payload):
    try:
        frame = decode_frame(raw_frame(ftype, payload)[4:])
    except SpopError as exc:
        assert exc.status in (Status.INVALID, Status.NO_VERSION, Status.NO_FRAME_SIZE,
                              Status.NO_CAPABILITIES)
    else:
        assert isinstance(frame, (HaproxyHello, HaproxyDisconnect, Notify, AgentHello,
                                  AgentDisconnect, Ack))


# ------------------------------------------------------------- known answers

ENGINE_ID = "3a1b7f6e-0d4c-4b8e-9f2a-5c6d7e8f9a0b"

# A HAPROXY-HELLO as HAProxy 2.6 builds it (spoe_prepare_hahello_frame), by hand.
HAPROXY_26_HELLO = (
    b"\x00\x00\x00\x8f"  # frame length
    b"\x01"  # HAPROXY-HELLO
    b"\x00\x00\x00\x01"  # flags: FIN
    b"\x00\x00"  # stream-id, frame-id
    b"\x12supported-versions" b"\x08\x03" b"2.0"
    b"\x0emax-frame-size" b"\x03\xfc\xf0\x06"  # UINT32 16380
    b"\x0ccapabilities" b"\x08\x1e" b"pipelining,async,fragmentation"
    b"\x09engine-id" b"\x08\x24" + ENGINE_ID.encode()
)

# The health-check variant: no agent, so empty capabilities, and "healthcheck".
HAPROXY_26_HEALTHCHECK = (
    b"\x00\x00\x00\x4e" b"\x01" b"\x00\x00\x00\x01" b"\x00\x00"
    b"\x12supported-versions" b"\x08\x03" b"2.0"
    b"\x0emax-frame-size" b"\x03\xfc\xf0\x06"
    b"\x0ccapabilities" b"\x08\x00"
    b"\x0bhealthcheck" b"\x11"
)


def test_haproxy_26_hello():
    assert struct.unpack(">I", HAPROXY_26_HELLO[:4])[0] == len(HAPROXY_26_HELLO) - 4
    assert decode_frame(HAPROXY_26_HELLO[4:]) == HaproxyHello(
        ("2.0",), 16380, frozenset({"pipelining", "async", "fragmentation"}), False, ENGINE_ID)
    again = encode_haproxy_hello(("2.0",), 16380, ("pipelining", "async", "fragmentation"),
                                 engine_id=ENGINE_ID)
    assert again == HAPROXY_26_HELLO


def test_haproxy_26_healthcheck_hello():
    assert struct.unpack(">I", HAPROXY_26_HEALTHCHECK[:4])[0] == len(HAPROXY_26_HEALTHCHECK) - 4
    hello = decode_frame(HAPROXY_26_HEALTHCHECK[4:])
    assert hello == HaproxyHello(("2.0",), 16380, frozenset(), True, None)
    assert encode_haproxy_hello(("2.0",), 16380, (), healthcheck=True) == HAPROXY_26_HEALTHCHECK


def test_agent_hello_known_answer():
    payload = (b"\x65" b"\x00\x00\x00\x01" b"\x00\x00"
               b"\x07version" b"\x08\x03" b"2.0"
               b"\x0emax-frame-size" b"\x03\xfc\xf0\x06"
               b"\x0ccapabilities" b"\x08\x0a" b"pipelining")
    assert encode_agent_hello(16380, ["pipelining"]) == struct.pack(">I", len(payload)) + payload
    assert decode_frame(payload) == AgentHello("2.0", 16380, frozenset({"pipelining"}))


def test_agent_disconnect_known_answer():
    payload = (b"\x66" b"\x00\x00\x00\x01" b"\x00\x00"
               b"\x0bstatus-code" b"\x03\x03" b"\x07message" b"\x08\x07" b"too big")
    assert encode_agent_disconnect(Status.TOO_BIG, "too big") == struct.pack(">I", len(payload)) + payload
    assert decode_frame(payload) == AgentDisconnect(3, "too big")


def test_ack_known_answer():
    actions = [SetVar(Scope.TRANSACTION, "ip_score", Int32(10)), UnsetVar(Scope.REQUEST, "x"),
               SetVar(Scope.SESSION, "blocked", True)]
    payload = (b"\x67" b"\x00\x00\x00\x01" b"\xf0\x05" b"\x07"  # stream 320, frame 7
               b"\x01\x03\x02" b"\x08ip_score" b"\x02\x0a"
               b"\x02\x02\x03" b"\x01x"
               b"\x01\x03\x01" b"\x07blocked" b"\x11")
    assert encode_ack(320, 7, actions) == struct.pack(">I", len(payload)) + payload
    assert decode_frame(payload) == Ack(320, 7, tuple(actions))


def test_notify_known_answer():
    hdrs = encode_hdrs_bin([(b"host", b"a")])
    msg = Message("check-request", (("ip", ip_address("10.0.0.1")), ("query", None),
                                    ("", "unnamed"), ("headers", hdrs), ("len", Int64(-1))))
    payload = (b"\x03" b"\x00\x00\x00\x01" b"\x2a" b"\x01"
               b"\x0dcheck-request" b"\x05"
               b"\x02ip" b"\x06\x0a\x00\x00\x01"
               b"\x05query" b"\x00"
               b"\x00" b"\x08\x07unnamed"
               b"\x07headers" b"\x09\x09" b"\x04host\x01a\x00\x00"
               b"\x03len" b"\x04" + encode_varint(U64))
    assert encode_notify(42, 1, [msg]) == struct.pack(">I", len(payload)) + payload
    notify = decode_frame(payload)
    assert notify == Notify(42, 1, (msg,))
    assert notify.messages[0].arg("query", "absent") is None
    assert notify.messages[0].arg("missing", "absent") == "absent"


def test_notify_with_several_messages_and_no_arguments():
    msgs = (Message("a"), Message("b", (("x", Int64(1)), ("x", Int64(2)))), Message("c"))
    notify = decode_frame(encode_notify(1, 2, msgs)[4:])
    assert notify.messages == msgs
    assert notify.messages[1].arg("x") == 1  # the first of duplicates
    assert decode_frame(encode_notify(1, 2, [])[4:]) == Notify(1, 2, ())


def test_long_names_and_values_use_multibyte_lengths():
    msg = Message("m" * 300, (("k" * 240, "v" * 5000), ("b" * 2288, b"\x00" * 70000)))
    raw = encode_notify(2**40, 2**20, [msg])
    pos = 4 + decode_frame_header(raw[4:])[4]
    assert raw[pos:pos + 2] == encode_varint(300)
    assert decode_frame(raw[4:]) == Notify(2**40, 2**20, (msg,))


def test_invalid_utf8_in_names_round_trips():
    payload = b"\x03\x00\x00\x00\x01\x01\x01" b"\x02m\xff" b"\x01" b"\x02\xc3\x28" b"\x08\x01\xfe"
    notify = decode_frame(payload)
    assert encode_frame(notify)[4:] == payload


# ------------------------------------------------------------ frame headers

@pytest.mark.parametrize("payload", [b"", b"\x03", b"\x03\x00\x00\x00\x01\x00", b"\x03\x00\x00\x00\x01\xf0"])
def test_short_header(payload):
    fails(payload)


@pytest.mark.parametrize("ftype", [4, 50, 100, 104, 255])
def test_unknown_frame_type(ftype):
    fails(raw_frame(ftype, b"")[4:])


def test_decode_payload_refuses_unknown_types():
    with pytest.raises(SpopError) as info:
        decode_payload(0, 1, 1, b"\x00\x00\x00\x00\x01\x01\x01", 7)
    assert info.value.status == Status.INVALID


def test_fragments_and_aborts_are_refused():
    notify = encode_notify(1, 1, [Message("m")])[4:]
    no_fin = notify[:1] + b"\x00\x00\x00\x00" + notify[5:]
    fails(no_fin, Status.FRAGMENTATION_UNSUPPORTED)
    abort = notify[:1] + b"\x00\x00\x00\x03" + notify[5:]
    fails(abort, Status.FRAGMENTATION_UNSUPPORTED)
    fails(raw_frame(FrameType.UNSET, b"more")[4:], Status.FRAGMENTATION_UNSUPPORTED)
    # Reserved flag bits are ignored.
    reserved = notify[:1] + b"\x80\x00\x00\x01" + notify[5:]
    assert decode_frame(reserved) == decode_frame(notify)


# ---------------------------------------------------------- HELLO contents

def hello_payload(**items) -> bytes:
    base = {"supported-versions": "2.0", "max-frame-size": UInt32(16380), "capabilities": "pipelining"}
    base.update(items)
    kv = [(k.replace("_", "-"), v) for k, v in base.items() if v is not ...]
    return raw_frame(FrameType.HAPROXY_HELLO, encode_kv_list(kv))[4:]


@pytest.mark.parametrize(("items", "status"), [
    ({"supported-versions": ...}, Status.NO_VERSION),
    ({"max-frame-size": ...}, Status.NO_FRAME_SIZE),
    ({"capabilities": ...}, Status.NO_CAPABILITIES),
    ({"supported-versions": b"2.0"}, Status.INVALID),
    ({"supported-versions": Int64(2)}, Status.INVALID),
    ({"max-frame-size": "16380"}, Status.INVALID),
    ({"max-frame-size": True}, Status.INVALID),
    ({"capabilities": None}, Status.INVALID),
    ({"healthcheck": Int64(1)}, Status.INVALID),
    ({"engine-id": b"id"}, Status.INVALID),
])
def test_hello_missing_or_mistyped_items(items, status):
    fails(hello_payload(**items), status)


def test_hello_is_lenient_where_haproxy_is():
    for kind in (Int32, UInt32, Int64, UInt64):  # any integer type for max-frame-size
        assert decode_frame(hello_payload(**{"max-frame-size": kind(1000)})).max_frame_size == 1000
    hello = decode_frame(hello_payload(**{"capabilities": " pipelining , async,,", "x-unknown": b"?",
                                          "supported-versions": "2.0, 1.5"}))
    assert hello.capabilities == {"pipelining", "async"}
    assert hello.supported_versions == ("2.0", "1.5")
    # Negative sizes decode; the connection, not the codec, judges them.
    assert decode_frame(hello_payload(**{"max-frame-size": Int64(-5)})).max_frame_size == -5


def test_hello_duplicate_items_last_wins():
    kv = [("supported-versions", "1.0"), ("max-frame-size", UInt32(300)), ("capabilities", ""),
          ("supported-versions", "2.0")]
    hello = decode_frame(raw_frame(1, encode_kv_list(kv))[4:])
    assert hello.supported_versions == ("2.0",)


def test_hello_and_disconnect_need_zero_ids():
    fails(raw_frame(1, hello_payload()[7:], sid=1)[4:])
    fails(raw_frame(2, encode_kv_list([("status-code", UInt32(0))]), fid=3)[4:])


def test_disconnect_contents():
    kv = [("status-code", UInt32(13)), ("message", "no memory")]
    assert decode_frame(raw_frame(2, encode_kv_list(kv))[4:]) == HaproxyDisconnect(13, "no memory")
    only_status = raw_frame(2, encode_kv_list([("status-code", Int64(1))]))[4:]
    assert decode_frame(only_status) == HaproxyDisconnect(1, "")
    fails(raw_frame(2, encode_kv_list([("message", "x")]))[4:])
    fails(raw_frame(2, encode_kv_list([("status-code", "0")]))[4:])


# --------------------------------------------------------------- ACK errors

@pytest.mark.parametrize("payload", [
    b"\x01\x03",  # truncated action
    b"\x01\x03\x05\x01x\x00",  # scope 5
    b"\x03\x02\x00\x01x",  # unknown action type
    b"\x01\x02\x00\x01x\x00",  # SET-VAR with 2 arguments
    b"\x02\x03\x00\x01x",  # UNSET-VAR with 3 arguments
    b"\x01\x03\x00\x01x",  # SET-VAR without a value
])
def test_malformed_ack(payload):
    fails(raw_frame(FrameType.ACK, payload, sid=1, fid=1)[4:])


# ----------------------------------------------------------- encoder errors

def test_encoder_errors():
    with pytest.raises(SpopError):
        encode_notify(1, 1, [Message("m", tuple((str(i), None) for i in range(256)))])
    with pytest.raises(SpopError):
        encode_ack(1, 1, [SetVar(7, "x", None)])  # type: ignore[arg-type]
    with pytest.raises(SpopError):
        encode_ack(1, 1, ["set-var"])  # type: ignore[list-item]
    with pytest.raises(SpopError):
        encode_ack(1, 1, [UnsetVar([1], "x")])  # type: ignore[arg-type]
    with pytest.raises(SpopError):
        encode_ack(1, 1, [SetVar(Scope.REQUEST, "x", 1.5)])
    with pytest.raises(SpopError):
        encode_ack(-1, 1, [])
    with pytest.raises(SpopError):
        encode_frame("not a frame")  # type: ignore[arg-type]
    with pytest.raises(SpopError):
        decode_frame("text")  # type: ignore[arg-type]
    assert len(encode_notify(1, 1, [Message("m", tuple((str(i), None) for i in range(255)))])) > 255


def test_set_var_value_types():
    values = [None, True, Int32(-7), UInt32(7), Int64(-(2**40)), UInt64(2**60),
              ip_address("192.0.2.1"), ip_address("2001:db8::1"), "deny", b"\x00raw"]
    acts = tuple(SetVar(Scope.TRANSACTION, f"v{i}", v) for i, v in enumerate(values))
    ack = decode_frame(encode_ack(9, 9, acts)[4:])
    assert ack.actions == acts
    assert [type(a.value) for a in ack.actions] == [type(v) for v in values]
    assert encode_typed(ack.actions[2].value) == encode_typed(Int32(-7))


def test_names_are_bare_strings():
    # KV names, message names and variable names carry no type tag.
    assert encode_name("abc") == b"\x03abc"
    assert encode_name("") == b"\x00"
