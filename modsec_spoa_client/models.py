"""What goes in and what comes out: plain Python values, converted to and
from the wire messages in one place. Shared by Client and AsyncClient."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence, Union

from wafapi import waf_pb2

Text = Union[str, bytes]
HeaderItems = Union[Mapping[Text, Text], Iterable[tuple[Text, Text]]]


def _bytes(value: Text) -> bytes:
    # HTTP is bytes. Text is taken as Latin-1, as WSGI and HTTP/1.1 header
    # text are; text Latin-1 cannot hold (e.g. "€") goes as UTF-8.
    if isinstance(value, bytes):
        return value
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return value.encode("utf-8")


def header_list(headers: HeaderItems) -> tuple[tuple[bytes, bytes], ...]:
    items = headers.items() if isinstance(headers, Mapping) else headers
    return tuple((_bytes(name), _bytes(value)) for name, value in items)


class Action(enum.IntEnum):
    UNSPECIFIED = waf_pb2.ACTION_UNSPECIFIED
    PASS = waf_pb2.ACTION_PASS
    DENY = waf_pb2.ACTION_DENY
    REDIRECT = waf_pb2.ACTION_REDIRECT
    DROP = waf_pb2.ACTION_DROP


@dataclass(frozen=True)
class HttpRequest:
    """One HTTP request as received. `uri` is path plus query, undecoded.

    Headers are (name, value) pairs in order, duplicates kept; str values are
    taken as Latin-1. `body_truncated` says the body is shorter than what the
    client sent (cut by you before calling); the application's
    truncated-body policy then applies."""
    method: str = "GET"
    uri: Text = "/"
    headers: HeaderItems = ()
    body: bytes = b""
    http_version: str = "1.1"
    client_ip: str = ""
    client_port: int = 0
    server_ip: str = ""
    server_port: int = 0
    transaction_id: str = ""
    application: str = ""
    ignore_rule_ids: Sequence[int] = ()
    body_truncated: bool = False
    content_length: int | None = None  # None: the request had no Content-Length

    def to_proto(self, inspect_response: bool = False) -> waf_pb2.EvaluateRequest:
        msg = waf_pb2.EvaluateRequest(
            transaction_id=self.transaction_id, client_ip=self.client_ip, client_port=self.client_port,
            server_ip=self.server_ip, server_port=self.server_port, method=self.method,
            uri=_bytes(self.uri), http_version=self.http_version, body=self.body,
            body_truncated=self.body_truncated,
            content_length=-1 if self.content_length is None else self.content_length,
            application=self.application, ignore_rule_ids=self.ignore_rule_ids,
            inspect_response=inspect_response)
        add = msg.headers.add
        for name, value in header_list(self.headers):
            add(name=name, value=value)
        return msg


@dataclass(frozen=True)
class HttpResponse:
    """The response of a request evaluated with inspect_response=True."""
    status: int
    headers: HeaderItems = ()
    body: bytes = b""
    http_version: str = ""
    body_truncated: bool = False
    content_length: int | None = None
    transaction_id: str = ""

    def to_proto(self, handle: str) -> waf_pb2.ResponseRequest:
        msg = waf_pb2.ResponseRequest(
            transaction_handle=handle, status=self.status, http_version=self.http_version,
            body=self.body, body_truncated=self.body_truncated,
            content_length=-1 if self.content_length is None else self.content_length,
            transaction_id=self.transaction_id)
        for name, value in header_list(self.headers):
            msg.headers.add(name=name, value=value)
        return msg


@dataclass(frozen=True)
class RuleMatch:
    id: int
    message: str = ""
    severity: int = 0
    tags: tuple[str, ...] = ()
    matched_data: str = ""
    phase: int = 0


@dataclass(frozen=True)
class Verdict:
    """The engine's answer. `blocked` is what a caller acts on; `matches`
    lists every rule that matched, disruptive or not (detect mode blocks
    nothing but still lists would-be blocks)."""
    action: Action
    status: int = 0
    redirect_url: str = ""
    matches: tuple[RuleMatch, ...] = ()
    transaction_id: str = ""
    application: str = ""
    body_truncated: bool = False
    engine_time_us: int = 0
    log: str = ""
    # Set when the transaction is kept for evaluate_response().
    transaction_handle: str = ""
    transaction_ttl_ms: int = 0
    intervention: bool = False

    @property
    def blocked(self) -> bool:
        return self.intervention

    @property
    def allowed(self) -> bool:
        return not self.intervention

    @property
    def rule_ids(self) -> tuple[int, ...]:
        return tuple(m.id for m in self.matches)

    @classmethod
    def from_proto(cls, msg: waf_pb2.Verdict) -> "Verdict":
        return cls(action=Action(msg.action), status=msg.status, redirect_url=msg.redirect_url,
                   matches=tuple(RuleMatch(m.id, m.message, m.severity, tuple(m.tags), m.matched_data, m.phase)
                                 for m in msg.matches),
                   transaction_id=msg.transaction_id, application=msg.application,
                   body_truncated=msg.body_truncated, engine_time_us=msg.engine_time_us, log=msg.log,
                   transaction_handle=msg.transaction_handle, transaction_ttl_ms=msg.transaction_ttl_ms,
                   intervention=msg.intervention)

    def to_dict(self) -> dict:
        """JSON-ready, for logs and the CLI."""
        return {"blocked": self.blocked, "action": self.action.name.lower(), "status": self.status,
                "redirect_url": self.redirect_url, "transaction_id": self.transaction_id,
                "application": self.application, "body_truncated": self.body_truncated,
                "engine_time_us": self.engine_time_us, "transaction_handle": self.transaction_handle,
                "matches": [{"id": m.id, "message": m.message, "severity": m.severity, "tags": list(m.tags),
                             "matched_data": m.matched_data, "phase": m.phase} for m in self.matches]}


@dataclass(frozen=True)
class Application:
    name: str
    is_default: bool
    mode: str
    failure_policy: str
    truncated_body: str
    response_inspection: bool
    transaction_ttl_ms: int
    response_miss_policy: str
    rules: int
    preloaded_ignore_lists: tuple[str, ...] = field(default=())
    request_body_limit: int = 0

    @classmethod
    def from_proto(cls, msg: waf_pb2.Application) -> "Application":
        return cls(msg.name, msg.is_default, msg.mode, msg.failure_policy, msg.truncated_body,
                   msg.response_inspection, msg.transaction_ttl_ms, msg.response_miss_policy, msg.rules,
                   tuple(msg.preloaded_ignore_lists), msg.request_body_limit)


def worker_of(handle: str) -> str:
    """The x-waf-worker name a transaction handle starts with."""
    worker, sep, _ = handle.rpartition("#")
    return worker if sep else ""
