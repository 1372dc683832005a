"""wafsvc as the boundary, over real gRPC: every field probed with a NUL byte
(and other bytes the engine could cut or misread) with an attack behind it
is refused with its ErrorReason, or inspected whole and denied; each limit
is enforced; new ignore lists are rate-limited; and reflection is enough to
call the API without generated stubs (what grpcurl does)."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from tests.e2e.wafsvc_only import start_wafsvc, target
from wafapi import waf_pb2, waf_pb2_grpc

# The attack marker in every variable the engine has, so that whatever
# reaches the engine after a cut would be seen.
RULES = """\
SecRule REQUEST_LINE|REQUEST_METHOD|REQUEST_URI_RAW|ARGS|ARGS_NAMES|REQUEST_HEADERS|REQUEST_HEADERS_NAMES|\
REQUEST_BODY|REMOTE_ADDR|SERVER_ADDR|REQUEST_PROTOCOL|UNIQUE_ID "@contains attack" \\
    "id:1001,phase:2,t:none,deny,status:403,log,msg:'attack marker'"
"""
ATTACK_RULE = 1001


@pytest.fixture(scope="module")
def waf(tmp_path_factory):
    stack = start_wafsvc(tmp_path_factory.mktemp("hardening"), rules=RULES,
                         env={"WAF_IGNORE_NEW_LISTS_PER_MIN": "2", "WAF_IGNORE_PRELOAD": "1001"})
    yield target(stack)
    stack.stop()


@pytest.fixture(scope="module")
def stub(waf):
    with grpc.insecure_channel(waf, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        yield waf_pb2_grpc.WafStub(channel)


def base(**fields) -> waf_pb2.EvaluateRequest:
    req = waf_pb2.EvaluateRequest(method="GET", uri=b"/", client_ip="192.0.2.1", server_ip="192.0.2.2",
                                  content_length=-1, ignore_rule_ids=fields.pop("ignore_rule_ids", ()))
    headers = fields.pop("headers", [(b"host", b"shop")])
    for key, value in fields.items():
        setattr(req, key, value)
    for name, value in headers:
        req.headers.add(name=name, value=value)
    return req


def unary_reason(stub, req) -> tuple[str, str]:
    """(status code name, x-waf-error-reason) of a refused unary call."""
    with pytest.raises(grpc.RpcError) as caught:
        stub.Evaluate(req, timeout=30)
    reason = dict(caught.value.trailing_metadata() or ()).get("x-waf-error-reason", "")
    return caught.value.code().name, reason


def stream_result(stub, req) -> waf_pb2.BatchVerdict:
    batch = waf_pb2.EvaluateBatch(requests=[waf_pb2.BatchRequest(ref=7, request=req)])
    answers = [v for out in stub.EvaluateStream(iter([batch]), timeout=30) for v in out.verdicts]
    assert [a.ref for a in answers] == [7]
    return answers[0]


# Each probe: a field holding bytes the engine might cut or misread, with the
# attack marker behind them. "refused" probes must fail with that reason;
# "whole" probes must be inspected whole, so the marker is found and denied.
PROBES = {
    "uri NUL": (dict(uri=b"/?q=1\x00attack"), "FIELD_HAS_NUL"),
    "uri non-UTF-8": (dict(uri=b"/?q=\xff\xfeattack"), "whole"),
    "uri CR LF": (dict(uri=b"/a\r\nx?q=attack"), "whole"),
    "method NUL": (dict(method="GET\x00attack"), "FIELD_HAS_NUL"),
    "method with a space": (dict(method="GET attack"), "FIELD_INVALID"),
    "method empty": (dict(method=""), "FIELD_INVALID"),
    "uri empty": (dict(uri=b""), "FIELD_INVALID"),
    "header name NUL": (dict(headers=[(b"x-a\x00attack", b"1")]), "FIELD_HAS_NUL"),
    "header value NUL": (dict(headers=[(b"x-a", b"1\x00attack")]), "whole"),
    "header name not a token": (dict(headers=[(b"x a", b"attack")]), "FIELD_INVALID"),
    "header name non-UTF-8": (dict(headers=[(b"x-\xffattack", b"1")]), "FIELD_INVALID"),
    "header name empty": (dict(headers=[(b"", b"attack")]), "FIELD_INVALID"),
    "header value non-UTF-8": (dict(headers=[(b"x-a", b"\xff\xfeattack")]), "whole"),
    "header value CR LF": (dict(headers=[(b"x-a", b"1\r\nattack")]), "whole"),
    "body NUL": (dict(body=b"1\x00attack", headers=[(b"content-type", b"text/plain")]), "whole"),
    "form body NUL": (dict(body=b"a=1\x00attack", headers=[(b"content-type",
                                                             b"application/x-www-form-urlencoded")]), "whole"),
    "body non-UTF-8": (dict(body=b"\xff\xfe attack", headers=[(b"content-type", b"text/plain")]), "whole"),
    "client_ip NUL": (dict(client_ip="192.0.2.1\x00attack"), "FIELD_HAS_NUL"),
    "client_ip not an address": (dict(client_ip="attack"), "FIELD_INVALID"),
    "client_port too big": (dict(client_port=70000), "FIELD_INVALID"),
    "server_ip NUL": (dict(server_ip="192.0.2.2\x00attack"), "FIELD_HAS_NUL"),
    "server_ip not an address": (dict(server_ip="attack.example"), "FIELD_INVALID"),
    "server_port too big": (dict(server_port=1 << 20), "FIELD_INVALID"),
    "transaction_id NUL": (dict(transaction_id="t1\x00attack"), "FIELD_HAS_NUL"),
    "transaction_id too long": (dict(transaction_id="t" * 300), "FIELD_INVALID"),
    "transaction_id text": (dict(transaction_id="attack-7"), "whole"),
    "http_version NUL": (dict(http_version="1.1\x00attack"), "FIELD_HAS_NUL"),
    "http_version text": (dict(http_version="1.1 attack"), "FIELD_INVALID"),
    "application NUL": (dict(application="\x00attack"), "FIELD_HAS_NUL"),
    "content_length negative": (dict(content_length=-7), "FIELD_INVALID"),
    "ignore list too long": (dict(ignore_rule_ids=list(range(1, 66))), "IGNORE_LIST_REFUSED"),
}


@pytest.mark.parametrize("name", sorted(PROBES))
def test_hostile_field_is_refused_or_inspected_whole(stub, name):
    fields, expected = PROBES[name]
    req = base(**fields)
    answer = stream_result(stub, req)
    if expected == "whole":
        verdict = stub.Evaluate(req, timeout=30)
        for v in (verdict, answer.verdict):
            assert v.intervention and v.status == 403 and ATTACK_RULE in [m.id for m in v.matches], v
        return
    assert unary_reason(stub, req) == ("INVALID_ARGUMENT", expected)
    assert answer.WhichOneof("result") == "error"
    assert (answer.error.code, waf_pb2.ErrorReason.Name(answer.error.reason)) == ("INVALID_ARGUMENT", expected)


def test_benign_request_with_every_field_set_passes(stub):
    req = base(transaction_id="7F000001:C0C8_0002", client_port=40000, server_port=443, http_version="2.0",
               uri=b"/search?q=shoes", body=b"\x00\x01 binary", content_length=9, application="",
               headers=[(b"host", b"shop"), (b"content-type", b"application/octet-stream")])
    verdict = stub.Evaluate(req, timeout=30)
    assert not verdict.intervention and verdict.transaction_id == "7F000001:C0C8_0002"


# -- responses of kept transactions ----------------------------------------------

def _kept(stub) -> str:
    verdict = stub.Evaluate(base(uri=b"/page", inspect_response=True), timeout=30)
    assert verdict.transaction_handle, verdict
    return verdict.transaction_handle


@pytest.mark.parametrize("fields, expected", [
    (dict(status=42), "FIELD_INVALID"),
    (dict(headers=[waf_pb2.Header(name=b"x-a\x00b", value=b"1")]), "FIELD_HAS_NUL"),
    (dict(headers=[waf_pb2.Header(name=b"x a", value=b"1")]), "FIELD_INVALID"),
    (dict(http_version="1.1\x00"), "FIELD_HAS_NUL"),
    (dict(transaction_id="t\x00"), "FIELD_HAS_NUL"),
    (dict(headers=[waf_pb2.Header(name=b"x-h%d" % i, value=b"v") for i in range(129)]), "LIMIT_HEADER_COUNT"),
], ids=["status", "header name NUL", "header name not a token", "version NUL", "transaction_id NUL",
        "header count"])
def test_hostile_response_fields_are_refused(stub, fields, expected):
    resp = waf_pb2.ResponseRequest(transaction_handle=_kept(stub), status=fields.pop("status", 200), **fields)
    with pytest.raises(grpc.RpcError) as caught:
        stub.EvaluateResponse(resp, timeout=30)
    assert dict(caught.value.trailing_metadata())["x-waf-error-reason"] == expected


def test_a_long_response_body_is_judged_not_refused(stub):
    # Past WAF_MAX_BODY_BYTES, which bounds requests: the engine inspects the
    # start of a response body itself and flags the rest.
    resp = waf_pb2.ResponseRequest(transaction_handle=_kept(stub), status=200, body=b"r" * (200 * 1024),
                                   headers=[waf_pb2.Header(name=b"content-type", value=b"text/plain")])
    verdict = stub.EvaluateResponse(resp, timeout=30)
    assert verdict.action == waf_pb2.ACTION_PASS


# -- limits ---------------------------------------------------------------------

LIMITS = {
    # name: (at the limit: passes, one over: refused)
    "LIMIT_HEADER_COUNT": (dict(headers=[(b"x-h%d" % i, b"v") for i in range(128)]),
                           dict(headers=[(b"x-h%d" % i, b"v") for i in range(129)])),
    "LIMIT_HEADER_BYTES": (dict(headers=[(b"x-big", b"v" * (80 * 1024 - 5))]),
                           dict(headers=[(b"x-big", b"v" * (80 * 1024 - 4))])),
    "LIMIT_URI_BYTES": (dict(uri=b"/?q=" + b"a" * (80 * 1024 - 4)), dict(uri=b"/?q=" + b"a" * (80 * 1024 - 3))),
    "LIMIT_BODY_BYTES": (dict(body=b"b" * (128 * 1024)), dict(body=b"b" * (128 * 1024 + 1))),
}


@pytest.mark.parametrize("reason", sorted(LIMITS))
def test_each_limit_is_enforced(stub, reason):
    at_limit, over = LIMITS[reason]
    assert not stub.Evaluate(base(**at_limit), timeout=60).intervention
    assert unary_reason(stub, base(**over)) == ("INVALID_ARGUMENT", reason)
    answer = stream_result(stub, base(**over))
    assert waf_pb2.ErrorReason.Name(answer.error.reason) == reason


def test_twenty_thousand_headers_are_refused_before_the_engine(stub):
    req = base(headers=[(b"x-h%d" % i, b"v") for i in range(20000)])
    assert unary_reason(stub, req) == ("INVALID_ARGUMENT", "LIMIT_HEADER_COUNT")


# -- ignore lists ------------------------------------------------------------------

def test_new_ignore_lists_are_rate_limited_and_preloaded_ones_are_free(stub):
    attack = dict(uri=b"/?q=attack")
    # Preloaded (WAF_IGNORE_PRELOAD=1001): always served, never counted.
    for _ in range(5):
        assert not stub.Evaluate(base(ignore_rule_ids=[1001], **attack), timeout=30).intervention
    # The budget is 2 new lists per minute: the third distinct one is refused.
    assert not stub.Evaluate(base(ignore_rule_ids=[1001, 5], **attack), timeout=30).intervention
    assert stub.Evaluate(base(ignore_rule_ids=[6], **attack), timeout=30).intervention
    with pytest.raises(grpc.RpcError) as caught:
        stub.Evaluate(base(ignore_rule_ids=[7], **attack), timeout=30)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert dict(caught.value.trailing_metadata())["x-waf-error-reason"] == "IGNORE_LIST_REFUSED"
    # A list already built is cached and costs nothing.
    assert not stub.Evaluate(base(ignore_rule_ids=[5, 1001], **attack), timeout=30).intervention


# -- what grpcurl does: reflection alone ---------------------------------------------

def test_reflection_is_enough_to_call_evaluate(waf):
    with grpc.insecure_channel(waf) as channel:
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        service = pool.FindServiceByName("waf.v1.Waf")
        method = service.methods_by_name["Evaluate"]
        request_cls = message_factory.GetMessageClass(method.input_type)
        reply_cls = message_factory.GetMessageClass(method.output_type)
        request = json_format.Parse(
            '{"method": "GET", "uri": "Lz9xPWF0dGFjaw==", "headers": [{"name": "aG9zdA==", "value": "c2hvcA=="}]}',
            request_cls())  # uri "/?q=attack", header host: shop (bytes are base64 in JSON, as in grpcurl)
        call = channel.unary_unary(f"/{service.full_name}/Evaluate", request_serializer=request_cls.SerializeToString,
                                   response_deserializer=reply_cls.FromString)
        reply = json_format.MessageToDict(call(request, timeout=30))
    assert reply["intervention"] is True and reply["status"] == 403
    assert [m["id"] for m in reply["matches"]] == [str(ATTACK_RULE)]
