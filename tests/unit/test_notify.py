"""The one-pass NOTIFY decoder and the cached ACK encoder against the
reference path (frames.decode_payload + mapping.build_request, and
encode_actions(setvars.verdict_actions)): the same bytes, the same refusals,
the same protocol errors."""

from __future__ import annotations

import pathlib
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given, settings, strategies as st

from bench import spop_driver
from gateway import mapping, responses, setvars
from gateway.acks import AckEncoder
from gateway.notify import NotifyDecoder
from gateway.protowire import batch_entry, varint
from gateway.spop import (Int32, Int64, Message, SpopError, UInt32, UInt64, decode_frame_header,
                          decode_payload, encode_actions, encode_hdrs_bin, encode_notify)
from wafapi import waf_pb2

CORPUS = pathlib.Path(__file__).resolve().parents[2] / "fuzz" / "corpus"
BUF = 65536


def _frame_parts(frame: bytes):
    body = frame[4:]
    ftype, _, stream_id, frame_id, pos = decode_frame_header(body)
    return ftype, stream_id, frame_id, body, pos


def _reference(frame: bytes, default_app: str = "", bufsize: int = BUF):
    """(request bytes, context) or the InvalidMessage, the reference way."""
    ftype, stream_id, frame_id, body, pos = _frame_parts(frame)
    notify = decode_payload(ftype, stream_id, frame_id, body, pos)
    known = [m for m in notify.messages if m.name in mapping.MESSAGES]
    if not known:
        return "unknown_message"
    try:
        if known[0].name == mapping.CHECK_RESPONSE.name:
            response, worker, context = responses.build_response(known[0].args, default_app, bufsize)
            return response.SerializeToString(), context, worker
        request, context = mapping.build_request(known[0].args, default_app, bufsize,
                                                 schema=mapping.MESSAGES[known[0].name])
    except mapping.InvalidMessage as exc:
        return (exc.problem, exc.message, exc.argument)
    return request.SerializeToString(), context, None


def _fast(frame: bytes, default_app: str = "", bufsize: int = BUF):
    _, stream_id, frame_id, body, pos = _frame_parts(frame)
    decoded = NotifyDecoder(default_app, bufsize)(stream_id, frame_id, body, pos)
    assert (decoded.stream_id, decoded.frame_id) == (stream_id, frame_id)
    if decoded.error is not None:
        if decoded.error.problem is mapping.Problem.UNKNOWN_MESSAGE:
            return "unknown_message"
        return (decoded.error.problem, decoded.error.message, decoded.error.argument)
    return decoded.request, decoded.context, decoded.worker


@pytest.mark.parametrize("mix", ["benign", "attack"])
def test_the_bench_requests_map_to_the_same_bytes(mix):
    payloads = spop_driver.notify_payloads(mix, variants=2)
    for i, payload in enumerate(payloads):
        frame = spop_driver.notify_frame(1000 + i, payload)
        assert _fast(frame) == _reference(frame)
        assert _fast(frame, "shop", 0) == _reference(frame, "shop", 0)


def test_haproxy_captures_map_to_the_same_bytes():
    seen = 0
    for capture in sorted(CORPUS.glob("*.bin")):
        data = capture.read_bytes()
        while data:
            n = int.from_bytes(data[:4], "big")
            frame, data = data[:4 + n], data[4 + n:]
            if frame[4] == 3:  # NOTIFY
                assert _fast(frame) == _reference(frame)
                seen += 1
    assert seen >= 4


_text_or_bytes = st.one_of(st.text(max_size=30), st.binary(max_size=30),
                           st.binary(max_size=30).map(lambda b: b.decode("utf-8", "surrogateescape")))
_any_value = st.one_of(st.none(), st.booleans(), _text_or_bytes,
                       st.integers(-(1 << 31), (1 << 31) - 1).map(Int32),
                       st.integers(0, (1 << 32) - 1).map(UInt32),
                       st.integers(-(1 << 63), (1 << 63) - 1).map(Int64),
                       st.integers(0, (1 << 64) - 1).map(UInt64),
                       st.integers(0, (1 << 32) - 1).map(IPv4Address),
                       st.integers(0, (1 << 128) - 1).map(IPv6Address))
_headers = st.lists(st.tuples(st.binary(min_size=1, max_size=20), st.binary(max_size=300)), max_size=6).map(
    encode_hdrs_bin)
_good = {"method": st.sampled_from(["GET", "POST", "HEAD", "G\xe9T"]),
         "uri": st.sampled_from(["/", "/a?b=%27", b"/\xff", b"/\xc3\xa9"]),
         "path": st.sampled_from(["/", "/search", b"/\xff"]), "query": st.sampled_from([None, "", "q=%27", b"a\xfe"]),
         "headers": _headers, "reqhdrs": _headers,
         "body": st.one_of(st.none(), st.binary(max_size=400)), "reqbody": st.one_of(st.none(), st.binary(max_size=40)),
         "src": st.sampled_from([IPv4Address("10.0.0.1"), IPv6Address("::1"), "192.0.2.1", None]),
         "ip": st.sampled_from([IPv4Address("10.0.0.1"), IPv6Address("2001:db8::1")]),
         "src_port": st.integers(0, 70000).map(Int64), "dst_port": st.integers(0, 65535).map(UInt32),
         "ignore": st.sampled_from([None, "942100 920350", "x1", "0"]), "ignorerules": st.sampled_from([None, "942100"]),
         "body_size": st.integers(-1, 500).map(Int64), "id": _text_or_bytes, "app": _text_or_bytes,
         "ver": st.sampled_from([None, "1.1", "2.0"]), "reqver": st.sampled_from([None, "1.1"]),
         "frontend": _text_or_bytes,
         "inspect_response": st.sampled_from([None, True, False, Int32(1), Int64(0)]),
         "handle": st.sampled_from([None, "", "host/1/42#ab12.1f", "h/1/2#", "#x", "nohash", b"w/1#\xff"]),
         "status": st.sampled_from([Int64(200), Int64(403), Int64(204), Int64(304), Int64(101), Int64(99),
                                    Int64(1000), UInt32(500)])}


@st.composite
def _messages(draw):
    """A whole message of a known schema (or not), then a few mistakes:
    an argument dropped, one of any type, unknown ones, duplicates."""
    name = draw(st.sampled_from(["check-request", "check-request", "modsecurity", "check-response",
                                 "check-response", "other"]))
    schema = mapping.MESSAGES.get(name, mapping.CHECK_REQUEST)
    args = [(a.name, draw(_good.get(a.name, _any_value))) for a in schema.arguments]
    for _ in range(draw(st.integers(0, 2))):
        mistake = draw(st.sampled_from(["drop", "any", "unknown", "duplicate", "none"]))
        if not args or mistake == "none":
            continue
        i = draw(st.integers(0, len(args) - 1))
        if mistake == "drop":
            del args[i]
        elif mistake == "any":
            args[i] = (args[i][0], draw(_any_value))
        elif mistake == "unknown":
            args.insert(i, (draw(st.sampled_from(["url", "reqhdr", "x"])), draw(_any_value)))
        else:
            args.append((args[i][0], draw(_good.get(args[i][0], _any_value))))
    return Message(name, tuple(args))


@settings(max_examples=600, deadline=None)
@given(st.lists(_messages(), min_size=0, max_size=3), st.sampled_from(["", "shop"]))
def test_any_message_maps_or_is_refused_the_same_way(messages, default_app):
    frame = encode_notify(7, 1, messages)
    assert _fast(frame, default_app) == _reference(frame, default_app)


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_damaged_frames_fail_the_same_way(data):
    payloads = spop_driver.notify_payloads("benign", variants=1)
    frame = bytearray(spop_driver.notify_frame(5, data.draw(st.sampled_from(payloads))))
    for _ in range(data.draw(st.integers(1, 3))):
        frame[data.draw(st.integers(9, len(frame) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(10, len(frame)))
    frame = bytes(frame[:cut])
    frame = len(frame[4:]).to_bytes(4, "big") + frame[4:]
    try:
        expected = _reference(frame)
    except SpopError as exc:
        with pytest.raises(SpopError) as caught:
            _fast(frame)
        assert caught.value.status == exc.status
        return
    assert _fast(frame) == expected


def test_batch_entry_is_a_batch_request_field():
    request = waf_pb2.EvaluateRequest(method="GET", uri=b"/", content_length=-1).SerializeToString()
    for ref in (1, 127, 128, 300, 1 << 40):
        batch = waf_pb2.EvaluateBatch.FromString(batch_entry(ref, request) + batch_entry(ref + 1, request))
        assert [item.ref for item in batch.requests] == [ref, ref + 1]
        assert batch.requests[0].request.SerializeToString() == request
    assert varint(-1) == b"\xff" * 9 + b"\x01"


def _cut(verdict: waf_pb2.Verdict, truncated: bool) -> waf_pb2.Verdict:
    """As wafsvc flags a cut body (wafsvc.phases.flag_truncated): always with rule 99010."""
    if truncated:
        verdict.body_truncated = True
        verdict.matches.add(id=99010, message="Request body truncated")
    return verdict


_verdicts = st.builds(_cut, st.builds(
    waf_pb2.Verdict, intervention=st.booleans(), status=st.sampled_from([0, 302, 400, 403, 503]),
    action=st.sampled_from([0, 1, 2, 3, 4]), redirect_url=st.sampled_from(["", "https://example.com/x"]),
    transaction_handle=st.sampled_from(["", "w1#7"]),
    matches=st.lists(st.builds(waf_pb2.RuleMatch, id=st.integers(1, 10 ** 7), message=st.text(max_size=40)),
                     max_size=4)), st.booleans())


@settings(max_examples=300, deadline=None)
@given(_verdicts, st.booleans())
def test_cached_acks_equal_the_reference(verdict, session):
    encoder = AckEncoder(True)
    for _ in range(2):  # the second time from the cache
        reference = setvars.verdict_actions(verdict, session)
        assert encoder.verdict(verdict, session) == encode_actions(reference)
        assert encoder.decision(verdict) == encode_actions(reference[:setvars.DECISION_VARS])
        details = len([a for a in reference if a.name in (setvars.VAR_REDIRECT, setvars.VAR_RULES,
                                                          setvars.VAR_MESSAGE)])
        assert encoder.short(verdict, session) == encode_actions(reference[:len(reference) - details])


@pytest.mark.parametrize("closed", [True, False])
def test_failure_acks_equal_the_reference(closed):
    actions, decision = AckEncoder(closed).failure("no verdict within the deadline")
    reference = setvars.failure_actions("no verdict within the deadline", closed)
    assert actions == encode_actions(reference)
    assert decision == encode_actions(reference[:setvars.DECISION_VARS])
