"""What the middleware does with a verdict or with no verdict: one decision,
shared by the ASGI and WSGI middleware, so both behave the same; and the
settings both take (Middleware)."""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

from modsec_spoa_client.errors import InvalidRequest, WafError
from modsec_spoa_client.models import Action, Verdict

log = logging.getLogger("modsec_spoa_client.middleware")

FAILURE_POLICIES = ("closed", "open")


class Outcome(enum.Enum):
    PASS = "pass"
    BLOCK = "block"


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    status: int = 0
    location: str = ""
    verdict: Verdict | None = None
    error: WafError | None = None

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"cache-control", b"no-store")]
        if self.location:
            headers.append((b"location", self.location.encode("latin-1", "replace")))
        return headers

    @property
    def body(self) -> bytes:
        if self.error is not None and not isinstance(self.error, InvalidRequest):
            return b"The request could not be checked by the web application firewall.\n"
        return b"The request was refused by the web application firewall.\n"


def decide(verdict: Verdict | None, error: WafError | None, failure_policy: str) -> Decision:
    """A verdict decides; a refused request (InvalidRequest: it breaks a
    limit or holds bytes the engine would not see) is always refused with
    400, since passing it would pass it uninspected; any other failure
    follows the failure policy: closed = 503, open = pass (logged)."""
    if verdict is not None:
        if not verdict.blocked:
            return Decision(Outcome.PASS, verdict=verdict)
        if verdict.action is Action.REDIRECT and verdict.redirect_url:
            return Decision(Outcome.BLOCK, verdict.status or 302, verdict.redirect_url, verdict)
        return Decision(Outcome.BLOCK, verdict.status or 403, verdict=verdict)
    assert error is not None
    if isinstance(error, InvalidRequest):
        log.warning("request refused by wafsvc: %s (%s)", error.message, error.reason.name)
        return Decision(Outcome.BLOCK, 400, error=error)
    if failure_policy == "open":
        log.warning("no verdict, passing (failure policy open): %r", error)
        return Decision(Outcome.PASS, error=error)
    log.warning("no verdict, refusing (failure policy closed): %r", error)
    return Decision(Outcome.BLOCK, 503, error=error)


def check_policy(failure_policy: str) -> str:
    if failure_policy not in FAILURE_POLICIES:
        raise ValueError(f"failure_policy is 'closed' or 'open', got {failure_policy!r}")
    return failure_policy


class Middleware:
    """What the ASGI and WSGI middleware hold: the app they guard, the client
    that judges its requests, the failure policy, the application name."""

    def __init__(self, app, client, *, failure_policy: str = "closed", application: str = "") -> None:
        self.app = app
        self.client = client
        self.failure_policy = check_policy(failure_policy)
        self.application = application
