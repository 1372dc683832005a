"""SPOE message arguments -> waf.v1.EvaluateRequest. Pure functions: no I/O,
no gRPC calls. The answer, Verdict -> SPOP set-var actions, is gateway/setvars.py.

Three messages are understood: check-request and check-response
(deploy/haproxy/spoe-modsecurity.conf) and the original agent's modsecurity.
Their argument names are the contract (MessageSchema); check-response's
mapping and actions live in gateway/responses.py. A message that lacks what the engine needs is refused with a
typed InvalidMessage, never evaluated as an empty request.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from ipaddress import IPv4Address, IPv6Address
from socket import inet_ntoa

from gateway.spop import SpopError, parse_hdrs_bin
from wafapi import waf_pb2

class Problem(Enum):
    """Why a SPOE message cannot be evaluated; the value is the metric label."""
    UNKNOWN_MESSAGE = "unknown_message"    # a message name the gateway does not know
    MISSING_ARGUMENT = "missing_argument"  # not in the message: the SPOE file lacks it
    NULL_ARGUMENT = "null_argument"        # in the message, but HAProxy's fetch gave nothing
    WRONG_TYPE = "wrong_type"              # e.g. a number where a string belongs
    BAD_VALUE = "bad_value"                # the right type, an unusable value


class InvalidMessage(ValueError):
    """A SPOE message the gateway cannot evaluate. It is never evaluated as
    an empty request: the failure policy answers, and this says what is wrong
    (problem, message, argument) and how to fix the SPOE file (hint)."""

    def __init__(self, problem: Problem, detail: str, message: str = "", argument: str = "",
                 hint: str = "") -> None:
        super().__init__(detail)
        self.problem = problem
        self.detail = detail
        self.message = message
        self.argument = argument
        self.hint = hint
        self.unknown: list[str] = []  # argument names the message carries that no schema knows

    def __str__(self) -> str:
        where = f"spoe-message {self.message}: " if self.message else ""
        what = f"argument {self.argument!r} " if self.argument else ""
        return f"{where}{what}{self.detail}"


@dataclass(frozen=True, slots=True)
class Argument:
    """One argument of a SPOE message the gateway understands."""
    name: str              # as written in the SPOE file
    field: str             # what it fills in the request
    fetch: str             # the sample fetch that gives it, for hints
    required: bool = False  # must be in the message: without it a part of the request goes unseen
    nullable: bool = True   # may be NULL (HAProxy's fetch found nothing)


@dataclass(frozen=True)
class MessageSchema:
    name: str
    arguments: tuple[Argument, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "fields", {a.name: a.field for a in self.arguments})
        object.__setattr__(self, "names", {a.field: a.name for a in self.arguments})

    def missing(self, present) -> Argument | None:
        for arg in self.arguments:
            if arg.required and arg.name not in present:
                return arg
        return None

    def args_line(self) -> str:
        return " ".join(f"{a.name}={a.fetch}" for a in self.arguments)

    def explain(self, exc: InvalidMessage, unknown: list[str]) -> InvalidMessage:
        """Fills in what a mapping error lacks: this message's name, the
        argument as the SPOE file names it, the names no schema knows (a
        misspelt one is often why) and, for an argument, the expected line."""
        exc.message = exc.message or self.name
        exc.unknown = unknown
        exc.argument = self.names.get(exc.argument, exc.argument)
        if exc.argument and not exc.hint:
            exc.hint = f"the gateway expects: args {self.args_line()}"
        return exc


# deploy/haproxy/spoe-modsecurity.conf: every argument, named after its field.
CHECK_REQUEST = MessageSchema("check-request", (
    Argument("id", "id", "unique-id"), Argument("app", "app", "var(txn.modsec.app)"),
    Argument("src", "src", "src"), Argument("src_port", "src_port", "src_port"),
    Argument("dst", "dst", "dst"), Argument("dst_port", "dst_port", "dst_port"),
    Argument("method", "method", "method", required=True, nullable=False),
    Argument("uri", "uri", "url", required=True, nullable=False),
    Argument("ver", "ver", "req.ver"),
    Argument("headers", "headers", "req.hdrs_bin", required=True, nullable=False),
    Argument("body", "body", "req.body", required=True),
    Argument("ignore", "ignore", "var(txn.ignorerules)"), Argument("frontend", "frontend", "fe_name"),
    Argument("body_size", "body_size", "req.body_size"),
    Argument("inspect_response", "inspect_response", "var(txn.modsec.inspect_response)"),
))
# The response of a request kept with inspect_response (http-response
# send-spoe-group). handle may be NULL: the request was not kept (a miss,
# NO_HANDLE), which only a rule sending the group unconditionally causes.
CHECK_RESPONSE = MessageSchema("check-response", (
    Argument("handle", "handle", "var(txn.modsec.handle)", required=True),
    Argument("id", "id", "unique-id"), Argument("app", "app", "var(txn.modsec.app)"),
    Argument("method", "method", "method"),
    Argument("status", "status", "status", required=True, nullable=False),
    Argument("ver", "ver", "res.ver"),
    Argument("headers", "headers", "res.hdrs_bin", required=True, nullable=False),
    Argument("body", "body", "res.body", required=True),
    Argument("body_size", "body_size", "res.body_size"),
    Argument("frontend", "frontend", "fe_name"),
))
# The original single-process agent's message (README, "Migrating"): its
# users' SPOE files keep working unchanged. The URI is path + "?" + query.
ORIGINAL = MessageSchema("modsecurity", (
    Argument("method", "method", "method", required=True, nullable=False),
    Argument("path", "path", "path", required=True, nullable=False),
    Argument("query", "query", "query", required=True),  # NULL when the URL has no "?"
    Argument("reqver", "ver", "req.ver"), Argument("ip", "src", "src"),
    Argument("reqhdrs", "headers", "req.hdrs_bin", required=True, nullable=False),
    Argument("reqbody", "body", "req.body", required=True),
    Argument("ignorerules", "ignore", "var(txn.ignorerules)"),
))
MESSAGES = {schema.name: schema for schema in (CHECK_REQUEST, ORIGINAL, CHECK_RESPONSE)}
REQUEST_MESSAGE = CHECK_REQUEST.name


@dataclass(frozen=True, slots=True)
class RequestContext:
    """What the gateway keeps beside the request for logs and metrics."""
    unique_id: str
    frontend: str
    host: str
    app: str
    body_truncated: bool  # the gateway's detection (body_was_cut); wafsvc's verdict echoes it
    original_agent: bool = False  # the original agent's message: its answers set sess.modsec.body_truncated


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


def _wrong_type(name: str, value, wanted: str) -> InvalidMessage:
    return InvalidMessage(Problem.WRONG_TYPE, f"should be {wanted}, got {type(value).__name__}",
                          argument=name)


def _text(value, name: str) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, str):
        return _utf8(value)
    raise _wrong_type(name, value, "a string")


def _raw(value, name: str) -> bytes:
    if value is None:
        return b""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    raise _wrong_type(name, value, "a string or binary")


def _address(value, name: str) -> str:
    if value is None:
        return ""
    if type(value) is IPv4Address:
        return inet_ntoa(value.packed)  # str() of the same, 3x faster (hot path)
    if isinstance(value, (IPv4Address, IPv6Address)):
        return str(value)
    if isinstance(value, str):
        return _utf8(value)
    raise _wrong_type(name, value, "an address")


def _port(value, name: str) -> int:
    if value is None:
        return 0
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 65535:
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        raise InvalidMessage(Problem.BAD_VALUE, f"should be a port number, got {value!r}", argument=name)
    raise _wrong_type(name, value, "a port number")


def _int(value, name: str) -> int:
    if value is None:
        return -1
    if isinstance(value, int) and not isinstance(value, bool):
        return int(value)
    raise _wrong_type(name, value, "an integer")


def _flag(value, name: str) -> bool:
    """HAProxy's bool(true) or an integer (int(1)); anything else is refused
    rather than guessed."""
    if value is None:
        return False
    if isinstance(value, int):  # bool is an int
        return bool(value)
    raise _wrong_type(name, value, "a boolean (bool(true)) or an integer")


def _rule_ids(text: str, name: str) -> list[int]:
    ids = []
    for token in text.replace(",", " ").split():
        if not (token.isascii() and token.isdigit()) or int(token) == 0:
            raise InvalidMessage(Problem.BAD_VALUE, f"holds {token!r}, which is not a rule id", argument=name)
        ids.append(int(token))
    return ids


# HAProxy keeps this much of tune.bufsize free (tune.maxrewrite, 1024 by
# default) plus some HTX bookkeeping: a body without Content-Length that fills
# the rest may have been cut. Measured: 64,353 body bytes at most with 35
# bytes of headers and tune.bufsize 65536 (HAProxy 2.6 and 3.2).
BUFFER_RESERVE = 1024 + 200


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


def _hint(schema: MessageSchema, arg: Argument) -> str:
    return (f"add {arg.name}={arg.fetch} to the args of spoe-message {schema.name}; "
            f"the gateway expects: args {schema.args_line()}")


def _fields(args, schema: MessageSchema, unknown: list[str]) -> tuple[dict, list[str]]:
    """SPOE arguments -> {field: value}, after checking that every required
    one is there and not NULL. Returns the names the schema does not know,
    which are ignored (the caller logs each the first time it appears)."""
    names = schema.fields
    fields: dict = {}
    for name, value in (args.items() if isinstance(args, dict) else args):
        field = names.get(name)
        if field is None:
            unknown.append(name)
        else:
            fields[field] = value  # the last of duplicates wins, as HAProxy would
    for arg in schema.arguments:
        if not arg.required:
            continue
        field = arg.field
        if field not in fields:
            raise InvalidMessage(Problem.MISSING_ARGUMENT, "is missing", schema.name, field,
                                 _hint(schema, arg))
        if fields[field] is None and not arg.nullable:
            raise InvalidMessage(Problem.NULL_ARGUMENT, f"is NULL (HAProxy's {arg.fetch} gave nothing)",
                                 schema.name, field, f"check that {arg.name}={arg.fetch} applies to "
                                 f"this request (a request without a path, such as OPTIONS *, has no path)")
    return fields, unknown


def _uri(fields: dict, schema: MessageSchema) -> bytes:
    if "uri" in fields:
        uri = _raw(fields["uri"], "uri")
    else:  # the original agent's message: path and query, raw, as on the request line
        uri = _raw(fields["path"], "path")
        query = fields.get("query")
        if query is not None:
            uri += b"?" + _raw(query, "query")
    if not uri:
        raise InvalidMessage(Problem.BAD_VALUE, "is empty", schema.name, "uri" if "uri" in fields else "path")
    return uri


def build_request(args, default_app: str = "", haproxy_bufsize: int = 0,
                  schema: MessageSchema = CHECK_REQUEST,
                  ) -> tuple[waf_pb2.EvaluateRequest, RequestContext]:
    """Maps the arguments of one message (check-request, or the original
    agent's modsecurity), a dict or (name, value) pairs.

    Headers come from req.hdrs_bin, which keeps order, duplicates and bytes.
    A body cut by HAProxy (tune.bufsize) is flagged (body_was_cut): the
    request says so, never silently, and wafsvc applies WAF_TRUNCATED_BODY.
    Raises InvalidMessage, with the message name filled in, for anything it
    cannot use; unknown argument names are ignored (see unknown_arguments).
    """
    request, context, _ = map_message(args, schema, default_app, haproxy_bufsize)
    return request, context


def read_headers(raw: bytes, fetch: str) -> tuple[list[tuple[bytes, bytes]], int, str]:
    """A hdrs_bin block -> (headers, its Content-Length or -1, its Host).
    `fetch` names it in the error (req.hdrs_bin, res.hdrs_bin)."""
    try:
        headers = parse_hdrs_bin(raw)
    except SpopError as exc:
        raise InvalidMessage(Problem.BAD_VALUE, f"is not a {fetch} block ({exc.message})",
                             argument="headers") from None
    content_length = -1
    host = ""
    for name, value in headers:
        if name == b"content-length":
            try:
                content_length = int(value)
            except ValueError:
                raise InvalidMessage(Problem.BAD_VALUE, "holds a content-length that is not a number",
                                     argument="headers") from None
        elif name == b"host":
            host = value.decode("latin-1")
    return headers, content_length, host


def map_message(args, schema: MessageSchema, default_app: str = "", haproxy_bufsize: int = 0,
                ) -> tuple[waf_pb2.EvaluateRequest, RequestContext, list[str]]:
    """build_request, plus the argument names the schema does not know."""
    unknown: list[str] = []
    try:
        fields, unknown = _fields(args, schema, unknown)
        get = fields.get
        raw_headers = _raw(get("headers"), "headers")
        headers, content_length, host = read_headers(raw_headers, "req.hdrs_bin")
        body = _raw(get("body"), "body")
        truncated = body_was_cut(len(body), content_length, _int(get("body_size"), "body_size"),
                                 len(raw_headers), haproxy_bufsize)
        app = _text(get("app"), "app") or default_app
        req = waf_pb2.EvaluateRequest(
            transaction_id=_text(get("id"), "id"),
            client_ip=_address(get("src"), "src"), client_port=_port(get("src_port"), "src_port"),
            server_ip=_address(get("dst"), "dst"), server_port=_port(get("dst_port"), "dst_port"),
            method=_text(get("method"), "method"),
            uri=_uri(fields, schema),
            http_version=_text(get("ver"), "ver") or "1.1",
            body=body, body_truncated=truncated, content_length=content_length,
            application=app, inspect_response=_flag(get("inspect_response"), "inspect_response"),
        )
        if not req.method:
            raise InvalidMessage(Problem.BAD_VALUE, "is empty", argument="method")
        ignore = _text(get("ignore"), "ignore")
        if ignore:
            req.ignore_rule_ids.extend(_rule_ids(ignore, "ignore"))
        frontend = _text(get("frontend"), "frontend")
    except InvalidMessage as exc:
        raise schema.explain(exc, unknown)
    # add() per header costs half of building Header messages and passing a
    # list (upb copies them): ~7 us less per request with 12 headers.
    add_header = req.headers.add
    for name, value in headers:
        add_header(name=name, value=value)
    context = RequestContext(unique_id=req.transaction_id, frontend=frontend,
                             host=host, app=app, body_truncated=truncated, original_agent=schema is ORIGINAL)
    return req, context, unknown
