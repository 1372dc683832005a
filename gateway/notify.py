"""A NOTIFY frame straight into EvaluateRequest (or ResponseRequest) bytes,
in one pass.

AgentConnection(notify_decoder=NotifyDecoder(...)) calls it for every NOTIFY
instead of building Message and argument tuples: string and binary values
are sliced out of the frame and copied into the protobuf bytes as they are.
It decodes exactly what gateway/spop/frames.py would (the same SpopError for
a malformed frame, so the connection's protocol errors do not change) and
maps exactly what gateway.mapping.build_request (check-response:
gateway.responses.build_response) would (the same InvalidMessage problem and
argument): tests/unit/test_notify.py compares both, byte for byte, on
generated messages. The typed values' checks are in gateway/argvalues.py.
"""

from __future__ import annotations

from socket import inet_ntoa

from gateway import mapping
from gateway import protowire as pw
from gateway import responses
from gateway.argvalues import (_BINARY, _IPV4, _STRING, _address, _flag, _headers, _int, _port, _raw,
                               _skip_args, _text)
from gateway.mapping import InvalidMessage, Problem, RequestContext
from gateway.spop import SpopError, Status
from gateway.spop.types import decode_text, decode_typed, decode_varint

_INVALID = Status.INVALID
_RESPONSE = mapping.CHECK_RESPONSE
_SCHEMAS = {schema.name.encode(): schema for schema in mapping.MESSAGES.values()}
_FIELDS = {schema.name: {a.name.encode(): a.field for a in schema.arguments}
           for schema in mapping.MESSAGES.values()}


class Decoded:
    """One NOTIFY, mapped: either `request` (EvaluateRequest bytes, or
    ResponseRequest bytes when `worker` is not None) and `context`, or
    `error` (an InvalidMessage the failure policy answers). `worker` names
    the wafsvc worker a response must reach ("" when its request was not
    kept). `ignored` lists (message, argument) names the gateway did not use
    (argument "" for a whole message)."""
    __slots__ = ("stream_id", "frame_id", "request", "context", "error", "ignored", "worker")

    def __init__(self, stream_id: int, frame_id: int, request: bytes | None, context: RequestContext | None,
                 error: InvalidMessage | None, ignored: list, worker: str | None = None) -> None:
        self.stream_id = stream_id
        self.frame_id = frame_id
        self.request = request
        self.context = context
        self.error = error
        self.ignored = ignored
        self.worker = worker


class NotifyDecoder:
    """The notify_decoder of the gateway's SPOP connections."""

    def __init__(self, default_app: str = "", haproxy_bufsize: int = 0) -> None:
        self.default_app = default_app.encode()
        self.bufsize = haproxy_bufsize

    def __call__(self, stream_id: int, frame_id: int, buf: bytes, pos: int) -> Decoded:
        end = len(buf)
        chosen = None
        ignored: list = []
        try:
            while pos < end:
                n = buf[pos]
                if n < 240:
                    pos += 1
                else:
                    n, pos = decode_varint(buf, pos)
                q = pos + n
                if q >= end:
                    raise SpopError(_INVALID, "truncated message")
                raw_name = buf[pos:q]
                nargs = buf[q]
                pos = q + 1
                schema = _SCHEMAS.get(raw_name) if chosen is None else None
                if schema is None:
                    pos, _ = _skip_args(buf, pos, nargs, end)
                    ignored.append((decode_text(raw_name), ""))
                    continue
                fields = _FIELDS[schema.name]
                values: dict = {}
                unknown = []
                for _ in range(nargs):
                    n = buf[pos]
                    if n < 240:
                        pos += 1
                    else:
                        n, pos = decode_varint(buf, pos)
                    q = pos + n
                    if q >= end:
                        raise SpopError(_INVALID, "truncated argument")
                    key = buf[pos:q]
                    tag = buf[q] & 0x0F
                    if tag == _STRING or tag == _BINARY:
                        pos = q + 1
                        n = buf[pos]
                        if n < 240:
                            pos += 1
                        else:
                            n, pos = decode_varint(buf, pos)
                        q = pos + n
                        if q > end:
                            raise SpopError(_INVALID, "truncated string")
                        value = buf[pos:q]
                        pos = q
                    elif tag == 0:
                        value = None
                        pos = q + 1
                    elif tag == _IPV4:
                        pos = q + 5
                        if pos > end:
                            raise SpopError(_INVALID, "truncated address")
                        value = inet_ntoa(buf[q + 1:pos]).encode()
                    else:
                        value, pos = decode_typed(buf, q)
                    field = fields.get(key)
                    if field is None:
                        unknown.append(key)
                    else:
                        values[field] = (tag, value)  # the last of duplicates wins
                chosen = (schema, values, unknown)
        except IndexError:
            raise SpopError(_INVALID, "truncated NOTIFY") from None
        if chosen is None:
            names = [name for name, _ in ignored]
            error = InvalidMessage(
                Problem.UNKNOWN_MESSAGE, f"no message the gateway knows in this NOTIFY, only "
                f"{', '.join(names) or '(none)'}", message=names[0] if names else "",
                hint="name the message check-request (deploy/haproxy/spoe-modsecurity.conf), or "
                     "modsecurity as the original agent did, in spoe-agent 'messages' and 'spoe-message'")
            return Decoded(stream_id, frame_id, None, None, error, [])
        schema, values, unknown = chosen
        unknown_names = [decode_text(k) for k in unknown]
        ignored.extend((schema.name, name) for name in unknown_names)
        worker = None
        try:
            if schema is _RESPONSE:
                request, worker, context = self._map_response(values)
            else:
                request, context = self._map(schema, values)
        except InvalidMessage as exc:
            return Decoded(stream_id, frame_id, None, None, schema.explain(exc, unknown_names), ignored)
        return Decoded(stream_id, frame_id, request, context, None, ignored, worker)

    def _required(self, schema: mapping.MessageSchema, values: dict) -> None:
        for arg in schema.arguments:
            if arg.required:
                tv = values.get(arg.field, False)
                if tv is False:
                    raise InvalidMessage(Problem.MISSING_ARGUMENT, "is missing", schema.name, arg.field,
                                         mapping._hint(schema, arg))
                if tv[0] == 0 and not arg.nullable:
                    raise InvalidMessage(Problem.NULL_ARGUMENT, f"is NULL (HAProxy's {arg.fetch} gave nothing)",
                                         schema.name, arg.field, f"check that {arg.name}={arg.fetch} applies to "
                                         f"this request (a request without a path, such as OPTIONS *, has no path)")

    def _map_response(self, values: dict) -> tuple[bytes, str, RequestContext]:
        # The same checks, in the same order, as responses.build_response.
        self._required(_RESPONSE, values)
        get = values.get
        handle = _text(get("handle"), "handle")
        worker = responses.worker_of(handle.decode()) if handle else ""
        raw_headers = _raw(get("headers"), "headers")
        try:
            encoded, content_length, _ = _headers(raw_headers, pw.R_HEADER)
        except SpopError as exc:
            raise InvalidMessage(Problem.BAD_VALUE, f"is not a res.hdrs_bin block ({exc.message})",
                                 argument="headers") from None
        body = _raw(get("body"), "body")
        status = _int(get("status"), "status", -1)
        if not 100 <= status <= 999:
            responses.status_of(status)  # raises the reference's error
        method = _text(get("method"), "method")
        body_size = _int(get("body_size"), "body_size", -1)
        truncated = responses.expects_body(method, status) and mapping.body_was_cut(
            len(body), content_length, body_size, len(raw_headers), self.bufsize)
        app = _text(get("app"), "app") or self.default_app
        version = _text(get("ver"), "ver")
        unique_id = _text(get("id"), "id")
        frontend = _text(get("frontend"), "frontend")
        field = pw.field
        parts = [field(pw.R_HANDLE, handle)] if handle else []
        parts.append(pw.R_STATUS + pw.varint(status))
        if version:
            parts.append(field(pw.R_HTTP_VERSION, version))
        parts.extend(encoded)
        if body:
            parts.append(field(pw.R_BODY, body))
        if truncated:
            parts.append(pw.R_BODY_TRUNCATED)
        if content_length:
            parts.append(pw.R_CONTENT_LENGTH + pw.varint(content_length))
        if unique_id:
            parts.append(field(pw.R_TRANSACTION_ID, unique_id))
        context = RequestContext(unique_id=unique_id.decode(), frontend=frontend.decode(), host="",
                                 app=app.decode(), body_truncated=truncated)
        return b"".join(parts), worker, context

    def _map(self, schema: mapping.MessageSchema, values: dict) -> tuple[bytes, RequestContext]:
        # The same checks, in the same order, as mapping.map_message.
        self._required(schema, values)
        get = values.get
        raw_headers = _raw(get("headers"), "headers")
        try:
            encoded, content_length, host = _headers(raw_headers)
        except SpopError as exc:
            raise InvalidMessage(Problem.BAD_VALUE, f"is not a req.hdrs_bin block ({exc.message})",
                                 argument="headers") from None
        body = _raw(get("body"), "body")
        truncated = mapping.body_was_cut(len(body), content_length, _int(get("body_size"), "body_size", -1),
                                         len(raw_headers), self.bufsize)
        app = _text(get("app"), "app") or self.default_app
        unique_id = _text(get("id"), "id")
        client_ip = _address(get("src"), "src")
        client_port = _port(get("src_port"), "src_port")
        server_ip = _address(get("dst"), "dst")
        server_port = _port(get("dst_port"), "dst_port")
        method = _text(get("method"), "method")
        if "uri" in values:
            uri = _raw(values["uri"], "uri")
        else:  # the original agent's message: path and query, raw
            uri = _raw(values["path"], "path")
            query = get("query")
            if query is not None and query[0] != 0:
                uri += b"?" + _raw(query, "query")
        if not uri:
            raise InvalidMessage(Problem.BAD_VALUE, "is empty", argument="uri" if "uri" in values else "path")
        version = _text(get("ver"), "ver") or b"1.1"
        inspect = _flag(get("inspect_response"), "inspect_response")
        if not method:
            raise InvalidMessage(Problem.BAD_VALUE, "is empty", argument="method")
        ignore = _text(get("ignore"), "ignore")
        rule_ids = mapping._rule_ids(ignore.decode(), "ignore") if ignore else ()
        frontend = _text(get("frontend"), "frontend")

        field = pw.field
        parts = []
        if unique_id:
            parts.append(field(pw.T_TRANSACTION_ID, unique_id))
        if client_ip:
            parts.append(field(pw.T_CLIENT_IP, client_ip))
        if client_port:
            parts.append(pw.T_CLIENT_PORT + pw.varint(client_port))
        if server_ip:
            parts.append(field(pw.T_SERVER_IP, server_ip))
        if server_port:
            parts.append(pw.T_SERVER_PORT + pw.varint(server_port))
        parts.append(field(pw.T_METHOD, method))
        parts.append(field(pw.T_URI, uri))
        parts.append(field(pw.T_HTTP_VERSION, version))
        parts.extend(encoded)
        if body:
            parts.append(field(pw.T_BODY, body))
        if truncated:
            parts.append(pw.T_BODY_TRUNCATED)
        if content_length:
            parts.append(pw.T_CONTENT_LENGTH + pw.varint(content_length))
        if app:
            parts.append(field(pw.T_APPLICATION, app))
        if rule_ids:
            parts.append(pw.packed(pw.T_IGNORE_RULE_IDS, rule_ids))
        if inspect:
            parts.append(pw.T_INSPECT_RESPONSE)
        context = RequestContext(unique_id=unique_id.decode(), frontend=frontend.decode(),
                                 host=host.decode("latin-1"), app=app.decode(), body_truncated=truncated,
                                 original_agent=schema is mapping.ORIGINAL)
        return b"".join(parts), context
