"""Why a request got no verdict, as a value: the pool, the server and the
metrics pass it along; nothing parses text back.

The failure policy answers every NoVerdict (closed: deny 503, open: pass),
and txn.modsec.error carries str(no_verdict). A response whose held
transaction is gone is a miss (Failure.MISS, with its MissReason): the miss
policy answers it instead, at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import grpc

from wafapi import waf_pb2

_GRPC_CODES = frozenset(code.name for code in grpc.StatusCode)


class Failure(Enum):
    TIMEOUT = "timeout"                  # no verdict within the deadline
    UNAVAILABLE = "unavailable"          # no stream could carry it: wafsvc down, or out of retries
    REFUSED = "refused"                  # wafsvc answered this request with an error (code, reason)
    INVALID_MESSAGE = "invalid_message"  # the SPOE message could not be used (mapping.InvalidMessage)
    INTERNAL = "internal"                # a gateway bug while mapping the request
    MISS = "miss"                        # a response whose held transaction is gone (MissReason)


class MissReason(Enum):
    """Why a response found no held transaction; the value is the metric label.
    The first five are wafsvc's (waf.v1.ErrorReason TRANSACTION_*), the
    others the gateway's own."""
    EXPIRED = "expired"            # waited longer than wafsvc's WAF_TRANSACTION_TTL_MS
    EVICTED = "evicted"            # pushed out by newer ones (WAF_MAX_HELD_TRANSACTIONS)
    RELOADED = "reloaded"          # rules reloaded twice within its TTL
    UNKNOWN = "unknown"            # never held, already used, or its worker restarted
    OTHER_WORKER = "other_worker"  # reached a worker that does not hold it (never expected)
    NO_ROUTE = "no_route"          # the gateway has no stream to the worker named: it died or is draining
    WORKER_HUNG = "worker_hung"    # that worker does not answer (GATEWAY_HEDGE_MS): no other can evaluate it
    NO_HANDLE = "no_handle"        # the response message carried no handle: its request was not kept


MISS_REASONS = {waf_pb2.TRANSACTION_EXPIRED: MissReason.EXPIRED, waf_pb2.TRANSACTION_EVICTED: MissReason.EVICTED,
                waf_pb2.TRANSACTION_RELOADED: MissReason.RELOADED, waf_pb2.TRANSACTION_UNKNOWN: MissReason.UNKNOWN,
                waf_pb2.TRANSACTION_OTHER_WORKER: MissReason.OTHER_WORKER}


@dataclass(frozen=True, slots=True)
class NoVerdict:
    failure: Failure
    detail: str = ""
    code: str = ""    # REFUSED: the gRPC status code name wafsvc gave, e.g. "INVALID_ARGUMENT"
    reason: int = 0   # REFUSED and MISS from wafsvc: waf.v1.ErrorReason
    miss: MissReason | None = None  # MISS: why

    @property
    def label(self) -> str:
        """Bounded metric label: the failure, or wafsvc's code in lower case."""
        if self.failure is Failure.REFUSED:
            return self.code.lower() if self.code in _GRPC_CODES else "other"
        return self.failure.value

    @property
    def is_miss(self) -> bool:
        return self.failure is Failure.MISS

    def __str__(self) -> str:
        if self.failure is Failure.REFUSED:
            return f"{self.code}: {self.detail}"
        if self.failure is Failure.MISS:
            return f"transaction {self.miss.value}: {self.detail}" if self.detail else f"transaction {self.miss.value}"
        return self.detail or self.failure.value


TIMED_OUT = NoVerdict(Failure.TIMEOUT, "no verdict within the deadline")
STREAM_FAILED = NoVerdict(Failure.UNAVAILABLE, "wafsvc stream failed and no retry was possible")
NO_ROUTE = NoVerdict(Failure.MISS, "no stream to the worker that holds it", miss=MissReason.NO_ROUTE)
WORKER_HUNG = NoVerdict(Failure.MISS, "the worker that holds it does not answer", miss=MissReason.WORKER_HUNG)
NO_HANDLE = NoVerdict(Failure.MISS, "the request was not kept for its response", miss=MissReason.NO_HANDLE)


def refusal(code: str, message: str, reason: int) -> NoVerdict:
    """What wafsvc's EvaluationError means: a miss when the transaction is
    gone (NOT_FOUND with a TRANSACTION_* reason), else a refusal."""
    miss = MISS_REASONS.get(reason)
    if miss is not None:
        return NoVerdict(Failure.MISS, "", code, reason, miss)
    return NoVerdict(Failure.REFUSED, message, code, reason)
