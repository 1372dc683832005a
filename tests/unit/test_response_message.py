"""check-response -> ResponseRequest and the worker to route to; the
response verdict, a miss and a failure as txn.modsec.res_* actions."""

from __future__ import annotations

import pytest

from gateway import mapping, responses, setvars
from gateway.acks import AckEncoder
from gateway.failures import MISS_REASONS, Failure, MissReason, refusal
from gateway.apps import AppPolicies
from gateway.responses import MissPolicy
from gateway.spop import Int64, Scope, SetVar, encode_actions, encode_hdrs_bin
from wafapi import waf_pb2

HANDLE = "web-1/100/4242#a1b2c3d4.1f"


def _args(**overrides):
    args = {"handle": HANDLE, "id": "uid-1", "app": None, "method": "GET", "status": Int64(200), "ver": "1.1",
            "headers": encode_hdrs_bin([(b"content-type", b"text/html"), (b"set-cookie", b"a=1"),
                                        (b"set-cookie", b"b=2"), (b"content-length", b"11")]),
            "body": b"hello world", "body_size": Int64(11), "frontend": "web"}
    args.update(overrides)
    return args


def test_a_response_maps_whole_and_names_the_worker_of_its_handle():
    resp, worker, ctx = responses.build_response(_args())
    assert worker == "web-1/100/4242"
    assert (resp.transaction_handle, resp.status, resp.http_version, resp.transaction_id) == (HANDLE, 200, "1.1", "uid-1")
    assert [(h.name, h.value) for h in resp.headers] == [
        (b"content-type", b"text/html"), (b"set-cookie", b"a=1"), (b"set-cookie", b"b=2"), (b"content-length", b"11")]
    assert resp.body == b"hello world" and resp.content_length == 11 and not resp.body_truncated
    assert (ctx.unique_id, ctx.frontend, ctx.app, ctx.body_truncated) == ("uid-1", "web", "", False)


@pytest.mark.parametrize("overrides,truncated", [
    ({"body": b"hello"}, True),                                       # Content-Length larger than what came
    ({"headers": encode_hdrs_bin([]), "body_size": Int64(90000)}, True),  # chunked: HAProxy counted more
    ({"method": "HEAD", "body": b""}, False),                         # HEAD: a Content-Length, never a body
    ({"status": Int64(304), "body": b""}, False),
    ({"status": Int64(204), "body": b""}, False),
    ({"status": Int64(101), "body": b""}, False),
    ({"body": b"hello world"}, False),
])
def test_a_body_cut_short_is_flagged_unless_the_answer_has_no_body(overrides, truncated):
    resp, _, ctx = responses.build_response(_args(**overrides), haproxy_bufsize=65536)
    assert resp.body_truncated is truncated and ctx.body_truncated is truncated


def test_a_response_without_a_handle_routes_nowhere():
    for handle in (None, ""):
        resp, worker, _ = responses.build_response(_args(handle=handle))
        assert worker == "" and resp.transaction_handle == ""


P = mapping.Problem


@pytest.mark.parametrize("overrides,problem,argument", [
    ({"handle": "no-hash"}, P.BAD_VALUE, "handle"),
    ({"handle": "#token"}, P.BAD_VALUE, "handle"),
    ({"handle": Int64(3)}, P.WRONG_TYPE, "handle"),
    ({"status": None}, P.NULL_ARGUMENT, "status"),
    ({"status": Int64(42)}, P.BAD_VALUE, "status"),
    ({"status": "200"}, P.WRONG_TYPE, "status"),
    ({"headers": b"\x01"}, P.BAD_VALUE, "headers"),
])
def test_a_message_the_gateway_cannot_use_is_refused_with_its_reason(overrides, problem, argument):
    with pytest.raises(mapping.InvalidMessage) as caught:
        responses.build_response(_args(**overrides))
    assert (caught.value.problem, caught.value.message, caught.value.argument) == (problem, "check-response", argument)


def test_a_missing_argument_says_what_to_add():
    args = _args()
    del args["body"]
    with pytest.raises(mapping.InvalidMessage) as caught:
        responses.build_response(args)
    assert caught.value.problem is P.MISSING_ARGUMENT and "body=res.body" in caught.value.hint


def test_inspect_response_is_a_boolean_or_an_integer_never_guessed_from_text():
    base = {"method": "GET", "uri": "/", "headers": b"\x00\x00", "body": None}
    assert mapping.build_request({**base, "inspect_response": True})[0].inspect_response
    assert mapping.build_request({**base, "inspect_response": Int64(1)})[0].inspect_response
    assert not mapping.build_request({**base, "inspect_response": None})[0].inspect_response
    with pytest.raises(mapping.InvalidMessage) as caught:
        mapping.build_request({**base, "inspect_response": "on"})
    assert caught.value.problem is P.WRONG_TYPE and caught.value.argument == "inspect_response"


def _verdict(**fields) -> waf_pb2.Verdict:
    verdict = waf_pb2.Verdict(**fields)
    return verdict


def test_the_response_verdict_lands_in_its_own_variables():
    verdict = _verdict(intervention=True, status=403, action=waf_pb2.ACTION_DENY)
    verdict.matches.add(id=951110, message="SQL error leakage")
    verdict.matches.add(id=959100)
    actions = responses.verdict_actions(verdict)
    assert actions == [SetVar(Scope.TRANSACTION, "res_intervention", 1), SetVar(Scope.TRANSACTION, "res_status", 403),
                       SetVar(Scope.TRANSACTION, "res_action", "deny"),
                       SetVar(Scope.TRANSACTION, "res_rules", "951110 959100"),
                       SetVar(Scope.TRANSACTION, "res_message", "SQL error leakage")]
    acks = AckEncoder(fail_closed=True)
    assert acks.response_verdict(verdict) == encode_actions(actions)
    assert acks.response_decision(verdict) == encode_actions(actions[:responses.DECISION_VARS])
    passed = _verdict(action=waf_pb2.ACTION_PASS)
    assert acks.response_verdict(passed) == encode_actions(responses.verdict_actions(passed))


@pytest.mark.parametrize("policy,intervention,status,action", [
    (MissPolicy.PASS, 0, 0, "pass"), (MissPolicy.BLOCK, 1, 503, "deny")])
def test_a_miss_is_answered_by_the_miss_policy_and_flagged(policy, intervention, status, action):
    data = AckEncoder(fail_closed=True).response_miss(MissReason.EXPIRED, policy)
    assert data == encode_actions([
        SetVar(Scope.TRANSACTION, "res_intervention", intervention), SetVar(Scope.TRANSACTION, "res_status", status),
        SetVar(Scope.TRANSACTION, "res_action", action), SetVar(Scope.TRANSACTION, "res_failed", 1),
        SetVar(Scope.TRANSACTION, "res_miss", 1), SetVar(Scope.TRANSACTION, "res_error", "transaction expired")])


def test_a_response_without_a_verdict_follows_the_failure_policy_and_is_not_a_miss():
    for closed in (True, False):
        full, decision = AckEncoder(fail_closed=closed).response_failure("no verdict within the deadline")
        actions = responses.failure_actions("no verdict within the deadline", closed)
        assert full == encode_actions(actions) and decision == encode_actions(actions[:responses.DECISION_VARS])
        assert SetVar(Scope.TRANSACTION, "res_miss", 1) not in actions
        assert actions[0] == SetVar(Scope.TRANSACTION, "res_intervention", int(closed))


def test_the_request_verdict_carries_the_handle_even_when_its_details_do_not_fit():
    verdict = _verdict(action=waf_pb2.ACTION_PASS, transaction_handle=HANDLE, transaction_ttl_ms=35000)
    verdict.matches.add(id=920350, message="Host header is a numeric IP address")
    acks = AckEncoder(fail_closed=True)
    assert acks.verdict(verdict) == encode_actions(setvars.verdict_actions(verdict))
    assert SetVar(Scope.TRANSACTION, "handle", HANDLE) in setvars.verdict_actions(verdict)
    assert acks.short(verdict) == acks.decision(verdict) + encode_actions([SetVar(Scope.TRANSACTION, "handle", HANDLE)])
    assert acks.short(_verdict(action=waf_pb2.ACTION_PASS)) == acks.decision(_verdict(action=waf_pb2.ACTION_PASS))


def test_wafsvc_misses_are_typed_and_other_refusals_are_not_misses():
    for reason, miss in MISS_REASONS.items():
        no = refusal("NOT_FOUND", "no held transaction for handle ...", reason)
        assert no.failure is Failure.MISS and no.miss is miss and no.is_miss
        assert str(no) == f"transaction {miss.value}"  # the handle never reaches res_error
    no = refusal("INVALID_ARGUMENT", "response status must be 100 to 999", waf_pb2.FIELD_INVALID)
    assert no.failure is Failure.REFUSED and not no.is_miss and no.label == "invalid_argument"
    assert {m.value for m in MissReason} == {"expired", "evicted", "reloaded", "unknown", "other_worker",
                                             "no_route", "worker_hung", "no_handle"}


def test_miss_policies_by_application_fall_back_to_the_gateway_option():
    policies = AppPolicies(fail_closed=True, miss=MissPolicy.PASS)
    assert policies.miss("shop") is MissPolicy.PASS
    reply = waf_pb2.ListApplicationsResponse(unknown_application="default")
    reply.applications.add(name="shop", is_default=True, response_miss_policy="block")
    reply.applications.add(name="api", response_miss_policy="")      # sets none: the gateway's
    assert policies.update(reply)
    assert policies.miss("shop") is MissPolicy.BLOCK and policies.miss("api") is MissPolicy.PASS
    assert policies.miss("elsewhere") is MissPolicy.BLOCK             # judged by the default application
    assert AppPolicies(fail_closed=False, miss=MissPolicy.BLOCK).miss("") is MissPolicy.BLOCK
