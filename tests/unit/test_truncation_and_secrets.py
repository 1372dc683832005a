"""Truncated bodies are never passed silently; secrets and TLS settings are checked."""

from __future__ import annotations

import pytest

from common.options import ConfigError
from common.secrets import read_secret
from gateway import mapping
from gateway.config import GatewayConfig
from gateway.spop import Int64, encode_hdrs_bin
from wafapi import waf_pb2
from wafsvc.config import WafConfig
from common.options import ConfigError
from wafsvc.apps import Application, Applications, check
from wafsvc.engine import TRUNCATED_BODY_RULE_ID, Engine
from wafsvc.rules import RuleSetSpec
from wafsvc.config import REPO_RULES

BUF = 65536


# -- detection in the gateway ------------------------------------------------

@pytest.mark.parametrize("body_len,content_length,body_size,cut", [
    (100, 100, 100, False),        # complete, Content-Length
    (64366, 70000, 70000, True),   # Content-Length larger than what arrived
    (64353, -1, 72000, True),      # chunked: HAProxy parsed more than it handed over
    (64000, -1, 64000, False),     # chunked, complete, close to the limit (measured)
    (64353, -1, 64353, True),      # chunked, client paused exactly at a full buffer
    (0, -1, -1, False),            # GET without body
    (64353, -1, -1, True),         # HAProxy without the body_size argument, full buffer
])
def test_body_was_cut(body_len, content_length, body_size, cut):
    assert mapping.body_was_cut(body_len, content_length, body_size, 35, BUF) is cut


def test_guess_from_a_full_buffer_can_be_switched_off():
    assert not mapping.body_was_cut(64353, -1, 64353, 35, 0)
    assert mapping.body_was_cut(64353, -1, 70000, 35, 0)  # the evidence still counts


def test_chunked_request_flagged_from_body_size_argument():
    headers = encode_hdrs_bin([(b"host", b"x"), (b"transfer-encoding", b"chunked")])
    args = {"method": "POST", "uri": "/", "headers": headers, "body": b"a" * 1000,
            "body_size": Int64(5000)}
    req, ctx = mapping.build_request(args, "", BUF)
    assert req.body_truncated and ctx.body_truncated and req.content_length == -1
    args["body_size"] = Int64(1000)
    assert not mapping.build_request(args, "", BUF)[0].body_truncated


def test_body_size_of_the_wrong_type_is_an_invalid_message():
    with pytest.raises(mapping.InvalidMessage):
        mapping.build_request({"method": "POST", "uri": "/", "headers": b"\x00\x00", "body": None,
                               "body_size": "12"})


# -- the policy in wafsvc ---------------------------------------------------

@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    rules = tmp_path_factory.mktemp("rules") / "probe.conf"
    rules.write_text('SecRule ARGS:attack "@streq yes" "id:10001,phase:2,deny,status:406,log,msg:\'probe\'"\n')
    base = str(REPO_RULES / "modsecurity.conf")
    spec = RuleSetSpec(base_conf=base, rules_file=str(rules))
    detect = RuleSetSpec(base_conf=base, rules_file=str(rules), mode="detect")

    def engine(spec, **policy):
        return Engine(Applications({"default": Application("default", spec, **policy)}, "default"))
    return {"block": engine(spec, truncated_body="block"), "allow": engine(spec, min_inspected=0),
            "floor": engine(spec), "detect": engine(detect, truncated_body="block")}


def _request(body: bytes, truncated: bool, content_length: int = -1) -> waf_pb2.EvaluateRequest:
    return waf_pb2.EvaluateRequest(
        method="POST", uri=b"/form", http_version="1.1", client_ip="10.0.0.1",
        headers=[waf_pb2.Header(name=b"host", value=b"x"),
                 waf_pb2.Header(name=b"content-type", value=b"application/x-www-form-urlencoded")],
        body=body, body_truncated=truncated, content_length=content_length)


def test_truncated_body_is_blocked_by_the_block_policy_with_a_visible_reason(engines):
    verdict = engines["block"].evaluate(_request(b"a=1", True, 70000))
    assert verdict.intervention and verdict.status == 403 and verdict.action == waf_pb2.ACTION_DENY
    assert [m.id for m in verdict.matches] == [TRUNCATED_BODY_RULE_ID]
    assert verdict.matches[0].message == "request body truncated before inspection"
    assert "3 bytes inspected, 70000 declared" == verdict.matches[0].matched_data


def test_truncated_body_passed_by_the_pass_policy_is_still_reported(engines):
    verdict = engines["allow"].evaluate(_request(b"a=1", True))
    assert not verdict.intervention and verdict.action == waf_pb2.ACTION_PASS
    assert [m.id for m in verdict.matches] == [TRUNCATED_BODY_RULE_ID] and verdict.body_truncated
    assert "no Content-Length" in verdict.matches[0].matched_data


def test_pass_needs_min_inspected_bytes_by_default(engines):
    """A body cut after a few bytes was not cut for its size (HAProxy had not
    read it: no `option http-buffer-request`): it is denied, and says why."""
    short = engines["floor"].evaluate(_request(b"a=1", True, 70000))
    assert short.intervention and short.status == 403 and short.matches[-1].id == TRUNCATED_BODY_RULE_ID
    assert "too few to pass it (min_inspected 16384)" in short.matches[-1].message
    long = engines["floor"].evaluate(_request(b"a=" + b"b" * 16382, True, 70000))
    assert not long.intervention and long.matches[-1].id == TRUNCATED_BODY_RULE_ID
    assert long.matches[-1].message == "request body truncated before inspection"


def test_what_arrived_is_inspected_and_its_verdict_kept(engines):
    for policy in ("block", "allow", "floor"):
        verdict = engines[policy].evaluate(_request(b"attack=yes", True, 99999))
        assert verdict.intervention and verdict.status == 406  # the rule's own status wins
        assert [m.id for m in verdict.matches] == [10001, TRUNCATED_BODY_RULE_ID]


def test_detect_mode_reports_but_never_denies(engines):
    verdict = engines["detect"].evaluate(_request(b"a=1", True, 70000))
    assert not verdict.intervention and TRUNCATED_BODY_RULE_ID in [m.id for m in verdict.matches]


def test_complete_body_gets_no_truncation_match(engines):
    verdict = engines["block"].evaluate(_request(b"a=1", False, 3))
    assert not verdict.intervention and not verdict.matches


def test_engine_refuses_unknown_policy():
    with pytest.raises(ValueError):
        Engine({}, truncated_body="maybe")
    with pytest.raises(ConfigError, match="truncated_body must be pass or block"):
        check(Application("x", RuleSetSpec(base_conf="b", extra_directives="SecRuleEngine On"),
                          truncated_body="allow"), "here")


# -- settings and secrets ---------------------------------------------------

def test_read_secret(tmp_path):
    good = tmp_path / "token"
    good.write_text("  s3cr3t-t0ken\n")
    assert read_secret(str(good)) == "s3cr3t-t0ken"
    for bad in ("", "\n", "two words", "tab\there"):
        path = tmp_path / "bad"
        path.write_text(bad)
        with pytest.raises(ValueError):
            read_secret(str(path))


def test_tls_settings_are_checked(tmp_path):
    pem = tmp_path / "x.pem"
    pem.write_text("not used")
    rules = str(REPO_RULES / "block-localhost.conf")
    with pytest.raises(ConfigError, match="WAF_TLS_CERT and WAF_TLS_KEY"):
        WafConfig(rules=rules, tls_cert=str(pem))
    with pytest.raises(ConfigError, match="mutual TLS"):
        WafConfig(rules=rules, tls_client_ca=str(pem))
    with pytest.raises(ConfigError, match="does not exist"):
        WafConfig(rules=rules, token_file=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="GATEWAY_TLS_CERT and GATEWAY_TLS_KEY"):
        GatewayConfig(tls_ca=str(pem), tls_cert=str(pem))
    with pytest.raises(ConfigError, match="needs TLS"):
        GatewayConfig(tls_server_name="wafsvc")
    assert GatewayConfig(tls_ca=str(pem)).tls and not GatewayConfig().tls
    with pytest.raises(ConfigError, match="FRAME_TIMEOUT"):
        GatewayConfig(frame_timeout_ms=0)


# -- any argument value HAProxy could send maps or is refused cleanly -------

from ipaddress import IPv4Address, IPv6Address  # noqa: E402

from hypothesis import given, settings, strategies as st  # noqa: E402

from gateway.spop import Int32, UInt32, UInt64, SpopError  # noqa: E402

_text_or_bytes = st.one_of(st.text(), st.binary(),
                           st.binary().map(lambda b: b.decode("utf-8", "surrogateescape")))
_any_value = st.one_of(st.none(), st.booleans(), _text_or_bytes,
                       st.integers(-(1 << 31), (1 << 31) - 1).map(Int32),
                       st.integers(0, (1 << 32) - 1).map(UInt32),
                       st.integers(-(1 << 63), (1 << 63) - 1).map(Int64),
                       st.integers(0, (1 << 64) - 1).map(UInt64),
                       st.integers(0, (1 << 32) - 1).map(IPv4Address),
                       st.integers(0, (1 << 128) - 1).map(IPv6Address))
_ARGS = ("id", "app", "src", "src_port", "dst", "dst_port", "method", "uri", "ver", "headers",
         "body", "ignore", "frontend", "body_size")


@settings(max_examples=400, deadline=None)
@given(st.fixed_dictionaries({}, optional={name: _any_value for name in _ARGS}))
def test_hostile_argument_values_map_or_raise_invalid_message(args):
    """Anything else escaping build_request would abort the HAProxy connection
    and every request pipelined on it; a request must also serialize."""
    try:
        request, _ = mapping.build_request(args, "", BUF)
    except mapping.InvalidMessage as exc:
        assert exc.problem in mapping.Problem and exc.message == "check-request"
        return
    assert request.SerializeToString() is not None


def test_invalid_utf8_in_string_arguments_is_kept_visible():
    raw = b"G\xffT".decode("utf-8", "surrogateescape")
    request, _ = mapping.build_request({"method": raw, "id": b"id-\xfe", "uri": b"/\xff\x00",
                                        "headers": b"\x00\x00", "body": None})
    assert request.method == "G\\xffT" and request.transaction_id == "id-\\xfe"
    assert request.uri == b"/\xff\x00"  # bytes fields stay byte-exact


def test_rule_message_quoting_non_utf8_bytes_still_gives_a_verdict(tmp_path):
    """The binding cannot decode such messages; the verdict must survive it."""
    from wafsvc.engine import UNDECODABLE
    rules = tmp_path / "quote.conf"
    rules.write_text('SecRule REQUEST_HEADERS:x-probe "@contains evil" '
                     '"id:10002,phase:1,deny,status:403,log,msg:\'saw %{MATCHED_VAR}\',logdata:\'%{MATCHED_VAR}\'"\n')
    engine = Engine({"": RuleSetSpec(base_conf=str(REPO_RULES / "modsecurity.conf"), rules_file=str(rules))})
    request = waf_pb2.EvaluateRequest(method="GET", uri=b"/", client_ip="10.0.0.1",
                                      headers=[waf_pb2.Header(name=b"x-probe", value=b"\xff\xfeevil\xc3\x28")])
    verdict = engine.evaluate(request)
    assert verdict.intervention and verdict.status == 403
    assert verdict.matches[0].id == 10002 and verdict.matches[0].message == UNDECODABLE
    assert verdict.SerializeToString()
