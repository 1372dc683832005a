"""Per-request log lines of the gateway, keyed by HAProxy's unique-id.

Blocks are logged at info, passes and detect-only matches at debug. By
default a line carries ids only (unique-id, frontend, app, rule ids, status):
nothing the client wrote. GATEWAY_LOG_REQUEST_DATA adds the Host header and
the first match's matched data. Bodies are never logged.
"""

from __future__ import annotations

import logging

from gateway import mapping
from gateway.server import GatewayHooks

log = logging.getLogger("gateway.requests")

MATCHED_DATA_CHARS = 200


class RequestLog(GatewayHooks):
    def __init__(self, request_data: bool = False) -> None:
        self.request_data = request_data
        # Read once: LOG_LEVEL does not change at run time, and a request
        # that will not be logged must not pay for building its event.
        self.info = log.isEnabledFor(logging.INFO)
        self.debug = log.isEnabledFor(logging.DEBUG)

    def verdict(self, context: mapping.RequestContext, verdict, seconds: float) -> None:
        if not (self.debug or (self.info and verdict.intervention)):
            return
        event = {"unique_id": context.unique_id, "frontend": context.frontend, "app": context.app,
                 "status": verdict.status, "action": mapping.ACTION_NAMES.get(verdict.action, "pass"),
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

    def invalid_message(self, reason: str) -> None:
        log.warning("invalid SPOE message; failure policy applied", extra={"reason": reason})
