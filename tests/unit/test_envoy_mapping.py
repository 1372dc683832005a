"""Envoy's messages to the engine and back, without sockets: the shared
mapping (wafsvc/envoy_map.py), ext_authz's request (wafsvc/envoy_authz.py)
and the ext_proc stream's state machine (wafsvc/envoy_extproc.py) on a real
libmodsecurity engine with a few rules."""

from __future__ import annotations

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from wafapi import waf_pb2
from wafsvc import envoy_authz, envoy_map
from wafsvc.config import REPO_RULES
from wafsvc.engine import Engine
from wafsvc.envoy_extproc import Exchange
from wafsvc.errors import EvaluationFailed
from wafsvc.metrics import ObservedEngine
from wafsvc.rules import RuleSetSpec

Mode = processing_mode_pb2.ProcessingMode
RULES = """
SecRule ARGS "@contains attack" "id:1001,phase:2,deny,status:403,log"
SecRule REQUEST_HEADERS:x-probe "@streq caf\xe9" "id:1002,phase:1,deny,status:406,log"
SecRule REQUEST_BODY "@contains EVIL" "id:1003,phase:2,deny,status:403,log"
SecRule RESPONSE_BODY "@contains leaked-secret" "id:1004,phase:4,deny,status:403,log"
SecRule REMOTE_ADDR "@streq 203.0.113.9" "id:1005,phase:1,deny,status:403,log"
"""


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    rules = tmp_path_factory.mktemp("rules") / "envoy.conf"
    rules.write_bytes(RULES.encode("latin-1"))
    engine = Engine({"": RuleSetSpec(base_conf=str(REPO_RULES / "modsecurity.conf"), rules_file=str(rules))})
    return ObservedEngine(engine, None)


def headers(*pairs) -> base_pb2.HeaderMap:
    return base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v if isinstance(v, bytes) else v.encode())
                                       for k, v in pairs])


def request_headers(path="/", method="GET", extra=(), eos=True, config=None, source=None) -> pb.ProcessingRequest:
    msg = pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=headers(
        (":method", method), (":path", path), (":authority", "shop.example.com"), (":scheme", "http"),
        ("x-request-id", "rid-1"), *extra), end_of_stream=eos))
    if config is not None:
        msg.protocol_config.CopyFrom(config)
    if source:
        msg.attributes[envoy_map_key()].fields["source.address"].string_value = source
    return msg


def envoy_map_key() -> str:
    from wafsvc.envoy_extproc import ATTRIBUTES_KEY
    return ATTRIBUTES_KEY


def body(kind: str, data: bytes, eos: bool) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(**{kind: pb.HttpBody(body=data, end_of_stream=eos)})


def response_headers(status=200, eos=False) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=headers(
        (":status", str(status)), ("content-type", "text/html")), end_of_stream=eos))


FORM = ("content-type", "application/x-www-form-urlencoded")
STREAMED = pb.ProtocolConfiguration(request_body_mode=Mode.STREAMED, response_body_mode=Mode.BUFFERED)


def run(engine, messages) -> list[pb.ProcessingResponse]:
    """Answers each message in turn, as the servicer does, stopping after an immediate response."""
    exchange = Exchange(engine, "", ())
    answers = []
    try:
        for msg in messages:
            answers.append(exchange.handle(msg))
            if answers[-1].HasField("immediate_response"):
                break
    finally:
        exchange.close()
    return answers


def kinds(answers) -> list[str]:
    return [a.WhichOneof("response") for a in answers]


# -- the shared mapping --------------------------------------------------------

def test_raw_value_wins_and_string_values_are_utf8():
    assert envoy_map.header_bytes(base_pb2.HeaderValue(key="x", raw_value=b"caf\xe9", value="ignored")) == \
        (b"x", b"caf\xe9")
    assert envoy_map.header_bytes(base_pb2.HeaderValue(key="x", value="café")) == (b"x", "café".encode())


def test_request_line_takes_pseudo_headers_and_makes_authority_the_host():
    line = envoy_map.RequestLine([(b":method", b"POST"), (b":path", b"/a?b=%ff"), (b":authority", b"h:1"),
                                  (b":scheme", b"http"), (b"x-request-id", b"r1"), (b"cookie", b"a=b")])
    assert (line.method, line.path, line.request_id) == ("POST", b"/a?b=%ff", "r1")
    assert line.headers == [(b"host", b"h:1"), (b"x-request-id", b"r1"), (b"cookie", b"a=b")]


def test_request_line_without_method_is_refused():
    with pytest.raises(EvaluationFailed) as caught:
        envoy_map.RequestLine([(b":path", b"/")])
    assert caught.value.reason == waf_pb2.FIELD_INVALID


def test_selection_from_grpc_metadata():
    assert envoy_map.selection([("x-waf-app", "shop"), ("x-waf-ignore-rules", "942100, 920350")]) == \
        ("shop", (942100, 920350))
    assert envoy_map.selection(None) == ("", ())
    with pytest.raises(EvaluationFailed) as caught:
        envoy_map.selection([("x-waf-ignore-rules", "all")])
    assert caught.value.reason == waf_pb2.IGNORE_LIST_REFUSED


def test_a_status_envoy_cannot_send_becomes_403():
    assert envoy_map.deny_status(waf_pb2.Verdict(status=406)) == 406
    assert envoy_map.deny_status(waf_pb2.Verdict(status=418)) == 403   # not in Envoy's StatusCode enum
    assert envoy_map.deny_status(waf_pb2.Verdict(status=0)) == 403


# -- ext_authz -----------------------------------------------------------------

def check_request(**http) -> external_auth_pb2.CheckRequest:
    req = external_auth_pb2.CheckRequest()
    req.attributes.request.http.MergeFrom(attribute_context_pb2.AttributeContext.HttpRequest(**http))
    req.attributes.source.address.socket_address.address = "198.51.100.4"
    req.attributes.source.address.socket_address.port_value = 4242
    return req


def test_check_request_with_raw_headers_and_a_partial_body():
    req = envoy_authz.evaluate_request(check_request(
        id="7", method="POST", path="/f?x=1", host="shop", protocol="HTTP/2", raw_body=b"a=\xff", size=9000,
        header_map=headers(("x-probe", b"caf\xe9"), ("x-request-id", "rid"),
                           ("x-envoy-auth-partial-body", "true"))), app="shop", ignore_rule_ids=(1,))
    assert (req.method, req.uri, req.http_version, req.body, req.transaction_id) == ("POST", b"/f?x=1", "2", b"a=\xff",
                                                                                    "rid")
    assert (req.application, list(req.ignore_rule_ids), req.client_ip, req.client_port) == ("shop", [1],
                                                                                            "198.51.100.4", 4242)
    assert req.body_truncated and req.content_length == 9000
    assert (b"x-probe", b"caf\xe9") in [(h.name, h.value) for h in req.headers]
    assert req.headers[0].name == b"host" and req.headers[0].value == b"shop"


def test_check_request_with_string_headers_and_a_whole_body():
    req = envoy_authz.evaluate_request(check_request(method="GET", path="/", headers={"x-a": "b"}, size=0))
    assert [(h.name, h.value) for h in req.headers] == [(b"x-a", b"b")]
    assert not req.body_truncated


def test_denied_response_carries_status_and_rules():
    verdict = waf_pb2.Verdict(intervention=True, status=406, action=waf_pb2.ACTION_DENY)
    verdict.matches.add(id=1002)
    verdict.matches.add(id=949110)
    answer = envoy_authz.denied(verdict)
    assert answer.status.code == 7   # PERMISSION_DENIED
    assert answer.denied_response.status.code == 406
    assert answer.denied_response.headers[0].header.key == "x-waf-rules"
    assert answer.denied_response.headers[0].header.value == "1002 949110"


# -- ext_proc: one transaction per stream, one answer per message ---------------

def test_a_get_and_its_response_each_message_answered_in_kind(engine):
    answers = run(engine, [request_headers(config=STREAMED), response_headers(),
                           body("response_body", b"<p>hello</p>", True)])
    assert kinds(answers) == ["request_headers", "response_headers", "response_body"]
    assert all(not a.request_headers.HasField("response") for a in answers[:1])   # CONTINUE, no mutation


def test_a_block_in_the_headers_does_not_wait_for_the_body(engine):
    answers = run(engine, [request_headers(method="POST", extra=[("x-probe", b"caf\xe9")], eos=False,
                                           config=STREAMED), body("request_body", b"x", True)])
    assert kinds(answers) == ["immediate_response"]
    immediate = answers[0].immediate_response
    assert immediate.status.code == 406
    assert immediate.headers.set_headers[0].header.raw_value == b"1002"


def test_streamed_chunks_are_inspected_as_they_come_and_the_block_comes_at_the_end(engine):
    chunks = [b"a" * 65536] * 20 + [b"&q=EVIL"]
    messages = [request_headers(method="POST", eos=False, config=STREAMED)]
    messages += [body("request_body", c, i == len(chunks) - 1) for i, c in enumerate(chunks)]
    answers = run(engine, messages)
    assert kinds(answers) == ["request_headers"] + ["request_body"] * 20 + ["immediate_response"]
    assert answers[-1].immediate_response.headers.set_headers[0].header.raw_value == b"1003"


def test_buffered_mode_ends_the_request_with_its_one_body_message(engine):
    config = pb.ProtocolConfiguration(request_body_mode=Mode.BUFFERED, response_body_mode=Mode.BUFFERED)
    answers = run(engine, [request_headers(method="POST", eos=False, config=config, extra=[FORM]),
                           body("request_body", b"q=attack", True)])
    assert kinds(answers) == ["request_headers", "immediate_response"]


def test_a_partial_buffer_is_inspected_and_flagged_as_truncated(engine):
    config = pb.ProtocolConfiguration(request_body_mode=Mode.BUFFERED_PARTIAL, response_body_mode=Mode.BUFFERED)
    answers = run(engine, [request_headers(method="POST", eos=False, config=config),
                           body("request_body", b"q=fine", False)])
    assert kinds(answers) == ["request_headers", "immediate_response"]    # WAF_TRUNCATED_BODY=block, the default
    assert answers[1].immediate_response.headers.set_headers[0].header.raw_value == b"99010"


def test_a_leak_in_the_response_body_is_replaced(engine):
    answers = run(engine, [request_headers(config=STREAMED), response_headers(),
                           body("response_body", b"<p>leaked-secret</p>", True)])
    assert kinds(answers) == ["request_headers", "response_headers", "immediate_response"]
    assert answers[-1].immediate_response.headers.set_headers[0].header.raw_value == b"1004"


def test_the_client_address_comes_from_envoys_attributes(engine):
    answers = run(engine, [request_headers(config=STREAMED, source="203.0.113.9:5555")])
    assert kinds(answers) == ["immediate_response"]


def test_trailers_are_acknowledged_and_end_the_request(engine):
    answers = run(engine, [request_headers(method="POST", eos=False, config=STREAMED),
                           body("request_body", b"q=ok", False),
                           pb.ProcessingRequest(request_trailers=pb.HttpTrailers()), response_headers(eos=True)])
    assert kinds(answers) == ["request_headers", "request_body", "request_trailers", "response_headers"]


@pytest.mark.parametrize("mode", [Mode.FULL_DUPLEX_STREAMED, Mode.GRPC])
def test_body_modes_that_need_mutations_are_refused(engine, mode):
    with pytest.raises(EvaluationFailed) as caught:
        run(engine, [request_headers(config=pb.ProtocolConfiguration(request_body_mode=mode))])
    assert caught.value.code == "FAILED_PRECONDITION"


def test_observability_mode_is_refused(engine):
    msg = request_headers(config=STREAMED)
    msg.observability_mode = True
    with pytest.raises(EvaluationFailed):
        run(engine, [msg])


def test_a_body_before_the_headers_is_refused(engine):
    with pytest.raises(EvaluationFailed):
        run(engine, [body("request_body", b"x", True)])


def test_debug_headers_list_every_match_of_the_transaction(engine):
    exchange = Exchange(engine, "", (), debug=True)
    try:
        exchange.handle(request_headers(path="/?q=attack", config=pb.ProtocolConfiguration(
            request_body_mode=Mode.STREAMED, response_body_mode=Mode.BUFFERED)))
    finally:
        exchange.close()
    assert exchange.matched == [1001]


def test_debug_headers_go_on_the_answer_that_ends_the_response(engine, tmp_path):
    detect = Engine({"": RuleSetSpec(base_conf=str(REPO_RULES / "modsecurity.conf"), mode="detect",
                                     extra_directives='SecRule ARGS "@contains attack" "id:1001,phase:2,deny,log"')})
    exchange = Exchange(ObservedEngine(detect, None), "", (), debug=True)
    try:
        answers = [exchange.handle(m) for m in (request_headers(path="/?q=attack", config=STREAMED),
                                                 response_headers(), body("response_body", b"<p>ok</p>", True))]
    finally:
        exchange.close()
    assert kinds(answers) == ["request_headers", "response_headers", "response_body"]
    added = {h.header.key: h.header.raw_value for h in answers[-1].response_body.response.header_mutation.set_headers}
    assert added["x-waf-rules"] == b"1001"
    assert added["x-waf-transaction-id"] == b"rid-1"


def test_connect_takes_the_authority_as_its_uri():
    line = envoy_map.RequestLine([(b":method", b"CONNECT"), (b":authority", b"example.com:443")])
    assert line.path == b"example.com:443"


def test_envoys_own_reply_to_a_refused_request_passes_untouched(engine):
    """Envoy answers 400 itself to a request it refuses before the filters,
    then runs the response through ext_proc: no request headers came."""
    answers = run(engine, [response_headers(status=400), body("response_body", b"Bad Request", True)])
    assert kinds(answers) == ["response_headers", "response_body"]


def test_a_body_over_wafsvcs_limit_is_cut_and_judged_as_truncated():
    req = envoy_authz.evaluate_request(check_request(method="POST", path="/", raw_body=b"a" * 100, size=100),
                                       max_body_bytes=64)
    assert len(req.body) == 64 and req.body_truncated


def test_an_odd_request_id_is_not_the_transaction_id():
    assert envoy_map.transaction_id("4399dee2-9ddc-4328-bab1-fedd7360ffb1") == "4399dee2-9ddc-4328-bab1-fedd7360ffb1"
    assert envoy_map.transaction_id("x" * 300) == ""
    assert envoy_map.transaction_id("a\x00b") == ""
