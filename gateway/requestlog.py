"""Per-request log lines of the gateway, keyed by HAProxy's unique-id.

Blocks are logged at info, passes and detect-only matches at debug. By
default a line carries ids only (unique-id, frontend, app, rule ids, status):
nothing the client wrote. GATEWAY_LOG_REQUEST_DATA adds the Host header and
the first match's matched data. Bodies are never logged.
"""

from __future__ import annotations

import difflib
import logging
import time

from gateway import mapping, setvars
from gateway.server import GatewayHooks

log = logging.getLogger("gateway.requests")

MATCHED_DATA_CHARS = 200
# A broken SPOE file breaks every request: warn at once, then once a minute
# per (problem, message, argument) with how many were refused meanwhile.
WARN_EVERY_S = 60.0
MAX_KEYS = 256  # distinct problems and ignored names remembered (a hostile SPOP peer chooses names)


class RequestLog(GatewayHooks):
    def __init__(self, request_data: bool = False, clock=time.monotonic) -> None:
        self.request_data = request_data
        self._clock = clock
        self._warned: dict[tuple, list] = {}   # key -> [last warning time, refused since]
        self._ignored: set[tuple[str, str]] = set()
        # Read once: LOG_LEVEL does not change at run time, and a request
        # that will not be logged must not pay for building its event.
        self.info = log.isEnabledFor(logging.INFO)
        self.debug = log.isEnabledFor(logging.DEBUG)

    def verdict(self, context: mapping.RequestContext, verdict, seconds: float) -> None:
        if not (self.debug or (self.info and verdict.intervention)):
            return
        event = {"unique_id": context.unique_id, "frontend": context.frontend,
                 "app": verdict.application or context.app,
                 "status": verdict.status, "action": setvars.ACTION_NAMES.get(verdict.action, "pass"),
                 "rules": [m.id for m in verdict.matches], "ms": round(seconds * 1000, 3)}
        if context.body_truncated:
            event["body_truncated"] = True
        if self.request_data:
            event["host"] = context.host
            if verdict.matches:
                event["matched_data"] = verdict.matches[0].matched_data[:MATCHED_DATA_CHARS]
        if verdict.intervention:
            log.info("request blocked", extra=event)
        else:
            log.debug("request passed", extra=event)

    def response_verdict(self, context: mapping.RequestContext, verdict, seconds: float) -> None:
        if not (self.debug or (self.info and verdict.intervention)):
            return
        event = {"unique_id": context.unique_id, "frontend": context.frontend, "app": context.app,
                 "status": verdict.status, "action": setvars.ACTION_NAMES.get(verdict.action, "pass"),
                 "rules": [m.id for m in verdict.matches], "ms": round(seconds * 1000, 3)}
        if context.body_truncated:
            event["body_truncated"] = True
        if self.request_data and verdict.matches:
            event["matched_data"] = verdict.matches[0].matched_data[:MATCHED_DATA_CHARS]
        if verdict.intervention:
            log.info("response blocked", extra=event)
        else:
            log.debug("response passed", extra=event)

    def response_miss(self, context: mapping.RequestContext, failure, policy, seconds: float) -> None:
        # Counted in metrics; one line each only at debug: a replica that
        # dies takes many transactions with it.
        if self.debug:
            log.debug("response's transaction gone; miss policy applied", extra={
                "unique_id": context.unique_id, "reason": failure.miss.value, "policy": policy.value,
                "ms": round(seconds * 1000, 3)})

    def invalid_message(self, error: mapping.InvalidMessage) -> None:
        key = (error.problem, error.message, error.argument)
        now = self._clock()
        state = self._warned.get(key)
        if state is not None:
            state[1] += 1
            if now - state[0] < WARN_EVERY_S:
                return
        elif len(self._warned) >= MAX_KEYS:
            return
        refused = state[1] if state is not None else 1
        self._warned[key] = [now, 0]
        log.warning("SPOE message refused, failure policy applied: fix the SPOE file", extra={
            "problem": error.problem.value, "spoe_message": error.message, "argument": error.argument,
            "reason": str(error), "fix": error.hint, "refused": refused})

    def ignored(self, message: str, argument: str) -> None:
        """Logs, the first time it appears, a name the gateway ignores: a
        typo in the SPOE file shows up (uri misspelt url: that one is also
        refused, as missing)."""
        key = (message, argument)
        if key in self._ignored or len(self._ignored) >= MAX_KEYS:
            return
        self._ignored.add(key)
        if not argument:
            log.warning("SPOE message ignored: the gateway evaluates only one of its messages per NOTIFY",
                        extra={"spoe_message": message})
            return
        schema = mapping.MESSAGES.get(message)
        known = [a.name for a in schema.arguments] if schema else []
        close = difflib.get_close_matches(argument, known, n=1)
        log.warning("SPOE argument unknown to the gateway; ignored", extra={
            "spoe_message": message, "argument": argument,
            "fix": f"did you mean {close[0]!r}?" if close else f"known arguments: {' '.join(known)}"})
