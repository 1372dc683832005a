"""Why a request got no verdict, as a value: the pool, the server and the
metrics pass it along; nothing parses text back.

The failure policy answers every NoVerdict (closed: deny 503, open: pass),
and txn.modsec.error carries str(no_verdict).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import grpc

_GRPC_CODES = frozenset(code.name for code in grpc.StatusCode)


class Failure(Enum):
    TIMEOUT = "timeout"                  # no verdict within the deadline
    UNAVAILABLE = "unavailable"          # no stream could carry it: wafsvc down, or out of retries
    REFUSED = "refused"                  # wafsvc answered this request with an error (code, reason)
    INVALID_MESSAGE = "invalid_message"  # the SPOE message could not be used (mapping.InvalidMessage)
    INTERNAL = "internal"                # a gateway bug while mapping the request


@dataclass(frozen=True, slots=True)
class NoVerdict:
    failure: Failure
    detail: str = ""
    code: str = ""    # REFUSED: the gRPC status code name wafsvc gave, e.g. "INVALID_ARGUMENT"
    reason: int = 0   # REFUSED: waf.v1.ErrorReason

    @property
    def label(self) -> str:
        """Bounded metric label: the failure, or wafsvc's code in lower case."""
        if self.failure is Failure.REFUSED:
            return self.code.lower() if self.code in _GRPC_CODES else "other"
        return self.failure.value

    def __str__(self) -> str:
        if self.failure is Failure.REFUSED:
            return f"{self.code}: {self.detail}"
        return self.detail or self.failure.value


TIMED_OUT = NoVerdict(Failure.TIMEOUT, "no verdict within the deadline")
STREAM_FAILED = NoVerdict(Failure.UNAVAILABLE, "wafsvc stream failed and no retry was possible")
