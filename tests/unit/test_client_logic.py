"""Pure logic of the client, the middleware decision and wafsvc's limits: no
sockets (the same things over real gRPC are in tests/e2e/test_client.py,
test_middleware.py, test_cli.py and test_api_hardening.py)."""

from __future__ import annotations

import json

import pytest

from modsec_spoa_client.config import ClientConfig, grpc_target
from modsec_spoa_client.errors import (EngineError, ErrorReason, IgnoreListRefused, InvalidRequest, TransactionLost,
                                       UnknownApplication, WafError, WafUnavailable, error_for)
from modsec_spoa_client._shared import WorkerRoutes, request_message
from modsec_spoa_client.har import InputError, har_requests, requests_in
from modsec_spoa_client.models import Action, HttpRequest, Verdict, worker_of
from modsec_spoa_client.policy import Outcome, decide
from modsec_spoa_client.rawhttp import RawRequestError, parse_request, request_from_url
from wafapi import waf_pb2
from wafsvc.errors import EvaluationFailed
from wafsvc.limits import IgnoreListBudget, Limits, check_request


@pytest.mark.parametrize("given, target", [
    ("127.0.0.1:50051", "127.0.0.1:50051"),
    ("dns:///wafsvc:50051", "dns:///wafsvc:50051"),
    (["10.0.0.5:1", "10.0.0.6:2"], "ipv4:10.0.0.5:1,10.0.0.6:2"),
    ("10.0.0.5:1,10.0.0.6:2", "ipv4:10.0.0.5:1,10.0.0.6:2"),
    (["[::1]:1", "[::2]:2"], "ipv6:[::1]:1,[::2]:2"),
])
def test_targets(given, target):
    assert grpc_target(given) == target


@pytest.mark.parametrize("bad", [[], "", ["wafsvc:1", "other:2"], ["10.0.0.1:1", "[::1]:2"], ["10.0.0.1", "10.0.0.2:1"]])
def test_bad_targets(bad):
    with pytest.raises(ValueError):
        grpc_target(bad)


def test_config_from_env(tmp_path):
    token = tmp_path / "token"
    token.write_text("abc\n")
    config = ClientConfig.from_env({"MODSEC_SPOA_TARGET": "dns:///w:1", "MODSEC_SPOA_DEADLINE_MS": "250",
                                    "MODSEC_SPOA_TOKEN_FILE": str(token), "MODSEC_SPOA_TLS_CA": "/ca.pem"})
    assert (config.target, config.deadline, config.token, config.tls.ca) == ("dns:///w:1", 0.25, "abc", "/ca.pem")
    assert config.metadata() == (("authorization", "Bearer abc"),)
    with pytest.raises(ValueError, match="MODSEC_SPOA_RETRIES"):
        ClientConfig.from_env({"MODSEC_SPOA_RETRIES": "many"})


@pytest.mark.parametrize("code, reason, cls", [
    ("UNAVAILABLE", ErrorReason.ERROR_REASON_UNSPECIFIED, WafUnavailable),
    ("UNAVAILABLE", ErrorReason.DRAINING, WafUnavailable),
    ("INVALID_ARGUMENT", ErrorReason.LIMIT_URI_BYTES, InvalidRequest),
    ("RESOURCE_EXHAUSTED", ErrorReason.IGNORE_LIST_REFUSED, IgnoreListRefused),
    ("NOT_FOUND", ErrorReason.UNKNOWN_APPLICATION, UnknownApplication),
    ("NOT_FOUND", ErrorReason.TRANSACTION_EXPIRED, TransactionLost),
    ("INTERNAL", ErrorReason.ENGINE_ERROR, EngineError),
    ("UNIMPLEMENTED", ErrorReason.ERROR_REASON_UNSPECIFIED, WafError),
])
def test_errors_are_typed_by_code_and_reason(code, reason, cls):
    error = error_for(code, "x", reason)
    assert type(error) is cls and error.reason is reason and error.code == code


def test_request_message_cuts_long_bodies_and_flags_them():
    message = request_message(HttpRequest("POST", "/", body=b"x" * 10, content_length=10),
                              ClientConfig(max_body_bytes=4))
    assert (message.body, message.body_truncated, message.content_length) == (b"xxxx", True, 10)
    whole = request_message(HttpRequest("POST", "/", body=b"x" * 10), ClientConfig(max_body_bytes=0))
    assert (whole.body, whole.body_truncated, whole.content_length) == (b"x" * 10, False, -1)


def test_text_is_latin1_and_falls_back_to_utf8():
    message = request_message(HttpRequest("GET", "/é", headers={"X-A": "café €"}), ClientConfig())
    assert message.uri == b"/\xe9" and message.headers[0].value == "café €".encode("utf-8")


def test_raw_requests():
    chunked = parse_request(b"POST /a?b=1 HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
                            b"4\r\nabcd\r\n3;ext=1\r\nefg\r\n0\r\n\r\n")
    assert (chunked.method, chunked.uri, chunked.body, chunked.body_truncated) == ("POST", b"/a?b=1", b"abcdefg", False)
    short = parse_request(b"PUT / HTTP/1.0\nContent-Length: 10\n\nabc")
    assert (short.http_version, short.body, short.body_truncated, short.content_length) == ("1.0", b"abc", True, 10)
    for bad in (b"", b"GET /\r\n\r\n", b"GET / HTTP/1.1\r\nno colon\r\n\r\n", b"GET / HTTP/1.1\r\n x: y\r\n\r\n"):
        with pytest.raises(RawRequestError):
            parse_request(bad)


def test_request_from_url_adds_host_and_length():
    req = request_from_url("https://shop:8443/a?b=c", "POST", [("X-A", "1")], b"hi")
    assert req.uri == "/a?b=c" and list(req.headers) == [(b"Host", b"shop:8443"), (b"X-A", b"1"),
                                                         (b"Content-Length", b"2")]
    with pytest.raises(ValueError):
        request_from_url("ftp://x/")


def test_har_and_url_lists(tmp_path):
    har = {"log": {"entries": [{"request": {"method": "GET", "url": "http://a/?x=1", "httpVersion": "h2",
                                            "headers": [{"name": ":authority", "value": "a"}]}}]}}
    (req,) = har_requests(har)
    assert req.http_version == "2.0" and list(req.headers) == [(b"Host", b"a")]
    with pytest.raises(InputError, match="entry 0"):
        list(har_requests({"log": {"entries": [{"request": {"method": "GET"}}]}}))
    urls = tmp_path / "urls.txt"
    urls.write_text("# c\nhttp://a/1\n\nhttp://a/2\n")
    assert [r.uri for r in requests_in(urls)] == ["/1", "/2"]
    (tmp_path / "h.har").write_text(json.dumps(har))
    assert len(list(requests_in(tmp_path / "h.har"))) == 1


def test_worker_routes():
    routes = WorkerRoutes(2)
    assert [routes.next_index() for _ in range(3)] == [0, 1, 0]
    routes.learn("host/1/2#ab.1", 1)
    assert worker_of("host/1/2#ab.1") == "host/1/2" and routes.index_for("host/1/2#cd.9") == 1
    with pytest.raises(TransactionLost) as other:
        routes.index_for("host/1/3#ab.1")
    assert other.value.reason is ErrorReason.TRANSACTION_OTHER_WORKER


def _verdict(**fields) -> Verdict:
    return Verdict.from_proto(waf_pb2.Verdict(**fields))


def test_middleware_decisions():
    assert decide(_verdict(action=Action.PASS), None, "closed").outcome is Outcome.PASS
    block = decide(_verdict(intervention=True, status=403, action=Action.DENY), None, "open")
    assert (block.outcome, block.status) == (Outcome.BLOCK, 403)
    redirect = decide(_verdict(intervention=True, status=302, action=Action.REDIRECT, redirect_url="/x"), None, "open")
    assert (redirect.status, redirect.location) == (302, "/x")
    down = WafUnavailable("down", code="UNAVAILABLE")
    assert decide(None, down, "closed").status == 503
    assert decide(None, down, "open").outcome is Outcome.PASS
    refused = InvalidRequest("nul", code="INVALID_ARGUMENT", reason=ErrorReason.FIELD_HAS_NUL)
    assert decide(None, refused, "open").status == 400  # never passed uninspected


def test_ignore_list_budget_refills_over_time():
    now = [0.0]
    budget = IgnoreListBudget(2, clock=lambda: now[0])
    assert [budget.take(), budget.take(), budget.take()] == [True, True, False]
    now[0] += 30  # one list's worth at 2 per minute
    assert [budget.take(), budget.take()] == [True, False]
    assert not IgnoreListBudget(0).take()


def test_limits_are_configurable():
    req = waf_pb2.EvaluateRequest(method="GET", uri=b"/abcdef")
    check_request(req, Limits())
    with pytest.raises(EvaluationFailed) as caught:
        check_request(req, Limits(max_uri_bytes=4))
    assert (caught.value.code, caught.value.reason) == ("INVALID_ARGUMENT", waf_pb2.LIMIT_URI_BYTES)
