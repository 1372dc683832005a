"""Verdict -> SPOP set-var actions: the variables the gateway answers a
request with, which haproxy.cfg acts on. Pure functions: no I/O.

The variables land in HAProxy as txn.modsec.<name> (option var-prefix
modsec), plus the original agent's sess.modsec.intervention. gateway/acks.py
encodes these same actions from cached pieces on the hot path (a unit test
keeps them byte for byte alike); check-response's own actions are in
gateway/responses.py.
"""

from __future__ import annotations

from gateway.spop import Int32, Scope, SetVar
from wafapi import waf_pb2

# Variables the gateway sets; haproxy.cfg acts on them.
VAR_INTERVENTION = "intervention"  # 0/1, the original agent's name
VAR_STATUS = "status"              # HTTP status the engine asked for
VAR_ACTION = "action"              # pass, deny, redirect, drop
VAR_REDIRECT = "redirect"          # redirect URL, only when action is redirect
VAR_RULES = "rules"                # matched rule ids, space separated, in order
VAR_MESSAGE = "message"            # message of the first matched rule
VAR_FAILED = "failed"              # 1 when no verdict could be had
VAR_ERROR = "error"                # why, when failed
VAR_HANDLE = "handle"              # the kept transaction's handle, when the request asked (inspect_response)
# 1 when the body was cut (HAProxy's buffer): only its start was inspected.
# Absent for a whole body, so that the common answer carries nothing more.
VAR_BODY_TRUNCATED = "body_truncated"
# The response's verdict (check-response), in variables of its own.
VAR_RES_INTERVENTION = "res_intervention"
VAR_RES_STATUS = "res_status"
VAR_RES_ACTION = "res_action"
VAR_RES_REDIRECT = "res_redirect"
VAR_RES_RULES = "res_rules"
VAR_RES_MESSAGE = "res_message"
VAR_RES_FAILED = "res_failed"      # 1 when the response got no verdict (miss or failure)
VAR_RES_MISS = "res_miss"          # 1 when its transaction was gone (the miss policy answered)
VAR_RES_ERROR = "res_error"        # why, when failed
VAR_RES_BODY_TRUNCATED = "res_body_truncated"  # as body_truncated, for the response body

ACTION_NAMES = {waf_pb2.ACTION_PASS: "pass", waf_pb2.ACTION_DENY: "deny",
                waf_pb2.ACTION_REDIRECT: "redirect", waf_pb2.ACTION_DROP: "drop"}


# The first DECISION_VARS actions carry the decision; an ACK too big for the
# frame keeps them (and the handle) and drops the details (rules, message).
DECISION_VARS = 4


def truncation_actions(truncated: bool, session: bool) -> list:
    """The body_truncated flag. In the transaction scope only when the body
    was cut (absent otherwise: a whole body costs the ACK nothing). For the
    original agent's message (session=True) also in the session scope, 0 or
    1 on every answer like sess.modsec.intervention, so that it never shows
    an earlier request's value on a kept-alive connection."""
    actions = [SetVar(Scope.TRANSACTION, VAR_BODY_TRUNCATED, 1)] if truncated else []
    if session:
        actions.append(SetVar(Scope.SESSION, VAR_BODY_TRUNCATED, Int32(int(truncated))))
    return actions


def verdict_actions(verdict: waf_pb2.Verdict, session: bool = False) -> list:
    """`session`: the answer to the original agent's message."""
    intervention = int(verdict.intervention)
    actions = [
        SetVar(Scope.TRANSACTION, VAR_INTERVENTION, intervention),
        SetVar(Scope.TRANSACTION, VAR_STATUS, verdict.status),
        SetVar(Scope.TRANSACTION, VAR_ACTION, ACTION_NAMES.get(verdict.action, "pass")),
        # The original agent's variable, for configs that deny on it (README,
        # "Migrating from the original agent"): int32, session scope.
        SetVar(Scope.SESSION, VAR_INTERVENTION, Int32(intervention)),
    ]
    if verdict.transaction_handle:  # kept for its response (inspect_response)
        actions.append(SetVar(Scope.TRANSACTION, VAR_HANDLE, verdict.transaction_handle))
    # wafsvc's verdict is the one source: it says body_truncated exactly when
    # the request did (the gateway's body_was_cut), and adds rule 99010.
    actions.extend(truncation_actions(verdict.body_truncated, session))
    if verdict.redirect_url:
        actions.append(SetVar(Scope.TRANSACTION, VAR_REDIRECT, verdict.redirect_url))
    if verdict.matches:
        actions.append(SetVar(Scope.TRANSACTION, VAR_RULES, " ".join(str(m.id) for m in verdict.matches)))
        actions.append(SetVar(Scope.TRANSACTION, VAR_MESSAGE, verdict.matches[0].message))
    return actions


def failure_actions(reason: str, fail_closed: bool) -> list:
    """No verdict: deny (503) or pass, and say so either way. The caller
    adds truncation_actions with the gateway's own detection: with no
    verdict, it is all there is."""
    return [
        SetVar(Scope.TRANSACTION, VAR_INTERVENTION, int(fail_closed)),
        SetVar(Scope.TRANSACTION, VAR_STATUS, 503 if fail_closed else 0),
        SetVar(Scope.TRANSACTION, VAR_ACTION, "deny" if fail_closed else "pass"),
        SetVar(Scope.SESSION, VAR_INTERVENTION, Int32(int(fail_closed))),
        SetVar(Scope.TRANSACTION, VAR_FAILED, 1),
        SetVar(Scope.TRANSACTION, VAR_ERROR, reason[:200]),
    ]
