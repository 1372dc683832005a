"""What wafsvc accepts, checked before the engine runs: wafsvc is the
boundary, whoever the caller is.

Two kinds of refusal, both INVALID_ARGUMENT with an ErrorReason:
- **Bytes the engine would not see.** libmodsecurity takes the method, URI,
  HTTP version, addresses and transaction id as C strings and silently cuts
  them at the first NUL byte: "/?a=1\\0' or 1=1" is inspected as "/?a=1".
  Those fields, and the application name, are refused when they hold a NUL
  (FIELD_HAS_NUL). Header values and bodies are passed with their length
  and are inspected whole (probed field by field,
  tests/e2e/test_api_hardening.py): a NUL there is judged by the rules (CRS
  920270 denies one in a header, and HAProxy 2.6 does pass it on). Header
  names must be HTTP tokens. Malformed fields are FIELD_INVALID.
- **Limits** (LIMIT_*): header count, header bytes, URI bytes and body bytes,
  each a setting with a default a little above what HAProxy can send
  (tune.http.maxhdr 101 headers; the shipped tune.bufsize of 64 KiB bounds
  the request head and the body). 20,000 headers kept a worker busy for
  over 3 s before these existed.

New ignore lists cost a rule-set compile (~70 ms with CRS) on the worker's
event loop, and the engine holds the GIL, so a thread would not help:
IgnoreListBudget rate-limits them per worker (lists preloaded from config
are free).
"""

from __future__ import annotations

import ipaddress
import re
import time
from dataclasses import dataclass

from wafapi import waf_pb2
from wafsvc.errors import EvaluationFailed

# RFC 9110 tokens: methods and header names.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION = re.compile(r"[0-9](\.[0-9])?")
MAX_TRANSACTION_ID = 256
MAX_IGNORED_IDS = 64


@dataclass(frozen=True)
class Limits:
    max_headers: int = 128
    max_header_bytes: int = 80 * 1024   # names plus values
    max_uri_bytes: int = 80 * 1024
    max_body_bytes: int = 128 * 1024


def _refuse(reason: int, message: str) -> EvaluationFailed:
    return EvaluationFailed("INVALID_ARGUMENT", message, reason)


def _no_nul(field: str, value: str | bytes) -> None:
    if ("\0" if isinstance(value, str) else b"\0") in value:
        raise _refuse(waf_pb2.FIELD_HAS_NUL, f"{field} holds a NUL byte; the engine would not inspect "
                                             f"what follows it")


def _check_headers(headers, limits: Limits, what: str) -> None:
    if len(headers) > limits.max_headers:
        raise _refuse(waf_pb2.LIMIT_HEADER_COUNT, f"{len(headers)} {what} headers, more than the "
                                                  f"{limits.max_headers} allowed (WAF_MAX_HEADERS)")
    total = 0
    for header in headers:
        name, value = header.name, header.value
        total += len(name) + len(value)
        if not _TOKEN.fullmatch(name):
            _no_nul(f"{what} header name {name[:64]!r}", name)
            raise _refuse(waf_pb2.FIELD_INVALID, f"{what} header name {name[:64]!r} is not an HTTP token")
    if total > limits.max_header_bytes:
        raise _refuse(waf_pb2.LIMIT_HEADER_BYTES, f"{what} headers hold {total} bytes, more than the "
                                                  f"{limits.max_header_bytes} allowed (WAF_MAX_HEADER_BYTES)")


def _check_body(body: bytes, content_length: int, limits: Limits) -> None:
    if len(body) > limits.max_body_bytes:
        raise _refuse(waf_pb2.LIMIT_BODY_BYTES, f"request body of {len(body)} bytes, more than the "
                                                f"{limits.max_body_bytes} allowed (WAF_MAX_BODY_BYTES); cut it "
                                                f"and set body_truncated to have the rest judged by policy")
    if content_length < -1:
        raise _refuse(waf_pb2.FIELD_INVALID, f"content_length {content_length}: -1 (none) or a length")


def _check_version(version: str) -> None:
    _no_nul("http_version", version)
    if version and not _VERSION.fullmatch(version):
        raise _refuse(waf_pb2.FIELD_INVALID, f"http_version {version[:16]!r}: expected e.g. '1.1' or '2.0'")


def _check_transaction_id(transaction_id: str) -> None:
    _no_nul("transaction_id", transaction_id)
    if len(transaction_id) > MAX_TRANSACTION_ID:
        raise _refuse(waf_pb2.FIELD_INVALID, f"transaction_id of {len(transaction_id)} characters, "
                                             f"at most {MAX_TRANSACTION_ID}")


def _check_address(field: str, ip: str, port: int) -> None:
    if ip:
        _no_nul(field, ip)
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            raise _refuse(waf_pb2.FIELD_INVALID, f"{field} {ip[:64]!r} is not an IP address") from None
    if port > 65535:
        raise _refuse(waf_pb2.FIELD_INVALID, f"{field.replace('_ip', '_port')} {port} is not a port")


def check_request(req: waf_pb2.EvaluateRequest, limits: Limits) -> None:
    """Raises EvaluationFailed (INVALID_ARGUMENT, an ErrorReason) unless every
    byte of the request would reach the engine and it is within the limits."""
    if len(req.uri) > limits.max_uri_bytes:
        raise _refuse(waf_pb2.LIMIT_URI_BYTES, f"URI of {len(req.uri)} bytes, more than the "
                                               f"{limits.max_uri_bytes} allowed (WAF_MAX_URI_BYTES)")
    _check_headers(req.headers, limits, "request")
    _check_body(req.body, req.content_length, limits)
    method = req.method.encode("utf-8", "surrogateescape")
    _no_nul("method", method)
    if not _TOKEN.fullmatch(method):
        raise _refuse(waf_pb2.FIELD_INVALID, f"method {req.method[:32]!r} is not an HTTP token")
    _no_nul("uri", req.uri)
    if not req.uri:
        raise _refuse(waf_pb2.FIELD_INVALID, "uri is required (at least '/')")
    _check_version(req.http_version)
    _check_address("client_ip", req.client_ip, req.client_port)
    _check_address("server_ip", req.server_ip, req.server_port)
    _check_transaction_id(req.transaction_id)
    _no_nul("application", req.application)
    if len(req.ignore_rule_ids) > MAX_IGNORED_IDS:
        raise EvaluationFailed("INVALID_ARGUMENT", f"{len(req.ignore_rule_ids)} ignored rule ids, at most "
                               f"{MAX_IGNORED_IDS}", waf_pb2.IGNORE_LIST_REFUSED)


def check_response(resp: waf_pb2.ResponseRequest, limits: Limits) -> None:
    """The same for the response of a kept transaction, but for its body:
    the engine inspects the first SecResponseBodyLimit bytes of it and flags
    the rest (99011), so a long response body is judged, not refused."""
    if not 100 <= resp.status <= 999:
        raise _refuse(waf_pb2.FIELD_INVALID, f"status {resp.status} is not an HTTP status code")
    _check_headers(resp.headers, limits, "response")
    if resp.content_length < -1:
        raise _refuse(waf_pb2.FIELD_INVALID, f"content_length {resp.content_length}: -1 (none) or a length")
    _check_version(resp.http_version)
    _check_transaction_id(resp.transaction_id)
    _no_nul("transaction_handle", resp.transaction_handle)


class IgnoreListBudget:
    """How many ignore lists a worker may compile on demand: a token bucket
    of `per_minute` lists, refilled continuously. 0 refuses every list that
    is not preloaded (WAF_IGNORE_PRELOAD). Lists already built (preloaded or
    cached) cost nothing and are never counted."""

    def __init__(self, per_minute: int, clock=time.monotonic) -> None:
        if per_minute < 0:
            raise ValueError("per_minute must be 0 or more")
        self.per_minute = per_minute
        self._clock = clock
        self._tokens = float(per_minute)
        self._at = clock()

    def take(self) -> bool:
        now = self._clock()
        self._tokens = min(self.per_minute, self._tokens + (now - self._at) * self.per_minute / 60)
        self._at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False


class Limited:
    """The engine as the service sees it, with every request and response
    checked first: the one place the checks run, whatever the call (unary
    or stream, request or response). Everything else passes through."""

    def __init__(self, engine, limits: Limits) -> None:
        self._engine = engine
        self.limits = limits

    def __getattr__(self, name: str):
        return getattr(self._engine, name)

    def evaluate(self, req: waf_pb2.EvaluateRequest, verdict: waf_pb2.Verdict | None = None) -> waf_pb2.Verdict:
        check_request(req, self.limits)
        return self._engine.evaluate(req, verdict)

    def evaluate_response(self, resp: waf_pb2.ResponseRequest,
                          verdict: waf_pb2.Verdict | None = None) -> waf_pb2.Verdict:
        check_response(resp, self.limits)
        return self._engine.evaluate_response(resp, verdict)
