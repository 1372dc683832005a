"""The check-response message: a response whose request was kept
(inspect_response) goes back to the worker that holds its transaction.

- build_response: the reference mapping of the message's arguments to a
  waf.v1.ResponseRequest, the worker named in its handle and a context
  (gateway/notify.py does the same straight from the frame; tests compare).
- the ACK actions: the response's verdict lands in variables of its own
  (txn.modsec.res_*), so haproxy.cfg can tell it from the request's.
- MissPolicy: what a miss (the transaction is gone) turns into: pass
  (flagged in res_miss and counted, the default) or block; per application
  in gateway/apps.py (AppPolicies.miss).

The handle is "<worker>#<token>" (waf.proto, Verdict.transaction_handle):
the gateway routes on the worker part and never looks inside the token.
"""

from __future__ import annotations

from enum import Enum

from gateway import mapping, setvars
from gateway.failures import MissReason
from gateway.mapping import (CHECK_RESPONSE, InvalidMessage, Problem, RequestContext, _fields, _int, _raw,
                             _text)
from gateway.spop import Scope, SetVar
from wafapi import waf_pb2

# Answers that carry no body whatever their headers say (RFC 9110 6.4.1):
# their Content-Length is not a sign of truncation.
NO_BODY_STATUSES = frozenset((204, 304))
DENY_STATUS = 503  # a response blocked without a verdict (miss policy block, failure policy closed)


class MissPolicy(Enum):
    PASS = "pass"    # let the response through, flagged (res_miss=1, res_failed=1) and counted
    BLOCK = "block"  # deny it (res_intervention=1, status 503)


def worker_of(handle: str) -> str:
    """The worker named in a handle: what comes before the last '#'."""
    worker, sep, token = handle.rpartition("#")
    if not sep or not worker or not token:
        raise InvalidMessage(Problem.BAD_VALUE, "is not a transaction handle ('<worker>#<token>')",
                             argument="handle")
    return worker


def expects_body(method: str | bytes, status: int) -> bool:
    """False for answers that never carry a body (HEAD, 1xx, 204, 304)."""
    return not (status < 200 or status in NO_BODY_STATUSES or method in ("HEAD", b"HEAD"))


def status_of(value, name: str = "status") -> int:
    status = _int(value, name)
    if not 100 <= status <= 999:
        raise InvalidMessage(Problem.BAD_VALUE, f"should be an HTTP status (100 to 999), got {status}",
                             argument=name)
    return status


def build_response(args, default_app: str = "", haproxy_bufsize: int = 0,
                   ) -> tuple[waf_pb2.ResponseRequest, str, RequestContext]:
    """check-response's arguments (a dict or (name, value) pairs) ->
    (ResponseRequest, the worker to send it to, context). The worker is ""
    when the handle is NULL or empty: nothing was kept, a miss (NO_HANDLE).
    Raises InvalidMessage like mapping.build_request."""
    schema = CHECK_RESPONSE
    unknown: list[str] = []
    try:
        fields, unknown = _fields(args, schema, unknown)
        get = fields.get
        handle = _text(get("handle"), "handle")
        worker = worker_of(handle) if handle else ""
        raw_headers = _raw(get("headers"), "headers")
        headers, content_length, _ = mapping.read_headers(raw_headers, "res.hdrs_bin")
        body = _raw(get("body"), "body")
        status = status_of(get("status"))
        method = _text(get("method"), "method")
        body_size = _int(get("body_size"), "body_size")
        truncated = expects_body(method, status) and mapping.body_was_cut(
            len(body), content_length, body_size, len(raw_headers), haproxy_bufsize)
        app = _text(get("app"), "app") or default_app
        resp = waf_pb2.ResponseRequest(
            transaction_handle=handle, status=status, http_version=_text(get("ver"), "ver"),
            body=body, body_truncated=truncated, content_length=content_length,
            transaction_id=_text(get("id"), "id"))
        frontend = _text(get("frontend"), "frontend")
    except InvalidMessage as exc:
        raise schema.explain(exc, unknown)
    add_header = resp.headers.add
    for name, value in headers:
        add_header(name=name, value=value)
    context = RequestContext(unique_id=resp.transaction_id, frontend=frontend, host="", app=app,
                             body_truncated=truncated)
    return resp, worker, context


# -- ACK actions ---------------------------------------------------------------

def verdict_actions(verdict: waf_pb2.Verdict) -> list:
    """A response's verdict. The first DECISION_VARS
    actions carry the decision."""
    actions = [
        SetVar(Scope.TRANSACTION, setvars.VAR_RES_INTERVENTION, int(verdict.intervention)),
        SetVar(Scope.TRANSACTION, setvars.VAR_RES_STATUS, verdict.status),
        SetVar(Scope.TRANSACTION, setvars.VAR_RES_ACTION, setvars.ACTION_NAMES.get(verdict.action, "pass")),
    ]
    actions.extend(truncation_actions(verdict.body_truncated))
    if verdict.redirect_url:
        actions.append(SetVar(Scope.TRANSACTION, setvars.VAR_RES_REDIRECT, verdict.redirect_url))
    if verdict.matches:
        actions.append(SetVar(Scope.TRANSACTION, setvars.VAR_RES_RULES, " ".join(str(m.id) for m in verdict.matches)))
        actions.append(SetVar(Scope.TRANSACTION, setvars.VAR_RES_MESSAGE, verdict.matches[0].message))
    return actions


DECISION_VARS = 3


def truncation_actions(truncated: bool) -> list:
    """res_body_truncated, only when the response body was cut (as the
    request's body_truncated): from the verdict, or with no verdict (a miss,
    a failure) from the gateway's own detection."""
    return [SetVar(Scope.TRANSACTION, setvars.VAR_RES_BODY_TRUNCATED, 1)] if truncated else []


def _no_verdict(block: bool, reason: str, miss: bool) -> list:
    actions = [
        SetVar(Scope.TRANSACTION, setvars.VAR_RES_INTERVENTION, int(block)),
        SetVar(Scope.TRANSACTION, setvars.VAR_RES_STATUS, DENY_STATUS if block else 0),
        SetVar(Scope.TRANSACTION, setvars.VAR_RES_ACTION, "deny" if block else "pass"),
        SetVar(Scope.TRANSACTION, setvars.VAR_RES_FAILED, 1),
    ]
    if miss:
        actions.append(SetVar(Scope.TRANSACTION, setvars.VAR_RES_MISS, 1))
    actions.append(SetVar(Scope.TRANSACTION, setvars.VAR_RES_ERROR, reason[:200]))
    return actions


def miss_actions(reason: MissReason, policy: MissPolicy) -> list:
    """The transaction is gone: the miss policy answers, and says so."""
    return _no_verdict(policy is MissPolicy.BLOCK, f"transaction {reason.value}", miss=True)


def failure_actions(reason: str, fail_closed: bool) -> list:
    """No verdict for another reason (timeout, wafsvc down or refusing):
    the failure policy answers, as for a request."""
    return _no_verdict(fail_closed, reason, miss=False)
