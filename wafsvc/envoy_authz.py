"""Envoy's external authorization (ext_authz v3,
envoy.service.auth.v3.Authorization/Check), served by every wafsvc worker
on the same port as waf.v1.Waf.

One Check is one whole request (phases 1-2 and logging), evaluated like a
unary Evaluate: the same engine path, metrics and logs. What it reads
(wafsvc/envoy_map.py for the byte-exact rules):
- `header_map` (Envoy's `encode_raw_headers: true`, raw bytes) or else the
  `headers` map (UTF-8 strings, non-UTF-8 bytes already replaced by "!");
- the raw path (`path` holds path and query as received);
- the body when `with_request_body` is set: `raw_body` (`pack_as_bytes:
  true`) or `body`. With `allow_partial_message: true` Envoy sends at most
  `max_request_bytes` and says so with the header
  x-envoy-auth-partial-body: true; such a body is treated as truncated
  (WAF_TRUNCATED_BODY decides, rule 99010), as on the SPOP path.

Answers: allowed -> OK with an ok_response; blocked -> PERMISSION_DENIED with
a denied_response: the engine's status and the matched rule ids in
x-waf-rules. An evaluation that fails (unknown application, engine error)
fails the call with its gRPC code and the x-waf-error-reason trailer: Envoy
then applies `failure_mode_allow` (false: `status_on_error`, 403 unless
set; the shipped config says 503).
"""

from __future__ import annotations

import logging

from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.rpc import code_pb2, status_pb2

from wafapi import waf_pb2
from wafsvc import envoy_map, rpc
from wafsvc.errors import EvaluationFailed
from wafsvc.service import refusal

log = logging.getLogger("wafsvc.envoy")

API = "ext_authz"
SERVICE_NAME = external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"].full_name
PARTIAL_BODY_HEADER = b"x-envoy-auth-partial-body"


def evaluate_request(check: external_auth_pb2.CheckRequest, app: str = "",
                     ignore_rule_ids=(), max_body_bytes: int = 0) -> waf_pb2.EvaluateRequest:
    """The engine's request from Envoy's CheckRequest. A body longer than
    wafsvc's WAF_MAX_BODY_BYTES is cut there and flagged as truncated, so
    the truncated-body policy judges it instead of a refusal (which Envoy's
    failure mode would decide)."""
    http = check.attributes.request.http
    if http.header_map.headers:
        pairs = [envoy_map.header_bytes(h) for h in http.header_map.headers]
    else:
        pairs = [(k.encode(), v.encode()) for k, v in http.headers.items()]
    # ext_authz puts the request line in fields of its own, not in pseudo-headers.
    pairs += [(b":method", http.method.encode()), (b":path", http.path.encode())]
    if http.host:
        pairs.append((b":authority", http.host.encode()))
    line = envoy_map.RequestLine(pairs)
    body = http.raw_body or http.body.encode()
    cut = 0 < max_body_bytes < len(body)
    if cut:
        body = body[:max_body_bytes]
    partial = cut or any(name == PARTIAL_BODY_HEADER and value == b"true" for name, value in line.headers)
    declared = http.size if http.size >= 0 else -1
    req = waf_pb2.EvaluateRequest(
        transaction_id=envoy_map.transaction_id(line.request_id) or http.id, method=line.method, uri=line.path,
        http_version=envoy_map.http_version(http.protocol), body=body, application=app,
        ignore_rule_ids=ignore_rule_ids,
        body_truncated=partial or (declared > len(body)), content_length=declared)
    req.headers.extend(waf_pb2.Header(name=name, value=value) for name, value in line.headers)
    _peer(check.attributes.source, req, client=True)
    _peer(check.attributes.destination, req, client=False)
    return req


def _peer(peer, req: waf_pb2.EvaluateRequest, client: bool) -> None:
    address = peer.address.socket_address
    if address.address:
        if client:
            req.client_ip, req.client_port = address.address, address.port_value
        else:
            req.server_ip, req.server_port = address.address, address.port_value


def denied(verdict: waf_pb2.Verdict) -> external_auth_pb2.CheckResponse:
    headers = [base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(
        key=envoy_map.RULES_HEADER, value=envoy_map.rule_ids(verdict).decode()))]
    if verdict.redirect_url:
        headers.append(base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key="location",
                                                                              value=verdict.redirect_url)))
        status = verdict.status
    else:
        status = envoy_map.deny_status(verdict)
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=code_pb2.PERMISSION_DENIED, message="blocked by the WAF"),
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=status), headers=headers,
            body=envoy_map.DENIED_BODY.decode()))


ALLOWED = external_auth_pb2.CheckResponse(status=status_pb2.Status(code=code_pb2.OK),
                                          ok_response=external_auth_pb2.OkHttpResponse())


class AuthorizationServicer(external_auth_pb2_grpc.AuthorizationServicer):
    def __init__(self, engine) -> None:
        self.engine = engine   # wafsvc.metrics.ObservedEngine: counts and logs every verdict

    def Check(self, request: external_auth_pb2.CheckRequest, call: rpc.Call):
        try:
            app, ignore = envoy_map.selection(call.invocation_metadata())
            limits = getattr(self.engine, "limits", None)   # wafsvc.limits.Limited checks the rest
            req = evaluate_request(request, app, ignore, limits.max_body_bytes if limits else 0)
            verdict = self.engine.evaluate(req)
        except EvaluationFailed as exc:
            raise self._fail(exc) from None
        except Exception as exc:  # a bug: fail the call (Envoy's failure mode decides), never pass it
            log.exception("ext_authz check failed unexpectedly")
            raise self._fail(EvaluationFailed("INTERNAL", f"unexpected {type(exc).__name__}",
                                              waf_pb2.ENGINE_ERROR)) from None
        if envoy_map.blocked(verdict):
            self.engine.envoy_call(API, "denied")
            return denied(verdict)
        self.engine.envoy_call(API, "allowed")
        return ALLOWED

    def _fail(self, exc: EvaluationFailed) -> rpc.Abort:
        self.engine.envoy_call(API, "error")
        return refusal(exc)


def add_to_server(server: rpc.Server, engine) -> str:
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(AuthorizationServicer(engine), server)
    return SERVICE_NAME
