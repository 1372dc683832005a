"""SPOE arguments -> EvaluateRequest, and verdicts -> set-var actions."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given, settings, strategies as st

from gateway import mapping, setvars
from gateway.spop import Int32, Scope, SetVar, encode_hdrs_bin
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
    req, ctx = mapping.build_request({"method": "GET", "headers": b"\x00\x00", "uri": "/x", "body": None},
                                     default_app="shop")
    assert req.uri == b"/x" and req.content_length == -1 and req.application == "shop"
    assert list(req.headers) == [] and not req.body_truncated and req.http_version == "1.1"


P = mapping.Problem


@pytest.mark.parametrize("overrides,problem,argument,text", [
    ({"method": None}, P.NULL_ARGUMENT, "method", "'method' is NULL"),
    ({"uri": None}, P.NULL_ARGUMENT, "uri", "'uri' is NULL"),
    ({"headers": None}, P.NULL_ARGUMENT, "headers", "'headers' is NULL"),
    ({"uri": ""}, P.BAD_VALUE, "uri", "'uri' is empty"),
    ({"src_port": "80"}, P.WRONG_TYPE, "src_port", "should be a port number"),
    ({"src_port": 70000}, P.BAD_VALUE, "src_port", "port number"),
    ({"ignore": "942100 abc"}, P.BAD_VALUE, "ignore", "not a rule id"),
    ({"ignore": "0"}, P.BAD_VALUE, "ignore", "not a rule id"),
    ({"headers": encode_hdrs_bin([(b"content-length", b"ten")])}, P.BAD_VALUE, "headers", "content-length"),
    ({"headers": "host: example.com\r\n"}, P.BAD_VALUE, "headers", "not a req.hdrs_bin block"),
    ({"method": 5}, P.WRONG_TYPE, "method", "should be a string"),
    ({"uri": IPv4Address("10.0.0.1")}, P.WRONG_TYPE, "uri", "should be a string or binary"),
])
def test_invalid_arguments_are_refused_with_a_typed_problem(overrides, problem, argument, text):
    with pytest.raises(mapping.InvalidMessage, match=text) as caught:
        mapping.build_request(_args(**overrides))
    error = caught.value
    assert (error.problem, error.message, error.argument) == (problem, "check-request", argument)
    assert "spoe-message check-request" in str(error) and error.hint


@pytest.mark.parametrize("name", ["method", "uri", "headers", "body"])
def test_a_message_without_a_required_argument_is_never_evaluated(name):
    """A misspelt argument (uri -> url) must not become an empty request:
    '/' with no headers would pass every rule."""
    args = _args()
    args["url" if name == "uri" else name + "x"] = args.pop(name)
    with pytest.raises(mapping.InvalidMessage) as caught:
        mapping.build_request(args)
    error = caught.value
    assert (error.problem, error.argument) == (P.MISSING_ARGUMENT, name)
    assert f"{name}=" in error.hint and "spoe-message check-request" in error.hint


def test_unknown_arguments_are_ignored_and_reported():
    req, _, unknown = mapping.map_message({**_args(), "url": "/other", "colour": "blue"}, mapping.CHECK_REQUEST)
    assert req.uri == b"/a?b=%27" and unknown == ["url", "colour"]


# -- the original agent's message (README, "Migrating from the original agent")

def _original(**overrides):
    args = {"method": "POST", "path": "/search", "query": "q=%27or%201=1", "reqver": "1.1",
            "ip": IPv4Address("192.0.2.7"),
            "reqhdrs": encode_hdrs_bin([(b"host", b"shop.example"), (b"content-length", b"3")]),
            "reqbody": b"a=1", "ignorerules": "942100 920350"}
    args.update(overrides)
    return list(args.items())


def test_original_message_maps_like_check_request():
    req, ctx = mapping.build_request(_original(), schema=mapping.ORIGINAL)
    assert req.uri == b"/search?q=%27or%201=1"          # raw: never decoded
    assert (req.method, req.http_version, req.client_ip) == ("POST", "1.1", "192.0.2.7")
    assert [(h.name, h.value) for h in req.headers] == [(b"host", b"shop.example"), (b"content-length", b"3")]
    assert req.body == b"a=1" and req.content_length == 3 and not req.body_truncated
    assert list(req.ignore_rule_ids) == [942100, 920350] and ctx.host == "shop.example"
    same, _ = mapping.build_request({"method": "POST", "uri": "/search?q=%27or%201=1", "ver": "1.1",
                                     "src": IPv4Address("192.0.2.7"), "headers": dict(_original())["reqhdrs"],
                                     "body": b"a=1", "ignore": "942100 920350"})
    assert req == same


@pytest.mark.parametrize("query,uri", [(None, b"/search"), ("", b"/search?"), ("a=%2F&b", b"/search?a=%2F&b")])
def test_original_message_query_is_appended_only_when_the_url_has_one(query, uri):
    req, _ = mapping.build_request(_original(query=query), schema=mapping.ORIGINAL)
    assert req.uri == uri


@pytest.mark.parametrize("drop,argument,problem", [
    ("path", "path", P.MISSING_ARGUMENT), ("query", "query", P.MISSING_ARGUMENT),
    ("reqhdrs", "reqhdrs", P.MISSING_ARGUMENT), ("reqbody", "reqbody", P.MISSING_ARGUMENT),
    ("method", "method", P.MISSING_ARGUMENT),
])
def test_original_message_without_what_the_engine_needs_is_refused(drop, argument, problem):
    args = [(n, v) for n, v in _original() if n != drop]
    with pytest.raises(mapping.InvalidMessage) as caught:
        mapping.build_request(args, schema=mapping.ORIGINAL)
    assert (caught.value.problem, caught.value.argument, caught.value.message) == (problem, argument, "modsecurity")


def test_original_message_reports_its_own_argument_names():
    with pytest.raises(mapping.InvalidMessage) as caught:
        mapping.build_request(_original(reqhdrs=5), schema=mapping.ORIGINAL)
    assert caught.value.argument == "reqhdrs" and "'reqhdrs' should be" in str(caught.value)
    with pytest.raises(mapping.InvalidMessage) as caught:
        mapping.build_request(_original(path=None), schema=mapping.ORIGINAL)
    assert caught.value.problem is P.NULL_ARGUMENT and caught.value.argument == "path"


@given(st.lists(st.tuples(st.binary(min_size=1, max_size=40), st.binary(max_size=300)), max_size=20))
@settings(max_examples=100, deadline=None)
def test_any_header_bytes_survive_mapping(headers):
    headers = [(n, v) for n, v in headers if n.lower() != b"content-length"]
    req, _ = mapping.build_request(_args(headers=encode_hdrs_bin(headers)))
    assert [(h.name, h.value) for h in req.headers] == headers


def _vars(actions):
    """The txn variables; the session one must mirror txn.intervention."""
    assert all(isinstance(a, SetVar) for a in actions)
    txn = {a.name: a.value for a in actions if a.scope == Scope.TRANSACTION}
    session = [a for a in actions if a.scope == Scope.SESSION]
    assert len(session) == 1 and session[0].name == "intervention"
    assert type(session[0].value) is Int32 and session[0].value == txn["intervention"]
    assert actions.index(session[0]) < setvars.DECISION_VARS   # kept when an ACK is too big
    return txn


def test_blocking_verdict_becomes_variables():
    verdict = waf_pb2.Verdict(intervention=True, status=403, action=waf_pb2.ACTION_DENY, matches=[
        waf_pb2.RuleMatch(id=942100, message="SQL Injection"), waf_pb2.RuleMatch(id=949110, message="score")])
    assert _vars(setvars.verdict_actions(verdict)) == {
        "intervention": 1, "status": 403, "action": "deny", "rules": "942100 949110", "message": "SQL Injection"}


def test_redirect_and_pass_verdicts():
    redirect = waf_pb2.Verdict(intervention=True, status=302, action=waf_pb2.ACTION_REDIRECT,
                               redirect_url="https://example.com/blocked")
    assert _vars(setvars.verdict_actions(redirect))["redirect"] == "https://example.com/blocked"
    passed = _vars(setvars.verdict_actions(waf_pb2.Verdict(action=waf_pb2.ACTION_PASS)))
    assert passed == {"intervention": 0, "status": 0, "action": "pass"}


@pytest.mark.parametrize("closed", [True, False])
def test_failure_policy_is_explicit_and_flagged(closed):
    got = _vars(setvars.failure_actions("no verdict within the deadline", closed))
    assert got["failed"] == 1 and got["error"] == "no verdict within the deadline"
    assert got["intervention"] == int(closed) and got["status"] == (503 if closed else 0)


def test_a_refused_message_still_reports_its_unknown_arguments():
    args = _args()
    args["url"] = args.pop("uri")
    with pytest.raises(mapping.InvalidMessage) as caught:
        mapping.build_request(args)
    assert caught.value.unknown == ["url"] and caught.value.argument == "uri"
