"""Why an evaluation has no verdict, as a value: a gRPC status code name and
an ErrorReason (proto/waf/v1/waf.proto). Callers match on the reason, never
on the message, which is for logs only."""

from __future__ import annotations

from wafapi import waf_pb2


class EvaluationFailed(Exception):
    """The request (or response) cannot be evaluated.

    code is a grpc.StatusCode name ("INVALID_ARGUMENT", "NOT_FOUND", ...);
    reason a waf_pb2.ErrorReason value, so that the unary call's trailing
    metadata and the stream's EvaluationError both carry it.
    """

    def __init__(self, code: str, message: str, reason: int) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason

    @property
    def reason_name(self) -> str:
        return waf_pb2.ErrorReason.Name(self.reason)


def engine_error(exc: BaseException) -> EvaluationFailed:
    return EvaluationFailed("INTERNAL", f"engine error: {exc}", waf_pb2.ENGINE_ERROR)


def invalid_field(message: str) -> EvaluationFailed:
    return EvaluationFailed("INVALID_ARGUMENT", message, waf_pb2.FIELD_INVALID)
