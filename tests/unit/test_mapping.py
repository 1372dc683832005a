"""SPOE arguments -> EvaluateRequest, and verdicts -> set-var actions."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given, settings, strategies as st

from gateway import mapping
from gateway.spop import Scope, SetVar, encode_hdrs_bin
from wafapi import waf_pb2


def _args(**overrides):
    args = {
        "id": "abc-1", "app": None, "src": IPv4Address("10.0.0.1"), "src_port": 51000,
        "dst": IPv6Address("::1"), "dst_port": 8080, "method": "POST", "uri": "/a?b=%27",
        "ver": "1.1", "headers": encode_hdrs_bin([(b"host", b"example.com"), (b"x-dup", b"1"),
                                                  (b"x-dup", b"2"), (b"content-length", b"10")]),
        "body": b"\x00" * 4, "ignore": "942100 920350", "frontend": "web",
    }
    args.update(overrides)
    return args


def test_request_keeps_raw_bytes_order_and_duplicates():
    req, ctx = mapping.build_request(_args())
    assert req.uri == b"/a?b=%27" and req.method == "POST" and req.http_version == "1.1"
    assert [(h.name, h.value) for h in req.headers] == [
        (b"host", b"example.com"), (b"x-dup", b"1"), (b"x-dup", b"2"), (b"content-length", b"10")]
    assert (req.client_ip, req.client_port, req.server_ip, req.server_port) == ("10.0.0.1", 51000, "::1", 8080)
    assert list(req.ignore_rule_ids) == [942100, 920350]
    assert (ctx.frontend, ctx.host, ctx.unique_id) == ("web", "example.com", "abc-1")


def test_short_body_is_flagged_as_truncated():
    req, ctx = mapping.build_request(_args())
    assert req.body_truncated and req.content_length == 10 and ctx.body_truncated
    req, _ = mapping.build_request(_args(body=b"0123456789"))
    assert not req.body_truncated


def test_missing_optional_arguments_take_defaults():
    req, ctx = mapping.build_request({"method": "GET", "headers": None, "uri": None}, default_app="shop")
    assert req.uri == b"/" and req.content_length == -1 and req.application == "shop"
    assert list(req.headers) == [] and not req.body_truncated


@pytest.mark.parametrize("overrides,message", [
    ({"method": None}, "'method' is missing"),
    ({"src_port": "80"}, "port number"),
    ({"src_port": 70000}, "port number"),
    ({"ignore": "942100 abc"}, "not a rule id"),
    ({"ignore": "0"}, "not a rule id"),
    ({"headers": encode_hdrs_bin([(b"content-length", b"ten")])}, "content-length"),
    ({"method": 5}, "should be a string"),
])
def test_invalid_arguments_are_refused(overrides, message):
    with pytest.raises(mapping.InvalidMessage, match=message):
        mapping.build_request(_args(**overrides))


@given(st.lists(st.tuples(st.binary(min_size=1, max_size=40), st.binary(max_size=300)), max_size=20))
@settings(max_examples=100, deadline=None)
def test_any_header_bytes_survive_mapping(headers):
    headers = [(n, v) for n, v in headers if n.lower() != b"content-length"]
    req, _ = mapping.build_request(_args(headers=encode_hdrs_bin(headers)))
    assert [(h.name, h.value) for h in req.headers] == headers


def _vars(actions):
    assert all(isinstance(a, SetVar) and a.scope == Scope.TRANSACTION for a in actions)
    return {a.name: a.value for a in actions}


def test_blocking_verdict_becomes_variables():
    verdict = waf_pb2.Verdict(intervention=True, status=403, action=waf_pb2.ACTION_DENY, matches=[
        waf_pb2.RuleMatch(id=942100, message="SQL Injection"), waf_pb2.RuleMatch(id=949110, message="score")])
    assert _vars(mapping.verdict_actions(verdict)) == {
        "intervention": 1, "status": 403, "action": "deny", "rules": "942100 949110", "message": "SQL Injection"}


def test_redirect_and_pass_verdicts():
    redirect = waf_pb2.Verdict(intervention=True, status=302, action=waf_pb2.ACTION_REDIRECT,
                               redirect_url="https://example.com/blocked")
    assert _vars(mapping.verdict_actions(redirect))["redirect"] == "https://example.com/blocked"
    passed = _vars(mapping.verdict_actions(waf_pb2.Verdict(action=waf_pb2.ACTION_PASS)))
    assert passed == {"intervention": 0, "status": 0, "action": "pass"}


@pytest.mark.parametrize("closed", [True, False])
def test_failure_policy_is_explicit_and_flagged(closed):
    got = _vars(mapping.failure_actions("no verdict within the deadline", closed))
    assert got["failed"] == 1 and got["error"] == "no verdict within the deadline"
    assert got["intervention"] == int(closed) and got["status"] == (503 if closed else 0)
