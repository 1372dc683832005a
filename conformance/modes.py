"""The ways a test's requests are evaluated.

- StackMode: raw bytes to HAProxy over a socket; the matched rule ids come
  back in that request's own response (X-Waf-Rules, and X-Waf-Response-Rules
  for its response's phases 3-4, set by the shipped haproxy.cfg when
  WAF_DEBUG_HEADERS is defined). Frontend web inspects responses, so
  response-phase tests are judged too; `inspects_responses=False` skips them
  for a frontend that does not.
- EngineMode: the same bytes split the way a server would, straight into
  wafsvc.engine.Engine in this process, built from the same settings. Every
  request is kept for its response (inspect_response), and the response
  albedo would give (conformance/albedo.py) runs phases 3-4 on the same
  transaction, as the product does when a frontend inspects responses.
- EnvoyMode: raw bytes to Envoy with ext_proc (deploy/envoy/ext_proc.yaml),
  which inspects responses: every test is judged, response phases
  included. The ids come back in x-waf-rules, the transaction id for the
  audit log in x-waf-transaction-id (ext_proc's debug headers, asked for
  with the gRPC metadata x-waf-debug-headers).
"""

from __future__ import annotations

import time

from conformance import albedo, rawhttp
from conformance.auditlog import AuditLog, render_messages
from conformance.judge import Observation

RETRIES = 3  # a request the stack could not evaluate (X-Waf-Failed) is sent again


class StackMode:
    name = "stack"
    proxy = "HAProxy"
    id_header = "X-Unique-ID"       # the audit log's transaction.unique_id

    def __init__(self, host: str, port: int, timeout: float = 120.0, audit_log: AuditLog | None = None,
                 inspects_responses: bool = True) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.audit_log = audit_log
        self.inspects_responses = inspects_responses
        self.retried = 0

    def observe(self, raw: bytes, needs_log: bool = False) -> Observation:
        for attempt in range(RETRIES + 1):
            try:
                resp = rawhttp.send(self.host, self.port, raw, self.timeout)
            except rawhttp.NoResponse as exc:
                return Observation(error=str(exc))
            failed = resp.header("X-Waf-Failed") == "1" or resp.header("X-Waf-Response-Failed") == "1"
            if failed and attempt < RETRIES:
                # No verdict (deadline under load): not an answer about the
                # rules, so ask again rather than judge it.
                self.retried += 1
                time.sleep(0.2 * (attempt + 1))
                continue
            break
        rules = resp.header("X-Waf-Rules")
        response_rules = resp.header("X-Waf-Response-Rules") if self.inspects_responses else None
        seen = Observation(status=resp.status,
                           matched_ids=[int(x) for x in f"{rules or ''} {response_rules or ''}".split()
                                        if x.isdigit()])
        if rules is None:
            seen.reached_waf = False
            seen.note = f"{self.proxy} answered {resp.status} without a WAF verdict (request never reached the WAF)"
        elif resp.header("X-Waf-Failed") == "1":
            seen.note = (f"the stack gave no verdict after {RETRIES} retries: "
                         f"{resp.header('X-Waf-Error') or 'X-Waf-Failed'}")
        elif resp.header("X-Waf-Response-Failed") == "1":
            seen.note = (f"the stack gave the response no verdict after {RETRIES} retries: "
                         f"{resp.header('X-Waf-Response-Error') or 'X-Waf-Response-Failed'}")
        if needs_log and self.audit_log is not None and rules is not None:
            unique_id = resp.header(self.id_header)
            if unique_id:
                # No entry: no logging rule matched (RelevantOnly), so no log text.
                seen.log_text = self.audit_log.text_for(unique_id) or ""
            else:
                seen.note = (seen.note + "; " if seen.note else "") + "no X-Unique-ID: log text unknown"
        return seen


class EnvoyMode(StackMode):
    name = "envoy"
    proxy = "Envoy"
    id_header = "X-Waf-Transaction-Id"

    def __init__(self, host: str, port: int, timeout: float = 120.0, audit_log: AuditLog | None = None) -> None:
        super().__init__(host, port, timeout, audit_log, inspects_responses=True)


class EngineMode:
    name = "engine"
    inspects_responses = True

    def __init__(self, environ: dict[str, str]) -> None:
        from wafsvc.__main__ import rule_specs
        from wafsvc.config import WafConfig
        from wafsvc.engine import Engine
        from wafsvc.responses import Responses

        config = WafConfig.from_args([], environ=environ)
        self.engine = Responses(Engine(rule_specs(config)), "conformance/0/0", config.transaction_ttl_ms, 16)
        self._seq = 0

    def observe(self, raw: bytes, needs_log: bool = False) -> Observation:
        from wafapi import waf_pb2
        from wafsvc.errors import EvaluationFailed

        req = rawhttp.parse_request(raw)
        self._seq += 1
        message = waf_pb2.EvaluateRequest(
            transaction_id=f"conformance-{self._seq}",
            client_ip="127.0.0.1", client_port=40000, server_ip="127.0.0.1", server_port=80,
            method=req.method, uri=req.uri.encode("latin-1"), http_version=req.version,
            headers=[waf_pb2.Header(name=n, value=v) for n, v in req.headers], body=req.body,
            inspect_response=True)
        try:
            verdict = self.engine.evaluate(message)
            matches = list(verdict.matches)
            if verdict.transaction_handle:
                reply = albedo.respond(req.method, req.uri, req.body)
                matches += self.engine.evaluate_response(waf_pb2.ResponseRequest(
                    transaction_handle=verdict.transaction_handle, status=reply.status,
                    headers=[waf_pb2.Header(name=n, value=v) for n, v in reply.headers], body=reply.body,
                    content_length=len(reply.body), transaction_id=message.transaction_id)).matches
        except EvaluationFailed as exc:
            return Observation(error=f"engine: {exc.message}")
        text = render_messages((m.id, m.message, m.matched_data, m.severity) for m in matches)
        return Observation(matched_ids=[m.id for m in matches], log_text=text)
