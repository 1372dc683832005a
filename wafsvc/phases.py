"""Verdicts from what libmodsecurity decided: the one place that turns an
intervention and rule messages into a waf.v1.Verdict, and that applies the
truncated-body policy. Shared by the whole-request hot path and the
incremental Transaction API (wafsvc/transaction.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from wafapi import waf_pb2

# A body cut short before inspection (HAProxy hands SPOE at most one buffer)
# is reported as a synthetic match, in ModSecurity's local-use id range, so
# txn.modsec.rules and the logs say why a request or response was stopped or
# flagged: 99010 for a request body, 99011 for a response body.
TRUNCATED_BODY_RULE_ID = 99010
TRUNCATED_RESPONSE_BODY_RULE_ID = 99011
TRUNCATED_BODY_MESSAGE = "request body truncated before inspection"
TRUNCATED_RESPONSE_BODY_MESSAGE = "response body truncated before inspection"
TRUNCATED_BODY_TAG = "modsec-spoa/truncated-body"
TRUNCATED_BODY_STATUS = 403
TRUNCATED_BODY_POLICIES = ("pass", "block")

UNDECODABLE = "(not shown: holds bytes that are not UTF-8)"


@dataclass(frozen=True)
class Policy:
    """What one application decides beyond its rules (wafsvc/apps.py)."""
    blocking: bool = True                 # mode block (False: DetectionOnly)
    truncated_body: str = "pass"          # a request body cut short: pass (flagged) or block
    min_inspected: int = 16384            # ... passes only if at least this much was inspected
    truncated_response_body: str = "pass"
    response_inspection: bool = True      # inspect_response is honoured
    transaction_ttl_ms: int = 0           # 0: the store's own

    def denies_truncated(self, inspected: int, response: bool = False) -> bool:
        """A body cut short after `inspected` bytes is denied (unless a rule
        already decided). Never in detect mode, where nothing is denied."""
        if not self.blocking:
            return False
        if response:
            return self.truncated_response_body == "block"
        return self.truncated_body == "block" or inspected < self.min_inspected


def fill(verdict: waf_pb2.Verdict, transaction_id: str, intervention, messages, elapsed_us: int) -> waf_pb2.Verdict:
    """Writes one side's outcome into `verdict`: action from the
    intervention (None or not disruptive: pass), then every rule message."""
    verdict.transaction_id = transaction_id
    verdict.engine_time_us = elapsed_us
    if intervention is not None and intervention.disruptive:
        verdict.intervention = True
        verdict.status = intervention.status
        verdict.log = intervention.log or ""
        if intervention.url:
            verdict.redirect_url = intervention.url
            verdict.action = waf_pb2.ACTION_REDIRECT
        else:
            verdict.action = waf_pb2.ACTION_DENY
    else:
        verdict.action = waf_pb2.ACTION_PASS
    add = verdict.matches.add
    for msg in messages:
        add(id=msg.rule_id, message=_text(msg, "message"), severity=msg.severity, tags=msg.tags,
            matched_data=_text(msg, "data"), phase=msg.phase)
    return verdict


def flag_truncated(verdict: waf_pb2.Verdict, policy: Policy, response: bool, inspected: int,
                   content_length: int) -> None:
    """What arrived was inspected; the rest never will be, so an attack (or
    a leak) could hide past the cut. Always say so (rule 99010 or 99011, the
    verdict's body_truncated); deny as the application's policy says."""
    declared = f"{content_length} declared" if content_length >= 0 else "no Content-Length"
    rule_id, message, phase = ((TRUNCATED_RESPONSE_BODY_RULE_ID, TRUNCATED_RESPONSE_BODY_MESSAGE, 4) if response
                               else (TRUNCATED_BODY_RULE_ID, TRUNCATED_BODY_MESSAGE, 2))
    if not response and policy.blocking and policy.truncated_body == "pass" and inspected < policy.min_inspected:
        message += f" after only {inspected} bytes: too few to pass it (min_inspected {policy.min_inspected})"
    verdict.body_truncated = True
    verdict.matches.add(id=rule_id, message=message, severity=2, tags=[TRUNCATED_BODY_TAG], phase=phase,
                        matched_data=f"{inspected} bytes inspected, {declared}")
    if policy.denies_truncated(inspected, response) and not verdict.intervention:
        verdict.intervention = True
        verdict.status = TRUNCATED_BODY_STATUS
        verdict.action = waf_pb2.ACTION_DENY
        verdict.log = f"[id \"{rule_id}\"] {message}"


def _text(msg, field: str) -> str:
    """A rule message's text. The binding decodes std::string strictly, so a
    message or logdata quoting the request's own non-UTF-8 bytes raises: an
    attacker could otherwise turn a match into an engine failure (a pass
    under the open failure policy) just by adding a \\xff next to the attack."""
    try:
        return getattr(msg, field)
    except UnicodeDecodeError:
        return UNDECODABLE
