"""Verdicts and failures as encoded ACK actions, built once where they repeat.

Most ACKs are the same bytes: a pass is always intervention 0, status 0,
action pass; a CRS block is intervention 1, status 403, action deny plus its
rule ids. The decision part (the first mapping.DECISION_VARS variables) is
cached per (intervention, status, action); only rule ids, message and
redirect are encoded per request. The result equals
encode_actions(mapping.verdict_actions(verdict)) byte for byte
(tests/unit/test_notify.py).
"""

from __future__ import annotations

from gateway import mapping, responses
from gateway.failures import MissReason
from gateway.responses import MissPolicy
from gateway.spop import Scope, SetVar, encode_actions
from wafapi import waf_pb2

MAX_CACHED_FAILURES = 64


class AckEncoder:
    def __init__(self, fail_closed: bool) -> None:
        self.fail_closed = fail_closed
        self._decisions: dict[tuple, bytes] = {}
        self._failures: dict[tuple[str, bool], tuple[bytes, bytes]] = {}
        self._response_decisions: dict[tuple, bytes] = {}
        self._response_failures: dict[tuple[str, bool], tuple[bytes, bytes]] = {}
        self._misses: dict[tuple, bytes] = {}

    def decision(self, verdict: waf_pb2.Verdict) -> bytes:
        """The first DECISION_VARS actions: all an ACK too big for the frame keeps."""
        key = (verdict.intervention, verdict.status, verdict.action)
        head = self._decisions.get(key)
        if head is None:
            head = self._decisions[key] = encode_actions(
                mapping.verdict_actions(waf_pb2.Verdict(intervention=verdict.intervention, status=verdict.status,
                                                        action=verdict.action)))
        return head

    def short(self, verdict: waf_pb2.Verdict) -> bytes:
        """The decision, and the handle when the transaction was kept: what
        an ACK too big for the frame keeps."""
        head = self.decision(verdict)
        if verdict.transaction_handle:
            head += encode_actions((SetVar(Scope.TRANSACTION, mapping.VAR_HANDLE, verdict.transaction_handle),))
        return head

    def verdict(self, verdict: waf_pb2.Verdict) -> bytes:
        head = self.decision(verdict)
        if verdict.transaction_handle:  # kept for its response: haproxy.cfg sends it with the handle
            head += encode_actions((SetVar(Scope.TRANSACTION, mapping.VAR_HANDLE, verdict.transaction_handle),))
        matches = verdict.matches
        if not matches and not verdict.redirect_url:
            return head
        details = []
        if verdict.redirect_url:
            details.append(SetVar(Scope.TRANSACTION, mapping.VAR_REDIRECT, verdict.redirect_url))
        if matches:
            details.append(SetVar(Scope.TRANSACTION, mapping.VAR_RULES, " ".join(str(m.id) for m in matches)))
            details.append(SetVar(Scope.TRANSACTION, mapping.VAR_MESSAGE, matches[0].message))
        return head + encode_actions(details)

    def failure(self, reason: str, fail_closed: bool | None = None) -> tuple[bytes, bytes]:
        """(all actions, the decision only) for an answer without a verdict;
        `fail_closed` is the application's policy (default: the gateway's)."""
        closed = self.fail_closed if fail_closed is None else fail_closed
        cached = self._failures.get((reason, closed))
        if cached is None:
            actions = mapping.failure_actions(reason, closed)
            cached = (encode_actions(actions), encode_actions(actions[:mapping.DECISION_VARS]))
            if len(self._failures) < MAX_CACHED_FAILURES:
                self._failures[(reason, closed)] = cached
        return cached

    # -- responses (check-response): txn.modsec.res_* ---------------------------
    def response_decision(self, verdict: waf_pb2.Verdict) -> bytes:
        key = (verdict.intervention, verdict.status, verdict.action)
        head = self._response_decisions.get(key)
        if head is None:
            head = self._response_decisions[key] = encode_actions(responses.verdict_actions(
                waf_pb2.Verdict(intervention=verdict.intervention, status=verdict.status, action=verdict.action)))
        return head

    def response_verdict(self, verdict: waf_pb2.Verdict) -> bytes:
        head = self.response_decision(verdict)
        if not verdict.matches and not verdict.redirect_url:
            return head
        return head + encode_actions(responses.verdict_actions(verdict)[responses.DECISION_VARS:])

    def response_miss(self, reason: MissReason, policy: MissPolicy) -> bytes:
        key = (reason, policy)
        cached = self._misses.get(key)
        if cached is None:  # bounded: a few reasons times two policies
            cached = self._misses[key] = encode_actions(responses.miss_actions(reason, policy))
        return cached

    def response_failure(self, reason: str, fail_closed: bool | None = None) -> tuple[bytes, bytes]:
        """(all actions, the decision only) for a response without a verdict
        (not a miss); `fail_closed` is the application's failure policy."""
        closed = self.fail_closed if fail_closed is None else fail_closed
        cached = self._response_failures.get((reason, closed))
        if cached is None:
            actions = responses.failure_actions(reason, closed)
            cached = (encode_actions(actions), encode_actions(actions[:responses.DECISION_VARS]))
            if len(self._response_failures) < MAX_CACHED_FAILURES:
                self._response_failures[(reason, closed)] = cached
        return cached
