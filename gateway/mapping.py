"""SPOE message arguments -> waf.v1.EvaluateRequest, and Verdict -> SPOP set-var
actions. Pure functions: no I/O, no gRPC calls.

The argument names are the contract with deploy/haproxy/spoe-modsecurity.conf.
The variables land in HAProxy as txn.modsec.<name> (option var-prefix modsec).
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from socket import inet_ntoa

from gateway.spop import Scope, SetVar, parse_hdrs_bin
from wafapi import waf_pb2

REQUEST_MESSAGE = "check-request"

# Variables the gateway sets; haproxy.cfg acts on them.
VAR_INTERVENTION = "intervention"  # 0/1, the original agent's name
VAR_STATUS = "status"              # HTTP status the engine asked for
VAR_ACTION = "action"              # pass, deny, redirect, drop
VAR_REDIRECT = "redirect"          # redirect URL, only when action is redirect
VAR_RULES = "rules"                # matched rule ids, space separated, in order
VAR_MESSAGE = "message"            # message of the first matched rule
VAR_FAILED = "failed"              # 1 when no verdict could be had
VAR_ERROR = "error"                # why, when failed

ACTION_NAMES = {waf_pb2.ACTION_PASS: "pass", waf_pb2.ACTION_DENY: "deny",
                waf_pb2.ACTION_REDIRECT: "redirect", waf_pb2.ACTION_DROP: "drop"}


class InvalidMessage(ValueError):
    """The SPOE message lacks an argument or carries one of the wrong type."""


@dataclass(frozen=True, slots=True)
class RequestContext:
    """What the gateway keeps beside the request for logs and metrics."""
    unique_id: str
    frontend: str
    host: str
    app: str
    body_truncated: bool


def _utf8(text: str) -> str:
    """Protobuf strings must be valid UTF-8. The codec keeps undecodable bytes
    as surrogates; show them as \\xNN instead of failing the request, which
    could turn into a pass under the open failure policy (unique-id formats
    may carry client-chosen bytes)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _text(args: dict, name: str, required: bool = False) -> str:
    value = args.get(name)
    if value is None:
        if required:
            raise InvalidMessage(f"argument {name!r} is missing")
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, str):
        return _utf8(value)
    raise InvalidMessage(f"argument {name!r} should be a string, got {type(value).__name__}")


def _raw(args: dict, name: str) -> bytes:
    value = args.get(name)
    if value is None:
        return b""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    raise InvalidMessage(f"argument {name!r} should be binary, got {type(value).__name__}")


def _address(args: dict, name: str) -> str:
    value = args.get(name)
    if value is None:
        return ""
    if type(value) is IPv4Address:
        return inet_ntoa(value.packed)  # str() of the same, 3x faster (hot path)
    if isinstance(value, (IPv4Address, IPv6Address)):
        return str(value)
    if isinstance(value, str):
        return _utf8(value)
    raise InvalidMessage(f"argument {name!r} should be an address, got {type(value).__name__}")


def _port(args: dict, name: str) -> int:
    value = args.get(name)
    if value is None:
        return 0
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 65535:
        return int(value)
    raise InvalidMessage(f"argument {name!r} should be a port number, got {value!r}")


def _rule_ids(text: str) -> list[int]:
    ids = []
    for token in text.replace(",", " ").split():
        if not (token.isascii() and token.isdigit()) or int(token) == 0:
            raise InvalidMessage(f"ignorerules: {token!r} is not a rule id")
        ids.append(int(token))
    return ids


# HAProxy keeps this much of tune.bufsize free (tune.maxrewrite, 1024 by
# default) plus some HTX bookkeeping: a body without Content-Length that fills
# the rest may have been cut. Measured: 64,353 body bytes at most with 35
# bytes of headers and tune.bufsize 65536 (HAProxy 2.6 and 3.2).
BUFFER_RESERVE = 1024 + 200


def _int(args: dict, name: str) -> int:
    value = args.get(name)
    if value is None:
        return -1
    if isinstance(value, int) and not isinstance(value, bool):
        return int(value)
    raise InvalidMessage(f"argument {name!r} should be an integer, got {type(value).__name__}")


def body_was_cut(body_len: int, content_length: int, body_size: int, header_bytes: int,
                 bufsize: int) -> bool:
    """True when the body HAProxy sent is (or may be) shorter than the request's.

    - Content-Length larger than what arrived: cut at tune.bufsize.
    - req.body_size (body_size) larger than req.body: for chunked or HTTP/2
      bodies HAProxy counts what it has parsed, beyond the buffer.
    - No Content-Length and a body that fills HAProxy's buffer (bufsize > 0):
      a client that pauses right at the buffer's end shows no other sign.
    """
    if content_length > body_len or body_size > body_len:
        return True
    return (content_length < 0 < body_len and bufsize > 0
            and body_len + header_bytes >= bufsize - BUFFER_RESERVE)


def build_request(args: dict, default_app: str = "",
                  haproxy_bufsize: int = 0) -> tuple[waf_pb2.EvaluateRequest, RequestContext]:
    """Maps the arguments of one check-request message.

    Headers come from req.hdrs_bin, which keeps order, duplicates and bytes.
    A body cut by HAProxy (tune.bufsize) is flagged (body_was_cut): the
    request says so, never silently, and wafsvc applies WAF_TRUNCATED_BODY.
    """
    raw_headers = _raw(args, "headers")
    headers = parse_hdrs_bin(raw_headers) if raw_headers else []
    body = _raw(args, "body")
    content_length = -1
    host = ""
    for name, value in headers:
        if name == b"content-length":
            try:
                content_length = int(value)
            except ValueError:
                raise InvalidMessage("content-length header is not a number") from None
        elif name == b"host":
            host = value.decode("latin-1")
    truncated = body_was_cut(len(body), content_length, _int(args, "body_size"), len(raw_headers),
                             haproxy_bufsize)
    app = _text(args, "app") or default_app
    req = waf_pb2.EvaluateRequest(
        transaction_id=_text(args, "id"),
        client_ip=_address(args, "src"), client_port=_port(args, "src_port"),
        server_ip=_address(args, "dst"), server_port=_port(args, "dst_port"),
        method=_text(args, "method", required=True),
        uri=_raw(args, "uri") or b"/",
        http_version=_text(args, "ver") or "1.1",
        body=body, body_truncated=truncated, content_length=content_length,
        application=app,
    )
    ignore = _text(args, "ignore")
    if ignore:
        req.ignore_rule_ids.extend(_rule_ids(ignore))
    # add() per header costs half of building Header messages and passing a
    # list (upb copies them): ~7 us less per request with 12 headers.
    add_header = req.headers.add
    for name, value in headers:
        add_header(name=name, value=value)
    context = RequestContext(unique_id=req.transaction_id, frontend=_text(args, "frontend"),
                             host=host, app=app, body_truncated=truncated)
    return req, context


def verdict_actions(verdict: waf_pb2.Verdict) -> list:
    actions = [
        SetVar(Scope.TRANSACTION, VAR_INTERVENTION, int(verdict.intervention)),
        SetVar(Scope.TRANSACTION, VAR_STATUS, verdict.status),
        SetVar(Scope.TRANSACTION, VAR_ACTION, ACTION_NAMES.get(verdict.action, "pass")),
    ]
    if verdict.redirect_url:
        actions.append(SetVar(Scope.TRANSACTION, VAR_REDIRECT, verdict.redirect_url))
    if verdict.matches:
        actions.append(SetVar(Scope.TRANSACTION, VAR_RULES, " ".join(str(m.id) for m in verdict.matches)))
        actions.append(SetVar(Scope.TRANSACTION, VAR_MESSAGE, verdict.matches[0].message))
    return actions


def failure_actions(reason: str, fail_closed: bool) -> list:
    """No verdict: deny (503) or pass, and say so either way."""
    return [
        SetVar(Scope.TRANSACTION, VAR_INTERVENTION, int(fail_closed)),
        SetVar(Scope.TRANSACTION, VAR_STATUS, 503 if fail_closed else 0),
        SetVar(Scope.TRANSACTION, VAR_ACTION, "deny" if fail_closed else "pass"),
        SetVar(Scope.TRANSACTION, VAR_FAILED, 1),
        SetVar(Scope.TRANSACTION, VAR_ERROR, reason[:200]),
    ]
