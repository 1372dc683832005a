from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Action(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACTION_UNSPECIFIED: _ClassVar[Action]
    ACTION_PASS: _ClassVar[Action]
    ACTION_DENY: _ClassVar[Action]
    ACTION_REDIRECT: _ClassVar[Action]
    ACTION_DROP: _ClassVar[Action]

class ErrorReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_REASON_UNSPECIFIED: _ClassVar[ErrorReason]
    ENGINE_ERROR: _ClassVar[ErrorReason]
    LIMIT_HEADER_COUNT: _ClassVar[ErrorReason]
    LIMIT_HEADER_BYTES: _ClassVar[ErrorReason]
    LIMIT_URI_BYTES: _ClassVar[ErrorReason]
    LIMIT_BODY_BYTES: _ClassVar[ErrorReason]
    FIELD_HAS_NUL: _ClassVar[ErrorReason]
    FIELD_INVALID: _ClassVar[ErrorReason]
    UNKNOWN_APPLICATION: _ClassVar[ErrorReason]
    IGNORE_LIST_REFUSED: _ClassVar[ErrorReason]
    TRANSACTION_EXPIRED: _ClassVar[ErrorReason]
    TRANSACTION_EVICTED: _ClassVar[ErrorReason]
    TRANSACTION_RELOADED: _ClassVar[ErrorReason]
    TRANSACTION_UNKNOWN: _ClassVar[ErrorReason]
    TRANSACTION_OTHER_WORKER: _ClassVar[ErrorReason]
    DRAINING: _ClassVar[ErrorReason]
ACTION_UNSPECIFIED: Action
ACTION_PASS: Action
ACTION_DENY: Action
ACTION_REDIRECT: Action
ACTION_DROP: Action
ERROR_REASON_UNSPECIFIED: ErrorReason
ENGINE_ERROR: ErrorReason
LIMIT_HEADER_COUNT: ErrorReason
LIMIT_HEADER_BYTES: ErrorReason
LIMIT_URI_BYTES: ErrorReason
LIMIT_BODY_BYTES: ErrorReason
FIELD_HAS_NUL: ErrorReason
FIELD_INVALID: ErrorReason
UNKNOWN_APPLICATION: ErrorReason
IGNORE_LIST_REFUSED: ErrorReason
TRANSACTION_EXPIRED: ErrorReason
TRANSACTION_EVICTED: ErrorReason
TRANSACTION_RELOADED: ErrorReason
TRANSACTION_UNKNOWN: ErrorReason
TRANSACTION_OTHER_WORKER: ErrorReason
DRAINING: ErrorReason

class Header(_message.Message):
    __slots__ = ("name", "value")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    name: bytes
    value: bytes
    def __init__(self, name: _Optional[bytes] = ..., value: _Optional[bytes] = ...) -> None: ...

class EvaluateRequest(_message.Message):
    __slots__ = ("transaction_id", "client_ip", "client_port", "server_ip", "server_port", "method", "uri", "http_version", "headers", "body", "body_truncated", "content_length", "application", "ignore_rule_ids", "inspect_response")
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_IP_FIELD_NUMBER: _ClassVar[int]
    CLIENT_PORT_FIELD_NUMBER: _ClassVar[int]
    SERVER_IP_FIELD_NUMBER: _ClassVar[int]
    SERVER_PORT_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    HTTP_VERSION_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    BODY_TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    CONTENT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    APPLICATION_FIELD_NUMBER: _ClassVar[int]
    IGNORE_RULE_IDS_FIELD_NUMBER: _ClassVar[int]
    INSPECT_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    transaction_id: str
    client_ip: str
    client_port: int
    server_ip: str
    server_port: int
    method: str
    uri: bytes
    http_version: str
    headers: _containers.RepeatedCompositeFieldContainer[Header]
    body: bytes
    body_truncated: bool
    content_length: int
    application: str
    ignore_rule_ids: _containers.RepeatedScalarFieldContainer[int]
    inspect_response: bool
    def __init__(self, transaction_id: _Optional[str] = ..., client_ip: _Optional[str] = ..., client_port: _Optional[int] = ..., server_ip: _Optional[str] = ..., server_port: _Optional[int] = ..., method: _Optional[str] = ..., uri: _Optional[bytes] = ..., http_version: _Optional[str] = ..., headers: _Optional[_Iterable[_Union[Header, _Mapping]]] = ..., body: _Optional[bytes] = ..., body_truncated: _Optional[bool] = ..., content_length: _Optional[int] = ..., application: _Optional[str] = ..., ignore_rule_ids: _Optional[_Iterable[int]] = ..., inspect_response: _Optional[bool] = ...) -> None: ...

class ResponseRequest(_message.Message):
    __slots__ = ("transaction_handle", "status", "http_version", "headers", "body", "body_truncated", "content_length", "transaction_id")
    TRANSACTION_HANDLE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    HTTP_VERSION_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    BODY_TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    CONTENT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    transaction_handle: str
    status: int
    http_version: str
    headers: _containers.RepeatedCompositeFieldContainer[Header]
    body: bytes
    body_truncated: bool
    content_length: int
    transaction_id: str
    def __init__(self, transaction_handle: _Optional[str] = ..., status: _Optional[int] = ..., http_version: _Optional[str] = ..., headers: _Optional[_Iterable[_Union[Header, _Mapping]]] = ..., body: _Optional[bytes] = ..., body_truncated: _Optional[bool] = ..., content_length: _Optional[int] = ..., transaction_id: _Optional[str] = ...) -> None: ...

class RuleMatch(_message.Message):
    __slots__ = ("id", "message", "severity", "tags", "matched_data", "phase")
    ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SEVERITY_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    MATCHED_DATA_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    id: int
    message: str
    severity: int
    tags: _containers.RepeatedScalarFieldContainer[str]
    matched_data: str
    phase: int
    def __init__(self, id: _Optional[int] = ..., message: _Optional[str] = ..., severity: _Optional[int] = ..., tags: _Optional[_Iterable[str]] = ..., matched_data: _Optional[str] = ..., phase: _Optional[int] = ...) -> None: ...

class Verdict(_message.Message):
    __slots__ = ("intervention", "status", "redirect_url", "action", "matches", "engine_time_us", "transaction_id", "log", "transaction_handle", "transaction_ttl_ms", "application", "body_truncated")
    INTERVENTION_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REDIRECT_URL_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    MATCHES_FIELD_NUMBER: _ClassVar[int]
    ENGINE_TIME_US_FIELD_NUMBER: _ClassVar[int]
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    LOG_FIELD_NUMBER: _ClassVar[int]
    TRANSACTION_HANDLE_FIELD_NUMBER: _ClassVar[int]
    TRANSACTION_TTL_MS_FIELD_NUMBER: _ClassVar[int]
    APPLICATION_FIELD_NUMBER: _ClassVar[int]
    BODY_TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    intervention: bool
    status: int
    redirect_url: str
    action: Action
    matches: _containers.RepeatedCompositeFieldContainer[RuleMatch]
    engine_time_us: int
    transaction_id: str
    log: str
    transaction_handle: str
    transaction_ttl_ms: int
    application: str
    body_truncated: bool
    def __init__(self, intervention: _Optional[bool] = ..., status: _Optional[int] = ..., redirect_url: _Optional[str] = ..., action: _Optional[_Union[Action, str]] = ..., matches: _Optional[_Iterable[_Union[RuleMatch, _Mapping]]] = ..., engine_time_us: _Optional[int] = ..., transaction_id: _Optional[str] = ..., log: _Optional[str] = ..., transaction_handle: _Optional[str] = ..., transaction_ttl_ms: _Optional[int] = ..., application: _Optional[str] = ..., body_truncated: _Optional[bool] = ...) -> None: ...

class EvaluateBatch(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[BatchRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[BatchRequest, _Mapping]]] = ...) -> None: ...

class BatchRequest(_message.Message):
    __slots__ = ("ref", "request", "response")
    REF_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ref: int
    request: EvaluateRequest
    response: ResponseRequest
    def __init__(self, ref: _Optional[int] = ..., request: _Optional[_Union[EvaluateRequest, _Mapping]] = ..., response: _Optional[_Union[ResponseRequest, _Mapping]] = ...) -> None: ...

class VerdictBatch(_message.Message):
    __slots__ = ("verdicts", "draining")
    VERDICTS_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    verdicts: _containers.RepeatedCompositeFieldContainer[BatchVerdict]
    draining: bool
    def __init__(self, verdicts: _Optional[_Iterable[_Union[BatchVerdict, _Mapping]]] = ..., draining: _Optional[bool] = ...) -> None: ...

class BatchVerdict(_message.Message):
    __slots__ = ("ref", "verdict", "error")
    REF_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ref: int
    verdict: Verdict
    error: EvaluationError
    def __init__(self, ref: _Optional[int] = ..., verdict: _Optional[_Union[Verdict, _Mapping]] = ..., error: _Optional[_Union[EvaluationError, _Mapping]] = ...) -> None: ...

class EvaluationError(_message.Message):
    __slots__ = ("code", "message", "reason")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    reason: ErrorReason
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ..., reason: _Optional[_Union[ErrorReason, str]] = ...) -> None: ...

class ListApplicationsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Application(_message.Message):
    __slots__ = ("name", "is_default", "mode", "failure_policy", "truncated_body", "response_inspection", "transaction_ttl_ms", "response_miss_policy", "rules", "preloaded_ignore_lists", "request_body_limit", "truncated_response_body", "min_inspected_body")
    NAME_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    FAILURE_POLICY_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_BODY_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_INSPECTION_FIELD_NUMBER: _ClassVar[int]
    TRANSACTION_TTL_MS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_MISS_POLICY_FIELD_NUMBER: _ClassVar[int]
    RULES_FIELD_NUMBER: _ClassVar[int]
    PRELOADED_IGNORE_LISTS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_BODY_LIMIT_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_RESPONSE_BODY_FIELD_NUMBER: _ClassVar[int]
    MIN_INSPECTED_BODY_FIELD_NUMBER: _ClassVar[int]
    name: str
    is_default: bool
    mode: str
    failure_policy: str
    truncated_body: str
    response_inspection: bool
    transaction_ttl_ms: int
    response_miss_policy: str
    rules: int
    preloaded_ignore_lists: _containers.RepeatedScalarFieldContainer[str]
    request_body_limit: int
    truncated_response_body: str
    min_inspected_body: int
    def __init__(self, name: _Optional[str] = ..., is_default: _Optional[bool] = ..., mode: _Optional[str] = ..., failure_policy: _Optional[str] = ..., truncated_body: _Optional[str] = ..., response_inspection: _Optional[bool] = ..., transaction_ttl_ms: _Optional[int] = ..., response_miss_policy: _Optional[str] = ..., rules: _Optional[int] = ..., preloaded_ignore_lists: _Optional[_Iterable[str]] = ..., request_body_limit: _Optional[int] = ..., truncated_response_body: _Optional[str] = ..., min_inspected_body: _Optional[int] = ...) -> None: ...

class ListApplicationsResponse(_message.Message):
    __slots__ = ("applications", "unknown_application")
    APPLICATIONS_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_APPLICATION_FIELD_NUMBER: _ClassVar[int]
    applications: _containers.RepeatedCompositeFieldContainer[Application]
    unknown_application: str
    def __init__(self, applications: _Optional[_Iterable[_Union[Application, _Mapping]]] = ..., unknown_application: _Optional[str] = ...) -> None: ...
