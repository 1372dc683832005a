"""Verdicts and failures as encoded ACK actions, built once where they repeat.

Most ACKs are the same bytes: a pass is always intervention 0, status 0,
action pass; a CRS block is intervention 1, status 403, action deny plus its
rule ids. The decision part (the first setvars.DECISION_VARS variables) is
cached per (intervention, status, action); only rule ids, message and
redirect are encoded per request. The result equals
encode_actions(setvars.verdict_actions(verdict)) byte for byte
(tests/unit/test_notify.py).

body_truncated (res_body_truncated) costs a whole body nothing: wafsvc
flags every cut body with a match (rule 99010 or 99011,
wafsvc.phases.flag_truncated), so a verdict without matches was not cut and
its ACK is not even asked. With no verdict (failure or miss policy), the
gateway's own detection (RequestContext.body_truncated) sets it.
"""

from __future__ import annotations

from gateway import responses, setvars
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
        # (truncated, session) -> the encoded flag; b"" for a whole body outside the original agent's message
        self._truncation = {(cut, session): encode_actions(setvars.truncation_actions(cut, session))
                            for cut in (False, True) for session in (False, True)}
        self._res_truncation = encode_actions(responses.truncation_actions(True))

    def decision(self, verdict: waf_pb2.Verdict) -> bytes:
        """The first DECISION_VARS actions: all an ACK too big for the frame keeps."""
        key = (verdict.intervention, verdict.status, verdict.action)
        head = self._decisions.get(key)
        if head is None:
            head = self._decisions[key] = encode_actions(
                setvars.verdict_actions(waf_pb2.Verdict(intervention=verdict.intervention, status=verdict.status,
                                                        action=verdict.action)))
        return head

    def short(self, verdict: waf_pb2.Verdict, session: bool = False) -> bytes:
        """The decision, the handle when the transaction was kept and the
        truncation flag: what an ACK too big for the frame keeps."""
        head = self.decision(verdict)
        if verdict.transaction_handle:
            head += encode_actions((SetVar(Scope.TRANSACTION, setvars.VAR_HANDLE, verdict.transaction_handle),))
        return head + self._truncation[verdict.body_truncated, session]

    def verdict(self, verdict: waf_pb2.Verdict, session: bool = False) -> bytes:
        """`session`: the answer to the original agent's message, which
        also carries sess.modsec.body_truncated."""
        head = self.decision(verdict)
        if verdict.transaction_handle:  # kept for its response: haproxy.cfg sends it with the handle
            head += encode_actions((SetVar(Scope.TRANSACTION, setvars.VAR_HANDLE, verdict.transaction_handle),))
        matches = verdict.matches
        if not matches and not verdict.redirect_url:  # no match: the body was not cut (99010 would be here)
            return head + self._truncation[False, True] if session else head
        if session or verdict.body_truncated:
            head += self._truncation[verdict.body_truncated, session]
        details = []
        if verdict.redirect_url:
            details.append(SetVar(Scope.TRANSACTION, setvars.VAR_REDIRECT, verdict.redirect_url))
        if matches:
            details.append(SetVar(Scope.TRANSACTION, setvars.VAR_RULES, " ".join(str(m.id) for m in matches)))
            details.append(SetVar(Scope.TRANSACTION, setvars.VAR_MESSAGE, matches[0].message))
        return head + encode_actions(details)

    def truncation(self, truncated: bool, session: bool = False) -> bytes:
        """The flag alone, appended to a failure's ACK (the gateway's detection)."""
        return self._truncation[truncated, session]

    def failure(self, reason: str, fail_closed: bool | None = None) -> tuple[bytes, bytes]:
        """(all actions, the decision only) for an answer without a verdict;
        `fail_closed` is the application's policy (default: the gateway's)."""
        closed = self.fail_closed if fail_closed is None else fail_closed
        cached = self._failures.get((reason, closed))
        if cached is None:
            actions = setvars.failure_actions(reason, closed)
            cached = (encode_actions(actions), encode_actions(actions[:setvars.DECISION_VARS]))
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
        if not verdict.matches and not verdict.redirect_url:  # not cut: 99011 would be here
            return head
        return head + encode_actions(responses.verdict_actions(verdict)[responses.DECISION_VARS:])

    def response_short(self, verdict: waf_pb2.Verdict) -> bytes:
        """The decision and the truncation flag: what a response ACK too big
        for the frame keeps."""
        head = self.response_decision(verdict)
        return head + self._res_truncation if verdict.body_truncated else head

    def response_truncation(self, truncated: bool) -> bytes:
        """res_body_truncated alone, for a miss's or a failure's ACK."""
        return self._res_truncation if truncated else b""

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
