"""One exception tree for every failure of a call to wafsvc.

Catch `WafError` for "no verdict", or a subclass for what you mean:

    WafError
    ├── WafUnavailable        no replica answered (connection refused, reset, draining)
    ├── WafTimeout            no verdict within the deadline, retries included
    ├── InvalidRequest        wafsvc refused the request itself (reason says why)
    │   └── IgnoreListRefused an ignore_rule_ids list wafsvc would not build now
    ├── UnknownApplication    the named application is not configured
    ├── TransactionLost       response inspection: the kept transaction is gone
    ├── EngineError           libmodsecurity failed on the request
    └── AuthError             missing or wrong token, or a TLS identity refused

Every error carries `reason` (an ErrorReason) and `code` (the gRPC status
name), both typed values: match on them, never on the message.
"""

from __future__ import annotations

import enum

import grpc

from wafapi import waf_pb2

ErrorReason = enum.IntEnum("ErrorReason", {name: number for name, number in waf_pb2.ErrorReason.items()})
ErrorReason.__doc__ = "Why wafsvc gave no verdict (waf.v1.ErrorReason)."

REASON_METADATA = "x-waf-error-reason"


class WafError(Exception):
    """No verdict. `retryable` says whether another replica could give one."""

    retryable = False

    def __init__(self, message: str, *, code: str = "UNKNOWN",
                 reason: ErrorReason = ErrorReason.ERROR_REASON_UNSPECIFIED) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.reason = reason

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, code={self.code}, reason={self.reason.name})"


class WafUnavailable(WafError):
    retryable = True


class WafTimeout(WafError):
    pass


class InvalidRequest(WafError):
    """The request breaks a limit or holds bytes the engine would not see."""


class IgnoreListRefused(InvalidRequest):
    retryable = True  # the rate limit is per worker: another may take it


class UnknownApplication(WafError):
    pass


class TransactionLost(WafError):
    """The transaction kept for response inspection is gone (expired, evicted,
    rules reloaded, worker restarted, or the call reached another worker).
    Apply your response-miss policy."""


class EngineError(WafError):
    retryable = True


class AuthError(WafError):
    pass


_TRANSACTION_REASONS = {ErrorReason.TRANSACTION_EXPIRED, ErrorReason.TRANSACTION_EVICTED,
                        ErrorReason.TRANSACTION_RELOADED, ErrorReason.TRANSACTION_UNKNOWN,
                        ErrorReason.TRANSACTION_OTHER_WORKER}

_BY_CODE = {
    "UNAVAILABLE": WafUnavailable,
    "DEADLINE_EXCEEDED": WafTimeout,
    "INVALID_ARGUMENT": InvalidRequest,
    "RESOURCE_EXHAUSTED": InvalidRequest,
    "INTERNAL": EngineError,
    "UNAUTHENTICATED": AuthError,
    "PERMISSION_DENIED": AuthError,
    "NOT_FOUND": UnknownApplication,
}


def reason_named(name: str) -> ErrorReason:
    try:
        return ErrorReason[name]
    except KeyError:  # a newer server's reason: still an error, just unnamed here
        return ErrorReason.ERROR_REASON_UNSPECIFIED


def reason_of(number: int) -> ErrorReason:
    try:
        return ErrorReason(number)
    except ValueError:
        return ErrorReason.ERROR_REASON_UNSPECIFIED


def error_for(code: str, message: str, reason: ErrorReason = ErrorReason.ERROR_REASON_UNSPECIFIED) -> WafError:
    """The exception for a status code name and an ErrorReason (unary or stream)."""
    if reason in _TRANSACTION_REASONS:
        cls = TransactionLost
    elif reason == ErrorReason.IGNORE_LIST_REFUSED:
        cls = IgnoreListRefused
    elif reason == ErrorReason.DRAINING:
        cls = WafUnavailable
    else:
        cls = _BY_CODE.get(code, WafError)
    return cls(message or code, code=code, reason=reason)


def from_rpc_error(exc: grpc.RpcError) -> WafError:
    """A failed unary call (sync or aio) as a WafError; the ErrorReason comes
    from the trailing metadata wafsvc sets, never from the message."""
    code = exc.code()
    name = code.name if code is not None else "UNKNOWN"
    reason = ErrorReason.ERROR_REASON_UNSPECIFIED
    for key, value in exc.trailing_metadata() or ():
        if key == REASON_METADATA:
            reason = reason_named(value.decode() if isinstance(value, bytes) else value)
    return error_for(name, exc.details() or name, reason)
