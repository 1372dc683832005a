"""txn.modsec.body_truncated and res_body_truncated: set from the verdict
when a body was cut, absent (not even encoded) for a whole one; with no
verdict (failure or miss policy) from the gateway's own detection; and for
the original agent's message also sess.modsec.body_truncated, 0 or 1 on
every answer."""

from __future__ import annotations

import pytest

from gateway import mapping, responses, setvars
from gateway.acks import AckEncoder
from gateway.failures import MissReason
from gateway.notify import NotifyDecoder
from gateway.responses import MissPolicy
from gateway.spop import Int32, Message, decode_frame_header, Scope, SetVar, encode_actions, encode_hdrs_bin, encode_notify
from wafapi import waf_pb2
from wafsvc.phases import Policy, flag_truncated

TXN_FLAG = SetVar(Scope.TRANSACTION, "body_truncated", 1)
RES_FLAG = SetVar(Scope.TRANSACTION, "res_body_truncated", 1)
HEADERS = [(b"host", b"shop.example"), (b"content-type", b"application/x-www-form-urlencoded")]


def _wafsvc_verdict(truncated: bool, response: bool = False, policy: Policy = Policy()) -> waf_pb2.Verdict:
    """A verdict as wafsvc makes one for a clean body of 60,000 bytes."""
    verdict = waf_pb2.Verdict(action=waf_pb2.ACTION_PASS)
    if truncated:
        flag_truncated(verdict, policy, response, 60000, 2_000_000)
    return verdict


@pytest.mark.parametrize("policy", [Policy(), Policy(truncated_body="block", truncated_response_body="block"),
                                    Policy(blocking=False), Policy(min_inspected=10 ** 6)])
@pytest.mark.parametrize("response", [False, True])
def test_wafsvc_flags_every_cut_body_with_a_match(policy, response):
    """What lets the encoder skip the flag for a verdict without matches."""
    verdict = _wafsvc_verdict(True, response, policy)
    assert verdict.body_truncated and [m.id for m in verdict.matches] == [99011 if response else 99010]


def test_a_cut_request_body_sets_the_flag_and_a_whole_one_adds_nothing():
    acks = AckEncoder(fail_closed=True)
    whole, cut = _wafsvc_verdict(False), _wafsvc_verdict(True)
    assert acks.verdict(whole) == acks.decision(whole)              # the common answer: unchanged
    assert TXN_FLAG in setvars.verdict_actions(cut) and TXN_FLAG not in setvars.verdict_actions(whole)
    assert acks.verdict(cut) == encode_actions(setvars.verdict_actions(cut))
    assert acks.short(cut) == acks.decision(cut) + encode_actions([TXN_FLAG])  # kept when the ACK is too big


@pytest.mark.parametrize("truncated", [False, True])
def test_the_original_agents_message_gets_the_session_flag_on_every_answer(truncated):
    acks = AckEncoder(fail_closed=True)
    verdict = _wafsvc_verdict(truncated)
    actions = setvars.verdict_actions(verdict, session=True)
    assert SetVar(Scope.SESSION, "body_truncated", Int32(int(truncated))) in actions
    assert (TXN_FLAG in actions) is truncated
    assert acks.verdict(verdict, True) == encode_actions(actions)
    flag = acks.truncation(truncated, True)
    assert acks.short(verdict, True) == acks.decision(verdict) + flag


def test_with_no_verdict_the_gateways_detection_sets_the_flag():
    acks = AckEncoder(fail_closed=True)
    assert acks.truncation(False) == b""
    assert acks.truncation(True) == encode_actions([TXN_FLAG])
    assert acks.truncation(False, True) == encode_actions([SetVar(Scope.SESSION, "body_truncated", Int32(0))])
    assert acks.response_truncation(False) == b""
    assert acks.response_truncation(True) == encode_actions([RES_FLAG])


def test_a_cut_response_body_sets_its_own_flag():
    acks = AckEncoder(fail_closed=True)
    whole, cut = _wafsvc_verdict(False, True), _wafsvc_verdict(True, True)
    assert acks.response_verdict(whole) == acks.response_decision(whole)
    actions = responses.verdict_actions(cut)
    assert RES_FLAG in actions and TXN_FLAG not in actions
    assert acks.response_verdict(cut) == encode_actions(actions)
    assert acks.response_short(cut) == acks.response_decision(cut) + encode_actions([RES_FLAG])
    assert acks.response_short(whole) == acks.response_decision(whole)
    miss = acks.response_miss(MissReason.EXPIRED, MissPolicy.PASS)
    assert miss == encode_actions(responses.miss_actions(MissReason.EXPIRED, MissPolicy.PASS))
    assert RES_FLAG not in responses.miss_actions(MissReason.EXPIRED, MissPolicy.PASS)


def _decode(name: str, args: list) -> mapping.RequestContext:
    frame = encode_notify(1, 1, [Message(name, tuple(args))])[4:]
    _, _, stream_id, frame_id, pos = decode_frame_header(frame)
    decoded = NotifyDecoder("", 65536)(stream_id, frame_id, frame, pos)
    assert decoded.error is None, decoded.error
    return decoded.context


@pytest.mark.parametrize("content_length,truncated", [(20, False), (2_000_000, True)])
def test_the_decoder_knows_a_cut_body_and_the_original_agents_message(content_length, truncated):
    headers = encode_hdrs_bin(HEADERS + [(b"content-length", str(content_length).encode())])
    body = b"comment=hello+world!"
    original = _decode("modsecurity", [("method", "POST"), ("path", "/c"), ("query", None),
                                       ("reqhdrs", headers), ("reqbody", body)])
    shipped = _decode("check-request", [("method", "POST"), ("uri", "/c"), ("headers", headers), ("body", body)])
    assert original.original_agent and not shipped.original_agent
    assert original.body_truncated is shipped.body_truncated is truncated
